//! The registry in etcd: [`Store`] reads and writes objects under `<prefix>/registry/`
//! ([`crate::keys`] has the layout) with the API server's rules ([`normalize`], then
//! validation), allocating ClusterIPs and NodePorts ([`crate::alloc`]) in the same txn.
//!
//! Every write is one etcd txn guarded by what was read: the object's mod revision (or
//! `version == 0` to create), the namespace key (it must still exist), `version == 0` for each
//! allocation taken and `value == <namespace>/<name>` for each kept or released; a conflict is
//! re-read and re-planned a bounded number of times. So two Services never get the same
//! ClusterIP or NodePort, and an object never lands in a namespace being deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_access::{Connection, EtcdError, EtcdOptions};
use etcd_client::{
    Compare, CompareOp, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use rand::Rng;
use subnet_lease::config;

use crate::alloc::{plan_service, AllocError, Allocations, ServiceNetworks};
// The key layout and decoding moved to `keys`; re-exported here for callers that still name
// them through `store`.
use crate::keys::describe_obj;
pub use crate::keys::{
    allocations_prefix, cluster_ip_key, decode, describe, kind_prefix, node_port_key, object_key,
    owner, parse_allocation_key, parse_key, registry_prefix, Allocation, DecodeError,
    DEFAULT_NAMESPACE, IMPLICIT_NAMESPACES, NAMESPACE_NAME_LABEL, REGISTRY_DIR,
};
use crate::parse::to_json;
use crate::types::{
    ClusterNetworkPolicy, Endpoints, Ingress, IngressClass, Kind, Namespace, NetworkPolicy, Object,
    ObjectMeta, Pod, Secret, Service, SECRET_TYPE_OPAQUE,
};
use crate::validate::{
    is_dns1123_label, is_dns1123_subdomain, update_errors, validate, FieldError, ValidationErrors,
};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Operations per txn when deleting a namespace's objects (below [`MAX_TXN_OPS`]).
const DELETE_BATCH_OPS: usize = 100;
/// Plans and txns tried before giving up on conflicting concurrent writers.
const ATTEMPTS: u32 = 25;

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
    Etcd(#[from] EtcdError),
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
/// `clusterIPs[0]` when that is given; a Secret's `stringData` is merged into `data` and its
/// type defaults to `Opaque`. `resourceVersion` is dropped.
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
        Object::Secret(s) => {
            s.merge_string_data();
            if s.type_.as_deref().is_none_or(str::is_empty) {
                s.type_ = Some(SECRET_TYPE_OPAQUE.to_string());
            }
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
        Kind::Secret => Object::Secret(Secret {
            metadata,
            ..Secret::default()
        }),
        Kind::Ingress => Object::Ingress(Ingress {
            metadata,
            ..Ingress::default()
        }),
        Kind::IngressClass => Object::IngressClass(IngressClass {
            metadata,
            ..IngressClass::default()
        }),
        Kind::ClusterNetworkPolicy => Object::ClusterNetworkPolicy(ClusterNetworkPolicy {
            metadata,
            ..ClusterNetworkPolicy::default()
        }),
    }
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
}

/// The registry in etcd.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Connection,
    /// The allocations as of the last successful Service apply, with what it wrote: the next
    /// Service apply plans from them instead of reading every allocation key again (which
    /// made applying N Services read N² keys). Stale entries cost nothing but a retry: the
    /// txn compares every key it takes or keeps, and a failed txn drops the snapshot.
    allocs: Arc<Mutex<Option<Allocations>>>,
    /// Reads of every allocation key (for tests and diagnostics).
    alloc_reads: Arc<AtomicU64>,
}

/// What one apply would write, guarded.
struct Planned {
    outcome: Outcome,
    object: Object,
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    /// For a Service: the allocations once this apply is written.
    allocs_after: Option<Allocations>,
}

fn get_response(resp: &TxnResponse, i: usize) -> Option<GetResponse> {
    match resp.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(g)) => Some(g),
        _ => None,
    }
}

impl Store {
    /// A store over an existing connection (its timeout bounds every call).
    pub fn new(conn: Connection) -> Store {
        Store {
            conn,
            allocs: Arc::default(),
            alloc_reads: Arc::default(),
        }
    }

    /// Connects with flannel's etcd options (lazily: etcd may be down until the first call).
    pub async fn connect(opts: &EtcdOptions) -> Result<Store, StoreError> {
        Ok(Store::new(Connection::connect(opts).await?))
    }

    /// How many times every allocation key was read (once, then again after a conflict).
    pub fn allocation_reads(&self) -> u64 {
        self.alloc_reads.load(Ordering::Relaxed)
    }

    fn take_allocs(&self) -> Option<Allocations> {
        self.allocs.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn keep_allocs(&self, a: Option<Allocations>) {
        *self.allocs.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    /// The etcd connection underneath.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The etcd prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        self.conn.prefix()
    }

    /// flannel's network config key, `<prefix>/config`.
    fn config_key(&self) -> String {
        subnet_lease::store::config_key(self.conn.prefix())
    }

    async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.conn.call(op, fut).await
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse, EtcdError> {
        let mut c = self.conn.client();
        self.call(op, c.txn(txn)).await
    }

    /// The service networks from `<prefix>/config`: `ServiceNetwork` when IPv4 is enabled,
    /// `IPv6ServiceNetwork` when IPv6 is (without a config: the default `ServiceNetwork`).
    pub async fn service_networks(&self) -> Result<ServiceNetworks, StoreError> {
        let key = self.config_key();
        let mut c = self.conn.client();
        let resp = self.call("get config", c.get(key, None)).await?;
        let text = resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        self.service_network_of(text.as_deref())
    }

    fn service_network_of(&self, text: Option<&str>) -> Result<ServiceNetworks, StoreError> {
        let key = self.config_key();
        let Some(text) = text else {
            return config::DEFAULT_SERVICE_NETWORK
                .parse::<ipnet::Ipv4Net>()
                .map(ServiceNetworks::from)
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
        if let (Some(n), Some(s)) = (
            cfg.ipv6_service_network_overlap(),
            cfg.ipv6_service_network(),
        ) {
            return Err(StoreError::Config {
                key,
                msg: format!(
                    "IPv6ServiceNetwork {s} (the default) overlaps IPv6Network {n}: set IPv6ServiceNetwork to a range outside it"
                ),
            });
        }
        Ok(ServiceNetworks::from_config(&cfg))
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
    /// `dry`: nothing will be written, so the allocation snapshot is put back as it was.
    async fn plan(
        &self,
        obj: &Object,
        pending: &BTreeSet<String>,
        dry: bool,
    ) -> Result<Planned, StoreError> {
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

        // One consistent read: the object, its namespace, the config and (without a snapshot
        // from the last apply) the allocations.
        let snapshot = if is_service { self.take_allocs() } else { None };
        let mut reads = vec![TxnOp::get(key.clone(), None)];
        if let Some(k) = &ns_key {
            reads.push(TxnOp::get(k.clone(), None));
        }
        if is_service {
            reads.push(TxnOp::get(self.config_key(), None));
            if snapshot.is_none() {
                self.alloc_reads.fetch_add(1, Ordering::Relaxed);
                reads.push(TxnOp::get(
                    allocations_prefix(&prefix),
                    Some(GetOptions::new().with_prefix()),
                ));
            }
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
        let (config, mut allocs) = if is_service {
            let config = next().and_then(|g| g.kvs().first().cloned());
            let allocs = match snapshot {
                Some(a) => a,
                None => next()
                    .map(|g| Allocations::from_kvs(&prefix, g.kvs()))
                    .unwrap_or_default(),
            };
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

        let nets = if is_service {
            let text = config
                .as_ref()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
            compares.push(Compare::mod_revision(
                self.config_key(),
                CompareOp::Equal,
                config.as_ref().map_or(0, |kv| kv.mod_revision()),
            ));
            self.service_network_of(text.as_deref())?
        } else {
            // Only Services use them.
            ServiceNetworks::default()
        };
        validate(obj, nets)?;

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
        if let Some(o) = &old {
            let errors = update_errors(o, obj);
            if !errors.is_empty() {
                return Err(StoreError::Invalid(ValidationErrors {
                    kind,
                    namespace: ns.clone(),
                    name: m.name.clone(),
                    errors,
                }));
            }
        }
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
            let plan = plan_service(s.clone(), old_svc, &allocs, &nets, &mut rand::rng()).map_err(
                |e| match e {
                    AllocError::Invalid(errors) => StoreError::Invalid(ValidationErrors {
                        kind,
                        namespace: ns.clone(),
                        name: m.name.clone(),
                        errors,
                    }),
                    AllocError::Exhausted(error) => StoreError::Exhausted {
                        object: object.clone(),
                        error,
                    },
                },
            )?;
            final_obj = Object::Service(plan.service);
            // The decided values obey the rules too (a kept "None" with a NodePort type).
            validate(&final_obj, nets)?;
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
                    if !dry {
                        match a {
                            Allocation::ClusterIp(ip) => allocs.cluster_ips.insert(*ip, me.clone()),
                            Allocation::NodePort(p) => allocs.node_ports.insert(*p, me.clone()),
                        };
                    }
                }
            }
            for a in held.difference(&plan.allocations) {
                allocations_changed = true;
                let k = alloc_key(a);
                compares.push(Compare::value(k.clone(), CompareOp::Equal, me.clone()));
                ops.push(TxnOp::delete(k, None));
                if !dry {
                    match a {
                        Allocation::ClusterIp(ip) => allocs.cluster_ips.remove(ip),
                        Allocation::NodePort(p) => allocs.node_ports.remove(p),
                    };
                }
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
        let allocs_after = match (is_service, dry) {
            (true, false) => Some(allocs),
            (true, true) => {
                // Unchanged: a dry run plans, it does not allocate.
                self.keep_allocs(Some(allocs));
                None
            }
            (false, _) => None,
        };
        Ok(Planned {
            outcome,
            object: final_obj,
            compares,
            ops,
            allocs_after,
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
        let mut fresh_after_exhausted = false;
        for attempt in 0..ATTEMPTS {
            let had_snapshot = self
                .allocs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
            let planned = match self.plan(&obj, &none, false).await {
                // A snapshot may count allocations another client has released since: only a
                // fresh read may say the network is full.
                Err(StoreError::Exhausted { .. }) if had_snapshot && !fresh_after_exhausted => {
                    fresh_after_exhausted = true;
                    continue;
                }
                r => r?,
            };
            if planned.outcome == Outcome::Unchanged {
                self.keep_allocs(planned.allocs_after);
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
                self.keep_allocs(planned.allocs_after);
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
        let planned = self.plan(&obj, pending, true).await?;
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
        let mut c = self.conn.client();
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
        let mut c = self.conn.client();
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
        // Its allocations go: the snapshot would still count them.
        self.keep_allocs(None);
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
    fn svc(yaml: &str) -> Service {
        let text = format!("apiVersion: v1\nkind: Service\n{yaml}");
        match normalize(parse_documents(&text).unwrap().remove(0), None).unwrap() {
            Object::Service(s) => s,
            _ => unreachable!(),
        }
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
