//! Receive-side coalescing without copies (pure; no I/O).
//!
//! One UDP_GRO receive hands us up to 64 datagrams from one peer, each a bare IPv4 or IPv6
//! packet, and in a bulk transfer they are consecutive segments of one TCP flow. [`plan`] cuts
//! such a batch into runs that the kernel can take as one TSO super-packet; [`merged_header`]
//! builds the virtio-net header and the rewritten IP+TCP header of a run. The TUN write is then
//! a `writev` of that header followed by the segments' payloads where they already lie in the
//! receive buffer: no byte of payload is copied in userspace.
//!
//! A TCP run follows Linux's own TCP GRO rules. IPv4 (`inet_gro_receive`): same addresses,
//! TOS, TTL, DF, IP header without options. IPv6 (`ipv6_gro_receive`): same addresses, traffic
//! class, flow label and hop limit, no extension header (TCP or UDP right after the fixed
//! header). Both: same ports, identical TCP header apart from sequence number and PSH (same
//! ack, window, options such as timestamps), only ACK (and PSH on the last segment) set,
//! contiguous sequence numbers, equal payload sizes with only the last one possibly shorter,
//! at most 64 KiB in all. A UDP run (when the TUN takes USO, Linux ≥ 6.2) is datagrams of one
//! flow with equal payload sizes, the last possibly shorter: the kernel cuts the super-packet
//! back into exactly those datagrams (with fresh checksums), as UDP GRO does. Anything else
//! (ICMP, SYN/FIN/RST, out-of-order segments, IPv6 extension headers, a UDPv6 datagram with a
//! zero checksum, which IPv6 forbids) goes to the TUN as it came.

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4};

use super::packet::checksum;

/// Size of the virtio-net header that precedes every TUN read and write with offload on.
pub const VNET_HDR_LEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// virtio-net header flag: the checksum at csum_start + csum_offset is to be completed.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_ACK: u8 = 0x10;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Largest super-packet (IP header included), for both families: what one GRO packet holds.
const MAX_TOTAL: usize = 65_535;

/// A run of packets `start..start + count` of a batch, written to the TUN as one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub count: usize,
}

/// The parts of a TCP or UDP packet (IPv4 or IPv6) that decide whether it joins a run.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// IP header length: 20 (IPv4 without options) or 40 (IPv6 without extension headers).
    ip_len: usize,
    /// TCP or UDP.
    proto: u8,
    /// IP + TCP/UDP header length.
    hdr_len: usize,
    payload: usize,
    /// TCP: sequence number and flags (0 for UDP).
    seq: u32,
    flags: u8,
}

impl Segment {
    fn v6(&self) -> bool {
        self.ip_len == 40
    }
}

/// Parses the IP header of a packet that may join a run: IPv4 without options, not a
/// fragment, total length = packet length; IPv6 with TCP or UDP right after the fixed header,
/// payload length = the rest of the packet (no jumbogram). Returns (IP header length,
/// protocol).
fn ip_header(pkt: &[u8]) -> Option<(usize, u8)> {
    match pkt.first()? >> 4 {
        4 => {
            if pkt.len() < 20 || pkt[0] != 0x45 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            // Fragment offset or More Fragments set: not a whole packet.
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
            (total == pkt.len() && frag & 0x3fff == 0).then_some((20, pkt[9]))
        }
        6 => {
            if pkt.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            (payload != 0 && 40 + payload == pkt.len()).then_some((40, pkt[6]))
        }
        _ => None,
    }
}

/// Parses a packet that may join a run: TCP with no flag other than ACK (and PSH) and a
/// payload, or, when `udp` is allowed, UDP with a payload.
fn segment(pkt: &[u8], udp: bool) -> Option<Segment> {
    let (ip_len, proto) = ip_header(pkt)?;
    let total = pkt.len();
    let l4 = &pkt[ip_len..];
    match proto {
        PROTO_TCP if l4.len() >= 20 => {
            let tcp_len = usize::from(l4[12] >> 4) * 4;
            let hdr_len = ip_len + tcp_len;
            let flags = l4[13];
            if tcp_len < 20 || hdr_len >= total || flags & !(TCP_FLAG_ACK | TCP_FLAG_PSH) != 0 {
                return None;
            }
            if flags & TCP_FLAG_ACK == 0 {
                return None;
            }
            Some(Segment {
                ip_len,
                proto,
                hdr_len,
                payload: total - hdr_len,
                seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                flags,
            })
        }
        PROTO_UDP if udp && l4.len() > 8 => {
            let udp_len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            if udp_len != l4.len() {
                return None;
            }
            // RFC 8200 8.1: a zero UDP checksum is invalid over IPv6; the kernel drops such a
            // datagram, so it must not come out of a merge with a valid checksum.
            if ip_len == 40 && l4[6..8] == [0, 0] {
                return None;
            }
            Some(Segment {
                ip_len,
                proto,
                hdr_len: ip_len + 8,
                payload: udp_len - 8,
                seq: 0,
                flags: 0,
            })
        }
        _ => None,
    }
}

/// Whether the IP headers of `a` and `b` (same version, both parsed by [`segment`]) put them
/// in one flow that GRO would merge: IPv4 TOS (1), DF/flags (6), TTL and protocol (8..10),
/// addresses (12..20); IPv6 version, traffic class and flow label (0..4), next header and
/// hop limit (6..8), addresses (8..40). Not the lengths, the IPv4 id or checksum.
fn same_ip(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    } else {
        a[1] == b[1] && a[6] == b[6] && a[8..10] == b[8..10] && a[12..20] == b[12..20]
    }
}

/// Whether `next` continues the run that starts with `first` and currently ends with `last`
/// (`bytes` = IP packet size of the run so far).
fn continues(
    first_pkt: &[u8],
    first: &Segment,
    last: &Segment,
    next_pkt: &[u8],
    next: &Segment,
    bytes: usize,
) -> bool {
    // A shorter segment or a PSH can only end a run.
    if last.payload < first.payload || last.flags & TCP_FLAG_PSH != 0 {
        return false;
    }
    if next.ip_len != first.ip_len
        || next.proto != first.proto
        || next.hdr_len != first.hdr_len
        || next.payload > first.payload
        || bytes + next.payload > MAX_TOTAL
    {
        return false;
    }
    let l = first.ip_len;
    // Same IP flow, same ports (l..l + 4).
    if !same_ip(first_pkt, next_pkt, first.v6()) || first_pkt[l..l + 4] != next_pkt[l..l + 4] {
        return false;
    }
    if first.proto == PROTO_UDP {
        // UDP: datagram boundaries are kept by equal sizes; nothing else to compare.
        return true;
    }
    let h = first.hdr_len;
    // TCP: contiguous sequence numbers; same ack (l+8..l+12), data offset (l+12), window
    // (l+14..l+16), urgent pointer (l+18..l+20) and options (l+20..h); not the flags or the
    // checksum.
    next.seq == last.seq.wrapping_add(last.payload as u32)
        && first_pkt[l + 8..l + 13] == next_pkt[l + 8..l + 13]
        && first_pkt[l + 14..l + 16] == next_pkt[l + 14..l + 16]
        && first_pkt[l + 18..h] == next_pkt[l + 18..h]
}

/// Cuts a batch of validated IPv4/IPv6 packets into runs; each packet is in exactly one run,
/// in order. Runs of one are packets to write as they are. UDP datagrams form runs only when
/// `udp` is set (the TUN accepts USO super-packets).
pub fn plan(pkts: &[&[u8]], udp: bool, runs: &mut Vec<Run>) {
    runs.clear();
    let mut i = 0;
    while i < pkts.len() {
        let mut count = 1;
        if let Some(first) = segment(pkts[i], udp) {
            let mut last = first;
            let mut bytes = pkts[i].len();
            while let Some(next_pkt) = pkts.get(i + count) {
                let Some(next) = segment(next_pkt, udp) else {
                    break;
                };
                if !continues(pkts[i], &first, &last, next_pkt, &next, bytes) {
                    break;
                }
                bytes += next.payload;
                last = next;
                count += 1;
            }
        }
        runs.push(Run { start: i, count });
        i += count;
    }
}

/// The virtio-net header for a packet written unchanged (no offload requested; the kernel
/// verifies its checksums as for any received packet).
pub fn plain_vnet_header() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

/// For a run of more than one packet (`run` as cut by [`plan`]): the virtio-net header and the
/// IP+TCP/UDP header of the super-packet, which is that header followed by every packet's
/// payload. The header is the first packet's with the IP length (IPv4 total length and header
/// checksum; IPv6 payload length) and the L4 checksum field set to the pseudo-header sum the
/// kernel completes (NEEDS_CSUM), as a NIC doing GRO would hand it over (Linux's
/// `tcp4_gro_complete` / `tcp6_gro_complete`); TCP takes PSH from the last segment, UDP gets
/// the summed length. The kernel cuts it again at `gso_size`: the same segments or datagrams.
/// None (and `hdr` empty) when the first packet is no TCP/UDP segment, i.e. `run` was not cut
/// by [`plan`]: its packets are to be written one by one.
pub fn merged_header(run: &[&[u8]], hdr: &mut Vec<u8>) -> Option<[u8; VNET_HDR_LEN]> {
    hdr.clear();
    let first = *run.first()?;
    let seg = segment(first, true)?;
    let (l, hdr_len) = (seg.ip_len, seg.hdr_len);
    let total: usize = hdr_len
        + run
            .iter()
            .map(|p| p.len().saturating_sub(hdr_len))
            .sum::<usize>();
    hdr.extend_from_slice(&first[..hdr_len]);
    // Lengths fit in 16 bits for runs cut by plan (MAX_TOTAL).
    let l4_len = total - l;
    if seg.v6() {
        hdr[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        hdr[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        hdr[10..12].copy_from_slice(&[0, 0]);
        let ip_csum = checksum(&hdr[..20]);
        hdr[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    }
    let csum_offset: u16 = if seg.proto == PROTO_UDP {
        hdr[l + 4..l + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        6
    } else {
        if let Some(last) = run.last() {
            hdr[l + 13] |= last.get(l + 13).copied().unwrap_or(0) & TCP_FLAG_PSH;
        }
        16
    };
    // Pseudo header (RFC 793 / RFC 8200 8.1): source, destination, protocol, L4 length;
    // folded, not inverted.
    let addrs = if seg.v6() { &hdr[8..40] } else { &hdr[12..20] };
    let mut sum: u32 = u32::from(seg.proto) + (l4_len as u32 >> 16) + (l4_len as u32 & 0xffff);
    for c in addrs.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum_at = l + usize::from(csum_offset);
    hdr[csum_at..csum_at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    let vnet = tun_rs::VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: match (seg.proto, seg.v6()) {
            (PROTO_UDP, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
            (_, true) => VIRTIO_NET_HDR_GSO_TCPV6,
            (_, false) => VIRTIO_NET_HDR_GSO_TCPV4,
        },
        hdr_len: hdr_len as u16,
        gso_size: seg.payload as u16,
        csum_start: l as u16,
        csum_offset,
    };
    let mut v = [0u8; VNET_HDR_LEN];
    // encode fails only on a buffer shorter than the header; this one is exactly its size.
    let _ = vnet.encode(&mut v);
    Some(v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Full TCP checksum over pseudo header + segment (field included as it is).
    fn tcp_sum(pkt: &[u8]) -> u16 {
        let mut v = Vec::new();
        v.extend_from_slice(&pkt[12..20]);
        v.extend_from_slice(&[0, 6]);
        v.extend_from_slice(&((pkt.len() - 20) as u16).to_be_bytes());
        v.extend_from_slice(&pkt[20..]);
        checksum(&v)
    }

    /// A TCP/IPv4 segment with valid checksums; timestamps option (12 bytes) as Linux sends.
    fn seg(seq: u32, payload: &[u8], flags: u8, id: u16) -> Vec<u8> {
        let hdr = 20 + 32;
        let mut p = vec![0u8; hdr + payload.len()];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 63;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 5, 2, 2]);
        p[16..20].copy_from_slice(&[10, 5, 1, 2]);
        p[20..22].copy_from_slice(&5201u16.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&500u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 4]);
        p[hdr..].copy_from_slice(payload);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = tcp_sum(&p);
        p[36..38].copy_from_slice(&t.to_be_bytes());
        p
    }

    /// `n` segments of `size` bytes of a byte stream starting at `seq`, the last `last` long.
    fn stream(seq: u32, n: usize, size: usize, last: usize) -> Vec<Vec<u8>> {
        let mut s = seq;
        (0..n)
            .map(|i| {
                let len = if i + 1 == n { last } else { size };
                let data: Vec<u8> = (0..len).map(|b| (s as usize + b) as u8).collect();
                let p = seg(s, &data, TCP_FLAG_ACK, i as u16);
                s = s.wrapping_add(len as u32);
                p
            })
            .collect()
    }

    fn runs(pkts: &[Vec<u8>]) -> Vec<(usize, usize)> {
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut r = Vec::new();
        plan(&refs, true, &mut r);
        r.iter().map(|r| (r.start, r.count)).collect()
    }

    #[test]
    fn a_bulk_stream_is_one_run() {
        let pkts = stream(1000, 44, 1380, 700);
        assert_eq!(runs(&pkts), vec![(0, 44)]);
    }

    #[test]
    fn merged_packet_is_the_stream_with_a_completable_checksum() {
        let mut pkts = stream(u32::MAX - 3000, 5, 1380, 1380);
        // PSH on the last segment carries over to the merged header.
        let last = pkts.len() - 1;
        let payload = pkts[last][52..].to_vec();
        let seq = u32::from_be_bytes(pkts[last][24..28].try_into().unwrap());
        pkts[last] = seg(seq, &payload, TCP_FLAG_ACK | TCP_FLAG_PSH, 4);
        assert_eq!(runs(&pkts), vec![(0, 5)]);
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr).unwrap();
        assert_eq!(v[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(v[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 52);
        assert_eq!(u16::from_ne_bytes([v[4], v[5]]), 1380);
        assert_eq!(u16::from_ne_bytes([v[6], v[7]]), 20);
        assert_eq!(u16::from_ne_bytes([v[8], v[9]]), 16);
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[52..]);
        }
        assert_eq!(whole.len(), 52 + 5 * 1380);
        assert_eq!(
            u16::from_be_bytes([whole[2], whole[3]]) as usize,
            whole.len()
        );
        assert_eq!(checksum(&whole[..20]), 0, "IPv4 header checksum");
        assert_eq!(whole[33], TCP_FLAG_ACK | TCP_FLAG_PSH);
        assert_eq!(&whole[24..28], &pkts[0][24..28], "first sequence number");
        // The kernel completes NEEDS_CSUM by summing from csum_start to the end with the
        // field holding the pseudo-header sum, and storing the complement.
        let mut body_only = whole.clone();
        let partial = u16::from_be_bytes([whole[36], whole[37]]);
        body_only[36..38].copy_from_slice(&[0, 0]);
        let mut sum = u32::from(!checksum(&body_only[20..])) + u32::from(partial);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        whole[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        assert_eq!(tcp_sum(&whole), 0, "completed TCP checksum verifies");
    }

    #[test]
    fn runs_break_where_linux_gro_would() {
        // A gap in sequence numbers.
        let mut pkts = stream(1, 3, 100, 100);
        pkts.extend(stream(10_000, 2, 100, 100));
        assert_eq!(runs(&pkts), vec![(0, 3), (3, 2)]);
        // A shorter segment ends a run.
        let mut pkts = stream(1, 2, 100, 50);
        pkts.extend(stream(151, 2, 100, 100));
        assert_eq!(runs(&pkts), vec![(0, 2), (2, 2)]);
        // PSH in the middle ends the run after it.
        let mut pkts = stream(1, 4, 100, 100);
        pkts[1][33] |= TCP_FLAG_PSH;
        assert_eq!(runs(&pkts), vec![(0, 2), (2, 2)]);
        // FIN, SYN or no ACK: alone.
        let mut pkts = stream(1, 3, 100, 100);
        pkts[1][33] = TCP_FLAG_ACK | 0x01;
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1), (2, 1)]);
        // Another flow (port), another ack number, another window, other options.
        for (at, val) in [(22usize, 9u8), (31, 8), (35, 1), (51, 5)] {
            let mut pkts = stream(1, 3, 100, 100);
            pkts[2][at] = val;
            assert_eq!(runs(&pkts), vec![(0, 2), (2, 1)], "byte {at}");
        }
        // A bigger segment after the first.
        let mut pkts = stream(1, 1, 100, 100);
        pkts.extend(stream(101, 1, 200, 200));
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1)]);
        // Not TCP, IP options, fragments, pure ACKs: alone.
        let mut pkts = stream(1, 3, 100, 100);
        pkts[0][9] = 17;
        pkts[1][0] = 0x46;
        pkts[2][6] = 0x20;
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1), (2, 1)]);
        let acks = vec![seg(5, b"", TCP_FLAG_ACK, 1), seg(5, b"", TCP_FLAG_ACK, 2)];
        assert_eq!(runs(&acks), vec![(0, 1), (1, 1)]);
    }

    /// A UDP/IPv4 datagram with valid checksums.
    fn dgram(sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 28 + payload.len()];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 63;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 5, 2, 2]);
        p[16..20].copy_from_slice(&[10, 5, 1, 2]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..26].copy_from_slice(&(total - 20).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut v = Vec::new();
        v.extend_from_slice(&p[12..20]);
        v.extend_from_slice(&[0, 17]);
        v.extend_from_slice(&p[24..26]);
        v.extend_from_slice(&p[20..]);
        let u = checksum(&v);
        p[26..28].copy_from_slice(&u.to_be_bytes());
        p
    }

    #[test]
    fn udp_flows_coalesce_only_with_uso() {
        let mut pkts: Vec<Vec<u8>> = (0..5).map(|i| dgram(4000, &[i as u8; 1400])).collect();
        pkts.push(dgram(4000, &[9; 300]));
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut r = Vec::new();
        plan(&refs, false, &mut r);
        assert_eq!(r.len(), 6, "no USO: every datagram alone");
        plan(&refs, true, &mut r);
        assert_eq!(r, vec![Run { start: 0, count: 6 }]);
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr).unwrap();
        assert_eq!(v[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 28);
        assert_eq!(u16::from_ne_bytes([v[4], v[5]]), 1400);
        assert_eq!(u16::from_ne_bytes([v[8], v[9]]), 6);
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[28..]);
        }
        assert_eq!(
            u16::from_be_bytes([whole[2], whole[3]]) as usize,
            whole.len()
        );
        assert_eq!(
            u16::from_be_bytes([whole[24], whole[25]]) as usize,
            whole.len() - 20
        );
        assert_eq!(checksum(&whole[..20]), 0);
        // The field holds the folded pseudo-header sum for the merged length.
        let mut ph = Vec::new();
        ph.extend_from_slice(&whole[12..20]);
        ph.extend_from_slice(&[0, 17]);
        ph.extend_from_slice(&whole[24..26]);
        assert_eq!(u16::from_be_bytes([whole[26], whole[27]]), !checksum(&ph));
        // Another flow, a bigger datagram after a smaller one, a shorter one mid-run: breaks.
        let pkts = [
            dgram(4000, &[1; 100]),
            dgram(4001, &[1; 100]),
            dgram(4001, &[1; 50]),
            dgram(4001, &[1; 100]),
        ];
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 2), (3, 1)]);
    }

    /// Builds the super-packet of a run and cuts it again with tun-rs's segmentation (what the
    /// egress side does with a TSO/USO read): returns the segments. Either family (by the
    /// first packet's version).
    fn resegment(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr).unwrap();
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[hdr.len()..]);
        }
        let vh = tun_rs::VirtioNetHdr::decode(&v).unwrap();
        let mut out = vec![vec![0u8; 2048]; 128];
        let mut sizes = vec![0usize; 128];
        let v6 = pkts[0][0] >> 4 == 6;
        let n = tun_rs::gso_split(&mut whole, vh, &mut out, &mut sizes, 0, v6).unwrap();
        (0..n).map(|i| out[i][..sizes[i]].to_vec()).collect()
    }

    #[test]
    fn segmentation_gives_back_the_coalesced_segments() {
        // TCP: byte for byte the original segments (IP ids, seq, PSH on the last, checksums).
        let mut pkts = stream(77, 30, 1380, 512);
        let last = pkts.len() - 1;
        let seq = u32::from_be_bytes(pkts[last][24..28].try_into().unwrap());
        let payload = pkts[last][52..].to_vec();
        pkts[last] = seg(seq, &payload, TCP_FLAG_ACK | TCP_FLAG_PSH, last as u16);
        assert_eq!(resegment(&pkts), pkts);
        // UDP (USO): the same datagrams, each with valid IPv4 and UDP checksums.
        let mut d: Vec<Vec<u8>> = (0..20).map(|i| dgram(4000, &[i as u8; 1400])).collect();
        d.push(dgram(4000, &[7; 99]));
        let back = resegment(&d);
        assert_eq!(back.len(), d.len());
        for (a, b) in back.iter().zip(&d) {
            assert_eq!(a.len(), b.len());
            assert_eq!(a[20..26], b[20..26], "ports and UDP length");
            assert_eq!(a[28..], b[28..], "payload");
            assert_eq!(checksum(&a[..20]), 0, "IPv4 checksum");
            let mut v = Vec::new();
            v.extend_from_slice(&a[12..20]);
            v.extend_from_slice(&[0, 17]);
            v.extend_from_slice(&a[24..26]);
            v.extend_from_slice(&a[20..]);
            assert_eq!(checksum(&v), 0, "UDP checksum");
        }
    }

    #[test]
    fn runs_stay_under_64k() {
        let pkts = stream(1, 60, 1400, 1400);
        let r = runs(&pkts);
        assert_eq!(r.iter().map(|r| r.1).sum::<usize>(), 60);
        for (start, count) in r {
            let total = 52
                + pkts[start..start + count]
                    .iter()
                    .map(|p| p.len() - 52)
                    .sum::<usize>();
            assert!(total <= MAX_TOTAL, "{total}");
        }
    }

    /// Full TCP/UDP checksum over the IPv6 pseudo header + L4 (field included as it is).
    fn l4_sum6(pkt: &[u8]) -> u16 {
        let mut v = Vec::new();
        v.extend_from_slice(&pkt[8..40]);
        v.extend_from_slice(&((pkt.len() - 40) as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, pkt[6]]);
        v.extend_from_slice(&pkt[40..]);
        checksum(&v)
    }

    const SRC6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2];
    const DST6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];

    /// The fixed IPv6 header: traffic class 0, flow label 0x9abcd, hop limit 63.
    fn ip6(p: &mut [u8], next: u8) {
        p[0..4].copy_from_slice(&[0x60, 0x09, 0xab, 0xcd]);
        let len = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p[6] = next;
        p[7] = 63;
        p[8..24].copy_from_slice(&SRC6);
        p[24..40].copy_from_slice(&DST6);
    }

    /// A TCP/IPv6 segment with a valid checksum; timestamps option (12 bytes) as Linux sends.
    fn seg6(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let hdr = 40 + 32;
        let mut p = vec![0u8; hdr + payload.len()];
        ip6(&mut p, 6);
        p[40..42].copy_from_slice(&5201u16.to_be_bytes());
        p[42..44].copy_from_slice(&40000u16.to_be_bytes());
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[48..52].copy_from_slice(&7u32.to_be_bytes());
        p[52] = 8 << 4;
        p[53] = flags;
        p[54..56].copy_from_slice(&500u16.to_be_bytes());
        p[60..72].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 4]);
        p[hdr..].copy_from_slice(payload);
        let t = l4_sum6(&p);
        p[56..58].copy_from_slice(&t.to_be_bytes());
        p
    }

    /// `n` TCP/IPv6 segments of `size` bytes of a byte stream starting at `seq`, the last
    /// `last` long.
    fn stream6(seq: u32, n: usize, size: usize, last: usize) -> Vec<Vec<u8>> {
        let mut s = seq;
        (0..n)
            .map(|i| {
                let len = if i + 1 == n { last } else { size };
                let data: Vec<u8> = (0..len).map(|b| (s as usize + b) as u8).collect();
                let p = seg6(s, &data, TCP_FLAG_ACK);
                s = s.wrapping_add(len as u32);
                p
            })
            .collect()
    }

    /// Recomputes the TCP/UDP checksum of an IPv6 packet after a test changed it.
    fn resum6(p: &mut [u8]) {
        let at = if p[6] == 17 { 46 } else { 56 };
        p[at..at + 2].copy_from_slice(&[0, 0]);
        let c = l4_sum6(p);
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn an_ipv6_bulk_stream_is_one_run() {
        let pkts = stream6(1000, 44, 1360, 700);
        assert_eq!(runs(&pkts), vec![(0, 44)]);
    }

    #[test]
    fn merged_ipv6_packet_is_the_stream_with_a_completable_checksum() {
        let mut pkts = stream6(u32::MAX - 3000, 5, 1360, 1360);
        let last = pkts.len() - 1;
        let payload = pkts[last][72..].to_vec();
        let seq = u32::from_be_bytes(pkts[last][44..48].try_into().unwrap());
        pkts[last] = seg6(seq, &payload, TCP_FLAG_ACK | TCP_FLAG_PSH);
        assert_eq!(runs(&pkts), vec![(0, 5)]);
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr).unwrap();
        assert_eq!(v[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(v[1], VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 72, "hdr_len");
        assert_eq!(u16::from_ne_bytes([v[4], v[5]]), 1360, "gso_size");
        assert_eq!(u16::from_ne_bytes([v[6], v[7]]), 40, "csum_start");
        assert_eq!(u16::from_ne_bytes([v[8], v[9]]), 16, "csum_offset");
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[72..]);
        }
        assert_eq!(whole.len(), 72 + 5 * 1360);
        assert_eq!(
            u16::from_be_bytes([whole[4], whole[5]]) as usize,
            whole.len() - 40,
            "payload length"
        );
        // Everything else of the IPv6 header is the first segment's.
        assert_eq!(&whole[..4], &pkts[0][..4]);
        assert_eq!(&whole[6..40], &pkts[0][6..40]);
        assert_eq!(whole[53], TCP_FLAG_ACK | TCP_FLAG_PSH);
        assert_eq!(&whole[44..48], &pkts[0][44..48], "first sequence number");
        // The field holds the folded IPv6 pseudo-header sum (tcp6_gro_complete's
        // ~tcp_v6_check(len, saddr, daddr, 0)); completing it makes the checksum verify.
        let mut ph = Vec::new();
        ph.extend_from_slice(&whole[8..40]);
        ph.extend_from_slice(&((whole.len() - 40) as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 6]);
        let partial = u16::from_be_bytes([whole[56], whole[57]]);
        assert_eq!(partial, !checksum(&ph));
        let mut body_only = whole.clone();
        body_only[56..58].copy_from_slice(&[0, 0]);
        let mut sum = u32::from(!checksum(&body_only[40..])) + u32::from(partial);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        whole[56..58].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        assert_eq!(l4_sum6(&whole), 0, "completed TCP checksum verifies");
    }

    #[test]
    fn ipv6_runs_break_where_linux_gro_would() {
        // A gap in sequence numbers (out of order / loss), and a reordered pair.
        let mut pkts = stream6(1, 3, 100, 100);
        pkts.extend(stream6(10_000, 2, 100, 100));
        assert_eq!(runs(&pkts), vec![(0, 3), (3, 2)]);
        let mut pkts = stream6(1, 5, 100, 100);
        pkts.swap(1, 2);
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1), (2, 1), (3, 2)]);
        // A shorter segment ends a run.
        let mut pkts = stream6(1, 2, 100, 50);
        pkts.extend(stream6(151, 2, 100, 100));
        assert_eq!(runs(&pkts), vec![(0, 2), (2, 2)]);
        // PSH in the middle ends the run after it.
        let mut pkts = stream6(1, 4, 100, 100);
        pkts[1][53] |= TCP_FLAG_PSH;
        assert_eq!(runs(&pkts), vec![(0, 2), (2, 2)]);
        // FIN, SYN, RST, URG, ECE/CWR or no ACK: alone.
        for flags in [
            TCP_FLAG_ACK | 0x01,
            TCP_FLAG_ACK | 0x02,
            TCP_FLAG_ACK | 0x04,
            TCP_FLAG_ACK | 0x20,
            TCP_FLAG_ACK | 0x40,
            TCP_FLAG_ACK | 0x80,
            0,
        ] {
            let mut pkts = stream6(1, 3, 100, 100);
            pkts[1][53] = flags;
            assert_eq!(
                runs(&pkts),
                vec![(0, 1), (1, 1), (2, 1)],
                "flags {flags:#x}"
            );
        }
        // Another traffic class, flow label, hop limit, address, port, ack number, window,
        // urgent pointer, options: not the same flow or not mergeable.
        for (at, val) in [
            (1usize, 0x29u8), // traffic class
            (3, 0xce),        // flow label
            (7, 62),          // hop limit
            (23, 3),          // source address
            (39, 3),          // destination address
            (43, 9),          // destination port
            (51, 8),          // ack
            (55, 1),          // window
            (59, 1),          // urgent pointer
            (71, 5),          // timestamp option
        ] {
            let mut pkts = stream6(1, 3, 100, 100);
            pkts[2][at] = val;
            assert_eq!(runs(&pkts), vec![(0, 2), (2, 1)], "byte {at}");
        }
        // A bigger segment after the first.
        let mut pkts = stream6(1, 1, 100, 100);
        pkts.extend(stream6(101, 1, 200, 200));
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1)]);
        // An extension header (hop-by-hop options, then TCP) on every segment: alone, as
        // every segment is parsed only up to the fixed header.
        let pkts: Vec<Vec<u8>> = stream6(1, 3, 100, 100)
            .into_iter()
            .map(|mut p| {
                p.splice(40..40, [6u8, 0, 1, 4, 0, 0, 0, 0]);
                p[6] = 0;
                let len = (p.len() - 40) as u16;
                p[4..6].copy_from_slice(&len.to_be_bytes());
                p
            })
            .collect();
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 1), (2, 1)]);
        // Routing, fragment and destination-options headers, ICMPv6, a jumbogram length, a
        // wrong payload length: alone.
        let mut pkts = stream6(1, 6, 100, 100);
        pkts[0][6] = 43;
        pkts[1][6] = 44;
        pkts[2][6] = 60;
        pkts[3][6] = 58;
        pkts[4][4..6].copy_from_slice(&[0, 0]);
        pkts[5][5] ^= 1;
        assert_eq!(runs(&pkts), (0..6).map(|i| (i, 1)).collect::<Vec<_>>());
        // Pure ACKs: alone.
        let acks = vec![seg6(5, b"", TCP_FLAG_ACK), seg6(5, b"", TCP_FLAG_ACK)];
        assert_eq!(runs(&acks), vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn families_never_mix_in_a_run() {
        // An IPv4 stream and an IPv6 stream back to back (dual stack over one peer), with
        // lengths chosen so that everything but the family lines up.
        let mut pkts = stream(1, 3, 120, 120);
        pkts.extend(stream6(361, 3, 100, 100));
        pkts.extend(stream(361, 2, 120, 120));
        assert_eq!(runs(&pkts), vec![(0, 3), (3, 3), (6, 2)]);
    }

    /// A UDP/IPv6 datagram with a valid checksum.
    fn dgram6(sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 48 + payload.len()];
        ip6(&mut p, 17);
        p[40..42].copy_from_slice(&sport.to_be_bytes());
        p[42..44].copy_from_slice(&5201u16.to_be_bytes());
        let len = (p.len() - 40) as u16;
        p[44..46].copy_from_slice(&len.to_be_bytes());
        p[48..].copy_from_slice(payload);
        resum6(&mut p);
        p
    }

    #[test]
    fn udp6_flows_coalesce_only_with_uso() {
        let mut pkts: Vec<Vec<u8>> = (0..5).map(|i| dgram6(4000, &[i as u8; 1380])).collect();
        pkts.push(dgram6(4000, &[9; 300]));
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut r = Vec::new();
        plan(&refs, false, &mut r);
        assert_eq!(r.len(), 6, "no USO: every datagram alone");
        plan(&refs, true, &mut r);
        assert_eq!(r, vec![Run { start: 0, count: 6 }]);
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr).unwrap();
        assert_eq!(v[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 48);
        assert_eq!(u16::from_ne_bytes([v[4], v[5]]), 1380);
        assert_eq!(u16::from_ne_bytes([v[6], v[7]]), 40);
        assert_eq!(u16::from_ne_bytes([v[8], v[9]]), 6);
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[48..]);
        }
        assert_eq!(
            u16::from_be_bytes([whole[4], whole[5]]) as usize,
            whole.len() - 40
        );
        assert_eq!(
            u16::from_be_bytes([whole[44], whole[45]]) as usize,
            whole.len() - 40
        );
        let mut ph = Vec::new();
        ph.extend_from_slice(&whole[8..40]);
        ph.extend_from_slice(&((whole.len() - 40) as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(u16::from_be_bytes([whole[46], whole[47]]), !checksum(&ph));
        // Another flow, a bigger datagram after a smaller one, a shorter one mid-run, another
        // flow label: breaks.
        let mut other_label = dgram6(4001, &[1; 100]);
        other_label[2] ^= 1;
        resum6(&mut other_label);
        let pkts = [
            dgram6(4000, &[1; 100]),
            dgram6(4001, &[1; 100]),
            dgram6(4001, &[1; 50]),
            dgram6(4001, &[1; 100]),
            other_label,
        ];
        assert_eq!(runs(&pkts), vec![(0, 1), (1, 2), (3, 1), (4, 1)]);
        // A zero checksum is invalid over IPv6: such datagrams are never merged.
        let mut zero: Vec<Vec<u8>> = (0..3).map(|_| dgram6(4000, &[3; 100])).collect();
        zero[1][46..48].copy_from_slice(&[0, 0]);
        assert_eq!(runs(&zero), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn ipv6_segmentation_gives_back_the_coalesced_segments() {
        // TCP: byte for byte the original segments (seq, PSH on the last, checksums).
        let mut pkts = stream6(77, 30, 1360, 512);
        let last = pkts.len() - 1;
        let seq = u32::from_be_bytes(pkts[last][44..48].try_into().unwrap());
        let payload = pkts[last][72..].to_vec();
        pkts[last] = seg6(seq, &payload, TCP_FLAG_ACK | TCP_FLAG_PSH);
        assert_eq!(runs(&pkts), vec![(0, 30)]);
        assert_eq!(resegment(&pkts), pkts);
        // UDP (USO): byte for byte the same datagrams, checksums included.
        let mut d: Vec<Vec<u8>> = (0..20).map(|i| dgram6(4000, &[i as u8; 1380])).collect();
        d.push(dgram6(4000, &[7; 99]));
        assert_eq!(runs(&d), vec![(0, 21)]);
        assert_eq!(resegment(&d), d);
    }

    #[test]
    fn ipv6_runs_stay_under_64k() {
        let pkts = stream6(1, 60, 1400, 1400);
        let r = runs(&pkts);
        assert!(r.len() > 1);
        assert_eq!(r.iter().map(|r| r.1).sum::<usize>(), 60);
        for (start, count) in r {
            let total = 72
                + pkts[start..start + count]
                    .iter()
                    .map(|p| p.len() - 72)
                    .sum::<usize>();
            assert!(total <= MAX_TOTAL, "{total}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut r = Vec::new();
        let mut hdr = Vec::new();
        for len in 0..100 {
            for fill in [0u8, 0x45, 0x60, 0xff, 6, 17] {
                let p = vec![fill; len];
                let q = vec![fill; len];
                let batch = [p.as_slice(), q.as_slice()];
                plan(&batch, true, &mut r);
                assert_eq!(r.iter().map(|r| r.count).sum::<usize>(), 2);
                // Not cut by plan: no merged header, no panic.
                if merged_header(&batch, &mut hdr).is_none() {
                    assert!(hdr.is_empty());
                }
            }
        }
        assert!(merged_header(&[], &mut hdr).is_none());
    }

    /// xorshift: deterministic pseudo-random numbers.
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed >> 11
    }

    /// A poor man's fuzzer (next to backends/fuzz): batches of IPv4 and IPv6 TCP and UDP
    /// streams with random bytes changed, packets dropped, swapped or cut short. Planning never
    /// panics and covers every packet once, in order; every merged run is what GRO could have
    /// built: segmenting the super-packet again (as the kernel or tun-rs does) gives back
    /// exactly the run's packets, apart from the fields segmentation rewrites (IPv4 id and
    /// header checksum, the TCP/UDP checksum).
    #[test]
    fn random_batches_plan_and_merge_soundly() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut r = Vec::new();
        let mut hdr = Vec::new();
        let mut merged = [0usize; 2];
        for round in 0..3000 {
            let n = 2 + noise(&mut seed) as usize % 12;
            let size = 1 + noise(&mut seed) as usize % 300;
            let mut pkts = match round % 4 {
                0 => stream(noise(&mut seed) as u32, n, size, size),
                1 => stream6(noise(&mut seed) as u32, n, size, size),
                2 => (0..n).map(|_| dgram(4000, &vec![5; size])).collect(),
                _ => (0..n).map(|_| dgram6(4000, &vec![5; size])).collect(),
            };
            for _ in 0..noise(&mut seed) % 4 {
                let i = noise(&mut seed) as usize % pkts.len();
                match noise(&mut seed) % 4 {
                    0 => {
                        let at = noise(&mut seed) as usize % pkts[i].len();
                        pkts[i][at] = noise(&mut seed) as u8;
                    }
                    1 if pkts.len() > 1 => {
                        pkts.remove(i);
                    }
                    2 => {
                        let j = noise(&mut seed) as usize % pkts.len();
                        pkts.swap(i, j);
                    }
                    _ => {
                        let cut = noise(&mut seed) as usize % (pkts[i].len() + 1);
                        pkts[i].truncate(cut);
                    }
                }
            }
            let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
            plan(&refs, true, &mut r);
            let mut next = 0;
            for run in &r {
                assert_eq!(run.start, next);
                assert!(run.count > 0);
                next += run.count;
            }
            assert_eq!(next, pkts.len());
            for run in r.iter().filter(|r| r.count > 1) {
                let part = &refs[run.start..run.start + run.count];
                let v6 = part[0][0] >> 4 == 6;
                merged[usize::from(v6)] += 1;
                let v = merged_header(part, &mut hdr).unwrap();
                let mut whole = hdr.clone();
                for p in part {
                    whole.extend_from_slice(&p[hdr.len()..]);
                }
                assert!(whole.len() <= MAX_TOTAL);
                let vh = tun_rs::VirtioNetHdr::decode(&v).unwrap();
                let mut out = vec![vec![0u8; 2048]; part.len()];
                let mut sizes = vec![0usize; part.len()];
                let k = tun_rs::gso_split(&mut whole, vh, &mut out, &mut sizes, 0, v6).unwrap();
                assert_eq!(k, part.len());
                let (l, proto) = if v6 {
                    (40, part[0][6])
                } else {
                    (20, part[0][9])
                };
                let l4_csum = l + if proto == 17 { 6 } else { 16 };
                for (i, orig) in part.iter().enumerate() {
                    let mut back = out[i][..sizes[i]].to_vec();
                    assert_eq!(back.len(), orig.len());
                    let mut want = orig.to_vec();
                    for at in [l4_csum, l4_csum + 1] {
                        back[at] = 0;
                        want[at] = 0;
                    }
                    if !v6 {
                        for at in [4, 5, 10, 11] {
                            back[at] = 0;
                            want[at] = 0;
                        }
                    }
                    assert_eq!(back, want, "round {round}, packet {i} of the run");
                }
            }
        }
        assert!(merged[0] > 100 && merged[1] > 100, "{merged:?}");
    }
}
