//! The `nft` program: a script applied as one atomic `nft -f -` transaction, a table listed,
//! a chain probed; every run bounded in time. [`Runner`] is the seam for tests
//! ([`crate::FakeNft`]).

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::{Error, Family};

/// How long one `nft` run may take (a full rebuild of a big table takes seconds).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies nft scripts and reads tables (of family `ip` or `ip6`). The real one is
/// [`NftCommand`].
pub trait Runner: Send + Sync {
    /// Applies `script` atomically; on failure nothing changed.
    fn apply(&self, script: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// Table `FAMILY TABLE` as nft prints it, or None if it does not exist.
    fn list_table(
        &self,
        family: Family,
        table: &str,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;

    /// Whether chain `CHAIN` of table `FAMILY TABLE` exists (`list chain`, which reads the
    /// whole table first: for probes that are rare or on small tables).
    fn chain_exists(
        &self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> impl Future<Output = bool> + Send {
        let probe = format!("list chain {family} {table} {chain}\n");
        async move { self.apply(&probe).await.is_ok() }
    }
}

/// Runs `nft` (optionally behind a prefix such as `ip netns exec NAME`).
#[derive(Debug, Clone, Default)]
pub struct NftCommand {
    pub prefix: Vec<String>,
}

/// Runs `argv` with `input` on its stdin, bounded by `timeout`; returns whether it
/// succeeded and its stderr (trimmed).
pub async fn run_with_stdin(
    argv: &[String],
    input: &str,
    timeout: Duration,
) -> Result<(bool, String), Error> {
    let (program, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
    let spawn_err = |source: std::io::Error| Error::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await.map_err(spawn_err)?;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| Error::Timeout {
            program: program.clone(),
            after: timeout,
        })?
        .map_err(spawn_err)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

impl NftCommand {
    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = self.prefix.clone();
        argv.push("nft".to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Applies `script` with `nft -f -`.
    pub async fn apply(&self, script: &str) -> Result<(), Error> {
        let (ok, stderr) =
            run_with_stdin(&self.argv(&["-f", "-"]), script, COMMAND_TIMEOUT).await?;
        if ok {
            Ok(())
        } else {
            // nft names the failing line; keep the first lines of its complaint.
            let msg: Vec<&str> = stderr.lines().take(6).collect();
            Err(Error::Refused {
                stderr: msg.join(" | "),
            })
        }
    }

    /// `nft list table FAMILY TABLE`: the listing, or None when nft fails (no such table).
    pub async fn list_table(&self, family: Family, table: &str) -> Result<Option<String>, Error> {
        let argv = self.argv(&["list", "table", family.as_str(), table]);
        let (program, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
        let fut = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COMMAND_TIMEOUT, fut)
            .await
            .map_err(|_| Error::Timeout {
                program: program.clone(),
                after: COMMAND_TIMEOUT,
            })?
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// See [`Runner::chain_exists`].
    pub async fn chain_exists(&self, family: Family, table: &str, chain: &str) -> bool {
        Runner::chain_exists(self, family, table, chain).await
    }
}

impl Runner for NftCommand {
    async fn apply(&self, script: &str) -> Result<(), Error> {
        NftCommand::apply(self, script).await
    }

    async fn list_table(&self, family: Family, table: &str) -> Result<Option<String>, Error> {
        NftCommand::list_table(self, family, table).await
    }
}

/// The script that removes table `FAMILY TABLE` whether or not it exists (nft 1.0.6 has no
/// `destroy`: add, then delete).
pub fn remove_table_script(family: Family, table: &str) -> String {
    format!("add table {family} {table}\ndelete table {family} {table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn refusals_keep_the_first_lines_and_missing_programs_name_the_program() {
        // `sh -c` stands in for nft (reading the script, then complaining): six lines of eight kept.
        let nft = NftCommand {
            prefix: vec![
                "sh".into(),
                "-c".into(),
                "cat >/dev/null; for i in 1 2 3 4 5 6 7 8; do echo line$i >&2; done; exit 1".into(),
            ],
        };
        let e = run(nft.apply("flush ruleset\n")).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "nft -f - failed: line1 | line2 | line3 | line4 | line5 | line6"
        );
        let missing = NftCommand {
            prefix: vec!["/nonexistent/flannel-rs-test".into()],
        };
        let e = run(missing.apply("")).expect_err("no program");
        assert!(matches!(&e, Error::Spawn { program, .. } if program.contains("nonexistent")));
        assert!(!run(missing.chain_exists(Family::Ip, "t", "c")));
    }

    #[test]
    fn remove_table_is_add_then_delete() {
        assert_eq!(
            remove_table_script(Family::Ip, "flannel"),
            "add table ip flannel\ndelete table ip flannel\n"
        );
        assert_eq!(
            remove_table_script(Family::Ip6, "flannel"),
            "add table ip6 flannel\ndelete table ip6 flannel\n"
        );
    }
}
