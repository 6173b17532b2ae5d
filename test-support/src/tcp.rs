//! TCP probes across namespaces: a server that answers each connection with the source address
//! it saw (so a test sees whether traffic was masqueraded), and a client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::in_netns;

/// A server thread that stops (flag) and is joined when dropped.
#[derive(Debug)]
struct ServerThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn spawn(body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> ServerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        ServerThread {
            stop,
            thread: Some(std::thread::spawn(move || body(flag))),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts TCP connections on `port` in namespace `ns` and hands each to `handle` (blocking
/// socket), until dropped.
fn serve_tcp(
    ns: &str,
    port: u16,
    handle: impl Fn(TcpStream, SocketAddr) + Send + 'static,
) -> Result<ServerThread, String> {
    // Both families where the namespace has IPv6 (v4 peers arrive as ::ffff:a.b.c.d and are
    // shown canonical), else IPv4 only.
    let listener = in_netns(ns, move || {
        TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))
    })?
    .map_err(|e| format!("bind :{port} in {ns}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(ServerThread::spawn(move |flag| {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, peer)) => {
                    let _ = s.set_nonblocking(false);
                    handle(s, SocketAddr::new(peer.ip().to_canonical(), peer.port()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }))
}

/// Answers every connection on `port` in a namespace with "<source IP>\n"; stops on drop.
#[derive(Debug)]
pub struct WhoAmIServer {
    _thread: ServerThread,
}

impl WhoAmIServer {
    pub fn start(ns: &str, port: u16) -> Result<WhoAmIServer, String> {
        let thread = serve_tcp(ns, port, |mut s, peer| {
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes());
        })?;
        Ok(WhoAmIServer { _thread: thread })
    }
}

/// Connects from namespace `ns` to `to` and returns the source address the server saw.
pub fn whoami(ns: &str, to: SocketAddr, limit: Duration) -> Result<String, String> {
    let stream = in_netns(ns, move || TcpStream::connect_timeout(&to, limit))?
        .map_err(|e| format!("connect {to} from {ns}: {e}"))?;
    let mut stream = stream;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    stream
        .read_to_string(&mut buf)
        .map_err(|e| format!("read from {to}: {e}"))?;
    Ok(buf.trim().to_string())
}

/// Answers every UDP datagram on `port` in a namespace with "<source IP>\n"; stops on drop.
#[derive(Debug)]
pub struct UdpWhoAmIServer {
    _thread: ServerThread,
}

impl UdpWhoAmIServer {
    pub fn start(ns: &str, port: u16) -> Result<UdpWhoAmIServer, String> {
        let sock = in_netns(ns, move || dual_udp(port))?
            .map_err(|e| format!("bind udp :{port} in {ns}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let thread = ServerThread::spawn(move |flag| {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ =
                        sock.send_to(format!("{}\n", from.ip().to_canonical()).as_bytes(), from);
                }
            }
        });
        Ok(UdpWhoAmIServer { _thread: thread })
    }
}

/// A UDP socket on `port` for both families where the namespace has IPv6, else IPv4 only.
fn dual_udp(port: u16) -> std::io::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(("::", port))
        .or_else(|_| std::net::UdpSocket::bind(("0.0.0.0", port)))
}

/// Sends one UDP datagram from namespace `ns` to `to`; returns the source address the server saw.
pub fn udp_whoami(ns: &str, to: SocketAddr, limit: Duration) -> Result<String, String> {
    let any = if to.is_ipv6() { "::" } else { "0.0.0.0" };
    let sock = in_netns(ns, move || std::net::UdpSocket::bind((any, 0)))?
        .map_err(|e| format!("udp bind in {ns}: {e}"))?;
    sock.set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    sock.send_to(b"who", to)
        .map_err(|e| format!("udp send to {to}: {e}"))?;
    let mut buf = [0u8; 64];
    let (n, _) = sock
        .recv_from(&mut buf)
        .map_err(|e| format!("udp reply from {to}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// FNV-1a over a byte stream.
fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Reads each TCP connection to EOF and answers "<length> <fnv1a hash>\n"; stops on drop.
#[derive(Debug)]
pub struct HashServer {
    _thread: ServerThread,
}

impl HashServer {
    pub fn start(ns: &str, port: u16) -> Result<HashServer, String> {
        let thread = serve_tcp(ns, port, |mut s, _| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
            let (mut len, mut h) = (0u64, FNV_START);
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                len += n as u64;
                h = fnv(h, &buf[..n]);
            }
            let _ = s.write_all(format!("{len} {h:x}\n").as_bytes());
        })?;
        Ok(HashServer { _thread: thread })
    }
}

/// The `len` bytes [`send_and_verify`] sends (an xorshift stream): tests look for them on the
/// wire to show that an encrypted overlay carries none of them in the clear.
pub fn transfer_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    data
}

/// Sends `len` pseudo-random bytes from `ns` to a [`HashServer`]; Ok if it saw exactly them.
pub fn send_and_verify(
    ns: &str,
    to: SocketAddr,
    len: usize,
    limit: Duration,
) -> Result<(), String> {
    let data = transfer_bytes(len);
    let want = format!("{len} {:x}", fnv(FNV_START, &data));
    let mut s = in_netns(ns, move || TcpStream::connect_timeout(&to, limit))?
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(&data).map_err(|e| format!("send: {e}"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut got = String::new();
    s.read_to_string(&mut got)
        .map_err(|e| format!("reply: {e}"))?;
    if got.trim() == want {
        Ok(())
    } else {
        Err(format!("sent {want}, server saw {}", got.trim()))
    }
}

/// Sends a hand-made IPv4/UDP datagram (any source address and port) from namespace `ns`
/// through a raw socket. Only for addresses inside the test's own namespaces.
pub fn send_spoofed_udp(
    ns: &str,
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Result<(), String> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let sock = in_netns(ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(255)),
        )
    })?
    .map_err(|e| format!("raw socket in {ns}: {e}"))?;
    // IPPROTO_RAW implies IP_HDRINCL; the kernel fills in the header checksum.
    sock.send_to(&p, &SocketAddr::V4(dst).into())
        .map_err(|e| format!("raw send: {e}"))?;
    Ok(())
}

/// `GET path` over HTTP/1.1 from namespace `ns`; returns the whole response (status line,
/// headers, body) once the server closes the connection.
pub fn http_get(ns: &str, to: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    let mut s = in_netns(ns, move || TcpStream::connect_timeout(&to, limit))?
        .map_err(|e| format!("connect {to} from {ns}: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read from {to}: {e}"))?;
    Ok(out)
}

/// What a UDP burst delivered: datagrams received, and how many of those were not exactly one
/// datagram as sent (wrong length or content: merged, split or corrupted on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstResult {
    pub received: usize,
    pub damaged: usize,
}

/// Payload of datagram `seq` of a burst: its length varies with `seq` in runs (so runs of equal
/// sizes alternate with shorter datagrams), its bytes derive from `seq`.
fn burst_payload(seq: u32, size: usize) -> Vec<u8> {
    let len = if seq % 7 == 6 { size / 3 } else { size }.max(8);
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    while p.len() < len {
        let i = p.len() as u32;
        p.push((seq.wrapping_mul(31).wrapping_add(i)) as u8);
    }
    p
}

/// The sockets of a UDP transfer from `from_ns` to `to` (an address in `to_ns`): a receiver
/// bound to `to.port()` on every address in `to_ns` with an 8 MiB receive buffer and
/// `read_timeout`, and a sender bound in `from_ns`. Returns (receiver, sender).
fn udp_pair(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddr,
    read_timeout: Duration,
) -> Result<(std::net::UdpSocket, std::net::UdpSocket), String> {
    let rx = in_netns(to_ns, move || -> std::io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_recv_buffer_size(8 << 20)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], to.port())).into())?;
        Ok(s.into())
    })?
    .map_err(|e| format!("udp bind :{} in {to_ns}: {e}", to.port()))?;
    rx.set_read_timeout(Some(read_timeout))
        .map_err(|e| e.to_string())?;
    let tx = in_netns(from_ns, || std::net::UdpSocket::bind(("0.0.0.0", 0)))?
        .map_err(|e| format!("udp bind in {from_ns}: {e}"))?;
    Ok((rx, tx))
}

/// Sends `count` datagrams of up to `size` bytes as fast as possible from namespace `from_ns`
/// to `to` (an address in `to_ns`, port free there) and checks each one that arrives: datagram
/// boundaries and bytes must be exactly as sent. Loss is allowed (and reported by `received`).
pub fn udp_burst_verify(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddr,
    count: u32,
    size: usize,
) -> Result<BurstResult, String> {
    let (rx, tx) = udp_pair(from_ns, to_ns, to, Duration::from_millis(500))?;
    let receiver = std::thread::spawn(move || {
        let mut r = BurstResult {
            received: 0,
            damaged: 0,
        };
        let mut buf = vec![0u8; 65536];
        // Ends 500 ms after the last datagram (or after 30 s in all).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let Ok(n) = rx.recv(&mut buf) else { break };
            r.received += 1;
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if n < 8 || buf[..n] != burst_payload(seq, size)[..] {
                r.damaged += 1;
            }
        }
        r
    });
    for seq in 0..count {
        let p = burst_payload(seq, size);
        tx.send_to(&p, to)
            .map_err(|e| format!("udp send to {to}: {e}"))?;
    }
    receiver
        .join()
        .map_err(|_| "burst receiver panicked".to_string())
}

/// What a windowed UDP transfer delivered ([`udp_window_verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowResult {
    pub sent: usize,
    /// Distinct datagrams received exactly as sent.
    pub received: usize,
    /// Datagrams received that were not one datagram as sent (wrong length or bytes: merged,
    /// split or corrupted on the way), or a second copy of one.
    pub damaged: usize,
}

/// Sends `count` datagrams (lengths and bytes as [`udp_burst_verify`]'s) from `from_ns` to `to`
/// (an address in `to_ns`, port free there) in back-to-back bursts of `window`, each burst
/// only once the receiver has every datagram sent so far, or after `stall` without progress.
/// So nothing in between has to queue more than one window (no queue on the path overflows,
/// however slow the machine), while every burst still leaves at once (batches for a receiver's
/// UDP GRO). Every datagram that arrives is checked.
pub fn udp_window_verify(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddr,
    count: u32,
    size: usize,
    window: u32,
    stall: Duration,
) -> Result<WindowResult, String> {
    use std::sync::atomic::AtomicUsize;
    let (rx, tx) = udp_pair(from_ns, to_ns, to, Duration::from_millis(50))?;
    let good = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (g, d) = (good.clone(), done.clone());
    let receiver = std::thread::spawn(move || {
        let mut seen = vec![false; count as usize];
        let mut damaged = 0;
        let mut buf = vec![0u8; 65536];
        while !d.load(Ordering::Relaxed) {
            let Ok(n) = rx.recv(&mut buf) else { continue };
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            match seen.get_mut(seq as usize) {
                Some(s) if !*s && n >= 8 && buf[..n] == burst_payload(seq, size)[..] => {
                    *s = true;
                    g.fetch_add(1, Ordering::Relaxed);
                }
                _ => damaged += 1,
            }
        }
        damaged
    });
    let mut sent = 0u32;
    let mut result = Ok(());
    while sent < count {
        let end = (sent + window).min(count);
        for seq in sent..end {
            if let Err(e) = tx.send_to(&burst_payload(seq, size), to) {
                result = Err(format!("udp send to {to}: {e}"));
                break;
            }
        }
        if result.is_err() {
            break;
        }
        sent = end;
        // Wait for the window to drain, as long as the receiver makes progress.
        let (mut last, mut since) = (good.load(Ordering::Relaxed), std::time::Instant::now());
        loop {
            let now = good.load(Ordering::Relaxed);
            if now >= sent as usize || since.elapsed() > stall {
                break;
            }
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    // Late datagrams and duplicates: a last look.
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let damaged = receiver
        .join()
        .map_err(|_| "window receiver panicked".to_string())?;
    result?;
    Ok(WindowResult {
        sent: sent as usize,
        received: good.load(Ordering::Relaxed),
        damaged,
    })
}

/// Answers every connection on `port` in a namespace with "<server address> <source IP>\n":
/// which endpoint served (behind a service address) and whom it saw. Stops on drop.
#[derive(Debug)]
pub struct IdServer {
    _thread: ServerThread,
}

impl IdServer {
    pub fn start(ns: &str, port: u16) -> Result<IdServer, String> {
        let thread = serve_tcp(ns, port, |mut s, peer| {
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let local = s
                .local_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default();
            let _ = s.write_all(format!("{local} {}\n", peer.ip()).as_bytes());
        })?;
        Ok(IdServer { _thread: thread })
    }
}

/// Answers every UDP datagram on `port` in a namespace with "<server address> <source IP>\n"
/// (the server address is the namespace's `addr`, given since a wildcard socket does not
/// know which of its addresses a datagram was for). Stops on drop.
#[derive(Debug)]
pub struct UdpIdServer {
    _thread: ServerThread,
}

impl UdpIdServer {
    pub fn start(ns: &str, addr: &str, port: u16) -> Result<UdpIdServer, String> {
        let sock = in_netns(ns, move || dual_udp(port))?
            .map_err(|e| format!("bind udp :{port} in {ns}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let addr = addr.to_string();
        let thread = ServerThread::spawn(move |flag| {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(
                        format!("{addr} {}\n", from.ip().to_canonical()).as_bytes(),
                        from,
                    );
                }
            }
        });
        Ok(UdpIdServer { _thread: thread })
    }
}

/// Connects from namespace `ns` to `to`; returns (server address, source address it saw),
/// as answered by an [`IdServer`].
pub fn who_serves(ns: &str, to: SocketAddr, limit: Duration) -> Result<(String, String), String> {
    let line = whoami(ns, to, limit)?;
    split_id(&line, to)
}

/// One datagram from `ns` to `to`; returns (server address, source address) from a
/// [`UdpIdServer`].
pub fn udp_who_serves(
    ns: &str,
    to: SocketAddr,
    limit: Duration,
) -> Result<(String, String), String> {
    let line = udp_whoami(ns, to, limit)?;
    split_id(&line, to)
}

fn split_id(line: &str, to: SocketAddr) -> Result<(String, String), String> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("unexpected answer {line:?} from {to}")),
    }
}

/// A TCP connection to `to` within `limit` (in the caller's namespace), with IPv6 sockets
/// asking for ICMPv6 errors (`IPV6_RECVERR`). The kernel queues an ICMP error that answers a
/// SYN to the socket's error queue, so that a waiting non-blocking connect sees it at once,
/// without the option for IPv4 only (`tcp_v4_err` → `ip_icmp_error`); IPv6 needs the option
/// (`ipv6_icmp_error`). Without it an IPv6 client whose own connect() still held the socket
/// when the error arrived (a round trip through veths and bridges on one host runs inside
/// that call) keeps it as a soft error and fails only on its retransmitted SYN, a second
/// later. With it a refusal by ICMP is seen as fast over both families.
pub fn connect_seeing_icmp(to: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let domain = if to.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::STREAM, None)?;
    if to.is_ipv6() {
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv6RecvErr, &true)
            .map_err(std::io::Error::from)?;
    }
    sock.connect_timeout(&to.into(), limit)?;
    Ok(sock.into())
}
