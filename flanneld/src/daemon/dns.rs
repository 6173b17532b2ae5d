//! Stage "cluster DNS" (`--cluster-dns`): the addresses on `lo`, the server bound on them, the
//! `ip flannel-dns` notrack table ([`cluster_dns::notrack`]: a listen address may be the DNS
//! Service's ClusterIP), the settings file pods get their resolv.conf from (`cluster-dns.env`
//! beside the subnet file).
//! The addresses and the file stay across restarts (pods keep asking the same address; the
//! new process answers there); `--cleanup` removes both, and a start without `--cluster-dns`
//! removes the file so new pods are not pointed at a server that is not there.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use backends::netlink::{Family, Netlink};
use cluster_dns::cache::CacheLimits;
use cluster_dns::index::{IndexConfig, PodMode};
use cluster_dns::notrack;
use cluster_dns::run::{DnsOptions, DnsServer};
use cluster_dns::upstream::Upstream;
use etcd_access::Connection;
use ipnet::IpNet;
use subnet_env::dns::ClusterDnsEnv;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::flags::Flags;
use crate::health::Status;
use crate::nft::Nft;
use ::nft::TableKeeper;

/// How long one upstream resolver may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The running server: its stop switch and task.
pub(super) type Running = (watch::Sender<bool>, JoinHandle<()>);

/// `IP` (port 53) or `IP:PORT` / `[IPv6]:PORT`.
fn parse_upstream(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .with_context(|| format!("--cluster-dns-upstream: {s:?} is not IP or IP:PORT"))
}

/// The server's options from the flags.
fn options(flags: &Flags) -> Result<DnsOptions> {
    let pods: PodMode = flags.cluster_dns_pods.parse()?;
    let mut index = IndexConfig::new(&flags.cluster_domain, flags.cluster_dns_ttl, pods)?;
    index.nameservers = flags.cluster_dns_addr.clone();
    let upstream = if flags.cluster_dns_upstream.is_empty() {
        Upstream::from_resolv_conf(
            &flags.cluster_dns_resolv_conf,
            &flags.cluster_dns_addr,
            UPSTREAM_TIMEOUT,
        )?
    } else {
        let servers = flags
            .cluster_dns_upstream
            .iter()
            .map(|s| parse_upstream(s))
            .collect::<Result<Vec<_>>>()?;
        Upstream::new(servers, UPSTREAM_TIMEOUT)
    };
    if upstream.servers().is_empty() {
        tracing::warn!(
            "cluster DNS: no upstream resolver (none in {} apart from our own addresses, no \
             --cluster-dns-upstream): names outside {} get SERVFAIL",
            flags.cluster_dns_resolv_conf.display(),
            flags.cluster_domain
        );
    }
    let listen = flags
        .cluster_dns_addr
        .iter()
        .map(|ip| SocketAddr::new(*ip, flags.cluster_dns_port))
        .collect();
    let mut opts = DnsOptions::new(listen, index, upstream);
    opts.cache = CacheLimits {
        max_bytes: flags.cluster_dns_cache_mb as usize * (1 << 20),
        ..CacheLimits::default()
    };
    Ok(opts)
}

/// Adds each listen address to `lo` (a /32 or /128) unless the node already has it there.
async fn ensure_addresses(nl: &dyn Netlink, addrs: &[IpAddr]) -> Result<()> {
    let lo = nl
        .link_by_name("lo")
        .await
        .context("looking up lo")?
        .context("this namespace has no lo")?;
    let mut have = nl
        .addresses(lo.index, Family::V4)
        .await
        .context("listing lo's addresses")?;
    if addrs.iter().any(IpAddr::is_ipv6) {
        have.extend(
            nl.addresses(lo.index, Family::V6)
                .await
                .context("listing lo's IPv6 addresses")?,
        );
    }
    for ip in addrs {
        let net = IpNet::from(*ip);
        if have.iter().any(|h| h.addr() == *ip) {
            continue;
        }
        nl.add_address(lo.index, net)
            .await
            .with_context(|| format!("adding {net} to lo"))?;
        tracing::info!("cluster DNS: added {net} to lo");
    }
    Ok(())
}

fn settings_path(flags: &Flags) -> std::path::PathBuf {
    subnet_env::dns::path_beside(&flags.subnet_file)
}

/// Starts the cluster DNS when asked for (else removes a settings file an earlier run left).
pub(super) async fn start(
    flags: &Flags,
    conn: &Connection,
    nl: &dyn Netlink,
    status: &Arc<Status>,
) -> Result<Option<Running>> {
    let path = settings_path(flags);
    if !flags.cluster_dns {
        ClusterDnsEnv::remove(&path)?;
        if let Err(e) = Nft::default().apply(&notrack::cleanup()).await {
            tracing::debug!("no cluster DNS table to remove: {e:#}");
        }
        return Ok(None);
    }
    let opts = options(flags)?;
    ensure_addresses(nl, &flags.cluster_dns_addr).await?;
    let server = DnsServer::bind(opts, status.dns.clone())?;
    let mut keeper = TableKeeper::new(Nft::default(), ::nft::Family::Ip, notrack::TABLE);
    keeper.set(Some(notrack::render(
        &flags.cluster_dns_addr,
        flags.cluster_dns_port,
    )));
    keeper
        .ensure()
        .await
        .context("installing the cluster DNS notrack table (ip flannel-dns)")?;
    // IPv6 listen addresses: table ip6 flannel-dns (none: a leftover one is removed).
    let v6 = flags.cluster_dns_addr.iter().any(IpAddr::is_ipv6);
    let mut keeper6 = TableKeeper::new(Nft::default(), ::nft::Family::Ip6, notrack::TABLE);
    keeper6.set(v6.then(|| notrack::render6(&flags.cluster_dns_addr, flags.cluster_dns_port)));
    keeper6
        .ensure()
        .await
        .context("installing the cluster DNS notrack table (ip6 flannel-dns)")?;
    ClusterDnsEnv {
        nameservers: flags.cluster_dns_addr.clone(),
        domain: cluster_dns::index::normalize(&flags.cluster_domain),
        options: vec!["ndots:5".into()],
    }
    .write(&path)?;
    tracing::info!(
        "cluster DNS on {:?}, domain {}, pods get it through {}",
        server.local_addrs(),
        flags.cluster_domain,
        path.display()
    );
    let (stop, stop_rx) = watch::channel(false);
    let conn = conn.clone();
    // The table is checked (and re-installed when removed or changed) as the host rules are.
    let every = Duration::from_secs(flags.iptables_resync.max(1));
    let task = tokio::spawn(async move {
        let repair = async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = keeper.ensure().await {
                    tracing::warn!("cluster DNS: checking table ip {}: {e:#}", notrack::TABLE);
                }
                if let Err(e) = keeper6.ensure().await {
                    tracing::warn!("cluster DNS: checking table ip6 {}: {e:#}", notrack::TABLE);
                }
            }
        };
        tokio::select! {
            _ = server.run(conn, stop_rx) => {}
            _ = repair => {}
        }
    });
    Ok(Some((stop, task)))
}

/// `--cleanup`: the settings file and the listen addresses on `lo` (collects errors).
pub(super) async fn cleanup(flags: &Flags, nl: &dyn Netlink, errors: &mut Vec<String>) {
    if let Err(e) = ClusterDnsEnv::remove(&settings_path(flags)) {
        errors.push(format!("removing the cluster DNS file: {e}"));
    }
    if let Err(e) = Nft::default().apply(&notrack::cleanup()).await {
        errors.push(format!("removing the cluster DNS table: {e:#}"));
    }
    if !flags.cluster_dns {
        return;
    }
    let lo = match nl.link_by_name("lo").await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            errors.push(format!("looking up lo: {e}"));
            return;
        }
    };
    for ip in &flags.cluster_dns_addr {
        let net = IpNet::from(*ip);
        match nl.del_address(lo.index, net).await {
            Ok(()) => tracing::info!("removed {net} from lo"),
            Err(e) => errors.push(format!("removing {net} from lo: {e}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn upstreams_with_and_without_port() {
        assert_eq!(
            parse_upstream("10.0.0.2").unwrap(),
            "10.0.0.2:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("10.0.0.2:5353").unwrap(),
            "10.0.0.2:5353".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[fd00::1]:53").unwrap(),
            "[fd00::1]:53".parse().unwrap()
        );
        assert!(parse_upstream("dns.example")
            .unwrap_err()
            .to_string()
            .contains("--cluster-dns-upstream"));
    }

    #[test]
    fn options_from_flags() {
        let f = Flags::try_parse_from([
            "flanneld",
            "--cluster-dns",
            "--cluster-domain=Corp.Local.",
            "--cluster-dns-upstream=10.0.0.2,10.0.0.3:5353",
            "--cluster-dns-pods=verified",
        ])
        .unwrap();
        let o = options(&f).unwrap();
        assert_eq!(o.index.zone, "corp.local");
        assert_eq!(o.index.pods, PodMode::Verified);
        assert_eq!(o.listen, vec!["169.254.20.10:53".parse().unwrap()]);
        assert_eq!(o.upstream.servers().len(), 2);
        let bad = Flags::try_parse_from(["flanneld", "--cluster-domain=a..b"]).unwrap();
        assert!(options(&bad)
            .unwrap_err()
            .to_string()
            .contains("cluster-domain"));
    }
}
