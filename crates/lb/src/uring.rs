//! The relay on an io_uring (`proxy.io: uring`): once a connection has proved long-lived (the
//! tokio relay passed [`PROMOTE_AFTER`] messages on, holds no byte and does not splice, see
//! [`crate::relay::relay`]), both sockets leave tokio for the ring of the proxy worker thread
//! that serves them, and every receive and send after that is an entry in that ring. Moving
//! costs two `epoll_ctl` removals and a submit: a one-request connection would not earn them
//! back (measured: 1.05-1.20× HAProxy's CPU per request when every connection moved at once),
//! and a bulk one keeps `splice`. One `io_uring_enter` per turn of the worker's loop carries
//! all the sends and receives the turn queued, instead of one `recvfrom` and one `sendto` per
//! message.
//!
//! * One ring per proxy worker thread ([`crate::worker`]), made on its first relay, driven by a
//!   task of that worker's runtime that waits for the ring's fd to be readable (completions
//!   posted), handles every completion, and submits what they queued. A thread that is not a
//!   proxy worker, or whose ring cannot be made (io_uring disabled by `kernel.io_uring_disabled`
//!   or a seccomp profile), relays with [`crate::relay`] instead (logged once per thread,
//!   counted in `portico_lb_uring_fallbacks`).
//! * Receives land in 16 KiB buffers the kernel picks from the ring's pool (an idle connection
//!   holds none); a direction whose peer is slow stops receiving while it holds
//!   [`QUEUE_MAX`] buffers (back-pressure). One that finds the pool empty
//!   (`portico_lb_uring_buffer_waits`) receives into a spare buffer of the ring's instead, so
//!   slow peers that hold the pool never stall the other relays.
//! * The same contract as [`crate::relay::relay`]: EOF shuts the other socket's write side
//!   down (half-close both ways), the relay ends when both directions ended, on an error (the
//!   client gets a reset when the backend failed), after `idle` without a byte, or on cancel;
//!   bytes feed the backend's counters; keepalive on the backend socket once the relay has
//!   lived [`crate::relay::KEEPALIVE_AFTER`]. On the ring bytes are copied through the
//!   buffers (no `splice`); a transfer that fills its buffer before the hand-over splices on
//!   tokio instead and never moves.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use prometheus_client::metrics::counter::Counter;
use sys::uring::{BufId, Completion, Done, Ring, Sock};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::relay::{Counters, End, Side, Stats};

/// Messages (reads passed on, both ways) the tokio relay moves before it hands a connection
/// to the ring: a request and its response per round trip, so the fourth round trip of a
/// keep-alive connection moves it; a one-request connection never does.
pub const PROMOTE_AFTER: u32 = 8;
/// Buffers in one worker's pool by default (16 MiB).
pub const BUFFERS: u16 = 1024;
/// Bytes per buffer (HAProxy's default `tune.bufsize`).
const BUFFER_SIZE: u32 = 16 << 10;
/// Buffers one direction holds before it stops receiving (64 KiB in flight per direction).
pub const QUEUE_MAX: usize = 4;
/// Bytes a direction moves before it adds them to the shared counters.
const TALLY_FLUSH: u64 = 256 << 10;

thread_local! {
    static WORKER: Cell<bool> = const { Cell::new(false) };
    static ENGINE: RefCell<Local> = const { RefCell::new(Local::Unmade) };
}

/// Marks the current thread as a proxy worker (its runtime is single-threaded, so a ring in a
/// thread-local is only ever touched from it).
pub(crate) fn mark_worker_thread() {
    WORKER.with(|w| w.set(true));
}

/// The io_uring relay's counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Connections relayed on a ring.
    pub relays: Counter,
    /// Connections that asked for the ring and were relayed by tokio instead.
    pub fallbacks: Counter,
    /// Times a direction found every buffer of its worker's pool in use and waited.
    pub buffer_waits: Counter,
}

enum Local {
    Unmade,
    Unavailable,
    Ready(Box<Engine>),
}

#[derive(Default)]
struct Way {
    queue: VecDeque<(BufId, usize, usize)>,
    sending: bool,
    receiving: bool,
    waiting_buffer: bool,
    eof: bool,
    /// EOF passed on (or not needed): this direction is over.
    done: bool,
    moved: u64,
    untallied: u64,
}

struct Pair {
    client: Sock,
    backend: Sock,
    /// 0: client → backend, 1: backend → client.
    ways: [Way; 2],
    counters: [Counter; 2],
    result: Option<oneshot::Sender<(End, Stats)>>,
}

impl Pair {
    fn src(&self, way: usize) -> Sock {
        if way == 0 { self.client } else { self.backend }
    }
    fn dst(&self, way: usize) -> Sock {
        if way == 0 { self.backend } else { self.client }
    }
    fn stats(&self) -> Stats {
        Stats {
            to_backend: self.ways[0].moved,
            to_client: self.ways[1].moved,
        }
    }
}

/// A relay's place in its worker's engine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct PairId {
    index: u32,
    generation: u32,
}

struct Engine {
    ring: Ring,
    pairs: Vec<Option<Pair>>,
    /// Per slot of `pairs`: the generation of its latest relay (a [`PairId`] of an earlier
    /// one names no relay).
    generations: Vec<u32>,
    free: Vec<u32>,
    /// Directions waiting for a buffer to come back.
    waiting: Vec<(PairId, usize)>,
    completions: Vec<Completion>,
    metrics: Metrics,
}

fn token(id: PairId, way: usize) -> u64 {
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
fn slot<'a>(
    pairs: &'a mut [Option<Pair>],
    generations: &[u32],
    id: PairId,
) -> Option<&'a mut Option<Pair>> {
    let index = id.index as usize;
    if generations.get(index) == Some(&id.generation) {
        pairs.get_mut(index)
    } else {
        None
    }
}

impl Engine {
    fn slot(&mut self, id: PairId) -> Option<&mut Option<Pair>> {
        slot(&mut self.pairs, &self.generations, id)
    }

    fn pair(&mut self, id: PairId) -> Option<&mut Pair> {
        self.slot(id).and_then(Option::as_mut)
    }

    fn add(
        &mut self,
        client: OwnedFd,
        backend: OwnedFd,
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
        let pair = Pair {
            client: self.ring.adopt(client),
            backend: self.ring.adopt(backend),
            ways: [Way::default(), Way::default()],
            counters,
            result: Some(tx),
        };
        self.pairs[index as usize] = Some(pair);
        let id = PairId { index, generation };
        self.receive(id, 0);
        self.receive(id, 1);
        (id, rx)
    }

    /// Arms a receive for `way` unless it is receiving, ended, or holds [`QUEUE_MAX`] buffers.
    fn receive(&mut self, id: PairId, way: usize) {
        let ring = &self.ring;
        let Some(p) = slot(&mut self.pairs, &self.generations, id).and_then(Option::as_mut) else {
            return;
        };
        let w = &p.ways[way];
        // a direction that holds a spare receives again only once it sent it: one spare per
        // direction at most (its own buffer, as in a copy relay)
        let limit = if w.queue.iter().any(|&(b, _, _)| ring.is_spare(b)) {
            1
        } else {
            QUEUE_MAX
        };
        if w.receiving || w.eof || w.waiting_buffer || w.queue.len() >= limit {
            return;
        }
        let src = p.src(way);
        p.ways[way].receiving = true;
        if !self.ring.recv(src, token(id, way)) {
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
        if let Some(&(buf, from, to)) = w.queue.front() {
            w.sending = true;
            if !self.ring.send(dst, buf, from, to, token(id, way)) {
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
            } else if let Err(e) = self.ring.shutdown_write(dst) {
                let side = if way == 0 {
                    Side::Backend
                } else {
                    Side::Client
                };
                self.finish(id, End::Error(side, e));
            }
        }
    }

    fn handle(&mut self, c: Completion) {
        let (id, way) = untoken(c.token);
        let Some(p) = self.pair(id) else {
            if let Done::Received { buf, .. } = c.done {
                self.ring.give_back(buf);
            }
            return;
        };
        let (src_side, dst_side) = if way == 0 {
            (Side::Client, Side::Backend)
        } else {
            (Side::Backend, Side::Client)
        };
        match c.done {
            Done::Received { buf, len } => {
                let w = &mut p.ways[way];
                w.receiving = false;
                w.queue.push_back((buf, 0, len));
                w.moved += len as u64;
                w.untallied += len as u64;
                if w.untallied >= TALLY_FLUSH {
                    p.counters[way].inc_by(std::mem::take(&mut w.untallied));
                }
                self.send(id, way);
                self.receive(id, way);
            }
            Done::Eof => {
                let w = &mut p.ways[way];
                w.receiving = false;
                w.eof = true;
                self.send(id, way);
            }
            Done::NoBuffers => {
                // the pool is dry: receive into a spare; only when the ring cannot make one
                // (its buffer ids ran out), wait for a buffer to come back
                let src = p.src(way);
                self.metrics.buffer_waits.inc();
                if !self.ring.recv_spare(src, c.token) {
                    if let Some(p) = self.pair(id) {
                        p.ways[way].receiving = false;
                        p.ways[way].waiting_buffer = true;
                    }
                    self.waiting.push((id, way));
                }
            }
            Done::RecvFailed(e) => self.finish(id, End::Error(src_side, e)),
            Done::Sent(n) => {
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
                    self.ring.give_back(buf);
                    self.wake_waiting();
                }
                self.send(id, way);
                self.receive(id, way);
            }
            Done::SendFailed(e) => self.finish(id, End::Error(dst_side, e)),
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
    fn finish(&mut self, id: PairId, end: End) {
        let Some(mut p) = self.slot(id).and_then(Option::take) else {
            return;
        };
        self.free.push(id.index);
        let reset_client = matches!(end, End::Error(Side::Backend, _));
        self.ring.release(p.client, reset_client);
        self.ring.release(p.backend, false);
        for (way, w) in p.ways.iter_mut().enumerate() {
            for (buf, _, _) in w.queue.drain(..) {
                self.ring.give_back(buf);
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

    /// Handles every posted completion, submits what that queued, and goes on while the
    /// submission itself completed more (sends to a socket with room complete inside
    /// `io_uring_enter`): one wake-up of the worker serves them all, at most [`TURN_ROUNDS`]
    /// rounds so the worker's other tasks (accepts) still run.
    fn turn(&mut self) {
        for _ in 0..TURN_ROUNDS {
            let mut batch = std::mem::take(&mut self.completions);
            self.ring.complete(&mut batch);
            let handled = batch.len();
            for c in batch.drain(..) {
                self.handle(c);
            }
            self.completions = batch;
            if self.ring.queued() == 0 {
                if handled == 0 {
                    return;
                }
                continue;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed; retried on the next turn");
                return;
            }
        }
        if self.ring.queued() > 0 {
            let _ = self.ring.submit();
        }
    }
}

/// Rounds of complete-and-submit one wake-up of the worker's ring task runs at most.
const TURN_ROUNDS: usize = 8;

/// Drives this worker's ring: each time completions are posted, handles them all and submits.
async fn drive(completions: sys::uring::Completions) {
    while completions.posted().await.is_ok() {
        ENGINE.with_borrow_mut(|l| {
            if let Local::Ready(e) = l {
                e.turn();
            }
        });
    }
}

/// Makes this thread's engine on first use (with `buffers` in its pool; the first relay's
/// count holds for the thread's life). `false`: relay with tokio.
fn ensure_engine(metrics: &Metrics, buffers: u16) -> bool {
    if !WORKER.with(Cell::get) {
        return false;
    }
    ENGINE.with_borrow_mut(|l| match l {
        Local::Ready(_) => true,
        Local::Unavailable => false,
        Local::Unmade => match Ring::new(buffers, BUFFER_SIZE) {
            Ok(ring) => {
                let completions = match sys::uring::Completions::new(&ring) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, reason = "uringUnavailable", "cannot poll this worker's io_uring; it relays with tokio");
                        *l = Local::Unavailable;
                        return false;
                    }
                };
                *l = Local::Ready(Box::new(Engine {
                    ring,
                    pairs: Vec::new(),
                    generations: Vec::new(),
                    free: Vec::new(),
                    waiting: Vec::new(),
                    completions: Vec::new(),
                    metrics: metrics.clone(),
                }));
                tokio::spawn(drive(completions));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = "uringUnavailable", "proxy.io is uring but this worker cannot make an io_uring; it relays with tokio");
                *l = Local::Unavailable;
                false
            }
        },
    })
}

/// Ends relay `id` from outside the ring (idle, cancel, its future dropped) and submits what
/// that queued (the shutdowns that end its operations in flight).
fn end_relay(id: PairId, why: End) {
    let _ = ENGINE.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut()
            && let Local::Ready(e) = &mut *l
        {
            e.finish(id, why);
            let _ = e.ring.submit();
        }
    });
}

/// Ends the relay if its future is dropped first (the caller was cancelled from outside).
struct Abandon(Option<PairId>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            end_relay(id, End::Cancelled);
        }
    }
}

/// Relays on this worker's ring until both sides closed, an error, `idle` without a byte, or
/// `cancel`. `Err` hands the sockets back untouched when this thread cannot use a ring (the
/// caller relays with [`crate::relay::relay`]).
pub(crate) async fn relay(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    cancel: &CancellationToken,
    counters: Counters<'_>,
    metrics: &Metrics,
    buffers: u16,
) -> Result<(End, Stats), (TcpStream, TcpStream)> {
    if !ensure_engine(metrics, buffers) {
        metrics.fallbacks.inc();
        return Err((client, backend));
    }
    let (client, backend) = match (client.into_std(), backend.into_std()) {
        (Ok(c), Ok(b)) => (OwnedFd::from(c), OwnedFd::from(b)),
        (c, b) => {
            // leaving tokio's poller failed (it never does for a registered socket): close both
            drop((c, b));
            return Ok((
                End::Error(Side::Client, std::io::Error::other("socket left tokio")),
                Stats::default(),
            ));
        }
    };
    let added = ENGINE.with_borrow_mut(|l| match l {
        Local::Ready(e) => {
            let (id, rx) = e.add(
                client,
                backend,
                [counters.to_backend.clone(), counters.to_client.clone()],
            );
            e.turn();
            Some((id, rx))
        }
        _ => None,
    });
    let Some((id, mut rx)) = added else {
        return Ok((End::Cancelled, Stats::default()));
    };
    metrics.relays.inc();
    let mut abandon = Abandon(Some(id));
    let end = tokio::select! {
        r = &mut rx => r.ok(),
        () = watch(id, idle) => None,
        () = cancel.cancelled() => None,
    };
    let done = match end {
        Some(done) => done,
        None => {
            let why = if cancel.is_cancelled() {
                End::Cancelled
            } else {
                End::Idle
            };
            end_relay(id, why);
            rx.try_recv().unwrap_or((End::Cancelled, Stats::default()))
        }
    };
    abandon.0 = None;
    Ok(done)
}

/// Bytes the relay moved so far (`None`: it ended).
fn moved(id: PairId) -> Option<u64> {
    ENGINE.with_borrow_mut(|l| match l {
        Local::Ready(e) => e.pair(id).map(|p| p.ways[0].moved + p.ways[1].moved),
        _ => None,
    })
}

/// Ends when no byte moved for `idle` (never with `idle` zero); turns keepalive on for the
/// backend socket once the relay has lived [`crate::relay::KEEPALIVE_AFTER`] (see
/// [`crate::relay`]).
async fn watch(id: PairId, idle: Duration) {
    crate::relay::watch_idle(
        idle,
        || moved(id),
        || {
            ENGINE.with_borrow_mut(|l| {
                if let Local::Ready(e) = l
                    && let Some(p) = e.pair(id)
                {
                    let backend = p.backend;
                    e.ring.with_fd(backend, |fd| {
                        let _ = socket2::SockRef::from(&fd)
                            .set_tcp_keepalive(&crate::listen::keepalive());
                    });
                }
            });
        },
    )
    .await;
}
