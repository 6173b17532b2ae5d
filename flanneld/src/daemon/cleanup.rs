//! `--cleanup`: remove what flanneld programmed, keep the lease.

use anyhow::{bail, Result};
use backends::netlink::Netlink;
use backends::netlink_rt::RtNetlink;
use subnet_lease::LeaseStore;
use subnet_lease::{config, EtcdLeaseStore};

use super::connect::etcd_options;
use crate::flags::Flags;
use crate::nft::{self, Nft};

/// `--cleanup`: remove the host rules and the VXLAN device, keep the lease. Collects errors and
/// keeps going.
pub(super) async fn cleanup(flags: &Flags) -> Result<()> {
    let mut errors = Vec::new();
    if let Err(e) = Nft::default().apply(&nft::render_cleanup()).await {
        errors.push(format!("removing the nftables table: {e:#}"));
    }
    if let Err(e) = Nft::default().apply(&nft::render6_cleanup()).await {
        errors.push(format!("removing the IPv6 nftables table: {e:#}"));
    }
    if let Err(e) = Nft::default().apply(&service_proxy::nft::cleanup()).await {
        errors.push(format!("removing the service proxy's table: {e:#}"));
    }
    if let Err(e) = Nft::default().apply(&policy::compile::cleanup()).await {
        errors.push(format!("removing the network policy table: {e:#}"));
    }
    // The VNI comes from the config when etcd answers; flannel's default otherwise.
    let mut vni = 1;
    if let Ok(reg) = EtcdLeaseStore::connect(&etcd_options(flags)).await {
        if let Ok(Some(text)) = reg.get_config().await {
            if let Ok(p) = config::parse(&text) {
                if let Ok((c, _)) = backends::vxlan::VxlanConfig::parse(&p.config.backend.options) {
                    vni = c.vni;
                }
            }
        }
    }
    let nl = RtNetlink::connect()?;
    for name in [format!("flannel.{vni}"), format!("flannel-v6.{vni}")] {
        match nl.link_by_name(&name).await {
            Ok(Some(l)) => {
                if let Err(e) = nl.delete_link(l.index).await {
                    errors.push(format!("deleting {name}: {e}"));
                } else {
                    tracing::info!("deleted {name}");
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("looking up {name}: {e}")),
        }
    }
    super::dns::cleanup(flags, &nl, &mut errors).await;
    if errors.is_empty() {
        tracing::info!("cleanup done (the lease stays in etcd)");
        Ok(())
    } else {
        bail!("cleanup: {}", errors.join("; "))
    }
}
