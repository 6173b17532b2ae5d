//! [`Family`]: the nftables family of a table.

use std::fmt;

use crate::sys::{NFPROTO_IPV4, NFPROTO_IPV6};

/// The family of a table: `ip` (IPv4) or `ip6` (IPv6). Tables are kept per family (as
/// kube-proxy's `ip`/`ip6` pairs), so the same name may exist once in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    /// The family's keyword in nft's language.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }

    /// The family's number in nf_tables messages (`NFPROTO_IPV4`, `NFPROTO_IPV6`).
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ip => NFPROTO_IPV4,
            Family::Ip6 => NFPROTO_IPV6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_and_numbers() {
        assert_eq!(Family::Ip.to_string(), "ip");
        assert_eq!(Family::Ip6.to_string(), "ip6");
        assert_eq!((Family::Ip.nfproto(), Family::Ip6.nfproto()), (2, 10));
    }
}
