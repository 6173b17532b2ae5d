//! [`Netlink`] over rtnetlink (pinned 0.24 / netlink-packet-route 0.34).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::netlink::{
    Errno, FdbEntry, Link, Mac, Neighbour, Netlink, NetlinkError, Route, VxlanParams,
};

/// Every request is bounded.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Netlink through an rtnetlink connection (in the caller's network namespace).
#[derive(Debug, Clone)]
pub struct RtNetlink {
    handle: Handle,
}

impl RtNetlink {
    /// Opens a netlink socket and spawns its connection task on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Socket {
                op: "open socket".into(),
                source,
            })?;
        tokio::spawn(conn);
        Ok(RtNetlink { handle })
    }
}

/// The kernel's errno in an error answer.
fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() < 0 => {
            Some(Errno::from_raw(-m.raw_code()))
        }
        _ => None,
    }
}

/// A kernel refusal keeps its errno; anything else keeps rtnetlink's error.
fn fail(op: impl Into<String>, e: rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    match errno(&e) {
        Some(errno) => NetlinkError::Kernel { op, errno },
        None => NetlinkError::Request { op, source: e },
    }
}

fn timed_out(op: impl Into<String>) -> NetlinkError {
    NetlinkError::Timeout {
        op: op.into(),
        timeout: TIMEOUT,
    }
}

/// Errors of a delete that mean "already gone".
const GONE: [Errno; 4] = [
    Errno::ENOENT,
    Errno::ESRCH,
    Errno::ENODEV,
    Errno::EADDRNOTAVAIL,
];

/// Runs a request with the time bound; "already gone" errors count as success for deletes.
async fn bounded<T>(
    op: &str,
    fut: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, NetlinkError> {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| fail(op, e)),
        Err(_) => Err(timed_out(op)),
    }
}

async fn bounded_del(
    op: &str,
    fut: impl std::future::Future<Output = Result<(), rtnetlink::Error>>,
) -> Result<(), NetlinkError> {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if errno(&e).is_some_and(|n| GONE.contains(&n)) => Ok(()),
        Ok(Err(e)) => Err(fail(op, e)),
        Err(_) => Err(timed_out(op)),
    }
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

fn parse_link(msg: &rtnetlink::packet_route::link::LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Mac::default(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = mac_of(a).unwrap_or_default(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                if !is_vxlan {
                    continue;
                }
                let mut p = VxlanParams {
                    vni: 0,
                    port: 0,
                    local: Ipv4Addr::UNSPECIFIED,
                    link: 0,
                    learning: true,
                    gbp: false,
                };
                for info in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(attrs)) = info {
                        for a in attrs {
                            match a {
                                InfoVxlan::Id(v) => p.vni = *v,
                                InfoVxlan::Port(v) => p.port = *v,
                                InfoVxlan::Local(v) => p.local = *v,
                                InfoVxlan::Link(v) => p.link = *v,
                                InfoVxlan::Learning(v) => p.learning = *v,
                                InfoVxlan::Gbp => p.gbp = true,
                                _ => {}
                            }
                        }
                    }
                }
                link.vxlan = Some(p);
            }
            _ => {}
        }
    }
    link
}

/// The IPv4 destination and link-layer address of a neighbour or FDB message. For AF_BRIDGE
/// dumps the crate leaves NDA_DST as raw bytes, so both forms are read.
fn ip_and_mac(m: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<Mac>) {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
            _ => {}
        }
    }
    (ip, mac)
}

impl RtNetlink {
    async fn dump_neighbours(
        &self,
        family: AddressFamily,
        op: &str,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        bounded(op, s.try_collect()).await
    }
}

fn route_message(r: &Route) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .output_interface(r.oif)
        .protocol(RouteProtocol::Boot)
        .table_id(u32::from(RouteHeader::RT_TABLE_MAIN));
    match r.gateway {
        Some(gw) => b = b.gateway(gw).scope(RouteScope::Universe),
        None => b = b.scope(RouteScope::Link),
    }
    if r.onlink {
        b = b.onlink();
    }
    b.build()
}

#[async_trait]
impl Netlink for RtNetlink {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match tokio::time::timeout(TIMEOUT, s.try_next()).await {
            Err(_) => Err(timed_out(format!("get link {name}"))),
            Ok(Ok(Some(msg))) => Ok(Some(parse_link(&msg))),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
            Ok(Err(e)) => Err(fail(format!("get link {name}"), e)),
        }
    }

    async fn create_vxlan(
        &self,
        name: &str,
        p: &VxlanParams,
        mac: Mac,
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        let mut b = LinkVxlan::new(name, p.vni)
            .dev(p.link)
            .local(p.local)
            .port(p.port)
            .learning(p.learning)
            .mtu(mtu)
            .address(mac.0.to_vec());
        if p.gbp {
            b = b.gbp();
        }
        bounded(
            &format!("create vxlan {name}"),
            self.handle.link().add(b.build()).execute(),
        )
        .await?;
        match self.link_by_name(name).await? {
            Some(l) => Ok(l.index),
            None => Err(NetlinkError::Vanished {
                op: format!("create vxlan {name}"),
                what: format!("link {name}"),
            }),
        }
    }

    async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        bounded_del(
            &format!("delete link {index}"),
            self.handle.link().del(index).execute(),
        )
        .await
    }

    async fn set_link_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        bounded(
            &format!("set link {index} mtu {mtu} up"),
            self.handle.link().set(msg).execute(),
        )
        .await
    }

    async fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let msgs: Vec<AddressMessage> = bounded("list addresses", s.try_collect()).await?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.family != AddressFamily::Inet || m.header.index != index {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    if let Ok(n) = Ipv4Net::new(*ip, m.header.prefix_len) {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        bounded(
            &format!("add address {addr}"),
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
                .replace()
                .execute(),
        )
        .await
    }

    async fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let msgs: Vec<AddressMessage> = bounded("list addresses", s.try_collect()).await?;
        for m in msgs {
            let matches = m.header.index == index
                && m.header.prefix_len == addr.prefix_len()
                && m.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Local(IpAddr::V4(ip)) if *ip == addr.addr()),
                );
            if matches {
                bounded_del(
                    &format!("delete address {addr}"),
                    self.handle.address().del(m).execute(),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let msgs = self
            .dump_neighbours(AddressFamily::Inet, "list neighbours")
            .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| match ip_and_mac(m) {
                (Some(ip), Some(mac)) => Some(Neighbour { ip, mac }),
                _ => None,
            })
            .collect())
    }

    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError> {
        bounded(
            &format!("set neighbour {} {}", n.ip, n.mac),
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await
    }

    async fn del_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        bounded_del(
            &format!("delete neighbour {ip}"),
            self.handle.neighbours().del(msg).execute(),
        )
        .await
    }

    async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let msgs = self
            .dump_neighbours(AddressFamily::Bridge, "list fdb")
            .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(|m| match ip_and_mac(m) {
                (Some(dst), Some(mac)) => Some(FdbEntry { mac, dst }),
                _ => None,
            })
            .collect())
    }

    async fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        bounded(
            &format!("set fdb {} dst {}", e.mac, e.dst),
            self.handle
                .neighbours()
                .add_bridge(index, &e.mac.0)
                .destination(IpAddr::V4(e.dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await
    }

    async fn del_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                e.dst,
            )));
        bounded_del(
            &format!("delete fdb {} dst {}", e.mac, e.dst),
            self.handle.neighbours().del(msg).execute(),
        )
        .await
    }

    async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let s = self.handle.route().get(req).execute();
        let msgs: Vec<RouteMessage> = bounded("list routes", s.try_collect()).await?;
        Ok(msgs
            .iter()
            .filter(|m| {
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                table == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .filter_map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = *v,
                        RouteAttribute::Gateway(RouteAddress::Inet(v)) => gateway = Some(*v),
                        RouteAttribute::Oif(v) => oif = Some(*v),
                        _ => {}
                    }
                }
                Some(Route {
                    dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    gateway,
                    oif: oif?,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                })
            })
            .collect())
    }

    async fn set_route(&self, r: Route) -> Result<(), NetlinkError> {
        bounded(
            &format!("set route {} via {:?}", r.dst, r.gateway),
            self.handle
                .route()
                .add(route_message(&r))
                .replace()
                .execute(),
        )
        .await
    }

    async fn del_route(&self, r: Route) -> Result<(), NetlinkError> {
        bounded_del(
            &format!("delete route {}", r.dst),
            self.handle.route().del(route_message(&r)).execute(),
        )
        .await
    }
}
