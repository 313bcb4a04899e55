//! The direct heartbeat: what each node tells each peer every heartbeat interval.
//!
//! Sent inside the sealed envelope (`seal`, kind 2). Body layout (big endian):
//! ```text
//!  0       1              3              5                 5+S             7+S
//! +-------+--------------+--------------+-----------------+---------------+-------------------+
//! | flags | interval ms  | n serving u16| serving names   | n claims u16  | claims            |
//! |       | u16          |              | (len u8 + UTF-8)|               | (4|6 u8 + address)|
//! +-------+--------------+--------------+-----------------+---------------+-------------------+
//! flags: bit 0 leaving, bit 1 has an IPv4 interface, bit 2 has an IPv6 interface,
//!        bit 3 a closed-listener section follows:
//! +------------------+--------------------+
//! | n closed u16     | closed (as claims) |
//! +------------------+--------------------+
//! ```
//! *closed*: VIPs whose listener the sender's balancer could not open (it is not eligible for
//! them). The section is written only when non-empty, so heartbeats stay readable by agents
//! that predate it except while a listener is closed.
//! *serving*: the `local_only` services with a healthy backend on the sender; *claims*: the
//! VIPs the sender announces right now. Receivers declare the sender dead after
//! their dead-after time (scaled by the sender's interval when it is longer than theirs)
//! without a heartbeat.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::owner::Facts;

/// Why a heartbeat body was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Truncated or inconsistent.
    #[error("malformed heartbeat")]
    Malformed,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// The sender is leaving gracefully: treat it as gone now.
    pub leaving: bool,
    /// The sender's heartbeat interval.
    pub interval: Duration,
    /// The sender's eligibility facts.
    pub facts: Facts,
    /// The VIPs the sender announces.
    pub claims: BTreeSet<IpAddr>,
}

impl Heartbeat {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.claims.len() * 5);
        let closed = !self.facts.closed.is_empty();
        b.push(
            u8::from(self.leaving)
                | u8::from(self.facts.v4) << 1
                | u8::from(self.facts.v6) << 2
                | u8::from(closed) << 3,
        );
        b.extend_from_slice(
            &(self.interval.as_millis().min(u128::from(u16::MAX)) as u16).to_be_bytes(),
        );
        let serving: Vec<&String> = self
            .facts
            .serving
            .iter()
            .filter(|s| s.len() <= 255)
            .collect();
        b.extend_from_slice(&(serving.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for s in serving.iter().take(usize::from(u16::MAX)) {
            b.push(s.len() as u8);
            b.extend_from_slice(s.as_bytes());
        }
        put_ips(&mut b, &self.claims);
        if closed {
            put_ips(&mut b, &self.facts.closed);
        }
        b
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let mut r = Reader(b);
        let flags = r.u8()?;
        let interval = Duration::from_millis(u64::from(r.u16()?));
        let mut serving = BTreeSet::new();
        for _ in 0..r.u16()? {
            let n = usize::from(r.u8()?);
            let s = std::str::from_utf8(r.take(n)?).map_err(|_| Error::Malformed)?;
            serving.insert(s.to_string());
        }
        let claims = r.ips()?;
        let closed = if flags & 8 != 0 {
            r.ips()?
        } else {
            BTreeSet::new()
        };
        if !r.0.is_empty() {
            return Err(Error::Malformed);
        }
        Ok(Heartbeat {
            leaving: flags & 1 != 0,
            interval,
            facts: Facts {
                v4: flags & 2 != 0,
                v6: flags & 4 != 0,
                serving,
                closed,
            },
            claims,
        })
    }
}

fn put_ips(b: &mut Vec<u8>, ips: &BTreeSet<IpAddr>) {
    b.extend_from_slice(&(ips.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    for ip in ips.iter().take(usize::from(u16::MAX)) {
        match ip {
            IpAddr::V4(a) => {
                b.push(4);
                b.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                b.push(6);
                b.extend_from_slice(&a.octets());
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(Error::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn ips(&mut self) -> Result<BTreeSet<IpAddr>, Error> {
        let mut out = BTreeSet::new();
        for _ in 0..self.u16()? {
            let ip = match self.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(self.take(4)?).map_err(|_| Error::Malformed)?,
                )),
                6 => IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(self.take(16)?).map_err(|_| Error::Malformed)?,
                )),
                _ => return Err(Error::Malformed),
            };
            out.insert(ip);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::tests::{hex, unhex};

    const FIXTURE: &str =
        "03 0028 0001 02 6462 0002 04 0a000064 06 fd000000000000000000000000000100";

    fn sample() -> Heartbeat {
        Heartbeat {
            leaving: true,
            interval: Duration::from_millis(40),
            facts: Facts {
                v4: true,
                v6: false,
                serving: ["db".to_string()].into(),
                ..Default::default()
            },
            claims: ["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()].into(),
        }
    }

    #[test]
    fn fixture_both_ways() {
        assert_eq!(hex(&sample().encode()), hex(&unhex(FIXTURE)));
        assert_eq!(Heartbeat::decode(&unhex(FIXTURE)).unwrap(), sample());
        let b = unhex(FIXTURE);
        for n in 0..b.len() {
            assert_eq!(
                Heartbeat::decode(&b[..n]),
                Err(Error::Malformed),
                "truncated at {n}"
            );
        }
        assert_eq!(
            Heartbeat::decode(&Heartbeat::default().encode()).unwrap(),
            Heartbeat::default()
        );
    }

    #[test]
    fn closed_listeners_follow_only_when_there_are_some() {
        let mut hb = sample();
        hb.facts.closed = ["10.0.0.101".parse().unwrap()].into();
        let b = hb.encode();
        assert_eq!(
            hex(&b),
            hex(&unhex(&format!("0b{} 0001 04 0a000065", &FIXTURE[2..])))
        );
        assert_eq!(Heartbeat::decode(&b).unwrap(), hb);
        // without the flag, trailing bytes are still malformed
        let mut bad = b.clone();
        bad[0] &= !8;
        assert_eq!(Heartbeat::decode(&bad), Err(Error::Malformed));
    }
}
