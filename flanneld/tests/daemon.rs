//! flanneld end to end against a real etcd on loopback, run as a child process in the test's
//! own network namespace. No root needed, and nothing on the host changes even as root: the
//! `alloc` backend (no device), forward rules off and no masquerade (no nftables table),
//! `--iface lo`, a subnet file in a temp dir.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use subnet_lease::SubnetEnv;
use test_support::{random_tag, wait_for, Etcd};

const BIN: &str = env!("CARGO_BIN_EXE_flanneld");

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &[&str], log: &Path) -> Daemon {
        Self::start_env(args, &[], log)
    }

    fn start_env(args: &[&str], env: &[(&str, &str)], log: &Path) -> Daemon {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .arg("--iptables-forward-rules=false")
            // Pod records from a directory of the test's, not the host's /var/lib/cni/flannel.
            .arg(format!(
                "--cni-data-dir={}",
                log.with_extension("cni").display()
            ))
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = wait_for(Duration::from_secs(10), || self.child.try_wait().unwrap());
        status.and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Links, addresses, routes and nftables tables of the namespace the tests run in.
fn host_network_state() -> String {
    let run = |args: &[&str]| test_support::sh(args[0], &args[1..]).unwrap_or_default();
    [
        run(&["ip", "-o", "link", "show"]),
        run(&["ip", "-o", "addr", "show"]),
        run(&["ip", "route", "show", "table", "all"]),
        run(&["nft", "list", "tables"]),
    ]
    .join("\n")
    .lines()
    // Counters and timers change on their own.
    .map(|l| l.split(" valid_lft").next().unwrap_or(l).to_string())
    .collect::<Vec<_>>()
    .join("\n")
}

#[test]
fn acquires_writes_subnet_file_exits_zero_on_sigterm_and_keeps_subnet_on_restart() {
    let Some(etcd) = Etcd::start() else { return };
    let host_before = host_network_state();
    let prefix = format!("/t{}/network", random_tag(6));
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("run/subnet.env");
    let endpoints = etcd.endpoint();
    // Go-style single-dash flags are accepted, like flannel's.
    let args = [
        "-etcd-endpoints",
        endpoints.as_str(),
        "-etcd-prefix",
        prefix.as_str(),
        "--iface=lo",
        "--public-ip=10.9.8.7",
        "--subnet-file",
        subnet_file.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&args, &dir.path().join("1.log"));
    let env = wait_for(Duration::from_secs(20), || {
        SubnetEnv::read(&subnet_file).ok()
    })
    .unwrap_or_else(|| panic!("no subnet file; log:\n{}", d.log()));
    assert_eq!(env.network, Some("10.5.0.0/16".parse().unwrap()));
    assert_eq!(env.mtu, 65536, "alloc uses the interface MTU (lo)");
    let text = std::fs::read_to_string(&subnet_file).unwrap();
    let subnet = env.subnet.unwrap();
    assert_eq!(
        text,
        format!(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU=65536\nFLANNEL_IPMASQ=false\n",
            std::net::Ipv4Addr::from(u32::from(subnet.network()) + 1)
        )
    );
    let key = format!("{prefix}/subnets/{}-24", subnet.network());
    let value = etcd.etcdctl(&["get", &key, "--print-value-only"]).unwrap();
    assert_eq!(
        value.trim(),
        r#"{"PublicIP":"10.9.8.7","PublicIPv6":null,"BackendType":"alloc"}"#
    );
    let lease_of = || {
        let json = etcd.etcdctl(&["get", &key, "-w", "json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["kvs"][0]["lease"].as_i64().unwrap()
    };
    let lease_id = lease_of();
    assert_eq!(
        d.terminate(),
        Some(0),
        "exit 0 on SIGTERM; log:\n{}",
        d.log()
    );

    // Restarted with the subnet file removed: the lease in etcd (same PublicIP) is reused.
    std::fs::remove_file(&subnet_file).unwrap();
    let mut d = Daemon::start(&args, &dir.path().join("2.log"));
    let env2 = wait_for(Duration::from_secs(20), || {
        SubnetEnv::read(&subnet_file).ok()
    })
    .unwrap_or_else(|| panic!("no subnet file after restart; log:\n{}", d.log()));
    assert_eq!(env2.subnet, Some(subnet));
    assert_eq!(lease_of(), lease_id, "same etcd lease after restart");
    assert!(d.log().contains("reusing existing lease"), "{}", d.log());
    // A peer appearing is logged.
    let peer_key = format!("{prefix}/subnets/10.5.99.0-24");
    etcd.etcdctl(&[
        "put",
        &peer_key,
        r#"{"PublicIP":"10.9.8.1","PublicIPv6":null,"BackendType":"alloc"}"#,
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        d.log()
            .contains("peer joined or changed: 10.5.99.0-24")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("peer not logged:\n{}", d.log()));
    etcd.etcdctl(&["del", &peer_key]).unwrap();
    wait_for(Duration::from_secs(10), || {
        d.log().contains("peer left: 10.5.99.0-24").then_some(())
    })
    .unwrap_or_else(|| panic!("peer leaving not logged:\n{}", d.log()));
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(
        host_network_state(),
        host_before,
        "the daemon changed the host's network"
    );
}

#[test]
fn waits_for_the_network_config_and_sigint_exits_zero() {
    let Some(etcd) = Etcd::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ep = etcd.endpoint();
    let prefix = format!("/t{}/network", random_tag(6));
    // Flags from FLANNELD_* environment variables, as flannel reads them.
    // systemd's notification socket: READY=1 must come once the subnet file is written.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = Daemon::start_env(
        &["--iface", "127.0.0.1"],
        &[
            ("FLANNELD_ETCD_ENDPOINTS", ep.as_str()),
            ("FLANNELD_ETCD_PREFIX", prefix.as_str()),
            (
                "FLANNELD_SUBNET_FILE",
                dir.path().join("s.env").to_str().unwrap(),
            ),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ],
        &dir.path().join("log"),
    );
    wait_for(Duration::from_secs(10), || {
        d.log().contains("no network config").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
    // An invalid config is reported by key and rule, and the daemon keeps waiting.
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"Network":"10.5.0.0/29"}"#,
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        d.log().contains("Network: /29 is too small").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    ])
    .unwrap();
    wait_for(Duration::from_secs(20), || {
        dir.path().join("s.env").exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no sd_notify message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert!(
        dir.path().join("s.env").exists(),
        "READY=1 only after the subnet file"
    );
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = wait_for(Duration::from_secs(10), || d.child.try_wait().unwrap()).unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn tls_files_with_plain_http_endpoint_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "--etcd-endpoints=http://127.0.0.1:1",
            "--etcd-cafile=/nonexistent/ca.pem",
            "--iface=lo",
        ])
        .arg(format!("--subnet-file={}", dir.path().join("s").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("use https:// so the connection is encrypted"),
        "{err}"
    );
    // Logs going to a pipe (a file, journald) carry no ANSI colour codes.
    assert!(
        !err.contains('\x1b'),
        "colour codes in a non-terminal log: {err:?}"
    );
}

#[test]
fn a_password_over_plain_http_is_warned_about_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            // Nothing listens on port 1: the connection is refused at once.
            "--etcd-endpoints=http://127.0.0.1:1",
            "--etcd-username=root",
            "--etcd-password=hunter2-secret",
            "--iface=lo",
            "-v=10",
        ])
        .arg(format!("--subnet-file={}", dir.path().join("s").display()))
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the password crosses the network unencrypted"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2-secret"),
        "password in the log: {err}"
    );
}

/// GET `path` from the daemon's health endpoint on 127.0.0.1:`port` (empty on failure).
fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    ) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A sample of /metrics by its full name with labels (None when absent).
fn metric(port: u16, name: &str) -> Option<i64> {
    let key = format!("{name} ");
    get(port, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&key).and_then(|v| v.trim().parse().ok()))
}

fn ready(port: u16) -> bool {
    get(port, "/readyz").starts_with("HTTP/1.1 200")
}

fn until(d: &Daemon, what: &str, mut f: impl FnMut() -> bool) {
    wait_for(Duration::from_secs(20), || f().then_some(()))
        .unwrap_or_else(|| panic!("not {what} in 20 s; log:\n{}", d.log()));
}

#[test]
fn a_network_change_is_refused_and_never_costs_the_lease() {
    let Some(etcd) = Etcd::start() else { return };
    let prefix = format!("/t{}/network", random_tag(6));
    let conf = |net: &str| format!(r#"{{"Network":"{net}","Backend":{{"Type":"alloc"}}}}"#);
    let put_conf = |net: &str| {
        etcd.etcdctl(&["put", &format!("{prefix}/config"), &conf(net)])
            .unwrap()
    };
    put_conf("10.5.0.0/16");
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let port = test_support::free_port();
    let endpoints = etcd.endpoint();
    let health_port = format!("--healthz-port={port}");
    let mut args = vec![
        "--etcd-endpoints",
        endpoints.as_str(),
        "--etcd-prefix",
        prefix.as_str(),
        "--iface=lo",
        "--public-ip=10.9.8.7",
        "--healthz-ip=127.0.0.1",
        health_port.as_str(),
        "--subnet-file",
        subnet_file.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&args, &dir.path().join("1.log"));
    until(&d, "ready", || ready(port));
    let subnet = SubnetEnv::read(&subnet_file).unwrap().subnet.unwrap();
    let key = format!("{prefix}/subnets/{}-24", subnet.network());
    let leases = || {
        etcd.etcdctl(&[
            "get",
            "--prefix",
            &format!("{prefix}/subnets/"),
            "--keys-only",
        ])
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>()
    };

    // Written straight into etcd while running: refused, logged, counted (once, however
    // often the watch delivers it).
    put_conf("10.6.0.0/16");
    let rejected = r#"flannel_config_rejected_total{reason="network_changed"}"#;
    until(&d, "refusing the new Network", || {
        metric(port, rejected) == Some(1)
    });
    assert!(
        d.log()
            .contains("new network config refused: Network 10.5.0.0/16 -> 10.6.0.0/16"),
        "{}",
        d.log()
    );
    assert!(ready(port), "the running config stays");

    // Restarted under the changed config: the lease is kept, the daemon waits, not ready.
    assert_eq!(d.terminate(), Some(0));
    let mut d = Daemon::start(&args, &dir.path().join("2.log"));
    let waiting = r#"flannel_lease_waiting{reason="lease_outside_network"}"#;
    until(&d, "waiting with its lease outside the Network", || {
        metric(port, waiting) == Some(1)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        d.log().contains("lies outside the network config"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("--allow-network-change"), "{}", d.log());
    assert!(!ready(port));
    assert_eq!(
        leases(),
        vec![key.clone()],
        "lease kept, none taken in 10.6"
    );
    assert_eq!(
        metric(
            port,
            r#"flannel_config_rejected_total{reason="lease_outside_network"}"#
        ),
        Some(1)
    );
    assert!(d.child.try_wait().unwrap().is_none(), "still running");

    // The config is restored: the waiting daemon takes its lease back.
    put_conf("10.5.0.0/16");
    until(&d, "ready with the restored config", || ready(port));
    assert!(d.log().contains("reusing existing lease"), "{}", d.log());
    assert_eq!(metric(port, waiting), Some(0));
    assert_eq!(d.terminate(), Some(0));

    // A deliberate change (--allow-network-change): the old lease goes, one in 10.6 comes.
    put_conf("10.6.0.0/16");
    args.push("--allow-network-change");
    let mut d = Daemon::start(&args, &dir.path().join("3.log"));
    until(&d, "ready in the new Network", || ready(port));
    let env = SubnetEnv::read(&subnet_file).unwrap();
    assert_eq!(env.network, Some("10.6.0.0/16".parse().unwrap()));
    let now = leases();
    assert!(
        now.len() == 1 && now[0].contains("/subnets/10.6."),
        "{now:?}"
    );
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn a_full_network_waits_not_ready_and_takes_a_freed_subnet() {
    let Some(etcd) = Etcd::start() else { return };
    let prefix = format!("/t{}/network", random_tag(6));
    // Room for one /24 only, held by another node.
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.1.0","Backend":{"Type":"alloc"}}"#,
    ])
    .unwrap();
    let other = format!("{prefix}/subnets/10.5.1.0-24");
    etcd.etcdctl(&[
        "put",
        &other,
        r#"{"PublicIP":"10.9.8.1","PublicIPv6":null,"BackendType":"alloc"}"#,
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let port = test_support::free_port();
    let endpoints = etcd.endpoint();
    let health_port = format!("--healthz-port={port}");
    let args = [
        "--etcd-endpoints",
        endpoints.as_str(),
        "--etcd-prefix",
        prefix.as_str(),
        "--iface=lo",
        "--public-ip=10.9.8.7",
        "--healthz-ip=127.0.0.1",
        health_port.as_str(),
        "--subnet-file",
        subnet_file.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&args, &dir.path().join("1.log"));
    let waiting = r#"flannel_lease_waiting{reason="network_full"}"#;
    until(&d, "waiting for a subnet", || {
        metric(port, waiting) == Some(1)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "still running:\n{}",
        d.log()
    );
    assert!(d.log().contains("is full"), "{}", d.log());
    assert!(!ready(port));
    assert!(!subnet_file.exists());
    // The other node's lease goes: ours now.
    etcd.etcdctl(&["del", &other]).unwrap();
    until(&d, "ready with the freed subnet", || ready(port));
    let env = SubnetEnv::read(&subnet_file).unwrap();
    assert_eq!(env.subnet, Some("10.5.1.0/24".parse().unwrap()));
    assert_eq!(metric(port, waiting), Some(0));
    assert_eq!(d.terminate(), Some(0));
}

/// Peers this node cannot reach are logged once each when their state changes, rate limited,
/// not every unreachable peer at every change of their number: 200 alloc leases written one
/// by one gave ~20,000 "peer unreachable" lines (130k for 1000 leases in 4 s). The peers here
/// advertise ipip (flannel's type that this build has no data plane for; alloc peers of an
/// alloc node count as reached).
#[test]
fn unreachable_peers_are_logged_once_per_change_and_rate_limited() {
    let Some(etcd) = Etcd::start() else { return };
    let prefix = format!("/t{}/network", random_tag(6));
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("s.env");
    let endpoints = etcd.endpoint();
    let mut d = Daemon::start(
        &[
            "--etcd-endpoints",
            &endpoints,
            "--etcd-prefix",
            &prefix,
            "--iface=lo",
            "--public-ip=10.9.8.7",
            "--subnet-file",
            subnet_file.to_str().unwrap(),
            "--iptables-resync=1",
        ],
        &dir.path().join("log"),
    );
    let own = wait_for(Duration::from_secs(20), || {
        SubnetEnv::read(&subnet_file).ok()
    })
    .unwrap_or_else(|| panic!("no subnet file; log:\n{}", d.log()))
    .subnet
    .unwrap();
    // The backend type is logged at start (without a warning: the config names it).
    assert!(d.log().contains("backend alloc"), "{}", d.log());
    assert!(!d.log().contains("no Backend"), "{}", d.log());
    const PEERS: u32 = 200;
    let started = std::time::Instant::now();
    let mut written = 0;
    for i in 0..=PEERS {
        let subnet = std::net::Ipv4Addr::new(10, 5, i as u8, 0);
        if subnet == own.network() || written == PEERS {
            continue;
        }
        written += 1;
        etcd.etcdctl(&[
            "put",
            &format!("{prefix}/subnets/{subnet}-24"),
            &format!(
                r#"{{"PublicIP":"10.9.9.{}","PublicIPv6":null,"BackendType":"ipip","BackendData":{{"PublicKey":"k","Port":51820}}}}"#,
                i % 250
            ),
        ])
        .unwrap();
    }
    let joined = |log: &str| log.matches("peer joined or changed").count() as u32;
    wait_for(Duration::from_secs(30), || {
        (joined(&d.log()) == PEERS).then_some(())
    })
    .unwrap_or_else(|| panic!("not every peer seen: {} of {PEERS}", joined(&d.log())));
    // A few more resyncs: nothing changed, nothing more to say.
    std::thread::sleep(Duration::from_secs(3));
    let log = d.log();
    let lines = log.matches("peer unreachable from this node").count();
    // The limiter lets 20 lines through per 10 s window (plus a summary line): on a loaded
    // machine writing the leases spans several windows.
    let windows = started.elapsed().as_secs() as usize / 10 + 1;
    assert!(
        (1..=21 * windows).contains(&lines),
        "{lines} unreachable lines for {PEERS} peers in {windows} windows of 10 s (expected \
         one per peer, at most the rate limit of 20 per 10 s plus a summary)"
    );
    assert!(
        log.contains("it advertises \"ipip\", which has no data plane"),
        "{log}"
    );
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn a_part_without_ipv6_only_support_is_refused_before_anything_is_done() {
    let Some(etcd) = Etcd::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ep = etcd.endpoint();
    let prefix = format!("/t{}/network", random_tag(6));
    etcd.etcdctl(&[
        "put",
        &format!("{prefix}/config"),
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48","Backend":{"Type":"vxlan"}}"#,
    ])
    .unwrap();
    let env = dir.path().join("s.env");
    let mut d = Daemon::start(
        &[
            "--iface",
            "127.0.0.1",
            "--etcd-endpoints",
            &ep,
            "--etcd-prefix",
            &prefix,
            "--subnet-file",
            env.to_str().unwrap(),
            // The cluster DNS on its default IPv4 address: IPv6-only pods could not reach
            // it, so the combination is refused.
            "--cluster-dns",
        ],
        &dir.path().join("log"),
    );
    let status = wait_for(Duration::from_secs(20), || d.child.try_wait().unwrap())
        .unwrap_or_else(|| panic!("still running: {}", d.log()));
    assert_eq!(status.code(), Some(1), "{}", d.log());
    assert!(
        d.log()
            .contains("EnableIPv4 is false but cluster DNS (--cluster-dns) listens on IPv4"),
        "{}",
        d.log()
    );
    assert!(!env.exists(), "no subnet file");
    let leases = etcd
        .etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{prefix}/subnets/"),
        ])
        .unwrap();
    assert!(leases.trim().is_empty(), "no lease: {leases}");
}
