//! Bounded logging on the peer path: a peer's problem is logged when it changes (not at every
//! event or resync), and the lines of one source are rate-limited, with the number left out
//! reported once the window ends. 1000 leases written at once used to give 130k lines in 4 s
//! ("peer unreachable … advertises alloc" for every peer at every change of the count).
//!
//! Pure: the caller passes the time, so tests drive it without waiting.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use subnet_lease::SubnetKey;

/// At most `burst` lines per `window`; what is left out is counted.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        LogLimiter {
            burst,
            window,
            started: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether one line may be logged at `now` (else it is counted as suppressed).
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.started {
            Some(s) if now.saturating_duration_since(s) < self.window => {}
            _ => {
                self.started = Some(now);
                self.used = 0;
            }
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Once the window in which lines were left out is over: how many (then reset).
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        let over = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if over && self.suppressed > 0 {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            None
        }
    }
}

/// What to log about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerLine {
    /// It has a problem now, or another one than before.
    Problem(SubnetKey, String),
    /// Its problem is gone (the reason it had).
    Cleared(SubnetKey, String),
}

/// The last problem reported per peer, and a limiter for the lines.
#[derive(Debug, Clone)]
pub struct PeerLog {
    states: BTreeMap<SubnetKey, String>,
    limit: LogLimiter,
}

/// Default limits: 20 lines per 10 s per source.
pub const BURST: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(10);

impl Default for PeerLog {
    fn default() -> Self {
        PeerLog::new(LogLimiter::new(BURST, WINDOW))
    }
}

impl PeerLog {
    pub fn new(limit: LogLimiter) -> Self {
        PeerLog {
            states: BTreeMap::new(),
            limit,
        }
    }

    /// Records every current peer's problem (None: fine) at `now`; forgets peers not listed.
    /// Returns the lines to log: only changes, within the rate limit.
    pub fn update(
        &mut self,
        now: Instant,
        peers: impl IntoIterator<Item = (SubnetKey, Option<String>)>,
    ) -> Vec<PeerLine> {
        let mut seen = BTreeMap::new();
        let mut lines = Vec::new();
        for (key, problem) in peers {
            let before = self.states.get(&key);
            let line = match (&problem, before) {
                (Some(p), Some(b)) if p == b => None,
                (Some(p), _) => Some(PeerLine::Problem(key, p.clone())),
                (None, Some(b)) => Some(PeerLine::Cleared(key, b.clone())),
                (None, None) => None,
            };
            if let Some(p) = problem {
                seen.insert(key, p);
            }
            if let Some(l) = line {
                if self.limit.admit(now) {
                    lines.push(l);
                }
            }
        }
        self.states = seen;
        lines
    }

    /// The number of lines left out, once their window is over.
    pub fn suppressed(&mut self, now: Instant) -> Option<u64> {
        self.limit.flush(now)
    }

    /// Logs the lines of [`PeerLog::update`] (problems as warnings) and any suppressed count,
    /// with `what` naming the source (e.g. "peer not routed by vxlan").
    pub fn log(
        &mut self,
        what: &str,
        now: Instant,
        peers: impl IntoIterator<Item = (SubnetKey, Option<String>)>,
    ) {
        for line in self.update(now, peers) {
            match line {
                PeerLine::Problem(peer, why) => tracing::warn!(%peer, "{what}: {why}"),
                PeerLine::Cleared(peer, was) => {
                    tracing::info!(%peer, "{what} no more (was: {was})")
                }
            }
        }
        if let Some(n) = self.suppressed(now) {
            tracing::warn!(
                "{what}: {n} more peer line(s) left out (rate limit {BURST} per {WINDOW:?})"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(i: u32) -> SubnetKey {
        SubnetKey::v4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0a05_0000 + (i << 8)), 24).unwrap(),
        )
    }

    #[test]
    fn limiter_allows_a_burst_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let admitted = (0..10).filter(|_| l.admit(t0)).count();
        assert_eq!(admitted, 3);
        assert_eq!(
            l.flush(t0 + Duration::from_secs(9)),
            None,
            "window not over"
        );
        assert!(!l.admit(t0 + Duration::from_secs(9)));
        assert_eq!(l.flush(t0 + Duration::from_secs(10)), Some(8));
        assert_eq!(l.flush(t0 + Duration::from_secs(11)), None, "reported once");
        // A new window: a new burst.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!((0..5).filter(|_| l.admit(t1)).count(), 3);
    }

    #[test]
    fn a_peer_is_logged_once_per_change() {
        let t0 = Instant::now();
        let mut log = PeerLog::default();
        let alloc = || Some("it advertises \"alloc\", which has no data plane".to_string());
        // 1000 leases written one by one, a resync after each: each peer logged once (rate
        // limited to the burst), not every peer at every resync.
        let mut lines = 0;
        for n in 1..=1000u32 {
            let now = t0 + Duration::from_millis(u64::from(n) * 4);
            lines += log.update(now, (0..n).map(|i| (key(i), alloc()))).len();
        }
        // 4 s: the window holds BURST lines; the rest is counted, not logged.
        assert_eq!(lines, BURST as usize);
        assert_eq!(log.suppressed(t0 + WINDOW), None, "its window is not over");
        assert_eq!(
            log.suppressed(t0 + WINDOW * 2),
            Some(1000 - u64::from(BURST))
        );
        // Nothing changes: nothing to say, however often asked.
        let later = t0 + WINDOW * 3;
        assert!(log
            .update(later, (0..1000).map(|i| (key(i), alloc())))
            .is_empty());
        // One peer's reason changes, another is fine again, one goes away (forgotten quietly).
        let lines = log.update(
            later + WINDOW,
            (0..999).map(|i| match i {
                0 => (key(i), Some("its backend udp cannot run here".into())),
                1 => (key(i), None),
                _ => (key(i), alloc()),
            }),
        );
        assert_eq!(
            lines,
            vec![
                PeerLine::Problem(key(0), "its backend udp cannot run here".into()),
                PeerLine::Cleared(key(1), alloc().unwrap()),
            ]
        );
        // The peer that went away and comes back with the same problem is news again.
        let lines = log.update(
            later + WINDOW * 2,
            vec![(key(999), alloc()), (key(2), alloc())],
        );
        assert_eq!(lines, vec![PeerLine::Problem(key(999), alloc().unwrap())]);
    }
}
