//! Every row of the Ingress routing precedence end to end (docs/ingress.md#routing-precedence):
//! exact host vs wildcard vs host-less rules, Exact vs Prefix vs ImplementationSpecific, the
//! longest prefix, element-wise Prefix (`/foo` not `/foobar`), a host's default backend, the
//! catch-all defaultBackend (and which of two wins), 404 when nothing matches, conflicting
//! Ingresses resolved by namespace and name whatever order they arrive in. One pod on node 1
//! serves one port per backend and answers with that backend's name; flannel-ingress on node 0;
//! curl from the hub. Needs root, curl and openssl; skips with a reason without them, fails
//! under CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use test_support::wait_for;

mod common;

use common::{backend, field, path, service_in, Bed, INGRESS_CLASS};

/// The backends: (namespace, Service and identity, pod port).
const BACKENDS: [(&str, &str, u16); 16] = [
    ("default", "exact-host", 9001),
    ("default", "wild", 9002),
    ("default", "hostless", 9003),
    ("default", "catchall", 9004),
    ("default", "catchall2", 9005),
    ("default", "def-main", 9006),
    ("default", "p-exact", 9007),
    ("default", "p-prefix", 9008),
    ("default", "p-deep", 9009),
    ("default", "is", 9010),
    ("default", "eq-prefix", 9011),
    ("default", "eq-is", 9012),
    ("default", "foo", 9013),
    ("default", "loser", 9014),
    ("default", "nodef", 9015),
    ("alpha", "alpha-foo", 9016),
];

/// A rule: its host (None: any host) and its paths as (path, pathType, Service).
type Rule<'a> = (Option<&'a str>, &'a [(&'a str, &'a str, &'a str)]);

/// An Ingress of our class in `ns`, with a `defaultBackend` when given.
fn ingress(ns: &str, name: &str, default: Option<&str>, rules: &[Rule]) -> String {
    let mut y = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ingressClassName: flannel\n"
    );
    if let Some(d) = default {
        y += &format!("  defaultBackend: {}\n", backend(d));
    }
    if !rules.is_empty() {
        y += "  rules:\n";
    }
    for (host, paths) in rules {
        match host {
            Some(h) => y += &format!("  - host: '{h}'\n    http:\n      paths:\n"),
            None => y += "  - http:\n      paths:\n",
        }
        for (p, t, svc) in *paths {
            y += &path(p, t, svc);
        }
    }
    y + "---\n"
}

/// (Host header, path, the backend that must answer or the status code).
type Row = (&'static str, &'static str, &'static str);

/// Without a catch-all Ingress.
const ROWS: &[Row] = &[
    // Host: exact, else wildcard (one label deep), else the host-less rules.
    ("app.wild.test", "/", "exact-host"),
    ("APP.wild.test.:80", "/x", "exact-host"),
    ("app.wild.test", "/only", "exact-host"), // a chosen host: only its paths count
    ("x.wild.test", "/any/thing", "wild"),
    ("a.b.wild.test", "/only/x", "hostless"), // two labels: not the wildcard's
    ("wild.test", "/only", "hostless"),       // nor the bare suffix
    ("unknown.test", "/only", "hostless"),
    ("unknown.test", "/onlyx", "404"), // element-wise for host-less rules too
    ("a.b.wild.test", "/else", "404"), // nothing matched, no catch-all
    ("unknown.test", "/", "404"),
    // Path: Exact before prefixes, then the longest prefix, element-wise.
    ("paths.test", "/p", "p-exact"),
    ("paths.test", "/p/", "p-prefix"),
    ("paths.test", "/p/x", "p-prefix"),
    ("paths.test", "/p/deep", "p-deep"),
    ("paths.test", "/p/deep/er", "p-deep"),
    ("paths.test", "/p/deeper", "p-prefix"),
    ("paths.test", "/px", "def-main"), // not under /p: the host's default backend
    // ImplementationSpecific: a plain string prefix; equal length: Prefix first.
    ("paths.test", "/is", "is"),
    ("paths.test", "/isx/y", "is"),
    ("paths.test", "/eq", "eq-prefix"),
    ("paths.test", "/eq/x", "eq-prefix"),
    ("paths.test", "/eqx", "eq-is"),
    ("paths.test", "/foo", "foo"),
    ("paths.test", "/foo/bar", "foo"),
    ("paths.test", "/foobar", "def-main"),
    ("paths.test", "/none", "def-main"), // not b-conflict's: a-main named the host first
    // app.wild.test /foo: claimed by default/a-main and alpha/z-ns; namespace alpha sorts
    // first although the name does not.
    ("app.wild.test", "/foo", "alpha-foo"),
    ("app.wild.test", "/foo/x", "alpha-foo"),
    ("app.wild.test", "/foox", "exact-host"),
    // The first Ingress naming a host (c-nodef) has no defaultBackend: a later one's
    // (d-late's) does not apply and nothing else does: 404.
    ("nodef.test", "/x", "nodef"),
    ("nodef.test", "/z", "nodef"),
    ("nodef.test", "/x/", "404"),
    ("nodef.test", "/y", "404"),
];

/// With the catch-all Ingresses (default/y-catch wins over default/z-catch).
const CATCH_ALL_ROWS: &[Row] = &[
    ("unknown.test", "/", "catchall"),
    ("a.b.wild.test", "/else", "catchall"),
    ("unknown.test", "/onlyx", "catchall"),
    ("unknown.test", "/only", "hostless"), // host-less rules still come first
    ("nodef.test", "/y", "404"),           // a host some rule names: not the catch-all
    ("paths.test", "/none", "def-main"),
    ("paths.test", "/p", "p-exact"),
];

fn check(bed: &Bed, at: &str, rows: &[Row], log: &dyn Fn() -> String) {
    let mut wrong = Vec::new();
    for (host, p, want) in rows {
        let (code, body) = bed.get_at(at, host, p);
        let got = if code == 200 {
            field(&body, "pod").to_string()
        } else {
            code.to_string()
        };
        if got != *want {
            wrong.push(format!("{host}{p}: want {want}, got {got} ({body})"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n"),
        log()
    );
}

/// Waits until `host` + `path` is answered by `want` (a change applied is live).
fn wait_answer(bed: &Bed, at: &str, host: &str, p: &str, want: &str, log: &dyn Fn() -> String) {
    wait_for(Duration::from_secs(5), || {
        (field(&bed.get_at(at, host, p).1, "pod") == want).then_some(())
    })
    .unwrap_or_else(|| panic!("{host}{p} never answered by {want}:\n{}", log()));
}

#[test]
fn every_precedence_case() {
    let Some(mut bed) = Bed::new(2) else {
        return;
    };
    let (pod_ns, pod_ip) = bed.add_pod(1, 0);
    bed.route_pods(None);
    let mut objects = String::from(INGRESS_CLASS);
    objects += "apiVersion: v1\nkind: Namespace\nmetadata: {name: alpha}\n---\n";
    for (ns, name, port) in BACKENDS {
        bed.serve(&pod_ns, SocketAddr::from(([0, 0, 0, 0], port)), name);
        objects += &service_in(ns, name, "http", std::slice::from_ref(&pod_ip), port);
    }
    // The loser of a conflict arrives first: alone, it is served.
    objects += &ingress(
        "default",
        "b-conflict",
        Some("loser"),
        &[(Some("paths.test"), &[("/p", "Exact", "loser")])],
    );
    bed.apply(&objects);
    let at = bed.tb.nodes[0].ip.clone();
    let started = bed.start_ingress(
        0,
        &["--http-addr", "0.0.0.0:80", "--https-addr", "0.0.0.0:443"],
    );
    let log = || started.log();
    wait_answer(&bed, &at, "paths.test", "/p", "loser", &log);

    let mut objects = ingress(
        "default",
        "a-main",
        Some("def-main"),
        &[
            (
                Some("app.wild.test"),
                &[("/", "Prefix", "exact-host"), ("/foo", "Prefix", "foo")],
            ),
            (Some("*.wild.test"), &[("/", "Prefix", "wild")]),
            (
                Some("paths.test"),
                &[
                    ("/p", "Exact", "p-exact"),
                    ("/p", "Prefix", "p-prefix"),
                    ("/p/deep/", "Prefix", "p-deep"),
                    ("/is", "ImplementationSpecific", "is"),
                    ("/eq", "ImplementationSpecific", "eq-is"),
                    ("/eq", "Prefix", "eq-prefix"),
                    ("/foo", "Prefix", "foo"),
                ],
            ),
            (None, &[("/only", "Prefix", "hostless")]),
        ],
    );
    objects += &ingress(
        "default",
        "c-nodef",
        None,
        &[(Some("nodef.test"), &[("/x", "Exact", "nodef")])],
    );
    objects += &ingress(
        "alpha",
        "z-ns",
        None,
        &[(Some("app.wild.test"), &[("/foo", "Prefix", "alpha-foo")])],
    );
    objects += &ingress(
        "default",
        "d-late",
        Some("loser"),
        &[(Some("nodef.test"), &[("/z", "Exact", "nodef")])],
    );
    bed.apply(&objects);
    // default/a-main sorts before default/b-conflict: it takes /p although it came later.
    wait_answer(&bed, &at, "paths.test", "/p", "p-exact", &log);
    check(&bed, &at, ROWS, &log);

    // Catch-alls: the later-named arrives first and is served alone, then loses.
    bed.apply(&ingress("default", "z-catch", Some("catchall2"), &[]));
    wait_answer(&bed, &at, "unknown.test", "/", "catchall2", &log);
    bed.apply(&ingress("default", "y-catch", Some("catchall"), &[]));
    wait_answer(&bed, &at, "unknown.test", "/", "catchall", &log);
    check(&bed, &at, CATCH_ALL_ROWS, &log);

    // The losers are reported: the log names them, the metric counts them.
    let text = log();
    for want in [
        "paths.test /p (Exact): Ingress default/b-conflict is ignored there, default/a-main claimed it first",
        "app.wild.test /foo (Prefix): Ingress default/a-main is ignored there, alpha/z-ns claimed it first",
    ] {
        assert!(text.contains(want), "no {want:?} in the log:\n{text}");
    }
    let metrics = bed.metrics(0);
    assert!(
        metrics.lines().any(|l| l == "flannel_ingress_conflicts 2"),
        "{metrics}"
    );
    bed.finish(started);
}
