//! The reverse proxy: one request in, routed by host and normalized path through the current
//! snapshot, sent to one of the backend's endpoints, the answer passed back. Round robin; the
//! next endpoint on a connect failure or, for idempotent methods, on a failed exchange; an
//! endpoint that failed is skipped for a while. Hop-by-hop headers are removed both ways;
//! `X-Forwarded-*` and `Forwarded` are set from the connection (never trusted from the
//! client). HTTP/1.1 upgrades (WebSocket) are joined end to end.
//!
//! Answers of its own: 400 for a path that cannot be routed, 404 without a route, 413 for a
//! body over the limit, 502 when no endpoint could be reached, the upstream failed or its
//! response head was too large, 503 when the Service has no ready endpoint, 504 when the
//! upstream's answer is late.
//!
//! Per request the work is kept to what the request needs: the upstream exchange runs in the
//! request's own task on a connection of our own ([`crate::upstream`]), the route's metric
//! series are looked up once per snapshot, the request head is written upstream from borrowed
//! parts (every attempt and retry reads the same head; nothing is copied for them).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Collected, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::accesslog::{write_ip, AccessLine};
use crate::logwriter::NonBlocking;
use crate::metrics::{Metrics, RouteMetrics, UpstreamLabels};
use crate::path::normalize_path;
use crate::routes::Route;
use crate::snapshot::{Ejections, Snapshot};
use crate::upstream::{Pool, SendError, UpBody};
use crate::FastMap;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies: the upstream's, streamed (its connection polled as it is read), or one of
/// ours.
#[derive(Debug)]
pub enum Body {
    Upstream(UpBody),
    Own(Full<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Upstream(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            Body::Own(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Upstream(b) => b.is_end_stream(),
            Body::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Upstream(b) => b.size_hint(),
            Body::Own(b) => b.size_hint(),
        }
    }
}

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
    /// An upstream's response head (status line and headers); 502 beyond, as nginx's
    /// `proxy_buffer_size` ("upstream sent too big header").
    pub max_response_header_bytes: usize,
    /// A request body's size (413 beyond; bodies are buffered so a retry can send them again).
    pub max_body_bytes: usize,
    /// Endpoints tried per request (after a connect failure; after a failed exchange or a
    /// timeout for idempotent methods).
    pub attempts: usize,
    /// How long a failing endpoint (refused, failed or late) is skipped.
    pub eject_for: Duration,
    /// Idle keep-alive connections kept per endpoint.
    pub idle_per_endpoint: usize,
    /// How long an idle upstream connection is kept.
    pub idle_timeout: Duration,
    /// HTTP/1.1 requests without a body served by our own server ([`crate::h1`]) rather than
    /// hyper's (which serves every other HTTP/1.1 request either way).
    pub own_http1: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_response_header_bytes: 32 * 1024,
            max_body_bytes: 1024 * 1024,
            attempts: 3,
            eject_for: Duration::from_secs(10),
            idle_per_endpoint: 64,
            idle_timeout: Duration::from_secs(60),
            own_http1: true,
        }
    }
}

/// The accepted connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The listener's port.
    pub local_port: u16,
    pub tls: bool,
}

/// Route series of the current snapshot, by the route's address in it.
#[derive(Debug, Default)]
struct RouteSeries {
    generation: u64,
    by_route: FastMap<usize, RouteMetrics>,
}

/// The proxy's shared state (one per process; cheap to share in an `Arc`).
#[derive(Debug)]
pub struct Proxy {
    snap: watch::Receiver<Arc<Snapshot>>,
    pool: Arc<Pool>,
    opts: ProxyOptions,
    metrics: Metrics,
    series: Mutex<RouteSeries>,
    ejections: Ejections,
    /// Where the access lines go (none: no access log).
    access_log: Option<NonBlocking>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 7.6.1 and the classic list), never forwarded. A `static`:
/// a `const` array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The non-empty elements of a comma-separated header value, trimmed, read as bytes (a value
/// with obs-text somewhere still has its other elements read).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Removes hop-by-hop headers and those the Connection header names; returns the Upgrade
/// value when the message asked for an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap) -> Option<HeaderValue> {
    // Most messages carry none (or only `Connection: keep-alive`): one pass over the names
    // finds those present, and only those are removed below.
    let mut present = [false; HOP_BY_HOP.len()];
    for k in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == k) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return None;
    }
    let mut upgrade_asked = false;
    let mut named: Vec<HeaderName> = Vec::new();
    // Read as bytes: a value with other than visible ASCII somewhere (obs-text) still names
    // its fields (reading it as text would skip the whole value and pass them on).
    for t in h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| tokens(v.as_bytes()))
    {
        if t.eq_ignore_ascii_case(b"upgrade") {
            upgrade_asked = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close") {
            // Removed below anyway (keep-alive) or no header at all (close).
        } else if let Ok(n) = HeaderName::from_bytes(t) {
            named.push(n);
        }
    }
    let upgrade = if upgrade_asked {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for n in &named {
        h.remove(n);
    }
    for (n, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(n);
    }
    upgrade
}

/// The host a request names: `:authority` (HTTP/2) or the absolute URI's, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without a `Host` header, and an HTTP/1.x request
/// with more than one, are answered 400 (as nginx does: "client sent duplicate host header");
/// two hosts would leave routing and the endpoint to disagree on which one counts. HTTP/2
/// names its host in `:authority`.
fn host_count_ok<B>(req: &Request<B>) -> bool {
    let n = req.headers().get_all(header::HOST).iter().take(2).count();
    match req.version() {
        Version::HTTP_11 => n == 1,
        Version::HTTP_10 | Version::HTTP_09 => n <= 1,
        _ => true,
    }
}

/// An address as `Forwarded` writes it (RFC 7239: IPv6 quoted in brackets).
fn write_forwarded_node(b: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(_) => write_ip(b, ip),
        IpAddr::V6(a) => {
            let _ = write!(b, "\"[{a}]\"");
        }
    }
}

/// `for=…;host="…";proto=…` (RFC 7239), the host without quotes and backslashes.
fn forwarded(ip: IpAddr, host: &[u8], proto: &str) -> Option<HeaderValue> {
    // `for=` (4), an IPv4 address (15), `;host="` (7), `";proto=https` (14).
    let mut b = Vec::with_capacity(48 + host.len());
    b.extend_from_slice(b"for=");
    write_forwarded_node(&mut b, ip);
    b.extend_from_slice(b";host=\"");
    b.extend(host.iter().filter(|c| !matches!(c, b'"' | b'\\')));
    b.extend_from_slice(b"\";proto=");
    b.extend_from_slice(proto.as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(b)).ok()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Own(Full::new(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A header value for the log (empty when it is not text).
fn text(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("")
}

const BAD_PATH: &str = "400 Bad Request: the path cannot be routed\n";
const BAD_HOST: &str = "400 Bad Request: a missing or duplicate Host header\n";
const NO_ROUTE: &str = "404 Not Found: no route for this host and path\n";
const NO_ENDPOINTS: &str = "503 Service Unavailable: the Service has no ready endpoint\n";
const TOO_LARGE: &str = "413 Payload Too Large\n";
const BAD_BODY: &str = "400 Bad Request: the request body could not be read\n";
const UNREACHABLE: &str = "502 Bad Gateway: no endpoint could be reached\n";
const FAILED: &str = "502 Bad Gateway: the upstream failed\n";
const HEADER_TOO_BIG: &str = "502 Bad Gateway: the upstream sent too big a header\n";
const LATE: &str = "504 Gateway Timeout\n";

/// What forwarding came to.
struct Forwarded {
    response: Response<Body>,
    upstream: Option<SocketAddr>,
}

impl Forwarded {
    fn own(status: StatusCode, text: &'static str) -> Forwarded {
        Forwarded {
            response: plain(status, text),
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
        let pool = Pool::new(
            opts.idle_per_endpoint,
            opts.idle_timeout,
            opts.connect_timeout,
            opts.max_response_header_bytes,
        );
        Proxy {
            snap,
            pool,
            ejections: Ejections::new(opts.eject_for),
            opts,
            metrics,
            series: Mutex::new(RouteSeries::default()),
            access_log: None,
        }
    }

    /// Writes an access line per request into `log` ([`crate::accesslog`]).
    pub fn with_access_log(mut self, log: NonBlocking) -> Proxy {
        self.access_log = Some(log);
        self
    }

    pub fn options(&self) -> &ProxyOptions {
        &self.opts
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Idle upstream connections in the pool.
    pub fn idle_upstream_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Counts one answer in the route's series (looked up once per snapshot).
    fn count(&self, snap: &Snapshot, route: Option<&Route>, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let (host, path) = route.map_or(("", ""), |r| (r.host.as_str(), r.path.as_str()));
        let key = route.map_or(0, |r| r as *const Route as usize);
        if let Ok(mut s) = self.series.lock() {
            if s.generation != snap.generation {
                if s.generation > snap.generation {
                    // A request still on an older snapshot: no caching for it.
                    drop(s);
                    self.metrics.route(host, path).observe(status, secs);
                    return;
                }
                s.generation = snap.generation;
                s.by_route.clear();
            }
            s.by_route
                .entry(key)
                .or_insert_with(|| self.metrics.route(host, path))
                .observe(status, secs);
        }
    }

    /// Answers one request (never fails: errors become 4xx/5xx answers). The body: hyper's
    /// (`Incoming`), or none from our own HTTP/1.1 server.
    pub async fn handle<B>(&self, req: Request<B>, conn: ConnInfo) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let version = req.version();
        let host = request_host(&req);
        // The snapshot of this moment serves the whole request.
        let snap = self.snap.borrow().clone();
        let path = if host_count_ok(&req) {
            normalize_path(uri.path()).map_err(|_| BAD_PATH)
        } else {
            Err(BAD_HOST)
        };
        let (route, out) = match path {
            Err(why) => (None, Forwarded::own(StatusCode::BAD_REQUEST, why)),
            Ok(path) => match snap.routes.route(text(&host), &path) {
                None => (None, Forwarded::own(StatusCode::NOT_FOUND, NO_ROUTE)),
                Some(route) => (
                    Some(route),
                    self.forward(&snap, route, req, conn, host.as_ref()).await,
                ),
            },
        };
        let status = out.response.status().as_u16();
        let elapsed = started.elapsed();
        self.count(&snap, route, status, elapsed);
        if let Some(log) = &self.access_log {
            let line = AccessLine {
                time: SystemTime::now(),
                client: conn.peer.ip().to_canonical(),
                tls: conn.tls,
                version,
                method: &method,
                host: host.as_ref().map_or(&b""[..], HeaderValue::as_bytes),
                target: uri.path_and_query().map_or("/", PathAndQuery::as_str),
                status,
                backend: route.map(|r| &r.backend),
                upstream: out.upstream,
                elapsed,
            };
            log.append_with(|buf| line.write(buf));
        }
        out.response
    }

    async fn forward<B>(
        &self,
        snap: &Snapshot,
        route: &Route,
        mut req: Request<B>,
        conn: ConnInfo,
        host: Option<&HeaderValue>,
    ) -> Forwarded
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<BoxError>,
    {
        let upstream = snap
            .upstreams
            .get(&route.backend)
            .filter(|u| u.addrs.is_ok());
        let Some(upstream) = upstream else {
            self.upstream_error(route, "no_endpoints");
            return Forwarded::own(StatusCode::SERVICE_UNAVAILABLE, NO_ENDPOINTS);
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
        // Up to seven headers are added (Host, X-Forwarded-*, X-Real-IP, Forwarded): room at
        // once rather than growing the map on the way.
        headers.reserve(7);
        if let Some(h) = host {
            headers.insert(header::HOST, h.clone());
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        let client_ip = conn.peer.ip().to_canonical();
        let proto = if conn.tls { "https" } else { "http" };
        let mut ip = Vec::with_capacity(40);
        write_ip(&mut ip, client_ip);
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(ip)) {
            headers.insert(X_FORWARDED_FOR, v.clone());
            headers.insert(X_REAL_IP, v);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        headers.insert(X_FORWARDED_PORT, HeaderValue::from(conn.local_port));
        let host_bytes = host.map_or(&b""[..], HeaderValue::as_bytes);
        if let Some(v) = forwarded(client_ip, host_bytes, proto) {
            headers.insert(header::FORWARDED, v);
        }

        // The body, buffered (bounded) so that a retry can send it again.
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.opts.max_body_bytes as u64) {
            return Forwarded::own(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE);
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
                return Forwarded::own(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE);
            }
            Ok(Err(_)) | Err(_) => {
                return Forwarded::own(StatusCode::BAD_REQUEST, BAD_BODY);
            }
        };

        // Origin form: the path and query as the client sent them.
        let uri = if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
            parts.uri
        } else {
            Uri::from(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
        };
        let method = parts.method;
        let target = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(self.opts.attempts);
        // An answer of ours, naming the endpoint tried last (built only when needed).
        let own = |status, text, upstream| Forwarded {
            response: plain(status, text),
            upstream,
        };
        let out = Outgoing {
            method: &method,
            uri: &uri,
            target,
            headers: &headers,
            body: &body,
        };
        // The answer when no endpoint is left to try: what the last try came to.
        let mut failed = (StatusCode::BAD_GATEWAY, UNREACHABLE);
        loop {
            let Some(addr) = upstream.pick(&tried, &self.ejections) else {
                return own(failed.0, failed.1, tried.last().copied());
            };
            if !tried.is_empty() {
                // Counted when the next try starts, not when one failed.
                self.metrics.retries.inc();
            }
            tried.push(addr);
            let last = tried.len() >= self.opts.attempts;
            let exchange = self.exchange(addr, &out, client_upgrade.is_some());
            match tokio::time::timeout(self.opts.upstream_timeout, exchange).await {
                Ok(Ok(resp)) => {
                    self.ejections.clear(addr);
                    return Forwarded {
                        response: self.answer(route, resp, client_upgrade),
                        upstream: Some(addr),
                    };
                }
                Ok(Err(Failure::Connect(e))) => {
                    self.ejections.eject(addr);
                    self.upstream_error(route, "connect");
                    tracing::debug!(endpoint = %addr, error = %e, "ingress: connecting to an endpoint failed");
                    if last {
                        return own(StatusCode::BAD_GATEWAY, UNREACHABLE, Some(addr));
                    }
                    failed = (StatusCode::BAD_GATEWAY, UNREACHABLE);
                }
                Ok(Err(Failure::HeaderTooBig)) => {
                    // nginx: "upstream sent too big header", not retried (invalid_header is
                    // not in proxy_next_upstream's default).
                    self.upstream_error(route, "header_too_big");
                    tracing::warn!(endpoint = %addr, limit = self.opts.max_response_header_bytes,
                        "ingress: the upstream sent too big a response header");
                    return own(StatusCode::BAD_GATEWAY, HEADER_TOO_BIG, Some(addr));
                }
                Ok(Err(Failure::Exchange { error, retry })) => {
                    self.upstream_error(route, "response");
                    tracing::debug!(endpoint = %addr, %error, "ingress: the upstream failed");
                    // The request may have been sent: only an idempotent one (or one that
                    // provably did not leave) goes to another endpoint (nginx's
                    // proxy_next_upstream rule).
                    if retry && !last {
                        self.ejections.eject(addr);
                        failed = (StatusCode::BAD_GATEWAY, FAILED);
                        continue;
                    }
                    return own(StatusCode::BAD_GATEWAY, FAILED, Some(addr));
                }
                Err(_) => {
                    // No response head in time: the endpoint counts as failing (ejected, as
                    // nginx counts a timeout against max_fails), and an idempotent request
                    // goes to the next endpoint (proxy_next_upstream's default `error
                    // timeout`); any other may have been processed: 504.
                    self.ejections.eject(addr);
                    self.upstream_error(route, "timeout");
                    tracing::debug!(endpoint = %addr, "ingress: the upstream did not answer in time");
                    if method.is_idempotent() && !last {
                        failed = (StatusCode::GATEWAY_TIMEOUT, LATE);
                        continue;
                    }
                    return own(StatusCode::GATEWAY_TIMEOUT, LATE, Some(addr));
                }
            }
        }
    }

    /// One exchange with `addr`: a pooled connection (the next one when a pooled one turns
    /// out closed before the request left, or failed on an idempotent request), else a new
    /// one. An upgrade goes through hyper's client on a new connection.
    async fn exchange(
        &self,
        addr: SocketAddr,
        out: &Outgoing<'_>,
        upgrade: bool,
    ) -> Result<Response<UpBody>, Failure> {
        let idempotent = out.method.is_idempotent();
        if upgrade {
            // Rare: boxed, so that its state does not make every request's future larger.
            return Box::pin(self.exchange_upgrade(addr, out)).await;
        }
        // Pooled connections first. One found closed before the request left is followed by
        // the next; one that fails after it may have left is followed by the next only for
        // idempotent methods (nginx does not count a cached connection's failure as a try
        // either).
        let send = |c: Box<crate::upstream::UpConn>| {
            c.send(out.method, out.target, out.headers, out.body, &self.pool)
        };
        while let Some(c) = self.pool.checkout(addr) {
            match send(c).await {
                Ok(resp) => return Ok(resp),
                Err(SendError::NotSent) => {}
                Err(SendError::HeaderTooBig) => return Err(Failure::HeaderTooBig),
                Err(SendError::Failed(e)) if idempotent => {
                    tracing::debug!(endpoint = %addr, error = %e, "ingress: a kept-alive upstream connection failed; trying a new one");
                }
                Err(SendError::Failed(error)) => {
                    return Err(Failure::Exchange {
                        error,
                        retry: false,
                    })
                }
            }
        }
        let c = self.pool.connect(addr).await.map_err(Failure::Connect)?;
        match send(c).await {
            Ok(resp) => Ok(resp),
            Err(SendError::NotSent) => Err(Failure::Exchange {
                error: "the connection closed before the request was sent".into(),
                retry: true,
            }),
            Err(SendError::HeaderTooBig) => Err(Failure::HeaderTooBig),
            Err(SendError::Failed(error)) => Err(Failure::Exchange {
                error,
                retry: idempotent,
            }),
        }
    }

    /// An upgrade's exchange: a new connection through hyper's client.
    async fn exchange_upgrade(
        &self,
        addr: SocketAddr,
        out: &Outgoing<'_>,
    ) -> Result<Response<UpBody>, Failure> {
        let mut send = self
            .pool
            .connect_upgradable(addr)
            .await
            .map_err(Failure::Connect)?;
        let mut up = Request::new(Full::new(out.body.clone()));
        *up.method_mut() = out.method.clone();
        *up.uri_mut() = out.uri.clone();
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = out.headers.clone();
        send.send_request(up)
            .await
            .map(|r| r.map(UpBody::detached))
            .map_err(|e| match e.is_parse_too_large() {
                true => Failure::HeaderTooBig,
                false => Failure::Exchange {
                    error: e.to_string(),
                    retry: false,
                },
            })
    }

    fn upstream_error(&self, route: &Route, kind: &str) {
        self.metrics
            .upstream_errors
            .get_or_create(&UpstreamLabels {
                backend: route.backend.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The upstream's response as the client gets it; a 101 joins the two upgraded streams.
    fn answer(
        &self,
        route: &Route,
        mut resp: Response<UpBody>,
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
                    self.upstream_error(route, "response");
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: unexpected 101 from the upstream\n",
                    );
                }
            }
        }
        resp.map(Body::Upstream)
    }
}

/// Why one exchange failed.
enum Failure {
    Connect(std::io::Error),
    HeaderTooBig,
    /// The exchange failed; `retry`: another endpoint may get the request (idempotent, or
    /// it provably did not leave).
    Exchange {
        error: String,
        retry: bool,
    },
}

/// The request as it goes upstream (borrowed by every attempt).
struct Outgoing<'a> {
    method: &'a Method,
    uri: &'a Uri,
    /// The path and query of `uri`.
    target: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
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
        // A Connection value with obs-text still names its fields.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_bytes(b"X-Secret, \xff").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        // Upgrade without Connection: upgrade is no upgrade.
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(strip_hop_by_hop(&mut h), None);
        assert!(h.is_empty());
    }

    #[test]
    fn forwarded_quotes_ipv6() {
        let f = |ip: &str, host: &[u8]| forwarded(ip.parse().unwrap(), host, "https").unwrap();
        assert_eq!(
            f("10.0.0.1", b"a.test"),
            "for=10.0.0.1;host=\"a.test\";proto=https"
        );
        assert_eq!(
            f("fd00::1", b"a\"b\\.test:8443"),
            "for=\"[fd00::1]\";host=\"ab.test:8443\";proto=https"
        );
    }
}
