//! Root tests against Debian's real tools: `wg show` and `wg show dump` (wireguard-tools) read
//! our socket; wireguard-go's own `get=1` answer equals ours byte for byte for the same state.
//! The socket directory is fixed by `wg` (/var/run/wireguard): every interface name here is
//! unique per run and its socket is removed by a guard. Without root or the tools: skipped
//! (CI set: failed).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use test_support::{random_tag, require_root_with, run_bounded, wait_for, Testbed};
use wg_uapi::{
    DeviceSnapshot, Key, PeerSnapshot, SnapshotError, SnapshotSource, UapiServer, SOCKET_DIR,
};

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(s: &str) -> [u8; 32] {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.trim().bytes().take_while(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out.try_into().unwrap()
}

/// Runs `wg ARGS` (bounded to 10 s).
fn wg(args: &[&str]) -> (bool, String, String) {
    let out = run_bounded(Command::new("wg").args(args), Duration::from_secs(10)).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh key pair from `wg genkey` / `wg pubkey`.
fn keypair() -> (Key, Key) {
    let (ok, private, _) = wg(&["genkey"]);
    assert!(ok);
    // `wg pubkey` reads the key on stdin (base64: no shell quoting needed).
    let out = run_bounded(
        Command::new("sh").args(["-c", &format!("echo {} | wg pubkey", private.trim())]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(out.status.success());
    let public = String::from_utf8_lossy(&out.stdout).into_owned();
    (Key(unbase64(&private)), Key(unbase64(&public)))
}

/// Removes a socket left under /var/run/wireguard by this test (its name is unique per run).
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn iface() -> String {
    // ≤ 15 bytes: "fwu" + 8 hex.
    format!("fwu{}", random_tag(8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wg_show_reads_our_socket() {
    if !require_root_with(&["wg"]) {
        return;
    }
    let name = iface();
    let _guard = SocketGuard(PathBuf::from(SOCKET_DIR).join(format!("{name}.sock")));
    let (private, public) = keypair();
    let (_, peer1) = keypair();
    let (_, peer2) = keypair();
    let (psk, _) = keypair();
    let handshake = SystemTime::now() - Duration::from_secs(65);
    let dev = DeviceSnapshot {
        private_key: Some(private),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![
            PeerSnapshot {
                public_key: peer1,
                preshared_key: None,
                endpoint: Some("172.30.0.12:51820".parse().unwrap()),
                allowed_ips: vec!["10.5.2.0/24".parse().unwrap()],
                last_handshake: Some(handshake),
                rx_bytes: 92 * 1024 * 1024,
                tx_bytes: 1536,
                persistent_keepalive_interval: 25,
            },
            PeerSnapshot {
                public_key: peer2,
                preshared_key: Some(psk),
                endpoint: Some("[fd00:210::13]:51821".parse().unwrap()),
                allowed_ips: vec![
                    "10.5.3.0/24".parse().unwrap(),
                    "fd10:0:0:3::/64".parse().unwrap(),
                ],
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive_interval: 0,
            },
        ],
    };
    let snap = dev.clone();
    let source: Arc<dyn SnapshotSource> = Arc::new(move || Ok::<_, SnapshotError>(snap.clone()));
    let server = UapiServer::start(&name, source).unwrap();
    let path = server.path().to_path_buf();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let n = name.clone();
    let (show, dump, set) = tokio::task::spawn_blocking(move || {
        (
            wg(&["show", &n]),
            wg(&["show", &n, "dump"]),
            wg(&["set", &n, "listen-port", "1"]),
        )
    })
    .await
    .unwrap();
    eprintln!("wg show:\n{}{}", show.1, show.2);
    eprintln!("wg show dump:\n{}{}", dump.1, dump.2);
    assert!(show.0, "wg show failed: {}", show.2);
    assert!(dump.0, "wg show dump failed: {}", dump.2);

    let (pub_b64, priv_b64) = (base64(&public.0), base64(&private.0));
    let (p1, p2, psk_b64) = (base64(&peer1.0), base64(&peer2.0), base64(&psk.0));
    // The summary: interface, its public key (wg derives it from the private key we served),
    // each peer with endpoint, allowed ips, handshake, transfer, keepalive.
    let s = &show.1;
    for want in [
        format!("interface: {name}\n"),
        format!("  public key: {pub_b64}\n"),
        "  private key: (hidden)\n".to_string(),
        "  listening port: 51820\n".to_string(),
        format!("peer: {p1}\n  endpoint: 172.30.0.12:51820\n  allowed ips: 10.5.2.0/24\n  latest handshake: 1 minute, "),
        "  transfer: 92.00 MiB received, 1.50 KiB sent\n".to_string(),
        "  persistent keepalive: every 25 seconds\n".to_string(),
        format!("peer: {p2}\n  preshared key: (hidden)\n  endpoint: [fd00:210::13]:51821\n  allowed ips: 10.5.3.0/24, fd10:0:0:3::/64\n"),
    ] {
        assert!(s.contains(&want), "wg show lacks {want:?}:\n{s}");
    }
    // The peer without a handshake shows none and no transfer line of its own.
    let second = &s[s.find(&format!("peer: {p2}")).unwrap()..];
    assert!(!second.contains("latest handshake"), "{second}");
    assert!(!second.contains("transfer"), "{second}");

    // The dump, exactly: tab-separated, one line per interface and per peer.
    let secs = handshake
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut got: Vec<&str> = dump.1.lines().collect();
    // wg sorts peers by latest handshake; compare the peer lines as a set.
    got[1..].sort_unstable();
    let mut want = vec![
        format!("{priv_b64}\t{pub_b64}\t51820\toff"),
        format!("{p1}\t(none)\t172.30.0.12:51820\t10.5.2.0/24\t{secs}\t96468992\t1536\t25"),
        format!("{p2}\t{psk_b64}\t[fd00:210::13]:51821\t10.5.3.0/24,fd10:0:0:3::/64\t0\t0\t0\toff"),
    ];
    want[1..].sort_unstable();
    assert_eq!(got, want);

    // `wg set` is refused with the reason wg prints for -EPERM.
    assert!(!set.0, "wg set succeeded: {}", set.1);
    assert!(
        set.2.contains("Operation not permitted"),
        "wg set: {}",
        set.2
    );

    server.shutdown();
    assert!(!path.exists(), "socket left behind");
}

/// Reads one raw `get=1` answer from a UAPI socket (bounded).
fn raw_get(path: &std::path::Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"get=1\n\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\n\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

/// Splits a get answer into the device's lines and one block per peer (wireguard-go lists
/// its peers in Go map order, i.e. at random).
fn blocks(answer: &str) -> (String, Vec<String>) {
    let mut parts = answer.split("public_key=");
    let head = parts.next().unwrap().to_string();
    let mut peers: Vec<String> = parts.map(|p| format!("public_key={p}")).collect();
    // The status line ends the last block: move it to the head.
    let mut head = head;
    if let Some(last) = peers.last_mut() {
        if let Some(i) = last.find("errno=") {
            head.push_str(&last[i..]);
            last.truncate(i);
        }
    } else if let Some(i) = head.find("errno=") {
        let status = head.split_off(i);
        head.push_str(&status);
    }
    peers.sort_unstable();
    (head, peers)
}

#[test]
fn same_answer_as_wireguard_go() {
    if !require_root_with(&["wg", "wireguard-go", "ip"]) {
        return;
    }
    let mut tb = Testbed::new(1).unwrap();
    let ns = tb.nodes[0].ns.clone();
    let name = iface();
    let sock = PathBuf::from(SOCKET_DIR).join(format!("{name}.sock"));
    let _guard = SocketGuard(sock.clone());
    let dir = tempfile::tempdir().unwrap();
    let handle = tb
        .spawn(
            &ns,
            "wireguard-go",
            &["-f", &name],
            &[],
            &dir.path().join("wireguard-go.log"),
        )
        .unwrap();
    wait_for(Duration::from_secs(10), || sock.exists().then_some(()))
        .expect("wireguard-go did not open its UAPI socket in 10 s");

    let (private, _) = keypair();
    let (_, peer1) = keypair();
    let (_, peer2) = keypair();
    let (psk, _) = keypair();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, base64(&private.0)).unwrap();
    let psk_file = dir.path().join("psk");
    std::fs::write(&psk_file, base64(&psk.0)).unwrap();
    // The device stays down (its TUN is never set up): no handshakes, counters stay 0.
    let (ok, _, err) = wg(&[
        "set",
        &name,
        "private-key",
        key_file.to_str().unwrap(),
        "listen-port",
        "0",
        "fwmark",
        "0x4000",
        "peer",
        &base64(&peer1.0),
        "endpoint",
        "172.30.0.12:51820",
        "allowed-ips",
        "10.5.2.0/24",
        "peer",
        &base64(&peer2.0),
        "preshared-key",
        psk_file.to_str().unwrap(),
        "endpoint",
        "[fd00:210::13]:51821",
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "10.5.3.0/24,fd10:0:0:3::/64",
    ]);
    assert!(ok, "wg set on wireguard-go: {err}");
    let theirs = raw_get(&sock);
    eprintln!("wireguard-go answers:\n{theirs}");
    // wireguard-go binds a random port for listen-port 0: take it from its answer.
    let port: u16 = theirs
        .lines()
        .find_map(|l| l.strip_prefix("listen_port="))
        .map_or(0, |p| p.parse().unwrap());

    let dev = DeviceSnapshot {
        private_key: Some(private),
        listen_port: port,
        fwmark: 0x4000,
        peers: vec![
            PeerSnapshot {
                endpoint: Some("172.30.0.12:51820".parse().unwrap()),
                allowed_ips: vec!["10.5.2.0/24".parse().unwrap()],
                ..PeerSnapshot::new(peer1)
            },
            PeerSnapshot {
                preshared_key: Some(psk),
                endpoint: Some("[fd00:210::13]:51821".parse().unwrap()),
                allowed_ips: vec![
                    "10.5.3.0/24".parse().unwrap(),
                    "fd10:0:0:3::/64".parse().unwrap(),
                ],
                persistent_keepalive_interval: 25,
                ..PeerSnapshot::new(peer2)
            },
        ],
    };
    let ours = format!("{}{}", wg_uapi::render_get(&dev), wg_uapi::render_status(0));
    assert_eq!(blocks(&ours), blocks(&theirs), "ours:\n{ours}");
    // With one peer the order question is gone: the whole answer byte for byte.
    let (ok, _, err) = wg(&["set", &name, "peer", &base64(&peer1.0), "remove"]);
    assert!(ok, "{err}");
    let theirs = raw_get(&sock);
    let one = DeviceSnapshot {
        peers: dev.peers[1..].to_vec(),
        ..dev.clone()
    };
    let ours = format!("{}{}", wg_uapi::render_get(&one), wg_uapi::render_status(0));
    assert_eq!(ours, theirs);

    tb.stop(handle, Duration::from_secs(5));
    wait_for(Duration::from_secs(5), || (!sock.exists()).then_some(()));
}
