//! flannel-ingress end to end: three namespace nodes whose pods (two per node, routed between
//! the nodes as host-gw would) serve HTTP; etcd in the hub; objects written with `flannelctl
//! apply`; flannel-ingress on node 0; curl from the hub with Host headers and SNI (a test CA
//! made with openssl). Checks: host and path precedence (exact, prefix element-wise, wildcard,
//! any-host default), the class filter, forwarded and hop-by-hop headers, 404/400/503, round
//! robin over pods on three nodes, TLS with two certificates chosen by SNI and the default
//! certificate otherwise, HTTP/2 over ALPN, a slow client cut off and garbage answered 400
//! while others are served, an Ingress change live within a second with no failed request on
//! a kept-alive connection, an endpoint gone mid-load lost no request, /healthz, /metrics.
//! WebSocket, every precedence case and IPv6 have their own files (`e2e_*.rs`). Needs root,
//! curl and openssl; skips with a reason without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::{in_netns, wait_for, HUB_IP};

mod common;

use common::{field, make_certs, path, service, tls_secret, Bed, INGRESS_CLASS, LIMIT, PORT};

/// The Ingress under test; `api_to` is the Service of `a.example.test/api`.
fn ingress(api_to: &str) -> String {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: routes, namespace: default}\nspec:\n  ingressClassName: flannel\n  tls:\n  - {hosts: [a.example.test], secretName: cert-a}\n  - {hosts: ['*.wild.test'], secretName: cert-w}\n  rules:\n  - host: a.example.test\n    http:\n      paths:\n",
    );
    y += &path("/api", "Prefix", api_to);
    y += &path("/exact", "Exact", "svc-b");
    y += &path("/", "Prefix", "svc-c");
    y += "  - host: '*.wild.test'\n    http:\n      paths:\n";
    y += &path("/", "Prefix", "svc-b");
    y += "  - host: empty.test\n    http:\n      paths:\n";
    y += &path("/", "Prefix", "svc-empty");
    y
}

/// A kept-alive HTTP/1.1 client connection from a namespace.
struct KeepAlive {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl KeepAlive {
    fn connect(ns: &str, to: SocketAddr) -> Result<KeepAlive, String> {
        let s = in_netns(ns, move || TcpStream::connect_timeout(&to, LIMIT))?
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.set_nodelay(true).unwrap();
        Ok(KeepAlive {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        })
    }

    /// One GET; returns (status, body).
    fn get(&mut self, host: &str, path: &str) -> Result<(u16, String), String> {
        // One write: a request split over several segments meets Nagle and delayed ACKs.
        self.w
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.r.read_line(&mut line).map_err(|e| e.to_string())?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).map_err(|e| e.to_string())?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(|_| "bad length".to_string())?;
                }
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).map_err(|e| e.to_string())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

#[test]
fn ingress_routes_http_and_https_to_pods_on_three_nodes() {
    let Some(mut bed) = Bed::new(3) else {
        return;
    };
    // Two pods per node in 10.5.<node+1>.0/24; each node routes the others' pod subnets via
    // their underlay address (as host-gw does).
    let mut pod_ips = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        for k in 0..2 {
            let (ns, ip) = bed.add_pod(i, k);
            let bind = SocketAddr::from(([0, 0, 0, 0], PORT));
            servers.push(bed.serve(&ns, bind, &ip));
            pod_ips.push(ip);
        }
    }
    bed.route_pods(None);
    // app a: the first pod of every node; b: the second pods of nodes 0 and 1; c: node 2's.
    let apps = [
        (
            "a",
            vec![pod_ips[0].clone(), pod_ips[2].clone(), pod_ips[4].clone()],
        ),
        ("b", vec![pod_ips[1].clone(), pod_ips[3].clone()]),
        ("c", vec![pod_ips[5].clone()]),
    ];
    let app = |name: &str| -> BTreeSet<String> {
        apps.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.iter().cloned().collect())
            .unwrap()
    };
    let ingress_ip = bed.tb.nodes[0].ip.clone();
    let dir = bed.dir.path().to_path_buf();
    make_certs(
        &dir,
        &[("cert-a", "a.example.test"), ("cert-w", "*.wild.test")],
    );

    let mut objects = String::from(INGRESS_CLASS);
    objects += &service("svc-a", "http", &apps[0].1);
    objects += &service("svc-b", "web", &apps[1].1);
    objects += &service("svc-c", "http", &apps[2].1);
    objects += &service("svc-empty", "http", &[]);
    objects += &tls_secret(&dir, "cert-a");
    objects += &tls_secret(&dir, "cert-w");
    objects += &ingress("svc-a");
    // Another controller's Ingress: never served.
    objects += &format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: theirs, namespace: default}}\nspec:\n  ingressClassName: nginx\n  rules:\n  - host: other.test\n    http:\n      paths:\n{}",
        path("/", "Prefix", "svc-a")
    );
    bed.apply(&objects);

    let started = bed.start_ingress(
        0,
        &[
            "--http-addr",
            "0.0.0.0:80",
            "--https-addr",
            "0.0.0.0:443",
            "--header-timeout",
            "2",
            "--connect-timeout",
            "1",
        ],
    );
    let node0 = bed.tb.nodes[0].ns.clone();
    let get = |host: &str, path: &str| bed.get_at(&ingress_ip, host, path);
    let https =
        |host: &str, path: &str, extra: &[&str]| bed.https_at(&ingress_ip, host, path, extra);
    let show_log = || started.log();
    // The first snapshot may predate some objects' arrival; wait for the routes.
    wait_for(Duration::from_secs(5), || {
        (get("a.example.test", "/api").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("no route came up:\n{}", show_log()));

    // Host + path precedence.
    let (code, body) = get("a.example.test", "/api/v1?q=1");
    assert_eq!(code, 200, "{body}");
    assert!(app("a").contains(field(&body, "pod")), "{body}");
    assert_eq!(field(&body, "path"), "/api/v1");
    assert_eq!(field(&body, "host"), "a.example.test");
    assert_eq!(field(&body, "xff"), HUB_IP);
    assert_eq!(field(&body, "proto"), "http");
    assert_eq!(field(&body, "fport"), "80");
    assert_eq!(
        field(&body, "fwd"),
        format!("for={};host=\"a.example.test\";proto=http", HUB_IP)
    );
    // Element-wise prefix: /apix is not under /api; Exact only for the exact path.
    for (host, p, want) in [
        ("a.example.test", "/api", "a"),
        ("A.Example.Test:80", "/api/", "a"),
        ("a.example.test", "/apix", "c"),
        ("a.example.test", "/exact", "b"),
        ("a.example.test", "/exact/more", "c"),
        ("a.example.test", "/x/../api/y", "a"),
        ("a.example.test", "/%61pi", "a"),
        ("x.wild.test", "/anything", "b"),
        ("y.wild.test", "/", "b"),
    ] {
        let (code, body) = get(host, p);
        assert_eq!(code, 200, "{host}{p}: {body}");
        assert!(
            app(want).contains(field(&body, "pod")),
            "{host}{p} → {want}: {body}"
        );
    }
    for (host, p, want) in [
        ("a.b.wild.test", "/", 404),
        ("wild.test", "/", 404),
        ("unknown.test", "/", 404),
        ("other.test", "/", 404),
        ("empty.test", "/", 503),
        ("a.example.test", "/../etc", 400),
        ("a.example.test", "/%zz", 400),
    ] {
        let (code, body) = get(host, p);
        assert_eq!(code, want, "{host}{p}: {body}");
    }
    // Round robin over the pods of three nodes.
    let seen: BTreeSet<String> = (0..9)
        .map(|_| field(&get("a.example.test", "/api").1, "pod").to_string())
        .collect();
    assert_eq!(seen, app("a"), "round robin");
    // Hop-by-hop headers (and those Connection names) are not forwarded; X-Forwarded-For
    // from the client is not trusted.
    let url = format!("http://{}/api", ingress_ip);
    let (code, body, _) = bed.curl(
        &[
            "-H",
            "Host: a.example.test",
            "-H",
            "X-Hop: 1",
            "-H",
            "Connection: X-Hop",
            "-H",
            "X-Forwarded-For: 6.6.6.6",
        ],
        &url,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(field(&body, "xhop"), "-", "{body}");
    assert_eq!(field(&body, "xff"), HUB_IP, "{body}");

    // TLS: two certificates chosen by SNI, verified against the test CA.
    let (code, body, version) = https("a.example.test", "/api", &["--http1.1"]);
    assert_eq!(
        (code, version.as_str()),
        (200, "1.1"),
        "{body}\n{}",
        show_log()
    );
    assert_eq!(field(&body, "proto"), "https");
    assert_eq!(field(&body, "fport"), "443");
    let (code, body, _) = https("x.wild.test", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(app("b").contains(field(&body, "pod")), "{body}");
    // The certificate really is the one for the name: subjects differ by SNI.
    for (sni, want) in [
        ("a.example.test", "CN = a.example.test"),
        ("x.wild.test", "CN = *.wild.test"),
        ("nothing.test", "flannel-ingress default certificate"),
    ] {
        let connect = format!("{}:443", ingress_ip);
        let (_, out) = bed.tb.exec_status(
            &bed.tb.hub,
            &["sh", "-c", &format!("openssl s_client -connect {connect} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -subject")],
            Duration::from_secs(10),
        );
        assert!(out.contains(want), "SNI {sni}: {out}");
    }
    // A name without a certificate gets the default one, which the test CA did not sign.
    let (code, _, _) = https("unknown.test", "/", &[]);
    assert_eq!(code, 0, "unknown.test must fail verification");
    // HTTP/2 over ALPN.
    let (code, body, version) = https("a.example.test", "/api/h2", &["--http2"]);
    assert_eq!((code, version.as_str()), (200, "2"), "{body}");
    assert_eq!(field(&body, "host"), "a.example.test", "{body}");

    let to: SocketAddr = format!("{ingress_ip}:80").parse().unwrap();

    // A slow client (half a request head) is cut off after --header-timeout, and does not
    // hold up others meanwhile.
    let slow = in_netns(&bed.tb.hub, move || TcpStream::connect_timeout(&to, LIMIT))
        .unwrap()
        .unwrap();
    (&slow).write_all(b"GET / HTTP/1.1\r\nHost: a.exa").unwrap();
    let slow_since = Instant::now();
    assert_eq!(get("a.example.test", "/api").0, 200);
    slow.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut buf = [0u8; 512];
    let n = (&slow).read(&mut buf).unwrap_or(0);
    let waited = slow_since.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the slow client was not cut off: {waited:?}"
    );
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Garbage is answered 400 and closed; others are served meanwhile.
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    ] {
        let s = in_netns(&bed.tb.hub, move || TcpStream::connect_timeout(&to, LIMIT))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        (&s).write_all(junk).unwrap();
        let mut answer = String::new();
        let _ = (&s).read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} → {answer:?}",
            String::from_utf8_lossy(junk)
        );
    }
    assert_eq!(get("a.example.test", "/api").0, 200);

    // Load on a kept-alive connection while the Ingress changes and an endpoint goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let switched_at = Arc::new(Mutex::new(None::<Instant>));
    let b_pods = app("b");
    let hub = bed.tb.hub.clone();
    let loader = {
        let (stop, ok, failures, switched_at) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            switched_at.clone(),
        );
        std::thread::spawn(move || {
            let mut ka = KeepAlive::connect(&hub, to).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match ka.get("a.example.test", "/api/load") {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if b_pods.contains(field(&body, "pod")) {
                            switched_at.lock().unwrap().get_or_insert_with(Instant::now);
                        }
                    }
                    Ok((code, body)) => failures.lock().unwrap().push(format!("{code}: {body}")),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        match KeepAlive::connect(&hub, to) {
                            Ok(k) => ka = k,
                            Err(_) => break,
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Counted in answers, not time, so that a loaded machine only makes it slower.
    let answered = |n: u64| {
        wait_for(Duration::from_secs(20), || {
            (ok.load(Ordering::Relaxed) >= n).then_some(())
        })
        .unwrap_or_else(|| panic!("the load stalled below {n} answers:\n{}", show_log()))
    };
    answered(50);
    // An endpoint of svc-a goes away (its server stops; the Endpoints still name it); 100
    // more answers meanwhile.
    bed.servers[servers[2]].abort();
    answered(ok.load(Ordering::Relaxed) + 100);
    let before = ok.load(Ordering::Relaxed);
    let changed = Instant::now();
    bed.apply(&ingress("svc-b"));
    wait_for(Duration::from_secs(3), || {
        switched_at.lock().unwrap().is_some().then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    let took = switched_at
        .lock()
        .unwrap()
        .map(|t| t.duration_since(changed));
    let failures = failures.lock().unwrap().clone();
    let total = ok.load(Ordering::Relaxed);
    println!("load: {total} answered ({before} before the change), change live after {took:?}, failures {failures:?}");
    assert!(
        failures.is_empty(),
        "failed requests: {failures:?}\n{}",
        show_log()
    );
    let took = took.unwrap_or_else(|| panic!("the change never took effect:\n{}", show_log()));
    assert!(took < Duration::from_secs(1), "the change took {took:?}");

    // Metrics.
    let (_, metrics) = bed.tb.exec_status(
        &node0,
        &["curl", "-sS", "-m", "2", "http://127.0.0.1:10254/metrics"],
        Duration::from_secs(4),
    );
    for want in [
        "flannel_ingress_requests_total{host=\"a.example.test\",path=\"/api\",status=\"2xx\"}",
        "flannel_ingress_requests_total{host=\"\",path=\"\",status=\"4xx\"}",
        "flannel_ingress_upstream_errors_total{backend=\"default/svc-empty:80\",kind=\"no_endpoints\"}",
        "flannel_ingress_upstream_errors_total{backend=\"default/svc-a:80\",kind=\"connect\"}",
        "flannel_ingress_request_duration_seconds_count{host=\"*.wild.test\"}",
    ] {
        assert!(metrics.contains(want), "no {want} in:\n{metrics}");
    }
    // The access log names every request.
    assert!(show_log().contains("target=/api/load"), "{}", show_log());

    bed.finish(started);
}
