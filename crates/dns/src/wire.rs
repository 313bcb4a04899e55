//! DNS wire format (RFC 1035 §4, RFC 6891 for EDNS0): the header, names, the question and
//! resource records, as pure functions over byte slices.
//!
//! Two decoders live here. The *hot-path* one, [`parse_request`], reads only what answering
//! needs (header, the single question, the OPT record) and refuses compression in the question
//! name, so it never follows a pointer. The *general* one, [`Message::decode`], follows
//! compression pointers (strictly backwards, so loops are impossible) and is what tests, the
//! fuzz target and the property round-trips use against [`Message::encode`].
//!
//! # Header (RFC 1035 §4.1.1, with RFC 2535/4035's AD and CD bits)
//!
//! ```text
//!                                 1  1  1  1  1  1
//!   0  1  2  3  4  5  6  7  8  9  0  1  2  3  4  5
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                      ID                       |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                    QDCOUNT                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                    ANCOUNT                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                    NSCOUNT                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                    ARCOUNT                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! ```
//!
//! # Question (§4.1.2) and resource record (§4.1.3)
//!
//! ```text
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! /                QNAME / NAME                   /   labels: len(1) bytes…, 0-terminated;
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+   or a pointer 11xxxxxx xxxxxxxx
//! |                 QTYPE / TYPE                  |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                QCLASS / CLASS                 |   OPT: requestor's UDP payload size
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+   ---- question ends here ----
//! |                      TTL                      |   OPT: EXT-RCODE(8) VERSION(8)
//! |                                               |        DO(1) Z(15)
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                   RDLENGTH                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! /                     RDATA                     /
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! ```

/// Length of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire, terminating zero included (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// Classic UDP payload limit without EDNS0.
pub const CLASSIC_UDP: usize = 512;

/// Record types this server knows by name.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Name server.
    pub const NS: u16 = 2;
    /// Canonical name.
    pub const CNAME: u16 = 5;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// Host information (RFC 8482's minimal ANY answer).
    pub const HINFO: u16 = 13;
    /// Text.
    pub const TXT: u16 = 16;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Service location.
    pub const SRV: u16 = 33;
    /// EDNS0 pseudo-record.
    pub const OPT: u16 = 41;
    /// Incremental zone transfer.
    pub const IXFR: u16 = 251;
    /// Full zone transfer.
    pub const AXFR: u16 = 252;
    /// Any type (`*`).
    pub const ANY: u16 = 255;
}

/// The Internet class.
pub const CLASS_IN: u16 = 1;

/// Response codes (4-bit header part).
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// Format error.
    pub const FORMERR: u8 = 1;
    /// Server failure.
    pub const SERVFAIL: u8 = 2;
    /// Name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// Not implemented.
    pub const NOTIMP: u8 = 4;
    /// Refused.
    pub const REFUSED: u8 = 5;
    /// Bad EDNS version: 16, i.e. 0 in the header and 1 in the OPT's EXT-RCODE.
    pub const BADVERS: u16 = 16;
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ended before a field did.
    #[error("message truncated at byte {0}")]
    Truncated(usize),
    /// A label's length byte uses the reserved 01/10 prefixes.
    #[error("unsupported label type at byte {0}")]
    LabelType(usize),
    /// A name is longer than 255 bytes.
    #[error("name too long")]
    NameTooLong,
    /// A compression pointer that does not point strictly backwards (a loop or a forward
    /// reference), or one where none is allowed.
    #[error("bad compression pointer at byte {0}")]
    BadPointer(usize),
    /// A presentation-format name that cannot be encoded (empty or long label).
    #[error("invalid name `{0}`")]
    InvalidName(String),
    /// More than one OPT record, or an OPT record not owned by the root.
    #[error("malformed OPT record")]
    BadOpt,
    /// A section count that the message cannot hold.
    #[error("section count larger than the message")]
    BadCount,
}

/// The header flags word, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    /// Response (1) or query (0).
    pub qr: bool,
    /// Kind of query (0 = QUERY).
    pub opcode: u8,
    /// Authoritative answer.
    pub aa: bool,
    /// Truncated.
    pub tc: bool,
    /// Recursion desired.
    pub rd: bool,
    /// Recursion available.
    pub ra: bool,
    /// Reserved; must be zero.
    pub z: bool,
    /// Authentic data.
    pub ad: bool,
    /// Checking disabled.
    pub cd: bool,
    /// Low 4 bits of the response code.
    pub rcode: u8,
}

impl Flags {
    /// Decodes the 16-bit flags word.
    pub fn from_u16(w: u16) -> Self {
        Self {
            qr: w & 0x8000 != 0,
            opcode: ((w >> 11) & 0xf) as u8,
            aa: w & 0x0400 != 0,
            tc: w & 0x0200 != 0,
            rd: w & 0x0100 != 0,
            ra: w & 0x0080 != 0,
            z: w & 0x0040 != 0,
            ad: w & 0x0020 != 0,
            cd: w & 0x0010 != 0,
            rcode: (w & 0xf) as u8,
        }
    }

    /// Encodes the 16-bit flags word.
    pub fn to_u16(self) -> u16 {
        (u16::from(self.qr) << 15)
            | (u16::from(self.opcode & 0xf) << 11)
            | (u16::from(self.aa) << 10)
            | (u16::from(self.tc) << 9)
            | (u16::from(self.rd) << 8)
            | (u16::from(self.ra) << 7)
            | (u16::from(self.z) << 6)
            | (u16::from(self.ad) << 5)
            | (u16::from(self.cd) << 4)
            | u16::from(self.rcode & 0xf)
    }
}

/// The fixed 12-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Query id, copied into the response.
    pub id: u16,
    /// Flags.
    pub flags: Flags,
    /// Questions.
    pub qdcount: u16,
    /// Answer records.
    pub ancount: u16,
    /// Authority records.
    pub nscount: u16,
    /// Additional records.
    pub arcount: u16,
}

impl Header {
    /// Decodes the header at the start of `msg`.
    pub fn decode(msg: &[u8]) -> Result<Self, WireError> {
        let h: &[u8; HEADER_LEN] = msg
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(WireError::Truncated(msg.len()))?;
        let w = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Ok(Self {
            id: w(0),
            flags: Flags::from_u16(w(2)),
            qdcount: w(4),
            ancount: w(6),
            nscount: w(8),
            arcount: w(10),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&self.id.to_be_bytes());
        h[2..4].copy_from_slice(&self.flags.to_u16().to_be_bytes());
        h[4..6].copy_from_slice(&self.qdcount.to_be_bytes());
        h[6..8].copy_from_slice(&self.ancount.to_be_bytes());
        h[8..10].copy_from_slice(&self.nscount.to_be_bytes());
        h[10..12].copy_from_slice(&self.arcount.to_be_bytes());
        h
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Result<u16, WireError> {
    match msg.get(pos..pos + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(WireError::Truncated(msg.len())),
    }
}

fn u32_at(msg: &[u8], pos: usize) -> Result<u32, WireError> {
    match msg.get(pos..pos + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(WireError::Truncated(msg.len())),
    }
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// Encodes a presentation-format name (`www.lb.example.com.`, trailing dot optional, `.` for
/// the root) as uncompressed wire labels, lower-cased.
pub fn name_to_wire(name: &str) -> Result<Vec<u8>, WireError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL_LEN {
                return Err(WireError::InvalidName(name.to_string()));
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > MAX_NAME_LEN {
        return Err(WireError::InvalidName(name.to_string()));
    }
    Ok(out)
}

/// Renders uncompressed wire labels as a presentation name with a trailing dot (bytes outside
/// printable ASCII, dots and backslashes are escaped as `\DDD`).
pub fn wire_to_name(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while let Some(&len) = wire.get(i) {
        if len == 0 {
            break;
        }
        let end = (i + 1 + len as usize).min(wire.len());
        for &b in &wire[i + 1..end] {
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                s.push(b as char);
            } else {
                s.push_str(&format!("\\{b:03}"));
            }
        }
        s.push('.');
        i = end;
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// Reads the question name at `pos` into `buf`, lower-cased, refusing compression (a query's
/// only question sits right after the header, so there is nothing for a pointer to reuse).
/// Returns the wire length of the name (terminating zero included), which is also how many
/// bytes it occupies in `msg`.
pub fn read_qname(
    msg: &[u8],
    pos: usize,
    buf: &mut [u8; MAX_NAME_LEN],
) -> Result<usize, WireError> {
    let mut i = 0usize;
    loop {
        let len = *msg.get(pos + i).ok_or(WireError::Truncated(msg.len()))?;
        if len == 0 {
            // `i < MAX_NAME_LEN` holds: the loop refuses names that would pass it.
            buf[i] = 0;
            return Ok(i + 1);
        }
        match len & 0xc0 {
            0x00 => {}
            0xc0 => return Err(WireError::BadPointer(pos + i)),
            _ => return Err(WireError::LabelType(pos + i)),
        }
        let l = len as usize;
        if i + 1 + l + 1 > MAX_NAME_LEN {
            return Err(WireError::NameTooLong);
        }
        let label = msg
            .get(pos + i + 1..pos + i + 1 + l)
            .ok_or(WireError::Truncated(msg.len()))?;
        buf[i] = len;
        for (d, s) in buf[i + 1..i + 1 + l].iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        i += 1 + l;
    }
}

/// Skips a (possibly compressed) name at `pos` without following pointers; returns the
/// position after it.
pub fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, WireError> {
    let start = pos;
    loop {
        let len = *msg.get(pos).ok_or(WireError::Truncated(msg.len()))?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + len as usize,
            0xc0 => {
                if pos + 2 > msg.len() {
                    return Err(WireError::Truncated(msg.len()));
                }
                return Ok(pos + 2);
            }
            _ => return Err(WireError::LabelType(pos)),
        }
        if pos - start >= MAX_NAME_LEN {
            return Err(WireError::NameTooLong);
        }
    }
}

/// Reads a possibly compressed name at `pos`, following pointers. Every pointer must point
/// strictly before the label that holds it, so the walk always moves backwards and ends.
/// Returns the uncompressed wire name (case kept) and the position after the name *in place*.
pub fn read_name(msg: &[u8], pos: usize) -> Result<(Vec<u8>, usize), WireError> {
    let mut out = Vec::with_capacity(32);
    let mut at = pos;
    let mut end = None;
    loop {
        let len = *msg.get(at).ok_or(WireError::Truncated(msg.len()))?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                out.push(0);
                return Ok((out, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let l = len as usize;
                if out.len() + 1 + l + 1 > MAX_NAME_LEN {
                    return Err(WireError::NameTooLong);
                }
                let label = msg
                    .get(at + 1..at + 1 + l)
                    .ok_or(WireError::Truncated(msg.len()))?;
                out.push(len);
                out.extend_from_slice(label);
                at += 1 + l;
            }
            0xc0 => {
                let target = (u16_at(msg, at)? & 0x3fff) as usize;
                if target >= at {
                    return Err(WireError::BadPointer(at));
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(WireError::LabelType(at)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The hot-path request parser
// ---------------------------------------------------------------------------------------------

/// EDNS0 parameters of a request's OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size.
    pub udp_size: u16,
    /// EDNS version.
    pub version: u8,
    /// DNSSEC OK, copied into the response (RFC 3225).
    pub dnssec_ok: bool,
}

/// What the hot path needs from a query.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// The header.
    pub header: Header,
    /// Bytes of the question name (terminating zero included); the lower-cased copy sits in
    /// the caller's buffer, the name as sent at `msg[12..12 + qname_len]`.
    pub qname_len: usize,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
    /// The OPT record, if any.
    pub edns: Option<Edns>,
}

impl Request {
    /// End of the question section in the request (and in a response that echoes it).
    pub fn question_end(&self) -> usize {
        HEADER_LEN + self.qname_len + 4
    }
}

/// Why a request is not answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not worth a reply: shorter than a header, or a response (QR set).
    Drop,
    /// Answer with this RCODE and no question (header fields still valid).
    Header(Header, u8),
}

/// Parses a query on the hot path: the header, exactly one question (name lower-cased into
/// `qname`), then every remaining record is skipped except OPT, which is decoded.
pub fn parse_request(msg: &[u8], qname: &mut [u8; MAX_NAME_LEN]) -> Result<Request, Reject> {
    let header = Header::decode(msg).map_err(|_| Reject::Drop)?;
    if header.flags.qr {
        return Err(Reject::Drop);
    }
    let formerr = Reject::Header(header, rcode::FORMERR);
    if header.flags.opcode != 0 {
        return Err(Reject::Header(header, rcode::NOTIMP));
    }
    if header.qdcount != 1 {
        return Err(formerr);
    }
    let qname_len = read_qname(msg, HEADER_LEN, qname).map_err(|_| formerr)?;
    let mut pos = HEADER_LEN + qname_len;
    let qtype = u16_at(msg, pos).map_err(|_| formerr)?;
    let qclass = u16_at(msg, pos + 2).map_err(|_| formerr)?;
    pos += 4;
    let mut edns = None;
    let records = u32::from(header.ancount) + u32::from(header.nscount) + u32::from(header.arcount);
    // Each record takes at least 11 bytes: refuse impossible counts before walking.
    if (records as usize) * 11 > msg.len() - pos {
        return Err(formerr);
    }
    let additional_from = u32::from(header.ancount) + u32::from(header.nscount);
    for i in 0..records {
        let name_at = pos;
        pos = skip_name(msg, pos).map_err(|_| formerr)?;
        let rtype = u16_at(msg, pos).map_err(|_| formerr)?;
        let class = u16_at(msg, pos + 2).map_err(|_| formerr)?;
        let ttl = u32_at(msg, pos + 4).map_err(|_| formerr)?;
        let rdlen = u16_at(msg, pos + 8).map_err(|_| formerr)? as usize;
        pos += 10;
        if pos + rdlen > msg.len() {
            return Err(formerr);
        }
        if rtype == rtype::OPT {
            // RFC 6891 §6.1.1: only in the additional section, at most one, owned by the root.
            if i < additional_from || edns.is_some() || msg[name_at] != 0 {
                return Err(formerr);
            }
            edns = Some(Edns {
                udp_size: class,
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl & 0x8000 != 0,
            });
        }
        pos += rdlen;
    }
    Ok(Request {
        header,
        qname_len,
        qtype,
        qclass,
        edns,
    })
}

// ---------------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------------

/// A compression pointer to `offset`.
pub fn pointer(offset: usize) -> [u8; 2] {
    debug_assert!(offset < 0x4000);
    (0xc000 | offset as u16).to_be_bytes()
}

/// Appends a record whose owner is already encoded (a pointer or full labels).
pub fn put_rr(out: &mut Vec<u8>, owner: &[u8], rtype: u16, class: u16, ttl: u32, rdata: &[u8]) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

/// Appends an OPT record advertising `udp_size`, with the upper 8 bits of a 12-bit RCODE.
pub fn put_opt(out: &mut Vec<u8>, udp_size: u16, ext_rcode: u8, dnssec_ok: bool) {
    let ttl = (u32::from(ext_rcode) << 24) | if dnssec_ok { 0x8000 } else { 0 };
    put_rr(out, &[0], rtype::OPT, udp_size, ttl, &[]);
}

/// Length of an OPT record without options.
pub const OPT_LEN: usize = 11;

/// SOA RDATA (RFC 1035 §3.3.13), names uncompressed.
pub fn soa_rdata(
    mname: &[u8],
    rname: &[u8],
    serial: u32,
    refresh: u32,
    retry: u32,
    expire: u32,
    minimum: u32,
) -> Vec<u8> {
    let mut r = Vec::with_capacity(mname.len() + rname.len() + 20);
    r.extend_from_slice(mname);
    r.extend_from_slice(rname);
    for v in [serial, refresh, retry, expire, minimum] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    r
}

/// SRV RDATA (RFC 2782), target uncompressed as the RFC requires.
pub fn srv_rdata(priority: u16, weight: u16, port: u16, target: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(6 + target.len());
    r.extend_from_slice(&priority.to_be_bytes());
    r.extend_from_slice(&weight.to_be_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(target);
    r
}

/// HINFO RDATA: two character-strings.
pub fn hinfo_rdata(cpu: &str, os: &str) -> Vec<u8> {
    let mut r = Vec::with_capacity(2 + cpu.len() + os.len());
    for s in [cpu, os] {
        let b = &s.as_bytes()[..s.len().min(255)];
        r.push(b.len() as u8);
        r.extend_from_slice(b);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The general message model (tests, fuzzing, round-trips)
// ---------------------------------------------------------------------------------------------

/// A question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Uncompressed wire name.
    pub name: Vec<u8>,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
}

/// A resource record with opaque RDATA (names inside RDATA are kept as sent: this server only
/// emits uncompressed RDATA, and [`Message::decode`] expands the well-known ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Uncompressed wire owner name.
    pub name: Vec<u8>,
    /// TYPE.
    pub rtype: u16,
    /// CLASS.
    pub class: u16,
    /// TTL.
    pub ttl: u32,
    /// RDATA.
    pub rdata: Vec<u8>,
}

/// A whole message, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Header (counts are recomputed by [`Message::encode`]).
    pub header: Header,
    /// Question section.
    pub questions: Vec<Question>,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section.
    pub authority: Vec<Record>,
    /// Additional section.
    pub additional: Vec<Record>,
}

impl Message {
    /// Decodes a message, following compression pointers in owner names and in the RDATA of
    /// NS, CNAME, SOA and SRV (expanded, so the result re-encodes without pointers).
    pub fn decode(msg: &[u8]) -> Result<Self, WireError> {
        let header = Header::decode(msg)?;
        let mut pos = HEADER_LEN;
        let total = u32::from(header.qdcount)
            + u32::from(header.ancount)
            + u32::from(header.nscount)
            + u32::from(header.arcount);
        // A question takes at least 5 bytes, a record 11: refuse impossible counts up front.
        if total as usize * 5 > msg.len() - pos {
            return Err(WireError::BadCount);
        }
        let mut questions = Vec::with_capacity(header.qdcount as usize);
        for _ in 0..header.qdcount {
            let (name, p) = read_name(msg, pos)?;
            let qtype = u16_at(msg, p)?;
            let qclass = u16_at(msg, p + 2)?;
            pos = p + 4;
            questions.push(Question {
                name,
                qtype,
                qclass,
            });
        }
        let section = |n: u16, pos: &mut usize| -> Result<Vec<Record>, WireError> {
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (name, p) = read_name(msg, *pos)?;
                let rtype = u16_at(msg, p)?;
                let class = u16_at(msg, p + 2)?;
                let ttl = u32_at(msg, p + 4)?;
                let rdlen = u16_at(msg, p + 8)? as usize;
                let start = p + 10;
                let raw = msg
                    .get(start..start + rdlen)
                    .ok_or(WireError::Truncated(msg.len()))?;
                let rdata = expand_rdata(msg, rtype, start, raw)?;
                *pos = start + rdlen;
                v.push(Record {
                    name,
                    rtype,
                    class,
                    ttl,
                    rdata,
                });
            }
            Ok(v)
        };
        let answers = section(header.ancount, &mut pos)?;
        let authority = section(header.nscount, &mut pos)?;
        let additional = section(header.arcount, &mut pos)?;
        Ok(Self {
            header,
            questions,
            answers,
            authority,
            additional,
        })
    }

    /// Encodes the message without compression; section counts come from the vectors.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = self.header;
        h.qdcount = self.questions.len() as u16;
        h.ancount = self.answers.len() as u16;
        h.nscount = self.authority.len() as u16;
        h.arcount = self.additional.len() as u16;
        let mut out = h.encode().to_vec();
        for q in &self.questions {
            out.extend_from_slice(&q.name);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for r in self
            .answers
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            put_rr(&mut out, &r.name, r.rtype, r.class, r.ttl, &r.rdata);
        }
        out
    }

    /// The OPT record's EDNS parameters and extended RCODE bits, if present.
    pub fn edns(&self) -> Option<(Edns, u8)> {
        self.additional
            .iter()
            .find(|r| r.rtype == rtype::OPT)
            .map(|r| {
                (
                    Edns {
                        udp_size: r.class,
                        version: (r.ttl >> 16) as u8,
                        dnssec_ok: r.ttl & 0x8000 != 0,
                    },
                    (r.ttl >> 24) as u8,
                )
            })
    }
}

/// Expands names inside the RDATA of the types whose RDATA may be compressed (RFC 3597 §4).
fn expand_rdata(msg: &[u8], rtype: u16, start: usize, raw: &[u8]) -> Result<Vec<u8>, WireError> {
    let end = start + raw.len();
    let bounded = |(v, p): (Vec<u8>, usize)| {
        if p > end {
            Err(WireError::Truncated(end))
        } else {
            Ok((v, p))
        }
    };
    match rtype {
        rtype::NS | rtype::CNAME => {
            let (n, p) = bounded(read_name(msg, start)?)?;
            if p != end {
                return Err(WireError::Truncated(end));
            }
            Ok(n)
        }
        rtype::SOA => {
            let (mname, p) = bounded(read_name(msg, start)?)?;
            let (rname, p) = bounded(read_name(msg, p)?)?;
            if end - p != 20 {
                return Err(WireError::Truncated(end));
            }
            let mut v = mname;
            v.extend_from_slice(&rname);
            v.extend_from_slice(&msg[p..end]);
            Ok(v)
        }
        rtype::SRV => {
            if raw.len() < 7 {
                return Err(WireError::Truncated(end));
            }
            let (target, p) = bounded(read_name(msg, start + 6)?)?;
            if p != end {
                return Err(WireError::Truncated(end));
            }
            let mut v = raw[..6].to_vec();
            v.extend_from_slice(&target);
            Ok(v)
        }
        _ => Ok(raw.to_vec()),
    }
}

#[cfg(test)]
mod tests;
