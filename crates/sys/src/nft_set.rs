//! nftables set and map element changes sent straight over `NETLINK_NETFILTER`, without nft's
//! parser: one batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DELSETELEM` / `NFT_MSG_NEWSETELEM` per
//! set, `NFNL_MSG_BATCH_END`), which the kernel applies as one transaction, all or nothing, as
//! it does a batch of `nft -f`. The kernel path sends a health change's map slots this way:
//! libnftables parses and evaluates every element and refreshes its cache first, which took
//! most of a health change's time (up to 61 ms on a loaded machine; see the `kernel` crate).
//!
//! Keys and data go as the kernel stores them (the caller encodes them: nft's types, e.g. an
//! integer key in host byte order, `ipv4_addr . inet_service` data as 4 + 4 bytes). No
//! `unsafe`: plain netlink through socket2 (the shared plumbing is `crate::netlink`), the socket
//! opened in the calling thread's network namespace.
//!
//! Message layout (host byte order except the nfgenmsg `res_id`):
//! ```text
//! nlmsghdr  len u32 | type u16 = (NFNL_SUBSYS_NFTABLES << 8) | msg | flags u16 | seq u32 | pid u32
//! nfgenmsg  family u8 | version u8 (0) | res_id u16 (big endian; NFNL_SUBSYS_NFTABLES in the batch markers)
//! nlattr    NFTA_SET_ELEM_LIST_TABLE "table\0" | NFTA_SET_ELEM_LIST_SET "set\0"
//!           NFTA_SET_ELEM_LIST_ELEMENTS (nested) ─ NFTA_LIST_ELEM (nested) ─ NFTA_SET_ELEM_KEY ─ NFTA_DATA_VALUE
//!                                                                          └ NFTA_SET_ELEM_DATA ─ NFTA_DATA_VALUE
//! ```

use std::io;

use crate::netlink::{
    self, NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
    NLMSG_ERROR, attr, end_nest, io_err, nest, push_message,
};

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// Most elements per message: a nested attribute's length is 16 bits, and an error echoes its
/// whole message back.
pub const ELEMENTS_PER_MESSAGE: usize = 256;

/// Errors of an element batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NftSetError {
    /// The netlink socket failed (not `CAP_NET_ADMIN`, no nf_tables).
    #[error("nftables netlink {what}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the batch (nothing changed): the first error it reported.
    #[error("nftables refused the element batch (set `{set}`): {source}")]
    Refused {
        /// The set of the refused message (empty: the commit itself).
        set: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

impl From<netlink::Error> for NftSetError {
    fn from(netlink::Error { what, source }: netlink::Error) -> Self {
        Self::Io { what, source }
    }
}

/// The changes of one set, its elements laid end to end (no allocation per element: the
/// kernel path's debug build spent milliseconds on that): keys deleted, and elements added
/// (key then data; no data for a plain set). Deletes go first, so a key may be in both (its
/// data replaced).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetChange {
    /// The set's name in the table.
    pub set: String,
    /// Bytes of a key.
    pub key_len: usize,
    /// Bytes of an element's data (0: a plain set).
    pub data_len: usize,
    /// Keys to delete, `key_len` bytes each.
    pub delete: Vec<u8>,
    /// Elements to add, `key_len + data_len` bytes each.
    pub add: Vec<u8>,
}

/// One element as the kernel reads it, with its key and data zeroed: (bytes, offset of the
/// key, offset of the data).
fn template(key_len: usize, data_len: usize) -> (Vec<u8>, usize, usize) {
    let mut t = Vec::new();
    let el = nest(&mut t, NFTA_LIST_ELEM);
    value(&mut t, NFTA_SET_ELEM_KEY, &vec![0; key_len]);
    let key_at = el + 12;
    let mut data_at = 0;
    if data_len > 0 {
        data_at = t.len() + 8;
        value(&mut t, NFTA_SET_ELEM_DATA, &vec![0; data_len]);
    }
    end_nest(&mut t, el);
    (t, key_at, data_at)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn value(out: &mut Vec<u8>, kind: u16, bytes: &[u8]) {
    let at = nest(out, kind);
    attr(out, NFTA_DATA_VALUE, bytes);
    end_nest(out, at);
}

/// One batch for `changes` in `table` of nft family `family` (`NFPROTO_INET` 1, …), the
/// messages numbered from `seq`; also the sequence number and set of each element message
/// (each asks for an acknowledgement).
pub fn batch(
    family: u8,
    table: &str,
    changes: &[SetChange],
    seq: u32,
) -> (Vec<u8>, Vec<(u32, String)>) {
    let mut out = Vec::new();
    let mut sent = Vec::new();
    let mut seq = seq;
    push_message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let head = |set: &str| {
        let mut b = Vec::new();
        attr(&mut b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(&mut b, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        b
    };
    for c in changes {
        let (del, key_at, _) = template(c.key_len, 0);
        if c.key_len > 0 {
            for keys in c.delete.chunks(ELEMENTS_PER_MESSAGE * c.key_len) {
                let mut b = head(&c.set);
                let list = nest(&mut b, NFTA_SET_ELEM_LIST_ELEMENTS);
                for k in keys.chunks_exact(c.key_len) {
                    let at = b.len();
                    b.extend_from_slice(&del);
                    b[at + key_at..at + key_at + c.key_len].copy_from_slice(k);
                }
                end_nest(&mut b, list);
                seq += 1;
                push_message(
                    &mut out,
                    (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    family,
                    0,
                    &b,
                );
                sent.push((seq, c.set.clone()));
            }
        }
        let (add, key_at, data_at) = template(c.key_len, c.data_len);
        let size = c.key_len + c.data_len;
        if size > 0 {
            for els in c.add.chunks(ELEMENTS_PER_MESSAGE * size) {
                let mut b = head(&c.set);
                let list = nest(&mut b, NFTA_SET_ELEM_LIST_ELEMENTS);
                for e in els.chunks_exact(size) {
                    let at = b.len();
                    b.extend_from_slice(&add);
                    b[at + key_at..at + key_at + c.key_len].copy_from_slice(&e[..c.key_len]);
                    if c.data_len > 0 {
                        b[at + data_at..at + data_at + c.data_len].copy_from_slice(&e[c.key_len..]);
                    }
                }
                end_nest(&mut b, list);
                seq += 1;
                push_message(
                    &mut out,
                    (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                    NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
                    seq,
                    family,
                    0,
                    &b,
                );
                sent.push((seq, c.set.clone()));
            }
        }
    }
    seq += 1;
    push_message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (out, sent)
}

/// The acknowledgements in one read: `(seq, errno)` of each `NLMSG_ERROR` (0: success).
/// Malformed input ends the parse; nothing here panics on kernel input.
pub fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    netlink::messages(buf)
        .filter(|(kind, _, _)| *kind == NLMSG_ERROR)
        .filter_map(|(_, _, msg)| netlink::ack(msg))
        .collect()
}

/// A `NETLINK_NETFILTER` socket for element batches, in the network namespace of the thread
/// that opened it. Keep it open: closing a socket right after a batch waits for nf_tables to
/// finish releasing that transaction (an RCU grace period: 5-32 ms measured on the loaded
/// 2-core machine), which a batch per socket paid every time.
#[derive(Debug)]
pub struct Socket {
    sock: socket2::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NftSetError> {
        let sock = netlink::open(NETLINK_NETFILTER)?;
        // an error echoes its message: room for a few of them
        let _ = sock.set_recv_buffer_size(1 << 20);
        let _ = sock.set_send_buffer_size(1 << 20);
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 1 << 17],
        })
    }

    /// Applies `changes` to `table` (nft family `family`: `NFPROTO_INET` 1, …) as one
    /// transaction. Blocking, but brief: the kernel processes the batch within the send, and
    /// the acknowledgements are then waiting (each read is bounded by 2 s).
    pub fn apply(
        &mut self,
        family: u8,
        table: &str,
        changes: &[SetChange],
    ) -> Result<(), NftSetError> {
        let first = self.seq.wrapping_add(1);
        let (msg, sent) = batch(family, table, changes, first);
        self.seq = first.wrapping_add(sent.len() as u32 + 1);
        if sent.is_empty() {
            return Ok(());
        }
        let n = self.sock.send(&msg).map_err(io_err("send"))?;
        if n != msg.len() {
            return Err(NftSetError::Io {
                what: "send",
                source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
            });
        }
        let mut waiting: std::collections::BTreeMap<u32, String> = sent.into_iter().collect();
        let mut first_error: Option<NftSetError> = None;
        while !waiting.is_empty() {
            let n = io::Read::read(&mut &self.sock, &mut self.buf)
                .map_err(io_err("acknowledgement"))?;
            if n == 0 {
                break;
            }
            for (seq, errno) in parse_acks(&self.buf[..n]) {
                // an answer to an earlier batch that gave up waiting is not this batch's
                let Some(set) = waiting
                    .remove(&seq)
                    .or_else(|| (seq == first).then(String::new))
                else {
                    continue;
                };
                if errno != 0 && first_error.is_none() {
                    first_error = Some(NftSetError::Refused {
                        set,
                        source: io::Error::from_raw_os_error(errno),
                    });
                }
                // an error on the batch itself (the commit) answers for every message
                if errno != 0 && seq == first {
                    waiting.clear();
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_framed_as_nft_frames_it() {
        let changes = [SetChange {
            set: "s0p0v4".to_string(),
            key_len: 4,
            data_len: 8,
            delete: 6u32.to_ne_bytes().to_vec(),
            add: [&5u32.to_ne_bytes()[..], &[10, 78, 1, 2, 0x1f, 0x90, 0, 0]].concat(),
        }];
        let (b, sent) = batch(1, "portico", &changes, 1);
        assert_eq!(
            sent,
            vec![(2, "s0p0v4".to_string()), (3, "s0p0v4".to_string())]
        );
        // batch begin: 20 bytes, type 16, res_id NFNL_SUBSYS_NFTABLES big endian
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 16);
        assert_eq!(&b[16..20], &[0, 0, 0, 10]);
        // the delete: (10 << 8) | 14, family inet
        let del = &b[20..];
        assert_eq!(u16::from_ne_bytes([del[4], del[5]]), (10 << 8) | 14);
        assert_eq!(del[16], 1);
        // the add carries what `nft --debug=mnl add element inet portico s0p0v4
        // '{ 5 : 10.78.1.2 . 8080 }'` sends: key 05 00 00 00, data 0a 4e 01 02 1f 90 00 00
        let dlen = u32::from_ne_bytes(del[0..4].try_into().unwrap()) as usize;
        let add = &del[dlen..];
        assert_eq!(u16::from_ne_bytes([add[4], add[5]]), (10 << 8) | 12);
        let body = &add[20..u32::from_ne_bytes(add[0..4].try_into().unwrap()) as usize];
        let want: &[u8] = &[
            12, 0, 1, 0, b'p', b'o', b'r', b't', b'i', b'c', b'o', 0, // table
            11, 0, 2, 0, b's', b'0', b'p', b'0', b'v', b'4', 0, 0, // set
            36, 0, 3, 0x80, // elements
            32, 0, 1, 0x80, // one element
            12, 0, 1, 0x80, 8, 0, 1, 0, 5, 0, 0, 0, // key
            16, 0, 2, 0x80, 12, 0, 1, 0, 10, 78, 1, 2, 0x1f, 0x90, 0, 0, // data
        ];
        // lengths and types are host byte order: the bytes above are a little-endian host's
        if cfg!(target_endian = "little") {
            assert_eq!(body, want);
        }
        // batch end last
        let end = &b[b.len() - 20..];
        assert_eq!(u16::from_ne_bytes([end[4], end[5]]), 17);
    }

    #[test]
    fn acks_are_read_and_malformed_input_never_panics() {
        let mut ack = Vec::new();
        push_message(&mut ack, NLMSG_ERROR, 0, 9, 0, 0, &[]);
        // code, then the request's header (16 bytes)
        ack.truncate(16);
        ack.extend_from_slice(&(-17i32).to_ne_bytes());
        let mut req = Vec::new();
        push_message(&mut req, 0, 0, 7, 0, 0, &[]);
        ack.extend_from_slice(&req[..16]);
        let len = ack.len() as u32;
        ack[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_acks(&ack), vec![(7, 17)]);
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = parse_acks(&junk);
        }
    }
}
