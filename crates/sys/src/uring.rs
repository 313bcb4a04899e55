//! An io_uring for the proxy's relay: sockets are handed to it, receives land in buffers the
//! kernel picks from a registered ring of them, sends go out of those same buffers, and one
//! `io_uring_enter` carries every operation queued since the last one.
//!
//! The caller (`lb`'s relay driver) decides what to receive and send; this module owns what
//! would be unsafe to leave to it, and enforces:
//!
//! * a socket's fd is closed only when no operation on it is in flight, so a number the kernel
//!   hands out again is never the target of an old operation;
//! * a buffer goes back to the kernel only when no send reads it (a give-back during a send is
//!   deferred to the send's completion);
//! * the buffers outlive every operation: dropping the ring shuts every socket down and waits
//!   (bounded) for the operations in flight; if some never complete, the memory is leaked
//!   rather than freed under the kernel.
//!
//! Receives are single-shot with `IOSQE_BUFFER_SELECT`, so the caller controls back-pressure by
//! not re-arming a direction whose peer is slow. `-ENOBUFS` (every pool buffer in use) is
//! reported as [`Done::NoBuffers`]; the caller then receives into a spare buffer
//! ([`Ring::recv_spare`]: one the ring allocates outside the kernel's pool and keeps for
//! reuse), so a pool that stuck peers hold never stops a relay (each direction can always
//! receive into one buffer, as a copy relay with its own buffer would).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Buffer group id of the one provided-buffer ring.
const GROUP: u16 = 0;

/// A failure to set the ring up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `io_uring_setup` failed: the kernel lacks io_uring, or it is disabled
    /// (`kernel.io_uring_disabled`, a seccomp profile such as a container runtime's default).
    #[error("io_uring is not available: {0}")]
    Setup(#[source] io::Error),
    /// Registering the provided-buffer ring failed (kernels before 5.19).
    #[error("cannot register io_uring provided buffers (needs Linux 5.19 or later): {0}")]
    Buffers(#[source] io::Error),
    /// Buffer count not a power of two in 1..=32768, or a size of 0.
    #[error(
        "io_uring buffers: {count} of {size} bytes; the count must be a power of two up to 32768 and the size above 0"
    )]
    Shape {
        /// Buffers asked for.
        count: u16,
        /// Bytes per buffer asked for.
        size: u32,
    },
}

/// A socket the ring owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sock {
    index: u32,
    generation: u32,
}

/// A provided buffer lent to the caller by a [`Done::Received`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufId(u16);

/// What an operation did.
#[derive(Debug)]
pub enum Done {
    /// `len` bytes arrived in `buf` (the caller owns it until [`Ring::give_back`]).
    Received {
        /// The buffer.
        buf: BufId,
        /// Bytes in it.
        len: usize,
        /// The socket holds more already: bytes, or the peer's EOF (the kernel's
        /// `IORING_CQE_F_SOCK_NONEMPTY`, which `tcp_inq_hint` sets after a FIN). The next
        /// receive completes at once.
        more: bool,
    },
    /// The peer closed its sending side.
    Eof,
    /// Every buffer was in use; nothing was received.
    NoBuffers,
    /// The receive failed.
    RecvFailed(io::Error),
    /// A send wrote this many bytes (possibly fewer than asked).
    Sent(usize),
    /// The send failed.
    SendFailed(io::Error),
}

/// A finished operation and the caller's token for it.
#[derive(Debug)]
pub struct Completion {
    /// The token given with the operation.
    pub token: u64,
    /// What it did.
    pub done: Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufState {
    /// In the kernel's ring, free to be picked.
    Kernel,
    /// Lent to the caller.
    Lent,
    /// A send reads it; `back`: give it back when the send completes.
    Sending { back: bool },
    /// A spare: free (not the kernel's: the ring hands it out itself).
    Spare,
    /// A spare a receive writes into.
    Receiving,
}

struct Slot {
    fd: Option<OwnedFd>,
    generation: u32,
    in_flight: u32,
    /// Close once nothing is in flight; `true`: with a reset (`SO_LINGER` 0).
    release: Option<bool>,
}

#[derive(Clone, Copy)]
enum Kind {
    Recv,
    RecvSpare(u16),
    Send(u16),
}

#[derive(Clone, Copy)]
struct Op {
    sock: u32,
    token: u64,
    kind: Kind,
}

/// Page-aligned, zeroed memory for the buffer ring's entries and the buffers.
struct Region {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Region {
    fn new(bytes: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096)
            .expect("a page-aligned layout of a few MiB");
        // SAFETY: the layout has a non-zero size.
        #[allow(unsafe_code)]
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        #[allow(unsafe_code)]
        unsafe {
            std::alloc::dealloc(self.ptr, self.layout)
        };
    }
}

/// The relay's ring: sockets, operations in flight, provided buffers.
pub struct Ring {
    // Field order is drop order: the ring (and the kernel's use of the memory) goes first.
    ring: IoUring,
    entries: Region,
    buffers: Region,
    count: u16,
    size: u32,
    /// Local copy of the buffer ring's tail, published with [`Ring::publish`].
    tail: u16,
    dirty: bool,
    /// Per buffer id: the pool's `count` first, then the spares.
    state: Vec<BufState>,
    /// Spare buffers (ids `count..`), allocated on first need, kept for reuse.
    spares: Vec<Box<[u8]>>,
    free_spares: Vec<u16>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    queued: Vec<squeue::Entry>,
    /// Operations in flight in the kernel.
    in_flight: usize,
    /// Completions being handled (kept to reuse its allocation).
    cqes: Vec<(u64, i32, u32)>,
}

impl Ring {
    /// A ring with `count` buffers of `size` bytes (`count` a power of two).
    pub fn new(count: u16, size: u32) -> Result<Self, Error> {
        if count == 0 || !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(Error::Shape { count, size });
        }
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_clamp()
            .setup_cqsize(u32::from(count).max(1024) * 4)
            .build(1024)
            .map_err(Error::Setup)?;
        let entries = Region::new(usize::from(count) * std::mem::size_of::<types::BufRingEntry>());
        let buffers = Region::new(usize::from(count) * size as usize);
        // SAFETY: `entries` is page-aligned, holds `count` entries and lives as long as the
        // ring (dropped after it; leaked if operations may still be in flight).
        #[allow(unsafe_code)]
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries.ptr as u64, count, GROUP, 0)
                .map_err(Error::Buffers)?;
        }
        let mut ring = Self {
            ring,
            entries,
            buffers,
            count,
            size,
            tail: 0,
            dirty: false,
            state: vec![BufState::Lent; usize::from(count)],
            spares: Vec::new(),
            free_spares: Vec::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            queued: Vec::new(),
            in_flight: 0,
            cqes: Vec::new(),
        };
        for b in 0..count {
            ring.give_back(BufId(b));
        }
        ring.publish();
        Ok(ring)
    }

    /// The ring's fd: readable when completions wait (register it with the event loop).
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring's fd is open for as long as `self.ring` lives.
        #[allow(unsafe_code)]
        unsafe {
            BorrowedFd::borrow_raw(self.ring.as_raw_fd())
        }
    }

    /// Operations queued and not yet submitted.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Operations in flight or queued.
    pub fn busy(&self) -> usize {
        self.in_flight + self.queued.len()
    }

    /// Takes a socket over.
    pub fn adopt(&mut self, fd: OwnedFd) -> Sock {
        let slot = |generation| Slot {
            fd: Some(fd),
            generation,
            in_flight: 0,
            release: None,
        };
        match self.free_slots.pop() {
            Some(index) => {
                let s = &mut self.slots[index as usize];
                let generation = s.generation.wrapping_add(1);
                *s = slot(generation);
                Sock { index, generation }
            }
            None => {
                self.slots.push(slot(0));
                Sock {
                    index: (self.slots.len() - 1) as u32,
                    generation: 0,
                }
            }
        }
    }

    fn live(&self, sock: Sock) -> Option<&Slot> {
        self.slots
            .get(sock.index as usize)
            .filter(|s| s.generation == sock.generation && s.fd.is_some() && s.release.is_none())
    }

    /// The socket's fd, for socket options.
    pub fn with_fd<R>(&self, sock: Sock, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
        self.live(sock)
            .and_then(|s| s.fd.as_ref())
            .map(|fd| f(fd.as_fd()))
    }

    /// Records an operation on a live socket: its `user_data` and the socket's fd.
    fn push_op(&mut self, sock: Sock, token: u64, kind: Kind) -> Option<(u64, RawFd)> {
        let fd = self.live(sock)?.fd.as_ref()?.as_raw_fd();
        let op = Op {
            sock: sock.index,
            token,
            kind,
        };
        let index = match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        };
        self.slots[sock.index as usize].in_flight += 1;
        Some((u64::from(index), fd))
    }

    /// Queues a receive into a buffer the kernel picks. `false`: the socket is not live.
    pub fn recv(&mut self, sock: Sock, token: u64) -> bool {
        let Some((user_data, fd)) = self.push_op(sock, token, Kind::Recv) else {
            return false;
        };
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), self.size)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        self.queued.push(e);
        true
    }

    /// Queues a send of `buf[from..to]`; `more`: with `MSG_MORE`, the caller sends more (or
    /// shuts the write side down) right after, and they leave together. `false`: the socket is
    /// not live, the buffer is not lent to the caller or the range is outside it (nothing
    /// queued).
    pub fn send(
        &mut self,
        sock: Sock,
        buf: BufId,
        from: usize,
        to: usize,
        more: bool,
        token: u64,
    ) -> bool {
        let b = usize::from(buf.0);
        if self.state.get(b) != Some(&BufState::Lent) || from >= to || to > self.size as usize {
            return false;
        }
        if self.address(b, 0).is_null() {
            return false;
        }
        let Some((user_data, fd)) = self.push_op(sock, token, Kind::Send(buf.0)) else {
            return false;
        };
        self.state[b] = BufState::Sending { back: false };
        let ptr = self.address(b, from);
        let flags = if more {
            libc::MSG_NOSIGNAL | libc::MSG_MORE
        } else {
            libc::MSG_NOSIGNAL
        };
        let e = opcode::Send::new(types::Fd(fd), ptr, (to - from) as u32)
            .flags(flags)
            .build()
            .user_data(user_data);
        self.queued.push(e);
        true
    }

    /// Whether `buf` is a spare (not one of the kernel's pool).
    pub fn is_spare(&self, buf: BufId) -> bool {
        buf.0 >= self.count
    }

    /// Where byte `from` of buffer `b` is (null for an id that names no buffer).
    fn address(&mut self, b: usize, from: usize) -> *mut u8 {
        let count = usize::from(self.count);
        if b < count {
            // SAFETY: buffer `b` of `count` in the buffer region, `from` < `size`.
            #[allow(unsafe_code)]
            unsafe {
                self.buffers.ptr.add(b * self.size as usize + from)
            }
        } else {
            self.spares
                .get_mut(b - count)
                .map_or(std::ptr::null_mut(), |s| s[from..].as_mut_ptr())
        }
    }

    /// Queues a receive into a spare buffer (after [`Done::NoBuffers`]). `false`: the socket
    /// is not live, or the ring's buffer ids ran out (65,535 buffers in all). The caller bounds
    /// how many spares it holds (the relay: one per direction).
    pub fn recv_spare(&mut self, sock: Sock, token: u64) -> bool {
        let id = match self.free_spares.pop() {
            Some(id) => id,
            None if usize::from(self.count) + self.spares.len() < usize::from(u16::MAX) => {
                self.spares
                    .push(vec![0u8; self.size as usize].into_boxed_slice());
                self.state.push(BufState::Spare);
                (usize::from(self.count) + self.spares.len() - 1) as u16
            }
            None => return false,
        };
        let Some((user_data, fd)) = self.push_op(sock, token, Kind::RecvSpare(id)) else {
            self.free_spares.push(id);
            return false;
        };
        self.state[usize::from(id)] = BufState::Receiving;
        let ptr = self.address(usize::from(id), 0);
        let e = opcode::Recv::new(types::Fd(fd), ptr, self.size)
            .build()
            .user_data(user_data);
        self.queued.push(e);
        true
    }

    /// Gives a lent buffer back to the kernel's pool, or a spare back to the ring (after its
    /// send, if one reads it).
    pub fn give_back(&mut self, buf: BufId) {
        let b = usize::from(buf.0);
        match self.state.get(b).copied() {
            Some(BufState::Lent) if b >= usize::from(self.count) => {
                self.state[b] = BufState::Spare;
                self.free_spares.push(buf.0);
            }
            Some(BufState::Lent) => {
                let mask = self.count - 1;
                // SAFETY: `tail & mask` < `count` entries in the page-aligned entry region.
                #[allow(unsafe_code)]
                let entry = unsafe {
                    &mut *(self.entries.ptr as *mut types::BufRingEntry)
                        .add(usize::from(self.tail & mask))
                };
                entry.set_addr(self.buffers.ptr as u64 + (b * self.size as usize) as u64);
                entry.set_len(self.size);
                entry.set_bid(buf.0);
                self.tail = self.tail.wrapping_add(1);
                self.state[b] = BufState::Kernel;
                self.dirty = true;
            }
            Some(BufState::Sending { .. }) => self.state[b] = BufState::Sending { back: true },
            Some(BufState::Kernel | BufState::Spare | BufState::Receiving) | None => {}
        }
    }

    /// Makes given-back buffers visible to the kernel.
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        // SAFETY: the tail field of the first entry, in the live entry region.
        #[allow(unsafe_code)]
        let tail = unsafe {
            &*(types::BufRingEntry::tail(self.entries.ptr as *const types::BufRingEntry)
                as *const std::sync::atomic::AtomicU16)
        };
        tail.store(self.tail, std::sync::atomic::Ordering::Release);
    }

    /// Shuts the write side down now (a FIN after everything sent so far).
    pub fn shutdown_write(&mut self, sock: Sock) -> io::Result<()> {
        match self.live(sock).and_then(|s| s.fd.as_ref()) {
            Some(fd) => rustix::net::shutdown(fd, rustix::net::Shutdown::Write).map_err(Into::into),
            None => Ok(()),
        }
    }

    /// Closes the socket once no operation on it is in flight; `reset`: with a reset instead
    /// of a FIN. Operations in flight are ended first (both directions shut down).
    pub fn release(&mut self, sock: Sock, reset: bool) {
        let Some(slot) = self
            .slots
            .get_mut(sock.index as usize)
            .filter(|s| s.generation == sock.generation && s.fd.is_some())
        else {
            return;
        };
        if let Some(fd) = slot.fd.as_ref() {
            if reset {
                let _ = socket2::SockRef::from(fd).set_linger(Some(std::time::Duration::ZERO));
            }
            if slot.in_flight > 0 {
                let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
            }
        }
        slot.release = Some(reset);
        if slot.in_flight == 0 {
            slot.fd = None;
            self.free_slots.push(sock.index);
        }
    }

    /// Hands queued operations to the kernel without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.push_queued()?;
        self.ring.submit()?;
        Ok(())
    }

    /// Hands queued operations to the kernel and waits for at least one completion.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        self.push_queued()?;
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn push_queued(&mut self) -> io::Result<()> {
        self.publish();
        let mut i = 0;
        while i < self.queued.len() {
            let pushed = {
                let mut sq = self.ring.submission();
                let room = sq.capacity() - sq.len();
                let n = room.min(self.queued.len() - i);
                // SAFETY: every queued entry points at memory this ring owns (buffers) or at
                // nothing, and at fds closed only once their operations completed.
                #[allow(unsafe_code)]
                unsafe {
                    sq.push_multiple(&self.queued[i..i + n])
                        .expect("room was checked");
                }
                n
            };
            self.in_flight += pushed;
            i += pushed;
            if i < self.queued.len() {
                self.ring.submit()?;
            }
        }
        self.queued.clear();
        Ok(())
    }

    /// Takes every completion the kernel posted, in order, into `out`.
    pub fn complete(&mut self, out: &mut Vec<Completion>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (user_data, res, flags) in cqes.drain(..) {
            self.in_flight = self.in_flight.saturating_sub(1);
            let Some(op) = self.ops.get_mut(user_data as usize).and_then(Option::take) else {
                continue;
            };
            self.free_ops.push(user_data as u32);
            let slot = &mut self.slots[op.sock as usize];
            slot.in_flight -= 1;
            let released = slot.release.is_some();
            if released && slot.in_flight == 0 {
                slot.fd = None;
                self.free_slots.push(op.sock);
            }
            let done = match op.kind {
                Kind::Recv => {
                    let buf = cqueue::buffer_select(flags).map(BufId);
                    if let Some(b) = buf {
                        self.state[usize::from(b.0)] = BufState::Lent;
                    }
                    match (res, buf) {
                        (n, Some(buf)) if n > 0 && !released => Done::Received {
                            buf,
                            len: n as usize,
                            more: cqueue::sock_nonempty(flags),
                        },
                        (n, Some(buf)) => {
                            // released meanwhile: the bytes have nowhere to go
                            self.give_back(buf);
                            if n < 0 {
                                Done::RecvFailed(errno(n))
                            } else {
                                Done::Eof
                            }
                        }
                        (0, None) => Done::Eof,
                        (n, None) if n == -libc::ENOBUFS => Done::NoBuffers,
                        (n, None) => Done::RecvFailed(errno(n)),
                    }
                }
                Kind::RecvSpare(id) => {
                    self.state[usize::from(id)] = BufState::Lent;
                    let buf = BufId(id);
                    if res > 0 && !released {
                        Done::Received {
                            buf,
                            len: res as usize,
                            more: cqueue::sock_nonempty(flags),
                        }
                    } else {
                        self.give_back(buf);
                        match res {
                            0.. => Done::Eof,
                            n => Done::RecvFailed(errno(n)),
                        }
                    }
                }
                Kind::Send(b) => {
                    let b = usize::from(b);
                    let back = matches!(self.state[b], BufState::Sending { back: true });
                    self.state[b] = BufState::Lent;
                    if back {
                        self.give_back(BufId(b as u16));
                    }
                    if res >= 0 {
                        Done::Sent(res as usize)
                    } else {
                        Done::SendFailed(errno(res))
                    }
                }
            };
            out.push(Completion {
                token: op.token,
                done,
            });
        }
        self.cqes = cqes;
        self.publish();
    }
}

/// Tells a tokio task when a [`Ring`] has completions: it polls a duplicate of the ring's fd,
/// which it owns (so the registration never outlives the descriptor it names).
pub struct Completions(tokio::io::unix::AsyncFd<OwnedFd>);

impl Completions {
    /// Registers with the current tokio runtime.
    pub fn new(ring: &Ring) -> io::Result<Self> {
        let fd = ring.fd().try_clone_to_owned()?;
        // SAFETY: `fd` is an open descriptor owned by the `AsyncFd` until it is dropped with it.
        #[allow(unsafe_code)]
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        Ok(Self(afd))
    }

    /// Waits until completions may have been posted since the last call (spurious wake-ups are
    /// possible); then take them with [`Ring::complete`].
    pub async fn posted(&self) -> io::Result<()> {
        let mut guard = self.0.readable().await?;
        guard.clear_ready();
        Ok(())
    }
}

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(res.saturating_neg())
}

impl Drop for Ring {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Some(fd) = slot.fd.as_ref().filter(|_| slot.in_flight > 0) {
                let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
            }
        }
        let mut out = Vec::new();
        for _ in 0..100 {
            if self.in_flight == 0 {
                return;
            }
            let _ = self.ring.submit_and_wait(0);
            self.complete(&mut out);
            out.clear();
            if self.in_flight > 0 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // Operations the kernel still holds may write into the buffers: leak them.
        std::mem::forget(std::mem::take(&mut self.spares));
        std::mem::forget(std::mem::replace(&mut self.buffers, Region::new(0)));
        std::mem::forget(std::mem::replace(&mut self.entries, Region::new(0)));
    }
}

#[cfg(test)]
mod tests;
