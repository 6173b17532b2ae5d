//! The service proxy end to end, in both modes: three namespace nodes running flanneld with
//! `--proxy-mode`, six pods attached through the CNI plugin (flannel + the reference bridge and
//! host-local), objects written with `flannelctl apply`, traffic from pods, from the nodes and
//! from a host outside the cluster. Both modes run the same behaviour list; where a mode
//! cannot do something (the userspace mode hides the client address) the check says so.
//! Needs root and the reference CNI plugins; skips with a reason without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use test_support::{
    in_netns, require, require_root_with, udp_who_serves, wait_for, who_serves, IdServer, Testbed,
    UdpIdServer,
};

mod common;

use common::{Cni, Daemons, BIN, REFERENCE_PLUGINS};

const NET: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LIMIT: Duration = Duration::from_secs(2);
const EXTERNAL_IP: &str = "192.0.2.10";

/// A binary built next to flanneld (`cargo test --workspace` builds them all).
fn sibling(name: &str) -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo test --workspace`",
        p.display()
    );
    p
}

struct PodInfo {
    ns: String,
    ip: Ipv4Addr,
    node: usize,
    name: String,
}

struct Cluster {
    tb: Testbed,
    d: Daemons,
    endpoint: String,
    pods: Vec<PodInfo>,
    servers: Vec<(Option<IdServer>, UdpIdServer)>,
    outside: String,
    _cni: Cni,
}

fn vip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 96, 0, last), port))
}

impl Cluster {
    fn new(mode: &str) -> Cluster {
        let mut tb = Testbed::new(3).unwrap();
        let endpoint = tb.start_etcd_with_config(NET).unwrap();
        let mut d = Daemons::new(&endpoint, &["--proxy-mode", mode]);
        for i in 0..3 {
            d.start(&mut tb, i);
        }
        let cni = Cni::new();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..3 {
            for j in 0..2 {
                let name = format!("web-{i}-{j}");
                let (ns, ip) = cni.add(&mut tb, &d, i, "default", &name);
                servers.push((
                    Some(IdServer::start(&ns, 8080).unwrap()),
                    UdpIdServer::start(&ns, &ip.to_string(), 8080).unwrap(),
                ));
                pods.push(PodInfo {
                    ns,
                    ip,
                    node: i,
                    name,
                });
            }
        }
        let (outside, _) = tb.add_outside_host().unwrap();
        // The external IP is routed to node 0, as a router in front of the cluster would.
        tb.exec(
            &outside,
            &[
                "ip",
                "route",
                "add",
                &format!("{EXTERNAL_IP}/32"),
                "via",
                &tb.nodes[0].ip,
            ],
        )
        .unwrap();
        Cluster {
            tb,
            d,
            endpoint,
            pods,
            servers,
            outside,
            _cni: cni,
        }
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| format!("--- node {i}:\n{}", self.d.log(i)))
            .collect()
    }

    /// `flannelctl apply` of `yaml`, run in the hub (where etcd is).
    fn apply(&self, yaml: &str) {
        let file = self.d.dir.path().join(format!("m{}.yaml", rand_suffix()));
        std::fs::write(&file, yaml).unwrap();
        self.tb
            .flannelctl_apply(&self.tb.hub, &sibling("flannelctl"), &self.endpoint, &file)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn pod_yaml(&self, p: &PodInfo, extra: &[(&str, &str)]) -> String {
        let mut labels = format!("app: web\n    name: {}\n    node: n{}\n", p.name, p.node);
        for (k, v) in extra {
            labels += &format!("    {k}: {v}\n");
        }
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels:\n    {labels}spec:\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: 8080\n    - name: dns\n      containerPort: 8080\n      protocol: UDP\n---\n",
            p.name
        )
    }

    fn pod_by_ip(&self, ip: &str) -> &PodInfo {
        self.pods
            .iter()
            .find(|p| p.ip.to_string() == ip)
            .unwrap_or_else(|| panic!("{ip} is no pod"))
    }

    /// Client namespaces: every pod and every node.
    fn clients(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> =
            self.pods.iter().map(|p| (p.ns.clone(), p.node)).collect();
        v.extend(
            self.tb
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.ns.clone(), i)),
        );
        v
    }
}

fn rand_suffix() -> String {
    test_support::random_tag(6)
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 80, protocol: UDP, targetPort: dns}
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{port: 81, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.12
  selector: {app: nothing}
  ports: [{port: 82, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 83, targetPort: 8080, nodePort: 30083}]
---
apiVersion: v1
kind: Service
metadata: {name: self}
spec:
  clusterIP: 10.96.0.14
  selector: {name: web-0-0}
  ports: [{port: 84, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: canary}
spec:
  clusterIP: 10.96.0.15
  selector: {tier: canary}
  ports: [{port: 85, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: intlocal}
spec:
  clusterIP: 10.96.0.17
  internalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 87, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: extip}
spec:
  clusterIP: 10.96.0.18
  externalIPs: [192.0.2.10]
  selector: {app: web}
  ports: [{port: 88, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: manual}
spec:
  clusterIP: 10.96.0.16
  ports: [{name: dns, port: 86, protocol: UDP}]
"#;

fn manual_endpoints(ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: manual}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: dns, port: 8080, protocol: UDP}}]\n"
    )
}

/// Servers reached by `n` connections from `ns` to `to`.
fn spread(ns: &str, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (server, _) = who_serves(ns, to, LIMIT).unwrap_or_else(|e| panic!("{ns} -> {to}: {e}"));
        *seen.entry(server).or_insert(0) += 1;
    }
    seen
}

fn behaviour(mode: &str) {
    if !require_root_with(&["ip", "nft", "conntrack"])
        || !require(
            Path::new(REFERENCE_PLUGINS).join("bridge").is_file(),
            "needs the reference CNI plugins in /usr/lib/cni",
        )
    {
        return;
    }
    let mut c = Cluster::new(mode);
    let mut manifest: String = c.pods.iter().map(|p| c.pod_yaml(p, &[])).collect();
    manifest.push_str(SERVICES);
    manifest.push_str("---\n");
    manifest.push_str(&manual_endpoints(c.pods[0].ip));
    let all: BTreeSet<String> = c.pods.iter().map(|p| p.ip.to_string()).collect();
    let applied = Instant::now();
    c.apply(&manifest);

    // Every node's proxy serves the ClusterIP once the pod records are published.
    for (i, n) in c.tb.nodes.iter().enumerate() {
        // All six endpoints: the last pod records may land after the objects.
        wait_for(Duration::from_secs(30), || {
            let seen: BTreeSet<String> = (0..40)
                .filter_map(|_| who_serves(&n.ns, vip(10, 80), LIMIT).ok())
                .map(|s| s.0)
                .collect();
            (seen == all).then_some(())
        })
        .unwrap_or_else(|| panic!("node {i}: ClusterIP not served by all pods\n{}", c.logs()));
    }
    eprintln!(
        "[{mode}] Services served on every node {:?} after apply",
        applied.elapsed()
    );

    // 1. ClusterIP over TCP reaches every endpoint, from every pod and every node.
    for (ns, node) in c.clients() {
        let seen = spread(&ns, vip(10, 80), 60);
        let servers: BTreeSet<String> = seen.keys().cloned().collect();
        assert_eq!(servers, all, "[{mode}] from {ns} (node {node}): {seen:?}");
    }
    // 2. The same port over UDP (named target port `dns`).
    for (ns, _) in c.clients() {
        let servers: BTreeSet<String> = (0..30)
            .map(|_| {
                udp_who_serves(&ns, vip(10, 80), LIMIT)
                    .unwrap_or_else(|e| panic!("[{mode}] udp from {ns}: {e}"))
                    .0
            })
            .collect();
        assert!(
            servers.len() >= 2 && servers.is_subset(&all),
            "[{mode}] udp from {ns}: {servers:?}"
        );
    }
    // 3. NodePort from a host outside the cluster, through every node.
    for (i, n) in c.tb.nodes.iter().enumerate() {
        let to: SocketAddr = format!("{}:30080", n.ip).parse().unwrap();
        let seen = spread(&c.outside, to, 30);
        assert!(
            seen.keys().all(|s| all.contains(s)) && seen.len() >= 2,
            "[{mode}] NodePort via node {i}: {seen:?}"
        );
    }
    // 4. ClientIP affinity pins each client to one endpoint.
    for (ns, _) in c.clients().into_iter().take(4) {
        let seen = spread(&ns, vip(11, 81), 20);
        assert_eq!(seen.len(), 1, "[{mode}] affinity from {ns}: {seen:?}");
    }
    // 5. No endpoints: connection refused (not a timeout).
    for (ns, _) in c.clients() {
        let started = Instant::now();
        let err = who_serves(&ns, vip(12, 82), LIMIT).expect_err("no endpoints must refuse");
        assert!(err.contains("refused"), "[{mode}] from {ns}: {err}");
        assert!(
            started.elapsed() < LIMIT,
            "[{mode}] refusal took {:?}",
            started.elapsed()
        );
    }
    // 6. Hairpin: a pod reaches itself through its Service.
    let me = &c.pods[0];
    let (server, _) =
        who_serves(&me.ns, vip(14, 84), LIMIT).unwrap_or_else(|e| panic!("[{mode}] hairpin: {e}"));
    assert_eq!(server, me.ip.to_string(), "[{mode}] hairpin");
    // 7. externalTrafficPolicy: Local: only the node's own endpoints; nftables keeps the
    //    client's address (the userspace mode relays, so the endpoint sees the node).
    for (i, n) in c.tb.nodes.iter().enumerate() {
        let to: SocketAddr = format!("{}:30083", n.ip).parse().unwrap();
        for _ in 0..10 {
            let (server, client) = who_serves(&c.outside, to, LIMIT)
                .unwrap_or_else(|e| panic!("[{mode}] Local via node {i}: {e}"));
            assert_eq!(
                c.pod_by_ip(&server).node,
                i,
                "[{mode}] Local via node {i} reached {server}"
            );
            if mode == "nftables" {
                assert_eq!(
                    client, "172.30.0.200",
                    "[{mode}] client address not preserved"
                );
            }
        }
    }
    // 8. internalTrafficPolicy: Local: pods reach only endpoints on their own node.
    for p in &c.pods {
        for (server, _) in spread(&p.ns, vip(17, 87), 10) {
            assert_eq!(
                c.pod_by_ip(&server).node,
                p.node,
                "[{mode}] intlocal from {}",
                p.name
            );
        }
    }
    // 9. externalIPs: traffic routed to node 0 for 192.0.2.10:88 is served.
    let ext: SocketAddr = format!("{EXTERNAL_IP}:88").parse().unwrap();
    let seen = spread(&c.outside, ext, 10);
    assert!(
        seen.keys().all(|s| all.contains(s)),
        "[{mode}] external IP: {seen:?}"
    );

    // 10. Scaling by label changes is seen by new connections quickly.
    let probe = c.pods[3].ns.clone();
    let (first, second) = (0usize, 5usize);
    c.apply(&c.pod_yaml(&c.pods[first], &[("tier", "canary")]));
    wait_for(Duration::from_secs(10), || {
        who_serves(&probe, vip(15, 85), LIMIT).ok()
    })
    .unwrap_or_else(|| panic!("[{mode}] canary not served\n{}", c.logs()));
    c.apply(&c.pod_yaml(&c.pods[second], &[("tier", "canary")]));
    let t0 = Instant::now();
    let target = c.pods[second].ip.to_string();
    // Probe back to back (each connection lands on either endpoint at random).
    while who_serves(&probe, vip(15, 85), LIMIT).map(|s| s.0) != Ok(target.clone()) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "[{mode}] scale-up not seen\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let up = t0.elapsed();
    c.apply(&c.pod_yaml(&c.pods[first], &[]));
    let t0 = Instant::now();
    let gone = c.pods[first].ip.to_string();
    // Down: from when on do 20 connections in a row avoid the removed endpoint?
    let mut clean_since: Option<Duration> = None;
    let mut streak = 0;
    while streak < 20 && t0.elapsed() < Duration::from_secs(5) {
        let at = t0.elapsed();
        let (server, _) = who_serves(&probe, vip(15, 85), LIMIT).unwrap();
        if server == gone {
            streak = 0;
            clean_since = None;
        } else {
            streak += 1;
            clean_since.get_or_insert(at);
        }
    }
    assert!(
        streak >= 20,
        "[{mode}] removed endpoint still used after 5 s"
    );
    let down = clean_since.unwrap();
    eprintln!("[{mode}] scale up seen after {up:?}, scale down after {down:?} (from flannelctl apply returning to the first connection seeing it)");
    assert!(
        up < Duration::from_secs(1) && down < Duration::from_secs(1),
        "[{mode}] up {up:?} down {down:?}"
    );

    // 11. A UDP client keeps its 5-tuple; when its endpoint is removed it moves to the new one
    //     (stale conntrack entries / sessions dropped).
    let client = c.pods[4].ns.clone();
    let sock = in_netns(&client, || std::net::UdpSocket::bind(("0.0.0.0", 40404)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let ask = |sock: &std::net::UdpSocket| -> Option<String> {
        sock.send_to(b"who", vip(16, 86)).ok()?;
        let mut buf = [0u8; 64];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .split_whitespace()
                .next()?
                .to_string(),
        )
    };
    let before = wait_for(Duration::from_secs(5), || ask(&sock)).expect("manual UDP service");
    assert_eq!(before, c.pods[0].ip.to_string());
    c.apply(&manual_endpoints(c.pods[1].ip));
    let after = wait_for(Duration::from_secs(5), || {
        ask(&sock).filter(|s| *s == c.pods[1].ip.to_string())
    });
    assert!(
        after.is_some(),
        "[{mode}] UDP client stuck on the removed endpoint\n{}",
        c.logs()
    );

    // 12. A dead endpoint: the userspace mode retries the next one, nftables cannot.
    c.servers[2].0 = None;
    let dead = c.pods[2].ip.to_string();
    let probe = c.pods[5].ns.clone();
    let mut failures = 0;
    for _ in 0..60 {
        match who_serves(&probe, vip(10, 80), LIMIT) {
            Ok((server, _)) => assert_ne!(server, dead),
            Err(_) => failures += 1,
        }
    }
    if mode == "userspace" {
        assert_eq!(
            failures, 0,
            "[{mode}] connections failed although other endpoints are alive"
        );
    } else {
        assert!(
            failures > 0,
            "[{mode}] a dead endpoint is expected to fail some connections"
        );
    }
    eprintln!("[{mode}] with one endpoint dead: {failures}/60 connections failed");

    // Metrics are exported.
    let m = common::http(&c.tb, 0, "/metrics");
    assert!(m.contains("flannel_proxy_syncs_total"), "{m}");
}

#[test]
fn nftables_mode() {
    behaviour("nftables");
}

#[test]
fn userspace_mode() {
    behaviour("userspace");
}
