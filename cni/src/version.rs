//! CNI versions: what this plugin speaks, picking a version the delegate speaks, and converting
//! results between the formats, as libcni converts them:
//!
//! - 0.1.0/0.2.0: `{"ip4": {"ip", "gateway", "routes"}, "ip6": {…}, "dns": {…}}`, one address
//!   per family, routes under the family of their destination;
//! - 0.3.0–0.4.0: `interfaces`, `ips` (each with `version` "4"/"6"), `routes`, `dns`;
//! - 1.0.0–1.1.0: the same without the `version` of each IP.
//!
//! A config without `cniVersion` is 0.1.0 (flannel's plugin and libcni's decoder say so).

use serde_json::{json, Value};

use crate::error::{code, CniError};

/// The versions VERSION reports, oldest first.
pub const SUPPORTED: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];
/// The version of a config that names none.
pub const IMPLIED: &str = "0.1.0";
/// The newest version: used when a request names none (VERSION without config).
pub const LATEST: &str = "1.1.0";

/// `major.minor.patch` as numbers, for ordering.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// Whether `v` is at least `min` (false when either does not parse).
pub fn at_least(v: &str, min: &str) -> bool {
    matches!((parse(v), parse(min)), (Some(a), Some(b)) if a >= b)
}

/// Refuses a version this plugin does not speak (code 1).
pub fn check(v: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {v:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        ))
    }
}

/// The version to call a delegate with: ours when it speaks it, else the newest version it
/// speaks that is older than ours, else (an old config, a delegate that dropped the old
/// versions) the newest it speaks: results are converted either way.
pub fn negotiate(ours: &str, delegate: &str, theirs: &[String]) -> Result<String, CniError> {
    if theirs.iter().any(|t| t == ours) {
        return Ok(ours.to_string());
    }
    let mine = parse(ours);
    let known = || theirs.iter().filter(|t| SUPPORTED.contains(&t.as_str()));
    known()
        .filter(|t| parse(t) <= mine)
        .max_by_key(|t| parse(t))
        .or_else(|| known().max_by_key(|t| parse(t)))
        .cloned()
        .ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "delegate plugin {delegate} speaks none of the versions this plugin speaks \
                     (config {ours}; {delegate} supports {})",
                    theirs.join(", ")
                ),
            )
        })
}

/// Whether `v` uses the 0.1.0/0.2.0 result format (`ip4`/`ip6`).
fn is_020(v: &str) -> bool {
    !at_least(v, "0.3.0")
}

fn is_v6(addr: &str) -> bool {
    addr.contains(':')
}

/// A 0.1.0/0.2.0 result in the 0.4.0 format (libcni's convertFrom02x).
fn from_020(r: &Value) -> Value {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for (key, v) in [("ip4", "4"), ("ip6", "6")] {
        let Some(c) = r.get(key).and_then(Value::as_object) else {
            continue;
        };
        let mut ip = json!({"version": v, "address": c.get("ip").cloned().unwrap_or(Value::Null)});
        if let Some(gw) = c.get("gateway").filter(|g| !g.is_null()) {
            ip["gateway"] = gw.clone();
        }
        ips.push(ip);
        if let Some(rs) = c.get("routes").and_then(Value::as_array) {
            routes.extend(rs.iter().cloned());
        }
    }
    let mut out = json!({"ips": ips, "routes": routes});
    if let Some(dns) = r.get("dns").filter(|d| !d.is_null()) {
        out["dns"] = dns.clone();
    }
    out
}

/// A 0.3.0+ result in the 0.1.0/0.2.0 format (libcni's convertTo02x): the first address of
/// each family, routes by the family of their destination, DNS; at least one address.
fn to_020(r: &Value) -> Result<Value, CniError> {
    let mut out = serde_json::Map::new();
    let ips = r
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (key, v6) in [("ip4", false), ("ip6", true)] {
        let Some(ip) = ips.iter().find(|ip| {
            ip.get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| is_v6(a) == v6)
        }) else {
            continue;
        };
        let mut c = json!({"ip": ip["address"]});
        if let Some(gw) = ip.get("gateway").filter(|g| !g.is_null()) {
            c["gateway"] = gw.clone();
        }
        let routes: Vec<Value> = r
            .get("routes")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter(|rt| {
                        rt.get("dst")
                            .and_then(Value::as_str)
                            .is_some_and(|d| is_v6(d) == v6)
                    })
                    .map(|rt| {
                        let mut x = json!({"dst": rt["dst"]});
                        if let Some(gw) = rt.get("gw").filter(|g| !g.is_null()) {
                            x["gw"] = gw.clone();
                        }
                        x
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !routes.is_empty() {
            c["routes"] = Value::Array(routes);
        }
        out.insert(key.into(), c);
    }
    if out.is_empty() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "cannot convert the result to the 0.1.0/0.2.0 format: it has no IP address",
        ));
    }
    out.insert(
        "dns".into(),
        r.get("dns")
            .filter(|d| !d.is_null())
            .cloned()
            .unwrap_or_else(|| json!({})),
    );
    Ok(Value::Object(out))
}

/// Converts a result (or prevResult) to version `to`.
pub fn convert_result(result: Value, to: &str) -> Result<Value, CniError> {
    let from = result
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(to)
        .to_string();
    check(&from).map_err(|e| CniError::new(e.code, format!("result: {}", e.msg)))?;
    check(to)?;
    if is_020(&from) && is_020(to) {
        let mut r = result;
        r["cniVersion"] = to.into();
        return Ok(r);
    }
    // Through the 0.4.0 format when either end is 0.1.0/0.2.0.
    let (mut result, from) = if is_020(&from) {
        (from_020(&result), "0.4.0".to_string())
    } else {
        (result, from)
    };
    if is_020(to) {
        let mut r = to_020(&result)?;
        r["cniVersion"] = to.into();
        return Ok(r);
    }
    let (old_from, old_to) = (!at_least(&from, "1.0.0"), !at_least(to, "1.0.0"));
    if let Some(ips) = result.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            match (old_from, old_to) {
                // To an old format: every IP needs its version (added if a plugin left it out).
                (_, true) if !ip.contains_key("version") => {
                    let v6 = ip.get("address").and_then(Value::as_str).is_some_and(is_v6);
                    ip.insert("version".into(), (if v6 { "6" } else { "4" }).into());
                }
                (true, false) => {
                    ip.remove("version");
                }
                _ => {}
            }
        }
    }
    if let Some(o) = result.as_object_mut() {
        o.insert("cniVersion".into(), to.into());
    }
    Ok(result)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ordering_and_support() {
        assert!(at_least("1.1.0", "1.0.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(!at_least("bogus", "0.1.0"));
        assert_eq!(parse("1.2"), None);
        assert_eq!(parse("1.2.3.4"), None);
        assert!(check("0.3.1").is_ok());
        assert!(check("0.1.0").is_ok() && check("0.2.0").is_ok());
        assert_eq!(check("").unwrap_err().code, 1);
        assert_eq!(check("2.0.0").unwrap_err().code, 1);
    }

    #[test]
    fn negotiation_takes_ours_or_the_newest_older_one() {
        let bridge_111: Vec<String> = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
            .map(String::from)
            .to_vec();
        assert_eq!(negotiate("1.1.0", "bridge", &bridge_111).unwrap(), "1.0.0");
        assert_eq!(negotiate("0.3.1", "bridge", &bridge_111).unwrap(), "0.3.1");
        assert_eq!(negotiate("0.2.0", "bridge", &bridge_111).unwrap(), "0.2.0");
        let new_only: Vec<String> = vec!["0.4.0".into(), "1.0.0".into()];
        assert_eq!(negotiate("0.1.0", "modern", &new_only).unwrap(), "1.0.0");
        let odd: Vec<String> = vec!["0.0.1".into(), "9.0.0".into()];
        let e = negotiate("1.0.0", "odd", &odd).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("odd supports 0.0.1, 9.0.0"), "{e}");
    }

    #[test]
    fn results_convert_both_ways() {
        let v1 = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.5.1.2/24", "gateway": "10.5.1.1", "interface": 0},
                    {"address": "fc00::2/64", "interface": 0}]});
        let old = convert_result(v1.clone(), "0.3.1").unwrap();
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        let back = convert_result(old, "1.1.0").unwrap();
        assert_eq!(back["ips"][0].get("version"), None);
        assert_eq!(back["ips"], v1["ips"]);
        assert_eq!(
            convert_result(json!({"cniVersion": "0.0.9"}), "1.0.0")
                .unwrap_err()
                .code,
            1
        );
    }

    #[test]
    fn results_convert_to_and_from_the_020_format() {
        let v1 = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.5.1.2/24", "gateway": "10.5.1.1", "interface": 0},
                    {"address": "10.5.1.3/24", "interface": 0},
                    {"address": "fc00::2/64", "interface": 0}],
            "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.1.1"}, {"dst": "fc00::/48"}],
            "dns": {"nameservers": ["10.96.0.10"]}});
        let old = convert_result(v1, "0.2.0").unwrap();
        assert_eq!(
            old,
            json!({"cniVersion": "0.2.0",
                "ip4": {"ip": "10.5.1.2/24", "gateway": "10.5.1.1",
                        "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.1.1"}]},
                "ip6": {"ip": "fc00::2/64", "routes": [{"dst": "fc00::/48"}]},
                "dns": {"nameservers": ["10.96.0.10"]}})
        );
        let back = convert_result(old.clone(), "1.1.0").unwrap();
        assert_eq!(
            back,
            json!({"cniVersion": "1.1.0",
                "ips": [{"address": "10.5.1.2/24", "gateway": "10.5.1.1"}, {"address": "fc00::2/64"}],
                "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.1.1"}, {"dst": "fc00::/48"}],
                "dns": {"nameservers": ["10.96.0.10"]}})
        );
        let v031 = convert_result(old.clone(), "0.3.1").unwrap();
        assert_eq!(v031["ips"][1]["version"], "6");
        assert_eq!(convert_result(old, "0.1.0").unwrap()["cniVersion"], "0.1.0");
        let e = convert_result(json!({"cniVersion": "1.0.0", "ips": []}), "0.2.0").unwrap_err();
        assert!(e.msg.contains("no IP address"), "{e}");
        // dns is always present in the old format (Go's encoder never omits it).
        let r = convert_result(
            json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.5.1.2/24"}]}),
            "0.2.0",
        )
        .unwrap();
        assert_eq!(
            r,
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.5.1.2/24"}, "dns": {}})
        );
    }
}
