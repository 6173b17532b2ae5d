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
//! first as the baseline (scheduling jitter on this machine). `--rounds N` repeats the whole
//! cycle; the table shows medians and the worst round. Needs root, etcd and a release build of
//! flanneld next to this binary (`cargo build --release -p flanneld`).

#[path = "common.rs"]
mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use test_support::{in_netns, wait_for, Pod, Testbed};

use common::{check_stop, flanneld_bin, write_file};

const PROBE_PORT: u16 = 5011;
const INTERVAL: Duration = Duration::from_millis(1);
const NODES: usize = 3;
const SUBNETS: [&str; NODES] = ["10.5.1.0/24", "10.5.2.0/24", "10.5.3.0/24"];
/// The switch cycle: every ordered pair of the three data-plane backends once.
const CYCLE: [&str; 7] = [
    "vxlan", "udp", "host-gw", "vxlan", "host-gw", "udp", "vxlan",
];

/// What one window scored in one direction.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    /// Longest time without a delivery, less the pacing interval (ms).
    gap_ms: f64,
    /// Datagrams sent in the window and never delivered.
    lost: u64,
}

/// Scores the datagrams numbered `first..end` from `(sequence number, arrival ms)` records:
/// the longest interval between consecutive arrivals of that window (less `interval_ms`,
/// floored at 0) and the numbers that never arrived. A window with no arrival at all scores
/// its whole length as the gap.
fn score(arrivals: &[(u64, f64)], first: u64, end: u64, interval_ms: f64) -> Score {
    let mut times: Vec<f64> = arrivals
        .iter()
        .filter(|(s, _)| (first..end).contains(s))
        .map(|(_, t)| *t)
        .collect();
    let seen: BTreeSet<u64> = arrivals
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| (first..end).contains(s))
        .collect();
    let lost = (end.saturating_sub(first)).saturating_sub(seen.len() as u64);
    times.sort_by(f64::total_cmp);
    let gap = if times.is_empty() {
        end.saturating_sub(first) as f64 * interval_ms
    } else {
        times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
    };
    Score {
        gap_ms: (gap - interval_ms).max(0.0),
        lost,
    }
}

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

/// One probe direction: a sender thread in one pod, a receiver thread in the other.
struct Probe {
    sent: Arc<AtomicU64>,
    arrivals: Arc<Mutex<Vec<(u64, f64)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(from: &Pod, to: &Pod, epoch: Instant, stop: Arc<AtomicBool>) -> Result<Probe> {
        let rx = in_netns(&to.ns, || UdpSocket::bind(("0.0.0.0", PROBE_PORT)))
            .map_err(anyhow::Error::msg)?
            .context("binding the probe receiver")?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))?;
        let tx = in_netns(&from.ns, || UdpSocket::bind(("0.0.0.0", 0)))
            .map_err(anyhow::Error::msg)?
            .context("binding the probe sender")?;
        let dst = SocketAddr::new(to.ip.parse().context("pod address")?, PROBE_PORT);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (a, s1) = (arrivals.clone(), stop.clone());
        let receiver = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while !s1.load(Ordering::Relaxed) {
                if let Ok(8) = rx.recv(&mut b) {
                    let seq = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                    let t = epoch.elapsed().as_secs_f64() * 1000.0;
                    a.lock().unwrap_or_else(|e| e.into_inner()).push((seq, t));
                }
            }
        });
        let (n, s2) = (sent.clone(), stop);
        let sender = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s2.load(Ordering::Relaxed) {
                let seq = n.load(Ordering::Relaxed);
                // Unreachable moments answer with an error: the datagram counts as lost.
                let _ = tx.send_to(&seq.to_be_bytes(), dst);
                n.store(seq + 1, Ordering::Relaxed);
                next += INTERVAL;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        });
        Ok(Probe {
            sent,
            arrivals,
            threads: vec![receiver, sender],
        })
    }

    fn seq(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn score(&self, first: u64, end: u64) -> Score {
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        score(&a, first, end, INTERVAL.as_secs_f64() * 1000.0)
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

/// Per switch (or "none" for the baseline), one Score per round: the worse direction's gap,
/// both directions' losses added.
type Results = Vec<(String, Vec<Score>)>;

fn record(results: &mut Results, name: &str, s: Score) {
    match results.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => v.push(s),
        None => results.push((name.to_string(), vec![s])),
    }
}

/// Scores a window in both directions while `during` runs.
fn window(probes: &[Probe], during: impl FnOnce() -> Result<()>) -> Result<Score> {
    let first: Vec<u64> = probes.iter().map(Probe::seq).collect();
    during()?;
    let end: Vec<u64> = probes.iter().map(Probe::seq).collect();
    // Datagrams still in flight at the end are not lost: let them land.
    std::thread::sleep(Duration::from_millis(50));
    let scores: Vec<Score> = probes
        .iter()
        .zip(first.iter().zip(&end))
        .map(|(p, (f, e))| p.score(*f, *e))
        .collect();
    Ok(Score {
        gap_ms: scores.iter().map(|s| s.gap_ms).fold(0.0, f64::max),
        lost: scores.iter().map(|s| s.lost).sum(),
    })
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
    for n in 0..NODES {
        let ns = tb.nodes[n].ns.clone();
        let env = dir.path().join(format!("n{n}.env"));
        tb.spawn(
            &ns,
            bin.to_str().context("path")?,
            &[
                "--etcd-endpoints",
                &endpoint,
                "--subnet-file",
                env.to_str().context("path")?,
                // No pods are attached through the CNI plugin here: publishing off.
                "--cni-data-dir=",
            ],
            &[("RUST_LOG", "info")],
            &dir.path().join(format!("n{n}.log")),
        )
        .map_err(anyhow::Error::msg)?;
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
        Probe::start(&pods[0], &pods[1], epoch, stop.clone())?,
        Probe::start(&pods[1], &pods[0], epoch, stop.clone())?,
    ];
    std::thread::sleep(Duration::from_secs(1));
    let mut results: Results = Vec::new();
    let outcome = (|| -> Result<()> {
        for r in 1..=rounds {
            let mut lengths = Vec::new();
            for pair in CYCLE.windows(2) {
                check_stop()?;
                let (old, new) = (pair[0], pair[1]);
                let t0 = Instant::now();
                let s = window(&probes, || {
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
            // The baseline: a window as long as the longest switch's, nothing switching.
            check_stop()?;
            let longest = lengths
                .iter()
                .max()
                .copied()
                .unwrap_or(Duration::from_secs(5));
            let s = window(&probes, || {
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
    stop.store(true, Ordering::Relaxed);
    for p in probes {
        for t in p.threads {
            let _ = t.join();
        }
    }
    outcome?;
    Ok(results)
}

fn render(results: &Results, rounds: u32) -> String {
    let mut t = format!(
        "Live backend switch, 3 namespace nodes, UDP probes every 1 ms pod to pod in both \
         directions, {rounds} round(s); window = config write until the old backend is gone \
         everywhere + 1 s.\n\n\
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

const USAGE: &str = "switch-bench [--rounds N] [--out FILE]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<(u32, Option<PathBuf>)> {
    let (mut rounds, mut out) = (3u32, None);
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value ({USAGE})"))
        };
        match a.as_str() {
            "--rounds" => rounds = value()?.parse().context("--rounds")?,
            "--out" => out = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other} ({USAGE})"),
        }
    }
    ensure!(rounds >= 1, "--rounds must be at least 1");
    Ok((rounds, out))
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
    fn steady_stream_scores_no_gap_and_no_loss() {
        let a: Vec<(u64, f64)> = (0..100).map(|s| (s, s as f64)).collect();
        assert_eq!(
            score(&a, 10, 90, 1.0),
            Score {
                gap_ms: 0.0,
                lost: 0
            }
        );
    }

    #[test]
    fn a_hole_is_the_gap_and_its_datagrams_are_lost() {
        // 40..60 never arrive: 21 ms between the arrivals of 39 and 60.
        let a: Vec<(u64, f64)> = (0..100)
            .filter(|s| !(40..60).contains(s))
            .map(|s| (s, s as f64))
            .collect();
        let s = score(&a, 0, 100, 1.0);
        assert_eq!(s.lost, 20);
        assert!((s.gap_ms - 20.0).abs() < 1e-9, "{s:?}");
        // Outside the window nothing counts.
        assert_eq!(score(&a, 60, 100, 1.0).lost, 0);
    }

    #[test]
    fn a_late_burst_is_a_gap_without_loss_and_duplicates_count_once() {
        // 50..55 held back 30 ms and delivered together, 52 twice.
        let mut a: Vec<(u64, f64)> = (0..100)
            .map(|s| {
                (
                    s,
                    if (50..55).contains(&s) {
                        84.0
                    } else {
                        s as f64
                    },
                )
            })
            .collect();
        a.push((52, 84.0));
        let s = score(&a, 0, 100, 1.0);
        assert_eq!(s.lost, 0);
        // 49 at 49 ms, then 55 at 55 ms: the delayed five arrive after, at 84.
        assert!((s.gap_ms - 5.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn nothing_delivered_scores_the_whole_window() {
        let s = score(&[], 0, 50, 1.0);
        assert_eq!(s.lost, 50);
        assert!((s.gap_ms - 49.0).abs() < 1e-9);
    }

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
            .contains("needs a value"));
    }
}
