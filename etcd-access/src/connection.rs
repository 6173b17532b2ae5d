//! Connecting: endpoints checked (http/https, TLS files require https), TLS and user/password
//! applied, the first member probe round done; then every call bounded in time and counted.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::{EtcdError, EtcdOptions};

/// A connection to etcd (cheap to clone; clones share the client, the call counter and the
/// member keeper).
#[derive(Clone)]
pub struct Connection {
    client: Client,
    prefix: String,
    timeout: Duration,
    round_trips: Arc<AtomicU64>,
    /// With several endpoints: keeps the balancer on the members that answer.
    _keeper: Option<Arc<crate::endpoints::Keeper>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::Tls(format!("{what} {}: {e}", path.display())))
}

impl Connection {
    /// Builds a client. Connections are made lazily, so this succeeds while etcd is down;
    /// configuration mistakes (bad URLs, unreadable certificates, TLS flags with http://
    /// endpoints) fail here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, EtcdError> {
        let tls_wanted =
            opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
        for ep in &opts.endpoints {
            let bad = |msg: &str| EtcdError::Endpoint {
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
            return Err(EtcdError::Endpoint {
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
                    return Err(EtcdError::Tls(
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
        .map_err(|_| EtcdError::Timeout {
            op: "connect",
            timeout: opts.timeout * 2,
        })?
        .map_err(|source| EtcdError::Etcd {
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
        Ok(Connection {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            timeout: opts.timeout,
            round_trips: Arc::new(AtomicU64::new(0)),
            _keeper: keeper,
        })
    }

    /// etcd round trips made so far by this connection and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The etcd prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd client, for tests and tools that need raw access.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd call bounded by the connection's timeout, counted as a round trip;
    /// errors name `op`.
    pub async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(EtcdError::Timeout {
                op,
                timeout: self.timeout,
            }),
            Ok(r) => r.map_err(|source| EtcdError::Etcd { op, source }),
        }
    }

    /// The bound on every single call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Grants an etcd lease of `ttl` (at least 1 s); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let mut c = self.client();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        Ok(self
            .call("lease grant", c.lease_grant(ttl_secs, None))
            .await?
            .id())
    }

    /// One keep-alive of an etcd lease: its new TTL, or None when the lease is gone (expired
    /// or revoked).
    pub async fn keep_alive_once(&self, etcd_lease: i64) -> Result<Option<Duration>, EtcdError> {
        let mut c = self.client();
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
}
