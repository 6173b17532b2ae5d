//! The attachment record: one per pod attached through this plugin, written by ADD beside the
//! stored delegate config (`<dataDir>/attachments/<containerID>.json`; files are the store
//! module's) and removed by DEL and GC. flanneld reads these (it watches the directory) and
//! publishes each pod under `<prefix>/pods/<namespace>/<name>` in etcd, so the plugin itself
//! never needs etcd credentials. Format (docs/data-model.md):
//!
//! ```json
//! {"containerID": "4f2c…", "ifname": "eth0", "netns": "/var/run/netns/cni-…",
//!  "netnsId": {"inode": 4026532513, "anchor": "/var/run/netns", "anchorDev": 25, "anchorIno": 1042},
//!  "podNamespace": "default", "podName": "web-0", "ips": ["10.5.52.2/24"],
//!  "network": "cbr0", "time": "2026-11-23T10:00:00Z"}
//! ```
//! `podNamespace`/`podName` come from `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS` and are
//! absent for runtimes that do not pass them. A name without a namespace (podman passes only
//! `K8S_POD_NAME`) is the pod of that name in namespace `default`; without a name the
//! attachment is recorded, not published.
//!
//! `netnsId` says which namespace `netns` was at ADD, so that a record whose runtime never
//! called DEL can be told apart ([`netns_state`]): flanneld stops publishing it and
//! `flannelctl pod gc` releases it.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// The namespace `netns` named at ADD (absent when the plugin could not stat it, and in
    /// records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<NetnsId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The addresses the delegate's IPAM gave the pod, with prefix length.
    pub ips: Vec<IpNet>,
    /// The CNI network name.
    pub network: String,
    /// When ADD recorded it (RFC 3339, UTC).
    pub time: String,
}

/// The Kubernetes namespace of a pod named without one (podman passes only `K8S_POD_NAME`).
pub const DEFAULT_POD_NAMESPACE: &str = "default";

impl Attachment {
    /// `(namespace, name)` when the runtime named the pod; a name without a namespace is in
    /// [`DEFAULT_POD_NAMESPACE`].
    pub fn pod(&self) -> Option<(&str, &str)> {
        let name = self.pod_name.as_deref().filter(|n| !n.is_empty())?;
        let ns = self
            .pod_namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_POD_NAMESPACE);
        Some((ns, name))
    }
}

/// Which network namespace a path named, and the directory that vouches for the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetnsId {
    /// The namespace's inode number (nsfs), unique among live namespaces.
    pub inode: u64,
    /// The directory whose presence makes the path's absence meaningful: `/proc` for
    /// `/proc/<pid>/ns/net` (ctr, docker), else the path's parent (`/run/netns`), with its
    /// device and inode as the plugin saw them. A process that sees another directory there
    /// (another mount or PID namespace, e.g. flanneld in a container without the host's
    /// `/run/netns`) cannot tell, and keeps the record.
    pub anchor: String,
    pub anchor_dev: u64,
    pub anchor_ino: u64,
}

/// What is known of a record's network namespace now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// The path still names the namespace of ADD.
    Present,
    /// The namespace is gone (the path is missing or names another namespace): the runtime
    /// removed the pod without DEL.
    Gone(String),
    /// Cannot tell from here (no identity recorded, another view of the file system, an
    /// unexpected error): treated as present.
    Unknown(String),
}

fn anchor_of(netns: &str) -> &Path {
    let p = Path::new(netns);
    if p.starts_with("/proc") {
        return Path::new("/proc");
    }
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("/"))
}

/// (device, inode) of a path, following symlinks (`/proc/<pid>/ns/net` is one).
pub fn stat_id(p: &Path) -> io::Result<(u64, u64)> {
    std::fs::metadata(p).map(|m| (m.dev(), m.ino()))
}

/// The identity of the namespace at `netns`, as ADD records it; None if it cannot be read.
pub fn netns_id(netns: &str) -> Option<NetnsId> {
    netns_id_with(netns, &stat_id)
}

fn netns_id_with(netns: &str, stat: &dyn Fn(&Path) -> io::Result<(u64, u64)>) -> Option<NetnsId> {
    if netns.is_empty() {
        return None;
    }
    let anchor = anchor_of(netns);
    let (_, inode) = stat(Path::new(netns)).ok()?;
    let (anchor_dev, anchor_ino) = stat(anchor).ok()?;
    Some(NetnsId {
        inode,
        anchor: anchor.display().to_string(),
        anchor_dev,
        anchor_ino,
    })
}

/// Whether the record's namespace still exists, seen from this process.
pub fn netns_state(a: &Attachment) -> Netns {
    netns_state_with(a, &stat_id)
}

/// [`netns_state`] with the `stat` given (pure decision; tests pass a fake).
pub fn netns_state_with(a: &Attachment, stat: &dyn Fn(&Path) -> io::Result<(u64, u64)>) -> Netns {
    let Some(id) = &a.netns_id else {
        return Netns::Unknown("the record names no namespace identity".into());
    };
    if a.netns.is_empty() {
        return Netns::Unknown("the record names no network namespace".into());
    }
    match stat(Path::new(&id.anchor)) {
        Ok(d) if d == (id.anchor_dev, id.anchor_ino) => {}
        Ok(_) => {
            return Netns::Unknown(format!(
                "{} here is not the directory the plugin saw (another mount or PID namespace?)",
                id.anchor
            ))
        }
        Err(e) => return Netns::Unknown(format!("{}: {e}", id.anchor)),
    }
    match stat(Path::new(&a.netns)) {
        Ok((_, ino)) if ino == id.inode => Netns::Present,
        Ok(_) => Netns::Gone(format!(
            "{} is no longer the network namespace of ADD",
            a.netns
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Netns::Gone(format!("network namespace {} no longer exists", a.netns))
        }
        Err(e) => Netns::Unknown(format!("{}: {e}", a.netns)),
    }
}

/// The `K8S_POD_NAMESPACE` and `K8S_POD_NAME` values in `CNI_ARGS` (`K=V;K=V`).
pub fn pod_from_cni_args(args: &str) -> (Option<String>, Option<String>) {
    let mut ns = None;
    let mut name = None;
    for kv in args.split(';') {
        match kv.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => ns = Some(v.to_string()),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => name = Some(v.to_string()),
            _ => {}
        }
    }
    (ns, name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_and_json_shape() {
        assert_eq!(
            pod_from_cni_args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=c"
            ),
            (Some("x".into()), Some("a".into()))
        );
        assert_eq!(pod_from_cni_args(""), (None, None));
        let mut a = Attachment {
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/n".into(),
            netns_id: None,
            pod_namespace: None,
            pod_name: Some("a".into()),
            ips: vec!["10.5.1.2/24".parse().unwrap()],
            network: "cbr0".into(),
            time: "t".into(),
        };
        // podman passes K8S_POD_NAME alone: the pod is in namespace default.
        assert_eq!(a.pod(), Some(("default", "a")));
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(j["containerID"], "c");
        assert_eq!(j["ips"][0], "10.5.1.2/24");
        assert_eq!(
            j.get("podNamespace"),
            None,
            "the record keeps what the runtime said"
        );
        assert_eq!(j.get("netnsId"), None);
        a.pod_namespace = Some("x".into());
        assert_eq!(a.pod(), Some(("x", "a")));
        a.pod_name = None;
        assert_eq!(a.pod(), None, "a namespace without a name is no pod");
    }

    #[test]
    fn namespace_liveness() {
        use std::collections::HashMap;
        use std::io::ErrorKind::{NotFound, PermissionDenied};
        let files: HashMap<&str, (u64, u64)> = HashMap::from([
            ("/run/netns/p1", (4, 100)),
            ("/run/netns", (25, 7)),
            ("/proc/42/ns/net", (4, 200)),
            ("/proc", (22, 1)),
        ]);
        let stat = |p: &Path| -> io::Result<(u64, u64)> {
            files
                .get(p.to_str().unwrap())
                .copied()
                .ok_or_else(|| io::Error::from(NotFound))
        };
        let rec = |netns: &str| {
            let mut a: Attachment = serde_json::from_str(
                r#"{"containerID":"c","ifname":"eth0","netns":"","ips":[],"network":"n","time":"t"}"#,
            )
            .unwrap();
            a.netns = netns.into();
            a.netns_id = netns_id_with(netns, &stat);
            a
        };
        let p1 = rec("/run/netns/p1");
        assert_eq!(
            p1.netns_id,
            Some(NetnsId {
                inode: 100,
                anchor: "/run/netns".into(),
                anchor_dev: 25,
                anchor_ino: 7
            })
        );
        assert_eq!(netns_state_with(&p1, &stat), Netns::Present);
        let ctr = rec("/proc/42/ns/net");
        assert_eq!(ctr.netns_id.as_ref().unwrap().anchor, "/proc");
        assert_eq!(netns_state_with(&ctr, &stat), Netns::Present);
        assert_eq!(rec("/run/netns/none").netns_id, None);

        // Later: p1 deleted, pid 42 reused by a process in another namespace.
        let later: HashMap<&str, (u64, u64)> = HashMap::from([
            ("/run/netns", (25, 7)),
            ("/proc/42/ns/net", (4, 300)),
            ("/proc", (22, 1)),
        ]);
        let stat2 = |p: &Path| -> io::Result<(u64, u64)> {
            later
                .get(p.to_str().unwrap())
                .copied()
                .ok_or_else(|| io::Error::from(NotFound))
        };
        assert!(
            matches!(netns_state_with(&p1, &stat2), Netns::Gone(m) if m.contains("no longer exists"))
        );
        assert!(
            matches!(netns_state_with(&ctr, &stat2), Netns::Gone(m) if m.contains("no longer the network namespace"))
        );
        // Another view (a container with its own /run): cannot tell, whatever the path says.
        let other_view = |p: &Path| -> io::Result<(u64, u64)> {
            if p == Path::new("/run/netns") {
                Ok((99, 7))
            } else {
                Err(io::Error::from(NotFound))
            }
        };
        assert!(matches!(
            netns_state_with(&p1, &other_view),
            Netns::Unknown(_)
        ));
        assert!(matches!(
            netns_state_with(&ctr, &other_view),
            Netns::Unknown(_)
        ));
        let denied =
            |_: &Path| -> io::Result<(u64, u64)> { Err(io::Error::from(PermissionDenied)) };
        assert!(matches!(netns_state_with(&p1, &denied), Netns::Unknown(_)));
        // Records without an identity (older plugin) or without a path: unknown.
        let mut old = p1.clone();
        old.netns_id = None;
        assert!(matches!(netns_state_with(&old, &stat2), Netns::Unknown(_)));
    }
}
