//! NetworkPolicy compiled to this node's nftables table (pure: objects in, ruleset out).
//!
//! One table per family from the same objects: `table ip flannel-policy` over the pods' IPv4
//! addresses and IPv4 ipBlocks, `table ip6 flannel-policy` over their IPv6 addresses and IPv6
//! ipBlocks (an ipBlock of the other family is left out of a table: it matches nothing
//! there). Layout (docs/network-policy.md draws it):
//! - base chain `forward` (filter priority, after the service proxy's DNAT):
//!   `ct state established,related accept`, `ct state invalid drop`, a pod reaching itself
//!   through its Service (`ip saddr . ip daddr @hairpin`) accepted, then
//!   `ip saddr vmap @egress` and `ip daddr vmap @ingress` (traffic between a pod and its own
//!   node goes through input/output, never forward, and is always allowed); the IPv6 chain
//!   also accepts neighbour discovery and router messages (ICMPv6 133-137, which conntrack
//!   does not track) before `ct state invalid drop`, and refuses link-local unicast between
//!   pods (pod records carry no link-local address, so policies could not see it);
//! - maps `ingress` / `egress`: local pod address -> `jump in|out/<hash>`, only for pods a
//!   policy isolates in that direction (others have no element and pass);
//! - chains `in|out/<hash>`: one `return` rule per peer of each rule of the policies that
//!   select a pod, then reject (TCP reset unless the connection was DNATed, else ICMP
//!   admin-prohibited). Pods selected by the same policies share one chain;
//! - sets `peer/<hash>`, one per distinct peer (a podSelector in a namespace, a
//!   namespaceSelector with or without podSelector, an ipBlock): the matching pod addresses of
//!   the whole cluster, or the block's intervals minus its excepts; `ports/<hash>` per
//!   distinct list of numeric ports (`protocol . port` intervals); `named/<hash of the port
//!   name>` with `pod address . protocol . port` of every pod that has a container port of
//!   that name.
//!
//! Names are hashes of content, so policies that share a selector share its set, and a
//! change touches only the sets and chains whose content changed. A packet costs one set
//! lookup per rule peer of the policies selecting its pod, whatever the number of pods and
//! policies in the cluster. [`diff`] turns two rulesets into the steps between them (one
//! transaction); [`full`] writes the table from scratch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
pub use nft::Family;
use registry::{
    ClusterNetworkPolicy, ClusterNetworkPolicyPeer, IntOrString, LabelSelector, Labels,
    NamespacedPod, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, PolicyType, Protocol,
    RuleAction, Tier,
};

use crate::eval::{family_of, rule_parts, tier_order, Direction, PodView, NAMESPACE_NAME_LABEL};

/// The table the module owns.
pub const TABLE: &str = "flannel-policy";

/// What the elements of a set are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    /// Peer addresses and intervals.
    Addrs,
    /// `protocol . port` intervals.
    Ports,
    /// `address . protocol . port` of pods with a named port.
    Named,
    /// `address . address` (a pod and itself).
    Pairs,
}

impl SetType {
    fn decl(self, family: Family) -> &'static [&'static str] {
        match (self, family) {
            (SetType::Addrs, Family::Ip) => &["type ipv4_addr", "flags interval"],
            (SetType::Addrs, Family::Ip6) => &["type ipv6_addr", "flags interval"],
            (SetType::Ports, _) => &["type inet_proto . inet_service", "flags interval"],
            (SetType::Named, Family::Ip) => &["type ipv4_addr . inet_proto . inet_service"],
            (SetType::Named, Family::Ip6) => &["type ipv6_addr . inet_proto . inet_service"],
            (SetType::Pairs, Family::Ip) => &["type ipv4_addr . ipv4_addr"],
            (SetType::Pairs, Family::Ip6) => &["type ipv6_addr . ipv6_addr"],
        }
    }
}

/// What differs between the two tables' text.
fn addr_type(family: Family) -> &'static str {
    match family {
        Family::Ip => "ipv4_addr",
        Family::Ip6 => "ipv6_addr",
    }
}

/// The refusal for what is not TCP (or was DNATed).
fn reject_icmp(family: Family) -> &'static str {
    match family {
        Family::Ip => "reject with icmp type admin-prohibited",
        Family::Ip6 => "reject with icmpv6 type admin-prohibited",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub ty: SetType,
    pub elements: BTreeSet<String>,
}

/// The node's table of one family as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `ip` (IPv4 addresses only) or `ip6` (IPv6 addresses only).
    pub family: Family,
    pub sets: BTreeMap<String, Set>,
    /// Per-pod chains, by name, with their rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Pod address -> its ingress chain.
    pub ingress: BTreeMap<IpAddr, String>,
    /// Pod address -> its egress chain.
    pub egress: BTreeMap<IpAddr, String>,
}

impl Default for Ruleset {
    /// An empty IPv4 table.
    fn default() -> Ruleset {
        Ruleset::empty(Family::Ip)
    }
}

impl Ruleset {
    /// A table of `family` without sets, chains or map elements.
    pub fn empty(family: Family) -> Ruleset {
        Ruleset {
            family,
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
            ingress: BTreeMap::new(),
            egress: BTreeMap::new(),
        }
    }

    /// Local pods isolated for ingress and for egress.
    pub fn isolated(&self) -> (usize, usize) {
        (self.ingress.len(), self.egress.len())
    }
}

/// What the table is compiled from.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Namespace name -> labels (the name label is implied).
    pub namespaces: &'a BTreeMap<String, Labels>,
    pub policies: &'a [&'a NetworkPolicy],
    /// ClusterNetworkPolicies (any order: they are sorted per tier as the evaluator does).
    pub cluster_policies: &'a [&'a ClusterNetworkPolicy],
    /// Every pod of the cluster that has an address.
    pub pods: &'a [PodView],
    /// This node's name: its pods get chains.
    pub node: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    In,
    Out,
}

impl Dir {
    fn tag(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
        }
    }
    /// The chain prefix of a ClusterNetworkPolicy tier's chains (`ain`, `aout`, `bin`, `bout`).
    fn tier_tag(self, tier: Tier) -> &'static str {
        match (tier, self) {
            (Tier::Admin, Dir::In) => "ain",
            (Tier::Admin, Dir::Out) => "aout",
            (Tier::Baseline, Dir::In) => "bin",
            (Tier::Baseline, Dir::Out) => "bout",
        }
    }
    fn policy_type(self) -> PolicyType {
        match self {
            Dir::In => PolicyType::Ingress,
            Dir::Out => PolicyType::Egress,
        }
    }
    /// The packet field holding the peer (the source for ingress, the destination for egress).
    fn peer_field(self) -> &'static str {
        match self {
            Dir::In => "saddr",
            Dir::Out => "daddr",
        }
    }
}

fn namespace_of(np: &NetworkPolicy) -> &str {
    np.metadata.namespace.as_deref().unwrap_or("default")
}

/// FNV-1a: stable across runs, so a restarted daemon computes the same names.
fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Content-addressed names: `<prefix>/<hash of key>`; a (practically impossible) collision
/// of two keys is resolved by salting the later one.
#[derive(Default)]
struct Names<'a> {
    /// name -> the key it stands for
    used: BTreeMap<String, String>,
    /// The set of each NetworkPolicy peer (with the policy's namespace) met in this compile:
    /// policies repeat each other's peers, and the key text is only built the first time.
    np_peers: HashMap<(&'a NetworkPolicyPeer, &'a str), String>,
    /// The same for ClusterNetworkPolicy peers (None: the peer matches nothing here).
    cnp_peers: HashMap<CnpPeer<'a>, Option<String>>,
}

/// What a ClusterNetworkPolicy peer's set depends on.
type CnpPeer<'a> = (
    Option<&'a LabelSelector>,
    Option<&'a NamespacedPod>,
    Option<&'a Vec<String>>,
);

impl Names<'_> {
    fn name(&mut self, prefix: &str, key: &str) -> String {
        let mut salt = 0u32;
        loop {
            let salted = if salt == 0 {
                key.to_string()
            } else {
                format!("{key}#{salt}")
            };
            let name = format!("{prefix}/{:016x}", fnv(&salted));
            match self.used.get(&name) {
                None => {
                    self.used.insert(name.clone(), key.to_string());
                    return name;
                }
                Some(k) if k == key => return name,
                Some(_) => salt += 1,
            }
        }
    }
}

fn merge<T: Ord + Copy>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// An address as a number (IPv4 ones below 2^32); intervals of either family are `u128`s.
fn to_int(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_int(family: Family, n: u128) -> IpAddr {
    match family {
        Family::Ip => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        Family::Ip6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn bits(family: Family) -> u32 {
    match family {
        Family::Ip => 32,
        Family::Ip6 => 128,
    }
}

fn net_family(n: &IpNet) -> Family {
    family_of(n.addr())
}

fn net_range(n: IpNet) -> (u128, u128) {
    let n = n.trunc();
    (to_int(n.network()), to_int(n.broadcast()))
}

/// Whether an ipBlock's `cidr` is of the other family (it matches nothing in this table).
fn other_family(cidr: &str, family: Family) -> bool {
    cidr.parse::<IpNet>()
        .is_ok_and(|n| net_family(&n) != family)
}

/// `cidr` minus every `except` (of the same family), as closed intervals; empty when `cidr`
/// does not parse or is of the other family (validation keeps unparsable blocks out of the
/// registry).
fn block_ranges(family: Family, cidr: &str, except: &[String]) -> Vec<(u128, u128)> {
    let Ok(net) = cidr.parse::<IpNet>() else {
        return Vec::new();
    };
    if net_family(&net) != family {
        return Vec::new();
    }
    let mut out = vec![net_range(net)];
    for e in except
        .iter()
        .filter_map(|e| e.parse::<IpNet>().ok())
        .filter(|e| net_family(e) == family)
    {
        let (elo, ehi) = net_range(e);
        out = out
            .into_iter()
            .flat_map(|(lo, hi)| {
                let mut parts = Vec::new();
                if ehi < lo || elo > hi {
                    parts.push((lo, hi));
                } else {
                    if elo > lo {
                        parts.push((lo, elo - 1));
                    }
                    if ehi < hi {
                        parts.push((ehi + 1, hi));
                    }
                }
                parts
            })
            .collect();
    }
    out
}

/// An address interval of `family` as nft writes it: an address, a prefix, or `a-b`.
fn render_range(family: Family, (lo, hi): (u128, u128)) -> String {
    let addr = |n| from_int(family, n);
    if lo == hi {
        return addr(lo).to_string();
    }
    // The size overflows only for the whole IPv6 space.
    match (hi - lo).checked_add(1) {
        None => format!("{}/0", addr(0)),
        Some(size) if size.is_power_of_two() && lo % size == 0 => {
            let len = bits(family) - size.trailing_zeros();
            format!("{}/{len}", addr(lo))
        }
        Some(_) => format!("{}-{}", addr(lo), addr(hi)),
    }
}

/// The compiler's view of the cluster, indexed once per compile.
struct Ctx<'a> {
    input: Input<'a>,
    ns_labels: BTreeMap<&'a str, Labels>,
    /// Every pod of the cluster by namespace: a selector peer looks at the pods of the
    /// namespaces it selects only.
    pods_by_ns: BTreeMap<&'a str, Vec<&'a PodView>>,
}

impl<'a> Ctx<'a> {
    fn new(input: Input<'a>) -> Ctx<'a> {
        let mut ns_labels: BTreeMap<&str, Labels> = BTreeMap::new();
        let mut pods_by_ns: BTreeMap<&str, Vec<&PodView>> = BTreeMap::new();
        for p in input.pods {
            pods_by_ns.entry(p.namespace.as_str()).or_default().push(p);
            ns_labels.entry(p.namespace.as_str()).or_insert_with(|| {
                let mut l = input
                    .namespaces
                    .get(&p.namespace)
                    .cloned()
                    .unwrap_or_default();
                l.insert(NAMESPACE_NAME_LABEL.to_string(), p.namespace.clone());
                l
            });
        }
        Ctx {
            input,
            ns_labels,
            pods_by_ns,
        }
    }

    /// Intervals of the addresses of `family` a peer stands for.
    fn peer_ranges(
        &self,
        family: Family,
        peer: &NetworkPolicyPeer,
        policy_ns: &str,
    ) -> Vec<(u128, u128)> {
        let mut v = Vec::new();
        if let Some(b) = &peer.ip_block {
            v.extend(block_ranges(family, &b.cidr, &b.except));
        } else {
            for (ns, pods) in &self.pods_by_ns {
                let in_ns = match &peer.namespace_selector {
                    None => *ns == policy_ns,
                    Some(sel) => self.ns_labels.get(ns).is_some_and(|l| sel.matches(l)),
                };
                if !in_ns {
                    continue;
                }
                for pod in pods {
                    if peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&pod.labels))
                    {
                        v.extend(pod.addrs(family).map(|a| (to_int(a), to_int(a))));
                    }
                }
            }
        }
        merge(v)
    }

    /// `address . protocol . port` of every pod address of `family` with a container port
    /// called `name`.
    fn named_elements(&self, family: Family, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for pod in self.input.pods {
            for np in pod.ports.iter().filter(|np| np.name == name) {
                for a in pod.addrs(family) {
                    out.insert(format!("{a} . {} . {}", np.protocol.nft(), np.port));
                }
            }
        }
        out
    }
}

/// Numeric ports of a rule as `protocol . port[-end]` elements (merged per protocol), and
/// its named ports as (protocol, name).
fn split_ports(ports: &[NetworkPolicyPort]) -> (BTreeSet<String>, BTreeSet<(Protocol, String)>) {
    let mut ranges: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for p in ports {
        let proto = p.protocol.unwrap_or(Protocol::Tcp);
        let clamp = |n: i64| u16::try_from(n.clamp(0, 65535)).unwrap_or(u16::MAX);
        match &p.port {
            None => ranges.entry(proto).or_default().push((0, 65535)),
            Some(IntOrString::Int(n)) => {
                let lo = clamp(*n);
                let hi = p.end_port.map(clamp).unwrap_or(lo).max(lo);
                ranges.entry(proto).or_default().push((lo, hi));
            }
            Some(IntOrString::String(name)) => {
                named.insert((proto, name.clone()));
            }
        }
    }
    let mut elements = BTreeSet::new();
    for (proto, v) in ranges {
        for (lo, hi) in merge(v) {
            elements.insert(if lo == hi {
                format!("{} . {lo}", proto.nft())
            } else {
                format!("{} . {lo}-{hi}", proto.nft())
            });
        }
    }
    (elements, named)
}

/// The IPv4 table for the pods of `input.node` ([`compile_family`] with [`Family::Ip`]).
pub fn compile(input: Input<'_>) -> Ruleset {
    compile_family(input, Family::Ip)
}

/// The table of `family` for the pods of `input.node`, over the pods' addresses of that family.
pub fn compile_family(input: Input<'_>, family: Family) -> Ruleset {
    let ctx = Ctx::new(input);
    let mut rs = Ruleset::empty(family);
    let mut names = Names::default();
    let mut policies: Vec<&NetworkPolicy> = input.policies.to_vec();
    policies.sort_by(|a, b| {
        (namespace_of(a), a.metadata.name.as_str()).cmp(&(namespace_of(b), &b.metadata.name))
    });
    // Several records may claim an address for a while (a pod replaced); one entry each.
    let mut local: BTreeMap<IpAddr, &PodView> = BTreeMap::new();
    for p in input.pods.iter().filter(|p| p.node == input.node) {
        for a in p.addrs(family) {
            local.insert(a, p);
        }
    }
    // Local pods by namespace: a policy only looks at the pods of its own namespace.
    let mut local_by_ns: BTreeMap<&str, Vec<(IpAddr, &PodView)>> = BTreeMap::new();
    for (a, p) in &local {
        local_by_ns
            .entry(p.namespace.as_str())
            .or_default()
            .push((*a, *p));
    }
    // The allow rules of each (policy, direction) that selects a local pod, compiled once;
    // (pod address, direction) -> indices into them, in policy order.
    let mut np_rules: Vec<Vec<String>> = Vec::new();
    let mut per_pod: BTreeMap<(IpAddr, Dir), Vec<usize>> = BTreeMap::new();
    for np in policies {
        let Some(candidates) = local_by_ns.get(namespace_of(np)) else {
            continue;
        };
        for dir in [Dir::In, Dir::Out] {
            if !np.spec.isolates(dir.policy_type()) {
                continue;
            }
            let selected: Vec<IpAddr> = candidates
                .iter()
                .filter(|(_, p)| np.spec.pod_selector.matches(&p.labels))
                .map(|(a, _)| *a)
                .collect();
            if selected.is_empty() {
                continue;
            }
            let idx = np_rules.len();
            np_rules.push(policy_rules(&ctx, &mut rs, &mut names, np, dir));
            for ip in selected {
                per_pod.entry((ip, dir)).or_default().push(idx);
            }
        }
    }
    // (pod address, direction) -> its NetworkPolicy chain (when a policy isolates it). Pods
    // under the same policies share one chain, built once.
    let mut np_chain: BTreeMap<(IpAddr, Dir), String> = BTreeMap::new();
    let mut built: BTreeMap<(Dir, &[usize]), String> = BTreeMap::new();
    for ((ip, dir), idxs) in &per_pod {
        if let Some(name) = built.get(&(*dir, idxs.as_slice())) {
            np_chain.insert((*ip, *dir), name.clone());
            continue;
        }
        // Policies often repeat each other's rules; a rule only returns, so once is enough.
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut chain: Vec<String> = idxs
            .iter()
            .flat_map(|&i| np_rules[i].iter())
            .filter(|r| seen.insert(r.as_str()))
            .cloned()
            .collect();
        // A TCP reset where the connection was not DNATed; else (and for other protocols)
        // ICMP admin-prohibited, which conntrack translates back to the Service address
        // the client used. A reset cannot be used there: for a bridged packet (a pod's, with
        // br_netfilter) the kernel sends it straight out of the bridge port without NAT, so it
        // carries the pod's address, which the client ignores (docs/network-policy.md).
        chain.push("meta l4proto tcp ct status ! dnat reject with tcp reset".to_string());
        chain.push(reject_icmp(family).to_string());
        let name = names.name(dir.tag(), &chain.join("\n"));
        rs.chains.insert(name.clone(), chain);
        built.insert((*dir, idxs.as_slice()), name.clone());
        np_chain.insert((*ip, *dir), name);
    }
    // ClusterNetworkPolicy tiers around it, per local pod and direction: the Admin chain
    // (first matching rule: Accept `return`, Deny `drop`, Pass `goto` the rest), then the
    // NetworkPolicy chain when one isolates the pod (final), else the Baseline chain (Pass
    // and Accept `return`, Deny `drop`), else the default (allowed: back in `forward`).
    let local_pods: Vec<(IpAddr, &PodView)> = local.iter().map(|(a, p)| (*a, *p)).collect();
    let pods: Vec<&PodView> = local_pods.iter().map(|(_, p)| *p).collect();
    let tiers = TierRules::new(&ctx, &mut rs, &mut names, input.cluster_policies, &pods);
    // Pods under the same policies share their chains: built once per (direction, selecting
    // policies, NetworkPolicy chain).
    let mut heads: BTreeMap<HeadKey, Option<String>> = BTreeMap::new();
    for (i, (ip, _)) in local_pods.iter().enumerate() {
        for dir in [Dir::In, Dir::Out] {
            let np = np_chain.get(&(*ip, dir));
            let key = (dir, tiers.selecting[i].as_slice(), np);
            let head = match heads.get(&key) {
                Some(h) => h.clone(),
                None => {
                    let h = tiers.head_chain(&mut rs, &mut names, i, dir, np);
                    heads.insert(key, h.clone());
                    h
                }
            };
            if let Some(name) = head {
                match dir {
                    Dir::In => rs.ingress.insert(*ip, name),
                    Dir::Out => rs.egress.insert(*ip, name),
                };
            }
        }
    }
    // A pod reaching itself (through its own Service, hairpin) is always allowed.
    let isolated: BTreeSet<&IpAddr> = rs.ingress.keys().chain(rs.egress.keys()).collect();
    rs.sets.insert(
        HAIRPIN.to_string(),
        Set {
            ty: SetType::Pairs,
            elements: isolated.iter().map(|ip| format!("{ip} . {ip}")).collect(),
        },
    );
    rs
}

/// What a local pod's head chain depends on: the direction, the ClusterNetworkPolicies
/// selecting it (indices into [`TierRules`]) and its NetworkPolicy chain.
type HeadKey<'a> = (Dir, &'a [usize], Option<&'a String>);

/// Rule lines: a match prefix (ending in a space, or empty) and the rule's action.
type Lines = Vec<(String, RuleAction)>;

/// The ClusterNetworkPolicy rules of both tiers, compiled once per table: per policy that
/// selects a pod of the node (in tier order), its rules of each direction as (match prefix,
/// action) lines, every peer's set registered; and per local pod the policies selecting it.
struct TierRules {
    /// (tier, lines per direction), Admin policies first, each tier in evaluation order.
    policies: Vec<(Tier, [Lines; 2])>,
    /// Per local pod (as passed to [`TierRules::new`]): indices into `policies`, ascending.
    selecting: Vec<Vec<usize>>,
}

impl TierRules {
    fn new<'a>(
        ctx: &Ctx<'_>,
        rs: &mut Ruleset,
        names: &mut Names<'a>,
        cnps: &[&'a ClusterNetworkPolicy],
        local: &[&PodView],
    ) -> TierRules {
        // Local pods by namespace: a subject's namespace selector is matched once per
        // namespace, its pod selector only on the pods of the namespaces it selects.
        let empty = Labels::new();
        let mut by_ns: BTreeMap<&str, (&Labels, Vec<usize>)> = BTreeMap::new();
        for (i, pod) in local.iter().enumerate() {
            let ns = pod.namespace.as_str();
            by_ns
                .entry(ns)
                .or_insert_with(|| (ctx.ns_labels.get(ns).unwrap_or(&empty), Vec::new()))
                .1
                .push(i);
        }
        let mut policies = Vec::new();
        let mut selecting = vec![Vec::new(); local.len()];
        for tier in [Tier::Admin, Tier::Baseline] {
            for p in tier_order(cnps.iter().copied(), tier) {
                let mut selected = Vec::new();
                for (ns_labels, pods) in by_ns.values() {
                    match (&p.spec.subject.namespaces, &p.spec.subject.pods) {
                        (Some(sel), None) if sel.matches(ns_labels) => {
                            selected.extend_from_slice(pods);
                        }
                        (None, Some(np)) if np.namespace_selector.matches(ns_labels) => {
                            selected.extend(pods.iter().copied().filter(|&i| {
                                np.pod_selector
                                    .as_ref()
                                    .is_none_or(|s| s.matches(&local[i].labels))
                            }));
                        }
                        _ => {}
                    }
                }
                // Only policies that select a pod of this node reach the table (their sets
                // too), as for NetworkPolicy.
                if selected.is_empty() {
                    continue;
                }
                let lines = [
                    cnp_rules(ctx, rs, names, p, Dir::In),
                    cnp_rules(ctx, rs, names, p, Dir::Out),
                ];
                let idx = policies.len();
                policies.push((tier, lines));
                for i in selected {
                    selecting[i].push(idx);
                }
            }
        }
        TierRules {
            policies,
            selecting,
        }
    }

    /// The lines of `tier` for local pod `i` in `dir`, in evaluation order.
    fn rules(&self, tier: Tier, dir: Dir, i: usize) -> impl Iterator<Item = &(String, RuleAction)> {
        let idx = match dir {
            Dir::In => 0,
            Dir::Out => 1,
        };
        self.selecting[i]
            .iter()
            .map(|&p| &self.policies[p])
            .filter(move |(t, _)| *t == tier)
            .flat_map(move |(_, lines)| lines[idx].iter())
    }

    /// The chain a local pod's map element in `dir` points at (registered in `rs`), given its
    /// NetworkPolicy chain; None when nothing judges the pod in that direction.
    fn head_chain(
        &self,
        rs: &mut Ruleset,
        names: &mut Names,
        i: usize,
        dir: Dir,
        np: Option<&String>,
    ) -> Option<String> {
        let rest = match np {
            Some(np) => Some(np.clone()),
            None => {
                let chain: Vec<String> = first_matches(self.rules(Tier::Baseline, dir, i))
                    .map(|(m, action)| match action {
                        RuleAction::Deny => format!("{m}drop"),
                        RuleAction::Accept | RuleAction::Pass => format!("{m}return"),
                    })
                    .collect();
                if chain.is_empty() {
                    None
                } else {
                    let name = names.name(dir.tier_tag(Tier::Baseline), &chain.join("\n"));
                    rs.chains.insert(name.clone(), chain);
                    Some(name)
                }
            }
        };
        let pass = rest
            .as_ref()
            .map_or("return".to_string(), |r| format!("goto {r}"));
        let mut chain: Vec<String> = first_matches(self.rules(Tier::Admin, dir, i))
            .map(|(m, action)| match action {
                RuleAction::Accept => format!("{m}return"),
                RuleAction::Deny => format!("{m}drop"),
                RuleAction::Pass => format!("{m}{pass}"),
            })
            .collect();
        if chain.is_empty() {
            return rest;
        }
        if let Some(r) = &rest {
            chain.push(format!("goto {r}"));
        }
        let name = names.name(dir.tier_tag(Tier::Admin), &chain.join("\n"));
        rs.chains.insert(name.clone(), chain);
        Some(name)
    }
}

/// The lines of a tier chain that can match: the first line wins, so a line whose match is
/// the same text as an earlier one's (the same peer set and port match, from another rule or
/// policy) never sees a packet and is left out. Policies often repeat each other's peers.
fn first_matches<'a>(
    lines: impl Iterator<Item = &'a (String, RuleAction)>,
) -> impl Iterator<Item = &'a (String, RuleAction)> {
    let mut seen: BTreeSet<&'a str> = BTreeSet::new();
    lines.filter(move |(m, _)| seen.insert(m.as_str()))
}

/// The lines of one ClusterNetworkPolicy's rules of `dir`: per rule, one line per peer (and
/// per kind of port match), each a match prefix ending in a space (or empty) and the rule's
/// action. A rule whose peers all match nothing in this family has no line.
fn cnp_rules<'a>(
    ctx: &Ctx<'_>,
    rs: &mut Ruleset,
    names: &mut Names<'a>,
    p: &'a ClusterNetworkPolicy,
    dir: Dir,
) -> Vec<(String, RuleAction)> {
    let direction = match dir {
        Dir::In => Direction::Ingress,
        Dir::Out => Direction::Egress,
    };
    let rules = rule_parts(p, direction);
    let family = rs.family;
    let fam = family.as_str();
    let mut out = Vec::new();
    for (action, peers, protocols) in rules {
        let Some(action) = action else { continue };
        let mut peer_matches = Vec::new();
        for peer in peers {
            let Some(name) = cnp_peer_set(ctx, rs, names, peer) else {
                continue;
            };
            peer_matches.push(format!("{fam} {} @{name} ", dir.peer_field()));
        }
        // Port matches: none (all traffic), or the numeric set and the named ports.
        let mut port_matches: Vec<String> = Vec::new();
        match protocols {
            None => port_matches.push(String::new()),
            Some(list) => {
                let mut numeric: Vec<NetworkPolicyPort> = Vec::new();
                let mut named: BTreeSet<String> = BTreeSet::new();
                for pr in list {
                    for (proto, pp) in pr.protocol_ports() {
                        if let Some((lo, hi)) =
                            pp.destination_port.as_ref().and_then(|d| d.bounds())
                        {
                            numeric.push(NetworkPolicyPort {
                                protocol: Some(proto),
                                port: Some(IntOrString::Int(lo)),
                                end_port: (hi != lo).then_some(hi),
                            });
                        }
                    }
                    if let Some(n) = pr
                        .destination_named_port
                        .as_deref()
                        .filter(|n| !n.is_empty())
                    {
                        named.insert(n.to_string());
                    }
                }
                let (elements, _) = split_ports(&numeric);
                if !elements.is_empty() {
                    let key: Vec<&str> = elements.iter().map(String::as_str).collect();
                    let name = names.name("ports", &key.join(","));
                    rs.sets.entry(name.clone()).or_insert_with(|| Set {
                        ty: SetType::Ports,
                        elements,
                    });
                    port_matches.push(format!("meta l4proto . th dport @{name} "));
                }
                for port_name in named {
                    let set = names.name("named", &port_name);
                    rs.sets.entry(set.clone()).or_insert_with(|| Set {
                        ty: SetType::Named,
                        elements: ctx.named_elements(family, &port_name),
                    });
                    // Any protocol: the container port's own (the set holds it).
                    port_matches.push(format!("{fam} daddr . meta l4proto . th dport @{set} "));
                }
            }
        }
        for pm in &peer_matches {
            for ports in &port_matches {
                out.push((format!("{pm}{ports}"), action));
            }
        }
    }
    out
}

/// The set of a ClusterNetworkPolicy peer (shared with NetworkPolicy peers of the same
/// meaning), or None when it matches nothing in this family (networks of the other family
/// only; an invalid peer).
fn cnp_peer_set<'a>(
    ctx: &Ctx<'_>,
    rs: &mut Ruleset,
    names: &mut Names<'a>,
    peer: &'a ClusterNetworkPolicyPeer,
) -> Option<String> {
    let id = (
        peer.namespaces.as_ref(),
        peer.pods.as_ref(),
        peer.networks.as_ref(),
    );
    if let Some(name) = names.cnp_peers.get(&id) {
        return name.clone();
    }
    let name = new_cnp_peer_set(ctx, rs, names, peer);
    names.cnp_peers.insert(id, name.clone());
    name
}

/// [`cnp_peer_set`] the first time a peer is met.
fn new_cnp_peer_set(
    ctx: &Ctx<'_>,
    rs: &mut Ruleset,
    names: &mut Names<'_>,
    peer: &ClusterNetworkPolicyPeer,
) -> Option<String> {
    let family = rs.family;
    // Pods (namespaces, or pods in namespaces) as the NetworkPolicy peer of that meaning;
    // its addresses are looked up only when the set is new.
    let (key, selector_peer, ranges) = match (&peer.namespaces, &peer.pods, &peer.networks) {
        (Some(sel), None, None) => {
            let np = NetworkPolicyPeer {
                namespace_selector: Some(sel.clone()),
                ..NetworkPolicyPeer::default()
            };
            (peer_key(&np, ""), Some(np), Vec::new())
        }
        (None, Some(pods), None) => {
            let np = NetworkPolicyPeer {
                namespace_selector: Some(pods.namespace_selector.clone()),
                pod_selector: pods.pod_selector.clone(),
                ..NetworkPolicyPeer::default()
            };
            (peer_key(&np, ""), Some(np), Vec::new())
        }
        (None, None, Some(nets)) => {
            let mut v = Vec::new();
            for n in nets {
                v.extend(block_ranges(family, n, &[]));
            }
            if v.is_empty() {
                return None;
            }
            let mut sorted = nets.clone();
            sorted.sort();
            (format!("networks {}", sorted.join(",")), None, merge(v))
        }
        _ => return None,
    };
    let name = names.name("peer", &key);
    if !rs.sets.contains_key(&name) {
        let ranges = match &selector_peer {
            Some(np) => ctx.peer_ranges(family, np, ""),
            None => ranges,
        };
        let elements = ranges
            .into_iter()
            .map(|r| render_range(family, r))
            .collect();
        rs.sets.insert(
            name.clone(),
            Set {
                ty: SetType::Addrs,
                elements,
            },
        );
    }
    Some(name)
}

/// The set of (pod, pod) pairs of isolated local pods (always there: a base chain uses it).
const HAIRPIN: &str = "hairpin";

/// The `return` rules of one policy for one direction (registering the sets they use).
fn policy_rules<'a>(
    ctx: &Ctx<'_>,
    rs: &mut Ruleset,
    names: &mut Names<'a>,
    np: &'a NetworkPolicy,
    dir: Dir,
) -> Vec<String> {
    let ns = namespace_of(np);
    let rules: Vec<(&'a [NetworkPolicyPeer], &'a [NetworkPolicyPort])> = match dir {
        Dir::In => np
            .spec
            .ingress
            .iter()
            .map(|r| (r.from.as_slice(), r.ports.as_slice()))
            .collect(),
        Dir::Out => np
            .spec
            .egress
            .iter()
            .map(|r| (r.to.as_slice(), r.ports.as_slice()))
            .collect(),
    };
    let family = rs.family;
    let fam = family.as_str();
    let mut out = Vec::new();
    for (peers, ports) in rules {
        // One match per peer (peers are OR'ed); none when the rule has no peers (all). An
        // ipBlock of the other family matches nothing here: no rule.
        let mut peer_matches = Vec::new();
        for peer in peers {
            if peer
                .ip_block
                .as_ref()
                .is_some_and(|b| other_family(&b.cidr, family))
            {
                continue;
            }
            if let Some(name) = names.np_peers.get(&(peer, ns)) {
                peer_matches.push(format!("{fam} {} @{name} ", dir.peer_field()));
                continue;
            }
            let key = peer_key(peer, ns);
            let name = names.name("peer", &key);
            names.np_peers.insert((peer, ns), name.clone());
            if !rs.sets.contains_key(&name) {
                let elements = ctx
                    .peer_ranges(family, peer, ns)
                    .into_iter()
                    .map(|r| render_range(family, r))
                    .collect();
                rs.sets.insert(
                    name.clone(),
                    Set {
                        ty: SetType::Addrs,
                        elements,
                    },
                );
            }
            peer_matches.push(format!("{fam} {} @{name} ", dir.peer_field()));
        }
        if peers.is_empty() {
            peer_matches.push(String::new());
        }
        if peer_matches.is_empty() {
            continue;
        }
        let (numeric, named) = split_ports(ports);
        let ports_set = (!numeric.is_empty()).then(|| {
            let key: Vec<&str> = numeric.iter().map(String::as_str).collect();
            let name = names.name("ports", &key.join(","));
            rs.sets.entry(name.clone()).or_insert_with(|| Set {
                ty: SetType::Ports,
                elements: numeric,
            });
            name
        });
        // Port names are hashed too: only the hash reaches nft text, whatever the name.
        let named: Vec<(Protocol, String, String)> = named
            .into_iter()
            .map(|(proto, port_name)| {
                let set = names.name("named", &port_name);
                rs.sets.entry(set.clone()).or_insert_with(|| Set {
                    ty: SetType::Named,
                    elements: ctx.named_elements(family, &port_name),
                });
                (proto, port_name, set)
            })
            .collect();
        for pm in peer_matches {
            if ports.is_empty() {
                out.push(format!("{pm}return"));
                continue;
            }
            if let Some(set) = &ports_set {
                out.push(format!("{pm}meta l4proto . th dport @{set} return"));
            }
            for (proto, _, set) in &named {
                // The destination's own port of that name and protocol (in both directions
                // the name is resolved on the destination pod).
                out.push(format!(
                    "meta l4proto {} {pm}{fam} daddr . meta l4proto . th dport @{set} return",
                    proto.nft()
                ));
            }
        }
    }
    out
}

/// What a peer stands for, independent of the policy except for the namespace a bare
/// podSelector is relative to (equal keys share one set).
fn peer_key(peer: &NetworkPolicyPeer, policy_ns: &str) -> String {
    if let Some(b) = &peer.ip_block {
        return format!("ipBlock {} except {}", b.cidr, b.except.join(","));
    }
    let pods = peer
        .pod_selector
        .as_ref()
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|| "all".into());
    match &peer.namespace_selector {
        None => format!("pods {pods} in namespace {policy_ns}"),
        Some(sel) => format!("pods {pods} in namespaces {sel:?}"),
    }
}

const BASE_CHAINS: &str = "  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ct state invalid drop
    ip saddr . ip daddr @hairpin accept
    ip saddr vmap @egress
    ip daddr vmap @ingress
  }
";

/// The IPv6 base chain: neighbour discovery and router messages (ICMPv6 133-137) are not
/// tracked by conntrack (`ct state invalid`) and cross the hook when bridged between pods
/// (a neighbour solicitation from a pod's address to a solicited-node group): always
/// accepted, or every isolated pod would lose its neighbours. Link-local unicast between
/// pods (bridged; never routed) is refused: pod records carry no link-local address, so no
/// policy could judge it. The node's own addresses, link-local ones included, never reach
/// this hook (input/output), so traffic with its own node stays allowed.
const BASE_CHAINS6: &str = "  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept
    ct state invalid drop
    ip6 saddr . ip6 daddr @hairpin accept
    ip6 saddr fe80::/10 ip6 daddr fe80::/10 meta l4proto tcp reject with tcp reset
    ip6 saddr fe80::/10 ip6 daddr fe80::/10 reject with icmpv6 type admin-prohibited
    ip6 saddr vmap @egress
    ip6 daddr vmap @ingress
  }
";

fn map_elements(m: &BTreeMap<IpAddr, String>) -> String {
    m.iter()
        .map(|(ip, chain)| format!("{ip} : jump {chain}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(elements: &BTreeSet<String>) -> String {
    elements
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The script that replaces the table with `rs` (one transaction).
pub fn full(rs: &Ruleset) -> String {
    let family = rs.family;
    let mut s = cleanup_table(family);
    let _ = writeln!(s, "table {family} {TABLE} {{");
    for (name, set) in &rs.sets {
        let _ = writeln!(s, "  set {name} {{");
        for d in set.ty.decl(family) {
            let _ = writeln!(s, "    {d}");
        }
        if !set.elements.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", join(&set.elements));
        }
        s.push_str("  }\n");
    }
    // Chains that `goto` another come after the chains they name.
    let mut chains: Vec<(&String, &Vec<String>)> = rs.chains.iter().collect();
    chains.sort_by_key(|(name, rules)| (rules.iter().any(|r| r.contains("goto ")), *name));
    for (name, rules) in chains {
        let _ = writeln!(s, "  chain {name} {{");
        for r in rules {
            let _ = writeln!(s, "    {r}");
        }
        s.push_str("  }\n");
    }
    for (map, m) in [("ingress", &rs.ingress), ("egress", &rs.egress)] {
        let _ = writeln!(s, "  map {map} {{");
        let _ = writeln!(s, "    type {} : verdict", addr_type(family));
        if !m.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", map_elements(m));
        }
        s.push_str("  }\n");
    }
    s.push_str(match family {
        Family::Ip => BASE_CHAINS,
        Family::Ip6 => BASE_CHAINS6,
    });
    s.push_str("}\n");
    s
}

/// The script that removes the table of `family` whether or not it exists (nft 1.0.6 has no
/// `destroy`).
pub fn cleanup_table(family: Family) -> String {
    nft::remove_table_script(family, TABLE)
}

/// The script that removes both tables (`ip` and `ip6`) whether or not they exist.
pub fn cleanup() -> String {
    cleanup_table(Family::Ip) + &cleanup_table(Family::Ip6)
}

/// One step from one table to the next: one line of [`diff`]'s script. Rules and set
/// elements are `R` and `E`: their text as [`changes`] gives them; [`crate::nfnl`] maps them
/// to parsed forms that keep the text ([`Change::try_map`]), so the text script and the
/// netlink batch are the same steps in the same order by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<R = String, E = String> {
    DeleteMapElements {
        map: &'static str,
        keys: Vec<IpAddr>,
    },
    FlushChain(String),
    DeleteChain(String),
    DeleteSet(String),
    DeleteElements {
        set: String,
        ty: SetType,
        elements: Vec<E>,
    },
    AddSet {
        name: String,
        ty: SetType,
    },
    AddElements {
        set: String,
        ty: SetType,
        elements: Vec<E>,
        /// The set is created in the same transaction.
        new: bool,
    },
    AddChain(String),
    AddRule {
        chain: String,
        rule: R,
    },
    AddMapElements {
        map: &'static str,
        elements: Vec<(IpAddr, String)>,
    },
}

impl<R, E> Change<R, E> {
    /// The same step with its rule and elements converted (each element with its set's
    /// type); the first failure is returned.
    pub fn try_map<R2, E2, X>(
        self,
        rule: impl Fn(R) -> Result<R2, X>,
        element: impl Fn(SetType, E) -> Result<E2, X>,
    ) -> Result<Change<R2, E2>, X> {
        Ok(match self {
            Change::DeleteMapElements { map, keys } => Change::DeleteMapElements { map, keys },
            Change::FlushChain(c) => Change::FlushChain(c),
            Change::DeleteChain(c) => Change::DeleteChain(c),
            Change::DeleteSet(s) => Change::DeleteSet(s),
            Change::DeleteElements { set, ty, elements } => Change::DeleteElements {
                set,
                ty,
                elements: elements
                    .into_iter()
                    .map(|e| element(ty, e))
                    .collect::<Result<_, _>>()?,
            },
            Change::AddSet { name, ty } => Change::AddSet { name, ty },
            Change::AddElements {
                set,
                ty,
                elements,
                new,
            } => Change::AddElements {
                set,
                ty,
                elements: elements
                    .into_iter()
                    .map(|e| element(ty, e))
                    .collect::<Result<_, _>>()?,
                new,
            },
            Change::AddChain(c) => Change::AddChain(c),
            Change::AddRule { chain, rule: r } => Change::AddRule {
                chain,
                rule: rule(r)?,
            },
            Change::AddMapElements { map, elements } => Change::AddMapElements { map, elements },
        })
    }
}

/// A step with its table's family: `Display` writes its line of the script.
#[derive(Debug)]
pub struct Line<'a, R, E>(pub Family, pub &'a Change<R, E>);

impl<R: AsRef<str>, E: AsRef<str>> std::fmt::Display for Line<'_, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Line(family, change) = *self;
        let list = |f: &mut std::fmt::Formatter<'_>, items: &[E]| {
            for (i, e) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                f.write_str(e.as_ref())?;
            }
            Ok(())
        };
        match change {
            Change::DeleteMapElements { map, keys } => {
                write!(f, "delete element {family} {TABLE} {map} {{ ")?;
                for (i, k) in keys.iter().enumerate() {
                    write!(f, "{}{k}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str(" }")
            }
            Change::FlushChain(c) => write!(f, "flush chain {family} {TABLE} {c}"),
            Change::DeleteChain(c) => write!(f, "delete chain {family} {TABLE} {c}"),
            Change::DeleteSet(s) => write!(f, "delete set {family} {TABLE} {s}"),
            Change::DeleteElements { set, elements, .. } => {
                write!(f, "delete element {family} {TABLE} {set} {{ ")?;
                list(f, elements)?;
                f.write_str(" }")
            }
            Change::AddSet { name, ty } => write!(
                f,
                "add set {family} {TABLE} {name} {{ {}; }}",
                ty.decl(family).join("; ")
            ),
            Change::AddElements { set, elements, .. } => {
                write!(f, "add element {family} {TABLE} {set} {{ ")?;
                list(f, elements)?;
                f.write_str(" }")
            }
            Change::AddChain(c) => write!(f, "add chain {family} {TABLE} {c}"),
            Change::AddRule { chain, rule } => {
                write!(f, "add rule {family} {TABLE} {chain} {}", rule.as_ref())
            }
            Change::AddMapElements { map, elements } => {
                write!(f, "add element {family} {TABLE} {map} {{ ")?;
                for (i, (ip, c)) in elements.iter().enumerate() {
                    write!(f, "{}{ip} : jump {c}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str(" }")
            }
        }
    }
}

/// The script of `changes` in a table of `family`, one line per step.
pub fn script<R: AsRef<str>, E: AsRef<str>>(family: Family, changes: &[Change<R, E>]) -> String {
    let mut s = String::new();
    for c in changes {
        let _ = writeln!(s, "{}", Line(family, c));
    }
    s
}

/// The steps from `old` (what the kernel has) to `new`, as one transaction; empty when
/// nothing changed. Order: map elements that go, chains emptied and removed, sets removed
/// and updated (removals before additions), chains created and filled, map elements added.
/// Both must be of one family (that of `new` names the table).
pub fn changes(old: &Ruleset, new: &Ruleset) -> Vec<Change> {
    let mut out = Vec::new();
    let maps = [
        ("ingress", &old.ingress, &new.ingress),
        ("egress", &old.egress, &new.egress),
    ];
    for (map, o, n) in maps {
        let keys: Vec<IpAddr> = o
            .iter()
            .filter(|(ip, c)| n.get(ip) != Some(c))
            .map(|(ip, _)| *ip)
            .collect();
        if !keys.is_empty() {
            out.push(Change::DeleteMapElements { map, keys });
        }
    }
    // All flushes before any delete: a chain may `goto` another that goes too.
    for (name, rules) in &old.chains {
        if new.chains.get(name) != Some(rules) {
            out.push(Change::FlushChain(name.clone()));
        }
    }
    for name in old.chains.keys() {
        if !new.chains.contains_key(name) {
            out.push(Change::DeleteChain(name.clone()));
        }
    }
    for (name, set) in &old.sets {
        match new.sets.get(name) {
            // A name always has one type (the suffix says which), so a set is kept or goes.
            None => out.push(Change::DeleteSet(name.clone())),
            Some(n) => {
                let gone: Vec<String> = set.elements.difference(&n.elements).cloned().collect();
                if !gone.is_empty() {
                    out.push(Change::DeleteElements {
                        set: name.clone(),
                        ty: set.ty,
                        elements: gone,
                    });
                }
            }
        }
    }
    for (name, set) in &new.sets {
        let (added, is_new): (Vec<String>, bool) = match old.sets.get(name) {
            Some(o) => (
                set.elements.difference(&o.elements).cloned().collect(),
                false,
            ),
            None => {
                out.push(Change::AddSet {
                    name: name.clone(),
                    ty: set.ty,
                });
                (set.elements.iter().cloned().collect(), true)
            }
        };
        if !added.is_empty() {
            out.push(Change::AddElements {
                set: name.clone(),
                ty: set.ty,
                elements: added,
                new: is_new,
            });
        }
    }
    // Every new chain exists before any rule is added: a rule may `goto` a new chain.
    for name in new.chains.keys() {
        if !old.chains.contains_key(name) {
            out.push(Change::AddChain(name.clone()));
        }
    }
    for (name, rules) in &new.chains {
        if old.chains.get(name) == Some(rules) {
            continue;
        }
        for r in rules {
            out.push(Change::AddRule {
                chain: name.clone(),
                rule: r.clone(),
            });
        }
    }
    for (map, o, n) in maps {
        let elements: Vec<(IpAddr, String)> = n
            .iter()
            .filter(|(ip, c)| o.get(ip) != Some(c))
            .map(|(ip, c)| (*ip, c.clone()))
            .collect();
        if !elements.is_empty() {
            out.push(Change::AddMapElements { map, elements });
        }
    }
    out
}

/// [`changes`] as the script `nft -f -` takes; `None` when nothing changed.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Option<String> {
    let changes = changes(old, new);
    (!changes.is_empty()).then(|| script(new.family, &changes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::eval::NamedPort;
    use registry::Object;

    fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, labels: &[(&str, &str)]) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![Ipv4Addr::from(ip).into()],
            node: node.into(),
            ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        }
    }

    fn policies(yaml: &str) -> Vec<NetworkPolicy> {
        registry::parse_documents(yaml)
            .unwrap()
            .into_iter()
            .map(|o| match o {
                Object::NetworkPolicy(mut np) => {
                    np.metadata.namespace.get_or_insert_with(|| "x".into());
                    np
                }
                other => panic!("not a policy: {other:?}"),
            })
            .collect()
    }

    fn pods() -> Vec<PodView> {
        vec![
            pod("x", "a", [10, 5, 1, 2], "n1", &[("pod", "a")]),
            pod("x", "b", [10, 5, 1, 3], "n1", &[("pod", "b")]),
            pod("y", "a", [10, 5, 1, 4], "n1", &[("pod", "a")]),
            pod("x", "c", [10, 5, 2, 2], "n2", &[("pod", "c")]),
            pod("y", "b", [10, 5, 2, 3], "n2", &[("pod", "b")]),
        ]
    }

    fn compile_with(pods: &[PodView], nps: &[NetworkPolicy], node: &str) -> Ruleset {
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            "y".to_string(),
            [("team".to_string(), "blue".to_string())].into(),
        );
        let refs: Vec<&NetworkPolicy> = nps.iter().collect();
        compile(Input {
            namespaces: &namespaces,
            policies: &refs,
            cluster_policies: &[],
            pods,
            node,
        })
    }

    const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec:\n  podSelector: {}\n";

    #[test]
    fn ranges_of_blocks_and_their_rendering() {
        let r = block_ranges(
            Family::Ip,
            "10.0.0.0/16",
            &["10.0.1.0/24".into(), "10.0.255.255/32".into()],
        );
        let text: Vec<String> = r.into_iter().map(|r| render_range(Family::Ip, r)).collect();
        assert_eq!(
            text,
            ["10.0.0.0/24", "10.0.2.0-10.0.255.254"],
            "cidr minus excepts"
        );
        assert_eq!(
            render_range(Family::Ip, (0, u128::from(u32::MAX))),
            "0.0.0.0/0"
        );
        assert_eq!(
            merge(vec![(5, 5), (1, 9), (10, 10), (3, 4)]),
            [(1, 9), (10, 10)]
        );
        assert!(block_ranges(Family::Ip, "10.0.0.0/40", &[]).is_empty());
    }

    /// The one set of a type (panics when there are several or none).
    fn only(rs: &Ruleset, ty: SetType) -> (&String, Vec<&str>) {
        let mut v = rs.sets.iter().filter(|(_, s)| s.ty == ty);
        let (name, set) = v.next().expect("a set of that type");
        assert!(v.next().is_none(), "several sets of type {ty:?}");
        (name, set.elements.iter().map(String::as_str).collect())
    }

    const REJECT: [&str; 2] = [
        "meta l4proto tcp ct status ! dnat reject with tcp reset",
        "reject with icmp type admin-prohibited",
    ];

    #[test]
    fn default_deny_isolates_only_local_pods_of_the_namespace() {
        let rs = compile_with(&pods(), &policies(DENY_X), "n1");
        let ips: Vec<String> = rs.ingress.keys().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.5.1.2", "10.5.1.3"]);
        assert!(
            rs.egress.is_empty(),
            "no egress section: not isolated for egress"
        );
        // Both pods have the same rules: one shared chain.
        assert_eq!(rs.chains.len(), 1);
        let (name, chain) = rs.chains.iter().next().unwrap();
        assert!(name.starts_with("in/"), "{name}");
        assert_eq!(chain, &REJECT);
        assert!(rs.ingress.values().all(|c| c == name));
        let (_, pairs) = only(&rs, SetType::Pairs);
        assert_eq!(pairs, ["10.5.1.2 . 10.5.1.2", "10.5.1.3 . 10.5.1.3"]);
        let other = compile_with(&pods(), &policies(DENY_X), "n2");
        assert_eq!(other.ingress.keys().count(), 1, "x/c only");
    }

    #[test]
    fn rules_become_shared_peer_and_port_sets() {
        let nps = policies(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - namespaceSelector: {matchLabels: {team: blue}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{port: 80}, {port: 81, endPort: 90}, {port: 85}, {protocol: UDP}, {port: http}]
  egress:
  - to: [{ipBlock: {cidr: 10.5.0.0/16, except: [10.5.2.0/24]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-peer}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}, {port: 81, endPort: 90}, {protocol: UDP}]}]
",
        );
        let rs = compile_with(&pods(), &nps, "n1");
        assert_eq!(rs.ingress.len(), 1);
        let peers: BTreeMap<Vec<&str>, &String> = rs
            .sets
            .iter()
            .filter(|(_, s)| s.ty == SetType::Addrs)
            .map(|(n, s)| (s.elements.iter().map(String::as_str).collect(), n))
            .collect();
        // x/b by podSelector (shared by both policies); y/a by namespace AND pod selector
        // (y/b fails the pod part); the ipBlock minus its except.
        assert_eq!(
            peers.keys().cloned().collect::<Vec<_>>(),
            [
                vec!["10.5.0.0/23", "10.5.3.0-10.5.255.255"],
                vec!["10.5.1.3"],
                vec!["10.5.1.4"],
            ]
        );
        let b = peers[&vec!["10.5.1.3"]];
        let ya = peers[&vec!["10.5.1.4"]];
        // The two policies' port lists differ by `85` only, which merges into 81-90.
        let (ports, elements) = only(&rs, SetType::Ports);
        assert_eq!(elements, ["tcp . 80", "tcp . 81-90", "udp . 0-65535"]);
        let (named_set, named_elements) = only(&rs, SetType::Named);
        assert_eq!(named_elements.len(), 5);
        assert!(named_elements.contains(&"10.5.1.2 . tcp . 8080"));
        let chain = &rs.chains[&rs.ingress[&IpAddr::from([10, 5, 1, 2])]];
        let named = format!("ip daddr . meta l4proto . th dport @{named_set} return");
        assert_eq!(
            chain,
            // Policies in name order (same-peer, web); web's first rule is there already.
            &[
                format!("ip saddr @{b} meta l4proto . th dport @{ports} return"),
                format!("meta l4proto tcp ip saddr @{b} {named}"),
                format!("ip saddr @{ya} meta l4proto . th dport @{ports} return"),
                format!("meta l4proto tcp ip saddr @{ya} {named}"),
                REJECT[0].to_string(),
                REJECT[1].to_string(),
            ]
        );
        let out = &rs.chains[&rs.egress[&IpAddr::from([10, 5, 1, 2])]];
        assert!(out[0].starts_with("ip daddr @peer/") && out[0].ends_with(" return"));
    }

    #[test]
    fn full_script_declares_before_use() {
        let rs = compile_with(&pods(), &policies(DENY_X), "n1");
        let f = full(&rs);
        assert!(f.starts_with("add table ip flannel-policy\ndelete table ip flannel-policy\n"));
        let chain_name = &rs.ingress[&IpAddr::from([10, 5, 1, 2])];
        let chain = f.find(&format!("chain {chain_name} {{")).unwrap();
        let map = f.find("map ingress").unwrap();
        let base = f.find("chain forward").unwrap();
        let hairpin = f.find("set hairpin").unwrap();
        assert!(hairpin < chain && chain < map && map < base, "{f}");
        assert!(f.contains(&format!(
            "elements = {{ 10.5.1.2 : jump {chain_name}, 10.5.1.3 : jump {chain_name} }}"
        )));
    }

    #[test]
    fn diffs_are_proportional_to_the_change() {
        let nps = policies(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-b}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]
",
        );
        let mut ps = pods();
        let before = compile_with(&ps, &nps, "n1");
        assert_eq!(diff(&before, &before), None);
        let (peer, _) = only(&before, SetType::Addrs);
        let chain = before.ingress[&IpAddr::from([10, 5, 1, 2])].clone();
        // A pod of another node gains the label: one element, nothing else.
        ps[3].labels.insert("role".into(), "client".into());
        let after = compile_with(&ps, &nps, "n1");
        assert_eq!(
            diff(&before, &after).unwrap(),
            format!("add element ip flannel-policy {peer} {{ 10.5.2.2 }}\n")
        );
        // The selected pod goes: its map element, its chain, the unused set, its pair.
        let gone = compile_with(&ps[1..], &nps, "n1");
        assert_eq!(
            diff(&after, &gone).unwrap(),
            format!(
                "delete element ip flannel-policy ingress {{ 10.5.1.2 }}\n\
                 flush chain ip flannel-policy {chain}\n\
                 delete chain ip flannel-policy {chain}\n\
                 delete element ip flannel-policy hairpin {{ 10.5.1.2 . 10.5.1.2 }}\n\
                 delete set ip flannel-policy {peer}\n"
            )
        );
        // And back: set, chain, rules, then the map element that jumps to it.
        let back = diff(&gone, &after).unwrap();
        let lines: Vec<&str> = back.lines().collect();
        assert_eq!(
            lines[0],
            "add element ip flannel-policy hairpin { 10.5.1.2 . 10.5.1.2 }"
        );
        assert_eq!(
            lines[1],
            format!("add set ip flannel-policy {peer} {{ type ipv4_addr; flags interval; }}")
        );
        assert_eq!(
            lines[2],
            format!("add element ip flannel-policy {peer} {{ 10.5.2.2 }}")
        );
        assert_eq!(lines[3], format!("add chain ip flannel-policy {chain}"));
        assert_eq!(
            lines.last().unwrap(),
            &format!("add element ip flannel-policy ingress {{ 10.5.1.2 : jump {chain} }}")
        );
    }

    /// A fixture with every kind of peer, port and policy type, compiled for two nodes and
    /// changed once: the IPv4 table's scripts (full and diffs) as they were before IPv6.
    fn golden_scripts(dual: bool) -> String {
        let mut nps = policies(GOLDEN_POLICIES);
        let mut ps = pods();
        if dual {
            // IPv6 addresses on every pod and IPv6 blocks beside the IPv4 ones change
            // nothing in the IPv4 table.
            for (i, p) in ps.iter_mut().enumerate() {
                p.ips.push(format!("fd10::{:x}", i + 2).parse().unwrap());
            }
            let v6 = policies(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 'fd10::/64', except: ['fd10::2/128']}}]}]\n",
            );
            let peer = v6[0].spec.ingress[0].from[0].clone();
            nps[0].spec.ingress[0].from.insert(1, peer.clone());
            nps[0].spec.egress[0].to.push(peer);
        }
        let mut out = String::new();
        let mut last = None;
        for node in ["n1", "n2"] {
            let rs = compile_with(&ps, &nps, node);
            out += &full(&rs);
            if let Some(old) = &last {
                out += &diff(old, &rs).unwrap_or_default();
            }
            last = Some(rs);
        }
        ps[3].labels.insert("pod".into(), "b".into());
        ps.remove(0);
        let rs = compile_with(&ps, &nps, "n1");
        out += &diff(last.as_ref().unwrap(), &rs).unwrap_or_default();
        out += &diff(&rs, &compile_with(&ps, &nps[1..], "n1")).unwrap_or_default();
        out += &cleanup_table(Family::Ip);
        out
    }

    const GOLDEN_POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - namespaceSelector: {matchLabels: {team: blue}}
      podSelector: {matchLabels: {pod: a}}
    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}
    ports: [{port: 80}, {port: 81, endPort: 90}, {port: 85}, {protocol: UDP}, {port: http}]
  - {}
  egress:
  - to: [{ipBlock: {cidr: 10.5.0.0/16, except: [10.5.2.0/24]}}, {namespaceSelector: {}}]
    ports: [{port: http, protocol: TCP}, {port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-peer, namespace: 'y'}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}, {port: 81, endPort: 90}, {protocol: UDP}]}]
";

    #[test]
    fn ipv4_scripts_are_unchanged() {
        let got = golden_scripts(false);
        if std::env::var_os("POLICY_WRITE_GOLDEN").is_some() {
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/ipv4-golden.nft"),
                &got,
            )
            .unwrap();
        }
        assert_eq!(got, include_str!("testdata/ipv4-golden.nft"));
        assert_eq!(golden_scripts(true), got, "dual-stack pods, IPv6 blocks");
    }

    fn dual_pods() -> Vec<PodView> {
        let mut ps = pods();
        for (i, p) in ps.iter_mut().enumerate() {
            let node = if p.node == "n1" { 1 } else { 2 };
            p.ips
                .push(format!("fd10:0:0:{node}::{:x}", i + 2).parse().unwrap());
        }
        // y/b (n2) is IPv6 only.
        ps[4].ips.remove(0);
        ps
    }

    const MIXED: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - ipBlock: {cidr: 10.5.0.0/16}
    - ipBlock: {cidr: 'fd10::/48', except: ['fd10:0:0:2::/64', 'fd10:0:0:1::8/125']}
    ports: [{port: 80}, {port: http}]
  egress:
  - to: [{ipBlock: {cidr: 192.0.2.0/24}}]
";

    #[test]
    fn the_ipv6_table_has_the_same_structure_over_ipv6_addresses() {
        let ps = dual_pods();
        let nps = policies(MIXED);
        let refs: Vec<&NetworkPolicy> = nps.iter().collect();
        let namespaces = BTreeMap::new();
        let input = Input {
            namespaces: &namespaces,
            policies: &refs,
            cluster_policies: &[],
            pods: &ps,
            node: "n1",
        };
        let rs = compile_family(input, Family::Ip6);
        assert_eq!(rs.family, Family::Ip6);
        let xa: IpAddr = "fd10:0:0:1::2".parse().unwrap();
        assert_eq!(rs.ingress.keys().collect::<Vec<_>>(), [&xa]);
        assert_eq!(rs.egress.keys().collect::<Vec<_>>(), [&xa]);
        let peers: BTreeMap<Vec<&str>, &String> = rs
            .sets
            .iter()
            .filter(|(_, s)| s.ty == SetType::Addrs)
            .map(|(n, s)| (s.elements.iter().map(String::as_str).collect(), n))
            .collect();
        // x/b by selector (its IPv6 address); the IPv6 block minus its excepts; no set for
        // the IPv4 blocks.
        assert_eq!(
            peers.keys().cloned().collect::<Vec<_>>(),
            [
                // (string order)
                vec![
                    "fd10:0:0:1::10-fd10::1:ffff:ffff:ffff:ffff",
                    "fd10:0:0:3::-fd10::ffff:ffff:ffff:ffff:ffff",
                    "fd10::-fd10:0:0:1::7",
                ],
                vec!["fd10:0:0:1::3"],
            ]
        );
        let (named, elements) = only(&rs, SetType::Named);
        assert_eq!(
            elements,
            [
                "fd10:0:0:1::2 . tcp . 8080",
                "fd10:0:0:1::3 . tcp . 8080",
                "fd10:0:0:1::4 . tcp . 8080",
                "fd10:0:0:2::5 . tcp . 8080",
                "fd10:0:0:2::6 . tcp . 8080"
            ]
        );
        let b = peers[&vec!["fd10:0:0:1::3"]];
        let (ports, _) = only(&rs, SetType::Ports);
        let chain = &rs.chains[&rs.ingress[&xa]];
        let block = peers.values().find(|n| *n != &b).unwrap();
        assert_eq!(
            chain,
            &[
                format!("ip6 saddr @{b} meta l4proto . th dport @{ports} return"),
                format!("meta l4proto tcp ip6 saddr @{b} ip6 daddr . meta l4proto . th dport @{named} return"),
                format!("ip6 saddr @{block} meta l4proto . th dport @{ports} return"),
                format!("meta l4proto tcp ip6 saddr @{block} ip6 daddr . meta l4proto . th dport @{named} return"),
                REJECT[0].to_string(),
                "reject with icmpv6 type admin-prohibited".to_string(),
            ]
        );
        // The egress rule's only peer is an IPv4 block: over IPv6 x/a allows nothing out.
        assert_eq!(
            rs.chains[&rs.egress[&xa]][1],
            "reject with icmpv6 type admin-prohibited"
        );
        assert_eq!(rs.chains[&rs.egress[&xa]].len(), 2);
        let (_, pairs) = only(&rs, SetType::Pairs);
        assert_eq!(pairs, ["fd10:0:0:1::2 . fd10:0:0:1::2"]);

        let f = full(&rs);
        assert!(f.starts_with("add table ip6 flannel-policy\ndelete table ip6 flannel-policy\ntable ip6 flannel-policy {\n"), "{f}");
        assert!(
            f.contains("    type ipv6_addr\n    flags interval\n"),
            "{f}"
        );
        assert!(
            f.contains("    type ipv6_addr . inet_proto . inet_service\n"),
            "{f}"
        );
        assert!(f.contains("    type ipv6_addr . ipv6_addr\n"), "{f}");
        assert!(
            f.contains("  map ingress {\n    type ipv6_addr : verdict\n"),
            "{f}"
        );
        assert!(f.ends_with(&format!("{BASE_CHAINS6}}}\n")), "{f}");
        assert!(
            !f.contains(" ip saddr") && !f.contains("ipv4_addr") && !f.contains("icmp type"),
            "{f}"
        );

        // The IPv4 table of the same objects: the IPv6-only pod is not in it, the IPv6
        // block has no set.
        let rs4 = compile_family(input, Family::Ip);
        assert_eq!(rs4, compile(input));
        let peers4: Vec<Vec<&str>> = rs4
            .sets
            .values()
            .filter(|s| s.ty == SetType::Addrs)
            .map(|s| s.elements.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(peers4.len(), 3, "{peers4:?}");
        assert!(!full(&rs4).contains("fd10"));
        let (_, named4) = only(&rs4, SetType::Named);
        assert_eq!(named4.len(), 4, "y/b has no IPv4 address");

        // A diff in the ip6 table names it.
        let mut ps2 = ps.clone();
        ps2[1].labels.insert("pod".into(), "c".into());
        let after = compile_family(
            Input {
                pods: &ps2,
                ..input
            },
            Family::Ip6,
        );
        assert_eq!(
            diff(&rs, &after).unwrap(),
            format!("delete element ip6 flannel-policy {b} {{ fd10:0:0:1::3 }}\n")
        );
    }

    #[test]
    fn ipv6_ranges_render_as_nft_takes_them() {
        let r = |s: &str| {
            let n: IpNet = s.parse().unwrap();
            net_range(n)
        };
        assert_eq!(render_range(Family::Ip6, r("::/0")), "::/0");
        assert_eq!(render_range(Family::Ip6, r("fd10::/48")), "fd10::/48");
        assert_eq!(render_range(Family::Ip6, r("fd10::1/128")), "fd10::1");
        let v: Vec<String> = block_ranges(
            Family::Ip6,
            "::/0",
            &["fd00::/8".into(), "10.0.0.0/8".into()],
        )
        .into_iter()
        .map(|x| render_range(Family::Ip6, x))
        .collect();
        assert_eq!(
            v,
            ["::-fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe00::/7"]
        );
        assert!(block_ranges(Family::Ip6, "10.0.0.0/8", &[]).is_empty());
        assert!(block_ranges(Family::Ip, "fd10::/64", &[]).is_empty());
        assert_eq!(
            cleanup(),
            "add table ip flannel-policy\ndelete table ip flannel-policy\nadd table ip6 flannel-policy\ndelete table ip6 flannel-policy\n"
        );
    }

    #[test]
    fn names_are_stable_hashes_and_collisions_are_salted() {
        let mut n = Names::default();
        let a = n.name("peer", "pods all in namespace x");
        assert_eq!(a, n.name("peer", "pods all in namespace x"));
        assert_eq!(a.len(), "peer/".len() + 16);
        assert_ne!(a, n.name("peer", "pods all in namespace y"));
        // Force a collision: a name taken by another key is salted.
        let taken = n.name("peer", "k1");
        n.used.insert(taken.clone(), "someone else".into());
        let salted = n.name("peer", "k1");
        assert_ne!(salted, taken);
        assert_eq!(salted, n.name("peer", "k1"), "stable once salted");
    }

    fn cluster_policies(yaml: &str) -> Vec<ClusterNetworkPolicy> {
        registry::parse_documents(yaml)
            .unwrap()
            .into_iter()
            .map(|o| match o {
                Object::ClusterNetworkPolicy(p) => p,
                other => panic!("not a cluster policy: {other:?}"),
            })
            .collect()
    }

    const TIERS: &str = "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  ingress:
  - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}}]}
  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}, {destinationNamedPort: http}]}
  - {action: Accept, from: [{namespaces: {}}]}
  egress:
  - {action: Deny, to: [{networks: [192.0.2.0/24, '2001:db8::/32']}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  priority: 1000
  subject: {namespaces: {}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}]}
";

    #[test]
    fn tiers_wrap_the_network_policy_chains() {
        let nps = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-only, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {}}]}]\n",
        );
        let cnps = cluster_policies(TIERS);
        let refs: Vec<&NetworkPolicy> = nps.iter().collect();
        let crefs: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
        let namespaces = BTreeMap::new();
        let ps = pods();
        let rs = compile(Input {
            namespaces: &namespaces,
            policies: &refs,
            cluster_policies: &crefs,
            pods: &ps,
            node: "n1",
        });
        let chain = |ip: [u8; 4], map: &BTreeMap<IpAddr, String>| {
            let name = map[&IpAddr::from(ip)].clone();
            (name.clone(), rs.chains[&name].clone())
        };
        // x/a: Admin chain, then (Pass, or no Admin rule matched) its NetworkPolicy chain.
        let (admin_in, rules) = chain([10, 5, 1, 2], &rs.ingress);
        assert!(admin_in.starts_with("ain/"), "{admin_in}");
        let np = rules
            .last()
            .unwrap()
            .strip_prefix("goto ")
            .unwrap()
            .to_string();
        assert!(np.starts_with("in/"), "{np}");
        assert!(
            rules[0].starts_with("ip saddr @peer/") && rules[0].ends_with(&format!(" goto {np}"))
        );
        assert!(
            rules[1].contains("meta l4proto . th dport @ports/") && rules[1].ends_with(" drop")
        );
        assert!(
            rules[2].contains("ip daddr . meta l4proto . th dport @named/")
                && rules[2].ends_with(" drop")
        );
        assert!(
            !rules[2].starts_with("meta l4proto tcp"),
            "a named port of any protocol"
        );
        assert!(rules[3].ends_with(" return"));
        assert_eq!(rules.len(), 5);
        assert_eq!(
            rs.chains[&np].last().unwrap(),
            "reject with icmp type admin-prohibited"
        );
        // x/b: no NetworkPolicy, so the Admin chain goes on to the Baseline chain.
        let (_, rules) = chain([10, 5, 1, 3], &rs.ingress);
        let base = rules.last().unwrap().strip_prefix("goto ").unwrap();
        assert!(base.starts_with("bin/"), "{base}");
        assert_eq!(rs.chains[base].len(), 1);
        assert!(rs.chains[base][0].ends_with(" drop"));
        // Egress: the IPv4 network only in the ip table; no rest: the chain ends.
        let (name, rules) = chain([10, 5, 1, 2], &rs.egress);
        assert!(name.starts_with("aout/"));
        assert_eq!(rules.len(), 1, "{rules:?}");
        let set = rules[0].split(' ').nth(2).unwrap().trim_start_matches('@');
        assert_eq!(
            rs.sets[set].elements.iter().cloned().collect::<Vec<_>>(),
            ["192.0.2.0/24"]
        );
        // Pods of other namespaces only have the baseline; all of them are hairpin pods.
        let y = pods()
            .into_iter()
            .find(|p| p.namespace != "x" && p.node == "n1");
        if let Some(y) = y {
            let a = y.addr(Family::Ip).unwrap();
            assert!(rs.ingress[&a].starts_with("bin/"));
            assert!(!rs.egress.contains_key(&a));
        }
        // The full script writes chains that goto after those they name, and a diff from
        // nothing creates every chain before any rule.
        let script = full(&rs);
        let pos = |needle: &str| script.find(needle).unwrap();
        assert!(pos(&format!("chain {np} {{")) < pos(&format!("chain {admin_in} {{")));
        let d = diff(&Ruleset::empty(Family::Ip), &rs).unwrap();
        let last_add_chain = d.rfind("add chain ").unwrap();
        let first_rule = d.find("add rule ").unwrap();
        assert!(last_add_chain < first_rule, "{d}");
        let back = diff(&rs, &Ruleset::empty(Family::Ip)).unwrap();
        assert!(back.rfind("flush chain ").unwrap() < back.find("delete chain ").unwrap());
    }

    #[test]
    fn a_line_shadowed_by_an_earlier_identical_match_is_left_out() {
        // Admin: `first` (Deny from namespace y, priority 1) shadows `second`'s Accept from
        // the same peer (priority 2) but not its Accept from namespace x; Baseline likewise.
        let cnp = |name: &str, tier: &str, priority: u32, rules: &str| {
            format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}\n  ingress:\n{rules}---\n"
            )
        };
        let from = |action: &str, ns: &str| {
            format!("  - {{action: {action}, from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: '{ns}'}}}}}}]}}\n")
        };
        let yaml = [
            cnp("first", "Admin", 1, &from("Deny", "y")),
            cnp(
                "second",
                "Admin",
                2,
                &(from("Accept", "y") + &from("Accept", "x")),
            ),
            cnp("third", "Baseline", 1, &from("Accept", "y")),
            cnp(
                "fourth",
                "Baseline",
                2,
                &(from("Deny", "y") + &from("Deny", "x")),
            ),
        ]
        .concat();
        let cnps = cluster_policies(&yaml);
        let crefs: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
        let namespaces = BTreeMap::new();
        let ps = pods();
        let rs = compile(Input {
            namespaces: &namespaces,
            policies: &[],
            cluster_policies: &crefs,
            pods: &ps,
            node: "n1",
        });
        let admin = &rs.chains[&rs.ingress[&IpAddr::from([10, 5, 1, 2])]];
        let peer = |rule: &str| rule.split(' ').nth(2).unwrap().to_string();
        assert_eq!(admin.len(), 3, "{admin:?}");
        assert!(admin[0].ends_with(" drop"), "{admin:?}");
        assert!(admin[1].ends_with(" return"), "{admin:?}");
        assert_ne!(peer(&admin[0]), peer(&admin[1]));
        let base = admin[2].strip_prefix("goto ").unwrap();
        let base = &rs.chains[base];
        assert_eq!(base.len(), 2, "{base:?}");
        assert_eq!(peer(&base[0]), peer(&admin[0]));
        assert!(base[0].ends_with(" return"), "{base:?}");
        assert!(base[1].ends_with(" drop"), "{base:?}");
        assert_eq!(peer(&base[1]), peer(&admin[1]));
    }

    #[test]
    fn the_table_does_not_grow_with_policies_that_select_no_local_pod() {
        let cnps = cluster_policies(TIERS);
        let mut more = cnps.clone();
        for i in 0..200 {
            more.extend(cluster_policies(&format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: other-{i}}}\nspec:\n  tier: Admin\n  priority: {}\n  subject: {{namespaces: {{matchLabels: {{tenant: t{i}}}}}}}\n  ingress: [{{action: Deny, from: [{{namespaces: {{matchLabels: {{tenant: t{i}}}}}}}]}}]\n",
                i % 1000
            )));
        }
        let namespaces = BTreeMap::new();
        let ps = pods();
        let table = |cnps: &[ClusterNetworkPolicy]| {
            let crefs: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
            compile(Input {
                namespaces: &namespaces,
                policies: &[],
                cluster_policies: &crefs,
                pods: &ps,
                node: "n1",
            })
        };
        let (few, many) = (table(&cnps), table(&more));
        assert_eq!(few.ingress, many.ingress, "same chains for every pod");
        assert_eq!(
            few.sets, many.sets,
            "no set for a policy that selects no local pod"
        );
        assert_eq!(few.egress, many.egress);
        for name in few.ingress.values().chain(few.egress.values()) {
            assert_eq!(few.chains[name], many.chains[name]);
        }
    }
}
