//! Network policy scale and data path.
//!
//! One namespace node with two real pods behind its bridge (a server and a client, same node:
//! bridged traffic through br_netfilter, the harder path) and 1000 synthetic pods on the same
//! node (records only) in 10 namespaces. Control plane, the daemon's own code path (objects →
//! `compile` → `diff` → one `nft -f -`): apply 1, 100 and 1000 policies at once to a table
//! holding the 1000 pods; with 1000 policies, a pod label change (the client gains the label
//! its server's policy allows), timed from the change until a connection gets through. Data
//! path: TCP connection set-up latency (connect + one byte) client → server with no table,
//! with 1 policy and with 1000 policies (the server isolated in both), p50/p99 over
//! `--connections`; iperf3 throughput client → server without and with 1000 policies, as
//! ratios in the same run. Needs root, nft and iperf3.
//!
//! Writes a markdown table (`--out FILE`, default `bench-results/policy.md`).

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nft::NftCommand;
use policy::compile::{compile, Input, Ruleset};
use policy::enforce::Enforcer;
use policy::eval::{NamedPort, PodView};
use policy::run::ensure_bridge_netfilter;
use registry::{Labels, NetworkPolicy, Object, Protocol};
use test_support::{in_netns, Testbed};

use common::{byte_server, check_stop, connect_latencies, iperf, ms, percentile, write_file};

const SERVER_PORT: u16 = 8080;
const NAMESPACES: usize = 10;

/// Network policy scale: apply 1/100/1000 policies, a label change until a connection
/// passes, connect latency and throughput with 0/1/1000 policies (root).
#[derive(Debug, clap::Parser)]
#[command(name = "policy-bench")]
struct Args {
    /// Synthetic pods on the node.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Connections per latency measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// The markdown table.
    #[arg(long, default_value = "bench-results/policy.md")]
    out: PathBuf,
}

fn args() -> Result<Args> {
    Ok(<Args as clap::Parser>::parse())
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
        }
    }

    /// The server's policy plus `n - 1` policies over the synthetic pods (each selects the
    /// ~10 pods of one app label in its namespace; peers by pod and namespace selector;
    /// ports 80, 8000-8100 and the named port `http`).
    fn set_policies(&mut self, n: usize) -> Result<()> {
        let mut yaml = String::from(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 8080}]}]\n---\n",
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
        self.policies = registry::parse_documents(&yaml)?
            .into_iter()
            .filter_map(|o| match o {
                Object::NetworkPolicy(np) => Some(np),
                _ => None,
            })
            .collect();
        Ok(())
    }

    fn compile(&self) -> Ruleset {
        let policies: Vec<&NetworkPolicy> = self.policies.iter().collect();
        compile(Input {
            namespaces: &self.namespaces,
            policies: &policies,
            cluster_policies: &[],
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

fn connects(ns: &str, to: SocketAddr) -> bool {
    let r = in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok()
    });
    matches!(r, Ok(true))
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
    let mut report = format!(
        "# Network policy benchmark\n\n{} synthetic pods on the node in {NAMESPACES} namespaces, plus a real server and client pod (same node, bridged).\n\n## Control plane\n\n| measure | result |\n|---|---|\n",
        a.pods
    );

    // Baseline data path: no table at all.
    let lat_none = connect_latencies(&client.ns, to, a.connections)?;

    // Apply n policies at once to a table that holds the pods and no policy.
    let mut lat_one_policy = None;
    for n in [1usize, 100, 1000] {
        check_stop()?;
        w.policies.clear();
        let mut e = Enforcer::new(nft.clone());
        rt.block_on(e.sync(w.compile()))
            .map_err(anyhow::Error::msg)?;
        w.set_policies(n)?;
        let t = Instant::now();
        let rs = w.compile();
        let compiled = t.elapsed();
        let (chains, sets) = (rs.chains.len(), rs.sets.len());
        let elements: usize = rs.sets.values().map(|s| s.elements.len()).sum();
        let rep = rt.block_on(e.sync(rs)).map_err(anyhow::Error::msg)?;
        let total = t.elapsed();
        if rep.full {
            bail!("applying policies was a full rewrite");
        }
        report += &format!(
            "| apply {n} policies at once ({chains} chains, {sets} sets, {elements} set elements) | {} ms (compile {} ms) |\n",
            ms(total),
            ms(compiled)
        );
        eprintln!("apply {n}: {total:?}");
        if n == 1 {
            // The client (role other) is denied, and allowed once it is a client.
            if connects(&client.ns, to) {
                bail!("the client reached the isolated server");
            }
            w.set_client_role("client");
            rt.block_on(e.sync(w.compile()))
                .map_err(anyhow::Error::msg)?;
            let lat_one = connect_latencies(&client.ns, to, a.connections)?;
            lat_one_policy = Some(lat_one);
            w.set_client_role("other");
        }
        if n == 1000 {
            // Label change: from the change to the first connection that gets through.
            let mut samples = Vec::new();
            for _ in 0..10 {
                check_stop()?;
                w.set_client_role("client");
                let t = Instant::now();
                rt.block_on(e.sync(w.compile()))
                    .map_err(anyhow::Error::msg)?;
                let deadline = Instant::now() + Duration::from_secs(5);
                while !connects(&client.ns, to) {
                    if Instant::now() > deadline {
                        bail!("the label change did not let the client in");
                    }
                }
                samples.push(t.elapsed());
                w.set_client_role("other");
                rt.block_on(e.sync(w.compile()))
                    .map_err(anyhow::Error::msg)?;
            }
            samples.sort();
            report += &format!(
                "| label change with 1000 policies, until a connection gets through (median / max of 10) | {} / {} ms |\n",
                ms(percentile(&samples, 0.5)),
                ms(percentile(&samples, 1.0))
            );
            w.set_client_role("client");
            rt.block_on(e.sync(w.compile()))
                .map_err(anyhow::Error::msg)?;
            let lat_1000 = connect_latencies(&client.ns, to, a.connections)?;
            let lat_one = lat_one_policy.take().context("1-policy latencies")?;
            report += "\n## Connection set-up (connect + first byte, client → isolated server, same node)\n\n| table | p50 / p99 ms | p50 ratio to no table |\n|---|---|---|\n";
            let base = percentile(&lat_none, 0.5).as_secs_f64();
            for (what, v) in [
                ("no policy table", &lat_none),
                ("1 policy", &lat_one),
                ("1000 policies", &lat_1000),
            ] {
                let p50 = percentile(v, 0.5).as_secs_f64();
                report += &format!(
                    "| {what} | {:.3} / {:.3} | {:.2} |\n",
                    p50 * 1000.0,
                    percentile(v, 0.99).as_secs_f64() * 1000.0,
                    p50 / base
                );
            }
            // Throughput with 1000 policies (the client allowed), then without the table.
            check_stop()?;
            let mut isolated = w.clone_with_iperf_port();
            isolated.set_client_role("client");
            rt.block_on(e.sync(isolated.compile()))
                .map_err(anyhow::Error::msg)?;
            let with = iperf(&server.ns, &client.ns, server_ip, a.seconds)?;
            rt.block_on(nft.apply(&policy::compile::cleanup()))?;
            let without = iperf(&server.ns, &client.ns, server_ip, a.seconds)?;
            report += &format!(
                "\n## Throughput (one TCP stream, iperf3, client → server)\n\n| table | Gbit/s | ratio |\n|---|---|---|\n| no policy table | {without:.2} | 1.000 |\n| 1000 policies, server isolated | {with:.2} | {:.3} |\n",
                with / without
            );
        }
    }
    print!("{report}");
    write_file(&a.out, &report)?;
    Ok(())
}

impl World {
    /// The same objects with the server's policy allowing iperf3's port (5201) too.
    fn clone_with_iperf_port(&self) -> World {
        let mut policies = self.policies.clone();
        if let Some(np) = policies.iter_mut().find(|p| p.metadata.name == "server") {
            np.spec.ingress[0].ports.push(registry::NetworkPolicyPort {
                protocol: None,
                port: Some(registry::IntOrString::Int(5201)),
                end_port: None,
            });
        }
        World {
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            policies,
        }
    }
}
