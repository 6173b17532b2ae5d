//! The node's WireGuard private key in flannel's key file: `/run/flannel/wgkey` unless the
//! environment variable `WIREGUARD_KEY_FILE` names another; base64 of 32 bytes, mode 0400.
//! Made when missing (and kept: a restarted node has the same public key), never overwritten,
//! never logged.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::{decode_key, encode_key};

/// flannel's key file.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// The environment variable that names another key file (flannel's).
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";

/// A Curve25519 private key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(pub(crate) [u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// A key from 32 random bytes, clamped as `wg genkey` does.
    pub fn from_random(mut b: [u8; 32]) -> Self {
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        PrivateKey(b)
    }

    pub fn secret(&self) -> boringtun::x25519::StaticSecret {
        boringtun::x25519::StaticSecret::from(self.0)
    }

    /// The public key peers know this node by.
    pub fn public(&self) -> [u8; 32] {
        boringtun::x25519::PublicKey::from(&self.secret()).to_bytes()
    }

    /// The public key as published in the lease (base64).
    pub fn public_base64(&self) -> String {
        encode_key(&self.public())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("WireGuard key file {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("WireGuard key file {path}: not a WireGuard private key (base64 of 32 bytes); fix or remove the file (a new key is then made)")]
    Invalid { path: PathBuf },
}

/// The key file to use: `env` (the value of `WIREGUARD_KEY_FILE`) when set, else flannel's.
pub fn key_file(env: Option<std::ffi::OsString>) -> PathBuf {
    env.map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE))
}

/// Reads the key in `path`, or makes one there (mode 0400, the directory 0755 as flannel makes
/// it) when the file does not exist. Returns the key and whether it was made now. A file that
/// exists but does not hold a key is an error, never replaced.
pub fn load_or_generate(path: &Path) -> Result<(PrivateKey, bool), KeyError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, op, source }
    };
    match read(path) {
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other.map(|k| (k, false)),
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(io("reading /dev/urandom"))?;
    let key = PrivateKey::from_random(random);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io("creating its directory"))?;
    }
    // Written beside it, then linked into place: a reader never sees half a key, and a key
    // another process put there meanwhile is kept (link fails; that key is read).
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)?;
        f.write_all(encode_key(&key.0).as_bytes())?;
        f.sync_all()
    };
    let linked = write().and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path).map(|k| (k, false)),
        Err(e) => Err(io("writing it")(e)),
    }
}

/// Reads a key file (at most 1 KiB; surrounding whitespace allowed). Warns when others may
/// read it.
pub fn read(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, op, source }
    };
    let f = std::fs::File::open(path).map_err(io("opening it"))?;
    let mode = f
        .metadata()
        .map_err(io("reading its mode"))?
        .permissions()
        .mode();
    let mut text = String::new();
    f.take(1024)
        .read_to_string(&mut text)
        .map_err(|_| KeyError::Invalid {
            path: path.to_path_buf(),
        })?;
    let key = decode_key(&text).ok_or_else(|| KeyError::Invalid {
        path: path.to_path_buf(),
    })?;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "WireGuard key file {} has mode {:o}: others may read the private key (flannel writes it 0400)",
            path.display(),
            mode & 0o777
        );
    }
    Ok(PrivateKey(key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_made_once_mode_0400_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (k1, made) = load_or_generate(&path).unwrap();
        assert!(made);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let text = std::fs::read_to_string(&path).unwrap();
        // flannel's content: the base64 key, nothing else.
        assert_eq!(text.len(), 44);
        assert_eq!(decode_key(&text), Some(k1.0));
        let (k2, made) = load_or_generate(&path).unwrap();
        assert!(!made);
        assert_eq!(k1, k2);
        assert_eq!(k1.public(), k2.public());
        // Only the key file is left (no temp file).
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["wgkey"]);
    }

    #[test]
    fn a_key_from_wg_genkey_is_read_with_its_newline() {
        // RFC 7748 test vector (Alice): private and public key.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        let private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n";
        std::fs::write(&path, private).unwrap();
        let (k, made) = load_or_generate(&path).unwrap();
        assert!(!made);
        assert_eq!(
            k.public_base64(),
            encode_key(&[
                0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
                0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
                0xaa, 0x9b, 0x4e, 0x6a
            ])
        );
    }

    #[test]
    fn bad_content_is_an_error_naming_the_file_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        std::fs::write(&path, "c2hvcnQ=").unwrap();
        let e = load_or_generate(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(!e.contains("c2hvcnQ="), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c2hvcnQ=");
    }

    #[test]
    fn the_env_names_another_file() {
        assert_eq!(key_file(None), PathBuf::from("/run/flannel/wgkey"));
        assert_eq!(key_file(Some("/tmp/k".into())), PathBuf::from("/tmp/k"));
        // Debug never shows a key.
        let k = PrivateKey::from_random([7; 32]);
        assert_eq!(format!("{k:?}"), "PrivateKey(<redacted>)");
    }
}
