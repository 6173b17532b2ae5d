//! The policy table's differences sent as netlink batches leave exactly the table that the
//! same differences sent as `nft -f -` text leave, in both families.
//!
//! In a fresh network namespace of its own (gone with its thread), per family: tables
//! compiled from dual-stack pods, NetworkPolicies (pod, namespace and ipBlock peers, numeric
//! ports with ranges, named ports) and ClusterNetworkPolicies (Admin Deny/Pass/Accept,
//! Baseline, networks), changed between steps (a pod added and one gone: map elements and
//! set elements; policies gone and changed: chains flushed, deleted and added, sets deleted),
//! plus hand-made edge sets (a /0, intervals at the top of the address space, adjacent
//! single addresses, ranges, port ranges of every protocol, a `goto` to a new chain). For
//! each step the old table is written whole by nft, then the difference goes once through
//! `nft -f -` and once as a batch (after rewriting the old table), and `nft list table`
//! must print the same (element lists compared as sets: hash sets list in the order of a
//! per-set random seed). A refused batch changes nothing.
//!
//! Root; skips without it, fails under CI. Every command is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use nft::{NfNetlink, NftCommand};
use policy::compile::{self, compile_family, Family, Input, Ruleset, Set, SetType};
use policy::eval::{NamedPort, PodView};
use policy::nfnl;
use registry::{ClusterNetworkPolicy, Labels, NetworkPolicy, Object, Protocol};
use test_support::{in_new_netns, require_root_with};

fn pod(ns: &str, name: &str, v4: &str, v6: &str, node: &str) -> PodView {
    PodView {
        namespace: ns.into(),
        name: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
        node: node.into(),
        ports: vec![
            NamedPort {
                name: "web".into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            NamedPort {
                name: "dns".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
        ],
    }
}

const NPS: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchLabels: {team: ty}}}]
    ports: [{port: 80}, {port: 8000, endPort: 8080}, {protocol: UDP, port: 53}, {port: web}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.5.0.0/16]}}, {ipBlock: {cidr: 'fd00::/8', except: ['fd10::/16']}}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: '::/0'}}]
    ports: [{protocol: SCTP, port: 9}, {protocol: UDP, port: dns}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open, namespace: 'y'}
spec:
  podSelector: {}
  ingress: [{}]
";

const NP_CHANGED: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 443}, {protocol: SCTP, port: 1000, endPort: 2000}]
";

const CNPS: &str = "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {matchLabels: {team: ty}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 20, end: 25}}}}, {destinationNamedPort: web}]
  - action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}}]
  egress:
  - action: Deny
    to: [{networks: ['192.0.2.0/24', '2001:db8::/32']}]
  - action: Accept
    to: [{namespaces: {}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  priority: 5
  subject: {namespaces: {matchLabels: {team: tx}}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
";

fn parse(yaml: &str) -> (Vec<NetworkPolicy>, Vec<ClusterNetworkPolicy>) {
    let (mut nps, mut cnps) = (Vec::new(), Vec::new());
    for o in registry::parse_documents(yaml).unwrap() {
        match o {
            Object::NetworkPolicy(p) => nps.push(p),
            Object::ClusterNetworkPolicy(p) => cnps.push(p),
            other => panic!("{other:?}"),
        }
    }
    (nps, cnps)
}

/// Hand-made sets and a chain over them, with the edges of the element encoding.
fn add_edges(rs: &mut Ruleset, step: usize) {
    let v4 = rs.family == Family::Ip;
    let pick = |a: &'static str, b: &'static str| if v4 { a } else { b };
    let fam = pick("ip", "ip6");
    let set = |ty, els: &[&str]| Set {
        ty,
        elements: els.iter().map(|s| s.to_string()).collect(),
    };
    let local = pick("10.5.1.200", "fd10::1:200").parse().unwrap();
    if step == 1 {
        rs.sets.insert(
            "peer/edges".into(),
            set(
                SetType::Addrs,
                &[
                    pick("10.0.0.1", "fd00::1"),
                    pick("10.0.0.3", "fd00::3"),
                    pick("172.16.0.0-172.16.3.7", "fd00:1::-fd00:1::3:7"),
                    pick("255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                ],
            ),
        );
        rs.sets.insert(
            "peer/all".into(),
            set(SetType::Addrs, &[pick("0.0.0.0/0", "::/0")]),
        );
        rs.sets.insert(
            "ports/edges".into(),
            set(SetType::Ports, &["tcp . 80", "tcp . 443", "sctp . 0-65535"]),
        );
        rs.chains.insert(
            "in/edges".into(),
            vec![
                format!("{fam} saddr @peer/all meta l4proto . th dport @ports/edges return"),
                format!("{fam} saddr @peer/edges goto in/edges2"),
                "meta l4proto tcp ct status ! dnat reject with tcp reset".into(),
            ],
        );
        rs.chains.insert("in/edges2".into(), vec!["drop".into()]);
        rs.ingress.insert(local, "in/edges2".into());
    } else {
        rs.sets.insert(
            "peer/edges".into(),
            set(
                SetType::Addrs,
                &[
                    pick("10.0.0.1", "fd00::1"),
                    pick("10.0.0.2", "fd00::2"),
                    pick("192.168.0.0/16", "2001:db8::/32"),
                    pick(
                        "255.255.255.0/24",
                        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120",
                    ),
                ],
            ),
        );
        rs.sets.insert(
            "peer/zero".into(),
            set(
                SetType::Addrs,
                &[
                    pick("0.0.0.0/8", "::/8"),
                    pick("10.9.0.0-10.9.0.4", "fd09::-fd09::4"),
                ],
            ),
        );
        rs.sets.insert(
            "ports/edges".into(),
            set(SetType::Ports, &["tcp . 80", "udp . 1000-2000"]),
        );
        rs.chains.insert(
            "in/edges".into(),
            vec![
                format!("{fam} saddr @peer/edges meta l4proto . th dport @ports/edges return"),
                format!("{fam} daddr @peer/zero drop"),
                pick(
                    "reject with icmp type admin-prohibited",
                    "reject with icmpv6 type admin-prohibited",
                )
                .into(),
            ],
        );
        rs.ingress.insert(local, "in/edges".into());
    }
}

/// The tables of the steps, for `family`.
fn tables(family: Family) -> Vec<Ruleset> {
    let mut namespaces: BTreeMap<String, Labels> = BTreeMap::new();
    namespaces.insert("x".into(), [("team".to_string(), "tx".to_string())].into());
    namespaces.insert("y".into(), [("team".to_string(), "ty".to_string())].into());
    let pods0 = vec![
        pod("x", "a", "10.5.1.2", "fd10::1:2", "n1"),
        pod("x", "b", "10.5.1.3", "fd10::1:3", "n1"),
        pod("x", "c", "10.5.2.2", "fd10::2:2", "n2"),
        pod("y", "a", "10.5.1.4", "fd10::1:4", "n1"),
        pod("y", "b", "10.5.2.3", "fd10::2:3", "n2"),
    ];
    let mut pods1 = pods0.clone();
    pods1.retain(|p| !(p.namespace == "y" && p.name == "b"));
    pods1.push(pod("x", "d", "10.5.1.5", "fd10::1:5", "n1"));
    pods1.push(pod("y", "c", "10.5.1.6", "fd10::1:6", "n1"));
    let (nps0, cnps0) = parse(&format!("{NPS}---\n{CNPS}"));
    let (nps1, mut cnps1) = parse(&format!("{NP_CHANGED}---\n{CNPS}"));
    cnps1.retain(|p| p.metadata.name == "admin");
    let compile = |pods: &[PodView], nps: &[NetworkPolicy], cnps: &[ClusterNetworkPolicy]| {
        let refs: Vec<&NetworkPolicy> = nps.iter().collect();
        let crefs: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
        compile_family(
            Input {
                namespaces: &namespaces,
                policies: &refs,
                cluster_policies: &crefs,
                pods,
                node: "n1",
            },
            family,
        )
    };
    let mut out = vec![
        compile(&pods0, &nps0, &cnps0),
        compile(&pods1, &nps1, &cnps1),
        compile(&pods0, &nps0, &cnps0),
    ];
    for (step, rs) in out.iter_mut().enumerate() {
        add_edges(rs, step);
    }
    out
}

/// The listing with each element list sorted.
fn normalized(listing: &str) -> String {
    let mut out = String::new();
    let mut elements: Option<String> = None;
    for line in listing.lines() {
        match &mut elements {
            Some(acc) => {
                acc.push_str(line.trim());
                acc.push(' ');
            }
            None => match line.find("elements = {") {
                Some(at) => {
                    out.push_str(&line[..at]);
                    elements = Some(line[at + "elements = {".len()..].to_string() + " ");
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                    continue;
                }
            },
        }
        let acc = elements.as_ref().expect("collecting");
        if let Some(body) = acc.trim_end().strip_suffix('}') {
            let items: BTreeSet<&str> = body
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            out.push_str(&format!(
                "elements = {{ {} }}\n",
                items.into_iter().collect::<Vec<_>>().join(", ")
            ));
            elements = None;
        }
    }
    out
}

#[test]
fn netlink_batches_leave_the_table_nft_text_leaves() {
    if !require_root_with(&["nft"]) {
        return;
    }
    in_new_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let nft = NftCommand::default();
        let nl = NfNetlink::open().expect("netlink socket");
        let list = |family| {
            rt.block_on(nft.list_table(family, compile::TABLE))
                .expect("list")
                .expect("table")
        };
        for family in [Family::Ip, Family::Ip6] {
            let tables = tables(family);
            for (step, pair) in tables.windows(2).enumerate() {
                let (old, new) = (&pair[0], &pair[1]);
                let script = compile::diff(old, new).expect("a difference");
                rt.block_on(nft.apply(&compile::full(old))).expect("full");
                rt.block_on(nft.apply(&script)).expect("text difference");
                let by_text = list(family);
                rt.block_on(nft.apply(&compile::full(old))).expect("full");
                let ops = nfnl::ops(old, new).expect("encodable");
                assert_eq!(ops.script(), script);
                nfnl::apply(&nl, &ops).expect("netlink difference");
                let by_netlink = list(family);
                assert_eq!(
                    normalized(&by_text),
                    normalized(&by_netlink),
                    "{family} step {step}: nft text (left) vs netlink (right)\n{script}"
                );
                // What the steps must have covered.
                for needle in [
                    "delete element",
                    "flush chain",
                    "delete chain",
                    "delete set",
                    "add set",
                    "add element",
                    "add chain",
                    "add rule",
                ] {
                    assert!(script.contains(needle), "{family} step {step}: no {needle}");
                }
                if step == 0 {
                    let all = if family == Family::Ip {
                        "0.0.0.0/0"
                    } else {
                        "::/0"
                    };
                    for needle in [all, "goto in/edges2", "sctp . 0-65535", "reject with"] {
                        assert!(
                            by_netlink.contains(needle),
                            "{family}: {needle} missing:\n{by_netlink}"
                        );
                    }
                }
            }
            // A refused batch (an element that is not there) changes nothing.
            let before = list(family);
            let last = tables.last().unwrap();
            let mut wrong = last.clone();
            wrong
                .chains
                .insert("in/would-be-added".into(), vec!["drop".into()]);
            let mut gone = last.clone();
            gone.sets
                .get_mut("peer/edges")
                .unwrap()
                .elements
                .insert(if family == Family::Ip {
                    "10.0.0.77".into()
                } else {
                    "fd00::77".into()
                });
            let ops = nfnl::ops(&gone, &wrong).expect("encodable");
            let err = nfnl::apply(&nl, &ops).expect_err("missing element");
            assert!(
                err.to_string().contains("delete element")
                    && err.to_string().contains("peer/edges"),
                "{err}"
            );
            assert_eq!(list(family), before, "a refused batch must change nothing");
        }
    })
    .expect("own network namespace");
}
