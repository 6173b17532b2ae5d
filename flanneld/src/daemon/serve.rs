//! Stage "serve": what runs beside the data plane once we hold a lease: the config watch (live
//! backend switches), pod publishing, the service proxy and network policy (each only when
//! asked for; when not, the table an earlier run left is removed).

use std::sync::Arc;
use std::time::Duration;

use backends::ExternalInterface;
use subnet_lease::LeaseStore;
use subnet_lease::{Backoff, EtcdLeaseStore, Lease, SubnetKey};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::flags::Flags;
use crate::health::Status;
use crate::nft::Nft;
use crate::pods::{self, PodOptions};

/// The tasks started beside the data plane, and their channels.
pub(super) struct Services {
    /// Every value of `<prefix>/config` seen (the current one first).
    pub config_changes: mpsc::Receiver<String>,
    /// The registry, for reading the config when a secondary backend is about to start.
    pub registry: EtcdLeaseStore,
    /// Our subnet for the pod publisher (a re-acquired lease is passed on).
    pub subnet: watch::Sender<SubnetKey>,
    config_watch: JoinHandle<()>,
    pods: Option<JoinHandle<()>>,
    proxy: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    policy: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    dns: Option<super::dns::Running>,
}

/// Runs the stage.
pub(super) async fn serve(
    flags: &Flags,
    ext: &ExternalInterface,
    cfg: &subnet_lease::NetConfig,
    lease: &Lease,
    reg: &EtcdLeaseStore,
    status: &Arc<Status>,
    dns: Option<super::dns::Running>,
) -> Services {
    let (config_tx, config_changes) = mpsc::channel::<String>(8);
    let config_watch = tokio::spawn(watch_config(reg.clone(), config_tx));
    // Pods are published for the subnet we hold now; a re-acquired lease is passed on.
    let (subnet, subnet_rx) = watch::channel(lease.key);
    let pods = pods::spawn(
        PodOptions {
            data_dir: flags.cni_data_dir.clone(),
            node: flags.node_name(),
            // An IPv6-only node's PublicIP is 0.0.0.0 (as every such node's): its records
            // carry its PublicIPv6.
            node_ip: match (ext.v4, ext.public_ipv6()) {
                (None, Some(v6)) => v6.into(),
                _ => ext.public_ip().into(),
            },
        },
        reg.connection().clone(),
        subnet_rx,
        status.clone(),
    );
    let proxy_mode = flags.proxy_mode.parse::<service_proxy::run::Mode>();
    // Userspace relays come from the node, past the policy table: the module judges them.
    let policy_gate = (flags.network_policy
        && proxy_mode == Ok(service_proxy::run::Mode::Userspace))
    .then(policy::run::PolicyGate::default);
    let proxy = match proxy_mode {
        Ok(mode) => {
            let node = service_proxy::model::NodeInfo {
                name: flags.node_name(),
                subnet: lease.key.ipv4,
            };
            let network6 = cfg.ipv6_network();
            let mut opts = service_proxy::run::ProxyOptions::new(mode, node, cfg.ipv4_network());
            // IPv6 Services (table ip6 flannel-proxy; userspace listeners on [::]) when the
            // cluster has IPv6 pods.
            opts.ipv6 = network6.is_some();
            opts.cluster_cidr6 = network6;
            opts.userspace.gate = policy_gate
                .clone()
                .map(|g| Arc::new(g) as Arc<dyn service_proxy::userspace::Gate>);
            tracing::info!("service proxy on ({})", flags.proxy_mode);
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(service_proxy::run::run(
                reg.connection().clone(),
                opts,
                status.proxy.clone(),
                stop_rx,
            ));
            Some((stop, task))
        }
        Err(_) => {
            // `none`: remove what an earlier run with a proxy mode may have left.
            if let Err(e) = Nft::default().apply(&service_proxy::nft::cleanup()).await {
                tracing::debug!("no service proxy table to remove: {e:#}");
            }
            None
        }
    };
    let policy = if flags.network_policy {
        tracing::info!("network policy on");
        if !flags.ip_masq {
            // subnet.env then says FLANNEL_IPMASQ=false and the CNI bridge masquerades pod
            // traffic to other nodes: their policies see this node's address, not the pod's.
            tracing::warn!(
                "--network-policy without --ip-masq: traffic to pods of other nodes leaves with \
                 the node's address, so pod and namespace selectors cannot match it there"
            );
        }
        let mut opts = policy::run::PolicyOptions::new(&flags.node_name());
        opts.gate = policy_gate;
        // Table ip6 flannel-policy only where pods have IPv6 addresses (a leftover one is
        // removed otherwise).
        opts.ipv6 = cfg.enable_ipv6;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(policy::run::run(
            reg.connection().clone(),
            opts,
            status.policy.clone(),
            stop_rx,
        ));
        Some((stop, task))
    } else {
        if let Err(e) = Nft::default().apply(&policy::compile::cleanup()).await {
            tracing::debug!("no network policy table to remove: {e:#}");
        }
        None
    };
    Services {
        config_changes,
        registry: reg.clone(),
        subnet,
        config_watch,
        pods,
        proxy,
        policy,
        dns,
    }
}

impl Services {
    /// Stops them (bounded). Pod keys stay (on their own 60 s etcd lease) for the restart, like
    /// the data plane; the proxy and policy tables stay too.
    pub(super) async fn stop(self) {
        self.config_watch.abort();
        if let Some(t) = self.pods {
            t.abort();
        }
        for (stop, task) in [self.proxy, self.policy, self.dns].into_iter().flatten() {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Follows `<prefix>/config` and forwards every value it sees (the current one first, again
/// after each re-established watch, so nothing changed meanwhile is missed).
pub(super) async fn watch_config(reg: EtcdLeaseStore, tx: mpsc::Sender<String>) {
    use futures::StreamExt;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match reg.watch_config().await {
            Ok(mut stream) => {
                if let Ok(Some(text)) = reg.get_config().await {
                    if tx.send(text).await.is_err() {
                        return;
                    }
                }
                backoff.reset();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(Some(text)) => {
                            if tx.send(text).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => tracing::warn!(
                            "network config {} deleted; keeping the running config",
                            reg.config_key()
                        ),
                        Err(e) => {
                            tracing::warn!("config watch: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("config watch: {e}"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
