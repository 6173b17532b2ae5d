//! `flannelctl config get|set`: the network config (`<prefix>/config`, flannel's net-conf.json).
//! `set` validates with flanneld's own parser before writing, and while leases exist refuses,
//! unless `--force`, a config that changes `Network`, replaces a stored config that does not
//! parse, or that some lease does not fit (their subnets would lie outside the new Network).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use subnet_lease::config;
use subnet_lease::{EtcdLeaseStore, LeaseStore, SubnetKey};

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

pub async fn connect(etcd: &EtcdFlags) -> Result<EtcdLeaseStore> {
    EtcdLeaseStore::connect(&etcd.options()).await.map_err(|e| {
        anyhow!(
            "connecting to etcd at {}: {e}",
            etcd.etcd_endpoints.join(",")
        )
    })
}

/// Why writing `new` over `old` must be forced while `leases` exist (pure): a different
/// Network; a stored config that does not parse (the Network the leases were taken in is
/// unknown); or leases that do not fit the new config, whatever is stored. A node restarted
/// under such a config finds its lease outside it and waits for an operator.
pub fn network_change_blocked(
    old: Option<&str>,
    new: &str,
    leases: &[SubnetKey],
) -> Option<String> {
    let new_cfg = config::parse(new).ok()?.config;
    if leases.is_empty() {
        return None;
    }
    let n = leases.len();
    let net = |c: &config::NetConfig| c.network.map_or("none".into(), |n| n.to_string());
    if let Some(old) = old {
        match config::parse(old) {
            Ok(p) if p.config.network != new_cfg.network => {
                return Some(format!(
                    "Network would change from {} to {} while {n} lease(s) exist: their subnets \
                     would lie outside it; remove the leases first or pass --force",
                    net(&p.config),
                    net(&new_cfg),
                ))
            }
            Ok(_) => {}
            Err(e) => {
                return Some(format!(
                    "the stored config does not parse ({e}), so the Network that {n} lease(s) \
                     were taken in is unknown; check them (`flannelctl leases list`) and pass \
                     --force if the new config is meant for them"
                ))
            }
        }
    }
    let outside: Vec<String> = leases
        .iter()
        .filter(|k| {
            k.ipv4.is_some_and(|v4| !new_cfg.fits_v4(v4))
                || (new_cfg.ipv6_network().is_some()
                    && k.ipv6.is_some_and(|v6| !new_cfg.fits_v6(v6)))
        })
        .map(crate::leases::subnets)
        .collect();
    (!outside.is_empty()).then(|| {
        format!(
            "{} of {n} lease(s) do not fit the new config (Network {}, SubnetLen {}): {}; \
             remove them first or pass --force",
            outside.len(),
            net(&new_cfg),
            new_cfg.subnet_len,
            outside.join(", ")
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
            let leases: Vec<SubnetKey> = reg
                .list_leases()
                .await?
                .leases
                .into_iter()
                .map(|l| l.key)
                .collect();
            if !force {
                if let Some(why) = network_change_blocked(old.as_deref(), &text, &leases) {
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_network_change_needs_force_only_while_leases_exist() {
        let a = r#"{"Network":"10.5.0.0/16"}"#;
        let b = r#"{"Network":"10.6.0.0/16"}"#;
        let a2 = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
        let leases = [key("10.5.1.0/24"), key("10.5.2.0/24")];
        assert!(network_change_blocked(Some(a), b, &leases)
            .is_some_and(|m| m.contains("10.5.0.0/16 to 10.6.0.0/16")));
        assert_eq!(network_change_blocked(Some(a), b, &[]), None);
        assert_eq!(
            network_change_blocked(Some(a), a2, &leases),
            None,
            "backend change only"
        );
        assert_eq!(network_change_blocked(None, b, &[]), None, "first config");
    }

    #[test]
    fn whatever_is_stored_leases_must_fit_the_new_config() {
        let b = r#"{"Network":"10.6.0.0/16"}"#;
        let leases = [key("10.5.1.0/24")];
        // Stored config unparseable: the leases' Network is unknown.
        let m = network_change_blocked(Some("{not json"), b, &leases).unwrap();
        assert!(m.contains("does not parse"), "{m}");
        assert!(
            network_change_blocked(Some(r#"{"Network":"bogus"}"#), b, &leases).is_some(),
            "invalid but JSON"
        );
        assert_eq!(network_change_blocked(Some("{not json"), b, &[]), None);
        // No config stored (deleted) but leases of another Network exist.
        let m = network_change_blocked(None, b, &leases).unwrap();
        assert!(
            m.contains("10.5.1.0/24") && m.contains("10.6.0.0/16"),
            "{m}"
        );
        // Same Network, another SubnetLen: the leases no longer fit either.
        let a = r#"{"Network":"10.5.0.0/16"}"#;
        let a26 = r#"{"Network":"10.5.0.0/16","SubnetLen":26}"#;
        assert!(network_change_blocked(Some(a), a26, &leases).is_some());
        assert_eq!(network_change_blocked(None, a, &leases), None);
    }

    fn key(s: &str) -> SubnetKey {
        SubnetKey::v4(s.parse().unwrap())
    }
}
