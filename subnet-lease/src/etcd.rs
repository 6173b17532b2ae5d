//! The lease store on etcd v3 ([`EtcdLeaseStore`]), over an [`etcd_access::Connection`] (every
//! call bounded in time and counted).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use etcd_access::{Connection, EtcdError, EtcdOptions, Password};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::{Stream, StreamExt};

use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::store::{config_key, KeyEvent, LeaseList, LeaseStore, WatchBatch, WatchStream};

/// The lease store on etcd v3: flannel's keys under the connection's prefix.
#[derive(Clone, Debug)]
pub struct EtcdLeaseStore {
    conn: Connection,
}

impl EtcdLeaseStore {
    /// Connects (see [`Connection::connect`]): lazily, so this succeeds while etcd is down;
    /// configuration mistakes (bad URLs, unreadable certificates, TLS flags with http://
    /// endpoints) fail here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, EtcdError> {
        Ok(EtcdLeaseStore {
            conn: Connection::connect(opts).await?,
        })
    }

    /// A lease store over an existing connection.
    pub fn new(conn: Connection) -> Self {
        EtcdLeaseStore { conn }
    }

    /// The connection underneath (shared by clones).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// etcd round trips made so far by this store and its clones.
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

    pub(crate) async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, EtcdError>
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
pub type ConfigStream = Pin<Box<dyn Stream<Item = Result<Option<String>, EtcdError>> + Send>>;

impl EtcdLeaseStore {
    /// Watches `<prefix>/config` from now on. The stream ends or errs when the watch breaks;
    /// the caller re-reads the key and watches again.
    pub async fn watch_config(&self) -> Result<ConfigStream, EtcdError> {
        let mut c = self.conn.client();
        let stream = self
            .call("watch config", c.watch(self.config_key(), None))
            .await?;
        let mapped = stream.flat_map(|item| {
            let out: Vec<Result<Option<String>, EtcdError>> = match item {
                Err(source) => vec![Err(EtcdError::Etcd {
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

impl LeaseStore for EtcdLeaseStore {
    async fn get_config(&self) -> Result<Option<String>, EtcdError> {
        let mut c = self.conn.client();
        let resp = self
            .call("get config", c.get(self.config_key(), None))
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list_leases(&self) -> Result<LeaseList, EtcdError> {
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

    async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        self.conn.grant(ttl).await
    }

    async fn revoke(&self, etcd_lease: i64) -> Result<(), EtcdError> {
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
    ) -> Result<Option<i64>, EtcdError> {
        let mut c = self.conn.client();
        let k = self.lease_key(&key);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k,
                attrs.to_json(),
                Some(PutOptions::new().with_lease(etcd_lease)),
            )]);
        let resp = self.call("create lease", c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
    ) -> Result<Option<i64>, EtcdError> {
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
        let resp = self.call("update lease", c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<bool, EtcdError> {
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

    async fn renew(&self, etcd_lease: i64) -> Result<Option<Duration>, EtcdError> {
        self.conn.keep_alive_once(etcd_lease).await
    }

    async fn watch_leases(&self, start_revision: i64) -> Result<WatchStream, EtcdError> {
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
            let resp = item.map_err(|source| EtcdError::Etcd {
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
