//! NetworkPolicy end to end, on the model of the Kubernetes e2e suite: three namespace nodes
//! running flanneld with `--network-policy` and the nftables service proxy; namespaces x, y, z
//! with pods a, b, c each (attached through the CNI plugin, spread over the nodes so that
//! some pairs share a node and are bridged on cni0); in every pod servers on TCP and UDP
//! ports 80 and 81 and a ClusterIP Service. For each case all 81 ordered pod pairs are probed,
//! directly and through the destination's ClusterIP, and the whole reachability matrix is
//! compared with the one the pure evaluator (`policy::eval`) computes from the same objects.
//! The same cases run twice: on an IPv4-only cluster, and on a dual-stack one (IPv6 underlay,
//! `EnableIPv6`, dual-stack Services) where every matrix is checked over both families, with
//! extra ipBlock cases for IPv6 blocks and IPv4 blocks that must not open IPv6.
//! ClusterNetworkPolicy cases (policy.networking.k8s.io/v1alpha2) follow the NetworkPolicy ones
//! on the same matrices: their Deny drops (the probe must time out, as the network-policy-api
//! conformance suite counts a denial), NetworkPolicy's refusals stay quick.
//! Needs root and the reference CNI plugins; skips with a reason without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use policy::eval::{self, Family, NamedPort, Peer, PodView, Verdict};
use registry::{ClusterNetworkPolicy, Labels, NetworkPolicy, Object, Protocol};
use test_support::{
    connect_seeing_icmp, in_netns, random_tag, require, require_root_with, IdServer, Testbed,
    UdpIdServer,
};

mod common;

use common::{Cni, Daemons, BIN, REFERENCE_PLUGINS};

const NET: &str = r#"{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The dual-stack cluster's config (as in `ipv6.rs`).
const NET_DUAL: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
/// One probe's limit: refusals (TCP reset, ICMP admin-prohibited) come back at once, so only
/// a lost reply waits this long.
const PROBE: Duration = Duration::from_millis(1500);
/// A TCP refusal must come this fast: well under the 1 s after which a client retransmits
/// its SYN (a refusal that only answers the retransmission is a bug, not a refusal; IPv6
/// probes ask for ICMPv6 errors, see [`connect_seeing_icmp`]).
const QUICK: Duration = Duration::from_millis(400);
/// How long a case may take to converge on every node.
const CONVERGE: Duration = Duration::from_secs(20);
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const TCP80: (Protocol, u16) = (Protocol::Tcp, 80);
const TCP81: (Protocol, u16) = (Protocol::Tcp, 81);
const UDP80: (Protocol, u16) = (Protocol::Udp, 80);
const UDP81: (Protocol, u16) = (Protocol::Udp, 81);

struct TestPod {
    view: PodView,
    netns: String,
    node: usize,
    /// The Service's ClusterIPs: IPv4, and IPv6 in the dual-stack cluster.
    cluster_ips: Vec<IpAddr>,
}

impl TestPod {
    fn id(&self) -> String {
        format!("{}/{}", self.view.namespace, self.view.name)
    }

    fn cluster_ip(&self, family: Family) -> IpAddr {
        *self
            .cluster_ips
            .iter()
            .find(|a| eval::family_of(**a) == family)
            .unwrap()
    }
}

struct World {
    tb: Testbed,
    d: Daemons,
    endpoint: String,
    /// The families every matrix is checked over (IPv4 first).
    families: Vec<Family>,
    /// The cluster's IPv4 Network.
    network: &'static str,
    pods: Vec<TestPod>,
    namespaces: BTreeMap<String, Labels>,
    policies: Vec<NetworkPolicy>,
    cluster_policies: Vec<ClusterNetworkPolicy>,
    _servers: Vec<(IdServer, IdServer, UdpIdServer, UdpIdServer)>,
    _cni: Cni,
    files: usize,
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ports() -> Vec<NamedPort> {
    let mut v = Vec::new();
    for port in [80, 81] {
        for (proto, tag) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
            v.push(NamedPort {
                name: format!("serve-{port}-{tag}"),
                port,
                protocol: proto,
            });
        }
    }
    v
}

/// Whether a new connection (TCP) or an exchange (UDP, connected socket so that ICMP errors
/// are seen) from `netns` to `to` gets an answer.
fn probe(netns: &str, proto: Protocol, to: SocketAddr) -> bool {
    probe_timed(netns, proto, to).0
}

/// [`probe`] and how long it took.
fn probe_timed(netns: &str, proto: Protocol, to: SocketAddr) -> (bool, Duration) {
    let started = Instant::now();
    let r = in_netns(netns, move || -> std::io::Result<()> {
        let mut buf = [0u8; 128];
        match proto {
            Protocol::Udp => {
                let any = if to.is_ipv6() { "::" } else { "0.0.0.0" };
                let s = UdpSocket::bind((any, 0))?;
                s.connect(to)?;
                s.set_read_timeout(Some(PROBE))?;
                s.send(b"probe")?;
                s.recv(&mut buf)?;
            }
            _ => {
                // IPv6 sockets see an ICMPv6 refusal of the first SYN at once only with
                // IPV6_RECVERR (IPv4 ones always): see connect_seeing_icmp.
                let mut s = connect_seeing_icmp(to, PROBE)?;
                s.set_read_timeout(Some(PROBE))?;
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        Ok(())
    });
    (matches!(r, Ok(Ok(()))), started.elapsed())
}

/// A reachability matrix: [source][destination].
type Matrix = Vec<Vec<bool>>;

impl World {
    /// Three nodes, nine pods and their Services; `dual`: a dual-stack cluster.
    fn new(dual: bool) -> World {
        let mut tb = Testbed::new(3).unwrap();
        if dual {
            tb.add_ipv6_underlay().unwrap();
        }
        let endpoint = tb
            .start_etcd_with_config(if dual { NET_DUAL } else { NET })
            .unwrap();
        let mut d = Daemons::new(
            &endpoint,
            // --ip-masq as in kube-flannel.yml: without it the CNI bridge masquerades traffic
            // to other nodes and policies there see the node, not the pod.
            &["--ip-masq", "--proxy-mode", "nftables", "--network-policy"],
        );
        // Health on every address, so that `flannelctl status` in the hub can ask the nodes.
        d.health_ip = "0.0.0.0".into();
        for i in 0..3 {
            // Denied connections through a ClusterIP are refused with ICMP errors, which the
            // kernel rate-limits per client (1/s after a burst of 6); probes send hundreds.
            tb.exec(
                &tb.nodes[i].ns.clone(),
                &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"],
            )
            .unwrap();
            if dual {
                tb.exec(
                    &tb.nodes[i].ns.clone(),
                    &["sysctl", "-qw", "net.ipv6.icmp.ratelimit=0"],
                )
                .unwrap();
            }
            d.start(&mut tb, i);
        }
        let cni = Cni::new();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            for (p, name) in PODS.iter().enumerate() {
                // x/a x/b x/c on nodes 0 1 2, y on 1 2 0, z on 2 0 1: every node holds one
                // pod of each namespace, and same-node pairs are bridged on its cni0.
                let node = (n + p) % 3;
                let (netns, ips) = cni.add_any(&mut tb, &d, node, ns, name);
                let ip = ips[0];
                assert!(ip.is_ipv4(), "{ns}/{name}: {ips:?}");
                assert_eq!(ips.len(), if dual { 2 } else { 1 }, "{ns}/{name}: {ips:?}");
                let k = (n * 3 + p) as u8;
                let mut cluster_ips = vec![IpAddr::from(Ipv4Addr::new(10, 96, 0, 20 + k))];
                if dual {
                    cluster_ips.push(IpAddr::from(Ipv6Addr::new(
                        0xfd00,
                        0x10,
                        0x96,
                        0,
                        0,
                        0,
                        0,
                        0x20 + u16::from(k),
                    )));
                }
                servers.push((
                    IdServer::start(&netns, 80).unwrap(),
                    IdServer::start(&netns, 81).unwrap(),
                    UdpIdServer::start(&netns, &ip.to_string(), 80).unwrap(),
                    UdpIdServer::start(&netns, &ip.to_string(), 81).unwrap(),
                ));
                pods.push(TestPod {
                    view: PodView {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                        labels: labels(&[("pod", name)]),
                        ips,
                        node: format!("node{node}"),
                        ports: ports(),
                    },
                    netns,
                    node,
                    cluster_ips,
                });
            }
        }
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| (ns.to_string(), labels(&[("ns", ns)])))
            .collect();
        let mut w = World {
            tb,
            d,
            endpoint,
            families: if dual {
                vec![Family::Ip, Family::Ip6]
            } else {
                vec![Family::Ip]
            },
            network: if dual { "10.5.0.0/16" } else { "10.6.0.0/16" },
            pods,
            namespaces,
            policies: Vec::new(),
            cluster_policies: Vec::new(),
            _servers: servers,
            _cni: cni,
            files: 0,
        };
        let mut manifest = String::new();
        for ns in NAMESPACES {
            manifest += &w.namespace_yaml(ns);
        }
        for i in 0..w.pods.len() {
            manifest += &w.pod_yaml(i);
            manifest += &w.service_yaml(i);
        }
        w.ctl(&["apply"], &manifest);
        w
    }

    /// Every node's log and policy tables.
    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let table = |family: &str| {
                    self.tb
                        .exec(
                            &self.tb.nodes[i].ns,
                            &["nft", "list", "table", family, "flannel-policy"],
                        )
                        .unwrap_or_else(|e| e)
                };
                let mut tables = table("ip");
                if self.families.contains(&Family::Ip6) {
                    tables += &table("ip6");
                }
                format!("--- node {i}:\n{}\n{tables}\n", self.d.log(i))
            })
            .collect()
    }

    /// `flannelctl <args> -f <file with yaml>` in the hub (where etcd is).
    fn ctl(&mut self, args: &[&str], yaml: &str) {
        self.files += 1;
        let file = self.d.dir.path().join(format!("m{}.yaml", self.files));
        std::fs::write(&file, yaml).unwrap();
        let ctl = Path::new(BIN).parent().unwrap().join("flannelctl");
        let mut argv = vec![ctl.to_str().unwrap(), "--etcd-endpoints", &self.endpoint];
        argv.extend(args);
        argv.extend(["-f", file.to_str().unwrap()]);
        self.tb
            .exec(&self.tb.hub, &argv)
            .unwrap_or_else(|e| panic!("flannelctl {args:?}: {e}\n{yaml}"));
    }

    fn namespace_yaml(&self, ns: &str) -> String {
        let mut l = String::new();
        for (k, v) in &self.namespaces[ns] {
            l += &format!("    {k}: \"{v}\"\n");
        }
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels:\n{l}---\n")
    }

    fn pod_yaml(&self, i: usize) -> String {
        let p = &self.pods[i].view;
        let mut l = String::new();
        for (k, v) in &p.labels {
            l += &format!("    {k}: \"{v}\"\n");
        }
        let mut ports = String::new();
        for np in &p.ports {
            ports += &format!(
                "    - {{name: {}, containerPort: {}, protocol: {}}}\n",
                np.name, np.port, np.protocol
            );
        }
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{}\"\n  namespace: \"{}\"\n  labels:\n{l}spec:\n  containers:\n  - name: c\n    ports:\n{ports}---\n",
            p.name, p.namespace
        )
    }

    fn service_yaml(&self, i: usize) -> String {
        let p = &self.pods[i];
        let dual = if p.cluster_ips.len() == 2 {
            format!(
                "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [{}, \"{}\"]\n",
                p.cluster_ips[0], p.cluster_ips[1]
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{}, namespace: \"{}\"}}\nspec:\n  clusterIP: {}\n{dual}  selector: {{pod: \"{}\"}}\n  ports:\n  - {{name: t80, port: 80}}\n  - {{name: t81, port: 81}}\n  - {{name: u80, port: 80, protocol: UDP}}\n  - {{name: u81, port: 81, protocol: UDP}}\n---\n",
            p.view.name, p.view.namespace, p.cluster_ips[0], p.view.name
        )
    }

    /// Adds policies (their YAML: NetworkPolicies and ClusterNetworkPolicies) to the cluster
    /// and to the model (a ClusterNetworkPolicy of an existing name replaces it).
    fn add_policies(&mut self, yaml: &str) {
        for obj in registry::parse_documents(yaml).unwrap() {
            match obj {
                Object::NetworkPolicy(mut np) => {
                    np.metadata
                        .namespace
                        .get_or_insert_with(|| "default".into());
                    self.policies.push(np);
                }
                Object::ClusterNetworkPolicy(p) => {
                    self.cluster_policies
                        .retain(|o| o.metadata.name != p.metadata.name);
                    self.cluster_policies.push(p);
                }
                other => panic!("not a policy: {other:?}"),
            }
        }
        self.ctl(&["apply"], yaml);
    }

    /// Deletes every policy of both kinds (from the cluster and the model).
    fn clear_policies(&mut self) {
        let mut yaml = String::new();
        for np in std::mem::take(&mut self.policies) {
            yaml += &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}, namespace: \"{}\"}}\nspec: {{podSelector: {{}}}}\n---\n",
                np.metadata.name,
                np.metadata.namespace.unwrap()
            );
        }
        for p in std::mem::take(&mut self.cluster_policies) {
            yaml += &format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {}}}\n---\n",
                p.metadata.name
            );
        }
        if !yaml.is_empty() {
            self.ctl(&["delete"], &yaml);
        }
    }

    fn set_pod_label(&mut self, id: &str, key: &str, value: Option<&str>) {
        let i = self.pods.iter().position(|p| p.id() == id).unwrap();
        let l = &mut self.pods[i].view.labels;
        match value {
            Some(v) => l.insert(key.into(), v.into()),
            None => l.remove(key),
        };
        let yaml = self.pod_yaml(i);
        self.ctl(&["apply"], &yaml);
    }

    fn set_namespace_label(&mut self, ns: &str, key: &str, value: Option<&str>) {
        let l = self.namespaces.get_mut(ns).unwrap();
        match value {
            Some(v) => l.insert(key.into(), v.into()),
            None => l.remove(key),
        };
        let yaml = self.namespace_yaml(ns);
        self.ctl(&["apply"], &yaml);
    }

    /// The verdicts the semantics give over `family` (computed by the pure evaluator only).
    fn expected_verdicts(
        &self,
        family: Family,
        (proto, port): (Protocol, u16),
    ) -> Vec<Vec<Verdict>> {
        let cluster = eval::Cluster {
            namespaces: self.namespaces.clone(),
            policies: self.policies.clone(),
            cluster_policies: self.cluster_policies.clone(),
        };
        self.pods
            .iter()
            .map(|s| {
                self.pods
                    .iter()
                    .map(|d| {
                        cluster.verdict(family, Peer::Pod(&s.view), Peer::Pod(&d.view), proto, port)
                    })
                    .collect()
            })
            .collect()
    }

    /// The matrix the semantics give over `family`.
    fn expected(&self, family: Family, pp: (Protocol, u16)) -> Matrix {
        self.expected_verdicts(family, pp)
            .into_iter()
            .map(|row| row.into_iter().map(Verdict::allowed).collect())
            .collect()
    }

    /// The matrix the cluster shows over `family` (one thread per source pod) and how long
    /// each probe took.
    fn observed(
        &self,
        family: Family,
        (proto, port): (Protocol, u16),
        via_service: bool,
    ) -> (Matrix, Vec<Vec<Duration>>) {
        let rows: Vec<Vec<(bool, Duration)>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|src| {
                    s.spawn(move || {
                        self.pods
                            .iter()
                            .map(|dst| {
                                let ip = if via_service {
                                    dst.cluster_ip(family)
                                } else {
                                    dst.view.addr(family).unwrap()
                                };
                                probe_timed(&src.netns, proto, SocketAddr::from((ip, port)))
                            })
                            .collect::<Vec<(bool, Duration)>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let m = rows
            .iter()
            .map(|r| r.iter().map(|(ok, _)| *ok).collect())
            .collect();
        let took = rows
            .iter()
            .map(|r| r.iter().map(|(_, t)| *t).collect())
            .collect();
        (m, took)
    }

    fn render(&self, m: &Matrix, other: &Matrix) -> String {
        let mut s = String::from("       ");
        for p in &self.pods {
            s += &format!(" {:>5}", p.id());
        }
        s.push('\n');
        for (i, p) in self.pods.iter().enumerate() {
            s += &format!("{:>5}n{}", p.id(), p.node);
            for (j, _) in self.pods.iter().enumerate() {
                let c = if m[i][j] { "." } else { "X" };
                let mark = if m[i][j] == other[i][j] { " " } else { "!" };
                s += &format!("     {mark}{c}");
            }
            s.push('\n');
        }
        s
    }

    /// Probes every pair for each of `probes` over every family of the cluster, directly and
    /// through ClusterIPs, until the
    /// matrices equal the evaluator's (the nodes apply changes within milliseconds; the
    /// loop absorbs etcd's propagation) or [`CONVERGE`] passes; then prints both and fails.
    fn check(&self, case: &str, probes: &[(Protocol, u16)]) {
        let started = Instant::now();
        let mut rounds = Vec::new();
        for &family in &self.families {
            for &pp in probes {
                self.check_one(case, family, pp, started, &mut rounds);
            }
        }
        // Each probe round, so that slow refusals (a timeout instead of a refusal) show.
        eprintln!(
            "case {case:?}: matrices match after {:?}; rounds: {}",
            started.elapsed(),
            rounds.join(", ")
        );
    }

    /// [`World::check`] for one family and probe.
    fn check_one(
        &self,
        case: &str,
        family: Family,
        pp: (Protocol, u16),
        started: Instant,
        rounds: &mut Vec<String>,
    ) {
        let fam = match family {
            Family::Ip => "IPv4",
            Family::Ip6 => "IPv6",
        };
        let verdicts = self.expected_verdicts(family, pp);
        let want: Matrix = verdicts
            .iter()
            .map(|row| row.iter().map(|v| v.allowed()).collect())
            .collect();
        for via_service in [false, true] {
            let how = if via_service { "ClusterIP" } else { "direct" };
            let mut got;
            let mut took;
            loop {
                let t = Instant::now();
                (got, took) = self.observed(family, pp, via_service);
                rounds.push(format!("{fam} {} {} {how} {:?}", pp.0, pp.1, t.elapsed()));
                if got == want || started.elapsed() > CONVERGE {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(
                got == want,
                "case {case:?}: {fam} {} {} {how}: reachability differs ('.' allowed, 'X' denied, '!' differs)\nexpected:\n{}observed:\n{}\n{}",
                pp.0,
                pp.1,
                self.render(&want, &got),
                self.render(&got, &want),
                self.logs()
            );
            // Every TCP connection a NetworkPolicy denies is refused at once, over both
            // families, directly and through ClusterIPs (not after the client's SYN
            // retransmission); one a ClusterNetworkPolicy denies is dropped: the client
            // waits for its timeout.
            let mut wrong = Vec::new();
            for (i, src) in self.pods.iter().enumerate() {
                for (j, dst) in self.pods.iter().enumerate() {
                    let t = took[i][j];
                    let bad = match verdicts[i][j] {
                        Verdict::Allow => false,
                        Verdict::Reject => pp.0 == Protocol::Tcp && t >= QUICK,
                        Verdict::Drop => t < PROBE - Duration::from_millis(100),
                    };
                    if bad {
                        wrong.push(format!(
                            "{} -> {} {:?}: denied after {t:?}",
                            src.id(),
                            dst.id(),
                            verdicts[i][j]
                        ));
                    }
                }
            }
            assert!(
                wrong.is_empty(),
                "case {case:?}: {fam} {} {} {how}: refusals not quick (Reject) or drops not timing out (Drop):\n{}",
                pp.0,
                pp.1,
                wrong.join("\n")
            );
        }
    }
}

fn np(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: \"{ns}\"}}\nspec:\n{spec}---\n"
    )
}

fn cnp(name: &str, tier: &str, priority: u32, body: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{body}---\n"
    )
}

/// ClusterNetworkPolicy on the same matrices: tiers against NetworkPolicy, Pass, an egress
/// network, and an update that leaves established flows alone.
fn cluster_policy_cases(w: &mut World) {
    // An Admin Deny beats a NetworkPolicy that allows everything into x.
    w.add_policies(
        &(np("allow-all", "x", "  podSelector: {}\n  ingress: [{}]\n")
            + &cnp(
                "deny-y-to-x",
                "Admin",
                10,
                "  subject: {namespaces: {matchLabels: {ns: \"x\"}}}\n  ingress:\n  - {name: from-y, action: Deny, from: [{namespaces: {matchLabels: {ns: \"y\"}}}]}\n",
            )),
    );
    w.check(
        "CNP: Admin Deny beats an allowing NetworkPolicy",
        &[TCP80, UDP81],
    );
    w.clear_policies();

    // A Baseline default deny for z, opened into z/a from x by a NetworkPolicy (which then
    // decides for z/a alone: the others are refused there, not dropped).
    w.add_policies(
        &(cnp(
            "z-default-deny",
            "Baseline",
            1000,
            "  subject: {namespaces: {matchLabels: {ns: \"z\"}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
        ) + &np(
            "from-x",
            "z",
            "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"x\"}}}]}]\n",
        )),
    );
    w.check("CNP: Baseline Deny opened by a NetworkPolicy", &[TCP80]);
    w.clear_policies();

    // Pass: the b pods are passed to NetworkPolicy (x/a: only from y), everyone else into x
    // is denied by a later Admin policy.
    w.add_policies(
        &(cnp(
            "pass-b",
            "Admin",
            1,
            "  subject: {namespaces: {matchLabels: {ns: \"x\"}}}\n  ingress:\n  - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: \"b\"}}}}]}\n",
        ) + &cnp(
            "deny-into-x",
            "Admin",
            2,
            "  subject: {namespaces: {matchLabels: {ns: \"x\"}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
        ) + &np(
            "a-from-y",
            "x",
            "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]\n",
        )),
    );
    w.check("CNP: Pass to NetworkPolicy", &[TCP80]);
    w.clear_policies();

    // An egress Deny to a network: z may not reach node 1's pod subnet (both families'
    // subnets in the dual-stack cluster), on TCP 80 only.
    let env = w.d.subnet_env(1);
    let mut nets = vec![format!("\"{}\"", env.subnet.unwrap())];
    if let Some(v6) = env.ipv6_subnet {
        nets.push(format!("\"{v6}\""));
    }
    w.add_policies(&cnp(
        "z-not-to-node1",
        "Admin",
        5,
        &format!(
            "  subject: {{namespaces: {{matchLabels: {{ns: \"z\"}}}}}}\n  egress:\n  - {{action: Deny, to: [{{networks: [{}]}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}\n",
            nets.join(", ")
        ),
    ));
    w.check("CNP: egress Deny to a network", &[TCP80, TCP81]);
    w.clear_policies();

    // An update takes effect for new connections and leaves established ones alone: a UDP
    // flow from y/a to x/a (answered, so conntrack holds it) keeps working after a Deny
    // lands, while a new flow is dropped; then the Deny turns into an Accept.
    let src = w.pods.iter().find(|p| p.id() == "y/a").unwrap();
    let dst = w.pods.iter().find(|p| p.id() == "x/a").unwrap();
    let to = SocketAddr::from((dst.view.addr(Family::Ip).unwrap(), 81));
    let flow = in_netns(&src.netns, || UdpSocket::bind(("0.0.0.0", 0)))
        .unwrap()
        .unwrap();
    flow.connect(to).unwrap();
    flow.set_read_timeout(Some(PROBE)).unwrap();
    let exchange = |s: &UdpSocket| {
        let mut buf = [0u8; 128];
        s.send(b"probe").is_ok() && s.recv(&mut buf).is_ok()
    };
    assert!(exchange(&flow), "the flow before any policy");
    let deny = |action: &str| {
        cnp(
            "update",
            "Admin",
            3,
            &format!("  subject: {{namespaces: {{matchLabels: {{ns: \"x\"}}}}}}\n  ingress:\n  - {{action: {action}, from: [{{namespaces: {{matchLabels: {{ns: \"y\"}}}}}}]}}\n"),
        )
    };
    w.add_policies(&deny("Deny"));
    w.check("CNP update: Deny", &[UDP81]);
    assert!(exchange(&flow), "the established flow survives the Deny");
    w.add_policies(&deny("Accept"));
    w.check("CNP update: Deny becomes Accept", &[UDP81]);
    assert!(exchange(&flow));
    w.clear_policies();
    w.check("CNP: all gone", &[TCP80]);
}

fn can_run() -> bool {
    require_root_with(&["ip", "nft", "conntrack"])
        && require(
            Path::new(REFERENCE_PLUGINS).join("bridge").is_file(),
            "needs the reference CNI plugins in /usr/lib/cni",
        )
}

#[test]
fn network_policy_matrices() {
    if !can_run() {
        return;
    }
    matrices(&mut World::new(false));
}

/// The same cases in a dual-stack cluster, every matrix over IPv4 and IPv6, plus ipBlocks of
/// each family.
#[test]
fn network_policy_matrices_dual_stack() {
    if !can_run() {
        return;
    }
    matrices(&mut World::new(true));
}

/// Every case on `w`, over each of its families.
fn matrices(w: &mut World) {
    let started = Instant::now();
    // Every ClusterIP answers from every pod before policies: services and records landed.
    w.check("no policy", &[TCP80, UDP81]);

    w.add_policies(&np("deny-ingress", "x", "  podSelector: {}\n"));
    w.check("default deny ingress", &[TCP80, UDP80]);
    w.clear_policies();
    w.check("deletion restores access", &[TCP80]);

    w.add_policies(&np(
        "deny-egress",
        "x",
        "  podSelector: {}\n  policyTypes: [Egress]\n",
    ));
    w.check("default deny egress", &[TCP80, UDP81]);
    w.clear_policies();

    w.add_policies(
        &(np("deny", "y", "  podSelector: {}\n")
            + &np("allow-all", "y", "  podSelector: {}\n  ingress: [{}]\n")),
    );
    w.check("allow all beside deny all", &[TCP81]);
    w.clear_policies();

    w.add_policies(&np(
        "from-b",
        "x",
        "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: \"b\"}}}]}]\n",
    ));
    w.check("pod selector", &[TCP80]);
    w.clear_policies();

    w.add_policies(&np(
        "from-y",
        "x",
        "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [\"y\"]}]}}]}]\n",
    ));
    w.check("namespace selector", &[TCP80]);
    w.clear_policies();

    w.add_policies(&np(
        "and",
        "x",
        "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: \"y\"}}\n      podSelector: {matchLabels: {pod: \"b\"}}\n",
    ));
    w.check("namespace AND pod selector in one peer", &[TCP80]);
    w.clear_policies();
    w.add_policies(&np(
        "or",
        "x",
        "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: \"y\"}}\n    - podSelector: {matchLabels: {pod: \"b\"}}\n",
    ));
    w.check("namespace OR pod selector in two peers", &[TCP80]);
    w.clear_policies();

    // Everything in the cluster network except the subnet of node 1 (an IPv4 block: over
    // IPv6 the pods of y are isolated and nothing is allowed in).
    let node1 = w.d.subnet_env(1).subnet.unwrap();
    w.add_policies(&np(
        "block",
        "y",
        &format!(
            "  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {}, except: [{node1}]}}}}]}}]\n",
            w.network
        ),
    ));
    if w.families.contains(&Family::Ip6) {
        // The case can tell: the evaluator opens IPv4 into y, and not IPv6.
        assert_ne!(
            w.expected(Family::Ip, TCP80),
            w.expected(Family::Ip6, TCP80)
        );
    }
    w.check("ipBlock with except", &[TCP80]);
    w.clear_policies();

    if w.families.contains(&Family::Ip6) {
        // IPv6 blocks: the IPv6 Network except node 2's subnet into x (IPv4 stays closed), and
        // into z both families' blocks, each excepting a different node.
        let env = w.d.subnet_env(2);
        let (node2, node2_v6) = (env.subnet.unwrap(), env.ipv6_subnet.unwrap());
        let node0_v6 = w.d.subnet_env(0).ipv6_subnet.unwrap();
        w.add_policies(&(np(
            "block6",
            "x",
            &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: \"fd10::/48\", except: [\"{node2_v6}\"]}}}}]}}]\n"),
        ) + &np(
            "both",
            "z",
            &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {}, except: [{node2}]}}}}, {{ipBlock: {{cidr: \"fd10::/48\", except: [\"{node0_v6}\"]}}}}]}}]\n", w.network),
        )));
        assert_ne!(
            w.expected(Family::Ip, TCP80),
            w.expected(Family::Ip6, TCP80)
        );
        w.check("IPv6 ipBlock with except", &[TCP80, UDP81]);
        w.clear_policies();
    }

    w.add_policies(&np(
        "named",
        "x",
        "  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}, {port: serve-80-udp, protocol: UDP}]}]\n",
    ));
    w.check("named ports", &[TCP80, TCP81, UDP80, UDP81]);
    w.clear_policies();

    w.add_policies(&np(
        "range",
        "z",
        "  podSelector: {}\n  ingress: [{ports: [{port: 81, endPort: 90}]}]\n",
    ));
    w.check("endPort range", &[TCP80, TCP81]);
    w.clear_policies();

    w.add_policies(&np(
        "udp",
        "y",
        "  podSelector: {matchLabels: {pod: \"c\"}}\n  ingress: [{ports: [{protocol: UDP, port: 81}]}]\n",
    ));
    w.check("UDP only", &[TCP81, UDP81, UDP80]);
    w.clear_policies();

    // Two policies select z/a: their rules add up.
    w.add_policies(&(np(
        "from-x",
        "z",
        "  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"x\"}}}]}]\n",
    ) + &np(
        "from-c",
        "z",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: \"c\"}}}], ports: [{port: 80}]}]\n",
    )));
    w.check("policies combine", &[TCP80, TCP81]);
    w.clear_policies();

    // Label changes: pods and namespaces gaining and losing labels.
    w.add_policies(&np(
        "clients",
        "x",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: blue}}\n      podSelector: {matchLabels: {role: client}}\n",
    ));
    w.check("labels: nobody matches yet", &[TCP80]);
    w.set_pod_label("y/b", "role", Some("client"));
    w.set_pod_label("z/c", "role", Some("client"));
    w.set_namespace_label("y", "team", Some("blue"));
    w.check("labels: y/b matches", &[TCP80]);
    w.set_namespace_label("z", "team", Some("blue"));
    w.set_pod_label("y/b", "role", None);
    w.check("labels: z/c instead of y/b", &[TCP80]);
    w.clear_policies();
    w.set_pod_label("z/c", "role", None);
    w.set_namespace_label("y", "team", None);
    w.set_namespace_label("z", "team", None);

    // Egress: x may reach only y/c's port 80 (directly or through its Service) and nothing
    // else; y/c accepts only from x.
    w.add_policies(&(np(
        "to-y-c",
        "x",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: \"y\"}}, podSelector: {matchLabels: {pod: \"c\"}}}], ports: [{port: 80}, {port: 80, protocol: UDP}]}]\n",
    ) + &np(
        "from-x",
        "y",
        "  podSelector: {matchLabels: {pod: \"c\"}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"x\"}}}]}]\n",
    )));
    w.check("egress to a service backend", &[TCP80, UDP80, TCP81]);
    w.clear_policies();
    w.check("all policies gone", &[TCP80, UDP80]);

    cluster_policy_cases(w);

    // `flannelctl status` from the hub: every node ready with its two peers programmed and
    // policy on (br_netfilter present).
    let ctl = Path::new(BIN).parent().unwrap().join("flannelctl");
    let out =
        w.tb.exec(
            &w.tb.hub,
            &[
                ctl.to_str().unwrap(),
                "--etcd-endpoints",
                &w.endpoint,
                "status",
                "--health-port",
                &common::HEALTH.1.to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("flannelctl status: {e}"));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert_eq!(
        rows[0],
        ["NODE", "SUBNET", "BACKEND", "PEERS", "POLICY", "READY"],
        "{out}"
    );
    for r in &rows[1..] {
        assert_eq!(&r[2..], ["vxlan", "2", "on", "yes"], "{out}");
    }
    eprintln!("all cases over {:?} in {:?}", w.families, started.elapsed());
}

/// `flannelctl apply -f` of `yaml` in the hub.
fn apply(tb: &Testbed, d: &Daemons, endpoint: &str, yaml: &str) {
    let file = d.dir.path().join(format!("u{}.yaml", random_tag(6)));
    std::fs::write(&file, yaml).unwrap();
    let ctl = Path::new(BIN).parent().unwrap().join("flannelctl");
    tb.exec(
        &tb.hub,
        &[
            ctl.to_str().unwrap(),
            "--etcd-endpoints",
            endpoint,
            "apply",
            "-f",
            file.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("flannelctl apply: {e}\n{yaml}"));
}

/// Polls `f` until it returns `want` or [`CONVERGE`] passes; returns the last answer.
fn settle(want: bool, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        let got = f();
        if got == want || started.elapsed() > CONVERGE {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Userspace mode relays every Service connection from the node, which the policy table
/// always lets through (own node) or sees coming from a node: the policy gate must judge the
/// original client instead, and the listeners must take only redirected connections.
#[test]
fn userspace_mode_keeps_policy() {
    userspace_policy(false);
}

/// The same in a dual-stack cluster with a dual-stack Service: its IPv6 ClusterIP is relayed
/// by the userspace proxy behind the gate (judged exactly as IPv4: the allowed client gets
/// in over IPv6, the denied ones on both nodes are refused at once, counted by the gate),
/// and the IPv6 listeners take only redirected connections too.
#[test]
fn userspace_mode_keeps_policy_dual_stack() {
    userspace_policy(true);
}

fn userspace_policy(dual: bool) {
    if !require_root_with(&["ip", "nft", "conntrack"])
        || !require(
            Path::new(REFERENCE_PLUGINS).join("bridge").is_file(),
            "needs the reference CNI plugins in /usr/lib/cni",
        )
    {
        return;
    }
    let mut tb = Testbed::new(2).unwrap();
    let v6 = if dual {
        tb.add_ipv6_underlay().unwrap()
    } else {
        Vec::new()
    };
    let endpoint = tb
        .start_etcd_with_config(if dual { NET_DUAL } else { NET })
        .unwrap();
    let mut d = Daemons::new(
        &endpoint,
        &["--ip-masq", "--proxy-mode", "userspace", "--network-policy"],
    );
    for i in 0..2 {
        d.start(&mut tb, i);
    }
    let cni = Cni::new();
    // The server and two clients on node 0 (their relays leave from node 0 itself, which
    // the table always allows), a third client on node 1 (relayed there).
    let (srv_ns, _) = cni.add_any(&mut tb, &d, 0, "x", "srv");
    let _srv = IdServer::start(&srv_ns, 80).unwrap();
    let (ok_ns, _) = cni.add_any(&mut tb, &d, 0, "y", "ok");
    let (bad_ns, _) = cni.add_any(&mut tb, &d, 0, "y", "bad");
    let (far_ns, _) = cni.add_any(&mut tb, &d, 1, "y", "far");
    let pod = |ns: &str, name: &str, labels: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: \"{ns}\", labels: {{{labels}}}}}\nspec:\n  containers: [{{name: c}}]\n---\n")
    };
    let cluster_ip: Ipv4Addr = "10.96.0.50".parse().unwrap();
    let cluster_ip6: Ipv6Addr = "fd00:10:96::50".parse().unwrap();
    let families = if dual {
        format!("  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [{cluster_ip}, \"{cluster_ip6}\"]\n")
    } else {
        String::new()
    };
    apply(
        &tb,
        &d,
        &endpoint,
        &(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: \"x\"}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: \"y\"}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: \"x\"}}\nspec:\n  clusterIP: {cluster_ip}\n{families}  selector: {{app: web}}\n  ports: [{{port: 80}}]\n---\n"
        ) + &pod("x", "srv", "app: web")
            + &pod("y", "ok", "role: client")
            + &pod("y", "bad", "role: other")
            + &pod("y", "far", "role: other")),
    );
    let mut services = vec![SocketAddr::from((cluster_ip, 80))];
    if dual {
        services.push(SocketAddr::from((cluster_ip6, 80)));
    }
    let logs = || format!("--- node 0:\n{}\n--- node 1:\n{}", d.log(0), d.log(1));
    for service in &services {
        for ns in [&ok_ns, &bad_ns, &far_ns] {
            assert!(
                settle(true, || probe(ns, Protocol::Tcp, *service)),
                "{ns}: no relay through the ClusterIP {service} before any policy\n{}",
                logs()
            );
        }
    }

    // The listener's own port, addressed directly: from another node, and from a pod of
    // the node (to its gateway address). Before any policy a relay would be allowed, so only
    // the guard stops these.
    let listener = |family: &str| -> u16 {
        let listeners = tb
            .exec(
                &tb.nodes[0].ns,
                &[
                    "nft",
                    "list",
                    "set",
                    family,
                    "flannel-proxy",
                    "userspace-listeners",
                ],
            )
            .unwrap();
        listeners
            .split("tcp . ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no TCP listener in {listeners}"))
    };
    let port = listener("ip");
    let node0: Ipv4Addr = tb.nodes[0].ip.parse().unwrap();
    let gateway = d.subnet_env(0).subnet.unwrap().addr();
    assert!(
        !probe(
            &tb.nodes[1].ns,
            Protocol::Tcp,
            SocketAddr::from((node0, port))
        ),
        "another node reached the listener {node0}:{port} directly"
    );
    assert!(
        !probe(&ok_ns, Protocol::Tcp, SocketAddr::from((gateway, port))),
        "a pod reached the listener {gateway}:{port} directly"
    );
    if dual {
        let port = listener("ip6");
        let node0: Ipv6Addr = v6[0].parse().unwrap();
        let net6 = d.subnet_env(0).ipv6_subnet.unwrap().addr();
        let gateway = Ipv6Addr::from(u128::from(net6) + 1);
        for (from, to) in [(&tb.nodes[1].ns, node0), (&ok_ns, gateway)] {
            assert!(
                !probe(from, Protocol::Tcp, SocketAddr::from((to, port))),
                "{from} reached the IPv6 listener [{to}]:{port} directly"
            );
        }
    }

    // Only clients (role=client) may reach x/srv.
    apply(
        &tb,
        &d,
        &endpoint,
        &np(
            "clients",
            "x",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]\n",
        ),
    );
    for service in &services {
        let denied = |i: usize| common::metric(&tb, i, "flannel_proxy_connections_denied_total");
        let before = [denied(0), denied(1)];
        assert!(
            !settle(false, || probe(&bad_ns, Protocol::Tcp, *service)),
            "y/bad (same node) reached x/srv through the ClusterIP {service} in userspace mode\n{}",
            logs()
        );
        assert!(
            probe(&ok_ns, Protocol::Tcp, *service),
            "y/ok lost its access to {service}\n{}",
            logs()
        );
        assert!(
            !settle(false, || probe(&far_ns, Protocol::Tcp, *service)),
            "y/far (node 1) reached x/srv through the ClusterIP {service}\n{}",
            logs()
        );
        // A denied relay is refused at once (a reset from the listener), not timed out.
        for ns in [&bad_ns, &far_ns] {
            let t = Instant::now();
            assert!(!probe(ns, Protocol::Tcp, *service));
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{ns} -> {service} refused only after {:?}",
                t.elapsed()
            );
        }
        // Both nodes refused at the relay (node 1's gate, not only node 0's table), over
        // this family.
        for (i, b) in before.iter().enumerate() {
            assert!(
                denied(i) > *b,
                "node {i} denied no relay to {service}\n{}",
                logs()
            );
        }
    }
    let _ = srv_ns;
}
