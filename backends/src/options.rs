//! Reading a backend's options from the `Backend` object of the network config: keys match
//! case-insensitively (as Go's encoding/json does for flannel), null means absent, and errors
//! name `Backend.<key>`.

use serde_json::{Map, Value};

use crate::BackendError;

/// Options any backend may carry that it does not read itself (handled by the daemon).
const SHARED_KEYS: &[&str] = &["Fallback"];

pub(crate) fn bad(key: &str, msg: impl Into<String>) -> BackendError {
    BackendError::Config {
        key: key.to_string(),
        msg: msg.into(),
    }
}

/// The options of one backend type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options<'a> {
    map: &'a Map<String, Value>,
    backend: &'static str,
}

impl<'a> Options<'a> {
    pub(crate) fn new(map: &'a Map<String, Value>, backend: &'static str) -> Self {
        Options { map, backend }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// The value of `key`, if present and not null.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.get(key)
    }

    /// An integer from 0 to `max`, if present.
    pub(crate) fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, BackendError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(bad(
                    key,
                    format!("must be an integer from 0 to {max}, got {v}"),
                )),
            },
        }
    }

    /// A boolean, `default` when absent.
    pub(crate) fn boolean(&self, key: &str, default: bool) -> Result<bool, BackendError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(key, format!("must be true or false, got {v}"))),
        }
    }

    /// One of `allowed` (compared case-insensitively, returned as listed), if present.
    pub(crate) fn choice(
        &self,
        key: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, BackendError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(v)) => allowed
                .iter()
                .find(|a| a.eq_ignore_ascii_case(v))
                .copied()
                .map(Some)
                .ok_or_else(|| bad(key, format!("must be one of {allowed:?}, got {v:?}"))),
            Some(v) => Err(bad(key, format!("must be one of {allowed:?}, got {v}"))),
        }
    }

    /// A warning for every key that is neither in `known` nor shared by all backends.
    pub(crate) fn warnings(&self, known: &[&str]) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| {
                !known
                    .iter()
                    .chain(SHARED_KEYS)
                    .any(|n| n.eq_ignore_ascii_case(k))
            })
            .map(|k| format!("Backend.{k}: unknown {} option ignored", self.backend))
            .collect()
    }
}
