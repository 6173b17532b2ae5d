//! The proxy's loop: it follows the registry and the pod records in etcd
//! ([`registry::follow`]) and after each burst of changes recomputes the service ports and
//! hands them to the data plane (nftables or userspace).

use std::collections::BTreeMap;
use std::time::Duration;

use ::nft::NftCommand;
use etcd_access::Connection;
use ipnet::{Ipv4Net, Ipv6Net};
use prometheus_client::metrics::counter::Counter;
use registry::follow::{follow, FollowOptions, Follower};
use registry::follow::{KeyReader, Update};
use registry::{IpFamily, Kind, Object};
use tokio::sync::watch;

use crate::metrics::ProxyMetrics;
use crate::model::{NodeInfo, PortId, PortsCache, ServicePort, Snapshot, Touched};
use crate::nft::ProxyConfig;
use crate::sync::{ConntrackCommand, NftNetlink, Syncer};
use crate::userspace::{UserspaceError, UserspaceOptions, UserspaceProxy};

/// How the proxy implements Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Userspace,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nftables" => Ok(Mode::Nftables),
            "userspace" => Ok(Mode::Userspace),
            other => Err(format!(
                "unknown proxy mode {other:?} (nftables, userspace)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub mode: Mode,
    pub node: NodeInfo,
    /// The cluster Network (ClusterIP traffic from outside it is masqueraded).
    pub cluster_cidr: Option<Ipv4Net>,
    /// Serve IPv6 Services too (nftables mode: the table `ip6 flannel-proxy`); off by
    /// default. When off, a table `ip6 flannel-proxy` left by an earlier run is removed.
    pub ipv6: bool,
    /// The cluster's IPv6 Network (`IPv6Network`): IPv6 ClusterIP traffic from outside it is
    /// masqueraded.
    pub cluster_cidr6: Option<Ipv6Net>,
    /// How long to wait for more changes after one arrives before syncing.
    pub debounce: Duration,
    /// How often to check that the table is still there (and rebuild it when not).
    pub check_interval: Duration,
    pub userspace: UserspaceOptions,
}

impl ProxyOptions {
    pub fn new(mode: Mode, node: NodeInfo, cluster_cidr: Option<Ipv4Net>) -> Self {
        ProxyOptions {
            mode,
            node,
            cluster_cidr,
            ipv6: false,
            cluster_cidr6: None,
            debounce: Duration::from_millis(5),
            check_interval: Duration::from_secs(10),
            userspace: UserspaceOptions::default(),
        }
    }
}

/// The proxy's copy of the etcd data it uses, updated key by key (pure).
#[derive(Debug, Clone)]
pub struct Cache {
    reader: KeyReader,
    pub snap: Snapshot,
    /// What changed since [`Cache::take_touched`].
    touched: Touched,
    /// Objects ignored because they do not decode or break the API's rules
    /// (`flannel_proxy_invalid_objects_total` once shared with [`ProxyMetrics`]).
    pub invalid_objects: Counter,
}

impl Cache {
    pub fn new(prefix: &str) -> Cache {
        Cache {
            reader: KeyReader::new(
                prefix,
                "service proxy",
                &[Kind::Service, Kind::Endpoints, Kind::Pod],
                true,
            ),
            snap: Snapshot::default(),
            touched: Touched::default(),
            invalid_objects: Counter::default(),
        }
    }

    /// What changed since the last call (for [`PortsCache::update`]).
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// Applies one key's new value (`None`: deleted). Returns whether anything the proxy
    /// uses changed. Values that do not decode or are not valid objects (the API server's
    /// rules, `registry::validate`) are logged, counted and treated as absent: anyone who can
    /// write one key must not be able to break the table or put text of their choosing in it.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        let u = self.reader.read(key, value, mod_revision);
        if u.rejected() {
            self.invalid_objects.inc();
        }
        let s = &mut self.snap;
        let t = &mut self.touched;
        match u {
            Update::Object {
                kind,
                key: k,
                object,
                ..
            } => {
                if matches!(kind, Kind::Service | Kind::Endpoints) {
                    t.services.insert(k.clone());
                }
                match (kind, object) {
                    (_, Some(Object::Service(o))) => {
                        s.services.insert(k, o);
                        true
                    }
                    (_, Some(Object::Endpoints(o))) => {
                        s.endpoints.insert(k, o);
                        true
                    }
                    (_, Some(Object::Pod(o))) => {
                        t.pod_labels.push((k.0.clone(), o.metadata.labels.clone()));
                        if let Some(old) = s.pods.insert(k.clone(), o) {
                            t.pod_labels.push((k.0, old.metadata.labels));
                        }
                        true
                    }
                    (Kind::Service, _) => s.services.remove(&k).is_some(),
                    (Kind::Endpoints, _) => s.endpoints.remove(&k).is_some(),
                    (Kind::Pod, _) => match s.pods.remove(&k) {
                        Some(old) => {
                            t.pod_labels.push((k.0, old.metadata.labels));
                            true
                        }
                        None => false,
                    },
                    _ => false,
                }
            }
            Update::Record { key: k, record, .. } => {
                if let Some(pod) = s.pods.get(&k) {
                    t.pod_labels
                        .push((k.0.clone(), pod.metadata.labels.clone()));
                }
                match record {
                    Some(r) => {
                        s.records.insert(k, r);
                        true
                    }
                    None => s.records.remove(&k).is_some(),
                }
            }
            Update::Ignored => false,
        }
    }
}

/// Why a sync of the data plane failed (it is retried as a full rebuild).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Nftables(#[from] ::nft::Error),
    #[error(transparent)]
    Userspace(#[from] UserspaceError),
}

type NftSyncer = Syncer<NftNetlink, ConntrackCommand>;

/// The data plane behind the loop.
enum Plane {
    /// One syncer per family: `ip flannel-proxy`, and `ip6 flannel-proxy` when IPv6 is on.
    Nft(Box<NftSyncer>, Option<Box<NftSyncer>>),
    User(Box<UserspaceProxy<NftCommand>>),
}

/// Syncs one family's table; a failure makes its next sync a full rebuild.
async fn sync_table(
    s: &mut NftSyncer,
    ports: &BTreeMap<PortId, ServicePort>,
    metrics: &ProxyMetrics,
) -> Result<(), ProxyError> {
    match s.sync(ports).await {
        Ok(rep) => {
            for c in &rep.conflicts {
                tracing::warn!("{c}");
            }
            metrics.observe_sync(rep.full, rep.elapsed, rep.changed);
            tracing::debug!(family = %s.family(), ?rep, "nftables sync");
            Ok(())
        }
        Err(e) => {
            metrics.sync_errors.inc();
            s.invalidate();
            Err(e.into())
        }
    }
}

impl Plane {
    async fn apply(
        &mut self,
        ports: &BTreeMap<PortId, ServicePort>,
        metrics: &ProxyMetrics,
    ) -> Result<(), ProxyError> {
        match self {
            Plane::Nft(v4, v6) => {
                // The families' tables are independent: one failing does not hold the other.
                let r4 = sync_table(v4, ports, metrics).await;
                let r6 = match v6 {
                    Some(v6) => sync_table(v6, ports, metrics).await,
                    None => Ok(()),
                };
                r4.and(r6)
            }
            Plane::User(p) => {
                let started = std::time::Instant::now();
                match p.apply(ports).await {
                    Ok(changed) => {
                        metrics.observe_sync(false, started.elapsed(), changed);
                        Ok(())
                    }
                    Err(e) => {
                        metrics.sync_errors.inc();
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// After a failed sync: the next one rebuilds (nftables mode: each syncer already
    /// invalidated itself when its own table failed).
    fn invalidate_failed(&mut self) {
        if let Plane::User(p) = self {
            p.invalidate();
        }
    }

    /// Whether our tables are still in the kernel (both modes have a `services` chain); a
    /// missing one is rebuilt at the next sync.
    async fn check_tables(&mut self, nft: &NftCommand) -> bool {
        match self {
            Plane::Nft(v4, v6) => {
                let mut all = true;
                for s in std::iter::once(v4).chain(v6.as_mut()) {
                    let family = crate::nft::table_family(s.family());
                    if !s.applier().chain_exists_in(family, "services").await {
                        s.invalidate();
                        all = false;
                    }
                }
                all
            }
            Plane::User(p) => {
                let mut present = nft
                    .chain_exists(::nft::Family::Ip, crate::nft::TABLE, "services")
                    .await;
                if p.serves_ipv6() {
                    present &= nft
                        .chain_exists(::nft::Family::Ip6, crate::nft::TABLE, "services")
                        .await;
                }
                if !present {
                    p.invalidate();
                }
                present
            }
        }
    }
}

/// The proxy as a registry follower: the cache, the model and the data plane.
struct Proxy {
    opts: ProxyOptions,
    metrics: ProxyMetrics,
    nft: NftCommand,
    cache: Cache,
    model: PortsCache,
    plane: Plane,
}

impl Follower for Proxy {
    type Error = ProxyError;

    fn clear(&mut self) {
        self.cache.snap = Snapshot::default();
        self.cache.touched = Touched::default();
    }

    fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        self.cache.apply(key, value, mod_revision)
    }

    fn relisted(&mut self) {
        self.model.rebuild(&self.cache.snap, &self.opts.node);
        self.cache.take_touched();
    }

    async fn sync(&mut self) -> Result<(), ProxyError> {
        let touched = self.cache.take_touched();
        self.model
            .update(&self.cache.snap, &self.opts.node, &touched);
        let ports = self.model.ports();
        let served = match (&self.plane, self.opts.ipv6) {
            (Plane::Nft(..), true) => ports.len(),
            (Plane::User(p), true) if p.serves_ipv6() => ports.len(),
            _ => ports
                .keys()
                .filter(|id| id.family == IpFamily::Ipv4)
                .count(),
        };
        self.metrics.service_ports.set(served as i64);
        let r = self.plane.apply(ports, &self.metrics).await;
        if r.is_err() {
            self.plane.invalidate_failed();
        }
        r
    }

    async fn check(&mut self) -> bool {
        self.plane.check_tables(&self.nft).await
    }
}

/// Runs the proxy until `stop` turns true; then removes what it installed.
pub async fn run(
    conn: Connection,
    opts: ProxyOptions,
    metrics: ProxyMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let nft = NftCommand::default();
    let cfg = ProxyConfig {
        cluster_cidr: opts.cluster_cidr,
        cluster_cidr6: opts.cluster_cidr6,
    };
    if !opts.ipv6 {
        // Not served: a table an earlier run left would DNAT to stale endpoints.
        let _ = nft.apply(&crate::nft::cleanup_in(::nft::Family::Ip6)).await;
    }
    let plane = match opts.mode {
        Mode::Nftables => Plane::Nft(
            Box::new(Syncer::new(
                NftNetlink::open().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "no netfilter netlink socket; incremental syncs use nft");
                    NftNetlink::default()
                }),
                ConntrackCommand::default(),
                cfg,
            )),
            // The IPv6 table's transactions go through `nft -f -` (no netlink encoder).
            opts.ipv6.then(|| {
                Box::new(Syncer::for_family(
                    IpFamily::Ipv6,
                    NftNetlink::default(),
                    ConntrackCommand::default(),
                    cfg,
                ))
            }),
        ),
        Mode::Userspace => Plane::User(Box::new(
            UserspaceProxy::new(nft.clone(), opts.userspace.clone(), metrics.clone())
                .with_ipv6(opts.ipv6),
        )),
    };
    let follow_opts = FollowOptions {
        name: "service proxy",
        debounce: opts.debounce,
        check_interval: opts.check_interval,
    };
    let mut cache = Cache::new(conn.prefix());
    cache.invalid_objects = metrics.invalid_objects.clone();
    let mut proxy = Proxy {
        cache,
        model: PortsCache::default(),
        plane,
        nft,
        opts,
        metrics,
    };
    follow(&conn, &follow_opts, &mut proxy, &mut stop).await;
    // nftables mode leaves its table in place, so Services keep working while flanneld
    // restarts (the next start rebuilds it; `flanneld --cleanup` removes it). The userspace
    // mode's redirects would point at listeners that are gone: they are removed.
    if let Plane::User(p) = &mut proxy.plane {
        p.shutdown().await;
        if let Err(e) = proxy.nft.apply(&crate::nft::cleanup()).await {
            tracing::warn!(error = %e, "removing the service proxy table");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service_ports;

    /// The incremental model agrees with a full rebuild after every change.
    fn check_incremental(cache: &mut Cache, model: &mut PortsCache, node: &NodeInfo) {
        let touched = cache.take_touched();
        model.update(&cache.snap, node, &touched);
        assert_eq!(model.ports(), &service_ports(&cache.snap, node));
    }

    const PREFIX: &str = "/coreos.com/network";

    fn put(cache: &mut Cache, yaml: &str) -> bool {
        let obj = registry::parse_documents(yaml).expect("manifest").remove(0);
        let m = obj.metadata();
        let ns = obj
            .kind()
            .namespaced()
            .then(|| m.namespace.clone().unwrap_or("default".into()));
        let mut obj = obj.clone();
        if let Some(ns) = &ns {
            obj.metadata_mut().namespace = Some(ns.clone());
        }
        let key =
            registry::store::object_key(PREFIX, obj.kind(), ns.as_deref(), &obj.metadata().name);
        let value = registry::to_json(&obj).to_string();
        cache.apply(&key, Some(value.as_bytes()), 7)
    }

    #[test]
    fn registry_objects_and_pod_records_feed_the_model() {
        let mut cache = Cache::new(PREFIX);
        assert!(put(
            &mut cache,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n"
        ));
        assert!(put(
            &mut cache,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nspec:\n  containers: [{name: c}]\n"
        ));
        // Namespaces do not matter to the proxy.
        assert!(!put(
            &mut cache,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"
        ));
        let node = NodeInfo {
            name: "n1".into(),
            subnet: None,
        };
        let mut model = PortsCache::default();
        check_incremental(&mut cache, &mut model, &node);
        let ports = service_ports(&cache.snap, &node);
        assert!(
            ports.values().next().expect("port").endpoints.is_empty(),
            "not attached yet"
        );
        let rec = r#"{"IP":"10.5.1.2","IPs":["10.5.1.2"],"Node":"n1","NodeIP":"172.30.0.10","Subnet":"10.5.1.0/24","ContainerID":"c","Ifname":"eth0"}"#;
        assert!(cache.apply(&format!("{PREFIX}/pods/default/a"), Some(rec.as_bytes()), 8));
        check_incremental(&mut cache, &mut model, &node);
        let ports = service_ports(&cache.snap, &node);
        let eps = &ports.values().next().expect("port").endpoints;
        assert_eq!(eps.len(), 1);
        assert!(eps[0].local && eps[0].port == 8080);
        // Deletions, a bad value, and keys the proxy does not use.
        assert!(cache.apply(&format!("{PREFIX}/pods/default/a"), None, 9));
        assert!(!cache.apply(&format!("{PREFIX}/pods/default/a"), Some(b"{not json"), 10));
        assert!(!cache.apply(&format!("{PREFIX}/subnets/10.5.1.0-24"), Some(b"{}"), 11));
        assert!(!cache.apply(
            &format!("{PREFIX}/registry/allocations/clusterips/10.96.0.10"),
            Some(b"default/web"),
            12
        ));
        let key = registry::store::object_key(PREFIX, Kind::Service, Some("default"), "web");
        assert!(cache.apply(&key, None, 13));
        check_incremental(&mut cache, &mut model, &node);
        assert!(service_ports(&cache.snap, &node).is_empty());
    }

    #[test]
    fn dual_stack_services_pass_the_boundary_check() {
        let mut cache = Cache::new(PREFIX);
        assert!(put(
            &mut cache,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:10:96::a']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]\n"
        ));
        assert!(put(
            &mut cache,
            "apiVersion: v1\nkind: Service\nmetadata: {name: six}\nspec:\n  clusterIP: 'fd00:10:96::b'\n  ipFamilies: [IPv6]\n  ports: [{port: 80}]\n"
        ));
        assert_eq!(cache.invalid_objects.get(), 0);
        let node = NodeInfo {
            name: "n1".into(),
            subnet: None,
        };
        let ids: Vec<String> = service_ports(&cache.snap, &node)
            .keys()
            .map(|id| id.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                "default/six/TCP/IPv6",
                "default/web/TCP",
                "default/web/TCP/IPv6"
            ]
        );
    }

    fn service_key(ns: &str, name: &str) -> String {
        registry::store::object_key(PREFIX, Kind::Service, Some(ns), name)
    }

    #[test]
    fn injection_attempts_are_ignored_and_counted() {
        let mut cache = Cache::new(PREFIX);
        for (i, port_name) in ["\"; flush ruleset;", "http\nflush ruleset", "a b", "x{y}"]
            .into_iter()
            .enumerate()
        {
            let name = format!("web{i}");
            let value = serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                         "ports": [{"name": port_name, "port": 80}]}
            });
            assert!(
                !cache.apply(
                    &service_key("default", &name),
                    Some(value.to_string().as_bytes()),
                    5
                ),
                "{port_name:?} accepted"
            );
        }
        assert!(cache.snap.services.is_empty());
        assert_eq!(cache.invalid_objects.get(), 4);
        // A valid object replaced by an invalid one is gone, not kept stale.
        let good = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
        });
        let key = service_key("default", "web");
        assert!(cache.apply(&key, Some(good.to_string().as_bytes()), 6));
        let mut bad = good.clone();
        bad["spec"]["ports"][0]["name"] = "h;".into();
        assert!(cache.apply(&key, Some(bad.to_string().as_bytes()), 7));
        assert!(cache.snap.services.is_empty());
        assert_eq!(cache.invalid_objects.get(), 5);
    }

    /// Text that nft must never see from input, checked line by line on a script: each line
    /// one command of ours (so no input started a new one), no quotes or comments, braces
    /// balanced, `;` only inside the fixed set declaration.
    fn check_script(script: &str, commands: usize, table: ::nft::Family) {
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.len(), commands, "{script}");
        for l in lines {
            assert!(
                ["add ", "delete ", "flush "]
                    .iter()
                    .any(|p| l.starts_with(p)),
                "{l:?}"
            );
            assert!(!l.contains(['"', '\'', '#', '\\', '\0', '\r']), "{l:?}");
            assert_eq!(l.matches('{').count(), l.matches('}').count(), "{l:?}");
            if l.contains(';') {
                let set = format!("add set {table} flannel-proxy aff-");
                assert!(l.starts_with(&set), "{l:?}");
                assert_eq!(l.matches(';').count(), 3, "{l:?}");
            }
        }
    }

    /// Every netlink attribute of `b` (recursively for nests) has a length that matches what
    /// it holds: nothing was cut.
    fn check_attrs(mut b: &[u8]) {
        while !b.is_empty() {
            assert!(b.len() >= 4, "attribute header cut");
            let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
            let kind = u16::from_ne_bytes([b[2], b[3]]);
            assert!(
                len >= 4 && len <= b.len(),
                "attribute length {len} of {}",
                b.len()
            );
            if kind & 0x8000 != 0 {
                check_attrs(&b[4..len]);
            }
            b = &b[((len + 3) & !3).min(b.len())..];
        }
    }

    fn check_batch(bytes: &[u8], messages: usize) {
        let mut at = 0;
        let mut n = 0;
        while at < bytes.len() {
            let h = &bytes[at..];
            let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
            assert!(len >= 20 && at + len <= bytes.len());
            check_attrs(&h[20..len]);
            at += len;
            n += 1;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(n, messages + 2, "begin, one per step, end");
    }

    /// Renders `ports` both ways (full `nft -f` text, the netlink batch of the same steps)
    /// and checks both.
    fn check_rendering(ports: &BTreeMap<PortId, ServicePort>) {
        let cfg = ProxyConfig {
            cluster_cidr: Some("10.5.0.0/16".parse().expect("cidr")),
            cluster_cidr6: Some("fd10::/48".parse().expect("cidr6")),
        };
        for family in [IpFamily::Ipv4, IpFamily::Ipv6] {
            let table = crate::nft::table_family(family);
            let rs = crate::nft::ruleset(ports.values().filter(|p| p.family() == family), &cfg);
            for name in rs.chains.keys().chain(rs.sets.keys()) {
                assert!(crate::nft::is_safe_name(name), "{name:?}");
            }
            let mut tx = crate::nft::Tx::default();
            tx.diff(&crate::nft::Ruleset::default(), &rs);
            let ops = tx.finish();
            let full = crate::nft::full_in(table, &rs);
            let dynamic = full
                .strip_prefix(&crate::nft::base_in(table))
                .expect("the base comes first");
            check_script(dynamic, ops.len(), table);
            match family {
                IpFamily::Ipv4 => {
                    let batch = crate::nfnl::encode(&ops, 1).expect("safe names always encode");
                    check_batch(&batch.bytes, ops.len());
                }
                // The IPv6 table is never sent through the encoder: it refuses.
                IpFamily::Ipv6 => {
                    assert!(rs.elements.is_empty() || crate::nfnl::encode(&ops, 1).is_err())
                }
            }
        }
    }

    /// Text of every kind: valid names, names with what nft or a shell would read as syntax,
    /// control characters, non-ASCII, and over-long ones.
    fn random_text(rng: &mut rand::rngs::StdRng) -> String {
        use rand::Rng;
        const PIECES: &[&str] = &[
            "web",
            "http",
            "a",
            "-",
            "0",
            "\"",
            ";",
            "\n",
            "{",
            "}",
            "#",
            " ",
            "\0",
            "/",
            "\\",
            "é",
            "flush ruleset",
            "'",
            "$(x)",
            ".",
            "_",
            "\r",
            "\t",
            "A",
        ];
        let parts = match rng.random_range(0..10) {
            0 => rng.random_range(40..120),
            _ => rng.random_range(1..6),
        };
        (0..parts)
            .map(|_| PIECES[rng.random_range(0..PIECES.len())])
            .collect()
    }

    /// Object → cache (decode + validate) → model → ruleset → text and netlink, for
    /// thousands of random Services and Endpoints: what reaches either form is always safe,
    /// and the encoder never cuts an attribute.
    #[test]
    fn fuzz_objects_to_rulesets() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_f1a7);
        let node = NodeInfo {
            name: "n1".into(),
            subnet: Some("10.5.1.0/24".parse().expect("subnet")),
        };
        let mut cache = Cache::new(PREFIX);
        let mut accepted = 0;
        for round in 0..3000u32 {
            let ns = if rng.random_bool(0.7) {
                "default".to_string()
            } else {
                random_text(&mut rng)
            };
            let name = if rng.random_bool(0.5) {
                format!("s{}", round % 50)
            } else {
                random_text(&mut rng)
            };
            let port_name = |rng: &mut rand::rngs::StdRng| {
                if rng.random_bool(0.5) {
                    "http".to_string()
                } else {
                    random_text(rng)
                }
            };
            let pn = port_name(&mut rng);
            let ip = format!(
                "10.96.{}.{}",
                rng.random_range(0..4),
                rng.random_range(1..255)
            );
            let mut svc = serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "clusterIP": ip,
                    "type": if rng.random_bool(0.3) { "NodePort" } else { "ClusterIP" },
                    "sessionAffinity": if rng.random_bool(0.3) { "ClientIP" } else { "None" },
                    "ports": [{"name": pn, "port": rng.random_range(-5..70000),
                               "targetPort": port_name(&mut rng)}]
                }
            });
            // Half of them dual stack (the IPv6 table is rendered and checked too).
            if rng.random_bool(0.5) {
                let ip6 = format!("fd00:10:96::{:x}", rng.random_range(1..0xffff));
                svc["spec"]["clusterIPs"] = serde_json::json!([ip, ip6]);
                svc["spec"]["ipFamilies"] = serde_json::json!(["IPv4", "IPv6"]);
                svc["spec"]["ipFamilyPolicy"] = serde_json::json!("PreferDualStack");
            }
            let eps = serde_json::json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns},
                "subsets": [{
                    "addresses": [{"ip": format!("10.5.{}.{}", rng.random_range(0..3), rng.random_range(1..255))},
                                  {"ip": format!("fd10:0:0:{}::{:x}", rng.random_range(0..3), rng.random_range(1..0xffff))}],
                    "ports": [{"name": if rng.random_bool(0.7) { pn.clone() } else { port_name(&mut rng) },
                               "port": rng.random_range(1..65536)}]
                }]
            });
            let skey = registry::store::object_key(PREFIX, Kind::Service, Some(&ns), &name);
            let ekey = registry::store::object_key(PREFIX, Kind::Endpoints, Some(&ns), &name);
            if cache.apply(&skey, Some(svc.to_string().as_bytes()), i64::from(round)) {
                accepted += 1;
            }
            cache.apply(&ekey, Some(eps.to_string().as_bytes()), i64::from(round));
            if round % 100 == 99 {
                let ports = service_ports(&cache.snap, &node);
                for id in ports.keys() {
                    assert!(registry::validate::is_dns1123_label(&id.namespace), "{id}");
                    assert!(registry::validate::is_dns1035_label(&id.name), "{id}");
                    // A Service port's name is a DNS-1123 label (the API server's rule; "0"
                    // is one), not necessarily an IANA service name.
                    assert!(
                        id.port_name.is_empty()
                            || registry::validate::is_dns1123_label(&id.port_name),
                        "{id}"
                    );
                }
                check_rendering(&ports);
            }
        }
        assert!(accepted > 100, "the generator makes valid objects too");
        let ports = service_ports(&cache.snap, &node);
        assert!(
            ports.keys().any(|id| id.family == IpFamily::Ipv6),
            "the generator makes dual-stack Services"
        );
        assert!(cache.invalid_objects.get() > 100, "and invalid ones");

        // The renderer on its own, as if a bug upstream let anything through: names of
        // any text, up to several kilobytes, still render as safe, bounded identifiers.
        let mut ports = BTreeMap::new();
        for i in 0..500u32 {
            let id = PortId {
                namespace: random_text(&mut rng).repeat(1 + (i % 3) as usize * 20),
                name: random_text(&mut rng),
                port_name: random_text(&mut rng),
                protocol: registry::Protocol::Tcp,
                family: IpFamily::Ipv4,
            };
            let ep = crate::model::Endpoint {
                ip: std::net::Ipv4Addr::new(10, 5, 1, (i % 250) as u8 + 1).into(),
                port: 8080,
                local: true,
            };
            let mut sp = ServicePort::new(
                id.clone(),
                std::net::Ipv4Addr::from(0x0a60_0000 + i),
                80,
                vec![ep],
            );
            sp.affinity = Some(u32::MAX);
            sp.node_port = Some(30000 + i as u16);
            ports.insert(id, sp);
        }
        check_rendering(&ports);
    }
}
