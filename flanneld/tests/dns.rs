//! The cluster DNS end to end: three namespace nodes running `flanneld --cluster-dns` (and the
//! nftables service proxy, so the names' ClusterIPs carry traffic), an upstream resolver
//! (Debian's `unbound`, authoritative for `example.test.`) in the hub, pods attached through
//! the CNI plugin chain (three with the plugin run directly, one with `flannelctl pod up
//! --node-netns`), objects written with `flannelctl apply`. Pods resolve with their own
//! resolv.conf (`ip netns exec` mounts /etc/netns/<pod>/resolv.conf), made from the CNI
//! result's `dns`: short names through the search path, FQDNs, headless Services, SRV, PTR,
//! ExternalName, names forwarded upstream, NXDOMAIN against NODATA, a Service seen within 1 s
//! of its creation and gone within 1 s of its deletion, TC and the TCP retry on large answers,
//! garbage datagrams, /metrics.
//! Needs root, the reference CNI plugins, `unbound`, `dig` and `getent`; skips with a reason
//! without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::{
    in_netns, require, require_root_with, run_checked, wait_for, who_serves, IdServer, Testbed,
};

mod common;

use common::{Cni, Daemons, BIN, REFERENCE_PLUGINS};

const NET: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DNS_IP: &str = "169.254.20.10";
/// The hub's address on the testbed's underlay (test-support's netns layout).
const HUB_IP: &str = "172.30.0.1";
const ZONE: &str = "cluster.local";
/// Endpoints of the headless Service `big` and A records of `big.example.test`: more than a
/// 1232-byte EDNS answer holds (16 bytes each), so even plain `dig` has to retry over TCP.
const BIG: u8 = 100;
/// The whole test's bound, for the record (it takes about half of it).
const BUDGET: Duration = Duration::from_secs(90);

/// A binary built next to flanneld (`cargo build -p flannelctl -p cni`, or `cargo test
/// --workspace`).
fn sibling(name: &str) -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo build -p flannelctl -p cni` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

fn fqdn(name: &str) -> String {
    format!("{name}.default.svc.{ZONE}")
}

/// `10-5-1-2`: the hostname a headless Service's endpoint without one gets.
fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

/// One record of dig's output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// dig's answer, parsed (the last answer printed: after a TCP retry, the TCP one).
#[derive(Debug, Default)]
struct Dig {
    status: String,
    flags: BTreeSet<String>,
    /// The header's ANSWER count.
    ancount: usize,
    answer: Vec<Rr>,
    authority: Vec<Rr>,
    additional: Vec<Rr>,
    /// dig printed "Truncated, retrying in TCP mode."
    tcp_retry: bool,
    /// "UDP" or "TCP", from the SERVER line.
    proto: String,
    server: String,
    raw: String,
}

impl Dig {
    fn parse(out: &str) -> Dig {
        let mut d = Dig {
            raw: out.to_string(),
            ..Dig::default()
        };
        let mut section = 0;
        for line in out.lines() {
            let l = line.trim();
            if l.contains("Truncated, retrying in TCP mode") {
                d.tcp_retry = true;
            }
            if let Some(rest) = l.split("->>HEADER<<-").nth(1) {
                // A new answer: forget an earlier (truncated) one.
                d.answer.clear();
                d.authority.clear();
                d.additional.clear();
                d.flags.clear();
                d.status = rest
                    .split("status: ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .unwrap_or_default()
                    .to_string();
                continue;
            }
            if let Some(rest) = l.strip_prefix(";; flags:") {
                let (flags, counts) = rest.split_once(';').unwrap_or((rest, ""));
                d.flags = flags.split_whitespace().map(str::to_string).collect();
                d.ancount = counts
                    .split("ANSWER: ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                continue;
            }
            if let Some(rest) = l.strip_prefix(";; SERVER: ") {
                d.server = rest.split('#').next().unwrap_or_default().to_string();
                d.proto = rest
                    .rsplit('(')
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches(')')
                    .to_string();
                continue;
            }
            match l {
                ";; ANSWER SECTION:" => section = 1,
                ";; AUTHORITY SECTION:" => section = 2,
                ";; ADDITIONAL SECTION:" => section = 3,
                "" => section = 0,
                _ if l.starts_with(';') => {}
                _ => {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    if f.len() < 5 {
                        continue;
                    }
                    let rr = Rr {
                        name: f[0].to_string(),
                        ttl: f[1].parse().unwrap_or(u32::MAX),
                        rtype: f[3].to_string(),
                        data: f[4..].join(" "),
                    };
                    match section {
                        1 => d.answer.push(rr),
                        2 => d.authority.push(rr),
                        3 => d.additional.push(rr),
                        _ => {}
                    }
                }
            }
        }
        d
    }

    /// The data of the answer's records of type `t`.
    fn data(&self, t: &str) -> BTreeSet<String> {
        self.answer
            .iter()
            .filter(|r| r.rtype == t)
            .map(|r| r.data.clone())
            .collect()
    }

    fn has_soa(&self) -> bool {
        self.authority.iter().any(|r| r.rtype == "SOA")
    }
}

/// resolv.conf as a runtime writes it from a CNI result's `dns`.
fn resolv_conf(dns: &Value) -> String {
    let list = |k: &str| -> Vec<String> {
        dns[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut s: String = list("nameservers")
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    s += &format!("search {}\n", list("search").join(" "));
    s += &format!("options {}\n", list("options").join(" "));
    s
}

/// The `dns` a pod of Kubernetes namespace `ns` must get.
fn expected_dns(ns: &str) -> Value {
    json!({
        "nameservers": [DNS_IP],
        "search": [format!("{ns}.svc.{ZONE}"), format!("svc.{ZONE}"), ZONE],
        "options": ["ndots:5"],
    })
}

/// resolv.conf files this test wrote under /etc/netns (removed on drop, with /etc/netns when
/// this test created it and it is empty then).
struct EtcNetns {
    dirs: Vec<PathBuf>,
    created_root: bool,
}

impl EtcNetns {
    fn new() -> EtcNetns {
        EtcNetns {
            dirs: Vec::new(),
            created_root: !Path::new("/etc/netns").exists(),
        }
    }

    fn write(&mut self, pod_ns: &str, text: &str) {
        let dir = Path::new("/etc/netns").join(pod_ns);
        assert!(!dir.exists(), "{} exists already", dir.display());
        std::fs::create_dir_all(&dir).unwrap();
        self.dirs.push(dir.clone());
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_file(d.join("resolv.conf"));
            let _ = std::fs::remove_dir(d);
        }
        if self.created_root {
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// A pod attached with `flannelctl pod up`; `pod down` on drop (and the namespace and its
/// /etc/netns directory removed if that left them).
struct PodUp {
    name: String,
    args: Vec<String>,
    down: bool,
}

impl PodUp {
    fn cmd(&self, verb: &str) -> Command {
        let mut c = Command::new(sibling("flannelctl"));
        c.args(["pod", verb, &self.name]).args(&self.args);
        c
    }

    /// `flannelctl pod down`.
    fn down(&mut self) -> Result<String, String> {
        self.down = true;
        run_checked(&mut self.cmd("down"), Duration::from_secs(30))
    }
}

impl Drop for PodUp {
    fn drop(&mut self) {
        if !self.down {
            if let Err(e) = self.down() {
                eprintln!("flannelctl pod down {}: {e}", self.name);
            }
        }
        if Path::new("/run/netns").join(&self.name).exists() {
            let _ = run_checked(
                Command::new("ip").args(["netns", "del", &self.name]),
                Duration::from_secs(10),
            );
        }
        let etc = Path::new("/etc/netns").join(&self.name);
        let _ = std::fs::remove_file(etc.join("resolv.conf"));
        let _ = std::fs::remove_dir(&etc);
    }
}

#[derive(Debug, Clone)]
struct PodInfo {
    ns: String,
    ip: Ipv4Addr,
    node: usize,
    name: String,
}

/// Fields drop in order: the `pod up` pod first (its DEL runs in its node), the resolv.conf
/// files, then the testbed (flanneld, unbound, etcd, namespaces), then the temp dirs.
struct Cluster {
    team: Option<PodUp>,
    _etc: EtcNetns,
    tb: Testbed,
    d: Daemons,
    flanneld: Vec<usize>,
    unbound: usize,
    endpoint: String,
    /// Pods of namespace `default`, one per node, attached by the plugin run directly.
    pods: Vec<PodInfo>,
    /// The `flannelctl pod up` pod (node 1, namespace `team`).
    team_ns: String,
    _servers: Vec<IdServer>,
    _cni: Cni,
    _work: tempfile::TempDir,
}

/// unbound in the hub: authoritative for `example.test.`, NXDOMAIN for every other name
/// (no recursion: the testbed has no Internet, and a quick answer keeps the search path's
/// last, absolute try fast).
fn unbound_conf(dir: &Path) -> String {
    let mut c = format!(
        "server:\n  interface: {HUB_IP}\n  port: 53\n  do-ip6: no\n  do-daemonize: no\n  \
         chroot: \"\"\n  username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  \
         use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n  num-threads: 1\n  \
         module-config: \"iterator\"\n  access-control: 172.30.0.0/24 allow\n  \
         local-zone: \".\" static\n  local-zone: \"example.test.\" static\n  \
         local-data: \"example.test. 60 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\"\n  \
         local-data: \"www.example.test. 60 IN A 192.0.2.80\"\n",
        dir = dir.display()
    );
    for k in 1..=BIG {
        c += &format!("  local-data: \"big.example.test. 60 IN A 198.19.0.{k}\"\n");
    }
    c += "remote-control:\n  control-enable: no\n";
    c
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: syslog, port: 514, protocol: UDP, targetPort: 5514}
---
apiVersion: v1
kind: Service
metadata: {name: peers}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: manual}
spec:
  clusterIP: None
  ports: [{name: db, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: manual}
subsets:
- addresses: [{ip: 198.51.100.1, hostname: alpha}, {ip: 198.51.100.2, hostname: beta}]
  ports: [{name: db, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ExternalName
  externalName: www.example.test
---
apiVersion: v1
kind: Service
metadata: {name: ext-missing}
spec:
  type: ExternalName
  externalName: nosuch.example.test
---
apiVersion: v1
kind: Service
metadata: {name: big}
spec:
  clusterIP: None
  ports: [{name: x, port: 9}]
"#;

fn big_endpoints() -> String {
    let addrs: Vec<String> = (1..=BIG).map(|k| format!("{{ip: 198.18.0.{k}}}")).collect();
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: big}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: x, port: 9}}]\n",
        addrs.join(", ")
    )
}

fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

impl Cluster {
    fn new() -> Cluster {
        let work = tempfile::tempdir().unwrap();
        let mut tb = Testbed::new(3).unwrap();
        let endpoint = tb.start_etcd_with_config(NET).unwrap();

        // The upstream resolver, a process of the testbed (stopped by its PID).
        let conf = work.path().join("unbound.conf");
        std::fs::write(&conf, unbound_conf(work.path())).unwrap();
        let hub = tb.hub.clone();
        let unbound = test_support::find_program("unbound").unwrap();
        let ub = tb
            .spawn(
                &hub,
                unbound.to_str().unwrap(),
                &["-d", "-c", conf.to_str().unwrap()],
                &[],
                &work.path().join("unbound.log"),
            )
            .unwrap();
        let up = wait_for(Duration::from_secs(10), || {
            let (ok, out) = tb.exec_status(
                &hub,
                &[
                    "dig",
                    "+time=1",
                    "+tries=1",
                    &format!("@{HUB_IP}"),
                    "www.example.test",
                ],
                Duration::from_secs(5),
            );
            (ok && Dig::parse(&out).data("A").contains("192.0.2.80")).then_some(())
        });
        if up.is_none() {
            let running = tb.running(ub);
            panic!(
                "unbound does not answer (running: {running}):\n{}",
                std::fs::read_to_string(work.path().join("unbound.log")).unwrap_or_default()
            );
        }

        let upstream = format!("{HUB_IP}:53");
        let mut d = Daemons::new(
            &endpoint,
            &[
                "--proxy-mode",
                "nftables",
                "--cluster-dns",
                "--cluster-dns-upstream",
                &upstream,
            ],
        );
        let flanneld: Vec<usize> = (0..3).map(|i| d.start(&mut tb, i)).collect();
        // Each node's DNS answers before pods are attached there: it writes the settings the
        // plugin reads (cluster-dns.env) before it serves.
        for i in 0..3 {
            let ns = tb.nodes[i].ns.clone();
            let ok = wait_for(Duration::from_secs(30), || {
                let (_, out) = tb.exec_status(
                    &ns,
                    &[
                        "dig",
                        "+time=1",
                        "+tries=1",
                        &format!("@{DNS_IP}"),
                        "TXT",
                        &format!("dns-version.{ZONE}"),
                    ],
                    Duration::from_secs(5),
                );
                Dig::parse(&out)
                    .data("TXT")
                    .contains("\"1.1.0\"")
                    .then_some(())
            });
            assert!(ok.is_some(), "node {i}: no cluster DNS\n{}", d.log(i));
        }

        let cni = Cni::new();
        let mut etc = EtcNetns::new();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..3 {
            let name = format!("web-{i}");
            let (ns, ip, result) = cni.add_result(&mut tb, &d, i, "default", &name);
            assert_eq!(
                result["dns"],
                expected_dns("default"),
                "CNI result of {name}: {result}"
            );
            etc.write(&ns, &resolv_conf(&result["dns"]));
            servers.push(IdServer::start(&ns, 8080).unwrap());
            pods.push(PodInfo {
                ns,
                ip,
                node: i,
                name,
            });
        }

        // A pod the way `flannelctl pod up` attaches it, in Kubernetes namespace `team`.
        let conflist = work.path().join("cbr0-n1.conflist");
        std::fs::write(&conflist, Cni::conflist(&d, 1)).unwrap();
        let team = PodUp {
            name: format!("fl{}-team", tb.tag),
            args: [
                "--conflist",
                conflist.to_str().unwrap(),
                "--cni-path",
                cni.path().to_str().unwrap(),
                "--cache-dir",
                work.path().join("pods").to_str().unwrap(),
                "--node-netns",
                &tb.nodes[1].ns,
            ]
            .map(String::from)
            .to_vec(),
            down: false,
        };
        assert!(
            !Path::new("/run/netns").join(&team.name).exists(),
            "{} exists already",
            team.name
        );
        let team_ns = team.name.clone();
        let out = run_checked(
            team.cmd("up")
                .args(["--k8s-namespace", "team", "--k8s-name", "probe"]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("flannelctl pod up: {e}"));
        let result: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("flannelctl pod up printed {out:?}: {e}"));
        assert_eq!(result["dns"], expected_dns("team"), "{result}");
        Cluster {
            team: Some(team),
            _etc: etc,
            tb,
            d,
            flanneld,
            unbound: ub,
            endpoint,
            pods,
            team_ns,
            _servers: servers,
            _cni: cni,
            _work: work,
        }
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| format!("--- node {i}:\n{}", self.d.log(i)))
            .collect()
    }

    fn ctl(&self, args: &[&str]) {
        let ctl = sibling("flannelctl");
        let mut full = vec![ctl.to_str().unwrap(), "--etcd-endpoints", &self.endpoint];
        full.extend_from_slice(args);
        self.tb
            .exec(&self.tb.hub, &full)
            .unwrap_or_else(|e| panic!("flannelctl {args:?}: {e}"));
    }

    /// `flannelctl apply` of `yaml`, run in the hub (where etcd is).
    fn apply(&self, yaml: &str) {
        let file = self
            .d
            .dir
            .path()
            .join(format!("m{}.yaml", test_support::random_tag(6)));
        std::fs::write(&file, yaml).unwrap();
        self.ctl(&["apply", "-f", file.to_str().unwrap()]);
    }

    /// `dig` in namespace `ns` with its own resolv.conf (1 s per try, 2 tries unless `args`
    /// say otherwise).
    fn dig(&self, ns: &str, args: &[&str]) -> Dig {
        let mut full = vec!["dig", "+time=1", "+tries=2"];
        full.extend_from_slice(args);
        let (_, out) = self.tb.exec_status(ns, &full, Duration::from_secs(10));
        Dig::parse(&out)
    }

    /// `getent hosts NAME` in `ns`: (address, canonical name), None when not found.
    fn getent(&self, ns: &str, name: &str) -> Option<(String, String)> {
        let (ok, out) =
            self.tb
                .exec_status(ns, &["getent", "hosts", name], Duration::from_secs(15));
        if !ok {
            return None;
        }
        let mut w = out.split_whitespace();
        Some((w.next()?.to_string(), w.next()?.to_string()))
    }
}

/// Asserts a NOERROR, authoritative answer whose `rtype` data is `want`.
fn expect(d: &Dig, rtype: &str, want: &[&str], what: &str) {
    assert_eq!(d.status, "NOERROR", "{what}:\n{}", d.raw);
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    assert_eq!(d.data(rtype), want, "{what}:\n{}", d.raw);
}

/// What every pod of namespace `default` must resolve (from its node's server).
fn check_pod(c: &Cluster, p: &PodInfo) {
    let at = format!("{} on node {}", p.name, p.node);
    // The pod's own resolv.conf is the one `ip netns exec` shows it.
    let (_, rc) =
        c.tb.exec_status(&p.ns, &["cat", "/etc/resolv.conf"], Duration::from_secs(5));
    assert_eq!(rc, resolv_conf(&expected_dns("default")), "{at}");

    // Short names through the search path.
    let web = Some(("10.96.0.10".to_string(), fqdn("web")));
    assert_eq!(c.getent(&p.ns, "web"), web, "{at}: getent hosts web");
    assert_eq!(c.getent(&p.ns, "web.default"), web, "{at}: web.default");
    assert_eq!(c.getent(&p.ns, "nosuch"), None, "{at}: nosuch");

    // FQDN: the ClusterIP, authoritative, TTL 5, asked of the resolv.conf's server.
    let d = c.dig(&p.ns, &[&fqdn("web")]);
    expect(&d, "A", &["10.96.0.10"], &at);
    assert!(d.flags.contains("aa"), "{at}: not authoritative\n{}", d.raw);
    assert_eq!(d.answer[0].ttl, 5, "{at}");
    assert_eq!(d.server, DNS_IP, "{at}");
    assert_eq!(d.proto, "UDP", "{at}");

    // A headless Service: every pod, and each under its own name.
    let all: Vec<String> = c.pods.iter().map(|q| q.ip.to_string()).collect();
    let all_ref: Vec<&str> = all.iter().map(String::as_str).collect();
    expect(&c.dig(&p.ns, &[&fqdn("peers")]), "A", &all_ref, &at);
    for q in &c.pods {
        let host = format!("{}.{}", dashed(q.ip), fqdn("peers"));
        expect(&c.dig(&p.ns, &[&host]), "A", &[&q.ip.to_string()], &at);
    }
    // Endpoints with hostnames.
    expect(
        &c.dig(&p.ns, &[&fqdn("manual")]),
        "A",
        &["198.51.100.1", "198.51.100.2"],
        &at,
    );
    expect(
        &c.dig(&p.ns, &[&format!("beta.{}", fqdn("manual"))]),
        "A",
        &["198.51.100.2"],
        &at,
    );

    // SRV of named ports: ClusterIP (TCP and UDP), headless (one per endpoint, addresses in
    // the additional section).
    expect(
        &c.dig(&p.ns, &["SRV", &format!("_http._tcp.{}", fqdn("web"))]),
        "SRV",
        &[&format!("0 100 80 {}.", fqdn("web"))],
        &at,
    );
    expect(
        &c.dig(&p.ns, &["SRV", &format!("_syslog._udp.{}", fqdn("web"))]),
        "SRV",
        &[&format!("0 100 514 {}.", fqdn("web"))],
        &at,
    );
    let srv: Vec<String> = c
        .pods
        .iter()
        .map(|q| format!("0 33 8080 {}.{}.", dashed(q.ip), fqdn("peers")))
        .collect();
    let d = c.dig(&p.ns, &["SRV", &format!("_http._tcp.{}", fqdn("peers"))]);
    expect(
        &d,
        "SRV",
        &srv.iter().map(String::as_str).collect::<Vec<_>>(),
        &at,
    );
    let extra: BTreeSet<String> = d
        .additional
        .iter()
        .filter(|r| r.rtype == "A")
        .map(|r| r.data.clone())
        .collect();
    assert_eq!(extra, all.iter().cloned().collect(), "{at}:\n{}", d.raw);
    expect(
        &c.dig(&p.ns, &["SRV", &format!("_db._tcp.{}", fqdn("manual"))]),
        "SRV",
        &[
            &format!("0 50 5432 alpha.{}.", fqdn("manual")),
            &format!("0 50 5432 beta.{}.", fqdn("manual")),
        ],
        &at,
    );

    // PTR: a ClusterIP, a headless endpoint with a hostname, a pod behind a headless Service.
    expect(
        &c.dig(&p.ns, &["-x", "10.96.0.10"]),
        "PTR",
        &[&format!("{}.", fqdn("web"))],
        &at,
    );
    expect(
        &c.dig(&p.ns, &["-x", "198.51.100.1"]),
        "PTR",
        &[&format!("alpha.{}.", fqdn("manual"))],
        &at,
    );
    expect(
        &c.dig(&p.ns, &["-x", &p.ip.to_string()]),
        "PTR",
        &[&format!("{}.{}.", dashed(p.ip), fqdn("peers"))],
        &at,
    );

    // ExternalName: the CNAME and the upstream's address in one answer.
    let d = c.dig(&p.ns, &[&fqdn("ext")]);
    expect(&d, "CNAME", &["www.example.test."], &at);
    assert_eq!(
        d.data("A"),
        BTreeSet::from(["192.0.2.80".to_string()]),
        "{at}:\n{}",
        d.raw
    );
    assert_eq!(d.answer[0].rtype, "CNAME", "{at}: CNAME first\n{}", d.raw);
    assert_eq!(d.answer[1].name, "www.example.test.", "{at}:\n{}", d.raw);

    // Forwarded to the upstream resolver (and its negative answers passed on).
    expect(
        &c.dig(&p.ns, &["www.example.test"]),
        "A",
        &["192.0.2.80"],
        &at,
    );
    let d = c.dig(&p.ns, &["nosuch.example.test"]);
    assert_eq!(
        (d.status.as_str(), d.ancount),
        ("NXDOMAIN", 0),
        "{at}:\n{}",
        d.raw
    );

    // NXDOMAIN for a missing Service, NODATA (NOERROR, no answer, the SOA) for AAAA of one.
    let d = c.dig(&p.ns, &[&fqdn("nosuch")]);
    assert_eq!(
        (d.status.as_str(), d.ancount),
        ("NXDOMAIN", 0),
        "{at}:\n{}",
        d.raw
    );
    assert!(d.has_soa() && d.flags.contains("aa"), "{at}:\n{}", d.raw);
    let d = c.dig(&p.ns, &["AAAA", &fqdn("web")]);
    assert_eq!(
        (d.status.as_str(), d.ancount),
        ("NOERROR", 0),
        "{at}:\n{}",
        d.raw
    );
    assert!(d.has_soa(), "{at}: NODATA without SOA\n{}", d.raw);
    // A name that exists only as a parent (empty non-terminal): NODATA too.
    let d = c.dig(&p.ns, &[&format!("default.svc.{ZONE}")]);
    assert_eq!(
        (d.status.as_str(), d.ancount),
        ("NOERROR", 0),
        "{at}:\n{}",
        d.raw
    );

    // The schema version and this pod's own pod record.
    expect(
        &c.dig(&p.ns, &["TXT", &format!("dns-version.{ZONE}")]),
        "TXT",
        &["\"1.1.0\""],
        &at,
    );
    expect(
        &c.dig(&p.ns, &[&format!("{}.default.pod.{ZONE}", dashed(p.ip))]),
        "A",
        &[&p.ip.to_string()],
        &at,
    );
}

/// Polls from one pod per node until `done` holds for `name`'s answer on every node;
/// returns each node's delay from `t0`.
fn until_all(c: &Cluster, t0: Instant, name: &str, done: impl Fn(&Dig) -> bool) -> Vec<Duration> {
    let mut seen: Vec<Option<Duration>> = vec![None; c.pods.len()];
    while seen.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(5) {
        for (k, p) in c.pods.iter().enumerate() {
            if seen[k].is_some() {
                continue;
            }
            let d = c.dig(&p.ns, &["+tries=1", name]);
            if done(&d) {
                seen[k] = Some(t0.elapsed());
            }
        }
    }
    seen.into_iter()
        .enumerate()
        .map(|(k, s)| {
            s.unwrap_or_else(|| panic!("node {k}: {name} not as expected after 5 s\n{}", c.logs()))
        })
        .collect()
}

/// Bytes of a query header: id, flags (RD), counts.
fn header(id: u16, qd: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&[0x01, 0x00]);
    h.extend_from_slice(&qd.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    h
}

/// A datagram's answer within 300 ms.
fn answer(s: &UdpSocket, bytes: &[u8]) -> Option<Vec<u8>> {
    s.send(bytes).unwrap();
    let mut buf = [0u8; 4096];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// rcode of an answer to query `id` (asserting it is a response to that query).
fn rcode(reply: &[u8], id: u16, what: &str) -> u8 {
    assert!(reply.len() >= 12, "{what}: short reply {reply:?}");
    assert_eq!(u16::from_be_bytes([reply[0], reply[1]]), id, "{what}: id");
    assert!(reply[2] & 0x80 != 0, "{what}: QR not set");
    reply[3] & 0x0f
}

const FORMERR: u8 = 1;
const NOTIMP: u8 = 4;

/// Garbage and truncated packets to the server from pod `ns`: answered FORMERR or dropped.
fn garbage(ns: &str) {
    let s = in_netns(ns, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect((DNS_IP, 53))?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();

    // Too short for a header: dropped.
    assert_eq!(
        answer(&s, &[0x12, 0x34, 0x01, 0x00, 0x00]),
        None,
        "5-byte datagram"
    );
    // A response (QR set): dropped, never answered (no loops between servers).
    let mut resp = header(0x2222, 0);
    resp[2] |= 0x80;
    assert_eq!(answer(&s, &resp), None, "a response");
    // Header only, no question: FORMERR.
    let r = answer(&s, &header(0x3333, 0)).expect("header-only query unanswered");
    assert_eq!(rcode(&r, 0x3333, "header only"), FORMERR);
    // A header announcing a question that is not there: FORMERR.
    let r = answer(&s, &header(0x4444, 1)).expect("missing question unanswered");
    assert_eq!(rcode(&r, 0x4444, "missing question"), FORMERR);
    // A label length beyond the packet's end: FORMERR.
    let mut bad = header(0x5555, 1);
    bad.extend_from_slice(&[63, b'w', b'e', b'b', 0, 0, 1, 0, 1]);
    let r = answer(&s, &bad).expect("bad label length unanswered");
    assert_eq!(rcode(&r, 0x5555, "bad label length"), FORMERR);
    // A compression pointer to itself: FORMERR.
    let mut lp = header(0x6666, 1);
    lp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let r = answer(&s, &lp).expect("pointer loop unanswered");
    assert_eq!(rcode(&r, 0x6666, "pointer loop"), FORMERR);
    // 300 pseudo-random datagrams (1 to 600 bytes) in a burst: whatever is answered is a
    // response to the sender's id with an error code.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ids = BTreeSet::new();
    for _ in 0..300 {
        let len = 1 + (next() % 600) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 2 {
            ids.insert(u16::from_be_bytes([bytes[0], bytes[1]]));
        }
        s.send(&bytes).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.recv(&mut buf) {
        let r = &buf[..n];
        let id = u16::from_be_bytes([r[0], r[1]]);
        assert!(ids.contains(&id), "answer to an id never sent: {r:?}");
        let code = rcode(r, id, "random datagram");
        assert!(
            matches!(code, FORMERR | NOTIMP),
            "random datagram answered with rcode {code}: {r:?}"
        );
        answered += 1;
    }
    eprintln!("300 random datagrams: {answered} answered FORMERR/NOTIMP, the rest dropped");

    // TCP: a garbage message gets FORMERR on the connection; a frame cut short is dropped
    // with the connection.
    let mut t = in_netns(ns, || TcpStream::connect((DNS_IP, 53)))
        .unwrap()
        .unwrap();
    t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let msg = header(0x7777, 0);
    t.write_all(&(msg.len() as u16).to_be_bytes()).unwrap();
    t.write_all(&msg).unwrap();
    let mut len = [0u8; 2];
    t.read_exact(&mut len).unwrap();
    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
    t.read_exact(&mut r).unwrap();
    assert_eq!(rcode(&r, 0x7777, "TCP header only"), FORMERR);
    t.write_all(&[1, 44, 0x88, 0x88, 1, 0]).unwrap();
    t.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    assert!(rest.is_empty(), "answer to a cut-short TCP frame: {rest:?}");
}

#[test]
fn cluster_dns() {
    if !require_root_with(&["ip", "nft", "conntrack", "unbound", "dig", "getent"])
        || !require(
            Path::new(REFERENCE_PLUGINS).join("bridge").is_file(),
            "needs the reference CNI plugins in /usr/lib/cni",
        )
    {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new();
    eprintln!("cluster up in {:?}", started.elapsed());
    let mut manifest: String = c.pods.iter().map(|p| pod_yaml(&p.name)).collect();
    manifest.push_str(SERVICES);
    manifest.push_str("---\n");
    manifest.push_str(&big_endpoints());
    c.apply(&manifest);

    // Every node's zone has the pods (their records are published by the nodes).
    let all: BTreeSet<String> = c.pods.iter().map(|p| p.ip.to_string()).collect();
    for p in &c.pods {
        wait_for(Duration::from_secs(30), || {
            (c.dig(&p.ns, &[&fqdn("peers")]).data("A") == all).then_some(())
        })
        .unwrap_or_else(|| panic!("node {}: headless peers incomplete\n{}", p.node, c.logs()));
    }
    eprintln!("zones complete after {:?}", started.elapsed());

    for p in &c.pods {
        check_pod(&c, p);
    }

    // The `flannelctl pod up` pod: its resolv.conf (written by pod up, mounted by ip netns
    // exec) puts it in `team`, so `web` alone is not found and `web.default` is; the name's
    // ClusterIP carries traffic to a pod.
    let team = c.team_ns.clone();
    let want = resolv_conf(&expected_dns("team"));
    let file =
        std::fs::read_to_string(Path::new("/etc/netns").join(&team).join("resolv.conf")).unwrap();
    assert_eq!(file, want);
    let (_, seen) =
        c.tb.exec_status(&team, &["cat", "/etc/resolv.conf"], Duration::from_secs(5));
    assert_eq!(seen, want);
    assert_eq!(c.getent(&team, "web"), None, "web from team");
    let (vip, name) = c
        .getent(&team, "web.default")
        .expect("web.default from team");
    assert_eq!((vip.as_str(), name), ("10.96.0.10", fqdn("web")));
    let to = SocketAddr::new(vip.parse().unwrap(), 80);
    let (server, _) = wait_for(Duration::from_secs(30), || {
        who_serves(&team, to, Duration::from_secs(2)).ok()
    })
    .unwrap_or_else(|| panic!("{to} (web.default) not served\n{}", c.logs()));
    assert!(all.contains(&server), "{server}");

    // Large answers: TC over UDP without EDNS (512 bytes) and with dig's 1232; dig's retry
    // over TCP, and +tcp, get every record. From the zone and from upstream (where the node
    // itself has to ask over TCP).
    let p0 = c.pods[0].ns.clone();
    for (name, prefix) in [
        (fqdn("big"), "198.18.0."),
        ("big.example.test".into(), "198.19.0."),
    ] {
        let want: BTreeSet<String> = (1..=BIG).map(|k| format!("{prefix}{k}")).collect();
        let d = c.dig(&p0, &["+noedns", "+ignore", &name]);
        assert!(d.flags.contains("tc"), "{name}: no TC\n{}", d.raw);
        assert_eq!(d.status, "NOERROR", "{name}:\n{}", d.raw);
        assert!(d.ancount < usize::from(BIG), "{name}:\n{}", d.raw);
        let d = c.dig(&p0, &["+ignore", &name]);
        assert!(
            d.flags.contains("tc"),
            "{name}: no TC at 1232 bytes\n{}",
            d.raw
        );
        for args in [
            vec![name.as_str()],
            vec!["+noedns", &name],
            vec!["+tcp", &name],
        ] {
            let d = c.dig(&p0, &args);
            assert_eq!(d.data("A"), want, "{name} {args:?}:\n{}", d.raw);
            assert_eq!(d.proto, "TCP", "{name} {args:?}:\n{}", d.raw);
            assert!(!d.flags.contains("tc"), "{name} {args:?}:\n{}", d.raw);
            if args[0] != "+tcp" {
                assert!(d.tcp_retry, "{name} {args:?}: no retry\n{}", d.raw);
            }
        }
    }

    // More of the protocol, from node 0's server.
    // Names match whatever their case; the question's name is echoed as asked.
    let d = c.dig(&p0, &["WeB.DeFault.SVC.Cluster.Local"]);
    expect(&d, "A", &["10.96.0.10"], "mixed case");
    assert_eq!(
        d.answer[0].name, "WeB.DeFault.SVC.Cluster.Local.",
        "{}",
        d.raw
    );
    // An EDNS version other than 0: BADVERS.
    let d = c.dig(&p0, &["+edns=1", "+noednsnegotiation", &fqdn("web")]);
    assert_eq!((d.status.as_str(), d.ancount), ("BADVERS", 0), "{}", d.raw);
    // The zone's apex and its name server (the node-local address).
    let d = c.dig(&p0, &["SOA", ZONE]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(
        d.data("SOA")
            .iter()
            .any(|s| s.starts_with(&format!("ns.dns.{ZONE}. hostmaster.{ZONE}."))),
        "{}",
        d.raw
    );
    expect(
        &c.dig(&p0, &["NS", ZONE]),
        "NS",
        &[&format!("ns.dns.{ZONE}.")],
        "NS",
    );
    expect(
        &c.dig(&p0, &[&format!("ns.dns.{ZONE}")]),
        "A",
        &[DNS_IP],
        "ns.dns",
    );
    // An ExternalName whose target does not exist: the CNAME, and NXDOMAIN for the target.
    let d = c.dig(&p0, &[&fqdn("ext-missing")]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
    assert_eq!(
        d.data("CNAME"),
        BTreeSet::from(["nosuch.example.test.".to_string()]),
        "{}",
        d.raw
    );
    // Several questions on one TCP connection.
    let (_, out) = c.tb.exec_status(
        &p0,
        &[
            "dig",
            "+time=2",
            "+tcp",
            "+keepopen",
            &fqdn("web"),
            &fqdn("manual"),
            "www.example.test",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.matches("status: NOERROR").count(), 3, "{out}");

    // A Service is resolvable on every node within 1 s of its creation, and gone (NXDOMAIN)
    // within 1 s of its deletion (timed from before `flannelctl` starts; each poll is one
    // dig, 15-25 ms).
    let late = fqdn("late");
    for p in &c.pods {
        assert_eq!(c.dig(&p.ns, &[&late]).status, "NXDOMAIN");
    }
    let t0 = Instant::now();
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{port: 80}]\n");
    let applied = t0.elapsed();
    let created = until_all(&c, t0, &late, |d| {
        d.status == "NOERROR" && d.data("A").contains("10.96.0.30")
    });
    let t0 = Instant::now();
    c.ctl(&["delete", "service", "late"]);
    let removed = t0.elapsed();
    let deleted = until_all(&c, t0, &late, |d| d.status == "NXDOMAIN" && d.ancount == 0);
    eprintln!(
        "Service late resolvable per node after {created:?} (flannelctl apply took {applied:?}), \
         NXDOMAIN after {deleted:?} (flannelctl delete took {removed:?})"
    );
    for t in created.iter().chain(&deleted) {
        assert!(
            *t < Duration::from_secs(1),
            "created {created:?} deleted {deleted:?}"
        );
    }

    // Garbage to node 0's server; it keeps answering, flanneld keeps running.
    let before = common::metric(&c.tb, 0, "flannel_dns_dropped_total");
    garbage(&p0);
    // Every UDP socket of the server still answers: 32 fresh source ports (spread over its
    // SO_REUSEPORT sockets), one try each; and TCP.
    for k in 0..32u16 {
        let s = in_netns(&p0, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect((DNS_IP, 53))?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let id = 0x8000 + k;
        let mut q = header(id, 1);
        for label in fqdn("web").split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let r = answer(&s, &q).unwrap_or_else(|| panic!("query {k} after garbage unanswered"));
        assert_eq!(rcode(&r, id, "after garbage"), 0);
        assert_eq!(
            u16::from_be_bytes([r[6], r[7]]),
            1,
            "ANCOUNT after garbage: {r:?}"
        );
        assert_eq!(
            r[r.len() - 4..],
            [10, 96, 0, 10],
            "address after garbage: {r:?}"
        );
    }
    let d = c.dig(&p0, &["+tcp", &fqdn("web")]);
    expect(&d, "A", &["10.96.0.10"], "TCP after garbage");
    for (i, h) in c.flanneld.clone().into_iter().enumerate() {
        assert!(
            c.tb.running(h),
            "flanneld on node {i} exited\n{}",
            c.d.log(i)
        );
    }
    let dropped = common::metric(&c.tb, 0, "flannel_dns_dropped_total");
    assert!(dropped >= before + 2, "dropped {before} -> {dropped}");

    // Metrics: answers counted by type, rcode and transport.
    let m = common::http(&c.tb, 0, "/metrics");
    let count = |labels: &str| {
        common::metric(
            &c.tb,
            0,
            &format!("flannel_dns_responses_total{{{labels}}}"),
        )
    };
    assert!(count(r#"type="A",rcode="NOERROR",proto="udp""#) > 0, "{m}");
    assert!(count(r#"type="A",rcode="NOERROR",proto="tcp""#) > 0, "{m}");
    assert!(count(r#"type="A",rcode="NXDOMAIN",proto="udp""#) > 0, "{m}");
    assert!(
        count(r#"type="other",rcode="FORMERR",proto="udp""#) >= 4,
        "{m}"
    );
    assert!(
        count(r#"type="other",rcode="FORMERR",proto="tcp""#) >= 1,
        "{m}"
    );
    for i in 1..3 {
        let m = common::http(&c.tb, i, "/metrics");
        assert!(m.contains("flannel_dns_responses_total{"), "node {i}: {m}");
    }

    // Upstream gone: what node 0 cached is still answered, other outside names get SERVFAIL
    // once the node gives up on the upstream (2 s), not silence; cluster names are unaffected.
    c.tb.stop(c.unbound, Duration::from_secs(5));
    expect(
        &c.dig(&p0, &["www.example.test"]),
        "A",
        &["192.0.2.80"],
        "cached",
    );
    let t0 = Instant::now();
    let d = c.dig(&p0, &["+time=5", "+tries=1", "other.example.test"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    eprintln!("SERVFAIL without upstream after {:?}", t0.elapsed());
    expect(
        &c.dig(&p0, &[&fqdn("web")]),
        "A",
        &["10.96.0.10"],
        "without upstream",
    );

    // pod down removes the pod's resolv.conf with its namespace.
    let mut up = c.team.take().unwrap();
    up.down()
        .unwrap_or_else(|e| panic!("flannelctl pod down: {e}"));
    assert!(!Path::new("/etc/netns").join(&team).exists());
    assert!(!Path::new("/run/netns").join(&team).exists());

    let took = started.elapsed();
    eprintln!("cluster DNS end to end took {took:?}");
    assert!(took < BUDGET, "took {took:?}");
}
