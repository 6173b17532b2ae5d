//! Access to etcd as flannel configures it, shared by the lease store (`subnet-lease`), the
//! object registry (`registry`) and `flannelctl`.
//!
//! Contract: [`Connection::connect`] takes flannel's etcd flags ([`EtcdOptions`]: endpoints,
//! prefix, TLS files, user and [`Password`], which never shows in `Debug`), refuses setups that
//! would silently go unencrypted, and with several endpoints keeps the client's balancer on the
//! members that answer ([`endpoints`]); [`Connection::call`] bounds and counts every call;
//! errors are [`EtcdError`] (transient or not, the cause kept); [`Backoff`] paces retries.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod connection;
pub mod endpoints;
pub mod error;
pub mod options;

pub use backoff::Backoff;
pub use connection::Connection;
pub use error::EtcdError;
pub use options::{EtcdOptions, Password, DEFAULT_PREFIX};
