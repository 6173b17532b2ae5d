//! The subnet file (`/run/flannel/subnet.env`) in flannel's exact format and key order.
//!
//! ```text
//! FLANNEL_NETWORK=10.5.0.0/16
//! FLANNEL_SUBNET=10.5.52.1/24
//! FLANNEL_IPV6_NETWORK=fc00::/48      (dual stack only)
//! FLANNEL_IPV6_SUBNET=fc00:0:0:34::1/64  (dual stack only)
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=false
//! ```
//! Written atomically ([`file::write_atomic`], mode 0644 as flannel's) and read with a size
//! limit ([`file::read_limited`], [`MAX_SIZE`]).

pub mod dns;
pub mod file;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};

/// The largest subnet file read (a real one is under 200 bytes).
pub const MAX_SIZE: u64 = 64 * 1024;

/// The mode the subnet file is written with (flannel's).
pub const MODE: u32 = 0o644;

/// The content of a subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    /// The node's subnet (network address and prefix, e.g. 10.5.52.0/24).
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ip_masq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {msg}")]
    Parse {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("{path}: missing {key}")]
    Missing { path: String, key: &'static str },
}

/// The `KEY=VALUE` lines of an env-style file (blank lines and `#` comments skipped), with
/// their 1-based line numbers; `path` names the file in errors.
pub(crate) fn key_values<'a>(
    text: &'a str,
    path: &str,
) -> Result<Vec<(usize, &'a str, &'a str)>, SubnetEnvError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| SubnetEnvError::Parse {
            path: path.to_string(),
            line: i + 1,
            msg: format!("expected KEY=VALUE, got {line:?}"),
        })?;
        out.push((i + 1, k.trim(), v));
    }
    Ok(out)
}

/// A node state file's text: a regular file of at most [`MAX_SIZE`] bytes, UTF-8.
pub(crate) fn read_text(path: &Path) -> Result<String, SubnetEnvError> {
    let io = |source| SubnetEnvError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = file::read_limited(path, MAX_SIZE).map_err(io)?;
    String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8: {e}"),
        ))
    })
}

/// Writes a node state file atomically with mode [`MODE`], creating its directory.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<(), SubnetEnvError> {
    let io = |source| SubnetEnvError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    file::write_atomic(path, text.as_bytes(), MODE).map_err(io)
}

/// First host address of a subnet with the subnet's prefix, as flannel writes FLANNEL_SUBNET.
fn first_host_v4(net: Ipv4Net) -> String {
    let ip = Ipv4Addr::from(u32::from(net.network()).wrapping_add(1));
    format!("{ip}/{}", net.prefix_len())
}

fn first_host_v6(net: Ipv6Net) -> String {
    let ip = Ipv6Addr::from(u128::from(net.network()).wrapping_add(1));
    format!("{ip}/{}", net.prefix_len())
}

impl SubnetEnv {
    /// The file's text, keys in flannel's order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.network {
            s += &format!("FLANNEL_NETWORK={n}\n");
        }
        if let Some(n) = self.subnet {
            s += &format!("FLANNEL_SUBNET={}\n", first_host_v4(n));
        }
        if let Some(n) = self.ipv6_network {
            s += &format!("FLANNEL_IPV6_NETWORK={n}\n");
        }
        if let Some(n) = self.ipv6_subnet {
            s += &format!("FLANNEL_IPV6_SUBNET={}\n", first_host_v6(n));
        }
        s += &format!("FLANNEL_MTU={}\n", self.mtu);
        s += &format!("FLANNEL_IPMASQ={}\n", self.ip_masq);
        s
    }

    /// Parses the text of a subnet file; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, SubnetEnvError> {
        let mut env = SubnetEnv {
            network: None,
            subnet: None,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 0,
            ip_masq: false,
        };
        let mut have_mtu = false;
        for (line, k, v) in key_values(text, path)? {
            let perr = |msg: String| SubnetEnvError::Parse {
                path: path.to_string(),
                line,
                msg,
            };
            let v = v.trim().trim_matches('"');
            match k {
                "FLANNEL_NETWORK" => {
                    env.network = Some(v.parse().map_err(|_| perr(format!("bad CIDR {v:?}")))?)
                }
                "FLANNEL_SUBNET" => {
                    let n: Ipv4Net = v.parse().map_err(|_| perr(format!("bad CIDR {v:?}")))?;
                    env.subnet = Some(n.trunc());
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.ipv6_network = Some(v.parse().map_err(|_| perr(format!("bad CIDR {v:?}")))?)
                }
                "FLANNEL_IPV6_SUBNET" => {
                    let n: Ipv6Net = v.parse().map_err(|_| perr(format!("bad CIDR {v:?}")))?;
                    env.ipv6_subnet = Some(n.trunc());
                }
                "FLANNEL_MTU" => {
                    env.mtu = v.parse().map_err(|_| perr(format!("bad MTU {v:?}")))?;
                    have_mtu = true;
                }
                "FLANNEL_IPMASQ" => {
                    env.ip_masq = v.parse().map_err(|_| perr(format!("bad boolean {v:?}")))?
                }
                _ => {}
            }
        }
        let missing = |key| SubnetEnvError::Missing {
            path: path.to_string(),
            key,
        };
        if env.network.is_none() && env.ipv6_network.is_none() {
            return Err(missing("FLANNEL_NETWORK"));
        }
        if env.network.is_some() && env.subnet.is_none() {
            return Err(missing("FLANNEL_SUBNET"));
        }
        if env.ipv6_network.is_some() && env.ipv6_subnet.is_none() {
            return Err(missing("FLANNEL_IPV6_SUBNET"));
        }
        if !have_mtu {
            return Err(missing("FLANNEL_MTU"));
        }
        Ok(env)
    }

    /// Reads and parses a subnet file: a regular file of at most [`MAX_SIZE`] bytes.
    pub fn read(path: &Path) -> Result<Self, SubnetEnvError> {
        Self::parse(&read_text(path)?, &path.display().to_string())
    }

    /// Writes the file atomically with mode [`MODE`] ([`file::write_atomic`]), creating the
    /// directory if needed.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        write_text(path, &self.render())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.5.0.0/16".parse().unwrap()),
            subnet: Some("10.5.52.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: true,
        }
    }

    #[test]
    fn renders_flannel_format() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let mut dual = sample();
        dual.ipv6_network = Some("fc00::/48".parse().unwrap());
        dual.ipv6_subnet = Some("fc00:0:0:34::/64".parse().unwrap());
        assert_eq!(
            dual.render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:34::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&dual.render(), "x").unwrap(), dual);
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        sample().write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), sample());
        // No temp file is left behind; flannel's mode.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE);
    }

    #[test]
    fn a_symlink_planted_at_a_guessable_temp_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The name the writer used to take: `.subnet.env.<pid>.tmp`.
        let guess = dir
            .path()
            .join(format!(".subnet.env.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &guess).unwrap();
        sample().write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(SubnetEnv::read(&path).unwrap(), sample());
    }

    #[test]
    fn parse_errors_name_file_and_key() {
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n", "/run/x")
            .unwrap_err();
        assert_eq!(e.to_string(), "/run/x: missing FLANNEL_SUBNET");
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\n",
            "f",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "f: missing FLANNEL_MTU");
        let e = SubnetEnv::parse("FLANNEL_MTU=abc\n", "f").unwrap_err();
        assert_eq!(e.to_string(), "f: line 1: bad MTU \"abc\"");
        let e = SubnetEnv::read(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/subnet.env: "));
        // Bounded: a device never ends, a huge file is not read.
        let e = SubnetEnv::read(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.to_string(), "/dev/zero: not a regular file");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.env");
        std::fs::write(&big, vec![b'#'; MAX_SIZE as usize + 1]).unwrap();
        let e = SubnetEnv::read(&big).unwrap_err();
        assert!(e.to_string().contains("more than 65536"), "{e}");
    }
}
