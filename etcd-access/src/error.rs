//! What can go wrong talking to etcd, with the cause kept.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
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
    Key { key: String, source: Box<EtcdError> },
}

impl EtcdError {
    /// Whether retrying later may help (etcd unreachable or slow) rather than a setup error.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::Etcd { .. } | EtcdError::Timeout { .. } => true,
            EtcdError::Key { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// Whether etcd answered that the etcd lease named in the call does not exist (it expired
    /// or was revoked).
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            // A put or grant names it in a gRPC status ("etcdserver: requested lease not
            // found"); etcd-client's keep-alive reports a TTL of 0 as its own error.
            EtcdError::Etcd { source, .. } => match source {
                etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
                etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
                _ => false,
            },
            EtcdError::Key { source, .. } => source.is_lease_not_found(),
            _ => false,
        }
    }

    /// This error with the key it was about.
    pub fn for_key(self, key: impl Into<String>) -> EtcdError {
        EtcdError::Key {
            key: key.into(),
            source: Box::new(self),
        }
    }
}
