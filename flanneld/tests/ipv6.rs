//! IPv6 and dual stack end to end (issue 22): three namespace nodes on a dual-stack underlay,
//! real etcd, kernel VXLAN / routes / the udp backend's TUN and nftables, pods attached through the CNI chain (flannel
//! plugin → reference bridge + host-local). Every pod pair over IPv4 and IPv6, TCP and UDP,
//! source addresses kept inside the cluster and masqueraded to the node's address outside it;
//! the lease values and kernel state flannel's dual-stack nodes expect. Needs root; skips with a
//! reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use test_support::{require_root_with, wait_for, Pod, Testbed, WhoAmIServer, HUB_IP6};

mod common;

use common::{full_mesh, metric, sock, start_servers, Cni, Daemons, Ticker, MAX_GAP_MS};

const PORT: u16 = 5001;
const HASH_PORT: u16 = 5002;

struct Cluster {
    tb: Testbed,
    d: Daemons,
    /// The nodes' underlay IPv6 addresses.
    v6: Vec<String>,
    /// Each pod's namespace, node and addresses.
    pods: Vec<(String, usize, Vec<IpAddr>)>,
    /// The daemons' testbed handles.
    handles: Vec<usize>,
}

impl Cluster {
    /// Three nodes with flanneld (`--ip-masq` plus `extra`) on the network config `conf`.
    fn start(conf: &str, extra: &[&str]) -> Option<Cluster> {
        if !require_root_with(&["ip", "bridge", "nft", "etcd", "etcdctl"]) {
            return None;
        }
        let mut tb = Testbed::new(3).unwrap();
        let v6 = tb.add_ipv6_underlay().unwrap();
        let endpoint = tb.start_etcd_with_config(conf).unwrap();
        let mut args = vec!["--ip-masq"];
        args.extend_from_slice(extra);
        let mut d = Daemons::new(&endpoint, &args);
        let handles = (0..3).map(|i| d.start(&mut tb, i)).collect();
        Some(Cluster {
            tb,
            d,
            v6,
            pods: Vec::new(),
            handles,
        })
    }

    /// Two pods per node through the CNI chain.
    fn add_pods(&mut self) {
        let cni = Cni::new();
        for i in 0..3 {
            for k in 0..2 {
                let (ns, ips) =
                    cni.add_any(&mut self.tb, &self.d, i, "default", &format!("p{i}{k}"));
                self.pods.push((ns, i, ips));
            }
        }
    }

    /// The pods as [`Pod`]s with their address of one family.
    fn pods_of(&self, v6: bool) -> Vec<Pod> {
        self.pods
            .iter()
            .map(|(ns, node, ips)| {
                let ip = ips
                    .iter()
                    .find(|ip| ip.is_ipv6() == v6)
                    .unwrap_or_else(|| panic!("pod {ns} has no {} address: {ips:?}", fam(v6)));
                Pod {
                    ns: ns.clone(),
                    ip: ip.to_string(),
                    node: *node,
                }
            })
            .collect()
    }

    fn node(&self, i: usize, args: &[&str]) -> String {
        self.tb
            .exec(&self.tb.nodes[i].ns, args)
            .unwrap_or_else(|e| panic!("{args:?} on node {i}: {e}"))
    }

    /// `flannelctl apply` of `yaml` (from the hub).
    fn apply(&self, yaml: &str) {
        let file = self
            .d
            .dir
            .path()
            .join(format!("o{}.yaml", test_support::random_tag(6)));
        std::fs::write(&file, yaml).unwrap();
        let ctl = std::path::Path::new(common::BIN)
            .parent()
            .unwrap()
            .join("flannelctl");
        let ep = self.tb.etcd.as_ref().unwrap().endpoint();
        let args = [
            ctl.to_str().unwrap(),
            "--etcd-endpoints",
            &ep,
            "apply",
            "-f",
            file.to_str().unwrap(),
        ];
        self.tb
            .exec(&self.tb.hub, &args)
            .unwrap_or_else(|e| panic!("flannelctl apply: {e}"));
    }

    /// Every lease value in etcd.
    fn leases(&self) -> Vec<(String, String)> {
        let out = self
            .tb
            .etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])
            .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
            .collect()
    }
}

fn fam(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// A pod reaches a host outside the cluster (the hub, over IPv6) as its node's address.
fn masquerades_to_the_outside(c: &Cluster) {
    let _outside = WhoAmIServer::start(&c.tb.hub, PORT).unwrap();
    for (ns, node, ips) in &c.pods {
        if !ips.iter().any(IpAddr::is_ipv6) {
            continue;
        }
        let seen = wait_for(Duration::from_secs(10), || {
            test_support::whoami(ns, sock(HUB_IP6, PORT), Duration::from_secs(2)).ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "pod {ns} cannot reach the hub over IPv6:\n{}",
                c.d.log(*node)
            )
        });
        assert_eq!(
            seen, c.v6[*node],
            "IPv6 to the outside leaves as the node's address"
        );
    }
}

fn dual_stack(backend: &str) {
    let conf = format!(
        r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{backend}"}}}}"#
    );
    let Some(mut c) = Cluster::start(&conf, &[]) else {
        return;
    };
    // IPv6 VXLAN costs 70 bytes; udp keeps its IPv4 underlay in dual stack (28).
    let mtu = match backend {
        "vxlan" => 1430,
        "udp" => 1472,
        _ => 1500,
    };
    for i in 0..3 {
        let env = c.d.subnet_env(i);
        assert!(env.subnet.is_some(), "{env:?}");
        assert_eq!(env.ipv6_network, Some("fd10::/48".parse().unwrap()));
        let v6 = env
            .ipv6_subnet
            .unwrap_or_else(|| panic!("no IPv6 subnet:\n{}", c.d.log(i)));
        assert_eq!(v6.prefix_len(), 64);
        assert_eq!(env.mtu, mtu, "FLANNEL_MTU of {backend}");
    }
    // Lease values as flannel's dual-stack nodes write them.
    let leases = c.leases();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (key, value) in &leases {
        assert!(key.contains("&fd10:0:0:"), "dual-stack key {key}");
        assert!(value.contains(r#""PublicIPv6":"fd00:210::"#), "{value}");
        assert!(
            value.contains(&format!(r#""BackendType":"{backend}""#)),
            "{value}"
        );
        assert_eq!(
            value.contains(r#""BackendV6Data":{"VNI":1,"VtepMAC":"#),
            backend == "vxlan",
            "{value}"
        );
    }
    c.add_pods();
    let v4 = c.pods_of(false);
    let v6 = c.pods_of(true);
    let _servers = start_servers(&v4, PORT, HASH_PORT);
    let log = |i: usize| c.d.log(i);
    full_mesh(&v4, PORT, log);
    full_mesh(&v6, PORT, log);

    // Kernel state on node 0 for each peer.
    let routes = c.node(0, &["ip", "-6", "route", "show"]);
    if backend == "udp" {
        udp_device(&c, "fd10::/48", 1472);
        udp_bulk_v6(&c, &v6);
        masquerades_to_the_outside(&c);
        return;
    }
    for i in 1..3 {
        let env = c.d.subnet_env(i);
        let peer = env.ipv6_subnet.unwrap().trunc();
        // flannel's routes: onlink via the peer's network address on flannel-v6.1 (vxlan),
        // via the peer's PublicIPv6 on the underlay (host-gw).
        let (want, onlink) = if backend == "vxlan" {
            (
                format!("{peer} via {} dev flannel-v6.1 ", peer.network()),
                true,
            )
        } else {
            (format!("{peer} via {} dev eth0 ", c.v6[i]), false)
        };
        let line = routes.lines().find(|l| l.starts_with(&want));
        assert!(
            line.is_some_and(|l| l.contains(" onlink") == onlink),
            "want {want:?} (onlink {onlink}) in\n{routes}"
        );
    }
    if backend == "vxlan" {
        let link = c.node(0, &["ip", "-d", "link", "show", "flannel-v6.1"]);
        assert!(
            link.contains(&format!("local {}", c.v6[0])) && link.contains("mtu 1430"),
            "{link}"
        );
    }
    masquerades_to_the_outside(&c);
}

#[test]
fn dual_stack_vxlan() {
    dual_stack("vxlan");
}

#[test]
fn dual_stack_host_gw() {
    dual_stack("host-gw");
}

/// udp in dual stack: both inner families over flannel's IPv4 underlay.
#[test]
fn dual_stack_udp() {
    dual_stack("udp");
}

/// flannel0 on node 0: our IPv6 subnet's network address /128 and no link-local address
/// (`addr_gen_mode` 1), one route for the IPv6Network, the MTU; the IPv6 datagrams between
/// nodes left the hub's way as udp (port 8285) and arrived through the ingress checks.
fn udp_device(c: &Cluster, net6: &str, mtu: u32) {
    let own = c.d.subnet_env(0).ipv6_subnet.unwrap().trunc();
    let addrs = c.node(0, &["ip", "-6", "addr", "show", "dev", "flannel0"]);
    assert!(
        addrs.contains(&format!("inet6 {}/128", own.network())),
        "{addrs}"
    );
    assert!(!addrs.contains("fe80:"), "no link-local address:\n{addrs}");
    let link = c.node(0, &["ip", "link", "show", "flannel0"]);
    assert!(link.contains(&format!("mtu {mtu}")), "{link}");
    let routes = c.node(0, &["ip", "-6", "route", "show", "dev", "flannel0"]);
    assert!(
        routes.lines().any(|l| l.starts_with(&format!("{net6} "))),
        "route for the IPv6Network via flannel0:\n{routes}"
    );
    // Counters reach /metrics at each resync.
    let rx = wait_for(Duration::from_secs(5), || {
        (common::backend_counter(&c.tb, 0, "udp_rx_packets") > 0).then_some(())
    });
    assert!(rx.is_some(), "udp received nothing:\n{}", c.d.log(0));
}

/// A large TCP transfer over IPv6 from a pod on node 0 to one on node 2 arrives byte for byte,
/// and node 2's udp backend wrote coalesced TCPv6 super-packets to its TUN on the way.
fn udp_bulk_v6(c: &Cluster, v6: &[Pod]) {
    let before = common::backend_counter(&c.tb, 2, "udp_tun_coalesced_writes");
    test_support::send_and_verify(
        &v6[0].ns,
        sock(&v6[4].ip, HASH_PORT),
        16 << 20,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("IPv6 bulk transfer: {e}\n{}", c.d.log(2)));
    let coalesced = wait_for(Duration::from_secs(10), || {
        let n = common::backend_counter(&c.tb, 2, "udp_tun_coalesced_writes");
        (n > before).then_some(n)
    });
    assert!(
        coalesced.is_some(),
        "no coalesced TUN write on node 2 ({before} before)\n{}",
        c.d.log(2)
    );
}

/// An IPv6-only cluster (`EnableIPv4: false`): flannel's `0.0.0.0-0&…` keys with
/// `"PublicIP":"0.0.0.0"`, a subnet file without IPv4 lines, pods with only IPv6 addresses.
#[test]
fn ipv6_only_vxlan() {
    ipv6_only("vxlan");
}

/// udp on an IPv6-only cluster: the socket on the node's IPv6 address, peers reached at their
/// PublicIPv6, MTU 1500 − 48.
#[test]
fn ipv6_only_udp() {
    ipv6_only("udp");
}

fn ipv6_only(backend: &str) {
    let conf = format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{backend}"}}}}"#
    );
    let Some(mut c) = Cluster::start(&conf, &[]) else {
        return;
    };
    for i in 0..3 {
        let env = c.d.subnet_env(i);
        assert_eq!(env.subnet, None, "{env:?}");
        assert_eq!(env.network, None, "{env:?}");
        assert!(env.ipv6_subnet.is_some(), "{env:?}");
        if backend == "udp" {
            assert_eq!(env.mtu, 1452, "udp over IPv6: 1500 - 48");
        }
    }
    for (key, value) in c.leases() {
        assert!(key.contains("/subnets/0.0.0.0-0&fd10:0:0:"), "{key}");
        assert!(
            value.starts_with(r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:210::"#),
            "{value}"
        );
        assert!(!value.contains(r#""BackendData""#), "{value}");
    }
    c.add_pods();
    for (ns, _, ips) in &c.pods {
        assert!(ips.iter().all(IpAddr::is_ipv6), "{ns}: {ips:?}");
    }
    let v6 = c.pods_of(true);
    let _servers = start_servers(&v6, PORT, HASH_PORT);
    full_mesh(&v6, PORT, |i| c.d.log(i));
    let links = c.node(0, &["ip", "link", "show"]);
    assert!(
        !links.contains("flannel.1:"),
        "no IPv4 VXLAN device:\n{links}"
    );
    if backend == "udp" {
        udp_device(&c, "fd10::/48", 1452);
        udp_bulk_v6(&c, &v6);
        let v4 = c.node(0, &["ip", "-4", "addr", "show", "dev", "flannel0"]);
        assert!(!v4.contains("inet "), "no IPv4 on flannel0:\n{v4}");
        let sockets = c.node(0, &["ss", "-uln"]);
        assert!(
            sockets.contains(&format!("[{}]:8285", c.v6[0])),
            "udp socket on the node's IPv6 address:\n{sockets}"
        );
    }
    masquerades_to_the_outside(&c);
}

/// Live switches vxlan → host-gw → vxlan in a dual-stack cluster, with a TCP stream over IPv4
/// and one over IPv6 between pods on different nodes running throughout: neither pauses as
/// long as TCP's retransmission timeout, the old backend's IPv6 state goes, every pod pair
/// still reaches every other over both families, and `--cleanup` then removes both host-rule
/// tables and both VXLAN devices.
/// The network config of the dual-stack cluster with backend type `t`.
fn dual_conf(t: &str) -> String {
    format!(
        r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{t}"}}}}"#
    )
}

/// Switches the running dual-stack cluster live through `steps` (old type, new type) while
/// a TCP stream per family runs between pods on node 0 and node 1: every node advertises the
/// new type, the old backend's IPv6 state goes, every pod pair of both families connects, and
/// neither stream lost a segment (no retransmission) or stalled. Returns the streams.
fn switch_live(c: &Cluster, v4: &[Pod], v6: &[Pod], steps: &[(&str, &str)]) -> (Ticker, Ticker) {
    // Pods 0, 1 are on node 0 and 2, 3 on node 1 (one echo server per pod namespace).
    let t4 = Ticker::start(&v4[0], &v4[2]);
    let t6 = Ticker::start(&v6[1], &v6[3]);
    std::thread::sleep(Duration::from_millis(500));
    t4.take_max_gap_ms();
    t6.take_max_gap_ms();
    for &(old, new) in steps {
        c.tb.etcdctl(&["put", "/coreos.com/network/config", &dual_conf(new)])
            .unwrap();
        let switched = wait_for(Duration::from_secs(20), || {
            let leases = c.leases();
            leases
                .iter()
                .all(|(_, v)| v.contains(&format!(r#""BackendType":"{new}""#)))
                .then_some(())
        });
        assert!(
            switched.is_some(),
            "not every node switched to {new}: {:?}",
            c.leases()
        );
        // The old backend's IPv6 state goes once every peer advertises the new type.
        for n in 0..3 {
            let gone = wait_for(Duration::from_secs(10), || {
                let left = match old {
                    "vxlan" => c
                        .node(n, &["ip", "-o", "link", "show"])
                        .contains("flannel-v6.1"),
                    "udp" => c
                        .node(n, &["ip", "-o", "link", "show"])
                        .contains("flannel0"),
                    _ => c
                        .node(n, &["ip", "-6", "route", "show", "dev", "eth0"])
                        .lines()
                        .any(|l| l.starts_with("fd10:") && l.contains(" via ")),
                };
                (!left).then_some(())
            });
            assert!(
                gone.is_some(),
                "node {n} keeps {old} IPv6 state:\n{}",
                c.d.log(n)
            );
        }
        full_mesh(v4, PORT, |i| c.d.log(i));
        full_mesh(v6, PORT, |i| c.d.log(i));
        for (fam, t) in [("IPv4", &t4), ("IPv6", &t6)] {
            assert!(
                t.alive(),
                "the {fam} TCP stream broke switching {old} -> {new}"
            );
            let gap = t.take_max_gap_ms();
            println!("switch {old} -> {new}: longest {fam} gap {gap:.0} ms");
            // No segment lost (a retransmission is the proof of one); the gap bound only
            // catches a stall that lost nothing, with room for a busy machine's scheduling.
            let lost = t.retransmissions();
            let logs = || format!("--- node 0:\n{}\n--- node 1:\n{}", c.d.log(0), c.d.log(1));
            assert!(
                lost.is_empty(),
                "{old} -> {new}: {fam} segments lost: {lost:?}\n{}",
                logs()
            );
            assert!(
                gap < 4.0 * MAX_GAP_MS,
                "{old} -> {new}: the {fam} stream stalled {gap:.0} ms\n{}",
                logs()
            );
        }
        assert!((0..3).all(|n| metric(&c.tb, n, "flannel_backend_switches_total") >= 1));
    }
    (t4, t6)
}

#[test]
fn dual_stack_live_switch_and_cleanup() {
    let Some(mut c) = Cluster::start(&dual_conf("vxlan"), &[]) else {
        return;
    };
    c.add_pods();
    let v4 = c.pods_of(false);
    let v6 = c.pods_of(true);
    let _servers = start_servers(&v4, PORT, HASH_PORT);
    full_mesh(&v6, PORT, |i| c.d.log(i));
    let (t4, t6) = switch_live(&c, &v4, &v6, &[("vxlan", "host-gw"), ("host-gw", "vxlan")]);
    drop((t4, t6));
    // --cleanup on node 2 (its daemon stopped first) removes both tables and both devices.
    let tables = c.node(2, &["nft", "list", "tables"]);
    assert!(tables.contains("table ip6 flannel"), "{tables}");
    let status = c.tb.stop(c.handles[2], Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", c.d.log(2));
    let file = c.d.env_file(2);
    let ep = c.tb.etcd.as_ref().unwrap().endpoint();
    let out = c.tb.exec(
        &c.tb.nodes[2].ns.clone(),
        &[
            common::BIN,
            "--cleanup",
            "--etcd-endpoints",
            &ep,
            "--subnet-file",
            file.to_str().unwrap(),
        ],
    );
    let tables = c.node(2, &["nft", "list", "tables"]);
    let links = c.node(2, &["ip", "-o", "link", "show"]);
    assert!(out.is_ok(), "--cleanup: {out:?}");
    assert!(
        !tables.contains("table ip flannel\n")
            && !tables.contains("table ip6 flannel\n")
            && !links.contains("flannel.1")
            && !links.contains("flannel-v6.1"),
        "left after --cleanup:\n{tables}\n{links}"
    );
}

/// vxlan → udp → vxlan live in dual stack: the udp backend carries both inner families over
/// the IPv4 underlay (flannel0 with the IPv6 /128 and the IPv6Network route), made before the
/// vxlan devices are broken and the other way round, with a TCP stream per family that loses
/// no segment.
#[test]
fn dual_stack_live_switch_udp() {
    let Some(mut c) = Cluster::start(&dual_conf("vxlan"), &[]) else {
        return;
    };
    c.add_pods();
    let v4 = c.pods_of(false);
    let v6 = c.pods_of(true);
    let _servers = start_servers(&v4, PORT, HASH_PORT);
    full_mesh(&v6, PORT, |i| c.d.log(i));
    let streams = switch_live(&c, &v4, &v6, &[("vxlan", "udp")]);
    // On udp: flannel0 carries IPv6 (its /128 and the IPv6Network route; MTU 1500 − 28).
    udp_device(&c, "fd10::/48", 1472);
    drop(streams);
    let streams = switch_live(&c, &v4, &v6, &[("udp", "vxlan")]);
    drop(streams);
    for n in 0..3 {
        let links = c.node(n, &["ip", "-o", "link", "show"]);
        assert!(
            links.contains("flannel.1") && links.contains("flannel-v6.1"),
            "node {n} has no vxlan devices back:\n{links}"
        );
    }
}

/// A dual-stack Service (`RequireDualStack`, clusterIPs in both families) on the nftables
/// service proxy: reached at its IPv4 and its IPv6 ClusterIP from pods on every node, each
/// family DNATed to an endpoint address of the same family (pods from the CNI chain, matched
/// by the Service's selector), a Service without endpoints refused over IPv6, and cluster DNS
/// answering A and AAAA with the two ClusterIPs.
#[test]
fn dual_stack_service_on_the_nftables_proxy() {
    dual_stack_service("nftables");
}

/// The same on the userspace service proxy: each family's ClusterIP redirected (tables ip and
/// ip6 flannel-proxy) to a listener of the daemon that relays to an endpoint of that family.
#[test]
fn dual_stack_service_on_the_userspace_proxy() {
    dual_stack_service("userspace");
}

fn dual_stack_service(mode: &str) {
    let conf = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
    if !require_root_with(&["dig"]) {
        return;
    }
    // Nothing listens there: cluster names need no upstream.
    let upstream = "172.30.0.1:53".to_string();
    let flags = [
        "--proxy-mode",
        mode,
        "--cluster-dns",
        "--cluster-dns-upstream",
        &upstream,
    ];
    let Some(mut c) = Cluster::start(conf, &flags) else {
        return;
    };
    c.add_pods();
    let _servers: Vec<test_support::IdServer> = c
        .pods
        .iter()
        .map(|(ns, _, _)| test_support::IdServer::start(ns, 8080).unwrap())
        .collect();
    let mut yaml = String::new();
    for i in 0..3 {
        for k in 0..2 {
            yaml += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}{k}\n  labels:\n    app: web\nspec:\n  containers:\n  - name: c\n---\n"
            );
        }
    }
    yaml += "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector:\n    app: web\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:10:96::10\"]\n  ports:\n  - port: 80\n    targetPort: 8080\n---\n";
    yaml += "apiVersion: v1\nkind: Service\nmetadata:\n  name: empty\nspec:\n  selector:\n    app: none\n  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: \"fd00:10:96::11\"\n  ports:\n  - port: 80\n";
    c.apply(&yaml);
    let endpoints: Vec<IpAddr> = c.pods.iter().flat_map(|(_, _, ips)| ips.clone()).collect();
    for (ns, node, _) in c.pods.iter().step_by(2) {
        for vip in ["10.96.0.10", "fd00:10:96::10"] {
            let to = sock(vip, 80);
            let (local, _peer) = wait_for(Duration::from_secs(20), || {
                test_support::who_serves(ns, to, Duration::from_secs(2)).ok()
            })
            .unwrap_or_else(|| panic!("{ns} cannot reach {to}:\n{}", c.d.log(*node)));
            let local: IpAddr = local.parse().unwrap();
            assert_eq!(local.is_ipv6(), to.is_ipv6(), "{to} served by {local}");
            assert!(endpoints.contains(&local), "{to} served by {local}, no pod");
        }
        // No endpoint: refused at once (not a timeout).
        let t = std::time::Instant::now();
        let r = test_support::who_serves(ns, sock("fd00:10:96::11", 80), Duration::from_secs(3));
        assert!(
            r.is_err() && t.elapsed() < Duration::from_secs(2),
            "{r:?} after {:?}",
            t.elapsed()
        );
        for (rr, want) in [("A", "10.96.0.10"), ("AAAA", "fd00:10:96::10")] {
            let name = "web.default.svc.cluster.local";
            let args = [
                "dig",
                "+short",
                "+time=1",
                "+tries=2",
                "@169.254.20.10",
                rr,
                name,
            ];
            let got = wait_for(Duration::from_secs(10), || {
                let out = c.tb.exec(ns, &args).ok()?;
                (out.trim() == want).then_some(())
            });
            assert!(
                got.is_some(),
                "{rr} {name} from {ns}: {:?}",
                c.tb.exec(ns, &args)
            );
        }
    }
}

/// A dual-stack vxlan node restarted (SIGTERM, then started again) loses no packet of either
/// family: numbered UDP probes every 2 ms between pods on node 0 and node 1, over IPv4 and
/// IPv6 in both directions, all delivered while node 0's daemon restarts and adopts both VXLAN
/// devices, their neighbours, FDB entries and routes.
#[test]
fn dual_stack_restart_loses_no_probe() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use test_support::probe::{window, Probe};
    let conf = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
    let Some(mut c) = Cluster::start(conf, &[]) else {
        return;
    };
    c.add_pods();
    let (v4, v6) = (c.pods_of(false), c.pods_of(true));
    let servers = start_servers(&v4, PORT, HASH_PORT);
    full_mesh(&v6, PORT, |i| c.d.log(i));
    drop(servers);
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = std::time::Instant::now();
    let every = Duration::from_millis(2);
    let mut probes = Vec::new();
    for (a, b) in [(&v4[0], &v4[2]), (&v6[1], &v6[3])] {
        probes.push(Probe::start(a, b, 5012, every, epoch, stop.clone()).unwrap());
        probes.push(Probe::start(b, a, 5012, every, epoch, stop.clone()).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    let s = window(&probes, || -> Result<(), String> {
        let status = c.tb.stop(c.handles[0], Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", c.d.log(0));
        c.handles[0] = c.d.start(&mut c.tb, 0);
        wait_for(Duration::from_secs(20), || {
            common::http(&c.tb, 0, "/readyz")
                .starts_with("HTTP/1.1 200")
                .then_some(())
        })
        .ok_or_else(|| {
            format!(
                "not ready after the restart ({:?}):\n{}",
                common::http(&c.tb, 0, "/readyz"),
                c.d.log(0)
            )
        })?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    })
    .unwrap();
    println!(
        "dual-stack vxlan restart: {} lost, longest gap {:.1} ms",
        s.lost, s.gap_ms
    );
    assert_eq!(s.lost, 0, "probes lost across the restart:\n{}", c.d.log(0));
    assert!(
        c.d.log(0).contains("reusing existing lease"),
        "{}",
        c.d.log(0)
    );
}

/// NetworkPolicy in a dual-stack cluster: a pod isolated for ingress is reached over both
/// families only from the pods a rule allows, an IPv6 ipBlock opens IPv6 alone, and no IPv6
/// packet slips past the policy (pods from the CNI chain on three vxlan nodes).
#[test]
fn dual_stack_network_policy() {
    let conf = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
    let Some(mut c) = Cluster::start(conf, &["--network-policy"]) else {
        return;
    };
    c.add_pods();
    let _servers: Vec<WhoAmIServer> = c
        .pods
        .iter()
        .map(|(ns, _, _)| WhoAmIServer::start(ns, PORT).unwrap())
        .collect();
    // p10 (node 1) is the database; p00 (node 0) and p20 (node 2) are clients, p01 and p11 not;
    // p21's IPv6 address is allowed by an ipBlock.
    let addr = |i: usize, v6: bool| *c.pods[i].2.iter().find(|a| a.is_ipv6() == v6).unwrap();
    let mut yaml = String::new();
    for (i, k, role) in [
        (0, 0, "client"),
        (0, 1, "other"),
        (1, 0, "db"),
        (1, 1, "other"),
        (2, 0, "client"),
        (2, 1, "other"),
    ] {
        yaml += &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}{k}\n  labels:\n    role: {role}\nspec:\n  containers:\n  - name: c\n---\n");
    }
    let block = addr(5, true);
    yaml += &format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: db\nspec:\n  podSelector:\n    matchLabels:\n      role: db\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          role: client\n    - ipBlock:\n        cidr: {block}/128\n");
    c.apply(&yaml);
    let db = [addr(2, false), addr(2, true)];
    let reach = |from: usize, to: IpAddr| {
        test_support::whoami(
            &c.pods[from].0,
            sock(&to.to_string(), PORT),
            Duration::from_secs(1),
        )
        .is_ok()
    };
    // (client pod index, reaches the db over IPv4, over IPv6)
    let want = [
        (0, true, true),
        (4, true, true),
        (1, false, false),
        (3, false, false),
        (5, false, true),
    ];
    let ok = wait_for(Duration::from_secs(20), || {
        want.iter()
            .all(|&(p, v4, v6)| reach(p, db[0]) == v4 && reach(p, db[1]) == v6)
            .then_some(())
    });
    let seen: Vec<_> = want
        .iter()
        .map(|&(p, _, _)| (p, reach(p, db[0]), reach(p, db[1])))
        .collect();
    assert!(
        ok.is_some(),
        "want {want:?}, seen {seen:?}:\n{}",
        c.d.log(1)
    );
    // Pods nobody isolates still talk over both families.
    for v6 in [false, true] {
        assert!(reach(1, addr(3, v6)), "p01 -> p11 ({})", fam(v6));
    }
}

/// An IPv6-only cluster with every part on: the nftables proxy serves an IPv6 Service to pods
/// on every node, network policy isolates a pod over IPv6, and cluster DNS listening on an
/// IPv6 address answers the pods (their resolv.conf comes from the CNI result).
#[test]
fn ipv6_only_proxy_policy_and_dns() {
    if !require_root_with(&["dig"]) {
        return;
    }
    let conf = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
    let flags = [
        "--proxy-mode",
        "nftables",
        "--network-policy",
        "--cluster-dns",
        "--cluster-dns-addr",
        "fd00:53::10",
        "--cluster-dns-upstream",
        "[fd00:210::1]:53",
    ];
    let Some(mut c) = Cluster::start(conf, &flags) else {
        return;
    };
    c.add_pods();
    let _servers: Vec<test_support::IdServer> = c
        .pods
        .iter()
        .map(|(ns, _, _)| test_support::IdServer::start(ns, 8080).unwrap())
        .collect();
    let mut yaml = String::new();
    for (i, k, role) in [
        (0, 0, "client"),
        (0, 1, "other"),
        (1, 0, "web"),
        (1, 1, "web"),
        (2, 0, "web"),
        (2, 1, "other"),
    ] {
        yaml += &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}{k}\n  labels:\n    role: {role}\nspec:\n  containers:\n  - name: c\n---\n");
    }
    yaml += "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector:\n    role: web\n  ports:\n  - port: 80\n    targetPort: 8080\n---\n";
    // Only clients reach the web pods.
    yaml += "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\nspec:\n  podSelector:\n    matchLabels:\n      role: web\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          role: client\n";
    c.apply(&yaml);
    let web: Vec<IpAddr> = [2, 3, 4].iter().map(|&i| c.pods[i].2[0]).collect();
    // The Service's IPv6 ClusterIP, by name from cluster DNS (the pod's resolv.conf names it).
    let client = c.pods[0].0.clone();
    let resolv = std::fs::read_to_string(format!("/etc/netns/{client}/resolv.conf")).ok();
    let vip = wait_for(Duration::from_secs(20), || {
        let out =
            c.tb.exec(
                &client,
                &[
                    "dig",
                    "+short",
                    "@fd00:53::10",
                    "AAAA",
                    "web.default.svc.cluster.local",
                ],
            )
            .ok()?;
        out.trim().parse::<IpAddr>().ok()
    })
    .unwrap_or_else(|| panic!("no AAAA for web (resolv.conf {resolv:?}):\n{}", c.d.log(0)));
    assert!(vip.is_ipv6(), "{vip}");
    let to = std::net::SocketAddr::new(vip, 80);
    let (local, _) = wait_for(Duration::from_secs(20), || {
        test_support::who_serves(&client, to, Duration::from_secs(2)).ok()
    })
    .unwrap_or_else(|| panic!("client cannot reach {to}:\n{}", c.d.log(0)));
    assert!(
        web.contains(&local.parse().unwrap()),
        "{to} served by {local}"
    );
    // A pod that is no client does not get in, neither through the Service nor directly.
    let other = c.pods[1].0.clone();
    let blocked = wait_for(Duration::from_secs(20), || {
        let direct = sock(&web[0].to_string(), 8080);
        (test_support::who_serves(&other, to, Duration::from_secs(1)).is_err()
            && test_support::who_serves(&other, direct, Duration::from_secs(1)).is_err())
        .then_some(())
    });
    assert!(
        blocked.is_some(),
        "policy does not isolate the web pods over IPv6"
    );
}
