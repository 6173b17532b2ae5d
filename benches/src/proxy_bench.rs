//! Service proxy scale and data path.
//!
//! One namespace node with two pods behind its bridge (a server and a client). Control plane
//! (nftables mode, the daemon's own code path: model → render → diff → `nft -f -`): full sync
//! of 1k and 10k Services × 3 endpoints, then adding one Service and removing one when 10k
//! exist (each `--adds` times; model recomputed from the objects every time, as flanneld does).
//! Data path: TCP connection set-up latency (connect + one byte back) from the client pod to a
//! ClusterIP with 10 and with 10k Services installed, and to the pod IP directly, p50/p99 over
//! `--connections`; iperf3 throughput client → server directly, through the ClusterIP in
//! nftables mode and in userspace mode, in the same run. Needs root, nft and iperf3.
//!
//! Writes a markdown table (`--out FILE`, default `bench-results/proxy.md`).

#[path = "common.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nft::{NfNetlink, NftCommand};
use registry::PodRecord;
use registry::{
    Container, ContainerPort, IntOrString, ObjectMeta, Pod as PodObj, PodSpec, Protocol, Service,
    ServicePort as SvcPort, ServiceSpec,
};
use service_proxy::metrics::ProxyMetrics;
use service_proxy::model::{service_ports, NodeInfo, PortsCache, Snapshot, Touched};
use service_proxy::nft::ProxyConfig;
use service_proxy::sync::{ConntrackCommand, NftNetlink, Syncer};
use service_proxy::userspace::{UserspaceOptions, UserspaceProxy};
use test_support::{in_netns, Testbed};

use common::{byte_server, check_stop, connect_latencies, iperf, ms, percentile, write_file};

const SERVER_PORT: u16 = 8080;
const TARGET_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Service proxy scale: sync at 1k/10k Services, add one at 10k, connect latency and
/// throughput through a ClusterIP (root).
#[derive(Debug, clap::Parser)]
#[command(name = "proxy-bench")]
struct Args {
    /// Times one Service is added and removed at 10k Services.
    #[arg(long, default_value_t = 20)]
    adds: usize,
    /// Connections per latency measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// The markdown table.
    #[arg(long, default_value = "bench-results/proxy.md")]
    out: PathBuf,
}

fn args() -> Result<Args> {
    Ok(<Args as clap::Parser>::parse())
}

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: Some("default".into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Service i: ClusterIP 10.96.x.y, selector app=s<i>, port 80 → named port http.
fn service(i: usize) -> Service {
    let ip = Ipv4Addr::from(u32::from(TARGET_VIP) + i as u32);
    Service {
        metadata: meta(&format!("s{i}"), &[]),
        spec: ServiceSpec {
            selector: Some([("app".to_string(), format!("s{i}"))].into()),
            ports: vec![SvcPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                node_port: None,
            }],
            cluster_ip: Some(ip.to_string()),
            ..Default::default()
        },
    }
}

/// Adds Service i and its 3 pods (records on this node). Service 0's endpoints are the real
/// server pod; the others get addresses nobody answers on.
fn add_service(snap: &mut Snapshot, i: usize, server: Ipv4Addr) {
    let svc = service(i);
    snap.services
        .insert(("default".into(), svc.metadata.name.clone()), svc);
    for k in 0..3 {
        let name = format!("s{i}-{k}");
        let ip = if i == 0 {
            server
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 6, 0, 0)) + (i * 3 + k) as u32)
        };
        let pod = PodObj {
            metadata: meta(&name, &[("app", &format!("s{i}"))]),
            spec: PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: None,
                    ports: vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: i64::from(SERVER_PORT),
                        protocol: Protocol::Tcp,
                    }],
                }],
                node_name: None,
                hostname: None,
                subdomain: None,
            },
        };
        snap.pods.insert(("default".into(), name.clone()), pod);
        snap.records.insert(
            ("default".into(), name),
            PodRecord {
                ip: ip.into(),
                ips: vec![ip.into()],
                node: "node0".into(),
                node_ip: Ipv4Addr::new(172, 30, 0, 10).into(),
                subnet: "10.5.1.0/24".parse().expect("subnet"),
                container_id: format!("c{i}{k}"),
                ifname: "eth0".into(),
            },
        );
    }
}

fn remove_service(snap: &mut Snapshot, i: usize) {
    snap.services.remove(&("default".into(), format!("s{i}")));
    for k in 0..3 {
        let key = ("default".to_string(), format!("s{i}-{k}"));
        snap.pods.remove(&key);
        snap.records.remove(&key);
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node0".into(),
        subnet: Some("10.5.1.0/24".parse().expect("subnet")),
    }
}

fn main() -> Result<()> {
    let a = args()?;
    if let Some(n) = std::env::var("PROXY_BENCH_DUMP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        // Diagnostics: print the full-sync script for n Services and exit.
        let mut snap = Snapshot::default();
        for i in 0..n {
            add_service(&mut snap, i, Ipv4Addr::new(10, 5, 1, 2));
        }
        let ports = service_ports(&snap, &node());
        let cfg = ProxyConfig {
            cluster_cidr: Some("10.5.0.0/16".parse()?),
            cluster_cidr6: None,
        };
        print!(
            "{}",
            service_proxy::nft::full(&service_proxy::nft::ruleset(ports.values(), &cfg))
        );
        return Ok(());
    }
    common::on_signals()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("proxy-bench needs root (network namespaces, nft)");
    }
    let mut tb = Testbed::new(1).map_err(anyhow::Error::msg)?;
    let server = tb
        .add_pod(0, "10.5.1.2/24", "10.5.1.1/24", 1500)
        .map_err(anyhow::Error::msg)?;
    let client = tb
        .add_pod(0, "10.5.1.3/24", "10.5.1.1/24", 1500)
        .map_err(anyhow::Error::msg)?;
    let node_ns = tb.nodes[0].ns.clone();
    let server_ip: Ipv4Addr = server.ip.parse()?;
    byte_server(&server.ns, SERVER_PORT)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let prefix: Vec<String> = ["ip", "netns", "exec", node_ns.as_str()]
        .map(String::from)
        .to_vec();
    // Incremental syncs as flanneld sends them (a netlink batch; `with_netlink`), or as nft
    // text for comparison.
    let new_syncer = |with_netlink: bool| -> Result<Syncer<NftNetlink, ConntrackCommand>> {
        let netlink = if with_netlink {
            Some(in_netns(&node_ns, NfNetlink::open).map_err(anyhow::Error::msg)??)
        } else {
            None
        };
        Ok(Syncer::new(
            NftNetlink {
                command: NftCommand {
                    prefix: prefix.clone(),
                },
                netlink,
            },
            ConntrackCommand {
                prefix: prefix.clone(),
            },
            ProxyConfig {
                cluster_cidr: Some("10.5.0.0/16".parse().expect("cidr")),
                cluster_cidr6: None,
            },
        ))
    };
    let mut report = String::from("# Service proxy benchmark\n\n");
    let mut rows = Vec::new();

    // Control plane.
    let mut at_10k = None;
    for n in [1000usize, 10_000] {
        check_stop()?;
        let mut snap = Snapshot::default();
        for i in 0..n {
            add_service(&mut snap, i, server_ip);
        }
        let mut syncer = new_syncer(true)?;
        let t = Instant::now();
        let ports = service_ports(&snap, &node());
        let model = t.elapsed();
        let rep = rt.block_on(syncer.sync(&ports))?;
        let full = t.elapsed();
        rows.push(format!(
            "| full sync, {n} Services × 3 endpoints | {} ms (model {} ms, script {:.1} MB) |",
            ms(full),
            ms(model),
            rep.script_bytes as f64 / 1e6
        ));
        eprintln!("full sync {n}: {full:?}");
        if n == 10_000 {
            at_10k = Some((snap, syncer));
        }
    }
    let (mut snap, mut syncer) = at_10k.context("10k state")?;
    // From here on the model is kept as flanneld keeps it: per Service, recomputing only the
    // Services a change can affect.
    let mut model = PortsCache::default();
    model.rebuild(&snap, &node());
    let touched = |i: usize| Touched {
        services: [("default".to_string(), format!("s{i}"))].into(),
        pod_labels: vec![(
            "default".to_string(),
            [("app".to_string(), format!("s{i}"))].into(),
        )],
    };
    // Adds and removes one Service `a.adds` times; the medians and p90s.
    let add_remove = |syncer: &mut Syncer<NftNetlink, ConntrackCommand>,
                      snap: &mut Snapshot,
                      model: &mut PortsCache|
     -> Result<[Duration; 4]> {
        let mut adds = Vec::new();
        let mut removes = Vec::new();
        for k in 0..a.adds {
            check_stop()?;
            let i = 10_000 + k;
            add_service(snap, i, server_ip);
            let t = Instant::now();
            model.update(snap, &node(), &touched(i));
            let rep = rt.block_on(syncer.sync(model.ports()))?;
            adds.push(t.elapsed());
            if rep.full || rep.changed != 1 {
                bail!("adding one Service was not an incremental sync of one port: {rep:?}");
            }
            remove_service(snap, i);
            let t = Instant::now();
            model.update(snap, &node(), &touched(i));
            rt.block_on(syncer.sync(model.ports()))?;
            removes.push(t.elapsed());
        }
        adds.sort();
        removes.sort();
        Ok([
            percentile(&adds, 0.5),
            percentile(&adds, 0.9),
            percentile(&removes, 0.5),
            percentile(&removes, 0.9),
        ])
    };
    let by_netlink = add_remove(&mut syncer, &mut snap, &mut model)?;
    // The same through `nft -f -` (what the first version did): a syncer of its own, which
    // starts with a full rebuild of the same 10k.
    let mut text_syncer = new_syncer(false)?;
    rt.block_on(text_syncer.sync(model.ports()))?;
    let by_text = add_remove(&mut text_syncer, &mut snap, &mut model)?;
    drop(text_syncer);
    for (what, [add50, add90, rm50, rm90]) in [
        ("netlink batch", by_netlink),
        ("as `nft -f -` text, for comparison", by_text),
    ] {
        rows.push(format!(
            "| add one Service at 10k, {what} (median / p90 of {}) | {} / {} ms |",
            a.adds,
            ms(add50),
            ms(add90)
        ));
        rows.push(format!(
            "| remove one Service at 10k, {what} (median / p90) | {} / {} ms |",
            ms(rm50),
            ms(rm90)
        ));
    }
    eprintln!(
        "add one at 10k: netlink {:?}, text {:?}",
        by_netlink[0], by_text[0]
    );

    // Connection set-up latency: 10k Services installed now; then 10.
    let vip = SocketAddr::from((TARGET_VIP, 80));
    let direct = SocketAddr::from((server_ip, SERVER_PORT));
    let lat_direct = connect_latencies(&client.ns, direct, a.connections)?;
    let lat_10k = connect_latencies(&client.ns, vip, a.connections)?;
    let mut small = Snapshot::default();
    for i in 0..10 {
        add_service(&mut small, i, server_ip);
    }
    rt.block_on(syncer.sync(&service_ports(&small, &node())))?;
    let lat_10 = connect_latencies(&client.ns, vip, a.connections)?;
    for (what, v) in [
        ("pod IP directly", &lat_direct),
        ("ClusterIP, 10 Services", &lat_10),
        ("ClusterIP, 10k Services", &lat_10k),
    ] {
        rows.push(format!(
            "| connect + first byte, {what} (p50 / p99 of {}) | {:.3} / {:.3} ms |",
            a.connections,
            percentile(v, 0.5).as_secs_f64() * 1000.0,
            percentile(v, 0.99).as_secs_f64() * 1000.0
        ));
    }
    report += "## Control plane and connection set-up (nftables mode)\n\n| measure | result |\n|---|---|\n";
    report += &rows.join("\n");
    report += "\n\n";

    // Throughput: direct, nftables ClusterIP, userspace ClusterIP. The latency server holds
    // 8080 in the server pod; iperf3 listens on 5201, so the Service targets 5201.
    check_stop()?;
    let mut iperf_snap = Snapshot::default();
    add_service(&mut iperf_snap, 0, server_ip);
    for p in iperf_snap.pods.values_mut() {
        p.spec.containers[0].ports[0].container_port = 5201;
    }
    let mut svc = iperf_snap
        .services
        .values()
        .next()
        .cloned()
        .context("service")?;
    svc.spec.ports[0].port = 5201;
    iperf_snap
        .services
        .insert(("default".into(), "s0".into()), svc);
    let ports = service_ports(&iperf_snap, &node());
    let gbit_direct = iperf(&server.ns, &client.ns, server_ip, a.seconds)?;
    rt.block_on(syncer.sync(&ports))?;
    let gbit_nft = iperf(&server.ns, &client.ns, TARGET_VIP, a.seconds)?;
    // Userspace: the proxy runs in the node's namespace (a thread entered into it).
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let node_for_thread = node_ns.clone();
    let ports_for_thread = ports.clone();
    let user = std::thread::spawn(move || {
        let outcome = in_netns(&node_for_thread, move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return Err(e.to_string()),
            };
            rt.block_on(async move {
                let mut p = UserspaceProxy::new(
                    NftCommand::default(),
                    UserspaceOptions::default(),
                    ProxyMetrics::default(),
                );
                let r = p
                    .apply(&ports_for_thread)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = ready_tx.send(r);
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                p.shutdown().await;
            });
            Ok(())
        });
        let _ = outcome;
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("userspace proxy start")?
        .map_err(anyhow::Error::msg)?;
    let gbit_user = iperf(&server.ns, &client.ns, TARGET_VIP, a.seconds);
    let _ = stop_tx.send(());
    let _ = user.join();
    let gbit_user = gbit_user?;
    report += "## Throughput through a ClusterIP (one TCP stream, iperf3)\n\n| path | Gbit/s | ratio to direct |\n|---|---|---|\n";
    for (what, g) in [
        ("pod IP directly", gbit_direct),
        ("ClusterIP, nftables mode", gbit_nft),
        ("ClusterIP, userspace mode", gbit_user),
    ] {
        report += &format!("| {what} | {g:.2} | {:.3} |\n", g / gbit_direct);
    }
    print!("{report}");
    write_file(&a.out, &report)?;
    Ok(())
}
