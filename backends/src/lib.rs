//! flannel backends behind one trait.
//!
//! Contract: [`create`] turns the `Backend` section of the network config into a running
//! [`Backend`] for the chosen external interface. A backend says what it publishes in this
//! node's lease (`BackendType`, `BackendData`), what MTU pods get (`FLANNEL_MTU`), and consumes
//! peer lease events. Adding a backend is one module plus one line in [`create`].
//!
//! This build carries the `alloc` backend (lease only, no data plane). The data-plane backends
//! (`vxlan`, `udp`, `host-gw`) are accepted in the config and run as `alloc` until they land;
//! the daemon logs that clearly and publishes `BackendType: "alloc"` so no peer mistakes this
//! node for one it can tunnel to.

#![forbid(unsafe_code)]

mod alloc;

use std::net::Ipv4Addr;

pub use alloc::AllocBackend;
use subnet_lease::manager::Event;
use subnet_lease::BackendConfig;

/// The interface flannel carries traffic on, and the address it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address.
    pub iface_ip: Ipv4Addr,
    /// The address published in the lease (`--public-ip`, else `iface_ip`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Backend.{key}: {msg}")]
    Config { key: String, msg: String },
}

/// A running backend.
pub trait Backend: Send + std::fmt::Debug {
    /// `BackendType` published in the lease.
    fn backend_type(&self) -> &'static str;
    /// `BackendData` published in the lease (None = omitted, as flannel's udp/host-gw/alloc).
    fn backend_data(&self) -> Option<serde_json::Value>;
    /// The MTU pods should use (`FLANNEL_MTU`).
    fn mtu(&self) -> u32;
    /// Applies a lease event (peers joining, leaving, changing).
    fn handle(&mut self, event: &Event) -> Result<(), BackendError>;
}

/// Builds the backend the config asks for. Returns it with a note to log when the requested
/// type runs as a different one in this build.
pub fn create(
    cfg: &BackendConfig,
    ext: &ExternalInterface,
) -> Result<(Box<dyn Backend>, Option<String>), BackendError> {
    match cfg.backend_type.as_str() {
        "alloc" => Ok((Box::new(AllocBackend::new(ext)), None)),
        other => Ok((
            Box::new(AllocBackend::new(ext)),
            Some(format!(
                "backend type {other:?}: its data plane is not part of this build; running lease-only (alloc) and publishing BackendType \"alloc\""
            )),
        )),
    }
}
