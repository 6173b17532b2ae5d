//! Listeners: plain HTTP, HTTPS (rustls, certificate by SNI, ALPN h2/http1.1), each connection
//! served by hyper's HTTP/2 server (by ALPN, or by the first bytes: prior knowledge) or as
//! HTTP/1.1: by our own server for bodiless requests ([`crate::h1`]) and by hyper's from the
//! first request that needs it (bodies, upgrades, anything unusual), bounded in header size and
//! header time; and the health/metrics listener. On stop, listeners close and open
//! connections are asked to finish (graceful shutdown), bounded by `grace`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::h1;
use crate::proxy::{BoxError, ConnInfo, Proxy};
use crate::snapshot::Snapshot;

/// How long open connections get to finish after a stop.
pub const GRACE: Duration = Duration::from_secs(10);

/// The HTTP/1.1 and HTTP/2 server settings of a listener (built once, used by every
/// connection).
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_timeout: Duration,
    /// Our own HTTP/1.1 server first ([`crate::h1`]), or hyper's for every request.
    own_http1: bool,
}

impl Builders {
    fn new(proxy: &Proxy) -> Builders {
        let o = proxy.options();
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(o.header_timeout)
            .max_buf_size(o.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(o.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30));
        Builders {
            h1,
            h2,
            header_timeout: o.header_timeout,
            own_http1: o.own_http1,
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes of a connection can still become the HTTP/2 preface (`Some(true)`
/// once all of it is there), or cannot (`Some(false)`: HTTP/1); `None`: too short to tell.
fn preface(first: &[u8]) -> Option<bool> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Bytes read from a connection to tell HTTP/1 from HTTP/2, given back to hyper's server
/// before anything else the connection sends.
struct Prefixed<I> {
    first: BytesMut,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first.split_to(n));
            if this.first.is_empty() {
                // Gone for good: no memory held by a kept-alive connection.
                this.first = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads the first bytes of `io` until they tell HTTP/2's preface from HTTP/1 (one read
/// usually holds a whole HTTP/1 request head, which is then parsed without a read of its own);
/// `None` when the client closed or sent nothing in time.
async fn sniff<I: AsyncRead + Unpin>(mut io: I, timeout: Duration) -> Option<(bool, BytesMut, I)> {
    let mut first = BytesMut::with_capacity(4096);
    let read = async {
        loop {
            first.reserve(2048);
            match io.read_buf(&mut first).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    if let Some(h2) = preface(&first) {
                        return Some(h2);
                    }
                }
            }
        }
    };
    let h2 = tokio::time::timeout(timeout, read).await.ok()??;
    Some((h2, first, io))
}

/// A connection future that can be asked to finish what it is doing and stop.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives one connection until it ends, or until `stop` (then: a graceful end within
/// [`GRACE`]).
async fn drive<C: Graceful>(conn: C, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "ingress: connection ended with an error");
            }
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful();
            let _ = tokio::time::timeout(GRACE, conn).await;
        }
    }
}

/// Serves one connection whose first bytes (already read) are `first`: HTTP/2 when `h2` says
/// so; else HTTP/1.1 by our own server ([`crate::h1`]) until a request needs hyper's (which
/// then serves the rest of the connection, upgrades included).
async fn serve_io<I>(
    io: I,
    first: BytesMut,
    h2: bool,
    b: &Builders,
    proxy: Arc<Proxy>,
    info: ConnInfo,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, first) = if h2 || !b.own_http1 {
        (io, first)
    } else {
        match h1::serve(io, first, &proxy, info, stop.clone()).await {
            h1::End::Closed => return,
            h1::End::Fallback(io, rest) => (io, rest),
        }
    };
    let io = Prefixed { first, io };
    let svc = service_fn(move |req: Request<Incoming>| {
        let p = proxy.clone();
        async move { Ok::<_, Infallible>(p.handle(req, info).await) }
    });
    if h2 {
        drive(
            b.h2.serve_connection(TokioIo::new(io), svc),
            info.peer,
            stop,
        )
        .await;
    } else {
        drive(
            b.h1.serve_connection(TokioIo::new(io), svc).with_upgrades(),
            info.peer,
            stop,
        )
        .await;
    }
}

/// Accepts on `listener` until `stop`; TLS when `tls` is given. Plain connections: HTTP/2
/// with prior knowledge when they open with its preface, else HTTP/1.1. TLS: by ALPN (`h2`,
/// `http/1.1`); without ALPN, by the first bytes as on plain connections.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accept = stop.clone();
    // One set of builders for every connection (options, executor, timer).
    let b = Arc::new(Builders::new(&proxy));
    // Only the port of the local address is used (X-Forwarded-Port): the listener's.
    let local_port = listener.local_addr().map_or(0, |a| a.port());
    let mut nodelay_inherited = None;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "ingress: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop_accept.wait_for(|s| *s).await; } => break,
        };
        // Accepted sockets inherit TCP_NODELAY from a listener made by [`bind`]; one made
        // elsewhere gets it set per connection.
        if !*nodelay_inherited.get_or_insert_with(|| tcp.nodelay().unwrap_or(false)) {
            let _ = tcp.set_nodelay(true);
        }
        let info = ConnInfo {
            peer,
            local_port,
            tls: tls.is_some(),
        };
        let proxy = proxy.clone();
        let stop = stop.clone();
        let b = b.clone();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let conns = proxy.metrics().connections.clone();
                    conns.inc();
                    if let Some((h2, first, io)) = sniff(tcp, b.header_timeout).await {
                        serve_io(io, first, h2, &b, proxy, info, stop).await;
                    }
                    conns.dec();
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let conns = proxy.metrics().connections.clone();
                    conns.inc();
                    match tokio::time::timeout(b.header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => match stream.get_ref().1.alpn_protocol() {
                            Some(b"h2") => {
                                serve_io(stream, BytesMut::new(), true, &b, proxy, info, stop).await
                            }
                            Some(_) => {
                                serve_io(stream, BytesMut::new(), false, &b, proxy, info, stop)
                                    .await
                            }
                            None => {
                                if let Some((h2, first, io)) = sniff(stream, b.header_timeout).await
                                {
                                    serve_io(io, first, h2, &b, proxy, info, stop).await;
                                }
                            }
                        },
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "ingress: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "ingress: TLS handshake timed out"),
                    }
                    conns.dec();
                });
            }
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// `/healthz` (200 once the first snapshot from the registry is in, 503 before) and `/metrics`.
pub async fn serve_health(
    listener: TcpListener,
    registry: Arc<Registry>,
    snap: watch::Receiver<Arc<Snapshot>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let registry = registry.clone();
        let snap = snap.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                let snap = snap.clone();
                async move {
                    let r = match req.uri().path() {
                        "/healthz" => {
                            if snap.borrow().generation > 0 {
                                text(StatusCode::OK, "ok\n".into(), "text/plain")
                            } else {
                                text(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "waiting for the registry\n".into(),
                                    "text/plain",
                                )
                            }
                        }
                        "/metrics" => {
                            let mut s = String::new();
                            match prometheus_client::encoding::text::encode(&mut s, &registry) {
                                Ok(()) => text(
                                    StatusCode::OK,
                                    s,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                                Err(_) => text(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    String::new(),
                                    "text/plain",
                                ),
                            }
                        }
                        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Binds a listener (the error names the address) with `TCP_NODELAY`, which the connections
/// it accepts inherit (Linux): no socket option to set per connection.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listen = || {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.set_nodelay(true)?;
        sock.bind(addr)?;
        sock.listen(1024)
    };
    listen().map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_h2_preface_is_told_from_http1() {
        assert_eq!(preface(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(preface(b"P"), None);
        assert_eq!(preface(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(preface(b"PRI * HTTP/1.1\r\n"), Some(false));
        assert_eq!(preface(H2_PREFACE), Some(true));
        assert_eq!(
            preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"),
            Some(true)
        );
    }

    #[tokio::test]
    async fn sniffed_bytes_are_read_again_and_accepted_connections_have_nodelay() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let to = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(to).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut c, b"PRI * HTTP/2.0\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::io::AsyncWriteExt::write_all(&mut c, b"\r\nSM\r\n\r\nrest")
                .await
                .unwrap();
            c
        });
        let (tcp, _) = l.accept().await.unwrap();
        // Inherited from the listener, not set on the connection.
        assert!(tcp.nodelay().unwrap());
        let (h2, first, io) = sniff(tcp, Duration::from_secs(5)).await.unwrap();
        assert!(h2);
        let mut io = Prefixed { first, io };
        let _c = client.await.unwrap();
        let mut all = vec![0u8; 28];
        io.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..24], H2_PREFACE);
        assert_eq!(&all[24..], b"rest");
        // HTTP/1 and a client that sends nothing.
        let c = tokio::net::TcpStream::connect(to).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        assert!(sniff(tcp, Duration::from_millis(50)).await.is_none());
        drop(c);
        let mut c = tokio::net::TcpStream::connect(to).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let (h2, first, io) = sniff(tcp, Duration::from_secs(5)).await.unwrap();
        assert!(!h2);
        let mut io = Prefixed { first, io };
        let mut all = vec![0u8; 18];
        io.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");
    }
}
