//! `bench-report`'s pure part: the markdown tables the benchmarks write, read back; figures
//! grouped by unit; one horizontal bar chart (SVG) per table and unit.

use std::fmt::Write as _;

use crate::svg::xml_escape;

/// A markdown table: its header cells and rows of cells, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

fn is_rule(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

/// Every table in `md` (a header line, a `|---|` rule, then `|` rows), with the nearest
/// heading before it (`#` lines), in order.
pub fn tables(md: &str) -> Vec<(String, Table)> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if let Some(h) = l.strip_prefix('#') {
            heading = h.trim_start_matches('#').trim().to_string();
        }
        if l.starts_with('|') && i + 1 < lines.len() && is_rule(lines[i + 1]) {
            let header = cells(l);
            let mut rows = Vec::new();
            i += 2;
            while i < lines.len() && lines[i].trim().starts_with('|') {
                rows.push(cells(lines[i]));
                i += 1;
            }
            out.push((heading.clone(), Table { header, rows }));
            continue;
        }
        i += 1;
    }
    out
}

/// The first number in a cell and the unit written after it (`"48 / 52 ms"` → 48, "ms";
/// `"17.77 Gbit/s (0.996)"` → 17.77, "Gbit/s"; `"4.2x"` → 4.2, "x"); markdown bold removed.
pub fn figure(cell: &str) -> Option<(f64, String)> {
    let c = cell.replace("**", "");
    let start = c.find(|ch: char| ch.is_ascii_digit())?;
    let rest = &c[start..];
    let end = rest
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(rest.len());
    let value: f64 = rest[..end].parse().ok()?;
    // The unit: the last word of the cell's numeric part ("48 / 52 ms", "1.7 MB").
    let unit = c
        .split(['(', ','])
        .next()
        .unwrap_or("")
        .split_whitespace()
        .rev()
        .map(|w| w.trim_start_matches(|ch: char| ch.is_ascii_digit() || ch == '.'))
        .find(|w| w.chars().any(|ch| ch.is_alphabetic()))
        .unwrap_or("")
        .to_string();
    Some((value, unit))
}

/// A unit written in a header: `"all leased (ms)"` → "ms".
fn header_unit(h: &str) -> Option<String> {
    let open = h.rfind('(')?;
    let close = h[open..].find(')')? + open;
    let u = h[open + 1..close].trim();
    (!u.is_empty() && u.len() <= 8 && !u.contains(' ')).then(|| u.to_string())
}

/// One chart's data: a title, the unit, and (label, value) bars.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub bars: Vec<(String, f64)>,
}

/// The charts of one table: its first value column, rows grouped by the unit of their figure
/// (a "measure | result" table mixes ms and Gbit/s rows). Groups of one bar are left out.
pub fn charts(heading: &str, t: &Table) -> Vec<Chart> {
    if t.header.len() < 2 {
        return Vec::new();
    }
    let col_unit = header_unit(&t.header[1]);
    let mut groups: Vec<Chart> = Vec::new();
    for row in &t.rows {
        let (Some(label), Some(cell)) = (row.first(), row.get(1)) else {
            continue;
        };
        let Some((value, unit)) = figure(cell) else {
            continue;
        };
        let unit = col_unit.clone().unwrap_or(unit);
        let label = label.replace("**", "").replace('`', "");
        match groups.iter_mut().find(|g| g.unit == unit) {
            Some(g) => g.bars.push((label, value)),
            None => groups.push(Chart {
                title: if heading.is_empty() {
                    t.header[1].clone()
                } else {
                    format!("{heading}: {}", t.header[1])
                },
                unit,
                bars: vec![(label, value)],
            }),
        }
    }
    groups.retain(|g| g.bars.len() >= 2);
    groups
}

/// A horizontal bar chart, values printed at the bars' ends.
pub fn svg(c: &Chart) -> String {
    let label_w = 430.0;
    let bar_w = 330.0;
    let row_h = 24.0;
    let top = 34.0;
    let width = label_w + bar_w + 90.0;
    let height = top + row_h * c.bars.len() as f64 + 12.0;
    let max = c.bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { bar_w / max } else { 0.0 };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="8" y="20" font-size="14" font-weight="bold">{} ({})</text>"#,
        xml_escape(&c.title),
        xml_escape(&c.unit)
    );
    for (i, (label, v)) in c.bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let w = (v * scale).max(1.0);
        let short: String = if label.chars().count() > 68 {
            label.chars().take(66).chain("…".chars()).collect()
        } else {
            label.clone()
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{label_w}" y="{}" width="{w:.1}" height="{}" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            label_w - 6.0,
            y + 15.0,
            xml_escape(&short),
            y + 3.0,
            row_h - 6.0,
            ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"][i % 6],
            label_w + w + 4.0,
            y + 15.0,
            xml_escape(&format!("{v}"))
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PROXY: &str = "# Service proxy\n\n## Control plane\n\n| measure | result |\n|---|---|\n\
        | full sync, 1000 Services | 188 ms (model 3 ms, script 1.7 MB) |\n\
        | **add one Service at 10k** (median / p90 of 20) | **48 / 52 ms** |\n\
        | iperf3 direct | 17.84 Gbit/s (1.000) |\n\
        | iperf3 ClusterIP | 17.77 Gbit/s (0.996) |\n\ntext after\n\n\
        | N | all leased (ms) | x |\n|---|---|---|\n| 10 | 9.8 | 4.2x |\n| 100 | 103.1 | 5.0x |\n";

    #[test]
    fn tables_with_their_headings() {
        let t = tables(PROXY);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].0, "Control plane");
        assert_eq!(t[0].1.header, vec!["measure", "result"]);
        assert_eq!(t[0].1.rows.len(), 4);
        assert_eq!(t[1].1.rows[1], vec!["100", "103.1", "5.0x"]);
    }

    #[test]
    fn figures_and_units() {
        assert_eq!(figure("**48 / 52 ms**"), Some((48.0, "ms".into())));
        assert_eq!(
            figure("17.77 Gbit/s (0.996)"),
            Some((17.77, "Gbit/s".into()))
        );
        assert_eq!(
            figure("188 ms (model 3 ms, script 1.7 MB)"),
            Some((188.0, "ms".into()))
        );
        assert_eq!(figure("4.2x"), Some((4.2, "x".into())));
        assert_eq!(figure("9.8"), Some((9.8, "".into())));
        assert_eq!(figure("-"), None);
    }

    #[test]
    fn one_chart_per_unit_and_svg() {
        let t = tables(PROXY);
        let c = charts(&t[0].0, &t[0].1);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].unit, "ms");
        assert_eq!(c[0].bars.len(), 2);
        assert_eq!(
            c[0].bars[1].0,
            "add one Service at 10k (median / p90 of 20)"
        );
        assert_eq!(c[1].unit, "Gbit/s");
        // The header's unit wins: "all leased (ms)".
        let c = charts(&t[1].0, &t[1].1);
        assert_eq!(c[0].unit, "ms");
        assert_eq!(c[0].bars, vec![("10".into(), 9.8), ("100".into(), 103.1)]);
        let s = svg(&c[0]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<rect x=").count(), 2);
        // The longest bar is the full width; escaping holds.
        assert!(s.contains(r#"width="330.0""#), "{s}");
        let odd = Chart {
            title: "a<b & c".into(),
            unit: "ms".into(),
            bars: vec![("x\"y".into(), 1.0), ("z".into(), 0.0)],
        };
        let s = svg(&odd);
        assert!(s.contains("a&lt;b &amp; c") && s.contains("x&quot;y"));
    }
}
