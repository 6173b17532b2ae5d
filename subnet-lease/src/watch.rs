//! The peer view: list every lease, then watch from the list's revision + 1 so nothing written
//! in between is missed (flannel v0.20 watches from "now" and loses such peers). A compacted or
//! cancelled watch re-lists and reports the difference; an unreachable etcd is retried with
//! backoff, resuming the watch where it stopped.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::lease::{Lease, SubnetKey};
use crate::stats::LeaseStats;
use crate::store::{KeyEvent, LeaseStore, WatchBatch, WatchStream};
pub use etcd_access::Backoff;

/// A change to the set of leases.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A lease appeared or its value changed.
    Added(Lease),
    /// A lease went away (deleted or expired); the last value seen.
    Removed(Lease),
}

impl Change {
    pub fn lease(&self) -> &Lease {
        match self {
            Change::Added(l) | Change::Removed(l) => l,
        }
    }
}

/// Keeps a view of every lease in step with etcd.
#[derive(Debug)]
pub struct LeaseWatcher<R> {
    store: R,
    view: BTreeMap<SubnetKey, Lease>,
    /// Every event up to this revision is reflected in `view`; 0 = list needed.
    revision: i64,
    backoff: Backoff,
    stats: Option<Arc<LeaseStats>>,
    /// Whether a full list has been sent.
    listed: bool,
}

impl<R: LeaseStore> LeaseWatcher<R> {
    pub fn new(store: R) -> Self {
        LeaseWatcher {
            store,
            view: BTreeMap::new(),
            revision: 0,
            backoff: Backoff::default(),
            stats: None,
            listed: false,
        }
    }

    /// Resumes from a known view and revision (as after a restart from saved state).
    pub fn resume(store: R, leases: Vec<Lease>, revision: i64) -> Self {
        let mut w = Self::new(store);
        w.view = leases.into_iter().map(|l| (l.key, l)).collect();
        w.revision = revision;
        w.listed = true;
        w
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Reports etcd reachability and errors into `stats`.
    pub fn with_stats(mut self, stats: Arc<LeaseStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    fn reachable(&self, ok: bool) {
        if let Some(s) = &self.stats {
            s.etcd_reachable.store(ok, Ordering::Relaxed);
            if !ok {
                s.etcd_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The leases currently known.
    pub fn view(&self) -> impl Iterator<Item = &Lease> {
        self.view.values()
    }

    /// Runs until `tx` is closed, sending every change. The first batch is the first full
    /// list (sent even when empty); a watcher made with [`LeaseWatcher::resume`] sends its
    /// first batch only when something changed. Never gives up on etcd errors.
    pub async fn run(mut self, tx: mpsc::Sender<Vec<Change>>) {
        let mut stream: Option<WatchStream> = None;
        loop {
            if tx.is_closed() {
                return;
            }
            if self.revision == 0 {
                match self.store.list_leases().await {
                    Ok(list) => {
                        self.reachable(true);
                        for (key, why) in &list.invalid {
                            tracing::warn!(%key, "ignoring invalid lease: {why}");
                        }
                        let changes = self.replace_view(list.leases);
                        self.revision = list.revision;
                        // The first list is always sent, even empty: it tells the receiver
                        // that the view is complete.
                        let first = !std::mem::replace(&mut self.listed, true);
                        if (first || !changes.is_empty()) && tx.send(changes).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        self.wait_after_error(&e.to_string(), &tx).await;
                        continue;
                    }
                }
            }
            let s = match stream.as_mut() {
                Some(s) => s,
                None => match self.store.watch_leases(self.revision + 1).await {
                    Ok(s) => stream.insert(s),
                    Err(e) => {
                        self.wait_after_error(&e.to_string(), &tx).await;
                        continue;
                    }
                },
            };
            let item = tokio::select! {
                item = s.next() => item,
                _ = tx.closed() => return,
            };
            match item {
                Some(Ok(WatchBatch::Events { events, revision })) => {
                    self.backoff.reset();
                    self.reachable(true);
                    let changes = self.apply(events);
                    if let Some(r) = revision {
                        self.revision = self.revision.max(r);
                    }
                    if !changes.is_empty() && tx.send(changes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WatchBatch::Lost { reason })) => {
                    tracing::info!("lease watch lost ({reason}); re-listing");
                    stream = None;
                    self.revision = 0;
                }
                Some(Err(e)) => {
                    stream = None;
                    self.wait_after_error(&e.to_string(), &tx).await;
                }
                None => {
                    stream = None;
                    self.wait_after_error("watch stream ended", &tx).await;
                }
            }
        }
    }

    async fn wait_after_error(&mut self, err: &str, tx: &mpsc::Sender<Vec<Change>>) {
        self.reachable(false);
        let d = self.backoff.next_delay();
        tracing::warn!("lease watch: {err}; retrying in {d:?}");
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = tx.closed() => {}
        }
    }

    fn replace_view(&mut self, leases: Vec<Lease>) -> Vec<Change> {
        let fresh: BTreeMap<SubnetKey, Lease> = leases.into_iter().map(|l| (l.key, l)).collect();
        let mut changes: Vec<Change> = self
            .view
            .iter()
            .filter(|(k, _)| !fresh.contains_key(k))
            .map(|(_, l)| Change::Removed(l.clone()))
            .collect();
        for (k, l) in &fresh {
            if self.view.get(k).map(|old| &old.attrs) != Some(&l.attrs) {
                changes.push(Change::Added(l.clone()));
            }
        }
        self.view = fresh;
        changes
    }

    fn apply(&mut self, events: Vec<KeyEvent>) -> Vec<Change> {
        let mut changes = Vec::new();
        for ev in events {
            match ev {
                KeyEvent::Put(l) => {
                    if l.mod_revision <= self.revision && self.view.contains_key(&l.key) {
                        continue; // already seen by the list
                    }
                    let changed = self.view.get(&l.key).map(|old| &old.attrs) != Some(&l.attrs);
                    self.view.insert(l.key, (*l).clone());
                    if changed {
                        changes.push(Change::Added(*l));
                    }
                }
                KeyEvent::Delete(k) => {
                    if let Some(old) = self.view.remove(&k) {
                        changes.push(Change::Removed(old));
                    }
                }
            }
        }
        changes
    }
}
