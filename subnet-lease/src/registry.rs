//! The etcd edge: a small trait with the operations the lease manager needs, and its etcd v3
//! implementation over an [`etcd_access::Connection`] (every call bounded in time and counted).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use etcd_access::{
    Connection, EtcdError as RegistryError, EtcdOptions, Password, DEFAULT_PREFIX,
};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::{Stream, StreamExt};

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

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, RegistryError>> + Send>>;

/// What the lease manager needs from a store.
pub trait Registry: Clone + Send + Sync + 'static {
    /// The raw network config text, if set.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, RegistryError>> + Send;
    /// Every lease and the revision of the read.
    fn list_leases(&self) -> impl Future<Output = Result<LeaseList, RegistryError>> + Send;
    /// Grants an etcd lease of `ttl`; returns its id.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<i64, RegistryError>> + Send;
    /// Revokes an etcd lease (and deletes the keys bound to it).
    fn revoke(&self, etcd_lease: i64) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// Creates `key` bound to `etcd_lease`, only if the key does not exist (one txn).
    /// Returns false when someone else holds the key.
    fn create_lease(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Rewrites an existing lease's attributes, keeping its etcd lease (or lack of one), only if
    /// the key is unchanged since it was read. Returns false if it changed.
    fn update_lease(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Deletes a lease only if unchanged since it was read. Returns false if it changed.
    fn delete_lease(
        &self,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// One keep-alive of an etcd lease. Returns its new TTL, or None if the lease is gone.
    fn renew(
        &self,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<Option<Duration>, RegistryError>> + Send;
    /// Watches lease keys from `start_revision` (inclusive).
    fn watch_leases(
        &self,
        start_revision: i64,
    ) -> impl Future<Output = Result<WatchStream, RegistryError>> + Send;
}

/// The lease store on etcd v3: flannel's keys under the connection's prefix.
#[derive(Clone, Debug)]
pub struct EtcdRegistry {
    conn: Connection,
}

impl EtcdRegistry {
    /// Connects (see [`Connection::connect`]): lazily, so this succeeds while etcd is down;
    /// configuration mistakes (bad URLs, unreadable certificates, TLS flags with http://
    /// endpoints) fail here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        Ok(EtcdRegistry {
            conn: Connection::connect(opts).await?,
        })
    }

    /// A lease store over an existing connection.
    pub fn new(conn: Connection) -> Self {
        EtcdRegistry { conn }
    }

    /// The connection underneath (shared by clones).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// etcd round trips made so far by this registry and its clones.
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }

    /// The etcd prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        self.conn.prefix()
    }

    pub fn config_key(&self) -> String {
        config_key(self.prefix())
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix())
    }

    fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix())
    }

    /// The etcd client, for tests and tools that need raw access.
    pub fn client(&self) -> Client {
        self.conn.client()
    }

    pub(crate) async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, RegistryError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.conn.call(op, fut).await
    }

    fn decode(&self, kv: &KeyValue) -> Result<Lease, String> {
        let key = String::from_utf8_lossy(kv.key());
        let name = key
            .strip_prefix(&self.subnets_prefix())
            .ok_or_else(|| "outside the subnets prefix".to_string())?;
        let subnet = SubnetKey::parse(name).map_err(|e| e.to_string())?;
        let attrs: LeaseAttrs =
            serde_json::from_slice(kv.value()).map_err(|e| format!("bad lease JSON: {e}"))?;
        Ok(Lease {
            key: subnet,
            attrs,
            etcd_lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        })
    }

    fn decode_key(&self, raw: &[u8]) -> Option<SubnetKey> {
        let key = String::from_utf8_lossy(raw);
        SubnetKey::parse(key.strip_prefix(&self.subnets_prefix())?).ok()
    }
}

/// Changes of the network config key: the new text, or None when the key was deleted.
pub type ConfigStream = Pin<Box<dyn Stream<Item = Result<Option<String>, RegistryError>> + Send>>;

impl EtcdRegistry {
    /// Watches `<prefix>/config` from now on. The stream ends or errs when the watch breaks;
    /// the caller re-reads the key and watches again.
    pub async fn watch_config(&self) -> Result<ConfigStream, RegistryError> {
        let mut c = self.conn.client();
        let stream = self
            .call("watch config", c.watch(self.config_key(), None))
            .await?;
        let mapped = stream.flat_map(|item| {
            let out: Vec<Result<Option<String>, RegistryError>> = match item {
                Err(source) => vec![Err(RegistryError::Etcd {
                    op: "watch config",
                    source,
                })],
                Ok(resp) => resp
                    .events()
                    .iter()
                    .filter_map(|ev| {
                        let kv = ev.kv()?;
                        Some(Ok(match ev.event_type() {
                            EventType::Put => {
                                Some(String::from_utf8_lossy(kv.value()).into_owned())
                            }
                            EventType::Delete => None,
                        }))
                    })
                    .collect(),
            };
            futures::stream::iter(out)
        });
        Ok(Box::pin(mapped))
    }
}

impl Registry for EtcdRegistry {
    async fn get_config(&self) -> Result<Option<String>, RegistryError> {
        let mut c = self.conn.client();
        let resp = self
            .call("get config", c.get(self.config_key(), None))
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
        let mut c = self.conn.client();
        let resp = self
            .call(
                "list leases",
                c.get(self.subnets_prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut out = LeaseList {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..LeaseList::default()
        };
        for kv in resp.kvs() {
            match self.decode(kv) {
                Ok(l) => out.leases.push(l),
                Err(e) => out
                    .invalid
                    .push((String::from_utf8_lossy(kv.key()).into_owned(), e)),
            }
        }
        Ok(out)
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let mut c = self.conn.client();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        Ok(self
            .call("lease grant", c.lease_grant(ttl_secs, None))
            .await?
            .id())
    }

    async fn revoke(&self, etcd_lease: i64) -> Result<(), RegistryError> {
        let mut c = self.conn.client();
        self.call("lease revoke", c.lease_revoke(etcd_lease))
            .await
            .map(|_| ())
    }

    async fn create_lease(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<bool, RegistryError> {
        let mut c = self.conn.client();
        let k = self.lease_key(&key);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k,
                attrs.to_json(),
                Some(PutOptions::new().with_lease(etcd_lease)),
            )]);
        Ok(self.call("create lease", c.txn(txn)).await?.succeeded())
    }

    async fn update_lease(&self, lease: &Lease, attrs: &LeaseAttrs) -> Result<bool, RegistryError> {
        let mut c = self.conn.client();
        let k = self.lease_key(&lease.key);
        let put_opts =
            (!lease.is_reservation()).then(|| PutOptions::new().with_lease(lease.etcd_lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                lease.mod_revision,
            )])
            .and_then([TxnOp::put(k, attrs.to_json(), put_opts)]);
        Ok(self.call("update lease", c.txn(txn)).await?.succeeded())
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<bool, RegistryError> {
        let mut c = self.conn.client();
        let k = self.lease_key(&lease.key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                lease.mod_revision,
            )])
            .and_then([TxnOp::delete(k, None)]);
        Ok(self.call("delete lease", c.txn(txn)).await?.succeeded())
    }

    async fn renew(&self, etcd_lease: i64) -> Result<Option<Duration>, RegistryError> {
        let mut c = self.conn.client();
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(etcd_lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let resp = match self.call("lease keep-alive", fut).await {
            // etcd-client answers a TTL of 0 (no such lease) with an error: that is "gone".
            Err(e) if e.is_lease_not_found() => return Ok(None),
            r => r?,
        };
        Ok(match resp {
            Some(r) if r.ttl() > 0 => Some(Duration::from_secs(r.ttl() as u64)),
            _ => None,
        })
    }

    async fn watch_leases(&self, start_revision: i64) -> Result<WatchStream, RegistryError> {
        let mut c = self.conn.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_progress_notify();
        let stream = self
            .call("watch", c.watch(self.subnets_prefix(), Some(opts)))
            .await?;
        let this = self.clone();
        let mapped = stream.map(move |item| {
            let resp = item.map_err(|source| RegistryError::Etcd {
                op: "watch",
                source,
            })?;
            if resp.canceled() {
                let reason = if resp.compact_revision() > 0 {
                    format!(
                        "revision compacted (oldest available {})",
                        resp.compact_revision()
                    )
                } else {
                    format!("watch cancelled: {}", resp.cancel_reason())
                };
                return Ok(WatchBatch::Lost { reason });
            }
            // Events carry their own revision; an empty answer that is not the creation notice
            // is a progress notification, which etcd only sends once everything before the
            // header's revision was delivered.
            let mut revision = if resp.created() {
                None
            } else {
                resp.header().map(|h| h.revision())
            };
            let mut events = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                revision = Some(kv.mod_revision());
                match ev.event_type() {
                    EventType::Put => match this.decode(kv) {
                        Ok(l) => events.push(KeyEvent::Put(Box::new(l))),
                        Err(e) => tracing::warn!(
                            key = %String::from_utf8_lossy(kv.key()),
                            "ignoring invalid lease: {e}"
                        ),
                    },
                    EventType::Delete => {
                        if let Some(k) = this.decode_key(kv.key()) {
                            events.push(KeyEvent::Delete(k));
                        }
                    }
                }
            }
            Ok(WatchBatch::Events { events, revision })
        });
        Ok(Box::pin(mapped))
    }
}
