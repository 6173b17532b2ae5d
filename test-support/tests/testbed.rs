//! The namespace testbed itself: nodes reach each other over the hub, pods reach their node,
//! and dropping the testbed removes every namespace and stops every process it started.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use test_support::{require_root_with, Testbed};

#[test]
fn nodes_pods_and_cleanup() {
    if !require_root_with(&["ip", "ping", "sleep"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (names, pid) = {
        let mut tb = Testbed::new(2).unwrap();
        let pod = tb.add_pod(0, "10.5.1.2/24", "10.5.1.1/24", 1500).unwrap();
        let n0 = tb.nodes[0].clone();
        let n1 = tb.nodes[1].clone();
        let ping = |ns: &str, to: &str| {
            tb.exec_status(
                ns,
                &["ping", "-c", "1", "-W", "2", to],
                Duration::from_secs(5),
            )
            .0
        };
        assert!(ping(&n0.ns, &n1.ip), "node to node over the hub bridge");
        assert!(ping(&pod.ns, "10.5.1.1"), "pod to its node's bridge");
        assert!(ping(&pod.ns, &n0.ip), "pod to its node's underlay address");
        assert!(
            !ping(&pod.ns, &n1.ip),
            "no route to other nodes without a backend"
        );
        let h = tb
            .spawn(
                &n1.ns,
                "sleep",
                &["300"],
                &[],
                &dir.path().join("sleep.log"),
            )
            .unwrap();
        assert!(tb.running(h));
        let names = vec![tb.hub.clone(), n0.ns, n1.ns, pod.ns];
        (names, tb.pid(h).unwrap())
    };
    for n in &names {
        assert!(!Path::new("/run/netns").join(n).exists(), "{n} left behind");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} left running"
    );
}

#[test]
fn a_dual_stack_underlay() {
    if !require_root_with(&["ip", "ping", "sysctl"]) {
        return;
    }
    let mut tb = Testbed::new(2).unwrap();
    let v6 = tb.add_ipv6_underlay().unwrap();
    assert_eq!(v6, vec!["fd00:210::b", "fd00:210::c"]);
    let ping = |ns: &str, to: &str| {
        tb.exec_status(
            ns,
            &["ping", "-c", "1", "-W", "2", to],
            Duration::from_secs(5),
        )
        .0
    };
    let (n0, n1) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    assert!(ping(&n0.ns, &v6[1]), "node to node over IPv6");
    assert!(ping(&n1.ns, test_support::HUB_IP6), "node to hub over IPv6");
    assert!(ping(&n0.ns, &n1.ip), "IPv4 still works");
}
