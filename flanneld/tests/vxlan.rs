//! The VXLAN overlay on nodes built from network namespaces, with real etcd, kernel VXLAN and
//! nftables. Needs root; skips with a reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use subnet_lease::SubnetEnv;
use test_support::{require_root_with, wait_for, whoami, Pod, Testbed, WhoAmIServer};

mod common;

use common::{add_pods, Daemons};

const PORT: u16 = 5001;

struct Cluster {
    tb: Testbed,
    d: Daemons,
    handles: Vec<Option<usize>>,
}

impl Cluster {
    fn log(&self, i: usize) -> String {
        self.d.log(i)
    }

    fn start(&mut self, i: usize) {
        if self.handles.len() <= i {
            self.handles.resize(i + 1, None);
        }
        self.handles[i] = Some(self.d.start(&mut self.tb, i));
    }

    fn subnet_env(&self, i: usize) -> SubnetEnv {
        self.d.subnet_env(i)
    }

    /// `count` pods (.2, .3, …) behind node i's cni0, wired from its subnet file.
    fn add_pods(&mut self, i: usize, count: u8) -> Vec<Pod> {
        let env = self.subnet_env(i);
        add_pods(&mut self.tb, i, &env, count, env.mtu)
    }

    fn ip(&self, i: usize, args: &[&str]) -> String {
        let mut full = vec!["ip"];
        full.extend_from_slice(args);
        self.tb
            .exec(&self.tb.nodes[i].ns, &full)
            .unwrap_or_default()
    }
}

fn tcp(from: &Pod, to: &str) -> Result<String, String> {
    let addr = SocketAddr::new(to.parse().unwrap(), PORT);
    whoami(&from.ns, addr, Duration::from_secs(2))
}

/// Waits until `from` reaches `to` over TCP and returns the source address `to` saw.
fn reach(from: &Pod, to: &str, limit: Duration) -> String {
    let mut last = String::new();
    wait_for(limit, || match tcp(from, to) {
        Ok(seen) => Some(seen),
        Err(e) => {
            last = e;
            None
        }
    })
    .unwrap_or_else(|| panic!("{} cannot reach {to}: {last}", from.ip))
}

/// GET from node 0's health endpoint (127.0.0.1:8471 inside its namespace).
fn health(tb: &Testbed, path: &str) -> String {
    common::http(tb, 0, path)
}

#[test]
fn vxlan_overlay_end_to_end() {
    if !require_root_with(&["ip", "bridge", "nft", "etcd", "etcdctl", "ping"]) {
        return;
    }
    let mut tb = Testbed::new(3).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let (outside_ns, outside_ip) = tb.add_outside_host().unwrap();
    let mut c = Cluster {
        tb,
        d: Daemons::new(&endpoint, &["--ip-masq"]),
        handles: Vec::new(),
    };
    for i in 0..3 {
        c.start(i);
    }
    let mut pods: Vec<Pod> = Vec::new();
    for i in 0..3 {
        let env = c.subnet_env(i);
        assert_eq!(env.mtu, 1450, "VXLAN MTU = 1500 - 50");
        assert!(env.ip_masq);
        pods.extend(c.add_pods(i, 2));
    }
    let _servers: Vec<WhoAmIServer> = pods
        .iter()
        .map(|p| WhoAmIServer::start(&p.ns, PORT).unwrap())
        .chain([WhoAmIServer::start(&outside_ns, PORT).unwrap()])
        .collect();

    // All 30 ordered pod pairs over TCP, source address preserved (no masquerade in-cluster).
    for a in &pods {
        for b in &pods {
            if a.ns != b.ns {
                assert_eq!(
                    reach(a, &b.ip, Duration::from_secs(20)),
                    a.ip,
                    "{} -> {}",
                    a.ip,
                    b.ip
                );
            }
        }
    }

    // Reconcile is idempotent on the real kernel: three resyncs of a stable node change nothing.
    let changes = |c: &Cluster| c.log(1).matches("kernel changes").count();
    let before = changes(&c);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        changes(&c),
        before,
        "resync keeps changing things:\n{}",
        c.log(1)
    );

    // Kernel state is flannel's: device, neighbours, FDB, onlink routes.
    let link = c.ip(0, &["-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains("vxlan id 1") && link.contains("dstport 8472") && link.contains("nolearning"),
        "{link}"
    );
    assert!(link.contains("mtu 1450"), "{link}");
    let sn1: Ipv4Net = c.subnet_env(1).subnet.unwrap();
    let routes = c.ip(0, &["route", "show", "dev", "flannel.1"]);
    assert!(
        routes.contains(&format!("{sn1} via {} onlink", sn1.network())),
        "{routes}"
    );
    let lease_json =
        c.tb.etcdctl(&[
            "get",
            &format!("/coreos.com/network/subnets/{}-24", sn1.network()),
            "--print-value-only",
        ])
        .unwrap();
    assert!(
        lease_json.contains(r#""BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#),
        "{lease_json}"
    );

    // Pod -> outside the Network: masqueraded to the node's address; the rules are nft's.
    assert_eq!(
        reach(&pods[0], &outside_ip, Duration::from_secs(10)),
        c.tb.nodes[0].ip
    );
    let table =
        c.tb.exec(
            &c.tb.nodes[0].ns,
            &["nft", "list", "table", "ip", "flannel"],
        )
        .unwrap();
    assert!(table.contains("masquerade fully-random"), "{table}");

    // Health, readiness and metrics.
    let ready = health(&c.tb, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = health(&c.tb, "/metrics");
    assert!(metrics.contains("flannel_peers 2"), "{metrics}");
    assert!(metrics.contains("flannel_etcd_up 1"), "{metrics}");

    // Rules removed by hand are re-installed.
    c.tb.exec(
        &c.tb.nodes[0].ns,
        &["nft", "delete", "table", "ip", "flannel"],
    )
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        c.tb.exec(
            &c.tb.nodes[0].ns,
            &["nft", "list", "table", "ip", "flannel"],
        )
        .ok()
    })
    .expect("nft table re-installed");

    // kill -9 and restart node 0: same subnet and MAC; pods keep reaching it within a second.
    let mac = |c: &Cluster| {
        let l = c.ip(0, &["link", "show", "flannel.1"]);
        l.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or("")
            .to_string()
    };
    let mac_before = mac(&c);
    let sn0 = c.subnet_env(0).subnet;
    c.tb.kill(c.handles[0].unwrap());
    c.start(0);
    let restarted = Instant::now();
    wait_for(Duration::from_secs(1), || tcp(&pods[2], &pods[0].ip).ok())
        .unwrap_or_else(|| panic!("pod on node 0 unreachable 1 s after restart"));
    assert!(restarted.elapsed() < Duration::from_secs(1));
    wait_for(Duration::from_secs(20), || {
        c.log(0).contains("wrote").then_some(())
    })
    .unwrap_or_else(|| panic!("restart did not finish:\n{}", c.log(0)));
    assert_eq!(c.subnet_env(0).subnet, sn0);
    assert_eq!(mac(&c), mac_before, "VTEP MAC kept");
    assert!(
        c.log(0).contains("adopting existing VXLAN device"),
        "{}",
        c.log(0)
    );

    // Deleting flannel.1 by hand on node 1 is repaired.
    c.ip(1, &["link", "del", "flannel.1"]);
    reach(&pods[0], &pods[2].ip, Duration::from_secs(15));
    assert!(c
        .ip(1, &["link", "show", "flannel.1"])
        .contains("flannel.1"));

    // A new node joins: reachable without restarting the others.
    c.tb.add_node().unwrap();
    c.start(3);
    let new_pods = c.add_pods(3, 1);
    let _s4 = WhoAmIServer::start(&new_pods[0].ns, PORT).unwrap();
    assert_eq!(
        reach(&pods[0], &new_pods[0].ip, Duration::from_secs(20)),
        pods[0].ip
    );
    assert_eq!(
        reach(&new_pods[0], &pods[4].ip, Duration::from_secs(20)),
        new_pods[0].ip
    );

    // Node 2 stops and its lease is revoked: its entries leave the others' tables.
    let status =
        c.tb.stop(c.handles[2].unwrap(), Duration::from_secs(10))
            .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{}", c.log(2));
    let sn2 = c.subnet_env(2).subnet.unwrap();
    c.tb.etcdctl(&[
        "del",
        &format!("/coreos.com/network/subnets/{}-24", sn2.network()),
    ])
    .unwrap();
    let gone = wait_for(Duration::from_secs(10), || {
        let r = c.ip(0, &["route", "show", "dev", "flannel.1"]);
        let n = c.ip(0, &["neigh", "show", "dev", "flannel.1"]);
        (!r.contains(&sn2.to_string()) && !n.contains(&sn2.network().to_string())).then_some(())
    });
    assert!(gone.is_some(), "node 2's route/neighbour still on node 0");
    let fdb =
        c.tb.exec(
            &c.tb.nodes[0].ns,
            &["bridge", "fdb", "show", "dev", "flannel.1"],
        )
        .unwrap();
    assert!(!fdb.contains(&c.tb.nodes[2].ip), "{fdb}");
}
