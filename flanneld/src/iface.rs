//! Choosing the external interface: `--iface` (names or IPs, in order), `--iface-regex`
//! (matched against IPs, then names), else the interface holding the default route.
//! [`choose`] (IPv4, as before IPv6) and [`choose_families`] (either or both families, as
//! flannel's pkg/ipmatch/match.go) are pure over a [`Snapshot`]; [`system_snapshot`] and the
//! thin `/proc` readers ([`parse_if_inet6`], [`parse_default_route6`]) read the system.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context, Result};
use backends::ExternalInterface;
use regex::Regex;

/// IFA_F_* address flags (linux/if_addr.h) used here.
const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_PERMANENT: u32 = 0x80;
/// RTF_REJECT (linux/ipv6_route.h): the kernel's null entry and unreachable routes.
const RTF_REJECT: u32 = 0x0200;

/// One interface as the system reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceInfo {
    pub name: String,
    pub index: u32,
    /// Addresses with their prefix lengths.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    /// Every IPv6 address (unfiltered, as `/proc/net/if_inet6` lists them); the usable ones,
    /// in flannel's order of preference, are [`IfaceInfo::usable_ipv6`].
    pub ipv6: Vec<Ipv6Address>,
    pub mtu: u32,
}

/// An IPv6 address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Address {
    pub ip: Ipv6Addr,
    pub prefix_len: u8,
    /// IFA_F_* flags (`/proc/net/if_inet6` shows their low byte): 0x01 temporary, 0x08 DAD
    /// failed, 0x20 deprecated, 0x40 tentative, 0x80 permanent (not SLAAC/DHCP).
    pub flags: u32,
}

impl Ipv6Address {
    /// flannel's filter (F:pkg/ip/iface.go GetInterfaceIP6Addrs): global unicast (Go's sense:
    /// also ULA) or link-local, not deprecated; and, ours, not failed DAD (never usable).
    /// Tentative addresses are kept, as flannel does.
    fn usable(&self) -> bool {
        let ip = self.ip;
        !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
            && self.flags & (IFA_F_DEPRECATED | IFA_F_DADFAILED) == 0
    }

    /// Sort key of flannel's compareAddrs: global before link-local, permanent before dynamic,
    /// non-temporary before temporary.
    fn preference(&self) -> (bool, bool, bool) {
        (
            self.ip.is_unicast_link_local(),
            self.flags & IFA_F_PERMANENT == 0,
            self.flags & IFA_F_TEMPORARY != 0,
        )
    }
}

impl IfaceInfo {
    /// The IPv6 addresses flannel would use, most preferred first (a stable sort: equal
    /// addresses keep the kernel's order; Go's sort is not stable).
    pub fn usable_ipv6(&self) -> Vec<Ipv6Address> {
        let mut v: Vec<Ipv6Address> = self.ipv6.iter().filter(|a| a.usable()).copied().collect();
        v.sort_by_key(Ipv6Address::preference);
        v
    }
}

fn build(
    i: &IfaceInfo,
    ip: Option<Ipv4Addr>,
    public_ip: Option<Ipv4Addr>,
) -> Result<ExternalInterface> {
    let chosen = match ip {
        Some(ip) => i.ipv4.iter().find(|(a, _)| *a == ip).copied(),
        None => i.ipv4.first().copied(),
    };
    let Some((iface_ip, prefix_len)) = chosen else {
        bail!("interface {} has no IPv4 address", i.name)
    };
    Ok(ExternalInterface {
        name: i.name.clone(),
        index: i.index,
        mtu: i.mtu,
        v4: Some(backends::ExtAddr {
            iface_ip,
            prefix_len,
            public_ip: public_ip.unwrap_or(iface_ip),
        }),
        v6: None,
    })
}

/// Picks the external interface as flannel does.
pub fn choose(
    ifaces: &[IfaceInfo],
    default_iface: Option<&str>,
    iface: &[String],
    iface_regex: &[String],
    public_ip: Option<Ipv4Addr>,
) -> Result<ExternalInterface> {
    for want in iface {
        let found = match want.parse::<Ipv4Addr>() {
            Ok(ip) => ifaces
                .iter()
                .find(|i| i.ipv4.iter().any(|(a, _)| *a == ip))
                .map(|i| build(i, Some(ip), public_ip)),
            Err(_) => ifaces
                .iter()
                .find(|i| &i.name == want)
                .map(|i| build(i, None, public_ip)),
        };
        match found {
            Some(r) => return r,
            None => tracing::warn!(
                "--iface {want}: no such interface or address; trying the next candidate"
            ),
        }
    }
    for pattern in iface_regex {
        let re = Regex::new(pattern).with_context(|| format!("--iface-regex {pattern:?}"))?;
        for i in ifaces {
            if let Some((ip, _)) = i.ipv4.iter().find(|(ip, _)| re.is_match(&ip.to_string())) {
                return build(i, Some(*ip), public_ip);
            }
        }
        if let Some(i) = ifaces.iter().find(|i| re.is_match(&i.name)) {
            return build(i, None, public_ip);
        }
        tracing::warn!("--iface-regex {pattern:?}: no interface IP or name matches");
    }
    if !iface.is_empty() || !iface_regex.is_empty() {
        bail!(
            "none of the interfaces given (--iface {:?}, --iface-regex {:?}) exists",
            iface,
            iface_regex
        );
    }
    let name = default_iface.ok_or_else(|| {
        anyhow!("no default route, so no default interface: give --iface or --iface-regex")
    })?;
    let i = ifaces
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| anyhow!("default route interface {name} not found"))?;
    build(i, None, public_ip)
}

/// What the choice sees of the system: the interfaces (in the order candidates are tried)
/// and the interfaces of the default routes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub ifaces: Vec<IfaceInfo>,
    /// Interface of the IPv4 default route (`/proc/net/route`).
    pub default_v4: Option<String>,
    /// Interface of the IPv6 default route (`/proc/net/ipv6_route`).
    pub default_v6: Option<String>,
}

/// What the operator asked for: the config's families and the flags.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The network config's EnableIPv4.
    pub ipv4: bool,
    /// The network config's EnableIPv6.
    pub ipv6: bool,
    pub iface: &'a [String],
    pub iface_regex: &'a [String],
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

/// One family's addresses on the chosen interface (the backends' type: interface address,
/// prefix length, the address published in the lease).
pub type FamilyAddr<A> = backends::ExtAddr<A>;

/// The external interface with an address for each enabled family (`v4` is Some exactly when
/// EnableIPv4, `v6` exactly when EnableIPv6), as the backends take it.
pub type Chosen = ExternalInterface;

/// Picks the external interface and its address per enabled family, as flannel's
/// pkg/ipmatch/match.go (with main.go's candidate loops):
///
/// - IPv4 only: exactly [`choose`] (`--public-ipv6` is ignored).
/// - `--iface` candidates in order, the first that fits wins: a name; an IPv4 address (dual
///   stack: with `--public-ipv6` on the same interface when it is given, flannel's error
///   otherwise, and then that is the interface's IPv6 address); an IPv6 address (dual stack
///   with `--public-ipv6`: flannel takes the interface holding `--public-ipv6`; without it
///   flannel panics, we take the interface holding the address).
/// - `--iface-regex` patterns in order: IPv6 only matches the usable IPv6 addresses; dual stack
///   needs an interface with an IPv4 and an IPv6 address both matching; else the first
///   interface whose name matches.
/// - Neither: the interface holding `--public-ip` (dual stack), else the one holding
///   `--public-ipv6`, else the default route's; dual stack needs both default routes on the
///   same interface (flannel's error). Where flannel exits because a public address is on no
///   interface (behind NAT), we go on to the next rule.
///
/// The IPv6 address is the first of [`IfaceInfo::usable_ipv6`] unless one was named; an
/// enabled family without an address on the interface is an error naming the interface.
pub fn choose_families(snap: &Snapshot, w: &Wanted) -> Result<Chosen> {
    match (w.ipv4, w.ipv6) {
        (false, false) => bail!(
            "neither EnableIPv4 nor EnableIPv6 is set: no address family to choose an interface for"
        ),
        (true, false) => {
            if let Some(p6) = w.public_ipv6 {
                tracing::warn!("--public-ipv6 {p6} is ignored: EnableIPv6 is off");
            }
            let ext = choose(
                &snap.ifaces,
                snap.default_v4.as_deref(),
                w.iface,
                w.iface_regex,
                w.public_ip,
            )?;
            return Ok(ext);
        }
        (false, true) => {
            if let Some(p) = w.public_ip {
                tracing::warn!(
                    "--public-ip {p} is ignored: EnableIPv4 is off (an IPv6-only lease \
                     publishes PublicIP 0.0.0.0)"
                );
            }
        }
        (true, true) => {}
    }
    let mut refused = Vec::new();
    for want in w.iface {
        match by_iface_flag(&snap.ifaces, w, want) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!("--iface {want}: {e}; trying the next candidate");
                refused.push(format!("--iface {want}: {e}"));
            }
        }
    }
    for pattern in w.iface_regex {
        let re = Regex::new(pattern).with_context(|| format!("--iface-regex {pattern:?}"))?;
        match by_regex(&snap.ifaces, w, &re) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!("--iface-regex {pattern:?}: {e}; trying the next candidate");
                refused.push(format!("--iface-regex {pattern:?}: {e}"));
            }
        }
    }
    if !refused.is_empty() {
        bail!("none of the interfaces given fits: {}", refused.join("; "));
    }
    by_public_ip_or_default_route(snap, w).map_err(|e| anyhow!(e))
}

fn holding_v4(ifaces: &[IfaceInfo], ip: Ipv4Addr) -> Option<&IfaceInfo> {
    ifaces.iter().find(|i| i.ipv4.iter().any(|(a, _)| *a == ip))
}

/// The interface holding `ip` among all its addresses (flannel's GetInterfaceByIP6 does not
/// filter).
fn holding_v6(ifaces: &[IfaceInfo], ip: Ipv6Addr) -> Option<&IfaceInfo> {
    ifaces.iter().find(|i| i.ipv6.iter().any(|a| a.ip == ip))
}

/// `--public-ipv6` must be on the interface chosen for IPv4 when it is on one (flannel's text).
fn same_iface(v4: &IfaceInfo, v6: &IfaceInfo) -> Result<(), String> {
    if v4.name == v6.name {
        Ok(())
    } else {
        Err(format!(
            "v6 interface {} must be the same with v4 interface {}",
            v6.name, v4.name
        ))
    }
}

/// The result on interface `i` with the addresses named (None: the interface's first).
fn finish(
    i: &IfaceInfo,
    w: &Wanted,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
) -> Result<Chosen, String> {
    let v4 = if w.ipv4 {
        let found = match v4 {
            Some(ip) => i.ipv4.iter().find(|(a, _)| *a == ip),
            None => i.ipv4.first(),
        };
        let &(iface_ip, prefix_len) =
            found.ok_or_else(|| format!("interface {} has no IPv4 address", i.name))?;
        Some(FamilyAddr {
            iface_ip,
            prefix_len,
            public_ip: w.public_ip.unwrap_or(iface_ip),
        })
    } else {
        None
    };
    let v6 = if w.ipv6 {
        let found = match v6 {
            Some(ip) => i.ipv6.iter().find(|a| a.ip == ip).copied(),
            None => i.usable_ipv6().first().copied(),
        };
        let a = found.ok_or_else(|| {
            format!(
                "interface {} has no usable IPv6 address (global or link-local, not deprecated, \
                 DAD not failed), which EnableIPv6 needs: add one, or choose another interface \
                 with --iface",
                i.name
            )
        })?;
        let public_ip = w.public_ipv6.unwrap_or(a.ip);
        if public_ip.is_unicast_link_local() {
            tracing::warn!(
                "the public IPv6 address {public_ip} is link-local: peers on other links cannot \
                 reach it (give --public-ipv6 or a global address on {})",
                i.name
            );
        }
        Some(FamilyAddr {
            iface_ip: a.ip,
            prefix_len: a.prefix_len,
            public_ip,
        })
    } else {
        None
    };
    Ok(Chosen {
        name: i.name.clone(),
        index: i.index,
        mtu: i.mtu,
        v4,
        v6,
    })
}

/// One `--iface` candidate with IPv6 enabled (match.go:78-115).
fn by_iface_flag(ifaces: &[IfaceInfo], w: &Wanted, want: &str) -> Result<Chosen, String> {
    const NOT_HELD: &str = "no interface has this address";
    match want.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            if !w.ipv4 {
                return Err("an IPv4 address, but EnableIPv4 is off".into());
            }
            let i = holding_v4(ifaces, ip).ok_or(NOT_HELD)?;
            let v6 = match w.public_ipv6 {
                Some(p6) => {
                    let j = holding_v6(ifaces, p6)
                        .ok_or_else(|| format!("--public-ipv6 {p6} is on no interface"))?;
                    same_iface(i, j)?;
                    Some(p6)
                }
                None => None,
            };
            finish(i, w, Some(ip), v6)
        }
        Ok(IpAddr::V6(ip)) => match w.public_ipv6.filter(|_| w.ipv4) {
            Some(p6) => {
                let j = holding_v6(ifaces, p6)
                    .ok_or_else(|| format!("--public-ipv6 {p6} is on no interface"))?;
                if !j.ipv6.iter().any(|a| a.ip == ip) {
                    tracing::warn!(
                        "--iface {ip}: dual stack with --public-ipv6 uses the interface holding \
                         --public-ipv6 ({}), as flannel does",
                        j.name
                    );
                }
                finish(j, w, None, Some(p6))
            }
            None => finish(holding_v6(ifaces, ip).ok_or(NOT_HELD)?, w, None, Some(ip)),
        },
        Err(_) => {
            let i = ifaces
                .iter()
                .find(|i| i.name == want)
                .ok_or("no such interface")?;
            finish(i, w, None, None)
        }
    }
}

/// One `--iface-regex` pattern with IPv6 enabled (match.go:116-198).
fn by_regex(ifaces: &[IfaceInfo], w: &Wanted, re: &Regex) -> Result<Chosen, String> {
    for i in ifaces {
        let m6 = i
            .usable_ipv6()
            .into_iter()
            .find(|a| re.is_match(&a.ip.to_string()));
        if w.ipv4 {
            let m4 = i.ipv4.iter().find(|(a, _)| re.is_match(&a.to_string()));
            if let (Some((m4, _)), Some(m6)) = (m4, m6) {
                return finish(i, w, Some(*m4), Some(m6.ip));
            }
        } else if let Some(m6) = m6 {
            return finish(i, w, None, Some(m6.ip));
        }
    }
    if let Some(i) = ifaces.iter().find(|i| re.is_match(&i.name)) {
        return finish(i, w, None, None);
    }
    let available: Vec<String> = ifaces
        .iter()
        .map(|i| {
            let ips: Vec<String> = if w.ipv4 {
                i.ipv4.iter().map(|(a, _)| a.to_string()).collect()
            } else {
                i.usable_ipv6().iter().map(|a| a.ip.to_string()).collect()
            };
            format!("{}:[{}]", i.name, ips.join(" "))
        })
        .collect();
    let what = if w.ipv4 {
        "no interface has an IPv4 and an IPv6 address both matching, nor a matching name"
    } else {
        "no interface has a matching IPv6 address or name"
    };
    Err(format!("{what} (available: {})", available.join(", ")))
}

/// No `--iface*` with IPv6 enabled (main.go:320-327, match.go:209-234).
fn by_public_ip_or_default_route(snap: &Snapshot, w: &Wanted) -> Result<Chosen, String> {
    let ifaces = &snap.ifaces;
    if let Some(p) = w.public_ip.filter(|_| w.ipv4) {
        if let Some(i) = holding_v4(ifaces, p) {
            let v6 = match w
                .public_ipv6
                .and_then(|p6| Some((p6, holding_v6(ifaces, p6)?)))
            {
                Some((p6, j)) => {
                    same_iface(i, j)?;
                    Some(p6)
                }
                None => None,
            };
            return finish(i, w, Some(p), v6);
        }
        tracing::info!("--public-ip {p} is on no interface here (NAT?)");
    }
    if let Some(p6) = w.public_ipv6 {
        if let Some(j) = holding_v6(ifaces, p6) {
            return finish(j, w, None, Some(p6));
        }
        tracing::info!("--public-ipv6 {p6} is on no interface here (NAT?)");
    }
    let no_route = |family: &str| {
        format!("no {family} default route, so no default interface: give --iface or --iface-regex")
    };
    let d4 = if w.ipv4 {
        Some(snap.default_v4.as_deref().ok_or_else(|| no_route("IPv4"))?)
    } else {
        None
    };
    let d6 = snap.default_v6.as_deref().ok_or_else(|| no_route("IPv6"))?;
    if let Some(d4) = d4.filter(|d4| *d4 != d6) {
        return Err(format!(
            "v6 default route interface {d6} must be the same with v4 default route interface {d4}"
        ));
    }
    let i = ifaces
        .iter()
        .find(|i| i.name == d6)
        .ok_or_else(|| format!("default route interface {d6} not found"))?;
    finish(i, w, None, None)
}

/// The system as [`choose_families`] sees it.
pub fn system_snapshot() -> Result<Snapshot> {
    Ok(Snapshot {
        ifaces: system_interfaces()?,
        default_v4: default_route_iface()?,
        default_v6: default_route_iface6()?,
    })
}

/// Every interface (in name order) with its IPv4 and IPv6 addresses and MTU.
pub fn system_interfaces() -> Result<Vec<IfaceInfo>> {
    let mut by_name: BTreeMap<String, Vec<(Ipv4Addr, u8)>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing interfaces (getifaddrs)")? {
        let entry = by_name.entry(ifa.interface_name.clone()).or_default();
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map(|m| u32::from(m.ip()).count_ones() as u8)
                .unwrap_or(32);
            entry.push((sin.ip(), prefix));
        }
    }
    // IPv6 addresses with their flags (getifaddrs has none); no file: IPv6 is off.
    let mut by_name6: BTreeMap<String, Vec<Ipv6Address>> = BTreeMap::new();
    if let Some(text) = read_optional(IF_INET6)? {
        for (name, a) in parse_if_inet6(&text) {
            by_name6.entry(name).or_default().push(a);
        }
    }
    let mut out = Vec::new();
    for (name, ipv4) in by_name {
        let index = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("index of interface {name}"))?;
        let mtu_path = format!("/sys/class/net/{name}/mtu");
        let mtu = std::fs::read_to_string(&mtu_path)
            .with_context(|| format!("reading {mtu_path}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {mtu_path}"))?;
        let ipv6 = by_name6.remove(&name).unwrap_or_default();
        out.push(IfaceInfo {
            name,
            index,
            ipv4,
            ipv6,
            mtu,
        });
    }
    Ok(out)
}

/// The interface of the IPv4 default route, from `/proc/net/route` text.
pub fn parse_default_route(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The interface holding this network namespace's IPv4 default route.
pub fn default_route_iface() -> Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    Ok(parse_default_route(&text))
}

const IF_INET6: &str = "/proc/net/if_inet6";
const IPV6_ROUTE: &str = "/proc/net/ipv6_route";

/// A file's text, or None when it does not exist (the kernel has IPv6 off).
fn read_optional(path: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {path}")),
    }
}

/// A hexadecimal field of a `/proc` table (digits only: no sign, no prefix).
fn hex(field: &str) -> Option<u128> {
    field
        .bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| u128::from_str_radix(field, 16).ok())
        .flatten()
}

/// `(interface name, address)` for each line of `/proc/net/if_inet6`
/// (`<32 hex address> <ifindex> <prefix len> <scope> <flags> <name>`, all hex); lines that do
/// not parse are skipped.
pub fn parse_if_inet6(text: &str) -> Vec<(String, Ipv6Address)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [addr, _index, plen, _scope, flags, name] = f.as_slice() else {
                return None;
            };
            if addr.len() != 32 {
                return None;
            }
            let prefix_len = u8::try_from(hex(plen)?).ok().filter(|l| *l <= 128)?;
            Some((
                name.to_string(),
                Ipv6Address {
                    ip: Ipv6Addr::from(hex(addr)?),
                    prefix_len,
                    flags: u32::try_from(hex(flags)?).ok()?,
                },
            ))
        })
        .collect()
}

/// The interface of the first IPv6 default route in `/proc/net/ipv6_route` text (`::/0`;
/// not the kernel's `lo` null entry nor reject routes). The file lists every table, so a
/// policy-routing table's default counts too.
pub fn parse_default_route6(route_table: &str) -> Option<String> {
    route_table.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dst dst_len src src_len next_hop metric refcnt use flags name
        let [dst, dst_len, _, _, _, _, _, _, flags, name] = f.as_slice() else {
            return None;
        };
        let default = dst.len() == 32 && hex(dst) == Some(0) && *dst_len == "00";
        let usable = *name != "lo" && hex(flags)? & u128::from(RTF_REJECT) == 0;
        (default && usable).then(|| name.to_string())
    })
}

/// The interface holding this network namespace's IPv6 default route (None also when the
/// kernel has IPv6 off).
pub fn default_route_iface6() -> Result<Option<String>> {
    Ok(read_optional(IPV6_ROUTE)?.and_then(|t| parse_default_route6(&t)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// The IPv4 part alone (None when IPv4 is off).
    trait Ipv4Part {
        fn ipv4_interface(&self) -> Option<ExternalInterface>;
    }

    impl Ipv4Part for Chosen {
        fn ipv4_interface(&self) -> Option<ExternalInterface> {
            self.v4.is_some().then(|| ExternalInterface {
                v6: None,
                ..self.clone()
            })
        }
    }

    use super::*;

    fn ifaces() -> Vec<IfaceInfo> {
        vec![
            IfaceInfo {
                name: "lo".into(),
                index: 1,
                ipv4: vec![(Ipv4Addr::LOCALHOST, 8)],
                ipv6: vec![],
                mtu: 65536,
            },
            IfaceInfo {
                name: "eth0".into(),
                index: 2,
                ipv4: vec![(Ipv4Addr::new(192, 168, 1, 5), 24)],
                ipv6: vec![],
                mtu: 1500,
            },
            IfaceInfo {
                name: "eth1".into(),
                index: 3,
                ipv4: vec![
                    (Ipv4Addr::new(10, 1, 0, 7), 16),
                    (Ipv4Addr::new(10, 1, 0, 8), 16),
                ],
                ipv6: vec![],
                mtu: 9000,
            },
            IfaceInfo {
                name: "eth2".into(),
                index: 4,
                ipv4: vec![],
                ipv6: vec![],
                mtu: 1500,
            },
        ]
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_route_interface() {
        let e = choose(&ifaces(), Some("eth0"), &[], &[], None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.index, e.mtu, e.v4.unwrap().prefix_len),
            ("eth0", 2, 1500, 24)
        );
        assert_eq!(e.public_ip(), Ipv4Addr::new(192, 168, 1, 5));
        let err = choose(&ifaces(), None, &[], &[], None).unwrap_err();
        assert!(err.to_string().contains("no default route"));
    }

    #[test]
    fn iface_by_name_or_ip_in_order() {
        let e = choose(&ifaces(), Some("eth0"), &s(&["eth9", "eth1"]), &[], None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.v4.unwrap().iface_ip),
            ("eth1", Ipv4Addr::new(10, 1, 0, 7))
        );
        let e = choose(&ifaces(), None, &s(&["10.1.0.8"]), &[], None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.v4.unwrap().iface_ip),
            ("eth1", Ipv4Addr::new(10, 1, 0, 8))
        );
        let err = choose(&ifaces(), Some("eth0"), &s(&["eth9"]), &[], None).unwrap_err();
        assert!(err.to_string().contains("none of the interfaces"));
        let err = choose(&ifaces(), None, &s(&["eth2"]), &[], None).unwrap_err();
        assert_eq!(err.to_string(), "interface eth2 has no IPv4 address");
    }

    #[test]
    fn regex_matches_ips_then_names() {
        let e = choose(&ifaces(), None, &[], &s(&[r"^10\.1\.0\.8$"]), None).unwrap();
        assert_eq!(e.v4.unwrap().iface_ip, Ipv4Addr::new(10, 1, 0, 8));
        let e = choose(&ifaces(), None, &[], &s(&["^eth1$"]), None).unwrap();
        assert_eq!(e.v4.unwrap().iface_ip, Ipv4Addr::new(10, 1, 0, 7));
        assert!(choose(&ifaces(), None, &[], &s(&["("]), None).is_err());
    }

    #[test]
    fn public_ip_overrides_the_published_address() {
        let e = choose(
            &ifaces(),
            Some("eth0"),
            &[],
            &[],
            Some(Ipv4Addr::new(1, 2, 3, 4)),
        )
        .unwrap();
        assert_eq!(e.v4.unwrap().iface_ip, Ipv4Addr::new(192, 168, 1, 5));
        assert_eq!(e.public_ip(), Ipv4Addr::new(1, 2, 3, 4));
    }

    #[test]
    fn proc_net_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_route(t), Some("eth0".into()));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    }

    // ---- IPv6 / dual stack ----

    fn a6(ip: &str, prefix_len: u8, flags: u32) -> Ipv6Address {
        Ipv6Address {
            ip: ip.parse().unwrap(),
            prefix_len,
            flags,
        }
    }

    fn info(name: &str, index: u32, v4: &[(&str, u8)], ipv6: Vec<Ipv6Address>) -> IfaceInfo {
        IfaceInfo {
            name: name.into(),
            index,
            ipv4: v4.iter().map(|(a, l)| (a.parse().unwrap(), *l)).collect(),
            ipv6,
            mtu: 1400 + index,
        }
    }

    /// eth0 holds both default routes and mixed IPv6 addresses; eth1 is dual stack; eth2 has
    /// IPv6 only; eth3 IPv6 link-local only; eth4 an IPv6 address whose DAD failed.
    fn snap() -> Snapshot {
        Snapshot {
            ifaces: vec![
                info("lo", 1, &[("127.0.0.1", 8)], vec![a6("::1", 128, 0x80)]),
                info(
                    "eth0",
                    2,
                    &[("192.168.1.5", 24)],
                    vec![
                        a6("2001:db8::beef", 64, 0x01),
                        a6("fe80::1", 64, 0x80),
                        a6("2001:db8::5", 64, 0x00),
                        a6("2001:db8::dead", 64, 0x20),
                        a6("fd00:210::11", 64, 0x80),
                    ],
                ),
                info(
                    "eth1",
                    3,
                    &[("10.1.0.7", 16), ("10.1.0.8", 16)],
                    vec![a6("fe80::7", 64, 0x80), a6("fd01::7", 48, 0x80)],
                ),
                info("eth2", 4, &[], vec![a6("fd02::2", 64, 0x80)]),
                info(
                    "eth3",
                    5,
                    &[("172.16.0.3", 24)],
                    vec![a6("fe80::3", 64, 0x80)],
                ),
                info(
                    "eth4",
                    6,
                    &[("172.17.0.4", 24)],
                    vec![a6("fd04::4", 64, 0x48)],
                ),
            ],
            default_v4: Some("eth0".into()),
            default_v6: Some("eth0".into()),
        }
    }

    /// `name v4 v6`, each family `iface_ip/len>public_ip` or `-`.
    fn show(c: &Chosen) -> String {
        let v4 = c.v4.map_or("-".into(), |f| {
            format!("{}/{}>{}", f.iface_ip, f.prefix_len, f.public_ip)
        });
        let v6 = c.v6.map_or("-".into(), |f| {
            format!("{}/{}>{}", f.iface_ip, f.prefix_len, f.public_ip)
        });
        format!("{} {v4} {v6}", c.name)
    }

    const V4: (bool, bool) = (true, false);
    const V6: (bool, bool) = (false, true);
    const DUAL: (bool, bool) = (true, true);

    /// (families, --iface, --iface-regex, --public-ip, --public-ipv6, expected: `show` of
    /// the result, or `ERR ` and a part of the error).
    type Case = (
        (bool, bool),
        &'static [&'static str],
        &'static [&'static str],
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    );

    fn run_cases(snap: &Snapshot, cases: &[Case]) {
        for (i, (fam, iface, regex, p4, p6, want)) in cases.iter().enumerate() {
            let (iface, regex) = (s(iface), s(regex));
            let w = Wanted {
                ipv4: fam.0,
                ipv6: fam.1,
                iface: &iface,
                iface_regex: &regex,
                public_ip: p4.map(|p| p.parse().unwrap()),
                public_ipv6: p6.map(|p| p.parse().unwrap()),
            };
            let got = match choose_families(snap, &w) {
                Ok(c) => {
                    assert_eq!(c.v4.is_some(), fam.0, "case {i}");
                    assert_eq!(c.v6.is_some(), fam.1, "case {i}");
                    let found = snap.ifaces.iter().find(|x| x.name == c.name).unwrap();
                    assert_eq!((c.index, c.mtu), (found.index, found.mtu), "case {i}");
                    show(&c)
                }
                Err(e) => format!("ERR {e:#}"),
            };
            match want.strip_prefix("ERR ") {
                Some(part) => assert!(
                    got.starts_with("ERR ") && got.contains(part),
                    "case {i} {w:?}: want an error with {part:?}, got {got}"
                ),
                None => assert_eq!(got, *want, "case {i} {w:?}"),
            }
        }
    }

    const DUAL_ETH0: &str = "eth0 192.168.1.5/24>192.168.1.5 fd00:210::11/64>fd00:210::11";
    const DUAL_ETH1: &str = "eth1 10.1.0.7/16>10.1.0.7 fd01::7/48>fd01::7";
    const DUAL_ETH1_8: &str = "eth1 10.1.0.8/16>10.1.0.8 fd01::7/48>fd01::7";

    #[test]
    fn no_iface_flags_public_addresses_then_default_routes() {
        run_cases(
            &snap(),
            &[
                (
                    V6,
                    &[],
                    &[],
                    None,
                    None,
                    "eth0 - fd00:210::11/64>fd00:210::11",
                ),
                (DUAL, &[], &[], None, None, DUAL_ETH0),
                (
                    V4,
                    &[],
                    &[],
                    None,
                    None,
                    "eth0 192.168.1.5/24>192.168.1.5 -",
                ),
                // IPv4 only: --public-ipv6 ignored, and --public-ip (as before) only published.
                (
                    V4,
                    &[],
                    &[],
                    Some("10.1.0.8"),
                    Some("fd01::7"),
                    "eth0 192.168.1.5/24>10.1.0.8 -",
                ),
                // IPv6 only: --public-ip ignored; --public-ipv6 on an interface picks it …
                (
                    V6,
                    &[],
                    &[],
                    Some("10.1.0.8"),
                    None,
                    "eth0 - fd00:210::11/64>fd00:210::11",
                ),
                (
                    V6,
                    &[],
                    &[],
                    None,
                    Some("fd01::7"),
                    "eth1 - fd01::7/48>fd01::7",
                ),
                (
                    V6,
                    &[],
                    &[],
                    None,
                    Some("2001:db8::5"),
                    "eth0 - 2001:db8::5/64>2001:db8::5",
                ),
                // … and one on no interface (NAT) is published from the default route's.
                (
                    V6,
                    &[],
                    &[],
                    None,
                    Some("2001:db8::99"),
                    "eth0 - fd00:210::11/64>2001:db8::99",
                ),
                // Dual stack: the interface holding --public-ip, with --public-ipv6 there too.
                (DUAL, &[], &[], Some("10.1.0.8"), None, DUAL_ETH1_8),
                (
                    DUAL,
                    &[],
                    &[],
                    Some("10.1.0.8"),
                    Some("fd01::7"),
                    DUAL_ETH1_8,
                ),
                (
                    DUAL,
                    &[],
                    &[],
                    Some("10.1.0.8"),
                    Some("2001:db8::99"),
                    "eth1 10.1.0.8/16>10.1.0.8 fd01::7/48>2001:db8::99",
                ),
                (
                    DUAL,
                    &[],
                    &[],
                    Some("10.1.0.8"),
                    Some("fd00:210::11"),
                    "ERR v6 interface eth0 must be the same with v4 interface eth1",
                ),
                // --public-ip on no interface: --public-ipv6's interface, else the default routes.
                (
                    DUAL,
                    &[],
                    &[],
                    Some("1.2.3.4"),
                    None,
                    "eth0 192.168.1.5/24>1.2.3.4 fd00:210::11/64>fd00:210::11",
                ),
                (
                    DUAL,
                    &[],
                    &[],
                    Some("1.2.3.4"),
                    Some("fd01::7"),
                    "eth1 10.1.0.7/16>1.2.3.4 fd01::7/48>fd01::7",
                ),
                (DUAL, &[], &[], None, Some("fd01::7"), DUAL_ETH1),
                (
                    DUAL,
                    &[],
                    &[],
                    None,
                    Some("fd02::2"),
                    "ERR interface eth2 has no IPv4 address",
                ),
                (
                    (false, false),
                    &[],
                    &[],
                    None,
                    None,
                    "ERR neither EnableIPv4 nor EnableIPv6",
                ),
            ],
        );
    }

    #[test]
    fn default_routes_per_family() {
        let with = |d4: Option<&str>, d6: Option<&str>| Snapshot {
            default_v4: d4.map(String::from),
            default_v6: d6.map(String::from),
            ..snap()
        };
        let none: &[&str] = &[];
        let case = |fam, want| (fam, none, none, None, None, want);
        run_cases(
            &with(Some("eth0"), Some("eth1")),
            &[
                case(DUAL, "ERR v6 default route interface eth1 must be the same with v4 default route interface eth0"),
                case(V6, "eth1 - fd01::7/48>fd01::7"),
                case(V4, "eth0 192.168.1.5/24>192.168.1.5 -"),
            ],
        );
        run_cases(
            &with(Some("eth0"), None),
            &[
                case(V6, "ERR no IPv6 default route, so no default interface: give --iface or --iface-regex"),
                case(DUAL, "ERR no IPv6 default route"),
            ],
        );
        run_cases(
            &with(None, Some("eth0")),
            &[case(DUAL, "ERR no IPv4 default route")],
        );
        // A link-local address is the last resort; DAD failed is none; the route's interface
        // must exist; dual stack needs IPv4 on it.
        run_cases(
            &with(None, Some("eth3")),
            &[case(V6, "eth3 - fe80::3/64>fe80::3")],
        );
        run_cases(
            &with(Some("eth4"), Some("eth4")),
            &[
                case(V6, "ERR interface eth4 has no usable IPv6 address"),
                case(DUAL, "ERR interface eth4 has no usable IPv6 address (global or link-local, not deprecated, DAD not failed), which EnableIPv6 needs"),
            ],
        );
        run_cases(
            &with(None, Some("eth9")),
            &[case(V6, "ERR default route interface eth9 not found")],
        );
        run_cases(
            &with(Some("eth2"), Some("eth2")),
            &[case(DUAL, "ERR interface eth2 has no IPv4 address")],
        );
    }

    #[test]
    fn iface_names_and_addresses() {
        run_cases(
            &snap(),
            &[
                (V6, &["eth2"], &[], None, None, "eth2 - fd02::2/64>fd02::2"),
                (V6, &["eth2"], &[], None, Some("2001:db8::99"), "eth2 - fd02::2/64>2001:db8::99"),
                // A candidate lacking an enabled family is passed over for the next one.
                (DUAL, &["eth2", "eth1"], &[], None, None, DUAL_ETH1),
                (DUAL, &["eth4", "eth3"], &[], None, None, "eth3 172.16.0.3/24>172.16.0.3 fe80::3/64>fe80::3"),
                (DUAL, &["eth4", "eth9"], &[], None, None, "ERR none of the interfaces given fits: --iface eth4: interface eth4 has no usable IPv6 address"),
                (DUAL, &["eth4", "eth9"], &[], None, None, "ERR ; --iface eth9: no such interface"),
                // An IPv4 address.
                (V6, &["10.1.0.8"], &[], None, None, "ERR --iface 10.1.0.8: an IPv4 address, but EnableIPv4 is off"),
                (DUAL, &["10.1.0.8"], &[], None, None, DUAL_ETH1_8),
                (DUAL, &["10.1.0.8"], &[], Some("1.2.3.4"), Some("fd01::7"), "eth1 10.1.0.8/16>1.2.3.4 fd01::7/48>fd01::7"),
                (DUAL, &["10.1.0.8"], &[], None, Some("fd00:210::11"), "ERR v6 interface eth0 must be the same with v4 interface eth1"),
                (DUAL, &["10.1.0.8"], &[], None, Some("2001:db8::99"), "ERR --public-ipv6 2001:db8::99 is on no interface"),
                (DUAL, &["10.1.0.8", "eth0"], &[], None, Some("fd00:210::11"), DUAL_ETH0),
                (DUAL, &["10.9.9.9"], &[], None, None, "ERR --iface 10.9.9.9: no interface has this address"),
                // An IPv6 address: held among all addresses (also deprecated ones, as flannel).
                (V6, &["fd01::7"], &[], None, None, "eth1 - fd01::7/48>fd01::7"),
                (V6, &["fe80::7"], &[], None, None, "eth1 - fe80::7/64>fe80::7"),
                (V6, &["2001:db8::dead"], &[], None, None, "eth0 - 2001:db8::dead/64>2001:db8::dead"),
                (V6, &["fd09::9"], &[], None, None, "ERR no interface has this address"),
                // Dual stack without --public-ipv6 (flannel panics): the interface holding it.
                (DUAL, &["fd01::7"], &[], None, None, DUAL_ETH1),
                // Dual stack with --public-ipv6: flannel's choice, the interface holding that.
                (DUAL, &["fd01::7"], &[], None, Some("fd00:210::11"), DUAL_ETH0),
                (DUAL, &["fd01::7"], &[], None, Some("2001:db8::99"), "ERR --public-ipv6 2001:db8::99 is on no interface"),
                // IPv4 only: as before (an IPv6 address is no candidate there).
                (V4, &["fd01::7"], &[], None, None, "ERR none of the interfaces given (--iface [\"fd01::7\"], --iface-regex []) exists"),
                (V4, &["10.1.0.8"], &[], None, Some("fd00:210::11"), "eth1 10.1.0.8/16>10.1.0.8 -"),
            ],
        );
    }

    #[test]
    fn iface_regex_per_family() {
        run_cases(
            &snap(),
            &[
                (V6, &[], &["^fd01:"], None, None, "eth1 - fd01::7/48>fd01::7"),
                // The usable addresses in flannel's order: 2001:db8::5 before the temporary one.
                (V6, &[], &["^2001:db8::"], None, None, "eth0 - 2001:db8::5/64>2001:db8::5"),
                (V6, &[], &["^fe80::7$"], None, None, "eth1 - fe80::7/64>fe80::7"),
                // Deprecated addresses are not matched; then names are.
                (V6, &[], &["dead"], None, None, "ERR no interface has a matching IPv6 address or name (available: lo:[], eth0:[fd00:210::11 2001:db8::5 2001:db8::beef fe80::1]"),
                (V6, &[], &["^eth2$"], None, None, "eth2 - fd02::2/64>fd02::2"),
                (V6, &[], &["^10\\.1\\."], None, None, "ERR no interface has a matching IPv6 address or name"),
                // Dual stack: an IPv4 and an IPv6 address of one interface must both match.
                (DUAL, &[], &["^(10\\.1\\.0\\.8|fd01::7)$"], None, None, DUAL_ETH1_8),
                (DUAL, &[], &["^10\\.1\\.0\\."], None, None, "ERR no interface has an IPv4 and an IPv6 address both matching, nor a matching name (available: lo:[127.0.0.1]"),
                (DUAL, &[], &["^(192\\.168\\.1\\.5|fd01::7)$"], None, None, "ERR both matching"),
                (DUAL, &[], &["^eth1$"], None, None, DUAL_ETH1),
                (DUAL, &[], &["^nothing$", "^eth3$"], None, None, "eth3 172.16.0.3/24>172.16.0.3 fe80::3/64>fe80::3"),
                (DUAL, &[], &["^eth2$"], None, None, "ERR interface eth2 has no IPv4 address"),
                (DUAL, &["eth9"], &["^eth1$"], None, None, DUAL_ETH1),
                (DUAL, &[], &["("], None, None, "ERR --iface-regex \"(\""),
                (V6, &[], &["("], None, None, "ERR --iface-regex \"(\""),
            ],
        );
    }

    #[test]
    fn ipv4_only_is_todays_choice() {
        let mut sn = snap();
        // Today's fixture plus IPv6 addresses: the IPv4 result must not notice them.
        sn.ifaces.extend(ifaces().into_iter().map(|mut i| {
            i.name += "x";
            i.ipv6 = vec![a6("fd0f::1", 64, 0x80)];
            i
        }));
        let inputs: &[(&[&str], &[&str], Option<&str>)] = &[
            (&[], &[], None),
            (&[], &[], Some("1.2.3.4")),
            (&[], &[], Some("10.1.0.8")),
            (&["eth9", "eth1x"], &[], None),
            (&["10.1.0.8"], &[], Some("1.2.3.4")),
            (&["eth2"], &[], None),
            (&["eth2x"], &[], None),
            (&["fd0f::1"], &[], None),
            (&[], &["^10\\.1\\.0\\.8$"], None),
            (&[], &["^eth1x$"], None),
            (&[], &["fd0f"], None),
            (&[], &["("], None),
        ];
        for (iface, regex, p) in inputs {
            let (iface, regex) = (s(iface), s(regex));
            let p = p.map(|p| p.parse().unwrap());
            let today = choose(&sn.ifaces, Some("eth0"), &iface, &regex, p);
            let w = Wanted {
                ipv4: true,
                ipv6: false,
                iface: &iface,
                iface_regex: &regex,
                public_ip: p,
                public_ipv6: Some("fd0f::1".parse().unwrap()),
            };
            let new = choose_families(&sn, &w);
            match (today, new) {
                (Ok(t), Ok(n)) => {
                    assert_eq!(n.v6, None);
                    assert_eq!(n.ipv4_interface(), Some(t.clone()), "{iface:?} {regex:?}");
                    assert_eq!(t, n, "the IPv4-only choice is today's, v6 None");
                }
                (Err(t), Err(n)) => assert_eq!(t.to_string(), n.to_string()),
                (t, n) => panic!("{iface:?} {regex:?}: today {t:?}, now {n:?}"),
            }
        }
        let dual = choose_families(
            &snap(),
            &Wanted {
                ipv4: true,
                ipv6: true,
                iface: &[],
                iface_regex: &[],
                public_ip: None,
                public_ipv6: None,
            },
        )
        .unwrap();
        assert_eq!(
            dual.ipv4_interface().unwrap(),
            choose(&snap().ifaces, Some("eth0"), &[], &[], None).unwrap()
        );
        let v6 = Chosen { v4: None, ..dual };
        assert_eq!(v6.ipv4_interface(), None);
    }

    #[test]
    fn usable_ipv6_filter_and_flannels_order() {
        let i = info(
            "x",
            1,
            &[],
            vec![
                a6("fe80::1", 64, 0x80),
                a6("2001:db8::3", 64, 0x01), // dynamic, temporary
                a6("2001:db8::2", 64, 0x00), // dynamic (SLAAC/DHCP)
                a6("fd00::b", 64, 0x80),     // permanent
                a6("fd00::a", 64, 0xc0),     // permanent, tentative: kept (flannel)
                a6("::1", 128, 0x80),        // loopback
                a6("ff02::1", 64, 0x80),     // multicast
                a6("::", 0, 0x80),           // unspecified
                a6("2001:db8::4", 64, 0xa0), // deprecated
                a6("fd00::c", 64, 0x48),     // DAD failed
                a6("fe80::2", 64, 0x00),     // dynamic link-local
                a6("2001:db8::6", 64, 0x81), // permanent, temporary
                a6("fec0::1", 64, 0x80),     // site-local: global unicast for Go
            ],
        );
        let got: Vec<String> = i.usable_ipv6().iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(
            got,
            [
                "fd00::b",
                "fd00::a",
                "fec0::1",
                "2001:db8::6",
                "2001:db8::2",
                "2001:db8::3",
                "fe80::1",
                "fe80::2"
            ]
        );
    }

    /// /proc/net/if_inet6 of a namespace on this kernel (6.18): `va` with
    /// `fd00:210::11/64 nodad`, `2001:db8::5/64 valid_lft 600 preferred_lft 300` (dynamic,
    /// still tentative), `2001:db8::dead/64 preferred_lft 0` (deprecated), its link-local; `vb`
    /// with `fd01::7/64`; then lines that must be skipped.
    const IF_INET6_TEXT: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
20010db800000000000000000000dead 03 40 00 e0       va
fe80000000000000dcb471fffe8b14ba 03 40 20 c0       va
fd000210000000000000000000000011 03 40 00 82       va
20010db8000000000000000000000005 03 40 00 40       va
fd010000000000000000000000000007 02 40 00 c0       vb
fd010000000000000000000000000008 1a2 30 00 80 a-long-name0
fd01000000000000000000000000000 02 40 00 80 short
fd01000000000000000000000000000g 02 40 00 80 nonhex
fd010000000000000000000000000009 02 81 00 80 plen
fd010000000000000000000000000009 02 40 00 80
+d010000000000000000000000000009 02 40 00 80 sign
fd010000000000000000000000000009 02 +40 00 80 sign2

";

    #[test]
    fn proc_net_if_inet6() {
        let got = parse_if_inet6(IF_INET6_TEXT);
        let want = [
            ("lo", a6("::1", 128, 0x80)),
            ("va", a6("2001:db8::dead", 64, 0xe0)),
            ("va", a6("fe80::dcb4:71ff:fe8b:14ba", 64, 0xc0)),
            ("va", a6("fd00:210::11", 64, 0x82)),
            ("va", a6("2001:db8::5", 64, 0x40)),
            ("vb", a6("fd01::7", 64, 0xc0)),
            ("a-long-name0", a6("fd01::8", 48, 0x80)),
        ];
        let want: Vec<(String, Ipv6Address)> =
            want.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
        assert_eq!(got, want);
        let va = info(
            "va",
            3,
            &[],
            got.iter()
                .filter(|(n, _)| n == "va")
                .map(|(_, a)| *a)
                .collect(),
        );
        let usable: Vec<String> = va.usable_ipv6().iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(
            usable,
            ["fd00:210::11", "2001:db8::5", "fe80::dcb4:71ff:fe8b:14ba"]
        );
        assert!(parse_if_inet6("").is_empty());
    }

    /// /proc/net/ipv6_route of this host (default via eth0, the `lo` null entry last).
    const IPV6_ROUTE_HOST: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    /// The default-route lines of a namespace with `unreachable default metric 100` (on `lo`,
    /// RTF_REJECT), `default via fd00:210::1 dev va` and, in table 100,
    /// `default via fd00:210::2 dev vb` (the file lists every table, that one first).
    const IPV6_ROUTE_NS: &str = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000210000000000000000000000002 00000800 00000001 00000000 00000003       vb
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000064 00000001 00000000 00200200       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000210000000000000000000000001 00000400 00000001 00000000 00000003       va
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    /// The readers on this machine's namespace: every interface of if_inet6 that getifaddrs
    /// lists carries its addresses, and the default route is the file's.
    #[test]
    fn system_snapshot_reads_this_namespace() {
        let snap = system_snapshot().unwrap();
        let lo = snap.ifaces.iter().find(|i| i.name == "lo").unwrap();
        assert!(lo.ipv4.contains(&(Ipv4Addr::LOCALHOST, 8)), "{lo:?}");
        let text = std::fs::read_to_string(IF_INET6).unwrap_or_default();
        for (name, a) in parse_if_inet6(&text) {
            if let Some(i) = snap.ifaces.iter().find(|i| i.name == name) {
                assert!(i.ipv6.iter().any(|b| b.ip == a.ip), "{name} {a:?} {i:?}");
            }
        }
        if text.contains(" lo\n") {
            assert!(
                lo.ipv6.iter().any(|a| a.ip == Ipv6Addr::LOCALHOST),
                "{lo:?}"
            );
            assert!(lo.usable_ipv6().is_empty());
        }
        let routes = std::fs::read_to_string(IPV6_ROUTE).unwrap_or_default();
        assert_eq!(snap.default_v6, parse_default_route6(&routes));
    }

    #[test]
    fn proc_net_ipv6_route() {
        assert_eq!(parse_default_route6(IPV6_ROUTE_HOST), Some("eth0".into()));
        assert_eq!(parse_default_route6(IPV6_ROUTE_NS), Some("vb".into()));
        let without_vb: String = IPV6_ROUTE_NS
            .lines()
            .filter(|l| !l.ends_with("vb"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_default_route6(&without_vb), Some("va".into()));
        // Only the null entry and reject routes: no default route.
        let only_lo: String = IPV6_ROUTE_HOST
            .lines()
            .filter(|l| l.ends_with("lo"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_default_route6(&only_lo), None);
        let reject_on_eth0 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200     eth0\n";
        assert_eq!(parse_default_route6(reject_on_eth0), None);
        // Not a default: a prefix length, a destination, malformed lines.
        for line in [
            "00000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003 eth0",
            "20000000000000000000000000000000 03 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003 eth0",
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003",
            "0 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003 eth0",
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 zz eth0",
            "",
        ] {
            assert_eq!(parse_default_route6(line), None, "{line}");
        }
    }
}
