//! `flannelctl get KIND [NAME]`: aligned tables like kubectl's, or the objects as JSON/YAML.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use registry::parse::{list_json, to_yaml};
use registry::store::{describe, DEFAULT_NAMESPACE};
use registry::{labels_string, to_json, Kind, Object, Service, ServiceType, StoreError};

use crate::common::{parse_kind, EtcdFlags};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// namespaces (ns), pods (po), services (svc), endpoints (ep), networkpolicies (netpol),
    /// secrets, ingresses (ing) or ingressclasses.
    #[arg(value_parser = parse_kind)]
    kind: Kind,
    /// One object; all of the kind when absent.
    name: Option<String>,
    /// The namespace (default: `default`).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// With -o json/yaml: print Secrets' values too (hidden otherwise: only the keys and their
    /// sizes go to stderr).
    #[arg(long)]
    show_secret_data: bool,
}

pub async fn run(etcd: &EtcdFlags, args: GetArgs) -> Result<()> {
    let kind = args.kind;
    if args.all_namespaces && args.name.is_some() {
        bail!("a name cannot be looked up across all namespaces (-A): give -n NAMESPACE");
    }
    let ns = if kind.namespaced() && !args.all_namespaces {
        Some(args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE))
    } else {
        None
    };
    let store = etcd.store().await?;
    let objs = match &args.name {
        Some(name) => match store.get(kind, ns, name).await.map_err(|e| etcd.err(e))? {
            Some(o) => vec![o],
            None => {
                return Err(etcd.err(StoreError::NotFound {
                    object: describe(kind, ns, name),
                }))
            }
        },
        None => store.list(kind, ns).await.map_err(|e| etcd.err(e))?,
    };
    let single = args.name.is_some();
    let objs = if args.output != Output::Table && !args.show_secret_data {
        hide_secret_values(objs)
    } else {
        objs
    };
    match args.output {
        Output::Json => {
            let v = if single {
                to_json(&objs[0])
            } else {
                list_json(&objs)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Yaml => {
            let v = if single {
                to_json(&objs[0])
            } else {
                list_json(&objs)
            };
            print!("{}", to_yaml(&v));
        }
        Output::Table => {
            if objs.is_empty() {
                match ns {
                    Some(ns) => eprintln!("No resources found in {ns} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(());
            }
            print!("{}", table(kind, &objs));
        }
    }
    Ok(())
}

/// Secrets without their values; each hidden key and its size is named on stderr.
fn hide_secret_values(objs: Vec<Object>) -> Vec<Object> {
    objs.into_iter()
        .map(|o| match o {
            Object::Secret(s) => {
                let (copy, sizes) = s.redacted();
                if !sizes.is_empty() {
                    let keys: Vec<String> = sizes
                        .iter()
                        .map(|(k, n)| format!("{k} ({n} bytes)"))
                        .collect();
                    eprintln!(
                        "Secret {}/{}: values of {} hidden (--show-secret-data prints them)",
                        copy.metadata.namespace.as_deref().unwrap_or_default(),
                        copy.metadata.name,
                        keys.join(", ")
                    );
                }
                Object::Secret(copy)
            }
            other => other,
        })
        .collect()
}

const NONE: &str = "<none>";

fn or_none(s: String) -> String {
    if s.is_empty() {
        NONE.to_string()
    } else {
        s
    }
}

/// The rows of a kind's table, header first.
pub fn rows(kind: Kind, objs: &[Object]) -> Vec<Vec<String>> {
    let header: &[&str] = match kind {
        Kind::Namespace => &["NAME", "LABELS"],
        Kind::Pod => &["NAMESPACE", "NAME", "LABELS", "PORTS"],
        Kind::Service => &[
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "SELECTOR",
        ],
        Kind::Endpoints => &["NAMESPACE", "NAME", "ENDPOINTS"],
        Kind::NetworkPolicy => &["NAMESPACE", "NAME", "POD-SELECTOR"],
        Kind::Secret => &["NAMESPACE", "NAME", "TYPE", "DATA"],
        Kind::Ingress => &["NAMESPACE", "NAME", "CLASS", "HOSTS", "PORTS"],
        Kind::IngressClass => &["NAME", "CONTROLLER", "PARAMETERS"],
        Kind::ClusterNetworkPolicy => &["NAME", "TIER", "PRIORITY"],
    };
    let mut out = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for obj in objs {
        let m = obj.metadata();
        let ns = m.namespace.clone().unwrap_or_default();
        let row = match obj {
            Object::Namespace(n) => vec![
                n.metadata.name.clone(),
                or_none(labels_string(&n.metadata.labels)),
            ],
            Object::Pod(p) => {
                let ports: Vec<String> = p
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter())
                    .map(|cp| match &cp.name {
                        Some(n) => format!("{n}:{}/{}", cp.container_port, cp.protocol),
                        None => format!("{}/{}", cp.container_port, cp.protocol),
                    })
                    .collect();
                vec![
                    ns,
                    m.name.clone(),
                    or_none(labels_string(&m.labels)),
                    or_none(ports.join(",")),
                ]
            }
            Object::Service(s) => service_row(ns, s),
            Object::Endpoints(e) => {
                let eps: Vec<String> = e
                    .subsets
                    .iter()
                    .flat_map(|s| {
                        s.addresses.iter().flat_map(move |a| {
                            let ports: Vec<String> = if s.ports.is_empty() {
                                vec![a.ip.clone()]
                            } else {
                                // As kubectl (JoinHostPort): `[fd00::1]:80` for IPv6.
                                let host = if a.ip.contains(':') {
                                    format!("[{}]", a.ip)
                                } else {
                                    a.ip.clone()
                                };
                                s.ports
                                    .iter()
                                    .map(|p| format!("{host}:{}", p.port))
                                    .collect()
                            };
                            ports
                        })
                    })
                    .collect();
                // As kubectl: the first three, then a count.
                let shown = if eps.len() > 3 {
                    format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
                } else {
                    eps.join(",")
                };
                vec![ns, m.name.clone(), or_none(shown)]
            }
            Object::NetworkPolicy(np) => vec![
                ns,
                m.name.clone(),
                or_none(np.spec.pod_selector.to_string()),
            ],
            Object::Secret(s) => {
                let mut keys: Vec<&String> = s.data.keys().chain(s.string_data.keys()).collect();
                keys.sort();
                keys.dedup();
                vec![
                    ns,
                    m.name.clone(),
                    s.secret_type().to_string(),
                    keys.len().to_string(),
                ]
            }
            Object::Ingress(i) => {
                // As kubectl: the rules' hosts (`*` for a rule without one), 80 and 443 with TLS.
                let hosts: Vec<&str> = i
                    .spec
                    .rules
                    .iter()
                    .map(|r| r.host.as_deref().filter(|h| !h.is_empty()).unwrap_or("*"))
                    .collect();
                let hosts = if hosts.is_empty() {
                    "*".to_string()
                } else {
                    hosts.join(",")
                };
                let ports = if i.spec.tls.is_empty() {
                    "80"
                } else {
                    "80, 443"
                };
                vec![
                    ns,
                    m.name.clone(),
                    or_none(i.spec.ingress_class_name.clone().unwrap_or_default()),
                    hosts,
                    ports.to_string(),
                ]
            }
            Object::IngressClass(c) => {
                let params = c
                    .spec
                    .parameters
                    .as_ref()
                    .map(|p| match &p.api_group {
                        Some(g) if !g.is_empty() => format!("{}.{g}/{}", p.kind, p.name),
                        _ => format!("{}/{}", p.kind, p.name),
                    })
                    .unwrap_or_default();
                vec![m.name.clone(), c.spec.controller.clone(), or_none(params)]
            }
            Object::ClusterNetworkPolicy(p) => vec![
                m.name.clone(),
                or_none(p.spec.tier.map(|t| t.to_string()).unwrap_or_default()),
                or_none(p.spec.priority.map(|n| n.to_string()).unwrap_or_default()),
            ],
        };
        out.push(row);
    }
    out
}

fn service_row(ns: String, s: &Service) -> Vec<String> {
    let spec = &s.spec;
    // Both addresses of a dual-stack Service (kubectl shows the primary only).
    let cluster_ip = match spec.type_ {
        ServiceType::ExternalName => NONE.to_string(),
        _ if spec.cluster_ips.len() > 1 => spec.cluster_ips.join(","),
        _ => or_none(spec.cluster_ip.clone().unwrap_or_default()),
    };
    let external = match spec.type_ {
        ServiceType::ExternalName => spec.external_name.clone().unwrap_or_default(),
        ServiceType::LoadBalancer if spec.external_ips.is_empty() => "<pending>".into(),
        _ => spec.external_ips.join(","),
    };
    let ports: Vec<String> = spec
        .ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
            None => format!("{}/{}", p.port, p.protocol),
        })
        .collect();
    vec![
        ns,
        s.metadata.name.clone(),
        spec.type_.as_str().to_string(),
        cluster_ip,
        or_none(external),
        or_none(ports.join(",")),
        or_none(
            spec.selector
                .as_ref()
                .map(labels_string)
                .unwrap_or_default(),
        ),
    ]
}

/// A kind's table (kubectl's layout).
pub fn table(kind: Kind, objs: &[Object]) -> String {
    crate::common::align(&rows(kind, objs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use registry::parse_documents;

    #[test]
    fn service_table() {
        let objs = parse_documents(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web, tier: fe}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
  type: NodePort
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: db.example.com}
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::Service, &objs),
            "\
NAMESPACE   NAME   TYPE           CLUSTER-IP   EXTERNAL-IP      PORT(S)               SELECTOR
default     web    NodePort       10.96.0.10   <none>           80/TCP,53:30053/UDP   app=web,tier=fe
shop        ext    ExternalName   <none>       db.example.com   <none>                <none>
"
        );
        let objs = parse_documents(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  ports: [{port: 80}]
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::Service, &objs),
            "\
NAMESPACE   NAME   TYPE        CLUSTER-IP                 EXTERNAL-IP   PORT(S)   SELECTOR
default     web    ClusterIP   10.96.0.10,fd00:10:96::a   <none>        80/TCP    <none>
"
        );
    }

    #[test]
    fn pod_endpoints_namespace_tables() {
        let objs = parse_documents(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web}}
spec: {containers: [{name: a, ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]}]}
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::Pod, &objs),
            "NAMESPACE   NAME    LABELS    PORTS\ndefault     web-0   app=web   http:8080/TCP,53/UDP\n"
        );
        let objs = parse_documents(
            r#"
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: default}
subsets:
- addresses: [{ip: 192.168.1.1}, {ip: 192.168.1.2}]
  ports: [{name: a, port: 5432}, {name: b, port: 9187}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: empty, namespace: default}
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::Endpoints, &objs),
            "NAMESPACE   NAME    ENDPOINTS\ndefault     db      192.168.1.1:5432,192.168.1.1:9187,192.168.1.2:5432 + 1 more...\ndefault     empty   <none>\n"
        );
        let objs = parse_documents(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: db6, namespace: default}\nsubsets: [{addresses: [{ip: 'fd00::1'}], ports: [{port: 5432}]}]\n",
        )
        .unwrap();
        assert_eq!(
            table(Kind::Endpoints, &objs),
            "NAMESPACE   NAME   ENDPOINTS\ndefault     db6    [fd00::1]:5432\n"
        );
        let objs = parse_documents("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}\n").unwrap();
        assert_eq!(
            table(Kind::Namespace, &objs),
            "NAME   LABELS\nshop   kubernetes.io/metadata.name=shop\n"
        );
    }

    #[test]
    fn ingress_secret_and_class_tables_and_hidden_values() {
        let objs = parse_documents(
            r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: shop, namespace: web}
spec:
  ingressClassName: flannel
  tls: [{hosts: [shop.example.com], secretName: shop-tls}]
  rules:
  - host: shop.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: front, port: {number: 80}}}}]}
  - http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: front, port: {number: 80}}}}]}
"#,
        )
        .unwrap();
        let t = table(Kind::Ingress, &objs);
        assert_eq!(
            t.lines().collect::<Vec<_>>(),
            [
                "NAMESPACE   NAME   CLASS     HOSTS                PORTS",
                "web         shop   flannel   shop.example.com,*   80, 443"
            ]
        );
        let objs = parse_documents(
            r#"
apiVersion: v1
kind: Secret
metadata: {name: shop-tls, namespace: web}
type: kubernetes.io/tls
data: {tls.crt: Y2VydA==, tls.key: a2V5LWJ5dGVz}
"#,
        )
        .unwrap();
        let t = table(Kind::Secret, &objs);
        assert!(
            t.ends_with("web         shop-tls   kubernetes.io/tls   2\n"),
            "{t}"
        );
        let hidden = hide_secret_values(objs);
        let json = to_json(&hidden[0]).to_string();
        assert!(
            !json.contains("a2V5LWJ5dGVz") && !json.contains("\"data\""),
            "{json}"
        );
        let objs = parse_documents(
            r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: flannel}
spec: {controller: flannel.io/ingress}
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::IngressClass, &objs),
            "NAME      CONTROLLER           PARAMETERS\nflannel   flannel.io/ingress   <none>\n"
        );
    }

    #[test]
    fn cluster_network_policy_rows() {
        let objs = parse_documents(
            r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: isolate-blue}
spec: {tier: Admin, priority: 10, subject: {namespaces: {}}}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny}
spec: {tier: Baseline, priority: 1000, subject: {namespaces: {}}}
"#,
        )
        .unwrap();
        assert_eq!(
            table(Kind::ClusterNetworkPolicy, &objs),
            "NAME           TIER       PRIORITY\nisolate-blue   Admin      10\ndefault-deny   Baseline   1000\n"
        );
    }
}
