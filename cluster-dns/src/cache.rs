//! The cache of upstream answers (pure: the caller passes the time).
//!
//! Positive answers live as long as their smallest TTL (capped at `max_ttl`); negative ones
//! (NXDOMAIN, NODATA) as long as their SOA says (RFC 2308: the smaller of the SOA record's TTL
//! and its MINIMUM, capped at `max_negative_ttl`); negative answers without SOA, SERVFAIL and
//! truncated answers are not kept. Memory is bounded by an estimate of each entry's size:
//! when full, the oldest entries go first. Served records carry the time they have left.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};

/// What is cached per question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Lower-case, with the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// A cached answer, its TTLs already reduced by its age.
#[derive(Debug, Clone)]
pub struct Cached {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Cached {
    /// An upstream answer's rcode and records (its OPT record left out).
    pub fn from_message(msg: &Message) -> Cached {
        let keep = |rs: &[Record]| -> Vec<Record> {
            rs.iter()
                .filter(|r| r.record_type() != RecordType::OPT)
                .cloned()
                .collect()
        };
        Cached {
            rcode: msg.metadata.response_code,
            answers: keep(&msg.answers),
            authorities: keep(&msg.authorities),
            additionals: keep(&msg.additionals),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Upper bound on the estimated bytes of all entries.
    pub max_bytes: usize,
    pub max_ttl: Duration,
    pub max_negative_ttl: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_bytes: 8 << 20,
            max_ttl: Duration::from_secs(3600),
            max_negative_ttl: Duration::from_secs(1800),
        }
    }
}

#[derive(Debug)]
struct Entry {
    stored: Instant,
    expires: Instant,
    size: usize,
    seq: u64,
    answer: Cached,
}

#[derive(Debug)]
pub struct Cache {
    limits: CacheLimits,
    map: HashMap<CacheKey, Entry>,
    /// Insertion order (key, sequence number); stale pairs are skipped.
    order: VecDeque<(CacheKey, u64)>,
    bytes: usize,
    seq: u64,
}

fn record_size(r: &Record) -> usize {
    // Owner name, fixed fields and the data (an upper estimate of the heap it holds).
    64 + r.name.len()
        + match &r.data {
            RData::A(_) => 4,
            RData::AAAA(_) => 16,
            RData::CNAME(n) => n.0.len(),
            RData::PTR(n) => n.0.len(),
            RData::NS(n) => n.0.len(),
            RData::SOA(s) => s.mname.len() + s.rname.len() + 20,
            RData::TXT(t) => t.txt_data.iter().map(|d| d.len() + 16).sum(),
            _ => 512,
        }
}

impl Cache {
    pub fn new(limits: CacheLimits) -> Cache {
        Cache {
            limits,
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The answer for `key` if it is still fresh at `now`.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Cached> {
        let e = self.map.get(key)?;
        if now >= e.expires {
            self.remove(key);
            return None;
        }
        let age = now.saturating_duration_since(e.stored).as_secs() as u32;
        let mut a = e.answer.clone();
        for r in a
            .answers
            .iter_mut()
            .chain(a.authorities.iter_mut())
            .chain(a.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(a)
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.map.remove(key) {
            self.bytes -= e.size;
        }
    }

    /// How long `msg` may be kept (`None`: not at all).
    pub fn lifetime(&self, msg: &Message) -> Option<Duration> {
        if msg.metadata.truncation {
            return None;
        }
        let negative = match msg.metadata.response_code {
            ResponseCode::NXDomain => true,
            ResponseCode::NoError => msg.answers.is_empty(),
            _ => return None,
        };
        if negative {
            let soa = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(s) => Some((r.ttl, s.minimum)),
                _ => None,
            })?;
            let ttl = Duration::from_secs(u64::from(soa.0.min(soa.1)));
            Some(ttl.min(self.limits.max_negative_ttl))
        } else {
            let ttl = msg
                .answers
                .iter()
                .chain(msg.authorities.iter())
                .filter(|r| r.record_type() != RecordType::OPT)
                .map(|r| r.ttl)
                .min()?;
            Some(Duration::from_secs(u64::from(ttl)).min(self.limits.max_ttl))
        }
    }

    /// Keeps `msg` (an upstream answer to `key`) if it may be cached.
    pub fn insert(&mut self, key: CacheKey, msg: &Message, now: Instant) {
        let Some(life) = self.lifetime(msg) else {
            return;
        };
        if life.is_zero() {
            return;
        }
        let answer = Cached::from_message(msg);
        let size = 128
            + key.name.len()
            + answer
                .answers
                .iter()
                .chain(answer.authorities.iter())
                .chain(answer.additionals.iter())
                .map(record_size)
                .sum::<usize>();
        if size > self.limits.max_bytes / 4 {
            return;
        }
        self.remove(&key);
        while self.bytes + size > self.limits.max_bytes {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                self.remove(&old);
            }
        }
        self.seq += 1;
        self.order.push_back((key.clone(), self.seq));
        self.bytes += size;
        self.map.insert(
            key,
            Entry {
                stored: now,
                expires: now + life,
                size,
                seq: self.seq,
                answer,
            },
        );
        // Drop stale order entries now and then so the queue stays as long as the map.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

    fn key(n: &str) -> CacheKey {
        CacheKey {
            name: n.to_string(),
            qtype: 1,
            qclass: 1,
        }
    }

    fn answer(ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            Name::from_ascii("a.example.").unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        let n = Name::from_ascii("example.").unwrap();
        m.add_authority(Record::from_rdata(
            n.clone(),
            soa_ttl,
            RData::SOA(SOA::new(n.clone(), n, 1, 2, 3, 4, minimum)),
        ));
        m
    }

    #[test]
    fn positive_answers_age_and_expire() {
        let mut c = Cache::new(CacheLimits::default());
        let t0 = Instant::now();
        c.insert(key("a.example."), &answer(30), t0);
        let got = c
            .get(&key("a.example."), t0 + Duration::from_secs(10))
            .unwrap();
        assert_eq!(got.answers[0].ttl, 20);
        assert!(c
            .get(&key("a.example."), t0 + Duration::from_secs(30))
            .is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn ttl_is_capped() {
        let mut c = Cache::new(CacheLimits {
            max_ttl: Duration::from_secs(60),
            ..CacheLimits::default()
        });
        let t0 = Instant::now();
        c.insert(key("a.example."), &answer(86400), t0);
        assert!(c
            .get(&key("a.example."), t0 + Duration::from_secs(59))
            .is_some());
        assert!(c
            .get(&key("a.example."), t0 + Duration::from_secs(60))
            .is_none());
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let c = Cache::new(CacheLimits::default());
        assert_eq!(
            c.lifetime(&negative(ResponseCode::NXDomain, 300, 60)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            c.lifetime(&negative(ResponseCode::NoError, 30, 600)),
            Some(Duration::from_secs(30))
        );
        // No SOA: not cached.
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(c.lifetime(&m), None);
        // SERVFAIL and truncated answers: not cached.
        assert_eq!(c.lifetime(&negative(ResponseCode::ServFail, 30, 30)), None);
        let mut t = answer(30);
        t.metadata.truncation = true;
        assert_eq!(c.lifetime(&t), None);
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let mut c = Cache::new(CacheLimits {
            max_bytes: 20_000,
            ..CacheLimits::default()
        });
        let t0 = Instant::now();
        for i in 0..1000 {
            c.insert(key(&format!("n{i}.example.")), &answer(300), t0);
            assert!(c.bytes() <= 20_000);
        }
        assert!(c.len() < 1000 && c.len() > 10, "{}", c.len());
        assert!(c.get(&key("n999.example."), t0).is_some());
        assert!(c.get(&key("n0.example."), t0).is_none());
        assert!(c.order.len() <= 2 * c.map.len() + 64);
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_right() {
        let mut c = Cache::new(CacheLimits::default());
        let t0 = Instant::now();
        c.insert(key("a.example."), &answer(30), t0);
        let b = c.bytes();
        c.insert(key("a.example."), &answer(30), t0);
        assert_eq!(c.bytes(), b);
        assert_eq!(c.len(), 1);
    }
}
