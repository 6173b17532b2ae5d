//! Prometheus metrics of the network policy module (`flannel_policy_*` in flanneld).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::enforce::SyncReport;

#[derive(Debug, Clone, Default)]
pub struct PolicyMetrics {
    pub syncs: Counter,
    pub full_syncs: Counter,
    pub sync_errors: Counter,
    pub last_sync_seconds: Gauge<f64, AtomicU64>,
    pub isolated_ingress: Gauge,
    pub isolated_egress: Gauge,
    pub invalid_objects: Counter,
    /// Valid ClusterNetworkPolicies in the registry, by tier (`Admin`, `Baseline`).
    pub cluster_policies: Family<Vec<(String, String)>, Gauge>,
    /// Pods of this node that a ClusterNetworkPolicy of the tier selects (either
    /// direction; a dual-stack pod counts once), by tier.
    pub tier_pods: Family<Vec<(String, String)>, Gauge>,
    /// 1 while the module runs (`--network-policy`).
    pub enabled: Gauge,
    /// 1 when the forward hook sees same-node (bridged) pod traffic (br_netfilter with
    /// `bridge-nf-call-iptables` on), 0 when it does not.
    pub br_netfilter: Gauge,
    /// Why the node must not count as ready because of the module (None: no reason).
    not_ready: Arc<RwLock<Option<String>>>,
}

impl PolicyMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("policy");
        r.register(
            "syncs",
            "Table syncs that changed something and succeeded",
            self.syncs.clone(),
        );
        r.register(
            "full_syncs",
            "Syncs that wrote the whole table",
            self.full_syncs.clone(),
        );
        r.register(
            "sync_errors",
            "Table syncs that failed (the next one rewrites the table)",
            self.sync_errors.clone(),
        );
        r.register(
            "last_sync_seconds",
            "Duration of the last sync that changed the table",
            self.last_sync_seconds.clone(),
        );
        r.register(
            "isolated_ingress_pods",
            "Pods of this node with an ingress chain (isolated by a NetworkPolicy or selected by a ClusterNetworkPolicy)",
            self.isolated_ingress.clone(),
        );
        r.register(
            "isolated_egress_pods",
            "Pods of this node with an egress chain (isolated by a NetworkPolicy or selected by a ClusterNetworkPolicy)",
            self.isolated_egress.clone(),
        );
        r.register(
            "enabled",
            "1 while NetworkPolicy is enforced on this node (--network-policy)",
            self.enabled.clone(),
        );
        r.register(
            "br_netfilter",
            "1 when the policy hook sees same-node pod traffic (br_netfilter, bridge-nf-call-iptables=1); 0: same-node traffic is not policed",
            self.br_netfilter.clone(),
        );
        r.register(
            "cluster_policies",
            "Valid ClusterNetworkPolicies, by tier",
            self.cluster_policies.clone(),
        );
        r.register(
            "tier_pods",
            "Pods of this node selected by a ClusterNetworkPolicy of the tier",
            self.tier_pods.clone(),
        );
        r.register(
            "invalid_objects",
            "Registry objects ignored because they do not decode or are not valid",
            self.invalid_objects.clone(),
        );
    }

    /// Records the br_netfilter check: `problem` is why same-node traffic escapes the
    /// policy hook (the node is then not ready), or None.
    pub fn set_bridge_netfilter(&self, problem: Option<String>) {
        self.br_netfilter.set(i64::from(problem.is_none()));
        if let Ok(mut r) = self.not_ready.write() {
            *r = problem;
        }
    }

    /// Why the node is not ready because of the module, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.not_ready.read().ok().and_then(|r| r.clone())
    }

    /// Records the ClusterNetworkPolicies per tier: (tier, policies, pods of this node).
    pub fn observe_tiers(&self, tiers: &[(&str, usize, usize)]) {
        for (tier, policies, pods) in tiers {
            let label = vec![("tier".to_string(), tier.to_string())];
            self.cluster_policies
                .get_or_create(&label)
                .set(*policies as i64);
            self.tier_pods.get_or_create(&label).set(*pods as i64);
        }
    }

    pub fn observe(&self, rep: &SyncReport, ingress: usize, egress: usize) {
        if rep.changed {
            self.syncs.inc();
            self.last_sync_seconds.set(rep.elapsed.as_secs_f64());
        }
        if rep.full {
            self.full_syncs.inc();
        }
        self.isolated_ingress.set(ingress as i64);
        self.isolated_egress.set(egress as i64);
    }
}
