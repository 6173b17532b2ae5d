//! Kubernetes-shaped objects kept in etcd for the service proxy and network policy.
//!
//! Contract: [`types`] are the `v1` Namespace, Pod, Service and Endpoints shapes (camelCase,
//! manifests written for kubectl parse unchanged). [`validate()`] checks an object with the
//! API server's rules, reporting every broken field by its path.

#![forbid(unsafe_code)]

pub mod types;
pub mod validate;

pub use types::*;
pub use validate::{validate, FieldError, ValidationErrors};
