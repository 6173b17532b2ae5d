#![allow(dead_code)] // each bench binary uses a different part
//! What the namespace benchmarks share: the flanneld binary beside them, stopping between
//! steps on SIGINT/SIGTERM (so the testbed guard always runs), and writing their reports.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use test_support::{in_netns, run_bounded};

/// Set by SIGINT/SIGTERM (see [`on_signals`]); checked between steps.
pub static STOP: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// Makes SIGINT and SIGTERM set [`STOP`].
pub fn on_signals() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, STOP.clone())?;
    }
    Ok(())
}

pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// The release flanneld next to this binary.
pub fn flanneld_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory for this binary")?
        .join("flanneld");
    if !bin.is_file() {
        bail!(
            "{} missing: run `cargo build --release -p flanneld` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// Writes `text` to `path`, creating its directory.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Accepts connections in `ns` and answers each with one byte (latency server).
pub fn byte_server(ns: &str, port: u16) -> Result<()> {
    let l = in_netns(ns, move || TcpListener::bind(("0.0.0.0", port)))
        .map_err(anyhow::Error::msg)??;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(b"x");
        }
    });
    Ok(())
}

/// Connect + first byte, `n` times from `ns` to `to`, sorted.
pub fn connect_latencies(ns: &str, to: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let v = in_netns(ns, move || -> Result<Vec<Duration>, String> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .map_err(|e| format!("connect {to}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .map_err(|e| format!("read {to}: {e}"))?;
            v.push(t.elapsed());
        }
        Ok(v)
    })
    .map_err(anyhow::Error::msg)?
    .map_err(anyhow::Error::msg)?;
    let mut v = v;
    v.sort();
    Ok(v)
}

/// iperf3 Gbit/s from `client_ns` to `to` (server in `server_ns`).
pub fn iperf(server_ns: &str, client_ns: &str, to: Ipv4Addr, seconds: u32) -> Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = run_bounded(
        Command::new("ip").args([
            "netns",
            "exec",
            client_ns,
            "iperf3",
            "-c",
            &to.to_string(),
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-J",
        ]),
        Duration::from_secs(u64::from(seconds) + 30),
    )
    .map_err(anyhow::Error::msg);
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| {
            format!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
    Ok(bps / 1e9)
}
