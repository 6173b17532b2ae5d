//! The cluster DNS file (`cluster-dns.env`, beside the subnet file): written by
//! `flanneld --cluster-dns`, read by the CNI plugin (the result's `dns`) and `flannelctl pod
//! up` (the pod's resolv.conf). Its absence means the node serves no cluster DNS.
//!
//! ```text
//! FLANNEL_DNS_NAMESERVERS=169.254.20.10
//! FLANNEL_DNS_DOMAIN=cluster.local
//! FLANNEL_DNS_OPTIONS=ndots:5
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::{key_values, read_text, write_text, SubnetEnvError};

/// The file name, in the subnet file's directory.
pub const FILE_NAME: &str = "cluster-dns.env";

/// Where the file sits for a given subnet file.
pub fn path_beside(subnet_file: &Path) -> PathBuf {
    subnet_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(FILE_NAME)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDnsEnv {
    pub nameservers: Vec<IpAddr>,
    /// The cluster domain (`cluster.local`), without trailing dot.
    pub domain: String,
    /// resolv.conf options (`ndots:5`).
    pub options: Vec<String>,
}

fn valid_option(o: &str) -> bool {
    !o.is_empty()
        && o.len() <= 64
        && o.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_' | b'.'))
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl ClusterDnsEnv {
    /// The search path of a pod in `namespace`: `<ns>.svc.<domain> svc.<domain> <domain>`.
    pub fn search(&self, namespace: &str) -> Vec<String> {
        let d = &self.domain;
        vec![
            format!("{namespace}.svc.{d}"),
            format!("svc.{d}"),
            d.clone(),
        ]
    }

    /// A pod's resolv.conf.
    pub fn resolv_conf(&self, namespace: &str) -> String {
        let mut s = String::new();
        for ns in &self.nameservers {
            s += &format!("nameserver {ns}\n");
        }
        s += &format!("search {}\n", self.search(namespace).join(" "));
        if !self.options.is_empty() {
            s += &format!("options {}\n", self.options.join(" "));
        }
        s
    }

    pub fn render(&self) -> String {
        let join = |v: Vec<String>| v.join(",");
        format!(
            "FLANNEL_DNS_NAMESERVERS={}\nFLANNEL_DNS_DOMAIN={}\nFLANNEL_DNS_OPTIONS={}\n",
            join(self.nameservers.iter().map(|n| n.to_string()).collect()),
            self.domain,
            join(self.options.clone())
        )
    }

    /// Parses the file's text; `path` names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, SubnetEnvError> {
        let mut env = ClusterDnsEnv {
            nameservers: Vec::new(),
            domain: String::new(),
            options: Vec::new(),
        };
        for (line, k, v) in key_values(text, path)? {
            let perr = |msg: String| SubnetEnvError::Parse {
                path: path.to_string(),
                line,
                msg,
            };
            let items = || v.split(',').map(str::trim).filter(|s| !s.is_empty());
            match k {
                "FLANNEL_DNS_NAMESERVERS" => {
                    env.nameservers = items()
                        .map(|a| a.parse().map_err(|_| perr(format!("bad address {a:?}"))))
                        .collect::<Result<_, _>>()?;
                }
                "FLANNEL_DNS_DOMAIN" => {
                    let d = v.trim().trim_end_matches('.').to_ascii_lowercase();
                    if !valid_domain(&d) {
                        return Err(perr(format!("bad domain {v:?}")));
                    }
                    env.domain = d;
                }
                "FLANNEL_DNS_OPTIONS" => {
                    env.options = items()
                        .map(|o| {
                            valid_option(o)
                                .then(|| o.to_string())
                                .ok_or_else(|| perr(format!("bad option {o:?}")))
                        })
                        .collect::<Result<_, _>>()?;
                }
                _ => {}
            }
        }
        let missing = |key| SubnetEnvError::Missing {
            path: path.to_string(),
            key,
        };
        if env.nameservers.is_empty() {
            return Err(missing("FLANNEL_DNS_NAMESERVERS"));
        }
        if env.domain.is_empty() {
            return Err(missing("FLANNEL_DNS_DOMAIN"));
        }
        Ok(env)
    }

    /// Reads the file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, SubnetEnvError> {
        match read_text(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(SubnetEnvError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        write_text(path, &self.render())
    }

    /// Removes the file (absent is fine).
    pub fn remove(path: &Path) -> Result<(), SubnetEnvError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SubnetEnvError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> ClusterDnsEnv {
        ClusterDnsEnv {
            nameservers: vec!["169.254.20.10".parse().unwrap()],
            domain: "cluster.local".into(),
            options: vec!["ndots:5".into()],
        }
    }

    #[test]
    fn round_trip_and_resolv_conf() {
        let s = sample();
        assert_eq!(
            s.render(),
            "FLANNEL_DNS_NAMESERVERS=169.254.20.10\nFLANNEL_DNS_DOMAIN=cluster.local\nFLANNEL_DNS_OPTIONS=ndots:5\n"
        );
        assert_eq!(ClusterDnsEnv::parse(&s.render(), "x").unwrap(), s);
        assert_eq!(
            s.resolv_conf("shop"),
            "nameserver 169.254.20.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn bad_values_name_the_line() {
        for (text, want) in [
            ("FLANNEL_DNS_NAMESERVERS=x\n", "line 1: bad address"),
            ("FLANNEL_DNS_NAMESERVERS=1.2.3.4\nFLANNEL_DNS_DOMAIN=a..b\n", "line 2: bad domain"),
            ("FLANNEL_DNS_NAMESERVERS=1.2.3.4\nFLANNEL_DNS_DOMAIN=c.l\nFLANNEL_DNS_OPTIONS=nd ots\n", "bad option"),
            ("FLANNEL_DNS_DOMAIN=c.l\n", "missing FLANNEL_DNS_NAMESERVERS"),
            ("FLANNEL_DNS_NAMESERVERS=1.2.3.4\n", "missing FLANNEL_DNS_DOMAIN"),
        ] {
            let e = ClusterDnsEnv::parse(text, "f").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn absent_file_is_none_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_beside(&dir.path().join("subnet.env"));
        assert_eq!(p, dir.path().join("cluster-dns.env"));
        assert_eq!(ClusterDnsEnv::read(&p).unwrap(), None);
        sample().write(&p).unwrap();
        assert_eq!(ClusterDnsEnv::read(&p).unwrap(), Some(sample()));
        ClusterDnsEnv::remove(&p).unwrap();
        ClusterDnsEnv::remove(&p).unwrap();
        assert_eq!(ClusterDnsEnv::read(&p).unwrap(), None);
    }
}
