//! `host-gw`: no encapsulation; one route per peer subnet via the peer's public address on the
//! external interface, as flannel's host-gw backend programs it: `<peer subnet> via <PublicIP>`
//! for IPv4 and `<peer IPv6 subnet> via <PublicIPv6>` for IPv6, each when that family is
//! enabled. It needs every node on one L2 segment: a peer whose public address is outside our
//! interface's prefix of that family cannot be a next hop, so that family of the peer is warned
//! about once and not routed. Behind NAT (a public address that is not the interface's address
//! of its family) the backend refuses to start, as flannel does for IPv4 (we check IPv6 too).
//! MTU = interface MTU. No `BackendData`/`BackendV6Data`. [`plan`] is the pure diff.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{Family, Netlink, NetlinkError, Route};
use crate::options::Options;
use crate::peerlog::PeerLog;
use crate::{
    peer_gateway_route, Backend, BackendContext, BackendError, ExternalInterface, PeerTable,
};

/// host-gw has no options; unknown keys are warned about.
pub fn parse_options(options: &Map<String, Value>) -> Vec<String> {
    Options::new(options, "host-gw").warnings(&[])
}

/// How one peer lease is routed for one family (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRoute {
    Route(Route),
    Unrouted(String),
}

/// Classifies one peer lease for `family`: IPv4 via its `PublicIP`, IPv6 via its `PublicIPv6`.
pub fn peer_route(lease: &Lease, ext: &ExternalInterface, family: Family) -> PeerRoute {
    if lease.attrs.data_plane() != "host-gw" {
        return PeerRoute::Unrouted(format!(
            "backend type {:?}, not host-gw",
            lease.attrs.backend_type
        ));
    }
    let (dst, gw) = match family {
        Family::V4 => {
            let gw = lease.attrs.public_ip;
            let segment = ext.network();
            if !segment.is_some_and(|n| n.contains(&gw)) {
                return PeerRoute::Unrouted(format!(
                    "PublicIP {gw} is not on this node's L2 subnet {} (host-gw needs one L2 segment)",
                    segment.map_or("(none)".to_string(), |n| n.to_string())
                ));
            }
            let Some(dst) = lease.key.ipv4 else {
                return PeerRoute::Unrouted("no IPv4 subnet".into());
            };
            (IpNet::V4(dst), IpAddr::V4(gw))
        }
        Family::V6 => {
            let Some(dst) = lease.key.ipv6 else {
                return PeerRoute::Unrouted("no IPv6 subnet".into());
            };
            let Some(gw) = lease.attrs.public_ipv6 else {
                return PeerRoute::Unrouted("PublicIPv6 is null".into());
            };
            let segment = ext.network6();
            if !segment.is_some_and(|n| n.contains(&gw)) {
                return PeerRoute::Unrouted(format!(
                    "PublicIPv6 {gw} is not on this node's IPv6 L2 prefix {} (host-gw needs one L2 segment)",
                    segment.map_or("(none)".to_string(), |n| n.to_string())
                ));
            }
            (IpNet::V6(dst), IpAddr::V6(gw))
        }
    };
    PeerRoute::Route(Route {
        dst,
        gateway: Some(gw),
        oif: ext.index,
        onlink: false,
    })
}

/// Routes to delete, then routes to add, to go from `actual` to `desired`.
pub fn plan(desired: &BTreeMap<IpNet, Route>, actual: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let del = actual
        .iter()
        .filter(|r| desired.get(&r.dst) != Some(*r))
        .copied()
        .collect();
    let add = desired
        .values()
        .filter(|r| !actual.contains(r))
        .copied()
        .collect();
    (del, add)
}

/// Why a host-gw peer is (partly) not routed, over the families this node runs.
fn problem(why: Vec<(Family, String)>, dual: bool) -> Option<String> {
    let lines: Vec<String> = why
        .into_iter()
        .map(|(f, w)| if dual { format!("{f}: {w}") } else { w })
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

#[derive(Debug)]
pub struct HostGwBackend {
    nl: Arc<dyn Netlink>,
    ext: ExternalInterface,
    /// The cluster networks of the enabled families.
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
    peers: PeerTable,
    own: Option<SubnetKey>,
    /// Problems of host-gw peers (off our L2 segment), logged once per change.
    peer_log: PeerLog,
}

fn nat_error(msg: String) -> BackendError {
    BackendError::Config {
        key: "Type".into(),
        msg: format!("host-gw: {msg}; host-gw cannot work behind NAT, use vxlan or udp"),
    }
}

impl HostGwBackend {
    pub fn new(ctx: &BackendContext) -> Result<Self, BackendError> {
        let ext = &ctx.ext;
        if ctx.network.is_some() {
            let a = ext.v4.ok_or_else(|| BackendError::Config {
                key: "Type".into(),
                msg: format!(
                    "host-gw: IPv4 is enabled but interface {} has no IPv4 address",
                    ext.name
                ),
            })?;
            if a.public_ip != a.iface_ip {
                return Err(nat_error(format!(
                    "the public IP {} is not an address of interface {} ({})",
                    a.public_ip, ext.name, a.iface_ip
                )));
            }
        }
        if ctx.network6.is_some() {
            let a = ext.v6.ok_or_else(|| BackendError::Config {
                key: "Type".into(),
                msg: format!(
                    "host-gw: IPv6 is enabled but interface {} has no IPv6 address",
                    ext.name
                ),
            })?;
            if a.public_ip != a.iface_ip {
                return Err(nat_error(format!(
                    "the public IPv6 {} is not an address of interface {} ({})",
                    a.public_ip, ext.name, a.iface_ip
                )));
            }
        }
        if ctx.network.is_none() && ctx.network6.is_none() {
            return Err(BackendError::Config {
                key: "Type".into(),
                msg: "host-gw: neither IPv4 nor IPv6 is enabled".into(),
            });
        }
        Ok(HostGwBackend {
            nl: ctx.netlink.clone(),
            ext: ctx.ext.clone(),
            network: ctx.network,
            network6: ctx.network6,
            peers: PeerTable::default(),
            own: None,
            peer_log: PeerLog::default(),
        })
    }

    /// The enabled families with their cluster network and our subnet of that family.
    fn families(&self) -> Vec<(Family, IpNet, Option<IpNet>)> {
        let own = self.own;
        let mut v = Vec::new();
        if let Some(n) = self.network {
            v.push((
                Family::V4,
                IpNet::V4(n),
                own.and_then(|k| k.ipv4).map(IpNet::V4),
            ));
        }
        if let Some(n) = self.network6 {
            v.push((
                Family::V6,
                IpNet::V6(n),
                own.and_then(|k| k.ipv6).map(IpNet::V6),
            ));
        }
        v
    }

    /// The routes this backend owns, of every enabled family: via a gateway on the external
    /// interface, to a subnet of the cluster network (longer than the network itself), not our
    /// own subnet, and not the subnet of a peer of another backend type (vxlan's DirectRouting
    /// makes such routes too, and another backend may run beside this one while the cluster
    /// switches).
    async fn actual(&self) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for (family, network, own) in self.families() {
            let others = self.peers.nets(family, "host-gw", false);
            out.extend(
                self.nl
                    .routes(family)
                    .await?
                    .into_iter()
                    .filter(|r| peer_gateway_route(r, &self.ext, network, own, &others)),
            );
        }
        Ok(out)
    }
}

#[async_trait]
impl Backend for HostGwBackend {
    fn backend_type(&self) -> &'static str {
        "host-gw"
    }

    fn backend_data(&self) -> Option<Value> {
        None
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = Some(own.key);
        self.peers.remove(&own.key);
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let families: Vec<Family> = self.families().into_iter().map(|f| f.0).collect();
        let dual = families.len() > 1;
        let mut desired = BTreeMap::new();
        let mut problems = Vec::new();
        for l in self.peers.leases() {
            let mut why = Vec::new();
            for f in &families {
                match peer_route(l, &self.ext, *f) {
                    PeerRoute::Route(r) => {
                        desired.insert(r.dst, r);
                    }
                    // A peer of another type is not a problem here (the BackendSet runs its
                    // backend or reports it).
                    PeerRoute::Unrouted(w) if l.attrs.data_plane() == "host-gw" => {
                        why.push((*f, w))
                    }
                    PeerRoute::Unrouted(_) => {}
                }
            }
            problems.push((l.key, problem(why, dual)));
        }
        self.peer_log.log(
            "peer not routed by host-gw",
            std::time::Instant::now(),
            problems,
        );
        let (del, add) = plan(&desired, &self.actual().await?);
        for r in &del {
            self.nl.del_route(*r).await?;
        }
        for r in &add {
            self.nl.set_route(*r).await?;
        }
        Ok(del.len() + add.len())
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        Ok(crate::netlink::del_routes(self.nl.as_ref(), self.actual().await?).await?)
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::netlink::FakeNetlink;
    use std::net::Ipv4Addr;
    use subnet_lease::LeaseAttrs;

    fn ext(public: [u8; 4]) -> ExternalInterface {
        let mut e = crate::testing::ext(true, false);
        if let Some(a) = e.v4.as_mut() {
            a.public_ip = public.into();
        }
        e
    }

    fn lease(subnet: &str, public: [u8; 4], ty: &str) -> Lease {
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs: LeaseAttrs::new(Ipv4Addr::from(public), ty),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn ctx(nl: Arc<FakeNetlink>, public: [u8; 4]) -> BackendContext {
        let mut c = crate::testing::ctx(nl, true, false);
        c.ext = ext(public);
        c
    }

    #[test]
    fn peers_route_via_their_public_ip_when_on_our_segment() {
        let e = ext([172, 30, 0, 11]);
        let r = peer_route(
            &lease("10.5.2.0/24", [172, 30, 0, 12], "host-gw"),
            &e,
            Family::V4,
        );
        assert_eq!(
            r,
            PeerRoute::Route(Route {
                dst: "10.5.2.0/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(172, 30, 0, 12).into()),
                oif: 2,
                onlink: false,
            })
        );
        let far = peer_route(
            &lease("10.5.3.0/24", [192, 168, 9, 9], "host-gw"),
            &e,
            Family::V4,
        );
        assert!(matches!(far, PeerRoute::Unrouted(w) if w.contains("L2 subnet")));
        let other = peer_route(
            &lease("10.5.4.0/24", [172, 30, 0, 14], "vxlan"),
            &e,
            Family::V4,
        );
        assert!(matches!(other, PeerRoute::Unrouted(w) if w.contains("not host-gw")));
    }

    #[test]
    fn plan_replaces_changed_and_removes_gone_routes() {
        let r = |dst: &str, gw: [u8; 4]| Route {
            dst: dst.parse().unwrap(),
            gateway: Some(Ipv4Addr::from(gw).into()),
            oif: 2,
            onlink: false,
        };
        let desired: BTreeMap<IpNet, Route> = [
            r("10.5.2.0/24", [172, 30, 0, 12]),
            r("10.5.3.0/24", [172, 30, 0, 99]),
        ]
        .into_iter()
        .map(|x| (x.dst, x))
        .collect();
        let actual = vec![
            r("10.5.2.0/24", [172, 30, 0, 12]),
            r("10.5.3.0/24", [172, 30, 0, 13]),
            r("10.5.4.0/24", [172, 30, 0, 14]),
        ];
        let (del, add) = plan(&desired, &actual);
        assert_eq!(del, vec![actual[1], actual[2]]);
        assert_eq!(add, vec![r("10.5.3.0/24", [172, 30, 0, 99])]);
        let (del, add) = plan(&desired, &desired.values().copied().collect::<Vec<_>>());
        assert!(del.is_empty() && add.is_empty(), "idempotent");
    }

    #[tokio::test]
    async fn refuses_nat_and_reconciles_routes_idempotently() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let err = HostGwBackend::new(&ctx(nl.clone(), [203, 0, 113, 5])).unwrap_err();
        assert!(err.to_string().contains("NAT"), "{err}");
        let mut b = HostGwBackend::new(&ctx(nl.clone(), [172, 30, 0, 11])).unwrap();
        assert_eq!(b.mtu(), 1500);
        assert_eq!(b.backend_data(), None);
        b.set_lease(&lease("10.5.1.0/24", [172, 30, 0, 11], "host-gw"))
            .await
            .unwrap();
        b.peer_event(&Event::PeerAdded(lease(
            "10.5.2.0/24",
            [172, 30, 0, 12],
            "host-gw",
        )));
        b.peer_event(&Event::PeerAdded(lease(
            "10.5.3.0/24",
            [10, 9, 9, 9],
            "host-gw",
        )));
        assert_eq!(b.reconcile().await.unwrap(), 1);
        assert_eq!(
            b.reconcile().await.unwrap(),
            0,
            "second reconcile changes nothing"
        );
        let routes = nl.routes(Family::V4).await.unwrap();
        assert!(routes.iter().any(|r| r.dst.to_string() == "10.5.2.0/24"
            && r.gateway == Some(Ipv4Addr::new(172, 30, 0, 12).into())));
        b.peer_event(&Event::PeerRemoved(lease(
            "10.5.2.0/24",
            [172, 30, 0, 12],
            "host-gw",
        )));
        assert_eq!(b.reconcile().await.unwrap(), 1);
        b.peer_event(&Event::PeerAdded(lease(
            "10.5.4.0/24",
            [172, 30, 0, 14],
            "host-gw",
        )));
        // A vxlan peer's DirectRouting route (made by a vxlan backend running beside this one
        // during a switch) is not ours: neither reconcile nor teardown touches it.
        let direct = Route {
            dst: "10.5.9.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(172, 30, 0, 19).into()),
            oif: 2,
            onlink: false,
        };
        nl.set_route(direct).await.unwrap();
        b.peer_event(&Event::PeerAdded(lease(
            "10.5.9.0/24",
            [172, 30, 0, 19],
            "vxlan",
        )));
        b.reconcile().await.unwrap();
        b.teardown().await.unwrap();
        let left: Vec<Route> = nl
            .routes(Family::V4)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| "10.5.0.0/16".parse::<IpNet>().unwrap().contains(&r.dst))
            .collect();
        assert_eq!(left, vec![direct]);
    }

    // ---- IPv6 and dual stack ----

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A host-gw lease as flannel writes it in dual stack / IPv6-only (PublicIPv6, no data).
    fn lease6(key: &str, last: u8) -> Lease {
        let key = SubnetKey::parse(key).unwrap();
        let v4 = key
            .ipv4
            .map_or(Ipv4Addr::UNSPECIFIED, |_| Ipv4Addr::new(172, 30, 0, last));
        let mut attrs = LeaseAttrs::new(v4, "host-gw");
        attrs.public_ipv6 = key
            .ipv6
            .map(|_| format!("fd00:210::{last}").parse().unwrap());
        Lease {
            key,
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn ipv6_peers_route_via_their_public_ipv6_on_our_segment() {
        let e = crate::testing::ext(true, true);
        let p = lease6("10.5.2.0-24&fd10:0:0:12::-64", 12);
        assert_eq!(
            peer_route(&p, &e, Family::V6),
            PeerRoute::Route(Route {
                dst: net("fd10:0:0:12::/64"),
                gateway: Some(ip("fd00:210::12")),
                oif: 2,
                onlink: false,
            })
        );
        assert!(matches!(
            peer_route(&p, &e, Family::V4),
            PeerRoute::Route(_)
        ));
        let mut far = p.clone();
        far.attrs.public_ipv6 = Some("fd00:999::12".parse().unwrap());
        assert!(matches!(
            peer_route(&far, &e, Family::V6),
            PeerRoute::Unrouted(w) if w.contains("fd00:999::12") && w.contains("fd00:210::/64")
        ));
        assert!(matches!(
            peer_route(&far, &e, Family::V4),
            PeerRoute::Route(_)
        ));
        let mut null = p.clone();
        null.attrs.public_ipv6 = None;
        assert_eq!(
            peer_route(&null, &e, Family::V6),
            PeerRoute::Unrouted("PublicIPv6 is null".into())
        );
        let v4_only = lease6("10.5.3.0-24", 13);
        assert_eq!(
            peer_route(&v4_only, &e, Family::V6),
            PeerRoute::Unrouted("no IPv6 subnet".into())
        );
        assert_eq!(
            problem(vec![(Family::V6, "x".into())], true),
            Some("IPv6: x".into())
        );
        assert_eq!(
            problem(vec![(Family::V6, "x".into())], false),
            Some("x".into())
        );
        assert_eq!(problem(vec![], true), None);
    }

    #[tokio::test]
    async fn ipv6_nat_check_and_missing_address() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let mut c = crate::testing::ctx(nl.clone(), true, true);
        if let Some(a) = c.ext.v6.as_mut() {
            a.public_ip = "2001:db8::5".parse().unwrap();
        }
        let e = HostGwBackend::new(&c).unwrap_err().to_string();
        assert!(
            e.contains("public IPv6 2001:db8::5") && e.contains("NAT"),
            "{e}"
        );
        c.ext.v6 = None;
        let e = HostGwBackend::new(&c).unwrap_err().to_string();
        assert!(e.contains("no IPv6 address"), "{e}");
        // IPv6-only: the IPv4 side is not looked at.
        let mut c = crate::testing::ctx(nl, false, true);
        c.ext.v4 = Some(crate::ExtAddr {
            iface_ip: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            public_ip: Ipv4Addr::new(203, 0, 113, 5),
        });
        HostGwBackend::new(&c).unwrap();
    }

    #[tokio::test]
    async fn dual_stack_and_ipv6_only_routes() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let mut b = HostGwBackend::new(&crate::testing::ctx(nl.clone(), true, true)).unwrap();
        assert_eq!(b.mtu(), 1500);
        assert_eq!((b.backend_data(), b.backend_v6_data()), (None, None));
        b.set_lease(&lease6("10.5.1.0-24&fd10:0:0:11::-64", 11))
            .await
            .unwrap();
        let p2 = lease6("10.5.2.0-24&fd10:0:0:12::-64", 12);
        b.peer_event(&Event::PeerAdded(p2.clone()));
        // Off our IPv6 segment: its IPv4 route only.
        let mut far = lease6("10.5.3.0-24&fd10:0:0:13::-64", 13);
        far.attrs.public_ipv6 = Some("fd00:999::13".parse().unwrap());
        b.peer_event(&Event::PeerAdded(far));
        // A vxlan DirectRouting route (IPv6) beside us is not ours.
        let direct = Route {
            dst: net("fd10:0:0:19::/64"),
            gateway: Some(ip("fd00:210::19")),
            oif: 2,
            onlink: false,
        };
        nl.set_route(direct).await.unwrap();
        let mut vx = lease6("10.5.9.0-24&fd10:0:0:19::-64", 19);
        vx.attrs.backend_type = "vxlan".into();
        b.peer_event(&Event::PeerAdded(vx));
        // A stale host-gw route of a gone peer is ours and goes.
        let stale = Route {
            dst: net("fd10:0:0:77::/64"),
            gateway: Some(ip("fd00:210::77")),
            oif: 2,
            onlink: false,
        };
        nl.set_route(stale).await.unwrap();
        assert_eq!(b.reconcile().await.unwrap(), 4);
        assert_eq!(b.reconcile().await.unwrap(), 0, "idempotent");
        let mut v6 = nl.routes(Family::V6).await.unwrap();
        v6.sort();
        assert_eq!(
            v6,
            vec![
                Route {
                    dst: net("fd10:0:0:12::/64"),
                    gateway: Some(ip("fd00:210::12")),
                    oif: 2,
                    onlink: false,
                },
                direct,
            ]
        );
        assert_eq!(nl.routes(Family::V4).await.unwrap().len(), 2);
        // A restarted backend finds nothing to do.
        let mut b2 = HostGwBackend::new(&crate::testing::ctx(nl.clone(), true, true)).unwrap();
        b2.set_lease(&lease6("10.5.1.0-24&fd10:0:0:11::-64", 11))
            .await
            .unwrap();
        for l in b.peers.leases() {
            b2.peer_event(&Event::PeerAdded(l.clone()));
        }
        assert_eq!(b2.reconcile().await.unwrap(), 0);
        b.teardown().await.unwrap();
        assert_eq!(nl.routes(Family::V6).await.unwrap(), vec![direct]);
        assert!(nl.routes(Family::V4).await.unwrap().is_empty());

        // IPv6 only.
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let mut b = HostGwBackend::new(&crate::testing::ctx(nl.clone(), false, true)).unwrap();
        b.set_lease(&lease6("0.0.0.0-0&fd10:0:0:11::-64", 11))
            .await
            .unwrap();
        b.peer_event(&Event::PeerAdded(lease6("0.0.0.0-0&fd10:0:0:12::-64", 12)));
        assert_eq!(b.reconcile().await.unwrap(), 1);
        assert_eq!(
            nl.routes(Family::V6).await.unwrap()[0].gateway,
            Some(ip("fd00:210::12"))
        );
        assert!(nl.routes(Family::V4).await.unwrap().is_empty());
    }
}
