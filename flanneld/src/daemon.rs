//! The daemon's run loop: interface → etcd → network config → backend → lease → subnet file,
//! then renewal and peer events until SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use backends::{Backend, ExternalInterface};
use subnet_lease::manager::{Event, ManagerOptions};
use subnet_lease::registry::Registry;
use subnet_lease::{
    config, Backoff, EtcdOptions, EtcdRegistry, Lease, LeaseAttrs, LeaseManager, NetConfig,
    SubnetEnv, SubnetKey,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::flags::Flags;
use crate::iface;

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

fn external_interface(flags: &Flags) -> Result<ExternalInterface> {
    let ifaces = iface::system_interfaces()?;
    let default = iface::default_route_iface()?;
    let ext = iface::choose(
        &ifaces,
        default.as_deref(),
        &flags.iface,
        &flags.iface_regex,
        flags.public_ip,
    )?;
    tracing::info!(
        "using interface {} (index {}, IP {}, MTU {}), public IP {}",
        ext.name,
        ext.index,
        ext.iface_ip,
        ext.mtu,
        ext.public_ip
    );
    Ok(ext)
}

/// Waits for a valid network config in etcd, as flannel does (it retries until one appears).
async fn network_config(reg: &EtcdRegistry, backoff: &mut Backoff) -> NetConfig {
    loop {
        let problem = match reg.get_config().await {
            Ok(Some(text)) => match config::parse(&text) {
                Ok(parsed) => {
                    for w in &parsed.warnings {
                        tracing::warn!("{w}");
                    }
                    return parsed.config;
                }
                Err(e) => format!("network config {} is invalid: {e}", reg.config_key()),
            },
            Ok(None) => format!("no network config at {} yet", reg.config_key()),
            Err(e) => format!("reading the network config: {e}"),
        };
        let d = backoff.next_delay();
        tracing::warn!("{problem}; retrying in {d:?}");
        tokio::time::sleep(d).await;
    }
}

fn previous_subnet(path: &Path) -> Option<SubnetKey> {
    match SubnetEnv::read(path) {
        Ok(env) => env.subnet.map(|ipv4| SubnetKey {
            ipv4,
            ipv6: env.ipv6_subnet,
        }),
        Err(subnet_lease::subnet_env::SubnetEnvError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => {
            tracing::warn!("ignoring the previous subnet file: {e}");
            None
        }
    }
}

fn write_subnet_file(path: &Path, cfg: &NetConfig, lease: &Lease, mtu: u32) -> Result<()> {
    let env = SubnetEnv {
        network: cfg.ipv4_network(),
        subnet: Some(lease.key.ipv4),
        ipv6_network: cfg.ipv6_network(),
        ipv6_subnet: lease.key.ipv6,
        mtu,
        ip_masq: false,
    };
    env.write(path)
        .with_context(|| format!("writing the subnet file {}", path.display()))?;
    tracing::info!("wrote {}", path.display());
    Ok(())
}

async fn acquire(
    manager: &LeaseManager<EtcdRegistry>,
    previous: Option<SubnetKey>,
) -> Result<Lease> {
    let mut backoff = Backoff::default();
    loop {
        match manager.acquire(previous).await {
            Ok(l) => return Ok(l),
            Err(e) if e.is_transient() => {
                let d = backoff.next_delay();
                tracing::warn!("acquiring a lease: {e}; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e).context("acquiring a lease"),
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

/// The whole daemon. Returns Ok on a clean shutdown.
pub async fn run(flags: Flags) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let ext = external_interface(&flags)?;
    let etcd = EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        ca_file: flags.etcd_cafile.clone(),
        cert_file: flags.etcd_certfile.clone(),
        key_file: flags.etcd_keyfile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
        ..EtcdOptions::default()
    };
    let reg = EtcdRegistry::connect(&etcd)
        .await
        .context("connecting to etcd")?;

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let Some(cfg) = or_shutdown(&mut shutdown, network_config(&reg, &mut backoff)).await else {
        return Ok(());
    };
    if cfg.ipv4_network().is_none() {
        bail!("EnableIPv4 is false: this daemon's etcd leases need an IPv4 Network");
    }
    let (mut backend, note): (Box<dyn Backend>, _) =
        backends::create(&cfg.backend, &ext).context("creating the backend")?;
    if let Some(note) = note {
        tracing::warn!("{note}");
    }

    let mut attrs = LeaseAttrs::new(ext.public_ip, backend.backend_type());
    attrs.backend_data = backend.backend_data();
    let opts = ManagerOptions {
        renew_margin: Duration::from_secs(flags.subnet_lease_renew_margin * 60),
        ..ManagerOptions::default()
    };
    let manager = LeaseManager::new(reg, cfg.clone(), attrs, opts);
    let previous = previous_subnet(&flags.subnet_file);
    let Some(lease) = or_shutdown(&mut shutdown, acquire(&manager, previous)).await else {
        return Ok(());
    };
    let lease = lease?;
    tracing::info!("leased {}", describe(&lease));
    write_subnet_file(&flags.subnet_file, &cfg, &lease, backend.mtu())?;

    let (tx, mut events) = mpsc::channel(256);
    let run = tokio::spawn(manager.run(lease, tx));
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            sig = shutdown.wait() => {
                tracing::info!("{sig} received; exiting (the lease stays, to be reused on restart)");
                break;
            }
        };
        let Some(ev) = ev else {
            bail!("the lease manager stopped unexpectedly");
        };
        match &ev {
            Event::PeerAdded(l) => tracing::info!("peer joined or changed: {}", describe(l)),
            Event::PeerRemoved(l) => tracing::info!("peer left: {}", describe(l)),
            Event::OwnLease(l) => {
                tracing::warn!("our lease was re-acquired: {}", describe(l));
                write_subnet_file(&flags.subnet_file, &cfg, l, backend.mtu())?;
            }
        }
        if let Err(e) = backend.handle(&ev) {
            tracing::error!("backend: {e}");
        }
    }
    drop(events);
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    Ok(())
}
