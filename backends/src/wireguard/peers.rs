//! Leases → WireGuard peers (pure): the lease's `BackendData` as flannel writes and reads it,
//! each peer's public key, endpoint and allowed IPs, and the difference between two peer sets.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Map, Value};
use subnet_lease::{Lease, SubnetKey};

use super::config::{decode_key, encode_key};

/// The lease's `BackendType`.
pub const BACKEND_TYPE: &str = "wireguard";

/// `BackendData` (and `BackendV6Data`) exactly as flannel marshals its `wireguardLeaseAttrs`:
/// `{"PublicKey":"<base64>","Port":<u16>}`, in that order, `Port` always present.
pub fn backend_data(public: &[u8; 32], port: u16) -> Value {
    let mut m = Map::new();
    m.insert("PublicKey".into(), Value::String(encode_key(public)));
    m.insert("Port".into(), Value::from(port));
    Value::Object(m)
}

/// What a peer's `BackendData` says: its public key and port (`None` when absent or 0: the
/// receiver's own listen port, as flannel reads it). Keys match case-insensitively (Go's
/// encoding/json).
pub fn parse_backend_data(v: Option<&Value>) -> Result<([u8; 32], Option<u16>), String> {
    let Some(Value::Object(m)) = v else {
        return Err("no BackendData".into());
    };
    let get = |k: &str| {
        m.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    };
    let key = match get("PublicKey") {
        Some(Value::String(s)) => decode_key(s)
            .ok_or("BackendData.PublicKey is not a WireGuard key (base64 of 32 bytes)")?,
        _ => return Err("BackendData has no PublicKey".into()),
    };
    let port = match get("Port") {
        None => None,
        Some(p) => match p.as_u64() {
            Some(0) => None,
            Some(p) if p <= 65535 => Some(p as u16),
            _ => return Err(format!("BackendData.Port {p} is not a UDP port")),
        },
    };
    Ok((key, port))
}

/// One peer as the data plane should know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: [u8; 32],
    pub endpoint: SocketAddr,
    /// The peer's lease subnet (of the device's family).
    pub allowed: IpNet,
    pub lease: SubnetKey,
}

/// Which half of a lease a device's peers come from: `flannel-wg` takes the IPv4 subnet,
/// `BackendData` and `PublicIP`; `flannel-wg-v6` (flannel's `separate` mode) the IPv6 subnet,
/// `BackendV6Data` and `PublicIPv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    V4,
    V6,
}

/// The lease's subnet, BackendData and underlay address for `half`.
fn lease_half(l: &Lease, half: Half) -> Result<(IpNet, Option<&Value>, IpAddr), String> {
    match half {
        Half::V4 => {
            let net = l.key.ipv4.ok_or("no IPv4 subnet")?;
            if l.attrs.public_ip.is_unspecified() {
                return Err("PublicIP is 0.0.0.0 (no IPv4 underlay address)".into());
            }
            Ok((
                IpNet::V4(net),
                l.attrs.backend_data.as_ref(),
                IpAddr::V4(l.attrs.public_ip),
            ))
        }
        Half::V6 => {
            let net = l.key.ipv6.ok_or("no IPv6 subnet")?;
            let ip = l
                .attrs
                .public_ipv6
                .filter(|ip| !ip.is_unspecified())
                .ok_or("no PublicIPv6 (flannel-wg-v6 peers are reached over IPv6)")?;
            if l.attrs.backend_v6_data.is_none() {
                return Err("no BackendV6Data".into());
            }
            Ok((
                IpNet::V6(net),
                l.attrs.backend_v6_data.as_ref(),
                IpAddr::V6(ip),
            ))
        }
    }
}

/// The peers `leases` describe (those advertising wireguard), in subnet order, and for each
/// wireguard lease that gives none, why. `listen_port` is used where a lease gives no port.
/// A public key that two leases advertise belongs to the first; the other is a problem.
pub fn desired<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    listen_port: u16,
    own_key: &[u8; 32],
) -> (Vec<WgPeer>, Vec<(SubnetKey, String)>) {
    desired_for(leases, Half::V4, listen_port, own_key)
}

/// As [`desired`], for the device of `half` (`listen_port`: that device's port).
pub fn desired_for<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    half: Half,
    listen_port: u16,
    own_key: &[u8; 32],
) -> (Vec<WgPeer>, Vec<(SubnetKey, String)>) {
    let mut peers: Vec<WgPeer> = Vec::new();
    let mut problems = Vec::new();
    for l in leases {
        if l.attrs.backend_type != BACKEND_TYPE {
            continue;
        }
        let r = (|| {
            let (allowed, data, ip) = lease_half(l, half)?;
            let (public_key, port) = parse_backend_data(data)?;
            if &public_key == own_key {
                return Err("advertises this node's own public key".into());
            }
            if let Some(p) = peers.iter().find(|p| p.public_key == public_key) {
                return Err(format!(
                    "advertises the public key of the lease for {} (a copied key file?)",
                    p.allowed
                ));
            }
            Ok(WgPeer {
                public_key,
                endpoint: SocketAddr::new(ip, port.unwrap_or(listen_port)),
                allowed,
                lease: l.key,
            })
        })();
        match r {
            Ok(p) => peers.push(p),
            Err(e) => problems.push((l.key, e)),
        }
    }
    (peers, problems)
}

/// A peer lease of another type (a node that has not switched to wireguard yet, or has
/// switched away): its wireguard secondary, if it runs one, may handshake from its PublicIP
/// with a key its lease does not carry (docs/wireguard.md, live switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switching {
    pub lease: SubnetKey,
    pub public_ip: std::net::Ipv4Addr,
    pub allowed: Ipv4Net,
}

/// Types whose traffic a node already takes unauthenticated from the peer's address (this
/// node runs a secondary of that type for such a peer): accepting a WireGuard key from that
/// address for that subnet opens nothing new. `alloc` and unknown types are not among them.
const UNAUTHENTICATED_PLANES: &[&str] = &["vxlan", "udp", "host-gw"];

/// The leases of other data planes (see [`UNAUTHENTICATED_PLANES`]) that have an IPv4 subnet
/// and a PublicIP.
pub fn switching<'a>(leases: impl IntoIterator<Item = &'a Lease>) -> Vec<Switching> {
    leases
        .into_iter()
        .filter(|l| {
            UNAUTHENTICATED_PLANES.contains(&l.attrs.data_plane())
                && !l.attrs.public_ip.is_unspecified()
        })
        .filter_map(|l| {
            Some(Switching {
                lease: l.key,
                public_ip: l.attrs.public_ip,
                allowed: l.key.ipv4?,
            })
        })
        .collect()
}

/// The changes from `have` to `want`, by public key: new peers, peers whose endpoint or
/// allowed IPs changed (their sessions are kept), and keys no longer wanted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub add: Vec<WgPeer>,
    pub update: Vec<WgPeer>,
    pub remove: Vec<[u8; 32]>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

pub fn diff(have: &[WgPeer], want: &[WgPeer]) -> Diff {
    let old: BTreeMap<[u8; 32], &WgPeer> = have.iter().map(|p| (p.public_key, p)).collect();
    let new: BTreeMap<[u8; 32], &WgPeer> = want.iter().map(|p| (p.public_key, p)).collect();
    let mut d = Diff::default();
    for (k, p) in &new {
        match old.get(k) {
            None => d.add.push((*p).clone()),
            Some(o) if o != p => d.update.push((*p).clone()),
            Some(_) => {}
        }
    }
    d.remove = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .copied()
        .collect();
    d
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn lease(subnet: &str, json: &str) -> Lease {
        Lease {
            key: SubnetKey::v4(subnet.parse().unwrap()),
            attrs: serde_json::from_str(json).unwrap(),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn wg(subnet: &str, ip: &str, data: &str) -> Lease {
        lease(
            subnet,
            &format!(
                r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{data}}}"#
            ),
        )
    }

    #[test]
    fn lease_data_is_byte_exact_with_flannels() {
        let k = decode_key(K1).unwrap();
        assert_eq!(
            serde_json::to_string(&backend_data(&k, 51820)).unwrap(),
            format!(r#"{{"PublicKey":"{K1}","Port":51820}}"#)
        );
        // The whole lease value as flannel v0.26 writes it for an IPv4 node.
        let mut attrs = subnet_lease::LeaseAttrs::new("172.30.0.11".parse().unwrap(), "wireguard");
        attrs.backend_data = Some(backend_data(&k, 51820));
        assert_eq!(
            attrs.to_json(),
            format!(
                r#"{{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{K1}","Port":51820}}}}"#
            )
        );
    }

    #[test]
    fn backend_data_is_read_as_flannel_reads_it() {
        let k = decode_key(K1).unwrap();
        let v = |j: &str| serde_json::from_str::<Value>(j).unwrap();
        assert_eq!(
            parse_backend_data(Some(&v(&format!(r#"{{"PublicKey":"{K1}","Port":51999}}"#)))),
            Ok((k, Some(51999)))
        );
        // Before v0.26.6 flannel wrote no Port; 0 means the same.
        assert_eq!(
            parse_backend_data(Some(&v(&format!(r#"{{"publickey":"{K1}"}}"#)))),
            Ok((k, None))
        );
        assert_eq!(
            parse_backend_data(Some(&v(&format!(r#"{{"PublicKey":"{K1}","Port":0}}"#)))),
            Ok((k, None))
        );
        assert!(parse_backend_data(None).is_err());
        assert!(parse_backend_data(Some(&v(r#"{"PublicKey":"k","Port":1}"#))).is_err());
        assert!(
            parse_backend_data(Some(&v(&format!(r#"{{"PublicKey":"{K1}","Port":70000}}"#))))
                .is_err()
        );
    }

    #[test]
    fn leases_become_peers_with_their_subnet_and_endpoint() {
        let own = decode_key(K2).unwrap();
        let leases = [
            wg(
                "10.5.1.0/24",
                "172.30.0.11",
                &format!(r#"{{"PublicKey":"{K1}","Port":51000}}"#),
            ),
            wg(
                "10.5.2.0/24",
                "172.30.0.12",
                &format!(r#"{{"PublicKey":"{K2}"}}"#),
            ),
            wg(
                "10.5.3.0/24",
                "172.30.0.13",
                &format!(r#"{{"PublicKey":"{K1}"}}"#),
            ),
            wg("10.5.4.0/24", "172.30.0.14", r#"{"PublicKey":"bad"}"#),
            lease(
                "10.5.5.0/24",
                r#"{"PublicIP":"172.30.0.15","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
            ),
        ];
        let (peers, problems) = desired(&leases, 51820, &own);
        assert_eq!(
            peers,
            vec![WgPeer {
                public_key: decode_key(K1).unwrap(),
                endpoint: "172.30.0.11:51000".parse().unwrap(),
                allowed: "10.5.1.0/24".parse().unwrap(),
                lease: leases[0].key,
            }]
        );
        let why: Vec<String> = problems.iter().map(|(k, e)| format!("{k}: {e}")).collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("own public key"), "{why:?}");
        assert!(why[1].contains("10.5.1.0/24"), "{why:?}");
        assert!(why[2].contains("PublicKey"), "{why:?}");
        // No port: ours.
        let (peers, _) = desired(&leases[2..3], 51820, &own);
        assert_eq!(peers[0].endpoint, "172.30.0.13:51820".parse().unwrap());
    }

    #[test]
    fn the_ipv6_half_takes_the_v6_subnet_data_and_address() {
        let own = decode_key(K2).unwrap();
        let dual = |v4: &str, v6: &str, json: &str| Lease {
            key: SubnetKey::dual(v4.parse().unwrap(), v6.parse().unwrap()),
            attrs: serde_json::from_str(json).unwrap(),
            etcd_lease: 1,
            mod_revision: 1,
        };
        let leases = [
            // As flannel writes a dual-stack lease: the same key in both, the ports differ.
            dual(
                "10.5.1.0/24",
                "fd10:0:0:1::/64",
                &format!(
                    r#"{{"PublicIP":"172.30.0.11","PublicIPv6":"fd00:210::11","BackendType":"wireguard","BackendData":{{"PublicKey":"{K1}","Port":51820}},"BackendV6Data":{{"PublicKey":"{K1}","Port":51821}}}}"#
                ),
            ),
            // No BackendV6Data (flannel drops such a lease whole): IPv4 only here.
            dual(
                "10.5.3.0/24",
                "fd10:0:0:3::/64",
                r#"{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:210::13","BackendType":"wireguard","BackendData":{"PublicKey":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh="}}"#,
            ),
            // No PublicIPv6, or no IPv6 subnet.
            dual(
                "10.5.4.0/24",
                "fd10:0:0:4::/64",
                &format!(
                    r#"{{"PublicIP":"172.30.0.14","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{K2}"}},"BackendV6Data":{{"PublicKey":"{K2}"}}}}"#
                ),
            ),
            wg(
                "10.5.5.0/24",
                "172.30.0.15",
                r#"{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykQ="}"#,
            ),
        ];
        let (peers, problems) = desired_for(&leases, Half::V6, 51821, &own);
        assert_eq!(
            peers,
            vec![WgPeer {
                public_key: decode_key(K1).unwrap(),
                endpoint: "[fd00:210::11]:51821".parse().unwrap(),
                allowed: "fd10:0:0:1::/64".parse().unwrap(),
                lease: leases[0].key,
            }]
        );
        let why: Vec<&str> = problems.iter().map(|(_, e)| e.as_str()).collect();
        assert_eq!(
            why,
            vec![
                "no BackendV6Data",
                "no PublicIPv6 (flannel-wg-v6 peers are reached over IPv6)",
                "no IPv6 subnet"
            ]
        );
        // The IPv4 half of the same leases: BackendData, PublicIP, the v4 subnet.
        let (peers, _) = desired_for(&leases[..1], Half::V4, 51820, &own);
        assert_eq!(peers[0].endpoint, "172.30.0.11:51820".parse().unwrap());
        assert_eq!(peers[0].allowed, "10.5.1.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn leases_of_other_types_are_switching_peers() {
        let leases = [
            wg(
                "10.5.1.0/24",
                "172.30.0.11",
                &format!(r#"{{"PublicKey":"{K1}"}}"#),
            ),
            lease(
                "10.5.5.0/24",
                r#"{"PublicIP":"172.30.0.15","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
            ),
            lease(
                "10.5.6.0/24",
                r#"{"PublicIP":"172.30.0.16","PublicIPv6":null}"#,
            ),
            lease(
                "10.5.7.0/24",
                r#"{"PublicIP":"172.30.0.17","PublicIPv6":null,"BackendType":"alloc"}"#,
            ),
        ];
        let s = switching(&leases);
        assert_eq!(
            s.iter()
                .map(|s| (s.allowed.to_string(), s.public_ip.to_string()))
                .collect::<Vec<_>>(),
            vec![
                ("10.5.5.0/24".to_string(), "172.30.0.15".to_string()),
                ("10.5.6.0/24".to_string(), "172.30.0.16".to_string())
            ]
        );
    }

    #[test]
    fn diff_by_public_key() {
        let p = |k: &str, ep: &str, net: &str| WgPeer {
            public_key: decode_key(k).unwrap(),
            endpoint: ep.parse().unwrap(),
            allowed: net.parse().unwrap(),
            lease: SubnetKey::v4(net.parse().unwrap()),
        };
        let a = p(K1, "172.30.0.11:51820", "10.5.1.0/24");
        let b = p(K2, "172.30.0.12:51820", "10.5.2.0/24");
        assert!(diff(&[a.clone(), b.clone()], &[b.clone(), a.clone()]).is_empty());
        let moved = p(K1, "172.30.0.21:51820", "10.5.1.0/24");
        assert_eq!(
            diff(&[a.clone(), b.clone()], std::slice::from_ref(&moved)),
            Diff {
                add: vec![],
                update: vec![moved.clone()],
                remove: vec![b.public_key],
            }
        );
        assert_eq!(
            diff(&[], std::slice::from_ref(&b)),
            Diff {
                add: vec![b],
                ..Diff::default()
            }
        );
    }
}
