//! `flannelctl config get|set`: the network config (`<prefix>/config`, flannel's net-conf.json).
//! `set` validates with flanneld's own parser before writing, and refuses to change `Network`
//! while leases exist unless `--force` (their subnets would lie outside the new Network).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use subnet_lease::config;
use subnet_lease::{EtcdRegistry, Registry};

use crate::common::EtcdFlags;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the network config as stored.
    Get,
    /// Validate a net-conf.json and write it.
    Set {
        /// The config file (`-`: stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Write even when the Network changes while leases exist.
        #[arg(long)]
        force: bool,
        /// Write only if no config exists yet (an init container's "write once").
        #[arg(long, conflicts_with = "force")]
        if_absent: bool,
    },
}

pub async fn connect(etcd: &EtcdFlags) -> Result<EtcdRegistry> {
    EtcdRegistry::connect(&etcd.options()).await.map_err(|e| {
        anyhow!(
            "connecting to etcd at {}: {e}",
            etcd.etcd_endpoints.join(",")
        )
    })
}

/// Why writing `new` over `old` must be forced (pure): a different Network while leases exist.
pub fn network_change_blocked(old: Option<&str>, new: &str, leases: usize) -> Option<String> {
    let new_net = config::parse(new).ok()?.config.network;
    let old_net = config::parse(old?).ok()?.config.network;
    (old_net != new_net && leases > 0).then(|| {
        format!(
            "Network would change from {} to {} while {leases} lease(s) exist: their subnets \
             would lie outside it; remove the leases first or pass --force",
            old_net.map_or("none".into(), |n| n.to_string()),
            new_net.map_or("none".into(), |n| n.to_string()),
        )
    })
}

pub async fn run(etcd: &EtcdFlags, cmd: ConfigCmd) -> Result<()> {
    let reg = connect(etcd).await?;
    let key = reg.config_key();
    match cmd {
        ConfigCmd::Get => match reg.get_config().await? {
            Some(text) => {
                println!("{}", text.trim_end());
                Ok(())
            }
            None => bail!("no network config at {key} (write one with `flannelctl config set -f net-conf.json`)"),
        },
        ConfigCmd::Set {
            file,
            force,
            if_absent,
        } => {
            let text = if file == std::path::Path::new("-") {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let parsed = config::parse(&text)
                .map_err(|e| anyhow!("{}: invalid network config: {e}", file.display()))?;
            for w in &parsed.warnings {
                eprintln!("warning: {w}");
            }
            let old = reg.get_config().await?;
            if if_absent && old.is_some() {
                println!("network config exists at {key}; left as it is");
                return Ok(());
            }
            let leases = reg.list_leases().await?.leases.len();
            if !force {
                if let Some(why) = network_change_blocked(old.as_deref(), &text, leases) {
                    bail!("{why}");
                }
            }
            // Write only if the config is still what was checked (no lost update).
            let cmp = match &old {
                Some(v) => Compare::value(key.clone(), CompareOp::Equal, v.as_bytes()),
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([cmp])
                .and_then([TxnOp::put(key.clone(), text.as_bytes(), None)]);
            let resp = reg
                .client()
                .txn(txn)
                .await
                .with_context(|| format!("writing {key}"))?;
            if !resp.succeeded() {
                bail!("{key} changed while this command ran; run it again");
            }
            println!("network config written to {key}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_change_needs_force_only_while_leases_exist() {
        let a = r#"{"Network":"10.5.0.0/16"}"#;
        let b = r#"{"Network":"10.6.0.0/16"}"#;
        let a2 = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
        assert!(network_change_blocked(Some(a), b, 2)
            .is_some_and(|m| m.contains("10.5.0.0/16 to 10.6.0.0/16")));
        assert_eq!(network_change_blocked(Some(a), b, 0), None);
        assert_eq!(
            network_change_blocked(Some(a), a2, 3),
            None,
            "backend change only"
        );
        assert_eq!(network_change_blocked(None, b, 3), None, "first config");
    }
}
