//! Which address families each backend's data plane carries (pure), and the refusal of a
//! config that asks for one it does not: with `EnableIPv6` and no IPv6 data plane, pods would
//! get IPv6 addresses (the subnet file carries `FLANNEL_IPV6_*`) that no node routes, and
//! flannel nodes would skip our leases for lack of `BackendV6Data`. A clear error beats that
//! hole; each data plane lifts its row when it carries the family.

use subnet_lease::config::NetConfig;

/// (backend type, carries IPv4, carries IPv6). `alloc` has no data plane: a lease of either
/// family is all it promises.
const FAMILIES: &[(&str, bool, bool)] = &[
    ("vxlan", true, false),
    ("host-gw", true, false),
    ("udp", true, false),
    ("alloc", true, true),
];

/// `Err` (the message names the setting and the backend) when `cfg` enables a family its
/// backend does not carry.
pub fn check(cfg: &NetConfig) -> Result<(), String> {
    let t = cfg.backend.backend_type.as_str();
    let (v4, v6) = FAMILIES
        .iter()
        .find(|(name, _, _)| *name == t)
        .map_or((false, false), |(_, v4, v6)| (*v4, *v6));
    if cfg.enable_ipv6 && !v6 {
        return Err(format!(
            "EnableIPv6 is true but backend {t} carries IPv4 only here: pods would get IPv6 \
             addresses that no node routes. Remove EnableIPv6/IPv6Network from the network \
             config, or use backend alloc (leases only)"
        ));
    }
    if cfg.enable_ipv4 && !v4 {
        return Err(format!("backend {t} does not carry IPv4"));
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

    #[test]
    fn ipv6_is_refused_where_no_data_plane_carries_it() {
        for t in ["vxlan", "host-gw", "udp"] {
            let c = cfg(&format!(
                r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{{"Type":"{t}"}}}}"#
            ));
            let e = check(&c).unwrap_err();
            assert!(e.contains("EnableIPv6") && e.contains(t), "{e}");
            let c = cfg(&format!(
                r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{t}"}}}}"#
            ));
            assert_eq!(check(&c), Ok(()));
        }
        let c = cfg(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"alloc"}}"#,
        );
        assert_eq!(check(&c), Ok(()));
    }
}
