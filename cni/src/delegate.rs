//! The delegate configuration, built exactly as flannel's plugin builds it from the network
//! configuration and the subnet file:
//!
//! - `name` = the network's name, `cniVersion` = the version the delegate is called with;
//! - `type` = `bridge` unless given; `ipMasq` = not `FLANNEL_IPMASQ` unless given (flanneld
//!   masquerades when it was started with `--ip-masq`; otherwise the bridge must);
//! - `mtu` = `FLANNEL_MTU` unless given; for `bridge`, `isGateway: true` unless given;
//! - `ipam` = the config's `ipam` (type `host-local` unless given) with `ranges` = the node's
//!   subnet (and IPv6 subnet) and `routes` = its own plus one to the cluster Network (and IPv6
//!   Network), via the bridge's address for `bridge` (flannel omits the gateway, which breaks
//!   the bridge's CHECK); a `subnet` key of its own is dropped (the node subnet is the range);
//! - `runtimeConfig` passed on when present.

use serde_json::{json, Map, Value};
use subnet_env::SubnetEnv;

use crate::conf::NetConf;

/// The delegate config for `conf` on a node whose subnet file says `env`, to be called with
/// `cni_version`.
pub fn build(conf: &NetConf, env: &SubnetEnv, cni_version: &str) -> Map<String, Value> {
    let mut d = conf.delegate.clone();
    d.insert("name".into(), conf.name.clone().into());
    d.entry("type").or_insert_with(|| "bridge".into());
    d.entry("ipMasq").or_insert_with(|| (!env.ip_masq).into());
    d.entry("mtu").or_insert_with(|| env.mtu.into());
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("isGateway").or_insert(true.into());
    }
    d.insert("cniVersion".into(), cni_version.into());

    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| "host-local".into());
    ipam.remove("subnet");
    let mut ranges = Vec::new();
    if let Some(sn) = env.subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    if let Some(sn) = env.ipv6_subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        Some(Value::Array(r)) => r.clone(),
        _ => Vec::new(),
    };
    // flannel leaves the gateway out; the bridge then routes via its own address at ADD but
    // its CHECK compares the pod's routes with a gateway-less one and always fails. Naming the
    // gateway host-local gives the bridge (the subnet's first address) makes CHECK pass and
    // changes nothing else.
    let bridge = d.get("type").and_then(Value::as_str) == Some("bridge");
    // The subnet's first address (network + 1), as host-local's default gateway.
    let first = |n: ipnet::IpNet| {
        Some(match n.network() {
            std::net::IpAddr::V4(a) => {
                std::net::Ipv4Addr::from(u32::from(a).wrapping_add(1)).to_string()
            }
            std::net::IpAddr::V6(a) => {
                std::net::Ipv6Addr::from(u128::from(a).wrapping_add(1)).to_string()
            }
        })
    };
    for (nw, sn) in [
        (
            env.network.map(ipnet::IpNet::V4),
            env.subnet.map(ipnet::IpNet::V4),
        ),
        (
            env.ipv6_network.map(ipnet::IpNet::V6),
            env.ipv6_subnet.map(ipnet::IpNet::V6),
        ),
    ] {
        if let Some(nw) = nw {
            let mut r = json!({ "dst": nw.to_string() });
            if let Some(gw) = sn.filter(|_| bridge).and_then(first) {
                r["gw"] = gw.into();
            }
            routes.push(r);
        }
    }
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));

    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d
}

/// The delegate plugin's type (`bridge` unless the config names another).
pub fn plugin_type(d: &Map<String, Value>) -> &str {
    d.get("type").and_then(Value::as_str).unwrap_or("bridge")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conf::parse;

    fn env(ip_masq: bool) -> SubnetEnv {
        SubnetEnv::parse(
            &format!(
                "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={ip_masq}\n"
            ),
            "subnet.env",
        )
        .unwrap()
    }

    #[test]
    fn default_delegate_is_flannels_bridge() {
        let c = parse(
            br#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel"}"#,
            true,
        )
        .unwrap();
        let d = build(&c, &env(true), "1.0.0");
        assert_eq!(
            Value::Object(d),
            json!({
                "name": "cbr0", "type": "bridge", "ipMasq": false, "mtu": 1450,
                "isGateway": true, "cniVersion": "1.0.0",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.5.52.0/24"}]],
                         "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.52.1"}]}
            })
        );
        // flanneld without --ip-masq: the bridge masquerades.
        assert_eq!(build(&c, &env(false), "1.0.0")["ipMasq"], true);
    }

    #[test]
    fn given_keys_win_and_ipam_is_merged() {
        let c = parse(
            br#"{"cniVersion":"0.3.1","name":"n","type":"flannel",
                 "delegate":{"type":"ptp","mtu":1400,"ipMasq":true,"hairpinMode":true},
                 "ipam":{"dataDir":"/tmp/ipam","subnet":"1.2.3.0/24","routes":[{"dst":"192.168.0.0/16"}]},
                 "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}"#,
            true,
        )
        .unwrap();
        let mut e = env(true);
        e.ipv6_network = Some("fc00::/48".parse().unwrap());
        e.ipv6_subnet = Some("fc00:0:0:34::/64".parse().unwrap());
        let d = build(&c, &e, "0.3.1");
        assert_eq!(plugin_type(&d), "ptp");
        assert_eq!(
            (d["mtu"].clone(), d["ipMasq"].clone()),
            (json!(1400), json!(true))
        );
        assert_eq!(d.get("isGateway"), None, "only bridge gets isGateway");
        assert_eq!(d["hairpinMode"], true);
        assert_eq!(
            d["ipam"],
            json!({"dataDir": "/tmp/ipam", "type": "host-local",
                   "ranges": [[{"subnet": "10.5.52.0/24"}], [{"subnet": "fc00:0:0:34::/64"}]],
                   "routes": [{"dst": "192.168.0.0/16"}, {"dst": "10.5.0.0/16"}, {"dst": "fc00::/48"}]})
        );
        assert_eq!(d["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
    }
}
