//! The contract between a data plane that relays connections itself (the service proxy's
//! userspace mode) and the module that decides which connections are allowed (network
//! policy): both depend on it, neither on the other.

use std::net::{IpAddr, SocketAddr};

use crate::Protocol;

/// The client of a relayed connection, as the listener saw it (either family: a listener
/// takes connections of its service port's family only, so a client and the endpoints it may
/// be relayed to are of the same family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub addr: IpAddr,
    /// The connection was made on this node itself (redirected in the output hook).
    pub local: bool,
}

/// Decides whether a relay from a client to an endpoint may be opened. Userspace mode opens
/// every upstream connection from the node, which network policy always allows, so without
/// a gate the client's own policies (and the endpoint's, for endpoints on this node) would
/// never be applied; the policy module provides one (`policy::run::PolicyGate`).
///
/// A connection is judged in the family of the endpoint; a client of the other family (which
/// the proxy never asks about) is refused.
pub trait Gate: Send + Sync + std::fmt::Debug {
    fn allows(&self, client: Client, endpoint: SocketAddr, protocol: Protocol) -> bool;
}
