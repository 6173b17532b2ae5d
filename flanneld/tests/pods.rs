//! flanneld publishes the pods the CNI plugin recorded on its node under
//! `/coreos.com/network/pods/<namespace>/<name>`: two namespace nodes, real etcd, attachment
//! records written as the plugin writes them. Needs root; skips with a reason without it, fails
//! under CI.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cni::attachment::Attachment;
use cni::store::Store;
use ipnet::Ipv4Net;
use serde_json::Value;
use test_support::{require_root_with, wait_for, Testbed};

mod common;

use common::{metric, Daemons};

const PODS: &str = "/coreos.com/network/pods/";
/// An address no node has: a pod key "of another node" that no daemon here owns.
const FOREIGN: &str = "172.30.0.99";

fn key(ns: &str, name: &str) -> String {
    format!("{PODS}{ns}/{name}")
}

/// Standard base64 (etcdctl's JSON output encodes keys and values so).
fn base64(text: &str) -> Vec<u8> {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ABC.iter().position(|a| *a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The value of a pod key, parsed, with its etcd lease and mod revision; None when absent.
/// One read, so a key deleted meanwhile is absent rather than half-read.
fn pod(tb: &Testbed, ns: &str, name: &str) -> Option<(Value, i64, i64)> {
    let out = tb.etcdctl(&["get", &key(ns, name), "-w", "json"]).unwrap();
    let meta: Value = serde_json::from_str(&out).unwrap();
    let kv = meta["kvs"].get(0)?;
    let value = base64(kv["value"].as_str().unwrap());
    Some((
        serde_json::from_slice(&value).unwrap(),
        kv["lease"].as_i64().unwrap_or(0),
        kv["mod_revision"].as_i64().unwrap_or(0),
    ))
}

/// Every key under pods/.
fn pod_keys(tb: &Testbed) -> Vec<String> {
    tb.etcdctl(&["get", "--prefix", "--keys-only", PODS])
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Address k of subnet `sn`, with its prefix length.
fn host(sn: Ipv4Net, k: u32) -> String {
    format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(sn.network()) + k),
        sn.prefix_len()
    )
}

fn record(id: &str, pod: Option<(&str, &str)>, ip: &str) -> Attachment {
    Attachment {
        container_id: id.into(),
        ifname: "eth0".into(),
        netns: format!("/var/run/netns/cni-{id}"),
        netns_id: None,
        pod_namespace: pod.map(|p| p.0.to_string()),
        pod_name: pod.map(|p| p.1.to_string()),
        ips: vec![ip.parse().unwrap()],
        network: "cbr0".into(),
        time: "2026-11-23T10:00:00Z".into(),
    }
}

struct Cluster {
    tb: Testbed,
    d: Daemons,
    handles: [Option<usize>; 2],
}

impl Cluster {
    /// Node i's CNI data directory, where the plugin would write its records.
    fn cni_dir(&self, i: usize) -> PathBuf {
        self.d.cni_dir(i)
    }

    fn store(&self, i: usize) -> Store {
        Store::new(self.cni_dir(i))
    }

    /// Starts flanneld on node i (`--cni-data-dir <cni_dir(i)> --node-name node<i>`).
    fn start(&mut self, i: usize) {
        self.handles[i] = Some(self.d.start(&mut self.tb, i));
    }

    /// Waits up to `limit` for `f` to hold, panicking with node `i`'s log if it does not.
    fn until(&self, i: usize, limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
        let started = Instant::now();
        wait_for(limit, || f().then_some(())).unwrap_or_else(|| {
            panic!(
                "{what}: not within {limit:?}; keys {:?}\nnode {i} log:\n{}",
                pod_keys(&self.tb),
                self.d.log(i)
            )
        });
        eprintln!("{what}: {:?}", started.elapsed());
    }
}

#[test]
fn pods_are_published_to_etcd() {
    if !require_root_with(&["ip", "bridge", "nft", "etcd", "etcdctl"]) {
        return;
    }
    let mut tb = Testbed::new(2).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let mut c = Cluster {
        tb,
        d: Daemons::new(&endpoint, &[]),
        handles: [None, None],
    };
    c.start(0);
    c.start(1);
    let sn0 = c.d.subnet_env(0).subnet.unwrap();
    let sn1 = c.d.subnet_env(1).subnet.unwrap();
    let (ip0, ip1) = (c.tb.nodes[0].ip.clone(), c.tb.nodes[1].ip.clone());

    // The daemon creates the records directory (0700) so it can watch it.
    let att_dir = c.cni_dir(0).join("attachments");
    c.until(
        0,
        Duration::from_secs(10),
        "attachments directory created",
        || att_dir.is_dir(),
    );
    let mode = std::fs::metadata(&att_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // Records that must not be published, then one that must: once that one is in etcd, the
    // pass that put it has seen the others too.
    let s0 = c.store(0);
    s0.save_attachment(&record("c-nopod", None, &host(sn0, 7)))
        .unwrap();
    s0.save_attachment(&record("c-far", Some(("default", "far-0")), &host(sn1, 7)))
        .unwrap();
    s0.save_attachment(&record(
        "c-bad",
        Some(("default", "Bad_Name")),
        &host(sn0, 8),
    ))
    .unwrap();
    s0.save_attachment(&record("c-web0", Some(("default", "web-0")), &host(sn0, 2)))
        .unwrap();
    // Well under the 10 s rescan: the directory watch did it.
    c.until(0, Duration::from_secs(5), "web-0 published", || {
        pod(&c.tb, "default", "web-0").is_some()
    });
    let (v, lease, _) = pod(&c.tb, "default", "web-0").unwrap();
    let ip = host(sn0, 2).split('/').next().unwrap().to_string();
    assert_eq!(v["IP"], ip.as_str());
    assert_eq!(v["IPs"], serde_json::json!([ip]));
    assert_eq!(v["Node"], "node0");
    assert_eq!(v["NodeIP"], ip0.as_str());
    assert_eq!(v["Subnet"], sn0.to_string());
    assert_eq!(v["ContainerID"], "c-web0");
    assert_eq!(v["Ifname"], "eth0");
    assert_eq!(pod_keys(&c.tb), vec![key("default", "web-0")], "only web-0");
    // On its own etcd lease of 60 s (not the subnet lease's 24 h).
    let ttl =
        c.tb.etcdctl(&["lease", "timetolive", &format!("{lease:x}")])
            .unwrap();
    assert!(ttl.contains("granted with TTL(60s)"), "{ttl}");
    let log = c.d.log(0);
    assert!(log.contains("published pod default/web-0"), "{log}");
    assert!(log.contains("outside this node's subnet"), "{log}");
    assert!(log.contains("Bad_Name"), "{log}");
    c.until(0, Duration::from_secs(5), "metric pods_published 1", || {
        metric(&c.tb, 0, "flannel_pods_published") == 1
    });

    // A second pod on node 0, one on node 1.
    s0.save_attachment(&record("c-web1", Some(("default", "web-1")), &host(sn0, 3)))
        .unwrap();
    c.store(1)
        .save_attachment(&record("c-db0", Some(("db", "db-0")), &host(sn1, 2)))
        .unwrap();
    c.until(
        0,
        Duration::from_secs(5),
        "web-1 and db-0 published",
        || pod(&c.tb, "default", "web-1").is_some() && pod(&c.tb, "db", "db-0").is_some(),
    );
    let (v, _, _) = pod(&c.tb, "db", "db-0").unwrap();
    assert_eq!(
        (v["Node"].as_str(), v["NodeIP"].as_str()),
        (Some("node1"), Some(ip1.as_str()))
    );

    // podman names a pod without a namespace: published under default.
    let mut podman = record("c-podman", None, &host(sn0, 10));
    podman.pod_name = Some("podman-web".into());
    s0.save_attachment(&podman).unwrap();
    c.until(0, Duration::from_secs(5), "podman-web published", || {
        pod(&c.tb, "default", "podman-web").is_some()
    });
    s0.remove_all("c-podman").unwrap();
    c.until(0, Duration::from_secs(5), "podman-web unpublished", || {
        pod(&c.tb, "default", "podman-web").is_none()
    });

    // Removing the record (as the plugin's DEL does) removes the key.
    s0.remove_all("c-web0").unwrap();
    c.until(0, Duration::from_secs(5), "web-0 unpublished", || {
        pod(&c.tb, "default", "web-0").is_none()
    });
    assert!(c.d.log(0).contains("unpublished pod default/web-0"));

    // A pod key another node holds is not overwritten.
    let foreign = |name: &str| {
        format!(
            r#"{{"IP":"10.5.200.2","IPs":["10.5.200.2"],"Node":"elsewhere","NodeIP":"{FOREIGN}","Subnet":"10.5.200.0/24","ContainerID":"x-{name}","Ifname":"eth0"}}"#
        )
    };
    c.tb.etcdctl(&["put", &key("default", "dup-0"), &foreign("dup-0")])
        .unwrap();
    s0.save_attachment(&record("c-dup0", Some(("default", "dup-0")), &host(sn0, 4)))
        .unwrap();
    s0.save_attachment(&record(
        "c-sent",
        Some(("default", "sentinel")),
        &host(sn0, 5),
    ))
    .unwrap();
    c.until(0, Duration::from_secs(5), "sentinel published", || {
        pod(&c.tb, "default", "sentinel").is_some()
    });
    assert_eq!(pod(&c.tb, "default", "dup-0").unwrap().0["NodeIP"], FOREIGN);
    assert!(c.d.log(0).contains("is held by"), "{}", c.d.log(0));
    assert_eq!(metric(&c.tb, 0, "flannel_pods_published"), 2);

    // Restart of node 0: while it is down a stale key of its own appears (a pod whose record
    // is gone), a pod is added and one removed. After the restart its stale keys go, the
    // others' stay untouched, and its pods are on the new run's etcd lease.
    let (_, web1_lease, _) = pod(&c.tb, "default", "web-1").unwrap();
    let (_, _, db0_rev) = pod(&c.tb, "db", "db-0").unwrap();
    let status =
        c.tb.stop(c.handles[0].unwrap(), Duration::from_secs(10))
            .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{}", c.d.log(0));
    let stale = format!(
        r#"{{"IP":"{}","IPs":["{}"],"Node":"node0","NodeIP":"{ip0}","Subnet":"{sn0}","ContainerID":"gone","Ifname":"eth0"}}"#,
        host(sn0, 9).split('/').next().unwrap(),
        host(sn0, 9).split('/').next().unwrap(),
    );
    c.tb.etcdctl(&["put", &key("default", "stale-0"), &stale])
        .unwrap();
    c.tb.etcdctl(&["put", &key("default", "away-0"), &foreign("away-0")])
        .unwrap();
    s0.save_attachment(&record(
        "c-late",
        Some(("default", "late-0")),
        &host(sn0, 6),
    ))
    .unwrap();
    s0.remove_all("c-sent").unwrap();
    // Still there while node 0 is down (its pod lease has 60 s).
    assert!(pod(&c.tb, "default", "web-1").is_some());
    c.start(0);
    c.until(0, Duration::from_secs(15), "restart reconciled", || {
        pod(&c.tb, "default", "stale-0").is_none()
            && pod(&c.tb, "default", "sentinel").is_none()
            && pod(&c.tb, "default", "late-0").is_some()
    });
    let (_, db0, rev) = pod(&c.tb, "db", "db-0").unwrap();
    assert_eq!(rev, db0_rev, "node 1's pod untouched");
    assert_ne!(db0, 0);
    assert_eq!(
        pod(&c.tb, "default", "away-0").unwrap().0["NodeIP"],
        FOREIGN
    );
    assert_eq!(pod(&c.tb, "default", "dup-0").unwrap().0["NodeIP"], FOREIGN);
    let (_, new_lease, _) = pod(&c.tb, "default", "web-1").unwrap();
    assert_ne!(
        new_lease, web1_lease,
        "web-1 moved onto the new run's etcd lease"
    );
    assert_eq!(pod(&c.tb, "default", "late-0").unwrap().1, new_lease);

    // The pod lease disappears (as when it expires while etcd is unreachable): node 0 notices,
    // grants a new one and publishes again.
    c.tb.etcdctl(&["lease", "revoke", &format!("{new_lease:x}")])
        .unwrap();
    assert!(pod(&c.tb, "default", "web-1").is_none());
    c.until(
        0,
        Duration::from_secs(30),
        "republished after the lease loss",
        || {
            pod(&c.tb, "default", "web-1").is_some_and(|(_, l, _)| l != new_lease)
                && pod(&c.tb, "default", "late-0").is_some()
        },
    );
    assert!(c.d.log(0).contains("granted etcd lease"), "{}", c.d.log(0));
    c.until(0, Duration::from_secs(5), "metric pods_published 2", || {
        metric(&c.tb, 0, "flannel_pods_published") == 2
    });
    // Node 1 kept publishing its pod all along.
    assert!(pod(&c.tb, "db", "db-0").is_some());
}
