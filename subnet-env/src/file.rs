//! The two file operations every writer and reader of node state shares (flanneld's subnet
//! file, the CNI plugin's store):
//!
//! - [`write_atomic`]: a temporary file beside the target, created with `O_CREAT|O_EXCL|
//!   O_NOFOLLOW` under a random name (a name someone pre-created, file or symlink, is never
//!   opened: the next name is tried), given the intended mode whatever the umask, written,
//!   fsynced, renamed over the target, then the directory fsynced;
//! - [`read_limited`]: a regular file read up to a size limit (a FIFO, a device such as
//!   `/dev/zero` or an oversized file is an error at once, not a hang or a huge allocation).

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions, Permissions};
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many random temporary names are tried before giving up.
const TEMP_TRIES: usize = 16;

/// Random temporary names for `path`: `.<name>.<16 hex digits>.tmp` in its directory.
fn random_names(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // RandomState is seeded from the OS per process; hashing a counter and the time gives a
    // fresh unpredictable value per name. Unpredictability is a courtesy: O_EXCL is the guard.
    let state = RandomState::new();
    (0u64..).map(move |i| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let r = state.hash_one((std::process::id(), i, nanos));
        dir.join(format!(".{name}.{r:016x}.tmp"))
    })
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically with file mode `mode` (see the module doc). The
/// directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_names(path, bytes, mode, random_names(path).take(TEMP_TRIES))
}

/// [`write_atomic`] with the temporary names given (tests pick them to pre-create one).
fn write_atomic_names(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    names: impl Iterator<Item = PathBuf>,
) -> io::Result<()> {
    let mut last = None;
    for tmp in names {
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        let mut f = match opened {
            Ok(f) => f,
            // Someone else's file or symlink: never touched, try another name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        // From here the temporary file is ours: removed on any failure.
        let result = (|| {
            // The mode asked for, not the one the umask left.
            f.set_permissions(Permissions::from_mode(mode))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // Make the rename itself durable.
            File::open(parent(path))?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return result;
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free temporary name beside {} ({})",
            path.display(),
            last.map_or_else(|| "none tried".to_string(), |e| e.to_string())
        ),
    ))
}

/// Reads all of `r`, failing once it has more than `limit` bytes.
pub fn read_to_end_limited(r: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("more than {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// Reads the regular file `path`, at most `limit` bytes (see the module doc).
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on regular files).
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("{} bytes, more than {limit}", meta.len()),
        ));
    }
    read_to_end_limited(f, limit)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pre_created_names_and_symlinks_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("subnet.env");
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let (planted_file, planted_link, free) = (
            t.path().join(".a.tmp"),
            t.path().join(".b.tmp"),
            t.path().join(".c.tmp"),
        );
        std::fs::write(&planted_file, "theirs").unwrap();
        symlink(&victim, &planted_link).unwrap();
        let names = [&planted_file, &planted_link, &free].map(|p| p.to_path_buf());
        write_atomic_names(&target, b"ours", 0o644, names.into_iter()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"ours");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&planted_file).unwrap(), b"theirs");
        assert!(std::fs::symlink_metadata(&planted_link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!free.exists(), "the temporary file was renamed");
        // A dangling symlink is not followed either (O_EXCL): nothing is created behind it.
        let behind = t.path().join("behind");
        symlink(&behind, &free).unwrap();
        let e = write_atomic_names(&target, b"x", 0o600, [free.clone()].into_iter()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(!behind.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"ours", "target untouched");
    }

    #[test]
    fn the_final_file_has_the_mode_asked_whatever_the_umask() {
        let t = tempfile::tempdir().unwrap();
        for m in [0o600, 0o644, 0o640] {
            let p = t.path().join(format!("f{m:o}"));
            write_atomic(&p, b"x", m).unwrap();
            assert_eq!(mode(&p), m);
            // Replacing keeps the asked mode too (a new inode each time).
            std::fs::set_permissions(&p, Permissions::from_mode(0o777)).unwrap();
            write_atomic(&p, b"y", m).unwrap();
            assert_eq!((mode(&p), std::fs::read(&p).unwrap()), (m, b"y".to_vec()));
        }
        // Only the targets are left: no temporary files.
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 3);
        let e = write_atomic(&t.path().join("no/such/dir/f"), b"x", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn reads_are_bounded() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, vec![b'a'; 100]).unwrap();
        assert_eq!(read_limited(&p, 100).unwrap().len(), 100);
        let e = read_limited(&p, 99).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        // /dev/zero: refused at once, not read forever.
        let e = read_limited(Path::new("/dev/zero"), 1 << 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // A FIFO without a writer: refused at once, not waited on.
        let fifo = t.path().join("fifo");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let e = read_limited(&fifo, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // A stream is cut at the limit.
        let e = read_to_end_limited(std::io::repeat(0), 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(read_to_end_limited(&b"abc"[..], 3).unwrap(), b"abc");
    }
}
