//! `udp`: flannel's userspace backend, wire-compatible. TUN `flannel0` (no packet-info header)
//! with our subnet's network address /32 and one route for the whole Network; each IPv4 packet
//! read from it travels as the bare payload of a UDP datagram from our interface IP:port to the
//! peer's PublicIP:port, with its TTL decremented. Unlike flannel, arriving datagrams are checked
//! (known peer address and port, inner source in that peer's subnet, destination in ours) and
//! every drop is counted by reason. Buffers are fixed; nothing queues, so memory is bounded.
//!
//! Fast path: the TUN carries a virtio-net header (TSO/checksum offload), so one read returns up to
//! 64 KiB that tun-rs splits into MTU packets; consecutive packets to one peer leave in one
//! `sendmsg` with UDP_SEGMENT (GSO). Receiving uses UDP_GRO (many datagrams per call) and tun-rs's
//! GRO table to write coalesced super-packets. Each offload falls back on its own when the kernel
//! refuses it, reported in the log and in `/metrics`.

pub mod packet;

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::netlink::{ensure_subnet_address, Netlink, Route};
use crate::options::Options;
use crate::{Backend, BackendContext, BackendError, PeerTable};
use packet::{DropReason, Egress, Routes, UdpPeer};

/// flannel's udp port.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 header 20 + UDP header 8.
pub const OVERHEAD_V4: u32 = 28;
pub const DEVICE: &str = "flannel0";

/// `Backend` options of the udp type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    pub port: u16,
    /// TUN vnet-header offload, UDP GSO and UDP GRO (our extension; default true).
    pub offload: bool,
}

impl UdpConfig {
    pub fn parse(options: &Map<String, Value>) -> Result<(Self, Vec<String>), BackendError> {
        let o = Options::new(options, "udp");
        let port = match o.uint("Port", 65535)? {
            None | Some(0) => DEFAULT_PORT,
            Some(p) => p as u16,
        };
        Ok((
            UdpConfig {
                port,
                offload: o.boolean("Offload", true)?,
            },
            o.warnings(&["Port", "Offload"]),
        ))
    }
}

/// Packet counters, read by metrics.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub icmp_sent: AtomicU64,
    pub gso_sends: AtomicU64,
    /// TUN reads and UDP receives: packets per call = tx_packets / tun_reads, rx / udp_receives.
    pub tun_reads: AtomicU64,
    pub udp_receives: AtomicU64,
    /// 1 when the TUN runs without the vnet-header offload (one packet per read/write).
    pub offload_disabled: AtomicU64,
    /// 1 once the kernel refused UDP GSO (sends fall back to one datagram per call).
    pub gso_disabled: AtomicU64,
    /// 1 when UDP GRO could not be enabled (one datagram per receive).
    pub gro_disabled: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl UdpStats {
    pub fn count(&self, d: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|x| *x == d) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self, d: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|x| *x == d)
            .map(|i| self.dropped[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// The running udp backend.
#[derive(Debug)]
pub struct UdpBackend {
    nl: Arc<dyn Netlink>,
    cfg: UdpConfig,
    network: Ipv4Net,
    index: u32,
    mtu: u32,
    peers: PeerTable,
    routes: Arc<RwLock<Routes>>,
    stats: Arc<UdpStats>,
    tasks: Vec<JoinHandle<()>>,
    own: Option<Ipv4Net>,
}

fn io_err(op: &str, e: std::io::Error) -> BackendError {
    BackendError::Io(format!("{op}: {e}"))
}

impl UdpBackend {
    pub async fn new(cfg: UdpConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        let mtu = ctx.ext.mtu.saturating_sub(OVERHEAD_V4);
        let stats = Arc::new(UdpStats::default());
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(DEVICE)
                .mtu(u16::try_from(mtu).unwrap_or(1472))
                .packet_information(false)
                .offload(offload)
                .build_async()
        };
        let first = if cfg.offload {
            build(true)
        } else {
            Err(std::io::Error::other("switched off by Backend.Offload"))
        };
        let dev = match first {
            Ok(d) if d.tcp_gso() => d,
            other => {
                match other {
                    Ok(_) => tracing::warn!("TUN offload (TSO) not available; one packet per read"),
                    Err(e) => tracing::warn!("TUN without vnet header ({e}); one packet per read"),
                }
                stats.offload_disabled.store(1, Ordering::Relaxed);
                build(false).map_err(|e| io_err("creating TUN flannel0", e))?
            }
        };
        let link = ctx
            .netlink
            .link_by_name(DEVICE)
            .await?
            .ok_or_else(|| BackendError::Io("TUN flannel0 created but not found".into()))?;
        ctx.netlink.set_link_mtu_up(link.index, mtu).await?;
        let sock = std::net::UdpSocket::bind(SocketAddrV4::new(ctx.ext.iface_ip, cfg.port))
            .map_err(|e| io_err(&format!("binding UDP {}:{}", ctx.ext.iface_ip, cfg.port), e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io_err("socket", e))?;
        let sock = Arc::new(UdpSocket::from_std(sock).map_err(|e| io_err("socket", e))?);
        let dev = Arc::new(dev);
        let routes = Arc::new(RwLock::new(Routes::default()));
        let tasks = vec![
            tokio::spawn(tun_to_udp(
                dev.clone(),
                sock.clone(),
                routes.clone(),
                stats.clone(),
                mtu,
                cfg.offload,
            )),
            tokio::spawn(udp_to_tun(
                dev,
                sock,
                routes.clone(),
                stats.clone(),
                cfg.offload,
            )),
        ];
        tracing::info!(device = DEVICE, mtu, port = cfg.port, "udp backend up");
        Ok(UdpBackend {
            nl: ctx.netlink.clone(),
            cfg,
            network: ctx.network,
            index: link.index,
            mtu,
            peers: PeerTable::default(),
            routes,
            stats,
            tasks,
            own: None,
        })
    }

    pub fn stats(&self) -> Arc<UdpStats> {
        self.stats.clone()
    }

    fn peer_addr(&self, l: &Lease) -> Result<UdpPeer, String> {
        if l.attrs.backend_type != "udp" {
            return Err(format!("backend type {:?}, not udp", l.attrs.backend_type));
        }
        Ok(UdpPeer {
            subnet: l.key.ipv4,
            addr: SocketAddrV4::new(l.attrs.public_ip, self.cfg.port),
        })
    }

    async fn ensure_link_state(&self) -> Result<usize, BackendError> {
        let Some(own) = self.own else { return Ok(0) };
        let mut changes = ensure_subnet_address(self.nl.as_ref(), self.index, own).await?;
        let route = Route {
            dst: self.network,
            gateway: None,
            oif: self.index,
            onlink: false,
        };
        let routes = self.nl.routes().await?;
        if !routes.contains(&route) {
            self.nl.set_route(route).await?;
            changes += 1;
        }
        Ok(changes)
    }
}

impl std::ops::Drop for UdpBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Most segments one UDP GSO send may carry (kernel limit UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes one UDP GSO send may carry.
const GSO_MAX_BYTES: usize = 65_000;

/// Sends `run` (datagrams of `seg` bytes, the last possibly shorter, all to `to`): one sendmsg
/// with UDP_SEGMENT and one iovec per datagram when GSO works (no copy: the kernel joins the
/// iovecs and cuts them at `seg`), else one datagram per call. GSO is switched off for good
/// (and counted) the first time the kernel refuses it.
async fn flush(
    sock: &UdpSocket,
    run: &[&[u8]],
    seg: usize,
    to: SocketAddrV4,
    gso: &mut bool,
    stats: &UdpStats,
) {
    if run.is_empty() {
        return;
    }
    if *gso && run.len() > 1 {
        let addr = nix::sys::socket::SockaddrIn::from(to);
        let seg16 = u16::try_from(seg).unwrap_or(u16::MAX);
        let iov: Vec<std::io::IoSlice<'_>> = run.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let r = sock
            .async_io(tokio::io::Interest::WRITABLE, || {
                let cmsg = [nix::sys::socket::ControlMessage::UdpGsoSegments(&seg16)];
                nix::sys::socket::sendmsg(
                    sock.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    Some(&addr),
                )
                .map_err(std::io::Error::from)
            })
            .await;
        match r {
            Ok(bytes) => {
                stats
                    .tx_packets
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                stats.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                stats.gso_sends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if matches!(e.raw_os_error(), Some(5) | Some(22) | Some(95)) => {
                tracing::warn!("UDP GSO refused ({e}); sending one datagram per call from now on");
                *gso = false;
                stats.gso_disabled.store(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!("gso send to {to}: {e}");
                stats.count(DropReason::IoError);
                return;
            }
        }
    }
    for pkt in run {
        match sock.send_to(pkt, to).await {
            Ok(_) => {
                stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                stats
                    .tx_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!("send to {to}: {e}");
                stats.count(DropReason::IoError);
            }
        }
    }
}

async fn tun_to_udp(
    dev: Arc<tun_rs::AsyncDevice>,
    sock: Arc<UdpSocket>,
    routes: Arc<RwLock<Routes>>,
    stats: Arc<UdpStats>,
    mtu: u32,
    offload: bool,
) {
    // One read may return a 64 KiB super-packet (vnet header offload), split into MTU packets.
    let mut orig = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; mtu as usize + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut decisions: Vec<Egress> = Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE);
    let mut gso = offload;
    if !gso {
        stats.gso_disabled.store(1, Ordering::Relaxed);
    }
    let mut limiter = packet::icmp_limiter(Instant::now());
    let mut icmp_table = tun_rs::GROTable::default();
    loop {
        let n = match dev.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("reading {DEVICE}: {e}");
                stats.count(DropReason::IoError);
                continue;
            }
        };
        stats.tun_reads.fetch_add(1, Ordering::Relaxed);
        // Pass 1: validate, decrement TTL, pick the peer (one lock for the whole read).
        decisions.clear();
        {
            let r = routes.read().unwrap_or_else(|e| e.into_inner());
            for i in 0..n {
                decisions.push(r.egress(&mut bufs[i][..sizes[i]]));
            }
        }
        // Pass 2: runs of consecutive packets to one peer, same size (the last may be shorter),
        // leave in one GSO send.
        let mut run: Vec<&[u8]> = Vec::with_capacity(GSO_MAX_SEGMENTS);
        let (mut dst, mut seg, mut bytes, mut closed) =
            (None::<SocketAddrV4>, 0usize, 0usize, false);
        for i in 0..n {
            let pkt = &bufs[i][..sizes[i]];
            match decisions[i] {
                Egress::Send(to) => {
                    let fits = dst == Some(to)
                        && !closed
                        && pkt.len() <= seg
                        && run.len() < GSO_MAX_SEGMENTS
                        && bytes + pkt.len() <= GSO_MAX_BYTES;
                    if !fits {
                        if let Some(d) = dst {
                            flush(&sock, &run, seg, d, &mut gso, &stats).await;
                        }
                        run.clear();
                        dst = Some(to);
                        seg = pkt.len();
                        bytes = 0;
                        closed = false;
                    }
                    run.push(pkt);
                    bytes += pkt.len();
                    // A shorter packet can only be the last of a GSO batch.
                    closed |= pkt.len() < seg;
                }
                Egress::Unreachable => {
                    stats.count(DropReason::NoRoute);
                    if limiter.allow(Instant::now()) {
                        if let Some(reply) = packet::icmp_net_unreachable(pkt) {
                            // Written like every TUN write: after a (zeroed) virtio-net header
                            // when the offload is on; send_multiple handles both modes.
                            let mut out = [vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN]];
                            out[0].extend_from_slice(&reply);
                            let sent = dev
                                .send_multiple(
                                    &mut icmp_table,
                                    &mut out,
                                    tun_rs::VIRTIO_NET_HDR_LEN,
                                )
                                .await;
                            if sent.is_ok() {
                                stats.icmp_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                // IPv6 link-local noise of a fresh TUN lands in not_ipv4: counted, not logged.
                Egress::Drop(d) => stats.count(d),
            }
        }
        if let Some(d) = dst {
            flush(&sock, &run, seg, d, &mut gso, &stats).await;
        }
    }
}

async fn udp_to_tun(
    dev: Arc<tun_rs::AsyncDevice>,
    sock: Arc<UdpSocket>,
    routes: Arc<RwLock<Routes>>,
    stats: Arc<UdpStats>,
    offload: bool,
) {
    const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
    // With UDP_GRO one receive returns many datagrams of one size (given in a cmsg).
    let gro = offload
        && nix::sys::socket::setsockopt(&*sock, nix::sys::socket::sockopt::UdpGroSegment, &true)
            .is_ok();
    if !gro {
        stats.gro_disabled.store(1, Ordering::Relaxed);
        tracing::warn!("UDP GRO not available; receiving one datagram per call");
    }
    let mut buf = vec![0u8; 65536];
    let mut out: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(HDR + 65536))
        .collect();
    let mut table = tun_rs::GROTable::default();
    loop {
        let r = sock
            .async_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let mut cmsg = nix::cmsg_space!(i32);
                let msg = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrIn>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)?;
                let mut seg = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let nix::sys::socket::ControlMessageOwned::UdpGroSegments(s) = c {
                            seg = usize::try_from(s).ok().filter(|s| *s > 0);
                        }
                    }
                }
                Ok((msg.bytes, msg.address, seg))
            })
            .await;
        let (len, from, seg) = match r {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("udp receive: {e}");
                stats.count(DropReason::IoError);
                continue;
            }
        };
        stats.udp_receives.fetch_add(1, Ordering::Relaxed);
        let Some(from) = from else {
            stats.count(DropReason::UnknownSender);
            continue;
        };
        let from = SocketAddrV4::new(from.ip(), from.port());
        let seg = seg.unwrap_or(len).max(1);
        let mut k = 0;
        {
            let r = routes.read().unwrap_or_else(|e| e.into_inner());
            for pkt in buf[..len].chunks(seg) {
                match r.ingress(from, pkt) {
                    Ok(()) => {
                        if k == out.len() {
                            break;
                        }
                        let o = &mut out[k];
                        o.clear();
                        o.resize(HDR, 0);
                        o.extend_from_slice(pkt);
                        k += 1;
                    }
                    Err(d) => stats.count(d),
                }
            }
        }
        if k == 0 {
            continue;
        }
        let bytes: usize = out[..k].iter().map(|o| o.len() - HDR).sum();
        match dev.send_multiple(&mut table, &mut out[..k], HDR).await {
            Ok(_) => {
                stats.rx_packets.fetch_add(k as u64, Ordering::Relaxed);
                stats.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!("writing {DEVICE}: {e}");
                stats.count(DropReason::IoError);
            }
        }
    }
}

#[async_trait]
impl Backend for UdpBackend {
    fn backend_type(&self) -> &'static str {
        "udp"
    }

    fn backend_data(&self) -> Option<Value> {
        None
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = Some(own.key.ipv4);
        self.peers.remove(&own.key);
        self.routes.write().unwrap_or_else(|e| e.into_inner()).own = Some(own.key.ipv4);
        self.ensure_link_state().await?;
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        if let Event::PeerAdded(l) = ev {
            if let Err(why) = self.peer_addr(l) {
                tracing::warn!(peer = %l.key, public_ip = %l.attrs.public_ip, "peer not routed: {why}");
            }
        }
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let changes = self.ensure_link_state().await?;
        let peers: Vec<UdpPeer> = self
            .peers
            .leases()
            .filter_map(|l| self.peer_addr(l).ok())
            .collect();
        let mut r = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let changed = r.peers != peers;
        r.peers = peers;
        Ok(changes + usize::from(changed))
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.nl
            .del_route(Route {
                dst: self.network,
                gateway: None,
                oif: self.index,
                onlink: false,
            })
            .await?;
        Ok(())
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let s = &self.stats;
        let mut m = BTreeMap::new();
        m.insert(
            "udp_tx_packets".into(),
            s.tx_packets.load(Ordering::Relaxed),
        );
        m.insert("udp_tx_bytes".into(), s.tx_bytes.load(Ordering::Relaxed));
        m.insert(
            "udp_rx_packets".into(),
            s.rx_packets.load(Ordering::Relaxed),
        );
        m.insert("udp_rx_bytes".into(), s.rx_bytes.load(Ordering::Relaxed));
        m.insert("udp_icmp_sent".into(), s.icmp_sent.load(Ordering::Relaxed));
        m.insert("udp_gso_sends".into(), s.gso_sends.load(Ordering::Relaxed));
        m.insert("udp_tun_reads".into(), s.tun_reads.load(Ordering::Relaxed));
        m.insert(
            "udp_receives".into(),
            s.udp_receives.load(Ordering::Relaxed),
        );
        m.insert(
            "udp_offload_disabled".into(),
            s.offload_disabled.load(Ordering::Relaxed),
        );
        m.insert(
            "udp_gso_disabled".into(),
            s.gso_disabled.load(Ordering::Relaxed),
        );
        m.insert(
            "udp_gro_disabled".into(),
            s.gro_disabled.load(Ordering::Relaxed),
        );
        for d in DropReason::ALL {
            m.insert(format!("udp_dropped_{}", d.label()), s.dropped(d));
        }
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = |j: &str| serde_json::from_str::<Map<String, Value>>(j).unwrap();
        assert_eq!(
            UdpConfig::parse(&o("{}")).unwrap().0,
            UdpConfig {
                port: 8285,
                offload: true
            }
        );
        assert!(
            !UdpConfig::parse(&o(r#"{"Offload":false}"#))
                .unwrap()
                .0
                .offload
        );
        assert!(UdpConfig::parse(&o(r#"{"Offload":"no"}"#)).is_err());
        assert_eq!(UdpConfig::parse(&o(r#"{"Port":0}"#)).unwrap().0.port, 8285);
        assert_eq!(
            UdpConfig::parse(&o(r#"{"Port":7890}"#)).unwrap().0.port,
            7890
        );
        assert!(UdpConfig::parse(&o(r#"{"Port":70000}"#))
            .unwrap_err()
            .to_string()
            .starts_with("Backend.Port"));
        assert_eq!(
            UdpConfig::parse(&o(r#"{"Bogus":1}"#)).unwrap().1,
            vec!["Backend.Bogus: unknown udp option ignored"]
        );
    }
}
