//! dns-bench end to end at a small size (no root): our server, Unbound and Knot started,
//! checked with dig, measured with dnsperf (every answer code checked), stopped; the report
//! has a row per server and mix, the memory table and the targets.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use test_support::{find_program, require, run_bounded};

#[test]
fn dns_bench_quick_small() {
    for p in ["dnsperf", "unbound", "knotd", "dig", "taskset"] {
        if !require(
            find_program(p).is_some(),
            &format!("needs {p} (Debian dnsperf, unbound, knot, bind9-dnsutils)"),
        ) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dns.md");
    // Both CPUs for everything when the machine has one.
    let cpus = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        ["1", "0"]
    } else {
        ["0", "0"]
    };
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_dns-bench"))
            .args([
                "--services",
                "40,60",
                "--seconds",
                "1",
                "--latency-seconds",
                "1",
                "--latency-qps",
                "2000",
                "--rounds",
                "1",
                "--external-names",
                "20",
                "--server-cpus",
                cpus[0],
                "--client-cpus",
                cpus[1],
                "--keep",
            ])
            .arg(dir.path().join("files"))
            .arg("--out")
            .arg(&out),
        Duration::from_secs(300),
    )
    .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report = std::fs::read_to_string(&out).unwrap();
    assert!(report.starts_with("# Cluster DNS benchmark"), "{report}");
    assert!(report.contains("## 40 Services ("), "{report}");
    assert!(report.contains("## 60 Services ("), "{report}");
    for row in [
        "| **cluster · cluster-dns** |",
        "| cluster · Unbound |",
        "| cluster · Knot |",
        "| **external · cluster-dns** |",
        "| external · Unbound |",
        "| **mixed · cluster-dns** |",
    ] {
        assert_eq!(report.matches(row).count(), 2, "{row}: {report}");
    }
    // Knot is authoritative only: never asked outside names.
    assert!(!report.contains("external · Knot"), "{report}");
    assert!(report.contains("## Targets at 60 Services"), "{report}");
    assert!(report.contains("| RSS < 50 MB | peak "), "{report}");
    // Every server was stopped: no process still serves the kept configurations.
    let files = dir.path().join("files").display().to_string();
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains(&files) && !l.starts_with("ps ")),
        "{ps}"
    );
}
