//! The udp backend's packet core, without I/O: IPv4 and IPv6 validation, TTL decrement with an
//! incremental checksum update (RFC 1624) and hop-limit decrement, ICMP net-unreachable and
//! ICMPv6 no-route replies, a token bucket, and the decisions for packets leaving (TUN → peer)
//! and arriving (peer → TUN). Packets are dispatched on the version nibble; IPv6 is only
//! parsed where the node carries it (an own IPv6 subnet is set), else it is dropped as
//! `not_ipv4` exactly as on an IPv4-only node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a packet was dropped. Each has a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an IPv4 (IPv6) header.
    Short,
    /// Version nibble is not 4, nor 6 on a node that carries IPv6 (on an IPv4-only node the
    /// TUN's IPv6 noise lands here).
    NotIpv4,
    /// IHL below 5 or beyond the packet.
    BadHeaderLength,
    /// Total length (IPv6: payload length + 40) disagrees with the bytes received.
    LengthMismatch,
    /// TTL (IPv6: hop limit) reached 0.
    TtlExpired,
    /// Datagram from an address/port that is not a known peer's.
    UnknownSender,
    /// Inner source not in the sending peer's subnet.
    ForeignSource,
    /// Inner destination not in our subnet.
    NotForUs,
    /// Destination in no known subnet (answered with ICMP unless rate-limited).
    NoRoute,
    /// The TUN or socket refused the packet.
    IoError,
    /// An IPv6 packet to a multicast, link-local, loopback or unspecified address (the kernel's
    /// neighbour discovery / MLD on the TUN): never tunnelled, never answered.
    LinkScope,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Short,
        DropReason::NotIpv4,
        DropReason::BadHeaderLength,
        DropReason::LengthMismatch,
        DropReason::TtlExpired,
        DropReason::UnknownSender,
        DropReason::ForeignSource,
        DropReason::NotForUs,
        DropReason::NoRoute,
        DropReason::IoError,
        DropReason::LinkScope,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::BadHeaderLength => "bad_header_length",
            DropReason::LengthMismatch => "length_mismatch",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::ForeignSource => "foreign_source",
            DropReason::NotForUs => "not_for_us",
            DropReason::NoRoute => "no_route",
            DropReason::IoError => "io_error",
            DropReason::LinkScope => "link_scope",
        }
    }
}

/// The IPv4 header fields the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub header_len: usize,
    pub total_len: usize,
}

/// Validates a bare IPv4 packet (as read from TUN or carried in a datagram).
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Header, DropReason> {
    if pkt.len() < 20 {
        return Err(DropReason::Short);
    }
    if pkt[0] >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    if header_len < 20 || header_len > pkt.len() {
        return Err(DropReason::BadHeaderLength);
    }
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total_len != pkt.len() || total_len < header_len {
        return Err(DropReason::LengthMismatch);
    }
    Ok(Ipv4Header {
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        ttl: pkt[8],
        header_len,
        total_len,
    })
}

/// The IPv6 header fields the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub next_header: u8,
    /// 40 + payload length.
    pub total_len: usize,
}

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// Validates a bare IPv6 packet (as read from TUN or carried in a datagram). A jumbogram
/// (payload length 0) is refused as a length mismatch: the TUN MTU never allows one.
pub fn parse_ipv6(pkt: &[u8]) -> Result<Ipv6Header, DropReason> {
    if pkt.len() < IPV6_HEADER {
        return Err(DropReason::Short);
    }
    if pkt[0] >> 4 != 6 {
        return Err(DropReason::NotIpv4);
    }
    let total_len = IPV6_HEADER + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
    if total_len != pkt.len() {
        return Err(DropReason::LengthMismatch);
    }
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&pkt[at..at + 16]);
        Ipv6Addr::from(a)
    };
    Ok(Ipv6Header {
        src: addr(8),
        dst: addr(24),
        hop_limit: pkt[7],
        next_header: pkt[6],
        total_len,
    })
}

/// Decrements the hop limit of a validated IPv6 packet (no header checksum in IPv6). Fails
/// when it would reach 0.
pub fn decrement_hop_limit(pkt: &mut [u8]) -> Result<(), DropReason> {
    if pkt.len() < IPV6_HEADER {
        return Err(DropReason::Short);
    }
    if pkt[7] <= 1 {
        return Err(DropReason::TtlExpired);
    }
    pkt[7] -= 1;
    Ok(())
}

/// Whether an IPv6 destination may be tunnelled: not multicast, link-local, loopback or
/// unspecified.
fn routable6(a: &Ipv6Addr) -> bool {
    !(a.is_multicast() || a.is_unicast_link_local() || a.is_loopback() || a.is_unspecified())
}

/// The upper-layer protocol of an IPv6 packet and where its header starts, past the
/// extension headers that may precede an ICMPv6 message (hop-by-hop, routing, destination
/// options); None when they run past the packet or nest too deep.
fn upper_layer(pkt: &[u8], h: &Ipv6Header) -> Option<(u8, usize)> {
    let (mut nh, mut off) = (h.next_header, IPV6_HEADER);
    for _ in 0..8 {
        match nh {
            0 | 43 | 60 => {
                let ext = pkt.get(off..off + 2)?;
                nh = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
            }
            _ => return (off <= pkt.len()).then_some((nh, off)),
        }
    }
    None
}

/// The ICMPv6 checksum of `msg` from `src` to `dst` (RFC 4443 2.3: over the pseudo-header).
pub fn icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut buf = Vec::with_capacity(40 + msg.len());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, 58]);
    buf.extend_from_slice(msg);
    checksum(&buf)
}

/// Most bytes of an ICMPv6 error: the IPv6 minimum MTU (RFC 4443 2.4 c).
const ICMP6_MAX: usize = 1280;

/// An ICMPv6 destination-unreachable (code 0, no route to destination) reply to `orig`,
/// quoting as much of it as fits in 1280 bytes (RFC 4443 3.1). Like the IPv4 reply its source
/// is the unreachable destination (the reply is written into the TUN). None for what RFC 4443
/// 2.4 (e) forbids answering: ICMPv6 errors, packets to multicast, and packets from an
/// unspecified or multicast source; and for link-scope destinations (never routed here).
pub fn icmp6_unreachable(orig: &[u8]) -> Option<Vec<u8>> {
    let h = parse_ipv6(orig).ok()?;
    if !routable6(&h.dst) || h.src.is_unspecified() || h.src.is_multicast() {
        return None;
    }
    let (nh, off) = upper_layer(orig, &h)?;
    if nh == 58 && orig.get(off).is_none_or(|t| *t < 128) {
        return None;
    }
    let quoted = &orig[..orig.len().min(ICMP6_MAX - IPV6_HEADER - 8)];
    let msg_len = 8 + quoted.len();
    let mut p = vec![0u8; IPV6_HEADER + msg_len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(msg_len as u16).to_be_bytes());
    p[6] = 58; // ICMPv6
    p[7] = 64;
    p[8..24].copy_from_slice(&h.dst.octets());
    p[24..40].copy_from_slice(&h.src.octets());
    p[40] = 1; // destination unreachable
    p[41] = 0; // no route to destination
    p[48..].copy_from_slice(quoted);
    let c = icmp6_checksum(&h.dst, &h.src, &p[40..]);
    p[42..44].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// The "destination unreachable" reply to a packet of either version (None: no reply due).
pub fn unreachable_reply(orig: &[u8]) -> Option<Vec<u8>> {
    match orig.first().map(|b| b >> 4) {
        Some(6) => icmp6_unreachable(orig),
        _ => icmp_net_unreachable(orig),
    }
}

/// The Internet checksum of `data` (one's complement of the one's complement sum).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Decrements the TTL of a validated packet, updating the header checksum incrementally
/// (RFC 1624: HC' = ~(~HC + ~m + m')). Fails when the TTL would reach 0.
pub fn decrement_ttl(pkt: &mut [u8]) -> Result<(), DropReason> {
    if pkt.len() < 20 {
        return Err(DropReason::Short);
    }
    let ttl = pkt[8];
    if ttl <= 1 {
        return Err(DropReason::TtlExpired);
    }
    let old = u16::from_be_bytes([pkt[8], pkt[9]]);
    pkt[8] = ttl - 1;
    let new = u16::from_be_bytes([pkt[8], pkt[9]]);
    let hc = u16::from_be_bytes([pkt[10], pkt[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    pkt[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    Ok(())
}

/// An ICMP destination-unreachable (net unreachable) reply to `orig`, carrying the original
/// header and the first 8 bytes of its payload (RFC 792). Its source is the unreachable
/// destination: the reply is written into the TUN, and a source address of this host would be
/// dropped by the kernel as martian.
pub fn icmp_net_unreachable(orig: &[u8]) -> Option<Vec<u8>> {
    let h = parse_ipv4(orig).ok()?;
    let from = h.dst;
    // Never answer ICMP errors with ICMP errors (RFC 1122 3.2.2).
    if orig[9] == 1 {
        let icmp_type = orig.get(h.header_len).copied().unwrap_or(0);
        if ![0u8, 8, 13, 14, 15, 16, 17, 18].contains(&icmp_type) {
            return None;
        }
    }
    let quoted = &orig[..(h.header_len + 8).min(orig.len())];
    let total = 20 + 8 + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1; // ICMP
    p[12..16].copy_from_slice(&from.octets());
    p[16..20].copy_from_slice(&h.src.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 3; // destination unreachable
    p[21] = 0; // net unreachable
    p[28..].copy_from_slice(quoted);
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if available.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + dt.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A udp peer for one inner family: its subnet of that family and where to send (the
/// underlay address: IPv4 in dual stack for both inner families, IPv6 on an IPv6-only node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPeer {
    pub subnet: IpNet,
    pub addr: SocketAddr,
}

/// Where things go: our subnets and the peers (one entry per peer and inner family).
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub own: Option<Ipv4Net>,
    /// Our IPv6 subnet; `Some` exactly when this node carries IPv6 (and knows its lease).
    pub own6: Option<Ipv6Net>,
    /// Peers whose lease says udp: where egress sends.
    pub peers: Vec<UdpPeer>,
    /// Peers whose lease says another type: accepted on ingress as well. A peer switching
    /// backend live sends over udp as soon as it has republished, before its new lease
    /// reaches us; it is the same member (address, port, subnet), so its packets are taken.
    pub switching: Vec<UdpPeer>,
}

/// What to do with a packet read from TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Send(SocketAddr),
    /// No subnet holds the destination: answer with ICMP net unreachable.
    Unreachable,
    Drop(DropReason),
}

impl Routes {
    fn peer_for(&self, dst: IpAddr) -> Option<&UdpPeer> {
        self.peers.iter().find(|p| p.subnet.contains(&dst))
    }

    /// Whether `pkt` is handled as IPv6: version 6 on a node that carries IPv6.
    fn is_v6(&self, pkt: &[u8]) -> bool {
        self.own6.is_some() && pkt.first().is_some_and(|b| b >> 4 == 6)
    }

    /// Validates a packet from TUN, decrements its TTL (hop limit), and picks the peer.
    pub fn egress(&self, pkt: &mut [u8]) -> Egress {
        if self.is_v6(pkt) {
            return self.egress6(pkt);
        }
        let h = match parse_ipv4(pkt) {
            Ok(h) => h,
            Err(d) => return Egress::Drop(d),
        };
        let Some(peer) = self.peer_for(h.dst.into()) else {
            return Egress::Unreachable;
        };
        if let Err(d) = decrement_ttl(pkt) {
            return Egress::Drop(d);
        }
        Egress::Send(peer.addr)
    }

    fn egress6(&self, pkt: &mut [u8]) -> Egress {
        let h = match parse_ipv6(pkt) {
            Ok(h) => h,
            Err(d) => return Egress::Drop(d),
        };
        if !routable6(&h.dst) {
            return Egress::Drop(DropReason::LinkScope);
        }
        let Some(peer) = self.peer_for(h.dst.into()) else {
            return Egress::Unreachable;
        };
        if let Err(d) = decrement_hop_limit(pkt) {
            return Egress::Drop(d);
        }
        Egress::Send(peer.addr)
    }

    /// Checks a datagram from `from`: a known peer's address and port, an IPv4 (IPv6) packet
    /// whose source is in that peer's subnet of the family and whose destination is in ours.
    pub fn ingress(&self, from: SocketAddr, pkt: &[u8]) -> Result<(), DropReason> {
        let (src, dst): (IpAddr, IpAddr) = if self.is_v6(pkt) {
            let h = parse_ipv6(pkt)?;
            (h.src.into(), h.dst.into())
        } else {
            let h = parse_ipv4(pkt)?;
            (h.src.into(), h.dst.into())
        };
        let mut known = self
            .peers
            .iter()
            .chain(&self.switching)
            .filter(|p| p.addr == from)
            .peekable();
        if known.peek().is_none() {
            return Err(DropReason::UnknownSender);
        }
        if !known.any(|p| p.subnet.contains(&src)) {
            return Err(DropReason::ForeignSource);
        }
        let ours = match dst {
            IpAddr::V4(d) => self.own.is_some_and(|o| o.contains(&d)),
            IpAddr::V6(d) => self.own6.is_some_and(|o| o.contains(&d)),
        };
        if ours {
            Ok(())
        } else {
            Err(DropReason::NotForUs)
        }
    }
}

/// ICMP replies at most 10 per second, bursts of 10 (per node).
pub fn icmp_limiter(now: Instant) -> TokenBucket {
    TokenBucket::new(10.0, 10.0, now)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A valid IPv4/UDP packet from `src` to `dst` with `payload`.
    pub fn packet(src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = ttl;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&1234u16.to_be_bytes());
        p[22..24].copy_from_slice(&5678u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn validation() {
        let good = packet([10, 5, 1, 2], [10, 5, 2, 2], 64, b"hello");
        let h = parse_ipv4(&good).unwrap();
        assert_eq!(
            (h.src, h.dst, h.ttl, h.header_len, h.total_len),
            (
                Ipv4Addr::new(10, 5, 1, 2),
                Ipv4Addr::new(10, 5, 2, 2),
                64,
                20,
                33
            )
        );
        assert_eq!(parse_ipv4(&good[..19]), Err(DropReason::Short));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(DropReason::NotIpv4));
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&ihl), Err(DropReason::BadHeaderLength));
        ihl[0] = 0x4f; // 60 bytes > 33
        assert_eq!(parse_ipv4(&ihl), Err(DropReason::BadHeaderLength));
        assert_eq!(parse_ipv4(&good[..30]), Err(DropReason::LengthMismatch));
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(parse_ipv4(&longer), Err(DropReason::LengthMismatch));
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_right() {
        for ttl in [2u8, 3, 64, 128, 255] {
            let mut p = packet([10, 5, 1, 2], [10, 5, 2, 2], ttl, b"x");
            decrement_ttl(&mut p).unwrap();
            assert_eq!(p[8], ttl - 1);
            assert_eq!(
                checksum(&p[..20]),
                0,
                "header checksum verifies after ttl {ttl}"
            );
        }
        let mut p = packet([10, 5, 1, 2], [10, 5, 2, 2], 1, b"x");
        assert_eq!(decrement_ttl(&mut p), Err(DropReason::TtlExpired));
    }

    #[test]
    fn icmp_unreachable_is_well_formed() {
        let orig = packet([10, 5, 1, 2], [10, 9, 9, 9], 64, b"0123456789");
        let r = icmp_net_unreachable(&orig).unwrap();
        let h = parse_ipv4(&r).unwrap();
        assert_eq!(
            (h.src, h.dst),
            (Ipv4Addr::new(10, 9, 9, 9), Ipv4Addr::new(10, 5, 1, 2))
        );
        assert_eq!(checksum(&r[..20]), 0);
        assert_eq!(checksum(&r[20..]), 0);
        assert_eq!((r[20], r[21]), (3, 0));
        assert_eq!(&r[28..], &orig[..28]);
        // No ICMP error in answer to an ICMP error.
        assert!(icmp_net_unreachable(&r).is_none());
    }

    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert_eq!((0..5).filter(|_| b.allow(t0)).count(), 3);
        assert!(b.allow(t0 + std::time::Duration::from_millis(100)));
        assert!(!b.allow(t0 + std::time::Duration::from_millis(100)));
    }

    fn routes() -> Routes {
        Routes {
            own: Some("10.5.1.0/24".parse().unwrap()),
            own6: None,
            peers: vec![UdpPeer {
                subnet: "10.5.2.0/24".parse().unwrap(),
                addr: "172.30.0.12:8285".parse().unwrap(),
            }],
            switching: vec![UdpPeer {
                subnet: "10.5.3.0/24".parse().unwrap(),
                addr: "172.30.0.13:8285".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn egress_decisions() {
        let r = routes();
        let mut p = packet([10, 5, 1, 2], [10, 5, 2, 2], 64, b"x");
        assert_eq!(
            r.egress(&mut p),
            Egress::Send("172.30.0.12:8285".parse().unwrap())
        );
        assert_eq!(p[8], 63);
        let mut far = packet([10, 5, 1, 2], [10, 5, 7, 2], 64, b"x");
        assert_eq!(r.egress(&mut far), Egress::Unreachable);
        let mut dying = packet([10, 5, 1, 2], [10, 5, 2, 2], 1, b"x");
        assert_eq!(r.egress(&mut dying), Egress::Drop(DropReason::TtlExpired));
        assert_eq!(r.egress(&mut [0x60; 40]), Egress::Drop(DropReason::NotIpv4));
    }

    #[test]
    fn ingress_checks_sender_source_and_destination() {
        let r = routes();
        let peer: SocketAddr = "172.30.0.12:8285".parse().unwrap();
        let ok = packet([10, 5, 2, 2], [10, 5, 1, 2], 63, b"x");
        assert_eq!(r.ingress(peer, &ok), Ok(()));
        assert_eq!(
            r.ingress("172.30.0.99:8285".parse().unwrap(), &ok),
            Err(DropReason::UnknownSender)
        );
        assert_eq!(
            r.ingress("172.30.0.12:9999".parse().unwrap(), &ok),
            Err(DropReason::UnknownSender)
        );
        let spoofed = packet([10, 5, 3, 2], [10, 5, 1, 2], 63, b"x");
        assert_eq!(r.ingress(peer, &spoofed), Err(DropReason::ForeignSource));
        let elsewhere = packet([10, 5, 2, 2], [10, 5, 4, 2], 63, b"x");
        assert_eq!(r.ingress(peer, &elsewhere), Err(DropReason::NotForUs));
        assert_eq!(r.ingress(peer, &ok[..10]), Err(DropReason::Short));
        // A peer still advertising another type (mid-switch) is accepted on ingress, with
        // the same source check, but never sent to.
        let switching: SocketAddr = "172.30.0.13:8285".parse().unwrap();
        let from3 = packet([10, 5, 3, 2], [10, 5, 1, 2], 63, b"x");
        assert_eq!(r.ingress(switching, &from3), Ok(()));
        assert_eq!(r.ingress(switching, &ok), Err(DropReason::ForeignSource));
        let mut to3 = packet([10, 5, 1, 2], [10, 5, 3, 2], 64, b"x");
        assert_eq!(r.egress(&mut to3), Egress::Unreachable);
    }
    /// A valid IPv6/UDP packet from `src` to `dst` with `payload`.
    pub fn packet6(src: &str, dst: &str, hop: u8, payload: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = src.parse().unwrap();
        let dst: Ipv6Addr = dst.parse().unwrap();
        let len = 8 + payload.len();
        let mut p = vec![0u8; 40 + len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = 17;
        p[7] = hop;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40..42].copy_from_slice(&1234u16.to_be_bytes());
        p[42..44].copy_from_slice(&5678u16.to_be_bytes());
        p[44..46].copy_from_slice(&(len as u16).to_be_bytes());
        p[48..].copy_from_slice(payload);
        p
    }

    #[test]
    fn ipv6_validation_and_hop_limit() {
        let good = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 64, b"hello");
        let h = parse_ipv6(&good).unwrap();
        assert_eq!(
            (h.src, h.dst, h.hop_limit, h.next_header, h.total_len),
            (
                "fd10:0:0:11::2".parse().unwrap(),
                "fd10:0:0:12::2".parse().unwrap(),
                64,
                17,
                53
            )
        );
        assert_eq!(parse_ipv6(&good[..39]), Err(DropReason::Short));
        assert_eq!(parse_ipv6(&good[..45]), Err(DropReason::LengthMismatch));
        let mut jumbo = good.clone();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(parse_ipv6(&jumbo), Err(DropReason::LengthMismatch));
        let mut v4 = good.clone();
        v4[0] = 0x45;
        assert_eq!(parse_ipv6(&v4), Err(DropReason::NotIpv4));
        let mut p = good.clone();
        decrement_hop_limit(&mut p).unwrap();
        assert_eq!(p[7], 63);
        assert_eq!(&p[..7], &good[..7]);
        assert_eq!(&p[8..], &good[8..]);
        let mut dying = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 1, b"x");
        assert_eq!(decrement_hop_limit(&mut dying), Err(DropReason::TtlExpired));
        dying[7] = 0;
        assert_eq!(decrement_hop_limit(&mut dying), Err(DropReason::TtlExpired));
    }

    #[test]
    fn icmp6_unreachable_is_well_formed_and_never_answers_errors_or_multicast() {
        let orig = packet6("fd10:0:0:11::2", "fd10:0:0:99::9", 64, b"0123456789");
        let r = unreachable_reply(&orig).unwrap();
        let h = parse_ipv6(&r).unwrap();
        assert_eq!(
            (h.src, h.dst, h.next_header),
            (
                "fd10:0:0:99::9".parse().unwrap(),
                "fd10:0:0:11::2".parse().unwrap(),
                58
            )
        );
        assert_eq!((r[40], r[41]), (1, 0));
        assert_eq!(
            icmp6_checksum(&h.src, &h.dst, &r[40..]),
            0,
            "checksum verifies"
        );
        assert_eq!(&r[48..], &orig[..]);
        // No ICMPv6 error in answer to an ICMPv6 error.
        assert!(icmp6_unreachable(&r).is_none());
        // ... also behind a hop-by-hop header; an echo request is answered.
        let mut hbh = r.clone();
        hbh.splice(40..40, [58u8, 0, 1, 4, 0, 0, 0, 0]);
        hbh[6] = 0;
        let len = (hbh.len() - 40) as u16;
        hbh[4..6].copy_from_slice(&len.to_be_bytes());
        assert!(icmp6_unreachable(&hbh).is_none());
        let mut echo = orig.clone();
        echo[6] = 58;
        echo[40] = 128;
        assert!(icmp6_unreachable(&echo).is_some());
        // Multicast or link-local destination, unspecified source: no reply.
        for (src, dst) in [
            ("fd10:0:0:11::2", "ff02::16"),
            ("fd10:0:0:11::2", "fe80::1"),
            ("::", "fd10:0:0:99::9"),
        ] {
            assert!(
                icmp6_unreachable(&packet6(src, dst, 64, b"x")).is_none(),
                "{src} -> {dst}"
            );
        }
        // Long packets are quoted up to the IPv6 minimum MTU.
        let big = packet6("fd10:0:0:11::2", "fd10:0:0:99::9", 64, &[7u8; 1400]);
        let r = icmp6_unreachable(&big).unwrap();
        assert_eq!(r.len(), 1280);
        let h = parse_ipv6(&r).unwrap();
        assert_eq!(icmp6_checksum(&h.src, &h.dst, &r[40..]), 0);
    }

    /// Dual stack: both inner families over the IPv4 underlay.
    fn dual_routes() -> Routes {
        let mut r = routes();
        r.own6 = Some("fd10:0:0:11::/64".parse().unwrap());
        r.peers.push(UdpPeer {
            subnet: "fd10:0:0:12::/64".parse().unwrap(),
            addr: "172.30.0.12:8285".parse().unwrap(),
        });
        r.switching.push(UdpPeer {
            subnet: "fd10:0:0:13::/64".parse().unwrap(),
            addr: "172.30.0.13:8285".parse().unwrap(),
        });
        r
    }

    #[test]
    fn ipv6_egress_and_ingress_per_family() {
        let r = dual_routes();
        let peer: SocketAddr = "172.30.0.12:8285".parse().unwrap();
        let mut p = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 64, b"x");
        assert_eq!(r.egress(&mut p), Egress::Send(peer));
        assert_eq!(p[7], 63);
        // IPv4 still goes as before.
        let mut p4 = packet([10, 5, 1, 2], [10, 5, 2, 2], 64, b"x");
        assert_eq!(r.egress(&mut p4), Egress::Send(peer));
        let mut far = packet6("fd10:0:0:11::2", "fd10:0:0:77::2", 64, b"x");
        assert_eq!(r.egress(&mut far), Egress::Unreachable);
        let mut dying = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 1, b"x");
        assert_eq!(r.egress(&mut dying), Egress::Drop(DropReason::TtlExpired));
        for noise in ["ff02::16", "ff02::2", "fe80::1", "::1"] {
            let mut n = packet6("fe80::5", noise, 255, b"x");
            assert_eq!(
                r.egress(&mut n),
                Egress::Drop(DropReason::LinkScope),
                "{noise}"
            );
        }
        // Ingress: source in the sender's IPv6 subnet, destination in ours.
        let ok = packet6("fd10:0:0:12::2", "fd10:0:0:11::2", 63, b"x");
        assert_eq!(r.ingress(peer, &ok), Ok(()));
        assert_eq!(
            r.ingress("172.30.0.99:8285".parse().unwrap(), &ok),
            Err(DropReason::UnknownSender)
        );
        let spoofed = packet6("fd10:0:0:13::2", "fd10:0:0:11::2", 63, b"x");
        assert_eq!(r.ingress(peer, &spoofed), Err(DropReason::ForeignSource));
        // An IPv4 subnet's address as an IPv6 source is no match (families never mix).
        let v4ish = packet6("::ffff:10.5.2.2", "fd10:0:0:11::2", 63, b"x");
        assert_eq!(r.ingress(peer, &v4ish), Err(DropReason::ForeignSource));
        let elsewhere = packet6("fd10:0:0:12::2", "fd10:0:0:14::2", 63, b"x");
        assert_eq!(r.ingress(peer, &elsewhere), Err(DropReason::NotForUs));
        let switching: SocketAddr = "172.30.0.13:8285".parse().unwrap();
        assert_eq!(r.ingress(switching, &spoofed), Ok(()));
        assert_eq!(r.ingress(peer, &ok[..30]), Err(DropReason::Short));
    }

    #[test]
    fn ipv4_only_nodes_drop_ipv6_as_before() {
        let r = routes();
        let mut p = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 64, b"x");
        assert_eq!(r.egress(&mut p), Egress::Drop(DropReason::NotIpv4));
        let ok = packet6("fd10:0:0:12::2", "fd10:0:0:11::2", 63, b"x");
        assert_eq!(
            r.ingress("172.30.0.12:8285".parse().unwrap(), &ok),
            Err(DropReason::NotIpv4)
        );
    }

    #[test]
    fn ipv6_only_underlay() {
        let peer: SocketAddr = "[fd00:210::12]:8285".parse().unwrap();
        let r = Routes {
            own: None,
            own6: Some("fd10:0:0:11::/64".parse().unwrap()),
            peers: vec![UdpPeer {
                subnet: "fd10:0:0:12::/64".parse().unwrap(),
                addr: peer,
            }],
            switching: Vec::new(),
        };
        let mut p = packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 64, b"x");
        assert_eq!(r.egress(&mut p), Egress::Send(peer));
        let ok = packet6("fd10:0:0:12::2", "fd10:0:0:11::2", 63, b"x");
        assert_eq!(r.ingress(peer, &ok), Ok(()));
        // IPv4 inside an IPv6-only cluster: no subnet of ours.
        let v4 = packet([10, 5, 2, 2], [10, 5, 1, 2], 63, b"x");
        assert_eq!(r.ingress(peer, &v4), Err(DropReason::ForeignSource));
    }

    /// xorshift: deterministic pseudo-random bytes.
    fn noise(seed: &mut u64) -> u8 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 24) as u8
    }

    /// Garbage of every length, and valid packets with random bytes flipped, never panic, and
    /// whatever is accepted or sent satisfies the checks (a poor man's fuzzer next to
    /// backends/fuzz).
    #[test]
    fn garbage_never_panics_and_verdicts_hold() {
        let r = dual_routes();
        let own4 = r.own.unwrap();
        let own6 = r.own6.unwrap();
        let peer: SocketAddr = "172.30.0.12:8285".parse().unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let seeds = [
            packet6("fd10:0:0:12::2", "fd10:0:0:11::2", 63, b"abcdefgh"),
            packet6("fd10:0:0:11::2", "fd10:0:0:12::2", 2, b"abcdefgh"),
            packet([10, 5, 2, 2], [10, 5, 1, 2], 63, b"abcdefgh"),
        ];
        for round in 0..20_000 {
            let mut p = if round % 4 == 0 {
                let len = usize::from(noise(&mut seed)) % 120;
                (0..len).map(|_| noise(&mut seed)).collect::<Vec<u8>>()
            } else {
                let mut p = seeds[round % seeds.len()].clone();
                for _ in 0..1 + usize::from(noise(&mut seed) % 4) {
                    let at = usize::from(noise(&mut seed)) % p.len();
                    p[at] = noise(&mut seed);
                }
                let cut = usize::from(noise(&mut seed)) % (p.len() + 8);
                p.truncate(cut.max(1));
                p
            };
            if r.ingress(peer, &p).is_ok() {
                match p[0] >> 4 {
                    6 => assert!(own6.contains(&parse_ipv6(&p).unwrap().dst)),
                    _ => assert!(own4.contains(&parse_ipv4(&p).unwrap().dst)),
                }
            }
            let before = p.clone();
            if let Egress::Send(_) = r.egress(&mut p) {
                match p[0] >> 4 {
                    6 => assert_eq!(p[7], before[7] - 1),
                    _ => assert_eq!(p[8], before[8] - 1),
                }
            }
            if let Some(reply) = unreachable_reply(&before) {
                if reply[0] >> 4 == 6 {
                    let h = parse_ipv6(&reply).unwrap();
                    assert_eq!(icmp6_checksum(&h.src, &h.dst, &reply[40..]), 0);
                    assert!(reply.len() <= 1280);
                } else {
                    assert_eq!(checksum(&reply[..20]), 0);
                }
            }
        }
    }
}
