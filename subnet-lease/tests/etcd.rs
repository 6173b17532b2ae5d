//! The lease manager against a real etcd (Debian etcd-server) on a free loopback port.
//! Skips with a printed reason when etcd is not installed, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use subnet_lease::manager::{Event, ManagerOptions};
use subnet_lease::watch::Backoff;
use subnet_lease::{
    config, EtcdLeaseStore, EtcdOptions, LeaseAttrs, LeaseManager, LeaseStore, LeaseWatcher,
    SubnetKey,
};
use test_support::{random_tag, Etcd};
use tokio::sync::mpsc;

struct Env {
    etcd: Etcd,
    opts: EtcdOptions,
    reg: EtcdLeaseStore,
}

impl Env {
    /// A fresh etcd with `net_conf` written at a unique prefix, or None to skip.
    async fn start(net_conf: &str) -> Option<Env> {
        let etcd = Etcd::start()?;
        let opts = EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            prefix: format!("/test-{}/network", random_tag(6)),
            timeout: Duration::from_secs(3),
            ..EtcdOptions::default()
        };
        let reg = EtcdLeaseStore::connect(&opts).await.unwrap();
        reg.client()
            .put(reg.config_key(), net_conf, None)
            .await
            .unwrap();
        Some(Env { etcd, opts, reg })
    }

    /// A manager for a node with `public_ip`, on its own etcd client (as a separate node).
    async fn node(
        &self,
        public_ip: Ipv4Addr,
        opts: ManagerOptions,
    ) -> LeaseManager<EtcdLeaseStore> {
        let reg = EtcdLeaseStore::connect(&self.opts).await.unwrap();
        let text = reg.get_config().await.unwrap().unwrap();
        let cfg = config::parse(&text).unwrap().config;
        LeaseManager::new(reg, cfg, LeaseAttrs::new(public_ip, "alloc"), opts)
    }

    async fn etcd_lease_count(&self) -> usize {
        self.reg.client().leases().await.unwrap().leases().len()
    }
}

fn fast() -> ManagerOptions {
    ManagerOptions {
        backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
        removal_grace: Duration::from_millis(500),
        ..ManagerOptions::default()
    }
}

fn ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i)
}

/// The next event, `PeersListed` included.
async fn any_event(rx: &mut mpsc::Receiver<Event>, limit: Duration) -> Event {
    tokio::time::timeout(limit, rx.recv())
        .await
        .expect("no event in time")
        .expect("event stream closed")
}

/// The next event other than `PeersListed`.
async fn next_event(rx: &mut mpsc::Receiver<Event>, limit: Duration) -> Event {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let ev = any_event(rx, deadline - tokio::time::Instant::now()).await;
        if ev != Event::PeersListed {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_joiners_get_distinct_non_overlapping_subnets() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#).await
    else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 1..=50 {
        let m = env.node(ip(i), fast()).await;
        tasks.push(tokio::spawn(async move { m.acquire(None).await.unwrap() }));
    }
    let mut subnets: Vec<Ipv4Net> = Vec::new();
    for t in tasks {
        subnets.push(t.await.unwrap().key.ipv4.unwrap());
    }
    let distinct: HashSet<_> = subnets.iter().collect();
    assert_eq!(distinct.len(), 50, "{subnets:?}");
    for (i, a) in subnets.iter().enumerate() {
        assert_eq!(a.prefix_len(), 24);
        assert!(
            a.network() >= Ipv4Addr::new(10, 5, 1, 0),
            "below SubnetMin: {a}"
        );
        for b in &subnets[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
        }
    }
    let list = env.reg.list_leases().await.unwrap();
    assert_eq!(list.leases.len(), 50);
    let ips: HashSet<_> = list.leases.iter().map(|l| l.attrs.public_ip).collect();
    assert_eq!(ips.len(), 50);
    // Lost races revoke their grant: exactly one etcd lease per subnet.
    assert_eq!(env.etcd_lease_count().await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_its_subnet_and_etcd_lease() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let first = env.node(ip(1), fast()).await.acquire(None).await.unwrap();
    for i in 2..=5 {
        env.node(ip(i), fast()).await.acquire(None).await.unwrap();
    }
    let again = env.node(ip(1), fast()).await.acquire(None).await.unwrap();
    assert_eq!(again.key, first.key);
    assert_eq!(
        again.etcd_lease, first.etcd_lease,
        "same etcd lease, no new grant"
    );
    assert_eq!(env.etcd_lease_count().await, 5);
    // The value in etcd is flannel's JSON.
    let resp = env
        .reg
        .client()
        .get(format!("{}/subnets/{}", env.opts.prefix, first.key), None)
        .await
        .unwrap();
    let value = String::from_utf8_lossy(resp.kvs()[0].value()).into_owned();
    assert_eq!(
        value,
        r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"alloc"}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnet_from_the_subnet_file_is_reused_when_free() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let prev = SubnetKey::parse("10.5.200.0-24").unwrap();
    let got = env
        .node(ip(1), fast())
        .await
        .acquire(Some(prev))
        .await
        .unwrap();
    assert_eq!(got.key, prev);
    // Another node that had the same subnet file gets something else.
    let other = env
        .node(ip(2), fast())
        .await
        .acquire(Some(prev))
        .await
        .unwrap();
    assert_ne!(other.key, prev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_and_reservations() {
    // 10.5.0.0/28 in /30s: .0 is skipped (SubnetMin), leaving .4, .8, .12.
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/28","SubnetLen":30}"#).await else {
        return;
    };
    // Reserve .8 for 10.0.0.99: a key without TTL.
    let reserved = format!("{}/subnets/10.5.0.8-30", env.opts.prefix);
    env.reg
        .client()
        .put(
            reserved,
            r#"{"PublicIP":"10.0.0.99","PublicIPv6":null}"#,
            None,
        )
        .await
        .unwrap();
    let a = env.node(ip(1), fast()).await.acquire(None).await.unwrap();
    let b = env.node(ip(2), fast()).await.acquire(None).await.unwrap();
    let got: HashSet<String> = [a.key.to_string(), b.key.to_string()].into();
    assert_eq!(
        got,
        HashSet::from(["10.5.0.4-30".into(), "10.5.0.12-30".into()])
    );
    let err = env
        .node(ip(3), fast())
        .await
        .acquire(None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "network 10.5.0.0/28 is full: every /30 subnet between 10.5.0.4 and 10.5.0.12 is leased or reserved"
    );
    assert!(!err.is_transient());
    // The reservation's owner gets it, and it stays a reservation (no TTL).
    let owner = env.node(ip(99), fast()).await.acquire(None).await.unwrap();
    assert_eq!(owner.key.to_string(), "10.5.0.8-30");
    assert!(owner.is_reservation());
    let list = env.reg.list_leases().await.unwrap();
    let r = list.leases.iter().find(|l| l.key == owner.key).unwrap();
    assert_eq!(r.etcd_lease, 0);
    assert_eq!(r.attrs.backend_type, "alloc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_started_while_leases_are_written_misses_none() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let mut writers = Vec::new();
    for i in 1..=50 {
        let m = env.node(ip(i), fast()).await;
        writers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 4)).await;
            m.acquire(None).await.unwrap().key
        }));
    }
    // Start watching while the writers run.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn(LeaseWatcher::new(env.reg.clone()).run(tx));
    let mut written = HashSet::new();
    for w in writers {
        written.insert(w.await.unwrap());
    }
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 50 {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("watcher did not report every lease in 20 s")
            .unwrap();
        for c in batch {
            if let subnet_lease::Change::Added(l) = c {
                seen.insert(l.key);
            }
        }
    }
    assert_eq!(seen, written);
    drop(rx);
    watcher.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_join_and_leave_as_events() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let a = env.node(ip(1), fast()).await;
    let own = a.acquire(None).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let run = tokio::spawn(a.run(own.clone(), tx));
    // The first full list (only our own lease): nothing to report but that it is complete.
    assert_eq!(
        any_event(&mut rx, Duration::from_secs(10)).await,
        Event::PeersListed
    );
    let b = env.node(ip(2), fast()).await.acquire(None).await.unwrap();
    match next_event(&mut rx, Duration::from_secs(10)).await {
        Event::PeerAdded(l) => {
            assert_eq!(l.key, b.key);
            assert_eq!(l.attrs.public_ip, ip(2));
        }
        other => panic!("expected PeerAdded, got {other:?}"),
    }
    let key = format!("{}/subnets/{}", env.opts.prefix, b.key);
    let value = env
        .reg
        .client()
        .get(key.as_str(), None)
        .await
        .unwrap()
        .kvs()[0]
        .value()
        .to_vec();
    // Deleted and written again with the same content within the removal grace (as a node
    // re-acquiring its lease does): no event at all, so nothing is removed and re-added.
    let mut client = env.reg.client();
    client.delete(key.as_str(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.put(key.as_str(), value.clone(), None).await.unwrap();
    let quiet = tokio::time::timeout(fast().removal_grace * 2, rx.recv()).await;
    assert!(quiet.is_err(), "a lease back within the grace: {quiet:?}");
    // Deleted for good: reported once the grace has passed.
    let deleted = tokio::time::Instant::now();
    client.delete(key.as_str(), None).await.unwrap();
    match next_event(&mut rx, Duration::from_secs(10)).await {
        Event::PeerRemoved(l) => assert_eq!(l.key, b.key),
        other => panic!("expected PeerRemoved, got {other:?}"),
    }
    assert!(deleted.elapsed() >= fast().removal_grace);
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("manager stops when its consumer goes away")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_own_lease_is_reacquired() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let a = env.node(ip(1), fast()).await;
    let own = a.acquire(None).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let _run = tokio::spawn(a.run(own.clone(), tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.reg
        .client()
        .delete(format!("{}/subnets/{}", env.opts.prefix, own.key), None)
        .await
        .unwrap();
    match next_event(&mut rx, Duration::from_secs(10)).await {
        Event::OwnLease(l) => {
            assert_eq!(l.key, own.key, "the same subnet, since it was free");
            assert_ne!(l.etcd_lease, 0);
        }
        other => panic!("expected OwnLease, got {other:?}"),
    }
    let list = env.reg.list_leases().await.unwrap();
    assert!(list
        .leases
        .iter()
        .any(|l| l.key == own.key && l.attrs.public_ip == ip(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_renewed_by_keepalive_on_the_same_etcd_lease() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    // TTL 4 s renewed 2 s before expiry: without renewal the key would be gone after 4 s.
    let opts = ManagerOptions {
        ttl: Duration::from_secs(4),
        renew_margin: Duration::from_secs(2),
        ..fast()
    };
    let a = env.node(ip(1), opts).await;
    let own = a.acquire(None).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let _run = tokio::spawn(a.run(own.clone(), tx));
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(rx.try_recv(), Ok(Event::PeersListed));
    assert!(
        rx.try_recv().is_err(),
        "no re-acquisition should have happened"
    );
    let list = env.reg.list_leases().await.unwrap();
    let l = list
        .leases
        .iter()
        .find(|l| l.key == own.key)
        .expect("lease kept alive");
    assert_eq!(l.etcd_lease, own.etcd_lease);
    assert_eq!(env.etcd_lease_count().await, 1, "no leaked etcd leases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_the_lease_and_the_peer_view_catches_up() {
    let Some(mut env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let a = env.node(ip(1), fast()).await;
    let own = a.acquire(None).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let _run = tokio::spawn(a.run(own.clone(), tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.etcd.restart();
    // A peer joins after the restart; the watch must resume and report it.
    let b = env.node(ip(2), fast()).await.acquire(None).await.unwrap();
    match next_event(&mut rx, Duration::from_secs(30)).await {
        Event::PeerAdded(l) => assert_eq!(l.key, b.key),
        other => panic!("expected PeerAdded after the etcd restart, got {other:?}"),
    }
    let list = env.reg.list_leases().await.unwrap();
    let mine = list
        .leases
        .iter()
        .find(|l| l.key == own.key)
        .expect("own lease kept");
    assert_eq!(mine.etcd_lease, own.etcd_lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_watch_recovers_by_relisting() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let start = env.reg.list_leases().await.unwrap().revision;
    let mut keys = HashSet::new();
    for i in 1..=5 {
        keys.insert(
            env.node(ip(i), fast())
                .await
                .acquire(None)
                .await
                .unwrap()
                .key,
        );
    }
    let gone = *keys.iter().next().unwrap();
    env.reg
        .client()
        .delete(format!("{}/subnets/{gone}", env.opts.prefix), None)
        .await
        .unwrap();
    keys.remove(&gone);
    let now = env.reg.list_leases().await.unwrap().revision;
    env.reg.client().compact(now, None).await.unwrap();
    // A watcher resuming from before the compaction (it knew no leases then).
    let (tx, mut rx) = mpsc::channel(16);
    let w = LeaseWatcher::resume(env.reg.clone(), Vec::new(), start).with_backoff(Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(200),
    ));
    let _task = tokio::spawn(w.run(tx));
    let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("watcher recovered from compaction")
        .unwrap();
    let added: HashSet<SubnetKey> = batch
        .iter()
        .filter_map(|c| match c {
            subnet_lease::Change::Added(l) => Some(l.key),
            _ => None,
        })
        .collect();
    assert_eq!(added, keys);
    // And it keeps watching from the new revision.
    let late = env.node(ip(9), fast()).await.acquire(None).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(&batch[..], [subnet_lease::Change::Added(l)] if l.key == late.key));
}

#[tokio::test]
async fn tls_files_with_an_http_endpoint_are_refused() {
    let opts = EtcdOptions {
        endpoints: vec!["http://127.0.0.1:1".into()],
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..EtcdOptions::default()
    };
    let err = EtcdLeaseStore::connect(&opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("use https://"), "{err}");
    let opts = EtcdOptions {
        endpoints: vec!["https://127.0.0.1:1".into()],
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..EtcdOptions::default()
    };
    let err = EtcdLeaseStore::connect(&opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--etcd-cafile /nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_changes_the_backend_in_place_and_config_changes_are_watched() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let mut config = env.reg.watch_config().await.unwrap();
    let a = env.node(ip(1), fast()).await;
    let own = a.acquire(None).await.unwrap();
    // A peer watching sees the change as one PeerAdded with the new type.
    let b = env.node(ip(2), fast()).await;
    let b_own = b.acquire(None).await.unwrap();
    let (btx, mut brx) = mpsc::channel(16);
    let _b_run = tokio::spawn(b.run(b_own, btx));
    let (tx, _rx) = mpsc::channel(16);
    let (ctl, control) = mpsc::channel(1);
    let _run = tokio::spawn(a.run_with_control(own.clone(), tx, control));
    // b's first events: a's lease as it is now.
    match next_event(&mut brx, Duration::from_secs(10)).await {
        Event::PeerAdded(l) => assert_eq!(l.attrs.backend_type, "alloc"),
        other => panic!("expected PeerAdded, got {other:?}"),
    }
    let mut attrs = LeaseAttrs::new(ip(1), "vxlan");
    attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}));
    let (done, answer) = tokio::sync::oneshot::channel();
    ctl.send(subnet_lease::Republish {
        attrs: attrs.clone(),
        done,
    })
    .await
    .unwrap();
    let l = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(l.key, own.key, "same subnet");
    assert_eq!(l.etcd_lease, own.etcd_lease, "same etcd lease");
    assert_eq!(l.attrs.backend_type, "vxlan");
    assert_eq!(l.attrs.backend_data, attrs.backend_data);
    match next_event(&mut brx, Duration::from_secs(10)).await {
        Event::PeerAdded(p) => {
            assert_eq!(p.key, own.key);
            assert_eq!(p.attrs.backend_type, "vxlan");
        }
        other => panic!("expected PeerAdded with the new type, got {other:?}"),
    }
    // The config watch reports a rewrite and a deletion.
    let new_conf = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
    env.reg
        .client()
        .put(env.reg.config_key(), new_conf, None)
        .await
        .unwrap();
    env.reg
        .client()
        .delete(env.reg.config_key(), None)
        .await
        .unwrap();
    use futures::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(10), config.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some(new_conf));
    let second = tokio::time::timeout(Duration::from_secs(10), config.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second, None);
}

/// One of two endpoints is dead (nothing listens; a name that does not resolve): every call
/// still succeeds, as the balancer only uses the member that answers; when a member answers
/// again it is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_among_several_does_not_fail_calls() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let dead = format!("http://127.0.0.1:{}", test_support::free_port());
    let opts = EtcdOptions {
        endpoints: vec![
            dead.clone(),
            etcd.endpoint(),
            "http://no-such-member.invalid:2379".into(),
        ],
        prefix: format!("/test-{}/network", random_tag(6)),
        timeout: Duration::from_secs(3),
        ..EtcdOptions::default()
    };
    let reg = EtcdLeaseStore::connect(&opts).await.unwrap();
    for i in 0..60 {
        reg.list_leases()
            .await
            .unwrap_or_else(|e| panic!("call {i} failed with a dead endpoint present: {e}"));
    }
    // Only the live member left answering and then down: calls fail (nothing to balance to),
    // and work again once it is back, without a new client.
    etcd.stop();
    assert!(reg.list_leases().await.is_err());
    etcd.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reg.list_leases().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no call succeeded in 20 s after etcd came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..30 {
        reg.list_leases()
            .await
            .unwrap_or_else(|e| panic!("call {i} after the restart failed: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_lease_outside_a_changed_network_is_kept_unless_released() {
    let Some(env) = Env::start(r#"{"Network":"10.5.0.0/16"}"#).await else {
        return;
    };
    let old = env.node(ip(1), fast()).await.acquire(None).await.unwrap();
    // The same node under a config whose Network no longer holds its lease.
    let changed = config::parse(r#"{"Network":"10.6.0.0/16"}"#)
        .unwrap()
        .config;
    let node = |opts: ManagerOptions| {
        LeaseManager::new(
            env.reg.clone(),
            changed.clone(),
            LeaseAttrs::new(ip(1), "alloc"),
            opts,
        )
    };
    let e = node(fast()).acquire(Some(old.key)).await.unwrap_err();
    assert!(
        matches!(&e, subnet_lease::manager::LeaseError::OutsideNetwork { leases, .. } if leases == &vec![old.key]),
        "{e}"
    );
    assert!(!e.is_transient());
    let keys = |l: subnet_lease::store::LeaseList| -> Vec<SubnetKey> {
        l.leases.into_iter().map(|l| l.key).collect()
    };
    assert_eq!(keys(env.reg.list_leases().await.unwrap()), vec![old.key]);
    // Released deliberately: the old lease goes, one in the new Network comes.
    let opts = ManagerOptions {
        release_stale_leases: true,
        ..fast()
    };
    let new = node(opts).acquire(Some(old.key)).await.unwrap();
    assert!(changed.fits_v4(new.key.ipv4.unwrap()), "{}", new.key);
    assert_eq!(keys(env.reg.list_leases().await.unwrap()), vec![new.key]);
}

/// An IPv6 etcd endpoint (`http://[::1]:PORT`), as an IPv6-only cluster gives flanneld: the
/// connection, a config read and a lease written through it.
#[tokio::test]
async fn an_ipv6_endpoint_in_brackets_works() {
    let Some(etcd) = Etcd::start_ipv6() else {
        return;
    };
    let ep = etcd.endpoint();
    assert!(ep.starts_with("http://[::1]:"), "{ep}");
    let opts = EtcdOptions {
        endpoints: vec![ep],
        prefix: format!("/test-{}/network", random_tag(6)),
        timeout: Duration::from_secs(3),
        ..EtcdOptions::default()
    };
    let reg = EtcdLeaseStore::connect(&opts).await.unwrap();
    reg.client()
        .put(
            reg.config_key(),
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
            None,
        )
        .await
        .unwrap();
    assert!(reg.get_config().await.unwrap().is_some());
    let text = reg.get_config().await.unwrap().unwrap();
    let cfg = config::parse(&text).unwrap().config;
    let mgr = LeaseManager::new(
        reg,
        cfg,
        LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1), "alloc"),
        fast(),
    );
    let lease = mgr.acquire(None).await.unwrap();
    assert!(lease.key.ipv4.unwrap().prefix_len() == 24, "{lease:?}");
}

/// IPv6-only nodes (all publishing `"PublicIP":"0.0.0.0"`) each get their own `0.0.0.0-0&…`
/// key in a real etcd, and a restarted one finds its own lease by PublicIPv6 (flannel would
/// hand the first node's lease to the second: it compares PublicIP only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_nodes_hold_distinct_leases_found_by_public_ipv6() {
    let Some(env) =
        Env::start(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48"}"#).await
    else {
        return;
    };
    let node = |i: u16| {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, "alloc");
        attrs.public_ipv6 = Some(std::net::Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, i));
        let opts = env.opts.clone();
        async move {
            let reg = EtcdLeaseStore::connect(&opts).await.unwrap();
            let text = reg.get_config().await.unwrap().unwrap();
            let cfg = config::parse(&text).unwrap().config;
            LeaseManager::new(reg, cfg, attrs, fast())
        }
    };
    let first = node(1).await.acquire(None).await.unwrap();
    let second = node(2).await.acquire(None).await.unwrap();
    assert_eq!(first.key.ipv4, None);
    assert_ne!(first.key, second.key);
    assert!(
        first.key.to_string().starts_with("0.0.0.0-0&fd10:0:0:"),
        "{}",
        first.key
    );
    let again = node(1).await.acquire(None).await.unwrap();
    assert_eq!(again.key, first.key);
    assert_eq!(again.etcd_lease, first.etcd_lease);
    let resp = env
        .reg
        .client()
        .get(format!("{}/subnets/{}", env.opts.prefix, second.key), None)
        .await
        .unwrap();
    let value = String::from_utf8_lossy(resp.kvs()[0].value()).into_owned();
    assert_eq!(
        value,
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:210::2","BackendType":"alloc"}"#
    );
    // Both are listed back with their IPv6-only keys.
    let list = env.reg.list_leases().await.unwrap();
    assert_eq!(list.leases.len(), 2, "{:?}", list.leases);
}
