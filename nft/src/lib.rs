//! nftables plumbing for flanneld's host rules, the service proxy and network policy.
//!
//! Contract: a [`Runner`] applies a script as one atomic `nft -f -` transaction, lists a
//! table and probes a chain ([`NftCommand`] runs the program, bounded in time; [`FakeNft`]
//! records calls for unit tests); [`TableKeeper`] keeps one table equal to its script and
//! re-installs it on drift. For transactions `nft` makes slow on big tables, [`encode`]
//! builds nf_tables messages and batches (pure: the messages `nft` 1.0.6 sends for the same
//! text, as the service proxy's and the network policy's incremental steps need them),
//! [`NfNetlink`] sends a batch and waits for the verdict, which [`ack`] reads (pure). Both
//! sides work on tables of either [`Family`] (`ip`, `ip6`: [`encode::Table`]), except
//! [`NfNetlink::chain_exists`] and [`encode`]'s free functions (family `ip`).
//! What goes into a table (rules, names, keys) is the callers' business. A failed transaction changes nothing.

#![forbid(unsafe_code)]

pub mod ack;
pub mod command;
pub mod encode;
mod error;
pub mod fake;
mod family;
pub mod keeper;
pub mod socket;
pub mod sys;

pub use command::{remove_table_script, NftCommand, Runner, COMMAND_TIMEOUT};
pub use encode::{EncodeError, MAX_NAME_LEN};
pub use error::Error;
pub use fake::FakeNft;
pub use family::Family;
pub use keeper::TableKeeper;
pub use socket::NfNetlink;
