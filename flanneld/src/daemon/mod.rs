//! The daemon, as named stages: [`interface`] (choose the external interface), [`connect`]
//! (etcd, the health listener), [`acquire`] (config, backends, lease; waits while none can be
//! had), [`dns`] (the cluster DNS with `--cluster-dns`, before the subnet file), [`program`]
//! (host rules, the backend's lease, the subnet file, READY=1), [`serve`]
//! (config watch, pod publishing, service proxy, network policy), [`follow`] (peer events,
//! repair, live backend switches) until SIGTERM/SIGINT. `--cleanup` is [`cleanup`].

mod acquire;
mod cleanup;
mod connect;
mod dns;
mod follow;
mod interface;
mod program;
mod serve;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use backends::netlink::Netlink;
use backends::netlink_rt::RtNetlink;
use subnet_lease::manager::ManagerOptions;
use subnet_lease::Lease;
use subnet_lease::LeaseStats;
use tokio::signal::unix::{signal, SignalKind};

use crate::flags::Flags;
use crate::health::Status;

/// Resolves when SIGTERM or SIGINT arrives.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `fut`, or returns None if a shutdown signal comes first.
async fn or_shutdown<T>(
    shutdown: &mut Shutdown,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        v = fut => Some(v),
        sig = shutdown.wait() => {
            tracing::info!("{sig} received; exiting");
            None
        }
    }
}

fn describe(l: &Lease) -> String {
    format!(
        "{} (public IP {}, backend {})",
        l.key,
        l.attrs.public_ip,
        if l.attrs.backend_type.is_empty() {
            "none"
        } else {
            &l.attrs.backend_type
        }
    )
}

/// A stable identity of this machine: machine-id, else the hostname.
fn node_id() -> String {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The whole daemon. Returns Ok on a clean shutdown.
pub async fn run(flags: Flags) -> Result<()> {
    if flags.cleanup {
        return cleanup::cleanup(&flags).await;
    }
    let mut shutdown = Shutdown::install()?;
    let reg = connect::etcd(&flags).await?;
    let lease_stats: Arc<LeaseStats> = Arc::default();
    let status = Status::new(lease_stats.clone());
    let _health = connect::health(&flags, &status).await?;

    let netlink: Arc<dyn Netlink> = Arc::new(RtNetlink::connect().context("opening netlink")?);
    let opts = ManagerOptions {
        renew_margin: Duration::from_secs(flags.subnet_lease_renew_margin * 60),
        release_stale_leases: flags.allow_network_change,
        stats: lease_stats,
        ..ManagerOptions::default()
    };
    let previous = acquire::previous_subnet(&flags.subnet_file);
    let Some(mut leased) = acquire::lease(
        &mut shutdown,
        &reg,
        &flags,
        netlink.clone(),
        opts,
        previous,
        &status,
        crate::families::Parts::of(&flags),
    )
    .await?
    else {
        return Ok(());
    };
    tracing::info!("leased {}", describe(&leased.lease));
    status
        .lease_held
        .store(true, std::sync::atomic::Ordering::Relaxed);

    // Before the subnet file: the CNI plugin reads cluster-dns.env once the subnet file
    // exists, so no pod attached from then on misses the DNS settings.
    let dns = dns::start(&flags, reg.connection(), netlink.as_ref(), &status).await?;
    let rules = program::program(&flags, &mut leased, &status).await?;
    let ext = leased.ext.clone();
    let services = serve::serve(&flags, &ext, &leased.cfg, &leased.lease, &reg, &status, dns).await;
    follow::follow(
        &flags,
        &ext,
        leased,
        rules,
        services,
        &status,
        &mut shutdown,
    )
    .await
}
