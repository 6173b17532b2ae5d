//! Pod-to-pod data-plane benchmark across two namespace "nodes", in one run, for:
//! - plain routes via the peer node (no encapsulation): a baseline, always measured;
//! - kernel VXLAN programmed by hand exactly as flannel's backend programs it: the baseline the
//!   ratios refer to, always measured;
//! - our flanneld with `Backend.Type: vxlan` (`flanneld`; `norules` adds
//!   `--iptables-forward-rules=false`, measured only when listed in `--setups`);
//! - our flanneld with `Backend.Type: udp` (userspace TUN + UDP with offloads);
//! - a wireguard-go (Debian) tunnel between the two nodes set up by hand with `wg set`, as
//!   flannel's wireguard backend would configure it (`wggo`, measured only when listed): the
//!   independent baseline for our userspace WireGuard backend;
//! - our flanneld with `Backend.Type: wireguard` (`wireguard`, measured only when listed; each
//!   node its own key file);
//! - over IPv6 (issue 22), on a dual-stack underlay: plain IPv6 routes (`plain6`) and kernel
//!   VXLAN over IPv6 programmed by hand as flannel's backend does it (`hand6`, the baseline of
//!   the IPv6 ratios), both measured whenever an IPv6 row is; our flanneld vxlan and host-gw
//!   with a dual-stack config (`vxlan-dual`, `hostgw-dual`), measured pod to pod over IPv4 and
//!   over IPv6 on the same testbed.
//!
//! Per setup and round: TCP with one stream and with 4 parallel streams, UDP loss at fixed
//! offered rates (`--udp-rates 1,3`, Gbit/s), ping RTT p50/p99 over 200 pings, and CPU seconds
//! per GB during the one-stream TCP run (the daemons' own — flanneld, or wireguard-go —
//! and the whole machine's).
//! etcd runs in the hub in every setup (it is part of the cluster, not of the data plane).
//! Rounds alternate the setups' order (`--rounds N`, `--seconds S` per iperf3 run); each figure
//! is the median over rounds. Prints a markdown table (also to `--out FILE`) and writes an SVG
//! chart (`--svg FILE`, default `bench-results/overlay.svg`). Needs root, iperf3, etcd, ping and
//! a release build of flanneld next to this binary (`cargo build --release -p flanneld`).

#[path = "common.rs"]
mod common;
#[path = "overlay/parse.rs"]
mod parse;
#[path = "overlay/report.rs"]
mod report;
mod svg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use test_support::{run_bounded, run_checked, wait_for, Pod, Testbed};

use common::{check_stop, flanneld_bin, write_file};
use parse::{TcpRun, UdpRun};
use report::{Meta, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Plain,
    HandVxlan,
    Flanneld,
    FlanneldNoRules,
    FlanneldUdp,
    FlanneldHostGw,
    Plain6,
    HandVxlan6,
    FlanneldVxlanDual,
    FlanneldHostGwDual,
    FlanneldUdpDual,
    HandWireguardGo,
    FlanneldWireguard,
}

/// An address family the pods talk over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

/// Every setup, in table order, with its `--setups` key. The first two are the baselines.
const ALL: [(&str, Setup); 13] = [
    ("plain", Setup::Plain),
    ("hand", Setup::HandVxlan),
    ("flanneld", Setup::Flanneld),
    ("norules", Setup::FlanneldNoRules),
    ("udp", Setup::FlanneldUdp),
    ("hostgw", Setup::FlanneldHostGw),
    ("plain6", Setup::Plain6),
    ("hand6", Setup::HandVxlan6),
    ("vxlan-dual", Setup::FlanneldVxlanDual),
    ("hostgw-dual", Setup::FlanneldHostGwDual),
    ("udp-dual", Setup::FlanneldUdpDual),
    ("wggo", Setup::HandWireguardGo),
    ("wireguard", Setup::FlanneldWireguard),
];

/// Measured when `--setups` is not given (besides the baselines).
const DEFAULT_SETUPS: [Setup; 5] = [
    Setup::Flanneld,
    Setup::FlanneldUdp,
    Setup::FlanneldHostGw,
    Setup::FlanneldVxlanDual,
    Setup::FlanneldHostGwDual,
];

/// Index of hand VXLAN in the selected setups (the baselines always come first).
const HAND: usize = 1;

const PINGS: u32 = 200;
const PING_INTERVAL_MS: u32 = 10;
/// UDP payload: fits the pod MTU of VXLAN (1450) minus IPv4 and UDP headers.
const UDP_DATAGRAM: u32 = 1400;
/// Over IPv6: fits the pod MTU of VXLAN over IPv6 (1430) minus IPv6 and UDP headers.
const UDP_DATAGRAM_V6: u32 = 1380;
/// The WireGuard device's MTU, flannel's (1500 − 80), and the pods' behind it.
const WG_MTU: u32 = 1420;
/// The nodes' WireGuard listen port (flannel's default ListenPort).
const WG_PORT: u16 = 51820;

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "plain routes via the peer (baseline)",
            Setup::HandVxlan => "kernel VXLAN programmed by hand",
            Setup::Flanneld => "flanneld vxlan backend (default host rules)",
            Setup::FlanneldNoRules => "flanneld vxlan backend, --iptables-forward-rules=false",
            Setup::FlanneldUdp => "flanneld udp backend (userspace, offloads on)",
            Setup::FlanneldHostGw => "flanneld host-gw backend (routes via the peer)",
            Setup::Plain6 => "plain IPv6 routes via the peer (baseline)",
            Setup::HandVxlan6 => "kernel VXLAN over IPv6 programmed by hand",
            Setup::FlanneldVxlanDual => "flanneld vxlan backend, dual stack",
            Setup::FlanneldHostGwDual => "flanneld host-gw backend, dual stack",
            Setup::FlanneldUdpDual => "flanneld udp backend, dual stack (IPv4 underlay)",
            Setup::HandWireguardGo => "wireguard-go (Debian) tunnel set up by hand",
            Setup::FlanneldWireguard => "flanneld wireguard backend (userspace, boringtun)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Setup::Plain => "plain routes",
            Setup::HandVxlan => "hand VXLAN",
            Setup::Flanneld => "flanneld vxlan",
            Setup::FlanneldNoRules => "flanneld vxlan, no fwd rules",
            Setup::FlanneldUdp => "flanneld udp",
            Setup::FlanneldHostGw => "flanneld host-gw",
            Setup::Plain6 => "plain routes",
            Setup::HandVxlan6 => "hand VXLAN",
            Setup::FlanneldVxlanDual => "flanneld vxlan dual",
            Setup::FlanneldHostGwDual => "flanneld host-gw dual",
            Setup::FlanneldUdpDual => "flanneld udp dual",
            Setup::HandWireguardGo => "wireguard-go",
            Setup::FlanneldWireguard => "flanneld wireguard",
        }
    }

    /// Whether flanneld runs (and must be built) for this setup.
    fn needs_flanneld(self) -> bool {
        !matches!(
            self,
            Setup::Plain
                | Setup::HandVxlan
                | Setup::Plain6
                | Setup::HandVxlan6
                | Setup::HandWireguardGo
        )
    }

    /// The baselines: always measured (the IPv6 ones whenever an IPv6 row is).
    fn baseline(self) -> bool {
        matches!(
            self,
            Setup::Plain | Setup::HandVxlan | Setup::Plain6 | Setup::HandVxlan6
        )
    }

    /// The families measured pod to pod on this setup's testbed, in order.
    fn families(self) -> &'static [Fam] {
        match self {
            Setup::Plain6 | Setup::HandVxlan6 => &[Fam::V6],
            Setup::FlanneldVxlanDual | Setup::FlanneldHostGwDual | Setup::FlanneldUdpDual => {
                &[Fam::V4, Fam::V6]
            }
            _ => &[Fam::V4],
        }
    }

    /// UDP payload for iperf3 over `fam`: 1400 (IPv4) / 1380 (IPv6), less where the pod MTU
    /// is smaller (WireGuard's 1420: 1392).
    fn udp_datagram(self, fam: Fam) -> u32 {
        let mtu = self.pod_mtu();
        match fam {
            Fam::V4 => UDP_DATAGRAM.min(mtu - 28),
            Fam::V6 => UDP_DATAGRAM_V6.min(mtu - 48),
        }
    }

    /// The pod MTU: what flannel's subnet file says for the backend (checked against the
    /// file for the dual-stack setups). Dual-stack vxlan: 1430 for both families, the IPv6
    /// VXLAN device's MTU (the kernel adds 70 bytes over IPv6).
    fn pod_mtu(self) -> u32 {
        match self {
            Setup::Plain | Setup::FlanneldHostGw | Setup::Plain6 | Setup::FlanneldHostGwDual => {
                1500
            }
            Setup::FlanneldUdp | Setup::FlanneldUdpDual => 1472,
            Setup::HandVxlan6 | Setup::FlanneldVxlanDual => 1430,
            // flannel's wireguard backend: device MTU = interface MTU − 80.
            Setup::HandWireguardGo | Setup::FlanneldWireguard => WG_MTU,
            _ => 1450,
        }
    }
}

/// A table row: a setup measured over one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    setup: Setup,
    fam: Fam,
}

impl Row {
    fn name(self) -> String {
        match (self.setup.families().len(), self.fam) {
            (1, _) => self.setup.name().to_string(),
            (_, Fam::V4) => format!("{}, pod to pod over IPv4", self.setup.name()),
            (_, Fam::V6) => format!("{}, pod to pod over IPv6", self.setup.name()),
        }
    }

    fn short(self) -> String {
        match self.fam {
            Fam::V4 => self.setup.short().to_string(),
            Fam::V6 => format!("{} (IPv6)", self.setup.short()),
        }
    }
}

/// The rows of the selected setups, in order.
fn rows_of(setups: &[Setup]) -> Vec<Row> {
    setups
        .iter()
        .flat_map(|&setup| setup.families().iter().map(move |&fam| Row { setup, fam }))
        .collect()
}

/// The nodes' IPv6 pod subnets (flannel's default IPv6SubnetLen 64 in `fd10::/48`).
const SUBNETS6: [&str; 2] = ["fd10:0:0:1::/64", "fd10:0:0:2::/64"];
/// Each node's IPv6 pod subnet's network address (the IPv6 VXLAN device's, and the route's
/// gateway, as flannel programs them).
const NETS6: [&str; 2] = ["fd10:0:0:1::", "fd10:0:0:2::"];

const SUBNETS: [&str; 2] = ["10.5.1.0/24", "10.5.2.0/24"];

fn ip(tb: &Testbed, node: usize, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    tb.exec(&tb.nodes[node].ns, &full)
        .map(|_| ())
        .map_err(anyhow::Error::msg)
}

fn mac_of(tb: &Testbed, node: usize) -> Result<String> {
    let out = tb
        .exec(
            &tb.nodes[node].ns,
            &["cat", "/sys/class/net/flannel.1/address"],
        )
        .map_err(anyhow::Error::msg)?;
    Ok(out.trim().to_string())
}

/// Programs node `n` like flannel's vxlan backend would, by hand with iproute2.
fn hand_vxlan(tb: &Testbed) -> Result<()> {
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let local = tb.nodes[n].ip.clone();
        ip(
            tb,
            n,
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        ip(tb, n, &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
        let own = subnet.replace(".0/24", ".0/32");
        ip(tb, n, &["addr", "add", &own, "dev", "flannel.1"])?;
    }
    for n in 0..2 {
        let p = 1 - n;
        let peer_mac = mac_of(tb, p)?;
        let peer_gw = SUBNETS[p].replace(".0/24", ".0");
        ip(
            tb,
            n,
            &[
                "neigh",
                "replace",
                &peer_gw,
                "lladdr",
                &peer_mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        tb.exec(
            &tb.nodes[n].ns,
            &[
                "bridge",
                "fdb",
                "append",
                &peer_mac,
                "dev",
                "flannel.1",
                "dst",
                &tb.nodes[p].ip,
                "self",
                "permanent",
            ],
        )
        .map_err(anyhow::Error::msg)?;
        ip(
            tb,
            n,
            &[
                "route",
                "add",
                SUBNETS[p],
                "via",
                &peer_gw,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
    }
    Ok(())
}

fn plain_routes(tb: &Testbed) -> Result<()> {
    for n in 0..2 {
        let p = 1 - n;
        let via = tb.nodes[p].ip.clone();
        ip(tb, n, &["route", "add", SUBNETS[p], "via", &via])?;
    }
    Ok(())
}

/// Plain IPv6 routes: each node routes the peer's IPv6 pod subnet via the peer's underlay
/// IPv6 address (`v6`: the nodes' underlay addresses).
fn plain_routes6(tb: &Testbed, v6: &[String]) -> Result<()> {
    for n in 0..2 {
        let p = 1 - n;
        ip(tb, n, &["-6", "route", "add", SUBNETS6[p], "via", &v6[p]])?;
    }
    Ok(())
}

/// Kernel VXLAN over the IPv6 underlay, programmed by hand with iproute2 the way flannel's
/// vxlan backend programs its IPv6 device (docs/ipv6-plan.md §1 "vxlan v6"): `flannel-v6.1`,
/// VNI 1, `local <node IPv6>`, port 8472, nolearning, `accept_ra=0`, address = own IPv6
/// subnet's network address /128; per peer a permanent neighbour (peer's network address →
/// its VTEP MAC), an FDB entry (MAC → peer's underlay IPv6) and the onlink route, last.
fn hand_vxlan6(tb: &Testbed, v6: &[String]) -> Result<()> {
    const DEV: &str = "flannel-v6.1";
    for n in 0..2 {
        ip(
            tb,
            n,
            &[
                "link",
                "add",
                DEV,
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &v6[n],
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        tb.exec(
            &tb.nodes[n].ns,
            &["sysctl", "-qw", &format!("net/ipv6/conf/{DEV}/accept_ra=0")],
        )
        .map_err(anyhow::Error::msg)?;
        // flannel asks for iface − 50 (1450); the kernel clamps a VXLAN device over IPv6 to
        // iface − 70.
        ip(tb, n, &["link", "set", DEV, "mtu", "1430", "up"])?;
        let own = format!("{}/128", NETS6[n]);
        ip(tb, n, &["-6", "addr", "add", &own, "dev", DEV, "nodad"])?;
    }
    for n in 0..2 {
        let p = 1 - n;
        let peer_mac = tb
            .exec(
                &tb.nodes[p].ns,
                &["cat", &format!("/sys/class/net/{DEV}/address")],
            )
            .map_err(anyhow::Error::msg)?
            .trim()
            .to_string();
        ip(
            tb,
            n,
            &[
                "-6",
                "neigh",
                "replace",
                NETS6[p],
                "lladdr",
                &peer_mac,
                "dev",
                DEV,
                "nud",
                "permanent",
            ],
        )?;
        tb.exec(
            &tb.nodes[n].ns,
            &[
                "bridge",
                "fdb",
                "append",
                &peer_mac,
                "dev",
                DEV,
                "dst",
                &v6[p],
                "self",
                "permanent",
            ],
        )
        .map_err(anyhow::Error::msg)?;
        ip(
            tb,
            n,
            &[
                "-6",
                "route",
                "add",
                SUBNETS6[p],
                "via",
                NETS6[p],
                "dev",
                DEV,
                "onlink",
            ],
        )?;
    }
    Ok(())
}

/// WireGuard devices' UAPI sockets under /var/run/wireguard (shared by every namespace) that
/// this run created; removed on drop if the device left them behind (names are unique per run).
#[derive(Debug, Default)]
struct WgSockets(Vec<PathBuf>);

impl Drop for WgSockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A wireguard-go tunnel between the two nodes, set up by hand the way flannel's wireguard
/// backend configures its device: one wireguard-go per node (`wireguard-go -f`, started in the
/// node's namespace, stopped by PID with the testbed), keys from `wg genkey`, `wg set` with
/// listen port 51820 and the other node as peer (allowed IPs = its pod subnet, endpoint = its
/// underlay address), device address = own subnet's network address /32, MTU 1420, one route
/// for the whole Network via the device (`scope link`). Device names are unique per run:
/// wireguard-go's socket directory /var/run/wireguard is shared by all namespaces. Returns the
/// two wireguard-go PIDs (their CPU is the "daemon" column).
fn hand_wireguard_go(tb: &mut Testbed, dir: &Path, sockets: &mut WgSockets) -> Result<Vec<u32>> {
    let mut devs = Vec::new();
    let mut handles = Vec::new();
    let mut publics = Vec::new();
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let ns = tb.nodes[n].ns.clone();
        let dev = format!("wg{}{n}", tb.tag);
        let sock = PathBuf::from("/var/run/wireguard").join(format!("{dev}.sock"));
        ensure!(!sock.exists(), "{} exists already", sock.display());
        sockets.0.push(sock.clone());
        let handle = tb
            .spawn(
                &ns,
                "wireguard-go",
                &["-f", &dev],
                &[],
                &dir.join(format!("wg{n}.log")),
            )
            .map_err(anyhow::Error::msg)?;
        wait_for(Duration::from_secs(10), || sock.exists().then_some(()))
            .with_context(|| format!("wireguard-go in {ns}: no UAPI socket in 10 s"))?;
        let key = run_checked(Command::new("wg").arg("genkey"), Duration::from_secs(10))
            .map_err(anyhow::Error::msg)?;
        let key_file = dir.join(format!("wg{n}.key"));
        write_file(&key_file, key.trim())?;
        // `wg pubkey` reads the key on stdin (run_checked gives commands a null stdin).
        let public = run_checked(
            Command::new("sh")
                .args(["-c", "exec wg pubkey < \"$0\""])
                .arg(&key_file),
            Duration::from_secs(10),
        );
        publics.push(public.map_err(anyhow::Error::msg)?.trim().to_string());
        let port = WG_PORT.to_string();
        tb.exec(
            &ns,
            &[
                "wg",
                "set",
                &dev,
                "private-key",
                key_file.to_str().context("path")?,
                "listen-port",
                &port,
            ],
        )
        .map_err(anyhow::Error::msg)?;
        let own = subnet.replace(".0/24", ".0/32");
        let mtu = WG_MTU.to_string();
        ip(tb, n, &["addr", "add", &own, "dev", &dev])?;
        ip(tb, n, &["link", "set", &dev, "mtu", &mtu, "up"])?;
        ip(
            tb,
            n,
            &["route", "add", "10.5.0.0/16", "dev", &dev, "scope", "link"],
        )?;
        devs.push(dev);
        handles.push((handle, ns));
    }
    for (n, dev) in devs.iter().enumerate() {
        let p = 1 - n;
        let endpoint = format!("{}:{WG_PORT}", tb.nodes[p].ip);
        tb.exec(
            &tb.nodes[n].ns,
            &[
                "wg",
                "set",
                dev,
                "peer",
                &publics[p],
                "allowed-ips",
                SUBNETS[p],
                "endpoint",
                &endpoint,
            ],
        )
        .map_err(anyhow::Error::msg)?;
    }
    handles
        .iter()
        .map(|(handle, ns)| daemon_pid(tb, *handle, ns, "wireguard-go"))
        .collect()
}

/// Starts flanneld on both nodes with `backend` (dual stack with `v6`, the nodes' underlay
/// IPv6 addresses), waits for its routes, and returns the two daemons' PIDs.
fn run_flanneld(
    tb: &mut Testbed,
    dir: &Path,
    endpoint: &str,
    forward_rules: bool,
    backend: &str,
    v6: Option<&[String]>,
) -> Result<Vec<u32>> {
    let bin = flanneld_bin()?;
    // Reserve each node's subnet (keys without TTL) so the pods' addresses are known upfront.
    let etcd = tb.etcd.as_ref().context("etcd")?;
    let ipv6 = if v6.is_some() {
        r#","EnableIPv6":true,"IPv6Network":"fd10::/48""#
    } else {
        ""
    };
    etcd.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        &format!(r#"{{"Network":"10.5.0.0/16"{ipv6},"Backend":{{"Type":"{backend}"}}}}"#),
    ])
    .map_err(anyhow::Error::msg)?;
    for (n, subnet) in SUBNETS.iter().enumerate() {
        let mut key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
        let public_ipv6 = match v6 {
            Some(v6) => {
                key.push('&');
                key.push_str(&SUBNETS6[n].replace('/', "-"));
                format!(r#""{}""#, v6[n])
            }
            None => "null".to_string(),
        };
        let value = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":{public_ipv6}}}"#,
            tb.nodes[n].ip
        );

        etcd.etcdctl(&["put", &key, &value])
            .map_err(anyhow::Error::msg)?;
    }
    let mut handles = Vec::new();
    for n in 0..2 {
        let ns = tb.nodes[n].ns.clone();
        let env = dir.join(format!("n{n}.env"));
        // wireguard: each node its own private key (the default path is shared by the nodes).
        let key_file = dir.join(format!("n{n}.wgkey"));
        let key_file = key_file.to_str().context("path")?;
        let handle = tb
            .spawn(
                &ns,
                bin.to_str().context("path")?,
                &[
                    "--etcd-endpoints",
                    endpoint,
                    "--subnet-file",
                    env.to_str().context("path")?,
                    // No pods are attached through the CNI plugin here: publishing off.
                    "--cni-data-dir=",
                    if forward_rules {
                        "--iptables-forward-rules=true"
                    } else {
                        "--iptables-forward-rules=false"
                    },
                ],
                &[("RUST_LOG", "warn"), ("WIREGUARD_KEY_FILE", key_file)],
                &dir.join(format!("n{n}.log")),
            )
            .map_err(anyhow::Error::msg)?;
        handles.push((handle, ns));
    }
    // vxlan: a route per peer on flannel.1; udp: the Network route on flannel0 (the peer table
    // lives in the daemon, so the pods' ping in `one` confirms it); host-gw: a route per peer
    // via its address on eth0; wireguard: a route per peer on flannel-wg (the handshake is
    // confirmed by the pods' ping too).
    let (dev, want) = if backend == "udp" {
        ("flannel0", vec!["10.5.0.0/16".to_string(); 2])
    } else if backend == "wireguard" {
        (
            "flannel-wg",
            vec![SUBNETS[1].to_string(), SUBNETS[0].to_string()],
        )
    } else if backend == "host-gw" {
        (
            "eth0",
            vec![format!("{} via", SUBNETS[1]), format!("{} via", SUBNETS[0])],
        )
    } else {
        (
            "flannel.1",
            vec![format!("{} via", SUBNETS[1]), format!("{} via", SUBNETS[0])],
        )
    };
    for (n, want) in want.iter().enumerate() {
        wait_for(Duration::from_secs(30), || {
            tb.exec(&tb.nodes[n].ns, &["ip", "route", "show", "dev", dev])
                .ok()
                .filter(|r| r.contains(want.as_str()))
        })
        .context("flanneld did not program its routes in 30 s")?;
    }
    if v6.is_some() {
        // IPv6: vxlan a route per peer on flannel-v6.1, host-gw via the peer's IPv6 on eth0,
        // udp the IPv6Network route on flannel0.
        let dev6 = match backend {
            "host-gw" => "eth0",
            "udp" => "flannel0",
            _ => "flannel-v6.1",
        };
        for n in 0..2 {
            let want = if backend == "udp" {
                "fd10::/48".to_string()
            } else {
                format!("{} via", SUBNETS6[1 - n])
            };
            wait_for(Duration::from_secs(30), || {
                tb.exec(&tb.nodes[n].ns, &["ip", "-6", "route", "show", "dev", dev6])
                    .ok()
                    .filter(|r| r.contains(want.as_str()))
            })
            .context("flanneld did not program its IPv6 routes in 30 s")?;
        }
        // The pods' MTU is the subnet file's (dual-stack vxlan: the IPv6 device's, 1430).
        // The routes can be there before the subnet file is (flanneld writes it once the
        // backend is up): wait for it, bounded, rather than read it at once.
        for (n, subnet) in SUBNETS6.iter().enumerate() {
            let path = dir.join(format!("n{n}.env"));
            let env = wait_for(Duration::from_secs(30), || {
                std::fs::read_to_string(&path)
                    .ok()
                    .filter(|e| e.contains("FLANNEL_IPV6_SUBNET=") && e.contains("FLANNEL_MTU="))
            })
            .with_context(|| format!("flanneld's subnet file {} in 30 s", path.display()))?;
            let want = subnet.replace("::/64", "::1/64");
            ensure!(
                env.contains(&format!("FLANNEL_IPV6_SUBNET={want}\n")),
                "node {n} did not take its reserved IPv6 subnet {want}:\n{env}"
            );
            let mtu = match backend {
                "host-gw" => 1500,
                // The IPv4 underlay carries both families: interface − 28.
                "udp" => 1472,
                _ => 1430,
            };
            ensure!(
                env.contains(&format!("FLANNEL_MTU={mtu}\n")),
                "node {n}: FLANNEL_MTU is not {mtu}:\n{env}"
            );
        }
    }
    handles
        .iter()
        .map(|(handle, ns)| daemon_pid(tb, *handle, ns, "flanneld"))
        .collect()
}

/// The short command name of a process (`/proc/PID/comm`), if it still exists.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_string())
}

/// The PID of the daemon `name` (flanneld, wireguard-go). `ip netns exec` normally execs the
/// program, so the spawned child is the daemon itself; should it fork instead, look for it
/// among the namespace's processes.
fn daemon_pid(tb: &Testbed, handle: usize, ns: &str, name: &str) -> Result<u32> {
    let pid = tb
        .pid(handle)
        .with_context(|| format!("{name} in {ns} is not running"))?;
    if comm(pid).as_deref() == Some(name) {
        return Ok(pid);
    }
    let pids = run_checked(
        Command::new("ip").args(["netns", "pids", ns]),
        Duration::from_secs(10),
    )
    .map_err(anyhow::Error::msg)?;
    pids.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|&p| comm(p).as_deref() == Some(name))
        .with_context(|| format!("no {name} process in namespace {ns}"))
}

/// Runs a command in a namespace with a time bound; stdout and stderr kept apart.
fn ns_run(ns: &str, args: &[&str], limit: Duration) -> Result<Output> {
    run_bounded(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        limit,
    )
    .map_err(anyhow::Error::msg)
}

/// Kills the child on drop (bounded cleanup of the iperf3 server).
struct Guard(std::process::Child);

impl Guard {
    /// Waits up to `limit` for the child to exit by itself.
    fn wait_for_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 test from `from` to `to` (`client_args` added to `-c IP -t S -J`); returns the
/// client's JSON output. The one-shot server is stopped whatever happens.
fn iperf(from: &Pod, to: &Pod, seconds: u32, client_args: &[&str], dir: &Path) -> Result<String> {
    let log = dir.join("iperf3-server.log");
    let server = Command::new("ip")
        .args(["netns", "exec", &to.ns, "iperf3", "-s", "-1"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).context("iperf3 server log")?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting the iperf3 server")?;
    let mut server = Guard(server);
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let mut args = vec!["iperf3", "-c", &to.ip, "-t", &secs, "-J"];
    args.extend_from_slice(client_args);
    let out = ns_run(
        &from.ns,
        &args,
        Duration::from_secs(u64::from(seconds) + 20),
    )
    .context("iperf3 client")?;
    server.wait_for_exit(Duration::from_secs(5));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && !stdout.trim_start().starts_with('{') {
        bail!(
            "iperf3 {}: {}: {}",
            client_args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// TCP with `streams` parallel streams.
fn iperf_tcp(from: &Pod, to: &Pod, seconds: u32, streams: u32, dir: &Path) -> Result<TcpRun> {
    let p = streams.to_string();
    let out = iperf(from, to, seconds, &["-P", &p], dir)?;
    parse::tcp_run(&out).with_context(|| format!("iperf3 TCP with {streams} stream(s)"))
}

/// UDP offered at `gbps` Gbit/s in datagrams that fit every setup's pod MTU. Socket buffers
/// of 4 MiB at both ends (`-w`, applied by the server too), so the loss measured is the path's
/// and not the receiving iperf3's 208 KiB default buffer overflowing.
fn iperf_udp(
    from: &Pod,
    to: &Pod,
    seconds: u32,
    gbps: f64,
    datagram: &str,
    dir: &Path,
) -> Result<UdpRun> {
    let rate = format!("{gbps}G");
    let out = iperf(
        from,
        to,
        seconds,
        &["-u", "-b", &rate, "-l", datagram, "-w", "4M"],
        dir,
    )?;
    parse::udp_run(&out).with_context(|| format!("iperf3 UDP at {rate}"))
}

/// Ping RTT (p50, p99) in ms from the per-reply times of `PINGS` pings.
fn ping_rtt(from: &Pod, to: &Pod) -> Result<(f64, f64)> {
    let count = PINGS.to_string();
    let interval = (f64::from(PING_INTERVAL_MS) / 1000.0).to_string();
    let out = ns_run(
        &from.ns,
        &["ping", "-c", &count, "-i", &interval, "-W", "1", &to.ip],
        Duration::from_secs(30),
    )
    .context("ping")?;
    let times = parse::ping_times_ms(&String::from_utf8_lossy(&out.stdout));
    // Losing a few pings is a figure, not a failure; losing half means the path is broken.
    if times.len() < PINGS as usize / 2 {
        bail!(
            "ping: {} of {PINGS} replies ({}): {}",
            times.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let p50 = parse::percentile(&times, 0.5).context("no RTT")?;
    let p99 = parse::percentile(&times, 0.99).context("no RTT")?;
    Ok((p50, p99))
}

/// CPU counters at one instant: the daemons' ticks (None without daemons) and the machine's.
struct CpuSnapshot {
    daemons: Option<u64>,
    system: u64,
}

impl CpuSnapshot {
    fn take(daemons: &[u32]) -> Result<CpuSnapshot> {
        let daemons = if daemons.is_empty() {
            None
        } else {
            Some(
                daemons
                    .iter()
                    .map(|&pid| daemon_ticks(pid))
                    .sum::<Result<u64>>()?,
            )
        };
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        Ok(CpuSnapshot {
            daemons,
            system: parse::proc_stat_busy_ticks(&stat)?,
        })
    }
}

/// utime + stime of a running daemon, in clock ticks.
fn daemon_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("{path}: the daemon (pid {pid}) exited"))?;
    let cpu = parse::proc_pid_cpu(&stat).with_context(|| path.clone())?;
    ensure!(cpu.state != 'Z', "the daemon (pid {pid}) exited");
    Ok(cpu.ticks)
}

/// `getconf CLK_TCK`: the unit of the /proc CPU counters.
fn clock_ticks_per_second() -> Result<u64> {
    let out = run_checked(
        Command::new("getconf").arg("CLK_TCK"),
        Duration::from_secs(10),
    )
    .map_err(anyhow::Error::msg)?;
    let tck: u64 = out.trim().parse().context("getconf CLK_TCK")?;
    ensure!(tck > 0, "getconf CLK_TCK says 0");
    Ok(tck)
}

/// Gives `pod` (on `node`) the IPv6 address `<net>2/64` of the node's IPv6 pod subnet, the
/// node's bridge `<net>1/64`, and a default route via it, as the CNI chain would.
fn add_ipv6(tb: &Testbed, pod: &Pod) -> Result<Pod> {
    let net = NETS6[pod.node];
    let node_ns = &tb.nodes[pod.node].ns;
    let gw = format!("{net}1");
    let bridge_addrs = tb
        .exec(node_ns, &["ip", "-6", "addr", "show", "dev", "cni0"])
        .map_err(anyhow::Error::msg)?;
    if !bridge_addrs.contains(&format!("{gw}/64")) {
        tb.exec(
            node_ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{gw}/64"),
                "dev",
                "cni0",
                "nodad",
            ],
        )
        .map_err(anyhow::Error::msg)?;
    }
    let addr = format!("{net}2");
    for args in [
        vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"],
        vec![
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
        vec!["ip", "-6", "route", "add", "default", "via", &gw],
    ] {
        tb.exec(&pod.ns, &args).map_err(anyhow::Error::msg)?;
    }
    Ok(Pod {
        ns: pod.ns.clone(),
        ip: addr,
        node: pod.node,
    })
}

/// Builds a fresh testbed for `setup` and takes one round of every measurement, once per
/// family the setup measures (in [`Setup::families`] order).
fn one(setup: Setup, opts: &Opts, clk_tck: u64) -> Result<Vec<Sample>> {
    check_stop()?;
    // Declared before the testbed so it drops after it (once wireguard-go is stopped).
    let mut wg_sockets = WgSockets::default();
    let mut tb = Testbed::new(2).map_err(anyhow::Error::msg)?;
    let v6 = if setup.families().contains(&Fam::V6) {
        Some(tb.add_ipv6_underlay().map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let dir = tempfile::tempdir()?;
    // etcd runs in every setup: it is part of the cluster whatever the data plane, and on a
    // 2-core machine its background work would otherwise count against flanneld alone.
    let endpoint = tb.start_etcd();
    let d = dir.path();
    let v6s = v6.as_deref();
    let daemons = match setup {
        Setup::Plain => plain_routes(&tb).map(|()| Vec::new())?,
        Setup::HandVxlan => hand_vxlan(&tb).map(|()| Vec::new())?,
        Setup::Flanneld => run_flanneld(&mut tb, d, &endpoint, true, "vxlan", None)?,
        Setup::FlanneldNoRules => run_flanneld(&mut tb, d, &endpoint, false, "vxlan", None)?,
        Setup::FlanneldUdp => run_flanneld(&mut tb, d, &endpoint, true, "udp", None)?,
        Setup::FlanneldHostGw => run_flanneld(&mut tb, d, &endpoint, true, "host-gw", None)?,
        Setup::Plain6 => plain_routes6(&tb, v6s.context("IPv6 underlay")?).map(|()| Vec::new())?,
        Setup::HandVxlan6 => {
            hand_vxlan6(&tb, v6s.context("IPv6 underlay")?).map(|()| Vec::new())?
        }
        Setup::FlanneldVxlanDual => run_flanneld(&mut tb, d, &endpoint, true, "vxlan", v6s)?,
        Setup::FlanneldHostGwDual => run_flanneld(&mut tb, d, &endpoint, true, "host-gw", v6s)?,
        Setup::FlanneldUdpDual => run_flanneld(&mut tb, d, &endpoint, true, "udp", v6s)?,
        Setup::HandWireguardGo => hand_wireguard_go(&mut tb, d, &mut wg_sockets)?,
        Setup::FlanneldWireguard => run_flanneld(&mut tb, d, &endpoint, true, "wireguard", None)?,
    };
    let mtu = setup.pod_mtu();
    let p1 = tb
        .add_pod(0, "10.5.1.2/24", "10.5.1.1/24", mtu)
        .map_err(anyhow::Error::msg)?;
    let p2 = tb
        .add_pod(1, "10.5.2.2/24", "10.5.2.1/24", mtu)
        .map_err(anyhow::Error::msg)?;
    let mut pairs = Vec::new();
    for &fam in setup.families() {
        pairs.push(match fam {
            Fam::V4 => (p1.clone(), p2.clone()),
            Fam::V6 => (add_ipv6(&tb, &p1)?, add_ipv6(&tb, &p2)?),
        });
    }
    for (a, b) in &pairs {
        wait_for(Duration::from_secs(10), || {
            tb.exec_status(
                &a.ns,
                &["ping", "-c1", "-W1", &b.ip],
                Duration::from_secs(3),
            )
            .0
            .then_some(())
        })
        .with_context(|| format!("pods cannot reach each other ({} -> {})", a.ip, b.ip))?;
    }
    // Same settle time for every setup: let start-up work (etcd's WAL, the daemons' first
    // reconcile) finish so the figures are steady state.
    std::thread::sleep(Duration::from_secs(3));
    let mut samples = Vec::new();
    for ((a, b), &fam) in pairs.iter().zip(setup.families()) {
        let datagram = setup.udp_datagram(fam);
        samples.push(measure(a, b, datagram, &daemons, opts, clk_tck, d)?);
    }
    Ok(samples)
}

/// Every measurement from pod `p1` to pod `p2`, UDP in `datagram`-byte payloads.
fn measure(
    p1: &Pod,
    p2: &Pod,
    datagram: u32,
    daemons: &[u32],
    opts: &Opts,
    clk_tck: u64,
    dir: &Path,
) -> Result<Sample> {
    check_stop()?;
    let before = CpuSnapshot::take(daemons)?;
    let tcp1 = iperf_tcp(p1, p2, opts.seconds, 1, dir)?;
    let after = CpuSnapshot::take(daemons)?;
    let per_gb =
        |b: u64, a: u64| parse::cpu_seconds_per_gb(a.saturating_sub(b), clk_tck, tcp1.bytes);
    let daemon_cpu = before
        .daemons
        .zip(after.daemons)
        .and_then(|(b, a)| per_gb(b, a));
    let system_cpu = per_gb(before.system, after.system);
    check_stop()?;

    let tcp4 = iperf_tcp(p1, p2, opts.seconds, 4, dir)?;
    let datagram = datagram.to_string();
    let mut udp = Vec::new();
    for &gbps in &opts.udp_rates {
        check_stop()?;
        udp.push(iperf_udp(p1, p2, opts.seconds, gbps, &datagram, dir)?);
    }
    check_stop()?;
    let (rtt_p50, rtt_p99) = ping_rtt(p1, p2)?;
    Ok(Sample {
        tcp1: tcp1.gbps,
        tcp4: tcp4.gbps,
        udp,
        rtt_p50,
        rtt_p99,
        daemon_cpu,
        system_cpu,
    })
}

/// One line per measurement on stderr, while the run goes on.
fn progress(s: &Sample, rates: &[f64]) -> String {
    let udp: Vec<String> = rates
        .iter()
        .zip(&s.udp)
        .map(|(r, u)| format!("{r}G {:.2}% lost (sent {:.2})", u.lost_percent, u.sent_gbps))
        .collect();
    let cpu = |v: Option<f64>| v.map_or("-".to_string(), |c| format!("{c:.3}"));
    format!(
        "tcp {:.2} / 4 streams {:.2} Gbit/s; udp {}; rtt p50 {:.3} p99 {:.3} ms; cpu s/GB daemon {} system {}",
        s.tcp1,
        s.tcp4,
        if udp.is_empty() { "-".to_string() } else { udp.join(", ") },
        s.rtt_p50,
        s.rtt_p99,
        cpu(s.daemon_cpu),
        cpu(s.system_cpu),
    )
}

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    rounds: u32,
    seconds: u32,
    /// Selected setups in table order; plain and hand VXLAN always first.
    setups: Vec<Setup>,
    /// Offered UDP rates, Gbit/s.
    udp_rates: Vec<f64>,
    svg: PathBuf,
    out: Option<PathBuf>,
}

fn parse_rates(list: &str) -> Result<Vec<f64>> {
    list.split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| {
            let g: f64 = r
                .trim()
                .parse()
                .with_context(|| format!("--udp-rates: {r:?} is not a number (Gbit/s)"))?;
            ensure!(
                g.is_finite() && g > 0.0,
                "--udp-rates: {r} must be positive"
            );
            Ok(g)
        })
        .collect()
}

fn parse_setups(list: &str) -> Result<Vec<Setup>> {
    let mut wanted = Vec::new();
    for key in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let (_, s) = ALL.iter().find(|(k, _)| *k == key).with_context(|| {
            let keys: Vec<&str> = ALL.iter().map(|(k, _)| *k).collect();
            format!("--setups: unknown setup {key} (known: {})", keys.join(", "))
        })?;
        wanted.push(*s);
    }
    Ok(wanted)
}

/// Pod-to-pod throughput, loss, RTT and CPU per backend against plain routes and hand-made
/// kernel VXLAN (root).
#[derive(Debug, clap::Parser)]
#[command(name = "overlay-bench")]
struct Cli {
    /// Rounds (the order of setups is reversed every other round).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// flanneld setups to measure besides the baselines (comma separated).
    #[arg(long)]
    setups: Option<String>,
    /// Offered UDP rates in Gbit/s (comma separated; empty: no UDP runs).
    #[arg(long, default_value = "1,3")]
    udp_rates: String,
    /// The chart.
    #[arg(long, default_value = "bench-results/overlay.svg")]
    svg: PathBuf,
    /// The markdown table.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Opts> {
    let cli = <Cli as clap::Parser>::try_parse_from(
        std::iter::once("overlay-bench".to_string()).chain(args),
    )
    .map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => e.exit(),
        _ => anyhow::anyhow!("{e}"),
    })?;
    let wanted = match &cli.setups {
        Some(list) => parse_setups(list)?,
        None => DEFAULT_SETUPS.to_vec(),
    };
    // Plain routes and hand VXLAN are the baselines the ratios need: always measured; their
    // IPv6 twins whenever an IPv6 row is.
    let any_v6 = wanted.iter().any(|s| s.families().contains(&Fam::V6));
    let setups = ALL
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| {
            wanted.contains(s)
                || (s.baseline()
                    && match s.families() {
                        [Fam::V4] => true,
                        _ => any_v6,
                    })
        })
        .collect();
    Ok(Opts {
        rounds: cli.rounds,
        seconds: cli.seconds,
        setups,
        udp_rates: parse_rates(&cli.udp_rates)?,
        svg: cli.svg,
        out: cli.out,
    })
}

/// Runs every round; returns one Vec of per-round samples per row ([`rows_of`] the setups).
fn run_rounds(opts: &Opts, clk_tck: u64) -> Result<Vec<Vec<Sample>>> {
    let rows = rows_of(&opts.setups);
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); rows.len()];
    for r in 1..=opts.rounds {
        // Reverse the order every other round so no setup always runs first or last.
        let mut order: Vec<usize> = (0..opts.setups.len()).collect();
        if r % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let s = opts.setups[i];
            eprintln!("round {r}/{}: {}", opts.rounds, s.name());
            let samples =
                one(s, opts, clk_tck).with_context(|| format!("round {r}: {}", s.name()))?;
            for (fam, sample) in s.families().iter().zip(samples) {
                let k = rows
                    .iter()
                    .position(|row| row.setup == s && row.fam == *fam)
                    .context("row")?;
                eprintln!("  {fam:?}: {}", progress(&sample, &opts.udp_rates));
                results[k].push(sample);
            }
        }
    }
    Ok(results)
}

/// Medians per row of one family, ratios to that family's hand VXLAN.
fn summarize_family(
    rows: &[Row],
    samples: &[Vec<Sample>],
    fam: Fam,
    udp_rates: usize,
) -> Vec<report::Summary> {
    let (names, picked): (Vec<(String, String)>, Vec<Vec<Sample>>) = rows
        .iter()
        .zip(samples)
        .filter(|(row, _)| row.fam == fam)
        .map(|(row, s)| ((row.name(), row.short()), s.clone()))
        .unzip();
    if names.is_empty() {
        return Vec::new();
    }
    let hand = match fam {
        Fam::V4 => Setup::HandVxlan,
        Fam::V6 => Setup::HandVxlan6,
    };
    let baseline = rows
        .iter()
        .filter(|row| row.fam == fam)
        .position(|row| row.setup == hand)
        .unwrap_or(HAND);
    let names: Vec<(&str, &str)> = names
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    report::summarize(&names, &picked, baseline, udp_rates)
}

fn main() -> Result<()> {
    let opts = parse_args(std::env::args().skip(1))?;
    if !test_support::is_root() {
        bail!("needs root (network namespaces)");
    }
    common::on_signals()?;
    if opts.setups.iter().any(|s| s.needs_flanneld()) {
        flanneld_bin()?;
    }
    let clk_tck = clock_ticks_per_second()?;
    let samples = run_rounds(&opts, clk_tck)?;

    let rows = rows_of(&opts.setups);
    let n = opts.udp_rates.len();
    let v4 = summarize_family(&rows, &samples, Fam::V4, n);
    let v6 = summarize_family(&rows, &samples, Fam::V6, n);
    let meta = Meta {
        rounds: opts.rounds,
        seconds: opts.seconds,
        udp_rates: opts.udp_rates.clone(),
        pings: PINGS,
        ping_interval_ms: PING_INTERVAL_MS,
    };
    let table = report::render_tables(&meta, &v4, &v6);
    print!("{table}");
    if let Some(out) = &opts.out {
        write_file(out, &table)?;
        eprintln!("table written to {}", out.display());
    }
    let all: Vec<report::Summary> = v4.into_iter().chain(v6).collect();
    write_file(&opts.svg, &report::render_svg(&meta, &all))?;
    eprintln!("chart written to {}", opts.svg.display());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Opts> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults() {
        let o = args(&[]).unwrap();
        assert_eq!(o.rounds, 3);
        assert_eq!(o.seconds, 5);
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::Flanneld,
                Setup::FlanneldUdp,
                Setup::FlanneldHostGw,
                Setup::Plain6,
                Setup::HandVxlan6,
                Setup::FlanneldVxlanDual,
                Setup::FlanneldHostGwDual,
            ]
        );
        assert_eq!(o.setups[HAND], Setup::HandVxlan);
        assert_eq!(o.udp_rates, vec![1.0, 3.0]);
        assert_eq!(o.svg, PathBuf::from("bench-results/overlay.svg"));
        assert_eq!(o.out, None);
    }

    #[test]
    fn options() {
        let o = args(&[
            "--rounds",
            "1",
            "--seconds",
            "2",
            "--setups",
            "udp,norules",
            "--udp-rates",
            "0.5,2",
            "--svg",
            "/tmp/x.svg",
            "--out",
            "t.md",
        ])
        .unwrap();
        assert_eq!((o.rounds, o.seconds), (1, 2));
        // Table order, baselines first, whatever the order asked.
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::FlanneldNoRules,
                Setup::FlanneldUdp
            ]
        );
        assert_eq!(o.udp_rates, vec![0.5, 2.0]);
        assert_eq!(o.svg, PathBuf::from("/tmp/x.svg"));
        assert_eq!(o.out, Some(PathBuf::from("t.md")));
        // Baselines only; no UDP rates.
        let o = args(&["--setups", "hand", "--udp-rates", ""]).unwrap();
        assert_eq!(o.setups, vec![Setup::Plain, Setup::HandVxlan]);
        assert!(o.udp_rates.is_empty());
        // An IPv6 row brings the IPv6 baselines.
        let o = args(&["--setups", "hostgw-dual"]).unwrap();
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::Plain6,
                Setup::HandVxlan6,
                Setup::FlanneldHostGwDual
            ]
        );
        // The wireguard-go baseline is measured only when asked, after the IPv4 rows.
        let o = args(&["--setups", "wggo,udp"]).unwrap();
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::FlanneldUdp,
                Setup::HandWireguardGo
            ]
        );
        assert!(!Setup::HandWireguardGo.needs_flanneld());
        let o = args(&["--setups", "wireguard,wggo"]).unwrap();
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::HandWireguardGo,
                Setup::FlanneldWireguard
            ]
        );
        assert!(Setup::FlanneldWireguard.needs_flanneld());
        assert_eq!(Setup::FlanneldWireguard.udp_datagram(Fam::V4), 1392);
        assert!(Setup::FlanneldUdp.needs_flanneld());
        let o = args(&["--setups", "hand6"]).unwrap();
        assert_eq!(
            o.setups,
            vec![
                Setup::Plain,
                Setup::HandVxlan,
                Setup::Plain6,
                Setup::HandVxlan6
            ]
        );
    }

    #[test]
    fn rows_per_family() {
        let rows = rows_of(&[
            Setup::HandVxlan,
            Setup::HandVxlan6,
            Setup::FlanneldVxlanDual,
        ]);
        let got: Vec<(Setup, Fam)> = rows.iter().map(|r| (r.setup, r.fam)).collect();
        assert_eq!(
            got,
            vec![
                (Setup::HandVxlan, Fam::V4),
                (Setup::HandVxlan6, Fam::V6),
                (Setup::FlanneldVxlanDual, Fam::V4),
                (Setup::FlanneldVxlanDual, Fam::V6),
            ]
        );
        assert_eq!(rows[1].name(), "kernel VXLAN over IPv6 programmed by hand");
        assert_eq!(
            rows[3].name(),
            "flanneld vxlan backend, dual stack, pod to pod over IPv6"
        );
        assert_eq!(rows[3].short(), "flanneld vxlan dual (IPv6)");
        // Ratios per family, each to its own hand VXLAN.
        let s = |tcp1: f64| Sample {
            tcp1,
            tcp4: tcp1,
            udp: vec![],
            rtt_p50: 0.01,
            rtt_p99: 0.02,
            daemon_cpu: None,
            system_cpu: None,
        };
        let samples = vec![vec![s(10.0)], vec![s(8.0)], vec![s(9.0)], vec![s(6.0)]];
        let v4 = summarize_family(&rows, &samples, Fam::V4, 0);
        let v6 = summarize_family(&rows, &samples, Fam::V6, 0);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[1].ratio, Some(0.9));
        assert_eq!(v6.len(), 2);
        assert_eq!(v6[0].ratio, Some(1.0));
        assert_eq!(v6[1].ratio, Some(0.75));
        assert!(summarize_family(&rows[..1], &samples[..1], Fam::V6, 0).is_empty());
    }

    #[test]
    fn udp_datagrams_fit_the_pod_mtu() {
        assert_eq!(Setup::HandVxlan.udp_datagram(Fam::V4), 1400);
        assert_eq!(Setup::FlanneldUdp.udp_datagram(Fam::V4), 1400);
        assert_eq!(Setup::HandVxlan6.udp_datagram(Fam::V6), 1380);
        assert_eq!(Setup::FlanneldVxlanDual.udp_datagram(Fam::V6), 1380);
        // WireGuard: pod MTU 1420 − 20 − 8.
        assert_eq!(Setup::HandWireguardGo.udp_datagram(Fam::V4), 1392);
        for (_, s) in ALL {
            for &fam in s.families() {
                let hdr = if fam == Fam::V4 { 28 } else { 48 };
                assert!(s.udp_datagram(fam) + hdr <= s.pod_mtu(), "{s:?} {fam:?}");
            }
        }
    }

    #[test]
    fn bad_options() {
        for bad in [
            &["--rounds"][..],
            &["--rounds", "0"],
            &["--seconds", "x"],
            &["--setups", "flanneld,kernel-wireguard"],
            &["--udp-rates", "1,fast"],
            &["--udp-rates", "-1"],
            &["--frobnicate"],
        ] {
            assert!(args(bad).is_err(), "{bad:?} accepted");
        }
        let e = args(&["--setups", "wg"]).unwrap_err().to_string();
        assert!(
            e.contains("known: plain, hand, flanneld, norules, udp"),
            "{e}"
        );
    }

    #[test]
    fn progress_line() {
        let s = Sample {
            tcp1: 13.1,
            tcp4: 14.2,
            udp: vec![UdpRun {
                sent_gbps: 1.0,
                lost_percent: 0.25,
            }],
            rtt_p50: 0.04,
            rtt_p99: 0.1,
            daemon_cpu: None,
            system_cpu: Some(0.5),
        };
        let line = progress(&s, &[1.0]);
        assert!(line.contains("1G 0.25% lost"), "{line}");
        assert!(line.contains("daemon - system 0.500"), "{line}");
    }
}
