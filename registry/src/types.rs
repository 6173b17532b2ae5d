//! The object types, shaped as the Kubernetes API's (`v1` Namespace, Pod, Service, Endpoints),
//! with camelCase field names so a manifest written for `kubectl` parses unchanged. Numbers
//! that the API bounds (ports, timeouts) are kept wide here so that validation, not
//! deserialization, rejects them with a message naming the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod cnp;
mod ingress;
mod secret;

pub use cnp::{
    ClusterNetworkPolicy, ClusterNetworkPolicyEgressRule, ClusterNetworkPolicyIngressRule,
    ClusterNetworkPolicyPeer, ClusterNetworkPolicyProtocol, ClusterNetworkPolicySpec,
    ClusterNetworkPolicySubject, CnpPort, CnpPortRange, NamespacedPod, ProtocolPort, RuleAction,
    Tier, CNP_CIDR_MAX_LEN, CNP_MAX_NETWORKS, CNP_MAX_PEERS, CNP_MAX_PROTOCOLS, CNP_MAX_RULES,
    CNP_PRIORITY_MAX, CNP_RULE_NAME_MAX,
};

pub use ingress::{
    HttpIngressPath, HttpIngressRuleValue, Ingress, IngressBackend, IngressClass,
    IngressClassParametersReference, IngressClassSpec, IngressRule, IngressServiceBackend,
    IngressSpec, IngressTls, PathType, ServiceBackendPort, DEFAULT_CLASS_ANNOTATION,
    LEGACY_CLASS_ANNOTATION,
};
pub use secret::{
    Secret, SecretBytes, SecretString, MAX_SECRET_SIZE, SECRET_TYPE_OPAQUE, SECRET_TYPE_TLS,
    TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY,
};

/// Labels or a selector's `matchLabels`: sorted for stable output.
pub type Labels = BTreeMap<String, String>;

/// Labels as `k=v,k2=v2` (sorted by key), as `kubectl get --show-labels` prints them.
pub fn labels_string(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `metadata`: what every object carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Absent for cluster-scoped objects (Namespace); defaults to `default` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The etcd mod revision the object was read at (set on read, ignored on write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// Transport protocol of a port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The API spelling (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The nftables / netfilter spelling (`tcp`, `udp`, `sctp`).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port given by number or by name (`targetPort`, NetworkPolicy ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// `v1` Namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// A container port of a Pod (`spec.containers[].ports[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: Protocol,
}

/// A container of a Pod; only what networking needs (name and ports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Informational: where the pod runs comes from its CNI attachment record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// With `subdomain`: the pod's name in a headless Service of that name
    /// (`<hostname>.<subdomain>.<ns>.svc.<zone>`, as StatefulSet pods get).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
}

/// `v1` Pod: labels and named container ports. Its address and node are not part of the
/// object; they come from the pod's CNI attachment record (`<prefix>/pods/<ns>/<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

impl Pod {
    /// The container port named `name` with protocol `protocol`, as Kubernetes resolves a
    /// named `targetPort`: the first container declaring it.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .and_then(|p| u16::try_from(p.container_port).ok())
    }
}

/// `spec.type` of a Service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    /// Accepted and treated as NodePort (there is no load balancer to provision).
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    /// The API spelling (`ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }

    /// NodePort and LoadBalancer Services get node ports.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// An IP family (`spec.ipFamilies[]` of a Service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl IpFamily {
    /// The API spelling (`IPv4`, `IPv6`).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "IPv4",
            IpFamily::Ipv6 => "IPv6",
        }
    }

    /// The family of an address.
    pub fn of(ip: std::net::IpAddr) -> IpFamily {
        match ip {
            std::net::IpAddr::V4(_) => IpFamily::Ipv4,
            std::net::IpAddr::V6(_) => IpFamily::Ipv6,
        }
    }

    /// The other family.
    pub fn other(self) -> IpFamily {
        match self {
            IpFamily::Ipv4 => IpFamily::Ipv6,
            IpFamily::Ipv6 => IpFamily::Ipv4,
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.ipFamilyPolicy` of a Service: how many families it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamilyPolicy {
    /// One family (`ipFamilies[0]`, else the cluster's primary).
    SingleStack,
    /// Both families when the cluster has both, else one.
    PreferDualStack,
    /// Both families; refused on a single-stack cluster.
    RequireDualStack,
}

impl IpFamilyPolicy {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
}

impl std::fmt::Display for IpFamilyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.sessionAffinity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIP,
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// `spec.ports[]` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Required when the Service has more than one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: i64,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// Allocated from 30000-32767 for NodePort/LoadBalancer Services when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i64>,
}

impl ServicePort {
    /// The port's name, empty when unnamed (Endpoints match ports by this name).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// Affinity timeout, 1..=86400 s; default 10800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, rename = "clientIP", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// The default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Pods with all these labels (in the Service's namespace) are its endpoints. Absent:
    /// endpoints come from an Endpoints object of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The primary ClusterIP (`clusterIPs[0]`): allocated from the service network of
    /// `ipFamilies[0]` when absent or empty; `None` makes a headless Service.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// One ClusterIP per family, in `ipFamilies` order (at most two, of different families).
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    /// The families of `clusterIPs`, primary first; filled in by the store (kept absent on an
    /// IPv4-only cluster when neither the manifest nor the stored Service has them).
    #[serde(default, rename = "ipFamilies", skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<IpFamily>,
    /// Filled in like `ipFamilies`: `SingleStack` unless given (headless without selector:
    /// `RequireDualStack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
    #[serde(default, rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
}

/// `v1` Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

impl Service {
    /// The ClusterIPs as addresses, primary first (`clusterIPs`, or `clusterIP` when that is
    /// absent); none when headless or ExternalName. Entries that are not addresses are skipped.
    pub fn cluster_ip_addrs(&self) -> Vec<std::net::IpAddr> {
        if self.spec.type_ == ServiceType::ExternalName {
            return Vec::new();
        }
        let list: Vec<&str> = if self.spec.cluster_ips.is_empty() {
            self.spec.cluster_ip.as_deref().into_iter().collect()
        } else {
            self.spec.cluster_ips.iter().map(String::as_str).collect()
        };
        list.into_iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// The IPv4 ClusterIP, primary or secondary (None when absent, headless or IPv6-only).
    pub fn cluster_ip_addr(&self) -> Option<std::net::Ipv4Addr> {
        self.cluster_ip_addrs().into_iter().find_map(|a| match a {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        })
    }

    /// The IPv6 ClusterIP, primary or secondary (None when absent, headless or IPv4-only).
    pub fn cluster_ipv6_addr(&self) -> Option<std::net::Ipv6Addr> {
        self.cluster_ip_addrs().into_iter().find_map(|a| match a {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        })
    }

    /// Headless: `clusterIP: None`.
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some("None")
    }

    /// The session affinity timeout in seconds when `ClientIP` affinity is on.
    pub fn affinity_timeout(&self) -> Option<u32> {
        match self.spec.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIP => Some(
                self.spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
            ),
        }
    }
}

/// `subsets[].addresses[]` of an Endpoints object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl EndpointAddress {
    /// The address (IPv4 or IPv6; validation makes it one).
    pub fn addr(&self) -> Option<std::net::IpAddr> {
        self.ip.parse().ok()
    }
}

/// `subsets[].ports[]` of an Endpoints object; `name` matches the Service port's name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<EndpointAddress>,
    /// Kept but never used as endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

/// `v1` Endpoints: the endpoints of a Service without selector (same namespace and name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub subsets: Vec<EndpointSubset>,
}

/// The kinds the registry stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    Endpoints,
    NetworkPolicy,
    Secret,
    Ingress,
    IngressClass,
    ClusterNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::Endpoints,
        Kind::NetworkPolicy,
        Kind::Secret,
        Kind::Ingress,
        Kind::IngressClass,
        Kind::ClusterNetworkPolicy,
    ];

    /// The `apiVersion` of the kind (`networking.k8s.io/v1` for NetworkPolicy, Ingress and
    /// IngressClass, `policy.networking.k8s.io/v1alpha2` for ClusterNetworkPolicy, `v1` else).
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy | Kind::Ingress | Kind::IngressClass => "networking.k8s.io/v1",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1alpha2",
            _ => "v1",
        }
    }

    /// The `kind:` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Secret => "Secret",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    /// The plural used in etcd keys (and accepted by the CLI).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Endpoints => "endpoints",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Secret => "secrets",
            Kind::Ingress => "ingresses",
            Kind::IngressClass => "ingressclasses",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
        }
    }

    /// Namespaced kinds live under `<plural>/<namespace>/<name>`.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Namespace | Kind::IngressClass | Kind::ClusterNetworkPolicy
        )
    }

    /// Parses what a user types: `Service`, `service`, `services`, `svc`, `ns`, `po`, `ep`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "namespace" | "namespaces" | "ns" => Some(Kind::Namespace),
            "pod" | "pods" | "po" => Some(Kind::Pod),
            "service" | "services" | "svc" => Some(Kind::Service),
            "endpoints" | "ep" => Some(Kind::Endpoints),
            "networkpolicy" | "networkpolicies" | "netpol" => Some(Kind::NetworkPolicy),
            "secret" | "secrets" => Some(Kind::Secret),
            "ingress" | "ingresses" | "ing" => Some(Kind::Ingress),
            "ingressclass" | "ingressclasses" => Some(Kind::IngressClass),
            "clusternetworkpolicy" | "clusternetworkpolicies" | "cnp" => {
                Some(Kind::ClusterNetworkPolicy)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label selector (`matchLabels` AND every `matchExpressions` requirement). Empty selects
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    #[default]
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }

    /// Selects everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// As kubectl prints selectors: `app=web,tier in (a,b),!legacy` (empty: "").
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                SelectorOperator::In => format!("{} in ({})", r.key, r.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                SelectorOperator::Exists => r.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// `networking.k8s.io/v1` NetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// The pods (of the policy's namespace) the policy applies to; empty: all of them.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkPolicyEgressRule>,
    /// Absent: `Ingress`, plus `Egress` when there are egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<PolicyType>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

impl NetworkPolicySpec {
    /// The directions the policy isolates (its `policyTypes`, defaulted as the API does).
    pub fn isolates(&self, t: PolicyType) -> bool {
        match &self.policy_types {
            // The API server defaults an empty list as it does an absent one.
            Some(types) if !types.is_empty() => types.contains(&t),
            _ => t == PolicyType::Ingress || !self.egress.is_empty(),
        }
    }
}

/// Allows traffic from any of `from` (empty: from everywhere) to any of `ports` (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicyIngressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<NetworkPolicyPeer>,
}

/// Allows traffic to any of `to` (empty: everywhere) on any of `ports` (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicyEgressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<NetworkPolicyPeer>,
}

/// Pods (by pod and/or namespace selector; both: AND) or an address block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// `cidr` minus every `except` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A port (number or the name of a container port of the destination pod), or with `endPort`
/// a range; no port: every port of the protocol. Protocol defaults to TCP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

/// Any stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    Endpoints(Endpoints),
    NetworkPolicy(NetworkPolicy),
    Secret(Secret),
    Ingress(Ingress),
    IngressClass(IngressClass),
    ClusterNetworkPolicy(ClusterNetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Secret(_) => Kind::Secret,
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::ClusterNetworkPolicy(_) => Kind::ClusterNetworkPolicy,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::Ingress(o) => &o.metadata,
            Object::IngressClass(o) => &o.metadata,
            Object::ClusterNetworkPolicy(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::Endpoints(o) => &mut o.metadata,
            Object::NetworkPolicy(o) => &mut o.metadata,
            Object::Secret(o) => &mut o.metadata,
            Object::Ingress(o) => &mut o.metadata,
            Object::IngressClass(o) => &mut o.metadata,
            Object::ClusterNetworkPolicy(o) => &mut o.metadata,
        }
    }
}
