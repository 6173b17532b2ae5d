//! Applying the compiled table: [`Enforcer`] keeps the kernel's table equal to the newest
//! [`Ruleset`], sending the difference from what it last applied as one `nft -f -`
//! transaction (the whole table when that is unknown: at start, after a failure).

use std::time::{Duration, Instant};

use nft::Runner;

use crate::compile::{self, Ruleset};

/// Keeps the kernel's table equal to the compiled ruleset.
#[derive(Debug)]
pub struct Enforcer<N> {
    nft: N,
    /// The family of the table (its rulesets are of it).
    family: nft::Family,
    /// What the kernel holds (`None`: unknown, the next sync writes the whole table).
    applied: Option<Ruleset>,
}

/// What one sync did.
#[derive(Debug, Clone, Copy)]
pub struct SyncReport {
    pub full: bool,
    pub changed: bool,
    pub elapsed: Duration,
}

impl<N: Runner> Enforcer<N> {
    /// The enforcer of the IPv4 table.
    pub fn new(nft: N) -> Self {
        Self::for_family(nft, nft::Family::Ip)
    }

    /// The enforcer of the table of `family` (it is given rulesets of that family).
    pub fn for_family(nft: N, family: nft::Family) -> Self {
        Enforcer {
            nft,
            family,
            applied: None,
        }
    }

    /// Forget what the kernel holds: the next sync rewrites the table.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Brings the table to `rs`: the difference in one transaction, or the whole table when
    /// the kernel's state is unknown. A failed transaction changes nothing.
    pub async fn sync(&mut self, rs: Ruleset) -> Result<SyncReport, nft::Error> {
        let started = Instant::now();
        let (script, full) = match &self.applied {
            Some(old) => (compile::diff(old, &rs), false),
            None => (Some(compile::full(&rs)), true),
        };
        let changed = script.is_some();
        if let Some(s) = script {
            self.nft.apply(&s).await.inspect_err(|_| {
                self.applied = None;
            })?;
        }
        self.applied = Some(rs);
        Ok(SyncReport {
            full,
            changed,
            elapsed: started.elapsed(),
        })
    }

    /// Whether our table is still in the kernel.
    pub async fn table_present(&self) -> bool {
        self.nft
            .chain_exists(self.family, compile::TABLE, "forward")
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nft::fake::{Call, FakeNft};

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn one_chain(rule: &str) -> Ruleset {
        let mut rs = Ruleset::default();
        rs.chains.insert("pod-a".into(), vec![rule.to_string()]);
        rs
    }

    #[test]
    fn full_first_then_differences_and_full_again_after_a_failure() {
        let nft = FakeNft::default();
        let mut e = Enforcer::new(nft.clone());
        let rep = run(e.sync(one_chain("accept"))).expect("sync");
        assert!(rep.full && rep.changed);
        let rep = run(e.sync(one_chain("accept"))).expect("sync");
        assert!(!rep.full && !rep.changed, "unchanged: nothing sent");
        assert_eq!(nft.scripts().len(), 1);
        nft.fail_next();
        assert!(run(e.sync(one_chain("drop"))).is_err());
        let rep = run(e.sync(one_chain("drop"))).expect("sync");
        assert!(rep.full, "after a failure the whole table is written");
        let scripts = nft.scripts();
        assert_eq!(scripts.len(), 2);
        assert!(
            scripts[1].starts_with(&compile::cleanup_table(nft::Family::Ip)),
            "{}",
            scripts[1]
        );
        // The presence probe asks for the forward chain of the policy table.
        assert!(!run(e.table_present()));
        nft.set_chain(nft::Family::Ip, compile::TABLE, "forward", true);
        assert!(run(e.table_present()));
        assert_eq!(
            nft.calls().last(),
            Some(&Call::ChainExists {
                family: nft::Family::Ip,
                table: compile::TABLE.into(),
                chain: "forward".into()
            })
        );
    }

    #[test]
    fn the_ip6_enforcer_writes_and_probes_the_ip6_table() {
        let nft = FakeNft::default();
        let mut e = Enforcer::for_family(nft.clone(), nft::Family::Ip6);
        let mut rs = Ruleset::empty(nft::Family::Ip6);
        run(e.sync(rs.clone())).expect("sync");
        rs.chains.insert("in/x".into(), vec!["return".into()]);
        run(e.sync(rs)).expect("sync");
        let scripts = nft.scripts();
        assert!(
            scripts[0].starts_with(
                "add table ip6 flannel-policy\ndelete table ip6 flannel-policy\ntable ip6 flannel-policy {"
            ),
            "{}",
            scripts[0]
        );
        assert_eq!(
            scripts[1],
            "add chain ip6 flannel-policy in/x\nadd rule ip6 flannel-policy in/x return\n"
        );
        nft.set_chain(nft::Family::Ip, compile::TABLE, "forward", true);
        assert!(!run(e.table_present()), "the ip table is not ours");
        nft.set_chain(nft::Family::Ip6, compile::TABLE, "forward", true);
        assert!(run(e.table_present()));
    }
}
