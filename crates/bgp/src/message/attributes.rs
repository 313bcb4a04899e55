//! The UPDATE message and its path attributes (RFC 4271 §4.3, §5; RFC 4760; RFC 1997; RFC 8092).
//!
//! ```text
//! +-----------------------------------------------------+
//! |   Withdrawn Routes Length (2 octets)                |
//! +-----------------------------------------------------+
//! |   Withdrawn Routes (variable)                       |
//! +-----------------------------------------------------+
//! |   Total Path Attribute Length (2 octets)            |
//! +-----------------------------------------------------+
//! |   Path Attributes (variable)                        |
//! +-----------------------------------------------------+
//! |   Network Layer Reachability Information (variable) |
//! +-----------------------------------------------------+
//! ```
//!
//! Each path attribute is `<flags, type code, length, value>`; the length takes two octets
//! when the Extended Length bit (0x10) is set:
//!
//! ```text
//!  0                   1
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
//! +---------------+---------------+
//! |  Attr. Flags  |Attr. Type Code|
//! +---------------+---------------+
//! ```
//!
//! Checks from RFC 4271 §6.3, each with its subcode: lengths that do not add up (1, Malformed
//! Attribute List), an attribute twice (1), an unknown well-known attribute (2), a missing
//! ORIGIN/AS_PATH/NEXT_HOP when there is NLRI (3, data: the type code), flags that conflict
//! with a known type (4), a known attribute of the wrong length (5), ORIGIN other than 0–2 (6),
//! a bad prefix (10), a malformed AS_PATH (11). MP_REACH/MP_UNREACH for families other than
//! IPv4/IPv6 unicast are kept as opaque attributes.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{AFI_IPV4, AFI_IPV6, Context, Error, HEADER_LEN, MAX_LEN, SAFI_UNICAST};
use crate::Prefix;

const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const EXTENDED: u8 = 0x10;

/// An UPDATE message. IPv4 routes travel in `withdrawn`/`nlri`; IPv6 ones in
/// [`Attribute::MpReach`]/[`Attribute::MpUnreach`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// IPv4 routes withdrawn.
    pub withdrawn: Vec<Prefix>,
    /// Path attributes, in order.
    pub attributes: Vec<Attribute>,
    /// IPv4 routes announced.
    pub nlri: Vec<Prefix>,
}

/// ORIGIN (type 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// 0: learned from an interior protocol (what a speaker originating its own routes sends).
    Igp,
    /// 1: EGP.
    Egp,
    /// 2: incomplete.
    Incomplete,
}

/// An AS_PATH segment (AS_SET = 1, AS_SEQUENCE = 2; 3 and 4 are the confederation kinds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsSegment {
    /// Segment type (1–4).
    pub kind: u8,
    /// AS numbers (1–255 of them).
    pub asns: Vec<u32>,
}

/// A large community (RFC 8092): global administrator and two local data parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LargeCommunity {
    /// Global administrator (an ASN).
    pub global: u32,
    /// Local data part 1.
    pub local1: u32,
    /// Local data part 2.
    pub local2: u32,
}

/// A path attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// Type 1, well-known mandatory.
    Origin(Origin),
    /// Type 2, well-known mandatory.
    AsPath(Vec<AsSegment>),
    /// Type 3, well-known mandatory for IPv4 NLRI.
    NextHop(Ipv4Addr),
    /// Type 4, MULTI_EXIT_DISC, optional non-transitive.
    Med(u32),
    /// Type 5, LOCAL_PREF, well-known (iBGP).
    LocalPref(u32),
    /// Type 8, COMMUNITIES (RFC 1997), optional transitive.
    Communities(Vec<u32>),
    /// Type 14, MP_REACH_NLRI (RFC 4760) for IPv4 or IPv6 unicast: next hop(s) (an IPv6 one
    /// may be followed by a link-local one) and the routes.
    MpReach {
        /// Address family of the routes.
        afi: u16,
        /// Next hops: one, or global + link-local for IPv6.
        next_hops: Vec<IpAddr>,
        /// Routes announced.
        nlri: Vec<Prefix>,
    },
    /// Type 15, MP_UNREACH_NLRI (RFC 4760) for IPv4 or IPv6 unicast.
    MpUnreach {
        /// Address family of the routes.
        afi: u16,
        /// Routes withdrawn.
        withdrawn: Vec<Prefix>,
    },
    /// Type 32, LARGE_COMMUNITY (RFC 8092), optional transitive.
    LargeCommunities(Vec<LargeCommunity>),
    /// Any other attribute, kept as received (flags without the Extended Length bit).
    Other {
        /// Flags (optional, transitive, partial).
        flags: u8,
        /// Type code.
        code: u8,
        /// Value.
        value: Vec<u8>,
    },
}

impl Attribute {
    /// The type code.
    pub fn code(&self) -> u8 {
        match self {
            Attribute::Origin(_) => 1,
            Attribute::AsPath(_) => 2,
            Attribute::NextHop(_) => 3,
            Attribute::Med(_) => 4,
            Attribute::LocalPref(_) => 5,
            Attribute::Communities(_) => 8,
            Attribute::MpReach { .. } => 14,
            Attribute::MpUnreach { .. } => 15,
            Attribute::LargeCommunities(_) => 32,
            Attribute::Other { code, .. } => *code,
        }
    }

    /// The flags a known attribute carries (optional/transitive bits).
    fn flags(&self) -> u8 {
        match self {
            Attribute::Origin(_)
            | Attribute::AsPath(_)
            | Attribute::NextHop(_)
            | Attribute::LocalPref(_) => TRANSITIVE,
            Attribute::Med(_) | Attribute::MpReach { .. } | Attribute::MpUnreach { .. } => OPTIONAL,
            Attribute::Communities(_) | Attribute::LargeCommunities(_) => OPTIONAL | TRANSITIVE,
            Attribute::Other { flags, .. } => flags & !EXTENDED,
        }
    }

    fn encode(&self, out: &mut Vec<u8>, cx: Context) {
        let mut v = Vec::new();
        match self {
            Attribute::Origin(o) => v.push(match o {
                Origin::Igp => 0,
                Origin::Egp => 1,
                Origin::Incomplete => 2,
            }),
            Attribute::AsPath(segments) => {
                for s in segments {
                    v.push(s.kind);
                    v.push(u8::try_from(s.asns.len()).unwrap_or(u8::MAX));
                    for a in &s.asns {
                        if cx.four_octet_as {
                            v.extend_from_slice(&a.to_be_bytes());
                        } else {
                            let two = u16::try_from(*a).unwrap_or(super::open::AS_TRANS);
                            v.extend_from_slice(&two.to_be_bytes());
                        }
                    }
                }
            }
            Attribute::NextHop(a) => v.extend_from_slice(&a.octets()),
            Attribute::Med(x) | Attribute::LocalPref(x) => v.extend_from_slice(&x.to_be_bytes()),
            Attribute::Communities(c) => {
                c.iter().for_each(|x| v.extend_from_slice(&x.to_be_bytes()))
            }
            Attribute::MpReach {
                afi,
                next_hops,
                nlri,
            } => {
                v.extend_from_slice(&afi.to_be_bytes());
                v.push(SAFI_UNICAST);
                let mut nh = Vec::new();
                for h in next_hops {
                    match h {
                        IpAddr::V4(a) => nh.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => nh.extend_from_slice(&a.octets()),
                    }
                }
                v.push(u8::try_from(nh.len()).unwrap_or(u8::MAX));
                v.extend_from_slice(&nh);
                v.push(0); // reserved
                nlri.iter().for_each(|p| p.encode(&mut v));
            }
            Attribute::MpUnreach { afi, withdrawn } => {
                v.extend_from_slice(&afi.to_be_bytes());
                v.push(SAFI_UNICAST);
                withdrawn.iter().for_each(|p| p.encode(&mut v));
            }
            Attribute::LargeCommunities(c) => {
                for x in c {
                    v.extend_from_slice(&x.global.to_be_bytes());
                    v.extend_from_slice(&x.local1.to_be_bytes());
                    v.extend_from_slice(&x.local2.to_be_bytes());
                }
            }
            Attribute::Other { value, .. } => v.extend_from_slice(value),
        }
        let flags = self.flags();
        if v.len() > 255 {
            out.push(flags | EXTENDED);
            out.push(self.code());
            out.extend_from_slice(&u16::try_from(v.len()).unwrap_or(u16::MAX).to_be_bytes());
        } else {
            out.push(flags);
            out.push(self.code());
            out.push(u8::try_from(v.len()).unwrap_or(u8::MAX));
        }
        out.extend_from_slice(&v);
    }

    /// Decodes one attribute's value. `raw` is the whole attribute (for NOTIFICATION data).
    fn decode(flags: u8, code: u8, v: &[u8], raw: &[u8], cx: Context) -> Result<Self, Error> {
        let known_flags = |want: u8| -> Result<(), Error> {
            if flags & (OPTIONAL | TRANSITIVE) != want {
                return Err(Error::update(
                    4,
                    format!("attribute {code} with flags {flags:#04x}"),
                    raw,
                ));
            }
            Ok(())
        };
        let length = |ok: bool| -> Result<(), Error> {
            if ok {
                Ok(())
            } else {
                Err(Error::update(
                    5,
                    format!("attribute {code} of length {}", v.len()),
                    raw,
                ))
            }
        };
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        Ok(match code {
            1 => {
                known_flags(TRANSITIVE)?;
                length(v.len() == 1)?;
                Attribute::Origin(match v[0] {
                    0 => Origin::Igp,
                    1 => Origin::Egp,
                    2 => Origin::Incomplete,
                    o => return Err(Error::update(6, format!("ORIGIN {o}"), raw)),
                })
            }
            2 => {
                known_flags(TRANSITIVE)?;
                Attribute::AsPath(
                    decode_as_path(v, cx)
                        .ok_or_else(|| Error::update(11, "malformed AS_PATH", &[]))?,
                )
            }
            3 => {
                known_flags(TRANSITIVE)?;
                length(v.len() == 4)?;
                Attribute::NextHop(Ipv4Addr::new(v[0], v[1], v[2], v[3]))
            }
            4 => {
                known_flags(OPTIONAL)?;
                length(v.len() == 4)?;
                Attribute::Med(u32_at(0))
            }
            5 => {
                known_flags(TRANSITIVE)?;
                length(v.len() == 4)?;
                Attribute::LocalPref(u32_at(0))
            }
            8 => {
                known_flags(OPTIONAL | TRANSITIVE)?;
                length(v.len().is_multiple_of(4))?;
                Attribute::Communities((0..v.len() / 4).map(|i| u32_at(4 * i)).collect())
            }
            14 => {
                known_flags(OPTIONAL)?;
                let bad = || Error::update(9, "malformed MP_REACH_NLRI", raw);
                let (&[a, b, safi, nh_len], rest) = v.split_first_chunk::<4>().ok_or_else(bad)?;
                let afi = u16::from_be_bytes([a, b]);
                if safi != SAFI_UNICAST || (afi != AFI_IPV4 && afi != AFI_IPV6) {
                    return Ok(other(flags, code, v));
                }
                let nh = rest.get(..usize::from(nh_len)).ok_or_else(bad)?;
                let next_hops = match (afi, nh.len()) {
                    (AFI_IPV4, 4) => vec![IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))],
                    (AFI_IPV6, 16 | 32) => nh
                        .chunks_exact(16)
                        .map(|c| {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(c);
                            IpAddr::V6(Ipv6Addr::from(o))
                        })
                        .collect(),
                    _ => return Err(bad()),
                };
                // One reserved octet, then the routes.
                let routes = rest.get(nh.len() + 1..).ok_or_else(bad)?;
                Attribute::MpReach {
                    afi,
                    next_hops,
                    nlri: decode_prefixes(routes, afi == AFI_IPV6)?,
                }
            }
            15 => {
                known_flags(OPTIONAL)?;
                let (&[a, b, safi], routes) = v
                    .split_first_chunk::<3>()
                    .ok_or_else(|| Error::update(9, "malformed MP_UNREACH_NLRI", raw))?;
                let afi = u16::from_be_bytes([a, b]);
                if safi != SAFI_UNICAST || (afi != AFI_IPV4 && afi != AFI_IPV6) {
                    return Ok(other(flags, code, v));
                }
                Attribute::MpUnreach {
                    afi,
                    withdrawn: decode_prefixes(routes, afi == AFI_IPV6)?,
                }
            }
            32 => {
                known_flags(OPTIONAL | TRANSITIVE)?;
                length(!v.is_empty() && v.len().is_multiple_of(12))?;
                Attribute::LargeCommunities(
                    (0..v.len() / 12)
                        .map(|i| LargeCommunity {
                            global: u32_at(12 * i),
                            local1: u32_at(12 * i + 4),
                            local2: u32_at(12 * i + 8),
                        })
                        .collect(),
                )
            }
            _ if flags & OPTIONAL == 0 => {
                // > "If any of the well-known mandatory attributes are not recognized, then the
                // > Error Subcode MUST be set to Unrecognized Well-known Attribute."
                return Err(Error::update(
                    2,
                    format!("unrecognized well-known attribute {code}"),
                    raw,
                ));
            }
            _ => other(flags, code, v),
        })
    }
}

fn other(flags: u8, code: u8, v: &[u8]) -> Attribute {
    Attribute::Other {
        flags: flags & !EXTENDED,
        code,
        value: v.to_vec(),
    }
}

fn decode_as_path(mut v: &[u8], cx: Context) -> Option<Vec<AsSegment>> {
    let width = if cx.four_octet_as { 4 } else { 2 };
    let mut out = Vec::new();
    while !v.is_empty() {
        let [kind, count, rest @ ..] = v else {
            return None;
        };
        if !(1..=4).contains(kind) || *count == 0 {
            return None;
        }
        let n = usize::from(*count) * width;
        let asns = rest.get(..n)?;
        out.push(AsSegment {
            kind: *kind,
            asns: asns
                .chunks_exact(width)
                .map(|c| match c {
                    [a, b] => u32::from(u16::from_be_bytes([*a, *b])),
                    [a, b, c, d] => u32::from_be_bytes([*a, *b, *c, *d]),
                    _ => 0, // not reached: chunks of `width`
                })
                .collect(),
        });
        v = &rest[n..];
    }
    Some(out)
}

fn decode_prefixes(mut v: &[u8], v6: bool) -> Result<Vec<Prefix>, Error> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let (p, used) =
            Prefix::decode(v, v6).ok_or_else(|| Error::update(10, "invalid network field", &[]))?;
        out.push(p);
        v = &v[used..];
    }
    Ok(out)
}

impl Update {
    /// Whether this is an End-of-RIB marker (RFC 4724 §2), which a graceful-restart speaker
    /// sends after its initial routes.
    pub fn is_end_of_rib(&self) -> bool {
        // RFC 4724 §2: an UPDATE with no routes and no attributes (IPv4), or with only an empty
        // MP_UNREACH_NLRI for the family.
        self.withdrawn.is_empty()
            && self.nlri.is_empty()
            && match self.attributes.as_slice() {
                [] => true,
                [Attribute::MpUnreach { withdrawn, .. }] => withdrawn.is_empty(),
                _ => false,
            }
    }

    /// Whether the encoded message fits in [`MAX_LEN`] octets.
    pub fn fits(&self, cx: Context) -> bool {
        let mut out = Vec::new();
        self.encode(&mut out, cx);
        HEADER_LEN + out.len() <= MAX_LEN
    }

    pub(super) fn decode(body: &[u8], cx: Context) -> Result<Self, Error> {
        let malformed = |what: &str| Error::update(1, what, &[]);
        let wlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let withdrawn_bytes = body
            .get(2..2 + wlen)
            .ok_or_else(|| malformed("withdrawn routes longer than the message"))?;
        let withdrawn = decode_prefixes(withdrawn_bytes, false)?;
        let rest = &body[2 + wlen..];
        let (&[a, b], rest) = rest
            .split_first_chunk::<2>()
            .ok_or_else(|| malformed("no total path attribute length"))?;
        let alen = usize::from(u16::from_be_bytes([a, b]));
        let mut attrs = rest
            .get(..alen)
            .ok_or_else(|| malformed("path attributes longer than the message"))?;
        let nlri = decode_prefixes(&rest[alen..], false)?;
        let mut attributes = Vec::new();
        let mut seen = BTreeSet::new();
        while !attrs.is_empty() {
            let [flags, code, tail @ ..] = attrs else {
                return Err(malformed("truncated attribute header"));
            };
            let (len, head) = if flags & EXTENDED != 0 {
                let [h, l, ..] = tail else {
                    return Err(malformed("truncated attribute length"));
                };
                (usize::from(u16::from_be_bytes([*h, *l])), 4)
            } else {
                let [l, ..] = tail else {
                    return Err(malformed("truncated attribute length"));
                };
                (usize::from(*l), 3)
            };
            let raw = attrs.get(..head + len).ok_or_else(|| {
                // > "If ... the Attribute Length ... [is] inconsistent with the Total Path
                // > Attribute Length, the Error Subcode MUST be set to Attribute Length Error"
                Error::update(
                    5,
                    format!("attribute {code} longer than the attribute list"),
                    attrs,
                )
            })?;
            if !seen.insert(*code) {
                return Err(malformed(&format!("attribute {code} twice")));
            }
            attributes.push(Attribute::decode(*flags, *code, &raw[head..], raw, cx)?);
            attrs = &attrs[head + len..];
        }
        let has = |c: u8| seen.contains(&c);
        let reach = has(14);
        for (code, needed) in [
            (1, !nlri.is_empty() || reach),
            (2, !nlri.is_empty() || reach),
            (3, !nlri.is_empty()),
        ] {
            if needed && !has(code) {
                return Err(Error::update(
                    3,
                    format!("missing well-known attribute {code}"),
                    &[code],
                ));
            }
        }
        Ok(Update {
            withdrawn,
            attributes,
            nlri,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>, cx: Context) {
        let mut w = Vec::new();
        self.withdrawn.iter().for_each(|p| p.encode(&mut w));
        out.extend_from_slice(&u16::try_from(w.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&w);
        let mut a = Vec::new();
        self.attributes.iter().for_each(|x| x.encode(&mut a, cx));
        out.extend_from_slice(&u16::try_from(a.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&a);
        self.nlri.iter().for_each(|p| p.encode(out));
    }
}
