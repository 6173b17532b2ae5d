//! [`TableKeeper`]: keeps one table equal to a rendered script, re-installing it when it
//! drifts (a rule or the table removed or changed by hand).

use crate::command::remove_table_script;
use crate::{Error, Family, Runner};

/// What the table should be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Nothing asked yet: leave the table alone.
    Unset,
    /// The table must not exist.
    Absent,
    /// The table must be what this script (which replaces the whole table) installs.
    Script(String),
}

/// Installs table `FAMILY TABLE` from its script and re-installs it when nft's listing no
/// longer matches the one taken right after the last install.
#[derive(Debug)]
pub struct TableKeeper<R> {
    nft: R,
    family: Family,
    table: String,
    want: Want,
    installed_listing: Option<String>,
}

impl<R: Runner> TableKeeper<R> {
    pub fn new(nft: R, family: Family, table: &str) -> Self {
        TableKeeper {
            nft,
            family,
            table: table.to_string(),
            want: Want::Unset,
            installed_listing: None,
        }
    }

    /// The script that replaces the whole table, or None when the table must not exist.
    pub fn set(&mut self, script: Option<String>) {
        let want = match script {
            Some(s) => Want::Script(s),
            None => Want::Absent,
        };
        if self.want != want {
            self.want = want;
            self.installed_listing = None;
        }
    }

    /// Brings the table to what [`TableKeeper::set`] asked; returns true if it (re)installed
    /// or removed it.
    pub async fn ensure(&mut self) -> Result<bool, Error> {
        let script = match &self.want {
            Want::Unset => return Ok(false),
            Want::Absent => None,
            Want::Script(s) => Some(s),
        };
        let now = self.nft.list_table(self.family, &self.table).await?;
        let Some(script) = script else {
            // Nothing to install; remove a table left from a run that had rules.
            if now.is_some() {
                self.nft
                    .apply(&remove_table_script(self.family, &self.table))
                    .await?;
                return Ok(true);
            }
            return Ok(false);
        };
        if now.is_some() && now == self.installed_listing {
            return Ok(false);
        }
        if self.installed_listing.is_some() {
            tracing::warn!(
                "nftables table {} {} was removed or changed; re-installing it",
                self.family,
                self.table
            );
        }
        self.nft.apply(script).await?;
        self.installed_listing = self.nft.list_table(self.family, &self.table).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Call, FakeNft};

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn installs_once_and_again_only_on_drift() {
        let nft = FakeNft::default();
        let mut k = TableKeeper::new(nft.clone(), Family::Ip, "t");
        assert!(
            !run(k.ensure()).expect("unset"),
            "nothing asked: nothing done"
        );
        assert!(nft.calls().is_empty());
        k.set(Some("add table ip t\n".into()));
        nft.set_listing(Family::Ip, "t", Some("table ip t {}"));
        assert!(run(k.ensure()).expect("install"));
        assert!(!run(k.ensure()).expect("same"), "listing unchanged");
        nft.set_listing(Family::Ip, "t", Some("table ip t { changed }"));
        assert!(run(k.ensure()).expect("drift"));
        assert_eq!(nft.scripts(), vec!["add table ip t\n"; 2]);
        // The same script again changes nothing; a failure is reported and retried.
        k.set(Some("add table ip t\n".into()));
        assert!(!run(k.ensure()).expect("same"));
        k.set(Some("add table ip t\nadd chain ip t c\n".into()));
        nft.fail_next();
        assert!(run(k.ensure()).is_err());
        assert!(run(k.ensure()).expect("retried"));
    }

    #[test]
    fn absent_removes_a_leftover_table_only() {
        let nft = FakeNft::default();
        let mut k = TableKeeper::new(nft.clone(), Family::Ip, "t");
        k.set(None);
        assert!(!run(k.ensure()).expect("no table"));
        nft.set_listing(Family::Ip, "t", Some("table ip t {}"));
        assert!(run(k.ensure()).expect("removed"));
        assert_eq!(
            nft.calls(),
            vec![
                Call::ListTable(Family::Ip, "t".into()),
                Call::ListTable(Family::Ip, "t".into()),
                Call::Apply("add table ip t\ndelete table ip t\n".into()),
            ]
        );
    }

    #[test]
    fn an_ip6_table_is_kept_apart_from_the_ip_table_of_the_same_name() {
        let nft = FakeNft::default();
        let mut k4 = TableKeeper::new(nft.clone(), Family::Ip, "flannel");
        let mut k6 = TableKeeper::new(nft.clone(), Family::Ip6, "flannel");
        k4.set(Some("add table ip flannel\n".into()));
        k6.set(Some("add table ip6 flannel\n".into()));
        nft.set_listing(Family::Ip, "flannel", Some("table ip flannel {}"));
        nft.set_listing(Family::Ip6, "flannel", Some("table ip6 flannel {}"));
        assert!(run(k4.ensure()).expect("install ip"));
        assert!(run(k6.ensure()).expect("install ip6"));
        assert!(!run(k4.ensure()).expect("same") && !run(k6.ensure()).expect("same"));
        // Drift of the ip6 table re-installs it alone.
        nft.set_listing(
            Family::Ip6,
            "flannel",
            Some("table ip6 flannel { changed }"),
        );
        assert!(!run(k4.ensure()).expect("ip unchanged"));
        assert!(run(k6.ensure()).expect("ip6 re-installed"));
        assert_eq!(
            nft.scripts(),
            vec![
                "add table ip flannel\n",
                "add table ip6 flannel\n",
                "add table ip6 flannel\n"
            ]
        );
        assert!(nft
            .calls()
            .contains(&Call::ListTable(Family::Ip6, "flannel".into())));
        // Removing it removes the ip6 table, not the ip one.
        k6.set(None);
        assert!(run(k6.ensure()).expect("removed"));
        assert_eq!(
            nft.scripts().last().map(String::as_str),
            Some("add table ip6 flannel\ndelete table ip6 flannel\n")
        );
    }
}
