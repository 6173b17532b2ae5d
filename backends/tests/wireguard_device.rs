//! The wireguard data plane between two testbed nodes, without flanneld: two `Device`s on TUNs
//! of their own, peers applied from `WgPeer`s, a UDP datagram from an address of one node's
//! subnet to the other's through both devices, the per-peer snapshot (for `wg show`) after it,
//! and a removed peer that no longer gets traffic. Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use backends::wireguard::dataplane::{Device, DeviceConfig, DropReason};
use backends::wireguard::key::PrivateKey;
use backends::wireguard::peers::{Switching, WgPeer};
use subnet_lease::SubnetKey;
use test_support::{in_netns, require_root_with, wait_for, Testbed};

const PORT: u16 = 51820;

fn device(tb: &Testbed, node: usize, name: &str, key: &PrivateKey) -> Device {
    let ns = tb.nodes[node].ns.clone();
    let name = name.to_string();
    let (dev, sock) = in_netns(&ns, move || {
        let dev = tun_rs::DeviceBuilder::new()
            .name(&name)
            .mtu(1420)
            .packet_information(false)
            .enable(true)
            .build_sync()
            .unwrap();
        (dev, UdpSocket::bind(("0.0.0.0", PORT)).unwrap())
    })
    .unwrap();
    Device::start(
        dev,
        sock,
        DeviceConfig {
            key,
            psk: Some([9; 32]),
            keepalive: Some(25),
            mtu: 1420,
        },
    )
    .unwrap()
}

/// Devices `wga` (node 0, 10.9.1.1, keyed from `seed_a`) and `wgb` (node 1, 10.9.2.1, keyed
/// from `seed_b`), each with its address and a route to the other's /24 through it.
fn two_devices(tb: &Testbed, seed_a: u8, seed_b: u8) -> (PrivateKey, PrivateKey, Device, Device) {
    let (ka, kb) = (
        PrivateKey::from_random([seed_a; 32]),
        PrivateKey::from_random([seed_b; 32]),
    );
    let a = device(tb, 0, "wga", &ka);
    let b = device(tb, 1, "wgb", &kb);
    for (n, dev, own, other) in [
        (0, "wga", "10.9.1.1", "10.9.2.0/24"),
        (1, "wgb", "10.9.2.1", "10.9.1.0/24"),
    ] {
        let ns = &tb.nodes[n].ns;
        tb.exec(ns, &["ip", "addr", "add", &format!("{own}/32"), "dev", dev])
            .unwrap();
        tb.exec(ns, &["ip", "route", "add", other, "dev", dev])
            .unwrap();
    }
    (ka, kb, a, b)
}

fn peer(key: &PrivateKey, endpoint: &str, subnet: &str) -> WgPeer {
    WgPeer {
        public_key: key.public(),
        endpoint: endpoint.parse().unwrap(),
        allowed: subnet.parse().unwrap(),
        lease: SubnetKey::v4(subnet.parse().unwrap()),
    }
}

#[test]
fn two_devices_carry_a_datagram_and_report_their_peers() {
    if !require_root_with(&["ip"]) {
        return;
    }
    let tb = Testbed::new(2).unwrap();
    let (ka, kb, a, b) = two_devices(&tb, 1, 2);
    let to_b = peer(&kb, &format!("{}:{PORT}", tb.nodes[1].ip), "10.9.2.0/24");
    let to_a = peer(&ka, &format!("{}:{PORT}", tb.nodes[0].ip), "10.9.1.0/24");
    assert_eq!(a.apply(std::slice::from_ref(&to_b), &[]).add.len(), 1);
    assert_eq!(b.apply(std::slice::from_ref(&to_a), &[]).add.len(), 1);
    // Applying the same peers again changes nothing.
    assert!(a.apply(std::slice::from_ref(&to_b), &[]).is_empty());

    let rx = in_netns(&tb.nodes[1].ns, || {
        UdpSocket::bind("10.9.2.1:7000").unwrap()
    })
    .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = in_netns(&tb.nodes[0].ns, || UdpSocket::bind("10.9.1.1:0").unwrap()).unwrap();
    let got = wait_for(Duration::from_secs(10), || {
        tx.send_to(b"through two devices", "10.9.2.1:7000").ok()?;
        let mut buf = [0u8; 64];
        let (n, from) = rx.recv_from(&mut buf).ok()?;
        Some((buf[..n].to_vec(), from))
    })
    .expect("no datagram through the devices");
    assert_eq!(got.0, b"through two devices");
    assert_eq!(
        got.1,
        "10.9.1.1"
            .parse::<std::net::IpAddr>()
            .map(|ip| SocketAddr::new(ip, tx.local_addr().unwrap().port()))
            .unwrap()
    );

    let snap = a.snapshot();
    assert_eq!(snap.len(), 1);
    let p = &snap[0];
    assert_eq!(p.public_key, kb.public());
    assert_eq!(p.endpoint, to_b.endpoint);
    assert_eq!(p.allowed_ips, vec![to_b.allowed]);
    assert_eq!(p.persistent_keepalive, Some(25));
    let shook = p.last_handshake.expect("a handshake time");
    assert!(SystemTime::now().duration_since(shook).unwrap() < Duration::from_secs(30));
    assert!(p.tx_bytes >= 148 && p.rx_bytes >= 92, "{p:?}");
    assert!(
        a.stats()
            .tx_packets
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Counted just after the TUN write that the receiver may already have read.
    wait_for(Duration::from_secs(2), || {
        (b.stats()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not counted: {:?}", b.stats()));

    // B forgets A: A's packets are refused (its session index is gone), nothing arrives.
    assert_eq!(b.apply(&[], &[]).remove, vec![ka.public()]);
    assert!(b.snapshot().is_empty());
    let refused =
        || b.stats().dropped(DropReason::UnknownIndex) + b.stats().dropped(DropReason::UnknownKey);
    let before = refused();
    tx.send_to(b"after removal", "10.9.2.1:7000").unwrap();
    let mut buf = [0u8; 64];
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "a removed peer's packet arrived"
    );
    wait_for(Duration::from_secs(5), || {
        (refused() > before).then_some(())
    })
    .expect("the removed peer's packet was not counted");
}

/// A node mid-switch: B has no wireguard peer for A (A's lease is still vxlan, say), but A's
/// wireguard handshakes from A's PublicIP with a key no lease has: B takes it for A's lease
/// subnet, the datagram arrives, and the peer goes with the lease.
#[test]
fn a_peer_of_another_type_handshaking_from_its_public_ip_is_accepted_for_its_subnet() {
    if !require_root_with(&["ip"]) {
        return;
    }
    let tb = Testbed::new(2).unwrap();
    let (ka, kb, a, b) = two_devices(&tb, 3, 4);
    a.apply(
        &[peer(
            &kb,
            &format!("{}:{PORT}", tb.nodes[1].ip),
            "10.9.2.0/24",
        )],
        &[],
    );
    let a_lease = Switching {
        lease: SubnetKey::v4("10.9.1.0/24".parse().unwrap()),
        public_ip: tb.nodes[0].ip.parse().unwrap(),
        allowed: "10.9.1.0/24".parse().unwrap(),
    };
    // First from an address that is no such peer's: refused.
    let elsewhere = Switching {
        public_ip: "172.30.0.99".parse().unwrap(),
        ..a_lease
    };
    b.apply(&[], &[elsewhere]);
    let rx = in_netns(&tb.nodes[1].ns, || {
        UdpSocket::bind("10.9.2.1:7000").unwrap()
    })
    .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = in_netns(&tb.nodes[0].ns, || UdpSocket::bind("10.9.1.1:0").unwrap()).unwrap();
    let mut buf = [0u8; 64];
    tx.send_to(b"x", "10.9.2.1:7000").unwrap();
    assert!(rx.recv_from(&mut buf).is_err());
    wait_for(Duration::from_secs(5), || {
        (b.stats().dropped(DropReason::UnknownKey) > 0).then_some(())
    })
    .expect("the unknown key was not counted");
    assert!(b.snapshot().is_empty());
    // From A's PublicIP, A's lease being of another type: accepted.
    b.apply(&[], &[a_lease]);
    // A's core held "x" while no handshake succeeded; it arrives first now.
    let mut arrived = Vec::new();
    wait_for(Duration::from_secs(15), || {
        tx.send_to(b"mid-switch", "10.9.2.1:7000").ok()?;
        while let Ok((n, _)) = rx.recv_from(&mut buf) {
            arrived.push(buf[..n].to_vec());
        }
        arrived.iter().any(|d| d == b"mid-switch").then_some(())
    })
    .unwrap_or_else(|| panic!("nothing arrived from the peer mid-switch: {arrived:?}"));
    assert!(
        arrived.iter().all(|d| d == b"mid-switch" || d == b"x"),
        "{arrived:?}"
    );
    let snap = b.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].public_key, ka.public());
    assert_eq!(snap[0].allowed_ips, vec![ipnet::IpNet::V4(a_lease.allowed)]);
    // Kept while the lease is there; gone with it.
    assert!(b.apply(&[], &[a_lease]).is_empty());
    assert_eq!(b.apply(&[], &[]).remove, vec![ka.public()]);
    assert!(b.snapshot().is_empty());
}
