//! The daemon's run loop: interface → etcd → network config → backend → lease → subnet file,
//! then renewal and peer events until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backends::netlink::Netlink;
use backends::netlink_rt::RtNetlink;
use backends::set::BackendSet;
use backends::{BackendContext, ExternalInterface};
use subnet_lease::alloc::AllocError;
use subnet_lease::manager::{Event, LeaseError, ManagerOptions};
use subnet_lease::LeaseStats;
use subnet_lease::LeaseStore;
use subnet_lease::{
    config, BackendConfig, Backoff, EtcdLeaseStore, EtcdOptions, Lease, LeaseAttrs, LeaseManager,
    NetConfig, Republish, SubnetEnv, SubnetKey,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::flags::Flags;
use crate::health::{self, Status};
use crate::iface;
use crate::nft::{self, HostRules, Nft, RuleKeeper};
use crate::pods::{self, PodOptions};

/// Resolves when SIGTERM or SIGINT arrives.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `fut`, or returns None if a shutdown signal comes first.
async fn or_shutdown<T>(
    shutdown: &mut Shutdown,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        v = fut => Some(v),
        sig = shutdown.wait() => {
            tracing::info!("{sig} received; exiting");
            None
        }
    }
}

fn external_interface(flags: &Flags) -> Result<ExternalInterface> {
    let ifaces = iface::system_interfaces()?;
    let default = iface::default_route_iface()?;
    let ext = iface::choose(
        &ifaces,
        default.as_deref(),
        &flags.iface,
        &flags.iface_regex,
        flags.public_ip,
    )?;
    tracing::info!(
        "using interface {} (index {}, IP {}, MTU {}), public IP {}",
        ext.name,
        ext.index,
        ext.iface_ip,
        ext.mtu,
        ext.public_ip
    );
    Ok(ext)
}

/// Waits for a valid network config in etcd, as flannel does (it retries until one appears).
async fn network_config(reg: &EtcdLeaseStore, backoff: &mut Backoff) -> NetConfig {
    loop {
        let problem = match reg.get_config().await {
            Ok(Some(text)) => match config::parse(&text) {
                Ok(parsed) => {
                    for w in &parsed.warnings {
                        tracing::warn!("{w}");
                    }
                    return parsed.config;
                }
                Err(e) => format!("network config {} is invalid: {e}", reg.config_key()),
            },
            Ok(None) => format!("no network config at {} yet", reg.config_key()),
            Err(e) => format!("reading the network config: {e}"),
        };
        let d = backoff.next_delay();
        tracing::warn!("{problem}; retrying in {d:?}");
        tokio::time::sleep(d).await;
    }
}

fn previous_subnet(path: &Path) -> Option<SubnetKey> {
    match SubnetEnv::read(path) {
        Ok(env) => env.subnet.map(|ipv4| SubnetKey {
            ipv4,
            ipv6: env.ipv6_subnet,
        }),
        Err(subnet_lease::subnet_env::SubnetEnvError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => {
            tracing::warn!("ignoring the previous subnet file: {e}");
            None
        }
    }
}

fn write_subnet_file(
    path: &Path,
    cfg: &NetConfig,
    lease: &Lease,
    mtu: u32,
    ip_masq: bool,
) -> Result<()> {
    let env = SubnetEnv {
        network: cfg.ipv4_network(),
        subnet: Some(lease.key.ipv4),
        ipv6_network: cfg.ipv6_network(),
        ipv6_subnet: lease.key.ipv6,
        mtu,
        ip_masq,
    };
    env.write(path)
        .with_context(|| format!("writing the subnet file {}", path.display()))?;
    tracing::info!("wrote {}", path.display());
    Ok(())
}

/// What an acquisition attempt came to.
enum Acquired {
    Lease(Box<Lease>),
    /// No lease can be had now; retrying later may help (`reason` labels the metric).
    Wait {
        reason: &'static str,
        why: String,
    },
}

/// Acquires a lease, retrying transient errors; a full network or our lease outside a changed
/// config is [`Acquired::Wait`].
async fn acquire(
    manager: &LeaseManager<EtcdLeaseStore>,
    previous: Option<SubnetKey>,
) -> Result<Acquired> {
    let mut backoff = Backoff::default();
    loop {
        match manager.acquire(previous).await {
            Ok(l) => return Ok(Acquired::Lease(Box::new(l))),
            Err(e @ LeaseError::Alloc(AllocError::Full { .. })) => {
                return Ok(Acquired::Wait {
                    reason: "network_full",
                    why: format!(
                        "{e}; a subnet freed (lease deleted, revoked or expired) is taken"
                    ),
                })
            }
            Err(e @ LeaseError::OutsideNetwork { .. }) => {
                return Ok(Acquired::Wait {
                    reason: "lease_outside_network",
                    why: e.to_string(),
                })
            }
            Err(e) if e.is_transient() => {
                let d = backoff.next_delay();
                tracing::warn!("acquiring a lease: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e).context("acquiring a lease"),
        }
    }
}

fn describe(l: &Lease) -> String {
    format!(
        "{} (public IP {}, backend {})",
        l.key,
        l.attrs.public_ip,
        if l.attrs.backend_type.is_empty() {
            "none"
        } else {
            &l.attrs.backend_type
        }
    )
}

/// A stable identity of this machine: machine-id, else the hostname.
fn node_id() -> String {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        ca_file: flags.etcd_cafile.clone(),
        cert_file: flags.etcd_certfile.clone(),
        key_file: flags.etcd_keyfile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
        ..EtcdOptions::default()
    }
}

/// `--cleanup`: remove the host rules and the VXLAN device, keep the lease. Collects errors and
/// keeps going.
async fn cleanup(flags: &Flags) -> Result<()> {
    let mut errors = Vec::new();
    if let Err(e) = Nft::default().apply(&nft::render_cleanup()).await {
        errors.push(format!("removing the nftables table: {e:#}"));
    }
    if let Err(e) = Nft::default().apply(&service_proxy::nft::cleanup()).await {
        errors.push(format!("removing the service proxy's table: {e:#}"));
    }
    if let Err(e) = Nft::default().apply(&policy::compile::cleanup()).await {
        errors.push(format!("removing the network policy table: {e:#}"));
    }
    // The VNI comes from the config when etcd answers; flannel's default otherwise.
    let mut vni = 1;
    if let Ok(reg) = EtcdLeaseStore::connect(&etcd_options(flags)).await {
        if let Ok(Some(text)) = reg.get_config().await {
            if let Ok(p) = config::parse(&text) {
                if let Ok((c, _)) = backends::vxlan::VxlanConfig::parse(&p.config.backend.options) {
                    vni = c.vni;
                }
            }
        }
    }
    let nl = RtNetlink::connect()?;
    let name = format!("flannel.{vni}");
    match nl.link_by_name(&name).await {
        Ok(Some(l)) => {
            if let Err(e) = nl.delete_link(l.index).await {
                errors.push(format!("deleting {name}: {e}"));
            } else {
                tracing::info!("deleted {name}");
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(format!("looking up {name}: {e}")),
    }
    if errors.is_empty() {
        tracing::info!("cleanup done (the lease stays in etcd)");
        Ok(())
    } else {
        bail!("cleanup: {}", errors.join("; "))
    }
}

/// Reconciles the backends and the host rules, recording the outcome. Until the first full
/// list of leases is in (`listed`), the backends are left as they are: a reconcile would remove
/// every peer's routes, neighbours and FDB entries that a restarted daemon has not heard of
/// yet (and add them back a list later).
async fn sync(backend: &mut BackendSet, rules: &mut RuleKeeper, status: &Status, listed: bool) {
    if listed {
        reconcile(backend, status).await;
    }
    match rules.ensure().await {
        Ok(true) => {
            status.rules_installs.inc();
        }
        Ok(false) => {}
        Err(e) => {
            status.rules_errors.inc();
            tracing::error!("host rules: {e:#}");
        }
    }
}

async fn reconcile(backend: &mut BackendSet, status: &Status) {
    let started = Instant::now();
    status.reconciles.inc();
    match backend.reconcile().await {
        Ok(n) => {
            if n > 0 {
                tracing::info!("reconciled: {n} kernel changes");
            }
            status.reconcile_changes.inc_by(n as u64);
            status.backend_ok.store(true, Ordering::Relaxed);
        }
        Err(e) => {
            status.reconcile_errors.inc();
            status.backend_ok.store(false, Ordering::Relaxed);
            tracing::error!("backend reconcile: {e}");
        }
    }
    status
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    status.peers.set(backend.peer_keys().len() as i64);
    // Each peer's reachability is logged by the set when it changes.
    status
        .peers_unreachable
        .set(backend.unreachable().len() as i64);
    status.set_backend_counters(&backend.counters());
}

/// What this node publishes in its lease: its public IP and the primary backend's type/data.
fn published(ext: &ExternalInterface, set: &BackendSet) -> LeaseAttrs {
    let mut attrs = LeaseAttrs::new(ext.public_ip, set.primary().backend_type());
    attrs.backend_data = set.primary().backend_data();
    attrs
}

/// Follows `<prefix>/config` and forwards every value it sees (the current one first, again
/// after each re-established watch, so nothing changed meanwhile is missed).
async fn watch_config(reg: EtcdLeaseStore, tx: mpsc::Sender<String>) {
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

/// The settings other than `Backend` that differ between two configs, as "Key old -> new".
fn changed_settings(running: &NetConfig, new: &NetConfig) -> Vec<String> {
    fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
        v.as_ref().map_or("none".into(), |v| v.to_string())
    }
    let mut out = Vec::new();
    let mut diff = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key} {a} -> {b}"));
        }
    };
    diff("Network", opt(&running.network), opt(&new.network));
    diff(
        "SubnetLen",
        running.subnet_len.to_string(),
        new.subnet_len.to_string(),
    );
    diff(
        "SubnetMin",
        running.subnet_min.to_string(),
        new.subnet_min.to_string(),
    );
    diff(
        "SubnetMax",
        running.subnet_max.to_string(),
        new.subnet_max.to_string(),
    );
    diff(
        "EnableIPv4",
        running.enable_ipv4.to_string(),
        new.enable_ipv4.to_string(),
    );
    diff(
        "EnableIPv6",
        running.enable_ipv6.to_string(),
        new.enable_ipv6.to_string(),
    );
    diff(
        "IPv6Network",
        opt(&running.ipv6_network),
        opt(&new.ipv6_network),
    );
    diff(
        "IPv6SubnetLen",
        running.ipv6_subnet_len.to_string(),
        new.ipv6_subnet_len.to_string(),
    );
    diff(
        "IPv6SubnetMin",
        running.ipv6_subnet_min.to_string(),
        new.ipv6_subnet_min.to_string(),
    );
    diff(
        "IPv6SubnetMax",
        running.ipv6_subnet_max.to_string(),
        new.ipv6_subnet_max.to_string(),
    );
    diff(
        "EnableNFTables",
        running.enable_nftables.to_string(),
        new.enable_nftables.to_string(),
    );
    diff(
        "ServiceNetwork",
        running.service_network.to_string(),
        new.service_network.to_string(),
    );
    out
}

/// A new network config text: refused (logged, counted in `flannel_config_rejected_total` by
/// reason) when invalid or when it changes more than `Backend` (that needs a restart, and a
/// restart keeps refusing a lease that no longer fits); a changed `Backend` switches the data
/// plane live and republishes our lease. A refused text is logged and counted once, however
/// often the config watch delivers it again (`refused`). Returns our lease as republished
/// after a switch.
#[allow(clippy::too_many_arguments)]
async fn apply_config(
    text: &str,
    running: &NetConfig,
    requested: &mut BackendConfig,
    set: &mut BackendSet,
    control: &mpsc::Sender<Republish>,
    status: &Status,
    ext: &ExternalInterface,
    refused: &mut Option<String>,
) -> Option<Lease> {
    if refused.as_deref() == Some(text) {
        return None;
    }
    let mut refuse = |reason: &str, msg: String| {
        status.reject_config(reason);
        tracing::error!("{msg}");
        *refused = Some(text.to_string());
    };
    let parsed = match config::parse(text) {
        Ok(p) => p.config,
        Err(e) => {
            refuse(
                "invalid",
                format!("new network config refused, the running one stays: {e}"),
            );
            return None;
        }
    };
    let changed = changed_settings(running, &parsed);
    if !changed.is_empty() {
        refuse(
            "network_changed",
            format!(
                "new network config refused: {} changed, and only Backend can change while \
                 running; this node keeps its lease and the running config (leases of the old \
                 Network would lie outside the new one: the cluster would split)",
                changed.join(", ")
            ),
        );
        return None;
    }
    if parsed.backend == *requested {
        *refused = None;
        return None;
    }
    if let Err(e) = backends::validate(&parsed.backend) {
        refuse(
            "invalid",
            format!("new network config refused, the running one stays: {e}"),
        );
        return None;
    }
    *refused = None;
    let from = set.primary().backend_type();
    match set.switch(&parsed.backend).await {
        Ok(warnings) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
        }
        Err(e) => {
            status.reject_config("switch_failed");
            tracing::error!(
                "switching to backend {} failed, {from} stays: {e}",
                parsed.backend.backend_type
            );
            return None;
        }
    }
    *requested = parsed.backend.clone();
    let to = set.primary().backend_type();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for _ in 0..10 {
        let (done, answer) = tokio::sync::oneshot::channel();
        let req = Republish {
            attrs: published(ext, set),
            done,
        };
        if control.send(req).await.is_err() {
            tracing::error!("the lease manager is gone; cannot republish the lease");
            return None;
        }
        match answer.await {
            Ok(Ok(l)) => {
                status.backend_switches.inc();
                tracing::info!(
                    "switched backend {from} -> {to}; running {:?}; lease republished: {}",
                    set.running(),
                    describe(&l)
                );
                return Some(l);
            }
            Ok(Err(e)) => tracing::warn!("republishing the lease: {e}"),
            Err(_) => tracing::warn!("republishing the lease: no answer"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    tracing::error!("switched backend {from} -> {to} but could not republish the lease");
    None
}

/// The whole daemon. Returns Ok on a clean shutdown.
pub async fn run(flags: Flags) -> Result<()> {
    if flags.cleanup {
        return cleanup(&flags).await;
    }
    let mut shutdown = Shutdown::install()?;
    let ext = external_interface(&flags)?;
    let reg = EtcdLeaseStore::connect(&etcd_options(&flags))
        .await
        .context("connecting to etcd")?;
    let lease_stats: Arc<LeaseStats> = Arc::default();
    let status = Status::new(lease_stats.clone());
    let _health = if flags.healthz_port != 0 {
        Some(
            health::serve(
                SocketAddr::new(flags.healthz_ip, flags.healthz_port),
                status.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    let netlink: Arc<dyn Netlink> = Arc::new(RtNetlink::connect().context("opening netlink")?);
    let opts = ManagerOptions {
        renew_margin: Duration::from_secs(flags.subnet_lease_renew_margin * 60),
        release_stale_leases: flags.allow_network_change,
        stats: lease_stats,
        ..ManagerOptions::default()
    };
    let previous = previous_subnet(&flags.subnet_file);
    // Config, backend and lease; while no lease can be had (a full network, our lease outside
    // a changed config) this waits, not ready, re-reading the config at each try.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut wait_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let mut started: Option<(NetConfig, BackendSet)> = None;
    let mut waiting: Option<(&'static str, String)> = None;
    let (cfg, network, mut backend, manager, lease) = loop {
        let Some(cfg) = or_shutdown(&mut shutdown, network_config(&reg, &mut backoff)).await else {
            return Ok(());
        };
        let Some(network) = cfg.ipv4_network() else {
            bail!("EnableIPv4 is false: this daemon's etcd leases need an IPv4 Network");
        };
        let backend = match started.take() {
            Some((c, b)) if c == cfg => b,
            _ => {
                let ctx = BackendContext {
                    ext: ext.clone(),
                    network,
                    node_id: node_id(),
                    netlink: netlink.clone(),
                };
                let (b, warnings) =
                    BackendSet::start(&cfg.backend, ctx)
                        .await
                        .with_context(|| {
                            format!("starting the {} backend", cfg.backend.backend_type)
                        })?;
                for w in warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!("backend {}", b.primary().backend_type());
                b
            }
        };
        let attrs = published(&ext, &backend);
        let manager = LeaseManager::new(reg.clone(), cfg.clone(), attrs, opts.clone());
        let Some(got) = or_shutdown(&mut shutdown, acquire(&manager, previous)).await else {
            return Ok(());
        };
        match got? {
            Acquired::Lease(l) => {
                if let Some((reason, _)) = waiting {
                    status.lease_waiting(reason, false);
                }
                break (cfg, network, backend, manager, *l);
            }
            Acquired::Wait { reason, why } => {
                let d = wait_backoff.next_delay();
                // Logged (and a refused config counted) once per distinct reason; then quietly.
                if waiting.as_ref() != Some(&(reason, why.clone())) {
                    if let Some((old, _)) = waiting {
                        status.lease_waiting(old, false);
                    }
                    status.lease_waiting(reason, true);
                    if reason == "lease_outside_network" {
                        status.reject_config(reason);
                    }
                    tracing::error!(
                        "no lease: {why}; waiting, not ready (retrying every {:?} at most)",
                        wait_backoff.max
                    );
                    waiting = Some((reason, why));
                } else {
                    tracing::warn!("still no lease ({reason}); retrying in {d:?}");
                }
                started = Some((cfg, backend));
                if or_shutdown(&mut shutdown, tokio::time::sleep(d))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
    };
    tracing::info!("leased {}", describe(&lease));
    status.lease_held.store(true, Ordering::Relaxed);

    let mut rules = RuleKeeper::new(Nft::default());
    let host_rules = |l: &Lease| HostRules {
        network,
        subnet: l.key.ipv4,
        forward: flags.iptables_forward_rules,
        ip_masq: flags.ip_masq,
    };
    rules.set(host_rules(&lease));
    backend
        .set_lease(&lease)
        .await
        .context("configuring the backend for our lease")?;
    // Peers are not known yet: host rules only, the data plane stays as it is.
    let mut listed = false;
    sync(&mut backend, &mut rules, &status, listed).await;
    // The subnet file for a lease, with the MTU of the backend running now.
    let write_env = |l: &Lease, set: &BackendSet| {
        write_subnet_file(
            &flags.subnet_file,
            &cfg,
            l,
            set.primary().mtu(),
            flags.ip_masq,
        )
    };
    write_env(&lease, &backend)?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!("sd_notify: {e}");
    }

    let (tx, mut events) = mpsc::channel(256);
    let (control, control_rx) = mpsc::channel(4);
    let (config_tx, mut config_changes) = mpsc::channel::<String>(8);
    let config_watch = tokio::spawn(watch_config(manager.store().clone(), config_tx));
    // Pods are published for the subnet we hold now; a re-acquired lease is passed on.
    let (subnet_tx, subnet_rx) = tokio::sync::watch::channel(lease.key);
    let pod_task = pods::spawn(
        PodOptions {
            data_dir: flags.cni_data_dir.clone(),
            node: flags.node_name(),
            node_ip: ext.public_ip,
        },
        manager.store().clone(),
        subnet_rx,
        status.clone(),
    );
    let (proxy_stop, proxy_stop_rx) = tokio::sync::watch::channel(false);
    let proxy_mode = flags.proxy_mode.parse::<service_proxy::run::Mode>();
    // Userspace relays come from the node, past the policy table: the module judges them.
    let policy_gate = (flags.network_policy
        && proxy_mode == Ok(service_proxy::run::Mode::Userspace))
    .then(policy::run::PolicyGate::default);
    let proxy_task = match proxy_mode {
        Ok(mode) => {
            let node = service_proxy::model::NodeInfo {
                name: flags.node_name(),
                subnet: Some(lease.key.ipv4),
            };
            let mut opts = service_proxy::run::ProxyOptions::new(mode, node, Some(network));
            opts.userspace.gate = policy_gate
                .clone()
                .map(|g| Arc::new(g) as Arc<dyn service_proxy::userspace::Gate>);
            tracing::info!("service proxy on ({})", flags.proxy_mode);
            Some(tokio::spawn(service_proxy::run::run(
                manager.store().clone(),
                opts,
                status.proxy.clone(),
                proxy_stop_rx,
            )))
        }
        Err(_) => {
            // `none`: remove what an earlier run with a proxy mode may have left.
            if let Err(e) = Nft::default().apply(&service_proxy::nft::cleanup()).await {
                tracing::debug!("no service proxy table to remove: {e:#}");
            }
            None
        }
    };
    let (policy_stop, policy_stop_rx) = tokio::sync::watch::channel(false);
    let policy_task = if flags.network_policy {
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
        Some(tokio::spawn(policy::run::run(
            manager.store().clone(),
            opts,
            status.policy.clone(),
            policy_stop_rx,
        )))
    } else {
        if let Err(e) = Nft::default().apply(&policy::compile::cleanup()).await {
            tracing::debug!("no network policy table to remove: {e:#}");
        }
        None
    };
    let mut requested = cfg.backend.clone();
    let mut refused = None;
    let mut own = lease.clone();
    let run = tokio::spawn(manager.run_with_control(lease, tx, control_rx));
    let mut resync = tokio::time::interval(Duration::from_secs(flags.iptables_resync));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            ev = events.recv() => ev,
            _ = resync.tick() => {
                sync(&mut backend, &mut rules, &status, listed).await;
                continue;
            }
            // A backend switch needs every peer: only once they are listed.
            text = config_changes.recv(), if listed => {
                if let Some(text) = text {
                    if let Some(l) = apply_config(&text, &cfg, &mut requested, &mut backend, &control, &status, &ext, &mut refused).await {
                        own = l;
                        write_env(&own, &backend)?;
                        sync(&mut backend, &mut rules, &status, listed).await;
                    }
                }
                continue;
            }
            sig = shutdown.wait() => {
                tracing::info!("{sig} received; exiting (lease, devices, routes and rules stay for the restart)");
                break;
            }
        };
        let Some(first) = first else {
            bail!("the lease manager stopped unexpectedly");
        };
        // Apply everything that is queued, then reconcile once.
        let mut batch = vec![first];
        while let Ok(ev) = events.try_recv() {
            batch.push(ev);
        }
        for ev in &batch {
            match ev {
                Event::PeerAdded(l) => tracing::info!("peer joined or changed: {}", describe(l)),
                Event::PeerRemoved(l) => tracing::info!("peer left: {}", describe(l)),
                Event::OwnLease(l) => {
                    tracing::warn!("our lease was re-acquired: {}", describe(l));
                    own = l.clone();
                    backend
                        .set_lease(l)
                        .await
                        .context("configuring the backend for our new lease")?;
                    rules.set(host_rules(l));
                    write_env(l, &backend)?;
                    let _ = subnet_tx.send(l.key);
                }
                Event::PeersListed => {
                    listed = true;
                    tracing::info!(
                        "peer leases listed ({} peers); reconciling, stale entries go now",
                        backend.peer_keys().len()
                    );
                }
            }
            backend.peer_event(ev);
        }
        sync(&mut backend, &mut rules, &status, listed).await;
    }
    tracing::debug!("stopping with lease {}", describe(&own));
    config_watch.abort();
    // Pod keys stay (on their own 60 s etcd lease) for the restart, like the data plane.
    if let Some(t) = pod_task {
        t.abort();
    }
    let _ = proxy_stop.send(true);
    if let Some(t) = proxy_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = policy_stop.send(true);
    if let Some(t) = policy_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    drop(events);
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    Ok(())
}
