//! Address arithmetic shared by both families: addresses as `u128` so one allocator serves
//! IPv4 and IPv6.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};

/// An IP network type (IPv4 or IPv6) with its flannel limits.
pub trait Family: Copy + Eq + Ord + FromStr + std::fmt::Display + std::fmt::Debug {
    type Addr: Copy + FromStr + std::fmt::Display;
    const NAME: &'static str;
    const BITS: u8;
    /// The longest Network prefix flannel accepts (/28, /124).
    const MAX_NETWORK_PREFIX: u8;
    /// SubnetLen when unset and the network is large enough (24, 64).
    const DEFAULT_SUBNET_LEN: u8;
    /// The longest SubnetLen flannel accepts (30, 126).
    const MAX_SUBNET_LEN: u8;

    fn to_int(addr: Self::Addr) -> u128;
    fn from_int(v: u128) -> Self::Addr;
    fn make(addr: Self::Addr, prefix: u8) -> Self;
    fn network(&self) -> Self::Addr;
    fn broadcast(&self) -> Self::Addr;
    fn prefix(&self) -> u8;
    fn trunc(&self) -> Self;
    fn contains_addr(&self, addr: &Self::Addr) -> bool;
}

impl Family for Ipv4Net {
    type Addr = Ipv4Addr;
    const NAME: &'static str = "IPv4";
    const BITS: u8 = 32;
    const MAX_NETWORK_PREFIX: u8 = 28;
    const DEFAULT_SUBNET_LEN: u8 = 24;
    const MAX_SUBNET_LEN: u8 = 30;

    fn to_int(addr: Ipv4Addr) -> u128 {
        u128::from(u32::from(addr))
    }
    fn from_int(v: u128) -> Ipv4Addr {
        Ipv4Addr::from(v as u32)
    }
    fn make(addr: Ipv4Addr, prefix: u8) -> Self {
        // Prefix lengths come from validated configs (<= 32).
        Ipv4Net::new(addr, prefix.min(32)).unwrap_or_default()
    }
    fn network(&self) -> Ipv4Addr {
        Ipv4Net::network(self)
    }
    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Net::broadcast(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn trunc(&self) -> Self {
        Ipv4Net::trunc(self)
    }
    fn contains_addr(&self, addr: &Ipv4Addr) -> bool {
        self.contains(addr)
    }
}

impl Family for Ipv6Net {
    type Addr = Ipv6Addr;
    const NAME: &'static str = "IPv6";
    const BITS: u8 = 128;
    const MAX_NETWORK_PREFIX: u8 = 124;
    const DEFAULT_SUBNET_LEN: u8 = 64;
    const MAX_SUBNET_LEN: u8 = 126;

    fn to_int(addr: Ipv6Addr) -> u128 {
        u128::from(addr)
    }
    fn from_int(v: u128) -> Ipv6Addr {
        Ipv6Addr::from(v)
    }
    fn make(addr: Ipv6Addr, prefix: u8) -> Self {
        Ipv6Net::new(addr, prefix.min(128)).unwrap_or_default()
    }
    fn network(&self) -> Ipv6Addr {
        Ipv6Net::network(self)
    }
    fn broadcast(&self) -> Ipv6Addr {
        Ipv6Net::broadcast(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn trunc(&self) -> Self {
        Ipv6Net::trunc(self)
    }
    fn contains_addr(&self, addr: &Ipv6Addr) -> bool {
        self.contains(addr)
    }
}

/// Number of addresses in a subnet of length `len` in a family of `bits` bits.
pub fn subnet_size(bits: u8, len: u8) -> u128 {
    let host_bits = u32::from(bits.saturating_sub(len));
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// First and last address of a network, as integers.
pub fn range<N: Family>(net: &N) -> (u128, u128) {
    (N::to_int(net.network()), N::to_int(net.broadcast()))
}
