//! The plugin's network configuration (stdin), with flannel's keys and defaults:
//!
//! ```json
//! {"cniVersion": "1.1.0", "name": "cbr0", "type": "flannel",
//!  "subnetFile": "/run/flannel/subnet.env", "dataDir": "/var/lib/cni/flannel",
//!  "delegate": {"hairpinMode": true, "isDefaultGateway": true}}
//! ```
//! Also read: `ipam` (merged into the delegate's), `runtimeConfig` (passed on), `prevResult`
//! (CHECK), `cni.dev/valid-attachments` (GC). Unknown keys are ignored, as flannel does.
//! A config without `cniVersion` (or with `""`, which libcni passes on from a list without
//! one) is 0.1.0, as for flannel's plugin. `subnetFile` and `dataDir` may be omitted for the
//! defaults but not empty (an empty `dataDir` once silently meant the default directory).

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::{code, CniError};
use crate::version;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// The largest network configuration read on stdin.
pub const MAX_STDIN: u64 = 4 * 1024 * 1024;

/// One attachment GC must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Map<String, Value>,
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Value>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_CONFIG, format!("{field}: {msg}"))
}

fn opt_str<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, CniError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, format!("must be a string, got {other}"))),
    }
}

fn opt_object(o: &Map<String, Value>, field: &str) -> Result<Option<Map<String, Value>>, CniError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(other) => Err(invalid(field, format!("must be an object, got {other}"))),
    }
}

/// Reads the cniVersion alone (for error output and VERSION), if the input has one.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The version to print an error in: the config's, 0.1.0 for a config that names none, the
/// newest when stdin is no JSON object.
pub fn error_version(stdin: &[u8]) -> String {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(_)) => peek_version(stdin).unwrap_or_else(|| version::IMPLIED.into()),
        _ => version::LATEST.into(),
    }
}

/// Parses and checks a network configuration. `needs_name`: ADD, DEL, CHECK and GC need the
/// network name (the delegate's bridge and IPAM store are named after it).
pub fn parse(stdin: &[u8], needs_name: bool) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "network configuration on stdin is not valid JSON",
        )
        .with_details(e.to_string())
    })?;
    let Value::Object(o) = v else {
        return Err(CniError::new(
            code::DECODE,
            "network configuration on stdin must be a JSON object",
        ));
    };
    let cni_version = opt_str(&o, "cniVersion")?
        .filter(|v| !v.is_empty())
        .unwrap_or(version::IMPLIED)
        .to_string();
    version::check(&cni_version)?;
    let name = opt_str(&o, "name")?.unwrap_or_default().to_string();
    if needs_name && name.is_empty() {
        return Err(invalid("name", "missing"));
    }
    if let Some(t) = opt_str(&o, "type")? {
        if t.is_empty() {
            return Err(invalid("type", "empty"));
        }
    }
    let path_or = |field: &str, default: &str| -> Result<PathBuf, CniError> {
        match opt_str(&o, field)? {
            None => Ok(PathBuf::from(default)),
            Some("") => Err(invalid(
                field,
                format!("empty (omit the key for the default {default})"),
            )),
            Some(p) => Ok(PathBuf::from(p)),
        }
    };
    let subnet_file = path_or("subnetFile", DEFAULT_SUBNET_FILE)?;
    let data_dir = path_or("dataDir", DEFAULT_DATA_DIR)?;
    let delegate = opt_object(&o, "delegate")?.unwrap_or_default();
    if let Some(t) = delegate.get("type") {
        match t.as_str() {
            Some(s) if !s.is_empty() && !s.contains('/') => {}
            _ => {
                return Err(invalid(
                    "delegate.type",
                    format!("must be a plugin name, got {t}"),
                ))
            }
        }
    }
    let ipam = opt_object(&o, "ipam")?;
    let runtime_config = o.get("runtimeConfig").filter(|v| !v.is_null()).cloned();
    let prev_result = o.get("prevResult").filter(|v| !v.is_null()).cloned();
    let valid_attachments = match o.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .enumerate()
                .map(|(i, e)| {
                    let field = format!("cni.dev/valid-attachments[{i}]");
                    let get = |k: &str| {
                        e.get(k)
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .ok_or_else(|| {
                                invalid(&format!("{field}.{k}"), "missing or not a string")
                            })
                    };
                    Ok(ValidAttachment {
                        container_id: get("containerID")?,
                        ifname: get("ifname")?,
                    })
                })
                .collect::<Result<Vec<_>, CniError>>()?,
        ),
        Some(other) => {
            return Err(invalid(
                "cni.dev/valid-attachments",
                format!("must be an array, got {other}"),
            ))
        }
    };
    Ok(NetConf {
        cni_version,
        name,
        subnet_file,
        data_dir,
        delegate,
        ipam,
        runtime_config,
        prev_result,
        valid_attachments,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_flannels() {
        let c = parse(
            br#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel"}"#,
            true,
        )
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/flannel"));
        assert!(c.delegate.is_empty());
        assert_eq!(c.ipam, None);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: [(&[u8], u32, &str); 11] = [
            (b"{not json", 6, "not valid JSON"),
            (b"[1]", 6, "JSON object"),
            (br#"{"cniVersion":"1.0.0","name":"x","dataDir":""}"#, 7, "dataDir: empty (omit the key for the default /var/lib/cni/flannel)"),
            (br#"{"cniVersion":"1.0.0","name":"x","subnetFile":""}"#, 7, "subnetFile: empty"),
            (br#"{"cniVersion":"9.9.9","name":"x"}"#, 1, "9.9.9"),
            (br#"{"cniVersion":"1.0.0"}"#, 7, "name: missing"),
            (br#"{"cniVersion":7,"name":"x"}"#, 7, "cniVersion: must be a string"),
            (br#"{"cniVersion":"1.0.0","name":"x","delegate":[]}"#, 7, "delegate: must be an object"),
            (br#"{"cniVersion":"1.0.0","name":"x","delegate":{"type":"../sh"}}"#, 7, "delegate.type"),
            (br#"{"cniVersion":"1.0.0","name":"x","subnetFile":5}"#, 7, "subnetFile: must be a string"),
            (br#"{"cniVersion":"1.1.0","name":"x","cni.dev/valid-attachments":[{"containerID":"a"}]}"#,
             7, "cni.dev/valid-attachments[0].ifname"),
        ];
        for (input, code, text) in cases {
            let e = parse(input, true).unwrap_err();
            assert_eq!(e.code, code, "{e}");
            assert!(e.msg.contains(text), "{e} should mention {text}");
        }
    }

    #[test]
    fn gc_list_and_passthrough_fields() {
        let c = parse(
            br#"{"cniVersion":"1.1.0","name":"cbr0","type":"flannel","runtimeConfig":{"portMappings":[]},
                "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}],
                "ipam":{"dataDir":"/tmp/x"}}"#,
            true,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![ValidAttachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
        assert!(c.runtime_config.is_some());
        assert_eq!(c.ipam.unwrap()["dataDir"], "/tmp/x");
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(peek_version(b"junk"), None);
        assert_eq!(error_version(br#"{"name":"x"}"#), "0.1.0");
        assert_eq!(error_version(b"junk"), "1.1.0");
    }

    #[test]
    fn a_config_without_a_version_is_010() {
        // flannel's old single-file conf, and what libcni passes from a list without a version.
        for input in [
            &br#"{"name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#[..],
            br#"{"cniVersion":"","name":"cbr0","type":"flannel"}"#,
        ] {
            assert_eq!(parse(input, true).unwrap().cni_version, "0.1.0");
        }
        assert_eq!(
            parse(br#"{"cniVersion":"0.2.0","name":"cbr0"}"#, true)
                .unwrap()
                .cni_version,
            "0.2.0"
        );
    }
}
