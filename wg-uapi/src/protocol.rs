//! The protocol itself, without I/O: the device snapshot, its `get=1` answer byte for byte as
//! wireguard-go writes it (device/uapi.go, `IpcGetOperation`), and a per-connection state
//! machine that reads requests line by line, bounded in size.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

/// Linux errno values, answered negated (`errno=-1`) as wireguard-go does on Linux
/// (ipc/uapi_unix.go: `IpcErrorInvalid = -int64(unix.EINVAL)` and so on).
pub mod errno {
    /// Operation not permitted: our answer to every `set=1` (the device is managed by flanneld).
    pub const EPERM: i32 = 1;
    /// I/O error: wireguard-go's `IpcErrorIO`; ours when the snapshot cannot be taken.
    pub const EIO: i32 = 5;
    /// Invalid argument: wireguard-go's `IpcErrorInvalid` (e.g. `get=1` not followed by a
    /// blank line).
    pub const EINVAL: i32 = 22;
}

/// A 32-byte Curve25519 key (private, public or preshared).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Lowercase hex, the UAPI's key encoding.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

/// Never prints key material (a private or preshared key could end up in a log).
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// One peer as `wg show` presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: Key,
    /// None: no preshared key (wireguard-go then sends 64 zeros, which `wg` shows as none).
    pub preshared_key: Option<Key>,
    /// Where the peer's packets go (and last came from).
    pub endpoint: Option<SocketAddr>,
    /// In the order given; each rendered as its network (`10.5.2.7/24` → `10.5.2.0/24`).
    pub allowed_ips: Vec<IpNet>,
    /// None: no handshake yet (rendered `0` / `0`). Times before the epoch render as 0.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds, 0 = off.
    pub persistent_keepalive_interval: u16,
}

impl PeerSnapshot {
    /// A peer with this key and nothing else known yet.
    pub fn new(public_key: Key) -> PeerSnapshot {
        PeerSnapshot {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive_interval: 0,
        }
    }
}

/// The device's state at one instant, as the `get=1` answer carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// None or all zeros: not rendered (as wireguard-go skips a zero key).
    pub private_key: Option<Key>,
    /// 0: not rendered.
    pub listen_port: u16,
    /// 0: not rendered.
    pub fwmark: u32,
    /// Rendered in this order.
    pub peers: Vec<PeerSnapshot>,
}

/// The body of the answer to `get=1`, without the `errno=0` status: the lines wireguard-go's
/// `IpcGetOperation` writes, in its order.
pub fn render_get(dev: &DeviceSnapshot) -> String {
    let mut out = String::new();
    let mut line = |args: fmt::Arguments<'_>| {
        // Writing to a String cannot fail.
        let _ = out.write_fmt(args);
        out.push('\n');
    };
    if let Some(k) = dev.private_key.filter(|k| k.0 != [0; 32]) {
        line(format_args!("private_key={}", k.to_hex()));
    }
    if dev.listen_port != 0 {
        line(format_args!("listen_port={}", dev.listen_port));
    }
    if dev.fwmark != 0 {
        line(format_args!("fwmark={}", dev.fwmark));
    }
    for p in &dev.peers {
        line(format_args!("public_key={}", p.public_key.to_hex()));
        let psk = p.preshared_key.unwrap_or(Key([0; 32]));
        line(format_args!("preshared_key={}", psk.to_hex()));
        line(format_args!("protocol_version=1"));
        if let Some(ep) = p.endpoint {
            // `[addr]:port` for IPv6, as Go's netip.AddrPort prints it. A scope is printed as
            // its number (Go prints the zone's name); flannel's endpoints never carry one.
            line(format_args!("endpoint={ep}"));
        }
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        line(format_args!("last_handshake_time_sec={}", since.as_secs()));
        line(format_args!(
            "last_handshake_time_nsec={}",
            since.subsec_nanos()
        ));
        line(format_args!("tx_bytes={}", p.tx_bytes));
        line(format_args!("rx_bytes={}", p.rx_bytes));
        line(format_args!(
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_interval
        ));
        for net in &p.allowed_ips {
            line(format_args!("allowed_ip={}", net.trunc()));
        }
    }
    out
}

/// The status line that ends every answer, and the blank line after it.
pub fn render_status(errno: i32) -> String {
    if errno == 0 {
        "errno=0\n\n".to_string()
    } else {
        format!("errno=-{errno}\n\n")
    }
}

/// The most a request may take, operation line included ("a few KiB": a `get=1` is 7 bytes;
/// a `set=1` is refused whatever it says, so it need not be read further than this).
pub const MAX_REQUEST_BYTES: usize = 4096;

/// What a `set=1` request asked for, for the log line (no values: it may carry keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetSummary {
    /// Lines after `set=1`, the blank one excluded.
    pub lines: usize,
    /// `public_key=` lines: the peers it touched.
    pub peers: usize,
    /// Distinct keys in first-seen order (`private_key`, `listen_port`, `allowed_ip`, ...).
    pub keys: Vec<String>,
    /// The request went over [`MAX_REQUEST_BYTES`] and was cut short.
    pub truncated: bool,
}

/// What the connection should do after a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read another line.
    More,
    /// A complete `get=1`: answer the snapshot and `errno=0` (or an error status), then read
    /// the next request.
    Get,
    /// A complete `set=1`: answer `errno=-EPERM` ([`errno::EPERM`]), log the summary; then
    /// read the next request, or close if the request was cut short (the rest of it is unread).
    RefuseSet(SetSummary),
    /// Answer this error status, then close.
    ErrorClose(i32),
    /// Close without an answer (what wireguard-go does on an unknown operation).
    Close(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for an operation line.
    Idle,
    /// Got `get=1`; the blank line must follow.
    Get,
    /// Inside a `set=1` body.
    Set(SetSummary),
}

/// One connection's request reader. Feed it one line at a time, each at most
/// [`Session::budget`] bytes (the server reads with that limit).
#[derive(Debug, Clone)]
pub struct Session {
    state: State,
    /// Bytes of the current request so far.
    used: usize,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session {
            state: State::Idle,
            used: 0,
        }
    }

    /// How many more bytes the current request may take.
    pub fn budget(&self) -> usize {
        MAX_REQUEST_BYTES.saturating_sub(self.used)
    }

    /// Whether a request has started (EOF now would cut it short).
    pub fn in_request(&self) -> bool {
        self.state != State::Idle
    }

    /// Takes one line: `line` ends with `\n` unless the budget ran out (or the peer closed
    /// mid-line, which the server handles as the end of the connection).
    pub fn line(&mut self, line: &[u8]) -> Action {
        self.used = self.used.saturating_add(line.len());
        let complete = line.last() == Some(&b'\n');
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let state = std::mem::replace(&mut self.state, State::Idle);
        match state {
            State::Idle => {
                self.used = line.len();
                if !complete {
                    return Action::Close("operation line too long".to_string());
                }
                match text {
                    b"get=1" => {
                        self.state = State::Get;
                        Action::More
                    }
                    b"set=1" => {
                        self.state = State::Set(SetSummary::default());
                        Action::More
                    }
                    other => Action::Close(format!(
                        "invalid UAPI operation {:?}",
                        String::from_utf8_lossy(other)
                    )),
                }
            }
            State::Get => {
                if text.is_empty() && complete {
                    self.used = 0;
                    Action::Get
                } else {
                    // wireguard-go: "trailing character in UAPI get" → IpcErrorInvalid.
                    Action::ErrorClose(errno::EINVAL)
                }
            }
            State::Set(mut summary) => {
                if !complete {
                    summary.truncated = true;
                    return Action::RefuseSet(summary);
                }
                if text.is_empty() {
                    self.used = 0;
                    return Action::RefuseSet(summary);
                }
                summary.lines += 1;
                let key = text.split(|&b| b == b'=').next().unwrap_or(text);
                if key == b"public_key" {
                    summary.peers += 1;
                }
                let key = String::from_utf8_lossy(&key[..key.len().min(32)]).into_owned();
                if !summary.keys.contains(&key) && summary.keys.len() < 16 {
                    summary.keys.push(key);
                }
                self.state = State::Set(summary);
                Action::More
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(b: u8) -> Key {
        let mut k = [0u8; 32];
        for (i, v) in k.iter_mut().enumerate() {
            *v = b.wrapping_add(i as u8);
        }
        Key(k)
    }

    fn hex(b: u8) -> String {
        key(b).to_hex()
    }

    #[test]
    fn key_hex_and_debug() {
        let k = key(0xf0);
        assert_eq!(
            k.to_hex(),
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f"
        );
        assert_eq!(format!("{k:?}"), "Key(..)");
    }

    #[test]
    fn empty_device_renders_nothing() {
        assert_eq!(render_get(&DeviceSnapshot::default()), "");
        // A zero private key is not rendered either (wireguard-go: IsZero).
        let dev = DeviceSnapshot {
            private_key: Some(Key([0; 32])),
            ..DeviceSnapshot::default()
        };
        assert_eq!(render_get(&dev), "");
    }

    #[test]
    fn full_device_byte_exact() {
        let mut p1 = PeerSnapshot::new(key(0x10));
        p1.endpoint = Some("172.30.0.12:51820".parse().unwrap());
        p1.allowed_ips = vec!["10.5.2.0/24".parse().unwrap()];
        p1.last_handshake = Some(UNIX_EPOCH + Duration::new(1_765_000_000, 123_456_789));
        p1.rx_bytes = 92;
        p1.tx_bytes = 148;
        p1.persistent_keepalive_interval = 25;
        let mut p2 = PeerSnapshot::new(key(0x20));
        p2.preshared_key = Some(key(0x30));
        p2.endpoint = Some("[fd00:210::12]:51821".parse().unwrap());
        // Host bits are cleared as wireguard-go's allowed-IPs trie stores prefixes.
        p2.allowed_ips = vec![
            "fd10:0:0:2::7/64".parse().unwrap(),
            "10.5.3.9/24".parse().unwrap(),
        ];
        let dev = DeviceSnapshot {
            private_key: Some(key(0x01)),
            listen_port: 51820,
            fwmark: 0x4000,
            peers: vec![p1, p2],
        };
        let want = format!(
            "private_key={}\n\
             listen_port=51820\n\
             fwmark=16384\n\
             public_key={}\n\
             preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
             protocol_version=1\n\
             endpoint=172.30.0.12:51820\n\
             last_handshake_time_sec=1765000000\n\
             last_handshake_time_nsec=123456789\n\
             tx_bytes=148\n\
             rx_bytes=92\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.5.2.0/24\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             endpoint=[fd00:210::12]:51821\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             allowed_ip=fd10:0:0:2::/64\n\
             allowed_ip=10.5.3.0/24\n",
            hex(0x01),
            hex(0x10),
            hex(0x20),
            hex(0x30)
        );
        assert_eq!(render_get(&dev), want);
    }

    #[test]
    fn peer_without_endpoint_or_ips() {
        let dev = DeviceSnapshot {
            peers: vec![PeerSnapshot::new(key(7))],
            ..DeviceSnapshot::default()
        };
        let got = render_get(&dev);
        assert!(!got.contains("endpoint="), "{got}");
        assert!(!got.contains("allowed_ip="), "{got}");
        assert!(got.ends_with("persistent_keepalive_interval=0\n"), "{got}");
        // A handshake "before the epoch" (a broken clock) renders as none.
        let mut p = PeerSnapshot::new(key(7));
        p.last_handshake = Some(UNIX_EPOCH - Duration::from_secs(5));
        let got = render_get(&DeviceSnapshot {
            peers: vec![p],
            ..DeviceSnapshot::default()
        });
        assert!(
            got.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"),
            "{got}"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(render_status(0), "errno=0\n\n");
        assert_eq!(render_status(errno::EPERM), "errno=-1\n\n");
        assert_eq!(render_status(errno::EINVAL), "errno=-22\n\n");
    }

    #[test]
    fn get_requests_in_a_row() {
        let mut s = Session::new();
        for _ in 0..3 {
            assert_eq!(s.line(b"get=1\n"), Action::More);
            assert!(s.in_request());
            assert_eq!(s.line(b"\n"), Action::Get);
            assert!(!s.in_request());
            assert_eq!(s.budget(), MAX_REQUEST_BYTES);
        }
    }

    #[test]
    fn get_with_trailing_data_is_invalid() {
        let mut s = Session::new();
        assert_eq!(s.line(b"get=1\n"), Action::More);
        assert_eq!(s.line(b"x\n"), Action::ErrorClose(errno::EINVAL));
    }

    #[test]
    fn unknown_operations_close() {
        for op in [&b"\n"[..], b"get=2\n", b"set=1 \n", b"GET=1\n", b"hello"] {
            let mut s = Session::new();
            assert!(
                matches!(s.line(op), Action::Close(_)),
                "{:?}",
                String::from_utf8_lossy(op)
            );
        }
    }

    #[test]
    fn set_is_read_to_its_end_and_refused() {
        let mut s = Session::new();
        let body = [
            &b"set=1\n"[..],
            b"private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n",
            b"listen_port=12912\n",
            b"public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\n",
            b"allowed_ip=10.5.3.0/24\n",
            b"allowed_ip=10.5.4.0/24\n",
            b"public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n",
            b"remove=true\n",
        ];
        for l in body {
            assert_eq!(s.line(l), Action::More);
        }
        let Action::RefuseSet(summary) = s.line(b"\n") else {
            panic!("not refused")
        };
        assert_eq!(summary.lines, 7);
        assert_eq!(summary.peers, 2);
        assert_eq!(
            summary.keys,
            [
                "private_key",
                "listen_port",
                "public_key",
                "allowed_ip",
                "remove"
            ]
        );
        assert!(!summary.truncated);
        // The connection goes on: a get after the refused set.
        assert_eq!(s.line(b"get=1\n"), Action::More);
        assert_eq!(s.line(b"\n"), Action::Get);
    }

    #[test]
    fn oversized_set_is_cut_short() {
        let mut s = Session::new();
        assert_eq!(s.line(b"set=1\n"), Action::More);
        let l = b"allowed_ip=10.5.3.0/24\n";
        let mut fed = 6;
        loop {
            let budget = s.budget();
            if budget < l.len() {
                // The server's read stops at the budget, mid-line.
                let a = s.line(&l[..budget]);
                let Action::RefuseSet(summary) = a else {
                    panic!("{a:?}")
                };
                assert!(summary.truncated);
                assert_eq!(fed + budget, MAX_REQUEST_BYTES);
                break;
            }
            assert_eq!(s.line(l), Action::More);
            fed += l.len();
        }
    }

    #[test]
    fn overlong_operation_line_closes() {
        let mut s = Session::new();
        let long = vec![b'g'; MAX_REQUEST_BYTES];
        assert!(matches!(s.line(&long), Action::Close(_)));
    }
}
