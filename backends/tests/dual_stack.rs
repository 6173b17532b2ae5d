//! The vxlan and host-gw backends in dual stack against the real kernel: two namespace nodes
//! (test-support's testbed: a hub bridge, `eth0` at 172.30.0.1x/24 and fd00:210::b/64 and
//! ::c, nodad), each running the backend through `RtNetlink` on a thread inside its namespace, each
//! fed the other's lease as flannel writes it. Each node holds its subnets' `.1` / `::1` on `lo`
//! (no `dummy` links here); IPv4 and IPv6 pings between them, at the largest size the pod MTU
//! allows with DF set, prove the data plane; the kernel state is read back as `ip`/`bridge`
//! print it. A second reconcile and a second backend instance (a restart) make no kernel
//! change at all (every mutating call is recorded). Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backends::hostgw::HostGwBackend;
use backends::netlink::{
    Family, FdbEntry, Ipv6Conf, Link, Mac, Neighbour, Netlink, NetlinkError, Route, VxlanParams,
};
use backends::netlink_rt::RtNetlink;
use backends::vxlan::{VxlanBackend, VxlanConfig};
use backends::{Backend, BackendContext, ExtAddr, ExternalInterface};
use ipnet::IpNet;
use subnet_lease::manager::Event;
use subnet_lease::{Lease, LeaseAttrs, SubnetKey};
use test_support::{in_netns, require_root_with, wait_for, Testbed};

/// `RtNetlink` that records every mutating call (to prove "no change" on adoption).
#[derive(Debug)]
struct Recorder {
    inner: RtNetlink,
    calls: Mutex<Vec<String>>,
}

impl Recorder {
    fn note(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Netlink for Recorder {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        self.inner.link_by_name(name).await
    }
    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: Mac,
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        self.note(format!("create_vxlan {name}"));
        self.inner.create_vxlan(name, params, mac, mtu).await
    }
    async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.note(format!("delete_link {index}"));
        self.inner.delete_link(index).await
    }
    async fn set_link_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.note(format!("set_link {index} mtu {mtu} up"));
        self.inner.set_link_mtu_up(index, mtu).await
    }
    async fn addresses(&self, index: u32, family: Family) -> Result<Vec<IpNet>, NetlinkError> {
        self.inner.addresses(index, family).await
    }
    async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.note(format!("add_address {index} {addr}"));
        self.inner.add_address(index, addr).await
    }
    async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.note(format!("del_address {index} {addr}"));
        self.inner.del_address(index, addr).await
    }
    async fn neighbours(&self, index: u32, family: Family) -> Result<Vec<Neighbour>, NetlinkError> {
        self.inner.neighbours(index, family).await
    }
    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError> {
        self.note(format!("set_neighbour {index} {}", n.ip));
        self.inner.set_neighbour(index, n).await
    }
    async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        self.note(format!("del_neighbour {index} {ip}"));
        self.inner.del_neighbour(index, ip).await
    }
    async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        self.inner.fdb(index).await
    }
    async fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        self.note(format!("set_fdb {index} {}", e.dst));
        self.inner.set_fdb(index, e).await
    }
    async fn del_fdb(&self, index: u32, e: FdbEntry) -> Result<(), NetlinkError> {
        self.note(format!("del_fdb {index} {}", e.dst));
        self.inner.del_fdb(index, e).await
    }
    async fn routes(&self, family: Family) -> Result<Vec<Route>, NetlinkError> {
        self.inner.routes(family).await
    }
    async fn set_route(&self, r: Route) -> Result<(), NetlinkError> {
        self.note(format!("set_route {}", r.dst));
        self.inner.set_route(r).await
    }
    async fn del_route(&self, r: Route) -> Result<(), NetlinkError> {
        self.note(format!("del_route {}", r.dst));
        self.inner.del_route(r).await
    }
    async fn set_ipv6_conf(
        &self,
        device: &str,
        key: Ipv6Conf,
        value: u32,
    ) -> Result<(), NetlinkError> {
        self.note(format!("set_ipv6_conf {device} {} {value}", key.key()));
        self.inner.set_ipv6_conf(device, key, value).await
    }
    async fn ipv6_conf(&self, device: &str, key: Ipv6Conf) -> Result<u32, NetlinkError> {
        self.inner.ipv6_conf(device, key).await
    }
}

/// Runs `f` with a fresh recording `RtNetlink` on a thread inside namespace `ns` (its own
/// current-thread runtime; the backend and connection go when it returns, the kernel state
/// stays).
fn in_node<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Arc<Recorder>) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let nl = Arc::new(Recorder {
                inner: RtNetlink::connect().unwrap(),
                calls: Mutex::new(Vec::new()),
            });
            tokio::time::timeout(Duration::from_secs(60), f(nl))
                .await
                .expect("node step within 60 s")
        })
    })
    .unwrap()
}

/// One node of the test: its namespace, underlay addresses and lease key.
#[derive(Debug, Clone)]
struct Node {
    ns: String,
    /// 1 or 2: underlay 172.30.0.(10+i), subnets 10.5.i.0/24 and fd10:0:0:i::/64.
    i: u8,
    /// The underlay IPv6 address the testbed gave it.
    ip6: Ipv6Addr,
    /// IPv4 enabled (dual stack), else IPv6 only.
    ipv4: bool,
}

impl Node {
    fn ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, 0, 10 + self.i)
    }

    fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    fn key(&self) -> SubnetKey {
        let v4 = if self.ipv4 {
            format!("10.5.{}.0-24", self.i)
        } else {
            "0.0.0.0-0".to_string()
        };
        SubnetKey::parse(&format!("{v4}&fd10:0:0:{}::-64", self.i)).unwrap()
    }

    /// The subnets' first addresses, held on `lo` (a pod stand-in).
    fn host4(&self) -> String {
        format!("10.5.{}.1", self.i)
    }

    fn host6(&self) -> String {
        format!("fd10:0:0:{}::1", self.i)
    }

    async fn ctx(&self, nl: Arc<Recorder>) -> BackendContext {
        let eth0 = nl.link_by_name("eth0").await.unwrap().unwrap();
        BackendContext {
            ext: ExternalInterface {
                name: "eth0".into(),
                index: eth0.index,
                mtu: eth0.mtu,
                v4: self.ipv4.then(|| ExtAddr {
                    iface_ip: self.ip4(),
                    prefix_len: 24,
                    public_ip: self.ip4(),
                }),
                v6: Some(ExtAddr {
                    iface_ip: self.ip6(),
                    prefix_len: 64,
                    public_ip: self.ip6(),
                }),
            },
            network: self.ipv4.then(|| "10.5.0.0/16".parse().unwrap()),
            network6: Some("fd10::/48".parse().unwrap()),
            node_id: format!("node-{}", self.i),
            netlink: nl,
        }
    }

    /// The lease flannel would publish for this node.
    fn lease(
        &self,
        ty: &str,
        data: Option<serde_json::Value>,
        data6: Option<serde_json::Value>,
    ) -> Lease {
        let public = if self.ipv4 {
            self.ip4()
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let mut attrs = LeaseAttrs::new(public, ty);
        attrs.public_ipv6 = Some(self.ip6());
        attrs.backend_data = data;
        attrs.backend_v6_data = data6;
        Lease {
            key: self.key(),
            attrs,
            etcd_lease: 1,
            mod_revision: 1,
        }
    }
}

/// Two dual-stack nodes with their subnets' first addresses on `lo`.
fn testbed() -> Option<(Testbed, [Node; 2])> {
    if !require_root_with(&["ip", "bridge", "ping"]) {
        return None;
    }
    let mut tb = Testbed::new(2).unwrap();
    let v6 = tb.add_ipv6_underlay().unwrap();
    let nodes = [1u8, 2].map(|i| Node {
        ns: tb.nodes[usize::from(i) - 1].ns.clone(),
        i,
        ip6: v6[usize::from(i) - 1].parse().unwrap(),
        ipv4: true,
    });
    for n in &nodes {
        let a4 = format!("{}/32", n.host4());
        let a6 = format!("{}/128", n.host6());
        tb.exec(&n.ns, &["ip", "addr", "add", &a4, "dev", "lo"])
            .unwrap();
        tb.exec(
            &n.ns,
            &["ip", "-6", "addr", "add", &a6, "dev", "lo", "nodad"],
        )
        .unwrap();
    }
    Some((tb, nodes))
}

/// `from` pings `to`'s address of the family from its own, with `size` bytes of payload and
/// DF set (so a packet the path cannot carry whole fails).
fn ping(tb: &Testbed, from: &Node, to: &Node, v6: bool, size: u32) -> Result<(), String> {
    let (src, dst) = if v6 {
        (from.host6(), to.host6())
    } else {
        (from.host4(), to.host4())
    };
    let fam = if v6 { "-6" } else { "-4" };
    let size = size.to_string();
    let args = [
        "ping", fam, "-c", "1", "-W", "1", "-M", "do", "-s", &size, "-I", &src, &dst,
    ];
    wait_for(Duration::from_secs(10), || {
        let (ok, _) = tb.exec_status(&from.ns, &args, Duration::from_secs(5));
        ok.then_some(())
    })
    .ok_or_else(|| {
        let (_, out) = tb.exec_status(&from.ns, &args, Duration::from_secs(5));
        format!("{} -> {dst} ({size} bytes): {out}", from.ns)
    })
}

fn show(tb: &Testbed, n: &Node, args: &[&str]) -> String {
    tb.exec(&n.ns, args).unwrap()
}

/// Largest ICMP payloads with DF that fit a pod MTU of `mtu`: IPv4 (20 + 8), IPv6 (40 + 8).
fn payloads(mtu: u32) -> (u32, u32) {
    (mtu - 28, mtu - 48)
}

#[test]
fn vxlan_dual_stack_between_two_namespaces() {
    let Some((tb, nodes)) = testbed() else {
        return;
    };
    let (vcfg, _) = VxlanConfig::parse(&serde_json::Map::new()).unwrap();

    // Start: each node makes its devices; their lease data is what the peer gets.
    let mut data = Vec::new();
    for n in &nodes {
        let (m, c) = (n.clone(), vcfg.clone());
        data.push(in_node(&m.ns.clone(), move |nl| async move {
            let b = VxlanBackend::new(c, &m.ctx(nl).await).await.unwrap();
            assert_eq!(b.mtu(), 1430, "pods: the IPv6 device's MTU");
            (b.backend_data(), b.backend_v6_data())
        }));
    }
    assert_ne!(data[0].0, data[0].1, "two MACs");
    let leases: Vec<Lease> = nodes
        .iter()
        .zip(&data)
        .map(|(n, (d4, d6))| n.lease("vxlan", d4.clone(), d6.clone()))
        .collect();

    // Each node: our lease, the peer's; the first reconcile programs, the second changes
    // nothing.
    for (k, n) in nodes.iter().enumerate() {
        let (m, c) = (n.clone(), vcfg.clone());
        let (own, peer) = (leases[k].clone(), leases[1 - k].clone());
        let (first, second) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl).await).await.unwrap();
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            (b.reconcile().await.unwrap(), b.reconcile().await.unwrap())
        });
        assert_eq!((first, second), (6, 0), "node {}", n.i);
    }

    // Kernel state on node 1, as flannel's.
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let mac6 = data[1].1.as_ref().unwrap()["VtepMAC"]
        .as_str()
        .unwrap()
        .to_string();
    let link = show(&tb, n1, &["ip", "-d", "link", "show", "flannel-v6.1"]);
    assert!(
        link.contains("mtu 1430")
            && link.contains(&format!("vxlan id 1 local {} dev eth0", n1.ip6))
            && link.contains("dstport 8472")
            && link.contains("nolearning"),
        "{link}"
    );
    let link4 = show(&tb, n1, &["ip", "-d", "link", "show", "flannel.1"]);
    assert!(
        link4.contains("mtu 1450") && link4.contains("local 172.30.0.11"),
        "{link4}"
    );
    assert_eq!(
        show(
            &tb,
            n1,
            &["cat", "/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra"]
        )
        .trim(),
        "0"
    );
    let addrs = show(
        &tb,
        n1,
        &["ip", "-6", "addr", "show", "dev", "flannel-v6.1"],
    );
    assert!(
        addrs.contains("inet6 fd10:0:0:1::/128 scope global"),
        "{addrs}"
    );
    assert!(
        addrs.contains("inet6 fe80::"),
        "kernel link-local kept: {addrs}"
    );
    let routes = show(
        &tb,
        n1,
        &["ip", "-6", "route", "show", "dev", "flannel-v6.1"],
    );
    assert!(
        routes.contains("fd10:0:0:2::/64 via fd10:0:0:2:: metric 1024 onlink"),
        "{routes}"
    );
    let neigh = show(
        &tb,
        n1,
        &["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"],
    );
    assert!(
        neigh.contains(&format!("fd10:0:0:2:: lladdr {mac6} PERMANENT")),
        "{neigh}"
    );
    let fdb = show(&tb, n1, &["bridge", "fdb", "show", "dev", "flannel-v6.1"]);
    assert!(
        fdb.contains(&format!("{mac6} dst {} self permanent", n2.ip6)),
        "{fdb}"
    );
    let via = show(&tb, n1, &["ip", "-6", "route", "get", &n2.host6()]);
    assert!(via.contains("dev flannel-v6.1"), "{via}");

    // Traffic both ways, both families, at the pod MTU with DF.
    let (p4, p6) = payloads(1430);
    for (a, b) in [(n1, n2), (n2, n1)] {
        ping(&tb, a, b, false, p4).unwrap();
        ping(&tb, a, b, true, p6).unwrap();
    }
    // The IPv4 device carries its own full MTU (1450) too.
    ping(&tb, n1, n2, false, payloads(1450).0).unwrap();

    // A restart: a new backend instance adopts both devices and changes nothing.
    for (k, n) in nodes.iter().enumerate() {
        let (m, c) = (n.clone(), vcfg.clone());
        let (own, peer) = (leases[k].clone(), leases[1 - k].clone());
        let (changes, calls) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl.clone()).await)
                .await
                .unwrap();
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            (b.reconcile().await.unwrap(), nl.calls())
        });
        assert_eq!(changes, 0, "node {}", n.i);
        assert!(calls.is_empty(), "node {}: {calls:?}", n.i);
    }

    // Node 2's lease without BackendV6Data (or with PublicIPv6 null): node 1 drops only its
    // IPv6 entries; IPv4 keeps flowing.
    {
        let m = n1.clone();
        let c = vcfg.clone();
        let own = leases[0].clone();
        let mut peer = leases[1].clone();
        peer.attrs.backend_v6_data = None;
        let mut null = leases[1].clone();
        null.attrs.public_ipv6 = None;
        let (dropped, null_changes) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl).await).await.unwrap();
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            let dropped = b.reconcile().await.unwrap();
            b.peer_event(&Event::PeerAdded(null));
            (dropped, b.reconcile().await.unwrap())
        });
        assert_eq!((dropped, null_changes), (3, 0));
        let routes = show(
            &tb,
            n1,
            &["ip", "-6", "route", "show", "dev", "flannel-v6.1"],
        );
        assert!(!routes.contains("fd10:0:0:2::/64"), "{routes}");
        assert!(
            show(&tb, n1, &["ip", "route", "show", "dev", "flannel.1"])
                .contains("10.5.2.0/24 via 10.5.2.0 onlink"),
            "IPv4 route kept"
        );
        ping(&tb, n1, n2, false, p4).unwrap();
    }

    // Teardown removes both devices (and what was on them).
    for n in &nodes {
        let (m, c) = (n.clone(), vcfg.clone());
        in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl.clone()).await)
                .await
                .unwrap();
            b.teardown().await.unwrap();
            assert!(nl.link_by_name("flannel.1").await.unwrap().is_none());
            assert!(nl.link_by_name("flannel-v6.1").await.unwrap().is_none());
        });
    }
    let routes = show(&tb, n1, &["ip", "-6", "route", "show"]);
    assert!(!routes.contains("fd10:0:0:2::"), "{routes}");
}

#[test]
fn host_gw_dual_stack_between_two_namespaces() {
    let Some((tb, nodes)) = testbed() else {
        return;
    };
    let leases: Vec<Lease> = nodes
        .iter()
        .map(|n| n.lease("host-gw", None, None))
        .collect();
    for (k, n) in nodes.iter().enumerate() {
        let m = n.clone();
        let (own, peer) = (leases[k].clone(), leases[1 - k].clone());
        let (first, second, calls) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = HostGwBackend::new(&m.ctx(nl.clone()).await).unwrap();
            assert_eq!(b.backend_v6_data(), None);
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            let first = b.reconcile().await.unwrap();
            let second = b.reconcile().await.unwrap();
            (first, second, nl.calls())
        });
        assert_eq!((first, second), (2, 0), "node {}: {calls:?}", n.i);
    }
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let routes = show(&tb, n1, &["ip", "-6", "route", "show"]);
    assert!(
        routes.contains(&format!("fd10:0:0:2::/64 via {} dev eth0", n2.ip6)),
        "{routes}"
    );
    let routes4 = show(&tb, n1, &["ip", "route", "show"]);
    assert!(
        routes4.contains("10.5.2.0/24 via 172.30.0.12 dev eth0"),
        "{routes4}"
    );
    let (p4, p6) = payloads(1500);
    for (a, b) in [(n1, n2), (n2, n1)] {
        ping(&tb, a, b, false, p4).unwrap();
        ping(&tb, a, b, true, p6).unwrap();
    }
    // A restart changes nothing; teardown removes both families' routes.
    for (k, n) in nodes.iter().enumerate() {
        let m = n.clone();
        let (own, peer) = (leases[k].clone(), leases[1 - k].clone());
        let (changes, calls) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = HostGwBackend::new(&m.ctx(nl.clone()).await).unwrap();
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            let changes = b.reconcile().await.unwrap();
            let calls = nl.calls();
            b.teardown().await.unwrap();
            (changes, calls)
        });
        assert_eq!(changes, 0, "node {}", n.i);
        assert!(calls.is_empty(), "node {}: {calls:?}", n.i);
    }
    let routes = show(&tb, n1, &["ip", "-6", "route", "show"]);
    assert!(!routes.contains("fd10:0:0:2::"), "{routes}");
    let routes4 = show(&tb, n1, &["ip", "route", "show"]);
    assert!(!routes4.contains("10.5.2.0/24"), "{routes4}");
}

#[test]
fn vxlan_ipv6_only_between_two_namespaces() {
    let Some((tb, mut nodes)) = testbed() else {
        return;
    };
    for n in &mut nodes {
        n.ipv4 = false;
    }
    let (vcfg, _) = VxlanConfig::parse(&serde_json::Map::new()).unwrap();
    let mut data = Vec::new();
    for n in &nodes {
        let (m, c) = (n.clone(), vcfg.clone());
        data.push(in_node(&m.ns.clone(), move |nl| async move {
            let b = VxlanBackend::new(c, &m.ctx(nl).await).await.unwrap();
            assert_eq!(b.mtu(), 1430);
            assert_eq!(b.backend_data(), None, "no IPv4 device, no BackendData");
            b.backend_v6_data().unwrap()
        }));
    }
    let leases: Vec<Lease> = nodes
        .iter()
        .zip(&data)
        .map(|(n, d6)| n.lease("vxlan", None, Some(d6.clone())))
        .collect();
    assert_eq!(
        leases[0].attrs.to_json(),
        format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"vxlan","BackendV6Data":{}}}"#,
            nodes[0].ip6, data[0]
        ),
        "flannel's IPv6-only lease"
    );
    for (k, n) in nodes.iter().enumerate() {
        let (m, c) = (n.clone(), vcfg.clone());
        let (own, peer) = (leases[k].clone(), leases[1 - k].clone());
        let (first, second) = in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl).await).await.unwrap();
            b.set_lease(&own).await.unwrap();
            b.peer_event(&Event::PeerAdded(peer));
            (b.reconcile().await.unwrap(), b.reconcile().await.unwrap())
        });
        assert_eq!((first, second), (3, 0), "node {}", n.i);
    }
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let links = show(&tb, n1, &["ip", "link", "show"]);
    assert!(!links.contains("flannel.1:"), "{links}");
    assert!(links.contains("flannel-v6.1:"), "{links}");
    let (_, p6) = payloads(1430);
    ping(&tb, n1, n2, true, p6).unwrap();
    ping(&tb, n2, n1, true, p6).unwrap();
    for n in &nodes {
        let (m, c) = (n.clone(), vcfg.clone());
        in_node(&m.ns.clone(), move |nl| async move {
            let mut b = VxlanBackend::new(c, &m.ctx(nl.clone()).await)
                .await
                .unwrap();
            b.teardown().await.unwrap();
            assert!(nl.link_by_name("flannel-v6.1").await.unwrap().is_none());
        });
    }
}
