//! Counters of the lease manager and the lease watcher.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the lease manager and its watcher have been doing, for metrics and readiness (shared:
/// the caller keeps an `Arc` and reads it while they run).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Failed etcd calls while renewing, re-acquiring or watching.
    pub etcd_errors: AtomicU64,
    pub renewals: AtomicU64,
    pub reacquisitions: AtomicU64,
    /// Unix time (s) when our lease expires unless renewed; 0 = no TTL (reservation) or unknown.
    pub lease_expiry_unix: AtomicI64,
    /// Whether the last etcd call of the renewal loop succeeded.
    pub etcd_reachable: AtomicBool,
}

impl LeaseStats {
    pub(crate) fn expires_in(&self, ttl: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = i64::try_from((now + ttl).as_secs()).unwrap_or(i64::MAX);
        self.lease_expiry_unix.store(at, Ordering::Relaxed);
    }
}
