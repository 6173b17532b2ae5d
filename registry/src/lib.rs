//! Kubernetes-shaped objects kept in etcd for the service proxy and network policy.
//!
//! Contract: [`types`] are the `v1` Namespace, Pod, Service, Endpoints and
//! `networking.k8s.io/v1` NetworkPolicy shapes (camelCase,
//! manifests written for kubectl parse unchanged). [`validate()`] checks an object with the
//! API server's rules, reporting every broken field by its path.
//! [`parse_documents`] reads YAML/JSON manifests (several documents, `List`s), errors naming
//! the document and field. [`Store`] keeps them in etcd under `<prefix>/registry/`, allocating
//! ClusterIPs and NodePorts in the same guarded txn as the object; the key functions
//! ([`registry_prefix`], [`object_key`], [`parse_key`], [`decode`]) are pure, for watchers.

#![forbid(unsafe_code)]

pub mod follow;
pub mod parse;
pub mod store;
pub mod types;
pub mod validate;

pub use parse::{parse_documents, to_json, ParseError};
pub use store::{
    decode, object_key, parse_key, registry_prefix, Applied, DecodeError, Outcome, Store,
    StoreError,
};
pub use types::*;
pub use validate::{validate, FieldError, ValidationErrors};
