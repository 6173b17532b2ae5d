//! Root: the userspace mode relays real IPv6 TCP. One node namespace with a dual-stack
//! underlay, a client pod behind bridge `cni0` and an endpoint pod behind a second bridge;
//! the proxy's listeners live in the node namespace (its runtime's threads entered it) and
//! its tables are loaded there with real nft. A dual-stack Service is reached on its IPv6
//! ClusterIP from the pod, from the node itself and from a host outside, on a NodePort at the
//! node's IPv6 address, and on its IPv4 ClusterIP alongside; two of its three IPv6 endpoints
//! are down (one refuses, one never answers) and every connection still reaches the live one
//! (the next endpoint is tried); an IPv6 Service without endpoints is refused at once; a
//! listener's port addressed directly (not redirected) is refused by the `ip6` guard.
//! Runs in namespaces of its own (test-support's testbed: unique names, removed on drop).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use nft::NftCommand;
use registry::{IpFamily, Protocol};
use service_proxy::metrics::ProxyMetrics;
use service_proxy::model::{Endpoint, PortId, ServicePort};
use service_proxy::nft::TABLE;
use service_proxy::userspace::{Entry, UserspaceOptions, UserspaceProxy};
use test_support::{in_netns, require_root_with, Testbed};

const CLUSTER_IP6: &str = "fd00:10:96::a";
const EMPTY_IP6: &str = "fd00:10:96::b";
const CLUSTER_IP4: &str = "10.96.0.10";
const CLIENT6: &str = "fd10:0:0:11::2";
const SERVER6: &str = "fd10:0:0:12::2";
/// On the endpoint bridge's prefix, but nobody has it: a connect there never completes.
const SILENT6: &str = "fd10:0:0:12::99";
const SERVER4: &str = "10.5.2.2";

fn port(name: &str, family: IpFamily, cluster_ip: &str, eps: &[(&str, u16)]) -> ServicePort {
    let id = PortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        family,
    };
    let eps = eps
        .iter()
        .map(|(ip, port)| Endpoint {
            ip: ip.parse().expect("endpoint"),
            port: *port,
            local: true,
        })
        .collect();
    let ip: IpAddr = cluster_ip.parse().expect("cluster ip");
    ServicePort::new(id, ip, 80, eps)
}

/// The dual-stack Service "web" (NodePort 30080; IPv6 endpoints: the live server, a port
/// that refuses and an address that never answers) and the IPv6 Service "empty" without
/// endpoints.
fn ports() -> BTreeMap<PortId, ServicePort> {
    let mut web4 = port("web", IpFamily::Ipv4, CLUSTER_IP4, &[(SERVER4, 8080)]);
    web4.node_port = Some(30080);
    let mut web = port(
        "web",
        IpFamily::Ipv6,
        CLUSTER_IP6,
        &[(SERVER6, 8080), (SERVER6, 8081), (SILENT6, 8080)],
    );
    web.node_port = Some(30080);
    let empty = port("empty", IpFamily::Ipv6, EMPTY_IP6, &[]);
    [web4, web, empty]
        .into_iter()
        .map(|p| (p.id.clone(), p))
        .collect()
}

/// Connects from `ns` to `host`:`port` with socat (bounded); returns (ok, output, elapsed).
/// socat's stdin is empty: `-t 5` waits for the answer after that half-close (a relay that
/// first meets a silent endpoint answers after the connect timeout, beyond the default 0.5 s).
fn fetch(tb: &Testbed, ns: &str, host: &str, port: u16) -> (bool, String, Duration) {
    let target = if host.contains(':') {
        format!("TCP6:[{host}]:{port},connect-timeout=3")
    } else {
        format!("TCP4:{host}:{port},connect-timeout=3")
    };
    let started = Instant::now();
    let (ok, out) = tb.exec_status(
        ns,
        &["socat", "-t", "5", "-T", "5", "-", &target],
        Duration::from_secs(10),
    );
    (ok, out, started.elapsed())
}

fn sh(tb: &Testbed, ns: &str, args: &[&str]) {
    tb.exec(ns, args)
        .unwrap_or_else(|e| panic!("{ns}: {args:?}: {e}"));
}

#[test]
fn userspace_mode_relays_ipv6_and_retries_the_next_endpoint() {
    if !require_root_with(&["ip", "nft", "socat"]) {
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
    // The server answers with its name on both families (port 8080 only).
    tb.spawn(
        &server,
        "socat",
        &[
            "TCP6-LISTEN:8080,ipv6only=0,fork,reuseaddr",
            "SYSTEM:echo server",
        ],
        &[],
        &std::env::temp_dir().join(format!("{}-userspace6-server.log", tb.tag)),
    )
    .expect("server");
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

    // The proxy's runtime: its threads entered the node namespace, so the listeners and the
    // upstream connections are the node's. Work is spawned onto it (a `block_on` future runs
    // on the calling thread, outside the namespace).
    let rt = in_netns(&node, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    })
    .expect("enter the node namespace")
    .expect("runtime");
    let prefix: Vec<String> = ["ip", "netns", "exec", node.as_str()]
        .map(String::from)
        .to_vec();
    let metrics = ProxyMetrics::default();
    let opts = UserspaceOptions {
        connect_timeout: Duration::from_millis(500),
        ..UserspaceOptions::default()
    };
    let mut proxy =
        UserspaceProxy::new(NftCommand { prefix }, opts, metrics.clone()).with_ipv6(true);
    assert!(proxy.serves_ipv6());
    let wanted = ports();
    let (proxy, changed) = rt
        .block_on(rt.spawn(async move {
            let r = proxy.apply(&wanted).await;
            (proxy, r)
        }))
        .expect("apply task");
    assert_eq!(changed.expect("apply"), 5, "listeners");
    let id6 = wanted_id(IpFamily::Ipv6, "web");
    let listener = proxy
        .local_port(&id6, Entry::Cluster)
        .expect("IPv6 listener");

    let table6 = tb
        .exec(&node, &["nft", "list", "table", "ip6", TABLE])
        .expect("list ip6");
    for needle in [
        format!("ip6 daddr fd00:10:96::a tcp dport 80 redirect to :{listener}"),
        "ip6 daddr != ::1 ip6 daddr != fe80::/10 tcp dport 30080 redirect to :".to_string(),
        "ip6 daddr fd00:10:96::b tcp dport 80 reject with tcp reset".to_string(),
        format!("tcp . {listener}"),
    ] {
        assert!(table6.contains(&needle), "missing {needle:?} in\n{table6}");
    }
    let table4 = tb
        .exec(&node, &["nft", "list", "table", "ip", TABLE])
        .expect("list ip");
    assert!(
        table4.contains("ip daddr 10.96.0.10 tcp dport 80 redirect to :")
            && !table4.contains("fd00"),
        "{table4}"
    );

    // IPv6 ClusterIP from a pod, over and over: round robin starts at each of the three
    // endpoints in turn, and the two dead ones are passed over every time.
    for i in 0..6 {
        let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP6, 80);
        assert!(ok && out.contains("server"), "IPv6 ClusterIP #{i}: {out}");
    }
    assert!(
        metrics.connect_failures.get() >= 4,
        "the dead endpoints were tried: {}",
        metrics.connect_failures.get()
    );
    // From the node itself (redirected in the output hook, to ::1).
    let (ok, out, _) = fetch(&tb, &node, CLUSTER_IP6, 80);
    assert!(ok && out.contains("server"), "from the node: {out}");
    // From a host outside, on the ClusterIP and on the NodePort at the node's IPv6 address.
    let (ok, out, _) = fetch(&tb, &hub, CLUSTER_IP6, 80);
    assert!(
        ok && out.contains("server"),
        "ClusterIP from outside: {out}"
    );
    let (ok, out, _) = fetch(&tb, &hub, &node6, 30080);
    assert!(ok && out.contains("server"), "IPv6 NodePort: {out}");
    // The IPv4 half, alongside.
    let (ok, out, _) = fetch(&tb, &client, CLUSTER_IP4, 80);
    assert!(ok && out.contains("server"), "IPv4 ClusterIP: {out}");

    // No endpoints: refused at once.
    let (ok, out, took) = fetch(&tb, &client, EMPTY_IP6, 80);
    assert!(
        !ok && out.contains("Connection refused") && took < Duration::from_secs(2),
        "empty IPv6 Service: ok={ok} after {took:?}: {out}"
    );
    // The listener's own port, addressed directly: refused by the ip6 guard.
    let (ok, out, _) = fetch(&tb, &hub, &node6, listener);
    assert!(!ok, "the listener was reached without a redirect: {out}");
    let relayed = metrics.connections.get();

    // Shutdown closes the listeners; cleanup removes both tables.
    rt.block_on(rt.spawn(async move {
        let mut proxy = proxy;
        proxy.shutdown().await;
    }))
    .expect("shutdown");
    assert_eq!(
        metrics.connections.get(),
        relayed,
        "the guard's refusal reached no listener"
    );
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
    rt.shutdown_timeout(Duration::from_secs(5));
}

fn wanted_id(family: IpFamily, name: &str) -> PortId {
    PortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        family,
    }
}
