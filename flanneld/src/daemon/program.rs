//! Stage "program": with our lease, the host rules, the backend's own lease, the subnet file
//! for the CNI plugin, then READY=1. Peers are not known yet, so the data plane is left as it
//! is (a restart must not remove routes before the peers are listed). Also the reconcile
//! steps every later stage repeats.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use backends::set::BackendSet;
use subnet_lease::{Lease, NetConfig, SubnetEnv};

use super::acquire::Leased;
use crate::flags::Flags;
use crate::health::Status;
use crate::nft::{HostRules, HostRules6, Nft, RuleKeeper};

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

/// flannel's host rules for our subnets, per family (pure): IPv4 with an IPv4 Network and
/// subnet, IPv6 with an IPv6Network and subnet (`--ip6-masq`, by default `--ip-masq`).
pub(super) fn host_rules(
    flags: &Flags,
    cfg: &NetConfig,
    lease: &Lease,
) -> (Option<HostRules>, Option<HostRules6>) {
    let v4 = match (cfg.ipv4_network(), lease.key.ipv4) {
        (Some(network), Some(subnet)) => Some(HostRules {
            network,
            subnet,
            forward: flags.iptables_forward_rules,
            ip_masq: flags.ip_masq,
        }),
        _ => None,
    };
    let v6 = match (cfg.ipv6_network(), lease.key.ipv6) {
        (Some(network), Some(subnet)) => Some(HostRules6 {
            network,
            subnet,
            forward: flags.iptables_forward_rules,
            ip6_masq: flags.ip6_masq(),
        }),
        _ => None,
    };
    (v4, v6)
}

/// Runs the stage; returns the keeper of the host rules.
pub(super) async fn program(
    flags: &Flags,
    leased: &mut Leased,
    status: &Status,
) -> Result<RuleKeeper> {
    let mut rules = RuleKeeper::new(Nft::default());
    let (v4, v6) = host_rules(flags, &leased.cfg, &leased.lease);
    rules.set(v4, v6);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use subnet_lease::{LeaseAttrs, SubnetKey};

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["flanneld"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).unwrap()
    }

    fn lease(key: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: LeaseAttrs::new("192.168.1.2".parse().unwrap(), "vxlan"),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn cfg(text: &str) -> NetConfig {
        subnet_lease::config::parse(text).unwrap().config
    }

    #[test]
    fn host_rules_per_family_with_ip6_masq_following_ip_masq() {
        let dual = cfg(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48"}"#);
        let l = lease("10.5.3.0-24&fd10:0:0:3::-64");
        let (v4, v6) = host_rules(&flags(&["--ip-masq"]), &dual, &l);
        let (v4, v6) = (v4.unwrap(), v6.unwrap());
        assert_eq!(v4.subnet, "10.5.3.0/24".parse().unwrap());
        assert!(
            v4.ip_masq && v6.ip6_masq,
            "--ip6-masq defaults to --ip-masq"
        );
        assert_eq!(v6.network, "fd10::/48".parse().unwrap());
        assert_eq!(v6.subnet, "fd10:0:0:3::/64".parse().unwrap());
        let (_, v6) = host_rules(&flags(&["--ip-masq", "--ip6-masq=false"]), &dual, &l);
        assert!(!v6.unwrap().ip6_masq);
        // IPv4 only: no IPv6 rules; IPv6 only: no IPv4 rules.
        let v4only = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let (a, b) = host_rules(&flags(&[]), &v4only, &lease("10.5.3.0-24"));
        assert!(a.is_some() && b.is_none());
        let v6only = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48"}"#);
        let (a, b) = host_rules(&flags(&[]), &v6only, &lease("0.0.0.0-0&fd10:0:0:3::-64"));
        assert!(a.is_none() && b.is_some());
    }
}
