//! Prometheus metrics of the proxy (prometheus-client). Hosts and paths are the matched rule's
//! (not the request's), so that clients cannot grow the label sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The rule's host (`*.example.com`, empty for any host or no route).
    pub host: String,
    /// The rule's path (empty for no route).
    pub path: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `namespace/service:port`.
    pub backend: String,
    /// `connect`, `timeout`, `response`, `no_endpoints`.
    pub kind: String,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<HostLabels, Histogram>,
    pub upstream_errors: Family<UpstreamLabels, Counter>,
    pub retries: Counter,
    pub reloads: Counter,
    pub routes: Gauge,
    pub ingresses: Gauge,
    pub conflicts: Gauge,
    pub invalid_objects: Counter,
    pub connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            upstream_errors: Family::default(),
            retries: Counter::default(),
            reloads: Counter::default(),
            routes: Gauge::default(),
            ingresses: Gauge::default(),
            conflicts: Gauge::default(),
            invalid_objects: Counter::default(),
            connections: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("flannel_ingress");
        r.register(
            "requests",
            "Requests answered, by rule host, rule path and status class",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to the response head, by rule host",
            self.duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream failures by backend and kind",
            self.upstream_errors.clone(),
        );
        r.register(
            "retries",
            "Requests sent again to another endpoint after a connect failure",
            self.retries.clone(),
        );
        r.register(
            "reloads",
            "Snapshots built from the registry",
            self.reloads.clone(),
        );
        r.register(
            "routes",
            "Path routes in the current snapshot",
            self.routes.clone(),
        );
        r.register("ingresses", "Ingresses served", self.ingresses.clone());
        r.register(
            "conflicts",
            "Route and TLS claims that lost to an earlier Ingress",
            self.conflicts.clone(),
        );
        r.register(
            "invalid_objects",
            "Registry values ignored (do not decode or are invalid)",
            self.invalid_objects.clone(),
        );
        r.register(
            "connections",
            "Client connections open",
            self.connections.clone(),
        );
    }
}

/// `2xx` for 200.
pub fn status_class(code: u16) -> String {
    format!("{}xx", code / 100)
}

/// One route's series, looked up once (per snapshot) rather than by labels per request; a
/// status class's series is made on its first answer (as `get_or_create` would).
#[derive(Debug)]
pub struct RouteMetrics {
    family: Family<RequestLabels, Counter>,
    host: String,
    path: String,
    /// `requests_total` by status class, `1xx` to `5xx`.
    requests: [std::sync::OnceLock<Counter>; 5],
    duration: Histogram,
}

impl RouteMetrics {
    /// Counts one answer of `status` that took `seconds` to its head.
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class]
            .get_or_init(|| {
                self.family
                    .get_or_create(&RequestLabels {
                        host: self.host.clone(),
                        path: self.path.clone(),
                        status: ["1xx", "2xx", "3xx", "4xx", "5xx"][class].to_string(),
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(seconds);
    }
}

impl Metrics {
    /// The series of a rule (`host`, `path`).
    pub fn route(&self, host: &str, path: &str) -> RouteMetrics {
        RouteMetrics {
            family: self.requests.clone(),
            host: host.to_string(),
            path: path.to_string(),
            requests: Default::default(),
            duration: self
                .duration
                .get_or_create(&HostLabels {
                    host: host.to_string(),
                })
                .clone(),
        }
    }
}
