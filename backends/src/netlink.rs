//! The kernel edge for backends: a small netlink trait over plain types, an rtnetlink
//! implementation ([`crate::netlink_rt::RtNetlink`]) and an in-memory fake that behaves like the
//! kernel tables for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use async_trait::async_trait;
use ipnet::Ipv4Net;
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

/// VXLAN link parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
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

/// A permanent IPv4 neighbour entry on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// A bridge FDB entry of a VXLAN device ("self"): frames to `mac` go to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// An IPv4 route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub onlink: bool,
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
}

fn refusal(errno: Errno) -> String {
    if errno == Errno::EOPNOTSUPP {
        format!("not supported by this kernel: {}", errno.desc())
    } else {
        format!("{} ({errno:?})", errno.desc())
    }
}

impl NetlinkError {
    /// The kernel's errno when it refused the request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The kernel cannot make this kind of device (EOPNOTSUPP).
    pub fn is_not_supported(&self) -> bool {
        self.errno() == Some(Errno::EOPNOTSUPP)
    }
}

/// What backends need from netlink. Every "set" call replaces (idempotent); every "del" of
/// something already gone succeeds.
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
    async fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError>;
    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError>;
    async fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError>;
    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError>;
    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError>;
    async fn del_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError>;
    async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError>;
    async fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError>;
    async fn del_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError>;
    /// IPv4 routes of the main table.
    async fn routes(&self) -> Result<Vec<Route>, NetlinkError>;
    async fn set_route(&self, r: Route) -> Result<(), NetlinkError>;
    async fn del_route(&self, r: Route) -> Result<(), NetlinkError>;
}

/// Makes our subnet's network address /32 the only IPv4 address of device `index` (flannel's
/// device address for both the VXLAN and the TUN device). Returns the number of changes.
pub async fn ensure_subnet_address(
    nl: &dyn Netlink,
    index: u32,
    subnet: Ipv4Net,
) -> Result<usize, NetlinkError> {
    let want = Ipv4Net::new(subnet.network(), 32).unwrap_or_default();
    let have = nl.addresses(index).await?;
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

/// An in-memory kernel for unit tests: links, addresses, neighbours, FDB and routes, plus a log
/// of every mutating call.
#[derive(Debug, Default)]
pub struct FakeNetlink {
    pub state: Mutex<FakeState>,
}

#[derive(Debug, Default, Clone)]
pub struct FakeState {
    pub links: BTreeMap<u32, Link>,
    pub addrs: BTreeMap<u32, Vec<Ipv4Net>>,
    pub neighs: BTreeMap<u32, Vec<Neighbour>>,
    pub fdb: BTreeMap<u32, Vec<FdbEntry>>,
    pub routes: Vec<Route>,
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
            return Err(NetlinkError::Kernel {
                op: "create vxlan".into(),
                errno: Errno::EOPNOTSUPP,
            });
        }
        if s.links.values().any(|l| l.name == name) {
            return Err(NetlinkError::Kernel {
                op: "create vxlan".into(),
                errno: Errno::EEXIST,
            });
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
        s.links.remove(&index);
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
            .ok_or_else(|| NetlinkError::Kernel {
                op: "set link".into(),
                errno: Errno::ENODEV,
            })?;
        l.mtu = mtu;
        l.up = true;
        Ok(())
    }
    async fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        Ok(self.lock().addrs.get(&index).cloned().unwrap_or_default())
    }
    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("add_address {index} {addr}"));
        let v = s.addrs.entry(index).or_default();
        if !v.contains(&addr) {
            v.push(addr);
        }
        Ok(())
    }
    async fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_address {index} {addr}"));
        s.addrs.entry(index).or_default().retain(|a| *a != addr);
        Ok(())
    }
    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        Ok(self.lock().neighs.get(&index).cloned().unwrap_or_default())
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
    async fn del_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
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
    async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        Ok(self.lock().routes.clone())
    }
    async fn set_route(&self, r: Route) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "set_route {} via {:?} dev {}",
            r.dst, r.gateway, r.oif
        ));
        s.routes.retain(|x| x.dst != r.dst);
        s.routes.push(r);
        Ok(())
    }
    async fn del_route(&self, r: Route) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.calls.push(format!("del_route {}", r.dst));
        s.routes.retain(|x| *x != r);
        Ok(())
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
}
