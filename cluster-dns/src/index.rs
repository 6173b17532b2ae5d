//! The record index (pure): every name the cluster zone holds, built from the registry's
//! objects ([`crate::objects::Objects`]) as the Kubernetes DNS specification lays them out, and
//! the lookup that answers one question from it.
//!
//! Names are kept lower-case without the trailing dot; questions are matched
//! case-insensitively with or without it. Records (kubernetes/dns docs/specification.md,
//! schema 1.1.0):
//!
//! | name | type | data |
//! |---|---|---|
//! | `<svc>.<ns>.svc.<zone>` | A/AAAA | ClusterIP(s); headless: every ready endpoint |
//! | `<hostname>.<svc>.<ns>.svc.<zone>` | A/AAAA | a headless Service's endpoint |
//! | `_<port>._<proto>.<svc>.<ns>.svc.<zone>` | SRV | named ports (N×M for headless) |
//! | `<svc>.<ns>.svc.<zone>` | CNAME | `externalName` |
//! | reverse name of a ClusterIP / endpoint | PTR | the Service / endpoint name |
//! | `dns-version.<zone>` | TXT | `1.1.0` |
//! | `<a-b-c-d>.<ns>.pod.<zone>` | A | per [`PodMode`] |
//! | `<zone>` | SOA, NS | `ns.dns.<zone>` |

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use registry::{IntOrString, Protocol, Service, ServiceType};

use crate::objects::Objects;

/// The schema version served in `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// The annotation that makes not-ready endpoints of a headless Service visible (the spec's
/// definition of _ready_).
pub const TOLERATE_UNREADY: &str = "service.alpha.kubernetes.io/tolerate-unready-endpoints";

/// Record types the index answers (others get NODATA for names that exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    A,
    Aaaa,
    Srv,
    Ptr,
    Cname,
    Txt,
    Soa,
    Ns,
    Any,
    Other(u16),
}

impl QType {
    pub fn from_u16(v: u16) -> QType {
        match v {
            1 => QType::A,
            2 => QType::Ns,
            5 => QType::Cname,
            6 => QType::Soa,
            12 => QType::Ptr,
            16 => QType::Txt,
            28 => QType::Aaaa,
            33 => QType::Srv,
            255 => QType::Any,
            v => QType::Other(v),
        }
    }
}

/// One record's data. Names are lower-case, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Ptr(String),
    Cname(String),
    Txt(String),
    Ns(String),
    /// The zone's SOA (its fields come from the index).
    Soa,
}

impl Rdata {
    fn matches(&self, q: QType) -> bool {
        matches!(
            (self, q),
            (_, QType::Any)
                | (Rdata::A(_), QType::A)
                | (Rdata::Aaaa(_), QType::Aaaa)
                | (Rdata::Srv { .. }, QType::Srv)
                | (Rdata::Ptr(_), QType::Ptr)
                | (Rdata::Cname(_), QType::Cname)
                | (Rdata::Txt(_), QType::Txt)
                | (Rdata::Ns(_), QType::Ns)
                | (Rdata::Soa, QType::Soa)
        )
    }
}

/// `pods` as CoreDNS's kubernetes plugin has it: what `<a-b-c-d>.<ns>.pod.<zone>` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodMode {
    /// NXDOMAIN for every pod name.
    Disabled,
    /// The address in the name, for any namespace (kube-dns's behaviour; the default of the
    /// Kubernetes DNS deployments, and what the specification still requires).
    #[default]
    Insecure,
    /// Only when a pod with that address runs in that namespace.
    Verified,
}

impl std::str::FromStr for PodMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disabled" => Ok(PodMode::Disabled),
            "insecure" => Ok(PodMode::Insecure),
            "verified" => Ok(PodMode::Verified),
            other => Err(crate::Error::Config {
                field: "pods",
                reason: format!("{other:?} is not one of disabled, insecure, verified"),
            }),
        }
    }
}

/// How the zone is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// The cluster domain, lower-case without trailing dot (`cluster.local`).
    pub zone: String,
    /// TTL of every record and of negative answers (CoreDNS's default: 5 s).
    pub ttl: u32,
    pub pods: PodMode,
    /// Addresses served for `ns.dns.<zone>` (the node-local DNS addresses).
    pub nameservers: Vec<IpAddr>,
}

impl IndexConfig {
    /// Checks and normalises `zone` (case, trailing dot, label syntax).
    pub fn new(zone: &str, ttl: u32, pods: PodMode) -> Result<IndexConfig, crate::Error> {
        let zone = normalize(zone);
        if zone.is_empty()
            || zone.len() > 253
            || !zone.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            return Err(crate::Error::Config {
                field: "cluster-domain",
                reason: format!("{zone:?} is not a DNS name"),
            });
        }
        Ok(IndexConfig {
            zone,
            ttl,
            pods,
            nameservers: Vec::new(),
        })
    }
}

/// One answer record: its owner (`None`: the question's name, echoed as asked) and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub owner: Option<String>,
    pub data: Rdata,
}

/// What a question gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not a name of ours: ask the upstream resolvers.
    Forward,
    /// The name does not exist (NXDOMAIN, with the zone's SOA).
    NxDomain,
    /// NOERROR. Empty `answers`: the name exists without records of that type (NODATA, with
    /// the SOA). `external`: the answers end in a CNAME to this name outside the zone, which
    /// the caller resolves upstream and appends.
    Found {
        answers: Vec<Answer>,
        additionals: Vec<Answer>,
        external: Option<String>,
    },
}

/// Lower-case, without one trailing dot.
pub fn normalize(name: &str) -> String {
    let n = name.strip_suffix('.').unwrap_or(name);
    n.to_ascii_lowercase()
}

/// The reverse-lookup name of an address (`d.c.b.a.in-addr.arpa`, nibbles for IPv6).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
                s.push('.');
                s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                s.push('.');
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// The system-assigned _hostname_ of an endpoint without one: its address with dashes
/// (`10-244-1-5`; IPv6 `fd00--1`), as CoreDNS does.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The address in a pod name's first label (`10-244-1-5`, `fd00--1`).
fn undashed(label: &str) -> Option<IpAddr> {
    if label.contains(':') || label.contains('.') {
        return None;
    }
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

fn addr_record(ip: IpAddr) -> Rdata {
    match ip {
        IpAddr::V4(v4) => Rdata::A(v4),
        IpAddr::V6(v6) => Rdata::Aaaa(v6),
    }
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// One ready endpoint of a headless Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HeadlessEndpoint {
    hostname: String,
    ip: IpAddr,
    /// Port numbers by (port name, protocol).
    ports: Vec<(String, Protocol, u16)>,
}

/// The zone's records.
#[derive(Debug, Clone, Default)]
pub struct Index {
    config: Option<IndexConfig>,
    /// Owner name → records, sorted.
    records: HashMap<Box<str>, Vec<Rdata>>,
    /// Names that exist without records of their own (empty non-terminals such as
    /// `svc.<zone>`, `<ns>.svc.<zone>`, `_tcp.<svc>.<ns>.svc.<zone>`).
    ents: HashSet<Box<str>>,
    /// (namespace, pod address) of attached pods (for [`PodMode::Verified`]).
    pod_ips: HashSet<(Box<str>, IpAddr)>,
    /// The SOA serial.
    pub serial: u32,
    /// `.pod.<zone>` and `.<zone>`, with their leading dots.
    pod_suffix: String,
    zone_suffix: String,
}

impl Index {
    /// Builds the zone from `objects` (only valid objects reach it: [`Objects`] drops the
    /// rest). `serial` becomes the SOA serial.
    pub fn build(config: &IndexConfig, objects: &Objects, serial: u32) -> Index {
        let zone = &config.zone;
        let mut ix = Index {
            config: Some(config.clone()),
            serial,
            pod_suffix: format!(".pod.{zone}"),
            zone_suffix: format!(".{zone}"),
            ..Index::default()
        };
        ix.add(zone, Rdata::Soa);
        ix.add(zone, Rdata::Ns(format!("ns.dns.{zone}")));
        for ip in &config.nameservers {
            ix.add(&format!("ns.dns.{zone}"), addr_record(*ip));
        }
        ix.ent(&format!("dns.{zone}"));
        ix.add(
            &format!("dns-version.{zone}"),
            Rdata::Txt(SCHEMA_VERSION.to_string()),
        );
        ix.ent(&format!("svc.{zone}"));
        if config.pods != PodMode::Disabled {
            ix.ent(&format!("pod.{zone}"));
        }
        for ns in objects.namespaces() {
            ix.ent(&format!("{ns}.svc.{zone}"));
            if config.pods != PodMode::Disabled {
                ix.ent(&format!("{ns}.pod.{zone}"));
            }
        }
        for (ns, ip) in objects.pod_ips() {
            ix.pod_ips.insert((ns.into(), ip));
        }
        for svc in objects.services() {
            ix.add_service(zone, objects, svc);
        }
        for v in ix.records.values_mut() {
            v.sort();
            v.dedup();
        }
        ix
    }

    fn add(&mut self, name: &str, data: Rdata) {
        self.records.entry(name.into()).or_default().push(data);
    }

    fn ent(&mut self, name: &str) {
        self.ents.insert(name.into());
    }

    fn add_service(&mut self, zone: &str, objects: &Objects, svc: &Service) {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = format!("{}.{ns}.svc.{zone}", svc.metadata.name);
        self.ent(&format!("{ns}.svc.{zone}"));
        if svc.spec.type_ == ServiceType::ExternalName {
            if let Some(ext) = svc.spec.external_name.as_deref() {
                self.add(&name, Rdata::Cname(normalize(ext)));
            }
            return;
        }
        if svc.is_headless() {
            let endpoints = headless_endpoints(objects, svc);
            // No ready endpoint: the name does not exist (NXDOMAIN, as the spec says).
            if endpoints.is_empty() {
                return;
            }
            let mut srv: BTreeMap<(String, Protocol), Vec<(u16, String)>> = BTreeMap::new();
            for ep in &endpoints {
                let host = format!("{}.{name}", ep.hostname);
                self.add(&name, addr_record(ep.ip));
                self.add(&host, addr_record(ep.ip));
                self.add(&reverse_name(ep.ip), Rdata::Ptr(host.clone()));
                for (port_name, proto, port) in &ep.ports {
                    srv.entry((port_name.clone(), *proto))
                        .or_default()
                        .push((*port, host.clone()));
                }
            }
            for ((port_name, proto), targets) in srv {
                let weight = (100 / targets.len()).max(1) as u16;
                let owner = format!("_{port_name}.{}.{name}", proto_label(proto));
                self.ent(&format!("{}.{name}", proto_label(proto)));
                for (port, target) in targets {
                    self.add(
                        &owner,
                        Rdata::Srv {
                            priority: 0,
                            weight,
                            port,
                            target,
                        },
                    );
                }
            }
            return;
        }
        let ips = cluster_ips(svc);
        if ips.is_empty() {
            return;
        }
        for ip in &ips {
            self.add(&name, addr_record(*ip));
            self.add(&reverse_name(*ip), Rdata::Ptr(name.clone()));
        }
        for p in &svc.spec.ports {
            let Some(port_name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            self.ent(&format!("{}.{name}", proto_label(p.protocol)));
            self.add(
                &format!("_{port_name}.{}.{name}", proto_label(p.protocol)),
                Rdata::Srv {
                    priority: 0,
                    weight: 100,
                    port,
                    target: name.clone(),
                },
            );
        }
    }

    /// Number of owner names with records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The zone's configuration (`None` for a default, empty index).
    pub fn config(&self) -> Option<&IndexConfig> {
        self.config.as_ref()
    }

    fn in_zone(&self, name: &str) -> bool {
        let Some(c) = &self.config else {
            return false;
        };
        name == c.zone || name.ends_with(&self.zone_suffix)
    }

    /// The pod record `<a-b-c-d>.<ns>.pod.<zone>`, if `name` has that shape.
    fn pod_lookup(&self, name: &str) -> Option<Option<IpAddr>> {
        let c = self.config.as_ref()?;
        let rest = name.strip_suffix(self.pod_suffix.as_str())?;
        let (label, ns) = rest.split_once('.')?;
        if ns.contains('.') {
            return Some(None);
        }
        let ip = undashed(label);
        Some(match (c.pods, ip) {
            (PodMode::Disabled, _) | (_, None) => None,
            (PodMode::Insecure, ip) => ip,
            (PodMode::Verified, Some(ip)) => self
                .pod_ips
                .contains(&(Box::<str>::from(ns), ip))
                .then_some(ip),
        })
    }

    /// Answers `qname`/`qtype`.
    pub fn lookup(&self, qname: &str, qtype: QType) -> Lookup {
        let name = normalize(qname);
        let reverse = name.ends_with(".in-addr.arpa") || name.ends_with(".ip6.arpa");
        if !self.in_zone(&name) {
            if reverse {
                if let Some(rrs) = self.records.get(name.as_str()) {
                    return self.found(rrs, qtype, None);
                }
            }
            return Lookup::Forward;
        }
        if let Some(ip) = self.pod_lookup(&name) {
            return match ip {
                Some(ip) => {
                    let rr = [addr_record(ip)];
                    self.found(&rr, qtype, None)
                }
                None => {
                    if self.ents.contains(name.as_str()) {
                        self.found(&[], qtype, None)
                    } else {
                        Lookup::NxDomain
                    }
                }
            };
        }
        match self.records.get(name.as_str()) {
            Some(rrs) => self.found(rrs, qtype, None),
            None if self.ents.contains(name.as_str()) => self.found(&[], qtype, None),
            None => Lookup::NxDomain,
        }
    }

    /// The answers of `rrs` for `qtype`, following a CNAME inside the zone (at most 8 deep).
    fn found(&self, rrs: &[Rdata], qtype: QType, owner: Option<String>) -> Lookup {
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut external = None;
        let mut owner = owner;
        let mut rrs = rrs;
        for _ in 0..8 {
            let cname = rrs.iter().find_map(|r| match r {
                Rdata::Cname(t) => Some(t.clone()),
                _ => None,
            });
            match cname {
                Some(target) if !matches!(qtype, QType::Cname | QType::Any) => {
                    answers.push(Answer {
                        owner: owner.clone(),
                        data: Rdata::Cname(target.clone()),
                    });
                    if !self.in_zone(&target) {
                        external = Some(target);
                        break;
                    }
                    match self.records.get(target.as_str()) {
                        Some(next) => {
                            rrs = next;
                            owner = Some(target);
                            continue;
                        }
                        None => {
                            // A dangling CNAME inside the zone: what we have so far.
                            break;
                        }
                    }
                }
                _ => {
                    for r in rrs.iter().filter(|r| r.matches(qtype)) {
                        answers.push(Answer {
                            owner: owner.clone(),
                            data: r.clone(),
                        });
                        if let Rdata::Srv { target, .. } = r {
                            if let Some(t) = self.records.get(target.as_str()) {
                                for a in t
                                    .iter()
                                    .filter(|a| matches!(a, Rdata::A(_) | Rdata::Aaaa(_)))
                                {
                                    let add = Answer {
                                        owner: Some(target.clone()),
                                        data: a.clone(),
                                    };
                                    if !additionals.contains(&add) {
                                        additionals.push(add);
                                    }
                                }
                            }
                        }
                    }
                    break;
                }
            }
        }
        Lookup::Found {
            answers,
            additionals,
            external,
        }
    }

    /// The SOA's fields: (mname, rname).
    pub fn soa_names(&self) -> Option<(String, String)> {
        let c = self.config.as_ref()?;
        Some((
            format!("ns.dns.{}", c.zone),
            format!("hostmaster.{}", c.zone),
        ))
    }
}

/// A Service's cluster addresses (`clusterIPs`, else `clusterIP`).
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let list: Vec<&str> = if svc.spec.cluster_ips.is_empty() {
        svc.spec.cluster_ip.as_deref().into_iter().collect()
    } else {
        svc.spec.cluster_ips.iter().map(String::as_str).collect()
    };
    list.iter().filter_map(|s| s.parse().ok()).collect()
}

/// A headless Service's ready endpoints: for a selector, the attached pods of its namespace
/// that carry every selector label (ports from their named target ports); without one, its
/// Endpoints object.
fn headless_endpoints(objects: &Objects, svc: &Service) -> Vec<HeadlessEndpoint> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let named_ports: Vec<_> = svc
        .spec
        .ports
        .iter()
        .filter_map(|p| {
            let name = p.name.as_deref().filter(|n| !n.is_empty())?;
            Some((name, p))
        })
        .collect();
    let mut out = Vec::new();
    match svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
        Some(selector) => {
            for (pod, ips) in objects.pods_in(ns) {
                if !selector
                    .iter()
                    .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
                {
                    continue;
                }
                let ports = named_ports
                    .iter()
                    .filter_map(|(name, p)| {
                        let port = match &p.target_port {
                            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                            Some(IntOrString::String(s)) => pod.named_port(s, p.protocol),
                            None => u16::try_from(p.port).ok(),
                        }?;
                        Some((name.to_string(), p.protocol, port))
                    })
                    .collect::<Vec<_>>();
                // The endpoints controller's rule: the pod's hostname when its subdomain names
                // this Service, else (here) its address with dashes.
                let named = pod
                    .spec
                    .hostname
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .filter(|_| pod.spec.subdomain.as_deref() == Some(svc.metadata.name.as_str()));
                for ip in ips {
                    out.push(HeadlessEndpoint {
                        hostname: named.map_or_else(|| dashed(*ip), str::to_string),
                        ip: *ip,
                        ports: ports.clone(),
                    });
                }
            }
        }
        None => {
            let Some(eps) = objects.endpoints(ns, &svc.metadata.name) else {
                return out;
            };
            let tolerate = svc
                .metadata
                .annotations
                .get(TOLERATE_UNREADY)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            for subset in &eps.subsets {
                let ports: Vec<_> = subset
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let name = p.name.as_deref().filter(|n| !n.is_empty())?;
                        Some((name.to_string(), p.protocol, u16::try_from(p.port).ok()?))
                    })
                    .collect();
                let ready = subset.addresses.iter();
                let unready = subset.not_ready_addresses.iter().filter(|_| tolerate);
                for a in ready.chain(unready) {
                    let Ok(ip) = a.ip.parse::<IpAddr>() else {
                        continue;
                    };
                    out.push(HeadlessEndpoint {
                        hostname: a
                            .hostname
                            .as_deref()
                            .filter(|h| !h.is_empty())
                            .map(str::to_ascii_lowercase)
                            .unwrap_or_else(|| dashed(ip)),
                        ip,
                        ports: ports.clone(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
