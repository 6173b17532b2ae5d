//! Connections to endpoints: HTTP/1.1 (hyper's `client::conn::http1`), kept alive in a pool of
//! our own and driven inside the request's own task. hyper-util's pooled client runs every
//! upstream connection as a task of its own, so each request crossed two task hand-offs (the
//! request to the connection's task, the answer back); here the request's task polls the
//! connection while it waits for the answer, and the response body polls it while the client
//! side streams it, so a request is one task from the client's bytes to the upstream's and
//! back (as nginx's event loop does it). A connection goes back to the pool when its response
//! body has ended and the connection is ready for the next request; a body dropped early
//! closes it. A connection lives in a `Box`: it is moved between the pool, the request and
//! the body, and its state is large.
//!
//! Upgrades (`Connection: upgrade`) take a fresh connection run as a task of its own (hyper
//! hands the upgraded stream over from there) and never come back to the pool.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Conn = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One upstream connection: the request sender and the connection future it feeds.
pub struct UpConn {
    send: http1::SendRequest<Full<Bytes>>,
    conn: Conn,
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
    NotSent(Box<Request<Full<Bytes>>>),
    /// The upstream's response head was larger than the limit (nginx: "upstream sent too big
    /// header").
    HeaderTooBig,
    /// The exchange failed after the request may have gone out.
    Failed(String),
}

#[derive(Default)]
struct Idles {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
}

/// Idle connections per endpoint, bounded, each for at most `idle_timeout`.
pub struct Pool {
    idle: Mutex<Idles>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
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
            builder,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            let period = (idle_timeout / 2).max(Duration::from_millis(100));
            rt.spawn(sweep(weak, period));
        }
        pool
    }

    /// An idle connection to `addr`, most recently used first.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Box<UpConn>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.by_addr.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout && !i.conn.send.is_closed() {
                let mut c = i.conn;
                c.reused = true;
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, conn: Box<UpConn>) {
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
            list.retain(|i| i.since.elapsed() < timeout && !i.conn.send.is_closed());
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
        let tcp = self.tcp(addr).await?;
        let (send, conn) = self
            .builder
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        Ok(Box::new(UpConn {
            send,
            conn,
            addr,
            reused: false,
        }))
    }

    /// A new connection for an upgrade, run as a task of its own; the response's upgrade
    /// (`hyper::upgrade::on`) yields the stream after a 101.
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

fn classify(e: hyper::Error) -> SendError {
    if e.is_parse_too_large() {
        SendError::HeaderTooBig
    } else {
        SendError::Failed(e.to_string())
    }
}

impl UpConn {
    /// Sends `req` and waits for the response head, polling the connection in this task.
    /// The body of the answer keeps polling it, and gives it back to `pool` at its end.
    pub async fn send(
        mut self: Box<Self>,
        req: Request<Full<Bytes>>,
        pool: &Arc<Pool>,
    ) -> Result<Response<UpBody>, SendError> {
        let mut sent = std::pin::pin!(self.send.try_send_request(req));
        let mut conn_done = false;
        let result = std::future::poll_fn(|cx| {
            if !conn_done {
                if let Poll::Ready(r) = Pin::new(&mut self.conn).poll(cx) {
                    conn_done = true;
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "ingress: upstream connection ended");
                    }
                }
            }
            match sent.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                // The connection ended without answering the request.
                Poll::Pending if conn_done => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let resp = match result {
            Some(Ok(resp)) => resp,
            Some(Err(mut e)) => {
                return Err(match e.take_message() {
                    Some(req) => SendError::NotSent(Box::new(req)),
                    None => classify(e.into_error()),
                })
            }
            None => {
                // The connection ended (the upstream closed it while it sat idle) without
                // taking the request: dropping it hands the queued request back.
                let UpConn { conn, .. } = *self;
                drop(conn);
                return Err(match sent.await {
                    Err(mut e) => match e.take_message() {
                        Some(req) => SendError::NotSent(Box::new(req)),
                        None => classify(e.into_error()),
                    },
                    Ok(_) => SendError::Failed("an answer after the connection ended".into()),
                });
            }
        };
        let (parts, inner) = resp.into_parts();
        let mut body = UpBody {
            inner,
            conn: (!conn_done).then_some(self),
            pool: Arc::downgrade(pool),
        };
        if body.inner.is_end_stream() {
            // No body (HEAD, 204, 304, Content-Length: 0): the connection is free now.
            std::future::poll_fn(|cx| {
                body.release(cx);
                Poll::Ready(())
            })
            .await;
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// A response body from an upstream; polls the upstream connection while it is read and
/// gives the connection back to the pool at its end.
pub struct UpBody {
    inner: Incoming,
    conn: Option<Box<UpConn>>,
    pool: Weak<Pool>,
}

impl std::fmt::Debug for UpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpBody").field("conn", &self.conn).finish()
    }
}

impl UpBody {
    /// A body whose connection is run elsewhere (an upgrade's).
    pub fn detached(inner: Incoming) -> UpBody {
        UpBody {
            inner,
            conn: None,
            pool: Weak::new(),
        }
    }

    /// The response is complete: one more poll lets the connection take the next request;
    /// pooled when it is ready for one, closed otherwise.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        if Pin::new(&mut c.conn).poll(cx).is_ready() {
            return;
        }
        if c.send.is_ready() {
            if let Some(pool) = self.pool.upgrade() {
                pool.checkin(c);
            }
        }
    }

    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = &mut self.conn {
            if let Poll::Ready(r) = Pin::new(&mut c.conn).poll(cx) {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "ingress: upstream connection ended");
                }
                self.conn = None;
            }
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        if r.is_pending() && this.conn.is_some() {
            this.drive(cx);
            r = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &r {
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(cx),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
