//! An in-memory [`LeaseStore`]: a test double for the lease manager and the lease watcher (and
//! for other crates' tests of code generic over a store). No I/O; time is the tokio clock, so
//! `#[tokio::test(start_paused = true)]` runs hours of TTLs and backoff in microseconds.
//!
//! It keeps the etcd semantics the manager relies on: one revision counter for every change;
//! the txn compares of [`EtcdLeaseStore`](crate::etcd::EtcdLeaseStore) (create only if absent,
//! update and delete only if unchanged since read); etcd leases with a TTL (whole seconds, at
//! least 1) that expire on the tokio clock and delete their keys in one revision; a watch from a
//! revision that delivers every later event (first a "created" answer, as etcd); compaction: a
//! watch that needs a revision older than the compaction point answers
//! [`WatchBatch::Lost`] and ends, as etcd cancels it.
//!
//! Tests play the other nodes and the operator through the direct methods ([`put`], [`delete`],
//! [`grant_lease`], [`revoke_lease`], [`compact`], [`break_watches`]), which bypass the hook.
//! The hook ([`set_hook`]) sees every [`LeaseStore`] call before it runs: it can fail it (an
//! unreachable etcd) or change the store first (another node winning a race).
//!
//! [`put`]: MemoryLeaseStore::put
//! [`delete`]: MemoryLeaseStore::delete
//! [`grant_lease`]: MemoryLeaseStore::grant_lease
//! [`revoke_lease`]: MemoryLeaseStore::revoke_lease
//! [`compact`]: MemoryLeaseStore::compact
//! [`break_watches`]: MemoryLeaseStore::break_watches
//! [`set_hook`]: MemoryLeaseStore::set_hook

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::store::{EtcdError, KeyEvent, LeaseList, LeaseStore, WatchBatch, WatchStream};

/// A [`LeaseStore`] call, as the hook sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    GetConfig,
    ListLeases,
    Grant(Duration),
    Revoke(i64),
    CreateLease(SubnetKey),
    UpdateLease(SubnetKey),
    DeleteLease(SubnetKey),
    Renew(i64),
    WatchLeases(i64),
}

impl Call {
    /// The operation's name, as [`EtcdLeaseStore`](crate::etcd::EtcdLeaseStore) names it in
    /// errors.
    pub fn op(&self) -> &'static str {
        match self {
            Call::GetConfig => "get config",
            Call::ListLeases => "list leases",
            Call::Grant(_) => "lease grant",
            Call::Revoke(_) => "lease revoke",
            Call::CreateLease(_) => "create lease",
            Call::UpdateLease(_) => "update lease",
            Call::DeleteLease(_) => "delete lease",
            Call::Renew(_) => "lease keep-alive",
            Call::WatchLeases(_) => "watch",
        }
    }

    /// The error of an etcd that does not answer this call (transient, as a timeout is).
    pub fn unavailable(&self) -> EtcdError {
        EtcdError::Timeout {
            op: self.op(),
            timeout: Duration::ZERO,
        }
    }
}

/// Runs before every [`LeaseStore`] call; an error is the call's answer.
pub type Hook = Box<dyn FnMut(&MemoryLeaseStore, &Call) -> Result<(), EtcdError> + Send>;

/// The in-memory lease store (clones share it).
#[derive(Clone, Default)]
pub struct MemoryLeaseStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    hook: Mutex<Option<Hook>>,
    changed: Notify,
}

#[derive(Debug)]
struct EtcdLease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    /// Events older than this revision are gone; 0 = nothing compacted.
    compacted: i64,
    config: Option<String>,
    keys: BTreeMap<SubnetKey, Lease>,
    leases: BTreeMap<i64, EtcdLease>,
    last_lease_id: i64,
    grants: u64,
    /// Every key event with its revision, from `compacted` on.
    log: Vec<(i64, KeyEvent)>,
    /// Bumped by `break_watches`: open watches of an older epoch end with an error.
    watch_epoch: u64,
    calls: BTreeMap<&'static str, u64>,
}

impl fmt::Debug for MemoryLeaseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state();
        f.debug_struct("MemoryLeaseStore")
            .field("revision", &s.revision)
            .field("keys", &s.keys.len())
            .field("etcd_leases", &s.leases.len())
            .finish()
    }
}

fn lease_not_found(op: &'static str) -> EtcdError {
    EtcdError::Etcd {
        op,
        source: etcd_client::Error::LeaseKeepAliveError(
            "etcdserver: requested lease not found".into(),
        ),
    }
}

impl State {
    /// Expires every etcd lease whose TTL ran out by `now`; true if a key went away.
    fn expire(&mut self, now: Instant) -> bool {
        let gone: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut changed = false;
        for id in gone {
            changed |= self.drop_lease(id);
        }
        changed
    }

    /// Removes an etcd lease and, in one revision, the keys bound to it.
    fn drop_lease(&mut self, id: i64) -> bool {
        self.leases.remove(&id);
        let bound: Vec<SubnetKey> = self
            .keys
            .values()
            .filter(|l| l.etcd_lease == id)
            .map(|l| l.key)
            .collect();
        if bound.is_empty() {
            return false;
        }
        self.revision += 1;
        for key in bound {
            self.keys.remove(&key);
            self.log.push((self.revision, KeyEvent::Delete(key)));
        }
        true
    }

    fn put(
        &mut self,
        key: SubnetKey,
        attrs: LeaseAttrs,
        etcd_lease: i64,
        op: &'static str,
    ) -> Result<Lease, EtcdError> {
        if etcd_lease != 0 && !self.leases.contains_key(&etcd_lease) {
            return Err(lease_not_found(op));
        }
        self.revision += 1;
        let lease = Lease {
            key,
            attrs,
            etcd_lease,
            mod_revision: self.revision,
        };
        self.keys.insert(key, lease.clone());
        self.log
            .push((self.revision, KeyEvent::Put(Box::new(lease.clone()))));
        Ok(lease)
    }

    fn delete(&mut self, key: &SubnetKey) -> bool {
        if self.keys.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        self.log.push((self.revision, KeyEvent::Delete(*key)));
        true
    }

    fn grant(&mut self, ttl: Duration, now: Instant) -> i64 {
        // etcd grants whole seconds, at least one (as EtcdLeaseStore asks).
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        self.last_lease_id += 1;
        self.grants += 1;
        self.leases.insert(
            self.last_lease_id,
            EtcdLease {
                ttl,
                deadline: now + ttl,
            },
        );
        self.last_lease_id
    }

    fn mod_revision(&self, key: &SubnetKey) -> i64 {
        self.keys.get(key).map_or(0, |l| l.mod_revision)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

impl MemoryLeaseStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state, with every etcd lease that ran out by now expired.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut s = self
            .inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if s.expire(Instant::now()) {
            self.inner.changed.notify_waiters();
        }
        s
    }

    /// Changes the state and wakes the watches.
    fn change<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state());
        self.inner.changed.notify_waiters();
        out
    }

    /// Counts the call and runs the hook (taken out while it runs, so a hook may use the store;
    /// its own calls do not run it again).
    fn enter(&self, call: Call) -> Result<(), EtcdError> {
        *self.state().calls.entry(call.op()).or_default() += 1;
        let lock = || {
            self.inner
                .hook
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let Some(mut hook) = lock().take() else {
            return Ok(());
        };
        let result = hook(self, &call);
        let mut slot = lock();
        if slot.is_none() {
            *slot = Some(hook);
        }
        result
    }

    /// Runs `hook` before every later [`LeaseStore`] call (replacing any earlier hook).
    pub fn set_hook(
        &self,
        hook: impl FnMut(&MemoryLeaseStore, &Call) -> Result<(), EtcdError> + Send + 'static,
    ) {
        *self
            .inner
            .hook
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Box::new(hook));
    }

    pub fn clear_hook(&self) {
        *self
            .inner
            .hook
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// How many [`LeaseStore`] calls of this operation ([`Call::op`]) were made.
    pub fn calls(&self, op: &str) -> u64 {
        self.state().calls.get(op).copied().unwrap_or(0)
    }

    /// Sets or clears the network config text.
    pub fn set_config(&self, text: Option<&str>) {
        self.change(|s| s.config = text.map(str::to_string));
    }

    /// The current revision (0 before the first change).
    pub fn revision(&self) -> i64 {
        self.state().revision
    }

    /// Every lease key now.
    pub fn leases(&self) -> Vec<Lease> {
        self.state().keys.values().cloned().collect()
    }

    /// One lease key.
    pub fn get(&self, key: &SubnetKey) -> Option<Lease> {
        self.state().keys.get(key).cloned()
    }

    /// The etcd leases alive now.
    pub fn etcd_leases(&self) -> Vec<i64> {
        self.state().leases.keys().copied().collect()
    }

    /// How many etcd leases were ever granted (by calls and by [`Self::grant_lease`]).
    pub fn grants(&self) -> u64 {
        self.state().grants
    }

    /// When an etcd lease expires unless renewed.
    pub fn expiry(&self, etcd_lease: i64) -> Option<Instant> {
        self.state().leases.get(&etcd_lease).map(|l| l.deadline)
    }

    /// Grants an etcd lease as another node would.
    pub fn grant_lease(&self, ttl: Duration) -> i64 {
        self.change(|s| s.grant(ttl, Instant::now()))
    }

    /// Revokes an etcd lease (its keys go, in one revision); false if it did not exist.
    pub fn revoke_lease(&self, etcd_lease: i64) -> bool {
        self.change(|s| {
            let existed = s.leases.contains_key(&etcd_lease);
            s.drop_lease(etcd_lease);
            existed
        })
    }

    /// Writes a lease key unconditionally, bound to `etcd_lease` (0: a reservation, no TTL).
    /// Fails as etcd does when the etcd lease does not exist.
    pub fn put(
        &self,
        key: SubnetKey,
        attrs: LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<Lease, EtcdError> {
        self.change(|s| s.put(key, attrs, etcd_lease, "put"))
    }

    /// Deletes a lease key; false if it did not exist.
    pub fn delete(&self, key: &SubnetKey) -> bool {
        self.change(|s| s.delete(key))
    }

    /// Compacts the history: `revision` (at most the current one) becomes the oldest a watch
    /// can start from; open watches that still need older events answer Lost.
    pub fn compact(&self, revision: i64) {
        self.change(|s| {
            let at = revision.min(s.revision + 1);
            s.compacted = s.compacted.max(at);
            let keep = s.compacted;
            s.log.retain(|(r, _)| *r >= keep);
        });
    }

    /// Ends every open watch with an error (as a restarted etcd does); watchers re-watch.
    pub fn break_watches(&self) {
        self.change(|s| s.watch_epoch += 1);
    }
}

/// One open watch.
struct Watch {
    store: MemoryLeaseStore,
    /// The next revision to deliver.
    cursor: i64,
    epoch: u64,
    created: bool,
    done: bool,
}

impl Watch {
    async fn next(&mut self) -> Option<Result<WatchBatch, EtcdError>> {
        if self.done {
            return None;
        }
        if !self.created {
            self.created = true;
            return Some(Ok(WatchBatch::Events {
                events: Vec::new(),
                revision: None,
            }));
        }
        loop {
            let notified = self.store.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let s = self.store.state();
                if s.watch_epoch != self.epoch {
                    self.done = true;
                    return Some(Err(EtcdError::Etcd {
                        op: "watch",
                        source: etcd_client::Error::WatchError("connection lost".into()),
                    }));
                }
                if self.cursor < s.compacted {
                    self.done = true;
                    return Some(Ok(WatchBatch::Lost {
                        reason: format!("revision compacted (oldest available {})", s.compacted),
                    }));
                }
                let events: Vec<(i64, KeyEvent)> = s
                    .log
                    .iter()
                    .filter(|(r, _)| *r >= self.cursor)
                    .cloned()
                    .collect();
                if let Some((last, _)) = events.last() {
                    self.cursor = last + 1;
                    return Some(Ok(WatchBatch::Events {
                        revision: Some(*last),
                        events: events.into_iter().map(|(_, e)| e).collect(),
                    }));
                }
                s.next_deadline()
            };
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

impl LeaseStore for MemoryLeaseStore {
    async fn get_config(&self) -> Result<Option<String>, EtcdError> {
        self.enter(Call::GetConfig)?;
        Ok(self.state().config.clone())
    }

    async fn list_leases(&self) -> Result<LeaseList, EtcdError> {
        self.enter(Call::ListLeases)?;
        let s = self.state();
        Ok(LeaseList {
            leases: s.keys.values().cloned().collect(),
            revision: s.revision,
            invalid: Vec::new(),
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        self.enter(Call::Grant(ttl))?;
        Ok(self.change(|s| s.grant(ttl, Instant::now())))
    }

    async fn revoke(&self, etcd_lease: i64) -> Result<(), EtcdError> {
        self.enter(Call::Revoke(etcd_lease))?;
        self.change(|s| {
            if !s.leases.contains_key(&etcd_lease) {
                return Err(lease_not_found("lease revoke"));
            }
            s.drop_lease(etcd_lease);
            Ok(())
        })
    }

    async fn create_lease(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<Option<i64>, EtcdError> {
        self.enter(Call::CreateLease(key))?;
        self.change(|s| {
            if s.keys.contains_key(&key) {
                return Ok(None);
            }
            s.put(key, attrs.clone(), etcd_lease, "create lease")
                .map(|l| Some(l.mod_revision))
        })
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
    ) -> Result<Option<i64>, EtcdError> {
        self.enter(Call::UpdateLease(lease.key))?;
        self.change(|s| {
            if s.mod_revision(&lease.key) != lease.mod_revision {
                return Ok(None);
            }
            s.put(lease.key, attrs.clone(), lease.etcd_lease, "update lease")
                .map(|l| Some(l.mod_revision))
        })
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<bool, EtcdError> {
        self.enter(Call::DeleteLease(lease.key))?;
        // As the etcd txn: succeeded = the compare held (deleting nothing is still success).
        Ok(self.change(|s| {
            if s.mod_revision(&lease.key) != lease.mod_revision {
                return false;
            }
            s.delete(&lease.key);
            true
        }))
    }

    async fn renew(&self, etcd_lease: i64) -> Result<Option<Duration>, EtcdError> {
        self.enter(Call::Renew(etcd_lease))?;
        let now = Instant::now();
        Ok(self.state().leases.get_mut(&etcd_lease).map(|l| {
            l.deadline = now + l.ttl;
            l.ttl
        }))
    }

    async fn watch_leases(&self, start_revision: i64) -> Result<WatchStream, EtcdError> {
        self.enter(Call::WatchLeases(start_revision))?;
        let (cursor, epoch) = {
            let s = self.state();
            // etcd: a start revision of 0 (or less) means "from the next change".
            let cursor = if start_revision > 0 {
                start_revision
            } else {
                s.revision + 1
            };
            (cursor, s.watch_epoch)
        };
        let watch = Watch {
            store: self.clone(),
            cursor,
            epoch,
            created: false,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watch,
            |mut w| async move { w.next().await.map(|item| (item, w)) },
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::net::Ipv4Addr;

    fn key(s: &str) -> SubnetKey {
        SubnetKey::v4(s.parse().unwrap())
    }

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::new(Ipv4Addr::new(172, 30, 0, last), "vxlan")
    }

    #[tokio::test(start_paused = true)]
    async fn compares_revisions_and_ttls_behave_as_etcd() {
        let s = MemoryLeaseStore::new();
        let id = s.grant(Duration::from_millis(1500)).await.unwrap();
        let a = key("10.5.1.0/24");
        assert!(s.create_lease(a, &attrs(1), id).await.unwrap().is_some());
        assert!(s.create_lease(a, &attrs(2), id).await.unwrap().is_none());
        let read = s.get(&a).unwrap();
        assert_eq!((read.etcd_lease, read.mod_revision), (id, 1));
        // Update and delete only if unchanged since read.
        assert!(s.update_lease(&read, &attrs(3)).await.unwrap().is_some());
        assert!(s.update_lease(&read, &attrs(4)).await.unwrap().is_none());
        assert!(!s.delete_lease(&read).await.unwrap());
        assert_eq!(s.get(&a).unwrap().attrs, attrs(3));
        // A create bound to an etcd lease that does not exist fails as etcd's does.
        let err = s.create_lease(key("10.5.2.0/24"), &attrs(1), 99).await;
        assert!(err.unwrap_err().is_lease_not_found());
        // TTL in whole seconds (1.5 s → 1 s); renewing restarts it; expiry deletes the key.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(s.renew(id).await.unwrap(), Some(Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(s.get(&a).is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.get(&a), None);
        assert_eq!(s.renew(id).await.unwrap(), None);
        assert!(s.revoke(id).await.unwrap_err().is_lease_not_found());
        assert_eq!(s.revision(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_delivers_from_its_revision_expiries_included() {
        let s = MemoryLeaseStore::new();
        let id = s.grant_lease(Duration::from_secs(10));
        let (a, b) = (key("10.5.1.0/24"), key("10.5.2.0/24"));
        s.put(a, attrs(1), id).unwrap();
        s.put(b, attrs(2), 0).unwrap();
        let mut w = s.watch_leases(2).await.unwrap();
        let created = WatchBatch::Events {
            events: vec![],
            revision: None,
        };
        assert_eq!(w.next().await.unwrap().unwrap(), created);
        let Some(Ok(WatchBatch::Events { events, revision })) = w.next().await else {
            panic!("no events")
        };
        assert_eq!(revision, Some(2));
        assert!(matches!(&events[..], [KeyEvent::Put(l)] if l.key == b));
        // Nothing happens until the etcd lease runs out, on the tokio clock.
        let t0 = Instant::now();
        let batch = w.next().await.unwrap().unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert_eq!(
            batch,
            WatchBatch::Events {
                events: vec![KeyEvent::Delete(a)],
                revision: Some(3)
            }
        );
        // A broken watch ends with an error.
        s.break_watches();
        assert!(w.next().await.unwrap().unwrap_err().is_transient());
        assert!(w.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_from_a_compacted_revision_is_lost() {
        let s = MemoryLeaseStore::new();
        for i in 1..=4 {
            s.put(key(&format!("10.5.{i}.0/24")), attrs(i), 0).unwrap();
        }
        s.compact(3);
        // From the compaction point on: fine.
        let mut ok = s.watch_leases(3).await.unwrap();
        ok.next().await;
        assert!(matches!(
            ok.next().await,
            Some(Ok(WatchBatch::Events {
                revision: Some(4),
                ..
            }))
        ));
        // Older: created, then lost, then the end (etcd cancels the watch).
        let mut lost = s.watch_leases(2).await.unwrap();
        lost.next().await;
        assert_eq!(
            lost.next().await.unwrap().unwrap(),
            WatchBatch::Lost {
                reason: "revision compacted (oldest available 3)".into()
            }
        );
        assert!(lost.next().await.is_none());
        // An open watch that falls behind a compaction is lost too.
        let mut behind = s.watch_leases(5).await.unwrap();
        behind.next().await;
        s.put(key("10.5.5.0/24"), attrs(5), 0).unwrap();
        s.put(key("10.5.6.0/24"), attrs(6), 0).unwrap();
        s.compact(6);
        assert!(matches!(
            behind.next().await,
            Some(Ok(WatchBatch::Lost { .. }))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hook_sees_every_call_and_can_fail_it() {
        let s = MemoryLeaseStore::new();
        s.set_hook(|store, call| match call {
            Call::Renew(_) => Err(call.unavailable()),
            // A hook may change the store first (its own calls do not run it again).
            Call::CreateLease(k) => store.put(*k, attrs(9), 0).map(|_| ()),
            _ => Ok(()),
        });
        let id = s.grant(Duration::from_secs(5)).await.unwrap();
        assert!(s.renew(id).await.unwrap_err().is_transient());
        let a = key("10.5.1.0/24");
        assert!(s.create_lease(a, &attrs(1), id).await.unwrap().is_none());
        assert_eq!(s.get(&a).unwrap().attrs, attrs(9));
        assert_eq!(
            (s.calls("lease keep-alive"), s.calls("create lease")),
            (1, 1)
        );
        s.clear_hook();
        assert_eq!(s.renew(id).await.unwrap(), Some(Duration::from_secs(5)));
    }
}
