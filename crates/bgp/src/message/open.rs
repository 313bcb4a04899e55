//! The OPEN message and its capabilities (RFC 4271 §4.2, RFC 5492).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+
//! |    Version    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     My Autonomous System      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Hold Time           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         BGP Identifier                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Opt Parm Len  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |             Optional Parameters (variable)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! > "Hold Time ... MUST be either zero or at least three seconds."
//! > "If the Hold Time field of the OPEN message is unacceptable, then the Error Subcode MUST
//! > be set to Unacceptable Hold Time." (RFC 4271 §6.2)
//!
//! Optional parameter type 2 carries capabilities as code/length/value triples (RFC 5492);
//! other parameter types are refused with "Unsupported Optional Parameter" (2/4). Extended
//! optional parameter lengths (RFC 9072) are not supported.

use std::net::Ipv4Addr;

use super::Error;

/// AS_TRANS (RFC 6793): the 2-octet `My AS` of a speaker whose AS number needs 4 octets.
pub const AS_TRANS: u16 = 23456;

/// An OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The 2-octet AS field (AS_TRANS when the real one needs 4 octets).
    pub my_as: u16,
    /// Proposed hold time in seconds (0, or 3 and more).
    pub hold_time: u16,
    /// BGP identifier (router id), non-zero.
    pub identifier: Ipv4Addr,
    /// Capabilities, in order.
    pub capabilities: Vec<Capability>,
}

/// A capability (RFC 5492 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1, multiprotocol extensions (RFC 4760 §8): AFI and SAFI.
    Multiprotocol {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
    /// Code 2, route refresh (RFC 2918).
    RouteRefresh,
    /// Code 64, graceful restart (RFC 4724 §3).
    GracefulRestart(GracefulRestart),
    /// Code 65, support for 4-octet AS numbers with the speaker's AS (RFC 6793).
    FourOctetAs(u32),
    /// Any other capability, kept as received.
    Unknown {
        /// Capability code.
        code: u8,
        /// Its value.
        value: Vec<u8>,
    },
}

/// The graceful restart capability (RFC 4724 §3).
///
/// ```text
/// +--------------------------------------------------+
/// | Restart Flags (4 bits)                           |
/// +--------------------------------------------------+
/// | Restart Time in seconds (12 bits)                |
/// +--------------------------------------------------+
/// | Address Family Identifier (16 bits)              |
/// +--------------------------------------------------+
/// | Subsequent Address Family Identifier (8 bits)    |
/// +--------------------------------------------------+
/// | Flags for Address Family (8 bits)                |
/// +--------------------------------------------------+
/// | ...                                              |
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The R bit: this speaker has restarted.
    pub restarted: bool,
    /// Restart time in seconds (0–4095).
    pub restart_time: u16,
    /// Per family: AFI, SAFI, and whether forwarding state was preserved (F bit).
    pub families: Vec<(u16, u8, bool)>,
}

impl Open {
    /// The speaker's AS number: from the 4-octet AS capability when present, else `my_as`.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    /// Whether the peer announced `c`'s kind (for the value-less ones) or `c` itself.
    pub fn has(&self, c: &Capability) -> bool {
        self.capabilities.iter().any(|x| x == c)
    }

    pub(super) fn decode(body: &[u8]) -> Result<Self, Error> {
        // The header check guarantees at least 10 octets.
        let version = body[0];
        if version != 4 {
            // > "the Data field is a 2-octet unsigned integer, which indicates the largest,
            // > locally-supported version number less than the version the remote BGP peer
            // > bid"
            return Err(Error::open(
                1,
                format!("version {version}, only 4 is supported"),
                &[0, 4],
            ));
        }
        let my_as = u16::from_be_bytes([body[1], body[2]]);
        let hold_time = u16::from_be_bytes([body[3], body[4]]);
        if hold_time == 1 || hold_time == 2 {
            return Err(Error::open(
                6,
                format!("hold time {hold_time} s (must be 0 or at least 3)"),
                &[],
            ));
        }
        let identifier = Ipv4Addr::new(body[5], body[6], body[7], body[8]);
        if identifier.is_unspecified() {
            return Err(Error::open(3, "BGP identifier 0.0.0.0", &body[5..9]));
        }
        let plen = usize::from(body[9]);
        let params = &body[10..];
        if params.len() != plen {
            return Err(Error::open(
                0,
                format!(
                    "optional parameters length {plen} but {} octets follow",
                    params.len()
                ),
                &[],
            ));
        }
        let mut capabilities = Vec::new();
        let mut rest = params;
        while !rest.is_empty() {
            let [ptype, len, tail @ ..] = rest else {
                return Err(Error::open(0, "truncated optional parameter", rest));
            };
            let value = tail.get(..usize::from(*len)).ok_or_else(|| {
                Error::open(0, "optional parameter longer than the message", rest)
            })?;
            if *ptype != 2 {
                return Err(Error::open(
                    4,
                    format!("optional parameter type {ptype}"),
                    &rest[..2 + value.len()],
                ));
            }
            decode_capabilities(value, &mut capabilities)?;
            rest = &tail[value.len()..];
        }
        Ok(Open {
            my_as,
            hold_time,
            identifier,
            capabilities,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(4);
        out.extend_from_slice(&self.my_as.to_be_bytes());
        out.extend_from_slice(&self.hold_time.to_be_bytes());
        out.extend_from_slice(&self.identifier.octets());
        let mut params = Vec::new();
        for c in &self.capabilities {
            let mut v = Vec::new();
            let code = match c {
                Capability::Multiprotocol { afi, safi } => {
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.push(0);
                    v.push(*safi);
                    1
                }
                Capability::RouteRefresh => 2,
                Capability::GracefulRestart(g) => {
                    let head = (u16::from(g.restarted) << 15) | (g.restart_time & 0x0fff);
                    v.extend_from_slice(&head.to_be_bytes());
                    for (afi, safi, fwd) in &g.families {
                        v.extend_from_slice(&afi.to_be_bytes());
                        v.push(*safi);
                        v.push(if *fwd { 0x80 } else { 0 });
                    }
                    64
                }
                Capability::FourOctetAs(a) => {
                    v.extend_from_slice(&a.to_be_bytes());
                    65
                }
                Capability::Unknown { code, value } => {
                    v.extend_from_slice(value);
                    *code
                }
            };
            params.push(code);
            params.push(u8::try_from(v.len()).unwrap_or(u8::MAX));
            params.extend_from_slice(&v);
        }
        // All capabilities in one optional parameter (RFC 5492 allows either form; a decoded
        // OPEN re-encodes no longer than it came).
        if params.is_empty() {
            out.push(0);
        } else {
            out.push(u8::try_from(params.len() + 2).unwrap_or(u8::MAX));
            out.push(2);
            out.push(u8::try_from(params.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(&params);
        }
    }
}

fn decode_capabilities(mut buf: &[u8], out: &mut Vec<Capability>) -> Result<(), Error> {
    while !buf.is_empty() {
        let [code, len, tail @ ..] = buf else {
            return Err(Error::open(0, "truncated capability", buf));
        };
        let v = tail.get(..usize::from(*len)).ok_or_else(|| {
            Error::open(
                0,
                format!("capability {code} longer than its parameter"),
                buf,
            )
        })?;
        let bad = |what: &str| Error::open(0, format!("capability {code}: {what}"), v);
        out.push(match code {
            1 => {
                let [a, b, _, safi] = v else {
                    return Err(bad("length must be 4"));
                };
                Capability::Multiprotocol {
                    afi: u16::from_be_bytes([*a, *b]),
                    safi: *safi,
                }
            }
            2 => {
                if !v.is_empty() {
                    return Err(bad("length must be 0"));
                }
                Capability::RouteRefresh
            }
            64 => {
                if v.len() < 2 || (v.len() - 2) % 4 != 0 {
                    return Err(bad("length must be 2 + 4n"));
                }
                let head = u16::from_be_bytes([v[0], v[1]]);
                Capability::GracefulRestart(GracefulRestart {
                    restarted: head & 0x8000 != 0,
                    restart_time: head & 0x0fff,
                    families: v[2..]
                        .chunks_exact(4)
                        .map(|f| (u16::from_be_bytes([f[0], f[1]]), f[2], f[3] & 0x80 != 0))
                        .collect(),
                })
            }
            65 => {
                let [a, b, c, d] = v else {
                    return Err(bad("length must be 4"));
                };
                Capability::FourOctetAs(u32::from_be_bytes([*a, *b, *c, *d]))
            }
            _ => Capability::Unknown {
                code: *code,
                value: v.to_vec(),
            },
        });
        buf = &tail[v.len()..];
    }
    Ok(())
}
