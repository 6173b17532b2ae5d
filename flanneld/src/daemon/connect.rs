//! Stage "connect": etcd with flannel's flags (lazily: etcd may still be down), and the
//! health/metrics listener, so `/healthz` answers while the rest starts.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use subnet_lease::{EtcdLeaseStore, EtcdOptions};

use crate::flags::Flags;
use crate::health::{self, Status};

pub(super) fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        ca_file: flags.etcd_cafile.clone(),
        cert_file: flags.etcd_certfile.clone(),
        key_file: flags.etcd_keyfile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
        ..EtcdOptions::default()
    }
}

/// Connects to etcd (configuration mistakes fail here).
pub(super) async fn etcd(flags: &Flags) -> Result<EtcdLeaseStore> {
    EtcdLeaseStore::connect(&etcd_options(flags))
        .await
        .context("connecting to etcd")
}

/// Serves `/healthz`, `/readyz` and `/metrics` when `--healthz-port` is set.
pub(super) async fn health(
    flags: &Flags,
    status: &Arc<Status>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if flags.healthz_port == 0 {
        return Ok(None);
    }
    Ok(Some(
        health::serve(
            SocketAddr::new(flags.healthz_ip, flags.healthz_port),
            status.clone(),
        )
        .await?,
    ))
}
