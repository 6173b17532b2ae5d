//! What the namespace tests of flanneld share: starting a daemon per node with the test flags,
//! its log and subnet file, pods wired from the subnet file, and reading /metrics.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subnet_lease::SubnetEnv;
use test_support::{
    http_get, in_netns, udp_whoami, wait_for, whoami, HashServer, Pod, Testbed, UdpWhoAmIServer,
    WhoAmIServer,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_flanneld");
/// Where every test daemon serves /healthz, /readyz and /metrics (inside its node).
pub const HEALTH: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, 8471);

/// `sh -c` script: bind-mounts `$0` on /run/wireguard (in the private mount namespace `ip netns
/// exec` gives each command; the mount point is made if the host has none) and execs `$@` (the
/// same process: its PID is the one the testbed stops).
const WG_RUN_WRAPPER: &str =
    r#"mkdir -p /run/wireguard && mount --bind "$0" /run/wireguard && exec "$@""#;

/// The flanneld processes of a testbed: one per node, each (re)start with its own log.
pub struct Daemons {
    pub dir: tempfile::TempDir,
    /// `--healthz-ip` (default 127.0.0.1: inside the node only; 0.0.0.0 lets the hub ask).
    pub health_ip: String,
    endpoint: String,
    extra: Vec<String>,
    runs: Vec<u32>,
    /// Extra environment per node: (node, name, value).
    pub node_env: Vec<(usize, String, String)>,
    /// Each node's daemon sees its own /run/wireguard ([`Daemons::wg_dir`], bind-mounted in
    /// the daemon's private mount namespace that `ip netns exec` makes): the nodes of a host
    /// (and parallel tests) would otherwise share one `flannel-wg.sock`. Read with
    /// [`Daemons::wg`].
    pub private_wg_run: bool,
}

impl Daemons {
    /// Daemons talking to `endpoint`, with a 1 s resync, health on [`HEALTH`], plus `extra`.
    pub fn new(endpoint: &str, extra: &[&str]) -> Daemons {
        Daemons {
            dir: tempfile::tempdir().unwrap(),
            health_ip: HEALTH.0.to_string(),
            endpoint: endpoint.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            runs: Vec::new(),
            node_env: Vec::new(),
            private_wg_run: false,
        }
    }

    /// Node i's /run/wireguard when [`Daemons::private_wg_run`] is set.
    pub fn wg_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("wgrun{i}"))
    }

    /// `wg args…` run in node i with its own /run/wireguard in view.
    pub fn wg(&self, tb: &Testbed, i: usize, args: &[&str]) -> Result<String, String> {
        let dir = self.wg_dir(i);
        let mut full = vec!["sh", "-c", WG_RUN_WRAPPER, dir.to_str().unwrap(), "wg"];
        full.extend_from_slice(args);
        tb.exec(&tb.nodes[i].ns, &full)
    }

    pub fn env_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}.env"))
    }

    fn log_file(&self, i: usize) -> PathBuf {
        let run = self.runs.get(i).copied().unwrap_or(0);
        self.dir.path().join(format!("n{i}-{run}.log"))
    }

    /// The log of node i's latest run.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_file(i)).unwrap_or_default()
    }

    /// Node i's CNI data directory (`--cni-data-dir`; its own, so no test daemon reads or
    /// creates the host's /var/lib/cni/flannel).
    pub fn cni_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("cni{i}"))
    }

    /// Starts flanneld on node i (`--node-name node<i>`); returns the testbed handle.
    pub fn start(&mut self, tb: &mut Testbed, i: usize) -> usize {
        if self.runs.len() <= i {
            self.runs.resize(i + 1, 0);
        }
        self.runs[i] += 1;
        let file = self.env_file(i);
        let health_ip = format!("--healthz-ip={}", self.health_ip);
        let health_port = format!("--healthz-port={}", HEALTH.1);
        let mut args = vec![
            "--etcd-endpoints",
            &self.endpoint,
            "--subnet-file",
            file.to_str().unwrap(),
            "--iptables-resync=1",
            &health_ip,
            &health_port,
        ];
        let cni_dir = self.cni_dir(i);
        let node_name = format!("node{i}");
        args.extend([
            "--cni-data-dir",
            cni_dir.to_str().unwrap(),
            "--node-name",
            &node_name,
        ]);
        args.extend(self.extra.iter().map(String::as_str));
        let ns = tb.nodes[i].ns.clone();
        let mut env = vec![("RUST_LOG", "info")];
        env.extend(
            self.node_env
                .iter()
                .filter(|(n, _, _)| *n == i)
                .map(|(_, k, v)| (k.as_str(), v.as_str())),
        );
        if self.private_wg_run {
            let dir = self.wg_dir(i);
            std::fs::create_dir_all(&dir).unwrap();
            let mut wrapped = vec!["-c", WG_RUN_WRAPPER, dir.to_str().unwrap(), BIN];
            wrapped.extend_from_slice(&args);
            return tb
                .spawn(&ns, "sh", &wrapped, &env, &self.log_file(i))
                .unwrap();
        }
        tb.spawn(&ns, BIN, &args, &env, &self.log_file(i)).unwrap()
    }

    /// Node i's subnet file, waiting up to 30 s for it.
    pub fn subnet_env(&self, i: usize) -> SubnetEnv {
        wait_for(Duration::from_secs(30), || {
            SubnetEnv::read(&self.env_file(i)).ok()
        })
        .unwrap_or_else(|| panic!("node {i} wrote no subnet file:\n{}", self.log(i)))
    }
}

/// `count` pods (.2, .3, …) behind node i's cni0 (gateway .1) in `env`'s subnet, with `mtu`.
pub fn add_pods(tb: &mut Testbed, i: usize, env: &SubnetEnv, count: u8, mtu: u32) -> Vec<Pod> {
    let sn = env.subnet.unwrap();
    let base = u32::from(sn.network());
    let gw = format!("{}/{}", Ipv4Addr::from(base + 1), sn.prefix_len());
    (0..count)
        .map(|k| {
            let ip = format!(
                "{}/{}",
                Ipv4Addr::from(base + 2 + u32::from(k)),
                sn.prefix_len()
            );
            tb.add_pod(i, &ip, &gw, mtu).unwrap()
        })
        .collect()
}

/// Two pods behind each of the three nodes, wired from each node's subnet file (checked by
/// `check` first); returns the pods and the nodes' subnets.
pub fn pods_per_node(
    tb: &mut Testbed,
    d: &Daemons,
    check: impl Fn(&SubnetEnv),
) -> (Vec<Pod>, Vec<ipnet::Ipv4Net>) {
    let mut pods = Vec::new();
    let mut subnets = Vec::new();
    for i in 0..3 {
        let env = d.subnet_env(i);
        check(&env);
        subnets.push(env.subnet.unwrap());
        pods.extend(add_pods(tb, i, &env, 2, env.mtu));
    }
    (pods, subnets)
}

/// The lease JSON of `subnet` (a /24) at flannel's default prefix.
pub fn lease_value(tb: &Testbed, subnet: ipnet::Ipv4Net) -> String {
    tb.etcdctl(&[
        "get",
        &format!("/coreos.com/network/subnets/{}-24", subnet.network()),
        "--print-value-only",
    ])
    .unwrap()
}

/// GET `path` from node i's health endpoint (empty on failure).
pub fn http(tb: &Testbed, i: usize, path: &str) -> String {
    let addr = SocketAddr::from(HEALTH);
    http_get(&tb.nodes[i].ns, addr, path, Duration::from_secs(3)).unwrap_or_default()
}

/// A sample of node i's /metrics by its full name with labels (0 when absent).
pub fn metric(tb: &Testbed, i: usize, name: &str) -> u64 {
    let key = format!("{name} ");
    http(tb, i, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A backend counter of node i (`flannel_backend_total{counter="name"}`).
pub fn backend_counter(tb: &Testbed, i: usize, name: &str) -> u64 {
    metric(
        tb,
        i,
        &format!("flannel_backend_total{{counter=\"{name}\"}}"),
    )
}

pub fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// In every pod: a TCP and a UDP whoami server on `port` and a hash server on `hash_port`
/// (stopped when the returned value is dropped).
pub fn start_servers(
    pods: &[Pod],
    port: u16,
    hash_port: u16,
) -> Vec<(WhoAmIServer, UdpWhoAmIServer, HashServer)> {
    pods.iter()
        .map(|p| {
            (
                WhoAmIServer::start(&p.ns, port).unwrap(),
                UdpWhoAmIServer::start(&p.ns, port).unwrap(),
                HashServer::start(&p.ns, hash_port).unwrap(),
            )
        })
        .collect()
}

/// Every pod reaches every other over TCP and UDP on `port`, seen with its own address as the
/// source; `log(node)` is printed when TCP fails.
pub fn full_mesh(pods: &[Pod], port: u16, log: impl Fn(usize) -> String) {
    for a in pods {
        for b in pods {
            if a.ns == b.ns {
                continue;
            }
            let seen = wait_for(Duration::from_secs(20), || {
                whoami(&a.ns, sock(&b.ip, port), Duration::from_secs(2)).ok()
            })
            .unwrap_or_else(|| panic!("TCP {} -> {} failed:\n{}", a.ip, b.ip, log(a.node)));
            assert_eq!(seen, a.ip);
            let seen = wait_for(Duration::from_secs(10), || {
                udp_whoami(&a.ns, sock(&b.ip, port), Duration::from_secs(1)).ok()
            })
            .unwrap_or_else(|| panic!("UDP {} -> {} failed", a.ip, b.ip));
            assert_eq!(seen, a.ip);
        }
    }
}

/// Pods attached the way a kubelet does it: `CNI ADD` through the flannel plugin built next to
/// flanneld, delegating to the reference bridge and host-local plugins in /usr/lib/cni.
pub struct Cni {
    path: tempfile::TempDir,
}

pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

impl Cni {
    pub fn new() -> Cni {
        let path = tempfile::tempdir().unwrap();
        let flannel = std::path::Path::new(BIN).parent().unwrap().join("flannel");
        assert!(
            flannel.is_file(),
            "{} missing: run `cargo test --workspace`",
            flannel.display()
        );
        std::os::unix::fs::symlink(flannel, path.path().join("flannel")).unwrap();
        for p in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(
                std::path::Path::new(REFERENCE_PLUGINS).join(p),
                path.path().join(p),
            )
            .unwrap();
        }
        Cni { path }
    }

    /// CNI_PATH: the flannel plugin and the reference plugins it delegates to.
    pub fn path(&self) -> &std::path::Path {
        self.path.path()
    }

    /// The plugin chain `add` runs for node i (a `.conflist`'s text).
    pub fn conflist(d: &Daemons, i: usize) -> String {
        serde_json::json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [{
            "type": "flannel", "subnetFile": d.env_file(i), "dataDir": d.cni_dir(i),
            "ipam": {"dataDir": d.dir.path().join(format!("ipam{i}"))},
            "delegate": {"hairpinMode": true, "isDefaultGateway": true}}]})
        .to_string()
    }

    /// Creates a pod namespace behind node i and runs ADD for pod `namespace/name`; returns
    /// the namespace and the pod's address.
    pub fn add(
        &self,
        tb: &mut Testbed,
        d: &Daemons,
        i: usize,
        namespace: &str,
        name: &str,
    ) -> (String, Ipv4Addr) {
        let (ns, ip, _) = self.add_result(tb, d, i, namespace, name);
        (ns, ip)
    }

    /// [`Cni::add`] for a pod of any family: the namespace and every address of the result
    /// (IPv4 first where there is one, as host-local orders its ranges).
    pub fn add_any(
        &self,
        tb: &mut Testbed,
        d: &Daemons,
        i: usize,
        namespace: &str,
        name: &str,
    ) -> (String, Vec<std::net::IpAddr>) {
        let (ns, r) = self.add_raw(tb, d, i, namespace, name);
        let ips = r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| {
                let a = ip["address"].as_str().unwrap();
                a.split('/').next().unwrap().parse().unwrap()
            })
            .collect();
        (ns, ips)
    }

    /// [`Cni::add`], also returning the ADD result.
    pub fn add_result(
        &self,
        tb: &mut Testbed,
        d: &Daemons,
        i: usize,
        namespace: &str,
        name: &str,
    ) -> (String, Ipv4Addr, serde_json::Value) {
        let (ns, r) = self.add_raw(tb, d, i, namespace, name);
        let ip: Ipv4Addr = r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (ns, ip, r)
    }

    fn add_raw(
        &self,
        tb: &mut Testbed,
        d: &Daemons,
        i: usize,
        namespace: &str,
        name: &str,
    ) -> (String, serde_json::Value) {
        use cni::chain::ConfList;
        use cni::exec::{Call, PathExec};
        use serde_json::{Map, Value};
        d.subnet_env(i);
        let list = ConfList::parse(Self::conflist(d, i).as_bytes()).unwrap();
        let ns = tb.add_empty_pod_netns(i).unwrap();
        let call = Call {
            command: "ADD".into(),
            container_id: format!("c-{namespace}-{name}"),
            netns: format!("/run/netns/{ns}"),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        };
        let path = self.path.path().display().to_string();
        let r: Value = test_support::in_netns(&tb.nodes[i].ns, move || {
            list.add(
                &PathExec::new(&path, Duration::from_secs(30)),
                &call,
                &Map::new(),
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("CNI ADD of {namespace}/{name}: {e}"));
        (ns, r)
    }
}

/// The port of [`Ticker`]'s echo server.
pub const ECHO_PORT: u16 = 5010;

/// The pause of the TCP stream a switch is expected to stay under: below TCP's minimum
/// retransmission timeout (200 ms). Tests assert no retransmission (a lost segment) and allow
/// a few times this for scheduling on a busy machine.
pub const MAX_GAP_MS: f64 = 150.0;

/// A TCP conversation of 8-byte pings every 10 ms, echoed by the server: the longest time
/// without an answer since the last `take_max_gap`, and whether the connection broke.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    max_gap_us: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The client's and the server's namespaces.
    ends: [String; 2],
}

impl Ticker {
    pub fn start(client: &Pod, server: &Pod) -> Ticker {
        let any = if server.ip.contains(':') {
            "::"
        } else {
            "0.0.0.0"
        };
        let listener = in_netns(&server.ns, move || TcpListener::bind((any, ECHO_PORT)))
            .unwrap()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echo = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut b = [0u8; 8];
                while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
            }
        });
        let to = SocketAddr::new(server.ip.parse().unwrap(), ECHO_PORT);
        let mut conn = in_netns(&client.ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let (s, g, br) = (stop.clone(), max_gap_us.clone(), broken.clone());
        let pinger = std::thread::spawn(move || {
            let mut last = Instant::now();
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let mut b = [0u8; 8];
                if conn.write_all(&n.to_be_bytes()).is_err()
                    || conn.read_exact(&mut b).is_err()
                    || u64::from_be_bytes(b) != n
                {
                    br.store(true, Ordering::Relaxed);
                    return;
                }
                let gap = last.elapsed().as_micros() as u64;
                g.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = conn.shutdown(std::net::Shutdown::Both);
        });
        Ticker {
            stop,
            max_gap_us,
            broken,
            threads: vec![echo, pinger],
            ends: [client.ns.clone(), server.ns.clone()],
        }
    }

    /// The longest gap (ms) since the last call, minus the 10 ms pacing.
    pub fn take_max_gap_ms(&self) -> f64 {
        let us = self.max_gap_us.swap(0, Ordering::Relaxed);
        (us as f64 / 1000.0 - 10.0).max(0.0)
    }

    /// The stream's sockets that retransmitted (`ss -tni` lines with `retrans:`), at either
    /// end: a segment lost, whatever the scheduling of a busy machine made of the gaps.
    pub fn retransmissions(&self) -> Vec<String> {
        let filter = format!("( sport = :{ECHO_PORT} or dport = :{ECHO_PORT} )");
        let mut out = Vec::new();
        for ns in &self.ends {
            let text = test_support::sh("ip", &["netns", "exec", ns, "ss", "-tni", &filter])
                .unwrap_or_else(|e| panic!("ss in {ns}: {e}"));
            out.extend(
                text.lines()
                    .filter(|l| l.contains("retrans:"))
                    .map(|l| format!("{ns}: {}", l.trim())),
            );
        }
        out
    }

    pub fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
