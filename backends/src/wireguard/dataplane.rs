//! The wireguard data plane: TUN `flannel-wg` and one UDP socket on `ListenPort`, three OS
//! threads (egress TUN → peer, ingress peer → TUN, timers), one boringtun `Tunn` (the protocol
//! core: Noise IK handshake, cookies, rekey timers, replay window) per peer.
//!
//! The protocol steps are the functions [`seal`] and [`open`] over caller-owned buffers, so a
//! batched pipeline (GSO/GRO, several cores) can call them later without changing them.
//!
//! Security: a datagram reaches the TUN only after its peer's `Tunn` authenticated and
//! decrypted it (replays are refused by the core's window), and only if the inner source is in
//! that peer's allowed IPs (its lease subnet); every refusal is counted by reason. Handshake
//! initiations pass the MAC1 check and, under load, the cookie check before the Diffie-Hellman
//! that finds their sender.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use nix::sys::socket::{self, sockopt};
use tun_rs::SyncDevice;

use super::key::PrivateKey;
use super::peers::{diff, Diff, Switching, WgPeer};
use crate::udp::coalesce;
use crate::udp::dataplane as udp_plane;
use crate::udp::packet::{icmp_limiter, unreachable_reply};

/// Longest a packet loop sleeps before it looks at the stop flag again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often every peer's timers run (boringtun's device uses 250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second before cookies are asked for. Initiations are counted twice
/// (the check before the DH, then the peer's core), so about 50 initiations a second.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Bytes a sealed packet adds: type 4, index 4, counter 8, tag 16.
const DATA_OVERHEAD: usize = 32;
/// Largest handshake message (an initiation).
const HANDSHAKE_MAX: usize = 148;
/// Receive and work buffers: the largest UDP datagram.
const BUF: usize = 65536;
/// Whether the ingress thread asks for UDP_GRO (see [`ingress`]; docs/wireguard.md, "Data plane").
const UDP_GRO: bool = true;
/// The TUN's transmit queue (packets waiting for the egress thread), as the udp backend's.
const TX_QUEUE_LEN: u32 = 1000;
/// Inner packets one egress round handles at most (a 64 KiB TSO read split at the MTU).
const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Room for the opened packets of one receive: a GRO batch (≤ 64 KiB) with every datagram in
/// a slot of at least [`HANDSHAKE_MAX`] bytes.
const OUT: usize = BUF + udp_plane::GSO_MAX_SEGMENTS * HANDSHAKE_MAX;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Read from the TUN and not for a peer: not IP, or the TUN's own IPv6 link-local and
    /// multicast noise (router and neighbour solicitations, MLD).
    NotIpv4,
    /// To an address no peer's allowed IPs contain (ICMP unreachable sent, rate limited).
    NoPeer,
    /// Not a WireGuard message.
    Invalid,
    /// A handshake from a key that is no peer's.
    UnknownKey,
    /// A message for a session index no peer has.
    UnknownIndex,
    /// Failed authentication (MAC, AEAD tag, key).
    AuthFailed,
    /// A data counter already seen or too old, or a handshake timestamp not newer: a replay.
    Replayed,
    /// Decrypted, but its source is not in the sender's allowed IPs.
    Spoofed,
    /// Refused while under load without a valid cookie (a cookie reply was sent).
    UnderLoad,
    /// Refused by the core for another reason (session expired, unexpected message).
    Refused,
    /// A system call failed.
    IoError,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NotIpv4,
        DropReason::NoPeer,
        DropReason::Invalid,
        DropReason::UnknownKey,
        DropReason::UnknownIndex,
        DropReason::AuthFailed,
        DropReason::Replayed,
        DropReason::Spoofed,
        DropReason::UnderLoad,
        DropReason::Refused,
        DropReason::IoError,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::NoPeer => "no_peer",
            DropReason::Invalid => "invalid",
            DropReason::UnknownKey => "unknown_key",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::AuthFailed => "auth_failed",
            DropReason::Replayed => "replayed",
            DropReason::Spoofed => "spoofed_source",
            DropReason::UnderLoad => "under_load",
            DropReason::Refused => "refused",
            DropReason::IoError => "io_error",
        }
    }

    fn of(e: &WireGuardError) -> Self {
        match e {
            WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp => DropReason::Replayed,
            WireGuardError::InvalidAeadTag
            | WireGuardError::InvalidMac
            | WireGuardError::WrongKey
            | WireGuardError::InvalidTai64nTimestamp => DropReason::AuthFailed,
            WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                DropReason::UnknownIndex
            }
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
                DropReason::Invalid
            }
            _ => DropReason::Refused,
        }
    }
}

/// Device counters, read by metrics.
#[derive(Debug, Default)]
pub struct WgStats {
    /// Inner packets sent to peers (sealed) and delivered to the TUN (opened).
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Datagram bytes sent and received (every message type).
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Handshake messages and keepalives sent by the timers.
    pub timer_sends: AtomicU64,
    pub cookie_replies: AtomicU64,
    pub icmp_sent: AtomicU64,
    /// Batched I/O: TUN reads (one may carry a 64 KiB TSO super-packet), UDP GSO sends,
    /// UDP receives (one may carry a GRO batch), coalesced TUN writes.
    pub tun_reads: AtomicU64,
    pub gso_sends: AtomicU64,
    pub udp_receives: AtomicU64,
    pub tun_coalesced_writes: AtomicU64,
    /// UDP receives that carried more than one datagram (a GRO batch).
    pub gro_batches: AtomicU64,
    /// 1 when the TUN runs without the vnet header (no TSO reads, no coalesced writes), when
    /// UDP GSO was refused, when UDP GRO is not available.
    pub offload_disabled: AtomicU64,
    pub gso_disabled: AtomicU64,
    pub gro_disabled: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl WgStats {
    pub fn count(&self, d: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|x| *x == d) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self, d: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|x| *x == d)
            .map_or(0, |i| self.dropped[i].load(Ordering::Relaxed))
    }
}

/// What one protocol step asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Send this datagram to the peer.
    Network(&'a [u8]),
    /// Deliver this inner packet to the TUN.
    Tunnel(&'a [u8]),
    /// Nothing to do (a keepalive arrived, a packet waits for the handshake in progress).
    Nothing,
    Drop(DropReason),
}

/// The size `out` must have for [`seal`] of a `len`-byte packet.
pub fn sealed_len(len: usize) -> usize {
    (len + DATA_OVERHEAD).max(HANDSHAKE_MAX)
}

/// Seals one inner packet for the peer `t` into `out` (at least [`sealed_len`] bytes). Without
/// a session the packet is queued in the core and a handshake initiation is returned.
pub fn seal<'a>(t: &mut Tunn, packet: &[u8], out: &'a mut [u8]) -> Step<'a> {
    if out.len() < sealed_len(packet.len()) {
        return Step::Drop(DropReason::Invalid);
    }
    match t.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(d) => Step::Network(d),
        TunnResult::Done => Step::Nothing,
        TunnResult::Err(e) => Step::Drop(DropReason::of(&e)),
        // encapsulate never asks to write to the tunnel.
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            Step::Drop(DropReason::Refused)
        }
    }
}

/// Opens one datagram from `from` with the peer `t`'s core into `out` (at least as long as the
/// datagram and 148 bytes). An inner packet is returned only if its source is in `allowed`.
pub fn open<'a>(
    t: &mut Tunn,
    from: IpAddr,
    datagram: &[u8],
    out: &'a mut [u8],
    allowed: &[IpNet],
) -> Step<'a> {
    if out.len() < datagram.len().max(HANDSHAKE_MAX) {
        return Step::Drop(DropReason::Invalid);
    }
    match t.decapsulate(Some(from), datagram, out) {
        TunnResult::WriteToNetwork(d) => Step::Network(d),
        TunnResult::WriteToTunnelV4(p, src) => allowed_step(p, IpAddr::V4(src), allowed),
        TunnResult::WriteToTunnelV6(p, src) => allowed_step(p, IpAddr::V6(src), allowed),
        TunnResult::Done => Step::Nothing,
        TunnResult::Err(e) => Step::Drop(DropReason::of(&e)),
    }
}

/// The inner packet `p` from `src`, if `src` is in the peer's `allowed` IPs (either family).
fn allowed_step<'a>(p: &'a [u8], src: IpAddr, allowed: &[IpNet]) -> Step<'a> {
    if allowed.iter().any(|n| n.contains(&src)) {
        Step::Tunnel(p)
    } else {
        Step::Drop(DropReason::Spoofed)
    }
}

/// The destination of an inner packet read from a TUN (IPv4 or IPv6); None for anything a
/// peer cannot be for: too short, not IP, IPv6 link-local or multicast (the TUN's own noise).
pub fn inner_dst(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let a: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        6 => {
            let a: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            let d = Ipv6Addr::from(a);
            let noise = d.is_multicast() || (d.segments()[0] & 0xffc0) == 0xfe80;
            (!noise).then_some(IpAddr::V6(d))
        }
        _ => None,
    }
}

/// A peer's state as `wg show` reports it (for the UAPI server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: [u8; 32],
    /// Where datagrams go now (the lease's endpoint, or where the peer roamed to).
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
    /// When the current session was made; None before the first handshake.
    pub last_handshake: Option<SystemTime>,
    /// Datagram bytes received from and sent to the peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug)]
struct PeerState {
    /// Where datagrams go: the lease's endpoint until an authenticated datagram comes from
    /// elsewhere (roaming, as WireGuard does).
    endpoint: SocketAddr,
    /// The endpoint the lease gave (a change in the lease overrides roaming).
    lease_endpoint: SocketAddr,
    allowed: Vec<IpNet>,
}

struct Peer {
    public_key: [u8; 32],
    tunn: Mutex<Tunn>,
    state: Mutex<PeerState>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &super::config::encode_key(&self.public_key))
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Peer {
    fn endpoint(&self) -> SocketAddr {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .endpoint
    }

    fn allowed(&self) -> Vec<IpNet> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allowed
            .clone()
    }

    fn roam(&self, from: SocketAddr) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.endpoint != from {
            tracing::info!(peer = %super::config::encode_key(&self.public_key), from = %s.endpoint, to = %from, "wireguard peer roamed");
            s.endpoint = from;
        }
    }
}

/// Peers by key, by session index, and by allowed IPs (longest prefix first).
#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_idx: HashMap<u32, Arc<Peer>>,
    routes: Vec<(IpNet, Arc<Peer>)>,
    /// Peers of other types by PublicIP: a handshake from there with an unknown key makes a
    /// peer for that lease (its wireguard secondary, mid-switch).
    switching: HashMap<Ipv4Addr, Switching>,
}

impl Table {
    fn lookup(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes
            .iter()
            .find(|(n, _)| n.contains(&dst))
            .map(|(_, p)| p)
    }

    fn rebuild_routes(&mut self) {
        let mut routes: Vec<(IpNet, Arc<Peer>)> = self
            .by_key
            .values()
            .flat_map(|p| p.allowed().into_iter().map(move |n| (n, p.clone())))
            .collect();
        routes.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.0.cmp(&b.0)));
        self.routes = routes;
    }
}

/// Everything the threads share.
struct Shared {
    dev: SyncDevice,
    sock: UdpSocket,
    secret: StaticSecret,
    public: PublicKey,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    limiter: Arc<RateLimiter>,
    table: RwLock<Table>,
    /// The peers as last applied (what [`Device::apply`] diffs against).
    applied: Mutex<Vec<WgPeer>>,
    next_index: AtomicU32,
    stats: Arc<WgStats>,
    stop: AtomicBool,
    mtu: u32,
    /// The TUN carries the virtio-net header (TSO reads, coalesced writes), and takes USO.
    vnet: bool,
    uso: bool,
}

/// The running data plane.
pub struct Device {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field(
                "public_key",
                &super::config::encode_key(&self.sh.public.to_bytes()),
            )
            .field("mtu", &self.sh.mtu)
            .finish_non_exhaustive()
    }
}

/// Creates the TUN `name` with the vnet-header offload (TSO reads, GSO writes) when the kernel
/// gives it, else without (one packet per read and write); the caller sets the MTU and brings
/// it up.
pub fn build_tun(name: &str, mtu: u32) -> std::io::Result<SyncDevice> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(u16::try_from(mtu).unwrap_or(1420))
            .packet_information(false)
            .offload(offload)
            .enable(true)
            .build_sync()
    };
    match build(true) {
        Ok(d) if d.tcp_gso() => return Ok(d),
        Ok(d) => {
            tracing::warn!("TUN offload (TSO) not available; one packet per read");
            // Closed before the second device takes the name (a live one keeps it busy).
            drop(d);
        }
        Err(e) => tracing::warn!("TUN without vnet header ({e}); one packet per read"),
    }
    build(false)
}

/// Settings of the data plane.
#[derive(Debug)]
pub struct DeviceConfig<'a> {
    pub key: &'a PrivateKey,
    pub psk: Option<[u8; 32]>,
    pub keepalive: Option<u16>,
    pub mtu: u32,
}

impl Device {
    /// Starts the three threads on `dev` (made non-blocking here) and `sock`.
    pub fn start(dev: SyncDevice, sock: UdpSocket, cfg: DeviceConfig<'_>) -> std::io::Result<Self> {
        // The udp backend's settings: TUN non-blocking (polled), its queue 1000 (best effort:
        // the ioctl names the device in the caller's network namespace), socket blocking with
        // a receive timeout and 4 MiB buffers.
        dev.set_nonblocking(true)?;
        if let Err(e) = dev.set_tx_queue_len(TX_QUEUE_LEN) {
            tracing::debug!("{}: transmit queue length: {e}", super::DEVICE);
        }
        udp_plane::prepare_socket(&sock)?;
        let (vnet, uso) = (dev.tcp_gso(), dev.udp_gso());
        let secret = cfg.key.secret();
        let public = PublicKey::from(&secret);
        let mut seed = [0u8; 4];
        // A random first session index (24 bits), as WireGuard's are random.
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut f, &mut seed);
        }
        let sh = Arc::new(Shared {
            dev,
            sock,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            psk: cfg.psk,
            keepalive: cfg.keepalive,
            table: RwLock::new(Table::default()),
            applied: Mutex::new(Vec::new()),
            next_index: AtomicU32::new(u32::from_le_bytes(seed)),
            stats: Arc::new(WgStats::default()),
            stop: AtomicBool::new(false),
            mtu: cfg.mtu,
            vnet,
            uso,
        });
        if !vnet {
            sh.stats.offload_disabled.store(1, Ordering::Relaxed);
        }
        let mut threads = Vec::new();
        for (name, f) in [
            ("wg-egress", egress as fn(&Shared)),
            ("wg-ingress", ingress),
            ("wg-timers", timers),
        ] {
            let s = sh.clone();
            match std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&s))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    sh.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(Device { sh, threads })
    }

    pub fn stats(&self) -> Arc<WgStats> {
        self.sh.stats.clone()
    }

    /// Brings the peers to `want`: new keys get a core and a handshake initiation at once (a
    /// restarted node so gives its peers fresh sessions instead of letting them send into the
    /// old ones until their rekey timeout), changed endpoints and allowed IPs are updated in
    /// place, keys no longer wanted go (with their sessions). Returns what changed.
    ///
    /// `switching` are the peer leases of other types: a peer already known for such a lease
    /// (it advertised wireguard before, or its wireguard secondary handshook from its
    /// PublicIP) is kept while the lease is there, so traffic keeps flowing while a cluster
    /// switches types.
    pub fn apply(&self, want: &[WgPeer], switching: &[Switching]) -> Diff {
        let mut applied = self.sh.applied.lock().unwrap_or_else(|e| e.into_inner());
        let kept: Vec<WgPeer> = applied
            .iter()
            .filter(|p| {
                switching
                    .iter()
                    .any(|s| s.lease == p.lease && IpNet::V4(s.allowed) == p.allowed)
                    && !want.iter().any(|w| w.public_key == p.public_key)
            })
            .cloned()
            .collect();
        let want = &[want, &kept[..]].concat()[..];
        let d = diff(&applied, want);
        let mut table = self.sh.table.write().unwrap_or_else(|e| e.into_inner());
        table.switching = switching.iter().map(|s| (s.public_ip, *s)).collect();
        if d.is_empty() {
            return d;
        }
        let mut added = Vec::new();
        for k in &d.remove {
            if let Some(p) = table.by_key.remove(k) {
                table.by_idx.retain(|_, q| !Arc::ptr_eq(q, &p));
            }
        }
        for w in &d.update {
            if let Some(p) = table.by_key.get(&w.public_key) {
                let mut s = p.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.lease_endpoint != w.endpoint {
                    s.lease_endpoint = w.endpoint;
                    s.endpoint = w.endpoint;
                }
                s.allowed = vec![w.allowed];
            }
        }
        for w in &d.add {
            added.push(insert_peer(&self.sh, &mut table, w));
        }
        table.rebuild_routes();
        drop(table);
        *applied = want.to_vec();
        let mut out = [0u8; HANDSHAKE_MAX];
        for p in added {
            let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
            if let TunnResult::WriteToNetwork(m) = t.format_handshake_initiation(&mut out, false) {
                send(&self.sh, &p, m, p.endpoint());
            }
        }
        d
    }

    /// Every peer's state, by public key.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        let peers: Vec<Arc<Peer>> = {
            let t = self.sh.table.read().unwrap_or_else(|e| e.into_inner());
            t.by_key.values().cloned().collect()
        };
        let now = SystemTime::now();
        let mut v: Vec<PeerSnapshot> = peers
            .iter()
            .map(|p| {
                let since = p
                    .tunn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .time_since_last_handshake();
                let s = p.state.lock().unwrap_or_else(|e| e.into_inner());
                PeerSnapshot {
                    public_key: p.public_key,
                    endpoint: s.endpoint,
                    allowed_ips: s.allowed.clone(),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                    persistent_keepalive: self.sh.keepalive,
                }
            })
            .collect();
        v.sort_by_key(|p| p.public_key);
        v
    }

    /// Stops the threads (each sees the flag within [`POLL_INTERVAL`]) and returns them to
    /// be joined; the TUN and socket close when the last thread ends.
    pub fn stop(&mut self) -> Vec<JoinHandle<()>> {
        self.sh.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).collect()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Relaxed);
    }
}

/// A new peer with its own core, in every index of the table.
fn insert_peer(sh: &Shared, table: &mut Table, w: &WgPeer) -> Arc<Peer> {
    let index = sh.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
    let tunn = Tunn::new(
        sh.secret.clone(),
        PublicKey::from(w.public_key),
        sh.psk,
        sh.keepalive,
        index,
        Some(sh.limiter.clone()),
    );
    let p = Arc::new(Peer {
        public_key: w.public_key,
        tunn: Mutex::new(tunn),
        state: Mutex::new(PeerState {
            endpoint: w.endpoint,
            lease_endpoint: w.endpoint,
            allowed: vec![w.allowed],
        }),
        rx_bytes: AtomicU64::new(0),
        tx_bytes: AtomicU64::new(0),
    });
    table.by_key.insert(w.public_key, p.clone());
    table.by_idx.insert(index, p.clone());
    table.rebuild_routes();
    p
}

/// The peer for a handshake from `from` with key `key` that no peer has: one made for the
/// lease of another type at that address (its wireguard secondary, mid-switch), if any.
fn switching_peer(sh: &Shared, key: [u8; 32], from: SocketAddr) -> Option<Arc<Peer>> {
    let IpAddr::V4(ip) = from.ip() else {
        return None;
    };
    let mut applied = sh.applied.lock().unwrap_or_else(|e| e.into_inner());
    let mut table = sh.table.write().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = table.by_key.get(&key) {
        return Some(p.clone());
    }
    let s = *table.switching.get(&ip)?;
    // The lease's earlier key (if any) gives way to the one its node uses now.
    if let Some(old) = applied.iter().position(|p| p.lease == s.lease) {
        let old = applied.remove(old);
        if let Some(p) = table.by_key.remove(&old.public_key) {
            table.by_idx.retain(|_, q| !Arc::ptr_eq(q, &p));
        }
    }
    let w = WgPeer {
        public_key: key,
        endpoint: from,
        allowed: IpNet::V4(s.allowed),
        lease: s.lease,
    };
    tracing::info!(subnet = %s.allowed, endpoint = %from, "wireguard peer of another type (switching) accepted");
    applied.push(w.clone());
    Some(insert_peer(sh, &mut table, &w))
}

fn send(sh: &Shared, peer: &Peer, d: &[u8], to: SocketAddr) {
    match sh.sock.send_to(d, to) {
        Ok(n) => {
            sh.stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!("wireguard send to {to}: {e}");
            sh.stats.count(DropReason::IoError);
        }
    }
}

/// Sends the packets `t` (the peer's core, locked) queued while it had no session, once it
/// has one, oldest first; returns how many left. boringtun releases its queue only when asked
/// (`decapsulate` with an empty datagram), and asking without a session sends the oldest
/// packet to the back of the queue and may start a new handshake; so this asks only with a
/// session. It runs before every run of packets sealed for the peer (new packets must not
/// overtake queued ones) and after every authenticated message from it: a responder's session
/// becomes usable only with the initiator's first data message (or keepalive), which is not a
/// handshake message, so queued packets waited for the next handshake (seconds) before.
fn release_queued(
    sh: &Shared,
    peer: &Peer,
    t: &mut Tunn,
    out: &mut [u8],
    mut to: Option<SocketAddr>,
) -> usize {
    if t.time_since_last_handshake().is_none() {
        return 0;
    }
    let mut n = 0;
    while let TunnResult::WriteToNetwork(d) = t.decapsulate(None, &[], out) {
        n += 1;
        sh.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
        let dst = *to.get_or_insert_with(|| peer.endpoint());
        send(sh, peer, d, dst);
    }
    n
}

/// Sends `run` (sealed datagrams to `peer`, each `seg` bytes, the last possibly shorter): one
/// `sendmsg` with UDP_SEGMENT when GSO works, else one datagram per call. GSO is switched off
/// for good (and counted) the first time the kernel refuses it.
fn flush(sh: &Shared, peer: &Peer, run: &[&[u8]], seg: usize, to: SocketAddr, gso: &mut bool) {
    if run.is_empty() {
        return;
    }
    if *gso && run.len() > 1 {
        match udp_plane::gso_send(&sh.sock, run, seg, to) {
            Ok(n) => {
                sh.stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                sh.stats.gso_sends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if udp_plane::gso_refused(e) => {
                tracing::warn!("UDP GSO refused ({e}); sending one datagram per call from now on");
                *gso = false;
                sh.stats.gso_disabled.store(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!("wireguard gso send to {to}: {e}");
                sh.stats.count(DropReason::IoError);
                return;
            }
        }
    }
    for d in run {
        send(sh, peer, d, to);
    }
}

/// Where an inner packet read from the TUN goes.
enum Route {
    Peer(Arc<Peer>),
    /// No peer's allowed IPs contain the destination (ICMP unreachable, rate limited).
    NoPeer,
    /// Dropped and counted already (not for a peer: not IP, or the TUN's own IPv6 noise).
    Skip,
}

/// Writes `pkts` (inner packets of one batch) to the TUN, coalescing TCP runs (and UDP runs
/// with USO) into super-packets when the TUN takes the vnet header; counted.
fn deliver(sh: &Shared, pkts: &[&[u8]], runs: &mut Vec<coalesce::Run>, hdr: &mut Vec<u8>) {
    if pkts.is_empty() {
        return;
    }
    udp_plane::write_batch(
        &sh.dev,
        pkts,
        sh.vnet,
        sh.uso,
        runs,
        hdr,
        |done, r| match r {
            Ok(_) => {
                sh.stats
                    .rx_packets
                    .fetch_add(done.len() as u64, Ordering::Relaxed);
                if done.len() > 1 {
                    sh.stats
                        .tun_coalesced_writes
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::debug!("writing {}: {e}", super::DEVICE);
                sh.stats.count(DropReason::IoError);
            }
        },
    );
}

/// TUN → peers. One read returns up to 64 KiB (TSO, vnet header) that tun-rs splits into MTU
/// packets (a lone packet: whatever else is queued is taken too); the packets are routed under
/// one table lock, sealed under one lock of their peer's core per run of packets to that peer,
/// and runs of equal-size datagrams to one peer (ciphertext = plaintext + 32, so equal
/// segments give equal datagrams) leave in one UDP GSO send.
fn egress(sh: &Shared) {
    let mtu = sh.mtu as usize + 64;
    let mut orig = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; mtu]; BATCH];
    let mut sizes = vec![0usize; BATCH];
    let mut sealed = vec![vec![0u8; sealed_len(mtu)]; BATCH];
    // Length of each sealed data datagram in `sealed`; 0: nothing to send for that packet.
    let mut lens = vec![0usize; BATCH];
    let mut routes: Vec<Route> = Vec::with_capacity(BATCH);
    // Packets the cores queued while waiting for a handshake, sealed when released.
    let mut queued = vec![0u8; sealed_len(mtu)];
    let mut gso = sh.vnet;
    if !gso {
        sh.stats.gso_disabled.store(1, Ordering::Relaxed);
    }
    let mut limiter = icmp_limiter(Instant::now());
    let (mut runs, mut hdr) = (Vec::new(), Vec::new());
    while !sh.stop.load(Ordering::Relaxed) {
        let mut n = match sh.dev.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                udp_plane::wait_readable(&sh.dev);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("reading {}: {e}", super::DEVICE);
                sh.stats.count(DropReason::IoError);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        sh.stats.tun_reads.fetch_add(1, Ordering::Relaxed);
        // A packet that came alone (a UDP flow, a small TCP write): take what else is already
        // queued, without waiting, so equal-size packets to one peer share a GSO send.
        if n == 1 {
            while n < udp_plane::GSO_MAX_SEGMENTS {
                match sh
                    .dev
                    .recv_multiple(&mut orig, &mut bufs[n..], &mut sizes[n..], 0)
                {
                    Ok(k) if k > 0 => {
                        sh.stats.tun_reads.fetch_add(1, Ordering::Relaxed);
                        n += k;
                        if k > 1 {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        // Pass 1: the peer of every packet, under one table lock.
        routes.clear();
        {
            let t = sh.table.read().unwrap_or_else(|e| e.into_inner());
            for i in 0..n {
                let pkt = &bufs[i][..sizes[i]];
                routes.push(match inner_dst(pkt) {
                    None => {
                        sh.stats.count(DropReason::NotIpv4);
                        Route::Skip
                    }
                    Some(dst) => t
                        .lookup(dst)
                        .map_or(Route::NoPeer, |p| Route::Peer(p.clone())),
                });
            }
        }
        // Pass 2: seal, one core lock per run of packets to the same peer.
        let mut i = 0;
        while i < n {
            lens[i] = 0;
            let peer = match &routes[i] {
                Route::Peer(p) => p.clone(),
                Route::NoPeer => {
                    sh.stats.count(DropReason::NoPeer);
                    if limiter.allow(Instant::now()) {
                        if let Some(reply) = unreachable_reply(&bufs[i][..sizes[i]]) {
                            let before = sh.stats.rx_packets.load(Ordering::Relaxed);
                            deliver(sh, &[&reply], &mut runs, &mut hdr);
                            // Counted as an ICMP message, not as a packet from a peer.
                            if sh.stats.rx_packets.load(Ordering::Relaxed) > before {
                                sh.stats.rx_packets.fetch_sub(1, Ordering::Relaxed);
                                sh.stats.icmp_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    i += 1;
                    continue;
                }
                Route::Skip => {
                    i += 1;
                    continue;
                }
            };
            let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            // Packets that waited for a session leave before the new ones.
            release_queued(sh, &peer, &mut t, &mut queued, None);
            while i < n && matches!(&routes[i], Route::Peer(p) if Arc::ptr_eq(p, &peer)) {
                let len = sizes[i];
                lens[i] = 0;
                match seal(&mut t, &bufs[i][..len], &mut sealed[i]) {
                    // A sealed data message is 32 bytes longer than its packet.
                    Step::Network(d) if d.len() == len + DATA_OVERHEAD => {
                        lens[i] = d.len();
                        sh.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                    }
                    // A handshake initiation (the packet waits in the core): at once.
                    Step::Network(d) => send(sh, &peer, d, peer.endpoint()),
                    Step::Nothing | Step::Tunnel(_) => {}
                    Step::Drop(r) => sh.stats.count(r),
                }
                i += 1;
            }
        }
        // Pass 3: runs of datagrams to one peer, same size (the last may be shorter), leave
        // in one GSO send.
        let mut run: Vec<&[u8]> = Vec::with_capacity(udp_plane::GSO_MAX_SEGMENTS);
        let mut cur: Option<(&Arc<Peer>, SocketAddr)> = None;
        let (mut seg, mut bytes, mut closed) = (0usize, 0usize, false);
        for i in 0..n {
            let (Route::Peer(p), l) = (&routes[i], lens[i]) else {
                continue;
            };
            if l == 0 {
                continue;
            }
            let d = &sealed[i][..l];
            let same = matches!(cur, Some((q, _)) if Arc::ptr_eq(q, p));
            let fits = same
                && !closed
                && l <= seg
                && run.len() < udp_plane::GSO_MAX_SEGMENTS
                && bytes + l <= udp_plane::GSO_MAX_BYTES;
            if !fits {
                if let Some((q, to)) = cur {
                    flush(sh, q, &run, seg, to, &mut gso);
                }
                run.clear();
                let to = if same {
                    cur.map_or_else(|| p.endpoint(), |(_, to)| to)
                } else {
                    p.endpoint()
                };
                cur = Some((p, to));
                seg = l;
                bytes = 0;
                closed = false;
            }
            run.push(d);
            bytes += l;
            closed |= l < seg;
        }
        if let Some((q, to)) = cur {
            flush(sh, q, &run, seg, to, &mut gso);
        }
    }
}

/// The peer of the datagrams a batch is working through, with its allowed IPs (looked up once
/// per peer and batch).
struct Current {
    /// The session index the batch's datagrams name (ours, without the 8 random low bits).
    idx: u32,
    peer: Arc<Peer>,
    allowed: Vec<IpNet>,
    /// An authenticated datagram of the batch came from it (roam once per batch).
    authenticated: bool,
}

/// Peers → TUN. One receive with UDP_GRO returns up to 64 datagrams of one size from one
/// sender; each is opened into its own slot of `out`, and the inner packets of the batch go to
/// the TUN with TCP runs coalesced into one super-packet per run (vnet header, no copy).
fn ingress(sh: &Shared) {
    // Without UDP_GRO (or without the TUN's vnet header) one receive is one datagram, written
    // to the TUN as it is.
    let gro =
        UDP_GRO && sh.vnet && socket::setsockopt(&sh.sock, sockopt::UdpGroSegment, &true).is_ok();
    if !gro {
        if UDP_GRO && sh.vnet {
            tracing::warn!("UDP GRO not available; receiving one datagram per call");
        }
        sh.stats.gro_disabled.store(1, Ordering::Relaxed);
    }
    let mut buf = vec![0u8; BUF];
    // Opened packets, one slot per datagram of a receive (bounded: a full `out` is written
    // to the TUN before the batch goes on).
    let mut out = vec![0u8; OUT];
    // Handshake replies, and the packets a finished handshake releases, sealed.
    let mut scratch = vec![0u8; sealed_len(BUF)];
    let mut got: Vec<(usize, usize)> = Vec::with_capacity(udp_plane::GSO_MAX_SEGMENTS);
    let (mut runs, mut hdr) = (Vec::new(), Vec::new());
    while !sh.stop.load(Ordering::Relaxed) {
        let (len, from, seg) = match udp_plane::receive(&sh.sock, &mut buf) {
            Ok(x) => x,
            // The receive timeout: look at the stop flag.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::debug!("wireguard receive: {e}");
                sh.stats.count(DropReason::IoError);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        sh.stats.udp_receives.fetch_add(1, Ordering::Relaxed);
        let Some(from) = from else {
            sh.stats.count(DropReason::Invalid);
            continue;
        };
        let seg = seg.unwrap_or(len).max(1);
        if len > seg {
            sh.stats.gro_batches.fetch_add(1, Ordering::Relaxed);
        }
        let mut cur: Option<Current> = None;
        got.clear();
        let mut off = 0;
        for datagram in buf[..len].chunks(seg) {
            let slot = datagram.len().max(HANDSHAKE_MAX);
            if off + slot > out.len() {
                flush_opened(sh, &out, &got, &mut runs, &mut hdr);
                got.clear();
                off = 0;
            }
            if let Some(n) = receive_one(
                sh,
                datagram,
                from,
                &mut out[off..off + slot],
                &mut scratch,
                &mut cur,
            ) {
                got.push((off, n));
                off += slot;
            }
        }
        flush_opened(sh, &out, &got, &mut runs, &mut hdr);
        if let Some(c) = cur.filter(|c| c.authenticated) {
            c.peer.roam(from);
            // The peer's data may have made a session usable (a responder's first one).
            let mut t = c.peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            release_queued(sh, &c.peer, &mut t, &mut scratch, Some(from));
        }
    }
}

/// Writes the opened packets `got` (offset and length in `out`) to the TUN.
fn flush_opened(
    sh: &Shared,
    out: &[u8],
    got: &[(usize, usize)],
    runs: &mut Vec<coalesce::Run>,
    hdr: &mut Vec<u8>,
) {
    // One small allocation per receive (≤ 64 slices).
    let pkts: Vec<&[u8]> = got.iter().filter_map(|&(o, n)| out.get(o..o + n)).collect();
    deliver(sh, &pkts, runs, hdr);
}

/// One datagram from `from`: a data message is opened into `slot` (its inner packet's length
/// returned, the packet at the start of `slot`); handshake messages are answered (replies and
/// released packets sealed in `scratch`). `cur` is the batch's peer so far.
fn receive_one(
    sh: &Shared,
    datagram: &[u8],
    from: SocketAddr,
    slot: &mut [u8],
    scratch: &mut [u8],
    cur: &mut Option<Current>,
) -> Option<usize> {
    sh.stats
        .rx_bytes
        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
    let parsed = match Tunn::parse_incoming_packet(datagram) {
        Ok(p) => p,
        Err(_) => {
            sh.stats.count(DropReason::Invalid);
            return None;
        }
    };
    let peer = match &parsed {
        Packet::PacketData(p) => {
            // The batch's peer again (the usual case: one GRO batch is one sender's).
            let idx = p.receiver_idx >> 8;
            if cur.as_ref().is_none_or(|c| c.idx != idx) {
                let p = by_index(sh, p.receiver_idx)?;
                let allowed = p.allowed();
                *cur = Some(Current {
                    idx,
                    peer: p,
                    allowed,
                    authenticated: false,
                });
            }
            let c = cur.as_mut()?;
            c.peer
                .rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            let mut t = c.peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            return match open(&mut t, from.ip(), datagram, slot, &c.allowed) {
                Step::Tunnel(p) => {
                    c.authenticated = true;
                    let n = p.len();
                    drop(t);
                    Some(n)
                }
                // A keepalive.
                Step::Nothing => {
                    c.authenticated = true;
                    None
                }
                Step::Network(d) => {
                    // Not sent by a data message; answered all the same.
                    let to = from;
                    let peer = c.peer.clone();
                    send(sh, &peer, d, to);
                    None
                }
                Step::Drop(r) => {
                    sh.stats.count(r);
                    None
                }
            };
        }
        Packet::HandshakeInit(init) => {
            // MAC1, and under load the cookie, before the DH that names the sender.
            match sh.limiter.verify_packet(Some(from.ip()), datagram, scratch) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    if sh.sock.send_to(cookie, from).is_ok() {
                        sh.stats.cookie_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    sh.stats.count(DropReason::UnderLoad);
                    return None;
                }
                Err(TunnResult::Err(e)) => {
                    sh.stats.count(DropReason::of(&e));
                    return None;
                }
                Err(_) => {
                    sh.stats.count(DropReason::Refused);
                    return None;
                }
            }
            let Ok(half) = parse_handshake_anon(&sh.secret, &sh.public, init) else {
                sh.stats.count(DropReason::AuthFailed);
                return None;
            };
            let known = {
                let t = sh.table.read().unwrap_or_else(|e| e.into_inner());
                t.by_key.get(&half.peer_static_public).cloned()
            };
            match known.or_else(|| switching_peer(sh, half.peer_static_public, from)) {
                Some(p) => p,
                None => {
                    sh.stats.count(DropReason::UnknownKey);
                    return None;
                }
            }
        }
        Packet::HandshakeResponse(p) => by_index(sh, p.receiver_idx)?,
        Packet::PacketCookieReply(p) => by_index(sh, p.receiver_idx)?,
    };
    peer.rx_bytes
        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
    let allowed = peer.allowed();
    let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
    let authenticated = match open(&mut t, from.ip(), datagram, scratch, &allowed) {
        Step::Network(d) => {
            send(sh, &peer, d, from);
            // A finished handshake (as initiator) releases the packets that waited for it.
            release_queued(sh, &peer, &mut t, scratch, Some(from));
            true
        }
        // Handshake messages never carry an inner packet; a cookie reply is not proof of the
        // sender's address.
        Step::Tunnel(_) | Step::Nothing => false,
        Step::Drop(r) => {
            sh.stats.count(r);
            false
        }
    };
    drop(t);
    if authenticated {
        peer.roam(from);
    }
    None
}

fn by_index(sh: &Shared, receiver: u32) -> Option<Arc<Peer>> {
    let t = sh.table.read().unwrap_or_else(|e| e.into_inner());
    let p = t.by_idx.get(&(receiver >> 8)).cloned();
    if p.is_none() {
        sh.stats.count(DropReason::UnknownIndex);
    }
    p
}

/// Every [`TIMER_TICK`]: the rate limiter's window, then each peer's timers (handshake
/// retries, rekeying, keepalives, persistent keepalives, expiry).
fn timers(sh: &Shared) {
    let mut out = vec![0u8; sealed_len(0)];
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        sh.limiter.reset_count();
        let peers: Vec<Arc<Peer>> = {
            let t = sh.table.read().unwrap_or_else(|e| e.into_inner());
            t.by_key.values().cloned().collect()
        };
        for p in peers {
            let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
            match t.update_timers(&mut out) {
                TunnResult::WriteToNetwork(d) => {
                    sh.stats.timer_sends.fetch_add(1, Ordering::Relaxed);
                    send(sh, &p, d, p.endpoint());
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::debug!("wireguard timers: {e:?}"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(b: u8) -> PrivateKey {
        PrivateKey::from_random([b; 32])
    }

    fn tunn(own: &PrivateKey, peer: &PrivateKey, index: u32) -> Tunn {
        Tunn::new(
            own.secret(),
            PublicKey::from(peer.public()),
            None,
            None,
            index,
            None,
        )
    }

    /// A minimal IPv4/UDP packet from `src` to `dst` with `payload`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, (8 + payload.len()) as u8, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// A handshake between a (initiator) and b, then one packet a → b; returns the cores and
    /// the sealed datagram.
    fn connected(payload: &[u8], src: [u8; 4]) -> (Tunn, Tunn, Vec<u8>) {
        let (ka, kb) = (key(1), key(2));
        let (mut a, mut b) = (tunn(&ka, &kb, 1), tunn(&kb, &ka, 2));
        let pkt = ipv4(src, [10, 5, 2, 5], payload);
        let mut out = vec![0u8; 2048];
        let mut out2 = vec![0u8; 2048];
        let init = match seal(&mut a, &pkt, &mut out) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(init.len(), 148, "a handshake initiation; the packet waits");
        let from: IpAddr = "172.30.0.11".parse().unwrap();
        let resp = match open(&mut b, from, &init, &mut out2, &[]) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        // The response completes a's handshake: a keepalive goes out, then the queued packet.
        let ka = match open(&mut a, from, &resp, &mut out, &[]) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(open(&mut b, from, &ka, &mut out2, &[]), Step::Nothing);
        let sealed = match a.decapsulate(None, &[], &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        (a, b, sealed)
    }

    #[test]
    fn sealed_packets_open_once_and_only_from_allowed_sources() {
        let payload = b"flannel-wireguard-payload";
        let (mut a, mut b, sealed) = connected(payload, [10, 5, 1, 5]);
        assert!(
            !sealed.windows(payload.len()).any(|w| w == payload),
            "the payload is encrypted"
        );
        let from: IpAddr = "172.30.0.11".parse().unwrap();
        let allowed: Vec<IpNet> = vec!["10.5.1.0/24".parse().unwrap()];
        let mut out = vec![0u8; 2048];
        match open(&mut b, from, &sealed, &mut out, &allowed) {
            Step::Tunnel(p) => assert_eq!(p, ipv4([10, 5, 1, 5], [10, 5, 2, 5], payload)),
            other => panic!("{other:?}"),
        }
        // The same datagram again: a replay.
        assert_eq!(
            open(&mut b, from, &sealed, &mut out, &allowed),
            Step::Drop(DropReason::Replayed)
        );
        // The next packet with one bit flipped: refused by the AEAD; the genuine one still
        // opens (a forgery does not use up its counter).
        let pkt2 = ipv4([10, 5, 1, 5], [10, 5, 2, 5], b"second");
        let mut out_a = vec![0u8; 2048];
        let second = match seal(&mut a, &pkt2, &mut out_a) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        let mut forged = second.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(
            open(&mut b, from, &forged, &mut out, &allowed),
            Step::Drop(DropReason::AuthFailed)
        );
        assert_eq!(
            open(&mut b, from, &second, &mut out, &allowed),
            Step::Tunnel(&pkt2[..])
        );
    }

    #[test]
    fn an_inner_source_outside_the_peers_subnet_is_dropped() {
        let (_a, mut b, sealed) = connected(b"x", [10, 5, 3, 5]);
        let allowed: Vec<IpNet> = vec!["10.5.1.0/24".parse().unwrap()];
        let mut out = vec![0u8; 2048];
        assert_eq!(
            open(
                &mut b,
                "172.30.0.11".parse().unwrap(),
                &sealed,
                &mut out,
                &allowed
            ),
            Step::Drop(DropReason::Spoofed)
        );
    }

    #[test]
    fn a_handshake_with_the_wrong_key_fails() {
        // c believes it talks to b but b's core expects a.
        let (kb, kc) = (key(2), key(3));
        let mut c = tunn(&kc, &kb, 3);
        let mut b = tunn(&kb, &key(1), 2);
        let mut out = vec![0u8; 2048];
        let init = match seal(&mut c, &ipv4([10, 5, 3, 5], [10, 5, 2, 5], b"x"), &mut out) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        let mut out2 = vec![0u8; 2048];
        assert!(matches!(
            open(
                &mut b,
                "172.30.0.13".parse().unwrap(),
                &init,
                &mut out2,
                &[]
            ),
            Step::Drop(_)
        ));
        // Garbage is not a message.
        assert_eq!(
            open(
                &mut b,
                "172.30.0.13".parse().unwrap(),
                b"nonsense",
                &mut out2,
                &[]
            ),
            Step::Drop(DropReason::Invalid)
        );
    }

    #[test]
    fn buffers_too_small_are_refused_not_a_panic() {
        let (ka, kb) = (key(1), key(2));
        let mut a = tunn(&ka, &kb, 1);
        let mut small = vec![0u8; 64];
        assert_eq!(
            seal(
                &mut a,
                &ipv4([10, 5, 1, 5], [10, 5, 2, 5], b"x"),
                &mut small
            ),
            Step::Drop(DropReason::Invalid)
        );
        assert_eq!(sealed_len(1400), 1432);
        assert_eq!(sealed_len(0), 148);
    }

    #[test]
    fn inner_destinations_of_both_families_and_the_tuns_noise() {
        let v4 = ipv4([10, 5, 1, 5], [10, 5, 2, 5], b"x");
        assert_eq!(inner_dst(&v4), Some("10.5.2.5".parse().unwrap()));
        let v6 = |dst: &str| ipv6("fd10:0:0:1::5", dst, b"");
        assert_eq!(
            inner_dst(&v6("fd10:0:0:2::5")),
            Some("fd10:0:0:2::5".parse().unwrap())
        );
        // Router solicitations, MLD, link-local: the TUN's own, for no peer.
        assert_eq!(inner_dst(&v6("ff02::2")), None);
        assert_eq!(inner_dst(&v6("fe80::1")), None);
        assert_eq!(inner_dst(&v4[..12]), None);
        assert_eq!(inner_dst(&[]), None);
        assert_eq!(inner_dst(&[0x20; 40]), None);
    }

    /// A minimal IPv6/UDP packet from `src` to `dst`.
    fn ipv6(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let len = 8 + payload.len();
        let mut p = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, 17, 64];
        p.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, len as u8, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn sealed_ipv6_packets_open_only_from_the_peers_ipv6_subnet() {
        let (mut a, mut b, _) = connected(b"x", [10, 5, 1, 5]);
        let from: IpAddr = "fd00:210::11".parse().unwrap();
        let allowed: Vec<IpNet> = vec!["fd10:0:0:1::/64".parse().unwrap()];
        let mut out_a = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let mut sealed = |pkt: &[u8]| match seal(&mut a, pkt, &mut out_a) {
            Step::Network(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        let good = ipv6("fd10:0:0:1::5", "fd10:0:0:2::5", b"v6");
        let spoofed = ipv6("fd10:0:0:3::5", "fd10:0:0:2::5", b"v6");
        let (good_d, spoofed_d) = (sealed(&good), sealed(&spoofed));
        assert_eq!(
            open(&mut b, from, &good_d, &mut out, &allowed),
            Step::Tunnel(&good[..])
        );
        assert_eq!(
            open(&mut b, from, &spoofed_d, &mut out, &allowed),
            Step::Drop(DropReason::Spoofed)
        );
        // A peer of the IPv4 device (IPv4 allowed IPs only) gets no IPv6 packet through.
        let v4only: Vec<IpNet> = vec!["10.5.1.0/24".parse().unwrap()];
        let again = sealed(&good);
        assert_eq!(
            open(&mut b, from, &again, &mut out, &v4only),
            Step::Drop(DropReason::Spoofed)
        );
    }

    #[test]
    fn inner_ipv6_sources_are_checked_against_the_allowed_ips() {
        let allowed: Vec<IpNet> = vec!["fd10:0:0:1::/64".parse().unwrap()];
        let p = [0u8; 4];
        assert_eq!(
            allowed_step(&p, "fd10:0:0:1::5".parse().unwrap(), &allowed),
            Step::Tunnel(&p[..])
        );
        for src in ["fd10:0:0:3::5", "10.5.1.5", "::ffff:10.5.1.5"] {
            assert_eq!(
                allowed_step(&p, src.parse().unwrap(), &allowed),
                Step::Drop(DropReason::Spoofed),
                "{src}"
            );
        }
    }

    #[test]
    fn routes_prefer_the_longest_prefix() {
        let mk = |b: u8, nets: &[&str]| {
            Arc::new(Peer {
                public_key: [b; 32],
                tunn: Mutex::new(tunn(&key(9), &key(b), b.into())),
                state: Mutex::new(PeerState {
                    endpoint: "172.30.0.1:51820".parse().unwrap(),
                    lease_endpoint: "172.30.0.1:51820".parse().unwrap(),
                    allowed: nets.iter().map(|n| n.parse().unwrap()).collect(),
                }),
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
            })
        };
        let mut t = Table::default();
        t.by_key.insert([1; 32], mk(1, &["10.5.0.0/16"]));
        t.by_key.insert([2; 32], mk(2, &["10.5.2.0/24"]));
        t.rebuild_routes();
        assert_eq!(
            t.lookup("10.5.2.9".parse().unwrap()).unwrap().public_key,
            [2; 32]
        );
        assert_eq!(
            t.lookup("10.5.3.9".parse().unwrap()).unwrap().public_key,
            [1; 32]
        );
        assert!(t.lookup("10.6.0.1".parse().unwrap()).is_none());
    }
}
