//! The ingress controller. The pure core: which Ingresses this controller serves ([`class`]),
//! request paths as the router compares them ([`path`]), the route table that answers
//! "host + path → Service port" with the precedence of the Ingress specification ([`routes`]),
//! backends resolved to pod addresses ([`endpoints`]). Around it, the reverse proxy that the
//! `flannel-ingress` binary runs: the registry followed into swapped [`snapshot`]s ([`run`]),
//! TLS certificates from Secrets ([`tls`]), the proxy ([`proxy`]), listeners ([`server`]),
//! [`metrics`], the non-blocking log output ([`logwriter`]) and the access line ([`accesslog`]).

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod class;
pub mod endpoints;
pub mod h1;
pub mod logwriter;
pub mod metrics;
pub mod objects;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod run;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;

/// The hash map of the request path (routes, upstreams, pools, ejections, metric series):
/// foldhash, seeded per map, rather than std's SipHash, which cost about 3 % of the user-space
/// instructions per proxied request (docs/ingress.md, Performance (h)). The keys come from the
/// registry's objects and the endpoints, never from a client's request (a client only looks
/// up), so a client cannot fill a map with colliding keys.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use class::{ClassConfig, ClassFilter};
pub use path::{normalize_path, PathError};
pub use routes::{
    normalize_host, BackendRef, Conflict, PortRef, Route, RouteSource, RouteTable, TlsRef,
};
