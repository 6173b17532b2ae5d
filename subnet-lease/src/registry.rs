//! The etcd edge: a small trait with the operations the lease manager needs, and its etcd v3
//! implementation. Every call is bounded in time and counted (etcd round trips).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use futures::{Stream, StreamExt};

use crate::lease::{Lease, LeaseAttrs, SubnetKey};

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("etcd TLS: {0}")]
    Tls(String),
    #[error("etcd endpoint {endpoint:?}: {msg}")]
    Endpoint { endpoint: String, msg: String },
    /// A call about one key failed; `source` says how.
    #[error("{source} (key {key})")]
    Key {
        key: String,
        source: Box<RegistryError>,
    },
}

impl RegistryError {
    /// Whether retrying later may help (etcd unreachable or slow) rather than a setup error.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Etcd { .. } | RegistryError::Timeout { .. } => true,
            RegistryError::Key { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// Whether etcd answered that the etcd lease named in the call does not exist (it expired
    /// or was revoked).
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            // A put or grant names it in a gRPC status ("etcdserver: requested lease not
            // found"); etcd-client's keep-alive reports a TTL of 0 as its own error.
            RegistryError::Etcd { source, .. } => match source {
                etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
                etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
                _ => false,
            },
            RegistryError::Key { source, .. } => source.is_lease_not_found(),
            _ => false,
        }
    }

    /// This error with the key it was about.
    pub fn for_key(self, key: impl Into<String>) -> RegistryError {
        RegistryError::Key {
            key: key.into(),
            source: Box::new(self),
        }
    }
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

/// An etcd password. Its `Debug` output is redacted, so it never reaches a log line or an
/// error message through `{:?}` of the options or flags that carry it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for the one place that sends it to etcd.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl std::str::FromStr for Password {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Password(s.to_string()))
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Self {
        Password(s.to_string())
    }
}

/// How to reach etcd: flannel's flags.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Password>,
    /// Bound on every single call.
    pub timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd v3 registry.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    timeout: Duration,
    round_trips: Arc<AtomicU64>,
    /// With several endpoints: keeps the balancer on the members that answer.
    _keeper: Option<Arc<crate::endpoints::Keeper>>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Tls(format!("{what} {}: {e}", path.display())))
}

impl EtcdRegistry {
    /// Builds a client. Connections are made lazily, so this succeeds while etcd is down;
    /// configuration mistakes (bad URLs, unreadable certificates, TLS flags with http://
    /// endpoints) fail here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let tls_wanted =
            opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
        for ep in &opts.endpoints {
            let bad = |msg: &str| RegistryError::Endpoint {
                endpoint: ep.clone(),
                msg: msg.to_string(),
            };
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(bad("must start with http:// or https://"));
            }
            // flannel quietly talks plain text to http:// endpoints even when given a CA file.
            // Refuse instead: a CA (or client certificate) means the user wants TLS.
            if tls_wanted && ep.starts_with("http://") {
                return Err(bad(
                    "TLS files (--etcd-cafile/--etcd-certfile/--etcd-keyfile) are set: use https:// so the connection is encrypted",
                ));
            }
        }
        if opts.endpoints.is_empty() {
            return Err(RegistryError::Endpoint {
                endpoint: String::new(),
                msg: "no etcd endpoints given".into(),
            });
        }
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if tls_wanted {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read_file(
                    ca,
                    "--etcd-cafile",
                )?));
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read_file(c, "--etcd-certfile")?,
                        read_file(k, "--etcd-keyfile")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(RegistryError::Tls(
                        "--etcd-certfile and --etcd-keyfile must be given together".into(),
                    ))
                }
            }
            co = co.with_tls(tls);
        }
        if let Some(user) = &opts.username {
            co = co.with_user(
                user.clone(),
                opts.password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .unwrap_or_default(),
            );
        }
        if opts.password.is_some() {
            // etcd's authentication sends the password in clear over http://.
            for ep in opts.endpoints.iter().filter(|e| e.starts_with("http://")) {
                tracing::warn!(
                    endpoint = %ep,
                    "an etcd password is set but the endpoint is plain http://: the password crosses the network unencrypted (use https://)"
                );
            }
        }
        let probe_options = co.clone();
        // With a user, connect() authenticates at once, so it is bounded too.
        let client = tokio::time::timeout(
            opts.timeout * 2,
            Client::connect(opts.endpoints.clone(), Some(co)),
        )
        .await
        .map_err(|_| RegistryError::Timeout {
            op: "connect",
            timeout: opts.timeout * 2,
        })?
        .map_err(|source| RegistryError::Etcd {
            op: "connect",
            source,
        })?;
        let keeper = crate::endpoints::keep(
            &client,
            &opts.endpoints,
            probe_options,
            opts.timeout.min(Duration::from_secs(3)),
        )
        .await;
        Ok(EtcdRegistry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            timeout: opts.timeout,
            round_trips: Arc::new(AtomicU64::new(0)),
            _keeper: keeper,
        })
    }

    /// etcd round trips made so far by this registry and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The etcd prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix())
    }

    /// The etcd client, for tests and tools that need raw access.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub(crate) async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, RegistryError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(RegistryError::Timeout {
                op,
                timeout: self.timeout,
            }),
            Ok(r) => r.map_err(|source| RegistryError::Etcd { op, source }),
        }
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
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
        let resp = self
            .call("get config", c.get(self.config_key(), None))
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        Ok(self
            .call("lease grant", c.lease_grant(ttl_secs, None))
            .await?
            .id())
    }

    async fn revoke(&self, etcd_lease: i64) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_debug_output_hides_the_password() {
        let opts = EtcdOptions {
            username: Some("root".into()),
            password: Some(Password::new("hunter2-secret")),
            ..EtcdOptions::default()
        };
        let shown = format!("{opts:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("root"), "{shown}");
        assert_eq!(
            opts.password.as_ref().map(Password::expose),
            Some("hunter2-secret")
        );
    }
}
