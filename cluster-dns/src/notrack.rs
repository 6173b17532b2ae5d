//! The node's `ip flannel-dns` table (pure rendering): DNS to and from the listen addresses is
//! not tracked by conntrack, as NodeLocal DNSCache does. It keeps DNS out of the conntrack
//! table (no entries to fill it, no races on UDP entries), and, when a listen address is the
//! DNS Service's ClusterIP, keeps the service proxy's NAT and no-endpoint checks off those
//! packets (they only see tracked connections), so the node answers its own pods.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

pub const TABLE: &str = "flannel-dns";

/// The script that (re)creates the table for `addrs` (their IPv4 ones) and port `port`.
pub fn render(addrs: &[IpAddr], port: u16) -> String {
    let v4: Vec<Ipv4Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect();
    let t = TABLE;
    let mut s = format!("add table ip {t}\ndelete table ip {t}\nadd table ip {t}\n");
    let _ = writeln!(
        s,
        "add chain ip {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain ip {t} output {{ type filter hook output priority raw; policy accept; }}"
    );
    if v4.is_empty() {
        return s;
    }
    let set = v4
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for proto in ["udp", "tcp"] {
        // Questions from pods (prerouting) and from the node itself (output); answers leave
        // through output.
        let _ = writeln!(
            s,
            "add rule ip {t} prerouting ip daddr {{ {set} }} {proto} dport {port} notrack"
        );
        let _ = writeln!(
            s,
            "add rule ip {t} output ip daddr {{ {set} }} {proto} dport {port} notrack"
        );
        let _ = writeln!(
            s,
            "add rule ip {t} output ip saddr {{ {set} }} {proto} sport {port} notrack"
        );
    }
    s
}

/// The script that removes the table (absent is fine).
pub fn cleanup() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_notrack_both_ways() {
        let s = render(
            &[
                "169.254.20.10".parse().unwrap(),
                "10.96.0.10".parse().unwrap(),
            ],
            53,
        );
        assert!(s.starts_with("add table ip flannel-dns\ndelete table ip flannel-dns\n"));
        assert!(s.contains(
            "add rule ip flannel-dns prerouting ip daddr { 169.254.20.10, 10.96.0.10 } udp dport 53 notrack"
        ));
        assert!(s.contains(
            "add rule ip flannel-dns output ip saddr { 169.254.20.10, 10.96.0.10 } tcp sport 53 notrack"
        ));
        assert_eq!(s.matches("notrack").count(), 6);
        assert_eq!(render(&[], 53).matches("add rule").count(), 0);
    }
}
