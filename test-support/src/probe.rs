//! Numbered UDP probes between two pods: a sender thread in one namespace sends datagram
//! `0, 1, 2, …` (8 bytes, big endian) every `interval`, a receiver thread in the other records
//! each arrival. [`Probe::score`] turns a window of sequence numbers into the longest time
//! without a delivery and the number of datagrams never delivered.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{in_netns, Pod};

/// What one window scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Longest time without a delivery, less the pacing interval (ms).
    pub gap_ms: f64,
    /// Datagrams sent in the window and never delivered.
    pub lost: u64,
}

impl Score {
    /// The worse gap and the sum of the losses of several scores (e.g. both directions).
    pub fn combine(scores: &[Score]) -> Score {
        Score {
            gap_ms: scores.iter().map(|s| s.gap_ms).fold(0.0, f64::max),
            lost: scores.iter().map(|s| s.lost).sum(),
        }
    }
}

/// Scores the datagrams numbered `first..end` from `(sequence number, arrival ms)` records:
/// the longest interval between consecutive arrivals of that window (less `interval_ms`,
/// floored at 0) and the numbers that never arrived. A window with no arrival at all scores
/// its whole length as the gap.
pub fn score(arrivals: &[(u64, f64)], first: u64, end: u64, interval_ms: f64) -> Score {
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

/// One probe direction: a sender thread in one pod, a receiver thread in the other. Both stop
/// when `stop` is set (the receiver within 100 ms) and are joined on drop.
#[derive(Debug)]
pub struct Probe {
    sent: Arc<AtomicU64>,
    arrivals: Arc<Mutex<Vec<(u64, f64)>>>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts probing `to:port` from `from` every `interval`; arrival times are ms since
    /// `epoch`.
    pub fn start(
        from: &Pod,
        to: &Pod,
        port: u16,
        interval: Duration,
        epoch: Instant,
        stop: Arc<AtomicBool>,
    ) -> Result<Probe, String> {
        // The family of the pod address probed (an IPv6 probe binds [::]).
        let any = if to.ip.contains(':') { "::" } else { "0.0.0.0" };
        let rx = in_netns(&to.ns, move || UdpSocket::bind((any, port)))?
            .map_err(|e| format!("binding the probe receiver in {}: {e}", to.ns))?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let tx = in_netns(&from.ns, move || UdpSocket::bind((any, 0)))?
            .map_err(|e| format!("binding the probe sender in {}: {e}", from.ns))?;
        let dst = SocketAddr::new(
            to.ip
                .parse()
                .map_err(|e| format!("pod address {}: {e}", to.ip))?,
            port,
        );
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
        let (n, s2) = (sent.clone(), stop.clone());
        let sender = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s2.load(Ordering::Relaxed) {
                let seq = n.load(Ordering::Relaxed);
                // Unreachable moments answer with an error: the datagram counts as lost.
                let _ = tx.send_to(&seq.to_be_bytes(), dst);
                n.store(seq + 1, Ordering::Relaxed);
                next += interval;
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
            interval,
            stop,
            threads: vec![receiver, sender],
        })
    }

    /// The next sequence number to be sent.
    pub fn seq(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Scores the datagrams numbered `first..end`.
    pub fn score(&self, first: u64, end: u64) -> Score {
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        score(&a, first, end, self.interval.as_secs_f64() * 1000.0)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Scores a window over several probes while `during` runs: the worse direction's gap, the
/// losses added. Datagrams still in flight when `during` returns get 50 ms to land.
pub fn window<E>(probes: &[Probe], during: impl FnOnce() -> Result<(), E>) -> Result<Score, E> {
    let first: Vec<u64> = probes.iter().map(Probe::seq).collect();
    during()?;
    let end: Vec<u64> = probes.iter().map(Probe::seq).collect();
    std::thread::sleep(Duration::from_millis(50));
    let scores: Vec<Score> = probes
        .iter()
        .zip(first.iter().zip(&end))
        .map(|(p, (f, e))| p.score(*f, *e))
        .collect();
    Ok(Score::combine(&scores))
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
    fn scores_combine_to_the_worse_gap_and_the_sum_of_losses() {
        let c = Score::combine(&[
            Score {
                gap_ms: 3.0,
                lost: 1,
            },
            Score {
                gap_ms: 7.0,
                lost: 2,
            },
        ]);
        assert_eq!(
            c,
            Score {
                gap_ms: 7.0,
                lost: 3
            }
        );
    }
}
