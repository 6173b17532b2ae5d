//! Test support: a real etcd on a free port with a temporary data dir, and multi-node testbeds
//! built from network namespaces (a hub with a bridge and etcd, nodes with a veth to the hub,
//! pods behind a node's bridge).
//!
//! Contract: every name is unique per run (random prefix) and creation fails if it exists; only
//! what was created here is deleted; every process started here is stopped by its own PID when
//! the owning guard drops (also on panic); every external command has a time bound; the root
//! namespace's network config is never changed.

#![forbid(unsafe_code)]

mod etcd;
mod netns;
pub mod probe;
mod tcp;

pub use etcd::{Etcd, TlsFiles};
pub use netns::{in_netns, in_new_netns, Node, Pod, Testbed, HUB_IP, HUB_IP6};
pub use tcp::{
    connect_seeing_icmp, http_get, send_and_verify, send_spoofed_udp, transfer_bytes,
    udp_burst_verify, udp_who_serves, udp_whoami, udp_window_verify, who_serves, whoami,
    BurstResult, HashServer, IdServer, UdpIdServer, UdpWhoAmIServer, WhoAmIServer, WindowResult,
};

use std::process::{Command, Output};
use std::time::Duration;

/// Whether the CI environment variable is set (root tests must fail rather than skip there).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips (returns false, printing why) or, under CI, panics when `ok` is false.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("CI is set but this test cannot run: {what}");
    }
    eprintln!("SKIPPED: {what}");
    false
}

/// Whether we run as root (needed for namespaces, netlink, nft, TUN).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Finds a program on PATH or in the usual system directories.
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(Into::into))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// For root tests: true when root and the programs exist; skip or fail (CI) otherwise.
pub fn require_root_with(programs: &[&str]) -> bool {
    if !require(is_root(), "needs root (network namespaces)") {
        return false;
    }
    programs
        .iter()
        .all(|p| require(find_program(p).is_some(), &format!("needs `{p}` on PATH")))
}

/// Runs a command with a time bound; returns its output or a message naming the command.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{desc}: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{desc}: no exit within {limit:?}"));
            }
            Err(e) => return Err(format!("{desc}: {e}")),
        }
    }
    child.wait_with_output().map_err(|e| format!("{desc}: {e}"))
}

/// Runs a command (bounded to 20 s) and returns stdout, or an error with stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    run_checked(Command::new(program).args(args), Duration::from_secs(20))
}

/// Runs a command with a time bound; stdout on success, else an error naming the command with
/// its status and stderr.
pub fn run_checked(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, limit)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{desc}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A random lowercase hex string of `n` characters, for unique names.
pub fn random_tag(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `f` every 50 ms until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
pub(crate) fn stop_child(
    child: &mut std::process::Child,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}
