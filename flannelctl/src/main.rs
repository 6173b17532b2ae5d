//! `flannelctl`: the operator CLI. `config get|set` reads and writes the network config,
//! `leases` lists the subnet leases, `status` asks every node's /readyz and /metrics;
//! `apply`, `get` and `delete` manage the registry objects (Namespace, Pod, Service,
//! Endpoints, NetworkPolicy) in etcd, as kubectl does with an API server; `pod
//! up|down` create a pod network namespace on this node and attach it through the CNI plugin
//! chain (a `.conflist`, e.g. flannel + portmap) exactly as a container runtime does, caching
//! the ADD result for DEL; `docker-opts` writes Docker's options for this node's subnet, as
//! flannel's `mk-docker-opts.sh` does.

#![forbid(unsafe_code)]

mod apply;
mod common;
mod config;
mod delete;
mod docker_opts;
mod get;
mod leases;
mod pod;
mod status;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "flannelctl", version, about = "Operate a flannel-rs cluster")]
struct Cli {
    #[command(flatten)]
    etcd: common::EtcdFlags,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The network config (flannel's net-conf.json in etcd).
    Config {
        #[command(subcommand)]
        cmd: config::ConfigCmd,
    },
    /// The subnet leases: subnet, public IP, backend, expiry.
    Leases(leases::LeasesArgs),
    /// Every node's readiness and programmed peers, from its /readyz and /metrics.
    Status(status::StatusArgs),
    /// Create or update objects from manifests (YAML or JSON); nothing is written if any is
    /// invalid.
    Apply(apply::ApplyArgs),
    /// Show objects as a table, JSON or YAML.
    Get(get::GetArgs),
    /// Delete objects by kind and name, or those of manifests.
    Delete(delete::DeleteArgs),
    /// Docker daemon options for this node's subnet (flannel's mk-docker-opts.sh): reads the
    /// subnet file, writes `--bip`, `--mtu` and `--ip-masq` for dockerd.
    DockerOpts(docker_opts::DockerOptsArgs),
    /// Pod network namespaces attached through the CNI chain, as a runtime would.
    Pod {
        #[command(subcommand)]
        cmd: pod::PodCmd,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let etcd = cli.etcd;
    let outcome = match cli.cmd {
        Cmd::Config { cmd } => common::block_on(config::run(&etcd, cmd)),
        Cmd::Leases(args) => common::block_on(leases::run(&etcd, args)),
        Cmd::Status(args) => common::block_on(status::run(&etcd, args)),
        Cmd::Apply(args) => common::block_on(apply::run(&etcd, args)),
        Cmd::Get(args) => common::block_on(get::run(&etcd, args)),
        Cmd::Delete(args) => common::block_on(delete::run(&etcd, args)),
        Cmd::Pod { cmd } => pod::run(cmd),
        Cmd::DockerOpts(args) => docker_opts::run(args),
    };
    if let Err(e) = outcome {
        // Errors for humans: the chain of contexts, no backtrace.
        eprintln!("flannelctl: {e:#}");
        std::process::exit(1);
    }
}
