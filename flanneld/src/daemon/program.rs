//! Stage "program": with our lease, the host rules, the backend's own lease, the subnet file
//! for the CNI plugin, then READY=1. Peers are not known yet, so the data plane is left as it
//! is (a restart must not remove routes before the peers are listed). Also the reconcile
//! steps every later stage repeats.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use backends::set::BackendSet;
use ipnet::Ipv4Net;
use subnet_lease::{Lease, NetConfig, SubnetEnv};

use super::acquire::Leased;
use crate::flags::Flags;
use crate::health::Status;
use crate::nft::{HostRules, Nft, RuleKeeper};

pub(super) fn write_subnet_file(
    path: &Path,
    cfg: &NetConfig,
    lease: &Lease,
    mtu: u32,
    ip_masq: bool,
) -> Result<()> {
    let env = SubnetEnv {
        network: cfg.ipv4_network(),
        subnet: lease.key.ipv4,
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

/// The subnet file for `lease`, with the MTU of the backend running now.
pub(super) fn write_env(
    flags: &Flags,
    cfg: &NetConfig,
    lease: &Lease,
    set: &BackendSet,
) -> Result<()> {
    write_subnet_file(
        &flags.subnet_file,
        cfg,
        lease,
        set.primary().mtu(),
        flags.ip_masq,
    )
}

/// flannel's host rules for our subnet (pure); None for a lease without an IPv4 subnet (the
/// acquire stage only takes one with IPv4 enabled, whose leases all have one).
pub(super) fn host_rules(flags: &Flags, network: Ipv4Net, lease: &Lease) -> Option<HostRules> {
    Some(HostRules {
        network,
        subnet: lease.key.ipv4?,
        forward: flags.iptables_forward_rules,
        ip_masq: flags.ip_masq,
    })
}

/// Runs the stage; returns the keeper of the host rules.
pub(super) async fn program(
    flags: &Flags,
    leased: &mut Leased,
    status: &Status,
) -> Result<RuleKeeper> {
    let mut rules = RuleKeeper::new(Nft::default());
    if let Some(r) = host_rules(flags, leased.network, &leased.lease) {
        rules.set(r);
    }
    leased
        .backend
        .set_lease(&leased.lease)
        .await
        .context("configuring the backend for our lease")?;
    // Peers are not known yet: host rules only, the data plane stays as it is.
    sync(&mut leased.backend, &mut rules, status, false).await;
    write_env(flags, &leased.cfg, &leased.lease, &leased.backend)?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!("sd_notify: {e}");
    }
    Ok(rules)
}

/// Reconciles the backends and the host rules, recording the outcome. Until the first full
/// list of leases is in (`listed`), the backends are left as they are: a reconcile would remove
/// every peer's routes, neighbours and FDB entries that a restarted daemon has not heard of
/// yet (and add them back a list later).
pub(super) async fn sync(
    backend: &mut BackendSet,
    rules: &mut RuleKeeper,
    status: &Status,
    listed: bool,
) {
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

pub(super) async fn reconcile(backend: &mut BackendSet, status: &Status) {
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
