//! A route's backend (Service name + port number or name) resolved to the addresses the proxy
//! connects to (pure): pod addresses directly, as ingress-nginx does, not the ClusterIP.
//!
//! - The Service port: by `port` number, or by `name`.
//! - Without a selector, the Service's Endpoints object (same namespace and name): the ready
//!   addresses of the subsets whose port carries the Service port's name and protocol, at
//!   that Endpoints port (as kube-proxy reads Endpoints; the port there is the target port).
//! - With a selector, the attached pods of the namespace carrying every selector label (the
//!   pod records flanneld publishes), at the `targetPort` (a number, a container port name
//!   resolved per pod, or the Service port when absent): what an endpoints controller would
//!   write.
//!
//! Both families: every ready IPv4 and IPv6 address (a pod's record gives each of its
//! addresses). The list is sorted and without duplicates, so round robin is stable.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use registry::{IntOrString, Protocol, Service};

use crate::objects::Objects;
use crate::routes::{BackendRef, PortRef};

/// Why a backend has no address to send to (the proxy answers 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("Service {0} not found")]
    NoService(String),
    #[error("Service {0} has no such port")]
    NoPort(String),
    #[error("Service {0} has no ready endpoint")]
    NoEndpoints(String),
}

/// The Service port `port` names (TCP only: the proxy speaks HTTP).
fn service_port<'a>(svc: &'a Service, port: &PortRef) -> Option<&'a registry::ServicePort> {
    svc.spec.ports.iter().find(|p| {
        p.protocol == Protocol::Tcp
            && match port {
                PortRef::Number(n) => p.port == i64::from(*n),
                PortRef::Name(name) => p.name() == name,
            }
    })
}

/// The addresses behind `backend`, sorted.
pub fn resolve(objects: &Objects, backend: &BackendRef) -> Result<Vec<SocketAddr>, ResolveError> {
    let key = (backend.namespace.clone(), backend.service.clone());
    let svc = objects
        .services
        .get(&key)
        .ok_or_else(|| ResolveError::NoService(backend.to_string()))?;
    let sp = service_port(svc, &backend.port)
        .ok_or_else(|| ResolveError::NoPort(backend.to_string()))?;
    let mut out = BTreeSet::new();
    match svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
        None => {
            for subset in objects
                .endpoints
                .get(&key)
                .map(|e| e.subsets.as_slice())
                .unwrap_or_default()
            {
                let Some(ep_port) = subset.ports.iter().find(|p| {
                    p.name.as_deref().unwrap_or("") == sp.name() && p.protocol == sp.protocol
                }) else {
                    continue;
                };
                let Some(port) = u16::try_from(ep_port.port).ok().filter(|p| *p != 0) else {
                    continue;
                };
                for a in &subset.addresses {
                    if let Some(ip) = a.addr() {
                        out.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        Some(selector) => {
            let ns = &backend.namespace;
            for (k, rec) in objects
                .records
                .range((ns.clone(), String::new())..)
                .take_while(|(k, _)| k.0 == *ns)
            {
                let Some(pod) = objects.pods.get(k) else {
                    continue;
                };
                if !selector
                    .iter()
                    .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
                {
                    continue;
                }
                let target = match &sp.target_port {
                    None => u16::try_from(sp.port).ok(),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(name)) => pod.named_port(name, sp.protocol),
                };
                let Some(port) = target.filter(|p| *p != 0) else {
                    continue;
                };
                for ip in rec.addrs() {
                    out.insert(SocketAddr::new(ip, port));
                }
            }
        }
    }
    if out.is_empty() {
        return Err(ResolveError::NoEndpoints(backend.to_string()));
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use registry::Object;

    fn obj(v: serde_json::Value) -> Object {
        registry::parse_documents(&v.to_string()).unwrap().remove(0)
    }

    fn backend(svc: &str, port: PortRef) -> BackendRef {
        BackendRef {
            namespace: "web".into(),
            service: svc.into(),
            port,
        }
    }

    fn objects() -> Objects {
        let mut o = Objects::new("/coreos.com/network");
        // Without selector: two ports, three subsets (one not ready, one UDP only).
        o.insert(obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "plain", "namespace": "web"},
            "spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "admin", "port": 81, "targetPort": "adm"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]}
        })));
        o.insert(obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "plain", "namespace": "web"},
            "subsets": [
                {"addresses": [{"ip": "10.5.1.2"}, {"ip": "fd00::2"}],
                 "notReadyAddresses": [{"ip": "10.5.1.9"}],
                 "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]},
                {"addresses": [{"ip": "10.5.2.2"}, {"ip": "10.5.1.2"}],
                 "ports": [{"name": "http", "port": 8080}]},
                {"addresses": [{"ip": "10.5.3.3"}],
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
            ]
        })));
        o.insert(obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "empty", "namespace": "web"},
            "spec": {"ports": [{"port": 80}]}
        })));
        // With a selector: two matching pods (one with a named port), one other.
        o.insert(obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "sel", "namespace": "web"},
            "spec": {"selector": {"app": "a"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "raw", "port": 82}
            ]}
        })));
        for (name, app, port) in [
            ("p1", "a", Some(7000)),
            ("p2", "a", None),
            ("p3", "b", Some(7000)),
        ] {
            let ports = match port {
                Some(p) => serde_json::json!([{"name": "web", "containerPort": p}]),
                None => serde_json::json!([]),
            };
            o.insert(obj(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "web", "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "image": "i", "ports": ports}]}
            })));
        }
        for (name, ips) in [
            ("p1", vec!["10.5.1.5", "fd00::5"]),
            ("p2", vec!["10.5.2.6"]),
            ("p3", vec!["10.5.3.7"]),
        ] {
            let rec: registry::PodRecord = serde_json::from_value(serde_json::json!({
                "IP": ips[0], "IPs": ips, "Node": "n", "NodeIP": "172.30.0.11",
                "Subnet": "10.5.1.0/24", "ContainerID": "c", "Ifname": "eth0"
            }))
            .unwrap();
            o.records.insert(("web".into(), name.into()), rec);
        }
        o
    }

    fn addrs(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn endpoints_object_by_port_number_and_name() {
        let o = objects();
        let want = addrs(&["10.5.1.2:8080", "10.5.2.2:8080", "[fd00::2]:8080"]);
        assert_eq!(
            resolve(&o, &backend("plain", PortRef::Number(80))),
            Ok(want.clone())
        );
        assert_eq!(
            resolve(&o, &backend("plain", PortRef::Name("http".into()))),
            Ok(want)
        );
        // The target port as the Endpoints object has it (named targetPort already resolved).
        assert_eq!(
            resolve(&o, &backend("plain", PortRef::Name("admin".into()))),
            Ok(addrs(&["10.5.1.2:9090", "[fd00::2]:9090"]))
        );
        // UDP ports are not HTTP backends.
        assert!(matches!(
            resolve(&o, &backend("plain", PortRef::Number(53))),
            Err(ResolveError::NoPort(_))
        ));
        assert!(matches!(
            resolve(&o, &backend("plain", PortRef::Number(8080))),
            Err(ResolveError::NoPort(_))
        ));
        assert!(matches!(
            resolve(&o, &backend("missing", PortRef::Number(80))),
            Err(ResolveError::NoService(_))
        ));
        assert!(matches!(
            resolve(&o, &backend("empty", PortRef::Number(80))),
            Err(ResolveError::NoEndpoints(_))
        ));
    }

    #[test]
    fn selector_pods_with_named_and_default_target_ports() {
        let o = objects();
        // Named target port: only the pod declaring it, each of its addresses.
        assert_eq!(
            resolve(&o, &backend("sel", PortRef::Name("http".into()))),
            Ok(addrs(&["10.5.1.5:7000", "[fd00::5]:7000"]))
        );
        // No targetPort: the Service port on every selected pod.
        assert_eq!(
            resolve(&o, &backend("sel", PortRef::Number(82))),
            Ok(addrs(&["10.5.1.5:82", "10.5.2.6:82", "[fd00::5]:82"]))
        );
        // A pod without a record is no endpoint.
        let mut o = o;
        o.records.remove(&("web".to_string(), "p1".to_string()));
        assert_eq!(
            resolve(&o, &backend("sel", PortRef::Number(82))),
            Ok(addrs(&["10.5.2.6:82"]))
        );
        assert!(matches!(
            resolve(&o, &backend("sel", PortRef::Number(80))),
            Err(ResolveError::NoEndpoints(_))
        ));
    }
}
