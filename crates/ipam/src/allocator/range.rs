//! Address ranges of pools: parsing, arithmetic, and the addresses never handed out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Family, PoolError};

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrRange {
    /// First address.
    pub start: IpAddr,
    /// Last address (same family, not before `start`).
    pub end: IpAddr,
}

pub(super) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(super) fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl AddrRange {
    /// The range's family.
    pub fn family(&self) -> Family {
        Family::of(self.start)
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && self.start <= ip && ip <= self.end
    }

    /// Number of addresses (saturating).
    pub fn len(&self) -> u128 {
        (to_u128(self.end) - to_u128(self.start)).saturating_add(1)
    }

    /// Whether the range is empty (never, once parsed).
    pub fn is_empty(&self) -> bool {
        false
    }

    pub(super) fn overlaps(&self, o: &AddrRange) -> bool {
        self.family() == o.family() && self.start <= o.end && o.start <= self.end
    }

    /// Parses `192.0.2.0/24`, `2001:db8::/120` or `192.0.2.10-192.0.2.20`.
    pub fn parse(s: &str) -> Result<Self, PoolError> {
        let bad = |why: &str| PoolError::Address(s.to_string(), why.to_string());
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let a: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| bad("the start is not an IP address"))?;
            let b: IpAddr = b
                .trim()
                .parse()
                .map_err(|_| bad("the end is not an IP address"))?;
            if Family::of(a) != Family::of(b) {
                return Err(bad("the start and end are of different families"));
            }
            if a > b {
                return Err(bad("the start is after the end"));
            }
            Ok(Self { start: a, end: b })
        } else {
            let net: ipnet::IpNet = s.parse().map_err(|_| {
                bad("expected a CIDR (192.0.2.0/24) or a range (192.0.2.10-192.0.2.20)")
            })?;
            if net.trunc() != net {
                return Err(bad("host bits are set; write the network address"));
            }
            Ok(Self {
                start: net.network(),
                end: net.broadcast(),
            })
        }
    }
}

pub(super) fn is_buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if matches!(a.octets()[3], 0 | 255))
}

/// Whether `ip` is an IPv6 subnet-router anycast address (RFC 4291 §2.6.1): the subnet prefix
/// with an all-zeros interface identifier. IPv6 subnets are /64 (RFC 4291 §2.5.1, RFC 7421), so
/// that is every address whose low 64 bits are zero. Routers answer it, so it is never handed out.
pub fn is_subnet_router_anycast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if u128::from(a) & u128::from(u64::MAX) == 0)
}

/// How many values `v` in `a..=b` have `v % m == 0`.
pub(super) fn multiples_in(a: u128, b: u128, m: u128) -> u128 {
    let upto = |n: u128| n / m + 1; // multiples in 0..=n
    upto(b) - if a == 0 { 0 } else { upto(a - 1) }
}
