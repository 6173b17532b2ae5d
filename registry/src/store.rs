//! The objects in etcd, under flannel's prefix.
//!
//! Keys: `<prefix>/registry/namespaces/<name>` and `<prefix>/registry/<plural>/<namespace>/<name>`
//! (plural from [`Kind::plural`]); value: the object's JSON ([`to_json`]: `apiVersion`, `kind`,
//! then its fields; `resourceVersion` is never stored, it is the key's mod revision on read).
//!
//! Allocations: `<prefix>/registry/allocations/clusterips/<ip>` and
//! `<prefix>/registry/allocations/nodeports/<port>`, value `<namespace>/<name>` of the Service
//! holding it. [`parse_key`] returns None for them, so a watcher of `<prefix>/registry/` skips
//! them.
//!
//! Every write is one etcd txn guarded by what was read: the object's mod revision (or
//! `version == 0` to create), the namespace key (it must still exist), `version == 0` for each
//! allocation taken and `value == <namespace>/<name>` for each kept or released; a conflict is
//! re-read and re-planned a bounded number of times. So two Services never get the same
//! ClusterIP or NodePort, and an object never lands in a namespace being deleted.
//!
//! Pure parts: the key functions, [`decode`], [`normalize`], [`plan_service`], [`choose_free`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use ipnet::Ipv4Net;
use rand::Rng;
use subnet_lease::{config, EtcdOptions, EtcdRegistry, Registry, RegistryError};

use crate::parse::{object_from_value, to_json, ObjectError};
use crate::types::{
    Endpoints, Kind, Namespace, NetworkPolicy, Object, ObjectMeta, Pod, Protocol, Service,
};
use crate::validate::{
    is_dns1123_label, is_dns1123_subdomain, validate, FieldError, ValidationErrors, NODE_PORT_MAX,
    NODE_PORT_MIN,
};

/// The directory under the etcd prefix holding registry objects.
pub const REGISTRY_DIR: &str = "registry";
/// Where namespaced objects without a namespace go.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Namespaces that always exist, stored or not (and cannot be deleted).
pub const IMPLICIT_NAMESPACES: &[&str] = &["default", "kube-system"];
/// The label every Namespace carries with its own name (as Kubernetes sets it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Operations per txn when deleting a namespace's objects (below [`MAX_TXN_OPS`]).
const DELETE_BATCH_OPS: usize = 100;
/// Plans and txns tried before giving up on conflicting concurrent writers.
const ATTEMPTS: u32 = 25;

fn trim(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// `<prefix>/registry/`: everything the registry stores (objects and allocations).
pub fn registry_prefix(prefix: &str) -> String {
    format!("{}/{REGISTRY_DIR}/", trim(prefix))
}

/// The key of an object. A namespaced kind without namespace is in `default`; a Namespace
/// ignores `namespace`.
pub fn object_key(prefix: &str, kind: Kind, namespace: Option<&str>, name: &str) -> String {
    if kind.namespaced() {
        format!(
            "{}{}/{}/{name}",
            registry_prefix(prefix),
            kind.plural(),
            namespace.unwrap_or(DEFAULT_NAMESPACE)
        )
    } else {
        format!("{}{}/{name}", registry_prefix(prefix), kind.plural())
    }
}

/// The prefix of a kind's keys: every namespace (`namespace` None, or a cluster-scoped kind)
/// or one namespace.
pub fn kind_prefix(prefix: &str, kind: Kind, namespace: Option<&str>) -> String {
    match namespace.filter(|_| kind.namespaced()) {
        Some(ns) => format!("{}{}/{ns}/", registry_prefix(prefix), kind.plural()),
        None => format!("{}{}/", registry_prefix(prefix), kind.plural()),
    }
}

/// `<prefix>/registry/allocations/`.
pub fn allocations_prefix(prefix: &str) -> String {
    format!("{}allocations/", registry_prefix(prefix))
}

/// `<prefix>/registry/allocations/clusterips/<ip>`.
pub fn cluster_ip_key(prefix: &str, ip: Ipv4Addr) -> String {
    format!("{}clusterips/{ip}", allocations_prefix(prefix))
}

/// `<prefix>/registry/allocations/nodeports/<port>`.
pub fn node_port_key(prefix: &str, port: u16) -> String {
    format!("{}nodeports/{port}", allocations_prefix(prefix))
}

/// `(kind, namespace, name)` of an object key; None for anything else under the prefix
/// (allocation keys included).
pub fn parse_key(prefix: &str, key: &str) -> Option<(Kind, Option<String>, String)> {
    let rest = key.strip_prefix(&registry_prefix(prefix))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let kind = Kind::ALL
        .into_iter()
        .find(|k| Some(&k.plural()) == parts.first())?;
    match (kind.namespaced(), parts.as_slice()) {
        (false, [_, name]) if !name.is_empty() => Some((kind, None, name.to_string())),
        (true, [_, ns, name]) if !ns.is_empty() && !name.is_empty() => {
            Some((kind, Some(ns.to_string()), name.to_string()))
        }
        _ => None,
    }
}

/// What an allocation key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allocation {
    ClusterIp(Ipv4Addr),
    NodePort(u16),
}

/// The allocation an allocation key names.
pub fn parse_allocation_key(prefix: &str, key: &str) -> Option<Allocation> {
    let rest = key.strip_prefix(&allocations_prefix(prefix))?;
    if let Some(ip) = rest.strip_prefix("clusterips/") {
        return ip.parse().ok().map(Allocation::ClusterIp);
    }
    rest.strip_prefix("nodeports/")?
        .parse()
        .ok()
        .map(Allocation::NodePort)
}

/// The owner of a Service's allocations: `<namespace>/<name>`.
pub fn owner(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// A stored value that is not the object its key names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("key {key}: not an object key under <prefix>/{REGISTRY_DIR}/")]
    Key { key: String },
    #[error("key {key}: value is not JSON: {msg}")]
    Json { key: String, msg: String },
    #[error("key {key}: {error}")]
    Object { key: String, error: ObjectError },
    #[error("key {key}: holds {found}, but the key names {expected}")]
    Mismatch {
        key: String,
        expected: String,
        found: String,
    },
}

/// `Service default/web`, `Namespace prod`.
pub fn describe(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|_| kind.namespaced()) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn describe_obj(obj: &Object) -> String {
    let m = obj.metadata();
    describe(obj.kind(), m.namespace.as_deref(), &m.name)
}

/// The object stored at `key` (a value read at `mod_revision`, which becomes its
/// `metadata.resourceVersion`). The value must be the object the key names.
pub fn decode(
    prefix: &str,
    key: &str,
    value: &[u8],
    mod_revision: i64,
) -> Result<Object, DecodeError> {
    let (kind, ns, name) = parse_key(prefix, key).ok_or_else(|| DecodeError::Key {
        key: key.to_string(),
    })?;
    let v: serde_json::Value = serde_json::from_slice(value).map_err(|e| DecodeError::Json {
        key: key.to_string(),
        msg: e.to_string(),
    })?;
    let mut obj = object_from_value(v).map_err(|error| DecodeError::Object {
        key: key.to_string(),
        error,
    })?;
    let expected = describe(kind, ns.as_deref(), &name);
    let found = describe_obj(&obj);
    let m = obj.metadata();
    if obj.kind() != kind || m.name != name || m.namespace != ns {
        return Err(DecodeError::Mismatch {
            key: key.to_string(),
            expected,
            found,
        });
    }
    obj.metadata_mut().resource_version = Some(mod_revision.to_string());
    Ok(obj)
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    /// kubectl's word: `created`, `configured`, `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of an apply: what happened and the object as stored (with its ClusterIP and
/// NodePorts, `resourceVersion` set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub object: Object,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] RegistryError),
    /// Validation, or a rule only the store can check (immutable ClusterIP, allocated
    /// elsewhere): `Service default/web is invalid: spec.clusterIP: field is immutable`.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("{object}: {error}")]
    Exhausted { object: String, error: FieldError },
    #[error("{object}: namespace {namespace:?} not found (create the Namespace first)")]
    NamespaceNotFound { object: String, namespace: String },
    #[error("{object}: the object's namespace {found:?} does not match the namespace requested ({requested:?})")]
    NamespaceMismatch {
        object: String,
        found: String,
        requested: String,
    },
    #[error("{object} not found")]
    NotFound { object: String },
    #[error("{object}: {what} {value:?} is not a valid name")]
    BadName {
        object: String,
        what: &'static str,
        value: String,
    },
    #[error("network config {key}: {msg}")]
    Config { key: String, msg: String },
    #[error("{object}: the stored value is unreadable: {error}")]
    Decode { object: String, error: DecodeError },
    #[error("{object}: concurrent writers kept changing it ({attempts} attempts); try again")]
    Conflict { object: String, attempts: u32 },
    #[error("Namespace {0}: may not be deleted")]
    Protected(String),
    #[error("{object}: the write needs {ops} etcd operations in one txn, more than etcd's limit of {MAX_TXN_OPS}")]
    TooLarge { object: String, ops: usize },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Fills in what the API server would before validating: the namespace (`namespace_override`
/// or `default`; it must match one the object names), none for a Namespace, which gets the
/// `kubernetes.io/metadata.name` label; a Service's empty `clusterIP` becomes absent, or
/// `clusterIPs[0]` when that is given. `resourceVersion` is dropped.
pub fn normalize(mut obj: Object, namespace_override: Option<&str>) -> Result<Object, StoreError> {
    let kind = obj.kind();
    let m = obj.metadata_mut();
    m.resource_version = None;
    if kind.namespaced() {
        match (m.namespace.as_deref(), namespace_override) {
            (Some(found), Some(requested)) if found != requested => {
                return Err(StoreError::NamespaceMismatch {
                    object: describe(kind, Some(found), &m.name),
                    found: found.to_string(),
                    requested: requested.to_string(),
                })
            }
            (Some(_), _) => {}
            (None, requested) => {
                m.namespace = Some(requested.unwrap_or(DEFAULT_NAMESPACE).to_string())
            }
        }
    } else {
        m.namespace = None;
    }
    match &mut obj {
        Object::Namespace(ns) => {
            let name = ns.metadata.name.clone();
            ns.metadata
                .labels
                .insert(NAMESPACE_NAME_LABEL.to_string(), name);
        }
        Object::Service(s) => {
            if s.spec.cluster_ip.as_deref() == Some("") {
                s.spec.cluster_ip = None;
            }
            if s.spec.cluster_ip.is_none() {
                s.spec.cluster_ip = s.spec.cluster_ips.first().cloned();
            }
        }
        _ => {}
    }
    Ok(obj)
}

/// Every ClusterIP and NodePort allocation: address or port → owner `<namespace>/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub cluster_ips: BTreeMap<Ipv4Addr, String>,
    pub node_ports: BTreeMap<u16, String>,
}

impl Allocations {
    fn from_kvs(prefix: &str, kvs: &[KeyValue]) -> Allocations {
        let mut out = Allocations::default();
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key());
            let holder = String::from_utf8_lossy(kv.value()).into_owned();
            match parse_allocation_key(prefix, &key) {
                Some(Allocation::ClusterIp(ip)) => {
                    out.cluster_ips.insert(ip, holder);
                }
                Some(Allocation::NodePort(p)) => {
                    out.node_ports.insert(p, holder);
                }
                None => tracing::warn!(%key, "ignoring an unknown allocation key"),
            }
        }
        out
    }

    /// The allocations `owner` holds.
    pub fn owned_by(&self, owner: &str) -> BTreeSet<Allocation> {
        let ips = self
            .cluster_ips
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| Allocation::ClusterIp(*ip));
        let ports = self
            .node_ports
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(p, _)| Allocation::NodePort(*p));
        ips.chain(ports).collect()
    }
}

/// A value chosen at random among `lo..=hi` not in `used`; None when all are used. A few
/// random probes first, then (for a crowded range) a uniform pick among the free values.
pub fn choose_free(lo: u32, hi: u32, used: &BTreeSet<u32>, rng: &mut impl Rng) -> Option<u32> {
    if lo > hi {
        return None;
    }
    let size = u64::from(hi - lo) + 1;
    let taken = used.range(lo..=hi).count() as u64;
    if taken >= size {
        return None;
    }
    for _ in 0..16 {
        let c = rng.random_range(lo..=hi);
        if !used.contains(&c) {
            return Some(c);
        }
    }
    // The k-th free value, walking the gaps between used ones.
    let mut k = rng.random_range(0..size - taken);
    let mut next = u64::from(lo);
    for &u in used.range(lo..=hi) {
        let gap = u64::from(u) - next;
        if k < gap {
            break;
        }
        k -= gap;
        next = u64::from(u) + 1;
    }
    u32::try_from(next + k).ok()
}

/// Why [`plan_service`] cannot give a Service what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// Immutable field changed, or an address or port held by another Service.
    Invalid(FieldError),
    /// No free address or port left.
    Exhausted(FieldError),
}

/// A Service with its ClusterIP and NodePorts decided, and the allocations it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: Service,
    pub allocations: BTreeSet<Allocation>,
}

fn field(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Decides a (normalized, validated) Service's ClusterIP and NodePorts, as Kubernetes does:
/// absent ones are kept from the stored Service `old` or else allocated at random; a
/// ClusterIP never changes; an address or port held by another Service is refused; a missing
/// NodePort of a port number that another protocol of the same port number has is shared.
pub fn plan_service(
    new: Service,
    old: Option<&Service>,
    allocs: &Allocations,
    net: Ipv4Net,
    rng: &mut impl Rng,
) -> Result<ServicePlan, AllocError> {
    use crate::types::ServiceType;
    let ns = new
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let me = owner(ns, &new.metadata.name);
    let mut svc = new;
    let mut allocations = BTreeSet::new();

    // ClusterIP
    if svc.spec.type_ == ServiceType::ExternalName {
        svc.spec.cluster_ip = None;
        svc.spec.cluster_ips.clear();
    } else {
        let old_ip = old
            .filter(|o| o.spec.type_ != ServiceType::ExternalName)
            .and_then(|o| o.spec.cluster_ip.clone())
            .filter(|ip| !ip.is_empty());
        let given = svc.spec.cluster_ip.clone().filter(|ip| !ip.is_empty());
        let text = match (given, old_ip) {
            (Some(g), Some(o)) if g != o => {
                return Err(AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("field is immutable (it is {o})"),
                )))
            }
            (Some(g), _) => g,
            (None, Some(o)) => o,
            (None, None) => {
                let used: BTreeSet<u32> = allocs
                    .cluster_ips
                    .iter()
                    .filter(|(_, o)| **o != me)
                    .map(|(ip, _)| u32::from(*ip))
                    .collect();
                let lo = u32::from(net.network()).saturating_add(1);
                let hi = u32::from(net.broadcast()).saturating_sub(1);
                let Some(ip) = choose_free(lo, hi, &used, rng) else {
                    return Err(AllocError::Exhausted(field(
                        "spec.clusterIP",
                        format!(
                            "no free address left in the service network {net} ({} allocated)",
                            used.range(lo..=hi).count()
                        ),
                    )));
                };
                Ipv4Addr::from(ip).to_string()
            }
        };
        if text != "None" {
            let ip: Ipv4Addr = text.parse().map_err(|_| {
                AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("{text:?} must be empty, 'None' or a valid IPv4 address"),
                ))
            })?;
            if let Some(o) = allocs.cluster_ips.get(&ip).filter(|o| **o != me) {
                return Err(AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("{ip} is already allocated to {o}"),
                )));
            }
            allocations.insert(Allocation::ClusterIp(ip));
        }
        svc.spec.cluster_ip = Some(text.clone());
        svc.spec.cluster_ips = vec![text];
    }

    // NodePorts
    if svc.spec.type_.has_node_ports() {
        let held_by_other = |np: i64| -> Option<&String> {
            u16::try_from(np)
                .ok()
                .and_then(|p| allocs.node_ports.get(&p))
                .filter(|o| **o != me)
        };
        let old_ports: HashMap<(i64, Protocol), i64> = old
            .filter(|o| o.spec.type_.has_node_ports())
            .map(|o| {
                o.spec
                    .ports
                    .iter()
                    .filter_map(|p| Some(((p.port, p.protocol), p.node_port?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut taken: BTreeSet<(i64, Protocol)> = BTreeSet::new();
        // Given ones.
        for (i, p) in svc.spec.ports.iter().enumerate() {
            if let Some(np) = p.node_port {
                if let Some(o) = held_by_other(np) {
                    return Err(AllocError::Invalid(field(
                        format!("spec.ports[{i}].nodePort"),
                        format!("{np} is already allocated to {o}"),
                    )));
                }
                taken.insert((np, p.protocol));
            }
        }
        // Kept from the stored Service (same port and protocol).
        for p in svc.spec.ports.iter_mut().filter(|p| p.node_port.is_none()) {
            if let Some(&np) = old_ports.get(&(p.port, p.protocol)) {
                if !taken.contains(&(np, p.protocol)) && held_by_other(np).is_none() {
                    p.node_port = Some(np);
                    taken.insert((np, p.protocol));
                }
            }
        }
        // Shared with the other protocol of the same port number, or new.
        for i in 0..svc.spec.ports.len() {
            let p = &svc.spec.ports[i];
            if p.node_port.is_some() {
                continue;
            }
            let (port, proto) = (p.port, p.protocol);
            let shared = svc
                .spec
                .ports
                .iter()
                .filter(|q| q.port == port && q.protocol != proto)
                .filter_map(|q| q.node_port)
                .find(|np| !taken.contains(&(*np, proto)));
            let np = match shared {
                Some(np) => np,
                None => {
                    let mut used: BTreeSet<u32> = allocs
                        .node_ports
                        .iter()
                        .filter(|(_, o)| **o != me)
                        .map(|(p, _)| u32::from(*p))
                        .collect();
                    used.extend(taken.iter().filter_map(|(np, _)| u32::try_from(*np).ok()));
                    let lo = NODE_PORT_MIN as u32;
                    let hi = NODE_PORT_MAX as u32;
                    match choose_free(lo, hi, &used, rng) {
                        Some(np) => i64::from(np),
                        None => {
                            return Err(AllocError::Exhausted(field(
                                format!("spec.ports[{i}].nodePort"),
                                format!(
                                    "no free node port left in {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                                ),
                            )))
                        }
                    }
                }
            };
            svc.spec.ports[i].node_port = Some(np);
            taken.insert((np, proto));
        }
        for (np, _) in taken {
            if let Ok(p) = u16::try_from(np) {
                allocations.insert(Allocation::NodePort(p));
            }
        }
    }
    Ok(ServicePlan {
        service: svc,
        allocations,
    })
}

/// A placeholder for an object whose stored value is unreadable (so it can still be deleted
/// and reported).
fn stub(kind: Kind, namespace: Option<&str>, name: &str) -> Object {
    let metadata = ObjectMeta {
        name: name.to_string(),
        namespace: namespace.filter(|_| kind.namespaced()).map(str::to_string),
        ..ObjectMeta::default()
    };
    match kind {
        Kind::Namespace => Object::Namespace(Namespace { metadata }),
        Kind::Pod => Object::Pod(Pod {
            metadata,
            ..Pod::default()
        }),
        Kind::Service => Object::Service(Service {
            metadata,
            ..Service::default()
        }),
        Kind::Endpoints => Object::Endpoints(Endpoints {
            metadata,
            ..Endpoints::default()
        }),
        Kind::NetworkPolicy => Object::NetworkPolicy(NetworkPolicy {
            metadata,
            ..NetworkPolicy::default()
        }),
    }
}

/// The registry in etcd.
#[derive(Debug, Clone)]
pub struct Store {
    reg: EtcdRegistry,
    timeout: Duration,
}

/// What one apply would write, guarded.
struct Planned {
    outcome: Outcome,
    object: Object,
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

fn get_response(resp: &TxnResponse, i: usize) -> Option<GetResponse> {
    match resp.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(g)) => Some(g),
        _ => None,
    }
}

impl Store {
    pub fn new(reg: EtcdRegistry) -> Store {
        Store {
            reg,
            timeout: Duration::from_secs(5),
        }
    }

    /// Connects with flannel's etcd options (lazily: etcd may be down until the first call).
    pub async fn connect(opts: &EtcdOptions) -> Result<Store, StoreError> {
        let timeout = opts.timeout;
        Ok(Store {
            reg: EtcdRegistry::connect(opts).await?,
            timeout,
        })
    }

    /// Another bound for each etcd call (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Store {
        self.timeout = timeout;
        self
    }

    pub fn registry(&self) -> &EtcdRegistry {
        &self.reg
    }

    /// The etcd prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        self.reg.prefix()
    }

    async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, RegistryError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(RegistryError::Timeout {
                op,
                timeout: self.timeout,
            }),
            Ok(r) => r.map_err(|source| RegistryError::Etcd { op, source }),
        }
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse, RegistryError> {
        let mut c = self.reg.client();
        self.call(op, c.txn(txn)).await
    }

    /// `ServiceNetwork` from `<prefix>/config` (the default without a config).
    pub async fn service_network(&self) -> Result<Ipv4Net, StoreError> {
        let text = self.reg.get_config().await?;
        self.service_network_of(text.as_deref())
    }

    fn service_network_of(&self, text: Option<&str>) -> Result<Ipv4Net, StoreError> {
        let key = self.reg.config_key();
        let Some(text) = text else {
            return config::DEFAULT_SERVICE_NETWORK
                .parse()
                .map_err(|_| StoreError::Config {
                    key,
                    msg: "bad default ServiceNetwork".into(),
                });
        };
        let cfg = config::parse(text)
            .map_err(|e| StoreError::Config {
                key: key.clone(),
                msg: e.to_string(),
            })?
            .config;
        if let Some(n) = cfg.service_network_overlap() {
            return Err(StoreError::Config {
                key,
                msg: format!(
                    "ServiceNetwork {} (the default) overlaps Network {n}: set ServiceNetwork to a range outside it",
                    cfg.service_network
                ),
            });
        }
        Ok(cfg.service_network)
    }

    fn check_names(kind: Kind, namespace: Option<&str>, name: &str) -> Result<(), StoreError> {
        let object = describe(kind, namespace, name);
        if let Some(ns) = namespace.filter(|_| kind.namespaced()) {
            if !is_dns1123_label(ns) {
                return Err(StoreError::BadName {
                    object,
                    what: "namespace",
                    value: ns.to_string(),
                });
            }
        }
        if !is_dns1123_subdomain(name) {
            return Err(StoreError::BadName {
                object,
                what: "name",
                value: name.to_string(),
            });
        }
        Ok(())
    }

    /// Plans `obj` (normalized) against what etcd holds now. `pending` namespaces count as
    /// existing (a dry run of several documents creating them).
    async fn plan(&self, obj: &Object, pending: &BTreeSet<String>) -> Result<Planned, StoreError> {
        let prefix = self.prefix().to_string();
        let kind = obj.kind();
        let m = obj.metadata();
        let object = describe_obj(obj);
        let ns = m.namespace.clone();
        let key = object_key(&prefix, kind, ns.as_deref(), &m.name);
        let is_service = kind == Kind::Service;
        let ns_key = ns
            .as_deref()
            .filter(|n| !IMPLICIT_NAMESPACES.contains(n))
            .map(|n| object_key(&prefix, Kind::Namespace, None, n));

        // One consistent read: the object, its namespace, the config and the allocations.
        let mut reads = vec![TxnOp::get(key.clone(), None)];
        if let Some(k) = &ns_key {
            reads.push(TxnOp::get(k.clone(), None));
        }
        if is_service {
            reads.push(TxnOp::get(self.reg.config_key(), None));
            reads.push(TxnOp::get(
                allocations_prefix(&prefix),
                Some(GetOptions::new().with_prefix()),
            ));
        }
        let resp = self.txn("read", Txn::new().and_then(reads)).await?;
        let mut idx = 0;
        let mut next = || {
            let r = get_response(&resp, idx);
            idx += 1;
            r
        };
        let existing = next().and_then(|g| g.kvs().first().cloned());
        let ns_kv = if ns_key.is_some() {
            next().and_then(|g| g.kvs().first().cloned())
        } else {
            None
        };
        let (config, allocs) = if is_service {
            let config = next().and_then(|g| g.kvs().first().cloned());
            let allocs = next()
                .map(|g| Allocations::from_kvs(&prefix, g.kvs()))
                .unwrap_or_default();
            (config, allocs)
        } else {
            (None, Allocations::default())
        };

        let mut compares = Vec::new();
        if let (Some(k), Some(n)) = (&ns_key, &ns) {
            if ns_kv.is_none() && !pending.contains(n) {
                return Err(StoreError::NamespaceNotFound {
                    object,
                    namespace: n.clone(),
                });
            }
            if ns_kv.is_some() {
                compares.push(Compare::version(k.clone(), CompareOp::Greater, 0));
            }
        }

        let net = if is_service {
            let text = config
                .as_ref()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
            compares.push(Compare::mod_revision(
                self.reg.config_key(),
                CompareOp::Equal,
                config.as_ref().map_or(0, |kv| kv.mod_revision()),
            ));
            self.service_network_of(text.as_deref())?
        } else {
            // Only Services use it.
            config::DEFAULT_SERVICE_NETWORK
                .parse()
                .unwrap_or_else(|_| Ipv4Net::default())
        };
        validate(obj, net)?;

        let old = match &existing {
            None => None,
            Some(kv) => match decode(&prefix, &key, kv.value(), kv.mod_revision()) {
                Ok(o) => Some(o),
                Err(e) => {
                    tracing::warn!("{object}: replacing an unreadable stored value: {e}");
                    None
                }
            },
        };
        compares.push(match &existing {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(kv) => Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
        });

        let mut ops = Vec::new();
        let mut final_obj = obj.clone();
        let mut allocations_changed = false;
        if let Object::Service(s) = obj {
            let old_svc = match &old {
                Some(Object::Service(o)) => Some(o),
                _ => None,
            };
            let me = owner(ns.as_deref().unwrap_or(DEFAULT_NAMESPACE), &m.name);
            let plan =
                plan_service(s.clone(), old_svc, &allocs, net, &mut rand::rng()).map_err(|e| {
                    match e {
                        AllocError::Invalid(f) => StoreError::Invalid(ValidationErrors {
                            kind,
                            namespace: ns.clone(),
                            name: m.name.clone(),
                            errors: vec![f],
                        }),
                        AllocError::Exhausted(error) => StoreError::Exhausted {
                            object: object.clone(),
                            error,
                        },
                    }
                })?;
            final_obj = Object::Service(plan.service);
            // The decided values obey the rules too (a kept "None" with a NodePort type).
            validate(&final_obj, net)?;
            let held = allocs.owned_by(&me);
            let alloc_key = |a: &Allocation| match a {
                Allocation::ClusterIp(ip) => cluster_ip_key(&prefix, *ip),
                Allocation::NodePort(p) => node_port_key(&prefix, *p),
            };
            for a in &plan.allocations {
                let k = alloc_key(a);
                if held.contains(a) {
                    compares.push(Compare::value(k, CompareOp::Equal, me.clone()));
                } else {
                    allocations_changed = true;
                    compares.push(Compare::version(k.clone(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(k, me.clone(), None));
                }
            }
            for a in held.difference(&plan.allocations) {
                allocations_changed = true;
                let k = alloc_key(a);
                compares.push(Compare::value(k.clone(), CompareOp::Equal, me.clone()));
                ops.push(TxnOp::delete(k, None));
            }
        }

        let unchanged = !allocations_changed
            && old.as_ref().is_some_and(|o| {
                let mut o = o.clone();
                o.metadata_mut().resource_version = None;
                o == final_obj
            });
        let outcome = if existing.is_none() {
            Outcome::Created
        } else if unchanged {
            Outcome::Unchanged
        } else {
            Outcome::Configured
        };
        if outcome == Outcome::Unchanged {
            if let Some(o) = old {
                final_obj = o;
            }
        } else {
            ops.push(TxnOp::put(key, to_json(&final_obj).to_string(), None));
        }
        let n = ops.len().max(compares.len());
        if n > MAX_TXN_OPS {
            return Err(StoreError::TooLarge { object, ops: n });
        }
        Ok(Planned {
            outcome,
            object: final_obj,
            compares,
            ops,
        })
    }

    /// Creates or replaces an object (kubectl apply): normalized ([`normalize`]: namespace
    /// `namespace_override` or `default`), checked (its namespace exists; `default` and
    /// `kube-system` always do), validated against `ServiceNetwork`, its ClusterIP and
    /// NodePorts decided ([`plan_service`]), then written with its allocations in one guarded
    /// txn (retried on conflict). An object equal to the stored one is not written.
    pub async fn apply(
        &self,
        obj: Object,
        namespace_override: Option<&str>,
    ) -> Result<Applied, StoreError> {
        let obj = normalize(obj, namespace_override)?;
        let none = BTreeSet::new();
        for attempt in 0..ATTEMPTS {
            let planned = self.plan(&obj, &none).await?;
            if planned.outcome == Outcome::Unchanged {
                return Ok(Applied {
                    outcome: planned.outcome,
                    object: planned.object,
                });
            }
            let resp = self
                .txn(
                    "apply",
                    Txn::new().when(planned.compares).and_then(planned.ops),
                )
                .await?;
            if resp.succeeded() {
                let mut object = planned.object;
                object.metadata_mut().resource_version =
                    resp.header().map(|h| h.revision().to_string());
                return Ok(Applied {
                    outcome: planned.outcome,
                    object,
                });
            }
            backoff(attempt).await;
        }
        Err(StoreError::Conflict {
            object: describe_obj(&obj),
            attempts: ATTEMPTS,
        })
    }

    /// What [`Store::apply`] would do, without writing: every check it makes, with the
    /// namespaces in `pending` counted as existing (created earlier in the same batch). The
    /// object returned carries the ClusterIP and NodePorts apply would choose now.
    pub async fn dry_run(
        &self,
        obj: Object,
        namespace_override: Option<&str>,
        pending: &BTreeSet<String>,
    ) -> Result<Applied, StoreError> {
        let obj = normalize(obj, namespace_override)?;
        let planned = self.plan(&obj, pending).await?;
        Ok(Applied {
            outcome: planned.outcome,
            object: planned.object,
        })
    }

    /// One object; None when there is none. A namespaced kind without namespace is looked up
    /// in `default`.
    pub async fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Object>, StoreError> {
        let ns = kind
            .namespaced()
            .then(|| namespace.unwrap_or(DEFAULT_NAMESPACE));
        Self::check_names(kind, ns, name)?;
        let key = object_key(self.prefix(), kind, ns, name);
        let mut c = self.reg.client();
        let resp = self
            .call("get", c.get(key.clone(), None))
            .await
            .map_err(|e| e.for_key(&key))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        decode(self.prefix(), &key, kv.value(), kv.mod_revision())
            .map(Some)
            .map_err(|error| StoreError::Decode {
                object: describe(kind, ns, name),
                error,
            })
    }

    /// Every object of a kind, in one namespace or (None) all, sorted by namespace and name.
    /// Unreadable values are skipped with a warning.
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<Vec<Object>, StoreError> {
        if let Some(ns) = namespace.filter(|_| kind.namespaced()) {
            if !is_dns1123_label(ns) {
                return Err(StoreError::BadName {
                    object: format!("{} in namespace {ns:?}", kind.plural()),
                    what: "namespace",
                    value: ns.to_string(),
                });
            }
        }
        let (objs, _) = self
            .list_prefix(&kind_prefix(self.prefix(), kind, namespace))
            .await?;
        Ok(objs)
    }

    /// Every object of every kind and the etcd revision of the read (a watcher's starting
    /// point: watch from revision + 1). Unreadable values are skipped with a warning.
    pub async fn list_all(&self) -> Result<(Vec<Object>, i64), StoreError> {
        self.list_prefix(&registry_prefix(self.prefix())).await
    }

    async fn list_prefix(&self, key_prefix: &str) -> Result<(Vec<Object>, i64), StoreError> {
        let mut c = self.reg.client();
        let resp = self
            .call(
                "list",
                c.get(key_prefix, Some(GetOptions::new().with_prefix())),
            )
            .await
            .map_err(|e| e.for_key(key_prefix))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if parse_key(self.prefix(), &key).is_none() {
                continue; // allocations
            }
            match decode(self.prefix(), &key, kv.value(), kv.mod_revision()) {
                Ok(o) => out.push(o),
                Err(e) => tracing::warn!("skipping an unreadable object: {e}"),
            }
        }
        Ok((out, revision))
    }

    /// Deletes an object and releases its allocations (one txn). Deleting a Namespace deletes
    /// everything in it first (in txns below etcd's op limit), then the Namespace, once no
    /// object is left in it; `default` and `kube-system` cannot be deleted. Returns the
    /// deleted object; a missing one is [`StoreError::NotFound`].
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Object, StoreError> {
        let ns = kind
            .namespaced()
            .then(|| namespace.unwrap_or(DEFAULT_NAMESPACE));
        Self::check_names(kind, ns, name)?;
        if kind == Kind::Namespace {
            return self.delete_namespace(name).await;
        }
        let prefix = self.prefix().to_string();
        let object = describe(kind, ns, name);
        let key = object_key(&prefix, kind, ns, name);
        let me = owner(ns.unwrap_or(DEFAULT_NAMESPACE), name);
        for attempt in 0..ATTEMPTS {
            let mut reads = vec![TxnOp::get(key.clone(), None)];
            if kind == Kind::Service {
                reads.push(TxnOp::get(
                    allocations_prefix(&prefix),
                    Some(GetOptions::new().with_prefix()),
                ));
            }
            let resp = self.txn("read", Txn::new().and_then(reads)).await?;
            let Some(kv) = get_response(&resp, 0).and_then(|g| g.kvs().first().cloned()) else {
                return Err(StoreError::NotFound { object });
            };
            let held = get_response(&resp, 1)
                .map(|g| Allocations::from_kvs(&prefix, g.kvs()).owned_by(&me))
                .unwrap_or_default();
            let obj = decode(&prefix, &key, kv.value(), kv.mod_revision())
                .unwrap_or_else(|_| stub(kind, ns, name));
            let mut compares = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )];
            let mut ops = vec![TxnOp::delete(key.clone(), None)];
            for a in &held {
                let k = match a {
                    Allocation::ClusterIp(ip) => cluster_ip_key(&prefix, *ip),
                    Allocation::NodePort(p) => node_port_key(&prefix, *p),
                };
                compares.push(Compare::value(k.clone(), CompareOp::Equal, me.clone()));
                ops.push(TxnOp::delete(k, None));
            }
            if ops.len() > MAX_TXN_OPS {
                return Err(StoreError::TooLarge {
                    object,
                    ops: ops.len(),
                });
            }
            let resp = self
                .txn("delete", Txn::new().when(compares).and_then(ops))
                .await?;
            if resp.succeeded() {
                return Ok(obj);
            }
            backoff(attempt).await;
        }
        Err(StoreError::Conflict {
            object,
            attempts: ATTEMPTS,
        })
    }

    async fn delete_namespace(&self, name: &str) -> Result<Object, StoreError> {
        if IMPLICIT_NAMESPACES.contains(&name) {
            return Err(StoreError::Protected(name.to_string()));
        }
        let prefix = self.prefix().to_string();
        let object = describe(Kind::Namespace, None, name);
        let ns_key = object_key(&prefix, Kind::Namespace, None, name);
        let contents: Vec<String> = Kind::ALL
            .into_iter()
            .filter(|k| k.namespaced())
            .map(|k| kind_prefix(&prefix, k, Some(name)))
            .collect();
        let owners = format!("{name}/");
        let mut deleted: Option<Object> = None;
        // Each round deletes what it read; concurrent writers can only add objects while the
        // Namespace exists, and the last txn removes it only when nothing is left in it.
        for attempt in 0..ATTEMPTS * 4 {
            let mut reads = vec![TxnOp::get(ns_key.clone(), None)];
            for p in &contents {
                reads.push(TxnOp::get(p.clone(), Some(GetOptions::new().with_prefix())));
            }
            reads.push(TxnOp::get(
                allocations_prefix(&prefix),
                Some(GetOptions::new().with_prefix()),
            ));
            let resp = self.txn("read", Txn::new().and_then(reads)).await?;
            let Some(ns_kv) = get_response(&resp, 0).and_then(|g| g.kvs().first().cloned()) else {
                return match deleted {
                    Some(o) => Ok(o), // someone else finished it
                    None => Err(StoreError::NotFound { object }),
                };
            };
            let ns_obj = decode(&prefix, &ns_key, ns_kv.value(), ns_kv.mod_revision())
                .unwrap_or_else(|_| stub(Kind::Namespace, None, name));
            deleted = Some(ns_obj.clone());
            // (guard, op) groups: an object with the allocations its Service holds.
            let mut allocs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            if let Some(g) = get_response(&resp, contents.len() + 1) {
                for kv in g.kvs() {
                    let holder = String::from_utf8_lossy(kv.value()).into_owned();
                    if holder.starts_with(&owners) {
                        allocs
                            .entry(holder.clone())
                            .or_default()
                            .push((String::from_utf8_lossy(kv.key()).into_owned(), holder));
                    }
                }
            }
            let mut groups: Vec<Vec<(Compare, TxnOp)>> = Vec::new();
            for i in 0..contents.len() {
                let Some(g) = get_response(&resp, i + 1) else {
                    continue;
                };
                for kv in g.kvs() {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let mut group = vec![(
                        Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                        TxnOp::delete(key.clone(), None),
                    )];
                    if let Some((Kind::Service, Some(ns), n)) = parse_key(&prefix, &key) {
                        for (k, holder) in allocs.remove(&owner(&ns, &n)).unwrap_or_default() {
                            group.push((
                                Compare::value(k.clone(), CompareOp::Equal, holder),
                                TxnOp::delete(k, None),
                            ));
                        }
                    }
                    groups.push(group);
                }
            }
            // Allocations whose Service is gone.
            for (k, holder) in allocs.into_values().flatten() {
                groups.push(vec![(
                    Compare::value(k.clone(), CompareOp::Equal, holder),
                    TxnOp::delete(k, None),
                )]);
            }
            if groups.is_empty() {
                let mut compares = vec![Compare::mod_revision(
                    ns_key.clone(),
                    CompareOp::Equal,
                    ns_kv.mod_revision(),
                )];
                for p in &contents {
                    compares.push(Compare::version(p.clone(), CompareOp::Equal, 0).with_prefix());
                }
                let resp = self
                    .txn(
                        "delete namespace",
                        Txn::new()
                            .when(compares)
                            .and_then([TxnOp::delete(ns_key.clone(), None)]),
                    )
                    .await?;
                if resp.succeeded() {
                    return Ok(ns_obj);
                }
                backoff(attempt).await;
                continue;
            }
            for batch in batches(groups, DELETE_BATCH_OPS) {
                let (compares, ops): (Vec<Compare>, Vec<TxnOp>) = batch.into_iter().unzip();
                let resp = self
                    .txn(
                        "delete namespace contents",
                        Txn::new().when(compares).and_then(ops),
                    )
                    .await?;
                if !resp.succeeded() {
                    // Changed meanwhile: read again.
                    backoff(attempt).await;
                    break;
                }
            }
        }
        Err(StoreError::Conflict {
            object,
            attempts: ATTEMPTS * 4,
        })
    }
}

/// Packs groups (never split) into batches of at most `limit` items; a group larger than the
/// limit gets a batch of its own.
fn batches<T>(groups: Vec<Vec<T>>, limit: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    for g in groups {
        if !cur.is_empty() && cur.len() + g.len() > limit {
            out.push(std::mem::take(&mut cur));
        }
        cur.extend(g);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A short random pause after a lost race, growing with the attempt.
async fn backoff(attempt: u32) {
    let max = 5 + 10 * u64::from(attempt.min(10));
    let ms = rand::rng().random_range(1..=max);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::parse::parse_documents;
    use crate::types::ServiceType;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const P: &str = "/coreos.com/network";

    fn svc(yaml: &str) -> Service {
        let text = format!("apiVersion: v1\nkind: Service\n{yaml}");
        match normalize(parse_documents(&text).unwrap().remove(0), None).unwrap() {
            Object::Service(s) => s,
            _ => unreachable!(),
        }
    }

    fn net() -> Ipv4Net {
        "10.96.0.0/24".parse().unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn keys() {
        assert_eq!(registry_prefix(P), "/coreos.com/network/registry/");
        assert_eq!(registry_prefix("/p/"), "/p/registry/");
        assert_eq!(
            object_key(P, Kind::Namespace, Some("ignored"), "prod"),
            "/coreos.com/network/registry/namespaces/prod"
        );
        assert_eq!(
            object_key(P, Kind::Service, Some("prod"), "web"),
            "/coreos.com/network/registry/services/prod/web"
        );
        assert_eq!(
            object_key(P, Kind::Endpoints, None, "db"),
            "/coreos.com/network/registry/endpoints/default/db"
        );
        assert_eq!(
            kind_prefix(P, Kind::Pod, Some("a")),
            "/coreos.com/network/registry/pods/a/"
        );
        assert_eq!(
            kind_prefix(P, Kind::Pod, None),
            "/coreos.com/network/registry/pods/"
        );
        assert_eq!(
            cluster_ip_key(P, Ipv4Addr::new(10, 96, 0, 10)),
            "/coreos.com/network/registry/allocations/clusterips/10.96.0.10"
        );
        assert_eq!(
            node_port_key(P, 30080),
            "/coreos.com/network/registry/allocations/nodeports/30080"
        );
        for kind in Kind::ALL {
            let key = object_key(P, kind, Some("ns1"), "n-1.x");
            let ns = kind.namespaced().then(|| "ns1".to_string());
            assert_eq!(parse_key(P, &key), Some((kind, ns, "n-1.x".to_string())));
            assert_eq!(
                parse_key("/coreos.com/network/", &key).map(|k| k.0),
                Some(kind)
            );
        }
    }

    #[test]
    fn parse_key_rejects_other_keys() {
        for key in [
            "/coreos.com/network/registry/allocations/clusterips/10.96.0.10",
            "/coreos.com/network/registry/allocations/nodeports/30080",
            "/coreos.com/network/registry/services/default",
            "/coreos.com/network/registry/services/default/",
            "/coreos.com/network/registry/services//web",
            "/coreos.com/network/registry/services/a/b/c",
            "/coreos.com/network/registry/namespaces/a/b",
            "/coreos.com/network/registry/deployments/default/x",
            "/coreos.com/network/subnets/10.5.1.0-24",
            "/coreos.com/network/pods/default/web",
            "/other/registry/services/default/web",
        ] {
            assert_eq!(parse_key(P, key), None, "{key}");
        }
        assert_eq!(
            parse_allocation_key(P, &cluster_ip_key(P, Ipv4Addr::new(10, 96, 0, 10))),
            Some(Allocation::ClusterIp(Ipv4Addr::new(10, 96, 0, 10)))
        );
        assert_eq!(
            parse_allocation_key(P, &node_port_key(P, 30080)),
            Some(Allocation::NodePort(30080))
        );
        assert_eq!(
            parse_allocation_key(P, "/coreos.com/network/registry/allocations/nodeports/x"),
            None
        );
    }

    #[test]
    fn decode_checks_the_key() {
        let key = object_key(P, Kind::Service, Some("prod"), "web");
        let value = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"prod"},"spec":{"ports":[{"port":80}]}}"#;
        let obj = decode(P, &key, value.as_bytes(), 42).unwrap();
        assert_eq!(obj.metadata().resource_version.as_deref(), Some("42"));
        assert_eq!(obj.kind(), Kind::Service);

        let other = object_key(P, Kind::Service, Some("prod"), "api");
        assert_eq!(
            decode(P, &other, value.as_bytes(), 1)
                .unwrap_err()
                .to_string(),
            format!("key {other}: holds Service prod/web, but the key names Service prod/api")
        );
        let other_ns = object_key(P, Kind::Service, Some("dev"), "web");
        assert!(matches!(
            decode(P, &other_ns, value.as_bytes(), 1),
            Err(DecodeError::Mismatch { .. })
        ));
        let as_pod = object_key(P, Kind::Pod, Some("prod"), "web");
        assert!(matches!(
            decode(P, &as_pod, value.as_bytes(), 1),
            Err(DecodeError::Mismatch { .. })
        ));
        assert!(matches!(
            decode(P, &key, b"{", 1),
            Err(DecodeError::Json { .. })
        ));
        let bad = value.replace(":80", ":\"x\"");
        let e = decode(P, &key, bad.as_bytes(), 1).unwrap_err().to_string();
        assert!(e.contains("spec.ports[0].port: invalid type"), "{e}");
        assert!(matches!(
            decode(
                P,
                &cluster_ip_key(P, Ipv4Addr::new(10, 96, 0, 1)),
                b"default/web",
                1
            ),
            Err(DecodeError::Key { .. })
        ));
        // What apply stores decodes to the same object.
        let obj2 = decode(P, &key, to_json(&obj).to_string().as_bytes(), 42).unwrap();
        assert_eq!(obj2, obj);
    }

    #[test]
    fn normalize_fills_namespace_and_label() {
        let docs = parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, resourceVersion: '9'}\nspec: {containers: [{name: c}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, namespace: x, labels: {kubernetes.io/metadata.name: other}}\n",
        )
        .unwrap();
        let pod = normalize(docs[0].clone(), None).unwrap();
        assert_eq!(pod.metadata().namespace.as_deref(), Some("default"));
        assert_eq!(pod.metadata().resource_version, None);
        let pod = normalize(docs[0].clone(), Some("prod")).unwrap();
        assert_eq!(pod.metadata().namespace.as_deref(), Some("prod"));
        let ns = normalize(docs[1].clone(), Some("ignored")).unwrap();
        assert_eq!(ns.metadata().namespace, None);
        assert_eq!(ns.metadata().labels[NAMESPACE_NAME_LABEL], "prod");

        let mut in_a = docs[0].clone();
        in_a.metadata_mut().namespace = Some("a".into());
        assert_eq!(
            normalize(in_a.clone(), Some("a"))
                .unwrap()
                .metadata()
                .namespace
                .as_deref(),
            Some("a")
        );
        assert_eq!(
            normalize(in_a, Some("b")).unwrap_err().to_string(),
            "Pod a/p: the object's namespace \"a\" does not match the namespace requested (\"b\")"
        );

        let s = svc("metadata: {name: a}\nspec: {clusterIP: '', ports: [{port: 80}]}\n");
        assert_eq!(s.spec.cluster_ip, None);
        let s = svc("metadata: {name: a}\nspec: {clusterIPs: [10.96.0.5], ports: [{port: 80}]}\n");
        assert_eq!(s.spec.cluster_ip.as_deref(), Some("10.96.0.5"));
    }

    #[test]
    fn choose_free_picks_only_free_values() {
        let mut r = rng();
        let used: BTreeSet<u32> = (10..20).filter(|v| *v != 13).collect();
        for _ in 0..50 {
            assert_eq!(choose_free(10, 19, &used, &mut r), Some(13));
        }
        let all: BTreeSet<u32> = (10..20).collect();
        assert_eq!(choose_free(10, 19, &all, &mut r), None);
        assert_eq!(choose_free(5, 4, &BTreeSet::new(), &mut r), None);
        // Values outside the range do not count against it.
        assert!(choose_free(1, 1, &[0, 2].into(), &mut r) == Some(1));
        // Random: a wide free range gives many different values.
        let seen: BTreeSet<u32> = (0..200)
            .filter_map(|_| choose_free(0, 1_000_000, &BTreeSet::new(), &mut r))
            .collect();
        assert!(seen.len() > 190, "{}", seen.len());
        // Crowded: every free value is reachable through the gap walk.
        let used: BTreeSet<u32> = (0..1000).filter(|v| v % 100 != 0).collect();
        let seen: BTreeSet<u32> = (0..2000)
            .filter_map(|_| choose_free(0, 999, &used, &mut r))
            .collect();
        assert_eq!(seen, (0..1000).filter(|v| v % 100 == 0).collect());
        // Extremes of u32.
        assert_eq!(
            choose_free(u32::MAX - 1, u32::MAX, &[u32::MAX - 1].into(), &mut r),
            Some(u32::MAX)
        );
    }

    fn allocs(ips: &[(&str, &str)], ports: &[(u16, &str)]) -> Allocations {
        Allocations {
            cluster_ips: ips
                .iter()
                .map(|(ip, o)| (ip.parse().unwrap(), o.to_string()))
                .collect(),
            node_ports: ports.iter().map(|(p, o)| (*p, o.to_string())).collect(),
        }
    }

    fn plan(s: Service, old: Option<&Service>, a: &Allocations) -> Result<ServicePlan, AllocError> {
        plan_service(s, old, a, net(), &mut rng())
    }

    #[test]
    fn cluster_ip_allocated_kept_and_immutable() {
        let s = svc("metadata: {name: web}\nspec: {ports: [{port: 80}]}\n");
        let p = plan(s.clone(), None, &Allocations::default()).unwrap();
        let ip: Ipv4Addr = p.service.cluster_ip_addr().unwrap();
        assert!(net().contains(&ip) && ip != net().network() && ip != net().broadcast());
        assert_eq!(p.service.spec.cluster_ips, vec![ip.to_string()]);
        assert_eq!(p.allocations, [Allocation::ClusterIp(ip)].into());

        // Re-apply without clusterIP keeps it.
        let held = allocs(&[(&ip.to_string(), "default/web")], &[]);
        let again = plan(s.clone(), Some(&p.service), &held).unwrap();
        assert_eq!(again.service, p.service);

        // A different one is refused.
        let mut changed = s.clone();
        changed.spec.cluster_ip = Some(
            if ip.octets()[3] == 7 {
                "10.96.0.8"
            } else {
                "10.96.0.7"
            }
            .into(),
        );
        let Err(AllocError::Invalid(e)) = plan(changed, Some(&p.service), &held) else {
            panic!()
        };
        assert_eq!(e.field, "spec.clusterIP");
        assert_eq!(e.msg, format!("field is immutable (it is {ip})"));

        // Never one held by another Service.
        let crowded: Vec<(String, &str)> = (1..255)
            .filter(|i| *i != 77)
            .map(|i| (format!("10.96.0.{i}"), "default/other"))
            .collect();
        let crowded: Vec<(&str, &str)> = crowded.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let p = plan(s.clone(), None, &allocs(&crowded, &[])).unwrap();
        assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("10.96.0.77"));
        let full: Vec<(String, &str)> = (1..255).map(|i| (format!("10.96.0.{i}"), "x/y")).collect();
        let full: Vec<(&str, &str)> = full.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let Err(AllocError::Exhausted(e)) = plan(s, None, &allocs(&full, &[])) else {
            panic!()
        };
        assert_eq!(e.to_string(), "spec.clusterIP: no free address left in the service network 10.96.0.0/24 (254 allocated)");
    }

    #[test]
    fn requested_cluster_ip_collision() {
        let s = svc("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n");
        let Err(AllocError::Invalid(e)) = plan(
            s.clone(),
            None,
            &allocs(&[("10.96.0.10", "default/other")], &[]),
        ) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.clusterIP: 10.96.0.10 is already allocated to default/other"
        );
        let p = plan(s, None, &allocs(&[("10.96.0.10", "default/web")], &[])).unwrap();
        assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn headless_and_external_name_get_no_address() {
        let h = svc("metadata: {name: h}\nspec: {clusterIP: None, selector: {a: b}}\n");
        let p = plan(h.clone(), None, &Allocations::default()).unwrap();
        assert!(p.allocations.is_empty());
        assert_eq!(p.service.spec.cluster_ips, vec!["None".to_string()]);
        // Omitted on re-apply: stays headless.
        let mut again = h;
        again.spec.cluster_ip = None;
        again.spec.cluster_ips.clear();
        assert_eq!(
            plan(again, Some(&p.service), &Allocations::default())
                .unwrap()
                .service
                .spec
                .cluster_ip
                .as_deref(),
            Some("None")
        );

        let e =
            svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: db.example.com}\n");
        let p = plan(e, None, &Allocations::default()).unwrap();
        assert!(p.allocations.is_empty());
        assert_eq!(p.service.spec.cluster_ip, None);

        // ClusterIP -> ExternalName drops the address; back allocates a new one.
        let c = svc("metadata: {name: e}\nspec: {ports: [{port: 80}]}\n");
        let with_ip = plan(c.clone(), None, &Allocations::default()).unwrap();
        let to_ext =
            svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: x.example}\n");
        assert!(
            plan(to_ext, Some(&with_ip.service), &Allocations::default())
                .unwrap()
                .allocations
                .is_empty()
        );
        assert!(plan(c, Some(&p.service), &Allocations::default())
            .unwrap()
            .service
            .spec
            .cluster_ip
            .is_some());
    }

    #[test]
    fn node_ports_allocated_kept_shared_and_refused() {
        let s = svc("metadata: {name: dns}\nspec: {type: NodePort, ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}, {name: c, port: 80, nodePort: 30080}]}\n");
        let p = plan(s.clone(), None, &Allocations::default()).unwrap();
        let ports = &p.service.spec.ports;
        let np = ports[0].node_port.unwrap();
        assert!((NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np));
        assert_eq!(
            ports[1].node_port,
            Some(np),
            "TCP and UDP 53 share one node port"
        );
        assert_eq!(ports[2].node_port, Some(30080));
        let ip: Ipv4Addr = p.service.cluster_ip_addr().unwrap();
        assert_eq!(
            p.allocations,
            [
                Allocation::ClusterIp(ip),
                Allocation::NodePort(np as u16),
                Allocation::NodePort(30080)
            ]
            .into()
        );

        // Kept on re-apply (matched by port and protocol, even reordered).
        let held = allocs(
            &[(&ip.to_string(), "default/dns")],
            &[(np as u16, "default/dns"), (30080, "default/dns")],
        );
        let mut reordered = s.clone();
        reordered.spec.ports.swap(0, 1);
        let again = plan(reordered, Some(&p.service), &held).unwrap();
        assert_eq!(again.service.spec.ports[0].node_port, Some(np));
        assert_eq!(again.allocations, p.allocations);

        // Another Service's port is refused, given or not.
        let other = allocs(&[], &[(30080, "kube-system/x")]);
        let Err(AllocError::Invalid(e)) = plan(s.clone(), None, &other) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.ports[2].nodePort: 30080 is already allocated to kube-system/x"
        );
        let all_but_one: Vec<(u16, &str)> = (30000..=32767u16)
            .filter(|p| *p != 31000 && *p != 30080)
            .map(|p| (p, "x/y"))
            .collect();
        let p2 = plan(s.clone(), None, &allocs(&[], &all_but_one)).unwrap();
        assert_eq!(p2.service.spec.ports[0].node_port, Some(31000));
        let all: Vec<(u16, &str)> = (30000..=32767u16)
            .filter(|p| *p != 30080)
            .map(|p| (p, "x/y"))
            .collect();
        let Err(AllocError::Exhausted(e)) = plan(s, None, &allocs(&[], &all)) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.ports[0].nodePort: no free node port left in 30000-32767"
        );

        // NodePort -> ClusterIP releases them.
        let c = svc("metadata: {name: dns}\nspec: {ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]}\n");
        let back = plan(c, Some(&p.service), &held).unwrap();
        assert_eq!(back.allocations, [Allocation::ClusterIp(ip)].into());
        assert!(back
            .service
            .spec
            .ports
            .iter()
            .all(|p| p.node_port.is_none()));
        assert_eq!(back.service.spec.type_, ServiceType::ClusterIP);
    }

    #[test]
    fn batches_never_split_groups() {
        let groups: Vec<Vec<u32>> = (0..10).map(|i| vec![i; 30]).collect();
        let b = batches(groups, 100);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![90, 90, 90, 30]
        );
        let b = batches(vec![vec![1; 150], vec![2; 1]], 100);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![150, 1]);
        assert!(batches(Vec::<Vec<u8>>::new(), 100).is_empty());
    }
}
