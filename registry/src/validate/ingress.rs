//! The API server's rules for `networking.k8s.io/v1` Ingress and IngressClass and `v1` Secret
//! (k8s.io/kubernetes pkg/apis/networking/validation and pkg/apis/core/validation), every
//! broken field by its path.

use std::net::IpAddr;

use super::{
    iana_svc_name_error, is_dns1035_label, is_dns1123_subdomain, metadata, port_range, Errors,
    FieldError, DNS1035_LABEL_MSG, DNS1123_SUBDOMAIN_MSG,
};
use crate::types::{
    HttpIngressPath, Ingress, IngressBackend, IngressClass, Kind, Object, PathType, Secret,
    LEGACY_CLASS_ANNOTATION, MAX_SECRET_SIZE, SECRET_TYPE_TLS, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY,
};

const WILDCARD_MSG: &str = "must be a wildcard DNS-1123 subdomain: '*.' followed by a lowercase RFC 1123 subdomain (e.g. '*.example.com')";
/// Sequences a path of type Exact or Prefix may not contain, nor end with.
const INVALID_PATH_SEQUENCES: [&str; 5] = ["//", "/./", "/../", "%2f", "%2F"];
const INVALID_PATH_SUFFIXES: [&str; 2] = ["/..", "/."];

/// `*.` and a DNS-1123 subdomain, at most 253 characters.
pub fn is_wildcard_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.strip_prefix("*.").is_some_and(is_dns1123_subdomain)
}

/// Why `host` cannot be a rule's or TLS entry's host, or None.
fn host_error(host: &str, allow_ip: bool) -> Option<String> {
    if !allow_ip && host.parse::<IpAddr>().is_ok() {
        return Some(format!("{host:?} must be a DNS name, not an IP address"));
    }
    if host.contains('*') {
        (!is_wildcard_dns1123_subdomain(host)).then(|| format!("{host:?} {WILDCARD_MSG}"))
    } else {
        (!is_dns1123_subdomain(host)).then(|| format!("{host:?} {DNS1123_SUBDOMAIN_MSG}"))
    }
}

fn backend(v: &mut Errors, field: &str, b: &IngressBackend) {
    match (&b.service, &b.resource) {
        (Some(_), Some(_)) => v.add(field, "cannot set both service and resource backends"),
        (None, Some(_)) => v.add(
            format!("{field}.resource"),
            "resource backends are not served by this ingress controller: use a service backend",
        ),
        (None, None) => v.add(
            field,
            "required: one backend (`service` or `resource`) must be specified",
        ),
        (Some(s), None) => {
            let sf = format!("{field}.service");
            if s.name.is_empty() {
                v.add(format!("{sf}.name"), "required");
            } else if !is_dns1035_label(&s.name) {
                v.add(
                    format!("{sf}.name"),
                    format!("{:?} {DNS1035_LABEL_MSG}", s.name),
                );
            }
            match (&s.port.name, s.port.number) {
                (Some(_), Some(_)) => v.add(
                    format!("{sf}.port"),
                    "cannot set both port name & port number",
                ),
                (Some(name), None) => v.check(format!("{sf}.port.name"), iana_svc_name_error(name)),
                (None, Some(n)) => port_range(v, format!("{sf}.port.number"), n),
                (None, None) => v.add(format!("{sf}.port"), "port name or number is required"),
            }
        }
    }
}

fn path(v: &mut Errors, field: &str, p: &HttpIngressPath) {
    let value = p.path.as_deref().unwrap_or("");
    match p.path_type {
        None => v.add(
            format!("{field}.pathType"),
            "required: pathType must be specified",
        ),
        Some(PathType::Exact | PathType::Prefix) => {
            let pf = format!("{field}.path");
            if !value.starts_with('/') {
                v.add(&pf, format!("{value:?} must be an absolute path"));
            }
            for seq in INVALID_PATH_SEQUENCES {
                if value.contains(seq) {
                    v.add(&pf, format!("{value:?} must not contain '{seq}'"));
                }
            }
            for suffix in INVALID_PATH_SUFFIXES {
                if value.ends_with(suffix) {
                    v.add(&pf, format!("{value:?} cannot end with '{suffix}'"));
                }
            }
        }
        Some(PathType::ImplementationSpecific) => {
            if !value.is_empty() && !value.starts_with('/') {
                v.add(
                    format!("{field}.path"),
                    format!("{value:?} must be an absolute path"),
                );
            }
        }
    }
    backend(v, &format!("{field}.backend"), &p.backend);
}

pub(super) fn ingress(v: &mut Errors, ing: &Ingress) {
    metadata(v, &ing.metadata, Kind::Ingress);
    let spec = &ing.spec;
    if let Some(class) = &spec.ingress_class_name {
        if !is_dns1123_subdomain(class) {
            v.add(
                "spec.ingressClassName",
                format!("{class:?} {DNS1123_SUBDOMAIN_MSG}"),
            );
        }
        if ing
            .metadata
            .annotations
            .contains_key(LEGACY_CLASS_ANNOTATION)
        {
            v.add(
                format!("metadata.annotations[{LEGACY_CLASS_ANNOTATION}]"),
                "can not be set when the class field is also set",
            );
        }
    }
    if spec.rules.is_empty() && spec.default_backend.is_none() {
        v.add(
            "spec",
            "either `defaultBackend` or `rules` must be specified",
        );
    }
    if let Some(b) = &spec.default_backend {
        backend(v, "spec.defaultBackend", b);
    }
    for (i, tls) in spec.tls.iter().enumerate() {
        for (j, h) in tls.hosts.iter().enumerate() {
            v.check(format!("spec.tls[{i}].hosts[{j}]"), host_error(h, true));
        }
        if let Some(name) = tls.secret_name.as_deref().filter(|n| !n.is_empty()) {
            if !is_dns1123_subdomain(name) {
                v.add(
                    format!("spec.tls[{i}].secretName"),
                    format!("{name:?} {DNS1123_SUBDOMAIN_MSG}"),
                );
            }
        }
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        if let Some(h) = rule.host.as_deref().filter(|h| !h.is_empty()) {
            v.check(format!("spec.rules[{i}].host"), host_error(h, false));
        }
        if let Some(http) = &rule.http {
            if http.paths.is_empty() {
                v.add(format!("spec.rules[{i}].http.paths"), "required");
            }
            for (j, p) in http.paths.iter().enumerate() {
                path(v, &format!("spec.rules[{i}].http.paths[{j}]"), p);
            }
        }
    }
}

/// `IsDomainPrefixedPath`: a DNS-1123 subdomain, '/', and a non-empty path of URL characters.
fn domain_prefixed_path_error(s: &str) -> Option<String> {
    let Some((domain, path)) = s.split_once('/') else {
        return Some(format!(
            "{s:?} must be a domain-prefixed path (such as \"acme.io/foo\")"
        ));
    };
    if !is_dns1123_subdomain(domain) {
        return Some(format!("{s:?}: domain {domain:?} {DNS1123_SUBDOMAIN_MSG}"));
    }
    if path.is_empty()
        || !path
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,;=:".contains(&c))
    {
        return Some(format!(
            "{s:?}: path {path:?} must be non-empty and consist of letters, digits and /-._~%!$&'()*+,;=:"
        ));
    }
    None
}

pub(super) fn ingress_class(v: &mut Errors, c: &IngressClass) {
    metadata(v, &c.metadata, Kind::IngressClass);
    let ctl = &c.spec.controller;
    if ctl.is_empty() {
        v.add("spec.controller", "required");
    } else if ctl.len() > 253 {
        v.add("spec.controller", "must be no more than 253 characters");
    } else {
        v.check("spec.controller", domain_prefixed_path_error(ctl));
    }
    if let Some(p) = &c.spec.parameters {
        let f = "spec.parameters";
        if p.kind.is_empty() {
            v.add(format!("{f}.kind"), "required");
        }
        if p.name.is_empty() {
            v.add(format!("{f}.name"), "required");
        }
        if let Some(g) = p.api_group.as_deref().filter(|g| !g.is_empty()) {
            if !is_dns1123_subdomain(g) {
                v.add(
                    format!("{f}.apiGroup"),
                    format!("{g:?} {DNS1123_SUBDOMAIN_MSG}"),
                );
            }
        }
        match (p.scope.as_deref().unwrap_or("Cluster"), &p.namespace) {
            ("Cluster", Some(_)) => v.add(
                format!("{f}.namespace"),
                "`parameters.scope` is set to 'Cluster': namespace is forbidden",
            ),
            ("Namespace", None) => v.add(
                format!("{f}.namespace"),
                "required when `parameters.scope` is set to 'Namespace'",
            ),
            ("Cluster", None) | ("Namespace", Some(_)) => {}
            (other, _) => v.add(
                format!("{f}.scope"),
                format!(
                    "unsupported value {other:?}: supported values: \"Cluster\", \"Namespace\""
                ),
            ),
        }
    }
}

/// `IsConfigMapKey`: letters, digits, '-', '_', '.', at most 253, not `.`/`..`, not `..`-led.
fn data_key_error(k: &str) -> Option<String> {
    if k.is_empty() || k.len() > 253 {
        return Some(format!("{k:?} must be 1 to 253 characters"));
    }
    if !k
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Some(format!(
            "{k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
        ));
    }
    if k == "." || k == ".." || k.starts_with("..") {
        return Some(format!("{k:?} must not be '.', '..' or start with '..'"));
    }
    None
}

/// The keys each built-in type requires (beyond `kubernetes.io/tls`'s pair).
fn required_keys(secret_type: &str) -> &'static [&'static str] {
    match secret_type {
        SECRET_TYPE_TLS => &[TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY],
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        _ => &[],
    }
}

pub(super) fn secret(v: &mut Errors, s: &Secret) {
    metadata(v, &s.metadata, Kind::Secret);
    let mut size = 0;
    for (k, val) in &s.data {
        v.check(format!("data[{k}]"), data_key_error(k));
        size += val.0.len();
    }
    for (k, val) in &s.string_data {
        v.check(format!("stringData[{k}]"), data_key_error(k));
        size += val.0.len();
    }
    if size > MAX_SECRET_SIZE {
        v.add(
            "data",
            format!("{size} bytes: may not be larger than {MAX_SECRET_SIZE} bytes"),
        );
    }
    let t = s.secret_type();
    if t.is_empty() {
        v.add("type", "required");
    }
    for key in required_keys(t) {
        if s.value(key).is_none() {
            v.add(format!("data[{key}]"), format!("required for type {t}"));
        }
    }
    if t == "kubernetes.io/basic-auth"
        && s.value("username").is_none()
        && s.value("password").is_none()
    {
        v.add(
            "data",
            "type kubernetes.io/basic-auth needs at least one of the keys \"username\" and \"password\"",
        );
    }
    if t == "kubernetes.io/service-account-token"
        && !s
            .metadata
            .annotations
            .contains_key("kubernetes.io/service-account.name")
    {
        v.add(
            "metadata.annotations[kubernetes.io/service-account.name]",
            "required for type kubernetes.io/service-account-token",
        );
    }
}

/// The rules an update of a Secret or IngressClass breaks against the stored object: a
/// Secret's type never changes, an `immutable` Secret keeps its data and stays immutable, an
/// IngressClass keeps its controller.
pub(super) fn update_errors(old: &Object, new: &Object) -> Vec<FieldError> {
    let mut v = Errors::default();
    match (old, new) {
        (Object::Secret(o), Object::Secret(n)) => {
            if o.secret_type() != n.secret_type() {
                v.add("type", "field is immutable");
            }
            if o.immutable == Some(true) {
                if n.immutable != Some(true) {
                    v.add("immutable", "field is immutable when `immutable` is set");
                }
                if o.data != n.data || !n.string_data.is_empty() {
                    v.add("data", "field is immutable when `immutable` is set");
                }
            }
        }
        (Object::IngressClass(o), Object::IngressClass(n))
            if o.spec.controller != n.spec.controller =>
        {
            v.add("spec.controller", "field is immutable");
        }
        _ => {}
    }
    v.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{json, Value};

    use crate::types::Object;
    use crate::validate::validate;

    fn fields(kind: &str, v: Value) -> Vec<String> {
        let obj = match kind {
            "Ingress" => Object::Ingress(serde_json::from_value(v).unwrap()),
            "IngressClass" => Object::IngressClass(serde_json::from_value(v).unwrap()),
            _ => Object::Secret(serde_json::from_value(v).unwrap()),
        };
        let net: ipnet::Ipv4Net = "10.96.0.0/12".parse().unwrap();
        match validate(&obj, net) {
            Ok(()) => Vec::new(),
            Err(e) => e.errors.iter().map(|f| f.field.clone()).collect(),
        }
    }

    fn svc(name: &str, port: Value) -> Value {
        json!({"service": {"name": name, "port": port}})
    }

    #[test]
    fn a_full_ingress_is_valid() {
        let good = json!({
            "metadata": {"name": "shop", "namespace": "web"},
            "spec": {
                "ingressClassName": "flannel",
                "defaultBackend": svc("fallback", json!({"number": 80})),
                "tls": [{"hosts": ["shop.example.com", "*.example.com"], "secretName": "shop-tls"}],
                "rules": [
                    {"host": "shop.example.com", "http": {"paths": [
                        {"path": "/api", "pathType": "Prefix", "backend": svc("api", json!({"name": "http"}))},
                        {"path": "/", "pathType": "Exact", "backend": svc("front", json!({"number": 8080}))},
                        {"pathType": "ImplementationSpecific", "backend": svc("front", json!({"number": 8080}))}
                    ]}},
                    {"host": "*.example.com", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": svc("wild", json!({"number": 80}))}
                    ]}},
                    {"http": {"paths": [
                        {"path": "/x", "pathType": "Prefix", "backend": svc("x", json!({"number": 80}))}
                    ]}}
                ]
            }
        });
        assert!(fields("Ingress", good).is_empty());
    }

    #[test]
    fn ingress_rules_of_the_api_server() {
        // Neither rules nor a default backend.
        assert_eq!(
            fields("Ingress", json!({"metadata": {"name": "a"}})),
            ["spec"]
        );
        let one_path = |path: Value, path_type: Value, backend: Value| {
            json!({"metadata": {"name": "a"}, "spec": {"rules": [{"host": "a.example.com", "http": {"paths": [
                {"path": path, "pathType": path_type, "backend": backend}
            ]}}]}})
        };
        let p = "spec.rules[0].http.paths[0]";
        let ok = svc("web", json!({"number": 80}));
        for bad in [
            "relative", "/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a/..", "/a/.",
        ] {
            assert_eq!(
                fields("Ingress", one_path(json!(bad), json!("Prefix"), ok.clone())),
                [format!("{p}.path")],
                "{bad}"
            );
        }
        // ImplementationSpecific only needs an absolute path (or none).
        assert!(fields(
            "Ingress",
            one_path(json!("/a//b"), json!("ImplementationSpecific"), ok.clone())
        )
        .is_empty());
        assert_eq!(
            fields(
                "Ingress",
                one_path(json!("x"), json!("ImplementationSpecific"), ok.clone())
            ),
            [format!("{p}.path")]
        );
        assert_eq!(
            fields("Ingress", one_path(json!("/"), Value::Null, ok.clone())),
            [format!("{p}.pathType")]
        );
        // Backends: exactly one port form, a DNS-1035 Service name, a service at all.
        assert_eq!(
            fields(
                "Ingress",
                one_path(
                    json!("/"),
                    json!("Exact"),
                    svc("web", json!({"number": 80, "name": "http"}))
                )
            ),
            [format!("{p}.backend.service.port")]
        );
        assert_eq!(
            fields(
                "Ingress",
                one_path(json!("/"), json!("Exact"), svc("web", json!({})))
            ),
            [format!("{p}.backend.service.port")]
        );
        assert_eq!(
            fields(
                "Ingress",
                one_path(
                    json!("/"),
                    json!("Exact"),
                    svc("web", json!({"number": 70000}))
                )
            ),
            [format!("{p}.backend.service.port.number")]
        );
        assert_eq!(
            fields(
                "Ingress",
                one_path(
                    json!("/"),
                    json!("Exact"),
                    svc("9web", json!({"number": 80}))
                )
            ),
            [format!("{p}.backend.service.name")]
        );
        assert_eq!(
            fields(
                "Ingress",
                one_path(
                    json!("/"),
                    json!("Exact"),
                    json!({"resource": {"kind": "Bucket", "name": "b"}})
                )
            ),
            [format!("{p}.backend.resource")]
        );
        assert_eq!(
            fields("Ingress", one_path(json!("/"), json!("Exact"), json!({}))),
            [format!("{p}.backend")]
        );
        // Hosts: no IP address, wildcard only as the whole first label.
        for bad in [
            "10.0.0.1",
            "*",
            "a.*.example.com",
            "*example.com",
            "Shop.example.com",
        ] {
            let v = json!({"metadata": {"name": "a"}, "spec": {"rules": [{"host": bad, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": ok}
            ]}}]}});
            assert_eq!(fields("Ingress", v), ["spec.rules[0].host"], "{bad}");
        }
        // A rule with http needs paths.
        let v = json!({"metadata": {"name": "a"}, "spec": {"rules": [{"host": "a.b", "http": {"paths": []}}]}});
        assert_eq!(fields("Ingress", v), ["spec.rules[0].http.paths"]);
        // TLS: hosts and the Secret's name.
        let v = json!({"metadata": {"name": "a"}, "spec": {"defaultBackend": ok, "tls": [{"hosts": ["a..b"], "secretName": "Bad_Name"}]}});
        assert_eq!(
            fields("Ingress", v),
            ["spec.tls[0].hosts[0]", "spec.tls[0].secretName"]
        );
        // The class field and the legacy annotation together.
        let v = json!({"metadata": {"name": "a", "annotations": {"kubernetes.io/ingress.class": "nginx"}},
            "spec": {"ingressClassName": "flannel", "defaultBackend": ok}});
        assert_eq!(
            fields("Ingress", v),
            ["metadata.annotations[kubernetes.io/ingress.class]"]
        );
    }

    #[test]
    fn ingress_class_rules() {
        let good = json!({"metadata": {"name": "flannel", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
            "spec": {"controller": "flannel.io/ingress", "parameters": {"kind": "Config", "name": "c", "scope": "Namespace", "namespace": "ops"}}});
        assert!(fields("IngressClass", good).is_empty());
        assert_eq!(
            fields("IngressClass", json!({"metadata": {"name": "a"}})),
            ["spec.controller"]
        );
        for bad in ["nginx", "Flannel.io/x", "flannel.io/", "flannel.io/a b"] {
            assert_eq!(
                fields(
                    "IngressClass",
                    json!({"metadata": {"name": "a"}, "spec": {"controller": bad}})
                ),
                ["spec.controller"],
                "{bad}"
            );
        }
        let v = json!({"metadata": {"name": "a", "namespace": "x"}, "spec": {"controller": "a.io/b",
            "parameters": {"kind": "", "name": "", "scope": "Namespace"}}});
        assert_eq!(
            fields("IngressClass", v),
            [
                "metadata.namespace",
                "spec.parameters.kind",
                "spec.parameters.name",
                "spec.parameters.namespace"
            ]
        );
        let v = json!({"metadata": {"name": "a"}, "spec": {"controller": "a.io/b",
            "parameters": {"kind": "K", "name": "n", "scope": "Galaxy"}}});
        assert_eq!(fields("IngressClass", v), ["spec.parameters.scope"]);
    }

    #[test]
    fn secret_rules() {
        let tls = json!({"metadata": {"name": "shop-tls"}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}});
        assert!(fields("Secret", tls).is_empty());
        // stringData counts for the required keys.
        let tls = json!({"metadata": {"name": "shop-tls"}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA=="}, "stringData": {"tls.key": "k"}});
        assert!(fields("Secret", tls).is_empty());
        let missing = json!({"metadata": {"name": "t"}, "type": "kubernetes.io/tls", "data": {"tls.crt": "Y2VydA=="}});
        assert_eq!(fields("Secret", missing), ["data[tls.key]"]);
        let bad_key = json!({"metadata": {"name": "o"}, "data": {"a/b": "eA==", "..x": "eA=="}});
        assert_eq!(fields("Secret", bad_key), ["data[..x]", "data[a/b]"]);
        let big = "A".repeat(MAX + 8);
        let v = json!({"metadata": {"name": "o"}, "stringData": {"big": big}});
        assert_eq!(fields("Secret", v), ["data"]);
        let ba = json!({"metadata": {"name": "o"}, "type": "kubernetes.io/basic-auth", "stringData": {"other": "x"}});
        assert_eq!(fields("Secret", ba), ["data"]);
    }

    const MAX: usize = crate::types::MAX_SECRET_SIZE;

    #[test]
    fn updates_keep_what_is_immutable() {
        let secret = |v: Value| Object::Secret(serde_json::from_value(v).unwrap());
        let fields = |o: &Object, n: &Object| {
            crate::validate::update_errors(o, n)
                .into_iter()
                .map(|e| e.field)
                .collect::<Vec<_>>()
        };
        let a = secret(json!({"metadata": {"name": "s"}, "type": "Opaque", "data": {"k": "eA=="}}));
        let b = secret(json!({"metadata": {"name": "s"}, "type": "Opaque", "data": {"k": "eQ=="}}));
        assert!(fields(&a, &b).is_empty(), "a mutable Secret's data changes");
        let c = secret(
            json!({"metadata": {"name": "s"}, "type": "kubernetes.io/basic-auth", "data": {"username": "eA=="}}),
        );
        assert_eq!(fields(&a, &c), ["type"]);
        let frozen = secret(
            json!({"metadata": {"name": "s"}, "type": "Opaque", "immutable": true, "data": {"k": "eA=="}}),
        );
        assert!(fields(&frozen, &frozen).is_empty());
        let changed = secret(
            json!({"metadata": {"name": "s"}, "type": "Opaque", "immutable": true, "data": {"k": "eQ=="}}),
        );
        assert_eq!(fields(&frozen, &changed), ["data"]);
        assert_eq!(fields(&frozen, &b), ["immutable", "data"]);
        let class = |c: &str| {
            Object::IngressClass(
                serde_json::from_value(
                    json!({"metadata": {"name": "c"}, "spec": {"controller": c}}),
                )
                .unwrap(),
            )
        };
        assert_eq!(
            fields(&class("a.io/x"), &class("a.io/y")),
            ["spec.controller"]
        );
        assert!(fields(&class("a.io/x"), &class("a.io/x")).is_empty());
    }
}
