//! `vxlan`: the kernel VXLAN device `flannel.<VNI>`, programmed like flannel's backend.
//!
//! Per peer lease of type vxlan: neighbour `<peer subnet .0> lladdr <VtepMAC> permanent`, FDB
//! `<VtepMAC> dst <PublicIP> self permanent`, route `<peer subnet> via <peer .0> dev flannel.N
//! onlink` (routes are removed first and added last). With `DirectRouting`, a peer whose
//! PublicIP is on our interface's subnet gets `<peer subnet> via <PublicIP>` on that interface.
//! [`plan`] is the pure diff; [`VxlanBackend::reconcile`] reads the kernel and applies it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{
    ensure_subnet_address, Family, FdbEntry, Mac, Neighbour, Netlink, NetlinkError, Route,
    VxlanParams,
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

    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// A vxlan lease's BackendData.
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

/// The VTEP MAC for a node: a locally administered unicast address derived from the machine
/// id, the published IP and the VNI, so it survives daemon restarts and reboots.
pub fn stable_mac(node_id: &str, public_ip: Ipv4Addr, vni: u32) -> Mac {
    let h = fnv1a(format!("flannel-vtep/{node_id}/{public_ip}/{vni}").as_bytes()).to_be_bytes();
    Mac([(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]])
}

/// The kernel state a set of peers needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub neighbours: BTreeMap<IpAddr, Mac>,
    pub fdb: BTreeSet<FdbEntry>,
    pub routes: BTreeMap<IpNet, Route>,
}

/// What a peer lease means for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPlan {
    Tunnel {
        subnet: Ipv4Net,
        mac: Mac,
        public_ip: Ipv4Addr,
    },
    Direct {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
    },
    Ignored(String),
}

/// Classifies one peer lease (pure).
pub fn peer_plan(lease: &Lease, cfg: &VxlanConfig, ext: &ExternalInterface) -> PeerPlan {
    if lease.attrs.data_plane() != "vxlan" {
        return PeerPlan::Ignored(format!(
            "backend type {:?}, not vxlan",
            lease.attrs.backend_type
        ));
    }
    let data: VxlanLeaseData = match lease.attrs.backend_data.clone().map(serde_json::from_value) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return PeerPlan::Ignored(format!("bad BackendData: {e}")),
        None => return PeerPlan::Ignored("no BackendData".into()),
    };
    if data.vni != 0 && data.vni != cfg.vni {
        return PeerPlan::Ignored(format!("VNI {} differs from ours ({})", data.vni, cfg.vni));
    }
    let Some(subnet) = lease.key.ipv4 else {
        return PeerPlan::Ignored("no IPv4 subnet".into());
    };
    let public_ip = lease.attrs.public_ip;
    if cfg.direct_routing && ext.network().contains(&public_ip) {
        return PeerPlan::Direct { subnet, public_ip };
    }
    PeerPlan::Tunnel {
        subnet,
        mac: data.vtep_mac,
        public_ip,
    }
}

/// The desired kernel state for all peers (pure).
pub fn desired(plans: &[PeerPlan], dev: u32, ext: &ExternalInterface) -> Desired {
    let mut d = Desired::default();
    for p in plans {
        match *p {
            PeerPlan::Tunnel {
                subnet,
                mac,
                public_ip,
            } => {
                let gw = IpAddr::V4(subnet.network());
                d.neighbours.insert(gw, mac);
                d.fdb.insert(FdbEntry {
                    mac,
                    dst: IpAddr::V4(public_ip),
                });
                d.routes.insert(
                    IpNet::V4(subnet),
                    Route {
                        dst: IpNet::V4(subnet),
                        gateway: Some(gw),
                        oif: dev,
                        onlink: true,
                    },
                );
            }
            PeerPlan::Direct { subnet, public_ip } => {
                d.routes.insert(
                    IpNet::V4(subnet),
                    Route {
                        dst: IpNet::V4(subnet),
                        gateway: Some(IpAddr::V4(public_ip)),
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

/// The kernel state we manage, as read.
#[derive(Debug, Clone, Default)]
pub struct Actual {
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    /// Routes we own: on the VXLAN device, or direct routes into the cluster Network.
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

/// The running vxlan backend.
#[derive(Debug)]
pub struct VxlanBackend {
    nl: Arc<dyn Netlink>,
    cfg: VxlanConfig,
    ext: ExternalInterface,
    network: Ipv4Net,
    name: String,
    index: u32,
    mac: Mac,
    mtu: u32,
    own: Option<Ipv4Net>,
    peers: PeerTable,
    /// Problems of vxlan peers (bad BackendData, other VNI), logged once per change.
    peer_log: PeerLog,
}

impl VxlanBackend {
    /// Creates or adopts the device. Adopting keeps a compatible device (and its MAC) so a
    /// restart does not interrupt traffic; an incompatible one is replaced.
    pub async fn new(cfg: VxlanConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        let ext = ctx.ext.clone();
        let mtu = cfg.mtu.unwrap_or(ext.mtu.saturating_sub(OVERHEAD_V4));
        let mut b = VxlanBackend {
            nl: ctx.netlink.clone(),
            name: cfg.device_name(),
            mac: stable_mac(&ctx.node_id, ext.public_ip, cfg.vni),
            cfg,
            ext,
            network: ctx.network,
            index: 0,
            mtu,
            own: None,
            peers: PeerTable::default(),
            peer_log: PeerLog::default(),
        };
        b.ensure_device().await?;
        Ok(b)
    }

    fn params(&self) -> VxlanParams {
        VxlanParams {
            vni: self.cfg.vni,
            port: self.cfg.port,
            local: IpAddr::V4(self.ext.iface_ip),
            link: self.ext.index,
            learning: false,
            gbp: self.cfg.gbp,
        }
    }

    pub fn device_index(&self) -> u32 {
        self.index
    }

    pub fn vtep_mac(&self) -> Mac {
        self.mac
    }

    /// Makes sure the device exists with our parameters, MTU, up. Returns true if it changed
    /// anything.
    async fn ensure_device(&mut self) -> Result<bool, BackendError> {
        let want = self.params();
        match self.nl.link_by_name(&self.name).await? {
            Some(l) if l.vxlan.as_ref() == Some(&want) => {
                if self.index != l.index {
                    tracing::info!(device = %self.name, mac = %l.mac, "adopting existing VXLAN device");
                }
                self.index = l.index;
                self.mac = l.mac;
                if l.mtu != self.mtu || !l.up {
                    self.nl.set_link_mtu_up(l.index, self.mtu).await?;
                    return Ok(true);
                }
                return Ok(false);
            }
            Some(l) => {
                tracing::warn!(device = %self.name, have = ?l.vxlan, want = ?want, "existing device is incompatible; recreating it");
                self.nl.delete_link(l.index).await?;
            }
            None => {
                if self.index != 0 {
                    tracing::warn!(device = %self.name, "VXLAN device disappeared; recreating it");
                }
            }
        }
        self.index = self
            .nl
            .create_vxlan(&self.name, &want, self.mac, self.mtu)
            .await?;
        self.nl.set_link_mtu_up(self.index, self.mtu).await?;
        tracing::info!(device = %self.name, index = self.index, mac = %self.mac, mtu = self.mtu, vni = want.vni, port = want.port, "created VXLAN device");
        Ok(true)
    }

    /// Device address = our subnet's network address /32; nothing else.
    async fn ensure_address(&mut self) -> Result<usize, BackendError> {
        let Some(own) = self.own else { return Ok(0) };
        Ok(ensure_subnet_address(self.nl.as_ref(), self.index, IpNet::V4(own)).await?)
    }

    async fn actual(&self) -> Result<Actual, NetlinkError> {
        let own = self.own;
        let own_dst = own.map(IpNet::V4);
        // DirectRouting routes sit on the external interface, where host-gw (running beside
        // us while the cluster switches) makes the same kind: we own only those to subnets of
        // no peer of another type, and none at all without DirectRouting.
        let others = self.peers.subnets("vxlan", false);
        let routes = self
            .nl
            .routes(Family::V4)
            .await?
            .into_iter()
            .filter(|r| Some(r.dst) != own_dst)
            .filter(|r| {
                r.oif == self.index
                    || (self.cfg.direct_routing
                        && peer_gateway_route(r, &self.ext, self.network, own, &others))
            })
            .collect();
        Ok(Actual {
            neighbours: self.nl.neighbours(self.index, Family::V4).await?,
            // The device's underlay is IPv4: the kernel holds no other destinations on it.
            fdb: self.nl.fdb(self.index).await?,
            routes,
        })
    }

    async fn apply(&self, op: &Op) -> Result<(), NetlinkError> {
        let i = self.index;
        match op {
            Op::DelRoute(r) => self.nl.del_route(*r).await,
            Op::DelNeighbour(ip) => self.nl.del_neighbour(i, *ip).await,
            Op::DelFdb(e) => self.nl.del_fdb(i, *e).await,
            Op::SetNeighbour(n) => self.nl.set_neighbour(i, *n).await,
            Op::SetFdb(e) => self.nl.set_fdb(i, *e).await,
            Op::SetRoute(r) => self.nl.set_route(*r).await,
        }
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    fn backend_type(&self) -> &'static str {
        "vxlan"
    }

    fn backend_data(&self) -> Option<Value> {
        serde_json::to_value(VxlanLeaseData {
            vni: self.cfg.vni,
            vtep_mac: self.mac,
        })
        .ok()
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = own.key.ipv4;
        self.peers.remove(&own.key);
        self.ensure_address().await?;
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let mut changes = usize::from(self.ensure_device().await?);
        changes += self.ensure_address().await?;
        let plans: Vec<PeerPlan> = self
            .peers
            .leases()
            .map(|l| peer_plan(l, &self.cfg, &self.ext))
            .collect();
        // A peer of another type is not a problem here (the BackendSet runs its backend).
        let problems = self.peers.leases().zip(&plans).map(|(l, p)| match p {
            PeerPlan::Ignored(why) if l.attrs.data_plane() == "vxlan" => (l.key, Some(why.clone())),
            _ => (l.key, None),
        });
        self.peer_log.log(
            "peer not routed by vxlan",
            std::time::Instant::now(),
            problems,
        );
        let want = desired(&plans, self.index, &self.ext);
        let ops = plan(&want, &self.actual().await?);
        for op in &ops {
            tracing::debug!(?op, "vxlan");
            self.apply(op).await?;
        }
        Ok(changes + ops.len())
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        let direct: Vec<Route> = self
            .actual()
            .await
            .map(|a| {
                a.routes
                    .into_iter()
                    .filter(|r| r.oif != self.index)
                    .collect()
            })
            .unwrap_or_default();
        // The device goes even when a direct route could not be removed (reported after).
        let routes = crate::netlink::del_routes(self.nl.as_ref(), direct).await;
        if let Some(l) = self.nl.link_by_name(&self.name).await? {
            self.nl.delete_link(l.index).await?;
        }
        Ok(routes?)
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
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_ip: Ipv4Addr::new(172, 30, 0, 11),
            prefix_len: 24,
            public_ip: Ipv4Addr::new(172, 30, 0, 11),
            mtu: 1500,
        }
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
            peer_plan(&p, &cfg, &ext()),
            PeerPlan::Tunnel { .. }
        ));
        let (direct, _) = VxlanConfig::parse(&opts(r#"{"DirectRouting":true}"#)).unwrap();
        assert!(matches!(
            peer_plan(&p, &direct, &ext()),
            PeerPlan::Direct { .. }
        ));
        let far = peer("10.5.3.0-24", [192, 168, 9, 9], "02:00:00:00:00:03");
        assert!(matches!(
            peer_plan(&far, &direct, &ext()),
            PeerPlan::Tunnel { .. }
        ));
        let mut udp = p.clone();
        udp.attrs.backend_type = "udp".into();
        assert!(matches!(peer_plan(&udp, &cfg, &ext()), PeerPlan::Ignored(w) if w.contains("udp")));
        let mut bad = p.clone();
        bad.attrs.backend_data = Some(serde_json::json!({"VtepMAC": "zz"}));
        assert!(
            matches!(peer_plan(&bad, &cfg, &ext()), PeerPlan::Ignored(w) if w.contains("BackendData"))
        );
        let mut other_vni = p;
        other_vni.attrs.backend_data =
            Some(serde_json::json!({"VNI": 7, "VtepMAC": "02:00:00:00:00:02"}));
        assert!(matches!(
            peer_plan(&other_vni, &cfg, &ext()),
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
            public_ip: Ipv4Addr::new(172, 30, 0, 12),
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
        BackendContext {
            ext: ext(),
            network: "10.5.0.0/16".parse().unwrap(),
            node_id: "machine-1".into(),
            netlink: nl,
        }
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
        let dev = b.device_index();
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
        let mac = b.vtep_mac();
        nl.lock().calls.clear();
        let b2 = VxlanBackend::new(cfg.clone(), &ctx(nl.clone()))
            .await
            .unwrap();
        assert_eq!((b2.device_index(), b2.vtep_mac()), (dev, mac));
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
        assert_eq!(l.index, b.device_index());
        assert!(s.calls.iter().any(|c| c.starts_with("delete_link")));
    }
}
