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
//! IPv6 as flannel's `separate` mode (the default) does it: a second device `flannel-wg-v6`
//! with the IPv6 subnet's network address /128, the `IPv6Network` route, a socket on
//! `ListenPortV6`, and per peer its IPv6 subnet reached at `[PublicIPv6]:Port` from
//! `BackendV6Data` (the same key on both devices, as flannel's). The other modes (one device
//! for both families) with `EnableIPv6`, and `Mode: "ipv6"`, are refused with an error naming
//! the setting.
//!
//! Each device is shown by `wg show` through a UAPI socket (wg-uapi) named after it; when
//! the socket cannot be made (another flanneld of the same host answers on it, as in
//! namespace testbeds) the backend runs without it, with a warning.

pub mod config;
pub mod dataplane;
pub mod key;
pub mod peers;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::IpNet;
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
use peers::Half;

/// flannel's device name (IPv4, and both families in the modes with one device).
pub const DEVICE: &str = "flannel-wg";
/// flannel's IPv6 device in `separate` mode.
pub const DEVICE_V6: &str = "flannel-wg-v6";

fn io_err(op: &str, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op: op.to_string(),
        source,
    }
}

fn config_err(key: &str, msg: impl Into<String>) -> BackendError {
    BackendError::Config {
        key: key.into(),
        msg: msg.into(),
    }
}

/// The `get=1` answer for one device: its data plane's peers, with the device's private key,
/// listen port and the cluster PSK (on every peer, as flannel configures it) as wireguard-go
/// reports them.
pub fn uapi_snapshot(
    private: &[u8; 32],
    listen_port: u16,
    psk: Option<[u8; 32]>,
    peers: Vec<PeerSnapshot>,
) -> wg_uapi::DeviceSnapshot {
    wg_uapi::DeviceSnapshot {
        private_key: Some(wg_uapi::Key(*private)),
        listen_port,
        fwmark: 0,
        peers: peers
            .into_iter()
            .map(|p| wg_uapi::PeerSnapshot {
                public_key: wg_uapi::Key(p.public_key),
                preshared_key: psk.map(wg_uapi::Key),
                endpoint: Some(p.endpoint),
                allowed_ips: p.allowed_ips,
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive_interval: p.persistent_keepalive.unwrap_or(0),
            })
            .collect(),
    }
}

/// One WireGuard device: `flannel-wg` (IPv4) or `flannel-wg-v6` (IPv6, `separate` mode).
#[derive(Debug)]
struct Plane {
    name: &'static str,
    half: Half,
    /// The cluster network of the device's family.
    network: IpNet,
    port: u16,
    index: u32,
    device: Arc<Mutex<dataplane::Device>>,
    /// `wg show <name>`; None when the socket could not be made.
    uapi: Option<wg_uapi::UapiServer>,
    /// Our lease subnet of this family.
    own: Option<IpNet>,
}

impl Plane {
    fn family(&self) -> Family {
        match self.half {
            Half::V4 => Family::V4,
            Half::V6 => Family::V6,
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dataplane::Device> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, dst: IpNet) -> Route {
        Route {
            dst,
            gateway: None,
            oif: self.index,
            onlink: false,
        }
    }
}

/// Makes the TUN `name`, its socket on `port` (every address of the family, as the kernel's
/// WireGuard listens), the data plane threads and the UAPI socket.
async fn make_plane(
    ctx: &BackendContext,
    cfg: &WgConfig,
    private: &key::PrivateKey,
    (name, half, network, port): (&'static str, Half, IpNet, u16),
    mtu: u32,
) -> Result<Plane, BackendError> {
    // A device of that name from an earlier run (flannel's kernel one, say) goes first, as
    // flannel recreates its own.
    if let Some(old) = ctx.netlink.link_by_name(name).await? {
        tracing::warn!("{name} already exists; recreating it");
        ctx.netlink.delete_link(old.index).await?;
    }
    let dev =
        dataplane::build_tun(name, mtu).map_err(|e| io_err(&format!("creating TUN {name}"), e))?;
    let link = ctx
        .netlink
        .link_by_name(name)
        .await?
        .ok_or_else(|| BackendError::DeviceMissing(format!("TUN {name}")))?;
    ctx.netlink.set_link_mtu_up(link.index, mtu).await?;
    let bind = match half {
        Half::V4 => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        Half::V6 => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    };
    let sock =
        std::net::UdpSocket::bind(bind).map_err(|e| io_err(&format!("binding UDP {bind}"), e))?;
    let device = dataplane::Device::start(
        dev,
        sock,
        dataplane::DeviceConfig {
            key: private,
            psk: cfg.psk.as_ref().map(|p| p.0),
            keepalive: cfg.keepalive,
            mtu,
        },
    )
    .map_err(|e| io_err(&format!("starting the wireguard threads of {name}"), e))?;
    let device = Arc::new(Mutex::new(device));
    let uapi = start_uapi(name, &device, private, port, cfg.psk.as_ref().map(|p| p.0));
    Ok(Plane {
        name,
        half,
        network,
        port,
        index: link.index,
        device,
        uapi,
        own: None,
    })
}

/// `wg show <name>`'s socket, or None (logged) when it cannot be made: the device works
/// without it.
fn start_uapi(
    name: &str,
    device: &Arc<Mutex<dataplane::Device>>,
    private: &key::PrivateKey,
    port: u16,
    psk: Option<[u8; 32]>,
) -> Option<wg_uapi::UapiServer> {
    let dev = Arc::downgrade(device);
    let secret = private.0;
    let source = move || -> Result<wg_uapi::DeviceSnapshot, wg_uapi::SnapshotError> {
        let dev = dev.upgrade().ok_or("the wireguard device is gone")?;
        let peers = dev.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        Ok(uapi_snapshot(&secret, port, psk, peers))
    };
    match wg_uapi::UapiServer::start(name, Arc::new(source)) {
        Ok(s) => {
            tracing::info!(socket = %s.path().display(), "`wg show {name}` served");
            Some(s)
        }
        Err(e) => {
            tracing::warn!("no `wg show {name}` on this node: {e}");
            None
        }
    }
}

/// What this build carries: with `EnableIPv6` only `Mode: "separate"` (two devices); each
/// enabled family needs an address of that family on the external interface.
fn check_families(cfg: &WgConfig, ctx: &BackendContext) -> Result<(), BackendError> {
    if ctx.network6.is_some() && cfg.mode != Mode::Separate {
        return Err(config_err(
            "Mode",
            format!(
                "{:?} (one device for both families) with EnableIPv6 is not supported by this build; use \"separate\" (the default: flannel-wg and flannel-wg-v6)",
                cfg.mode.as_str()
            ),
        ));
    }
    if ctx.network.is_some() && ctx.ext.v4.is_none() {
        return Err(config_err(
            "Type",
            format!("wireguard: interface {} has no IPv4 address", ctx.ext.name),
        ));
    }
    if ctx.network6.is_some() && ctx.ext.v6.is_none() {
        return Err(config_err(
            "Type",
            format!("wireguard: interface {} has no IPv6 address", ctx.ext.name),
        ));
    }
    Ok(())
}

/// The running wireguard backend.
#[derive(Debug)]
pub struct WireguardBackend {
    nl: Arc<dyn Netlink>,
    cfg: WgConfig,
    mtu: u32,
    public_key: [u8; 32],
    /// `flannel-wg` (IPv4 enabled) and `flannel-wg-v6` (IPv6 enabled).
    planes: Vec<Plane>,
    peers: PeerTable,
    problems: PeerLog,
}

impl WireguardBackend {
    pub async fn new(cfg: WgConfig, ctx: &BackendContext) -> Result<Self, BackendError> {
        check_families(&cfg, ctx)?;
        let path = key::key_file(std::env::var_os(key::KEY_FILE_ENV));
        let (private, made) =
            key::load_or_generate(&path).map_err(|e| config_err("Type", e.to_string()))?;
        if made {
            tracing::info!(file = %path.display(), "made a new WireGuard private key");
        }
        let mtu = cfg.device_mtu(ctx.ext.mtu);
        let mut want = Vec::new();
        if let Some(n) = ctx.network {
            want.push((DEVICE, Half::V4, IpNet::V4(n), cfg.listen_port));
        }
        if let Some(n) = ctx.network6 {
            want.push((DEVICE_V6, Half::V6, IpNet::V6(n), cfg.listen_port_v6));
        }
        let mut planes: Vec<Plane> = Vec::new();
        for w in want {
            match make_plane(ctx, &cfg, &private, w, mtu).await {
                Ok(p) => planes.push(p),
                Err(e) => {
                    for p in &mut planes {
                        let _ = remove_plane(ctx.netlink.as_ref(), p).await;
                    }
                    return Err(e);
                }
            }
        }
        let public_key = private.public();
        for p in &planes {
            tracing::info!(
                device = p.name,
                mtu,
                port = p.port,
                public_key = %config::encode_key(&public_key),
                psk = cfg.psk.is_some(),
                keepalive = cfg.keepalive.unwrap_or(0),
                "wireguard backend up"
            );
        }
        Ok(WireguardBackend {
            nl: ctx.netlink.clone(),
            cfg,
            mtu,
            public_key,
            planes,
            peers: PeerTable::default(),
            problems: PeerLog::default(),
        })
    }

    fn plane(&self, half: Half) -> Option<&Plane> {
        self.planes.iter().find(|p| p.half == half)
    }

    /// Device counters of `flannel-wg` (else `flannel-wg-v6`), shared with its threads.
    pub fn stats(&self) -> Arc<WgStats> {
        let p = self.plane(Half::V4).or(self.planes.first());
        match p {
            Some(p) => p.device().stats(),
            None => Arc::new(WgStats::default()),
        }
    }

    /// Every peer's state on every device.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        self.planes
            .iter()
            .flat_map(|p| p.device().snapshot())
            .collect()
    }

    /// The public key published in the lease.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn listen_port(&self) -> u16 {
        self.cfg.listen_port
    }

    /// Where `wg show` reads each device (those whose socket could be made).
    pub fn uapi_sockets(&self) -> Vec<std::path::PathBuf> {
        self.planes
            .iter()
            .filter_map(|p| p.uapi.as_ref().map(|s| s.path().to_path_buf()))
            .collect()
    }
}

/// The device's address, its Network route (unless another device has it) and one route per
/// wireguard peer; routes of ours to subnets no peer has any more go.
async fn ensure_routes(
    nl: &dyn Netlink,
    plane: &Plane,
    peer_nets: &[IpNet],
) -> Result<usize, BackendError> {
    let Some(own) = plane.own else { return Ok(0) };
    let mut changes = ensure_subnet_address(nl, plane.index, own).await?;
    let have = nl.routes(plane.family()).await?;
    let net = plane.network;
    if !have.iter().any(|r| r.dst == net && r.gateway.is_none()) {
        nl.set_route(plane.route(net)).await?;
        changes += 1;
    }
    for n in peer_nets {
        let r = plane.route(*n);
        if !have.contains(&r) {
            nl.set_route(r).await?;
            changes += 1;
        }
    }
    // Our routes to subnets of the Network no wireguard peer has any more.
    for r in have.iter().filter(|r| {
        r.oif == plane.index
            && r.gateway.is_none()
            && r.dst.prefix_len() > net.prefix_len()
            && net.contains(&r.dst)
            && !peer_nets.contains(&r.dst)
    }) {
        nl.del_route(*r).await?;
        changes += 1;
    }
    Ok(changes)
}

/// Stops the device's threads, drops its UAPI socket, its routes and its TUN.
async fn remove_plane(nl: &dyn Netlink, p: &mut Plane) -> Result<(), BackendError> {
    p.uapi = None;
    let threads = p.device().stop();
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a wireguard thread panicked");
            }
        }
    })
    .await;
    let routes: Vec<Route> = nl
        .routes(p.family())
        .await?
        .into_iter()
        .filter(|r| r.oif == p.index)
        .collect();
    crate::netlink::del_routes(nl, routes).await?;
    // The TUN goes now: a backend of this type made next (a switch with new options) gets the
    // name free.
    if let Some(l) = nl.link_by_name(p.name).await? {
        if l.index == p.index {
            nl.delete_link(l.index).await?;
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for WireguardBackend {
    fn backend_type(&self) -> &'static str {
        peers::BACKEND_TYPE
    }

    /// `{"PublicKey","Port"}` when IPv4 is enabled, as flannel's.
    fn backend_data(&self) -> Option<Value> {
        self.plane(Half::V4)
            .map(|p| peers::backend_data(&self.public_key, p.port))
    }

    /// `{"PublicKey","Port": ListenPortV6}` when IPv6 is enabled, as flannel's.
    fn backend_v6_data(&self) -> Option<Value> {
        self.plane(Half::V6)
            .map(|p| peers::backend_data(&self.public_key, p.port))
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        for p in &mut self.planes {
            p.own = match p.half {
                Half::V4 => own.key.ipv4.map(IpNet::V4),
                Half::V6 => own.key.ipv6.map(IpNet::V6),
            };
        }
        self.peers.remove(&own.key);
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        let mut changes = 0;
        let mut all_problems: Vec<(SubnetKey, String)> = Vec::new();
        for plane in &self.planes {
            let (want, problems) = peers::desired_for(
                self.peers.leases(),
                plane.half,
                plane.port,
                &self.public_key,
            );
            for (k, e) in problems {
                all_problems.push((k, format!("{}: {e}", plane.name)));
            }
            // Live switching (peers of other types) is an IPv4 matter (docs/wireguard.md).
            let switching = match plane.half {
                Half::V4 => peers::switching(self.peers.leases()),
                Half::V6 => Vec::new(),
            };
            let d = plane.device().apply(&want, &switching);
            for p in &d.add {
                tracing::info!(device = plane.name, subnet = %p.allowed, endpoint = %p.endpoint, "wireguard peer added");
            }
            for p in &d.update {
                tracing::info!(device = plane.name, subnet = %p.allowed, endpoint = %p.endpoint, "wireguard peer changed");
            }
            for k in &d.remove {
                tracing::info!(device = plane.name, public_key = %config::encode_key(k), "wireguard peer removed");
            }
            let nets: Vec<IpNet> = want.iter().map(|p| p.allowed).collect();
            changes += ensure_routes(self.nl.as_ref(), plane, &nets).await?;
            changes += d.add.len() + d.update.len() + d.remove.len();
        }
        // Every wireguard lease: fine, or why it gives no peer (logged once per change).
        let status: Vec<(SubnetKey, Option<String>)> = self
            .peers
            .leases()
            .filter(|l| l.attrs.backend_type == peers::BACKEND_TYPE)
            .map(|l| {
                let why: Vec<&str> = all_problems
                    .iter()
                    .filter(|(k, _)| *k == l.key)
                    .map(|(_, e)| e.as_str())
                    .collect();
                (l.key, (!why.is_empty()).then(|| why.join("; ")))
            })
            .collect();
        self.problems.log(
            "wireguard peer not configured",
            std::time::Instant::now(),
            status,
        );
        Ok(changes)
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        for p in &mut self.planes {
            remove_plane(self.nl.as_ref(), p).await?;
        }
        Ok(())
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        let mut add = |k: String, v: u64| *m.entry(k).or_insert(0) += v;
        let mut peers = 0;
        for p in &self.planes {
            let dev = p.device();
            let s = dev.stats();
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
                ("wireguard_gro_batches", &s.gro_batches),
                ("wireguard_offload_disabled", &s.offload_disabled),
                ("wireguard_gso_disabled", &s.gso_disabled),
                ("wireguard_gro_disabled", &s.gro_disabled),
            ];
            for (k, v) in named {
                add(k.to_string(), v.load(Ordering::Relaxed));
            }
            for d in DropReason::ALL {
                add(format!("wireguard_dropped_{}", d.label()), s.dropped(d));
            }
            peers += dev.snapshot().len() as u64;
        }
        add("wireguard_peers".into(), peers);
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn ipv6_is_carried_in_separate_mode_only() {
        let nl = Arc::new(crate::netlink::FakeNetlink::default());
        let cfg = |mode: &str| {
            let o = serde_json::json!({ "Mode": mode });
            WgConfig::parse(o.as_object().unwrap()).unwrap().0
        };
        for (v4, v6) in [(true, false), (true, true), (false, true)] {
            let ctx = crate::testing::ctx(nl.clone(), v4, v6);
            assert!(check_families(&cfg("separate"), &ctx).is_ok(), "{v4} {v6}");
        }
        for mode in ["auto", "ipv4"] {
            assert!(
                check_families(&cfg(mode), &crate::testing::ctx(nl.clone(), true, false)).is_ok()
            );
            for (v4, v6) in [(true, true), (false, true)] {
                let e = check_families(&cfg(mode), &crate::testing::ctx(nl.clone(), v4, v6))
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.starts_with("Backend.Mode:") && e.contains("separate"),
                    "{e}"
                );
            }
        }
        // A family enabled without an address of it on the interface.
        let mut ctx = crate::testing::ctx(nl.clone(), true, true);
        ctx.ext.v6 = None;
        let e = check_families(&cfg("separate"), &ctx)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no IPv6 address"), "{e}");
    }

    fn s_peer() -> PeerSnapshot {
        PeerSnapshot {
            public_key: [3; 32],
            endpoint: "172.30.0.13:51820".parse().unwrap(),
            allowed_ips: vec!["10.5.3.0/24".parse().unwrap()],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
        }
    }

    #[test]
    fn the_uapi_snapshot_carries_key_port_psk_and_peers() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let peers = vec![
            PeerSnapshot {
                public_key: [1; 32],
                endpoint: "172.30.0.12:51820".parse().unwrap(),
                allowed_ips: vec!["10.5.2.0/24".parse().unwrap()],
                last_handshake: Some(t),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: Some(25),
            },
            PeerSnapshot {
                public_key: [2; 32],
                endpoint: "[fd00::12]:51821".parse().unwrap(),
                allowed_ips: vec!["fd10:0:0:2::/64".parse().unwrap()],
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
            },
        ];
        let s = uapi_snapshot(&[7; 32], 51820, Some([9; 32]), peers);
        let text = wg_uapi::render_get(&s);
        assert!(text.starts_with(&format!(
            "private_key={}\nlisten_port=51820\n",
            "07".repeat(32)
        )));
        assert_eq!(
            text.matches(&format!("preshared_key={}", "09".repeat(32)))
                .count(),
            2
        );
        for line in [
            "endpoint=172.30.0.12:51820",
            "endpoint=[fd00::12]:51821",
            "allowed_ip=10.5.2.0/24",
            "allowed_ip=fd10:0:0:2::/64",
            "last_handshake_time_sec=1700000000",
            "rx_bytes=10",
            "tx_bytes=20",
            "persistent_keepalive_interval=25",
            "persistent_keepalive_interval=0",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
        // Without a PSK, wireguard-go's zeros (`wg` shows none).
        let one = vec![PeerSnapshot {
            persistent_keepalive: None,
            ..s_peer()
        }];
        let none = uapi_snapshot(&[7; 32], 51821, None, one);
        assert!(wg_uapi::render_get(&none).contains(&format!("preshared_key={}\n", "0".repeat(64))));
    }
}
