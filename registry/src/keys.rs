//! Where objects live in etcd, and how a stored value becomes an object (pure).
//!
//! Keys: `<prefix>/registry/namespaces/<name>` and `<prefix>/registry/<plural>/<namespace>/<name>`
//! (plural from [`Kind::plural`]); value: the object's JSON ([`to_json`](crate::to_json):
//! `apiVersion`, `kind`, then its fields; `resourceVersion` is never stored, it is the key's mod
//! revision on read). Allocations: `<prefix>/registry/allocations/clusterips/<ip>` and
//! `<prefix>/registry/allocations/nodeports/<port>`, value `<namespace>/<name>` of the Service
//! holding it. [`parse_key`] returns None for them, so a watcher of `<prefix>/registry/` skips
//! them.

use std::net::IpAddr;

use crate::parse::{object_from_value, ObjectError};
use crate::types::{Kind, Object};

/// The directory under the etcd prefix holding registry objects.
pub const REGISTRY_DIR: &str = "registry";
/// Where namespaced objects without a namespace go.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Namespaces that always exist, stored or not (and cannot be deleted).
pub const IMPLICIT_NAMESPACES: &[&str] = &["default", "kube-system"];
/// The label every Namespace carries with its own name (as Kubernetes sets it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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

/// `<prefix>/registry/allocations/clusterips/<ip>`, IPv6 in its canonical form
/// (`clusterips/fd00:10:96::a`).
pub fn cluster_ip_key(prefix: &str, ip: impl Into<IpAddr>) -> String {
    format!("{}clusterips/{}", allocations_prefix(prefix), ip.into())
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
    ClusterIp(IpAddr),
    NodePort(u16),
}

/// The allocation an allocation key names.
pub fn parse_allocation_key(prefix: &str, key: &str) -> Option<Allocation> {
    let rest = key.strip_prefix(&allocations_prefix(prefix))?;
    if let Some(ip) = rest.strip_prefix("clusterips/") {
        // Only the canonical text names an address (the key written for it).
        return ip
            .parse::<IpAddr>()
            .ok()
            .filter(|a| a.to_string() == ip)
            .map(Allocation::ClusterIp);
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

pub(crate) fn describe_obj(obj: &Object) -> String {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::parse::to_json;
    use crate::types::Kind;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const P: &str = "/coreos.com/network";

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
            cluster_ip_key(P, "fd00:10:96::a".parse::<Ipv6Addr>().unwrap()),
            "/coreos.com/network/registry/allocations/clusterips/fd00:10:96::a"
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
            Some(Allocation::ClusterIp(Ipv4Addr::new(10, 96, 0, 10).into()))
        );
        let v6: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        assert_eq!(
            parse_allocation_key(P, &cluster_ip_key(P, v6)),
            Some(Allocation::ClusterIp(v6.into()))
        );
        // Only the canonical form names an address.
        assert_eq!(
            parse_allocation_key(
                P,
                "/coreos.com/network/registry/allocations/clusterips/fd00:10:96:0::a"
            ),
            None
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
}
