//! The evaluator's ClusterNetworkPolicy semantics, case by case: tiers, priorities and ties,
//! actions and Pass chains, both directions, named ports, networks.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use registry::{
    parse_documents, ClusterNetworkPolicy, NetworkPolicy, Object, Protocol, RuleAction, Tier,
};

use crate::eval::{tier_order, Cluster, Family, NamedPort, Peer, PodView, Verdict};

fn pod(ns: &str, name: &str, ip: &str, node: &str) -> PodView {
    PodView {
        namespace: ns.into(),
        name: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
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

/// Namespaces x, y with pods a, b each; x/a and y/a on n1, the b pods on n2.
fn pods() -> Vec<PodView> {
    vec![
        pod("x", "a", "10.5.1.2", "n1"),
        pod("x", "b", "10.5.2.2", "n2"),
        pod("y", "a", "10.5.1.3", "n1"),
        pod("y", "b", "10.5.2.3", "n2"),
    ]
}

fn cluster(yaml: &str) -> Cluster {
    let mut c = Cluster::default();
    for ns in ["x", "y"] {
        c.namespaces
            .insert(ns.into(), [("team".to_string(), format!("t{ns}"))].into());
    }
    for o in parse_documents(yaml).unwrap() {
        match o {
            Object::ClusterNetworkPolicy(p) => {
                registry::validate(&Object::ClusterNetworkPolicy(p.clone()), net()).unwrap();
                c.cluster_policies.push(p)
            }
            Object::NetworkPolicy(p) => c.policies.push(p),
            other => panic!("{other:?}"),
        }
    }
    c
}

fn net() -> ipnet::Ipv4Net {
    "10.96.0.0/12".parse().unwrap()
}

fn find<'a>(ps: &'a [PodView], id: &str) -> &'a PodView {
    let (ns, name) = id.split_once('/').unwrap();
    ps.iter()
        .find(|p| p.namespace == ns && p.name == name)
        .unwrap()
}

fn v(c: &Cluster, src: &str, dst: &str, proto: Protocol, port: u16) -> Verdict {
    let ps = pods();
    c.verdict(
        Family::Ip,
        Peer::Pod(find(&ps, src)),
        Peer::Pod(find(&ps, dst)),
        proto,
        port,
    )
}

fn tcp(c: &Cluster, src: &str, dst: &str) -> Verdict {
    v(c, src, dst, Protocol::Tcp, 80)
}

const HDR: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n";

fn cnp(name: &str, tier: &str, prio: u32, body: &str) -> String {
    format!(
        "---\n{HDR}metadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {prio}\n{body}"
    )
}

const NP_ALLOW_ALL_INTO_X: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";
const NP_DENY_INTO_X: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n";

#[test]
fn no_policy_allows_everything() {
    let c = cluster("");
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
}

#[test]
fn admin_deny_beats_an_allowing_network_policy() {
    let deny = cnp(
        "deny-y-to-x",
        "Admin",
        10,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {matchLabels: {team: ty}}}]\n",
    );
    let c = cluster(&format!("{deny}{NP_ALLOW_ALL_INTO_X}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Drop);
    assert_eq!(tcp(&c, "y/b", "x/b"), Verdict::Drop);
    assert_eq!(
        tcp(&c, "x/b", "x/a"),
        Verdict::Allow,
        "x to x still allowed"
    );
    assert_eq!(tcp(&c, "x/a", "y/a"), Verdict::Allow, "the other direction");
    // A pod reaching itself and the node reaching its pods stay allowed.
    let ps = pods();
    let a = find(&ps, "x/a");
    let node = Peer::Host {
        addr: "10.5.1.1".parse().unwrap(),
        node: Some("n1"),
    };
    assert!(c.allows(Family::Ip, node, Peer::Pod(a), Protocol::Tcp, 80));
}

#[test]
fn admin_accept_beats_a_denying_network_policy_and_the_order_of_rules_counts() {
    let p = cnp(
        "accept-then-deny",
        "Admin",
        5,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  ingress:\n  - action: Accept\n    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}}]\n    protocols: [{tcp: {destinationPort: {number: 80}}}]\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    let c = cluster(&format!("{p}{NP_DENY_INTO_X}"));
    assert_eq!(tcp(&c, "y/a", "x/b"), Verdict::Allow);
    assert_eq!(v(&c, "y/a", "x/b", Protocol::Tcp, 81), Verdict::Drop);
    assert_eq!(tcp(&c, "y/b", "x/b"), Verdict::Drop);
    // Without the CNP the NetworkPolicy refuses.
    let c = cluster(NP_DENY_INTO_X);
    assert_eq!(tcp(&c, "y/a", "x/b"), Verdict::Reject);
}

#[test]
fn priorities_lower_first_and_ties_by_name() {
    let accept = |name: &str, prio| {
        cnp(
            name,
            "Admin",
            prio,
            "  subject: {namespaces: {}}\n  ingress:\n  - action: Accept\n    from: [{namespaces: {}}]\n",
        )
    };
    let deny = |name: &str, prio| {
        cnp(
            name,
            "Admin",
            prio,
            "  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
        )
    };
    let c = cluster(&format!("{}{}", deny("d", 20), accept("a", 10)));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow, "10 before 20");
    let c = cluster(&format!("{}{}", deny("d", 10), accept("a", 20)));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Drop);
    // Equal priorities: by name, whatever order the objects come in.
    for yaml in [
        format!("{}{}", deny("b-deny", 7), accept("a-accept", 7)),
        format!("{}{}", accept("a-accept", 7), deny("b-deny", 7)),
    ] {
        let c = cluster(&yaml);
        assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
        let names: Vec<&str> = tier_order(&c.cluster_policies, Tier::Admin)
            .iter()
            .map(|p| p.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["a-accept", "b-deny"]);
    }
}

#[test]
fn pass_skips_the_rest_of_the_admin_tier_to_network_policy_then_baseline() {
    let pass = cnp(
        "pass-x",
        "Admin",
        1,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  ingress:\n  - action: Pass\n    from: [{namespaces: {matchLabels: {team: ty}}}]\n",
    );
    let deny_all = cnp(
        "deny-all",
        "Admin",
        2,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    let baseline_deny = cnp(
        "baseline-deny",
        "Baseline",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    // Pass, no NetworkPolicy: the baseline decides.
    let c = cluster(&format!("{pass}{deny_all}{baseline_deny}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Drop);
    // Pass, and the baseline has nothing: allowed (the later Admin deny is skipped).
    let c = cluster(&format!("{pass}{deny_all}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
    assert_eq!(tcp(&c, "x/b", "x/a"), Verdict::Drop, "not passed: denied");
    // Pass to a NetworkPolicy that isolates: it decides, the baseline does not count.
    let c = cluster(&format!(
        "{pass}{deny_all}{baseline_deny}{NP_ALLOW_ALL_INTO_X}"
    ));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
    let c = cluster(&format!("{pass}{deny_all}{baseline_deny}{NP_DENY_INTO_X}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Reject);
    // A Pass in the baseline tier goes to the default (allowed), skipping later baselines.
    let bpass = cnp(
        "a-baseline-pass",
        "Baseline",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Pass\n    from: [{namespaces: {matchLabels: {team: ty}}}]\n",
    );
    let c = cluster(&format!("{bpass}{baseline_deny}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
    assert_eq!(tcp(&c, "x/b", "x/a"), Verdict::Drop);
}

#[test]
fn baseline_deny_is_opened_by_a_network_policy() {
    let baseline = cnp(
        "default-deny",
        "Baseline",
        1000,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    let c = cluster(&baseline);
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Drop);
    assert_eq!(tcp(&c, "x/a", "y/a"), Verdict::Drop);
    let c = cluster(&format!("{baseline}{NP_ALLOW_ALL_INTO_X}"));
    assert_eq!(
        tcp(&c, "y/a", "x/a"),
        Verdict::Allow,
        "x selected by a NetworkPolicy"
    );
    assert_eq!(
        tcp(&c, "x/a", "y/a"),
        Verdict::Drop,
        "y still at the baseline"
    );
    // A baseline Accept does not beat a NetworkPolicy that isolates.
    let accept = cnp(
        "accept",
        "Baseline",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Accept\n    from: [{namespaces: {}}]\n",
    );
    let c = cluster(&format!("{accept}{NP_DENY_INTO_X}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Reject);
}

#[test]
fn egress_is_judged_at_the_source_and_ingress_at_the_destination() {
    // Egress Accept at the source does not bypass the destination's ingress.
    let egress_accept = cnp(
        "egress-accept",
        "Admin",
        1,
        "  subject: {namespaces: {matchLabels: {team: ty}}}\n  egress:\n  - action: Accept\n    to: [{namespaces: {}}]\n",
    );
    let ingress_deny = cnp(
        "ingress-deny",
        "Admin",
        2,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {matchLabels: {team: ty}}}]\n",
    );
    let c = cluster(&format!("{egress_accept}{ingress_deny}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Drop);
    // An egress Deny stops the connection at the source even if the destination accepts.
    let egress_deny = cnp(
        "egress-deny",
        "Admin",
        1,
        "  subject: {pods: {namespaceSelector: {matchLabels: {team: ty}}, podSelector: {matchLabels: {pod: b}}}}\n  egress:\n  - action: Deny\n    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}}]\n",
    );
    let c = cluster(&egress_deny);
    assert_eq!(tcp(&c, "y/b", "x/a"), Verdict::Drop);
    assert_eq!(tcp(&c, "y/b", "x/b"), Verdict::Allow);
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow, "subject is y/b only");
    // Egress NetworkPolicy rejects before an ingress CNP would drop.
    let np_egress = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-egress, namespace: \"y\"}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n";
    let c = cluster(&format!("{ingress_deny}{np_egress}"));
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Reject);
}

#[test]
fn networks_match_pods_and_hosts_of_their_family() {
    let block = cnp(
        "block-cidr",
        "Admin",
        0,
        "  subject: {namespaces: {}}\n  egress:\n  - action: Deny\n    to: [{networks: [\"10.5.2.0/24\", \"192.0.2.0/24\", \"fd00::/8\"]}]\n",
    );
    let c = cluster(&block);
    assert_eq!(
        tcp(&c, "x/a", "y/b"),
        Verdict::Drop,
        "pod y/b is in 10.5.2.0/24"
    );
    assert_eq!(tcp(&c, "x/a", "y/a"), Verdict::Allow);
    let ps = pods();
    let a = find(&ps, "x/a");
    let host = |ip: &str| Peer::Host {
        addr: ip.parse::<IpAddr>().unwrap(),
        node: None,
    };
    let out = |ip: &str, fam| c.verdict(fam, Peer::Pod(a), host(ip), Protocol::Udp, 53);
    assert_eq!(out("192.0.2.9", Family::Ip), Verdict::Drop);
    assert_eq!(out("198.51.100.9", Family::Ip), Verdict::Allow);
    // The pod's own node is allowed even inside a denied network.
    let own = Peer::Host {
        addr: "10.5.2.1".parse().unwrap(),
        node: Some("n1"),
    };
    assert_eq!(
        c.verdict(Family::Ip, Peer::Pod(a), own, Protocol::Tcp, 80),
        Verdict::Allow
    );
    // Ingress rules have no networks: outside hosts are not subjects of pod peers.
    let ingress = cnp(
        "deny-in",
        "Admin",
        0,
        "  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    let c = cluster(&ingress);
    assert!(c.allows(
        Family::Ip,
        host("192.0.2.9"),
        Peer::Pod(a),
        Protocol::Tcp,
        80
    ));
}

#[test]
fn protocols_numbers_ranges_and_named_ports() {
    let p = cnp(
        "ports",
        "Admin",
        0,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n    protocols:\n    - udp: {destinationPort: {range: {start: 1000, end: 2000}}}\n    - destinationNamedPort: web\n    - destinationNamedPort: dns\n    - sctp: {destinationPort: {number: 9}}\n",
    );
    let c = cluster(&p);
    assert_eq!(
        v(&c, "y/a", "x/a", Protocol::Tcp, 80),
        Verdict::Drop,
        "named web"
    );
    assert_eq!(
        v(&c, "y/a", "x/a", Protocol::Udp, 80),
        Verdict::Allow,
        "web is TCP"
    );
    assert_eq!(
        v(&c, "y/a", "x/a", Protocol::Udp, 53),
        Verdict::Drop,
        "named dns (UDP)"
    );
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Tcp, 53), Verdict::Allow);
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Udp, 1000), Verdict::Drop);
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Udp, 2000), Verdict::Drop);
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Udp, 2001), Verdict::Allow);
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Tcp, 1500), Verdict::Allow);
    assert_eq!(v(&c, "y/a", "x/a", Protocol::Sctp, 9), Verdict::Drop);
    // Egress named ports resolve on the destination pod; a host never has one.
    let e = cnp(
        "named-egress",
        "Admin",
        0,
        "  subject: {namespaces: {matchLabels: {team: tx}}}\n  egress:\n  - action: Deny\n    to: [{networks: [\"0.0.0.0/0\"]}]\n    protocols: [{destinationNamedPort: web}]\n",
    );
    let c = cluster(&e);
    assert_eq!(tcp(&c, "x/a", "y/a"), Verdict::Drop);
    let ps = pods();
    let host = Peer::Host {
        addr: "192.0.2.1".parse().unwrap(),
        node: None,
    };
    assert!(c.allows(
        Family::Ip,
        Peer::Pod(find(&ps, "x/a")),
        host,
        Protocol::Tcp,
        80
    ));
}

#[test]
fn subjects_select_by_namespace_or_by_namespace_and_pod() {
    let p = cnp(
        "only-x-b",
        "Admin",
        0,
        "  subject: {pods: {namespaceSelector: {matchLabels: {team: tx}}, podSelector: {matchLabels: {pod: b}}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n",
    );
    let c = cluster(&p);
    assert_eq!(tcp(&c, "y/a", "x/b"), Verdict::Drop);
    assert_eq!(tcp(&c, "y/a", "x/a"), Verdict::Allow);
    assert_eq!(tcp(&c, "x/a", "y/b"), Verdict::Allow);
    // By namespace name label.
    let p = cnp(
        "ns-by-name",
        "Admin",
        0,
        "  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: \"x\"}}}]\n",
    );
    let c = cluster(&p);
    assert_eq!(tcp(&c, "x/a", "y/b"), Verdict::Drop);
    assert_eq!(tcp(&c, "y/a", "y/b"), Verdict::Allow);
}

#[test]
fn helpers_see_the_objects() {
    let c = cluster(&cnp(
        "p",
        "Baseline",
        3,
        "  subject: {namespaces: {}}\n  egress:\n  - action: Pass\n    to: [{namespaces: {}}]\n",
    ));
    let p: &ClusterNetworkPolicy = &c.cluster_policies[0];
    assert_eq!(p.spec.egress[0].action, Some(RuleAction::Pass));
    assert!(tier_order(&c.cluster_policies, Tier::Admin).is_empty());
    let _: Vec<NetworkPolicy> = c.policies.clone();
}
