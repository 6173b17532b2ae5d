//! Kubernetes-shaped objects kept in etcd for the service proxy and network policy.
//!
//! Contract: [`types`] are the `v1` Namespace, Pod, Service, Endpoints and
//! `networking.k8s.io/v1` NetworkPolicy shapes (camelCase,
//! manifests written for kubectl parse unchanged). [`validate()`] checks an object with the
//! API server's rules, reporting every broken field by its path.
//! [`parse_documents`] reads YAML/JSON manifests (several documents, `List`s), errors naming
//! the document and field. [`keys`] is the layout in etcd and turns stored values back into
//! objects (pure, for watchers); [`alloc`] decides IP families, ClusterIPs (one per family, from
//! the [`ServiceNetworks`]) and NodePorts (pure); [`Store`]
//! keeps objects in etcd under `<prefix>/registry/`, allocating in the same guarded txn as the
//! object; [`follow`] is the list + watch loop the service proxy and policy module share;
//! [`gate`] is how the policy module judges the userspace proxy's relays.
//! [`pods`] are the pod records each node's flanneld publishes under
//! `<prefix>/pods/<namespace>/<name>` on a dedicated 60 s etcd lease ([`PodPublisher`]), and
//! the pure pod plan. Uses `subnet-lease` only for the network config (parser and key).

#![forbid(unsafe_code)]

pub mod alloc;
pub mod follow;
pub mod gate;
pub mod keys;
pub mod parse;
pub mod pods;
pub mod store;
pub mod types;
pub mod validate;

pub use alloc::ServiceNetworks;
pub use keys::{decode, object_key, parse_key, registry_prefix, DecodeError};
pub use parse::{parse_documents, to_json, ParseError};
pub use pods::{PodPublisher, PodRecord};
pub use store::{Applied, Outcome, Store, StoreError};
pub use types::*;
pub use validate::{validate, FieldError, ValidationErrors};
