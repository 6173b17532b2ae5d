//! Kubernetes Services on the overlay (a kube-proxy for flannel-rs).
//!
//! Contract: [`model::service_ports`] turns the registry's objects and the pods' attachment
//! records into the service ports this node serves (pure).

#![forbid(unsafe_code)]

pub mod model;
pub mod nft;
pub mod sync;
