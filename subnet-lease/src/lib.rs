//! flannel-compatible subnet leases on etcd v3.
//!
//! Contract: [`config::parse`] validates net-conf.json with flannel's keys and defaults;
//! [`LeaseManager::acquire`] gets this node a subnet (own lease → subnet-file subnet → random
//! among the first 100 free), atomically; [`LeaseManager::run`] keeps it renewed with keep-alive
//! on the same etcd lease, re-acquires it if it disappears, and streams peer [`Event`]s from a
//! watch that misses nothing (list, then watch from revision + 1; re-list on compaction).
//! Keys and JSON are flannel's (`<prefix>/config`, `<prefix>/subnets/10.5.52.0-24`).
//! Leases only: pod records and Kubernetes names live in the `registry` crate, which may use
//! [`config`] but is never used from here.
//! The manager and the watcher reach etcd only through the [`LeaseStore`] trait:
//! [`EtcdLeaseStore`] in flanneld, [`MemoryLeaseStore`] (a test double with etcd's revisions,
//! TTLs on the tokio clock, watch and compaction) in tests, which run them under tokio's paused
//! clock. Pure parts (config, allocation, key/JSON model, subnet file) need no etcd.

#![forbid(unsafe_code)]

pub mod alloc;
pub mod config;
pub mod etcd;
pub mod ipmath;
pub mod lease;
pub mod manager;
pub mod memory;
pub mod stats;
pub mod store;
/// The subnet file, from its own small crate (the CNI plugin reads it without etcd).
pub use subnet_env;
pub mod watch;

pub use config::{BackendConfig, ConfigError, NetConfig};
pub use etcd::{Connection, EtcdLeaseStore, EtcdOptions, Password};
pub use etcd_access;
pub use lease::{Lease, LeaseAttrs, SubnetKey};
pub use manager::{Event, LeaseError, LeaseManager, ManagerOptions, Republish};
pub use memory::MemoryLeaseStore;
pub use stats::LeaseStats;
pub use store::{EtcdError, LeaseStore};
pub use subnet_env::SubnetEnv;
pub use watch::{Backoff, Change, LeaseWatcher};
