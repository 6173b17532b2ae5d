//! Prometheus metrics of the network policy module (`flannel_policy_*` in flanneld).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::run::SyncReport;

#[derive(Debug, Clone, Default)]
pub struct PolicyMetrics {
    pub syncs: Counter,
    pub full_syncs: Counter,
    pub sync_errors: Counter,
    pub last_sync_seconds: Gauge<f64, AtomicU64>,
    pub isolated_ingress: Gauge,
    pub isolated_egress: Gauge,
    pub invalid_objects: Counter,
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
            "Pods of this node isolated for ingress",
            self.isolated_ingress.clone(),
        );
        r.register(
            "isolated_egress_pods",
            "Pods of this node isolated for egress",
            self.isolated_egress.clone(),
        );
        r.register(
            "invalid_objects",
            "Registry objects ignored because they do not decode or are not valid",
            self.invalid_objects.clone(),
        );
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
