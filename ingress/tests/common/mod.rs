//! What the root e2e tests of flannel-ingress share: a namespace testbed with etcd in the hub
//! (host-gw style routes between the nodes' pod subnets), pod servers that answer with their
//! identity (HTTP) or speak WebSocket (RFC 6455, tungstenite), objects written with
//! `flannelctl apply`, flannel-ingress started on a node and waited for, curl from the hub,
//! and a test CA made with openssl.

#![allow(clippy::unwrap_used, dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use test_support::{in_netns, require_root_with, run_checked, wait_for, Testbed};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_flannel-ingress");
/// The pods' HTTP port.
pub const PORT: u16 = 8080;
pub const LIMIT: Duration = Duration::from_secs(5);

pub fn flannelctl() -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join("flannelctl");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build -p flannelctl` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// A WebSocket (RFC 6455) session on an upgraded connection, as the server: greets with
/// `hello from <id>`, answers each text message `t` with `<id>:t`, echoes binary messages,
/// answers pings (tungstenite queues the pong), answers a close and ends.
async fn websocket_session(up: hyper::upgrade::Upgraded, id: String) {
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
    if ws
        .send(Message::text(format!("hello from {id}")))
        .await
        .is_err()
    {
        return;
    }
    while let Some(Ok(m)) = ws.next().await {
        let reply = match m {
            Message::Text(t) => Message::text(format!("{id}:{}", t.as_str())),
            Message::Binary(b) => Message::Binary(b),
            // A Close (its reply goes out on the next read, which then ends the stream),
            // pings (answered the same way) and pongs.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// An HTTP/1.1 server in a pod on `bind`: answers every request with what it saw, one line of
/// `key=value` fields (`pod=<id>`, the peer's address, path, headers); a WebSocket upgrade
/// (`Upgrade: websocket` with a key) gets its 101 and a [`websocket_session`]. Stops (listener
/// and connections) when aborted.
pub fn pod_server(
    rt: &tokio::runtime::Runtime,
    ns: &str,
    bind: SocketAddr,
    id: &str,
) -> tokio::task::AbortHandle {
    let std_listener = in_netns(ns, move || std::net::TcpListener::bind(bind))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {bind} in {ns}: {e}"));
    std_listener.set_nonblocking(true).unwrap();
    let id = id.to_string();
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    rt.spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let id = id.clone();
            conns.spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let id = id.clone();
                    async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let key = req.headers().get("sec-websocket-key").cloned();
                        if h("upgrade").eq_ignore_ascii_case("websocket") {
                            if let Some(key) = key {
                                let on = hyper::upgrade::on(&mut req);
                                let ws_id = id.clone();
                                tokio::spawn(async move {
                                    if let Ok(up) = on.await {
                                        websocket_session(up, ws_id).await;
                                    }
                                });
                                let r = Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .header(
                                        "sec-websocket-accept",
                                        derive_accept_key(key.as_bytes()),
                                    )
                                    .body(Full::new(Bytes::new()))
                                    .unwrap();
                                return Ok::<_, Infallible>(r);
                            }
                        }
                        let text = format!(
                            "pod={id} peer={} path={} host={} xff={} proto={} fport={} xhop={} fwd={}\n",
                            peer.ip().to_canonical(),
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
pub fn field<'a>(body: &'a str, name: &str) -> &'a str {
    body.split_whitespace()
        .find_map(|f| f.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("")
}

/// The testbed: nodes, etcd in the hub (host-gw network config), a directory for files, the
/// runtime of the pod servers.
pub struct Bed {
    pub tb: Testbed,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    pub rt: tokio::runtime::Runtime,
    pub servers: Vec<tokio::task::AbortHandle>,
}

/// A started flannel-ingress.
pub struct Started {
    pub handle: usize,
    pub log: PathBuf,
}

impl Started {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Bed {
    /// `nodes` nodes and etcd; None (skipped, with the reason printed) without root, curl
    /// and openssl outside CI.
    pub fn new(nodes: usize) -> Option<Bed> {
        if !require_root_with(&["curl", "openssl"]) {
            return None;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut tb = Testbed::new(nodes).unwrap();
        let endpoint = tb
            .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        Some(Bed {
            tb,
            dir: tempfile::tempdir().unwrap(),
            endpoint,
            rt,
            servers: Vec::new(),
        })
    }

    /// Pod `k` of node `node` at 10.5.(node+1).(k+2)/24; returns (namespace, address).
    pub fn add_pod(&mut self, node: usize, k: usize) -> (String, String) {
        let ip = format!("10.5.{}.{}", node + 1, k + 2);
        let gw = format!("10.5.{}.1/24", node + 1);
        let pod = self
            .tb
            .add_pod(node, &format!("{ip}/24"), &gw, 1500)
            .unwrap();
        (pod.ns, ip)
    }

    /// Each node routes the other nodes' pod subnets (10.5.(i+1).0/24, and fd00:5:(i+1)::/64
    /// when `v6` holds the nodes' IPv6 underlay addresses) via their underlay address, as
    /// host-gw does.
    pub fn route_pods(&self, v6: Option<&[String]>) {
        let n = self.tb.nodes.len();
        for j in 0..n {
            let ns = self.tb.nodes[j].ns.clone();
            for i in (0..n).filter(|i| *i != j) {
                let net = format!("10.5.{}.0/24", i + 1);
                let via = self.tb.nodes[i].ip.clone();
                self.tb
                    .exec(&ns, &["ip", "route", "add", &net, "via", &via])
                    .unwrap();
                if let Some(v6) = v6 {
                    let net6 = format!("fd00:5:{:x}::/64", i + 1);
                    self.tb
                        .exec(&ns, &["ip", "-6", "route", "add", &net6, "via", &v6[i]])
                        .unwrap();
                }
            }
        }
    }

    /// Starts a [`pod_server`] and keeps it for [`Bed::stop_servers`].
    pub fn serve(&mut self, ns: &str, bind: SocketAddr, id: &str) -> usize {
        let h = pod_server(&self.rt, ns, bind, id);
        self.servers.push(h);
        self.servers.len() - 1
    }

    pub fn apply(&self, yaml: &str) {
        let file = self
            .dir
            .path()
            .join(format!("m{}.yaml", test_support::random_tag(6)));
        std::fs::write(&file, yaml).unwrap();
        self.tb
            .flannelctl_apply(&self.tb.hub, &flannelctl(), &self.endpoint, &file)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts flannel-ingress on node `node` with the etcd endpoint, health on
    /// 127.0.0.1:10254 and `args`; waits for /healthz.
    pub fn start_ingress(&mut self, node: usize, args: &[&str]) -> Started {
        let log = self.dir.path().join("ingress.log");
        let ns = self.tb.nodes[node].ns.clone();
        let mut all = vec![
            "--etcd-endpoints",
            &self.endpoint,
            "--health-addr",
            "127.0.0.1:10254",
        ];
        all.extend_from_slice(args);
        let handle = self
            .tb
            .spawn(&ns, BIN, &all, &[("RUST_LOG", "info")], &log)
            .unwrap();
        let started = Started { handle, log };
        let healthy = wait_for(Duration::from_secs(15), || {
            let (ok, out) = self.tb.exec_status(
                &ns,
                &["curl", "-sS", "-m", "2", "http://127.0.0.1:10254/healthz"],
                Duration::from_secs(4),
            );
            (ok && out.trim() == "ok").then_some(())
        });
        assert!(healthy.is_some(), "no /healthz ok:\n{}", started.log());
        started
    }

    /// flannel-ingress's /metrics (from its node).
    pub fn metrics(&self, node: usize) -> String {
        self.tb
            .exec_status(
                &self.tb.nodes[node].ns,
                &["curl", "-sS", "-m", "2", "http://127.0.0.1:10254/metrics"],
                Duration::from_secs(4),
            )
            .1
    }

    /// Stops flannel-ingress (SIGTERM) and asserts a clean exit; then the pod servers.
    pub fn finish(mut self, started: Started) {
        let status = self.tb.stop(started.handle, Duration::from_secs(12));
        assert!(
            status.is_some_and(|s| s.success()),
            "flannel-ingress exit: {status:?}\n{}",
            started.log()
        );
        for s in &self.servers {
            s.abort();
        }
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }

    /// curl from the hub; returns (status, body, http version); status 0 when curl failed.
    pub fn curl(&self, extra: &[&str], url: &str) -> (u16, String, String) {
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

    /// Plain HTTP to `at` (an address as a URL writes it: `10.0.0.1`, `[fd00::1]`) with
    /// `Host: host`; the path goes as written. Returns (status, body).
    pub fn get_at(&self, at: &str, host: &str, path: &str) -> (u16, String) {
        let url = format!("http://{at}{path}");
        let h = format!("Host: {host}");
        let (code, body, _) = self.curl(&["--path-as-is", "-H", &h], &url);
        (code, body)
    }

    /// HTTPS to `https://host/path` resolved to `at` (as [`Bed::get_at`]), verified against
    /// the test CA ([`make_certs`] in the bed's directory).
    pub fn https_at(
        &self,
        at: &str,
        host: &str,
        path: &str,
        extra: &[&str],
    ) -> (u16, String, String) {
        let resolve = format!("{host}:443:{at}");
        let ca = self.dir.path().join("ca.pem");
        let mut args = vec!["--resolve", &resolve, "--cacert", ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.curl(&args, &format!("https://{host}{path}"))
    }

    /// A TCP connection from the hub to `to`, as a tokio stream of the bed's runtime.
    pub fn connect_from_hub(&self, to: SocketAddr) -> tokio::net::TcpStream {
        let s = in_netns(&self.tb.hub, move || {
            std::net::TcpStream::connect_timeout(&to, LIMIT)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_nonblocking(true).unwrap();
        let _guard = self.rt.enter();
        tokio::net::TcpStream::from_std(s).unwrap()
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

/// A test CA (`ca.pem`) and, per name, a certificate for `host` signed by it: `<name>.pem`,
/// `<name>.key`.
pub fn make_certs(dir: &Path, certs: &[(&str, &str)]) {
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

/// A `kubernetes.io/tls` Secret `name` (namespace default) from [`make_certs`]' files.
pub fn tls_secret(dir: &Path, name: &str) -> String {
    let crt = std::fs::read_to_string(dir.join(format!("{name}.pem"))).unwrap();
    let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).unwrap();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(&crt),
        indent(&key)
    )
}

/// A Service `name` in `namespace` (port 80 named `port_name`, no selector) and, unless
/// `ips` is empty, its Endpoints: `ips` at `target`.
pub fn service_in(
    namespace: &str,
    name: &str,
    port_name: &str,
    ips: &[String],
    target: u16,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ports: [{{name: {port_name}, port: 80, targetPort: {target}}}]\n---\n"
    );
    if !ips.is_empty() {
        let addrs: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
        y += &format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: {namespace}}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: {port_name}, port: {target}}}]\n---\n",
            addrs.join(", ")
        );
    }
    y
}

/// [`service_in`] namespace default, endpoints at [`PORT`].
pub fn service(name: &str, port_name: &str, ips: &[String]) -> String {
    service_in("default", name, port_name, ips, PORT)
}

/// Our IngressClass (`flannel`, controller `flannel.io/ingress`).
pub const INGRESS_CLASS: &str = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: flannel}\nspec: {controller: flannel.io/ingress}\n---\n";

pub fn backend(svc: &str) -> String {
    format!("{{service: {{name: {svc}, port: {{number: 80}}}}}}")
}

/// One entry of a rule's `http.paths`.
pub fn path(p: &str, t: &str, svc: &str) -> String {
    format!(
        "      - {{path: {p}, pathType: {t}, backend: {}}}\n",
        backend(svc)
    )
}
