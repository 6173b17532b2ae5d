//! Incremental transactions sent to nf_tables over netlink, without the `nft` program.
//!
//! `nft` 1.0.6 reads every chain of the ruleset into its cache before it adds a single rule or
//! map element: with 10k Services (40k chains) that alone takes over 100 ms per sync. The
//! steps of an incremental sync ([`Op`]) use a small, fixed vocabulary, so they are encoded
//! here directly as one nfnetlink batch (begin, messages, end) — the same messages `nft` would
//! send for the same text, checked against it by a root test that lists both tables — and
//! the kernel applies the batch atomically, as it does for `nft -f`.
//!
//! [`encode`] is pure (bytes in, bytes out); [`NfNetlink`] is the socket.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::Ipv4Net;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;
use registry::Protocol;

use crate::nft::{Key, Op, Rule, Verdict, MARK_CHAIN, TABLE};
use crate::sync::SyncError;

// Netlink and nfnetlink framing.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_IPV4: u8 = 2;

// nf_tables message types (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

// Attributes.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_DYNSET_SET_NAME: u16 = 1;
const NFTA_DYNSET_SET_ID: u16 = 2;
const NFTA_DYNSET_OP: u16 = 3;
const NFTA_DYNSET_SREG_KEY: u16 = 4;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFTA_NG_OFFSET: u16 = 4;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;

// Values.
const REG_VERDICT: u32 = 0;
/// The 16-byte registers `nft` uses for compatibility (1 and 2).
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_META_L4PROTO: u32 = 16;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: a port is given.
const NAT_PROTO_SPECIFIED: u32 = 0x2;
const NFT_NG_RANDOM: u32 = 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_SADDR: u32 = 1;
/// `RTN_LOCAL`, compared in host byte order as `fib … type` yields it.
const RTN_LOCAL: u32 = 2;
const NFT_SET_TIMEOUT: u32 = 0x10;
/// `dynamic`: updated from the packet path.
const NFT_SET_EVAL: u32 = 0x20;
/// nft's datatype id of `ipv4_addr`.
const TYPE_IPADDR: u32 = 7;
/// nft's set userdata: key byte order (attribute 0, 4 bytes) = big endian (2).
const SET_USERDATA_KEY_BIG_ENDIAN: [u8; 6] = [0, 4, 2, 0, 0, 0];

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The longest name nf_tables takes (`NFT_NAME_MAXLEN` is 256 with the terminating NUL).
pub const MAX_NAME_LEN: usize = 255;

/// Why a transaction cannot be encoded. Nothing is sent then: a length that does not fit
/// its field would be cut silently, and the kernel would read something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("netlink attribute {kind} would be {len} bytes (at most {max})", max = u16::MAX)]
    AttributeTooLong { kind: u16, len: usize },
    #[error("name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("netlink message would be {len} bytes (at most {max})", max = u32::MAX)]
    MessageTooLong { len: usize },
}

/// One netlink message being built (header, nfgenmsg, attributes). Every length is checked
/// against its field; the first that does not fit is kept as the message's error and
/// reported by [`Msg::finish`].
struct Msg {
    buf: Vec<u8>,
    nests: Vec<(usize, u16)>,
    err: Option<EncodeError>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
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

    fn fail(&mut self, e: EncodeError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }

    fn nft(msg: u16, flags: u16, seq: u32) -> Msg {
        Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            flags,
            seq,
            NFPROTO_IPV4,
            0,
        )
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn bytes(&mut self, kind: u16, data: &[u8]) {
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
    fn str(&mut self, kind: u16, s: &str) {
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
    fn u32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.bytes(kind, &v.to_be_bytes());
    }

    fn begin(&mut self, kind: u16) {
        self.nests.push((self.buf.len(), kind));
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        let Some((at, kind)) = self.nests.pop() else {
            // Unbalanced nests are a bug of this encoder; refuse the message.
            self.fail(EncodeError::AttributeTooLong { kind: 0, len: 0 });
            return;
        };
        let len = self.buf.len() - at;
        match u16::try_from(len) {
            Ok(l) => self.buf[at..at + 2].copy_from_slice(&l.to_ne_bytes()),
            Err(_) => self.fail(EncodeError::AttributeTooLong { kind, len }),
        }
    }

    fn value(&mut self, kind: u16, data: &[u8]) {
        self.begin(kind);
        self.bytes(NFTA_DATA_VALUE, data);
        self.end();
    }

    fn verdict(&mut self, kind: u16, code: i32, chain: Option<&str>) {
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
    fn add_flags(&mut self, flags: u16) {
        let now = u16::from_ne_bytes([self.buf[6], self.buf[7]]);
        self.buf[6..8].copy_from_slice(&(now | flags).to_ne_bytes());
    }

    fn finish(mut self) -> Result<Vec<u8>, EncodeError> {
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

/// Sets added earlier in the same batch, by name -> batch-local id.
type SetIds = BTreeMap<String, u32>;

/// Expressions of one rule, appended inside `NFTA_RULE_EXPRESSIONS`.
struct Exprs<'a> {
    m: &'a mut Msg,
    set_ids: &'a SetIds,
}

impl Exprs<'_> {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) {
        self.m.begin(NFTA_LIST_ELEM);
        self.m.str(NFTA_EXPR_NAME, name);
        self.m.begin(NFTA_EXPR_DATA);
        body(self.m);
        self.m.end();
        self.m.end();
    }

    fn payload(&mut self, offset: u32, len: u32) {
        self.expr("payload", |m| {
            m.u32(NFTA_PAYLOAD_DREG, REG_1);
            m.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
            m.u32(NFTA_PAYLOAD_OFFSET, offset);
            m.u32(NFTA_PAYLOAD_LEN, len);
        });
    }

    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |m| {
            m.u32(NFTA_CMP_SREG, REG_1);
            m.u32(NFTA_CMP_OP, op);
            m.value(NFTA_CMP_DATA, data);
        });
    }

    /// `ip saddr`/`ip daddr` (offset 12/16) compared with an address.
    fn addr_is(&mut self, offset: u32, addr: Ipv4Addr) {
        self.payload(offset, 4);
        self.cmp(NFT_CMP_EQ, &addr.octets());
    }

    /// The address at `offset` compared with a prefix, as nft writes it: whole bytes are
    /// compared directly, other lengths through a mask.
    fn addr_in(&mut self, offset: u32, net: Ipv4Net, op: u32) {
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

    fn local_source(&mut self) {
        self.expr("fib", |m| {
            m.u32(NFTA_FIB_DREG, REG_1);
            m.u32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
            m.u32(NFTA_FIB_FLAGS, NFTA_FIB_F_SADDR);
        });
        self.cmp(NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
    }

    fn immediate(&mut self, reg: u32, data: &[u8]) {
        self.expr("immediate", |m| {
            m.u32(NFTA_IMMEDIATE_DREG, reg);
            m.value(NFTA_IMMEDIATE_DATA, data);
        });
    }

    fn verdict(&mut self, code: i32, chain: Option<&str>) {
        self.expr("immediate", |m| {
            m.u32(NFTA_IMMEDIATE_DREG, REG_VERDICT);
            m.verdict(NFTA_IMMEDIATE_DATA, code, chain);
        });
    }

    fn rule(&mut self, rule: &Rule) {
        const SADDR: u32 = 12;
        const DADDR: u32 = 16;
        match rule {
            Rule::MarkFromAddr(a) => {
                self.addr_is(SADDR, *a);
                self.verdict(NFT_JUMP, Some(MARK_CHAIN));
            }
            Rule::MarkOutside { daddr, net } => {
                self.addr_is(DADDR, *daddr);
                self.addr_in(SADDR, *net, NFT_CMP_NEQ);
                self.verdict(NFT_JUMP, Some(MARK_CHAIN));
            }
            Rule::Mark => self.verdict(NFT_JUMP, Some(MARK_CHAIN)),
            Rule::MarkLocalSource => {
                self.local_source();
                self.verdict(NFT_JUMP, Some(MARK_CHAIN));
            }
            Rule::Remember(set) => {
                self.payload(SADDR, 4);
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
            Rule::Dnat {
                protocol,
                addr,
                port,
            } => {
                self.expr("meta", |m| {
                    m.u32(NFTA_META_KEY, NFT_META_L4PROTO);
                    m.u32(NFTA_META_DREG, REG_1);
                });
                self.cmp(NFT_CMP_EQ, &[protocol_number(*protocol)]);
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
            Rule::GotoRemembered { set, chain } => {
                self.payload(SADDR, 4);
                let id = self.set_ids.get(set).copied();
                self.expr("lookup", |m| {
                    m.str(NFTA_LOOKUP_SET, set);
                    m.u32(NFTA_LOOKUP_SREG, REG_1);
                    if let Some(id) = id {
                        m.u32(NFTA_LOOKUP_SET_ID, id);
                    }
                });
                self.verdict(NFT_GOTO, Some(chain));
            }
            Rule::GotoOneIn { modulus, chain } => {
                self.expr("numgen", |m| {
                    m.u32(NFTA_NG_DREG, REG_1);
                    m.u32(NFTA_NG_MODULUS, *modulus);
                    m.u32(NFTA_NG_TYPE, NFT_NG_RANDOM);
                    m.u32(NFTA_NG_OFFSET, 0);
                });
                self.cmp(NFT_CMP_EQ, &0u32.to_ne_bytes());
                self.verdict(NFT_GOTO, Some(chain));
            }
            Rule::GotoLocalSource(chain) => {
                self.local_source();
                self.verdict(NFT_GOTO, Some(chain));
            }
            Rule::Goto(chain) => self.verdict(NFT_GOTO, Some(chain)),
            Rule::Drop => self.verdict(NF_DROP, None),
        }
    }
}

/// A map key's bytes: each field padded to 4 bytes, as nft lays out concatenations.
fn key_bytes(key: &Key) -> Vec<u8> {
    let proto_port = |p: Protocol, port: u16| {
        let [hi, lo] = port.to_be_bytes();
        [protocol_number(p), 0, 0, 0, hi, lo, 0, 0]
    };
    match key {
        Key::Addr {
            addr,
            protocol,
            port,
        } => {
            let mut v = addr.octets().to_vec();
            v.extend_from_slice(&proto_port(*protocol, *port));
            v
        }
        Key::Port { protocol, port } => proto_port(*protocol, *port).to_vec(),
    }
}

fn element(m: &mut Msg, map: &str, key: &Key, verdict: Option<&Verdict>) {
    m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
    m.str(NFTA_SET_ELEM_LIST_SET, map);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    m.begin(NFTA_LIST_ELEM);
    m.value(NFTA_SET_ELEM_KEY, &key_bytes(key));
    match verdict {
        Some(Verdict::Goto(chain)) => m.verdict(NFTA_SET_ELEM_DATA, NFT_GOTO, Some(chain)),
        Some(Verdict::Drop) => m.verdict(NFTA_SET_ELEM_DATA, NF_DROP, None),
        None => {}
    }
    m.end();
    m.end();
}

/// One operation as an nf_tables message.
fn op_message(op: &Op, seq: u32, set_ids: &mut SetIds) -> Msg {
    match op {
        Op::AddSet { name, timeout } => {
            let id = set_ids.len() as u32 + 1;
            set_ids.insert(name.clone(), id);
            let mut m = Msg::nft(NFT_MSG_NEWSET, NLM_F_CREATE, seq);
            m.str(NFTA_SET_TABLE, TABLE);
            m.str(NFTA_SET_NAME, name);
            m.u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT | NFT_SET_EVAL);
            m.u32(NFTA_SET_KEY_TYPE, TYPE_IPADDR);
            m.u32(NFTA_SET_KEY_LEN, 4);
            m.u32(NFTA_SET_ID, id);
            m.u64(NFTA_SET_TIMEOUT, u64::from(*timeout) * 1000);
            m.bytes(NFTA_SET_USERDATA, &SET_USERDATA_KEY_BIG_ENDIAN);
            m
        }
        Op::AddChain(name) => {
            let mut m = Msg::nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq);
            m.str(NFTA_CHAIN_TABLE, TABLE);
            m.str(NFTA_CHAIN_NAME, name);
            m
        }
        Op::FlushChain(name) => {
            let mut m = Msg::nft(NFT_MSG_DELRULE, 0, seq);
            m.str(NFTA_RULE_TABLE, TABLE);
            m.str(NFTA_RULE_CHAIN, name);
            m
        }
        Op::AddRule { chain, rule } => {
            let mut m = Msg::nft(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq);
            m.str(NFTA_RULE_TABLE, TABLE);
            m.str(NFTA_RULE_CHAIN, chain);
            m.begin(NFTA_RULE_EXPRESSIONS);
            Exprs { m: &mut m, set_ids }.rule(rule);
            m.end();
            m
        }
        Op::DeleteElement { map, key } => {
            let mut m = Msg::nft(NFT_MSG_DELSETELEM, 0, seq);
            element(&mut m, map, key, None);
            m
        }
        Op::AddElement { map, key, verdict } => {
            let mut m = Msg::nft(NFT_MSG_NEWSETELEM, NLM_F_CREATE, seq);
            element(&mut m, map, key, Some(verdict));
            m
        }
        Op::DeleteChain(name) => {
            let mut m = Msg::nft(NFT_MSG_DELCHAIN, 0, seq);
            m.str(NFTA_CHAIN_TABLE, TABLE);
            m.str(NFTA_CHAIN_NAME, name);
            m
        }
        Op::DeleteSet(name) => {
            let mut m = Msg::nft(NFT_MSG_DELSET, 0, seq);
            m.str(NFTA_SET_TABLE, TABLE);
            m.str(NFTA_SET_NAME, name);
            m
        }
    }
}

/// An encoded batch: `ops[i]` is the message with sequence number `first_seq + 1 + i`
/// (`first_seq` is the batch begin, `last_seq` the batch end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub first_seq: u32,
    pub last_seq: u32,
}

/// Encodes `ops` as one batch. The last operation asks for an acknowledgement, so that a
/// successful batch is confirmed (errors are always reported).
///
/// Fails, naming the step, when a name or attribute does not fit its netlink field (a name
/// over 255 bytes or with a NUL, an attribute over 64 KiB): nothing is cut silently.
pub fn encode(ops: &[Op], first_seq: u32) -> Result<Batch, SyncError> {
    let subsys = NFNL_SUBSYS_NFTABLES;
    let fail = |op: &dyn std::fmt::Display, e: EncodeError| {
        SyncError::Nft(format!("cannot encode {op}: {e}"))
    };
    let mut bytes = Msg::new(NFNL_MSG_BATCH_BEGIN, 0, first_seq, 0, subsys)
        .finish()
        .map_err(|e| fail(&"the batch begin", e))?;
    let mut set_ids = SetIds::new();
    let mut seq = first_seq;
    for (i, op) in ops.iter().enumerate() {
        seq = seq.wrapping_add(1);
        let mut msg = op_message(op, seq, &mut set_ids);
        if i + 1 == ops.len() {
            msg.add_flags(NLM_F_ACK);
        }
        bytes.extend_from_slice(&msg.finish().map_err(|e| fail(op, e))?);
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

/// The netlink messages in `buf`: `(type, sequence number, payload)`; a cut message ends the
/// list.
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        out.push((kind, word(at + 8), &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The answers the kernel sent: `(sequence number, errno)` of every error and
/// acknowledgement (errno 0) in `buf`.
pub fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    messages(buf)
        .into_iter()
        .filter(|(kind, _, payload)| *kind == NLMSG_ERROR && payload.len() >= 4)
        .map(|(_, seq, p)| (seq, i32::from_ne_bytes([p[0], p[1], p[2], p[3]])))
        .collect()
}

/// How long to wait for the kernel's answer to one batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A netfilter netlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct NfNetlink {
    fd: OwnedFd,
    seq: Mutex<u32>,
}

impl NfNetlink {
    /// Opens the socket (in the calling thread's network namespace; it stays there).
    pub fn open() -> Result<NfNetlink, SyncError> {
        let err = |what: &str, e: nix::Error| SyncError::Spawn {
            program: "netlink".into(),
            msg: format!("{what}: {e}"),
        };
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| err("socket(NETLINK_NETFILTER)", e))?;
        socket::bind(fd.as_raw_fd(), &socket::NetlinkAddr::new(0, 0))
            .map_err(|e| err("bind", e))?;
        let timeout = TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| err("SO_RCVTIMEO", e))?;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(NfNetlink {
            fd,
            seq: Mutex::new(start),
        })
    }

    fn next_seqs(&self, n: u32) -> u32 {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let first = *seq;
        *seq = seq.wrapping_add(n + 2);
        first
    }

    /// Sends `ops` as one atomic batch and waits for the kernel's verdict. On failure
    /// nothing was changed; the error names the first refused operation.
    pub fn apply(&self, ops: &[Op]) -> Result<(), SyncError> {
        if ops.is_empty() {
            return Ok(());
        }
        let first = self.next_seqs(ops.len() as u32);
        let batch = encode(ops, first)?;
        let last_op = batch.last_seq.wrapping_sub(1);
        let io = |what: &str, e: nix::Error| SyncError::Nft(format!("netlink {what}: {e}"));
        if batch.bytes.len() > 200_000 {
            // Like nft: let the socket take the whole batch in one message.
            let size = batch.bytes.len() * 2;
            socket::setsockopt(&self.fd, sockopt::SndBufForce, &size)
                .map_err(|e| io("SO_SNDBUFFORCE", e))?;
        }
        let sent = socket::send(self.fd.as_raw_fd(), &batch.bytes, MsgFlags::empty())
            .map_err(|e| io("send", e))?;
        if sent != batch.bytes.len() {
            return Err(SyncError::Nft(format!(
                "netlink send: {sent} of {} bytes",
                batch.bytes.len()
            )));
        }
        let mut buf = vec![0u8; 65536];
        let mut first_error: Option<(u32, i32)> = None;
        loop {
            // Errors and the final acknowledgement are queued before `send` returns (the
            // kernel handles the batch in the sender's context); once an error is known,
            // drain without waiting.
            let flags = if first_error.is_some() {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf, flags) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) if first_error.is_some() => break,
                Err(nix::Error::EAGAIN) => {
                    return Err(SyncError::Nft(format!(
                        "netlink: no answer within {ANSWER_TIMEOUT:?}"
                    )))
                }
                Err(e) => return Err(io("recv", e)),
            };
            let mut done = false;
            for (seq, errno) in parse_acks(&buf[..n]) {
                if seq.wrapping_sub(first) > batch.last_seq.wrapping_sub(first) {
                    continue; // an answer to an earlier batch
                }
                if errno != 0 && first_error.is_none() {
                    first_error = Some((seq, errno));
                }
                if seq == last_op || seq == first {
                    done = true;
                }
            }
            if done && first_error.is_none() {
                return Ok(());
            }
            if done {
                break;
            }
        }
        let (seq, errno) = first_error.expect("loop ends with an error");
        let what = seq
            .wrapping_sub(first)
            .checked_sub(1)
            .and_then(|i| ops.get(i as usize))
            .map(|op| op.to_string())
            .unwrap_or_else(|| "the batch".to_string());
        Err(SyncError::Nft(format!(
            "{what}: {}",
            nix::Error::from_raw(-errno).desc()
        )))
    }

    /// Whether chain `name` exists in our table (one GETCHAIN, no dump).
    pub fn chain_exists(&self, name: &str) -> Result<bool, SyncError> {
        let seq = self.next_seqs(0);
        let mut m = Msg::nft(NFT_MSG_GETCHAIN, NLM_F_ACK, seq);
        m.str(NFTA_CHAIN_TABLE, TABLE);
        m.str(NFTA_CHAIN_NAME, name);
        let bytes = m
            .finish()
            .map_err(|e| SyncError::Nft(format!("get chain {name}: {e}")))?;
        let io = |what: &str, e: nix::Error| SyncError::Nft(format!("netlink {what}: {e}"));
        socket::send(self.fd.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(|e| io("send", e))?;
        let mut buf = vec![0u8; 65536];
        let mut found = false;
        loop {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(e) => return Err(io("recv", e)),
            };
            // A NEWCHAIN message (the chain), then the acknowledgement; or an error.
            found |= messages(&buf[..n])
                .iter()
                .any(|(kind, _, _)| *kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN);
            for (s, errno) in parse_acks(&buf[..n]) {
                if s != seq {
                    continue;
                }
                return match errno {
                    0 => Ok(found),
                    e if -e == nix::libc::ENOENT => Ok(false),
                    e => Err(SyncError::Nft(format!(
                        "netlink get chain {name}: {}",
                        nix::Error::from_raw(-e).desc()
                    ))),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
            out.push((kind, b[4..len].to_vec()));
            b = &b[((len + 3) & !3).min(b.len())..];
        }
        out
    }

    #[test]
    fn batch_is_begin_messages_end_with_consecutive_sequence_numbers() {
        let ops = vec![
            Op::AddChain("c".into()),
            Op::AddRule {
                chain: "c".into(),
                rule: Rule::Drop,
            },
        ];
        let b = encode(&ops, 100).expect("encodes");
        assert_eq!((b.first_seq, b.last_seq), (100, 103));
        let mut at = 0;
        let mut seen = Vec::new();
        while at < b.bytes.len() {
            let h = &b.bytes[at..];
            let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let kind = u16::from_ne_bytes([h[4], h[5]]);
            let flags = u16::from_ne_bytes([h[6], h[7]]);
            let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
            seen.push((kind, flags, seq));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, b.bytes.len());
        assert_eq!(
            seen,
            vec![
                (NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 100),
                (0x0a00 | NFT_MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE, 101),
                (
                    0x0a00 | NFT_MSG_NEWRULE,
                    NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                    102
                ),
                (NFNL_MSG_BATCH_END, NLM_F_REQUEST, 103),
            ]
        );
        // Batch messages carry the subsystem in res_id, big endian.
        assert_eq!(&b.bytes[18..20], &[0, 10]);
    }

    #[test]
    fn element_keys_pad_each_field_to_four_bytes() {
        let k = Key::Addr {
            addr: Ipv4Addr::new(10, 96, 39, 17),
            protocol: Protocol::Tcp,
            port: 80,
        };
        // nft --debug=netlink: element 1127600a 00000006 00005000
        assert_eq!(key_bytes(&k), vec![10, 96, 39, 17, 6, 0, 0, 0, 0, 80, 0, 0]);
        let k = Key::Port {
            protocol: Protocol::Udp,
            port: 30080,
        };
        assert_eq!(key_bytes(&k), vec![17, 0, 0, 0, 0x75, 0x80, 0, 0]);
    }

    #[test]
    fn set_message_matches_what_nft_sends() {
        // Captured with strace from `nft -f` for
        // `add set ip t aff2 { type ipv4_addr; flags dynamic,timeout; timeout 10800s; }`,
        // table name changed to ours.
        let mut ids = SetIds::new();
        let msg = op_message(
            &Op::AddSet {
                name: "aff2".into(),
                timeout: 10800,
            },
            1,
            &mut ids,
        )
        .finish()
        .expect("encodes");
        let a = attrs(&msg[20..]);
        let get = |k: u16| a.iter().find(|(t, _)| *t == k).map(|(_, v)| v.clone());
        assert_eq!(get(NFTA_SET_TABLE), Some(b"flannel-proxy\0".to_vec()));
        assert_eq!(get(NFTA_SET_NAME), Some(b"aff2\0".to_vec()));
        assert_eq!(get(NFTA_SET_FLAGS), Some(vec![0, 0, 0, 0x30]));
        assert_eq!(get(NFTA_SET_KEY_TYPE), Some(vec![0, 0, 0, 7]));
        assert_eq!(get(NFTA_SET_KEY_LEN), Some(vec![0, 0, 0, 4]));
        assert_eq!(
            get(NFTA_SET_TIMEOUT),
            Some(vec![0, 0, 0, 0, 0, 0xa4, 0xcb, 0x80])
        );
        assert_eq!(get(NFTA_SET_USERDATA), Some(vec![0, 4, 2, 0, 0, 0]));
        assert_eq!(ids.get("aff2"), Some(&1));
    }

    #[test]
    fn prefixes_compare_whole_bytes_or_mask() {
        let names = |rule: Rule| {
            let msg = op_message(
                &Op::AddRule {
                    chain: "c".into(),
                    rule,
                },
                1,
                &mut SetIds::new(),
            )
            .finish()
            .expect("encodes");
            let a = attrs(&msg[20..]);
            let exprs = &a
                .iter()
                .find(|(t, _)| *t == NFTA_RULE_EXPRESSIONS)
                .expect("expressions")
                .1;
            attrs(exprs)
                .iter()
                .map(|(_, e)| {
                    let name = &attrs(e)[0].1;
                    String::from_utf8_lossy(&name[..name.len() - 1]).to_string()
                })
                .collect::<Vec<_>>()
        };
        let daddr = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(
            names(Rule::MarkOutside {
                daddr,
                net: "10.5.0.0/16".parse().expect("net")
            }),
            ["payload", "cmp", "payload", "cmp", "immediate"]
        );
        assert_eq!(
            names(Rule::MarkOutside {
                daddr,
                net: "10.0.0.0/12".parse().expect("net")
            }),
            ["payload", "cmp", "payload", "bitwise", "cmp", "immediate"]
        );
        assert_eq!(
            names(Rule::Dnat {
                protocol: Protocol::Udp,
                addr: daddr,
                port: 53
            }),
            ["meta", "cmp", "immediate", "immediate", "nat"]
        );
    }

    #[test]
    fn acks_are_read_with_their_sequence_numbers() {
        let mut buf = Vec::new();
        for (seq, errno) in [(7u32, 0i32), (9, -2)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&errno.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]);
        }
        assert_eq!(parse_acks(&buf), vec![(7, 0), (9, -2)]);
        assert_eq!(parse_acks(&buf[..20]), vec![], "a cut message is ignored");
    }

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
        // Names: at most 255 bytes, no NUL (the kernel would stop reading there).
        for name in ["a".repeat(256), "a\0b".to_string(), String::new()] {
            let e = encode(&[Op::AddChain(name.clone())], 1).expect_err("refused");
            assert!(e.to_string().contains("cannot encode add chain"), "{e}");
        }
        let e = encode(
            &[Op::AddRule {
                chain: "c".into(),
                rule: Rule::Goto("x".repeat(300)),
            }],
            1,
        )
        .expect_err("refused");
        assert!(e.to_string().contains("longer than 255 bytes"), "{e}");
        assert!(encode(&[Op::AddChain("a".repeat(255))], 1).is_ok());
    }
}
