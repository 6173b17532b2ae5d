//! The CNI plugin `flannel`, drop-in for flannel's: reads the subnet file flanneld writes,
//! builds the delegate config (bridge + host-local by default) exactly as flannel does, stores
//! it under the data directory by container ID, and calls the delegate from `CNI_PATH`.
//!
//! Contract: CNI spec 1.1 (ADD, DEL, CHECK, GC, STATUS, VERSION; versions 0.3.0–1.1.0), errors
//! as CNI error JSON with the spec's codes, nothing left behind by a failed ADD, DEL idempotent.
//! Each ADD also writes an attachment record ([`attachment`]) that flanneld publishes to etcd.
//! Pure parts (config, delegate building, version conversion, commands over a fake delegate)
//! are tested without root; [`exec::PathExec`] runs the real plugins.

#![forbid(unsafe_code)]

pub mod attachment;
pub mod chain;
pub mod cmd;
pub mod conf;
pub mod delegate;
pub mod error;
pub mod exec;
pub mod store;
pub mod version;

pub use error::CniError;
