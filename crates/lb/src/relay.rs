//! The TCP relay: bytes between a client and a backend, zero-copy with `splice(2)`.
//!
//! Each direction starts with a plain copy through a 16 KiB buffer (for small request/response
//! traffic one `read` + one `write` beats two splices), and switches to zero-copy `splice` for
//! the rest of its life once a read fills the buffer — HAProxy's `splice-auto` heuristic. A
//! spliced direction owns a pipe; data moves socket → pipe → socket inside the kernel, driven by
//! tokio readiness (`try_io` clears readiness on `EAGAIN`, so no busy loop). A direction that
//! reads EOF shuts down the write side of the other socket and ends; the other direction keeps
//! going (half-close in both directions). When the peer's last bytes and its FIN arrived
//! together (a short read, and the poller already saw the shutdown), the bytes and the FIN go on
//! in one segment and no read is spent on the EOF: on a one-request connection that is a
//! segment and a `recv` fewer. The relay ends when both directions ended, on an error
//! (the client gets a reset if the backend reset), when no byte moved for `idle_timeout`, or when
//! cancelled (drain deadline, shutdown). If the kernel refuses `splice` (`EINVAL`, `ENOSYS`) the
//! direction falls back to a buffered copy. Pipes are pooled: a pipe is reused only when empty.
//! Copy buffers are pooled per thread (no allocation and zeroing per connection), and the byte
//! counters, which every connection of a backend shares across worker threads, are fed once per
//! 256 KiB and when a direction ends rather than on every write.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 1 << 16;
/// Copy buffer; a read that fills it marks a bulk transfer (switch to splice).
const COPY_BUF: usize = 16 << 10;
const POOL_MAX: usize = 1024;
/// Copy buffers kept per thread (4 MiB at most).
const BUF_POOL_MAX: usize = 256;
/// Bytes a direction moves before it adds them to the shared counters.
const TALLY_FLUSH: u64 = 256 << 10;

thread_local! {
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer from this thread's pool; back to the pool of the thread that drops it.
pub(crate) struct Buf(Option<Box<[u8]>>);

impl Buf {
    pub(crate) fn get() -> Self {
        let pooled = BUFS.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        Self(Some(
            pooled.unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice()),
        ))
    }

    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("present until drop")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let _ = BUFS.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < BUF_POOL_MAX {
                    p.push(b);
                }
            });
        }
    }
}

/// Bytes one direction moved that the shared counter has not seen yet; added on drop.
struct Tally<'a> {
    counter: &'a Counter,
    pending: u64,
}

impl Tally<'_> {
    fn add(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= TALLY_FLUSH {
            self.counter.inc_by(std::mem::take(&mut self.pending));
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if self.pending > 0 {
            self.counter.inc_by(self.pending);
        }
    }
}

static PIPES: Mutex<Vec<(OwnedFd, OwnedFd)>> = Mutex::new(Vec::new());
static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Bytes this process moved with `splice(2)` so far (diagnostics; proves the zero-copy path ran).
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

/// A pipe for one direction; returned to the pool on drop when empty.
struct Pipe {
    fds: Option<(OwnedFd, OwnedFd)>,
    pending: usize,
}

impl Pipe {
    fn get() -> io::Result<Self> {
        let pooled = PIPES.lock().ok().and_then(|mut p| p.pop());
        let fds = match pooled {
            Some(p) => p,
            None => rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?,
        };
        Ok(Self {
            fds: Some(fds),
            pending: 0,
        })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.pending == 0
            && let Some(fds) = self.fds.take()
            && let Ok(mut pool) = PIPES.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(fds);
        }
    }
}

/// Which socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client socket.
    Client,
    /// The backend socket.
    Backend,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Closed,
    /// Handed over: the connection proved long-lived (`promote_after` messages relayed) while
    /// no byte was held here; the caller moves both sockets to the io_uring relay.
    Handover,
    /// No byte moved for the idle timeout.
    Idle,
    /// Cancelled (drain deadline or shutdown).
    Cancelled,
    /// A socket failed.
    Error(Side, io::Error),
}

impl End {
    /// The reason word for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Handover => "handover",
            End::Idle => "idleTimeout",
            End::Cancelled => "cancelled",
            End::Error(Side::Client, _) => "clientError",
            End::Error(Side::Backend, _) => "backendError",
        }
    }
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client → backend.
    pub to_backend: u64,
    /// Backend → client.
    pub to_client: u64,
}

/// Byte counters the relay feeds as it goes.
#[derive(Debug, Clone, Copy)]
pub struct Counters<'a> {
    /// Client → backend.
    pub to_backend: &'a Counter,
    /// Backend → client.
    pub to_client: &'a Counter,
}

/// Relays until both sides closed, an error, `idle` without traffic, or `cancel` — or, with
/// `promote_after`, until that many messages (reads passed on, both ways) have been relayed and
/// neither direction holds a byte nor splices: then [`End::Handover`].
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    cancel: &CancellationToken,
    counters: Counters<'_>,
    use_splice: bool,
    promote_after: Option<u32>,
) -> (End, Stats) {
    let progress = Progress {
        promote_after: promote_after.unwrap_or(u32::MAX),
        ..Progress::default()
    };
    let up = one_way(
        client,
        backend,
        Side::Client,
        &progress,
        counters.to_backend,
        use_splice,
    );
    let down = one_way(
        backend,
        client,
        Side::Backend,
        &progress,
        counters.to_client,
        use_splice,
    );
    let both = async { tokio::try_join!(up, down) };
    let end = tokio::select! {
        r = both => match r {
            Ok((a, b)) => return (End::Closed, Stats { to_backend: a, to_client: b }),
            Err(e) => End::Error(e.0, e.1),
        },
        () = idle_watch(&progress, idle, backend) => End::Idle,
        () = cancel.cancelled() => End::Cancelled,
        () = promotable(&progress), if promote_after.is_some() => End::Handover,
    };
    (end, Stats::default())
}

/// A relay still open after this long gets TCP keepalive on its backend socket (the client
/// socket inherits it from the listener). Set late rather than at connect: two `setsockopt`
/// calls saved on every connection that ends sooner, which is nearly all of them. Nothing is
/// lost: a probe only ever goes out after this much idle time, and the kernel counts the idle
/// time from the last segment received, not from the `setsockopt` (a relay idle since its start
/// sends its first probe at once: `ss -tno` showed `timer:(keepalive,4.8ms,0)` 66 s in).
pub(crate) const KEEPALIVE_AFTER: Duration = Duration::from_secs(60);

/// Ends when no byte moved for `idle` (never with `idle` zero). Also turns on keepalive on
/// `backend` once the relay has lived [`KEEPALIVE_AFTER`], unless `idle` would end an idle
/// connection before a probe could go out.
async fn idle_watch(progress: &Progress, idle: Duration, backend: &TcpStream) {
    watch_idle(
        idle,
        || Some(progress.bytes.load(Ordering::Relaxed)),
        || {
            let _ = socket2::SockRef::from(backend).set_tcp_keepalive(&crate::listen::keepalive());
        },
    )
    .await;
}

/// The idle watch of both relays: ends when `moved` (bytes so far; `None`: the relay is gone,
/// then it never ends) did not change for `idle` (never with `idle` zero), checked every
/// quarter of it; calls `keepalive` once, [`KEEPALIVE_AFTER`] in, unless `idle` would end an
/// idle connection before a probe could go out.
pub(crate) async fn watch_idle(
    idle: Duration,
    mut moved: impl FnMut() -> Option<u64>,
    mut keepalive: impl FnMut(),
) {
    let start = Instant::now();
    let mut keepalive_at =
        (idle.is_zero() || idle > KEEPALIVE_AFTER).then_some(start + KEEPALIVE_AFTER);
    let tick = (!idle.is_zero()).then(|| (idle / 4).max(Duration::from_millis(10)));
    let mut next_tick = tick.map(|t| start + t);
    let mut seen = moved();
    let mut last_change = start;
    loop {
        let wake = match (keepalive_at, next_tick) {
            (Some(k), Some(t)) => k.min(t),
            (Some(k), None) => k,
            (None, Some(t)) => t,
            (None, None) => return std::future::pending().await,
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if keepalive_at.is_some_and(|k| now >= k) {
            keepalive_at = None;
            keepalive();
        }
        let (Some(t), Some(due)) = (tick, next_tick) else {
            continue;
        };
        if now < due {
            continue;
        }
        next_tick = Some(now + t);
        let now_seen = moved();
        if now_seen.is_none() {
            return std::future::pending().await;
        }
        if now_seen != seen {
            seen = now_seen;
            last_change = now;
        } else if now.duration_since(last_change) >= idle {
            return;
        }
    }
}

/// State both directions of one relay share.
#[derive(Default)]
struct Progress {
    /// Bytes moved either way (the idle watch looks for change).
    bytes: AtomicU64,
    /// One direction has reached EOF.
    one_done: std::sync::atomic::AtomicBool,
    /// Messages passed on (a read written out), both ways.
    messages: std::sync::atomic::AtomicU32,
    /// Directions in the middle of writing out what they read.
    writing: std::sync::atomic::AtomicU32,
    /// A direction switched to splice (its pipe may hold bytes).
    spliced: std::sync::atomic::AtomicBool,
    /// Messages after which the relay may hand over ([`End::Handover`]); `u32::MAX`: never.
    promote_after: u32,
    /// Told after each message once `promote_after` is reached.
    promote: tokio::sync::Notify,
}

impl Progress {
    /// Whether both sockets can move now without losing a byte: enough messages, no direction
    /// writing or splicing, neither at EOF. Exact when checked from the relay's own task (both
    /// directions are then suspended at an await).
    fn handover_ready(&self) -> bool {
        self.messages.load(Ordering::Relaxed) >= self.promote_after
            && self.writing.load(Ordering::Relaxed) == 0
            && !self.spliced.load(Ordering::Relaxed)
            && !self.one_done.load(Ordering::Relaxed)
    }
}

/// Ends once the relay may hand over (checked after each message, from the relay's task).
async fn promotable(progress: &Progress) {
    loop {
        if progress.handover_ready() {
            return;
        }
        progress.promote.notified().await;
    }
}

/// Passes an EOF on: shuts down `dst`'s write side — unless the other direction already ended,
/// in which case both sockets close right away and `close` sends the FIN (one syscall saved per
/// connection).
fn half_close(dst: &TcpStream, progress: &Progress) {
    if !progress.one_done.swap(true, Ordering::AcqRel) {
        let _ = rustix::net::shutdown(dst, rustix::net::Shutdown::Write);
    }
}

type DirResult = Result<u64, (Side, io::Error)>;

/// The side a read error comes from is `src_side`; a write error comes from the other side.
fn other(s: Side) -> Side {
    match s {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    }
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    progress: &Progress,
    bytes: &Counter,
    use_splice: bool,
) -> DirResult {
    let mut pooled = Buf::get();
    let buf = pooled.bytes();
    let bytes = &mut Tally {
        counter: bytes,
        pending: 0,
    };
    if !use_splice {
        return match copy_way(src, dst, src_side, progress, bytes, 0, buf, false).await {
            Copied::Done(r) => r,
            Copied::Bulk(_) => unreachable!("switching is off"),
        };
    }
    // Small messages are cheaper to copy (one read + one write) than to splice (two splices and
    // a pipe); switch to splice for the rest of this direction once a read fills the buffer.
    let total = match copy_way(src, dst, src_side, progress, bytes, 0, buf, true).await {
        Copied::Done(r) => return r,
        Copied::Bulk(total) => total,
    };
    let mut total_after = total;
    match splice_way(src, dst, src_side, progress, bytes, &mut total_after).await {
        Ok(r) => r,
        Err(Fallback) => {
            match copy_way(src, dst, src_side, progress, bytes, total_after, buf, false).await {
                Copied::Done(r) => r,
                Copied::Bulk(_) => unreachable!("switching is off"),
            }
        }
    }
}

/// The kernel does not splice these sockets: copy instead.
struct Fallback;

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::INVAL.raw_os_error() || code == rustix::io::Errno::NOSYS.raw_os_error())
}

async fn splice_way(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    progress: &Progress,
    bytes: &mut Tally<'_>,
    total: &mut u64,
) -> Result<DirResult, Fallback> {
    let mut pipe = match Pipe::get() {
        Ok(p) => p,
        Err(_) => return Err(Fallback),
    };
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut first = true;
    loop {
        // socket → pipe
        let n = loop {
            let (_, w) = pipe.fds.as_ref().expect("pipe present until drop");
            match src.try_io(Interest::READABLE, || {
                Ok(rustix::pipe::splice(src, None, w, None, CHUNK, flags)?)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = src.readable().await {
                        return Ok(Err((src_side, e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if first && unsupported(&e) => return Err(Fallback),
                Err(e) => return Ok(Err((src_side, e))),
            }
        };
        first = false;
        if n == 0 {
            half_close(dst, progress);
            return Ok(Ok(*total));
        }
        pipe.pending += n;
        // pipe → socket
        while pipe.pending > 0 {
            let (r, _) = pipe.fds.as_ref().expect("pipe present until drop");
            let len = pipe.pending;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(r, None, dst, None, len, flags)?)
            }) {
                Ok(m) => {
                    pipe.pending -= m;
                    *total += m as u64;
                    SPLICED.fetch_add(m as u64, Ordering::Relaxed);
                    bytes.add(m as u64);
                    progress.bytes.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = dst.writable().await {
                        return Ok(Err((other(src_side), e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok(Err((other(src_side), e))),
            }
        }
    }
}

/// Reads once. A short read from a stream socket means its receive queue is empty, so the
/// readiness is cleared right away (as HAProxy does) instead of spending a second `recv` that
/// would only return `EAGAIN`. tokio clears readiness only if no new readiness event arrived
/// since it was observed, so data that lands after the read still wakes us.
pub(crate) fn read_draining(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut short = 0;
    let r = s.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(s, &mut *buf, rustix::net::RecvFlags::empty())?;
        if n > 0 && n < len {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        r => r,
    }
}

/// Whether `s`'s peer has shut down its side with no error, as the poller last saw it: after a
/// read that drained the queue, the next read would return EOF. Reads tokio's readiness only
/// (no system call); an error (a reset) is left for the next read to report.
fn eof_pending(s: &TcpStream) -> bool {
    let ready = s.ready(Interest::READABLE | Interest::ERROR);
    let mut ready = std::pin::pin!(ready);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(
        ready.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Ok(r)) if r.is_read_closed() && !r.is_error()
    )
}

/// One non-blocking send; with `more`, the bytes wait (`MSG_MORE`) for what follows at once.
fn write_some(dst: &TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    if !more {
        return dst.try_write(buf);
    }
    dst.try_io(Interest::WRITABLE, || {
        Ok(rustix::net::send(
            dst,
            buf,
            rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
        )?)
    })
}

/// How a copy loop ended.
enum Copied {
    /// EOF or error.
    Done(DirResult),
    /// A read filled the buffer: bulk transfer, switch to splice (bytes so far).
    Bulk(u64),
}

#[allow(clippy::too_many_arguments)]
async fn copy_way(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    progress: &Progress,
    bytes: &mut Tally<'_>,
    mut total: u64,
    buf: &mut [u8],
    switch_on_full: bool,
) -> Copied {
    loop {
        let n = loop {
            match read_draining(src, buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = src.readable().await {
                        return Copied::Done(Err((src_side, e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Copied::Done(Err((src_side, e))),
            }
        };
        if n == 0 {
            half_close(dst, progress);
            return Copied::Done(Ok(total));
        }
        // The peer's FIN came with these bytes (a short read drained the queue and the poller
        // saw it shut down): pass the bytes and the EOF on together, with no read to learn of
        // the EOF. While the other direction goes on, the bytes are held (`MSG_MORE`) for the
        // FIN that `half_close` sends at once, so both leave in one segment.
        let eof = n < buf.len() && eof_pending(src);
        let more = eof && !progress.one_done.load(Ordering::Relaxed);
        progress.writing.fetch_add(1, Ordering::Relaxed);
        let mut off = 0;
        while off < n {
            match write_some(dst, &buf[off..n], more) {
                Ok(m) => {
                    off += m;
                    total += m as u64;
                    bytes.add(m as u64);
                    progress.bytes.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = dst.writable().await {
                        return Copied::Done(Err((other(src_side), e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Copied::Done(Err((other(src_side), e))),
            }
        }
        progress.writing.fetch_sub(1, Ordering::Relaxed);
        if eof {
            half_close(dst, progress);
            return Copied::Done(Ok(total));
        }
        if progress.messages.fetch_add(1, Ordering::Relaxed) + 1 >= progress.promote_after {
            progress.promote.notify_one();
        }
        if switch_on_full && n == buf.len() {
            progress.spliced.store(true, Ordering::Relaxed);
            return Copied::Bulk(total);
        }
    }
}
