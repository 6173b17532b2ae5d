//! The kernel edge for backends: a small netlink trait over plain types, an rtnetlink
//! implementation ([`crate::netlink_rt::RtNetlink`]) and an in-memory fake that behaves like the
//! kernel tables for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use ipnet::IpNet;
pub use nix::errno::Errno;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An address family of the kernel's tables (`AF_INET`, `AF_INET6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a prefix.
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Whether `ip` is an IPv6 link-local unicast address (fe80::/10): the kernel makes one on
/// every IPv6 device; [`Netlink::addresses`] leaves them out so no diff ever touches them.
pub fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// VXLAN link parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub port: u16,
    /// The local (source) address: its family is the device's underlay family (IFLA_VXLAN_LOCAL
    /// or IFLA_VXLAN_LOCAL6). The kernel refuses FDB destinations of the other family.
    pub local: IpAddr,
    /// Index of the underlay interface the device is bound to.
    pub link: u32,
    pub learning: bool,
    pub gbp: bool,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Mac,
    pub mtu: u32,
    pub up: bool,
    /// Set when the link is a VXLAN device.
    pub vxlan: Option<VxlanParams>,
}

/// A permanent neighbour entry (ARP for IPv4, NDP for IPv6) on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// A bridge FDB entry of a VXLAN device ("self"): frames to `mac` go to `dst`, an address of
/// the device's underlay family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: Mac,
    pub dst: IpAddr,
}

/// A unicast route in the main table; `gateway` (if any) is of the family of `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub onlink: bool,
}

impl Route {
    pub fn family(&self) -> Family {
        Family::of_net(&self.dst)
    }

    /// Refuses a route whose gateway is of another family than its destination (the kernel
    /// would need RTA_VIA for that, which nothing here makes).
    pub fn check(&self, op: &str) -> Result<(), NetlinkError> {
        match self.gateway {
            Some(gw) if Family::of(&gw) != self.family() => Err(NetlinkError::Invalid {
                op: op.to_string(),
                why: format!(
                    "gateway {gw} is not of the family of destination {}",
                    self.dst
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// A per-device IPv6 setting, `net.ipv6.conf.<device>.<key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ipv6Conf {
    /// `accept_ra` (kernel default 1): 0 keeps router advertisements from configuring the
    /// device (flannel sets 0 on `flannel-v6.<VNI>`).
    AcceptRa,
    /// `addr_gen_mode` (kernel default 0, eui64): 1 makes no link-local address when the
    /// device comes up.
    AddrGenMode,
}

impl Ipv6Conf {
    /// The key's file name under `/proc/sys/net/ipv6/conf/<device>/`.
    pub fn key(self) -> &'static str {
        match self {
            Ipv6Conf::AcceptRa => "accept_ra",
            Ipv6Conf::AddrGenMode => "addr_gen_mode",
        }
    }

    /// The kernel's value on a new device.
    pub fn kernel_default(self) -> u32 {
        match self {
            Ipv6Conf::AcceptRa => 1,
            Ipv6Conf::AddrGenMode => 0,
        }
    }
}

/// The sysctl file of `key` for `device`, after checking that `device` is an interface name
/// (1–15 bytes, no `/`, not `.` or `..`, no whitespace) so it cannot name another file.
pub fn ipv6_conf_path(device: &str, key: Ipv6Conf) -> Result<String, NetlinkError> {
    let ok = !device.is_empty()
        && device.len() <= 15
        && device != "."
        && device != ".."
        && !device.contains('/')
        && !device.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(NetlinkError::Invalid {
            op: format!("set {}", key.key()),
            why: format!("{device:?} is not an interface name"),
        });
    }
    Ok(format!("/proc/sys/net/ipv6/conf/{device}/{}", key.key()))
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the request with `errno` (EEXIST, ENOENT, ENODEV, ...; EOPNOTSUPP:
    /// it cannot make this kind of device, see [`NetlinkError::is_not_supported`]).
    #[error("netlink {op}: {}", refusal(*.errno))]
    Kernel { op: String, errno: Errno },
    /// The request could not be made or its answer not read (not a kernel refusal).
    #[error("netlink {op}: {source}")]
    Request {
        op: String,
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("netlink {op}: {source}")]
    Socket { op: String, source: std::io::Error },
    /// No answer within the bound every request has.
    #[error("netlink {op}: no answer within {timeout:?}")]
    Timeout {
        op: String,
        timeout: std::time::Duration,
    },
    /// The kernel accepted the request but what it made cannot be found.
    #[error("netlink {op}: {what} created but not found")]
    Vanished { op: String, what: String },
    /// A request not sent because it is malformed (mixed address families, a bad name).
    #[error("netlink {op}: {why}")]
    Invalid { op: String, why: String },
    /// A `/proc/sys` setting could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

fn refusal(errno: Errno) -> String {
    if errno == Errno::EOPNOTSUPP {
        format!("not supported by this kernel: {}", errno.desc())
    } else {
        format!("{} ({errno:?})", errno.desc())
    }
}

impl NetlinkError {
    /// The kernel's errno when it refused the request (also for a refused sysctl).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Sysctl { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }

    /// The kernel cannot make this kind of device (EOPNOTSUPP).
    pub fn is_not_supported(&self) -> bool {
        self.errno() == Some(Errno::EOPNOTSUPP)
    }
}

/// What backends need from netlink, for both address families. Every "set" call replaces
/// (idempotent); every "del" of something already gone succeeds. Dumps are per family, so
/// code for one family never sees (nor removes) the other's entries.
#[async_trait]
pub trait Netlink: Send + Sync + fmt::Debug {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError>;
    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: Mac,
        mtu: u32,
    ) -> Result<u32, NetlinkError>;
    async fn delete_link(&self, index: u32) -> Result<(), NetlinkError>;
    async fn set_link_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError>;
    /// The device's addresses of `family`, without IPv6 link-local ones (fe80::/10).
    async fn addresses(&self, index: u32, family: Family) -> Result<Vec<IpNet>, NetlinkError>;
    /// Adds (or replaces) an address; IPv6 ones without duplicate address detection
    /// (IFA_F_NODAD), so they are usable at once.
    async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError>;
    async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError>;
    /// The device's permanent neighbours of `family`.
    async fn neighbours(&self, index: u32, family: Family) -> Result<Vec<Neighbour>, NetlinkError>;
    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError>;
    async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError>;
    /// The device's FDB entries with a destination (of either family: a VXLAN device has
    /// only its underlay family's).
    async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError>;
    async fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError>;
    async fn del_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError>;
    /// Routes of `family` in the main table. IPv4: as the kernel lists them (routes without
    /// an output interface, such as multipath ones, left out). IPv6: unicast routes with one
    /// next hop only, without the kernel's own (`proto kernel`: address prefixes, fe80::/64)
    /// and without link-local destinations.
    async fn routes(&self, family: Family) -> Result<Vec<Route>, NetlinkError>;
    async fn set_route(&self, r: Route) -> Result<(), NetlinkError>;
    async fn del_route(&self, r: Route) -> Result<(), NetlinkError>;
    /// Sets `net.ipv6.conf.<device>.<key>` (in the network namespace of the calling thread,
    /// which for [`crate::netlink_rt::RtNetlink`] must be the one its socket was opened in).
    async fn set_ipv6_conf(
        &self,
        device: &str,
        key: Ipv6Conf,
        value: u32,
    ) -> Result<(), NetlinkError>;
    /// Reads `net.ipv6.conf.<device>.<key>`.
    async fn ipv6_conf(&self, device: &str, key: Ipv6Conf) -> Result<u32, NetlinkError>;
}

/// Makes our subnet's network address the only address of its family on device `index`: /32
/// for IPv4, /128 for IPv6 (flannel's device address for the VXLAN and the TUN device).
/// Addresses of the other family and IPv6 link-local ones are left alone. Returns the number
/// of changes.
pub async fn ensure_subnet_address(
    nl: &dyn Netlink,
    index: u32,
    subnet: IpNet,
) -> Result<usize, NetlinkError> {
    let want = IpNet::new(subnet.network(), subnet.max_prefix_len()).unwrap_or(subnet);
    let have = nl.addresses(index, Family::of_net(&subnet)).await?;
    let mut changes = 0;
    for a in have.iter().filter(|a| **a != want) {
        nl.del_address(index, *a).await?;
        changes += 1;
    }
    if !have.contains(&want) {
        nl.add_address(index, want).await?;
        changes += 1;
    }
    Ok(changes)
}

/// Deletes every route in `routes`, going on past errors (teardown); the first error, if any.
pub async fn del_routes(
    nl: &dyn Netlink,
    routes: impl IntoIterator<Item = Route> + Send,
) -> Result<(), NetlinkError> {
    let mut first = None;
    for r in routes {
        if let Err(e) = nl.del_route(r).await {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// An in-memory kernel for unit tests: links, addresses, neighbours, FDB, routes and IPv6
/// device settings of both families, plus a log of every mutating call.
#[derive(Debug, Default)]
pub struct FakeNetlink {
    pub state: Mutex<FakeState>,
}

#[derive(Debug, Default, Clone)]
pub struct FakeState {
    pub links: BTreeMap<u32, Link>,
    /// Addresses per device, both families (IPv6 link-local ones put here are hidden from
    /// [`Netlink::addresses`], as the real implementation hides the kernel's).
    pub addrs: BTreeMap<u32, Vec<IpNet>>,
    pub neighs: BTreeMap<u32, Vec<Neighbour>>,
    pub fdb: BTreeMap<u32, Vec<FdbEntry>>,
    pub routes: Vec<Route>,
    /// IPv6 settings set by name (unset ones read as the kernel's defaults).
    pub ipv6_conf: BTreeMap<(String, Ipv6Conf), u32>,
    pub calls: Vec<String>,
    pub next_index: u32,
    /// Makes create_vxlan fail as a kernel without VXLAN does.
    pub no_vxlan: bool,
}

impl FakeNetlink {
    pub fn with_underlay(index: u32, name: &str, mtu: u32) -> Self {
        let f = FakeNetlink::default();
        {
            let mut s = f.lock();
            s.links.insert(
                index,
                Link {
                    index,
                    name: name.into(),
                    mac: Mac([2, 0, 0, 0, 0, 1]),
                    mtu,
                    up: true,
                    vxlan: None,
                },
            );
            s.next_index = 100;
        }
        f
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn kernel(op: impl Into<String>, errno: Errno) -> NetlinkError {
    NetlinkError::Kernel {
        op: op.into(),
        errno,
    }
}

impl FakeState {
    /// The path of an IPv6 setting of an existing device, or the error the kernel's /proc
    /// gives for a device that is not there.
    fn ipv6_conf_key(&self, device: &str, key: Ipv6Conf) -> Result<String, NetlinkError> {
        let path = ipv6_conf_path(device, key)?;
        if self.links.values().any(|l| l.name == device) {
            Ok(device.to_string())
        } else {
            Err(NetlinkError::Sysctl {
                path,
                source: std::io::Error::from_raw_os_error(Errno::ENOENT as i32),
            })
        }
    }
}

#[async_trait]
impl Netlink for FakeNetlink {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        Ok(self.lock().links.values().find(|l| l.name == name).cloned())
    }
    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: Mac,
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        let mut s = self.lock();
        s.calls
            .push(format!("create_vxlan {name} vni {}", params.vni));
        if s.no_vxlan {
            return Err(kernel("create vxlan", Errno::EOPNOTSUPP));
        }
        if s.links.values().any(|l| l.name == name) {
            return Err(kernel("create vxlan", Errno::EEXIST));
        }
        s.next_index += 1;
        let index = s.next_index;
        s.links.insert(
            index,
            Link {
                index,
                name: name.into(),
                mac,
                mtu,
                up: false,
                vxlan: Some(params.clone()),
            },
        );
        Ok(index)
    }
    async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("delete_link {index}"));
        if let Some(l) = s.links.remove(&index) {
            s.ipv6_conf.retain(|(dev, _), _| *dev != l.name);
        }
        s.addrs.remove(&index);
        s.neighs.remove(&index);
        s.fdb.remove(&index);
        s.routes.retain(|r| r.oif != index);
        Ok(())
    }
    async fn set_link_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("set_link {index} mtu {mtu} up"));
        let l = s
            .links
            .get_mut(&index)
            .ok_or_else(|| kernel("set link", Errno::ENODEV))?;
        l.mtu = mtu;
        l.up = true;
        Ok(())
    }
    async fn addresses(&self, index: u32, family: Family) -> Result<Vec<IpNet>, NetlinkError> {
        Ok(self
            .lock()
            .addrs
            .get(&index)
            .map(|v| {
                v.iter()
                    .filter(|a| Family::of_net(a) == family && !is_link_local(&a.addr()))
                    .copied()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("add_address {index} {addr}"));
        let v = s.addrs.entry(index).or_default();
        if !v.contains(&addr) {
            v.push(addr);
        }
        Ok(())
    }
    async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_address {index} {addr}"));
        s.addrs.entry(index).or_default().retain(|a| *a != addr);
        Ok(())
    }
    async fn neighbours(&self, index: u32, family: Family) -> Result<Vec<Neighbour>, NetlinkError> {
        Ok(self
            .lock()
            .neighs
            .get(&index)
            .map(|v| {
                v.iter()
                    .filter(|n| Family::of(&n.ip) == family)
                    .copied()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls
            .push(format!("set_neighbour {index} {} {}", n.ip, n.mac));
        let v = s.neighs.entry(index).or_default();
        v.retain(|x| x.ip != n.ip);
        v.push(n);
        Ok(())
    }
    async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_neighbour {index} {ip}"));
        s.neighs.entry(index).or_default().retain(|x| x.ip != ip);
        Ok(())
    }
    async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        Ok(self.lock().fdb.get(&index).cloned().unwrap_or_default())
    }
    async fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("set_fdb {index} {} {}", e.mac, e.dst));
        // A VXLAN device takes destinations of its underlay family only.
        let local = s
            .links
            .get(&index)
            .and_then(|l| l.vxlan.as_ref())
            .map(|p| p.local);
        if local.is_some_and(|l| Family::of(&l) != Family::of(&e.dst)) {
            return Err(kernel(
                format!("set fdb {} dst {}", e.mac, e.dst),
                Errno::EAFNOSUPPORT,
            ));
        }
        let v = s.fdb.entry(index).or_default();
        v.retain(|x| x.mac != e.mac);
        v.push(e);
        Ok(())
    }
    async fn del_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_fdb {index} {} {}", e.mac, e.dst));
        s.fdb.entry(index).or_default().retain(|x| *x != e);
        Ok(())
    }
    async fn routes(&self, family: Family) -> Result<Vec<Route>, NetlinkError> {
        Ok(self
            .lock()
            .routes
            .iter()
            .filter(|r| r.family() == family)
            .copied()
            .collect())
    }
    async fn set_route(&self, r: Route) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "set_route {} via {:?} dev {}",
            r.dst, r.gateway, r.oif
        ));
        r.check("set route")?;
        s.routes.retain(|x| x.dst != r.dst);
        s.routes.push(r);
        Ok(())
    }
    async fn del_route(&self, r: Route) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_route {}", r.dst));
        r.check("delete route")?;
        s.routes.retain(|x| *x != r);
        Ok(())
    }
    async fn set_ipv6_conf(
        &self,
        device: &str,
        key: Ipv6Conf,
        value: u32,
    ) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls
            .push(format!("set_ipv6_conf {device} {} {value}", key.key()));
        let dev = s.ipv6_conf_key(device, key)?;
        s.ipv6_conf.insert((dev, key), value);
        Ok(())
    }
    async fn ipv6_conf(&self, device: &str, key: Ipv6Conf) -> Result<u32, NetlinkError> {
        let s = self.lock();
        let dev = s.ipv6_conf_key(device, key)?;
        Ok(s.ipv6_conf
            .get(&(dev, key))
            .copied()
            .unwrap_or(key.kernel_default()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_errno_and_say_what_it_means() {
        let e = NetlinkError::Kernel {
            op: "set route 10.5.1.0/24".into(),
            errno: Errno::EEXIST,
        };
        assert_eq!(e.errno(), Some(Errno::EEXIST));
        assert_eq!(
            e.to_string(),
            "netlink set route 10.5.1.0/24: File exists (EEXIST)"
        );
        let e = NetlinkError::Kernel {
            op: "create vxlan flannel.1".into(),
            errno: Errno::EOPNOTSUPP,
        };
        assert!(e.is_not_supported());
        assert!(
            e.to_string().contains("not supported by this kernel"),
            "{e}"
        );
        let e = NetlinkError::Timeout {
            op: "list routes".into(),
            timeout: std::time::Duration::from_secs(5),
        };
        assert_eq!(e.errno(), None);
        assert!(!e.is_not_supported());
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }

    fn vxlan6(local: &str) -> VxlanParams {
        VxlanParams {
            vni: 1,
            port: 8472,
            local: ip(local),
            link: 2,
            learning: false,
            gbp: false,
        }
    }

    #[test]
    fn families_and_link_local() {
        assert_eq!(Family::of(&ip("10.0.0.1")), Family::V4);
        assert_eq!(Family::of(&ip("fd00::1")), Family::V6);
        assert_eq!(Family::of_net(&net("fd00::/64")), Family::V6);
        assert_eq!(Family::V6.to_string(), "IPv6");
        for (a, ll) in [
            ("fe80::1", true),
            ("febf:ffff::1", true),
            ("fec0::1", false),
            ("fd00::1", false),
            ("169.254.1.1", false),
        ] {
            assert_eq!(is_link_local(&ip(a)), ll, "{a}");
        }
    }

    #[tokio::test]
    async fn addresses_are_per_family_and_link_local_ones_are_never_touched() {
        let nl = FakeNetlink::with_underlay(2, "eth0", 1500);
        nl.lock().addrs.insert(
            2,
            vec![
                net("10.5.9.0/32"),
                net("fe80::1/64"),
                net("fd10:0:0:99::/128"),
            ],
        );
        assert_eq!(
            nl.addresses(2, Family::V4).await.unwrap(),
            vec![net("10.5.9.0/32")]
        );
        assert_eq!(
            nl.addresses(2, Family::V6).await.unwrap(),
            vec![net("fd10:0:0:99::/128")]
        );
        // The v6 subnet's network address /128 replaces the stale v6 address only.
        let n = ensure_subnet_address(&nl, 2, net("fd10:0:0:11::/64"))
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            nl.lock().addrs[&2],
            vec![
                net("10.5.9.0/32"),
                net("fe80::1/64"),
                net("fd10:0:0:11::/128")
            ]
        );
        assert_eq!(
            ensure_subnet_address(&nl, 2, net("fd10:0:0:11::/64"))
                .await
                .unwrap(),
            0,
            "idempotent"
        );
        // And the v4 one leaves every IPv6 address alone.
        ensure_subnet_address(&nl, 2, net("10.5.1.0/24"))
            .await
            .unwrap();
        assert_eq!(
            nl.lock().addrs[&2],
            vec![
                net("fe80::1/64"),
                net("fd10:0:0:11::/128"),
                net("10.5.1.0/32")
            ]
        );
        // Removing what is not there is fine, as in the kernel implementation.
        nl.del_address(2, net("fd10:0:0:77::/128")).await.unwrap();
    }

    #[tokio::test]
    async fn neighbours_fdb_and_routes_of_both_families() {
        let nl = FakeNetlink::with_underlay(2, "eth0", 1500);
        let v4 = nl
            .create_vxlan("flannel.1", &vxlan6("172.30.0.11"), mac(1), 1450)
            .await
            .unwrap();
        let v6 = nl
            .create_vxlan("flannel-v6.1", &vxlan6("fd00:210::11"), mac(2), 1430)
            .await
            .unwrap();
        let n4 = Neighbour {
            ip: ip("10.5.2.0"),
            mac: mac(3),
        };
        let n6 = Neighbour {
            ip: ip("fd10:0:0:12::"),
            mac: mac(4),
        };
        for n in [n4, n6] {
            nl.set_neighbour(v6, n).await.unwrap();
            nl.set_neighbour(v6, n).await.unwrap();
        }
        assert_eq!(nl.neighbours(v6, Family::V4).await.unwrap(), vec![n4]);
        assert_eq!(nl.neighbours(v6, Family::V6).await.unwrap(), vec![n6]);
        nl.del_neighbour(v6, n6.ip).await.unwrap();
        nl.del_neighbour(v6, n6.ip).await.unwrap();
        assert!(nl.neighbours(v6, Family::V6).await.unwrap().is_empty());
        assert_eq!(nl.neighbours(v6, Family::V4).await.unwrap(), vec![n4]);

        // A VXLAN device takes FDB destinations of its underlay's family only (EAFNOSUPPORT,
        // as the kernel answers).
        let e6 = FdbEntry {
            mac: mac(4),
            dst: ip("fd00:210::12"),
        };
        nl.set_fdb(v6, e6).await.unwrap();
        nl.set_fdb(v6, e6).await.unwrap();
        assert_eq!(nl.fdb(v6).await.unwrap(), vec![e6]);
        let e4 = FdbEntry {
            mac: mac(3),
            dst: ip("172.30.0.12"),
        };
        let wrong = nl.set_fdb(v6, e4).await.unwrap_err();
        assert_eq!(wrong.errno(), Some(Errno::EAFNOSUPPORT), "{wrong}");
        let wrong = nl.set_fdb(v4, e6).await.unwrap_err();
        assert_eq!(wrong.errno(), Some(Errno::EAFNOSUPPORT), "{wrong}");
        nl.set_fdb(v4, e4).await.unwrap();
        nl.del_fdb(v6, e6).await.unwrap();
        nl.del_fdb(v6, e6).await.unwrap();
        assert!(nl.fdb(v6).await.unwrap().is_empty());
        assert_eq!(nl.fdb(v4).await.unwrap(), vec![e4]);

        // Routes: dumps per family; a set replaces the route to the same destination.
        let r4 = Route {
            dst: net("10.5.2.0/24"),
            gateway: Some(ip("10.5.2.0")),
            oif: v4,
            onlink: true,
        };
        let r6 = Route {
            dst: net("fd10:0:0:12::/64"),
            gateway: Some(ip("fd10:0:0:12::")),
            oif: v6,
            onlink: true,
        };
        nl.set_route(r4).await.unwrap();
        nl.set_route(r6).await.unwrap();
        nl.set_route(r6).await.unwrap();
        assert_eq!(nl.routes(Family::V4).await.unwrap(), vec![r4]);
        assert_eq!(nl.routes(Family::V6).await.unwrap(), vec![r6]);
        let moved = Route {
            gateway: Some(ip("fd00:210::12")),
            oif: 2,
            onlink: false,
            ..r6
        };
        nl.set_route(moved).await.unwrap();
        assert_eq!(nl.routes(Family::V6).await.unwrap(), vec![moved]);
        // A gateway of the other family is refused before it reaches the kernel.
        let mixed = Route {
            gateway: Some(ip("172.30.0.12")),
            ..r6
        };
        let e = nl.set_route(mixed).await.unwrap_err();
        assert!(matches!(e, NetlinkError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("not of the family"), "{e}");
        assert!(nl.del_route(mixed).await.is_err());
        nl.del_route(moved).await.unwrap();
        nl.del_route(moved).await.unwrap();
        assert!(nl.routes(Family::V6).await.unwrap().is_empty());
        assert_eq!(nl.routes(Family::V4).await.unwrap(), vec![r4]);
    }

    #[tokio::test]
    async fn ipv6_settings_read_as_the_kernel_defaults_until_set() {
        let nl = FakeNetlink::with_underlay(2, "eth0", 1500);
        let dev = nl
            .create_vxlan("flannel-v6.1", &vxlan6("fd00:210::11"), mac(2), 1430)
            .await
            .unwrap();
        assert_eq!(
            nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AddrGenMode)
                .await
                .unwrap(),
            0
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
        assert!(nl
            .lock()
            .calls
            .contains(&"set_ipv6_conf flannel-v6.1 accept_ra 0".to_string()));
        // A device that is not there: the error /proc gives (ENOENT).
        let e = nl
            .set_ipv6_conf("flannel-v6.9", Ipv6Conf::AcceptRa, 0)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOENT), "{e}");
        assert!(
            e.to_string()
                .contains("/proc/sys/net/ipv6/conf/flannel-v6.9/accept_ra"),
            "{e}"
        );
        // The setting goes with the device.
        nl.delete_link(dev).await.unwrap();
        assert!(nl.lock().ipv6_conf.is_empty());
    }

    #[test]
    fn ipv6_conf_paths_take_interface_names_only() {
        assert_eq!(
            ipv6_conf_path("flannel-v6.1", Ipv6Conf::AddrGenMode).unwrap(),
            "/proc/sys/net/ipv6/conf/flannel-v6.1/addr_gen_mode"
        );
        for bad in ["", ".", "..", "a/b", "../../x", "sixteen-chars-xx", "a b"] {
            let e = ipv6_conf_path(bad, Ipv6Conf::AcceptRa).unwrap_err();
            assert!(matches!(e, NetlinkError::Invalid { .. }), "{bad:?}: {e}");
        }
    }
}
