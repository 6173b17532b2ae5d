//! Cluster DNS: Services and pods by name, on every node.
//!
//! Contract: [`objects::Objects`] keeps the registry objects the zone is made of (validated,
//! key by key), [`index::Index`] is the zone built from them as the Kubernetes DNS
//! specification lays it out (pure), [`respond`] turns a query into an answer (pure),
//! [`cache::Cache`] keeps upstream answers (pure, bounded), [`upstream::Upstream`] asks the
//! node's resolvers, [`server`] serves UDP and TCP, and [`run`] follows etcd and swaps in a new
//! index after every burst of changes. `flanneld --cluster-dns` runs it; `flannel-dns` is the
//! same server on its own.

#![forbid(unsafe_code)]

pub mod cache;
pub mod fast;
pub mod index;
pub mod metrics;
pub mod notrack;
pub mod objects;
pub mod respond;
pub mod run;
pub mod server;
pub mod upstream;

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster DNS: bad {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cluster DNS: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
