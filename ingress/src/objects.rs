//! The controller's copy of what it reads from etcd (pure): Ingresses, IngressClasses,
//! Secrets, Services, Endpoints, Pods and the pods' attachment records, updated key by key as
//! a [`registry::follow::Follower`] receives them. Values that do not decode or break the API
//! server's rules are ignored and counted, as the other followers do.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use registry::follow::{KeyReader, Update};
use registry::{Endpoints, Ingress, IngressClass, Kind, Object, Pod, PodRecord, Secret, Service};

/// The kinds the controller reads.
const KINDS: &[Kind] = &[
    Kind::Ingress,
    Kind::IngressClass,
    Kind::Secret,
    Kind::Service,
    Kind::Endpoints,
    Kind::Pod,
];

/// (namespace, name); cluster-scoped objects have an empty namespace.
pub type Key = (String, String);

#[derive(Debug, Clone)]
pub struct Objects {
    reader: KeyReader,
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
            reader: KeyReader::new(prefix, "ingress", KINDS, true),
            ingresses: BTreeMap::new(),
            classes: BTreeMap::new(),
            secrets: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            pods: BTreeMap::new(),
            records: BTreeMap::new(),
            invalid_objects: Counter::default(),
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
        let u = self.reader.read(key, value, mod_revision);
        if u.rejected() {
            self.invalid_objects.inc();
        }
        match u {
            Update::Object {
                object: Some(o), ..
            } => {
                self.insert(o);
                true
            }
            Update::Object { kind, key: k, .. } => match kind {
                Kind::Ingress => self.ingresses.remove(&k).is_some(),
                Kind::IngressClass => self.classes.remove(&k.1).is_some(),
                Kind::Secret => self.secrets.remove(&k).is_some(),
                Kind::Service => self.services.remove(&k).is_some(),
                Kind::Endpoints => self.endpoints.remove(&k).is_some(),
                Kind::Pod => self.pods.remove(&k).is_some(),
                _ => false,
            },
            Update::Record { key: k, record, .. } => match record {
                Some(r) => {
                    self.records.insert(k, r);
                    true
                }
                None => self.records.remove(&k).is_some(),
            },
            Update::Ignored => false,
        }
    }
}
