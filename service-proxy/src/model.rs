//! The proxy's view of the cluster (pure): from the registry's Services, Endpoints and Pods
//! and the pods' CNI attachment records, the list of service ports this node must serve,
//! each with its endpoints resolved (named target ports per pod, locality per node).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::Ipv4Net;
use registry::PodRecord;
use registry::{
    Endpoints, IntOrString, IpFamily, Pod, Protocol, Service, ServiceType, TrafficPolicy,
};

/// Identifies one port of one Service in one IP family: `namespace/name:portname/PROTO`
/// (IPv4), with `/IPv6` appended for the IPv6 half. A dual-stack Service has one
/// [`ServicePort`] per port and family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    /// The family of the ClusterIP (and of every endpoint and external IP) of this port.
    pub family: IpFamily,
}

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)?;
        if self.family == IpFamily::Ipv6 {
            write!(f, "/IPv6")?;
        }
        Ok(())
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Of the port's family.
    pub ip: IpAddr,
    pub port: u16,
    /// Runs on this node.
    pub local: bool,
}

/// Everything the data path needs for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub id: PortId,
    /// The Service's ClusterIP of `id.family`.
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
    /// The Service's `externalIPs` of `id.family`.
    pub external_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity: Option<u32>,
    /// `externalTrafficPolicy: Local`: NodePort / external IP traffic goes to local endpoints
    /// only, without masquerade (the client address is preserved).
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic goes to local endpoints only.
    pub internal_local: bool,
    /// Sorted, no duplicates.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A ClusterIP-only port (no node port, external IPs, affinity or Local policies) with
    /// `endpoints` (sorted here); callers set the other fields as they need.
    pub fn new(
        id: PortId,
        cluster_ip: impl Into<IpAddr>,
        port: u16,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        let cluster_ip = cluster_ip.into();
        let mut endpoints = endpoints;
        endpoints.sort();
        endpoints.dedup();
        ServicePort {
            protocol: id.protocol,
            id,
            cluster_ip,
            port,
            node_port: None,
            external_ips: Vec::new(),
            affinity: None,
            external_local: false,
            internal_local: false,
            endpoints,
        }
    }

    pub fn local_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.local)
    }

    /// The endpoints ClusterIP traffic may use.
    pub fn cluster_targets(&self) -> Vec<Endpoint> {
        if self.internal_local {
            self.local_endpoints().copied().collect()
        } else {
            self.endpoints.clone()
        }
    }

    /// Served on node addresses or external IPs.
    pub fn is_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty()
    }

    /// The family of this port (of its ClusterIP, endpoints and external IPs).
    pub fn family(&self) -> IpFamily {
        self.id.family
    }
}

/// (namespace, name).
pub type Key = (String, String);

/// What the proxy knows, as plain data, each kind keyed by (namespace, name).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: BTreeMap<Key, Service>,
    pub endpoints: BTreeMap<Key, Endpoints>,
    pub pods: BTreeMap<Key, Pod>,
    /// Attachment records.
    pub records: BTreeMap<Key, PodRecord>,
}

/// Attached pods (Pod object and record) by (namespace, label key, label value).
type LabelIndex<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<(&'a Pod, &'a PodRecord)>>;

impl Snapshot {
    /// The label index, so that a selector is matched against the pods carrying one of its
    /// labels rather than against every pod.
    fn label_index(&self) -> LabelIndex<'_> {
        let mut index: LabelIndex<'_> = HashMap::new();
        for (key, rec) in &self.records {
            let Some(pod) = self.pods.get(key) else {
                continue;
            };
            for (k, v) in &pod.metadata.labels {
                index
                    .entry((key.0.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push((pod, rec));
            }
        }
        index
    }
}

/// This node, for locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's pod subnet: an Endpoints address inside it is local.
    pub subnet: Option<Ipv4Net>,
}

/// The service ports this node serves, keyed by id. Headless and ExternalName Services and
/// Services without a usable ClusterIP are left out.
pub fn service_ports(snap: &Snapshot, node: &NodeInfo) -> BTreeMap<PortId, ServicePort> {
    let index = snap.label_index();
    let mut out = BTreeMap::new();
    for ((ns, name), svc) in &snap.services {
        for sp in ports_of_service(snap, Some(&index), ns, name, svc, node) {
            out.insert(sp.id.clone(), sp);
        }
    }
    out
}

/// The ports of one Service. Without `index`, candidate pods are found by scanning the
/// Service's namespace (cheaper than an index when few Services are recomputed).
fn ports_of_service(
    snap: &Snapshot,
    index: Option<&LabelIndex<'_>>,
    ns: &str,
    name: &str,
    svc: &Service,
    node: &NodeInfo,
) -> Vec<ServicePort> {
    if svc.is_headless() || svc.spec.type_ == ServiceType::ExternalName {
        return Vec::new();
    }
    // One set of ports per family with a ClusterIP: IPv4 first (as before dual stack), then
    // IPv6.
    let mut out = Vec::new();
    let v4 = svc.cluster_ip_addr().map(IpAddr::from);
    let v6 = svc.cluster_ipv6_addr().map(IpAddr::from);
    for cluster_ip in [v4, v6].into_iter().flatten() {
        out.extend(ports_of_family(
            snap, index, ns, name, svc, node, cluster_ip,
        ));
    }
    out
}

/// The ports of one Service in the family of `cluster_ip`.
fn ports_of_family(
    snap: &Snapshot,
    index: Option<&LabelIndex<'_>>,
    ns: &str,
    name: &str,
    svc: &Service,
    node: &NodeInfo,
    cluster_ip: IpAddr,
) -> Vec<ServicePort> {
    let family = IpFamily::of(cluster_ip);
    let external_ips: Vec<IpAddr> = svc
        .spec
        .external_ips
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .filter(|a| IpFamily::of(*a) == family)
        .collect();
    let node_port_type = matches!(
        svc.spec.type_,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let selector = svc.spec.selector.as_ref().filter(|s| !s.is_empty());
    let mut out = Vec::new();
    for sp in &svc.spec.ports {
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        if port == 0 {
            continue;
        }
        let id = PortId {
            namespace: ns.to_string(),
            name: name.to_string(),
            port_name: sp.name().to_string(),
            protocol: sp.protocol,
            family,
        };
        let endpoints = match selector {
            Some(selector) => selected_endpoints(snap, index, ns, selector, sp, port, node, family),
            None => listed_endpoints(
                snap.endpoints.get(&(ns.to_string(), name.to_string())),
                sp,
                node,
                family,
            ),
        };
        let node_port = if node_port_type {
            sp.node_port.and_then(|p| u16::try_from(p).ok())
        } else {
            None
        };
        let external = node_port.is_some() || !external_ips.is_empty();
        out.push(ServicePort {
            id,
            cluster_ip,
            port,
            protocol: sp.protocol,
            node_port,
            external_ips: external_ips.clone(),
            affinity: svc.affinity_timeout(),
            external_local: external
                && svc.spec.external_traffic_policy == Some(TrafficPolicy::Local),
            internal_local: svc.spec.internal_traffic_policy == Some(TrafficPolicy::Local),
            endpoints,
        });
    }
    out
}

/// Endpoints of a selector Service's port: the attached pods of namespace `ns` carrying every
/// selector label, at the target port resolved per pod, each at its address of `family`
/// (IPv4: the record's `IP`; IPv6: its first IPv6 address in `IPs`; a pod without one is no
/// endpoint of that family).
#[allow(clippy::too_many_arguments)]
fn selected_endpoints(
    snap: &Snapshot,
    index: Option<&LabelIndex<'_>>,
    ns: &str,
    selector: &registry::Labels,
    sp: &registry::ServicePort,
    port: u16,
    node: &NodeInfo,
    family: IpFamily,
) -> Vec<Endpoint> {
    // Candidates: the pods carrying the selector's least common label, or every attached
    // pod of the namespace.
    let candidates: Vec<(&Pod, &PodRecord)> = match index {
        Some(index) => selector
            .iter()
            .map(|(k, v)| {
                index
                    .get(&(ns, k.as_str(), v.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default()
            .to_vec(),
        None => snap
            .records
            .range((ns.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
            .filter_map(|(k, rec)| Some((snap.pods.get(k)?, rec)))
            .collect(),
    };
    let mut eps = BTreeSet::new();
    for (pod, rec) in candidates {
        if !selector
            .iter()
            .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
        {
            continue;
        }
        let target = match &sp.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod.named_port(name, sp.protocol),
        };
        let ip = match family {
            IpFamily::Ipv4 => rec.ipv4().map(IpAddr::V4),
            IpFamily::Ipv6 => rec.ipv6().map(IpAddr::V6),
        };
        let Some(ip) = ip else {
            continue;
        };
        if let Some(target) = target.filter(|p| *p != 0) {
            eps.insert(Endpoint {
                ip,
                port: target,
                local: rec.node == node.name,
            });
        }
    }
    eps.into_iter().collect()
}

/// Endpoints of a Service port without selector, from its Endpoints object: every ready
/// address of `family` of the subsets whose port has the Service port's name and protocol.
/// An address without `nodeName` is local when it lies in this node's subnet (IPv4; an IPv6
/// address needs `nodeName` to be local).
fn listed_endpoints(
    endpoints: Option<&Endpoints>,
    sp: &registry::ServicePort,
    node: &NodeInfo,
    family: IpFamily,
) -> Vec<Endpoint> {
    let mut eps = BTreeSet::new();
    for subset in endpoints.map(|e| e.subsets.as_slice()).unwrap_or_default() {
        let Some(ep_port) = subset
            .ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == sp.name() && p.protocol == sp.protocol)
        else {
            continue;
        };
        let Ok(target) = u16::try_from(ep_port.port) else {
            continue;
        };
        for a in &subset.addresses {
            let Some(ip) = a.addr().filter(|ip| IpFamily::of(*ip) == family) else {
                continue;
            };
            let local = match (&a.node_name, ip) {
                (Some(n), _) => *n == node.name,
                (None, IpAddr::V4(ip)) => node.subnet.is_some_and(|s| s.contains(&ip)),
                (None, IpAddr::V6(_)) => false,
            };
            eps.insert(Endpoint {
                ip,
                port: target,
                local,
            });
        }
    }
    eps.into_iter().collect()
}

/// What changed in a [`Snapshot`] since the last [`PortsCache::update`].
#[derive(Debug, Clone, Default)]
pub struct Touched {
    /// Services (or their Endpoints objects) written or deleted.
    pub services: BTreeSet<Key>,
    /// Label sets of pods that changed (old and new labels), per namespace: the Services
    /// whose selector any of them satisfies are recomputed.
    pub pod_labels: Vec<(String, registry::Labels)>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.pod_labels.is_empty()
    }
}

/// The service ports of every Service, kept per Service so that a change recomputes only the
/// Services it can affect (a 10k-Service model takes tens of ms to rebuild; one Service, µs).
#[derive(Debug, Clone, Default)]
pub struct PortsCache {
    by_service: BTreeMap<Key, Vec<PortId>>,
    all: BTreeMap<PortId, ServicePort>,
}

impl PortsCache {
    /// Recomputes everything.
    pub fn rebuild(&mut self, snap: &Snapshot, node: &NodeInfo) {
        let index = snap.label_index();
        self.by_service.clear();
        self.all.clear();
        for ((ns, name), svc) in &snap.services {
            let ports = ports_of_service(snap, Some(&index), ns, name, svc, node);
            self.by_service.insert(
                (ns.clone(), name.clone()),
                ports.iter().map(|p| p.id.clone()).collect(),
            );
            for p in ports {
                self.all.insert(p.id.clone(), p);
            }
        }
    }

    /// Recomputes the Services `touched` can affect.
    pub fn update(&mut self, snap: &Snapshot, node: &NodeInfo, touched: &Touched) {
        let mut affected: BTreeSet<Key> = touched.services.clone();
        if !touched.pod_labels.is_empty() {
            for (key, svc) in &snap.services {
                let Some(selector) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else {
                    continue;
                };
                let hit = touched.pod_labels.iter().any(|(ns, labels)| {
                    *ns == key.0 && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                });
                if hit {
                    affected.insert(key.clone());
                }
            }
        }
        for key in affected {
            for id in self.by_service.remove(&key).unwrap_or_default() {
                self.all.remove(&id);
            }
            let Some(svc) = snap.services.get(&key) else {
                continue;
            };
            let ports = ports_of_service(snap, None, &key.0, &key.1, svc, node);
            self.by_service
                .insert(key, ports.iter().map(|p| p.id.clone()).collect());
            for p in ports {
                self.all.insert(p.id.clone(), p);
            }
        }
    }

    pub fn ports(&self) -> &BTreeMap<PortId, ServicePort> {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry::{
        Container, ContainerPort, EndpointAddress, EndpointPort, EndpointSubset, ObjectMeta,
        PodSpec, ServiceSpec,
    };
    use std::net::Ipv4Addr;

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: Some(ns.into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn pod(name: &str, app: &str, http_port: i64) -> Pod {
        Pod {
            metadata: meta("default", name, &[("app", app)]),
            spec: PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: None,
                    ports: vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: http_port,
                        protocol: Protocol::Tcp,
                    }],
                }],
                node_name: None,
                hostname: None,
                subdomain: None,
            },
        }
    }

    fn record(ip: [u8; 4], node: &str) -> PodRecord {
        PodRecord {
            ip: Ipv4Addr::from(ip).into(),
            ips: vec![Ipv4Addr::from(ip).into()],
            node: node.into(),
            node_ip: Ipv4Addr::new(172, 30, 0, 11).into(),
            subnet: "10.5.1.0/24".parse().expect("subnet"),
            container_id: "c".into(),
            ifname: "eth0".into(),
        }
    }

    fn web(target: Option<IntOrString>) -> Service {
        Service {
            metadata: meta("default", "web", &[]),
            spec: ServiceSpec {
                type_: ServiceType::NodePort,
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: vec![registry::ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: target,
                    node_port: Some(30080),
                }],
                cluster_ip: Some("10.96.0.10".into()),
                external_traffic_policy: Some(TrafficPolicy::Local),
                ..Default::default()
            },
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node1".into(),
            subnet: Some("10.5.1.0/24".parse().expect("subnet")),
        }
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_string(), name.to_string())
    }

    fn snap(services: Vec<Service>) -> Snapshot {
        let mut s = Snapshot {
            services: services
                .into_iter()
                .map(|svc| (key("default", &svc.metadata.name), svc))
                .collect(),
            ..Default::default()
        };
        for p in [
            pod("a", "web", 8080),
            pod("b", "web", 9090),
            pod("c", "db", 5432),
        ] {
            s.pods.insert(key("default", &p.metadata.name), p);
        }
        s.records.insert(
            ("default".into(), "a".into()),
            record([10, 5, 1, 2], "node1"),
        );
        s.records.insert(
            ("default".into(), "b".into()),
            record([10, 5, 2, 2], "node2"),
        );
        s.records.insert(
            ("default".into(), "c".into()),
            record([10, 5, 2, 3], "node2"),
        );
        s
    }

    #[test]
    fn selector_picks_attached_matching_pods_and_resolves_named_ports_per_pod() {
        let ports = service_ports(
            &snap(vec![web(Some(IntOrString::String("http".into())))]),
            &node(),
        );
        let sp = ports.values().next().expect("one port");
        assert_eq!(sp.id.to_string(), "default/web:http/TCP");
        assert_eq!(sp.node_port, Some(30080));
        assert!(sp.external_local);
        assert_eq!(
            sp.endpoints,
            vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 5, 1, 2).into(),
                    port: 8080,
                    local: true
                },
                Endpoint {
                    ip: Ipv4Addr::new(10, 5, 2, 2).into(),
                    port: 9090,
                    local: false
                },
            ]
        );
    }

    #[test]
    fn target_port_defaults_to_port_and_unattached_pods_are_not_endpoints() {
        let mut s = snap(vec![web(None)]);
        s.records.remove(&("default".to_string(), "b".to_string()));
        let ports = service_ports(&s, &node());
        let sp = ports.values().next().expect("one port");
        assert_eq!(
            sp.endpoints,
            vec![Endpoint {
                ip: Ipv4Addr::new(10, 5, 1, 2).into(),
                port: 80,
                local: true
            }]
        );
    }

    #[test]
    fn pods_in_other_namespaces_do_not_match() {
        let mut s = snap(vec![web(None)]);
        let mut moved = s.pods.remove(&key("default", "a")).expect("pod a");
        moved.metadata.namespace = Some("other".into());
        s.pods.insert(key("other", "a"), moved);
        s.records.remove(&key("default", "a"));
        s.records
            .insert(key("other", "a"), record([10, 5, 1, 9], "node1"));
        let ports = service_ports(&s, &node());
        let sp = ports.values().next().expect("one port");
        assert_eq!(sp.endpoints.len(), 1);
        assert_eq!(sp.endpoints[0].ip, IpAddr::from(Ipv4Addr::new(10, 5, 2, 2)));
    }

    #[test]
    fn headless_and_external_name_are_ignored() {
        let mut headless = web(None);
        headless.spec.cluster_ip = Some("None".into());
        let mut ext = web(None);
        ext.metadata.name = "ext".into();
        ext.spec.type_ = ServiceType::ExternalName;
        assert!(service_ports(&snap(vec![headless, ext]), &node()).is_empty());
    }

    #[test]
    fn endpoints_object_feeds_a_service_without_selector() {
        let mut svc = web(None);
        svc.spec.selector = None;
        svc.spec.type_ = ServiceType::ClusterIP;
        svc.spec.ports[0].node_port = None;
        let mut s = snap(vec![svc]);
        s.endpoints.insert(
            key("default", "web"),
            Endpoints {
                metadata: meta("default", "web", &[]),
                subsets: vec![EndpointSubset {
                    addresses: vec![
                        EndpointAddress {
                            ip: "10.5.1.7".into(),
                            ..Default::default()
                        },
                        EndpointAddress {
                            ip: "192.168.9.9".into(),
                            node_name: Some("node1".into()),
                            ..Default::default()
                        },
                        // An IPv6 endpoint (valid in an Endpoints object) is not one of an
                        // IPv4 ClusterIP's.
                        EndpointAddress {
                            ip: "fd00::7".into(),
                            ..Default::default()
                        },
                    ],
                    not_ready_addresses: vec![EndpointAddress {
                        ip: "10.5.1.8".into(),
                        ..Default::default()
                    }],
                    ports: vec![
                        EndpointPort {
                            name: Some("http".into()),
                            port: 8000,
                            protocol: Protocol::Tcp,
                        },
                        EndpointPort {
                            name: Some("other".into()),
                            port: 1,
                            protocol: Protocol::Tcp,
                        },
                    ],
                }],
            },
        );
        let ports = service_ports(&s, &node());
        let sp = ports.values().next().expect("one port");
        assert_eq!(sp.node_port, None);
        assert!(
            !sp.external_local,
            "Local only matters for external traffic"
        );
        assert_eq!(
            sp.endpoints,
            vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 5, 1, 7).into(),
                    port: 8000,
                    local: true
                },
                Endpoint {
                    ip: Ipv4Addr::new(192, 168, 9, 9).into(),
                    port: 8000,
                    local: true
                },
            ]
        );
    }

    #[test]
    fn internal_local_limits_cluster_targets() {
        let mut svc = web(None);
        svc.spec.internal_traffic_policy = Some(TrafficPolicy::Local);
        let ports = service_ports(&snap(vec![svc]), &node());
        let sp = ports.values().next().expect("one port");
        assert_eq!(sp.endpoints.len(), 2);
        assert_eq!(sp.cluster_targets().len(), 1);
        assert!(sp.cluster_targets()[0].local);
    }

    #[test]
    fn incremental_updates_match_a_full_rebuild() {
        let mut s = snap(vec![web(None)]);
        let mut other = web(None);
        other.metadata.name = "db".into();
        other.spec.selector = Some([("app".to_string(), "db".to_string())].into());
        s.services.insert(key("default", "db"), other);
        let mut cache = PortsCache::default();
        cache.rebuild(&s, &node());
        assert_eq!(cache.ports(), &service_ports(&s, &node()));
        // A pod changes its label from web to db: both Services are affected.
        let old = s.pods[&key("default", "a")].metadata.labels.clone();
        s.pods
            .get_mut(&key("default", "a"))
            .expect("a")
            .metadata
            .labels = [("app".to_string(), "db".to_string())].into();
        let new = s.pods[&key("default", "a")].metadata.labels.clone();
        let touched = Touched {
            services: BTreeSet::new(),
            pod_labels: vec![("default".into(), old), ("default".into(), new)],
        };
        cache.update(&s, &node(), &touched);
        assert_eq!(cache.ports(), &service_ports(&s, &node()));
        // A Service goes.
        s.services.remove(&key("default", "db"));
        let touched = Touched {
            services: [key("default", "db")].into(),
            pod_labels: vec![],
        };
        cache.update(&s, &node(), &touched);
        assert_eq!(cache.ports(), &service_ports(&s, &node()));
        assert_eq!(cache.ports().len(), 1);
    }

    #[test]
    fn affinity_defaults_to_three_hours() {
        let mut svc = web(None);
        svc.spec.session_affinity = registry::SessionAffinity::ClientIP;
        let ports = service_ports(&snap(vec![svc]), &node());
        assert_eq!(ports.values().next().expect("port").affinity, Some(10800));
    }

    /// Pod a on node1 gets fd10:0:0:11::2 too; b stays IPv4-only.
    fn dual_snap(svc: Service) -> Snapshot {
        let mut s = snap(vec![svc]);
        let a = s.records.get_mut(&key("default", "a")).expect("a");
        a.ips.push("fd10:0:0:11::2".parse().expect("ip"));
        s
    }

    fn dual(mut svc: Service) -> Service {
        svc.spec.cluster_ips = vec!["10.96.0.10".into(), "fd00:10:96::a".into()];
        svc.spec.external_ips = vec!["192.0.2.1".into(), "2001:db8::1".into()];
        svc
    }

    #[test]
    fn dual_stack_service_has_a_port_per_family_with_that_familys_endpoints() {
        let s = dual_snap(dual(web(Some(IntOrString::String("http".into())))));
        let ports = service_ports(&s, &node());
        let ids: Vec<String> = ports.keys().map(|id| id.to_string()).collect();
        assert_eq!(ids, ["default/web:http/TCP", "default/web:http/TCP/IPv6"]);
        let v4 = &ports.values().next().expect("v4");
        let v6 = &ports.values().nth(1).expect("v6");
        assert_eq!(v4.cluster_ip, IpAddr::from(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(v4.endpoints.len(), 2);
        assert_eq!(
            v4.external_ips,
            vec![IpAddr::from(Ipv4Addr::new(192, 0, 2, 1))]
        );
        assert_eq!(v6.family(), IpFamily::Ipv6);
        assert_eq!(v6.cluster_ip.to_string(), "fd00:10:96::a");
        assert_eq!(v6.external_ips.len(), 1);
        assert_eq!(v6.external_ips[0].to_string(), "2001:db8::1");
        // b has no IPv6 address: only a is an endpoint of the IPv6 port.
        assert_eq!(
            v6.endpoints,
            vec![Endpoint {
                ip: "fd10:0:0:11::2".parse().expect("ip"),
                port: 8080,
                local: true
            }]
        );
        assert_eq!((v6.node_port, v6.external_local), (Some(30080), true));
        // The incremental cache agrees.
        let mut cache = PortsCache::default();
        cache.rebuild(&s, &node());
        assert_eq!(cache.ports(), &ports);
    }

    #[test]
    fn ipv6_only_service_and_endpoints_object_addresses_of_each_family() {
        let mut svc = web(None);
        svc.spec.selector = None;
        svc.spec.cluster_ip = Some("fd00:10:96::a".into());
        svc.spec.cluster_ips = vec!["fd00:10:96::a".into()];
        let mut s = snap(vec![svc]);
        s.endpoints.insert(
            key("default", "web"),
            Endpoints {
                metadata: meta("default", "web", &[]),
                subsets: vec![EndpointSubset {
                    addresses: vec![
                        EndpointAddress {
                            ip: "10.5.1.7".into(),
                            ..Default::default()
                        },
                        EndpointAddress {
                            ip: "fd10:0:0:11::7".into(),
                            node_name: Some("node1".into()),
                            ..Default::default()
                        },
                        EndpointAddress {
                            ip: "fd10:0:0:12::7".into(),
                            ..Default::default()
                        },
                    ],
                    not_ready_addresses: vec![],
                    ports: vec![EndpointPort {
                        name: Some("http".into()),
                        port: 8000,
                        protocol: Protocol::Tcp,
                    }],
                }],
            },
        );
        let ports = service_ports(&s, &node());
        assert_eq!(ports.len(), 1, "no IPv4 ClusterIP: no IPv4 port");
        let sp = ports.values().next().expect("port");
        assert_eq!(sp.id.family, IpFamily::Ipv6);
        let eps: Vec<(String, bool)> = sp
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.local))
            .collect();
        assert_eq!(
            eps,
            [
                ("fd10:0:0:11::7".to_string(), true),
                ("fd10:0:0:12::7".to_string(), false)
            ]
        );
    }
}
