//! Stage "follow": until SIGTERM/SIGINT, peer events (applied in batches, one reconcile per
//! batch; the first full list lets the data plane be reconciled at all), periodic repair, and
//! config changes (a new `Backend` switches live; anything else is refused and counted).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use backends::set::BackendSet;
use backends::ExternalInterface;
use subnet_lease::manager::Event;
use subnet_lease::LeaseStore;
use subnet_lease::{config, BackendConfig, Backoff, Lease, NetConfig, Republish};
use tokio::sync::mpsc;

use super::acquire::{published, Leased};
use super::program::{host_rules, sync, write_env};
use super::serve::Services;
use super::{describe, Shutdown};
use crate::flags::Flags;
use crate::health::Status;
use crate::nft::RuleKeeper;

/// Runs the stage until a shutdown signal; then stops the services and the lease manager
/// (bounded). The lease, devices, routes and rules stay for the restart.
pub(super) async fn follow(
    flags: &Flags,
    ext: &ExternalInterface,
    leased: Leased,
    mut rules: RuleKeeper,
    mut services: Services,
    status: &Status,
    shutdown: &mut Shutdown,
) -> Result<()> {
    let Leased {
        cfg,
        ext: _,
        mut backend,
        manager,
        lease,
    } = leased;
    let (tx, mut events) = mpsc::channel(256);
    let (control, control_rx) = mpsc::channel(4);
    let mut requested = cfg.backend.clone();
    let mut refused = None;
    let mut own = lease.clone();
    // Peers are not known until the manager's first full list (Event::PeersListed).
    let mut listed = false;
    let run = tokio::spawn(manager.run_with_control(lease, tx, control_rx));
    let mut resync = tokio::time::interval(Duration::from_secs(flags.iptables_resync));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            ev = events.recv() => ev,
            _ = resync.tick() => {
                sync(&mut backend, &mut rules, status, listed).await;
                continue;
            }
            // A backend switch needs every peer: only once they are listed.
            text = services.config_changes.recv(), if listed => {
                if let Some(text) = text {
                    if let Some(l) = apply_config(&text, &cfg, &mut requested, &mut backend, &control, status, ext, &mut refused, crate::families::Parts::of(flags)).await {
                        own = l;
                        write_env(flags, &cfg, &own, &backend)?;
                        sync(&mut backend, &mut rules, status, listed).await;
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
                    let (v4, v6) = host_rules(flags, &cfg, l);
                    rules.set(v4, v6);
                    write_env(flags, &cfg, l, &backend)?;
                    let _ = services.subnet.send(l.key);
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
        if listed && backend.wants_secondary() {
            offer_newest_config(&services.registry, &mut backend).await;
        }
        sync(&mut backend, &mut rules, status, listed).await;
    }
    tracing::debug!("stopping with lease {}", describe(&own));
    services.stop().await;
    drop(events);
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    Ok(())
}

/// Before a secondary backend starts (peers advertise a type not running here), the network
/// config as etcd has it now: peers switch because of a new config, which this node's own
/// config watch may not have delivered yet, and a secondary of that type should run with its
/// options (a wireguard `PSK`: without it, handshakes with the switched nodes fail until this
/// node switches too). Bounded (2 s); on any failure the secondary gets the defaults.
async fn offer_newest_config(reg: &subnet_lease::EtcdLeaseStore, set: &mut BackendSet) {
    match tokio::time::timeout(Duration::from_secs(2), reg.get_config()).await {
        Ok(Ok(Some(text))) => match config::parse(&text) {
            Ok(p) => set.offer(&p.config.backend),
            Err(e) => tracing::debug!("network config not offered to secondaries: {e}"),
        },
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::debug!("reading the network config for a secondary: {e}"),
        Err(_) => tracing::debug!("reading the network config for a secondary: timed out"),
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
    diff(
        "IPv6ServiceNetwork",
        opt(&running.ipv6_service_network),
        opt(&new.ipv6_service_network),
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
    parts: crate::families::Parts,
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
    if let Err(e) = crate::families::check(&parsed, parts) {
        refuse(
            "family_unsupported",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> NetConfig {
        match config::parse(text) {
            Ok(p) => p.config,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn only_backend_may_change_while_running() {
        let running = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let switch = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert!(changed_settings(&running, &switch).is_empty());
        let moved = cfg(r#"{"Network":"10.6.0.0/16","SubnetLen":25,"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(
            changed_settings(&running, &moved),
            vec![
                "Network 10.5.0.0/16 -> 10.6.0.0/16",
                "SubnetLen 24 -> 25",
                // Their defaults follow Network and SubnetLen.
                "SubnetMin 10.5.1.0 -> 10.6.0.128",
                "SubnetMax 10.5.255.0 -> 10.6.255.128"
            ]
        );
    }
}
