//! `udp`: flannel's userspace backend, wire-compatible. TUN `flannel0` (no packet-info header)
//! with our subnet's network address /32 and one route for the whole Network; each IPv4 packet
//! read from it travels as the bare payload of a UDP datagram from our interface IP:port to the
//! peer's PublicIP:port, with its TTL decremented. Unlike flannel, arriving datagrams are checked
//! (known peer address and port, inner source in that peer's subnet, destination in ours) and
//! every drop is counted by reason. Buffers are fixed; nothing queues, so memory is bounded.
//!
//! IPv6 (our extension; flannel's udp has none). Dual stack: the underlay stays IPv4 (one
//! socket, flannel's), inner IPv4 goes to every udp peer as above, inner IPv6 (hop limit
//! decremented) only to peers whose lease says `"BackendType":"udp"` and has an IPv6 subnet:
//! flannel's udp lease has no type and its data plane would read an IPv6 packet as IPv4.
//! IPv6-only: the socket is `[interface IPv6]:port`, peers are reached at their `PublicIPv6`,
//! and the TUN MTU is the interface's − 48. `flannel0` gets our IPv6 subnet's network address
//! /128 and a route for `IPv6Network`; `addr_gen_mode=1` (set before the device goes up) keeps
//! the kernel from giving it a link-local address and sending RS/MLD into the tunnel. The
//! offloads treat IPv6 as IPv4: the TUN takes TSO6 (and USO6), TCPv6 super-packets read from
//! it are split (tun-rs) and leave with UDP GSO, and arriving TCPv6/UDPv6 runs are coalesced
//! into one TUN write (coalesce.rs), over either underlay.
//!
//! Fast path: the TUN carries a virtio-net header (TSO/checksum offload), so one read returns up to
//! 64 KiB that tun-rs splits into MTU packets; consecutive packets to one peer leave in one
//! `sendmsg` with UDP_SEGMENT (GSO). Receiving uses UDP_GRO (many datagrams per call) and writes
//! runs of segments of one flow as one super-packet (coalesce.rs: the header rewritten, the
//! payloads gathered in place). Each offload falls back on its own when the kernel refuses it,
//! reported in the log and in `/metrics`.

pub mod coalesce;
pub(crate) mod dataplane;
pub mod packet;

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::netlink::{ensure_subnet_address, Family, Ipv6Conf, Netlink, Route};
use crate::options::Options;
use crate::{Backend, BackendContext, BackendError, PeerTable};
use packet::{DropReason, Routes, UdpPeer};

/// flannel's udp port.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 header 20 + UDP header 8.
pub const OVERHEAD_V4: u32 = 28;
/// IPv6 header 40 + UDP header 8 (the underlay of an IPv6-only node).
pub const OVERHEAD_V6: u32 = 48;
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

/// What this node's udp data plane carries, and over what: inner IPv4 when IPv4 is enabled
/// (the underlay is IPv4 then, for both inner families), inner IPv6 when IPv6 is enabled (over
/// an IPv6 underlay when IPv4 is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plane {
    pub port: u16,
    pub v4: bool,
    pub v6: bool,
}

impl Plane {
    /// IPv4 underlay (flannel's, also in dual stack) unless the node is IPv6-only.
    pub fn underlay_v6(&self) -> bool {
        !self.v4
    }

    /// `FLANNEL_MTU` and the TUN MTU: the interface's minus the underlay's headers.
    pub fn mtu(&self, iface_mtu: u32) -> u32 {
        let overhead = if self.underlay_v6() {
            OVERHEAD_V6
        } else {
            OVERHEAD_V4
        };
        iface_mtu.saturating_sub(overhead)
    }

    /// Where a peer's datagrams come from and ours to it go: its PublicIP (PublicIPv6 on an
    /// IPv6-only node).
    fn underlay(&self, l: &Lease) -> Option<SocketAddr> {
        if self.underlay_v6() {
            let ip = l.attrs.public_ipv6?;
            Some(SocketAddr::V6(SocketAddrV6::new(ip, self.port, 0, 0)))
        } else {
            Some(SocketAddr::V4(SocketAddrV4::new(
                l.attrs.public_ip,
                self.port,
            )))
        }
    }

    /// A lease's entries (whatever its type), one per family carried: its IPv4 subnet, and its
    /// IPv6 subnet when `v6` allows it.
    fn entries(&self, l: &Lease, v6: bool) -> Vec<UdpPeer> {
        let Some(addr) = self.underlay(l) else {
            return Vec::new();
        };
        let v4 = l.key.ipv4.filter(|_| self.v4).map(IpNet::V4);
        let v6 = l.key.ipv6.filter(|_| self.v6 && v6).map(IpNet::V6);
        v4.into_iter()
            .chain(v6)
            .map(|subnet| UdpPeer { subnet, addr })
            .collect()
    }

    /// The entries egress sends to for a lease that advertises udp, or no type at all
    /// (flannel's udp backend writes none, see `LeaseAttrs::data_plane`). Inner IPv6 goes only
    /// to a lease that says `"BackendType":"udp"`: a typeless one is flannel's, whose data
    /// plane would read an IPv6 packet as IPv4.
    fn peer_entries(&self, l: &Lease) -> Result<Vec<UdpPeer>, String> {
        if l.attrs.data_plane() != "udp" {
            return Err(format!("backend type {:?}, not udp", l.attrs.backend_type));
        }
        let v = self.entries(l, l.attrs.backend_type == "udp");
        if v.is_empty() {
            return Err(
                "no subnet of a family this node carries (or no address to reach it)".into(),
            );
        }
        Ok(v)
    }
}

/// The running udp backend.
#[derive(Debug)]
pub struct UdpBackend {
    nl: Arc<dyn Netlink>,
    plane: Plane,
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
    index: u32,
    mtu: u32,
    peers: PeerTable,
    routes: Arc<RwLock<Routes>>,
    stats: Arc<UdpStats>,
    /// The two packet threads (egress, ingress) and their stop flag.
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    own: Option<Ipv4Net>,
    own6: Option<Ipv6Net>,
}

fn io_err(op: &str, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op: op.to_string(),
        source,
    }
}

impl UdpBackend {
    pub async fn new(cfg: UdpConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        let plane = Plane {
            port: cfg.port,
            v4: ctx.network.is_some(),
            v6: ctx.network6.is_some(),
        };
        // The socket: on the interface's IPv4 address (flannel's), or its IPv6 one when the
        // node is IPv6-only.
        let bind: SocketAddr = match (plane.v4, ctx.ext.v4, ctx.ext.v6) {
            (true, Some(a), _) => SocketAddrV4::new(a.iface_ip, cfg.port).into(),
            (false, _, Some(a)) if plane.v6 => {
                // A link-local address needs the interface as its scope.
                let scope = if a.iface_ip.is_unicast_link_local() {
                    ctx.ext.index
                } else {
                    0
                };
                SocketAddrV6::new(a.iface_ip, cfg.port, 0, scope).into()
            }
            _ => {
                return Err(BackendError::Config {
                    key: "Type".into(),
                    msg: format!(
                        "udp: needs an address of an enabled family on interface {} (IPv4 with EnableIPv4, IPv6 with EnableIPv6)",
                        ctx.ext.name
                    ),
                })
            }
        };
        let mtu = plane.mtu(ctx.ext.mtu);
        let stats = Arc::new(UdpStats::default());
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(DEVICE)
                .mtu(u16::try_from(mtu).unwrap_or(1472))
                .packet_information(false)
                .offload(offload)
                // With IPv6 the device goes up only after addr_gen_mode is set (below).
                .enable(!plane.v6)
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
        if plane.v6 {
            // Before up: no link-local address, hence no RS/MLD/DAD packets into the tunnel.
            ctx.netlink
                .set_ipv6_conf(DEVICE, Ipv6Conf::AddrGenMode, 1)
                .await?;
        }
        ctx.netlink.set_link_mtu_up(link.index, mtu).await?;
        let sock = std::net::UdpSocket::bind(bind)
            .map_err(|e| io_err(&format!("binding UDP {bind}"), e))?;
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
        tracing::info!(device = DEVICE, mtu, port = cfg.port, ipv4 = plane.v4, ipv6 = plane.v6, underlay = %bind, "udp backend up");
        Ok(UdpBackend {
            nl: ctx.netlink.clone(),
            plane,
            network: ctx.network,
            network6: ctx.network6,
            index: link.index,
            mtu,
            peers: PeerTable::default(),
            routes,
            stats,
            threads,
            stop,
            own: None,
            own6: None,
        })
    }

    pub fn stats(&self) -> Arc<UdpStats> {
        self.stats.clone()
    }

    /// The route for the whole `Network` (`IPv6Network`) via flannel0.
    fn network_route(&self, dst: IpNet) -> Route {
        Route {
            dst,
            gateway: None,
            oif: self.index,
            onlink: false,
        }
    }

    /// flannel0's address and route of each carried family whose own subnet is known.
    async fn ensure_link_state(&self) -> Result<usize, BackendError> {
        let fams = [
            (self.own.map(IpNet::V4), self.network.map(IpNet::V4)),
            (self.own6.map(IpNet::V6), self.network6.map(IpNet::V6)),
        ];
        let mut changes = 0;
        for (own, network) in fams {
            let (Some(own), Some(network)) = (own, network) else {
                continue;
            };
            changes += ensure_subnet_address(self.nl.as_ref(), self.index, own).await?;
            let route = self.network_route(network);
            let routes = self.nl.routes(Family::of_net(&network)).await?;
            if !routes.contains(&route) {
                self.nl.set_route(route).await?;
                changes += 1;
            }
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
        self.own = own.key.ipv4.filter(|_| self.plane.v4);
        self.own6 = own.key.ipv6.filter(|_| self.plane.v6);
        self.peers.remove(&own.key);
        {
            let mut r = self.routes.write().unwrap_or_else(|e| e.into_inner());
            r.own = self.own;
            r.own6 = self.own6;
        }
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
            match self.plane.peer_entries(l) {
                Ok(p) => peers.extend(p),
                // A peer mid-switch to udp is ours (it has a type), IPv6 included.
                Err(_) => switching.extend(self.plane.entries(l, true)),
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
        let routes: Vec<Route> = [self.network.map(IpNet::V4), self.network6.map(IpNet::V6)]
            .into_iter()
            .flatten()
            .map(|n| self.network_route(n))
            .collect();
        crate::netlink::del_routes(self.nl.as_ref(), routes).await?;
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

    /// The IPv4 entry egress sends to for `l` on an IPv4-only node.
    fn peer_addr(l: &Lease, port: u16) -> Result<UdpPeer, String> {
        let v4 = Plane {
            port,
            v4: true,
            v6: false,
        };
        v4.peer_entries(l).map(|v| v[0])
    }

    fn key_lease(key: &str, json: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: serde_json::from_str(json).unwrap(),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn entry(subnet: &str, addr: &str) -> UdpPeer {
        UdpPeer {
            subnet: subnet.parse().unwrap(),
            addr: addr.parse().unwrap(),
        }
    }

    const DUAL: Plane = Plane {
        port: 8285,
        v4: true,
        v6: true,
    };
    const V6ONLY: Plane = Plane {
        port: 8285,
        v4: false,
        v6: true,
    };

    #[test]
    fn dual_stack_sends_ipv6_over_ipv4_only_to_leases_that_say_udp() {
        let ours = key_lease(
            "10.5.8.0-24&fd10:0:0:8::-64",
            r#"{"PublicIP":"172.30.0.8","PublicIPv6":"fd00:210::8","BackendType":"udp"}"#,
        );
        assert_eq!(
            DUAL.peer_entries(&ours),
            Ok(vec![
                entry("10.5.8.0/24", "172.30.0.8:8285"),
                entry("fd10:0:0:8::/64", "172.30.0.8:8285"),
            ]),
            "both inner families over the IPv4 underlay"
        );
        // flannel's udp node (no type): IPv4 only, even with a dual-stack key.
        let flannel = key_lease(
            "10.5.7.0-24&fd10:0:0:7::-64",
            r#"{"PublicIP":"172.30.0.7","PublicIPv6":"fd00:210::7"}"#,
        );
        assert_eq!(
            DUAL.peer_entries(&flannel),
            Ok(vec![entry("10.5.7.0/24", "172.30.0.7:8285")])
        );
        // A node of another type mid-switch: accepted on ingress for both families.
        let vxlan = key_lease(
            "10.5.9.0-24&fd10:0:0:9::-64",
            r#"{"PublicIP":"172.30.0.9","PublicIPv6":"fd00:210::9","BackendType":"vxlan"}"#,
        );
        assert!(DUAL.peer_entries(&vxlan).is_err());
        assert_eq!(
            DUAL.entries(&vxlan, true),
            vec![
                entry("10.5.9.0/24", "172.30.0.9:8285"),
                entry("fd10:0:0:9::/64", "172.30.0.9:8285"),
            ]
        );
        // IPv4-only nodes carry no IPv6 whatever the lease says.
        assert_eq!(
            peer_addr(&ours, 8285),
            Ok(entry("10.5.8.0/24", "172.30.0.8:8285"))
        );
        assert_eq!(
            Plane { v6: false, ..DUAL }
                .peer_entries(&ours)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn ipv6_only_reaches_peers_at_their_public_ipv6() {
        let ours = key_lease(
            "0.0.0.0-0&fd10:0:0:8::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:210::8","BackendType":"udp"}"#,
        );
        assert_eq!(
            V6ONLY.peer_entries(&ours),
            Ok(vec![entry("fd10:0:0:8::/64", "[fd00:210::8]:8285")])
        );
        let no_v6_address = key_lease(
            "0.0.0.0-0&fd10:0:0:9::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"udp"}"#,
        );
        assert!(V6ONLY.peer_entries(&no_v6_address).is_err());
        let typeless = key_lease(
            "0.0.0.0-0&fd10:0:0:7::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:210::7"}"#,
        );
        assert!(V6ONLY.peer_entries(&typeless).is_err());
    }

    #[test]
    fn mtu_per_underlay() {
        // Decision 3 of docs/ipv6-plan.md: the underlay's headers, whatever the inner family.
        assert_eq!(DUAL.mtu(1500), 1472);
        assert_eq!(Plane { v6: false, ..DUAL }.mtu(1500), 1472);
        assert_eq!(V6ONLY.mtu(1500), 1452);
        assert_eq!(V6ONLY.mtu(40), 0);
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
