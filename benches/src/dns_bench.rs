//! Cluster DNS against Unbound and Knot DNS.
//!
//! N Services (default 100 and 10 000; 80% ClusterIP with two named ports, 15% headless with
//! an Endpoints object of 3 named addresses, 5% ExternalName, over 10 namespaces) are made as
//! registry objects (`dns/zone.rs`). Our server (`cluster-dns`) serves them from a
//! `cluster_dns::objects::Objects` in a process of its own (`dns-bench serve`, hidden), so its
//! memory can be read; Unbound (static `local-data` zones) and Knot DNS (zone files) serve the
//! same records, generated from the same objects. A second Knot on another port is the
//! authority for `example.test`: our server and Unbound forward outside names to it, and their
//! caches are warmed before measuring. Knot is authoritative only, so it is compared on the
//! mixes inside the cluster zones only.
//!
//! All three run for the whole of one N, each on its own 127.0.0.1 port, pinned to the server
//! CPU (`--server-cpus`; dnsperf and the upstream on `--client-cpus`), `--threads` threads
//! each, `--nice` for them and dnsperf; only one is queried at a time. Per query mix and round
//! (`--rounds`, the server order reversed every other round, so background load on a shared
//! machine hits all alike), per server: dnsperf as fast as it goes (`--outstanding` queries in
//! flight, `--seconds`) for QPS, with the server's CPU time from /proc/PID/stat over that run
//! (below one CPU, dnsperf was the limit; CPU per answered query compares the servers' cost
//! whoever limits), then dnsperf `-v` at a fixed rate (`--latency-qps`) for the latency of
//! every answer (p50/p99 by nearest rank; dnsperf 2.10 prints no percentiles) and a check of
//! every answer code against the expected one. Each server is checked with `dig` before it is
//! measured; at the end, VmRSS/VmHWM from /proc/PID/status. Figures: medians over rounds.
//! Before, our server's own work per query is timed in-process without sockets
//! (`Shared::handle_local` over each in-zone mix, on the server CPU), which splits its CPU per
//! query into its own work and the rest (system calls, the kernel's UDP path, the runtime).
//!
//! Writes a markdown table (`--out FILE`, default `bench-results/dns.md`). Needs dnsperf,
//! unbound, knotd, dig and taskset; no root.

#[path = "common.rs"]
mod common;
#[path = "dns/perf.rs"]
mod perf;
#[path = "dns/zone.rs"]
mod zone;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use test_support::{find_program, free_port, run_bounded, wait_for};

use common::{check_stop, write_file};
use perf::{Expect, Summary};
use zone::Mix;

/// Cluster DNS against Unbound and Knot DNS: QPS, latency p50/p99 and RSS per query mix at
/// 100 and 10k Services (dnsperf; no root).
#[derive(Debug, clap::Parser)]
#[command(name = "dns-bench")]
struct Args {
    #[command(subcommand)]
    serve: Option<Sub>,
    /// Numbers of Services (at most 20000).
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    services: Vec<usize>,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Queries dnsperf keeps outstanding in the throughput runs.
    #[arg(long, default_value_t = 100)]
    outstanding: u32,
    /// Rate of the latency runs (queries per second, the same for every server).
    #[arg(long, default_value_t = 20_000)]
    latency_qps: u32,
    /// Seconds of each latency run.
    #[arg(long, default_value_t = 3)]
    latency_seconds: u32,
    /// Passes over all servers (figures: medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Names outside the cluster in the external mix.
    #[arg(long, default_value_t = 1000)]
    external_names: usize,
    /// Threads of each server (Unbound num-threads, Knot udp-workers, our tokio workers and
    /// UDP sockets).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs of the servers (taskset list).
    #[arg(long, default_value = "1")]
    server_cpus: String,
    /// CPUs of dnsperf and the upstream (taskset list).
    #[arg(long, default_value = "0")]
    client_cpus: String,
    /// Niceness of the servers and dnsperf (negative: ahead of other work on the machine;
    /// needs root).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
    /// Servers to measure, from cluster-dns, unbound, knot.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cluster-dns,unbound,knot"
    )]
    servers: Vec<String>,
    /// Short runs (2 s throughput, 1 s latency, one round): a smoke test.
    #[arg(long)]
    quick: bool,
    /// Keep the generated configs, zones, data files and logs in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// The markdown table.
    #[arg(long, default_value = "bench-results/dns.md")]
    out: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Serves N generated Services with the cluster DNS (what the benchmark measures).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[arg(long)]
    services: usize,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// `dns-bench serve`: builds the objects and serves them until SIGTERM/SIGINT.
fn serve(a: &ServeArgs) -> Result<()> {
    use cluster_dns::index::{IndexConfig, PodMode};
    use cluster_dns::run::{DnsOptions, DnsServer};
    ensure!(
        a.services <= zone::MAX_SERVICES,
        "at most {} Services",
        zone::MAX_SERVICES
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut objects = cluster_dns::objects::Objects::new("");
        for o in zone::objects(a.services) {
            objects.insert(o);
        }
        let mut index = IndexConfig::new(zone::ZONE, zone::TTL, PodMode::Insecure)?;
        index.nameservers = vec![zone::NS_ADDR.into()];
        let upstream =
            cluster_dns::upstream::Upstream::new(vec![a.upstream], Duration::from_secs(2));
        let mut opts = DnsOptions::new(vec![a.listen], index, upstream);
        opts.udp_sockets = a.threads.max(1);
        let server = DnsServer::bind(opts, cluster_dns::metrics::DnsMetrics::default())?;
        println!("ready {:?}", server.local_addrs());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        server.serve_objects(&objects, rx).await;
        Ok(())
    })
}

/// Our server's query handling in-process, without sockets, as a UDP task does it (kept answers, else `Shared::handle_local`: parse,
/// look up, encode) on the in-zone mixes of `n` Services: µs per query, on the server CPU.
fn in_process(
    n: usize,
    mixes: &[Mix],
    cpus: &str,
    seconds: f64,
) -> Result<Vec<(&'static str, f64)>> {
    use cluster_dns::index::{Index, IndexConfig, PodMode};
    use cluster_dns::server::{Shared, Step, Transport};
    let mut set = nix::sched::CpuSet::new();
    for c in cpus
        .split(',')
        .filter_map(|c| c.trim().parse::<usize>().ok())
    {
        set.set(c)?;
    }
    let pid = nix::unistd::Pid::from_raw(0);
    let before = nix::sched::sched_getaffinity(pid)?;
    nix::sched::sched_setaffinity(pid, &set)?;
    let mut objects = cluster_dns::objects::Objects::new("");
    for o in zone::objects(n) {
        objects.insert(o);
    }
    let mut config = IndexConfig::new(zone::ZONE, zone::TTL, PodMode::Insecure)?;
    config.nameservers = vec![zone::NS_ADDR.into()];
    let shared = Shared::new(
        Index::build(&config, &objects, 1),
        cluster_dns::cache::CacheLimits::default(),
        cluster_dns::upstream::Upstream::new(Vec::new(), Duration::from_secs(1)),
        cluster_dns::metrics::DnsMetrics::default(),
        1,
    );
    let mut out = Vec::new();
    for m in mixes.iter().filter(|m| m.in_zone) {
        let wire: Vec<Vec<u8>> = m
            .queries
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.wire(i as u16))
            .collect();
        ensure!(
            wire.len() == m.queries.len(),
            "{}: a query does not encode",
            m.name
        );
        let (mut done, mut bytes) = (0u64, 0usize);
        // As a UDP task of the server does it: kept answers (the fast path), else the general
        // path, whose answer is kept.
        let mut kept = cluster_dns::fast::Answers::default();
        kept.zone(shared.current().0);
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < seconds {
            for w in &wire {
                let quick = cluster_dns::fast::parse(w);
                if let Some(b) = quick
                    .as_ref()
                    .and_then(|q| kept.answer(q, std::time::Instant::now()))
                {
                    bytes += b.len();
                    continue;
                }
                match shared.handle_local(w, Transport::Udp) {
                    Step::Zone(b) => {
                        if let Some(q) = &quick {
                            kept.keep(q, &b);
                        }
                        bytes += b.len();
                    }
                    other => bail!("{}: no local answer: {other:?}", m.name),
                }
            }
            done += wire.len() as u64;
        }
        std::hint::black_box(bytes);
        out.push((m.name, t.elapsed().as_secs_f64() * 1e6 / done as f64));
    }
    nix::sched::sched_setaffinity(pid, &before)?;
    Ok(out)
}

/// A server process, stopped by its PID (SIGTERM, then SIGKILL after 5 s) when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` under `nice -n nice taskset -c cpus`, output to `log`.
    fn spawn(name: &str, nice: i32, cpus: &str, cmd: &[String], log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("nice")
            .arg("-n")
            .arg(nice.to_string())
            .args(["taskset", "-c", cpus])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// CPU seconds used so far (every thread).
    fn cpu_seconds(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let ticks =
            perf::cpu_ticks(&std::fs::read_to_string(&path).with_context(|| path.clone())?)?;
        // USER_HZ: 100 on Linux whatever the kernel's HZ.
        Ok(ticks as f64 / 100.0)
    }

    /// (VmRSS, VmHWM) in kB.
    fn memory_kb(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.child.id());
        perf::memory_kb(&std::fs::read_to_string(&path).with_context(|| path.clone())?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `dig +short` answer lines, sorted.
fn dig(port: u16, name: &str, qtype: &str) -> Result<Vec<String>> {
    let out = run_bounded(
        Command::new("dig").args([
            "+short",
            "+time=1",
            "+tries=1",
            "-p",
            &port.to_string(),
            "@127.0.0.1",
            name,
            qtype,
        ]),
        Duration::from_secs(5),
    )
    .map_err(anyhow::Error::msg)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.starts_with(";;") {
        bail!("dig {name} {qtype} on port {port}: {}", text.trim());
    }
    let mut v: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    v.sort();
    Ok(v)
}

/// Runs dnsperf (bounded, pinned, `nice`), its output to `out`; returns the output.
fn dnsperf(
    nice: i32,
    cpus: &str,
    port: u16,
    args: &[String],
    out: &Path,
    limit: Duration,
) -> Result<String> {
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = Command::new("nice")
        .args(["-n", &nice.to_string(), "taskset", "-c", cpus])
        .args(["dnsperf", "-s", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("starting dnsperf")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dnsperf {args:?}: no exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(out)?;
    ensure!(
        status.success(),
        "dnsperf {args:?}: {status}: {}",
        text.trim()
    );
    Ok(text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    Ours,
    Unbound,
    Knot,
}

impl Server {
    fn parse(s: &str) -> Result<Server> {
        Ok(match s {
            "cluster-dns" => Server::Ours,
            "unbound" => Server::Unbound,
            "knot" => Server::Knot,
            other => bail!("unknown server {other:?} (cluster-dns, unbound, knot)"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Server::Ours => "cluster-dns",
            Server::Unbound => "Unbound",
            Server::Knot => "Knot",
        }
    }

    fn serves(self, m: &Mix) -> bool {
        self != Server::Knot || m.in_zone
    }
}

/// One measurement of one server on one mix.
#[derive(Debug, Clone)]
struct Sample {
    qps: f64,
    /// Server CPU during the throughput run (1.0: one CPU busy).
    cpu: f64,
    /// Server CPU time per answered query, µs.
    us_per_query: f64,
    lost: f64,
    p50: f64,
    p99: f64,
}

/// What one N produced: samples per (mix, server), memory per server (VmRSS, VmHWM kB).
#[derive(Debug, Default)]
struct Results {
    /// Our server's in-process handling per in-zone mix, µs per query.
    in_process: Vec<(&'static str, f64)>,
    samples: BTreeMap<(&'static str, Server), Vec<Sample>>,
    memory: BTreeMap<Server, Vec<(u64, u64)>>,
    names: usize,
}

struct Bench<'a> {
    a: &'a Args,
    dir: PathBuf,
    upstream_port: u16,
}

/// What one N needs: its directory (data files, zone files), records, mixes and the answer
/// code of every query.
struct Generated {
    n: usize,
    dir: PathBuf,
    records: Vec<zone::Record>,
    /// (domain, zone file) for Knot.
    zones: Vec<(String, String)>,
    mixes: Vec<Mix>,
    expect: Expect,
}

impl Bench<'_> {
    /// Starts `server` on `port`; returns it once it answers the spot checks.
    fn start(&self, server: Server, g: &Generated, port: u16) -> Result<Proc> {
        let a = self.a;
        let tag = server_file(server);
        let conf = g.dir.join(format!("{tag}.conf"));
        let cmd: Vec<String> = match server {
            Server::Ours => vec![
                std::env::current_exe()?.display().to_string(),
                "serve".into(),
                "--services".into(),
                g.n.to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--upstream".into(),
                format!("127.0.0.1:{}", self.upstream_port),
                "--threads".into(),
                a.threads.to_string(),
            ],
            Server::Unbound => {
                let dir = path(&g.dir);
                let c = zone::UnboundConf {
                    dir: &dir,
                    port,
                    upstream_port: self.upstream_port,
                    threads: a.threads,
                };
                write_file(&conf, &zone::unbound_conf(&c, &g.records))?;
                strings(&["unbound", "-d", "-c", &path(&conf)])
            }
            Server::Knot => {
                let rundir = g.dir.join("knot");
                std::fs::create_dir_all(&rundir)?;
                write_file(
                    &conf,
                    &zone::knot_conf(&path(&rundir), port, a.threads, &g.zones),
                )?;
                strings(&["knotd", "-c", &path(&conf)])
            }
        };
        let mut p = Proc::spawn(
            server.label(),
            a.nice,
            &a.server_cpus,
            &cmd,
            &g.dir.join(format!("{tag}.log")),
        )?;
        let checks = zone::spot_checks(g.n);
        let (first, t, want) = checks.first().context("no spot checks")?;
        let t0 = Instant::now();
        let ready = wait_for(Duration::from_secs(60), || {
            if p.check_alive().is_err() {
                return Some(false);
            }
            dig(port, first, t).ok().filter(|v| v == want).map(|_| true)
        });
        p.check_alive()?;
        if ready != Some(true) {
            bail!(
                "{} did not answer {first} {t} with {want:?} within 60 s: {}",
                server.label(),
                p.log_tail()
            );
        }
        eprintln!("  {} ready in {:?}", server.label(), t0.elapsed());
        for (name, t, want) in &checks {
            let got = dig(port, name, t)?;
            ensure!(
                &got == want,
                "{} answers {name} {t} with {got:?}, not {want:?}",
                server.label()
            );
        }
        Ok(p)
    }

    /// Warms `server`'s cache: every external name once, at a modest rate, all answered.
    fn warm(&self, server: Server, g: &Generated, port: u16) -> Result<()> {
        let a = self.a;
        let out = dnsperf(
            a.nice,
            &a.client_cpus,
            port,
            &strings(&[
                "-d",
                &path(&g.dir.join("external.txt")),
                "-n",
                "1",
                "-Q",
                "5000",
                "-t",
                "2",
                "-v",
            ]),
            &g.dir.join(format!("{}-warm.out", server_file(server))),
            Duration::from_secs(60),
        )?;
        let v = perf::verbose(&out, &g.expect)?;
        ensure!(
            v.wrong == 0 && v.timeouts == 0 && v.latencies.len() == a.external_names,
            "{}: warming the cache: {} answers, {} wrong (first {:?}), {} timeouts",
            server.label(),
            v.latencies.len(),
            v.wrong,
            v.first_wrong,
            v.timeouts
        );
        Ok(())
    }

    /// One throughput run and one latency run of `server` (process `p` on `port`) on `m`.
    fn measure(
        &self,
        server: Server,
        p: &mut Proc,
        port: u16,
        g: &Generated,
        m: &Mix,
    ) -> Result<Sample> {
        let a = self.a;
        let (n, dir, expect) = (g.n, &g.dir, &g.expect);
        let tag = server_file(server);
        let data = path(&dir.join(format!("{}.txt", m.name)));
        let cpu0 = p.cpu_seconds()?;
        let out = dnsperf(
            a.nice,
            &a.client_cpus,
            port,
            &strings(&[
                "-d",
                &data,
                "-l",
                &a.seconds.to_string(),
                "-q",
                &a.outstanding.to_string(),
                "-t",
                "2",
            ]),
            &dir.join(format!("{tag}-{}-qps.out", m.name)),
            Duration::from_secs(u64::from(a.seconds) + 30),
        )?;
        let s: Summary = perf::summary(&out)?;
        let cpu = p.cpu_seconds()? - cpu0;
        p.check_alive()?;
        let out = dnsperf(
            a.nice,
            &a.client_cpus,
            port,
            &strings(&[
                "-d",
                &data,
                "-l",
                &a.latency_seconds.to_string(),
                "-Q",
                &a.latency_qps.to_string(),
                "-t",
                "2",
                "-v",
            ]),
            &dir.join(format!("{tag}-{}-latency.out", m.name)),
            Duration::from_secs(u64::from(a.latency_seconds) + 30),
        )?;
        let v = perf::verbose(&out, expect)?;
        ensure!(
            v.wrong == 0,
            "{} {}: {} answers with the wrong code, the first: {:?}",
            server.label(),
            m.name,
            v.wrong,
            v.first_wrong
        );
        let sample = Sample {
            qps: s.qps,
            cpu: cpu / f64::from(a.seconds),
            us_per_query: cpu * 1e6 / s.completed.max(1) as f64,
            lost: if s.sent > 0 {
                s.lost as f64 / s.sent as f64
            } else {
                0.0
            },
            p50: v.percentile(0.5).context("no latencies")?,
            p99: v.percentile(0.99).context("no latencies")?,
        };
        eprintln!(
            "  {} {n} {}: {:.0} qps (CPU {:.0}%, {:.1} µs/query, lost {}, avg {:.3} ms), p50 {:.3} ms p99 {:.3} ms at {} qps ({} timeouts)",
            server.label(),
            m.name,
            s.qps,
            sample.cpu * 100.0,
            sample.us_per_query,
            s.lost,
            s.avg_latency * 1e3,
            sample.p50 * 1e3,
            sample.p99 * 1e3,
            a.latency_qps,
            v.timeouts
        );
        Ok(sample)
    }

    /// Generates everything for `n` Services and measures every server `rounds` times.
    fn run_n(&self, n: usize, servers: &[Server]) -> Result<(Vec<Mix>, Results)> {
        let a = self.a;
        let dir = self.dir.join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let objs = zone::objects(n);
        let records = zone::records(&objs);
        let mixes = zone::mixes(n, a.external_names);
        let mut expect = Expect::new();
        for m in &mixes {
            write_file(&dir.join(format!("{}.txt", m.name)), &m.datafile())?;
            for q in &m.queries {
                expect.insert((q.name.clone(), q.qtype.to_string()), q.expect);
            }
        }
        let mut zones = Vec::new();
        for (domain, text) in zone::knot_zones(&records).map_err(anyhow::Error::msg)? {
            let file = dir.join(format!("{domain}.zone"));
            write_file(&file, &text)?;
            zones.push((domain, path(&file)));
        }
        let names = records
            .iter()
            .map(|r| &r.0)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        eprintln!("{n} Services: {} records on {names} names", records.len());
        let g = Generated {
            n,
            dir,
            records,
            zones,
            mixes,
            expect,
        };
        let in_process = in_process(n, &g.mixes, &a.server_cpus, if a.quick { 0.5 } else { 2.0 })?;
        eprintln!("  cluster-dns in-process handling (µs/query): {in_process:?}");
        let mut res = Results {
            names,
            in_process,
            ..Default::default()
        };
        // Every server runs from here to the end, each on its own port, and they are measured
        // one after the other: interleaved per mix and round (the order reversed every other
        // round), so that a change in the machine's background load hits all of them alike.
        let mut procs = Vec::new();
        for &s in servers {
            check_stop()?;
            let port = free_port();
            let p = self.start(s, &g, port)?;
            if s != Server::Knot {
                self.warm(s, &g, port)?;
            }
            procs.push((s, p, port));
        }
        for m in &g.mixes {
            for round in 0..a.rounds {
                let mut order: Vec<usize> = (0..procs.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let (s, p, port) = &mut procs[i];
                    if !s.serves(m) {
                        continue;
                    }
                    check_stop()?;
                    eprintln!(
                        "{n} Services, {}, round {}/{}: {}",
                        m.name,
                        round + 1,
                        a.rounds,
                        s.label()
                    );
                    let sample = self.measure(*s, p, *port, &g, m)?;
                    res.samples.entry((m.name, *s)).or_default().push(sample);
                }
            }
        }
        for (s, p, _) in procs {
            let mem = p.memory_kb()?;
            eprintln!(
                "  {} {n}: VmRSS {:.1} MB, VmHWM {:.1} MB",
                s.label(),
                mem.0 as f64 / 1024.0,
                mem.1 as f64 / 1024.0
            );
            res.memory.entry(s).or_default().push(mem);
            drop(p);
        }
        Ok((g.mixes, res))
    }
}

fn server_file(s: Server) -> &'static str {
    match s {
        Server::Ours => "cluster-dns",
        Server::Unbound => "unbound",
        Server::Knot => "knot",
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn ms(s: f64) -> String {
    format!("{:.3}", s * 1e3)
}

fn ratio(ours: Option<f64>, base: Option<f64>) -> String {
    match (ours, base) {
        (Some(o), Some(b)) if b > 0.0 => format!("{:.2}x", o / b),
        _ => "-".into(),
    }
}

/// Medians over rounds (the largest loss).
fn agg(v: Option<&Vec<Sample>>) -> Option<Sample> {
    let v = v?;
    let med = |f: fn(&Sample) -> f64| perf::median(&v.iter().map(f).collect::<Vec<_>>());
    Some(Sample {
        qps: med(|s| s.qps)?,
        cpu: med(|s| s.cpu)?,
        us_per_query: med(|s| s.us_per_query)?,
        p50: med(|s| s.p50)?,
        p99: med(|s| s.p99)?,
        lost: v.iter().map(|s| s.lost).fold(0.0, f64::max),
    })
}

/// Whether a target holds, as the table's last column.
fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

fn report(a: &Args, servers: &[Server], all: &[(usize, Vec<Mix>, Results)]) -> String {
    let mut r = String::from("# Cluster DNS benchmark\n\n");
    let _ = writeln!(
        r,
        "dnsperf 2.10 over UDP on 127.0.0.1. Servers pinned to CPU {}, dnsperf and the upstream to CPU {}, {} thread(s) per server, \
nice {}. **QPS**: dnsperf as fast as it goes for {} s, {} queries outstanding; **server CPU**: the server's CPU time in that run \
(100% = one CPU: below that, dnsperf was the limit) and per answered query; **p50 / p99**: of every answer of a {} s `dnsperf -v` \
run at a fixed {} q/s (every answer code checked). Medians of {} round(s); the servers run side by side, idle but the one measured. **RSS**: VmRSS at the end / VmHWM. \
Knot is authoritative only: in-zone mixes only.\n",
        a.server_cpus,
        a.client_cpus,
        a.threads,
        a.nice,
        a.seconds,
        a.outstanding,
        a.latency_seconds,
        a.latency_qps,
        a.rounds
    );
    for (n, mixes, res) in all {
        let _ = writeln!(
            r,
            "## {n} Services ({} names)\n\n| mix · server | QPS (q/s) | server CPU | CPU per query (µs) | p50 / p99 (ms) | lost | QPS vs Unbound | QPS vs Knot | CPU per query vs Unbound / Knot | p99 vs Unbound |\n|---|---|---|---|---|---|---|---|---|---|",
            res.names
        );
        for m in mixes {
            let u = agg(res.samples.get(&(m.name, Server::Unbound)));
            let k = agg(res.samples.get(&(m.name, Server::Knot))).filter(|_| m.in_zone);
            for &s in servers.iter().filter(|s| s.serves(m)) {
                let Some(x) = agg(res.samples.get(&(m.name, s))) else {
                    continue;
                };
                let name = if s == Server::Ours {
                    format!("**{} · {}**", m.name, s.label())
                } else {
                    format!("{} · {}", m.name, s.label())
                };
                let _ = writeln!(
                    r,
                    "| {name} | {:.0} | {:.0}% | {:.1} | {} / {} | {:.2}% | {} | {} | {} / {} | {} |",
                    x.qps,
                    x.cpu * 100.0,
                    x.us_per_query,
                    ms(x.p50),
                    ms(x.p99),
                    x.lost * 100.0,
                    ratio(Some(x.qps), u.as_ref().map(|b| b.qps)),
                    ratio(Some(x.qps), k.as_ref().map(|b| b.qps)),
                    ratio(Some(x.us_per_query), u.as_ref().map(|b| b.us_per_query)),
                    ratio(Some(x.us_per_query), k.as_ref().map(|b| b.us_per_query)),
                    ratio(Some(x.p99), u.as_ref().map(|b| b.p99)),
                );
            }
        }
        if !res.in_process.is_empty() {
            let _ = writeln!(
                r,
                "\ncluster-dns's own work per query, in-process without sockets (as a UDP task: a kept answer patched for the asker, else `Shared::handle_local`: parse, look up, encode), \
against its CPU per query above (the rest: system calls, the kernel's UDP path, the runtime):\n\n| mix | in-process (µs per query) | share of CPU per query |\n|---|---|---|"
            );
            for (mix, us) in &res.in_process {
                let total = agg(res.samples.get(&(*mix, Server::Ours))).map(|x| x.us_per_query);
                let _ = writeln!(
                    r,
                    "| {mix} | {us:.2} | {} |",
                    total.map_or("-".into(), |t| format!("{:.0}%", us / t * 100.0))
                );
            }
        }
        let _ = writeln!(
            r,
            "\n| server | RSS (MB) | peak RSS, VmHWM (MB) |\n|---|---|---|"
        );
        for s in servers {
            if let Some(v) = res.memory.get(s) {
                let last = v.last().map_or(0, |m| m.0);
                let peak = v.iter().map(|m| m.1).max().unwrap_or(0);
                let _ = writeln!(
                    r,
                    "| {} | {:.1} | {:.1} |",
                    s.label(),
                    last as f64 / 1024.0,
                    peak as f64 / 1024.0
                );
            }
        }
        r.push('\n');
    }
    // The targets, at the largest N.
    if let Some((n, mixes, res)) = all.iter().max_by_key(|x| x.0) {
        let mut vs_u: Vec<(f64, f64, &str)> = Vec::new();
        let mut vs_k: Vec<(f64, &str)> = Vec::new();
        for m in mixes {
            let ours = agg(res.samples.get(&(m.name, Server::Ours)));
            let u = agg(res.samples.get(&(m.name, Server::Unbound)));
            let k = agg(res.samples.get(&(m.name, Server::Knot)));
            if let (Some(o), Some(u)) = (&ours, u) {
                vs_u.push((o.qps / u.qps, o.p99 / u.p99, m.name));
            }
            if let (Some(o), Some(k), true) = (&ours, k, m.in_zone) {
                vs_k.push((o.qps / k.qps, m.name));
            }
        }
        let _ = writeln!(
            r,
            "## Targets at {n} Services\n\n| target | measured | met |\n|---|---|---|"
        );
        if let Some(w) = vs_u.iter().min_by(|x, y| x.0.total_cmp(&y.0)) {
            let _ = writeln!(
                r,
                "| QPS ≥ 1.0× Unbound's, every mix | lowest {:.2}x ({}) | {} |",
                w.0,
                w.2,
                yes(w.0 >= 1.0)
            );
        }
        if let Some(w) = vs_k.iter().min_by(|x, y| x.0.total_cmp(&y.0)) {
            let _ = writeln!(
                r,
                "| QPS ≥ 0.5× Knot's, in-zone mixes | lowest {:.2}x ({}) | {} |",
                w.0,
                w.1,
                yes(w.0 >= 0.5)
            );
        }
        if let Some(w) = vs_u.iter().max_by(|x, y| x.1.total_cmp(&y.1)) {
            let _ = writeln!(
                r,
                "| p99 no worse than Unbound's, every mix | highest {:.2}x ({}) | {} |",
                w.1,
                w.2,
                yes(w.1 <= 1.0)
            );
        }
        if let Some(v) = res.memory.get(&Server::Ours) {
            let peak = v.iter().map(|m| m.1).max().unwrap_or(0) as f64 / 1024.0;
            let _ = writeln!(
                r,
                "| RSS < 50 MB | peak {peak:.1} MB | {} |",
                yes(peak < 50.0)
            );
        }
        r.push('\n');
    }
    let _ = writeln!(r, "Query mixes:\n");
    if let Some((_, mixes, _)) = all.first() {
        for m in mixes {
            let _ = writeln!(r, "- `{}`: {}", m.name, m.what);
        }
    }
    r
}

fn main() -> Result<()> {
    let mut a = <Args as clap::Parser>::parse();
    if let Some(Sub::Serve(s)) = &a.serve {
        return serve(s);
    }
    if a.quick {
        a.seconds = 2;
        a.latency_seconds = 1;
        a.rounds = 1;
    }
    ensure!(
        a.rounds >= 1 && a.seconds >= 1 && a.latency_seconds >= 1,
        "rounds and seconds must be at least 1"
    );
    ensure!(
        a.services
            .iter()
            .all(|n| (1..=zone::MAX_SERVICES).contains(n)),
        "--services: 1 to {} each",
        zone::MAX_SERVICES
    );
    ensure!(a.external_names >= 1, "--external-names: at least 1");
    let servers = a
        .servers
        .iter()
        .map(|s| Server::parse(s))
        .collect::<Result<Vec<_>>>()?;
    for p in ["dnsperf", "unbound", "knotd", "dig", "taskset"] {
        ensure!(
            find_program(p).is_some(),
            "{p} not found (Debian: dnsperf unbound knot bind9-dnsutils util-linux; deploy/install-deps.sh)"
        );
    }
    common::on_signals()?;
    let tmp = tempfile::Builder::new().prefix("dns-bench.").tempdir()?;
    let dir = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    // The upstream: Knot, authoritative for the external names of the largest N.
    let max_n = a.services.iter().copied().max().unwrap_or(0);
    let up_dir = dir.join("upstream");
    std::fs::create_dir_all(&up_dir)?;
    let up_zone = up_dir.join(format!("{}.zone", zone::EXTERNAL));
    write_file(&up_zone, &zone::external_zone(max_n, a.external_names))?;
    let upstream_port = free_port();
    write_file(
        &up_dir.join("knot.conf"),
        &zone::knot_conf(
            &path(&up_dir),
            upstream_port,
            1,
            &[(zone::EXTERNAL.into(), path(&up_zone))],
        ),
    )?;
    let upstream = Proc::spawn(
        "upstream knotd",
        0,
        &a.client_cpus,
        &strings(&["knotd", "-c", &path(&up_dir.join("knot.conf"))]),
        &up_dir.join("knot.log"),
    )?;
    let probe = zone::external_host(0);
    if wait_for(Duration::from_secs(30), || {
        dig(upstream_port, &probe, "A")
            .ok()
            .filter(|v| !v.is_empty())
    })
    .is_none()
    {
        bail!(
            "the upstream knotd does not answer: {}",
            upstream.log_tail()
        );
    }
    let bench = Bench {
        a: &a,
        dir: dir.clone(),
        upstream_port,
    };
    let mut all = Vec::new();
    for &n in &a.services {
        let (mixes, res) = bench.run_n(n, &servers)?;
        all.push((n, mixes, res));
    }
    drop(upstream);
    let r = report(&a, &servers, &all);
    print!("{r}");
    write_file(&a.out, &r)?;
    Ok(())
}
