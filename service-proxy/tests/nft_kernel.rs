//! Root: every kind of rule the nftables mode renders is accepted by the real kernel, and
//! incremental transactions (add, scale, move a ClusterIP, remove) apply on top of each other
//! and leave exactly the wanted table. Runs in a namespace of its own.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use nft::NftCommand;
use registry::Protocol;
use service_proxy::model::{Endpoint, PortId, ServicePort};
use service_proxy::nft::{ProxyConfig, TABLE};
use service_proxy::sync::{ConntrackCommand, Syncer};
use test_support::{require_root_with, Testbed};

fn port(name: &str, ip: [u8; 4], proto: Protocol, eps: &[([u8; 4], bool)]) -> ServicePort {
    let id = PortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol: proto,
        family: registry::IpFamily::Ipv4,
    };
    let eps = eps
        .iter()
        .map(|(ip, local)| Endpoint {
            ip: Ipv4Addr::from(*ip).into(),
            port: 8080,
            local: *local,
        })
        .collect();
    ServicePort::new(id, Ipv4Addr::from(ip), 80, eps)
}

fn map(ports: Vec<ServicePort>) -> BTreeMap<PortId, ServicePort> {
    ports.into_iter().map(|p| (p.id.clone(), p)).collect()
}

/// Service ports of every kind: "web" (with `web_endpoints`; NodePort, external IP, Local,
/// affinity; returned first as well), an internal-Local UDP port, one without endpoints, a
/// Cluster-policy UDP NodePort, a Local NodePort with remote endpoints only, and with `sctp`
/// an SCTP port.
fn services(
    web_endpoints: &[([u8; 4], bool)],
    sctp: bool,
) -> (ServicePort, BTreeMap<PortId, ServicePort>) {
    let mut every_kind = port("web", [10, 96, 0, 10], Protocol::Tcp, web_endpoints);
    every_kind.node_port = Some(30080);
    every_kind.external_ips = vec![Ipv4Addr::new(192, 0, 2, 7).into()];
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
    let mut all = vec![every_kind.clone(), internal, empty, cluster_np, remote_only];
    if sctp {
        all.push(port(
            "sctp",
            [10, 96, 0, 15],
            Protocol::Sctp,
            &[([10, 5, 1, 7], true)],
        ));
    }
    (every_kind, map(all))
}

/// `v1` with "web" replaced by `web`, "empty" and "np" removed, and 10.96.0.12 (empty's
/// address) taken by a new Service "moved".
fn changed(v1: &BTreeMap<PortId, ServicePort>, web: ServicePort) -> BTreeMap<PortId, ServicePort> {
    let moved = port(
        "moved",
        [10, 96, 0, 12],
        Protocol::Tcp,
        &[([10, 5, 1, 9], true)],
    );
    let mut v2 = v1.clone();
    v2.insert(web.id.clone(), web);
    v2.retain(|id, _| id.name != "empty" && id.name != "np");
    v2.insert(moved.id.clone(), moved);
    v2
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
            cluster_cidr6: None,
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

    let (every_kind, v1) = services(&[([10, 5, 1, 2], true), ([10, 5, 2, 2], false)], false);
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
    let v2 = changed(&v1, web2);
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

/// The listing with each map's elements sorted (the kernel's hash order is per set).
fn normalized(listing: &str) -> String {
    let mut out = String::new();
    let mut elements: Option<String> = None;
    for line in listing.lines() {
        if let Some(acc) = &mut elements {
            acc.push_str(line.trim());
            acc.push(' ');
        } else if let Some(at) = line.find("elements = {") {
            out.push_str(&line[..at]);
            elements = Some(line[at + "elements = {".len()..].trim().to_string() + " ");
        } else {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let acc = elements.as_ref().expect("collecting");
        if let Some(body) = acc.trim_end().strip_suffix('}') {
            let mut items: Vec<&str> = body
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            items.sort();
            out.push_str(&format!("elements = {{ {} }}\n", items.join(", ")));
            elements = None;
        }
    }
    out
}

/// Incremental transactions sent as netlink batches leave exactly the table that the same
/// transactions sent as `nft` text leave (every rule kind, both masquerade prefix forms),
/// a refused batch changes nothing and names the refused step, and the chain probe works.
#[test]
fn netlink_batches_equal_nft_text() {
    use nft::NfNetlink;
    use service_proxy::nft::{Key, Op};
    use service_proxy::sync::{ApplyOps, NftNetlink};

    if !require_root_with(&["ip", "nft", "conntrack"]) {
        return;
    }
    let tb = Testbed::new(2).expect("testbed");
    let (text_ns, nl_ns) = (tb.nodes[0].ns.clone(), tb.nodes[1].ns.clone());
    let prefix =
        |ns: &str| -> Vec<String> { ["ip", "netns", "exec", ns].map(String::from).to_vec() };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let list = |ns: &str| {
        normalized(
            &tb.exec(ns, &["nft", "list", "table", "ip", TABLE])
                .expect("list"),
        )
    };

    let (every_kind, v1) = services(
        &[
            ([10, 5, 1, 2], true),
            ([10, 5, 2, 2], false),
            ([10, 5, 2, 3], false),
        ],
        true,
    );
    let mut web2 = every_kind.clone();
    web2.endpoints.truncate(1);
    web2.affinity = Some(120);
    let v2 = changed(&v1, web2);

    for cidr in ["10.5.0.0/16", "10.0.0.0/12"] {
        let cfg = ProxyConfig {
            cluster_cidr: Some(cidr.parse().expect("cidr")),
            cluster_cidr6: None,
        };
        let mut by_text = Syncer::new(
            NftCommand {
                prefix: prefix(&text_ns),
            },
            ConntrackCommand {
                prefix: prefix(&text_ns),
            },
            cfg,
        );
        let socket = test_support::in_netns(&nl_ns, NfNetlink::open)
            .expect("enter namespace")
            .expect("netlink socket");
        let mut by_netlink = Syncer::new(
            NftNetlink {
                command: NftCommand {
                    prefix: prefix(&nl_ns),
                },
                netlink: Some(socket),
            },
            ConntrackCommand {
                prefix: prefix(&nl_ns),
            },
            cfg,
        );
        // Full rebuild (nft text in both), then incremental steps: everything added, changed,
        // everything removed, everything added again.
        for (step, want) in [&BTreeMap::new(), &v1, &v2, &BTreeMap::new(), &v1]
            .into_iter()
            .enumerate()
        {
            let a = rt.block_on(by_text.sync(want)).expect("text sync");
            let b = rt.block_on(by_netlink.sync(want)).expect("netlink sync");
            assert_eq!((a.full, a.ops), (b.full, b.ops), "step {step}");
            assert_eq!(a.full, step == 0);
            let (ta, tb_) = (list(&text_ns), list(&nl_ns));
            assert_eq!(
                ta, tb_,
                "{cidr} step {step}: nft text (left) vs netlink (right)"
            );
            if step == 1 {
                for needle in [
                    "numgen random mod 3",
                    "update @aff-",
                    "sctp dnat to",
                    "fib saddr type local",
                ] {
                    assert!(tb_.contains(needle), "missing {needle:?}:\n{tb_}");
                }
            }
        }
        let nl = by_netlink.applier();
        assert!(rt.block_on(nl.chain_exists("services")));
        assert!(!rt.block_on(nl.chain_exists("no-such-chain")));
    }

    // A refused batch changes nothing and names the refused step.
    let socket = test_support::in_netns(&nl_ns, NfNetlink::open)
        .expect("enter namespace")
        .expect("netlink socket");
    let before = list(&nl_ns);
    let ops = vec![
        Op::AddChain("would-be-added".into()),
        Op::DeleteElement {
            map: service_proxy::nft::MAP_SERVICE_IPS,
            key: Key::Addr {
                addr: Ipv4Addr::new(10, 96, 9, 9).into(),
                protocol: Protocol::Tcp,
                port: 9,
            },
        },
    ];
    let err = service_proxy::nfnl::apply(&socket, &ops).expect_err("missing element");
    let msg = err.to_string();
    assert!(
        msg.contains("delete element ip flannel-proxy service-ips { 10.96.9.9 . tcp . 9 }")
            && msg.contains("No such file"),
        "{msg}"
    );
    assert_eq!(list(&nl_ns), before, "a refused batch must change nothing");
    // And the same through the text path of the trait, for comparison of the two messages.
    let text = NftNetlink {
        command: NftCommand {
            prefix: prefix(&nl_ns),
        },
        netlink: None,
    };
    assert!(rt.block_on(text.apply_ops(&ops)).is_err());
    tb.exec(&nl_ns, &["nft", "delete", "table", "ip", TABLE])
        .expect("delete table");
    assert!(!socket.chain_exists(TABLE, "services").expect("probe"));
}
