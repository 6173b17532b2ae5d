//! The record index against the Kubernetes DNS specification's examples (pure).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};

use cluster_dns::index::{Answer, Index, IndexConfig, Lookup, PodMode, QType, Rdata};
use cluster_dns::objects::Objects;
use registry::PodRecord;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: empty}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.3.0.1
  ports:
  - {name: https, port: 443, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  clusterIP: 10.3.0.8
  ports:
  - {port: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.3.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  clusterIP: None
  ports:
  - {name: https, port: 443, protocol: TCP}
  - {name: metrics, port: 9090, protocol: TCP}
---
apiVersion: v1
kind: Endpoints
metadata: {name: headless, namespace: default}
subsets:
- addresses:
  - {ip: 10.3.0.100, hostname: my-pet}
  - {ip: 10.3.0.101, hostname: my-pet-2}
  - {ip: 10.3.0.102}
  notReadyAddresses:
  - {ip: 10.3.0.103, hostname: sick}
  ports:
  - {name: https, port: 443, protocol: TCP}
  - {name: metrics, port: 9090, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: default}
spec:
  clusterIP: None
  ports:
  - {name: http, port: 80}
---
apiVersion: v1
kind: Service
metadata:
  name: tolerant
  namespace: default
  annotations: {service.alpha.kubernetes.io/tolerate-unready-endpoints: "true"}
spec:
  clusterIP: None
  ports:
  - {name: http, port: 80}
---
apiVersion: v1
kind: Endpoints
metadata: {name: tolerant, namespace: default}
subsets:
- notReadyAddresses:
  - {ip: 10.3.0.110}
  ports:
  - {name: http, port: 80}
---
apiVersion: v1
kind: Service
metadata: {name: foo, namespace: default}
spec:
  type: ExternalName
  externalName: www.example.com.
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: default}
spec:
  type: ExternalName
  externalName: kubernetes.default.svc.cluster.local
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-x, namespace: shop, labels: {app: db}}
spec: {hostname: other, subdomain: elsewhere, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {name: sql, port: 5432}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: None
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
"#;

fn objects() -> Objects {
    let mut o = Objects::new("/coreos.com/network");
    for obj in registry::parse_documents(OBJECTS).expect("test objects parse") {
        registry::validate(&obj, ipnet::Ipv4Net::default()).expect("test objects are valid");
        o.insert(obj);
    }
    let rec = |ip: [u8; 4]| {
        PodRecord::new(
            &[IpAddr::V4(Ipv4Addr::from(ip))],
            "node-1",
            Ipv4Addr::new(192, 168, 0, 1),
            "10.244.1.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
            "c1",
            "eth0",
        )
        .expect("an IPv4 record")
    };
    o.insert_record("shop", "web-1", rec([10, 244, 1, 5]));
    o.insert_record("shop", "db-1", rec([10, 244, 1, 6]));
    o.insert_record("shop", "db-0", rec([10, 244, 2, 7]));
    o.insert_record("shop", "db-x", rec([10, 244, 2, 8]));
    o
}

fn index(pods: PodMode) -> Index {
    let mut c = IndexConfig::new("cluster.local", 5, pods).unwrap();
    c.nameservers = vec!["169.254.20.10".parse().unwrap()];
    Index::build(&c, &objects(), 7)
}

fn data(l: &Lookup) -> Vec<Rdata> {
    match l {
        Lookup::Found { answers, .. } => answers.iter().map(|a| a.data.clone()).collect(),
        other => panic!("expected records, got {other:?}"),
    }
}

fn a(s: &str) -> Rdata {
    Rdata::A(s.parse().unwrap())
}

fn nodata(l: &Lookup) -> bool {
    matches!(l, Lookup::Found { answers, external: None, .. } if answers.is_empty())
}

#[test]
fn schema_version_txt() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("dns-version.cluster.local.", QType::Txt)),
        vec![Rdata::Txt("1.1.0".into())]
    );
}

#[test]
fn cluster_ip_service_a_srv_ptr() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("kubernetes.default.svc.cluster.local.", QType::A)),
        vec![a("10.3.0.1")]
    );
    let srv = ix.lookup(
        "_https._tcp.kubernetes.default.svc.cluster.local.",
        QType::Srv,
    );
    assert_eq!(
        data(&srv),
        vec![Rdata::Srv {
            priority: 0,
            weight: 100,
            port: 443,
            target: "kubernetes.default.svc.cluster.local".into()
        }]
    );
    // The additional section carries the target's address.
    let Lookup::Found { additionals, .. } = srv else {
        unreachable!()
    };
    assert_eq!(
        additionals,
        vec![Answer {
            owner: Some("kubernetes.default.svc.cluster.local".into()),
            data: a("10.3.0.1")
        }]
    );
    assert_eq!(
        data(&ix.lookup("1.0.3.10.in-addr.arpa.", QType::Ptr)),
        vec![Rdata::Ptr("kubernetes.default.svc.cluster.local".into())]
    );
    // UDP and TCP ports by protocol.
    assert_eq!(
        data(&ix.lookup("_dns._udp.dns.kube-system.svc.cluster.local", QType::Srv)).len(),
        1
    );
    assert_eq!(
        ix.lookup("_dns._tcp.dns.kube-system.svc.cluster.local", QType::Srv),
        Lookup::NxDomain
    );
}

#[test]
fn unnamed_ports_have_no_srv() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        ix.lookup("_8080._tcp.plain.default.svc.cluster.local", QType::Srv),
        Lookup::NxDomain
    );
}

#[test]
fn names_exist_without_the_asked_type_nodata() {
    let ix = index(PodMode::Insecure);
    // The Service has an A record: AAAA and TXT are NODATA, not NXDOMAIN.
    assert!(nodata(
        &ix.lookup("kubernetes.default.svc.cluster.local", QType::Aaaa)
    ));
    assert!(nodata(
        &ix.lookup("kubernetes.default.svc.cluster.local", QType::Txt)
    ));
    // Empty non-terminals exist.
    for n in [
        "cluster.local",
        "svc.cluster.local",
        "default.svc.cluster.local",
        "empty.svc.cluster.local",
        "kube-system.svc.cluster.local",
        "_tcp.kubernetes.default.svc.cluster.local",
        "pod.cluster.local",
        "default.pod.cluster.local",
    ] {
        assert!(nodata(&ix.lookup(n, QType::A)), "{n}");
    }
    // And these do not.
    for n in [
        "nosuch.default.svc.cluster.local",
        "nosuch.svc.cluster.local",
        "kubernetes.nosuch.svc.cluster.local",
        "x.kubernetes.default.svc.cluster.local",
        "_udp.kubernetes.default.svc.cluster.local",
        "nosuch.cluster.local",
    ] {
        assert_eq!(ix.lookup(n, QType::A), Lookup::NxDomain, "{n}");
    }
}

#[test]
fn zone_apex_soa_and_ns() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("cluster.local.", QType::Soa)),
        vec![Rdata::Soa]
    );
    assert_eq!(
        data(&ix.lookup("cluster.local.", QType::Ns)),
        vec![Rdata::Ns("ns.dns.cluster.local".into())]
    );
    assert_eq!(
        data(&ix.lookup("ns.dns.cluster.local.", QType::A)),
        vec![a("169.254.20.10")]
    );
}

#[test]
fn headless_service_every_ready_endpoint() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("headless.default.svc.cluster.local", QType::A)),
        vec![a("10.3.0.100"), a("10.3.0.101"), a("10.3.0.102")]
    );
    assert_eq!(
        data(&ix.lookup("my-pet.headless.default.svc.cluster.local", QType::A)),
        vec![a("10.3.0.100")]
    );
    // An endpoint without hostname gets its dashed address.
    assert_eq!(
        data(&ix.lookup("10-3-0-102.headless.default.svc.cluster.local", QType::A)),
        vec![a("10.3.0.102")]
    );
    // Not ready: not there.
    assert_eq!(
        ix.lookup("sick.headless.default.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        data(&ix.lookup("100.0.3.10.in-addr.arpa", QType::Ptr)),
        vec![Rdata::Ptr(
            "my-pet.headless.default.svc.cluster.local".into()
        )]
    );
}

#[test]
fn headless_srv_is_n_by_m() {
    let ix = index(PodMode::Insecure);
    let https = data(&ix.lookup("_https._tcp.headless.default.svc.cluster.local", QType::Srv));
    let targets: Vec<_> = https
        .iter()
        .map(|r| match r {
            Rdata::Srv { port, target, .. } => (*port, target.as_str()),
            _ => panic!("{r:?}"),
        })
        .collect();
    assert_eq!(
        targets,
        vec![
            (443, "10-3-0-102.headless.default.svc.cluster.local"),
            (443, "my-pet-2.headless.default.svc.cluster.local"),
            (443, "my-pet.headless.default.svc.cluster.local"),
        ]
    );
    let metrics = data(&ix.lookup(
        "_metrics._tcp.headless.default.svc.cluster.local",
        QType::Srv,
    ));
    assert_eq!(metrics.len(), 3);
    let Lookup::Found { additionals, .. } =
        ix.lookup("_https._tcp.headless.default.svc.cluster.local", QType::Srv)
    else {
        unreachable!()
    };
    assert_eq!(additionals.len(), 3);
}

#[test]
fn headless_without_ready_endpoints_is_nxdomain() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        ix.lookup("lonely.default.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    // The annotation makes not-ready endpoints count.
    assert_eq!(
        data(&ix.lookup("tolerant.default.svc.cluster.local", QType::A)),
        vec![a("10.3.0.110")]
    );
}

#[test]
fn headless_with_selector_uses_attached_pods_and_named_target_ports() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("web.shop.svc.cluster.local", QType::A)),
        vec![a("10.244.1.5")]
    );
    assert_eq!(
        data(&ix.lookup("_http._tcp.web.shop.svc.cluster.local", QType::Srv)),
        vec![Rdata::Srv {
            priority: 0,
            weight: 100,
            port: 8080,
            target: "10-244-1-5.web.shop.svc.cluster.local".into()
        }]
    );
}

#[test]
fn pods_with_hostname_and_subdomain_get_stable_names() {
    let ix = index(PodMode::Insecure);
    // db-0 names this Service as its subdomain: its hostname; db-x does not: its address.
    assert_eq!(
        data(&ix.lookup("db-0.db.shop.svc.cluster.local", QType::A)),
        vec![a("10.244.2.7")]
    );
    assert_eq!(
        data(&ix.lookup("10-244-2-8.db.shop.svc.cluster.local", QType::A)),
        vec![a("10.244.2.8")]
    );
    assert_eq!(
        ix.lookup("other.db.shop.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    // db-1 carries app=db too (no hostname): all three are endpoints.
    assert_eq!(
        data(&ix.lookup("db.shop.svc.cluster.local", QType::A)).len(),
        3
    );
    assert_eq!(
        data(&ix.lookup("7.2.244.10.in-addr.arpa", QType::Ptr)),
        vec![Rdata::Ptr("db-0.db.shop.svc.cluster.local".into())]
    );
}

#[test]
fn external_name_is_a_cname() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        ix.lookup("foo.default.svc.cluster.local", QType::A),
        Lookup::Found {
            answers: vec![Answer {
                owner: None,
                data: Rdata::Cname("www.example.com".into())
            }],
            additionals: vec![],
            external: Some("www.example.com".into()),
        }
    );
    // Asked for the CNAME itself: no chase.
    assert_eq!(
        ix.lookup("foo.default.svc.cluster.local", QType::Cname),
        Lookup::Found {
            answers: vec![Answer {
                owner: None,
                data: Rdata::Cname("www.example.com".into())
            }],
            additionals: vec![],
            external: None,
        }
    );
    // A CNAME inside the zone is followed here.
    assert_eq!(
        ix.lookup("alias.default.svc.cluster.local", QType::A),
        Lookup::Found {
            answers: vec![
                Answer {
                    owner: None,
                    data: Rdata::Cname("kubernetes.default.svc.cluster.local".into())
                },
                Answer {
                    owner: Some("kubernetes.default.svc.cluster.local".into()),
                    data: a("10.3.0.1")
                }
            ],
            additionals: vec![],
            external: None,
        }
    );
}

#[test]
fn pod_records_by_mode() {
    let q = "10-244-1-5.shop.pod.cluster.local";
    assert_eq!(
        data(&index(PodMode::Insecure).lookup(q, QType::A)),
        vec![a("10.244.1.5")]
    );
    // Insecure: any namespace, any address.
    assert_eq!(
        data(&index(PodMode::Insecure).lookup("1-2-3-4.other.pod.cluster.local", QType::A)),
        vec![a("1.2.3.4")]
    );
    assert!(nodata(&index(PodMode::Insecure).lookup(q, QType::Aaaa)));
    assert_eq!(
        data(&index(PodMode::Verified).lookup(q, QType::A)),
        vec![a("10.244.1.5")]
    );
    // Verified: the pod must be in that namespace.
    assert_eq!(
        index(PodMode::Verified).lookup("10-244-1-5.default.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        index(PodMode::Verified).lookup("1-2-3-4.shop.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        index(PodMode::Disabled).lookup(q, QType::A),
        Lookup::NxDomain
    );
    // Not an address.
    assert_eq!(
        index(PodMode::Insecure).lookup("1-2-3.shop.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        index(PodMode::Insecure).lookup("a.1-2-3-4.shop.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
}

#[test]
fn case_insensitive_with_or_without_trailing_dot() {
    let ix = index(PodMode::Insecure);
    for n in [
        "KUBERNETES.Default.SVC.cluster.LOCAL.",
        "kubernetes.default.svc.cluster.local",
    ] {
        assert_eq!(data(&ix.lookup(n, QType::A)), vec![a("10.3.0.1")], "{n}");
    }
}

#[test]
fn no_wildcards() {
    let ix = index(PodMode::Insecure);
    for n in [
        "*.default.svc.cluster.local",
        "kubernetes.*.svc.cluster.local",
        "*.headless.default.svc.cluster.local",
        "_*._tcp.kubernetes.default.svc.cluster.local",
    ] {
        assert_eq!(ix.lookup(n, QType::A), Lookup::NxDomain, "{n}");
    }
}

#[test]
fn names_outside_the_zone_are_forwarded() {
    let ix = index(PodMode::Insecure);
    assert_eq!(ix.lookup("example.com.", QType::A), Lookup::Forward);
    assert_eq!(ix.lookup("local.", QType::A), Lookup::Forward);
    assert_eq!(ix.lookup("xcluster.local.", QType::A), Lookup::Forward);
    // Reverse names we hold are answered, others forwarded.
    assert_eq!(
        ix.lookup("1.2.0.192.in-addr.arpa.", QType::Ptr),
        Lookup::Forward
    );
}

#[test]
fn any_returns_everything_at_the_name() {
    let ix = index(PodMode::Insecure);
    assert_eq!(
        data(&ix.lookup("cluster.local", QType::Any)),
        vec![Rdata::Ns("ns.dns.cluster.local".into()), Rdata::Soa]
    );
}

#[test]
fn bad_zone_names_are_refused() {
    assert!(IndexConfig::new("", 5, PodMode::Insecure).is_err());
    assert!(IndexConfig::new("cluster..local", 5, PodMode::Insecure).is_err());
    assert!(IndexConfig::new("clu ster.local", 5, PodMode::Insecure).is_err());
    assert_eq!(
        IndexConfig::new("Cluster.Local.", 5, PodMode::Insecure)
            .unwrap()
            .zone,
        "cluster.local"
    );
}

#[test]
fn ipv6_endpoints_get_aaaa_and_ip6_arpa_ptr() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: dual, namespace: default}
subsets:
- addresses:
  - {ip: 10.3.0.50}
  - {ip: "fd00:10::5"}
  - {ip: "fd00:10::6", hostname: six}
  ports: [{name: http, port: 80}]
"#;
    let mut o = Objects::new("/p");
    for obj in registry::parse_documents(yaml).unwrap() {
        registry::validate(&obj, ipnet::Ipv4Net::default()).unwrap();
        o.insert(obj);
    }
    let ix = Index::build(
        &IndexConfig::new("cluster.local", 5, PodMode::Insecure).unwrap(),
        &o,
        1,
    );
    let name = "dual.default.svc.cluster.local";
    assert_eq!(data(&ix.lookup(name, QType::A)), vec![a("10.3.0.50")]);
    assert_eq!(
        data(&ix.lookup(name, QType::Aaaa)),
        vec![
            Rdata::Aaaa("fd00:10::5".parse().unwrap()),
            Rdata::Aaaa("fd00:10::6".parse().unwrap())
        ]
    );
    // The system-assigned hostname of an IPv6 endpoint: its address with dashes.
    assert_eq!(
        data(&ix.lookup("fd00-10--5.dual.default.svc.cluster.local", QType::Aaaa)),
        vec![Rdata::Aaaa("fd00:10::5".parse().unwrap())]
    );
    assert!(nodata(
        &ix.lookup("six.dual.default.svc.cluster.local", QType::A)
    ));
    let rev = cluster_dns::index::reverse_name("fd00:10::6".parse().unwrap());
    assert_eq!(
        rev,
        "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.d.f.ip6.arpa"
    );
    assert_eq!(
        data(&ix.lookup(&rev, QType::Ptr)),
        vec![Rdata::Ptr("six.dual.default.svc.cluster.local".into())]
    );
    // SRV targets cover both families.
    assert_eq!(
        data(&ix.lookup("_http._tcp.dual.default.svc.cluster.local", QType::Srv)).len(),
        3
    );
}
