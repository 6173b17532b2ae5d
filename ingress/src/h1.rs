//! The HTTP/1.1 server of our own for the requests that make up most of an ingress's traffic:
//! bodiless requests (no `Content-Length` other than 0, no `Transfer-Encoding`) in origin form
//! that ask for no upgrade and expect nothing, on plain or TLS connections. Everything else
//! (a request with a body, `Expect: 100-continue`, an upgrade, `CONNECT`, a head that does not
//! parse, is too large or breaks a rule below) is handed with the connection, from that
//! request on, to hyper's HTTP/1.1 server, which serves the rest of the connection as it did
//! before this path existed (and answers 400/431 where a request is bad).
//!
//! Why: on kept-alive HTTP the proxy's user-space time per request was about 4 µs above
//! nginx's, most of it in hyper's server (its dispatcher, buffered I/O, a timer armed per
//! request); docs/ingress.md has the profile and the figures before and after.
//!
//! Per connection: one read buffer (the request head parsed with `httparse`, header values
//! sharing its bytes), one write buffer (the response head and small body frames in one write),
//! one timer for the head deadline that is moved only when it fires (a request costs no timer
//! operation), and the stop signal polled only while the connection waits. Rules kept:
//! - a request head is bounded in size (`max_header_bytes`; beyond: hyper's 431) and in time
//!   (`header_timeout` from the moment the connection waits for it, idle keep-alive included;
//!   beyond: the connection is closed);
//! - an HTTP/1.1 request needs exactly one `Host` (else hyper's path);
//! - keep-alive: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
//!   `Connection: keep-alive`; pipelined requests are answered in order;
//! - a response: `Content-Length` as given (a body that ends short or runs long closes the
//!   connection after what was promised), else the body's exact size, else chunked (HTTP/1.1
//!   clients) or until close (HTTP/1.0); none for HEAD (which gets the length a GET would
//!   have), 1xx, 204 and 304; trailers are dropped (no request on this path offered
//!   `TE: trailers`); `Date` added when missing; the status line says `HTTP/1.1` to both
//!   versions (RFC 9110 2.5; hyper echoed `HTTP/1.0`), with no reason phrase for a status
//!   without a canonical one (hyper wrote `<none>`); frames of 16 KiB or more are written from
//!   where they are, smaller ones gathered;
//! - while an answer is pending, a kept-alive connection is read (as hyper does): a client
//!   that closed (or half-closed, as hyper without `half_close`) ends the exchange at once;
//!   bytes of pipelined requests are kept;
//! - on stop: an idle connection closes at once, a busy one after its answer (which then says
//!   `connection: close`), at the latest [`crate::server::GRACE`] later.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::Empty;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::accesslog::write_uint;
use crate::proxy::{has_token, ConnInfo, Proxy};

/// Headers in a request head (hyper's server limit as well); more goes to hyper (431).
const MAX_HEADERS: usize = 100;
/// Free room asked for before each read.
const READ_ROOM: usize = 4 * 1024;
/// Body frames below this size are copied behind the head (or the previous frame) and written
/// with it; larger ones are written from where they are.
const COALESCE: usize = 16 * 1024;
/// A write buffer grown beyond this is not kept between requests.
const KEEP_BUFFER: usize = 64 * 1024;

/// How serving a connection ended.
#[derive(Debug)]
pub enum End<I> {
    /// The connection is done (closed by either side, timed out, stopped, or failed).
    Closed,
    /// A request this path does not serve: hyper's server takes the connection, its first
    /// bytes being those read and not used (the request's head and what followed).
    Fallback(I, BytesMut),
}

/// A request head parsed and found fit for this path.
struct Head {
    /// Bytes of the head, CRLF CRLF included.
    len: usize,
    method: Method,
    version: Version,
    /// The request target's place in the head.
    target: (usize, usize),
    /// Names and the places of their values in the head.
    headers: Vec<(HeaderName, usize, usize)>,
    keep_alive: bool,
    head_request: bool,
}

/// Why a head goes to hyper.
#[derive(Debug, PartialEq, Eq)]
struct NotOurs;

/// The place of `part` (a slice of `buf`) in `buf`.
fn place(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start, start + part.len())
}

/// Parses the head at the start of `buf`: `Ok(None)` while incomplete, `Err` when the request
/// is not one this path serves (hyper's server then reads the same bytes).
fn parse(buf: &[u8], names: &mut Vec<(HeaderName, usize, usize)>) -> Result<Option<Head>, NotOurs> {
    // httparse's slots left uninitialized (no 3 KiB written per request).
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(NotOurs),
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(NotOurs),
    };
    let method = Method::from_bytes(req.method.ok_or(NotOurs)?.as_bytes()).map_err(|_| NotOurs)?;
    if method == Method::CONNECT {
        return Err(NotOurs);
    }
    let path = req.path.ok_or(NotOurs)?;
    if !path.starts_with('/') {
        return Err(NotOurs);
    }
    let mut hosts = 0;
    let (mut close, mut keep) = (false, false);
    names.clear();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| NotOurs)?;
        match name {
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT | header::TE => {
                return Err(NotOurs)
            }
            // A body of zero bytes is no body; any other length goes to hyper.
            header::CONTENT_LENGTH if h.value.is_empty() || h.value.iter().any(|b| *b != b'0') => {
                return Err(NotOurs)
            }
            header::CONNECTION => {
                if has_token(h.value, "upgrade") {
                    return Err(NotOurs);
                }
                close |= has_token(h.value, "close");
                keep |= has_token(h.value, "keep-alive");
            }
            header::HOST => hosts += 1,
            _ => {}
        }
        let (start, end) = place(buf, h.value);
        names.push((name, start, end));
    }
    if version == Version::HTTP_11 && hosts != 1 {
        return Err(NotOurs);
    }
    let keep_alive = !close && (version == Version::HTTP_11 || keep);
    Ok(Some(Head {
        len,
        head_request: method == Method::HEAD,
        method,
        version,
        target: place(buf, path.as_bytes()),
        headers: std::mem::take(names),
        keep_alive,
    }))
}

/// The request for the proxy, its target and header values sharing `head`'s bytes; `Err`
/// when a value does not make a header (hyper's path then).
fn request(head: &mut Head, bytes: &Bytes) -> Result<Request<Empty<Bytes>>, NotOurs> {
    let uri =
        Uri::from_maybe_shared(bytes.slice(head.target.0..head.target.1)).map_err(|_| NotOurs)?;
    let mut headers = HeaderMap::with_capacity(head.headers.len() + 8);
    for (name, start, end) in head.headers.drain(..) {
        let v = HeaderValue::from_maybe_shared(bytes.slice(start..end)).map_err(|_| NotOurs)?;
        headers.append(name, v);
    }
    let mut req = Request::new(Empty::new());
    *req.method_mut() = std::mem::replace(&mut head.method, Method::GET);
    *req.uri_mut() = uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = headers;
    Ok(req)
}

/// How the response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

thread_local! {
    /// The `Date` value of the current second, per thread.
    static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            d.1 = httpdate::fmt_http_date(now).into_bytes();
            d.0 = secs;
        }
        out.extend_from_slice(&d.1);
    });
}

/// Writes the response head into `out` and says how the body goes; `keep_alive` is cleared
/// when the answer ends the connection.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    exact: Option<u64>,
    request: Version,
    head_request: bool,
    keep_alive: &mut bool,
) -> Framing {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // No Content-Length may go with these (RFC 9110 8.6).
    let no_length = status.is_informational() || status == 204;
    let bodiless = head_request || no_length || status == 304;
    let mut length = None;
    let mut has_date = false;
    for (name, value) in headers {
        match *name {
            // Ours to decide (the proxy removed the upstream's hop-by-hop headers already).
            header::CONNECTION | header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                if length.is_some() {
                    continue;
                }
                match std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(n) => length = Some(n),
                    None => continue,
                }
                if no_length {
                    continue;
                }
            }
            header::DATE => has_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A length of our own when the upstream named none and the size is known: for an answer
    // with a body, and for HEAD (the length a GET would have had, as hyper writes it).
    let added = match exact {
        Some(n) if length.is_none() && !no_length && (head_request || !bodiless) => Some(n),
        _ => None,
    };
    if let Some(n) = added {
        out.extend_from_slice(b"content-length: ");
        write_uint(out, n);
        out.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = length.or(added) {
        Framing::Length(n)
    } else if request == Version::HTTP_11 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    } else {
        *keep_alive = false;
        Framing::Close
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        write_date(out);
        out.extend_from_slice(b"\r\n");
    }
    match (request == Version::HTTP_11, *keep_alive) {
        (true, false) => out.extend_from_slice(b"connection: close\r\n"),
        (false, true) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Appends a chunk-size line.
fn chunk_head(out: &mut Vec<u8>, len: usize) {
    let mut size = [0u8; 16];
    let mut i = size.len();
    let mut n = len;
    loop {
        i -= 1;
        size[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&size[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends one data frame as `framing` says (an empty one writes nothing: an empty chunk
/// would end a chunked body).
fn frame_into(out: &mut Vec<u8>, framing: Framing, data: &[u8]) {
    match framing {
        Framing::None => {}
        Framing::Length(_) | Framing::Close => out.extend_from_slice(data),
        Framing::Chunked if data.is_empty() => {}
        Framing::Chunked => {
            chunk_head(out, data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Whether the bytes from `from` on (with the 3 before) can end a request head: a line feed
/// followed by an empty line (CRLF or bare LF, as httparse reads them). Only then is the head
/// parsed again, so a head trickling in byte by byte is not scanned from its start each time.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(3).min(buf.len())..];
    tail.windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && tail.get(i + 2) == Some(&b'\n')))
}

/// The stop signal of a connection, polled only while it waits: once seen, an idle
/// connection ends at once and a busy one [`crate::server::GRACE`] later.
struct Stop {
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    grace: Option<Pin<Box<Sleep>>>,
}

impl Stop {
    fn new(mut stop: watch::Receiver<bool>) -> Stop {
        Stop {
            signal: Some(Box::pin(async move {
                let _ = stop.wait_for(|s| *s).await;
            })),
            grace: None,
        }
    }

    fn stopping(&self) -> bool {
        self.signal.is_none()
    }

    /// Ready when the connection has to end now.
    fn poll(&mut self, cx: &mut Context<'_>, idle: bool) -> Poll<()> {
        if let Some(s) = &mut self.signal {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.signal = None;
            self.grace = Some(Box::pin(tokio::time::sleep(crate::server::GRACE)));
        }
        if idle {
            return Poll::Ready(());
        }
        match &mut self.grace {
            Some(g) => g.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }

    /// `f`'s output, or `None` when the connection has to end first. (`f` pinned by the
    /// caller: a future taken by value would be stored twice in this one's state.)
    async fn or<F: Future>(&mut self, mut f: Pin<&mut F>, idle: bool) -> Option<F::Output> {
        poll_fn(|cx| {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll(cx, idle).map(|()| None)
        })
        .await
    }
}

/// Waits for `f` (the answer, or the next piece of its body). A kept-alive connection is read
/// meanwhile, as hyper's server does, so that a client that went away ends the wait (and the
/// upstream exchange with it) rather than leaving it to run to its timeout; bytes of a
/// pipelined request are kept in `rbuf`, only into its spare room (no allocation, at most
/// `max` bytes). `None`: the client closed, or the connection has to stop.
async fn busy<I: AsyncRead + Unpin, F: Future>(
    mut f: Pin<&mut F>,
    io: &mut I,
    rbuf: &mut BytesMut,
    watch: bool,
    max: usize,
    stop: &mut Stop,
) -> Option<F::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        while watch && rbuf.len() < max && rbuf.capacity() > rbuf.len() {
            match std::pin::pin!(io.read_buf(rbuf)).poll(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        stop.poll(cx, false).map(|()| None)
    })
    .await
}

/// What waiting for request bytes came to.
enum Wait {
    Read(usize),
    Failed,
    Late,
    Stop,
}

/// Reads into `buf`, at most until `deadline` (`timer` is moved there only when it fires
/// early) or until the connection has to stop.
async fn read_head_bytes<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    stop: &mut Stop,
) -> Wait {
    poll_fn(|cx| {
        let read = std::pin::pin!(io.read_buf(buf)).poll(cx);
        match read {
            Poll::Ready(Ok(n)) => return Poll::Ready(Wait::Read(n)),
            Poll::Ready(Err(_)) => return Poll::Ready(Wait::Failed),
            Poll::Pending => {}
        }
        if stop.poll(cx, true).is_ready() {
            return Poll::Ready(Wait::Stop);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(Wait::Late);
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// Writes `data` and flushes (TLS: the records go out); `false` when that failed or the
/// connection has to stop.
async fn write_out<I: AsyncWrite + Unpin>(io: &mut I, data: &[u8], stop: &mut Stop) -> bool {
    matches!(
        stop.or(
            std::pin::pin!(async {
                io.write_all(data).await?;
                io.flush().await
            }),
            false
        )
        .await,
        Some(Ok(()))
    )
}

/// Writes `buf` as [`write_out`] does, then clears it.
async fn send<I: AsyncWrite + Unpin>(io: &mut I, buf: &mut Vec<u8>, stop: &mut Stop) -> bool {
    let ok = write_out(io, buf, stop).await;
    buf.clear();
    ok
}

/// Serves `io` (whose first bytes, already read, are `rbuf`) until it ends or a request
/// needs hyper's server.
pub async fn serve<I>(
    mut io: I,
    mut rbuf: BytesMut,
    proxy: &Proxy,
    info: ConnInfo,
    stop: watch::Receiver<bool>,
) -> End<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let opts = proxy.options();
    let head_timeout = opts.header_timeout;
    let max_head = opts.max_header_bytes.max(8192);
    let mut stop = Stop::new(stop);
    let mut timer = Box::pin(tokio::time::sleep(head_timeout));
    let mut names = Vec::with_capacity(16);
    let mut wbuf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // A request head.
        let deadline = Instant::now() + head_timeout;
        // Bytes known not to end a head.
        let mut scanned = 0;
        let mut head = loop {
            if may_end_head(&rbuf, scanned) {
                match parse(&rbuf, &mut names) {
                    // Over the limit although complete: hyper's 431, as for an incomplete one.
                    Ok(Some(h)) if h.len > max_head => return End::Fallback(io, rbuf),
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(NotOurs) => return End::Fallback(io, rbuf),
                }
            }
            scanned = rbuf.len();
            if rbuf.len() >= max_head {
                return End::Fallback(io, rbuf);
            }
            if stop.stopping() && rbuf.is_empty() {
                return End::Closed;
            }
            rbuf.reserve(READ_ROOM);
            match read_head_bytes(&mut io, &mut rbuf, &mut timer, deadline, &mut stop).await {
                Wait::Read(0) | Wait::Failed | Wait::Stop => return End::Closed,
                Wait::Read(_) => {}
                Wait::Late => {
                    tracing::debug!(peer = %info.peer, "ingress: no request head in time; closing");
                    return End::Closed;
                }
            }
        };
        let bytes = rbuf.split_to(head.len).freeze();
        let req = match request(&mut head, &bytes) {
            Ok(r) => r,
            Err(NotOurs) => {
                // Put the head back in front of what follows it.
                let mut back = BytesMut::with_capacity(bytes.len() + rbuf.len());
                back.extend_from_slice(&bytes);
                back.extend_from_slice(&rbuf);
                return End::Fallback(io, back);
            }
        };
        drop(bytes);
        names = std::mem::take(&mut head.headers);
        let mut keep_alive = head.keep_alive;

        // The answer.
        let handling = std::pin::pin!(proxy.handle(req, info));
        let watch = keep_alive;
        let Some(resp) = busy(handling, &mut io, &mut rbuf, watch, max_head, &mut stop).await
        else {
            return End::Closed;
        };
        // A stop meanwhile: this answer is the last and says so.
        keep_alive &= !stop.stopping();
        let (parts, mut body) = resp.into_parts();
        let framing = encode_head(
            &mut wbuf,
            parts.status,
            &parts.headers,
            body.size_hint().exact(),
            head.version,
            head.head_request,
            &mut keep_alive,
        );
        drop(parts);
        let mut sent = 0u64;
        let mut whole = true;
        if framing != Framing::None {
            loop {
                // Frames that are there already join the buffer; the buffer goes out when
                // the body has to be waited for.
                let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
                let next = match polled {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        if !wbuf.is_empty() && !send(&mut io, &mut wbuf, &mut stop).await {
                            return End::Closed;
                        }
                        let waited =
                            std::pin::pin!(poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)));
                        match busy(waited, &mut io, &mut rbuf, watch, max_head, &mut stop).await {
                            Some(f) => f,
                            None => return End::Closed,
                        }
                    }
                };
                match next {
                    None => break,
                    Some(Ok(frame)) => {
                        // Trailers are dropped.
                        let Ok(mut data) = frame.into_data() else {
                            continue;
                        };
                        // Past the promised Content-Length: cut, and the connection ends.
                        let over = match framing {
                            Framing::Length(n) if data.len() as u64 > n - sent => {
                                data.truncate((n - sent) as usize);
                                true
                            }
                            _ => false,
                        };
                        sent += data.len() as u64;
                        if data.len() >= COALESCE {
                            // Large: written from where it is, not copied.
                            if framing == Framing::Chunked {
                                chunk_head(&mut wbuf, data.len());
                            }
                            if !send(&mut io, &mut wbuf, &mut stop).await
                                || !write_out(&mut io, &data, &mut stop).await
                            {
                                return End::Closed;
                            }
                            if framing == Framing::Chunked {
                                wbuf.extend_from_slice(b"\r\n");
                            }
                        } else {
                            frame_into(&mut wbuf, framing, &data);
                            if wbuf.len() >= COALESCE && !send(&mut io, &mut wbuf, &mut stop).await
                            {
                                return End::Closed;
                            }
                        }
                        if over {
                            whole = false;
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %info.peer, error = %e, "ingress: the response body failed; closing");
                        whole = false;
                        break;
                    }
                }
            }
        }
        drop(body);
        match framing {
            Framing::Chunked if whole => wbuf.extend_from_slice(b"0\r\n\r\n"),
            Framing::Length(n) if sent != n => whole = false,
            _ => {}
        }
        if !send(&mut io, &mut wbuf, &mut stop).await {
            return End::Closed;
        }
        if wbuf.capacity() > KEEP_BUFFER {
            wbuf = Vec::with_capacity(1024);
        }
        if !whole || !keep_alive || stop.stopping() {
            // TLS: close_notify before the end, unless the answer broke off (the client must
            // not take a cut body for a whole one). Plain TCP: dropping the socket sends the
            // FIN (a shutdown first would add a system call and change nothing).
            if info.tls && whole {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            }
            return End::Closed;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ours(raw: &str) -> Result<Option<Head>, NotOurs> {
        parse(raw.as_bytes(), &mut Vec::new())
    }

    #[test]
    fn bodiless_origin_form_requests_are_ours() {
        let h = ours("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nGET")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.len,
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".len()
        );
        assert!(h.keep_alive && !h.head_request);
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        let (s, e) = h.target;
        assert_eq!(&raw[s..e], "/a?b=1");
        let (name, s, e) = &h.headers[1];
        assert_eq!((name.as_str(), &raw[*s..*e]), ("accept", "*/*"));
        assert!(ours("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(
            ours("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .is_some()
        );
        let h = ours("HEAD / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive && h.head_request);
        // HTTP/1.0: kept alive only when asked; no Host needed.
        assert!(!ours("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            ours("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n",
            "GE\0T / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(ours(raw).err(), Some(NotOurs), "{raw:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS)
        );
        assert_eq!(ours(&many).err(), Some(NotOurs));
    }

    #[test]
    fn requests_share_the_head_bytes() {
        let raw = Bytes::from_static(b"GET /p HTTP/1.1\r\nHost: h.test\r\nX-Y: z\r\n\r\n");
        let mut h = parse(&raw, &mut Vec::new()).unwrap().unwrap();
        let req = request(&mut h, &raw).unwrap();
        assert_eq!(req.uri(), "/p");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.headers()["host"], "h.test");
        assert_eq!(req.headers()["x-y"], "z");
        assert!(h.headers.is_empty());
    }

    fn head_of(
        status: u16,
        headers: &[(&str, &str)],
        exact: Option<u64>,
        version: Version,
        head_request: bool,
        keep_alive: bool,
    ) -> (String, Framing, bool) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let mut ka = keep_alive;
        let f = encode_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            &map,
            exact,
            version,
            head_request,
            &mut ka,
        );
        (String::from_utf8(out).unwrap(), f, ka)
    }

    #[test]
    fn response_heads_say_how_the_body_goes() {
        let date = [("date", "Mon, 07 Dec 2026 09:00:00 GMT")];
        // Exact size: a length is added.
        let (h, f, ka) = head_of(404, &date, Some(4), Version::HTTP_11, false, true);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\ndate: Mon, 07 Dec 2026 09:00:00 GMT\r\ncontent-length: 4\r\n\r\n"
        );
        assert_eq!((f, ka), (Framing::Length(4), true));
        // A length given is kept; a Connection header is ours to write.
        let (h, f, _) = head_of(
            200,
            &[("content-length", "19"), ("connection", "x"), date[0]],
            Some(1),
            Version::HTTP_11,
            false,
            false,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ncontent-length: 19\r\ndate: Mon, 07 Dec 2026 09:00:00 GMT\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(19));
        // Unknown length: chunked for HTTP/1.1, until close for HTTP/1.0.
        let (h, f, ka) = head_of(200, &date, None, Version::HTTP_11, false, true);
        assert!(h.ends_with("transfer-encoding: chunked\r\n\r\n"), "{h}");
        assert_eq!((f, ka), (Framing::Chunked, true));
        let (h, f, ka) = head_of(200, &date, None, Version::HTTP_10, false, true);
        assert!(h.ends_with(" GMT\r\n\r\n"), "{h}");
        assert_eq!((f, ka), (Framing::Close, false));
        // HEAD, 204, 304, 1xx: no body; a 204 loses its length.
        let (h, f, _) = head_of(
            200,
            &[("content-length", "4"), date[0]],
            Some(0),
            Version::HTTP_11,
            true,
            true,
        );
        assert!(h.contains("content-length: 4\r\n"), "{h}");
        assert_eq!(f, Framing::None);
        // HEAD of one of our own pages: the length its GET would have.
        let (h, f, _) = head_of(404, &date, Some(7), Version::HTTP_11, true, true);
        assert!(h.contains("content-length: 7\r\n"), "{h}");
        assert_eq!(f, Framing::None);
        let (h, f, _) = head_of(
            204,
            &[("content-length", "0"), date[0]],
            Some(0),
            Version::HTTP_11,
            false,
            true,
        );
        assert!(!h.contains("content-length"), "{h}");
        assert_eq!(f, Framing::None);
        // No length of ours on a 304 (it would have to be the 200's) nor on a 204 answering
        // a HEAD.
        let (h, f, _) = head_of(304, &date, Some(0), Version::HTTP_11, false, true);
        assert!(!h.contains("content-length"), "{h}");
        assert_eq!(f, Framing::None);
        let (h, f, _) = head_of(204, &date, Some(0), Version::HTTP_11, true, true);
        assert!(!h.contains("content-length"), "{h}");
        assert_eq!(f, Framing::None);
        // HTTP/1.0 kept alive: said so.
        let (h, _, ka) = head_of(200, &date, Some(1), Version::HTTP_10, false, true);
        assert!(h.ends_with("connection: keep-alive\r\n\r\n") && ka, "{h}");
        // A Date is added when missing.
        let (h, _, _) = head_of(200, &[], Some(1), Version::HTTP_11, false, true);
        assert!(
            h.contains("\r\ndate: ") && h.ends_with(" GMT\r\n\r\n"),
            "{h}"
        );
    }

    #[test]
    fn frames_are_framed() {
        let mut out = Vec::new();
        frame_into(&mut out, Framing::Chunked, b"");
        assert!(out.is_empty(), "an empty chunk would end the body");
        frame_into(&mut out, Framing::Chunked, &[b'x'; 26]);
        assert_eq!(out, [&b"1a\r\n"[..], &[b'x'; 26], b"\r\n"].concat());
        out.clear();
        frame_into(&mut out, Framing::Length(3), b"ab");
        frame_into(&mut out, Framing::Close, b"c");
        frame_into(&mut out, Framing::None, b"d");
        assert_eq!(out, b"abc");
        out.clear();
        chunk_head(&mut out, 0x10000);
        assert_eq!(out, b"10000\r\n");
        let mut d = Vec::new();
        write_uint(&mut d, 0);
        write_uint(&mut d, 18_446_744_073_709_551_615);
        assert_eq!(d, b"018446744073709551615");
    }

    #[test]
    fn a_head_is_parsed_again_only_when_it_can_have_ended() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for n in 0..head.len() {
            assert!(!may_end_head(&head[..n], 0), "{n}");
        }
        assert!(may_end_head(head, 0));
        // Only the new bytes (and the three before them) are looked at.
        assert!(may_end_head(head, head.len() - 1));
        assert!(may_end_head(head, head.len()));
        assert!(!may_end_head(b"\n\r\nGET / HTTP/1.1\r\nHost", 8));
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: x\n\n", 20));
        assert!(may_end_head(b"GET / HTTP/1.1\r\nHost: x\r\n\n", 26));
        assert!(!may_end_head(b"", 0));
        assert!(!may_end_head(b"\n", 5));
    }

    #[test]
    fn content_length_zero_in_any_spelling_httparse_keeps_is_no_body() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length:  0 \r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            // Bare line feeds, as hyper's parser (the same httparse) accepts them.
            "GET / HTTP/1.1\nHost: x\n\n",
        ] {
            assert!(ours(raw).unwrap().is_some(), "{raw:?}");
        }
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert_eq!(ours(raw).err(), Some(NotOurs), "{raw:?}");
        }
    }
}
