//! dns-bench's pure part: N Services as registry objects (the same every run), the records
//! the Kubernetes DNS specification makes of them as zone files for Knot and `local-data` for
//! Unbound, the upstream's zone for the external names, and the query mixes (dnsperf data
//! files) with the answer code each query must get.
//!
//! The records are made from the objects here, not read out of `cluster_dns::index::Index`
//! (it has no way to list its records); the tests check them against `Index::lookup`, name by
//! name and type by type, so the baselines serve exactly what our server serves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use cluster_dns::index::{dashed, normalize, reverse_name, Rdata, SCHEMA_VERSION};
use registry::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, IntOrString, Namespace, Object,
    ObjectMeta, Protocol, Service, ServicePort, ServiceSpec, ServiceType,
};

/// The cluster domain served.
pub const ZONE: &str = "cluster.local";
/// The reverse zone every generated address falls in (Service 10.96/16, endpoints 10.244/16).
pub const REVERSE_ZONE: &str = "10.in-addr.arpa";
/// The domain of the external names (served by the upstream).
pub const EXTERNAL: &str = "example.test";
/// TTL of every cluster record (CoreDNS's default, our server's default).
pub const TTL: u32 = 5;
/// TTL of the upstream's records (they stay cached for the whole run).
pub const EXTERNAL_TTL: u32 = 3600;
/// The address of `ns.dns.<zone>` (the node-local DNS address in a real cluster).
pub const NS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Services are spread over this many namespaces.
pub const NAMESPACES: usize = 10;
/// Addresses (with hostnames) of a headless Service's Endpoints object.
pub const ENDPOINTS: usize = 3;
/// Most Services generated (ClusterIPs and endpoint addresses stay inside their /16s).
pub const MAX_SERVICES: usize = 20_000;

/// What Service `i` is: 15% headless, 5% ExternalName, the rest ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvcKind {
    ClusterIp,
    Headless,
    ExternalName,
}

pub fn kind(i: usize) -> SvcKind {
    match i % 20 {
        1..=3 => SvcKind::Headless,
        4 => SvcKind::ExternalName,
        _ => SvcKind::ClusterIp,
    }
}

pub fn namespace(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

/// `svc-<i>.<ns>.svc.<zone>`
pub fn fqdn(i: usize) -> String {
    format!("svc-{i}.{}.svc.{ZONE}", namespace(i))
}

pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

pub fn endpoint_ip(i: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 1)) + (i * ENDPOINTS + k) as u32)
}

/// The external name behind ExternalName Service `i`.
pub fn external_target(i: usize) -> String {
    format!("ext-{i}.{EXTERNAL}")
}

/// External name `m` (what the external mix asks).
pub fn external_host(m: usize) -> String {
    format!("host-{m}.{EXTERNAL}")
}

fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: ns.map(String::from),
        ..Default::default()
    }
}

fn port(name: &str, port: i64, target: i64) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        protocol: Protocol::Tcp,
        port,
        target_port: Some(IntOrString::Int(target)),
        node_port: None,
    }
}

/// The registry objects of `n` Services: the namespaces, every Service, and an Endpoints
/// object per headless Service.
pub fn objects(n: usize) -> Vec<Object> {
    let mut v: Vec<Object> = (0..NAMESPACES)
        .map(|k| {
            Object::Namespace(Namespace {
                metadata: meta(&format!("ns-{k}"), None),
            })
        })
        .collect();
    for i in 0..n {
        let name = format!("svc-{i}");
        let ns = namespace(i);
        let m = meta(&name, Some(&ns));
        match kind(i) {
            SvcKind::ClusterIp => v.push(Object::Service(Service {
                metadata: m,
                spec: ServiceSpec {
                    selector: Some([("app".to_string(), name.clone())].into()),
                    ports: vec![port("http", 80, 8080), port("metrics", 9090, 9090)],
                    cluster_ip: Some(cluster_ip(i).to_string()),
                    ..Default::default()
                },
            })),
            SvcKind::Headless => {
                v.push(Object::Service(Service {
                    metadata: m.clone(),
                    spec: ServiceSpec {
                        ports: vec![port("http", 80, 8080)],
                        cluster_ip: Some("None".into()),
                        ..Default::default()
                    },
                }));
                v.push(Object::Endpoints(Endpoints {
                    metadata: m,
                    subsets: vec![EndpointSubset {
                        addresses: (0..ENDPOINTS)
                            .map(|k| EndpointAddress {
                                ip: endpoint_ip(i, k).to_string(),
                                node_name: None,
                                hostname: Some(format!("pod-{k}")),
                            })
                            .collect(),
                        not_ready_addresses: Vec::new(),
                        ports: vec![EndpointPort {
                            name: Some("http".into()),
                            port: 8080,
                            protocol: Protocol::Tcp,
                        }],
                    }],
                }));
            }
            SvcKind::ExternalName => v.push(Object::Service(Service {
                metadata: m,
                spec: ServiceSpec {
                    type_: ServiceType::ExternalName,
                    external_name: Some(external_target(i)),
                    ..Default::default()
                },
            })),
        }
    }
    v
}

/// One record: owner (lower-case, no trailing dot) and data.
pub type Record = (String, Rdata);

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// Every record of the cluster zone and of the reverse names, as the specification (and our
/// index) makes them from `objects`: apex SOA and NS, `ns.dns` A, `dns-version` TXT; per
/// ClusterIP Service A, PTR and an SRV per named port; per headless Service (endpoints from
/// its Endpoints object) A per ready address on the Service name and on `<hostname>.<svc>`,
/// PTR to the latter and SRV per named endpoint port; per ExternalName Service a CNAME.
/// Headless Services with a selector (endpoints from pods) are not generated and not handled.
pub fn records(objects: &[Object]) -> Vec<Record> {
    let mut out: Vec<Record> = vec![
        (ZONE.into(), Rdata::Soa),
        (ZONE.into(), Rdata::Ns(format!("ns.dns.{ZONE}"))),
        (format!("ns.dns.{ZONE}"), Rdata::A(NS_ADDR)),
        (
            format!("dns-version.{ZONE}"),
            Rdata::Txt(SCHEMA_VERSION.into()),
        ),
    ];
    let endpoints: BTreeMap<(&str, &str), &Endpoints> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Endpoints(e) => Some((
                (
                    e.metadata.namespace.as_deref().unwrap_or("default"),
                    e.metadata.name.as_str(),
                ),
                e,
            )),
            _ => None,
        })
        .collect();
    for o in objects {
        let Object::Service(svc) = o else { continue };
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = format!("{}.{ns}.svc.{ZONE}", svc.metadata.name);
        if svc.spec.type_ == ServiceType::ExternalName {
            if let Some(ext) = &svc.spec.external_name {
                out.push((name, Rdata::Cname(normalize(ext))));
            }
            continue;
        }
        if svc.is_headless() {
            let Some(eps) = endpoints.get(&(ns, svc.metadata.name.as_str())) else {
                continue;
            };
            let mut srv: BTreeMap<(String, Protocol), Vec<(u16, String)>> = BTreeMap::new();
            for subset in &eps.subsets {
                for a in &subset.addresses {
                    let Ok(ip) = a.ip.parse::<IpAddr>() else {
                        continue;
                    };
                    let host = match a.hostname.as_deref().filter(|h| !h.is_empty()) {
                        Some(h) => format!("{}.{name}", h.to_ascii_lowercase()),
                        None => format!("{}.{name}", dashed(ip)),
                    };
                    out.push((name.clone(), addr(ip)));
                    out.push((host.clone(), addr(ip)));
                    out.push((reverse_name(ip), Rdata::Ptr(host.clone())));
                    for p in &subset.ports {
                        let (Some(pn), Ok(port)) = (
                            p.name.as_deref().filter(|n| !n.is_empty()),
                            u16::try_from(p.port),
                        ) else {
                            continue;
                        };
                        srv.entry((pn.to_string(), p.protocol))
                            .or_default()
                            .push((port, host.clone()));
                    }
                }
            }
            for ((pn, proto), targets) in srv {
                let weight = (100 / targets.len()).max(1) as u16;
                for (port, target) in targets {
                    out.push((
                        format!("_{pn}.{}.{name}", proto_label(proto)),
                        Rdata::Srv {
                            priority: 0,
                            weight,
                            port,
                            target,
                        },
                    ));
                }
            }
            continue;
        }
        let Some(ip) = svc
            .spec
            .cluster_ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
        else {
            continue;
        };
        out.push((name.clone(), addr(ip)));
        out.push((reverse_name(ip), Rdata::Ptr(name.clone())));
        for p in &svc.spec.ports {
            let (Some(pn), Ok(port)) = (
                p.name.as_deref().filter(|n| !n.is_empty()),
                u16::try_from(p.port),
            ) else {
                continue;
            };
            out.push((
                format!("_{pn}.{}.{name}", proto_label(p.protocol)),
                Rdata::Srv {
                    priority: 0,
                    weight: 100,
                    port,
                    target: name.clone(),
                },
            ));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn addr(ip: IpAddr) -> Rdata {
    match ip {
        IpAddr::V4(a) => Rdata::A(a),
        IpAddr::V6(a) => Rdata::Aaaa(a),
    }
}

/// The SOA data our server answers (serial 1: what `serve_objects` uses); the baselines'
/// reverse zone gets the same.
fn soa() -> String {
    format!("ns.dns.{ZONE}. hostmaster.{ZONE}. 1 7200 1800 86400 {TTL}")
}

/// One record in zone-file syntax (absolute names).
pub fn zone_line(owner: &str, ttl: u32, data: &Rdata) -> String {
    let (t, d) = match data {
        Rdata::A(a) => ("A", a.to_string()),
        Rdata::Aaaa(a) => ("AAAA", a.to_string()),
        Rdata::Srv {
            priority,
            weight,
            port,
            target,
        } => ("SRV", format!("{priority} {weight} {port} {target}.")),
        Rdata::Ptr(t) => ("PTR", format!("{t}.")),
        Rdata::Cname(t) => ("CNAME", format!("{t}.")),
        Rdata::Txt(t) => ("TXT", format!("\"{t}\"")),
        Rdata::Ns(t) => ("NS", format!("{t}.")),
        Rdata::Soa => ("SOA", soa()),
    };
    format!("{owner}. {ttl} IN {t} {d}")
}

fn in_zone(name: &str, zone: &str) -> bool {
    name == zone || name.ends_with(&format!(".{zone}"))
}

/// The Knot zone files: (`cluster.local`, its text) and (`10.in-addr.arpa`, its text).
/// Fails on a record in neither zone.
pub fn knot_zones(records: &[Record]) -> Result<Vec<(String, String)>, String> {
    let mut fwd = String::new();
    let mut rev = format!(
        "{}\n{}\n",
        zone_line(REVERSE_ZONE, TTL, &Rdata::Soa),
        zone_line(REVERSE_ZONE, TTL, &Rdata::Ns(format!("ns.dns.{ZONE}")))
    );
    for (owner, data) in records {
        let text = if in_zone(owner, ZONE) {
            &mut fwd
        } else if in_zone(owner, REVERSE_ZONE) {
            &mut rev
        } else {
            return Err(format!("{owner} is in neither {ZONE} nor {REVERSE_ZONE}"));
        };
        text.push_str(&zone_line(owner, TTL, data));
        text.push('\n');
    }
    Ok(vec![(ZONE.into(), fwd), (REVERSE_ZONE.into(), rev)])
}

/// The upstream's zone: `host-<m>` for `m < externals` and the ExternalName targets of `n`
/// Services, addresses from 198.18.0.0/15.
pub fn external_zone(n: usize, externals: usize) -> String {
    let mut z = format!(
        "$ORIGIN {EXTERNAL}.\n$TTL {EXTERNAL_TTL}\n@ SOA ns hostmaster 1 7200 1800 86400 {EXTERNAL_TTL}\n@ NS ns\nns A 127.0.0.1\n"
    );
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    for m in 0..externals {
        let _ = writeln!(z, "host-{m} A {}", Ipv4Addr::from(base + m as u32));
    }
    for i in (0..n).filter(|i| kind(*i) == SvcKind::ExternalName) {
        let _ = writeln!(z, "ext-{i} A {}", Ipv4Addr::from(base + 65536 + i as u32));
    }
    z
}

/// Where Unbound serves and forwards.
#[derive(Debug, Clone)]
pub struct UnboundConf<'a> {
    pub dir: &'a str,
    pub port: u16,
    pub upstream_port: u16,
    pub threads: usize,
}

/// Unbound's configuration: the records as `local-data` in static local zones, the external
/// domain forwarded to the upstream, no DNSSEC validation (our server does none), the
/// invoking user, foreground, nothing outside `dir`.
pub fn unbound_conf(c: &UnboundConf, records: &[Record]) -> String {
    let mut s = format!(
        r#"server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-ip6: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: "{dir}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: {threads}
  so-reuseport: yes
  module-config: "iterator"
  do-not-query-localhost: no
  local-zone: "test." nodefault
  local-zone: "{ZONE}." static
  local-zone: "{REVERSE_ZONE}." static
  local-data: "{rev_soa}"
  local-data: "{rev_ns}"
"#,
        port = c.port,
        dir = c.dir,
        threads = c.threads,
        rev_soa = zone_line(REVERSE_ZONE, TTL, &Rdata::Soa),
        rev_ns = zone_line(REVERSE_ZONE, TTL, &Rdata::Ns(format!("ns.dns.{ZONE}"))),
    );
    for (owner, data) in records {
        let _ = writeln!(s, "  local-data: '{}'", zone_line(owner, TTL, data));
    }
    let _ = write!(
        s,
        "remote-control:\n  control-enable: no\nforward-zone:\n  name: \"{EXTERNAL}.\"\n  forward-addr: 127.0.0.1@{}\n",
        c.upstream_port
    );
    s
}

/// Knot's configuration: `zones` (domain, file name in `dir`), `threads` UDP workers, the
/// invoking user, foreground, nothing outside `dir`.
pub fn knot_conf(dir: &str, port: u16, threads: usize, zones: &[(String, String)]) -> String {
    let mut s = format!(
        r#"server:
  rundir: "{dir}"
  listen: 127.0.0.1@{port}
  udp-workers: {threads}
  tcp-workers: 1
  background-workers: 1
log:
  - target: stderr
    any: warning
database:
  storage: "{dir}"
template:
  - id: default
    storage: "{dir}"
    journal-content: none
    zonefile-sync: -1
zone:
"#
    );
    for (domain, file) in zones {
        let _ = writeln!(s, "  - domain: {domain}\n    file: \"{file}\"");
    }
    s
}

/// The answer code a query must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    NxDomain,
}

impl Rcode {
    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::NxDomain => "NXDOMAIN",
        }
    }
}

/// One line of a dnsperf data file (name without trailing dot, type) and its expected code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub name: String,
    pub qtype: &'static str,
    pub expect: Rcode,
}

fn q(name: String, qtype: &'static str, expect: Rcode) -> Query {
    Query {
        name,
        qtype,
        expect,
    }
}

/// A query mix.
#[derive(Debug, Clone)]
pub struct Mix {
    pub name: &'static str,
    pub what: &'static str,
    pub queries: Vec<Query>,
    /// Only names inside the cluster's zones (Knot, authoritative only, can answer them).
    pub in_zone: bool,
}

impl Mix {
    /// The dnsperf data file.
    pub fn datafile(&self) -> String {
        let mut s = String::new();
        for q in &self.queries {
            let _ = writeln!(s, "{} {}", q.name, q.qtype);
        }
        s
    }
}

/// A fixed pseudo-random order (xorshift), the same every run.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// The query mixes for `n` Services and `externals` external names:
/// - `cluster`: per ClusterIP Service, what a pod's stub resolver sends for it: the FQDN's A
///   and AAAA (NODATA: no IPv6 ClusterIP), and the first search-path try of the short name
///   `svc-<i>.<ns>` from a pod in another namespace (`svc-<i>.<ns>.<other ns>.svc.<zone>`,
///   NXDOMAIN);
/// - `headless`: per headless Service its A (every endpoint), one endpoint's hostname A and
///   the SRV of its named port;
/// - `ptr`: the PTR of every ClusterIP and endpoint address;
/// - `external`: A of `host-<m>.example.test`, answered from the cache (warmed first);
/// - `mixed`: of every 20 queries 10 from `cluster`, 3 `headless`, 2 `ptr`, 5 `external`.
pub fn mixes(n: usize, externals: usize) -> Vec<Mix> {
    let mut cluster = Vec::new();
    let mut headless = Vec::new();
    let mut ptr = Vec::new();
    for i in 0..n {
        match kind(i) {
            SvcKind::ClusterIp => {
                cluster.push(q(fqdn(i), "A", Rcode::NoError));
                cluster.push(q(fqdn(i), "AAAA", Rcode::NoError));
                let other = namespace(i + 1 + i / NAMESPACES % (NAMESPACES - 1));
                cluster.push(q(
                    format!("svc-{i}.{}.{other}.svc.{ZONE}", namespace(i)),
                    "A",
                    Rcode::NxDomain,
                ));
                ptr.push(q(reverse_name(cluster_ip(i).into()), "PTR", Rcode::NoError));
            }
            SvcKind::Headless => {
                headless.push(q(fqdn(i), "A", Rcode::NoError));
                headless.push(q(
                    format!("pod-{}.{}", i % ENDPOINTS, fqdn(i)),
                    "A",
                    Rcode::NoError,
                ));
                headless.push(q(format!("_http._tcp.{}", fqdn(i)), "SRV", Rcode::NoError));
                for k in 0..ENDPOINTS {
                    ptr.push(q(
                        reverse_name(endpoint_ip(i, k).into()),
                        "PTR",
                        Rcode::NoError,
                    ));
                }
            }
            SvcKind::ExternalName => {}
        }
    }
    let mut external: Vec<Query> = (0..externals)
        .map(|m| q(external_host(m), "A", Rcode::NoError))
        .collect();
    shuffle(&mut cluster, 1);
    shuffle(&mut headless, 2);
    shuffle(&mut ptr, 3);
    shuffle(&mut external, 4);
    let mut mixed = Vec::new();
    let len = cluster.len() + headless.len() + ptr.len() + external.len();
    let mut at = [0usize; 4];
    for p in 0..len {
        let (k, from) = match p % 20 {
            0..=9 => (0, &cluster),
            10..=12 => (1, &headless),
            13..=14 => (2, &ptr),
            _ => (3, &external),
        };
        if from.is_empty() {
            continue;
        }
        mixed.push(from[at[k] % from.len()].clone());
        at[k] += 1;
    }
    vec![
        Mix {
            name: "cluster",
            what: "A + AAAA of ClusterIP Services' FQDNs, search-path misses of short names (NXDOMAIN)",
            queries: cluster,
            in_zone: true,
        },
        Mix {
            name: "headless",
            what: "A of headless Services (3 endpoints), A of an endpoint hostname, SRV",
            queries: headless,
            in_zone: true,
        },
        Mix {
            name: "ptr",
            what: "PTR of ClusterIPs and endpoint addresses",
            queries: ptr,
            in_zone: true,
        },
        Mix {
            name: "external",
            what: "A of names outside the cluster, from the cache (warmed before)",
            queries: external,
            in_zone: false,
        },
        Mix {
            name: "mixed",
            what: "10 cluster : 3 headless : 2 ptr : 5 external",
            queries: mixed,
            in_zone: false,
        },
    ]
}

impl Query {
    /// The query as a datagram: id, RD set, one question of class IN (what dnsperf sends,
    /// without EDNS). `None` for an unknown type or a name that does not fit.
    pub fn wire(&self, id: u16) -> Option<Vec<u8>> {
        let qtype: u16 = match self.qtype {
            "A" => 1,
            "PTR" => 12,
            "AAAA" => 28,
            "SRV" => 33,
            _ => return None,
        };
        let mut b = Vec::with_capacity(self.name.len() + 18);
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in self.name.split('.').filter(|l| !l.is_empty()) {
            let len = u8::try_from(label.len()).ok().filter(|l| *l <= 63)?;
            b.push(len);
            b.extend_from_slice(label.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        Some(b)
    }
}

/// A few questions per kind with the answer `dig +short` must print (sorted lines), to check
/// each server before measuring it.
pub fn spot_checks(n: usize) -> Vec<(String, &'static str, Vec<String>)> {
    let mut v = Vec::new();
    let find = |k: SvcKind| (0..n).find(|i| kind(*i) == k);
    if let Some(i) = find(SvcKind::ClusterIp) {
        v.push((fqdn(i), "A", vec![cluster_ip(i).to_string()]));
        v.push((
            format!("_http._tcp.{}", fqdn(i)),
            "SRV",
            vec![format!("0 100 80 {}.", fqdn(i))],
        ));
        v.push((
            reverse_name(cluster_ip(i).into()),
            "PTR",
            vec![format!("{}.", fqdn(i))],
        ));
    }
    if let Some(i) = find(SvcKind::Headless) {
        let mut a: Vec<String> = (0..ENDPOINTS)
            .map(|k| endpoint_ip(i, k).to_string())
            .collect();
        a.sort();
        v.push((fqdn(i), "A", a));
        let w = 100 / ENDPOINTS;
        let mut srv: Vec<String> = (0..ENDPOINTS)
            .map(|k| format!("0 {w} 8080 pod-{k}.{}.", fqdn(i)))
            .collect();
        srv.sort();
        v.push((format!("_http._tcp.{}", fqdn(i)), "SRV", srv));
        v.push((
            reverse_name(endpoint_ip(i, 1).into()),
            "PTR",
            vec![format!("pod-1.{}.", fqdn(i))],
        ));
    }
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cluster_dns::index::{Index, IndexConfig, Lookup, PodMode, QType};
    use cluster_dns::objects::Objects;
    use std::collections::{BTreeSet, HashMap};

    fn index(objs: &[Object]) -> Index {
        let mut o = Objects::new("");
        for x in objs {
            o.insert(x.clone());
        }
        let mut c = IndexConfig::new(ZONE, TTL, PodMode::Insecure).unwrap();
        c.nameservers = vec![NS_ADDR.into()];
        Index::build(&c, &o, 1)
    }

    fn qtype(d: &Rdata) -> QType {
        match d {
            Rdata::A(_) => QType::A,
            Rdata::Aaaa(_) => QType::Aaaa,
            Rdata::Srv { .. } => QType::Srv,
            Rdata::Ptr(_) => QType::Ptr,
            Rdata::Cname(_) => QType::Cname,
            Rdata::Txt(_) => QType::Txt,
            Rdata::Ns(_) => QType::Ns,
            Rdata::Soa => QType::Soa,
        }
    }

    #[test]
    fn objects_are_valid_and_deterministic() {
        let objs = objects(400);
        for o in &objs {
            registry::validate(o, ipnet::Ipv4Net::default()).unwrap();
        }
        assert_eq!(objs, objects(400));
        let svcs = objs
            .iter()
            .filter(|o| matches!(o, Object::Service(_)))
            .count();
        assert_eq!(svcs, 400);
        assert_eq!(
            (0..400).filter(|i| kind(*i) == SvcKind::Headless).count(),
            60
        );
    }

    /// The records are the index's: the same owner names, and per owner and type the same
    /// data.
    #[test]
    fn records_are_what_the_index_answers() {
        let objs = objects(400);
        let ix = index(&objs);
        let recs = records(&objs);
        let mut by: HashMap<(String, QType), BTreeSet<Rdata>> = HashMap::new();
        for (owner, d) in &recs {
            by.entry((owner.clone(), qtype(d)))
                .or_default()
                .insert(d.clone());
        }
        let owners: BTreeSet<&String> = recs.iter().map(|r| &r.0).collect();
        assert_eq!(owners.len(), ix.len());
        for ((owner, t), want) in &by {
            let Lookup::Found { answers, .. } = ix.lookup(owner, *t) else {
                panic!("{owner} {t:?}: not found by the index");
            };
            let got: BTreeSet<Rdata> = answers.into_iter().map(|a| a.data).collect();
            assert_eq!(&got, want, "{owner} {t:?}");
        }
        // A headless Service's SRV: one per endpoint, weight 33.
        let srv = &by[&(format!("_http._tcp.{}", fqdn(1)), QType::Srv)];
        assert_eq!(srv.len(), ENDPOINTS);
        assert!(srv.iter().all(|s| matches!(
            s,
            Rdata::Srv {
                weight: 33,
                port: 8080,
                ..
            }
        )));
    }

    #[test]
    fn every_query_gets_its_expected_code_from_the_index() {
        let objs = objects(400);
        let ix = index(&objs);
        let mixes = mixes(400, 50);
        assert_eq!(
            mixes.iter().map(|m| m.name).collect::<Vec<_>>(),
            ["cluster", "headless", "ptr", "external", "mixed"]
        );
        for m in &mixes {
            assert!(!m.queries.is_empty(), "{}", m.name);
            for q in &m.queries {
                let t = match q.qtype {
                    "A" => QType::A,
                    "AAAA" => QType::Aaaa,
                    "SRV" => QType::Srv,
                    "PTR" => QType::Ptr,
                    other => panic!("{other}"),
                };
                let got = ix.lookup(&q.name, t);
                match (&got, q.expect) {
                    (Lookup::Forward, Rcode::NoError) => {
                        assert!(q.name.ends_with(EXTERNAL), "{q:?}");
                        assert!(!m.in_zone, "{q:?}");
                    }
                    (Lookup::Found { answers, .. }, Rcode::NoError) => {
                        assert_eq!(answers.is_empty(), t == QType::Aaaa, "{q:?}")
                    }
                    (Lookup::NxDomain, Rcode::NxDomain) => {}
                    _ => panic!("{q:?}: {got:?}"),
                }
            }
        }
        let cluster = &mixes[0].queries;
        assert_eq!(
            cluster
                .iter()
                .filter(|q| q.expect == Rcode::NxDomain)
                .count()
                * 3,
            cluster.len()
        );
        // The mixed one: half cluster queries, a quarter external.
        let mixed = &mixes[4].queries;
        let ext = mixed.iter().filter(|q| q.name.ends_with(EXTERNAL)).count();
        assert!(
            (ext as f64 / mixed.len() as f64 - 0.25).abs() < 0.01,
            "{ext}"
        );
        assert!(mixes[0].datafile().starts_with("svc-"));
    }

    #[test]
    fn zone_files_and_configs() {
        let objs = objects(40);
        let recs = records(&objs);
        let zones = knot_zones(&recs).unwrap();
        assert_eq!(zones.len(), 2);
        let (fwd, rev) = (&zones[0].1, &zones[1].1);
        assert!(fwd.contains(
            "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n"
        ));
        assert!(fwd.contains("svc-0.ns-0.svc.cluster.local. 5 IN A 10.96.0.1\n"));
        assert!(fwd.contains(
            "_http._tcp.svc-1.ns-1.svc.cluster.local. 5 IN SRV 0 33 8080 pod-0.svc-1.ns-1.svc.cluster.local.\n"
        ));
        assert!(fwd.contains("svc-4.ns-4.svc.cluster.local. 5 IN CNAME ext-4.example.test.\n"));
        assert!(fwd.contains("dns-version.cluster.local. 5 IN TXT \"1.1.0\"\n"));
        assert!(rev.starts_with("10.in-addr.arpa. 5 IN SOA "));
        assert!(rev.contains("1.0.96.10.in-addr.arpa. 5 IN PTR svc-0.ns-0.svc.cluster.local.\n"));
        assert!(!fwd.contains("in-addr.arpa. 5 IN PTR"));
        assert!(knot_zones(&[("x.example".into(), Rdata::A(NS_ADDR))]).is_err());

        let u = unbound_conf(
            &UnboundConf {
                dir: "/tmp/d",
                port: 5300,
                upstream_port: 5301,
                threads: 1,
            },
            &recs,
        );
        assert!(u.contains("interface: 127.0.0.1@5300\n"));
        assert!(u.contains("local-zone: \"cluster.local.\" static\n"));
        assert!(u.contains("  local-data: 'svc-0.ns-0.svc.cluster.local. 5 IN A 10.96.0.1'\n"));
        assert!(u.contains("forward-addr: 127.0.0.1@5301\n"));
        assert_eq!(u.matches("local-data:").count(), recs.len() + 2);
        let k = knot_conf(
            "/tmp/k",
            5302,
            1,
            &[("cluster.local".into(), "c.zone".into())],
        );
        assert!(k.contains("listen: 127.0.0.1@5302\n"));
        assert!(k.contains("  - domain: cluster.local\n    file: \"c.zone\"\n"));
        let e = external_zone(40, 3);
        assert!(e.contains("host-2 A 198.18.0.3\n"));
        assert!(e.contains("ext-4 A "));
        let w = q("a.bc".into(), "SRV", Rcode::NoError)
            .wire(0x1234)
            .unwrap();
        assert_eq!(
            w,
            [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 33, 0, 1]
        );
        assert!(q("a".repeat(64), "A", Rcode::NoError).wire(1).is_none());
        assert!(q("a".into(), "MX", Rcode::NoError).wire(1).is_none());
        let checks = spot_checks(40);
        assert_eq!(checks.len(), 6);
    }
}
