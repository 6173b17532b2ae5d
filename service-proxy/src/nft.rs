//! The nftables data path, rendered as text (pure) and applied as one `nft -f -` transaction
//! per sync into the table `ip flannel-proxy`, which this module owns, and its IPv6 twin
//! `ip6 flannel-proxy` (one table per family, as kube-proxy's nftables mode): both are
//! rendered by the same functions from the service ports of their family, the `*_in`
//! functions taking the [`Family`]; the unsuffixed ones render the IPv4 table.
//!
//! Layout (modelled on kube-proxy's nftables mode):
//! - base chains `nat-prerouting` / `nat-output` (dstnat) jump to `services`, which dispatches
//!   through ONE verdict map `service-ips` keyed `daddr . l4proto . dport` (ClusterIPs and
//!   external IPs) and, for local destination addresses, `service-nodeports` keyed
//!   `l4proto . dport`: the per-packet cost does not grow with the number of Services;
//! - per service port: `svc-H-ns/name/proto/port` picks an endpoint with
//!   `numgen random mod N-i` (endpoint i), after the ClientIP affinity checks (one `dynamic,timeout` set per
//!   endpoint, filled by the endpoint chain); `svl-…` does the same over local endpoints only
//!   (`internalTrafficPolicy`/`externalTrafficPolicy: Local`); `ext-…` is the entry for NodePort
//!   and external-IP traffic (masquerade for `Cluster`; for `Local`, straight to `svl-…` so the
//!   client address is kept, except traffic from the node itself);
//! - endpoint chains `ep-H-ns/name/proto/port__ip_port` mark hairpin traffic (a pod reaching
//!   itself) for masquerade, refresh affinity, and `dnat to ip:port`;
//! - Services without endpoints: `no-endpoint-services` / `no-endpoint-nodeports` maps, checked
//!   in filter chains before DNAT (`filter-prerouting`, `filter-output` at priority -110), whose
//!   verdict is `goto reject-chain` (reject is not a map verdict) or `drop` (Local policy with
//!   endpoints only on other nodes, as kube-proxy does);
//! - `nat-postrouting` masquerades packets carrying the mark bit 0x4000 (then clears it).
//!
//! [`Ruleset`] is the dynamic part (chains, sets, map elements) as data; [`transaction`] diffs
//! two of them into the minimal update (only changed chains are rewritten, only changed map
//! elements touched), [`full`] rebuilds the whole table.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ::nft::Family;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use registry::{IpFamily, Protocol};

use crate::model::{Endpoint, PortId, ServicePort};

/// The table this module owns.
pub const TABLE: &str = "flannel-proxy";

/// The packet mark bit that asks for masquerade (kube-proxy's and flannel's 0x4000).
pub const MASQ_MARK: u32 = 0x4000;

/// The maps the dynamic part fills.
pub const MAP_SERVICE_IPS: &str = "service-ips";
pub const MAP_NODEPORTS: &str = "service-nodeports";
pub const MAP_NO_EP_SERVICES: &str = "no-endpoint-services";
pub const MAP_NO_EP_NODEPORTS: &str = "no-endpoint-nodeports";

/// The dynamic part of the table as data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name -> its rules, in order.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Affinity set name -> its timeout in seconds (`ipv4_addr` or `ipv6_addr` by the
    /// table's family, `dynamic,timeout`).
    pub sets: BTreeMap<String, u32>,
    /// (map, key) -> verdict.
    pub elements: BTreeMap<(&'static str, Key), Verdict>,
}

/// The chain every masquerade decision jumps to.
pub const MARK_CHAIN: &str = "mark-for-masquerade";

/// One rule of a dynamic chain, as data: rendered as nft text for full syncs ([`Display`]),
/// encoded as netlink expressions for incremental ones ([`crate::nfnl`]).
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Addresses are of the table's family (`ip` / `ip6` is written from the address); the rules
/// without one take the family from the table they are rendered for ([`Rule::in_family`]);
/// [`Display`] renders them for the IPv4 table.
pub enum Rule {
    /// `ip saddr A jump mark-for-masquerade` (hairpin: an endpoint reaching itself).
    MarkFromAddr(IpAddr),
    /// `ip daddr A ip saddr != NET jump mark-for-masquerade` (ClusterIP from outside NET).
    MarkOutside { daddr: IpAddr, net: IpNet },
    /// `jump mark-for-masquerade`.
    Mark,
    /// `fib saddr type local jump mark-for-masquerade`.
    MarkLocalSource,
    /// `update @SET { ip saddr }` (affinity: remember the client).
    Remember(String),
    /// `meta l4proto P dnat to A:PORT` (`[A]:PORT` for IPv6).
    Dnat {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// `ip saddr @SET goto CHAIN` (affinity: a remembered client).
    GotoRemembered { set: String, chain: String },
    /// `numgen random mod N == 0 goto CHAIN`.
    GotoOneIn { modulus: u32, chain: String },
    /// `fib saddr type local goto CHAIN`.
    GotoLocalSource(String),
    /// `goto CHAIN`.
    Goto(String),
    /// `drop`.
    Drop,
}

/// The nft keyword of an address's family (`ip`, `ip6`).
fn kw(a: &IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// The table family serving `family`.
pub fn table_family(family: IpFamily) -> Family {
    match family {
        IpFamily::Ipv4 => Family::Ip,
        IpFamily::Ipv6 => Family::Ip6,
    }
}

/// A rule or step rendered for the table of one family.
#[derive(Debug, Clone, Copy)]
pub struct InFamily<'a, T>(pub Family, pub &'a T);

impl Rule {
    /// This rule as text for the table of `family`.
    pub fn in_family(&self, family: Family) -> InFamily<'_, Rule> {
        InFamily(family, self)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.in_family(Family::Ip).fmt(f)
    }
}

impl fmt::Display for InFamily<'_, Rule> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let InFamily(family, rule) = *self;
        let fam = family.as_str();
        match rule {
            Rule::MarkFromAddr(a) => write!(f, "{} saddr {a} jump {MARK_CHAIN}", kw(a)),
            Rule::MarkOutside { daddr, net } => {
                let k = kw(daddr);
                write!(f, "{k} daddr {daddr} {k} saddr != {net} jump {MARK_CHAIN}")
            }
            Rule::Mark => write!(f, "jump {MARK_CHAIN}"),
            Rule::MarkLocalSource => write!(f, "fib saddr type local jump {MARK_CHAIN}"),
            Rule::Remember(set) => write!(f, "update @{set} {{ {fam} saddr }}"),
            Rule::Dnat {
                protocol,
                addr,
                port,
            } => match addr {
                IpAddr::V4(a) => write!(f, "meta l4proto {} dnat to {a}:{port}", protocol.nft()),
                IpAddr::V6(a) => {
                    write!(f, "meta l4proto {} dnat to [{a}]:{port}", protocol.nft())
                }
            },
            Rule::GotoRemembered { set, chain } => {
                write!(f, "{fam} saddr @{set} goto {chain}")
            }
            Rule::GotoOneIn { modulus, chain } => {
                write!(f, "numgen random mod {modulus} == 0 goto {chain}")
            }
            Rule::GotoLocalSource(chain) => write!(f, "fib saddr type local goto {chain}"),
            Rule::Goto(chain) => write!(f, "goto {chain}"),
            Rule::Drop => write!(f, "drop"),
        }
    }
}

/// A key of the dispatch maps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// `daddr . l4proto . dport` (`service-ips`, `no-endpoint-services`).
    Addr {
        addr: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    /// `l4proto . dport` (`service-nodeports`, `no-endpoint-nodeports`).
    Port { protocol: Protocol, port: u16 },
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Addr {
                addr,
                protocol,
                port,
            } => write!(f, "{addr} . {} . {port}", protocol.nft()),
            Key::Port { protocol, port } => write!(f, "{} . {port}", protocol.nft()),
        }
    }
}

/// The verdict of a map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Goto(String),
    Drop,
}

/// The chain that rejects (reject is not a map verdict).
pub const REJECT_CHAIN: &str = "reject-chain";

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
            Verdict::Drop => write!(f, "drop"),
        }
    }
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// An affinity set with its timeout in seconds.
    AddSet {
        name: String,
        timeout: u32,
    },
    AddChain(String),
    FlushChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    DeleteElement {
        map: &'static str,
        key: Key,
    },
    AddElement {
        map: &'static str,
        key: Key,
        verdict: Verdict,
    },
    DeleteChain(String),
    DeleteSet(String),
}

impl Op {
    /// This step as text for the table of `family`.
    pub fn in_family(&self, family: Family) -> InFamily<'_, Op> {
        InFamily(family, self)
    }
}

/// The type of an affinity set's elements in the table of `family`.
fn addr_type(family: Family) -> &'static str {
    match family {
        Family::Ip => "ipv4_addr",
        Family::Ip6 => "ipv6_addr",
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.in_family(Family::Ip).fmt(f)
    }
}

impl fmt::Display for InFamily<'_, Op> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let InFamily(family, op) = *self;
        let t = format!("{family} {TABLE}");
        match op {
            Op::AddSet { name, timeout } => write!(
                f,
                "add set {t} {name} {{ type {}; flags dynamic,timeout; timeout {timeout}s; }}",
                addr_type(family)
            ),
            Op::AddChain(name) => write!(f, "add chain {t} {name}"),
            Op::FlushChain(name) => write!(f, "flush chain {t} {name}"),
            Op::AddRule { chain, rule } => {
                write!(f, "add rule {t} {chain} {}", rule.in_family(family))
            }
            Op::DeleteElement { map, key } => {
                write!(f, "delete element {t} {map} {{ {key} }}")
            }
            Op::AddElement { map, key, verdict } => {
                write!(f, "add element {t} {map} {{ {key} : {verdict} }}")
            }
            Op::DeleteChain(name) => write!(f, "delete chain {t} {name}"),
            Op::DeleteSet(name) => write!(f, "delete set {t} {name}"),
        }
    }
}

/// `ops` as an nft script for the IPv4 table, one command per line.
pub fn script(ops: &[Op]) -> String {
    script_in(Family::Ip, ops)
}

/// `ops` as an nft script for the table of `family`, one command per line.
pub fn script_in(family: Family, ops: &[Op]) -> String {
    let mut s = String::new();
    for op in ops {
        let _ = writeln!(s, "{}", op.in_family(family));
    }
    s
}

/// What the rules depend on besides the service ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The cluster Network: ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The cluster's IPv6 Network (`IPv6Network`), the same for IPv6 ClusterIPs.
    pub cluster_cidr6: Option<Ipv6Net>,
}

/// FNV-1a 64, stable across builds: chain names must not change between versions.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Eight base32 characters of the id's hash (keeps names unique however they are cut).
fn hash8(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let h = fnv1a(s);
    (0..8)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// `ns/name/proto/port` (the port's name, or its number when unnamed).
fn id_path(id: &PortId, port: u16) -> String {
    let port_name = if id.port_name.is_empty() {
        port.to_string()
    } else {
        id.port_name.clone()
    };
    format!(
        "{}/{}/{}/{}",
        id.namespace,
        id.name,
        id.protocol.nft(),
        port_name
    )
}

/// One part of a name as it may appear in nft text: lower case letters, digits and '-'
/// (what validated namespaces, Service names and port names consist of) and at most `max`
/// of them; anything else becomes '_'. Validation upstream keeps such characters out; this
/// makes sure that even an unchecked name cannot end an identifier, open a quote or a
/// comment, or start a new statement. The hash in front of every name is taken over the
/// unchanged text, so two names that read the same here stay distinct.
fn safe_part(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            _ => '_',
        })
        .collect()
}

/// The readable part of a port's names: [`id_path`] with each part made safe and bounded
/// (63 for namespace and name, as DNS labels; 15 for a port name, as IANA service names), so
/// every name stays within nf_tables' 255 bytes.
fn safe_path(id: &PortId, port: u16) -> String {
    let port_name = if id.port_name.is_empty() {
        port.to_string()
    } else {
        safe_part(&id.port_name, 15)
    };
    format!(
        "{}/{}/{}/{}",
        safe_part(&id.namespace, 63),
        safe_part(&id.name, 63),
        id.protocol.nft(),
        port_name
    )
}

/// Whether `name` is a plain nft identifier: a letter, then letters, digits, '/', '_', '.'
/// or '-', at most 255 bytes (nf_tables' limit). Every name this module renders is one.
pub fn is_safe_name(name: &str) -> bool {
    name.len() <= ::nft::MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'.' | b'-'))
}

/// Chain names of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub svc: String,
    pub svl: String,
    pub ext: String,
    base: String,
}

impl Names {
    pub fn new(sp: &ServicePort) -> Names {
        let path = id_path(&sp.id, sp.port);
        let base = format!("{}-{}", hash8(&path), safe_path(&sp.id, sp.port));
        Names {
            svc: format!("svc-{base}"),
            svl: format!("svl-{base}"),
            ext: format!("ext-{base}"),
            base,
        }
    }

    pub fn endpoint(&self, ep: &Endpoint) -> String {
        format!("ep-{}__{}_{}", self.base, dashed(ep.ip), ep.port)
    }

    pub fn affinity(&self, ep: &Endpoint, timeout: u32) -> String {
        format!(
            "aff-{}__{}_{}__{}",
            self.base,
            dashed(ep.ip),
            ep.port,
            timeout
        )
    }
}

/// An address as a name part: `10-5-1-2`, `fd00--1` (IPv6 text never holds '-', so this
/// stays unique).
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// Renders the dynamic part for `ports`.
pub fn ruleset<'a>(ports: impl IntoIterator<Item = &'a ServicePort>, cfg: &ProxyConfig) -> Ruleset {
    let mut rs = Ruleset::default();
    for sp in ports {
        add_port(&mut rs, sp, cfg);
    }
    rs
}

fn add_port(rs: &mut Ruleset, sp: &ServicePort, cfg: &ProxyConfig) {
    let names = Names::new(sp);
    let protocol = sp.protocol;
    let net: Option<IpNet> = match sp.cluster_ip {
        IpAddr::V4(_) => cfg.cluster_cidr.map(IpNet::from),
        IpAddr::V6(_) => cfg.cluster_cidr6.map(IpNet::from),
    };
    let masq_outside = net.map(|net| Rule::MarkOutside {
        daddr: sp.cluster_ip,
        net,
    });
    let all: Vec<Endpoint> = sp.endpoints.clone();
    let local: Vec<Endpoint> = sp.local_endpoints().copied().collect();

    // Endpoint chains (and affinity sets) for every endpoint.
    for ep in &all {
        let mut rules = vec![Rule::MarkFromAddr(ep.ip)];
        if let Some(t) = sp.affinity {
            let set = names.affinity(ep, t);
            rs.sets.insert(set.clone(), t);
            rules.push(Rule::Remember(set));
        }
        rules.push(Rule::Dnat {
            protocol,
            addr: ep.ip,
            port: ep.port,
        });
        rs.chains.insert(names.endpoint(ep), rules);
    }

    let pick = |targets: &[Endpoint]| -> Vec<Rule> {
        let mut rules = Vec::new();
        if let Some(r) = &masq_outside {
            rules.push(r.clone());
        }
        if let Some(t) = sp.affinity {
            for ep in targets {
                rules.push(Rule::GotoRemembered {
                    set: names.affinity(ep, t),
                    chain: names.endpoint(ep),
                });
            }
        }
        if targets.is_empty() {
            rules.push(Rule::Drop);
        }
        // Endpoint i of n is taken with probability 1/(n-i) among the rest: uniform overall.
        // Not one `numgen random mod n vmap { … }`: nft 1.0.6 names each anonymous map by
        // scanning the existing ones, which makes a full sync quadratic in the number of
        // Services (measured: 4k Services 14.6 s with vmaps, 1.4 s like this). Only the first
        // packet of a connection passes here, and the cost depends on this Service's
        // endpoints, not on the number of Services.
        let n = targets.len();
        for (i, ep) in targets.iter().enumerate() {
            if i + 1 < n {
                rules.push(Rule::GotoOneIn {
                    modulus: (n - i) as u32,
                    chain: names.endpoint(ep),
                });
            } else {
                rules.push(Rule::Goto(names.endpoint(ep)));
            }
        }
        rules
    };

    let uses_local = sp.internal_local || sp.external_local;
    if !all.is_empty() {
        rs.chains.insert(names.svc.clone(), pick(&all));
    }
    if uses_local && !all.is_empty() {
        rs.chains.insert(names.svl.clone(), pick(&local));
    }

    // ClusterIP.
    let key = Key::Addr {
        addr: sp.cluster_ip,
        protocol,
        port: sp.port,
    };
    let reject = || Verdict::Goto(REJECT_CHAIN.to_string());
    let internal = sp.cluster_targets();
    if internal.is_empty() {
        rs.elements.insert((MAP_NO_EP_SERVICES, key), reject());
    } else {
        let chain = if sp.internal_local {
            &names.svl
        } else {
            &names.svc
        };
        rs.elements
            .insert((MAP_SERVICE_IPS, key), Verdict::Goto(chain.clone()));
    }

    // NodePort and external IPs.
    if sp.is_external() {
        let verdict = if all.is_empty() {
            Err(reject())
        } else if sp.external_local && local.is_empty() {
            // Endpoints exist, but none here: drop, as kube-proxy does, so that a load
            // balancer's health check (not a refused connection) steers clients away.
            Err(Verdict::Drop)
        } else {
            let rules = if sp.external_local {
                vec![
                    Rule::MarkLocalSource,
                    Rule::GotoLocalSource(names.svc.clone()),
                    Rule::Goto(names.svl.clone()),
                ]
            } else {
                vec![Rule::Mark, Rule::Goto(names.svc.clone())]
            };
            rs.chains.insert(names.ext.clone(), rules);
            Ok(Verdict::Goto(names.ext.clone()))
        };
        for ip in &sp.external_ips {
            let key = Key::Addr {
                addr: *ip,
                protocol,
                port: sp.port,
            };
            match &verdict {
                Ok(v) => rs.elements.insert((MAP_SERVICE_IPS, key), v.clone()),
                Err(v) => rs.elements.insert((MAP_NO_EP_SERVICES, key), v.clone()),
            };
        }
        if let Some(np) = sp.node_port {
            let key = Key::Port { protocol, port: np };
            match &verdict {
                Ok(v) => rs.elements.insert((MAP_NODEPORTS, key), v.clone()),
                Err(v) => rs.elements.insert((MAP_NO_EP_NODEPORTS, key), v.clone()),
            };
        }
    }
}

/// The static part of the IPv4 table (see [`base_in`]).
pub fn base() -> String {
    base_in(Family::Ip)
}

/// Which local destination addresses serve node ports: every address of the node's but
/// loopback (and, for IPv6, link-local).
pub fn node_addresses(family: Family) -> &'static str {
    match family {
        Family::Ip => "ip daddr != 127.0.0.0/8",
        Family::Ip6 => "ip6 daddr != ::1 ip6 daddr != fe80::/10",
    }
}

/// The static part: the table, base chains, helper chains and maps. Recreates the table
/// (add + delete + add: nft 1.0.6 has no `destroy`).
pub fn base_in(family: Family) -> String {
    let t = format!("{family} {TABLE}");
    let mut s = skeleton_in(family);
    let addr_key = format!("{} . inet_proto . inet_service", addr_type(family));
    let daddr = format!("{family} daddr");
    let local = node_addresses(family);
    for (map, key) in [
        (MAP_SERVICE_IPS, addr_key.as_str()),
        (MAP_NODEPORTS, "inet_proto . inet_service"),
        (MAP_NO_EP_SERVICES, addr_key.as_str()),
        (MAP_NO_EP_NODEPORTS, "inet_proto . inet_service"),
    ] {
        let _ = writeln!(s, "add map {t} {map} {{ type {key} : verdict; }}");
    }
    let _ = writeln!(
        s,
        "add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    for name in ["masquerading", "mark-for-masquerade", "reject-chain"] {
        let _ = writeln!(s, "add chain {t} {name}");
    }
    let rules: [(&str, String); 9] = [
        ("nat-postrouting", "jump masquerading".into()),
        (
            "services",
            format!("{daddr} . meta l4proto . th dport vmap @{MAP_SERVICE_IPS}"),
        ),
        (
            "services",
            format!("fib daddr type local {local} meta l4proto . th dport vmap @{MAP_NODEPORTS}"),
        ),
        (
            "endpoints-check",
            format!("{daddr} . meta l4proto . th dport vmap @{MAP_NO_EP_SERVICES}"),
        ),
        (
            "endpoints-check",
            format!(
                "fib daddr type local {local} meta l4proto . th dport vmap @{MAP_NO_EP_NODEPORTS}"
            ),
        ),
        (
            "masquerading",
            format!("meta mark & {MASQ_MARK:#x} == 0 return"),
        ),
        (
            "masquerading",
            format!("meta mark set meta mark ^ {MASQ_MARK:#x} masquerade fully-random"),
        ),
        (
            "mark-for-masquerade",
            format!("meta mark set meta mark | {MASQ_MARK:#x}"),
        ),
        ("reject-chain", "reject".into()),
    ];
    for (chain, rule) in rules {
        let _ = writeln!(s, "add rule {t} {chain} {rule}");
    }
    s
}

/// [`skeleton_in`] for the IPv4 table.
pub fn skeleton() -> String {
    skeleton_in(Family::Ip)
}

/// What both modes' tables start with: the table recreated, the dstnat hooks jumping to
/// `services` and the pre-DNAT filter hooks sending new connections to `endpoints-check`
/// (both chains filled by the mode).
pub fn skeleton_in(family: Family) -> String {
    let t = format!("{family} {TABLE}");
    let mut s = cleanup_in(family);
    let _ = writeln!(s, "add table {t}");
    for (name, hook) in [
        ("nat-prerouting", "type nat hook prerouting priority dstnat"),
        ("nat-output", "type nat hook output priority -100"),
        (
            "filter-prerouting",
            "type filter hook prerouting priority -110",
        ),
        ("filter-output", "type filter hook output priority -110"),
    ] {
        let _ = writeln!(s, "add chain {t} {name} {{ {hook}; policy accept; }}");
    }
    for name in ["services", "endpoints-check"] {
        let _ = writeln!(s, "add chain {t} {name}");
    }
    for (chain, rule) in [
        ("nat-prerouting", "jump services"),
        ("nat-output", "jump services"),
        ("filter-prerouting", "ct state new jump endpoints-check"),
        ("filter-output", "ct state new jump endpoints-check"),
    ] {
        let _ = writeln!(s, "add rule {t} {chain} {rule}");
    }
    s
}

/// The whole IPv4 table for `rs`, as one transaction.
pub fn full(rs: &Ruleset) -> String {
    full_in(Family::Ip, rs)
}

/// The whole table of `family` for `rs`, as one transaction.
pub fn full_in(family: Family, rs: &Ruleset) -> String {
    let mut tx = Tx::default();
    tx.diff(&Ruleset::default(), rs);
    let mut s = base_in(family);
    s.push_str(&script_in(family, &tx.finish()));
    s
}

/// The minimal transaction turning `old` (what the kernel has) into `new`, as nft text.
pub fn transaction(old: &Ruleset, new: &Ruleset) -> String {
    let mut tx = Tx::default();
    tx.diff(old, new);
    script(&tx.finish())
}

/// A transaction being built from several diffs (one per changed service port), kept in
/// phases so that the order is right across all of them: new sets and chains first, then
/// rules, then map elements out and in (so a ClusterIP handed from a deleted Service to a new
/// one is freed before it is taken), then what nothing refers to any more.
#[derive(Debug, Default)]
pub struct Tx {
    add_sets: Vec<Op>,
    add_chains: Vec<Op>,
    rules: Vec<Op>,
    del_elements: Vec<Op>,
    add_elements: Vec<Op>,
    flush_gone: Vec<Op>,
    del_chains: Vec<Op>,
    del_sets: Vec<Op>,
}

impl Tx {
    /// Adds what turns `old` into `new`.
    pub fn diff(&mut self, old: &Ruleset, new: &Ruleset) {
        for (name, timeout) in &new.sets {
            if old.sets.get(name) != Some(timeout) {
                self.add_sets.push(Op::AddSet {
                    name: name.clone(),
                    timeout: *timeout,
                });
            }
        }
        for name in new.chains.keys() {
            if !old.chains.contains_key(name) {
                self.add_chains.push(Op::AddChain(name.clone()));
            }
        }
        for (name, rules) in &new.chains {
            match old.chains.get(name) {
                Some(old_rules) if old_rules == rules => continue,
                Some(_) => self.rules.push(Op::FlushChain(name.clone())),
                None => {}
            }
            for rule in rules {
                self.rules.push(Op::AddRule {
                    chain: name.clone(),
                    rule: rule.clone(),
                });
            }
        }
        for (key, verdict) in &old.elements {
            if new.elements.get(key) != Some(verdict) {
                self.del_elements.push(Op::DeleteElement {
                    map: key.0,
                    key: key.1.clone(),
                });
            }
        }
        for (key, verdict) in &new.elements {
            if old.elements.get(key) != Some(verdict) {
                self.add_elements.push(Op::AddElement {
                    map: key.0,
                    key: key.1.clone(),
                    verdict: verdict.clone(),
                });
            }
        }
        // A chain that goes may refer to another chain or set that goes too: all are
        // flushed before any is deleted.
        for name in old.chains.keys() {
            if !new.chains.contains_key(name) {
                self.flush_gone.push(Op::FlushChain(name.clone()));
                self.del_chains.push(Op::DeleteChain(name.clone()));
            }
        }
        for name in old.sets.keys() {
            if !new.sets.contains_key(name) {
                self.del_sets.push(Op::DeleteSet(name.clone()));
            }
        }
    }

    /// The transaction's steps, in order.
    pub fn finish(self) -> Vec<Op> {
        [
            self.add_sets,
            self.add_chains,
            self.rules,
            self.del_elements,
            self.add_elements,
            self.flush_gone,
            self.del_chains,
            self.del_sets,
        ]
        .concat()
    }
}

/// Removes both tables, `ip` and `ip6` (`--cleanup`, proxy mode switched off).
pub fn cleanup() -> String {
    let mut s = cleanup_in(Family::Ip);
    s.push_str(&cleanup_in(Family::Ip6));
    s
}

/// Removes the table of `family`.
pub fn cleanup_in(family: Family) -> String {
    format!("add table {family} {TABLE}\ndelete table {family} {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry::Protocol;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sp(name: &str, eps: &[([u8; 4], bool)]) -> ServicePort {
        let id = PortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::Ipv4,
        };
        let eps = eps
            .iter()
            .map(|(ip, local)| Endpoint {
                ip: Ipv4Addr::from(*ip).into(),
                port: 8080,
                local: *local,
            })
            .collect();
        ServicePort::new(id, Ipv4Addr::new(10, 96, 0, 10), 80, eps)
    }

    /// The rule set as text, as the tests read it.
    struct Text {
        chains: BTreeMap<String, Vec<String>>,
        sets: BTreeMap<String, String>,
        elements: BTreeMap<(&'static str, String), String>,
    }

    fn ruleset_text<'a>(
        ports: impl IntoIterator<Item = &'a ServicePort>,
        cfg: &ProxyConfig,
    ) -> Text {
        let rs = ruleset(ports, cfg);
        Text {
            chains: rs
                .chains
                .iter()
                .map(|(c, rules)| (c.clone(), rules.iter().map(|r| r.to_string()).collect()))
                .collect(),
            sets: rs
                .sets
                .iter()
                .map(|(n, t)| {
                    let op = Op::AddSet {
                        name: n.clone(),
                        timeout: *t,
                    };
                    let line = op.to_string();
                    (
                        n.clone(),
                        line[line.find('{').expect("definition")..].to_string(),
                    )
                })
                .collect(),
            elements: rs
                .elements
                .iter()
                .map(|((m, k), v)| ((*m, k.to_string()), v.to_string()))
                .collect(),
        }
    }

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            cluster_cidr: Some("10.5.0.0/16".parse().expect("cidr")),
            cluster_cidr6: Some("fd10::/48".parse().expect("cidr6")),
        }
    }

    #[test]
    fn chain_names_are_stable_and_readable() {
        let names = Names::new(&sp("web", &[]));
        assert_eq!(
            names.svc,
            format!("svc-{}-default/web/tcp/http", hash8("default/web/tcp/http"))
        );
        assert_eq!(hash8("default/web/tcp/http"), hash8("default/web/tcp/http"));
        assert_ne!(hash8("default/web/tcp/http"), hash8("default/web/udp/http"));
        let ep = Endpoint {
            ip: Ipv4Addr::new(10, 5, 1, 2).into(),
            port: 8080,
            local: true,
        };
        assert!(names
            .endpoint(&ep)
            .ends_with("default/web/tcp/http__10-5-1-2_8080"));
    }

    #[test]
    fn cluster_ip_dispatch_picks_among_endpoints() {
        let rs = ruleset_text(
            [&sp("web", &[([10, 5, 1, 2], true), ([10, 5, 2, 2], false)])],
            &cfg(),
        );
        let names = Names::new(&sp("web", &[]));
        let svc = &rs.chains[&names.svc];
        assert_eq!(
            svc[0],
            "ip daddr 10.96.0.10 ip saddr != 10.5.0.0/16 jump mark-for-masquerade"
        );
        assert!(
            svc[1].starts_with("numgen random mod 2 == 0 goto ep-"),
            "{svc:?}"
        );
        assert!(svc[2].starts_with("goto ep-"), "{svc:?}");
        assert_eq!(svc.len(), 3);
        assert_eq!(
            rs.elements[&(MAP_SERVICE_IPS, "10.96.0.10 . tcp . 80".to_string())],
            format!("goto {}", names.svc)
        );
        let ep = &rs.chains[&names.endpoint(&Endpoint {
            ip: Ipv4Addr::new(10, 5, 1, 2).into(),
            port: 8080,
            local: true,
        })];
        assert_eq!(
            ep,
            &vec![
                "ip saddr 10.5.1.2 jump mark-for-masquerade".to_string(),
                "meta l4proto tcp dnat to 10.5.1.2:8080".to_string()
            ]
        );
        assert_eq!(rs.chains.len(), 3);
    }

    #[test]
    fn no_endpoints_rejects() {
        let mut p = sp("web", &[]);
        p.node_port = Some(30080);
        let rs = ruleset_text([&p], &cfg());
        assert!(rs.chains.is_empty());
        assert_eq!(
            rs.elements[&(MAP_NO_EP_SERVICES, "10.96.0.10 . tcp . 80".to_string())],
            "goto reject-chain"
        );
        assert_eq!(
            rs.elements[&(MAP_NO_EP_NODEPORTS, "tcp . 30080".to_string())],
            "goto reject-chain"
        );
    }

    #[test]
    fn external_local_keeps_source_and_drops_without_local_endpoints() {
        let mut p = sp("web", &[([10, 5, 1, 2], true), ([10, 5, 2, 2], false)]);
        p.node_port = Some(30080);
        p.external_ips = vec![Ipv4Addr::new(192, 0, 2, 1).into()];
        p.external_local = true;
        let names = Names::new(&p);
        let rs = ruleset_text([&p], &cfg());
        assert_eq!(
            rs.chains[&names.ext],
            vec![
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local goto {}", names.svc),
                format!("goto {}", names.svl),
            ]
        );
        assert_eq!(
            rs.chains[&names.svl].len(),
            2,
            "one local endpoint: no draw"
        );
        assert!(rs.chains[&names.svl][1].starts_with("goto ep-"));
        assert_eq!(
            rs.elements[&(MAP_NODEPORTS, "tcp . 30080".to_string())],
            format!("goto {}", names.ext)
        );
        assert_eq!(
            rs.elements[&(MAP_SERVICE_IPS, "192.0.2.1 . tcp . 80".to_string())],
            format!("goto {}", names.ext)
        );
        // No local endpoint: external traffic dropped, cluster traffic still served.
        p.endpoints.retain(|e| !e.local);
        let rs = ruleset_text([&p], &cfg());
        assert_eq!(
            rs.elements[&(MAP_NO_EP_NODEPORTS, "tcp . 30080".to_string())],
            "drop"
        );
        assert!(rs
            .elements
            .contains_key(&(MAP_SERVICE_IPS, "10.96.0.10 . tcp . 80".to_string())));
    }

    #[test]
    fn cluster_policy_masquerades_external_traffic() {
        let mut p = sp("web", &[([10, 5, 2, 2], false)]);
        p.node_port = Some(30080);
        let names = Names::new(&p);
        let rs = ruleset_text([&p], &cfg());
        assert_eq!(
            rs.chains[&names.ext],
            vec![
                "jump mark-for-masquerade".to_string(),
                format!("goto {}", names.svc)
            ]
        );
    }

    #[test]
    fn affinity_sets_per_endpoint_checked_before_numgen() {
        let mut p = sp("web", &[([10, 5, 1, 2], true), ([10, 5, 2, 2], false)]);
        p.affinity = Some(60);
        let names = Names::new(&p);
        let rs = ruleset_text([&p], &cfg());
        assert_eq!(rs.sets.len(), 2);
        assert!(rs
            .sets
            .values()
            .all(|d| d.contains("flags dynamic,timeout; timeout 60s;")));
        let svc = &rs.chains[&names.svc];
        assert!(svc[1].starts_with("ip saddr @aff-") && svc[1].contains(" goto ep-"));
        assert!(svc[3].starts_with("numgen"));
        let ep_chain = &rs.chains[&names.endpoint(&p.endpoints[0])];
        assert!(ep_chain[1].starts_with("update @aff-") && ep_chain[1].ends_with("{ ip saddr }"));
    }

    #[test]
    fn internal_local_without_local_endpoints_rejects_cluster_traffic() {
        let mut p = sp("web", &[([10, 5, 2, 2], false)]);
        p.internal_local = true;
        let rs = ruleset_text([&p], &cfg());
        assert_eq!(
            rs.elements[&(MAP_NO_EP_SERVICES, "10.96.0.10 . tcp . 80".to_string())],
            "goto reject-chain"
        );
    }

    #[test]
    fn unchanged_is_an_empty_transaction_and_changes_touch_only_what_changed() {
        let a = sp("a", &[([10, 5, 1, 2], true)]);
        let mut b = sp("b", &[([10, 5, 1, 3], true)]);
        b.cluster_ip = Ipv4Addr::new(10, 96, 0, 11).into();
        let old = ruleset([&a, &b], &cfg());
        assert_eq!(transaction(&old, &old), "");
        // Scale b up: b's service chain is rewritten, one endpoint chain added, a untouched.
        let mut b2 = b.clone();
        b2.endpoints.push(Endpoint {
            ip: Ipv4Addr::new(10, 5, 2, 9).into(),
            port: 8080,
            local: false,
        });
        let new = ruleset([&a, &b2], &cfg());
        let tx = transaction(&old, &new);
        let names_a = Names::new(&a);
        let names_b = Names::new(&b);
        assert!(!tx.contains(&names_a.svc), "{tx}");
        assert!(
            tx.contains(&format!("flush chain ip {TABLE} {}\n", names_b.svc)),
            "{tx}"
        );
        assert!(tx.contains("add chain ip flannel-proxy ep-"), "{tx}");
        assert!(
            !tx.contains("element"),
            "the map element did not change: {tx}"
        );
        // Remove b entirely: element deleted before its chains go.
        let gone = ruleset([&a], &cfg());
        let tx = transaction(&new, &gone);
        let del_el = tx.find("delete element").expect("element deleted");
        let del_chain = tx.find("delete chain").expect("chains deleted");
        assert!(del_el < del_chain, "{tx}");
        assert_eq!(tx.matches("delete chain").count(), 3, "{tx}");
    }

    #[test]
    fn full_contains_base_and_everything() {
        let rs = ruleset([&sp("a", &[([10, 5, 1, 2], true)])], &cfg());
        let f = full(&rs);
        assert!(f.starts_with("add table ip flannel-proxy\ndelete table ip flannel-proxy\n"));
        assert_eq!(f.matches("add chain ip flannel-proxy svc-").count(), 1);
        assert!(f.contains(
            "add element ip flannel-proxy service-ips { 10.96.0.10 . tcp . 80 : goto svc-"
        ));
    }

    fn sp6(name: &str, eps: &[(Ipv6Addr, bool)]) -> ServicePort {
        let id = PortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::Ipv6,
        };
        let eps = eps
            .iter()
            .map(|(ip, local)| Endpoint {
                ip: (*ip).into(),
                port: 8080,
                local: *local,
            })
            .collect();
        ServicePort::new(
            id,
            "fd00:10:96::a".parse::<Ipv6Addr>().expect("ip"),
            80,
            eps,
        )
    }

    #[test]
    fn ipv6_ports_render_into_the_ip6_table_like_ipv4_ones() {
        let mut p = sp6(
            "web",
            &[
                ("fd10:0:0:11::2".parse().expect("ip"), true),
                ("fd10:0:0:12::2".parse().expect("ip"), false),
            ],
        );
        p.node_port = Some(30080);
        p.affinity = Some(60);
        p.external_ips = vec!["2001:db8::7".parse::<Ipv6Addr>().expect("ip").into()];
        let mut e = sp6("empty", &[]);
        e.cluster_ip = "fd00:10:96::b".parse::<Ipv6Addr>().expect("ip").into();
        let f = full_in(Family::Ip6, &ruleset([&p, &e], &cfg()));
        let dynamic = f.strip_prefix(&base_in(Family::Ip6)).expect("base first");
        let expected = [
            "add set ip6 flannel-proxy aff-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080__60 { type ipv6_addr; flags dynamic,timeout; timeout 60s; }",
            "add set ip6 flannel-proxy aff-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080__60 { type ipv6_addr; flags dynamic,timeout; timeout 60s; }",
            "add chain ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080",
            "add chain ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080",
            "add chain ip6 flannel-proxy ext-UARQTUAX-default/web/tcp/http",
            "add chain ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080 ip6 saddr fd10:0:0:11::2 jump mark-for-masquerade",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080 update @aff-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080__60 { ip6 saddr }",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080 meta l4proto tcp dnat to [fd10:0:0:11::2]:8080",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080 ip6 saddr fd10:0:0:12::2 jump mark-for-masquerade",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080 update @aff-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080__60 { ip6 saddr }",
            "add rule ip6 flannel-proxy ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080 meta l4proto tcp dnat to [fd10:0:0:12::2]:8080",
            "add rule ip6 flannel-proxy ext-UARQTUAX-default/web/tcp/http jump mark-for-masquerade",
            "add rule ip6 flannel-proxy ext-UARQTUAX-default/web/tcp/http goto svc-UARQTUAX-default/web/tcp/http",
            "add rule ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http ip6 daddr fd00:10:96::a ip6 saddr != fd10::/48 jump mark-for-masquerade",
            "add rule ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http ip6 saddr @aff-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080__60 goto ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080",
            "add rule ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http ip6 saddr @aff-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080__60 goto ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080",
            "add rule ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http numgen random mod 2 == 0 goto ep-UARQTUAX-default/web/tcp/http__fd10-0-0-11--2_8080",
            "add rule ip6 flannel-proxy svc-UARQTUAX-default/web/tcp/http goto ep-UARQTUAX-default/web/tcp/http__fd10-0-0-12--2_8080",
            "add element ip6 flannel-proxy no-endpoint-services { fd00:10:96::b . tcp . 80 : goto reject-chain }",
            "add element ip6 flannel-proxy service-ips { 2001:db8::7 . tcp . 80 : goto ext-UARQTUAX-default/web/tcp/http }",
            "add element ip6 flannel-proxy service-ips { fd00:10:96::a . tcp . 80 : goto svc-UARQTUAX-default/web/tcp/http }",
            "add element ip6 flannel-proxy service-nodeports { tcp . 30080 : goto ext-UARQTUAX-default/web/tcp/http }",
        ];
        assert_eq!(dynamic, expected.map(|l| format!("{l}\n")).concat());
        // The base differs from the IPv4 one only in the family and its addresses.
        let b6 = base_in(Family::Ip6);
        let b4 = base();
        assert_eq!(b6.lines().count(), b4.lines().count());
        for l in [
            "add map ip6 flannel-proxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict; }",
            "add rule ip6 flannel-proxy services ip6 daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip6 flannel-proxy services fib daddr type local ip6 daddr != ::1 ip6 daddr != fe80::/10 meta l4proto . th dport vmap @service-nodeports",
            "add rule ip6 flannel-proxy endpoints-check fib daddr type local ip6 daddr != ::1 ip6 daddr != fe80::/10 meta l4proto . th dport vmap @no-endpoint-nodeports",
            "add rule ip6 flannel-proxy reject-chain reject",
        ] {
            assert!(b6.lines().any(|x| x == l), "{l}\n{b6}");
        }
        assert_eq!(
            b6.replace(
                "ip6 daddr != ::1 ip6 daddr != fe80::/10",
                "ip daddr != 127.0.0.0/8"
            )
            .replace("ipv6_addr", "ipv4_addr")
            .replace("ip6 ", "ip "),
            b4
        );
        // An incremental step for the ip6 table.
        let tx = Tx::default();
        let mut tx = tx;
        tx.diff(&ruleset([&e], &cfg()), &Ruleset::default());
        assert_eq!(
            script_in(Family::Ip6, &tx.finish()),
            "delete element ip6 flannel-proxy no-endpoint-services { fd00:10:96::b . tcp . 80 }\n"
        );
    }

    #[test]
    fn cleanup_removes_both_tables() {
        assert_eq!(
            cleanup(),
            "add table ip flannel-proxy\ndelete table ip flannel-proxy\n\
             add table ip6 flannel-proxy\ndelete table ip6 flannel-proxy\n"
        );
        assert!(base().starts_with(&cleanup_in(Family::Ip)));
        assert!(!base().contains("ip6"));
    }
}
