//! Publishes this node's pods to etcd: the CNI plugin writes one attachment record per pod in
//! `<--cni-data-dir>/attachments/<containerID>.json`; this task watches that directory (inotify
//! through `notify`, debounced, plus a full rescan every 10 s as a safety net) and makes the keys
//! `<prefix>/pods/<namespace>/<name>` with this node's `NodeIP` match the records that name a
//! pod and whose addresses lie in this node's subnet, unless the record's network namespace is
//! gone (a runtime that never called DEL: the record stays for `flannelctl pod gc`, the key
//! goes). Keys live on a dedicated etcd lease with a
//! 60 s TTL kept alive here (see `registry::pods`). etcd errors are retried with backoff and
//! never stop the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cni::attachment::{Attachment, Netns};
use cni::store::ATTACHMENTS_DIR;
use ipnet::IpNet;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use registry::pods::{pod_key, pods_prefix, KeepAlive, PodPublisher, PodRecord, SyncReport};
use subnet_lease::{Backoff, Connection, SubnetKey};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::health::Status;

/// Full rescan of the directory (and check of the watch), whatever the watch reports.
const RESCAN: Duration = Duration::from_secs(10);
/// Delay from a directory event to the pass it triggers: events meanwhile join that pass.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the task needs to know about this node.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// The CNI plugin's data directory (records in its `attachments/`).
    pub data_dir: PathBuf,
    /// `Node` in the records.
    pub node: String,
    /// `NodeIP` in the records: our PublicIP, which also marks the keys we own.
    /// The node's PublicIP (its PublicIPv6 on an IPv6-only node).
    pub node_ip: IpAddr,
}

/// The records this node should publish, keyed by etcd key, and why others are not.
#[derive(Debug, Default, PartialEq)]
pub struct Desired {
    pub records: BTreeMap<String, PodRecord>,
    /// (container ID, reason) of records that name a pod but are not published: warned about.
    pub skipped: Vec<(String, String)>,
    /// Records without a pod name (runtimes that do not pass K8S_POD_*): normal, not published.
    pub unnamed: usize,
}

fn in_subnet(ip: &IpNet, subnet: &SubnetKey) -> bool {
    match ip.addr() {
        IpAddr::V4(a) => subnet.ipv4.is_some_and(|n| n.contains(&a)),
        IpAddr::V6(a) => subnet.ipv6.is_some_and(|n| n.contains(&a)),
    }
}

/// Pure: the records to publish from the attachment records read. A record is published when
/// it names a pod with valid names (a name without a namespace is in `default`), its network
/// namespace is not in `gone` (container ID → why), it has an IPv4 address, and every address
/// lies in our lease's subnets (a record left from an earlier subnet is not routed here). Two
/// records for one pod: the newer (`time`, then container ID) wins.
pub fn desired(
    attachments: &[Attachment],
    prefix: &str,
    opts: &PodOptions,
    subnet: &SubnetKey,
    gone: &BTreeMap<String, String>,
) -> Desired {
    let mut sorted: Vec<&Attachment> = attachments.iter().collect();
    sorted.sort_by(|a, b| (&a.time, &a.container_id).cmp(&(&b.time, &b.container_id)));
    let mut out = Desired::default();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for a in sorted {
        let Some((ns, name)) = a.pod() else {
            out.unnamed += 1;
            continue;
        };
        let key = match pod_key(prefix, ns, name) {
            Ok(k) => k,
            Err(e) => {
                out.skipped.push((a.container_id.clone(), e.to_string()));
                continue;
            }
        };
        if let Some(why) = gone.get(&a.container_id) {
            out.skipped.push((
                a.container_id.clone(),
                format!(
                    "pod {ns}/{name}: {why} (its runtime did not call DEL; `flannelctl pod gc` \
                     releases its address)"
                ),
            ));
            continue;
        }
        if let Some(outside) = a.ips.iter().find(|ip| !in_subnet(ip, subnet)) {
            let nets: Vec<String> = (subnet.ipv4.map(|n| n.to_string()).into_iter())
                .chain(subnet.ipv6.map(|n| n.to_string()))
                .collect();
            out.skipped.push((
                a.container_id.clone(),
                format!(
                    "pod {ns}/{name}: address {outside} is outside this node's subnet {}",
                    nets.join(" and ")
                ),
            ));
            continue;
        }
        let ips: Vec<IpAddr> = a.ips.iter().map(IpNet::addr).collect();
        // The node's IPv4 subnet; its IPv6 one on an IPv6-only node.
        let node_subnet: Option<IpNet> = subnet.ipv4.map(IpNet::V4).or(subnet.ipv6.map(IpNet::V6));
        let record = node_subnet.and_then(|sn| {
            PodRecord::new(
                &ips,
                &opts.node,
                opts.node_ip,
                sn,
                &a.container_id,
                &a.ifname,
            )
        });
        let Some(record) = record else {
            out.skipped.push((
                a.container_id.clone(),
                format!("pod {ns}/{name}: no address"),
            ));
            continue;
        };
        if let Some(older) = owner.insert(key.clone(), a.container_id.clone()) {
            out.skipped.push((
                older,
                format!(
                    "pod {ns}/{name}: superseded by the newer record of container {}",
                    a.container_id
                ),
            ));
        }
        out.records.insert(key, record);
    }
    out
}

/// Warns once per message while it keeps recurring (every pass would repeat it otherwise).
#[derive(Debug, Default)]
struct Once {
    seen: BTreeSet<String>,
}

impl Once {
    /// Warns about the messages not warned about last time; forgets the ones gone.
    fn warn(&mut self, now: BTreeSet<String>) {
        for m in now.difference(&self.seen) {
            tracing::warn!("{m}");
        }
        self.seen = now;
    }
}

/// Keeps an inotify watch on the attachments directory, creating it (0700) when missing and
/// watching again when it was removed or replaced.
struct DirWatch {
    dir: PathBuf,
    tx: mpsc::Sender<()>,
    /// The watcher, the watched directory's (device, inode), and whether the watcher saw the
    /// directory itself go (its inode number may come back for a new directory).
    watcher: Option<(RecommendedWatcher, (u64, u64), Arc<AtomicBool>)>,
}

impl DirWatch {
    fn ensure(&mut self) -> Result<(), String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let meta =
            std::fs::metadata(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let id = (meta.dev(), meta.ino());
        if let Some((_, watched, gone)) = &self.watcher {
            if *watched == id && !gone.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        self.watcher = None;
        let tx = self.tx.clone();
        let gone = Arc::new(AtomicBool::new(false));
        let (dir, gone_cb) = (self.dir.clone(), gone.clone());
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Our own reads show up as access events: only changes count. Errors (e.g. a full
            // event queue) may hide changes, so they trigger a pass too.
            let relevant = match res {
                Ok(ev) => {
                    if matches!(ev.kind, EventKind::Remove(_)) && ev.paths.contains(&dir) {
                        gone_cb.store(true, Ordering::Relaxed);
                    }
                    !matches!(ev.kind, EventKind::Access(_))
                }
                Err(_) => true,
            };
            if relevant {
                // A full channel means a pass is already pending.
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| format!("starting a watcher: {e}"))?;
        w.watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("watching {}: {e}", self.dir.display()))?;
        tracing::debug!("watching {}", self.dir.display());
        self.watcher = Some((w, id, gone));
        Ok(())
    }
}

/// Starts the task, unless `--cni-data-dir` is empty (publishing off).
pub fn spawn(
    opts: PodOptions,
    conn: Connection,
    subnet: watch::Receiver<SubnetKey>,
    status: Arc<Status>,
) -> Option<tokio::task::JoinHandle<()>> {
    if opts.data_dir.as_os_str().is_empty() {
        tracing::info!("--cni-data-dir is empty: not publishing pods");
        return None;
    }
    Some(tokio::spawn(run(opts, conn, subnet, status)))
}

struct Task {
    opts: PodOptions,
    prefix: String,
    publisher: PodPublisher,
    subnet: watch::Receiver<SubnetKey>,
    status: Arc<Status>,
    skipped: Once,
    conflicts: Once,
    /// Whether we said once that namespace liveness cannot be told from here.
    told_unknown: bool,
}

impl Task {
    /// One pass: read every record, publish what should be. Ok(true) when a key changed under
    /// us meanwhile (worth another pass soon).
    async fn reconcile(&mut self) -> Result<bool, String> {
        let data_dir = self.opts.data_dir.clone();
        let read = tokio::task::spawn_blocking(move || {
            // read_attachments treats an unreadable directory like an empty one; that must not
            // unpublish every pod, so it is checked first.
            let dir = data_dir.join(ATTACHMENTS_DIR);
            match std::fs::read_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("listing {}: {e}", dir.display()))
                }
                _ => {}
            }
            let (attachments, errors) = cni::store::read_attachments(&data_dir);
            // Whose network namespace is gone, and one reason we could not tell, if any.
            let mut gone = BTreeMap::new();
            let mut unknown = None;
            for a in attachments.iter().filter(|a| a.pod().is_some()) {
                match cni::attachment::netns_state(a) {
                    Netns::Present => {}
                    Netns::Gone(why) => {
                        gone.insert(a.container_id.clone(), why);
                    }
                    Netns::Unknown(why) => {
                        unknown.get_or_insert(format!("container {}: {why}", a.container_id));
                    }
                }
            }
            Ok((attachments, errors, gone, unknown))
        })
        .await
        .map_err(|e| format!("reading the attachment records: {e}"))?;
        let (attachments, errors, gone, unknown) = read?;
        if let Some(why) = unknown.filter(|_| !self.told_unknown) {
            self.told_unknown = true;
            tracing::info!(
                "cannot tell whether some pods' network namespaces still exist, so they stay \
                 published until DEL or GC ({why})"
            );
        }
        let subnet = *self.subnet.borrow();
        let d = desired(&attachments, &self.prefix, &self.opts, &subnet, &gone);
        let mut notes: BTreeSet<String> = errors
            .into_iter()
            .map(|e| format!("attachment record skipped: {e}"))
            .collect();
        notes.extend(
            d.skipped
                .iter()
                .map(|(id, why)| format!("attachment of container {id} not published: {why}")),
        );
        self.skipped.warn(notes);
        tracing::debug!(
            "{} attachment records: {} to publish, {} without a pod name",
            attachments.len(),
            d.records.len(),
            d.unnamed
        );
        let report = self
            .publisher
            .sync(&d.records)
            .await
            .map_err(|e| format!("publishing pods: {e}"))?;
        self.note(&report);
        Ok(!report.raced.is_empty())
    }

    fn note(&mut self, report: &SyncReport) {
        self.status.pods_published.set(report.published as i64);
        let mut notes: BTreeSet<String> = report
            .conflicts
            .iter()
            .map(|c| {
                format!(
                    "pod key {} is held by {}: not overwritten (published once it is gone)",
                    c.key, c.holder
                )
            })
            .collect();
        notes.extend(
            report
                .invalid
                .iter()
                .map(|(k, why)| format!("ignoring invalid pod key {k}: {why}")),
        );
        self.conflicts.warn(notes);
    }
}

async fn run(
    opts: PodOptions,
    conn: Connection,
    subnet: watch::Receiver<SubnetKey>,
    status: Arc<Status>,
) {
    let dir = opts.data_dir.join(ATTACHMENTS_DIR);
    tracing::info!(
        "publishing the pods recorded in {} under {} as node {:?} ({})",
        dir.display(),
        pods_prefix(conn.prefix()),
        opts.node,
        opts.node_ip
    );
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let mut dir_watch = DirWatch {
        dir,
        tx,
        watcher: None,
    };
    let mut task = Task {
        prefix: conn.prefix().to_string(),
        publisher: PodPublisher::new(conn, opts.node_ip),
        opts,
        subnet,
        status,
        skipped: Once::default(),
        conflicts: Once::default(),
        told_unknown: false,
    };
    let mut watch_problem = Once::default();
    let ensure_watch = |w: &mut DirWatch, problem: &mut Once| {
        let note = match w.ensure() {
            Ok(()) => BTreeSet::new(),
            Err(e) => BTreeSet::from([format!(
                "pod attachments: {e}; relying on the rescan every {RESCAN:?}"
            )]),
        };
        problem.warn(note);
    };
    ensure_watch(&mut dir_watch, &mut watch_problem);

    let period = task.publisher.keep_alive_interval();
    let mut keep_alive = tokio::time::interval_at(Instant::now() + period, period);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval_at(Instant::now() + RESCAN, RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    // When the next pass is due; the first one at once (it also removes our stale keys).
    let mut due = Some(Instant::now());
    let soon = |due: Option<Instant>, at: Instant| Some(due.map_or(at, |d| d.min(at)));
    loop {
        let wake = due.unwrap_or_else(|| Instant::now() + RESCAN * 10);
        tokio::select! {
            Some(()) = changes.recv() => due = soon(due, Instant::now() + DEBOUNCE),
            _ = rescan.tick() => {
                ensure_watch(&mut dir_watch, &mut watch_problem);
                due = soon(due, Instant::now());
            }
            changed = task.subnet.changed() => {
                if changed.is_err() {
                    return; // the daemon is stopping
                }
                due = soon(due, Instant::now());
            }
            _ = keep_alive.tick() => match task.publisher.keep_alive().await {
                Ok(KeepAlive::Renewed(ttl)) => tracing::debug!("pod lease renewed, TTL {ttl:?}"),
                Ok(KeepAlive::Granted(_) | KeepAlive::Regranted { .. }) => {
                    due = soon(due, Instant::now());
                }
                Err(e) => {
                    task.status.pod_publish_errors.inc();
                    tracing::warn!("keeping the pod lease alive: {e}");
                }
            },
            _ = tokio::time::sleep_until(wake), if due.is_some() => {
                due = None;
                ensure_watch(&mut dir_watch, &mut watch_problem);
                // Let a burst of events settle: what arrived meanwhile is covered by this pass.
                while changes.try_recv().is_ok() {}
                match task.reconcile().await {
                    Ok(raced) => {
                        backoff.reset();
                        if raced {
                            due = Some(Instant::now() + DEBOUNCE);
                        }
                    }
                    Err(e) => {
                        task.status.pod_publish_errors.inc();
                        let d = backoff.next_delay();
                        tracing::warn!("{e}; retrying in {d:?}");
                        due = Some(Instant::now() + d);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: &str = "/coreos.com/network";

    fn att(id: &str, pod: Option<(&str, &str)>, ips: &[&str], time: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{id}"),
            netns_id: None,
            pod_namespace: pod.map(|p| p.0.to_string()),
            pod_name: pod.map(|p| p.1.to_string()),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            network: "cbr0".into(),
            time: time.into(),
        }
    }

    fn opts() -> PodOptions {
        PodOptions {
            data_dir: PathBuf::from("/nonexistent"),
            node: "node0".into(),
            node_ip: std::net::Ipv4Addr::new(172, 30, 0, 11).into(),
        }
    }

    fn subnet() -> SubnetKey {
        SubnetKey::v4("10.5.52.0/24".parse().unwrap())
    }

    #[test]
    fn only_named_pods_in_our_subnet_are_published() {
        let atts = vec![
            att("a", Some(("default", "web-0")), &["10.5.52.2/24"], "t1"),
            att("b", None, &["10.5.52.3/24"], "t1"),
            att("c", Some(("default", "far")), &["10.5.53.2/24"], "t1"),
            att("d", Some(("default", "Bad_Name")), &["10.5.52.4/24"], "t1"),
            att("e", Some(("x/y", "p")), &["10.5.52.5/24"], "t1"),
            att("f", Some(("default", "v6")), &["fc00::5/64"], "t1"),
            att(
                "g",
                Some(("default", "mixed")),
                &["10.5.52.6/24", "10.5.60.6/24"],
                "t1",
            ),
        ];
        let d = desired(&atts, P, &opts(), &subnet(), &BTreeMap::new());
        let keys: Vec<&str> = d.records.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["/coreos.com/network/pods/default/web-0"]);
        let r = &d.records["/coreos.com/network/pods/default/web-0"];
        assert_eq!(r.ip, IpAddr::from([10, 5, 52, 2]));
        assert_eq!(r.ips, vec![IpAddr::from([10, 5, 52, 2])]);
        assert_eq!((r.node.as_str(), r.node_ip), ("node0", opts().node_ip));
        assert_eq!(Some(r.subnet), subnet().ipv4.map(IpNet::V4));
        assert_eq!((r.container_id.as_str(), r.ifname.as_str()), ("a", "eth0"));
        assert_eq!(d.unnamed, 1);
        let skipped: Vec<&str> = d.skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(skipped, vec!["c", "d", "e", "f", "g"]);
        assert!(d.skipped[0]
            .1
            .contains("outside this node's subnet 10.5.52.0/24"));
        assert!(d.skipped[1].1.contains("DNS-1123"));
    }

    #[test]
    fn podman_names_go_to_default_and_gone_namespaces_are_dropped() {
        let mut podman = att("p", None, &["10.5.52.7/24"], "t1");
        podman.pod_name = Some("web".into());
        let atts = vec![
            podman,
            att("a", Some(("x", "kept")), &["10.5.52.2/24"], "t1"),
            att("z", Some(("x", "left")), &["10.5.52.3/24"], "t1"),
        ];
        let gone = BTreeMap::from([(
            "z".to_string(),
            "network namespace /proc/42/ns/net no longer exists".to_string(),
        )]);
        let d = desired(&atts, P, &opts(), &subnet(), &gone);
        let keys: Vec<&str> = d.records.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec![
                "/coreos.com/network/pods/default/web",
                "/coreos.com/network/pods/x/kept"
            ]
        );
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(d.skipped[0].0, "z");
        assert!(
            d.skipped[0].1.contains("no longer exists"),
            "{:?}",
            d.skipped
        );
        assert!(
            d.skipped[0].1.contains("flannelctl pod gc"),
            "{:?}",
            d.skipped
        );
    }

    #[test]
    fn dual_stack_and_duplicates() {
        let dual = SubnetKey::dual(
            "10.5.52.0/24".parse().unwrap(),
            "fc00:0:0:34::/64".parse().unwrap(),
        );
        let atts = vec![
            att(
                "new",
                Some(("default", "web")),
                &["fc00:0:0:34::9/64", "10.5.52.9/24"],
                "t2",
            ),
            att("old", Some(("default", "web")), &["10.5.52.8/24"], "t1"),
            att(
                "v6only",
                Some(("default", "v6")),
                &["fc00:0:0:34::7/64"],
                "t1",
            ),
        ];
        let d = desired(&atts, P, &opts(), &dual, &BTreeMap::new());
        assert_eq!(d.records.len(), 2);
        let r = &d.records["/coreos.com/network/pods/default/web"];
        assert_eq!(r.container_id, "new");
        assert_eq!(r.ip, IpAddr::from([10, 5, 52, 9]), "IPv4 first, as podIP");
        assert_eq!(r.ips.len(), 2);
        // A pod with only an IPv6 address is published with it.
        let r = &d.records["/coreos.com/network/pods/default/v6"];
        assert_eq!(r.ip, "fc00:0:0:34::7".parse::<IpAddr>().unwrap());
        assert_eq!(r.subnet, "10.5.52.0/24".parse::<IpNet>().unwrap());
        // On an IPv6-only node: the IPv6 subnet, the node's PublicIPv6.
        let v6node = SubnetKey::v6("fc00:0:0:34::/64".parse().unwrap());
        let mut o = opts();
        o.node_ip = "fd00:210::b".parse().unwrap();
        let d2 = desired(&atts[2..], P, &o, &v6node, &BTreeMap::new());
        let r = &d2.records["/coreos.com/network/pods/default/v6"];
        assert_eq!(r.subnet, "fc00:0:0:34::/64".parse::<IpNet>().unwrap());
        assert_eq!(
            r.to_json(),
            r#"{"IP":"fc00:0:0:34::7","IPs":["fc00:0:0:34::7"],"Node":"node0","NodeIP":"fd00:210::b","Subnet":"fc00:0:0:34::/64","ContainerID":"v6only","Ifname":"eth0"}"#
        );
        let skipped: BTreeMap<&str, &str> = d
            .skipped
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert!(skipped["old"].contains("superseded"), "{skipped:?}");
    }

    #[test]
    fn the_directory_is_created_0700_and_watched() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("flannel").join(ATTACHMENTS_DIR);
        let (tx, mut rx) = mpsc::channel(1);
        let mut w = DirWatch {
            dir: dir.clone(),
            tx,
            watcher: None,
        };
        w.ensure().unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.join("x.json"), "{}").unwrap();
        let got = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            rx.try_recv().ok()
        });
        assert!(got.is_some(), "no event for a new file");
        // Replaced directory (its inode number may be reused): watched again once the watcher
        // has seen it go.
        std::fs::remove_dir_all(&dir).unwrap();
        let gone = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            w.watcher
                .as_ref()
                .unwrap()
                .2
                .load(Ordering::Relaxed)
                .then_some(())
        });
        assert!(gone.is_some(), "the watcher did not see the directory go");
        w.ensure().unwrap();
        while rx.try_recv().is_ok() {}
        std::fs::write(dir.join("y.json"), "{}").unwrap();
        let got = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            rx.try_recv().ok()
        });
        assert!(got.is_some(), "no event after the directory was replaced");
    }
}
