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
    let listener = in_netns(ns, move || TcpListener::bind(("0.0.0.0", port)))?
        .map_err(|e| format!("bind :{port} in {ns}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(ServerThread::spawn(move |flag| {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, peer)) => {
                    let _ = s.set_nonblocking(false);
                    handle(s, peer);
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
        let sock = in_netns(ns, move || std::net::UdpSocket::bind(("0.0.0.0", port)))?
            .map_err(|e| format!("bind udp :{port} in {ns}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let thread = ServerThread::spawn(move |flag| {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{}\n", from.ip()).as_bytes(), from);
                }
            }
        });
        Ok(UdpWhoAmIServer { _thread: thread })
    }
}

/// Sends one UDP datagram from namespace `ns` to `to`; returns the source address the server saw.
pub fn udp_whoami(ns: &str, to: SocketAddr, limit: Duration) -> Result<String, String> {
    let sock = in_netns(ns, || std::net::UdpSocket::bind(("0.0.0.0", 0)))?
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

/// Sends `len` pseudo-random bytes from `ns` to a [`HashServer`]; Ok if it saw exactly them.
pub fn send_and_verify(
    ns: &str,
    to: SocketAddr,
    len: usize,
    limit: Duration,
) -> Result<(), String> {
    let mut data = vec![0u8; len];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
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
