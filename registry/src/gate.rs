//! The contract between a data plane that relays connections itself (the service proxy's
//! userspace mode) and the module that decides which connections are allowed (network
//! policy): both depend on it, neither on the other.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::Protocol;

/// The client of a relayed connection, as the listener saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub addr: Ipv4Addr,
    /// The connection was made on this node itself (redirected in the output hook).
    pub local: bool,
}

/// Decides whether a relay from a client to an endpoint may be opened. Userspace mode opens
/// every upstream connection from the node, which network policy always allows, so without
/// a gate the client's own policies (and the endpoint's, for endpoints on this node) would
/// never be applied; the policy module provides one (`policy::run::PolicyGate`).
pub trait Gate: Send + Sync + std::fmt::Debug {
    fn allows(&self, client: Client, endpoint: SocketAddrV4, protocol: Protocol) -> bool;
}
