//! One consistent view for serving: the route table of the Ingresses we serve, every backend
//! resolved to its endpoints, and the TLS certificates by Secret. Built from the registry's
//! objects after each burst of changes and swapped in whole (a `tokio::sync::watch` of
//! `Arc<Snapshot>`): a request or handshake takes the snapshot of its moment and keeps it, so
//! an update never drops a connection or changes a request in flight.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::CertifiedKey;

use crate::class::{ClassConfig, ClassFilter};
use crate::endpoints::{resolve, ResolveError};
use crate::objects::Objects;
use crate::routes::{BackendRef, RouteTable};
use crate::tls::{CertCache, CertError};
use crate::FastMap;

/// The endpoints of one backend, with its round-robin position.
#[derive(Debug)]
pub struct Upstream {
    pub addrs: Result<Vec<SocketAddr>, ResolveError>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(addrs: Result<Vec<SocketAddr>, ResolveError>) -> Upstream {
        Upstream {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint in round-robin order that is not in `tried` and not ejected (an
    /// ejected one when every other was tried or is ejected too); None when all were tried.
    pub fn pick(&self, tried: &[SocketAddr], ejected: &Ejections) -> Option<SocketAddr> {
        let addrs = self.addrs.as_ref().ok()?;
        if addrs.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..addrs.len() {
            let a = addrs[(start + i) % addrs.len()];
            if tried.contains(&a) {
                continue;
            }
            if ejected.is_ejected(a) {
                fallback.get_or_insert(a);
                continue;
            }
            return Some(a);
        }
        fallback
    }
}

/// Passive ejection: an endpoint that refused a connection, failed an exchange or answered late
/// is skipped for a while (kept across snapshots, since an endpoint outlives them).
#[derive(Debug)]
pub struct Ejections {
    period: Duration,
    until: Mutex<FastMap<SocketAddr, Instant>>,
    /// Entries in `until` (read without the lock: most requests find none).
    held: AtomicUsize,
}

impl Ejections {
    pub fn new(period: Duration) -> Ejections {
        Ejections {
            period,
            until: Mutex::new(FastMap::default()),
            held: AtomicUsize::new(0),
        }
    }

    pub fn eject(&self, a: SocketAddr) {
        if let Ok(mut m) = self.until.lock() {
            let now = Instant::now();
            m.retain(|_, t| *t > now);
            m.insert(a, now + self.period);
            self.held.store(m.len(), Ordering::Release);
        }
    }

    pub fn is_ejected(&self, a: SocketAddr) -> bool {
        if self.held.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.until
            .lock()
            .map(|m| m.get(&a).is_some_and(|t| *t > Instant::now()))
            .unwrap_or(false)
    }

    /// A successful exchange clears it.
    pub fn clear(&self, a: SocketAddr) {
        if self.held.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut m) = self.until.lock() {
            m.remove(&a);
            self.held.store(m.len(), Ordering::Release);
        }
    }
}

/// What the proxy serves from, at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub routes: RouteTable,
    pub upstreams: FastMap<BackendRef, Arc<Upstream>>,
    /// Usable certificates by (namespace, Secret name).
    pub certs: HashMap<(String, String), Arc<CertifiedKey>>,
    pub default_cert: Arc<CertifiedKey>,
    /// Counts the rebuilds (0: nothing read from etcd yet).
    pub generation: u64,
}

/// Problems found while building, to log (each certificate problem once per content).
#[derive(Debug, Default)]
pub struct BuildReport {
    pub cert_errors: Vec<CertError>,
    pub ingresses: usize,
}

impl Snapshot {
    /// Nothing to serve yet (every request: 404; every handshake: the default certificate).
    pub fn empty(default_cert: Arc<CertifiedKey>) -> Snapshot {
        Snapshot {
            routes: RouteTable::default(),
            upstreams: FastMap::default(),
            certs: HashMap::new(),
            default_cert,
            generation: 0,
        }
    }

    /// Builds the snapshot from `objects`; `previous` lends its round-robin positions to
    /// backends whose endpoints did not change.
    pub fn build(
        objects: &Objects,
        class: &ClassConfig,
        certs: &mut CertCache,
        previous: &Snapshot,
    ) -> (Snapshot, BuildReport) {
        let filter = ClassFilter::new(class.clone(), objects.classes.values());
        let served: Vec<_> = objects
            .ingresses
            .values()
            .filter(|i| filter.serves(i))
            .collect();
        let routes = RouteTable::build(served.iter().copied());
        let mut upstreams = FastMap::default();
        for b in routes.backends() {
            let addrs = resolve(objects, b);
            let up = match previous.upstreams.get(b) {
                Some(old) if old.addrs == addrs => old.clone(),
                _ => Arc::new(Upstream::new(addrs)),
            };
            upstreams.insert(b.clone(), up);
        }
        let mut report = BuildReport {
            ingresses: served.len(),
            ..BuildReport::default()
        };
        let mut used = HashSet::new();
        let mut loaded = HashMap::new();
        for (ns, name) in routes.secrets() {
            let key = (ns.to_string(), name.to_string());
            if !used.insert(key.clone()) {
                continue;
            }
            let (r, fresh) = certs.get(ns, name, objects.secrets.get(&key));
            match r {
                Ok(ck) => {
                    loaded.insert(key, ck);
                }
                Err(e) if fresh => report.cert_errors.push(e),
                Err(_) => {}
            }
        }
        certs.retain(&used);
        let snap = Snapshot {
            routes,
            upstreams,
            certs: loaded,
            default_cert: previous.default_cert.clone(),
            generation: previous.generation + 1,
        };
        (snap, report)
    }

    /// The certificate for a handshake naming `sni` (empty: no SNI).
    pub fn certificate(&self, sni: &str) -> Arc<CertifiedKey> {
        self.routes
            .tls(sni)
            .and_then(|t| {
                let s = t.secret.as_ref()?;
                self.certs.get(&(t.namespace.clone(), s.clone()))
            })
            .cloned()
            .unwrap_or_else(|| self.default_cert.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn objects(yaml: &str) -> Objects {
        let mut o = Objects::new("/coreos.com/network");
        for obj in registry::parse_documents(yaml).unwrap() {
            o.insert(obj);
        }
        o
    }

    fn pem_pair(host: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn indent(t: &str) -> String {
        t.lines().map(|l| format!("    {l}\n")).collect()
    }

    fn secret(name: &str, crt: &str, key: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: web}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
            indent(crt),
            indent(key)
        )
    }

    const BASE: &str = "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: flannel}
spec: {controller: flannel.io/ingress}
---
apiVersion: v1
kind: Service
metadata: {name: app, namespace: web}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: app, namespace: web}
subsets: [{addresses: [{ip: 10.5.1.2}], ports: [{name: http, port: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: ours, namespace: web}
spec:
  ingressClassName: flannel
  tls:
  - {hosts: [good.test], secretName: good}
  - {hosts: [bad.test], secretName: bad}
  - {hosts: [gone.test], secretName: gone}
  rules:
  - host: good.test
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: app, port: {number: 80}}}}]}
  - host: bad.test
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: none, port: {name: http}}}}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: theirs, namespace: web}
spec:
  ingressClassName: other
  rules:
  - host: theirs.test
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: app, port: {number: 80}}}}]}
";

    #[test]
    fn build_resolves_backends_loads_certificates_and_reports_bad_ones_once() {
        let (crt, key) = pem_pair("good.test");
        let (_, other_key) = pem_pair("bad.test");
        let yaml = format!(
            "{}{}{BASE}",
            secret("good", &crt, &key),
            secret("bad", &crt, &other_key)
        );
        let o = objects(&yaml);
        let default = crate::tls::default_certificate().unwrap();
        let empty = Snapshot::empty(default.clone());
        let mut certs = CertCache::default();
        let (snap, report) = Snapshot::build(&o, &ClassConfig::default(), &mut certs, &empty);
        assert_eq!(snap.generation, 1);
        assert_eq!(report.ingresses, 1, "the other class is not served");
        assert!(snap.routes.route("theirs.test", "/").is_none());
        let good = snap.routes.route("good.test", "/x").unwrap();
        let up = &snap.upstreams[&good.backend];
        assert_eq!(up.addrs, Ok(vec![sa("10.5.1.2:8080")]));
        let bad = snap.routes.route("bad.test", "/").unwrap();
        assert!(matches!(
            snap.upstreams[&bad.backend].addrs,
            Err(ResolveError::NoService(_))
        ));
        // Certificates: the good Secret's; the default for a mismatched key, a missing Secret,
        // an unknown name and no SNI.
        assert_eq!(snap.certificate("good.test").cert, vec![crt_der(&crt)]);
        for sni in ["bad.test", "gone.test", "unknown.test", ""] {
            assert!(Arc::ptr_eq(&snap.certificate(sni), &default), "{sni}");
        }
        let mut errs: Vec<String> = report.cert_errors.iter().map(|e| e.to_string()).collect();
        errs.sort();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("Secret web/bad: the key"), "{errs:?}");
        assert_eq!(errs[1], "Secret web/gone not found");
        // Rebuilt without changes: nothing reported again, round-robin state kept.
        let (again, report) = Snapshot::build(&o, &ClassConfig::default(), &mut certs, &snap);
        assert!(report.cert_errors.is_empty(), "{:?}", report.cert_errors);
        assert_eq!(again.generation, 2);
        assert!(Arc::ptr_eq(&again.upstreams[&good.backend], up));
    }

    fn crt_der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn round_robin_skips_tried_and_ejected() {
        let up = Upstream::new(Ok(vec![
            sa("10.0.0.1:80"),
            sa("10.0.0.2:80"),
            sa("10.0.0.3:80"),
        ]));
        let ej = Ejections::new(Duration::from_secs(10));
        let picks: Vec<_> = (0..6).map(|_| up.pick(&[], &ej).unwrap()).collect();
        assert_eq!(picks[..3], picks[3..]);
        let distinct: HashSet<_> = picks.iter().collect();
        assert_eq!(distinct.len(), 3);
        ej.eject(sa("10.0.0.2:80"));
        for _ in 0..6 {
            assert_ne!(up.pick(&[], &ej), Some(sa("10.0.0.2:80")));
        }
        // Retries go to endpoints not tried yet; the ejected one last.
        let tried = [sa("10.0.0.1:80"), sa("10.0.0.3:80")];
        assert_eq!(up.pick(&tried, &ej), Some(sa("10.0.0.2:80")));
        let all = [sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")];
        assert_eq!(up.pick(&all, &ej), None);
        ej.clear(sa("10.0.0.2:80"));
        assert!(!ej.is_ejected(sa("10.0.0.2:80")));
        let none = Upstream::new(Err(ResolveError::NoEndpoints("x".into())));
        assert_eq!(none.pick(&[], &ej), None);
    }
}
