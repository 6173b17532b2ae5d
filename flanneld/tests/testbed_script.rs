//! The README's main command, `deploy/testbed/testbed up` then `down`, run for real, with the
//! options a newcomer turns on to see more: the host-gw backend (vxlan and udp are the other
//! tests' daily bread), the service proxy and network policy.
//! Needs root; skips with a reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use test_support::{require_root_with, run_bounded};

#[test]
fn testbed_up_shows_traffic_and_down_removes_everything() {
    if !require_root_with(&[
        "ip", "etcd", "etcdctl", "socat", "iperf3", "ping", "jq", "nft",
    ]) {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/testbed/testbed");
    let up = run_bounded(
        Command::new(&script)
            .args(["up", "--nodes", "2", "--pods", "2", "--backend", "host-gw"])
            .args(["--proxy", "nftables", "--policy", "--ipv6"])
            // flanneld's directory also holds `flannel` and `flannelctl` under
            // `cargo test --workspace` (the testbed checks and says so otherwise).
            .env(
                "FLANNEL_BIN_DIR",
                PathBuf::from(env!("CARGO_BIN_EXE_flanneld"))
                    .parent()
                    .unwrap(),
            ),
        Duration::from_secs(240),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&up.stdout).into_owned();
    let err = String::from_utf8_lossy(&up.stderr).into_owned();
    // The tag (first line "== testbed TAG: ..."), to bring down exactly this testbed.
    let tag = out
        .lines()
        .find_map(|l| l.strip_prefix("== testbed "))
        .and_then(|r| r.split(':').next())
        .map(str::to_string);
    let down = tag.as_ref().map(|t| {
        run_bounded(
            Command::new(&script).args(["down", t]),
            Duration::from_secs(60),
        )
        .unwrap()
    });
    assert!(up.status.success(), "up failed:\n{out}\n{err}");
    assert!(
        out.contains("12 of 12 pod pairs reach each other\n"),
        "{out}"
    );
    assert!(
        out.contains("12 of 12 pod pairs reach each other over IPv6"),
        "{out}"
    );
    assert!(
        out.contains("Gbits/sec") && out.contains("receiver"),
        "no iperf3 figure:\n{out}"
    );
    assert!(out.contains("20 of 20 connections answered, by"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("(frontend) ->") && l.ends_with(": allowed")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(" -> ") && l.ends_with(": refused")),
        "{out}"
    );
    let tag = tag.unwrap();
    assert!(down.unwrap().status.success());
    let left = test_support::sh("ip", &["netns", "list"]).unwrap();
    assert!(
        !left.contains(&format!("fl{tag}-")),
        "namespaces left: {left}"
    );
}
