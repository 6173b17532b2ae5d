//! Connections to endpoints: an HTTP/1.1 client of our own for pooled exchanges, kept alive
//! in a pool of our own and driven inside the request's own task.
//!
//! Why not hyper's `client::conn::http1` (used before, measured in docs/ingress.md): its
//! request goes through a dispatch channel to a connection state machine (even when the
//! request's task polls the connection itself), the request is built as an owned
//! `http::Request` (its header map copied whenever a retry could need it), and the answer
//! comes back through a oneshot; a profile of the proxy on kept-alive HTTP put about a fifth of
//! the user-space time per request there. Here an exchange is: the request head (and a small
//! body) serialized from borrowed parts into one reused buffer and written to the socket; the
//! response head read into a reused buffer and parsed with `httparse` (hyper's own parser); the
//! header values sharing the read buffer's bytes; the body framed as RFC 9112 section 6.3 says
//! (no body for HEAD, 1xx, 204 and 304; `Transfer-Encoding` ending in chunked, applied once; else
//! `Content-Length`; else until the upstream closes) and streamed as an [`http_body::Body`]
//! that gives the connection back to the pool only when the body ended cleanly with nothing
//! read beyond it.
//!
//! A pooled connection is checked before the request is written: one the upstream closed
//! while it sat idle (or that sent bytes nobody asked for) fails with [`SendError::NotSent`],
//! and the request can go anywhere else, whatever its method. For idempotent requests the
//! check reads only when the event loop saw the socket become readable (no system call
//! otherwise); for the others it asks the kernel (a peek).
//!
//! Upgrades (`Connection: upgrade`) take a fresh connection through hyper's client run as a
//! task of its own (hyper hands the upgraded stream over from there) and never come back to
//! the pool.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::FastMap;

/// Headers in a response head (hyper's client limit as well); more is "too big".
const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// Free room asked for before each read.
const READ_ROOM: usize = 8 * 1024;
/// A body up to this size is copied behind the head and written with it in one call.
const COALESCE_BODY: usize = 16 * 1024;
/// Buffers grown beyond this are not kept by an idle connection.
const KEEP_BUFFER: usize = 64 * 1024;

/// One kept-alive upstream connection: the socket and its two buffers.
pub struct UpConn {
    io: TcpStream,
    /// Bytes read and not used yet.
    rbuf: BytesMut,
    /// The request head as written (reused from request to request).
    wbuf: Vec<u8>,
    addr: SocketAddr,
    /// Taken from the pool (it served requests before).
    pub reused: bool,
}

impl std::fmt::Debug for UpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpConn")
            .field("addr", &self.addr)
            .field("reused", &self.reused)
            .finish()
    }
}

struct Idle {
    conn: Box<UpConn>,
    since: Instant,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// The request never left: the connection was found closed before it was written (safe
    /// to send again, whatever the method).
    NotSent,
    /// The upstream's response head was larger than the limit, or had more than 100 headers
    /// (nginx: "upstream sent too big header").
    HeaderTooBig,
    /// The exchange failed after the request may have gone out.
    Failed(String),
}

#[derive(Default)]
struct Idles {
    by_addr: FastMap<SocketAddr, Vec<Idle>>,
}

/// Idle connections per endpoint, bounded, each for at most `idle_timeout`.
pub struct Pool {
    idle: Mutex<Idles>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    max_response_header: usize,
    /// For upgrades (hyper's client).
    builder: http1::Builder,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl Pool {
    /// A pool keeping `max_idle` connections per endpoint; response heads above
    /// `max_response_header` bytes fail with [`SendError::HeaderTooBig`]. Starts a sweeper
    /// task closing expired idle connections when called inside a tokio runtime.
    pub fn new(
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        max_response_header: usize,
    ) -> Arc<Pool> {
        let mut builder = http1::Builder::new();
        builder.max_header_size(max_response_header);
        if max_response_header > 8192 {
            // The read buffer must hold the whole head.
            builder.max_buf_size(max_response_header.max(400 * 1024));
        }
        let pool = Arc::new(Pool {
            idle: Mutex::new(Idles::default()),
            max_idle,
            idle_timeout,
            connect_timeout,
            max_response_header,
            builder,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            let period = (idle_timeout / 2).max(Duration::from_millis(100));
            rt.spawn(sweep(weak, period));
        }
        pool
    }

    /// An idle connection to `addr`, most recently used first (whether the upstream closed
    /// it meanwhile is found out by [`UpConn::send`]).
    pub fn checkout(&self, addr: SocketAddr) -> Option<Box<UpConn>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.by_addr.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout {
                let mut c = i.conn;
                c.reused = true;
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Box<UpConn>) {
        if self.max_idle == 0 {
            return;
        }
        if conn.rbuf.capacity() > KEEP_BUFFER {
            conn.rbuf = BytesMut::new();
        }
        if conn.wbuf.capacity() > KEEP_BUFFER {
            conn.wbuf = Vec::new();
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let list = idle.by_addr.entry(conn.addr).or_default();
        if list.len() >= self.max_idle {
            // The oldest goes.
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    fn sweep(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let timeout = self.idle_timeout;
        idle.by_addr.retain(|_, list| {
            list.retain_mut(|i| i.since.elapsed() < timeout && i.conn.idle_and_open(false));
            !list.is_empty()
        });
    }

    /// Idle connections held (all endpoints).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .map(|i| i.by_addr.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// A new connection to `addr` (bounded by the connect timeout).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Box<UpConn>> {
        let io = self.tcp(addr).await?;
        Ok(Box::new(UpConn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            addr,
            reused: false,
        }))
    }

    /// A new connection for an upgrade, run by hyper's client as a task of its own; the
    /// response's upgrade (`hyper::upgrade::on`) yields the stream after a 101.
    pub async fn connect_upgradable(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
        let tcp = self.tcp(addr).await?;
        let (send, conn) = self
            .builder
            .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "ingress: upstream connection (upgrade) failed");
            }
        });
        Ok(send)
    }
}

async fn sweep(pool: Weak<Pool>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

/// Methods whose requests always carry a `Content-Length` (0 without a body), as hyper's
/// client writes them.
fn always_length(m: &Method) -> bool {
    *m == Method::POST || *m == Method::PUT || *m == Method::PATCH
}

/// The request head as it goes on the wire: `method target HTTP/1.1`, the headers but any
/// `Content-Length` (the body is complete: its length is written instead).
fn write_head(
    w: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: usize,
) {
    w.clear();
    w.extend_from_slice(method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || had_length || always_length(method) {
        w.extend_from_slice(b"content-length: ");
        crate::accesslog::write_uint(w, body_len as u64);
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"\r\n");
}

/// A bad response head.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Over the size limit or the header count.
    TooBig,
    Invalid(String),
}

/// A response head, its header values sharing the bytes it was read into.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Parses the response head at the start of `buf` and splits it off: `None` while it is
/// incomplete (and within `max` bytes).
fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, HeadError> {
    // httparse's slots left uninitialized: zeroing them and a 100-entry offset table wrote
    // 6.4 KiB per response.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let (len, code, minor, at) = {
        let base = buf.as_ptr() as usize;
        let mut r = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => {
                if n > max {
                    return Err(HeadError::TooBig);
                }
                // Offsets of each name and value in `buf`.
                let at: Vec<(usize, usize, usize, usize)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        let name = h.name.as_ptr() as usize - base;
                        let value = h.value.as_ptr() as usize - base;
                        (name, name + h.name.len(), value, value + h.value.len())
                    })
                    .collect();
                (n, r.code.unwrap_or(0), r.version.unwrap_or(1), at)
            }
            Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooBig),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooBig),
            Err(e) => return Err(HeadError::Invalid(format!("invalid response head: {e}"))),
        }
    };
    let status = StatusCode::from_u16(code)
        .map_err(|_| HeadError::Invalid(format!("invalid status {code}")))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(at.len());
    for &(ns, ne, vs, ve) in &at {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| HeadError::Invalid("invalid header name".into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| HeadError::Invalid("invalid header value".into()))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// Whether the connection's `Connection` header lists `token`.
fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .any(|v| crate::proxy::has_token(v.as_bytes(), token))
}

/// The body's framing (RFC 9112 section 6.3) and whether the connection can take another
/// request after it; an error for framing that cannot be trusted. A `Content-Length` beside
/// `Transfer-Encoding` is removed (it does not describe the body passed on).
fn framing(head_request: bool, head: &mut Head) -> Result<(Framing, bool), String> {
    if head.headers.contains_key(header::TRANSFER_ENCODING)
        && head.headers.contains_key(header::CONTENT_LENGTH)
        && !(head_request || head.status.is_informational())
        && !matches!(head.status.as_u16(), 204 | 304)
        && head.version == Version::HTTP_11
    {
        head.headers.remove(header::CONTENT_LENGTH);
        let (framing, _) = framing(head_request, head)?;
        return Ok((framing, false));
    }
    let h = &head.headers;
    let mut reusable = match head.version {
        Version::HTTP_11 => !connection_has(h, "close"),
        _ => connection_has(h, "keep-alive"),
    };
    let s = head.status.as_u16();
    if s == 101 {
        // Only an upgrade asks for one, and upgrades do not come here.
        return Ok((Framing::Length(0), false));
    }
    if head_request || head.status.is_informational() || s == 204 || s == 304 {
        return Ok((Framing::Length(0), reusable));
    }
    let lengths = h.get_all(header::CONTENT_LENGTH);
    if h.contains_key(header::TRANSFER_ENCODING) {
        if head.version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 response".into());
        }
        // A sender must not apply chunked more than once (RFC 9112 6.1): where such a body
        // ends is in doubt, so the response is refused rather than guessed about.
        let chunked = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            .count();
        if chunked > 1 {
            return Err("Transfer-Encoding applies chunked more than once".into());
        }
        // With a Content-Length beside it, Transfer-Encoding wins and the connection is
        // not used again (RFC 9112 6.3, point 3).
        if lengths.iter().next().is_some() {
            reusable = false;
        }
        let last = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => {
                (Framing::Chunked(Chunk::Size), reusable)
            }
            _ => (Framing::Close, false),
        });
    }
    let mut length = None;
    for v in lengths {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length".into());
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Lengths".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), reusable),
        None => (Framing::Close, false),
    })
}

/// A chunk-size line: the hexadecimal size, extensions ignored.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let digits = &line[..end];
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        n = n * 16 + u64::from((d as char).to_digit(16)?);
    }
    // After the size only whitespace and extensions, with no control character but tab
    // (a CR or NUL inside an extension is refused rather than guessed about).
    let rest = line[end..].trim_ascii_start();
    let clean = rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    (clean && (rest.is_empty() || rest[0] == b';')).then_some(n)
}

/// One step of a chunked body over the bytes at hand.
#[derive(Debug, PartialEq)]
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended (after the trailers, if any).
    End,
    /// More bytes are needed.
    More,
}

/// Decodes what `buf` holds of a chunked body from `state` on; `max_trailers` bounds the
/// trailer section.
fn chunked_step(
    buf: &mut BytesMut,
    state: &mut Chunk,
    max_trailers: usize,
) -> Result<Step, String> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk-size line too long".into());
                    }
                    return Ok(Step::More);
                };
                if nl == 0 || buf[nl - 1] != b'\r' || nl > MAX_CHUNK_LINE {
                    return Err("bad chunk-size line".into());
                }
                let size = chunk_size(&buf[..nl - 1]).ok_or("bad chunk size")?;
                buf.advance(nl + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(n).freeze();
                let left = left - n as u64;
                *state = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("no CRLF after chunk data".into());
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Step::End);
                }
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (n, map) = match httparse::parse_headers(buf, &mut slots) {
                    Ok(httparse::Status::Complete((n, fields))) => {
                        // httparse takes a bare LF as a line end; the framing does not.
                        let head = &buf[..n];
                        if head
                            .iter()
                            .enumerate()
                            .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
                        {
                            return Err("bare LF in trailers".into());
                        }
                        let mut map = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| "invalid trailer name")?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| "invalid trailer value")?;
                            map.append(name, value);
                        }
                        (n, map)
                    }
                    Ok(httparse::Status::Partial) if buf.len() >= max_trailers => {
                        return Err("trailers too big".into())
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(e) => return Err(format!("invalid trailers: {e}")),
                };
                if n > max_trailers {
                    return Err("trailers too big".into());
                }
                buf.advance(n);
                return Ok(Step::Trailers(map));
            }
        }
    }
}

impl UpConn {
    /// Reads what the socket has into the read buffer: `Ready(Ok(0))` when the upstream
    /// closed. Through tokio's `poll_read`, which forgets the socket's read readiness after a
    /// read that came back short (the buffer was drained) but only if no readiness event came
    /// since the read began: the pool's next look at the connection ([`Self::idle_and_open`])
    /// costs no system call unless the upstream wrote or closed since.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_ROOM / 2 {
            self.rbuf.reserve(READ_ROOM);
        }
        std::pin::pin!(self.io.read_buf(&mut self.rbuf)).poll(cx)
    }

    /// An idle connection is usable when the upstream has neither closed it nor sent
    /// anything (an answer nobody asked for makes the next one ambiguous). `exact`: ask the
    /// kernel (a peek), for a request that must not be sent twice; else the runtime's
    /// readiness decides whether a read is tried, which sees what its event loop has taken
    /// note of (as nginx's event loop does for its cached connections): a close that arrived
    /// in that instant fails the exchange after the request left (an idempotent request is
    /// then sent again on another connection), and stray bytes that arrived in it would be
    /// read as the answer (docs/ingress.md, "Why an HTTP/1.1 upstream client of our own").
    fn idle_and_open(&mut self, exact: bool) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        if exact {
            let mut one = [std::mem::MaybeUninit::<u8>::uninit()];
            return match socket2::SockRef::from(&self.io).peek(&mut one) {
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            };
        }
        match self.io.try_read_buf(&mut self.rbuf) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }

    /// Writes the request and waits for the response head; the body of the answer reads the
    /// rest and gives the connection back to `pool` at its end.
    pub async fn send(
        mut self: Box<Self>,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: &Bytes,
        pool: &Arc<Pool>,
    ) -> Result<Response<UpBody>, SendError> {
        if self.reused && !self.idle_and_open(!method.is_idempotent()) {
            return Err(SendError::NotSent);
        }
        let mut wbuf = std::mem::take(&mut self.wbuf);
        write_head(&mut wbuf, method, target, headers, body.len());
        let small = body.len() <= COALESCE_BODY;
        if small {
            wbuf.extend_from_slice(body);
        }
        // A pooled connection that fails on the very first write took none of the request.
        let first = match self.io.write(&wbuf).await {
            Ok(n) => n,
            Err(e) if self.reused => {
                tracing::trace!(error = %e, "ingress: a kept-alive upstream connection refused the request");
                return Err(SendError::NotSent);
            }
            Err(e) => return Err(SendError::Failed(format!("writing the request: {e}"))),
        };
        if first < wbuf.len() {
            self.io
                .write_all(&wbuf[first..])
                .await
                .map_err(|e| SendError::Failed(format!("writing the request: {e}")))?;
        }
        if !small {
            self.io
                .write_all(body)
                .await
                .map_err(|e| SendError::Failed(format!("writing the request body: {e}")))?;
        }
        self.wbuf = wbuf;

        let max = pool.max_response_header;
        let mut head = loop {
            match parse_head(&mut self.rbuf, max) {
                Ok(Some(h)) if h.status.is_informational() && h.status.as_u16() != 101 => {
                    // 100 Continue, 103 Early Hints: the final answer follows.
                    continue;
                }
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(HeadError::TooBig) => return Err(SendError::HeaderTooBig),
                Err(HeadError::Invalid(e)) => return Err(SendError::Failed(e)),
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if self.rbuf.is_empty() => {
                    return Err(SendError::Failed(
                        "the upstream closed the connection without an answer".into(),
                    ))
                }
                Ok(0) => {
                    return Err(SendError::Failed(
                        "the upstream closed the connection inside the response head".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(SendError::Failed(format!("reading the response: {e}"))),
            }
        };
        let (framing, reusable) =
            framing(*method == Method::HEAD, &mut head).map_err(SendError::Failed)?;
        let mut body = OwnBody {
            conn: Some(self),
            framing,
            reusable,
            pool: Arc::downgrade(pool),
            max_trailers: max,
        };
        if framing == Framing::Length(0) {
            // No body (HEAD, 204, 304, Content-Length: 0): the connection is free now.
            body.release();
        }
        let mut resp = Response::new(UpBody(Kind::Own(body)));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        Ok(resp)
    }
}

/// A body read from one of our connections.
struct OwnBody {
    /// Until the body ended (or failed).
    conn: Option<Box<UpConn>>,
    framing: Framing,
    reusable: bool,
    pool: Weak<Pool>,
    max_trailers: usize,
}

impl OwnBody {
    /// The body ended: the connection goes back to the pool when it can take another
    /// request and holds nothing beyond this response.
    fn release(&mut self) {
        self.framing = Framing::Length(0);
        let Some(c) = self.conn.take() else {
            return;
        };
        if self.reusable && c.rbuf.is_empty() {
            if let Some(pool) = self.pool.upgrade() {
                pool.checkin(c);
            }
        }
    }

    fn fail(&mut self, e: String) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.conn = None;
        self.framing = Framing::Length(0);
        Poll::Ready(Some(Err(std::io::Error::other(e))))
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What the bytes at hand give: a frame, the end, or nothing yet.
            let step = match &mut self.framing {
                Framing::Length(0) => Ok(Step::End),
                Framing::Length(left) if !c.rbuf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(c.rbuf.len());
                    *left -= n as u64;
                    Ok(Step::Data(c.rbuf.split_to(n).freeze()))
                }
                Framing::Close if !c.rbuf.is_empty() => Ok(Step::Data(c.rbuf.split().freeze())),
                Framing::Length(_) | Framing::Close => Ok(Step::More),
                Framing::Chunked(state) => chunked_step(&mut c.rbuf, state, self.max_trailers),
            };
            match step {
                Ok(Step::Data(d)) => {
                    if self.framing == Framing::Length(0) {
                        // The last bytes: the connection is free before the client has them.
                        self.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::Trailers(t)) => {
                    self.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Step::End) => {
                    self.release();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => return self.fail(e),
            }
            match ready!(c.poll_fill(cx)) {
                Ok(0) if self.framing == Framing::Close => {
                    // The end of a close-delimited body; the connection is done.
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return self.fail("the upstream closed the connection inside the body".into())
                }
                Ok(_) => {}
                Err(e) => return self.fail(format!("reading the response body: {e}")),
            }
        }
    }
}

enum Kind {
    Own(OwnBody),
    /// An upgrade's (hyper's client connection runs elsewhere).
    Hyper(Incoming),
}

/// A response body from an upstream, streamed as the client reads it; a connection of ours
/// goes back to the pool at its clean end.
pub struct UpBody(Kind);

impl std::fmt::Debug for UpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::Own(b) => f
                .debug_struct("UpBody")
                .field("conn", &b.conn)
                .field("framing", &b.framing)
                .finish(),
            Kind::Hyper(_) => f.debug_struct("UpBody").field("upgrade", &true).finish(),
        }
    }
}

impl UpBody {
    /// A body whose connection is run elsewhere (an upgrade's).
    pub fn detached(inner: Incoming) -> UpBody {
        UpBody(Kind::Hyper(inner))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut self.get_mut().0 {
            Kind::Own(b) => b.poll_frame(cx),
            Kind::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(std::io::Error::other))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Own(b) => b.conn.is_none() || b.framing == Framing::Length(0),
            Kind::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Own(b) => match b.framing {
                _ if b.conn.is_none() => SizeHint::with_exact(0),
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
            Kind::Hyper(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, HeadError> {
        let mut b = BytesMut::from(raw.as_bytes());
        parse_head(&mut b, 1024)
    }

    fn frame_of(raw: &str, head_request: bool) -> Result<(Framing, bool), String> {
        framing(head_request, &mut head(raw).unwrap().unwrap())
    }

    #[test]
    fn request_heads_are_written_with_one_length() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut w = Vec::new();
        write_head(&mut w, &Method::POST, "/p?q=1", &h, 12345);
        assert_eq!(
            String::from_utf8(w.clone()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12345\r\n\r\n"
        );
        h.remove(header::CONTENT_LENGTH);
        write_head(&mut w, &Method::GET, "/", &h, 0);
        assert_eq!(
            String::from_utf8(w.clone()).unwrap(),
            "GET / HTTP/1.1\r\nhost: a.test\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        write_head(&mut w, &Method::PUT, "/", &HeaderMap::new(), 0);
        assert_eq!(w, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }

    #[test]
    fn response_heads_parse_split_and_stay_bounded() {
        let mut b =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nokNEXT"[..]);
        let h = parse_head(&mut b, 1024).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["x-a"], "b");
        assert_eq!(&b[..], b"okNEXT");
        // Incomplete: more bytes needed, until the limit.
        assert!(head("HTTP/1.1 200 OK\r\nX-A: b\r\n").unwrap().is_none());
        let long = format!("HTTP/1.1 200 OK\r\nX-A: {}", "b".repeat(2000));
        assert_eq!(head(&long).unwrap_err(), HeadError::TooBig);
        let long = format!("HTTP/1.1 200 OK\r\nX-A: {}\r\n\r\n", "b".repeat(2000));
        assert_eq!(head(&long).unwrap_err(), HeadError::TooBig);
        let many = format!("HTTP/1.0 200 OK\r\n{}\r\n", "a: b\r\n".repeat(101));
        let mut b = BytesMut::from(many.as_bytes());
        assert_eq!(parse_head(&mut b, 4096).unwrap_err(), HeadError::TooBig);
        // Garbage, a bad status, obsolete line folding: invalid.
        for bad in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 X\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX A: b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\0\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn bodies_are_framed_as_rfc_9112_says() {
        use Framing::*;
        let ok = |raw: &str| frame_of(raw, false).unwrap();
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        // A Connection value with obs-text elsewhere still counts.
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: close, \xff\r\nContent-Length: 5\r\n\r\n"[..],
        );
        let mut h = parse_head(&mut b, 1024).unwrap().unwrap();
        assert_eq!(framing(false, &mut h).unwrap(), (Length(5), false));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (Chunked(Chunk::Size), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            (Chunked(Chunk::Size), true)
        );
        // Transfer-Encoding wins over Content-Length; the connection is not used again.
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (Chunked(Chunk::Size), false)
        );
        let mut h =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(
            framing(false, &mut h).unwrap(),
            (Chunked(Chunk::Size), false)
        );
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (Close, false)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), (Close, false));
        // No body whatever the headers say.
        for raw in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(ok(raw), (Length(0), true), "{raw}");
        }
        assert_eq!(
            frame_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap(),
            (Length(0), true)
        );
        assert_eq!(
            ok("HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            (Length(0), false)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked,chunked\r\n\r\n",
        ] {
            assert!(frame_of(bad, false).is_err(), "{bad}");
        }
    }

    /// Runs a chunked body through the decoder, fed in pieces of `step` bytes.
    fn dechunk(raw: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, usize), String> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut trailers = None;
        let mut fed = 0;
        loop {
            match chunked_step(&mut buf, &mut state, 256)? {
                Step::Data(d) => {
                    assert!(!d.is_empty());
                    out.extend_from_slice(&d);
                }
                Step::Trailers(t) => {
                    trailers = Some(t);
                    break;
                }
                Step::End => break,
                Step::More => {
                    if fed == raw.len() {
                        return Err("truncated".into());
                    }
                    let n = step.min(raw.len() - fed);
                    buf.extend_from_slice(&raw[fed..fed + n]);
                    fed += n;
                }
            }
        }
        Ok((out, trailers, raw.len() - fed + buf.len()))
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let raw =
            b"5;ext=1\t; b=\"q\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (body, trailers, left) = dechunk(raw, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
            assert!(trailers.is_none());
            assert_eq!(left, 4, "step {step}");
        }
        let raw = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n";
        for step in [1, 5, 100] {
            let (body, trailers, left) = dechunk(raw, step).unwrap();
            assert_eq!(body, b"abc");
            let t = trailers.unwrap();
            assert_eq!(
                (t["x-sum"].as_bytes(), t["x-b"].as_bytes()),
                (&b"1"[..], &b"2"[..])
            );
            assert_eq!(left, 0);
        }
        for bad in [
            &b"g\r\nabc"[..],
            b"\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"3 x\r\nabc\r\n",
            b"1000000000000000\r\n",
            b"3;a\rb\r\nabc\r\n0\r\n\r\n",
            b"3;a\x00\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\n\n",
            b"3\r\nabc\r\n0\r\nX-A: b\n\r\n",
            b"3\r\nabc\r\n0\r\nX-A: b\r\n\n",
        ] {
            assert!(
                matches!(dechunk(bad, 100), Err(e) if e != "truncated"),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Bounded: an endless chunk-size line, endless trailers.
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(matches!(dechunk(&long, 1000), Err(e) if e.contains("too long")));
        let mut t = b"0\r\n".to_vec();
        t.extend(std::iter::repeat_n(b"X-A: b\r\n".iter().copied(), 100).flatten());
        assert!(matches!(dechunk(&t, 50), Err(e) if e.contains("too big")));
        // A truncated body asks for more.
        assert_eq!(dechunk(b"5\r\nab", 100).unwrap_err(), "truncated");
    }

    /// An upstream that writes after its answer ended (here: a second answer nobody asked
    /// for, after a 204) leaves its connection unusable: the next request on it is not sent
    /// there (it would read the stale answer as its own), and one that stayed quiet is reused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_after_an_answer_keep_the_connection_from_being_reused() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            // Quiet answers first, then one with stale bytes behind it.
            for i in 0..3 {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request {i}");
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
                .await
                .unwrap();
            let _ = sent_tx.send(());
            // Stays open: only the bytes tell the connection is spoilt.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        });
        let pool = Pool::new(4, Duration::from_secs(10), Duration::from_secs(1), 8192);
        let get = |c: Box<UpConn>| {
            let pool = Arc::clone(&pool);
            async move {
                c.send(&Method::GET, "/", &HeaderMap::new(), &Bytes::new(), &pool)
                    .await
            }
        };
        let mut conn = pool.connect(addr).await.unwrap();
        for i in 0..3 {
            let resp = get(conn).await.unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            resp.into_body().collect().await.unwrap();
            assert_eq!(pool.idle_count(), 1, "answer {i} ended cleanly: pooled");
            conn = pool.checkout(addr).unwrap();
            if i == 2 {
                break;
            }
        }
        pool.checkin(conn);
        tokio::time::timeout(Duration::from_secs(5), sent_rx)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let spoilt = pool.checkout(addr).unwrap();
        assert!(matches!(get(spoilt).await, Err(SendError::NotSent)));
        server.abort();
    }

    /// A request that must not be sent twice asks the kernel whether a pooled connection is
    /// still clean, not the runtime: bytes an upstream wrote after its answer are seen even
    /// when the event loop has not taken note of them yet (here it cannot: nothing awaits
    /// between the bytes' arrival and the check, on a single-threaded runtime).
    #[test]
    fn a_post_looks_at_a_pooled_connection_in_the_kernel() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (sent_tx, sent_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            assert!(s.read(&mut buf).unwrap() > 0);
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
            go_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
                .unwrap();
            sent_tx.send(()).unwrap();
            // Open until the client goes (or sends a request it should not have).
            let _ = s.read(&mut buf);
        });
        rt.block_on(async {
            let pool = Pool::new(4, Duration::from_secs(60), Duration::from_secs(1), 8192);
            let resp = get_on(pool.connect(addr).await.unwrap(), &pool)
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            assert_eq!(pool.idle_count(), 1);
            let c = pool.checkout(addr).unwrap();
            // No await from here to the check: the runtime's event loop does not run.
            go_tx.send(()).unwrap();
            sent_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let r = c
                .send(&Method::POST, "/", &HeaderMap::new(), &Bytes::new(), &pool)
                .await;
            assert!(matches!(r, Err(SendError::NotSent)), "{r:?}");
        });
        drop(rt);
        server.join().unwrap();
    }

    /// Reads one request head (these requests have no body): false when the client closed.
    async fn read_request(s: &mut TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// Whether the client closed `s` (within 5 s) without sending anything more.
    async fn closed_by_client(s: &mut TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn get_on(c: Box<UpConn>, pool: &Arc<Pool>) -> Result<Response<UpBody>, SendError> {
        c.send(&Method::GET, "/", &HeaderMap::new(), &Bytes::new(), pool)
            .await
    }

    async fn body_of(resp: Response<UpBody>) -> Vec<u8> {
        use http_body_util::BodyExt;
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect());
        body.await.unwrap().unwrap().to_bytes().to_vec()
    }

    /// `Transfer-Encoding: gzip, chunked` beside a `Content-Length` (RFC 9112 6.3, rule 3):
    /// the body is read chunked (the length, shorter, would cut it), the length is not
    /// passed on, and the connection is closed rather than pooled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfer_encoding_beside_a_length_wins_and_the_connection_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut s).await);
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n",
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
            closed_by_client(&mut s).await
        });
        let pool = Pool::new(4, Duration::from_secs(60), Duration::from_secs(1), 8192);
        let resp = get_on(pool.connect(addr).await.unwrap(), &pool)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(resp.body().size_hint().exact(), None);
        assert_eq!(body_of(resp).await, b"hello world");
        assert_eq!(pool.idle_count(), 0);
        assert!(pool.checkout(addr).is_none());
        assert!(
            server.await.unwrap(),
            "the connection was closed after the answer"
        );
    }

    /// Chunked applied twice (one header line or two) is refused before any body is read,
    /// and the connection is closed, not pooled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunked_applied_twice_is_refused_and_the_connection_closed() {
        for te in [
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                assert!(read_request(&mut s).await);
                let answer = format!("HTTP/1.1 200 OK\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n");
                s.write_all(answer.as_bytes()).await.unwrap();
                closed_by_client(&mut s).await
            });
            let pool = Pool::new(4, Duration::from_secs(60), Duration::from_secs(1), 8192);
            let sent = get_on(pool.connect(addr).await.unwrap(), &pool).await;
            assert!(
                matches!(&sent, Err(SendError::Failed(e)) if e.contains("chunked more than once")),
                "{te}: {sent:?}"
            );
            assert_eq!(pool.idle_count(), 0, "{te}");
            assert!(server.await.unwrap(), "{te}: the connection was closed");
        }
    }

    /// 100 Continue and 103 Early Hints before the answer (written apart, then all in one
    /// write): the caller gets the final answer with its own headers and its body, and the
    /// connection serves the next request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interim_answers_are_skipped_and_the_connection_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut s).await);
            for piece in [
                &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: 1\r\n\r\nhello",
            ] {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                read_request(&mut s).await,
                "a second request on the connection"
            );
            s.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
            )
            .await
            .unwrap();
            closed_by_client(&mut s).await
        });
        let pool = Pool::new(4, Duration::from_secs(60), Duration::from_secs(1), 8192);
        let resp = get_on(pool.connect(addr).await.unwrap(), &pool)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-final"], "1");
        assert!(!resp.headers().contains_key(header::LINK));
        assert_eq!(body_of(resp).await, b"hello");
        assert_eq!(pool.idle_count(), 1);
        let conn = pool.checkout(addr).unwrap();
        let resp = get_on(conn, &pool).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_of(resp).await, b"second");
        assert_eq!(pool.idle_count(), 1);
        drop(pool);
        assert!(server.await.unwrap());
    }

    /// An upstream that closes a pooled connection while it sits idle: the request, sent
    /// as the proxy sends it (pooled connections first, then a new one), is not failed: the
    /// closed connection gives `NotSent` and a new one carries the request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_while_idle_does_not_fail_the_next_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut s).await);
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            // FIN while the connection is idle in the pool.
            drop(s);
            let _ = closed_tx.send(());
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut s).await);
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                .await
                .unwrap();
            closed_by_client(&mut s).await
        });
        // Idle timeout long enough for the sweeper to stay out of the way.
        let pool = Pool::new(4, Duration::from_secs(60), Duration::from_secs(1), 8192);
        let resp = get_on(pool.connect(addr).await.unwrap(), &pool)
            .await
            .unwrap();
        assert_eq!(body_of(resp).await, b"first");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .unwrap()
            .unwrap();
        // The FIN reaches our socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut not_sent = 0;
        let resp = loop {
            match pool.checkout(addr) {
                Some(c) => match get_on(c, &pool).await {
                    Ok(resp) => panic!("answered on the closed connection: {resp:?}"),
                    Err(SendError::NotSent) => not_sent += 1,
                    Err(e) => panic!("the request failed on the closed connection: {e:?}"),
                },
                None => {
                    break get_on(pool.connect(addr).await.unwrap(), &pool)
                        .await
                        .unwrap()
                }
            }
        };
        assert!(not_sent <= 1);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_of(resp).await, b"second");
        assert_eq!(pool.idle_count(), 1);
        drop(pool);
        assert!(server.await.unwrap());
    }
}
