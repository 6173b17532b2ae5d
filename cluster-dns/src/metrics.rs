//! Prometheus metrics of the cluster DNS (`flannel_dns_*` under the daemon's prefix).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of an answer: the question's type and the answer's rcode (both from fixed sets).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabels {
    pub r#type: &'static str,
    pub rcode: &'static str,
    pub proto: &'static str,
}

#[derive(Debug, Clone)]
pub struct DnsMetrics {
    pub responses: Family<AnswerLabels, Counter>,
    pub dropped: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_entries: Gauge,
    pub upstream_seconds: Histogram,
    pub upstream_errors: Counter,
    pub forwards_refused: Counter,
    pub reloads: Counter,
    pub records: Gauge,
    pub invalid_objects: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            responses: Family::default(),
            dropped: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            upstream_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            upstream_errors: Counter::default(),
            forwards_refused: Counter::default(),
            reloads: Counter::default(),
            records: Gauge::default(),
            invalid_objects: Counter::default(),
        }
    }
}

impl DnsMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("dns");
        r.register(
            "responses",
            "Answers sent, by question type, rcode and transport",
            self.responses.clone(),
        );
        r.register(
            "dropped",
            "Datagrams dropped unanswered (too short, or responses)",
            self.dropped.clone(),
        );
        r.register(
            "cache_hits",
            "Questions outside the zone answered from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Questions outside the zone sent upstream",
            self.cache_misses.clone(),
        );
        r.register(
            "cache_entries",
            "Answers held in the cache",
            self.cache_entries.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Time upstream resolvers took to answer",
            self.upstream_seconds.clone(),
        );
        r.register(
            "upstream_errors",
            "Questions no upstream resolver answered (SERVFAIL sent)",
            self.upstream_errors.clone(),
        );
        r.register(
            "forwards_refused",
            "Questions answered SERVFAIL because too many were already waiting upstream",
            self.forwards_refused.clone(),
        );
        r.register(
            "reloads",
            "Times the zone was rebuilt from the registry",
            self.reloads.clone(),
        );
        r.register("records", "Owner names in the zone", self.records.clone());
        r.register(
            "invalid_objects",
            "Registry objects and pod records ignored because they do not decode or are not valid",
            self.invalid_objects.clone(),
        );
    }
}
