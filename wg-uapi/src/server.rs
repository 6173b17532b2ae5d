//! The unix socket server: `/var/run/wireguard/<iface>.sock`, one task per connection.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::protocol::{errno, render_get, render_status, Action, DeviceSnapshot, Session};

/// Where `wg` looks for userspace devices (wireguard-tools' ipc-uapi-unix.h, wireguard-go's
/// ipc/uapi_unix.go `socketDirectory`).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Each request (from the end of the previous answer, or from accepting the connection) must
/// arrive whole within this; a connection idle or slow for longer is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, however many requests it sends.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing an answer must finish within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

/// The error a snapshot source returns (answered as `errno=-EIO`, logged).
pub type SnapshotError = Box<dyn std::error::Error + Send + Sync>;

/// Supplies the device's state on each `get=1`.
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError>;
}

impl<F> SnapshotSource for F
where
    F: Fn() -> Result<DeviceSnapshot, SnapshotError> + Send + Sync,
{
    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        self()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', whitespace or NUL)")]
    InvalidName(String),
    #[error("{}: another process answers on this socket", .0.display())]
    InUse(PathBuf),
    #[error("{}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UapiError + '_ {
    move |source| UapiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Interface names as the kernel takes them (IFNAMSIZ − 1 bytes) and that are safe as a file
/// name.
fn check_name(iface: &str) -> Result<(), UapiError> {
    let ok = !iface.is_empty()
        && iface.len() <= 15
        && iface != "."
        && iface != ".."
        && !iface
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(UapiError::InvalidName(iface.to_string()))
    }
}

/// A running UAPI socket. Dropping it (or [`UapiServer::shutdown`]) stops serving and removes
/// the socket, if the path still names our socket.
#[derive(Debug)]
pub struct UapiServer {
    path: PathBuf,
    /// (dev, ino) of our socket, to leave a successor's socket alone.
    id: (u64, u64),
    task: JoinHandle<()>,
}

impl UapiServer {
    /// Serves `iface`'s state at `/var/run/wireguard/<iface>.sock` (the directory is created
    /// 0755 if missing; the socket is 0600: the answer carries the private key). Must be called
    /// inside a tokio runtime.
    pub fn start(iface: &str, source: Arc<dyn SnapshotSource>) -> Result<UapiServer, UapiError> {
        UapiServer::start_in(Path::new(SOCKET_DIR), iface, source)
    }

    /// As [`UapiServer::start`], in another directory (tests).
    pub fn start_in(
        dir: &Path,
        iface: &str,
        source: Arc<dyn SnapshotSource>,
    ) -> Result<UapiServer, UapiError> {
        check_name(iface)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err(dir))?;
        let path = dir.join(format!("{iface}.sock"));
        remove_stale(&path)?;
        // Bind in a private directory, set the mode, then move into place: the socket is
        // never reachable with a wider mode, and no process-wide umask is touched.
        let tmp = dir.join(format!(".{iface}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        let bound = (|| {
            let tmp_sock = tmp.join("s");
            let listener = UnixListener::bind(&tmp_sock).map_err(io_err(&tmp_sock))?;
            std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err(&tmp_sock))?;
            std::fs::rename(&tmp_sock, &path).map_err(io_err(&path))?;
            Ok::<_, UapiError>(listener)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        let listener = bound?;
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let iface = iface.to_string();
        let task = tokio::spawn(accept_loop(listener, iface, source));
        tracing::debug!(path = %path.display(), "UAPI socket listening");
        Ok(UapiServer {
            path,
            id: (meta.dev(), meta.ino()),
            task,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving (open connections are dropped) and removes the socket.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "removing the UAPI socket: {e}");
                }
            }
        }
    }
}

/// A socket left at `path` by a process that is gone is removed; one that answers is not.
fn remove_stale(path: &Path) -> Result<(), UapiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(UapiError::NotASocket(path.to_path_buf()));
    }
    match probe(path) {
        Ok(true) => Err(UapiError::InUse(path.to_path_buf())),
        Ok(false) => {
            tracing::info!(path = %path.display(), "replacing a stale UAPI socket");
            std::fs::remove_file(path).map_err(io_err(path))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Whether a process listens on the unix socket at `path`. The connect is non-blocking, so a
/// wedged listener with a full backlog (EAGAIN) cannot hold us up: it counts as listening.
fn probe(path: &Path) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn accept_loop(listener: UnixListener, iface: String, source: Arc<dyn SnapshotSource>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connection tasks live in the set: aborting this task drops them all.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(iface, "UAPI: {MAX_CONNECTIONS} connections open; closing a new one");
                        continue;
                    };
                    let iface = iface.clone();
                    let source = source.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(
                            CONNECTION_TIMEOUT,
                            serve(stream, &iface, source.as_ref()),
                        )
                        .await
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(iface, "UAPI connection: {e}"),
                            Err(_) => tracing::debug!(iface, "UAPI connection open for {CONNECTION_TIMEOUT:?}: closed"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(iface, "UAPI accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Serves one connection: requests in a row until the client closes, a time bound passes, or a
/// request is malformed.
async fn serve(stream: UnixStream, iface: &str, source: &dyn SnapshotSource) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut session = Session::new();
    let mut line = Vec::new();
    loop {
        // One request, whole, within REQUEST_TIMEOUT.
        let action = tokio::time::timeout(REQUEST_TIMEOUT, async {
            loop {
                line.clear();
                let budget = u64::try_from(session.budget()).unwrap_or(u64::MAX);
                let n = (&mut reader)
                    .take(budget)
                    .read_until(b'\n', &mut line)
                    .await?;
                let cut = n == 0 || (line.last() != Some(&b'\n') && n < session.budget());
                if cut {
                    // The client closed (or closed mid-line).
                    return Ok::<_, io::Error>(None);
                }
                match session.line(&line) {
                    Action::More => continue,
                    other => return Ok(Some(other)),
                }
            }
        })
        .await;
        let action = match action {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => {
                if session.in_request() {
                    tracing::debug!(iface, "UAPI: client closed in the middle of a request");
                }
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                if session.in_request() {
                    tracing::warn!(
                        iface,
                        "UAPI: request not complete within {REQUEST_TIMEOUT:?}; closed"
                    );
                }
                return Ok(());
            }
        };
        let (answer, close) = match action {
            Action::More => continue,
            Action::Get => match source.snapshot() {
                Ok(dev) => {
                    let mut a = render_get(&dev);
                    a.push_str(&render_status(0));
                    (a, false)
                }
                Err(e) => {
                    tracing::warn!(iface, "UAPI get: the device state is unavailable: {e}");
                    (render_status(errno::EIO), false)
                }
            },
            Action::RefuseSet(summary) => {
                tracing::warn!(
                    iface,
                    lines = summary.lines,
                    peers = summary.peers,
                    keys = summary.keys.join(","),
                    truncated = summary.truncated,
                    "refused a UAPI set request (wg set/setconf/addconf/syncconf): {iface} is \
                     managed by flanneld from the subnet leases in etcd and a change here would \
                     be overwritten; change the network config or the leases instead"
                );
                (render_status(errno::EPERM), summary.truncated)
            }
            Action::ErrorClose(code) => {
                tracing::warn!(iface, "UAPI: malformed get request (errno -{code})");
                (render_status(code), true)
            }
            Action::Close(reason) => {
                tracing::warn!(iface, "UAPI: {reason}; connection closed");
                return Ok(());
            }
        };
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(answer.as_bytes()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "answer not taken in time"))??;
        if close {
            let _ = write.shutdown().await;
            return Ok(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{Key, PeerSnapshot, MAX_REQUEST_BYTES};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn source(counter: Arc<AtomicU64>) -> Arc<dyn SnapshotSource> {
        Arc::new(move || {
            let mut p = PeerSnapshot::new(Key([9; 32]));
            p.rx_bytes = counter.fetch_add(1, Ordering::SeqCst);
            p.allowed_ips = vec!["10.5.2.0/24".parse().unwrap()];
            Ok::<_, SnapshotError>(DeviceSnapshot {
                private_key: Some(Key([1; 32])),
                listen_port: 51820,
                fwmark: 0,
                peers: vec![p],
            })
        })
    }

    async fn answer(stream: &mut UnixStream) -> String {
        // Read until the status line and the blank line after it.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let s = String::from_utf8_lossy(&got);
            if let Some(i) = s.find("errno=") {
                if s[i..].ends_with("\n\n") {
                    return s.into_owned();
                }
            }
        }
    }

    async fn closed(stream: &mut UnixStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn serves_gets_in_a_row_and_refuses_set() {
        let dir = tempfile::tempdir().unwrap();
        let counter = Arc::new(AtomicU64::new(100));
        let server = UapiServer::start_in(dir.path(), "flannel-wg", source(counter)).unwrap();
        let path = server.path().to_path_buf();
        assert_eq!(path, dir.path().join("flannel-wg.sock"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Only the socket is left in the directory (no temporary).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("flannel-wg.sock")]);

        let mut c = UnixStream::connect(&path).await.unwrap();
        for rx in [100, 101] {
            c.write_all(b"get=1\n\n").await.unwrap();
            let a = answer(&mut c).await;
            assert!(a.starts_with(&format!("private_key={}\n", Key([1; 32]).to_hex())));
            assert!(a.contains(&format!("\nrx_bytes={rx}\n")), "{a}");
            assert!(a.ends_with("allowed_ip=10.5.2.0/24\nerrno=0\n\n"), "{a}");
        }
        c.write_all(b"set=1\nlisten_port=1\npublic_key=00\nremove=true\n\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c).await, "errno=-1\n\n");
        // Still open after the refusal.
        c.write_all(b"get=1\n\n").await.unwrap();
        assert!(answer(&mut c).await.ends_with("errno=0\n\n"));

        server.shutdown();
        assert!(!path.exists(), "socket left behind");
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests() {
        let dir = tempfile::tempdir().unwrap();
        let server =
            UapiServer::start_in(dir.path(), "wg0", source(Arc::new(AtomicU64::new(0)))).unwrap();
        // Unknown operation: closed without an answer (wireguard-go does the same).
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        c.write_all(b"hello=1\n").await.unwrap();
        assert!(closed(&mut c).await);
        // get=1 with trailing data: -EINVAL, then closed.
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        c.write_all(b"get=1\nx\n").await.unwrap();
        assert_eq!(answer(&mut c).await, "errno=-22\n\n");
        assert!(closed(&mut c).await);
        // A set longer than the bound: refused and closed without reading the rest.
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        let mut big = b"set=1\n".to_vec();
        while big.len() <= MAX_REQUEST_BYTES {
            big.extend_from_slice(b"allowed_ip=10.5.3.0/24\n");
        }
        c.write_all(&big).await.unwrap();
        assert_eq!(answer(&mut c).await, "errno=-1\n\n");
        assert!(closed(&mut c).await);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_requests_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server =
            UapiServer::start_in(dir.path(), "wg0", source(Arc::new(AtomicU64::new(0)))).unwrap();
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        c.write_all(b"get=1\n").await.unwrap();
        // The blank line never comes: the request bound closes the connection.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(REQUEST_TIMEOUT * 2, c.read(&mut buf))
            .await
            .expect("not closed after the request bound")
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn snapshot_failure_is_eio() {
        let dir = tempfile::tempdir().unwrap();
        let failing: Arc<dyn SnapshotSource> =
            Arc::new(|| Err::<DeviceSnapshot, SnapshotError>("device gone".into()));
        let server = UapiServer::start_in(dir.path(), "wg0", failing).unwrap();
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        c.write_all(b"get=1\n\n").await.unwrap();
        assert_eq!(answer(&mut c).await, "errno=-5\n\n");
    }

    #[tokio::test]
    async fn stale_socket_replaced_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.sock");
        // A socket nobody listens on any more (its listener dropped without unlinking).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let src = source(Arc::new(AtomicU64::new(0)));
        let server = UapiServer::start_in(dir.path(), "wg0", src.clone()).unwrap();
        // A second server for the same device: refused, the first one keeps serving.
        let e = UapiServer::start_in(dir.path(), "wg0", src.clone()).unwrap_err();
        assert!(matches!(e, UapiError::InUse(_)), "{e}");
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"get=1\n\n").await.unwrap();
        assert!(answer(&mut c).await.ends_with("errno=0\n\n"));
        drop(server);
        assert!(!path.exists());
        // A regular file in the way is not ours to delete.
        std::fs::write(&path, b"x").unwrap();
        let e = UapiServer::start_in(dir.path(), "wg0", src.clone()).unwrap_err();
        assert!(matches!(e, UapiError::NotASocket(_)), "{e}");
        assert!(path.exists());
    }

    #[tokio::test]
    async fn wedged_listener_counts_as_live() {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.sock");
        // A listener that never accepts, its backlog filled with non-blocking connects: a
        // blocking probe would hang here.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let addr = UnixAddr::new(&path).unwrap();
        let mut held = Vec::new();
        let full = (0..5000).any(|_| {
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let r = connect(fd.as_raw_fd(), &addr);
            held.push(fd);
            r == Err(nix::errno::Errno::EAGAIN)
        });
        assert!(full, "backlog never filled");
        let started = std::time::Instant::now();
        let e = UapiServer::start_in(dir.path(), "wg0", source(Arc::new(AtomicU64::new(0))))
            .unwrap_err();
        assert!(matches!(e, UapiError::InUse(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(path.exists());
    }

    #[tokio::test]
    async fn drop_leaves_a_successors_socket() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(Arc::new(AtomicU64::new(0)));
        let first = UapiServer::start_in(dir.path(), "wg0", src.clone()).unwrap();
        // Someone replaced the socket meanwhile (e.g. wireguard-go after an operator removed
        // ours): dropping ours must not delete theirs.
        std::fs::remove_file(first.path()).unwrap();
        let second = UapiServer::start_in(dir.path(), "wg0", src).unwrap();
        drop(first);
        assert!(second.path().exists());
        drop(second);
        assert!(!dir.path().join("wg0.sock").exists());
    }

    #[test]
    fn interface_names() {
        for ok in ["wg0", "flannel-wg", "flannel-wg-v6", "a23456789012345"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a234567890123456",
            "../x",
            "a/b",
            ".",
            "..",
            "wg 0",
            "wg\0",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
