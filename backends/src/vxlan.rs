//! `vxlan`: kernel VXLAN devices programmed like flannel's backend: `flannel.<VNI>` for IPv4
//! (when IPv4 is enabled) and `flannel-v6.<VNI>` for IPv6 (when IPv6 is enabled), each on the
//! external interface's address of its family, with the same VNI, port and GBP setting.
//!
//! Per peer lease of type vxlan and per family: neighbour `<peer subnet network address> lladdr
//! <VtepMAC> permanent`, FDB `<VtepMAC> dst <PublicIP> self permanent`, route `<peer subnet> via
//! <peer network address> dev <device> onlink` (routes are removed first and added last). IPv4
//! takes `BackendData` and `PublicIP`, IPv6 `BackendV6Data` and `PublicIPv6`; a lease lacking
//! (or with bad) data of one family loses only that family's routes (flannel drops the whole
//! lease). With `DirectRouting`, a peer whose public address is inside our interface's prefix
//! of that family gets `<peer subnet> via <public address>` on that interface.
//!
//! MTU: the IPv4 device gets the interface MTU − 50 (or `MTU`), the IPv6 device the interface
//! MTU − 70 (the kernel's limit for an IPv6 underlay; `MTU` only lowers it), pods the smaller of
//! the devices' MTUs. [`plan`] is the pure diff; [`VxlanBackend::reconcile`] reads the kernel
//! and applies it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{
    ensure_subnet_address, Family, FdbEntry, Ipv6Conf, Mac, Neighbour, Netlink, NetlinkError,
    Route, VxlanParams,
};
use crate::options::{bad, Options};
use crate::peerlog::PeerLog;
use crate::{
    peer_gateway_route, Backend, BackendContext, BackendError, ExternalInterface, PeerTable,
};

/// The kernel's (and flannel's) VXLAN port when `Port` is 0 or absent.
pub const DEFAULT_PORT: u16 = 8472;
/// VXLAN over IPv4 adds 50 bytes (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const OVERHEAD_V4: u32 = 50;
/// VXLAN over IPv6 adds 70 bytes (outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14): the
/// kernel caps a device on an IPv6 underlay at the lower device's MTU − 70 (a larger MTU is
/// clamped at creation and refused with EINVAL afterwards).
pub const OVERHEAD_V6: u32 = 70;
/// IPv6's minimum link MTU: below it the kernel turns IPv6 off on a device.
pub const IPV6_MIN_MTU: u32 = 1280;
/// The kernel's limit for an interface name (IFNAMSIZ − 1).
const MAX_IFNAME: usize = 15;

/// `Backend` options of the vxlan type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    pub gbp: bool,
    pub direct_routing: bool,
    pub mtu: Option<u32>,
    /// `"Fallback": "udp"` (our extension): run the udp backend when the kernel cannot make
    /// VXLAN devices.
    pub fallback: Option<&'static str>,
}

impl VxlanConfig {
    /// Parses the options; returns warnings for keys it does not know.
    pub fn parse(options: &Map<String, Value>) -> Result<(Self, Vec<String>), BackendError> {
        let o = Options::new(options, "vxlan");
        let vni = match o.uint("VNI", (1 << 24) - 1)? {
            None | Some(0) => 1,
            Some(v) => v as u32,
        };
        let port = match o.uint("Port", 65535)? {
            None | Some(0) => DEFAULT_PORT,
            Some(p) => p as u16,
        };
        let mtu = match o.uint("MTU", 65535)? {
            None | Some(0) => None,
            Some(m) if m < 68 => {
                return Err(bad("MTU", format!("{m} is below the IPv4 minimum of 68")))
            }
            Some(m) => Some(m as u32),
        };
        Ok((
            VxlanConfig {
                vni,
                port,
                gbp: o.boolean("GBP", false)?,
                direct_routing: o.boolean("DirectRouting", false)?,
                mtu,
                fallback: o.choice("Fallback", &["udp"])?,
            },
            o.warnings(&["VNI", "Port", "GBP", "DirectRouting", "MTU", "Fallback"]),
        ))
    }

    /// The IPv4 device, `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// The IPv6 device, `flannel-v6.<VNI>` (as flannel names it).
    pub fn device_name6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }
}

/// A vxlan lease's BackendData (and BackendV6Data: the same fields for the IPv6 device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLeaseData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: Mac,
}

/// FNV-1a, 64 bit: stable across Rust versions and platforms (std's hasher is not).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn mac_of(input: &str) -> Mac {
    let h = fnv1a(input.as_bytes()).to_be_bytes();
    Mac([(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]])
}

/// The VTEP MAC for a node: a locally administered unicast address derived from the machine
/// id, the published IP and the VNI, so it survives daemon restarts and reboots.
pub fn stable_mac(node_id: &str, public_ip: Ipv4Addr, vni: u32) -> Mac {
    mac_of(&format!("flannel-vtep/{node_id}/{public_ip}/{vni}"))
}

/// The IPv6 device's VTEP MAC, derived like [`stable_mac`] from another input (so it differs
/// from the IPv4 device's, as flannel's two devices' MACs do).
pub fn stable_mac6(node_id: &str, public_ipv6: Ipv6Addr, vni: u32) -> Mac {
    mac_of(&format!("flannel-vtep6/{node_id}/{public_ipv6}/{vni}"))
}

/// The kernel state a set of peers needs (one device, one family).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub neighbours: BTreeMap<IpAddr, Mac>,
    pub fdb: BTreeSet<FdbEntry>,
    pub routes: BTreeMap<IpNet, Route>,
}

/// What a peer lease means for this node, for one address family (subnet and public address
/// are of that family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPlan {
    Tunnel {
        subnet: IpNet,
        mac: Mac,
        public_ip: IpAddr,
    },
    Direct {
        subnet: IpNet,
        public_ip: IpAddr,
    },
    Ignored(String),
}

/// A lease's `BackendData` / `BackendV6Data` (`field`), checked against our VNI.
fn lease_data(v: Option<&Value>, field: &str, cfg: &VxlanConfig) -> Result<VxlanLeaseData, String> {
    let data: VxlanLeaseData = match v.cloned().map(serde_json::from_value) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(format!("bad {field}: {e}")),
        None => return Err(format!("no {field}")),
    };
    if data.vni != 0 && data.vni != cfg.vni {
        return Err(format!("VNI {} differs from ours ({})", data.vni, cfg.vni));
    }
    Ok(data)
}

/// Classifies one peer lease for `family` (pure): IPv4 from its IPv4 subnet, `PublicIP` and
/// `BackendData`; IPv6 from its IPv6 subnet, `PublicIPv6` and `BackendV6Data`.
pub fn peer_plan(
    lease: &Lease,
    cfg: &VxlanConfig,
    ext: &ExternalInterface,
    family: Family,
) -> PeerPlan {
    if lease.attrs.data_plane() != "vxlan" {
        return PeerPlan::Ignored(format!(
            "backend type {:?}, not vxlan",
            lease.attrs.backend_type
        ));
    }
    let (subnet, public_ip, data, direct) = match family {
        Family::V4 => {
            let data = match lease_data(lease.attrs.backend_data.as_ref(), "BackendData", cfg) {
                Ok(d) => d,
                Err(why) => return PeerPlan::Ignored(why),
            };
            let Some(subnet) = lease.key.ipv4 else {
                return PeerPlan::Ignored("no IPv4 subnet".into());
            };
            let public_ip = lease.attrs.public_ip;
            let direct = ext.network().is_some_and(|n| n.contains(&public_ip));
            (IpNet::V4(subnet), IpAddr::V4(public_ip), data, direct)
        }
        Family::V6 => {
            let Some(subnet) = lease.key.ipv6 else {
                return PeerPlan::Ignored("no IPv6 subnet".into());
            };
            let data = match lease_data(lease.attrs.backend_v6_data.as_ref(), "BackendV6Data", cfg)
            {
                Ok(d) => d,
                Err(why) => return PeerPlan::Ignored(why),
            };
            let public_ip = match lease.attrs.public_ipv6 {
                None => return PeerPlan::Ignored("PublicIPv6 is null".into()),
                Some(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                    return PeerPlan::Ignored(format!(
                        "PublicIPv6 {ip} cannot be a tunnel endpoint"
                    ))
                }
                Some(ip) => ip,
            };
            let direct = ext.network6().is_some_and(|n| n.contains(&public_ip));
            (IpNet::V6(subnet), IpAddr::V6(public_ip), data, direct)
        }
    };
    if cfg.direct_routing && direct {
        return PeerPlan::Direct { subnet, public_ip };
    }
    PeerPlan::Tunnel {
        subnet,
        mac: data.vtep_mac,
        public_ip,
    }
}

/// The desired kernel state for all peers of one family (pure): tunnel entries on device
/// `dev`, direct routes on the external interface.
pub fn desired(plans: &[PeerPlan], dev: u32, ext: &ExternalInterface) -> Desired {
    let mut d = Desired::default();
    for p in plans {
        match *p {
            PeerPlan::Tunnel {
                subnet,
                mac,
                public_ip,
            } => {
                let gw = subnet.network();
                d.neighbours.insert(gw, mac);
                d.fdb.insert(FdbEntry {
                    mac,
                    dst: public_ip,
                });
                d.routes.insert(
                    subnet,
                    Route {
                        dst: subnet,
                        gateway: Some(gw),
                        oif: dev,
                        onlink: true,
                    },
                );
            }
            PeerPlan::Direct { subnet, public_ip } => {
                d.routes.insert(
                    subnet,
                    Route {
                        dst: subnet,
                        gateway: Some(public_ip),
                        oif: ext.index,
                        onlink: false,
                    },
                );
            }
            PeerPlan::Ignored(_) => {}
        }
    }
    d
}

/// One kernel change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DelRoute(Route),
    DelNeighbour(IpAddr),
    DelFdb(FdbEntry),
    SetNeighbour(Neighbour),
    SetFdb(FdbEntry),
    SetRoute(Route),
}

/// The kernel state we manage for one device, as read.
#[derive(Debug, Clone, Default)]
pub struct Actual {
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    /// Routes we own: on the VXLAN device, or direct routes into the cluster network.
    pub routes: Vec<Route>,
}

/// The changes that turn `actual` into `desired`, routes removed first and added last (pure).
pub fn plan(desired: &Desired, actual: &Actual) -> Vec<Op> {
    let mut ops = Vec::new();
    for r in &actual.routes {
        if desired.routes.get(&r.dst) != Some(r) {
            ops.push(Op::DelRoute(*r));
        }
    }
    for n in &actual.neighbours {
        if desired.neighbours.get(&n.ip) != Some(&n.mac) {
            ops.push(Op::DelNeighbour(n.ip));
        }
    }
    for e in &actual.fdb {
        if !desired.fdb.contains(e) {
            ops.push(Op::DelFdb(*e));
        }
    }
    for (ip, mac) in &desired.neighbours {
        let n = Neighbour { ip: *ip, mac: *mac };
        if !actual.neighbours.contains(&n) {
            ops.push(Op::SetNeighbour(n));
        }
    }
    for e in &desired.fdb {
        if !actual.fdb.contains(e) {
            ops.push(Op::SetFdb(*e));
        }
    }
    for r in desired.routes.values() {
        if !actual.routes.contains(r) {
            ops.push(Op::SetRoute(*r));
        }
    }
    ops
}

/// Why a vxlan peer is (partly) not routed, over the families this node runs (`None`: every
/// family is routed). In dual stack each message names its family.
pub fn peer_problem(plans: &[(Family, &PeerPlan)]) -> Option<String> {
    let why: Vec<String> = plans
        .iter()
        .filter_map(|(f, p)| match p {
            PeerPlan::Ignored(why) if plans.len() > 1 => Some(format!("{f}: {why}")),
            PeerPlan::Ignored(why) => Some(why.clone()),
            _ => None,
        })
        .collect();
    (!why.is_empty()).then(|| why.join("; "))
}

/// One VXLAN device (one address family) and the state it was last seen in.
#[derive(Debug)]
struct Vtep {
    family: Family,
    name: String,
    params: VxlanParams,
    index: u32,
    mac: Mac,
    mtu: u32,
    /// Our lease's subnet of this family.
    own: Option<IpNet>,
    /// The cluster network of this family.
    network: IpNet,
}

impl Vtep {
    /// Makes sure the device exists with our parameters, MTU, up (and, for IPv6, without
    /// router advertisements, set before it first comes up as flannel does). Returns true if
    /// it changed anything.
    async fn ensure_device(&mut self, nl: &dyn Netlink) -> Result<bool, BackendError> {
        match nl.link_by_name(&self.name).await? {
            Some(l) if l.vxlan.as_ref() == Some(&self.params) => {
                if self.index != l.index {
                    tracing::info!(device = %self.name, mac = %l.mac, "adopting existing VXLAN device");
                }
                self.index = l.index;
                self.mac = l.mac;
                let mut changed = self.ensure_no_ra(nl, false).await?;
                if l.mtu != self.mtu || !l.up {
                    nl.set_link_mtu_up(l.index, self.mtu).await?;
                    changed = true;
                }
                return Ok(changed);
            }
            Some(l) => {
                tracing::warn!(device = %self.name, have = ?l.vxlan, want = ?self.params, "existing device is incompatible; recreating it");
                nl.delete_link(l.index).await?;
            }
            None => {
                if self.index != 0 {
                    tracing::warn!(device = %self.name, "VXLAN device disappeared; recreating it");
                }
            }
        }
        self.index = nl
            .create_vxlan(&self.name, &self.params, self.mac, self.mtu)
            .await?;
        self.ensure_no_ra(nl, true).await?;
        nl.set_link_mtu_up(self.index, self.mtu).await?;
        tracing::info!(device = %self.name, index = self.index, mac = %self.mac, mtu = self.mtu, vni = self.params.vni, port = self.params.port, local = %self.params.local, "created VXLAN device");
        Ok(true)
    }

    /// `accept_ra=0` on the IPv6 device (`new`: just created, set without reading).
    async fn ensure_no_ra(&self, nl: &dyn Netlink, new: bool) -> Result<bool, BackendError> {
        if self.family != Family::V6 {
            return Ok(false);
        }
        if !new && nl.ipv6_conf(&self.name, Ipv6Conf::AcceptRa).await? == 0 {
            return Ok(false);
        }
        nl.set_ipv6_conf(&self.name, Ipv6Conf::AcceptRa, 0).await?;
        Ok(!new)
    }

    /// Device address = our subnet's network address /32 (/128); nothing else of the family
    /// (the kernel's IPv6 link-local address is left alone).
    async fn ensure_address(&self, nl: &dyn Netlink) -> Result<usize, BackendError> {
        let Some(own) = self.own else { return Ok(0) };
        Ok(ensure_subnet_address(nl, self.index, own).await?)
    }

    /// What we own of this family: entries on the device, routes on it, and (with
    /// DirectRouting) gateway routes on the external interface into the cluster network.
    async fn actual(
        &self,
        nl: &dyn Netlink,
        direct_routing: bool,
        ext: &ExternalInterface,
        peers: &PeerTable,
    ) -> Result<Actual, NetlinkError> {
        // DirectRouting routes sit on the external interface, where host-gw (running beside
        // us while the cluster switches) makes the same kind: we own only those to subnets of
        // no peer of another type, and none at all without DirectRouting.
        let others = peers.nets(self.family, "vxlan", false);
        let routes = nl
            .routes(self.family)
            .await?
            .into_iter()
            .filter(|r| Some(r.dst) != self.own)
            .filter(|r| {
                r.oif == self.index
                    || (direct_routing
                        && peer_gateway_route(r, ext, self.network, self.own, &others))
            })
            .collect();
        Ok(Actual {
            neighbours: nl.neighbours(self.index, self.family).await?,
            // The device's underlay is of its family: the kernel holds no other destinations.
            fdb: nl.fdb(self.index).await?,
            routes,
        })
    }

    async fn apply(&self, nl: &dyn Netlink, op: &Op) -> Result<(), NetlinkError> {
        let i = self.index;
        match op {
            Op::DelRoute(r) => nl.del_route(*r).await,
            Op::DelNeighbour(ip) => nl.del_neighbour(i, *ip).await,
            Op::DelFdb(e) => nl.del_fdb(i, *e).await,
            Op::SetNeighbour(n) => nl.set_neighbour(i, *n).await,
            Op::SetFdb(e) => nl.set_fdb(i, *e).await,
            Op::SetRoute(r) => nl.set_route(*r).await,
        }
    }

    fn lease_data(&self) -> Option<Value> {
        serde_json::to_value(VxlanLeaseData {
            vni: self.params.vni,
            vtep_mac: self.mac,
        })
        .ok()
    }
}

fn config_err(key: &str, msg: String) -> BackendError {
    BackendError::Config {
        key: key.into(),
        msg,
    }
}

/// The running vxlan backend: one device per enabled address family.
#[derive(Debug)]
pub struct VxlanBackend {
    nl: Arc<dyn Netlink>,
    cfg: VxlanConfig,
    ext: ExternalInterface,
    v4: Option<Vtep>,
    v6: Option<Vtep>,
    /// Pod MTU: the smallest device MTU.
    mtu: u32,
    peers: PeerTable,
    /// Problems of vxlan peers (bad BackendData, other VNI), logged once per change.
    peer_log: PeerLog,
}

impl VxlanBackend {
    /// Creates or adopts the devices (`flannel.<VNI>` when IPv4 is enabled,
    /// `flannel-v6.<VNI>` when IPv6 is). Adopting keeps a compatible device (and its MAC) so a
    /// restart does not interrupt traffic; an incompatible one is replaced.
    pub async fn new(cfg: VxlanConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        let ext = ctx.ext.clone();
        let params = |local: IpAddr| VxlanParams {
            vni: cfg.vni,
            port: cfg.port,
            local,
            link: ext.index,
            learning: false,
            gbp: cfg.gbp,
        };
        let v4 = match ctx.network {
            None => None,
            Some(network) => {
                let a = ext.v4.ok_or_else(|| {
                    config_err(
                        "Type",
                        format!(
                            "vxlan: IPv4 is enabled but interface {} has no IPv4 address",
                            ext.name
                        ),
                    )
                })?;
                Some(Vtep {
                    family: Family::V4,
                    name: cfg.device_name(),
                    params: params(IpAddr::V4(a.iface_ip)),
                    index: 0,
                    mac: stable_mac(&ctx.node_id, a.public_ip, cfg.vni),
                    mtu: cfg.mtu.unwrap_or(ext.mtu.saturating_sub(OVERHEAD_V4)),
                    own: None,
                    network: IpNet::V4(network),
                })
            }
        };
        let v6 = match ctx.network6 {
            None => None,
            Some(network) => {
                let a = ext.v6.ok_or_else(|| {
                    config_err(
                        "Type",
                        format!(
                            "vxlan: IPv6 is enabled but interface {} has no IPv6 address",
                            ext.name
                        ),
                    )
                })?;
                let name = cfg.device_name6();
                if name.len() > MAX_IFNAME {
                    return Err(config_err(
                        "VNI",
                        format!(
                            "{} with EnableIPv6: the IPv6 device name {name} is longer than the kernel's {MAX_IFNAME} characters (VNI 1 to 9999)",
                            cfg.vni
                        ),
                    ));
                }
                let limit = ext.mtu.saturating_sub(OVERHEAD_V6);
                let mtu = cfg.mtu.map_or(limit, |m| m.min(limit));
                if mtu < IPV6_MIN_MTU {
                    return Err(config_err(
                        "MTU",
                        format!(
                            "the IPv6 VXLAN device would get MTU {mtu} (interface {} MTU {} - {OVERHEAD_V6}), below IPv6's minimum of {IPV6_MIN_MTU}",
                            ext.name, ext.mtu
                        ),
                    ));
                }
                Some(Vtep {
                    family: Family::V6,
                    name,
                    params: params(IpAddr::V6(a.iface_ip)),
                    index: 0,
                    mac: stable_mac6(&ctx.node_id, a.public_ip, cfg.vni),
                    mtu,
                    own: None,
                    network: IpNet::V6(network),
                })
            }
        };
        let mtu = v4
            .iter()
            .chain(v6.iter())
            .map(|v| v.mtu)
            .min()
            .ok_or_else(|| {
                config_err(
                    "Type",
                    "vxlan: neither IPv4 nor IPv6 is enabled".to_string(),
                )
            })?;
        let mut b = VxlanBackend {
            nl: ctx.netlink.clone(),
            cfg,
            ext,
            v4,
            v6,
            mtu,
            peers: PeerTable::default(),
            peer_log: PeerLog::default(),
        };
        let nl = b.nl.clone();
        for v in b.vteps_mut() {
            v.ensure_device(nl.as_ref()).await?;
        }
        Ok(b)
    }

    fn vteps(&self) -> impl Iterator<Item = &Vtep> {
        self.v4.iter().chain(self.v6.iter())
    }

    fn vteps_mut(&mut self) -> impl Iterator<Item = &mut Vtep> {
        self.v4.iter_mut().chain(self.v6.iter_mut())
    }

    fn vtep(&self, family: Family) -> Option<&Vtep> {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }

    /// The index of the device of `family` (None: that family is not enabled).
    pub fn device_index(&self, family: Family) -> Option<u32> {
        self.vtep(family).map(|v| v.index)
    }

    /// The MAC of the device of `family`.
    pub fn vtep_mac(&self, family: Family) -> Option<Mac> {
        self.vtep(family).map(|v| v.mac)
    }

    /// The MTU of the device of `family`.
    pub fn device_mtu(&self, family: Family) -> Option<u32> {
        self.vtep(family).map(|v| v.mtu)
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    fn backend_type(&self) -> &'static str {
        "vxlan"
    }

    fn backend_data(&self) -> Option<Value> {
        self.v4.as_ref().and_then(Vtep::lease_data)
    }

    fn backend_v6_data(&self) -> Option<Value> {
        self.v6.as_ref().and_then(Vtep::lease_data)
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        if let Some(v) = self.v4.as_mut() {
            v.own = own.key.ipv4.map(IpNet::V4);
        }
        if let Some(v) = self.v6.as_mut() {
            v.own = own.key.ipv6.map(IpNet::V6);
        }
        self.peers.remove(&own.key);
        for v in self.vteps() {
            v.ensure_address(self.nl.as_ref()).await?;
        }
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let nl = self.nl.clone();
        let mut changes = 0;
        for v in self.vteps_mut() {
            changes += usize::from(v.ensure_device(nl.as_ref()).await?);
            changes += v.ensure_address(nl.as_ref()).await?;
        }
        let families: Vec<Family> = self.vteps().map(|v| v.family).collect();
        // Per family, one plan per peer (in the table's order).
        let plans: Vec<Vec<PeerPlan>> = families
            .iter()
            .map(|f| {
                self.peers
                    .leases()
                    .map(|l| peer_plan(l, &self.cfg, &self.ext, *f))
                    .collect()
            })
            .collect();
        // A peer of another type is not a problem here (the BackendSet runs its backend).
        let problems: Vec<(SubnetKey, Option<String>)> = self
            .peers
            .leases()
            .enumerate()
            .map(|(i, l)| {
                if l.attrs.data_plane() != "vxlan" {
                    return (l.key, None);
                }
                let mine: Vec<(Family, &PeerPlan)> = families
                    .iter()
                    .zip(&plans)
                    .filter_map(|(f, ps)| ps.get(i).map(|p| (*f, p)))
                    .collect();
                (l.key, peer_problem(&mine))
            })
            .collect();
        self.peer_log.log(
            "peer not routed by vxlan",
            std::time::Instant::now(),
            problems,
        );
        for (v, ps) in self.vteps().zip(&plans) {
            let want = desired(ps, v.index, &self.ext);
            let have = v
                .actual(nl.as_ref(), self.cfg.direct_routing, &self.ext, &self.peers)
                .await?;
            let ops = plan(&want, &have);
            for op in &ops {
                tracing::debug!(?op, device = %v.name, "vxlan");
                v.apply(nl.as_ref(), op).await?;
            }
            changes += ops.len();
        }
        Ok(changes)
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        let nl = self.nl.as_ref();
        let mut first: Option<BackendError> = None;
        for v in self.vteps() {
            let direct: Vec<Route> = v
                .actual(nl, self.cfg.direct_routing, &self.ext, &self.peers)
                .await
                .map(|a| a.routes.into_iter().filter(|r| r.oif != v.index).collect())
                .unwrap_or_default();
            // The device goes even when a direct route could not be removed (reported after).
            if let Err(e) = crate::netlink::del_routes(nl, direct).await {
                first.get_or_insert(e.into());
            }
            match nl.link_by_name(&v.name).await {
                Ok(Some(l)) => {
                    if let Err(e) = nl.delete_link(l.index).await {
                        first.get_or_insert(e.into());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    first.get_or_insert(e.into());
                }
            }
        }
        first.map_or(Ok(()), Err)
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
    use subnet_lease::LeaseAttrs;

    fn ext() -> ExternalInterface {
        crate::testing::ext(true, false)
    }

    fn opts(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    fn peer(subnet: &str, ip: [u8; 4], mac: &str) -> Lease {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::from(ip), "vxlan");
        attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac}));
        Lease {
            key: SubnetKey::parse(subnet).unwrap(),
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn options_and_defaults() {
        let (c, w) = VxlanConfig::parse(&opts("{}")).unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 1,
                port: 8472,
                gbp: false,
                direct_routing: false,
                mtu: None,
                fallback: None,
            }
        );
        assert!(w.is_empty());
        let (c, w) = VxlanConfig::parse(&opts(
            r#"{"VNI":42,"Port":4789,"GBP":true,"DirectRouting":true,"MTU":1400,"Bogus":1}"#,
        ))
        .unwrap();
        assert_eq!(
            (c.vni, c.port, c.gbp, c.direct_routing, c.mtu),
            (42, 4789, true, true, Some(1400))
        );
        assert_eq!(c.device_name(), "flannel.42");
        let (c, _) = VxlanConfig::parse(&opts(r#"{"fallback":"UDP"}"#)).unwrap();
        assert_eq!(c.fallback, Some("udp"));
        assert_eq!(w, vec!["Backend.Bogus: unknown vxlan option ignored"]);
        for (bad_opts, key) in [
            (r#"{"VNI":16777216}"#, "Backend.VNI"),
            (r#"{"Port":70000}"#, "Backend.Port"),
            (r#"{"GBP":"yes"}"#, "Backend.GBP"),
            (r#"{"MTU":20}"#, "Backend.MTU"),
            (r#"{"VNI":-1}"#, "Backend.VNI"),
            (r#"{"Fallback":"host-gw"}"#, "Backend.Fallback"),
            (r#"{"Fallback":1}"#, "Backend.Fallback"),
        ] {
            let e = VxlanConfig::parse(&opts(bad_opts)).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
    }

    #[test]
    fn mac_is_stable_unicast_and_local() {
        let a = stable_mac("machine-1", Ipv4Addr::new(10, 0, 0, 1), 1);
        assert_eq!(a, stable_mac("machine-1", Ipv4Addr::new(10, 0, 0, 1), 1));
        assert_ne!(a, stable_mac("machine-1", Ipv4Addr::new(10, 0, 0, 2), 1));
        assert_ne!(a, stable_mac("machine-2", Ipv4Addr::new(10, 0, 0, 1), 1));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered, unicast");
        // Pinned: a change here changes every node's MAC on upgrade.
        assert_eq!(
            stable_mac("m", Ipv4Addr::new(1, 2, 3, 4), 1)
                .to_string()
                .len(),
            17
        );
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn lease_data_is_flannels_json() {
        let d = VxlanLeaseData {
            vni: 1,
            vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#
        );
    }

    #[test]
    fn peer_classification() {
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let p = peer("10.5.2.0-24", [172, 30, 0, 12], "02:00:00:00:00:02");
        assert!(matches!(
            peer_plan(&p, &cfg, &ext(), Family::V4),
            PeerPlan::Tunnel { .. }
        ));
        let (direct, _) = VxlanConfig::parse(&opts(r#"{"DirectRouting":true}"#)).unwrap();
        assert!(matches!(
            peer_plan(&p, &direct, &ext(), Family::V4),
            PeerPlan::Direct { .. }
        ));
        let far = peer("10.5.3.0-24", [192, 168, 9, 9], "02:00:00:00:00:03");
        assert!(matches!(
            peer_plan(&far, &direct, &ext(), Family::V4),
            PeerPlan::Tunnel { .. }
        ));
        let mut udp = p.clone();
        udp.attrs.backend_type = "udp".into();
        assert!(
            matches!(peer_plan(&udp, &cfg, &ext(), Family::V4), PeerPlan::Ignored(w) if w.contains("udp"))
        );
        let mut bad = p.clone();
        bad.attrs.backend_data = Some(serde_json::json!({"VtepMAC": "zz"}));
        assert!(
            matches!(peer_plan(&bad, &cfg, &ext(), Family::V4), PeerPlan::Ignored(w) if w.contains("BackendData"))
        );
        let mut other_vni = p;
        other_vni.attrs.backend_data =
            Some(serde_json::json!({"VNI": 7, "VtepMAC": "02:00:00:00:00:02"}));
        assert!(matches!(
            peer_plan(&other_vni, &cfg, &ext(), Family::V4),
            PeerPlan::Ignored(_)
        ));
    }

    #[test]
    fn plan_orders_route_removal_first_and_route_addition_last() {
        let mac1: Mac = "02:00:00:00:00:01".parse().unwrap();
        let mac2: Mac = "02:00:00:00:00:02".parse().unwrap();
        let plans = vec![PeerPlan::Tunnel {
            subnet: "10.5.2.0/24".parse().unwrap(),
            mac: mac2,
            public_ip: Ipv4Addr::new(172, 30, 0, 12).into(),
        }];
        let want = desired(&plans, 9, &ext());
        let stale_route = Route {
            dst: "10.5.1.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 5, 1, 0).into()),
            oif: 9,
            onlink: true,
        };
        let actual = Actual {
            neighbours: vec![Neighbour {
                ip: Ipv4Addr::new(10, 5, 1, 0).into(),
                mac: mac1,
            }],
            fdb: vec![FdbEntry {
                mac: mac1,
                dst: Ipv4Addr::new(172, 30, 0, 13).into(),
            }],
            routes: vec![stale_route],
        };
        let ops = plan(&want, &actual);
        assert_eq!(ops.first(), Some(&Op::DelRoute(stale_route)));
        assert!(
            matches!(ops.last(), Some(Op::SetRoute(r)) if r.dst.to_string() == "10.5.2.0/24" && r.onlink)
        );
        assert_eq!(ops.len(), 6);
        // Already in place: nothing to do.
        let done = Actual {
            neighbours: vec![Neighbour {
                ip: Ipv4Addr::new(10, 5, 2, 0).into(),
                mac: mac2,
            }],
            fdb: vec![FdbEntry {
                mac: mac2,
                dst: Ipv4Addr::new(172, 30, 0, 12).into(),
            }],
            routes: want.routes.values().copied().collect(),
        };
        assert!(plan(&want, &done).is_empty());
    }

    fn ctx(nl: Arc<FakeNetlink>) -> BackendContext {
        crate::testing::ctx(nl, true, false)
    }

    #[tokio::test]
    async fn a_kernel_without_vxlan_is_a_clear_error_without_fallback() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        nl.lock().no_vxlan = true;
        let cfg = subnet_lease::BackendConfig {
            backend_type: "vxlan".into(),
            options: opts("{}"),
        };
        let e = crate::create(&cfg, &ctx(nl.clone())).await.unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("cannot make VXLAN devices") && e.contains("\"Fallback\": \"udp\""),
            "{e}"
        );
        // (With the option the factory builds the udp backend, a TUN device: covered by the
        // namespace tests' udp backend, not run here in the test process's own namespace.)
    }

    #[tokio::test]
    async fn programs_peers_adopts_device_and_repairs() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let mut b = VxlanBackend::new(cfg.clone(), &ctx(nl.clone()))
            .await
            .unwrap();
        assert_eq!(b.mtu(), 1450);
        let dev = b.device_index(Family::V4).unwrap();
        let own = peer("10.5.1.0-24", [172, 30, 0, 11], "02:00:00:00:00:01");
        b.set_lease(&own).await.unwrap();
        assert_eq!(
            nl.lock().addrs[&dev],
            vec!["10.5.1.0/32".parse::<IpNet>().unwrap()]
        );
        let p2 = peer("10.5.2.0-24", [172, 30, 0, 12], "02:00:00:00:00:02");
        b.peer_event(&Event::PeerAdded(p2.clone()));
        assert_eq!(b.reconcile().await.unwrap(), 3);
        assert_eq!(b.reconcile().await.unwrap(), 0, "idempotent");
        {
            let s = nl.lock();
            assert_eq!(s.routes.len(), 1);
            assert_eq!(s.neighs[&dev].len(), 1);
            assert_eq!(s.fdb[&dev][0].dst, Ipv4Addr::new(172, 30, 0, 12));
        }
        // A peer changes its PublicIP: FDB follows.
        let moved = peer("10.5.2.0-24", [172, 30, 0, 99], "02:00:00:00:00:02");
        b.peer_event(&Event::PeerAdded(moved));
        assert_eq!(b.reconcile().await.unwrap(), 2);
        assert_eq!(
            nl.lock().fdb[&dev],
            vec![FdbEntry {
                mac: "02:00:00:00:00:02".parse().unwrap(),
                dst: Ipv4Addr::new(172, 30, 0, 99).into()
            }]
        );
        // Restart: a new backend adopts the device (no delete/create) and keeps the MAC.
        let mac = b.vtep_mac(Family::V4).unwrap();
        nl.lock().calls.clear();
        let b2 = VxlanBackend::new(cfg.clone(), &ctx(nl.clone()))
            .await
            .unwrap();
        assert_eq!(
            (b2.device_index(Family::V4), b2.vtep_mac(Family::V4)),
            (Some(dev), Some(mac))
        );
        assert_eq!(
            b2.device_index(Family::V6),
            None,
            "IPv4 only: no IPv6 device"
        );
        assert_eq!(b2.backend_v6_data(), None);
        assert!(nl.lock().calls.is_empty(), "{:?}", nl.lock().calls);
        // Someone deletes the device: the next reconcile recreates and reprograms it.
        nl.delete_link(dev).await.unwrap();
        assert!(b.reconcile().await.unwrap() >= 5);
        {
            let s = nl.lock();
            let l = s.links.values().find(|l| l.name == "flannel.1").unwrap();
            assert_eq!(l.mac, mac);
            assert_eq!(s.routes.len(), 1);
        }
        // The peer leaves: its entries go.
        b.peer_event(&Event::PeerRemoved(p2));
        b.reconcile().await.unwrap();
        let s = nl.lock();
        assert!(s.routes.is_empty());
        assert!(s.fdb.values().all(|v| v.is_empty()) && s.neighs.values().all(|v| v.is_empty()));
    }

    #[tokio::test]
    async fn incompatible_device_is_replaced() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let mut other = VxlanParams {
            vni: 1,
            port: 4789,
            local: Ipv4Addr::new(172, 30, 0, 11).into(),
            link: 2,
            learning: true,
            gbp: false,
        };
        nl.create_vxlan("flannel.1", &other, Mac([2, 9, 9, 9, 9, 9]), 1450)
            .await
            .unwrap();
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let b = VxlanBackend::new(cfg, &ctx(nl.clone())).await.unwrap();
        let s = nl.lock();
        let l = s.links.values().find(|l| l.name == "flannel.1").unwrap();
        other.port = 8472;
        other.learning = false;
        assert_eq!(l.vxlan.as_ref(), Some(&other));
        assert_eq!(Some(l.index), b.device_index(Family::V4));
        assert!(s.calls.iter().any(|c| c.starts_with("delete_link")));
    }

    // ---- IPv6 and dual stack ----

    const MAC4: &str = "02:00:00:00:00:02";
    const MAC6: &str = "02:00:00:00:06:02";

    /// A peer lease as flannel's vxlan writes it: `key` in flannel's form, BackendData when
    /// it has an IPv4 subnet, PublicIPv6 and BackendV6Data when it has an IPv6 one.
    fn peer6(key: &str, last: u8) -> Lease {
        let key = SubnetKey::parse(key).unwrap();
        let v4 = key
            .ipv4
            .map_or(Ipv4Addr::UNSPECIFIED, |_| Ipv4Addr::new(172, 30, 0, last));
        let mut attrs = LeaseAttrs::new(v4, "vxlan");
        if key.ipv4.is_some() {
            attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": MAC4}));
        }
        if key.ipv6.is_some() {
            attrs.public_ipv6 = Some(format!("fd00:210::{last}").parse().unwrap());
            attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": MAC6}));
        }
        Lease {
            key,
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_mac_is_stable_and_differs_from_the_ipv4_one() {
        let v6: Ipv6Addr = "fd00:210::11".parse().unwrap();
        let a = stable_mac6("machine-1", v6, 1);
        assert_eq!(a, stable_mac6("machine-1", v6, 1));
        assert_ne!(a, stable_mac6("machine-1", v6, 2));
        assert_ne!(a, stable_mac6("machine-2", v6, 1));
        assert_ne!(a, stable_mac("machine-1", Ipv4Addr::new(172, 30, 0, 11), 1));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered, unicast");
    }

    #[test]
    fn ipv6_peers_are_planned_from_their_v6_fields_only() {
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let (direct, _) = VxlanConfig::parse(&opts(r#"{"DirectRouting":true}"#)).unwrap();
        let e = crate::testing::ext(true, true);
        let p = peer6("10.5.2.0-24&fd10:0:0:12::-64", 12);
        assert_eq!(
            peer_plan(&p, &cfg, &e, Family::V6),
            PeerPlan::Tunnel {
                subnet: net("fd10:0:0:12::/64"),
                mac: mac(MAC6),
                public_ip: ip("fd00:210::12"),
            }
        );
        assert_eq!(
            peer_plan(&p, &cfg, &e, Family::V4),
            PeerPlan::Tunnel {
                subnet: net("10.5.2.0/24"),
                mac: mac(MAC4),
                public_ip: ip("172.30.0.12"),
            }
        );
        // DirectRouting: the peer's PublicIPv6 is inside our interface's IPv6 prefix.
        assert_eq!(
            peer_plan(&p, &direct, &e, Family::V6),
            PeerPlan::Direct {
                subnet: net("fd10:0:0:12::/64"),
                public_ip: ip("fd00:210::12"),
            }
        );
        let mut far = p.clone();
        far.attrs.public_ipv6 = Some("fd00:999::12".parse().unwrap());
        assert!(matches!(
            peer_plan(&far, &direct, &e, Family::V6),
            PeerPlan::Tunnel { .. }
        ));
        // No BackendV6Data: only IPv6 is ignored (flannel drops the whole lease).
        let mut no_v6 = p.clone();
        no_v6.attrs.backend_v6_data = None;
        assert_eq!(
            peer_plan(&no_v6, &cfg, &e, Family::V6),
            PeerPlan::Ignored("no BackendV6Data".into())
        );
        assert!(matches!(
            peer_plan(&no_v6, &cfg, &e, Family::V4),
            PeerPlan::Tunnel { .. }
        ));
        // BackendV6Data with "PublicIPv6": null (flannel's event loop hangs on it).
        let mut null = p.clone();
        null.attrs.public_ipv6 = None;
        assert_eq!(
            peer_plan(&null, &cfg, &e, Family::V6),
            PeerPlan::Ignored("PublicIPv6 is null".into())
        );
        let mut unspecified = p.clone();
        unspecified.attrs.public_ipv6 = Some(std::net::Ipv6Addr::UNSPECIFIED);
        assert!(matches!(
            peer_plan(&unspecified, &cfg, &e, Family::V6),
            PeerPlan::Ignored(w) if w.contains("tunnel endpoint")
        ));
        let mut bad = p.clone();
        bad.attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": "nope"}));
        assert!(matches!(
            peer_plan(&bad, &cfg, &e, Family::V6),
            PeerPlan::Ignored(w) if w.starts_with("bad BackendV6Data")
        ));
        let mut other_vni = p.clone();
        other_vni.attrs.backend_v6_data = Some(serde_json::json!({"VNI": 7, "VtepMAC": MAC6}));
        assert!(matches!(
            peer_plan(&other_vni, &cfg, &e, Family::V6),
            PeerPlan::Ignored(w) if w.contains("VNI 7")
        ));
        // An IPv4-only peer has nothing for IPv6; an IPv6-only one nothing for IPv4.
        let v4_only = peer6("10.5.3.0-24", 13);
        assert_eq!(
            peer_plan(&v4_only, &cfg, &e, Family::V6),
            PeerPlan::Ignored("no IPv6 subnet".into())
        );
        let v6_only = peer6("0.0.0.0-0&fd10:0:0:14::-64", 14);
        assert!(matches!(
            peer_plan(&v6_only, &cfg, &e, Family::V4),
            PeerPlan::Ignored(_)
        ));
        assert!(matches!(
            peer_plan(&v6_only, &cfg, &e, Family::V6),
            PeerPlan::Tunnel { .. }
        ));
    }

    #[test]
    fn peer_problems_name_the_family_in_dual_stack() {
        let ok = PeerPlan::Direct {
            subnet: net("10.5.2.0/24"),
            public_ip: ip("172.30.0.12"),
        };
        let no6 = PeerPlan::Ignored("no BackendV6Data".into());
        assert_eq!(peer_problem(&[(Family::V4, &ok), (Family::V6, &ok)]), None);
        assert_eq!(
            peer_problem(&[(Family::V4, &ok), (Family::V6, &no6)]),
            Some("IPv6: no BackendV6Data".into())
        );
        // One family: the message as it always was.
        assert_eq!(
            peer_problem(&[(Family::V6, &no6)]),
            Some("no BackendV6Data".into())
        );
    }

    #[test]
    fn ipv6_desired_state_is_flannels() {
        let e = crate::testing::ext(true, true);
        let plans = vec![
            PeerPlan::Tunnel {
                subnet: net("fd10:0:0:12::/64"),
                mac: mac(MAC6),
                public_ip: ip("fd00:210::12"),
            },
            PeerPlan::Direct {
                subnet: net("fd10:0:0:13::/64"),
                public_ip: ip("fd00:210::13"),
            },
            PeerPlan::Ignored("x".into()),
        ];
        let d = desired(&plans, 9, &e);
        assert_eq!(
            d.neighbours,
            BTreeMap::from([(ip("fd10:0:0:12::"), mac(MAC6))])
        );
        assert_eq!(
            d.fdb,
            BTreeSet::from([FdbEntry {
                mac: mac(MAC6),
                dst: ip("fd00:210::12")
            }])
        );
        assert_eq!(
            d.routes.values().copied().collect::<Vec<_>>(),
            vec![
                Route {
                    dst: net("fd10:0:0:12::/64"),
                    gateway: Some(ip("fd10:0:0:12::")),
                    oif: 9,
                    onlink: true,
                },
                Route {
                    dst: net("fd10:0:0:13::/64"),
                    gateway: Some(ip("fd00:210::13")),
                    oif: 2,
                    onlink: false,
                },
            ]
        );
    }

    fn dev_of(nl: &FakeNetlink, name: &str) -> Option<crate::netlink::Link> {
        nl.lock().links.values().find(|l| l.name == name).cloned()
    }

    #[tokio::test]
    async fn devices_mtu_and_lease_data_per_family() {
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        // Dual stack: both devices, pods get the IPv6 device's MTU (iface - 70).
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let b = VxlanBackend::new(cfg.clone(), &crate::testing::ctx(nl.clone(), true, true))
            .await
            .unwrap();
        assert_eq!(b.mtu(), 1430);
        assert_eq!(b.device_mtu(Family::V4), Some(1450));
        assert_eq!(b.device_mtu(Family::V6), Some(1430));
        let v4 = dev_of(&nl, "flannel.1").unwrap();
        let v6 = dev_of(&nl, "flannel-v6.1").unwrap();
        assert_eq!(
            v6.vxlan,
            Some(VxlanParams {
                vni: 1,
                port: 8472,
                local: ip("fd00:210::11"),
                link: 2,
                learning: false,
                gbp: false,
            })
        );
        assert_eq!((v6.mtu, v6.up, v4.mtu), (1430, true, 1450));
        assert_ne!(v4.mac, v6.mac, "two MACs, as flannel's two devices");
        assert_eq!(
            v6.mac,
            stable_mac6("machine-1", "fd00:210::11".parse().unwrap(), 1)
        );
        assert_eq!(
            b.backend_data(),
            Some(serde_json::json!({"VNI": 1, "VtepMAC": v4.mac.to_string()}))
        );
        assert_eq!(
            b.backend_v6_data(),
            Some(serde_json::json!({"VNI": 1, "VtepMAC": v6.mac.to_string()}))
        );
        assert_eq!(
            serde_json::to_string(&b.backend_v6_data()).unwrap(),
            format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, v6.mac)
        );
        // accept_ra=0 is set between creation and up.
        let calls = nl.lock().calls.clone();
        let at = |c: &str| calls.iter().position(|x| x.starts_with(c)).unwrap();
        assert!(
            at("create_vxlan flannel-v6.1") < at("set_ipv6_conf flannel-v6.1 accept_ra 0")
                && at("set_ipv6_conf flannel-v6.1 accept_ra 0")
                    < at(&format!("set_link {} mtu 1430 up", v6.index)),
            "{calls:?}"
        );
        assert_eq!(
            nl.ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa)
                .await
                .unwrap(),
            0
        );

        // IPv6 only: no IPv4 device, no BackendData.
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let b = VxlanBackend::new(cfg.clone(), &crate::testing::ctx(nl.clone(), false, true))
            .await
            .unwrap();
        assert_eq!(b.mtu(), 1430);
        assert!(dev_of(&nl, "flannel.1").is_none());
        assert!(dev_of(&nl, "flannel-v6.1").is_some());
        assert_eq!(b.backend_data(), None);
        assert!(b.backend_v6_data().is_some());

        // IPv4 only: as before.
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let b = VxlanBackend::new(cfg.clone(), &crate::testing::ctx(nl.clone(), true, false))
            .await
            .unwrap();
        assert_eq!(b.mtu(), 1450);
        assert!(dev_of(&nl, "flannel-v6.1").is_none());
        assert_eq!(b.backend_v6_data(), None);

        // An MTU option lowers both devices; above the IPv6 limit it only sets the IPv4 one.
        for (opt, v4, v6, pods) in [(1400, 1400, 1400, 1400), (1480, 1480, 1430, 1430)] {
            let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
            let (c, _) = VxlanConfig::parse(&opts(&format!(r#"{{"MTU":{opt}}}"#))).unwrap();
            let b = VxlanBackend::new(c, &crate::testing::ctx(nl, true, true))
                .await
                .unwrap();
            assert_eq!(
                (b.device_mtu(Family::V4), b.device_mtu(Family::V6), b.mtu()),
                (Some(v4), Some(v6), pods),
                "MTU {opt}"
            );
        }
    }

    #[tokio::test]
    async fn ipv6_configuration_errors_are_clear() {
        let nl = || Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        // IPv6 enabled, the interface has no IPv6 address.
        let mut c = crate::testing::ctx(nl(), true, true);
        c.ext.v6 = None;
        let e = VxlanBackend::new(cfg.clone(), &c).await.unwrap_err();
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
        // flannel-v6.<VNI> must fit IFNAMSIZ.
        let (big, _) = VxlanConfig::parse(&opts(r#"{"VNI":10000}"#)).unwrap();
        let e = VxlanBackend::new(big.clone(), &crate::testing::ctx(nl(), true, true))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("Backend.VNI: 10000"), "{e}");
        VxlanBackend::new(big, &crate::testing::ctx(nl(), true, false))
            .await
            .unwrap();
        let (ok, _) = VxlanConfig::parse(&opts(r#"{"VNI":9999}"#)).unwrap();
        VxlanBackend::new(ok, &crate::testing::ctx(nl(), true, true))
            .await
            .unwrap();
        // An interface too small for IPv6 inside VXLAN over IPv6.
        let mut c = crate::testing::ctx(nl(), true, true);
        c.ext.mtu = 1340;
        let e = VxlanBackend::new(cfg.clone(), &c).await.unwrap_err();
        assert!(
            e.to_string().starts_with("Backend.MTU") && e.to_string().contains("1270"),
            "{e}"
        );
        // (The udp fallback carries IPv6 since package F: it is no longer refused with
        // EnableIPv6; it builds a real TUN, so it is not exercised here.)
    }

    #[tokio::test]
    async fn dual_stack_peers_are_programmed_per_family_and_adopted() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let ctx = crate::testing::ctx(nl.clone(), true, true);
        let mut b = VxlanBackend::new(cfg.clone(), &ctx).await.unwrap();
        let (d4, d6) = (
            b.device_index(Family::V4).unwrap(),
            b.device_index(Family::V6).unwrap(),
        );
        // The kernel's link-local address on the IPv6 device is never touched.
        nl.lock().addrs.insert(d6, vec![net("fe80::1/64")]);
        let own = peer6("10.5.1.0-24&fd10:0:0:11::-64", 11);
        b.set_lease(&own).await.unwrap();
        assert_eq!(nl.lock().addrs[&d4], vec![net("10.5.1.0/32")]);
        assert_eq!(
            nl.lock().addrs[&d6],
            vec![net("fe80::1/64"), net("fd10:0:0:11::/128")]
        );
        let p2 = peer6("10.5.2.0-24&fd10:0:0:12::-64", 12);
        b.peer_event(&Event::PeerAdded(p2.clone()));
        assert_eq!(b.reconcile().await.unwrap(), 6);
        assert_eq!(b.reconcile().await.unwrap(), 0, "idempotent");
        {
            let s = nl.lock();
            assert_eq!(
                s.neighs[&d6],
                vec![Neighbour {
                    ip: ip("fd10:0:0:12::"),
                    mac: mac(MAC6)
                }]
            );
            assert_eq!(
                s.fdb[&d6],
                vec![FdbEntry {
                    mac: mac(MAC6),
                    dst: ip("fd00:210::12")
                }]
            );
            assert_eq!(s.fdb[&d4][0].dst, ip("172.30.0.12"));
            let mut routes = s.routes.clone();
            routes.sort();
            assert_eq!(
                routes,
                vec![
                    Route {
                        dst: net("10.5.2.0/24"),
                        gateway: Some(ip("10.5.2.0")),
                        oif: d4,
                        onlink: true,
                    },
                    Route {
                        dst: net("fd10:0:0:12::/64"),
                        gateway: Some(ip("fd10:0:0:12::")),
                        oif: d6,
                        onlink: true,
                    },
                ]
            );
            assert_eq!(s.addrs[&d6][0], net("fe80::1/64"), "link-local kept");
        }
        // The route goes first and comes last (IPv6 as IPv4).
        nl.lock().calls.clear();
        b.peer_event(&Event::PeerRemoved(p2.clone()));
        assert_eq!(b.reconcile().await.unwrap(), 6);
        b.peer_event(&Event::PeerAdded(p2.clone()));
        assert_eq!(b.reconcile().await.unwrap(), 6);
        {
            let calls = nl.lock().calls.clone();
            let v6: Vec<&String> = calls.iter().filter(|c| c.contains(" fd")).collect();
            assert!(v6[0].starts_with("del_route fd10:0:0:12::/64"), "{v6:?}");
            assert!(v6[5].starts_with("set_route fd10:0:0:12::/64"), "{v6:?}");
            assert_eq!(v6.len(), 6, "{v6:?}");
        }

        // The peer's lease loses BackendV6Data: its IPv6 entries go, its IPv4 ones stay.
        let mut no_v6 = p2.clone();
        no_v6.attrs.backend_v6_data = None;
        b.peer_event(&Event::PeerAdded(no_v6));
        assert_eq!(b.reconcile().await.unwrap(), 3);
        {
            let s = nl.lock();
            assert!(s.routes.iter().all(|r| r.oif == d4), "{:?}", s.routes);
            assert_eq!(s.routes.len(), 1);
            assert!(s.neighs[&d6].is_empty() && s.fdb[&d6].is_empty());
            assert_eq!(s.neighs[&d4].len(), 1);
        }
        // "PublicIPv6": null with BackendV6Data: the same, no panic, no hang.
        let mut null = p2.clone();
        null.attrs.public_ipv6 = None;
        b.peer_event(&Event::PeerAdded(null));
        assert_eq!(b.reconcile().await.unwrap(), 0);
        b.peer_event(&Event::PeerAdded(p2.clone()));
        assert_eq!(b.reconcile().await.unwrap(), 3);

        // Someone turns router advertisements back on: repaired.
        nl.set_ipv6_conf("flannel-v6.1", Ipv6Conf::AcceptRa, 1)
            .await
            .unwrap();
        assert_eq!(b.reconcile().await.unwrap(), 1);

        // Restart: a new backend adopts both devices (no delete/create, same MACs) and finds
        // nothing to do.
        nl.lock().calls.clear();
        let mut b2 = VxlanBackend::new(cfg.clone(), &ctx).await.unwrap();
        b2.set_lease(&own).await.unwrap();
        b2.peer_event(&Event::PeerAdded(p2.clone()));
        assert_eq!(b2.reconcile().await.unwrap(), 0);
        assert_eq!(
            (b2.device_index(Family::V4), b2.device_index(Family::V6)),
            (Some(d4), Some(d6))
        );
        assert_eq!(b2.backend_v6_data(), b.backend_v6_data());
        assert!(nl.lock().calls.is_empty(), "{:?}", nl.lock().calls);

        // The IPv6 device is deleted behind our back: recreated and reprogrammed, IPv4 intact.
        nl.delete_link(d6).await.unwrap();
        assert!(b2.reconcile().await.unwrap() >= 4);
        let d6b = b2.device_index(Family::V6).unwrap();
        assert_ne!(d6b, d6);
        assert_eq!(nl.lock().neighs[&d6b].len(), 1);
        assert_eq!(nl.lock().routes.len(), 2);

        // Teardown: both devices and every route go.
        b2.teardown().await.unwrap();
        let s = nl.lock();
        assert!(s.links.values().all(|l| l.vxlan.is_none()), "{:?}", s.links);
        assert!(s.routes.is_empty());
    }

    #[tokio::test]
    async fn ipv6_only_node_and_peers() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (cfg, _) = VxlanConfig::parse(&opts("{}")).unwrap();
        let mut b = VxlanBackend::new(cfg, &crate::testing::ctx(nl.clone(), false, true))
            .await
            .unwrap();
        assert_eq!(b.device_index(Family::V4), None);
        let d6 = b.device_index(Family::V6).unwrap();
        b.set_lease(&peer6("0.0.0.0-0&fd10:0:0:11::-64", 11))
            .await
            .unwrap();
        b.peer_event(&Event::PeerAdded(peer6("0.0.0.0-0&fd10:0:0:12::-64", 12)));
        assert_eq!(b.reconcile().await.unwrap(), 3);
        assert_eq!(b.reconcile().await.unwrap(), 0);
        let s = nl.lock();
        assert_eq!(s.addrs[&d6], vec![net("fd10:0:0:11::/128")]);
        assert_eq!(
            s.routes,
            vec![Route {
                dst: net("fd10:0:0:12::/64"),
                gateway: Some(ip("fd10:0:0:12::")),
                oif: d6,
                onlink: true,
            }]
        );
        assert!(!s.links.values().any(|l| l.name == "flannel.1"));
    }

    #[tokio::test]
    async fn ipv6_direct_routing_uses_the_peer_address_on_our_segment() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (cfg, _) = VxlanConfig::parse(&opts(r#"{"DirectRouting":true}"#)).unwrap();
        let mut b = VxlanBackend::new(cfg, &crate::testing::ctx(nl.clone(), true, true))
            .await
            .unwrap();
        let d6 = b.device_index(Family::V6).unwrap();
        b.set_lease(&peer6("10.5.1.0-24&fd10:0:0:11::-64", 11))
            .await
            .unwrap();
        b.peer_event(&Event::PeerAdded(peer6("10.5.2.0-24&fd10:0:0:12::-64", 12)));
        // Off our IPv6 segment: tunnelled.
        let mut far = peer6("10.5.3.0-24&fd10:0:0:13::-64", 13);
        far.attrs.public_ipv6 = Some("fd00:999::13".parse().unwrap());
        b.peer_event(&Event::PeerAdded(far));
        // A host-gw peer's IPv6 route on eth0 (a host-gw backend beside us) is not ours.
        let hostgw = Route {
            dst: net("fd10:0:0:19::/64"),
            gateway: Some(ip("fd00:210::19")),
            oif: 2,
            onlink: false,
        };
        nl.set_route(hostgw).await.unwrap();
        let mut hg = peer6("10.5.9.0-24&fd10:0:0:19::-64", 19);
        hg.attrs.backend_type = "host-gw".into();
        b.peer_event(&Event::PeerAdded(hg));
        b.reconcile().await.unwrap();
        assert_eq!(b.reconcile().await.unwrap(), 0);
        let v6: Vec<Route> = nl.routes(Family::V6).await.unwrap();
        assert!(v6.contains(&Route {
            dst: net("fd10:0:0:12::/64"),
            gateway: Some(ip("fd00:210::12")),
            oif: 2,
            onlink: false,
        }));
        assert!(v6.contains(&Route {
            dst: net("fd10:0:0:13::/64"),
            gateway: Some(ip("fd10:0:0:13::")),
            oif: d6,
            onlink: true,
        }));
        assert!(v6.contains(&hostgw));
        assert_eq!(v6.len(), 3, "{v6:?}");
        // Teardown removes our direct routes of both families, not host-gw's.
        b.teardown().await.unwrap();
        assert_eq!(nl.routes(Family::V6).await.unwrap(), vec![hostgw]);
        assert!(nl.routes(Family::V4).await.unwrap().is_empty());
    }
}
