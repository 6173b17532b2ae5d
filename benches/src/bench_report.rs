//! `bench-report DIR`: assembles what `benches/run-all` left in DIR (one markdown file per
//! benchmark, overlay-bench's SVG, `machine.txt`, `commands.txt`) into `DIR/report.md`, with
//! one bar chart (`DIR/charts/*.svg`) per result table and unit. A benchmark that did not run
//! (no file, or its `NAME.err`) is reported as such.

#[path = "report_md.rs"]
mod report_md;
mod svg;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The sections: file stem, title, what it measures.
const SECTIONS: &[(&str, &str, &str)] = &[
    (
        "overlay",
        "Data plane: pod-to-pod throughput and latency per backend (overlay-bench)",
        "Two namespace nodes, one pod each: plain routes (baseline), kernel VXLAN by hand, and flanneld's backends.",
    ),
    (
        "switch",
        "Data plane: live backend switch (switch-bench)",
        "Longest gap without delivery of a 1 kHz probe stream while every node switches backend.",
    ),
    (
        "lease",
        "Control plane: lease acquisition and convergence (lease-bench)",
        "N nodes join at once; watchers measure when every one has seen every lease; baseline: N plain etcd puts.",
    ),
    (
        "proxy",
        "Service proxy scale (proxy-bench)",
        "nftables sync at 1k/10k Services, one Service added at 10k, connect latency, throughput through a ClusterIP.",
    ),
    (
        "policy",
        "Network policy scale (policy-bench)",
        "1/100/1000 NetworkPolicies and 1/100/1000 ClusterNetworkPolicies beside them applied, a label and a priority change taking effect, connect latency and throughput per table as ratios to no table.",
    ),
    (
        "dns",
        "Cluster DNS against Unbound and Knot (dns-bench)",
        "dnsperf query mixes at 100 and 10k Services: QPS, server CPU per query, latency p50/p99, RSS; Unbound and Knot serve the same records.",
    ),
    (
        "ingress",
        "Ingress proxy against nginx (ingress-bench)",
        "wrk through flannel-ingress and through nginx configured as ingress-nginx, same pods, same CPU budget: HTTP and HTTPS, with and without keep-alive; req/s, p50/p99, CPU, RSS.",
    ),
];

/// Headings of an included file one level down (its `#` becomes `###`).
fn demote(md: &str) -> String {
    md.lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("##{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

fn build(dir: &Path) -> Result<String> {
    let charts_dir = dir.join("charts");
    std::fs::create_dir_all(&charts_dir)
        .with_context(|| format!("creating {}", charts_dir.display()))?;
    let date = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut r = format!("# Benchmark report {date}\n\n");
    if let Some(m) = read(dir, "machine.txt") {
        let _ = writeln!(r, "Machine: {}\n", m.trim());
    }
    r +=
        "Every figure is compared with a baseline measured in the same run (see each section).\n\n";
    for (stem, title, _) in SECTIONS {
        let _ = writeln!(r, "- [{title}](#{stem})");
    }
    r.push('\n');
    let mut ran = 0;
    for (stem, title, what) in SECTIONS {
        let _ = writeln!(r, "<a id=\"{stem}\"></a>\n\n## {title}\n\n{what}\n");
        let Some(md) = read(dir, &format!("{stem}.md")) else {
            let why = read(dir, &format!("{stem}.err"))
                .map(|e| e.lines().rev().take(5).collect::<Vec<_>>().join(" / "))
                .unwrap_or_else(|| "no result file".into());
            let _ = writeln!(r, "Not run: {why}\n");
            continue;
        };
        ran += 1;
        if dir.join(format!("{stem}.svg")).exists() {
            let _ = writeln!(r, "![{stem}]({stem}.svg)\n");
        }
        let mut n = 0;
        for (heading, table) in report_md::tables(&md) {
            for chart in report_md::charts(&heading, &table) {
                n += 1;
                let file = format!("charts/{stem}-{n}.svg");
                std::fs::write(dir.join(&file), report_md::svg(&chart))
                    .with_context(|| format!("writing {file}"))?;
                let _ = writeln!(r, "![{}]({file})\n", chart.title);
            }
        }
        r += &demote(md.trim());
        r += "\n\n";
    }
    if ran == 0 {
        bail!("no benchmark results in {}", dir.display());
    }
    if let Some(c) = read(dir, "commands.txt") {
        let _ = writeln!(r, "## Commands\n\n```sh\n{}\n```", c.trim());
    }
    Ok(r)
}

/// Assembles the results of `benches/run-all` into DIR/report.md with charts.
#[derive(Debug, clap::Parser)]
#[command(name = "bench-report")]
struct Args {
    /// A directory written by benches/run-all.
    dir: PathBuf,
}

fn main() -> Result<()> {
    let dir = <Args as clap::Parser>::parse().dir;
    let report = build(&dir)?;
    let out = dir.join("report.md");
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn report_from_results_with_one_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("lease.md"),
            "| N | all leased (ms) | baseline N puts (ms) |\n|---|---|---|\n| 10 | 9.8 | 2.4 |\n| 100 | 103.1 | 20.5 |\n",
        )
        .unwrap();
        std::fs::write(d.join("policy.err"), "policy-bench: needs root\n").unwrap();
        std::fs::write(d.join("machine.txt"), "2 CPUs, Linux 6.18").unwrap();
        let r = build(d).unwrap();
        assert!(r.contains("Machine: 2 CPUs, Linux 6.18"));
        assert!(r.contains("![all leased (ms)](charts/lease-1.svg)"), "{r}");
        assert!(std::fs::read_to_string(d.join("charts/lease-1.svg"))
            .unwrap()
            .contains("103.1"));
        assert!(r.contains("| 100 | 103.1 | 20.5 |"));
        assert!(r.contains("Not run: policy-bench: needs root"));
        assert!(r.contains("Not run: no result file"));
        let empty = tempfile::tempdir().unwrap();
        assert!(build(empty.path()).is_err());
    }
}
