//! Validation of objects before they are stored, with the rules the Kubernetes API server
//! enforces for these kinds (names, labels, ports, protocols, Service types and addresses).
//!
//! Every broken rule is reported, each with the path of its field as Kubernetes spells it
//! (`spec.ports[1].targetPort`), so a user can fix a manifest in one go.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

mod cnp;
mod ingress;

pub use ingress::is_wildcard_dns1123_subdomain;

/// The rules an update breaks that only the stored object shows (a Secret's type and an
/// `immutable` Secret's data, an IngressClass's controller); empty when none.
pub fn update_errors(old: &Object, new: &Object) -> Vec<FieldError> {
    ingress::update_errors(old, new)
}

use crate::alloc::ServiceNetworks;
use crate::types::{
    Container, Endpoints, IntOrString, IpBlock, IpFamily, Kind, LabelSelector, Labels, Namespace,
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, Object, ObjectMeta, Pod, Protocol,
    SelectorOperator, Service, ServiceType, SessionAffinity,
};

/// One broken rule: the field (`spec.ports[1].targetPort`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub msg: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.msg)
    }
}

/// Every rule an object breaks. Displays as `Service default/web is invalid:
/// spec.ports[1].port: must be between 1 and 65535, ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    /// The paths of the broken fields, in order (for tests and tools).
    pub fn fields(&self) -> Vec<&str> {
        self.errors.iter().map(|e| e.field.as_str()).collect()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "(unnamed)"
        } else {
            &self.name
        };
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{name} is invalid: ", self.kind)?,
            None => write!(f, "{} {name} is invalid: ", self.kind)?,
        }
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks `obj` against the API's rules; ClusterIPs must lie in the service network of their
/// family (`service_networks`: an [`ServiceNetworks`], or an `Ipv4Net` for an IPv4-only
/// cluster).
///
/// A namespaced object without `metadata.namespace` is accepted (the store puts it in
/// `default`); a Namespace must not carry one.
pub fn validate(
    obj: &Object,
    service_networks: impl Into<ServiceNetworks>,
) -> Result<(), ValidationErrors> {
    let nets = service_networks.into();
    let mut v = Errors::default();
    match obj {
        Object::Namespace(o) => namespace(&mut v, o),
        Object::Pod(o) => pod(&mut v, o),
        Object::Service(o) => service(&mut v, o, &nets),
        Object::Endpoints(o) => endpoints(&mut v, o),
        Object::NetworkPolicy(o) => network_policy(&mut v, o),
        Object::Secret(o) => ingress::secret(&mut v, o),
        Object::Ingress(o) => ingress::ingress(&mut v, o),
        Object::IngressClass(o) => ingress::ingress_class(&mut v, o),
        Object::ClusterNetworkPolicy(o) => cnp::cluster_network_policy(&mut v, o),
    }
    if v.0.is_empty() {
        return Ok(());
    }
    let meta = obj.metadata();
    Err(ValidationErrors {
        kind: obj.kind(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        errors: v.0,
    })
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            msg: msg.into(),
        });
    }

    /// Adds `msg` for `field` when `check` found a problem.
    fn check(&mut self, field: impl Into<String>, check: Option<String>) {
        if let Some(msg) = check {
            self.add(field, msg);
        }
    }
}

// ---- name rules (Kubernetes' k8s.io/apimachinery/pkg/util/validation) ----

const DNS1123_LABEL_MSG: &str = "must be a lowercase RFC 1123 label: lower case letters, digits and '-', starting and ending with a letter or digit (e.g. 'my-name' or '123-abc'), at most 63 characters";
const DNS1035_LABEL_MSG: &str = "must be a DNS-1035 label: lower case letters, digits and '-', starting with a letter and ending with a letter or digit (e.g. 'my-name' or 'abc-123'), at most 63 characters";
const DNS1123_SUBDOMAIN_MSG: &str = "must be a lowercase RFC 1123 subdomain: lower case letters, digits, '-' and '.', each part starting and ending with a letter or digit (e.g. 'example.com'), at most 253 characters";

/// One DNS-1123 label part: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, no length limit of its own.
fn is_label_part(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
        }
        _ => false,
    }
}

/// DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters (namespace and
/// container names).
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_label_part(s)
}

/// DNS-1123 subdomain: DNS-1123 labels joined by '.', at most 253 characters (Pod names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_part)
}

/// DNS-1035 label: a DNS-1123 label that starts with a letter (Service names).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Why `s` is not an IANA service name (`IANA_SVC_NAME`: at most 15 characters, lower case
/// letters, digits and '-', at least one letter, no leading, trailing or double '-'), or None.
pub fn iana_svc_name_error(s: &str) -> Option<String> {
    let mut problems = Vec::new();
    if s.len() > 15 {
        problems.push("must be no more than 15 characters");
    }
    if !s
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        problems.push("must contain only lower case letters, digits and '-'");
    }
    if s.contains("--") {
        problems.push("must not contain consecutive hyphens");
    }
    if !s.bytes().any(|c| c.is_ascii_lowercase()) {
        problems.push("must contain at least one letter (a-z)");
    }
    if s.starts_with('-') || s.ends_with('-') {
        problems.push("must not begin or end with a hyphen");
    }
    (!problems.is_empty())
        .then(|| format!("{s:?} is not a valid port name: {}", problems.join("; ")))
}

/// Whether `s` is an IANA service name (named ports).
pub fn is_iana_svc_name(s: &str) -> bool {
    iana_svc_name_error(s).is_none()
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63: a label value (non-empty) or the
/// name part of a label key.
fn is_qualified_part(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            s.len() <= 63
                && alnum(first)
                && alnum(last)
                && b.iter()
                    .all(|c| alnum(c) || matches!(*c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// Why `key` is not a valid label key (a qualified name: an optional DNS-1123 subdomain prefix
/// and '/', then a name of at most 63 letters, digits, '-', '_', '.' starting and ending with
/// a letter or digit), or None.
pub fn label_key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some(format!("key {key:?}: prefix part must be non-empty"));
        }
        if !is_dns1123_subdomain(p) {
            return Some(format!("key {key:?}: prefix part {DNS1123_SUBDOMAIN_MSG}"));
        }
    }
    if name.is_empty() {
        return Some(format!("key {key:?}: name part must be non-empty"));
    }
    if name.len() > 63 {
        return Some(format!(
            "key {key:?}: name part must be no more than 63 characters"
        ));
    }
    if !is_qualified_part(name) {
        return Some(format!(
            "key {key:?}: name part must consist of letters, digits, '-', '_' or '.', and must start and end with a letter or digit (e.g. 'MyName', 'my.name' or 'example.com/my-name')"
        ));
    }
    None
}

/// Why `value` is not a valid label value (empty, or at most 63 letters, digits, '-', '_', '.'
/// starting and ending with a letter or digit), or None.
pub fn label_value_error(value: &str) -> Option<String> {
    if value.is_empty() || is_qualified_part(value) {
        return None;
    }
    if value.len() > 63 {
        return Some(format!(
            "value {value:?}: must be no more than 63 characters"
        ));
    }
    Some(format!(
        "value {value:?}: must be empty or consist of letters, digits, '-', '_' or '.', and must start and end with a letter or digit (e.g. 'MyValue', 'my_value' or '12345')"
    ))
}

fn labels(v: &mut Errors, field: &str, labels: &Labels) {
    for (k, val) in labels {
        v.check(field, label_key_error(k));
        v.check(
            field,
            label_value_error(val).map(|m| format!("key {k:?}: {m}")),
        );
    }
}

/// Why `ip` is not an address usable as an endpoint or external IP, or None: IPv4 or IPv6
/// (the API server takes both, whatever families the cluster has), neither unspecified,
/// loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10) nor multicast
/// (224.0.0.0/4, ff00::/8); no IPv4 broadcast, no IPv4-mapped IPv6. An IPv6 text must be the
/// address's canonical form (`fd00::1`, lower case), so a name built from it is unique.
pub fn endpoint_ip_error(ip: &str) -> Option<String> {
    let special = match ip.parse::<IpAddr>() {
        Err(_) => return Some(format!("{ip:?} must be a valid IP address")),
        Ok(IpAddr::V4(a)) => ipv4_special(a)?,
        Ok(IpAddr::V6(a)) => {
            if let Some(special) = ipv6_special(a) {
                special
            } else if a.to_ipv4_mapped().is_some() {
                "an IPv4-mapped address (use the IPv4 form)"
            } else if a.to_string() != ip {
                return Some(format!("{ip:?} must be written as {a}"));
            } else {
                return None;
            }
        }
    };
    Some(format!("{ip} may not be {special}"))
}

/// What makes an IPv4 address unusable as an endpoint, or None.
fn ipv4_special(a: Ipv4Addr) -> Option<&'static str> {
    Some(if a.is_unspecified() {
        "unspecified (0.0.0.0)"
    } else if a.is_loopback() {
        "in the loopback range (127.0.0.0/8)"
    } else if a.is_link_local() {
        "in the link-local range (169.254.0.0/16)"
    } else if a.is_multicast() {
        "in the multicast range (224.0.0.0/4)"
    } else if a.is_broadcast() {
        "the broadcast address"
    } else {
        return None;
    })
}

/// What makes an IPv6 address unusable as an endpoint, or None.
fn ipv6_special(a: Ipv6Addr) -> Option<&'static str> {
    Some(if a.is_unspecified() {
        "unspecified (::)"
    } else if a.is_loopback() {
        "the loopback address (::1)"
    } else if a.segments()[0] & 0xffc0 == 0xfe80 {
        "in the link-local range (fe80::/10)"
    } else if a.is_multicast() {
        "in the multicast range (ff00::/8)"
    } else {
        return None;
    })
}

fn port_range(v: &mut Errors, field: impl Into<String>, port: i64) {
    if !(1..=65535).contains(&port) {
        v.add(field, format!("{port} must be between 1 and 65535"));
    }
}

fn metadata(v: &mut Errors, m: &ObjectMeta, kind: Kind) {
    if m.name.is_empty() {
        v.add("metadata.name", "required");
    } else {
        let (ok, msg) = match kind {
            Kind::Namespace => (is_dns1123_label(&m.name), DNS1123_LABEL_MSG),
            Kind::Pod
            | Kind::NetworkPolicy
            | Kind::Secret
            | Kind::Ingress
            | Kind::IngressClass
            | Kind::ClusterNetworkPolicy => (is_dns1123_subdomain(&m.name), DNS1123_SUBDOMAIN_MSG),
            Kind::Service | Kind::Endpoints => (is_dns1035_label(&m.name), DNS1035_LABEL_MSG),
        };
        if !ok {
            v.add("metadata.name", format!("{:?} {msg}", m.name));
        }
    }
    match (&m.namespace, kind.namespaced()) {
        (Some(_), false) => v.add("metadata.namespace", "not allowed on this type"),
        (Some(ns), true) if !is_dns1123_label(ns) => {
            v.add("metadata.namespace", format!("{ns:?} {DNS1123_LABEL_MSG}"))
        }
        _ => {}
    }
    labels(v, "metadata.labels", &m.labels);
    for k in m.annotations.keys() {
        v.check("metadata.annotations", label_key_error(k));
    }
    let size: usize = m.annotations.iter().map(|(k, a)| k.len() + a.len()).sum();
    if size > 256 * 1024 {
        v.add(
            "metadata.annotations",
            format!("{size} bytes: may not be larger than 256 KiB in total"),
        );
    }
}

fn namespace(v: &mut Errors, ns: &Namespace) {
    metadata(v, &ns.metadata, Kind::Namespace);
}

fn pod(v: &mut Errors, p: &Pod) {
    metadata(v, &p.metadata, Kind::Pod);
    if p.spec.containers.is_empty() {
        v.add("spec.containers", "required: at least one container");
    }
    if let Some(node) = &p.spec.node_name {
        if !node.is_empty() && !is_dns1123_subdomain(node) {
            v.add("spec.nodeName", format!("{node:?} {DNS1123_SUBDOMAIN_MSG}"));
        }
    }
    for (field, value) in [
        ("spec.hostname", &p.spec.hostname),
        ("spec.subdomain", &p.spec.subdomain),
    ] {
        if let Some(h) = value.as_deref().filter(|h| !h.is_empty()) {
            if !is_dns1123_label(h) {
                v.add(field, format!("{h:?} {DNS1123_LABEL_MSG}"));
            }
        }
    }
    let mut names = HashSet::new();
    let mut port_names = HashSet::new();
    for (i, c) in p.spec.containers.iter().enumerate() {
        container(v, i, c, &mut names, &mut port_names);
    }
}

fn container<'a>(
    v: &mut Errors,
    i: usize,
    c: &'a Container,
    names: &mut HashSet<&'a str>,
    port_names: &mut HashSet<&'a str>,
) {
    let path = format!("spec.containers[{i}]");
    if c.name.is_empty() {
        v.add(format!("{path}.name"), "required");
    } else if !is_dns1123_label(&c.name) {
        v.add(
            format!("{path}.name"),
            format!("{:?} {DNS1123_LABEL_MSG}", c.name),
        );
    } else if !names.insert(&c.name) {
        v.add(
            format!("{path}.name"),
            format!("duplicate value {:?}", c.name),
        );
    }
    for (j, port) in c.ports.iter().enumerate() {
        let pp = format!("{path}.ports[{j}]");
        if let Some(name) = &port.name {
            let field = format!("{pp}.name");
            if let Some(e) = iana_svc_name_error(name) {
                v.add(field, e);
            } else if !port_names.insert(name) {
                v.add(field, format!("duplicate value {name:?}"));
            }
        }
        port_range(v, format!("{pp}.containerPort"), port.container_port);
    }
}

fn endpoints(v: &mut Errors, e: &Endpoints) {
    metadata(v, &e.metadata, Kind::Endpoints);
    for (i, subset) in e.subsets.iter().enumerate() {
        let path = format!("subsets[{i}]");
        for (list, addrs) in [
            ("addresses", &subset.addresses),
            ("notReadyAddresses", &subset.not_ready_addresses),
        ] {
            for (j, a) in addrs.iter().enumerate() {
                let ap = format!("{path}.{list}[{j}]");
                v.check(format!("{ap}.ip"), endpoint_ip_error(&a.ip));
                if let Some(h) = a.hostname.as_deref().filter(|h| !h.is_empty()) {
                    if !is_dns1123_label(h) {
                        v.add(
                            format!("{ap}.hostname"),
                            format!("{h:?} {DNS1123_LABEL_MSG}"),
                        );
                    }
                }
                if let Some(n) = a.node_name.as_deref().filter(|n| !n.is_empty()) {
                    if !is_dns1123_subdomain(n) {
                        v.add(
                            format!("{ap}.nodeName"),
                            format!("{n:?} {DNS1123_SUBDOMAIN_MSG}"),
                        );
                    }
                }
            }
        }
        let need_names = subset.ports.len() > 1;
        let mut names = HashSet::new();
        for (j, p) in subset.ports.iter().enumerate() {
            let pp = format!("{path}.ports[{j}]");
            match p.name.as_deref().filter(|n| !n.is_empty()) {
                None if need_names => v.add(
                    format!("{pp}.name"),
                    "required when a subset has more than one port",
                ),
                None => {}
                Some(n) if !is_dns1123_label(n) => {
                    v.add(format!("{pp}.name"), format!("{n:?} {DNS1123_LABEL_MSG}"))
                }
                Some(n) if !names.insert(n) => {
                    v.add(format!("{pp}.name"), format!("duplicate value {n:?}"))
                }
                Some(_) => {}
            }
            port_range(v, format!("{pp}.port"), p.port);
        }
    }
}

/// Whether a Service of this type is reachable from outside (node ports, or external IPs).
fn externally_accessible(s: &Service) -> bool {
    s.spec.type_.has_node_ports()
        || (s.spec.type_ == ServiceType::ClusterIP && !s.spec.external_ips.is_empty())
}

/// Why `ip` cannot be a ClusterIP of this cluster, or None: an address (an IPv6 one in its
/// canonical form) inside the service network of its family, not its network address nor
/// (IPv4) its broadcast address.
pub fn cluster_ip_error(ip: &str, nets: &ServiceNetworks) -> Option<String> {
    let Ok(a) = ip.parse::<IpAddr>() else {
        return Some(format!(
            "{ip:?} must be empty, 'None' or a valid IP address"
        ));
    };
    let family = IpFamily::of(a);
    let (contains, network, broadcast, net) = match (a, nets.v4, nets.v6) {
        (IpAddr::V4(a), Some(n), _) => (
            n.contains(&a),
            a == n.network(),
            a == n.broadcast(),
            n.to_string(),
        ),
        (IpAddr::V6(a6), _, Some(n)) => {
            if a6.to_string() != ip {
                return Some(format!("{ip:?} must be written as {a6}"));
            }
            (n.contains(&a6), a6 == n.network(), false, n.to_string())
        }
        _ => return Some(format!("{a}: {}", not_configured(family))),
    };
    if !contains {
        return Some(format!("{a} is not within the service network {net}"));
    }
    if network {
        return Some(format!(
            "{a} is the network address of the service network {net}"
        ));
    }
    if broadcast {
        return Some(format!(
            "{a} is the broadcast address of the service network {net}"
        ));
    }
    None
}

/// `IPv6 is not configured on this cluster (…)`, the API server's words plus the way out.
pub fn not_configured(family: IpFamily) -> String {
    let how = match family {
        IpFamily::Ipv4 => "EnableIPv4 is false in the network config",
        IpFamily::Ipv6 => "set EnableIPv6 in the network config for an IPv6ServiceNetwork",
    };
    format!("{family} is not configured on this cluster ({how})")
}

/// The rules of `clusterIP`, `clusterIPs`, `ipFamilies` and `ipFamilyPolicy` that need no
/// cluster state beyond the service networks (the API server's
/// `ValidateServiceClusterIPsRelatedFields`): `clusterIPs[0]` is `clusterIP`; at most two,
/// `None` only alone; valid addresses in their family's service network, one per family, in
/// `ipFamilies` order; `ipFamilies` without duplicates. Not for ExternalName Services.
pub fn cluster_ips_errors(s: &Service, nets: &ServiceNetworks) -> Vec<FieldError> {
    let mut v = Errors::default();
    cluster_ips_rules(&mut v, s, nets);
    v.0
}

fn cluster_ips_rules(v: &mut Errors, s: &Service, nets: &ServiceNetworks) {
    let spec = &s.spec;
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let headless = cluster_ip == "None";
    let mut seen = Vec::new();
    for (i, f) in spec.ip_families.iter().enumerate() {
        if seen.contains(f) {
            v.add(
                format!("spec.ipFamilies[{i}]"),
                format!("duplicate value {:?}", f.as_str()),
            );
        }
        seen.push(*f);
    }
    if !cluster_ip.is_empty() && !headless {
        v.check("spec.clusterIP", cluster_ip_error(cluster_ip, nets));
    }
    let mut bad =
        !cluster_ip.is_empty() && !headless && cluster_ip_error(cluster_ip, nets).is_some();
    let ips = &spec.cluster_ips;
    let mut none_misplaced = false;
    for (i, ip) in ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if i == 0 {
            if ip != cluster_ip {
                v.add(
                    field,
                    format!("{ip:?}: first value must match spec.clusterIP"),
                );
                bad = true;
            }
        } else if ip == "None" || headless {
            none_misplaced = true;
        } else if let Some(e) = cluster_ip_error(ip, nets) {
            v.add(field, e);
            bad = true;
        }
    }
    if none_misplaced {
        v.add("spec.clusterIPs", "'None' must be the first and only value");
        bad = true;
    }
    if ips.len() > 2 {
        v.add(
            "spec.clusterIPs",
            format!("{} values: may only hold up to 2 values", ips.len()),
        );
        bad = true;
    }
    if bad || headless {
        return;
    }
    // The addresses: `clusterIPs`, or `clusterIP` alone (the API server syncs the two).
    let addrs: Vec<IpAddr> = if ips.is_empty() {
        cluster_ip.parse().into_iter().collect()
    } else {
        ips.iter().filter_map(|ip| ip.parse().ok()).collect()
    };
    if let [a, b] = addrs[..] {
        if IpFamily::of(a) == IpFamily::of(b) {
            v.add(
                "spec.clusterIPs",
                "may specify no more than one IP for each IP family",
            );
            return;
        }
    }
    for (i, (a, f)) in addrs.iter().zip(&spec.ip_families).enumerate() {
        if IpFamily::of(*a) != *f {
            let field = if ips.is_empty() {
                "spec.clusterIP".to_string()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            v.add(
                field,
                format!("{a}: expected an {f} value as indicated by `ipFamilies[{i}]`"),
            );
        }
    }
}

fn service(v: &mut Errors, s: &Service, nets: &ServiceNetworks) {
    metadata(v, &s.metadata, Kind::Service);
    let spec = &s.spec;
    let t = spec.type_;
    let node_port_type = t.has_node_ports();
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let headless = cluster_ip == "None";

    // type-specific rules
    if t == ServiceType::ExternalName {
        if !cluster_ip.is_empty() {
            v.add("spec.clusterIP", "may not be set for ExternalName services");
        }
        if !spec.cluster_ips.is_empty() {
            v.add(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            );
        }
        if !spec.ip_families.is_empty() {
            v.add(
                "spec.ipFamilies",
                "may not be set for ExternalName services",
            );
        }
        if spec.ip_family_policy.is_some() {
            v.add(
                "spec.ipFamilyPolicy",
                "may not be set for ExternalName services",
            );
        }
        let name = spec.external_name.as_deref().unwrap_or("");
        let clean = name.strip_suffix('.').unwrap_or(name);
        if clean.is_empty() {
            v.add("spec.externalName", "required for ExternalName services");
        } else if !is_dns1123_subdomain(clean) {
            v.add(
                "spec.externalName",
                format!("{name:?} must be a valid DNS name: {DNS1123_SUBDOMAIN_MSG}"),
            );
        }
    } else {
        if headless && node_port_type {
            v.add(
                "spec.clusterIP",
                format!("may not be set to 'None' for {} services", t.as_str()),
            );
        }
        cluster_ips_rules(v, s, nets);
    }

    // ports
    if spec.ports.is_empty() && !headless && t != ServiceType::ExternalName {
        v.add("spec.ports", "required: at least one port");
    }
    let need_names = spec.ports.len() > 1;
    let mut names = HashSet::new();
    let mut keys: HashSet<(i64, Protocol)> = HashSet::new();
    let mut node_ports: HashMap<(i64, Protocol), usize> = HashMap::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match p.name.as_deref().filter(|n| !n.is_empty()) {
            None if need_names => v.add(
                format!("{path}.name"),
                "required when the Service has more than one port",
            ),
            None => {}
            Some(n) => {
                // A Service port name is a DNS-1123 label (up to 63 characters, e.g.
                // `service-port-tcp-80`); only container port names and named targetPorts
                // are IANA service names (15).
                if !is_dns1123_label(n) {
                    v.add(format!("{path}.name"), format!("{n:?} {DNS1123_LABEL_MSG}"));
                } else if !names.insert(n) {
                    v.add(format!("{path}.name"), format!("duplicate value {n:?}"));
                }
            }
        }
        port_range(v, format!("{path}.port"), p.port);
        if !keys.insert((p.port, p.protocol)) {
            v.add(
                path.clone(),
                format!("duplicate value {}/{}", p.port, p.protocol),
            );
        }
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) => port_range(v, format!("{path}.targetPort"), *n),
            Some(IntOrString::String(n)) => {
                v.check(format!("{path}.targetPort"), iana_svc_name_error(n))
            }
        }
        if let Some(np) = p.node_port {
            let field = format!("{path}.nodePort");
            if !node_port_type {
                v.add(
                    field,
                    format!(
                        "may not be used when `type` is '{}' (only NodePort and LoadBalancer)",
                        t.as_str()
                    ),
                );
            } else if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np) {
                v.add(
                    field,
                    format!("{np} is not in the valid range {NODE_PORT_MIN}-{NODE_PORT_MAX}"),
                );
            } else if let Some(j) = node_ports.insert((np, p.protocol), i) {
                v.add(
                    field,
                    format!(
                        "duplicate value {np}/{} (also spec.ports[{j}].nodePort)",
                        p.protocol
                    ),
                );
            }
        }
    }

    for (i, ip) in spec.external_ips.iter().enumerate() {
        v.check(format!("spec.externalIPs[{i}]"), endpoint_ip_error(ip));
    }

    match spec.session_affinity {
        SessionAffinity::None => {
            if spec
                .session_affinity_config
                .as_ref()
                .is_some_and(|c| c.client_ip.is_some())
            {
                v.add(
                    "spec.sessionAffinityConfig",
                    "must not be set when spec.sessionAffinity is None",
                );
            }
        }
        SessionAffinity::ClientIP => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout {
                if !(1..=86400).contains(&t) {
                    v.add(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} must be between 1 and 86400"),
                    );
                }
            }
        }
    }

    if spec.external_traffic_policy.is_some() && !externally_accessible(s) {
        v.add(
            "spec.externalTrafficPolicy",
            "may only be set for NodePort or LoadBalancer services or with spec.externalIPs",
        );
    }

    if let Some(sel) = &spec.selector {
        labels(v, "spec.selector", sel);
    }
}

/// The NodePort range (Kubernetes' default `--service-node-port-range`).
pub const NODE_PORT_MIN: i64 = 30000;
pub const NODE_PORT_MAX: i64 = 32767;

// ---- NetworkPolicy (k8s.io/kubernetes/pkg/apis/networking/validation) ----

/// A label selector: valid keys and values; `In`/`NotIn` need values, `Exists`/`DoesNotExist`
/// take none.
fn label_selector(v: &mut Errors, field: &str, sel: &LabelSelector) {
    labels(v, &format!("{field}.matchLabels"), &sel.match_labels);
    for (i, r) in sel.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        v.check(format!("{f}.key"), label_key_error(&r.key));
        match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn => {
                if r.values.is_empty() {
                    v.add(
                        format!("{f}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    );
                }
                for val in &r.values {
                    v.check(format!("{f}.values"), label_value_error(val));
                }
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist => {
                if !r.values.is_empty() {
                    v.add(
                        format!("{f}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    );
                }
            }
        }
    }
}

fn policy_port(v: &mut Errors, field: &str, p: &NetworkPolicyPort) {
    match &p.port {
        None => {
            if p.end_port.is_some() {
                v.add(
                    format!("{field}.endPort"),
                    "may not be specified when `port` is not specified",
                );
            }
        }
        Some(IntOrString::Int(n)) => {
            port_range(v, format!("{field}.port"), *n);
            if let Some(end) = p.end_port {
                if end < *n {
                    v.add(
                        format!("{field}.endPort"),
                        format!("{end} must be greater than or equal to `port` ({n})"),
                    );
                } else {
                    port_range(v, format!("{field}.endPort"), end);
                }
            }
        }
        Some(IntOrString::String(name)) => {
            v.check(format!("{field}.port"), iana_svc_name_error(name));
            if p.end_port.is_some() {
                v.add(
                    format!("{field}.endPort"),
                    "may not be specified when `port` is non-numeric",
                );
            }
        }
    }
}

/// An IPv4 or IPv6 CIDR, or why not. Host bits may be set (the API accepts `10.0.0.1/24`).
fn cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map_err(|_| format!("{s:?} must be a valid CIDR (e.g. 10.0.0.0/16 or fd00::/64)"))
}

/// `cidr` (either family) and each `except` strictly inside it (so of the same family).
fn ip_block(v: &mut Errors, field: &str, b: &IpBlock) {
    let cidr = match cidr(&b.cidr) {
        Ok(c) => Some(c.trunc()),
        Err(e) => {
            v.add(format!("{field}.cidr"), e);
            None
        }
    };
    for (i, e) in b.except.iter().enumerate() {
        let f = format!("{field}.except[{i}]");
        match self::cidr(e) {
            Err(msg) => v.add(f, msg),
            Ok(ex) => {
                let ex = ex.trunc();
                let Some(c) = cidr else { continue };
                let family = |n: &IpNet| match n {
                    IpNet::V4(_) => IpFamily::Ipv4,
                    IpNet::V6(_) => IpFamily::Ipv6,
                };
                if family(&c) != family(&ex) {
                    v.add(
                        f,
                        format!(
                            "{e} must be a strict subset of `cidr` ({}): it is {}, `cidr` is {}",
                            b.cidr,
                            family(&ex),
                            family(&c)
                        ),
                    );
                } else if !(c.contains(&ex) && ex.prefix_len() > c.prefix_len()) {
                    v.add(
                        f,
                        format!("{e} must be a strict subset of `cidr` ({})", b.cidr),
                    );
                }
            }
        }
    }
}

fn peer(v: &mut Errors, field: &str, p: &NetworkPolicyPeer) {
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match (&p.ip_block, selectors) {
        (None, false) => v.add(
            field,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ),
        (Some(_), true) => v.add(field, "may not specify both ipBlock and another peer"),
        _ => {}
    }
    if let Some(s) = &p.pod_selector {
        label_selector(v, &format!("{field}.podSelector"), s);
    }
    if let Some(s) = &p.namespace_selector {
        label_selector(v, &format!("{field}.namespaceSelector"), s);
    }
    if let Some(b) = &p.ip_block {
        ip_block(v, &format!("{field}.ipBlock"), b);
    }
}

fn network_policy(v: &mut Errors, np: &NetworkPolicy) {
    metadata(v, &np.metadata, Kind::NetworkPolicy);
    let spec = &np.spec;
    label_selector(v, "spec.podSelector", &spec.pod_selector);
    for (i, r) in spec.ingress.iter().enumerate() {
        for (j, p) in r.ports.iter().enumerate() {
            policy_port(v, &format!("spec.ingress[{i}].ports[{j}]"), p);
        }
        for (j, p) in r.from.iter().enumerate() {
            peer(v, &format!("spec.ingress[{i}].from[{j}]"), p);
        }
    }
    for (i, r) in spec.egress.iter().enumerate() {
        for (j, p) in r.ports.iter().enumerate() {
            policy_port(v, &format!("spec.egress[{i}].ports[{j}]"), p);
        }
        for (j, p) in r.to.iter().enumerate() {
            peer(v, &format!("spec.egress[{i}].to[{j}]"), p);
        }
    }
    if let Some(types) = &spec.policy_types {
        let mut seen = Vec::new();
        for (i, t) in types.iter().enumerate() {
            if seen.contains(t) {
                v.add(
                    format!("spec.policyTypes[{i}]"),
                    format!("duplicate value {t:?}"),
                );
            }
            seen.push(*t);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::types::{Endpoints, Namespace, Pod, Service};
    use ipnet::Ipv4Net;
    use serde_json::{json, Value};

    fn net() -> Ipv4Net {
        "10.96.0.0/12".parse().unwrap()
    }

    #[test]
    fn names_are_kubernetes_dns_names() {
        for ok in ["default", "kube-system", "a", "0", "a-b-c", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "..",
            "ä",
            " a",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        for ok in [
            "web-0",
            "a.b.c",
            "coredns-5d78c9869d-abcde",
            &"a".repeat(253),
        ] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a/b",
            "../x",
            "Web",
            "a_b",
            "a.-b",
            "a b",
            "a\nb",
            &"a".repeat(254),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    fn svc(v: Value) -> Object {
        Object::Service(serde_json::from_value::<Service>(v).unwrap())
    }

    fn base_svc() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}
                ]
            }
        })
    }

    fn with(mut base: Value, path: &str, value: Value) -> Value {
        let mut cur = &mut base;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, p) in parts.iter().enumerate() {
            let last = i == parts.len() - 1;
            let next: &mut Value = match p.parse::<usize>() {
                Ok(idx) => &mut cur[idx],
                Err(_) => {
                    if cur.get(*p).is_none() {
                        cur[*p] = json!({});
                    }
                    &mut cur[*p]
                }
            };
            if last {
                *next = value;
                break;
            }
            cur = next;
        }
        base
    }

    /// The field paths `obj` is rejected for.
    fn fields(obj: &Object) -> Vec<String> {
        match validate(obj, net()) {
            Ok(()) => vec![],
            Err(e) => e.errors.iter().map(|e| e.field.clone()).collect(),
        }
    }

    fn svc_fields(path: &str, value: Value) -> Vec<String> {
        fields(&svc(with(base_svc(), path, value)))
    }

    fn one(field: &str) -> Vec<String> {
        vec![field.to_string()]
    }

    #[test]
    fn valid_service_accepted() {
        assert_eq!(fields(&svc(base_svc())), Vec::<String>::new());
        let np = with(base_svc(), "spec.type", json!("NodePort"));
        let np = with(np, "spec.ports.0.nodePort", json!(30080));
        let np = with(np, "spec.externalTrafficPolicy", json!("Local"));
        assert_eq!(fields(&svc(np)), Vec::<String>::new());
        let single = json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 1}]}});
        assert_eq!(
            fields(&svc(single)),
            Vec::<String>::new(),
            "one unnamed port"
        );
    }

    #[test]
    fn message_names_object_and_fields() {
        let v = with(base_svc(), "spec.ports.1.port", json!(0));
        let v = with(v, "spec.ports.0.targetPort", json!("Bad_Name"));
        let e = validate(&svc(v), net()).unwrap_err();
        assert_eq!(
            e.fields(),
            vec!["spec.ports[0].targetPort", "spec.ports[1].port"]
        );
        let text = e.to_string();
        assert!(
            text.starts_with("Service default/web is invalid: spec.ports[0].targetPort: \"Bad_Name\" is not a valid port name"),
            "{text}"
        );
        assert!(
            text.ends_with(", spec.ports[1].port: 0 must be between 1 and 65535"),
            "{text}"
        );
    }

    #[test]
    fn names() {
        assert_eq!(
            svc_fields("metadata.name", json!("1web")),
            one("metadata.name"),
            "DNS-1035"
        );
        assert_eq!(
            svc_fields("metadata.name", json!("Web")),
            one("metadata.name")
        );
        assert_eq!(svc_fields("metadata.name", json!("")), one("metadata.name"));
        assert_eq!(
            svc_fields("metadata.name", json!("a".repeat(64))),
            one("metadata.name")
        );
        assert_eq!(
            svc_fields("metadata.name", json!("a".repeat(63))),
            Vec::<String>::new()
        );
        assert_eq!(
            svc_fields("metadata.namespace", json!("Prod")),
            one("metadata.namespace")
        );
        assert_eq!(
            svc_fields("metadata.namespace", json!("a.b")),
            one("metadata.namespace")
        );

        let ns = |n: &str| {
            Object::Namespace(Namespace {
                metadata: ObjectMeta {
                    name: n.into(),
                    ..Default::default()
                },
            })
        };
        assert!(fields(&ns("prod-1")).is_empty());
        assert!(
            fields(&ns("1prod")).is_empty(),
            "a DNS-1123 label may start with a digit"
        );
        assert_eq!(fields(&ns("prod.x")), one("metadata.name"));
        assert_eq!(fields(&ns("-prod")), one("metadata.name"));
        let mut with_ns = ns("prod");
        with_ns.metadata_mut().namespace = Some("default".into());
        assert_eq!(fields(&with_ns), one("metadata.namespace"));

        let p = |n: &str| {
            pod_obj(json!({"metadata": {"name": n}, "spec": {"containers": [{"name": "c"}]}}))
        };
        assert!(fields(&p("web-0.x")).is_empty(), "Pod names are subdomains");
        assert!(fields(&p("0web")).is_empty());
        assert_eq!(fields(&p("web_0")), one("metadata.name"));
        assert_eq!(fields(&p("web..0")), one("metadata.name"));
        assert_eq!(fields(&p(&"a".repeat(254))), one("metadata.name"));

        let ep = |n: &str| {
            Object::Endpoints(Endpoints {
                metadata: ObjectMeta {
                    name: n.into(),
                    ..Default::default()
                },
                subsets: vec![],
            })
        };
        assert!(fields(&ep("web")).is_empty());
        assert_eq!(fields(&ep("0web")), one("metadata.name"));
    }

    #[test]
    fn label_keys_and_values() {
        for good in ["app", "example.com/app", "a.b_c-d", "A", "k8s.io/Name_1"] {
            assert_eq!(label_key_error(good), None, "{good}");
        }
        for bad in [
            "",
            "/app",
            "Example.com/app",
            "a/b/c",
            "-app",
            "app-",
            "a b",
            &"a".repeat(64),
            "x/",
        ] {
            assert!(label_key_error(bad).is_some(), "{bad:?}");
        }
        for good in ["", "v1", "a.b_c-d", &"v".repeat(63)] {
            assert_eq!(label_value_error(good), None, "{good}");
        }
        for bad in ["-v", "v-", "a b", "é", &"v".repeat(64)] {
            assert!(label_value_error(bad).is_some(), "{bad:?}");
        }
        assert_eq!(
            svc_fields("metadata.labels", json!({"bad key": "x"})),
            one("metadata.labels")
        );
        assert_eq!(
            svc_fields("metadata.labels", json!({"app": "-x"})),
            one("metadata.labels")
        );
        assert_eq!(
            svc_fields("spec.selector", json!({"app": "a b"})),
            one("spec.selector")
        );
        assert_eq!(
            svc_fields("spec.selector", json!({"-": "x"})),
            one("spec.selector")
        );
        assert_eq!(
            svc_fields("spec.selector", json!({"app": ""})),
            Vec::<String>::new()
        );
        assert_eq!(
            svc_fields(
                "metadata.annotations",
                json!({"not a key": "anything goes here"})
            ),
            one("metadata.annotations")
        );
    }

    #[test]
    fn iana_svc_names() {
        for good in ["http", "h2", "a-b", "x1-2-3", "abcdefghijklmno"] {
            assert!(is_iana_svc_name(good), "{good}");
        }
        for bad in [
            "",
            "80",
            "HTTP",
            "-http",
            "http-",
            "a--b",
            "abcdefghijklmnop",
            "a_b",
            "a.b",
        ] {
            assert!(!is_iana_svc_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn service_ports() {
        assert_eq!(
            svc_fields("spec.ports.0.port", json!(65536)),
            one("spec.ports[0].port")
        );
        assert_eq!(
            svc_fields("spec.ports.0.port", json!(-1)),
            one("spec.ports[0].port")
        );
        assert_eq!(
            svc_fields("spec.ports.1.name", Value::Null),
            one("spec.ports[1].name"),
            "names required with >1 port"
        );
        assert_eq!(
            svc_fields("spec.ports.1.name", json!("")),
            one("spec.ports[1].name")
        );
        assert_eq!(
            svc_fields("spec.ports.1.name", json!("http")),
            one("spec.ports[1].name"),
            "unique names"
        );
        assert_eq!(
            svc_fields("spec.ports.1.name", json!("DNS")),
            one("spec.ports[1].name")
        );
        // DNS-1123 labels, not IANA service names: upstream manifests use long names.
        for good in ["a--b", "service-port-tcp-80", &"p".repeat(63), "80"] {
            assert_eq!(
                svc_fields("spec.ports.1.name", json!(good)),
                Vec::<String>::new(),
                "{good}"
            );
        }
        for bad in [&"p".repeat(64), "-http", "http_2"] {
            assert_eq!(
                svc_fields("spec.ports.1.name", json!(bad)),
                one("spec.ports[1].name"),
                "{bad}"
            );
        }
        // A named targetPort stays an IANA service name (it names a container port).
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!("service-port-tcp-80")),
            one("spec.ports[0].targetPort")
        );
        // Same port, other protocol: fine; same port and protocol: duplicate.
        assert_eq!(
            svc_fields("spec.ports.1.port", json!(80)),
            Vec::<String>::new()
        );
        let dup = with(base_svc(), "spec.ports.1.port", json!(80));
        assert_eq!(
            fields(&svc(with(dup, "spec.ports.1.protocol", json!("TCP")))),
            one("spec.ports[1]")
        );
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!(0)),
            one("spec.ports[0].targetPort")
        );
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!(70000)),
            one("spec.ports[0].targetPort")
        );
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!("web-http")),
            Vec::<String>::new()
        );
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!("8080")),
            one("spec.ports[0].targetPort"),
            "no letter"
        );
        assert_eq!(
            svc_fields("spec.ports.0.targetPort", json!("way-too-long-port-name")),
            one("spec.ports[0].targetPort")
        );
        assert_eq!(svc_fields("spec.ports", json!([])), one("spec.ports"));
    }

    #[test]
    fn node_ports() {
        assert_eq!(
            svc_fields("spec.ports.0.nodePort", json!(30080)),
            one("spec.ports[0].nodePort"),
            "ClusterIP type"
        );
        let np = with(base_svc(), "spec.type", json!("NodePort"));
        assert_eq!(
            fields(&svc(with(
                np.clone(),
                "spec.ports.0.nodePort",
                json!(29999)
            ))),
            one("spec.ports[0].nodePort")
        );
        assert_eq!(
            fields(&svc(with(
                np.clone(),
                "spec.ports.0.nodePort",
                json!(32768)
            ))),
            one("spec.ports[0].nodePort")
        );
        assert!(fields(&svc(with(
            np.clone(),
            "spec.ports.0.nodePort",
            json!(32767)
        )))
        .is_empty());
        let lb = with(base_svc(), "spec.type", json!("LoadBalancer"));
        assert!(fields(&svc(with(lb, "spec.ports.0.nodePort", json!(30000)))).is_empty());
        // One nodePort for TCP and UDP is fine; twice for one protocol is not.
        let both = with(np.clone(), "spec.ports.0.nodePort", json!(30053));
        assert!(fields(&svc(with(
            both.clone(),
            "spec.ports.1.nodePort",
            json!(30053)
        )))
        .is_empty());
        let both = with(both, "spec.ports.1.protocol", json!("TCP"));
        assert_eq!(
            fields(&svc(with(both, "spec.ports.1.nodePort", json!(30053)))),
            one("spec.ports[1].nodePort")
        );
    }

    #[test]
    fn cluster_ips() {
        assert!(svc_fields("spec.clusterIP", json!("10.96.0.10")).is_empty());
        assert!(svc_fields("spec.clusterIP", json!("")).is_empty());
        assert!(svc_fields("spec.clusterIP", json!("None")).is_empty());
        assert_eq!(
            svc_fields("spec.clusterIP", json!("10.95.0.10")),
            one("spec.clusterIP")
        );
        assert_eq!(
            svc_fields("spec.clusterIP", json!("10.96.0.0")),
            one("spec.clusterIP"),
            "network address"
        );
        assert_eq!(
            svc_fields("spec.clusterIP", json!("10.111.255.255")),
            one("spec.clusterIP"),
            "broadcast"
        );
        assert_eq!(
            svc_fields("spec.clusterIP", json!("none")),
            one("spec.clusterIP")
        );
        assert_eq!(
            svc_fields("spec.clusterIP", json!("fd00::1")),
            one("spec.clusterIP")
        );
        let e = validate(
            &svc(with(base_svc(), "spec.clusterIP", json!("10.95.0.10"))),
            net(),
        )
        .unwrap_err();
        assert_eq!(
            e.errors[0].msg,
            "10.95.0.10 is not within the service network 10.96.0.0/12"
        );

        let np = with(base_svc(), "spec.type", json!("NodePort"));
        assert_eq!(
            fields(&svc(with(np, "spec.clusterIP", json!("None")))),
            one("spec.clusterIP")
        );
        let lb = with(base_svc(), "spec.type", json!("LoadBalancer"));
        assert_eq!(
            fields(&svc(with(lb, "spec.clusterIP", json!("None")))),
            one("spec.clusterIP")
        );

        let ip = with(base_svc(), "spec.clusterIP", json!("10.96.0.10"));
        assert!(fields(&svc(with(
            ip.clone(),
            "spec.clusterIPs",
            json!(["10.96.0.10"])
        )))
        .is_empty());
        assert_eq!(
            fields(&svc(with(
                ip.clone(),
                "spec.clusterIPs",
                json!(["10.96.0.11"])
            ))),
            one("spec.clusterIPs[0]")
        );
        assert_eq!(
            fields(&svc(with(
                ip,
                "spec.clusterIPs",
                json!(["10.96.0.10", "fd00::10"])
            ))),
            one("spec.clusterIPs[1]")
        );

        // Headless needs no ports.
        let headless = with(base_svc(), "spec.clusterIP", json!("None"));
        assert!(fields(&svc(with(headless, "spec.ports", json!([])))).is_empty());
    }

    #[test]
    fn external_ips() {
        assert!(svc_fields("spec.externalIPs", json!(["192.168.1.10"])).is_empty());
        assert_eq!(
            svc_fields("spec.externalIPs", json!(["192.168.1.10", "x"])),
            one("spec.externalIPs[1]")
        );
        assert_eq!(
            svc_fields("spec.externalIPs", json!(["127.0.0.1"])),
            one("spec.externalIPs[0]")
        );
        assert_eq!(
            svc_fields("spec.externalIPs", json!(["0.0.0.0"])),
            one("spec.externalIPs[0]")
        );
        // IPv6 too (the API server takes either family, whatever the cluster's), with the
        // endpoint rules.
        assert!(svc_fields("spec.externalIPs", json!(["fd00::1", "192.168.1.10"])).is_empty());
        for bad in ["::1", "fe80::1", "ff02::1", "::", "FD00::1"] {
            assert_eq!(
                svc_fields("spec.externalIPs", json!([bad])),
                one("spec.externalIPs[0]"),
                "{bad}"
            );
        }
    }

    #[test]
    fn session_affinity() {
        let cip = with(base_svc(), "spec.sessionAffinity", json!("ClientIP"));
        assert!(fields(&svc(cip.clone())).is_empty());
        let t = |v: Value| {
            fields(&svc(with(
                cip.clone(),
                "spec.sessionAffinityConfig",
                json!({"clientIP": {"timeoutSeconds": v}}),
            )))
        };
        assert!(t(json!(1)).is_empty());
        assert!(t(json!(86400)).is_empty());
        assert_eq!(
            t(json!(0)),
            one("spec.sessionAffinityConfig.clientIP.timeoutSeconds")
        );
        assert_eq!(
            t(json!(86401)),
            one("spec.sessionAffinityConfig.clientIP.timeoutSeconds")
        );
        assert_eq!(
            svc_fields(
                "spec.sessionAffinityConfig",
                json!({"clientIP": {"timeoutSeconds": 60}})
            ),
            one("spec.sessionAffinityConfig")
        );
    }

    #[test]
    fn external_traffic_policy() {
        assert_eq!(
            svc_fields("spec.externalTrafficPolicy", json!("Local")),
            one("spec.externalTrafficPolicy")
        );
        let ext = with(base_svc(), "spec.externalIPs", json!(["192.168.1.10"]));
        assert!(fields(&svc(with(
            ext,
            "spec.externalTrafficPolicy",
            json!("Local")
        )))
        .is_empty());
        let np = with(base_svc(), "spec.type", json!("NodePort"));
        assert!(fields(&svc(with(
            np,
            "spec.externalTrafficPolicy",
            json!("Cluster")
        )))
        .is_empty());
        assert!(svc_fields("spec.internalTrafficPolicy", json!("Local")).is_empty());
    }

    #[test]
    fn external_name() {
        let en = json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "db.example.com."}});
        assert!(
            fields(&svc(en.clone())).is_empty(),
            "no ports needed, trailing dot allowed"
        );
        assert_eq!(
            fields(&svc(with(en.clone(), "spec.externalName", json!("")))),
            one("spec.externalName")
        );
        assert_eq!(
            fields(&svc(with(
                en.clone(),
                "spec.externalName",
                json!("Bad_Host")
            ))),
            one("spec.externalName")
        );
        assert_eq!(
            fields(&svc(with(
                en.clone(),
                "spec.clusterIP",
                json!("10.96.0.10")
            ))),
            one("spec.clusterIP")
        );
        assert_eq!(
            fields(&svc(with(en, "spec.clusterIP", json!("None")))),
            one("spec.clusterIP")
        );
    }

    fn pod_obj(v: Value) -> Object {
        Object::Pod(serde_json::from_value::<Pod>(v).unwrap())
    }

    fn base_pod() -> Value {
        json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "sidecar", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"containerPort": 9000}]}
            ]}
        })
    }

    fn pod_fields(path: &str, value: Value) -> Vec<String> {
        fields(&pod_obj(with(base_pod(), path, value)))
    }

    #[test]
    fn pod_hostname_and_subdomain_are_labels() {
        assert!(pod_fields("spec.hostname", json!("web-0")).is_empty());
        assert!(pod_fields("spec.subdomain", json!("web")).is_empty());
        assert_eq!(
            pod_fields("spec.hostname", json!("Web_0")),
            one("spec.hostname")
        );
        assert_eq!(
            pod_fields("spec.subdomain", json!("a.b")),
            one("spec.subdomain")
        );
    }

    #[test]
    fn pods() {
        assert!(fields(&pod_obj(base_pod())).is_empty());
        assert_eq!(
            pod_fields("spec.containers", json!([])),
            one("spec.containers")
        );
        assert_eq!(
            pod_fields("spec.containers.1.name", json!("app")),
            one("spec.containers[1].name")
        );
        assert_eq!(
            pod_fields("spec.containers.1.name", json!("")),
            one("spec.containers[1].name")
        );
        assert_eq!(
            pod_fields("spec.containers.1.name", json!("Side")),
            one("spec.containers[1].name")
        );
        assert_eq!(
            pod_fields("spec.containers.1.ports.0.name", json!("http")),
            one("spec.containers[1].ports[0].name"),
            "unique per pod"
        );
        assert_eq!(
            pod_fields("spec.containers.0.ports.0.name", json!("HTTP")),
            one("spec.containers[0].ports[0].name")
        );
        assert_eq!(
            pod_fields("spec.containers.1.ports.1.containerPort", json!(0)),
            one("spec.containers[1].ports[1].containerPort")
        );
        assert_eq!(
            pod_fields("spec.containers.1.ports.1.containerPort", json!(65536)),
            one("spec.containers[1].ports[1].containerPort")
        );
        assert_eq!(
            pod_fields("metadata.labels", json!({"app": "a/b"})),
            one("metadata.labels")
        );
    }

    fn ep_obj(v: Value) -> Object {
        Object::Endpoints(serde_json::from_value::<Endpoints>(v).unwrap())
    }

    fn base_ep() -> Value {
        json!({
            "metadata": {"name": "db", "namespace": "default"},
            "subsets": [{
                "addresses": [{"ip": "192.168.1.20"}, {"ip": "192.168.1.21", "nodeName": "node-a"}],
                "ports": [{"name": "pg", "port": 5432}, {"name": "metrics", "port": 9187}]
            }]
        })
    }

    fn ep_fields(path: &str, value: Value) -> Vec<String> {
        fields(&ep_obj(with(base_ep(), path, value)))
    }

    #[test]
    fn endpoints() {
        assert!(fields(&ep_obj(base_ep())).is_empty());
        assert_eq!(
            ep_fields("subsets.0.addresses.1.ip", json!("192.168.1")),
            one("subsets[0].addresses[1].ip")
        );
        // IPv6 endpoints are accepted as the API server accepts them, special ranges not.
        assert!(ep_fields("subsets.0.addresses.1.ip", json!("fd00::1")).is_empty());
        assert!(ep_fields("subsets.0.addresses.1.ip", json!("2001:db8::a")).is_empty());
        for bad in [
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "FD00::1",
            "fd00:0::1",
            "fd00::1%eth0",
        ] {
            assert_eq!(
                ep_fields("subsets.0.addresses.1.ip", json!(bad)),
                one("subsets[0].addresses[1].ip"),
                "{bad}"
            );
        }
        assert_eq!(
            ep_fields("subsets.0.addresses.0.ip", json!("127.0.0.1")),
            one("subsets[0].addresses[0].ip")
        );
        assert_eq!(
            ep_fields("subsets.0.notReadyAddresses", json!([{"ip": "x"}])),
            one("subsets[0].notReadyAddresses[0].ip")
        );
        assert_eq!(
            ep_fields("subsets.0.ports.1.port", json!(0)),
            one("subsets[0].ports[1].port")
        );
        // Port names follow the Service's rule (DNS-1123 label, up to 63 characters).
        assert!(ep_fields("subsets.0.ports.1.name", json!("service-port-tcp-9187")).is_empty());
        assert!(ep_fields("subsets.0.ports.1.name", json!("p".repeat(63))).is_empty());
        assert_eq!(
            ep_fields("subsets.0.ports.1.name", json!("p".repeat(64))),
            one("subsets[0].ports[1].name")
        );
        assert_eq!(
            ep_fields("subsets.0.ports.1.name", json!("pg")),
            one("subsets[0].ports[1].name")
        );
        assert_eq!(
            ep_fields("subsets.0.ports.1.name", Value::Null),
            one("subsets[0].ports[1].name"),
            "required with >1 port"
        );
        assert_eq!(
            ep_fields("subsets.0.ports.1.name", json!("Metrics")),
            one("subsets[0].ports[1].name")
        );
        let single = with(base_ep(), "subsets.0.ports", json!([{"port": 5432}]));
        assert!(fields(&ep_obj(single)).is_empty(), "one unnamed port");
        // Names are unique per subset, not per object.
        let mut two = base_ep();
        two["subsets"].as_array_mut().unwrap().push(
            json!({"addresses": [{"ip": "192.168.1.30"}], "ports": [{"name": "pg", "port": 5433}]}),
        );
        assert!(fields(&ep_obj(two)).is_empty());
    }

    fn netpol(v: Value) -> Object {
        Object::NetworkPolicy(serde_json::from_value::<NetworkPolicy>(v).unwrap())
    }

    #[test]
    fn network_policy_valid_and_invalid_fields() {
        let good = json!({
            "metadata": {"name": "allow-web.v1", "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [
                        {"podSelector": {}, "namespaceSelector": {"matchExpressions": [
                            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}
                        ]}},
                        {"ipBlock": {"cidr": "10.5.0.0/16", "except": ["10.5.1.0/24"]}}
                    ],
                    "ports": [
                        {"port": 80},
                        {"protocol": "UDP", "port": "dns"},
                        {"port": 8000, "endPort": 8100},
                        {"protocol": "SCTP"}
                    ]
                }],
                "egress": [{}],
                "policyTypes": ["Ingress", "Egress"]
            }
        });
        assert_eq!(validate(&netpol(good), net()), Ok(()));

        let bad = json!({
            "metadata": {"name": "Bad_Name", "namespace": "x"},
            "spec": {
                "podSelector": {"matchExpressions": [
                    {"key": "app", "operator": "In"},
                    {"key": "tier", "operator": "Exists", "values": ["a"]}
                ]},
                "ingress": [{
                    "from": [
                        {},
                        {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}},
                        {"ipBlock": {"cidr": "10.5.0.0/16", "except": ["10.6.0.0/24", "10.5.0.0/16"]}},
                        {"ipBlock": {"cidr": "fd00::/64", "except": ["10.0.0.0/8"]}}
                    ],
                    "ports": [
                        {"port": 0},
                        {"port": "http", "endPort": 90},
                        {"port": 90, "endPort": 80},
                        {"endPort": 80},
                        {"port": "not_a_name!"}
                    ]
                }],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"bad key!": "v"}}}]}],
                "policyTypes": ["Ingress", "Ingress"]
            }
        });
        let err = validate(&netpol(bad), net()).unwrap_err();
        assert_eq!(
            err.fields(),
            vec![
                "metadata.name",
                "spec.podSelector.matchExpressions[0].values",
                "spec.podSelector.matchExpressions[1].values",
                "spec.ingress[0].ports[0].port",
                "spec.ingress[0].ports[1].endPort",
                "spec.ingress[0].ports[2].endPort",
                "spec.ingress[0].ports[3].endPort",
                "spec.ingress[0].ports[4].port",
                "spec.ingress[0].from[0]",
                "spec.ingress[0].from[1]",
                "spec.ingress[0].from[2].ipBlock.except[0]",
                "spec.ingress[0].from[2].ipBlock.except[1]",
                "spec.ingress[0].from[3].ipBlock.except[0]",
                "spec.egress[0].to[0].namespaceSelector.matchLabels",
                "spec.policyTypes[1]",
            ],
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("NetworkPolicy x/Bad_Name is invalid: "));
    }

    // ---- IPv6 / dual stack ----

    fn nets(v4: bool, v6: bool) -> ServiceNetworks {
        ServiceNetworks {
            v4: v4.then(net),
            v6: v6.then(|| "fd00:10:96::/112".parse().unwrap()),
        }
    }

    /// `(field, message)` of every error of base_svc with `spec` fields replaced, on `nets`.
    fn svc_errors(spec: Value, nets: ServiceNetworks) -> Vec<(String, String)> {
        let mut v = base_svc();
        for (k, val) in spec.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        match validate(&svc(v), nets) {
            Ok(()) => vec![],
            Err(e) => e.errors.into_iter().map(|e| (e.field, e.msg)).collect(),
        }
    }

    fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
        want.iter()
            .map(|(f, m)| (f.to_string(), m.to_string()))
            .collect()
    }

    #[test]
    fn dual_stack_cluster_ip_rules() {
        let table: Vec<(Value, Vec<(&str, &str)>)> = vec![
            (json!({"clusterIP": "fd00:10:96::a"}), vec![]),
            (json!({"clusterIP": "fd00:10:96::ffff"}), vec![]), // no broadcast in IPv6
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"]}),
                vec![],
            ),
            (
                json!({"clusterIP": "fd00:10:96::a", "clusterIPs": ["fd00:10:96::a", "10.96.0.10"],
                       "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}),
                vec![],
            ),
            (
                json!({"clusterIP": "None", "clusterIPs": ["None"], "ipFamilies": ["IPv4", "IPv6"]}),
                vec![],
            ),
            (
                json!({"clusterIP": "fd00:10:96:0::a"}),
                vec![(
                    "spec.clusterIP",
                    "\"fd00:10:96:0::a\" must be written as fd00:10:96::a",
                )],
            ),
            (
                json!({"clusterIP": "FD00:10:96::A"}),
                vec![(
                    "spec.clusterIP",
                    "\"FD00:10:96::A\" must be written as fd00:10:96::a",
                )],
            ),
            (
                json!({"clusterIP": "fd00:10:97::a"}),
                vec![(
                    "spec.clusterIP",
                    "fd00:10:97::a is not within the service network fd00:10:96::/112",
                )],
            ),
            (
                json!({"clusterIP": "fd00:10:96::"}),
                vec![(
                    "spec.clusterIP",
                    "fd00:10:96:: is the network address of the service network fd00:10:96::/112",
                )],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "10.96.0.11"]}),
                vec![(
                    "spec.clusterIPs",
                    "may specify no more than one IP for each IP family",
                )],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a", "10.96.0.11"]}),
                vec![("spec.clusterIPs", "3 values: may only hold up to 2 values")],
            ),
            (
                json!({"clusterIP": "None", "clusterIPs": ["None", "fd00:10:96::a"]}),
                vec![("spec.clusterIPs", "'None' must be the first and only value")],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "None"]}),
                vec![("spec.clusterIPs", "'None' must be the first and only value")],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:97::a"]}),
                vec![(
                    "spec.clusterIPs[1]",
                    "fd00:10:97::a is not within the service network fd00:10:96::/112",
                )],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["fd00:10:96::a", "10.96.0.10"]}),
                vec![(
                    "spec.clusterIPs[0]",
                    "\"fd00:10:96::a\": first value must match spec.clusterIP",
                )],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"], "ipFamilies": ["IPv6", "IPv4"]}),
                vec![
                    (
                        "spec.clusterIPs[0]",
                        "10.96.0.10: expected an IPv6 value as indicated by `ipFamilies[0]`",
                    ),
                    (
                        "spec.clusterIPs[1]",
                        "fd00:10:96::a: expected an IPv4 value as indicated by `ipFamilies[1]`",
                    ),
                ],
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ipFamilies": ["IPv6"]}),
                vec![(
                    "spec.clusterIP",
                    "10.96.0.10: expected an IPv6 value as indicated by `ipFamilies[0]`",
                )],
            ),
            (
                json!({"ipFamilies": ["IPv4", "IPv4"]}),
                vec![("spec.ipFamilies[1]", "duplicate value \"IPv4\"")],
            ),
            (
                json!({"ipFamilies": ["IPv6", "IPv4", "IPv6"]}),
                vec![("spec.ipFamilies[2]", "duplicate value \"IPv6\"")],
            ),
        ];
        for (spec, want) in table {
            assert_eq!(
                svc_errors(spec.clone(), nets(true, true)),
                pairs(&want),
                "{spec}"
            );
        }
        // A family the cluster lacks.
        assert_eq!(
            svc_errors(json!({"clusterIP": "fd00:10:96::a"}), nets(true, false)),
            pairs(&[("spec.clusterIP", "fd00:10:96::a: IPv6 is not configured on this cluster (set EnableIPv6 in the network config for an IPv6ServiceNetwork)")])
        );
        assert_eq!(
            svc_errors(json!({"clusterIP": "10.96.0.10"}), nets(false, true)),
            pairs(&[("spec.clusterIP", "10.96.0.10: IPv4 is not configured on this cluster (EnableIPv4 is false in the network config)")])
        );
        assert_eq!(
            svc_errors(
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"]}),
                nets(true, false)
            ),
            pairs(&[("spec.clusterIPs[1]", "fd00:10:96::a: IPv6 is not configured on this cluster (set EnableIPv6 in the network config for an IPv6ServiceNetwork)")])
        );
        // An IPv6-only cluster takes IPv6 addresses alone.
        assert!(svc_errors(json!({"clusterIP": "fd00:10:96::a"}), nets(false, true)).is_empty());
    }

    #[test]
    fn external_name_takes_no_families() {
        let en = json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "db.example.com",
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}});
        let e = validate(&svc(en), nets(true, true)).unwrap_err();
        assert_eq!(
            e.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            vec![
                "spec.ipFamilies: may not be set for ExternalName services",
                "spec.ipFamilyPolicy: may not be set for ExternalName services"
            ]
        );
    }

    #[test]
    fn unknown_families_and_policies_are_named_when_parsing() {
        let doc = |spec: &str| {
            crate::parse::parse_documents(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{port: 1}}], {spec}}}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let e = doc("ipFamilies: [IPv5]");
        assert!(
            e.contains("spec.ipFamilies[0]: unknown variant `IPv5`"),
            "{e}"
        );
        let e = doc("ipFamilyPolicy: DualStack");
        assert!(
            e.contains("spec.ipFamilyPolicy: unknown variant `DualStack`"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_and_external_ip_messages() {
        for (ip, want) in [
            ("192.168.1.20", None),
            ("fd00::1", None),
            ("2001:db8::a", None),
            ("fec0::1", None),
            ("0.0.0.0", Some("0.0.0.0 may not be unspecified (0.0.0.0)")),
            (
                "127.0.0.1",
                Some("127.0.0.1 may not be in the loopback range (127.0.0.0/8)"),
            ),
            (
                "127.255.0.1",
                Some("127.255.0.1 may not be in the loopback range (127.0.0.0/8)"),
            ),
            (
                "169.254.169.254",
                Some("169.254.169.254 may not be in the link-local range (169.254.0.0/16)"),
            ),
            (
                "224.0.0.1",
                Some("224.0.0.1 may not be in the multicast range (224.0.0.0/4)"),
            ),
            (
                "239.1.1.1",
                Some("239.1.1.1 may not be in the multicast range (224.0.0.0/4)"),
            ),
            (
                "255.255.255.255",
                Some("255.255.255.255 may not be the broadcast address"),
            ),
            ("::", Some(":: may not be unspecified (::)")),
            ("::1", Some("::1 may not be the loopback address (::1)")),
            (
                "fe80::1",
                Some("fe80::1 may not be in the link-local range (fe80::/10)"),
            ),
            (
                "febf::1",
                Some("febf::1 may not be in the link-local range (fe80::/10)"),
            ),
            (
                "ff02::1",
                Some("ff02::1 may not be in the multicast range (ff00::/8)"),
            ),
            (
                "ff05::2",
                Some("ff05::2 may not be in the multicast range (ff00::/8)"),
            ),
            (
                "::ffff:10.0.0.1",
                Some("::ffff:10.0.0.1 may not be an IPv4-mapped address (use the IPv4 form)"),
            ),
            ("FD00::1", Some("\"FD00::1\" must be written as fd00::1")),
            (
                "fd00:0::1",
                Some("\"fd00:0::1\" must be written as fd00::1"),
            ),
            ("10.0.0", Some("\"10.0.0\" must be a valid IP address")),
            (
                "fd00::1%eth0",
                Some("\"fd00::1%eth0\" must be a valid IP address"),
            ),
        ] {
            assert_eq!(endpoint_ip_error(ip).as_deref(), want, "{ip}");
            let field = |path: &str, v: Value| match want {
                None => assert!(svc_fields(path, v).is_empty(), "{ip}"),
                Some(_) => assert_eq!(svc_fields(path, v), one("spec.externalIPs[0]"), "{ip}"),
            };
            field("spec.externalIPs", json!([ip]));
            let got = ep_fields("subsets.0.addresses.0.ip", json!(ip));
            match want {
                None => assert!(got.is_empty(), "{ip}"),
                Some(_) => assert_eq!(got, one("subsets[0].addresses[0].ip"), "{ip}"),
            }
        }
    }

    /// Every `(field, message)` of a policy with one ingress peer `ipBlock`.
    fn block_errors(block: Value) -> Vec<(String, String)> {
        let np = json!({"metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": block}]}]}});
        match validate(&netpol(np), net()) {
            Ok(()) => vec![],
            Err(e) => e.errors.into_iter().map(|e| (e.field, e.msg)).collect(),
        }
    }

    #[test]
    fn ip_blocks_in_both_families() {
        let f = "spec.ingress[0].from[0].ipBlock";
        let table: Vec<(Value, Vec<(String, &str)>)> = vec![
            (json!({"cidr": "fd00::/48"}), vec![]),
            (json!({"cidr": "::/0", "except": ["fd00::/8"]}), vec![]),
            (json!({"cidr": "fd00::1/48", "except": ["fd00:0:0:1::/64", "fd00::/49"]}), vec![]),
            (json!({"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}), vec![]),
            (
                json!({"cidr": "fd00::/48", "except": ["fd00::/48"]}),
                vec![(format!("{f}.except[0]"), "fd00::/48 must be a strict subset of `cidr` (fd00::/48)")],
            ),
            (
                json!({"cidr": "fd00::/48", "except": ["fd01::/64"]}),
                vec![(format!("{f}.except[0]"), "fd01::/64 must be a strict subset of `cidr` (fd00::/48)")],
            ),
            (
                json!({"cidr": "fd00::/48", "except": ["10.0.0.0/8"]}),
                vec![(format!("{f}.except[0]"), "10.0.0.0/8 must be a strict subset of `cidr` (fd00::/48): it is IPv4, `cidr` is IPv6")],
            ),
            (
                json!({"cidr": "0.0.0.0/0", "except": ["::/0"]}),
                vec![(format!("{f}.except[0]"), "::/0 must be a strict subset of `cidr` (0.0.0.0/0): it is IPv6, `cidr` is IPv4")],
            ),
            (
                json!({"cidr": "fd00::/129"}),
                vec![(format!("{f}.cidr"), "\"fd00::/129\" must be a valid CIDR (e.g. 10.0.0.0/16 or fd00::/64)")],
            ),
            (
                json!({"cidr": "fd00::/48", "except": ["fd00::1"]}),
                vec![(format!("{f}.except[0]"), "\"fd00::1\" must be a valid CIDR (e.g. 10.0.0.0/16 or fd00::/64)")],
            ),
        ];
        for (block, want) in table {
            let want: Vec<(String, String)> =
                want.into_iter().map(|(f, m)| (f, m.to_string())).collect();
            assert_eq!(block_errors(block.clone()), want, "{block}");
        }
    }
}
