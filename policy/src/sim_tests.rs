//! The compiled tables against the evaluator: a small interpreter runs a connection's first
//! packet through the forward chain of each node it crosses (the rules `compile` writes, read
//! back from the text), and random clusters of IPv4-only, IPv6-only and dual-stack pods with
//! random policies must give the evaluator's answer for every pair, family, protocol and port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use registry::{ClusterNetworkPolicy, Labels, NetworkPolicy, Object, Protocol};

use crate::compile::{compile_family, Input, Ruleset, SetType};
use crate::eval::{Cluster, Family, NamedPort, Peer, PodView};

fn to_int(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// An address element of a set: `a`, `a/len` or `a-b`.
fn addr_range(e: &str) -> (IpAddr, IpAddr) {
    if let Some((lo, hi)) = e.split_once('-') {
        return (lo.parse().unwrap(), hi.parse().unwrap());
    }
    if e.contains('/') {
        let n: IpNet = e.parse().unwrap();
        return (n.network(), n.broadcast());
    }
    let a: IpAddr = e.parse().unwrap();
    (a, a)
}

fn in_range(a: IpAddr, (lo, hi): (IpAddr, IpAddr)) -> bool {
    lo.is_ipv4() == a.is_ipv4() && to_int(lo) <= to_int(a) && to_int(a) <= to_int(hi)
}

fn port_range(e: &str) -> (u16, u16) {
    match e.split_once('-') {
        Some((lo, hi)) => (lo.parse().unwrap(), hi.parse().unwrap()),
        None => (e.parse().unwrap(), e.parse().unwrap()),
    }
}

/// One new connection's first packet.
#[derive(Debug, Clone, Copy)]
struct Packet {
    saddr: IpAddr,
    daddr: IpAddr,
    proto: Protocol,
    port: u16,
}

fn in_set(rs: &Ruleset, name: &str, p: &Packet, field: Option<IpAddr>) -> bool {
    let set = rs.sets.get(name).unwrap_or_else(|| panic!("no set {name}"));
    set.elements.iter().any(|e| {
        let parts: Vec<&str> = e.split(" . ").collect();
        match set.ty {
            SetType::Addrs => in_range(field.unwrap(), addr_range(e)),
            SetType::Ports => {
                let (lo, hi) = port_range(parts[1]);
                parts[0] == p.proto.nft() && lo <= p.port && p.port <= hi
            }
            SetType::Named => {
                parts[0].parse::<IpAddr>().unwrap() == p.daddr
                    && parts[1] == p.proto.nft()
                    && parts[2].parse::<u16>().unwrap() == p.port
            }
            SetType::Pairs => {
                parts[0].parse::<IpAddr>().unwrap() == p.saddr
                    && parts[1].parse::<IpAddr>().unwrap() == p.daddr
            }
        }
    })
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Return,
    Reject,
    Drop,
    Goto(String),
}

/// The verdict of one rule, when all its matches hold (the grammar `compile` writes).
fn rule(rs: &Ruleset, text: &str, p: &Packet) -> Option<Verdict> {
    let fam = rs.family.as_str();
    let t: Vec<&str> = text.split(' ').collect();
    let mut i = 0;
    while i < t.len() {
        let rest = &t[i..];
        match rest {
            ["return"] => return Some(Verdict::Return),
            ["drop"] => return Some(Verdict::Drop),
            ["goto", chain] => return Some(Verdict::Goto(chain.to_string())),
            ["reject", ..] => return Some(Verdict::Reject),
            ["meta", "l4proto", "tcp", "ct", "status", "!", "dnat", "reject", ..] => {
                // No connection here is DNATed.
                return (p.proto == Protocol::Tcp).then_some(Verdict::Reject);
            }
            [f, "daddr", ".", "meta", "l4proto", ".", "th", "dport", set, ..] if *f == fam => {
                if !in_set(rs, &set[1..], p, None) {
                    return None;
                }
                i += 9;
            }
            [f, field @ ("saddr" | "daddr"), set, ..] if *f == fam => {
                let a = if *field == "saddr" { p.saddr } else { p.daddr };
                if !in_set(rs, &set[1..], p, Some(a)) {
                    return None;
                }
                i += 3;
            }
            ["meta", "l4proto", ".", "th", "dport", set, ..] => {
                if !in_set(rs, &set[1..], p, None) {
                    return None;
                }
                i += 6;
            }
            ["meta", "l4proto", proto, ..] => {
                if *proto != p.proto.nft() {
                    return None;
                }
                i += 3;
            }
            _ => panic!("rule the interpreter does not know: {text:?} at {rest:?}"),
        }
    }
    panic!("rule without a verdict: {text:?}")
}

/// A chain's outcome for the packet: the first rule that decides; `goto` continues in the
/// named chain (whose `return` goes back to `forward`); falling off the end returns.
fn run_chain(rs: &Ruleset, name: &str, p: &Packet) -> Verdict {
    let rules = rs
        .chains
        .get(name)
        .unwrap_or_else(|| panic!("no chain {name}"));
    for r in rules {
        match rule(rs, r, p) {
            None => continue,
            Some(Verdict::Goto(next)) => return run_chain(rs, &next, p),
            Some(v) => return v,
        }
    }
    Verdict::Return
}

/// How the first packet leaves the table's forward chain (the base chain's steps after
/// `ct state`: hairpin, egress map, ingress map; every pod address is global).
fn forward(rs: &Ruleset, p: &Packet) -> crate::eval::Verdict {
    use crate::eval::Verdict as V;
    if in_set(rs, "hairpin", p, None) {
        return V::Allow;
    }
    for chain in [rs.egress.get(&p.saddr), rs.ingress.get(&p.daddr)]
        .into_iter()
        .flatten()
    {
        match run_chain(rs, chain, p) {
            Verdict::Return => {}
            Verdict::Reject => return V::Reject,
            Verdict::Drop => return V::Drop,
            Verdict::Goto(_) => unreachable!("run_chain follows goto"),
        }
    }
    V::Allow
}

/// A connection between pods: the source's node, then the destination's when it is another.
fn pod_to_pod(
    tables: &BTreeMap<(&'static str, Family), Ruleset>,
    family: Family,
    a: &PodView,
    b: &PodView,
    p: &Packet,
) -> crate::eval::Verdict {
    let first = forward(&tables[&(a.node.as_str(), family)], p);
    if first != crate::eval::Verdict::Allow || a.node == b.node {
        return first;
    }
    forward(&tables[&(b.node.as_str(), family)], p)
}

/// xorshift64*: deterministic, so a failing seed reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const NODES: [&str; 2] = ["n0", "n1"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn random_pods(r: &mut Rng) -> Vec<PodView> {
    let mut pods = Vec::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for i in 0..3 {
            let node = r.below(NODES.len());
            let host = n * 3 + i + 2;
            let v4: IpAddr = format!("10.5.{node}.{host}").parse().unwrap();
            let v6: IpAddr = format!("fd10:0:0:{node}::{host:x}").parse().unwrap();
            let ips = match r.below(4) {
                0 => vec![v4],
                1 => vec![v6],
                _ => vec![v4, v6],
            };
            let mut ports = vec![];
            if r.below(2) == 0 {
                ports.push(NamedPort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                });
            }
            pods.push(PodView {
                namespace: ns.to_string(),
                name: format!("p{i}"),
                labels: labels(&[
                    ("app", ["a", "b"][r.below(2)]),
                    ("tier", ["f", "b"][r.below(2)]),
                ]),
                ips,
                node: NODES[node].to_string(),
                ports,
            });
        }
    }
    pods
}

const SELECTORS: [&str; 4] = [
    "{}",
    "{matchLabels: {app: a}}",
    "{matchLabels: {tier: b}}",
    "{matchExpressions: [{key: app, operator: NotIn, values: [b]}]}",
];
const NS_SELECTORS: [&str; 3] = [
    "{}",
    "{matchLabels: {team: blue}}",
    "{matchLabels: {kubernetes.io/metadata.name: z}}",
];
const BLOCKS: [&str; 7] = [
    "{cidr: 10.5.0.0/16, except: [10.5.1.0/24]}",
    "{cidr: 10.5.1.0/24}",
    "{cidr: 'fd10::/48', except: ['fd10:0:0:1::/64']}",
    "{cidr: 'fd10:0:0:1::/64', except: ['fd10:0:0:1::8/126']}",
    "{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}",
    "{cidr: '2001:db8::/32', except: ['2001:db8::/120']}",
    "{cidr: '::/0', except: ['fd10::/16']}",
];
const PORTS: [&str; 6] = [
    "",
    "ports: [{port: 80}]",
    "ports: [{port: 81, protocol: UDP}]",
    "ports: [{port: 79, endPort: 85}]",
    "ports: [{port: http}]",
    "ports: [{protocol: UDP}, {port: http}]",
];

fn random_peer(r: &mut Rng) -> String {
    match r.below(4) {
        0 => format!("{{podSelector: {}}}", r.pick(&SELECTORS)),
        1 => format!("{{namespaceSelector: {}}}", r.pick(&NS_SELECTORS)),
        2 => format!(
            "{{namespaceSelector: {}, podSelector: {}}}",
            r.pick(&NS_SELECTORS),
            r.pick(&SELECTORS)
        ),
        _ => format!("{{ipBlock: {}}}", r.pick(&BLOCKS)),
    }
}

fn random_rules(r: &mut Rng, peers_key: &str) -> String {
    let mut s = String::new();
    for _ in 0..r.below(3) {
        let peers: Vec<String> = (0..r.below(3)).map(|_| random_peer(r)).collect();
        s += &format!(
            "  - {{{peers_key}: [{}], {}}}\n",
            peers.join(", "),
            r.pick(&PORTS)
        );
    }
    s
}

fn random_policies(r: &mut Rng) -> Vec<NetworkPolicy> {
    let mut yaml = String::new();
    for i in 0..1 + r.below(4) {
        let ns = r.pick(&NAMESPACES);
        yaml += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: '{ns}'}}\nspec:\n  podSelector: {}\n",
            r.pick(&SELECTORS)
        );
        match r.below(4) {
            0 => yaml += "  policyTypes: [Ingress]\n",
            1 => yaml += "  policyTypes: [Egress]\n",
            2 => yaml += "  policyTypes: [Ingress, Egress]\n",
            _ => {}
        }
        let ingress = random_rules(r, "from");
        if !ingress.is_empty() {
            yaml += &format!("  ingress:\n{ingress}");
        }
        let egress = random_rules(r, "to");
        if !egress.is_empty() {
            yaml += &format!("  egress:\n{egress}");
        }
    }
    registry::parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("{e:?}\n{yaml}"))
        .into_iter()
        .map(|o| match o {
            Object::NetworkPolicy(np) => {
                let net: ipnet::Ipv4Net = "10.96.0.0/12".parse().unwrap();
                registry::validate::validate(&Object::NetworkPolicy(np.clone()), net)
                    .unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
                np
            }
            other => panic!("not a policy: {other:?}"),
        })
        .collect()
}

const CNP_PEERS: [&str; 8] = [
    "{namespaces: {}}",
    "{namespaces: {matchLabels: {team: blue}}}",
    "{namespaces: {matchLabels: {kubernetes.io/metadata.name: z}}}",
    "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}",
    "{pods: {namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {tier: b}}}}",
    "{pods: {podSelector: {}}}",
    "{networks: [10.5.1.0/24, 'fd10:0:0:1::/64']}",
    "{networks: [192.0.2.0/25, '2001:db8::/120']}",
];
const CNP_PROTOCOLS: [&str; 6] = [
    "",
    ", protocols: [{tcp: {destinationPort: {number: 80}}}]",
    ", protocols: [{udp: {destinationPort: {number: 81}}}]",
    ", protocols: [{tcp: {destinationPort: {range: {start: 79, end: 85}}}}]",
    ", protocols: [{destinationNamedPort: http}]",
    ", protocols: [{sctp: {destinationPort: {number: 80}}}, {destinationNamedPort: http}]",
];
const CNP_SUBJECTS: [&str; 4] = [
    "{namespaces: {}}",
    "{namespaces: {matchLabels: {team: blue}}}",
    "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}",
    "{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {tier: f}}}}",
];

fn random_cnp_rules(r: &mut Rng, peers_key: &str, egress: bool) -> String {
    let mut s = String::new();
    for _ in 0..r.below(4) {
        let peers: Vec<&str> = (0..1 + r.below(2))
            .map(|_| {
                // Ingress peers have no networks.
                let n = if egress {
                    CNP_PEERS.len()
                } else {
                    CNP_PEERS.len() - 2
                };
                CNP_PEERS[r.below(n)]
            })
            .collect();
        s += &format!(
            "  - {{action: {}, {peers_key}: [{}]{}}}\n",
            r.pick(&["Accept", "Deny", "Pass"]),
            peers.join(", "),
            r.pick(&CNP_PROTOCOLS)
        );
    }
    s
}

fn random_cluster_policies(r: &mut Rng) -> Vec<ClusterNetworkPolicy> {
    let mut yaml = String::new();
    for i in 0..1 + r.below(4) {
        yaml += &format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: c{i}}}\nspec:\n  tier: {}\n  priority: {}\n  subject: {}\n",
            r.pick(&["Admin", "Baseline"]),
            // Few values, so that ties (ordered by name) happen.
            r.below(3),
            r.pick(&CNP_SUBJECTS)
        );
        let ingress = random_cnp_rules(r, "from", false);
        if !ingress.is_empty() {
            yaml += &format!("  ingress:\n{ingress}");
        }
        let egress = random_cnp_rules(r, "to", true);
        if !egress.is_empty() {
            yaml += &format!("  egress:\n{egress}");
        }
    }
    registry::parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("{e:?}\n{yaml}"))
        .into_iter()
        .map(|o| match o {
            Object::ClusterNetworkPolicy(p) => {
                let net: ipnet::Ipv4Net = "10.96.0.0/12".parse().unwrap();
                registry::validate::validate(&Object::ClusterNetworkPolicy(p.clone()), net)
                    .unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
                p
            }
            other => panic!("not a cluster policy: {other:?}"),
        })
        .collect()
}

/// A random cluster: pods, namespace `y` labelled `team=blue`, random NetworkPolicies (none
/// in about a third of the clusters when `sometimes_none`) and, with `tiers`, random
/// ClusterNetworkPolicies.
fn random_cluster(r: &mut Rng, tiers: bool, sometimes_none: bool) -> (Vec<PodView>, Cluster) {
    let pods = random_pods(r);
    let policies = if sometimes_none && r.below(3) == 0 {
        Vec::new()
    } else {
        random_policies(r)
    };
    let cluster_policies = if tiers {
        random_cluster_policies(r)
    } else {
        Vec::new()
    };
    let mut namespaces = BTreeMap::new();
    namespaces.insert("y".to_string(), labels(&[("team", "blue")]));
    let cluster = Cluster {
        namespaces,
        policies,
        cluster_policies,
    };
    (pods, cluster)
}

/// Every node's table of every family.
fn tables(cluster: &Cluster, pods: &[PodView]) -> BTreeMap<(&'static str, Family), Ruleset> {
    let refs: Vec<&NetworkPolicy> = cluster.policies.iter().collect();
    let crefs: Vec<&ClusterNetworkPolicy> = cluster.cluster_policies.iter().collect();
    let mut out = BTreeMap::new();
    for node in NODES {
        for family in [Family::Ip, Family::Ip6] {
            let input = Input {
                namespaces: &cluster.namespaces,
                policies: &refs,
                cluster_policies: &crefs,
                pods,
                node,
            };
            out.insert((node, family), compile_family(input, family));
        }
    }
    out
}

const PROBES: [(Protocol, u16); 4] = [
    (Protocol::Tcp, 80),
    (Protocol::Udp, 81),
    (Protocol::Tcp, 85),
    (Protocol::Sctp, 80),
];

#[test]
fn compiled_tables_agree_with_the_evaluator_in_both_families() {
    let (compared, denied) = agree(300, false);
    // The generator must exercise both families and both answers.
    assert!(compared[0] > 10_000 && compared[1] > 10_000, "{compared:?}");
    assert!(denied[0] > 1000, "{denied:?}");
}

#[test]
fn compiled_tiers_agree_with_the_evaluator() {
    let (compared, denied) = agree(300, true);
    assert!(compared[0] > 10_000 && compared[1] > 10_000, "{compared:?}");
    // Rejected (NetworkPolicy) and dropped (ClusterNetworkPolicy Deny) both occur.
    assert!(denied[0] > 1000 && denied[1] > 1000, "{denied:?}");
}

/// Compares every pair, host, family and probe of `seeds` random clusters (with random
/// ClusterNetworkPolicies when `tiers`); returns the comparisons per family and the
/// rejected / dropped counts.
fn agree(seeds: u64, tiers: bool) -> ([usize; 2], [usize; 2]) {
    let mut compared = [0usize; 2];
    let mut denied = [0usize; 2];
    for seed in 1..=seeds {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (pods, cluster) = random_cluster(&mut r, tiers, tiers);
        let tables = tables(&cluster, &pods);
        let hosts: Vec<IpAddr> = ["192.0.2.7", "192.0.2.200", "2001:db8::5", "2001:db8::1:5"]
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
        for (fi, family) in [Family::Ip, Family::Ip6].into_iter().enumerate() {
            let of_family = |a: &IpAddr| crate::eval::family_of(*a) == family;
            for (proto, port) in PROBES {
                // Pod to pod: the source's node, then the destination's when it is another.
                for a in &pods {
                    for b in &pods {
                        let (Some(sa), Some(sb)) = (a.addr(family), b.addr(family)) else {
                            continue;
                        };
                        if a == b {
                            continue;
                        }
                        let p = Packet {
                            saddr: sa,
                            daddr: sb,
                            proto,
                            port,
                        };
                        let got = pod_to_pod(&tables, family, a, b, &p);
                        let want = cluster.verdict(family, Peer::Pod(a), Peer::Pod(b), proto, port);
                        assert_eq!(
                            got, want,
                            "seed {seed} {family} {}/{} -> {}/{} {proto:?} {port}\n{:#?}\n{:#?}\n{:#?}",
                            a.namespace, a.name, b.namespace, b.name, cluster.policies, cluster.cluster_policies, pods
                        );
                        compared[fi] += 1;
                        match want {
                            crate::eval::Verdict::Allow => {}
                            crate::eval::Verdict::Reject => denied[0] += 1,
                            crate::eval::Verdict::Drop => denied[1] += 1,
                        }
                    }
                }
                // Outside hosts to pods and back (each end at its pod's node only).
                for h in hosts.iter().filter(|h| of_family(h)) {
                    for b in &pods {
                        let Some(sb) = b.addr(family) else { continue };
                        let host = Peer::Host {
                            addr: *h,
                            node: None,
                        };
                        let table = &tables[&(b.node.as_str(), family)];
                        let inbound = Packet {
                            saddr: *h,
                            daddr: sb,
                            proto,
                            port,
                        };
                        assert_eq!(
                            forward(table, &inbound),
                            cluster.verdict(family, host, Peer::Pod(b), proto, port),
                            "seed {seed} {family} {h} -> {}/{} {proto:?} {port}\n{:#?}\n{:#?}",
                            b.namespace,
                            b.name,
                            cluster.policies,
                            cluster.cluster_policies,
                        );
                        let outbound = Packet {
                            saddr: sb,
                            daddr: *h,
                            proto,
                            port,
                        };
                        assert_eq!(
                            forward(table, &outbound),
                            cluster.verdict(family, Peer::Pod(b), host, proto, port),
                            "seed {seed} {family} {}/{} -> {h} {proto:?} {port}\n{:#?}\n{:#?}",
                            b.namespace,
                            b.name,
                            cluster.policies,
                            cluster.cluster_policies,
                        );
                        compared[fi] += 2;
                    }
                }
            }
        }
    }
    (compared, denied)
}

/// Every rule line the compiler writes into a chain and every set element of random
/// clusters (with and without ClusterNetworkPolicies, both families) is in the netlink
/// encoder's vocabulary, and the steps between two tables encode (from nothing, and from the
/// previous random table of the same node).
#[test]
fn every_compiled_line_and_element_encodes_for_netlink() {
    use crate::nfnl::{encode, ops, parse_rule};
    let mut prev: BTreeMap<(&str, Family), Ruleset> = BTreeMap::new();
    let mut lines = 0usize;
    let mut shapes = std::collections::BTreeSet::new();
    for seed in 1..=150u64 {
        for tiers in [false, true] {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(tiers));
            let (pods, cluster) = random_cluster(&mut r, tiers, false);
            let tables = tables(&cluster, &pods);
            for (key, rs) in &tables {
                for line in rs.chains.values().flatten() {
                    parse_rule(rs.family, line).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    lines += 1;
                    for shape in [
                        " drop",
                        "goto ",
                        "meta l4proto . th dport @",
                        "daddr . meta l4proto . th dport @",
                        "saddr @",
                        "daddr @",
                        "ct status ! dnat reject with tcp reset",
                        "icmp type admin-prohibited",
                        "icmpv6 type admin-prohibited",
                    ] {
                        if line.contains(shape) {
                            shapes.insert(shape);
                        }
                    }
                }
                let empty = Ruleset::empty(rs.family);
                let mut from = vec![&empty];
                from.extend(prev.get(key));
                for old in from {
                    let steps = ops(old, rs).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    encode(&steps, 1).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                }
            }
            prev = tables;
        }
    }
    assert!(lines > 5_000, "{lines}");
    assert_eq!(shapes.len(), 9, "every kind of line was seen: {shapes:?}");
}
