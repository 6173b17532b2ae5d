//! `v1` Secret. Its values never reach a log: [`SecretBytes`] debug-prints as a length.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ObjectMeta;

/// The type of a Secret holding a TLS certificate chain and its key.
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";
/// The default type.
pub const SECRET_TYPE_OPAQUE: &str = "Opaque";
/// `kubernetes.io/tls` keys.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";
/// The API server's limit on a Secret's data.
pub const MAX_SECRET_SIZE: usize = 1024 * 1024;

/// `v1` Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Absent: `Opaque` (filled in when stored).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Values base64-encoded in JSON and YAML, as the API's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, SecretBytes>,
    /// Write-only plain-text values, merged into `data` (over it) when stored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub string_data: BTreeMap<String, SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<bool>,
}

impl Secret {
    /// The type, `Opaque` when absent.
    pub fn secret_type(&self) -> &str {
        self.type_.as_deref().unwrap_or(SECRET_TYPE_OPAQUE)
    }

    /// Moves `stringData` into `data` (a key in both takes the `stringData` value), as the API
    /// server does on write.
    pub fn merge_string_data(&mut self) {
        for (k, v) in std::mem::take(&mut self.string_data) {
            self.data.insert(k, SecretBytes(v.0.into_bytes()));
        }
    }

    /// The value of `key` in `data` or `stringData` (which wins).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.string_data
            .get(key)
            .map(|s| s.0.as_bytes())
            .or_else(|| self.data.get(key).map(|b| b.0.as_slice()))
    }

    /// A copy without any value (for printing): the keys stay, with their sizes in bytes.
    pub fn redacted(&self) -> (Secret, BTreeMap<String, usize>) {
        let mut sizes = BTreeMap::new();
        for (k, v) in &self.data {
            sizes.insert(k.clone(), v.0.len());
        }
        for (k, v) in &self.string_data {
            sizes.insert(k.clone(), v.0.len());
        }
        let copy = Secret {
            metadata: self.metadata.clone(),
            type_: self.type_.clone(),
            data: BTreeMap::new(),
            string_data: BTreeMap::new(),
            immutable: self.immutable,
        };
        (copy, sizes)
    }
}

/// Secret bytes: base64 in JSON/YAML; `Debug` shows only the length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map(SecretBytes)
            .map_err(|e| serde::de::Error::custom(format!("not valid base64: {e}")))
    }
}

/// A plain-text Secret value (`stringData`); `Debug` shows only the length.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_are_base64_in_json_and_never_in_debug() {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "tls"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA==", "tls.key": "c2VjcmV0LWtleQ=="},
            "stringData": {"extra": "hunter2"}
        }))
        .unwrap();
        assert_eq!(s.value("tls.key"), Some(&b"secret-key"[..]));
        assert_eq!(s.value("extra"), Some(&b"hunter2"[..]));
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("secret-key") && !dbg.contains("c2VjcmV0") && !dbg.contains("hunter2"),
            "{dbg}"
        );
        assert!(dbg.contains("<10 bytes>"), "{dbg}");
        let mut merged = s.clone();
        merged.merge_string_data();
        assert!(merged.string_data.is_empty());
        let v = serde_json::to_value(&merged).unwrap();
        assert_eq!(v["data"]["extra"], "aHVudGVyMg==");
        assert_eq!(v["data"]["tls.crt"], "Y2VydA==");
        let (red, sizes) = merged.redacted();
        assert!(red.data.is_empty());
        assert_eq!(sizes["tls.key"], 10);
        assert_eq!(sizes["extra"], 7);
    }

    #[test]
    fn bad_base64_is_an_error() {
        let r: Result<Secret, _> = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"}, "data": {"k": "not base64!"}
        }));
        assert!(r.unwrap_err().to_string().contains("not valid base64"));
    }
}
