//! Applying the compiled table: [`Enforcer`] keeps the kernel's table equal to the newest
//! [`Ruleset`], sending the difference from what it last applied as one transaction: a
//! netlink batch ([`crate::nfnl`]) when it has a socket, else the text through `nft -f -`.
//! The whole table is always written by `nft -f -` ([`compile::full`]: base chains,
//! anonymous sets) when what the kernel holds is unknown: at start, after a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nft::{NfNetlink, Runner};

use crate::compile::{self, Ruleset};
use crate::nfnl::{self, Netlink};

/// Keeps the kernel's table equal to the compiled ruleset.
#[derive(Debug)]
pub struct Enforcer<N, L = Arc<NfNetlink>> {
    nft: N,
    /// Where differences go as netlink batches (None: through `nft`).
    netlink: Option<L>,
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
    /// The difference went as a netlink batch (not through `nft`).
    pub netlink: bool,
    pub elapsed: Duration,
}

impl<N: Runner> Enforcer<N> {
    /// The enforcer of the IPv4 table (everything through `nft` until
    /// [`Enforcer::with_netlink`]).
    pub fn new(nft: N) -> Self {
        Self::for_family(nft, nft::Family::Ip)
    }

    /// The enforcer of the table of `family` (it is given rulesets of that family).
    pub fn for_family(nft: N, family: nft::Family) -> Self {
        Enforcer {
            nft,
            netlink: None,
            family,
            applied: None,
        }
    }
}

impl<N, L> Enforcer<N, L> {
    /// Sends differences through `netlink` (a socket in the namespace `nft` writes to).
    pub fn with_netlink<M: Netlink>(self, netlink: M) -> Enforcer<N, M> {
        Enforcer {
            nft: self.nft,
            netlink: Some(netlink),
            family: self.family,
            applied: self.applied,
        }
    }
}

impl<N: Runner, L: Netlink> Enforcer<N, L> {
    /// Forget what the kernel holds: the next sync rewrites the table.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Brings the table to `rs`: the difference in one transaction (a netlink batch when
    /// there is a socket), or the whole table through `nft` when the kernel's state is
    /// unknown. A failed transaction changes nothing, and the next sync writes the whole
    /// table.
    pub async fn sync(&mut self, rs: Ruleset) -> Result<SyncReport, nft::Error> {
        let started = Instant::now();
        let mut report = SyncReport {
            full: false,
            changed: false,
            netlink: false,
            elapsed: Duration::ZERO,
        };
        let script = match (&self.applied, &self.netlink) {
            (None, _) => {
                report.full = true;
                Some(compile::full(&rs))
            }
            (Some(old), Some(nl)) => match nfnl::ops(old, &rs) {
                Ok(ops) => {
                    if !ops.is_empty() {
                        report.changed = true;
                        report.netlink = true;
                        if let Err(e) = nl.apply(ops).await {
                            self.applied = None;
                            return Err(e);
                        }
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!("network policy: {e}; this change goes through nft");
                    compile::diff(old, &rs)
                }
            },
            (Some(old), None) => compile::diff(old, &rs),
        };
        if let Some(s) = script {
            report.changed = true;
            self.nft.apply(&s).await.inspect_err(|_| {
                self.applied = None;
            })?;
        }
        self.applied = Some(rs);
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Whether our table is still in the kernel.
    pub async fn table_present(&self) -> bool {
        self.nft
            .chain_exists(self.family, compile::TABLE, "forward")
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nfnl::FakeNetlink;
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
    fn differences_go_over_netlink_whole_tables_through_nft() {
        let nft = FakeNft::default();
        let nl = FakeNetlink::default();
        let mut e = Enforcer::new(nft.clone()).with_netlink(nl.clone());
        let rep = run(e.sync(one_chain("return"))).expect("sync");
        assert!(
            rep.full && !rep.netlink,
            "the first write is the whole table, by nft"
        );
        let mut next = one_chain("drop");
        next.ingress
            .insert("10.5.1.2".parse().unwrap(), "pod-a".into());
        let rep = run(e.sync(next.clone())).expect("sync");
        assert!(!rep.full && rep.changed && rep.netlink);
        assert_eq!(nft.scripts().len(), 1, "nothing more through nft");
        assert_eq!(
            nl.batches(),
            [compile::diff(&one_chain("return"), &next).unwrap()],
            "the batch is the text difference's steps"
        );
        let rep = run(e.sync(next.clone())).expect("sync");
        assert!(!rep.changed && !rep.netlink, "unchanged: nothing sent");
        // A refused batch: the next sync rewrites the table through nft.
        nl.fail_next();
        assert!(run(e.sync(one_chain("return"))).is_err());
        let rep = run(e.sync(one_chain("return"))).expect("sync");
        assert!(rep.full && !rep.netlink);
        assert_eq!(nft.scripts().len(), 2);
        assert_eq!(nl.batches().len(), 1);
        // A line the encoder does not know goes through nft as text (never expected).
        let rep = run(e.sync(one_chain("counter accept"))).expect("sync");
        assert!(rep.changed && !rep.netlink && !rep.full);
        assert_eq!(
            nft.scripts().last().unwrap(),
            &compile::diff(&one_chain("return"), &one_chain("counter accept")).unwrap()
        );
        assert_eq!(nl.batches().len(), 1);
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
