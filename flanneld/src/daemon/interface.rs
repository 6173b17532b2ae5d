//! Stage "choose the interface": `--iface`, `--iface-regex` or the default route, and the
//! public IP (the choice itself is pure, in `crate::iface`).

use anyhow::Result;
use backends::ExternalInterface;

use crate::flags::Flags;
use crate::iface;

pub(super) fn external_interface(flags: &Flags) -> Result<ExternalInterface> {
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
