//! The rules of `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy as its CRD states them
//! (OpenAPI bounds and CEL rules of the standard channel), every broken field by its path,
//! with the CRD's wording where it has one.

use std::collections::HashSet;

use super::{cidr, label_selector, metadata, Errors};
use crate::types::{
    ClusterNetworkPolicy, ClusterNetworkPolicyPeer, ClusterNetworkPolicyProtocol, CnpPort, Kind,
    NamespacedPod, ProtocolPort, CNP_CIDR_MAX_LEN, CNP_MAX_NETWORKS, CNP_MAX_PEERS,
    CNP_MAX_PROTOCOLS, CNP_MAX_RULES, CNP_PRIORITY_MAX, CNP_RULE_NAME_MAX,
};

fn exactly_one(v: &mut Errors, field: &str, set: usize, names: &str) {
    if set == 0 {
        v.add(
            field,
            format!("should have at least 1 properties (exactly one of {names})"),
        );
    } else if set > 1 {
        v.add(
            field,
            format!("must have at most 1 properties (exactly one of {names})"),
        );
    }
}

fn items(v: &mut Errors, field: &str, n: usize, max: usize) {
    if n == 0 {
        v.add(field, "should have at least 1 items");
    } else if n > max {
        v.add(field, format!("must have at most {max} items (has {n})"));
    }
}

fn namespaced_pod(v: &mut Errors, field: &str, p: &NamespacedPod) {
    label_selector(
        v,
        &format!("{field}.namespaceSelector"),
        &p.namespace_selector,
    );
    match &p.pod_selector {
        None => v.add(format!("{field}.podSelector"), "Required value"),
        Some(s) => label_selector(v, &format!("{field}.podSelector"), s),
    }
}

fn peer(v: &mut Errors, field: &str, p: &ClusterNetworkPolicyPeer, egress: bool) {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.networks.is_some(),
        p.nodes.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let names = if egress {
        "namespaces, pods or networks"
    } else {
        "namespaces or pods"
    };
    exactly_one(v, field, set, names);
    if let Some(s) = &p.namespaces {
        label_selector(v, &format!("{field}.namespaces"), s);
    }
    if let Some(pods) = &p.pods {
        namespaced_pod(v, &format!("{field}.pods"), pods);
    }
    for (name, present) in [
        ("nodes", p.nodes.is_some()),
        ("domainNames", p.domain_names.is_some()),
    ] {
        if present {
            let msg = if egress {
                "not supported: an experimental-channel field (this implementation serves the standard channel)"
            } else {
                "field not declared in schema (egress peers only)"
            };
            v.add(format!("{field}.{name}"), msg);
        }
    }
    if let Some(nets) = &p.networks {
        let f = format!("{field}.networks");
        if !egress {
            v.add(f, "field not declared in schema (egress peers only)");
            return;
        }
        items(v, &f, nets.len(), CNP_MAX_NETWORKS);
        let mut seen = HashSet::new();
        for (i, n) in nets.iter().enumerate() {
            let fi = format!("{f}[{i}]");
            if n.len() > CNP_CIDR_MAX_LEN {
                v.add(&fi, format!("may not be longer than {CNP_CIDR_MAX_LEN}"));
            } else if cidr(n).is_err() {
                v.add(&fi, format!("{n:?}: Invalid CIDR format provided"));
            }
            if !seen.insert(n.as_str()) {
                v.add(&fi, format!("Duplicate value: {n:?}"));
            }
        }
    }
}

fn port_number(v: &mut Errors, field: &str, n: i64) {
    if n < 1 {
        v.add(field, format!("{n}: should be greater than or equal to 1"));
    } else if n > 65535 {
        v.add(field, format!("{n}: should be less than or equal to 65535"));
    }
}

fn destination_port(v: &mut Errors, field: &str, p: &CnpPort) {
    let set = usize::from(p.number.is_some()) + usize::from(p.range.is_some());
    exactly_one(v, field, set, "number or range");
    if let Some(n) = p.number {
        port_number(v, &format!("{field}.number"), n);
    }
    if let Some(r) = &p.range {
        let f = format!("{field}.range");
        for (name, val) in [("start", r.start), ("end", r.end)] {
            match val {
                None => v.add(format!("{f}.{name}"), "Required value"),
                Some(n) => port_number(v, &format!("{f}.{name}"), n),
            }
        }
        if let (Some(s), Some(e)) = (r.start, r.end) {
            if s >= e {
                v.add(f, "Start port must be less than End port");
            }
        }
    }
}

fn protocol(v: &mut Errors, field: &str, p: &ClusterNetworkPolicyProtocol) {
    let named = p
        .destination_named_port
        .as_deref()
        .filter(|s| !s.is_empty());
    let set = p.protocol_ports().count() + usize::from(named.is_some());
    exactly_one(v, field, set, "tcp, udp, sctp or destinationNamedPort");
    for (proto, pp) in p.protocol_ports() {
        let ProtocolPort {
            destination_port: dp,
        } = pp;
        let f = format!("{field}.{}", proto.nft());
        match dp {
            None => v.add(f, "should have at least 1 properties (destinationPort)"),
            Some(d) => destination_port(v, &format!("{f}.destinationPort"), d),
        }
    }
}

fn rule_common(
    v: &mut Errors,
    field: &str,
    name: Option<&str>,
    action: bool,
    protocols: Option<&[ClusterNetworkPolicyProtocol]>,
) {
    if let Some(n) = name {
        if n.chars().count() > CNP_RULE_NAME_MAX {
            v.add(
                format!("{field}.name"),
                format!("Too long: may not be longer than {CNP_RULE_NAME_MAX}"),
            );
        }
    }
    if !action {
        v.add(format!("{field}.action"), "Required value");
    }
    if let Some(ps) = protocols {
        let f = format!("{field}.protocols");
        items(v, &f, ps.len(), CNP_MAX_PROTOCOLS);
        for (i, p) in ps.iter().enumerate() {
            protocol(v, &format!("{f}[{i}]"), p);
        }
    }
}

pub(super) fn cluster_network_policy(v: &mut Errors, p: &ClusterNetworkPolicy) {
    metadata(v, &p.metadata, Kind::ClusterNetworkPolicy);
    let spec = &p.spec;
    if spec.tier.is_none() {
        v.add("spec.tier", "Required value (Admin or Baseline)");
    }
    match spec.priority {
        None => v.add("spec.priority", "Required value"),
        Some(n) if n < 0 => v.add(
            "spec.priority",
            format!("{n}: should be greater than or equal to 0"),
        ),
        Some(n) if n > CNP_PRIORITY_MAX => v.add(
            "spec.priority",
            format!("{n}: should be less than or equal to {CNP_PRIORITY_MAX}"),
        ),
        Some(_) => {}
    }
    let subject = &spec.subject;
    let set = usize::from(subject.namespaces.is_some()) + usize::from(subject.pods.is_some());
    exactly_one(v, "spec.subject", set, "namespaces or pods");
    if let Some(s) = &subject.namespaces {
        label_selector(v, "spec.subject.namespaces", s);
    }
    if let Some(pods) = &subject.pods {
        namespaced_pod(v, "spec.subject.pods", pods);
    }
    if spec.ingress.len() > CNP_MAX_RULES {
        v.add(
            "spec.ingress",
            format!(
                "must have at most {CNP_MAX_RULES} items (has {})",
                spec.ingress.len()
            ),
        );
    }
    if spec.egress.len() > CNP_MAX_RULES {
        v.add(
            "spec.egress",
            format!(
                "must have at most {CNP_MAX_RULES} items (has {})",
                spec.egress.len()
            ),
        );
    }
    for (i, r) in spec.ingress.iter().enumerate() {
        let f = format!("spec.ingress[{i}]");
        rule_common(
            v,
            &f,
            r.name.as_deref(),
            r.action.is_some(),
            r.protocols.as_deref(),
        );
        match &r.from {
            None => v.add(format!("{f}.from"), "Required value"),
            Some(peers) => {
                items(v, &format!("{f}.from"), peers.len(), CNP_MAX_PEERS);
                for (j, p) in peers.iter().enumerate() {
                    peer(v, &format!("{f}.from[{j}]"), p, false);
                }
            }
        }
    }
    for (i, r) in spec.egress.iter().enumerate() {
        let f = format!("spec.egress[{i}]");
        rule_common(
            v,
            &f,
            r.name.as_deref(),
            r.action.is_some(),
            r.protocols.as_deref(),
        );
        match &r.to {
            None => v.add(format!("{f}.to"), "Required value"),
            Some(peers) => {
                items(v, &format!("{f}.to"), peers.len(), CNP_MAX_PEERS);
                for (j, p) in peers.iter().enumerate() {
                    peer(v, &format!("{f}.to[{j}]"), p, true);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::parse::parse_documents;
    use crate::types::{Object, RuleAction, Tier};
    use crate::validate;
    use ipnet::Ipv4Net;

    fn net() -> Ipv4Net {
        "10.96.0.0/12".parse().unwrap()
    }

    fn one(yaml: &str) -> Object {
        let mut objs = parse_documents(yaml).unwrap();
        assert_eq!(objs.len(), 1);
        objs.remove(0)
    }

    const GOOD: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: tenant-isolation}
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces: {matchLabels: {tenant: blue}}
  ingress:
  - name: from-same-tenant
    action: Accept
    from:
    - namespaces: {matchLabels: {tenant: blue}}
  - action: Pass
    from:
    - pods:
        namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
        podSelector: {matchLabels: {app: prometheus}}
    protocols:
    - tcp: {destinationPort: {number: 9090}}
    - destinationNamedPort: metrics
  - action: Deny
    from: [{namespaces: {}}]
  egress:
  - action: Deny
    to: [{networks: ["169.254.169.254/32", "fd00:ec2::254/128"]}]
    protocols:
    - udp: {destinationPort: {range: {start: 1000, end: 2000}}}
    - sctp: {destinationPort: {number: 9}}
"#;

    #[test]
    fn a_valid_policy_parses_validates_and_round_trips() {
        let obj = one(GOOD);
        assert_eq!(validate(&obj, net()), Ok(()));
        let Object::ClusterNetworkPolicy(p) = &obj else {
            panic!("{obj:?}")
        };
        assert_eq!(p.spec.tier, Some(Tier::Admin));
        assert_eq!(p.spec.priority, Some(10));
        assert_eq!(p.spec.ingress[1].action, Some(RuleAction::Pass));
        assert_eq!(p.metadata.namespace, None);
        let json = crate::to_json(&obj);
        assert_eq!(json["apiVersion"], "policy.networking.k8s.io/v1alpha2");
        assert_eq!(json["kind"], "ClusterNetworkPolicy");
        assert_eq!(
            crate::parse::object_from_value(json).unwrap(),
            obj,
            "stored form reads back"
        );
    }

    #[test]
    fn every_broken_field_is_named() {
        let bad = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: Bad_Name, namespace: x}
spec:
  priority: 1001
  subject:
    namespaces: {}
    pods: {namespaceSelector: {}}
  ingress:
  - name: "NAME"
    from: []
    protocols: []
  - action: Deny
    from:
    - {}
    - networks: ["10.0.0.0/8"]
    - pods: {podSelector: {matchExpressions: [{key: app, operator: In}]}}
  egress:
  - action: Accept
    to:
    - networks: ["10.0.0.0/33", "10.1.0.0/16", "10.1.0.0/16"]
    - nodes: {}
    - namespaces: {}
      networks: ["10.2.0.0/16"]
    protocols:
    - tcp: {}
    - udp: {destinationPort: {number: 0}}
    - sctp: {destinationPort: {range: {start: 90, end: 80}}}
    - tcp: {destinationPort: {number: 80, range: {start: 1, end: 2}}}
      udp: {destinationPort: {number: 53}}
    - tcp: {destinationPort: {range: {start: 5}}}
    - {}
  - action: Pass
"#
        .replace("\"NAME\"", &format!("\"{}\"", "r".repeat(101)));
        let err = validate(&one(&bad), net()).unwrap_err();
        assert_eq!(
            err.fields(),
            vec![
                "metadata.name",
                "metadata.namespace",
                "spec.tier",
                "spec.priority",
                "spec.subject",
                "spec.subject.pods.podSelector",
                "spec.ingress[0].name",
                "spec.ingress[0].action",
                "spec.ingress[0].protocols",
                "spec.ingress[0].from",
                "spec.ingress[1].from[0]",
                "spec.ingress[1].from[1].networks",
                "spec.ingress[1].from[2].pods.podSelector.matchExpressions[0].values",
                "spec.egress[0].protocols[0].tcp",
                "spec.egress[0].protocols[1].udp.destinationPort.number",
                "spec.egress[0].protocols[2].sctp.destinationPort.range",
                "spec.egress[0].protocols[3]",
                "spec.egress[0].protocols[3].tcp.destinationPort",
                "spec.egress[0].protocols[4].tcp.destinationPort.range.end",
                "spec.egress[0].protocols[5]",
                "spec.egress[0].to[0].networks[0]",
                "spec.egress[0].to[0].networks[2]",
                "spec.egress[0].to[1].nodes",
                "spec.egress[0].to[2]",
                "spec.egress[1].to",
            ],
            "{err}"
        );
        let text = err.to_string();
        for want in [
            "ClusterNetworkPolicy x/Bad_Name is invalid",
            "spec.priority: 1001: should be less than or equal to 1000",
            "spec.egress[0].protocols[2].sctp.destinationPort.range: Start port must be less than End port",
            "spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\": Invalid CIDR format provided",
            "spec.ingress[0].name: Too long: may not be longer than 100",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
    }

    #[test]
    fn rule_and_list_limits() {
        let rule = "  - action: Deny\n    from: [{namespaces: {}}]\n";
        let mut doc = String::from("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: many}\nspec:\n  tier: Baseline\n  priority: 0\n  subject: {namespaces: {}}\n  ingress:\n");
        for _ in 0..25 {
            doc.push_str(rule);
        }
        assert_eq!(validate(&one(&doc), net()), Ok(()), "25 rules are allowed");
        doc.push_str(rule);
        let err = validate(&one(&doc), net()).unwrap_err();
        assert_eq!(err.fields(), vec!["spec.ingress"]);
        assert!(err.to_string().contains("at most 25 items"), "{err}");
    }

    #[test]
    fn unknown_enum_values_and_versions_are_refused_while_parsing() {
        let e = parse_documents("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Platform, priority: 1, subject: {namespaces: {}}}\n").unwrap_err();
        assert!(e.to_string().contains("spec.tier"), "{e}");
        let e = parse_documents("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Allow, from: [{namespaces: {}}]}]}\n").unwrap_err();
        assert!(e.to_string().contains("spec.ingress[0].action"), "{e}");
        let e = parse_documents("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("only policy.networking.k8s.io/v1alpha2"),
            "{e}"
        );
    }

    #[test]
    fn the_kind_is_cluster_scoped() {
        use crate::types::Kind;
        assert_eq!(Kind::parse("cnp"), Some(Kind::ClusterNetworkPolicy));
        assert!(!Kind::ClusterNetworkPolicy.namespaced());
        assert_eq!(
            crate::object_key("/coreos.com/network", Kind::ClusterNetworkPolicy, None, "p"),
            "/coreos.com/network/registry/clusternetworkpolicies/p"
        );
    }
}
