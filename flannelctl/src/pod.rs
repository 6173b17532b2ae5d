//! `flannelctl pod up NAME` / `pod down NAME`: a named network namespace (`/run/netns/NAME`,
//! created by `ip netns add`, refused if it exists, loopback up as runtimes bring it up)
//! attached through the conflist's plugins with container ID NAME; the ADD result is cached in
//! `--cache-dir` for DEL, as runtimes do.
//!
//! `flannelctl pod gc`: for a runtime that never calls DEL (`ctr run`, then `ctr task rm`),
//! runs the flannel plugin's GC with `cni.dev/valid-attachments` = every attachment of its data
//! directory whose network namespace still exists (or cannot be judged), so the others'
//! addresses, stored configs and published records go. The data directory's lock is held
//! exclusively meanwhile, so an ADD running at the same time is waited for, never collected.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use cni::chain::ConfList;
use cni::exec::{Call, Exec, PathExec};
use serde_json::{json, Map, Value};

#[derive(Debug, Subcommand)]
pub enum PodCmd {
    /// Create namespace NAME and attach it (prints the CNI result).
    Up(UpArgs),
    /// Detach NAME (DEL through the chain, in reverse) and delete its namespace.
    Down(Common),
    /// Release the attachments whose network namespace is gone (the flannel plugin's GC).
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The plugin chain (its `flannel` entries say where their data directories are).
    #[arg(long, default_value = "/etc/cni/net.d/10-flannel.conflist")]
    conflist: PathBuf,
    /// Where the plugins are (CNI_PATH).
    #[arg(long, default_value = "/opt/cni/bin:/usr/lib/cni")]
    cni_path: String,
    /// Run the plugin inside this network namespace (a node of a namespace testbed).
    #[arg(long)]
    node_netns: Option<String>,
    /// Only print what would be released.
    #[arg(long)]
    dry_run: bool,
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

/// `ip -n NAME link set lo up` (no `ip netns exec`: nothing to mount).
fn lo_up(name: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["-n", name, "link", "set", "lo", "up"])
        .output()
        .context("running ip -n … link set lo up")?;
    ensure!(
        out.status.success(),
        "bringing up lo in {name}: {}",
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
        PodCmd::Gc(a) => gc(&a),
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
    // A pod reaches its own addresses through lo; runtimes bring it up (containerd, CRI-O,
    // podman), the flannel conflist has no loopback plugin.
    if let Err(e) = lo_up(&c.name) {
        let _ = ip_netns(&["del", &c.name]);
        return Err(e);
    }
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
    // The pod's resolv.conf, as a runtime writes it from the result's `dns`: where `ip netns
    // exec NAME` bind-mounts /etc/resolv.conf from.
    if let Some(text) = resolv_conf(&result)? {
        let dir = Path::new(ETC_NETNS).join(&c.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{result}");
    Ok(())
}

/// Where `ip netns exec` finds a namespace's own /etc files.
const ETC_NETNS: &str = "/etc/netns";

/// A resolv.conf from a CNI result's `dns` (`None` without nameservers). Every value is
/// checked: a plugin's answer must not be able to write lines of its choosing.
fn resolv_conf(result: &Value) -> Result<Option<String>> {
    let dns = &result["dns"];
    let list = |k: &str| -> Vec<&str> {
        dns[k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let nameservers = list("nameservers");
    if nameservers.is_empty() {
        return Ok(None);
    }
    let word = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'#' && b != b';')
    };
    let mut text = String::new();
    for n in nameservers {
        let ip: std::net::IpAddr = n
            .parse()
            .with_context(|| format!("CNI result dns.nameservers: {n:?} is not an address"))?;
        text += &format!("nameserver {ip}\n");
    }
    let mut search = list("search");
    if search.is_empty() {
        search = dns["domain"].as_str().into_iter().collect();
    }
    for (k, v) in [("search", search), ("options", list("options"))] {
        if let Some(bad) = v.iter().find(|s| !word(s)) {
            bail!("CNI result dns.{k}: {bad:?} is not a single word");
        }
        if !v.is_empty() {
            text += &format!("{k} {}\n", v.join(" "));
        }
    }
    Ok(Some(text))
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
    // The resolv.conf `up` wrote, and its directory once empty.
    let etc = Path::new(ETC_NETNS).join(&c.name);
    let _ = std::fs::remove_file(etc.join("resolv.conf"));
    let _ = std::fs::remove_dir(&etc);
    del.with_context(|| format!("detaching {}", c.name))?;
    ns
}

/// How long GC waits for running ADDs to finish before giving up.
const GC_LOCK_WAIT: Duration = Duration::from_secs(60);

/// What GC decides for one stored attachment.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep(cni::conf::ValidAttachment),
    Release(String, String),
}

/// Pure: keep every attachment whose namespace is present or cannot be judged, and every
/// stored config without a record (an ADD that stopped midway: its runtime retries DEL).
fn verdicts(
    ids: &[String],
    record: impl Fn(&str) -> Option<cni::attachment::Attachment>,
    state: impl Fn(&cni::attachment::Attachment) -> cni::attachment::Netns,
) -> Vec<Verdict> {
    use cni::attachment::Netns;
    ids.iter()
        .map(|id| {
            let Some(a) = record(id) else {
                return Verdict::Keep(cni::conf::ValidAttachment {
                    container_id: id.clone(),
                    ifname: "eth0".into(),
                });
            };
            match state(&a) {
                Netns::Gone(why) => Verdict::Release(id.clone(), why),
                Netns::Present | Netns::Unknown(_) => Verdict::Keep(cni::conf::ValidAttachment {
                    container_id: id.clone(),
                    ifname: a.ifname,
                }),
            }
        })
        .collect()
}

fn gc(a: &GcArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.conflist).with_context(|| format!("reading {}", a.conflist.display()))?;
    let list = ConfList::parse(&bytes).with_context(|| format!("{}", a.conflist.display()))?;
    let flannel: Vec<usize> = (0..list.plugins.len())
        .filter(|i| list.plugins[*i].get("type").and_then(Value::as_str) == Some("flannel"))
        .collect();
    ensure!(
        !flannel.is_empty(),
        "{}: no plugin of type flannel",
        a.conflist.display()
    );
    for i in flannel {
        // GC is a 1.1.0 command; the plugin speaks it whatever version the list is at.
        let mut conf = list.plugin_conf(i, None, &Map::new());
        conf["cniVersion"] = "1.1.0".into();
        let parsed = cni::conf::parse(conf.to_string().as_bytes(), true)
            .map_err(|e| anyhow::anyhow!("{}: plugins[{i}]: {e}", a.conflist.display()))?;
        let store = cni::store::Store::new(&parsed.data_dir);
        let _lock = store
            .lock(true, GC_LOCK_WAIT)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids = store.container_ids().map_err(|e| anyhow::anyhow!("{e}"))?;
        let all = verdicts(
            &ids,
            |id| store.load_attachment(id).ok().flatten(),
            cni::attachment::netns_state,
        );
        let mut valid = Vec::new();
        let mut released = Vec::new();
        for v in all {
            match v {
                Verdict::Keep(k) => {
                    valid.push(json!({"containerID": k.container_id, "ifname": k.ifname}))
                }
                Verdict::Release(id, why) => released.push((id, why)),
            }
        }
        for (id, why) in &released {
            println!(
                "{}{id}: {why}",
                if a.dry_run {
                    "would release "
                } else {
                    "releasing "
                }
            );
        }
        if a.dry_run || released.is_empty() {
            println!(
                "{}: {} kept, {} to release",
                parsed.data_dir.display(),
                valid.len(),
                released.len()
            );
            continue;
        }
        conf["cni.dev/valid-attachments"] = Value::Array(valid);
        let call = Call {
            command: "GC".into(),
            ..Default::default()
        };
        let exec = PathExec::new(&a.cni_path, LIMIT);
        let stdin = conf.to_string().into_bytes();
        in_node(&a.node_netns, move || exec.run("flannel", &call, &stdin))
            .and_then(|r| r.map_err(|e| anyhow::anyhow!("{e}")))
            .with_context(|| format!("GC of {}", parsed.data_dir.display()))?;
        println!("{}: released {}", parsed.data_dir.display(), released.len());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_the_result() {
        let r = json!({"dns": {"nameservers": ["169.254.20.10"],
            "search": ["x.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            "options": ["ndots:5"]}});
        assert_eq!(
            resolv_conf(&r).unwrap().unwrap(),
            "nameserver 169.254.20.10\nsearch x.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&json!({"dns": {}})).unwrap(), None);
        assert_eq!(resolv_conf(&json!({})).unwrap(), None);
        assert_eq!(
            resolv_conf(&json!({"dns": {"nameservers": ["10.0.0.1"], "domain": "example"}}))
                .unwrap()
                .unwrap(),
            "nameserver 10.0.0.1\nsearch example\n"
        );
        for bad in [
            json!({"dns": {"nameservers": ["10.0.0.1\nnameserver 6.6.6.6"]}}),
            json!({"dns": {"nameservers": ["10.0.0.1"], "search": ["a\nnameserver 6.6.6.6"]}}),
            json!({"dns": {"nameservers": ["10.0.0.1"], "options": ["nd ots:5"]}}),
        ] {
            assert!(resolv_conf(&bad).is_err(), "{bad}");
        }
    }

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

    #[test]
    fn gc_keeps_what_exists_or_cannot_be_judged() {
        use cni::attachment::{Attachment, Netns};
        let rec = |id: &str, ifname: &str| {
            let mut a: Attachment = serde_json::from_str(
                r#"{"containerID":"","ifname":"","netns":"/n","ips":[],"network":"n","time":"t"}"#,
            )
            .unwrap();
            a.container_id = id.into();
            a.ifname = ifname.into();
            a
        };
        let ids: Vec<String> = ["alive", "gone", "unknown", "config-only"]
            .map(String::from)
            .to_vec();
        let v = verdicts(
            &ids,
            |id| (id != "config-only").then(|| rec(id, "net1")),
            |a| match a.container_id.as_str() {
                "alive" => Netns::Present,
                "gone" => Netns::Gone("no longer exists".into()),
                _ => Netns::Unknown("other view".into()),
            },
        );
        let keep = |id: &str, ifname: &str| {
            Verdict::Keep(cni::conf::ValidAttachment {
                container_id: id.into(),
                ifname: ifname.into(),
            })
        };
        assert_eq!(
            v,
            vec![
                keep("alive", "net1"),
                Verdict::Release("gone".into(), "no longer exists".into()),
                keep("unknown", "net1"),
                keep("config-only", "eth0"),
            ]
        );
    }
}
