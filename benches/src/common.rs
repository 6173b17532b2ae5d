#![allow(dead_code)] // each bench binary uses a different part
//! What the namespace benchmarks share: the flanneld binary beside them, stopping between
//! steps on SIGINT/SIGTERM (so the testbed guard always runs), and writing their reports.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

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
