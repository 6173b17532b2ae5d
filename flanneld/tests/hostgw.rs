//! The host-gw backend on nodes built from network namespaces (one L2 underlay): flannel's
//! lease, one route per peer via its PublicIP, pod traffic over TCP and UDP, a peer off our L2
//! subnet warned about and not routed, a leaving peer's route removed. Needs root; skips with a
//! reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use test_support::{require_root_with, send_and_verify, wait_for, Testbed};

mod common;

use common::{full_mesh, lease_value, pods_per_node, sock, start_servers, Daemons};

const PORT: u16 = 5001;
const HASH_PORT: u16 = 5002;

#[test]
fn host_gw_end_to_end() {
    if !require_root_with(&["ip", "nft", "etcd", "etcdctl", "ping"]) {
        return;
    }
    let mut tb = Testbed::new(3).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .unwrap();
    let mut d = Daemons::new(&endpoint, &[]);
    let handles: Vec<usize> = (0..3).map(|i| d.start(&mut tb, i)).collect();
    let log = |i: usize| d.log(i);
    let (pods, subnets) = pods_per_node(&mut tb, &d, |env| {
        assert_eq!(env.mtu, 1500, "host-gw MTU = interface MTU");
    });
    // flannel's lease: BackendType host-gw, no BackendData.
    let lease = lease_value(&tb, subnets[0]);
    assert_eq!(
        lease.trim(),
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
            tb.nodes[0].ip
        )
    );
    // One route per peer subnet via the peer's address on eth0, no device of ours.
    for (n, node) in tb.nodes.iter().enumerate() {
        let routes = wait_for(Duration::from_secs(20), || {
            let r = tb
                .exec(&node.ns, &["ip", "-4", "route", "show", "dev", "eth0"])
                .ok()?;
            (0..3)
                .filter(|p| *p != n)
                .all(|p| r.contains(&format!("{} via {} ", subnets[p], tb.nodes[p].ip)))
                .then_some(r)
        })
        .unwrap_or_else(|| panic!("node {n} lacks host-gw routes:\n{}", log(n)));
        assert!(!routes.contains(&subnets[n].to_string()), "{routes}");
        let links = tb.exec(&node.ns, &["ip", "-o", "link"]).unwrap();
        assert!(
            !links.contains("flannel"),
            "host-gw makes no device: {links}"
        );
    }
    let _servers = start_servers(&pods, PORT, HASH_PORT);
    // Every pod reaches every other over TCP and UDP, with its own address as the source.
    full_mesh(&pods, PORT, log);
    send_and_verify(
        &pods[0].ns,
        sock(&pods[5].ip, HASH_PORT),
        8 << 20,
        Duration::from_secs(30),
    )
    .unwrap();

    // A host-gw peer whose PublicIP is off our L2 subnet: warned about, not routed.
    tb.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.5.250.0-24",
        r#"{"PublicIP":"192.168.77.7","PublicIPv6":null,"BackendType":"host-gw"}"#,
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        log(0)
            .contains("192.168.77.7 is not on this node's L2 subnet")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no warning for the far peer:\n{}", log(0)));
    let routes = tb.exec(&tb.nodes[0].ns, &["ip", "-4", "route"]).unwrap();
    assert!(!routes.contains("10.5.250.0"), "{routes}");

    // A peer that leaves: its route goes.
    let st = tb.stop(handles[2], Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(0));
    tb.etcdctl(&[
        "del",
        &format!("/coreos.com/network/subnets/{}-24", subnets[2].network()),
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        let r = tb
            .exec(
                &tb.nodes[0].ns,
                &["ip", "-4", "route", "show", "dev", "eth0"],
            )
            .ok()?;
        (!r.contains(&subnets[2].to_string())).then_some(())
    })
    .expect("route to the departed peer still there");
    let (ok, _) = tb.exec_status(
        &pods[0].ns,
        &["ping", "-c1", "-W1", &pods[4].ip],
        Duration::from_secs(5),
    );
    assert!(!ok, "the departed peer's pods are no longer routed");
    let (ok, out) = tb.exec_status(
        &pods[0].ns,
        &["ping", "-c1", "-W2", &pods[2].ip],
        Duration::from_secs(5),
    );
    assert!(ok, "the remaining peer still works: {out}");
}
