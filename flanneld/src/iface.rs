//! Choosing the external interface: `--iface` (names or IPs, in order), `--iface-regex`
//! (matched against IPs, then names), else the interface holding the default route.
//! [`choose`] is pure; [`system_interfaces`] and [`default_route_iface`] read the system.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context, Result};
use backends::ExternalInterface;
use regex::Regex;

/// One interface as the system reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceInfo {
    pub name: String,
    pub index: u32,
    /// Addresses with their prefix lengths.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    pub mtu: u32,
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
        iface_ip,
        prefix_len,
        public_ip: public_ip.unwrap_or(iface_ip),
        mtu: i.mtu,
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

/// Every interface with its IPv4 addresses and MTU.
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
        out.push(IfaceInfo {
            name,
            index,
            ipv4,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ifaces() -> Vec<IfaceInfo> {
        vec![
            IfaceInfo {
                name: "lo".into(),
                index: 1,
                ipv4: vec![(Ipv4Addr::LOCALHOST, 8)],
                mtu: 65536,
            },
            IfaceInfo {
                name: "eth0".into(),
                index: 2,
                ipv4: vec![(Ipv4Addr::new(192, 168, 1, 5), 24)],
                mtu: 1500,
            },
            IfaceInfo {
                name: "eth1".into(),
                index: 3,
                ipv4: vec![
                    (Ipv4Addr::new(10, 1, 0, 7), 16),
                    (Ipv4Addr::new(10, 1, 0, 8), 16),
                ],
                mtu: 9000,
            },
            IfaceInfo {
                name: "eth2".into(),
                index: 4,
                ipv4: vec![],
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
            (e.name.as_str(), e.index, e.mtu, e.prefix_len),
            ("eth0", 2, 1500, 24)
        );
        assert_eq!(e.public_ip, Ipv4Addr::new(192, 168, 1, 5));
        let err = choose(&ifaces(), None, &[], &[], None).unwrap_err();
        assert!(err.to_string().contains("no default route"));
    }

    #[test]
    fn iface_by_name_or_ip_in_order() {
        let e = choose(&ifaces(), Some("eth0"), &s(&["eth9", "eth1"]), &[], None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_ip),
            ("eth1", Ipv4Addr::new(10, 1, 0, 7))
        );
        let e = choose(&ifaces(), None, &s(&["10.1.0.8"]), &[], None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_ip),
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
        assert_eq!(e.iface_ip, Ipv4Addr::new(10, 1, 0, 8));
        let e = choose(&ifaces(), None, &[], &s(&["^eth1$"]), None).unwrap();
        assert_eq!(e.iface_ip, Ipv4Addr::new(10, 1, 0, 7));
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
        assert_eq!(e.iface_ip, Ipv4Addr::new(192, 168, 1, 5));
        assert_eq!(e.public_ip, Ipv4Addr::new(1, 2, 3, 4));
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
}
