//! overlay-bench results: per-round samples, medians over rounds, the markdown table and the
//! SVG chart. Pure functions of the numbers, unit-tested without root.

use std::fmt::Write as _;

use crate::parse::{median, UdpRun};
use crate::svg::xml_escape;

/// What one setup measured in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// TCP, one stream, Gbit/s.
    pub tcp1: f64,
    /// TCP, 4 parallel streams, Gbit/s.
    pub tcp4: f64,
    /// One entry per offered UDP rate, in the order of [`Meta::udp_rates`].
    pub udp: Vec<UdpRun>,
    pub rtt_p50: f64,
    pub rtt_p99: f64,
    /// Daemon CPU seconds per GB during the one-stream TCP run; None without a daemon.
    pub daemon_cpu: Option<f64>,
    /// All CPUs' busy seconds per GB during the one-stream TCP run.
    pub system_cpu: Option<f64>,
}

/// How the figures were taken (for headings and captions).
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub rounds: u32,
    pub seconds: u32,
    /// Offered UDP rates, Gbit/s.
    pub udp_rates: Vec<f64>,
    pub pings: u32,
    pub ping_interval_ms: u32,
}

impl Meta {
    /// "1 round", "3 rounds".
    fn rounds_text(&self) -> String {
        match self.rounds {
            1 => "1 round".to_string(),
            n => format!("{n} rounds"),
        }
    }
}

/// One setup's figures: medians over rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Long name (table).
    pub name: String,
    /// Short name (chart).
    pub short: String,
    pub tcp1: Option<f64>,
    /// Median of the per-round ratios of `tcp1` to the baseline's.
    pub ratio: Option<f64>,
    pub per_round_ratios: Vec<f64>,
    pub tcp4: Option<f64>,
    pub udp_loss: Vec<Option<f64>>,
    pub udp_sent: Vec<Option<f64>>,
    pub rtt_p50: Option<f64>,
    pub rtt_p99: Option<f64>,
    pub daemon_cpu: Option<f64>,
    pub system_cpu: Option<f64>,
}

/// Median over rounds of one figure; rounds without it (None) are left out.
fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = samples.iter().filter_map(f).collect();
    median(&v)
}

/// Medians per setup. `names[i]` = (long, short) for `samples[i]` (one Sample per round);
/// ratios pair each round with the same round of `samples[baseline]`: the setups of one round
/// ran back to back, so pairing cancels slow drift of the machine.
pub fn summarize(
    names: &[(&str, &str)],
    samples: &[Vec<Sample>],
    baseline: usize,
    udp_rates: usize,
) -> Vec<Summary> {
    let base = samples.get(baseline).map(Vec::as_slice).unwrap_or(&[]);
    names
        .iter()
        .zip(samples)
        .map(|(&(name, short), s)| {
            let per_round_ratios: Vec<f64> = s
                .iter()
                .zip(base)
                .map(|(a, b)| a.tcp1 / b.tcp1)
                .filter(|r| r.is_finite())
                .collect();
            Summary {
                name: name.to_string(),
                short: short.to_string(),
                tcp1: median_of(s, |x| Some(x.tcp1)),
                ratio: median(&per_round_ratios),
                per_round_ratios,
                tcp4: median_of(s, |x| Some(x.tcp4)),
                udp_loss: (0..udp_rates)
                    .map(|k| median_of(s, |x| x.udp.get(k).map(|u| u.lost_percent)))
                    .collect(),
                udp_sent: (0..udp_rates)
                    .map(|k| median_of(s, |x| x.udp.get(k).map(|u| u.sent_gbps)))
                    .collect(),
                rtt_p50: median_of(s, |x| Some(x.rtt_p50)),
                rtt_p99: median_of(s, |x| Some(x.rtt_p99)),
                daemon_cpu: median_of(s, |x| x.daemon_cpu),
                system_cpu: median_of(s, |x| x.system_cpu),
            }
        })
        .collect()
}

/// A figure with `decimals` places, or `-` when there is none.
fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".to_string(),
    }
}

/// A rate in Gbit/s without trailing zeros (1, 2.5).
fn rate(g: f64) -> String {
    format!("{g}")
}

/// The UDP loss cell; notes the sent rate when the client fell more than 10% short of the
/// offered one (the loss then refers to a lower load).
fn udp_cell(loss: Option<f64>, sent: Option<f64>, offered: f64) -> String {
    match sent {
        Some(s) if loss.is_some() && s < 0.9 * offered => {
            format!("{} (sent {s:.2})", fmt(loss, 2))
        }
        _ => fmt(loss, 2),
    }
}

/// The markdown report: a heading paragraph, the table, and the per-round ratios (IPv4 rows
/// only).
#[cfg(test)]
pub fn render_table(meta: &Meta, rows: &[Summary]) -> String {
    render_tables(meta, rows, &[])
}

/// The markdown report with the IPv4 rows and, when there are any, a second table of the rows
/// measured pod to pod over IPv6 (ratios to hand VXLAN over IPv6).
pub fn render_tables(meta: &Meta, v4: &[Summary], v6: &[Summary]) -> String {
    let mut out = String::new();
    let rates: Vec<String> = meta.udp_rates.iter().map(|&g| rate(g)).collect();
    let _ = writeln!(
        out,
        "Pod to pod across two namespace nodes, {rounds} (order reversed every other \
         round), iperf3 {s} s per run: TCP with 1 and 4 streams, UDP with 1400-byte datagrams{v6} \
         (1392 at WireGuard's pod MTU 1420) offered at {r} Gbit/s; ping {p} × {i} ms. Figures are medians over rounds; the ratio is \
         the median of per-round ratios. CPU s/GB: CPU seconds during the 1-stream TCP run per \
         GB (1e9 bytes) received, for both daemons (utime + stime: flanneld, or wireguard-go in its row) and for the whole \
         machine (/proc/stat busy time).\n",
        rounds = meta.rounds_text(),
        s = meta.seconds,
        v6 = if v6.is_empty() {
            ""
        } else {
            " (1380 over IPv6: the pod MTU of VXLAN over IPv6 is 1430)"
        },
        r = if rates.is_empty() {
            "no".to_string()
        } else {
            rates.join(", ")
        },
        p = meta.pings,
        i = meta.ping_interval_ms,
    );
    if v6.is_empty() {
        table(&mut out, meta, v4, "hand VXLAN");
        return out;
    }
    let _ = writeln!(out, "### IPv4\n");
    table(&mut out, meta, v4, "hand VXLAN");
    let _ = writeln!(
        out,
        "\n### IPv6\n\nIPv6 underlay between the nodes, IPv6 pod addresses; ratios to kernel \
         VXLAN over IPv6 programmed by hand.\n"
    );
    table(&mut out, meta, v6, "hand VXLAN IPv6");
    out
}

/// One table and its per-round ratios to `baseline` (the row the ratios were computed against).
fn table(out: &mut String, meta: &Meta, rows: &[Summary], baseline: &str) {
    let rates: Vec<String> = meta.udp_rates.iter().map(|&g| rate(g)).collect();
    let mut head = vec![
        "path".to_string(),
        "TCP 1 stream (Gbit/s)".to_string(),
        format!("ratio to {baseline}"),
        "TCP 4 streams (Gbit/s)".to_string(),
    ];
    head.extend(rates.iter().map(|r| format!("UDP loss at {r} Gbit/s (%)")));
    head.extend(
        [
            "RTT p50 (ms)",
            "RTT p99 (ms)",
            "daemon CPU (s/GB)",
            "system CPU (s/GB)",
        ]
        .map(str::to_string),
    );
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for row in rows {
        let mut cells = vec![
            row.name.clone(),
            fmt(row.tcp1, 2),
            fmt(row.ratio, 3),
            fmt(row.tcp4, 2),
        ];
        cells.extend(meta.udp_rates.iter().enumerate().map(|(k, &offered)| {
            udp_cell(
                row.udp_loss.get(k).copied().flatten(),
                row.udp_sent.get(k).copied().flatten(),
                offered,
            )
        }));
        cells.extend([
            fmt(row.rtt_p50, 3),
            fmt(row.rtt_p99, 3),
            fmt(row.daemon_cpu, 3),
            fmt(row.system_cpu, 3),
        ]);
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(out, "\nPer-round TCP 1-stream ratios to {baseline}:");
    for row in rows {
        let ratios: Vec<String> = row
            .per_round_ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect();
        let _ = writeln!(out, "- {}: {}", row.short, ratios.join(" "));
    }
}

/// A 1, 2 or 5 × 10^k step giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// Decimal places that show a tick step exactly (steps are 1, 2 or 5 × 10^k).
fn step_decimals(step: f64) -> usize {
    if step >= 1.0 {
        0
    } else {
        // -log10 of a step below 1 is positive and small.
        (-step.log10().floor()).max(0.0) as usize
    }
}

// Chart geometry (px).
const WIDTH: f64 = 860.0;
const LABEL_W: f64 = 230.0;
const RIGHT_W: f64 = 80.0;
const BAR_H: f64 = 14.0;
const BAR_GAP: f64 = 2.0;
const GROUP_GAP: f64 = 12.0;

/// One bar series of a panel.
struct Series<'a> {
    label: &'a str,
    color: &'a str,
}

/// One horizontal grouped-bar panel at `y0`; returns the panel's height.
/// `rows[i]` = (group label, one value per series).
fn bar_panel(
    out: &mut String,
    y0: f64,
    title: &str,
    unit: &str,
    series: &[Series<'_>],
    rows: &[(&str, Vec<Option<f64>>)],
    decimals: usize,
) -> f64 {
    let plot_x = LABEL_W;
    let plot_w = WIDTH - LABEL_W - RIGHT_W;
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let step = nice_step(max);
    let axis_max = if max > 0.0 {
        (max / step).ceil() * step
    } else {
        step
    };
    let x_of = |v: f64| plot_x + plot_w * (v / axis_max).clamp(0.0, 1.0);

    let _ = writeln!(
        out,
        r#"<text x="10" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        y0 + 16.0,
        xml_escape(title)
    );
    // Legend.
    let mut lx = plot_x;
    for s in series {
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            y0 + 26.0,
            s.color,
            lx + 16.0,
            y0 + 36.5,
            xml_escape(s.label)
        );
        lx += 30.0 + 7.0 * s.label.chars().count() as f64;
    }

    let top = y0 + 48.0;
    let n = series.len().max(1) as f64;
    let group_h = n * BAR_H + (n - 1.0) * BAR_GAP;
    let bottom = top + rows.len() as f64 * (group_h + GROUP_GAP);

    // Grid lines and tick labels first, so bars draw over them.
    let mut t = 0.0;
    while t <= axis_max + step / 2.0 {
        let x = x_of(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#dddddd"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.prec$}</text>"##,
            bottom + 15.0,
            t,
            prec = step_decimals(step)
        );
        t += step;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{plot_x:.1}" y1="{bottom:.1}" x2="{:.1}" y2="{bottom:.1}" stroke="#333333"/><line x1="{plot_x:.1}" y1="{top:.1}" x2="{plot_x:.1}" y2="{bottom:.1}" stroke="#333333"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
        plot_x + plot_w,
        plot_x + plot_w,
        bottom + 30.0,
        xml_escape(unit)
    );

    for (i, (label, values)) in rows.iter().enumerate() {
        let gy = top + GROUP_GAP / 2.0 + i as f64 * (group_h + GROUP_GAP);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
            plot_x - 8.0,
            gy + group_h / 2.0 + 4.0,
            xml_escape(label)
        );
        for (k, s) in series.iter().enumerate() {
            let y = gy + k as f64 * (BAR_H + BAR_GAP);
            let v = values.get(k).copied().flatten().filter(|v| v.is_finite());
            let end = match v {
                Some(v) => {
                    let x = x_of(v);
                    let _ = writeln!(
                        out,
                        r#"<rect x="{plot_x:.1}" y="{y:.1}" width="{:.1}" height="{BAR_H:.1}" fill="{}"><title>{}: {v:.prec$} {}</title></rect>"#,
                        x - plot_x,
                        s.color,
                        xml_escape(s.label),
                        xml_escape(unit),
                        prec = decimals
                    );
                    x
                }
                None => plot_x,
            };
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                end + 4.0,
                y + BAR_H - 3.0,
                fmt(v, decimals)
            );
        }
    }
    bottom + 40.0 - y0
}

/// A self-contained SVG: TCP throughput (1 and 4 streams) and ping RTT (p50, p99) per setup.
pub fn render_svg(meta: &Meta, rows: &[Summary]) -> String {
    let mut body = String::new();
    let mut y = 56.0;
    let tcp: Vec<(&str, Vec<Option<f64>>)> = rows
        .iter()
        .map(|r| (r.short.as_str(), vec![r.tcp1, r.tcp4]))
        .collect();
    y += bar_panel(
        &mut body,
        y,
        "TCP throughput, pod to pod (higher is better)",
        "Gbit/s",
        &[
            Series {
                label: "1 stream",
                color: "#4e79a7",
            },
            Series {
                label: "4 streams",
                color: "#f28e2b",
            },
        ],
        &tcp,
        2,
    );
    let rtt: Vec<(&str, Vec<Option<f64>>)> = rows
        .iter()
        .map(|r| (r.short.as_str(), vec![r.rtt_p50, r.rtt_p99]))
        .collect();
    y += bar_panel(
        &mut body,
        y,
        "Ping round-trip time, pod to pod (lower is better)",
        "ms",
        &[
            Series {
                label: "p50",
                color: "#59a14f",
            },
            Series {
                label: "p99",
                color: "#e15759",
            },
        ],
        &rtt,
        3,
    );
    let height = y.ceil();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="16" font-weight="bold">overlay-bench: two namespace nodes, one pod each</text>"#
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="40" font-size="12" fill="#555555">Medians over {}; iperf3 {} s per run; ping {} × {} ms</text>"##,
        meta.rounds_text(),
        meta.seconds,
        meta.pings,
        meta.ping_interval_ms
    );
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(tcp1: f64, daemon: Option<f64>) -> Sample {
        Sample {
            tcp1,
            tcp4: tcp1 * 1.5,
            udp: vec![
                UdpRun {
                    sent_gbps: 1.0,
                    lost_percent: 0.5,
                },
                UdpRun {
                    sent_gbps: 2.1,
                    lost_percent: 20.0,
                },
            ],
            rtt_p50: 0.04,
            rtt_p99: 0.09,
            daemon_cpu: daemon,
            system_cpu: Some(0.8),
        }
    }

    fn meta() -> Meta {
        Meta {
            rounds: 3,
            seconds: 4,
            udp_rates: vec![1.0, 3.0],
            pings: 200,
            ping_interval_ms: 10,
        }
    }

    fn summaries() -> Vec<Summary> {
        let names = [
            ("kernel VXLAN programmed by hand", "hand VXLAN"),
            ("flanneld udp backend <&>", "flanneld udp"),
        ];
        let samples = vec![
            vec![sample(10.0, None), sample(12.0, None), sample(11.0, None)],
            vec![
                sample(5.0, Some(1.0)),
                sample(9.0, Some(3.0)),
                sample(5.5, Some(2.0)),
            ],
        ];
        summarize(&names, &samples, 0, 2)
    }

    #[test]
    fn medians_and_paired_ratios() {
        let s = summaries();
        assert_eq!(s[0].tcp1, Some(11.0));
        assert_eq!(s[0].ratio, Some(1.0));
        assert_eq!(s[0].daemon_cpu, None);
        assert_eq!(s[1].tcp1, Some(5.5));
        // Per-round ratios 0.5, 0.75, 0.5: their median, not the ratio of medians (0.5).
        assert_eq!(s[1].per_round_ratios, vec![0.5, 0.75, 0.5]);
        assert_eq!(s[1].ratio, Some(0.5));
        assert_eq!(s[1].daemon_cpu, Some(2.0));
        assert_eq!(s[1].udp_loss, vec![Some(0.5), Some(20.0)]);
        assert_eq!(s[1].tcp4, Some(8.25));
    }

    #[test]
    fn table_columns_and_cells() {
        let t = render_table(&meta(), &summaries());
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines.len(), 4, "{t}");
        let cols = |l: &str| l.matches('|').count() - 1;
        assert!(lines.iter().all(|l| cols(l) == 10), "{t}");
        assert!(lines[0].contains("UDP loss at 1 Gbit/s (%)"));
        assert!(lines[0].contains("UDP loss at 3 Gbit/s (%)"));
        assert!(lines[0].contains("RTT p99 (ms)"));
        assert_eq!(
            lines[2],
            "| kernel VXLAN programmed by hand | 11.00 | 1.000 | 16.50 | 0.50 | \
             20.00 (sent 2.10) | 0.040 | 0.090 | - | 0.800 |"
        );
        assert!(lines[3].contains("| 5.50 | 0.500 | 8.25 |"), "{t}");
        assert!(lines[3].ends_with("| 2.000 | 0.800 |"), "{t}");
        assert!(t.contains("- flanneld udp: 0.500 0.750 0.500"), "{t}");
        assert!(
            t.starts_with("Pod to pod across two namespace nodes, 3 rounds ("),
            "{t}"
        );
        let one = Meta {
            rounds: 1,
            ..meta()
        };
        assert!(render_table(&one, &summaries()).contains(", 1 round ("));
    }

    #[test]
    fn ipv6_table_after_the_ipv4_one() {
        let v4 = summaries();
        let mut v6 = summaries();
        v6[0].name = "kernel VXLAN over IPv6 programmed by hand".to_string();
        let t = render_tables(&meta(), &v4, &v6);
        assert!(t.contains("(1380 over IPv6"), "{t}");
        let i4 = t.find("### IPv4").unwrap();
        let i6 = t.find("### IPv6").unwrap();
        assert!(i4 < i6, "{t}");
        assert!(t[i6..].contains("| ratio to hand VXLAN IPv6 |"), "{t}");
        assert!(t[i6..].contains("| kernel VXLAN over IPv6 programmed by hand | 11.00 |"));
        assert!(t[i6..].contains("Per-round TCP 1-stream ratios to hand VXLAN IPv6:"));
        assert_eq!(t.lines().filter(|l| l.starts_with("|---")).count(), 2);
        // Without IPv6 rows: the IPv4 report as before.
        assert_eq!(render_tables(&meta(), &v4, &[]), render_table(&meta(), &v4));
        assert!(!render_table(&meta(), &v4).contains("###"));
    }

    #[test]
    fn table_without_udp_rates() {
        let m = Meta {
            udp_rates: vec![],
            ..meta()
        };
        let t = render_table(&m, &summaries());
        assert!(!t.contains("UDP loss at"));
        assert!(t
            .lines()
            .filter(|l| l.starts_with('|'))
            .all(|l| l.matches('|').count() == 9));
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(15.0), 5.0);
        assert_eq!(nice_step(8.0), 2.0);
        assert_eq!(nice_step(0.3), 0.1);
        assert!((nice_step(0.09) - 0.02).abs() < 1e-12);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
        assert_eq!(step_decimals(5.0), 0);
        assert_eq!(step_decimals(0.1), 1);
        assert_eq!(step_decimals(0.02), 2);
    }

    #[test]
    fn svg_is_self_contained_and_labelled() {
        let svg = render_svg(&meta(), &summaries());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(!svg.contains("href"), "no external references");
        for label in [
            "hand VXLAN",
            "flanneld udp",
            "1 stream",
            "4 streams",
            "p50",
            "p99",
            "Gbit/s",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        // Values are printed next to the bars.
        assert!(svg.contains(">11.00<") && svg.contains(">8.25<") && svg.contains(">0.090<"));
        // Every opened element is closed (self-closing or with its end tag).
        for tag in ["text", "rect", "line"] {
            let opened = svg.matches(&format!("<{tag} ")).count();
            let closed = svg.matches(&format!("</{tag}>")).count();
            let selfclosed = svg
                .split(&format!("<{tag} "))
                .skip(1)
                .filter(|rest| rest.split('>').next().is_some_and(|a| a.ends_with('/')))
                .count();
            assert_eq!(opened, closed + selfclosed, "<{tag}> unbalanced");
        }
        // 2 panels × 2 setups × 2 series bars.
        assert_eq!(svg.matches("<title>").count(), 8);
    }

    #[test]
    fn svg_bars_scale_to_the_axis() {
        let svg = render_svg(&meta(), &summaries());
        // TCP axis: max 16.5 → step 5 → axis 20 over 550 px; 11 Gbit/s → 302.5 px.
        assert!(
            svg.contains(r##"width="302.5" height="14.0" fill="#4e79a7""##),
            "{svg}"
        );
        assert!(svg.contains(">20<"), "axis reaches 20");
    }

    #[test]
    fn svg_escapes_and_tolerates_missing_values() {
        let mut s = summaries();
        s[1].short = "a<b & c".to_string();
        s[1].rtt_p99 = None;
        s[1].tcp4 = Some(f64::NAN);
        let svg = render_svg(&meta(), &s);
        assert!(svg.contains("a&lt;b &amp; c"));
        assert!(!svg.contains("a<b"));
        assert_eq!(svg.matches("<title>").count(), 6);
        assert!(svg.contains(">-<"));
        assert!(!svg.contains("NaN"));
    }
}
