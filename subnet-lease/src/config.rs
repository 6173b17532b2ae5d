//! flannel's network configuration (`net-conf.json`, stored at `<prefix>/config`).
//!
//! Keys and defaults follow flannel exactly. Like Go's `encoding/json`, key matching is
//! case-insensitive, so a config that flannel accepts is accepted here. Unlike flannel, the
//! default backend type is `vxlan` (what flannel documents; its code defaults to `udp`, and
//! refuses a `Backend` without `Type`); a config that relies on the default gets a warning
//! ([`backend_default_warning`]) because a mixed cluster on it splits.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use crate::ipmath::{self, Family};

/// Backend types this project implements (`Backend.Type`, compared case-insensitively).
pub const KNOWN_BACKENDS: &[&str] = &["vxlan", "udp", "host-gw", "wireguard", "alloc"];

/// The default backend type when `Backend` or `Backend.Type` is absent.
pub const DEFAULT_BACKEND: &str = "vxlan";

/// Keys flannel knows in net-conf.json. Anything else is warned about.
const KNOWN_KEYS: &[&str] = &[
    "Network",
    "SubnetMin",
    "SubnetMax",
    "SubnetLen",
    "IPv6Network",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "IPv6SubnetLen",
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Backend",
    "ServiceNetwork",
    "IPv6ServiceNetwork",
];

/// The default `ServiceNetwork` (Kubernetes' default service CIDR): ClusterIPs come from it.
pub const DEFAULT_SERVICE_NETWORK: &str = "10.96.0.0/12";

/// The default `IPv6ServiceNetwork` (with `EnableIPv6`): a ULA /112 (65536 addresses), the
/// range kind and many kubeadm guides use; Kubernetes itself has no IPv6 default.
pub const DEFAULT_IPV6_SERVICE_NETWORK: &str = "fd00:10:96::/112";

/// The widest `IPv6ServiceNetwork`: /108 (2^20 addresses), kube-apiserver's limit for an
/// IPv6 `--service-cluster-ip-range`.
pub const IPV6_SERVICE_NETWORK_MIN_PREFIX: u8 = 108;

/// A config that failed validation. The message names the key and the rule broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("net-conf.json is not valid JSON: {0}")]
    Json(String),
    #[error("net-conf.json must be a JSON object")]
    NotAnObject,
    #[error("{key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.into(),
    }
}

/// The `Backend` object: its type and the raw options the backend parses itself.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Lower-cased backend type, one of [`KNOWN_BACKENDS`].
    pub backend_type: String,
    /// Every key of the `Backend` object except `Type`, as given.
    pub options: Map<String, Value>,
}

/// A validated network configuration with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub network: Option<Ipv4Net>,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Ipv6Addr,
    pub ipv6_subnet_max: Ipv6Addr,
    pub enable_nftables: bool,
    pub backend: BackendConfig,
    /// `ServiceNetwork` (our extension; flannel ignores the key): where Service ClusterIPs are
    /// allocated. Default [`DEFAULT_SERVICE_NETWORK`]; never overlaps `Network`.
    pub service_network: Ipv4Net,
    /// `IPv6ServiceNetwork` (ours): where IPv6 ClusterIPs are allocated; Some only with
    /// `EnableIPv6` (default [`DEFAULT_IPV6_SERVICE_NETWORK`]); never overlaps `IPv6Network`.
    pub ipv6_service_network: Option<Ipv6Net>,
}

/// A parsed config plus the warnings (unknown keys) the caller should log.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub config: NetConfig,
    pub warnings: Vec<String>,
}

/// Looks a key up the way Go's encoding/json does: exact match first, then case-insensitive.
fn lookup<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn get_str(obj: &Map<String, Value>, key: &'static str) -> Result<Option<String>, ConfigError> {
    match lookup(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(key, format!("must be a string, got {other}"))),
    }
}

fn get_bool(
    obj: &Map<String, Value>,
    key: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match lookup(obj, key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(key, format!("must be true or false, got {other}"))),
    }
}

fn get_len(obj: &Map<String, Value>, key: &'static str) -> Result<Option<u8>, ConfigError> {
    match lookup(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            // 0 means "unset" in flannel (Go zero value).
            Some(0) => Ok(None),
            Some(v) if v <= 128 => Ok(Some(v as u8)),
            _ => Err(invalid(key, format!("must be a prefix length, got {n}"))),
        },
        Some(other) => Err(invalid(key, format!("must be a number, got {other}"))),
    }
}

/// Parses and validates net-conf.json text.
pub fn parse(text: &str) -> Result<Parsed, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ConfigError::NotAnObject);
    };
    let mut warnings: Vec<String> = obj
        .keys()
        .filter(|k| !KNOWN_KEYS.iter().any(|known| known.eq_ignore_ascii_case(k)))
        .map(|k| format!("net-conf.json: unknown key {k:?} ignored"))
        .collect();

    let enable_ipv4 = get_bool(&obj, "EnableIPv4", true)?;
    let enable_ipv6 = get_bool(&obj, "EnableIPv6", false)?;
    let enable_nftables = get_bool(&obj, "EnableNFTables", false)?;
    if !enable_ipv4 && !enable_ipv6 {
        return Err(invalid(
            "EnableIPv4",
            "EnableIPv4 and EnableIPv6 are both false: nothing to configure",
        ));
    }

    let v4 = parse_family::<Ipv4Net>(
        &obj,
        enable_ipv4,
        FamilyKeys {
            network: "Network",
            len: "SubnetLen",
            min: "SubnetMin",
            max: "SubnetMax",
        },
    )?;
    let v6 = parse_family::<Ipv6Net>(
        &obj,
        enable_ipv6,
        FamilyKeys {
            network: "IPv6Network",
            len: "IPv6SubnetLen",
            min: "IPv6SubnetMin",
            max: "IPv6SubnetMax",
        },
    )?;
    let backend_value = lookup(&obj, "Backend");
    let backend = parse_backend(backend_value)?;
    if let Some(w) = backend_default_warning(backend_value) {
        warnings.push(w);
    }
    let service_network =
        parse_service_network(&obj, v4.as_ref().map(|f| f.network), &mut warnings)?;
    let ipv6_service_network = parse_ipv6_service_network(
        &obj,
        enable_ipv6,
        v6.as_ref().map(|f| f.network),
        &mut warnings,
    )?;

    let (network, subnet_len, subnet_min, subnet_max) = match v4 {
        Some(f) => (Some(f.network), f.len, f.min, f.max),
        None => (None, 0, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
    };
    let (ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) = match v6 {
        Some(f) => (Some(f.network), f.len, f.min, f.max),
        None => (None, 0, Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED),
    };
    Ok(Parsed {
        config: NetConfig {
            enable_ipv4,
            enable_ipv6,
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min,
            ipv6_subnet_max,
            enable_nftables,
            backend,
            service_network,
            ipv6_service_network,
        },
        warnings,
    })
}

struct FamilyKeys {
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
}

struct FamilyConfig<N: Family> {
    network: N,
    len: u8,
    min: N::Addr,
    max: N::Addr,
}

fn parse_family<N: Family>(
    obj: &Map<String, Value>,
    enabled: bool,
    keys: FamilyKeys,
) -> Result<Option<FamilyConfig<N>>, ConfigError> {
    let network_text = get_str(obj, keys.network)?;
    if !enabled {
        return Ok(None);
    }
    let Some(network_text) = network_text else {
        return Err(invalid(
            keys.network,
            "missing: the cluster network is required",
        ));
    };
    let network: N = network_text.parse().map_err(|_| {
        invalid(
            keys.network,
            format!("{network_text:?} is not an {} CIDR", N::NAME),
        )
    })?;
    if network.trunc() != network {
        return Err(invalid(
            keys.network,
            format!(
                "{network_text:?} has host bits set (did you mean {}?)",
                network.trunc()
            ),
        ));
    }
    let prefix = network.prefix();
    if prefix > N::MAX_NETWORK_PREFIX {
        return Err(invalid(
            keys.network,
            format!(
                "/{prefix} is too small: the longest useful network prefix is /{}",
                N::MAX_NETWORK_PREFIX
            ),
        ));
    }
    let len = match get_len(obj, keys.len)? {
        Some(len) => len,
        None if prefix <= N::DEFAULT_SUBNET_LEN - 2 => N::DEFAULT_SUBNET_LEN,
        None => prefix + 2,
    };
    if len > N::MAX_SUBNET_LEN {
        return Err(invalid(
            keys.len,
            format!("/{len} is too long: at most /{}", N::MAX_SUBNET_LEN),
        ));
    }
    if len < prefix + 2 {
        return Err(invalid(
            keys.len,
            format!(
                "/{len} must be at least the network prefix + 2 (/{}) so the network holds four subnets",
                prefix + 2
            ),
        ));
    }
    let size = ipmath::subnet_size(N::BITS, len);
    let first = N::to_int(network.network());
    let last = N::to_int(network.broadcast()) - size + 1;
    let bound = |key: &'static str, default: u128| -> Result<u128, ConfigError> {
        let Some(text) = get_str(obj, key)? else {
            return Ok(default);
        };
        let addr: N::Addr = text
            .parse()
            .map_err(|_| invalid(key, format!("{text:?} is not an {} address", N::NAME)))?;
        let v = N::to_int(addr);
        if !network.contains_addr(&addr) {
            return Err(invalid(key, format!("{text} is outside Network {network}")));
        }
        if !(v - first).is_multiple_of(size) {
            return Err(invalid(
                key,
                format!("{text} is not on a /{len} subnet boundary"),
            ));
        }
        Ok(v)
    };
    let min = bound(keys.min, first + size)?;
    let max = bound(keys.max, last)?;
    if min > max {
        return Err(invalid(
            keys.min,
            format!(
                "{} is greater than {} {}",
                N::from_int(min),
                keys.max,
                N::from_int(max)
            ),
        ));
    }
    Ok(Some(FamilyConfig {
        network,
        len,
        min: N::from_int(min),
        max: N::from_int(max),
    }))
}

/// `ServiceNetwork`: an IPv4 CIDR without host bits, with at least two usable addresses, not
/// overlapping `Network`. Absent, the default is used; a default that overlaps `Network` (e.g.
/// `Network` 10.0.0.0/8) is only warned about, so every config flannel accepts still parses
/// (the registry refuses to allocate ClusterIPs from it, see [`NetConfig::service_network_overlap`]).
fn parse_service_network(
    obj: &Map<String, Value>,
    network: Option<Ipv4Net>,
    warnings: &mut Vec<String>,
) -> Result<Ipv4Net, ConfigError> {
    const KEY: &str = "ServiceNetwork";
    let Some(text) = get_str(obj, KEY)? else {
        let net = default_service_network();
        if let Some(n) = network.filter(|n| overlaps(*n, net)) {
            warnings.push(format!(
                "net-conf.json: the default ServiceNetwork {net} overlaps Network {n}: set ServiceNetwork before creating Services"
            ));
        }
        return Ok(net);
    };
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| invalid(KEY, format!("{text:?} is not an IPv4 CIDR")))?;
    if net.trunc() != net {
        return Err(invalid(
            KEY,
            format!("{text:?} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    if net.prefix_len() > 30 {
        return Err(invalid(
            KEY,
            format!(
                "/{} is too small: at most /30 (two usable addresses)",
                net.prefix_len()
            ),
        ));
    }
    if let Some(n) = network.filter(|n| overlaps(*n, net)) {
        return Err(invalid(KEY, format!("{net} overlaps Network {n}")));
    }
    Ok(net)
}

fn default_service_network() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_default()
}

/// `IPv6ServiceNetwork`: read only with `EnableIPv6` (like every IPv6 key; given without it,
/// a warning). An IPv6 CIDR without host bits, /108 to /126 (kube-apiserver's widest, and at
/// least two usable addresses: IPv6 has no broadcast, only the network address is skipped),
/// not overlapping `IPv6Network`. Absent: [`DEFAULT_IPV6_SERVICE_NETWORK`]; a default that
/// overlaps `IPv6Network` is only warned about, as for `ServiceNetwork`.
fn parse_ipv6_service_network(
    obj: &Map<String, Value>,
    enabled: bool,
    network: Option<Ipv6Net>,
    warnings: &mut Vec<String>,
) -> Result<Option<Ipv6Net>, ConfigError> {
    const KEY: &str = "IPv6ServiceNetwork";
    let text = get_str(obj, KEY)?;
    if !enabled {
        if let Some(text) = text {
            warnings.push(format!(
                "net-conf.json: IPv6ServiceNetwork {text:?} ignored: EnableIPv6 is false"
            ));
        }
        return Ok(None);
    }
    let Some(text) = text else {
        let net = default_ipv6_service_network();
        if let Some(n) = network.filter(|n| overlaps6(*n, net)) {
            warnings.push(format!(
                "net-conf.json: the default IPv6ServiceNetwork {net} overlaps IPv6Network {n}: set IPv6ServiceNetwork before creating Services"
            ));
        }
        return Ok(Some(net));
    };
    let net: Ipv6Net = text
        .parse()
        .map_err(|_| invalid(KEY, format!("{text:?} is not an IPv6 CIDR")))?;
    if net.trunc() != net {
        return Err(invalid(
            KEY,
            format!("{text:?} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    let len = net.prefix_len();
    if len < IPV6_SERVICE_NETWORK_MIN_PREFIX {
        return Err(invalid(
            KEY,
            format!(
                "/{len} is too large: at least /{IPV6_SERVICE_NETWORK_MIN_PREFIX} (as kube-apiserver requires)"
            ),
        ));
    }
    if len > 126 {
        return Err(invalid(
            KEY,
            format!("/{len} is too small: at most /126 (two usable addresses)"),
        ));
    }
    if let Some(n) = network.filter(|n| overlaps6(*n, net)) {
        return Err(invalid(KEY, format!("{net} overlaps IPv6Network {n}")));
    }
    Ok(Some(net))
}

fn default_ipv6_service_network() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112).unwrap_or_default()
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

fn overlaps6(a: Ipv6Net, b: Ipv6Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// The warning for a config whose backend type comes from our default: flannel reads it
/// otherwise (no `Backend`: udp, so a cluster mixing flannel and flannel-rs nodes splits;
/// `Backend` without `Type`: flannel refuses the config). None when `Type` is given.
pub fn backend_default_warning(backend: Option<&Value>) -> Option<String> {
    let has_type = |m: &Map<String, Value>| {
        m.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("Type") && !v.is_null())
    };
    match backend {
        None | Some(Value::Null) => Some(format!(
            "net-conf.json: no Backend: running the default {DEFAULT_BACKEND}, but flannel runs udp              on this config, so flannel and flannel-rs nodes would not reach each other; set              \"Backend\": {{\"Type\": \"{DEFAULT_BACKEND}\"}} (or the type the cluster runs)"
        )),
        Some(Value::Object(m)) if !has_type(m) => Some(format!(
            "net-conf.json: Backend has no Type: running the default {DEFAULT_BACKEND}; flannel \
             refuses this config (unknown backend type \"\"); set Backend.Type"
        )),
        _ => None,
    }
}

fn parse_backend(value: Option<&Value>) -> Result<BackendConfig, ConfigError> {
    let mut options = match value {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(invalid(
                "Backend",
                format!("must be an object, got {other}"),
            ))
        }
    };
    let type_key = options
        .keys()
        .find(|k| k.eq_ignore_ascii_case("Type"))
        .cloned();
    let backend_type = match type_key.and_then(|k| options.remove(&k)) {
        None | Some(Value::Null) => DEFAULT_BACKEND.to_string(),
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(other) => {
            return Err(invalid(
                "Backend.Type",
                format!("must be a string, got {other}"),
            ))
        }
    };
    if !KNOWN_BACKENDS.contains(&backend_type.as_str()) {
        return Err(invalid(
            "Backend.Type",
            format!(
                "unknown backend type {backend_type:?} (supported: {})",
                KNOWN_BACKENDS.join(", ")
            ),
        ));
    }
    Ok(BackendConfig {
        backend_type,
        options,
    })
}

impl NetConfig {
    /// The IPv4 `Network` that `ServiceNetwork` overlaps, if any (only possible when
    /// `ServiceNetwork` was left at its default).
    pub fn service_network_overlap(&self) -> Option<Ipv4Net> {
        self.ipv4_network()
            .filter(|n| overlaps(*n, self.service_network))
    }

    /// The `IPv6Network` that `IPv6ServiceNetwork` overlaps, if any (only possible when
    /// `IPv6ServiceNetwork` was left at its default).
    pub fn ipv6_service_network_overlap(&self) -> Option<Ipv6Net> {
        let s = self.ipv6_service_network()?;
        self.ipv6_network().filter(|n| overlaps6(*n, s))
    }

    /// The IPv6 service network when IPv6 is enabled.
    pub fn ipv6_service_network(&self) -> Option<Ipv6Net> {
        self.ipv6_service_network.filter(|_| self.enable_ipv6)
    }

    /// The IPv4 network, or an error for configs this subnet manager cannot lease from
    /// (flannel's etcd key format always carries an IPv4 subnet).
    pub fn ipv4_network(&self) -> Option<Ipv4Net> {
        self.network.filter(|_| self.enable_ipv4)
    }

    /// The IPv6 network when IPv6 is enabled.
    pub fn ipv6_network(&self) -> Option<Ipv6Net> {
        self.ipv6_network.filter(|_| self.enable_ipv6)
    }

    /// Whether a leased IPv4 subnet still fits this config (inside Network, SubnetLen long).
    pub fn fits_v4(&self, subnet: Ipv4Net) -> bool {
        self.ipv4_network().is_some_and(|n| {
            subnet.prefix_len() == self.subnet_len
                && n.contains(&subnet)
                && u32::from(subnet.network()) >= u32::from(self.subnet_min)
                && u32::from(subnet.network()) <= u32::from(self.subnet_max)
        })
    }

    /// Whether a leased IPv6 subnet still fits this config.
    pub fn fits_v6(&self, subnet: Ipv6Net) -> bool {
        self.ipv6_network().is_some_and(|n| {
            subnet.prefix_len() == self.ipv6_subnet_len
                && n.contains(&subnet)
                && u128::from(subnet.network()) >= u128::from(self.ipv6_subnet_min)
                && u128::from(subnet.network()) <= u128::from(self.ipv6_subnet_max)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok(text: &str) -> NetConfig {
        parse(text).unwrap().config
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = ok(r#"{"Network":"10.5.0.0/16"}"#);
        assert_eq!(c.network, Some("10.5.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 0));
        assert!(c.enable_ipv4);
        assert!(!c.enable_ipv6);
        assert_eq!(c.backend.backend_type, "vxlan");
        assert!(c.backend.options.is_empty());
    }

    #[test]
    fn subnet_len_default_is_prefix_plus_two_past_slash_22() {
        assert_eq!(ok(r#"{"Network":"10.5.0.0/22"}"#).subnet_len, 24);
        let c = ok(r#"{"Network":"10.5.0.0/23"}"#);
        assert_eq!(c.subnet_len, 25);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 0, 128));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 1, 128));
        assert_eq!(ok(r#"{"Network":"10.5.0.0/28"}"#).subnet_len, 30);
    }

    #[test]
    fn explicit_values_are_kept() {
        let c = ok(
            r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0",
            "SubnetMax":"10.99.240.0","Backend":{"Type":"UDP","Port":7890}}"#,
        );
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 10, 0, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 99, 240, 0));
        assert_eq!(c.backend.backend_type, "udp");
        assert_eq!(c.backend.options.get("Port"), Some(&Value::from(7890)));
    }

    #[test]
    fn keys_match_case_insensitively_like_go() {
        let c = ok(r#"{"network":"10.5.0.0/16","subnetlen":26,"backend":{"type":"host-gw"}}"#);
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.backend.backend_type, "host-gw");
    }

    #[test]
    fn malformed_json() {
        assert!(err(r#"{"Network":"10.5.0.0/16""#).contains("not valid JSON"));
        assert_eq!(err("[1]"), "net-conf.json must be a JSON object");
    }

    #[test]
    fn missing_network() {
        assert_eq!(
            err(r#"{"SubnetLen":24}"#),
            "Network: missing: the cluster network is required"
        );
        assert!(err(r#"{"Network":"bogus"}"#).starts_with("Network: \"bogus\" is not an IPv4"));
        assert!(err(r#"{"Network":"10.5.1.0/16"}"#).contains("host bits set"));
        assert!(err(r#"{"Network":16}"#).starts_with("Network: must be a string"));
    }

    #[test]
    fn network_prefix_longer_than_28() {
        assert!(err(r#"{"Network":"10.5.0.0/29"}"#).starts_with("Network: /29 is too small"));
    }

    #[test]
    fn subnet_len_out_of_range() {
        assert!(err(r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#)
            .starts_with("SubnetLen: /31 is too long"));
        assert!(err(r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#)
            .starts_with("SubnetLen: /17 must be at least the network prefix + 2"));
        assert!(err(r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#)
            .starts_with("SubnetLen: must be a number"));
    }

    #[test]
    fn subnet_min_max_rules() {
        let base = r#""Network":"10.5.0.0/16""#;
        assert!(err(&format!(r#"{{{base},"SubnetMin":"10.5.1.1"}}"#))
            .starts_with("SubnetMin: 10.5.1.1 is not on a /24 subnet boundary"));
        assert!(err(&format!(r#"{{{base},"SubnetMax":"10.6.0.0"}}"#))
            .starts_with("SubnetMax: 10.6.0.0 is outside Network"));
        assert!(err(&format!(
            r#"{{{base},"SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}}"#
        ))
        .starts_with("SubnetMin: 10.5.9.0 is greater than SubnetMax 10.5.8.0"));
        assert!(err(&format!(r#"{{{base},"SubnetMin":"x"}}"#))
            .starts_with("SubnetMin: \"x\" is not an IPv4 address"));
    }

    #[test]
    fn unknown_backend_type() {
        assert!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}"#)
                .starts_with("Backend.Type: unknown backend type \"ipip\"")
        );
        assert!(err(r#"{"Network":"10.5.0.0/16","Backend":"vxlan"}"#)
            .starts_with("Backend: must be an object"));
    }

    #[test]
    fn a_backend_type_from_the_default_is_warned_about() {
        // flannel runs udp without Backend: a mixed cluster would split.
        let p = parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(p.config.backend.backend_type, "vxlan");
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].starts_with(
                "net-conf.json: no Backend: running the default vxlan, but flannel runs udp"
            ),
            "{:?}",
            p.warnings
        );
        let p = parse(r#"{"Network":"10.5.0.0/16","Backend":null}"#).unwrap();
        assert!(p.warnings[0].contains("no Backend"), "{:?}", p.warnings);
        let p = parse(r#"{"Network":"10.5.0.0/16","Backend":{"VNI":2}}"#).unwrap();
        assert_eq!(p.config.backend.backend_type, "vxlan");
        assert!(
            p.warnings[0].contains("Backend has no Type")
                && p.warnings[0].contains("flannel refuses"),
            "{:?}",
            p.warnings
        );
        // Given (any case): nothing to say.
        for text in [
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
            r#"{"Network":"10.5.0.0/16","backend":{"type":"udp"}}"#,
        ] {
            assert!(parse(text).unwrap().warnings.is_empty(), "{text}");
        }
    }

    #[test]
    fn unknown_keys_are_warned_not_rejected() {
        let p = parse(
            r#"{"Network":"10.5.0.0/16","Netwrok":"x","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(
            p.warnings,
            vec![r#"net-conf.json: unknown key "Netwrok" ignored"#]
        );
        assert!(p.config.enable_nftables);
    }

    #[test]
    fn ipv6_parsed_and_validated() {
        let c = ok(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(
            c.ipv6_subnet_min,
            "fc00:0:0:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.ipv6_subnet_max,
            "fc00:0:0:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        assert!(err(r#"{"Network":"10.5.0.0/16","EnableIPv6":true}"#)
            .starts_with("IPv6Network: missing"));
        assert!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/125"}"#)
                .starts_with("IPv6Network: /125 is too small")
        );
        assert!(err(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}"#
        )
        .starts_with("IPv6SubnetLen: /127 is too long"));
        assert_eq!(
            ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/120"}"#)
                .ipv6_subnet_len,
            122
        );
        // IPv6 keys are ignored while IPv6 is disabled, as in flannel.
        assert!(ok(r#"{"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}"#)
            .ipv6_network()
            .is_none());
    }

    #[test]
    fn both_families_disabled() {
        assert!(err(r#"{"EnableIPv4":false}"#).starts_with("EnableIPv4: EnableIPv4 and EnableIPv6"));
        assert!(err(r#"{"Network":"10.5.0.0/16","EnableIPv4":"yes"}"#)
            .starts_with("EnableIPv4: must be true or false"));
    }

    #[test]
    fn service_network_default() {
        let c = ok(r#"{"Network":"10.5.0.0/16"}"#);
        assert_eq!(
            c.service_network,
            "10.96.0.0/12".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            DEFAULT_SERVICE_NETWORK.parse::<Ipv4Net>().unwrap(),
            c.service_network
        );
    }

    #[test]
    fn service_network_given_is_known_not_warned() {
        let p = parse(
            r#"{"Network":"10.5.0.0/16","ServiceNetwork":"172.30.0.0/24","Backend":{"Type":"udp"}}"#,
        )
        .unwrap();
        assert_eq!(
            p.config.service_network,
            "172.30.0.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // Case-insensitive like every other key.
        assert_eq!(
            ok(r#"{"Network":"10.5.0.0/16","servicenetwork":"172.30.0.0/27"}"#).service_network,
            "172.30.0.0/27".parse::<Ipv4Net>().unwrap()
        );
    }

    #[test]
    fn service_network_overlapping_network_rejected() {
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/8","ServiceNetwork":"10.96.0.0/12"}"#),
            "ServiceNetwork: 10.96.0.0/12 overlaps Network 10.0.0.0/8"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.0.0.0/8"}"#),
            "ServiceNetwork: 10.0.0.0/8 overlaps Network 10.5.0.0/16"
        );
        // A default that overlaps is only a warning: every config flannel takes still parses.
        let p = parse(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(
            p.warnings,
            vec!["net-conf.json: the default ServiceNetwork 10.96.0.0/12 overlaps Network 10.0.0.0/8: set ServiceNetwork before creating Services"]
        );
        assert_eq!(
            p.config.service_network_overlap(),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            ok(r#"{"Network":"10.5.0.0/16"}"#).service_network_overlap(),
            None
        );
    }

    #[test]
    fn service_network_not_a_cidr_rejected() {
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.1"}"#),
            "ServiceNetwork: \"10.96.0.1\" is not an IPv4 CIDR"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":"fd00::/108"}"#),
            "ServiceNetwork: \"fd00::/108\" is not an IPv4 CIDR"
        );
        assert!(err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":24}"#)
            .starts_with("ServiceNetwork: must be a string"));
        assert!(
            err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.1/12"}"#)
                .starts_with("ServiceNetwork: \"10.96.0.1/12\" has host bits set")
        );
        assert!(
            err(r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/31"}"#)
                .starts_with("ServiceNetwork: /31 is too small")
        );
    }

    #[test]
    fn ipv6_service_network_default_only_with_ipv6() {
        let dual = r#""Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}"#;
        let p = parse(&format!("{{{dual}}}")).unwrap();
        assert_eq!(
            p.config.ipv6_service_network,
            Some("fd00:10:96::/112".parse().unwrap())
        );
        assert_eq!(
            DEFAULT_IPV6_SERVICE_NETWORK.parse::<Ipv6Net>().ok(),
            p.config.ipv6_service_network()
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.ipv6_service_network_overlap(), None);
        // IPv4 only: none, and a given one is ignored with a warning (like IPv6Network).
        assert_eq!(
            ok(r#"{"Network":"10.5.0.0/16"}"#).ipv6_service_network,
            None
        );
        let p = parse(
            r#"{"Network":"10.5.0.0/16","IPv6ServiceNetwork":"fd00:20::/112","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(p.config.ipv6_service_network(), None);
        assert_eq!(
            p.warnings,
            vec![
                r#"net-conf.json: IPv6ServiceNetwork "fd00:20::/112" ignored: EnableIPv6 is false"#
            ]
        );
        // IPv6 only.
        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        assert!(c.ipv6_service_network().is_some());
    }

    #[test]
    fn ipv6_service_network_given_and_checked() {
        let cfg = |svc: &str| {
            format!(
                r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6ServiceNetwork":{svc}}}"#
            )
        };
        assert_eq!(
            ok(&cfg(r#""fd00:20::/108""#)).ipv6_service_network,
            Some("fd00:20::/108".parse().unwrap())
        );
        assert_eq!(
            ok(&cfg(r#""fd00:20::/126""#)).ipv6_service_network,
            Some("fd00:20::/126".parse().unwrap())
        );
        // Case-insensitive like every key.
        assert_eq!(
            ok(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","ipv6servicenetwork":"fd00:20::/120"}"#)
                .ipv6_service_network,
            Some("fd00:20::/120".parse().unwrap())
        );
        for (given, want) in [
            (
                r#""fd00:20::/107""#,
                "IPv6ServiceNetwork: /107 is too large: at least /108 (as kube-apiserver requires)",
            ),
            (
                r#""fd00:20::/64""#,
                "IPv6ServiceNetwork: /64 is too large: at least /108 (as kube-apiserver requires)",
            ),
            (
                r#""fd00:20::/127""#,
                "IPv6ServiceNetwork: /127 is too small: at most /126 (two usable addresses)",
            ),
            (
                r#""fd00:20::1/112""#,
                r#"IPv6ServiceNetwork: "fd00:20::1/112" has host bits set (did you mean fd00:20::/112?)"#,
            ),
            (
                r#""10.96.0.0/12""#,
                r#"IPv6ServiceNetwork: "10.96.0.0/12" is not an IPv6 CIDR"#,
            ),
            (
                r#""fd00:20::""#,
                r#"IPv6ServiceNetwork: "fd00:20::" is not an IPv6 CIDR"#,
            ),
            (
                r#""fc00:0:0:1::/112""#,
                "IPv6ServiceNetwork: fc00:0:0:1::/112 overlaps IPv6Network fc00::/48",
            ),
            ("112", "IPv6ServiceNetwork: must be a string, got 112"),
        ] {
            assert_eq!(err(&cfg(given)), want, "{given}");
        }
        // A default that overlaps IPv6Network is only a warning (the registry refuses it).
        let p = parse(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(
            p.warnings,
            vec!["net-conf.json: the default IPv6ServiceNetwork fd00:10:96::/112 overlaps IPv6Network fd00::/16: set IPv6ServiceNetwork before creating Services"]
        );
        assert_eq!(
            p.config.ipv6_service_network_overlap(),
            Some("fd00::/16".parse().unwrap())
        );
    }

    #[test]
    fn fits() {
        let c = ok(r#"{"Network":"10.5.0.0/16"}"#);
        assert!(c.fits_v4("10.5.7.0/24".parse().unwrap()));
        assert!(
            !c.fits_v4("10.5.0.0/24".parse().unwrap()),
            "below SubnetMin"
        );
        assert!(!c.fits_v4("10.5.7.0/25".parse().unwrap()));
        assert!(!c.fits_v4("10.6.7.0/24".parse().unwrap()));
    }
}
