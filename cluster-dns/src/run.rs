//! The server's loop: bind, follow the registry ([`registry::follow`]), rebuild the zone after
//! every burst of changes and swap it in; serve once the first zone is in (or after
//! [`FIRST_ZONE_WAIT`] without etcd, answering outside names meanwhile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_access::Connection;
use registry::follow::{follow, FollowOptions, Follower};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::cache::CacheLimits;
use crate::index::{Index, IndexConfig};
use crate::metrics::DnsMetrics;
use crate::objects::Objects;
use crate::server::{self, Listeners, Shared};
use crate::upstream::Upstream;
use crate::Error;

/// How long serving waits for the first zone from etcd.
pub const FIRST_ZONE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Where to serve, UDP and TCP.
    pub listen: Vec<SocketAddr>,
    pub index: IndexConfig,
    pub upstream: Upstream,
    pub cache: CacheLimits,
    /// How long to wait for more changes after one arrives before rebuilding the zone.
    pub debounce: Duration,
    /// UDP sockets (and tasks) per address.
    pub udp_sockets: usize,
    /// Questions waiting for upstream at most.
    pub max_forwards: usize,
}

impl DnsOptions {
    pub fn new(listen: Vec<SocketAddr>, index: IndexConfig, upstream: Upstream) -> DnsOptions {
        DnsOptions {
            listen,
            index,
            upstream,
            cache: CacheLimits::default(),
            debounce: Duration::from_millis(20),
            udp_sockets: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_forwards: 1024,
        }
    }
}

/// A bound server, not yet serving.
#[derive(Debug)]
pub struct DnsServer {
    opts: DnsOptions,
    listeners: Listeners,
    shared: Arc<Shared>,
}

impl DnsServer {
    /// Binds the sockets (errors name the address).
    pub fn bind(opts: DnsOptions, metrics: DnsMetrics) -> Result<DnsServer, Error> {
        let listeners = server::bind(&opts.listen, opts.udp_sockets)?;
        let shared = Shared::new(
            Index::build(&opts.index, &Objects::new(""), 0),
            opts.cache,
            opts.upstream.clone(),
            metrics,
            opts.max_forwards,
        );
        Ok(DnsServer {
            opts,
            listeners,
            shared,
        })
    }

    /// The UDP addresses served (with the ports picked for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self
            .listeners
            .udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        v.dedup();
        v
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn spawn_sockets(listeners: Listeners, shared: &Arc<Shared>) -> Sockets {
        let (stop, stop_rx) = watch::channel(false);
        let mut threads = Vec::new();
        for (i, s) in listeners.udp.into_iter().enumerate() {
            match server::spawn_udp_thread(
                s,
                shared.clone(),
                stop_rx.clone(),
                format!("dns-udp-{i}"),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cluster DNS: cannot start a UDP thread"),
            }
        }
        let mut tasks = JoinSet::new();
        for l in listeners.tcp {
            tasks.spawn(server::serve_tcp(l, shared.clone()));
        }
        Sockets {
            stop,
            threads,
            tasks,
        }
    }

    /// Serves a fixed set of objects until `stop` turns true (benches, tests).
    pub async fn serve_objects(self, objects: &Objects, mut stop: watch::Receiver<bool>) {
        let ix = Index::build(&self.opts.index, objects, 1);
        self.shared.metrics().records.set(ix.len() as i64);
        self.shared.set_index(ix);
        let sockets = Self::spawn_sockets(self.listeners, &self.shared);
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        sockets.stop().await;
    }

    /// Follows the registry behind `conn` and serves until `stop` turns true.
    pub async fn run(self, conn: Connection, mut stop: watch::Receiver<bool>) {
        let (ready_tx, ready_rx) = oneshot::channel();
        let metrics = self.shared.metrics().clone();
        let verified = self.opts.index.pods == crate::index::PodMode::Verified;
        let mut objects = Objects::new(conn.prefix()).with_pod_ips(verified);
        objects.invalid_objects = metrics.invalid_objects.clone();
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let mut zone = Zone {
            objects,
            config: self.opts.index.clone(),
            shared: self.shared.clone(),
            serial,
            ready: Some(ready_tx),
        };
        let follow_opts = FollowOptions {
            name: "cluster DNS",
            debounce: self.opts.debounce,
            check_interval: Duration::from_secs(60),
        };
        let mut follow_stop = stop.clone();
        let follower = async move {
            follow(&conn, &follow_opts, &mut zone, &mut follow_stop).await;
        };
        tokio::pin!(follower);
        // Serve once the first zone is in, or after FIRST_ZONE_WAIT.
        tokio::select! {
            _ = &mut follower => return,
            _ = async {
                let _ = tokio::time::timeout(FIRST_ZONE_WAIT, ready_rx).await;
            } => {}
        }
        let addrs = self.local_addrs();
        let sockets = Self::spawn_sockets(self.listeners, &self.shared);
        tracing::info!(?addrs, "cluster DNS: serving");
        tokio::select! {
            _ = &mut follower => {}
            _ = async {
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        break;
                    }
                }
            } => {}
        }
        sockets.stop().await;
    }
}

/// The serving threads (UDP) and tasks (TCP).
struct Sockets {
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: JoinSet<()>,
}

impl Sockets {
    /// Stops them; the threads are waited for (bounded: they stop at the next wake-up).
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!("cluster DNS: a UDP thread did not stop within 5 s");
        }
    }
}

/// The zone as a registry follower.
struct Zone {
    objects: Objects,
    config: IndexConfig,
    shared: Arc<Shared>,
    serial: u32,
    ready: Option<oneshot::Sender<()>>,
}

impl Follower for Zone {
    type Error = std::convert::Infallible;

    fn clear(&mut self) {
        self.objects.clear();
    }

    fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        self.objects.apply(key, value, mod_revision)
    }

    async fn sync(&mut self) -> Result<(), Self::Error> {
        let started = Instant::now();
        self.serial = self.serial.wrapping_add(1);
        let ix = Index::build(&self.config, &self.objects, self.serial);
        let names = ix.len();
        let m = self.shared.metrics();
        m.records.set(names as i64);
        m.reloads.inc();
        self.shared.set_index(ix);
        tracing::info!(
            services = self.objects.service_count(),
            names,
            serial = self.serial,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "cluster DNS: zone reloaded"
        );
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn check(&mut self) -> bool {
        true
    }
}
