//! `udp`: flannel's userspace backend, wire-compatible. TUN `flannel0` (no packet-info header)
//! with our subnet's network address /32 and one route for the whole Network; each IPv4 packet
//! read from it travels as the bare payload of a UDP datagram from our interface IP:port to the
//! peer's PublicIP:port, with its TTL decremented. Unlike flannel, arriving datagrams are checked
//! (known peer address and port, inner source in that peer's subnet, destination in ours) and
//! every drop is counted by reason. Buffers are fixed; nothing queues, so memory is bounded.
//!
//! Fast path: the TUN carries a virtio-net header (TSO/checksum offload), so one read returns up to
//! 64 KiB that tun-rs splits into MTU packets; consecutive packets to one peer leave in one
//! `sendmsg` with UDP_SEGMENT (GSO). Receiving uses UDP_GRO (many datagrams per call) and tun-rs's
//! GRO table to write coalesced super-packets. Each offload falls back on its own when the kernel
//! refuses it, reported in the log and in `/metrics`.

pub mod coalesce;
mod dataplane;
pub mod packet;

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{ensure_subnet_address, Family, Netlink, Route};
use crate::options::Options;
use crate::{Backend, BackendContext, BackendError, PeerTable};
use packet::{DropReason, Routes, UdpPeer};

/// flannel's udp port.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 header 20 + UDP header 8.
pub const OVERHEAD_V4: u32 = 28;
pub const DEVICE: &str = "flannel0";

/// `Backend` options of the udp type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    pub port: u16,
    /// TUN vnet-header offload, UDP GSO and UDP GRO (our extension; default true).
    pub offload: bool,
}

impl UdpConfig {
    pub fn parse(options: &Map<String, Value>) -> Result<(Self, Vec<String>), BackendError> {
        let o = Options::new(options, "udp");
        let port = match o.uint("Port", 65535)? {
            None | Some(0) => DEFAULT_PORT,
            Some(p) => p as u16,
        };
        Ok((
            UdpConfig {
                port,
                offload: o.boolean("Offload", true)?,
            },
            o.warnings(&["Port", "Offload"]),
        ))
    }
}

/// Packet counters, read by metrics.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub icmp_sent: AtomicU64,
    pub gso_sends: AtomicU64,
    /// TUN reads and UDP receives: packets per call = tx_packets / tun_reads, rx / udp_receives.
    pub tun_reads: AtomicU64,
    pub udp_receives: AtomicU64,
    /// TUN writes that carried a coalesced run of segments (one TSO super-packet).
    pub tun_coalesced_writes: AtomicU64,
    /// 1 when the TUN runs without the vnet-header offload (one packet per read/write).
    pub offload_disabled: AtomicU64,
    /// 1 once the kernel refused UDP GSO (sends fall back to one datagram per call).
    pub gso_disabled: AtomicU64,
    /// 1 when UDP GRO could not be enabled (one datagram per receive).
    pub gro_disabled: AtomicU64,
    /// 1 when the TUN takes no USO super-packets (kernel < 6.2): UDP flows are written to the
    /// TUN one datagram at a time (TCP still coalesces).
    pub uso_disabled: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl UdpStats {
    pub fn count(&self, d: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|x| *x == d) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self, d: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|x| *x == d)
            .map(|i| self.dropped[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Where a peer's datagrams come from and ours to it go (whatever its lease's type).
/// None for an IPv6-only lease: this data plane carries IPv4 only.
fn udp_peer(l: &Lease, port: u16) -> Option<UdpPeer> {
    Some(UdpPeer {
        subnet: l.key.ipv4?,
        addr: SocketAddrV4::new(l.attrs.public_ip, port),
    })
}

/// A peer this backend routes to: its lease advertises udp, or no type at all (flannel's udp
/// backend writes none, see `LeaseAttrs::data_plane`).
fn peer_addr(l: &Lease, port: u16) -> Result<UdpPeer, String> {
    if l.attrs.data_plane() != "udp" {
        return Err(format!("backend type {:?}, not udp", l.attrs.backend_type));
    }
    udp_peer(l, port).ok_or_else(|| "no IPv4 subnet".to_string())
}

/// The running udp backend.
#[derive(Debug)]
pub struct UdpBackend {
    nl: Arc<dyn Netlink>,
    cfg: UdpConfig,
    network: Ipv4Net,
    index: u32,
    mtu: u32,
    peers: PeerTable,
    routes: Arc<RwLock<Routes>>,
    stats: Arc<UdpStats>,
    /// The two packet threads (egress, ingress) and their stop flag.
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    own: Option<Ipv4Net>,
}

fn io_err(op: &str, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op: op.to_string(),
        source,
    }
}

impl UdpBackend {
    pub async fn new(cfg: UdpConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        // This data plane carries IPv4 over IPv4 only (flanneld refuses udp with IPv6 first).
        let (Some(ext4), Some(network)) = (ctx.ext.v4, ctx.network) else {
            return Err(BackendError::Config {
                key: "Type".into(),
                msg: format!(
                    "udp: needs IPv4 (EnableIPv4 and an IPv4 address on interface {}); it has no IPv6 data plane in this version",
                    ctx.ext.name
                ),
            });
        };
        let mtu = ctx.ext.mtu.saturating_sub(OVERHEAD_V4);
        let stats = Arc::new(UdpStats::default());
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(DEVICE)
                .mtu(u16::try_from(mtu).unwrap_or(1472))
                .packet_information(false)
                .offload(offload)
                .build_sync()
        };
        let first = if cfg.offload {
            build(true)
        } else {
            Err(std::io::Error::other("switched off by Backend.Offload"))
        };
        let dev = match first {
            Ok(d) if d.tcp_gso() => d,
            other => {
                match other {
                    Ok(_) => tracing::warn!("TUN offload (TSO) not available; one packet per read"),
                    Err(e) => tracing::warn!("TUN without vnet header ({e}); one packet per read"),
                }
                stats.offload_disabled.store(1, Ordering::Relaxed);
                build(false).map_err(|e| io_err("creating TUN flannel0", e))?
            }
        };
        if !dev.udp_gso() {
            if dev.tcp_gso() {
                tracing::warn!(
                    "TUN USO not available (kernel < 6.2?); UDP flows are not coalesced"
                );
            }
            stats.uso_disabled.store(1, Ordering::Relaxed);
        }
        let link = ctx
            .netlink
            .link_by_name(DEVICE)
            .await?
            .ok_or_else(|| BackendError::DeviceMissing(format!("TUN {DEVICE}")))?;
        ctx.netlink.set_link_mtu_up(link.index, mtu).await?;
        let sock = std::net::UdpSocket::bind(SocketAddrV4::new(ext4.iface_ip, cfg.port))
            .map_err(|e| io_err(&format!("binding UDP {}:{}", ext4.iface_ip, cfg.port), e))?;
        dataplane::prepare(&dev, &sock).map_err(|e| io_err("preparing TUN and socket", e))?;
        let routes = Arc::new(RwLock::new(Routes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(dataplane::Shared {
            dev,
            sock,
            routes: routes.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            mtu,
            offload: cfg.offload,
        });
        let mut threads = Vec::new();
        for (name, f) in [
            (
                "udp-egress",
                dataplane::tun_to_udp as fn(Arc<dataplane::Shared>),
            ),
            ("udp-ingress", dataplane::udp_to_tun),
        ] {
            let sh = shared.clone();
            match std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(sh))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(io_err(&format!("starting thread {name}"), e));
                }
            }
        }
        tracing::info!(device = DEVICE, mtu, port = cfg.port, "udp backend up");
        Ok(UdpBackend {
            nl: ctx.netlink.clone(),
            cfg,
            network,
            index: link.index,
            mtu,
            peers: PeerTable::default(),
            routes,
            stats,
            threads,
            stop,
            own: None,
        })
    }

    pub fn stats(&self) -> Arc<UdpStats> {
        self.stats.clone()
    }

    fn udp_peer(&self, l: &Lease) -> Option<UdpPeer> {
        udp_peer(l, self.cfg.port)
    }

    fn peer_addr(&self, l: &Lease) -> Result<UdpPeer, String> {
        peer_addr(l, self.cfg.port)
    }

    async fn ensure_link_state(&self) -> Result<usize, BackendError> {
        let Some(own) = self.own else { return Ok(0) };
        let mut changes = ensure_subnet_address(self.nl.as_ref(), self.index, own.into()).await?;
        let route = Route {
            dst: self.network.into(),
            gateway: None,
            oif: self.index,
            onlink: false,
        };
        let routes = self.nl.routes(Family::V4).await?;
        if !routes.contains(&route) {
            self.nl.set_route(route).await?;
            changes += 1;
        }
        Ok(changes)
    }
}

impl UdpBackend {
    /// Stops the packet threads and waits for them (each wakes within POLL_INTERVAL).
    async fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads: Vec<JoinHandle<()>> = self.threads.drain(..).collect();
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a udp packet thread panicked");
                }
            }
        });
        let _ = joined.await;
    }
}

impl std::ops::Drop for UdpBackend {
    fn drop(&mut self) {
        // The threads see the flag within POLL_INTERVAL and exit, closing TUN and socket.
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Backend for UdpBackend {
    fn backend_type(&self) -> &'static str {
        "udp"
    }

    fn backend_data(&self) -> Option<Value> {
        None
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = own.key.ipv4;
        self.peers.remove(&own.key);
        self.routes.write().unwrap_or_else(|e| e.into_inner()).own = own.key.ipv4;
        self.ensure_link_state().await?;
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        // Peers of other types are the BackendSet's business (it runs their backend or
        // reports them unreachable); nothing to log here.
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let changes = self.ensure_link_state().await?;
        let (mut peers, mut switching) = (Vec::new(), Vec::new());
        for l in self.peers.leases() {
            match self.peer_addr(l) {
                Ok(p) => peers.push(p),
                Err(_) => switching.extend(self.udp_peer(l)),
            }
        }
        let mut r = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let changed = r.peers != peers;
        r.peers = peers;
        r.switching = switching;
        Ok(changes + usize::from(changed))
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        self.stop_threads().await;
        self.nl
            .del_route(Route {
                dst: self.network.into(),
                gateway: None,
                oif: self.index,
                onlink: false,
            })
            .await?;
        Ok(())
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let s = &self.stats;
        let named = [
            ("udp_tx_packets", &s.tx_packets),
            ("udp_tx_bytes", &s.tx_bytes),
            ("udp_rx_packets", &s.rx_packets),
            ("udp_rx_bytes", &s.rx_bytes),
            ("udp_icmp_sent", &s.icmp_sent),
            ("udp_gso_sends", &s.gso_sends),
            ("udp_tun_reads", &s.tun_reads),
            ("udp_tun_coalesced_writes", &s.tun_coalesced_writes),
            ("udp_receives", &s.udp_receives),
            ("udp_offload_disabled", &s.offload_disabled),
            ("udp_gso_disabled", &s.gso_disabled),
            ("udp_uso_disabled", &s.uso_disabled),
            ("udp_gro_disabled", &s.gro_disabled),
        ];
        let mut m: BTreeMap<String, u64> = named
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
            .collect();
        for d in DropReason::ALL {
            m.insert(format!("udp_dropped_{}", d.label()), s.dropped(d));
        }
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lease(subnet: &str, json: &str) -> Lease {
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs: serde_json::from_str(json).unwrap(),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn flannels_typeless_udp_lease_is_a_udp_peer() {
        // Exactly what flannel's udp backend writes (no BackendType).
        let l = lease(
            "10.5.7.0/24",
            r#"{"PublicIP":"172.30.0.7","PublicIPv6":null}"#,
        );
        assert_eq!(
            peer_addr(&l, 8285),
            Ok(UdpPeer {
                subnet: "10.5.7.0/24".parse().unwrap(),
                addr: "172.30.0.7:8285".parse().unwrap()
            })
        );
        let ours = lease(
            "10.5.8.0/24",
            r#"{"PublicIP":"172.30.0.8","PublicIPv6":null,"BackendType":"udp"}"#,
        );
        assert!(peer_addr(&ours, 8285).is_ok());
        let hostgw = lease(
            "10.5.9.0/24",
            r#"{"PublicIP":"172.30.0.9","PublicIPv6":null,"BackendType":"host-gw"}"#,
        );
        assert_eq!(
            peer_addr(&hostgw, 8285),
            Err("backend type \"host-gw\", not udp".into())
        );
    }

    #[test]
    fn options() {
        let o = |j: &str| serde_json::from_str::<Map<String, Value>>(j).unwrap();
        assert_eq!(
            UdpConfig::parse(&o("{}")).unwrap().0,
            UdpConfig {
                port: 8285,
                offload: true
            }
        );
        assert!(
            !UdpConfig::parse(&o(r#"{"Offload":false}"#))
                .unwrap()
                .0
                .offload
        );
        assert!(UdpConfig::parse(&o(r#"{"Offload":"no"}"#)).is_err());
        assert_eq!(UdpConfig::parse(&o(r#"{"Port":0}"#)).unwrap().0.port, 8285);
        assert_eq!(
            UdpConfig::parse(&o(r#"{"Port":7890}"#)).unwrap().0.port,
            7890
        );
        assert!(UdpConfig::parse(&o(r#"{"Port":70000}"#))
            .unwrap_err()
            .to_string()
            .starts_with("Backend.Port"));
        assert_eq!(
            UdpConfig::parse(&o(r#"{"Bogus":1}"#)).unwrap().1,
            vec!["Backend.Bogus: unknown udp option ignored"]
        );
    }
}
