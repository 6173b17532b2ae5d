//! policy-bench end to end at a small size (root): NetworkPolicies and ClusterNetworkPolicies
//! applied to a real table, the label and priority changes observed by real connections
//! (the bench fails when a change does not deny or does not let the client in), and every
//! table in the latency and throughput sections.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use test_support::{require_root_with, run_bounded};

/// The number after `what` in `text` (e.g. "12 chains" → 12 for " chains").
fn number_before(text: &str, what: &str) -> usize {
    let end = text.find(what).unwrap_or_else(|| panic!("{what}: {text}"));
    let start = text[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    text[start..end]
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// The report's row that starts with `prefix`.
fn row<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row {prefix}: {report}"))
}

#[test]
fn policy_bench_small_with_cluster_network_policies() {
    if !require_root_with(&["nft", "iperf3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("policy.md");
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_policy-bench"))
            .args([
                "--pods",
                "40",
                "--policies",
                "1,20",
                "--cluster-policies",
                "1,6,40",
                "--changes",
                "2",
                "--connections",
                "40",
                "--rounds",
                "2",
                "--seconds",
                "1",
                "--out",
            ])
            .arg(&out),
        Duration::from_secs(240),
    )
    .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report = std::fs::read_to_string(&out).unwrap();
    assert!(report.starts_with("# Network policy benchmark"), "{report}");
    let nps = row(&report, "| apply 20 NetworkPolicies at once (");
    row(
        &report,
        "| label change with 20 NetworkPolicies, until a connection",
    );
    let cnps = row(
        &report,
        "| apply 40 ClusterNetworkPolicies at once beside 20 NetworkPolicies (",
    );
    // The synthetic mix lands in the table: more chains and rules than NetworkPolicy alone
    // (the tier chains), and all but the few whose subject names no namespace of the node.
    assert!(
        number_before(cnps, " chains") > number_before(nps, " chains"),
        "{nps}\n{cnps}"
    );
    assert!(
        number_before(cnps, " rules") > number_before(nps, " rules"),
        "{nps}\n{cnps}"
    );
    let selecting = number_before(cnps, " select pods of the node");
    assert!((36..40).contains(&selecting), "{cnps}");
    row(
        &report,
        "| priority change with 40 ClusterNetworkPolicies (an Admin Accept moved above an Admin Deny), until a connection gets through (median / max of 2) |",
    );
    // Every table in both data-path sections, the baseline's ratio 1.
    for table in [
        "| no policy table | ",
        "| 1 NetworkPolicy | ",
        "| 20 NetworkPolicies | ",
        "| 20 NetworkPolicies + 1 ClusterNetworkPolicy | ",
        "| 20 NetworkPolicies + 6 ClusterNetworkPolicies | ",
        "| 20 NetworkPolicies + 40 ClusterNetworkPolicies | ",
    ] {
        assert_eq!(report.matches(table).count(), 2, "{table}: {report}");
    }
    assert!(report.contains("## Connection set-up"), "{report}");
    assert!(report.contains("## Throughput"), "{report}");
}
