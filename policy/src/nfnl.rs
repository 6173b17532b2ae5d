//! The table's differences sent to nf_tables as one netlink batch, without the `nft` program.
//!
//! `nft -f -` spends as long parsing and evaluating a big difference (thousands of rules,
//! hundreds of sets) as the kernel spends applying it. The difference uses a small, closed
//! vocabulary (the rule lines [`crate::compile`] writes, its four kinds of sets, the verdict
//! maps), so [`ops`] parses the rules and elements of [`compile::changes`]' steps (the steps
//! [`compile::diff`] writes as text, in the same order and keeping their text) and [`encode`] turns
//! them into the messages `nft` 1.0.6 sends for that text (checked with `nft --debug=netlink`
//! and by a root test that lists the table after both). [`apply`] sends them through the
//! `nft` crate's socket; [`Netlink`] is what the enforcer needs of it, [`FakeNetlink`] its
//! fake for unit tests.
//!
//! A rule line or element outside the vocabulary is [`Unknown`]: the enforcer then sends the
//! text difference through `nft` (never expected: a test parses every line the compiler
//! writes for random clusters).

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ::nft::encode::{
    self as enc, AddrField, Batch, BatchError, Elem, Msg, Reject, SetIds, SetKey, Table,
    Verdict as V,
};
use ::nft::NfNetlink;
use ipnet::IpNet;

use crate::compile::{self, Change, Family, Line, Ruleset, SetType, TABLE};

/// A rule line or set element the encoder does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not encodable for netlink: {0:?}")]
pub struct Unknown(pub String);

/// One step of a rule, in the order of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// `meta l4proto tcp|udp|sctp`.
    L4proto(u8),
    /// `ip|ip6 saddr|daddr @SET`.
    AddrIn(AddrField, String),
    /// `meta l4proto . th dport @SET`.
    ProtoPortIn(String),
    /// `ip|ip6 daddr . meta l4proto . th dport @SET`.
    DaddrProtoPortIn(String),
    /// `ct status ! dnat`.
    NotDnat,
    Reject(Reject),
    Return,
    Drop,
    Goto(String),
}

impl Item {
    fn is_final(&self) -> bool {
        matches!(
            self,
            Item::Reject(_) | Item::Return | Item::Drop | Item::Goto(_)
        )
    }
}

/// A rule line of a chain, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    items: Vec<Item>,
}

fn protocol(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

fn set_name(token: Option<&str>) -> Option<String> {
    token
        .and_then(|t| t.strip_prefix('@'))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Parses one rule line of a chain of the table of `family` (`<matches> <verdict>`).
pub fn parse_rule(family: Family, line: &str) -> Result<Rule, Unknown> {
    let unknown = || Unknown(line.to_string());
    let t: Vec<&str> = line.split_ascii_whitespace().collect();
    let fam = family.as_str();
    let mut items = Vec::new();
    let mut i = 0;
    let at = |i: usize, words: &[&str]| t.get(i..i + words.len()) == Some(words);
    while i < t.len() {
        let item = if at(i, &["meta", "l4proto", ".", "th", "dport"]) {
            i += 5;
            Item::ProtoPortIn(set_name(t.get(i).copied()).ok_or_else(unknown)?)
        } else if at(i, &["meta", "l4proto"]) {
            i += 2;
            Item::L4proto(t.get(i).and_then(|p| protocol(p)).ok_or_else(unknown)?)
        } else if at(
            i,
            &[fam, "daddr", ".", "meta", "l4proto", ".", "th", "dport"],
        ) {
            i += 8;
            Item::DaddrProtoPortIn(set_name(t.get(i).copied()).ok_or_else(unknown)?)
        } else if at(i, &[fam, "saddr"]) || at(i, &[fam, "daddr"]) {
            let field = if t[i + 1] == "saddr" {
                AddrField::Saddr
            } else {
                AddrField::Daddr
            };
            i += 2;
            Item::AddrIn(field, set_name(t.get(i).copied()).ok_or_else(unknown)?)
        } else if at(i, &["ct", "status", "!", "dnat"]) {
            i += 3;
            Item::NotDnat
        } else if at(i, &["reject", "with", "tcp", "reset"]) {
            i += 3;
            Item::Reject(Reject::TcpReset)
        } else if family == Family::Ip && at(i, &["reject", "with", "icmp", "type"])
            || family == Family::Ip6 && at(i, &["reject", "with", "icmpv6", "type"])
        {
            i += 4;
            if t.get(i) != Some(&"admin-prohibited") {
                return Err(unknown());
            }
            Item::Reject(Reject::AdminProhibited(family))
        } else if at(i, &["return"]) {
            Item::Return
        } else if at(i, &["drop"]) {
            Item::Drop
        } else if at(i, &["goto"]) {
            i += 1;
            Item::Goto(t.get(i).ok_or_else(unknown)?.to_string())
        } else {
            return Err(unknown());
        };
        i += 1;
        items.push(item);
    }
    // Exactly one verdict, at the end (anything after it would never run in nft either, but
    // the compiler never writes that: refuse rather than guess).
    let finals = items.iter().filter(|it| it.is_final()).count();
    if finals != 1 || !items.last().is_some_and(Item::is_final) {
        return Err(unknown());
    }
    Ok(Rule {
        text: line.to_string(),
        items,
    })
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn to_int(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr_of(family: Family, s: &str) -> Option<IpAddr> {
    let a: IpAddr = s.parse().ok()?;
    (crate::eval::family_of(a) == family).then_some(a)
}

/// One set element, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Element {
    /// An address interval (`A`, `A/len`, `A-B`) as integers.
    Addrs(u128, u128),
    /// `proto . port[-end]`.
    Ports(u8, u16, u16),
    /// `A . proto . port`.
    Named(IpAddr, u8, u16),
    /// `A . B`.
    Pair(IpAddr, IpAddr),
}

fn parse_element(family: Family, ty: SetType, text: &str) -> Option<Element> {
    let parts: Vec<&str> = text.split(" . ").collect();
    match (ty, parts.as_slice()) {
        (SetType::Addrs, [one]) => {
            if let Some((lo, hi)) = one.split_once('-') {
                let (lo, hi) = (to_int(addr_of(family, lo)?), to_int(addr_of(family, hi)?));
                (lo <= hi).then_some(Element::Addrs(lo, hi))
            } else if one.contains('/') {
                let net: IpNet = one.parse().ok()?;
                (crate::eval::family_of(net.network()) == family && net.network() == net.addr())
                    .then(|| Element::Addrs(to_int(net.network()), to_int(net.broadcast())))
            } else {
                let a = to_int(addr_of(family, one)?);
                Some(Element::Addrs(a, a))
            }
        }
        (SetType::Ports, [proto, ports]) => {
            let p = protocol(proto)?;
            let (lo, hi) = match ports.split_once('-') {
                Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
                None => {
                    let n = ports.parse().ok()?;
                    (n, n)
                }
            };
            (lo <= hi).then_some(Element::Ports(p, lo, hi))
        }
        (SetType::Named, [addr, proto, port]) => Some(Element::Named(
            addr_of(family, addr)?,
            protocol(proto)?,
            port.parse().ok()?,
        )),
        (SetType::Pairs, [a, b]) => Some(Element::Pair(addr_of(family, a)?, addr_of(family, b)?)),
        _ => None,
    }
}

fn proto_port(p: u8, port: u16) -> [u8; 8] {
    let [hi, lo] = port.to_be_bytes();
    [p, 0, 0, 0, hi, lo, 0, 0]
}

/// The elements of a set of type `ty`, as nft sends them for `add` (`adding`) or `delete`;
/// `new`: the set is created in the same batch.
fn set_elems<'a>(
    family: Family,
    ty: SetType,
    elements: &[SetElement],
    adding: bool,
    new: bool,
) -> Vec<Elem<'a>> {
    if ty == SetType::Addrs {
        let mut ranges: Vec<(u128, u128)> = elements
            .iter()
            .filter_map(|e| match e.parsed {
                Element::Addrs(lo, hi) => Some((lo, hi)),
                _ => None,
            })
            .collect();
        ranges.sort_unstable();
        let len = match family {
            Family::Ip => 4,
            Family::Ip6 => 16,
        };
        return enc::address_intervals(&ranges, len, adding && new);
    }
    elements
        .iter()
        .map(|e| match &e.parsed {
            Element::Ports(p, lo, hi) => {
                let (start, end) = (proto_port(*p, *lo).to_vec(), proto_port(*p, *hi).to_vec());
                if adding || lo != hi {
                    Elem::range(start, end)
                } else {
                    Elem::key(start)
                }
            }
            Element::Named(a, p, port) => {
                let mut k = addr_bytes(*a);
                k.extend_from_slice(&proto_port(*p, *port));
                Elem::key(k)
            }
            Element::Pair(a, b) => {
                let mut k = addr_bytes(*a);
                k.extend_from_slice(&addr_bytes(*b));
                Elem::key(k)
            }
            Element::Addrs(lo, _) => Elem::key(lo.to_be_bytes().to_vec()),
        })
        .collect()
}

fn set_key(ty: SetType) -> SetKey {
    match ty {
        SetType::Addrs => SetKey::AddrIntervals,
        SetType::Ports => SetKey::ProtoPortIntervals,
        SetType::Named => SetKey::AddrProtoPort,
        SetType::Pairs => SetKey::AddrPair,
    }
}

/// A set element: its text (for the script line) and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElement {
    text: String,
    parsed: Element,
}

impl SetElement {
    fn parse(family: Family, ty: SetType, text: String) -> Result<SetElement, Unknown> {
        match parse_element(family, ty, &text) {
            Some(parsed) => Ok(SetElement { text, parsed }),
            None => Err(Unknown(text)),
        }
    }
}

impl AsRef<str> for SetElement {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl AsRef<str> for Rule {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

/// One step of a difference: [`compile::changes`]' step with its rule or elements parsed.
pub type Op = Change<Rule, SetElement>;

/// [`Op`]s of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ops {
    pub family: Family,
    pub ops: Vec<Op>,
}

impl Ops {
    /// The script `nft -f -` would be given for these steps (what [`compile::diff`] writes).
    pub fn script(&self) -> String {
        compile::script(self.family, &self.ops)
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The text of step `i` of [`steps`] (for errors).
    fn line(&self, i: usize) -> String {
        self.ops
            .get(i)
            .map(|op| Line(self.family, op).to_string())
            .unwrap_or_default()
    }
}

/// The steps from `old` (what the kernel has) to `new`: [`compile::changes`] with every rule
/// and element parsed; empty when nothing changed. Fails on a rule line or element outside
/// the vocabulary.
pub fn ops(old: &Ruleset, new: &Ruleset) -> Result<Ops, Unknown> {
    let family = new.family;
    let ops = compile::changes(old, new)
        .into_iter()
        .map(|c| {
            c.try_map(
                |rule| parse_rule(family, &rule),
                |ty, e| SetElement::parse(family, ty, e),
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(Ops { family, ops })
}

/// What one message of the batch does.
#[derive(Debug)]
enum Kind<'a> {
    AddChain(&'a str),
    FlushChain(&'a str),
    DeleteChain(&'a str),
    DeleteSet(&'a str),
    AddSet(&'a str, SetKey),
    AddElements(&'a str, Vec<Elem<'a>>),
    DeleteElements(&'a str, Vec<Elem<'a>>),
    AddRule(&'a str, &'a [Item]),
}

/// One message of the batch: (part of) an op.
#[derive(Debug)]
struct Step<'a> {
    ops: &'a Ops,
    op: usize,
    /// (this part, parts): an op's elements may take several messages.
    part: (usize, usize),
    kind: Kind<'a>,
}

impl fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ops.line(self.op))?;
        if self.part.1 > 1 {
            write!(f, " (message {} of {})", self.part.0 + 1, self.part.1)?;
        }
        Ok(())
    }
}

/// The messages of `ops` (one per op, several for long element lists).
fn steps(ops: &Ops) -> Vec<Step<'_>> {
    let family = ops.family;
    let mut out = Vec::with_capacity(ops.ops.len());
    let one = |op, kind| Step {
        ops,
        op,
        part: (0, 1),
        kind,
    };
    for (i, op) in ops.ops.iter().enumerate() {
        let elems: (Vec<Elem<'_>>, &str, bool) = match op {
            Change::FlushChain(c) => {
                out.push(one(i, Kind::FlushChain(c)));
                continue;
            }
            Change::DeleteChain(c) => {
                out.push(one(i, Kind::DeleteChain(c)));
                continue;
            }
            Change::DeleteSet(s) => {
                out.push(one(i, Kind::DeleteSet(s)));
                continue;
            }
            Change::AddSet { name, ty } => {
                out.push(one(i, Kind::AddSet(name, set_key(*ty))));
                continue;
            }
            Change::AddChain(c) => {
                out.push(one(i, Kind::AddChain(c)));
                continue;
            }
            Change::AddRule { chain, rule } => {
                out.push(one(i, Kind::AddRule(chain, &rule.items)));
                continue;
            }
            Change::DeleteMapElements { map, keys } => (
                keys.iter().map(|a| Elem::key(addr_bytes(*a))).collect(),
                *map,
                false,
            ),
            Change::AddMapElements { map, elements } => (
                elements
                    .iter()
                    .map(|(a, c)| Elem::map(addr_bytes(*a), V::Jump(c)))
                    .collect(),
                *map,
                true,
            ),
            Change::DeleteElements { set, ty, elements } => {
                (set_elems(family, *ty, elements, false, false), set, false)
            }
            Change::AddElements {
                set,
                ty,
                elements,
                new,
            } => (set_elems(family, *ty, elements, true, *new), set, true),
        };
        let (elems, set, adding) = elems;
        let chunks = enc::element_chunks(&elems);
        let n = chunks.len();
        for (part, chunk) in chunks.into_iter().enumerate() {
            let chunk = chunk.to_vec();
            out.push(Step {
                ops,
                op: i,
                part: (part, n),
                kind: if adding {
                    Kind::AddElements(set, chunk)
                } else {
                    Kind::DeleteElements(set, chunk)
                },
            });
        }
    }
    out
}

fn rule_exprs(e: &mut enc::Exprs<'_>, family: Family, items: &[Item]) {
    for item in items {
        match item {
            Item::L4proto(p) => e.l4proto_is(*p),
            Item::AddrIn(field, set) => e.addr_in_set(family, *field, set),
            Item::ProtoPortIn(set) => e.proto_port_in_set(set),
            Item::DaddrProtoPortIn(set) => e.daddr_proto_port_in_set(family, set),
            Item::NotDnat => e.not_dnat(),
            Item::Reject(r) => e.reject(*r),
            Item::Return => e.verdict(V::Return),
            Item::Drop => e.verdict(V::Drop),
            Item::Goto(c) => e.verdict(V::Goto(c)),
        }
    }
}

fn message(step: &Step<'_>, seq: u32, set_ids: &mut SetIds) -> Msg {
    let family = step.ops.family;
    let t = Table::new(family, TABLE);
    match &step.kind {
        Kind::AddChain(c) => t.add_chain(c, seq),
        Kind::FlushChain(c) => t.flush_chain(c, seq),
        Kind::DeleteChain(c) => t.delete_chain(c, seq),
        Kind::DeleteSet(s) => t.delete_set(s, seq),
        Kind::AddSet(s, key) => t.add_set(s, *key, seq, set_ids),
        Kind::AddElements(s, elems) => t.add_elements(s, elems, seq, set_ids),
        Kind::DeleteElements(s, elems) => t.delete_elements(s, elems, seq),
        Kind::AddRule(c, items) => t.add_rule(c, seq, set_ids, |e| rule_exprs(e, family, items)),
    }
}

/// The number of messages `ops` take (to reserve their sequence numbers).
pub fn message_count(ops: &Ops) -> usize {
    steps(ops).len()
}

/// Encodes `ops` as one batch whose begin has sequence number `first_seq`. Fails, naming the
/// step, when a name or attribute does not fit its netlink field.
pub fn encode(ops: &Ops, first_seq: u32) -> Result<Batch, BatchError> {
    enc::batch(&steps(ops), first_seq, message)
}

/// Sends `ops` as one atomic batch through `nl` and waits for the kernel's verdict. On
/// failure nothing was changed; the error names the first refused step.
pub fn apply(nl: &NfNetlink, ops: &Ops) -> Result<(), ::nft::Error> {
    if ops.is_empty() {
        return Ok(());
    }
    let steps = steps(ops);
    let first = nl.reserve(steps.len() as u32);
    let batch = enc::batch(&steps, first, message)?;
    nl.send(&batch, |i| steps.get(i).map(ToString::to_string))
}

/// Sends a table's difference as one netlink batch (atomic: on failure nothing changed).
pub trait Netlink: Send + Sync {
    fn apply(&self, ops: Ops) -> impl Future<Output = Result<(), ::nft::Error>> + Send;
}

/// The kernel, through the socket (opened in the namespace of the table). The batch is
/// encoded and sent on a blocking thread: the kernel applies it inside `send`.
impl Netlink for Arc<NfNetlink> {
    async fn apply(&self, ops: Ops) -> Result<(), ::nft::Error> {
        let nl = Arc::clone(self);
        tokio::task::spawn_blocking(move || apply(&nl, &ops))
            .await
            .map_err(|e| ::nft::Error::Spawn {
                program: "netlink batch".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

/// A [`Netlink`] for unit tests: records each batch as its script; clones share the record.
#[derive(Debug, Clone, Default)]
pub struct FakeNetlink {
    state: Arc<Mutex<(Vec<String>, usize)>>,
}

impl FakeNetlink {
    /// The scripts of the batches accepted so far.
    pub fn batches(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The next batch is refused (and changes nothing).
    pub fn fail_next(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
    }
}

impl Netlink for FakeNetlink {
    async fn apply(&self, ops: Ops) -> Result<(), ::nft::Error> {
        // Encoded as for the kernel: a step that would not encode fails here too.
        encode(&ops, 1)?;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.1 > 0 {
            s.1 -= 1;
            return Err(::nft::Error::Refused {
                stderr: "injected".into(),
            });
        }
        s.0.push(ops.script());
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::compile::Set;

    #[test]
    fn the_compilers_vocabulary_parses_and_nothing_else() {
        let ok = [
            (Family::Ip, "ip saddr @peer/a meta l4proto . th dport @ports/b return"),
            (
                Family::Ip,
                "meta l4proto tcp ip saddr @peer/a ip daddr . meta l4proto . th dport @named/c return",
            ),
            (Family::Ip6, "ip6 daddr @peer/a drop"),
            (Family::Ip6, "ip6 daddr . meta l4proto . th dport @named/c goto in/x"),
            (Family::Ip, "meta l4proto tcp ct status ! dnat reject with tcp reset"),
            (Family::Ip, "reject with icmp type admin-prohibited"),
            (Family::Ip6, "reject with icmpv6 type admin-prohibited"),
            (Family::Ip, "meta l4proto sctp return"),
            (Family::Ip, "goto in/x"),
        ];
        for (family, line) in ok {
            parse_rule(family, line).unwrap_or_else(|e| panic!("{e}"));
        }
        let refused = [
            (Family::Ip, "ip6 saddr @peer/a return"),
            (Family::Ip6, "reject with icmp type admin-prohibited"),
            (Family::Ip, "counter accept"),
            (Family::Ip, "ip saddr @peer/a"),
            (Family::Ip, "return drop"),
            (Family::Ip, "return ip saddr @a"),
            (Family::Ip, "meta l4proto icmp return"),
            (Family::Ip, "ip saddr 10.0.0.1 return"),
            (Family::Ip, "goto"),
            (Family::Ip, "reject with icmp type host-unreachable"),
            (Family::Ip, ""),
        ];
        for (family, line) in refused {
            assert_eq!(
                parse_rule(family, line),
                Err(Unknown(line.into())),
                "{line}"
            );
        }
    }

    #[test]
    fn elements_parse_in_their_family_and_type() {
        let p = |f, ty, s| parse_element(f, ty, s);
        assert_eq!(
            p(Family::Ip, SetType::Addrs, "0.0.0.0/0"),
            Some(Element::Addrs(0, u128::from(u32::MAX)))
        );
        assert_eq!(
            p(Family::Ip6, SetType::Addrs, "::/0"),
            Some(Element::Addrs(0, u128::MAX))
        );
        assert_eq!(
            p(Family::Ip, SetType::Addrs, "10.0.0.2-10.0.0.9"),
            Some(Element::Addrs(0x0a00_0002, 0x0a00_0009))
        );
        assert_eq!(
            p(Family::Ip, SetType::Ports, "udp . 1000-2000"),
            Some(Element::Ports(17, 1000, 2000))
        );
        for (f, ty, s) in [
            (Family::Ip, SetType::Addrs, "fd00::1"),
            (Family::Ip6, SetType::Addrs, "10.0.0.1"),
            (Family::Ip, SetType::Addrs, "10.0.0.1/24"),
            (Family::Ip, SetType::Addrs, "10.0.0.9-10.0.0.2"),
            (Family::Ip, SetType::Ports, "tcp . 90-80"),
            (Family::Ip, SetType::Ports, "icmp . 1"),
            (Family::Ip, SetType::Named, "10.0.0.1 . tcp"),
            (Family::Ip6, SetType::Pairs, "fd00::1 . 10.0.0.1"),
        ] {
            assert_eq!(p(f, ty, s), None, "{s}");
        }
        // Keys as nft lays them out (nft --debug=netlink).
        let e = |ty, s: &str| SetElement::parse(Family::Ip, ty, s.to_string()).unwrap();
        assert_eq!(
            SetElement::parse(Family::Ip, SetType::Ports, "icmp . 1".into()),
            Err(Unknown("icmp . 1".into()))
        );
        let named = set_elems(
            Family::Ip,
            SetType::Named,
            &[e(SetType::Named, "10.5.1.2 . tcp . 8080")],
            true,
            false,
        );
        assert_eq!(named[0].key, [10, 5, 1, 2, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        // Port intervals: the end with every add, with a delete only for a range.
        let ports = [
            e(SetType::Ports, "tcp . 80"),
            e(SetType::Ports, "tcp . 81-90"),
        ];
        let add = set_elems(Family::Ip, SetType::Ports, &ports, true, false);
        assert_eq!(
            add[0].key_end.as_deref(),
            Some(&[6, 0, 0, 0, 0, 80, 0, 0][..])
        );
        assert_eq!(
            add[1].key_end.as_deref(),
            Some(&[6, 0, 0, 0, 0, 90, 0, 0][..])
        );
        let del = set_elems(Family::Ip, SetType::Ports, &ports, false, false);
        assert_eq!(del[0].key_end, None);
        assert!(del[1].key_end.is_some());
    }

    fn table(family: Family, peers: &[&str], rules: &[&str], map: &[(&str, &str)]) -> Ruleset {
        let mut rs = Ruleset::empty(family);
        rs.sets.insert(
            "peer/a".into(),
            Set {
                ty: SetType::Addrs,
                elements: peers.iter().map(|s| s.to_string()).collect(),
            },
        );
        rs.chains
            .insert("in/a".into(), rules.iter().map(|s| s.to_string()).collect());
        for (ip, chain) in map {
            rs.ingress.insert(ip.parse().unwrap(), chain.to_string());
        }
        rs
    }

    #[test]
    fn long_element_lists_take_several_messages() {
        let old = table(
            Family::Ip,
            &["10.0.0.1"],
            &["ip saddr @peer/a return"],
            &[("10.5.1.2", "in/a")],
        );
        let many: Vec<String> = (0..5000u32)
            .map(|i| std::net::Ipv4Addr::from(0x0a01_0000 + 2 * i).to_string())
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let new = table(Family::Ip, &many, &["drop"], &[("10.5.1.3", "in/a")]);
        let o = ops(&old, &new).unwrap();
        let steps = steps(&o);
        // Map element out, flush, set element out, set elements in (5000 intervals: 10000
        // elements in several messages), the rule, map element in.
        assert!(steps.len() > 6, "{}", steps.len());
        let names: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert!(names[3].starts_with("add element ip flannel-policy peer/a { 10.1.0.0, "));
        assert!(
            names[3].ends_with(" (message 1 of 4)"),
            "{}",
            &names[3][names[3].len() - 30..]
        );
        assert_eq!(message_count(&o), steps.len());
        let batch = encode(&o, 7).unwrap();
        assert_eq!(batch.last_seq, 7 + steps.len() as u32 + 1);
        // Nothing changed: no steps.
        assert!(ops(&new, &new).unwrap().is_empty());
        // A line outside the vocabulary is reported, not guessed.
        let odd = table(Family::Ip, &[], &["counter drop"], &[]);
        assert_eq!(ops(&old, &odd), Err(Unknown("counter drop".into())));
    }
}
