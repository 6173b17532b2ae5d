//! Incremental transactions sent to nf_tables over netlink, without the `nft` program.
//!
//! `nft` 1.0.6 reads every chain of the ruleset into its cache before it adds a single rule or
//! map element: with 10k Services (40k chains) that alone takes over 100 ms per sync. The
//! steps of an incremental sync ([`Op`]) use a small, fixed vocabulary, so they are encoded
//! here directly as one nfnetlink batch (begin, messages, end) — the same messages `nft` would
//! send for the same text, checked against it by a root test that lists both tables — and
//! the kernel applies the batch atomically, as it does for `nft -f`.
//!
//! [`encode`] maps the steps onto the `nft` crate's encoder (pure); [`apply`] sends them
//! through its socket.

use std::net::{IpAddr, Ipv4Addr};

use ::nft::encode::{
    self as enc, Batch, BatchError, EncodeError, Exprs, Msg, SetIds, Verdict as V, DADDR, SADDR,
};
use ::nft::sys::NFT_CMP_NEQ;
use ::nft::NfNetlink;
use ipnet::{IpNet, Ipv4Net};
use registry::Protocol;

use crate::nft::{Key, Op, Rule, Verdict, MARK_CHAIN, TABLE};

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The IPv4 address of a step [`encode`] has checked ([`ipv6_free`]); never the fallback.
fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// Whether a step is one of the IPv4 table's (this encoder writes the `ip` table only; the
/// `ip6` table is updated through `nft -f -`).
fn ipv6_free(op: &Op) -> bool {
    match op {
        Op::AddRule { rule, .. } => match rule {
            Rule::MarkFromAddr(a) | Rule::Dnat { addr: a, .. } => a.is_ipv4(),
            Rule::MarkOutside { daddr, net } => daddr.is_ipv4() && matches!(net, IpNet::V4(_)),
            _ => true,
        },
        Op::DeleteElement { key, .. } | Op::AddElement { key, .. } => match key {
            Key::Addr { addr, .. } => addr.is_ipv4(),
            Key::Port { .. } => true,
        },
        _ => true,
    }
}

/// One rule's expressions, as `nft` writes them for its text.
fn rule(e: &mut Exprs<'_>, rule: &Rule) {
    match rule {
        Rule::MarkFromAddr(a) => {
            e.addr_is(SADDR, v4(*a));
            e.verdict(V::Jump(MARK_CHAIN));
        }
        Rule::MarkOutside { daddr, net } => {
            let net = match net {
                IpNet::V4(n) => *n,
                IpNet::V6(_) => Ipv4Net::default(),
            };
            e.addr_is(DADDR, v4(*daddr));
            e.addr_in(SADDR, net, NFT_CMP_NEQ);
            e.verdict(V::Jump(MARK_CHAIN));
        }
        Rule::Mark => e.verdict(V::Jump(MARK_CHAIN)),
        Rule::MarkLocalSource => {
            e.local_source();
            e.verdict(V::Jump(MARK_CHAIN));
        }
        Rule::Remember(set) => {
            e.payload(SADDR, 4);
            e.update_set(set);
        }
        Rule::Dnat {
            protocol,
            addr,
            port,
        } => {
            e.l4proto_is(protocol_number(*protocol));
            e.dnat(v4(*addr), *port);
        }
        Rule::GotoRemembered { set, chain } => {
            e.payload(SADDR, 4);
            e.lookup(set);
            e.verdict(V::Goto(chain));
        }
        Rule::GotoOneIn { modulus, chain } => {
            e.one_in(*modulus);
            e.verdict(V::Goto(chain));
        }
        Rule::GotoLocalSource(chain) => {
            e.local_source();
            e.verdict(V::Goto(chain));
        }
        Rule::Goto(chain) => e.verdict(V::Goto(chain)),
        Rule::Drop => e.verdict(V::Drop),
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
            let mut v = v4(*addr).octets().to_vec();
            v.extend_from_slice(&proto_port(*protocol, *port));
            v
        }
        Key::Port { protocol, port } => proto_port(*protocol, *port).to_vec(),
    }
}

/// One operation as an nf_tables message.
fn op_message(op: &Op, seq: u32, set_ids: &mut SetIds) -> Msg {
    match op {
        Op::AddSet { name, timeout } => enc::add_address_set(TABLE, name, *timeout, seq, set_ids),
        Op::AddChain(name) => enc::add_chain(TABLE, name, seq),
        Op::FlushChain(name) => enc::flush_chain(TABLE, name, seq),
        Op::AddRule { chain, rule: r } => enc::add_rule(TABLE, chain, seq, set_ids, |e| rule(e, r)),
        Op::DeleteElement { map, key } => enc::delete_element(TABLE, map, &key_bytes(key), seq),
        Op::AddElement { map, key, verdict } => {
            let v = match verdict {
                Verdict::Goto(chain) => V::Goto(chain),
                Verdict::Drop => V::Drop,
            };
            enc::add_element(TABLE, map, &key_bytes(key), v, seq)
        }
        Op::DeleteChain(name) => enc::delete_chain(TABLE, name, seq),
        Op::DeleteSet(name) => enc::delete_set(TABLE, name, seq),
    }
}

/// Encodes `ops` as one batch (see [`::nft::encode::batch`]): `ops[i]` is the message with
/// sequence number `first_seq + 1 + i`. Fails, naming the step, when a name or attribute
/// does not fit its netlink field.
/// Steps with an IPv6 address are refused (the `ip6` table is updated through `nft`).
pub fn encode(ops: &[Op], first_seq: u32) -> Result<Batch, BatchError> {
    if let Some(op) = ops.iter().find(|op| !ipv6_free(op)) {
        return Err(BatchError {
            what: op.to_string(),
            source: EncodeError::Unsupported("IPv6 addresses (the ip6 table is updated by nft)"),
        });
    }
    enc::batch(ops, first_seq, op_message)
}

/// Sends `ops` as one atomic batch through `nl` and waits for the kernel's verdict. On
/// failure nothing was changed; the error names the first refused operation.
pub fn apply(nl: &NfNetlink, ops: &[Op]) -> Result<(), ::nft::Error> {
    if ops.is_empty() {
        return Ok(());
    }
    let first = nl.reserve(ops.len() as u32);
    let batch = encode(ops, first)?;
    nl.send(&batch, |i| ops.get(i).map(|op| op.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::nft::ack::attributes as attrs;
    use ::nft::sys::*;
    use std::net::Ipv4Addr;

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
            addr: Ipv4Addr::new(10, 96, 39, 17).into(),
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
        let daddr = std::net::IpAddr::from(Ipv4Addr::new(10, 96, 0, 1));
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
    fn bad_names_are_errors_not_cut() {
        // (Over-long attributes: the `nft` crate's encoder tests.)
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
