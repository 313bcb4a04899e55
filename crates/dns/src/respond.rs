//! The request path: one query's bytes and a [`Snapshot`] in, one response's bytes out. Pure
//! (no I/O, no clock); the only shared state it touches is the round-robin counter of the
//! answer it copies.
//!
//! What it answers, in order:
//! - shorter than a header, or a response (QR set): dropped;
//! - longer than the server reads (a UDP datagram cut by the receive buffer): FORMERR (header
//!   only, see [`respond_oversized`]);
//! - opcode other than QUERY: NOTIMP; not exactly one question, a compressed or malformed
//!   question name, impossible section counts, a misplaced or second OPT: FORMERR (header only);
//! - EDNS version above 0: BADVERS (RFC 6891 §6.1.3);
//! - QCLASS other than IN, zone transfers, names outside every zone: REFUSED (AA clear);
//! - a name inside a zone: its prepared answer (AA set), NODATA with the zone's SOA for other
//!   types and empty non-terminals, NXDOMAIN with the SOA for names that do not exist, RFC 8482's
//!   HINFO for ANY.
//!
//! RD and CD are copied, RA is always clear (no recursion). The question is echoed byte for byte,
//! case included. A response larger than the UDP limit (512 without EDNS, else the requestor's
//! payload size clamped to `512..=max_udp`) is sent as header + question (+ OPT) with TC set.

use crate::snapshot::{Lookup, Snapshot};
use crate::wire::{
    self, CLASS_IN, CLASSIC_UDP, Flags, HEADER_LEN, Header, MAX_NAME_LEN, OPT_LEN, Reject, rcode,
    rtype,
};

/// The transport a query came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: responses are truncated to the payload limit.
    Udp,
    /// TCP: responses up to 65535 bytes.
    Tcp,
}

/// Limits the responder applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest UDP response this server sends and advertises in its OPT record (1232, the DNS
    /// flag day 2020 value, avoids IP fragmentation).
    pub max_udp: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_udp: 1232 }
    }
}

/// What happened to one query (for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The full (12-bit) response code.
    pub rcode: u16,
    /// Whether the response was truncated (TC set).
    pub truncated: bool,
}

/// Answers a request that was longer than the server reads (a UDP datagram cut by the receive
/// buffer; `head` is what was read): FORMERR, header only, or `None` (dropped) when even the
/// header is missing or it is a response. A cut message is never answered from its first bytes.
pub fn respond_oversized(head: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
    out.clear();
    let h = Header::decode(head).ok()?;
    if h.flags.qr {
        return None;
    }
    out.extend_from_slice(&response_header(&h, false, rcode::FORMERR, 0, 0, 0).encode());
    Some(Outcome {
        rcode: u16::from(rcode::FORMERR),
        truncated: false,
    })
}

/// Writes the response to `req` into `out` (cleared first). Returns `None` when the query is
/// to be dropped without a reply.
pub fn respond(
    snap: &Snapshot,
    req: &[u8],
    transport: Transport,
    limits: Limits,
    out: &mut Vec<u8>,
) -> Option<Outcome> {
    out.clear();
    let mut qname = [0u8; MAX_NAME_LEN];
    let r = match wire::parse_request(req, &mut qname) {
        Ok(r) => r,
        Err(Reject::Drop) => return None,
        Err(Reject::Header(h, rc)) => {
            out.extend_from_slice(&response_header(&h, false, rc, 0, 0, 0).encode());
            return Some(Outcome {
                rcode: u16::from(rc),
                truncated: false,
            });
        }
    };
    let qname = &qname[..r.qname_len];
    let question = &req[HEADER_LEN..r.question_end()];
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match r.edns {
            None => CLASSIC_UDP,
            Some(e) => usize::from(
                e.udp_size
                    .clamp(CLASSIC_UDP as u16, limits.max_udp.max(CLASSIC_UDP as u16)),
            ),
        },
    };
    let opt_len = if r.edns.is_some() { OPT_LEN } else { 0 };
    let finish = |out: &mut Vec<u8>, ext_rcode: u8| {
        if let Some(e) = r.edns {
            wire::put_opt(out, limits.max_udp, ext_rcode, e.dnssec_ok);
        }
    };

    // Header-and-question-only answers.
    let arcount = u16::from(r.edns.is_some());
    let bare = |out: &mut Vec<u8>, aa: bool, rc: u8, ext: u8| {
        let mut h = response_header(&r.header, aa, rc, 1, 0, 0);
        h.arcount = arcount;
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(question);
        finish(out, ext);
    };
    if r.edns.is_some_and(|e| e.version > 0) {
        bare(out, false, 0, 1);
        return Some(Outcome {
            rcode: rcode::BADVERS,
            truncated: false,
        });
    }
    if r.qclass != CLASS_IN || matches!(r.qtype, rtype::AXFR | rtype::IXFR) {
        bare(out, false, rcode::REFUSED, 0);
        return Some(Outcome {
            rcode: u16::from(rcode::REFUSED),
            truncated: false,
        });
    }
    if r.qtype == rtype::OPT {
        bare(out, false, rcode::FORMERR, 0);
        return Some(Outcome {
            rcode: u16::from(rcode::FORMERR),
            truncated: false,
        });
    }

    let (rc, size) = match snap.lookup(qname) {
        Lookup::Refused => {
            bare(out, false, rcode::REFUSED, 0);
            return Some(Outcome {
                rcode: u16::from(rcode::REFUSED),
                truncated: false,
            });
        }
        Lookup::NxDomain(zone, apex_at) => {
            let size = HEADER_LEN + question.len() + 2 + zone.negative_soa.len() + opt_len;
            if size <= limit {
                out.extend_from_slice(
                    &response_header(&r.header, true, rcode::NXDOMAIN, 1, 0, 1).encode(),
                );
                set_arcount(out, arcount);
                out.extend_from_slice(question);
                out.extend_from_slice(&wire::pointer(HEADER_LEN + apex_at));
                out.extend_from_slice(&zone.negative_soa);
                finish(out, 0);
                return Some(Outcome {
                    rcode: u16::from(rcode::NXDOMAIN),
                    truncated: false,
                });
            }
            (rcode::NXDOMAIN, size)
        }
        Lookup::Name(entry) => {
            let a = entry.answer(r.qtype);
            let size = HEADER_LEN + question.len() + a.body.len() + opt_len;
            if size <= limit {
                out.extend_from_slice(
                    &response_header(&r.header, true, a.rcode, 1, a.ancount, a.nscount).encode(),
                );
                set_arcount(out, arcount);
                out.extend_from_slice(question);
                a.write_body(out);
                finish(out, 0);
                return Some(Outcome {
                    rcode: u16::from(a.rcode),
                    truncated: false,
                });
            }
            (a.rcode, size)
        }
    };
    // Too large for this UDP exchange: header, question and OPT with TC; the client retries
    // over TCP (RFC 1035 §4.2.1, RFC 7766).
    debug_assert!(size > limit);
    let mut h = response_header(&r.header, true, rc, 1, 0, 0);
    h.flags.tc = true;
    h.arcount = arcount;
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(question);
    finish(out, 0);
    Some(Outcome {
        rcode: u16::from(rc),
        truncated: true,
    })
}

fn response_header(
    q: &Header,
    aa: bool,
    rc: u8,
    qdcount: u16,
    ancount: u16,
    nscount: u16,
) -> Header {
    Header {
        id: q.id,
        flags: Flags {
            qr: true,
            opcode: q.flags.opcode,
            aa,
            tc: false,
            rd: q.flags.rd,
            ra: false,
            z: false,
            ad: false,
            cd: q.flags.cd,
            rcode: rc,
        },
        qdcount,
        ancount,
        nscount,
        arcount: 0,
    }
}

fn set_arcount(out: &mut [u8], n: u16) {
    out[10..12].copy_from_slice(&n.to_be_bytes());
}

#[cfg(test)]
mod tests;
