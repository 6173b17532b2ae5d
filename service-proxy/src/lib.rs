//! Kubernetes Services on the overlay (a kube-proxy for flannel-rs).
//!
//! Contract: [`model::service_ports`] turns the registry's objects and the pods' attachment
//! records into the service ports this node serves (pure); [`nft`] renders them as
//! kube-proxy-style nftables (pure) and [`sync::Syncer`] applies only what changed, one
//! atomic transaction per sync (`nft -f -` for the full rebuild at start and after a failure,
//! a netlink batch encoded by [`nfnl`] for incremental syncs);
//! [`userspace::UserspaceProxy`] serves them from this process instead (retrying the next
//! endpoint when a connect fails); [`run::run`] feeds either from etcd.

#![forbid(unsafe_code)]

pub mod metrics;
pub mod model;
pub mod nfnl;
pub mod nft;
pub mod run;
pub mod sync;
pub mod userspace;
