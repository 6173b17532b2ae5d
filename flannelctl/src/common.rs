//! What the registry subcommands share: the etcd flags (flanneld's, read from
//! `FLANNELCTL_<FLAG>` too), reading manifests, and kubectl-style object names.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use etcd_access::{EtcdOptions, Password};
use registry::{parse_documents, Kind, Object, Store, StoreError};

/// How to reach etcd: the flags flanneld takes.
#[derive(Debug, Clone, Args)]
pub struct EtcdFlags {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        global = true,
        env = "FLANNELCTL_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix holding `config`, `subnets/` and `registry/`.
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_PREFIX", default_value = subnet_lease::store::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// TLS client key for etcd.
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// TLS client certificate for etcd.
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// CA that signed etcd's certificate (requires https:// endpoints).
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// etcd user name.
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password.
    #[arg(
        long,
        global = true,
        env = "FLANNELCTL_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<Password>,

    /// Seconds to wait for each etcd request.
    #[arg(long, global = true, env = "FLANNELCTL_ETCD_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub etcd_timeout: u64,
}

impl EtcdFlags {
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            timeout: std::time::Duration::from_secs(self.etcd_timeout),
        }
    }

    pub async fn store(&self) -> Result<Store> {
        Store::connect(&self.options())
            .await
            .map_err(|e| anyhow!("connecting to etcd: {}", self.err(e)))
    }

    /// A store error as one message (its text already carries its causes), with a hint when
    /// etcd did not answer.
    pub fn err(&self, e: StoreError) -> anyhow::Error {
        match &e {
            StoreError::Etcd(r) if r.is_transient() => anyhow!(
                "{e} (is etcd running at {}? see --etcd-endpoints)",
                self.etcd_endpoints.join(",")
            ),
            _ => anyhow!("{e}"),
        }
    }
}

/// Runs `fut` on a small runtime (the registry commands talk to etcd).
pub fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

/// A kind as the user typed it (`svc`, `services`, `Service`, ...).
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| {
        format!("unknown kind {s:?} (namespaces/ns, pods/po, services/svc, endpoints/ep, networkpolicies/netpol, secrets, ingresses/ing, ingressclasses)")
    })
}

/// `service/web`, as kubectl names objects in its messages.
pub fn ref_name(obj: &Object) -> String {
    format!(
        "{}/{}",
        obj.kind().as_str().to_ascii_lowercase(),
        obj.metadata().name
    )
}

/// The objects of every `-f` source, in order: a file, `-` (stdin, read once), or a directory
/// (its `.yaml`, `.yml` and `.json` files, sorted). Errors name the source.
pub fn read_manifests(sources: &[PathBuf]) -> Result<Vec<(String, Object)>> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for src in sources {
        if src == Path::new("-") {
            if stdin_read {
                bail!("-f -: stdin can be read only once");
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            push_parsed(&mut out, "stdin", &text)?;
        } else if src.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(src)
                .with_context(|| format!("reading {}", src.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            files.sort();
            for f in files {
                read_file(&mut out, &f)?;
            }
        } else {
            read_file(&mut out, src)?;
        }
    }
    Ok(out)
}

fn read_file(out: &mut Vec<(String, Object)>, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    push_parsed(out, &path.display().to_string(), &text)
}

fn push_parsed(out: &mut Vec<(String, Object)>, source: &str, text: &str) -> Result<()> {
    let objs = parse_documents(text).with_context(|| source.to_string())?;
    if objs.is_empty() {
        bail!("{source}: no objects in it");
    }
    out.extend(objs.into_iter().map(|o| (source.to_string(), o)));
    Ok(())
}

/// Rows as text, columns padded to their widest cell plus three spaces (kubectl's layout).
pub fn align(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < cols {
                let pad = widths[c] - cell.chars().count() + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
