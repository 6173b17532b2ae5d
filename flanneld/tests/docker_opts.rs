//! Plain Docker on the overlay, without a Docker engine: on two namespace "hosts" running
//! flanneld, `flannelctl docker-opts` writes dockerd's options from the subnet file, a bridge
//! `docker0` is made the way dockerd makes it from `--bip` and `--mtu`, a "container" namespace
//! sits behind it, and the two containers reach each other across the overlay. Needs root;
//! skips with a reason without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use test_support::{require_root_with, wait_for, whoami, Testbed, WhoAmIServer};

mod common;

use common::{sock, Daemons, BIN};

const PORT: u16 = 5011;

/// flannelctl, built next to flanneld.
fn flannelctl() -> String {
    let p = std::path::Path::new(BIN)
        .parent()
        .unwrap()
        .join("flannelctl");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build -p flannelctl` (or `cargo test --workspace`)",
        p.display()
    );
    p.display().to_string()
}

/// `NAME="VALUE"` lines of an env file.
fn env_vars(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn docker_hosts_reach_each_other_with_the_options_docker_opts_writes() {
    if !require_root_with(&["ip", "nft", "etcd", "etcdctl", "ping"]) {
        return;
    }
    let ctl = flannelctl();
    let mut tb = Testbed::new(2).unwrap();
    let endpoint = tb
        .start_etcd_with_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let mut d = Daemons::new(&endpoint, &[]);
    for i in 0..2 {
        d.start(&mut tb, i);
    }
    let mut containers = Vec::new();
    for i in 0..2 {
        let env = d.subnet_env(i);
        let subnet: Ipv4Net = env.subnet.unwrap();
        let bip = format!(
            "{}/{}",
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            subnet.prefix_len()
        );
        let out = d.dir.path().join(format!("docker{i}.env"));
        let ns = tb.nodes[i].ns.clone();
        let subnet_file = d.env_file(i).display().to_string();
        let run = |extra: &[&str]| {
            let mut args = vec![ctl.as_str(), "docker-opts", "-f", &subnet_file];
            let out = out.to_str().unwrap();
            args.extend(["-d", out]);
            args.extend(extra);
            tb.exec_status(&ns, &args, Duration::from_secs(10))
        };
        if i == 0 {
            // A route to our subnet via a gateway: docker0 would fight it (the script's check).
            let via = tb.nodes[1].ip.clone();
            tb.exec(
                &ns,
                &["ip", "route", "add", &subnet.to_string(), "via", &via],
            )
            .unwrap();
            let (ok, msg) = run(&[]);
            assert!(!ok, "{msg}");
            assert!(
                msg.contains("Your routing table already contains the subnet"),
                "{msg}"
            );
            tb.exec(
                &ns,
                &["ip", "route", "del", &subnet.to_string(), "via", &via],
            )
            .unwrap();
        }
        let (ok, msg) = run(&[]);
        assert!(ok, "docker-opts failed: {msg}");
        let text = std::fs::read_to_string(&out).unwrap();
        // The script's format: the individual options, then the combined one.
        assert_eq!(
            text,
            format!(
                "DOCKER_OPT_BIP=\"--bip={bip}\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu={}\"\nDOCKER_OPTS=\" --bip={bip} --ip-masq=true --mtu={}\"\n",
                env.mtu, env.mtu
            )
        );
        // docker0 from the written options, as dockerd would make it, and a container.
        let vars = env_vars(&text);
        let gw = vars["DOCKER_OPT_BIP"]
            .strip_prefix("--bip=")
            .unwrap()
            .to_string();
        let mtu: u32 = vars["DOCKER_OPT_MTU"]
            .strip_prefix("--mtu=")
            .unwrap()
            .parse()
            .unwrap();
        let container_ip = format!(
            "{}/{}",
            Ipv4Addr::from(u32::from(subnet.network()) + 2),
            subnet.prefix_len()
        );
        containers.push(
            tb.add_pod_on(i, "docker0", &container_ip, &gw, mtu)
                .unwrap(),
        );
    }
    let _servers: Vec<_> = containers
        .iter()
        .map(|c| WhoAmIServer::start(&c.ns, PORT).unwrap())
        .collect();
    for (a, b) in [(0, 1), (1, 0)] {
        let (from, to) = (&containers[a], &containers[b]);
        let seen = wait_for(Duration::from_secs(20), || {
            whoami(&from.ns, sock(&to.ip, PORT), Duration::from_secs(2)).ok()
        })
        .unwrap_or_else(|| panic!("container {} -> {} failed:\n{}", from.ip, to.ip, d.log(a)));
        assert_eq!(seen, from.ip, "the container's own address arrives");
        // A full-size packet crosses too (the MTU docker0 got fits the overlay).
        let size = (d.subnet_env(a).mtu - 28).to_string();
        let (ok, out) = tb.exec_status(
            &from.ns,
            &["ping", "-c1", "-W2", "-M", "do", "-s", &size, &to.ip],
            Duration::from_secs(5),
        );
        assert!(ok, "{out}");
    }
}
