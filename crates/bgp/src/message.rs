//! BGP-4 messages (RFC 4271 §4) with the capabilities and attributes of an announce-only speaker.
//!
//! Every message starts with the fixed header (RFC 4271 §4.1):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                                                               +
//! |                           Marker                              |
//! +                                                               +
//! |                                                               |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! > "Marker: This 16-octet field is included for compatibility; it MUST be set to all ones."
//! > "The value of the Length field MUST always be at least 19 and no greater than 4096"
//!
//! A decoding error is an [`Error`] whose [`Error::notification`] gives the NOTIFICATION code
//! and subcode (and data) RFC 4271 §6 prescribes, so the session answers a malformed message
//! with the right NOTIFICATION and closes; nothing here panics on any input (fuzzed).
//! Extended messages (RFC 8654, up to 65,535 octets) are not negotiated.

mod attributes;
mod open;

pub use attributes::{AsSegment, Attribute, LargeCommunity, Origin, Update};
pub use open::{AS_TRANS, Capability, GracefulRestart, Open};

/// The header's size; also the whole of a KEEPALIVE.
pub const HEADER_LEN: usize = 19;
/// The largest message without RFC 8654.
pub const MAX_LEN: usize = 4096;

/// Address family identifiers (IANA) portico announces.
pub const AFI_IPV4: u16 = 1;
/// IPv6 (IANA AFI 2).
pub const AFI_IPV6: u16 = 2;
/// Unicast (IANA SAFI 1).
pub const SAFI_UNICAST: u8 = 1;

/// A BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Type 1.
    Open(Open),
    /// Type 2.
    Update(Update),
    /// Type 3.
    Notification(Notification),
    /// Type 4.
    Keepalive,
    /// Type 5 (RFC 2918 §3): AFI, reserved, SAFI.
    RouteRefresh {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
}

/// A NOTIFICATION (RFC 4271 §4.5): error code, subcode, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code (1 header, 2 OPEN, 3 UPDATE, 4 hold timer expired, 5 FSM, 6 cease).
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Diagnostic data.
    pub data: Vec<u8>,
}

/// What decoding depends on from the session: whether both sides announced 4-octet AS support
/// (AS_PATH then carries 4-octet numbers, RFC 6793 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// 4-octet AS numbers negotiated.
    pub four_octet_as: bool,
}

/// Why a message could not be decoded, with the NOTIFICATION it calls for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer octets than the header's length says: wait for more (not an error on the wire).
    #[error("incomplete message: {needed} octets needed")]
    Incomplete {
        /// Octets the whole message needs.
        needed: usize,
    },
    /// Header: the marker is not all ones (1/1, Connection Not Synchronized).
    #[error("message header: the marker is not all ones")]
    NotSynchronized,
    /// Header: a length outside 19..=4096 or wrong for the type (1/2, Bad Message Length; the
    /// data is the length field).
    #[error("message header: bad message length {0}")]
    BadLength(u16),
    /// Header: an unknown type (1/3, Bad Message Type; the data is the type).
    #[error("message header: bad message type {0}")]
    BadType(u8),
    /// OPEN: an error with its subcode (2/x): 1 unsupported version, 2 bad peer AS, 3 bad BGP
    /// identifier, 4 unsupported optional parameter, 6 unacceptable hold time.
    #[error("OPEN: {what}")]
    Open {
        /// RFC 4271 §6.2 subcode.
        subcode: u8,
        /// What was wrong.
        what: String,
        /// NOTIFICATION data.
        data: Vec<u8>,
    },
    /// UPDATE: an error with its subcode (3/x): 1 malformed attribute list, 2 unrecognized
    /// well-known attribute, 3 missing well-known attribute, 4 attribute flags error, 5
    /// attribute length error, 6 invalid ORIGIN, 8 invalid NEXT_HOP, 9 optional attribute
    /// error, 10 invalid network field, 11 malformed AS_PATH.
    #[error("UPDATE: {what}")]
    Update {
        /// RFC 4271 §6.3 subcode.
        subcode: u8,
        /// What was wrong.
        what: String,
        /// NOTIFICATION data (usually the offending attribute).
        data: Vec<u8>,
    },
}

/// The name of a NOTIFICATION error code and subcode (RFC 4271 §4.5, RFC 4486 for Cease, RFC
/// 9384 for BFD Down), for logs and status.
pub fn notification_name(code: u8, subcode: u8) -> &'static str {
    match (code, subcode) {
        (1, 1) => "message header: connection not synchronized",
        (1, 2) => "message header: bad message length",
        (1, 3) => "message header: bad message type",
        (1, _) => "message header error",
        (2, 1) => "OPEN: unsupported version number",
        (2, 2) => "OPEN: bad peer AS",
        (2, 3) => "OPEN: bad BGP identifier",
        (2, 4) => "OPEN: unsupported optional parameter",
        (2, 6) => "OPEN: unacceptable hold time",
        (2, 7) => "OPEN: unsupported capability",
        (2, _) => "OPEN message error",
        (3, 1) => "UPDATE: malformed attribute list",
        (3, 2) => "UPDATE: unrecognized well-known attribute",
        (3, 3) => "UPDATE: missing well-known attribute",
        (3, 4) => "UPDATE: attribute flags error",
        (3, 5) => "UPDATE: attribute length error",
        (3, 6) => "UPDATE: invalid ORIGIN",
        (3, 8) => "UPDATE: invalid NEXT_HOP",
        (3, 9) => "UPDATE: optional attribute error",
        (3, 10) => "UPDATE: invalid network field",
        (3, 11) => "UPDATE: malformed AS_PATH",
        (3, _) => "UPDATE message error",
        (4, _) => "hold timer expired",
        (5, _) => "finite state machine error",
        (6, 1) => "cease: maximum number of prefixes reached",
        (6, 2) => "cease: administrative shutdown",
        (6, 3) => "cease: peer de-configured",
        (6, 4) => "cease: administrative reset",
        (6, 5) => "cease: connection rejected",
        (6, 6) => "cease: other configuration change",
        (6, 7) => "cease: connection collision resolution",
        (6, 8) => "cease: out of resources",
        (6, 9) => "cease: hard reset",
        (6, 10) => "cease: BFD down",
        (6, _) => "cease",
        (7, _) => "ROUTE-REFRESH message error",
        _ => "unknown error code",
    }
}

impl Error {
    /// The NOTIFICATION to send for this error (`None` for [`Error::Incomplete`]).
    pub fn notification(&self) -> Option<Notification> {
        let (code, subcode, data) = match self {
            Error::Incomplete { .. } => return None,
            Error::NotSynchronized => (1, 1, Vec::new()),
            Error::BadLength(l) => (1, 2, l.to_be_bytes().to_vec()),
            Error::BadType(t) => (1, 3, vec![*t]),
            Error::Open { subcode, data, .. } => (2, *subcode, data.clone()),
            Error::Update { subcode, data, .. } => (3, *subcode, data.clone()),
        };
        Some(Notification {
            code,
            subcode,
            data,
        })
    }

    pub(crate) fn update(subcode: u8, what: impl Into<String>, data: &[u8]) -> Self {
        Error::Update {
            subcode,
            what: what.into(),
            data: data.to_vec(),
        }
    }

    pub(crate) fn open(subcode: u8, what: impl Into<String>, data: &[u8]) -> Self {
        Error::Open {
            subcode,
            what: what.into(),
            data: data.to_vec(),
        }
    }
}

impl Message {
    /// Decodes the message at the front of `buf`; returns it and the octets it used.
    /// [`Error::Incomplete`] means: read more and call again.
    pub fn decode(buf: &[u8], cx: Context) -> Result<(Message, usize), Error> {
        if buf.len() < HEADER_LEN {
            return Err(Error::Incomplete { needed: HEADER_LEN });
        }
        if buf[..16].iter().any(|b| *b != 0xff) {
            return Err(Error::NotSynchronized);
        }
        let len = u16::from_be_bytes([buf[16], buf[17]]);
        let n = usize::from(len);
        if !(HEADER_LEN..=MAX_LEN).contains(&n) {
            return Err(Error::BadLength(len));
        }
        let kind = buf[18];
        if !(1..=5).contains(&kind) {
            return Err(Error::BadType(kind));
        }
        if buf.len() < n {
            return Err(Error::Incomplete { needed: n });
        }
        let body = &buf[HEADER_LEN..n];
        let m = match kind {
            1 => {
                // > "the minimum length of the OPEN message is 29 octets"
                if n < 29 {
                    return Err(Error::BadLength(len));
                }
                Message::Open(Open::decode(body)?)
            }
            2 => {
                // > "the minimum length of the UPDATE message is 23 octets"
                if n < 23 {
                    return Err(Error::BadLength(len));
                }
                Message::Update(Update::decode(body, cx)?)
            }
            3 => {
                if n < 21 {
                    return Err(Error::BadLength(len));
                }
                Message::Notification(Notification {
                    code: body[0],
                    subcode: body[1],
                    data: body[2..].to_vec(),
                })
            }
            4 => {
                // > "A KEEPALIVE message consists of only the message header and has a length
                // > of 19 octets."
                if n != HEADER_LEN {
                    return Err(Error::BadLength(len));
                }
                Message::Keepalive
            }
            _ => {
                if n != HEADER_LEN + 4 {
                    return Err(Error::BadLength(len));
                }
                Message::RouteRefresh {
                    afi: u16::from_be_bytes([body[0], body[1]]),
                    safi: body[3],
                }
            }
        };
        Ok((m, n))
    }

    /// Encodes the message, header included. An UPDATE too large for one message is the
    /// caller's to split (see [`Update::fits`]); encoding one anyway yields its true length.
    pub fn encode(&self, cx: Context) -> Vec<u8> {
        let mut out = vec![0xff; 16];
        out.extend_from_slice(&[0, 0]);
        let kind = match self {
            Message::Open(o) => {
                out.push(1);
                o.encode(&mut out);
                1
            }
            Message::Update(u) => {
                out.push(2);
                u.encode(&mut out, cx);
                2
            }
            Message::Notification(n) => {
                out.push(3);
                out.push(n.code);
                out.push(n.subcode);
                out.extend_from_slice(&n.data);
                3
            }
            Message::Keepalive => {
                out.push(4);
                4
            }
            Message::RouteRefresh { afi, safi } => {
                out.push(5);
                out.extend_from_slice(&afi.to_be_bytes());
                out.push(0);
                out.push(*safi);
                5
            }
        };
        debug_assert_eq!(out[18], kind);
        let len = u16::try_from(out.len()).unwrap_or(u16::MAX);
        out[16..18].copy_from_slice(&len.to_be_bytes());
        out
    }
}

/// Hex (spaces allowed) to bytes, for fixtures.
#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex fixture"))
        .collect()
}

#[cfg(test)]
mod tests;
