//! Subnet choice, a pure function of the config, the leases in etcd and what this node had.
//!
//! Order (flannel's): reuse a lease that carries our PublicIP and still fits the config; else the
//! subnet from our previous subnet file if it is free and fits; else a random one among the first
//! 100 free subnets between SubnetMin and SubnetMax.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

use crate::config::NetConfig;
use crate::ipmath::{self, Family};
use crate::lease::{Lease, LeaseAttrs, SubnetKey};

/// How many free subnets the random pick chooses from (flannel's number).
pub const RANDOM_POOL: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("network {network} is full: every /{len} subnet between {min} and {max} is leased or reserved")]
    Full {
        network: String,
        len: u8,
        min: String,
        max: String,
    },
    #[error("the config enables neither an IPv4 Network nor an IPv6Network")]
    NoNetwork,
}

/// What to do to hold a lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A lease with our PublicIP exists and fits: update it in place.
    Reuse(Box<Lease>),
    /// Create this (free) subnet.
    Create(SubnetKey),
}

/// The plan: the choice, plus our own leases that no longer fit the config. The caller
/// deletes those only on an operator's word (the manager's `release_stale_leases`): they mean
/// the config changed under a running cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub choice: Choice,
    pub stale: Vec<Lease>,
}

/// Who this node is: its PublicIP, and its PublicIPv6 when it has one. An IPv6-only node
/// publishes `"PublicIP":"0.0.0.0"` (as flannel does) and is known by its PublicIPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
}

impl Identity {
    pub fn of(attrs: &LeaseAttrs) -> Self {
        Identity {
            public_ip: attrs.public_ip,
            public_ipv6: attrs.public_ipv6,
        }
    }

    /// Whether `lease` is this node's. With an IPv4 PublicIP: the same PublicIP (and the same
    /// PublicIPv6 when we have one), flannel's rule. IPv6-only (PublicIP 0.0.0.0): the same
    /// PublicIPv6 — flannel compares only PublicIP there, so every IPv6-only node would take
    /// the first one's lease (docs/data-model.md).
    pub fn owns(&self, lease: &Lease) -> bool {
        self.owns_attrs(&lease.attrs)
    }

    pub fn owns_attrs(&self, attrs: &LeaseAttrs) -> bool {
        if self.public_ip.is_unspecified() {
            return self.public_ipv6.is_some()
                && attrs.public_ip.is_unspecified()
                && attrs.public_ipv6 == self.public_ipv6;
        }
        attrs.public_ip == self.public_ip
            && (self.public_ipv6.is_none() || attrs.public_ipv6 == self.public_ipv6)
    }
}

fn key_fits(cfg: &NetConfig, key: &SubnetKey) -> bool {
    let v4 = match (cfg.ipv4_network(), key.ipv4) {
        (None, None) => true,
        (Some(_), Some(v4)) => cfg.fits_v4(v4),
        _ => false,
    };
    v4 && match (cfg.ipv6_network(), key.ipv6) {
        (None, _) => true,
        (Some(_), Some(v6)) => cfg.fits_v6(v6),
        (Some(_), None) => false,
    }
}

/// The random pool for the `attempt`-th try (1-based): flannel's 100 on the first, doubling
/// after each lost race (up to 6400) so concurrent joiners stop colliding quickly.
pub fn pool_size(attempt: usize) -> usize {
    RANDOM_POOL << attempt.saturating_sub(1).min(6)
}

/// Chooses the subnet(s) this node should hold, picking at random among the first `pool` free.
pub fn plan<R: Rng>(
    cfg: &NetConfig,
    leases: &[Lease],
    me: Identity,
    previous: Option<SubnetKey>,
    pool: usize,
    rng: &mut R,
) -> Result<Plan, AllocError> {
    if cfg.ipv4_network().is_none() && cfg.ipv6_network().is_none() {
        return Err(AllocError::NoNetwork);
    }
    let (fitting, stale): (Vec<&Lease>, Vec<&Lease>) = leases
        .iter()
        .filter(|l| me.owns(l))
        .partition(|l| key_fits(cfg, &l.key));
    // Reservations are the operator's: never delete them, even when they no longer fit.
    let stale: Vec<Lease> = stale
        .into_iter()
        .filter(|l| !l.is_reservation())
        .cloned()
        .collect();
    if let Some(own) = fitting
        .iter()
        .find(|l| Some(l.key) == previous)
        .or_else(|| fitting.iter().find(|l| l.is_reservation()))
        .or_else(|| fitting.first())
    {
        return Ok(Plan {
            choice: Choice::Reuse(Box::new((*own).clone())),
            stale,
        });
    }

    // Subnets held by anyone else (stale own leases count as free: they go before a create).
    let others: Vec<&Lease> = leases
        .iter()
        .filter(|l| !stale.iter().any(|s| s.key == l.key))
        .collect();
    let taken_v4: Vec<Ipv4Net> = others.iter().filter_map(|l| l.key.ipv4).collect();
    let taken_v6: Vec<Ipv6Net> = others.iter().filter_map(|l| l.key.ipv6).collect();

    if let Some(prev) = previous {
        let v4_free = prev.ipv4.is_none_or(|v4| !overlaps(&taken_v4, v4));
        let v6_free = prev.ipv6.is_none_or(|v6| !overlaps(&taken_v6, v6));
        if key_fits(cfg, &prev) && v4_free && v6_free {
            return Ok(Plan {
                choice: Choice::Create(prev),
                stale,
            });
        }
    }

    let ipv4 = match cfg.ipv4_network() {
        None => None,
        Some(network) => Some(pick(
            network,
            cfg.subnet_len,
            cfg.subnet_min,
            cfg.subnet_max,
            &taken_v4,
            pool,
            rng,
        )?),
    };
    let ipv6 = match cfg.ipv6_network() {
        None => None,
        Some(net6) => Some(pick(
            net6,
            cfg.ipv6_subnet_len,
            cfg.ipv6_subnet_min,
            cfg.ipv6_subnet_max,
            &taken_v6,
            pool,
            rng,
        )?),
    };
    Ok(Plan {
        choice: Choice::Create(SubnetKey { ipv4, ipv6 }),
        stale,
    })
}

fn overlaps<N: Family>(taken: &[N], candidate: N) -> bool {
    let (a, b) = ipmath::range(&candidate);
    taken.iter().any(|t| {
        let (c, d) = ipmath::range(t);
        a <= d && c <= b
    })
}

/// Random pick among the first `pool` free subnets in `[min, max]`.
fn pick<N: Family, R: Rng>(
    network: N,
    len: u8,
    min: N::Addr,
    max: N::Addr,
    taken: &[N],
    pool: usize,
    rng: &mut R,
) -> Result<N, AllocError> {
    let free = free_subnets(len, min, max, taken, pool.max(1));
    if free.is_empty() {
        return Err(AllocError::Full {
            network: network.to_string(),
            len,
            min: min.to_string(),
            max: max.to_string(),
        });
    }
    Ok(free[rng.random_range(0..free.len())])
}

/// The first `limit` subnets of length `len` in `[min, max]` that overlap nothing in `taken`.
pub fn free_subnets<N: Family>(
    len: u8,
    min: N::Addr,
    max: N::Addr,
    taken: &[N],
    limit: usize,
) -> Vec<N> {
    let size = ipmath::subnet_size(N::BITS, len);
    let mut ranges: Vec<(u128, u128)> = taken.iter().map(ipmath::range).collect();
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut next = N::to_int(min);
    let last = N::to_int(max);
    let mut i = 0;
    while next <= last && out.len() < limit {
        let end = next.saturating_add(size - 1);
        // Skip ranges that end before this candidate.
        while i < ranges.len() && ranges[i].1 < next {
            i += 1;
        }
        // Any range starting at or before `end` (and ending at or after `next`) overlaps.
        let blocker = ranges[i..]
            .iter()
            .take_while(|r| r.0 <= end)
            .map(|r| r.1)
            .max();
        match blocker {
            Some(blocked_until) => {
                // Jump to the first aligned subnet past the blocking range.
                let base = N::to_int(min);
                let past = blocked_until.saturating_add(1);
                let steps = (past - base).div_ceil(size);
                match base.checked_add(steps * size) {
                    Some(n) => next = n,
                    None => break,
                }
            }
            None => {
                out.push(N::make(N::from_int(next), len));
                match next.checked_add(size) {
                    Some(n) => next = n,
                    None => break,
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(text: &str) -> NetConfig {
        config::parse(text).unwrap().config
    }

    fn lease(key: &str, ip: [u8; 4], etcd_lease: i64) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::from(ip), "vxlan"),
            etcd_lease,
            mod_revision: 1,
        }
    }

    fn me(ip: [u8; 4]) -> Identity {
        Identity {
            public_ip: Ipv4Addr::from(ip),
            public_ipv6: None,
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn reuses_own_lease() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let leases = vec![
            lease("10.5.3.0-24", [1, 1, 1, 1], 5),
            lease("10.5.9.0-24", [2, 2, 2, 2], 6),
        ];
        let p = plan(&c, &leases, me([2, 2, 2, 2]), None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Reuse(Box::new(leases[1].clone())));
        assert!(p.stale.is_empty());
    }

    #[test]
    fn own_lease_that_no_longer_fits_is_stale() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetLen":25}"#);
        let leases = vec![
            lease("10.5.3.0-24", [2, 2, 2, 2], 5),
            lease("10.5.4.0-24", [2, 2, 2, 2], 0),
        ];
        let p = plan(&c, &leases, me([2, 2, 2, 2]), None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(
            p.stale,
            vec![leases[0].clone()],
            "reservations are never stale"
        );
        let Choice::Create(k) = p.choice else {
            panic!("expected a new subnet")
        };
        assert_eq!(k.ipv4.unwrap().prefix_len(), 25);
        assert!(!k.ipv4.unwrap().contains(&Ipv4Addr::new(10, 5, 4, 0)));
    }

    #[test]
    fn reservation_is_used_by_its_owner_and_skipped_by_others() {
        let c = cfg(r#"{"Network":"10.5.0.0/28","SubnetLen":30}"#);
        // Subnets: .0 (skipped as SubnetMin), .4, .8, .12. Reserve .4 for 9.9.9.9.
        let leases = vec![lease("10.5.0.4-30", [9, 9, 9, 9], 0)];
        let p = plan(&c, &leases, me([9, 9, 9, 9]), None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Reuse(Box::new(leases[0].clone())));
        for seed in 0..20 {
            let p = plan(
                &c,
                &leases,
                me([1, 1, 1, 1]),
                None,
                RANDOM_POOL,
                &mut StdRng::seed_from_u64(seed),
            )
            .unwrap();
            let Choice::Create(k) = p.choice else {
                panic!()
            };
            assert_ne!(k.ipv4.unwrap().network(), Ipv4Addr::new(10, 5, 0, 4));
        }
    }

    #[test]
    fn previous_subnet_reused_when_free_and_fitting() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let prev = SubnetKey::parse("10.5.77.0-24").unwrap();
        let p = plan(
            &c,
            &[],
            me([1, 1, 1, 1]),
            Some(prev),
            RANDOM_POOL,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Create(prev));
        // Taken by someone else: pick another.
        let leases = vec![lease("10.5.77.0-24", [3, 3, 3, 3], 4)];
        let p = plan(
            &c,
            &leases,
            me([1, 1, 1, 1]),
            Some(prev),
            RANDOM_POOL,
            &mut rng(),
        )
        .unwrap();
        assert_ne!(p.choice, Choice::Create(prev));
        // Outside the config (below SubnetMin): pick another.
        let prev0 = SubnetKey::parse("10.5.0.0-24").unwrap();
        let p = plan(
            &c,
            &[],
            me([1, 1, 1, 1]),
            Some(prev0),
            RANDOM_POOL,
            &mut rng(),
        )
        .unwrap();
        assert_ne!(p.choice, Choice::Create(prev0));
    }

    #[test]
    fn random_pick_is_among_first_hundred_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/8"}"#);
        let leases = vec![lease("10.0.1.0-24", [3, 3, 3, 3], 4)];
        for seed in 0..50 {
            let p = plan(
                &c,
                &leases,
                me([1, 1, 1, 1]),
                None,
                RANDOM_POOL,
                &mut StdRng::seed_from_u64(seed),
            )
            .unwrap();
            let Choice::Create(k) = p.choice else {
                panic!()
            };
            let third = u32::from(k.ipv4.unwrap().network()) >> 8 & 0xffff;
            assert!((2..=101).contains(&third), "{k}");
        }
    }

    #[test]
    fn pool_doubles_per_attempt_up_to_6400() {
        assert_eq!(pool_size(1), 100);
        assert_eq!(pool_size(2), 200);
        assert_eq!(pool_size(7), 6400);
        assert_eq!(pool_size(30), 6400);
    }

    #[test]
    fn full_network_is_a_clear_error() {
        let c = cfg(r#"{"Network":"10.5.0.0/28","SubnetLen":30}"#);
        let leases = vec![
            lease("10.5.0.4-30", [3, 3, 3, 3], 4),
            lease("10.5.0.8-30", [4, 4, 4, 4], 4),
            lease("10.5.0.12-30", [5, 5, 5, 5], 0),
        ];
        let e = plan(&c, &leases, me([1, 1, 1, 1]), None, RANDOM_POOL, &mut rng()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network 10.5.0.0/28 is full: every /30 subnet between 10.5.0.4 and 10.5.0.12 is leased or reserved"
        );
    }

    #[test]
    fn free_subnets_skips_overlapping_leases_of_other_lengths() {
        let taken: Vec<Ipv4Net> = vec!["10.5.0.0/23".parse().unwrap()];
        let free = free_subnets::<Ipv4Net>(
            24,
            Ipv4Addr::new(10, 5, 0, 0),
            Ipv4Addr::new(10, 5, 4, 0),
            &taken,
            10,
        );
        let want: Vec<Ipv4Net> = ["10.5.2.0/24", "10.5.3.0/24", "10.5.4.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(free, want);
        let taken: Vec<Ipv4Net> = vec!["10.5.1.128/25".parse().unwrap()];
        let free = free_subnets::<Ipv4Net>(
            24,
            Ipv4Addr::new(10, 5, 0, 0),
            Ipv4Addr::new(10, 5, 2, 0),
            &taken,
            10,
        );
        assert_eq!(free.len(), 2);
        assert!(!free.contains(&"10.5.1.0/24".parse().unwrap()));
    }

    #[test]
    fn dual_stack_picks_both() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let p = plan(&c, &[], me([1, 1, 1, 1]), None, RANDOM_POOL, &mut rng()).unwrap();
        let Choice::Create(k) = p.choice else {
            panic!()
        };
        let v6 = k.ipv6.unwrap();
        assert_eq!(v6.prefix_len(), 64);
        assert!(c.fits_v6(v6));
        // A v4-only lease of ours does not fit a dual-stack config.
        let leases = vec![lease("10.5.3.0-24", [1, 1, 1, 1], 5)];
        let p = plan(&c, &leases, me([1, 1, 1, 1]), None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.stale.len(), 1);
    }

    fn me6(v6: &str) -> Identity {
        Identity {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: Some(v6.parse().unwrap()),
        }
    }

    fn lease6(key: &str, v6: &str, etcd_lease: i64) -> Lease {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, "vxlan");
        attrs.public_ipv6 = Some(v6.parse().unwrap());
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs,
            etcd_lease,
            mod_revision: 1,
        }
    }

    #[test]
    fn ipv6_only_nodes_get_their_own_subnets_and_find_their_own_lease() {
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let p = plan(&c, &[], me6("fd00::1"), None, RANDOM_POOL, &mut rng()).unwrap();
        let Choice::Create(k) = p.choice else {
            panic!("expected a new subnet")
        };
        assert_eq!(k.ipv4, None, "no IPv4 part: the key is 0.0.0.0-0&…");
        assert!(k.to_string().starts_with("0.0.0.0-0&fc00:0:0:"), "{k}");
        let first = lease6(&k.to_string(), "fd00::1", 5);
        // A second IPv6-only node (also PublicIP 0.0.0.0) must not take the first one's lease
        // (flannel would: it compares PublicIP only).
        let leases = vec![first.clone()];
        let p = plan(&c, &leases, me6("fd00::2"), None, RANDOM_POOL, &mut rng()).unwrap();
        let Choice::Create(k2) = p.choice else {
            panic!("second node must create its own, got {:?}", p.choice)
        };
        assert_ne!(k2.ipv6, k.ipv6);
        assert!(p.stale.is_empty());
        // The first node finds its own again.
        let p = plan(&c, &leases, me6("fd00::1"), None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Reuse(Box::new(first)));
        // A dual-stack lease of ours does not fit an IPv6-only config.
        let mut dual = lease6("10.5.3.0-24&fc00:0:0:7::-64", "fd00::1", 6);
        dual.attrs.public_ip = Ipv4Addr::new(1, 1, 1, 1);
        let me_dual = Identity {
            public_ip: Ipv4Addr::new(1, 1, 1, 1),
            public_ipv6: Some("fd00::1".parse().unwrap()),
        };
        assert!(
            !me6("fd00::1").owns(&dual),
            "v6-only identity owns only v6-only leases"
        );
        let p = plan(&c, &[dual.clone()], me_dual, None, RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.stale, vec![dual]);
    }

    #[test]
    fn ipv6_only_reuses_the_previous_subnet_and_honours_reservations() {
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let prev = SubnetKey::parse("0.0.0.0-0&fc00:0:0:42::-64").unwrap();
        let p = plan(&c, &[], me6("fd00::1"), Some(prev), RANDOM_POOL, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Create(prev));
        // Taken by another node: pick something else.
        let other = lease6("0.0.0.0-0&fc00:0:0:42::-64", "fd00::9", 5);
        let p = plan(
            &c,
            &[other],
            me6("fd00::1"),
            Some(prev),
            RANDOM_POOL,
            &mut rng(),
        )
        .unwrap();
        let Choice::Create(k) = p.choice else {
            panic!()
        };
        assert_ne!(k, prev);
        // A reservation (no TTL) for our PublicIPv6 is ours.
        let res = lease6("0.0.0.0-0&fc00:0:0:7::-64", "fd00::1", 0);
        let p = plan(
            &c,
            std::slice::from_ref(&res),
            me6("fd00::1"),
            None,
            RANDOM_POOL,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Reuse(Box::new(res)));
    }

    #[test]
    fn no_network_is_refused() {
        let mut c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        c.enable_ipv6 = false;
        assert_eq!(
            plan(&c, &[], me([1, 1, 1, 1]), None, RANDOM_POOL, &mut rng()).unwrap_err(),
            AllocError::NoNetwork
        );
    }
}
