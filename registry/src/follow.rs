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

/// One followed key, read for a follower ([`KeyReader::read`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A registry object of a kind the follower reads, by (namespace, name); cluster-scoped
    /// objects have an empty namespace. `object` is `None` when the key was deleted or its
    /// value was rejected (`rejected`: logged already, the follower counts it).
    Object {
        kind: crate::Kind,
        key: (String, String),
        object: Option<crate::Object>,
        rejected: bool,
    },
    /// A pod's attachment record under `<prefix>/pods/<namespace>/<name>`; `None` when
    /// deleted or not decodable (`rejected`).
    Record {
        key: (String, String),
        record: Option<crate::PodRecord>,
        rejected: bool,
    },
    /// A key the follower does not read.
    Ignored,
}

impl Update {
    /// Whether the value was refused (it is treated as absent); followers count these.
    pub fn rejected(&self) -> bool {
        matches!(
            self,
            Update::Object { rejected: true, .. } | Update::Record { rejected: true, .. }
        )
    }
}

/// Turns followed keys into typed updates for one follower: the registry objects of the
/// kinds it reads, decoded and checked ([`checked_object`]), and (if asked) the pods'
/// attachment records. What every follower (service proxy, network policy, cluster DNS,
/// ingress) used to do by hand, so that each only keeps what it needs from the updates.
#[derive(Debug, Clone)]
pub struct KeyReader {
    prefix: String,
    registry_prefix: String,
    pods_prefix: String,
    kinds: &'static [crate::Kind],
    records: bool,
    /// The follower's name in log lines (`service proxy`, `cluster DNS`).
    name: &'static str,
}

impl KeyReader {
    /// A reader of `kinds` under `prefix`; `records`: the pods' attachment records too.
    pub fn new(
        prefix: &str,
        name: &'static str,
        kinds: &'static [crate::Kind],
        records: bool,
    ) -> KeyReader {
        KeyReader {
            prefix: prefix.to_string(),
            registry_prefix: crate::registry_prefix(prefix),
            pods_prefix: crate::pods::pods_prefix(prefix),
            kinds,
            records,
            name,
        }
    }

    /// One key's new value (`None`: deleted). A value that does not decode or breaks the API
    /// server's rules is logged and comes back as absent with `rejected` set.
    pub fn read(&self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> Update {
        if key.starts_with(&self.registry_prefix) {
            let Some((kind, ns, name)) = crate::parse_key(&self.prefix, key) else {
                return Update::Ignored;
            };
            if !self.kinds.contains(&kind) {
                return Update::Ignored;
            }
            let mut rejected = false;
            let object =
                value.and_then(
                    |v| match checked_object(&self.prefix, key, v, mod_revision) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            tracing::warn!(key, "{}: {e}", self.name);
                            rejected = true;
                            None
                        }
                    },
                );
            Update::Object {
                kind,
                key: (ns.unwrap_or_default(), name),
                object,
                rejected,
            }
        } else if self.records && key.starts_with(&self.pods_prefix) {
            let Ok((ns, name)) = crate::pods::parse_pod_key(&self.prefix, key) else {
                return Update::Ignored;
            };
            let mut rejected = false;
            let record = value.and_then(|v| {
                match serde_json::from_slice::<crate::PodRecord>(v) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "{}: ignoring a pod record that does not decode", self.name);
                        rejected = true;
                        None
                    }
                }
            });
            Update::Record {
                key: (ns.to_string(), name.to_string()),
                record,
                rejected,
            }
        } else {
            Update::Ignored
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Kind;

    const PREFIX: &str = "/coreos.com/network";

    fn key_of(obj: &crate::Object) -> String {
        let m = obj.metadata();
        crate::object_key(PREFIX, obj.kind(), m.namespace.as_deref(), &m.name)
    }

    fn service() -> crate::Object {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
        let obj = crate::parse_documents(yaml).unwrap().remove(0);
        crate::store::normalize(obj, None).unwrap()
    }

    #[test]
    fn objects_of_the_read_kinds_come_back_typed_others_are_ignored() {
        let r = KeyReader::new(PREFIX, "test", &[Kind::Service], false);
        let svc = service();
        let key = key_of(&svc);
        let value = crate::to_json(&svc).to_string();
        match r.read(&key, Some(value.as_bytes()), 7) {
            Update::Object {
                kind: Kind::Service,
                key: (ns, name),
                object: Some(crate::Object::Service(s)),
                rejected: false,
            } => {
                assert_eq!((ns.as_str(), name.as_str()), ("shop", "web"));
                assert_eq!(s.metadata.name, "web");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Deleted: the key, no object, not a rejection.
        assert_eq!(
            r.read(&key, None, 8),
            Update::Object {
                kind: Kind::Service,
                key: ("shop".into(), "web".into()),
                object: None,
                rejected: false,
            }
        );
        // A kind the follower does not read, a foreign key, pod records when not asked for.
        let only_pods = KeyReader::new(PREFIX, "test", &[Kind::Pod], false);
        assert_eq!(
            only_pods.read(&key, Some(value.as_bytes()), 7),
            Update::Ignored
        );
        assert_eq!(r.read("/elsewhere/x", Some(b"{}"), 7), Update::Ignored);
        let rec_key = format!("{}shop/web-1", crate::pods::pods_prefix(PREFIX));
        assert_eq!(r.read(&rec_key, Some(b"{}"), 7), Update::Ignored);
    }

    #[test]
    fn values_that_do_not_decode_or_validate_are_rejected_as_absent() {
        let r = KeyReader::new(PREFIX, "test", &[Kind::Service], true);
        let svc = service();
        let key = key_of(&svc);
        let u = r.read(&key, Some(b"{not json"), 3);
        assert!(u.rejected());
        assert!(matches!(u, Update::Object { object: None, .. }));
        // Decodes, but breaks the API server's rules (a port out of range).
        let bad = crate::to_json(&svc)
            .to_string()
            .replace("\"port\":80", "\"port\":70000");
        assert_ne!(bad, crate::to_json(&svc).to_string());
        assert!(r.read(&key, Some(bad.as_bytes()), 3).rejected());

        let rec_key = format!("{}shop/web-1", crate::pods::pods_prefix(PREFIX));
        let u = r.read(&rec_key, Some(b"[1,2]"), 3);
        assert!(u.rejected());
        assert_eq!(
            u,
            Update::Record {
                key: ("shop".into(), "web-1".into()),
                record: None,
                rejected: true,
            }
        );
        assert!(!r.read(&rec_key, None, 4).rejected());
    }
}
