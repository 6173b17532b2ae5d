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
//! (routes via the peers' addresses, no encapsulation) and `alloc` (lease only). Any other type
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

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

pub use alloc::AllocBackend;
use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use subnet_lease::manager::Event;
use subnet_lease::{BackendConfig, Lease, SubnetKey};

/// The interface flannel carries traffic on, and the address it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address.
    pub iface_ip: Ipv4Addr,
    /// Prefix length of `iface_ip` (peers inside that subnet are on the same L2 segment).
    pub prefix_len: u8,
    /// The address published in the lease (`--public-ip`, else `iface_ip`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

impl ExternalInterface {
    /// The subnet the interface's address is on.
    pub fn network(&self) -> Ipv4Net {
        Ipv4Net::new(self.iface_ip, self.prefix_len)
            .map(|n| n.trunc())
            .unwrap_or_default()
    }
}

/// What a backend is built with.
#[derive(Debug, Clone)]
pub struct BackendContext {
    pub ext: ExternalInterface,
    /// The cluster Network.
    pub network: Ipv4Net,
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
}

/// A route of the kind host-gw and vxlan DirectRouting make for a peer: via a gateway on the
/// external interface, to a subnet of the Network (longer than the Network itself) that is
/// neither `own` nor in `skip` (subnets whose routes belong to another backend). IPv4 only:
/// an IPv6 route is never one.
pub fn peer_gateway_route(
    r: &netlink::Route,
    ext: &ExternalInterface,
    network: Ipv4Net,
    own: Option<Ipv4Net>,
    skip: &[Ipv4Net],
) -> bool {
    let IpNet::V4(dst) = r.dst else {
        return false;
    };
    r.oif == ext.index
        && r.gateway.is_some()
        && network.contains(&dst)
        && dst.prefix_len() > network.prefix_len()
        && Some(dst) != own
        && !skip.contains(&dst)
}

/// A running backend.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `BackendType` published in the lease.
    fn backend_type(&self) -> &'static str;
    /// `BackendData` published in the lease (None = omitted, as flannel's udp/host-gw/alloc).
    fn backend_data(&self) -> Option<serde_json::Value>;
    /// The MTU pods should use (`FLANNEL_MTU`).
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
        "alloc" => Ok((Box::new(AllocBackend::new(&ctx.ext)), Vec::new())),
        other => Ok((
            Box::new(AllocBackend::new(&ctx.ext)),
            vec![format!(
                "backend type {other:?}: its data plane is not part of this build; running lease-only (alloc) and publishing BackendType \"alloc\""
            )],
        )),
    }
}
