//! The reverse proxy: one request in, routed by host and normalized path through the current
//! snapshot, sent to one of the backend's endpoints, the answer passed back. Round robin; the
//! next endpoint on a connect failure or, for idempotent methods, on a failed exchange; an
//! endpoint that failed is skipped for a while. Hop-by-hop headers are removed both ways;
//! `X-Forwarded-*` and `Forwarded` are set from the connection (never trusted from the
//! client). HTTP/1.1 upgrades (WebSocket) are joined end to end.
//!
//! Answers of its own: 400 for a path that cannot be routed, 404 without a route, 413 for a
//! body over the limit, 502 when no endpoint could be reached or the upstream failed, 503
//! when the Service has no ready endpoint, 504 when the upstream's answer is late.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{combinators::BoxBody, BodyExt, Collected, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::metrics::{status_class, HostLabels, Metrics, RequestLabels, UpstreamLabels};
use crate::path::normalize_path;
use crate::snapshot::{Ejections, Snapshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response bodies: the upstream's, streamed, or one of ours.
pub type Body = BoxBody<Bytes, BoxError>;

/// Limits and timeouts.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Connecting to an endpoint.
    pub connect_timeout: Duration,
    /// A client's TLS handshake and request head (slow clients are cut off).
    pub header_timeout: Duration,
    /// Reading the request body, and waiting for the upstream's response head.
    pub upstream_timeout: Duration,
    /// A request head's size (HTTP/1.1 buffer, HTTP/2 header list); at least 8192.
    pub max_header_bytes: usize,
    /// A request body's size (413 beyond; bodies are buffered so a retry can send them again).
    pub max_body_bytes: usize,
    /// Endpoints tried per request when connecting fails.
    pub attempts: usize,
    /// How long an endpoint that refused a connection is skipped.
    pub eject_for: Duration,
    /// Idle keep-alive connections kept per endpoint.
    pub idle_per_endpoint: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_body_bytes: 1024 * 1024,
            attempts: 3,
            eject_for: Duration::from_secs(10),
            idle_per_endpoint: 64,
        }
    }
}

/// The accepted connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// The proxy's shared state (one per process; cheap to share in an `Arc`).
#[derive(Debug)]
pub struct Proxy {
    snap: watch::Receiver<Arc<Snapshot>>,
    client: Client<HttpConnector, Full<Bytes>>,
    opts: ProxyOptions,
    metrics: Metrics,
    ejections: Ejections,
}

/// Hop-by-hop headers (RFC 9110 7.6.1 and the classic list), never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers and those the Connection header names; returns the Upgrade
/// value when the message asked for an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap) -> Option<HeaderValue> {
    let mut upgrade_asked = false;
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let upgrade_value = h.get(header::UPGRADE).cloned();
    for t in &named {
        if t == "upgrade" {
            upgrade_asked = true;
        }
        if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
            h.remove(n);
        }
    }
    let upgrade = upgrade_value.filter(|_| upgrade_asked);
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    upgrade
}

/// The host a request names: `:authority` (HTTP/2) or the absolute URI's, else `Host`.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// An address as `Forwarded` writes it (RFC 7239: IPv6 quoted in brackets).
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An endpoint address for the access log, empty when none was chosen (no allocation).
struct OptAddr(Option<SocketAddr>);

impl std::fmt::Display for OptAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

/// What one request came to, for the access log and the metrics.
struct Outcome {
    response: Response<Body>,
    rule_host: String,
    rule_path: String,
    backend: String,
    upstream: Option<SocketAddr>,
}

impl Outcome {
    fn own(status: StatusCode, text: &str) -> Outcome {
        Outcome {
            response: plain(status, text),
            rule_host: String::new(),
            rule_path: String::new(),
            backend: String::new(),
            upstream: None,
        }
    }
}

impl Proxy {
    pub fn new(
        snap: watch::Receiver<Arc<Snapshot>>,
        opts: ProxyOptions,
        metrics: Metrics,
    ) -> Proxy {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(opts.connect_timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(opts.idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn);
        Proxy {
            snap,
            client,
            ejections: Ejections::new(opts.eject_for),
            opts,
            metrics,
        }
    }

    pub fn options(&self) -> &ProxyOptions {
        &self.opts
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one request (never fails: errors become 4xx/5xx answers).
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let version = req.version();
        let host = request_host(&req).unwrap_or_default();
        let mut out = self.route(req, conn, &host).await;
        let status = out.response.status().as_u16();
        let elapsed = started.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                host: out.rule_host.clone(),
                path: out.rule_path.clone(),
                status: status_class(status),
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&HostLabels {
                host: std::mem::take(&mut out.rule_host),
            })
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "access",
            client = %conn.peer.ip().to_canonical(),
            proto = if conn.tls { "https" } else { "http" },
            version = ?version,
            %method,
            host = %host,
            target = %target,
            status,
            backend = %out.backend,
            upstream = %OptAddr(out.upstream),
            ms = format_args!("{:.2}", elapsed.as_secs_f64() * 1e3),
        );
        out.response
    }

    async fn route(&self, mut req: Request<Incoming>, conn: ConnInfo, host: &str) -> Outcome {
        // The snapshot of this moment serves the whole request.
        let snap = self.snap.borrow().clone();
        let Ok(path) = normalize_path(req.uri().path()) else {
            return Outcome::own(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: the path cannot be routed",
            );
        };
        let Some(route) = snap.routes.route(host, &path) else {
            return Outcome::own(
                StatusCode::NOT_FOUND,
                "404 Not Found: no route for this host and path",
            );
        };
        let mut out = Outcome::own(StatusCode::OK, "");
        out.rule_host = route.host.clone();
        out.rule_path = route.path.clone();
        out.backend = route.backend.to_string();
        let upstream = snap
            .upstreams
            .get(&route.backend)
            .filter(|u| u.addrs.is_ok());
        let Some(upstream) = upstream else {
            self.upstream_error(&out.backend, "no_endpoints");
            out.response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: the Service has no ready endpoint",
            );
            return out;
        };

        // The request head as it goes upstream.
        // Only an HTTP/1.1 request asking for an upgrade has its connection handed over.
        let asks_upgrade = req.version() == Version::HTTP_11
            && req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        let client_upgrade = asks_upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let upgrade = strip_hop_by_hop(&mut headers);
        let client_upgrade = if upgrade.is_some() {
            client_upgrade
        } else {
            None
        };
        if let Some(u) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u.clone());
        }
        if let Ok(h) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, h.clone());
            headers.insert("x-forwarded-host", h);
        }
        let client_ip = conn.peer.ip().to_canonical();
        let proto = if conn.tls { "https" } else { "http" };
        if let Ok(v) = HeaderValue::from_str(&client_ip.to_string()) {
            headers.insert("x-forwarded-for", v.clone());
            headers.insert("x-real-ip", v);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Ok(v) = HeaderValue::from_str(&conn.local.port().to_string()) {
            headers.insert("x-forwarded-port", v);
        }
        let fwd = format!(
            "for={};host=\"{}\";proto={proto}",
            forwarded_node(client_ip),
            host.replace(['"', '\\'], "")
        );
        if let Ok(v) = HeaderValue::from_str(&fwd) {
            headers.insert(header::FORWARDED, v);
        }

        // The body, buffered (bounded) so that a retry can send it again.
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.opts.max_body_bytes as u64) {
            out.response = plain(StatusCode::PAYLOAD_TOO_LARGE, "413 Payload Too Large");
            return out;
        }
        // A request without a body (most GETs) skips the buffering and its timer.
        let collected = if body.is_end_stream() {
            Ok(Ok(Collected::default()))
        } else {
            tokio::time::timeout(
                self.opts.upstream_timeout,
                Limited::new(body, self.opts.max_body_bytes).collect(),
            )
            .await
        };
        let body = match collected {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                out.response = plain(StatusCode::PAYLOAD_TOO_LARGE, "413 Payload Too Large");
                return out;
            }
            Ok(Err(_)) | Err(_) => {
                out.response = plain(
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: the request body could not be read",
                );
                return out;
            }
        };

        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut tried = Vec::new();
        loop {
            let Some(addr) = upstream.pick(&tried, &self.ejections) else {
                out.response = plain(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: no endpoint could be reached",
                );
                return out;
            };
            tried.push(addr);
            out.upstream = Some(addr);
            let Ok(uri) = format!("http://{addr}{path_and_query}").parse::<Uri>() else {
                out.response = plain(StatusCode::BAD_REQUEST, "400 Bad Request");
                return out;
            };
            let mut up = Request::new(Full::new(body.clone()));
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = Version::HTTP_11;
            *up.headers_mut() = headers.clone();
            match tokio::time::timeout(self.opts.upstream_timeout, self.client.request(up)).await {
                Ok(Ok(resp)) => {
                    self.ejections.clear(addr);
                    out.response = self.answer(resp, client_upgrade);
                    return out;
                }
                Ok(Err(e)) if e.is_connect() => {
                    self.ejections.eject(addr);
                    self.upstream_error(&out.backend, "connect");
                    tracing::debug!(endpoint = %addr, error = %e, "ingress: connecting to an endpoint failed");
                    if tried.len() >= self.opts.attempts {
                        out.response = plain(
                            StatusCode::BAD_GATEWAY,
                            "502 Bad Gateway: no endpoint could be reached",
                        );
                        return out;
                    }
                    self.metrics.retries.inc();
                }
                Ok(Err(e)) => {
                    self.upstream_error(&out.backend, "response");
                    tracing::debug!(endpoint = %addr, error = %e, "ingress: the upstream failed");
                    // The request may have been sent: only an idempotent one goes to another
                    // endpoint (nginx's proxy_next_upstream rule).
                    if parts.method.is_idempotent() && tried.len() < self.opts.attempts {
                        self.ejections.eject(addr);
                        self.metrics.retries.inc();
                        continue;
                    }
                    out.response = plain(
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: the upstream failed",
                    );
                    return out;
                }
                Err(_) => {
                    self.upstream_error(&out.backend, "timeout");
                    out.response = plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout");
                    return out;
                }
            }
        }
    }

    fn upstream_error(&self, backend: &str, kind: &str) {
        self.metrics
            .upstream_errors
            .get_or_create(&UpstreamLabels {
                backend: backend.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The upstream's response as the client gets it; a 101 joins the two upgraded streams.
    fn answer(
        &self,
        mut resp: Response<Incoming>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgrade = strip_hop_by_hop(resp.headers_mut());
        if switching {
            match (client_upgrade, upgrade) {
                (Some(client), Some(u)) => {
                    let upstream = hyper::upgrade::on(&mut resp);
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    resp.headers_mut().insert(header::UPGRADE, u);
                    tokio::spawn(async move {
                        match tokio::try_join!(client, upstream) {
                            Ok((c, u)) => {
                                let mut c = TokioIo::new(c);
                                let mut u = TokioIo::new(u);
                                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                            }
                            Err(e) => tracing::debug!(error = %e, "ingress: upgrade failed"),
                        }
                    });
                }
                _ => {
                    self.upstream_error("", "response");
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: unexpected 101 from the upstream",
                    );
                }
            }
        }
        resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let up = strip_hop_by_hop(&mut h);
        assert_eq!(up, Some(HeaderValue::from_static("websocket")));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
        // Upgrade without Connection: upgrade is no upgrade.
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(strip_hop_by_hop(&mut h), None);
        assert!(h.is_empty());
    }

    #[test]
    fn forwarded_quotes_ipv6() {
        assert_eq!(forwarded_node("10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(forwarded_node("fd00::1".parse().unwrap()), "\"[fd00::1]\"");
    }
}
