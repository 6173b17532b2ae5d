//! [`FakeNft`]: a [`Runner`] for unit tests that records every call and answers what the
//! test configured; it models no kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Error, Family, Runner};

/// One call made to a [`FakeNft`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A script that was accepted.
    Apply(String),
    /// A script refused because the test asked for a failure ([`FakeNft::fail_next`]).
    Refused(String),
    ListTable(Family, String),
    ChainExists {
        family: Family,
        table: String,
        chain: String,
    },
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    fail_next: usize,
    listings: BTreeMap<(Family, String), String>,
    chains: BTreeSet<(Family, String, String)>,
}

/// Records calls; clones share the record (keep one, hand the other to the code under test).
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    state: Arc<Mutex<State>>,
}

impl FakeNft {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The scripts accepted so far, in order.
    pub fn scripts(&self) -> Vec<String> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Apply(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The next `apply` fails (`nft -f - failed: injected`) and changes nothing.
    pub fn fail_next(&self) {
        self.state().fail_next += 1;
    }

    /// What `list_table(family, table)` answers from now on (None: no such table).
    pub fn set_listing(&self, family: Family, table: &str, listing: Option<&str>) {
        let mut s = self.state();
        let k = (family, table.to_string());
        match listing {
            Some(l) => s.listings.insert(k, l.to_string()),
            None => s.listings.remove(&k),
        };
    }

    /// What `chain_exists(family, table, chain)` answers from now on.
    pub fn set_chain(&self, family: Family, table: &str, chain: &str, exists: bool) {
        let mut s = self.state();
        let k = (family, table.to_string(), chain.to_string());
        if exists {
            s.chains.insert(k);
        } else {
            s.chains.remove(&k);
        }
    }
}

impl Runner for FakeNft {
    async fn apply(&self, script: &str) -> Result<(), Error> {
        let mut s = self.state();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            s.calls.push(Call::Refused(script.to_string()));
            return Err(Error::Refused {
                stderr: "injected".into(),
            });
        }
        s.calls.push(Call::Apply(script.to_string()));
        Ok(())
    }

    async fn list_table(&self, family: Family, table: &str) -> Result<Option<String>, Error> {
        let mut s = self.state();
        s.calls.push(Call::ListTable(family, table.to_string()));
        Ok(s.listings.get(&(family, table.to_string())).cloned())
    }

    async fn chain_exists(&self, family: Family, table: &str, chain: &str) -> bool {
        let mut s = self.state();
        s.calls.push(Call::ChainExists {
            family,
            table: table.to_string(),
            chain: chain.to_string(),
        });
        s.chains
            .contains(&(family, table.to_string(), chain.to_string()))
    }
}
