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
//!
//! A relay can also start from the client alone ([`Engine::start`]) and connect its backend
//! on the ring ([`Engine::attach`]): the client's first bytes are received at once and held
//! until the backend is connected (their send carries the ACK of its SYN-ACK). Until the
//! backend takes a byte or sends one, the relay is *fresh*: a failed or timed-out connect, or
//! a backend that closes, resets or refuses the first bytes, detaches that backend
//! ([`Attempt::Gone`], the caller may attach another one) and keeps the client's bytes for
//! the next. The first byte either way makes it [`Attempt::Going`]; from then on a backend
//! failure ends the relay as before.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// Connects `sock` to `target`, failing with `TimedOut` after `timeout`.
    fn connect(
        &mut self,
        sock: Self::Sock,
        target: SocketAddr,
        timeout: Duration,
        token: u64,
    ) -> bool;
    /// Acknowledges at once what `sock` received (the backend's SYN-ACK when the client has
    /// nothing to send yet: a backend that speaks first is not kept waiting).
    fn quickack(&mut self, sock: Self::Sock);
}

/// How a backend attached with [`Engine::attach`] did while the relay was fresh.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// It took or sent the first byte: the relay runs.
    Going,
    /// It failed before that (connect refused or timed out, closed, reset, refused the first
    /// bytes): detached, the client and its bytes wait for another backend.
    Gone(io::Error),
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
    /// The backend's connect finished.
    Connected,
    /// The backend's connect failed or timed out.
    ConnectFailed(io::Error),
}

impl<B> Event<B> {
    /// Whether the operation was on the backend socket (direction 1 receives from it,
    /// direction 0 sends to it).
    fn on_backend(&self, way: usize) -> bool {
        match self {
            Self::Connected | Self::ConnectFailed(_) => true,
            Self::Received { .. } | Self::Eof | Self::NoBuffers | Self::RecvFailed(_) => way == 1,
            Self::Sent(_) | Self::SendFailed(_) => way == 0,
        }
    }
}

/// Where a relay's backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// None attached: the client's bytes are received and held.
    Detached,
    /// Its connect is in flight.
    Connecting,
    /// Connected; neither side passed a byte yet.
    Fresh,
    /// Relaying.
    Going,
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
    pub(crate) backend: Option<S>,
    phase: Phase,
    /// Counts the backends attached: the tokens of operations on an earlier one carry an
    /// older epoch, and their late completions are ignored.
    epoch: u8,
    /// 0: client → backend, 1: backend → client.
    ways: [Way<B>; 2],
    counters: [Counter; 2],
    /// Told how the attached backend does while the relay is fresh.
    attempt: Option<oneshot::Sender<Attempt>>,
    /// A backend failure seen while a send to it was in flight (fresh only): whether that send
    /// was taken decides if the backend is gone or the relay goes on.
    pending: Option<Event<B>>,
    result: Option<oneshot::Sender<(End, Stats)>>,
}

impl<S: Copy, B> Pair<S, B> {
    fn src(&self, way: usize) -> Option<S> {
        if way == 0 {
            Some(self.client)
        } else {
            self.backend
        }
    }
    fn dst(&self, way: usize) -> Option<S> {
        if way == 0 {
            self.backend
        } else {
            Some(self.client)
        }
    }
    /// Whether the backend is connected (direction 1 receives, direction 0 sends).
    fn connected(&self) -> bool {
        matches!(self.phase, Phase::Fresh | Phase::Going)
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

/// Relays one engine holds at most (the token has 23 bits for the slot; the node's
/// connection budget is far below it).
const PAIRS_MAX: usize = 1 << 23;

/// The operation token of direction `way` of relay `id`, on the backend of `epoch`: the
/// generation in the high 32 bits, then the slot (23), the epoch (8) and the direction.
pub(crate) fn token_of(id: PairId, way: usize, epoch: u8) -> u64 {
    (u64::from(id.generation) << 32)
        | (u64::from(id.index) << 9)
        | (u64::from(epoch) << 1)
        | way as u64
}

fn untoken(t: u64) -> (PairId, usize, u8) {
    (
        PairId {
            index: ((t & 0xffff_ffff) >> 9) as u32,
            generation: (t >> 32) as u32,
        },
        (t & 1) as usize,
        ((t >> 1) & 0xff) as u8,
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

    /// Starts relaying between `client` and a connected `backend` (both directions receive);
    /// the receiver learns how the relay ended. `None`: the engine is full (the caller closes
    /// both).
    pub(crate) fn add(
        &mut self,
        client: O::Sock,
        backend: O::Sock,
        counters: [Counter; 2],
    ) -> Option<(PairId, oneshot::Receiver<(End, Stats)>)> {
        let (id, rx) = self.insert(client, Some(backend), Phase::Going, counters)?;
        self.receive(id, 0);
        self.receive(id, 1);
        Some((id, rx))
    }

    /// Starts a relay from `client` alone: its first bytes are received and held until a
    /// backend [attached](Self::attach) is connected. `None`: the engine is full.
    pub(crate) fn start(
        &mut self,
        client: O::Sock,
    ) -> Option<(PairId, oneshot::Receiver<(End, Stats)>)> {
        let counters = [Counter::default(), Counter::default()];
        let (id, rx) = self.insert(client, None, Phase::Detached, counters)?;
        self.receive(id, 0);
        Some((id, rx))
    }

    fn insert(
        &mut self,
        client: O::Sock,
        backend: Option<O::Sock>,
        phase: Phase,
        counters: [Counter; 2],
    ) -> Option<(PairId, oneshot::Receiver<(End, Stats)>)> {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.pairs.len() < PAIRS_MAX => {
                self.pairs.push(None);
                self.generations.push(0);
                (self.pairs.len() - 1) as u32
            }
            None => return None,
        };
        let (tx, rx) = oneshot::channel();
        let generation = self.generations[index as usize].wrapping_add(1);
        self.generations[index as usize] = generation;
        self.pairs[index as usize] = Some(Pair {
            client,
            backend,
            phase,
            epoch: 0,
            ways: [Way::default(), Way::default()],
            counters,
            attempt: None,
            pending: None,
            result: Some(tx),
        });
        Some((PairId { index, generation }, rx))
    }

    /// Connects `backend` for the detached relay `id` (within `timeout`); its bytes count on
    /// `counters`. The receiver learns whether it went or is gone; it is dropped unanswered
    /// when the relay ends first (the relay's own receiver says how). `None`: `id` is not a
    /// detached relay (`backend` is closed).
    pub(crate) fn attach(
        &mut self,
        id: PairId,
        backend: O::Sock,
        target: SocketAddr,
        timeout: Duration,
        counters: [Counter; 2],
    ) -> Option<oneshot::Receiver<Attempt>> {
        let Some(p) = self.pair(id).filter(|p| p.phase == Phase::Detached) else {
            self.ops.release(backend, false);
            return None;
        };
        let (tx, rx) = oneshot::channel();
        p.backend = Some(backend);
        p.phase = Phase::Connecting;
        p.counters = counters;
        p.attempt = Some(tx);
        let t = token_of(id, 1, p.epoch);
        if !self.ops.connect(backend, target, timeout, t) {
            self.finish(id, End::Cancelled);
        }
        Some(rx)
    }

    /// The fresh relay's backend failed: it is detached (closed) and the caller told; the
    /// client's bytes wait for the next one.
    fn gone(&mut self, id: PairId, e: io::Error) {
        let Some(p) = self.pair(id) else { return };
        let backend = p.backend.take();
        p.phase = Phase::Detached;
        p.epoch = p.epoch.wrapping_add(1);
        p.pending = None;
        // the send to it that failed, if any, is over
        p.ways[0].sending = false;
        // nothing came from it: only a receive in flight, whose completion the epoch voids
        p.ways[1] = Way::default();
        let attempt = p.attempt.take();
        if let Some(b) = backend {
            self.ops.release(b, false);
        }
        if let Some(tx) = attempt {
            let _ = tx.send(Attempt::Gone(e));
        }
    }

    /// The fresh relay's backend took or sent its first byte.
    fn going(p: &mut Pair<O::Sock, O::Buf>) {
        if p.phase == Phase::Fresh {
            p.phase = Phase::Going;
            if let Some(tx) = p.attempt.take() {
                let _ = tx.send(Attempt::Going);
            }
        }
    }

    /// A fresh relay's backend closed or failed (`event`, on direction 1): gone, unless a
    /// send to it is in flight, whose completion decides.
    fn fresh_backend_failed(&mut self, id: PairId, event: Event<O::Buf>) {
        let Some(p) = self.pair(id) else { return };
        if p.ways[0].sending {
            p.pending = Some(event);
            return;
        }
        let e = match event {
            Event::RecvFailed(e) => e,
            _ => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed before its first byte",
            ),
        };
        self.gone(id, e);
    }

    /// Arms a receive for `way` unless it is receiving, ended, or holds [`QUEUE_MAX`] buffers.
    fn receive(&mut self, id: PairId, way: usize) {
        let ops = &self.ops;
        let Some(p) = slot(&mut self.pairs, &self.generations, id).and_then(Option::as_mut) else {
            return;
        };
        if way == 1 && !p.connected() {
            return;
        }
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
        let Some(src) = p.src(way) else { return };
        p.ways[way].receiving = true;
        let t = token_of(id, way, p.epoch);
        if !self.ops.recv(src, t) {
            self.finish(id, End::Cancelled);
        }
    }

    /// Sends the head of `way`'s queue unless a send is in flight; passes EOF on when drained.
    fn send(&mut self, id: PairId, way: usize) {
        let Some(p) = self.pair(id) else { return };
        // the client's bytes wait for a connected backend
        let Some(dst) = p.dst(way).filter(|_| p.connected()) else {
            return;
        };
        let t = token_of(id, way, p.epoch);
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
            if !self.ops.send(dst, buf, from, to, more, t) {
                self.finish(id, End::Cancelled);
            }
            return;
        }
        if w.eof && !w.done {
            w.done = true;
            if way == 0 {
                // the client closed without a byte: the relay goes on (the backend sees EOF)
                Self::going(p);
            }
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
        let (id, way, epoch) = untoken(token);
        let Some(p) = self
            .pair(id)
            .filter(|p| !event.on_backend(way) || p.epoch == epoch)
        else {
            // a relay that ended, or a backend it detached: only the buffer matters
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
        let fresh = p.phase == Phase::Fresh;
        match event {
            Event::Connected => {
                p.phase = Phase::Fresh;
                let w = &p.ways[0];
                let ack = if w.queue.is_empty() && !w.eof {
                    p.backend
                } else {
                    None
                };
                if let Some(b) = ack {
                    // no client bytes to carry the ACK of the SYN-ACK: send it now
                    self.ops.quickack(b);
                }
                self.send(id, 0);
                self.receive(id, 1);
            }
            Event::ConnectFailed(e) => self.gone(id, e),
            Event::Eof | Event::RecvFailed(_) if fresh && way == 1 => {
                self.fresh_backend_failed(id, event);
            }
            Event::SendFailed(e) if fresh && way == 0 => self.gone(id, e),
            Event::Received { buf, len, more } => {
                if way == 1 {
                    Self::going(p);
                }
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
                let Some(src) = p.src(way) else { return };
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
                if way == 0 && n > 0 {
                    Self::going(p);
                }
                let pending = p.pending.take();
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
                if let Some(failed) = pending {
                    // the backend failed while this send was in flight: as it took the bytes
                    // the relay goes on and passes the failure on as usual; else it is gone
                    match self.pair(id).map(|p| p.phase) {
                        Some(Phase::Going) => self.handle(token_of(id, 1, epoch), failed),
                        Some(Phase::Fresh) => self.fresh_backend_failed(id, failed),
                        _ => {}
                    }
                }
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
        if let Some(b) = p.backend {
            self.ops.release(b, false);
        }
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
