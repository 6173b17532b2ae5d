//! The commands: ADD, DEL, CHECK, GC, STATUS and VERSION, as CNI spec 1.1 defines them, with
//! flannel's delegate behaviour. Everything here goes through [`Exec`] (the delegate) and the
//! [`Store`] (the data directory), so it is tested with a fake delegate in a temp dir.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{json, Value};
use subnet_env::dns::ClusterDnsEnv;
use subnet_env::{SubnetEnv, SubnetEnvError};

use crate::attachment::{pod_from_cni_args, Attachment};
use crate::conf::{self, NetConf};
use crate::delegate;
use crate::error::{code, CniError};
use crate::exec::{Call, Exec};
use crate::store::{check_container_id, Store};
use crate::version;

/// How long ADD waits for a running `flannelctl pod gc` before answering "try again later".
const ADD_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The CNI_* environment of this invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    /// From a variable lookup (`std::env::var` in the binary); empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let g = |k: &str| get(k).filter(|v| !v.is_empty());
        Env {
            command: g("CNI_COMMAND"),
            container_id: g("CNI_CONTAINERID"),
            netns: g("CNI_NETNS"),
            ifname: g("CNI_IFNAME"),
            args: g("CNI_ARGS"),
            path: g("CNI_PATH"),
        }
    }

    fn need<'a>(v: &'a Option<String>, name: &str, cmd: &str) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is required for {cmd} but not set"),
            )
        })
    }
}

/// What the commands need besides the environment and stdin.
pub struct Context<'a> {
    pub exec: &'a dyn Exec,
    pub now: SystemTime,
    /// When this machine booted (a subnet file older than that is stale); None: unknown.
    pub booted: Option<SystemTime>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// Runs the command named by CNI_COMMAND. `Ok(Some(v))` is printed on stdout; `Ok(None)`
/// prints nothing (DEL, CHECK, GC, STATUS).
pub fn dispatch(env: &Env, stdin: &[u8], cx: &Context) -> Result<Option<Value>, CniError> {
    let cmd = env
        .command
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
    match cmd {
        "VERSION" => Ok(Some(json!({
            "cniVersion": conf::peek_version(stdin).unwrap_or_else(|| version::LATEST.into()),
            "supportedVersions": version::SUPPORTED,
        }))),
        "ADD" => add(env, &conf::parse(stdin, true)?, cx).map(Some),
        "DEL" => del(env, &conf::parse(stdin, true)?, cx).map(|()| None),
        "CHECK" => check(env, &conf::parse(stdin, true)?, cx).map(|()| None),
        "GC" => gc(env, &conf::parse(stdin, true)?, cx).map(|()| None),
        "STATUS" => status(&conf::parse(stdin, false)?, cx).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
        )),
    }
}

fn needs_version(conf: &NetConf, cmd: &str, min: &str) -> Result<(), CniError> {
    if version::at_least(&conf.cni_version, min) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{cmd} needs cniVersion {min} or later; the config says {}",
                conf.cni_version
            ),
        ))
    }
}

/// Reads the subnet file flanneld writes. Absent: try again later (flanneld is starting).
fn subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    match SubnetEnv::read(path) {
        Ok(e) => Ok(e),
        Err(SubnetEnvError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "subnet file {} does not exist yet: flanneld writes it once it has leased \
                     this node's subnet (is flanneld running, and is subnetFile the path it \
                     writes, --subnet-file?)",
                    path.display()
                ),
            ))
        }
        Err(e) => Err(CniError::new(
            code::IO,
            format!("subnet file {}: cannot use it", path.display()),
        )
        .with_details(e.to_string())),
    }
}

/// The node's cluster DNS settings (`cluster-dns.env` beside the subnet file, written by
/// `flanneld --cluster-dns`); `None` when the node serves none.
fn cluster_dns(subnet_file: &Path) -> Result<Option<ClusterDnsEnv>, CniError> {
    let path = subnet_env::dns::path_beside(subnet_file);
    ClusterDnsEnv::read(&path).map_err(|e| {
        CniError::new(
            code::IO,
            format!("cluster DNS file {}: cannot use it", path.display()),
        )
        .with_details(e.to_string())
    })
}

/// Sets the result's `dns` to the cluster DNS (nameservers, the search path of the pod's
/// namespace, options) unless the delegate already returned nameservers (a `dns` in the
/// network config wins).
fn add_cluster_dns(result: &mut Value, dns: &ClusterDnsEnv, namespace: Option<&str>) {
    let has_nameservers = result
        .get("dns")
        .and_then(|d| d.get("nameservers"))
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if has_nameservers {
        return;
    }
    let ns = namespace.unwrap_or("default");
    // A namespace is a DNS label; anything else stays out of the search path.
    let label = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let search: Vec<String> = if label {
        dns.search(ns)
    } else {
        dns.search(ns).into_iter().skip(1).collect()
    };
    if let Some(o) = result.as_object_mut() {
        o.insert(
            "dns".into(),
            json!({
                "nameservers": dns.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                "search": search,
                "options": dns.options,
            }),
        );
    }
}

/// The versions a plugin speaks (its VERSION answer).
fn delegate_versions(exec: &dyn Exec, plugin: &str) -> Result<Vec<String>, CniError> {
    let call = Call {
        command: "VERSION".into(),
        ..Default::default()
    };
    let out = exec.run(
        plugin,
        &call,
        json!({"cniVersion": version::LATEST})
            .to_string()
            .as_bytes(),
    )?;
    let v: Value = serde_json::from_slice(&out).map_err(|e| {
        CniError::new(code::DECODE, format!("{plugin} VERSION answer")).with_details(e.to_string())
    })?;
    Ok(v.get("supportedVersions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The version to call `plugin` with for `conf`: ours or the newest older one it speaks.
fn delegate_version(exec: &dyn Exec, conf: &NetConf, plugin: &str) -> Result<String, CniError> {
    version::negotiate(&conf.cni_version, plugin, &delegate_versions(exec, plugin)?)
}

/// The plugin type of a stored delegate config.
fn stored_plugin(dconf: &Value) -> String {
    dconf
        .as_object()
        .map_or("bridge", delegate::plugin_type)
        .to_string()
}

fn add(env: &Env, conf: &NetConf, cx: &Context) -> Result<Value, CniError> {
    let id = Env::need(&env.container_id, "CNI_CONTAINERID", "ADD")?;
    check_container_id(id)?;
    let netns = Env::need(&env.netns, "CNI_NETNS", "ADD")?;
    let ifname = Env::need(&env.ifname, "CNI_IFNAME", "ADD")?;
    Env::need(&env.path, "CNI_PATH", "ADD")?;
    let args = env.args.clone().unwrap_or_default();
    // Everything that can be refused is checked before anything is written.
    let senv = subnet_env(&conf.subnet_file)?;
    let dns = cluster_dns(&conf.subnet_file)?;
    let plugin = delegate::plugin_type(&conf.delegate).to_string();
    let dver = delegate_version(cx.exec, conf, &plugin)?;
    let dconf = Value::Object(delegate::build(conf, &senv, &dver));
    let store = Store::new(&conf.data_dir);
    // Held until ADD returns: `flannelctl pod gc` waits for it before listing attachments.
    let _lock = store.lock(false, ADD_LOCK_WAIT)?;
    // Stored first (as flannel does): a DEL after a crash mid-ADD still finds it.
    store.save_config(id, &dconf)?;
    let call = Call {
        command: "ADD".into(),
        container_id: id.into(),
        netns: netns.into(),
        ifname: ifname.into(),
        args: args.clone(),
    };
    let undo = |e: CniError| -> CniError {
        let del = Call {
            command: "DEL".into(),
            ..call.clone()
        };
        let _ = cx.exec.run(&plugin, &del, dconf.to_string().as_bytes());
        let _ = store.remove_all(id);
        e
    };
    let out = cx
        .exec
        .run(&plugin, &call, dconf.to_string().as_bytes())
        .map_err(undo)?;
    let result: Value = serde_json::from_slice(&out)
        .map_err(|e| {
            CniError::new(code::DECODE, format!("{plugin} ADD result")).with_details(e.to_string())
        })
        .map_err(undo)?;
    // The addresses, read from the result in the current format (a 0.2.0 one has `ip4`).
    let current = version::convert_result(result.clone(), version::LATEST).map_err(undo)?;
    let mut result = version::convert_result(result, &conf.cni_version).map_err(undo)?;
    let (pod_namespace, pod_name) = pod_from_cni_args(&args);
    if let Some(dns) = &dns {
        add_cluster_dns(&mut result, dns, pod_namespace.as_deref());
    }
    let ips = current
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.get("address")?.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    store
        .save_attachment(&Attachment {
            container_id: id.into(),
            ifname: ifname.into(),
            netns: netns.into(),
            netns_id: crate::attachment::netns_id(netns),
            pod_namespace,
            pod_name,
            ips,
            network: conf.name.clone(),
            time: humantime::format_rfc3339_seconds(cx.now).to_string(),
        })
        .map_err(undo)?;
    Ok(result)
}

/// DEL of one stored attachment through the delegate, then its files. Missing state is not
/// an error (DEL is idempotent): without a stored config the delegate is still called with the
/// config ADD would build, so an IPAM reservation from a crashed ADD is released too; that call
/// is a precaution, so when nothing was stored its failure (e.g. the delegate is not even
/// installed) is not DEL's. Both files are removed whatever the other's fate.
fn release(
    conf: &NetConf,
    cx: &Context,
    id: &str,
    ifname: &str,
    netns: &str,
    args: &str,
) -> Result<(), CniError> {
    let store = Store::new(&conf.data_dir);
    let stored = store.load_config(id)?;
    let nothing_stored = stored.is_none() && store.load_attachment(id).ok().flatten().is_none();
    let dconf = match stored {
        Some(c) => Some(c),
        None => match SubnetEnv::read(&conf.subnet_file) {
            Ok(senv) => {
                let plugin = delegate::plugin_type(&conf.delegate).to_string();
                // Without a stored version, call the delegate with one it speaks.
                let dver = delegate_version(cx.exec, conf, &plugin)
                    .unwrap_or_else(|_| conf.cni_version.clone());
                Some(Value::Object(delegate::build(conf, &senv, &dver)))
            }
            Err(_) => None,
        },
    };
    if let Some(dconf) = dconf {
        let plugin = stored_plugin(&dconf);
        let call = Call {
            command: "DEL".into(),
            container_id: id.into(),
            netns: netns.into(),
            ifname: ifname.into(),
            args: args.into(),
        };
        match cx.exec.run(&plugin, &call, dconf.to_string().as_bytes()) {
            Ok(_) => {}
            Err(_) if nothing_stored => {}
            Err(e) => return Err(e),
        }
    }
    store.remove_all(id)
}

fn del(env: &Env, conf: &NetConf, cx: &Context) -> Result<(), CniError> {
    let id = Env::need(&env.container_id, "CNI_CONTAINERID", "DEL")?;
    check_container_id(id)?;
    let ifname = Env::need(&env.ifname, "CNI_IFNAME", "DEL")?;
    Env::need(&env.path, "CNI_PATH", "DEL")?;
    release(
        conf,
        cx,
        id,
        ifname,
        env.netns.as_deref().unwrap_or_default(),
        env.args.as_deref().unwrap_or_default(),
    )
}

fn check(env: &Env, conf: &NetConf, cx: &Context) -> Result<(), CniError> {
    needs_version(conf, "CHECK", "0.4.0")?;
    let id = Env::need(&env.container_id, "CNI_CONTAINERID", "CHECK")?;
    check_container_id(id)?;
    let netns = Env::need(&env.netns, "CNI_NETNS", "CHECK")?;
    let ifname = Env::need(&env.ifname, "CNI_IFNAME", "CHECK")?;
    Env::need(&env.path, "CNI_PATH", "CHECK")?;
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult: missing (CHECK needs the ADD result)",
        )
    })?;
    let store = Store::new(&conf.data_dir);
    let unknown = |what: &str| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "container {id}: no {what} in {} (not added by this plugin?)",
                conf.data_dir.display()
            ),
        )
    };
    let mut dconf = store
        .load_config(id)?
        .ok_or_else(|| unknown("stored delegate config"))?;
    let att = store
        .load_attachment(id)?
        .ok_or_else(|| unknown("attachment record"))?;
    if att.ifname != ifname {
        return Err(CniError::new(
            code::STALE_ATTACHMENT,
            format!(
                "container {id} was attached as {}, not {ifname}",
                att.ifname
            ),
        ));
    }
    let senv = subnet_env(&conf.subnet_file)?;
    for ip in &att.ips {
        let inside = match ip {
            ipnet::IpNet::V4(a) => senv.subnet.is_some_and(|s| s.contains(&a.addr())),
            ipnet::IpNet::V6(a) => senv.ipv6_subnet.is_some_and(|s| s.contains(&a.addr())),
        };
        if !inside {
            return Err(CniError::new(
                code::STALE_ATTACHMENT,
                format!(
                    "container {id} has {ip}, outside this node's subnet in {} (the node's lease \
                     changed: re-create the pod)",
                    conf.subnet_file.display()
                ),
            ));
        }
    }
    let dver = dconf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(&conf.cni_version)
        .to_string();
    if !version::at_least(&dver, "0.4.0") {
        // The delegate was added with a version without CHECK: our own checks are all.
        return Ok(());
    }
    dconf["prevResult"] = version::convert_result(prev, &dver)?;
    let plugin = stored_plugin(&dconf);
    let call = Call {
        command: "CHECK".into(),
        container_id: id.into(),
        netns: netns.into(),
        ifname: ifname.into(),
        args: env.args.clone().unwrap_or_default(),
    };
    cx.exec.run(&plugin, &call, dconf.to_string().as_bytes())?;
    Ok(())
}

fn gc(env: &Env, conf: &NetConf, cx: &Context) -> Result<(), CniError> {
    needs_version(conf, "GC", "1.1.0")?;
    Env::need(&env.path, "CNI_PATH", "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "cni.dev/valid-attachments: missing (GC removes everything not listed, so the list is required)",
        )
    })?;
    let store = Store::new(&conf.data_dir);
    let mut failed = Vec::new();
    for id in store.container_ids()? {
        let att = store.load_attachment(&id).ok().flatten();
        let ifname = att.as_ref().map_or("eth0", |a| a.ifname.as_str());
        let keep = valid
            .iter()
            .any(|v| v.container_id == id && (att.is_none() || v.ifname == ifname));
        if keep {
            continue;
        }
        if let Err(e) = release(conf, cx, &id, ifname, "", "") {
            failed.push(format!("{id}: {e}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::IO,
            format!("GC could not release {} attachment(s)", failed.len()),
        )
        .with_details(failed.join("; ")))
    }
}

fn status(conf: &NetConf, cx: &Context) -> Result<(), CniError> {
    needs_version(conf, "STATUS", "1.1.0")?;
    let unavailable = |msg: String| CniError::new(code::PLUGIN_NOT_AVAILABLE, msg);
    let meta = std::fs::metadata(&conf.subnet_file).map_err(|e| {
        unavailable(format!(
            "subnet file {}: {e} (flanneld has not leased a subnet yet)",
            conf.subnet_file.display()
        ))
    })?;
    SubnetEnv::read(&conf.subnet_file)
        .map_err(|e| unavailable(format!("subnet file unusable: {e}")))?;
    if let (Some(booted), Ok(written)) = (cx.booted, meta.modified()) {
        if written < booted {
            return Err(unavailable(format!(
                "subnet file {} was written before this boot: flanneld has not run since",
                conf.subnet_file.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::path::PathBuf;

    /// A delegate that records calls and answers like bridge 1.1.1 (0.1.0 to 1.0.0, results
    /// in the format of the version called), with an address from a counter; `fail` makes ADD
    /// fail after "creating" something.
    #[derive(Default)]
    struct FakeDelegate {
        calls: RefCell<Vec<(String, Call, Value)>>,
        fail_add: bool,
        /// Answers VERSION like a plugin that dropped 0.1.0/0.2.0.
        only_new: bool,
        next: RefCell<u8>,
    }

    impl Exec for FakeDelegate {
        fn run(&self, plugin: &str, call: &Call, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
            let v: Value = serde_json::from_slice(stdin).unwrap();
            self.calls
                .borrow_mut()
                .push((plugin.into(), call.clone(), v.clone()));
            if plugin != "bridge" {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{plugin} not found"),
                ));
            }
            match call.command.as_str() {
                "VERSION" if self.only_new => Ok(br#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#.to_vec()),
                "VERSION" => Ok(br#"{"cniVersion":"1.0.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0"]}"#.to_vec()),
                "ADD" if self.fail_add => Err(CniError::new(11, "busy")),
                "ADD" => {
                    *self.next.borrow_mut() += 1;
                    let n = *self.next.borrow();
                    let ver = v["cniVersion"].as_str().unwrap_or_default();
                    if !version::at_least(ver, "0.3.0") {
                        return Ok(json!({"cniVersion": ver, "dns": {},
                            "ip4": {"ip": format!("10.5.52.{}/24", n + 1), "gateway": "10.5.52.1",
                                    "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.52.1"}]}})
                            .to_string()
                            .into_bytes());
                    }
                    Ok(json!({"cniVersion": v["cniVersion"], "interfaces": [{"name": "eth0"}],
                        "ips": [{"address": format!("10.5.52.{}/24", n + 1), "gateway": "10.5.52.1", "interface": 0}]})
                        .to_string()
                        .into_bytes())
                }
                _ => Ok(Vec::new()),
            }
        }
    }

    struct Node {
        _t: tempfile::TempDir,
        subnet_file: PathBuf,
        data_dir: PathBuf,
    }

    fn node(with_subnet_file: bool) -> Node {
        let t = tempfile::tempdir().unwrap();
        let subnet_file = t.path().join("subnet.env");
        if with_subnet_file {
            std::fs::write(
                &subnet_file,
                "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            )
            .unwrap();
        }
        let data_dir = t.path().join("data");
        Node {
            _t: t,
            subnet_file,
            data_dir,
        }
    }

    fn conf(n: &Node, version: &str, extra: Value) -> Vec<u8> {
        let mut c = json!({"cniVersion": version, "name": "cbr0", "type": "flannel",
            "subnetFile": n.subnet_file, "dataDir": n.data_dir});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string().into_bytes()
    }

    fn env(cmd: &str, id: &str) -> Env {
        Env {
            command: Some(cmd.into()),
            container_id: Some(id.into()),
            netns: Some("/run/netns/p".into()),
            ifname: Some("eth0".into()),
            args: Some("K8S_POD_NAMESPACE=x;K8S_POD_NAME=a".into()),
            path: Some("/usr/lib/cni".into()),
        }
    }

    fn cx(exec: &dyn Exec) -> Context<'_> {
        Context {
            exec,
            now: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000),
            booted: None,
        }
    }

    #[test]
    fn add_stores_config_and_record_and_converts_the_result() {
        let n = node(true);
        let d = FakeDelegate::default();
        let r = dispatch(&env("ADD", "c1"), &conf(&n, "1.1.0", json!({})), &cx(&d))
            .unwrap()
            .unwrap();
        assert_eq!(r["cniVersion"], "1.1.0", "result in the config's version");
        assert_eq!(r["ips"][0]["address"], "10.5.52.2/24");
        let calls = d.calls.borrow();
        assert_eq!(calls[0].1.command, "VERSION");
        assert_eq!(calls[1].1.command, "ADD");
        assert_eq!(
            calls[1].2["cniVersion"], "1.0.0",
            "bridge called with a version it speaks"
        );
        assert_eq!(calls[1].2["ipam"]["ranges"][0][0]["subnet"], "10.5.52.0/24");
        let store = Store::new(&n.data_dir);
        assert_eq!(store.load_config("c1").unwrap().unwrap(), calls[1].2);
        let a = store.load_attachment("c1").unwrap().unwrap();
        assert_eq!(a.pod(), Some(("x", "a")));
        assert_eq!(a.ips, vec!["10.5.52.2/24".parse().unwrap()]);
        assert_eq!(a.time, "2026-11-18T11:06:40Z");
        // An old config gets an old result.
        drop(calls);
        let r = dispatch(&env("ADD", "c2"), &conf(&n, "0.3.1", json!({})), &cx(&d))
            .unwrap()
            .unwrap();
        assert_eq!(
            (r["cniVersion"].as_str(), r["ips"][0]["version"].as_str()),
            (Some("0.3.1"), Some("4"))
        );
    }

    #[test]
    fn add_puts_the_cluster_dns_in_the_result() {
        let n = node(true);
        let d = FakeDelegate::default();
        // No cluster-dns.env: no dns in the result.
        let r = dispatch(&env("ADD", "c1"), &conf(&n, "1.0.0", json!({})), &cx(&d))
            .unwrap()
            .unwrap();
        assert!(r.get("dns").is_none(), "{r}");
        let dns = subnet_env::dns::path_beside(&n.subnet_file);
        std::fs::write(
            &dns,
            "FLANNEL_DNS_NAMESERVERS=169.254.20.10\nFLANNEL_DNS_DOMAIN=cluster.local\nFLANNEL_DNS_OPTIONS=ndots:5\n",
        )
        .unwrap();
        let r = dispatch(&env("ADD", "c2"), &conf(&n, "1.0.0", json!({})), &cx(&d))
            .unwrap()
            .unwrap();
        assert_eq!(
            r["dns"],
            json!({"nameservers": ["169.254.20.10"],
                   "search": ["x.svc.cluster.local", "svc.cluster.local", "cluster.local"],
                   "options": ["ndots:5"]})
        );
        // An old result format carries it too.
        let r = dispatch(&env("ADD", "c3"), &conf(&n, "0.2.0", json!({})), &cx(&d))
            .unwrap()
            .unwrap();
        assert_eq!(r["dns"]["nameservers"][0], "169.254.20.10");
        // A broken file refuses the ADD before the delegate runs, naming the file.
        std::fs::write(&dns, "FLANNEL_DNS_NAMESERVERS=bogus\n").unwrap();
        let before = d.calls.borrow().len();
        let e = dispatch(&env("ADD", "c4"), &conf(&n, "1.0.0", json!({})), &cx(&d)).unwrap_err();
        assert!(e.to_string().contains("cluster-dns.env"), "{e}");
        assert_eq!(d.calls.borrow().len(), before);
    }

    #[test]
    fn a_dns_the_delegate_returns_wins() {
        let mut r = json!({"dns": {"nameservers": ["10.96.0.10"]}});
        let dns = ClusterDnsEnv {
            nameservers: vec!["169.254.20.10".parse().unwrap()],
            domain: "cluster.local".into(),
            options: vec![],
        };
        add_cluster_dns(&mut r, &dns, Some("x"));
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
        // A namespace that is not a DNS label stays out of the search path.
        let mut r = json!({});
        add_cluster_dns(&mut r, &dns, Some("Bad;ns"));
        assert_eq!(
            r["dns"]["search"],
            json!(["svc.cluster.local", "cluster.local"])
        );
    }

    #[test]
    fn old_confs_without_a_version_or_at_020_work_with_old_results() {
        let n = node(true);
        let d = FakeDelegate::default();
        // flannel's old single-file conf: no cniVersion at all (0.1.0).
        let mut c: Value = serde_json::from_slice(&conf(&n, "x", json!({}))).unwrap();
        c.as_object_mut().unwrap().remove("cniVersion");
        let c = c.to_string().into_bytes();
        let r = dispatch(&env("ADD", "c1"), &c, &cx(&d)).unwrap().unwrap();
        assert_eq!(
            r,
            json!({"cniVersion": "0.1.0", "dns": {},
                "ip4": {"ip": "10.5.52.2/24", "gateway": "10.5.52.1",
                        "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.52.1"}]}})
        );
        assert_eq!(
            d.calls.borrow()[1].2["cniVersion"],
            "0.1.0",
            "bridge speaks it"
        );
        let a = Store::new(&n.data_dir)
            .load_attachment("c1")
            .unwrap()
            .unwrap();
        assert_eq!(a.ips, vec!["10.5.52.2/24".parse().unwrap()]);
        dispatch(&env("DEL", "c1"), &c, &cx(&d)).unwrap();
        assert!(Store::new(&n.data_dir).container_ids().unwrap().is_empty());
        // 0.2.0 to a delegate without the old versions: called at 1.0.0, result converted.
        let new = FakeDelegate {
            only_new: true,
            ..Default::default()
        };
        let r = dispatch(&env("ADD", "c2"), &conf(&n, "0.2.0", json!({})), &cx(&new))
            .unwrap()
            .unwrap();
        assert_eq!(new.calls.borrow()[1].2["cniVersion"], "1.0.0");
        assert_eq!(
            r,
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.5.52.2/24", "gateway": "10.5.52.1"}, "dns": {}})
        );
        // The error of an unversioned config is in 0.1.0.
        assert_eq!(conf::error_version(&c), "0.1.0");
    }

    #[test]
    fn add_refusals_leave_nothing_behind() {
        let d = FakeDelegate::default();
        let n = node(false);
        let e = dispatch(&env("ADD", "c1"), &conf(&n, "1.0.0", json!({})), &cx(&d)).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("subnet.env does not exist yet"), "{e}");
        assert!(d.calls.borrow().is_empty());
        assert!(!n.data_dir.exists());

        let n = node(true);
        std::fs::write(
            &n.subnet_file,
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n",
        )
        .unwrap();
        let e = dispatch(&env("ADD", "c1"), &conf(&n, "1.0.0", json!({})), &cx(&d)).unwrap_err();
        assert_eq!(e.code, code::IO);
        assert!(e.details.contains("missing FLANNEL_SUBNET"), "{e:?}");

        let n = node(true);
        let e = dispatch(
            &env("ADD", "c1"),
            &conf(&n, "1.0.0", json!({"delegate": {"type": "macvlan"}})),
            &cx(&d),
        )
        .unwrap_err();
        assert!(e.msg.contains("macvlan"), "{e}");
        assert!(Store::new(&n.data_dir).container_ids().unwrap().is_empty());

        let mut no_netns = env("ADD", "c1");
        no_netns.netns = None;
        let e = dispatch(&no_netns, &conf(&n, "1.0.0", json!({})), &cx(&d)).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (4, "CNI_NETNS is required for ADD but not set")
        );
        let e = dispatch(&Env::default(), b"{}", &cx(&d)).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_COMMAND is not set"));
        let e = dispatch(
            &env("ADD", "../etc"),
            &conf(&n, "1.0.0", json!({})),
            &cx(&d),
        )
        .unwrap_err();
        assert_eq!(e.code, 4);

        // The delegate fails midway: it is told to DEL, and our files go.
        let failing = FakeDelegate {
            fail_add: true,
            ..Default::default()
        };
        let e = dispatch(
            &env("ADD", "c1"),
            &conf(&n, "1.0.0", json!({})),
            &cx(&failing),
        )
        .unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (11, "busy"));
        let cmds: Vec<String> = failing
            .calls
            .borrow()
            .iter()
            .map(|c| c.1.command.clone())
            .collect();
        assert_eq!(cmds, ["VERSION", "ADD", "DEL"]);
        assert!(Store::new(&n.data_dir).container_ids().unwrap().is_empty());
    }

    #[test]
    fn del_is_idempotent_and_uses_the_stored_config() {
        let n = node(true);
        let d = FakeDelegate::default();
        let c = conf(&n, "1.1.0", json!({}));
        dispatch(&env("ADD", "c1"), &c, &cx(&d)).unwrap();
        // The subnet file changes meanwhile: DEL still uses what ADD stored.
        std::fs::write(
            &n.subnet_file,
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.99.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let mut del = env("DEL", "c1");
        del.netns = None;
        assert_eq!(dispatch(&del, &c, &cx(&d)).unwrap(), None);
        let last = d.calls.borrow().last().unwrap().clone();
        assert_eq!(
            (last.1.command.as_str(), last.1.netns.as_str()),
            ("DEL", "")
        );
        assert_eq!(last.2["ipam"]["ranges"][0][0]["subnet"], "10.5.52.0/24");
        assert!(Store::new(&n.data_dir).container_ids().unwrap().is_empty());
        // Again, and for a container never added: success, the delegate still asked to release.
        dispatch(&del, &c, &cx(&d)).unwrap();
        dispatch(&env("DEL", "never"), &c, &cx(&d)).unwrap();
        // Nothing was created and the delegate is not even installed: success.
        let before = d.calls.borrow().len();
        let missing = conf(&n, "1.1.0", json!({"delegate": {"type": "macvlan"}}));
        dispatch(&env("DEL", "never"), &missing, &cx(&d)).unwrap();
        assert!(d.calls.borrow()[before..].iter().any(|c| c.0 == "macvlan"));
        // With stored state, the delegate's failure is DEL's (the runtime retries).
        dispatch(&env("ADD", "c9"), &c, &cx(&d)).unwrap();
        let mut dconf = Store::new(&n.data_dir).load_config("c9").unwrap().unwrap();
        dconf["type"] = "macvlan".into();
        Store::new(&n.data_dir).save_config("c9", &dconf).unwrap();
        assert_eq!(
            dispatch(&env("DEL", "c9"), &c, &cx(&d)).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(Store::new(&n.data_dir).container_ids().unwrap(), ["c9"]);
        Store::new(&n.data_dir).remove_all("c9").unwrap();
        // No subnet file, no stored config: nothing to release, success.
        std::fs::remove_file(&n.subnet_file).unwrap();
        let before = d.calls.borrow().len();
        dispatch(&env("DEL", "gone"), &c, &cx(&d)).unwrap();
        assert_eq!(d.calls.borrow().len(), before);
    }

    #[test]
    fn check_verifies_stored_state_then_asks_the_delegate() {
        let n = node(true);
        let d = FakeDelegate::default();
        let c = conf(&n, "1.1.0", json!({}));
        let r = dispatch(&env("ADD", "c1"), &c, &cx(&d)).unwrap().unwrap();
        let with_prev = conf(&n, "1.1.0", json!({"prevResult": r}));
        dispatch(&env("CHECK", "c1"), &with_prev, &cx(&d)).unwrap();
        let last = d.calls.borrow().last().unwrap().clone();
        assert_eq!(last.1.command, "CHECK");
        assert_eq!(last.2["prevResult"]["cniVersion"], "1.0.0");
        assert_eq!(
            dispatch(&env("CHECK", "c1"), &c, &cx(&d)).unwrap_err().code,
            7,
            "no prevResult"
        );
        assert_eq!(
            dispatch(&env("CHECK", "other"), &with_prev, &cx(&d))
                .unwrap_err()
                .code,
            code::UNKNOWN_CONTAINER
        );
        let mut eth1 = env("CHECK", "c1");
        eth1.ifname = Some("eth1".into());
        assert_eq!(
            dispatch(&eth1, &with_prev, &cx(&d)).unwrap_err().code,
            code::STALE_ATTACHMENT
        );
        std::fs::write(
            &n.subnet_file,
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.99.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let e = dispatch(&env("CHECK", "c1"), &with_prev, &cx(&d)).unwrap_err();
        assert_eq!(e.code, code::STALE_ATTACHMENT);
        assert!(e.msg.contains("outside this node's subnet"), "{e}");
        let old = conf(&n, "0.3.1", json!({"prevResult": {}}));
        assert_eq!(
            dispatch(&env("CHECK", "c1"), &old, &cx(&d))
                .unwrap_err()
                .code,
            1
        );
    }

    #[test]
    fn gc_releases_what_is_not_listed() {
        let n = node(true);
        let d = FakeDelegate::default();
        let c = conf(&n, "1.1.0", json!({}));
        for id in ["keep", "drop1", "drop2"] {
            dispatch(&env("ADD", id), &c, &cx(&d)).unwrap();
        }
        let gc_env = Env {
            command: Some("GC".into()),
            path: Some("/usr/lib/cni".into()),
            ..Default::default()
        };
        let gc = conf(
            &n,
            "1.1.0",
            json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
        );
        let before = d.calls.borrow().len();
        dispatch(&gc_env, &gc, &cx(&d)).unwrap();
        let dels: Vec<String> = d.calls.borrow()[before..]
            .iter()
            .filter(|c| c.1.command == "DEL")
            .map(|c| c.1.container_id.clone())
            .collect();
        assert_eq!(dels, ["drop1", "drop2"]);
        assert_eq!(Store::new(&n.data_dir).container_ids().unwrap(), ["keep"]);
        assert_eq!(
            dispatch(&gc_env, &c, &cx(&d)).unwrap_err().code,
            7,
            "list required"
        );
        let old = conf(&n, "1.0.0", json!({"cni.dev/valid-attachments": []}));
        assert_eq!(dispatch(&gc_env, &old, &cx(&d)).unwrap_err().code, 1);
    }

    #[test]
    fn status_and_version() {
        let d = FakeDelegate::default();
        let n = node(true);
        let st = Env {
            command: Some("STATUS".into()),
            ..Default::default()
        };
        assert_eq!(
            dispatch(&st, &conf(&n, "1.1.0", json!({})), &cx(&d)).unwrap(),
            None
        );
        let mut later = cx(&d);
        later.booted = Some(SystemTime::now() + std::time::Duration::from_secs(60));
        let e = dispatch(&st, &conf(&n, "1.1.0", json!({})), &later).unwrap_err();
        assert_eq!(e.code, 50);
        assert!(e.msg.contains("before this boot"), "{e}");
        let n = node(false);
        let e = dispatch(&st, &conf(&n, "1.1.0", json!({})), &cx(&d)).unwrap_err();
        assert_eq!(e.code, code::PLUGIN_NOT_AVAILABLE);
        assert_eq!(
            dispatch(&st, &conf(&n, "1.0.0", json!({})), &cx(&d))
                .unwrap_err()
                .code,
            1
        );
        let v = Env {
            command: Some("VERSION".into()),
            ..Default::default()
        };
        let out = dispatch(&v, br#"{"cniVersion":"0.4.0"}"#, &cx(&d))
            .unwrap()
            .unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(
            out["supportedVersions"],
            json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let e = dispatch(&env("FROB", "c"), b"{}", &cx(&d)).unwrap_err();
        assert_eq!(e.code, 4);
    }
}
