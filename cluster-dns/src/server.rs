//! The sockets: UDP (several sockets per address with SO_REUSEPORT, one task each; answers
//! from the zone are sent from the receiving task, questions for upstream get a task of their
//! own, at most `max_forwards` at once) and TCP (length-prefixed, several questions per
//! connection, idle and read timeouts, a bounded number of connections).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::cache::{Cache, CacheLimits, Cached};
use crate::fast;
use crate::index::Index;
use crate::metrics::{AnswerLabels, DnsMetrics};
use crate::respond::{self, Parsed, Plan};
use crate::upstream::Upstream;
use crate::Error;

/// Open TCP connections at most; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection without a new question for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Reading one question or writing one answer over TCP may take this long.
pub const TCP_IO: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What the sockets share: the current zone, the cache, the upstream resolvers.
#[derive(Debug)]
pub struct Shared {
    /// The zone and its generation (bumped on every swap: the fast path's kept answers are
    /// per generation).
    index: RwLock<(u64, Arc<Index>)>,
    cache: Mutex<Cache>,
    upstream: Upstream,
    metrics: DnsMetrics,
    forwards: Arc<Semaphore>,
}

/// The first step of handling a question.
#[derive(Debug)]
pub enum Step {
    /// The bytes to send back (`None`: nothing).
    Done(Option<Vec<u8>>),
    /// The complete answer from the zone (the fast path may keep it).
    Zone(Vec<u8>),
    /// An answer from the upstream cache whose records live at least this many more seconds
    /// (the fast path may keep it briefly).
    Cached(Vec<u8>, u32),
    /// The answer needs the upstream resolvers: [`Shared::finish`].
    Upstream(Box<Message>, Box<Plan>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(
        index: Index,
        cache: CacheLimits,
        upstream: Upstream,
        metrics: DnsMetrics,
        max_forwards: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            index: RwLock::new((0, Arc::new(index))),
            cache: Mutex::new(Cache::new(cache)),
            upstream,
            metrics,
            forwards: Arc::new(Semaphore::new(max_forwards.max(1))),
        })
    }

    /// Swaps in a new zone; questions in flight finish on the old one.
    pub fn set_index(&self, ix: Index) {
        let ix = Arc::new(ix);
        let mut cur = self.index.write().unwrap_or_else(|p| p.into_inner());
        *cur = (cur.0.wrapping_add(1), ix);
    }

    pub fn index(&self) -> Arc<Index> {
        self.current().1
    }

    /// The zone's generation and the zone.
    pub fn current(&self) -> (u64, Arc<Index>) {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    fn count(
        &self,
        req: Option<&Message>,
        msg_rcode: hickory_proto::op::ResponseCode,
        t: Transport,
    ) {
        let r#type = req
            .and_then(|r| r.queries.first())
            .map_or("other", |q| respond::type_label(q.query_type()));
        self.metrics
            .responses
            .get_or_create(&AnswerLabels {
                r#type,
                rcode: respond::rcode_label(msg_rcode),
                proto: t.label(),
            })
            .inc();
    }

    fn limit(req: &Message, t: Transport) -> usize {
        match t {
            Transport::Udp => respond::udp_limit(req),
            Transport::Tcp => usize::from(u16::MAX),
        }
    }

    /// Answers from the zone, or says the upstream resolvers are needed.
    pub fn handle_local(&self, buf: &[u8], t: Transport) -> Step {
        self.handle_with(&self.index(), buf, t)
    }

    /// [`Shared::handle_local`] on a zone the caller already holds. A question for outside
    /// names whose answer is in the cache is answered here too.
    pub fn handle_with(&self, ix: &Index, buf: &[u8], t: Transport) -> Step {
        match respond::parse(buf) {
            Parsed::Drop => {
                self.metrics.dropped.inc();
                Step::Done(None)
            }
            Parsed::Error(bytes, rcode) => {
                self.count(None, rcode, t);
                Step::Done(Some(bytes))
            }
            Parsed::Query(req) => match respond::plan(ix, &req) {
                Plan::Reply(m) => {
                    self.count(Some(&req), m.metadata.response_code, t);
                    Step::Zone(respond::encode(&m, Self::limit(&req, t)))
                }
                Plan::Forward => match self.cached(&req.queries[0]) {
                    Some(c) => {
                        let m = respond::from_upstream(&req, &c);
                        self.count(Some(&req), m.metadata.response_code, t);
                        let ttl = m.all_sections().map(|r| r.ttl).min().unwrap_or(0);
                        Step::Cached(respond::encode(&m, Self::limit(&req, t)), ttl)
                    }
                    None => Step::Upstream(req, Box::new(Plan::Forward)),
                },
                plan => Step::Upstream(req, Box::new(plan)),
            },
        }
    }

    /// Completes an answer that needs the upstream resolvers.
    pub async fn finish(&self, req: Box<Message>, plan: Box<Plan>, t: Transport) -> Vec<u8> {
        let msg = match *plan {
            Plan::Reply(m) => m,
            Plan::Forward => match self.resolve(&req.queries[0]).await {
                Some(c) => respond::from_upstream(&req, &c),
                None => respond::servfail(&req),
            },
            Plan::Chase { partial, target } => {
                let mut q = Query::query(target, req.queries[0].query_type());
                q.set_query_class(req.queries[0].query_class());
                let up = self.resolve(&q).await;
                respond::chase_done(partial, up.as_ref())
            }
        };
        self.count(Some(&req), msg.metadata.response_code, t);
        respond::encode(&msg, Self::limit(&req, t))
    }

    /// SERVFAIL bytes for a question that may not go upstream now.
    fn refuse_forward(&self, req: &Message, t: Transport) -> Vec<u8> {
        self.metrics.forwards_refused.inc();
        let m = respond::servfail(req);
        self.count(Some(req), m.metadata.response_code, t);
        respond::encode(&m, Self::limit(req, t))
    }

    /// The cached answer to `q`, if there is one.
    fn cached(&self, q: &Query) -> Option<Cached> {
        let c = lock(&self.cache).get(&respond::cache_key(q), Instant::now())?;
        self.metrics.cache_hits.inc();
        Some(c)
    }

    /// Counts an answer of the fast path.
    fn count_quick(&self, qtype: u16, answer: &[u8], t: Transport) {
        let rcode = ResponseCode::from_low(answer.get(3).map_or(0, |b| b & 0x0f));
        self.metrics
            .responses
            .get_or_create(&AnswerLabels {
                r#type: respond::type_label(RecordType::from(qtype)),
                rcode: respond::rcode_label(rcode),
                proto: t.label(),
            })
            .inc();
    }

    /// The answer to `q` from the cache or the upstream resolvers (`None`: none answered).
    pub async fn resolve(&self, q: &Query) -> Option<Cached> {
        let key = respond::cache_key(q);
        if let Some(c) = self.cached(q) {
            return Some(c);
        }
        self.metrics.cache_misses.inc();
        let started = Instant::now();
        match self
            .upstream
            .query(q.name(), q.query_type(), q.query_class())
            .await
        {
            Ok(m) => {
                self.metrics
                    .upstream_seconds
                    .observe(started.elapsed().as_secs_f64());
                let mut cache = lock(&self.cache);
                cache.insert(key, &m, Instant::now());
                self.metrics.cache_entries.set(cache.len() as i64);
                Some(Cached::from_message(&m))
            }
            Err(e) => {
                self.metrics.upstream_errors.inc();
                tracing::debug!(error = %e, name = %q.name(), "cluster DNS: no upstream answer");
                None
            }
        }
    }
}

/// Datagrams taken (and answers sent) per system call.
pub const UDP_BATCH: usize = 32;

/// Receive buffers for `recvmmsg` (nix: no unsafe here). The message headers hold raw
/// pointers (not `Send`), so they are made per call, never kept across an await.
struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// (length, sender) of each datagram of the last batch.
    got: Vec<(usize, Option<SockaddrStorage>)>,
}

impl RecvBatch {
    fn new(n: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; 4096]).collect(),
            got: Vec::with_capacity(n),
        }
    }

    /// Takes what is queued (up to the batch size) without blocking.
    fn recv(&mut self, fd: RawFd) -> std::io::Result<usize> {
        self.got.clear();
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(iovs.len(), None);
        let res = recvmmsg(
            fd,
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        for m in res {
            self.got.push((m.bytes, m.address));
        }
        Ok(self.got.len())
    }
}

/// Sends as many of `out` as one `sendmmsg` takes; returns how many went.
fn send_batch(fd: RawFd, out: &[(Vec<u8>, SockaddrStorage)]) -> std::io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(out.len(), None);
    let iovs: Vec<[IoSlice<'_>; 1]> = out.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = out.iter().map(|(_, a)| Some(*a)).collect();
    let cmsgs: [ControlMessage<'_>; 0] = [];
    let res = sendmmsg(
        fd,
        &mut headers,
        iovs.iter(),
        addrs,
        cmsgs,
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    Ok(res.count())
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Sends every answer of a batch, in as few system calls as the socket allows; a datagram the
/// kernel refuses (e.g. no route back) is skipped.
async fn send_all(sock: &UdpSocket, out: &[(Vec<u8>, SockaddrStorage)]) {
    let fd = sock.as_raw_fd();
    let mut sent = 0;
    while sent < out.len() {
        let end = (sent + UDP_BATCH).min(out.len());
        match sock.try_io(Interest::WRITABLE, || send_batch(fd, &out[sent..end])) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if sock.writable().await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cluster DNS: UDP send failed; skipping one answer");
                sent += 1;
            }
        }
    }
}

/// Serves `sock` on a thread of its own with a single-threaded runtime until `stop` turns
/// true: the thread that wakes for a datagram is the one that answers it (no hand-off
/// between the runtime's I/O driver and a worker), and nothing else flanneld runs can delay
/// an answer. Questions that go upstream become tasks of that runtime.
pub fn spawn_udp_thread(
    sock: std::net::UdpSocket,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    name: String,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new().name(name).spawn(move || {
        rt.block_on(async move {
            let sock = match UdpSocket::from_std(sock) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::error!(error = %e, "cluster DNS: cannot serve a UDP socket");
                    return;
                }
            };
            tokio::select! {
                _ = serve_udp(sock, shared) => {}
                _ = async {
                    while !*stop.borrow() {
                        if stop.changed().await.is_err() {
                            break;
                        }
                    }
                } => {}
            }
        });
    })
}

/// Serves one UDP socket until the task is aborted: a batch of questions per `recvmmsg`,
/// their answers from the zone in one `sendmmsg`.
pub async fn serve_udp(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let fd = sock.as_raw_fd();
    let mut batch = RecvBatch::new(UDP_BATCH);
    let mut out: Vec<(Vec<u8>, SockaddrStorage)> = Vec::with_capacity(UDP_BATCH);
    let mut kept = fast::Answers::default();
    loop {
        if let Err(e) = sock.readable().await {
            tracing::debug!(error = %e, "cluster DNS: UDP socket not readable");
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let n = match sock.try_io(Interest::READABLE, || batch.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "cluster DNS: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        out.clear();
        let (generation, ix) = shared.current();
        kept.zone(generation);
        let now = Instant::now();
        for i in 0..n {
            let (len, Some(peer)) = batch.got[i] else {
                continue;
            };
            let buf = &batch.bufs[i][..len.min(batch.bufs[i].len())];
            let quick = fast::parse(buf);
            if let Some(answer) = quick.as_ref().and_then(|q| kept.answer(q, now)) {
                shared.count_quick(
                    quick.as_ref().map_or(0, |q| q.qtype),
                    &answer,
                    Transport::Udp,
                );
                out.push((answer, peer));
                continue;
            }
            match shared.handle_with(&ix, buf, Transport::Udp) {
                Step::Zone(answer) => {
                    if let Some(q) = &quick {
                        kept.keep(q, &answer);
                    }
                    out.push((answer, peer));
                }
                Step::Cached(answer, ttl) => {
                    if let (Some(q), true) = (&quick, ttl > fast::UPSTREAM_KEEP.as_secs() as u32) {
                        kept.keep_until(q, &answer, now + fast::UPSTREAM_KEEP);
                    }
                    out.push((answer, peer));
                }
                Step::Done(Some(answer)) => out.push((answer, peer)),
                Step::Done(None) => {}
                Step::Upstream(req, plan) => {
                    let Some(to) = std_addr(&peer) else {
                        continue;
                    };
                    match shared.forwards.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let sock = sock.clone();
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let answer = shared.finish(req, plan, Transport::Udp).await;
                                let _ = sock.send_to(&answer, to).await;
                                drop(permit);
                            });
                        }
                        Err(_) => out.push((shared.refuse_forward(&req, Transport::Udp), peer)),
                    }
                }
            }
        }
        send_all(&sock, &out).await;
    }
}

/// Accepts TCP connections until the task is aborted.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "cluster DNS: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            serve_tcp_conn(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_conn(mut s: TcpStream, shared: &Shared) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => return,
        };
        let mut buf = vec![0u8; len];
        if !matches!(
            tokio::time::timeout(TCP_IO, s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let out = match shared.handle_local(&buf, Transport::Tcp) {
            Step::Done(Some(out)) | Step::Zone(out) | Step::Cached(out, _) => out,
            Step::Done(None) => return,
            Step::Upstream(req, plan) => match shared.forwards.clone().try_acquire_owned() {
                Ok(_permit) => shared.finish(req, plan, Transport::Tcp).await,
                Err(_) => shared.refuse_forward(&req, Transport::Tcp),
            },
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        if !matches!(
            tokio::time::timeout(TCP_IO, s.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// The bound sockets.
#[derive(Debug)]
pub struct Listeners {
    /// Plain sockets: each is served on a thread of its own ([`spawn_udp_thread`]), whose
    /// runtime registers it.
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<TcpListener>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, Error> {
    let what = || format!("binding UDP {addr}");
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(io(what()))?;
    s.set_reuse_port(true).map_err(io(what()))?;
    // Room for bursts while a task is busy (capped by net.core.rmem_max).
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_nonblocking(true).map_err(io(what()))?;
    s.bind(&addr.into()).map_err(io(what()))?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let what = || format!("binding TCP {addr}");
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(io(what()))?;
    s.set_reuse_address(true).map_err(io(what()))?;
    s.set_nonblocking(true).map_err(io(what()))?;
    s.bind(&addr.into()).map_err(io(what()))?;
    s.listen(1024).map_err(io(what()))?;
    Ok(s.into())
}

/// Binds UDP (`per_addr` sockets each) and TCP on every address. Port 0 picks one free port
/// per address, the same for UDP and TCP.
pub fn bind(addrs: &[SocketAddr], per_addr: usize) -> Result<Listeners, Error> {
    let mut l = Listeners {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for &addr in addrs {
        // Port 0: the port UDP got may be taken for TCP; then another is tried.
        let tries = if addr.port() == 0 { 20 } else { 1 };
        let mut attempt = 0;
        let (first, bound, tcp) = loop {
            attempt += 1;
            let first = udp_socket(addr)?;
            let bound = first
                .local_addr()
                .map_err(io(format!("binding UDP {addr}")))?;
            match tcp_listener(bound) {
                Ok(t) => break (first, bound, t),
                Err(Error::Io { source, .. })
                    if attempt < tries && source.kind() == std::io::ErrorKind::AddrInUse => {}
                Err(e) => return Err(e),
            }
        };
        let mut socks = vec![first];
        for _ in 1..per_addr.max(1) {
            socks.push(udp_socket(bound)?);
        }
        l.udp.extend(socks);
        l.tcp
            .push(TcpListener::from_std(tcp).map_err(io(format!("binding TCP {addr}")))?);
    }
    Ok(l)
}
