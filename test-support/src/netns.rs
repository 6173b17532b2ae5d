//! Multi-node testbeds in network namespaces.
//!
//! Layout: a hub namespace holds bridge `br0` (the underlay, 172.30.0.1/24) and optionally etcd;
//! each node namespace has `eth0` (172.30.0.(10+i)/24, default route via the hub) as a veth to the
//! hub's bridge; pods are namespaces with `eth0` as a veth to their node's bridge `cni0`.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{random_tag, run_bounded, sh, stop_child, Etcd};

/// The hub's address on the underlay.
pub const HUB_IP: &str = "172.30.0.1";
/// The hub's IPv6 address on the underlay ([`Testbed::add_ipv6_underlay`]).
pub const HUB_IP6: &str = "fd00:210::1";

/// A node of the testbed.
#[derive(Debug, Clone)]
pub struct Node {
    /// Network namespace name.
    pub ns: String,
    /// Address on the underlay (eth0).
    pub ip: String,
}

/// A pod behind a node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: String,
    pub ip: String,
    pub node: usize,
}

/// A process started in a namespace.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    name: String,
}

/// Namespaces, processes and etcd created for one test; all torn down on drop.
#[derive(Debug)]
pub struct Testbed {
    pub tag: String,
    pub hub: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub etcd: Option<Etcd>,
    created: Vec<String>,
    procs: Vec<Proc>,
    /// Empty pod namespaces created so far (for unique names).
    empty_pods: usize,
}

fn ip(args: &[&str]) -> Result<String, String> {
    sh("ip", args)
}

impl Testbed {
    /// Creates the hub and `nodes` nodes. Fails if any name already exists.
    pub fn new(nodes: usize) -> Result<Testbed, String> {
        let tag = random_tag(6);
        let mut tb = Testbed {
            hub: format!("fl{tag}-hub"),
            tag,
            nodes: Vec::new(),
            pods: Vec::new(),
            etcd: None,
            created: Vec::new(),
            procs: Vec::new(),
            empty_pods: 0,
        };
        let hub = tb.hub.clone();
        tb.add_netns(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        let hub_cidr = format!("{HUB_IP}/24");
        ip(&["-n", &hub, "addr", "add", &hub_cidr, "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for _ in 0..nodes {
            tb.add_node()?;
        }
        Ok(tb)
    }

    /// Adds a namespace on the hub's bridge at 172.30.0.`last_octet`, default route via the hub.
    fn add_host(&mut self, ns: &str, last_octet: u8) -> Result<String, String> {
        let hub = self.hub.clone();
        let host_ip = format!("172.30.0.{last_octet}");
        self.add_netns(ns)?;
        let hub_end = format!("h{last_octet}");
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &hub_end, "netns",
            &hub,
        ])?;
        ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0", "up"])?;
        let cidr = format!("{host_ip}/24");
        ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", HUB_IP])?;
        Ok(host_ip)
    }

    /// Adds one more node (also while others run). Node i (1-based) is at 172.30.0.(10+i) and
    /// forwards IPv4 (it routes for its pods).
    pub fn add_node(&mut self) -> Result<Node, String> {
        let i = self.nodes.len() + 1;
        let ns = format!("fl{}-n{i}", self.tag);
        let octet = u8::try_from(10 + i).map_err(|_| "too many nodes".to_string())?;
        let node_ip = self.add_host(&ns, octet)?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let node = Node { ns, ip: node_ip };
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Makes the underlay dual stack: the hub at `fd00:210::1/64`, node i (1-based) at
    /// `fd00:210::(10+i)/64` (`nodad`: usable at once), an IPv6 default route via the hub,
    /// IPv6 forwarding on the nodes and no router advertisements taken. Nodes added later stay
    /// IPv4 only. Returns the nodes' IPv6 addresses, in order.
    pub fn add_ipv6_underlay(&mut self) -> Result<Vec<String>, String> {
        let hub = self.hub.clone();
        let sysctl = |ns: &str, kv: &str| sh("ip", &["netns", "exec", ns, "sysctl", "-qw", kv]);
        sysctl(&hub, "net.ipv6.conf.all.disable_ipv6=0")?;
        sysctl(&hub, "net.ipv6.conf.default.accept_ra=0")?;
        ip(&[
            "-n",
            &hub,
            "-6",
            "addr",
            "add",
            &format!("{HUB_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let addr = format!("fd00:210::{:x}", 10 + i + 1);
            sysctl(&node.ns, "net.ipv6.conf.all.disable_ipv6=0")?;
            sysctl(&node.ns, "net.ipv6.conf.all.accept_ra=0")?;
            sysctl(&node.ns, "net.ipv6.conf.eth0.accept_ra=0")?;
            sysctl(&node.ns, "net.ipv6.conf.all.forwarding=1")?;
            ip(&[
                "-n",
                &node.ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&[
                "-n", &node.ns, "-6", "route", "add", "default", "via", HUB_IP6,
            ])?;
            out.push(addr);
        }
        Ok(out)
    }

    /// Adds a host outside the cluster on the underlay (172.30.0.200); returns (namespace, IP).
    pub fn add_outside_host(&mut self) -> Result<(String, String), String> {
        let ns = format!("fl{}-out", self.tag);
        let ip = self.add_host(&ns, 200)?;
        Ok((ns, ip))
    }

    fn add_netns(&mut self, name: &str) -> Result<(), String> {
        if Path::new("/run/netns").join(name).exists() {
            return Err(format!("network namespace {name} already exists"));
        }
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Starts etcd in the hub on the hub's underlay address; returns its endpoint.
    pub fn start_etcd(&mut self) -> String {
        let etcd = Etcd::start_in_netns(&self.hub, HUB_IP);
        let ep = etcd.endpoint();
        self.etcd = Some(etcd);
        ep
    }

    /// Starts etcd in the hub and writes `config` as the network config at flannel's default
    /// prefix; returns the endpoint.
    pub fn start_etcd_with_config(&mut self, config: &str) -> Result<String, String> {
        let endpoint = self.start_etcd();
        self.etcdctl(&["put", "/coreos.com/network/config", config])?;
        Ok(endpoint)
    }

    /// etcdctl against the hub's etcd (see [`Testbed::start_etcd`]).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        self.etcd
            .as_ref()
            .ok_or_else(|| "etcd is not started in this testbed".to_string())?
            .etcdctl(args)
    }

    /// Runs a command in a namespace (bounded to 20 s) and returns stdout.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `flannelctl --etcd-endpoints <endpoint> apply -f <file>` run in `ns` (where etcd is
    /// reachable); the tool's output, or what went wrong.
    pub fn flannelctl_apply(
        &self,
        ns: &str,
        flannelctl: &Path,
        endpoint: &str,
        file: &Path,
    ) -> Result<String, String> {
        let (Some(ctl), Some(file)) = (flannelctl.to_str(), file.to_str()) else {
            return Err(format!("not UTF-8: {flannelctl:?} or {file:?}"));
        };
        self.exec(
            ns,
            &[ctl, "--etcd-endpoints", endpoint, "apply", "-f", file],
        )
        .map_err(|e| format!("flannelctl apply: {e}"))
    }

    /// Runs a command in a namespace with a custom time bound; returns (success, stdout+stderr).
    pub fn exec_status(&self, ns: &str, args: &[&str], limit: Duration) -> (bool, String) {
        match run_bounded(
            Command::new("ip").args(["netns", "exec", ns]).args(args),
            limit,
        ) {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, e),
        }
    }

    /// Starts a long-running process in a namespace, output to `log`. Returns a handle.
    pub fn spawn(
        &mut self,
        ns: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<usize, String> {
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {program} in {ns}: {e}"))?;
        self.procs.push(Proc {
            child: Some(child),
            name: format!("{program} in {ns}"),
        });
        Ok(self.procs.len() - 1)
    }

    /// The PID of a started process (None once stopped).
    pub fn pid(&self, handle: usize) -> Option<u32> {
        self.procs
            .get(handle)
            .and_then(|p| p.child.as_ref())
            .map(|c| c.id())
    }

    /// Whether a started process is still running.
    pub fn running(&mut self, handle: usize) -> bool {
        self.procs
            .get_mut(handle)
            .and_then(|p| p.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills a started process with SIGKILL (as a crash would) and reaps it.
    pub fn kill(&mut self, handle: usize) {
        if let Some(mut child) = self.procs.get_mut(handle).and_then(|p| p.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops a started process: SIGTERM, then SIGKILL after `grace`. Returns its exit status.
    pub fn stop(&mut self, handle: usize, grace: Duration) -> Option<ExitStatus> {
        let p = self.procs.get_mut(handle)?;
        let mut child = p.child.take()?;
        stop_child(&mut child, grace)
    }

    /// Creates an empty pod namespace named after node `node` (`<node ns>c<k>`, loopback up),
    /// removed with the testbed: for a CNI plugin to attach, as a runtime would. Returns its
    /// name; `/run/netns/<name>` is the CNI_NETNS to pass.
    pub fn add_empty_pod_netns(&mut self, node: usize) -> Result<String, String> {
        let node_ns = self
            .nodes
            .get(node)
            .ok_or_else(|| format!("no node {node}"))?
            .ns
            .clone();
        self.empty_pods += 1;
        let ns = format!("{node_ns}c{}", self.empty_pods);
        self.add_netns(&ns)?;
        Ok(ns)
    }

    /// Adds a pod namespace behind node `node` (index into `nodes`) with address `ip_cidr`
    /// (e.g. "10.5.3.2/24"), default gateway `gateway_cidr`'s address (the node's bridge `cni0`
    /// gets it, created on first use) and `mtu` on both veth ends.
    pub fn add_pod(
        &mut self,
        node: usize,
        ip_cidr: &str,
        gateway_cidr: &str,
        mtu: u32,
    ) -> Result<Pod, String> {
        self.add_pod_on(node, "cni0", ip_cidr, gateway_cidr, mtu)
    }

    /// Gives pod namespace `pod` (behind bridge `bridge` of node `node`) the IPv6 address
    /// `addr`/64 with `gateway` on the bridge as its default route (both `nodad`: usable at
    /// once; no router advertisements taken).
    pub fn add_pod_ipv6(
        &self,
        node: usize,
        pod: &str,
        bridge: &str,
        gateway: &str,
        addr: &str,
    ) -> Result<(), String> {
        let node_ns = &self
            .nodes
            .get(node)
            .ok_or_else(|| format!("no node {node}"))?
            .ns;
        let sysctl = |kv: &str| sh("ip", &["netns", "exec", pod, "sysctl", "-qw", kv]);
        sysctl("net.ipv6.conf.all.disable_ipv6=0")?;
        sysctl("net.ipv6.conf.all.accept_ra=0")?;
        let gw_cidr = format!("{gateway}/64");
        ip(&[
            "-n", node_ns, "-6", "addr", "add", &gw_cidr, "dev", bridge, "nodad",
        ])?;
        let cidr = format!("{addr}/64");
        ip(&[
            "-n", pod, "-6", "addr", "add", &cidr, "dev", "eth0", "nodad",
        ])?;
        ip(&["-n", pod, "-6", "route", "add", "default", "via", gateway])?;
        Ok(())
    }

    /// [`Testbed::add_pod`] behind bridge `bridge` of the node (created with `gateway_cidr` and
    /// `mtu` when missing), e.g. `docker0` the way dockerd makes it from `--bip`/`--mtu`.
    pub fn add_pod_on(
        &mut self,
        node: usize,
        bridge: &str,
        ip_cidr: &str,
        gateway_cidr: &str,
        mtu: u32,
    ) -> Result<Pod, String> {
        let node_ns = self
            .nodes
            .get(node)
            .ok_or_else(|| format!("no node {node}"))?
            .ns
            .clone();
        let k = self.pods.iter().filter(|p| p.node == node).count() + 1;
        let ns = format!("{node_ns}p{k}");
        self.add_netns(&ns)?;
        let mtu = mtu.to_string();
        if ip(&["-n", &node_ns, "link", "show", bridge]).is_err() {
            ip(&["-n", &node_ns, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &node_ns, "addr", "add", gateway_cidr, "dev", bridge])?;
            if bridge != "cni0" {
                ip(&["-n", &node_ns, "link", "set", bridge, "mtu", &mtu])?;
            }
            ip(&["-n", &node_ns, "link", "set", bridge, "up"])?;
        }
        let host_end = format!("vp{k}");
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_end, "netns",
            &node_ns,
        ])?;
        ip(&[
            "-n", &node_ns, "link", "set", &host_end, "mtu", &mtu, "master", bridge, "up",
        ])?;
        ip(&["-n", &ns, "addr", "add", ip_cidr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "mtu", &mtu, "up"])?;
        let gw = gateway_cidr.split('/').next().unwrap_or(gateway_cidr);
        ip(&["-n", &ns, "route", "add", "default", "via", gw])?;
        let pod = Pod {
            ns,
            ip: ip_cidr.split('/').next().unwrap_or(ip_cidr).to_string(),
            node,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (by name, under /run/netns).
/// Sockets it creates belong to that namespace and may be used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| "thread in namespace panicked".to_string())?
}

/// Runs `f` on a thread of its own that has moved to a new, anonymous network namespace
/// (`unshare(CLONE_NEWNET)` moves only the calling thread and what it spawns): the links and
/// sockets `f` makes and the programs it starts live there, and the namespace goes when the
/// thread ends, also on a panic. Nothing outside it is touched. Refuses (Err) when the thread did
/// not end up in a namespace of its own; a panic in `f` is resumed on the caller's thread, so an
/// assertion keeps its message.
pub fn in_new_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let outer = std::fs::read_link("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    let worker = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        // What this thread starts must run in the new namespace, not the test's.
        let child = sh("readlink", &["/proc/self/ns/net"])?;
        if Path::new(child.trim()) == outer {
            return Err(format!("still in {}: not a new namespace", outer.display()));
        }
        Ok(f())
    });
    match worker.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                if stop_child(&mut c, Duration::from_secs(5)).is_none() {
                    errors.push(format!("could not reap {}", p.name));
                }
            }
        }
        // etcd runs in the hub: stop it before the namespace goes.
        self.etcd = None;
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                errors.push(e);
            }
        }
        if !errors.is_empty() {
            eprintln!("testbed {} cleanup: {}", self.tag, errors.join("; "));
        }
    }
}
