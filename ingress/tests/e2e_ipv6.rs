//! flannel-ingress on a dual-stack cluster end to end: three namespace nodes on a dual-stack
//! underlay (test-support's fd00:210::/64), one pod per node with an IPv4 and an IPv6 address,
//! each node routing the others' pod subnets of both families (as host-gw does); flannel-ingress
//! on node 0 listening on `[::]:80` and `[::]:443` (both families on one socket). From the
//! hub: curl -6 to the ingress reaching IPv6 pod endpoints (round robin over three nodes), the
//! client's IPv6 address forwarded (`Forwarded` quotes it), HTTPS by SNI and HTTP/2 over IPv6;
//! an IPv4 client reaching IPv6-only endpoints and an IPv6 client reaching IPv4-only ones (the
//! ingress ends the client's connection: the families are independent); a Service with
//! endpoints of both families served by both. Needs root, curl and openssl; skips with a reason
//! without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use test_support::{wait_for, HUB_IP, HUB_IP6};

mod common;

use common::{field, make_certs, path, service, tls_secret, Bed, INGRESS_CLASS, PORT};

#[test]
fn ingress_serves_ipv6_clients_and_ipv6_endpoints() {
    let Some(mut bed) = Bed::new(3) else {
        return;
    };
    let v6 = bed.tb.add_ipv6_underlay().unwrap();
    // Pod i: 10.5.(i+1).2 and fd00:5:(i+1)::2, gateways .1 and ::1 on the node's bridge.
    let mut v4_ips = Vec::new();
    let mut v6_ips = Vec::new();
    for i in 0..3 {
        let (ns, ip4) = bed.add_pod(i, 0);
        let ip6 = format!("fd00:5:{:x}::2", i + 1);
        bed.tb
            .add_pod_ipv6(i, &ns, "cni0", &format!("fd00:5:{:x}::1", i + 1), &ip6)
            .unwrap();
        // One socket for both families (bindv6only is off): the pod is the same either way.
        bed.serve(&ns, SocketAddr::from(([0u16; 8], PORT)), &format!("p{i}"));
        v4_ips.push(ip4);
        v6_ips.push(ip6);
    }
    bed.route_pods(Some(&v6));
    let dir = bed.dir.path().to_path_buf();
    make_certs(&dir, &[("cert-v6", "v6.test")]);
    let mut objects = String::from(INGRESS_CLASS);
    objects += &service("svc-v6", "http", &v6_ips);
    objects += &service("svc-v4", "http", &v4_ips[..2]);
    objects += &service("svc-dual", "http", &[v4_ips[0].clone(), v6_ips[2].clone()]);
    objects += &tls_secret(&dir, "cert-v6");
    objects += "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: dual, namespace: default}\nspec:\n  ingressClassName: flannel\n  tls:\n  - {hosts: [v6.test], secretName: cert-v6}\n  rules:\n";
    for (host, svc) in [
        ("v6.test", "svc-v6"),
        ("v4.test", "svc-v4"),
        ("dual.test", "svc-dual"),
    ] {
        objects += &format!("  - host: {host}\n    http:\n      paths:\n");
        objects += &path("/", "Prefix", svc);
    }
    bed.apply(&objects);
    let started = bed.start_ingress(0, &["--http-addr", "[::]:80", "--https-addr", "[::]:443"]);
    let log = || started.log();
    let at6 = format!("[{}]", v6[0]);
    let at4 = bed.tb.nodes[0].ip.clone();
    wait_for(Duration::from_secs(5), || {
        (bed.get_at(&at6, "v6.test", "/").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("no route came up over IPv6:\n{}", log()));

    // Which pods answer `host` through `at`, each seen connecting from the ingress node over
    // the family `v6` says (node 0's pod from its bridge, the others' from its underlay).
    let pods = |at: &str, host: &str, v6: bool| -> BTreeSet<String> {
        (0..6)
            .map(|_| {
                let (code, body) = bed.get_at(at, host, "/");
                assert_eq!(code, 200, "{at} {host}: {body}\n{}", log());
                let peer: std::net::IpAddr = field(&body, "peer").parse().unwrap();
                assert_eq!(peer.is_ipv6(), v6, "{at} {host}: {body}");
                field(&body, "pod").to_string()
            })
            .collect()
    };
    let set = |ids: &[&str]| -> BTreeSet<String> { ids.iter().map(|s| s.to_string()).collect() };
    // IPv6 client, IPv6 endpoints on three nodes; the client's address forwarded.
    assert_eq!(
        pods(&at6, "v6.test", true),
        set(&["p0", "p1", "p2"]),
        "IPv6 client → IPv6 endpoints"
    );
    let (_, body) = bed.get_at(&at6, "v6.test", "/x");
    assert_eq!(field(&body, "xff"), HUB_IP6, "{body}");
    assert_eq!(
        field(&body, "fwd"),
        format!("for=\"[{HUB_IP6}]\";host=\"v6.test\";proto=http"),
        "{body}"
    );
    // IPv4 client (same listener), IPv6-only endpoints.
    assert_eq!(
        pods(&at4, "v6.test", true),
        set(&["p0", "p1", "p2"]),
        "IPv4 client → IPv6 endpoints"
    );
    let (_, body) = bed.get_at(&at4, "v6.test", "/");
    assert_eq!(
        field(&body, "xff"),
        HUB_IP,
        "an IPv4 client is no mapped address: {body}"
    );
    // IPv6 client, IPv4-only endpoints.
    assert_eq!(
        pods(&at6, "v4.test", false),
        set(&["p0", "p1"]),
        "IPv6 client → IPv4 endpoints"
    );
    // Endpoints of both families in one Service: both serve (p0 over IPv4, p2 over IPv6).
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let (code, body) = bed.get_at(&at6, "dual.test", "/");
        assert_eq!(code, 200, "{body}");
        let peer: std::net::IpAddr = field(&body, "peer").parse().unwrap();
        seen.insert(format!(
            "{} {}",
            field(&body, "pod"),
            if peer.is_ipv6() { 6 } else { 4 }
        ));
    }
    assert_eq!(seen, set(&["p0 4", "p2 6"]), "dual-stack endpoints");

    // HTTPS by SNI over IPv6, HTTP/1.1 and HTTP/2.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, body, got) = bed.https_at(&at6, "v6.test", "/tls", &[flag]);
        assert_eq!((code, got.as_str()), (200, version), "{body}\n{}", log());
        assert_eq!(field(&body, "proto"), "https", "{body}");
        assert!(field(&body, "peer").contains(':'), "{body}");
    }
    bed.finish(started);
}
