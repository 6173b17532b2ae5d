//! The NetworkPolicy semantics as a pure function of the objects.
//!
//! A connection from `src` to `dst` on (protocol, port) is allowed when the source's egress
//! and the destination's ingress both allow it:
//! - a pod is isolated for a direction only when some policy of its namespace selects it and
//!   isolates that direction (`policyTypes`, defaulting to Ingress, plus Egress when the policy
//!   has egress rules); a pod not isolated allows everything in that direction;
//! - an isolated pod allows what at least one rule of one selecting policy allows (policies
//!   and rules are additive); within a rule the peers are OR'ed, the ports are OR'ed and the
//!   two are AND'ed; an empty list means "all";
//! - a peer is a podSelector (pods of the policy's namespace), a namespaceSelector (pods of
//!   matching namespaces; namespaces carry `kubernetes.io/metadata.name`), both (AND), or an
//!   ipBlock (`cidr` minus `except`);
//! - a port is a number, a number range (`endPort`) or a name, resolved against the
//!   destination pod's container ports (name and protocol); protocol defaults to TCP.
//!
//! Addresses: a connection is of one family (IPv4 or IPv6, [`Family`]); a pod takes part with
//! its addresses of that family (a dual-stack pod has one of each), so selectors match a pod
//! in both families, while an ipBlock matches only addresses of its own family (an IPv6
//! `cidr` never matches an IPv4 connection, and the reverse).
//!
//! Decisions where the API is silent (kept identical in the enforcement):
//! - traffic between a pod and its own node is allowed in both directions (the API's docs:
//!   "traffic to and from the node where a Pod is running is always allowed"; any address
//!   of that node);
//! - ipBlock peers match pod addresses too, not only addresses outside the cluster (as Calico
//!   and Cilium do); the address seen is the one after the service proxy's DNAT and before
//!   any SNAT of the destination's node, so a ClusterIP is judged by the pod it reaches;
//! - a pod reaching itself (directly or through its own Service) is always allowed;
//! - hosts (not pods) are never isolated: only pods have policies;
//! - a named port in an egress rule matches only when the destination is a pod that has a
//!   container port of that name and protocol.
//!
//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) wraps that per direction, at the
//! source for egress and at the destination for ingress ([`Cluster::egress_verdict`],
//! [`Cluster::ingress_verdict`]):
//! 1. the Admin tier: the policies whose subject selects the pod, by priority (lower first;
//!    equal priorities by name, so the order is total and the same on every node), each one's
//!    rules of that direction in order; the first rule whose peers and protocols match decides:
//!    Accept (allowed, nothing later counts), Deny (dropped), Pass (the rest of the tier is
//!    skipped);
//! 2. NetworkPolicy, as above, when it isolates the pod for that direction (final then);
//! 3. the Baseline tier, as the Admin tier (Pass: to the default);
//! 4. the default: allowed.
//!
//! The own-node and pod-to-itself exceptions hold for ClusterNetworkPolicy too. A `networks`
//! peer matches any address of its family, pods' included (as the API says); `namespaces` and
//! `pods` peers match pods only; a `destinationNamedPort` matches only a destination pod with a
//! container port of that name (any protocol), so in egress rules never a host.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
pub use nft::Family;
use registry::{
    ClusterNetworkPolicy, ClusterNetworkPolicyPeer, ClusterNetworkPolicyProtocol, IntOrString,
    IpBlock, Labels, NamespacedPod, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
    PolicyType, Protocol, RuleAction, Tier,
};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A named container port of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// What policy needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Every address of the pod (of both families; the IPv4 one first when it has one).
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub ports: Vec<NamedPort>,
}

/// The family of an address.
pub fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::Ip,
        IpAddr::V6(_) => Family::Ip6,
    }
}

impl PodView {
    /// The pod's addresses of `family`.
    pub fn addrs(&self, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips
            .iter()
            .copied()
            .filter(move |a| family_of(*a) == family)
    }

    /// The pod's first address of `family`.
    pub fn addr(&self, family: Family) -> Option<IpAddr> {
        self.addrs(family).next()
    }

    /// The pod's first IPv4 address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }
}

/// One end of a connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    Pod(&'a PodView),
    /// Not a pod: a node (`node` set; any of its addresses, link-local ones included) or
    /// anything else (an outside client).
    Host {
        addr: IpAddr,
        node: Option<&'a str>,
    },
}

impl Peer<'_> {
    /// The peer's address in a connection of `family`: a pod's first address of that family
    /// (`None` when it has none), a host's own address.
    pub fn addr(&self, family: Family) -> Option<IpAddr> {
        match self {
            Peer::Pod(p) => p.addr(family),
            Peer::Host { addr, .. } => Some(*addr),
        }
    }
}

/// The objects the decision depends on.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Namespace name -> its labels (the name label is added when missing).
    pub namespaces: BTreeMap<String, Labels>,
    pub policies: Vec<NetworkPolicy>,
    /// ClusterNetworkPolicies (any order; evaluation sorts them per tier).
    pub cluster_policies: Vec<ClusterNetworkPolicy>,
}

/// How a new connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    /// Refused by NetworkPolicy (a TCP reset or ICMP admin-prohibited).
    Reject,
    /// Dropped by a ClusterNetworkPolicy Deny rule (the client times out).
    Drop,
}

impl Verdict {
    pub fn allowed(self) -> bool {
        self == Verdict::Allow
    }
}

/// The direction a ClusterNetworkPolicy rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The policies of `tier` in evaluation order: priority, then name (the API leaves equal
/// priorities to the implementation; by name the order is total and the same on every node).
pub fn tier_order<'a>(
    policies: impl IntoIterator<Item = &'a ClusterNetworkPolicy>,
    tier: Tier,
) -> Vec<&'a ClusterNetworkPolicy> {
    let mut v: Vec<&ClusterNetworkPolicy> = policies
        .into_iter()
        .filter(|p| p.spec.tier == Some(tier))
        .collect();
    v.sort_by(|a, b| (a.spec.priority, &a.metadata.name).cmp(&(b.spec.priority, &b.metadata.name)));
    v
}

/// One ClusterNetworkPolicy rule's parts: action, peers, protocols (absent: all).
pub type RuleParts<'a> = (
    Option<RuleAction>,
    &'a [ClusterNetworkPolicyPeer],
    Option<&'a [ClusterNetworkPolicyProtocol]>,
);

/// A policy's rules of `dir`, in order.
pub fn rule_parts(p: &ClusterNetworkPolicy, dir: Direction) -> Vec<RuleParts<'_>> {
    match dir {
        Direction::Ingress => p
            .spec
            .ingress
            .iter()
            .map(|r| {
                (
                    r.action,
                    r.from.as_deref().unwrap_or(&[]),
                    r.protocols.as_deref(),
                )
            })
            .collect(),
        Direction::Egress => p
            .spec
            .egress
            .iter()
            .map(|r| {
                (
                    r.action,
                    r.to.as_deref().unwrap_or(&[]),
                    r.protocols.as_deref(),
                )
            })
            .collect(),
    }
}

/// Whether a `pods` selector (namespace AND pod) matches a pod given its namespace's labels.
pub fn namespaced_pod_matches(np: &NamespacedPod, ns_labels: &Labels, pod: &PodView) -> bool {
    np.namespace_selector.matches(ns_labels)
        && np
            .pod_selector
            .as_ref()
            .is_none_or(|s| s.matches(&pod.labels))
}

impl Cluster {
    /// The namespace's labels with `kubernetes.io/metadata.name` (an unknown namespace has
    /// only that label).
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        l
    }

    /// The policies of the pod's namespace that select it and isolate direction `t`.
    pub fn isolating<'a>(
        &'a self,
        pod: &'a PodView,
        t: PolicyType,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        self.policies.iter().filter(move |np| {
            np.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace
                && np.spec.isolates(t)
                && np.spec.pod_selector.matches(&pod.labels)
        })
    }

    /// Whether a new connection of `family` from `src` to `dst` on `protocol`/`port` is
    /// allowed (its replies are then allowed too: the decision is per connection). Pods take
    /// part with their addresses of `family`.
    pub fn allows(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.verdict(family, src, dst, protocol, port).allowed()
    }

    /// How a new connection ends: the source's egress decides first, then the destination's
    /// ingress.
    pub fn verdict(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        if let (Peer::Pod(a), Peer::Pod(b)) = (src, dst) {
            if a.namespace == b.namespace && a.name == b.name {
                return Verdict::Allow;
            }
        }
        match self.egress_verdict(family, src, dst, protocol, port) {
            Verdict::Allow => self.ingress_verdict(family, src, dst, protocol, port),
            v => v,
        }
    }

    /// The destination side: does `dst` accept from `src`?
    pub fn ingress_allows(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.ingress_verdict(family, src, dst, protocol, port)
            .allowed()
    }

    /// The source side: may `src` open to `dst`?
    pub fn egress_allows(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.egress_verdict(family, src, dst, protocol, port)
            .allowed()
    }

    /// The destination side, all tiers.
    pub fn ingress_verdict(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let Peer::Pod(pod) = dst else {
            return Verdict::Allow;
        };
        if let Peer::Host {
            node: Some(node), ..
        } = src
        {
            if node == pod.node {
                return Verdict::Allow;
            }
        }
        let tier = |t| {
            self.tier_action(
                t,
                Direction::Ingress,
                pod,
                family,
                src,
                Some(pod),
                protocol,
                port,
            )
        };
        match tier(Tier::Admin) {
            Some(RuleAction::Accept) => return Verdict::Allow,
            Some(RuleAction::Deny) => return Verdict::Drop,
            Some(RuleAction::Pass) | None => {}
        }
        let mut isolated = false;
        for np in self.isolating(pod, PolicyType::Ingress) {
            isolated = true;
            let ns = np.metadata.namespace.as_deref().unwrap_or("default");
            for rule in &np.spec.ingress {
                if self.peers_match(&rule.from, ns, family, src)
                    && ports_match(&rule.ports, protocol, port, Some(pod))
                {
                    return Verdict::Allow;
                }
            }
        }
        if isolated {
            return Verdict::Reject;
        }
        match tier(Tier::Baseline) {
            Some(RuleAction::Deny) => Verdict::Drop,
            _ => Verdict::Allow,
        }
    }

    /// The source side, all tiers.
    pub fn egress_verdict(
        &self,
        family: Family,
        src: Peer<'_>,
        dst: Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let Peer::Pod(pod) = src else {
            return Verdict::Allow;
        };
        // Traffic to and from the pod's own node is always allowed (the API's docs).
        if let Peer::Host {
            node: Some(node), ..
        } = dst
        {
            if node == pod.node {
                return Verdict::Allow;
            }
        }
        let dst_pod = match dst {
            Peer::Pod(p) => Some(p),
            Peer::Host { .. } => None,
        };
        let tier = |t| {
            self.tier_action(
                t,
                Direction::Egress,
                pod,
                family,
                dst,
                dst_pod,
                protocol,
                port,
            )
        };
        match tier(Tier::Admin) {
            Some(RuleAction::Accept) => return Verdict::Allow,
            Some(RuleAction::Deny) => return Verdict::Drop,
            Some(RuleAction::Pass) | None => {}
        }
        let mut isolated = false;
        for np in self.isolating(pod, PolicyType::Egress) {
            isolated = true;
            let ns = np.metadata.namespace.as_deref().unwrap_or("default");
            for rule in &np.spec.egress {
                if self.peers_match(&rule.to, ns, family, dst)
                    && ports_match(&rule.ports, protocol, port, dst_pod)
                {
                    return Verdict::Allow;
                }
            }
        }
        if isolated {
            return Verdict::Reject;
        }
        match tier(Tier::Baseline) {
            Some(RuleAction::Deny) => Verdict::Drop,
            _ => Verdict::Allow,
        }
    }

    /// Whether a ClusterNetworkPolicy's subject selects `pod`.
    pub fn subject_selects(&self, p: &ClusterNetworkPolicy, pod: &PodView) -> bool {
        let ns = self.namespace_labels(&pod.namespace);
        match (&p.spec.subject.namespaces, &p.spec.subject.pods) {
            (Some(sel), None) => sel.matches(&ns),
            (None, Some(np)) => namespaced_pod_matches(np, &ns, pod),
            // Not valid (validation keeps it out): selects nothing.
            _ => false,
        }
    }

    /// The action of the first matching rule of `tier` for `subject` in `dir` (the other end
    /// is `peer`; named ports resolve on `dst_pod`), or None when no rule matches.
    #[allow(clippy::too_many_arguments)]
    pub fn tier_action(
        &self,
        tier: Tier,
        dir: Direction,
        subject: &PodView,
        family: Family,
        peer: Peer<'_>,
        dst_pod: Option<&PodView>,
        protocol: Protocol,
        port: u16,
    ) -> Option<RuleAction> {
        for p in tier_order(&self.cluster_policies, tier) {
            if !self.subject_selects(p, subject) {
                continue;
            }
            for (action, peers, protocols) in rule_parts(p, dir) {
                let Some(action) = action else { continue };
                if peers
                    .iter()
                    .any(|pe| self.cnp_peer_matches(pe, family, peer))
                    && cnp_protocols_match(protocols, protocol, port, dst_pod)
                {
                    return Some(action);
                }
            }
        }
        None
    }

    /// Whether `peer` is the ClusterNetworkPolicy peer `p`.
    pub fn cnp_peer_matches(
        &self,
        p: &ClusterNetworkPolicyPeer,
        family: Family,
        peer: Peer<'_>,
    ) -> bool {
        if let Some(nets) = &p.networks {
            return peer.addr(family).is_some_and(|a| {
                nets.iter()
                    .any(|n| n.parse::<IpNet>().is_ok_and(|n| n.trunc().contains(&a)))
            });
        }
        let Peer::Pod(pod) = peer else {
            return false;
        };
        if pod.addr(family).is_none() {
            return false;
        }
        let ns = self.namespace_labels(&pod.namespace);
        match (&p.namespaces, &p.pods) {
            (Some(sel), None) => sel.matches(&ns),
            (None, Some(np)) => namespaced_pod_matches(np, &ns, pod),
            _ => false,
        }
    }

    /// Whether `peer` is among `peers` of a policy in namespace `policy_ns` (empty: all).
    fn peers_match(
        &self,
        peers: &[NetworkPolicyPeer],
        policy_ns: &str,
        family: Family,
        peer: Peer<'_>,
    ) -> bool {
        peers.is_empty()
            || peers
                .iter()
                .any(|p| self.peer_matches(p, policy_ns, family, peer))
    }

    fn peer_matches(
        &self,
        p: &NetworkPolicyPeer,
        policy_ns: &str,
        family: Family,
        peer: Peer<'_>,
    ) -> bool {
        if let Some(block) = &p.ip_block {
            return peer
                .addr(family)
                .is_some_and(|a| ip_block_contains(block, a));
        }
        let Peer::Pod(pod) = peer else {
            return false;
        };
        let ns_ok = match &p.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
        };
        let pod_ok = p
            .pod_selector
            .as_ref()
            .is_none_or(|sel| sel.matches(&pod.labels));
        ns_ok && pod_ok
    }
}

/// `addr` in `cidr` and in none of `except`; a block matches only addresses of its own
/// family (unparsable blocks match nothing; validation keeps them out of the registry).
pub fn ip_block_contains(block: &IpBlock, addr: IpAddr) -> bool {
    let Ok(cidr) = block.cidr.parse::<IpNet>() else {
        return false;
    };
    cidr.trunc().contains(&addr)
        && !block.except.iter().any(|e| {
            e.parse::<IpNet>()
                .map(|n| n.trunc().contains(&addr))
                .unwrap_or(false)
        })
}

/// Whether (protocol, port) is among `ports` (empty: all); names resolve on `dst`.
pub fn ports_match(
    ports: &[NetworkPolicyPort],
    protocol: Protocol,
    port: u16,
    dst: Option<&PodView>,
) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            let proto = p.protocol.unwrap_or(Protocol::Tcp);
            if proto != protocol {
                return false;
            }
            match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => match p.end_port {
                    None => i64::from(port) == *n,
                    Some(end) => (*n..=end).contains(&i64::from(port)),
                },
                Some(IntOrString::String(name)) => dst.is_some_and(|pod| {
                    pod.ports
                        .iter()
                        .any(|np| np.name == *name && np.protocol == proto && np.port == port)
                }),
            }
        })
}

/// Whether (protocol, port) is among a ClusterNetworkPolicy rule's `protocols` (absent:
/// everything, ICMP included); a destination named port resolves on `dst` (any protocol of
/// the container port).
pub fn cnp_protocols_match(
    protocols: Option<&[ClusterNetworkPolicyProtocol]>,
    protocol: Protocol,
    port: u16,
    dst: Option<&PodView>,
) -> bool {
    let Some(list) = protocols else {
        return true;
    };
    list.iter().any(|p| {
        let numeric = p.protocol_ports().any(|(proto, pp)| {
            proto == protocol
                && pp
                    .destination_port
                    .as_ref()
                    .and_then(|d| d.bounds())
                    .is_some_and(|(lo, hi)| (lo..=hi).contains(&i64::from(port)))
        });
        let named = p
            .destination_named_port
            .as_deref()
            .filter(|n| !n.is_empty())
            .is_some_and(|name| {
                dst.is_some_and(|pod| {
                    pod.ports
                        .iter()
                        .any(|np| np.name == name && np.protocol == protocol && np.port == port)
                })
            });
        numeric || named
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use registry::{
        LabelSelector, LabelSelectorRequirement, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicySpec, ObjectMeta, SelectorOperator,
    };

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("pod", name)]),
            ips: vec![Ipv4Addr::from(ip).into()],
            node: node.into(),
            ports: vec![
                NamedPort {
                    name: "serve-80-tcp".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                NamedPort {
                    name: "serve-81-udp".into(),
                    port: 81,
                    protocol: Protocol::Udp,
                },
            ],
        }
    }

    fn sel(kv: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(kv),
            match_expressions: vec![],
        }
    }

    fn policy(ns: &str, name: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            spec,
        }
    }

    fn from(
        peers: Vec<NetworkPolicyPeer>,
        ports: Vec<NetworkPolicyPort>,
    ) -> NetworkPolicyIngressRule {
        NetworkPolicyIngressRule { ports, from: peers }
    }

    fn pods_peer(s: LabelSelector) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            pod_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }
    }

    fn ns_peer(s: LabelSelector) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }
    }

    fn tcp(port: i64) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: None,
            port: Some(IntOrString::Int(port)),
            end_port: None,
        }
    }

    struct World {
        cluster: Cluster,
        pods: Vec<PodView>,
    }

    impl World {
        fn new() -> World {
            let mut pods = Vec::new();
            let mut i = 2u8;
            for ns in ["x", "y", "z"] {
                for (n, name) in ["a", "b", "c"].iter().enumerate() {
                    pods.push(pod(ns, name, [10, 5, n as u8, i], &format!("node{n}")));
                    i += 1;
                }
            }
            let mut cluster = Cluster::default();
            for ns in ["x", "y", "z"] {
                cluster.namespaces.insert(ns.into(), labels(&[("ns", ns)]));
            }
            World { cluster, pods }
        }

        fn p(&self, id: &str) -> &PodView {
            let (ns, name) = id.split_once('/').expect("ns/name");
            self.pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .expect("pod")
        }

        fn ok(&self, a: &str, b: &str, proto: Protocol, port: u16) -> bool {
            self.cluster.allows(
                Family::Ip,
                Peer::Pod(self.p(a)),
                Peer::Pod(self.p(b)),
                proto,
                port,
            )
        }

        /// Every ordered pair that is allowed on TCP 80 (self pairs left out).
        fn allowed_pairs(&self) -> Vec<String> {
            let mut out = Vec::new();
            for a in &self.pods {
                for b in &self.pods {
                    if a == b {
                        continue;
                    }
                    if self.cluster.allows(
                        Family::Ip,
                        Peer::Pod(a),
                        Peer::Pod(b),
                        Protocol::Tcp,
                        80,
                    ) {
                        out.push(format!(
                            "{}/{}>{}/{}",
                            a.namespace, a.name, b.namespace, b.name
                        ));
                    }
                }
            }
            out
        }
    }

    #[test]
    fn no_policy_allows_everything() {
        let w = World::new();
        assert_eq!(w.allowed_pairs().len(), 72);
    }

    #[test]
    fn default_deny_ingress_isolates_only_the_namespace_and_only_ingress() {
        let mut w = World::new();
        w.cluster
            .policies
            .push(policy("x", "deny", NetworkPolicySpec::default()));
        assert!(!w.ok("y/a", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("x/b", "x/a", Protocol::Tcp, 80), "same namespace too");
        assert!(w.ok("x/a", "y/a", Protocol::Tcp, 80), "egress untouched");
        assert!(w.ok("y/a", "y/b", Protocol::Udp, 81));
        assert!(
            w.ok("x/a", "x/a", Protocol::Tcp, 80),
            "a pod reaches itself"
        );
        // 8 sources x 3 isolated destinations denied.
        assert_eq!(w.allowed_pairs().len(), 72 - 24);
    }

    #[test]
    fn default_deny_egress_needs_the_policy_type() {
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "deny-egress",
            NetworkPolicySpec {
                policy_types: Some(vec![PolicyType::Egress]),
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(!w.ok("x/a", "y/a", Protocol::Tcp, 80));
        assert!(
            w.ok("y/a", "x/a", Protocol::Tcp, 80),
            "ingress not isolated"
        );
        // Egress rules without policyTypes imply Egress.
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "egress-to-y",
            NetworkPolicySpec {
                egress: vec![NetworkPolicyEgressRule {
                    ports: vec![],
                    to: vec![ns_peer(sel(&[("ns", "y")]))],
                }],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("x/a", "y/b", Protocol::Tcp, 80));
        assert!(!w.ok("x/a", "z/b", Protocol::Tcp, 80));
        assert!(
            !w.ok("y/a", "x/b", Protocol::Tcp, 80),
            "Ingress is isolated too (default type, no rules)"
        );
    }

    #[test]
    fn allow_all_rule_and_additive_policies() {
        let mut w = World::new();
        w.cluster
            .policies
            .push(policy("x", "deny", NetworkPolicySpec::default()));
        w.cluster.policies.push(policy(
            "x",
            "allow-all",
            NetworkPolicySpec {
                ingress: vec![NetworkPolicyIngressRule::default()],
                ..NetworkPolicySpec::default()
            },
        ));
        assert_eq!(w.allowed_pairs().len(), 72);
    }

    #[test]
    fn pod_selector_peers_are_of_the_policy_namespace() {
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "from-b",
            NetworkPolicySpec {
                pod_selector: sel(&[("pod", "a")]),
                ingress: vec![from(vec![pods_peer(sel(&[("pod", "b")]))], vec![])],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("x/b", "x/a", Protocol::Tcp, 80));
        assert!(
            !w.ok("y/b", "x/a", Protocol::Tcp, 80),
            "b of another namespace"
        );
        assert!(!w.ok("x/c", "x/a", Protocol::Tcp, 80));
        assert!(w.ok("x/c", "x/b", Protocol::Tcp, 80), "x/b not selected");
    }

    #[test]
    fn namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_is_or() {
        let and_peer = NetworkPolicyPeer {
            pod_selector: Some(sel(&[("pod", "b")])),
            namespace_selector: Some(sel(&[("ns", "y")])),
            ip_block: None,
        };
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "and",
            NetworkPolicySpec {
                ingress: vec![from(vec![and_peer], vec![])],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/b", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("y/a", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("x/b", "x/a", Protocol::Tcp, 80));

        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "or",
            NetworkPolicySpec {
                ingress: vec![from(
                    vec![
                        pods_peer(sel(&[("pod", "b")])),
                        ns_peer(sel(&[("ns", "y")])),
                    ],
                    vec![],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/b", "x/a", Protocol::Tcp, 80));
        assert!(w.ok("y/a", "x/a", Protocol::Tcp, 80));
        assert!(w.ok("x/b", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("z/b", "x/a", Protocol::Tcp, 80), "z/b is b, but of z");
    }

    #[test]
    fn namespaces_match_by_their_name_label_and_expressions() {
        let mut w = World::new();
        w.cluster.namespaces.insert("y".into(), Labels::new());
        w.cluster.policies.push(policy(
            "x",
            "by-name",
            NetworkPolicySpec {
                ingress: vec![from(
                    vec![ns_peer(LabelSelector {
                        match_labels: Labels::new(),
                        match_expressions: vec![LabelSelectorRequirement {
                            key: NAMESPACE_NAME_LABEL.into(),
                            operator: SelectorOperator::In,
                            values: vec!["y".into()],
                        }],
                    })],
                    vec![],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/c", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("z/c", "x/a", Protocol::Tcp, 80));
        // An empty namespaceSelector selects every namespace.
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "all-ns",
            NetworkPolicySpec {
                ingress: vec![from(vec![ns_peer(LabelSelector::default())], vec![])],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("z/c", "x/a", Protocol::Tcp, 80));
        assert!(
            !w.cluster.allows(
                Family::Ip,
                Peer::Host {
                    addr: IpAddr::from([192, 0, 2, 1]),
                    node: None
                },
                Peer::Pod(w.p("x/a")),
                Protocol::Tcp,
                80
            ),
            "a selector never matches a host"
        );
    }

    #[test]
    fn ip_block_with_except_matches_pod_addresses_too() {
        let mut w = World::new();
        let block = NetworkPolicyPeer {
            ip_block: Some(IpBlock {
                cidr: "10.5.0.0/16".into(),
                except: vec![format!("{}/32", w.p("y/b").ips[0])],
            }),
            ..NetworkPolicyPeer::default()
        };
        w.cluster.policies.push(policy(
            "x",
            "block",
            NetworkPolicySpec {
                ingress: vec![from(vec![block], vec![])],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/a", "x/a", Protocol::Tcp, 80));
        assert!(!w.ok("y/b", "x/a", Protocol::Tcp, 80));
        let outside = Peer::Host {
            addr: IpAddr::from([192, 0, 2, 1]),
            node: None,
        };
        assert!(!w.cluster.allows(
            Family::Ip,
            outside,
            Peer::Pod(w.p("x/a")),
            Protocol::Tcp,
            80
        ));
        assert!(
            ip_block_contains(
                &IpBlock {
                    cidr: "10.5.1.7/16".into(),
                    except: vec![]
                },
                Ipv4Addr::new(10, 5, 200, 1).into()
            ),
            "host bits in cidr are ignored"
        );
    }

    #[test]
    fn ports_numbers_ranges_names_and_protocols() {
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "ports",
            NetworkPolicySpec {
                pod_selector: sel(&[("pod", "a")]),
                ingress: vec![from(
                    vec![],
                    vec![
                        tcp(80),
                        NetworkPolicyPort {
                            protocol: Some(Protocol::Tcp),
                            port: Some(IntOrString::Int(1000)),
                            end_port: Some(1010),
                        },
                        NetworkPolicyPort {
                            protocol: Some(Protocol::Udp),
                            port: Some(IntOrString::String("serve-81-udp".into())),
                            end_port: None,
                        },
                    ],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/a", "x/a", Protocol::Tcp, 80));
        assert!(
            !w.ok("y/a", "x/a", Protocol::Udp, 80),
            "protocol defaults to TCP"
        );
        assert!(!w.ok("y/a", "x/a", Protocol::Tcp, 81));
        assert!(w.ok("y/a", "x/a", Protocol::Tcp, 1000));
        assert!(w.ok("y/a", "x/a", Protocol::Tcp, 1010));
        assert!(!w.ok("y/a", "x/a", Protocol::Tcp, 1011));
        assert!(
            w.ok("y/a", "x/a", Protocol::Udp, 81),
            "named port resolved on x/a"
        );
        assert!(
            !w.ok("y/a", "x/a", Protocol::Tcp, 81),
            "name has protocol UDP"
        );
    }

    #[test]
    fn named_ports_resolve_per_destination_pod() {
        let mut w = World::new();
        // x/b serves "web" on 8080, x/a has no "web".
        let xb = w
            .pods
            .iter_mut()
            .find(|p| p.namespace == "x" && p.name == "b")
            .expect("x/b");
        xb.ports.push(NamedPort {
            name: "web".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        });
        w.cluster.policies.push(policy(
            "x",
            "web",
            NetworkPolicySpec {
                ingress: vec![from(
                    vec![],
                    vec![NetworkPolicyPort {
                        protocol: None,
                        port: Some(IntOrString::String("web".into())),
                        end_port: None,
                    }],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("y/a", "x/b", Protocol::Tcp, 8080));
        assert!(!w.ok("y/a", "x/a", Protocol::Tcp, 8080));
        // Egress named ports resolve on the destination pod too.
        let mut w2 = World::new();
        w2.pods = w.pods.clone();
        w2.cluster.policies.push(policy(
            "y",
            "egress-web",
            NetworkPolicySpec {
                egress: vec![NetworkPolicyEgressRule {
                    ports: vec![NetworkPolicyPort {
                        protocol: None,
                        port: Some(IntOrString::String("web".into())),
                        end_port: None,
                    }],
                    to: vec![],
                }],
                policy_types: Some(vec![PolicyType::Egress]),
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w2.ok("y/a", "x/b", Protocol::Tcp, 8080));
        assert!(!w2.ok("y/a", "x/a", Protocol::Tcp, 8080));
        let host = Peer::Host {
            addr: IpAddr::from([192, 0, 2, 1]),
            node: None,
        };
        assert!(!w2.cluster.allows(
            Family::Ip,
            Peer::Pod(w2.p("y/a")),
            host,
            Protocol::Tcp,
            8080
        ));
    }

    #[test]
    fn own_node_is_allowed_other_nodes_are_not() {
        let mut w = World::new();
        w.cluster
            .policies
            .push(policy("x", "deny", NetworkPolicySpec::default()));
        w.cluster.policies.push(policy(
            "x",
            "deny-egress",
            NetworkPolicySpec {
                policy_types: Some(vec![PolicyType::Egress]),
                ..NetworkPolicySpec::default()
            },
        ));
        let xa = w.p("x/a");
        let own = Peer::Host {
            addr: IpAddr::from([10, 5, 0, 1]),
            node: Some(xa.node.as_str()),
        };
        let other = Peer::Host {
            addr: IpAddr::from([10, 5, 1, 1]),
            node: Some("node1"),
        };
        assert!(w
            .cluster
            .allows(Family::Ip, own, Peer::Pod(xa), Protocol::Tcp, 80));
        assert!(!w
            .cluster
            .allows(Family::Ip, other, Peer::Pod(xa), Protocol::Tcp, 80));
        // And to it, under an egress default-deny.
        assert!(w
            .cluster
            .allows(Family::Ip, Peer::Pod(xa), own, Protocol::Udp, 53));
        assert!(!w
            .cluster
            .allows(Family::Ip, Peer::Pod(xa), other, Protocol::Udp, 53));
    }

    #[test]
    fn empty_policy_types_default_like_absent_ones() {
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "deny",
            NetworkPolicySpec {
                policy_types: Some(vec![]),
                ..NetworkPolicySpec::default()
            },
        ));
        let (xa, xb) = (w.p("x/a"), w.p("x/b"));
        assert!(!w
            .cluster
            .allows(Family::Ip, Peer::Pod(xb), Peer::Pod(xa), Protocol::Tcp, 80));
        assert!(w.cluster.egress_allows(
            Family::Ip,
            Peer::Pod(xa),
            Peer::Pod(xb),
            Protocol::Tcp,
            80
        ));
    }

    #[test]
    fn both_sides_must_allow() {
        let mut w = World::new();
        w.cluster.policies.push(policy(
            "x",
            "egress-only-80",
            NetworkPolicySpec {
                egress: vec![NetworkPolicyEgressRule {
                    ports: vec![tcp(80)],
                    to: vec![],
                }],
                policy_types: Some(vec![PolicyType::Egress]),
                ..NetworkPolicySpec::default()
            },
        ));
        w.cluster.policies.push(policy(
            "y",
            "ingress-only-x",
            NetworkPolicySpec {
                ingress: vec![from(vec![ns_peer(sel(&[("ns", "x")]))], vec![])],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(w.ok("x/a", "y/a", Protocol::Tcp, 80));
        assert!(!w.ok("x/a", "y/a", Protocol::Tcp, 81), "egress refuses");
        assert!(!w.ok("z/a", "y/a", Protocol::Tcp, 80), "ingress refuses");
    }

    /// x/a dual stack, y/a IPv4 only, y/b IPv6 only, z/a dual stack on another node.
    fn dual_world() -> World {
        let mut w = World::new();
        let set = |w: &mut World, id: &str, ips: &[&str]| {
            let (ns, name) = id.split_once('/').unwrap();
            let p = w
                .pods
                .iter_mut()
                .find(|p| p.namespace == ns && p.name == name)
                .unwrap();
            p.ips = ips.iter().map(|a| a.parse().unwrap()).collect();
        };
        set(&mut w, "x/a", &["10.5.0.2", "fd10::2"]);
        set(&mut w, "y/a", &["10.5.0.5"]);
        set(&mut w, "y/b", &["fd10:0:0:1::6"]);
        set(&mut w, "z/a", &["10.5.0.8", "fd10::8"]);
        w
    }

    fn ok_over(w: &World, family: Family, a: &str, b: &str) -> bool {
        w.cluster.allows(
            family,
            Peer::Pod(w.p(a)),
            Peer::Pod(w.p(b)),
            Protocol::Tcp,
            80,
        )
    }

    #[test]
    fn pods_take_part_with_their_address_of_the_family() {
        let w = dual_world();
        let xa = w.p("x/a");
        assert_eq!(xa.addr(Family::Ip), Some("10.5.0.2".parse().unwrap()));
        assert_eq!(xa.addr(Family::Ip6), Some("fd10::2".parse().unwrap()));
        assert_eq!(xa.ipv4(), Some(Ipv4Addr::new(10, 5, 0, 2)));
        assert_eq!(w.p("y/b").ipv4(), None);
        assert_eq!(w.p("y/a").addr(Family::Ip6), None);
        assert_eq!(Peer::Pod(w.p("y/b")).addr(Family::Ip), None);
    }

    #[test]
    fn selectors_match_in_both_families_ip_blocks_only_in_their_own() {
        let mut w = dual_world();
        let block = |cidr: &str, except: &[&str]| NetworkPolicyPeer {
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: except.iter().map(|e| e.to_string()).collect(),
            }),
            ..NetworkPolicyPeer::default()
        };
        w.cluster.policies.push(policy(
            "x",
            "mixed",
            NetworkPolicySpec {
                pod_selector: sel(&[("pod", "a")]),
                ingress: vec![from(
                    vec![
                        ns_peer(sel(&[("ns", "z")])),
                        block("10.5.0.4/30", &[]),
                        block("fd10::/32", &["fd10::/64"]),
                    ],
                    vec![],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        // z/a by its namespace: in both families.
        assert!(ok_over(&w, Family::Ip, "z/a", "x/a"));
        assert!(ok_over(&w, Family::Ip6, "z/a", "x/a"));
        // y/a by the IPv4 block (10.5.0.5), y/b by the IPv6 one (outside its except).
        assert!(ok_over(&w, Family::Ip, "y/a", "x/a"));
        assert!(ok_over(&w, Family::Ip6, "y/b", "x/a"));
        // An IPv6 host inside the except, an IPv4 host outside the v4 block, and an IPv4
        // address never matches the IPv6 block (nor the reverse).
        let host = |a: &str| Peer::Host {
            addr: a.parse().unwrap(),
            node: None,
        };
        let xa = Peer::Pod(w.p("x/a"));
        for (h, want) in [
            ("fd10::99", false),
            ("fd10:0:1::99", true),
            ("10.5.0.6", true),
            ("10.5.0.9", false),
            ("::ffff:10.5.0.5", false),
        ] {
            assert_eq!(
                w.cluster
                    .allows(Family::Ip6, host(h), xa, Protocol::Tcp, 80),
                want,
                "{h}"
            );
        }
        assert!(!ip_block_contains(
            &IpBlock {
                cidr: "0.0.0.0/0".into(),
                except: vec![]
            },
            "fd10::1".parse().unwrap()
        ));
        assert!(!ip_block_contains(
            &IpBlock {
                cidr: "::/0".into(),
                except: vec![]
            },
            "10.0.0.1".parse().unwrap()
        ));
    }

    #[test]
    fn a_rule_of_ipv4_blocks_only_leaves_the_pod_isolated_over_ipv6() {
        let mut w = dual_world();
        w.cluster.policies.push(policy(
            "x",
            "v4-only",
            NetworkPolicySpec {
                pod_selector: sel(&[("pod", "a")]),
                ingress: vec![from(
                    vec![NetworkPolicyPeer {
                        ip_block: Some(IpBlock {
                            cidr: "10.0.0.0/8".into(),
                            except: vec![],
                        }),
                        ..NetworkPolicyPeer::default()
                    }],
                    vec![],
                )],
                ..NetworkPolicySpec::default()
            },
        ));
        assert!(ok_over(&w, Family::Ip, "z/a", "x/a"));
        assert!(!ok_over(&w, Family::Ip6, "z/a", "x/a"));
        // Egress is not isolated: x/a still opens to anyone over IPv6.
        assert!(ok_over(&w, Family::Ip6, "x/a", "y/b"));
    }

    #[test]
    fn own_node_by_any_address_of_either_family() {
        let mut w = dual_world();
        w.cluster
            .policies
            .push(policy("x", "deny", NetworkPolicySpec::default()));
        w.cluster.policies.push(policy(
            "x",
            "deny-egress",
            NetworkPolicySpec {
                policy_types: Some(vec![PolicyType::Egress]),
                ..NetworkPolicySpec::default()
            },
        ));
        let xa = w.p("x/a");
        for a in ["fe80::1", "fd10::1", "10.5.0.1"] {
            let own = Peer::Host {
                addr: a.parse().unwrap(),
                node: Some(xa.node.as_str()),
            };
            let other = Peer::Host {
                addr: a.parse().unwrap(),
                node: Some("node9"),
            };
            for f in [Family::Ip, Family::Ip6] {
                assert!(w.cluster.allows(f, own, Peer::Pod(xa), Protocol::Tcp, 80));
                assert!(w.cluster.allows(f, Peer::Pod(xa), own, Protocol::Udp, 53));
                assert!(!w.cluster.allows(f, other, Peer::Pod(xa), Protocol::Tcp, 80));
            }
        }
        assert!(!ok_over(&w, Family::Ip6, "z/a", "x/a"));
        assert!(ok_over(&w, Family::Ip6, "x/a", "x/a"), "itself");
    }
}
