//! Prometheus metrics of the service proxy (registered under the daemon's `flannel_` prefix).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    pub syncs: Counter,
    pub full_syncs: Counter,
    pub sync_errors: Counter,
    pub changed_ports: Counter,
    pub last_sync_seconds: Gauge<f64, AtomicU64>,
    pub service_ports: Gauge,
    pub connections: Counter,
    pub connections_active: Gauge,
    pub connections_refused: Counter,
    pub connect_failures: Counter,
    pub connections_denied: Counter,
    pub udp_sessions: Gauge,
    pub udp_sessions_dropped: Counter,
    pub invalid_objects: Counter,
}

impl ProxyMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("proxy");
        r.register(
            "syncs",
            "Data plane syncs that succeeded",
            self.syncs.clone(),
        );
        r.register(
            "full_syncs",
            "Syncs that rebuilt the whole table",
            self.full_syncs.clone(),
        );
        r.register(
            "sync_errors",
            "Data plane syncs that failed",
            self.sync_errors.clone(),
        );
        r.register(
            "changed_service_ports",
            "Service ports rewritten by syncs",
            self.changed_ports.clone(),
        );
        r.register(
            "last_sync_seconds",
            "Duration of the last successful sync",
            self.last_sync_seconds.clone(),
        );
        r.register(
            "service_ports",
            "Service ports served",
            self.service_ports.clone(),
        );
        r.register(
            "connections",
            "Userspace mode: TCP connections accepted",
            self.connections.clone(),
        );
        r.register(
            "connections_active",
            "Userspace mode: TCP connections open",
            self.connections_active.clone(),
        );
        r.register(
            "connections_refused",
            "Userspace mode: TCP connections closed at once (limit reached or no endpoint answered)",
            self.connections_refused.clone(),
        );
        r.register(
            "connections_denied",
            "Userspace mode: TCP connections refused and UDP datagrams dropped because network policy allows the client no endpoint",
            self.connections_denied.clone(),
        );
        r.register(
            "endpoint_connect_failures",
            "Userspace mode: endpoint connects that failed (the next endpoint was tried)",
            self.connect_failures.clone(),
        );
        r.register(
            "udp_sessions",
            "Userspace mode: UDP client sessions open",
            self.udp_sessions.clone(),
        );
        r.register(
            "udp_sessions_dropped",
            "Userspace mode: UDP datagrams dropped because the session limit was reached",
            self.udp_sessions_dropped.clone(),
        );
        r.register(
            "invalid_objects",
            "Registry objects ignored because they do not decode or are not valid",
            self.invalid_objects.clone(),
        );
    }

    pub fn observe_sync(&self, full: bool, elapsed: Duration, changed: usize) {
        self.syncs.inc();
        if full {
            self.full_syncs.inc();
        }
        self.changed_ports.inc_by(changed as u64);
        self.last_sync_seconds.set(elapsed.as_secs_f64());
    }
}
