//! `/healthz`, `/readyz` and `/metrics` on `--healthz-ip:--healthz-port`.
//!
//! - `/healthz`: 200 while the process runs; the body says whether etcd is reachable.
//! - `/readyz`: 200 once the lease is held and the backend's last reconcile succeeded (and, with
//!   `--network-policy`, br_netfilter lets the policy hook see same-node traffic); else 503
//!   with the reasons in the body.
//! - `/metrics`: Prometheus text format.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use subnet_lease::LeaseStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Everything the endpoints report; shared by the daemon loop and the server.
#[derive(Debug)]
pub struct Status {
    pub lease_held: AtomicBool,
    pub backend_ok: AtomicBool,
    pub lease: Arc<LeaseStats>,
    pub peers: Gauge,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_changes: Counter,
    pub reconcile_seconds: Histogram,
    pub rules_installs: Counter,
    pub rules_errors: Counter,
    /// Peers this node cannot reach (their backend type cannot run here).
    pub peers_unreachable: Gauge,
    /// Live backend switches done.
    pub backend_switches: Counter,
    /// Network configs refused, by reason (see [`Status::reject_config`]).
    config_rejected: Family<Vec<(String, String)>, Counter>,
    /// 1 while no lease can be had, by reason (see [`Status::lease_waiting`]).
    lease_waiting: Family<Vec<(String, String)>, Gauge>,
    /// Pod records this node holds in etcd, and failed attempts to publish them.
    pub pods_published: Gauge,
    pub pod_publish_errors: Counter,
    /// Health endpoint connections closed at once (cap reached), and failed accepts.
    pub health_refused: Counter,
    pub health_accept_errors: Counter,
    /// The service proxy's metrics (`flannel_proxy_*`).
    pub proxy: service_proxy::metrics::ProxyMetrics,
    /// The network policy module's metrics (`flannel_policy_*`).
    pub policy: policy::metrics::PolicyMetrics,
    /// The cluster DNS's metrics (`flannel_dns_*`).
    pub dns: cluster_dns::metrics::DnsMetrics,
    /// The backend's data-plane counters, labelled by name.
    backend: Family<Vec<(String, String)>, Counter>,
    lease_expiry: Gauge,
    etcd_errors: Counter,
    etcd_up: Gauge,
    renewals: Counter,
    registry: Registry,
}

impl Status {
    pub fn new(lease: Arc<LeaseStats>) -> Arc<Status> {
        let mut s = Status {
            lease_held: AtomicBool::new(false),
            backend_ok: AtomicBool::new(false),
            lease,
            peers: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_changes: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            rules_installs: Counter::default(),
            rules_errors: Counter::default(),
            peers_unreachable: Gauge::default(),
            backend_switches: Counter::default(),
            config_rejected: Family::default(),
            lease_waiting: Family::default(),
            pods_published: Gauge::default(),
            pod_publish_errors: Counter::default(),
            health_refused: Counter::default(),
            health_accept_errors: Counter::default(),
            proxy: service_proxy::metrics::ProxyMetrics::default(),
            policy: policy::metrics::PolicyMetrics::default(),
            dns: cluster_dns::metrics::DnsMetrics::default(),
            backend: Family::default(),
            lease_expiry: Gauge::default(),
            etcd_errors: Counter::default(),
            etcd_up: Gauge::default(),
            renewals: Counter::default(),
            registry: Registry::with_prefix("flannel"),
        };
        let r = &mut s.registry;
        s.proxy.register(r);
        s.policy.register(r);
        s.dns.register(r);
        r.register("peers", "Peer leases currently known", s.peers.clone());
        r.register(
            "health_connections_refused",
            "Connections to /healthz, /readyz, /metrics closed at once: too many open",
            s.health_refused.clone(),
        );
        r.register(
            "health_accept_errors",
            "Failed accepts on the health endpoint (each followed by a back-off)",
            s.health_accept_errors.clone(),
        );
        r.register("reconcile", "Backend reconcile runs", s.reconciles.clone());
        r.register(
            "peers_unreachable",
            "Peers whose backend type this node cannot run (reasons in the log)",
            s.peers_unreachable.clone(),
        );
        r.register(
            "backend_switches",
            "Live switches of the backend after a config change",
            s.backend_switches.clone(),
        );
        r.register(
            "config_rejected",
            "Network configs refused, by reason: invalid, network_changed (more than Backend \
             changed while running), switch_failed, lease_outside_network (our lease does not fit \
             the config at start)",
            s.config_rejected.clone(),
        );
        r.register(
            "lease_waiting",
            "1 while this node waits for a lease, by reason: network_full, \
             lease_outside_network",
            s.lease_waiting.clone(),
        );
        r.register(
            "pods_published",
            "Pod records this node holds in etcd under <prefix>/pods/",
            s.pods_published.clone(),
        );
        r.register(
            "pod_publish_errors",
            "Failed attempts to publish pod records (etcd errors, unreadable attachment directory)",
            s.pod_publish_errors.clone(),
        );
        r.register(
            "reconcile_errors",
            "Backend reconcile runs that failed",
            s.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_changes",
            "Kernel changes made by reconciles",
            s.reconcile_changes.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of backend reconciles",
            s.reconcile_seconds.clone(),
        );
        r.register(
            "host_rules_installs",
            "nftables table (re)installs",
            s.rules_installs.clone(),
        );
        r.register(
            "host_rules_errors",
            "Failed nftables installs",
            s.rules_errors.clone(),
        );
        r.register(
            "lease_expiry_timestamp_seconds",
            "When our lease expires unless renewed (0: no TTL)",
            s.lease_expiry.clone(),
        );
        r.register("etcd_errors", "Failed etcd calls", s.etcd_errors.clone());
        r.register(
            "etcd_up",
            "1 if the last etcd call succeeded",
            s.etcd_up.clone(),
        );
        r.register(
            "lease_renewals",
            "Lease keep-alives that succeeded",
            s.renewals.clone(),
        );
        r.register(
            "backend",
            "Backend data-plane counters (udp: packets, bytes, drops by reason)",
            s.backend.clone(),
        );
        Arc::new(s)
    }

    /// Records the backend's counters (monotonic totals kept by the backend).
    pub fn set_backend_counters(&self, counters: &std::collections::BTreeMap<String, u64>) {
        for (name, total) in counters {
            let c = self
                .backend
                .get_or_create(&vec![("counter".to_string(), name.clone())]);
            advance(&c, *total);
        }
    }

    /// Counts a refused network config under `reason`.
    pub fn reject_config(&self, reason: &str) {
        self.config_rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Sets whether this node is waiting for a lease for `reason`.
    pub fn lease_waiting(&self, reason: &str, waiting: bool) {
        self.lease_waiting
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .set(i64::from(waiting));
    }

    fn refresh(&self) {
        let l = &self.lease;
        self.lease_expiry
            .set(l.lease_expiry_unix.load(Ordering::Relaxed));
        self.etcd_up
            .set(i64::from(l.etcd_reachable.load(Ordering::Relaxed)));
        advance(&self.etcd_errors, l.etcd_errors.load(Ordering::Relaxed));
        advance(&self.renewals, l.renewals.load(Ordering::Relaxed));
    }

    pub fn metrics_text(&self) -> String {
        self.refresh();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Lease held, backend programmed, and (with `--network-policy`) same-node traffic
    /// policed: a node that would let bridged traffic past its policies is not ready.
    pub fn ready(&self) -> bool {
        self.lease_held.load(Ordering::Relaxed)
            && self.backend_ok.load(Ordering::Relaxed)
            && self.policy.not_ready_reason().is_none()
    }
}

/// Brings a counter up to a total kept elsewhere (counters only move forward).
fn advance(c: &Counter, total: u64) {
    let have = c.get();
    if total > have {
        c.inc_by(total - have);
    }
}

/// The answer for one request line (pure).
pub fn respond(status: &Status, request_line: &str) -> (u16, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return (405, "text/plain", "only GET\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => {
            let etcd = if status.lease.etcd_reachable.load(Ordering::Relaxed) {
                "reachable"
            } else {
                "unreachable"
            };
            (200, "text/plain", format!("ok\netcd: {etcd}\n"))
        }
        "/readyz" => {
            let lease = status.lease_held.load(Ordering::Relaxed);
            let backend = status.backend_ok.load(Ordering::Relaxed);
            let mut body = format!("lease held: {lease}\nbackend programmed: {backend}\n");
            if let Some(why) = status.policy.not_ready_reason() {
                body.push_str(&format!("network policy: {why}\n"));
            }
            (if status.ready() { 200 } else { 503 }, "text/plain", body)
        }
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            status.metrics_text(),
        ),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// Limits of the endpoint server.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Connections served at once; more are closed at once (counted in
    /// `flannel_health_connections_refused_total`).
    pub max_connections: usize,
    /// Time one connection may take, request and answer together; a slower client is cut.
    pub timeout: Duration,
    /// Pause after a failed `accept` (EMFILE, ENFILE, ...), doubled per failure up to
    /// `max_accept_backoff`, reset by a success.
    pub accept_backoff: Duration,
    pub max_accept_backoff: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 32,
            timeout: Duration::from_secs(5),
            accept_backoff: Duration::from_millis(10),
            max_accept_backoff: Duration::from_secs(1),
        }
    }
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<tokio::task::JoinHandle<()>> {
    Ok(serve_with(addr, status, ServeOptions::default()).await?.0)
}

/// [`serve`] with explicit limits; also returns the bound address.
pub async fn serve_with(
    addr: SocketAddr,
    status: Arc<Status>,
    opts: ServeOptions,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health endpoint on {addr}"))?;
    let local = listener.local_addr().context("health endpoint address")?;
    tracing::info!("serving /healthz, /readyz and /metrics on {local}");
    let listener = Arc::new(listener);
    let task = tokio::spawn(accept_loop(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        status,
        opts,
    ));
    Ok((task, local))
}

/// Accepts with `accept` until dropped: backs off after errors, serves at most
/// `max_connections` at once, each within `timeout`.
async fn accept_loop<A, F>(mut accept: A, status: Arc<Status>, opts: ServeOptions)
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let mut backoff = opts.accept_backoff;
    loop {
        let sock = match accept().await {
            Ok(s) => {
                backoff = opts.accept_backoff;
                s
            }
            Err(e) => {
                // Out of descriptors (or another transient failure): retrying at once
                // would spin on the same error.
                tracing::warn!(error = %e, "health endpoint: accept failed; retrying in {backoff:?}");
                status.health_accept_errors.inc();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_accept_backoff);
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            status.health_refused.inc();
            let _ = sock.set_zero_linger();
            drop(sock);
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(opts.timeout, answer(sock, &status)).await;
        });
    }
}

/// Reads one request head (at most 4 KiB) and writes the answer.
async fn answer(mut sock: TcpStream, status: &Status) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let line = head.lines().next().unwrap_or("");
    let (code, ctype, body) = respond(status, line);
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let st = Status::new(Arc::default());
        assert_eq!(respond(&st, "GET /healthz HTTP/1.1").0, 200);
        assert!(respond(&st, "GET /healthz HTTP/1.1")
            .2
            .contains("etcd: unreachable"));
        assert_eq!(respond(&st, "GET /readyz HTTP/1.1").0, 503);
        st.lease_held.store(true, Ordering::Relaxed);
        st.backend_ok.store(true, Ordering::Relaxed);
        assert_eq!(respond(&st, "GET /readyz HTTP/1.1").0, 200);
        // --network-policy without br_netfilter: not ready, the reason in the body.
        st.policy.enabled.set(1);
        st.policy.set_bridge_netfilter(Some(
            "no br_netfilter; same-node pod traffic is not filtered".into(),
        ));
        let (code, _, body) = respond(&st, "GET /readyz HTTP/1.1");
        assert_eq!(code, 503);
        assert!(body.contains("network policy: no br_netfilter"), "{body}");
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(m.contains("flannel_policy_br_netfilter 0"), "{m}");
        assert!(m.contains("flannel_policy_enabled 1"), "{m}");
        st.policy.set_bridge_netfilter(None);
        assert_eq!(respond(&st, "GET /readyz HTTP/1.1").0, 200);
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(m.contains("flannel_policy_br_netfilter 1"), "{m}");
        st.policy
            .observe_tiers(&[("Admin", 2, 1), ("Baseline", 1, 3)]);
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(
            m.contains("flannel_policy_cluster_policies{tier=\"Admin\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("flannel_policy_tier_pods{tier=\"Baseline\"} 3"),
            "{m}"
        );
        assert_eq!(respond(&st, "GET /nope HTTP/1.1").0, 404);
        assert_eq!(respond(&st, "POST /healthz HTTP/1.1").0, 405);
        st.peers.set(3);
        st.lease.etcd_errors.store(2, Ordering::Relaxed);
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(m.contains("flannel_peers 3"), "{m}");
        assert!(m.contains("flannel_etcd_errors_total 2"), "{m}");
        assert!(m.contains("flannel_pods_published 0"), "{m}");
        assert!(m.contains("flannel_pod_publish_errors_total 0"), "{m}");
        assert!(
            m.contains("flannel_reconcile_duration_seconds_bucket"),
            "{m}"
        );
        // A second scrape does not double-count.
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(m.contains("flannel_etcd_errors_total 2"), "{m}");
        let mut c = std::collections::BTreeMap::new();
        c.insert("udp_dropped_short".to_string(), 5u64);
        st.set_backend_counters(&c);
        st.set_backend_counters(&c);
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(
            m.contains("flannel_backend_total{counter=\"udp_dropped_short\"} 5"),
            "{m}"
        );
        st.reject_config("network_changed");
        st.lease_waiting("network_full", true);
        let m = respond(&st, "GET /metrics HTTP/1.1").2;
        assert!(
            m.contains("flannel_config_rejected_total{reason=\"network_changed\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("flannel_lease_waiting{reason=\"network_full\"} 1"),
            "{m}"
        );
    }

    fn opts(max_connections: usize, timeout_ms: u64) -> ServeOptions {
        ServeOptions {
            max_connections,
            timeout: Duration::from_millis(timeout_ms),
            ..ServeOptions::default()
        }
    }

    async fn start(o: ServeOptions) -> (tokio::task::JoinHandle<()>, SocketAddr, Arc<Status>) {
        let st = Status::new(Arc::default());
        let (task, addr) = serve_with("127.0.0.1:0".parse().unwrap(), st.clone(), o)
            .await
            .unwrap();
        (task, addr, st)
    }

    /// Reads until EOF or error; returns what came and how long it took.
    async fn read_all(s: &mut TcpStream) -> (String, Duration) {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
        read_all(&mut s).await.0
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_after_the_timeout() {
        let (task, addr, _) = start(opts(4, 300)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A request head that never ends: one byte now and then.
        let writer = async {
            for b in b"GET /healthz".iter().cycle().take(40) {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let t = std::time::Instant::now();
        writer.await;
        let (got, _) = read_all(&mut s).await;
        let took = t.elapsed();
        assert!(got.is_empty(), "{got}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        assert!(get(addr).await.starts_with("HTTP/1.1 200"));
        task.abort();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        let (task, addr, st) = start(opts(2, 1500)).await;
        // Two clients that say nothing hold both slots.
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..5 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await;
            let (got, took) = read_all(&mut s).await;
            assert!(got.is_empty(), "{got}");
            assert!(took < Duration::from_millis(500), "{took:?}");
        }
        assert_eq!(st.health_refused.get(), 5);
        // Once the idle ones are cut, the endpoint answers again.
        for mut s in idle {
            assert!(read_all(&mut s).await.0.is_empty());
        }
        assert!(get(addr).await.starts_with("HTTP/1.1 200"));
        task.abort();
    }

    #[tokio::test]
    async fn failed_accepts_back_off() {
        let st = Status::new(Arc::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let accept = move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                Err::<TcpStream, _>(std::io::Error::from_raw_os_error(24)) // EMFILE
            }
        };
        let o = ServeOptions {
            accept_backoff: Duration::from_millis(10),
            max_accept_backoff: Duration::from_millis(100),
            ..ServeOptions::default()
        };
        let _ = tokio::time::timeout(
            Duration::from_millis(600),
            accept_loop(accept, st.clone(), o),
        )
        .await;
        // 10 + 20 + 40 + 80 + 100 + 100 ... ms: about 8 tries in 600 ms, not millions.
        let n = calls.load(Ordering::Relaxed);
        assert!((4..=12).contains(&n), "{n} accept calls");
        assert_eq!(st.health_accept_errors.get(), n as u64);
    }
}
