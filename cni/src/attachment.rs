//! The attachment record: one per pod attached through this plugin, written by ADD beside the
//! stored delegate config (`<dataDir>/attachments/<containerID>.json`) and removed by DEL and
//! GC. flanneld reads these (it watches the directory) and publishes each pod under
//! `<prefix>/pods/<namespace>/<name>` in etcd, so the plugin itself never needs etcd
//! credentials. Format (docs/data-model.md):
//!
//! ```json
//! {"containerID": "4f2c…", "ifname": "eth0", "netns": "/var/run/netns/cni-…",
//!  "podNamespace": "default", "podName": "web-0", "ips": ["10.5.52.2/24"],
//!  "network": "cbr0", "time": "2026-11-23T10:00:00Z"}
//! ```
//! `podNamespace`/`podName` come from `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS` and are
//! absent for runtimes that do not pass them (such attachments are recorded, not published).

use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::store::Store;

/// The subdirectory of the data directory holding the records.
pub const ATTACHMENTS_DIR: &str = "attachments";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
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

impl Attachment {
    /// `(namespace, name)` when the runtime named the pod.
    pub fn pod(&self) -> Option<(&str, &str)> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => Some((ns, n)),
            _ => None,
        }
    }
}

/// Every readable record in `data_dir`, and a message per record that could not be read.
pub fn read_all(data_dir: &Path) -> (Vec<Attachment>, Vec<String>) {
    let store = Store::new(data_dir);
    let mut found = Vec::new();
    let mut errors = Vec::new();
    match store.container_ids() {
        Ok(ids) => {
            for id in ids {
                match store.load_attachment(&id) {
                    Ok(Some(a)) => found.push(a),
                    Ok(None) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    (found, errors)
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
        let a = Attachment {
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/n".into(),
            pod_namespace: None,
            pod_name: Some("a".into()),
            ips: vec!["10.5.1.2/24".parse().unwrap()],
            network: "cbr0".into(),
            time: "t".into(),
        };
        assert_eq!(a.pod(), None);
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(j["containerID"], "c");
        assert_eq!(j["ips"][0], "10.5.1.2/24");
        assert_eq!(j.get("podNamespace"), None);
    }

    #[test]
    fn read_all_reports_bad_records() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(ATTACHMENTS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.json"), "{").unwrap();
        std::fs::write(
            dir.join("good.json"),
            r#"{"containerID":"good","ifname":"eth0","netns":"/n","podNamespace":"x","podName":"a",
                "ips":["10.5.1.2/24"],"network":"cbr0","time":"t"}"#,
        )
        .unwrap();
        let (found, errors) = read_all(t.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pod(), Some(("x", "a")));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("bad.json"), "{errors:?}");
    }
}
