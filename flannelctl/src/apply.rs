//! `flannelctl apply -f FILE`: every object is checked (parsed, validated, its namespace
//! found, its ClusterIP and NodePorts checked) before any is written; then each is applied in
//! order, printing `service/web created|configured|unchanged`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use registry::store::describe;
use registry::{Object, StoreError};

use crate::common::{read_manifests, ref_name, EtcdFlags};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file (YAML or JSON, several documents), a directory of them, or `-` for stdin.
    /// Repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Namespace for objects that name none (those that do must name this one).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Check everything, write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Explicit ClusterIPs and NodePorts requested by the batch's Services: value → first
/// requester, so two documents asking for the same one are refused before anything is written.
#[derive(Default)]
struct Requested {
    cluster_ips: BTreeMap<String, String>,
    node_ports: BTreeMap<i64, String>,
}

impl Requested {
    fn check(&mut self, obj: &Object, who: &str) -> Vec<String> {
        let Object::Service(s) = obj else {
            return vec![];
        };
        let mut errors = Vec::new();
        // `clusterIP` and every further `clusterIPs` entry (a dual-stack Service has two).
        let asked = s
            .spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip))
            .chain(
                s.spec
                    .cluster_ips
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
            );
        for (field, ip) in asked.filter(|(_, ip)| !ip.is_empty() && *ip != "None") {
            if let Some(first) = self.cluster_ips.get(ip) {
                errors.push(format!("{who}: {field}: {ip} is also requested by {first}"));
            } else {
                self.cluster_ips.insert(ip.to_string(), who.to_string());
            }
        }
        let mut own = BTreeSet::new();
        for (i, p) in s.spec.ports.iter().enumerate() {
            let Some(np) = p.node_port else { continue };
            if !own.insert(np) {
                continue; // TCP and UDP of one Service may share it
            }
            if let Some(first) = self.node_ports.get(&np) {
                errors.push(format!(
                    "{who}: spec.ports[{i}].nodePort: {np} is also requested by {first}"
                ));
            } else {
                self.node_ports.insert(np, who.to_string());
            }
        }
        errors
    }
}

pub async fn run(etcd: &EtcdFlags, args: ApplyArgs) -> Result<()> {
    let objs = read_manifests(&args.files)?;
    let ns = args.namespace.as_deref();
    let store = etcd.store().await?;

    // Check all first.
    let mut pending = BTreeSet::new();
    let mut requested = Requested::default();
    let mut errors = Vec::new();
    let mut checked = Vec::new();
    for (source, obj) in &objs {
        match store.dry_run(obj.clone(), ns, &pending).await {
            Ok(planned) => {
                let m = planned.object.metadata();
                let who = format!(
                    "{source}: {}",
                    describe(planned.object.kind(), m.namespace.as_deref(), &m.name)
                );
                errors.extend(requested.check(obj, &who));
                if let Object::Namespace(n) = &planned.object {
                    pending.insert(n.metadata.name.clone());
                }
                checked.push((planned.object, planned.outcome));
            }
            // etcd trouble is no verdict on the object: stop at once.
            Err(e @ StoreError::Etcd(_)) => bail!("{} (nothing applied)", etcd.err(e)),
            Err(e) => errors.push(format!("{source}: {}", etcd.err(e))),
        }
    }
    if !errors.is_empty() {
        let n = errors.len();
        if n == 1 {
            bail!("{} (nothing applied)", errors.remove(0));
        }
        for e in &errors {
            eprintln!("flannelctl: {e}");
        }
        bail!("nothing applied: {n} of {} objects are invalid", objs.len());
    }

    if args.dry_run {
        for (obj, outcome) in &checked {
            println!("{} {outcome} (dry run)", ref_name(obj));
        }
        return Ok(());
    }
    for (i, (_, obj)) in objs.into_iter().enumerate() {
        let name = ref_name(&obj);
        match store.apply(obj, ns).await {
            Ok(a) => println!("{name} {}", a.outcome),
            Err(e) => {
                let left = checked.len() - i - 1;
                bail!(
                    "{e} ({name} not applied{})",
                    if left > 0 {
                        format!(", nor the {left} objects after it")
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(())
}
