//! Manifests: YAML (several documents separated by `---`) or JSON (one object or several in a
//! row), each document one object or a `kind: List` with `items`. Every error says which
//! document (1-based, counting non-empty documents) and which field.
//!
//! The JSON form of a stored object ([`to_json`]) is the manifest form: `apiVersion: v1` and
//! `kind` first, then the object's fields.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::types::{
    ClusterNetworkPolicy, Endpoints, Ingress, IngressClass, Kind, Namespace, NetworkPolicy, Object,
    Pod, Secret, Service,
};

/// The only `apiVersion` of these kinds.
pub const API_VERSION: &str = "v1";

/// A manifest that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is not YAML or JSON at all.
    #[error("{format}: {msg}")]
    Syntax { format: &'static str, msg: String },
    /// One document is not a valid object.
    #[error("document {document}{}: {error}", label(.what))]
    Document {
        /// 1-based, counting non-empty documents.
        document: usize,
        /// `Service web`, `List items[2]: Service web`, or empty when unknown.
        what: String,
        error: ObjectError,
    },
}

fn label(what: &str) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!(" ({what})")
    }
}

/// Why one JSON value is not an object of a kind we store: the field (when known) and the
/// problem, e.g. `spec.ports[0].port: invalid type: string "x", expected i64`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{msg}", .field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ObjectError {
    pub field: Option<String>,
    pub msg: String,
}

impl ObjectError {
    fn new(field: Option<&str>, msg: impl Into<String>) -> Self {
        ObjectError {
            field: field.map(str::to_string),
            msg: msg.into(),
        }
    }
}

/// Reads every object in a YAML or JSON manifest, in order; a `List` contributes its items.
/// An empty text (or only empty documents) gives no objects. Namespaces are left as written
/// (absent stays absent).
pub fn parse_documents(text: &str) -> Result<Vec<Object>, ParseError> {
    let docs = split_documents(text)?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let document = i + 1;
        let err = |what: String, error: ObjectError| ParseError::Document {
            document,
            what,
            error,
        };
        let doc = match doc {
            Value::Object(m) => m,
            other => {
                return Err(err(
                    String::new(),
                    ObjectError::new(
                        None,
                        format!("must be an object (a mapping), not {}", type_name(&other)),
                    ),
                ))
            }
        };
        if kind_of(&doc) == Some("List") {
            check_api_version(&doc, API_VERSION, "List").map_err(|e| err("List".into(), e))?;
            let items = match doc.get("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items.clone(),
                Some(other) => {
                    return Err(err(
                        "List".into(),
                        ObjectError::new(
                            Some("items"),
                            format!("must be a list, not {}", type_name(other)),
                        ),
                    ))
                }
            };
            for (j, item) in items.into_iter().enumerate() {
                let what = format!("List items[{j}]{}", item_label(&item, ": "));
                out.push(object_from_value(item).map_err(|e| err(what, e))?);
            }
        } else {
            let value = Value::Object(doc);
            let what = item_label(&value, "");
            out.push(object_from_value(value).map_err(|e| err(what, e))?);
        }
    }
    Ok(out)
}

/// Largest manifest text read (YAML or JSON): a file of 100,000 Services is about 25 MiB.
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// Most YAML documents in one manifest (serde-saphyr's default is 1,024, which refused a
/// file of a few thousand Services).
pub const MAX_DOCUMENTS: usize = 100_000;
/// Most YAML nodes (mappings, sequences, scalars) in one manifest: about 25 per Service.
pub const MAX_NODES: usize = 4_000_000;
/// Deepest nesting of mappings and sequences (the kinds stored here need about 10; JSON has
/// serde_json's own limit of 128).
pub const MAX_DEPTH: usize = 64;

/// serde-saphyr's budget with the limits above; its protections against alias expansion
/// (billion laughs: anchors, aliases, replayed events) stay at their defaults.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_nodes = MAX_NODES;
    // Two events per node at most, plus document and stream markers.
    budget.max_events = 2 * MAX_NODES + 2 * MAX_DOCUMENTS + 2;
    budget.max_depth = MAX_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// The documents of a manifest: JSON when it starts with `{`, YAML otherwise.
fn split_documents(text: &str) -> Result<Vec<Value>, ParseError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ParseError::Syntax {
            format: "manifest",
            msg: format!(
                "{} bytes, more than the limit of {} MiB",
                text.len(),
                MAX_MANIFEST_BYTES >> 20
            ),
        });
    }
    if text.trim_start().starts_with('{') {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ParseError::Syntax {
                format: "JSON",
                msg: e.to_string(),
            })
    } else {
        let docs = serde_saphyr::from_multiple_with_options::<Value>(text, yaml_options())
            .map_err(|e| ParseError::Syntax {
                format: "YAML",
                msg: first_line(&e.to_string()),
            })?;
        Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
    }
}

/// The first line of serde-saphyr's message (the rest is a source snippet), without its
/// `error: ` prefix: `line 2 column 7: unclosed bracket '['`.
fn first_line(msg: &str) -> String {
    let line = msg.trim().lines().next().unwrap_or_default().trim();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn kind_of(m: &Map<String, Value>) -> Option<&str> {
    m.get("kind").and_then(Value::as_str)
}

/// `Service web` for messages, from whatever the value carries; `sep` goes before it.
fn item_label(v: &Value, sep: &str) -> String {
    let kind = v.get("kind").and_then(Value::as_str);
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(k), Some(n)) => format!("{sep}{k} {n}"),
        (Some(k), None) => format!("{sep}{k}"),
        (None, Some(n)) => format!("{sep}{n}"),
        (None, None) => String::new(),
    }
}

fn check_api_version(m: &Map<String, Value>, want: &str, kind: &str) -> Result<(), ObjectError> {
    match m.get("apiVersion") {
        None | Some(Value::Null) => Err(ObjectError::new(
            Some("apiVersion"),
            format!("required ({want} for {kind})"),
        )),
        Some(Value::String(v)) if v == want => Ok(()),
        Some(other) => Err(ObjectError::new(
            Some("apiVersion"),
            format!("{other} is not supported for {kind} (only {want})"),
        )),
    }
}

fn decode<T: DeserializeOwned>(v: Value) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        ObjectError {
            field,
            msg: e.inner().to_string(),
        }
    })
}

/// One object from its JSON form (a manifest document or a stored value): `apiVersion` must be
/// `v1` and `kind` one of ours.
pub fn object_from_value(v: Value) -> Result<Object, ObjectError> {
    let Value::Object(mut m) = v else {
        return Err(ObjectError::new(
            None,
            format!("must be an object, not {}", type_name(&v)),
        ));
    };
    let kind = match m.get("kind") {
        None | Some(Value::Null) => return Err(ObjectError::new(Some("kind"), "required")),
        Some(Value::String(k)) => match Kind::ALL.iter().find(|c| c.as_str() == k) {
            Some(kind) => *kind,
            None => {
                return Err(ObjectError::new(
                    Some("kind"),
                    format!(
                        "unknown kind {k:?} (supported: Namespace, Pod, Service, Endpoints, NetworkPolicy, Secret, Ingress, IngressClass, ClusterNetworkPolicy, List)"
                    ),
                ))
            }
        },
        Some(other) => {
            return Err(ObjectError::new(
                Some("kind"),
                format!("must be a string, not {}", type_name(other)),
            ))
        }
    };
    check_api_version(&m, kind.api_version(), kind.as_str())?;
    m.remove("apiVersion");
    m.remove("kind");
    let v = Value::Object(m);
    Ok(match kind {
        Kind::Namespace => Object::Namespace(decode::<Namespace>(v)?),
        Kind::Pod => Object::Pod(decode::<Pod>(v)?),
        Kind::Service => Object::Service(decode::<Service>(v)?),
        Kind::Endpoints => Object::Endpoints(decode::<Endpoints>(v)?),
        Kind::NetworkPolicy => Object::NetworkPolicy(decode::<NetworkPolicy>(v)?),
        Kind::Secret => Object::Secret(decode::<Secret>(v)?),
        Kind::Ingress => Object::Ingress(decode::<Ingress>(v)?),
        Kind::IngressClass => Object::IngressClass(decode::<IngressClass>(v)?),
        Kind::ClusterNetworkPolicy => {
            Object::ClusterNetworkPolicy(decode::<ClusterNetworkPolicy>(v)?)
        }
    })
}

fn with_header(kind: Kind, body: &impl Serialize) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), kind.api_version().into());
    m.insert("kind".into(), kind.as_str().into());
    // These types serialize to a JSON object, always.
    if let Ok(Value::Object(fields)) = serde_json::to_value(body) {
        m.extend(fields);
    }
    Value::Object(m)
}

/// The object as JSON with `apiVersion` and `kind` first (its stored and printed form).
pub fn to_json(obj: &Object) -> Value {
    match obj {
        Object::Namespace(o) => with_header(obj.kind(), o),
        Object::Pod(o) => with_header(obj.kind(), o),
        Object::Service(o) => with_header(obj.kind(), o),
        Object::Endpoints(o) => with_header(obj.kind(), o),
        Object::NetworkPolicy(o) => with_header(obj.kind(), o),
        Object::Secret(o) => with_header(obj.kind(), o),
        Object::Ingress(o) => with_header(obj.kind(), o),
        Object::IngressClass(o) => with_header(obj.kind(), o),
        Object::ClusterNetworkPolicy(o) => with_header(obj.kind(), o),
    }
}

/// Objects as a `v1` `List` (what `get` prints for several objects).
pub fn list_json(objs: &[Object]) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), API_VERSION.into());
    m.insert("kind".into(), "List".into());
    m.insert(
        "items".into(),
        Value::Array(objs.iter().map(to_json).collect()),
    );
    Value::Object(m)
}

/// A JSON value as YAML text (for `-o yaml`).
pub fn to_yaml(v: &Value) -> String {
    // A serde_json::Value always serializes; an error here would be a serializer bug.
    serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# YAML output failed: {e}\n"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::types::{IntOrString, Protocol, ServiceType};

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
# a comment-only preamble, then a Service
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: NodePort
  clusterIP: None
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
    nodePort: 30053
---
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {app: web}}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
"#;

    fn err(text: &str) -> String {
        parse_documents(text).unwrap_err().to_string()
    }

    #[test]
    fn yaml_documents() {
        let objs = parse_documents(MANIFEST).unwrap();
        assert_eq!(
            objs.iter().map(|o| o.kind()).collect::<Vec<_>>(),
            vec![Kind::Namespace, Kind::Service, Kind::Pod]
        );
        let Object::Service(s) = &objs[1] else {
            panic!()
        };
        assert_eq!(s.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(s.spec.type_, ServiceType::NodePort);
        assert_eq!(
            s.spec.cluster_ip.as_deref(),
            Some("None"),
            "not a YAML null"
        );
        assert_eq!(
            s.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(s.spec.ports[1].target_port, Some(IntOrString::Int(5353)));
        assert_eq!(s.spec.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.spec.ports[0].protocol, Protocol::Tcp, "default");
        let Object::Pod(p) = &objs[2] else { panic!() };
        assert_eq!(p.metadata.namespace, None, "left to the store");
        assert_eq!(p.named_port("http", Protocol::Tcp), Some(8080));
    }

    #[test]
    fn json_one_or_several_objects() {
        let one = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}}"#;
        assert_eq!(parse_documents(one).unwrap().len(), 1);
        let two = format!("{one}\n{}", one.replace("\"a\"", "\"b\""));
        let objs = parse_documents(&two).unwrap();
        assert_eq!(objs[1].metadata().name, "b");
        assert!(err(r#"{"apiVersion":"v1","#).starts_with("JSON: "));
    }

    #[test]
    fn list_items() {
        let text = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Endpoints, metadata: {name: db}, subsets: [{addresses: [{ip: 192.168.1.2}], ports: [{port: 5432}]}]}
"#;
        let objs = parse_documents(text).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].kind(), Kind::Endpoints);
        let bad = text.replace("port: 5432", "port: x");
        assert_eq!(
            err(&bad),
            "document 1 (List items[1]: Endpoints db): subsets[0].ports[0].port: invalid type: string \"x\", expected i64"
        );
        assert_eq!(
            err("apiVersion: v1\nkind: List\nitems: 3\n"),
            "document 1 (List): items: must be a list, not a number"
        );
    }

    #[test]
    fn errors_name_document_and_field() {
        let bad = MANIFEST.replace("port: 80", "port: x");
        assert_eq!(
            err(&bad),
            "document 2 (Service web): spec.ports[0].port: invalid type: string \"x\", expected i64"
        );
        let bad = MANIFEST.replace("protocol: UDP", "protocol: ICMP");
        let e = err(&bad);
        assert!(
            e.starts_with(
                "document 2 (Service web): spec.ports[1].protocol: unknown variant `ICMP`"
            ),
            "{e}"
        );
        let bad = MANIFEST.replace("containerPort: 8080", "containerPort: 80.5");
        assert!(
            err(&bad).starts_with("document 3 (Pod web-0): spec.containers[0].ports[0].containerPort: invalid type: floating point"),
            "{}",
            err(&bad)
        );
        let bad = MANIFEST.replace("  - name: http\n    port: 80\n", "  - name: http\n");
        assert_eq!(
            err(&bad),
            "document 2 (Service web): spec.ports[0]: missing field `port`"
        );
        let bad = MANIFEST.replace("type: NodePort", "type: Nodeport");
        assert!(err(&bad)
            .starts_with("document 2 (Service web): spec.type: unknown variant `Nodeport`"));
    }

    #[test]
    fn api_version_and_kind() {
        assert_eq!(
            err("apiVersion: apps/v1\nkind: Service\nmetadata: {name: a}\n"),
            "document 1 (Service a): apiVersion: \"apps/v1\" is not supported for Service (only v1)"
        );
        assert_eq!(
            err("kind: Pod\nmetadata: {name: a}\n"),
            "document 1 (Pod a): apiVersion: required (v1 for Pod)"
        );
        assert_eq!(
            err("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\n"),
            "document 1 (Deployment a): kind: unknown kind \"Deployment\" (supported: Namespace, Pod, Service, Endpoints, NetworkPolicy, Secret, Ingress, IngressClass, ClusterNetworkPolicy, List)"
        );
        assert_eq!(
            err("apiVersion: v1\nmetadata: {name: a}\n"),
            "document 1 (a): kind: required"
        );
        assert_eq!(
            err("apiVersion: v1\nkind: Namespace\n---\n- a\n"),
            "document 2: must be an object (a mapping), not a list"
        );
    }

    #[test]
    fn yaml_syntax_error() {
        let e = err("apiVersion: v1\nkind: [Namespace\n");
        assert_eq!(e, "YAML: line 2 column 7: unclosed bracket '['");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn empty_input() {
        assert!(parse_documents("").unwrap().is_empty());
        assert!(parse_documents("---\n# nothing\n---\n").unwrap().is_empty());
    }

    #[test]
    fn to_json_round_trips() {
        for obj in parse_documents(MANIFEST).unwrap() {
            let v = to_json(&obj);
            let keys: Vec<&String> = v.as_object().unwrap().keys().take(2).collect();
            assert_eq!(keys, ["apiVersion", "kind"]);
            assert_eq!(v["kind"], obj.kind().as_str());
            assert_eq!(object_from_value(v.clone()).unwrap(), obj);
            // And through YAML.
            let yaml = to_yaml(&v);
            assert_eq!(parse_documents(&yaml).unwrap(), vec![obj.clone()], "{yaml}");
        }
        let objs = parse_documents(MANIFEST).unwrap();
        let list = list_json(&objs);
        assert_eq!(parse_documents(&list.to_string()).unwrap(), objs);
        assert_eq!(parse_documents(&to_yaml(&list)).unwrap(), objs);
    }

    #[test]
    fn network_policy_needs_its_api_group() {
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
        let objs = parse_documents(yaml).unwrap();
        let Object::NetworkPolicy(np) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert!(np.spec.pod_selector.is_empty());
        assert_eq!(to_json(&objs[0])["apiVersion"], "networking.k8s.io/v1");
        let wrong = yaml.replace("networking.k8s.io/v1", "v1");
        let err = parse_documents(&wrong).unwrap_err().to_string();
        assert!(err.contains("only networking.k8s.io/v1"), "{err}");
        let bad_op = yaml.replace(
            "podSelector: {}",
            "podSelector: {matchExpressions: [{key: a, operator: Has}]}",
        );
        let err = parse_documents(&bad_op).unwrap_err().to_string();
        assert!(
            err.contains("spec.podSelector.matchExpressions[0].operator"),
            "{err}"
        );
    }
    /// `n` Services as one YAML file, as a generator or `kubectl get -o yaml` split would write.
    fn services_yaml(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: load\n  labels: {{app: a{i}}}\nspec:\n  selector: {{app: a{i}}}\n  ports:\n  - name: service-port-tcp-80\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n"
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn ten_thousand_services_parse() {
        let text = services_yaml(10_000);
        let objs = parse_documents(&text).unwrap();
        assert_eq!(objs.len(), 10_000);
        assert_eq!(objs[9_999].metadata().name, "svc-9999");
        // The same as JSON documents in a row.
        let json: String = objs.iter().map(|o| to_json(o).to_string()).collect();
        assert_eq!(parse_documents(&json).unwrap().len(), 10_000);
    }

    #[test]
    fn limits_still_refuse_hostile_manifests() {
        let syntax = |text: &str| match parse_documents(text) {
            Err(ParseError::Syntax { msg, .. }) => msg,
            other => panic!("expected a syntax error, got {other:?}"),
        };
        // Billion laughs: nine levels of ten aliases each.
        let mut laughs =
            String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = i - 1;
            laughs += &format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            );
        }
        let msg = syntax(&laughs);
        assert!(msg.contains("budget"), "{msg}");
        // Deep nesting: flow, block and JSON.
        let msg = syntax(&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)));
        assert!(!msg.is_empty());
        let block: String = (0..200)
            .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
            .collect::<String>()
            + &format!("{}leaf: 1\n", "  ".repeat(200));
        let msg = syntax(&block);
        assert!(msg.contains("budget") || msg.contains("depth"), "{msg}");
        let json = format!("{{\"a\":{}1{}}}", "[".repeat(1_000), "]".repeat(1_000));
        let msg = syntax(&json);
        assert!(msg.contains("recursion limit"), "{msg}");
        // More documents than the limit, and a text over the size limit.
        let msg = syntax(&"---\na: 1\n".repeat(MAX_DOCUMENTS + 1));
        assert!(msg.contains("Documents"), "{msg}");
        let big = format!("a: \"{}\"\n", "x".repeat(MAX_MANIFEST_BYTES));
        assert!(syntax(&big).contains("more than the limit of 64 MiB"));
    }
}
