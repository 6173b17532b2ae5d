//! The module's loop: it follows the registry (namespaces, pods, policies) and the pod
//! records in etcd ([`registry::follow`]) and after each burst of changes compiles this
//! node's two tables (`ip` and `ip6 flannel-policy`) and applies, per table, the difference
//! from what the kernel has in one transaction: a netlink batch (through `nft -f -` when no
//! socket could be opened), the whole table through `nft -f -` after a start or a failure.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_access::Connection;
use nft::{NfNetlink, NftCommand, Runner};
use prometheus_client::metrics::counter::Counter;
use registry::follow::{follow, FollowOptions, Follower};
use registry::follow::{KeyReader, Update};
use registry::gate::{Client, Gate};
use registry::PodRecord;
use registry::{ClusterNetworkPolicy, Kind, Labels, NetworkPolicy, Object, Pod, Protocol, Tier};
use tokio::sync::watch;

use crate::compile::{self, Family, Input, Ruleset};
use crate::enforce::{Enforcer, SyncReport};
use crate::eval::{self, NamedPort, Peer, PodView};
use crate::metrics::PolicyMetrics;

#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// This node's name (`--node-name`): the pods whose records carry it are enforced here.
    pub node: String,
    /// How long to wait for more changes after one arrives before syncing.
    pub debounce: Duration,
    /// How often to check that the table is still there (and rebuild it when not).
    pub check_interval: Duration,
    /// `nft` behind an optional command prefix (it writes whole tables, and differences
    /// when there is no netlink socket).
    pub nft: NftCommand,
    /// Send differences as netlink batches through a socket opened in this process's
    /// network namespace (default). Turn off when `nft` writes to another namespace (a
    /// prefix such as `ip netns exec`).
    pub netlink: bool,
    /// Kept current for the userspace service proxy's relays (`--proxy-mode userspace`).
    pub gate: Option<PolicyGate>,
    /// Keep the `ip6` table too (default). Without it (a cluster without IPv6, where no
    /// pod gets an IPv6 address) a leftover `ip6` table is removed at start and none is
    /// written, so the node's other IPv6 forwarding is left alone.
    pub ipv6: bool,
}

impl PolicyOptions {
    pub fn new(node: &str) -> PolicyOptions {
        PolicyOptions {
            node: node.to_string(),
            debounce: Duration::from_millis(5),
            check_interval: Duration::from_secs(10),
            nft: NftCommand::default(),
            netlink: true,
            gate: None,
            ipv6: true,
        }
    }
}

/// The policy decision for the userspace service proxy's relays, over both families. The
/// proxy opens every upstream connection from the node, which the forward hook never sees
/// (same node) or sees coming from the node (other nodes), so the module judges each relay
/// instead: the client (the redirected connection's source) against the endpoint, source
/// egress and destination ingress, with the semantics of [`crate::eval`] on the module's
/// current objects, in the family of the endpoint (pods take part with their addresses of
/// that family, ipBlocks of the other family match nothing), exactly as the `ip` and `ip6`
/// tables judge forwarded traffic. Until the first sync every relay is refused (fail closed).
#[derive(Debug, Clone, Default)]
pub struct PolicyGate {
    view: Arc<RwLock<Option<Arc<GateView>>>>,
}

#[derive(Debug)]
struct GateView {
    node: String,
    cluster: eval::Cluster,
    /// Every address of every pod (both families) -> the pod.
    pods: HashMap<IpAddr, Arc<PodView>>,
}

impl PolicyGate {
    /// Replaces the objects decisions are made on.
    pub fn update(&self, cache: &Cache, node: &str) {
        let mut pods = HashMap::new();
        for p in cache.pod_views() {
            let p = Arc::new(p);
            for a in &p.ips {
                pods.insert(*a, p.clone());
            }
        }
        let view = GateView {
            node: node.to_string(),
            cluster: eval::Cluster {
                namespaces: cache.namespaces.clone(),
                policies: cache.policies.values().cloned().collect(),
                cluster_policies: cache.cluster_policies.values().cloned().collect(),
            },
            pods,
        };
        if let Ok(mut v) = self.view.write() {
            *v = Some(Arc::new(view));
        }
    }
}

impl Gate for PolicyGate {
    fn allows(&self, client: Client, endpoint: SocketAddr, protocol: Protocol) -> bool {
        let Some(v) = self.view.read().ok().and_then(|v| v.clone()) else {
            return false;
        };
        // A listener relays to endpoints of its own family only.
        if client.addr.is_ipv6() != endpoint.is_ipv6() {
            return false;
        }
        let family = eval::family_of(endpoint.ip());
        let src = if client.local {
            Peer::Host {
                addr: client.addr,
                node: Some(&v.node),
            }
        } else {
            match v.pods.get(&client.addr) {
                Some(p) => Peer::Pod(p),
                None => Peer::Host {
                    addr: client.addr,
                    node: None,
                },
            }
        };
        let dst = match v.pods.get(&endpoint.ip()) {
            Some(p) => Peer::Pod(p),
            None => Peer::Host {
                addr: endpoint.ip(),
                node: None,
            },
        };
        v.cluster
            .allows(family, src, dst, protocol, endpoint.port())
    }
}

type Key = (String, String);

/// The module's copy of the etcd data it uses, updated key by key (pure).
#[derive(Debug, Clone)]
pub struct Cache {
    reader: KeyReader,
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<Key, Pod>,
    /// Pod records with the etcd revision they were written at.
    pub records: BTreeMap<Key, (PodRecord, i64)>,
    pub policies: BTreeMap<Key, NetworkPolicy>,
    /// ClusterNetworkPolicies by name.
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Objects ignored because they do not decode or are not valid
    /// (`flannel_policy_invalid_objects_total` once shared with [`PolicyMetrics`]).
    pub invalid_objects: Counter,
}

impl Cache {
    pub fn new(prefix: &str) -> Cache {
        Cache {
            reader: KeyReader::new(
                prefix,
                "network policy",
                &[
                    Kind::Namespace,
                    Kind::Pod,
                    Kind::NetworkPolicy,
                    Kind::ClusterNetworkPolicy,
                ],
                true,
            ),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            records: BTreeMap::new(),
            policies: BTreeMap::new(),
            cluster_policies: BTreeMap::new(),
            invalid_objects: Counter::default(),
        }
    }

    pub fn clear(&mut self) {
        self.namespaces.clear();
        self.pods.clear();
        self.records.clear();
        self.policies.clear();
        self.cluster_policies.clear();
    }

    /// Applies one key's new value (`None`: deleted). Returns whether anything the module
    /// uses changed. Values that do not decode are logged and treated as absent.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        let u = self.reader.read(key, value, mod_revision);
        if u.rejected() {
            self.invalid_objects.inc();
        }
        match u {
            Update::Object {
                kind,
                key: k,
                object,
                ..
            } => match (kind, object) {
                (_, Some(Object::Namespace(o))) => {
                    self.namespaces.insert(k.1, o.metadata.labels);
                    true
                }
                (_, Some(Object::Pod(o))) => {
                    self.pods.insert(k, o);
                    true
                }
                (_, Some(Object::NetworkPolicy(o))) => {
                    self.policies.insert(k, o);
                    true
                }
                (_, Some(Object::ClusterNetworkPolicy(o))) => {
                    self.cluster_policies.insert(k.1, o);
                    true
                }
                (Kind::Namespace, _) => self.namespaces.remove(&k.1).is_some(),
                (Kind::Pod, _) => self.pods.remove(&k).is_some(),
                (Kind::NetworkPolicy, _) => self.policies.remove(&k).is_some(),
                (Kind::ClusterNetworkPolicy, _) => self.cluster_policies.remove(&k.1).is_some(),
                _ => false,
            },
            Update::Record { key: k, record, .. } => match record {
                Some(r) => {
                    self.records.insert(k, (r, mod_revision));
                    true
                }
                None => self.records.remove(&k).is_some(),
            },
            Update::Ignored => false,
        }
    }

    /// Every pod with an address: its record (addresses, node) with the labels and named
    /// container ports of its registry object (none while the object is missing). A record's
    /// addresses are its IPv4 `IP` and the IPv6 ones of its `IPs`. When several records claim
    /// an address (a pod replaced while the old record lives on), the newest wins it.
    pub fn pod_views(&self) -> Vec<PodView> {
        let mut newest: BTreeMap<IpAddr, (&Key, i64)> = BTreeMap::new();
        for (k, (rec, rev)) in &self.records {
            for a in rec.addrs() {
                match newest.get(&a) {
                    Some((_, r)) if *r >= *rev => {}
                    _ => {
                        newest.insert(a, (k, *rev));
                    }
                }
            }
        }
        let mut views: Vec<PodView> = self
            .records
            .iter()
            .filter_map(|(k, (rec, _))| {
                let ips: Vec<IpAddr> = rec
                    .addrs()
                    .into_iter()
                    .filter(|a| newest.get(a).is_some_and(|(w, _)| *w == k))
                    .collect();
                if ips.is_empty() {
                    return None;
                }
                let obj = self.pods.get(k);
                Some(PodView {
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                    labels: obj.map(|p| p.metadata.labels.clone()).unwrap_or_default(),
                    ips,
                    node: rec.node.clone(),
                    ports: obj.map(named_ports).unwrap_or_default(),
                })
            })
            .collect();
        views.sort_by_key(|p| p.ips.first().copied());
        views
    }

    /// This node's IPv4 table for the cached objects.
    pub fn compile(&self, node: &str) -> Ruleset {
        self.compile_family(node, Family::Ip)
    }

    /// This node's table of `family` for the cached objects.
    pub fn compile_family(&self, node: &str, family: Family) -> Ruleset {
        let pods = self.pod_views();
        self.compile_with(&pods, node, family)
    }

    fn compile_with(&self, pods: &[PodView], node: &str, family: Family) -> Ruleset {
        let policies: Vec<&NetworkPolicy> = self.policies.values().collect();
        let cluster_policies: Vec<&ClusterNetworkPolicy> = self.cluster_policies.values().collect();
        compile::compile_family(
            Input {
                namespaces: &self.namespaces,
                policies: &policies,
                cluster_policies: &cluster_policies,
                pods,
                node,
            },
            family,
        )
    }
}

/// Per tier: the valid ClusterNetworkPolicies and the pods of `node` one of them selects.
fn tier_counts<'a>(cache: &Cache, pods: &[PodView], node: &str) -> [(&'a str, usize, usize); 2] {
    let cluster = eval::Cluster {
        namespaces: cache.namespaces.clone(),
        ..eval::Cluster::default()
    };
    [Tier::Admin, Tier::Baseline].map(|tier| {
        let ps: Vec<&ClusterNetworkPolicy> =
            eval::tier_order(cache.cluster_policies.values(), tier);
        let selected = pods
            .iter()
            .filter(|p| p.node == node && ps.iter().any(|c| cluster.subject_selects(c, p)))
            .count();
        (tier.as_str(), ps.len(), selected)
    })
}

/// Whether a pod of `node` has an IPv6 address.
fn has_ipv6_pods(pods: &[PodView], node: &str) -> bool {
    pods.iter()
        .any(|p| p.node == node && p.addr(Family::Ip6).is_some())
}

/// The pods of `node` isolated for ingress and for egress in either table (a dual-stack pod
/// counts once).
fn isolated_pods(pods: &[PodView], node: &str, tables: &[&Ruleset]) -> (usize, usize) {
    let count = |map: fn(&Ruleset) -> &BTreeMap<IpAddr, String>| {
        pods.iter()
            .filter(|p| {
                p.node == node
                    && p.ips
                        .iter()
                        .any(|a| tables.iter().any(|t| map(t).contains_key(a)))
            })
            .count()
    };
    (count(|t| &t.ingress), count(|t| &t.egress))
}

fn named_ports(p: &Pod) -> Vec<NamedPort> {
    p.spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter_map(|cp| {
            Some(NamedPort {
                name: cp.name.clone()?,
                port: u16::try_from(cp.container_port).ok()?,
                protocol: cp.protocol,
            })
        })
        .collect()
}

/// The switch that makes bridged IPv4 traffic cross the IPv4 hooks.
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The switch that makes bridged IPv6 traffic cross the IPv6 hooks.
pub const BRIDGE_NF_CALL_IP6TABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-ip6tables";

/// Same-node pod-to-pod traffic is bridged on cni0; the forward hook sees it only with
/// br_netfilter's `bridge-nf-call-iptables` on (in this network namespace). Turns it on;
/// returns why it is not on when it cannot (the node is then reported not ready).
pub fn ensure_bridge_netfilter() -> Option<String> {
    if std::fs::metadata(BRIDGE_NF_CALL_IPTABLES).is_err() {
        // Built as a module and not loaded yet: load it (bounded: modprobe may hang on a
        // broken module tree).
        if let Ok(mut child) = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    bridge_netfilter_at(std::path::Path::new(BRIDGE_NF_CALL_IPTABLES))
}

/// [`ensure_bridge_netfilter`], and with `ipv6` (this node has pods with IPv6 addresses) the
/// same for `bridge-nf-call-ip6tables`; the reasons joined when both fail.
pub fn ensure_bridge_netfilter_families(ipv6: bool) -> Option<String> {
    let v4 = ensure_bridge_netfilter();
    let v6 = ipv6
        .then(|| bridge_netfilter_at(std::path::Path::new(BRIDGE_NF_CALL_IP6TABLES)))
        .flatten();
    match (v4, v6) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// [`ensure_bridge_netfilter`] on the switch at `path`, without loading anything.
pub fn bridge_netfilter_at(path: &std::path::Path) -> Option<String> {
    let p = path.display();
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => None,
        Ok(_) => std::fs::write(path, "1")
            .err()
            .map(|e| format!("cannot turn on {p}: {e}; same-node pod traffic is not filtered")),
        Err(e) => Some(format!(
            "{p}: {e} (no br_netfilter); same-node pod traffic is not filtered"
        )),
    }
}

/// Runs the br_netfilter check (again: someone may load the module or fix the sysctl later)
/// and records it; logs when the answer changes.
async fn check_bridge_netfilter(metrics: &PolicyMetrics, ipv6: bool) {
    let problem = tokio::task::spawn_blocking(move || ensure_bridge_netfilter_families(ipv6))
        .await
        .unwrap_or_else(|e| Some(format!("br_netfilter check: {e}")));
    let before = metrics.not_ready_reason();
    if problem != before {
        match &problem {
            Some(w) => tracing::warn!("{w}; this node reports not ready"),
            None => tracing::info!("br_netfilter on: same-node pod traffic is filtered"),
        }
    }
    metrics.set_bridge_netfilter(problem);
}

/// The module as a registry follower.
struct Policy<N> {
    node: String,
    gate: Option<PolicyGate>,
    cache: Cache,
    /// The `ip` table.
    enforcer: Enforcer<N>,
    /// The `ip6` table (None: not kept, [`PolicyOptions::ipv6`]).
    enforcer6: Option<Enforcer<N>>,
    /// Whether this node had pods with IPv6 addresses at the last sync (then readiness
    /// needs `bridge-nf-call-ip6tables` too).
    ipv6_pods: bool,
    metrics: PolicyMetrics,
}

impl<N: Runner> Follower for Policy<N> {
    type Error = nft::Error;

    fn clear(&mut self) {
        self.cache.clear();
    }

    fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        self.cache.apply(key, value, mod_revision)
    }

    async fn sync(&mut self) -> Result<(), nft::Error> {
        if let Some(g) = &self.gate {
            g.update(&self.cache, &self.node);
        }
        let pods = self.cache.pod_views();
        let rs = self.cache.compile_with(&pods, &self.node, Family::Ip);
        let rs6 = self
            .enforcer6
            .is_some()
            .then(|| self.cache.compile_with(&pods, &self.node, Family::Ip6));
        let tables: Vec<&Ruleset> = [Some(&rs), rs6.as_ref()].into_iter().flatten().collect();
        let (ingress, egress) = isolated_pods(&pods, &self.node, &tables);
        let ipv6_pods = has_ipv6_pods(&pods, &self.node);
        if ipv6_pods && !self.ipv6_pods {
            // Same-node IPv6 traffic is filtered only with bridge-nf-call-ip6tables on.
            check_bridge_netfilter(&self.metrics, true).await;
        }
        self.ipv6_pods = ipv6_pods;
        // Both tables even when one fails (the failed one is rewritten whole next time).
        let r4 = self.enforcer.sync(rs).await;
        let r6 = match (&mut self.enforcer6, rs6) {
            (Some(e), Some(rs6)) => e.sync(rs6).await,
            _ => Ok(SyncReport {
                full: false,
                changed: false,
                netlink: false,
                elapsed: std::time::Duration::ZERO,
            }),
        };
        match (r4, r6) {
            (Ok(a), Ok(b)) => {
                let rep = SyncReport {
                    full: a.full || b.full,
                    changed: a.changed || b.changed,
                    netlink: a.netlink || b.netlink,
                    elapsed: a.elapsed + b.elapsed,
                };
                self.metrics.observe(&rep, ingress, egress);
                self.metrics
                    .observe_tiers(&tier_counts(&self.cache, &pods, &self.node));
                tracing::debug!(?rep, ingress, egress, "network policy sync");
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => {
                self.metrics.sync_errors.inc();
                Err(e)
            }
        }
    }

    async fn check(&mut self) -> bool {
        check_bridge_netfilter(&self.metrics, self.ipv6_pods).await;
        let present = self.enforcer.table_present().await;
        if !present {
            self.enforcer.invalidate();
        }
        let mut present6 = true;
        if let Some(e) = &mut self.enforcer6 {
            present6 = e.table_present().await;
            if !present6 {
                e.invalidate();
            }
        }
        present && present6
    }
}

/// Enforces NetworkPolicy for this node's pods until `stop` turns true, in both tables
/// (`ip` and `ip6 flannel-policy`). The tables stay when it stops (pods stay isolated while
/// flanneld restarts; the next start rewrites them).
pub async fn run(
    conn: Connection,
    opts: PolicyOptions,
    metrics: PolicyMetrics,
    mut stop: watch::Receiver<bool>,
) {
    metrics.enabled.set(1);
    check_bridge_netfilter(&metrics, false).await;
    let follow_opts = FollowOptions {
        name: "network policy",
        debounce: opts.debounce,
        check_interval: opts.check_interval,
    };
    let mut cache = Cache::new(conn.prefix());
    cache.invalid_objects = metrics.invalid_objects.clone();
    if !opts.ipv6 {
        if let Err(e) = opts.nft.apply(&compile::cleanup_table(Family::Ip6)).await {
            tracing::warn!("network policy: removing a leftover ip6 table: {e}");
        }
    }
    let with_netlink = |e: Enforcer<NftCommand>| {
        if !opts.netlink {
            return e;
        }
        match NfNetlink::open() {
            Ok(nl) => e.with_netlink(Arc::new(nl)),
            Err(err) => {
                tracing::warn!("network policy: {err}; differences go through nft");
                e
            }
        }
    };
    let mut policy = Policy {
        cache,
        enforcer: with_netlink(Enforcer::new(opts.nft.clone())),
        enforcer6: opts
            .ipv6
            .then(|| with_netlink(Enforcer::for_family(opts.nft.clone(), Family::Ip6))),
        ipv6_pods: false,
        gate: opts.gate,
        node: opts.node,
        metrics,
    };
    follow(&conn, &follow_opts, &mut policy, &mut stop).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use registry::pods::pods_prefix;
    use std::net::Ipv4Addr;

    const PREFIX: &str = "/coreos.com/network";

    fn put(cache: &mut Cache, yaml: &str, rev: i64) -> bool {
        let obj = registry::parse_documents(yaml).unwrap().remove(0);
        let obj = registry::store::normalize(obj, None).unwrap();
        let m = obj.metadata();
        let key = registry::store::object_key(PREFIX, obj.kind(), m.namespace.as_deref(), &m.name);
        let value = registry::to_json(&obj).to_string();
        cache.apply(&key, Some(value.as_bytes()), rev)
    }

    fn record(cache: &mut Cache, name: &str, ip: &str, rev: i64) {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        let rec = serde_json::json!({
            "IP": ip, "IPs": [ip], "Node": "n1", "NodeIP": "192.0.2.1",
            "Subnet": "10.5.1.0/24", "ContainerID": name, "Ifname": "eth0"
        });
        let key = format!("{}{}/{name}", pods_prefix(PREFIX), "x");
        assert!(cache.apply(&key, Some(rec.to_string().as_bytes()), rev));
    }

    #[test]
    fn objects_and_records_become_pods_and_a_table() {
        let mut c = Cache::new(PREFIX);
        assert!(put(
            &mut c,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: web}}\nspec:\n  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]\n",
            2
        ));
        record(&mut c, "a", "10.5.1.2", 3);
        // A stale record for the same address, older: the newest wins.
        record(&mut c, "old", "10.5.1.2", 1);
        let pods = c.pod_views();
        assert_eq!(pods.len(), 1);
        assert_eq!((pods[0].name.as_str(), pods[0].ports.len()), ("a", 1));
        assert!(put(
            &mut c,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
            4
        ));
        assert_eq!(c.compile("n1").ingress.len(), 1);
        assert!(c.compile("n2").ingress.is_empty());
    }

    fn record_ips(cache: &mut Cache, name: &str, node: &str, ips: &[&str], rev: i64) {
        let ips: Vec<IpAddr> = ips.iter().map(|a| a.parse().unwrap()).collect();
        let rec = registry::PodRecord::new(
            &ips,
            node,
            Ipv4Addr::new(192, 0, 2, 1),
            "10.5.1.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
            name,
            "eth0",
        )
        .unwrap();
        let key = format!("{}{}/{name}", pods_prefix(PREFIX), "x");
        assert!(cache.apply(&key, Some(rec.to_json().as_bytes()), rev));
    }

    #[test]
    fn dual_stack_records_give_both_tables() {
        let mut c = Cache::new(PREFIX);
        record_ips(&mut c, "a", "n1", &["10.5.1.2", "fd10::2"], 3);
        record_ips(&mut c, "b", "n1", &["10.5.1.3"], 3);
        // An older record claiming a's IPv6 address loses it, keeps its own IPv4 one.
        record_ips(&mut c, "old", "n2", &["10.5.2.9", "fd10::2"], 1);
        // A newer one takes b's IPv4 address: b is left without addresses, so no view.
        record_ips(&mut c, "new", "n2", &["10.5.1.3", "fd10::3"], 4);
        let views: Vec<(String, Vec<String>)> = c
            .pod_views()
            .into_iter()
            .map(|p| (p.name, p.ips.iter().map(|a| a.to_string()).collect()))
            .collect();
        assert_eq!(
            views,
            [
                (
                    "a".to_string(),
                    vec!["10.5.1.2".to_string(), "fd10::2".to_string()]
                ),
                (
                    "new".to_string(),
                    vec!["10.5.1.3".to_string(), "fd10::3".to_string()]
                ),
                ("old".to_string(), vec!["10.5.2.9".to_string()]),
            ]
        );
        let pods = c.pod_views();
        assert!(has_ipv6_pods(&pods, "n1") && has_ipv6_pods(&pods, "n2"));
        assert!(!has_ipv6_pods(&pods, "n3"));
        assert!(put(
            &mut c,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
            5
        ));
        let (rs, rs6) = (
            c.compile_family("n1", Family::Ip),
            c.compile_family("n1", Family::Ip6),
        );
        assert_eq!(rs, c.compile("n1"));
        assert_eq!(rs.ingress.len(), 1);
        assert_eq!(
            rs6.ingress.keys().collect::<Vec<_>>(),
            [&"fd10::2".parse::<IpAddr>().unwrap()]
        );
        // One dual-stack pod isolated in both tables counts once.
        assert_eq!(isolated_pods(&pods, "n1", &[&rs, &rs6]), (1, 0));
        let (rs2, rs26) = (
            c.compile_family("n2", Family::Ip),
            c.compile_family("n2", Family::Ip6),
        );
        assert_eq!(isolated_pods(&pods, "n2", &[&rs2, &rs26]), (2, 0));
    }

    #[test]
    fn cluster_network_policies_are_followed_and_compiled() {
        let mut c = Cache::new(PREFIX);
        assert!(put(
            &mut c,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c}]}\n",
            2
        ));
        record(&mut c, "a", "10.5.1.2", 3);
        let cnp = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: deny}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n";
        assert!(put(&mut c, cnp, 4));
        assert_eq!(c.cluster_policies.len(), 1);
        let rs = c.compile("n1");
        let chain = &rs.ingress[&IpAddr::from([10, 5, 1, 2])];
        assert!(chain.starts_with("ain/"), "{chain}");
        assert!(rs.chains[chain][0].ends_with(" drop"));
        // The gate judges with them too.
        let gate = PolicyGate::default();
        gate.update(&c, "n1");
        let ep = SocketAddr::from(([10, 5, 1, 2], 80));
        let from_pod = Client {
            addr: "10.5.1.2".parse().unwrap(),
            local: false,
        };
        assert!(
            gate.allows(from_pod, ep, Protocol::Tcp),
            "a pod reaching itself"
        );
        assert_eq!(
            tier_counts(&c, &c.pod_views(), "n1"),
            [("Admin", 1, 1), ("Baseline", 0, 0)]
        );
        // Deleted: the pod is no longer under any policy.
        let key = registry::store::object_key(PREFIX, Kind::ClusterNetworkPolicy, None, "deny");
        assert!(c.apply(&key, None, 5));
        assert!(c.compile("n1").ingress.is_empty());
        // An invalid one written past flannelctl is counted and ignored.
        let bad = serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "bad"},
            "spec": {"tier": "Admin", "priority": 5000, "subject": {"namespaces": {}}}
        });
        let key = registry::store::object_key(PREFIX, Kind::ClusterNetworkPolicy, None, "bad");
        assert!(!c.apply(&key, Some(bad.to_string().as_bytes()), 6));
        assert!(c.cluster_policies.is_empty());
        assert_eq!(c.invalid_objects.get(), 1);
    }

    #[test]
    fn invalid_objects_written_past_flannelctl_are_ignored() {
        let mut c = Cache::new(PREFIX);
        // A port name nft could not take; validation refuses it, so the table never sees it.
        let key = registry::store::object_key(PREFIX, Kind::NetworkPolicy, Some("x"), "bad");
        let value = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "bad", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "a;b c"}]}]}
        });
        assert!(!c.apply(&key, Some(value.to_string().as_bytes()), 5));
        assert!(c.policies.is_empty());
        assert_eq!(c.invalid_objects.get(), 1);
        assert!(!c.apply(&key, Some(b"{not json"), 6));
        assert_eq!(c.invalid_objects.get(), 2);
    }

    #[test]
    fn bridge_netfilter_switch_is_turned_on_or_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bridge-nf-call-iptables");
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(bridge_netfilter_at(&f), None, "turned on");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "1");
        let missing = bridge_netfilter_at(&dir.path().join("nope")).unwrap();
        assert!(missing.contains("no br_netfilter"), "{missing}");
        // A switch that cannot be written (here: a directory stands in for it).
        let d = dir.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        assert!(bridge_netfilter_at(&d).is_some());

        let m = PolicyMetrics::default();
        m.set_bridge_netfilter(Some(missing.clone()));
        assert_eq!(
            (m.br_netfilter.get(), m.not_ready_reason()),
            (0, Some(missing))
        );
        m.set_bridge_netfilter(None);
        assert_eq!((m.br_netfilter.get(), m.not_ready_reason()), (1, None));
    }

    #[test]
    fn the_gate_judges_relays_like_the_evaluator() {
        let mut c = Cache::new(PREFIX);
        for (name, app) in [("srv", "web"), ("ok", "client"), ("bad", "other")] {
            assert!(put(
                &mut c,
                &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\nspec:\n  containers: [{{name: c}}]\n"),
                2
            ));
        }
        record(&mut c, "srv", "10.5.1.2", 3);
        record(&mut c, "ok", "10.5.1.3", 3);
        record(&mut c, "bad", "10.5.1.4", 3);
        assert!(put(
            &mut c,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n",
            4
        ));
        let gate = PolicyGate::default();
        let srv = SocketAddr::from(([10, 5, 1, 2], 80));
        let from = |a: [u8; 4], local: bool| Client {
            addr: IpAddr::from(a),
            local,
        };
        // Before the first sync nothing is known: refused.
        assert!(!gate.allows(from([10, 5, 1, 3], false), srv, Protocol::Tcp));
        gate.update(&c, "n1");
        assert!(gate.allows(from([10, 5, 1, 3], false), srv, Protocol::Tcp));
        assert!(!gate.allows(from([10, 5, 1, 4], false), srv, Protocol::Tcp));
        // An outside client, and this node itself (always allowed to its own pods).
        assert!(!gate.allows(from([192, 0, 2, 9], false), srv, Protocol::Tcp));
        assert!(gate.allows(from([192, 0, 2, 1], true), srv, Protocol::Tcp));
        // A pod not isolated accepts anyone.
        let other = SocketAddr::from(([10, 5, 1, 4], 80));
        assert!(gate.allows(from([10, 5, 1, 3], false), other, Protocol::Tcp));
    }

    /// The gate over IPv6 (and dual-stack pods) decides every relay as the evaluator does over
    /// the endpoint's family: pods known by either address, ipBlocks of that family only,
    /// this node's own relays (from `::1`) allowed, mixed families refused.
    #[test]
    fn the_gate_judges_ipv6_relays_like_the_evaluator() {
        let mut c = Cache::new(PREFIX);
        for (name, app) in [
            ("srv", "web"),
            ("ok", "client"),
            ("bad", "other"),
            ("six", "other"),
        ] {
            assert!(put(
                &mut c,
                &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\nspec:\n  containers: [{{name: c}}]\n"),
                2
            ));
        }
        record_ips(&mut c, "srv", "n1", &["10.5.1.2", "fd10:0:0:1::2"], 3);
        record_ips(&mut c, "ok", "n2", &["10.5.2.3", "fd10:0:0:2::3"], 3);
        record_ips(&mut c, "bad", "n2", &["10.5.2.4", "fd10:0:0:2::4"], 3);
        // An IPv6-only pod, let in by an IPv6 ipBlock (which opens nothing over IPv4).
        record_ips(&mut c, "six", "n1", &["fd10:0:0:1::6"], 3);
        assert!(put(
            &mut c,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    - ipBlock: {cidr: \"fd10:0:0:1::/64\"}\n",
            4
        ));
        let gate = PolicyGate::default();
        let ip = |a: &str| -> IpAddr { a.parse().unwrap() };
        let from = |a: &str, local: bool| Client { addr: ip(a), local };
        let srv6 = SocketAddr::new(ip("fd10:0:0:1::2"), 80);
        let srv4 = SocketAddr::new(ip("10.5.1.2"), 80);
        assert!(!gate.allows(from("fd10:0:0:2::3", false), srv6, Protocol::Tcp));
        gate.update(&c, "n1");
        let views = c.pod_views();
        let view = |n: &str| views.iter().find(|p| p.name == n).unwrap();
        let cluster = eval::Cluster {
            namespaces: c.namespaces.clone(),
            policies: c.policies.values().cloned().collect(),
            ..eval::Cluster::default()
        };
        // (client, endpoint, allowed)
        let cases = [
            ("fd10:0:0:2::3", srv6, true),
            ("fd10:0:0:2::4", srv6, false),
            // In the ipBlock, but the pod is known by address: its labels count, and the
            // block lets it in anyway.
            ("fd10:0:0:1::6", srv6, true),
            // An outside IPv6 client, inside and outside the block.
            ("fd10:0:0:1::99", srv6, true),
            ("2001:db8::9", srv6, false),
            ("10.5.2.3", srv4, true),
            ("10.5.2.4", srv4, false),
        ];
        for (client, ep, want) in cases {
            assert_eq!(
                gate.allows(from(client, false), ep, Protocol::Tcp),
                want,
                "{client} -> {ep}"
            );
            // The evaluator's answer over the endpoint's family, pods by their address.
            let peer = |a: IpAddr| {
                views
                    .iter()
                    .find(|p| p.ips.contains(&a))
                    .map(Peer::Pod)
                    .unwrap_or(Peer::Host {
                        addr: a,
                        node: None,
                    })
            };
            let fam = eval::family_of(ep.ip());
            assert_eq!(
                cluster.allows(fam, peer(ip(client)), peer(ep.ip()), Protocol::Tcp, 80),
                want,
                "evaluator: {client} -> {ep}"
            );
        }
        // This node's own relays (redirected in the output hook: from ::1) are allowed.
        assert!(gate.allows(from("::1", true), srv6, Protocol::Tcp));
        // The IPv6 block does not open IPv4: the same pod by its IPv4 address is an outside
        // host there.
        assert!(!gate.allows(from("10.5.1.99", false), srv4, Protocol::Tcp));
        // A relay across families is never asked for; refused.
        assert!(!gate.allows(from("fd10:0:0:2::3", false), srv4, Protocol::Tcp));
        assert!(!gate.allows(from("10.5.2.3", false), srv6, Protocol::Tcp));
        // The IPv6-only pod is not isolated: anyone reaches it over IPv6.
        let six = SocketAddr::new(ip("fd10:0:0:1::6"), 8080);
        assert!(gate.allows(from("fd10:0:0:2::4", false), six, Protocol::Udp));
        assert_eq!(view("six").ips.len(), 1);
    }
}
