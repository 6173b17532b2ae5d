//! The node's `ip flannel-dns` and `ip6 flannel-dns` tables (pure rendering): DNS to and from the listen addresses is
//! not tracked by conntrack, as NodeLocal DNSCache does. It keeps DNS out of the conntrack
//! table (no entries to fill it, no races on UDP entries), and, when a listen address is the
//! DNS Service's ClusterIP, keeps the service proxy's NAT and no-endpoint checks off those
//! packets (they only see tracked connections), so the node answers its own pods.

use std::fmt::Write as _;
use std::net::IpAddr;

pub const TABLE: &str = "flannel-dns";

/// The script that (re)creates table `ip flannel-dns` for `addrs` (their IPv4 ones) and port
/// `port`.
pub fn render(addrs: &[IpAddr], port: u16) -> String {
    render_family(addrs, port, ::nft::Family::Ip)
}

/// The same for table `ip6 flannel-dns` and the IPv6 listen addresses.
pub fn render6(addrs: &[IpAddr], port: u16) -> String {
    render_family(addrs, port, ::nft::Family::Ip6)
}

fn render_family(addrs: &[IpAddr], port: u16, family: ::nft::Family) -> String {
    let (f, v6) = match family {
        ::nft::Family::Ip6 => ("ip6", true),
        _ => ("ip", false),
    };
    let mine: Vec<String> = addrs
        .iter()
        .filter(|a| a.is_ipv6() == v6)
        .map(|a| a.to_string())
        .collect();
    let t = TABLE;
    let mut s = format!("add table {f} {t}\ndelete table {f} {t}\nadd table {f} {t}\n");
    let _ = writeln!(
        s,
        "add chain {f} {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {f} {t} output {{ type filter hook output priority raw; policy accept; }}"
    );
    if mine.is_empty() {
        return s;
    }
    let set = mine.join(", ");
    for proto in ["udp", "tcp"] {
        // Questions from pods (prerouting) and from the node itself (output); answers leave
        // through output.
        let _ = writeln!(
            s,
            "add rule {f} {t} prerouting {f} daddr {{ {set} }} {proto} dport {port} notrack"
        );
        let _ = writeln!(
            s,
            "add rule {f} {t} output {f} daddr {{ {set} }} {proto} dport {port} notrack"
        );
        let _ = writeln!(
            s,
            "add rule {f} {t} output {f} saddr {{ {set} }} {proto} sport {port} notrack"
        );
    }
    s
}

/// The script that removes both tables (absent is fine).
pub fn cleanup() -> String {
    ::nft::remove_table_script(::nft::Family::Ip, TABLE)
        + &::nft::remove_table_script(::nft::Family::Ip6, TABLE)
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
        // IPv6 addresses go to table ip6 flannel-dns, and only there.
        let both: Vec<IpAddr> = vec![
            "169.254.20.10".parse().unwrap(),
            "fd00:53::a".parse().unwrap(),
        ];
        let s6 = render6(&both, 53);
        assert!(s6.starts_with("add table ip6 flannel-dns\ndelete table ip6 flannel-dns\n"));
        assert!(s6.contains(
            "add rule ip6 flannel-dns prerouting ip6 daddr { fd00:53::a } udp dport 53 notrack"
        ));
        assert_eq!(s6.matches("notrack").count(), 6);
        assert!(!render(&both, 53).contains("fd00:53::a"));
        assert!(cleanup().contains("delete table ip6 flannel-dns"));
    }
}
