//! Following everything under the etcd prefix (registry objects, pod records) to keep a data
//! plane in step: list, watch from the next revision (re-list when the watch loses history or
//! fails, with backoff), gather a burst of changes, sync, retry a failed sync after 1 s, and
//! check the data plane periodically. The service proxy and the policy module both run on it.

use std::future::Future;
use std::time::Duration;

use etcd_access::Connection;
use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponse};
use futures::StreamExt;
use ipnet::Ipv4Net;
use tokio::sync::watch;

/// Why a followed value is ignored.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("ignoring an object that does not decode: {0}")]
    Decode(#[from] crate::DecodeError),
    #[error("ignoring an invalid object: {0}")]
    Invalid(#[from] crate::ValidationErrors),
}

/// The object a followed registry value holds, decoded ([`crate::decode`]) and valid by the
/// API server's rules ([`crate::validate`]). flannelctl validates what it writes; anything
/// else that reaches etcd is checked here, so whoever can write one key cannot break a data
/// plane or put text of their choosing in it. Followers log and count a rejection and treat
/// the value as absent.
pub fn checked_object(
    prefix: &str,
    key: &str,
    value: &[u8],
    mod_revision: i64,
) -> Result<crate::Object, Rejected> {
    let o = crate::decode(prefix, key, value, mod_revision)?;
    // The registry that stored the object checked its ClusterIPs against the configured
    // service networks; a follower does not know them, so an address of either family passes
    // that one rule (every other rule of the API server applies).
    let any = crate::ServiceNetworks {
        v4: Some(Ipv4Net::default()),
        v6: Some(ipnet::Ipv6Net::default()),
    };
    crate::validate(&o, any)?;
    Ok(o)
}

/// What a follower does with the keys and when to touch its data plane.
pub trait Follower {
    /// Why a sync failed (logged with its causes, then retried).
    type Error: std::error::Error;

    /// Forget every key (a full list follows).
    fn clear(&mut self);
    /// One key's new value (`None`: deleted); returns whether anything used changed.
    fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool;
    /// Called after every full list, before the sync that follows it.
    fn relisted(&mut self) {}
    /// Brings the data plane to the current keys; an error is retried in 1 s.
    fn sync(&mut self) -> impl Future<Output = Result<(), Self::Error>>;
    /// The periodic check: `false` when the data plane must be written again (the follower
    /// has already forgotten what it holds).
    fn check(&mut self) -> impl Future<Output = bool>;
}

#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// For the log lines (`service proxy`, `network policy`).
    pub name: &'static str,
    /// How long to wait for more changes after one arrives before syncing.
    pub debounce: Duration,
    /// How often to run [`Follower::check`].
    pub check_interval: Duration,
}

fn apply_events<F: Follower>(f: &mut F, resp: &WatchResponse) -> bool {
    let mut changed = false;
    for ev in resp.events() {
        if let Some(kv) = ev.kv() {
            let key = kv.key_str().unwrap_or_default();
            let value = (ev.event_type() == EventType::Put).then(|| kv.value());
            changed |= f.apply(key, value, kv.mod_revision());
        }
    }
    changed
}

async fn list<F: Follower>(reg: &Connection, f: &mut F) -> Result<i64, etcd_client::Error> {
    let resp = reg
        .client()
        .get(
            format!("{}/", reg.prefix()),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    f.clear();
    for kv in resp.kvs() {
        if let Ok(key) = kv.key_str() {
            f.apply(key, Some(kv.value()), kv.mod_revision());
        }
    }
    Ok(revision)
}

/// Runs `f` until `stop` turns true.
pub async fn follow<F: Follower>(
    reg: &Connection,
    opts: &FollowOptions,
    f: &mut F,
    stop: &mut watch::Receiver<bool>,
) {
    let name = opts.name;
    let mut backoff = Duration::from_millis(200);
    'outer: loop {
        if *stop.borrow() {
            break;
        }
        let revision = match list(reg, f).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "{name}: listing etcd failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break 'outer,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        f.relisted();
        let mut dirty = true;
        let mut c = reg.client();
        let wopts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = match c.watch(format!("{}/", reg.prefix()), Some(wopts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{name}: watch failed; re-listing");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break 'outer,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let mut check = tokio::time::interval(opts.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if dirty {
                // Gather the rest of a burst before syncing.
                let deadline = tokio::time::sleep(opts.debounce);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        item = stream.next() => match item {
                            Some(Ok(resp)) => {
                                if resp.canceled() {
                                    continue 'outer;
                                }
                                apply_events(f, &resp);
                            }
                            _ => continue 'outer,
                        },
                    }
                }
                match f.sync().await {
                    Ok(()) => {
                        dirty = false;
                        retry_at = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{name} sync failed; full resync in 1 s");
                        retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => break 'outer,
                _ = retry => { dirty = true; }
                _ = check.tick() => {
                    if !f.check().await {
                        tracing::warn!("{name} table missing; rebuilding it");
                        dirty = true;
                    }
                }
                item = stream.next() => match item {
                    Some(Ok(resp)) => {
                        if resp.canceled() {
                            tracing::info!("{name} watch lost history; re-listing");
                            continue 'outer;
                        }
                        dirty |= apply_events(f, &resp);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "{name} watch failed; re-listing");
                        continue 'outer;
                    }
                    None => continue 'outer,
                },
            }
        }
    }
}
