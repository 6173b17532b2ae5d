//! The udp backend's packet core, without I/O: IPv4 validation, TTL decrement with an
//! incremental checksum update (RFC 1624), ICMP net-unreachable replies, a token bucket, and the
//! decisions for packets leaving (TUN → peer) and arriving (peer → TUN).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use ipnet::Ipv4Net;

/// Why a packet was dropped. Each has a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an IPv4 header.
    Short,
    /// Version nibble is not 4 (IPv6 noise from the TUN lands here too).
    NotIpv4,
    /// IHL below 5 or beyond the packet.
    BadHeaderLength,
    /// Total length field disagrees with the bytes received.
    LengthMismatch,
    /// TTL reached 0.
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
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
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

/// A udp peer: its subnet and where to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPeer {
    pub subnet: Ipv4Net,
    pub addr: SocketAddrV4,
}

/// Where things go: our subnet and the peers.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub own: Option<Ipv4Net>,
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
    Send(SocketAddrV4),
    /// No subnet holds the destination: answer with ICMP net unreachable.
    Unreachable,
    Drop(DropReason),
}

impl Routes {
    fn peer_for(&self, dst: Ipv4Addr) -> Option<&UdpPeer> {
        self.peers.iter().find(|p| p.subnet.contains(&dst))
    }

    /// Validates a packet from TUN, decrements its TTL, and picks the peer.
    pub fn egress(&self, pkt: &mut [u8]) -> Egress {
        let h = match parse_ipv4(pkt) {
            Ok(h) => h,
            Err(d) => return Egress::Drop(d),
        };
        let Some(peer) = self.peer_for(h.dst) else {
            return Egress::Unreachable;
        };
        if let Err(d) = decrement_ttl(pkt) {
            return Egress::Drop(d);
        }
        Egress::Send(peer.addr)
    }

    /// Checks a datagram from `from`: a known peer's address and port, an IPv4 packet whose
    /// source is in that peer's subnet and whose destination is in ours.
    pub fn ingress(&self, from: SocketAddrV4, pkt: &[u8]) -> Result<(), DropReason> {
        let h = parse_ipv4(pkt)?;
        let mut known = self
            .peers
            .iter()
            .chain(&self.switching)
            .filter(|p| p.addr == from)
            .peekable();
        if known.peek().is_none() {
            return Err(DropReason::UnknownSender);
        }
        if !known.any(|p| p.subnet.contains(&h.src)) {
            return Err(DropReason::ForeignSource);
        }
        match self.own {
            Some(own) if own.contains(&h.dst) => Ok(()),
            _ => Err(DropReason::NotForUs),
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
        let peer: SocketAddrV4 = "172.30.0.12:8285".parse().unwrap();
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
        let switching: SocketAddrV4 = "172.30.0.13:8285".parse().unwrap();
        let from3 = packet([10, 5, 3, 2], [10, 5, 1, 2], 63, b"x");
        assert_eq!(r.ingress(switching, &from3), Ok(()));
        assert_eq!(r.ingress(switching, &ok), Err(DropReason::ForeignSource));
        let mut to3 = packet([10, 5, 1, 2], [10, 5, 3, 2], 64, b"x");
        assert_eq!(r.egress(&mut to3), Egress::Unreachable);
    }
}
