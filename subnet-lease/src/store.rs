//! The lease store: the operations the lease manager and the lease watcher need, as a trait
//! ([`LeaseStore`]), with two implementations: [`crate::etcd::EtcdLeaseStore`] (etcd v3, what
//! flanneld runs) and [`crate::memory::MemoryLeaseStore`] (in memory, a test double).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use etcd_access::{EtcdError, DEFAULT_PREFIX};
use futures::Stream;

use crate::lease::{Lease, LeaseAttrs, SubnetKey};

/// flannel's network config key: `<prefix>/config` (`prefix` without a trailing slash).
pub fn config_key(prefix: &str) -> String {
    format!("{prefix}/config")
}

/// Every lease under the prefix and the etcd revision of the read.
#[derive(Debug, Clone, Default)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
    pub revision: i64,
    /// Keys under `subnets/` that are not valid leases: (key, reason). Skipped, never fatal.
    pub invalid: Vec<(String, String)>,
}

/// A change to one lease key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyEvent {
    Put(Box<Lease>),
    Delete(SubnetKey),
}

/// One answer of a lease watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchBatch {
    /// Events; every event up to `revision` has been delivered when it is known (`None` for
    /// the watch-created answer, which says nothing about delivered history).
    Events {
        events: Vec<KeyEvent>,
        revision: Option<i64>,
    },
    /// The start revision was compacted away (or the watch was cancelled): re-list.
    Lost { reason: String },
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, EtcdError>> + Send>>;

/// What the lease manager needs from a store.
pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// The raw network config text, if set.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, EtcdError>> + Send;
    /// Every lease and the revision of the read.
    fn list_leases(&self) -> impl Future<Output = Result<LeaseList, EtcdError>> + Send;
    /// Grants an etcd lease of `ttl`; returns its id.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<i64, EtcdError>> + Send;
    /// Revokes an etcd lease (and deletes the keys bound to it).
    fn revoke(&self, etcd_lease: i64) -> impl Future<Output = Result<(), EtcdError>> + Send;
    /// Creates `key` bound to `etcd_lease`, only if the key does not exist (one txn).
    /// Returns the revision written, or None when someone else holds the key.
    fn create_lease(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send;
    /// Rewrites an existing lease's attributes, keeping its etcd lease (or lack of one), only if
    /// the key is unchanged since it was read. Returns the revision written, or None if it
    /// changed.
    fn update_lease(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send;
    /// Deletes a lease only if unchanged since it was read. Returns false if it changed.
    fn delete_lease(&self, lease: &Lease) -> impl Future<Output = Result<bool, EtcdError>> + Send;
    /// One keep-alive of an etcd lease. Returns its new TTL, or None if the lease is gone.
    fn renew(
        &self,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<Option<Duration>, EtcdError>> + Send;
    /// Watches lease keys from `start_revision` (inclusive).
    fn watch_leases(
        &self,
        start_revision: i64,
    ) -> impl Future<Output = Result<WatchStream, EtcdError>> + Send;
}
