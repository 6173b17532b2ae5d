//! `flannelctl docker-opts`: flannel's `dist/mk-docker-opts.sh` for hosts that run plain Docker
//! on the overlay. Reads the subnet file and writes the Docker daemon options that put
//! `docker0` on this node's subnet, in the script's exact format and with its options:
//!
//! ```text
//! DOCKER_OPT_BIP="--bip=10.5.52.1/24"
//! DOCKER_OPT_IPMASQ="--ip-masq=false"
//! DOCKER_OPT_MTU="--mtu=1450"
//! DOCKER_OPTS=" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450"
//! ```
//!
//! As the script: `DOCKER_OPT_*` variables of the environment are kept and included (sorted by
//! name, ours replace theirs), and the combined key's value in the environment comes first.
//! Unlike the script: a missing or malformed subnet file is an error (the script wrote empty
//! options, so Docker silently took 172.17.0.0/16), and the file is replaced atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ipnet::Ipv4Net;

#[derive(Debug, Args)]
pub struct DockerOptsArgs {
    /// flannel's subnet file.
    #[arg(
        short = 'f',
        value_name = "SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    subnet_file: PathBuf,
    /// The Docker environment file to write.
    #[arg(
        short = 'd',
        value_name = "FILE",
        default_value = "/run/docker_opts.env"
    )]
    docker_env: PathBuf,
    /// Each option as its own variable (`DOCKER_OPT_BIP`, `DOCKER_OPT_IPMASQ`, `DOCKER_OPT_MTU`).
    #[arg(short = 'i')]
    individual: bool,
    /// All options in one variable (`-k`). Neither `-i` nor `-c`: both.
    #[arg(short = 'c')]
    combined: bool,
    /// Leave `--ip-masq` out (older Docker versions).
    #[arg(short = 'm')]
    no_ip_masq: bool,
    /// The combined variable's name.
    #[arg(short = 'k', value_name = "KEY", default_value = "DOCKER_OPTS")]
    key: String,
}

/// What the subnet file says that Docker needs (raw values, as the script sources them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlannelEnv {
    /// `FLANNEL_SUBNET` as written (first host address/len).
    pub subnet: Option<String>,
    pub mtu: Option<String>,
    pub ip_masq: Option<String>,
}

/// Reads the three keys from a subnet file's text, checking each value.
pub fn parse_subnet_env(text: &str, path: &str) -> Result<FlannelEnv> {
    let mut env = FlannelEnv::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("{path}: line {}: expected KEY=VALUE, got {line:?}", i + 1);
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "FLANNEL_SUBNET" => {
                v.parse::<Ipv4Net>().map_err(|_| {
                    anyhow::anyhow!(
                        "{path}: line {}: FLANNEL_SUBNET {v:?} is not an IPv4 CIDR",
                        i + 1
                    )
                })?;
                env.subnet = Some(v);
            }
            "FLANNEL_MTU" => {
                v.parse::<u32>().map_err(|_| {
                    anyhow::anyhow!("{path}: line {}: FLANNEL_MTU {v:?} is not a number", i + 1)
                })?;
                env.mtu = Some(v);
            }
            // The script's own check and message.
            "FLANNEL_IPMASQ" if v != "true" && v != "false" => {
                bail!("{path}: Invalid value of FLANNEL_IPMASQ: {v}")
            }
            "FLANNEL_IPMASQ" => env.ip_masq = Some(v),
            _ => {}
        }
    }
    if env.subnet.is_none() {
        bail!("{path}: no FLANNEL_SUBNET (an IPv4 subnet is what docker0 needs)");
    }
    Ok(env)
}

/// Options of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Render {
    pub individual: bool,
    pub combined: bool,
    pub ip_masq: bool,
    pub key: String,
}

/// The Docker env file's text (pure). `environ` is the process environment: its `DOCKER_OPT_*`
/// variables and the value of `key` are used as the script uses them.
pub fn render(env: &FlannelEnv, r: &Render, environ: &BTreeMap<String, String>) -> String {
    let (individual, combined) = if !r.individual && !r.combined {
        (true, true)
    } else {
        (r.individual, r.combined)
    };
    let mut opts: BTreeMap<String, String> = environ
        .iter()
        .filter(|(k, _)| k.starts_with("DOCKER_OPT_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(s) = &env.subnet {
        opts.insert("DOCKER_OPT_BIP".into(), format!("--bip={s}"));
    }
    if let Some(m) = &env.mtu {
        opts.insert("DOCKER_OPT_MTU".into(), format!("--mtu={m}"));
    }
    if r.ip_masq {
        // flannel masquerades (FLANNEL_IPMASQ=true): Docker must not, and the other way round.
        match env.ip_masq.as_deref() {
            Some("true") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=false".into());
            }
            Some("false") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=true".into());
            }
            _ => {}
        }
    }
    let mut all = match environ.get(&r.key).filter(|v| !v.is_empty()) {
        Some(v) => format!("{v} "),
        None => String::new(),
    };
    let mut out = String::new();
    for (name, value) in &opts {
        if individual {
            out += &format!("{name}=\"{value}\"\n");
        }
        all += &format!(" {value}");
    }
    if combined {
        out += &format!("{}=\"{all}\"\n", r.key);
    }
    out
}

fn is_shell_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Routes to our subnet via a gateway (the script refuses to go on when one exists: docker0
/// would fight it), from `ip -4 route show` output (pure).
pub fn conflicting_routes(routes: &str, subnet: Ipv4Net) -> Vec<String> {
    let net = subnet.trunc().to_string();
    routes
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(net.as_str()) && l.contains(" via "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Writes `text` to `path` atomically (temp file in the same directory, rename), mode 0644.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "docker_opts.env".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: DockerOptsArgs) -> Result<()> {
    if !is_shell_name(&args.key) {
        bail!("-k {:?}: not a shell variable name", args.key);
    }
    let path = args.subnet_file.display().to_string();
    let text = std::fs::read_to_string(&args.subnet_file)
        .with_context(|| format!("reading the subnet file {path} (is flanneld running?)"))?;
    let env = parse_subnet_env(&text, &path)?;
    let r = Render {
        individual: args.individual,
        combined: args.combined,
        ip_masq: !args.no_ip_masq,
        key: args.key,
    };
    let environ: BTreeMap<String, String> = std::env::vars().collect();
    write_atomic(&args.docker_env, &render(&env, &r, &environ))?;
    // As the script, after writing: a route to our subnet via a gateway is an error.
    let subnet: Ipv4Net = env
        .subnet
        .as_deref()
        .and_then(|s| s.parse().ok())
        .context("FLANNEL_SUBNET")?;
    match routes() {
        Ok(table) => {
            let bad = conflicting_routes(&table, subnet);
            if !bad.is_empty() {
                bail!(
                    "Your routing table already contains the subnet: {}",
                    bad.join("; ")
                );
            }
        }
        Err(e) => eprintln!("warning: not checking the routing table: {e:#}"),
    }
    Ok(())
}

fn routes() -> Result<String> {
    let mut child = Command::new("ip")
        .args(["-4", "route", "show"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running ip -4 route show")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                std::io::Read::read_to_string(&mut o, &mut out)?;
            }
            if !status.success() {
                bail!("ip -4 route show: {status}");
            }
            return Ok(out);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ip -4 route show: no answer in 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn opts(individual: bool, combined: bool, ip_masq: bool, key: &str) -> Render {
        Render {
            individual,
            combined,
            ip_masq,
            key: key.into(),
        }
    }

    /// Expected texts are what `sh dist/mk-docker-opts.sh` (dash, flannel's script at
    /// cdf76059) writes for the same file and options.
    #[test]
    fn output_is_the_scripts() {
        let env = parse_subnet_env(SUBNET_ENV, "s").unwrap();
        let none = BTreeMap::new();
        assert_eq!(
            render(&env, &opts(false, false, true, "DOCKER_OPTS"), &none),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        assert_eq!(
            render(&env, &opts(false, true, true, "DOCKER_OPTS"), &none),
            "DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        assert_eq!(
            render(&env, &opts(true, false, true, "DOCKER_OPTS"), &none),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        // -m: no --ip-masq.
        assert_eq!(
            render(&env, &opts(false, false, false, "DOCKER_OPTS"), &none),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.5.52.1/24 --mtu=1450\"\n"
        );
        // -k FOO.
        assert!(render(&env, &opts(false, true, true, "FOO"), &none)
            .starts_with("FOO=\" --bip=10.5.52.1/24"));
        // The combined key's value from the environment comes first (DOCKER_OPTS="--debug").
        let environ = BTreeMap::from([("DOCKER_OPTS".to_string(), "--debug".to_string())]);
        assert_eq!(
            render(&env, &opts(false, true, true, "DOCKER_OPTS"), &environ),
            "DOCKER_OPTS=\"--debug  --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        // FLANNEL_IPMASQ=false: Docker masquerades.
        let env =
            parse_subnet_env(&SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"), "s").unwrap();
        assert!(render(&env, &opts(true, false, true, "DOCKER_OPTS"), &none)
            .contains("DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n"));
        // DOCKER_OPT_* of the environment are included in name order.
        let environ =
            BTreeMap::from([("DOCKER_OPT_DNS".to_string(), "--dns=10.96.0.10".to_string())]);
        assert_eq!(
            render(&env, &opts(false, true, true, "DOCKER_OPTS"), &environ),
            "DOCKER_OPTS=\" --bip=10.5.52.1/24 --dns=10.96.0.10 --ip-masq=true --mtu=1450\"\n"
        );
    }

    #[test]
    fn bad_subnet_files_are_refused() {
        let e = parse_subnet_env(&SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=yes"), "s")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "s: Invalid value of FLANNEL_IPMASQ: yes");
        let e = parse_subnet_env("FLANNEL_NETWORK=10.5.0.0/16\n", "s").unwrap_err();
        assert!(e.to_string().contains("no FLANNEL_SUBNET"), "{e}");
        let e = parse_subnet_env("FLANNEL_SUBNET=10.5.52.1\n", "s").unwrap_err();
        assert!(e.to_string().contains("not an IPv4 CIDR"), "{e}");
        assert!(!is_shell_name("A-B") && !is_shell_name("1A") && is_shell_name("_X1"));
    }

    #[test]
    fn routes_to_our_subnet_via_a_gateway_conflict() {
        let table = "default via 192.0.2.1 dev eth0\n10.5.52.0/24 via 192.0.2.9 dev eth0\n10.5.52.0/24 dev docker0 proto kernel scope link src 10.5.52.1\n10.5.0.0/16 dev flannel0\n";
        let subnet: Ipv4Net = "10.5.52.1/24".parse().unwrap();
        assert_eq!(
            conflicting_routes(table, subnet),
            vec!["10.5.52.0/24 via 192.0.2.9 dev eth0"]
        );
        assert!(conflicting_routes("10.5.52.0/24 dev docker0\n", subnet).is_empty());
    }
}
