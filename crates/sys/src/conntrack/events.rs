//! Conntrack events over `NETLINK_NETFILTER` (ctnetlink multicast groups
//! `NFNLGRP_CONNTRACK_NEW`, `_UPDATE` and `_DESTROY`): a pure decoder of event messages
//! ([`parse_events`], untrusted bytes, never panics) and the subscribed socket
//! ([`EventSocket`], driven by tokio; opened, registered and read through `crate::netlink`).
//! The kernel path reads them to see the outcome of each flow it DNATs (passive outlier
//! detection); see `kernel::passive`.
//!
//! An event is an `IPCTNL_MSG_CT_NEW` message (flags `NLM_F_CREATE | NLM_F_EXCL` for a new
//! entry, none for an update) or an `IPCTNL_MSG_CT_DELETE` (the entry was destroyed), with the
//! entry's attributes:
//! ```text
//! nlmsghdr | nfgenmsg | CTA_TUPLE_ORIG | CTA_TUPLE_REPLY | CTA_STATUS u32 (big endian)
//!          | CTA_PROTOINFO ─ CTA_PROTOINFO_TCP ─ CTA_PROTOINFO_TCP_STATE u8 | CTA_ID u32 (BE) …
//! ```
//! When the socket's receive buffer overflows the kernel drops events and the next read fails
//! with `ENOBUFS` (an *overrun*); the socket stays usable.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;
use tokio::io::unix::AsyncFd;

use super::{
    CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, ConntrackError, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW, tuple,
};
use crate::netlink::{
    self, NETLINK_NETFILTER, NFNL_HEADER_LEN, NFNL_SUBSYS_CTNETLINK, NLM_F_CREATE, NLMSG_ERROR,
    find,
};

const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_ID: u16 = 12;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// `NFNLGRP_CONNTRACK_NEW` (1), `_UPDATE` (2) and `_DESTROY` (3) as a bind mask.
const GROUPS: u32 = 0b111;

/// Conntrack status bit: a packet was seen in the reply direction (`IPS_SEEN_REPLY`).
pub const STATUS_SEEN_REPLY: u32 = 1 << 1;
/// Conntrack status bit: the entry is assured (`IPS_ASSURED`).
pub const STATUS_ASSURED: u32 = 1 << 2;

/// What happened to a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new entry was confirmed (the flow's first packet passed).
    New,
    /// An entry changed (TCP state, status, …).
    Update,
    /// The entry was destroyed (timed out, closed, or deleted).
    Destroy,
}

/// Conntrack's TCP states (`enum tcp_conntrack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// No state.
    None,
    /// SYN seen, no answer yet.
    SynSent,
    /// SYN/ACK seen.
    SynRecv,
    /// Handshake complete.
    Established,
    /// FIN seen.
    FinWait,
    /// FIN seen the other way.
    CloseWait,
    /// Last ACK awaited.
    LastAck,
    /// Closed cleanly.
    TimeWait,
    /// Closed (RST, or after the close timers).
    Close,
    /// Simultaneous open.
    SynSent2,
    /// A value this decoder does not know.
    Other(u8),
}

impl TcpState {
    /// The state of conntrack's number.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::None,
            1 => Self::SynSent,
            2 => Self::SynRecv,
            3 => Self::Established,
            4 => Self::FinWait,
            5 => Self::CloseWait,
            6 => Self::LastAck,
            7 => Self::TimeWait,
            8 => Self::Close,
            9 => Self::SynSent2,
            n => Self::Other(n),
        }
    }

    /// Whether the backend answered the SYN (SYN/ACK seen, or any state after the handshake).
    pub fn answered(self) -> bool {
        matches!(
            self,
            Self::SynRecv
                | Self::Established
                | Self::FinWait
                | Self::CloseWait
                | Self::LastAck
                | Self::TimeWait
        )
    }
}

/// One decoded conntrack event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// New, update or destroy.
    pub kind: EventKind,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Original direction source (the client).
    pub orig_src: SocketAddr,
    /// Original direction destination (the `VIP:port` the client used).
    pub orig_dst: SocketAddr,
    /// Reply direction source (the backend the flow was DNATed to).
    pub reply_src: SocketAddr,
    /// Conntrack status bits (`IPS_*`), when the event carries them.
    pub status: Option<u32>,
    /// The TCP state, when the event carries it.
    pub tcp_state: Option<TcpState>,
    /// The entry's id, when the event carries it.
    pub id: Option<u32>,
}

/// Decodes every event message in one read of the event socket into `out`; returns how many
/// messages were malformed (skipped). Untrusted bytes: nothing here panics, and a message
/// whose length is wrong ends the read.
pub fn parse_events(buf: &[u8], out: &mut Vec<Event>) -> usize {
    let mut malformed = 0;
    let mut messages = netlink::messages(buf);
    for (kind, flags, msg) in messages.by_ref() {
        if kind == NLMSG_ERROR || kind >> 8 != NFNL_SUBSYS_CTNETLINK {
            continue;
        }
        let ev = match kind & 0xff {
            IPCTNL_MSG_CT_NEW if flags & NLM_F_CREATE != 0 => EventKind::New,
            IPCTNL_MSG_CT_NEW => EventKind::Update,
            IPCTNL_MSG_CT_DELETE => EventKind::Destroy,
            _ => continue,
        };
        match decode(ev, msg.get(NFNL_HEADER_LEN..).unwrap_or_default()) {
            Some(e) => out.push(e),
            None => malformed += 1,
        }
    }
    // a message whose length is wrong (or a piece shorter than a header) ended the read
    malformed + usize::from(!messages.rest().is_empty())
}

/// One message's attributes (after `nlmsghdr` and `nfgenmsg`).
fn decode(kind: EventKind, body: &[u8]) -> Option<Event> {
    let (osrc, odst, proto, osport, odport) = tuple(find(body, CTA_TUPLE_ORIG)?)?;
    let (rsrc, _, _, rsport, _) = tuple(find(body, CTA_TUPLE_REPLY)?)?;
    let be32 = |k| -> Option<u32> {
        let x = find(body, k)?;
        Some(u32::from_be_bytes(x.get(..4)?.try_into().ok()?))
    };
    let tcp_state = find(body, CTA_PROTOINFO)
        .and_then(|p| find(p, CTA_PROTOINFO_TCP))
        .and_then(|t| find(t, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first())
        .map(|&s| TcpState::from_u8(s));
    Some(Event {
        kind,
        proto,
        orig_src: SocketAddr::new(osrc, osport),
        orig_dst: SocketAddr::new(odst, odport),
        reply_src: SocketAddr::new(rsrc, rsport),
        status: be32(CTA_STATUS),
        tcp_state,
        id: be32(CTA_ID),
    })
}

/// A netlink socket subscribed to the conntrack event groups of the network namespace it was
/// opened in (the calling thread's).
#[derive(Debug)]
pub struct EventSocket {
    fd: AsyncFd<Socket>,
}

impl EventSocket {
    /// Opens the socket in the calling thread's network namespace and subscribes it; asks for a
    /// receive buffer of `rcvbuf` bytes (forced past `rmem_max` when allowed). Needs
    /// `CAP_NET_ADMIN` and a tokio runtime.
    pub fn subscribe(rcvbuf: usize) -> Result<Self, ConntrackError> {
        let fd = netlink::subscribe(NETLINK_NETFILTER, GROUPS, rcvbuf)?;
        Ok(Self { fd })
    }

    /// Waits until events are readable, then hands every read that is ready now (at most
    /// `max_reads`) to `each` without waiting again: the bytes read, or an overrun error
    /// ([`is_overrun`]). Other errors end the call. A reader that calls this, then sleeps a
    /// little, wakes once per batch rather than once per event.
    pub async fn recv_batch(
        &self,
        buf: &mut [u8],
        max_reads: usize,
        mut each: impl FnMut(Result<&[u8], io::Error>),
    ) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        for _ in 0..max_reads {
            match guard.try_io(|s| io::Read::read(&mut s.get_ref(), buf)) {
                Ok(Ok(n)) => each(Ok(&buf[..n])),
                Ok(Err(e)) if is_overrun(&e) => each(Err(e)),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Receives one read of events (one or more messages). An overrun comes back as an error
    /// with `raw_os_error() == Some(libc::ENOBUFS)`; the socket stays usable.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        netlink::recv(&self.fd, buf).await
    }
}

/// Whether a [`EventSocket::recv`] error is an overrun (`ENOBUFS`: the kernel dropped events
/// because the receive buffer was full); the socket stays usable.
pub fn is_overrun(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS)
}

#[cfg(test)]
mod tests;
