//! ClusterIP and NodePort allocation for Services, as the API server does it (pure): the
//! allocations in etcd as a map, a free value chosen at random, and the plan of one Service
//! (kept, allocated, shared or refused). The store writes a plan in one guarded txn.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::keys::{owner, Allocation, DEFAULT_NAMESPACE};
use crate::types::{Protocol, Service};
use crate::validate::{FieldError, NODE_PORT_MAX, NODE_PORT_MIN};

/// Every ClusterIP and NodePort allocation: address or port → owner `<namespace>/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub cluster_ips: BTreeMap<Ipv4Addr, String>,
    pub node_ports: BTreeMap<u16, String>,
}

impl Allocations {
    /// The allocations `owner` holds.
    pub fn owned_by(&self, owner: &str) -> BTreeSet<Allocation> {
        let ips = self
            .cluster_ips
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| Allocation::ClusterIp(*ip));
        let ports = self
            .node_ports
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(p, _)| Allocation::NodePort(*p));
        ips.chain(ports).collect()
    }
}

/// A value chosen at random among `lo..=hi` not in `used`; None when all are used. A few
/// random probes first, then (for a crowded range) a uniform pick among the free values.
pub fn choose_free(lo: u32, hi: u32, used: &BTreeSet<u32>, rng: &mut impl Rng) -> Option<u32> {
    if lo > hi {
        return None;
    }
    let size = u64::from(hi - lo) + 1;
    let taken = used.range(lo..=hi).count() as u64;
    if taken >= size {
        return None;
    }
    for _ in 0..16 {
        let c = rng.random_range(lo..=hi);
        if !used.contains(&c) {
            return Some(c);
        }
    }
    // The k-th free value, walking the gaps between used ones.
    let mut k = rng.random_range(0..size - taken);
    let mut next = u64::from(lo);
    for &u in used.range(lo..=hi) {
        let gap = u64::from(u) - next;
        if k < gap {
            break;
        }
        k -= gap;
        next = u64::from(u) + 1;
    }
    u32::try_from(next + k).ok()
}

/// Why [`plan_service`] cannot give a Service what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// Immutable field changed, or an address or port held by another Service.
    Invalid(FieldError),
    /// No free address or port left.
    Exhausted(FieldError),
}

/// A Service with its ClusterIP and NodePorts decided, and the allocations it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: Service,
    pub allocations: BTreeSet<Allocation>,
}

fn field(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Decides a (normalized, validated) Service's ClusterIP and NodePorts, as Kubernetes does:
/// absent ones are kept from the stored Service `old` or else allocated at random; a
/// ClusterIP never changes; an address or port held by another Service is refused; a missing
/// NodePort of a port number that another protocol of the same port number has is shared.
pub fn plan_service(
    new: Service,
    old: Option<&Service>,
    allocs: &Allocations,
    net: Ipv4Net,
    rng: &mut impl Rng,
) -> Result<ServicePlan, AllocError> {
    use crate::types::ServiceType;
    let ns = new
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let me = owner(ns, &new.metadata.name);
    let mut svc = new;
    let mut allocations = BTreeSet::new();

    // ClusterIP
    if svc.spec.type_ == ServiceType::ExternalName {
        svc.spec.cluster_ip = None;
        svc.spec.cluster_ips.clear();
    } else {
        let old_ip = old
            .filter(|o| o.spec.type_ != ServiceType::ExternalName)
            .and_then(|o| o.spec.cluster_ip.clone())
            .filter(|ip| !ip.is_empty());
        let given = svc.spec.cluster_ip.clone().filter(|ip| !ip.is_empty());
        let text = match (given, old_ip) {
            (Some(g), Some(o)) if g != o => {
                return Err(AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("field is immutable (it is {o})"),
                )))
            }
            (Some(g), _) => g,
            (None, Some(o)) => o,
            (None, None) => {
                let used: BTreeSet<u32> = allocs
                    .cluster_ips
                    .iter()
                    .filter(|(_, o)| **o != me)
                    .map(|(ip, _)| u32::from(*ip))
                    .collect();
                let lo = u32::from(net.network()).saturating_add(1);
                let hi = u32::from(net.broadcast()).saturating_sub(1);
                let Some(ip) = choose_free(lo, hi, &used, rng) else {
                    return Err(AllocError::Exhausted(field(
                        "spec.clusterIP",
                        format!(
                            "no free address left in the service network {net} ({} allocated)",
                            used.range(lo..=hi).count()
                        ),
                    )));
                };
                Ipv4Addr::from(ip).to_string()
            }
        };
        if text != "None" {
            let ip: Ipv4Addr = text.parse().map_err(|_| {
                AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("{text:?} must be empty, 'None' or a valid IPv4 address"),
                ))
            })?;
            if let Some(o) = allocs.cluster_ips.get(&ip).filter(|o| **o != me) {
                return Err(AllocError::Invalid(field(
                    "spec.clusterIP",
                    format!("{ip} is already allocated to {o}"),
                )));
            }
            allocations.insert(Allocation::ClusterIp(ip));
        }
        svc.spec.cluster_ip = Some(text.clone());
        svc.spec.cluster_ips = vec![text];
    }

    // NodePorts
    if svc.spec.type_.has_node_ports() {
        let held_by_other = |np: i64| -> Option<&String> {
            u16::try_from(np)
                .ok()
                .and_then(|p| allocs.node_ports.get(&p))
                .filter(|o| **o != me)
        };
        let old_ports: HashMap<(i64, Protocol), i64> = old
            .filter(|o| o.spec.type_.has_node_ports())
            .map(|o| {
                o.spec
                    .ports
                    .iter()
                    .filter_map(|p| Some(((p.port, p.protocol), p.node_port?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut taken: BTreeSet<(i64, Protocol)> = BTreeSet::new();
        // Given ones.
        for (i, p) in svc.spec.ports.iter().enumerate() {
            if let Some(np) = p.node_port {
                if let Some(o) = held_by_other(np) {
                    return Err(AllocError::Invalid(field(
                        format!("spec.ports[{i}].nodePort"),
                        format!("{np} is already allocated to {o}"),
                    )));
                }
                taken.insert((np, p.protocol));
            }
        }
        // Kept from the stored Service (same port and protocol).
        for p in svc.spec.ports.iter_mut().filter(|p| p.node_port.is_none()) {
            if let Some(&np) = old_ports.get(&(p.port, p.protocol)) {
                if !taken.contains(&(np, p.protocol)) && held_by_other(np).is_none() {
                    p.node_port = Some(np);
                    taken.insert((np, p.protocol));
                }
            }
        }
        // Shared with the other protocol of the same port number, or new.
        for i in 0..svc.spec.ports.len() {
            let p = &svc.spec.ports[i];
            if p.node_port.is_some() {
                continue;
            }
            let (port, proto) = (p.port, p.protocol);
            let shared = svc
                .spec
                .ports
                .iter()
                .filter(|q| q.port == port && q.protocol != proto)
                .filter_map(|q| q.node_port)
                .find(|np| !taken.contains(&(*np, proto)));
            let np = match shared {
                Some(np) => np,
                None => {
                    let mut used: BTreeSet<u32> = allocs
                        .node_ports
                        .iter()
                        .filter(|(_, o)| **o != me)
                        .map(|(p, _)| u32::from(*p))
                        .collect();
                    used.extend(taken.iter().filter_map(|(np, _)| u32::try_from(*np).ok()));
                    let lo = NODE_PORT_MIN as u32;
                    let hi = NODE_PORT_MAX as u32;
                    match choose_free(lo, hi, &used, rng) {
                        Some(np) => i64::from(np),
                        None => {
                            return Err(AllocError::Exhausted(field(
                                format!("spec.ports[{i}].nodePort"),
                                format!(
                                    "no free node port left in {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                                ),
                            )))
                        }
                    }
                }
            };
            svc.spec.ports[i].node_port = Some(np);
            taken.insert((np, proto));
        }
        for (np, _) in taken {
            if let Ok(p) = u16::try_from(np) {
                allocations.insert(Allocation::NodePort(p));
            }
        }
    }
    Ok(ServicePlan {
        service: svc,
        allocations,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::parse::parse_documents;
    use crate::store::normalize;
    use crate::types::{Object, ServiceType};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn svc(yaml: &str) -> Service {
        let text = format!("apiVersion: v1\nkind: Service\n{yaml}");
        match normalize(parse_documents(&text).unwrap().remove(0), None).unwrap() {
            Object::Service(s) => s,
            _ => unreachable!(),
        }
    }

    fn net() -> Ipv4Net {
        "10.96.0.0/24".parse().unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn choose_free_picks_only_free_values() {
        let mut r = rng();
        let used: BTreeSet<u32> = (10..20).filter(|v| *v != 13).collect();
        for _ in 0..50 {
            assert_eq!(choose_free(10, 19, &used, &mut r), Some(13));
        }
        let all: BTreeSet<u32> = (10..20).collect();
        assert_eq!(choose_free(10, 19, &all, &mut r), None);
        assert_eq!(choose_free(5, 4, &BTreeSet::new(), &mut r), None);
        // Values outside the range do not count against it.
        assert!(choose_free(1, 1, &[0, 2].into(), &mut r) == Some(1));
        // Random: a wide free range gives many different values.
        let seen: BTreeSet<u32> = (0..200)
            .filter_map(|_| choose_free(0, 1_000_000, &BTreeSet::new(), &mut r))
            .collect();
        assert!(seen.len() > 190, "{}", seen.len());
        // Crowded: every free value is reachable through the gap walk.
        let used: BTreeSet<u32> = (0..1000).filter(|v| v % 100 != 0).collect();
        let seen: BTreeSet<u32> = (0..2000)
            .filter_map(|_| choose_free(0, 999, &used, &mut r))
            .collect();
        assert_eq!(seen, (0..1000).filter(|v| v % 100 == 0).collect());
        // Extremes of u32.
        assert_eq!(
            choose_free(u32::MAX - 1, u32::MAX, &[u32::MAX - 1].into(), &mut r),
            Some(u32::MAX)
        );
    }

    fn allocs(ips: &[(&str, &str)], ports: &[(u16, &str)]) -> Allocations {
        Allocations {
            cluster_ips: ips
                .iter()
                .map(|(ip, o)| (ip.parse().unwrap(), o.to_string()))
                .collect(),
            node_ports: ports.iter().map(|(p, o)| (*p, o.to_string())).collect(),
        }
    }

    fn plan(s: Service, old: Option<&Service>, a: &Allocations) -> Result<ServicePlan, AllocError> {
        plan_service(s, old, a, net(), &mut rng())
    }

    #[test]
    fn cluster_ip_allocated_kept_and_immutable() {
        let s = svc("metadata: {name: web}\nspec: {ports: [{port: 80}]}\n");
        let p = plan(s.clone(), None, &Allocations::default()).unwrap();
        let ip: Ipv4Addr = p.service.cluster_ip_addr().unwrap();
        assert!(net().contains(&ip) && ip != net().network() && ip != net().broadcast());
        assert_eq!(p.service.spec.cluster_ips, vec![ip.to_string()]);
        assert_eq!(p.allocations, [Allocation::ClusterIp(ip)].into());

        // Re-apply without clusterIP keeps it.
        let held = allocs(&[(&ip.to_string(), "default/web")], &[]);
        let again = plan(s.clone(), Some(&p.service), &held).unwrap();
        assert_eq!(again.service, p.service);

        // A different one is refused.
        let mut changed = s.clone();
        changed.spec.cluster_ip = Some(
            if ip.octets()[3] == 7 {
                "10.96.0.8"
            } else {
                "10.96.0.7"
            }
            .into(),
        );
        let Err(AllocError::Invalid(e)) = plan(changed, Some(&p.service), &held) else {
            panic!()
        };
        assert_eq!(e.field, "spec.clusterIP");
        assert_eq!(e.msg, format!("field is immutable (it is {ip})"));

        // Never one held by another Service.
        let crowded: Vec<(String, &str)> = (1..255)
            .filter(|i| *i != 77)
            .map(|i| (format!("10.96.0.{i}"), "default/other"))
            .collect();
        let crowded: Vec<(&str, &str)> = crowded.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let p = plan(s.clone(), None, &allocs(&crowded, &[])).unwrap();
        assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("10.96.0.77"));
        let full: Vec<(String, &str)> = (1..255).map(|i| (format!("10.96.0.{i}"), "x/y")).collect();
        let full: Vec<(&str, &str)> = full.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let Err(AllocError::Exhausted(e)) = plan(s, None, &allocs(&full, &[])) else {
            panic!()
        };
        assert_eq!(e.to_string(), "spec.clusterIP: no free address left in the service network 10.96.0.0/24 (254 allocated)");
    }

    #[test]
    fn requested_cluster_ip_collision() {
        let s = svc("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n");
        let Err(AllocError::Invalid(e)) = plan(
            s.clone(),
            None,
            &allocs(&[("10.96.0.10", "default/other")], &[]),
        ) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.clusterIP: 10.96.0.10 is already allocated to default/other"
        );
        let p = plan(s, None, &allocs(&[("10.96.0.10", "default/web")], &[])).unwrap();
        assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn headless_and_external_name_get_no_address() {
        let h = svc("metadata: {name: h}\nspec: {clusterIP: None, selector: {a: b}}\n");
        let p = plan(h.clone(), None, &Allocations::default()).unwrap();
        assert!(p.allocations.is_empty());
        assert_eq!(p.service.spec.cluster_ips, vec!["None".to_string()]);
        // Omitted on re-apply: stays headless.
        let mut again = h;
        again.spec.cluster_ip = None;
        again.spec.cluster_ips.clear();
        assert_eq!(
            plan(again, Some(&p.service), &Allocations::default())
                .unwrap()
                .service
                .spec
                .cluster_ip
                .as_deref(),
            Some("None")
        );

        let e =
            svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: db.example.com}\n");
        let p = plan(e, None, &Allocations::default()).unwrap();
        assert!(p.allocations.is_empty());
        assert_eq!(p.service.spec.cluster_ip, None);

        // ClusterIP -> ExternalName drops the address; back allocates a new one.
        let c = svc("metadata: {name: e}\nspec: {ports: [{port: 80}]}\n");
        let with_ip = plan(c.clone(), None, &Allocations::default()).unwrap();
        let to_ext =
            svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: x.example}\n");
        assert!(
            plan(to_ext, Some(&with_ip.service), &Allocations::default())
                .unwrap()
                .allocations
                .is_empty()
        );
        assert!(plan(c, Some(&p.service), &Allocations::default())
            .unwrap()
            .service
            .spec
            .cluster_ip
            .is_some());
    }

    #[test]
    fn node_ports_allocated_kept_shared_and_refused() {
        let s = svc("metadata: {name: dns}\nspec: {type: NodePort, ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}, {name: c, port: 80, nodePort: 30080}]}\n");
        let p = plan(s.clone(), None, &Allocations::default()).unwrap();
        let ports = &p.service.spec.ports;
        let np = ports[0].node_port.unwrap();
        assert!((NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np));
        assert_eq!(
            ports[1].node_port,
            Some(np),
            "TCP and UDP 53 share one node port"
        );
        assert_eq!(ports[2].node_port, Some(30080));
        let ip: Ipv4Addr = p.service.cluster_ip_addr().unwrap();
        assert_eq!(
            p.allocations,
            [
                Allocation::ClusterIp(ip),
                Allocation::NodePort(np as u16),
                Allocation::NodePort(30080)
            ]
            .into()
        );

        // Kept on re-apply (matched by port and protocol, even reordered).
        let held = allocs(
            &[(&ip.to_string(), "default/dns")],
            &[(np as u16, "default/dns"), (30080, "default/dns")],
        );
        let mut reordered = s.clone();
        reordered.spec.ports.swap(0, 1);
        let again = plan(reordered, Some(&p.service), &held).unwrap();
        assert_eq!(again.service.spec.ports[0].node_port, Some(np));
        assert_eq!(again.allocations, p.allocations);

        // Another Service's port is refused, given or not.
        let other = allocs(&[], &[(30080, "kube-system/x")]);
        let Err(AllocError::Invalid(e)) = plan(s.clone(), None, &other) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.ports[2].nodePort: 30080 is already allocated to kube-system/x"
        );
        let all_but_one: Vec<(u16, &str)> = (30000..=32767u16)
            .filter(|p| *p != 31000 && *p != 30080)
            .map(|p| (p, "x/y"))
            .collect();
        let p2 = plan(s.clone(), None, &allocs(&[], &all_but_one)).unwrap();
        assert_eq!(p2.service.spec.ports[0].node_port, Some(31000));
        let all: Vec<(u16, &str)> = (30000..=32767u16)
            .filter(|p| *p != 30080)
            .map(|p| (p, "x/y"))
            .collect();
        let Err(AllocError::Exhausted(e)) = plan(s, None, &allocs(&[], &all)) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "spec.ports[0].nodePort: no free node port left in 30000-32767"
        );

        // NodePort -> ClusterIP releases them.
        let c = svc("metadata: {name: dns}\nspec: {ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]}\n");
        let back = plan(c, Some(&p.service), &held).unwrap();
        assert_eq!(back.allocations, [Allocation::ClusterIp(ip)].into());
        assert!(back
            .service
            .spec
            .ports
            .iter()
            .all(|p| p.node_port.is_none()));
        assert_eq!(back.service.spec.type_, ServiceType::ClusterIP);
    }
}
