//! The proxy on loopback, without root or etcd: a snapshot built from objects, the HTTP
//! listener on 127.0.0.1, upstream servers on other loopback ports. Checks what the namespace
//! e2e cannot force: a refused endpoint and one that drops the connection without answering
//! (GET goes to the next endpoint, POST is not sent twice: 502), the body limit (413), a
//! CONNECT refused (400), an upstream answering late (504), and a snapshot swapped under a
//! kept-alive connection.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ingress::class::ClassConfig;
use ingress::metrics::Metrics;
use ingress::objects::Objects;
use ingress::proxy::{Proxy, ProxyOptions};
use ingress::snapshot::Snapshot;
use ingress::tls::{default_certificate, CertCache};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An upstream answering `name` to every request (HTTP/1.1, keep-alive).
async fn good(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut len = 0usize;
                    let mut first = true;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" && !first {
                            break;
                        }
                        first = false;
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let text = format!("{name} {}", body.len());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream that reads the request head and closes without answering; counts requests.
async fn dropper(count: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    if line == "\r\n" {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// An upstream that never answers.
async fn silent() -> SocketAddr {
    silent_counting(Arc::default()).await
}

/// An upstream that never answers; counts the connections it accepted.
async fn silent_counting(accepted: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = l.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        }
    });
    addr
}

/// A port with nothing listening: bound (never listening) and kept for the life of the test
/// process, so that no other test's listener can take it while connections to it must fail.
async fn refused() -> SocketAddr {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = s.local_addr().unwrap();
    std::mem::forget(s);
    addr
}

fn objects(services: &[(&str, Vec<SocketAddr>)]) -> Objects {
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i, namespace: web}\nspec:\n  rules:\n",
    );
    for (name, _) in services {
        yaml += &format!(
            "  - host: {name}.test\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: {name}, port: {{number: 80}}}}}}}}]}}\n"
        );
    }
    for (name, addrs) in services {
        // One subset per endpoint: each has its own port.
        let subsets: Vec<String> = addrs
            .iter()
            .map(|a| {
                format!(
                    "{{addresses: [{{ip: {}}}], ports: [{{port: {}}}]}}",
                    a.ip(),
                    a.port()
                )
            })
            .collect();
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: web}}\nspec: {{ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: web}}\nsubsets: [{}]\n",
            subsets.join(", ")
        );
    }
    let mut o = Objects::new("/coreos.com/network");
    for obj in registry::parse_documents(&yaml).unwrap() {
        o.insert(obj);
    }
    o
}

fn snapshot(o: &Objects, previous: &Snapshot) -> Snapshot {
    let cfg = ClassConfig {
        watch_without_class: true,
        ..ClassConfig::default()
    };
    Snapshot::build(o, &cfg, &mut CertCache::default(), previous).0
}

/// A proxy serving `o` on a loopback port (plain HTTP/1.1, HTTP/2 by prior knowledge). Kept
/// alive as long as this is: dropping `stop` stops the server.
struct Running {
    to: SocketAddr,
    proxy: Arc<Proxy>,
    metrics: Metrics,
    /// Swaps the snapshot.
    snap: watch::Sender<Arc<Snapshot>>,
    stop: watch::Sender<bool>,
}

async fn run(o: &Objects, opts: ProxyOptions) -> Running {
    let empty = Snapshot::empty(default_certificate().unwrap());
    let (snap, rx) = watch::channel(Arc::new(snapshot(o, &empty)));
    let metrics = Metrics::default();
    let proxy = Arc::new(Proxy::new(rx, opts, metrics.clone()));
    let l = ingress::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let to = l.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(ingress::server::serve(l, proxy.clone(), None, stop_rx));
    Running {
        to,
        proxy,
        metrics,
        snap,
        stop,
    }
}

/// One request on a fresh connection; returns (status, body).
async fn request(to: SocketAddr, raw: String) -> (u16, String) {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    read_response(&mut BufReader::new(&mut s)).await
}

async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> (u16, String) {
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn get(host: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

#[tokio::test]
async fn retries_limits_timeouts_and_swaps() {
    let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (a, b) = (good("a").await, good("b").await);
    let (gone, drop_addr, late) = (
        refused().await,
        dropper(drops.clone()).await,
        silent().await,
    );
    let o = objects(&[
        ("refused", vec![gone, a]),
        ("dropping", vec![drop_addr, b]),
        ("late", vec![late]),
        ("ok", vec![a]),
    ]);
    let opts = ProxyOptions {
        upstream_timeout: Duration::from_millis(500),
        max_body_bytes: 1000,
        eject_for: Duration::from_millis(1),
        ..ProxyOptions::default()
    };
    let px = run(&o, opts).await;
    let to = px.to;

    // A refused endpoint: every request still answered, by the other one.
    for _ in 0..4 {
        assert_eq!(request(to, get("refused.test")).await, (200, "a 0".into()));
    }
    // An endpoint dropping the connection after the request: GETs go to the next endpoint...
    for _ in 0..4 {
        assert_eq!(request(to, get("dropping.test")).await, (200, "b 0".into()));
    }
    // ...a POST is not sent twice (it may have been processed): 502 when it met the dropper.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        // Past the ejection (1 ms) of the GETs' failures: round robin reaches the dropper
        // (a request on loopback can take less than that).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let before = drops.load(std::sync::atomic::Ordering::SeqCst);
        let (code, body) = request(
            to,
            "POST / HTTP/1.1\r\nHost: dropping.test\r\nContent-Length: 3\r\n\r\nabc".into(),
        )
        .await;
        let dropped = drops.load(std::sync::atomic::Ordering::SeqCst) > before;
        match dropped {
            true => assert_eq!(code, 502, "{body}"),
            false => assert_eq!((code, body.as_str()), (200, "b 3")),
        }
        statuses.push(code);
    }
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );
    // Body limit.
    let big = "x".repeat(1001);
    let (code, _) = request(
        to,
        format!("POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 1001\r\n\r\n{big}"),
    )
    .await;
    assert_eq!(code, 413);
    let (code, body) = request(
        to,
        format!("POST / HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n{big}\r\n0\r\n\r\n"),
    )
    .await;
    assert_eq!(code, 413, "{body}");
    // CONNECT (a tunnel, not a resource: authority form, no path) is not proxied.
    let (code, body) = request(
        to,
        "CONNECT ok.test:80 HTTP/1.1\r\nHost: ok.test:80\r\n\r\n".into(),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    // A late upstream: 504 after the upstream timeout.
    let started = std::time::Instant::now();
    assert_eq!(request(to, get("late.test")).await.0, 504);
    assert!(started.elapsed() < Duration::from_secs(3));

    // A kept-alive connection across a snapshot swap: the next request uses the new routes.
    let mut s = BufReader::new(TcpStream::connect(to).await.unwrap());
    s.get_mut()
        .write_all(get("ok.test").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await, (200, "a 0".into()));
    let o2 = objects(&[("ok", vec![b])]);
    let next = snapshot(&o2, &px.snap.borrow());
    px.snap.send_replace(Arc::new(next));
    s.get_mut()
        .write_all(get("ok.test").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await, (200, "b 0".into()));
    s.get_mut()
        .write_all(get("refused.test").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 404);
}

/// Host headers as RFC 9112 section 3.2 wants them: an HTTP/1.1 request needs exactly one,
/// an HTTP/1.0 one at most one; else 400 before any routing (nginx: "client sent duplicate
/// host header"). An absolute target names the host itself.
#[tokio::test]
async fn host_headers_are_checked() {
    let a = good("a").await;
    let o = objects(&[("ok", vec![a])]);
    let px = run(&o, ProxyOptions::default()).await;
    let to = px.to;
    for (raw, want) in [
        ("GET / HTTP/1.1\r\nHost: ok.test\r\n\r\n", 200),
        (
            "GET / HTTP/1.1\r\nHost: ok.test\r\nHost: ok.test\r\n\r\n",
            400,
        ),
        (
            "GET / HTTP/1.1\r\nHost: ok.test\r\nHost: other.test\r\n\r\n",
            400,
        ),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET http://ok.test/ HTTP/1.1\r\n\r\n", 400),
        (
            "GET http://ok.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
            200,
        ),
        ("GET / HTTP/1.0\r\nHost: ok.test\r\n\r\n", 200),
        (
            "GET / HTTP/1.0\r\nHost: ok.test\r\nHost: ok.test\r\n\r\n",
            400,
        ),
        // HTTP/1.0 without a Host: valid, and no route for no host.
        ("GET / HTTP/1.0\r\n\r\n", 404),
    ] {
        let (code, body) = request(to, raw.into()).await;
        assert_eq!(code, want, "{raw:?}: {body}");
        if want == 400 {
            assert!(body.contains("Host"), "{raw:?}: {body}");
        }
    }
}

/// An endpoint that does not answer in time counts as failing, as in nginx (proxy_next_upstream
/// `timeout`, the default with `error`): an idempotent request goes on to the next endpoint and
/// the late one is skipped while ejected; a POST that met it is answered 504, not sent again.
#[tokio::test]
async fn a_late_endpoint_is_passed_over() {
    let (a, b) = (good("a").await, good("b").await);
    let met = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (late_get, late_post) = (silent_counting(met.clone()).await, silent().await);
    let o = objects(&[
        ("slow", vec![late_get, a]),
        ("slowpost", vec![late_post, b]),
    ]);
    let timeout = Duration::from_millis(300);
    let opts = ProxyOptions {
        upstream_timeout: timeout,
        eject_for: Duration::from_secs(30),
        ..ProxyOptions::default()
    };
    let px = run(&o, opts).await;
    let to = px.to;

    // Round robin meets the late endpoint within two requests; every GET is answered by the
    // other one, and the late one was tried once (ejected after its timeout), one retry.
    for _ in 0..4 {
        assert_eq!(request(to, get("slow.test")).await, (200, "a 0".into()));
    }
    assert_eq!(met.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(px.metrics.retries.get(), 1);
    // A POST is not sent twice: 504 when it met the late endpoint (within two requests).
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let (code, body) = request(
            to,
            "POST / HTTP/1.1\r\nHost: slowpost.test\r\nContent-Length: 3\r\n\r\nabc".into(),
        )
        .await;
        match code {
            504 => {}
            _ => assert_eq!((code, body.as_str()), (200, "b 3")),
        }
        statuses.push(code);
        if code == 504 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&504), "{statuses:?}");
    // Not retried: no retry counted.
    assert_eq!(px.metrics.retries.get(), 1);
}

/// An upstream that answers by path (`/big`: a 40 KiB response head, `/empty`: 204,
/// `/chunked`: "abcde" in two chunks, `/close`: a body delimited by closing the connection,
/// `/short`: 3 of 10 promised bytes and a close, `/slow`: "slow" after 500 ms, else
/// 200 with a body, none for HEAD), keeps connections alive, closes each one `close_after` after its last
/// answer, and counts the connections it accepted.
async fn scripted(
    accepts: Arc<std::sync::atomic::AtomicUsize>,
    close_after: Duration,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            accepts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut method = String::new();
                    let mut path = String::new();
                    let mut len = 0usize;
                    let mut first = true;
                    loop {
                        let mut line = String::new();
                        match tokio::time::timeout(close_after, r.read_line(&mut line)).await {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return,
                        }
                        if first {
                            let mut words = line.split_whitespace();
                            method = words.next().unwrap_or("").to_string();
                            path = words.next().unwrap_or("/").to_string();
                            first = false;
                            continue;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let resp = match path.as_str() {
                        "/big" => format!(
                            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
                            "b".repeat(40 * 1024)
                        ),
                        "/empty" => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
                        "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_string(),
                        "/short" => {
                            let _ = w
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                                .await;
                            return;
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_string()
                        }
                        "/close" => {
                            let _ = w
                                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")
                                .await;
                            return;
                        }
                        _ if method == "HEAD" => {
                            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n".into()
                        }
                        _ => format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok {}",
                            len % 10
                        ),
                    };
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_connections_reused_and_response_head_limited() {
    use std::sync::atomic::Ordering::SeqCst;
    let (keep_accepts, stale_accepts) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let keep = scripted(keep_accepts.clone(), Duration::from_secs(30)).await;
    let stale = scripted(stale_accepts.clone(), Duration::from_millis(50)).await;
    let o = objects(&[("keep", vec![keep]), ("stale", vec![stale])]);
    let px = run(&o, ProxyOptions::default()).await;
    let to = px.to;

    // Sequential requests (bodies, no bodies, a POST) share one upstream connection.
    for raw in [
        get("keep.test"),
        "GET /empty HTTP/1.1\r\nHost: keep.test\r\n\r\n".into(),
        "HEAD / HTTP/1.1\r\nHost: keep.test\r\n\r\n".into(),
        "POST / HTTP/1.1\r\nHost: keep.test\r\nContent-Length: 3\r\n\r\nabc".into(),
        get("keep.test"),
    ] {
        let mut s = TcpStream::connect(to).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut r = BufReader::new(&mut s);
        let mut status = String::new();
        r.read_line(&mut status).await.unwrap();
        assert!(
            status.contains(" 200 ") || status.contains(" 204 "),
            "{raw}: {status}"
        );
    }
    assert_eq!(keep_accepts.load(SeqCst), 1);
    assert_eq!(px.proxy.idle_upstream_connections(), 1);

    // A response head over the limit: 502, counted, the next request served.
    let (code, body) = request(to, "GET /big HTTP/1.1\r\nHost: keep.test\r\n\r\n".into()).await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("too big"), "{body}");
    assert_eq!(request(to, get("keep.test")).await, (200, "ok 0".into()));
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    px.metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("flannel_ingress_upstream_errors_total{backend=\"web/keep:80\",kind=\"header_too_big\"} 1"),
        "{text}"
    );

    // An upstream closing kept-alive connections while they sit idle: every request (GET
    // and POST) is still answered, each on a new connection, and the endpoint (the only
    // one) is not ejected.
    for i in 0..3 {
        assert_eq!(request(to, get("stale.test")).await, (200, "ok 0".into()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (code, body) = request(
            to,
            "POST / HTTP/1.1\r\nHost: stale.test\r\nContent-Length: 3\r\n\r\nabc".into(),
        )
        .await;
        assert_eq!((code, body.as_str()), (200, "ok 3"), "round {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stale_accepts.load(SeqCst), 6);
}

/// Plain HTTP: HTTP/2 with prior knowledge and HTTP/1.1 on the same listener, told apart by
/// the first bytes however they arrive; the X-Forwarded-Port is the listener's.
#[tokio::test]
async fn h2_prior_knowledge_and_http1_on_one_listener() {
    let a = good("a").await;
    let o = objects(&[("ok", vec![a])]);
    let px = run(&o, ProxyOptions::default()).await;
    let to = px.to;

    // HTTP/2 (h2c, prior knowledge), two streams on one connection.
    let tcp = TcpStream::connect(to).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    for _ in 0..2 {
        let req = http::Request::get("http://ok.test/").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"a 0");
    }

    // HTTP/1.1 whose first read holds only a prefix of the preface ("P"), then the rest.
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    s.write_all(b"OST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(&mut s)).await,
        (200, "a 2".into())
    );
    // And a plain GET on a fresh connection.
    assert_eq!(request(to, get("ok.test")).await, (200, "a 0".into()));
}

/// An upstream whose answer applies chunked twice (RFC 9112 6.1 forbids it: where the body
/// ends is in doubt): the client gets a 502, not the body read one way or another.
#[tokio::test]
async fn an_answer_chunked_twice_is_a_502() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let twice = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    match r.read_line(&mut line).await {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let _ = w
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    )
                    .await;
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest).await;
            });
        }
    });
    let o = objects(&[("twice", vec![twice])]);
    let px = run(&o, ProxyOptions::default()).await;
    let to = px.to;
    let (code, body) = request(to, get("twice.test")).await;
    assert_eq!(code, 502, "{body}");
    assert!(!body.contains("hello"), "{body}");
    assert_eq!(px.proxy.idle_upstream_connections(), 0);
}

/// Reads until the proxy closes the connection (bounded).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("the proxy did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

/// Whether the proxy closes `s` within `within` (true) or keeps it open.
async fn closes(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The HTTP/1.1 server of our own (h1.rs) as a client sees it: pipelining, keep-alive rules of
/// both versions, bodiless answers, body framing chosen for the client, a connection handed to
/// hyper's server at the first request with a body, bad and oversized heads (hyper's answers),
/// a slow head cut off without hurting others, and idle connections closed on stop.
#[tokio::test]
async fn own_http1_server_keeps_the_rules() {
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = scripted(accepts, Duration::from_secs(30)).await;
    let o = objects(&[("s", vec![up])]);
    let opts = ProxyOptions {
        header_timeout: Duration::from_secs(1),
        max_header_bytes: 8192,
        ..ProxyOptions::default()
    };
    let px = run(&o, opts).await;
    let to = px.to;
    let get_s = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: s.test\r\n\r\n");

    // Three requests in one write (the last a HEAD): three answers in order, one connection.
    let mut s = TcpStream::connect(to).await.unwrap();
    let raw = get_s("/a")
        + "HEAD /b HTTP/1.1\r\nHost: s.test\r\n\r\n"
        + &get_s("/nothing-here").replace("s.test", "other.test");
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut r = BufReader::new(&mut s);
    assert_eq!(read_response(&mut r).await, (200, "ok 0".into()));
    // HEAD: the length of the GET, no body (the next answer starts right after the head).
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200 OK"), "{status}");
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        head += &line;
    }
    assert!(head.contains("content-length: 4\r\n"), "{head}");
    // Our own 404, with a Date.
    let (code, body) = read_response(&mut r).await;
    assert_eq!(code, 404, "{body}");

    // A chunked upstream answer: chunked to an HTTP/1.1 client, until close to HTTP/1.0.
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_to_close(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(all.contains("\r\ntransfer-encoding: chunked\r\n"), "{all}");
    assert!(all.contains("\r\nconnection: close\r\n"), "{all}");
    assert!(all.contains("\r\ndate: "), "{all}");
    assert!(
        all.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        "{all}"
    );
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET /close HTTP/1.0\r\nHost: s.test\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let all = read_to_close(&mut s).await;
    assert!(!all.contains("transfer-encoding"), "{all}");
    assert!(!all.contains("connection: keep-alive"), "{all}");
    assert!(all.ends_with("\r\n\r\nuntil-close"), "{all}");

    // HTTP/1.0: closed after the answer unless kept alive, then said so.
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let all = read_to_close(&mut s).await;
    assert!(
        all.starts_with("HTTP/1.1 404 ") && all.ends_with("and path\n"),
        "{all}"
    );
    assert!(!all.contains("connection: keep-alive"), "{all}");
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: s.test\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut r = BufReader::new(&mut s);
    assert_eq!(read_response(&mut r).await, (200, "ok 0".into()));
    assert!(!closes(&mut s, Duration::from_millis(100)).await);

    // One connection: ours, then hyper's from the POST on (bodies), every answer right.
    let mut s = TcpStream::connect(to).await.unwrap();
    let mut r = BufReader::new(&mut s);
    for (raw, want) in [
        (get_s("/"), "ok 0"),
        (
            "POST / HTTP/1.1\r\nHost: s.test\r\nContent-Length: 5\r\n\r\nabcde".into(),
            "ok 5",
        ),
        (get_s("/"), "ok 0"),
    ] {
        r.get_mut().write_all(raw.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut r).await, (200, want.into()), "{raw}");
    }

    // The same in one write (pipelined): hyper takes over with the bytes after the first head.
    let mut s = TcpStream::connect(to).await.unwrap();
    let raw = get_s("/")
        + "POST / HTTP/1.1\r\nHost: s.test\r\nContent-Length: 5\r\n\r\nabcde"
        + &get_s("/");
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut r = BufReader::new(&mut s);
    for want in ["ok 0", "ok 5", "ok 0"] {
        assert_eq!(read_response(&mut r).await, (200, want.into()));
    }

    // A head httparse takes but whose target `http` refuses: given back whole to hyper (400).
    let (code, _) = request(to, "GET /a`b HTTP/1.1\r\nHost: s.test\r\n\r\n".into()).await;
    assert_eq!(code, 400);

    // An upstream body that ends short of its length: the client gets what came, then the
    // connection closes (it cannot be mistaken for a whole answer).
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(get_s("/short").as_bytes()).await.unwrap();
    let all = read_to_close(&mut s).await;
    assert!(all.contains("content-length: 10\r\n"), "{all}");
    assert!(all.ends_with("\r\n\r\nabc"), "{all}");

    // Bad heads get hyper's answers: garbage 400, a head over the limit 431 (also one that
    // arrives complete in the read that crosses the limit).
    let (code, _) = request(
        to,
        "GET / HTTP/1.1\r\nHost: s.test\r\nBad Header\r\n\r\n".into(),
    )
    .await;
    assert_eq!(code, 400);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: s.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let (code, _) = request(to, big).await;
    assert_eq!(code, 431);
    let mut s = TcpStream::connect(to).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: s.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    s.write_all(&big.as_bytes()[..6000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&big.as_bytes()[6000..]).await.unwrap();
    assert_eq!(read_response(&mut BufReader::new(&mut s)).await.0, 431);

    // A head that never ends: cut off after the header timeout; others are served meanwhile.
    let mut slow = TcpStream::connect(to).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: s.te")
        .await
        .unwrap();
    assert_eq!(request(to, get_s("/")).await, (200, "ok 0".into()));
    assert!(closes(&mut slow, Duration::from_secs(5)).await);
    // So is a kept-alive connection that sends nothing more.
    let mut idle = TcpStream::connect(to).await.unwrap();
    idle.write_all(get_s("/").as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(&mut idle)).await,
        (200, "ok 0".into())
    );
    assert!(!closes(&mut idle, Duration::from_millis(300)).await);
    assert!(closes(&mut idle, Duration::from_secs(5)).await);

    // On stop, an idle kept-alive connection is closed at once.
    let mut idle = TcpStream::connect(to).await.unwrap();
    idle.write_all(get_s("/").as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(&mut idle)).await,
        (200, "ok 0".into())
    );
    px.stop.send(true).unwrap();
    // At once, not after the 10 s grace.
    assert!(closes(&mut idle, Duration::from_secs(3)).await);
}

/// An upstream that reads one request head and then waits, without answering, until the
/// proxy closes the connection; it reports that close.
async fn waits_for_close(closed: tokio::sync::mpsc::Sender<()>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    if line.ends_with("\r\n\r\n") || line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                let _ = closed.send(()).await;
            });
        }
    });
    addr
}

/// Our HTTP/1.1 server while an answer is pending: a client that goes away ends the upstream
/// exchange at once (not after the upstream timeout), and a stop lets the answer out, marked
/// as the last one, then closes.
#[tokio::test]
async fn own_http1_server_while_an_answer_is_pending() {
    let (tx, mut closed) = tokio::sync::mpsc::channel(4);
    let waiting = waits_for_close(tx).await;
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = scripted(accepts, Duration::from_secs(30)).await;
    let o = objects(&[("wait", vec![waiting]), ("s", vec![up])]);
    let px = run(&o, ProxyOptions::default()).await;
    let to = px.to;

    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(get("wait.test").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the upstream exchange went on after the client left")
        .unwrap();

    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: s.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    px.stop.send(true).unwrap();
    let all = read_to_close(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(all.contains("\r\nconnection: close\r\n"), "{all}");
    assert!(all.ends_with("\r\n\r\nslow"), "{all}");
}
