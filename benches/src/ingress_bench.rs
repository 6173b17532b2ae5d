//! Ingress proxy: flannel-ingress against nginx configured as ingress-nginx configures it.
//!
//! One namespace node with two pods serving a small static answer (nginx, one worker each: the
//! same endpoints for both proxies); etcd in the hub. On the node, in the same run:
//! `flannel-ingress` (objects written with `flannelctl apply`: an IngressClass, a TLS Secret, a
//! Service with Endpoints, an Ingress with `--hosts` hosts of two paths each) and Debian's nginx
//! with the equivalent configuration, written the way ingress-nginx writes it at its heart
//! (an upstream block with keepalive to the pod addresses, a server block per host, a location
//! per path, `proxy_http_version 1.1`, the forwarded headers, a TLS server with the same
//! certificate, an access log line per request). Both get the same CPU budget: `--workers`
//! tokio worker threads for ours, `worker_processes` for nginx. wrk in the hub loads one proxy
//! at a time, per mode: HTTP with keep-alive, HTTP with `Connection: close`, HTTPS with
//! keep-alive and HTTPS with `Connection: close` (a full handshake per request: wrk does not
//! resume sessions). Per run: req/s, latency p50/p99 (wrk --latency), the proxy's CPU seconds
//! (utime + stime from /proc, nginx's master and workers summed) and RSS after the run.
//! `--rounds` runs alternate which proxy goes first. Needs root, nginx, wrk and openssl.
//!
//! Writes a markdown table (`--out FILE`, default `bench-results/ingress.md`).

#[path = "common.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use test_support::{in_netns, run_bounded, run_checked, wait_for, Testbed};

use common::{check_stop, write_file};

const POD_PORT: u16 = 8080;
const HOST: &str = "bench.test";
const PATH: &str = "/api/items?id=1";
/// Where nginx listens on the node (ours has 80 and 443).
const NGINX_HTTP: u16 = 8081;
const NGINX_HTTPS: u16 = 8443;
const BODY: &str = "hello from the pod\n";

/// flannel-ingress against nginx (ingress-nginx style config), wrk from the hub (root).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ingress-bench")]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// Rounds (each runs every mode against both proxies).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds of unrecorded load per mode and proxy before the first round (0: none), so
    /// that the proxy going first does not meet cold pods, pools and caches alone.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: u32,
    /// Proxy CPU budget: tokio worker threads for flannel-ingress, worker_processes for nginx.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Hosts in the Ingress (two paths each); the load goes to the first.
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// Only these modes (comma separated: http, http-close, https, https-close).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Turn both proxies' access logs off (to see what the log line per request costs).
    #[arg(long)]
    no_access_log: bool,
    /// Pin each proxy (every thread and process of it, its log writer included) to the last
    /// CPU, and wrk and the pods to the other CPUs: each proxy has one core of its own rather
    /// than competing with the load generator (needs 2 CPUs or more).
    #[arg(long)]
    pin: bool,
    /// Keep the work directory (configs, logs) and print where it is.
    #[arg(long)]
    keep: bool,
    /// The markdown table.
    #[arg(long, default_value = "bench-results/ingress.md")]
    out: PathBuf,
}

/// A binary next to this one.
fn sibling(name: &str) -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory for this binary")?
        .join(name);
    if !bin.is_file() {
        bail!(
            "{} missing: run `cargo build --release -p ingress -p flannelctl` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts Debian's nginx in `ns` with `dir/nginx.conf`, its error log and output in `dir`
/// (`dir` as its prefix); the handle of the process.
fn spawn_nginx(tb: &mut Testbed, ns: &str, dir: &Path) -> Result<usize> {
    let path = |p: &Path| p.to_str().context("path").map(str::to_string);
    let (conf, err, prefix) = (
        path(&dir.join("nginx.conf"))?,
        path(&dir.join("error.log"))?,
        path(dir)?,
    );
    tb.spawn(
        ns,
        "nginx",
        &["-c", &conf, "-e", &err, "-p", &prefix],
        &[],
        &dir.join("stderr.log"),
    )
    .map_err(anyhow::Error::msg)
}

/// With `--pin`: the CPU of the proxies and the CPU list of everything else.
fn pinning() -> Result<(String, String)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n < 2 {
        bail!("--pin needs at least 2 CPUs, this machine has {n}");
    }
    let rest = if n == 2 {
        "0".to_string()
    } else {
        format!("0-{}", n - 2)
    };
    Ok(((n - 1).to_string(), rest))
}

/// Pins every thread of `pid` and of its children to `cpus` (new threads and processes
/// inherit it).
fn pin(pid: u32, cpus: &str) -> Result<()> {
    for p in family(pid) {
        run_checked(
            Command::new("taskset").args(["-a", "-p", "-c", cpus, &p.to_string()]),
            Duration::from_secs(5),
        )
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("pinning {p} to CPU {cpus}"))?;
    }
    Ok(())
}

fn need(program: &str) -> Result<()> {
    if test_support::find_program(program).is_none() {
        bail!("{program} not found (deploy/install-deps.sh installs it)");
    }
    Ok(())
}

/// The endpoint server of one pod: nginx answering every request with [`BODY`].
fn pod_nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes 1;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  default_type text/plain;
  server {{
    listen {POD_PORT} default_server backlog=4096;
    location / {{ return 200 "{body}"; }}
  }}
}}
"#,
        body = BODY.replace('\n', "\\n")
    )
}

/// nginx as ingress-nginx renders it for the same Ingress: one upstream with keepalive to the
/// pods, a server per host (plain and TLS), a location per path, the forwarded headers ours sets.
fn proxy_nginx_conf(
    dir: &Path,
    workers: usize,
    hosts: &[String],
    pods: &[String],
    access_log: bool,
) -> String {
    let d = dir.display();
    let access = if access_log {
        format!("{d}/access.log upstreaminfo")
    } else {
        "off".to_string()
    };
    let mut c = format!(
        r#"worker_processes {workers};
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; use epoll; }}
http {{
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  # ingress-nginx's log format (upstreaminfo), one line per request as ours writes.
  log_format upstreaminfo '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_length $request_time [$proxy_upstream_name] [] $upstream_addr $upstream_response_length $upstream_response_time $upstream_status $req_id';
  access_log {access};
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 75s;
  # ingress-nginx's default is 1000 per client connection; ours has no limit, so neither
  # does this one (the comparison is of the proxying, not of reconnecting).
  keepalive_requests 10000000;
  client_header_buffer_size 1k;
  large_client_header_buffers 4 8k;
  client_max_body_size 1m;
  server_tokens off;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_timeout 10m;
  ssl_session_tickets off;
  ssl_certificate {d}/tls.crt;
  ssl_certificate_key {d}/tls.key;
  upstream default-svc-80 {{
"#
    );
    for p in pods {
        let _ = writeln!(c, "    server {p}:{POD_PORT} max_fails=0;");
    }
    c += "    keepalive 320;\n    keepalive_timeout 60s;\n    keepalive_requests 10000;\n  }\n";
    let location = |path: &str| {
        format!(
            r#"    location {path} {{
      set $proxy_upstream_name "default-svc-80";
      set $req_id $connection-$connection_requests;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Request-ID $req_id;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Forwarded "for=$remote_addr;host=\"$http_host\";proto=$scheme";
      proxy_set_header Proxy "";
      proxy_connect_timeout 5s;
      proxy_send_timeout 60s;
      proxy_read_timeout 60s;
      proxy_buffering off;
      proxy_request_buffering on;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 3;
      proxy_pass http://default-svc-80;
    }}
"#
        )
    };
    let _ = write!(
        c,
        "  server {{\n    listen {NGINX_HTTP} default_server reuseport backlog=4096;\n    listen {NGINX_HTTPS} default_server ssl http2 reuseport backlog=4096;\n    server_name _;\n    location / {{ return 404; }}\n  }}\n"
    );
    for h in hosts {
        let _ = write!(
            c,
            "  server {{\n    server_name {h};\n    listen {NGINX_HTTP};\n    listen {NGINX_HTTPS} ssl http2;\n{}{}  }}\n",
            location("/api"),
            location("/")
        );
    }
    c += "}\n";
    c
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// The objects for flannel-ingress: class, Secret, Service + Endpoints, the Ingress.
fn objects(dir: &Path, hosts: &[String], pods: &[String]) -> Result<String> {
    let crt = std::fs::read_to_string(dir.join("tls.crt"))?;
    let key = std::fs::read_to_string(dir.join("tls.key"))?;
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: flannel}\nspec: {controller: flannel.io/ingress}\n---\n",
    );
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: bench-tls, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(&crt),
        indent(&key)
    );
    let addrs: Vec<String> = pods.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc, namespace: default}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: http, port: {POD_PORT}}}]\n---\n",
        addrs.join(", ")
    );
    let backend = "{service: {name: svc, port: {number: 80}}}";
    let quoted: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
    let _ = write!(
        y,
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: bench, namespace: default}}\nspec:\n  ingressClassName: flannel\n  tls:\n  - {{hosts: [{}], secretName: bench-tls}}\n  rules:\n",
        quoted.join(", ")
    );
    for h in hosts {
        let _ = write!(
            y,
            "  - host: '{h}'\n    http:\n      paths:\n      - {{path: /api, pathType: Prefix, backend: {backend}}}\n      - {{path: /, pathType: Prefix, backend: {backend}}}\n"
        );
    }
    Ok(y)
}

/// One GET from `ns` (Connection: close): the status and the body.
fn get(ns: &str, to: SocketAddr) -> Result<(u16, String)> {
    let text = in_netns(ns, move || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .map_err(anyhow::Error::msg)?
    .map_err(anyhow::Error::msg)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// CPU ticks (utime + stime) of a process.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok(utime + stime)
}

/// Resident set size of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// A process and its children (nginx's master and workers).
fn family(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_string))
                })
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                v.push(child);
            }
        }
    }
    v
}

/// /proc counts CPU time in USER_HZ ticks, 100 per second on Linux whatever the kernel's HZ.
fn clk_tck() -> f64 {
    100.0
}

/// A wrk duration (`812.00us`, `1.23ms`, `2.00s`) in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: String,
    cpu_s: f64,
    rss_mib: f64,
}

fn parse_wrk(out: &str) -> Result<Run> {
    let mut r = Run::default();
    let mut non2xx = 0u64;
    for line in out.lines() {
        let t = line.trim();
        let mut w = t.split_whitespace();
        match (w.next(), w.next()) {
            (Some("50%"), Some(v)) => r.p50_ms = wrk_ms(v).context("p50")?,
            (Some("99%"), Some(v)) => r.p99_ms = wrk_ms(v).context("p99")?,
            (Some("Requests/sec:"), Some(v)) => r.rps = v.parse().context("req/s")?,
            (Some(n), Some("requests")) => r.requests = n.parse().context("requests")?,
            _ => {}
        }
        if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            non2xx = v.trim().parse().unwrap_or(u64::MAX);
        }
        if let Some(v) = t.strip_prefix("Socket errors:") {
            r.errors = v.trim().to_string();
        }
    }
    if r.rps <= 0.0 || r.requests == 0 {
        bail!("wrk gave no result:\n{out}");
    }
    if non2xx > 0 {
        bail!("{non2xx} answers were not 2xx/3xx:\n{out}");
    }
    Ok(r)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Http,
    HttpClose,
    Https,
    HttpsClose,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Http, Mode::HttpClose, Mode::Https, Mode::HttpsClose];
    fn name(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::HttpClose => "http-close",
            Mode::Https => "https",
            Mode::HttpsClose => "https-close",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Mode::Http => "HTTP, keep-alive",
            Mode::HttpClose => "HTTP, `Connection: close`",
            Mode::Https => "HTTPS, keep-alive",
            Mode::HttpsClose => "HTTPS, `Connection: close` (full handshake per request)",
        }
    }
    fn tls(self) -> bool {
        matches!(self, Mode::Https | Mode::HttpsClose)
    }
    fn close(self) -> bool {
        matches!(self, Mode::HttpClose | Mode::HttpsClose)
    }
}

/// A proxy under test: its name, ports and the PIDs to account.
struct Proxy {
    name: &'static str,
    http: u16,
    https: u16,
    pid: u32,
}

/// Removes /etc/netns/<hub> (the hub's hosts file naming the node) on drop.
struct HostsFile(PathBuf);

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[allow(clippy::too_many_arguments)]
fn run_wrk(hub: &str, a: &Args, mode: Mode, p: &Proxy, node_ip: &str) -> Result<Run> {
    let url = if mode.tls() {
        format!("https://{HOST}:{}{PATH}", p.https)
    } else {
        format!("http://{node_ip}:{}{PATH}", p.http)
    };
    let threads = a.wrk_threads.to_string();
    let conns = a.connections.max(a.wrk_threads).to_string();
    let dur = format!("{}s", a.seconds);
    let host = format!("Host: {HOST}");
    let rest = if a.pin { pinning()?.1 } else { String::new() };
    let mut args = vec!["netns", "exec", hub];
    if a.pin {
        args.extend(["taskset", "-c", &rest]);
    }
    args.extend([
        "wrk",
        "-t",
        &threads,
        "-c",
        &conns,
        "-d",
        &dur,
        "--latency",
        "-H",
        &host,
    ]);
    if mode.close() {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let pids = family(p.pid);
    let before: u64 = pids.iter().map(|&x| cpu_ticks(x).unwrap_or(0)).sum();
    let out = run_bounded(
        Command::new("ip").args(&args),
        Duration::from_secs(u64::from(a.seconds) + 60),
    )
    .map_err(anyhow::Error::msg)?;
    let after: u64 = pids.iter().map(|&x| cpu_ticks(x).unwrap_or(0)).sum();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk against {}: {}{}",
            p.name,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r = parse_wrk(&text).with_context(|| format!("{} {}", p.name, mode.name()))?;
    r.cpu_s = after.saturating_sub(before) as f64 / clk_tck();
    r.rss_mib = pids.iter().map(|&x| rss_kib(x).unwrap_or(0)).sum::<u64>() as f64 / 1024.0;
    Ok(r)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// "mean (min–max)" of a figure over the rounds.
fn spread(v: &[f64], digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() < 2 {
        format!("{:.*}", digits, mean(v))
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits,
            mean(v),
            digits,
            lo,
            digits,
            hi
        )
    }
}

fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    common::on_signals()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("ingress-bench needs root (network namespaces)");
    }
    for p in ["nginx", "wrk", "openssl"] {
        need(p)?;
    }
    let modes: Vec<Mode> = if a.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for m in &a.modes {
            v.push(
                Mode::ALL
                    .into_iter()
                    .find(|x| x.name() == m)
                    .with_context(|| format!("unknown mode {m}"))?,
            );
        }
        v
    };
    let ingress_bin = sibling("flannel-ingress")?;
    let flannelctl = sibling("flannelctl")?;
    let work = tempfile::Builder::new().prefix("ingress-bench").tempdir()?;
    let dir = work.path().to_path_buf();

    let mut tb = Testbed::new(1).map_err(anyhow::Error::msg)?;
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .map_err(anyhow::Error::msg)?;
    let node_ns = tb.nodes[0].ns.clone();
    let node_ip = tb.nodes[0].ip.clone();
    let hub = tb.hub.clone();
    // The hub resolves the benchmark host to the node (for SNI): `ip netns exec` mounts
    // /etc/netns/<ns>/hosts over /etc/hosts.
    let netns_etc = PathBuf::from("/etc/netns").join(&hub);
    if netns_etc.exists() {
        bail!("{} exists already", netns_etc.display());
    }
    std::fs::create_dir_all(&netns_etc)?;
    let _hosts_guard = HostsFile(netns_etc.clone());
    std::fs::write(
        netns_etc.join("hosts"),
        format!("127.0.0.1 localhost\n{node_ip} {HOST}\n"),
    )?;

    // Endpoints: two pods, nginx in each.
    let mut pods = Vec::new();
    let mut pod_procs = Vec::new();
    for k in 0..2u8 {
        let ip = format!("10.5.1.{}", k + 2);
        let pod = tb
            .add_pod(0, &format!("{ip}/24"), "10.5.1.1/24", 1500)
            .map_err(anyhow::Error::msg)?;
        let pdir = dir.join(format!("pod{k}"));
        std::fs::create_dir_all(&pdir)?;
        write_file(&pdir.join("nginx.conf"), &pod_nginx_conf(&pdir))?;
        let h = spawn_nginx(&mut tb, &pod.ns, &pdir)?;
        pod_procs.push(h);
        pods.push(ip);
    }
    for ip in &pods {
        let to: SocketAddr = format!("{ip}:{POD_PORT}").parse()?;
        wait_for(Duration::from_secs(10), || {
            get(&node_ns, to).ok().filter(|(s, _)| *s == 200)
        })
        .with_context(|| format!("the endpoint {to} did not come up"))?;
    }

    // The certificate both proxies serve.
    run_checked(
        Command::new("openssl").current_dir(&dir).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.crt",
            "-days",
            "2",
            "-subj",
            &format!("/CN={HOST}"),
            "-addext",
            &format!("subjectAltName=DNS:{HOST},DNS:*.{HOST}"),
        ]),
        Duration::from_secs(20),
    )
    .map_err(anyhow::Error::msg)?;
    // The loaded host first; the others make the route tables less trivial.
    let hosts: Vec<String> = std::iter::once(HOST.to_string())
        .chain((1..a.hosts.max(1)).map(|i| format!("h{i}.{HOST}")))
        .collect();

    // flannel-ingress.
    let objs = objects(&dir, &hosts, &pods)?;
    write_file(&dir.join("objects.yaml"), &objs)?;
    tb.flannelctl_apply(&hub, &flannelctl, &endpoint, &dir.join("objects.yaml"))
        .map_err(anyhow::Error::msg)?;
    let workers = a.workers.to_string();
    let ours = tb
        .spawn(
            &node_ns,
            ingress_bin.to_str().context("path")?,
            &[
                "--etcd-endpoints",
                &endpoint,
                "--http-addr",
                "0.0.0.0:80",
                "--https-addr",
                "0.0.0.0:443",
                "--health-addr",
                "127.0.0.1:10254",
                "--worker-threads",
                &workers,
            ],
            &[(
                "RUST_LOG",
                if a.no_access_log {
                    "info,access=off"
                } else {
                    "info"
                },
            )],
            &dir.join("flannel-ingress.log"),
        )
        .map_err(anyhow::Error::msg)?;
    // nginx as the proxy.
    let ndir = dir.join("nginx");
    std::fs::create_dir_all(&ndir)?;
    std::fs::copy(dir.join("tls.crt"), ndir.join("tls.crt"))?;
    std::fs::copy(dir.join("tls.key"), ndir.join("tls.key"))?;
    write_file(
        &ndir.join("nginx.conf"),
        &proxy_nginx_conf(&ndir, a.workers, &hosts, &pods, !a.no_access_log),
    )?;
    let theirs = spawn_nginx(&mut tb, &node_ns, &ndir)?;
    let proxies = [
        Proxy {
            name: "flannel-ingress",
            http: 80,
            https: 443,
            pid: tb.pid(ours).context("flannel-ingress pid")?,
        },
        Proxy {
            name: "nginx",
            http: NGINX_HTTP,
            https: NGINX_HTTPS,
            pid: tb.pid(theirs).context("nginx pid")?,
        },
    ];
    for p in &proxies {
        let to: SocketAddr = format!("{node_ip}:{}", p.http).parse()?;
        wait_for(Duration::from_secs(20), || {
            get(&hub, to)
                .ok()
                .filter(|(s, b)| *s == 200 && b.contains(BODY.trim()))
        })
        .with_context(|| {
            format!(
                "{} does not route {HOST}{PATH}; logs in {}",
                p.name,
                dir.display()
            )
        })?;
        // And over TLS, with the same certificate by SNI.
        let url = format!("https://{HOST}:{}{PATH}", p.https);
        let (ok, out) = tb.exec_status(
            &hub,
            &["curl", "-sS", "-k", "-m", "5", &url],
            Duration::from_secs(8),
        );
        if !ok || !out.contains(BODY.trim()) {
            bail!("{} over TLS: {out}", p.name);
        }
    }
    if a.keep {
        eprintln!("work directory: {}", dir.display());
    }
    if a.pin {
        let (proxy_cpu, rest) = pinning()?;
        for p in &proxies {
            pin(p.pid, &proxy_cpu)?;
        }
        for &h in &pod_procs {
            pin(tb.pid(h).context("pod nginx pid")?, &rest)?;
        }
    }

    // results[mode][proxy] = runs
    let mut results: Vec<[Vec<Run>; 2]> = modes.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    let mut loads = Vec::new();
    if a.warmup > 0 {
        let w = Args {
            seconds: a.warmup,
            ..a.clone()
        };
        for &mode in &modes {
            for p in &proxies {
                check_stop()?;
                run_wrk(&hub, &w, mode, p, &node_ip)
                    .with_context(|| format!("warm-up of {} ({})", p.name, mode.name()))?;
            }
        }
    }
    for round in 0..a.rounds {
        loads.push(
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        for (mi, &mode) in modes.iter().enumerate() {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for pi in order {
                check_stop()?;
                let p = &proxies[pi];
                let r = run_wrk(&hub, &a, mode, p, &node_ip)?;
                eprintln!(
                    "round {} {} {}: {:.0} req/s p50 {:.2} ms p99 {:.2} ms cpu {:.2} s rss {:.1} MiB {}",
                    round + 1,
                    mode.name(),
                    p.name,
                    r.rps,
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_s,
                    r.rss_mib,
                    r.errors
                );
                results[mi][pi].push(r);
            }
        }
    }
    for (h, name) in [(ours, "flannel-ingress"), (theirs, "nginx")] {
        if !tb.running(h) {
            bail!(
                "{name} exited during the benchmark; logs in {}",
                dir.display()
            );
        }
    }

    let mut report = String::from("# Ingress proxy benchmark\n\n");
    let _ = writeln!(
        report,
        "flannel-ingress and nginx (ingress-nginx-style configuration) in front of the same two \
         nginx pods answering {} bytes; wrk -t {} -c {} -d {}s --latency from the hub; \
         CPU budget {} (tokio worker threads / nginx worker_processes); access logs {}; {} round(s), \
         the proxy going first alternating, after {} s of unrecorded load per mode and proxy{}; load average at each round's start: {}.\n",
        BODY.len(),
        a.wrk_threads,
        a.connections,
        a.seconds,
        a.workers,
        if a.no_access_log { "off" } else { "on" },
        a.rounds,
        a.warmup,
        if a.pin {
            "; pinned (`--pin`): each proxy on the last CPU, wrk and the pods on the others"
        } else {
            ""
        },
        loads.join("; ")
    );
    report += "Figures are the mean over rounds (min–max in brackets).\n\n";
    report += "| mode | proxy | req/s | p50 ms | p99 ms | CPU s per run | CPU µs/request | RSS MiB |\n|---|---|---|---|---|---|---|---|\n";
    for (mi, &mode) in modes.iter().enumerate() {
        for (pi, p) in proxies.iter().enumerate() {
            let runs = &results[mi][pi];
            let f = |g: fn(&Run) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
            let cpu_per_req: Vec<f64> = runs
                .iter()
                .map(|r| r.cpu_s * 1e6 / r.requests.max(1) as f64)
                .collect();
            let _ = writeln!(
                report,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                mode.describe(),
                p.name,
                spread(&f(|r| r.rps), 0),
                spread(&f(|r| r.p50_ms), 2),
                spread(&f(|r| r.p99_ms), 2),
                spread(&f(|r| r.cpu_s), 2),
                spread(&cpu_per_req, 1),
                spread(&f(|r| r.rss_mib), 1),
            );
        }
    }
    report += "\n## Ratios, flannel-ingress / nginx\n\n| mode | req/s | p99 | CPU per request |\n|---|---|---|---|\n";
    for (mi, &mode) in modes.iter().enumerate() {
        let m = |pi: usize, g: fn(&Run) -> f64| {
            mean(&results[mi][pi].iter().map(g).collect::<Vec<f64>>())
        };
        let cpr = |pi: usize| {
            mean(
                &results[mi][pi]
                    .iter()
                    .map(|r| r.cpu_s / r.requests.max(1) as f64)
                    .collect::<Vec<f64>>(),
            )
        };
        let _ = writeln!(
            report,
            "| {} | {:.2}× | {:.2}× | {:.2}× |",
            mode.describe(),
            m(0, |r| r.rps) / m(1, |r| r.rps),
            m(0, |r| r.p99_ms) / m(1, |r| r.p99_ms),
            cpr(0) / cpr(1)
        );
    }
    print!("{report}");
    write_file(&a.out, &report)?;
    if a.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}
