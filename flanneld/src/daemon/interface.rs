//! Stage "choose the interface": `--iface`, `--iface-regex` or the default route(s), and the
//! public address of each family the network config enables (the choice itself is pure, in
//! `crate::iface`).

use anyhow::Result;
use backends::ExternalInterface;
use subnet_lease::NetConfig;

use crate::flags::Flags;
use crate::iface;

pub(super) fn external_interface(flags: &Flags, cfg: &NetConfig) -> Result<ExternalInterface> {
    let snap = iface::system_snapshot()?;
    let ext = iface::choose_families(
        &snap,
        &iface::Wanted {
            ipv4: cfg.enable_ipv4,
            ipv6: cfg.enable_ipv6,
            iface: &flags.iface,
            iface_regex: &flags.iface_regex,
            public_ip: flags.public_ip,
            public_ipv6: flags.public_ipv6,
        },
    )?;
    let fam = |ip: String, public: String| format!("IP {ip}, public IP {public}");
    let v4 = ext
        .v4
        .map(|a| fam(a.iface_ip.to_string(), a.public_ip.to_string()));
    let v6 = ext
        .v6
        .map(|a| fam(a.iface_ip.to_string(), a.public_ip.to_string()));
    tracing::info!(
        "using interface {} (index {}, MTU {}): {}",
        ext.name,
        ext.index,
        ext.mtu,
        v4.into_iter().chain(v6).collect::<Vec<_>>().join("; ")
    );
    Ok(ext)
}
