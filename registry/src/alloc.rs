//! ClusterIP and NodePort allocation for Services, as the API server does it (pure): the
//! cluster's service networks per family, the allocations in etcd as a map, a free value
//! chosen at random, and the plan of one Service (its IP families defaulted, addresses and
//! ports kept, allocated, shared, released or refused). The store writes a plan in one
//! guarded txn.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use subnet_lease::config::NetConfig;

use crate::keys::{owner, Allocation, DEFAULT_NAMESPACE};
use crate::types::{IpFamily, IpFamilyPolicy, Protocol, Service, ServiceType};
use crate::validate::{
    cluster_ips_errors, not_configured, FieldError, NODE_PORT_MAX, NODE_PORT_MIN,
};

/// The service networks of the cluster, one per enabled family (the API server's
/// `--service-cluster-ip-range`): `ServiceNetwork` when `EnableIPv4`, `IPv6ServiceNetwork` when
/// `EnableIPv6`. The primary family (a SingleStack Service's default) is IPv4 when the
/// cluster has it, else IPv6.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceNetworks {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl ServiceNetworks {
    /// The networks a (validated) network config gives.
    pub fn from_config(cfg: &NetConfig) -> ServiceNetworks {
        ServiceNetworks {
            v4: cfg.enable_ipv4.then_some(cfg.service_network),
            v6: cfg.ipv6_service_network(),
        }
    }

    /// Whether the cluster has a service network of `family`.
    pub fn has(&self, family: IpFamily) -> bool {
        match family {
            IpFamily::Ipv4 => self.v4.is_some(),
            IpFamily::Ipv6 => self.v6.is_some(),
        }
    }

    /// Both families.
    pub fn is_dual(&self) -> bool {
        self.v4.is_some() && self.v6.is_some()
    }

    /// The default family: IPv4 unless the cluster has IPv6 only.
    pub fn primary(&self) -> IpFamily {
        if self.v4.is_none() && self.v6.is_some() {
            IpFamily::Ipv6
        } else {
            IpFamily::Ipv4
        }
    }

    /// The network of `family` as text (for messages), or None.
    fn network_text(&self, family: IpFamily) -> Option<String> {
        match family {
            IpFamily::Ipv4 => self.v4.map(|n| n.to_string()),
            IpFamily::Ipv6 => self.v6.map(|n| n.to_string()),
        }
    }

    /// The allocatable addresses of `family` as `base + lo..=hi`: IPv4 without the network
    /// and broadcast addresses; IPv6 without the network address (it has no broadcast).
    /// None without a network of that family.
    fn range(&self, family: IpFamily) -> Option<(u128, u32, u32)> {
        match family {
            IpFamily::Ipv4 => self.v4.map(|n| {
                let size = u32::from(n.broadcast()) - u32::from(n.network());
                (
                    u128::from(u32::from(n.network())),
                    1,
                    size.saturating_sub(1),
                )
            }),
            IpFamily::Ipv6 => self.v6.map(|n| {
                let size = u128::from(n.broadcast()) - u128::from(n.network());
                // The config keeps IPv6 service networks at /108 or longer (2^20 addresses);
                // a wider one is clamped, as the API server's allocator does.
                let hi = u32::try_from(size).unwrap_or(u32::MAX);
                (u128::from(n.network()), 1, hi)
            }),
        }
    }
}

/// An IPv4-only cluster with this service network.
impl From<Ipv4Net> for ServiceNetworks {
    fn from(v4: Ipv4Net) -> Self {
        ServiceNetworks {
            v4: Some(v4),
            v6: None,
        }
    }
}

impl From<&ServiceNetworks> for ServiceNetworks {
    fn from(n: &ServiceNetworks) -> Self {
        *n
    }
}

/// Every ClusterIP and NodePort allocation: address or port → owner `<namespace>/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub cluster_ips: BTreeMap<IpAddr, String>,
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
    /// Immutable field changed, an address or port held by another Service, or IP families
    /// the cluster does not have (every broken rule).
    Invalid(Vec<FieldError>),
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

fn invalid(f: impl Into<String>, msg: impl Into<String>) -> AllocError {
    AllocError::Invalid(vec![field(f, msg)])
}

/// Decides a (normalized, validated) Service's IP families, ClusterIPs and NodePorts on a
/// cluster with `nets`, as Kubernetes does on create and update ([`plan_cluster_ips`] for the
/// addresses); NodePorts: absent ones are kept from the stored Service `old` or else allocated
/// at random; a port held by another Service is refused; a missing NodePort of a port number
/// that another protocol of the same port number has is shared.
pub fn plan_service(
    new: Service,
    old: Option<&Service>,
    allocs: &Allocations,
    nets: &ServiceNetworks,
    rng: &mut impl Rng,
) -> Result<ServicePlan, AllocError> {
    let ns = new
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let me = owner(ns, &new.metadata.name);
    let mut svc = new;
    let mut allocations = BTreeSet::new();

    // ClusterIPs
    if svc.spec.type_ == ServiceType::ExternalName {
        svc.spec.cluster_ip = None;
        svc.spec.cluster_ips.clear();
        svc.spec.ip_families.clear();
        svc.spec.ip_family_policy = None;
    } else {
        let old = old.filter(|o| o.spec.type_ != ServiceType::ExternalName);
        for ip in plan_cluster_ips(&mut svc, old, allocs, nets, &me, rng)? {
            allocations.insert(Allocation::ClusterIp(ip));
        }
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
                    return Err(invalid(
                        format!("spec.ports[{i}].nodePort"),
                        format!("{np} is already allocated to {o}"),
                    ));
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

/// A Service's addresses as given: `clusterIPs`, else `clusterIP` (empty: none).
fn given_ips(s: &Service) -> Vec<String> {
    if s.spec.cluster_ips.is_empty() {
        s.spec
            .cluster_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .cloned()
            .collect()
    } else {
        s.spec.cluster_ips.clone()
    }
}

fn is_none_ip(ips: &[String]) -> bool {
    ips.first().is_some_and(|ip| ip == "None")
}

/// A stored Service as the API server would have stored it: a Service written before IP
/// families existed (or on an IPv4-only cluster, where the store leaves them out) gets the
/// families of its addresses and `SingleStack`.
fn defaulted(o: &Service) -> Service {
    let mut o = o.clone();
    let ips = given_ips(&o);
    o.spec.cluster_ips = ips.clone();
    if !ips.is_empty() && !is_none_ip(&ips) {
        if o.spec.ip_families.is_empty() {
            o.spec.ip_families = ips
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .map(IpFamily::of)
                .collect();
        }
        if o.spec.ip_family_policy.is_none() {
            o.spec.ip_family_policy = Some(IpFamilyPolicy::SingleStack);
        }
    }
    o
}

/// Decides `svc`'s `ipFamilyPolicy`, `ipFamilies`, `clusterIP` and `clusterIPs` as the API
/// server does (its `initIPFamilyFields`, `allocClusterIPs` and `updateClusterIPs`), with
/// kubectl-apply semantics for an update: what the manifest leaves out is kept from the stored
/// Service `old`. Returns the addresses the Service holds.
///
/// - Policy: given, else the stored one, else `SingleStack` (`RequireDualStack` for a headless
///   Service without selector).
/// - Families: given, else the stored ones, else those of the given addresses, else the
///   cluster's primary; a non-`SingleStack` policy adds the other family when the cluster has
///   both. `RequireDualStack` on a single-stack cluster, or a family the cluster lacks, is
///   refused (a headless Service without selector may name both anyway).
/// - Addresses: given or kept ones must be free (or ours); missing ones are allocated at
///   random from the family's service network. The primary never changes. Upgrade
///   (`SingleStack` → `PreferDualStack`/`RequireDualStack` on a dual-stack cluster) allocates
///   `clusterIPs[1]`; downgrade (policy `SingleStack`) drops it, and the store releases it.
///   A `PreferDualStack` Service whose fields did not change is left as it is, even when the
///   cluster gained or lost a family.
/// - Headless (`None`) holds no address.
///
/// On an IPv4-only cluster, when neither the manifest nor the stored Service names a family
/// or policy, `ipFamilies` and `ipFamilyPolicy` stay absent (so such Services are stored
/// byte for byte as before IP families existed); everything else is decided the same.
pub fn plan_cluster_ips(
    svc: &mut Service,
    old: Option<&Service>,
    allocs: &Allocations,
    nets: &ServiceNetworks,
    me: &str,
    rng: &mut impl Rng,
) -> Result<Vec<IpAddr>, AllocError> {
    let gave_family_fields =
        !svc.spec.ip_families.is_empty() || svc.spec.ip_family_policy.is_some();
    let old_had_family_fields =
        old.is_some_and(|o| !o.spec.ip_families.is_empty() || o.spec.ip_family_policy.is_some());
    let old = old.map(defaulted);
    let old_ips = old.as_ref().map(given_ips).unwrap_or_default();

    // Immutable addresses.
    let given = given_ips(svc);
    if let (Some(g), Some(o)) = (given.first(), old_ips.first()) {
        if g != o {
            return Err(invalid(
                "spec.clusterIP",
                format!("field is immutable (it is {o})"),
            ));
        }
    }
    if let (Some(g), Some(o)) = (given.get(1), old_ips.get(1)) {
        if g != o {
            return Err(invalid(
                "spec.clusterIPs[1]",
                format!("may not change once set (it is {o})"),
            ));
        }
    }

    // What the manifest leaves out is kept (a `clusterIP` alone keeps `clusterIPs`).
    let mut ips = if !svc.spec.cluster_ips.is_empty() || old_ips.is_empty() {
        given
    } else {
        old_ips.clone()
    };
    let mut families = svc.spec.ip_families.clone();
    let mut policy = svc.spec.ip_family_policy;
    if let Some(o) = &old {
        if families.is_empty() {
            families = o.spec.ip_families.clone();
        }
        if policy.is_none() {
            policy = o.spec.ip_family_policy;
        }
    }

    let held =
        |ips: &[String]| -> Vec<IpAddr> { ips.iter().filter_map(|ip| ip.parse().ok()).collect() };
    let finish = |svc: &mut Service,
                  ips: Vec<String>,
                  families: Vec<IpFamily>,
                  policy: IpFamilyPolicy| {
        svc.spec.cluster_ip = ips.first().cloned();
        svc.spec.cluster_ips = ips;
        let legacy =
            nets.v6.is_none() && nets.v4.is_some() && !gave_family_fields && !old_had_family_fields;
        if legacy {
            svc.spec.ip_families.clear();
            svc.spec.ip_family_policy = None;
        } else {
            svc.spec.ip_families = families;
            svc.spec.ip_family_policy = Some(policy);
        }
    };

    // An unchanged PreferDualStack Service follows no change of the cluster's families.
    if let (Some(o), Some(IpFamilyPolicy::PreferDualStack)) = (&old, policy) {
        if o.spec.type_ == svc.spec.type_
            && o.spec.ip_family_policy == Some(IpFamilyPolicy::PreferDualStack)
            && o.spec.cluster_ips == ips
            && o.spec.ip_families == families
        {
            let addrs = held(&ips);
            finish(svc, ips, families, IpFamilyPolicy::PreferDualStack);
            return Ok(addrs);
        }
    }

    let headless = is_none_ip(&ips);
    let selectorless = svc.spec.selector.as_ref().is_none_or(|s| s.is_empty());
    let policy = policy.unwrap_or(if headless && selectorless {
        IpFamilyPolicy::RequireDualStack
    } else {
        IpFamilyPolicy::SingleStack
    });

    let mut errs = Vec::new();
    let policy_field = "spec.ipFamilyPolicy";
    if let Some(o) = &old {
        if policy == IpFamilyPolicy::SingleStack {
            // Downgrade: with addresses and families as stored, SingleStack is clear intent.
            if ips == o.spec.cluster_ips && ips.len() > 1 {
                ips.truncate(1);
            }
            if families == o.spec.ip_families && families.len() > 1 {
                families.truncate(1);
            }
        } else {
            if ips.len() < o.spec.cluster_ips.len() {
                errs.push(field(
                    policy_field,
                    format!("{policy}: must be 'SingleStack' to release the secondary cluster IP"),
                ));
            }
            if !families.is_empty() && families.len() < o.spec.ip_families.len() {
                errs.push(field(
                    policy_field,
                    format!("{policy}: must be 'SingleStack' to release the secondary IP family"),
                ));
            }
        }
    }
    // The combined fields obey the stand-alone rules (after a downgrade: a cluster that lost
    // a family can still drop that family's address).
    let mut candidate = svc.clone();
    candidate.spec.cluster_ip = ips.first().cloned();
    candidate.spec.cluster_ips = ips.clone();
    candidate.spec.ip_families = families.clone();
    candidate.spec.ip_family_policy = Some(policy);
    let invalid_fields = cluster_ips_errors(&candidate, nets);
    if !invalid_fields.is_empty() {
        return Err(AllocError::Invalid(invalid_fields));
    }
    if policy == IpFamilyPolicy::SingleStack {
        if ips.len() == 2 {
            errs.push(field(
                policy_field,
                "SingleStack: must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified",
            ));
        }
        if families.len() == 2 {
            errs.push(field(
                policy_field,
                "SingleStack: must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified",
            ));
        }
    }
    // Families of the given addresses (validation made them match those given).
    for ip in ips.iter().skip(families.len()) {
        match ip.parse::<IpAddr>() {
            Ok(a) => families.push(IpFamily::of(a)),
            Err(_) => break, // None
        }
    }
    if !errs.is_empty() {
        return Err(AllocError::Invalid(errs));
    }

    // Headless without selector: any families, no address.
    if headless && selectorless {
        if families.is_empty() {
            families.push(nets.primary());
        }
        if families.len() < 2 && policy != IpFamilyPolicy::SingleStack {
            families.push(families[0].other());
        }
        finish(svc, ips, families, policy);
        return Ok(Vec::new());
    }

    if policy == IpFamilyPolicy::RequireDualStack && !nets.is_dual() {
        errs.push(field(
            policy_field,
            "RequireDualStack: this cluster is not configured for dual-stack services",
        ));
    }
    for (i, f) in families.iter().enumerate() {
        if !nets.has(*f) {
            errs.push(field(format!("spec.ipFamilies[{i}]"), not_configured(*f)));
        }
    }
    if !errs.is_empty() {
        return Err(AllocError::Invalid(errs));
    }
    if families.is_empty() {
        families.push(nets.primary());
    }
    if policy != IpFamilyPolicy::SingleStack && families.len() == 1 && nets.is_dual() {
        families.push(families[0].other());
    }

    if headless {
        finish(svc, ips, families, policy);
        return Ok(Vec::new());
    }
    let mut addrs = Vec::new();
    for (i, family) in families.iter().enumerate() {
        let f = if i == 0 {
            "spec.clusterIP".to_string()
        } else {
            format!("spec.clusterIPs[{i}]")
        };
        let ip = match ips.get(i).map(|t| t.parse::<IpAddr>()) {
            Some(Ok(ip)) => ip,
            Some(Err(_)) => return Err(invalid(f, "must be a valid IP address")),
            None => {
                let ip = choose_address(*family, allocs, nets, me, rng).map_err(|taken| {
                    AllocError::Exhausted(field(
                        f.clone(),
                        format!(
                            "no free address left in the service network {} ({taken} allocated)",
                            nets.network_text(*family).unwrap_or_default()
                        ),
                    ))
                })?;
                ips.push(ip.to_string());
                ip
            }
        };
        if let Some(o) = allocs.cluster_ips.get(&ip).filter(|o| **o != me) {
            return Err(invalid(f, format!("{ip} is already allocated to {o}")));
        }
        addrs.push(ip);
    }
    finish(svc, ips, families, policy);
    Ok(addrs)
}

/// A free address of `family` at random (addresses `me` holds count as free); Err(number
/// taken) when none is left.
fn choose_address(
    family: IpFamily,
    allocs: &Allocations,
    nets: &ServiceNetworks,
    me: &str,
    rng: &mut impl Rng,
) -> Result<IpAddr, usize> {
    let Some((base, lo, hi)) = nets.range(family) else {
        return Err(0);
    };
    let used: BTreeSet<u32> = allocs
        .cluster_ips
        .iter()
        .filter(|(_, o)| **o != me)
        .filter_map(|(ip, _)| {
            let v = match (ip, family) {
                (IpAddr::V4(a), IpFamily::Ipv4) => u128::from(u32::from(*a)),
                (IpAddr::V6(a), IpFamily::Ipv6) => u128::from(*a),
                _ => return None,
            };
            v.checked_sub(base).and_then(|o| u32::try_from(o).ok())
        })
        .collect();
    let Some(offset) = choose_free(lo, hi, &used, rng) else {
        return Err(used.range(lo..=hi).count());
    };
    let v = base + u128::from(offset);
    Ok(match family {
        IpFamily::Ipv4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(0))),
        IpFamily::Ipv6 => IpAddr::V6(Ipv6Addr::from(v)),
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
        plan_service(s, old, a, &net().into(), &mut rng())
    }

    #[test]
    fn cluster_ip_allocated_kept_and_immutable() {
        let s = svc("metadata: {name: web}\nspec: {ports: [{port: 80}]}\n");
        let p = plan(s.clone(), None, &Allocations::default()).unwrap();
        let ip: Ipv4Addr = p.service.cluster_ip_addr().unwrap();
        assert!(net().contains(&ip) && ip != net().network() && ip != net().broadcast());
        assert_eq!(p.service.spec.cluster_ips, vec![ip.to_string()]);
        assert_eq!(p.allocations, [Allocation::ClusterIp(ip.into())].into());

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
        assert_eq!(e[0].field, "spec.clusterIP");
        assert_eq!(e[0].msg, format!("field is immutable (it is {ip})"));

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
            e[0].to_string(),
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
                Allocation::ClusterIp(ip.into()),
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
            e[0].to_string(),
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
        assert_eq!(back.allocations, [Allocation::ClusterIp(ip.into())].into());
        assert!(back
            .service
            .spec
            .ports
            .iter()
            .all(|p| p.node_port.is_none()));
        assert_eq!(back.service.spec.type_, ServiceType::ClusterIP);
    }

    // ---- IP families (dual stack) ----

    const V4: &str = "10.96.0.0/24";
    const V6: &str = "fd00:10:96::/120";

    fn cluster(v4: bool, v6: bool) -> ServiceNetworks {
        ServiceNetworks {
            v4: v4.then(|| V4.parse().unwrap()),
            v6: v6.then(|| V6.parse().unwrap()),
        }
    }

    fn plan_on(
        nets: &ServiceNetworks,
        s: Service,
        old: Option<&Service>,
        a: &Allocations,
    ) -> Result<ServicePlan, AllocError> {
        plan_service(s, old, a, nets, &mut rng())
    }

    /// A Service `name` with a selector, one port and `extra` spec fields (YAML flow items).
    fn svc_with(name: &str, extra: &str) -> Service {
        let sep = if extra.is_empty() { "" } else { ", " };
        svc(&format!(
            "metadata: {{name: {name}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: 80}}]{sep}{extra}}}\n"
        ))
    }

    /// The families of the planned ClusterIPs, and the stored ipFamilies and policy.
    fn shape(p: &ServicePlan) -> (Vec<IpFamily>, Vec<IpFamily>, Option<IpFamilyPolicy>) {
        (
            p.service
                .cluster_ip_addrs()
                .into_iter()
                .map(IpFamily::of)
                .collect(),
            p.service.spec.ip_families.clone(),
            p.service.spec.ip_family_policy,
        )
    }

    fn errors(r: Result<ServicePlan, AllocError>) -> Vec<String> {
        match r {
            Err(AllocError::Invalid(e)) => e.iter().map(ToString::to_string).collect(),
            Err(AllocError::Exhausted(e)) => vec![e.to_string()],
            Ok(p) => panic!("planned {:?}", p.service.spec),
        }
    }

    /// Every address is inside its family's network, not the network address; the plan holds
    /// exactly the Service's addresses; clusterIP is clusterIPs[0].
    fn check_addresses(nets: &ServiceNetworks, p: &ServicePlan) {
        let addrs = p.service.cluster_ip_addrs();
        for a in &addrs {
            match a {
                IpAddr::V4(a) => {
                    let n = nets.v4.unwrap();
                    assert!(
                        n.contains(a) && *a != n.network() && *a != n.broadcast(),
                        "{a}"
                    );
                }
                IpAddr::V6(a) => {
                    let n = nets.v6.unwrap();
                    assert!(n.contains(a) && *a != n.network(), "{a}");
                }
            }
        }
        let held: BTreeSet<Allocation> = addrs.iter().map(|a| Allocation::ClusterIp(*a)).collect();
        assert_eq!(p.allocations, held);
        assert_eq!(
            p.service.spec.cluster_ip.as_ref(),
            p.service.spec.cluster_ips.first()
        );
    }

    #[test]
    fn families_defaulted_on_create_for_every_policy_and_cluster() {
        use IpFamily::{Ipv4 as F4, Ipv6 as F6};
        use IpFamilyPolicy::{
            PreferDualStack as Prefer, RequireDualStack as Require, SingleStack as Single,
        };
        let (v4, v6, dual) = (
            cluster(true, false),
            cluster(false, true),
            cluster(true, true),
        );
        type Want = (Vec<IpFamily>, Vec<IpFamily>, Option<IpFamilyPolicy>);
        let table: Vec<(&ServiceNetworks, &str, Want)> = vec![
            // IPv4-only cluster: without family fields nothing new is stored.
            (&v4, "", (vec![F4], vec![], None)),
            (
                &v4,
                "ipFamilyPolicy: SingleStack",
                (vec![F4], vec![F4], Some(Single)),
            ),
            (
                &v4,
                "ipFamilyPolicy: PreferDualStack",
                (vec![F4], vec![F4], Some(Prefer)),
            ),
            (
                &v4,
                "ipFamilies: [IPv4]",
                (vec![F4], vec![F4], Some(Single)),
            ),
            // IPv6-only cluster: the primary family is IPv6.
            (&v6, "", (vec![F6], vec![F6], Some(Single))),
            (
                &v6,
                "ipFamilyPolicy: PreferDualStack",
                (vec![F6], vec![F6], Some(Prefer)),
            ),
            // Dual-stack cluster.
            (&dual, "", (vec![F4], vec![F4], Some(Single))),
            (
                &dual,
                "ipFamilyPolicy: PreferDualStack",
                (vec![F4, F6], vec![F4, F6], Some(Prefer)),
            ),
            (
                &dual,
                "ipFamilyPolicy: RequireDualStack",
                (vec![F4, F6], vec![F4, F6], Some(Require)),
            ),
            (
                &dual,
                "ipFamilies: [IPv6]",
                (vec![F6], vec![F6], Some(Single)),
            ),
            (
                &dual,
                "ipFamilies: [IPv6], ipFamilyPolicy: PreferDualStack",
                (vec![F6, F4], vec![F6, F4], Some(Prefer)),
            ),
            (
                &dual,
                "ipFamilies: [IPv6, IPv4], ipFamilyPolicy: RequireDualStack",
                (vec![F6, F4], vec![F6, F4], Some(Require)),
            ),
            // Families inferred from given addresses.
            (
                &dual,
                "clusterIP: 'fd00:10:96::a'",
                (vec![F6], vec![F6], Some(Single)),
            ),
            (
                &dual,
                "clusterIP: 'fd00:10:96::a', ipFamilyPolicy: PreferDualStack",
                (vec![F6, F4], vec![F6, F4], Some(Prefer)),
            ),
            (
                &dual,
                "clusterIPs: [10.96.0.9, 'fd00:10:96::9'], ipFamilyPolicy: PreferDualStack",
                (vec![F4, F6], vec![F4, F6], Some(Prefer)),
            ),
        ];
        for (nets, extra, want) in table {
            let p = plan_on(nets, svc_with("web", extra), None, &Allocations::default())
                .unwrap_or_else(|e| panic!("{extra}: {e:?}"));
            assert_eq!(shape(&p), want, "{extra} on {nets:?}");
            check_addresses(nets, &p);
        }
        let p = plan_on(
            &dual,
            svc_with(
                "web",
                "clusterIPs: [10.96.0.9, 'fd00:10:96::9'], ipFamilyPolicy: RequireDualStack",
            ),
            None,
            &Allocations::default(),
        )
        .unwrap();
        assert_eq!(
            p.service.spec.cluster_ips,
            vec!["10.96.0.9", "fd00:10:96::9"]
        );
        assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("10.96.0.9"));
    }

    #[test]
    fn families_the_cluster_lacks_are_refused() {
        let (v4, v6, dual) = (
            cluster(true, false),
            cluster(false, true),
            cluster(true, true),
        );
        let none = Allocations::default();
        let no6 = "IPv6 is not configured on this cluster (set EnableIPv6 in the network config for an IPv6ServiceNetwork)";
        let no4 =
            "IPv4 is not configured on this cluster (EnableIPv4 is false in the network config)";
        let table: Vec<(&ServiceNetworks, &str, Vec<String>)> = vec![
            (&v4, "ipFamilyPolicy: RequireDualStack", vec!["spec.ipFamilyPolicy: RequireDualStack: this cluster is not configured for dual-stack services".into()]),
            (&v6, "ipFamilyPolicy: RequireDualStack", vec!["spec.ipFamilyPolicy: RequireDualStack: this cluster is not configured for dual-stack services".into()]),
            (&v4, "ipFamilies: [IPv6]", vec![format!("spec.ipFamilies[0]: {no6}")]),
            (&v6, "ipFamilies: [IPv4]", vec![format!("spec.ipFamilies[0]: {no4}")]),
            (&v4, "ipFamilies: [IPv4, IPv6], ipFamilyPolicy: PreferDualStack", vec![format!("spec.ipFamilies[1]: {no6}")]),
            (&v4, "clusterIP: 'fd00:10:96::a'", vec![format!("spec.clusterIP: fd00:10:96::a: {no6}")]),
            (&v6, "clusterIP: 10.96.0.10", vec![format!("spec.clusterIP: 10.96.0.10: {no4}")]),
            (&dual, "clusterIPs: [10.96.0.9, 'fd00:10:96::9']", vec!["spec.ipFamilyPolicy: SingleStack: must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified".into()]),
            (&dual, "ipFamilies: [IPv4, IPv6], ipFamilyPolicy: SingleStack", vec!["spec.ipFamilyPolicy: SingleStack: must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified".into()]),
            (&dual, "clusterIP: 'fd00:10:97::9'", vec!["spec.clusterIP: fd00:10:97::9 is not within the service network fd00:10:96::/120".into()]),
            (&dual, "clusterIP: 10.96.0.9, ipFamilies: [IPv6]", vec!["spec.clusterIPs[0]: 10.96.0.9: expected an IPv6 value as indicated by `ipFamilies[0]`".into()]),
        ];
        for (nets, extra, want) in table {
            assert_eq!(
                errors(plan_on(nets, svc_with("web", extra), None, &none)),
                want,
                "{extra}"
            );
        }
        // Taken by another Service, in either family.
        let taken = allocs(&[("fd00:10:96::9", "default/other")], &[]);
        assert_eq!(
            errors(plan_on(
                &dual,
                svc_with(
                    "web",
                    "clusterIPs: [10.96.0.9, 'fd00:10:96::9'], ipFamilyPolicy: PreferDualStack"
                ),
                None,
                &taken
            )),
            vec!["spec.clusterIPs[1]: fd00:10:96::9 is already allocated to default/other"]
        );
    }

    #[test]
    fn headless_services_get_families_but_no_address() {
        let (v4, dual) = (cluster(true, false), cluster(true, true));
        let none = Allocations::default();
        let headless = |extra: &str, selector: bool| {
            let sel = if selector { "selector: {app: h}, " } else { "" };
            svc(&format!(
                "metadata: {{name: h}}\nspec: {{{sel}clusterIP: None{extra}}}\n"
            ))
        };
        use IpFamily::{Ipv4 as F4, Ipv6 as F6};
        for (nets, extra, selector, families, policy) in [
            // IPv4-only cluster, nothing asked: stored as before.
            (&v4, "", true, vec![], None),
            (&v4, "", false, vec![], None),
            // A headless Service without selector may name both families anywhere.
            (
                &v4,
                ", ipFamilyPolicy: RequireDualStack",
                false,
                vec![F4, F6],
                Some(IpFamilyPolicy::RequireDualStack),
            ),
            (
                &dual,
                "",
                false,
                vec![F4, F6],
                Some(IpFamilyPolicy::RequireDualStack),
            ),
            (&dual, "", true, vec![F4], Some(IpFamilyPolicy::SingleStack)),
            (
                &dual,
                ", ipFamilyPolicy: PreferDualStack",
                true,
                vec![F4, F6],
                Some(IpFamilyPolicy::PreferDualStack),
            ),
        ] {
            let p = plan_on(nets, headless(extra, selector), None, &none).unwrap();
            assert_eq!(p.service.spec.cluster_ips, vec!["None"], "{extra}");
            assert_eq!(p.service.spec.cluster_ip.as_deref(), Some("None"));
            assert!(p.allocations.is_empty());
            assert_eq!(p.service.spec.ip_families, families, "{extra} {selector}");
            assert_eq!(
                p.service.spec.ip_family_policy, policy,
                "{extra} {selector}"
            );
        }
        // With a selector it follows the cluster like any Service.
        assert_eq!(
            errors(plan_on(&v4, headless(", ipFamilyPolicy: RequireDualStack", true), None, &none)),
            vec!["spec.ipFamilyPolicy: RequireDualStack: this cluster is not configured for dual-stack services"]
        );
        // Stays headless on re-apply, families kept.
        let p = plan_on(&dual, headless("", false), None, &none).unwrap();
        let again = plan_on(&dual, headless("", false), Some(&p.service), &none).unwrap();
        assert_eq!(again.service, p.service);
    }

    /// Allocations as the store would hold them after `p`.
    fn held_by(p: &ServicePlan, owner: &str) -> Allocations {
        Allocations {
            cluster_ips: p
                .allocations
                .iter()
                .filter_map(|a| match a {
                    Allocation::ClusterIp(ip) => Some((*ip, owner.to_string())),
                    Allocation::NodePort(_) => None,
                })
                .collect(),
            node_ports: BTreeMap::new(),
        }
    }

    #[test]
    fn upgrade_and_downgrade() {
        let dual = cluster(true, true);
        let single = plan_on(&dual, svc_with("web", ""), None, &Allocations::default()).unwrap();
        let v4 = single.service.cluster_ip_addr().unwrap();
        let held = held_by(&single, "default/web");

        // Upgrade: the policy alone adds clusterIPs[1]; the primary stays.
        for policy in ["PreferDualStack", "RequireDualStack"] {
            let up = plan_on(
                &dual,
                svc_with("web", &format!("ipFamilyPolicy: {policy}")),
                Some(&single.service),
                &held,
            )
            .unwrap();
            assert_eq!(up.service.cluster_ip_addr(), Some(v4), "{policy}");
            let v6 = up.service.cluster_ipv6_addr().unwrap();
            assert_eq!(
                up.service.spec.cluster_ips,
                vec![v4.to_string(), v6.to_string()]
            );
            assert_eq!(
                up.service.spec.ip_families,
                vec![IpFamily::Ipv4, IpFamily::Ipv6]
            );
            check_addresses(&dual, &up);
        }
        let up = plan_on(
            &dual,
            svc_with("web", "ipFamilyPolicy: RequireDualStack"),
            Some(&single.service),
            &held,
        )
        .unwrap();
        let v6 = up.service.cluster_ipv6_addr().unwrap();
        let held2 = held_by(&up, "default/web");

        // Re-applied as it was (policy kept from the stored Service): unchanged.
        let same = plan_on(&dual, svc_with("web", ""), Some(&up.service), &held2).unwrap();
        assert_eq!(same.service, up.service);
        assert_eq!(same.allocations, up.allocations);

        // Releasing the secondary needs SingleStack.
        assert_eq!(
            errors(plan_on(
                &dual,
                svc_with("web", &format!("clusterIPs: [{v4}]")),
                Some(&up.service),
                &held2
            )),
            vec!["spec.ipFamilyPolicy: RequireDualStack: must be 'SingleStack' to release the secondary cluster IP"]
        );
        assert_eq!(
            errors(plan_on(
                &dual,
                svc_with("web", "ipFamilies: [IPv4], ipFamilyPolicy: PreferDualStack"),
                Some(&up.service),
                &held2
            )),
            vec!["spec.ipFamilyPolicy: PreferDualStack: must be 'SingleStack' to release the secondary IP family"]
        );
        // The secondary never changes either.
        assert_eq!(
            errors(plan_on(
                &dual,
                svc_with("web", &format!("clusterIPs: [{v4}, 'fd00:10:96::77']")),
                Some(&up.service),
                &held2
            )),
            vec![format!(
                "spec.clusterIPs[1]: may not change once set (it is {v6})"
            )]
        );

        // Downgrade: SingleStack drops clusterIPs[1] (given as stored, or left out).
        for extra in [
            "ipFamilyPolicy: SingleStack".to_string(),
            format!("ipFamilyPolicy: SingleStack, clusterIPs: [{v4}, '{v6}']"),
            format!("ipFamilyPolicy: SingleStack, clusterIPs: [{v4}]"),
        ] {
            let down = plan_on(&dual, svc_with("web", &extra), Some(&up.service), &held2).unwrap();
            assert_eq!(
                down.service.spec.cluster_ips,
                vec![v4.to_string()],
                "{extra}"
            );
            assert_eq!(down.service.spec.ip_families, vec![IpFamily::Ipv4]);
            assert_eq!(
                down.allocations,
                [Allocation::ClusterIp(v4.into())].into(),
                "{extra}"
            );
        }

        // A cluster that lost IPv6 can still downgrade (the stored address is dropped).
        let down = plan_on(
            &cluster(true, false),
            svc_with("web", "ipFamilyPolicy: SingleStack"),
            Some(&up.service),
            &held2,
        )
        .unwrap();
        assert_eq!(down.service.spec.cluster_ips, vec![v4.to_string()]);
    }

    #[test]
    fn prefer_dual_stack_does_not_follow_cluster_changes() {
        let (v4, dual) = (cluster(true, false), cluster(true, true));
        let prefer = svc_with("web", "ipFamilyPolicy: PreferDualStack");
        let on_v4 = plan_on(&v4, prefer.clone(), None, &Allocations::default()).unwrap();
        assert_eq!(on_v4.service.spec.ip_families, vec![IpFamily::Ipv4]);
        let held = held_by(&on_v4, "default/web");
        // The cluster becomes dual stack: re-applying the same manifest changes nothing...
        let again = plan_on(&dual, prefer, Some(&on_v4.service), &held).unwrap();
        assert_eq!(again.service, on_v4.service);
        // ... asking for both families (or RequireDualStack) upgrades it.
        let both = svc_with(
            "web",
            "ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4, IPv6]",
        );
        let up = plan_on(&dual, both, Some(&on_v4.service), &held).unwrap();
        assert_eq!(up.service.spec.cluster_ips.len(), 2);
        let req = svc_with("web", "ipFamilyPolicy: RequireDualStack");
        let up = plan_on(&dual, req, Some(&on_v4.service), &held).unwrap();
        assert_eq!(up.service.spec.cluster_ips.len(), 2);
    }

    #[test]
    fn ipv4_only_clusters_store_what_they_stored_before() {
        let v4 = cluster(true, false);
        let p = plan_on(&v4, svc_with("web", ""), None, &Allocations::default()).unwrap();
        let json = crate::parse::to_json(&Object::Service(p.service.clone())).to_string();
        assert!(!json.contains("ipFamil"), "{json}");
        let ip = p.service.spec.cluster_ip.clone().unwrap();
        assert_eq!(p.service.spec.cluster_ips, vec![ip]);

        // A Service stored before IP families existed, re-applied on a dual-stack cluster:
        // same address, families filled in, nothing allocated.
        let dual = cluster(true, true);
        let held = held_by(&p, "default/web");
        let again = plan_on(&dual, svc_with("web", ""), Some(&p.service), &held).unwrap();
        assert_eq!(again.service.spec.cluster_ips, p.service.spec.cluster_ips);
        assert_eq!(again.service.spec.ip_families, vec![IpFamily::Ipv4]);
        assert_eq!(
            again.service.spec.ip_family_policy,
            Some(IpFamilyPolicy::SingleStack)
        );
        assert_eq!(again.allocations, p.allocations);
        // ... and upgraded by asking.
        let up = plan_on(
            &dual,
            svc_with("web", "ipFamilyPolicy: PreferDualStack"),
            Some(&p.service),
            &held,
        )
        .unwrap();
        assert_eq!(
            up.service.spec.cluster_ips[0],
            p.service.spec.cluster_ips[0]
        );
        assert_eq!(up.service.spec.cluster_ips.len(), 2);
    }

    #[test]
    fn ipv6_addresses_allocated_from_the_whole_network_and_exhausted() {
        // A /126: ::1, ::2 and ::3 (IPv6 has no broadcast address; only ::0 is skipped).
        let nets = ServiceNetworks {
            v4: None,
            v6: Some("fd00:10:96::/126".parse().unwrap()),
        };
        let mut a = Allocations::default();
        let mut seen = BTreeSet::new();
        for i in 0..3 {
            let p = plan_on(&nets, svc_with(&format!("s{i}"), ""), None, &a).unwrap();
            let ip = p.service.cluster_ipv6_addr().unwrap();
            a.cluster_ips.insert(ip.into(), format!("default/s{i}"));
            seen.insert(ip.to_string());
        }
        assert_eq!(
            seen,
            ["fd00:10:96::1", "fd00:10:96::2", "fd00:10:96::3"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            errors(plan_on(&nets, svc_with("x", ""), None, &a)),
            vec!["spec.clusterIP: no free address left in the service network fd00:10:96::/126 (3 allocated)"]
        );
        // The secondary family's exhaustion names clusterIPs[1].
        let dual = ServiceNetworks {
            v4: Some(V4.parse().unwrap()),
            ..nets
        };
        assert_eq!(
            errors(plan_on(&dual, svc_with("x", "ipFamilyPolicy: RequireDualStack"), None, &a)),
            vec!["spec.clusterIPs[1]: no free address left in the service network fd00:10:96::/126 (3 allocated)"]
        );
        // IPv4 allocations do not count against IPv6 ones (and the reverse).
        let mut b = allocs(&[("10.96.0.1", "x/y")], &[]);
        b.cluster_ips
            .insert("fd00:10:96::1".parse().unwrap(), "x/z".into());
        let p = plan_on(
            &dual,
            svc_with("why", "ipFamilyPolicy: RequireDualStack"),
            None,
            &b,
        )
        .unwrap();
        check_addresses(&dual, &p);
        assert_ne!(
            p.service.cluster_ip_addr(),
            Some("10.96.0.1".parse().unwrap())
        );
    }

    #[test]
    fn external_name_clears_families() {
        let dual = cluster(true, true);
        let c = svc_with("e", "ipFamilyPolicy: RequireDualStack");
        let with_ips = plan_on(&dual, c.clone(), None, &Allocations::default()).unwrap();
        let to_ext =
            svc("metadata: {name: e}\nspec: {type: ExternalName, externalName: x.example}\n");
        let p = plan_on(
            &dual,
            to_ext,
            Some(&with_ips.service),
            &held_by(&with_ips, "default/e"),
        )
        .unwrap();
        assert!(p.allocations.is_empty());
        assert!(p.service.spec.ip_families.is_empty());
        assert_eq!(p.service.spec.ip_family_policy, None);
        // Back: allocated afresh, both families.
        let back = plan_on(&dual, c, Some(&p.service), &Allocations::default()).unwrap();
        assert_eq!(back.allocations.len(), 2);
    }
}
