//! `flannelctl delete KIND NAME` / `delete -f FILE`: prints `service/web deleted`; a missing
//! object is an error unless `--ignore-not-found`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use registry::store::normalize;
use registry::{Kind, Object};

use crate::common::{parse_kind, read_manifests, ref_name, EtcdFlags};

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// namespaces (ns), pods (po), services (svc) or endpoints (ep).
    #[arg(value_parser = parse_kind, required_unless_present = "files", conflicts_with = "files")]
    kind: Option<Kind>,
    /// The object's name.
    #[arg(required_unless_present = "files")]
    name: Option<String>,
    /// Delete the objects of these manifests (in reverse order, so objects go before their
    /// namespace). Repeatable; `-` is stdin.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// The namespace (default: `default`; for `-f`, of objects that name none).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// A missing object is not an error.
    #[arg(long)]
    ignore_not_found: bool,
}

pub async fn run(etcd: &EtcdFlags, args: DeleteArgs) -> Result<()> {
    let ns = args.namespace.as_deref();
    // (kind, namespace, name) to delete.
    let mut targets: Vec<(Kind, Option<String>, String)> = Vec::new();
    if args.files.is_empty() {
        let (Some(kind), Some(name)) = (args.kind, args.name.clone()) else {
            bail!("give KIND NAME or -f FILE");
        };
        targets.push((kind, ns.map(str::to_string), name));
    } else {
        for (source, obj) in read_manifests(&args.files)? {
            let obj: Object = normalize(obj, ns).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            let m = obj.metadata();
            targets.push((obj.kind(), m.namespace.clone(), m.name.clone()));
        }
        targets.reverse();
    }
    let store = etcd.store().await?;
    let mut failed = 0;
    let total = targets.len();
    for (kind, ns, name) in targets {
        match store.delete(kind, ns.as_deref(), &name).await {
            Ok(obj) => println!("{} deleted", ref_name(&obj)),
            Err(e) if e.is_not_found() && args.ignore_not_found => {}
            Err(e) if total == 1 => return Err(etcd.err(e)),
            Err(e) => {
                failed += 1;
                eprintln!("flannelctl: {}", etcd.err(e));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} objects not deleted");
    }
    Ok(())
}
