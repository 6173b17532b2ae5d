//! Root: the table `ip6 flannel-proxy` carries real IPv6 traffic. One node namespace with
//! a dual-stack underlay, a client pod behind bridge `cni0` and an endpoint pod behind a
//! second bridge (so that replies pass the node and its conntrack, as across nodes); a
//! dual-stack Service is reached on its IPv6 ClusterIP (DNATed to the endpoint's IPv6
//! address) and on its IPv4 one (the IPv4 table, alongside), on a NodePort at the node's IPv6
//! address from a host outside, and an IPv6 Service without endpoints is refused at once.
//! Runs in namespaces of its own (test-support's testbed: unique names, removed on drop).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use nft::NftCommand;
use registry::{IpFamily, Protocol};
use service_proxy::model::{Endpoint, PortId, ServicePort};
use service_proxy::nft::{ProxyConfig, TABLE};
use service_proxy::sync::{ConntrackCommand, Syncer};
use test_support::{require_root_with, Testbed};

const CLUSTER_IP6: &str = "fd00:10:96::a";
const EMPTY_IP6: &str = "fd00:10:96::b";
const CLUSTER_IP4: &str = "10.96.0.10";
const CLIENT6: &str = "fd10:0:0:11::2";
const SERVER6: &str = "fd10:0:0:12::2";
const SERVER4: &str = "10.5.2.2";

fn port(name: &str, family: IpFamily, cluster_ip: &str, eps: &[&str]) -> ServicePort {
    let id = PortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        family,
    };
    let eps = eps
        .iter()
        .map(|ip| Endpoint {
            ip: ip.parse().expect("endpoint"),
            port: 8080,
            local: true,
        })
        .collect();
    let ip: IpAddr = cluster_ip.parse().expect("cluster ip");
    ServicePort::new(id, ip, 80, eps)
}

/// The dual-stack Service "web" (NodePort 30080) and the IPv6 Service "empty" (NodePort
/// 30081) without endpoints; `web6` lists web's IPv6 endpoints.
fn ports(web6: &[&str]) -> BTreeMap<PortId, ServicePort> {
    let mut web4 = port("web", IpFamily::Ipv4, CLUSTER_IP4, &[SERVER4]);
    web4.node_port = Some(30080);
    let mut web = port("web", IpFamily::Ipv6, CLUSTER_IP6, web6);
    web.node_port = Some(30080);
    let mut empty = port("empty", IpFamily::Ipv6, EMPTY_IP6, &[]);
    empty.node_port = Some(30081);
    [web4, web, empty]
        .into_iter()
        .map(|p| (p.id.clone(), p))
        .collect()
}

/// Connects from `ns` to `host`:`port` with socat (bounded); returns (ok, output, elapsed).
fn fetch(tb: &Testbed, ns: &str, host: &str, port: u16) -> (bool, String, Duration) {
    let target = if host.contains(':') {
        format!("TCP6:[{host}]:{port},connect-timeout=3")
    } else {
        format!("TCP4:{host}:{port},connect-timeout=3")
    };
    let started = Instant::now();
    let (ok, out) = tb.exec_status(
        ns,
        &["socat", "-T", "3", "-", &target],
        Duration::from_secs(10),
    );
    (ok, out, started.elapsed())
}

fn sh(tb: &Testbed, ns: &str, args: &[&str]) {
    tb.exec(ns, args)
        .unwrap_or_else(|e| panic!("{ns}: {args:?}: {e}"));
}

#[test]
fn ipv6_cluster_ip_node_port_and_reject_carry_real_traffic() {
    if !require_root_with(&["ip", "nft", "conntrack", "socat"]) {
        return;
    }
    let mut tb = Testbed::new(1).expect("testbed");
    let node6 = tb.add_ipv6_underlay().expect("ipv6 underlay").remove(0);
    let node = tb.nodes[0].ns.clone();
    let hub = tb.hub.clone();
    let client = tb
        .add_pod_on(0, "cni0", "10.5.1.2/24", "10.5.1.1/24", 1500)
        .expect("client pod")
        .ns;
    let server = tb
        .add_pod_on(0, "cnb0", &format!("{SERVER4}/24"), "10.5.2.1/24", 1500)
        .expect("server pod")
        .ns;
    for (ns, bridge, gw, addr) in [
        (&client, "cni0", "fd10:0:0:11::1", CLIENT6),
        (&server, "cnb0", "fd10:0:0:12::1", SERVER6),
    ] {
        tb.add_pod_ipv6(0, ns, bridge, gw, addr)
            .unwrap_or_else(|e| panic!("IPv6 for {ns}: {e}"));
    }
    // The server answers with its name on both families.
    tb.spawn(
        &server,
        "socat",
        &[
            "TCP6-LISTEN:8080,ipv6only=0,fork,reuseaddr",
            "SYSTEM:echo server",
        ],
        &[],
        &std::env::temp_dir().join(format!("{}-ipv6-server.log", tb.tag)),
    )
    .expect("server");

    let prefix: Vec<String> = ["ip", "netns", "exec", node.as_str()]
        .map(String::from)
        .to_vec();
    let cfg = ProxyConfig {
        cluster_cidr: Some("10.5.0.0/16".parse().expect("cidr")),
        cluster_cidr6: Some("fd10::/48".parse().expect("cidr6")),
    };
    let mut v4 = Syncer::new(
        NftCommand {
            prefix: prefix.clone(),
        },
        ConntrackCommand {
            prefix: prefix.clone(),
        },
        cfg,
    );
    let mut v6 = Syncer::for_family(
        IpFamily::Ipv6,
        NftCommand {
            prefix: prefix.clone(),
        },
        ConntrackCommand { prefix },
        cfg,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let wanted = ports(&[SERVER6]);
    assert!(rt.block_on(v4.sync(&wanted)).expect("ip table").full);
    assert!(rt.block_on(v6.sync(&wanted)).expect("ip6 table").full);
    let table6 = tb
        .exec(&node, &["nft", "list", "table", "ip6", TABLE])
        .expect("list ip6");
    for needle in [
        "type ipv6_addr . inet_proto . inet_service : verdict",
        "fd00:10:96::a . tcp . 80 : goto svc-",
        "fd00:10:96::b . tcp . 80 : goto reject-chain",
        "tcp . 30081 : goto reject-chain",
        "dnat to [fd10:0:0:12::2]:8080",
    ] {
        assert!(table6.contains(needle), "missing {needle:?} in\n{table6}");
    }
    let table4 = tb
        .exec(&node, &["nft", "list", "table", "ip", TABLE])
        .expect("list ip");
    assert!(
        table4.contains("10.96.0.10 . tcp . 80 : goto svc-") && !table4.contains("fd00"),
        "{table4}"
    );

    // The route to the ClusterIPs, as a cluster's hosts have through their node.
    sh(
        &tb,
        &hub,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:10:96::/112",
            "via",
            &node6,
        ],
    );

    // IPv6 ClusterIP from a pod: DNATed to the endpoint's IPv6 address.
    let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP6, 80);
    assert!(ok && out.contains("server"), "IPv6 ClusterIP: {out}");
    let ct = tb
        .exec(&node, &["conntrack", "-L", "-f", "ipv6", "-p", "tcp"])
        .unwrap_or_default();
    assert!(
        ct.contains(&format!("src={SERVER6}")),
        "no DNAT to the endpoint in conntrack:\n{ct}"
    );
    // The same Service on its IPv4 ClusterIP (the ip table, alongside).
    let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP4, 80);
    assert!(ok && out.contains("server"), "IPv4 ClusterIP: {out}");
    // From outside the cluster (masqueraded: the server has no route to the hub).
    let (ok, out, _) = fetch(&tb, &hub, CLUSTER_IP6, 80);
    assert!(
        ok && out.contains("server"),
        "ClusterIP from outside: {out}"
    );
    // NodePort on the node's IPv6 address, from a host outside.
    let (ok, out, _) = fetch(&tb, &hub, &node6, 30080);
    assert!(ok && out.contains("server"), "IPv6 NodePort: {out}");

    // No endpoints: refused at once (ICMPv6 from the reject chain), ClusterIP and NodePort.
    for (ns, host, port) in [(&client, EMPTY_IP6, 80), (&hub, node6.as_str(), 30081)] {
        let (ok, out, took) = fetch(&tb, ns, host, port);
        assert!(
            !ok && out.contains("Connection refused") && took < Duration::from_secs(2),
            "[{host}]:{port} from {ns}: ok={ok} after {took:?}: {out}"
        );
    }

    // An incremental sync (nft text for the ip6 table): web loses its IPv6 endpoint and is
    // refused; the IPv4 half keeps working.
    let rep = rt.block_on(v6.sync(&ports(&[]))).expect("incremental");
    assert!(!rep.full && rep.changed == 1, "{rep:?}");
    let rep = rt.block_on(v4.sync(&ports(&[]))).expect("ip unchanged");
    assert_eq!((rep.changed, rep.ops), (0, 0));
    let (ok, out, took) = fetch(&tb, &client, CLUSTER_IP6, 80);
    assert!(
        !ok && out.contains("Connection refused") && took < Duration::from_secs(2),
        "after removing the endpoint: {out}"
    );
    let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP4, 80);
    assert!(ok && out.contains("server"), "IPv4 ClusterIP: {out}");
    // And back.
    rt.block_on(v6.sync(&ports(&[SERVER6])))
        .expect("incremental");
    let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP6, 80);
    assert!(ok && out.contains("server"), "endpoint back: {out}");

    // Cleanup removes both tables.
    let (ok, out) = tb.exec_status(
        &node,
        &[
            "sh",
            "-c",
            &format!(
                "printf '{}' | nft -f - && nft list tables",
                service_proxy::nft::cleanup().replace('\n', "\\n")
            ),
        ],
        Duration::from_secs(10),
    );
    assert!(ok && !out.contains(TABLE), "{out}");
}
