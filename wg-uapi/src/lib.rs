//! The WireGuard cross-platform userspace API (<https://www.wireguard.com/xplatform/>): the
//! text protocol that `wg` (wireguard-tools) speaks to userspace implementations over the
//! unix socket `/var/run/wireguard/<iface>.sock`, as wireguard-go serves it. With it,
//! `wg show flannel-wg` and `wg show flannel-wg dump` work on our userspace WireGuard backend.
//!
//! - [`protocol`] (pure): [`DeviceSnapshot`] rendered as the `get=1` answer byte for byte as
//!   wireguard-go writes it (keys in lowercase hex, `errno=0`, a blank line), and [`Session`],
//!   which reads requests line by line, each at most [`MAX_REQUEST_BYTES`].
//! - [`server`]: [`UapiServer`], a tokio unix socket server that asks a [`SnapshotSource`] for
//!   the state on each `get=1`; several requests may follow each other on one connection, as
//!   `wg` does; each request must arrive within [`REQUEST_TIMEOUT`], a connection lives at
//!   most [`CONNECTION_TIMEOUT`].
//!
//! # `set=1` is refused
//!
//! The device is managed by flanneld from the subnet leases in etcd: its peers, endpoints and
//! allowed IPs are rewritten from the leases, so a change made with `wg set`, `wg setconf`,
//! `wg addconf` or `wg syncconf` would be silently overwritten. Every `set=1` request is read
//! to its end and answered `errno=-1` (`-EPERM`), with a warning in flanneld's log; `wg` then
//! prints `Unable to modify interface: Operation not permitted`. wireguard-go has no code of
//! its own for a refusal (it answers `-EINVAL` for values it rejects, `-EPROTO` for lines it
//! cannot parse, `-EADDRINUSE` for a port it cannot bind, `-EIO`, and `-55` for anything
//! else); `-EPERM` follows its convention (a negated Linux errno) and says what happened.
//!
//! # The socket carries the private key
//!
//! As wireguard-go's does, the `get=1` answer contains the device's private key (in hex).
//! The socket is therefore created mode 0600 (root only), bound in a private 0700 directory and
//! moved into place so it is never reachable with a wider mode; the directory
//! `/var/run/wireguard` is created 0755 if missing. A socket already at the path is replaced
//! only if nothing answers on it; ours is removed when the server stops.

#![forbid(unsafe_code)]

pub mod protocol;
pub mod server;

pub use protocol::{
    errno, render_get, render_status, Action, DeviceSnapshot, Key, PeerSnapshot, Session,
    SetSummary, MAX_REQUEST_BYTES,
};
pub use server::{
    SnapshotError, SnapshotSource, UapiError, UapiServer, CONNECTION_TIMEOUT, MAX_CONNECTIONS,
    REQUEST_TIMEOUT, SOCKET_DIR, WRITE_TIMEOUT,
};
