//! The route table: every served Ingress merged into one "host + path → Service port" map with
//! the precedence of the Ingress specification, decided once per change so that a request costs
//! a few hash lookups and one scan of the host's prefixes.
//!
//! Precedence (networking.k8s.io/v1, as ingress-nginx implements it):
//! 1. Host: an exact host rule, else a wildcard rule (`*.example.com` covers exactly one label in
//!    front of `example.com`, not `example.com` itself), else the rules without a host. Once a
//!    host is chosen only its paths count (as nginx picks a `server` and then its `location`s).
//! 2. Path: `Exact` (the whole normalized path) before any prefix; then the longest prefix.
//!    `Prefix` matches element-wise (`/foo` covers `/foo`, `/foo/` and `/foo/bar`, not
//!    `/foobar`; a trailing `/` in the rule is ignored); `ImplementationSpecific` is a plain
//!    string prefix, nginx's own `location` semantics in ingress-nginx without regexes. Equal
//!    lengths: `Prefix` before `ImplementationSpecific`, then the Ingress order.
//! 3. Nothing matched: for a host of some rule, the `defaultBackend` of the first Ingress that
//!    has rules for that host; for any other host (and the host-less rules), the `defaultBackend`
//!    of the first Ingress without rules (ingress-nginx's catch-all); else no route (404).
//!
//! The Ingress order is by namespace, then name (ingress-nginx orders by creation time first;
//! the registry has none). Two Ingresses claiming the same host, path and type, or the same
//! TLS host with different Secrets: the first wins and the other is reported as a
//! [`Conflict`], deterministically.

use std::fmt;

use registry::{Ingress, IngressBackend, PathType};

use crate::FastMap;

/// A Service port by number or by name (resolved against the Service later).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

/// Where a route sends requests: a Service port of the Ingress's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// The Ingress (and rule/path) a route comes from, for metrics, logs and conflict reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteSource {
    pub namespace: String,
    pub ingress: String,
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.ingress)
    }
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The rule's host (`*.example.com` for a wildcard, empty for any host and the defaults).
    pub host: String,
    /// The rule's path as written (`/` for a default backend).
    pub path: String,
    /// None for a default backend.
    pub path_type: Option<PathType>,
    pub backend: BackendRef,
    pub source: RouteSource,
}

/// The Secret whose certificate serves a TLS host (None: the controller's default certificate,
/// for a `tls` entry without `secretName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRef {
    pub namespace: String,
    pub secret: Option<String>,
    pub source: RouteSource,
}

/// A claim that lost to an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `host` (empty: any host), plus `path (type)` for routes or `tls` for certificates.
    pub what: String,
    pub winner: RouteSource,
    pub loser: RouteSource,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: Ingress {} is ignored there, {} claimed it first",
            self.what, self.loser, self.winner
        )
    }
}

#[derive(Debug, Clone)]
struct PrefixRoute {
    /// What the request path is compared with.
    key: String,
    element_wise: bool,
    route: Route,
}

impl PrefixRoute {
    fn matches(&self, path: &str) -> bool {
        if !self.element_wise {
            return path.starts_with(&self.key);
        }
        if self.key == "/" {
            return true;
        }
        path.strip_prefix(&self.key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// The routes of one host (or of the wildcard, or of "any host").
#[derive(Debug, Clone, Default)]
struct HostRoutes {
    exact: FastMap<String, Route>,
    /// Longest key first.
    prefixes: Vec<PrefixRoute>,
    default: Option<Route>,
    /// The Ingress whose rule created this host (its defaultBackend is the host's default).
    first: Option<RouteSource>,
}

impl HostRoutes {
    fn find(&self, path: &str) -> Option<&Route> {
        if let Some(r) = self.exact.get(path) {
            return Some(r);
        }
        self.prefixes
            .iter()
            .find(|p| p.matches(path))
            .map(|p| &p.route)
    }
}

/// Every route of the served Ingresses.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    hosts: FastMap<String, HostRoutes>,
    /// Keyed by the part after `*.`.
    wildcards: FastMap<String, HostRoutes>,
    any: HostRoutes,
    catch_all: Option<Route>,
    tls_hosts: FastMap<String, TlsRef>,
    tls_wildcards: FastMap<String, TlsRef>,
    tls_default: Option<TlsRef>,
    conflicts: Vec<Conflict>,
    routes: usize,
}

/// The request's `Host` (or `:authority`, or SNI) as rules compare it: lower case, without
/// a port or a trailing dot. An IPv6 literal keeps its brackets.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

fn backend_ref(namespace: &str, b: &IngressBackend) -> Option<BackendRef> {
    // Validation guarantees a service backend with one port form; anything else is skipped.
    let s = b.service.as_ref()?;
    let port = match (&s.port.number, &s.port.name) {
        (Some(n), None) => PortRef::Number(u16::try_from(*n).ok().filter(|n| *n != 0)?),
        (None, Some(name)) => PortRef::Name(name.clone()),
        _ => return None,
    };
    Some(BackendRef {
        namespace: namespace.to_string(),
        service: s.name.clone(),
        port,
    })
}

impl RouteTable {
    /// Builds the table from the Ingresses this controller serves (already validated by the
    /// registry; anything a validated Ingress cannot hold is skipped).
    pub fn build<'a>(ingresses: impl IntoIterator<Item = &'a Ingress>) -> RouteTable {
        let mut ordered: Vec<&Ingress> = ingresses.into_iter().collect();
        ordered.sort_by(|a, b| {
            (a.metadata.namespace.as_deref(), &a.metadata.name)
                .cmp(&(b.metadata.namespace.as_deref(), &b.metadata.name))
        });
        let mut t = RouteTable::default();
        for ing in &ordered {
            t.add(ing);
        }
        for routes in t
            .hosts
            .values_mut()
            .chain(t.wildcards.values_mut())
            .chain(std::iter::once(&mut t.any))
        {
            // Longest first; equal lengths: Prefix before ImplementationSpecific; then the
            // order of insertion (stable sort).
            routes.prefixes.sort_by(|a, b| {
                b.key
                    .len()
                    .cmp(&a.key.len())
                    .then(b.element_wise.cmp(&a.element_wise))
            });
        }
        t
    }

    fn add(&mut self, ing: &Ingress) {
        let ns = ing.metadata.namespace.as_deref().unwrap_or("default");
        let source = RouteSource {
            namespace: ns.to_string(),
            ingress: ing.metadata.name.clone(),
        };
        let default = ing
            .spec
            .default_backend
            .as_ref()
            .and_then(|b| backend_ref(ns, b));
        let default_route = |host: &str| {
            default.clone().map(|backend| Route {
                host: host.to_string(),
                path: "/".to_string(),
                path_type: None,
                backend,
                source: source.clone(),
            })
        };
        if ing.spec.rules.is_empty() && self.catch_all.is_none() {
            self.catch_all = default_route("");
        }
        for rule in &ing.spec.rules {
            let host = rule.host.as_deref().unwrap_or("").to_ascii_lowercase();
            let routes = if host.is_empty() {
                &mut self.any
            } else if let Some(suffix) = host.strip_prefix("*.") {
                self.wildcards.entry(suffix.to_string()).or_default()
            } else {
                self.hosts.entry(host.clone()).or_default()
            };
            if routes.first.is_none() {
                routes.first = Some(source.clone());
                routes.default = default_route(&host);
            }
            let Some(http) = &rule.http else { continue };
            for p in &http.paths {
                let Some(backend) = backend_ref(ns, &p.backend) else {
                    continue;
                };
                let Some(path_type) = p.path_type else {
                    continue;
                };
                let written = p
                    .path
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "/".into());
                let route = Route {
                    host: host.clone(),
                    path: written.clone(),
                    path_type: Some(path_type),
                    backend,
                    source: source.clone(),
                };
                let claim = |winner: &RouteSource| Conflict {
                    what: format!(
                        "{} {written} ({})",
                        if host.is_empty() { "*" } else { &host },
                        path_type.as_str()
                    ),
                    winner: winner.clone(),
                    loser: source.clone(),
                };
                match path_type {
                    PathType::Exact => match routes.exact.get(&written) {
                        Some(first) => self.conflicts.push(claim(&first.source)),
                        None => {
                            routes.exact.insert(written, route);
                            self.routes += 1;
                        }
                    },
                    PathType::Prefix | PathType::ImplementationSpecific => {
                        let element_wise = path_type == PathType::Prefix;
                        let key = if element_wise {
                            let k = written.trim_end_matches('/');
                            if k.is_empty() {
                                "/".to_string()
                            } else {
                                k.to_string()
                            }
                        } else {
                            written.clone()
                        };
                        match routes
                            .prefixes
                            .iter()
                            .find(|r| r.key == key && r.element_wise == element_wise)
                        {
                            Some(first) => self.conflicts.push(claim(&first.route.source)),
                            None => {
                                routes.prefixes.push(PrefixRoute {
                                    key,
                                    element_wise,
                                    route,
                                });
                                self.routes += 1;
                            }
                        }
                    }
                }
            }
        }
        for tls in &ing.spec.tls {
            let r = TlsRef {
                namespace: ns.to_string(),
                secret: tls.secret_name.clone().filter(|s| !s.is_empty()),
                source: source.clone(),
            };
            if tls.hosts.is_empty() {
                match &self.tls_default {
                    Some(first) if first.secret != r.secret => self.conflicts.push(Conflict {
                        what: "* tls".to_string(),
                        winner: first.source.clone(),
                        loser: source.clone(),
                    }),
                    Some(_) => {}
                    None => self.tls_default = Some(r.clone()),
                }
            }
            for h in &tls.hosts {
                let h = h.to_ascii_lowercase();
                let map = match h.strip_prefix("*.") {
                    Some(suffix) => self.tls_wildcards.entry(suffix.to_string()),
                    None => self.tls_hosts.entry(h.clone()),
                };
                match map {
                    std::collections::hash_map::Entry::Occupied(first) => {
                        let first = first.get();
                        if (&first.namespace, &first.secret) != (&r.namespace, &r.secret) {
                            self.conflicts.push(Conflict {
                                what: format!("{h} tls"),
                                winner: first.source.clone(),
                                loser: source.clone(),
                            });
                        }
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(r.clone());
                    }
                }
            }
        }
    }

    /// The route for a request to `host` (as the client sent it) and `path` (normalized with
    /// [`normalize_path`](crate::normalize_path)); None: no route (404).
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        let host = normalize_host(host);
        let chosen = self.hosts.get(&host).or_else(|| {
            host.split_once('.')
                .filter(|(first, _)| !first.is_empty())
                .and_then(|(_, rest)| self.wildcards.get(rest))
        });
        match chosen {
            Some(routes) => routes.find(path).or(routes.default.as_ref()),
            None => self.any.find(path).or(self.catch_all.as_ref()),
        }
    }

    /// The certificate for a TLS handshake naming `sni` (None: the default certificate).
    pub fn tls(&self, sni: &str) -> Option<&TlsRef> {
        let host = normalize_host(sni);
        self.tls_hosts
            .get(&host)
            .or_else(|| {
                host.split_once('.')
                    .filter(|(first, _)| !first.is_empty())
                    .and_then(|(_, rest)| self.tls_wildcards.get(rest))
            })
            .or(self.tls_default.as_ref())
    }

    /// Every Secret some TLS host names (to load and watch).
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tls_hosts
            .values()
            .chain(self.tls_wildcards.values())
            .chain(self.tls_default.iter())
            .filter_map(|t| t.secret.as_deref().map(|s| (t.namespace.as_str(), s)))
    }

    /// Every backend a route or default names (to resolve to endpoints), each once.
    pub fn backends(&self) -> Vec<&BackendRef> {
        let mut out: Vec<&BackendRef> = Vec::new();
        for routes in self
            .hosts
            .values()
            .chain(self.wildcards.values())
            .chain(std::iter::once(&self.any))
        {
            out.extend(routes.exact.values().map(|r| &r.backend));
            out.extend(routes.prefixes.iter().map(|p| &p.route.backend));
            out.extend(routes.default.iter().map(|r| &r.backend));
        }
        out.extend(self.catch_all.iter().map(|r| &r.backend));
        out.sort();
        out.dedup();
        out
    }

    /// Claims that lost to earlier ones, in the order found.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The number of path routes (defaults not counted).
    pub fn len(&self) -> usize {
        self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes == 0 && self.catch_all.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::normalize_path;

    /// An Ingress from compact YAML-ish JSON.
    fn ing(ns: &str, name: &str, spec: serde_json::Value) -> Ingress {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns}, "spec": spec
        }))
        .unwrap()
    }

    fn svc(name: &str) -> serde_json::Value {
        serde_json::json!({"service": {"name": name, "port": {"number": 80}}})
    }

    fn paths(host: Option<&str>, list: &[(&str, &str, &str)]) -> serde_json::Value {
        let paths: Vec<_> = list
            .iter()
            .map(|(p, t, s)| serde_json::json!({"path": p, "pathType": t, "backend": svc(s)}))
            .collect();
        match host {
            Some(h) => serde_json::json!({"host": h, "http": {"paths": paths}}),
            None => serde_json::json!({"http": {"paths": paths}}),
        }
    }

    fn to(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.route(host, &normalize_path(path).unwrap())
            .map(|r| r.backend.service.clone())
    }

    /// The examples table of the Ingress documentation ("Examples" under "Path types").
    #[test]
    fn the_specifications_path_examples() {
        // (rules as (type, path), request path, matches?)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, bool);
        let cases: &[Case] = &[
            (&[("Prefix", "/")], "/anything", true),
            (&[("Exact", "/foo")], "/foo", true),
            (&[("Exact", "/foo")], "/bar", false),
            (&[("Exact", "/foo")], "/foo/", false),
            (&[("Exact", "/foo/")], "/foo", false),
            (&[("Prefix", "/foo")], "/foo", true),
            (&[("Prefix", "/foo")], "/foo/", true),
            (&[("Prefix", "/foo/")], "/foo", true),
            (&[("Prefix", "/foo/")], "/foo/", true),
            (&[("Prefix", "/aaa/bb")], "/aaa/bbb", false),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb", true),
            (&[("Prefix", "/aaa/bbb/")], "/aaa/bbb", true),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb/", true),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb/ccc", true),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbbxyz", false),
            (&[("Prefix", "/"), ("Prefix", "/aaa")], "/aaa/ccc", true),
            (&[("Prefix", "/aaa")], "/ccc", false),
        ];
        for (rules, path, want) in cases {
            let list: Vec<(&str, &str, &str)> =
                rules.iter().map(|(t, p)| (*p, *t, "hit")).collect();
            let t = RouteTable::build(&[ing(
                "a",
                "i",
                serde_json::json!({"rules": [paths(Some("x.io"), &list)]}),
            )]);
            assert_eq!(to(&t, "x.io", path).is_some(), *want, "{rules:?} {path}");
        }
    }

    #[test]
    fn precedence_longest_path_then_exact_over_prefix() {
        let t = RouteTable::build(&[ing(
            "a",
            "i",
            serde_json::json!({"rules": [paths(Some("x.io"), &[
                ("/", "Prefix", "root"),
                ("/aaa", "Prefix", "aaa"),
                ("/aaa/bbb", "Prefix", "bbb"),
                ("/aaa/bbb", "Exact", "exact"),
                ("/img", "ImplementationSpecific", "img"),
            ])]}),
        )]);
        assert_eq!(to(&t, "x.io", "/aaa/bbb").as_deref(), Some("exact"));
        assert_eq!(to(&t, "x.io", "/aaa/bbb/").as_deref(), Some("bbb"));
        assert_eq!(to(&t, "x.io", "/aaa/bbb/c").as_deref(), Some("bbb"));
        assert_eq!(to(&t, "x.io", "/aaa/c").as_deref(), Some("aaa"));
        assert_eq!(to(&t, "x.io", "/ccc").as_deref(), Some("root"));
        // ImplementationSpecific is a string prefix (nginx's location): /imgs matches /img.
        assert_eq!(to(&t, "x.io", "/imgs/a.png").as_deref(), Some("img"));
        // Normalized before matching: no way around a route with dots, escapes or slashes.
        assert_eq!(to(&t, "x.io", "/ccc/../aaa/bbb").as_deref(), Some("exact"));
        assert_eq!(to(&t, "x.io", "//aaa//%62bb").as_deref(), Some("exact"));
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any_then_defaults() {
        let t = RouteTable::build(&[
            ing(
                "a",
                "exact",
                serde_json::json!({
                    "defaultBackend": svc("exact-default"),
                    "rules": [paths(Some("foo.bar.com"), &[("/api", "Prefix", "exact-api")])]
                }),
            ),
            ing(
                "a",
                "wild",
                serde_json::json!({
                    "rules": [paths(Some("*.bar.com"), &[("/", "Prefix", "wild")])]
                }),
            ),
            ing(
                "a",
                "any",
                serde_json::json!({
                    "rules": [paths(None, &[("/any", "Prefix", "any")])]
                }),
            ),
            ing(
                "b",
                "catch-all",
                serde_json::json!({"defaultBackend": svc("catch-all")}),
            ),
        ]);
        assert_eq!(
            to(&t, "foo.bar.com", "/api/x").as_deref(),
            Some("exact-api")
        );
        // Host and port forms of the same name.
        assert_eq!(
            to(&t, "FOO.bar.com.:8080", "/api").as_deref(),
            Some("exact-api")
        );
        // The exact host was chosen: its Ingress's defaultBackend, not the wildcard.
        assert_eq!(
            to(&t, "foo.bar.com", "/other").as_deref(),
            Some("exact-default")
        );
        // The wildcard covers one label only.
        assert_eq!(to(&t, "baz.bar.com", "/x").as_deref(), Some("wild"));
        assert_eq!(to(&t, "a.baz.bar.com", "/any").as_deref(), Some("any"));
        assert_eq!(to(&t, "bar.com", "/any").as_deref(), Some("any"));
        assert_eq!(to(&t, ".bar.com", "/any").as_deref(), Some("any"));
        // Unknown host, no host-less path: the catch-all Ingress.
        assert_eq!(to(&t, "other.io", "/x").as_deref(), Some("catch-all"));
        assert_eq!(to(&t, "[fd00::1]:80", "/x").as_deref(), Some("catch-all"));
        // Without a catch-all: 404.
        let t = RouteTable::build(&[ing(
            "a",
            "i",
            serde_json::json!({
                "rules": [paths(Some("x.io"), &[("/a", "Exact", "a")])]
            }),
        )]);
        assert_eq!(to(&t, "x.io", "/b"), None);
        assert_eq!(to(&t, "y.io", "/a"), None);
    }

    #[test]
    fn conflicts_are_resolved_by_order_and_reported() {
        let a = ing(
            "shop",
            "a",
            serde_json::json!({
                "tls": [{"hosts": ["x.io"], "secretName": "a-cert"}],
                "rules": [paths(Some("x.io"), &[("/api", "Prefix", "first"), ("/", "Exact", "root-a")])]
            }),
        );
        let b = ing(
            "shop",
            "b",
            serde_json::json!({
                "tls": [{"hosts": ["x.io"], "secretName": "b-cert"}, {"hosts": ["*.x.io"], "secretName": "wild"}],
                "rules": [paths(Some("x.io"), &[("/api/", "Prefix", "second"), ("/v2", "Prefix", "v2")])]
            }),
        );
        // Whatever order they come in.
        for t in [RouteTable::build([&a, &b]), RouteTable::build([&b, &a])] {
            assert_eq!(to(&t, "x.io", "/api/v1").as_deref(), Some("first"));
            assert_eq!(to(&t, "x.io", "/v2").as_deref(), Some("v2"));
            assert_eq!(
                t.conflicts()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                [
                    "x.io /api/ (Prefix): Ingress shop/b is ignored there, shop/a claimed it first",
                    "x.io tls: Ingress shop/b is ignored there, shop/a claimed it first",
                ]
            );
            assert_eq!(t.tls("x.io").unwrap().secret.as_deref(), Some("a-cert"));
            assert_eq!(t.tls("w.x.io").unwrap().secret.as_deref(), Some("wild"));
            assert_eq!(t.tls("x.io:443").unwrap().secret.as_deref(), Some("a-cert"));
            assert!(t.tls("other.io").is_none());
            let mut secrets: Vec<_> = t.secrets().collect();
            secrets.sort();
            assert_eq!(secrets, [("shop", "a-cert"), ("shop", "wild")]);
            assert_eq!(t.len(), 3);
            let names: Vec<_> = t.backends().iter().map(|b| b.service.clone()).collect();
            assert_eq!(names, ["first", "root-a", "v2"]);
        }
    }

    #[test]
    fn named_ports_and_empty_tables() {
        let t = RouteTable::build(&[ing(
            "a",
            "i",
            serde_json::json!({
                "rules": [{"host": "x.io", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}}
                ]}}]
            }),
        )]);
        let r = t.route("x.io", "/").unwrap();
        assert_eq!(r.backend.to_string(), "a/web:http");
        assert_eq!(r.source.to_string(), "a/i");
        assert!(RouteTable::build(&[]).is_empty());
        assert_eq!(RouteTable::build(&[]).route("x", "/"), None);
    }
}
