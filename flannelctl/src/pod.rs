//! `flannelctl pod up NAME` / `pod down NAME`: a named network namespace (`/run/netns/NAME`,
//! created by `ip netns add`, refused if it exists) attached through the conflist's plugins
//! with container ID NAME; the ADD result is cached in `--cache-dir` for DEL, as runtimes do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use cni::chain::ConfList;
use cni::exec::{Call, PathExec};
use serde_json::{json, Map, Value};

#[derive(Debug, Subcommand)]
pub enum PodCmd {
    /// Create namespace NAME and attach it (prints the CNI result).
    Up(UpArgs),
    /// Detach NAME (DEL through the chain, in reverse) and delete its namespace.
    Down(Common),
}

#[derive(Debug, Args)]
pub struct Common {
    /// The pod: its network namespace name and container ID.
    name: String,
    /// The plugin chain.
    #[arg(long, default_value = "/etc/cni/net.d/10-flannel.conflist")]
    conflist: PathBuf,
    /// Where the plugins are (CNI_PATH).
    #[arg(long, default_value = "/opt/cni/bin:/usr/lib/cni")]
    cni_path: String,
    /// Where ADD results are cached for DEL.
    #[arg(long, default_value = "/var/lib/flannelctl/pods")]
    cache_dir: PathBuf,
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// Run the plugins inside this network namespace (a node of a namespace testbed; the
    /// pod's bridge lives there). Default: the current one.
    #[arg(long)]
    node_netns: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    common: Common,
    /// Kubernetes namespace and name passed in CNI_ARGS (recorded by the flannel plugin).
    #[arg(long)]
    k8s_namespace: Option<String>,
    #[arg(long)]
    k8s_name: Option<String>,
    /// A port mapping HOST:CONTAINER[/tcp|udp] (portmap's portMappings capability).
    #[arg(long = "port", value_parser = parse_port)]
    ports: Vec<Value>,
}

fn parse_port(s: &str) -> Result<Value, String> {
    let (ports, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let (h, c) = ports
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:CONTAINER[/tcp|udp]"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port 1-65535"))
    };
    if !matches!(proto, "tcp" | "udp" | "sctp") {
        return Err(format!("{s:?}: protocol must be tcp, udp or sctp"));
    }
    Ok(json!({"hostPort": port(h)?, "containerPort": port(c)?, "protocol": proto}))
}

const LIMIT: Duration = Duration::from_secs(120);

fn ip_netns(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .with_context(|| format!("running ip netns {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "ip netns {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn load(c: &Common) -> Result<ConfList> {
    let bytes =
        std::fs::read(&c.conflist).with_context(|| format!("reading {}", c.conflist.display()))?;
    ConfList::parse(&bytes).with_context(|| format!("{}", c.conflist.display()))
}

fn cache_file(c: &Common) -> PathBuf {
    c.cache_dir.join(format!("{}.json", c.name))
}

fn runtime(ports: &[Value]) -> Map<String, Value> {
    let mut rt = Map::new();
    if !ports.is_empty() {
        rt.insert("portMappings".into(), Value::Array(ports.to_vec()));
    }
    rt
}

/// Runs `f` on a thread that entered `/run/netns/<ns>` (plugins it starts run there too), or
/// here when `ns` is None.
fn in_node<T: Send + 'static>(
    ns: &Option<String>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the node's network namespace")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("plugin thread panicked"))?
}

pub fn run(cmd: PodCmd) -> Result<()> {
    match cmd {
        PodCmd::Up(a) => up(&a),
        PodCmd::Down(c) => down(&c),
    }
}

fn up(a: &UpArgs) -> Result<()> {
    let c = &a.common;
    cni::store::check_container_id(&c.name).map_err(|e| anyhow::anyhow!("pod name: {}", e.msg))?;
    let list = load(c)?;
    let netns = Path::new("/run/netns").join(&c.name);
    if netns.exists() {
        bail!("network namespace {} already exists", c.name);
    }
    ip_netns(&["add", &c.name])?;
    let mut args = vec!["IgnoreUnknown=1".to_string()];
    if let Some(ns) = &a.k8s_namespace {
        args.push(format!("K8S_POD_NAMESPACE={ns}"));
    }
    if let Some(n) = &a.k8s_name {
        args.push(format!("K8S_POD_NAME={n}"));
    }
    let call = Call {
        command: "ADD".into(),
        container_id: c.name.clone(),
        netns: netns.display().to_string(),
        ifname: c.ifname.clone(),
        args: args.join(";"),
    };
    let rt = runtime(&a.ports);
    let exec = PathExec::new(&c.cni_path, LIMIT);
    let (call2, rt2) = (call.clone(), rt.clone());
    let added = in_node(&c.node_netns, move || list.add(&exec, &call2, &rt2))
        .and_then(|r| r.map_err(|e| anyhow::anyhow!("{e}")));
    let result = match added {
        Ok(r) => r,
        Err(e) => {
            let _ = ip_netns(&["del", &c.name]);
            bail!("attaching {}: {e}", c.name);
        }
    };
    let cached = json!({"call": {"args": call.args, "ifname": c.ifname, "netns": call.netns},
                        "runtimeConfig": rt, "result": result});
    std::fs::create_dir_all(&c.cache_dir)
        .with_context(|| format!("creating {}", c.cache_dir.display()))?;
    std::fs::write(cache_file(c), cached.to_string())
        .with_context(|| format!("writing {}", cache_file(c).display()))?;
    println!("{result}");
    Ok(())
}

fn down(c: &Common) -> Result<()> {
    let list = load(c)?;
    let cached: Option<Value> = std::fs::read(cache_file(c))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let get = |k: &str| -> String {
        cached
            .as_ref()
            .and_then(|v| v["call"][k].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let netns = Path::new("/run/netns").join(&c.name);
    let call = Call {
        command: "DEL".into(),
        container_id: c.name.clone(),
        netns: if netns.exists() {
            netns.display().to_string()
        } else {
            String::new()
        },
        ifname: c.ifname.clone(),
        args: get("args"),
    };
    let rt = cached
        .as_ref()
        .and_then(|v| v["runtimeConfig"].as_object().cloned())
        .unwrap_or_default();
    let prev = cached.as_ref().map(|v| v["result"].clone());
    let exec = PathExec::new(&c.cni_path, LIMIT);
    // Keep going: the namespace and cache go even if a plugin failed (reported at the end).
    let del = in_node(&c.node_netns, move || {
        list.del(&exec, &call, &rt, prev.as_ref())
    })
    .and_then(|r| r.map_err(|e| anyhow::anyhow!("{e}")));
    let ns = if netns.exists() {
        ip_netns(&["del", &c.name])
    } else {
        Ok(())
    };
    let _ = std::fs::remove_file(cache_file(c));
    del.with_context(|| format!("detaching {}", c.name))?;
    ns
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings() {
        assert_eq!(
            parse_port("8080:80").unwrap(),
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
        );
        assert_eq!(parse_port("53:53/udp").unwrap()["protocol"], "udp");
        for bad in ["8080", "0:80", "8080:70000", "1:2/icmp", "x:80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}
