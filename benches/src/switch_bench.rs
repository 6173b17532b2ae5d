//! Live backend switch interruption: how long pod traffic goes undelivered while flanneld
//! switches backend, per switch type.
//!
//! Three namespace nodes run flanneld (defaults, `--ip-masq` off) against etcd in the hub; one
//! pod per node. A probe sends a numbered UDP datagram every millisecond from the pod on node 0
//! to the pod on node 1 and back. For every ordered pair of backends (vxlan → udp → host-gw →
//! vxlan → host-gw → udp → vxlan) the network config is rewritten in etcd, and the window from
//! the write until the old backend is gone from every node (devices, routes) plus one second is
//! scored: the longest time without a delivered datagram (ms, less the 1 ms pacing) in either
//! direction, and the datagrams lost. The same window length with no switch at all is measured
//! first as the baseline (scheduling jitter on this machine). After each cycle, on the last
//! backend: node 0's daemon is restarted (SIGTERM, then SIGKILL; window until the new run has
//! listed its peers + 1 s) and its lease key is deleted (window until node 0 holds it again +
//! 3 s, beyond the peers' 2 s removal grace). `--rounds N` repeats the whole
//! cycle; the table shows medians and the worst round. Needs root, etcd and a release build of
//! flanneld next to this binary (`cargo build --release -p flanneld`).

#[path = "common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use test_support::probe::{window, Probe, Score};
use test_support::{wait_for, Testbed};

use common::{check_stop, flanneld_bin, write_file};

const PROBE_PORT: u16 = 5011;
const INTERVAL: Duration = Duration::from_millis(1);
const NODES: usize = 3;
const SUBNETS: [&str; NODES] = ["10.5.1.0/24", "10.5.2.0/24", "10.5.3.0/24"];
/// The switch cycle: every ordered pair of the three data-plane backends once.
const CYCLE: [&str; 7] = [
    "vxlan", "udp", "host-gw", "vxlan", "host-gw", "udp", "vxlan",
];

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{backend}"}}}}"#)
}

fn etcdctl(tb: &Testbed, args: &[&str]) -> Result<String> {
    tb.etcd
        .as_ref()
        .context("etcd")?
        .etcdctl(args)
        .map_err(anyhow::Error::msg)
}

/// Every node's lease advertises `backend`.
fn all_leases_are(tb: &Testbed, backend: &str) -> bool {
    SUBNETS.iter().all(|s| {
        let key = format!("/coreos.com/network/subnets/{}", s.replace('/', "-"));
        etcdctl(tb, &["get", &key, "--print-value-only"])
            .ok()
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v.trim()).ok())
            .is_some_and(|j| j["BackendType"] == backend)
    })
}

/// Whether node `n` still holds a device or route of `backend`.
fn holds(tb: &Testbed, n: usize, backend: &str) -> bool {
    let ns = &tb.nodes[n].ns;
    match backend {
        "vxlan" | "udp" => {
            let dev = if backend == "vxlan" {
                "flannel.1"
            } else {
                "flannel0"
            };
            tb.exec(ns, &["ip", "-o", "link", "show"])
                .map_or(true, |l| l.contains(dev))
        }
        _ => tb
            .exec(ns, &["ip", "-4", "route", "show", "dev", "eth0"])
            .map_or(true, |r| {
                r.lines()
                    .any(|l| l.starts_with("10.5.") && l.contains(" via "))
            }),
    }
}

fn log_file(dir: &Path, n: usize, run: u32) -> PathBuf {
    dir.join(format!("n{n}-{run}.log"))
}

/// Per switch (or "none" for the baseline), one Score per round: the worse direction's gap,
/// both directions' losses added.
type Results = Vec<(String, Vec<Score>)>;

fn record(results: &mut Results, name: &str, s: Score) {
    match results.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => v.push(s),
        None => results.push((name.to_string(), vec![s])),
    }
}

fn run(rounds: u32) -> Result<Results> {
    let bin = flanneld_bin()?;
    let mut tb = Testbed::new(NODES).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let endpoint = tb.start_etcd();
    etcdctl(
        &tb,
        &["put", "/coreos.com/network/config", &config(CYCLE[0])],
    )?;
    // Reserved subnets (keys without TTL) so the pods' addresses are known upfront.
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
        let value = format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, tb.nodes[n].ip);
        etcdctl(&tb, &["put", &key, &value])?;
    }
    let bin = bin.to_str().context("path")?.to_string();
    // Starts node n's daemon, run `run` (its own log file); returns the testbed handle.
    let start = |tb: &mut Testbed, n: usize, run: u32| -> Result<usize> {
        let ns = tb.nodes[n].ns.clone();
        let env = dir.path().join(format!("n{n}.env"));
        tb.spawn(
            &ns,
            &bin,
            &[
                "--etcd-endpoints",
                &endpoint,
                "--subnet-file",
                env.to_str().context("path")?,
                // No pods are attached through the CNI plugin here: publishing off.
                "--cni-data-dir=",
            ],
            &[("RUST_LOG", "info")],
            &log_file(dir.path(), n, run),
        )
        .map_err(anyhow::Error::msg)
    };
    let mut handles = Vec::new();
    for n in 0..NODES {
        handles.push(start(&mut tb, n, 0)?);
    }
    wait_for(Duration::from_secs(30), || {
        all_leases_are(&tb, CYCLE[0]).then_some(())
    })
    .context("flanneld did not publish its leases in 30 s")?;
    let mut pods = Vec::new();
    for (n, subnet) in SUBNETS.iter().enumerate().take(2) {
        let base = subnet.trim_end_matches(".0/24");
        // The smallest MTU of the three backends, so the pods work on every one.
        pods.push(
            tb.add_pod(n, &format!("{base}.2/24"), &format!("{base}.1/24"), 1450)
                .map_err(anyhow::Error::msg)?,
        );
    }
    wait_for(Duration::from_secs(30), || {
        tb.exec_status(
            &pods[0].ns,
            &["ping", "-c1", "-W1", &pods[1].ip],
            Duration::from_secs(3),
        )
        .0
        .then_some(())
    })
    .context("pods cannot reach each other")?;

    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let probes = vec![
        Probe::start(
            &pods[0],
            &pods[1],
            PROBE_PORT,
            INTERVAL,
            epoch,
            stop.clone(),
        )
        .map_err(anyhow::Error::msg)?,
        Probe::start(&pods[1], &pods[0], PROBE_PORT, INTERVAL, epoch, stop)
            .map_err(anyhow::Error::msg)?,
    ];
    std::thread::sleep(Duration::from_secs(1));
    let mut results: Results = Vec::new();
    let mut runs = 0;
    let outcome = (|| -> Result<()> {
        for r in 1..=rounds {
            let mut lengths = Vec::new();
            for pair in CYCLE.windows(2) {
                check_stop()?;
                let (old, new) = (pair[0], pair[1]);
                let t0 = Instant::now();
                let s = window(&probes, || -> Result<()> {
                    etcdctl(&tb, &["put", "/coreos.com/network/config", &config(new)])?;
                    wait_for(Duration::from_secs(30), || {
                        all_leases_are(&tb, new).then_some(())
                    })
                    .with_context(|| format!("{old} -> {new}: leases did not switch in 30 s"))?;
                    wait_for(Duration::from_secs(30), || {
                        (0..NODES).all(|n| !holds(&tb, n, old)).then_some(())
                    })
                    .with_context(|| format!("{old} -> {new}: {old} not torn down in 30 s"))?;
                    std::thread::sleep(Duration::from_secs(1));
                    Ok(())
                })?;
                lengths.push(t0.elapsed());
                eprintln!(
                    "round {r}/{rounds}: {old} -> {new}: gap {:.1} ms, {} lost ({:.1} s window)",
                    s.gap_ms,
                    s.lost,
                    t0.elapsed().as_secs_f64()
                );
                record(&mut results, &format!("{old} -> {new}"), s);
            }
            // Restarts of node 0's daemon and the loss of its lease, on the last backend of
            // the cycle: nothing programmed may go missing meanwhile.
            for (what, kind) in [
                ("restart, SIGTERM", 0),
                ("restart, SIGKILL", 1),
                ("lease deleted, re-acquired", 2),
            ] {
                check_stop()?;
                let t0 = Instant::now();
                let s = window(&probes, || -> Result<()> {
                    if kind == 2 {
                        let key = format!(
                            "/coreos.com/network/subnets/{}",
                            SUBNETS[0].replace('/', "-")
                        );
                        etcdctl(&tb, &["del", &key])?;
                        // Re-created by node 0, then the peers' removal grace and a second.
                        wait_for(Duration::from_secs(30), || {
                            etcdctl(&tb, &["get", &key, "--print-value-only"])
                                .ok()
                                .filter(|v| v.contains(&tb.nodes[0].ip))
                        })
                        .context("node 0 did not re-acquire its lease in 30 s")?;
                        std::thread::sleep(Duration::from_secs(3));
                        return Ok(());
                    }
                    if kind == 1 {
                        tb.kill(handles[0]);
                    } else {
                        tb.stop(handles[0], Duration::from_secs(10));
                    }
                    runs += 1;
                    handles[0] = start(&mut tb, 0, runs)?;
                    wait_for(Duration::from_secs(30), || {
                        std::fs::read_to_string(log_file(dir.path(), 0, runs))
                            .ok()
                            .filter(|l| l.contains("peer leases listed"))
                    })
                    .context("restarted node 0 did not list its peers in 30 s")?;
                    std::thread::sleep(Duration::from_secs(1));
                    Ok(())
                })?;
                lengths.push(t0.elapsed());
                eprintln!(
                    "round {r}/{rounds}: {what}: gap {:.1} ms, {} lost ({:.1} s window)",
                    s.gap_ms,
                    s.lost,
                    t0.elapsed().as_secs_f64()
                );
                record(
                    &mut results,
                    &format!("{what} ({})", CYCLE[CYCLE.len() - 1]),
                    s,
                );
            }
            // The baseline: a window as long as the longest switch's, nothing switching.
            check_stop()?;
            let longest = lengths
                .iter()
                .max()
                .copied()
                .unwrap_or(Duration::from_secs(5));
            let s = window(&probes, || -> Result<()> {
                std::thread::sleep(longest);
                Ok(())
            })?;
            eprintln!(
                "round {r}/{rounds}: no switch: gap {:.1} ms, {} lost",
                s.gap_ms, s.lost
            );
            record(&mut results, "none (baseline)", s);
        }
        Ok(())
    })();
    drop(probes);
    outcome?;
    Ok(results)
}

fn render(results: &Results, rounds: u32) -> String {
    let mut t = format!(
        "Live backend switch, 3 namespace nodes, UDP probes every 1 ms pod to pod in both \
         directions, {rounds} round(s); window = config write until the old backend is gone \
         everywhere + 1 s; restart: until the new daemon has listed its peers + 1 s; lease \
         deleted: until re-acquired + 3 s.\n\n\
         | switch | longest gap without delivery, median (ms) | worst round (ms) | datagrams lost, median | worst round |\n\
         |---|---|---|---|---|\n"
    );
    for (name, v) in results {
        let gaps: Vec<f64> = v.iter().map(|s| s.gap_ms).collect();
        let lost: Vec<f64> = v.iter().map(|s| s.lost as f64).collect();
        t.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.0} |\n",
            median(gaps.clone()),
            gaps.iter().copied().fold(0.0, f64::max),
            median(lost.clone()),
            lost.iter().copied().fold(0.0, f64::max),
        ));
    }
    t
}

/// Live backend switch, restart and lease re-acquire interruption: longest gap and datagrams
/// lost of a 1 kHz probe stream between pods on 3 namespace nodes (root).
#[derive(Debug, clap::Parser)]
#[command(name = "switch-bench")]
struct Cli {
    /// Rounds of every switch.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// The markdown table.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<(u32, Option<PathBuf>)> {
    let cli = <Cli as clap::Parser>::try_parse_from(
        std::iter::once("switch-bench".to_string()).chain(args),
    )
    .map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => e.exit(),
        _ => anyhow::anyhow!("{e}"),
    })?;
    Ok((cli.rounds, cli.out))
}

fn main() -> Result<()> {
    let (rounds, out) = parse_args(std::env::args().skip(1))?;
    if !test_support::is_root() {
        bail!("needs root (network namespaces)");
    }
    common::on_signals()?;
    let results = run(rounds)?;
    let table = render(&results, rounds);
    print!("{table}");
    if let Some(out) = out {
        write_file(&out, &table)?;
        eprintln!("table written to {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_arguments() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        let a = |l: &[&str]| parse_args(l.iter().map(|s| s.to_string()));
        assert_eq!(a(&[]).unwrap(), (3, None));
        assert_eq!(
            a(&["--rounds", "2", "--out", "x.md"]).unwrap(),
            (2, Some(PathBuf::from("x.md")))
        );
        assert!(a(&["--rounds", "0"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--rounds"])
            .unwrap_err()
            .to_string()
            .contains("a value is required"));
    }
}
