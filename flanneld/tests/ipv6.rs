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

use common::{full_mesh, sock, start_servers, Cni, Daemons};

const PORT: u16 = 5001;
const HASH_PORT: u16 = 5002;

struct Cluster {
    tb: Testbed,
    d: Daemons,
    /// The nodes' underlay IPv6 addresses.
    v6: Vec<String>,
    /// Each pod's namespace, node and addresses.
    pods: Vec<(String, usize, Vec<IpAddr>)>,
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
        for i in 0..3 {
            d.start(&mut tb, i);
        }
        Some(Cluster {
            tb,
            d,
            v6,
            pods: Vec::new(),
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
