//! `flannelctl apply|get|delete` against a real etcd (Debian etcd-server) on a free loopback
//! port, at a unique prefix. Skips with a printed reason when etcd is not installed, fails
//! under CI.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use test_support::{random_tag, Etcd};

const BIN: &str = env!("CARGO_BIN_EXE_flannelctl");

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  type: NodePort
  selector: {app: dns}
  ports:
  - {name: dns-tcp, port: 53, nodePort: 30053}
  - {name: dns-udp, port: 53, protocol: UDP, nodePort: 30053}
  - {name: metrics, port: 9153}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: shop}
subsets:
- addresses: [{ip: 192.168.1.20}, {ip: 192.168.1.21}]
  ports: [{port: 5432}]
"#;

struct Ctl {
    _etcd: Etcd,
    endpoint: String,
    prefix: String,
    dir: tempfile::TempDir,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn start() -> Option<Ctl> {
        let etcd = Etcd::start()?;
        let prefix = format!("/test-{}/network", random_tag(6));
        etcd.etcdctl(&[
            "put",
            &format!("{prefix}/config"),
            r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/24"}"#,
        ])
        .unwrap();
        Some(Ctl {
            endpoint: etcd.endpoint(),
            _etcd: etcd,
            prefix,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// Runs flannelctl with the etcd flags from the environment (as FLANNELCTL_*), feeding
    /// `stdin`.
    fn run_with(&self, args: &[&str], stdin: &str) -> Out {
        let mut child = Command::new(BIN)
            .args(args)
            .env("FLANNELCTL_ETCD_ENDPOINTS", &self.endpoint)
            .env("FLANNELCTL_ETCD_PREFIX", &self.prefix)
            // Generous: a loaded test machine can make etcd's fsync slow.
            .env("FLANNELCTL_ETCD_TIMEOUT", "30")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let o = Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(!o.stderr.contains("panicked"), "{args:?}: {}", o.stderr);
        o
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, "")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "{args:?}: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn keys(&self) -> Vec<String> {
        self._etcd
            .etcdctl(&[
                "get",
                "--prefix",
                "--keys-only",
                &format!("{}/registry/", self.prefix),
            ])
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.trim_start_matches(&format!("{}/registry/", self.prefix))
                    .to_string()
            })
            .collect()
    }
}

#[test]
fn apply_get_delete() {
    let Some(ctl) = Ctl::start() else { return };
    let manifest = ctl.file("shop.yaml", MANIFEST);

    let out = ctl.ok(&["apply", "-f", &manifest]);
    assert_eq!(
        out,
        "namespace/shop created\npod/web-0 created\npod/web-1 created\nservice/web created\nservice/dns created\nservice/db created\nendpoints/db created\n"
    );

    // Tables.
    let svc = ctl.ok(&["get", "svc", "-n", "shop"]);
    let lines: Vec<&str> = svc.lines().collect();
    assert_eq!(lines.len(), 4, "{svc}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "SELECTOR"
        ]
    );
    // Columns line up: every cell starts where its header does.
    let starts = |l: &str| -> Vec<usize> {
        let b = l.as_bytes();
        (0..b.len())
            .filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' '))
            .collect()
    };
    assert!(lines.iter().all(|l| starts(l) == starts(lines[0])), "{svc}");
    let row = |name: &str| -> Vec<String> {
        lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("web"),
        [
            "shop",
            "web",
            "ClusterIP",
            "10.96.0.10",
            "<none>",
            "80/TCP",
            "app=web"
        ]
    );
    let dns = row("dns");
    assert_eq!(dns[2], "NodePort");
    let ports = &dns[5];
    assert!(
        ports.starts_with("53:30053/TCP,53:30053/UDP,9153:"),
        "{ports}"
    );
    let metrics_np: u16 = ports
        .trim_start_matches("53:30053/TCP,53:30053/UDP,9153:")
        .trim_end_matches("/TCP")
        .parse()
        .unwrap();
    assert!((30000..=32767).contains(&metrics_np));
    let db = row("db");
    assert!(db[3].starts_with("10.96.0."), "{db:?}");
    assert_eq!(db[6], "<none>");
    assert_eq!(
        ctl.ok(&["get", "pods", "-A"]),
        "NAMESPACE   NAME    LABELS    PORTS\nshop        web-0   app=web   http:8080/TCP\nshop        web-1   app=web   http:8080/TCP\n"
    );
    assert_eq!(
        ctl.ok(&["get", "ep", "db", "-n", "shop"]),
        "NAMESPACE   NAME   ENDPOINTS\nshop        db     192.168.1.20:5432,192.168.1.21:5432\n"
    );
    assert_eq!(
        ctl.ok(&["get", "namespaces"]),
        "NAME   LABELS\nshop   kubernetes.io/metadata.name=shop\n"
    );
    // The default namespace is empty.
    let o = ctl.run(&["get", "svc"]);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));
    assert_eq!(o.stderr, "No resources found in default namespace.\n");

    // JSON: one object, or a List.
    let one: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "service", "web", "-n", "shop", "-o", "json"]))
            .unwrap();
    assert_eq!(one["apiVersion"], "v1");
    assert_eq!(one["kind"], "Service");
    assert_eq!(one["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(one["spec"]["clusterIPs"], serde_json::json!(["10.96.0.10"]));
    assert!(one["metadata"]["resourceVersion"].is_string());
    let list: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "svc", "-A", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let yaml = ctl.ok(&["get", "po", "web-0", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.starts_with("apiVersion: v1\nkind: Pod\n"), "{yaml}");
    // The YAML output applies back unchanged (through stdin).
    let o = ctl.run_with(&["apply", "-f", "-"], &yaml);
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "pod/web-0 unchanged\n"),
        "{}",
        o.stderr
    );

    // Re-apply: all unchanged, allocations kept.
    let before = ctl.keys();
    let out = ctl.ok(&["apply", "-f", &manifest]);
    assert_eq!(out.matches(" unchanged\n").count(), 7, "{out}");
    assert_eq!(ctl.keys(), before);
    assert!(
        before.contains(&"allocations/clusterips/10.96.0.10".to_string()),
        "{before:?}"
    );
    assert!(
        before.contains(&"allocations/nodeports/30053".to_string()),
        "{before:?}"
    );
    assert!(
        before.contains(&format!("allocations/nodeports/{metrics_np}")),
        "{before:?}"
    );

    // Missing objects.
    let o = ctl.run(&["get", "svc", "nope", "-n", "shop"]);
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "flannelctl: Service shop/nope not found\n")
    );

    // Delete one, by name; again: an error unless --ignore-not-found.
    assert_eq!(
        ctl.ok(&["delete", "svc", "dns", "-n", "shop"]),
        "service/dns deleted\n"
    );
    assert!(
        !ctl.keys().iter().any(|k| k.contains("nodeports/")),
        "released"
    );
    let o = ctl.run(&["delete", "svc", "dns", "-n", "shop"]);
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "flannelctl: Service shop/dns not found\n")
    );
    let o = ctl.run(&["delete", "svc", "dns", "-n", "shop", "--ignore-not-found"]);
    assert_eq!((o.code, o.stdout.as_str(), o.stderr.as_str()), (0, "", ""));

    // Delete the rest from the manifest: objects first, the namespace last.
    let o = ctl.run(&["delete", "-f", &manifest, "--ignore-not-found"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        "endpoints/db deleted\nservice/db deleted\nservice/web deleted\npod/web-1 deleted\npod/web-0 deleted\nnamespace/shop deleted\n"
    );
    assert_eq!(ctl.keys(), Vec::<String>::new());
}

#[test]
fn invalid_documents_write_nothing() {
    let Some(ctl) = Ctl::start() else { return };

    // A type error: the document and field path.
    let bad = ctl.file("bad.yaml", &MANIFEST.replace("port: 80,", "port: x,"));
    let o = ctl.run(&["apply", "-f", &bad]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        format!("flannelctl: {bad}: document 4 (Service web): spec.ports[0].port: invalid type: string \"x\", expected i64\n")
    );
    assert_eq!(ctl.keys(), Vec::<String>::new());

    // A rule broken in the last document: nothing at all written, the field named.
    let bad = ctl.file(
        "bad2.yaml",
        &MANIFEST.replace("ports: [{port: 5432}]\n", "ports: [{port: 0}]\n"),
    );
    let o = ctl.run(&["apply", "-f", &bad]);
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert_eq!(o.stdout, "");
    assert!(o.stderr.starts_with(&format!("flannelctl: {bad}: Service shop/db is invalid: spec.ports[0].port: 0 must be between 1 and 65535")), "{}", o.stderr);
    assert!(
        o.stderr.contains(
            "Endpoints shop/db is invalid: subsets[0].ports[0].port: 0 must be between 1 and 65535"
        ),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr
            .ends_with("flannelctl: nothing applied: 2 of 7 objects are invalid\n"),
        "{}",
        o.stderr
    );
    assert_eq!(ctl.keys(), Vec::<String>::new());

    // An unknown protocol, from stdin.
    let o = ctl.run_with(
        &["apply", "-f", "-"],
        &MANIFEST.replace("protocol: UDP", "protocol: ICMP"),
    );
    assert_eq!(o.code, 1);
    assert!(o.stderr.starts_with("flannelctl: stdin: document 5 (Service dns): spec.ports[1].protocol: unknown variant `ICMP`"), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);

    // A namespace that does not exist (and is not created in the same apply).
    let no_ns = ctl.file("pod.json", r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c"}]}}"#);
    let o = ctl.run(&["apply", "-f", &no_ns, "-n", "nowhere"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        format!("flannelctl: {no_ns}: Pod nowhere/p: namespace \"nowhere\" not found (create the Namespace first) (nothing applied)\n")
    );
    // Two documents asking for the same ClusterIP.
    let twice = format!("{MANIFEST}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: shop}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n");
    let twice = ctl.file("twice.yaml", &twice);
    let o = ctl.run(&["apply", "-f", &twice]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("Service shop/web2: spec.clusterIP: 10.96.0.10 is also requested by"),
        "{}",
        o.stderr
    );
    assert_eq!(ctl.keys(), Vec::<String>::new());

    // -n given: objects without namespace go there; a dry run writes nothing.
    let o = ctl.run(&["apply", "-f", &no_ns, "-n", "kube-system", "--dry-run"]);
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "pod/p created (dry run)\n"),
        "{}",
        o.stderr
    );
    assert_eq!(ctl.keys(), Vec::<String>::new());
    assert_eq!(
        ctl.ok(&["apply", "-f", &no_ns, "-n", "kube-system"]),
        "pod/p created\n"
    );
    assert_eq!(ctl.keys(), ["pods/kube-system/p"]);

    // Flags on the command line win over the environment.
    let o = ctl.run(&["get", "po", "-A", "--etcd-prefix", "/elsewhere"]);
    assert_eq!((o.code, o.stderr.as_str()), (0, "No resources found\n"));
    let o = ctl.run(&["get", "po", "-A", "--etcd-endpoints", "http://127.0.0.1:1"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.starts_with("flannelctl: etcd list: "),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("is etcd running at http://127.0.0.1:1?"),
        "{}",
        o.stderr
    );
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
}

/// `config get|set` and `leases` on the same etcd.
#[test]
fn config_and_leases() {
    let Some(c) = Ctl::start() else {
        return;
    };
    assert!(c.ok(&["config", "get"]).contains("10.5.0.0/16"));
    // Invalid configs are refused with the reason and change nothing.
    let bad = c.file("bad.json", r#"{"Network":"10.5.0.0/40"}"#);
    let o = c.run(&["config", "set", "-f", &bad]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("invalid network config") && o.stderr.lines().count() == 1,
        "{}",
        o.stderr
    );
    assert!(c.ok(&["config", "get"]).contains("10.5.0.0/16"));
    // Leases: one held on an etcd lease, one reservation.
    let granted = c._etcd.etcdctl(&["lease", "grant", "600"]).unwrap();
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    c._etcd
        .etcdctl(&[
            "put",
            &format!("--lease={id}"),
            &format!("{}/subnets/10.5.1.0-24", c.prefix),
            r#"{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan"}"#,
        ])
        .unwrap();
    c._etcd
        .etcdctl(&[
            "put",
            &format!("{}/subnets/10.5.20.0-24", c.prefix),
            r#"{"PublicIP":"192.0.2.20","PublicIPv6":null}"#,
        ])
        .unwrap();
    let table = c.ok(&["leases"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("SUBNET") && lines[0].ends_with("EXPIRES"));
    assert!(
        lines[1].starts_with("10.5.1.0/24")
            && lines[1].contains("vxlan")
            && lines[1].contains(" in "),
        "{table}"
    );
    assert!(lines[2].ends_with("reservation"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&c.ok(&["leases", "-o", "json"])).unwrap();
    let ttl = json[0]["ttlSeconds"].as_i64().unwrap();
    assert!((500..=600).contains(&ttl), "{json}");
    // A new Network while leases exist needs --force; a backend change does not.
    let other = c.file("other.json", r#"{"Network":"10.6.0.0/16"}"#);
    let o = c.run(&["config", "set", "-f", &other]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert!(c.ok(&["config", "get"]).contains("10.5.0.0/16"));
    let udp = c.file(
        "udp.json",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#,
    );
    let o = c.run(&["config", "set", "-f", &udp]);
    assert!(o.code == 0 && o.stderr.is_empty(), "{}", o.stderr);
    // No Backend: written, with a warning (flannel would run udp on it, we vxlan).
    let no_backend = c.file("nb.json", r#"{"Network":"10.5.0.0/16"}"#);
    let o = c.run(&["config", "set", "-f", &no_backend]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.starts_with(
            "warning: net-conf.json: no Backend: running the default vxlan, but flannel runs udp"
        ),
        "{}",
        o.stderr
    );
    c.ok(&["config", "set", "-f", &udp]);
    assert!(c.ok(&["config", "get"]).contains("udp"));
    // --if-absent (an init container's write-once) leaves an existing config alone.
    assert!(c
        .ok(&["config", "set", "-f", &other, "--if-absent"])
        .contains("left as it is"));
    assert!(c.ok(&["config", "get"]).contains("udp"));
    // A stored config that does not parse (written straight into etcd): the leases' Network
    // is unknown, so a new one still needs --force.
    c._etcd
        .etcdctl(&["put", &format!("{}/config", c.prefix), "{not json"])
        .unwrap();
    let o = c.run(&["config", "set", "-f", &other]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("does not parse") && o.stderr.contains("--force"),
        "{}",
        o.stderr
    );
    assert_eq!(c.ok(&["config", "get"]).trim(), "{not json");
    c.ok(&["config", "set", "-f", &other, "--force"]);
    assert!(c.ok(&["config", "get"]).contains("10.6.0.0/16"));
    // Revoke: a node's lease goes (key and etcd lease); a reservation and unknown subnets
    // are refused with the reason.
    let o = c.run(&["leases", "revoke", "10.5.20.0/24"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("reservation"), "{}", o.stderr);
    let o = c.run(&["leases", "revoke", "10.5.99.0/24"]);
    assert!(
        o.code == 1 && o.stderr.contains("no lease for"),
        "{}",
        o.stderr
    );
    let o = c.run(&["leases", "revoke", "10.5.1"]);
    assert!(
        o.code == 1 && o.stderr.contains("not a subnet"),
        "{}",
        o.stderr
    );
    assert!(c
        .ok(&["leases", "revoke", "10.5.1.0-24"])
        .contains("lease 10.5.1.0/24 of 192.0.2.1 revoked"));
    let table = c.ok(&["leases"]);
    assert!(
        table.lines().count() == 2 && !table.contains("10.5.1.0"),
        "{table}"
    );
    let ttl = c._etcd.etcdctl(&["lease", "timetolive", &id]).unwrap();
    assert!(ttl.contains("already expired"), "{ttl}");
}

/// A file of more documents than serde-saphyr's default budget (1,024) applies; the YAML
/// limits are in registry/src/parse.rs (hostile inputs are tested there).
#[test]
fn apply_a_file_of_more_than_1024_documents() {
    let Some(c) = Ctl::start() else {
        return;
    };
    const N: usize = 1_100;
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: load\n");
    for i in 0..N {
        text += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: load\nspec:\n  clusterIP: None\n  selector: {{app: a{i}}}\n  ports:\n  - name: service-port-tcp-80\n    port: 80\n"
        );
    }
    let file = c.file("many.yaml", &text);
    let out = c.ok(&["apply", "-f", &file, "--dry-run"]);
    assert_eq!(out.lines().count(), N + 1, "{out}");
    let out = c.ok(&["apply", "-f", &file]);
    assert!(
        out.ends_with(&format!("service/svc-{} created\n", N - 1)),
        "{out}"
    );
    let table = c.ok(&["get", "svc", "-n", "load"]);
    assert_eq!(
        table.lines().count(),
        N + 1,
        "header + one line per Service"
    );
}

#[test]
fn secrets_are_applied_but_their_values_not_printed_unless_asked() {
    let Some(ctl) = Ctl::start() else { return };
    let manifest = ctl.file(
        "tls.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls, namespace: shop}\ntype: kubernetes.io/tls\nstringData: {tls.crt: the-cert, tls.key: the-private-key}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop, namespace: shop}\nspec:\n  tls: [{hosts: [shop.example.com], secretName: shop-tls}]\n  rules:\n  - host: shop.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}\n",
    );
    assert_eq!(
        ctl.ok(&["apply", "-f", &manifest]),
        "namespace/shop created\nsecret/shop-tls created\ningress/shop created\n"
    );
    let table = ctl.ok(&["get", "secrets", "-n", "shop"]);
    assert!(table.contains("kubernetes.io/tls"), "{table}");
    let hidden = ctl.run(&["get", "secret", "shop-tls", "-n", "shop", "-o", "yaml"]);
    assert_eq!(hidden.code, 0, "{}", hidden.stderr);
    // base64 of "the-private-key"
    let b64 = "dGhlLXByaXZhdGUta2V5";
    assert!(
        !hidden.stdout.contains(b64) && !hidden.stdout.contains("the-private-key"),
        "{}",
        hidden.stdout
    );
    assert!(
        hidden.stderr.contains("tls.key (15 bytes)"),
        "{}",
        hidden.stderr
    );
    let shown = ctl.ok(&[
        "get",
        "secret",
        "shop-tls",
        "-n",
        "shop",
        "-o",
        "json",
        "--show-secret-data",
    ]);
    assert!(shown.contains(b64), "{shown}");
    let ing = ctl.ok(&["get", "ing", "-n", "shop"]);
    assert!(
        ing.contains("shop.example.com") && ing.contains("80, 443"),
        "{ing}"
    );
    assert_eq!(
        ctl.ok(&["delete", "secret", "shop-tls", "-n", "shop"]),
        "secret/shop-tls deleted\n"
    );
}
