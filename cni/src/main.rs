//! `flannel`: the CNI plugin binary. Reads CNI_* from the environment and the network
//! configuration from stdin; prints the result (or a CNI error) on stdout.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use cni::cmd::{dispatch, Context, Env};
use cni::conf;
use cni::exec::PathExec;

/// How long a delegate call may take before it is killed.
const DELEGATE_TIMEOUT: Duration = Duration::from_secs(120);

/// When this machine booted (`btime` in /proc/stat).
fn booted() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn main() -> ExitCode {
    let env = Env::from_lookup(|k| std::env::var(k).ok());
    let exec = PathExec::new(env.path.as_deref().unwrap_or_default(), DELEGATE_TIMEOUT);
    let cx = Context {
        exec: &exec,
        now: SystemTime::now(),
        booted: booted(),
    };
    // VERSION may come without stdin; every other command reads its config. Bounded: a
    // runtime never sends megabytes, and /dev/zero must not grow us without end.
    let read = subnet_env::file::read_to_end_limited(std::io::stdin().lock(), conf::MAX_STDIN);
    let (stdin, outcome) = match read {
        Ok(stdin) => {
            let outcome = dispatch(&env, &stdin, &cx);
            (stdin, outcome)
        }
        Err(e) => (
            Vec::new(),
            Err(cni::CniError::new(
                cni::error::code::IO,
                "reading the network configuration on stdin",
            )
            .with_details(e.to_string())),
        ),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&conf::error_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}
