//! The server on loopback (no root): UDP and TCP, forwarding and the cache, ExternalName
//! chased upstream, truncation and EDNS0, garbage, a zone swapped while serving. The upstream
//! resolver is a second instance of the server, authoritative for another zone.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use cluster_dns::index::{Index, IndexConfig, PodMode};
use cluster_dns::metrics::DnsMetrics;
use cluster_dns::objects::Objects;
use cluster_dns::run::{DnsOptions, DnsServer};
use cluster_dns::server::Shared;
use cluster_dns::upstream::Upstream;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn objects(yaml: &str) -> Objects {
    let mut o = Objects::new("/coreos.com/network");
    for obj in registry::parse_documents(yaml).unwrap() {
        registry::validate(&obj, ipnet::Ipv4Net::default()).unwrap();
        o.insert(obj);
    }
    o
}

fn service(ns: &str, name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n---\n"
    )
}

fn headless(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: many, namespace: default}\nspec:\n  clusterIP: None\n  ports: [{name: http, port: 80}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: many, namespace: default}\nsubsets:\n- ports: [{name: http, port: 80}]\n  addresses:\n",
    );
    for i in 0..n {
        s += &format!("  - {{ip: 10.244.{}.{}}}\n", i / 200, i % 200 + 1);
    }
    s + "---\n"
}

struct Running {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(zone: &str, objs: Objects, upstream: Vec<SocketAddr>) -> Running {
    let index = IndexConfig::new(zone, 5, PodMode::Insecure).unwrap();
    let mut opts = DnsOptions::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        index,
        Upstream::new(upstream, Duration::from_millis(500)),
    );
    opts.udp_sockets = 2;
    let server = DnsServer::bind(opts, DnsMetrics::default()).unwrap();
    let addr = server.local_addrs()[0];
    let shared = server.shared();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { server.serve_objects(&objs, rx).await });
    Running {
        addr,
        shared,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// One UDP exchange (a blocking socket on a helper thread, with a timeout).
async fn udp_raw(addr: SocketAddr, bytes: Vec<u8>) -> Option<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&bytes, addr).unwrap();
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    })
    .await
    .unwrap()
}

async fn udp(addr: SocketAddr, q: &Message) -> Message {
    let bytes = udp_raw(addr, q.to_vec().unwrap())
        .await
        .expect("an answer over UDP");
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

async fn tcp(addr: SocketAddr, qs: &[Message]) -> Vec<Message> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    // Several questions on one connection.
    for q in qs {
        let b = q.to_vec().unwrap();
        s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&b).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        s.read_exact(&mut buf).await.unwrap();
        out.push(Message::from_vec(&buf).unwrap());
    }
    out
}

fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_forwards_caches_and_survives_garbage() {
    let upstream = start(
        "example.test",
        objects(&service("x", "www", "192.0.2.80")),
        vec![],
    )
    .await;
    let yaml = service("default", "web", "10.96.0.20")
        + &headless(120)
        + "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\nspec:\n  type: ExternalName\n  externalName: www.x.svc.example.test\n";
    let dns = start("cluster.local", objects(&yaml), vec![upstream.addr]).await;

    // A Service over UDP and TCP, authoritative.
    let m = udp(
        dns.addr,
        &query("web.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(a_records(&m), vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
    let t = tcp(
        dns.addr,
        &[
            query("web.default.svc.cluster.local.", RecordType::A, None),
            query("nosuch.default.svc.cluster.local.", RecordType::A, None),
        ],
    )
    .await;
    assert_eq!(a_records(&t[0]).len(), 1);
    assert_eq!(t[1].metadata.response_code, ResponseCode::NXDomain);
    // Negative answers carry the SOA (its TTL bounds negative caching).
    assert!(matches!(t[1].authorities[0].data, RData::SOA(_)));

    // NODATA: NOERROR, no answer, SOA.
    let m = udp(
        dns.addr,
        &query("web.default.svc.cluster.local.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);

    // Outside the zone: forwarded, then answered from the cache.
    let q = query("www.x.svc.example.test.", RecordType::A, None);
    let m = udp(dns.addr, &q).await;
    assert_eq!(a_records(&m), vec!["192.0.2.80".parse::<IpAddr>().unwrap()]);
    assert!(!m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    let hits = dns.shared.metrics().cache_hits.get();
    let m = udp(
        dns.addr,
        &query("WWW.x.svc.example.test.", RecordType::A, None),
    )
    .await;
    assert_eq!(a_records(&m).len(), 1);
    assert_eq!(dns.shared.metrics().cache_hits.get(), hits + 1);
    // The upstream's NXDOMAIN comes through.
    let m = udp(
        dns.addr,
        &query("nope.x.svc.example.test.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // ExternalName: the CNAME and the target's address from upstream, in one answer.
    let m = udp(
        dns.addr,
        &query("ext.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert!(
        matches!(&m.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "www.x.svc.example.test.")
    );
    assert_eq!(a_records(&m), vec!["192.0.2.80".parse::<IpAddr>().unwrap()]);

    // A large headless answer: truncated over UDP without EDNS (512 bytes), cut to the
    // client's EDNS size, whole over TCP.
    let big = query("many.default.svc.cluster.local.", RecordType::A, None);
    let m = udp(dns.addr, &big).await;
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    assert_eq!(m.queries.len(), 1);
    let m = udp(
        dns.addr,
        &query("many.default.svc.cluster.local.", RecordType::A, Some(4096)),
    )
    .await;
    assert!(!m.metadata.truncation, "120 A records fit in 4096 bytes");
    assert_eq!(a_records(&m).len(), 120);
    assert!(m.edns.is_some(), "EDNS0 is answered with EDNS0");
    let m = &tcp(dns.addr, &[big]).await[0];
    assert!(!m.metadata.truncation);
    assert_eq!(a_records(m).len(), 120);

    // An EDNS version we do not speak: BADVERS.
    let mut q = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    q.edns.as_mut().unwrap().set_version(1);
    let m = udp(dns.addr, &q).await;
    // Code 16 (BADVERS in an OPT answer; hickory decodes 16 as BADSIG).
    let rc = m.metadata.response_code;
    assert_eq!((rc.high(), rc.low()), (1, 0), "{rc:?}");

    // Garbage: answered FORMERR when it has a header, else dropped; responses are never
    // answered; the server goes on.
    let good = query("web.default.svc.cluster.local.", RecordType::A, None);
    let mut bad_label = good.to_vec().unwrap();
    bad_label[12] = 0x3f; // the first label claims 63 bytes
    assert!(udp_raw(dns.addr, vec![1, 2, 3, 4, 5]).await.is_none());
    let mut response = good.to_vec().unwrap();
    response[2] |= 0x80;
    assert!(udp_raw(dns.addr, response).await.is_none());
    for junk in [
        bad_label,
        vec![0xab; 12],
        (0..=255u8).cycle().take(900).collect(),
    ] {
        if let Some(b) = udp_raw(dns.addr, junk.clone()).await {
            let m = Message::from_vec(&b).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{junk:?}");
        }
    }
    // Two questions in one message: FORMERR.
    let mut two = query("web.default.svc.cluster.local.", RecordType::A, None);
    two.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
    assert_eq!(
        udp(dns.addr, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    // Zone transfers are not offered.
    let m = &tcp(dns.addr, &[query("cluster.local.", RecordType::AXFR, None)]).await[0];
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert!(dns.shared.metrics().dropped.get() >= 2);
    let m = udp(dns.addr, &good).await;
    assert_eq!(a_records(&m).len(), 1);

    // A new zone swapped in is served at once.
    let cfg = IndexConfig::new("cluster.local", 5, PodMode::Insecure).unwrap();
    dns.shared.set_index(Index::build(
        &cfg,
        &objects(&service("default", "new", "10.96.0.21")),
        2,
    ));
    let m = udp(
        dns.addr,
        &query("new.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(a_records(&m), vec!["10.96.0.21".parse::<IpAddr>().unwrap()]);
    let m = udp(dns.addr, &good).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    dns.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_upstream_answer_is_servfail_within_the_timeout() {
    // An upstream that never answers (a bound socket nobody reads).
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = start(
        "cluster.local",
        Objects::new("/p"),
        vec![silent.local_addr().unwrap()],
    )
    .await;
    let started = std::time::Instant::now();
    let m = udp(dns.addr, &query("www.example.org.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(dns.shared.metrics().upstream_errors.get(), 1);
    dns.stop().await;
}

/// The fast path's answers are the general path's, whatever the asker's id, letter case,
/// RD/CD bits and EDNS size: the same message (names compared as DNS does, ignoring case),
/// the question spelled exactly as asked, and byte for byte when asked in the same case.
#[test]
fn kept_answers_equal_fresh_ones() {
    use cluster_dns::fast::{self, Answers};
    use cluster_dns::server::{Step, Transport};
    let yaml = service("default", "web", "10.96.0.20") + &headless(5);
    let cfg = IndexConfig::new("cluster.local", 5, PodMode::Insecure).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let shared = Shared::new(
        Index::build(&cfg, &objects(&yaml), 3),
        Default::default(),
        Upstream::new(vec![], Duration::from_secs(1)),
        DnsMetrics::default(),
        4,
    );
    let (generation, ix) = shared.current();
    let fresh = |bytes: &[u8]| match shared.handle_with(&ix, bytes, Transport::Udp) {
        Step::Zone(b) => b,
        other => panic!("{other:?}"),
    };
    let mut kept = Answers::default();
    kept.zone(generation);
    let mut checked = 0;
    for (name, t) in [
        ("web.default.svc.cluster.local.", RecordType::A),
        ("many.default.svc.cluster.local.", RecordType::A),
        (
            "_http._tcp.many.default.svc.cluster.local.",
            RecordType::SRV,
        ),
        ("nosuch.default.svc.cluster.local.", RecordType::A),
        ("web.default.svc.cluster.local.", RecordType::AAAA),
        ("20.0.96.10.in-addr.arpa.", RecordType::PTR),
        ("cluster.local.", RecordType::SOA),
    ] {
        for edns in [None, Some(1232)] {
            let first = query(name, t, edns).to_vec().unwrap();
            let q = fast::parse(&first).unwrap();
            kept.keep(&q, &fresh(&first));
            let mut second = query(&name.to_ascii_uppercase(), t, edns.map(|_| 4000));
            second.metadata.recursion_desired = false;
            second.metadata.checking_disabled = true;
            let bytes = second.to_vec().unwrap();
            let q2 = fast::parse(&bytes).unwrap();
            let quick = kept.answer(&q2, std::time::Instant::now()).expect("kept");
            let general = fresh(&bytes);
            assert_eq!(
                Message::from_vec(&quick).unwrap(),
                Message::from_vec(&general).unwrap(),
                "{name} {t:?} {edns:?}"
            );
            let end = 12 + q2.qname.len();
            assert_eq!(quick[12..end], bytes[12..end], "the question as asked");
            // Asked again in the first spelling: identical bytes.
            let again = query(name, t, edns).to_vec().unwrap();
            let q3 = fast::parse(&again).unwrap();
            assert_eq!(
                kept.answer(&q3, std::time::Instant::now()).unwrap(),
                fresh(&again),
                "{name} {t:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}
