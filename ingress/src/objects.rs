//! The controller's copy of what it reads from etcd (pure): Ingresses, IngressClasses,
//! Secrets, Services, Endpoints, Pods and the pods' attachment records, updated key by key as
//! a [`registry::follow::Follower`] receives them. Values that do not decode or break the API
//! server's rules are ignored and counted, as the other followers do.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use registry::pods::{parse_pod_key, pods_prefix};
use registry::{Endpoints, Ingress, IngressClass, Kind, Object, Pod, PodRecord, Secret, Service};

/// (namespace, name); cluster-scoped objects have an empty namespace.
pub type Key = (String, String);

#[derive(Debug, Clone, Default)]
pub struct Objects {
    prefix: String,
    registry_prefix: String,
    pods_prefix: String,
    pub ingresses: BTreeMap<Key, Ingress>,
    pub classes: BTreeMap<String, IngressClass>,
    pub secrets: BTreeMap<Key, Secret>,
    pub services: BTreeMap<Key, Service>,
    pub endpoints: BTreeMap<Key, Endpoints>,
    pub pods: BTreeMap<Key, Pod>,
    pub records: BTreeMap<Key, PodRecord>,
    /// Objects and pod records ignored (`flannel_ingress_invalid_objects_total`).
    pub invalid_objects: Counter,
}

impl Objects {
    pub fn new(prefix: &str) -> Objects {
        Objects {
            prefix: prefix.to_string(),
            registry_prefix: registry::store::registry_prefix(prefix),
            pods_prefix: pods_prefix(prefix),
            ..Objects::default()
        }
    }

    /// Forgets everything (a full list follows).
    pub fn clear(&mut self) {
        self.ingresses.clear();
        self.classes.clear();
        self.secrets.clear();
        self.services.clear();
        self.endpoints.clear();
        self.pods.clear();
        self.records.clear();
    }

    /// Adds an object directly (tests).
    pub fn insert(&mut self, obj: Object) {
        let ns = obj.metadata().namespace.clone().unwrap_or_default();
        let k = (ns, obj.metadata().name.clone());
        match obj {
            Object::Ingress(o) => {
                self.ingresses.insert(k, o);
            }
            Object::IngressClass(o) => {
                self.classes.insert(k.1, o);
            }
            Object::Secret(o) => {
                self.secrets.insert(k, o);
            }
            Object::Service(o) => {
                self.services.insert(k, o);
            }
            Object::Endpoints(o) => {
                self.endpoints.insert(k, o);
            }
            Object::Pod(o) => {
                self.pods.insert(k, o);
            }
            _ => {}
        }
    }

    /// Applies one key's new value (`None`: deleted); returns whether anything the controller
    /// uses may have changed.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        if key.starts_with(&self.registry_prefix) {
            let Some((kind, ns, name)) = registry::store::parse_key(&self.prefix, key) else {
                return false;
            };
            if matches!(
                kind,
                Kind::Namespace | Kind::NetworkPolicy | Kind::ClusterNetworkPolicy
            ) {
                return false;
            }
            let obj = value.and_then(|v| {
                match registry::follow::checked_object(&self.prefix, key, v, mod_revision) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::warn!(key, "ingress: {e}");
                        self.invalid_objects.inc();
                        None
                    }
                }
            });
            let k = (ns.unwrap_or_default(), name);
            match obj {
                Some(o) => {
                    self.insert(o);
                    true
                }
                None => match kind {
                    Kind::Ingress => self.ingresses.remove(&k).is_some(),
                    Kind::IngressClass => self.classes.remove(&k.1).is_some(),
                    Kind::Secret => self.secrets.remove(&k).is_some(),
                    Kind::Service => self.services.remove(&k).is_some(),
                    Kind::Endpoints => self.endpoints.remove(&k).is_some(),
                    Kind::Pod => self.pods.remove(&k).is_some(),
                    _ => false,
                },
            }
        } else if key.starts_with(&self.pods_prefix) {
            let Ok((ns, name)) = parse_pod_key(&self.prefix, key) else {
                return false;
            };
            let k = (ns.to_string(), name.to_string());
            let rec = value.and_then(|v| match serde_json::from_slice::<PodRecord>(v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key, error = %e, "ingress: ignoring a pod record that does not decode");
                    self.invalid_objects.inc();
                    None
                }
            });
            match rec {
                Some(r) => {
                    self.records.insert(k, r);
                    true
                }
                None => self.records.remove(&k).is_some(),
            }
        } else {
            false
        }
    }
}
