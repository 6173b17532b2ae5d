//! Pod records: where each pod attached on a node lives, published by that node's flanneld
//! under `<prefix>/pods/<namespace>/<name>` so other components (a service proxy, network
//! policy) can find pods without a Kubernetes API server.
//!
//! Value, with flannel-style PascalCase keys:
//! `{"IP":"10.5.52.2","IPs":["10.5.52.2"],"Node":"node-a","NodeIP":"192.168.64.3",
//! "Subnet":"10.5.52.0/24","ContainerID":"4f2c…","Ifname":"eth0"}`.
//!
//! Ownership: a key belongs to the node whose `PublicIP` is its `NodeIP`. A node only creates
//! keys that do not exist, and only rewrites or deletes keys that carry its own `NodeIP` and are
//! unchanged since it read them (one txn each), so it never touches another node's pods. Every
//! key of a node is bound to one dedicated etcd lease with a short TTL ([`POD_LEASE_TTL`]) that
//! the node keeps alive: the pods of a node that is gone vanish within a minute. (The subnet
//! lease, with its 24 h TTL, is never used for pods.)
//!
//! Pure parts: [`pod_key`], [`parse_pod_key`] (names checked by [`crate::validate`]), [`plan`]
//! and [`plan_published`]. The etcd side, over an [`etcd_access::Connection`]: [`list_pods`],
//! [`put_pod`], [`delete_pod`], and [`PodPublisher`], which owns the etcd lease.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use etcd_access::{Connection, EtcdError};

use crate::validate::{is_dns1123_label, is_dns1123_subdomain};

/// The directory under the etcd prefix holding pod records.
pub const PODS_DIR: &str = "pods";

/// TTL of the etcd lease the pod keys are bound to: a dead node's pods vanish within it.
pub const POD_LEASE_TTL: Duration = Duration::from_secs(60);

/// One pod as published in etcd. IPv4 records are as they always were; a pod of an IPv6-only
/// node has its first IPv6 address as `IP`, the node's PublicIPv6 as `NodeIP` and its IPv6
/// subnet as `Subnet`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// The pod's primary address: its first IPv4 address, else its first IPv6 one (as a
    /// Pod's `status.podIP`).
    #[serde(rename = "IP")]
    pub ip: IpAddr,
    /// Every address of the pod, without prefix length.
    #[serde(rename = "IPs")]
    pub ips: Vec<IpAddr>,
    /// The node's name (`--node-name`).
    #[serde(rename = "Node")]
    pub node: String,
    /// The node's `PublicIP` (`PublicIPv6` on an IPv6-only node, whose PublicIP is 0.0.0.0);
    /// also says which node owns the key.
    #[serde(rename = "NodeIP")]
    pub node_ip: IpAddr,
    /// The node's subnet (its lease's IPv4 subnet; the IPv6 one on an IPv6-only node).
    #[serde(rename = "Subnet")]
    pub subnet: IpNet,
    #[serde(rename = "ContainerID")]
    pub container_id: String,
    #[serde(rename = "Ifname")]
    pub ifname: String,
}

impl PodRecord {
    /// A record for a pod with addresses `ips`; `None` when it has none.
    pub fn new(
        ips: &[IpAddr],
        node: &str,
        node_ip: impl Into<IpAddr>,
        subnet: impl Into<IpNet>,
        container_id: &str,
        ifname: &str,
    ) -> Option<PodRecord> {
        let ip = ips
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| ips.first())
            .copied()?;
        let (node_ip, subnet) = (node_ip.into(), subnet.into());
        Some(PodRecord {
            ip,
            ips: ips.to_vec(),
            node: node.to_string(),
            node_ip,
            subnet,
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    }

    /// The pod's IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => self.ips.iter().find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
        }
    }

    /// The pod's first IPv6 address, if it has one.
    pub fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        std::iter::once(&self.ip)
            .chain(&self.ips)
            .find_map(|a| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
    }

    /// Every address (`IP` first), without duplicates.
    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut v = vec![self.ip];
        for a in &self.ips {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    }

    pub fn to_json(&self) -> String {
        // Serializing strings and addresses cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A namespace or pod name that cannot name an etcd key, or a key that names no pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPod {
    #[error("namespace {0:?} is not a DNS-1123 label (lower case letters, digits, '-'; at most 63; starts and ends with a letter or digit)")]
    Namespace(String),
    #[error("pod name {0:?} is not a DNS-1123 subdomain (lower case letters, digits, '-', '.'; at most 253; each part starts and ends with a letter or digit)")]
    Name(String),
    #[error("key {0:?} is not <prefix>/pods/<namespace>/<name>")]
    Key(String),
}

/// Checks a namespace and pod name before they become parts of an etcd key.
pub fn check_pod(namespace: &str, name: &str) -> Result<(), InvalidPod> {
    if !is_dns1123_label(namespace) {
        return Err(InvalidPod::Namespace(namespace.to_string()));
    }
    if !is_dns1123_subdomain(name) {
        return Err(InvalidPod::Name(name.to_string()));
    }
    Ok(())
}

/// `<prefix>/pods/` (the prefix without its trailing slashes).
pub fn pods_prefix(prefix: &str) -> String {
    format!("{}/{PODS_DIR}/", prefix.trim_end_matches('/'))
}

/// The key of a pod: `<prefix>/pods/<namespace>/<name>`, after checking both names.
pub fn pod_key(prefix: &str, namespace: &str, name: &str) -> Result<String, InvalidPod> {
    check_pod(namespace, name)?;
    Ok(format!("{}{namespace}/{name}", pods_prefix(prefix)))
}

/// `(namespace, name)` of a key under `<prefix>/pods/`.
pub fn parse_pod_key<'a>(prefix: &str, key: &'a str) -> Result<(&'a str, &'a str), InvalidPod> {
    let bad = || InvalidPod::Key(key.to_string());
    let rest = key.strip_prefix(&pods_prefix(prefix)).ok_or_else(bad)?;
    let (ns, name) = rest.split_once('/').ok_or_else(bad)?;
    check_pod(ns, name)?;
    Ok((ns, name))
}

/// What to change so that the keys we hold (`actual`) become `desired`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodPlan {
    /// Keys to write: missing or different.
    pub puts: Vec<(String, PodRecord)>,
    /// Keys to remove: held but not desired.
    pub deletes: Vec<String>,
}

/// The difference between the records this node wants published and the ones it has (`actual`
/// holds only keys with this node's `NodeIP`, so other nodes' pods are never planned for).
pub fn plan(
    desired: &BTreeMap<String, PodRecord>,
    actual: &BTreeMap<String, PodRecord>,
) -> PodPlan {
    PodPlan {
        puts: desired
            .iter()
            .filter(|(k, v)| actual.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: actual
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// A pod key as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPod {
    pub record: PodRecord,
    /// The etcd lease the key is bound to (0: none).
    pub etcd_lease: i64,
    pub mod_revision: i64,
}

/// Every pod key under the prefix.
#[derive(Debug, Clone, Default)]
pub struct PodList {
    pub pods: BTreeMap<String, PublishedPod>,
    /// Keys under `pods/` that are not valid records: key → reason. Skipped, never touched.
    pub invalid: BTreeMap<String, String>,
    pub revision: i64,
}

/// What a put may find at its key: the txn guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must be unchanged since it was read at this mod revision.
    ModRevision(i64),
}

/// A desired key this node does not write because another holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    /// Who holds it: `node <Node> (<NodeIP>)`, or why its value is unreadable.
    pub holder: String,
}

/// [`plan`] applied to a listing: what this node (`node_ip`, pod keys bound to `etcd_lease`)
/// puts (with guards) and deletes (with the mod revision read), and which desired keys it
/// leaves alone because another node holds them or their value is unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishPlan {
    pub puts: Vec<(String, PodRecord, Expect)>,
    pub deletes: Vec<(String, i64)>,
    pub conflicts: Vec<Conflict>,
}

/// Plans against a listing: `actual` is the listed keys with our `NodeIP`; a desired key that
/// is ours but bound to another etcd lease (a previous run's) is rewritten onto `etcd_lease`,
/// so it does not vanish when that lease expires; a desired key held by another node (or
/// unreadable) is a conflict, never overwritten.
pub fn plan_published(
    desired: &BTreeMap<String, PodRecord>,
    listed: &PodList,
    node_ip: IpAddr,
    etcd_lease: i64,
) -> PublishPlan {
    let actual: BTreeMap<String, PodRecord> = listed
        .pods
        .iter()
        .filter(|(_, p)| p.record.node_ip == node_ip)
        .map(|(k, p)| (k.clone(), p.record.clone()))
        .collect();
    let base = plan(desired, &actual);
    let planned: BTreeSet<&String> = base.puts.iter().map(|(k, _)| k).collect();
    let rebinds: Vec<(String, PodRecord)> = desired
        .iter()
        .filter(|(k, _)| !planned.contains(k))
        .filter(|(k, _)| {
            listed
                .pods
                .get(*k)
                .is_some_and(|p| p.record.node_ip == node_ip && p.etcd_lease != etcd_lease)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = PublishPlan::default();
    for (key, record) in base.puts.into_iter().chain(rebinds) {
        if let Some(reason) = listed.invalid.get(&key) {
            out.conflicts.push(Conflict {
                key,
                holder: format!("an unreadable value ({reason})"),
            });
            continue;
        }
        match listed.pods.get(&key) {
            None => out.puts.push((key, record, Expect::Absent)),
            Some(p) if p.record.node_ip == node_ip => {
                out.puts
                    .push((key, record, Expect::ModRevision(p.mod_revision)))
            }
            Some(p) => out.conflicts.push(Conflict {
                key,
                holder: format!("node {:?} ({})", p.record.node, p.record.node_ip),
            }),
        }
    }
    out.puts.sort_by(|a, b| a.0.cmp(&b.0));
    out.deletes = base
        .deletes
        .into_iter()
        .filter_map(|k| {
            let rev = listed.pods.get(&k)?.mod_revision;
            Some((k, rev))
        })
        .collect();
    out
}

/// Every key under `<prefix>/pods/` (one prefix get).
pub async fn list_pods(conn: &Connection) -> Result<PodList, EtcdError> {
    let mut c = conn.client();
    let prefix = pods_prefix(conn.prefix());
    let resp = conn
        .call(
            "list pods",
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut out = PodList {
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        ..PodList::default()
    };
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let decoded = parse_pod_key(conn.prefix(), &key)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                serde_json::from_slice::<PodRecord>(kv.value())
                    .map_err(|e| format!("bad pod JSON: {e}"))
            });
        match decoded {
            Ok(record) => {
                out.pods.insert(
                    key,
                    PublishedPod {
                        record,
                        etcd_lease: kv.lease(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
            Err(reason) => {
                out.invalid.insert(key, reason);
            }
        }
    }
    Ok(out)
}

/// Writes `record` at `key` bound to `etcd_lease`, only if the key is as `expect` says (one
/// txn). Returns false when it is not (someone changed it meanwhile).
pub async fn put_pod(
    conn: &Connection,
    key: &str,
    record: &PodRecord,
    etcd_lease: i64,
    expect: Expect,
) -> Result<bool, EtcdError> {
    let mut c = conn.client();
    let guard = match expect {
        Expect::Absent => Compare::version(key, CompareOp::Equal, 0),
        Expect::ModRevision(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
    };
    let txn = Txn::new().when([guard]).and_then([TxnOp::put(
        key,
        record.to_json(),
        Some(PutOptions::new().with_lease(etcd_lease)),
    )]);
    conn.call("put pod", c.txn(txn))
        .await
        .map(|r| r.succeeded())
        .map_err(|e| e.for_key(key))
}

/// Deletes `key` only if unchanged since it was read at `mod_revision`. Returns false when
/// it changed (or is gone).
pub async fn delete_pod(
    conn: &Connection,
    key: &str,
    mod_revision: i64,
) -> Result<bool, EtcdError> {
    let mut c = conn.client();
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
        .and_then([TxnOp::delete(key, None)]);
    conn.call("delete pod", c.txn(txn))
        .await
        .map(|r| r.succeeded())
        .map_err(|e| e.for_key(key))
}

/// What one keep-alive of the pod lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// The lease lives on with this TTL.
    Renewed(Duration),
    /// There was no lease yet: one was granted.
    Granted(i64),
    /// The lease was gone (expired while etcd was unreachable, or revoked), so its keys are
    /// gone too: a new one was granted. Sync again to re-put everything.
    Regranted { old: i64, new: i64 },
}

/// What one [`PodPublisher::sync`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Keys written (new, changed, or moved onto our etcd lease).
    pub put: Vec<String>,
    pub deleted: Vec<String>,
    /// Desired keys held by another node (or unreadable): left alone.
    pub conflicts: Vec<Conflict>,
    /// Keys that changed between the listing and our txn: the next sync sees them again.
    pub raced: Vec<String>,
    /// Invalid keys under `pods/`: key → reason. Never touched.
    pub invalid: BTreeMap<String, String>,
    /// Keys with our NodeIP after the sync.
    pub published: usize,
    /// Whether a new etcd lease was granted for this sync.
    pub granted: bool,
}

/// Publishes one node's pods: keeps its dedicated etcd lease and makes the keys with its
/// `NodeIP` match the desired records.
#[derive(Debug)]
pub struct PodPublisher {
    conn: Connection,
    node_ip: IpAddr,
    ttl: Duration,
    lease: Option<i64>,
}

impl PodPublisher {
    pub fn new(conn: Connection, node_ip: impl Into<IpAddr>) -> Self {
        PodPublisher {
            conn,
            node_ip: node_ip.into(),
            ttl: POD_LEASE_TTL,
            lease: None,
        }
    }

    /// Another TTL for the pod lease (tests).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn node_ip(&self) -> IpAddr {
        self.node_ip
    }

    /// The etcd lease the pod keys are bound to, once granted.
    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    /// How often to call [`PodPublisher::keep_alive`]: a third of the TTL.
    pub fn keep_alive_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_secs(1))
    }

    async fn ensure_lease(&mut self) -> Result<(i64, bool), EtcdError> {
        if let Some(id) = self.lease {
            return Ok((id, false));
        }
        let id = self.conn.grant(self.ttl).await?;
        tracing::info!(
            "granted etcd lease {id:x} (TTL {:?}) for pod records",
            self.ttl
        );
        self.lease = Some(id);
        Ok((id, true))
    }

    /// One keep-alive of the pod lease; grants one when there is none or it is gone.
    pub async fn keep_alive(&mut self) -> Result<KeepAlive, EtcdError> {
        let Some(old) = self.lease else {
            let (id, _) = self.ensure_lease().await?;
            return Ok(KeepAlive::Granted(id));
        };
        match self.conn.keep_alive_once(old).await? {
            Some(ttl) => Ok(KeepAlive::Renewed(ttl)),
            None => {
                tracing::warn!(
                    "etcd lease {old:x} of the pod records is gone (expired or revoked); granting a new one and publishing again"
                );
                self.lease = None;
                let (new, _) = self.ensure_lease().await?;
                Ok(KeepAlive::Regranted { old, new })
            }
        }
    }

    /// Makes the keys with our NodeIP match `desired` (keys by [`pod_key`]): one listing, then
    /// a guarded txn per put and delete. Logs each put and delete at info. On an error the
    /// caller retries later; when etcd says our lease is gone, the next call grants a new one.
    pub async fn sync(
        &mut self,
        desired: &BTreeMap<String, PodRecord>,
    ) -> Result<SyncReport, EtcdError> {
        let (lease, granted) = self.ensure_lease().await?;
        let listed = list_pods(&self.conn).await?;
        let plan = plan_published(desired, &listed, self.node_ip, lease);
        let mut ours: BTreeSet<String> = listed
            .pods
            .iter()
            .filter(|(_, p)| p.record.node_ip == self.node_ip)
            .map(|(k, _)| k.clone())
            .collect();
        let mut report = SyncReport {
            conflicts: plan.conflicts,
            invalid: listed.invalid,
            granted,
            ..SyncReport::default()
        };
        for (key, record, expect) in &plan.puts {
            match put_pod(&self.conn, key, record, lease, *expect).await {
                Ok(true) => {
                    tracing::info!(
                        "published pod {}: IP {}, node {} ({})",
                        short_key(self.conn.prefix(), key),
                        record.ip,
                        record.node,
                        record.node_ip
                    );
                    ours.insert(key.clone());
                    report.put.push(key.clone());
                }
                Ok(false) => report.raced.push(key.clone()),
                Err(e) => {
                    if e.is_lease_not_found() {
                        tracing::warn!("etcd lease {lease:x} of the pod records is gone; a new one is granted on the next attempt");
                        self.lease = None;
                    }
                    return Err(e);
                }
            }
        }
        for (key, rev) in &plan.deletes {
            if delete_pod(&self.conn, key, *rev).await? {
                tracing::info!("unpublished pod {}", short_key(self.conn.prefix(), key));
                ours.remove(key);
                report.deleted.push(key.clone());
            } else {
                report.raced.push(key.clone());
            }
        }
        report.published = ours.len();
        Ok(report)
    }
}

/// `<namespace>/<name>` of a pod key, for logs.
fn short_key<'a>(prefix: &str, key: &'a str) -> &'a str {
    key.strip_prefix(&pods_prefix(prefix)).unwrap_or(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: &str = "/coreos.com/network";

    fn rec(ip: &str, node_ip: [u8; 4]) -> PodRecord {
        PodRecord::new(
            &[ip.parse().unwrap()],
            "node-a",
            Ipv4Addr::from(node_ip),
            "10.5.52.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
            "c1",
            "eth0",
        )
        .unwrap()
    }

    #[test]
    fn json_is_pascal_case_like_flannels_lease() {
        let r = PodRecord::new(
            &["10.5.52.2".parse().unwrap(), "fc00::2".parse().unwrap()],
            "node-a",
            Ipv4Addr::new(192, 168, 64, 3),
            "10.5.52.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
            "4f2c",
            "eth0",
        )
        .unwrap();
        assert_eq!(
            r.to_json(),
            r#"{"IP":"10.5.52.2","IPs":["10.5.52.2","fc00::2"],"Node":"node-a","NodeIP":"192.168.64.3","Subnet":"10.5.52.0/24","ContainerID":"4f2c","Ifname":"eth0"}"#
        );
        assert_eq!(serde_json::from_str::<PodRecord>(&r.to_json()).unwrap(), r);
        // The first IPv4 address is IP, whatever the order.
        let r6 = PodRecord::new(
            &["fc00::2".parse().unwrap(), "10.5.52.9".parse().unwrap()],
            "n",
            Ipv4Addr::LOCALHOST,
            "10.5.52.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
            "c",
            "eth0",
        )
        .unwrap();
        assert_eq!(r6.ip, IpAddr::from([10, 5, 52, 9]));
        assert_eq!(r6.ipv4(), Some(Ipv4Addr::new(10, 5, 52, 9)));
        assert_eq!(r6.ipv6(), Some("fc00::2".parse().unwrap()));
        assert_eq!(r6.addrs().len(), 2);
        // An IPv6-only pod (of an IPv6-only node): its IPv6 address, the node's PublicIPv6
        // and IPv6 subnet; read back as written.
        let v6 = PodRecord::new(
            &["fc00::2".parse().unwrap()],
            "n",
            "fd00::1".parse::<IpAddr>().unwrap(),
            "fc00::/64".parse::<IpNet>().unwrap(),
            "c",
            "eth0",
        )
        .unwrap();
        assert_eq!(
            (v6.ipv4(), v6.ip),
            (None, "fc00::2".parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            serde_json::from_str::<PodRecord>(&v6.to_json()).unwrap(),
            v6
        );
        // No address: no record.
        assert!(PodRecord::new(&[], "n", Ipv4Addr::LOCALHOST, v6.subnet, "c", "eth0").is_none());
    }

    #[test]
    fn keys_are_built_checked_and_parsed() {
        assert_eq!(
            pod_key(P, "default", "web-0").unwrap(),
            "/coreos.com/network/pods/default/web-0"
        );
        assert_eq!(pod_key("/x/", "ns", "a.b").unwrap(), "/x/pods/ns/a.b");
        assert_eq!(
            pod_key(P, "de/fault", "web").unwrap_err(),
            InvalidPod::Namespace("de/fault".into())
        );
        assert_eq!(
            pod_key(P, "default", "../../subnets/10.5.1.0-24").unwrap_err(),
            InvalidPod::Name("../../subnets/10.5.1.0-24".into())
        );
        assert!(pod_key(P, "", "a").is_err() && pod_key(P, "a", "").is_err());
        assert_eq!(
            parse_pod_key(P, "/coreos.com/network/pods/default/web-0").unwrap(),
            ("default", "web-0")
        );
        for bad in [
            "/coreos.com/network/pods/default",
            "/coreos.com/network/pods/default/web/0",
            "/coreos.com/network/pods/Default/web",
            "/coreos.com/network/subnets/10.5.1.0-24",
            "/other/pods/default/web",
        ] {
            assert!(parse_pod_key(P, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_puts_missing_and_changed_and_deletes_the_rest() {
        let k = |n: &str| pod_key(P, "default", n).unwrap();
        let me = [192, 168, 64, 3];
        let desired = BTreeMap::from([
            (k("same"), rec("10.5.52.2", me)),
            (k("changed"), rec("10.5.52.3", me)),
            (k("new"), rec("10.5.52.4", me)),
        ]);
        let actual = BTreeMap::from([
            (k("same"), rec("10.5.52.2", me)),
            (k("changed"), rec("10.5.52.30", me)),
            (k("stale"), rec("10.5.52.5", me)),
        ]);
        let p = plan(&desired, &actual);
        let puts: Vec<&str> = p.puts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(puts, vec![k("changed"), k("new")]);
        assert_eq!(p.puts[0].1.ip, Ipv4Addr::new(10, 5, 52, 3));
        assert_eq!(p.deletes, vec![k("stale")]);
        // Nothing to do when in step; everything goes when nothing is desired.
        assert_eq!(plan(&desired, &desired), PodPlan::default());
        let p = plan(&BTreeMap::new(), &actual);
        assert!(p.puts.is_empty() && p.deletes.len() == 3);
    }

    #[test]
    fn plan_published_never_touches_other_nodes_and_rebinds_old_leases() {
        let k = |n: &str| pod_key(P, "default", n).unwrap();
        let me = [192, 168, 64, 3];
        let other = [192, 168, 64, 4];
        let pub_ = |r: PodRecord, lease: i64, rev: i64| PublishedPod {
            record: r,
            etcd_lease: lease,
            mod_revision: rev,
        };
        let listed = PodList {
            pods: BTreeMap::from([
                (k("mine-ok"), pub_(rec("10.5.52.2", me), 7, 10)),
                (k("mine-old-lease"), pub_(rec("10.5.52.3", me), 6, 11)),
                (k("mine-stale"), pub_(rec("10.5.52.4", me), 0, 12)),
                (k("theirs"), pub_(rec("10.5.53.2", other), 9, 13)),
                (k("theirs-too"), pub_(rec("10.5.53.3", other), 9, 14)),
            ]),
            invalid: BTreeMap::from([(k("garbage"), "bad pod JSON".to_string())]),
            revision: 20,
        };
        let desired = BTreeMap::from([
            (k("mine-ok"), rec("10.5.52.2", me)),
            (k("mine-old-lease"), rec("10.5.52.3", me)),
            (k("new"), rec("10.5.52.5", me)),
            (k("theirs"), rec("10.5.52.6", me)),
            (k("garbage"), rec("10.5.52.7", me)),
        ]);
        let p = plan_published(&desired, &listed, IpAddr::from(Ipv4Addr::from(me)), 7);
        let puts: Vec<(&str, Expect)> = p.puts.iter().map(|(k, _, e)| (k.as_str(), *e)).collect();
        assert_eq!(
            puts,
            vec![
                (k("mine-old-lease").as_str(), Expect::ModRevision(11)),
                (k("new").as_str(), Expect::Absent),
            ]
        );
        assert_eq!(p.deletes, vec![(k("mine-stale"), 12)]);
        let conflicts: Vec<&str> = p.conflicts.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(conflicts, vec![k("garbage"), k("theirs")]);
        assert!(p.conflicts[0].holder.contains("unreadable"), "{p:?}");
        assert!(p.conflicts[1].holder.contains("192.168.64.4"), "{p:?}");
        // Another node never plans anything about our keys, nor we about "theirs-too".
        let p = plan_published(
            &BTreeMap::new(),
            &listed,
            IpAddr::from(Ipv4Addr::from(other)),
            9,
        );
        let dels: Vec<&str> = p.deletes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(dels, vec![k("theirs"), k("theirs-too")]);
        assert!(p.puts.is_empty() && p.conflicts.is_empty());
    }
}
