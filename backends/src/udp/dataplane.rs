//! The udp backend's packet loops: one OS thread per direction, blocking batched I/O, no async
//! runtime in the packet path (measured: running them as tokio tasks cost a reactor wake-up per
//! batch and held ~0.5 core in the runtime thread at 5 Gbit/s).
//!
//! - egress (`tun_to_udp`): one TUN read returns up to 64 KiB (vnet header, TSO) that tun-rs
//!   splits into MTU packets; runs of packets to one peer leave in one `sendmsg` with UDP_SEGMENT.
//! - ingress (`udp_to_tun`): one `recvmsg` with UDP_GRO returns many datagrams of one size; each
//!   is validated, then runs that Linux GRO would merge (coalesce.rs; TCP and UDP, IPv4 and
//!   IPv6) leave in one TUN write each, a TSO/USO super-packet gathered without copies.
//!
//! Both loops wake at least every [`POLL_INTERVAL`] to see the stop flag; the TUN is
//! non-blocking and polled, the socket blocks with a receive timeout. Sends block, which turns a
//! full socket buffer into back-pressure on the TUN queue rather than a drop in userspace.

use std::io::IoSlice;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use tun_rs::SyncDevice;

use super::coalesce;
use super::packet::{self, DropReason, Egress, Routes};
use super::{UdpStats, DEVICE};

/// Longest a loop sleeps before it looks at the stop flag again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Most segments one UDP GSO send may carry (kernel limit UDP_MAX_SEGMENTS).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes one UDP GSO send may carry.
pub(crate) const GSO_MAX_BYTES: usize = 65_000;
/// `flannel0`'s transmit queue (packets waiting for the egress thread).
const TX_QUEUE_LEN: u32 = 1000;
/// Socket buffers asked for (SO_*BUFFORCE as root, else capped by net.core.*mem_max): a GRO
/// receive queues 64 KiB per entry, so the 208 KiB default holds only three bursts.
const SOCKET_BUFFER: usize = 4 << 20;

/// Everything both loops share.
pub struct Shared {
    pub dev: SyncDevice,
    pub sock: UdpSocket,
    pub routes: Arc<RwLock<Routes>>,
    pub stats: Arc<UdpStats>,
    pub stop: Arc<AtomicBool>,
    pub mtu: u32,
    pub offload: bool,
}

/// Prepares the descriptors for the loops: TUN non-blocking (polled), socket blocking with a
/// receive timeout, bigger socket buffers. Errors name the step.
pub fn prepare(dev: &SyncDevice, sock: &UdpSocket) -> std::io::Result<()> {
    dev.set_nonblocking(true)?;
    // TUN's default queue of 500 overflows in the bursts of a fast UDP flow (which arrives one
    // packet per read); Ethernet's 1000 absorbs them (3 Gbit/s offered: 14% -> 7.7% lost).
    dev.set_tx_queue_len(TX_QUEUE_LEN)?;
    prepare_socket(sock)
}

/// The socket half of [`prepare`]: blocking with a receive timeout of [`POLL_INTERVAL`],
/// [`SOCKET_BUFFER`]-byte buffers.
pub(crate) fn prepare_socket(sock: &UdpSocket) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(POLL_INTERVAL))?;
    // Root may exceed net.core.[rw]mem_max; otherwise the kernel caps the plain request.
    if socket::setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket::setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if socket::setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket::setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    Ok(())
}

/// Waits until `fd` is readable or [`POLL_INTERVAL`] passed.
pub(crate) fn wait_readable(fd: &impl AsFd) {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
}

/// Whether a [`gso_send`] error means the kernel refuses UDP GSO for good (EIO, EINVAL,
/// EOPNOTSUPP): the sender falls back to one datagram per call from then on.
pub(crate) fn gso_refused(e: nix::errno::Errno) -> bool {
    matches!(
        e,
        nix::errno::Errno::EIO | nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP
    )
}

/// One `sendmsg` of the datagrams `run` (each `seg` bytes, the last possibly shorter) to `to`
/// with UDP_SEGMENT: the kernel joins the iovecs and cuts them at `seg` (no copy here).
/// Returns the bytes sent; an error for which [`gso_refused`] holds means the kernel refuses GSO.
pub(crate) fn gso_send(
    sock: &UdpSocket,
    run: &[&[u8]],
    seg: usize,
    to: SocketAddr,
) -> nix::Result<usize> {
    let addr = SockaddrStorage::from(to);
    let seg16 = u16::try_from(seg).unwrap_or(u16::MAX);
    let iov: Vec<std::io::IoSlice<'_>> = run.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let cmsg = [ControlMessage::UdpGsoSegments(&seg16)];
    loop {
        match socket::sendmsg(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&addr),
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Sends `run` (datagrams of `seg` bytes, the last possibly shorter, all to `to`): one sendmsg
/// with UDP_SEGMENT and one iovec per datagram when GSO works (no copy: the kernel joins the
/// iovecs and cuts them at `seg`), else one datagram per call. GSO is switched off for good
/// (and counted) the first time the kernel refuses it.
fn flush(
    sock: &UdpSocket,
    run: &[&[u8]],
    seg: usize,
    to: SocketAddr,
    gso: &mut bool,
    stats: &UdpStats,
) {
    if run.is_empty() {
        return;
    }
    if *gso && run.len() > 1 {
        match gso_send(sock, run, seg, to) {
            Ok(bytes) => {
                stats
                    .tx_packets
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                stats.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                stats.gso_sends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if gso_refused(e) => {
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
        match sock.send_to(pkt, to) {
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

/// Most packets gathered from back-to-back single-packet TUN reads before they are sent; the
/// rest of the 128 buffers stays free for one more 64 KiB super-packet (≤ 64 segments).
const DRAIN_MAX: usize = GSO_MAX_SEGMENTS;

/// Egress loop: TUN → UDP, until the stop flag is set.
pub fn tun_to_udp(sh: Arc<Shared>) {
    let Shared {
        dev,
        sock,
        routes,
        stats,
        stop,
        mtu,
        offload,
    } = &*sh;
    // One read may return a 64 KiB super-packet (vnet header offload), split into MTU packets.
    let mut orig = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; *mtu as usize + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut decisions: Vec<Egress> = Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE);
    let mut gso = *offload;
    if !gso {
        stats.gso_disabled.store(1, Ordering::Relaxed);
    }
    let mut limiter = packet::icmp_limiter(Instant::now());
    let mut icmp_table = tun_rs::GROTable::default();
    while !stop.load(Ordering::Relaxed) {
        let mut n = match dev.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(dev);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("reading {DEVICE}: {e}");
                stats.count(DropReason::IoError);
                continue;
            }
        };
        stats.tun_reads.fetch_add(1, Ordering::Relaxed);
        // A packet that came alone (a UDP flow, a small TCP write): take what else is already
        // queued, without waiting, so equal-size packets to one peer share a GSO send instead
        // of costing a send each.
        if n == 1 {
            while n < DRAIN_MAX {
                match dev.recv_multiple(&mut orig, &mut bufs[n..], &mut sizes[n..], 0) {
                    Ok(k) if k > 0 => {
                        stats.tun_reads.fetch_add(1, Ordering::Relaxed);
                        n += k;
                        if k > 1 {
                            // A super-packet: back to bulk mode.
                            break;
                        }
                    }
                    // Nothing queued (WouldBlock), or an error the next read reports.
                    _ => break,
                }
            }
        }
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
        let (mut dst, mut seg, mut bytes, mut closed) = (None::<SocketAddr>, 0usize, 0usize, false);
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
                            flush(sock, &run, seg, d, &mut gso, stats);
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
                        if let Some(reply) = packet::unreachable_reply(pkt) {
                            // Written like every TUN write: after a (zeroed) virtio-net header
                            // when the offload is on; send_multiple handles both modes.
                            let mut out = [vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN]];
                            out[0].extend_from_slice(&reply);
                            if dev
                                .send_multiple(
                                    &mut icmp_table,
                                    &mut out,
                                    tun_rs::VIRTIO_NET_HDR_LEN,
                                )
                                .is_ok()
                            {
                                stats.icmp_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                // IPv6 link-local noise of a fresh TUN lands in not_ipv4 (link_scope where
                // IPv6 is carried): counted, not logged.
                Egress::Drop(d) => stats.count(d),
            }
        }
        if let Some(d) = dst {
            flush(sock, &run, seg, d, &mut gso, stats);
        }
    }
}

/// The sender of a datagram as peers are recorded: an IPv6 sender without flow label and scope
/// (peers' `PublicIPv6` are global or ULA addresses).
fn sender(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), 0, 0)))
}

/// Reads one datagram (with UDP_GRO: several of one size, the size in a cmsg) into `buf`.
pub(crate) fn receive(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> nix::Result<(usize, Option<SocketAddr>, Option<usize>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(i32);
    let msg = socket::recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let mut seg = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(s) = c {
                seg = usize::try_from(s).ok().filter(|s| *s > 0);
            }
        }
    }
    Ok((msg.bytes, msg.address.as_ref().and_then(sender), seg))
}

/// Ingress loop: UDP → TUN, until the stop flag is set.
pub fn udp_to_tun(sh: Arc<Shared>) {
    let Shared {
        dev,
        sock,
        routes,
        stats,
        stop,
        offload,
        ..
    } = &*sh;
    // With UDP_GRO one receive returns many datagrams of one size (given in a cmsg).
    let gro = *offload && socket::setsockopt(sock, sockopt::UdpGroSegment, &true).is_ok();
    if !gro {
        stats.gro_disabled.store(1, Ordering::Relaxed);
        tracing::warn!("UDP GRO not available; receiving one datagram per call");
    }
    let vnet = dev.tcp_gso();
    // USO on the TUN (Linux ≥ 6.2): UDP flows are coalesced too.
    let uso = dev.udp_gso();
    let mut buf = vec![0u8; 65536];
    let mut runs: Vec<coalesce::Run> = Vec::with_capacity(GSO_MAX_SEGMENTS);
    let mut hdr: Vec<u8> = Vec::with_capacity(128);
    while !stop.load(Ordering::Relaxed) {
        let (len, from, seg) = match receive(sock, &mut buf) {
            Ok(x) => x,
            // The receive timeout: look at the stop flag.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
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
        let seg = seg.unwrap_or(len).max(1);
        // The valid packets, as slices of `buf` (one small allocation per receive).
        let mut valid: Vec<&[u8]> = Vec::with_capacity(len / seg + 1);
        {
            let r = routes.read().unwrap_or_else(|e| e.into_inner());
            for pkt in buf[..len].chunks(seg) {
                match r.ingress(from, pkt) {
                    Ok(()) => valid.push(pkt),
                    Err(d) => stats.count(d),
                }
            }
        }
        write_batch(dev, &valid, vnet, uso, &mut runs, &mut hdr, |pkts, r| {
            count_write(pkts, r, stats)
        });
    }
}

/// Writes a batch of inner packets (from one receive) to the TUN: with the vnet header
/// (`vnet`), runs that [`coalesce::plan`] finds leave as one super-packet each (a `writev` of
/// the merged header and the payloads where they lie), the rest one packet per write; without
/// it, one packet per write. IPv4 and IPv6 alike (TSO for TCPv4/TCPv6, USO for UDP of both
/// families when `uso`). `done` learns each write's packets and result. `runs` and `hdr` are
/// the caller's scratch space (kept between batches).
pub(crate) fn write_batch(
    dev: &SyncDevice,
    valid: &[&[u8]],
    vnet: bool,
    uso: bool,
    runs: &mut Vec<coalesce::Run>,
    hdr: &mut Vec<u8>,
    mut done: impl FnMut(&[&[u8]], nix::Result<usize>),
) {
    if !vnet {
        for pkt in valid {
            done(
                std::slice::from_ref(pkt),
                write_tun(dev, &[IoSlice::new(pkt)]),
            );
        }
        return;
    }
    coalesce::plan(valid, uso, runs);
    let plain = coalesce::plain_vnet_header();
    for run in runs.iter() {
        let pkts = &valid[run.start..run.start + run.count];
        let merged = if run.count > 1 {
            coalesce::merged_header(pkts, hdr)
        } else {
            None
        };
        if let Some(vhdr) = merged {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(run.count + 2);
            iov.push(IoSlice::new(&vhdr));
            iov.push(IoSlice::new(hdr));
            let h = hdr.len();
            iov.extend(pkts.iter().map(|p| IoSlice::new(&p[h..])));
            done(pkts, write_tun(dev, &iov));
        } else {
            // A packet alone (merged_header refuses only what plan never merges).
            for pkt in pkts {
                let iov = [IoSlice::new(&plain), IoSlice::new(pkt)];
                done(std::slice::from_ref(pkt), write_tun(dev, &iov));
            }
        }
    }
}

/// One TUN write (a packet, or a coalesced run gathered from its parts).
fn write_tun(dev: &SyncDevice, iov: &[IoSlice<'_>]) -> nix::Result<usize> {
    loop {
        match nix::sys::uio::writev(dev, iov) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Counts one TUN write of `pkts`.
fn count_write(pkts: &[&[u8]], r: nix::Result<usize>, stats: &UdpStats) {
    match r {
        Ok(_) => {
            stats
                .rx_packets
                .fetch_add(pkts.len() as u64, Ordering::Relaxed);
            let bytes: usize = pkts.iter().map(|p| p.len()).sum();
            stats.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            if pkts.len() > 1 {
                stats.tun_coalesced_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            tracing::debug!("writing {DEVICE}: {e}");
            stats.count(DropReason::IoError);
        }
    }
}
