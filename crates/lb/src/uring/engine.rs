//! The io_uring relay's state machine, without I/O: relays (a client and a backend socket, a
//! direction each way) take the completions of their operations as [`Event`]s and ask for the
//! next operations through [`Ops`]. The driver ([`crate::uring`]) implements [`Ops`] with the
//! worker's [`sys::uring::Ring`] and feeds it the ring's completions; the tests replay event
//! sequences against a recording [`Ops`] (holo's `events.rs` against its `network.rs`).
//!
//! Per direction: at most one receive and one send in flight, at most [`QUEUE_MAX`] buffers
//! held (back-pressure: a slow reader stops the receives, not the worker), one spare buffer at
//! most when the pool is dry. EOF is passed on with a write shutdown once the queue is sent;
//! the relay ends when both directions ended (closing sends the last FIN), or on an error
//! (the client is reset when the backend failed).

use std::collections::VecDeque;
use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use super::Metrics;
use crate::relay::{End, Side, Stats};

/// Buffers one direction holds before it stops receiving (64 KiB in flight per direction).
pub const QUEUE_MAX: usize = 4;
/// Bytes a direction moves before it adds them to the shared counters.
const TALLY_FLUSH: u64 = 256 << 10;

/// The ring operations a relay asks for. `false` / `Err`: the operation could not be queued
/// (the relay is then cancelled).
pub(crate) trait Ops {
    /// A socket the ring owns.
    type Sock: Copy;
    /// A buffer a receive filled.
    type Buf: Copy;
    /// Arms a receive on `sock` into a buffer of the pool.
    fn recv(&mut self, sock: Self::Sock, token: u64) -> bool;
    /// Arms a receive on `sock` into a spare buffer (outside the pool).
    fn recv_spare(&mut self, sock: Self::Sock, token: u64) -> bool;
    /// Sends `buf[from..to]` on `sock` (`more`: with `MSG_MORE`).
    fn send(
        &mut self,
        sock: Self::Sock,
        buf: Self::Buf,
        from: usize,
        to: usize,
        more: bool,
        token: u64,
    ) -> bool;
    /// Whether `buf` is a spare.
    fn is_spare(&self, buf: Self::Buf) -> bool;
    /// Gives a buffer back (to the pool, or a spare for reuse).
    fn give_back(&mut self, buf: Self::Buf);
    /// Shuts `sock`'s write side down (passes an EOF on).
    fn shutdown_write(&mut self, sock: Self::Sock) -> io::Result<()>;
    /// Closes `sock` once nothing is in flight on it (`reset`: with a TCP reset).
    fn release(&mut self, sock: Self::Sock, reset: bool);
}

/// What one operation of a relay did.
#[derive(Debug)]
pub(crate) enum Event<B> {
    /// `len` bytes arrived in `buf`.
    Received {
        buf: B,
        len: usize,
        /// The socket holds more already (bytes or the peer's EOF).
        more: bool,
    },
    /// The peer closed its sending side.
    Eof,
    /// The pool was dry; nothing was received.
    NoBuffers,
    /// The receive failed.
    RecvFailed(io::Error),
    /// A send wrote this many bytes.
    Sent(usize),
    /// The send failed.
    SendFailed(io::Error),
}

struct Way<B> {
    /// Buffers to send: the buffer, the bytes of it left to send, and whether the socket they
    /// came from held more (see [`Engine::send`]).
    queue: VecDeque<(B, usize, usize, bool)>,
    sending: bool,
    receiving: bool,
    waiting_buffer: bool,
    eof: bool,
    /// EOF passed on (or not needed): this direction is over.
    done: bool,
    moved: u64,
    untallied: u64,
}

impl<B> Default for Way<B> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            sending: false,
            receiving: false,
            waiting_buffer: false,
            eof: false,
            done: false,
            moved: 0,
            untallied: 0,
        }
    }
}

pub(crate) struct Pair<S, B> {
    pub(crate) client: S,
    pub(crate) backend: S,
    /// 0: client → backend, 1: backend → client.
    ways: [Way<B>; 2],
    counters: [Counter; 2],
    result: Option<oneshot::Sender<(End, Stats)>>,
}

impl<S: Copy, B> Pair<S, B> {
    fn src(&self, way: usize) -> S {
        if way == 0 { self.client } else { self.backend }
    }
    fn dst(&self, way: usize) -> S {
        if way == 0 { self.backend } else { self.client }
    }
    fn stats(&self) -> Stats {
        Stats {
            to_backend: self.ways[0].moved,
            to_client: self.ways[1].moved,
        }
    }
    /// Bytes moved both ways so far.
    pub(crate) fn moved(&self) -> u64 {
        self.ways[0].moved + self.ways[1].moved
    }
}

/// A relay's place in its worker's engine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PairId {
    index: u32,
    generation: u32,
}

/// The operation token of direction `way` of relay `id`.
pub(crate) fn token(id: PairId, way: usize) -> u64 {
    (u64::from(id.generation) << 32) | (u64::from(id.index) << 1) | way as u64
}

fn untoken(t: u64) -> (PairId, usize) {
    (
        PairId {
            index: ((t & 0xffff_ffff) >> 1) as u32,
            generation: (t >> 32) as u32,
        },
        (t & 1) as usize,
    )
}

/// The slot of relay `id` in `pairs`, if `id` is its latest relay (`generations` per slot).
fn slot<'a, P>(
    pairs: &'a mut [Option<P>],
    generations: &[u32],
    id: PairId,
) -> Option<&'a mut Option<P>> {
    let index = id.index as usize;
    if generations.get(index) == Some(&id.generation) {
        pairs.get_mut(index)
    } else {
        None
    }
}

/// One worker's relays.
pub(crate) struct Engine<O: Ops> {
    pub(crate) ops: O,
    pairs: Vec<Option<Pair<O::Sock, O::Buf>>>,
    /// Per slot of `pairs`: the generation of its latest relay (a [`PairId`] of an earlier
    /// one names no relay).
    generations: Vec<u32>,
    free: Vec<u32>,
    /// Directions waiting for a buffer to come back.
    waiting: Vec<(PairId, usize)>,
    metrics: Metrics,
}

impl<O: Ops> Engine<O> {
    pub(crate) fn new(ops: O, metrics: Metrics) -> Self {
        Self {
            ops,
            pairs: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            waiting: Vec::new(),
            metrics,
        }
    }

    fn slot(&mut self, id: PairId) -> Option<&mut Option<Pair<O::Sock, O::Buf>>> {
        slot(&mut self.pairs, &self.generations, id)
    }

    /// Relay `id`, while it runs.
    pub(crate) fn pair(&mut self, id: PairId) -> Option<&mut Pair<O::Sock, O::Buf>> {
        self.slot(id).and_then(Option::as_mut)
    }

    /// Starts relaying between `client` and `backend` (both directions receive); the receiver
    /// learns how the relay ended.
    pub(crate) fn add(
        &mut self,
        client: O::Sock,
        backend: O::Sock,
        counters: [Counter; 2],
    ) -> (PairId, oneshot::Receiver<(End, Stats)>) {
        let (tx, rx) = oneshot::channel();
        let index = self.free.pop().unwrap_or_else(|| {
            self.pairs.push(None);
            self.generations.push(0);
            (self.pairs.len() - 1) as u32
        });
        let generation = self.generations[index as usize].wrapping_add(1);
        self.generations[index as usize] = generation;
        self.pairs[index as usize] = Some(Pair {
            client,
            backend,
            ways: [Way::default(), Way::default()],
            counters,
            result: Some(tx),
        });
        let id = PairId { index, generation };
        self.receive(id, 0);
        self.receive(id, 1);
        (id, rx)
    }

    /// Arms a receive for `way` unless it is receiving, ended, or holds [`QUEUE_MAX`] buffers.
    fn receive(&mut self, id: PairId, way: usize) {
        let ops = &self.ops;
        let Some(p) = slot(&mut self.pairs, &self.generations, id).and_then(Option::as_mut) else {
            return;
        };
        let w = &p.ways[way];
        // a direction that holds a spare receives again only once it sent it: one spare per
        // direction at most (its own buffer, as in a copy relay)
        let limit = if w.queue.iter().any(|&(b, ..)| ops.is_spare(b)) {
            1
        } else {
            QUEUE_MAX
        };
        if w.receiving || w.eof || w.waiting_buffer || w.queue.len() >= limit {
            return;
        }
        let src = p.src(way);
        p.ways[way].receiving = true;
        if !self.ops.recv(src, token(id, way)) {
            self.finish(id, End::Cancelled);
        }
    }

    /// Sends the head of `way`'s queue unless a send is in flight; passes EOF on when drained.
    fn send(&mut self, id: PairId, way: usize) {
        let Some(p) = self.pair(id) else { return };
        let dst = p.dst(way);
        let w = &mut p.ways[way];
        if w.sending {
            return;
        }
        if let Some(&(buf, from, to, more)) = w.queue.front() {
            w.sending = true;
            // The last bytes of a socket that holds more (often just its FIN) wait with
            // MSG_MORE: the receive armed next completes at once, and what it brings (bytes,
            // or the EOF passed on as a shutdown) leaves in the same segment.
            let more = more && w.queue.len() == 1;
            if !self.ops.send(dst, buf, from, to, more, token(id, way)) {
                self.finish(id, End::Cancelled);
            }
            return;
        }
        if w.eof && !w.done {
            w.done = true;
            let other_done = p.ways[1 - way].done;
            if other_done {
                // both directions over: closing sends the FIN (no shutdown needed)
                self.finish(id, End::Closed);
            } else if let Err(e) = self.ops.shutdown_write(dst) {
                let side = if way == 0 {
                    Side::Backend
                } else {
                    Side::Client
                };
                self.finish(id, End::Error(side, e));
            }
        }
    }

    /// Takes the completion of the operation `token` named.
    pub(crate) fn handle(&mut self, token: u64, event: Event<O::Buf>) {
        let (id, way) = untoken(token);
        let Some(p) = self.pair(id) else {
            // a relay that ended: only its buffer matters
            if let Event::Received { buf, .. } = event {
                self.ops.give_back(buf);
            }
            return;
        };
        let (src_side, dst_side) = if way == 0 {
            (Side::Client, Side::Backend)
        } else {
            (Side::Backend, Side::Client)
        };
        match event {
            Event::Received { buf, len, more } => {
                let w = &mut p.ways[way];
                w.receiving = false;
                w.queue.push_back((buf, 0, len, more));
                w.moved += len as u64;
                w.untallied += len as u64;
                if w.untallied >= TALLY_FLUSH {
                    p.counters[way].inc_by(std::mem::take(&mut w.untallied));
                }
                self.send(id, way);
                self.receive(id, way);
            }
            Event::Eof => {
                let w = &mut p.ways[way];
                w.receiving = false;
                w.eof = true;
                self.send(id, way);
            }
            Event::NoBuffers => {
                // the pool is dry: receive into a spare; only when the ring cannot make one
                // (its buffer ids ran out), wait for a buffer to come back
                let src = p.src(way);
                self.metrics.buffer_waits.inc();
                if !self.ops.recv_spare(src, token) {
                    if let Some(p) = self.pair(id) {
                        p.ways[way].receiving = false;
                        p.ways[way].waiting_buffer = true;
                    }
                    self.waiting.push((id, way));
                }
            }
            Event::RecvFailed(e) => self.finish(id, End::Error(src_side, e)),
            Event::Sent(n) => {
                let w = &mut p.ways[way];
                w.sending = false;
                let mut freed = None;
                if let Some(head) = w.queue.front_mut() {
                    head.1 += n;
                    if head.1 >= head.2 {
                        freed = Some(head.0);
                        w.queue.pop_front();
                    }
                }
                if let Some(buf) = freed {
                    self.ops.give_back(buf);
                    self.wake_waiting();
                }
                self.send(id, way);
                self.receive(id, way);
            }
            Event::SendFailed(e) => self.finish(id, End::Error(dst_side, e)),
        }
    }

    /// A buffer came back: the directions that waited for one receive again.
    fn wake_waiting(&mut self) {
        for (id, way) in std::mem::take(&mut self.waiting) {
            if let Some(p) = self.pair(id) {
                p.ways[way].waiting_buffer = false;
                self.receive(id, way);
            }
        }
    }

    /// Ends a relay: its sockets are closed once nothing is in flight on them (the client with
    /// a reset when the backend failed), its buffers come back, its caller learns how it ended.
    pub(crate) fn finish(&mut self, id: PairId, end: End) {
        let Some(mut p) = self.slot(id).and_then(Option::take) else {
            return;
        };
        self.free.push(id.index);
        let reset_client = matches!(end, End::Error(Side::Backend, _));
        self.ops.release(p.client, reset_client);
        self.ops.release(p.backend, false);
        for (way, w) in p.ways.iter_mut().enumerate() {
            for (buf, ..) in w.queue.drain(..) {
                self.ops.give_back(buf);
            }
            if w.untallied > 0 {
                p.counters[way].inc_by(w.untallied);
            }
        }
        self.wake_waiting();
        let stats = p.stats();
        if let Some(tx) = p.result.take() {
            let _ = tx.send((end, stats));
        }
    }
}

#[cfg(test)]
mod tests;
