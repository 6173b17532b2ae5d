//! Network policy scale and data path: NetworkPolicy, and ClusterNetworkPolicy beside it.
//!
//! One namespace node with two real pods behind its bridge (a server and a client, same node:
//! bridged traffic through br_netfilter, the harder path) and 1000 synthetic pods on the same
//! node (records only) in 10 namespaces. Control plane, the daemon's own code path (objects →
//! `compile` → the difference as one netlink batch; whole tables through `nft -f -`):
//! - apply 1, 100 and 1000 NetworkPolicies at once to a table holding the 1000 pods; with
//!   1000, a pod label change (the client gains the label its server's policy allows), timed
//!   from the change until a connection gets through;
//! - with the 1000 NetworkPolicies in the table, apply 1, 100 and 1000 ClusterNetworkPolicies
//!   at once (a mix of both tiers, varied priorities, Accept/Deny/Pass, namespace and pod
//!   subjects and peers, `networks` peers, port numbers, ranges and named ports; nearly all
//!   select pods of the node); with 1000, a priority change (the Admin Accept of the
//!   client → server pair moved from below to above the pair's Admin Deny), timed from the
//!   change until a connection gets through.
//!
//! Data path, every table in the same run as ratios to no table: TCP connection set-up
//! latency (connect + one byte) client → server, p50/p99 over `--connections` taken in
//! `--rounds` interleaved rounds (each table applied in turn, so drift hits all alike; 200 ms
//! and 20 connections after each apply are not counted), and
//! iperf3 throughput client → server, with no table, 1 and 1000 NetworkPolicies, and 1000
//! NetworkPolicies + 1/100/1000 ClusterNetworkPolicies. Needs root, nft and iperf3.
//!
//! Writes a markdown table (`--out FILE`, default `bench-results/policy.md`).

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nft::{NfNetlink, NftCommand};
use policy::compile::{compile, Input, Ruleset};
use policy::enforce::Enforcer;
use policy::eval::{NamedPort, PodView};
use policy::run::ensure_bridge_netfilter;
use registry::{ClusterNetworkPolicy, Labels, NetworkPolicy, Object, Protocol};
use test_support::{in_netns, Testbed};

use common::{byte_server, check_stop, connect_latencies, iperf, ms, percentile, write_file};

const SERVER_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const NAMESPACES: usize = 10;
/// The priorities of the bench pair's Admin Accept: above its Deny (allowed), below (denied).
const ACCEPT_FIRST: i64 = 10;
const DENY_AT: i64 = 20;
const ACCEPT_LAST: i64 = 30;

/// Network policy scale: apply NetworkPolicies and ClusterNetworkPolicies, a label and a
/// priority change until a connection passes, connect latency and throughput per table (root).
#[derive(Debug, clap::Parser)]
#[command(name = "policy-bench")]
struct Args {
    /// Synthetic pods on the node.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// NetworkPolicy counts applied at once (the largest stays for the ClusterNetworkPolicy part).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    policies: Vec<usize>,
    /// ClusterNetworkPolicy counts applied at once beside the most NetworkPolicies.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    cluster_policies: Vec<usize>,
    /// Label and priority changes timed (each).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    changes: u32,
    /// Connections per latency measurement (per table, over all rounds).
    #[arg(long, default_value_t = 4000)]
    connections: usize,
    /// Interleaved latency rounds (each table applied in turn per round). Many short rounds:
    /// the p50 of one table drifts by ±15% from one minute to the next on a 2-vCPU VM, and
    /// short rounds spread that drift over every table alike.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// The markdown table.
    #[arg(long, default_value = "bench-results/policy.md")]
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = <Args as clap::Parser>::parse();
    for v in [&mut a.policies, &mut a.cluster_policies] {
        v.sort_unstable();
        v.dedup();
        if v.first().is_none_or(|n| *n == 0) {
            bail!("policy counts must be at least 1");
        }
    }
    if a.connections < a.rounds as usize {
        bail!("--connections must be at least --rounds");
    }
    Ok(a)
}

/// `n` objects of `kind` (a `…Policy`).
fn count(n: usize, kind: &str) -> String {
    match kind.strip_suffix('y') {
        Some(stem) if n != 1 => format!("{n} {stem}ies"),
        _ => format!("{n} {kind}"),
    }
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The objects the table is compiled from.
struct World {
    namespaces: BTreeMap<String, Labels>,
    pods: Vec<PodView>,
    policies: Vec<NetworkPolicy>,
    cluster_policies: Vec<ClusterNetworkPolicy>,
}

impl World {
    /// `n` synthetic pods on node0 (10.5.16.0 onwards) in namespaces ns0..ns9, plus the real
    /// server and client in namespace `bench`.
    fn new(n: usize, server: Ipv4Addr, client: Ipv4Addr) -> World {
        let mut namespaces = BTreeMap::new();
        for i in 0..NAMESPACES {
            let team = format!("t{}", i % 3);
            namespaces.insert(format!("ns{i}"), labels(&[("team", &team)]));
        }
        namespaces.insert("bench".into(), labels(&[("team", "bench")]));
        let http = |port| {
            vec![NamedPort {
                name: "http".into(),
                port,
                protocol: Protocol::Tcp,
            }]
        };
        let mut pods: Vec<PodView> = (0..n)
            .map(|j| PodView {
                namespace: format!("ns{}", j % NAMESPACES),
                name: format!("p{j}"),
                labels: labels(&[
                    ("app", &format!("app{}", j % 100)),
                    ("role", &format!("r{}", j % 7)),
                ]),
                ips: vec![Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 5, 16, 0)) + j as u32).into()],
                node: "node0".into(),
                ports: http(80),
            })
            .collect();
        for (name, ip, l) in [
            ("server", server, ("app", "server")),
            ("client", client, ("role", "other")),
        ] {
            pods.push(PodView {
                namespace: "bench".into(),
                name: name.into(),
                labels: labels(&[l]),
                ips: vec![ip.into()],
                node: "node0".into(),
                ports: http(SERVER_PORT),
            });
        }
        World {
            namespaces,
            pods,
            policies: Vec::new(),
            cluster_policies: Vec::new(),
        }
    }

    /// The server's policy (clients on its port and iperf3's) plus `n - 1` policies over the
    /// synthetic pods (each selects the ~10 pods of one app label in its namespace; peers by
    /// pod and namespace selector; ports 80, 8000-8100 and the named port `http`).
    fn set_policies(&mut self, n: usize) -> Result<()> {
        let mut yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: client}}}}}}], ports: [{{port: {SERVER_PORT}}}, {{port: {IPERF_PORT}}}]}}]\n---\n",
        );
        for k in 0..n.saturating_sub(1) {
            yaml += &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{k}, namespace: ns{}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{role: r{}}}}}\n    - namespaceSelector: {{matchLabels: {{team: t{}}}}}\n    ports: [{{port: 80}}, {{port: 8000, endPort: 8100}}, {{port: http}}]\n---\n",
                k % NAMESPACES,
                k % 100,
                k % 7,
                k % 3
            );
        }
        self.policies = parse_valid(&yaml)?
            .into_iter()
            .filter_map(|o| match o {
                Object::NetworkPolicy(np) => Some(np),
                _ => None,
            })
            .collect();
        Ok(())
    }

    /// `n` ClusterNetworkPolicies: the bench pair's Admin Accept (client → server on its port
    /// and iperf3's, priority [`ACCEPT_FIRST`]), from 2 on the pair's Admin Deny of the same
    /// traffic (priority [`DENY_AT`]), from 4 on two cluster-wide policies (an Admin egress
    /// Deny to a metadata address, a Baseline ingress Deny from every namespace), and the rest
    /// synthetic (see [`synthetic_cnp`]).
    fn set_cluster_policies(&mut self, n: usize) -> Result<()> {
        let pair = |name: &str, action: &str, priority: i64| {
            format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{pods: {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: bench}}}}, podSelector: {{matchLabels: {{app: server}}}}}}}}\n  ingress:\n  - name: client\n    action: {action}\n    from: [{{pods: {{namespaceSelector: {{matchLabels: {{team: bench}}}}, podSelector: {{matchLabels: {{role: client}}}}}}}}]\n    protocols: [{{tcp: {{destinationPort: {{number: {SERVER_PORT}}}}}}}, {{tcp: {{destinationPort: {{number: {IPERF_PORT}}}}}}}]\n---\n"
            )
        };
        let mut yaml = pair("bench-accept", "Accept", ACCEPT_FIRST);
        if n >= 2 {
            yaml += &pair("bench-deny", "Deny", DENY_AT);
        }
        if n >= 4 {
            yaml += "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-metadata-service}\nspec:\n  tier: Admin\n  priority: 0\n  subject: {namespaces: {}}\n  egress:\n  - {action: Deny, to: [{networks: [169.254.169.254/32]}]}\n---\n";
            yaml += "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: default-deny}\nspec:\n  tier: Baseline\n  priority: 1000\n  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n---\n";
        }
        let fixed = match n {
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        for k in 0..n - fixed {
            yaml += &synthetic_cnp(k);
        }
        self.cluster_policies = parse_valid(&yaml)?
            .into_iter()
            .filter_map(|o| match o {
                Object::ClusterNetworkPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        if self.cluster_policies.len() != n {
            bail!(
                "{} ClusterNetworkPolicies generated, {n} wanted",
                self.cluster_policies.len()
            );
        }
        Ok(())
    }

    /// Moves the bench pair's Admin Accept to `priority`.
    fn set_accept_priority(&mut self, priority: i64) {
        if let Some(p) = self
            .cluster_policies
            .iter_mut()
            .find(|p| p.metadata.name == "bench-accept")
        {
            p.spec.priority = Some(priority);
        }
    }

    fn compile(&self) -> Ruleset {
        let policies: Vec<&NetworkPolicy> = self.policies.iter().collect();
        let cluster: Vec<&ClusterNetworkPolicy> = self.cluster_policies.iter().collect();
        compile(Input {
            namespaces: &self.namespaces,
            policies: &policies,
            cluster_policies: &cluster,
            pods: &self.pods,
            node: "node0",
        })
    }

    fn set_client_role(&mut self, role: &str) {
        if let Some(p) = self.pods.iter_mut().find(|p| p.name == "client") {
            p.labels.insert("role".into(), role.into());
        }
    }
}

/// Synthetic ClusterNetworkPolicy `k`: Admin (3 in 4) or Baseline, priority spread over
/// 0-1000 (some equal); subject a namespace by name (1 in 10), an app's pods in any namespace
/// (1 in 10), nothing on this node (1 in 20: a namespace without pods here), else an app's
/// pods in its namespace (the app's ~10 pods). Ingress: Accept, Deny or Pass from a role in a
/// team of namespaces or from a namespace, on TCP 80, 8000-8100 and the named port `http`;
/// every other one also a Deny from a team on UDP 53. Every third has egress rules: a Deny to
/// two networks, an Accept to an app's pods on TCP 9000-9100.
fn synthetic_cnp(k: usize) -> String {
    let tier = if k % 4 == 3 { "Baseline" } else { "Admin" };
    let priority = (k * 37 + 11) % 1001;
    let app = k % 100;
    let subject = match k % 20 {
        0 | 10 => format!(
            "{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: ns{}}}}}}}",
            (k / 20) % NAMESPACES
        ),
        5 | 15 => format!("{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: app{app}}}}}}}}}"),
        19 => "{namespaces: {matchLabels: {kubernetes.io/metadata.name: elsewhere}}}".into(),
        _ => format!(
            "{{pods: {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: ns{}}}}}, podSelector: {{matchLabels: {{app: app{app}}}}}}}}}",
            app % NAMESPACES
        ),
    };
    let action = ["Accept", "Deny", "Pass"][k % 3];
    let mut s = format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp{k}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n  ingress:\n  - name: web\n    action: {action}\n    from:\n    - {{pods: {{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchLabels: {{role: r{}}}}}}}}}\n    - {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: ns{}}}}}}}\n    protocols:\n    - {{tcp: {{destinationPort: {{number: 80}}}}}}\n    - {{tcp: {{destinationPort: {{range: {{start: 8000, end: 8100}}}}}}}}\n    - {{destinationNamedPort: http}}\n",
        k % 3,
        k % 7,
        (k + 1) % NAMESPACES
    );
    if k.is_multiple_of(2) {
        s += &format!(
            "  - {{name: dns, action: Deny, from: [{{namespaces: {{matchLabels: {{team: t{}}}}}}}], protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}]}}\n",
            (k + 1) % 3
        );
    }
    if k.is_multiple_of(3) {
        s += &format!(
            "  egress:\n  - {{name: nets, action: Deny, to: [{{networks: [10.{}.0.0/16, 192.168.{}.0/24]}}]}}\n  - {{name: app, action: Accept, to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: app{}}}}}}}}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 9000, end: 9100}}}}}}}}]}}\n",
            100 + k % 100,
            k % 256,
            (k + 1) % 100
        );
    }
    s + "---\n"
}

/// The objects of `yaml`, each valid as the API server (and `flannelctl apply`) checks it.
fn parse_valid(yaml: &str) -> Result<Vec<Object>> {
    let objects = registry::parse_documents(yaml)?;
    for o in &objects {
        registry::validate(o, registry::ServiceNetworks::default())
            .map_err(|e| anyhow::anyhow!("generated object not valid: {e}"))?;
    }
    Ok(objects)
}

/// Whether a connection from `ns` to `to` is set up within `timeout`.
fn connects(ns: &str, to: SocketAddr, timeout: Duration) -> bool {
    let r = in_netns(ns, move || TcpStream::connect_timeout(&to, timeout).is_ok());
    matches!(r, Ok(true))
}

/// How big a table is: (chains, rules, sets, set elements).
fn size(rs: &Ruleset) -> (usize, usize, usize, usize) {
    (
        rs.chains.len(),
        rs.chains.values().map(Vec::len).sum(),
        rs.sets.len(),
        rs.sets.values().map(|s| s.elements.len()).sum(),
    )
}

/// Applies `rs` (timed from here: compile already done by the caller) and checks it was a
/// difference, not a rewrite, sent as a netlink batch (as the daemon sends it).
fn apply(rt: &tokio::runtime::Runtime, e: &mut Enforcer<NftCommand>, rs: Ruleset) -> Result<()> {
    let rep = rt.block_on(e.sync(rs)).map_err(anyhow::Error::msg)?;
    if rep.full {
        bail!("applying policies was a full rewrite");
    }
    if rep.changed && !rep.netlink {
        bail!("the difference did not go as a netlink batch");
    }
    Ok(())
}

/// From a change made by `set(true)` until a connection gets through (after `set(false)`,
/// checked to deny), median and max over `n`.
fn timed_flips(
    n: u32,
    client_ns: &str,
    to: SocketAddr,
    mut set: impl FnMut(bool) -> Result<()>,
) -> Result<(Duration, Duration)> {
    let mut samples = Vec::new();
    for _ in 0..n {
        check_stop()?;
        set(false)?;
        // Denied connections are refused (NetworkPolicy) or dropped (ClusterNetworkPolicy
        // Deny): a short timeout tells either from an answer (same node: ~0.1 ms).
        if connects(client_ns, to, Duration::from_millis(300)) {
            bail!("the change did not deny the client");
        }
        let t = Instant::now();
        set(true)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !connects(client_ns, to, Duration::from_millis(20)) {
            if Instant::now() > deadline {
                bail!("the change did not let the client in");
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 1.0)))
}

fn main() -> Result<()> {
    let a = args()?;
    common::on_signals()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("policy-bench needs root (network namespaces, nft)");
    }
    let mut tb = Testbed::new(1).map_err(anyhow::Error::msg)?;
    let server = tb
        .add_pod(0, "10.5.1.2/24", "10.5.1.1/24", 1500)
        .map_err(anyhow::Error::msg)?;
    let client = tb
        .add_pod(0, "10.5.1.3/24", "10.5.1.1/24", 1500)
        .map_err(anyhow::Error::msg)?;
    let node_ns = tb.nodes[0].ns.clone();
    if let Some(w) = in_netns(&node_ns, ensure_bridge_netfilter).map_err(anyhow::Error::msg)? {
        bail!("{w}");
    }
    let server_ip: Ipv4Addr = server.ip.parse()?;
    let client_ip: Ipv4Addr = client.ip.parse()?;
    byte_server(&server.ns, SERVER_PORT)?;
    let to = SocketAddr::from((server_ip, SERVER_PORT));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nft = NftCommand {
        prefix: ["ip", "netns", "exec", node_ns.as_str()]
            .map(String::from)
            .to_vec(),
    };
    let mut w = World::new(a.pods, server_ip, client_ip);
    let (np_min, np_max) = (a.policies[0], a.policies[a.policies.len() - 1]);
    let cnp_max = a.cluster_policies[a.cluster_policies.len() - 1];
    let mut report = format!(
        "# Network policy benchmark\n\n{} synthetic pods on the node in {NAMESPACES} namespaces, plus a real server and client pod (same node, bridged).\n\n## Control plane\n\n| measure | result |\n|---|---|\n",
        a.pods
    );
    // The tables the data path is measured with, in report order (None: no table).
    let mut tables: Vec<(String, Table)> = vec![
        ("no policy table".into(), Table::None),
        (
            "no policy table, conntrack on (a table with one `ct state` rule)".into(),
            Table::Conntrack,
        ),
    ];

    // Apply n NetworkPolicies at once to a table that holds the pods and no policy.
    // Differences as netlink batches through a socket in the node's namespace, as the daemon
    // sends them; whole tables through nft there.
    let socket = in_netns(&node_ns, NfNetlink::open)
        .map_err(anyhow::Error::msg)?
        .map_err(anyhow::Error::msg)?;
    let mut e = Enforcer::new(nft.clone()).with_netlink(Arc::new(socket));
    // The table with no policy in it: its `ct state` rules turn conntrack on in the node's
    // namespace (no table: no conntrack at all), every map is empty. A cluster node tracks
    // connections anyway (the service proxy's NAT), so this is the baseline policies add to.
    tables.push((
        "empty policy table (0 policies, conntrack on)".into(),
        Table::Policy(w.compile()),
    ));
    for &n in &a.policies {
        check_stop()?;
        w.policies.clear();
        w.set_client_role("other");
        e.invalidate();
        rt.block_on(e.sync(w.compile()))
            .map_err(anyhow::Error::msg)?;
        w.set_policies(n)?;
        let t = Instant::now();
        let rs = w.compile();
        let compiled = t.elapsed();
        let (chains, rules, sets, elements) = size(&rs);
        apply(&rt, &mut e, rs)?;
        let total = t.elapsed();
        report += &format!(
            "| apply {} at once ({chains} chains, {rules} rules, {sets} sets, {elements} set elements) | {} ms (compile {} ms) |\n",
            count(n, "NetworkPolicy"),
            ms(total),
            ms(compiled)
        );
        eprintln!("apply {n} NetworkPolicies: {total:?}");
        if n == np_max {
            // Label change: from the change to the first connection that gets through.
            let (median, max) = timed_flips(a.changes, &client.ns, to, |allowed| {
                w.set_client_role(if allowed { "client" } else { "other" });
                apply(&rt, &mut e, w.compile())
            })?;
            report += &format!(
                "| label change with {n} NetworkPolicies, until a connection gets through (median / max of {}) | {} / {} ms |\n",
                a.changes,
                ms(median),
                ms(max)
            );
        }
        if n == np_min || n == np_max {
            // The client allowed by the server's policy.
            w.set_client_role("client");
            let rs = w.compile();
            apply(&rt, &mut e, rs.clone())?;
            if !connects(&client.ns, to, Duration::from_secs(1)) {
                bail!("the client does not reach the server with {n} NetworkPolicies");
            }
            tables.push((count(n, "NetworkPolicy"), Table::Policy(rs)));
        }
    }

    // ClusterNetworkPolicies beside the most NetworkPolicies (the client allowed by them).
    w.set_client_role("client");
    for &n in &a.cluster_policies {
        check_stop()?;
        w.cluster_policies.clear();
        apply(&rt, &mut e, w.compile())?;
        w.set_cluster_policies(n)?;
        let t = Instant::now();
        let rs = w.compile();
        let compiled = t.elapsed();
        let (chains, rules, sets, elements) = size(&rs);
        let selecting = w
            .cluster_policies
            .iter()
            .filter(|p| !p.metadata.name.starts_with("cnp") || selects_here(p))
            .count();
        apply(&rt, &mut e, rs.clone())?;
        let total = t.elapsed();
        report += &format!(
            "| apply {} at once beside {} ({selecting} select pods of the node; table: {chains} chains, {rules} rules, {sets} sets, {elements} set elements) | {} ms (compile {} ms) |\n",
            count(n, "ClusterNetworkPolicy"),
            count(np_max, "NetworkPolicy"),
            ms(total),
            ms(compiled)
        );
        eprintln!("apply {n} ClusterNetworkPolicies: {total:?}");
        if !connects(&client.ns, to, Duration::from_secs(1)) {
            bail!("the client does not reach the server with {n} ClusterNetworkPolicies");
        }
        tables.push((
            format!(
                "{} + {}",
                count(np_max, "NetworkPolicy"),
                count(n, "ClusterNetworkPolicy")
            ),
            Table::Policy(rs),
        ));
        if n == cnp_max && n >= 2 {
            // Priority change: the pair's Accept moved above its Deny, until a connection
            // gets through (and back below it, checked denied, between samples).
            let (median, max) = timed_flips(a.changes, &client.ns, to, |allowed| {
                w.set_accept_priority(if allowed { ACCEPT_FIRST } else { ACCEPT_LAST });
                apply(&rt, &mut e, w.compile())
            })?;
            report += &format!(
                "| priority change with {n} ClusterNetworkPolicies (an Admin Accept moved above an Admin Deny), until a connection gets through (median / max of {}) | {} / {} ms |\n",
                a.changes,
                ms(median),
                ms(max)
            );
        }
    }

    // Connection set-up: every table in turn per round.
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); tables.len()];
    let per_round = a.connections / a.rounds as usize;
    for round in 0..a.rounds {
        // The order is reversed every other round: whatever follows a table change (the
        // kernel freeing the previous table, caches) falls on every table alike.
        let mut order: Vec<usize> = (0..tables.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let rs = &tables[i].1;
            check_stop()?;
            use_table(&rt, &nft, &mut e, rs)?;
            // Let the kernel finish with the previous table (objects freed after the
            // transaction) and warm up before the samples.
            std::thread::sleep(Duration::from_millis(200));
            connect_latencies(&client.ns, to, 20)?;
            lat[i].extend(connect_latencies(&client.ns, to, per_round)?);
        }
    }
    report += "\n## Connection set-up (connect + first byte, client → server, same node)\n\n| table | p50 / p99 ms | p50 ratio to no table | p50 ratio to the empty table |\n|---|---|---|---|\n";
    for v in &mut lat {
        v.sort();
    }
    let base = percentile(&lat[0], 0.5).as_secs_f64();
    // Rows 0-2: no table, conntrack only, the empty policy table.
    let empty = percentile(&lat[2], 0.5).as_secs_f64();
    for ((what, _), v) in tables.iter().zip(&lat) {
        let p50 = percentile(v, 0.5).as_secs_f64();
        report += &format!(
            "| {what} | {:.3} / {:.3} | {:.2} | {:.2} |\n",
            p50 * 1000.0,
            percentile(v, 0.99).as_secs_f64() * 1000.0,
            p50 / base,
            p50 / empty
        );
    }

    // Throughput per table (the client allowed on iperf3's port by every one).
    report += "\n## Throughput (one TCP stream, iperf3, client → server)\n\n| table | Gbit/s | ratio to no table |\n|---|---|---|\n";
    let mut base = None;
    for (what, rs) in &tables {
        check_stop()?;
        use_table(&rt, &nft, &mut e, rs)?;
        let g = iperf(&server.ns, &client.ns, server_ip, a.seconds)?;
        let b = *base.get_or_insert(g);
        report += &format!("| {what} | {g:.2} | {:.3} |\n", g / b);
    }
    rt.block_on(nft.apply(&policy::compile::cleanup()))?;
    print!("{report}");
    write_file(&a.out, &report)?;
    Ok(())
}

/// Whether a synthetic ClusterNetworkPolicy's subject can select a pod of the node (all but
/// the ones naming the namespace `elsewhere`).
fn selects_here(p: &ClusterNetworkPolicy) -> bool {
    p.spec
        .subject
        .namespaces
        .as_ref()
        .is_none_or(|s| !s.match_labels.values().any(|v| v == "elsewhere"))
}

/// A table of the data-path comparison.
#[derive(Debug)]
enum Table {
    /// No table at all: nothing in the node's namespace uses conntrack.
    None,
    /// No policy table, and [`CONNTRACK_TABLE`]: conntrack on, as on any node that NATs.
    Conntrack,
    /// The policy table.
    Policy(Ruleset),
}

/// A table of its own whose one `ct state` rule turns conntrack on in the namespace.
const CONNTRACK_TABLE: &str = "bench-conntrack";

/// Puts `table` in the kernel (and only it).
fn use_table(
    rt: &tokio::runtime::Runtime,
    nft: &NftCommand,
    e: &mut Enforcer<NftCommand>,
    table: &Table,
) -> Result<()> {
    let without_conntrack_table = nft::remove_table_script(nft::Family::Ip, CONNTRACK_TABLE);
    match table {
        Table::None => {
            rt.block_on(nft.apply(&(policy::compile::cleanup() + &without_conntrack_table)))?;
            e.invalidate();
        }
        Table::Conntrack => {
            let script = format!(
                "{}{without_conntrack_table}table ip {CONNTRACK_TABLE} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept\n  }}\n}}\n",
                policy::compile::cleanup()
            );
            rt.block_on(nft.apply(&script))?;
            e.invalidate();
        }
        Table::Policy(rs) => {
            rt.block_on(nft.apply(&without_conntrack_table))?;
            rt.block_on(e.sync(rs.clone()))
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}
