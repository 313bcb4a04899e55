//! NLRI prefixes: a length in bits followed by the fewest octets that hold it (RFC 4271 §4.3).
//!
//! ```text
//! +---------------------------+
//! |   Length (1 octet)        |
//! +---------------------------+
//! |   Prefix (variable)       |
//! +---------------------------+
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 prefix as carried in NLRI and withdrawn routes. Host bits beyond the length
/// are zero: the decoder clears them (RFC 4271 lets "trailing bits" be anything: they are
/// irrelevant), the constructor refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// `addr/len`; `None` when `len` exceeds the family's width or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let width = if addr.is_ipv4() { 32 } else { 128 };
        if len > width {
            return None;
        }
        let p = Self { addr, len };
        (p.masked() == addr).then_some(p)
    }

    /// A host route (/32 or /128): what a VIP is announced as.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is the default route (length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        }
    }

    /// Appends the encoded prefix to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.len);
        let n = usize::from(self.len).div_ceil(8);
        match self.addr {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
        }
    }

    /// Decodes one prefix of the family (`v6`) from the front of `buf`; returns it and the
    /// octets used, or `None` when the length is too long for the family or the octets run
    /// out.
    pub fn decode(buf: &[u8], v6: bool) -> Option<(Self, usize)> {
        let (&len, rest) = buf.split_first()?;
        let width = if v6 { 128 } else { 32 };
        if len > width {
            return None;
        }
        let n = usize::from(len).div_ceil(8);
        let bytes = rest.get(..n)?;
        let addr = if v6 {
            let mut o = [0u8; 16];
            o[..n].copy_from_slice(bytes);
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            let mut o = [0u8; 4];
            o[..n].copy_from_slice(bytes);
            IpAddr::V4(Ipv4Addr::from(o))
        };
        let p = Self { addr, len };
        Some((
            Self {
                addr: p.masked(),
                len,
            },
            1 + n,
        ))
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_both_ways() {
        for (p, hex) in [
            ("198.51.100.7/32", "20c6336407"),
            ("10.0.0.0/8", "080a"),
            ("0.0.0.0/0", "00"),
            ("192.0.2.128/25", "19c00002 80"),
            ("2001:db8::1/128", "8020010db8000000000000000000000001"),
            ("2001:db8::/32", "2020010db8"),
        ] {
            let (a, l) = p.split_once('/').unwrap();
            let prefix = Prefix::new(a.parse().unwrap(), l.parse().unwrap()).unwrap();
            let bytes: Vec<u8> = (0..hex.replace(' ', "").len() / 2)
                .map(|i| u8::from_str_radix(&hex.replace(' ', "")[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let mut out = Vec::new();
            prefix.encode(&mut out);
            assert_eq!(out, bytes, "{p}");
            let v6 = a.contains(':');
            assert_eq!(
                Prefix::decode(&bytes, v6),
                Some((prefix, bytes.len())),
                "{p}"
            );
        }
    }

    #[test]
    fn trailing_bits_are_cleared_and_bad_lengths_refused() {
        // 10.1.0.0/8 on the wire reads as 10.0.0.0/8.
        let (p, _) = Prefix::decode(&[8, 10], false).unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        let (p, _) = Prefix::decode(&[12, 10, 0xff], false).unwrap();
        assert_eq!(p.to_string(), "10.240.0.0/12");
        assert_eq!(Prefix::decode(&[33, 1, 2, 3, 4, 5], false), None);
        assert_eq!(Prefix::decode(&[129], true), None);
        assert_eq!(Prefix::decode(&[24, 10, 0], false), None, "short");
        assert_eq!(Prefix::decode(&[], false), None);
        assert_eq!(Prefix::new("10.0.0.1".parse().unwrap(), 8), None);
    }
}
