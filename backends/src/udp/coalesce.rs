//! Receive-side coalescing without copies (pure; no I/O).
//!
//! One UDP_GRO receive hands us up to 64 datagrams from one peer, each a bare IPv4 packet, and in
//! a bulk transfer they are consecutive segments of one TCP flow. [`plan`] cuts such a batch into
//! runs that the kernel can take as one TSO super-packet; [`merged_header`] builds the virtio-net
//! header and the rewritten IPv4+TCP header of a run. The TUN write is then a `writev` of that
//! header followed by the segments' payloads where they already lie in the receive buffer: no
//! byte of payload is copied in userspace.
//!
//! A TCP run follows Linux's own TCP GRO rules: same addresses, ports, TOS, TTL, DF, IP header
//! without options, identical TCP header apart from sequence number and PSH (same ack, window,
//! options such as timestamps), only ACK (and PSH on the last segment) set, contiguous sequence
//! numbers, equal payload sizes with only the last one possibly shorter, at most 64 KiB in all.
//! A UDP run (when the TUN takes USO, Linux ≥ 6.2) is datagrams of one flow with equal payload
//! sizes, the last possibly shorter: the kernel cuts the super-packet back into exactly those
//! datagrams (with fresh checksums), as UDP GRO does. Anything else (ICMP, SYN/FIN/RST,
//! out-of-order segments) goes to the TUN as it came.

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP_L4};

use super::packet::checksum;

/// Size of the virtio-net header that precedes every TUN read and write with offload on.
pub const VNET_HDR_LEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// virtio-net header flag: the checksum at csum_start + csum_offset is to be completed.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_ACK: u8 = 0x10;
/// Largest IPv4 packet.
const MAX_TOTAL: usize = 65_535;

/// A run of packets `start..start + count` of a batch, written to the TUN as one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub count: usize,
}

/// The parts of a TCP or UDP IPv4 packet that decide whether it joins a run.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// IPv4 + TCP/UDP header length.
    hdr_len: usize,
    payload: usize,
    /// TCP: sequence number and flags (0 for UDP).
    seq: u32,
    flags: u8,
}

/// Parses an IPv4 packet without options that is not a fragment and carries a payload: TCP with
/// no flag other than ACK (and PSH), or, when `udp` is allowed, UDP.
fn segment(pkt: &[u8], udp: bool) -> Option<Segment> {
    if pkt.len() < 28 || pkt[0] != 0x45 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // Fragment offset or More Fragments set: not a whole packet.
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    if total != pkt.len() || frag & 0x3fff != 0 {
        return None;
    }
    match pkt[9] {
        6 if pkt.len() >= 40 => {
            let tcp_len = usize::from(pkt[32] >> 4) * 4;
            let hdr_len = 20 + tcp_len;
            let flags = pkt[33];
            if tcp_len < 20 || hdr_len >= total || flags & !(TCP_FLAG_ACK | TCP_FLAG_PSH) != 0 {
                return None;
            }
            if flags & TCP_FLAG_ACK == 0 {
                return None;
            }
            Some(Segment {
                hdr_len,
                payload: total - hdr_len,
                seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
                flags,
            })
        }
        17 if udp => {
            let udp_len = usize::from(u16::from_be_bytes([pkt[24], pkt[25]]));
            if udp_len != total - 20 || udp_len <= 8 {
                return None;
            }
            Some(Segment {
                hdr_len: 28,
                payload: udp_len - 8,
                seq: 0,
                flags: 0,
            })
        }
        _ => None,
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
    if next.hdr_len != first.hdr_len
        || next.payload > first.payload
        || bytes + next.payload > MAX_TOTAL
    {
        return false;
    }
    // IPv4: TOS (1), DF/flags (6), TTL and protocol (8..10), addresses (12..20); ports (20..24).
    let same_ip = first_pkt[1] == next_pkt[1]
        && first_pkt[6] == next_pkt[6]
        && first_pkt[8..10] == next_pkt[8..10]
        && first_pkt[12..20] == next_pkt[12..20]
        && first_pkt[20..24] == next_pkt[20..24];
    if !same_ip {
        return false;
    }
    if first_pkt[9] == 17 {
        // UDP: datagram boundaries are kept by equal sizes; nothing else to compare.
        return true;
    }
    let h = first.hdr_len;
    // TCP: contiguous sequence numbers; same ack (28..32), data offset (32), window (34..36),
    // urgent pointer (38..40) and options (40..h); not the flags or the checksum.
    next.seq == last.seq.wrapping_add(last.payload as u32)
        && first_pkt[28..33] == next_pkt[28..33]
        && first_pkt[34..36] == next_pkt[34..36]
        && first_pkt[38..h] == next_pkt[38..h]
}

/// Cuts a batch of validated IPv4 packets into runs; each packet is in exactly one run, in
/// order. Runs of one are packets to write as they are. UDP datagrams form runs only when
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
/// IPv4+TCP/UDP header of the super-packet, which is that header followed by every packet's
/// payload. The header is the first packet's with the total length, the IPv4 checksum, and
/// the L4 checksum field set to the pseudo-header sum the kernel completes (NEEDS_CSUM), as a
/// NIC doing GRO would hand it over; TCP takes PSH from the last segment, UDP gets the summed
/// length. The kernel cuts it again at `gso_size`: the same segments or datagrams.
pub fn merged_header(run: &[&[u8]], hdr: &mut Vec<u8>) -> [u8; VNET_HDR_LEN] {
    let first = run[0];
    let udp = first[9] == 17;
    let hdr_len = if udp {
        28
    } else {
        20 + usize::from(first[32] >> 4) * 4
    };
    let gso_size = first.len() - hdr_len;
    let total: usize = hdr_len + run.iter().map(|p| p.len() - hdr_len).sum::<usize>();
    hdr.clear();
    hdr.extend_from_slice(&first[..hdr_len]);
    hdr[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    hdr[10..12].copy_from_slice(&[0, 0]);
    let ip_csum = checksum(&hdr[..20]);
    hdr[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let l4_len = (total - 20) as u32;
    let csum_at = if udp {
        hdr[24..26].copy_from_slice(&(l4_len as u16).to_be_bytes());
        26
    } else {
        if let Some(last) = run.last() {
            hdr[33] |= last[33] & TCP_FLAG_PSH;
        }
        36
    };
    // Pseudo header: source, destination, zero + protocol, L4 length; folded, not inverted.
    let mut sum: u32 = u32::from(first[9]) + l4_len;
    for c in hdr[12..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    hdr[csum_at..csum_at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    let vnet = tun_rs::VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: if udp {
            VIRTIO_NET_HDR_GSO_UDP_L4
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        },
        hdr_len: hdr_len as u16,
        gso_size: gso_size as u16,
        csum_start: 20,
        csum_offset: (csum_at - 20) as u16,
    };
    let mut v = [0u8; VNET_HDR_LEN];
    // encode fails only on a buffer shorter than the header; this one is exactly its size.
    let _ = vnet.encode(&mut v);
    v
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
        let v = merged_header(&refs, &mut hdr);
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
        let v = merged_header(&refs, &mut hdr);
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
    /// egress side does with a TSO/USO read): returns the segments.
    fn resegment(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut hdr = Vec::new();
        let v = merged_header(&refs, &mut hdr);
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[hdr.len()..]);
        }
        let vh = tun_rs::VirtioNetHdr::decode(&v).unwrap();
        let mut out = vec![vec![0u8; 2048]; 128];
        let mut sizes = vec![0usize; 128];
        let n = tun_rs::gso_split(&mut whole, vh, &mut out, &mut sizes, 0, false).unwrap();
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

    #[test]
    fn garbage_never_panics() {
        let mut r = Vec::new();
        for len in 0..80 {
            for fill in [0u8, 0x45, 0xff, 6] {
                let p = vec![fill; len];
                let q = vec![fill; len];
                plan(&[p.as_slice(), q.as_slice()], true, &mut r);
                assert_eq!(r.iter().map(|r| r.count).sum::<usize>(), 2);
            }
        }
    }
}
