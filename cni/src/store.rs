//! What the plugin keeps in its data directory (default `/var/lib/cni/flannel`, mode 0700):
//!
//! - `<containerID>`: the delegate config ADD used (as flannel stores it, so DEL works after a
//!   swap from or to flannel), mode 0600;
//! - `attachments/<containerID>.json`: the attachment record ([`Attachment`]) that flanneld
//!   publishes for the service proxy and the policy module, mode 0600.
//!
//! - `.lock`: ADD holds it shared while it runs, `flannelctl pod gc` exclusive while it lists
//!   the attachments and runs GC, so GC never releases an attachment an ADD is creating
//!   (runtimes serialize GC and ADD themselves; flannelctl is no runtime).
//!
//! Every file is written atomically and read with a size limit ([`MAX_FILE`]), both through
//! `subnet_env::file` (the helpers flanneld's subnet file uses too).

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::attachment::Attachment;
use crate::error::{code, CniError};

/// Checks a container ID as the spec defines it (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`); it names files
/// here, so nothing else may pass.
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_CONTAINERID {id:?} is not a valid container ID ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
            ),
        ))
    }
}

/// The subdirectory of the data directory holding the attachment records.
pub const ATTACHMENTS_DIR: &str = "attachments";

/// The lock file of the data directory (not a valid container ID, so never listed).
pub const LOCK_FILE: &str = ".lock";

/// A held lock on a data directory; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The largest stored config or attachment record read (ours are a few KiB).
pub const MAX_FILE: u64 = 1024 * 1024;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::new(code::IO, format!("{what} {}", path.display())).with_details(e.to_string())
}

/// Creates `dir` (and parents) with mode 0700.
fn ensure_dir(dir: &Path) -> Result<(), CniError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("creating", dir, e))
}

/// Writes `bytes` to `path` atomically with mode 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CniError> {
    ensure_dir(path.parent().unwrap_or(Path::new(".")))?;
    subnet_env::file::write_atomic(path, bytes, 0o600).map_err(|e| io_err("writing", path, e))
}

/// Reads and decodes a JSON file; `None` when there is none. `what` names it in errors.
fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Option<T>, CniError> {
    match subnet_env::file::read_limited(path, MAX_FILE) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            CniError::new(code::DECODE, format!("{what} {}", path.display()))
                .with_details(e.to_string())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path, e)),
    }
}

/// Removes a file; a missing one is fine.
fn remove(path: &Path) -> Result<(), CniError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", path, e)),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the directory's lock, shared (ADD) or exclusive (GC by flannelctl), waiting up to
    /// `wait`; error 11 (try again later) when it stays taken.
    pub fn lock(&self, exclusive: bool, wait: std::time::Duration) -> Result<StoreLock, CniError> {
        use nix::fcntl::{Flock, FlockArg};
        use std::os::unix::fs::OpenOptionsExt;
        ensure_dir(&self.dir)?;
        let path = self.dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let how = if exclusive {
            FlockArg::LockExclusiveNonblock
        } else {
            FlockArg::LockSharedNonblock
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Flock::lock(file, how) {
                Ok(l) => return Ok(StoreLock { _lock: l }),
                Err((f, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!(
                            "{} is locked (a garbage collection is running): try again",
                            path.display()
                        ),
                    ))
                }
                Err((_, e)) => return Err(io_err("locking", &path, e.into())),
            }
        }
    }

    fn config_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn attachment_path(&self, id: &str) -> PathBuf {
        self.dir.join(ATTACHMENTS_DIR).join(format!("{id}.json"))
    }

    pub fn save_config(&self, id: &str, conf: &Value) -> Result<(), CniError> {
        let bytes = serde_json::to_vec(conf).map_err(|e| CniError::new(code::IO, e.to_string()))?;
        write_atomic(&self.config_path(id), &bytes)
    }

    /// The stored delegate config, `None` when there is none.
    pub fn load_config(&self, id: &str) -> Result<Option<Value>, CniError> {
        read_json(&self.config_path(id), "stored delegate config")
    }

    pub fn save_attachment(&self, a: &Attachment) -> Result<(), CniError> {
        let bytes =
            serde_json::to_vec_pretty(a).map_err(|e| CniError::new(code::IO, e.to_string()))?;
        write_atomic(&self.attachment_path(&a.container_id), &bytes)
    }

    pub fn load_attachment(&self, id: &str) -> Result<Option<Attachment>, CniError> {
        read_json(&self.attachment_path(id), "attachment record")
    }

    /// Removes the attachment record first (flanneld unpublishes it), then the delegate config.
    /// A failure does not stop the other removal; the errors are reported together.
    pub fn remove_all(&self, id: &str) -> Result<(), CniError> {
        let mut errors: Vec<CniError> = [self.attachment_path(id), self.config_path(id)]
            .iter()
            .filter_map(|p| remove(p).err())
            .collect();
        if errors.len() <= 1 {
            return errors.pop().map_or(Ok(()), Err);
        }
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Err(
            CniError::new(code::IO, format!("removing the state of {id}"))
                .with_details(all.join("; ")),
        )
    }

    /// Container IDs with a stored delegate config or an attachment record.
    pub fn container_ids(&self) -> Result<Vec<String>, CniError> {
        let mut ids = std::collections::BTreeSet::new();
        for (dir, suffix) in [
            (self.dir.clone(), ""),
            (self.dir.join(ATTACHMENTS_DIR), ".json"),
        ] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("listing", &dir, e)),
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(suffix) {
                    if check_container_id(id).is_ok() {
                        ids.insert(id.to_string());
                    }
                }
            }
        }
        Ok(ids.into_iter().collect())
    }
}

/// Every readable attachment record in `data_dir`, and a message per record that could not be read.
pub fn read_attachments(data_dir: &Path) -> (Vec<Attachment>, Vec<String>) {
    let store = Store::new(data_dir);
    let mut found = Vec::new();
    let mut errors = Vec::new();
    match store.container_ids() {
        Ok(ids) => {
            for id in ids {
                match store.load_attachment(&id) {
                    Ok(Some(a)) => found.push(a),
                    Ok(None) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    (found, errors)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn container_ids_are_checked() {
        for ok in ["abc", "a1_b.c-d", "0"] {
            assert!(check_container_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "-a", ".x", "a b"] {
            assert_eq!(check_container_id(bad).unwrap_err().code, 4, "{bad}");
        }
    }

    #[test]
    fn files_modes_and_listing() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path().join("flannel"));
        assert_eq!(s.container_ids().unwrap(), Vec::<String>::new());
        assert_eq!(s.load_config("c1").unwrap(), None);
        s.save_config("c1", &serde_json::json!({"type": "bridge"}))
            .unwrap();
        assert_eq!(mode(s.dir()), 0o700);
        assert_eq!(mode(&s.dir().join("c1")), 0o600);
        assert_eq!(s.load_config("c1").unwrap().unwrap()["type"], "bridge");
        let a = Attachment {
            container_id: "c2".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            netns_id: None,
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
            ips: vec!["10.5.1.2/24".parse().unwrap()],
            network: "cbr0".into(),
            time: "2026-11-23T00:00:00Z".into(),
        };
        s.save_attachment(&a).unwrap();
        assert_eq!(mode(&s.dir().join("attachments/c2.json")), 0o600);
        assert_eq!(s.load_attachment("c2").unwrap().unwrap(), a);
        std::fs::write(s.dir().join(".tmpjunk"), "x").unwrap();
        assert_eq!(s.container_ids().unwrap(), vec!["c1", "c2"]);
        s.remove_all("c1").unwrap();
        s.remove_all("c2").unwrap();
        s.remove_all("c3").unwrap();
        assert_eq!(s.container_ids().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_failed_removal_does_not_stop_the_other() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path().join("flannel"));
        s.save_config("c1", &serde_json::json!({"type": "bridge"}))
            .unwrap();
        // Something that cannot be removed as a file where the record would be.
        let stuck = s.dir().join("attachments/c1.json");
        std::fs::create_dir_all(stuck.join("x")).unwrap();
        let e = s.remove_all("c1").unwrap_err();
        assert_eq!(e.code, code::IO);
        assert!(e.msg.contains("attachments/c1.json"), "{e}");
        assert_eq!(s.load_config("c1").unwrap(), None, "config removed anyway");
    }

    #[test]
    fn the_lock_is_shared_by_adds_and_exclusive_for_gc() {
        use std::time::Duration;
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path().join("flannel"));
        let a = s.lock(false, Duration::ZERO).unwrap();
        let b = s.lock(false, Duration::ZERO).unwrap();
        let e = s.lock(true, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        drop((a, b));
        let gc = s.lock(true, Duration::ZERO).unwrap();
        assert_eq!(
            s.lock(false, Duration::from_millis(50)).unwrap_err().code,
            code::TRY_AGAIN_LATER
        );
        drop(gc);
        s.lock(false, Duration::ZERO).unwrap();
        assert_eq!(mode(&s.dir().join(LOCK_FILE)), 0o600);
        assert!(
            s.container_ids().unwrap().is_empty(),
            "the lock is no container"
        );
    }

    #[test]
    fn read_attachments_reports_bad_records() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(ATTACHMENTS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.json"), "{").unwrap();
        std::fs::write(
            dir.join("good.json"),
            r#"{"containerID":"good","ifname":"eth0","netns":"/n","podNamespace":"x","podName":"a",
                "ips":["10.5.1.2/24"],"network":"cbr0","time":"t"}"#,
        )
        .unwrap();
        let (found, errors) = read_attachments(t.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pod(), Some(("x", "a")));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("bad.json"), "{errors:?}");
    }

    #[test]
    fn stored_files_are_read_with_a_limit() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path());
        std::fs::write(t.path().join("big"), vec![b' '; MAX_FILE as usize + 1]).unwrap();
        let e = s.load_config("big").unwrap_err();
        assert_eq!(e.code, code::IO);
        assert!(e.details.contains("more than"), "{e:?}");
        std::os::unix::fs::symlink("/dev/zero", t.path().join("zero")).unwrap();
        let e = s.load_config("zero").unwrap_err();
        assert!(e.details.contains("not a regular file"), "{e:?}");
    }
}
