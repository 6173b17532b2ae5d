//! The ingress controller's pure core: which Ingresses this controller serves ([`class`]),
//! request paths as the router compares them ([`path`]), and the route table that answers
//! "host + path → Service port" with the precedence of the Ingress specification ([`routes`]).
//! No I/O: the proxy (a later part) feeds it the registry's objects and asks it per request.

#![forbid(unsafe_code)]

pub mod class;
pub mod path;
pub mod routes;

pub use class::{ClassConfig, ClassFilter};
pub use path::{normalize_path, PathError};
pub use routes::{
    normalize_host, BackendRef, Conflict, PortRef, Route, RouteSource, RouteTable, TlsRef,
};
