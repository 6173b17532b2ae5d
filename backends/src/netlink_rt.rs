//! [`Netlink`] over rtnetlink (pinned 0.24 / netlink-packet-route 0.34).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::netlink::{
    ipv6_conf_path, is_link_local, Errno, Family, FdbEntry, Ipv6Conf, Link, Mac, Neighbour,
    Netlink, NetlinkError, Route, VxlanParams,
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
                    local: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
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
                                InfoVxlan::Local(v) => p.local = IpAddr::V4(*v),
                                InfoVxlan::Local6(v) => p.local = IpAddr::V6(*v),
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

/// The destination and link-layer address of a neighbour or FDB message. For AF_BRIDGE
/// dumps the crate leaves NDA_DST as raw bytes (4 or 16 of them), so both forms are read.
fn ip_and_mac(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(IpAddr::V4(*v)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                ip = Some(IpAddr::V6(*v))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = match b.len() {
                    4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
            _ => {}
        }
    }
    (ip, mac)
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// The device address an address message carries: IFA_LOCAL for IPv4 (IFA_ADDRESS is the
/// peer there), IFA_ADDRESS for IPv6 (which has IFA_LOCAL only on peer addresses, then the
/// local one).
fn address_of(m: &AddressMessage) -> Option<IpNet> {
    let mut local = None;
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = match m.header.family {
        AddressFamily::Inet => local.filter(IpAddr::is_ipv4)?,
        AddressFamily::Inet6 => local.or(address).filter(IpAddr::is_ipv6)?,
        _ => return None,
    };
    IpNet::new(ip, m.header.prefix_len).ok()
}

/// The table of a route message (RTA_TABLE when present: it carries ids above 255).
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// One IPv4 route of a dump, as the kernel lists it; None without an output interface.
fn parse_route_v4(m: &RouteMessage) -> Option<Route> {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = *v,
            RouteAttribute::Gateway(RouteAddress::Inet(v)) => gateway = Some(IpAddr::V4(*v)),
            RouteAttribute::Oif(v) => oif = Some(*v),
            _ => {}
        }
    }
    Some(Route {
        dst: IpNet::V4(Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?),
        gateway,
        oif: oif?,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}

/// One IPv6 route of a dump: unicast with one next hop (no RTA_MULTIPATH, no RTA_VIA), not
/// the kernel's own (`proto kernel`), not to a link-local destination.
fn parse_route_v6(m: &RouteMessage) -> Option<Route> {
    if m.header.kind != RouteType::Unicast || m.header.protocol == RouteProtocol::Kernel {
        return None;
    }
    let mut dst = Ipv6Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet6(v)) => dst = *v,
            RouteAttribute::Gateway(RouteAddress::Inet6(v)) => gateway = Some(IpAddr::V6(*v)),
            RouteAttribute::Oif(v) => oif = Some(*v),
            RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) => return None,
            _ => {}
        }
    }
    if is_link_local(&IpAddr::V6(dst)) {
        return None;
    }
    Some(Route {
        dst: IpNet::V6(Ipv6Net::new(dst, m.header.destination_prefix_length).ok()?),
        gateway,
        oif: oif?,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}

/// The request message of a route (the caller has checked the families match).
fn route_message(r: &Route) -> RouteMessage {
    let table = u32::from(RouteHeader::RT_TABLE_MAIN);
    match r.dst {
        IpNet::V4(dst) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(r.oif)
                .protocol(RouteProtocol::Boot)
                .table_id(table);
            match r.gateway {
                Some(IpAddr::V4(gw)) => b = b.gateway(gw).scope(RouteScope::Universe),
                _ => b = b.scope(RouteScope::Link),
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
        IpNet::V6(dst) => {
            // IPv6 routes are all of scope universe (the kernel ignores the field).
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(r.oif)
                .protocol(RouteProtocol::Boot)
                .table_id(table)
                .scope(RouteScope::Universe);
            if let Some(IpAddr::V6(gw)) = r.gateway {
                b = b.gateway(gw);
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
    }
}

/// For an IPv6 route whose gateway lies inside its destination (and is not all of it): a
/// host route to that gateway through the route's device, without a gateway.
fn gateway_inside(r: &Route) -> Option<Route> {
    match (r.dst, r.gateway) {
        (IpNet::V6(dst), Some(IpAddr::V6(gw))) if dst.prefix_len() < 128 && dst.contains(&gw) => {
            Some(Route {
                dst: IpNet::V6(Ipv6Net::new(gw, 128).ok()?),
                gateway: None,
                oif: r.oif,
                onlink: false,
            })
        }
        _ => None,
    }
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

    /// The address messages of device `index` and `family`.
    async fn dump_addresses(
        &self,
        index: u32,
        family: Family,
    ) -> Result<Vec<AddressMessage>, NetlinkError> {
        let mut req = self.handle.address().get().set_link_index_filter(index);
        req.message_mut().header.family = address_family(family);
        let msgs: Vec<AddressMessage> =
            bounded("list addresses", req.execute().try_collect()).await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index && m.header.family == address_family(family))
            .collect())
    }
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
        let mut b = LinkVxlan::new(name, p.vni).dev(p.link);
        b = match p.local {
            IpAddr::V4(ip) => b.local(ip),
            IpAddr::V6(ip) => b.local6(ip),
        };
        b = b
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

    async fn addresses(&self, index: u32, family: Family) -> Result<Vec<IpNet>, NetlinkError> {
        Ok(self
            .dump_addresses(index, family)
            .await?
            .iter()
            .filter_map(address_of)
            .filter(|a| !is_link_local(&a.addr()))
            .collect())
    }

    async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace();
        if let IpNet::V6(_) = addr {
            // Usable at once: no duplicate address detection (`ip -6 addr add ... nodad`).
            let m = req.message_mut();
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        bounded(&format!("add address {addr}"), req.execute()).await
    }

    async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let msgs = self.dump_addresses(index, Family::of_net(&addr)).await?;
        for m in msgs {
            if address_of(&m) == Some(addr) {
                bounded_del(
                    &format!("delete address {addr}"),
                    self.handle.address().del(m).execute(),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn neighbours(&self, index: u32, family: Family) -> Result<Vec<Neighbour>, NetlinkError> {
        let msgs = self
            .dump_neighbours(address_family(family), "list neighbours")
            .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| match ip_and_mac(m) {
                (Some(ip), Some(mac)) if Family::of(&ip) == family => Some(Neighbour { ip, mac }),
                _ => None,
            })
            .collect())
    }

    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError> {
        bounded(
            &format!("set neighbour {} {}", n.ip, n.mac),
            self.handle
                .neighbours()
                .add(index, n.ip)
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await
    }

    async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = index;
        let dst = match ip {
            IpAddr::V4(v) => {
                msg.header.family = AddressFamily::Inet;
                NeighbourAddress::Inet(v)
            }
            IpAddr::V6(v) => {
                msg.header.family = AddressFamily::Inet6;
                NeighbourAddress::Inet6(v)
            }
        };
        msg.attributes.push(NeighbourAttribute::Destination(dst));
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
                .destination(e.dst)
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
        let dst = match e.dst {
            IpAddr::V4(v) => NeighbourAddress::Inet(v),
            IpAddr::V6(v) => NeighbourAddress::Inet6(v),
        };
        msg.attributes.push(NeighbourAttribute::Destination(dst));
        bounded_del(
            &format!("delete fdb {} dst {}", e.mac, e.dst),
            self.handle.neighbours().del(msg).execute(),
        )
        .await
    }

    async fn routes(&self, family: Family) -> Result<Vec<Route>, NetlinkError> {
        let req = match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let s = self.handle.route().get(req).execute();
        let msgs: Vec<RouteMessage> = bounded("list routes", s.try_collect()).await?;
        let main = u32::from(RouteHeader::RT_TABLE_MAIN);
        Ok(msgs
            .iter()
            .filter(|m| table_of(m) == main && m.header.address_family == address_family(family))
            .filter_map(|m| match family {
                Family::V4 => parse_route_v4(m),
                Family::V6 => parse_route_v6(m),
            })
            .collect())
    }

    async fn set_route(&self, r: Route) -> Result<(), NetlinkError> {
        let op = format!("set route {} via {:?}", r.dst, r.gateway);
        r.check(&op)?;
        let add = || {
            self.handle
                .route()
                .add(route_message(&r))
                .replace()
                .execute()
        };
        // The kernel checks an IPv6 gateway (onlink too) against the routes it already has:
        // the most specific route to the gateway address must be a unicast route through the
        // same device, else EINVAL ("Nexthop has invalid gateway or device mismatch"). Two
        // routes through other devices make it refuse ours: one to the same destination
        // (host-gw's, while switching to vxlan), and one covering the gateway (the udp
        // backend's IPv6Network route on flannel0, while switching or with udp peers beside
        // vxlan ones). A host route for the gateway alone through our device makes the check
        // pass; ours then replaces (or joins) the others in one step, so no packet to the
        // destination ever lacks a route, and the host route goes again. Only for a gateway
        // inside the destination, as vxlan's peer network address (no pod has it); for any
        // other the refusal stands.
        let first = bounded(&op, add()).await;
        let hop = match (&first, gateway_inside(&r)) {
            (Err(e), Some(hop)) if e.errno() == Some(Errno::EINVAL) => hop,
            _ => return first,
        };
        let step = format!("set route {} (for the gateway check)", hop.dst);
        bounded(
            &step,
            self.handle
                .route()
                .add(route_message(&hop))
                .replace()
                .execute(),
        )
        .await?;
        let set = bounded(&op, add()).await;
        let del = format!("delete route {} (after the gateway check)", hop.dst);
        let removed =
            bounded_del(&del, self.handle.route().del(route_message(&hop)).execute()).await;
        set.and(removed)
    }

    async fn del_route(&self, r: Route) -> Result<(), NetlinkError> {
        let op = format!("delete route {}", r.dst);
        r.check(&op)?;
        bounded_del(&op, self.handle.route().del(route_message(&r)).execute()).await
    }

    // A few bytes to /proc/sys: written directly (not on a blocking-pool thread, which could
    // be in another network namespace than this one).
    async fn set_ipv6_conf(
        &self,
        device: &str,
        key: Ipv6Conf,
        value: u32,
    ) -> Result<(), NetlinkError> {
        let path = ipv6_conf_path(device, key)?;
        std::fs::write(&path, format!("{value}\n"))
            .map_err(|source| NetlinkError::Sysctl { path, source })
    }

    async fn ipv6_conf(&self, device: &str, key: Ipv6Conf) -> Result<u32, NetlinkError> {
        let path = ipv6_conf_path(device, key)?;
        let text = std::fs::read_to_string(&path).map_err(|source| NetlinkError::Sysctl {
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| NetlinkError::Sysctl {
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{:?} is not a number", text.trim()),
            ),
            path,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteNextHop;

    /// A main-table IPv6 route message as the kernel dumps one of ours.
    fn v6_route(dst: &str, len: u8, gw: Option<&str>, oif: u32) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst.parse().unwrap(), len)
            .output_interface(oif)
            .protocol(RouteProtocol::Boot)
            .onlink();
        if let Some(gw) = gw {
            b = b.gateway(gw.parse().unwrap());
        }
        b.build()
    }

    #[test]
    fn ipv6_dumps_keep_our_unicast_routes_only() {
        let m = v6_route("fd10:0:0:12::", 64, Some("fd10:0:0:12::"), 7);
        assert_eq!(
            parse_route_v6(&m),
            Some(Route {
                dst: "fd10:0:0:12::/64".parse().unwrap(),
                gateway: Some("fd10:0:0:12::".parse().unwrap()),
                oif: 7,
                onlink: true,
            })
        );
        // Our request message reads back as the route it was built from.
        let r = parse_route_v6(&m).unwrap();
        assert_eq!(parse_route_v6(&route_message(&r)), Some(r));
        let mut kernel = m.clone();
        kernel.header.protocol = RouteProtocol::Kernel;
        assert_eq!(parse_route_v6(&kernel), None, "the kernel's own routes");
        let mut local = m.clone();
        local.header.kind = RouteType::Local;
        assert_eq!(parse_route_v6(&local), None, "not unicast");
        let mut multipath = v6_route("fd10:0:0:13::", 64, None, 7);
        multipath
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        multipath
            .attributes
            .push(RouteAttribute::MultiPath(vec![RouteNextHop::default()]));
        assert_eq!(parse_route_v6(&multipath), None, "multipath");
        let ll = v6_route("fe80::", 64, None, 7);
        assert_eq!(parse_route_v6(&ll), None, "link-local destination");
        let default = v6_route("::", 0, Some("fd00:210::1"), 2);
        assert_eq!(
            parse_route_v6(&default).map(|r| r.dst),
            Some("::/0".parse().unwrap())
        );
    }

    #[test]
    fn ipv4_routes_and_their_messages_are_as_before() {
        let r = Route {
            dst: "10.5.2.0/24".parse().unwrap(),
            gateway: Some("10.5.2.0".parse().unwrap()),
            oif: 9,
            onlink: true,
        };
        let m = route_message(&r);
        assert_eq!(m.header.address_family, AddressFamily::Inet);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert_eq!(parse_route_v4(&m), Some(r));
        let link = Route {
            gateway: None,
            onlink: false,
            ..r
        };
        assert_eq!(route_message(&link).header.scope, RouteScope::Link);
        let v6 = route_message(&Route {
            dst: "fd10::/64".parse().unwrap(),
            gateway: None,
            oif: 9,
            onlink: false,
        });
        assert_eq!(v6.header.address_family, AddressFamily::Inet6);
        assert_eq!(parse_route_v4(&v6), None);
    }

    #[test]
    fn addresses_and_fdb_destinations_of_both_families() {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = 128;
        m.attributes
            .push(AddressAttribute::Address("fd10:0:0:11::".parse().unwrap()));
        assert_eq!(address_of(&m), Some("fd10:0:0:11::/128".parse().unwrap()));
        let mut m4 = AddressMessage::default();
        m4.header.family = AddressFamily::Inet;
        m4.header.prefix_len = 32;
        m4.attributes
            .push(AddressAttribute::Address("10.9.9.9".parse().unwrap()));
        m4.attributes
            .push(AddressAttribute::Local("10.5.1.0".parse().unwrap()));
        assert_eq!(address_of(&m4), Some("10.5.1.0/32".parse().unwrap()));

        let mut fdb = NeighbourMessage::default();
        fdb.header.family = AddressFamily::Bridge;
        fdb.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 2]));
        let v6: Ipv6Addr = "fd00:210::12".parse().unwrap();
        fdb.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Other(
                v6.octets().to_vec(),
            )));
        assert_eq!(
            ip_and_mac(&fdb),
            (Some(IpAddr::V6(v6)), Some(Mac([2, 0, 0, 0, 0, 2])))
        );
        fdb.attributes.pop();
        fdb.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Other(
                vec![172, 30, 0, 12],
            )));
        assert_eq!(ip_and_mac(&fdb).0, Some("172.30.0.12".parse().unwrap()));
    }
}
