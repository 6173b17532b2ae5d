//! nf_tables messages and batches as bytes (pure: no socket, no clock).
//!
//! [`Msg`] builds one message attribute by attribute and checks every length against its
//! field; [`Exprs`] appends rule expressions the way `nft` 1.0.6 writes them (checked with
//! `nft --debug=netlink`/`--debug=mnl`); [`Table`] builds the messages for chains, rules,
//! sets and elements of a table of either family (`ip`, `ip6`), the free functions the same
//! for family `ip`; [`Elem`] is one set element as nft sends it (interval sets: a start and
//! an end element per interval, see [`address_intervals`]); [`batch`] frames messages as one
//! nfnetlink batch (begin, messages, end), which the kernel applies atomically.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::sys::*;
use crate::Family;

/// The longest name nf_tables takes (`NFT_NAME_MAXLEN` is 256 with the terminating NUL).
pub const MAX_NAME_LEN: usize = 255;

/// Why a message cannot be encoded. Nothing is sent then: a length that does not fit its
/// field would be cut silently, and the kernel would read something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("netlink attribute {kind} would be {len} bytes (at most {max})", max = u16::MAX)]
    AttributeTooLong { kind: u16, len: usize },
    #[error("name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("netlink message would be {len} bytes (at most {max})", max = u32::MAX)]
    MessageTooLong { len: usize },
    /// A step the caller's encoder does not handle (nothing is sent).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

/// A batch that cannot be encoded, with the step that could not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what}: {source}")]
pub struct BatchError {
    /// The step (its `Display`), `the batch begin` or `the batch end`.
    pub what: String,
    pub source: EncodeError,
}

/// One netlink message being built (header, nfgenmsg, attributes). Every length is checked
/// against its field; the first that does not fit is kept as the message's error and
/// reported by [`Msg::finish`].
#[derive(Debug)]
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<(usize, u16)>,
    err: Option<EncodeError>,
}

impl Msg {
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
            err: None,
        }
    }

    /// An nf_tables message of family `ip`.
    pub fn nft(msg: u16, flags: u16, seq: u32) -> Msg {
        Msg::nft_in(Family::Ip, msg, flags, seq)
    }

    /// An nf_tables message of `family`.
    pub fn nft_in(family: Family, msg: u16, flags: u16, seq: u32) -> Msg {
        Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            flags,
            seq,
            family.nfproto(),
            0,
        )
    }

    fn fail(&mut self, e: EncodeError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn bytes(&mut self, kind: u16, data: &[u8]) {
        let Ok(len) = u16::try_from(4 + data.len()) else {
            self.fail(EncodeError::AttributeTooLong {
                kind,
                len: 4 + data.len(),
            });
            return;
        };
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A NUL-terminated name: at most [`MAX_NAME_LEN`] bytes and no NUL inside (the kernel
    /// would read up to it, a different name).
    pub fn str(&mut self, kind: u16, s: &str) {
        let why = if s.is_empty() {
            Some("empty")
        } else if s.len() > MAX_NAME_LEN {
            Some("longer than 255 bytes")
        } else if s.contains('\0') {
            Some("contains NUL")
        } else {
            None
        };
        if let Some(why) = why {
            self.fail(EncodeError::BadName {
                name: s.chars().take(64).collect(),
                why,
            });
            return;
        }
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.bytes(kind, &data);
    }

    /// nf_tables integers travel in network byte order.
    pub fn u32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }

    pub fn u64(&mut self, kind: u16, v: u64) {
        self.bytes(kind, &v.to_be_bytes());
    }

    /// Opens a nested attribute, closed by [`Msg::end`].
    pub fn begin(&mut self, kind: u16) {
        self.nests.push((self.buf.len(), kind));
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end(&mut self) {
        let Some((at, kind)) = self.nests.pop() else {
            // Unbalanced nests are a bug of the caller; refuse the message.
            self.fail(EncodeError::AttributeTooLong { kind: 0, len: 0 });
            return;
        };
        let len = self.buf.len() - at;
        match u16::try_from(len) {
            Ok(l) => self.buf[at..at + 2].copy_from_slice(&l.to_ne_bytes()),
            Err(_) => self.fail(EncodeError::AttributeTooLong { kind, len }),
        }
    }

    /// `NFTA_DATA_VALUE` nested in `kind`.
    pub fn value(&mut self, kind: u16, data: &[u8]) {
        self.begin(kind);
        self.bytes(NFTA_DATA_VALUE, data);
        self.end();
    }

    /// A verdict nested in `kind`.
    pub fn verdict(&mut self, kind: u16, v: Verdict<'_>) {
        let (code, chain) = v.code();
        self.begin(kind);
        self.begin(NFTA_DATA_VERDICT);
        self.u32(NFTA_VERDICT_CODE, code as u32);
        if let Some(c) = chain {
            self.str(NFTA_VERDICT_CHAIN, c);
        }
        self.end();
        self.end();
    }

    /// Adds header flags (e.g. `NLM_F_ACK` on the last message of a batch).
    pub fn add_flags(&mut self, flags: u16) {
        let now = u16::from_ne_bytes([self.buf[6], self.buf[7]]);
        self.buf[6..8].copy_from_slice(&(now | flags).to_ne_bytes());
    }

    /// The message's bytes, or the first length or name that did not fit.
    pub fn finish(mut self) -> Result<Vec<u8>, EncodeError> {
        if let Some(e) = self.err {
            return Err(e);
        }
        if !self.nests.is_empty() {
            return Err(EncodeError::AttributeTooLong { kind: 0, len: 0 });
        }
        let len = u32::try_from(self.buf.len()).map_err(|_| EncodeError::MessageTooLong {
            len: self.buf.len(),
        })?;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        Ok(self.buf)
    }
}

/// A verdict of a rule or a map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    Drop,
    Return,
    Jump(&'a str),
    Goto(&'a str),
}

impl Verdict<'_> {
    fn code(&self) -> (i32, Option<&str>) {
        match self {
            Verdict::Drop => (NF_DROP, None),
            Verdict::Return => (NFT_RETURN, None),
            Verdict::Jump(c) => (NFT_JUMP, Some(c)),
            Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        }
    }
}

/// An address field of the network header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrField {
    Saddr,
    Daddr,
}

impl AddrField {
    /// (offset, length) of the field in the network header of `family`.
    fn place(self, family: Family) -> (u32, u32) {
        match (family, self) {
            (Family::Ip, AddrField::Saddr) => (SADDR, 4),
            (Family::Ip, AddrField::Daddr) => (DADDR, 4),
            (Family::Ip6, AddrField::Saddr) => (8, 16),
            (Family::Ip6, AddrField::Daddr) => (24, 16),
        }
    }
}

/// What a `reject` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// `reject with tcp reset`.
    TcpReset,
    /// `reject with icmp type admin-prohibited` (`ip`) or `reject with icmpv6 type
    /// admin-prohibited` (`ip6`).
    AdminProhibited(Family),
}

/// The register nft loads the 32-bit word `word` of a concatenation into (words counted
/// from the start of register 1): a 16-byte register where the word starts one
/// (`NFT_REG_1`..), else the 4-byte register (`NFT_REG32_00` is 8). Both name the same place;
/// nft prints and sends them so.
fn concat_register(word: u32) -> u32 {
    if word.is_multiple_of(4) {
        REG_1 + word / 4
    } else {
        8 + word
    }
}

/// Sets added earlier in the same batch, by name -> batch-local id (a rule that uses such a
/// set must name it by id as well: the kernel does not know it by name yet).
pub type SetIds = BTreeMap<String, u32>;

/// Expressions of one rule, appended inside `NFTA_RULE_EXPRESSIONS` (see [`add_rule`]).
#[derive(Debug)]
pub struct Exprs<'a> {
    m: &'a mut Msg,
    set_ids: &'a SetIds,
}

/// Offsets of the IPv4 source and destination addresses in the network header.
pub const SADDR: u32 = 12;
pub const DADDR: u32 = 16;

impl Exprs<'_> {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) {
        self.m.begin(NFTA_LIST_ELEM);
        self.m.str(NFTA_EXPR_NAME, name);
        self.m.begin(NFTA_EXPR_DATA);
        body(self.m);
        self.m.end();
        self.m.end();
    }

    /// `len` bytes of the network header at `offset` into register 1.
    pub fn payload(&mut self, offset: u32, len: u32) {
        self.payload_into(NFT_PAYLOAD_NETWORK_HEADER, offset, len, REG_1);
    }

    fn payload_into(&mut self, base: u32, offset: u32, len: u32, reg: u32) {
        self.expr("payload", |m| {
            m.u32(NFTA_PAYLOAD_DREG, reg);
            m.u32(NFTA_PAYLOAD_BASE, base);
            m.u32(NFTA_PAYLOAD_OFFSET, offset);
            m.u32(NFTA_PAYLOAD_LEN, len);
        });
    }

    fn l4proto_into(&mut self, reg: u32) {
        self.expr("meta", |m| {
            m.u32(NFTA_META_KEY, NFT_META_L4PROTO);
            m.u32(NFTA_META_DREG, reg);
        });
    }

    /// `th dport` into `reg`.
    fn dport_into(&mut self, reg: u32) {
        self.payload_into(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg);
    }

    /// `ip|ip6 saddr|daddr @SET` (an address set of the table's `family`).
    pub fn addr_in_set(&mut self, family: Family, field: AddrField, set: &str) {
        let (offset, len) = field.place(family);
        self.payload(offset, len);
        self.lookup(set);
    }

    /// `meta l4proto . th dport @SET` (a `inet_proto . inet_service` interval set): nft
    /// turns the protocol byte to network order over 2 bytes first, as interval keys are
    /// compared in network order.
    pub fn proto_port_in_set(&mut self, set: &str) {
        self.l4proto_into(REG_1);
        self.expr("byteorder", |m| {
            m.u32(NFTA_BYTEORDER_SREG, REG_1);
            m.u32(NFTA_BYTEORDER_DREG, REG_1);
            m.u32(NFTA_BYTEORDER_OP, NFT_BYTEORDER_HTON);
            m.u32(NFTA_BYTEORDER_LEN, 1);
            m.u32(NFTA_BYTEORDER_SIZE, 2);
        });
        self.dport_into(concat_register(1));
        self.lookup(set);
    }

    /// `ip|ip6 daddr . meta l4proto . th dport @SET` (a set without intervals): the three
    /// fields in consecutive 32-bit words from register 1.
    pub fn daddr_proto_port_in_set(&mut self, family: Family, set: &str) {
        let (offset, len) = AddrField::Daddr.place(family);
        self.payload(offset, len);
        let words = len / 4;
        self.l4proto_into(concat_register(words));
        self.dport_into(concat_register(words + 1));
        self.lookup(set);
    }

    /// `ct status ! dnat` (the connection was not DNATed).
    pub fn not_dnat(&mut self) {
        self.expr("ct", |m| {
            m.u32(NFTA_CT_KEY, NFT_CT_STATUS);
            m.u32(NFTA_CT_DREG, REG_1);
        });
        self.expr("bitwise", |m| {
            m.u32(NFTA_BITWISE_SREG, REG_1);
            m.u32(NFTA_BITWISE_DREG, REG_1);
            m.u32(NFTA_BITWISE_LEN, 4);
            m.value(NFTA_BITWISE_MASK, &IPS_DST_NAT.to_ne_bytes());
            m.value(NFTA_BITWISE_XOR, &[0; 4]);
        });
        self.cmp(NFT_CMP_EQ, &[0; 4]);
    }

    /// `reject with ...`.
    pub fn reject(&mut self, r: Reject) {
        let (kind, code) = match r {
            Reject::TcpReset => (NFT_REJECT_TCP_RST, 0),
            Reject::AdminProhibited(Family::Ip) => (NFT_REJECT_ICMP_UNREACH, ICMP_ADMIN_PROHIBITED),
            Reject::AdminProhibited(Family::Ip6) => {
                (NFT_REJECT_ICMP_UNREACH, ICMPV6_ADMIN_PROHIBITED)
            }
        };
        self.expr("reject", |m| {
            m.u32(NFTA_REJECT_TYPE, kind);
            m.bytes(NFTA_REJECT_ICMP_CODE, &[code]);
        });
    }

    /// Register 1 compared with `data` (`NFT_CMP_EQ` or `NFT_CMP_NEQ`).
    pub fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |m| {
            m.u32(NFTA_CMP_SREG, REG_1);
            m.u32(NFTA_CMP_OP, op);
            m.value(NFTA_CMP_DATA, data);
        });
    }

    /// `ip saddr`/`ip daddr` ([`SADDR`]/[`DADDR`]) equal to an address.
    pub fn addr_is(&mut self, offset: u32, addr: Ipv4Addr) {
        self.payload(offset, 4);
        self.cmp(NFT_CMP_EQ, &addr.octets());
    }

    /// The address at `offset` compared with a prefix (`op`: `NFT_CMP_EQ`/`NFT_CMP_NEQ`), as
    /// nft writes it: whole bytes are compared directly, other lengths through a mask.
    pub fn addr_in(&mut self, offset: u32, net: Ipv4Net, op: u32) {
        let len = u32::from(net.prefix_len());
        let network = net.network().octets();
        if len % 8 == 0 && len > 0 {
            self.payload(offset, len / 8);
            self.cmp(op, &network[..(len / 8) as usize]);
        } else {
            self.payload(offset, 4);
            let mask = net.netmask().octets();
            self.expr("bitwise", |m| {
                m.u32(NFTA_BITWISE_SREG, REG_1);
                m.u32(NFTA_BITWISE_DREG, REG_1);
                m.u32(NFTA_BITWISE_LEN, 4);
                m.value(NFTA_BITWISE_MASK, &mask);
                m.value(NFTA_BITWISE_XOR, &[0; 4]);
            });
            self.cmp(op, &network);
        }
    }

    /// `fib saddr type local`.
    pub fn local_source(&mut self) {
        self.expr("fib", |m| {
            m.u32(NFTA_FIB_DREG, REG_1);
            m.u32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
            m.u32(NFTA_FIB_FLAGS, NFTA_FIB_F_SADDR);
        });
        self.cmp(NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
    }

    /// `meta l4proto P` (P: the IP protocol number).
    pub fn l4proto_is(&mut self, protocol: u8) {
        self.l4proto_into(REG_1);
        self.cmp(NFT_CMP_EQ, &[protocol]);
    }

    fn immediate(&mut self, reg: u32, data: &[u8]) {
        self.expr("immediate", |m| {
            m.u32(NFTA_IMMEDIATE_DREG, reg);
            m.value(NFTA_IMMEDIATE_DATA, data);
        });
    }

    /// `dnat to A:PORT`.
    pub fn dnat(&mut self, addr: Ipv4Addr, port: u16) {
        self.immediate(REG_1, &addr.octets());
        self.immediate(REG_2, &port.to_be_bytes());
        self.expr("nat", |m| {
            m.u32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
            m.u32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4));
            m.u32(NFTA_NAT_REG_ADDR_MIN, REG_1);
            m.u32(NFTA_NAT_REG_PROTO_MIN, REG_2);
            m.u32(NFTA_NAT_FLAGS, NAT_PROTO_SPECIFIED);
        });
    }

    /// `update @SET { <register 1> }`.
    pub fn update_set(&mut self, set: &str) {
        let id = self.set_ids.get(set).copied();
        self.expr("dynset", |m| {
            m.str(NFTA_DYNSET_SET_NAME, set);
            if let Some(id) = id {
                m.u32(NFTA_DYNSET_SET_ID, id);
            }
            m.u32(NFTA_DYNSET_OP, NFT_DYNSET_OP_UPDATE);
            m.u32(NFTA_DYNSET_SREG_KEY, REG_1);
        });
    }

    /// Register 1 is in `@SET`.
    pub fn lookup(&mut self, set: &str) {
        let id = self.set_ids.get(set).copied();
        self.expr("lookup", |m| {
            m.str(NFTA_LOOKUP_SET, set);
            m.u32(NFTA_LOOKUP_SREG, REG_1);
            if let Some(id) = id {
                m.u32(NFTA_LOOKUP_SET_ID, id);
            }
        });
    }

    /// `numgen random mod N == 0`.
    pub fn one_in(&mut self, modulus: u32) {
        self.expr("numgen", |m| {
            m.u32(NFTA_NG_DREG, REG_1);
            m.u32(NFTA_NG_MODULUS, modulus);
            m.u32(NFTA_NG_TYPE, NFT_NG_RANDOM);
            m.u32(NFTA_NG_OFFSET, 0);
        });
        self.cmp(NFT_CMP_EQ, &0u32.to_ne_bytes());
    }

    pub fn verdict(&mut self, v: Verdict<'_>) {
        self.expr("immediate", |m| {
            m.u32(NFTA_IMMEDIATE_DREG, REG_VERDICT);
            m.verdict(NFTA_IMMEDIATE_DATA, v);
        });
    }
}

/// `add chain ip TABLE NAME` (a regular chain).
pub fn add_chain(table: &str, name: &str, seq: u32) -> Msg {
    Table::new(Family::Ip, table).add_chain(name, seq)
}

/// Asks for one chain of `ip TABLE` (answered by the chain or ENOENT).
pub fn get_chain(table: &str, name: &str, seq: u32) -> Msg {
    Table::new(Family::Ip, table).get_chain(name, seq)
}

/// `flush chain ip TABLE NAME`.
pub fn flush_chain(table: &str, name: &str, seq: u32) -> Msg {
    Table::new(Family::Ip, table).flush_chain(name, seq)
}

/// `delete chain ip TABLE NAME`.
pub fn delete_chain(table: &str, name: &str, seq: u32) -> Msg {
    Table::new(Family::Ip, table).delete_chain(name, seq)
}

/// `add rule ip TABLE CHAIN <exprs>`; `exprs` appends the expressions.
pub fn add_rule(
    table: &str,
    chain: &str,
    seq: u32,
    set_ids: &SetIds,
    exprs: impl FnOnce(&mut Exprs<'_>),
) -> Msg {
    Table::new(Family::Ip, table).add_rule(chain, seq, set_ids, exprs)
}

/// `add set ip TABLE NAME { type ipv4_addr; flags dynamic,timeout; timeout Ns; }`; records
/// the set's batch-local id in `set_ids`.
pub fn add_address_set(
    table: &str,
    name: &str,
    timeout_secs: u32,
    seq: u32,
    set_ids: &mut SetIds,
) -> Msg {
    let id = set_ids.len() as u32 + 1;
    set_ids.insert(name.to_string(), id);
    let mut m = Msg::nft(NFT_MSG_NEWSET, NLM_F_CREATE, seq);
    m.str(NFTA_SET_TABLE, table);
    m.str(NFTA_SET_NAME, name);
    m.u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT | NFT_SET_EVAL);
    m.u32(NFTA_SET_KEY_TYPE, TYPE_IPADDR);
    m.u32(NFTA_SET_KEY_LEN, 4);
    m.u32(NFTA_SET_ID, id);
    m.u64(NFTA_SET_TIMEOUT, u64::from(timeout_secs) * 1000);
    m.bytes(NFTA_SET_USERDATA, &SET_USERDATA_KEY_BIG_ENDIAN);
    m
}

/// `delete set ip TABLE NAME`.
pub fn delete_set(table: &str, name: &str, seq: u32) -> Msg {
    Table::new(Family::Ip, table).delete_set(name, seq)
}

/// `add element ip TABLE MAP { KEY : VERDICT }` (`key`: the key's bytes as nft lays them
/// out, each field of a concatenation padded to 4 bytes).
pub fn add_element(table: &str, map: &str, key: &[u8], verdict: Verdict<'_>, seq: u32) -> Msg {
    let e = Elem::map(key.to_vec(), verdict);
    Table::new(Family::Ip, table).add_elements(map, &[e], seq, &SetIds::new())
}

/// `delete element ip TABLE MAP { KEY }`.
pub fn delete_element(table: &str, map: &str, key: &[u8], seq: u32) -> Msg {
    Table::new(Family::Ip, table).delete_elements(map, &[Elem::key(key.to_vec())], seq)
}

/// A table of one family: the messages for its chains, rules, sets and elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table<'a> {
    pub family: Family,
    pub name: &'a str,
}

/// The key of a named set (with the table's family for the addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    /// `type ipv4_addr|ipv6_addr; flags interval`.
    AddrIntervals,
    /// `type inet_proto . inet_service; flags interval`.
    ProtoPortIntervals,
    /// `type ipv4_addr|ipv6_addr . inet_proto . inet_service`.
    AddrProtoPort,
    /// `type ipv4_addr . ipv4_addr` (`ipv6_addr . ipv6_addr`).
    AddrPair,
}

/// What a set declaration sends: flags, key type, key length, the field lengths of a
/// concatenation with intervals, userdata.
type SetDecl = (u32, u32, u32, &'static [u32], &'static [u8]);

impl SetKey {
    fn decl(self, family: Family) -> SetDecl {
        let (addr_type, alen) = match family {
            Family::Ip => (TYPE_IPADDR, 4),
            Family::Ip6 => (TYPE_IP6ADDR, 16),
        };
        let concat = &SET_USERDATA_CONCAT[..];
        match self {
            SetKey::AddrIntervals => (
                NFT_SET_INTERVAL,
                addr_type,
                alen,
                &[],
                &SET_USERDATA_KEY_BIG_ENDIAN[..],
            ),
            SetKey::ProtoPortIntervals => (
                NFT_SET_INTERVAL | NFT_SET_CONCAT,
                (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
                8,
                &[1, 2],
                concat,
            ),
            SetKey::AddrProtoPort => (
                0,
                (addr_type << 12) | (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
                alen + 8,
                &[],
                concat,
            ),
            SetKey::AddrPair => (0, (addr_type << 6) | addr_type, 2 * alen, &[], concat),
        }
    }
}

/// One set element as nft sends it: the key (each field of a concatenation padded to 4
/// bytes), for concatenated intervals the key the interval ends at, for plain interval sets
/// whether it ends an interval (then it is the first key after it) or starts one that runs
/// to the top of the space (`open`), for maps its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem<'a> {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub interval_end: bool,
    pub open: bool,
    pub verdict: Option<Verdict<'a>>,
}

impl<'a> Elem<'a> {
    /// A key alone.
    pub fn key(key: Vec<u8>) -> Elem<'a> {
        Elem {
            key,
            key_end: None,
            interval_end: false,
            open: false,
            verdict: None,
        }
    }

    /// A map element `KEY : VERDICT`.
    pub fn map(key: Vec<u8>, verdict: Verdict<'a>) -> Elem<'a> {
        Elem {
            verdict: Some(verdict),
            ..Elem::key(key)
        }
    }

    /// A concatenated interval `start-end` (nft sends the end with every added element, a
    /// single key too, and with a deleted one only when it differs from the start).
    pub fn range(start: Vec<u8>, end: Vec<u8>) -> Elem<'a> {
        Elem {
            key_end: Some(end),
            ..Elem::key(start)
        }
    }

    /// The bytes the element takes in a message (to split long lists).
    pub fn encoded_len(&self) -> usize {
        let pad = |n: usize| (n + 3) & !3;
        let key = |k: &[u8]| 4 + 4 + pad(k.len());
        let mut n = 4 + key(&self.key);
        if let Some(e) = &self.key_end {
            n += key(e);
        }
        if self.interval_end {
            n += 8;
        }
        if self.open {
            n += 4 + pad(ELEM_USERDATA_INTERVAL_OPEN.len());
        }
        if let Some(v) = &self.verdict {
            n += 4 + 4 + 8;
            if let (_, Some(c)) = v.code() {
                n += 4 + pad(c.len() + 1);
            }
        }
        n
    }
}

/// The elements of an address interval set for intervals `[lo, hi]` of addresses `len`
/// bytes long (4 or 16), ascending and disjoint, as nft sends them: a start element and an
/// end element at `hi + 1` per interval; an interval reaching the top of the space has no
/// end and is marked open. `leading_end`: the set is new (created in the same batch), for
/// which nft first sends an end element at the zero address when the first interval does
/// not start there.
pub fn address_intervals<'a>(
    ranges: &[(u128, u128)],
    len: usize,
    leading_end: bool,
) -> Vec<Elem<'a>> {
    let len = len.min(16);
    let bytes = |v: u128| v.to_be_bytes()[16 - len..].to_vec();
    let max = if len >= 16 {
        u128::MAX
    } else {
        (1u128 << (8 * len)) - 1
    };
    let mut out = Vec::with_capacity(2 * ranges.len() + 1);
    if leading_end && ranges.first().is_some_and(|(lo, _)| *lo != 0) {
        out.push(Elem {
            interval_end: true,
            ..Elem::key(bytes(0))
        });
    }
    for &(lo, hi) in ranges {
        if hi >= max {
            out.push(Elem {
                open: true,
                ..Elem::key(bytes(lo))
            });
        } else {
            out.push(Elem::key(bytes(lo)));
            out.push(Elem {
                interval_end: true,
                ..Elem::key(bytes(hi + 1))
            });
        }
    }
    out
}

/// The most element bytes one message carries (its element list is one attribute, whose
/// length is 16 bits); longer lists go in several messages, as nft sends them.
pub const MAX_ELEMENT_BYTES: usize = 60_000;

/// `elems` cut into lists that fit one message each ([`MAX_ELEMENT_BYTES`]).
pub fn element_chunks<'e, 'a>(elems: &'e [Elem<'a>]) -> Vec<&'e [Elem<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in elems.iter().enumerate() {
        let n = e.encoded_len();
        if bytes + n > MAX_ELEMENT_BYTES && i > start {
            out.push(&elems[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += n;
    }
    if start < elems.len() {
        out.push(&elems[start..]);
    }
    out
}

impl<'a> Table<'a> {
    pub fn new(family: Family, name: &'a str) -> Table<'a> {
        Table { family, name }
    }

    fn msg(&self, kind: u16, flags: u16, seq: u32) -> Msg {
        Msg::nft_in(self.family, kind, flags, seq)
    }

    /// `add chain FAMILY TABLE NAME` (a regular chain).
    pub fn add_chain(&self, name: &str, seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq);
        m.str(NFTA_CHAIN_TABLE, self.name);
        m.str(NFTA_CHAIN_NAME, name);
        m
    }

    /// Asks for one chain (answered by the chain or ENOENT).
    pub fn get_chain(&self, name: &str, seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_GETCHAIN, NLM_F_ACK, seq);
        m.str(NFTA_CHAIN_TABLE, self.name);
        m.str(NFTA_CHAIN_NAME, name);
        m
    }

    /// `flush chain FAMILY TABLE NAME`.
    pub fn flush_chain(&self, name: &str, seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_DELRULE, 0, seq);
        m.str(NFTA_RULE_TABLE, self.name);
        m.str(NFTA_RULE_CHAIN, name);
        m
    }

    /// `delete chain FAMILY TABLE NAME`.
    pub fn delete_chain(&self, name: &str, seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_DELCHAIN, 0, seq);
        m.str(NFTA_CHAIN_TABLE, self.name);
        m.str(NFTA_CHAIN_NAME, name);
        m
    }

    /// `add rule FAMILY TABLE CHAIN <exprs>`; `exprs` appends the expressions.
    pub fn add_rule(
        &self,
        chain: &str,
        seq: u32,
        set_ids: &SetIds,
        exprs: impl FnOnce(&mut Exprs<'_>),
    ) -> Msg {
        let mut m = self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq);
        m.str(NFTA_RULE_TABLE, self.name);
        m.str(NFTA_RULE_CHAIN, chain);
        m.begin(NFTA_RULE_EXPRESSIONS);
        exprs(&mut Exprs { m: &mut m, set_ids });
        m.end();
        m
    }

    /// `add set FAMILY TABLE NAME { type ...; [flags interval;] }`; records the set's
    /// batch-local id in `set_ids`.
    pub fn add_set(&self, name: &str, key: SetKey, seq: u32, set_ids: &mut SetIds) -> Msg {
        let id = set_ids.len() as u32 + 1;
        set_ids.insert(name.to_string(), id);
        let (flags, key_type, key_len, fields, userdata) = key.decl(self.family);
        let mut m = self.msg(NFT_MSG_NEWSET, NLM_F_CREATE, seq);
        m.str(NFTA_SET_TABLE, self.name);
        m.str(NFTA_SET_NAME, name);
        m.u32(NFTA_SET_FLAGS, flags);
        m.u32(NFTA_SET_KEY_TYPE, key_type);
        m.u32(NFTA_SET_KEY_LEN, key_len);
        m.u32(NFTA_SET_ID, id);
        if !fields.is_empty() {
            m.begin(NFTA_SET_DESC);
            m.begin(NFTA_SET_DESC_CONCAT);
            for f in fields {
                m.begin(NFTA_LIST_ELEM);
                m.u32(NFTA_SET_FIELD_LEN, *f);
                m.end();
            }
            m.end();
            m.end();
        }
        m.bytes(NFTA_SET_USERDATA, userdata);
        m
    }

    /// `delete set FAMILY TABLE NAME`.
    pub fn delete_set(&self, name: &str, seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_DELSET, 0, seq);
        m.str(NFTA_SET_TABLE, self.name);
        m.str(NFTA_SET_NAME, name);
        m
    }

    fn elements(&self, m: &mut Msg, set: &str, id: Option<u32>, elems: &[Elem<'_>]) {
        m.str(NFTA_SET_ELEM_LIST_TABLE, self.name);
        m.str(NFTA_SET_ELEM_LIST_SET, set);
        if let Some(id) = id {
            m.u32(NFTA_SET_ELEM_LIST_SET_ID, id);
        }
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elems {
            m.begin(NFTA_LIST_ELEM);
            if e.interval_end {
                m.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            m.value(NFTA_SET_ELEM_KEY, &e.key);
            if let Some(end) = &e.key_end {
                m.value(NFTA_SET_ELEM_KEY_END, end);
            }
            if let Some(v) = e.verdict {
                m.verdict(NFTA_SET_ELEM_DATA, v);
            }
            if e.open {
                m.bytes(NFTA_SET_ELEM_USERDATA, &ELEM_USERDATA_INTERVAL_OPEN);
            }
            m.end();
        }
        m.end();
    }

    /// `add element FAMILY TABLE SET { ... }` (a set added earlier in the batch is named by
    /// its id too, as nft does).
    pub fn add_elements(&self, set: &str, elems: &[Elem<'_>], seq: u32, set_ids: &SetIds) -> Msg {
        let mut m = self.msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, seq);
        self.elements(&mut m, set, set_ids.get(set).copied(), elems);
        m
    }

    /// `delete element FAMILY TABLE SET { ... }`.
    pub fn delete_elements(&self, set: &str, elems: &[Elem<'_>], seq: u32) -> Msg {
        let mut m = self.msg(NFT_MSG_DELSETELEM, 0, seq);
        self.elements(&mut m, set, None, elems);
        m
    }
}

/// An encoded batch: `steps[i]` is the message with sequence number `first_seq + 1 + i`
/// (`first_seq` is the batch begin, `last_seq` the batch end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub first_seq: u32,
    pub last_seq: u32,
}

/// Encodes `steps` as one batch, `message` giving each step's message for its sequence
/// number. The last step asks for an acknowledgement, so that a successful batch is
/// confirmed (errors are always reported).
///
/// Fails, naming the step, when a name or attribute does not fit its netlink field (a name
/// over 255 bytes or with a NUL, an attribute over 64 KiB): nothing is cut silently.
pub fn batch<T: Display>(
    steps: &[T],
    first_seq: u32,
    mut message: impl FnMut(&T, u32, &mut SetIds) -> Msg,
) -> Result<Batch, BatchError> {
    let subsys = NFNL_SUBSYS_NFTABLES;
    let fail = |what: &dyn Display, source: EncodeError| BatchError {
        what: what.to_string(),
        source,
    };
    let mut bytes = Msg::new(NFNL_MSG_BATCH_BEGIN, 0, first_seq, 0, subsys)
        .finish()
        .map_err(|e| fail(&"the batch begin", e))?;
    let mut set_ids = SetIds::new();
    let mut seq = first_seq;
    for (i, step) in steps.iter().enumerate() {
        seq = seq.wrapping_add(1);
        let mut msg = message(step, seq, &mut set_ids);
        if i + 1 == steps.len() {
            msg.add_flags(NLM_F_ACK);
        }
        bytes.extend_from_slice(&msg.finish().map_err(|e| fail(step, e))?);
    }
    seq = seq.wrapping_add(1);
    bytes.extend_from_slice(
        &Msg::new(NFNL_MSG_BATCH_END, 0, seq, 0, subsys)
            .finish()
            .map_err(|e| fail(&"the batch end", e))?,
    );
    Ok(Batch {
        bytes,
        first_seq,
        last_seq: seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::attributes as attrs;

    #[test]
    fn over_long_attributes_and_bad_names_are_errors_not_cut() {
        // An attribute of 70 000 bytes does not fit the 16-bit length: an error.
        let mut m = Msg::nft(NFT_MSG_NEWCHAIN, 0, 1);
        m.bytes(NFTA_CHAIN_NAME, &vec![b'a'; 70_000]);
        assert!(matches!(
            m.finish(),
            Err(EncodeError::AttributeTooLong { len: 70_004, .. })
        ));
        // Nor does a nest whose content grew past it.
        let mut m = Msg::nft(NFT_MSG_NEWRULE, 0, 1);
        m.begin(NFTA_RULE_EXPRESSIONS);
        for _ in 0..100 {
            m.bytes(NFTA_DATA_VALUE, &[0; 1000]);
        }
        m.end();
        assert!(matches!(
            m.finish(),
            Err(EncodeError::AttributeTooLong {
                kind: NFTA_RULE_EXPRESSIONS,
                ..
            })
        ));
    }

    #[test]
    fn a_step_that_does_not_encode_is_named() {
        let steps = ["first", "second"];
        let e = batch(&steps, 1, |step, seq, _| {
            add_chain("t", if *step == "second" { "" } else { "c" }, seq)
        })
        .expect_err("refused");
        assert_eq!(e.what, "second");
        assert_eq!(e.to_string(), "cannot encode second: name \"\": empty");
    }

    fn get(a: &[(u16, Vec<u8>)], kind: u16) -> Vec<u8> {
        a.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no attribute {kind}"))
    }

    #[test]
    fn interval_elements_as_nft_sends_them() {
        // nft --debug=netlink, `add element ip t p { 10.5.2.4, 255.255.255.0/24 }` to a set
        // added in the same batch: 0 (end), 10.5.2.4, 10.5.2.5 (end), 255.255.255.0 (open).
        let ip = |s: &str| u128::from(u32::from(s.parse::<Ipv4Addr>().expect("addr")));
        let e = address_intervals(
            &[
                (ip("10.5.2.4"), ip("10.5.2.4")),
                (ip("255.255.255.0"), ip("255.255.255.255")),
            ],
            4,
            true,
        );
        let got: Vec<(Vec<u8>, bool, bool)> = e
            .iter()
            .map(|e| (e.key.clone(), e.interval_end, e.open))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 0, 0, 0], true, false),
                (vec![10, 5, 2, 4], false, false),
                (vec![10, 5, 2, 5], true, false),
                (vec![255, 255, 255, 0], false, true),
            ]
        );
        // To an existing set: no leading end. The whole space: one open element at zero.
        assert_eq!(address_intervals(&[(5, 5)], 4, false).len(), 2);
        let all = address_intervals(&[(0, u128::from(u32::MAX))], 4, true);
        assert_eq!(all.len(), 1);
        assert!(all[0].open && all[0].key == [0; 4]);
        let all6 = address_intervals(&[(0, u128::MAX)], 16, true);
        assert_eq!(all6.len(), 1);
        assert!(all6[0].open && all6[0].key == [0; 16]);
        // An IPv6 interval: start and the address after its end, 16 bytes each.
        let v6 = address_intervals(&[(1, 5)], 16, false);
        assert_eq!(v6[1].key[15], 6);
        assert!(v6[1].interval_end && v6[1].key.len() == 16);
        // The open element carries nft's userdata; ends carry the flag.
        let mut ids = SetIds::new();
        let m = Table::new(Family::Ip, "t")
            .add_elements("p", &e, 1, &ids)
            .finish()
            .expect("encodes");
        let a = attrs(&m[20..]);
        let elems = attrs(&get(&a, NFTA_SET_ELEM_LIST_ELEMENTS));
        let first = attrs(&elems[0].1);
        assert_eq!(get(&first, NFTA_SET_ELEM_FLAGS), vec![0, 0, 0, 1]);
        let last = attrs(&elems[3].1);
        assert_eq!(get(&last, NFTA_SET_ELEM_USERDATA), vec![1, 4, 1, 0, 0, 0]);
        // A set added earlier in the batch is named by its id too.
        Table::new(Family::Ip, "t").add_set("p", SetKey::AddrIntervals, 1, &mut ids);
        let m = Table::new(Family::Ip, "t")
            .add_elements("p", &e, 2, &ids)
            .finish()
            .expect("encodes");
        assert_eq!(
            get(&attrs(&m[20..]), NFTA_SET_ELEM_LIST_SET_ID),
            vec![0, 0, 0, 1]
        );
    }

    #[test]
    fn set_declarations_match_what_nft_sends() {
        // nft --debug=mnl for `add set ip t ports { type inet_proto . inet_service; flags
        // interval; }` and `add set ip6 t named { type ipv6_addr . inet_proto . inet_service; }`.
        let mut ids = SetIds::new();
        let m = Table::new(Family::Ip, "t")
            .add_set("ports", SetKey::ProtoPortIntervals, 1, &mut ids)
            .finish()
            .expect("encodes");
        assert_eq!(m[16], NFPROTO_IPV4);
        let a = attrs(&m[20..]);
        assert_eq!(get(&a, NFTA_SET_FLAGS), vec![0, 0, 0, 0x84]);
        assert_eq!(get(&a, NFTA_SET_KEY_TYPE), vec![0, 0, 3, 0x0d]);
        assert_eq!(get(&a, NFTA_SET_KEY_LEN), vec![0, 0, 0, 8]);
        assert_eq!(
            get(&a, NFTA_SET_DESC),
            vec![
                28, 0, 2, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 0, 0, 0, 1, 12, 0, 1, 0x80, 8, 0, 1, 0,
                0, 0, 0, 2
            ]
        );
        assert_eq!(get(&a, NFTA_SET_USERDATA), SET_USERDATA_CONCAT.to_vec());
        let m = Table::new(Family::Ip6, "t")
            .add_set("named", SetKey::AddrProtoPort, 2, &mut ids)
            .finish()
            .expect("encodes");
        assert_eq!(m[16], NFPROTO_IPV6);
        let a = attrs(&m[20..]);
        assert_eq!(get(&a, NFTA_SET_FLAGS), vec![0, 0, 0, 0]);
        assert_eq!(get(&a, NFTA_SET_KEY_TYPE), vec![0, 0, 0x83, 0x0d]);
        assert_eq!(get(&a, NFTA_SET_KEY_LEN), vec![0, 0, 0, 24]);
        assert_eq!(get(&a, NFTA_SET_ID), vec![0, 0, 0, 2]);
        assert!(a.iter().all(|(k, _)| *k != NFTA_SET_DESC));
        let m = Table::new(Family::Ip6, "t")
            .add_set("p", SetKey::AddrIntervals, 3, &mut ids)
            .finish()
            .expect("encodes");
        let a = attrs(&m[20..]);
        assert_eq!(get(&a, NFTA_SET_FLAGS), vec![0, 0, 0, 4]);
        assert_eq!(get(&a, NFTA_SET_KEY_TYPE), vec![0, 0, 0, 8]);
        assert_eq!(get(&a, NFTA_SET_KEY_LEN), vec![0, 0, 0, 16]);
        assert_eq!(get(&a, NFTA_SET_USERDATA), vec![0, 4, 2, 0, 0, 0]);
    }

    type Attrs = Vec<(u16, Vec<u8>)>;

    /// (expression name, its attributes) of a rule message.
    fn exprs(m: &[u8]) -> Vec<(String, Attrs)> {
        let a = attrs(&m[20..]);
        attrs(&get(&a, NFTA_RULE_EXPRESSIONS))
            .into_iter()
            .map(|(_, e)| {
                let e = attrs(&e);
                let name = get(&e, NFTA_EXPR_NAME);
                (
                    String::from_utf8_lossy(&name[..name.len() - 1]).to_string(),
                    attrs(&get(&e, NFTA_EXPR_DATA)),
                )
            })
            .collect()
    }

    #[test]
    fn concatenations_use_nfts_registers() {
        // nft --debug=netlink: `ip daddr . meta l4proto . th dport @s` loads reg 1, 9, 10;
        // `ip6 ...` reg 1, 2, 13; `meta l4proto . th dport @s` reg 1 (hton 1 byte in 2),
        // then reg 9.
        let regs = |family: Family, f: &dyn Fn(&mut Exprs<'_>)| {
            let m = Table::new(family, "t")
                .add_rule("c", 1, &SetIds::new(), f)
                .finish()
                .expect("encodes");
            exprs(&m)
                .into_iter()
                .filter(|(n, _)| n == "payload" || n == "meta")
                .map(|(_, a)| u32::from_be_bytes(get(&a, 1).try_into().expect("u32")))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            regs(Family::Ip, &|e| e.daddr_proto_port_in_set(Family::Ip, "s")),
            [1, 9, 10]
        );
        assert_eq!(
            regs(Family::Ip6, &|e| e
                .daddr_proto_port_in_set(Family::Ip6, "s")),
            [1, 2, 13]
        );
        assert_eq!(regs(Family::Ip, &|e| e.proto_port_in_set("s")), [1, 9]);
        let m = Table::new(Family::Ip6, "t")
            .add_rule("c", 1, &SetIds::new(), |e| {
                e.addr_in_set(Family::Ip6, AddrField::Saddr, "s");
                e.l4proto_is(6);
                e.not_dnat();
                e.reject(Reject::TcpReset);
                e.reject(Reject::AdminProhibited(Family::Ip6));
                e.reject(Reject::AdminProhibited(Family::Ip));
                e.verdict(Verdict::Return);
            })
            .finish()
            .expect("encodes");
        let x = exprs(&m);
        let names: Vec<&str> = x.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "payload",
                "lookup",
                "meta",
                "cmp",
                "ct",
                "bitwise",
                "cmp",
                "reject",
                "reject",
                "reject",
                "immediate"
            ]
        );
        // ip6 saddr: 16 bytes at 8.
        assert_eq!(get(&x[0].1, NFTA_PAYLOAD_OFFSET), vec![0, 0, 0, 8]);
        assert_eq!(get(&x[0].1, NFTA_PAYLOAD_LEN), vec![0, 0, 0, 16]);
        // ct status & 0x20 (dnat, host order) == 0.
        assert_eq!(get(&x[4].1, NFTA_CT_KEY), vec![0, 0, 0, 2]);
        let mask = attrs(&get(&x[5].1, NFTA_BITWISE_MASK));
        assert_eq!(mask[0].1, 0x20u32.to_ne_bytes().to_vec());
        // reject type 1 code 0; type 0 code 1 (icmpv6); type 0 code 13 (icmp).
        let reject = |i: usize| {
            (
                get(&x[i].1, NFTA_REJECT_TYPE),
                get(&x[i].1, NFTA_REJECT_ICMP_CODE),
            )
        };
        assert_eq!(reject(7), (vec![0, 0, 0, 1], vec![0]));
        assert_eq!(reject(8), (vec![0, 0, 0, 0], vec![1]));
        assert_eq!(reject(9), (vec![0, 0, 0, 0], vec![13]));
        let verdict = attrs(&get(&x[10].1, NFTA_IMMEDIATE_DATA));
        assert_eq!(
            attrs(&verdict[0].1)[0].1,
            (-5i32 as u32).to_be_bytes().to_vec(),
            "return"
        );
    }

    #[test]
    fn long_element_lists_are_cut_to_fit_a_message() {
        let elems: Vec<Elem<'_>> = (0..10_000u32)
            .map(|i| Elem::key(i.to_be_bytes().to_vec()))
            .collect();
        let chunks = element_chunks(&elems);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 10_000);
        for c in &chunks {
            let m = Table::new(Family::Ip, "t")
                .add_elements("s", c, 1, &SetIds::new())
                .finish();
            assert!(m.is_ok(), "every part encodes");
        }
        // And the estimate is the encoded size.
        let m = Table::new(Family::Ip, "t")
            .add_elements("s", chunks[0], 1, &SetIds::new())
            .finish()
            .expect("encodes");
        let list = get(&attrs(&m[20..]), NFTA_SET_ELEM_LIST_ELEMENTS);
        assert_eq!(
            list.len(),
            chunks[0].iter().map(Elem::encoded_len).sum::<usize>()
        );
        let v = Elem::map(vec![1, 2, 3, 4], Verdict::Jump("in/abc"));
        let m = Table::new(Family::Ip, "t")
            .add_elements("m", std::slice::from_ref(&v), 1, &SetIds::new())
            .finish()
            .expect("encodes");
        let list = get(&attrs(&m[20..]), NFTA_SET_ELEM_LIST_ELEMENTS);
        assert_eq!(list.len(), v.encoded_len());
    }
}
