//! The controller as a registry follower ([`registry::follow`], as the service proxy, the
//! policy module and cluster DNS follow it): every key under the prefix kept in [`Objects`],
//! and after each burst of changes a new [`Snapshot`] built and swapped in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_access::Connection;
use registry::follow::{follow, FollowOptions, Follower};
use tokio::sync::watch;

use crate::class::ClassConfig;
use crate::metrics::Metrics;
use crate::objects::Objects;
use crate::snapshot::Snapshot;
use crate::tls::CertCache;

/// Keeps the snapshot in step with the registry.
#[derive(Debug)]
pub struct Controller {
    objects: Objects,
    class: ClassConfig,
    certs: CertCache,
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Metrics,
    /// The conflicts last reported (reported again only when they change).
    conflicts: Vec<String>,
}

impl Controller {
    pub fn new(
        prefix: &str,
        class: ClassConfig,
        tx: watch::Sender<Arc<Snapshot>>,
        metrics: Metrics,
    ) -> Controller {
        let mut objects = Objects::new(prefix);
        objects.invalid_objects = metrics.invalid_objects.clone();
        Controller {
            objects,
            class,
            certs: CertCache::default(),
            tx,
            metrics,
            conflicts: Vec::new(),
        }
    }

    /// Builds the snapshot from the objects held and swaps it in.
    pub fn rebuild(&mut self) {
        let started = Instant::now();
        let previous = self.tx.borrow().clone();
        let (snap, report) =
            Snapshot::build(&self.objects, &self.class, &mut self.certs, &previous);
        for e in &report.cert_errors {
            tracing::warn!("ingress: {e}; its hosts get the default certificate");
        }
        let conflicts: Vec<String> = snap
            .routes
            .conflicts()
            .iter()
            .map(|c| c.to_string())
            .collect();
        if conflicts != self.conflicts {
            for c in &conflicts {
                tracing::warn!("ingress: conflict: {c}");
            }
            self.conflicts = conflicts;
        }
        for (b, up) in &snap.upstreams {
            if let Err(e) = &up.addrs {
                if previous
                    .upstreams
                    .get(b)
                    .is_none_or(|old| old.addrs != up.addrs)
                {
                    tracing::info!("ingress: {e} (requests for it get 503)");
                }
            }
        }
        self.metrics.routes.set(snap.routes.len() as i64);
        self.metrics.ingresses.set(report.ingresses as i64);
        self.metrics.conflicts.set(self.conflicts.len() as i64);
        self.metrics.reloads.inc();
        tracing::info!(
            ingresses = report.ingresses,
            routes = snap.routes.len(),
            backends = snap.upstreams.len(),
            certificates = snap.certs.len(),
            generation = snap.generation,
            took_ms = format_args!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
            "ingress: routes reloaded"
        );
        self.tx.send_replace(Arc::new(snap));
    }

    /// Follows the registry behind `conn` until `stop` turns true.
    pub async fn run(
        mut self,
        conn: Connection,
        debounce: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let opts = FollowOptions {
            name: "ingress",
            debounce,
            check_interval: Duration::from_secs(60),
        };
        follow(&conn, &opts, &mut self, &mut stop).await;
    }
}

impl Follower for Controller {
    type Error = std::convert::Infallible;

    fn clear(&mut self) {
        self.objects.clear();
    }

    fn apply(&mut self, key: &str, value: Option<&[u8]>, mod_revision: i64) -> bool {
        self.objects.apply(key, value, mod_revision)
    }

    async fn sync(&mut self) -> Result<(), Self::Error> {
        self.rebuild();
        Ok(())
    }

    async fn check(&mut self) -> bool {
        true
    }
}
