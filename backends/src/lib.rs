//! flannel backends behind one trait.
//!
//! Contract: [`create`] turns the `Backend` section of the network config into a running
//! [`Backend`] for the chosen external interface. A backend says what it publishes in this
//! node's lease (`BackendType`, `BackendData`) and what MTU pods get (`FLANNEL_MTU`); it is told
//! its own lease ([`Backend::set_lease`]) and peer events ([`Backend::peer_event`], pure), and
//! [`Backend::reconcile`] brings the kernel to the state those imply, idempotently. Adding a
//! backend is one module plus one arm in [`create`]. Kernel access goes through the
//! [`netlink::Netlink`] trait.
//!
//! Implemented: `vxlan` (kernel VXLAN), `udp` (userspace TUN, flannel's wire format), `host-gw`
//! (routes via the peers' addresses, no encapsulation), `wireguard` (userspace WireGuard on a
//! TUN, flannel's lease format and the standard protocol) and `alloc` (lease only). Any other type
//! runs as `alloc` with a warning, publishing `BackendType: "alloc"` so no peer mistakes this
//! node for one it can reach.

#![forbid(unsafe_code)]

mod alloc;
pub mod hostgw;
pub mod netlink;
pub mod netlink_rt;
mod options;
pub mod peerlog;
pub mod set;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

pub use alloc::AllocBackend;
use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use subnet_lease::manager::Event;
use subnet_lease::{BackendConfig, Lease, SubnetKey};

/// One address family of the external interface: its address, the prefix length of that
/// address (peers inside that prefix are on the same L2 segment) and the address published in
/// the lease (`--public-ip` / `--public-ipv6`, else `iface_ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtAddr<A> {
    pub iface_ip: A,
    pub prefix_len: u8,
    pub public_ip: A,
}

/// The interface flannel carries traffic on, and the addresses it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The IPv4 side; `None` on an IPv6-only node.
    pub v4: Option<ExtAddr<Ipv4Addr>>,
    /// The IPv6 side; `Some` exactly when `EnableIPv6` is set.
    pub v6: Option<ExtAddr<Ipv6Addr>>,
}

impl ExternalInterface {
    /// The IPv4 subnet the interface's address is on.
    pub fn network(&self) -> Option<Ipv4Net> {
        self.v4
            .and_then(|a| Ipv4Net::new(a.iface_ip, a.prefix_len).ok())
            .map(|n| n.trunc())
    }

    /// The IPv6 prefix the interface's address is on.
    pub fn network6(&self) -> Option<Ipv6Net> {
        self.v6
            .and_then(|a| Ipv6Net::new(a.iface_ip, a.prefix_len).ok())
            .map(|n| n.trunc())
    }

    /// The IPv4 address published as `PublicIP`; `0.0.0.0` on an IPv6-only node (what
    /// flannel publishes there).
    pub fn public_ip(&self) -> Ipv4Addr {
        self.v4.map_or(Ipv4Addr::UNSPECIFIED, |a| a.public_ip)
    }

    /// The address published as `PublicIPv6`.
    pub fn public_ipv6(&self) -> Option<Ipv6Addr> {
        self.v6.map(|a| a.public_ip)
    }
}

/// What a backend is built with.
#[derive(Debug, Clone)]
pub struct BackendContext {
    pub ext: ExternalInterface,
    /// The cluster `Network`; `Some` exactly when IPv4 is enabled.
    pub network: Option<Ipv4Net>,
    /// The cluster `IPv6Network`; `Some` exactly when IPv6 is enabled.
    pub network6: Option<Ipv6Net>,
    /// A stable identity of this machine (machine-id), for derived values such as the VTEP MAC.
    pub node_id: String,
    pub netlink: Arc<dyn netlink::Netlink>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Backend.{key}: {msg}")]
    Config { key: String, msg: String },
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// A system call failed (TUN device, socket, thread): `op` says what was being done.
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    /// A device the backend made is not there afterwards.
    #[error("{0} created but not found")]
    DeviceMissing(String),
    /// A backend of a type peers need runs as another type in this build (a fallback).
    #[error("{wanted} runs as {actual} here")]
    Fallback { wanted: String, actual: String },
}

/// The current peer leases, as events describe them.
#[derive(Debug, Clone, Default)]
pub struct PeerTable(BTreeMap<SubnetKey, Lease>);

impl PeerTable {
    pub fn apply(&mut self, ev: &Event) {
        match ev {
            Event::PeerAdded(l) => {
                self.0.insert(l.key, l.clone());
            }
            Event::PeerRemoved(l) => {
                self.0.remove(&l.key);
            }
            Event::OwnLease(l) => {
                self.0.remove(&l.key);
            }
            Event::PeersListed => {}
        }
    }

    pub fn remove(&mut self, key: &SubnetKey) {
        self.0.remove(key);
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.0.values()
    }

    /// Subnets of the peers whose lease advertises (`of == true`) or does not advertise
    /// backend type `t` (a lease without a type advertises udp, as flannel reads it).
    pub fn subnets(&self, t: &str, of: bool) -> Vec<Ipv4Net> {
        self.leases()
            .filter(|l| (l.attrs.data_plane() == t) == of)
            .filter_map(|l| l.key.ipv4)
            .collect()
    }

    /// [`PeerTable::subnets`] of one address family (IPv6: the leases' IPv6 subnets).
    pub fn nets(&self, family: netlink::Family, t: &str, of: bool) -> Vec<IpNet> {
        self.leases()
            .filter(|l| (l.attrs.data_plane() == t) == of)
            .filter_map(|l| match family {
                netlink::Family::V4 => l.key.ipv4.map(IpNet::V4),
                netlink::Family::V6 => l.key.ipv6.map(IpNet::V6),
            })
            .collect()
    }
}

/// A route of the kind host-gw and vxlan DirectRouting make for a peer: via a gateway on the
/// external interface, to a subnet of the Network (longer than the Network itself) that is
/// neither `own` nor in `skip` (subnets whose routes belong to another backend). `network` is
/// the cluster `Network` or `IPv6Network`: only routes of its family can match.
pub fn peer_gateway_route(
    r: &netlink::Route,
    ext: &ExternalInterface,
    network: IpNet,
    own: Option<IpNet>,
    skip: &[IpNet],
) -> bool {
    r.oif == ext.index
        && r.gateway.is_some()
        && network.contains(&r.dst)
        && r.dst.prefix_len() > network.prefix_len()
        && Some(r.dst) != own
        && !skip.contains(&r.dst)
}

/// A running backend.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `BackendType` published in the lease.
    fn backend_type(&self) -> &'static str;
    /// `BackendData` published in the lease (None = omitted, as flannel's udp/host-gw/alloc).
    fn backend_data(&self) -> Option<serde_json::Value>;
    /// `BackendV6Data` published in the lease (flannel's vxlan: the IPv6 VTEP; None = omitted).
    fn backend_v6_data(&self) -> Option<serde_json::Value> {
        None
    }
    /// The MTU pods should use (`FLANNEL_MTU`): it fits every address family the backend
    /// carries.
    fn mtu(&self) -> u32;
    /// Our lease, after acquisition and whenever it changes.
    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError>;
    /// Records a peer event; no kernel calls ([`Backend::reconcile`] applies them).
    fn peer_event(&mut self, ev: &Event);
    /// Brings the kernel to the desired state; returns the number of changes made.
    async fn reconcile(&mut self) -> Result<usize, BackendError>;
    /// Removes every device, route and entry this backend made.
    async fn teardown(&mut self) -> Result<(), BackendError>;
    /// The peers currently known (for status and metrics).
    fn peer_keys(&self) -> Vec<SubnetKey>;
    /// Data-plane counters for metrics (name → value; names are metric-safe).
    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

/// Checks a `Backend` section without touching the kernel: the options parse for the type.
/// Returns the warnings [`create`] would give for unknown keys.
pub fn validate(cfg: &BackendConfig) -> Result<Vec<String>, BackendError> {
    Ok(match cfg.backend_type.as_str() {
        "vxlan" => vxlan::VxlanConfig::parse(&cfg.options)?.1,
        "udp" => udp::UdpConfig::parse(&cfg.options)?.1,
        "host-gw" => hostgw::parse_options(&cfg.options),
        "wireguard" => wireguard::WgConfig::parse(&cfg.options)?.1,
        _ => Vec::new(),
    })
}

/// Whether creating a VXLAN device failed because the kernel has no VXLAN support.
fn vxlan_unsupported(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::Netlink(e) if e.is_not_supported()
    )
}

/// Builds the backend the config asks for. Returns it with warnings to log (unknown options,
/// or a type that runs as another in this build).
pub async fn create(
    cfg: &BackendConfig,
    ctx: &BackendContext,
) -> Result<(Box<dyn Backend>, Vec<String>), BackendError> {
    match cfg.backend_type.as_str() {
        "vxlan" => {
            let (vcfg, mut warnings) = vxlan::VxlanConfig::parse(&cfg.options)?;
            let fallback = vcfg.fallback;
            match vxlan::VxlanBackend::new(vcfg, ctx).await {
                Ok(b) => Ok((Box::new(b), warnings)),
                Err(e) if vxlan_unsupported(&e) => match fallback {
                    Some("udp") => {
                        warnings.push(format!(
                            "{e}; Backend.Fallback is \"udp\": running the udp backend (port {}) instead",
                            udp::DEFAULT_PORT
                        ));
                        let ucfg = udp::UdpConfig {
                            port: udp::DEFAULT_PORT,
                            offload: true,
                        };
                        Ok((Box::new(udp::UdpBackend::new(ucfg, ctx).await?), warnings))
                    }
                    _ => Err(BackendError::Config {
                        key: "Type".into(),
                        msg: format!(
                            "vxlan: {e}; this kernel cannot make VXLAN devices (set \"Fallback\": \"udp\" in Backend to run the udp backend instead)"
                        ),
                    }),
                },
                Err(e) => Err(e),
            }
        }
        "udp" => {
            let (ucfg, warnings) = udp::UdpConfig::parse(&cfg.options)?;
            Ok((Box::new(udp::UdpBackend::new(ucfg, ctx).await?), warnings))
        }
        "host-gw" => Ok((
            Box::new(hostgw::HostGwBackend::new(ctx)?),
            hostgw::parse_options(&cfg.options),
        )),
        "wireguard" => {
            let (wcfg, warnings) = wireguard::WgConfig::parse(&cfg.options)?;
            Ok((
                Box::new(wireguard::WireguardBackend::new(wcfg, ctx).await?),
                warnings,
            ))
        }
        "alloc" => Ok((Box::new(AllocBackend::new(&ctx.ext)), Vec::new())),
        other => Ok((
            Box::new(AllocBackend::new(&ctx.ext)),
            vec![format!(
                "backend type {other:?}: its data plane is not part of this build; running lease-only (alloc) and publishing BackendType \"alloc\""
            )],
        )),
    }
}

/// Shared test fixtures: node 1 of the testbed layout.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testing {
    use super::*;

    /// eth0 (index 2, MTU 1500) at 172.30.0.11/24 (`v4`) and fd00:210::11/64 (`v6`), each its
    /// own public address.
    pub fn ext(v4: bool, v6: bool) -> ExternalInterface {
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            v4: v4.then(|| ExtAddr {
                iface_ip: Ipv4Addr::new(172, 30, 0, 11),
                prefix_len: 24,
                public_ip: Ipv4Addr::new(172, 30, 0, 11),
            }),
            v6: v6.then(|| ExtAddr {
                iface_ip: "fd00:210::11".parse().unwrap(),
                prefix_len: 64,
                public_ip: "fd00:210::11".parse().unwrap(),
            }),
        }
    }

    /// A context on `ext(v4, v6)` with Network 10.5.0.0/16 and IPv6Network fd10::/48 as enabled.
    pub fn ctx(nl: Arc<netlink::FakeNetlink>, v4: bool, v6: bool) -> BackendContext {
        BackendContext {
            ext: ext(v4, v6),
            network: v4.then(|| "10.5.0.0/16".parse().unwrap()),
            network6: v6.then(|| "fd10::/48".parse().unwrap()),
            node_id: "machine-1".into(),
            netlink: nl,
        }
    }

    #[test]
    fn interface_networks_and_public_addresses() {
        let e = ext(true, true);
        assert_eq!(e.network(), Some("172.30.0.0/24".parse().unwrap()));
        assert_eq!(e.network6(), Some("fd00:210::/64".parse().unwrap()));
        assert_eq!(e.public_ip(), Ipv4Addr::new(172, 30, 0, 11));
        assert_eq!(e.public_ipv6(), Some("fd00:210::11".parse().unwrap()));
        // IPv6-only: flannel's PublicIP 0.0.0.0.
        let e = ext(false, true);
        assert_eq!((e.network(), e.public_ip()), (None, Ipv4Addr::UNSPECIFIED));
        let e = ext(true, false);
        assert_eq!((e.network6(), e.public_ipv6()), (None, None));
    }

    #[test]
    fn gateway_routes_are_matched_per_family() {
        let e = ext(true, true);
        let r6 = netlink::Route {
            dst: "fd10:0:0:12::/64".parse().unwrap(),
            gateway: Some("fd00:210::12".parse().unwrap()),
            oif: 2,
            onlink: false,
        };
        let n6: IpNet = "fd10::/48".parse().unwrap();
        let n4: IpNet = "10.5.0.0/16".parse().unwrap();
        assert!(peer_gateway_route(&r6, &e, n6, None, &[]));
        assert!(!peer_gateway_route(&r6, &e, n4, None, &[]), "other family");
        assert!(!peer_gateway_route(&r6, &e, n6, Some(r6.dst), &[]), "own");
        assert!(!peer_gateway_route(&r6, &e, n6, None, &[r6.dst]), "skipped");
        let whole = netlink::Route { dst: n6, ..r6 };
        assert!(
            !peer_gateway_route(&whole, &e, n6, None, &[]),
            "the network itself"
        );
        let no_gw = netlink::Route {
            gateway: None,
            ..r6
        };
        assert!(!peer_gateway_route(&no_gw, &e, n6, None, &[]));
    }
}
