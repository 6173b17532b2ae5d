//! How to reach etcd: flannel's flags, as one value.

use std::path::PathBuf;
use std::time::Duration;

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// An etcd password. Its `Debug` output is redacted, so it never reaches a log line or an
/// error message through `{:?}` of the options or flags that carry it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for the one place that sends it to etcd.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl std::str::FromStr for Password {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Password(s.to_string()))
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Self {
        Password(s.to_string())
    }
}

/// How to reach etcd: flannel's flags.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Password>,
    /// Bound on every single call.
    pub timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_debug_output_hides_the_password() {
        let opts = EtcdOptions {
            username: Some("root".into()),
            password: Some(Password::new("hunter2-secret")),
            ..EtcdOptions::default()
        };
        let shown = format!("{opts:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("root"), "{shown}");
        assert_eq!(
            opts.password.as_ref().map(Password::expose),
            Some("hunter2-secret")
        );
    }
}
