//! Stage "acquire": a valid network config, the backends it names, and a lease; while no
//! lease can be had (a full network, our lease outside a changed config) it waits, not ready,
//! re-reading the config at each try.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use backends::netlink::Netlink;
use backends::set::BackendSet;
use backends::{BackendContext, ExternalInterface};
use subnet_lease::alloc::AllocError;
use subnet_lease::manager::{LeaseError, ManagerOptions};
use subnet_lease::LeaseStore;
use subnet_lease::{
    config, Backoff, EtcdLeaseStore, Lease, LeaseAttrs, LeaseManager, NetConfig, SubnetEnv,
    SubnetKey,
};

use super::{node_id, or_shutdown, Shutdown};
use crate::health::Status;

/// Waits for a valid network config in etcd, as flannel does (it retries until one appears).
pub(super) async fn network_config(reg: &EtcdLeaseStore, backoff: &mut Backoff) -> NetConfig {
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

pub(super) fn previous_subnet(path: &Path) -> Option<SubnetKey> {
    match SubnetEnv::read(path) {
        Ok(env) => (env.subnet.is_some() || env.ipv6_subnet.is_some()).then_some(SubnetKey {
            ipv4: env.subnet,
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

/// What an acquisition attempt came to.
pub(super) enum Acquired {
    Lease(Box<Lease>),
    /// No lease can be had now; retrying later may help (`reason` labels the metric).
    Wait {
        reason: &'static str,
        why: String,
    },
}

/// Acquires a lease, retrying transient errors; a full network or our lease outside a changed
/// config is [`Acquired::Wait`].
pub(super) async fn acquire(
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

/// What this node publishes in its lease: its public IP(s) (PublicIP 0.0.0.0 on an IPv6-only
/// node, as flannel) and the primary backend's type and data per family. `BackendV6Data` only
/// goes with a `PublicIPv6` (flannel nodes stall on one without the other).
pub(super) fn published(ext: &ExternalInterface, set: &BackendSet) -> LeaseAttrs {
    let mut attrs = LeaseAttrs::new(ext.public_ip(), set.primary().backend_type());
    attrs.public_ipv6 = ext.public_ipv6();
    attrs.backend_data = set.primary().backend_data();
    attrs.backend_v6_data = set
        .primary()
        .backend_v6_data()
        .filter(|_| attrs.public_ipv6.is_some());
    attrs
}

/// What the acquire stage ends with.
pub(super) struct Leased {
    pub cfg: NetConfig,
    /// The interface chosen for the config's families.
    pub ext: ExternalInterface,
    pub backend: BackendSet,
    pub manager: LeaseManager<EtcdLeaseStore>,
    pub lease: Lease,
}

/// The wait for a lease, logged once per distinct reason (pure).
#[derive(Debug, Default)]
pub(super) struct Waiting {
    current: Option<(&'static str, String)>,
}

/// What one more failed try means for the log and the metric.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WaitStep {
    /// A new reason (or a new message): log it, set its metric, clear `cleared`'s.
    New { cleared: Option<&'static str> },
    /// The same as last time: quietly.
    Same,
}

impl Waiting {
    pub(super) fn wait(&mut self, reason: &'static str, why: &str) -> WaitStep {
        if self
            .current
            .as_ref()
            .is_some_and(|(r, w)| *r == reason && w == why)
        {
            return WaitStep::Same;
        }
        let cleared = self
            .current
            .replace((reason, why.to_string()))
            .map(|(r, _)| r);
        WaitStep::New { cleared }
    }

    /// A lease was had: the reason whose metric to clear, if it waited.
    pub(super) fn done(&mut self) -> Option<&'static str> {
        self.current.take().map(|(r, _)| r)
    }
}

/// Runs the stage; None when a shutdown signal came first.
#[allow(clippy::too_many_arguments)]
pub(super) async fn lease(
    shutdown: &mut Shutdown,
    reg: &EtcdLeaseStore,
    flags: &crate::flags::Flags,
    netlink: Arc<dyn Netlink>,
    opts: ManagerOptions,
    previous: Option<SubnetKey>,
    status: &Status,
    parts: crate::families::Parts,
) -> Result<Option<Leased>> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut wait_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let mut started: Option<(NetConfig, ExternalInterface, BackendSet)> = None;
    let mut waiting = Waiting::default();
    loop {
        let Some(cfg) = or_shutdown(shutdown, network_config(reg, &mut backoff)).await else {
            return Ok(None);
        };
        if let Err(e) = crate::families::check(&cfg, parts) {
            bail!("network config refused: {e}");
        }
        let (ext, backend) = match started.take() {
            Some((c, ext, b)) if c == cfg => (ext, b),
            _ => {
                let ext = super::interface::external_interface(flags, &cfg)?;
                let ctx = BackendContext {
                    ext: ext.clone(),
                    network: cfg.ipv4_network(),
                    network6: cfg.ipv6_network(),
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
                (ext, b)
            }
        };
        let attrs = published(&ext, &backend);
        let manager = LeaseManager::new(reg.clone(), cfg.clone(), attrs, opts.clone());
        let Some(got) = or_shutdown(shutdown, acquire(&manager, previous)).await else {
            return Ok(None);
        };
        match got? {
            Acquired::Lease(l) => {
                if let Some(reason) = waiting.done() {
                    status.lease_waiting(reason, false);
                }
                return Ok(Some(Leased {
                    cfg,
                    ext,
                    backend,
                    manager,
                    lease: *l,
                }));
            }
            Acquired::Wait { reason, why } => {
                let d = wait_backoff.next_delay();
                // Logged (and a refused config counted) once per distinct reason; then quietly.
                match waiting.wait(reason, &why) {
                    WaitStep::New { cleared } => {
                        if let Some(old) = cleared {
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
                    }
                    WaitStep::Same => {
                        tracing::warn!("still no lease ({reason}); retrying in {d:?}");
                    }
                }
                started = Some((cfg, ext, backend));
                if or_shutdown(shutdown, tokio::time::sleep(d)).await.is_none() {
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_logged_once_per_reason_and_cleared_on_change() {
        let mut w = Waiting::default();
        assert_eq!(w.done(), None);
        assert_eq!(
            w.wait("network_full", "full"),
            WaitStep::New { cleared: None }
        );
        assert_eq!(w.wait("network_full", "full"), WaitStep::Same);
        // Another message for the same reason is logged again.
        assert_eq!(
            w.wait("network_full", "full, 0 free"),
            WaitStep::New {
                cleared: Some("network_full")
            }
        );
        assert_eq!(
            w.wait("lease_outside_network", "outside"),
            WaitStep::New {
                cleared: Some("network_full")
            }
        );
        assert_eq!(w.done(), Some("lease_outside_network"));
        assert_eq!(w.done(), None);
    }
}
