//! The registry store against a real etcd (Debian etcd-server) on a free loopback port, at a
//! unique prefix. Skips with a printed reason when etcd is not installed, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::GetOptions;
use ipnet::Ipv4Net;
use registry::store::{allocations_prefix, cluster_ip_key, node_port_key, NAMESPACE_NAME_LABEL};
use registry::{
    object_key, parse_documents, registry_prefix, Kind, Object, Outcome, Service, Store, StoreError,
};
use subnet_lease::{Connection, EtcdOptions};
use test_support::{random_tag, Etcd};

struct Env {
    _etcd: Etcd,
    store: Store,
    reg: Connection,
}

impl Env {
    /// A fresh etcd and store at a unique prefix with `net_conf` (None: no config), or None to
    /// skip.
    async fn start(net_conf: Option<&str>) -> Option<Env> {
        let etcd = Etcd::start()?;
        let opts = EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            prefix: format!("/test-{}/network", random_tag(6)),
            // Generous: a loaded test machine can make etcd's fsync slow.
            timeout: Duration::from_secs(30),
            ..EtcdOptions::default()
        };
        let store = Store::connect(&opts).await.unwrap();
        let reg = store.connection().clone();
        if let Some(text) = net_conf {
            reg.client()
                .put(subnet_lease::store::config_key(reg.prefix()), text, None)
                .await
                .unwrap();
        }
        Some(Env {
            _etcd: etcd,
            store,
            reg,
        })
    }

    fn prefix(&self) -> String {
        self.reg.prefix().to_string()
    }

    async fn apply(&self, yaml: &str) -> Result<registry::Applied, StoreError> {
        let obj = parse_documents(yaml).unwrap().remove(0);
        self.store.apply(obj, None).await
    }

    async fn raw(&self, key: &str) -> Option<String> {
        let resp = self.reg.client().get(key, None).await.unwrap();
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Every allocation key (relative to the allocations prefix) → holder.
    async fn allocations(&self) -> Vec<(String, String)> {
        let p = allocations_prefix(&self.prefix());
        let resp = self
            .reg
            .client()
            .get(p.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key())
                        .trim_start_matches(&p)
                        .to_string(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }
}

fn service(obj: &Object) -> &Service {
    match obj {
        Object::Service(s) => s,
        other => panic!("not a Service: {other:?}"),
    }
}

fn svc_yaml(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{port: 80}}]\n{extra_spec}"
    )
}

const NET_CONF: &str = r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/24"}"#;

#[tokio::test]
async fn apply_get_list_delete() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let s = &env.store;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}\n";

    // A namespace must exist first.
    let e = env.apply(pod).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Pod shop/web-0: namespace \"shop\" not found (create the Namespace first)"
    );
    assert!(env
        .raw(&object_key(&env.prefix(), Kind::Pod, Some("shop"), "web-0"))
        .await
        .is_none());

    let ns = env
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        .await
        .unwrap();
    assert_eq!(ns.outcome, Outcome::Created);
    assert_eq!(ns.object.metadata().labels[NAMESPACE_NAME_LABEL], "shop");
    assert!(ns.object.metadata().resource_version.is_some());

    let applied = env.apply(pod).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Created);
    // Stored as the manifest form, no resourceVersion.
    let key = object_key(&env.prefix(), Kind::Pod, Some("shop"), "web-0");
    let raw: serde_json::Value = serde_json::from_str(&env.raw(&key).await.unwrap()).unwrap();
    assert_eq!(raw["apiVersion"], "v1");
    assert_eq!(raw["kind"], "Pod");
    assert_eq!(raw["metadata"]["namespace"], "shop");
    assert!(raw["metadata"].get("resourceVersion").is_none());

    // default and kube-system always exist; a missing namespace is filled with default.
    let p2 = pod.replace("namespace: shop, ", "");
    let a = env.apply(&p2).await.unwrap();
    assert_eq!(a.object.metadata().namespace.as_deref(), Some("default"));
    let a = s
        .apply(parse_documents(&p2).unwrap().remove(0), Some("kube-system"))
        .await
        .unwrap();
    assert_eq!(
        a.object.metadata().namespace.as_deref(),
        Some("kube-system")
    );

    // get / list
    let got = s
        .get(Kind::Pod, Some("shop"), "web-0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, applied.object);
    assert!(s
        .get(Kind::Pod, Some("shop"), "nope")
        .await
        .unwrap()
        .is_none());
    assert!(
        s.get(Kind::Pod, None, "web-0").await.unwrap().is_some(),
        "default"
    );
    let names = |objs: Vec<Object>| {
        objs.iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o.metadata().namespace.clone().unwrap_or_default(),
                    o.metadata().name
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.list(Kind::Pod, Some("shop")).await.unwrap()),
        ["shop/web-0"]
    );
    assert_eq!(
        names(s.list(Kind::Pod, None).await.unwrap()),
        ["default/web-0", "kube-system/web-0", "shop/web-0"]
    );
    assert_eq!(
        names(s.list(Kind::Namespace, None).await.unwrap()),
        ["/shop"]
    );
    assert!(s.list(Kind::Service, None).await.unwrap().is_empty());

    // Re-apply: unchanged, nothing written; a change: configured.
    let again = env.apply(pod).await.unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(again.object, applied.object, "same resourceVersion");
    let changed = env
        .apply(&pod.replace("app: web}", "app: web2}"))
        .await
        .unwrap();
    assert_eq!(changed.outcome, Outcome::Configured);
    assert_ne!(
        changed.object.metadata().resource_version,
        applied.object.metadata().resource_version
    );
    assert_eq!(
        env.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
            .await
            .unwrap()
            .outcome,
        Outcome::Unchanged
    );

    // Invalid: nothing written, the message names the field.
    let e = env
        .apply(&pod.replace("containerPort: 8080", "containerPort: 0"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Pod shop/web-0 is invalid: spec.containers[0].ports[0].containerPort: 0 must be between 1 and 65535"
    );
    assert_eq!(
        s.get(Kind::Pod, Some("shop"), "web-0")
            .await
            .unwrap()
            .unwrap(),
        changed.object
    );

    // Endpoints
    let ep = env
        .apply("apiVersion: v1\nkind: Endpoints\nmetadata: {name: db, namespace: shop}\nsubsets: [{addresses: [{ip: 192.168.1.5}], ports: [{port: 5432}]}]\n")
        .await
        .unwrap();
    assert_eq!(ep.outcome, Outcome::Created);

    // delete
    let gone = s.delete(Kind::Pod, Some("shop"), "web-0").await.unwrap();
    assert_eq!(gone.metadata().name, "web-0");
    assert!(s
        .get(Kind::Pod, Some("shop"), "web-0")
        .await
        .unwrap()
        .is_none());
    let e = s
        .delete(Kind::Pod, Some("shop"), "web-0")
        .await
        .unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(e.to_string(), "Pod shop/web-0 not found");
    let e = s
        .delete(Kind::Namespace, None, "default")
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Namespace default: may not be deleted");
    let e = s.get(Kind::Pod, Some("shop"), "a/b").await.unwrap_err();
    assert!(matches!(e, StoreError::BadName { .. }), "{e}");
}

#[tokio::test]
async fn cluster_ips_and_node_ports() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let s = &env.store;
    let p = env.prefix();
    let net: Ipv4Net = "10.96.0.0/24".parse().unwrap();

    let web = env.apply(&svc_yaml("web", "")).await.unwrap();
    assert_eq!(web.outcome, Outcome::Created);
    let ip_text = service(&web.object).spec.cluster_ip.clone().unwrap();
    let ip: Ipv4Addr = ip_text.parse().unwrap();
    assert!(
        net.contains(&ip) && ip != net.network() && ip != net.broadcast(),
        "{ip}"
    );
    assert_eq!(
        env.raw(&cluster_ip_key(&p, ip)).await.as_deref(),
        Some("default/web")
    );

    // Re-applied without clusterIP: kept, unchanged.
    let again = env.apply(&svc_yaml("web", "")).await.unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(
        service(&again.object).spec.cluster_ip.as_deref(),
        Some(ip_text.as_str())
    );
    // With the same one: unchanged too; another: immutable.
    let same = env
        .apply(&svc_yaml("web", &format!("  clusterIP: {ip}\n")))
        .await
        .unwrap();
    assert_eq!(same.outcome, Outcome::Unchanged);
    let other_ip = if ip.octets()[3] == 10 {
        "10.96.0.11"
    } else {
        "10.96.0.10"
    };
    let e = env
        .apply(&svc_yaml("web", &format!("  clusterIP: {other_ip}\n")))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Service default/web is invalid: spec.clusterIP: field is immutable (it is {ip})")
    );

    // Another Service asking for web's address.
    let e = env
        .apply(&svc_yaml("other", &format!("  clusterIP: {ip}\n")))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Service default/other is invalid: spec.clusterIP: {ip} is already allocated to default/web")
    );
    assert!(s.get(Kind::Service, None, "other").await.unwrap().is_none());
    // Outside the network.
    let e = env
        .apply(&svc_yaml("other", "  clusterIP: 10.97.0.1\n"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("spec.clusterIP: 10.97.0.1 is not within the service network 10.96.0.0/24"),
        "{e}"
    );

    // NodePorts: allocated, kept, TCP+UDP share, collisions refused.
    let np_yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  type: NodePort\n  selector: {app: dns}\n  ports:\n  - {name: dns-tcp, port: 53}\n  - {name: dns-udp, port: 53, protocol: UDP}\n  - {name: web, port: 80, nodePort: 30080}\n";
    let dns = env.apply(np_yaml).await.unwrap();
    let ports = &service(&dns.object).spec.ports;
    let np = ports[0].node_port.unwrap();
    assert_eq!(ports[1].node_port, Some(np));
    assert_eq!(ports[2].node_port, Some(30080));
    assert_eq!(
        env.raw(&node_port_key(&p, np as u16)).await.as_deref(),
        Some("default/dns")
    );
    assert_eq!(
        env.raw(&node_port_key(&p, 30080)).await.as_deref(),
        Some("default/dns")
    );
    assert_eq!(
        env.apply(np_yaml).await.unwrap().outcome,
        Outcome::Unchanged
    );

    let taken = "apiVersion: v1\nkind: Service\nmetadata: {name: np2}\nspec:\n  type: NodePort\n  ports: [{port: 8080, nodePort: 30080}]\n";
    let e = env.apply(taken).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/np2 is invalid: spec.ports[0].nodePort: 30080 is already allocated to default/dns"
    );
    assert!(s.get(Kind::Service, None, "np2").await.unwrap().is_none());

    // NodePort -> ClusterIP: its node ports are released, its address kept.
    let dns_ip = service(&dns.object).spec.cluster_ip.clone().unwrap();
    let to_cip = np_yaml
        .replace("  type: NodePort\n", "")
        .replace(", nodePort: 30080", "");
    let c = env.apply(&to_cip).await.unwrap();
    assert_eq!(c.outcome, Outcome::Configured);
    assert!(service(&c.object)
        .spec
        .ports
        .iter()
        .all(|p| p.node_port.is_none()));
    assert_eq!(
        service(&c.object).spec.cluster_ip.as_deref(),
        Some(dns_ip.as_str())
    );
    assert!(env.raw(&node_port_key(&p, 30080)).await.is_none());
    assert!(env.raw(&node_port_key(&p, np as u16)).await.is_none());
    // So np2 can have it now.
    assert_eq!(env.apply(taken).await.unwrap().outcome, Outcome::Created);

    // Headless and ExternalName hold nothing.
    env.apply("apiVersion: v1\nkind: Service\nmetadata: {name: hl}\nspec: {clusterIP: None, selector: {a: b}}\n").await.unwrap();
    env.apply("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n").await.unwrap();
    let mut holders: Vec<String> = env
        .allocations()
        .await
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    holders.sort();
    assert_eq!(
        holders,
        ["default/dns", "default/np2", "default/np2", "default/web"]
    );

    // Deleting releases in the same txn.
    s.delete(Kind::Service, None, "web").await.unwrap();
    assert!(env.raw(&cluster_ip_key(&p, ip)).await.is_none());
    s.delete(Kind::Service, None, "np2").await.unwrap();
    let left: Vec<(String, String)> = env.allocations().await;
    assert_eq!(
        left,
        [(format!("clusterips/{dns_ip}"), "default/dns".to_string())]
    );

    // web's address is free again: another Service may ask for it.
    let other = env
        .apply(&svc_yaml("other", &format!("  clusterIP: {ip}\n")))
        .await
        .unwrap();
    assert_eq!(other.outcome, Outcome::Created);
}

#[tokio::test]
async fn service_network_from_config() {
    let Some(env) = Env::start(None).await else {
        return;
    };
    // No config: the default 10.96.0.0/12.
    let a = env.apply(&svc_yaml("a", "")).await.unwrap();
    let ip: Ipv4Addr = service(&a.object).cluster_ip_addr().unwrap();
    assert!("10.96.0.0/12".parse::<Ipv4Net>().unwrap().contains(&ip));

    // A config whose default ServiceNetwork overlaps Network: a clear error, nothing written.
    env.reg
        .client()
        .put(
            subnet_lease::store::config_key(env.reg.prefix()),
            r#"{"Network":"10.0.0.0/8"}"#,
            None,
        )
        .await
        .unwrap();
    let e = env.apply(&svc_yaml("b", "")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("network config {}: ServiceNetwork 10.96.0.0/12 (the default) overlaps Network 10.0.0.0/8: set ServiceNetwork to a range outside it", subnet_lease::store::config_key(env.reg.prefix()))
    );
    // A broken config: named.
    env.reg
        .client()
        .put(
            subnet_lease::store::config_key(env.reg.prefix()),
            r#"{"Network":"10.5.0.0/16","ServiceNetwork":"x"}"#,
            None,
        )
        .await
        .unwrap();
    let e = env.apply(&svc_yaml("b", "")).await.unwrap_err();
    assert!(
        e.to_string()
            .ends_with("ServiceNetwork: \"x\" is not an IPv4 CIDR"),
        "{e}"
    );
    // Other kinds do not need it.
    env.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
        .await
        .unwrap();
    assert!(env
        .store
        .get(Kind::Service, None, "b")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn concurrent_applies_get_distinct_cluster_ips_until_exhausted() {
    let Some(env) = Env::start(Some(
        r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/27"}"#,
    ))
    .await
    else {
        return;
    };
    // 20 Services at once into 30 addresses.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = env.store.clone();
        let obj = parse_documents(&svc_yaml(&format!("s{i}"), ""))
            .unwrap()
            .remove(0);
        tasks.push(tokio::spawn(async move { store.apply(obj, None).await }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        assert_eq!(a.outcome, Outcome::Created);
        ips.insert(service(&a.object).spec.cluster_ip.clone().unwrap());
    }
    assert_eq!(ips.len(), 20, "distinct: {ips:?}");
    assert_eq!(env.allocations().await.len(), 20);

    // 11 more at once: 10 fit, one finds the network full.
    let mut tasks = Vec::new();
    for i in 20..31 {
        let store = env.store.clone();
        let obj = parse_documents(&svc_yaml(&format!("s{i}"), ""))
            .unwrap()
            .remove(0);
        tasks.push(tokio::spawn(async move { store.apply(obj, None).await }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => {
                ips.insert(service(&a.object).spec.cluster_ip.clone().unwrap());
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert_eq!(ips.len(), 30);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].ends_with(": spec.clusterIP: no free address left in the service network 10.96.0.0/27 (30 allocated)"),
        "{errors:?}"
    );
    let all: BTreeSet<String> = env
        .allocations()
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(all.len(), 30);
    let listed = env.store.list(Kind::Service, None).await.unwrap();
    assert_eq!(listed.len(), 30);
    let listed_ips: BTreeSet<String> = listed
        .iter()
        .map(|o| service(o).spec.cluster_ip.clone().unwrap())
        .collect();
    assert_eq!(listed_ips, ips);
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_objects_in_batches() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let s = &env.store;
    for ns in ["big", "keep"] {
        env.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ))
        .await
        .unwrap();
    }
    // 150 pods, 20 NodePort Services and an Endpoints in "big": well past 128 ops.
    let mut docs = String::new();
    for i in 0..150 {
        docs += &format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec: {{containers: [{{name: c}}]}}\n");
    }
    for i in 0..20 {
        docs += &format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: NodePort, ports: [{{port: 80}}]}}\n");
    }
    docs += "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: s0}\nsubsets: []\n";
    for obj in parse_documents(&docs).unwrap() {
        s.apply(obj, Some("big")).await.unwrap();
    }
    env.apply(&svc_yaml("kept", "").replace("{name: kept}", "{name: kept, namespace: keep}"))
        .await
        .unwrap();
    assert_eq!(env.allocations().await.len(), 41);

    let gone = s.delete(Kind::Namespace, None, "big").await.unwrap();
    assert_eq!(gone.metadata().name, "big");
    for kind in [Kind::Pod, Kind::Service, Kind::Endpoints] {
        assert!(
            s.list(kind, Some("big")).await.unwrap().is_empty(),
            "{kind}"
        );
    }
    assert!(s.get(Kind::Namespace, None, "big").await.unwrap().is_none());
    let left: Vec<String> = env
        .allocations()
        .await
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    assert_eq!(left, ["keep/kept"]);
    assert!(s
        .get(Kind::Service, Some("keep"), "kept")
        .await
        .unwrap()
        .is_some());
    // The namespace is gone: nothing can be created in it any more.
    let e = s
        .apply(
            parse_documents(&svc_yaml("late", "")).unwrap().remove(0),
            Some("big"),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NamespaceNotFound { .. }), "{e}");
    assert!(s
        .delete(Kind::Namespace, None, "big")
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn list_all_and_dry_run() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let s = &env.store;
    env.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
        .await
        .unwrap();
    env.apply(&svc_yaml("web", "  type: NodePort\n"))
        .await
        .unwrap();
    let (objs, rev) = s.list_all().await.unwrap();
    assert_eq!(objs.len(), 2, "allocation keys are not objects: {objs:?}");
    assert!(rev > 0);
    // What a watcher sees decodes with the pure functions.
    let resp = env
        .reg
        .client()
        .get(
            registry_prefix(&env.prefix()),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut decoded = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if registry::parse_key(&env.prefix(), &key).is_some() {
            decoded.push(
                registry::decode(&env.prefix(), &key, kv.value(), kv.mod_revision()).unwrap(),
            );
        }
    }
    assert_eq!(decoded, objs);

    // A dry run checks everything and writes nothing.
    let pod = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: new}\nspec: {containers: [{name: c}]}\n").unwrap().remove(0);
    assert!(matches!(
        s.dry_run(pod.clone(), None, &BTreeSet::new()).await,
        Err(StoreError::NamespaceNotFound { .. })
    ));
    let pending: BTreeSet<String> = ["new".to_string()].into();
    assert_eq!(
        s.dry_run(pod, None, &pending).await.unwrap().outcome,
        Outcome::Created
    );
    let d = s
        .dry_run(
            parse_documents(&svc_yaml("web2", "")).unwrap().remove(0),
            None,
            &pending,
        )
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Created);
    assert!(service(&d.object).spec.cluster_ip.is_some());
    let d = s
        .dry_run(
            parse_documents(&svc_yaml("web", "  type: NodePort\n"))
                .unwrap()
                .remove(0),
            None,
            &pending,
        )
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Unchanged);
    assert_eq!(s.list_all().await.unwrap().0, objs);
    assert_eq!(env.allocations().await.len(), 2);
}

#[tokio::test]
async fn applying_many_services_reads_the_allocations_once_and_stale_snapshots_retry() {
    let Some(env) = Env::start(Some(
        r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/28"}"#,
    ))
    .await
    else {
        return;
    };
    // One client applying one Service after another: one read of every allocation key in
    // all (before: one per Service, N² keys read for N Services).
    for i in 0..6 {
        env.apply(&svc_yaml(&format!("a{i}"), "")).await.unwrap();
    }
    assert_eq!(env.store.allocation_reads(), 1);
    // flannelctl checks every object with a dry run first: that keeps the snapshot too, and
    // allocates nothing.
    let dry = env
        .store
        .dry_run(
            parse_documents(&svc_yaml("d0", "")).unwrap().remove(0),
            None,
            &BTreeSet::new(),
        )
        .await
        .unwrap();
    assert!(service(&dry.object).spec.cluster_ip.is_some());
    assert_eq!(env.store.allocation_reads(), 1);
    assert_eq!(env.allocations().await.len(), 6);
    // Another client takes addresses behind the first one's snapshot.
    let other = Store::new(env.reg.clone());
    for i in 0..6 {
        other
            .apply(
                parse_documents(&svc_yaml(&format!("b{i}"), ""))
                    .unwrap()
                    .remove(0),
                None,
            )
            .await
            .unwrap();
    }
    // The first client's snapshot lacks them: a taken address fails the txn and it reads
    // again; a network its snapshot calls full is read again before saying so.
    let mut ips = BTreeSet::new();
    for i in 6..8 {
        let a = env.apply(&svc_yaml(&format!("a{i}"), "")).await.unwrap();
        ips.insert(service(&a.object).spec.cluster_ip.clone().unwrap());
    }
    // 14 addresses in a /28: 14 Services fit, the 15th finds it full.
    let err = env
        .apply(&svc_yaml("a8", ""))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no free address left"), "{err}");
    // A Service deleted by the other client frees an address the first one's snapshot still
    // counts: it is found.
    other
        .delete(Kind::Service, Some("default"), "b0")
        .await
        .unwrap();
    env.apply(&svc_yaml("a8", "")).await.unwrap();
    let all: Vec<String> = env
        .allocations()
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 14);
    assert_eq!(distinct.len(), 14);
    let listed: BTreeSet<String> = env
        .store
        .list(Kind::Service, None)
        .await
        .unwrap()
        .iter()
        .map(|o| service(o).spec.cluster_ip.clone().unwrap())
        .collect();
    assert_eq!(listed.len(), 14, "every Service has its own address");
}

const DUAL_CONF: &str = r#"{"Network":"10.5.0.0/16","ServiceNetwork":"10.96.0.0/24","EnableIPv6":true,"IPv6Network":"fd10::/48","IPv6ServiceNetwork":"fd00:10:96::/120"}"#;

#[tokio::test]
async fn dual_stack_cluster_ips_round_trip() {
    let Some(env) = Env::start(Some(DUAL_CONF)).await else {
        return;
    };
    let s = &env.store;
    let p = env.prefix();
    let v6net: ipnet::Ipv6Net = "fd00:10:96::/120".parse().unwrap();
    assert_eq!(
        s.service_networks().await.unwrap(),
        registry::ServiceNetworks {
            v4: Some("10.96.0.0/24".parse().unwrap()),
            v6: Some(v6net),
        }
    );

    // PreferDualStack on a dual-stack cluster: one address per family, both allocation keys.
    let web = env
        .apply(&svc_yaml("web", "  ipFamilyPolicy: PreferDualStack\n"))
        .await
        .unwrap();
    assert_eq!(web.outcome, Outcome::Created);
    let w = service(&web.object).clone();
    let v4 = w.cluster_ip_addr().unwrap();
    let v6 = w.cluster_ipv6_addr().unwrap();
    assert!(v6net.contains(&v6) && v6 != v6net.network(), "{v6}");
    assert_eq!(w.spec.cluster_ips, vec![v4.to_string(), v6.to_string()]);
    assert_eq!(
        env.raw(&cluster_ip_key(&p, v6)).await.as_deref(),
        Some("default/web")
    );
    assert_eq!(
        env.raw(&cluster_ip_key(&p, v4)).await.as_deref(),
        Some("default/web")
    );
    // Stored as the API server stores it.
    let key = object_key(&p, Kind::Service, Some("default"), "web");
    let raw: serde_json::Value = serde_json::from_str(&env.raw(&key).await.unwrap()).unwrap();
    assert_eq!(raw["spec"]["clusterIP"], v4.to_string());
    assert_eq!(
        raw["spec"]["clusterIPs"],
        serde_json::json!([v4.to_string(), v6.to_string()])
    );
    assert_eq!(
        raw["spec"]["ipFamilies"],
        serde_json::json!(["IPv4", "IPv6"])
    );
    assert_eq!(raw["spec"]["ipFamilyPolicy"], "PreferDualStack");
    // Read back equal; re-applied: unchanged.
    let got = s.get(Kind::Service, None, "web").await.unwrap().unwrap();
    assert_eq!(service(&got).spec, w.spec);
    assert_eq!(
        env.apply(&svc_yaml("web", "  ipFamilyPolicy: PreferDualStack\n"))
            .await
            .unwrap()
            .outcome,
        Outcome::Unchanged
    );

    // Another Service asking for web's IPv6 address.
    let e = env
        .apply(&svc_yaml(
            "other",
            &format!("  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIP: '{v6}'\n"),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Service default/other is invalid: spec.clusterIP: {v6} is already allocated to default/web")
    );

    // Downgrade releases the IPv6 key in the same txn; upgrade takes a new one.
    let down = env
        .apply(&svc_yaml("web", "  ipFamilyPolicy: SingleStack\n"))
        .await
        .unwrap();
    assert_eq!(down.outcome, Outcome::Configured);
    assert_eq!(service(&down.object).spec.cluster_ips, vec![v4.to_string()]);
    assert!(env.raw(&cluster_ip_key(&p, v6)).await.is_none());
    let up = env
        .apply(&svc_yaml("web", "  ipFamilyPolicy: RequireDualStack\n"))
        .await
        .unwrap();
    let v6b = service(&up.object).cluster_ipv6_addr().unwrap();
    assert_eq!(service(&up.object).cluster_ip_addr(), Some(v4));
    assert_eq!(
        env.raw(&cluster_ip_key(&p, v6b)).await.as_deref(),
        Some("default/web")
    );

    // IPv6 primary; a family-less Service gets IPv4 (the primary family).
    let six = env
        .apply(&svc_yaml("six", "  ipFamilies: [IPv6]\n"))
        .await
        .unwrap();
    assert_eq!(service(&six.object).cluster_ip_addr(), None);
    assert!(service(&six.object).cluster_ipv6_addr().is_some());
    let plain = env.apply(&svc_yaml("plain", "")).await.unwrap();
    assert_eq!(service(&plain.object).spec.cluster_ips.len(), 1);
    assert!(service(&plain.object).cluster_ip_addr().is_some());

    // Deleting releases both families.
    s.delete(Kind::Service, None, "web").await.unwrap();
    assert!(env.raw(&cluster_ip_key(&p, v4)).await.is_none());
    assert!(env.raw(&cluster_ip_key(&p, v6b)).await.is_none());
    let mut holders: Vec<String> = env
        .allocations()
        .await
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    holders.sort();
    assert_eq!(holders, ["default/plain", "default/six"]);

    // The cluster loses IPv6: RequireDualStack is refused, IPv6 Services stay readable.
    env.reg
        .client()
        .put(
            subnet_lease::store::config_key(env.reg.prefix()),
            NET_CONF,
            None,
        )
        .await
        .unwrap();
    let e = env
        .apply(&svc_yaml("req", "  ipFamilyPolicy: RequireDualStack\n"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/req is invalid: spec.ipFamilyPolicy: RequireDualStack: this cluster is not configured for dual-stack services"
    );
    assert!(s.get(Kind::Service, None, "six").await.unwrap().is_some());
}

#[tokio::test]
async fn ipv4_only_services_are_stored_byte_for_byte_as_before() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let a = env
        .apply(&svc_yaml("web", "  clusterIP: 10.96.0.10\n"))
        .await
        .unwrap();
    assert_eq!(a.outcome, Outcome::Created);
    let key = object_key(&env.prefix(), Kind::Service, Some("default"), "web");
    assert_eq!(
        env.raw(&key).await.unwrap(),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default"},"spec":{"type":"ClusterIP","selector":{"app":"web"},"ports":[{"protocol":"TCP","port":80}],"clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10"],"sessionAffinity":"None"}}"#
    );
    // Family fields on an IPv4-only cluster: stored (the API server's defaults), IPv6 refused.
    let b = env
        .apply(&svc_yaml("b", "  ipFamilyPolicy: PreferDualStack\n"))
        .await
        .unwrap();
    assert_eq!(
        service(&b.object).spec.ip_families,
        vec![registry::IpFamily::Ipv4]
    );
    let e = env
        .apply(&svc_yaml("c", "  ipFamilies: [IPv6]\n"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/c is invalid: spec.ipFamilies[0]: IPv6 is not configured on this cluster (set EnableIPv6 in the network config for an IPv6ServiceNetwork)"
    );
}

#[tokio::test]
async fn ipv6_service_network_overlap_is_refused() {
    let Some(env) = Env::start(Some(
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/16"}"#,
    ))
    .await
    else {
        return;
    };
    let e = env.apply(&svc_yaml("a", "")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("network config {}: IPv6ServiceNetwork fd00:10:96::/112 (the default) overlaps IPv6Network fd00::/16: set IPv6ServiceNetwork to a range outside it", subnet_lease::store::config_key(env.reg.prefix()))
    );
}

#[tokio::test]
async fn ingress_class_ingress_and_secret() {
    let Some(env) = Env::start(Some(NET_CONF)).await else {
        return;
    };
    let s = &env.store;
    env.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        .await
        .unwrap();

    // IngressClass: cluster-scoped (no namespace in its key), controller immutable.
    let class = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: flannel, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\nspec: {controller: flannel.io/ingress}\n";
    assert_eq!(env.apply(class).await.unwrap().outcome, Outcome::Created);
    assert!(env
        .raw(&object_key(
            &env.prefix(),
            Kind::IngressClass,
            None,
            "flannel"
        ))
        .await
        .is_some());
    let Some(Object::IngressClass(c)) = s.get(Kind::IngressClass, None, "flannel").await.unwrap()
    else {
        panic!("no class")
    };
    assert!(c.is_default());
    let e = env
        .apply(&class.replace("flannel.io/ingress", "example.com/other"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "IngressClass flannel is invalid: spec.controller: field is immutable"
    );

    // Secret: stringData merged into data (base64 in etcd), type defaulted; values round-trip.
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls, namespace: shop}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y2VydA==}\nstringData: {tls.key: private}\n";
    env.apply(secret).await.unwrap();
    let raw = env
        .raw(&object_key(
            &env.prefix(),
            Kind::Secret,
            Some("shop"),
            "shop-tls",
        ))
        .await
        .unwrap();
    assert!(
        raw.contains(r#""tls.key":"cHJpdmF0ZQ==""#)
            && !raw.contains("stringData")
            && !raw.contains("private"),
        "{raw}"
    );
    let Some(Object::Secret(got)) = s.get(Kind::Secret, Some("shop"), "shop-tls").await.unwrap()
    else {
        panic!("no secret")
    };
    assert_eq!(got.value("tls.key"), Some(&b"private"[..]));
    assert_eq!(got.value("tls.crt"), Some(&b"cert"[..]));
    let opaque =
        "apiVersion: v1\nkind: Secret\nmetadata: {name: o, namespace: shop}\nstringData: {a: b}\n";
    let applied = env.apply(opaque).await.unwrap();
    let Object::Secret(o) = &applied.object else {
        panic!()
    };
    assert_eq!(o.type_.as_deref(), Some("Opaque"));
    // Applying the same manifest again changes nothing (stringData is compared merged).
    assert_eq!(env.apply(opaque).await.unwrap().outcome, Outcome::Unchanged);
    // The type is immutable; a TLS Secret without its key is refused and nothing is written.
    let e = env
        .apply(&secret.replace("kubernetes.io/tls", "Opaque"))
        .await
        .unwrap_err();
    assert!(e.to_string().ends_with("type: field is immutable"), "{e}");
    let e = env
        .apply("apiVersion: v1\nkind: Secret\nmetadata: {name: half, namespace: shop}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y2VydA==}\n")
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Secret shop/half is invalid: data[tls.key]: required for type kubernetes.io/tls"
    );

    // Ingress: validated, stored, listed; its Service need not exist yet (as the API server).
    let ing = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop, namespace: shop}\nspec:\n  ingressClassName: flannel\n  tls: [{hosts: [shop.example.com], secretName: shop-tls}]\n  rules:\n  - host: shop.example.com\n    http: {paths: [{path: /api, pathType: Prefix, backend: {service: {name: api, port: {number: 80}}}}]}\n";
    assert_eq!(env.apply(ing).await.unwrap().outcome, Outcome::Created);
    let listed = s.list(Kind::Ingress, Some("shop")).await.unwrap();
    assert_eq!(listed.len(), 1);
    let e = env
        .apply(&ing.replace("path: /api", "path: api"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ingress shop/shop is invalid: spec.rules[0].http.paths[0].path: \"api\" must be an absolute path"
    );
    s.delete(Kind::Ingress, Some("shop"), "shop").await.unwrap();
    assert!(s
        .list(Kind::Ingress, Some("shop"))
        .await
        .unwrap()
        .is_empty());
}
