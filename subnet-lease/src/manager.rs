//! The lease manager: acquires this node's lease, keeps it renewed, re-acquires it when it
//! disappears, and turns the lease watch into peer events.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::alloc::{self, AllocError, Choice, Identity};
use crate::config::NetConfig;
use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::stats::LeaseStats;
use crate::store::{EtcdError, LeaseStore};
use crate::watch::{Backoff, Change, LeaseWatcher};

/// flannel's lease TTL: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// flannel's default renew margin: 60 minutes before expiry.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// How many times acquisition retries after losing a race for a subnet.
pub const ACQUIRE_ATTEMPTS: usize = 30;
/// How long a peer's removal is held back: a node whose lease was deleted or revoked creates
/// it again within milliseconds (same subnet, same content), and its peers must not remove
/// and re-add its routes meanwhile (measured: 10–30 ms of traffic towards it lost each time).
pub const DEFAULT_REMOVAL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Store(#[from] EtcdError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(
        "could not acquire a lease after {0} attempts: other nodes kept taking the chosen subnets"
    )]
    Contention(usize),
    #[error("lease {0} is gone or no longer ours; it is re-acquired with the new attributes")]
    NotOurs(SubnetKey),
    #[error(
        "our lease {} lies outside the network config ({network}): the config changed under \
         it. The lease stays (a subnet in another Network would split the cluster). Restore \
         the config, or release the lease deliberately: `flannelctl leases revoke {}`, or \
         restart flanneld with --allow-network-change",
        keys(.leases), keys(.leases)
    )]
    OutsideNetwork {
        leases: Vec<SubnetKey>,
        network: String,
    },
}

fn keys(k: &[SubnetKey]) -> String {
    k.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl LeaseError {
    /// Whether retrying later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Store(e) => e.is_transient(),
            LeaseError::Contention(_) | LeaseError::NotOurs(_) => true,
            LeaseError::Alloc(_) | LeaseError::OutsideNetwork { .. } => false,
        }
    }
}

/// What consumers (backends, the daemon) are told.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A peer's lease appeared or changed.
    PeerAdded(Lease),
    /// A peer's lease was deleted or expired.
    PeerRemoved(Lease),
    /// Our own lease was lost and re-acquired (possibly with another subnet).
    OwnLease(Lease),
    /// Sent once, after the events of the first full list of leases: every peer that exists is
    /// known now, so what was programmed for anyone else is stale. Until then nothing already
    /// programmed may be removed (a restarted daemon has not heard of its peers yet).
    PeersListed,
}

/// Asks a running manager to publish new attributes (BackendType, BackendData) on our lease:
/// same subnet, same etcd lease. The answer is the lease as now stored.
#[derive(Debug)]
pub struct Republish {
    pub attrs: LeaseAttrs,
    pub done: oneshot::Sender<Result<Lease, LeaseError>>,
}

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub ttl: Duration,
    pub renew_margin: Duration,
    pub backoff: Backoff,
    /// How long `PeerRemoved` waits for the peer's lease to come back (see
    /// [`DEFAULT_REMOVAL_GRACE`]); zero reports removals at once.
    pub removal_grace: Duration,
    /// Whether acquiring may delete our leases that no longer fit the config (an operator's
    /// deliberate Network change, `--allow-network-change`). Without it such a lease stays and
    /// acquisition fails with [`LeaseError::OutsideNetwork`].
    pub release_stale_leases: bool,
    /// Counters for metrics, shared with the caller.
    pub stats: Arc<LeaseStats>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            ttl: DEFAULT_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            backoff: Backoff::default(),
            removal_grace: DEFAULT_REMOVAL_GRACE,
            release_stale_leases: false,
            stats: Arc::default(),
        }
    }
}

/// Peer removals held back for a grace period (pure; the caller supplies the clock). A lease
/// that comes back within the grace with the same content cancels its removal and nothing is
/// reported; with other content it is reported as changed (`PeerAdded`), never as a removal
/// followed by an addition.
#[derive(Debug, Default)]
pub struct PendingRemovals {
    grace: Duration,
    pending: BTreeMap<SubnetKey, (Lease, Instant)>,
}

impl PendingRemovals {
    pub fn new(grace: Duration) -> Self {
        PendingRemovals {
            grace,
            pending: BTreeMap::new(),
        }
    }

    /// A watcher change at `now`; returns the event to report now, if any.
    pub fn change(&mut self, change: Change, now: Instant) -> Option<Event> {
        match change {
            Change::Removed(l) if self.grace.is_zero() => Some(Event::PeerRemoved(l)),
            Change::Removed(l) => {
                // The first removal's deadline stands (a repeated one does not extend it).
                self.pending
                    .entry(l.key)
                    .or_insert_with(|| (l, now + self.grace));
                None
            }
            Change::Added(l) => match self.pending.remove(&l.key) {
                Some((old, _)) if old.attrs == l.attrs => None,
                _ => Some(Event::PeerAdded(l)),
            },
        }
    }

    /// Forgets a pending removal (the key is ours now).
    pub fn forget(&mut self, key: &SubnetKey) {
        self.pending.remove(key);
    }

    /// The removals whose grace has run out by `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Event> {
        let keys: Vec<SubnetKey> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .map(|(l, _)| Event::PeerRemoved(l))
            .collect()
    }

    /// When the next removal falls due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(_, at)| *at).min()
    }
}

/// The subnet settings of a config, for messages.
fn describe_network(cfg: &NetConfig) -> String {
    let v4 = cfg.ipv4_network().map_or("no IPv4 Network".into(), |n| {
        format!(
            "Network {n}, SubnetLen {}, SubnetMin {}, SubnetMax {}",
            cfg.subnet_len, cfg.subnet_min, cfg.subnet_max
        )
    });
    match cfg.ipv6_network() {
        Some(n) => format!(
            "{v4}, IPv6Network {n}, IPv6SubnetLen {}",
            cfg.ipv6_subnet_len
        ),
        None => v4,
    }
}

/// Acquires and keeps one node's lease.
#[derive(Debug, Clone)]
pub struct LeaseManager<R> {
    store: R,
    cfg: NetConfig,
    attrs: LeaseAttrs,
    opts: ManagerOptions,
}

impl<R: LeaseStore> LeaseManager<R> {
    /// `attrs` is what this node publishes: PublicIP(v6), BackendType, BackendData.
    pub fn new(store: R, cfg: NetConfig, attrs: LeaseAttrs, opts: ManagerOptions) -> Self {
        LeaseManager {
            store,
            cfg,
            attrs,
            opts,
        }
    }

    pub fn store(&self) -> &R {
        &self.store
    }

    fn identity(&self) -> Identity {
        Identity::of(&self.attrs)
    }

    /// Acquires a lease: our existing one, else `previous` (from the subnet file) if free,
    /// else a random free subnet. A lost race costs one more txn, not a re-list: the lost key
    /// joins the local view, the random pool widens, and the etcd lease granted for the first
    /// try is reused (and revoked if nothing is created, so no grant leaks).
    pub async fn acquire(&self, previous: Option<SubnetKey>) -> Result<Lease, LeaseError> {
        let mut grant = None;
        let result = self.try_acquire(previous, &mut grant).await;
        if let Some(id) = grant {
            if let Err(e) = self.store.revoke(id).await {
                tracing::warn!("revoking unused etcd lease {id:x}: {e} (it expires with its TTL)");
            }
        }
        result
    }

    async fn try_acquire(
        &self,
        previous: Option<SubnetKey>,
        grant: &mut Option<i64>,
    ) -> Result<Lease, LeaseError> {
        let mut leases = self.store.list_leases().await?.leases;
        for attempt in 1..=ACQUIRE_ATTEMPTS {
            let plan = alloc::plan(
                &self.cfg,
                &leases,
                self.identity(),
                previous,
                alloc::pool_size(attempt),
                &mut rand::rng(),
            )?;
            if !plan.stale.is_empty() && !self.opts.release_stale_leases {
                return Err(LeaseError::OutsideNetwork {
                    leases: plan.stale.iter().map(|l| l.key).collect(),
                    network: describe_network(&self.cfg),
                });
            }
            for stale in &plan.stale {
                tracing::warn!(subnet = %stale.key, "deleting our lease that no longer fits the network config (--allow-network-change)");
                self.store.delete_lease(stale).await?;
            }
            if !plan.stale.is_empty() {
                leases.retain(|l| !plan.stale.contains(l));
            }
            match plan.choice {
                Choice::Reuse(old) => {
                    let mut attrs = self.attrs.clone();
                    // Keep fields a newer version wrote.
                    for (k, v) in &old.attrs.extra {
                        attrs.extra.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    let written = self.store.update_lease(&old, &attrs).await?;
                    let renewed = match written {
                        Some(_) if old.is_reservation() => true,
                        Some(_) => self.store.renew(old.etcd_lease).await?.is_some(),
                        None => false,
                    };
                    if !renewed {
                        tracing::debug!(subnet = %old.key, attempt, "own lease changed or expired while reusing it; re-reading");
                        leases = self.store.list_leases().await?.leases;
                        continue;
                    }
                    tracing::info!(subnet = %old.key, reservation = old.is_reservation(), "reusing existing lease");
                    return Ok(Lease {
                        attrs,
                        mod_revision: written.unwrap_or(0),
                        ..*old
                    });
                }
                Choice::Create(key) => {
                    let id = match *grant {
                        Some(id) => id,
                        None => *grant.insert(self.store.grant(self.opts.ttl).await?),
                    };
                    if let Some(revision) = self.store.create_lease(key, &self.attrs, id).await? {
                        let ours = Lease {
                            key,
                            attrs: self.attrs.clone(),
                            etcd_lease: id,
                            mod_revision: revision,
                        };
                        // A dual-stack key names two subnets, and two joiners may pick the same
                        // IPv4 (or IPv6) subnet with different other halves: distinct keys, so
                        // the create txn does not stop the second. The later creator (higher
                        // revision) yields and chooses again; the earlier one sees no earlier
                        // holder and keeps its lease.
                        if key.ipv4.is_some() && key.ipv6.is_some() {
                            let now = self.store.list_leases().await?.leases;
                            let first = now.iter().find(|l| {
                                l.key != key
                                    && l.mod_revision < revision
                                    && ((l.key.ipv4.is_some() && l.key.ipv4 == key.ipv4)
                                        || (l.key.ipv6.is_some() && l.key.ipv6 == key.ipv6))
                            });
                            if let Some(first) = first {
                                tracing::info!(subnet = %key, other = %first.key, attempt, "another node created a lease with one of these subnets first; choosing again");
                                self.store.delete_lease(&ours).await?;
                                // The etcd lease is free again: reused for the next try.
                                leases = now.into_iter().filter(|l| l.key != key).collect();
                                continue;
                            }
                        }
                        *grant = None;
                        tracing::info!(subnet = %key, "acquired new lease");
                        return Ok(ours);
                    }
                    tracing::info!(subnet = %key, attempt, "lost the race for a subnet; choosing again");
                    // Someone holds it now: count it as taken without re-reading everything.
                    leases.push(Lease {
                        key,
                        attrs: LeaseAttrs::new(std::net::Ipv4Addr::UNSPECIFIED, ""),
                        etcd_lease: -1,
                        mod_revision: 0,
                    });
                }
            }
        }
        Err(LeaseError::Contention(ACQUIRE_ATTEMPTS))
    }

    /// Keeps `own` renewed and re-acquired, and sends peer events, until `events` is closed
    /// (the consumer dropped its receiver) — which is how the caller stops it.
    pub async fn run(self, own: Lease, events: mpsc::Sender<Event>) {
        // A control channel nobody sends on: `run_with_control` without republishing.
        let (_keep, control) = mpsc::channel(1);
        self.run_with_control(own, events, control).await
    }

    /// [`LeaseManager::run`], also serving [`Republish`] requests from `control` (a closed
    /// channel just means no more requests).
    pub async fn run_with_control(
        mut self,
        mut own: Lease,
        events: mpsc::Sender<Event>,
        control: mpsc::Receiver<Republish>,
    ) {
        let mut control = Some(control);
        let (tx, mut changes) = mpsc::channel::<Vec<Change>>(64);
        let watcher = LeaseWatcher::new(self.store.clone())
            .with_backoff(self.opts.backoff)
            .with_stats(self.opts.stats.clone());
        let watch_task = tokio::spawn(watcher.run(tx));
        let mut renew_at = self.renew_deadline(self.opts.ttl);
        let mut backoff = self.opts.backoff;
        let mut lost = false;
        // The node that took our subnet over: a peer once we hold another subnet.
        let mut taken_over: Option<Lease> = None;
        let mut removals = PendingRemovals::new(self.opts.removal_grace);
        // The watcher's first batch is its first full list (sent even when empty).
        let mut listed = false;
        let stats = self.opts.stats.clone();
        stats.etcd_reachable.store(true, Ordering::Relaxed);
        if own.is_reservation() {
            stats.lease_expiry_unix.store(0, Ordering::Relaxed);
        } else {
            stats.expires_in(self.opts.ttl);
        }
        loop {
            if lost {
                match self.reacquire(&own, &events).await {
                    Some(l) => {
                        // The etcd lease behind the key we lost binds nothing of ours any
                        // more: revoke it rather than leave it to its TTL (a day).
                        let old = own.etcd_lease;
                        if old != 0 && old != l.etcd_lease {
                            if let Err(e) = self.store.revoke(old).await {
                                tracing::debug!("revoking the etcd lease of our lost key: {e}");
                            }
                        }
                        own = l;
                        lost = false;
                        removals.forget(&own.key);
                        stats.reacquisitions.fetch_add(1, Ordering::Relaxed);
                        stats.etcd_reachable.store(true, Ordering::Relaxed);
                        stats.expires_in(self.opts.ttl);
                        renew_at = self.renew_deadline(self.opts.ttl);
                        if events.send(Event::OwnLease(own.clone())).await.is_err() {
                            break;
                        }
                        if let Some(taker) = taken_over.take().filter(|t| t.key != own.key) {
                            let ev = removals.change(Change::Added(taker), Instant::now());
                            if let Some(ev) = ev {
                                if events.send(ev).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    None => break,
                }
            }
            let sleep_until = if own.is_reservation() {
                Instant::now() + Duration::from_secs(3600 * 24 * 365)
            } else {
                renew_at
            };
            let request = async {
                match control.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            };
            let removal_due = async {
                match removals.next_deadline() {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = events.closed() => break,
                _ = removal_due => {
                    for ev in removals.due(Instant::now()) {
                        if events.send(ev).await.is_err() {
                            break;
                        }
                    }
                }
                req = request => match req {
                    None => control = None,
                    Some(Republish { attrs, done }) => {
                        let r = self.republish(&own, attrs).await;
                        if let Ok(l) = &r {
                            own = l.clone();
                        }
                        let _ = done.send(r);
                    }
                },
                _ = tokio::time::sleep_until(sleep_until) => {
                    match self.store.renew(own.etcd_lease).await {
                        Ok(Some(ttl)) => {
                            backoff.reset();
                            stats.renewals.fetch_add(1, Ordering::Relaxed);
                            stats.etcd_reachable.store(true, Ordering::Relaxed);
                            stats.expires_in(ttl);
                            renew_at = self.renew_deadline(ttl);
                            tracing::info!(subnet = %own.key, "lease renewed, TTL {ttl:?}");
                        }
                        Ok(None) => {
                            tracing::warn!(subnet = %own.key, "lease expired; re-acquiring");
                            lost = true;
                        }
                        Err(e) => {
                            stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
                            stats.etcd_reachable.store(false, Ordering::Relaxed);
                            let d = backoff.next_delay();
                            tracing::warn!(subnet = %own.key, "lease renewal failed: {e}; retrying in {d:?}");
                            renew_at = Instant::now() + d;
                        }
                    }
                }
                batch = changes.recv() => {
                    let Some(batch) = batch else { break };
                    for change in batch {
                        let lease = change.lease();
                        // Written before we took this key (queued while we re-acquired it):
                        // the previous holder's, not ours. Its removal is a peer's; a stale
                        // write of it is not news.
                        if lease.key == own.key
                            && lease.mod_revision < own.mod_revision
                        {
                            let peer = matches!(&change, Change::Removed(l) if !Identity::of(&own.attrs).owns(l));
                            if peer {
                                if let Some(ev) = removals.change(change, Instant::now()) {
                                    if events.send(ev).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            continue;
                        }
                        if lease.key == own.key {
                            let ours = Identity::of(&own.attrs).owns(lease);
                            match &change {
                                Change::Removed(_) => {
                                    tracing::warn!(subnet = %own.key, "our lease was deleted; re-acquiring");
                                    lost = true;
                                    taken_over = None;
                                }
                                Change::Added(l) if !ours => {
                                    tracing::warn!(subnet = %own.key, other = %l.attrs.public_ip, "our subnet was taken over by another node; re-acquiring");
                                    lost = true;
                                    taken_over = Some(l.clone());
                                }
                                Change::Added(_) => {}
                            }
                            continue;
                        }
                        let Some(ev) = removals.change(change, Instant::now()) else {
                            continue;
                        };
                        if events.send(ev).await.is_err() {
                            break;
                        }
                    }
                    if !listed {
                        listed = true;
                        if events.send(Event::PeersListed).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        watch_task.abort();
    }

    /// Rewrites our lease with `attrs` (unknown fields of the stored value kept), compare-and-
    /// swap on its revision, retried a few times if it changed meanwhile; later re-acquisitions
    /// publish `attrs` too. Fails if the lease is gone or no longer ours.
    async fn republish(&mut self, own: &Lease, attrs: LeaseAttrs) -> Result<Lease, LeaseError> {
        let find = |list: crate::store::LeaseList| {
            list.leases
                .into_iter()
                .find(|l| l.key == own.key && Identity::of(&own.attrs).owns(l))
        };
        // From now on this node publishes `attrs`, also when the lease has to be re-acquired.
        self.attrs = attrs.clone();
        for _ in 0..5 {
            let Some(current) = find(self.store.list_leases().await?) else {
                return Err(LeaseError::NotOurs(own.key));
            };
            let mut new = attrs.clone();
            for (k, v) in &current.attrs.extra {
                new.extra.entry(k.clone()).or_insert_with(|| v.clone());
            }
            if self.store.update_lease(&current, &new).await?.is_some() {
                if let Some(l) = find(self.store.list_leases().await?) {
                    return Ok(l);
                }
            }
        }
        Err(LeaseError::Contention(5))
    }

    fn renew_deadline(&self, ttl: Duration) -> Instant {
        let wait = ttl
            .saturating_sub(self.opts.renew_margin)
            .max(Duration::from_secs(1));
        Instant::now() + wait
    }

    /// Re-acquires after our lease went away, preferring the same subnet; retries transient
    /// errors until it succeeds or the consumer goes away (None).
    async fn reacquire(&self, own: &Lease, events: &mpsc::Sender<Event>) -> Option<Lease> {
        let mut backoff = self.opts.backoff;
        loop {
            let result = tokio::select! {
                r = self.acquire(Some(own.key)) => r,
                _ = events.closed() => return None,
            };
            match result {
                Ok(l) => {
                    if l.key != own.key {
                        tracing::warn!(old = %own.key, new = %l.key, "re-acquired a different subnet");
                    }
                    return Some(l);
                }
                Err(e) => {
                    self.opts.stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    self.opts
                        .stats
                        .etcd_reachable
                        .store(!e.is_transient(), Ordering::Relaxed);
                    let d = backoff.next_delay();
                    tracing::error!("re-acquiring our lease failed: {e}; retrying in {d:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = events.closed() => return None,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lease(subnet: &str, last: u8) -> Lease {
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs: LeaseAttrs::new(Ipv4Addr::new(172, 30, 0, last), "vxlan"),
            etcd_lease: 7,
            mod_revision: 3,
        }
    }

    #[test]
    fn a_lease_back_within_the_grace_is_no_event_and_a_changed_one_an_update() {
        let grace = Duration::from_secs(2);
        let mut p = PendingRemovals::new(grace);
        let t0 = Instant::now();
        let a = lease("10.5.1.0/24", 11);
        assert_eq!(p.change(Change::Removed(a.clone()), t0), None);
        assert_eq!(p.next_deadline(), Some(t0 + grace));
        // Re-created with the same content (another etcd lease, another revision).
        let again = Lease {
            etcd_lease: 8,
            mod_revision: 9,
            ..a.clone()
        };
        assert_eq!(p.change(Change::Added(again), t0 + grace / 2), None);
        assert_eq!(p.next_deadline(), None);
        assert!(p.due(t0 + grace * 2).is_empty());
        // Re-created by another node: an update, never a removal.
        p.change(Change::Removed(a.clone()), t0);
        let other = lease("10.5.1.0/24", 12);
        assert_eq!(
            p.change(Change::Added(other.clone()), t0),
            Some(Event::PeerAdded(other))
        );
        assert!(p.due(t0 + grace).is_empty());
    }

    #[test]
    fn removals_fall_due_after_the_grace_in_order_of_their_deadlines() {
        let grace = Duration::from_secs(2);
        let mut p = PendingRemovals::new(grace);
        let t0 = Instant::now();
        let (a, b) = (lease("10.5.1.0/24", 11), lease("10.5.2.0/24", 12));
        p.change(Change::Removed(a.clone()), t0);
        p.change(Change::Removed(b.clone()), t0 + Duration::from_secs(1));
        // A repeated removal keeps the first deadline.
        p.change(Change::Removed(a.clone()), t0 + Duration::from_secs(1));
        assert!(p.due(t0 + grace - Duration::from_millis(1)).is_empty());
        assert_eq!(p.due(t0 + grace), vec![Event::PeerRemoved(a)]);
        assert_eq!(p.next_deadline(), Some(t0 + grace + Duration::from_secs(1)));
        // A key that became ours is forgotten.
        p.forget(&b.key);
        assert!(p.due(t0 + grace * 3).is_empty());
        // A new lease is reported at once; with no grace, so is a removal.
        assert_eq!(
            p.change(Change::Added(b.clone()), t0),
            Some(Event::PeerAdded(b.clone()))
        );
        let mut now = PendingRemovals::new(Duration::ZERO);
        assert_eq!(
            now.change(Change::Removed(b.clone()), t0),
            Some(Event::PeerRemoved(b))
        );
    }
}
