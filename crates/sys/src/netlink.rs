//! Netlink plumbing shared by `conntrack` (dump and delete), `conntrack::events` (the event
//! subscription), `nft_set` (element batches) and the crate root's address requests: the
//! constants, `nlmsghdr` / `nfgenmsg` building, attributes (push, nest, walk), the reading of
//! acknowledgements and errors, the sockets, and the tokio registration and receive loop that
//! the event socket and [`crate::PacketSocket`] share.
//!
//! Host byte order throughout (as netlink is), except the `nfgenmsg` `res_id` (big endian).
//! Nothing here panics on kernel input: the walks stop at the first malformed message or
//! attribute.
//!
//! ```text
//! nlmsghdr  len u32 | type u16 | flags u16 | seq u32 | pid u32
//! nfgenmsg  family u8 | version u8 (0) | res_id u16 (big endian)      (nfnetlink only)
//! nlattr    len u16 | type u16 (NLA_F_NESTED: attributes follow) | payload, padded to 4
//! ```

use std::io;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

/// The nfnetlink protocol (ctnetlink, nf_tables).
pub(crate) const NETLINK_NETFILTER: i32 = 12;
/// The ctnetlink subsystem (the high byte of its message types).
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// The nf_tables subsystem.
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Bytes of `nlmsghdr`.
const HEADER_LEN: usize = 16;
/// Bytes of `nlmsghdr` and `nfgenmsg`: where an nfnetlink message's attributes start.
pub(crate) const NFNL_HEADER_LEN: usize = 20;

/// A netlink step that failed; each module's error enum takes it in as its `Io` variant
/// (`From`), with the same step name and cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(crate) struct Error {
    /// Which step.
    pub(crate) what: &'static str,
    /// The cause.
    #[source]
    pub(crate) source: io::Error,
}

/// Names the step of an I/O error: `.map_err(io_err("send"))`.
pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error { what, source }
}

pub(crate) fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]))
}

pub(crate) fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    b.get(i..i + 4)
        .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
}

/// Starts a message: appends an `nlmsghdr` whose length [`finish`] writes; returns where it
/// starts.
pub(crate) fn begin(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    at
}

/// Ends the message [`begin`] started at `at`: writes its length.
pub(crate) fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends one nfnetlink message: `nlmsghdr`, `nfgenmsg`, `body`.
pub(crate) fn push_message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) {
    let at = begin(out, kind, flags, seq);
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
    finish(out, at);
}

/// One nfnetlink message: `nlmsghdr`, `nfgenmsg`, `body`.
pub(crate) fn message(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(NFNL_HEADER_LEN + body.len());
    push_message(&mut m, kind, flags, seq, family, res_id, body);
    m
}

/// Appends one attribute, padded to 4 bytes.
pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Starts a nested attribute; [`end_nest`] writes its length.
pub(crate) fn nest(out: &mut Vec<u8>, kind: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

/// Ends the nested attribute [`nest`] started at `at`.
pub(crate) fn end_nest(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Iterates `(type, payload, whole attribute)` over attributes, the type as sent (flags
/// included); stops at malformed ones.
pub(crate) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let kind = u16_at(b, 2)?;
        if len < 4 || len > b.len() {
            return None;
        }
        let whole = &b[..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, &whole[4..], whole))
    })
}

/// The payload and the whole of the first attribute of type `kind` (its flags ignored).
pub(crate) fn find_attr(b: &[u8], kind: u16) -> Option<(&[u8], &[u8])> {
    attrs(b)
        .find(|(k, _, _)| *k & NLA_TYPE_MASK == kind)
        .map(|(_, p, whole)| (p, whole))
}

/// The payload of the first attribute of type `kind` (its flags ignored).
pub(crate) fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    find_attr(b, kind).map(|(p, _)| p)
}

/// The messages of one read, `(type, flags, message)` each (header included); stops at the
/// first malformed one (shorter than a header, or longer than the read), which
/// [`Messages::rest`] then holds.
pub(crate) fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

/// See [`messages`].
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    /// What is left unread: empty when every message was whole.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = (u16, u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.rest;
        if b.len() < HEADER_LEN {
            return None;
        }
        let len = u32_at(b, 0)? as usize;
        if len < HEADER_LEN || len > b.len() {
            return None;
        }
        let (kind, flags) = (u16_at(b, 4)?, u16_at(b, 6)?);
        self.rest = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, flags, &b[..len]))
    }
}

/// The errno of an `NLMSG_ERROR` message (0: an acknowledgement); `None` when it is too short
/// to hold its code. The kernel sends `-errno`; a code whose negation does not fit (`i32::MIN`,
/// only from a broken sender) saturates instead of overflowing.
pub(crate) fn error_code(msg: &[u8]) -> Option<i32> {
    u32_at(msg, HEADER_LEN).map(|code| (code as i32).saturating_neg())
}

/// `(seq, errno)` of an acknowledgement: an `NLMSG_ERROR` message echoes the request's header
/// after its code, the request's sequence number at 20 + 8.
pub(crate) fn ack(msg: &[u8]) -> Option<(u32, i32)> {
    if msg.len() < HEADER_LEN + 4 + HEADER_LEN {
        return None;
    }
    Some((u32_at(msg, 28)?, error_code(msg)?))
}

/// An errno as a result: 0 is success.
pub(crate) fn check(errno: i32) -> io::Result<()> {
    match errno {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A netlink socket of `protocol` in the calling thread's network namespace.
pub(crate) fn socket(protocol: i32) -> Result<Socket, Error> {
    Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(protocol)),
    )
    .map_err(io_err("socket"))
}

/// A blocking netlink socket of `protocol` (`NETLINK_NETFILTER`, `NETLINK_ROUTE`) in the
/// calling thread's network namespace, each read bounded by 2 s.
pub(crate) fn open(protocol: i32) -> Result<Socket, Error> {
    let sock = socket(protocol)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .map_err(io_err("timeout"))?;
    Ok(sock)
}

/// A netlink socket of `protocol` subscribed to the multicast `groups` (a bind mask), asking
/// for a receive buffer of `rcvbuf` bytes (forced past `rmem_max` when allowed), non-blocking
/// and registered with tokio ([`register`]).
pub(crate) fn subscribe(
    protocol: i32,
    groups: u32,
    rcvbuf: usize,
) -> Result<AsyncFd<Socket>, Error> {
    let sock = socket(protocol)?;
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, rcvbuf).is_err() {
        sock.set_recv_buffer_size(rcvbuf)
            .map_err(io_err("receive buffer"))?;
    }
    rustix::net::bind(
        &sock,
        &rustix::net::netlink::SocketAddrNetlink::new(0, groups),
    )
    .map_err(|e| Error {
        what: "subscribe to events",
        source: e.into(),
    })?;
    register(sock)
}

/// Makes `sock` non-blocking and registers it with tokio (needs a runtime).
pub(crate) fn register(sock: Socket) -> Result<AsyncFd<Socket>, Error> {
    sock.set_nonblocking(true)
        .map_err(io_err("set non-blocking"))?;
    #[allow(unsafe_code)]
    // SAFETY: `sock` is an open socket owned by the `AsyncFd` from here on; `Socket`'s
    // `as_raw_fd` always returns that same descriptor until it is dropped with the `AsyncFd`.
    unsafe { AsyncFd::register(sock) }.map_err(|e| Error {
        what: "register with tokio",
        source: io::Error::from(e),
    })
}

/// Reads once from a registered socket, waiting until it is readable.
pub(crate) async fn recv(fd: &AsyncFd<Socket>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // socket2's recv wants MaybeUninit; a `&mut [u8]` read through std's Read is the same.
        match guard.try_io(|s| io::Read::read(&mut s.get_ref(), buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip_and_stop_at_malformed_ones() {
        let mut body = Vec::new();
        attr(&mut body, 1, b"abc");
        let at = nest(&mut body, 2);
        attr(&mut body, 3, &7u32.to_ne_bytes());
        end_nest(&mut body, at);
        let m = [message(0x101, 0x200, 5, 2, 0, &body), vec![1, 2, 3]].concat();
        let mut it = messages(&m);
        let (kind, flags, msg) = it.next().unwrap();
        assert_eq!((kind, flags, msg.len()), (0x101, 0x200, 20 + 8 + 12));
        assert!(it.next().is_none());
        assert_eq!(it.rest(), &[1, 2, 3]);
        let body = &msg[NFNL_HEADER_LEN..];
        assert_eq!(find(body, 1), Some(&b"abc"[..]));
        let (nested, whole) = find_attr(body, 2).unwrap();
        assert_eq!(whole.len(), 12);
        assert_eq!(find(nested, 3), Some(&7u32.to_ne_bytes()[..]));
        assert_eq!(attrs(&body[..8]).count(), 1);
    }

    #[test]
    fn acks_carry_the_request_seq_and_errno() {
        let req = message(0, 0, 7, 0, 0, &[]);
        let mut m = Vec::new();
        let at = begin(&mut m, NLMSG_ERROR, 0, 9);
        m.extend_from_slice(&(-17i32).to_ne_bytes());
        m.extend_from_slice(&req[..16]);
        finish(&mut m, at);
        assert_eq!(ack(&m), Some((7, 17)));
        assert_eq!(ack(&m[..35]), None);
        assert_eq!(error_code(&m), Some(17));
        // a code no kernel sends must not overflow the negation (debug builds would panic)
        let mut odd = m.clone();
        odd[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(error_code(&odd), Some(i32::MAX));
        assert_eq!(check(17).unwrap_err().raw_os_error(), Some(17));
        assert!(check(0).is_ok());
    }
}
