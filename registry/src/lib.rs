//! Kubernetes-shaped objects kept in etcd for the service proxy and network policy.
//!
//! Contract: [`types`] are the `v1` Namespace, Pod, Service and Endpoints shapes (camelCase,
//! manifests written for kubectl parse unchanged). [`validate()`] checks an object with the
//! API server's rules, reporting every broken field by its path.
//! [`parse_documents`] reads YAML/JSON manifests (several documents, `List`s), errors naming
//! the document and field.

#![forbid(unsafe_code)]

pub mod parse;
pub mod types;
pub mod validate;

pub use parse::{parse_documents, to_json, ParseError};
pub use types::*;
pub use validate::{validate, FieldError, ValidationErrors};
