//! Lease benchmark against one real etcd on loopback.
//!
//! For N joining nodes (default 10, 100, 1000; override with arguments) started all at once,
//! each with its own etcd connection as real nodes have:
//! - time until every node holds a lease, and per-node acquisition latency (p50, p99);
//! - etcd round trips per acquisition (list + grant + create txn when no race is lost);
//! - time until every watcher (min(N, 100) of them, started before the joins) has seen every
//!   lease;
//! - baseline, same invocation and concurrency: N plain etcd puts (one round trip each), so the
//!   ratio shows what the lease protocol costs over the cheapest possible write.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use subnet_lease::manager::ManagerOptions;
use subnet_lease::{
    config, Change, EtcdLeaseStore, EtcdOptions, LeaseAttrs, LeaseManager, LeaseStore, LeaseWatcher,
};
use tokio::sync::mpsc;

struct Row {
    n: usize,
    all_acquired: Duration,
    p50: Duration,
    p99: Duration,
    round_trips: f64,
    max_round_trips: u64,
    watchers: usize,
    all_seen: Duration,
    baseline: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn connect(endpoint: &str, prefix: &str) -> Result<EtcdLeaseStore> {
    let opts = EtcdOptions {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
        timeout: Duration::from_secs(30),
        ..EtcdOptions::default()
    };
    Ok(EtcdLeaseStore::connect(&opts).await?)
}

async fn run_one(endpoint: &str, n: usize, round: usize) -> Result<Row> {
    let prefix = format!("/bench{round}/network");
    let admin = connect(endpoint, &prefix).await?;
    let conf = r#"{"Network":"10.0.0.0/8","Backend":{"Type":"alloc"}}"#;
    admin.client().put(admin.config_key(), conf, None).await?;
    let cfg = config::parse(conf).context("bench config")?.config;

    // Watchers first, each on its own connection, each waiting for all N leases.
    let watchers = n.min(100);
    let mut seen_tasks = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(watchers);
    for _ in 0..watchers {
        let reg = connect(endpoint, &prefix).await?;
        let ready = ready_tx.clone();
        seen_tasks.push(tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1024);
            let task = tokio::spawn(LeaseWatcher::new(reg).run(tx));
            let _ = ready.send(()).await;
            let mut seen = HashSet::new();
            while seen.len() < n {
                let Some(batch) = rx.recv().await else { break };
                for c in batch {
                    if let Change::Added(l) = c {
                        seen.insert(l.key);
                    }
                }
            }
            let at = Instant::now();
            task.abort();
            at
        }));
    }
    drop(ready_tx);
    for _ in 0..watchers {
        ready_rx.recv().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut nodes = Vec::new();
    for i in 0..n {
        let reg = connect(endpoint, &prefix).await?;
        let ip = Ipv4Addr::from(0xc0a8_0000 + i as u32 + 1);
        nodes.push(LeaseManager::new(
            reg,
            cfg.clone(),
            LeaseAttrs::new(ip, "alloc"),
            ManagerOptions::default(),
        ));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for m in nodes {
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = m.acquire(None).await;
            (r.map(|_| ()), t.elapsed(), m.store().round_trips())
        }));
    }
    let mut lat = Vec::new();
    let mut trips = Vec::new();
    for t in tasks {
        let (r, d, rt) = t.await?;
        r.context("acquisition failed")?;
        lat.push(d);
        trips.push(rt);
    }
    let all_acquired = start.elapsed();
    let mut all_seen = Duration::ZERO;
    for t in seen_tasks {
        all_seen = all_seen.max(t.await?.duration_since(start));
    }
    let listed = admin.list_leases().await?.leases.len();
    anyhow::ensure!(listed == n, "expected {n} leases, found {listed}");
    lat.sort();

    // Baseline: N plain puts, same concurrency, one connection each.
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connect(endpoint, &prefix).await?.client());
    }
    let start = Instant::now();
    let mut puts = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let key = format!("/baseline{round}/{i}");
        puts.push(tokio::spawn(async move {
            c.put(key, "x", None).await.map(|_| ())
        }));
    }
    for p in puts {
        p.await??;
    }
    let baseline = start.elapsed();

    Ok(Row {
        n,
        all_acquired,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        round_trips: trips.iter().sum::<u64>() as f64 / n as f64,
        max_round_trips: trips.iter().copied().max().unwrap_or(0),
        watchers,
        all_seen,
        baseline,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Lease acquisition against a real etcd: N nodes join at once, watchers see every lease.
#[derive(Debug, clap::Parser)]
#[command(name = "lease-bench")]
struct Args {
    /// Numbers of joining nodes, one run each.
    #[arg(default_values_t = [10usize, 100, 1000], value_parser = clap::value_parser!(usize))]
    sizes: Vec<usize>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let sizes = <Args as clap::Parser>::parse().sizes;
    let etcd = tokio::task::spawn_blocking(test_support::Etcd::start)
        .await?
        .context("etcd is not installed (Debian package etcd-server)")?;
    let endpoint = etcd.endpoint();
    let mut rows = Vec::new();
    for (round, n) in sizes.into_iter().enumerate() {
        eprintln!("running N = {n} ...");
        rows.push(run_one(&endpoint, n, round).await?);
    }
    println!("Lease acquisition against one etcd 3.4 on loopback; N nodes join at once, one connection each.");
    println!("Baseline: N plain etcd puts at the same concurrency, same run.\n");
    println!("| N | all leased (ms) | per node p50 / p99 (ms) | etcd round trips per acquisition (mean / max) | watchers | all watchers saw all (ms) | baseline N puts (ms) | leased / baseline |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} / {} | {:.2} / {} | {} | {} | {} | {:.1}x |",
            r.n,
            ms(r.all_acquired),
            ms(r.p50),
            ms(r.p99),
            r.round_trips,
            r.max_round_trips,
            r.watchers,
            ms(r.all_seen),
            ms(r.baseline),
            r.all_acquired.as_secs_f64() / r.baseline.as_secs_f64().max(1e-9)
        );
    }
    drop(etcd);
    Ok(())
}
