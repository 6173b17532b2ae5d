//! Turning a query datagram into an answer (pure): parsing with the checks a server owes its
//! clients, answers from the [`Index`], answers from the cache, EDNS0 and truncation.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::cache::{CacheKey, Cached};
use crate::index::{Answer, Index, Lookup, QType, Rdata};

/// The UDP payload size this server advertises in its EDNS0 OPT record (the DNS flag day
/// 2020 value: no fragmentation on common paths).
pub const OUR_UDP_PAYLOAD: u16 = 1232;
/// Plain DNS over UDP: 512 bytes (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The largest UDP answer sent whatever a client advertises.
pub const MAX_UDP_ANSWER: usize = 4096;

/// What to do with a datagram.
#[derive(Debug)]
pub enum Parsed {
    /// A well-formed standard query with one question.
    Query(Box<Message>),
    /// A query this server refuses with an error code (FORMERR, NOTIMP, REFUSED): the bytes.
    Error(Vec<u8>, ResponseCode),
    /// Not worth an answer: too short to hold a header, or a response (answering responses
    /// would let two servers bounce packets forever).
    Drop,
}

fn error_reply(id: u16, op_code: OpCode, rcode: ResponseCode, query: Option<&Query>) -> Vec<u8> {
    let mut m = Message::error_msg(id, op_code, rcode);
    if let Some(q) = query {
        m.add_query(q.clone());
    }
    m.to_vec().unwrap_or_default()
}

/// Parses and checks a query.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < 12 || buf[2] & 0x80 != 0 {
        return Parsed::Drop;
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let op_code = OpCode::from_u8((buf[2] >> 3) & 0x0f);
    let msg = match Message::from_vec(buf) {
        Ok(m) => m,
        Err(_) => {
            let rcode = ResponseCode::FormErr;
            return Parsed::Error(error_reply(id, op_code, rcode, None), rcode);
        }
    };
    if msg.metadata.op_code != OpCode::Query {
        let rcode = ResponseCode::NotImp;
        return Parsed::Error(error_reply(id, op_code, rcode, None), rcode);
    }
    if msg.queries.len() != 1 || !msg.answers.is_empty() || !msg.authorities.is_empty() {
        let rcode = ResponseCode::FormErr;
        return Parsed::Error(error_reply(id, op_code, rcode, None), rcode);
    }
    let q = &msg.queries[0];
    if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        let rcode = ResponseCode::Refused;
        return Parsed::Error(error_reply(id, op_code, rcode, Some(q)), rcode);
    }
    if matches!(
        q.query_type(),
        RecordType::AXFR | RecordType::IXFR | RecordType::OPT
    ) {
        let rcode = ResponseCode::NotImp;
        return Parsed::Error(error_reply(id, op_code, rcode, Some(q)), rcode);
    }
    Parsed::Query(Box::new(msg))
}

/// The largest UDP answer `req`'s sender accepts.
pub fn udp_limit(req: &Message) -> usize {
    match &req.edns {
        Some(e) => usize::from(e.max_payload()).clamp(CLASSIC_UDP_LIMIT, MAX_UDP_ANSWER),
        None => CLASSIC_UDP_LIMIT,
    }
}

/// A response to `req` with its id, question, RD, RA and EDNS0 (BADVERS for an EDNS
/// version other than 0).
pub fn skeleton(req: &Message) -> Message {
    let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = req.metadata.checking_disabled;
    m.add_queries(req.queries.iter().cloned());
    if let Some(e) = &req.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_UDP_PAYLOAD);
        edns.set_version(0);
        m.set_edns(edns);
        if e.version() != 0 {
            m.metadata.response_code = ResponseCode::BADVERS;
        }
    }
    m
}

/// `msg` as bytes no longer than `limit` (truncated with TC set when the whole does not fit).
pub fn encode(msg: &Message, limit: usize) -> Vec<u8> {
    match msg.to_vec() {
        Ok(b) if b.len() <= limit => b,
        Ok(_) => msg.truncate().to_vec().unwrap_or_default(),
        Err(_) => {
            let mut m = msg.truncate();
            m.metadata.truncation = false;
            m.metadata.response_code = ResponseCode::ServFail;
            m.to_vec().unwrap_or_default()
        }
    }
}

/// The cache key of `req`'s question.
pub fn cache_key(q: &Query) -> CacheKey {
    CacheKey {
        name: q.name().to_ascii().to_ascii_lowercase(),
        qtype: u16::from(q.query_type()),
        qclass: u16::from(q.query_class()),
    }
}

fn name(s: &str) -> Option<Name> {
    let mut n = Name::from_ascii(s).ok()?;
    n.set_fqdn(true);
    Some(n)
}

fn rdata(d: &Rdata, ix: &Index) -> Option<RData> {
    Some(match d {
        Rdata::A(a) => RData::A(A(*a)),
        Rdata::Aaaa(a) => RData::AAAA(AAAA(*a)),
        Rdata::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(*priority, *weight, *port, name(target)?)),
        Rdata::Ptr(t) => RData::PTR(PTR(name(t)?)),
        Rdata::Cname(t) => RData::CNAME(CNAME(name(t)?)),
        Rdata::Ns(t) => RData::NS(NS(name(t)?)),
        Rdata::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
        Rdata::Soa => return soa(ix).map(|r| r.data),
    })
}

/// The zone's SOA record.
fn soa(ix: &Index) -> Option<Record> {
    let c = ix.config()?;
    let (mname, rname) = ix.soa_names()?;
    Some(Record::from_rdata(
        name(&c.zone)?,
        c.ttl,
        RData::SOA(SOA::new(
            name(&mname)?,
            name(&rname)?,
            ix.serial,
            7200,
            1800,
            86400,
            c.ttl,
        )),
    ))
}

fn records(answers: &[Answer], qname: &Name, ix: &Index) -> Vec<Record> {
    let ttl = ix.config().map_or(5, |c| c.ttl);
    answers
        .iter()
        .filter_map(|a| {
            let owner = match &a.owner {
                None => qname.clone(),
                Some(o) => name(o)?,
            };
            Some(Record::from_rdata(owner, ttl, rdata(&a.data, ix)?))
        })
        .collect()
}

/// What the server does with a query.
#[derive(Debug)]
pub enum Plan {
    /// The complete answer.
    Reply(Message),
    /// A name outside the zone: answer from the cache or the upstream resolvers.
    Forward,
    /// The answer so far ends in a CNAME to `target` outside the zone; resolve `target`
    /// upstream and append (ExternalName Services).
    Chase { partial: Message, target: Name },
}

/// Answers `req` (one question, checked by [`parse`]) from `ix`.
pub fn plan(ix: &Index, req: &Message) -> Plan {
    let q = &req.queries[0];
    let mut m = skeleton(req);
    if m.metadata.response_code == ResponseCode::BADVERS {
        return Plan::Reply(m);
    }
    let qtype = QType::from_u16(u16::from(q.query_type()));
    match ix.lookup(&q.name().to_ascii(), qtype) {
        Lookup::Forward => Plan::Forward,
        Lookup::NxDomain => {
            m.metadata.authoritative = true;
            m.metadata.response_code = ResponseCode::NXDomain;
            m.add_authorities(soa(ix));
            Plan::Reply(m)
        }
        Lookup::Found {
            answers,
            additionals,
            external,
        } => {
            m.metadata.authoritative = true;
            if answers.is_empty() {
                m.add_authorities(soa(ix));
            }
            m.insert_answers(records(&answers, q.name(), ix));
            m.insert_additionals(records(&additionals, q.name(), ix));
            match external.and_then(|t| name(&t)) {
                Some(target) => Plan::Chase { partial: m, target },
                None => Plan::Reply(m),
            }
        }
    }
}

/// The answer to `req` from an upstream answer (cached or fresh).
pub fn from_upstream(req: &Message, up: &Cached) -> Message {
    let mut m = skeleton(req);
    if m.metadata.response_code == ResponseCode::BADVERS {
        return m;
    }
    m.metadata.response_code = up.rcode;
    m.insert_answers(up.answers.clone());
    m.insert_authorities(up.authorities.clone());
    m.insert_additionals(up.additionals.clone());
    m
}

/// Completes a [`Plan::Chase`] with the upstream answer for the target.
pub fn chase_done(mut partial: Message, up: Option<&Cached>) -> Message {
    if let Some(up) = up {
        match up.rcode {
            ResponseCode::NoError => partial.add_answers(up.answers.iter().cloned()),
            ResponseCode::NXDomain => {
                partial.metadata.response_code = ResponseCode::NXDomain;
                partial.add_authorities(up.authorities.iter().cloned())
            }
            _ => &mut partial,
        };
    }
    partial
}

/// SERVFAIL for `req` (no upstream answered).
pub fn servfail(req: &Message) -> Message {
    let mut m = skeleton(req);
    if m.metadata.response_code != ResponseCode::BADVERS {
        m.metadata.response_code = ResponseCode::ServFail;
    }
    m
}

/// The `type` label of the metrics (a fixed set, so a client cannot grow the series).
pub fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::CNAME => "CNAME",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::MX => "MX",
        RecordType::ANY => "ANY",
        RecordType::HTTPS => "HTTPS",
        _ => "other",
    }
}

/// The `rcode` label of the metrics.
pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}
