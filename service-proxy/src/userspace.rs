//! Userspace mode: nft redirects each service address and port (and node port) to a local
//! listener of this process, which connects to an endpoint itself. Unlike the kernel modes
//! it can try the next endpoint when a connect fails, at the price of copying every byte
//! through the process and of hiding the client's address from the endpoint.
//!
//! Per service port there is one listener for ClusterIP traffic and, when the Service has a
//! node port or external IPs, one for external traffic (they may use different endpoint
//! lists under `internalTrafficPolicy`/`externalTrafficPolicy: Local`). TCP: round robin
//! (or the client's affinity endpoint), connect with a timeout, on failure the next one;
//! bounded number of open connections. UDP: one upstream socket per client address,
//! closed after an idle timeout or when its endpoint goes; bounded number of sessions.
//!
//! Both families: IPv4 service ports are redirected by `ip flannel-proxy` to IPv4 listeners,
//! and, when IPv6 is on ([`UserspaceProxy::with_ipv6`]), IPv6 ones by `ip6 flannel-proxy` to
//! IPv6-only listeners (`IPV6_V6ONLY`, so each table's guard covers exactly its listeners).
//! The policy gate, when set, judges every relay of either family the same way.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use registry::{IpFamily, Protocol};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use ::nft::Runner;

use crate::metrics::ProxyMetrics;
use crate::model::{Endpoint, PortId, ServicePort};
use crate::nft::{node_addresses, table_family, TABLE};

/// The relay gate (network policy's decision per relay); defined with the registry so that
/// the policy module need not depend on the proxy.
pub use registry::gate::{Client, Gate};

#[derive(Debug, Clone)]
pub struct UserspaceOptions {
    /// Open TCP connections, all services together; more are closed at once.
    pub max_connections: usize,
    /// UDP client sessions per service port; datagrams of new clients beyond are dropped.
    pub max_udp_sessions: usize,
    pub udp_idle_timeout: Duration,
    /// Time allowed for one endpoint to accept a connection before the next is tried.
    pub connect_timeout: Duration,
    /// Judges each relay before it is opened (network policy); None: every relay is allowed.
    pub gate: Option<Arc<dyn Gate>>,
}

impl Default for UserspaceOptions {
    fn default() -> Self {
        UserspaceOptions {
            max_connections: 10_000,
            max_udp_sessions: 4096,
            udp_idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            gate: None,
        }
    }
}

/// The set of listener ports (`proto . port`) in userspace mode.
pub const LISTENERS_SET: &str = "userspace-listeners";

/// Which traffic a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    Cluster,
    External,
}

/// Endpoint choice shared between a listener and the syncer.
#[derive(Debug)]
struct Targets {
    endpoints: RwLock<Vec<SocketAddr>>,
    next: AtomicUsize,
    affinity: RwLock<Option<Duration>>,
    pinned: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl Targets {
    fn new() -> Targets {
        Targets {
            endpoints: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            affinity: RwLock::new(None),
            pinned: Mutex::new(HashMap::new()),
        }
    }

    /// The endpoints to try for `client`, in order: its affinity endpoint first when it has
    /// a live one, else round robin.
    fn order(&self, client: IpAddr) -> Vec<SocketAddr> {
        let eps = self.endpoints.read().map(|e| e.clone()).unwrap_or_default();
        if eps.is_empty() {
            return eps;
        }
        let affinity = self.affinity.read().map(|a| *a).unwrap_or(None);
        let mut start = self.next.fetch_add(1, Ordering::Relaxed) % eps.len();
        if let Some(timeout) = affinity {
            if let Ok(pinned) = self.pinned.lock() {
                if let Some((ep, at)) = pinned.get(&client) {
                    if at.elapsed() < timeout {
                        if let Some(i) = eps.iter().position(|e| e == ep) {
                            start = i;
                        }
                    }
                }
            }
        }
        eps[start..]
            .iter()
            .chain(eps[..start].iter())
            .copied()
            .collect()
    }

    fn used(&self, client: IpAddr, ep: SocketAddr) {
        let affinity = self.affinity.read().map(|a| *a).unwrap_or(None);
        if let Some(timeout) = affinity {
            if let Ok(mut pinned) = self.pinned.lock() {
                if pinned.len() > 65_536 {
                    pinned.retain(|_, (_, at)| at.elapsed() < timeout);
                }
                pinned.insert(client, (ep, Instant::now()));
            }
        }
    }

    fn set(&self, eps: Vec<SocketAddr>, affinity: Option<Duration>) {
        if let Ok(mut pinned) = self.pinned.lock() {
            pinned.retain(|_, (ep, _)| eps.contains(ep));
        }
        if let Ok(mut e) = self.endpoints.write() {
            *e = eps;
        }
        if let Ok(mut a) = self.affinity.write() {
            *a = affinity;
        }
    }

    fn is_empty(&self) -> bool {
        self.endpoints.read().map(|e| e.is_empty()).unwrap_or(true)
    }
}

/// The endpoints the client at `peer` (`local`: redirected in the output hook) may be relayed
/// to, in the order to try them; `Err(())` when there are endpoints but the gate allows none.
/// The gate judges each client/endpoint pair in the endpoint's family (a listener's endpoints
/// and clients are of its service port's family).
fn allowed_order(
    targets: &Targets,
    gate: Option<&Arc<dyn Gate>>,
    peer: IpAddr,
    local: bool,
    protocol: Protocol,
) -> Result<Vec<SocketAddr>, ()> {
    let mut order = targets.order(peer);
    let Some(gate) = gate else {
        return Ok(order);
    };
    let had = !order.is_empty();
    let client = Client { addr: peer, local };
    order.retain(|ep| gate.allows(client, *ep, protocol));
    if had && order.is_empty() {
        Err(())
    } else {
        Ok(order)
    }
}

/// Whether `addr` is an address of this node (a bind to it succeeds; IPv6 link-local
/// addresses, which need a scope to bind, count as not local).
fn is_local_addr(addr: IpAddr) -> bool {
    addr.is_loopback() || std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// What one listener should serve: protocol, endpoints, affinity timeout.
type Wanted = (Protocol, Vec<Endpoint>, Option<u32>);

type Sessions = Arc<Mutex<HashMap<SocketAddr, (SocketAddr, Arc<UdpSocket>, JoinHandle<()>)>>>;

#[derive(Debug)]
struct Listener {
    protocol: Protocol,
    local_port: u16,
    targets: Arc<Targets>,
    task: JoinHandle<()>,
    sessions: Option<Sessions>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(s) = &self.sessions {
            if let Ok(mut s) = s.lock() {
                for (_, (_, _, t)) in s.drain() {
                    t.abort();
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("binding a listener for {id}: {source}")]
    Bind { id: String, source: std::io::Error },
    #[error(transparent)]
    Nft(#[from] ::nft::Error),
}

/// The userspace proxy: listeners plus the nft redirects to them.
#[derive(Debug)]
pub struct UserspaceProxy<N> {
    nft: N,
    opts: UserspaceOptions,
    metrics: ProxyMetrics,
    conns: Arc<Semaphore>,
    listeners: BTreeMap<(PortId, Entry), Listener>,
    /// The script last applied; `None` forces a rewrite.
    applied: Option<String>,
    /// IPv6 is on: IPv6 service ports are served too.
    ipv6: bool,
}

impl<N: Runner> UserspaceProxy<N> {
    pub fn new(nft: N, opts: UserspaceOptions, metrics: ProxyMetrics) -> Self {
        UserspaceProxy {
            nft,
            conns: Arc::new(Semaphore::new(opts.max_connections)),
            opts,
            metrics,
            listeners: BTreeMap::new(),
            applied: None,
            ipv6: false,
        }
    }

    /// Serves IPv6 service ports too (in `ip6 flannel-proxy`), behind the gate when one is set.
    pub fn with_ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// Whether IPv6 service ports get listeners and the `ip6` table.
    pub fn serves_ipv6(&self) -> bool {
        self.ipv6
    }

    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// The local port serving `id`'s `entry` traffic (tests, diagnostics).
    pub fn local_port(&self, id: &PortId, entry: Entry) -> Option<u16> {
        self.listeners
            .get(&(id.clone(), entry))
            .map(|l| l.local_port)
    }

    /// Serves `ports`: listeners created, updated or closed, then the redirects rewritten.
    /// Returns how many listeners changed. IPv4 service ports are served in `ip
    /// flannel-proxy`; IPv6 ones in `ip6 flannel-proxy` when [`Self::serves_ipv6`].
    pub async fn apply(
        &mut self,
        ports: &BTreeMap<PortId, ServicePort>,
    ) -> Result<usize, UserspaceError> {
        let serve6 = self.serves_ipv6();
        let mut wanted: BTreeMap<(PortId, Entry), Wanted> = BTreeMap::new();
        for (id, sp) in ports {
            if id.family == IpFamily::Ipv6 && !serve6 {
                continue;
            }
            wanted.insert(
                (id.clone(), Entry::Cluster),
                (sp.protocol, sp.cluster_targets(), sp.affinity),
            );
            if sp.is_external() {
                let eps = if sp.external_local {
                    sp.local_endpoints().copied().collect()
                } else {
                    sp.endpoints.clone()
                };
                wanted.insert(
                    (id.clone(), Entry::External),
                    (sp.protocol, eps, sp.affinity),
                );
            }
        }
        let before = self.listeners.len();
        self.listeners
            .retain(|k, l| wanted.get(k).is_some_and(|w| w.0 == l.protocol));
        let mut changed = before - self.listeners.len();
        for (key, (protocol, eps, affinity)) in &wanted {
            // Each family's port relays to endpoints of its family only.
            let v6 = key.0.family == IpFamily::Ipv6;
            let eps: Vec<SocketAddr> = eps
                .iter()
                .filter(|e| e.ip.is_ipv6() == v6)
                .map(|e| SocketAddr::new(e.ip, e.port))
                .collect();
            let affinity = affinity.map(|t| Duration::from_secs(u64::from(t)));
            if !self.listeners.contains_key(key) {
                let l = self.listen(&key.0, *protocol).await?;
                self.listeners.insert(key.clone(), l);
                changed += 1;
            }
            if let Some(l) = self.listeners.get(key) {
                l.targets.set(eps.clone(), affinity);
                if let Some(sessions) = &l.sessions {
                    // A UDP session whose endpoint is gone is closed (the next datagram
                    // starts a new one), as conntrack entries are flushed in nftables mode.
                    if let Ok(mut s) = sessions.lock() {
                        s.retain(|_, (ep, _, task)| {
                            let keep = eps.contains(ep);
                            if !keep {
                                task.abort();
                            }
                            keep
                        });
                        self.metrics.udp_sessions.set(s.len() as i64);
                    }
                }
            }
        }
        let mut script = self.render(ports, IpFamily::Ipv4);
        if serve6 {
            script.push_str(&self.render(ports, IpFamily::Ipv6));
        }
        if self.applied.as_deref() != Some(script.as_str()) {
            self.applied = None;
            self.nft.apply(&script).await?;
            self.applied = Some(script);
        }
        Ok(changed)
    }

    /// The whole table of `family` (`ip` or `ip6 flannel-proxy`) for that family's service
    /// ports: redirects to listeners, rejects for entries without endpoints, and the guard that
    /// lets only redirected connections reach a listener.
    fn render(&self, ports: &BTreeMap<PortId, ServicePort>, family: IpFamily) -> String {
        let fam = table_family(family);
        let t = format!("{fam} {TABLE}");
        let mut s = crate::nft::skeleton_in(fam);
        // The listeners are bound to every address (a prerouting redirect goes to the
        // address of the interface the packet came in on). A new connection to a listener's
        // port that was not redirected (DNAT status unset: it was addressed to the port
        // itself, from a pod, this node or another host) is refused before it reaches the
        // listener, so nothing gets past the redirects and their policy gate.
        let mut listening: Vec<String> = self
            .listeners
            .iter()
            .filter(|((id, _), _)| id.family == family)
            .map(|(_, l)| {
                let proto = if l.protocol == Protocol::Udp {
                    "udp"
                } else {
                    "tcp"
                };
                format!("{proto} . {}", l.local_port)
            })
            .collect();
        listening.sort();
        listening.dedup();
        let _ = writeln!(
            s,
            "add set {t} {LISTENERS_SET} {{ type inet_proto . inet_service; }}"
        );
        if !listening.is_empty() {
            let _ = writeln!(
                s,
                "add element {t} {LISTENERS_SET} {{ {} }}",
                listening.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "add chain {t} filter-input {{ type filter hook input priority filter; policy accept; }}"
        );
        let _ = writeln!(
            s,
            "add rule {t} filter-input ct state new meta l4proto . th dport @{LISTENERS_SET} ct status ! dnat reject"
        );
        let local = node_addresses(fam);
        for (id, sp) in ports.iter().filter(|(id, _)| id.family == family) {
            let proto = sp.protocol.nft();
            let mut matches: Vec<(Entry, String)> = vec![(
                Entry::Cluster,
                format!("{fam} daddr {} {proto} dport {}", sp.cluster_ip, sp.port),
            )];
            for ip in &sp.external_ips {
                matches.push((
                    Entry::External,
                    format!("{fam} daddr {ip} {proto} dport {}", sp.port),
                ));
            }
            if let Some(np) = sp.node_port {
                matches.push((
                    Entry::External,
                    format!("fib daddr type local {local} {proto} dport {np}"),
                ));
            }
            for (entry, m) in matches {
                let Some(l) = self.listeners.get(&(id.clone(), entry)) else {
                    continue;
                };
                if l.targets.is_empty() {
                    let reject = if sp.protocol == Protocol::Tcp {
                        "reject with tcp reset"
                    } else {
                        "reject"
                    };
                    let _ = writeln!(s, "add rule {t} endpoints-check {m} {reject}");
                } else {
                    let _ = writeln!(s, "add rule {t} services {m} redirect to :{}", l.local_port);
                }
            }
        }
        s
    }

    async fn listen(&self, id: &PortId, protocol: Protocol) -> Result<Listener, UserspaceError> {
        let bind_err = |source| UserspaceError::Bind {
            id: id.to_string(),
            source,
        };
        let v6 = id.family == IpFamily::Ipv6;
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let targets = Arc::new(Targets::new());
        match protocol {
            Protocol::Udp => {
                let sock = if v6 {
                    UdpSocket::from_std(
                        bind_v6_only(socket2::Type::DGRAM).map_err(bind_err)?.into(),
                    )
                } else {
                    UdpSocket::bind(any).await
                };
                let sock = Arc::new(sock.map_err(bind_err)?);
                let local_port = sock.local_addr().map_err(bind_err)?.port();
                let sessions: Sessions = Arc::default();
                let task = tokio::spawn(serve_udp(
                    sock,
                    targets.clone(),
                    sessions.clone(),
                    self.opts.clone(),
                    self.metrics.clone(),
                ));
                Ok(Listener {
                    protocol,
                    local_port,
                    targets,
                    task,
                    sessions: Some(sessions),
                })
            }
            // SCTP is served by the nftables mode only.
            Protocol::Tcp | Protocol::Sctp => {
                let l = if v6 {
                    TcpListener::from_std(
                        bind_v6_only(socket2::Type::STREAM)
                            .map_err(bind_err)?
                            .into(),
                    )
                } else {
                    TcpListener::bind(any).await
                };
                let l = l.map_err(bind_err)?;
                let local_port = l.local_addr().map_err(bind_err)?.port();
                let task = tokio::spawn(serve_tcp(
                    l,
                    targets.clone(),
                    self.conns.clone(),
                    self.opts.clone(),
                    self.metrics.clone(),
                ));
                Ok(Listener {
                    protocol,
                    local_port,
                    targets,
                    task,
                    sessions: None,
                })
            }
        }
    }

    /// Closes every listener.
    pub async fn shutdown(&mut self) {
        self.listeners.clear();
        self.applied = None;
    }
}

/// A non-blocking IPv6-only socket bound to `[::]` on a free port (listening, for a stream):
/// IPv4 connections never reach it, so the `ip6` table's guard covers every way in.
fn bind_v6_only(ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, ty, None)?;
    sock.set_only_v6(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
    if ty == socket2::Type::STREAM {
        sock.listen(1024)?;
    }
    Ok(sock)
}

async fn serve_tcp(
    listener: TcpListener,
    targets: Arc<Targets>,
    conns: Arc<Semaphore>,
    opts: UserspaceOptions,
    metrics: ProxyMetrics,
) {
    let connect_timeout = opts.connect_timeout;
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.connections.inc();
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            refuse(client);
            continue;
        };
        let targets = targets.clone();
        let metrics = metrics.clone();
        let gate = opts.gate.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let client_ip = peer.ip();
            // Redirected in the output hook (a process of this node): to 127.0.0.1 / ::1.
            let local = client.local_addr().is_ok_and(|a| a.ip().is_loopback());
            let Ok(order) = allowed_order(&targets, gate.as_ref(), client_ip, local, Protocol::Tcp)
            else {
                tracing::debug!(client = %client_ip, "relay denied by network policy");
                metrics.connections_denied.inc();
                refuse(client);
                return;
            };
            for ep in order {
                match tokio::time::timeout(connect_timeout, TcpStream::connect(ep)).await {
                    Ok(Ok(mut upstream)) => {
                        targets.used(client_ip, ep);
                        metrics.connections_active.inc();
                        let mut client = client;
                        let _ = upstream.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        metrics.connections_active.dec();
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%ep, error = %e, "endpoint refused; trying the next");
                        metrics.connect_failures.inc();
                    }
                    Err(_) => {
                        tracing::debug!(%ep, "endpoint did not answer; trying the next");
                        metrics.connect_failures.inc();
                    }
                }
            }
            metrics.connections_refused.inc();
            refuse(client);
        });
    }
}

/// Closes with a reset, so the client sees a refused connection rather than a clean EOF.
fn refuse(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    targets: Arc<Targets>,
    sessions: Sessions,
    opts: UserspaceOptions,
    metrics: ProxyMetrics,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "udp recv");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let existing = sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&client).map(|(_, up, _)| up.clone()));
        let up = match existing {
            Some(up) => up,
            None => {
                let full = sessions.lock().map(|s| s.len()).unwrap_or(0) >= opts.max_udp_sessions;
                if full {
                    metrics.udp_sessions_dropped.inc();
                    continue;
                }
                let client_ip = client.ip();
                let local = opts.gate.is_some() && is_local_addr(client_ip);
                let ep = match allowed_order(
                    &targets,
                    opts.gate.as_ref(),
                    client_ip,
                    local,
                    Protocol::Udp,
                ) {
                    Ok(order) => order.into_iter().next(),
                    Err(()) => {
                        metrics.connections_denied.inc();
                        None
                    }
                };
                let Some(ep) = ep else {
                    continue;
                };
                let unspecified: IpAddr = if ep.is_ipv6() {
                    Ipv6Addr::UNSPECIFIED.into()
                } else {
                    Ipv4Addr::UNSPECIFIED.into()
                };
                let Ok(up) = UdpSocket::bind(SocketAddr::new(unspecified, 0)).await else {
                    continue;
                };
                if up.connect(ep).await.is_err() {
                    metrics.connect_failures.inc();
                    continue;
                }
                targets.used(client_ip, ep);
                let up = Arc::new(up);
                let task = tokio::spawn(udp_replies(
                    up.clone(),
                    sock.clone(),
                    client,
                    sessions.clone(),
                    opts.udp_idle_timeout,
                    metrics.clone(),
                ));
                if let Ok(mut s) = sessions.lock() {
                    s.insert(client, (ep, up.clone(), task));
                    metrics.udp_sessions.set(s.len() as i64);
                }
                up
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

/// Relays an endpoint's replies to the client until the session is idle for `idle`.
async fn udp_replies(
    up: Arc<UdpSocket>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    sessions: Sessions,
    idle: Duration,
    metrics: ProxyMetrics,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match tokio::time::timeout(idle, up.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let _ = sock.send_to(&buf[..n], client).await;
            }
            // ICMP errors (endpoint gone) surface as recv errors: keep the session until idle.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    if let Ok(mut s) = sessions.lock() {
        s.remove(&client);
        metrics.udp_sessions.set(s.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_then_affinity() {
        let t = Targets::new();
        let a = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 80));
        let b = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 80));
        t.set(vec![a, b], None);
        let c = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let firsts: Vec<_> = (0..4).map(|_| t.order(c)[0]).collect();
        assert_eq!(firsts, vec![a, b, a, b]);
        assert_eq!(t.order(c).len(), 2, "every endpoint is a fallback");
        t.set(vec![a, b], Some(Duration::from_secs(60)));
        t.used(c, b);
        assert!((0..4).all(|_| t.order(c)[0] == b));
        // The pinned endpoint goes: the client is spread again.
        t.set(vec![a], Some(Duration::from_secs(60)));
        assert_eq!(t.order(c)[0], a);
    }

    /// Denies relays to the listed endpoint addresses.
    #[derive(Debug)]
    struct Deny(Vec<Ipv4Addr>);

    impl Gate for Deny {
        fn allows(&self, _: Client, endpoint: SocketAddr, _: Protocol) -> bool {
            !self.0.iter().any(|a| IpAddr::V4(*a) == endpoint.ip())
        }
    }

    /// Denies relays to the listed endpoints and records every question.
    #[derive(Debug, Default)]
    struct Judge {
        deny: Vec<SocketAddr>,
        asked: Mutex<Vec<(Client, SocketAddr, Protocol)>>,
    }

    impl Gate for Judge {
        fn allows(&self, client: Client, endpoint: SocketAddr, protocol: Protocol) -> bool {
            if let Ok(mut a) = self.asked.lock() {
                a.push((client, endpoint, protocol));
            }
            !self.deny.contains(&endpoint)
        }
    }

    /// A server at `addr` (any family) that writes `tag` to every connection.
    async fn tagged_at(addr: IpAddr, tag: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind((addr, 0)).await.expect("bind");
        let at = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(tag).await;
            }
        });
        at
    }

    async fn fetch_from(addr: IpAddr, port: u16) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut s = TcpStream::connect((addr, port)).await.expect("connect");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    }

    /// A server at `addr` that writes `tag` to every connection.
    async fn tagged(addr: Ipv4Addr, tag: &'static [u8]) -> u16 {
        let l = TcpListener::bind((addr, 0)).await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(tag).await;
            }
        });
        port
    }

    async fn fetch(port: u16) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn relays_pass_the_gate_and_only_redirected_traffic_reaches_listeners() {
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
        let (pa, pb) = (tagged(a, b"A").await, tagged(b, b"B").await);
        let id = PortId {
            namespace: "x".into(),
            name: "web".into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            family: IpFamily::Ipv4,
        };
        let sp = ServicePort::new(
            id.clone(),
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            vec![
                Endpoint {
                    ip: a.into(),
                    port: pa,
                    local: true,
                },
                Endpoint {
                    ip: b.into(),
                    port: pb,
                    local: true,
                },
            ],
        );
        let ports: BTreeMap<PortId, ServicePort> = [(id.clone(), sp)].into();
        let metrics = ProxyMetrics::default();
        let opts = UserspaceOptions {
            gate: Some(Arc::new(Deny(vec![a]))),
            ..UserspaceOptions::default()
        };
        let mut p = UserspaceProxy::new(::nft::FakeNft::default(), opts, metrics.clone());
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id, Entry::Cluster).expect("listener");
        // Round robin over both endpoints, but the gate takes A out: every relay reaches B.
        for _ in 0..4 {
            assert_eq!(fetch(port).await, b"B");
        }
        // The table refuses new connections to the listener that were not redirected.
        let script = p.nft.scripts().last().cloned().expect("script");
        assert!(
            script.contains(&format!(
                "add element ip {TABLE} {LISTENERS_SET} {{ tcp . {port} }}"
            )),
            "{script}"
        );
        assert!(
            script.contains(&format!("add rule ip {TABLE} filter-input ct state new meta l4proto . th dport @{LISTENERS_SET} ct status ! dnat reject")),
            "{script}"
        );

        // A gate that allows no endpoint: the client is refused and it is counted.
        p.shutdown().await;
        let opts = UserspaceOptions {
            gate: Some(Arc::new(Deny(vec![a, b]))),
            ..UserspaceOptions::default()
        };
        let mut p = UserspaceProxy::new(::nft::FakeNft::default(), opts, metrics.clone());
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id, Entry::Cluster).expect("listener");
        assert_eq!(fetch(port).await, b"");
        assert_eq!(metrics.connections_denied.get(), 1);
    }

    fn id(name: &str, protocol: Protocol, family: IpFamily) -> PortId {
        PortId {
            namespace: "x".into(),
            name: name.into(),
            port_name: String::new(),
            protocol,
            family,
        }
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            port,
            local: true,
        }
    }

    /// A dual-stack TCP Service "web" (node port, IPv6 external IP), an IPv6 UDP Service
    /// "dns" and an IPv6 TCP Service "empty" without endpoints.
    fn dual_stack() -> BTreeMap<PortId, ServicePort> {
        let mut web4 = ServicePort::new(
            id("web", Protocol::Tcp, IpFamily::Ipv4),
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            vec![ep("10.5.1.2", 8080)],
        );
        web4.node_port = Some(30080);
        let mut web6 = ServicePort::new(
            id("web", Protocol::Tcp, IpFamily::Ipv6),
            "fd00:10:96::a".parse::<Ipv6Addr>().expect("ip"),
            80,
            vec![ep("fd10:0:0:1::2", 8080), ep("fd10:0:0:1::3", 8080)],
        );
        web6.node_port = Some(30080);
        web6.external_ips = vec!["2001:db8::7".parse().expect("ip")];
        let dns6 = ServicePort::new(
            id("dns", Protocol::Udp, IpFamily::Ipv6),
            "fd00:10:96::53".parse::<Ipv6Addr>().expect("ip"),
            53,
            vec![ep("fd10:0:0:1::5", 53)],
        );
        let empty6 = ServicePort::new(
            id("empty", Protocol::Tcp, IpFamily::Ipv6),
            "fd00:10:96::b".parse::<Ipv6Addr>().expect("ip"),
            80,
            vec![],
        );
        [web4, web6, dns6, empty6]
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect()
    }

    #[tokio::test]
    async fn ipv6_ports_get_listeners_and_rules_in_the_ip6_table() {
        let ports = dual_stack();
        let ipv4_only: BTreeMap<PortId, ServicePort> = ports
            .iter()
            .filter(|(id, _)| id.family == IpFamily::Ipv4)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // The IPv4 table alone, as before dual stack.
        let mut p4 = UserspaceProxy::new(
            ::nft::FakeNft::default(),
            UserspaceOptions::default(),
            ProxyMetrics::default(),
        );
        p4.apply(&ipv4_only).await.expect("apply");
        let only4 = p4.nft.scripts().last().cloned().expect("script");
        assert!(!only4.contains("ip6"), "{only4}");

        let mut p = UserspaceProxy::new(
            ::nft::FakeNft::default(),
            UserspaceOptions::default(),
            ProxyMetrics::default(),
        )
        .with_ipv6(true);
        assert!(p.serves_ipv6());
        assert_eq!(p.apply(&ports).await.expect("apply"), 6);
        let script = p.nft.scripts().last().cloned().expect("script");
        let (ip, ip6) = script
            .split_once("add table ip6 flannel-proxy\ndelete table ip6 flannel-proxy\n")
            .expect("ip6 table after the ip one");
        let port = |name: &str, proto, family, entry| {
            p.local_port(&id(name, proto, family), entry)
                .expect("listener")
        };
        let web4 = port("web", Protocol::Tcp, IpFamily::Ipv4, Entry::Cluster);
        let web4x = port("web", Protocol::Tcp, IpFamily::Ipv4, Entry::External);
        // The IPv4 table is the one rendered without IPv6 but for its listener ports.
        let expected4 = only4
            .replace(
                &p4.local_port(&id("web", Protocol::Tcp, IpFamily::Ipv4), Entry::Cluster)
                    .expect("listener")
                    .to_string(),
                "CLUSTER",
            )
            .replace(
                &p4.local_port(&id("web", Protocol::Tcp, IpFamily::Ipv4), Entry::External)
                    .expect("listener")
                    .to_string(),
                "EXTERNAL",
            );
        let ip = ip
            .replace(&web4.to_string(), "CLUSTER")
            .replace(&web4x.to_string(), "EXTERNAL");
        // Set elements are listed in port order, and the two proxies' listener ports differ:
        // compare them as sets.
        let sorted = |text: &str| -> String {
            text.lines()
                .map(
                    |l| match (l.starts_with("add element "), l.split_once(" { ")) {
                        (true, Some((head, rest))) => {
                            let mut items: Vec<&str> =
                                rest.trim_end_matches(" }").split(", ").collect();
                            items.sort_unstable();
                            format!("{head} {{ {} }}\n", items.join(", "))
                        }
                        _ => format!("{l}\n"),
                    },
                )
                .collect()
        };
        assert_eq!(sorted(&ip), sorted(&expected4));

        let web = port("web", Protocol::Tcp, IpFamily::Ipv6, Entry::Cluster);
        let webx = port("web", Protocol::Tcp, IpFamily::Ipv6, Entry::External);
        let dns = port("dns", Protocol::Udp, IpFamily::Ipv6, Entry::Cluster);
        let empty = port("empty", Protocol::Tcp, IpFamily::Ipv6, Entry::Cluster);
        let t = format!("ip6 {TABLE}");
        let mut listening = [
            format!("tcp . {web}"),
            format!("tcp . {webx}"),
            format!("tcp . {empty}"),
            format!("udp . {dns}"),
        ];
        listening.sort();
        let expected6 = format!(
            "{}add set {t} {LISTENERS_SET} {{ type inet_proto . inet_service; }}\n\
             add element {t} {LISTENERS_SET} {{ {} }}\n\
             add chain {t} filter-input {{ type filter hook input priority filter; policy accept; }}\n\
             add rule {t} filter-input ct state new meta l4proto . th dport @{LISTENERS_SET} ct status ! dnat reject\n\
             add rule {t} services ip6 daddr fd00:10:96::53 udp dport 53 redirect to :{dns}\n\
             add rule {t} endpoints-check ip6 daddr fd00:10:96::b tcp dport 80 reject with tcp reset\n\
             add rule {t} services ip6 daddr fd00:10:96::a tcp dport 80 redirect to :{web}\n\
             add rule {t} services ip6 daddr 2001:db8::7 tcp dport 80 redirect to :{webx}\n\
             add rule {t} services fib daddr type local ip6 daddr != ::1 ip6 daddr != fe80::/10 tcp dport 30080 redirect to :{webx}\n",
            crate::nft::skeleton_in(::nft::Family::Ip6)
                .trim_start_matches("add table ip6 flannel-proxy\ndelete table ip6 flannel-proxy\n"),
            listening.join(", "),
        );
        assert_eq!(ip6, expected6);
        // IPv6 listeners take no IPv4 connection (IPV6_V6ONLY): the ip6 guard covers them.
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, web)).is_err());
        assert!(std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, web)).is_ok());
    }

    #[tokio::test]
    async fn with_a_gate_ipv6_ports_are_served_and_judged() {
        // With a gate the IPv6 half is served as without one: same listeners, same table.
        let ports = dual_stack();
        let opts = UserspaceOptions {
            gate: Some(Arc::new(Deny(vec![]))),
            ..UserspaceOptions::default()
        };
        let mut p = UserspaceProxy::new(::nft::FakeNft::default(), opts, ProxyMetrics::default())
            .with_ipv6(true);
        assert!(p.serves_ipv6());
        assert_eq!(p.apply(&ports).await.expect("apply"), 6);
        let script = p.nft.scripts().last().cloned().expect("script");
        let web = p
            .local_port(&id("web", Protocol::Tcp, IpFamily::Ipv6), Entry::Cluster)
            .expect("listener");
        assert!(
            script.contains(&format!(
                "add rule ip6 {TABLE} services ip6 daddr fd00:10:96::a tcp dport 80 redirect to :{web}\n"
            )),
            "{script}"
        );

        // Real relays over IPv6: every one is asked for, as this node's own client (the
        // output hook's redirect arrives from ::1), and the denied endpoint is skipped.
        let a = tagged_at(Ipv6Addr::LOCALHOST.into(), b"A").await;
        let b = tagged_at(Ipv6Addr::LOCALHOST.into(), b"B").await;
        let id6 = id("web", Protocol::Tcp, IpFamily::Ipv6);
        let sp = ServicePort::new(
            id6.clone(),
            "fd00:10:96::a".parse::<Ipv6Addr>().expect("ip"),
            80,
            vec![ep("::1", a.port()), ep("::1", b.port())],
        );
        let ports: BTreeMap<PortId, ServicePort> = [(id6.clone(), sp)].into();
        let judge = Arc::new(Judge {
            deny: vec![a],
            ..Judge::default()
        });
        let metrics = ProxyMetrics::default();
        let opts = UserspaceOptions {
            gate: Some(judge.clone()),
            ..UserspaceOptions::default()
        };
        let mut p =
            UserspaceProxy::new(::nft::FakeNft::default(), opts, metrics.clone()).with_ipv6(true);
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id6, Entry::Cluster).expect("listener");
        for _ in 0..4 {
            assert_eq!(fetch_from(Ipv6Addr::LOCALHOST.into(), port).await, b"B");
        }
        let asked = judge.asked.lock().expect("lock").clone();
        let client = Client {
            addr: Ipv6Addr::LOCALHOST.into(),
            local: true,
        };
        assert_eq!(asked.len(), 8, "both endpoints judged per relay: {asked:?}");
        assert!(
            asked
                .iter()
                .all(|(c, e, pr)| *c == client && (*e == a || *e == b) && *pr == Protocol::Tcp),
            "{asked:?}"
        );
        assert_eq!(metrics.connections_denied.get(), 0);

        // Both denied: the client is refused (reset, no byte) and it is counted.
        p.shutdown().await;
        let opts = UserspaceOptions {
            gate: Some(Arc::new(Judge {
                deny: vec![a, b],
                ..Judge::default()
            })),
            ..UserspaceOptions::default()
        };
        let mut p =
            UserspaceProxy::new(::nft::FakeNft::default(), opts, metrics.clone()).with_ipv6(true);
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id6, Entry::Cluster).expect("listener");
        assert_eq!(fetch_from(Ipv6Addr::LOCALHOST.into(), port).await, b"");
        assert_eq!(metrics.connections_denied.get(), 1);

        // The pure choice: an IPv6 client from elsewhere is judged as itself, not local.
        let t = Targets::new();
        t.set(vec![a, b], None);
        let judge = Arc::new(Judge {
            deny: vec![b],
            ..Judge::default()
        });
        let gate: Arc<dyn Gate> = judge.clone();
        let pod: IpAddr = "fd10:0:0:2::3".parse().expect("ip");
        assert_eq!(
            allowed_order(&t, Some(&gate), pod, false, Protocol::Udp),
            Ok(vec![a])
        );
        assert!(judge.asked.lock().expect("lock").iter().all(|(c, _, pr)| *c
            == Client {
                addr: pod,
                local: false
            }
            && *pr == Protocol::Udp));
        assert!(allowed_order(&t, None, pod, false, Protocol::Tcp).is_ok_and(|o| o.len() == 2));
    }

    #[tokio::test]
    async fn ipv6_relays_retry_the_next_endpoint() {
        let live = {
            let l = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
                .await
                .expect("bind");
            let port = l.local_addr().expect("addr").port();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"six").await;
                }
            });
            port
        };
        // A port nothing listens on: refused, the next endpoint is tried.
        let dead = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let id6 = id("web", Protocol::Tcp, IpFamily::Ipv6);
        let sp = ServicePort::new(
            id6.clone(),
            "fd00:10:96::a".parse::<Ipv6Addr>().expect("ip"),
            80,
            vec![ep("::1", dead), ep("::1", live)],
        );
        let ports: BTreeMap<PortId, ServicePort> = [(id6.clone(), sp)].into();
        let metrics = ProxyMetrics::default();
        let mut p = UserspaceProxy::new(
            ::nft::FakeNft::default(),
            UserspaceOptions::default(),
            metrics.clone(),
        )
        .with_ipv6(true);
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id6, Entry::Cluster).expect("listener");
        for _ in 0..4 {
            use tokio::io::AsyncReadExt;
            let mut s = TcpStream::connect((Ipv6Addr::LOCALHOST, port))
                .await
                .expect("connect");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            assert_eq!(out, b"six");
        }
        assert_eq!(
            metrics.connect_failures.get(),
            2,
            "every other relay met the dead one"
        );
    }

    #[tokio::test]
    async fn ipv6_udp_sessions_relay_to_ipv6_endpoints() {
        let server = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let server_port = server.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let mut reply = b"six:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&reply, from).await;
            }
        });
        let id6 = id("dns", Protocol::Udp, IpFamily::Ipv6);
        let sp = ServicePort::new(
            id6.clone(),
            "fd00:10:96::53".parse::<Ipv6Addr>().expect("ip"),
            53,
            vec![ep("::1", server_port)],
        );
        let ports: BTreeMap<PortId, ServicePort> = [(id6.clone(), sp)].into();
        let metrics = ProxyMetrics::default();
        let mut p = UserspaceProxy::new(
            ::nft::FakeNft::default(),
            UserspaceOptions::default(),
            metrics.clone(),
        )
        .with_ipv6(true);
        p.apply(&ports).await.expect("apply");
        let port = p.local_port(&id6, Entry::Cluster).expect("listener");
        let c = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        c.connect((Ipv6Addr::LOCALHOST, port))
            .await
            .expect("connect");
        c.send(b"q").await.expect("send");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
            .await
            .expect("an answer")
            .expect("recv");
        assert_eq!(&buf[..n], b"six:q");
        assert_eq!(metrics.udp_sessions.get(), 1);
    }
}
