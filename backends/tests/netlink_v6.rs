//! RtNetlink's IPv6 side against the real kernel, in an anonymous network namespace of a thread
//! of its own (it and everything in it go when the thread ends, also on a panic; nothing
//! outside it is touched): an IPv6-local VXLAN device over a veth, its /128 address, a
//! permanent neighbour, an FDB entry and an onlink route, each read back equal through the
//! trait and as `ip`/`bridge` print it, added twice (idempotent) and deleted twice (gone is
//! fine). Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use backends::netlink::{
    ensure_subnet_address, Errno, Family, FdbEntry, Ipv6Conf, Mac, Neighbour, Netlink,
    NetlinkError, Route, VxlanParams,
};
use backends::netlink_rt::RtNetlink;
use ipnet::IpNet;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Runs `ip`/`bridge`/`cat` (in this thread's namespace, bounded in time).
fn show(program: &str, args: &[&str]) -> String {
    test_support::sh(program, args).unwrap()
}

#[test]
fn ipv6_vxlan_entries_round_trip_through_rtnetlink() {
    if !test_support::require_root_with(&["ip", "bridge"]) {
        return;
    }
    test_support::in_new_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(round_trip());
    })
    .unwrap();
}

async fn round_trip() {
    let nl = RtNetlink::connect().unwrap();
    // The underlay: a veth with an IPv6 address added through the trait (NODAD: usable at
    // once, never "tentative").
    show(
        "ip",
        &["link", "add", "va", "type", "veth", "peer", "name", "vb"],
    );
    show("ip", &["link", "set", "vb", "up"]);
    let va = nl.link_by_name("va").await.unwrap().unwrap();
    nl.set_link_mtu_up(va.index, 1500).await.unwrap();
    nl.add_address(va.index, net("fd00:99::1/64"))
        .await
        .unwrap();
    let listed = show("ip", &["-6", "addr", "show", "dev", "va"]);
    assert!(
        listed.contains("inet6 fd00:99::1/64 scope global nodad"),
        "{listed}"
    );
    assert!(
        !listed.contains("fd00:99::1/64 scope global tentative"),
        "{listed}"
    );

    // The device: local6, bound to va; an explicit MTU above lower-70 is clamped to it.
    let params = VxlanParams {
        vni: 1,
        port: 8472,
        local: ip("fd00:99::1"),
        link: va.index,
        learning: false,
        gbp: false,
    };
    let mac = Mac([0x0a, 0x58, 0, 0, 0, 6]);
    let dev = nl
        .create_vxlan("flannel-v6.1", &params, mac, 1450)
        .await
        .unwrap();
    let again = nl
        .create_vxlan("flannel-v6.1", &params, mac, 1430)
        .await
        .unwrap_err();
    assert_eq!(again.errno(), Some(Errno::EEXIST), "{again}");
    let link = nl.link_by_name("flannel-v6.1").await.unwrap().unwrap();
    assert_eq!(link.vxlan.as_ref(), Some(&params), "read back equal");
    assert_eq!((link.index, link.mac, link.mtu), (dev, mac, 1430));
    let detail = show("ip", &["-d", "link", "show", "flannel-v6.1"]);
    assert!(
        detail.contains("vxlan id 1 local fd00:99::1 dev va") && detail.contains("dstport 8472"),
        "{detail}"
    );

    // No router advertisements on it (flannel's accept_ra=0), set before it comes up.
    assert_eq!(
        nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa)
            .await
            .unwrap(),
        1
    );
    nl.set_ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa, 0)
        .await
        .unwrap();
    assert_eq!(
        nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        show("cat", &["/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra"]).trim(),
        "0",
        "the thread's namespace's setting"
    );
    assert_eq!(
        nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AddrGenMode)
            .await
            .unwrap(),
        0
    );
    nl.set_link_mtu_up(dev, 1430).await.unwrap();

    // Address: the subnet's network address /128; the kernel's fe80:: address (made when the
    // device came up) is neither listed nor removed.
    assert_eq!(
        ensure_subnet_address(&nl, dev, net("fd10:0:0:11::/64"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ensure_subnet_address(&nl, dev, net("fd10:0:0:11::/64"))
            .await
            .unwrap(),
        0,
        "idempotent"
    );
    nl.add_address(dev, net("fd10:0:0:11::/128")).await.unwrap();
    assert_eq!(
        nl.addresses(dev, Family::V6).await.unwrap(),
        vec![net("fd10:0:0:11::/128")]
    );
    assert!(nl.addresses(dev, Family::V4).await.unwrap().is_empty());
    let listed = show("ip", &["-6", "addr", "show", "dev", "flannel-v6.1"]);
    assert!(
        listed.contains("inet6 fd10:0:0:11::/128 scope global nodad"),
        "{listed}"
    );
    assert!(
        listed.contains("inet6 fe80::"),
        "the kernel's link-local: {listed}"
    );

    // Neighbour: permanent, to the peer's VTEP MAC.
    let peer_mac = Mac([0x0a, 0x58, 0, 0, 0, 7]);
    let n = Neighbour {
        ip: ip("fd10:0:0:12::"),
        mac: peer_mac,
    };
    nl.set_neighbour(dev, n).await.unwrap();
    nl.set_neighbour(dev, n).await.unwrap();
    assert_eq!(nl.neighbours(dev, Family::V6).await.unwrap(), vec![n]);
    assert!(nl.neighbours(dev, Family::V4).await.unwrap().is_empty());
    let listed = show("ip", &["-6", "neigh", "show", "dev", "flannel-v6.1"]);
    assert!(
        listed.contains("fd10:0:0:12:: lladdr 0a:58:00:00:00:07 PERMANENT"),
        "{listed}"
    );

    // FDB: the peer's VTEP MAC to its IPv6 underlay address ("self permanent"); an IPv4
    // destination is refused by the kernel (EAFNOSUPPORT).
    let e = FdbEntry {
        mac: peer_mac,
        dst: ip("fd00:99::2"),
    };
    nl.set_fdb(dev, e).await.unwrap();
    nl.set_fdb(dev, e).await.unwrap();
    assert_eq!(nl.fdb(dev).await.unwrap(), vec![e]);
    let listed = show("bridge", &["fdb", "show", "dev", "flannel-v6.1"]);
    assert!(
        listed.contains("0a:58:00:00:00:07 dst fd00:99::2 self permanent"),
        "{listed}"
    );
    let wrong = nl
        .set_fdb(
            dev,
            FdbEntry {
                mac: peer_mac,
                dst: ip("172.30.0.12"),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.errno(), Some(Errno::EAFNOSUPPORT), "{wrong}");

    // Route: `<peer /64> via <peer net addr> dev flannel-v6.1 onlink`; the dump has only it
    // on the device (not the kernel's fe80::/64 nor the /128's prefix route).
    let r = Route {
        dst: net("fd10:0:0:12::/64"),
        gateway: Some(ip("fd10:0:0:12::")),
        oif: dev,
        onlink: true,
    };
    nl.set_route(r).await.unwrap();
    nl.set_route(r).await.unwrap();
    let on_dev = |routes: Vec<Route>| -> Vec<Route> {
        routes.into_iter().filter(|x| x.oif == dev).collect()
    };
    assert_eq!(on_dev(nl.routes(Family::V6).await.unwrap()), vec![r]);
    assert!(on_dev(nl.routes(Family::V4).await.unwrap()).is_empty());
    let listed = show("ip", &["-6", "route", "show", "dev", "flannel-v6.1"]);
    assert!(
        listed.contains("fd10:0:0:12::/64 via fd10:0:0:12:: metric 1024 onlink"),
        "{listed}"
    );
    // A set with another next hop replaces the route (no IPv6 multipath merge).
    let moved = Route {
        gateway: Some(ip("fd10:0:0:12::1")),
        ..r
    };
    nl.set_route(moved).await.unwrap();
    assert_eq!(on_dev(nl.routes(Family::V6).await.unwrap()), vec![moved]);
    nl.set_route(r).await.unwrap();
    // A DirectRouting-style route via the peer on the underlay reads back too.
    let direct = Route {
        dst: net("fd10:0:0:13::/64"),
        gateway: Some(ip("fd00:99::2")),
        oif: va.index,
        onlink: false,
    };
    nl.set_route(direct).await.unwrap();
    let all = nl.routes(Family::V6).await.unwrap();
    assert!(all.contains(&direct) && all.contains(&r), "{all:?}");
    assert!(
        all.iter()
            .all(|x| !x.dst.addr().to_string().starts_with("fe80")),
        "{all:?}"
    );
    // Routes through other devices that make the kernel refuse an IPv6 onlink gateway
    // (EINVAL: the gateway must resolve through the route's own device) are taken over: a
    // route covering the gateway (the udp backend's IPv6Network route on flannel0) stays and
    // ours is added; a route to the same destination (host-gw's via the underlay) is
    // replaced.
    let covering = Route {
        dst: net("fd10::/48"),
        gateway: None,
        oif: va.index,
        onlink: false,
    };
    nl.set_route(covering).await.unwrap();
    let under = Route {
        dst: net("fd10:0:0:14::/64"),
        gateway: Some(ip("fd10:0:0:14::")),
        oif: dev,
        onlink: true,
    };
    nl.set_route(under).await.unwrap();
    let hostgw = Route {
        dst: net("fd10:0:0:15::/64"),
        gateway: Some(ip("fd00:99::2")),
        oif: va.index,
        onlink: false,
    };
    nl.set_route(hostgw).await.unwrap();
    let took = Route {
        dst: hostgw.dst,
        gateway: Some(ip("fd10:0:0:15::")),
        ..under
    };
    nl.set_route(took).await.unwrap();
    nl.set_route(took).await.unwrap();
    let all = nl.routes(Family::V6).await.unwrap();
    assert!(
        all.contains(&covering) && all.contains(&under) && all.contains(&took),
        "{all:?}"
    );
    assert!(!all.contains(&hostgw), "{all:?}");
    // The gateways' host routes used for the kernel's check are gone again.
    assert!(
        all.iter().all(|x| x.dst.prefix_len() < 128),
        "host route left: {all:?}"
    );
    assert_eq!(
        all.iter().filter(|x| x.dst == took.dst).count(),
        1,
        "one route to {}: {all:?}",
        took.dst
    );
    for x in [under, took, covering] {
        nl.del_route(x).await.unwrap();
    }
    // A gateway outside the destination that the kernel refuses stays refused (no
    // gatewayless route left behind).
    nl.set_route(covering).await.unwrap();
    let outside = Route {
        dst: net("fd10:0:0:16::/64"),
        gateway: Some(ip("fd10:0:0:99::")),
        oif: dev,
        onlink: true,
    };
    let refused = nl.set_route(outside).await.unwrap_err();
    assert_eq!(refused.errno(), Some(Errno::EINVAL), "{refused}");
    assert!(!nl
        .routes(Family::V6)
        .await
        .unwrap()
        .iter()
        .any(|x| x.dst == outside.dst));
    nl.del_route(covering).await.unwrap();

    // A gateway of the other family never reaches the kernel.
    let mixed = nl
        .set_route(Route {
            gateway: Some(ip("10.5.2.0")),
            ..r
        })
        .await
        .unwrap_err();
    assert!(matches!(mixed, NetlinkError::Invalid { .. }), "{mixed}");

    // Deletes, each twice: what is gone already is fine. Route first, as the backends do.
    for _ in 0..2 {
        nl.del_route(r).await.unwrap();
        nl.del_route(direct).await.unwrap();
        nl.del_fdb(dev, e).await.unwrap();
        nl.del_neighbour(dev, n.ip).await.unwrap();
        nl.del_address(dev, net("fd10:0:0:11::/128")).await.unwrap();
    }
    assert!(on_dev(nl.routes(Family::V6).await.unwrap()).is_empty());
    assert!(!nl.routes(Family::V6).await.unwrap().contains(&direct));
    assert!(nl.fdb(dev).await.unwrap().is_empty());
    assert!(nl.neighbours(dev, Family::V6).await.unwrap().is_empty());
    assert!(nl.addresses(dev, Family::V6).await.unwrap().is_empty());
    let listed = show("ip", &["-6", "addr", "show", "dev", "flannel-v6.1"]);
    assert!(listed.contains("inet6 fe80::"), "link-local kept: {listed}");

    nl.delete_link(dev).await.unwrap();
    nl.delete_link(dev).await.unwrap();
    assert!(nl.link_by_name("flannel-v6.1").await.unwrap().is_none());
    let gone = nl
        .set_ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa, 0)
        .await
        .unwrap_err();
    assert_eq!(gone.errno(), Some(Errno::ENOENT), "{gone}");
}
