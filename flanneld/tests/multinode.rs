//! Several flanneld nodes in network namespaces sharing one etcd in a hub namespace.
//! Needs root; skips with a reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use subnet_lease::SubnetEnv;
use test_support::{require_root_with, wait_for, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_flanneld");

#[test]
fn three_nodes_lease_distinct_subnets_see_each_other_and_restart_cleanly() {
    if !require_root_with(&["ip", "etcd", "etcdctl"]) {
        return;
    }
    let mut tb = Testbed::new(3).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = tb.nodes.clone();
    let start = |tb: &mut Testbed, i: usize, run: u32| -> usize {
        let node = &nodes[i];
        let file = dir.path().join(format!("n{i}.env"));
        let log = dir.path().join(format!("n{i}-{run}.log"));
        let cni = dir.path().join(format!("cni{i}"));
        // Default interface (eth0, via the default route) and default prefix: flannel's defaults.
        // (Pod records from a directory of the test's, not the host's /var/lib/cni/flannel.)
        tb.spawn(
            &node.ns,
            BIN,
            &[
                "--etcd-endpoints",
                &endpoint,
                "--subnet-file",
                file.to_str().unwrap(),
                "--cni-data-dir",
                cni.to_str().unwrap(),
            ],
            &[("RUST_LOG", "info")],
            &log,
        )
        .unwrap()
    };
    let log = |i: usize, run: u32| {
        std::fs::read_to_string(dir.path().join(format!("n{i}-{run}.log"))).unwrap_or_default()
    };
    let handles: Vec<usize> = (0..3).map(|i| start(&mut tb, i, 1)).collect();
    let mut subnets = Vec::new();
    for i in 0..3 {
        let file = dir.path().join(format!("n{i}.env"));
        let env = wait_for(Duration::from_secs(30), || SubnetEnv::read(&file).ok())
            .unwrap_or_else(|| panic!("node {i} wrote no subnet file; log:\n{}", log(i, 1)));
        assert_eq!(env.mtu, 1500, "alloc: the underlay interface's MTU");
        subnets.push(env.subnet.unwrap());
    }
    assert_eq!(
        subnets.iter().collect::<HashSet<_>>().len(),
        3,
        "{subnets:?}"
    );

    // etcd holds flannel's keys and JSON with each node's underlay address.
    for (i, sn) in subnets.iter().enumerate() {
        let key = format!(
            "/coreos.com/network/subnets/{}-{}",
            sn.network(),
            sn.prefix_len()
        );
        let value = tb.etcdctl(&["get", &key, "--print-value-only"]).unwrap();
        assert_eq!(
            value.trim(),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"alloc"}}"#,
                nodes[i].ip
            )
        );
    }
    // Every node logs the two others as peers.
    for i in 0..3 {
        for (j, sn) in subnets.iter().enumerate() {
            if i == j {
                continue;
            }
            let needle = format!("peer joined or changed: {}-24", sn.network());
            wait_for(Duration::from_secs(15), || {
                log(i, 1).contains(&needle).then_some(())
            })
            .unwrap_or_else(|| panic!("node {i} did not log {needle}:\n{}", log(i, 1)));
        }
    }

    // SIGTERM: exit 0. Restart: same subnet. Meanwhile the others see nothing leave.
    let status = tb.stop(handles[0], Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", log(0, 1));
    let file0 = dir.path().join("n0.env");
    std::fs::remove_file(&file0).unwrap();
    let h = start(&mut tb, 0, 2);
    let env = wait_for(Duration::from_secs(30), || SubnetEnv::read(&file0).ok())
        .unwrap_or_else(|| panic!("restart wrote no subnet file:\n{}", log(0, 2)));
    assert_eq!(env.subnet, Some(subnets[0]));
    assert!(log(0, 2).contains("reusing existing lease"));
    assert!(!log(1, 1).contains("peer left"), "{}", log(1, 1));

    // A node whose lease is removed disappears from the others' view.
    let status = tb.stop(handles[2], Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0));
    let sn2 = subnets[2];
    let key2 = format!("/coreos.com/network/subnets/{}-24", sn2.network());
    tb.etcdctl(&["del", &key2]).unwrap();
    let needle = format!("peer left: {}-24", sn2.network());
    wait_for(Duration::from_secs(15), || {
        log(1, 1).contains(&needle).then_some(())
    })
    .unwrap_or_else(|| panic!("node 1 did not log {needle}:\n{}", log(1, 1)));
    assert!(tb.running(h) && tb.running(handles[1]));
}
