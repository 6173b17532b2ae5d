//! `benches/run-all` end to end on its cheapest benchmark: lease-bench against a real etcd
//! (`--only lease --quick`), then the report with its table and chart, and the benchmarks
//! that were not asked for reported as not run.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use test_support::{require, run_bounded};

#[test]
fn run_all_writes_a_report_with_tables_and_charts() {
    if !require(
        test_support::find_program("etcd").is_some(),
        "needs etcd (Debian etcd-server)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("2026-01-01");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("run-all");
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_bench-report"))
        .parent()
        .unwrap()
        .to_path_buf();
    let o = run_bounded(
        Command::new(&script)
            .args(["--quick", "--only", "lease", "--dir"])
            .arg(&out)
            .env("BENCH_BIN_DIR", &bin_dir),
        Duration::from_secs(300),
    )
    .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.starts_with("# Benchmark report 2026-01-01"),
        "{report}"
    );
    assert!(report.contains("| 1000 |"), "{report}");
    assert!(
        report.contains("![all leased (ms)](charts/lease-1.svg)"),
        "{report}"
    );
    let svg = std::fs::read_to_string(out.join("charts/lease-1.svg")).unwrap();
    assert_eq!(svg.matches("<rect x=").count(), 3, "{svg}");
    assert_eq!(
        // overlay, switch, proxy, policy, dns, ingress
        report.matches("Not run: no result file").count(),
        6,
        "{report}"
    );
    assert!(report.contains("lease-bench 10 100 1000"), "{report}");
}
