//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (the network-policy-api project's
//! cluster-scoped policy: tiers Admin and Baseline around NetworkPolicy, priorities, rules with
//! actions Accept, Deny and Pass), standard channel. Fields the API requires are kept optional
//! here so that validation, not deserialization, names them when they are missing.

use serde::{Deserialize, Serialize};

use super::{LabelSelector, ObjectMeta, Protocol};

/// The API's bounds.
pub const CNP_PRIORITY_MAX: i64 = 1000;
pub const CNP_MAX_RULES: usize = 25;
pub const CNP_MAX_PEERS: usize = 25;
pub const CNP_MAX_PROTOCOLS: usize = 25;
pub const CNP_MAX_NETWORKS: usize = 25;
pub const CNP_RULE_NAME_MAX: usize = 100;
pub const CNP_CIDR_MAX_LEN: usize = 43;

/// `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (cluster-scoped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ClusterNetworkPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Required, 0..=1000; lower numbers are evaluated first within the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// The pods the policy applies to: exactly one of `namespaces` and `pods`.
    #[serde(default)]
    pub subject: ClusterNetworkPolicySubject,
    /// Rules in order of precedence (the first that matches decides); at most 25.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<ClusterNetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<ClusterNetworkPolicyEgressRule>,
}

/// The tier a ClusterNetworkPolicy belongs to: Admin before NetworkPolicy, Baseline after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exactly one field: all pods of the selected namespaces, or selected pods of selected
/// namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicySubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods matching `podSelector` (required; empty: all) in namespaces matching
/// `namespaceSelector` (empty or absent: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RuleAction {
    /// Allowed; no later ClusterNetworkPolicy or NetworkPolicy rule of this direction counts.
    Accept,
    /// Dropped; nothing later counts.
    Deny,
    /// The rest of this tier is skipped; evaluation goes on in the next tier.
    Pass,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
        }
    }
}

/// Traffic to the subject's pods from any of `from`, on any of `protocols` (absent: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicyIngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RuleAction>,
    /// Required, 1..=25 peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<ClusterNetworkPolicyPeer>>,
    /// Absent: every protocol and port; present: 1..=25 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

/// Traffic from the subject's pods to any of `to`, on any of `protocols` (absent: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicyEgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RuleAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<ClusterNetworkPolicyPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

/// A peer: exactly one field. `networks` exists only for egress peers; `nodes` and
/// `domainNames` are the API's experimental channel and kept only so validation can refuse
/// them by name (this implementation serves the standard channel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// CIDRs (IPv4 or IPv6), 1..=25; they match pod addresses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<serde_json::Value>,
}

/// Exactly one field: a TCP, UDP or SCTP destination port, or a destination named port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPort>,
    /// A container port name of the destination pod (its protocol is the container port's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

impl ClusterNetworkPolicyProtocol {
    /// The protocol entries that are set, with their protocol (valid objects have one).
    pub fn protocol_ports(&self) -> impl Iterator<Item = (Protocol, &ProtocolPort)> {
        [
            (Protocol::Tcp, self.tcp.as_ref()),
            (Protocol::Udp, self.udp.as_ref()),
            (Protocol::Sctp, self.sctp.as_ref()),
        ]
        .into_iter()
        .filter_map(|(p, v)| v.map(|v| (p, v)))
    }
}

/// `destinationPort` (required by the API's MinProperties).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// A port number or a range (exactly one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<CnpPortRange>,
}

impl CnpPort {
    /// The inclusive range of ports it covers (a valid object's).
    pub fn bounds(&self) -> Option<(i64, i64)> {
        match (self.number, &self.range) {
            (Some(n), None) => Some((n, n)),
            (None, Some(r)) => Some((r.start?, r.end?)),
            _ => None,
        }
    }
}

/// `start` < `end`, both inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnpPortRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
}
