//! CNI versions: what this plugin speaks, picking a version the delegate speaks, and converting
//! results between the 0.3/0.4 and 1.x formats (they differ only in the `version` field of
//! each IP, present before 1.0.0).

use serde_json::Value;

use crate::error::{code, CniError};

/// The versions VERSION reports, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
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
/// speaks that is older than ours and that this plugin can convert results from.
pub fn negotiate(ours: &str, delegate: &str, theirs: &[String]) -> Result<String, CniError> {
    if theirs.iter().any(|t| t == ours) {
        return Ok(ours.to_string());
    }
    let mine = parse(ours);
    theirs
        .iter()
        .filter(|t| SUPPORTED.contains(&t.as_str()))
        .filter(|t| parse(t) <= mine)
        .max_by_key(|t| parse(t))
        .cloned()
        .ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "delegate plugin {delegate} speaks none of the versions this config can use \
                     (config {ours}; {delegate} supports {})",
                    theirs.join(", ")
                ),
            )
        })
}

/// Converts a result (or prevResult) to version `to`.
pub fn convert_result(mut result: Value, to: &str) -> Result<Value, CniError> {
    let from = result
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(to)
        .to_string();
    check(&from).map_err(|e| CniError::new(e.code, format!("result: {}", e.msg)))?;
    check(to)?;
    let (old_from, old_to) = (!at_least(&from, "1.0.0"), !at_least(to, "1.0.0"));
    if let Some(ips) = result.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            match (old_from, old_to) {
                // To an old format: every IP needs its version (added if a plugin left it out).
                (_, true) if !ip.contains_key("version") => {
                    let v6 = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.contains(':'));
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
        assert_eq!(check("0.2.0").unwrap_err().code, 1);
        assert_eq!(check("2.0.0").unwrap_err().code, 1);
    }

    #[test]
    fn negotiation_takes_ours_or_the_newest_older_one() {
        let bridge_111: Vec<String> = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
            .map(String::from)
            .to_vec();
        assert_eq!(negotiate("1.1.0", "bridge", &bridge_111).unwrap(), "1.0.0");
        assert_eq!(negotiate("0.3.1", "bridge", &bridge_111).unwrap(), "0.3.1");
        let old: Vec<String> = vec!["0.1.0".into(), "0.2.0".into()];
        let e = negotiate("1.0.0", "ancient", &old).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("ancient supports 0.1.0, 0.2.0"), "{e}");
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
            convert_result(json!({"cniVersion": "0.2.0"}), "1.0.0")
                .unwrap_err()
                .code,
            1
        );
    }
}
