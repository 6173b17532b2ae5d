//! The wireguard data plane between two testbed nodes, without flanneld: two `Device`s on TUNs
//! of their own, peers applied from `WgPeer`s, a UDP datagram from an address of one node's
//! subnet to the other's through both devices, the per-peer snapshot (for `wg show`) after it,
//! and a removed peer that no longer gets traffic. Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use backends::wireguard::dataplane::{Device, DeviceConfig, DropReason};
use backends::wireguard::key::PrivateKey;
use backends::wireguard::peers::WgPeer;
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
    let (ka, kb) = (
        PrivateKey::from_random([1; 32]),
        PrivateKey::from_random([2; 32]),
    );
    let a = device(&tb, 0, "wga", &ka);
    let b = device(&tb, 1, "wgb", &kb);
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
