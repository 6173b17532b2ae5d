//! The `flannel` CNI plugin with the reference plugins (Debian containernetworking-plugins in
//! /usr/lib/cni: bridge, host-local, portmap) on namespace nodes, called as a runtime calls it.
//! Needs root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cni::chain::ConfList;
use cni::exec::{Call, Exec, PathExec};
use cni::CniError;
use serde_json::{json, Map, Value};
use test_support::{in_netns, require_root_with, wait_for, whoami, Testbed, WhoAmIServer};

const PLUGIN: &str = env!("CARGO_BIN_EXE_flannel");
const REFERENCE: &str = "/usr/lib/cni";
const LIMIT: Duration = Duration::from_secs(60);

fn ready() -> bool {
    require_root_with(&["ip", "ping", "iptables"])
        && test_support::require(
            Path::new(REFERENCE).join("bridge").is_file(),
            "needs the reference CNI plugins in /usr/lib/cni (containernetworking-plugins)",
        )
}

/// A CNI_PATH directory: our plugin plus the reference ones (without bridge if asked).
fn plugin_dir(with_bridge: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    symlink(PLUGIN, d.path().join("flannel")).unwrap();
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        if p != "bridge" || with_bridge {
            symlink(Path::new(REFERENCE).join(p), d.path().join(p)).unwrap();
        }
    }
    d
}

/// flanneld from this workspace's target directory (built by `cargo test --workspace`).
fn flanneld() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("flanneld");
    assert!(
        bin.is_file(),
        "{} missing: build it first (`cargo build -p flanneld`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// flannelctl from this workspace's target directory (`cargo build -p flannelctl`).
fn flannelctl() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("flannelctl");
    assert!(
        bin.is_file(),
        "{} missing: build it first (`cargo build -p flannelctl`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// Runs flannelctl (bounded to 60 s); (success, stdout + stderr).
fn run_flannelctl(args: &[&str]) -> (bool, String) {
    let out = test_support::run_bounded(
        std::process::Command::new(flannelctl()).args(args),
        Duration::from_secs(60),
    )
    .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A process alone in a new network namespace (as a `ctr run` task); killed by PID on drop.
struct Task(std::process::Child);

impl Task {
    fn start() -> Task {
        let child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Task(child);
        // unshare has entered the namespace once the link differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        wait_for(Duration::from_secs(5), || {
            std::fs::read_link(t.netns())
                .ok()
                .filter(|l| *l != ours)
                .map(|_| ())
        })
        .expect("unshare -n did not start");
        t
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A named network namespace made by `flannelctl pod up`, deleted on drop if still there.
struct NamedNetns(String);

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            let _ = test_support::sh("ip", &["netns", "del", &self.0]);
        }
    }
}

/// One node's plugin setup: where its subnet file, plugin state and IPAM state live.
struct NodeFiles {
    subnet_file: PathBuf,
    data_dir: PathBuf,
    ipam_dir: PathBuf,
}

impl NodeFiles {
    fn new(dir: &Path, i: usize) -> Self {
        NodeFiles {
            subnet_file: dir.join(format!("n{i}.env")),
            data_dir: dir.join(format!("n{i}-flannel")),
            ipam_dir: dir.join(format!("n{i}-ipam")),
        }
    }

    /// The flannel plugin's entry of a config (IPAM state kept in the test's directory).
    fn flannel(&self) -> Value {
        json!({"type": "flannel", "subnetFile": self.subnet_file, "dataDir": self.data_dir,
               "ipam": {"dataDir": self.ipam_dir}, "delegate": {"hairpinMode": true, "isDefaultGateway": true}})
    }

    fn conf(&self, version: &str) -> Vec<u8> {
        let mut c = self.flannel();
        c["cniVersion"] = version.into();
        c["name"] = "cbr0".into();
        c.to_string().into_bytes()
    }

    fn conflist(&self) -> ConfList {
        ConfList::parse(
            // 1.0.0: portmap 1.1.1 (Debian 12) speaks up to 1.0.0, and a runtime refuses a
            // list one of whose plugins cannot speak its version.
            json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
                self.flannel(),
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    /// Addresses host-local has handed out (its reservation files).
    fn reserved(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.ipam_dir.join("cbr0"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn stored(&self) -> Vec<String> {
        cni::store::Store::new(&self.data_dir)
            .container_ids()
            .unwrap()
    }
}

fn call(cmd: &str, id: &str, netns: &str, args: &str) -> Call {
    Call {
        command: cmd.into(),
        container_id: id.into(),
        netns: netns.into(),
        ifname: "eth0".into(),
        args: args.into(),
    }
}

/// Runs the `flannel` plugin inside namespace `ns` (a node: the bridge lives there).
fn plugin(ns: &str, cni_path: &Path, c: Call, stdin: Vec<u8>) -> Result<Vec<u8>, CniError> {
    let path = cni_path.display().to_string();
    in_netns(ns, move || {
        PathExec::new(&path, LIMIT).run("flannel", &c, &stdin)
    })
    .unwrap()
}

/// A runtime's ADD of the flannel + portmap chain for a fresh pod namespace on `node`.
fn chain_add(
    ns: &str,
    cni_path: &Path,
    list: ConfList,
    c: Call,
    runtime: Map<String, Value>,
) -> Result<Value, CniError> {
    let path = cni_path.display().to_string();
    in_netns(ns, move || {
        list.add(&PathExec::new(&path, LIMIT), &c, &runtime)
    })
    .unwrap()
}

fn ip_of(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().unwrap();
    a.split('/').next().unwrap().to_string()
}

fn pings(tb: &Testbed, from_ns: &str, to: &str) -> bool {
    wait_for(Duration::from_secs(10), || {
        tb.exec_status(from_ns, &["ping", "-c1", "-W1", to], Duration::from_secs(3))
            .0
            .then_some(())
    })
    .is_some()
}

#[test]
fn pods_attached_through_the_chain_reach_each_other_across_nodes() {
    if !ready() {
        return;
    }
    let mut tb = Testbed::new(2).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = flanneld();
    let nodes: Vec<NodeFiles> = (0..2).map(|i| NodeFiles::new(dir.path(), i)).collect();
    for (i, n) in nodes.iter().enumerate() {
        let ns = tb.nodes[i].ns.clone();
        tb.spawn(
            &ns,
            bin.to_str().unwrap(),
            &[
                "--etcd-endpoints",
                &endpoint,
                "--subnet-file",
                n.subnet_file.to_str().unwrap(),
                "--cni-data-dir",
                n.data_dir.to_str().unwrap(),
                "--node-name",
                &format!("node{i}"),
            ],
            &[("RUST_LOG", "info")],
            &dir.path().join(format!("flanneld{i}.log")),
        )
        .unwrap();
    }
    for n in &nodes {
        wait_for(Duration::from_secs(30), || {
            n.subnet_file.exists().then_some(())
        })
        .expect("flanneld wrote no subnet file");
    }
    let cni_path = plugin_dir(true);

    // One pod per node, as kubelet would attach it: flannel then portmap, pod named in CNI_ARGS.
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let pod_ns = tb.add_empty_pod_netns(i).unwrap();
        let id = format!("pod{i}");
        let mut rt = Map::new();
        rt.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        let c = call(
            "ADD",
            &id,
            &format!("/run/netns/{pod_ns}"),
            &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a{i}"),
        );
        let r = chain_add(
            &tb.nodes[i].ns,
            cni_path.path(),
            n.conflist(),
            c.clone(),
            rt.clone(),
        )
        .unwrap_or_else(|e| panic!("ADD on node {i}: {e}"));
        assert_eq!(r["cniVersion"], "1.0.0");
        let att = cni::store::Store::new(&n.data_dir)
            .load_attachment(&id)
            .unwrap()
            .unwrap();
        assert_eq!(att.pod(), Some(("x", format!("a{i}").as_str())));
        assert_eq!(att.ips[0].addr().to_string(), ip_of(&r));
        let env = subnet_env::SubnetEnv::read(&n.subnet_file).unwrap();
        assert!(env
            .subnet
            .unwrap()
            .contains(&ip_of(&r).parse::<std::net::Ipv4Addr>().unwrap()));
        // flanneld publishes the attachment for the service proxy and the policy module.
        let key = format!("/coreos.com/network/pods/x/a{i}");
        let published = wait_for(Duration::from_secs(20), || {
            tb.etcdctl(&["get", &key, "--print-value-only"])
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .unwrap_or_else(|| panic!("{key} not published"));
        let v: Value = serde_json::from_str(published.trim()).unwrap();
        assert_eq!(v["IP"], ip_of(&r).as_str(), "{v}");
        assert_eq!(v["NodeIP"], tb.nodes[i].ip.as_str(), "{v}");
        assert_eq!(v["ContainerID"], id.as_str(), "{v}");
        pods.push((pod_ns, ip_of(&r), c, rt, r));
    }
    // Across the overlay, both ways.
    assert!(
        pings(&tb, &pods[0].0, &pods[1].1),
        "pod 0 cannot reach pod 1"
    );
    assert!(
        pings(&tb, &pods[1].0, &pods[0].1),
        "pod 1 cannot reach pod 0"
    );
    // portmap: node 0 reaches pod 1's port 80 at node 1's address, port 8080.
    let _server = WhoAmIServer::start(&pods[1].0, 80).unwrap();
    let to: SocketAddr = format!("{}:8080", tb.nodes[1].ip).parse().unwrap();
    let seen = wait_for(Duration::from_secs(10), || {
        whoami(&tb.nodes[0].ns, to, Duration::from_secs(2)).ok()
    });
    assert!(
        seen.is_some(),
        "hostPort 8080 on node 1 does not reach pod 1; node 1's nat table:\n{}",
        tb.exec(&tb.nodes[1].ns, &["iptables-save", "-t", "nat"])
            .unwrap_or_default()
    );

    // CHECK of our plugin with the cached result, as a runtime calls it (flannel's own
    // checks, then the bridge's). Not the whole chain: portmap 1.1.1's CHECK looks for an IPv6
    // chain it never created on an IPv4-only pod and always fails.
    for (i, n) in nodes.iter().enumerate() {
        let (_, _, c, _, r) = &pods[i];
        let mut conf: Value = serde_json::from_slice(&n.conf("1.0.0")).unwrap();
        conf["prevResult"] = r.clone();
        let chk = Call {
            command: "CHECK".into(),
            ..c.clone()
        };
        plugin(
            &tb.nodes[i].ns,
            cni_path.path(),
            chk,
            conf.to_string().into_bytes(),
        )
        .unwrap_or_else(|e| panic!("CHECK on node {i}: {e}"));
    }
    // A stale attachment (the node's subnet changed under it) fails CHECK.
    let (_, _, c, _, r) = &pods[0];
    let saved = std::fs::read(&nodes[0].subnet_file).unwrap();
    std::fs::write(
        &nodes[0].subnet_file,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.250.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let mut conf: Value = serde_json::from_slice(&nodes[0].conf("1.0.0")).unwrap();
    conf["prevResult"] = r.clone();
    let chk = Call {
        command: "CHECK".into(),
        ..c.clone()
    };
    let e = plugin(
        &tb.nodes[0].ns,
        cni_path.path(),
        chk,
        conf.to_string().into_bytes(),
    )
    .unwrap_err();
    assert_eq!(e.code, 100, "{e}");
    std::fs::write(&nodes[0].subnet_file, saved).unwrap();

    // DEL of node 1's pod (twice: idempotent): its address, files and veth go.
    let (pod_ns, _, c, rt, r) = &pods[1];
    for round in 0..2 {
        let list = nodes[1].conflist();
        let (path, c, rt, r) = (
            cni_path.path().display().to_string(),
            c.clone(),
            rt.clone(),
            r.clone(),
        );
        in_netns(&tb.nodes[1].ns, move || {
            list.del(
                &PathExec::new(&path, LIMIT),
                &Call {
                    command: "DEL".into(),
                    ..c
                },
                &rt,
                Some(&r),
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("DEL #{round}: {e}"));
    }
    assert!(nodes[1].stored().is_empty(), "state left after DEL");
    let gone = wait_for(Duration::from_secs(20), || {
        tb.etcdctl(&["get", "/coreos.com/network/pods/x/a1", "--print-value-only"])
            .ok()
            .filter(|v| v.trim().is_empty())
    });
    assert!(gone.is_some(), "pod x/a1 still published after DEL");
    assert!(
        nodes[1].reserved().is_empty(),
        "address still reserved after DEL"
    );
    let links = tb.exec(pod_ns, &["ip", "-o", "link"]).unwrap();
    assert!(!links.contains("eth0"), "pod interface left: {links}");
    let (reached, _) = tb.exec_status(
        &pods[0].0,
        &["ping", "-c1", "-W1", &pods[1].1],
        Duration::from_secs(3),
    );
    assert!(!reached, "pod 1's address still answers after DEL");
}

#[test]
fn refusals_gc_and_parallel_adds() {
    if !ready() {
        return;
    }
    let mut tb = Testbed::new(1).unwrap();
    let node = tb.nodes[0].ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let n = NodeFiles::new(dir.path(), 0);
    let cni_path = plugin_dir(true);
    let pod_ns = tb.add_empty_pod_netns(0).unwrap();
    let netns = format!("/run/netns/{pod_ns}");
    let nothing_left = |what: &str| {
        assert!(n.stored().is_empty(), "{what}: plugin state left");
        assert!(n.reserved().is_empty(), "{what}: address reserved");
    };

    // Before flanneld has written the subnet file: try again later.
    let e = plugin(
        &node,
        cni_path.path(),
        call("ADD", "c1", &netns, ""),
        n.conf("1.1.0"),
    )
    .unwrap_err();
    assert_eq!(e.code, 11, "{e}");
    assert!(e.msg.contains("does not exist yet"), "{e}");
    nothing_left("ADD without subnet file");
    std::fs::write(
        &n.subnet_file,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();

    // Bad input: each a CNI error with the spec's code, nothing done.
    let cases: Vec<(Call, Vec<u8>, u32, &str)> = vec![
        (
            call("ADD", "c1", &netns, ""),
            b"{\"cniVersion\":".to_vec(),
            6,
            "not valid JSON",
        ),
        (
            call("ADD", "c1", &netns, ""),
            n.conf("7.0.0"),
            1,
            "not supported",
        ),
        (
            call("", "c1", &netns, ""),
            n.conf("1.1.0"),
            4,
            "CNI_COMMAND",
        ),
        (call("ADD", "c1", "", ""), n.conf("1.1.0"), 4, "CNI_NETNS"),
    ];
    for (c, stdin, code, text) in cases {
        let e = plugin(&node, cni_path.path(), c, stdin).unwrap_err();
        assert_eq!(e.code, code, "{e}");
        assert!(e.msg.contains(text), "{e} should mention {text}");
    }
    let no_bridge = plugin_dir(false);
    let e = plugin(
        &node,
        no_bridge.path(),
        call("ADD", "c1", &netns, ""),
        n.conf("1.1.0"),
    )
    .unwrap_err();
    assert!(e.msg.contains("\"bridge\" not found in CNI_PATH"), "{e}");
    nothing_left("bad input");
    assert!(
        tb.exec(&node, &["ip", "link", "show", "cni0"]).is_err(),
        "bridge created anyway"
    );

    // VERSION answers without a config.
    let v = plugin(
        &node,
        cni_path.path(),
        call("VERSION", "", "", ""),
        b"{}".to_vec(),
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&v).unwrap();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // 50 parallel ADDs in one node: 50 distinct addresses.
    let mut nss = Vec::new();
    for _ in 0..50 {
        nss.push(tb.add_empty_pod_netns(0).unwrap());
    }
    let threads: Vec<_> = nss
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let (node, path, c, stdin) = (
                node.clone(),
                cni_path.path().to_path_buf(),
                call("ADD", &format!("par{k}"), &format!("/run/netns/{ns}"), ""),
                n.conf("1.0.0"),
            );
            std::thread::spawn(move || plugin(&node, &path, c, stdin))
        })
        .collect();
    let mut ips = std::collections::BTreeSet::new();
    for t in threads {
        let r: Value = serde_json::from_slice(&t.join().unwrap().unwrap()).unwrap();
        ips.insert(ip_of(&r));
    }
    assert_eq!(ips.len(), 50, "distinct addresses: {ips:?}");
    assert_eq!(n.reserved().len(), 50);
    assert_eq!(n.stored().len(), 50);
    // The pods work: the first reaches the last through cni0.
    let last = ips.iter().next_back().unwrap().clone();
    assert!(pings(&tb, &nss[0], &last));

    // GC with 2 valid attachments: the 48 others are released (addresses, state).
    let keep = json!([{"containerID": "par0", "ifname": "eth0"}, {"containerID": "par1", "ifname": "eth0"}]);
    let mut gc: Value = serde_json::from_slice(&n.conf("1.1.0")).unwrap();
    gc["cni.dev/valid-attachments"] = keep;
    plugin(
        &node,
        cni_path.path(),
        call("GC", "", "", ""),
        gc.to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(n.stored(), ["par0", "par1"]);
    assert_eq!(n.reserved().len(), 2);
    // GC and STATUS are 1.1 commands.
    let e = plugin(
        &node,
        cni_path.path(),
        call("GC", "", "", ""),
        n.conf("1.0.0"),
    )
    .unwrap_err();
    assert_eq!(e.code, 1, "{e}");
    plugin(
        &node,
        cni_path.path(),
        call("STATUS", "", "", ""),
        n.conf("1.1.0"),
    )
    .unwrap();
    std::fs::remove_file(&n.subnet_file).unwrap();
    let e = plugin(
        &node,
        cni_path.path(),
        call("STATUS", "", "", ""),
        n.conf("1.1.0"),
    )
    .unwrap_err();
    assert_eq!(e.code, 50, "{e}");
    // DEL without a subnet file still works from the stored config.
    for id in ["par0", "par1"] {
        plugin(
            &node,
            cni_path.path(),
            call("DEL", id, "", ""),
            n.conf("1.0.0"),
        )
        .unwrap();
    }
    nothing_left("after DEL of all");
}

/// Runs the plugin binary as a runtime does, with `stdin` from a file (e.g. /dev/zero), inside
/// node namespace `ns`; (exit success, stdout, how long it took). Killed after 20 s.
fn plugin_with_stdin_file(ns: &str, c: &Call, stdin: &Path) -> (bool, Value, Duration) {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, PLUGIN])
        .env("CNI_COMMAND", &c.command)
        .env("CNI_CONTAINERID", &c.container_id)
        .env("CNI_NETNS", &c.netns)
        .env("CNI_IFNAME", &c.ifname)
        .env("CNI_PATH", REFERENCE)
        .stdin(std::fs::File::open(stdin).unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    let took = started.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the plugin did not return within 20 s reading {}",
            stdin.display()
        );
    }
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v, took)
}

#[test]
fn old_confs_bounded_reads_and_del_of_nothing() {
    if !ready() {
        return;
    }
    let mut tb = Testbed::new(1).unwrap();
    let node = tb.nodes[0].ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let n = NodeFiles::new(dir.path(), 0);
    std::fs::write(
        &n.subnet_file,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let cni_path = plugin_dir(true);

    // flannel's old single-file conf: no cniVersion (0.1.0), read by a runtime as a one-plugin
    // list. The result is in the 0.1.0 format; the pod works.
    let mut old = n.flannel();
    old["name"] = "cbr0".into();
    let list = ConfList::parse(old.to_string().as_bytes()).unwrap();
    assert_eq!(list.cni_version, "0.1.0");
    let pod_ns = tb.add_empty_pod_netns(0).unwrap();
    let c = call("ADD", "old1", &format!("/run/netns/{pod_ns}"), "");
    let r = chain_add(&node, cni_path.path(), list.clone(), c.clone(), Map::new())
        .unwrap_or_else(|e| panic!("ADD of an unversioned conf: {e}"));
    assert_eq!(r["cniVersion"], "0.1.0", "{r}");
    let ip = r["ip4"]["ip"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(ip.starts_with("10.5.9."), "{r}");
    assert_eq!(r["ip4"]["gateway"], "10.5.9.1", "{r}");
    assert_eq!(r.get("ips"), None, "{r}");
    let a = cni::store::Store::new(&n.data_dir)
        .load_attachment("old1")
        .unwrap()
        .unwrap();
    assert_eq!(a.ips[0].to_string(), ip);
    assert!(
        pings(&tb, &pod_ns, "10.5.9.1"),
        "the pod cannot reach its gateway"
    );
    // 0.2.0 the same way; then DEL of both through the list.
    let mut v020 = old.clone();
    v020["cniVersion"] = "0.2.0".into();
    let list020 = ConfList::parse(v020.to_string().as_bytes()).unwrap();
    let pod2 = tb.add_empty_pod_netns(0).unwrap();
    let c2 = call("ADD", "old2", &format!("/run/netns/{pod2}"), "");
    let r2 = chain_add(
        &node,
        cni_path.path(),
        list020.clone(),
        c2.clone(),
        Map::new(),
    )
    .unwrap();
    assert_eq!(r2["cniVersion"], "0.2.0", "{r2}");
    assert!(r2["ip4"]["ip"].is_string(), "{r2}");
    for (l, c, r) in [(list, c, r), (list020, c2, r2)] {
        let path = cni_path.path().display().to_string();
        in_netns(&node, move || {
            l.del(
                &PathExec::new(&path, LIMIT),
                &Call {
                    command: "DEL".into(),
                    ..c
                },
                &Map::new(),
                Some(&r),
            )
        })
        .unwrap()
        .unwrap();
    }
    assert!(n.stored().is_empty() && n.reserved().is_empty());

    // `"dataDir": ""` is refused (it used to mean the host's /var/lib/cni/flannel).
    let mut empty = n.flannel();
    empty["cniVersion"] = "1.0.0".into();
    empty["name"] = "cbr0".into();
    empty["dataDir"] = "".into();
    let e = plugin(
        &node,
        cni_path.path(),
        call("ADD", "c1", &format!("/run/netns/{pod_ns}"), ""),
        empty.to_string().into_bytes(),
    )
    .unwrap_err();
    assert_eq!(e.code, 7, "{e}");
    assert!(e.msg.contains("dataDir: empty"), "{e}");

    // Bounded reads: a subnet file that never ends, stdin that never ends.
    let mut zero = n.flannel();
    zero["cniVersion"] = "1.0.0".into();
    zero["name"] = "cbr0".into();
    zero["subnetFile"] = "/dev/zero".into();
    let conf_file = dir.path().join("zero.json");
    std::fs::write(&conf_file, zero.to_string()).unwrap();
    let add = call("ADD", "z1", &format!("/run/netns/{pod_ns}"), "");
    let (ok, out, took) = plugin_with_stdin_file(&node, &add, &conf_file);
    assert!(!ok && out["code"] == 5, "{out}");
    assert!(
        out["details"]
            .as_str()
            .unwrap_or_default()
            .contains("not a regular file"),
        "{out}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (ok, out, took) = plugin_with_stdin_file(&node, &add, Path::new("/dev/zero"));
    assert!(!ok && out["code"] == 5, "{out}");
    assert!(
        out["msg"].as_str().unwrap_or_default().contains("stdin"),
        "{out}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(n.stored().is_empty());

    // DEL of a container never added, the delegate not installed: success (idempotent).
    let no_bridge = plugin_dir(false);
    plugin(
        &node,
        no_bridge.path(),
        call("DEL", "never", "", ""),
        n.conf("1.1.0"),
    )
    .unwrap_or_else(|e| panic!("DEL of nothing without the delegate: {e}"));
}

#[test]
fn a_runtime_that_never_calls_del_and_flannelctl_pods() {
    if !ready() || !require_root_with(&["unshare", "etcd", "etcdctl"]) {
        return;
    }
    let mut tb = Testbed::new(1).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .unwrap();
    let node = tb.nodes[0].ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let n = NodeFiles::new(dir.path(), 0);
    let log = dir.path().join("flanneld.log");
    let alive_ns = tb.add_empty_pod_netns(0).unwrap();
    tb.spawn(
        &node,
        flanneld().to_str().unwrap(),
        &[
            "--etcd-endpoints",
            &endpoint,
            "--subnet-file",
            n.subnet_file.to_str().unwrap(),
            "--cni-data-dir",
            n.data_dir.to_str().unwrap(),
            "--node-name",
            "node0",
        ],
        &[("RUST_LOG", "info")],
        &log,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), || {
        n.subnet_file.exists().then_some(())
    })
    .expect("flanneld wrote no subnet file");
    let cni_path = plugin_dir(true);
    let conflist = dir.path().join("10-flannel.conflist");
    std::fs::write(
        &conflist,
        json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [n.flannel()]}).to_string(),
    )
    .unwrap();
    let published = |ns: &str, name: &str| {
        tb.etcdctl(&[
            "get",
            &format!("/coreos.com/network/pods/{ns}/{name}"),
            "--print-value-only",
        ])
        .map(|v| !v.trim().is_empty())
        .unwrap_or(false)
    };
    let flanneld_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // A `ctr run -d --cni` task: the pod's namespace is its process's, /proc/<pid>/ns/net; a
    // podman-style name (K8S_POD_NAME alone). Another pod stays alive.
    let mut task = Task::start();
    for (id, netns, args) in [
        (
            "task1",
            task.netns(),
            "IgnoreUnknown=1;K8S_POD_NAME=task1".to_string(),
        ),
        (
            "alive1",
            format!("/run/netns/{alive_ns}"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=alive1".to_string(),
        ),
    ] {
        chain_add(
            &node,
            cni_path.path(),
            n.conflist(),
            call("ADD", id, &netns, &args),
            Map::new(),
        )
        .unwrap_or_else(|e| panic!("ADD {id}: {e}"));
    }
    let rec = cni::store::Store::new(&n.data_dir)
        .load_attachment("task1")
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.netns_id.as_ref().map(|i| i.anchor.as_str()),
        Some("/proc")
    );
    assert!(
        wait_for(Duration::from_secs(20), || {
            (published("default", "task1") && published("x", "alive1")).then_some(())
        })
        .is_some(),
        "not published (podman-style name under default):\n{}",
        flanneld_log()
    );

    // `ctr task rm`: the process and its namespace go, nobody calls DEL.
    task.kill();
    assert!(
        wait_for(Duration::from_secs(25), || (!published("default", "task1"))
            .then_some(()))
        .is_some(),
        "flanneld still publishes a pod whose namespace is gone:\n{}",
        flanneld_log()
    );
    assert!(
        flanneld_log().contains("no longer exists"),
        "{}",
        flanneld_log()
    );
    assert!(published("x", "alive1"));
    assert_eq!(n.stored(), ["alive1", "task1"], "the record stays for GC");
    assert_eq!(n.reserved().len(), 2);

    // flannelctl pod gc: a dry run changes nothing, the real one releases the dead task only.
    let gc_args = |dry: bool| {
        let mut v = vec![
            "pod".to_string(),
            "gc".into(),
            "--conflist".into(),
            conflist.display().to_string(),
            "--cni-path".into(),
            cni_path.path().display().to_string(),
            "--node-netns".into(),
            node.clone(),
        ];
        if dry {
            v.push("--dry-run".into());
        }
        v
    };
    let args = gc_args(true);
    let (ok, out) = run_flannelctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && out.contains("would release task1"), "{out}");
    assert_eq!(n.reserved().len(), 2);
    let args = gc_args(false);
    let (ok, out) = run_flannelctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    assert!(
        out.contains("releasing task1: network namespace /proc/"),
        "{out}"
    );
    assert_eq!(n.stored(), ["alive1"]);
    assert_eq!(
        n.reserved().len(),
        1,
        "the dead task's address is free again"
    );
    assert!(published("x", "alive1"));
    let (ok, out) = run_flannelctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && out.contains("1 kept, 0 to release"), "{out}");

    // flannelctl pod up brings the pod's loopback up: the pod reaches its own address.
    let name = format!("fl{}-up", tb.tag);
    let _guard = NamedNetns(name.clone());
    let cache = dir.path().join("cache");
    let common = [
        "--conflist",
        conflist.to_str().unwrap(),
        "--cni-path",
        cni_path.path().to_str().unwrap(),
        "--node-netns",
        &node,
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let mut up = vec!["pod", "up", &name];
    up.extend(common);
    let (ok, out) = run_flannelctl(&up);
    assert!(ok, "{out}");
    let r: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let own = ip_of(&r);
    let (reached, ping) =
        tb.exec_status(&name, &["ping", "-c1", "-W1", &own], Duration::from_secs(3));
    assert!(
        reached,
        "the pod cannot reach its own address {own}: {ping}"
    );
    let mut down = vec!["pod", "down", &name];
    down.extend(common);
    let (ok, out) = run_flannelctl(&down);
    assert!(ok, "{out}");
    assert_eq!(n.stored(), ["alive1"]);
}
