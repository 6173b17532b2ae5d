//! Root: every kind of rule the nftables mode renders is accepted by the real kernel, and
//! incremental transactions (add, scale, move a ClusterIP, remove) apply on top of each other
//! and leave exactly the wanted table. Runs in a namespace of its own.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use registry::Protocol;
use service_proxy::model::{Endpoint, PortId, ServicePort};
use service_proxy::nft::{ProxyConfig, TABLE};
use service_proxy::sync::{ConntrackCommand, NftCommand, Syncer};
use test_support::{require_root_with, Testbed};

fn port(name: &str, ip: [u8; 4], proto: Protocol, eps: &[([u8; 4], bool)]) -> ServicePort {
    let id = PortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol: proto,
    };
    let eps = eps
        .iter()
        .map(|(ip, local)| Endpoint {
            ip: Ipv4Addr::from(*ip),
            port: 8080,
            local: *local,
        })
        .collect();
    ServicePort::new(id, Ipv4Addr::from(ip), 80, eps)
}

fn map(ports: Vec<ServicePort>) -> BTreeMap<PortId, ServicePort> {
    ports.into_iter().map(|p| (p.id.clone(), p)).collect()
}

#[test]
fn kernel_accepts_full_and_incremental_transactions() {
    if !require_root_with(&["ip", "nft", "conntrack"]) {
        return;
    }
    let tb = Testbed::new(1).expect("testbed");
    let ns = tb.nodes[0].ns.clone();
    let prefix: Vec<String> = ["ip", "netns", "exec", ns.as_str()]
        .map(String::from)
        .to_vec();
    let mut syncer = Syncer::new(
        NftCommand {
            prefix: prefix.clone(),
        },
        ConntrackCommand { prefix },
        ProxyConfig {
            cluster_cidr: Some("10.5.0.0/16".parse().expect("cidr")),
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let list = || {
        tb.exec(&ns, &["nft", "list", "table", "ip", TABLE])
            .expect("list")
    };

    let mut every_kind = port(
        "web",
        [10, 96, 0, 10],
        Protocol::Tcp,
        &[([10, 5, 1, 2], true), ([10, 5, 2, 2], false)],
    );
    every_kind.node_port = Some(30080);
    every_kind.external_ips = vec![Ipv4Addr::new(192, 0, 2, 7)];
    every_kind.external_local = true;
    every_kind.affinity = Some(60);
    let mut internal = port(
        "int",
        [10, 96, 0, 11],
        Protocol::Udp,
        &[([10, 5, 2, 3], false)],
    );
    internal.internal_local = true;
    let mut empty = port("empty", [10, 96, 0, 12], Protocol::Tcp, &[]);
    empty.node_port = Some(30081);
    let mut cluster_np = port(
        "np",
        [10, 96, 0, 13],
        Protocol::Udp,
        &[([10, 5, 2, 4], false)],
    );
    cluster_np.node_port = Some(30082);
    let mut remote_only = port(
        "remote",
        [10, 96, 0, 14],
        Protocol::Tcp,
        &[([10, 5, 2, 5], false)],
    );
    remote_only.node_port = Some(30083);
    remote_only.external_local = true;

    let v1 = map(vec![
        every_kind.clone(),
        internal,
        empty,
        cluster_np,
        remote_only,
    ]);
    let rep = rt.block_on(syncer.sync(&v1)).expect("full sync");
    assert!(rep.full);
    let table = list();
    for needle in [
        "10.96.0.10 . tcp . 80 : goto svc-",
        "192.0.2.7 . tcp . 80 : goto ext-",
        "tcp . 30080 : goto ext-",
        "10.96.0.11 . udp . 80 : goto reject-chain",
        "10.96.0.12 . tcp . 80 : goto reject-chain",
        "tcp . 30081 : goto reject-chain",
        "tcp . 30083 : drop",
        "udp . 30082 : goto ext-",
        "flags dynamic,timeout",
        "numgen random mod 2",
        "dnat to 10.5.1.2:8080",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }

    // Scale web down to one endpoint, move 10.96.0.12 from "empty" to a new Service, remove
    // "np": one incremental transaction.
    let mut web2 = every_kind.clone();
    web2.endpoints.truncate(1);
    let moved = port(
        "moved",
        [10, 96, 0, 12],
        Protocol::Tcp,
        &[([10, 5, 1, 9], true)],
    );
    let mut v2 = v1.clone();
    v2.insert(web2.id.clone(), web2);
    v2.retain(|id, _| id.name != "empty" && id.name != "np");
    v2.insert(moved.id.clone(), moved);
    let rep = rt.block_on(syncer.sync(&v2)).expect("incremental sync");
    assert!(!rep.full);
    assert_eq!(rep.changed, 4, "{rep:?}");
    let table = list();
    assert!(
        !table.contains("10.5.2.2"),
        "scaled-down endpoint still present:\n{table}"
    );
    assert!(
        !table.contains("30082"),
        "removed node port still present:\n{table}"
    );
    assert!(
        table.contains("10.96.0.12 . tcp . 80 : goto svc-"),
        "{table}"
    );
    assert!(
        !table.contains("default/np/"),
        "removed chains still present:\n{table}"
    );

    // Removing everything leaves the base table only.
    let rep = rt
        .block_on(syncer.sync(&BTreeMap::new()))
        .expect("remove all");
    assert!(!rep.full);
    let table = list();
    assert!(
        !table.contains("svc-") && !table.contains("ep-") && !table.contains("aff-"),
        "{table}"
    );

    // Someone deletes our table: the next sync fails, the one after rebuilds it.
    tb.exec(&ns, &["nft", "delete", "table", "ip", TABLE])
        .expect("delete table");
    assert!(rt.block_on(syncer.sync(&v1)).is_err());
    let rep = rt.block_on(syncer.sync(&v1)).expect("resync");
    assert!(rep.full);
    assert!(list().contains("10.96.0.10 . tcp . 80 : goto svc-"));
}
