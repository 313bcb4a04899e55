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
//! * The relays themselves are a state machine without I/O ([`engine`]: completions in,
//!   ring operations out, replayed in its tests); this file drives it on the worker's ring.
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
//!   lived [`crate::relay::KEEPALIVE_AFTER`]; the last bytes before a peer's FIN leave with
//!   the FIN passed on, in one segment (`MSG_MORE` when the receive says the socket holds
//!   more). On the ring bytes are copied through the buffers (no `splice`); a transfer that
//!   fills its buffer before the hand-over splices on tokio instead and never moves.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;

use prometheus_client::metrics::counter::Counter;
use sys::uring::{BufId, Completion, Done, Ring, Sock};
use tokio::net::TcpStream;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::relay::{Counters, End, Side, Stats};

mod engine;

pub use engine::QUEUE_MAX;
use engine::{Engine, Event, Ops, PairId};

/// Messages (reads passed on, both ways) the tokio relay moves before it hands a connection
/// to the ring: a request and its response per round trip, so the fourth round trip of a
/// keep-alive connection moves it; a one-request connection never does.
pub const PROMOTE_AFTER: u32 = 8;
/// Most buffers in one worker's pool (16 MiB).
pub const BUFFERS: u16 = 1024;
/// Fewest buffers in one worker's pool (1 MiB), whatever the memory.
pub const MIN_BUFFERS: u16 = 64;
/// Share of the memory the process may use that all the workers' pools together stay within
/// (when that leaves each worker at least [`MIN_BUFFERS`]).
pub const MEMORY_SHARE: u64 = 128;
/// Bytes per buffer (HAProxy's default `tune.bufsize`).
pub const BUFFER_SIZE: u32 = 16 << 10;

/// Buffers in each worker's pool for `workers` workers when the process may use `memory` bytes
/// ([`sys::limits::memory_limit`]: the machine's, or its container's limit): the largest power
/// of two that keeps all the pools within 1/[`MEMORY_SHARE`] of it, from [`MIN_BUFFERS`] to
/// [`BUFFERS`]. The kernel picks the pool's buffers in turn, so under load a pool's memory is
/// all touched: this is what the rings hold at most. Unknown memory: [`BUFFERS`].
pub fn pool_buffers(workers: usize, memory: Option<u64>) -> u16 {
    let Some(memory) = memory else {
        return BUFFERS;
    };
    let per_worker = memory / MEMORY_SHARE / (workers.max(1) as u64) / u64::from(BUFFER_SIZE);
    let fit = match per_worker {
        0 => 0,
        n => 1u64 << n.ilog2(),
    };
    fit.clamp(u64::from(MIN_BUFFERS), u64::from(BUFFERS)) as u16
}

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
    Ready(Box<Worker>),
}

/// One worker thread's engine, on its ring, and the completions it reads each turn.
struct Worker {
    engine: Engine<Ring>,
    completions: Vec<Completion>,
}

/// The engine's operations are the ring's own.
impl Ops for Ring {
    type Sock = Sock;
    type Buf = BufId;
    fn recv(&mut self, sock: Sock, token: u64) -> bool {
        Ring::recv(self, sock, token)
    }
    fn recv_spare(&mut self, sock: Sock, token: u64) -> bool {
        Ring::recv_spare(self, sock, token)
    }
    fn send(
        &mut self,
        sock: Sock,
        buf: BufId,
        from: usize,
        to: usize,
        more: bool,
        token: u64,
    ) -> bool {
        Ring::send(self, sock, buf, from, to, more, token)
    }
    fn is_spare(&self, buf: BufId) -> bool {
        Ring::is_spare(self, buf)
    }
    fn give_back(&mut self, buf: BufId) {
        Ring::give_back(self, buf);
    }
    fn shutdown_write(&mut self, sock: Sock) -> std::io::Result<()> {
        Ring::shutdown_write(self, sock)
    }
    fn release(&mut self, sock: Sock, reset: bool) {
        Ring::release(self, sock, reset);
    }
}

/// A ring completion as the engine's event.
fn event(done: Done) -> Event<BufId> {
    match done {
        Done::Received { buf, len, more } => Event::Received { buf, len, more },
        Done::Eof => Event::Eof,
        Done::NoBuffers => Event::NoBuffers,
        Done::RecvFailed(e) => Event::RecvFailed(e),
        Done::Sent(n) => Event::Sent(n),
        Done::SendFailed(e) => Event::SendFailed(e),
    }
}

impl Worker {
    /// Handles every posted completion, submits what that queued, and goes on while the
    /// submission itself completed more (sends to a socket with room complete inside
    /// `io_uring_enter`): one wake-up of the worker serves them all, at most [`TURN_ROUNDS`]
    /// rounds so the worker's other tasks (accepts) still run.
    fn turn(&mut self) {
        for _ in 0..TURN_ROUNDS {
            let mut batch = std::mem::take(&mut self.completions);
            self.engine.ops.complete(&mut batch);
            let handled = batch.len();
            for c in batch.drain(..) {
                self.engine.handle(c.token, event(c.done));
            }
            self.completions = batch;
            if self.engine.ops.queued() == 0 {
                if handled == 0 {
                    return;
                }
                continue;
            }
            if let Err(e) = self.engine.ops.submit() {
                tracing::warn!(error = %e, "io_uring submit failed; retried on the next turn");
                return;
            }
        }
        if self.engine.ops.queued() > 0 {
            let _ = self.engine.ops.submit();
        }
    }
}

/// Rounds of complete-and-submit one wake-up of the worker's ring task runs at most.
const TURN_ROUNDS: usize = 8;

/// Drives this worker's ring: each time completions are posted, handles them all and submits.
async fn drive(completions: sys::uring::Completions) {
    while completions.posted().await.is_ok() {
        ENGINE.with_borrow_mut(|l| {
            if let Local::Ready(w) = l {
                w.turn();
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
                *l = Local::Ready(Box::new(Worker {
                    engine: Engine::new(ring, metrics.clone()),
                    completions: Vec::new(),
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
            && let Local::Ready(w) = &mut *l
        {
            w.engine.finish(id, why);
            let _ = w.engine.ops.submit();
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
        Local::Ready(w) => {
            let (client, backend) = (w.engine.ops.adopt(client), w.engine.ops.adopt(backend));
            let (id, rx) = w.engine.add(
                client,
                backend,
                [counters.to_backend.clone(), counters.to_client.clone()],
            );
            w.turn();
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
        Local::Ready(w) => w.engine.pair(id).map(|p| p.moved()),
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
                if let Local::Ready(w) = l
                    && let Some(p) = w.engine.pair(id)
                {
                    let backend = p.backend;
                    w.engine.ops.with_fd(backend, |fd| {
                        let _ = socket2::SockRef::from(&fd)
                            .set_tcp_keepalive(&crate::listen::keepalive());
                    });
                }
            });
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_pools_take_at_most_a_128th_of_the_memory_within_their_bounds() {
        // this machine's shape: 24 GiB, 2 workers -> the most
        assert_eq!(pool_buffers(2, Some(24 * GIB)), BUFFERS);
        // 64 workers on 64 GiB: 512 MiB over 64 = 8 MiB each
        assert_eq!(pool_buffers(64, Some(64 * GIB)), 512);
        // rounded down to a power of two: 1 GiB / 128 / 3 = 2.67 MiB -> 128 buffers (2 MiB)
        assert_eq!(pool_buffers(3, Some(GIB)), 128);
        // a container limited to 256 MiB: 2 MiB over 4 workers is below the floor
        assert_eq!(pool_buffers(4, Some(256 << 20)), MIN_BUFFERS);
        assert_eq!(pool_buffers(1, Some(0)), MIN_BUFFERS);
        // nothing known, or no worker said: the most, and no division by zero
        assert_eq!(pool_buffers(8, None), BUFFERS);
        assert_eq!(pool_buffers(0, Some(GIB)), 512);
        for workers in 1..300 {
            for memory in [GIB / 4, GIB, 7 * GIB, 100 * GIB, u64::MAX] {
                let n = pool_buffers(workers, Some(memory));
                assert!(n.is_power_of_two() && (MIN_BUFFERS..=BUFFERS).contains(&n));
                let total = n as u64 * u64::from(BUFFER_SIZE) * workers as u64;
                assert!(n == MIN_BUFFERS || total <= memory / MEMORY_SHARE);
            }
        }
    }
}
