//! flannel's lease data model: the key under `<prefix>/subnets/` and the JSON value.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A lease value, as flannel writes it:
/// `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{…}}`;
/// flannel's udp and alloc backends write `{"PublicIP":"…","PublicIPv6":null}` (no type, see
/// [`LeaseAttrs::data_plane`]).
/// Fields this version does not know are kept and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP", default = "unspecified_v4")]
    pub public_ip: Ipv4Addr,
    /// Always serialized (as `null` when absent), like flannel's `*ip.IP6`.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a lease without `BackendType` is reached: what flannel's udp backend writes.
pub const TYPELESS_DATA_PLANE: &str = "udp";

fn unspecified_v4() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

impl LeaseAttrs {
    /// Attributes for a node with no backend data (udp, host-gw, alloc leases).
    pub fn new(public_ip: Ipv4Addr, backend_type: impl Into<String>) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.into(),
            backend_data: None,
            backend_v6_data: None,
            extra: Map::new(),
        }
    }

    /// The data plane this lease asks peers to use: `BackendType`, or `udp` when the field is
    /// absent. flannel's udp backend (v0.20 to v0.28 at least) writes no `BackendType`, and its
    /// data plane sends to every lease whatever the type says, so a typeless lease is read the
    /// way flannel reads it. flannel's `alloc` backend writes no type either; udp datagrams to
    /// such a node are dropped there (nothing listens on 8285), which costs nothing.
    pub fn data_plane(&self) -> &str {
        if self.backend_type.is_empty() {
            TYPELESS_DATA_PLANE
        } else {
            &self.backend_type
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings, IPs and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The subnets a lease key names: IPv4, IPv6 or both (at least one).
///
/// flannel's key forms: `10.5.52.0-24` (IPv4), `10.5.52.0-24&fd10:0:0:11::-64` (dual stack) and
/// `0.0.0.0-0&fd10:0:0:11::-64` for an IPv6-only node (flannel writes its empty IPv4 net there);
/// the last is `ipv4: None` here, so no code mistakes `0.0.0.0/0` for a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

/// A lease key that is not of flannel's form `10.5.52.0-24[&fc00::-64]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subnet key {0:?}: expected like 10.5.52.0-24, 10.5.52.0-24&fc00::-64 or 0.0.0.0-0&fc00::-64")]
pub struct BadKey(pub String);

impl SubnetKey {
    pub fn v4(ipv4: Ipv4Net) -> Self {
        SubnetKey {
            ipv4: Some(ipv4),
            ipv6: None,
        }
    }

    pub fn dual(ipv4: Ipv4Net, ipv6: Ipv6Net) -> Self {
        SubnetKey {
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
        }
    }

    pub fn v6(ipv6: Ipv6Net) -> Self {
        SubnetKey {
            ipv4: None,
            ipv6: Some(ipv6),
        }
    }

    /// Parses the last path element of a lease key, as flannel's key pattern
    /// `(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$` reads it (IPv6 part lowercase),
    /// and refuses host bits.
    pub fn parse(text: &str) -> Result<Self, BadKey> {
        let bad = || BadKey(text.to_string());
        let (v4, v6) = match text.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let parse_net = |s: &str| -> Option<(String, u8)> {
            let (addr, len) = s.rsplit_once('-')?;
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
                return None;
            }
            let len: u8 = len.parse().ok()?;
            Some((addr.to_string(), len))
        };
        let (a4, l4) = parse_net(v4).ok_or_else(bad)?;
        let a4: Ipv4Addr = a4.parse().map_err(|_| bad())?;
        let ipv4 = if a4.is_unspecified() && l4 == 0 {
            // flannel's IPv6-only form: valid only with an IPv6 part.
            None
        } else {
            let net = Ipv4Net::new(a4, l4).map_err(|_| bad())?;
            if net.trunc() != net || l4 == 0 {
                return Err(bad());
            }
            Some(net)
        };
        let ipv6 = match v6 {
            None => None,
            Some(v6) => {
                let (a6, l6) = parse_net(v6).ok_or_else(bad)?;
                if a6.is_empty()
                    || !a6
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b':'))
                {
                    return Err(bad());
                }
                let a6: Ipv6Addr = a6.parse().map_err(|_| bad())?;
                let net = Ipv6Net::new(a6, l6).map_err(|_| bad())?;
                if net.trunc() != net || l6 == 0 {
                    return Err(bad());
                }
                Some(net)
            }
        };
        if ipv4.is_none() && ipv6.is_none() {
            return Err(bad());
        }
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4 {
            Some(v4) => write!(f, "{}-{}", v4.network(), v4.prefix_len())?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix_len())?;
        }
        Ok(())
    }
}

/// A lease as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is bound to; 0 for a reservation (a key without TTL).
    pub etcd_lease: i64,
    /// The key's etcd mod revision when read.
    pub mod_revision: i64,
}

impl Lease {
    /// Keys without a TTL are reservations: only the node with their PublicIP may use them.
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }

    /// The IPv4 subnet; `None` for an IPv6-only lease.
    pub fn subnet(&self) -> Option<Ipv4Net> {
        self.key.ipv4
    }

    /// The IPv6 subnet; `None` for an IPv4-only lease.
    pub fn subnet6(&self) -> Option<Ipv6Net> {
        self.key.ipv6
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip_like_flannel() {
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a: LeaseAttrs = serde_json::from_str(text).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(a.to_json(), text);
    }

    #[test]
    fn no_backend_data_is_omitted_and_ipv6_is_null() {
        // flannel's host-gw lease, byte for byte.
        let a = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 1), "host-gw");
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        // Ours on udp names its type (flannel's does not; docs/data-model.md).
        let a = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 1), "udp");
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"udp"}"#
        );
    }

    #[test]
    fn flannel_udp_and_alloc_leases_have_no_type_and_mean_udp() {
        // What flannel's udp (and alloc) backend writes, v0.20 to v0.28.
        let text = r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#;
        let a: LeaseAttrs = serde_json::from_str(text).unwrap();
        assert_eq!(a.backend_type, "");
        assert_eq!(a.data_plane(), "udp");
        assert_eq!(a.to_json(), text, "written back without a type");
        let a = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 1), "host-gw");
        assert_eq!(a.data_plane(), "host-gw");
    }

    #[test]
    fn unknown_fields_are_preserved() {
        let text = r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw","FutureField":{"x":[1,2]}}"#;
        let a: LeaseAttrs = serde_json::from_str(text).unwrap();
        assert_eq!(a.public_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(a.to_json(), text);
    }

    #[test]
    fn dual_stack_and_ipv6_only_values_round_trip_byte_for_byte() {
        // flannel v0.20.2's dual-stack vxlan lease (checked by running it; two VTEP MACs).
        let dual = r#"{"PublicIP":"192.168.210.11","PublicIPv6":"fd00:210::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"}}"#;
        let a: LeaseAttrs = serde_json::from_str(dual).unwrap();
        assert_eq!(a.public_ipv6, Some("fd00:210::11".parse().unwrap()));
        assert!(a.backend_v6_data.is_some());
        assert_eq!(a.to_json(), dual);
        // host-gw dual stack: no data at all.
        let hostgw =
            r#"{"PublicIP":"192.168.210.11","PublicIPv6":"fd00:210::11","BackendType":"host-gw"}"#;
        let a: LeaseAttrs = serde_json::from_str(hostgw).unwrap();
        assert_eq!(a.to_json(), hostgw);
        // IPv6-only: flannel leaves PublicIP at its zero value.
        let v6only = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:210::12","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:03"}}"#;
        let a: LeaseAttrs = serde_json::from_str(v6only).unwrap();
        assert!(a.public_ip.is_unspecified());
        assert_eq!(a.backend_data, None);
        assert_eq!(a.to_json(), v6only);
    }

    #[test]
    fn keys() {
        let k = SubnetKey::parse("10.5.52.0-24").unwrap();
        assert_eq!(k.ipv4, Some("10.5.52.0/24".parse::<Ipv4Net>().unwrap()));
        assert_eq!(k.to_string(), "10.5.52.0-24");
        let k = SubnetKey::parse("10.5.52.0-24&fc00::-64").unwrap();
        assert_eq!(k.ipv6, Some("fc00::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "10.5.52.0-24&fc00::-64");
        // What flannel v0.20.2 wrote in a dual-stack cluster (checked by running it).
        let k = SubnetKey::parse("10.7.85.0-24&fd10:0:0:11::-64").unwrap();
        assert_eq!(k.to_string(), "10.7.85.0-24&fd10:0:0:11::-64");
        // flannel's IPv6-only form: the empty IPv4 net.
        let k = SubnetKey::parse("0.0.0.0-0&fd10:0:0:11::-64").unwrap();
        assert_eq!(k, SubnetKey::v6("fd10:0:0:11::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "0.0.0.0-0&fd10:0:0:11::-64");
        for bad in [
            "0.0.0.0-0",
            "0.0.0.0-0&",
            "0.0.0.0-0&::-0",
            "10.0.0.0-0",
            "10.5.52.0-24&FD10::-64",
            "10.5.52.0-24&fd10::-+64",
            "10.5.52.0-+24",
            "10.5.52.0-24&fd10::-129",
            "10.5.52.0-24&::ffff:1.2.3.4-64",
        ] {
            assert!(SubnetKey::parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "",
            "10.5.52.0",
            "10.5.52.0-33",
            "10.5.52.1-24",
            "x-24",
            "10.5.52.0-24&",
            "10.5.52.0-24&fc00::1-64",
            "10.5.52.0-2x",
        ] {
            assert!(SubnetKey::parse(bad).is_err(), "{bad}");
        }
    }
}
