//! Both policy tables in a real kernel, with real IPv4 and IPv6 TCP traffic checked against
//! the evaluator. Two namespace nodes (host-gw style routes over a dual-stack underlay), five
//! dual-stack pods behind the nodes' `cni0` bridges (three on the first node: same-node
//! traffic is bridged and needs br_netfilter), the tables compiled by `compile_family` and
//! applied by the `Enforcer`s (whole tables through `ip netns exec <node> nft`, differences
//! as netlink batches through a socket in the node's namespace). For each set of policies
//! every ordered pod pair is probed over both families (a connection that gets the server's
//! answer, the source address it saw: the reply came back) after the neighbour caches are
//! flushed (so neighbour discovery runs under the isolation), and the matrices must equal
//! the evaluator's. Also: the node and its pods reach each other by global and link-local
//! addresses whatever the policies, another node is judged like any host, link-local
//! unicast between pods is refused.
//!
//! Root; skips without it, fails under CI. Unique namespace names; everything goes with the
//! testbed (also on a panic); every command is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use std::sync::Arc;

use nft::{NfNetlink, NftCommand};
use policy::compile::{compile_family, Input};
use policy::enforce::Enforcer;
use policy::eval::{Cluster, Family, NamedPort, Peer, PodView};
use registry::{Labels, NetworkPolicy, Object, Protocol};
use test_support::{in_netns, wait_for, whoami, Testbed, WhoAmIServer};

const PORT: u16 = 80;
const LIMIT: Duration = Duration::from_millis(1500);

struct TPod {
    view: PodView,
    ns: String,
    /// The pod's link-local address and its eth0's index (for a scope id).
    ll: Ipv6Addr,
    ifindex: u32,
}

impl TPod {
    fn id(&self) -> String {
        format!("{}/{}", self.view.namespace, self.view.name)
    }
}

struct World {
    tb: Testbed,
    pods: Vec<TPod>,
    /// Per node: (namespace, cni0's global IPv6, cni0's link-local, cni0's index, eth0's IPv6).
    nodes: Vec<(String, Ipv6Addr, Ipv6Addr, u32, Ipv6Addr)>,
    namespaces: BTreeMap<String, Labels>,
    enforcers: Vec<[Enforcer<NftCommand, Arc<NfNetlink>>; 2]>,
    rt: tokio::runtime::Runtime,
    _servers: Vec<WhoAmIServer>,
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The interface's link-local address once DAD is done.
fn link_local(tb: &Testbed, ns: &str, dev: &str) -> Ipv6Addr {
    wait_for(Duration::from_secs(10), || {
        let out = tb
            .exec(
                ns,
                &[
                    "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link",
                ],
            )
            .ok()?;
        if out.contains("tentative") {
            return None;
        }
        let cidr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)?;
        cidr.split('/').next()?.parse().ok()
    })
    .unwrap_or_else(|| panic!("no link-local address on {dev} in {ns}"))
}

fn ifindex(tb: &Testbed, ns: &str, dev: &str) -> u32 {
    tb.exec(ns, &["cat", &format!("/sys/class/net/{dev}/ifindex")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn setup() -> World {
    let mut tb = Testbed::new(2).expect("testbed");
    let underlay6: Vec<Ipv6Addr> = tb
        .add_ipv6_underlay()
        .expect("ipv6 underlay")
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let specs = [
        ("x", "a", 0),
        ("x", "b", 0),
        ("y", "a", 0),
        ("x", "c", 1),
        ("y", "b", 1),
    ];
    let mut pods = Vec::new();
    let mut per_node = [0u8; 2];
    for (ns, name, node) in specs {
        per_node[node] += 1;
        let (n, k) = (node + 1, per_node[node] + 1);
        let p = tb
            .add_pod(
                node,
                &format!("10.5.{n}.{k}/24"),
                &format!("10.5.{n}.1/24"),
                1500,
            )
            .expect("pod");
        let node_ns = tb.nodes[node].ns.clone();
        if k == 2 {
            tb.exec(
                &node_ns,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("fd10:0:0:{n}::1/64"),
                    "dev",
                    "cni0",
                    "nodad",
                ],
            )
            .unwrap();
        }
        tb.exec(
            &p.ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("fd10:0:0:{n}::{k}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )
        .unwrap();
        tb.exec(
            &p.ns,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd10:0:0:{n}::1"),
            ],
        )
        .unwrap();
        pods.push(TPod {
            view: PodView {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(&[("pod", name)]),
                ips: vec![
                    p.ip.parse().unwrap(),
                    format!("fd10:0:0:{n}::{k}").parse().unwrap(),
                ],
                node: format!("n{node}"),
                ports: vec![NamedPort {
                    name: "http".into(),
                    port: PORT,
                    protocol: Protocol::Tcp,
                }],
            },
            ll: link_local(&tb, &p.ns, "eth0"),
            ifindex: ifindex(&tb, &p.ns, "eth0"),
            ns: p.ns,
        });
    }
    // Routes to the other node's pods, both families (host-gw style, one L2 underlay).
    let ips4: Vec<String> = tb.nodes.iter().map(|n| n.ip.clone()).collect();
    let mut nodes = Vec::new();
    for (i, node) in tb.nodes.clone().iter().enumerate() {
        let other = 1 - i;
        let o = other + 1;
        tb.exec(
            &node.ns,
            &[
                "ip",
                "route",
                "add",
                &format!("10.5.{o}.0/24"),
                "via",
                &ips4[other],
            ],
        )
        .unwrap();
        tb.exec(
            &node.ns,
            &[
                "ip",
                "-6",
                "route",
                "add",
                &format!("fd10:0:0:{o}::/64"),
                "via",
                &underlay6[other].to_string(),
            ],
        )
        .unwrap();
        let problem = in_netns(&node.ns, || {
            policy::run::ensure_bridge_netfilter_families(true)
        })
        .unwrap();
        assert_eq!(problem, None, "br_netfilter in {}", node.ns);
        nodes.push((
            node.ns.clone(),
            format!("fd10:0:0:{}::1", i + 1).parse().unwrap(),
            link_local(&tb, &node.ns, "cni0"),
            ifindex(&tb, &node.ns, "cni0"),
            underlay6[i],
        ));
    }
    let mut servers = Vec::new();
    for ns in pods
        .iter()
        .map(|p| p.ns.clone())
        .chain(nodes.iter().map(|n| n.0.clone()))
    {
        servers.push(WhoAmIServer::start(&ns, PORT).expect("server"));
    }
    let enforcers = nodes
        .iter()
        .map(|(ns, ..)| {
            let nft = NftCommand {
                prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()],
            };
            // Differences go as netlink batches through sockets in the node's namespace.
            let socket = || {
                let ns = ns.clone();
                Arc::new(
                    in_netns(&ns, NfNetlink::open)
                        .expect("enter namespace")
                        .expect("netlink socket"),
                )
            };
            [
                Enforcer::for_family(nft.clone(), Family::Ip).with_netlink(socket()),
                Enforcer::for_family(nft, Family::Ip6).with_netlink(socket()),
            ]
        })
        .collect();
    let mut namespaces = BTreeMap::new();
    namespaces.insert("x".to_string(), labels(&[("ns", "x")]));
    namespaces.insert("y".to_string(), labels(&[("ns", "y")]));
    World {
        tb,
        pods,
        nodes,
        namespaces,
        enforcers,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        _servers: servers,
    }
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    registry::parse_documents(yaml)
        .unwrap()
        .into_iter()
        .map(|o| match o {
            Object::NetworkPolicy(np) => np,
            other => panic!("not a policy: {other:?}"),
        })
        .collect()
}

/// Whether a TCP connection from `ns` to `to` gets the server's answer; checks the source
/// address the server saw when it does.
fn probe(ns: &str, to: SocketAddr, from: Option<IpAddr>) -> bool {
    match whoami(ns, to, LIMIT) {
        Ok(seen) => {
            if let Some(f) = from {
                assert_eq!(seen, f.to_string(), "{ns} -> {to}: source address");
            }
            true
        }
        Err(_) => false,
    }
}

impl World {
    fn apply(&mut self, nps: &[NetworkPolicy]) {
        let refs: Vec<&NetworkPolicy> = nps.iter().collect();
        let views: Vec<PodView> = self.pods.iter().map(|p| p.view.clone()).collect();
        for (i, pair) in self.enforcers.iter_mut().enumerate() {
            let node = format!("n{i}");
            for (e, family) in pair.iter_mut().zip([Family::Ip, Family::Ip6]) {
                let rs = compile_family(
                    Input {
                        namespaces: &self.namespaces,
                        policies: &refs,
                        cluster_policies: &[],
                        pods: &views,
                        node: &node,
                    },
                    family,
                );
                let rep = self.rt.block_on(e.sync(rs)).expect("nft transaction");
                // Whole tables by nft, differences over netlink.
                assert_eq!(rep.netlink, rep.changed && !rep.full, "{rep:?}");
            }
        }
    }

    fn flush_neighbours(&self) {
        for ns in self
            .pods
            .iter()
            .map(|p| &p.ns)
            .chain(self.nodes.iter().map(|n| &n.0))
        {
            self.tb.exec(ns, &["ip", "neigh", "flush", "all"]).unwrap();
            self.tb
                .exec(ns, &["ip", "-6", "neigh", "flush", "all"])
                .unwrap();
        }
    }

    /// Probes every ordered pod pair over `family`; panics with both matrices on a difference.
    fn check_pairs(&self, what: &str, cluster: &Cluster, family: Family) {
        let mut want = String::new();
        let mut got = String::new();
        for a in &self.pods {
            for b in &self.pods {
                if a.view == b.view {
                    continue;
                }
                let (sa, sb) = (a.view.addr(family).unwrap(), b.view.addr(family).unwrap());
                let w = cluster.allows(
                    family,
                    Peer::Pod(&a.view),
                    Peer::Pod(&b.view),
                    Protocol::Tcp,
                    PORT,
                );
                let g = probe(&a.ns, SocketAddr::new(sb, PORT), Some(sa));
                let line = |ok: bool| {
                    format!(
                        "{} -> {}: {}\n",
                        a.id(),
                        b.id(),
                        if ok { "ok" } else { "refused" }
                    )
                };
                want += &line(w);
                got += &line(g);
            }
        }
        assert_eq!(
            got, want,
            "{what} over {family}: observed (left) vs evaluator (right)"
        );
    }

    /// The node and its pods reach each other by global and link-local addresses; another
    /// node is judged as a host; link-local between pods is refused.
    fn check_hosts(&self, what: &str, cluster: &Cluster) {
        for p in &self.pods {
            let n: usize = p.view.node[1..].parse().unwrap();
            let (node_ns, gw6, node_ll, cni_index, _) = &self.nodes[n];
            let own = Peer::Host {
                addr: IpAddr::V6(*gw6),
                node: Some(&p.view.node),
            };
            assert!(cluster.allows(Family::Ip6, own, Peer::Pod(&p.view), Protocol::Tcp, PORT));
            let pod6 = p.view.addr(Family::Ip6).unwrap();
            assert!(
                probe(node_ns, SocketAddr::new(pod6, PORT), None),
                "{what}: node -> {}",
                p.id()
            );
            let ll = SocketAddr::V6(SocketAddrV6::new(p.ll, PORT, 0, *cni_index));
            assert!(
                probe(node_ns, ll, None),
                "{what}: node -> {} link-local",
                p.id()
            );
            assert!(
                probe(&p.ns, SocketAddr::new(IpAddr::V6(*gw6), PORT), Some(pod6)),
                "{what}: {} -> its node",
                p.id()
            );
            let ll = SocketAddr::V6(SocketAddrV6::new(*node_ll, PORT, 0, p.ifindex));
            assert!(
                probe(&p.ns, ll, None),
                "{what}: {} -> its node's link-local",
                p.id()
            );
            // The other node, from its underlay address (routed, forwarded here).
            let (other_ns, _, _, _, other6) = &self.nodes[1 - n];
            let other = Peer::Host {
                addr: IpAddr::V6(*other6),
                node: Some(if n == 0 { "n1" } else { "n0" }),
            };
            assert_eq!(
                probe(
                    other_ns,
                    SocketAddr::new(pod6, PORT),
                    Some(IpAddr::V6(*other6))
                ),
                cluster.allows(Family::Ip6, other, Peer::Pod(&p.view), Protocol::Tcp, PORT),
                "{what}: other node -> {}",
                p.id()
            );
        }
        // Link-local unicast between two pods of one bridge: refused, policies or not.
        let (a, b) = (&self.pods[0], &self.pods[1]);
        let ll = SocketAddr::V6(SocketAddrV6::new(a.ll, PORT, 0, b.ifindex));
        assert!(
            !probe(&b.ns, ll, None),
            "{what}: {} -> {} link-local",
            b.id(),
            a.id()
        );
    }

    fn check(&mut self, what: &str, yaml: &str) {
        let nps = if yaml.is_empty() {
            Vec::new()
        } else {
            policies(yaml)
        };
        self.apply(&nps);
        self.flush_neighbours();
        let cluster = Cluster {
            namespaces: self.namespaces.clone(),
            policies: nps,
            ..Cluster::default()
        };
        self.check_pairs(what, &cluster, Family::Ip6);
        self.check_pairs(what, &cluster, Family::Ip);
        self.check_hosts(what, &cluster);
    }
}

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: ";

#[test]
fn ipv6_pods_are_policed_like_ipv4_ones() {
    if !test_support::require_root_with(&["ip", "nft"]) {
        return;
    }
    let mut w = setup();
    w.check("no policy", "");
    w.check(
        "deny ingress and egress in x",
        &format!("{NP}{{name: deny, namespace: x}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress, Egress]}}\n"),
    );
    // x/a accepts x/b only (same node, bridged) and opens nothing itself: the replies of the
    // connections it accepts still go out.
    w.check(
        "allowed peer by selector, replies under egress isolation",
        &format!(
            "{NP}{{name: from-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}], ports: [{{port: http}}]}}]\n"
        ),
    );
    // IPv6 block with an except (y/b on the other node), beside an IPv4 block of the other
    // node's pods: each family sees only its own block.
    w.check(
        "ipBlock v6 allow/except beside a v4 block",
        &format!(
            "{NP}{{name: blocks, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 'fd10::/48', except: ['fd10:0:0:2::3/128']}}}}, {{ipBlock: {{cidr: 10.5.2.0/24}}}}]}}]\n"
        ),
    );
    // y's pods open only to namespace x on port 80; x/c accepts only from namespace y.
    w.check(
        "namespace selectors, egress and ingress across nodes",
        &format!(
            "{NP}{{name: out, namespace: 'y'}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{namespaceSelector: {{matchLabels: {{ns: x}}}}}}], ports: [{{port: 80}}]}}]\n---\n{NP}{{name: from-y, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: c}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: 'y'}}}}}}]}}]\n"
        ),
    );
    // Back to no policy: everything open again (the tables emptied by differences).
    w.check("no policy again", "");
}
