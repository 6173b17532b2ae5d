//! Pod-to-pod throughput and latency across two namespace "nodes", in one run, for:
//! - plain routes via the peer node (no encapsulation): the baseline;
//! - kernel VXLAN programmed by hand exactly as flannel's backend programs it;
//! - our flanneld with `Backend.Type: vxlan` (optionally with forward rules off);
//! - our flanneld with `Backend.Type: udp` (userspace TUN + UDP with offloads).
//!
//! etcd runs in the hub in all three setups (it is part of the cluster, not of the data plane).
//! Rounds alternate the three setups (default 3 rounds, `--rounds N`, `--seconds S` per iperf3
//! run); each figure is the median over rounds. Needs root, iperf3, etcd, and a release build of
//! flanneld next to this binary (`cargo build --release -p flanneld`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use test_support::{wait_for, Pod, Testbed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Plain,
    HandVxlan,
    Flanneld,
    FlanneldNoRules,
    FlanneldUdp,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "plain routes via the peer (baseline)",
            Setup::HandVxlan => "kernel VXLAN programmed by hand",
            Setup::Flanneld => "flanneld vxlan backend (default host rules)",
            Setup::FlanneldNoRules => "flanneld vxlan backend, --iptables-forward-rules=false",
            Setup::FlanneldUdp => "flanneld udp backend (userspace, offloads on)",
        }
    }
}

const SUBNETS: [&str; 2] = ["10.5.1.0/24", "10.5.2.0/24"];

fn ip(tb: &Testbed, node: usize, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    tb.exec(&tb.nodes[node].ns, &full)
        .map(|_| ())
        .map_err(anyhow::Error::msg)
}

fn mac_of(tb: &Testbed, node: usize) -> Result<String> {
    let out = tb
        .exec(
            &tb.nodes[node].ns,
            &["cat", "/sys/class/net/flannel.1/address"],
        )
        .map_err(anyhow::Error::msg)?;
    Ok(out.trim().to_string())
}

/// Programs node `n` like flannel's vxlan backend would, by hand with iproute2.
fn hand_vxlan(tb: &Testbed) -> Result<()> {
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let local = tb.nodes[n].ip.clone();
        ip(
            tb,
            n,
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        ip(tb, n, &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
        let own = subnet.replace(".0/24", ".0/32");
        ip(tb, n, &["addr", "add", &own, "dev", "flannel.1"])?;
    }
    for n in 0..2 {
        let p = 1 - n;
        let peer_mac = mac_of(tb, p)?;
        let peer_gw = SUBNETS[p].replace(".0/24", ".0");
        ip(
            tb,
            n,
            &[
                "neigh",
                "replace",
                &peer_gw,
                "lladdr",
                &peer_mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        tb.exec(
            &tb.nodes[n].ns,
            &[
                "bridge",
                "fdb",
                "append",
                &peer_mac,
                "dev",
                "flannel.1",
                "dst",
                &tb.nodes[p].ip,
                "self",
                "permanent",
            ],
        )
        .map_err(anyhow::Error::msg)?;
        ip(
            tb,
            n,
            &[
                "route",
                "add",
                SUBNETS[p],
                "via",
                &peer_gw,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
    }
    Ok(())
}

fn plain_routes(tb: &Testbed) -> Result<()> {
    for n in 0..2 {
        let p = 1 - n;
        let via = tb.nodes[p].ip.clone();
        ip(tb, n, &["route", "add", SUBNETS[p], "via", &via])?;
    }
    Ok(())
}

fn flanneld_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory for this binary")?
        .join("flanneld");
    if !bin.is_file() {
        bail!(
            "{} missing: run `cargo build --release -p flanneld` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn run_flanneld(
    tb: &mut Testbed,
    dir: &std::path::Path,
    endpoint: &str,
    forward_rules: bool,
    backend: &str,
) -> Result<()> {
    let bin = flanneld_bin()?;
    // Reserve each node's subnet (keys without TTL) so the pods' addresses are known upfront.
    let etcd = tb.etcd.as_ref().context("etcd")?;
    etcd.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        &format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{backend}"}}}}"#),
    ])
    .map_err(anyhow::Error::msg)?;
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
        let value = format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, tb.nodes[n].ip);

        etcd.etcdctl(&["put", &key, &value])
            .map_err(anyhow::Error::msg)?;
    }
    for n in 0..2 {
        let ns = tb.nodes[n].ns.clone();
        let env = dir.join(format!("n{n}.env"));
        tb.spawn(
            &ns,
            bin.to_str().context("path")?,
            &[
                "--etcd-endpoints",
                endpoint,
                "--subnet-file",
                env.to_str().context("path")?,
                if forward_rules {
                    "--iptables-forward-rules=true"
                } else {
                    "--iptables-forward-rules=false"
                },
            ],
            &[("RUST_LOG", "warn")],
            &dir.join(format!("n{n}.log")),
        )
        .map_err(anyhow::Error::msg)?;
    }
    // vxlan: a route per peer on flannel.1; udp: the Network route on flannel0 (the peer table
    // lives in the daemon, so the pods' ping in `one` confirms it).
    let (dev, want) = if backend == "udp" {
        ("flannel0", vec!["10.5.0.0/16".to_string(); 2])
    } else {
        (
            "flannel.1",
            vec![format!("{} via", SUBNETS[1]), format!("{} via", SUBNETS[0])],
        )
    };
    for (n, want) in want.iter().enumerate() {
        wait_for(Duration::from_secs(30), || {
            tb.exec(&tb.nodes[n].ns, &["ip", "route", "show", "dev", dev])
                .ok()
                .filter(|r| r.contains(want.as_str()))
        })
        .context("flanneld did not program its routes in 30 s")?;
    }
    Ok(())
}

fn iperf(tb: &Testbed, from: &Pod, to: &Pod, seconds: u32, dir: &std::path::Path) -> Result<f64> {
    let log = dir.join("iperf3-server.log");
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", &to.ns, "iperf3", "-s", "-1"])
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut server = Guard(server);
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let (ok, out) = tb.exec_status(
        &from.ns,
        &["iperf3", "-c", &to.ip, "-t", &secs, "-J"],
        Duration::from_secs(u64::from(seconds) + 20),
    );
    let _ = server.0.wait();
    if !ok {
        bail!("iperf3 failed: {out}");
    }
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no bits_per_second in iperf3 output")
}

/// Kills the child on drop (bounded cleanup of the iperf3 server).
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ping_ms(tb: &Testbed, from: &Pod, to: &Pod) -> Result<f64> {
    let (ok, out) = tb.exec_status(
        &from.ns,
        &["ping", "-q", "-c", "50", "-i", "0.02", &to.ip],
        Duration::from_secs(20),
    );
    if !ok {
        bail!("ping failed: {out}");
    }
    // rtt min/avg/max/mdev = 0.041/0.058/0.101/0.012 ms
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .context("no rtt line")?;
    stats
        .trim()
        .split('/')
        .nth(1)
        .context("no avg")?
        .parse()
        .context("avg rtt")
}

/// Set by SIGINT/SIGTERM; checked between steps so the testbed guard always runs.
static STOP: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn one(setup: Setup, seconds: u32) -> Result<(f64, f64)> {
    check_stop()?;
    let mut tb = Testbed::new(2).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let mtu = match setup {
        Setup::Plain => 1500,
        Setup::FlanneldUdp => 1472,
        _ => 1450,
    };
    // etcd runs in every setup: it is part of the cluster whatever the data plane, and on a
    // 2-core machine its background work would otherwise count against flanneld alone.
    let endpoint = tb.start_etcd();
    match setup {
        Setup::Plain => plain_routes(&tb)?,
        Setup::HandVxlan => hand_vxlan(&tb)?,
        Setup::Flanneld => run_flanneld(&mut tb, dir.path(), &endpoint, true, "vxlan")?,
        Setup::FlanneldNoRules => run_flanneld(&mut tb, dir.path(), &endpoint, false, "vxlan")?,
        Setup::FlanneldUdp => run_flanneld(&mut tb, dir.path(), &endpoint, true, "udp")?,
    }
    let p1 = tb
        .add_pod(0, "10.5.1.2/24", "10.5.1.1/24", mtu)
        .map_err(anyhow::Error::msg)?;
    let p2 = tb
        .add_pod(1, "10.5.2.2/24", "10.5.2.1/24", mtu)
        .map_err(anyhow::Error::msg)?;
    wait_for(Duration::from_secs(10), || {
        tb.exec_status(
            &p1.ns,
            &["ping", "-c1", "-W1", &p2.ip],
            Duration::from_secs(3),
        )
        .0
        .then_some(())
    })
    .context("pods cannot reach each other")?;
    // Same settle time for every setup: let start-up work (etcd's WAL, the daemons' first
    // reconcile) finish so the figures are steady state.
    std::thread::sleep(Duration::from_secs(3));
    check_stop()?;
    let gbps = iperf(&tb, &p1, &p2, seconds, dir.path())?;
    check_stop()?;
    let rtt = ping_ms(&tb, &p1, &p2)?;
    Ok((gbps, rtt))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut rounds = 3u32;
    let mut seconds = 5u32;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--seconds" => seconds = args.next().context("--seconds S")?.parse()?,
            "--setups" => {
                only = Some(
                    args.next()
                        .context("--setups plain,hand,flanneld,norules,udp")?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            }
            other => bail!(
                "unknown argument {other} (use --rounds N --seconds S --setups plain,hand,flanneld,norules,udp)"
            ),
        }
    }
    if !test_support::is_root() {
        bail!("needs root (network namespaces)");
    }
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, STOP.clone())?;
    }
    flanneld_bin()?;
    let all = [
        ("plain", Setup::Plain),
        ("hand", Setup::HandVxlan),
        ("flanneld", Setup::Flanneld),
        ("norules", Setup::FlanneldNoRules),
        ("udp", Setup::FlanneldUdp),
    ];
    // Plain routes and hand VXLAN are the baselines the ratios need: always measured.
    let setups: Vec<Setup> = all
        .iter()
        .filter(|(name, s)| {
            matches!(s, Setup::Plain | Setup::HandVxlan)
                || only.as_ref().is_none_or(|o| o.iter().any(|x| x == name))
        })
        .map(|(_, s)| *s)
        .collect();
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); setups.len()];
    for r in 1..=rounds {
        // Reverse the order every other round so no setup always runs first or last.
        let mut order: Vec<usize> = (0..setups.len()).collect();
        if r % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let s = setups[i];
            eprintln!("round {r}/{rounds}: {}", s.name());
            let (g, l) = one(s, seconds)?;
            eprintln!("  {g:.2} Gbit/s, {l:.3} ms");
            results[i].0.push(g);
            results[i].1.push(l);
        }
    }
    // Ratios are medians of per-round ratios: the setups of one round ran back to back, so
    // pairing them cancels slow drift of the machine.
    let paired = |i: usize, base: usize| -> f64 {
        let mut v: Vec<f64> = results[i]
            .0
            .iter()
            .zip(&results[base].0)
            .map(|(a, b)| a / b)
            .collect();
        median(&mut v)
    };
    println!(
        "Pod-to-pod across two namespace nodes, one TCP stream (iperf3 {seconds} s), {rounds} rounds \
         (order reversed every other round); Gbit/s and RTT are medians, ratios are medians of \
         per-round ratios.\n"
    );
    println!("| path | Gbit/s | ratio to plain routes | ratio to hand VXLAN | ping RTT avg (ms) |");
    println!("|---|---|---|---|---|");
    for (i, s) in setups.iter().enumerate() {
        let g = median(&mut results[i].0.clone());
        let l = median(&mut results[i].1.clone());
        println!(
            "| {} | {g:.2} | {:.3} | {:.3} | {l:.3} |",
            s.name(),
            paired(i, 0),
            paired(i, 1)
        );
    }
    Ok(())
}
