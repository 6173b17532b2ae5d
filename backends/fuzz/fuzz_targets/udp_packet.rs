//! Fuzzes the udp backend's packet path: validation of arriving datagrams (sender, inner source
//! and destination, IPv4 and IPv6), the egress decision with TTL / hop-limit decrement, and
//! ICMP / ICMPv6 reply building. Any input
//! must give a verdict without panicking, and accepted packets must satisfy the checks. The
//! datagram is also cut like a UDP_GRO batch and run through the receive-side coalescer.
//! Run: cd backends/fuzz && cargo fuzz run udp_packet

#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use backends::udp::coalesce;
use backends::udp::packet::{self, checksum, Egress, Routes, UdpPeer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    // The first 6 bytes pick the sender (address, port); the rest is the datagram payload.
    let from = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(data[0], data[1], data[2], data[3]),
        u16::from_be_bytes([data[4], data[5]]),
    ));
    let pkt = &data[6..];
    let own: ipnet::Ipv4Net = "10.5.1.0/24".parse().unwrap();
    let own6: ipnet::Ipv6Net = "fd10:0:0:11::/64".parse().unwrap();
    let routes = Routes {
        own: Some(own),
        own6: Some(own6),
        peers: vec![
            UdpPeer {
                subnet: "10.5.2.0/24".parse().unwrap(),
                addr: "172.30.0.12:8285".parse().unwrap(),
            },
            UdpPeer {
                subnet: "10.5.3.0/24".parse().unwrap(),
                addr: from,
            },
            UdpPeer {
                subnet: "fd10:0:0:13::/64".parse().unwrap(),
                addr: from,
            },
        ],
        switching: Vec::new(),
    };
    if routes.ingress(from, pkt).is_ok() {
        if pkt[0] >> 4 == 6 {
            let h = packet::parse_ipv6(pkt).expect("accepted packets parse");
            assert!(own6.contains(&h.dst));
            assert_eq!(h.total_len, pkt.len());
        } else {
            let h = packet::parse_ipv4(pkt).expect("accepted packets parse");
            assert!(own.contains(&h.dst));
            assert_eq!(h.total_len, pkt.len());
        }
    }
    // A GRO batch: the payload cut at a size the input picks; valid segments are coalesced.
    let seg = 20 + usize::from(data[5] % 64) * 8;
    let valid: Vec<&[u8]> = pkt
        .chunks(seg)
        .filter(|p| routes.ingress(from, p).is_ok())
        .collect();
    let mut runs = Vec::new();
    coalesce::plan(&valid, data[4] & 1 == 1, &mut runs);
    assert_eq!(runs.iter().map(|r| r.count).sum::<usize>(), valid.len());
    let mut hdr = Vec::new();
    for r in runs.iter().filter(|r| r.count > 1) {
        let run = &valid[r.start..r.start + r.count];
        coalesce::merged_header(run, &mut hdr).expect("runs cut by plan merge");
        let payload: usize = run.iter().map(|p| p.len() - hdr.len()).sum();
        if hdr[0] >> 4 == 6 {
            let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            assert_eq!(40 + len, hdr.len() + payload, "merged IPv6 payload length");
        } else {
            let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            assert_eq!(total, hdr.len() + payload, "merged length");
            assert_eq!(checksum(&hdr[..20]), 0, "merged IPv4 checksum");
        }
    }
    let mut copy = pkt.to_vec();
    let header_ok = packet::parse_ipv4(pkt).map(|h| checksum(&pkt[..h.header_len]) == 0);
    let sent = matches!(routes.egress(&mut copy), Egress::Send(_));
    if sent && pkt[0] >> 4 == 6 {
        assert_eq!(copy[7], pkt[7] - 1, "hop limit decremented");
    } else if sent {
        assert_eq!(copy[8], pkt[8] - 1, "TTL decremented");
        if header_ok == Ok(true) {
            let h = packet::parse_ipv4(&copy).unwrap();
            assert_eq!(checksum(&copy[..h.header_len]), 0, "checksum still valid");
        }
    }
    if let Some(reply) = packet::icmp6_unreachable(pkt) {
        let h = packet::parse_ipv6(&reply).expect("our ICMPv6 replies are valid IPv6");
        assert_eq!(packet::icmp6_checksum(&h.src, &h.dst, &reply[40..]), 0);
        assert!(reply.len() <= 1280);
    }
    if let Some(reply) = packet::icmp_net_unreachable(pkt) {
        let h = packet::parse_ipv4(&reply).expect("our ICMP replies are valid IPv4");
        assert_eq!(checksum(&reply[..h.header_len]), 0);
        assert_eq!(checksum(&reply[h.header_len..]), 0);
    }
});
