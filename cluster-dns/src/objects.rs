//! The DNS server's copy of what it reads from etcd (pure): Services, Endpoints, Namespaces,
//! Pods and the pods' attachment records, updated key by key. Values that do not decode or
//! break the API server's rules are ignored and counted: whoever can write one key must not
//! be able to put a name or text of their choosing into the zone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use prometheus_client::metrics::counter::Counter;
use registry::follow::{KeyReader, Update};
use registry::{Endpoints, Kind, Object, Pod, PodRecord, Service};

type Key = (String, String);

#[derive(Debug, Clone)]
pub struct Objects {
    reader: KeyReader,
    services: BTreeMap<Key, Service>,
    endpoints: BTreeMap<Key, Endpoints>,
    namespaces: BTreeMap<String, ()>,
    pods: BTreeMap<Key, Pod>,
    records: BTreeMap<Key, PodRecord>,
    /// Objects and pod records ignored (`flannel_dns_invalid_objects_total`).
    pub invalid_objects: Counter,
    /// Every pod address is in the zone (pod records `verified`): any pod record change counts.
    pod_ips_matter: bool,
}

impl Objects {
    pub fn new(prefix: &str) -> Objects {
        Objects {
            reader: KeyReader::new(
                prefix,
                "cluster DNS",
                &[Kind::Service, Kind::Endpoints, Kind::Pod, Kind::Namespace],
                true,
            ),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            records: BTreeMap::new(),
            invalid_objects: Counter::default(),
            pod_ips_matter: false,
        }
    }

    /// Whether the zone uses every pod's address (pod records in `verified` mode); otherwise
    /// pods matter only where a headless Service selects pods.
    pub fn with_pod_ips(mut self, matter: bool) -> Objects {
        self.pod_ips_matter = matter;
        self
    }

    /// A headless Service of `namespace` selects pods (their changes change the zone).
    fn selects_pods(&self, namespace: &str) -> bool {
        let lo = (namespace.to_string(), String::new());
        self.services
            .range(lo..)
            .take_while(|((ns, _), _)| ns == namespace)
            .any(|(_, svc)| {
                svc.is_headless() && svc.spec.selector.as_ref().is_some_and(|s| !s.is_empty())
            })
    }

    /// Forgets everything (a full list follows).
    pub fn clear(&mut self) {
        self.services.clear();
        self.endpoints.clear();
        self.namespaces.clear();
        self.pods.clear();
        self.records.clear();
    }

    /// Applies one key's new value (`None`: deleted); returns whether the zone may have
    /// changed: a Pod or pod record only where a headless Service of its namespace selects
    /// pods (or with [`Objects::with_pod_ips`]), so pods coming and going in a cluster of 10k
    /// Services do not rebuild its zone each time.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        let u = self.reader.read(key, value, mod_revision);
        if u.rejected() {
            self.invalid_objects.inc();
        }
        match u {
            Update::Object {
                kind,
                key: k,
                object,
                ..
            } => match (kind, object) {
                (_, Some(Object::Service(o))) => {
                    self.services.insert(k, o);
                    true
                }
                (_, Some(Object::Endpoints(o))) => {
                    self.endpoints.insert(k, o);
                    true
                }
                (_, Some(Object::Pod(o))) => {
                    let ns = k.0.clone();
                    self.pods.insert(k, o);
                    self.selects_pods(&ns)
                }
                (_, Some(Object::Namespace(_))) => self.namespaces.insert(k.1, ()).is_none(),
                (Kind::Service, _) => self.services.remove(&k).is_some(),
                (Kind::Endpoints, _) => self.endpoints.remove(&k).is_some(),
                (Kind::Pod, _) => self.pods.remove(&k).is_some() && self.selects_pods(&k.0),
                (Kind::Namespace, _) => self.namespaces.remove(&k.1).is_some(),
                _ => false,
            },
            Update::Record { key: k, record, .. } => {
                let matters = self.pod_ips_matter || self.selects_pods(&k.0);
                match record {
                    Some(r) => {
                        self.records.insert(k, r);
                        matters
                    }
                    None => self.records.remove(&k).is_some() && matters,
                }
            }
            Update::Ignored => false,
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
            // Kinds that publish no name.
            Object::NetworkPolicy(_)
            | Object::Secret(_)
            | Object::Ingress(_)
            | Object::IngressClass(_)
            | Object::ClusterNetworkPolicy(_) => {}
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: &str = "/coreos.com/network";

    fn put(o: &mut Objects, kind: &str, ns: &str, name: &str, json: &str) -> bool {
        let key = format!("{P}/registry/{kind}/{ns}/{name}");
        o.apply(&key, Some(json.as_bytes()), 1)
    }

    fn record(o: &mut Objects, ns: &str, name: &str, ip: &str) -> bool {
        let key = format!("{P}/pods/{ns}/{name}");
        let v = format!(
            r#"{{"IP":"{ip}","IPs":["{ip}"],"Node":"n","NodeIP":"192.168.0.1","Subnet":"10.5.1.0/24","ContainerID":"c","Ifname":"eth0"}}"#
        );
        o.apply(&key, Some(v.as_bytes()), 1)
    }

    #[test]
    fn pods_change_the_zone_only_where_a_headless_service_selects_them() {
        let mut o = Objects::new(P);
        let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"shop","labels":{"app":"web"}},"spec":{"containers":[{"name":"c"}]}}"#;
        assert!(!put(&mut o, "pods", "shop", "a", pod));
        assert!(!record(&mut o, "shop", "a", "10.5.1.2"));
        // A ClusterIP Service does not make pods matter; a selecting headless one does.
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"clusterIP":"10.96.0.5","selector":{"app":"web"},"ports":[{"port":80}]}}"#;
        assert!(put(&mut o, "services", "shop", "web", svc));
        assert!(!record(&mut o, "shop", "a", "10.5.1.3"));
        let headless = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"db","namespace":"shop"},"spec":{"clusterIP":"None","selector":{"app":"web"},"ports":[{"port":80}]}}"#;
        assert!(put(&mut o, "services", "shop", "db", headless));
        assert!(record(&mut o, "shop", "a", "10.5.1.4"));
        assert!(put(&mut o, "pods", "shop", "a", pod));
        // Other namespaces still do not.
        assert!(!record(&mut o, "other", "b", "10.5.1.5"));
        // Verified pod records: every pod record matters.
        let mut v = Objects::new(P).with_pod_ips(true);
        assert!(record(&mut v, "other", "b", "10.5.1.5"));
        // The data is kept either way: a later rebuild sees it.
        assert_eq!(o.pod_ips().count(), 2);
    }
}
