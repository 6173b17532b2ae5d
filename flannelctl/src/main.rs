//! `flannelctl`: the operator CLI. For now: `pod up|down`, which create a pod network
//! namespace on this node and attach it through the CNI plugin chain (a `.conflist`, e.g.
//! flannel + portmap) exactly as a container runtime does, caching the ADD result for DEL.

#![forbid(unsafe_code)]

mod pod;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "flannelctl", version, about = "Operate a flannel-rs cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Pod network namespaces attached through the CNI chain, as a runtime would.
    Pod {
        #[command(subcommand)]
        cmd: pod::PodCmd,
    },
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.cmd {
        Cmd::Pod { cmd } => pod::run(cmd),
    };
    if let Err(e) = outcome {
        // Errors for humans: the chain of contexts, no backtrace.
        eprintln!("flannelctl: {e:#}");
        std::process::exit(1);
    }
}
