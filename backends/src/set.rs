//! The backends a node runs: the primary one (what the config asks for; its type and data are
//! published in our lease, its MTU goes to pods) and, beside it, one for each other type that
//! peers advertise, so a node keeps reaching every peer while a cluster switches backends (a
//! vxlan node reaches a udp peer over its own udp path, and the other way round). A secondary
//! backend is torn down once no peer advertises its type. [`BackendSet::switch`] changes the
//! primary live: the new backend comes up (and gets every known peer) before the old one steps
//! back to secondary, so traffic keeps flowing.
//!
//! Peers of a type this node cannot run (`alloc`, a backend that fails to start here such as
//! host-gw behind NAT) are reported by [`BackendSet::unreachable`] with the reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use subnet_lease::manager::Event;
use subnet_lease::{BackendConfig, Lease, SubnetKey};

use crate::netlink::Family;
use crate::peerlog::PeerLog;
use crate::{create, peer_gateway_route, Backend, BackendContext, BackendError, PeerTable};

/// Whether two configs of one type give the same backend (options compared as parsed).
fn same_settings(a: &BackendConfig, b: &BackendConfig) -> bool {
    if a.backend_type != b.backend_type {
        return false;
    }
    match a.backend_type.as_str() {
        "vxlan" => matches!(
            (crate::vxlan::VxlanConfig::parse(&a.options), crate::vxlan::VxlanConfig::parse(&b.options)),
            (Ok((x, _)), Ok((y, _))) if x == y
        ),
        "udp" => matches!(
            (crate::udp::UdpConfig::parse(&a.options), crate::udp::UdpConfig::parse(&b.options)),
            (Ok((x, _)), Ok((y, _))) if x == y
        ),
        "wireguard" => matches!(
            (crate::wireguard::WgConfig::parse(&a.options), crate::wireguard::WgConfig::parse(&b.options)),
            (Ok((x, _)), Ok((y, _))) if x == y
        ),
        "host-gw" | "alloc" => true,
        _ => a.options == b.options,
    }
}

/// Types a node can run beside its primary for peers that advertise them.
const DATA_PLANES: &[&str] = &["vxlan", "udp", "host-gw", "wireguard"];

/// VXLAN devices an earlier run may have left that nothing running here owns: with no vxlan
/// backend running (`vni` None), the default ones `flannel.1` and `flannel-v6.1`; with one
/// running on `vni`, the device of a family that is not enabled (a node that went from dual
/// stack to one family keeps no device, nor the routes on it, of the other). Pure.
pub fn stale_vxlan_devices(vni: Option<u32>, ipv4: bool, ipv6: bool) -> Vec<String> {
    let mut v = Vec::new();
    match vni {
        None => {
            v.push("flannel.1".to_string());
            v.push("flannel-v6.1".to_string());
        }
        Some(vni) => {
            if !ipv4 {
                v.push("flannel.1".to_string());
                v.push(format!("flannel.{vni}"));
            }
            if !ipv6 {
                v.push("flannel-v6.1".to_string());
                v.push(format!("flannel-v6.{vni}"));
            }
        }
    }
    v.dedup();
    v
}

/// How long a backend no peer advertises any more is kept before it is torn down. Peers
/// reach us the way *our* lease said until they see it change: when this node and its peers
/// switch at the same moment, a peer may still send over the old type for a few
/// milliseconds after we have seen all of them move on (measured: a TCP segment lost to the
/// retransmission timer, ~200 ms gap, without this grace).
pub const RETIRE_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct BackendSet {
    ctx: BackendContext,
    /// The config of the primary backend, and the backend.
    primary_cfg: BackendConfig,
    primary: Box<dyn Backend>,
    /// Backends run for peers of other types, by type, and the config each runs with.
    backends: BTreeMap<String, Box<dyn Backend>>,
    secondary_cfgs: BTreeMap<String, BackendConfig>,
    /// The newest network config's `Backend` this node has seen but may not have applied yet
    /// ([`BackendSet::offer`]): a secondary of its type starts with its options (a `PSK`).
    offered: Option<BackendConfig>,
    peers: PeerTable,
    own: Option<Lease>,
    /// Types that could not be started for peers: type → reason.
    failed: BTreeMap<String, String>,
    /// The running types when [`BackendSet::sweep`] last ran (it runs again when they change).
    swept: Option<Vec<String>>,
    /// Secondaries no peer advertises, by type: since when (torn down after [`RETIRE_GRACE`]).
    unwanted_since: BTreeMap<String, Instant>,
    /// Peers unreachable from this node, logged once per change.
    unreachable_log: PeerLog,
}

impl BackendSet {
    /// Starts the primary backend. Returns the set and warnings to log.
    pub async fn start(
        cfg: &BackendConfig,
        ctx: BackendContext,
    ) -> Result<(Self, Vec<String>), BackendError> {
        let (b, warnings) = create(cfg, &ctx).await?;
        let mut primary_cfg = cfg.clone();
        // A fallback (vxlan → udp) or an unknown type (→ alloc) runs as another type.
        primary_cfg.backend_type = b.backend_type().to_string();
        Ok((
            BackendSet {
                ctx,
                primary_cfg,
                primary: b,
                backends: BTreeMap::new(),
                secondary_cfgs: BTreeMap::new(),
                offered: None,
                peers: PeerTable::default(),
                own: None,
                failed: BTreeMap::new(),
                swept: None,
                unwanted_since: BTreeMap::new(),
                unreachable_log: PeerLog::default(),
            },
            warnings,
        ))
    }

    /// The backend whose type, data and MTU this node publishes.
    pub fn primary(&self) -> &dyn Backend {
        self.primary.as_ref()
    }

    /// The config the primary runs with.
    pub fn primary_config(&self) -> &BackendConfig {
        &self.primary_cfg
    }

    /// Types running now, primary included.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.backends.keys().cloned().collect();
        v.push(self.primary_cfg.backend_type.clone());
        v.sort();
        v
    }

    fn runs(&self, t: &str) -> bool {
        t == self.primary_cfg.backend_type || self.backends.contains_key(t)
    }

    pub async fn set_lease(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = Some(own.clone());
        self.peers.remove(&own.key);
        self.primary.set_lease(own).await?;
        for b in self.backends.values_mut() {
            b.set_lease(own).await?;
        }
        Ok(())
    }

    /// The `Backend` of the newest network config, as soon as this node sees it (before it
    /// is applied, or when it cannot be yet): a secondary started for peers of that type
    /// takes its options, so a node that lags in a switch to, say, wireguard with a `PSK`
    /// handshakes with the nodes already switched instead of failing until it switches too.
    /// Invalid options are not offered (the secondary gets the defaults).
    pub fn offer(&mut self, cfg: &BackendConfig) {
        self.offered = crate::validate(cfg).is_ok().then(|| cfg.clone());
    }

    /// Whether peers advertise a type with a data plane that runs nowhere here and has not
    /// failed to start: the next reconcile starts a secondary (the caller may
    /// [`BackendSet::offer`] the newest config first).
    pub fn wants_secondary(&self) -> bool {
        self.peer_types().iter().any(|t| {
            !self.runs(t) && DATA_PLANES.contains(&t.as_str()) && !self.failed.contains_key(t)
        })
    }

    /// The config a secondary of type `t` starts with: the offered one when it is of that
    /// type, else the type's defaults.
    fn secondary_config(&self, t: &str) -> BackendConfig {
        match &self.offered {
            Some(c) if c.backend_type == t => c.clone(),
            _ => BackendConfig {
                backend_type: t.to_string(),
                options: Default::default(),
            },
        }
    }

    pub fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
        self.primary.peer_event(ev);
        for b in self.backends.values_mut() {
            b.peer_event(ev);
        }
    }

    /// [`BackendSet::reconcile_at`] now.
    pub async fn reconcile(&mut self) -> Result<usize, BackendError> {
        self.reconcile_at(Instant::now()).await
    }

    /// Starts backends for peer types not running yet, reconciles every running backend,
    /// then retires those no peer has needed for [`RETIRE_GRACE`] (`now` is the caller's
    /// clock, so tests drive the grace without waiting). Returns the number of kernel changes.
    pub async fn reconcile_at(&mut self, now: Instant) -> Result<usize, BackendError> {
        let wanted = self.peer_types();
        for t in &wanted {
            if self.runs(t) || !DATA_PLANES.contains(&t.as_str()) {
                continue;
            }
            let cfg = self.secondary_config(t);
            match self.start_secondary(&cfg).await {
                Ok(()) => {
                    self.failed.remove(t);
                    tracing::info!(backend = %t, "started for peers that advertise it");
                }
                Err(e) => {
                    if self.failed.insert(t.clone(), e.to_string()).is_none() {
                        tracing::warn!(backend = %t, "cannot run it for its peers: {e}");
                    }
                }
            }
        }
        self.failed.retain(|t, _| wanted.contains(t));
        // Make before break: every running backend first takes its peers (routes of a peer
        // that changed type move to the backend now carrying it), then the backends no peer
        // needs are torn down. The other order leaves a window (a udp teardown joins its
        // threads, ~100 ms) in which a moved peer has no route at all.
        let mut changes = 0;
        let mut first_err = None;
        match self.primary.reconcile().await {
            Ok(n) => changes += n,
            Err(e) => first_err = Some(e),
        }
        for b in self.backends.values_mut() {
            match b.reconcile().await {
                Ok(n) => changes += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.unwanted_since.retain(|t, _| !wanted.contains(t));
        let mut retire = Vec::new();
        for t in self.backends.keys().filter(|t| !wanted.contains(t)) {
            let since = *self.unwanted_since.entry(t.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= RETIRE_GRACE {
                retire.push(t.clone());
            }
        }
        for t in retire {
            self.unwanted_since.remove(&t);
            self.secondary_cfgs.remove(&t);
            if let Some(mut b) = self.backends.remove(&t) {
                tracing::info!(backend = %t, "no peer advertises it any more; tearing it down");
                if let Err(e) = b.teardown().await {
                    tracing::warn!(backend = %t, "teardown: {e}");
                }
            }
        }
        let running = self.running();
        if self.swept.as_ref() != Some(&running) {
            changes += self.sweep().await;
            self.swept = Some(running);
        }
        // Each peer's reachability is logged when it changes (rate limited), not at every
        // reconcile: `flannel_peers_unreachable` carries the count.
        let mut unreachable: BTreeMap<SubnetKey, String> = self.unreachable().into_iter().collect();
        let states: Vec<_> = self
            .peers
            .leases()
            .map(|l| (l.key, unreachable.remove(&l.key)))
            .collect();
        self.unreachable_log
            .log("peer unreachable from this node", now, states);
        match first_err {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// Makes `cfg` the primary. A new type comes up beside the old one, which stays as a
    /// secondary while peers still advertise it; new options for the running type replace it
    /// (brief interruption: both cannot hold the same device). On failure the running state is
    /// kept (or restored) and the error returned.
    pub async fn switch(&mut self, cfg: &BackendConfig) -> Result<Vec<String>, BackendError> {
        // Bad options are refused before anything running is touched.
        crate::validate(cfg)?;
        if cfg.backend_type == self.primary_cfg.backend_type {
            self.primary.teardown().await?;
            match create(cfg, &self.ctx).await {
                Ok((b, warnings)) => {
                    self.install_primary(b, cfg).await?;
                    Ok(warnings)
                }
                Err(e) => {
                    tracing::error!(
                        "new {} options failed ({e}); restoring the old ones",
                        cfg.backend_type
                    );
                    let restore = self.primary_cfg.clone();
                    let (b, _) = create(&restore, &self.ctx).await?;
                    self.install_primary(b, &restore).await?;
                    Err(e)
                }
            }
        } else {
            // A secondary of the new type runs already (with the offered config's options or
            // the defaults, or as the primary it was): promote it when the new config means
            // the same (no moment without its routes), else replace it.
            let running = self
                .secondary_cfgs
                .remove(&cfg.backend_type)
                .unwrap_or_else(|| BackendConfig {
                    backend_type: cfg.backend_type.clone(),
                    options: Default::default(),
                });
            if let Some(mut b) = self.backends.remove(&cfg.backend_type) {
                if same_settings(&running, cfg) {
                    self.install_primary(b, cfg).await?;
                    return crate::validate(cfg);
                }
                if let Err(e) = b.teardown().await {
                    tracing::warn!(backend = %cfg.backend_type, "teardown: {e}");
                }
            }
            let (b, warnings) = create(cfg, &self.ctx).await?;
            self.install_primary(b, cfg).await?;
            Ok(warnings)
        }
    }

    /// Gives a new backend our lease and every peer, reconciles it, and makes it the primary;
    /// the one it replaces stays as a secondary unless it was of the same type (replaced in
    /// place, already torn down).
    async fn install_primary(
        &mut self,
        mut b: Box<dyn Backend>,
        cfg: &BackendConfig,
    ) -> Result<(), BackendError> {
        self.feed(b.as_mut()).await?;
        b.reconcile().await?;
        let mut cfg = cfg.clone();
        cfg.backend_type = b.backend_type().to_string();
        self.failed.remove(&cfg.backend_type);
        let old_cfg = std::mem::replace(&mut self.primary_cfg, cfg);
        let old = std::mem::replace(&mut self.primary, b);
        if old_cfg.backend_type != self.primary_cfg.backend_type {
            self.backends.insert(old_cfg.backend_type.clone(), old);
            self.secondary_cfgs
                .insert(old_cfg.backend_type.clone(), old_cfg);
        }
        Ok(())
    }

    async fn start_secondary(&mut self, cfg: &BackendConfig) -> Result<(), BackendError> {
        let (mut b, warnings) = create(cfg, &self.ctx).await?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        if b.backend_type() != cfg.backend_type {
            // A fallback made it another type: not what these peers need.
            let _ = b.teardown().await;
            return Err(BackendError::Fallback {
                wanted: cfg.backend_type.clone(),
                actual: b.backend_type().to_string(),
            });
        }
        self.feed(b.as_mut()).await?;
        if cfg.options.is_empty() {
            tracing::info!(backend = %cfg.backend_type, "secondary runs with the default options");
        } else {
            tracing::info!(backend = %cfg.backend_type, "secondary runs with the newest network config's options");
        }
        self.backends.insert(cfg.backend_type.clone(), b);
        self.secondary_cfgs
            .insert(cfg.backend_type.clone(), cfg.clone());
        Ok(())
    }

    /// Removes what a backend type that no longer runs here left behind, e.g. before a restart
    /// with another type (run by `reconcile` at start and whenever the running types change):
    /// the VXLAN devices [`stale_vxlan_devices`] names, and host-gw's routes of both families
    /// (gateway routes on the interface to subnets of the cluster network that are not ours and
    /// not a vxlan peer's, whose DirectRouting routes look the same). A udp TUN goes with its
    /// process. Errors are logged; returns the number of removals.
    async fn sweep(&self) -> usize {
        let nl = self.ctx.netlink.as_ref();
        let mut n = 0;
        let vni = self.running_vni();
        for name in
            stale_vxlan_devices(vni, self.ctx.network.is_some(), self.ctx.network6.is_some())
        {
            if let Ok(Some(l)) = nl.link_by_name(&name).await {
                if l.vxlan.is_some() {
                    match nl.delete_link(l.index).await {
                        Ok(()) => {
                            tracing::info!("removed {name} left by an earlier vxlan backend");
                            n += 1;
                        }
                        Err(e) => tracing::warn!("removing the old {name}: {e}"),
                    }
                }
            }
        }
        if !self.runs("host-gw") {
            let own = self.own.as_ref().map(|l| l.key);
            let families = [
                (
                    Family::V4,
                    self.ctx.network.map(IpNet::V4),
                    own.and_then(|k| k.ipv4).map(IpNet::V4),
                ),
                (
                    Family::V6,
                    self.ctx.network6.map(IpNet::V6),
                    own.and_then(|k| k.ipv6).map(IpNet::V6),
                ),
            ];
            for (family, network, own) in families {
                let Some(network) = network else { continue };
                // vxlan DirectRouting routes look the same; those of vxlan peers stay.
                let vxlan_peers = self.peers.nets(family, "vxlan", true);
                let stale: Vec<_> = match nl.routes(family).await {
                    Ok(r) => r
                        .into_iter()
                        .filter(|r| {
                            peer_gateway_route(r, &self.ctx.ext, network, own, &vxlan_peers)
                        })
                        .collect(),
                    Err(e) => {
                        tracing::warn!("reading {family} routes: {e}");
                        Vec::new()
                    }
                };
                for r in stale {
                    match nl.del_route(r).await {
                        Ok(()) => n += 1,
                        Err(e) => {
                            tracing::warn!("removing the old host-gw route to {}: {e}", r.dst)
                        }
                    }
                }
            }
        }
        n
    }

    /// The VNI of the vxlan backend running here, if one runs (a secondary's from the config
    /// it runs with).
    fn running_vni(&self) -> Option<u32> {
        if self.primary_cfg.backend_type == "vxlan" {
            let vni = crate::vxlan::VxlanConfig::parse(&self.primary_cfg.options)
                .map(|(c, _)| c.vni)
                .unwrap_or(1);
            Some(vni)
        } else if self.backends.contains_key("vxlan") {
            let vni = self
                .secondary_cfgs
                .get("vxlan")
                .and_then(|c| crate::vxlan::VxlanConfig::parse(&c.options).ok())
                .map_or(1, |(c, _)| c.vni);
            Some(vni)
        } else {
            None
        }
    }

    /// Gives a new backend our lease and every known peer.
    async fn feed(&self, b: &mut dyn Backend) -> Result<(), BackendError> {
        if let Some(own) = &self.own {
            b.set_lease(own).await?;
        }
        for l in self.peers.leases() {
            b.peer_event(&Event::PeerAdded(l.clone()));
        }
        Ok(())
    }

    /// Backend types the peers advertise.
    fn peer_types(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .peers
            .leases()
            .map(|l| l.attrs.data_plane().to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Peers this node cannot reach, with the reason.
    pub fn unreachable(&self) -> Vec<(SubnetKey, String)> {
        self.peers
            .leases()
            .filter(|l| !self.runs(l.attrs.data_plane()))
            .map(|l| {
                let t = l.attrs.data_plane();
                let why = match self.failed.get(t) {
                    Some(e) => format!("its backend {t} cannot run here: {e}"),
                    None if !DATA_PLANES.contains(&t) => {
                        format!("it advertises {t:?}, which has no data plane")
                    }
                    None => format!("its backend {t} is not running yet"),
                };
                (l.key, why)
            })
            .collect()
    }

    pub fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }

    /// Every running backend's counters (names are already per type).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut m = self.primary.counters();
        for b in self.backends.values() {
            m.extend(b.counters());
        }
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::netlink::{FakeNetlink, Netlink, Route};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use subnet_lease::LeaseAttrs;

    fn ctx(nl: Arc<FakeNetlink>) -> BackendContext {
        crate::testing::ctx(nl, true, false)
    }

    fn cfg(t: &str) -> BackendConfig {
        BackendConfig {
            backend_type: t.into(),
            options: Default::default(),
        }
    }

    fn lease(subnet: &str, last: u8, t: &str) -> Lease {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::new(172, 30, 0, last), t);
        if t == "vxlan" {
            attrs.backend_data = Some(
                serde_json::json!({"VNI": 1, "VtepMAC": format!("02:00:00:00:00:{last:02x}")}),
            );
        }
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    async fn route_dev(nl: &FakeNetlink, dst: &str) -> Option<u32> {
        nl.routes(crate::netlink::Family::V4)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.dst.to_string() == dst)
            .map(|r| r.oif)
    }

    /// A node on vxlan with its lease 10.5.1.0/24, on a fake kernel.
    async fn vxlan_node() -> (Arc<FakeNetlink>, BackendSet) {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (mut set, _) = BackendSet::start(&cfg("vxlan"), ctx(nl.clone()))
            .await
            .unwrap();
        set.set_lease(&lease("10.5.1.0/24", 11, "vxlan"))
            .await
            .unwrap();
        (nl, set)
    }

    #[tokio::test]
    async fn peers_of_other_types_get_their_backend_until_none_is_left() {
        let (nl, mut set) = vxlan_node().await;
        // A peer still (or already) on host-gw: a host-gw path starts beside vxlan.
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "host-gw")));
        // A peer with no data plane: reported, nothing started.
        set.peer_event(&Event::PeerAdded(lease("10.5.3.0/24", 13, "alloc")));
        set.reconcile().await.unwrap();
        assert_eq!(set.running(), vec!["host-gw", "vxlan"]);
        assert_eq!(set.primary().backend_type(), "vxlan");
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(2), "via eth0");
        let unreachable = set.unreachable();
        assert_eq!(unreachable.len(), 1);
        assert!(
            unreachable[0].1.contains("no data plane"),
            "{unreachable:?}"
        );
        // The peer switches to vxlan: its route moves to flannel.1 at once; host-gw stays for
        // the grace (the peer may still send that way until it sees our lease), then retires.
        let t0 = Instant::now();
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "vxlan")));
        set.reconcile_at(t0).await.unwrap();
        let vx = nl.link_by_name("flannel.1").await.unwrap().unwrap().index;
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(vx));
        set.reconcile_at(t0 + RETIRE_GRACE / 2).await.unwrap();
        assert_eq!(set.running(), vec!["host-gw", "vxlan"]);
        // Wanted again within the grace: the clock restarts.
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "host-gw")));
        set.reconcile_at(t0 + RETIRE_GRACE).await.unwrap();
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(2));
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "vxlan")));
        let t1 = t0 + RETIRE_GRACE * 2;
        set.reconcile_at(t1).await.unwrap();
        set.reconcile_at(t1 + RETIRE_GRACE / 2).await.unwrap();
        assert_eq!(set.running(), vec!["host-gw", "vxlan"]);
        set.reconcile_at(t1 + RETIRE_GRACE).await.unwrap();
        assert_eq!(set.running(), vec!["vxlan"]);
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(vx));
    }

    /// A peer lease exactly as flannel's udp backend writes it: no BackendType.
    fn flannel_udp_lease(subnet: &str, last: u8) -> Lease {
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs: serde_json::from_str(&format!(
                r#"{{"PublicIP":"172.30.0.{last}","PublicIPv6":null}}"#
            ))
            .unwrap(),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    #[tokio::test]
    async fn a_lease_without_type_is_a_udp_peer() {
        let (_nl, mut set) = vxlan_node().await;
        set.peer_event(&Event::PeerAdded(flannel_udp_lease("10.5.4.0/24", 14)));
        // The udp backend is wanted for it (not reconciled here: that would make a real TUN),
        // and until it runs the peer is reported as waiting for udp, not as a type without a
        // data plane.
        assert_eq!(set.peer_types(), vec!["udp"]);
        let unreachable = set.unreachable();
        assert_eq!(unreachable.len(), 1, "{unreachable:?}");
        assert_eq!(unreachable[0].1, "its backend udp is not running yet");
        // Its subnet counts as a udp peer's for the other backends.
        assert_eq!(
            set.peers.subnets("udp", true),
            vec!["10.5.4.0/24".parse::<ipnet::Ipv4Net>().unwrap()]
        );
    }

    #[tokio::test]
    async fn switching_keeps_the_old_backend_while_peers_use_it() {
        let (nl, mut set) = vxlan_node().await;
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "vxlan")));
        set.reconcile().await.unwrap();
        set.switch(&cfg("host-gw")).await.unwrap();
        assert_eq!(set.primary().backend_type(), "host-gw");
        assert_eq!(set.primary().mtu(), 1500);
        assert_eq!(
            set.running(),
            vec!["host-gw", "vxlan"],
            "vxlan stays for the peer"
        );
        set.reconcile().await.unwrap();
        let vx = nl.link_by_name("flannel.1").await.unwrap().unwrap().index;
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(vx));
        // Back to vxlan: the running secondary is promoted, not recreated (its routes never go).
        set.switch(&cfg("vxlan")).await.unwrap();
        assert_eq!(set.primary().backend_type(), "vxlan");
        assert_eq!(
            nl.link_by_name("flannel.1").await.unwrap().unwrap().index,
            vx
        );
        set.switch(&cfg("host-gw")).await.unwrap();
        set.reconcile().await.unwrap();
        assert_eq!(
            nl.link_by_name("flannel.1").await.unwrap().unwrap().index,
            vx
        );
        // The peer follows: host-gw routes it, vxlan goes with its device after the grace.
        set.peer_event(&Event::PeerAdded(lease("10.5.2.0/24", 12, "host-gw")));
        let t0 = Instant::now();
        set.reconcile_at(t0).await.unwrap();
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(2));
        set.reconcile_at(t0 + RETIRE_GRACE).await.unwrap();
        assert_eq!(set.running(), vec!["host-gw"]);
        assert!(nl.link_by_name("flannel.1").await.unwrap().is_none());
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(2));
        // New options for the running type replace it in place.
        let mut c = cfg("vxlan");
        set.switch(&c).await.unwrap();
        c.options.insert("VNI".into(), serde_json::json!(7));
        set.switch(&c).await.unwrap();
        assert_eq!(set.primary().backend_type(), "vxlan");
        assert!(nl.link_by_name("flannel.7").await.unwrap().is_some());
        assert!(nl.link_by_name("flannel.1").await.unwrap().is_none());
        // A config the backend rejects leaves the running one as it was.
        let before = nl.link_by_name("flannel.7").await.unwrap().unwrap().index;
        let calls = nl.lock().calls.len();
        let mut bad = cfg("vxlan");
        bad.options.insert("VNI".into(), serde_json::json!("seven"));
        let e = set.switch(&bad).await.unwrap_err();
        assert!(e.to_string().starts_with("Backend.VNI"), "{e}");
        assert_eq!(
            nl.lock().calls.len(),
            calls,
            "no kernel call for a rejected config"
        );
        let after = nl.link_by_name("flannel.7").await.unwrap().unwrap().index;
        assert_eq!(before, after, "the device was not touched");
        assert_eq!(
            set.primary_config().options.get("VNI"),
            Some(&serde_json::json!(7))
        );
    }

    /// A node that lags in a switch: peers advertise vxlan with VNI 7 before this node
    /// applied that config. The secondary started for them takes the offered config's options
    /// (here the VNI; for wireguard the PSK), and the switch promotes it instead of replacing
    /// it. Without an offer (or an offer of another type) it runs with the defaults.
    #[tokio::test]
    async fn a_secondary_runs_with_the_offered_config_and_is_promoted_by_it() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (mut set, _) = BackendSet::start(&cfg("host-gw"), ctx(nl.clone()))
            .await
            .unwrap();
        set.set_lease(&lease("10.5.1.0/24", 11, "host-gw"))
            .await
            .unwrap();
        assert!(!set.wants_secondary());
        let mut vni7 = cfg("vxlan");
        vni7.options.insert("VNI".into(), serde_json::json!(7));
        // An offer of another type, and an invalid one, change nothing.
        set.offer(&cfg("udp"));
        let mut bad = cfg("vxlan");
        bad.options.insert("VNI".into(), serde_json::json!("seven"));
        set.offer(&bad);
        assert_eq!(set.secondary_config("vxlan"), cfg("vxlan"));
        set.offer(&vni7);
        let mut peer = lease("10.5.2.0/24", 12, "vxlan");
        peer.attrs.backend_data =
            Some(serde_json::json!({"VNI": 7, "VtepMAC": "02:00:00:00:00:0c"}));
        set.peer_event(&Event::PeerAdded(peer));
        assert!(set.wants_secondary());
        set.reconcile().await.unwrap();
        assert!(!set.wants_secondary());
        assert_eq!(set.running(), vec!["host-gw", "vxlan"]);
        let vx = nl.link_by_name("flannel.7").await.unwrap().unwrap().index;
        assert!(nl.link_by_name("flannel.1").await.unwrap().is_none());
        assert_eq!(route_dev(&nl, "10.5.2.0/24").await, Some(vx));
        // The config arrives: the secondary is promoted, its device kept.
        set.switch(&vni7).await.unwrap();
        assert_eq!(set.primary().backend_type(), "vxlan");
        assert_eq!(
            nl.link_by_name("flannel.7").await.unwrap().unwrap().index,
            vx
        );
        // Back to host-gw: vxlan (VNI 7) stays as a secondary with its options, and a switch
        // back to the same options promotes it again.
        set.switch(&cfg("host-gw")).await.unwrap();
        assert_eq!(set.running(), vec!["host-gw", "vxlan"]);
        set.switch(&vni7).await.unwrap();
        assert_eq!(
            nl.link_by_name("flannel.7").await.unwrap().unwrap().index,
            vx
        );
        // A secondary running with other options (the old primary's defaults) is replaced.
        let (nl2, mut fresh) = vxlan_node().await;
        fresh.switch(&cfg("host-gw")).await.unwrap();
        assert!(nl2.link_by_name("flannel.1").await.unwrap().is_some());
        fresh.switch(&vni7).await.unwrap();
        assert!(nl2.link_by_name("flannel.7").await.unwrap().is_some());
        assert!(nl2.link_by_name("flannel.1").await.unwrap().is_none());
    }

    // ---- IPv6 and dual stack ----

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    /// A lease as flannel writes it for type `t` with the key's families.
    fn lease6(key: &str, last: u8, t: &str) -> Lease {
        let key = SubnetKey::parse(key).unwrap();
        let v4 = key
            .ipv4
            .map_or(Ipv4Addr::UNSPECIFIED, |_| Ipv4Addr::new(172, 30, 0, last));
        let mut attrs = LeaseAttrs::new(v4, t);
        attrs.public_ipv6 = key
            .ipv6
            .map(|_| format!("fd00:210::{last}").parse().unwrap());
        if t == "vxlan" {
            let mac = format!("02:00:00:00:00:{last:02x}");
            if key.ipv4.is_some() {
                attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac}));
            }
            let mac6 = format!("02:00:00:00:06:{last:02x}");
            attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac6}));
        }
        Lease {
            key,
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    async fn route6(nl: &FakeNetlink, dst: &str) -> Option<Route> {
        nl.routes(crate::netlink::Family::V6)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.dst.to_string() == dst)
    }

    async fn link_index(nl: &FakeNetlink, name: &str) -> Option<u32> {
        nl.link_by_name(name).await.unwrap().map(|l| l.index)
    }

    #[test]
    fn stale_vxlan_devices_per_running_vni_and_family() {
        assert_eq!(
            stale_vxlan_devices(None, true, true),
            vec!["flannel.1", "flannel-v6.1"]
        );
        assert!(stale_vxlan_devices(Some(1), true, true).is_empty());
        assert_eq!(
            stale_vxlan_devices(Some(1), true, false),
            vec!["flannel-v6.1"]
        );
        assert_eq!(
            stale_vxlan_devices(Some(7), false, true),
            vec!["flannel.1", "flannel.7"]
        );
    }

    #[tokio::test]
    async fn dual_stack_switch_vxlan_host_gw_and_back_moves_ipv6_routes() {
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let (mut set, _) =
            BackendSet::start(&cfg("vxlan"), crate::testing::ctx(nl.clone(), true, true))
                .await
                .unwrap();
        assert_eq!(set.primary().mtu(), 1430);
        set.set_lease(&lease6("10.5.1.0-24&fd10:0:0:11::-64", 11, "vxlan"))
            .await
            .unwrap();
        set.peer_event(&Event::PeerAdded(lease6(
            "10.5.2.0-24&fd10:0:0:12::-64",
            12,
            "vxlan",
        )));
        set.reconcile().await.unwrap();
        let v6dev = link_index(&nl, "flannel-v6.1").await.unwrap();
        assert_eq!(
            route6(&nl, "fd10:0:0:12::/64").await.map(|r| r.oif),
            Some(v6dev)
        );
        // To host-gw: vxlan stays for the peer until it moves too.
        set.switch(&cfg("host-gw")).await.unwrap();
        assert_eq!(set.primary().mtu(), 1500);
        set.reconcile().await.unwrap();
        assert_eq!(
            route6(&nl, "fd10:0:0:12::/64").await.map(|r| r.oif),
            Some(v6dev)
        );
        set.peer_event(&Event::PeerAdded(lease6(
            "10.5.2.0-24&fd10:0:0:12::-64",
            12,
            "host-gw",
        )));
        let t0 = Instant::now();
        set.reconcile_at(t0).await.unwrap();
        let via_eth0 = Route {
            dst: net("fd10:0:0:12::/64"),
            gateway: Some(ip("fd00:210::12")),
            oif: 2,
            onlink: false,
        };
        assert_eq!(route6(&nl, "fd10:0:0:12::/64").await, Some(via_eth0));
        set.reconcile_at(t0 + RETIRE_GRACE).await.unwrap();
        assert_eq!(set.running(), vec!["host-gw"]);
        assert_eq!(link_index(&nl, "flannel-v6.1").await, None);
        assert_eq!(link_index(&nl, "flannel.1").await, None);
        assert_eq!(route6(&nl, "fd10:0:0:12::/64").await, Some(via_eth0));
        // And back: the host-gw route moves to the device, then host-gw retires.
        set.switch(&cfg("vxlan")).await.unwrap();
        set.peer_event(&Event::PeerAdded(lease6(
            "10.5.2.0-24&fd10:0:0:12::-64",
            12,
            "vxlan",
        )));
        let t1 = t0 + RETIRE_GRACE * 2;
        set.reconcile_at(t1).await.unwrap();
        let v6dev = link_index(&nl, "flannel-v6.1").await.unwrap();
        assert_eq!(
            route6(&nl, "fd10:0:0:12::/64").await.map(|r| r.oif),
            Some(v6dev)
        );
        set.reconcile_at(t1 + RETIRE_GRACE).await.unwrap();
        assert_eq!(set.running(), vec!["vxlan"]);
        let v6 = nl.routes(crate::netlink::Family::V6).await.unwrap();
        assert!(v6.iter().all(|r| r.oif == v6dev), "{v6:?}");
        assert_eq!(set.reconcile().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn sweep_removes_ipv6_leftovers_but_never_another_owners_route() {
        // Left by an earlier dual-stack vxlan run: both devices. A host-gw node sweeps them.
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let p = |local: &str| crate::netlink::VxlanParams {
            vni: 1,
            port: 8472,
            local: ip(local),
            link: 2,
            learning: false,
            gbp: false,
        };
        let mac = crate::netlink::Mac([2, 0, 0, 0, 0, 9]);
        nl.create_vxlan("flannel.1", &p("172.30.0.11"), mac, 1450)
            .await
            .unwrap();
        nl.create_vxlan("flannel-v6.1", &p("fd00:210::11"), mac, 1430)
            .await
            .unwrap();
        let (mut set, _) =
            BackendSet::start(&cfg("host-gw"), crate::testing::ctx(nl.clone(), true, true))
                .await
                .unwrap();
        set.set_lease(&lease6("10.5.1.0-24&fd10:0:0:11::-64", 11, "host-gw"))
            .await
            .unwrap();
        set.reconcile().await.unwrap();
        assert_eq!(link_index(&nl, "flannel.1").await, None);
        assert_eq!(link_index(&nl, "flannel-v6.1").await, None);

        // Left by an earlier host-gw run: IPv6 routes. A vxlan node removes the stale one, not
        // a vxlan peer's DirectRouting route, nor one outside the IPv6Network, nor one without
        // a gateway.
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let r = |dst: &str, gw: Option<&str>| Route {
            dst: net(dst),
            gateway: gw.map(ip),
            oif: 2,
            onlink: false,
        };
        let stale = r("fd10:0:0:77::/64", Some("fd00:210::77"));
        let peer_direct = r("fd10:0:0:12::/64", Some("fd00:210::12"));
        let outside = r("fd99::/64", Some("fd00:210::99"));
        let no_gw = r("fd10:0:0:78::/64", None);
        for x in [stale, peer_direct, outside, no_gw] {
            nl.set_route(x).await.unwrap();
        }
        let mut direct = cfg("vxlan");
        direct
            .options
            .insert("DirectRouting".into(), serde_json::json!(true));
        let (mut set, _) = BackendSet::start(&direct, crate::testing::ctx(nl.clone(), true, true))
            .await
            .unwrap();
        set.set_lease(&lease6("10.5.1.0-24&fd10:0:0:11::-64", 11, "vxlan"))
            .await
            .unwrap();
        set.peer_event(&Event::PeerAdded(lease6(
            "10.5.2.0-24&fd10:0:0:12::-64",
            12,
            "vxlan",
        )));
        set.reconcile().await.unwrap();
        let mut v6 = nl.routes(crate::netlink::Family::V6).await.unwrap();
        v6.sort();
        let mut want = vec![peer_direct, outside, no_gw];
        want.sort();
        assert_eq!(v6, want);

        // A node that runs vxlan on IPv4 only removes an IPv6 device an earlier dual-stack run
        // left (its routes go with it).
        let nl = Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500));
        let old = nl
            .create_vxlan("flannel-v6.1", &p("fd00:210::11"), mac, 1430)
            .await
            .unwrap();
        nl.set_route(Route {
            dst: net("fd10:0:0:12::/64"),
            gateway: Some(ip("fd10:0:0:12::")),
            oif: old,
            onlink: true,
        })
        .await
        .unwrap();
        let (mut set, _) = BackendSet::start(&cfg("vxlan"), ctx(nl.clone()))
            .await
            .unwrap();
        set.reconcile().await.unwrap();
        assert_eq!(link_index(&nl, "flannel-v6.1").await, None);
        assert!(link_index(&nl, "flannel.1").await.is_some());
        assert!(nl
            .routes(crate::netlink::Family::V6)
            .await
            .unwrap()
            .is_empty());
    }
}
