//! Command-line flags, named as flannel's, each also read from `FLANNELD_<FLAG>`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "flanneld",
    version,
    about = "flannel-compatible overlay network daemon: leases this node's subnet from etcd"
)]
pub struct Flags {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix holding `config` and `subnets/`.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = subnet_lease::store::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// TLS client key for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// TLS client certificate for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// CA that signed etcd's certificate. Setting it (alone or with a client certificate)
    /// requires https:// endpoints.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<subnet_lease::Password>,

    /// Interface (name or IP) for inter-host traffic; repeat to give candidates in order.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface IPs, then names; repeat for candidates in order.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// IP published to other nodes (default: the interface's IP).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address published to other nodes with EnableIPv6 (default: the interface's IPv6
    /// address). As flannel's `--public-ipv6`.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Where to write the subnet file for the CNI plugin.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Renew the lease this many minutes before it expires.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..1440)
    )]
    pub subnet_lease_renew_margin: u64,

    /// Masquerade traffic from pods leaving the cluster Network (flannel's rules).
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_masq: bool,

    /// Masquerade IPv6 pod traffic leaving the IPv6Network (flannel's rules in table
    /// `ip6 flannel`). Not in flannel, whose `--ip-masq` covers both families; default: the
    /// value of `--ip-masq`. Read it with [`Flags::ip6_masq`].
    #[arg(long, env = "FLANNELD_IP6_MASQ", num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip6_masq: Option<bool>,

    /// Accept forwarded traffic from and to the cluster Network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub iptables_forward_rules: bool,

    /// Seconds between checks (and repairs) of routes, devices and host rules.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..3600))]
    pub iptables_resync: u64,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: std::net::IpAddr,

    /// Port for /healthz, /readyz and /metrics; 0 disables them.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// The CNI plugin's data directory: the pod attachment records in its `attachments/` are
    /// published to etcd under `<prefix>/pods/`. Empty: publish no pods.
    #[arg(
        long,
        env = "FLANNELD_CNI_DATA_DIR",
        default_value = "/var/lib/cni/flannel",
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub cni_data_dir: PathBuf,

    /// This node's name in the published pod records (default: env NODE_NAME, else the
    /// hostname).
    #[arg(long, env = "FLANNELD_NODE_NAME")]
    pub node_name: Option<String>,

    /// The service proxy (Kubernetes Services from the etcd registry): `nftables` (kernel
    /// DNAT, kube-proxy's nftables design), `userspace` (this process relays connections and
    /// retries the next endpoint), or `none` (flannel's behaviour; a table left by an earlier
    /// run is removed).
    #[arg(long, env = "FLANNELD_PROXY_MODE", default_value = "none",
          value_parser = ["none", "nftables", "userspace"])]
    pub proxy_mode: String,

    /// Enforce Kubernetes NetworkPolicy (`networking.k8s.io/v1` objects from the etcd
    /// registry) for this node's pods, in nftables table `ip flannel-policy`. Off by default
    /// (flannel's behaviour; a table left by an earlier run is removed).
    #[arg(long, env = "FLANNELD_NETWORK_POLICY")]
    pub network_policy: bool,

    /// Serve cluster DNS on this node (Services and pods by name from the etcd registry, the
    /// Kubernetes DNS specification; other names forwarded to the node's resolvers and
    /// cached), on `--cluster-dns-addr`, and hand it to pods (the CNI result's `dns`).
    #[arg(long, env = "FLANNELD_CLUSTER_DNS")]
    pub cluster_dns: bool,

    /// Addresses the cluster DNS listens on (UDP and TCP port `--cluster-dns-port`), comma
    /// separated; each is added to `lo` as a /32 when the node does not have it yet
    /// (NodeLocal DNSCache's link-local address by default).
    #[arg(
        long,
        env = "FLANNELD_CLUSTER_DNS_ADDR",
        value_delimiter = ',',
        default_value = "169.254.20.10"
    )]
    pub cluster_dns_addr: Vec<std::net::IpAddr>,

    /// Port of the cluster DNS.
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_PORT", default_value_t = 53)]
    pub cluster_dns_port: u16,

    /// The cluster domain (kubelet's --cluster-domain).
    #[arg(long, env = "FLANNELD_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Upstream resolvers for names outside the cluster domain (IP or IP:PORT, comma
    /// separated). Default: the nameservers of `--cluster-dns-resolv-conf`.
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_UPSTREAM", value_delimiter = ',')]
    pub cluster_dns_upstream: Vec<String>,

    /// The resolv.conf whose nameservers are the upstream resolvers.
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf",
          value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from))]
    pub cluster_dns_resolv_conf: PathBuf,

    /// Pod records `a-b-c-d.<ns>.pod.<domain>`: `insecure` (any address, as kube-dns),
    /// `verified` (only pods that exist in that namespace) or `disabled` (CoreDNS's `pods`).
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_PODS", default_value = "insecure",
          value_parser = ["insecure", "verified", "disabled"])]
    pub cluster_dns_pods: String,

    /// TTL in seconds of the cluster records and of negative answers (CoreDNS's default 5).
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_TTL", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub cluster_dns_ttl: u32,

    /// Memory for cached upstream answers, in MiB.
    #[arg(long, env = "FLANNELD_CLUSTER_DNS_CACHE_MB", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub cluster_dns_cache_mb: u32,

    /// The operator changed the Network (or subnet settings) deliberately: at start, delete
    /// this node's lease that no longer fits the config and take a subnet in the new one.
    /// Without it such a lease is kept and flanneld waits (not ready) for the config to be
    /// restored or the lease to be revoked.
    #[arg(long, env = "FLANNELD_ALLOW_NETWORK_CHANGE")]
    pub allow_network_change: bool,

    /// Remove the host rules and the backend's device, then exit (the lease is kept).
    #[arg(long)]
    pub cleanup: bool,

    /// Log verbosity as flannel's glog -v: 0-1 info, 2-4 debug, 5+ trace. RUST_LOG wins.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,
}

impl Flags {
    /// Whether to masquerade IPv6: `--ip6-masq` when given, else `--ip-masq`.
    pub fn ip6_masq(&self) -> bool {
        self.ip6_masq.unwrap_or(self.ip_masq)
    }

    /// `--node-name`, else the environment's `NODE_NAME`, else the hostname.
    pub fn node_name(&self) -> String {
        let hostname = || {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        resolve_node_name(
            self.node_name.as_deref(),
            std::env::var("NODE_NAME").ok().as_deref(),
            hostname,
        )
    }
}

/// The first non-empty of the flag and `NODE_NAME`, else the hostname.
fn resolve_node_name(
    flag: Option<&str>,
    env: Option<&str>,
    hostname: impl FnOnce() -> String,
) -> String {
    [flag, env]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(hostname)
}

/// Accepts Go-style single-dash long flags (`-etcd-endpoints=…`), as flannel's flag package
/// does, by rewriting them to `--etcd-endpoints=…`.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let b = a.as_bytes();
            let go_style = i > 0
                && b.len() > 2
                && b[0] == b'-'
                && b[1].is_ascii_alphabetic()
                && b[2] != b'='
                && a[1..].split('=').next().is_some_and(|n| n.len() > 1);
            if go_style {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let v = normalize_args(args.iter().map(|s| s.to_string()));
        Flags::try_parse_from(v).unwrap()
    }

    #[test]
    fn the_etcd_password_never_shows_in_debug_output() {
        let f = parse(&[
            "flanneld",
            "--etcd-username=root",
            "--etcd-password=hunter2-secret",
        ]);
        assert_eq!(
            f.etcd_password.as_ref().map(|p| p.expose()),
            Some("hunter2-secret")
        );
        let shown = format!("{f:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn defaults_are_flannels() {
        let f = parse(&["flanneld"]);
        assert_eq!(f.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(f.iface.is_empty() && f.public_ip.is_none());
        assert!(!f.ip_masq && f.iptables_forward_rules && !f.cleanup);
        assert_eq!((f.healthz_port, f.iptables_resync, f.verbosity), (0, 5, 0));
        assert_eq!(f.cni_data_dir, PathBuf::from("/var/lib/cni/flannel"));
        assert_eq!(f.node_name, None);
    }

    #[test]
    fn pod_publishing_flags() {
        let f = parse(&["flanneld", "-cni-data-dir=/tmp/x", "--node-name", "node-7"]);
        assert_eq!(f.cni_data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(f.node_name(), "node-7");
        let f = parse(&["flanneld", "--cni-data-dir="]);
        assert_eq!(f.cni_data_dir, PathBuf::new());
        let host = || "host-1".to_string();
        assert_eq!(resolve_node_name(Some("a"), Some("b"), host), "a");
        assert_eq!(resolve_node_name(None, Some("b"), host), "b");
        assert_eq!(resolve_node_name(Some(" "), Some(""), host), "host-1");
        assert_eq!(resolve_node_name(None, None, host), "host-1");
    }

    #[test]
    fn go_style_single_dash_flags_and_lists() {
        let f = parse(&[
            "flanneld",
            "-etcd-endpoints=http://a:2379,http://b:2379",
            "-iface",
            "eth1",
            "--iface=10.0.0.5",
            "-public-ip=1.2.3.4",
        ]);
        assert_eq!(f.etcd_endpoints, vec!["http://a:2379", "http://b:2379"]);
        assert_eq!(f.iface, vec!["eth1", "10.0.0.5"]);
        assert_eq!(f.public_ip, Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(normalize_args(["x".into(), "-h".into()]), vec!["x", "-h"]);
        let f = parse(&[
            "flanneld",
            "-ip-masq",
            "-v=3",
            "--iptables-forward-rules=false",
            "-healthz-port=8471",
        ]);
        assert!(f.ip_masq && !f.iptables_forward_rules);
        assert_eq!((f.verbosity, f.healthz_port), (3, 8471));
        let f = parse(&["flanneld", "--ip-masq=false"]);
        assert!(!f.ip_masq);
    }

    #[test]
    fn public_ipv6_and_ip6_masq() {
        let f = parse(&["flanneld"]);
        assert_eq!(
            (f.public_ipv6, f.ip6_masq, f.ip6_masq()),
            (None, None, false)
        );
        let f = parse(&["flanneld", "-public-ipv6=fd00:210::11", "--ip6-masq"]);
        assert_eq!(f.public_ipv6, Some("fd00:210::11".parse().unwrap()));
        assert_eq!(
            (f.ip6_masq, f.ip6_masq(), f.ip_masq),
            (Some(true), true, false)
        );
        let f = parse(&["flanneld", "--public-ipv6", "::ffff:10.0.0.1"]);
        assert_eq!(
            f.public_ipv6,
            Some(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())
        );
        // The default follows --ip-masq (flannel's one flag for both families) …
        let f = parse(&["flanneld", "--ip-masq"]);
        assert_eq!((f.ip6_masq, f.ip6_masq()), (None, true));
        // … and an explicit value wins either way.
        let f = parse(&["flanneld", "--ip-masq", "--ip6-masq=false"]);
        assert!(f.ip_masq && !f.ip6_masq());
        let f = parse(&["flanneld", "-ip6-masq=true", "--ip-masq=false"]);
        assert!(!f.ip_masq && f.ip6_masq());
        let f = parse(&["flanneld", "--ip6-masq", "false"]);
        assert_eq!(f.ip6_masq, Some(false));
        for bad in [
            "--public-ipv6=10.0.0.1",
            "--public-ipv6=fd00::1/64",
            "--public-ipv6=[fd00::1]",
            "--ip6-masq=yes",
        ] {
            let v = normalize_args(["flanneld", bad].map(String::from));
            assert!(Flags::try_parse_from(v).is_err(), "{bad}");
        }
    }

    /// Set in the child process [`flags_from_the_environment`] starts: the arguments to parse.
    const ENV_CHILD: &str = "FLANNELD_FLAGS_TEST_CHILD_ARGS";

    /// The environment is the process's, so each case runs in a child (this test binary,
    /// running only this test) with a cleared environment: no other test sees the variables.
    #[test]
    fn flags_from_the_environment() {
        if let Some(args) = std::env::var_os(ENV_CHILD) {
            let args = args.into_string().unwrap();
            let argv = std::iter::once("flanneld").chain(args.split_whitespace());
            let v = normalize_args(argv.map(String::from));
            match Flags::try_parse_from(v) {
                Ok(f) => println!(
                    "RESULT {:?} {:?} {} {}",
                    f.public_ipv6,
                    f.ip6_masq,
                    f.ip6_masq(),
                    f.ip_masq
                ),
                Err(_) => println!("RESULT error"),
            }
            return;
        }
        /// (environment, command line, expected child output).
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[], "", "None None false false"),
            (
                &[("FLANNELD_PUBLIC_IPV6", "fd00:210::11")],
                "",
                "Some(fd00:210::11) None false false",
            ),
            (&[("FLANNELD_IP_MASQ", "true")], "", "None None true true"),
            (
                &[("FLANNELD_IP_MASQ", "true"), ("FLANNELD_IP6_MASQ", "false")],
                "",
                "None Some(false) false true",
            ),
            (
                &[("FLANNELD_IP6_MASQ", "true")],
                "",
                "None Some(true) true false",
            ),
            // The command line wins over the environment.
            (
                &[
                    ("FLANNELD_IP6_MASQ", "true"),
                    ("FLANNELD_PUBLIC_IPV6", "fd00::1"),
                ],
                "--ip6-masq=false --public-ipv6=fd00::2",
                "Some(fd00::2) Some(false) false false",
            ),
            (&[("FLANNELD_PUBLIC_IPV6", "10.0.0.1")], "", "error"),
            (&[("FLANNELD_IP6_MASQ", "1")], "", "error"),
        ];
        let exe = std::env::current_exe().unwrap();
        for (env, args, want) in cases {
            let out = std::process::Command::new(&exe)
                .args([
                    "flags::tests::flags_from_the_environment",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env_clear()
                .env(ENV_CHILD, args)
                .envs(env.iter().copied())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{env:?}: {stdout}");
            let got = stdout
                .lines()
                .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
                .unwrap_or_else(|| panic!("{env:?}: no result in {stdout}"));
            assert_eq!(got, *want, "{env:?} {args:?}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let v = normalize_args(["flanneld", "--public-ip=nope"].map(String::from));
        assert!(Flags::try_parse_from(v).is_err());
        let v = normalize_args(["flanneld", "--subnet-lease-renew-margin=0"].map(String::from));
        assert!(Flags::try_parse_from(v).is_err());
        let v = normalize_args(["flanneld", "--kube-subnet-mgr"].map(String::from));
        assert!(Flags::try_parse_from(v).is_err());
    }
}
