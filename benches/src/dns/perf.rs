//! dnsperf's output read back (pure): the summary of a run, and the per-query lines of `-v`
//! (answer code, name, type, latency in seconds) turned into latency percentiles and a check
//! of every answer code against the one the query must get.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use crate::zone::Rcode;

/// The figures of dnsperf's "Statistics" block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub qps: f64,
    /// Seconds.
    pub avg_latency: f64,
}

fn field<'a>(text: &'a str, label: &str) -> Result<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no {label:?} in dnsperf's output"))
}

fn first_number<T: std::str::FromStr>(s: &str, label: &str) -> Result<T> {
    s.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("dnsperf's {label:?} is not a number: {s:?}"))
}

/// Reads the "Statistics" block.
pub fn summary(text: &str) -> Result<Summary> {
    let get = |label: &str| field(text, label);
    Ok(Summary {
        sent: first_number(get("Queries sent:")?, "Queries sent")?,
        completed: first_number(get("Queries completed:")?, "Queries completed")?,
        lost: first_number(get("Queries lost:")?, "Queries lost")?,
        qps: first_number(get("Queries per second:")?, "Queries per second")?,
        avg_latency: first_number(get("Average Latency (s):")?, "Average Latency")?,
    })
}

/// What the `-v` lines of one run say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verbose {
    /// Seconds, sorted.
    pub latencies: Vec<f64>,
    pub timeouts: u64,
    /// Answers whose code is not the expected one (or for a query not asked).
    pub wrong: u64,
    /// The first of them, as dnsperf printed it.
    pub first_wrong: Option<String>,
}

impl Verbose {
    /// The latency below which a share `p` of the answers came (nearest rank), seconds.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = (p * self.latencies.len() as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }
}

/// The expected code of every (name, type) asked.
pub type Expect = HashMap<(String, String), Rcode>;

/// Reads the `> RCODE name type latency` lines (`> T name type` for a timeout).
pub fn verbose(text: &str, expect: &Expect) -> Result<Verbose> {
    let mut v = Verbose::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("> ") else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        match w.as_slice() {
            ["T", ..] => v.timeouts += 1,
            [code, name, qtype, latency] => {
                let l: f64 = latency
                    .parse()
                    .with_context(|| format!("dnsperf line {line:?}: latency"))?;
                v.latencies.push(l);
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let ok = expect
                    .get(&(name, qtype.to_string()))
                    .is_some_and(|e| e.as_str() == *code);
                if !ok {
                    v.wrong += 1;
                    if v.first_wrong.is_none() {
                        v.first_wrong = Some(line.to_string());
                    }
                }
            }
            _ => bail!("dnsperf line not understood: {line:?}"),
        }
    }
    v.latencies.sort_by(f64::total_cmp);
    Ok(v)
}

/// The median of `v` (`None` when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// VmRSS and VmHWM of a `/proc/PID/status` text, in kB.
pub fn memory_kb(status: &str) -> Result<(u64, u64)> {
    let get = |label: &str| -> Result<u64> { first_number(field(status, label)?, label) };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

/// utime + stime (clock ticks) of a `/proc/PID/stat` text: every thread of the process.
pub fn cpu_ticks(stat: &str) -> Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat without a command name")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/PID/stat: field {} missing", i + 3))
    };
    // Fields 14 and 15 of proc(5); the first after the name is field 3.
    Ok(get(11)? + get(12)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OUT: &str = "DNS Performance Testing Tool\nVersion 2.10.0\n\n[Status] Command line: dnsperf -s 127.0.0.1 -p 45353 -d q.txt -n 2 -v\n\
[Status] Sending queries (to 127.0.0.1:45353)\n\
> NOERROR a.ns.svc.cluster.local A 0.000107\n\
> NXDOMAIN nope.cluster.local A 0.000018\n\
> NOERROR a.ns.svc.cluster.local A 0.000010\n\
> NOERROR nope.cluster.local A 0.003839\n\
> T a.b A\n\
[Status] Testing complete (end of file)\n\nStatistics:\n\n\
  Queries sent:         5\n\
  Queries completed:    4 (80.00%)\n\
  Queries lost:         1 (20.00%)\n\n\
  Response codes:       NOERROR 3 (60.00%), NXDOMAIN 1 (20.00%)\n\
  Average packet size:  request 38, response 73\n\
  Run time (s):         0.005087\n\
  Queries per second:   786.318066\n\n\
  Average Latency (s):  0.000993 (min 0.000010, max 0.003839)\n\
  Latency StdDev (s):   0.001898\n";

    #[test]
    fn summary_and_verbose_lines() {
        let s = summary(OUT).unwrap();
        assert_eq!(
            s,
            Summary {
                sent: 5,
                completed: 4,
                lost: 1,
                qps: 786.318066,
                avg_latency: 0.000993
            }
        );
        assert!(summary("nothing").is_err());
        let mut e = Expect::new();
        e.insert(
            ("a.ns.svc.cluster.local".into(), "A".into()),
            Rcode::NoError,
        );
        e.insert(("nope.cluster.local".into(), "A".into()), Rcode::NxDomain);
        let v = verbose(OUT, &e).unwrap();
        assert_eq!(v.latencies, vec![0.00001, 0.000018, 0.000107, 0.003839]);
        assert_eq!(v.timeouts, 1);
        assert_eq!(v.wrong, 1);
        assert_eq!(
            v.first_wrong.as_deref(),
            Some("> NOERROR nope.cluster.local A 0.003839")
        );
        assert_eq!(v.percentile(0.5), Some(0.000018));
        assert_eq!(v.percentile(0.99), Some(0.003839));
        assert_eq!(v.percentile(0.0), Some(0.00001));
        assert_eq!(Verbose::default().percentile(0.5), None);
        assert!(verbose("> NOERROR x A notanumber\n", &e).is_err());
    }

    #[test]
    fn medians_and_memory() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let st = "Name:\tknotd\nVmHWM:\t   20480 kB\nVmRSS:\t   18000 kB\n";
        assert_eq!(memory_kb(st).unwrap(), (18000, 20480));
        assert!(memory_kb("Name: x\n").is_err());
        let stat =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 3 0 99 1000 200";
        assert_eq!(cpu_ticks(stat).unwrap(), 267);
        assert!(cpu_ticks("4242 (x) S 1").is_err());
    }
}
