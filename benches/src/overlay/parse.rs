//! Pure parts of overlay-bench: iperf3 JSON, ping output, /proc counters, order statistics.
//! Nothing here touches the system, so all of it is unit-tested without root.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One iperf3 TCP run as the receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRun {
    pub gbps: f64,
    /// Bytes received (all streams).
    pub bytes: f64,
}

/// One iperf3 UDP run at a fixed offered rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRun {
    /// What the client actually sent (it may fall short of the offered rate).
    pub sent_gbps: f64,
    pub lost_percent: f64,
}

/// The first JSON value in iperf3's `-J` output; iperf3's own `error` field becomes an error.
fn iperf_json(out: &str) -> Result<Value> {
    let v: Value = serde_json::Deserializer::from_str(out)
        .into_iter::<Value>()
        .next()
        .context("iperf3 printed no JSON")?
        .context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// The number at `end.<section>.<key>`, named in the error when missing.
fn end_number(v: &Value, section: &str, key: &str) -> Result<f64> {
    v["end"][section][key]
        .as_f64()
        .with_context(|| format!("iperf3 JSON has no number at end.{section}.{key}"))
}

/// Receiver-side throughput and bytes of a TCP run (`end.sum_received`, all streams summed).
pub fn tcp_run(out: &str) -> Result<TcpRun> {
    let v = iperf_json(out)?;
    Ok(TcpRun {
        gbps: end_number(&v, "sum_received", "bits_per_second")? / 1e9,
        bytes: end_number(&v, "sum_received", "bytes")?,
    })
}

/// Loss and sent rate of a UDP run (`end.sum`, which iperf3 3.12 fills from the sender's
/// packet count and the receiver's loss report).
pub fn udp_run(out: &str) -> Result<UdpRun> {
    let v = iperf_json(out)?;
    Ok(UdpRun {
        sent_gbps: end_number(&v, "sum", "bits_per_second")? / 1e9,
        lost_percent: end_number(&v, "sum", "lost_percent")?,
    })
}

/// Round-trip times in ms from ping's per-reply lines (`... time=0.041 ms`); other lines,
/// including the summary, are ignored.
pub fn ping_times_ms(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split_once(" time=").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|t| t.trim_end_matches("ms").parse::<f64>().ok())
        .filter(|t| t.is_finite())
        .collect()
}

/// The `p`-quantile (0 ≤ p ≤ 1) at index round((n − 1) · p) of the sorted values, as
/// lease-bench does; None for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let last = sorted.len() - 1;
    // Non-negative and at most `last` after the clamp.
    let i = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
    sorted.get(i.min(last)).copied()
}

/// The median as this benchmark always took it: the upper middle of the sorted values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted.get(sorted.len() / 2).copied()
}

/// State and CPU time (utime + stime, clock ticks, all threads) from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcCpu {
    pub state: char,
    pub ticks: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`: field 3 (state) comes first, utime is field 14 and
/// stime field 15.
pub fn proc_pid_cpu(stat: &str) -> Result<ProcCpu> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("/proc/PID/stat: no `)` after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .context("/proc/PID/stat: no state field")?;
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("/proc/PID/stat: no field {n}"))?
            .parse::<u64>()
            .with_context(|| format!("/proc/PID/stat: field {n} is not a number"))
    };
    Ok(ProcCpu {
        state,
        ticks: field(14)? + field(15)?,
    })
}

/// Busy clock ticks of all CPUs from `/proc/stat`'s `cpu` line: user + nice + system + irq +
/// softirq (not idle, iowait or steal; guest time is already inside user).
pub fn proc_stat_busy_ticks(stat: &str) -> Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no `cpu` line")?;
    let values = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<Vec<u64>, _>>()
        .context("/proc/stat: `cpu` line has a non-number")?;
    if values.len() < 7 {
        bail!(
            "/proc/stat: `cpu` line has {} fields, want 7 or more",
            values.len()
        );
    }
    Ok([0, 1, 2, 5, 6].iter().map(|&i| values[i]).sum())
}

/// CPU seconds per GB (1e9 bytes) moved; None when nothing was moved.
pub fn cpu_seconds_per_gb(ticks: u64, ticks_per_second: u64, bytes: f64) -> Option<f64> {
    if bytes <= 0.0 || ticks_per_second == 0 {
        return None;
    }
    let seconds = ticks as f64 / ticks_per_second as f64;
    Some(seconds / (bytes / 1e9))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TCP: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"bytes":3500000000,"bits_per_second":14000000000.0},
        "sum_received":{"bytes":3400000000,"bits_per_second":13600000000.5}}}"#;

    // Trimmed from iperf3 3.12 `-u -b 1G -l 1400 -J` on this machine.
    const UDP: &str = r#"{"end":{"sum":{"start":0,"end":1.000247,"seconds":1.000247,
        "bytes":124919200,"bits_per_second":999225699.110514,"jitter_ms":0.0009,
        "lost_packets":9291,"packets":89228,"lost_percent":10.41265073743668,"sender":true}}}"#;

    #[test]
    fn tcp_from_sum_received() {
        let r = tcp_run(TCP).unwrap();
        assert!((r.gbps - 13.6).abs() < 1e-6);
        assert_eq!(r.bytes, 3.4e9);
    }

    #[test]
    fn tcp_ignores_trailing_output() {
        let r = tcp_run(&format!("{TCP}\niperf3: some warning\n")).unwrap();
        assert!((r.gbps - 13.6).abs() < 1e-6);
    }

    #[test]
    fn iperf_errors_name_the_problem() {
        let e = tcp_run(r#"{"start":{},"error":"unable to connect to server"}"#).unwrap_err();
        assert!(e.to_string().contains("unable to connect"), "{e}");
        let e = tcp_run(r#"{"end":{"sum_sent":{}}}"#).unwrap_err();
        assert!(
            e.to_string().contains("end.sum_received.bits_per_second"),
            "{e}"
        );
        assert!(tcp_run("").is_err());
        assert!(tcp_run("iperf3: error - unable to connect").is_err());
        let e = udp_run(TCP).unwrap_err();
        assert!(e.to_string().contains("end.sum."), "{e}");
    }

    #[test]
    fn udp_loss_and_sent_rate() {
        let r = udp_run(UDP).unwrap();
        assert!((r.lost_percent - 10.4127).abs() < 1e-3);
        assert!((r.sent_gbps - 0.9992).abs() < 1e-3);
    }

    #[test]
    fn ping_reply_lines_only() {
        let out = "PING 10.5.2.2 (10.5.2.2) 56(84) bytes of data.\n\
            64 bytes from 10.5.2.2: icmp_seq=1 ttl=62 time=0.344 ms\n\
            64 bytes from 10.5.2.2: icmp_seq=2 ttl=62 time=0.017 ms\n\
            From 10.5.1.1 icmp_seq=3 Destination Host Unreachable\n\
            64 bytes from 10.5.2.2: icmp_seq=4 ttl=62 time=12.5 ms\n\
            64 bytes from 10.5.2.2: icmp_seq=5 ttl=62 time=100ms\n\
            \n--- 10.5.2.2 ping statistics ---\n\
            5 packets transmitted, 4 received, 20% packet loss, time 29ms\n\
            rtt min/avg/max/mdev = 0.017/28.2/100/41.0 ms\n";
        assert_eq!(ping_times_ms(out), vec![0.344, 0.017, 12.5, 100.0]);
        assert!(ping_times_ms("ping: connect: Network is unreachable\n").is_empty());
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        // Index round(199 · 0.5) = 100 → the value 101; round(199 · 0.99) = 197 → 198.
        assert_eq!(percentile(&v, 0.5), Some(101.0));
        assert_eq!(percentile(&v, 0.99), Some(198.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 1.0), Some(200.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn median_is_the_upper_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn proc_pid_stat_fields() {
        // Field 14 = 150, field 15 = 25; the command name holds spaces and a `)`.
        let stat = "4242 (fl (x) d) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 \
                    9 0 12345 100000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 \
                    17 1 0 0 0 0 0\n";
        assert_eq!(
            proc_pid_cpu(stat).unwrap(),
            ProcCpu {
                state: 'S',
                ticks: 175
            }
        );
        assert!(proc_pid_cpu("4242 (flanneld) Z 1 2 3").is_err());
        assert!(proc_pid_cpu("no parenthesis").is_err());
    }

    #[test]
    fn proc_stat_busy() {
        let stat = "cpu  100 5 50 9000 7 3 2 11 0 0\ncpu0 50 2 25 4500 3 1 1 5 0 0\nintr 1\n";
        assert_eq!(proc_stat_busy_ticks(stat).unwrap(), 100 + 5 + 50 + 3 + 2);
        assert!(proc_stat_busy_ticks("cpu0 1 2 3\n").is_err());
        assert!(proc_stat_busy_ticks("cpu  1 2 3\n").is_err());
        assert!(proc_stat_busy_ticks("cpu  1 x 3 4 5 6 7\n").is_err());
    }

    #[test]
    fn per_gb() {
        assert_eq!(cpu_seconds_per_gb(150, 100, 3e9), Some(0.5));
        assert_eq!(cpu_seconds_per_gb(0, 100, 3e9), Some(0.0));
        assert_eq!(cpu_seconds_per_gb(10, 100, 0.0), None);
        assert_eq!(cpu_seconds_per_gb(10, 0, 1e9), None);
    }
}
