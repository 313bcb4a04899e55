//! Conntrack deletes over `NETLINK_NETFILTER` (ctnetlink): dump the table, pick the entries
//! whose original destination is a `VIP:port` and whose reply source is a backend, and send an
//! `IPCTNL_MSG_CT_DELETE` for each with its original tuple. The kernel path uses it to cut a
//! drained backend's flows. No `unsafe`: plain netlink through socket2 (the shared plumbing is
//! `crate::netlink`). [`events`] subscribes to conntrack's event groups.
//!
//! Message layout (host byte order except where noted):
//! ```text
//! nlmsghdr  len u32 | type u16 = (NFNL_SUBSYS_CTNETLINK << 8) | msg | flags u16 | seq u32 | pid u32
//! nfgenmsg  family u8 | version u8 (0) | res_id u16 (big endian, 0)
//! nlattr    CTA_TUPLE_ORIG (nested) ─ CTA_TUPLE_IP (nested) ─ CTA_IP_V4_DST / CTA_IP_V6_DST …
//!                                   └ CTA_TUPLE_PROTO (nested) ─ CTA_PROTO_NUM u8, ports u16 (big endian)
//! ```

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netlink::{
    self, NETLINK_NETFILTER, NFNL_HEADER_LEN, NFNL_SUBSYS_CTNETLINK, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, find, find_attr, io_err,
};

pub mod events;
#[cfg(test)]
mod test_util;

const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// Most entries one delete call removes (the dump is read whole first; bounded so a huge table
/// cannot hold the caller for long).
pub const MAX_DELETES: usize = 65536;

/// Errors of conntrack requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConntrackError {
    /// The netlink socket failed (no `nf_conntrack_netlink`, or not `CAP_NET_ADMIN`).
    #[error(
        "conntrack netlink {what}: {source}; needs CAP_NET_ADMIN and the nf_conntrack_netlink module"
    )]
    Io {
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<netlink::Error> for ConntrackError {
    fn from(netlink::Error { what, source }: netlink::Error) -> Self {
        Self::Io { what, source }
    }
}

/// One connection's tuples, as far as the deletes need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Original direction destination (the VIP port the client used).
    pub orig_dst: SocketAddr,
    /// Reply direction source (the backend that answers).
    pub reply_src: SocketAddr,
    /// The raw `CTA_TUPLE_ORIG` attribute, sent back to delete the entry.
    pub orig_attr: Vec<u8>,
}

/// `(src, dst, proto, sport, dport)` of a `CTA_TUPLE_*` payload.
fn tuple(b: &[u8]) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let ip = find(b, CTA_TUPLE_IP)?;
    let v4 = |k| -> Option<IpAddr> {
        let a: [u8; 4] = find(ip, k)?.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(a)))
    };
    let v6 = |k| -> Option<IpAddr> {
        let a: [u8; 16] = find(ip, k)?.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(a)))
    };
    let (src, dst) = match (v4(CTA_IP_V4_SRC), v4(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (v6(CTA_IP_V6_SRC)?, v6(CTA_IP_V6_DST)?),
    };
    let p = find(b, CTA_TUPLE_PROTO)?;
    let proto = *find(p, CTA_PROTO_NUM)?.first()?;
    let port = |k| -> Option<u16> {
        let x = find(p, k)?;
        Some(u16::from_be_bytes([*x.first()?, *x.get(1)?]))
    };
    Some((
        src,
        dst,
        proto,
        port(CTA_PROTO_SRC_PORT).unwrap_or(0),
        port(CTA_PROTO_DST_PORT).unwrap_or(0),
    ))
}

/// Parses one read of a conntrack dump: the entries in it and whether `NLMSG_DONE` ended it.
/// Malformed messages end the parse; nothing here panics on kernel input.
pub fn parse_dump(buf: &[u8]) -> Result<(Vec<Entry>, bool), io::Error> {
    let mut out = Vec::new();
    for (kind, _, msg) in netlink::messages(buf) {
        match kind {
            NLMSG_DONE => return Ok((out, true)),
            NLMSG_ERROR => netlink::check(netlink::error_code(msg).unwrap_or(0))?,
            _ => {
                let Some(body) = msg.get(NFNL_HEADER_LEN..) else {
                    continue;
                };
                let orig = find_attr(body, CTA_TUPLE_ORIG);
                let reply = find(body, CTA_TUPLE_REPLY).and_then(tuple);
                if let (Some((payload, whole)), Some((rsrc, _, _, rsport, _))) = (orig, reply)
                    && let Some((_, odst, proto, _, odport)) = tuple(payload)
                {
                    out.push(Entry {
                        proto,
                        orig_dst: SocketAddr::new(odst, odport),
                        reply_src: SocketAddr::new(rsrc, rsport),
                        orig_attr: whole.to_vec(),
                    });
                }
            }
        }
    }
    Ok((out, false))
}

/// A ctnetlink message of type `msg` for `family` (`res_id` 0) carrying `attrs`.
fn ct_message(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    netlink::message(
        (NFNL_SUBSYS_CTNETLINK << 8) | msg,
        flags,
        seq,
        family,
        0,
        attrs,
    )
}

/// The dump request for one address family.
pub fn dump_message(family: u8, seq: u32) -> Vec<u8> {
    ct_message(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        &[],
    )
}

/// The delete request for one entry (its original tuple).
pub fn delete_message(family: u8, seq: u32, e: &Entry) -> Vec<u8> {
    ct_message(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        &e.orig_attr,
    )
}

/// Deletes every conntrack entry of protocol `proto` (6 TCP, 17 UDP) whose original
/// destination is `vip` and whose reply source is `backend`, in the calling thread's network
/// namespace; returns how many were deleted. Blocking (run it off the async threads).
pub fn delete_flows(
    proto: u8,
    vip: SocketAddr,
    backend: SocketAddr,
) -> Result<u64, ConntrackError> {
    delete_where(vip.is_ipv4(), |e| {
        e.proto == proto && e.orig_dst == vip && e.reply_src == backend
    })
}

/// Deletes every conntrack entry of one family (IPv4 when `v4`) for which `matches` holds, in
/// the calling thread's network namespace, reading the table once; returns how many were
/// deleted. Blocking (run it off the async threads).
pub fn delete_where(v4: bool, matches: impl Fn(&Entry) -> bool) -> Result<u64, ConntrackError> {
    let family = if v4 {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    let sock = netlink::open(NETLINK_NETFILTER)?;
    sock.send(&dump_message(family, 1))
        .map_err(io_err("dump request"))?;
    let mut buf = vec![0u8; 65536];
    let mut matching = Vec::new();
    loop {
        let n = io::Read::read(&mut &sock, &mut buf).map_err(io_err("dump read"))?;
        let (entries, done) = parse_dump(&buf[..n]).map_err(io_err("dump"))?;
        matching.extend(entries.into_iter().filter(&matches));
        if done || n == 0 || matching.len() >= MAX_DELETES {
            break;
        }
    }
    if matching.len() >= MAX_DELETES {
        // the rest of the dump is left unread: a fresh socket for the deletes
        return delete_each(family, &matching[..MAX_DELETES]);
    }
    drop(sock);
    delete_each(family, &matching)
}

fn delete_each(family: u8, entries: &[Entry]) -> Result<u64, ConntrackError> {
    let sock = netlink::open(NETLINK_NETFILTER)?;
    let mut deleted = 0;
    let mut buf = [0u8; 4096];
    for (i, e) in entries.iter().enumerate() {
        sock.send(&delete_message(family, i as u32 + 2, e))
            .map_err(io_err("delete request"))?;
        let n = io::Read::read(&mut &sock, &mut buf).map_err(io_err("delete ack"))?;
        match parse_dump(&buf[..n]) {
            Ok(_) => deleted += 1,
            // gone meanwhile (it timed out or closed): not an error
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(ConntrackError::Io {
                    what: "delete",
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::test_util::tuple_attr;
    use super::*;

    #[test]
    fn a_dumped_entry_is_read_and_deleted_by_its_original_tuple() {
        // client 10.0.0.2:40000 → VIP 10.9.0.1:80, DNATed to 10.0.1.1:8080 and masqueraded
        let orig = tuple_attr(CTA_TUPLE_ORIG, [10, 0, 0, 2], [10, 9, 0, 1], 40000, 80);
        let reply = tuple_attr(CTA_TUPLE_REPLY, [10, 0, 1, 1], [10, 0, 1, 254], 8080, 40000);
        let msg = ct_message(0, 0, 1, 2, &[orig.clone(), reply].concat());
        // NLMSG_DONE has no subsystem
        let done = netlink::message(NLMSG_DONE, 0, 1, 2, 0, &[]);
        let (entries, finished) = parse_dump(&[msg, done].concat()).unwrap();
        assert!(finished);
        assert_eq!(
            entries,
            vec![Entry {
                proto: 6,
                orig_dst: "10.9.0.1:80".parse().unwrap(),
                reply_src: "10.0.1.1:8080".parse().unwrap(),
                orig_attr: orig.clone(),
            }]
        );
        let del = delete_message(2, 7, &entries[0]);
        assert_eq!(&del[20..], &orig[..]);
        assert_eq!(netlink::u16_at(&del, 4), Some((1 << 8) | 2));
    }

    #[test]
    fn malformed_input_never_panics() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = parse_dump(&junk);
        }
        let mut short = ct_message(0, 0, 1, 2, &[0xff, 0xff, 0x01, 0x00]);
        short.truncate(22);
        let _ = parse_dump(&short);
    }
}
