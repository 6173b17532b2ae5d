//! `wireguard`: flannel's wireguard backend in userspace, lease- and wire-compatible with the
//! kernel one (docs/wireguard.md). The device `flannel-wg` is a TUN with our subnet's network
//! address /32 and one route for the cluster `Network` (scope link); each peer is a lease that
//! advertises wireguard, reached at `PublicIP:Port` (`BackendData.Port`, else our
//! `ListenPort`), with its lease subnet as allowed IPs. The protocol core is boringtun's
//! `noise::Tunn` (one per peer), run by the threads in dataplane.rs.
//!
//! Beside flannel's one Network route, each wireguard peer's subnet gets a route via the
//! device: with another backend beside this one (a cluster switching types) the Network
//! route may be the other backend's (udp's `flannel0`); the peer routes keep wireguard peers on
//! this device either way, and the Network route is only added when no device has it.
//!
//! IPv4 only for now: an IPv6 cluster (`EnableIPv6`) or `Mode: "ipv6"` is refused with an
//! error naming the setting.

pub mod config;
pub mod dataplane;
pub mod key;
pub mod peers;

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{ensure_subnet_address, Family, Netlink, Route};
use crate::peerlog::PeerLog;
use crate::{Backend, BackendContext, BackendError, PeerTable};
/// The protocol core, for tests and tools that speak WireGuard to this backend.
pub use boringtun;
pub use config::{Mode, WgConfig};
pub use dataplane::{DropReason, PeerSnapshot, WgStats};

/// flannel's device name.
pub const DEVICE: &str = "flannel-wg";

fn io_err(op: &str, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op: op.to_string(),
        source,
    }
}

/// The running wireguard backend.
#[derive(Debug)]
pub struct WireguardBackend {
    nl: Arc<dyn Netlink>,
    cfg: WgConfig,
    network: Ipv4Net,
    index: u32,
    mtu: u32,
    public_key: [u8; 32],
    device: dataplane::Device,
    peers: PeerTable,
    own: Option<Ipv4Net>,
    problems: PeerLog,
}

impl WireguardBackend {
    pub async fn new(cfg: WgConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        let (Some(network), None) = (ctx.network, ctx.network6) else {
            return Err(BackendError::Config {
                key: "Type".into(),
                msg: "wireguard carries IPv4 only in this build: set EnableIPv4 and leave EnableIPv6 off".into(),
            });
        };
        if ctx.ext.v4.is_none() {
            return Err(BackendError::Config {
                key: "Type".into(),
                msg: format!("wireguard: interface {} has no IPv4 address", ctx.ext.name),
            });
        }
        let path = key::key_file(std::env::var_os(key::KEY_FILE_ENV));
        let (private, made) = key::load_or_generate(&path).map_err(|e| BackendError::Config {
            key: "Type".into(),
            msg: e.to_string(),
        })?;
        if made {
            tracing::info!(file = %path.display(), "made a new WireGuard private key");
        }
        let mtu = cfg.device_mtu(ctx.ext.mtu);
        // A device of that name from an earlier run (flannel's kernel one, say) goes first, as
        // flannel recreates its own.
        if let Some(old) = ctx.netlink.link_by_name(DEVICE).await? {
            tracing::warn!("{DEVICE} already exists; recreating it");
            ctx.netlink.delete_link(old.index).await?;
        }
        let dev = dataplane::build_tun(DEVICE, mtu)
            .map_err(|e| io_err(&format!("creating TUN {DEVICE}"), e))?;
        let link = ctx
            .netlink
            .link_by_name(DEVICE)
            .await?
            .ok_or_else(|| BackendError::DeviceMissing(format!("TUN {DEVICE}")))?;
        ctx.netlink.set_link_mtu_up(link.index, mtu).await?;
        // Every address, as the kernel's WireGuard listens.
        let bind = SocketAddr::V4(SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            cfg.listen_port,
        ));
        let sock = std::net::UdpSocket::bind(bind)
            .map_err(|e| io_err(&format!("binding UDP {bind}"), e))?;
        let device = dataplane::Device::start(
            dev,
            sock,
            dataplane::DeviceConfig {
                key: &private,
                psk: cfg.psk.as_ref().map(|p| p.0),
                keepalive: cfg.keepalive,
                mtu,
            },
        )
        .map_err(|e| io_err("starting the wireguard threads", e))?;
        let public_key = private.public();
        tracing::info!(
            device = DEVICE,
            mtu,
            port = cfg.listen_port,
            public_key = %config::encode_key(&public_key),
            psk = cfg.psk.is_some(),
            keepalive = cfg.keepalive.unwrap_or(0),
            "wireguard backend up"
        );
        Ok(WireguardBackend {
            nl: ctx.netlink.clone(),
            cfg,
            network,
            index: link.index,
            mtu,
            public_key,
            device,
            peers: PeerTable::default(),
            own: None,
            problems: PeerLog::default(),
        })
    }

    /// Device counters (shared with the data plane threads).
    pub fn stats(&self) -> Arc<WgStats> {
        self.device.stats()
    }

    /// Every peer's state (for `wg show` through a UAPI server).
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        self.device.snapshot()
    }

    /// The public key published in the lease.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn listen_port(&self) -> u16 {
        self.cfg.listen_port
    }

    fn route(&self, dst: Ipv4Net) -> Route {
        Route {
            dst: IpNet::V4(dst),
            gateway: None,
            oif: self.index,
            onlink: false,
        }
    }

    /// The device's address, the Network route (unless another device has it) and one route
    /// per wireguard peer; routes of ours to subnets no peer has any more go.
    async fn ensure_routes(&self, peer_nets: &[Ipv4Net]) -> Result<usize, BackendError> {
        let Some(own) = self.own else { return Ok(0) };
        let mut changes =
            ensure_subnet_address(self.nl.as_ref(), self.index, IpNet::V4(own)).await?;
        let have = self.nl.routes(Family::V4).await?;
        let net = IpNet::V4(self.network);
        if !have.iter().any(|r| r.dst == net && r.gateway.is_none()) {
            self.nl.set_route(self.route(self.network)).await?;
            changes += 1;
        }
        for n in peer_nets {
            let r = self.route(*n);
            if !have.contains(&r) {
                self.nl.set_route(r).await?;
                changes += 1;
            }
        }
        // Our routes to subnets of the Network no wireguard peer has any more.
        for r in have.iter().filter(|r| {
            r.oif == self.index
                && r.gateway.is_none()
                && matches!(r.dst, IpNet::V4(d)
                    if d.prefix_len() > self.network.prefix_len()
                        && self.network.contains(&d)
                        && !peer_nets.contains(&d))
        }) {
            self.nl.del_route(*r).await?;
            changes += 1;
        }
        Ok(changes)
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    fn backend_type(&self) -> &'static str {
        peers::BACKEND_TYPE
    }

    fn backend_data(&self) -> Option<Value> {
        Some(peers::backend_data(&self.public_key, self.cfg.listen_port))
    }

    fn mtu(&self) -> u32 {
        self.mtu
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
        let (want, problems) =
            peers::desired(self.peers.leases(), self.cfg.listen_port, &self.public_key);
        // Every wireguard lease: fine, or why it gives no peer (logged once per change).
        let status: Vec<(SubnetKey, Option<String>)> = self
            .peers
            .leases()
            .filter(|l| l.attrs.backend_type == peers::BACKEND_TYPE)
            .map(|l| {
                let why = problems
                    .iter()
                    .find(|(k, _)| *k == l.key)
                    .map(|(_, e)| e.clone());
                (l.key, why)
            })
            .collect();
        self.problems.log(
            "wireguard peer not configured",
            std::time::Instant::now(),
            status,
        );
        let switching = peers::switching(self.peers.leases());
        let d = self.device.apply(&want, &switching);
        for p in &d.add {
            tracing::info!(subnet = %p.allowed, endpoint = %p.endpoint, "wireguard peer added");
        }
        for p in &d.update {
            tracing::info!(subnet = %p.allowed, endpoint = %p.endpoint, "wireguard peer changed");
        }
        for k in &d.remove {
            tracing::info!(public_key = %config::encode_key(k), "wireguard peer removed");
        }
        let nets: Vec<Ipv4Net> = want.iter().map(|p| p.allowed).collect();
        let changes = self.ensure_routes(&nets).await?;
        Ok(changes + d.add.len() + d.update.len() + d.remove.len())
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        let threads = self.device.stop();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a wireguard thread panicked");
                }
            }
        })
        .await;
        let routes: Vec<Route> = self
            .nl
            .routes(Family::V4)
            .await?
            .into_iter()
            .filter(|r| r.oif == self.index)
            .collect();
        crate::netlink::del_routes(self.nl.as_ref(), routes).await?;
        // The TUN goes now (its descriptor lives as long as this value): a backend of this
        // type made next (a switch with new options) gets the name free.
        if let Some(l) = self.nl.link_by_name(DEVICE).await? {
            if l.index == self.index {
                self.nl.delete_link(l.index).await?;
            }
        }
        Ok(())
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let s = self.device.stats();
        let named = [
            ("wireguard_tx_packets", &s.tx_packets),
            ("wireguard_rx_packets", &s.rx_packets),
            ("wireguard_tx_bytes", &s.tx_bytes),
            ("wireguard_rx_bytes", &s.rx_bytes),
            ("wireguard_timer_sends", &s.timer_sends),
            ("wireguard_cookie_replies", &s.cookie_replies),
            ("wireguard_icmp_sent", &s.icmp_sent),
            ("wireguard_tun_reads", &s.tun_reads),
            ("wireguard_gso_sends", &s.gso_sends),
            ("wireguard_udp_receives", &s.udp_receives),
            ("wireguard_tun_coalesced_writes", &s.tun_coalesced_writes),
            ("wireguard_offload_disabled", &s.offload_disabled),
            ("wireguard_gso_disabled", &s.gso_disabled),
            ("wireguard_gro_disabled", &s.gro_disabled),
        ];
        let mut m: BTreeMap<String, u64> = named
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
            .collect();
        for d in DropReason::ALL {
            m.insert(format!("wireguard_dropped_{}", d.label()), s.dropped(d));
        }
        m.insert(
            "wireguard_peers".into(),
            self.device.snapshot().len() as u64,
        );
        m
    }
}
