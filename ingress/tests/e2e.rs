//! flannel-ingress end to end: three namespace nodes whose pods (two per node, routed between
//! the nodes as host-gw would) serve HTTP; etcd in the hub; objects written with `flannelctl
//! apply`; flannel-ingress on node 0; curl from the hub with Host headers and SNI (a test CA
//! made with openssl). Checks: host and path precedence (exact, prefix element-wise, wildcard,
//! any-host default), the class filter, forwarded and hop-by-hop headers, 404/400/503, round
//! robin over pods on three nodes, TLS with two certificates chosen by SNI and the default
//! certificate otherwise, HTTP/2 over ALPN, an HTTP upgrade passed through, a slow client cut
//! off while others are served, an Ingress change live within a second with no failed request
//! on a kept-alive connection, an endpoint gone mid-load lost no request, /healthz, /metrics.
//! Needs root, curl and openssl; skips with a reason without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use test_support::{in_netns, require_root_with, run_checked, wait_for, Testbed};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_flannel-ingress");
const PORT: u16 = 8080;
const LIMIT: Duration = Duration::from_secs(5);
/// The hub's address on the testbed's underlay (test-support's netns layout).
const HUB_IP: &str = "172.30.0.1";

fn flannelctl() -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join("flannelctl");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build -p flannelctl` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// An HTTP server in a pod: answers with what it saw; `Upgrade: echo` switches to a line
/// echo. Stops (listener and connections) when aborted.
fn pod_server(rt: &tokio::runtime::Runtime, ns: &str, ip: &str) -> tokio::task::AbortHandle {
    let std_listener = in_netns(ns, || std::net::TcpListener::bind(("0.0.0.0", PORT)))
        .unwrap()
        .unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let ip = ip.to_string();
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    rt.spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let ip = ip.clone();
            conns.spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let ip = ip.clone();
                    async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        if h("upgrade") == "echo" {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = tokio::io::BufReader::new(TokioIo::new(up));
                                    let mut line = String::new();
                                    while io.read_line(&mut line).await.unwrap_or(0) > 0 {
                                        let reply = format!("echo:{line}");
                                        if io.get_mut().write_all(reply.as_bytes()).await.is_err() {
                                            break;
                                        }
                                        line.clear();
                                    }
                                }
                            });
                            let r = Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "echo")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, Infallible>(r);
                        }
                        let text = format!(
                            "pod={ip} path={} host={} xff={} proto={} fport={} xhop={} fwd={}\n",
                            req.uri().path(),
                            h("host"),
                            h("x-forwarded-for"),
                            h("x-forwarded-proto"),
                            h("x-forwarded-port"),
                            h("x-hop"),
                            h("forwarded"),
                        );
                        Ok(Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    })
    .abort_handle()
}

/// One field of a pod server's answer.
fn field<'a>(body: &'a str, name: &str) -> &'a str {
    body.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .unwrap_or("")
}

struct Bed {
    tb: Testbed,
    dir: tempfile::TempDir,
    endpoint: String,
    ingress_ip: String,
    /// Pod addresses by app.
    apps: Vec<(String, Vec<String>)>,
}

impl Bed {
    fn apply(&self, yaml: &str) {
        let file = self
            .dir
            .path()
            .join(format!("m{}.yaml", test_support::random_tag(6)));
        std::fs::write(&file, yaml).unwrap();
        let ctl = flannelctl();
        self.tb
            .exec(
                &self.tb.hub,
                &[
                    ctl.to_str().unwrap(),
                    "--etcd-endpoints",
                    &self.endpoint,
                    "apply",
                    "-f",
                    file.to_str().unwrap(),
                ],
            )
            .unwrap_or_else(|e| panic!("flannelctl apply: {e}"));
    }

    fn app(&self, name: &str) -> BTreeSet<String> {
        self.apps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.iter().cloned().collect())
            .unwrap()
    }

    /// curl from the hub; returns (status, body, http version).
    fn curl(&self, extra: &[&str], url: &str) -> (u16, String, String) {
        let mut args = vec![
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let (ok, out) = self
            .tb
            .exec_status(&self.tb.hub, &args, Duration::from_secs(8));
        if !ok {
            return (0, out, String::new());
        }
        let (body, tail) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let mut t = tail.split_whitespace();
        let code = t.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let version = t.next().unwrap_or("").to_string();
        (code, body.to_string(), version)
    }

    fn get(&self, host: &str, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.ingress_ip);
        let h = format!("Host: {host}");
        let (code, body, _) = self.curl(&["--path-as-is", "-H", &h], &url);
        (code, body)
    }

    fn https(&self, host: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
        let resolve = format!("{host}:443:{}", self.ingress_ip);
        let ca = self.dir.path().join("ca.pem");
        let mut args = vec!["--resolve", &resolve, "--cacert", ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.curl(&args, &format!("https://{host}{path}"))
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    run_checked(
        std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
}

/// A test CA and, per name, a certificate for `host` signed by it: `<name>.pem`, `<name>.key`.
fn make_certs(dir: &Path, certs: &[(&str, &str)]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=flannel ingress test CA",
    ]);
    openssl(dir, &a);
    for (name, host) in certs {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{host}\n")).unwrap();
        let subj = format!("/CN={host}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn tls_secret(dir: &Path, name: &str) -> String {
    let crt = std::fs::read_to_string(dir.join(format!("{name}.pem"))).unwrap();
    let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).unwrap();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&key)
    )
}

fn service(name: &str, port_name: &str, ips: &[String]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  ports: [{{name: {port_name}, port: 80, targetPort: {PORT}}}]\n---\n"
    );
    if !ips.is_empty() {
        let addrs: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
        y += &format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: {port_name}, port: {PORT}}}]\n---\n",
            addrs.join(", ")
        );
    }
    y
}

fn backend(svc: &str) -> String {
    format!("{{service: {{name: {svc}, port: {{number: 80}}}}}}")
}

fn path(p: &str, t: &str, svc: &str) -> String {
    format!(
        "      - {{path: {p}, pathType: {t}, backend: {}}}\n",
        backend(svc)
    )
}

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
    if !require_root_with(&["curl", "openssl"]) {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut tb = Testbed::new(3).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .unwrap();
    // Two pods per node in 10.5.<node+1>.0/24; each node routes the others' pod subnets via
    // their underlay address (as host-gw does).
    let mut pod_ips = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3u8 {
        for k in 0..2u8 {
            let ip = format!("10.5.{}.{}", i + 1, k + 2);
            let gw = format!("10.5.{}.1/24", i + 1);
            let pod = tb
                .add_pod(usize::from(i), &format!("{ip}/24"), &gw, 1500)
                .unwrap();
            servers.push(pod_server(&rt, &pod.ns, &ip));
            pod_ips.push(ip);
        }
    }
    for j in 0..3u8 {
        for i in 0..3u8 {
            if i != j {
                let net = format!("10.5.{}.0/24", i + 1);
                let via = format!("172.30.0.{}", 11 + i);
                tb.exec(
                    &tb.nodes[usize::from(j)].ns.clone(),
                    &["ip", "route", "add", &net, "via", &via],
                )
                .unwrap();
            }
        }
    }
    // app a: the first pod of every node; b: the second pods of nodes 0 and 1; c: node 2's.
    let apps = vec![
        (
            "a".to_string(),
            vec![pod_ips[0].clone(), pod_ips[2].clone(), pod_ips[4].clone()],
        ),
        (
            "b".to_string(),
            vec![pod_ips[1].clone(), pod_ips[3].clone()],
        ),
        ("c".to_string(), vec![pod_ips[5].clone()]),
    ];
    let mut bed = Bed {
        ingress_ip: tb.nodes[0].ip.clone(),
        tb,
        dir: tempfile::tempdir().unwrap(),
        endpoint,
        apps,
    };
    make_certs(
        bed.dir.path(),
        &[("cert-a", "a.example.test"), ("cert-w", "*.wild.test")],
    );

    let mut objects = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: flannel}\nspec: {controller: flannel.io/ingress}\n---\n",
    );
    objects += &service("svc-a", "http", &bed.apps[0].1);
    objects += &service("svc-b", "web", &bed.apps[1].1);
    objects += &service("svc-c", "http", &bed.apps[2].1);
    objects += &service("svc-empty", "http", &[]);
    objects += &tls_secret(bed.dir.path(), "cert-a");
    objects += "---\n";
    objects += &tls_secret(bed.dir.path(), "cert-w");
    objects += "---\n";
    objects += &ingress("svc-a");
    // Another controller's Ingress: never served.
    objects += &format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: theirs, namespace: default}}\nspec:\n  ingressClassName: nginx\n  rules:\n  - host: other.test\n    http:\n      paths:\n{}",
        path("/", "Prefix", "svc-a")
    );
    bed.apply(&objects);

    let log = bed.dir.path().join("ingress.log");
    let node0 = bed.tb.nodes[0].ns.clone();
    let handle = bed
        .tb
        .spawn(
            &node0,
            BIN,
            &[
                "--etcd-endpoints",
                &bed.endpoint,
                "--http-addr",
                "0.0.0.0:80",
                "--https-addr",
                "0.0.0.0:443",
                "--health-addr",
                "127.0.0.1:10254",
                "--header-timeout",
                "2",
                "--connect-timeout",
                "1",
            ],
            &[("RUST_LOG", "info")],
            &log,
        )
        .unwrap();
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let healthy = wait_for(Duration::from_secs(15), || {
        let (ok, out) = bed.tb.exec_status(
            &node0,
            &["curl", "-sS", "-m", "2", "http://127.0.0.1:10254/healthz"],
            Duration::from_secs(4),
        );
        (ok && out.trim() == "ok").then_some(())
    });
    assert!(healthy.is_some(), "no /healthz ok:\n{}", show_log());
    // The first snapshot may predate some objects' arrival; wait for the routes.
    wait_for(Duration::from_secs(5), || {
        (bed.get("a.example.test", "/api").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("no route came up:\n{}", show_log()));

    // Host + path precedence.
    let (code, body) = bed.get("a.example.test", "/api/v1?q=1");
    assert_eq!(code, 200, "{body}");
    assert!(bed.app("a").contains(field(&body, "pod")), "{body}");
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
    for (host, p, app) in [
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
        let (code, body) = bed.get(host, p);
        assert_eq!(code, 200, "{host}{p}: {body}");
        assert!(
            bed.app(app).contains(field(&body, "pod")),
            "{host}{p} → {app}: {body}"
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
        let (code, body) = bed.get(host, p);
        assert_eq!(code, want, "{host}{p}: {body}");
    }
    // Round robin over the pods of three nodes.
    let seen: BTreeSet<String> = (0..9)
        .map(|_| field(&bed.get("a.example.test", "/api").1, "pod").to_string())
        .collect();
    assert_eq!(seen, bed.app("a"), "round robin");
    // Hop-by-hop headers (and those Connection names) are not forwarded; X-Forwarded-For
    // from the client is not trusted.
    let url = format!("http://{}/api", bed.ingress_ip);
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
    let (code, body, version) = bed.https("a.example.test", "/api", &["--http1.1"]);
    assert_eq!(
        (code, version.as_str()),
        (200, "1.1"),
        "{body}\n{}",
        show_log()
    );
    assert_eq!(field(&body, "proto"), "https");
    assert_eq!(field(&body, "fport"), "443");
    let (code, body, _) = bed.https("x.wild.test", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(bed.app("b").contains(field(&body, "pod")), "{body}");
    // The certificate really is the one for the name: subjects differ by SNI.
    for (sni, want) in [
        ("a.example.test", "CN = a.example.test"),
        ("x.wild.test", "CN = *.wild.test"),
        ("nothing.test", "flannel-ingress default certificate"),
    ] {
        let connect = format!("{}:443", bed.ingress_ip);
        let (_, out) = bed.tb.exec_status(
            &bed.tb.hub,
            &["sh", "-c", &format!("openssl s_client -connect {connect} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -subject")],
            Duration::from_secs(10),
        );
        assert!(out.contains(want), "SNI {sni}: {out}");
    }
    // A name without a certificate gets the default one, which the test CA did not sign.
    let (code, _, _) = bed.https("unknown.test", "/", &[]);
    assert_eq!(code, 0, "unknown.test must fail verification");
    // HTTP/2 over ALPN.
    let (code, body, version) = bed.https("a.example.test", "/api/h2", &["--http2"]);
    assert_eq!((code, version.as_str()), (200, "2"), "{body}");
    assert_eq!(field(&body, "host"), "a.example.test", "{body}");

    // An HTTP/1.1 upgrade is passed through both ways.
    let to: SocketAddr = format!("{}:80", bed.ingress_ip).parse().unwrap();
    let mut ka = KeepAlive::connect(&bed.tb.hub, to).unwrap();
    write!(ka.w, "GET /api/ws HTTP/1.1\r\nHost: a.example.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let mut head = String::new();
    loop {
        let mut l = String::new();
        ka.r.read_line(&mut l).unwrap();
        head += &l;
        if l == "\r\n" || l.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in ["ping", "pong"] {
        writeln!(ka.w, "{msg}").unwrap();
        let mut l = String::new();
        ka.r.read_line(&mut l).unwrap();
        assert_eq!(l, format!("echo:{msg}\n"));
    }
    drop(ka);

    // A slow client (half a request head) is cut off after --header-timeout, and does not
    // hold up others meanwhile.
    let slow = in_netns(&bed.tb.hub, move || TcpStream::connect_timeout(&to, LIMIT))
        .unwrap()
        .unwrap();
    (&slow).write_all(b"GET / HTTP/1.1\r\nHost: a.exa").unwrap();
    let started = Instant::now();
    assert_eq!(bed.get("a.example.test", "/api").0, 200);
    slow.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut buf = [0u8; 512];
    let n = (&slow).read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
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
    assert_eq!(bed.get("a.example.test", "/api").0, 200);

    // Load on a kept-alive connection while the Ingress changes and an endpoint goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let switched_at = Arc::new(Mutex::new(None::<Instant>));
    let b_pods = bed.app("b");
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
            let deadline = Instant::now() + Duration::from_secs(30);
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
    std::thread::sleep(Duration::from_millis(500));
    // An endpoint of svc-a goes away (its server stops; the Endpoints still name it).
    servers[2].abort();
    std::thread::sleep(Duration::from_millis(700));
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
    assert!(before > 100, "too little load: {before}");
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

    let mut tb = bed.tb;
    let status = tb.stop(handle, Duration::from_secs(12));
    assert!(
        status.is_some_and(|s| s.success()),
        "flannel-ingress exit: {status:?}\n{}",
        show_log()
    );
    for s in &servers {
        s.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(2));
}
