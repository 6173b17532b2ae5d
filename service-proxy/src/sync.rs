//! Keeping the kernel's table equal to the wanted service ports (nftables mode).
//!
//! [`Syncer`] remembers, per service port, what it last applied; a sync renders only the
//! ports that changed and sends one transaction with their diffs. The first sync, and the
//! first after any failure, rebuilds the whole table instead. UDP conntrack entries that
//! point at removed endpoints (or that were made while a Service had none) are deleted after
//! the transaction, so clients are not stuck on a dead backend.
//!
//! One syncer keeps one family's table ([`Syncer::for_family`]): `ip flannel-proxy` from
//! the IPv4 service ports, `ip6 flannel-proxy` from the IPv6 ones. The IPv6 table's
//! incremental transactions go through `nft -f -` text (the netlink encoder of [`nfnl`]
//! writes IPv4 only).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ::nft::{FakeNft, Family, NfNetlink, NftCommand, Runner};
use registry::{IpFamily, Protocol};

use crate::model::{PortId, ServicePort};
use crate::nfnl;
use crate::nft::{self, Key, Op, ProxyConfig, Ruleset, Tx};

/// How long one `conntrack` run may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Why stale flows could not be deleted (only logged: the table is right either way).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error(transparent)]
    Run(#[from] ::nft::Error),
    #[error("could not run conntrack: {stderr}")]
    Refused { stderr: String },
}

/// Applies the nftables mode's transactions: scripts ([`Runner::apply`]) and the steps of
/// incremental ones, by default as their nft text.
pub trait ApplyOps: Runner {
    /// Applies the steps of an incremental transaction to the IPv4 table atomically.
    fn apply_ops(&self, ops: &[Op]) -> impl Future<Output = Result<(), ::nft::Error>> + Send {
        let script = nft::script(ops);
        async move { self.apply(&script).await }
    }

    /// Applies the steps of an incremental transaction to the table of `family` atomically:
    /// [`ApplyOps::apply_ops`] for IPv4, `nft -f -` text for IPv6.
    fn apply_ops_in(
        &self,
        family: Family,
        ops: &[Op],
    ) -> impl Future<Output = Result<(), ::nft::Error>> + Send {
        let script = (family != Family::Ip).then(|| nft::script_in(family, ops));
        async move {
            match script {
                None => self.apply_ops(ops).await,
                Some(script) => self.apply(&script).await,
            }
        }
    }
}

impl ApplyOps for NftCommand {}

/// For unit tests: the steps are recorded as their nft text.
impl ApplyOps for FakeNft {}

/// `nft -f -` for scripts (the full rebuild) and a netlink batch for incremental
/// transactions, which `nft` 1.0.6 makes slow on big tables (it reads every chain first).
/// Without a socket (it could not be opened) incremental transactions go through `nft` too.
#[derive(Debug, Default)]
pub struct NftNetlink {
    pub command: NftCommand,
    pub netlink: Option<NfNetlink>,
}

impl NftNetlink {
    /// `nft` in this process's namespace and a socket opened by the calling thread.
    pub fn open() -> Result<NftNetlink, ::nft::Error> {
        Ok(NftNetlink {
            command: NftCommand::default(),
            netlink: Some(NfNetlink::open()?),
        })
    }

    /// Whether chain `name` of our IPv4 table exists (a single netlink get; `nft list chain`
    /// would read the whole table first).
    pub async fn chain_exists(&self, name: &str) -> bool {
        self.chain_exists_in(Family::Ip, name).await
    }

    /// Whether chain `name` of our table of `family` exists (netlink for IPv4, `nft` for
    /// IPv6).
    pub async fn chain_exists_in(&self, family: Family, name: &str) -> bool {
        match (&self.netlink, family) {
            (Some(nl), Family::Ip) => nl.chain_exists(nft::TABLE, name).unwrap_or(false),
            _ => self.command.chain_exists(family, nft::TABLE, name).await,
        }
    }
}

impl Runner for NftNetlink {
    async fn apply(&self, script: &str) -> Result<(), ::nft::Error> {
        self.command.apply(script).await
    }

    async fn list_table(
        &self,
        family: ::nft::Family,
        table: &str,
    ) -> Result<Option<String>, ::nft::Error> {
        self.command.list_table(family, table).await
    }
}

impl ApplyOps for NftNetlink {
    async fn apply_ops(&self, ops: &[Op]) -> Result<(), ::nft::Error> {
        match &self.netlink {
            // A few syscalls, answered before `send` returns: no need to leave the task.
            Some(nl) => nfnl::apply(nl, ops),
            None => self.command.apply(&nft::script(ops)).await,
        }
    }
}

/// One UDP conntrack deletion: flows to `orig_dst` (a service address, or any local address
/// when `None` with a node port) that were DNATed to `endpoint` (or to anything when `None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlows {
    pub orig_dst: Option<IpAddr>,
    pub orig_port: u16,
    pub endpoint: Option<IpAddr>,
}

impl StaleFlows {
    /// `conntrack -D` arguments (with `-f ipv6` for IPv6 flows).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["-D".to_string()];
        if self.orig_dst.or(self.endpoint).is_some_and(|a| a.is_ipv6()) {
            a.extend(["-f".into(), "ipv6".into()]);
        }
        a.extend(["-p".into(), "udp".into()]);
        if let Some(d) = self.orig_dst {
            a.extend(["--orig-dst".into(), d.to_string()]);
        }
        a.extend(["--orig-port-dst".into(), self.orig_port.to_string()]);
        if let Some(e) = self.endpoint {
            a.extend(["--dst-nat".into(), e.to_string()]);
        }
        a
    }
}

/// Which UDP flows became stale between `old` and `new` (pure): flows DNATed to an endpoint
/// that is gone, and flows to a service address that had no endpoint (they hold a reject or
/// no NAT at all) now that it has some.
pub fn stale_udp_flows(
    old: &BTreeMap<PortId, ServicePort>,
    new: &BTreeMap<PortId, ServicePort>,
) -> BTreeSet<StaleFlows> {
    let mut out = BTreeSet::new();
    for (id, o) in old {
        if o.protocol != Protocol::Udp {
            continue;
        }
        let n = new.get(id);
        let kept: BTreeSet<IpAddr> = n
            .map(|n| n.endpoints.iter().map(|e| e.ip).collect())
            .unwrap_or_default();
        for ep in &o.endpoints {
            if kept.contains(&ep.ip) {
                continue;
            }
            for dst in std::iter::once(o.cluster_ip).chain(o.external_ips.iter().copied()) {
                out.insert(StaleFlows {
                    orig_dst: Some(dst),
                    orig_port: o.port,
                    endpoint: Some(ep.ip),
                });
            }
            if let Some(np) = o.node_port {
                out.insert(StaleFlows {
                    orig_dst: None,
                    orig_port: np,
                    endpoint: Some(ep.ip),
                });
            }
        }
    }
    for (id, n) in new {
        if n.protocol != Protocol::Udp || n.endpoints.is_empty() {
            continue;
        }
        let had_none = old.get(id).is_none_or(|o| o.endpoints.is_empty());
        if had_none {
            for dst in std::iter::once(n.cluster_ip).chain(n.external_ips.iter().copied()) {
                out.insert(StaleFlows {
                    orig_dst: Some(dst),
                    orig_port: n.port,
                    endpoint: None,
                });
            }
        }
    }
    out
}

/// Deletes conntrack entries. The real one runs `conntrack -D`.
pub trait Conntrack: Send + Sync {
    fn delete(&self, flows: &StaleFlows)
        -> impl Future<Output = Result<(), ConntrackError>> + Send;
}

#[derive(Debug, Clone, Default)]
pub struct ConntrackCommand {
    pub prefix: Vec<String>,
}

impl Conntrack for ConntrackCommand {
    async fn delete(&self, flows: &StaleFlows) -> Result<(), ConntrackError> {
        let mut argv = self.prefix.clone();
        argv.push("conntrack".into());
        argv.extend(flows.args());
        let (ok, stderr) = ::nft::command::run_with_stdin(&argv, "", COMMAND_TIMEOUT).await?;
        // conntrack exits 1 when nothing matched: that is success here.
        if ok || stderr.contains("0 flow entries") {
            Ok(())
        } else {
            Err(ConntrackError::Refused { stderr })
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub full: bool,
    /// Service ports rendered (changed, added or removed).
    pub changed: usize,
    /// Size of the nft script of a full rebuild.
    pub script_bytes: usize,
    /// Steps of an incremental transaction.
    pub ops: usize,
    pub stale_flows: usize,
    pub elapsed: Duration,
    /// Map keys claimed by two service ports (the later one, by id, is left out).
    pub conflicts: Vec<String>,
}

/// The nftables-mode syncer.
#[derive(Debug)]
pub struct Syncer<N, C> {
    nft: N,
    conntrack: C,
    cfg: ProxyConfig,
    /// The family of the table kept; service ports of the other family are ignored.
    family: IpFamily,
    /// What the kernel has, per service port; `None` when unknown (start, after a failure).
    applied: Option<BTreeMap<PortId, (ServicePort, Ruleset)>>,
    /// The UDP service ports as last applied (for conntrack).
    last_ports: BTreeMap<PortId, ServicePort>,
    /// Ports that lost a map key to another port: rendered again every sync, so that they
    /// take the key over when its owner goes.
    contested: BTreeSet<PortId>,
}

impl<N: ApplyOps, C: Conntrack> Syncer<N, C> {
    /// The syncer of the IPv4 table.
    pub fn new(nft: N, conntrack: C, cfg: ProxyConfig) -> Self {
        Self::for_family(IpFamily::Ipv4, nft, conntrack, cfg)
    }

    /// The syncer of the table of `family` (`ip6 flannel-proxy` for IPv6), fed the service
    /// ports of that family (the others passed to [`Syncer::sync`] are ignored).
    pub fn for_family(family: IpFamily, nft: N, conntrack: C, cfg: ProxyConfig) -> Self {
        Syncer {
            nft,
            conntrack,
            cfg,
            family,
            applied: None,
            contested: BTreeSet::new(),
            last_ports: BTreeMap::new(),
        }
    }

    /// What applies the transactions.
    pub fn applier(&self) -> &N {
        &self.nft
    }

    /// The family of the table this syncer keeps.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Forces the next sync to rebuild the whole table.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Makes the kernel serve `ports`.
    ///
    /// Work is proportional to the changed ports plus one comparison per unchanged port (no
    /// copies of what did not change): with 10k Services, adding one costs a few ms here.
    pub async fn sync(
        &mut self,
        ports: &BTreeMap<PortId, ServicePort>,
    ) -> Result<SyncReport, ::nft::Error> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        // On failure `applied` stays None: the next sync rebuilds everything.
        let previous = self.applied.take();
        let full = previous.is_none();
        let mut applied = previous.unwrap_or_default();
        let mut tx = Tx::default();
        // New state of the ports that changed (None: gone), written back after success.
        let mut updates: Vec<(PortId, Option<(ServicePort, Ruleset)>)> = Vec::new();
        // Map keys already claimed, to keep two ports from claiming one (user error, e.g.
        // the same external IP and port in two Services); the port first by id wins.
        let mut owners: BTreeMap<(&'static str, Key), &PortId> = BTreeMap::new();
        let mut contested = BTreeSet::new();
        let empty = Ruleset::default();
        let family = self.family;
        let table = nft::table_family(family);
        for (id, sp) in ports.iter().filter(|(id, _)| id.family == family) {
            let prev = applied.get(id);
            if let Some((prev_sp, prev_rs)) = prev {
                if prev_sp == sp && !self.contested.contains(id) {
                    for key in prev_rs.elements.keys() {
                        owners.insert(key.clone(), id);
                    }
                    continue;
                }
            }
            let mut rs = nft::ruleset([sp], &self.cfg);
            rs.elements.retain(|key, _| match owners.get(key) {
                Some(owner) => {
                    report.conflicts.push(format!(
                        "{} {} is served by {owner}; ignored for {id}",
                        key.0, key.1
                    ));
                    contested.insert(id.clone());
                    false
                }
                None => true,
            });
            for key in rs.elements.keys() {
                owners.insert(key.clone(), id);
            }
            let base = prev.map(|(_, prev_rs)| prev_rs).unwrap_or(&empty);
            if *base != rs || full {
                report.changed += 1;
            }
            tx.diff(base, &rs);
            updates.push((id.clone(), Some((sp.clone(), rs))));
        }
        for (id, (_, rs)) in &applied {
            if ports.get(id).is_none_or(|p| p.id.family != family) {
                report.changed += 1;
                tx.diff(rs, &empty);
                updates.push((id.clone(), None));
            }
        }
        report.full = full;
        if full {
            let mut script = nft::base_in(table);
            script.push_str(&nft::script_in(table, &tx.finish()));
            report.script_bytes = script.len();
            self.nft.apply(&script).await?;
        } else {
            let ops = tx.finish();
            report.ops = ops.len();
            if !ops.is_empty() {
                self.nft.apply_ops_in(table, &ops).await?;
            }
        }
        for (id, state) in updates {
            match state {
                Some(v) => applied.insert(id, v),
                None => applied.remove(&id),
            };
        }
        self.applied = Some(applied);
        self.contested = contested;
        // Only UDP ports of this family matter to conntrack.
        let udp: BTreeMap<PortId, ServicePort> = ports
            .iter()
            .filter(|(id, p)| p.protocol == Protocol::Udp && id.family == family)
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        let stale = stale_udp_flows(&self.last_ports, &udp);
        report.stale_flows = stale.len();
        self.last_ports = udp;
        for flows in &stale {
            if let Err(e) = self.conntrack.delete(flows).await {
                tracing::warn!(error = %e, "could not delete stale UDP conntrack entries");
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    /// The conntrack deletions; the nft calls go to the `nft` crate's fake.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        nft: FakeNft,
        deleted: Arc<Mutex<Vec<StaleFlows>>>,
    }

    impl Recorder {
        /// The last script applied.
        fn last(&self) -> String {
            self.nft.scripts().last().cloned().expect("script")
        }
    }

    impl Conntrack for Recorder {
        async fn delete(&self, flows: &StaleFlows) -> Result<(), ConntrackError> {
            self.deleted.lock().expect("lock").push(flows.clone());
            Ok(())
        }
    }

    fn sp(name: &str, ip: [u8; 4], proto: Protocol, eps: &[[u8; 4]]) -> (PortId, ServicePort) {
        let id = PortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: proto,
            family: IpFamily::Ipv4,
        };
        let eps = eps
            .iter()
            .map(|e| Endpoint {
                ip: Ipv4Addr::from(*e).into(),
                port: 5353,
                local: false,
            })
            .collect();
        (
            id.clone(),
            ServicePort::new(id, Ipv4Addr::from(ip), 53, eps),
        )
    }

    fn syncer(r: &Recorder) -> Syncer<FakeNft, Recorder> {
        Syncer::new(
            r.nft.clone(),
            r.clone(),
            ProxyConfig {
                cluster_cidr: None,
                cluster_cidr6: None,
            },
        )
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn first_sync_is_full_then_only_changes_are_sent() {
        let r = Recorder::default();
        let mut s = syncer(&r);
        let mut ports: BTreeMap<_, _> = [
            sp("a", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]]),
            sp("b", [10, 96, 0, 2], Protocol::Tcp, &[[10, 5, 1, 3]]),
        ]
        .into();
        let rep = run(s.sync(&ports)).expect("sync");
        assert!(rep.full);
        assert_eq!(rep.changed, 2);
        let rep = run(s.sync(&ports)).expect("sync");
        assert!(!rep.full);
        assert_eq!((rep.changed, rep.script_bytes, rep.ops), (0, 0, 0));
        assert_eq!(r.nft.scripts().len(), 1, "nothing sent when unchanged");
        let (id, c) = sp("c", [10, 96, 0, 3], Protocol::Tcp, &[[10, 5, 1, 4]]);
        ports.insert(id, c);
        let rep = run(s.sync(&ports)).expect("sync");
        assert_eq!(rep.changed, 1);
        let last = r.last();
        assert!(
            !last.contains("delete table") && last.contains("10.96.0.3"),
            "{last}"
        );
        assert!(!last.contains("10.96.0.1 "), "{last}");
    }

    #[test]
    fn failure_leads_to_a_full_resync() {
        let r = Recorder::default();
        let mut s = syncer(&r);
        let mut ports: BTreeMap<_, _> =
            [sp("a", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]])].into();
        run(s.sync(&ports)).expect("sync");
        r.nft.fail_next();
        let (id, b) = sp("b", [10, 96, 0, 2], Protocol::Tcp, &[]);
        ports.insert(id, b);
        assert!(run(s.sync(&ports)).is_err());
        let rep = run(s.sync(&ports)).expect("sync");
        assert!(rep.full);
        let last = r.last();
        assert!(last.contains("delete table ip flannel-proxy"));
    }

    #[test]
    fn a_cluster_ip_moving_between_services_is_freed_first() {
        let r = Recorder::default();
        let mut s = syncer(&r);
        let ports: BTreeMap<_, _> =
            [sp("a", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]])].into();
        run(s.sync(&ports)).expect("sync");
        let ports: BTreeMap<_, _> =
            [sp("b", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]])].into();
        run(s.sync(&ports)).expect("sync");
        let last = r.last();
        let del = last.find("delete element").expect("delete");
        let add = last.find("add element").expect("add");
        assert!(del < add, "{last}");
    }

    #[test]
    fn duplicate_keys_are_reported_not_sent_twice() {
        let r = Recorder::default();
        let mut s = syncer(&r);
        let ports: BTreeMap<_, _> = [
            sp("a", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]]),
            sp("b", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 3]]),
        ]
        .into();
        let rep = run(s.sync(&ports)).expect("sync");
        assert_eq!(rep.conflicts.len(), 1, "{:?}", rep.conflicts);
        let last = r.last();
        assert_eq!(
            last.matches("add element ip flannel-proxy service-ips")
                .count(),
            1
        );
        // Again unchanged: still reported (the loser is rendered every sync).
        let rep = run(s.sync(&ports)).expect("sync");
        assert_eq!(rep.conflicts.len(), 1, "{:?}", rep.conflicts);
        // The owner goes: the other port takes the address over in the same transaction.
        let only_b: BTreeMap<_, _> = ports
            .iter()
            .filter(|(id, _)| id.name == "b")
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        let rep = run(s.sync(&only_b)).expect("sync");
        assert!(rep.conflicts.is_empty());
        let last = r.last();
        let del = last.find("delete element ip flannel-proxy service-ips { 10.96.0.1 . tcp . 53 }");
        let add = last
            .find("add element ip flannel-proxy service-ips { 10.96.0.1 . tcp . 53 : goto svc-");
        assert!(
            matches!((del, add), (Some(d), Some(a)) if d < a) && last.contains("default/b/"),
            "{last}"
        );
    }

    #[test]
    fn removed_udp_endpoint_flows_are_deleted() {
        let r = Recorder::default();
        let mut s = syncer(&r);
        let ports: BTreeMap<_, _> = [sp(
            "dns",
            [10, 96, 0, 10],
            Protocol::Udp,
            &[[10, 5, 1, 2], [10, 5, 2, 2]],
        )]
        .into();
        run(s.sync(&ports)).expect("sync");
        // The first sync saw the Service appear with endpoints: flows to it are cleared.
        assert_eq!(
            r.deleted
                .lock()
                .expect("lock")
                .drain(..)
                .collect::<Vec<_>>(),
            vec![StaleFlows {
                orig_dst: Some(Ipv4Addr::new(10, 96, 0, 10).into()),
                orig_port: 53,
                endpoint: None
            }]
        );
        let ports: BTreeMap<_, _> =
            [sp("dns", [10, 96, 0, 10], Protocol::Udp, &[[10, 5, 2, 2]])].into();
        run(s.sync(&ports)).expect("sync");
        let deleted = r.deleted.lock().expect("lock").clone();
        assert_eq!(
            deleted,
            vec![StaleFlows {
                orig_dst: Some(Ipv4Addr::new(10, 96, 0, 10).into()),
                orig_port: 53,
                endpoint: Some(Ipv4Addr::new(10, 5, 1, 2).into())
            }]
        );
        assert_eq!(
            deleted[0].args().join(" "),
            "-D -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --dst-nat 10.5.1.2"
        );
    }

    #[test]
    fn tcp_flows_are_left_alone() {
        let old: BTreeMap<_, _> = [sp("a", [10, 96, 0, 1], Protocol::Tcp, &[[10, 5, 1, 2]])].into();
        assert!(stale_udp_flows(&old, &BTreeMap::new()).is_empty());
    }

    fn sp6(name: &str, ip: &str, proto: Protocol, eps: &[&str]) -> (PortId, ServicePort) {
        let id = PortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: proto,
            family: IpFamily::Ipv6,
        };
        let eps = eps
            .iter()
            .map(|e| Endpoint {
                ip: e.parse().expect("ip"),
                port: 5353,
                local: false,
            })
            .collect();
        let ip: IpAddr = ip.parse().expect("ip");
        (id.clone(), ServicePort::new(id, ip, 53, eps))
    }

    #[test]
    fn each_family_syncs_its_own_table() {
        let r4 = Recorder::default();
        let r6 = Recorder::default();
        let cfg = ProxyConfig {
            cluster_cidr: None,
            cluster_cidr6: None,
        };
        let mut s4 = syncer(&r4);
        let mut s6 = Syncer::for_family(IpFamily::Ipv6, r6.nft.clone(), r6.clone(), cfg);
        let mut ports: BTreeMap<_, _> = [
            sp("a", [10, 96, 0, 1], Protocol::Udp, &[[10, 5, 1, 2]]),
            sp6("a", "fd00:10:96::1", Protocol::Udp, &["fd10:0:0:11::2"]),
        ]
        .into();
        let rep4 = run(s4.sync(&ports)).expect("sync");
        let rep6 = run(s6.sync(&ports)).expect("sync");
        assert_eq!((rep4.changed, rep6.changed), (1, 1));
        let (t4, t6) = (r4.last(), r6.last());
        assert!(!t4.contains("ip6") && !t4.contains("fd00"), "{t4}");
        assert!(t6.starts_with("add table ip6 flannel-proxy\n"), "{t6}");
        assert!(
            !t6.contains(" ip flannel-proxy") && !t6.contains("10.96."),
            "{t6}"
        );
        assert!(
            t6.contains(
                "add element ip6 flannel-proxy service-ips { fd00:10:96::1 . udp . 53 : goto svc-"
            ),
            "{t6}"
        );
        // A change to the IPv6 port is sent to the ip6 table only, as nft text.
        let (id, p) = sp6("a", "fd00:10:96::1", Protocol::Udp, &[]);
        ports.insert(id, p);
        let rep4 = run(s4.sync(&ports)).expect("sync");
        let rep6 = run(s6.sync(&ports)).expect("sync");
        assert_eq!((rep4.ops, rep4.changed), (0, 0));
        assert!(!rep6.full && rep6.changed == 1);
        assert_eq!(r4.nft.scripts().len(), 1);
        let t6 = r6.last();
        assert!(
            t6.contains("add element ip6 flannel-proxy no-endpoint-services { fd00:10:96::1 . udp . 53 : goto reject-chain }"),
            "{t6}"
        );
        // The removed IPv6 endpoint's UDP flows are deleted with `-f ipv6`.
        let deleted = r6.deleted.lock().expect("lock").clone();
        assert_eq!(
            deleted.last().expect("deleted").args().join(" "),
            "-D -f ipv6 -p udp --orig-dst fd00:10:96::1 --orig-port-dst 53 --dst-nat fd10:0:0:11::2"
        );
        assert!(r4
            .deleted
            .lock()
            .expect("lock")
            .iter()
            .all(|f| !f.args().contains(&"ipv6".to_string())));
        // The IPv6 port goes: its chains go from the ip6 table; the IPv4 table is untouched.
        ports.retain(|id, _| id.family == IpFamily::Ipv4);
        run(s4.sync(&ports)).expect("sync");
        let rep6 = run(s6.sync(&ports)).expect("sync");
        assert_eq!(rep6.changed, 1);
        assert!(r6
            .last()
            .contains("delete element ip6 flannel-proxy no-endpoint-services"));
        assert_eq!(r4.nft.scripts().len(), 1);
    }
}
