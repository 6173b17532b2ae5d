//! The lease manager and the lease watcher driven by the in-memory store, under tokio's paused
//! clock: lease loss, renewal failures, TTL expiry, compaction, lost races, a full network.
//! The same paths against a real etcd are in tests/etcd.rs.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subnet_lease::alloc::AllocError;
use subnet_lease::manager::{Event, LeaseError, ManagerOptions};
use subnet_lease::memory::Call;
use subnet_lease::{
    config, Backoff, Change, Lease, LeaseAttrs, LeaseManager, LeaseStats, LeaseWatcher,
    MemoryLeaseStore, SubnetKey,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

const NET_CONF: &str = r#"{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}"#;
/// Two subnets only: 10.5.1.0/24 and 10.5.2.0/24.
const SMALL_NET_CONF: &str = r#"{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0",
    "SubnetMax": "10.5.2.0", "Backend": {"Type": "vxlan"}}"#;

fn key(s: &str) -> SubnetKey {
    SubnetKey::v4(s.parse().unwrap())
}

fn attrs(last: u8) -> LeaseAttrs {
    LeaseAttrs::new(Ipv4Addr::new(172, 30, 0, last), "vxlan")
}

/// TTL 60 s renewed 20 s before expiry (every 40 s), backoff 1 s doubling to 8 s, grace 2 s.
fn opts() -> ManagerOptions {
    ManagerOptions {
        ttl: Duration::from_secs(60),
        renew_margin: Duration::from_secs(20),
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
        removal_grace: Duration::from_secs(2),
        ..ManagerOptions::default()
    }
}

/// The manager of node 172.30.0.1.
fn manager(
    store: &MemoryLeaseStore,
    net_conf: &str,
    opts: ManagerOptions,
) -> LeaseManager<MemoryLeaseStore> {
    let cfg = config::parse(net_conf).unwrap().config;
    LeaseManager::new(store.clone(), cfg, attrs(1), opts)
}

/// Runs the manager on `own`; returns its events.
fn run(m: LeaseManager<MemoryLeaseStore>, own: Lease) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(m.run(own, tx));
    rx
}

/// The next event; fails when none comes within an hour of (paused) time.
async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(3600), rx.recv())
        .await
        .expect("no event within an hour")
        .expect("event stream closed")
}

/// The watcher's next batch; fails when none comes within an hour of (paused) time.
async fn batch(rx: &mut mpsc::Receiver<Vec<Change>>) -> Vec<Change> {
    tokio::time::timeout(Duration::from_secs(3600), rx.recv())
        .await
        .expect("no batch within an hour")
        .expect("watcher stopped")
}

/// Lets the tasks run for `d` of (paused) time.
async fn pass(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn a_first_list_without_peers_is_still_reported() {
    let store = MemoryLeaseStore::new();
    // The watcher on an empty store: its first batch is the (empty) full list.
    let (tx, mut changes) = mpsc::channel(4);
    tokio::spawn(LeaseWatcher::new(store.clone()).run(tx));
    assert_eq!(batch(&mut changes).await, vec![]);
    store.put(key("10.5.7.0/24"), attrs(7), 0).unwrap();
    let added = batch(&mut changes).await;
    assert!(matches!(&added[..], [Change::Added(l)] if l.key == key("10.5.7.0/24")));

    // The manager alone in its network: PeersListed first, then peers as they come.
    let store = MemoryLeaseStore::new();
    let m = manager(&store, NET_CONF, opts());
    let own = m.acquire(None).await.unwrap();
    let mut rx = run(m, own);
    assert_eq!(next(&mut rx).await, Event::PeersListed);
    let peer = store.put(key("10.5.9.0/24"), attrs(9), 0).unwrap();
    assert_eq!(next(&mut rx).await, Event::PeerAdded(peer));
}

#[tokio::test(start_paused = true)]
async fn our_deleted_lease_is_reacquired_with_the_same_subnet() {
    let store = MemoryLeaseStore::new();
    let stats = Arc::new(LeaseStats::default());
    let m = manager(
        &store,
        NET_CONF,
        ManagerOptions {
            stats: stats.clone(),
            ..opts()
        },
    );
    let own = m.acquire(None).await.unwrap();
    let mut rx = run(m, own.clone());
    assert_eq!(next(&mut rx).await, Event::PeersListed);

    assert!(store.delete(&own.key));
    let Event::OwnLease(again) = next(&mut rx).await else {
        panic!("expected OwnLease")
    };
    assert_eq!(again.key, own.key);
    // The etcd lease behind the deleted key is revoked, not left to its 24 h TTL.
    assert_ne!(again.etcd_lease, own.etcd_lease);
    assert!(
        !store.etcd_leases().contains(&own.etcd_lease),
        "{:?}",
        store.etcd_leases()
    );
    let stored = store.get(&own.key).unwrap();
    assert_eq!(
        (stored.attrs.public_ip, stored.etcd_lease),
        (attrs(1).public_ip, again.etcd_lease)
    );
    assert_eq!(
        stats
            .reacquisitions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Taken over by another node: re-acquired elsewhere.
    store.put(own.key, attrs(2), 0).unwrap();
    let Event::OwnLease(moved) = next(&mut rx).await else {
        panic!("expected OwnLease")
    };
    assert_ne!(moved.key, own.key);
    assert_eq!(store.get(&own.key).unwrap().attrs, attrs(2));
    // The node that took our old subnet is a peer now (it used to be skipped as "ours").
    let Event::PeerAdded(taker) = next(&mut rx).await else {
        panic!("expected the taker as a peer")
    };
    assert_eq!((taker.key, taker.attrs), (own.key, attrs(2)));
}

#[tokio::test(start_paused = true)]
async fn a_peer_is_removed_only_after_the_grace_and_not_when_it_comes_back() {
    let store = MemoryLeaseStore::new();
    let peer = store.put(key("10.5.9.0/24"), attrs(9), 0).unwrap();
    let m = manager(&store, NET_CONF, opts());
    let own = m.acquire(None).await.unwrap();
    let mut rx = run(m, own);
    assert_eq!(next(&mut rx).await, Event::PeerAdded(peer.clone()));
    assert_eq!(next(&mut rx).await, Event::PeersListed);

    // Deleted and created again within the grace, same content: nothing to report.
    store.delete(&peer.key);
    pass(Duration::from_millis(500)).await;
    store.put(peer.key, attrs(9), 0).unwrap();
    pass(Duration::from_secs(10)).await;
    assert!(rx.try_recv().is_err());

    // Deleted for good: reported when the grace has run out, not before.
    let t0 = Instant::now();
    store.delete(&peer.key);
    let Event::PeerRemoved(gone) = next(&mut rx).await else {
        panic!("expected PeerRemoved")
    };
    assert_eq!((gone.key, t0.elapsed()), (peer.key, Duration::from_secs(2)));
}

/// The times of the keep-alive calls, failing the first `failures`.
fn failing_renewals(store: &MemoryLeaseStore, failures: usize) -> Arc<Mutex<Vec<Duration>>> {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (seen, t0) = (times.clone(), Instant::now());
    store.set_hook(move |_, call| {
        if let Call::Renew(_) = call {
            let mut seen = seen.lock().unwrap();
            seen.push(t0.elapsed());
            if seen.len() <= failures {
                return Err(call.unavailable());
            }
        }
        Ok(())
    });
    times
}

#[tokio::test(start_paused = true)]
async fn keep_alive_errors_are_retried_with_backoff_on_the_same_etcd_lease() {
    let store = MemoryLeaseStore::new();
    let stats = Arc::new(LeaseStats::default());
    let m = manager(
        &store,
        NET_CONF,
        ManagerOptions {
            stats: stats.clone(),
            ..opts()
        },
    );
    let own = m.acquire(None).await.unwrap();
    let times = failing_renewals(&store, 3);
    let mut rx = run(m, own.clone());
    assert_eq!(next(&mut rx).await, Event::PeersListed);

    pass(Duration::from_secs(90)).await;
    // Due at 40 s; failed, retried after 1, 2, 4 s; then every 40 s again.
    let secs: Vec<u64> = times.lock().unwrap().iter().map(|d| d.as_secs()).collect();
    assert_eq!(secs, vec![40, 41, 43, 47, 87]);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((load(&stats.etcd_errors), load(&stats.renewals)), (3, 2));
    assert_eq!(load(&stats.reacquisitions), 0);
    assert_eq!(store.get(&own.key).unwrap().etcd_lease, own.etcd_lease);
    assert_eq!(store.etcd_leases(), vec![own.etcd_lease]);
    assert!(rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_lease_expired_while_keep_alives_failed_is_reacquired() {
    let store = MemoryLeaseStore::new();
    let m = manager(&store, NET_CONF, opts());
    let own = m.acquire(Some(key("10.5.42.0/24"))).await.unwrap();
    // Keep-alives fail until the TTL has run out, and the watch is down, so only the
    // keep-alive's answer ("no such lease") can tell the manager.
    let t0 = Instant::now();
    let first = own.etcd_lease;
    store.set_hook(move |_, call| match call {
        Call::Renew(id) if *id == first && t0.elapsed() < Duration::from_secs(60) => {
            Err(call.unavailable())
        }
        Call::WatchLeases(_) => Err(call.unavailable()),
        _ => Ok(()),
    });
    let mut rx = run(m, own.clone());
    assert_eq!(next(&mut rx).await, Event::PeersListed);

    // Renewals at 40, 41, 43, 47, 55 s fail; the lease expires at 60 s; the try at 63 s hears
    // it is gone and re-acquires the same subnet on a new etcd lease.
    let Event::OwnLease(again) = next(&mut rx).await else {
        panic!("expected OwnLease")
    };
    assert_eq!(t0.elapsed(), Duration::from_secs(63));
    assert_eq!(again.key, own.key);
    assert_ne!(again.etcd_lease, own.etcd_lease);
    assert_eq!(store.etcd_leases(), vec![again.etcd_lease]);
}

#[tokio::test(start_paused = true)]
async fn a_watch_from_a_compacted_revision_relists_and_reports_the_difference() {
    let store = MemoryLeaseStore::new();
    let a = store.put(key("10.5.1.0/24"), attrs(1), 0).unwrap();
    let b = store.put(key("10.5.2.0/24"), attrs(2), 0).unwrap();
    let (tx, mut changes) = mpsc::channel(4);
    tokio::spawn(LeaseWatcher::new(store.clone()).run(tx));
    assert_eq!(
        batch(&mut changes).await,
        vec![Change::Added(a.clone()), Change::Added(b.clone())]
    );
    // While the watcher waits, a changes, b goes, c comes, and the history is compacted past
    // all of it: its watch is lost, it re-lists and reports the difference.
    let a2 = store.put(a.key, attrs(11), 0).unwrap();
    store.delete(&b.key);
    let c = store.put(key("10.5.3.0/24"), attrs(3), 0).unwrap();
    store.compact(store.revision());
    assert_eq!(
        batch(&mut changes).await,
        vec![Change::Removed(b), Change::Added(a2), Change::Added(c)]
    );
    assert_eq!(store.calls("list leases"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lost_create_race_is_retried_on_the_same_etcd_lease() {
    let store = MemoryLeaseStore::new();
    let wanted = key("10.5.42.0/24");
    // Another node creates the subnet between our list and our create.
    store.set_hook(move |s, call| {
        if *call == Call::CreateLease(wanted) && s.get(&wanted).is_none() {
            let theirs = s.grant_lease(Duration::from_secs(60));
            s.put(wanted, attrs(2), theirs)?;
        }
        Ok(())
    });
    let m = manager(&store, NET_CONF, opts());
    let own = m.acquire(Some(wanted)).await.unwrap();
    assert_ne!(own.key, wanted);
    assert_eq!(store.get(&wanted).unwrap().attrs, attrs(2));
    assert_eq!(store.get(&own.key).unwrap().etcd_lease, own.etcd_lease);
    assert_eq!(
        (store.calls("lease grant"), store.calls("create lease")),
        (1, 2)
    );
    assert_eq!(
        store.etcd_leases().len(),
        2,
        "ours and theirs, nothing leaked"
    );
}

#[tokio::test(start_paused = true)]
async fn every_race_lost_is_contention_and_revokes_the_grant() {
    let store = MemoryLeaseStore::new();
    store.set_hook(|s, call| {
        if let Call::CreateLease(k) = call {
            s.put(*k, attrs(2), 0)?;
        }
        Ok(())
    });
    let m = manager(&store, NET_CONF, opts());
    let err = m.acquire(None).await.unwrap_err();
    assert!(matches!(err, LeaseError::Contention(30)), "{err}");
    assert!(err.is_transient());
    assert_eq!(
        (store.calls("lease grant"), store.calls("lease revoke")),
        (1, 1)
    );
    assert_eq!(store.etcd_leases(), Vec::<i64>::new());
}

#[tokio::test(start_paused = true)]
async fn a_full_network_fails_acquire_and_reacquire_waits_for_a_free_subnet() {
    let store = MemoryLeaseStore::new();
    let (one, two) = (key("10.5.1.0/24"), key("10.5.2.0/24"));
    store.put(one, attrs(2), 0).unwrap();
    store.put(two, attrs(3), 0).unwrap();
    let m = manager(&store, SMALL_NET_CONF, opts());
    let err = m.acquire(None).await.unwrap_err();
    assert!(
        matches!(err, LeaseError::Alloc(AllocError::Full { .. })),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(
        store.etcd_leases(),
        Vec::<i64>::new(),
        "no grant for a full network"
    );

    // We hold one, a peer two; a third node takes ours: the network is full, so the manager
    // waits (backoff 1, 2, 4 s...) until the peer leaves.
    store.delete(&one);
    let stats = Arc::new(LeaseStats::default());
    let m = manager(
        &store,
        SMALL_NET_CONF,
        ManagerOptions {
            stats: stats.clone(),
            ..opts()
        },
    );
    let own = m.acquire(None).await.unwrap();
    assert_eq!(own.key, one);
    let mut rx = run(m, own);
    assert_eq!(
        next(&mut rx).await,
        Event::PeerAdded(store.get(&two).unwrap())
    );
    assert_eq!(next(&mut rx).await, Event::PeersListed);
    store.delete(&one);
    store.put(one, attrs(4), 0).unwrap();
    pass(Duration::from_secs(5)).await;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&stats.etcd_errors), 3, "tries at 0, 1, 3 s");
    assert!(rx.try_recv().is_err());
    let t0 = Instant::now();
    store.delete(&two);
    let mut seen = Vec::new();
    while !seen.iter().any(|e| matches!(e, Event::OwnLease(_))) {
        seen.push(next(&mut rx).await);
    }
    // The lease as written, its revision included.
    assert!(
        seen.contains(&Event::OwnLease(store.get(&two).unwrap())),
        "{seen:?}"
    );
    // The try at 7 s (2 s after the peer left) takes its subnet.
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    // The peer's removal, queued while we re-acquired, was written before we took its subnet:
    // it is the peer's (PeerRemoved after the grace period, its routes go), not a loss of ours
    // (no second re-acquisition).
    let peer_two = Lease {
        attrs: attrs(3),
        etcd_lease: 0,
        ..store.get(&two).unwrap()
    };
    pass(Duration::from_secs(3)).await;
    let mut later = Vec::new();
    while let Ok(e) = rx.try_recv() {
        later.push(e);
    }
    seen.extend(later);
    assert!(
        seen.iter().any(
            |e| matches!(e, Event::PeerRemoved(l) if l.key == two && l.attrs == peer_two.attrs)
        ),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(e, Event::OwnLease(_)))
            .count(),
        1,
        "{seen:?}"
    );
    assert_eq!(load(&stats.reacquisitions), 1);
}

/// Two joiners may pick the same IPv4 subnet with different IPv6 halves: the keys differ, so
/// both creates succeed. The later creator sees the earlier lease (lower revision) sharing a
/// subnet, deletes its own key and chooses again: no two nodes hold one subnet.
#[tokio::test(start_paused = true)]
async fn a_dual_stack_create_sharing_a_subnet_with_an_earlier_one_yields() {
    let store = MemoryLeaseStore::new();
    let conf = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#;
    let m = manager(&store, conf, opts());
    let injected = Arc::new(Mutex::new(None::<SubnetKey>));
    let seen = injected.clone();
    store.set_hook(move |s, call| {
        if let Call::CreateLease(k) = call {
            let mut first = seen.lock().unwrap();
            if first.is_none() {
                // Another node creates a lease with our IPv4 subnet just before we do.
                let other = SubnetKey::dual(k.ipv4.unwrap(), "fd10:0:0:ffff::/64".parse().unwrap());
                let id = s.grant_lease(Duration::from_secs(60));
                s.put(other, attrs(9), id).unwrap();
                *first = Some(other);
            }
        }
        Ok(())
    });
    let own = m.acquire(None).await.unwrap();
    let other = injected.lock().unwrap().expect("a create happened");
    assert_ne!(
        own.key.ipv4, other.ipv4,
        "ours {} shares IPv4 with {other}",
        own.key
    );
    assert!(store.get(&other).is_some(), "the earlier lease stays");
    assert_eq!(store.leases().len(), 2, "{:?}", store.leases());
    assert_eq!(
        store.calls("create lease"),
        2,
        "one more create after yielding"
    );
}
