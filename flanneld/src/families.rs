//! Which address families each part of the node carries (pure), and the refusal of a config
//! that asks for one a running part does not: with `EnableIPv6` and no IPv6 data plane, pods
//! would get IPv6 addresses (the subnet file carries `FLANNEL_IPV6_*`) that no node routes, and
//! flannel nodes would skip our leases for lack of `BackendV6Data`; an IPv6-only node's pods
//! would be invisible to the parts that know pods by their IPv4 records. A clear error beats
//! either hole; each part lifts its row when it carries the family.

use subnet_lease::config::NetConfig;

/// (backend type, carries IPv4, carries IPv6). `alloc` has no data plane: a lease of either
/// family is all it promises.
const BACKENDS: &[(&str, bool, bool)] = &[
    ("vxlan", true, true),
    ("host-gw", true, true),
    ("udp", true, true),
    // IPv6 on flannel-wg-v6 (Mode "separate"; the backend refuses the other modes with
    // EnableIPv6, docs/wireguard.md).
    ("wireguard", true, true),
    ("alloc", true, true),
];

/// The optional parts this node runs besides the backend (from the flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Parts {
    /// `--proxy-mode` other than `none`.
    pub proxy: bool,
    /// `--network-policy`.
    pub policy: bool,
    /// `--cluster-dns`.
    pub dns: bool,
    /// `--cluster-dns-addr` has an IPv6 address (IPv6-only pods can reach the DNS).
    pub dns_v6: bool,
}

// The optional parts carry both families in a dual-stack cluster: the proxy (tables ip and
// ip6 flannel-proxy), network policy (ip and ip6 flannel-policy: no IPv6 packet of a pod
// escapes it) and cluster DNS (AAAA answers). On an IPv6-only node the proxy and policy work
// from the pods' IPv6 records; the DNS needs an IPv6 listen address.

impl Parts {
    pub fn of(flags: &crate::flags::Flags) -> Self {
        Parts {
            proxy: flags.proxy_mode != "none",
            policy: flags.network_policy,
            dns: flags.cluster_dns,
            dns_v6: flags.cluster_dns_addr.iter().any(std::net::IpAddr::is_ipv6),
        }
    }
}

/// `Err` (the message names the setting, the part and the way out) when `cfg` enables a family
/// its backend or one of `parts` does not carry.
pub fn check(cfg: &NetConfig, parts: Parts) -> Result<(), String> {
    let t = cfg.backend.backend_type.as_str();
    let (v4, v6) = BACKENDS
        .iter()
        .find(|(name, _, _)| *name == t)
        .map_or((false, false), |(_, v4, v6)| (*v4, *v6));
    if cfg.enable_ipv6 && !v6 {
        return Err(format!(
            "EnableIPv6 is true but backend {t} carries IPv4 only here: pods would get IPv6 \
             addresses that no node routes. Use backend vxlan, host-gw, udp or wireguard, or remove \
             EnableIPv6/IPv6Network from the network config"
        ));
    }
    if cfg.enable_ipv4 && !v4 {
        return Err(format!("backend {t} does not carry IPv4"));
    }
    if parts.dns && !cfg.enable_ipv4 && !parts.dns_v6 {
        return Err(
            "EnableIPv4 is false but cluster DNS (--cluster-dns) listens on IPv4 addresses only \
             (--cluster-dns-addr): IPv6-only pods could not reach it. Give it an IPv6 address, \
             e.g. --cluster-dns-addr fd00:53::10"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> NetConfig {
        subnet_lease::config::parse(text).unwrap().config
    }

    const NONE: Parts = Parts {
        proxy: false,
        policy: false,
        dns: false,
        dns_v6: false,
    };

    fn dual(t: &str) -> NetConfig {
        cfg(&format!(
            r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{t}"}}}}"#
        ))
    }

    fn v6only(t: &str) -> NetConfig {
        cfg(&format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{t}"}}}}"#
        ))
    }

    #[test]
    fn ipv6_is_refused_where_no_data_plane_carries_it() {
        // A type without a row (the config parser refuses unknown types first) is refused.
        for mut c in [dual("vxlan"), v6only("vxlan")] {
            c.backend.backend_type = "ipip".into();
            let e = check(&c, NONE).unwrap_err();
            assert!(e.contains("EnableIPv6") && e.contains("ipip"), "{e}");
        }
        for t in ["vxlan", "host-gw", "udp", "wireguard", "alloc"] {
            assert_eq!(check(&dual(t), NONE), Ok(()), "{t}");
            assert_eq!(check(&v6only(t), NONE), Ok(()), "{t}");
        }
        for t in ["vxlan", "host-gw", "udp", "alloc"] {
            let c = cfg(&format!(
                r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{t}"}}}}"#
            ));
            let all = Parts {
                proxy: true,
                policy: true,
                dns: true,
                dns_v6: false,
            };
            assert_eq!(check(&c, all), Ok(()), "IPv4 runs everything on {t}");
        }
    }

    #[test]
    fn parts_run_dual_stack_and_ipv6_only_where_pods_can_reach_them() {
        let all = Parts {
            proxy: true,
            policy: true,
            dns: true,
            dns_v6: false,
        };
        assert_eq!(check(&dual("vxlan"), all), Ok(()));
        let no_dns = Parts { dns: false, ..all };
        assert_eq!(check(&v6only("vxlan"), no_dns), Ok(()));
        let e = check(&v6only("vxlan"), all).unwrap_err();
        assert!(e.contains("--cluster-dns") && e.contains("IPv6"), "{e}");
        let dns6 = Parts {
            dns_v6: true,
            ..all
        };
        assert_eq!(check(&v6only("host-gw"), dns6), Ok(()));
    }
}
