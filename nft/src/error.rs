//! The crate's error: running `nft`, talking to the kernel over netlink.

use std::time::Duration;

use crate::encode::BatchError;

/// Why an nftables operation failed, with its cause. A failed transaction changed nothing
/// (`nft -f -` and netlink batches are atomic).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started, fed or waited for.
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("could not run {program}: no answer within {after:?}")]
    Timeout { program: String, after: Duration },
    #[error("could not run an empty command")]
    EmptyCommand,
    /// `nft` refused the script: the first lines of its complaint (it names the line).
    #[error("nft -f - failed: {stderr}")]
    Refused { stderr: String },
    /// The netfilter netlink socket could not be opened or set up.
    #[error("could not run netlink: {what}: {source}")]
    Open {
        what: &'static str,
        source: nix::Error,
    },
    #[error("nft -f - failed: netlink {what}: {source}")]
    Io {
        what: &'static str,
        source: nix::Error,
    },
    #[error("nft -f - failed: netlink send: {sent} of {len} bytes")]
    ShortSend { sent: usize, len: usize },
    #[error("nft -f - failed: netlink: no answer within {0:?}")]
    NoAnswer(Duration),
    /// The kernel refused a step (nothing of its batch was applied).
    #[error("nft -f - failed: {step}: {}", .errno.desc())]
    Kernel { step: String, errno: nix::Error },
    #[error("nft -f - failed: {0}")]
    Encode(#[from] BatchError),
}
