//! Listeners: plain HTTP, HTTPS (rustls, certificate by SNI, ALPN h2/http1.1), each connection
//! served by hyper's auto builder (HTTP/1.1 or HTTP/2, upgrades allowed), bounded in header
//! size and header time; and the health/metrics listener. On stop, listeners close and open
//! connections are asked to finish (graceful shutdown), bounded by `grace`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::proxy::{ConnInfo, Proxy};
use crate::snapshot::Snapshot;

/// How long open connections get to finish after a stop.
pub const GRACE: Duration = Duration::from_secs(10);

fn builder(proxy: &Proxy) -> auto::Builder<TokioExecutor> {
    let o = proxy.options();
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(o.header_timeout)
        .max_buf_size(o.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(o.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    b
}

async fn serve_io<I>(
    io: I,
    b: &auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    info: ConnInfo,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let p = proxy.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let p = p.clone();
        async move { Ok::<_, Infallible>(p.handle(req, info).await) }
    });
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %info.peer, error = %e, "ingress: connection ended with an error");
            }
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACE, conn).await;
        }
    }
}

/// Accepts on `listener` until `stop`; TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accept = stop.clone();
    // One builder for every connection (it holds the options, the executor and the timer).
    let b = Arc::new(builder(&proxy));
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
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(peer);
        let proxy = proxy.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        let metrics_conns = proxy.metrics().connections.clone();
        let b = b.clone();
        tokio::spawn(async move {
            metrics_conns.inc();
            let info = ConnInfo {
                peer,
                local,
                tls: tls.is_some(),
            };
            match tls {
                None => serve_io(tcp, &b, proxy, info, stop).await,
                Some(acceptor) => {
                    let timeout = proxy.options().header_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_io(stream, &b, proxy, info, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "ingress: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "ingress: TLS handshake timed out"),
                    }
                }
            }
            metrics_conns.dec();
        });
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

/// Binds a listener (the error names the address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}
