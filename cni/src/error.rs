//! CNI errors: the spec's codes and the JSON a plugin prints on failure.

use serde_json::{json, Value};

/// Error codes of the CNI spec (1–99 are the spec's; 100+ are this plugin's own).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// CHECK found an attachment that no longer matches the node (e.g. its address is outside
    /// the node's current subnet).
    pub const STALE_ATTACHMENT: u32 = 100;
}

/// A CNI error: printed as `{"cniVersion", "code", "msg", "details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if .details.is_empty() { String::new() } else { format!(": {}", .details) })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }

    /// Reads a plugin's error output; anything else becomes an I/O error carrying the text.
    pub fn from_plugin_output(plugin: &str, stdout: &[u8], stderr: &[u8]) -> Self {
        if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
            if let Some(code) = v.get("code").and_then(Value::as_u64) {
                let msg = v.get("msg").and_then(Value::as_str).unwrap_or_default();
                let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
                return CniError {
                    code: u32::try_from(code).unwrap_or(code::IO),
                    msg: format!("{plugin}: {msg}"),
                    details: details.to_string(),
                };
            }
        }
        let text = String::from_utf8_lossy(if stdout.is_empty() { stderr } else { stdout });
        CniError::new(code::IO, format!("{plugin} failed")).with_details(text.trim().to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "not yet");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion": "1.1.0", "code": 11, "msg": "not yet"})
        );
        let e = e.with_details("because");
        assert_eq!(e.to_json("0.4.0")["details"], "because");
        assert_eq!(e.to_string(), "not yet: because");
    }

    #[test]
    fn plugin_errors_keep_their_code() {
        let e =
            CniError::from_plugin_output("bridge", br#"{"code":7,"msg":"bad","details":"x"}"#, b"");
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (7, "bridge: bad", "x")
        );
        let e = CniError::from_plugin_output("bridge", b"", b"segfault\n");
        assert_eq!((e.code, e.details.as_str()), (code::IO, "segfault"));
    }
}
