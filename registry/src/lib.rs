//! Kubernetes-shaped objects kept in etcd for the service proxy and network policy.
//!
//! Contract: [`types`] are the `v1` Namespace, Pod, Service and Endpoints shapes (camelCase,
//! manifests written for kubectl parse unchanged).

#![forbid(unsafe_code)]

pub mod types;

pub use types::*;
