//! TCP probes across namespaces: a server that answers each connection with the source address
//! it saw (so a test sees whether traffic was masqueraded), and a client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::in_netns;

/// Answers every connection on `port` in a namespace with "<source IP>\n"; stops on drop.
#[derive(Debug)]
pub struct WhoAmIServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WhoAmIServer {
    pub fn start(ns: &str, port: u16) -> Result<WhoAmIServer, String> {
        let listener = in_netns(ns, move || TcpListener::bind(("0.0.0.0", port)))?
            .map_err(|e| format!("bind :{port} in {ns}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                        let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(WhoAmIServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for WhoAmIServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from namespace `ns` to `to` and returns the source address the server saw.
pub fn whoami(ns: &str, to: SocketAddr, limit: Duration) -> Result<String, String> {
    let stream = in_netns(ns, move || TcpStream::connect_timeout(&to, limit))?
        .map_err(|e| format!("connect {to} from {ns}: {e}"))?;
    let mut stream = stream;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    stream
        .read_to_string(&mut buf)
        .map_err(|e| format!("read from {to}: {e}"))?;
    Ok(buf.trim().to_string())
}
