//! The fast path for questions the zone answers (pure): the first answer to a question is
//! kept as bytes, and the same question asked again (any letter case, any id) is answered by
//! copying them and patching the id, the RD/CD bits and the question's spelling. No message
//! is parsed or built for it.
//!
//! Why hand-written: the general path (hickory-proto's parser and encoder, names built from
//! the index's strings) costs about 2.5 µs a question, as much as the system calls; a kept
//! answer costs a hash lookup and a copy. Only the plainest queries qualify (one question, no
//! answer/authority records, at most an EDNS0 version 0 OPT and nothing else, no compression
//! pointers); everything else, and every first question, takes the general path, whose answer
//! the tests compare byte for byte with this one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What [`parse`] reads off a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quick<'a> {
    pub id: u16,
    /// The question's name in wire form (labels and the final zero byte), as asked.
    pub qname: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    /// The UDP payload size of an EDNS0 OPT record (`None`: no EDNS0).
    pub edns: Option<u16>,
    /// The RD and CD bits of the query (the answer copies them).
    pub rd: bool,
    pub cd: bool,
}

impl Quick<'_> {
    /// The largest UDP answer the sender takes (as [`crate::respond::udp_limit`]).
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(size) => usize::from(size).clamp(
                crate::respond::CLASSIC_UDP_LIMIT,
                crate::respond::MAX_UDP_ANSWER,
            ),
            None => crate::respond::CLASSIC_UDP_LIMIT,
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Reads a plain query; `None` for anything else (the general path judges it).
pub fn parse(b: &[u8]) -> Option<Quick<'_>> {
    if b.len() < 12 {
        return None;
    }
    let id = u16_at(b, 0)?;
    let flags = u16_at(b, 2)?;
    // QR=0, opcode QUERY, no AA/TC, Z zero, rcode 0.
    if flags & 0xfe4f != 0 {
        return None;
    }
    let (qd, an, ns, ar) = (u16_at(b, 4)?, u16_at(b, 6)?, u16_at(b, 8)?, u16_at(b, 10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let len = usize::from(*b.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        i += 1 + len;
        if i - 12 > 255 {
            return None;
        }
    }
    let qname = b.get(12..i)?;
    let qtype = u16_at(b, i)?;
    let qclass = u16_at(b, i + 2)?;
    i += 4;
    let mut edns = None;
    if ar == 1 {
        // Root name, type OPT, class = payload size, TTL = ext-rcode/version/flags.
        if *b.get(i)? != 0 || u16_at(b, i + 1)? != 41 {
            return None;
        }
        let size = u16_at(b, i + 3)?;
        let (ext_rcode, version) = (*b.get(i + 5)?, *b.get(i + 6)?);
        if ext_rcode != 0 || version != 0 {
            return None;
        }
        let rdlen = usize::from(u16_at(b, i + 9)?);
        i += 11 + rdlen;
        edns = Some(size);
    }
    if i != b.len() {
        return None;
    }
    Some(Quick {
        id,
        qname,
        qtype,
        qclass,
        edns,
        rd: flags & 0x0100 != 0,
        cd: flags & 0x0010 != 0,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Lower-cased wire name.
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    edns: bool,
}

fn key(q: &Quick<'_>) -> Key {
    Key {
        name: q.qname.to_ascii_lowercase().into_boxed_slice(),
        qtype: q.qtype,
        qclass: q.qclass,
        edns: q.edns.is_some(),
    }
}

/// Kept answers of one zone generation (one per socket task: no locks). Answers from the
/// upstream cache are kept for [`UPSTREAM_KEEP`] only: their TTLs count down.
#[derive(Debug, Default)]
pub struct Answers {
    generation: u64,
    map: HashMap<Key, (Box<[u8]>, Option<Instant>)>,
    bytes: usize,
}

/// How long an answer from the upstream cache is served from the fast path: its TTLs are
/// then at most this much longer than what the cache would say.
pub const UPSTREAM_KEEP: Duration = Duration::from_secs(1);

/// Memory the kept answers of one thread may take (about 30 000 answers).
pub const MAX_BYTES: usize = 8 << 20;

impl Answers {
    /// Forgets everything when the zone changed.
    pub fn zone(&mut self, generation: u64) {
        if generation != self.generation {
            self.map.clear();
            self.bytes = 0;
            self.generation = generation;
        }
    }

    /// The answer to `q` from a kept one, if there is one that fits the sender's limit.
    pub fn answer(&self, q: &Quick<'_>, now: Instant) -> Option<Vec<u8>> {
        let (kept, until) = self.map.get(&key(q))?;
        if until.is_some_and(|t| now >= t) {
            return None;
        }
        let end = 12 + q.qname.len();
        if kept.len() > q.udp_limit() || kept.len() < end {
            return None;
        }
        let mut out = kept.to_vec();
        out[0..2].copy_from_slice(&q.id.to_be_bytes());
        out[2] = (out[2] & !0x01) | u8::from(q.rd);
        out[3] = (out[3] & !0x10) | (u8::from(q.cd) << 4);
        out[12..end].copy_from_slice(q.qname);
        Some(out)
    }

    /// Keeps `answer`, the general path's complete (untruncated) answer to `q` from the zone.
    pub fn keep(&mut self, q: &Quick<'_>, answer: &[u8]) {
        self.insert(q, answer, None);
    }

    /// Keeps an answer from the upstream cache until `until`.
    pub fn keep_until(&mut self, q: &Quick<'_>, answer: &[u8], until: Instant) {
        self.insert(q, answer, Some(until));
    }

    fn insert(&mut self, q: &Quick<'_>, answer: &[u8], until: Option<Instant>) {
        let end = 12 + q.qname.len();
        // Only an answer that echoes the question where the patch expects it.
        if answer.len() < end + 4 || answer[12..end] != *q.qname || answer[2] & 0x02 != 0 {
            return;
        }
        let k = key(q);
        let size = answer.len() + k.name.len() + 64;
        // Full: the answers kept stay (clearing would make a working set larger than the
        // bound miss every time); new questions take the general path until the zone changes.
        if self.bytes + size > MAX_BYTES && !self.map.contains_key(&k) {
            return;
        }
        self.bytes += size;
        if let Some((old, _)) = self.map.insert(k, (answer.into(), until)) {
            self.bytes -= (old.len() + 64 + q.qname.len()).min(self.bytes);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, edns: Option<u16>, rd: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = rd;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(s) = edns {
            let mut e = Edns::new();
            e.set_max_payload(s);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn reads_plain_queries_only() {
        let q = query("Web.Default.svc.cluster.local.", Some(1232), true);
        let p = parse(&q).unwrap();
        assert_eq!(p.id, 0x1234);
        assert_eq!(p.qtype, 1);
        assert_eq!(p.edns, Some(1232));
        assert!(p.rd && !p.cd);
        assert_eq!(&p.qname[..4], b"\x03Web");
        assert_eq!(parse(&query("a.b.", None, false)).unwrap().edns, None);
        // Truncated, trailing bytes, a response, a pointer, two questions: no.
        assert!(parse(&q[..q.len() - 1]).is_none());
        let mut t = q.clone();
        t.push(0);
        assert!(parse(&t).is_none());
        let mut r = q.clone();
        r[2] |= 0x80;
        assert!(parse(&r).is_none());
        let mut p2 = q.clone();
        p2[12] = 0xc0;
        assert!(parse(&p2).is_none());
        let mut two = q.clone();
        two[5] = 2;
        assert!(parse(&two).is_none());
        // EDNS version 1 is the general path's (BADVERS).
        let mut v1 = q.clone();
        let opt = v1.len() - 11;
        v1[opt + 6] = 1;
        assert!(parse(&v1).is_none());
        for n in 0..q.len() {
            // Every prefix: no panic.
            let _ = parse(&q[..n]);
        }
    }

    #[test]
    fn kept_answers_are_patched_for_each_asker() {
        let first = query("web.default.svc.cluster.local.", None, true);
        let q1 = parse(&first).unwrap();
        // A stand-in answer: the query with QR and AA set and one more byte.
        let mut answer = first.clone();
        answer[2] |= 0x84;
        answer.extend_from_slice(&[0, 1, 0, 1]);
        let mut a = Answers::default();
        a.zone(1);
        a.keep(&q1, &answer);
        let second = query("WEB.default.SVC.cluster.local.", None, false);
        let mut q2 = parse(&second).unwrap();
        q2.id = 7;
        let now = Instant::now();
        let got = a.answer(&q2, now).unwrap();
        assert_eq!(&got[0..2], &[0, 7]);
        assert_eq!(got[2] & 0x01, 0, "RD copied from the asker");
        assert_eq!(&got[12..12 + q2.qname.len()], q2.qname);
        assert_eq!(got.len(), answer.len());
        // With EDNS it is another question; a new zone forgets everything.
        assert!(a
            .answer(
                &parse(&query("web.default.svc.cluster.local.", Some(1232), true)).unwrap(),
                now
            )
            .is_none());
        // An upstream answer goes after its deadline.
        a.keep_until(&q1, &answer, now + UPSTREAM_KEEP);
        assert!(a.answer(&q2, now).is_some());
        assert!(a.answer(&q2, now + UPSTREAM_KEEP).is_none());
        a.zone(2);
        assert!(a.answer(&q2, now).is_none());
    }

    #[test]
    fn a_full_store_keeps_what_it_has() {
        let mut a = Answers::default();
        a.zone(1);
        let mut first = None;
        for i in 0..200_000u32 {
            let bytes = query(&format!("n{i}.example."), None, true);
            let q = parse(&bytes).unwrap();
            let mut answer = bytes.clone();
            answer[2] |= 0x84;
            a.keep(&q, &answer);
            if i == 0 {
                first = Some(bytes);
            }
        }
        assert!(a.bytes <= MAX_BYTES);
        assert!(a.len() > 10_000 && a.len() < 200_000, "{}", a.len());
        let first = first.unwrap();
        assert!(
            a.answer(&parse(&first).unwrap(), Instant::now()).is_some(),
            "the first stays"
        );
    }
}
