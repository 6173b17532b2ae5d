//! `host-gw`: no encapsulation; one route per peer subnet via the peer's PublicIP on the
//! external interface, as flannel's host-gw backend programs it. It needs every node on one L2
//! segment: a peer whose PublicIP is outside our interface's subnet cannot be a next hop, so it
//! is warned about once and not routed. Behind NAT (PublicIP not our interface's address) the
//! backend refuses to start, as flannel does. MTU = interface MTU. [`plan`] is the pure diff.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
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

/// How one peer lease is routed (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRoute {
    Route(Route),
    Unrouted(String),
}

/// Classifies one peer lease.
pub fn peer_route(lease: &Lease, ext: &ExternalInterface) -> PeerRoute {
    if lease.attrs.data_plane() != "host-gw" {
        return PeerRoute::Unrouted(format!(
            "backend type {:?}, not host-gw",
            lease.attrs.backend_type
        ));
    }
    let gw = lease.attrs.public_ip;
    if !ext.network().contains(&gw) {
        return PeerRoute::Unrouted(format!(
            "PublicIP {gw} is not on this node's L2 subnet {} (host-gw needs one L2 segment)",
            ext.network()
        ));
    }
    let Some(dst) = lease.key.ipv4 else {
        return PeerRoute::Unrouted("no IPv4 subnet".into());
    };
    PeerRoute::Route(Route {
        dst: IpNet::V4(dst),
        gateway: Some(IpAddr::V4(gw)),
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

#[derive(Debug)]
pub struct HostGwBackend {
    nl: Arc<dyn Netlink>,
    ext: ExternalInterface,
    network: Ipv4Net,
    peers: PeerTable,
    own: Option<Ipv4Net>,
    /// Problems of host-gw peers (off our L2 segment), logged once per change.
    peer_log: PeerLog,
}

impl HostGwBackend {
    pub fn new(ctx: &BackendContext) -> Result<Self, BackendError> {
        if ctx.ext.public_ip != ctx.ext.iface_ip {
            return Err(BackendError::Config {
                key: "Type".into(),
                msg: format!(
                    "host-gw: the public IP {} is not an address of interface {} ({}); \
                     host-gw cannot work behind NAT, use vxlan or udp",
                    ctx.ext.public_ip, ctx.ext.name, ctx.ext.iface_ip
                ),
            });
        }
        Ok(HostGwBackend {
            nl: ctx.netlink.clone(),
            ext: ctx.ext.clone(),
            network: ctx.network,
            peers: PeerTable::default(),
            own: None,
            peer_log: PeerLog::default(),
        })
    }

    /// The routes this backend owns: via a gateway on the external interface, to a subnet of
    /// the Network (longer than the Network itself), not our own subnet, and not the subnet of
    /// a peer of another backend type (vxlan's DirectRouting makes such routes too, and another
    /// backend may run beside this one while the cluster switches).
    async fn actual(&self) -> Result<Vec<Route>, NetlinkError> {
        let others = self.peers.subnets("host-gw", false);
        Ok(self
            .nl
            .routes(Family::V4)
            .await?
            .into_iter()
            .filter(|r| peer_gateway_route(r, &self.ext, self.network, self.own, &others))
            .collect())
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
        self.own = own.key.ipv4;
        self.peers.remove(&own.key);
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let mut desired = BTreeMap::new();
        let mut problems = Vec::new();
        for l in self.peers.leases() {
            match peer_route(l, &self.ext) {
                PeerRoute::Route(r) => {
                    desired.insert(r.dst, r);
                    problems.push((l.key, None));
                }
                // A peer of another type is not a problem here (the BackendSet runs its
                // backend or reports it).
                PeerRoute::Unrouted(why) if l.attrs.data_plane() == "host-gw" => {
                    problems.push((l.key, Some(why)));
                }
                PeerRoute::Unrouted(_) => problems.push((l.key, None)),
            }
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
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_ip: Ipv4Addr::new(172, 30, 0, 11),
            prefix_len: 24,
            public_ip: public.into(),
            mtu: 1500,
        }
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
        BackendContext {
            ext: ext(public),
            network: "10.5.0.0/16".parse().unwrap(),
            node_id: "n1".into(),
            netlink: nl,
        }
    }

    #[test]
    fn peers_route_via_their_public_ip_when_on_our_segment() {
        let e = ext([172, 30, 0, 11]);
        let r = peer_route(&lease("10.5.2.0/24", [172, 30, 0, 12], "host-gw"), &e);
        assert_eq!(
            r,
            PeerRoute::Route(Route {
                dst: "10.5.2.0/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(172, 30, 0, 12).into()),
                oif: 2,
                onlink: false,
            })
        );
        let far = peer_route(&lease("10.5.3.0/24", [192, 168, 9, 9], "host-gw"), &e);
        assert!(matches!(far, PeerRoute::Unrouted(w) if w.contains("L2 subnet")));
        let other = peer_route(&lease("10.5.4.0/24", [172, 30, 0, 14], "vxlan"), &e);
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
}
