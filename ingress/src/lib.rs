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

pub use class::{ClassConfig, ClassFilter};
pub use path::{normalize_path, PathError};
pub use routes::{
    normalize_host, BackendRef, Conflict, PortRef, Route, RouteSource, RouteTable, TlsRef,
};
