//! flanneld: leases this node's subnet from etcd (flannel's keys and JSON), writes the subnet
//! file, keeps the lease renewed and follows peers. Flags and environment are flannel's.

#![forbid(unsafe_code)]

mod daemon;
mod families;
mod flags;
mod health;
mod iface;
mod nft;
mod pods;

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let flags = flags::Flags::parse_from(flags::normalize_args(std::env::args()));
    let level = match flags.verbosity {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon::run(flags)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
