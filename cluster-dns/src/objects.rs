//! The DNS server's copy of what it reads from etcd (pure): Services, Endpoints, Namespaces,
//! Pods and the pods' attachment records, updated key by key. Values that do not decode or
//! break the API server's rules are ignored and counted: whoever can write one key must not
//! be able to put a name or text of their choosing into the zone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::Ipv4Net;
use prometheus_client::metrics::counter::Counter;
use registry::pods::{parse_pod_key, pods_prefix};
use registry::{Endpoints, Kind, Object, Pod, PodRecord, Service};

type Key = (String, String);

#[derive(Debug, Clone)]
pub struct Objects {
    prefix: String,
    registry_prefix: String,
    pods_prefix: String,
    services: BTreeMap<Key, Service>,
    endpoints: BTreeMap<Key, Endpoints>,
    namespaces: BTreeMap<String, ()>,
    pods: BTreeMap<Key, Pod>,
    records: BTreeMap<Key, PodRecord>,
    /// Objects and pod records ignored (`flannel_dns_invalid_objects_total`).
    pub invalid_objects: Counter,
}

impl Objects {
    pub fn new(prefix: &str) -> Objects {
        Objects {
            prefix: prefix.to_string(),
            registry_prefix: registry::store::registry_prefix(prefix),
            pods_prefix: pods_prefix(prefix),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            records: BTreeMap::new(),
            invalid_objects: Counter::default(),
        }
    }

    /// Forgets everything (a full list follows).
    pub fn clear(&mut self) {
        self.services.clear();
        self.endpoints.clear();
        self.namespaces.clear();
        self.pods.clear();
        self.records.clear();
    }

    /// Applies one key's new value (`None`: deleted); returns whether anything the zone is
    /// built from changed.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        if key.starts_with(&self.registry_prefix) {
            let Some((kind, ns, name)) = registry::store::parse_key(&self.prefix, key) else {
                return false;
            };
            if !matches!(
                kind,
                Kind::Service | Kind::Endpoints | Kind::Pod | Kind::Namespace
            ) {
                return false;
            }
            let obj = value.and_then(|v| {
                match registry::store::decode(&self.prefix, key, v, mod_revision) {
                    Ok(o) => match registry::validate(&o, Ipv4Net::default()) {
                        Ok(()) => Some(o),
                        Err(e) => {
                            tracing::warn!(key, error = %e, "cluster DNS: ignoring an invalid object");
                            self.invalid_objects.inc();
                            None
                        }
                    },
                    Err(e) => {
                        tracing::warn!(key, error = %e, "cluster DNS: ignoring an object that does not decode");
                        self.invalid_objects.inc();
                        None
                    }
                }
            });
            let k = (ns.unwrap_or_default(), name);
            match (kind, obj) {
                (_, Some(Object::Service(o))) => {
                    self.services.insert(k, o);
                    true
                }
                (_, Some(Object::Endpoints(o))) => {
                    self.endpoints.insert(k, o);
                    true
                }
                (_, Some(Object::Pod(o))) => {
                    self.pods.insert(k, o);
                    true
                }
                (_, Some(Object::Namespace(_))) => self.namespaces.insert(k.1, ()).is_none(),
                (Kind::Service, _) => self.services.remove(&k).is_some(),
                (Kind::Endpoints, _) => self.endpoints.remove(&k).is_some(),
                (Kind::Pod, _) => self.pods.remove(&k).is_some(),
                (Kind::Namespace, _) => self.namespaces.remove(&k.1).is_some(),
                _ => false,
            }
        } else if key.starts_with(&self.pods_prefix) {
            let Ok((ns, name)) = parse_pod_key(&self.prefix, key) else {
                return false;
            };
            let k = (ns.to_string(), name.to_string());
            let rec = value.and_then(|v| match serde_json::from_slice::<PodRecord>(v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key, error = %e, "cluster DNS: ignoring a pod record that does not decode");
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

    /// Adds an object directly (tests, benches).
    pub fn insert(&mut self, obj: Object) {
        let ns = obj.metadata().namespace.clone().unwrap_or_default();
        let name = obj.metadata().name.clone();
        match obj {
            Object::Service(o) => {
                self.services.insert((ns, name), o);
            }
            Object::Endpoints(o) => {
                self.endpoints.insert((ns, name), o);
            }
            Object::Pod(o) => {
                self.pods.insert((ns, name), o);
            }
            Object::Namespace(_) => {
                self.namespaces.insert(name, ());
            }
            Object::NetworkPolicy(_) => {}
        }
    }

    /// Adds a pod's attachment record directly (tests, benches).
    pub fn insert_record(&mut self, namespace: &str, name: &str, record: PodRecord) {
        self.records
            .insert((namespace.to_string(), name.to_string()), record);
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn endpoints(&self, namespace: &str, name: &str) -> Option<&Endpoints> {
        self.endpoints
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Namespaces that exist as objects.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    /// The attached pods of `namespace` (a Pod object with an attachment record) and their
    /// addresses.
    pub fn pods_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a Pod, &'a [IpAddr])> + 'a {
        let lo = (namespace.to_string(), String::new());
        self.pods
            .range(lo..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .filter_map(|(k, pod)| {
                let rec = self.records.get(k)?;
                Some((pod, rec.ips.as_slice()))
            })
    }

    /// (namespace, address) of every attachment record.
    pub fn pod_ips(&self) -> impl Iterator<Item = (&str, IpAddr)> {
        self.records
            .iter()
            .flat_map(|((ns, _), r)| r.ips.iter().map(move |ip| (ns.as_str(), *ip)))
    }
}
