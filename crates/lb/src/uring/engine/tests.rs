//! The relay engine replayed: event sequences against a recording [`Ops`], checking the
//! operations each event asks for and how relays end.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use super::*;

/// Sockets are numbers (client 1, backend 2 for the first relay); buffers at 100 and above are
/// spares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Recv(u32, u64),
    RecvSpare(u32, u64),
    Send(u32, u16, usize, usize, u64),
    /// A send with `MSG_MORE`.
    SendMore(u32, u16, usize, usize, u64),
    GiveBack(u16),
    Shutdown(u32),
    Release(u32, bool),
}

#[derive(Default)]
struct Recorder {
    log: Vec<Op>,
    /// `recv_spare` refuses (the ring's buffer ids ran out).
    no_spares: bool,
    /// `shutdown_write` fails.
    shutdown_fails: bool,
}

impl Ops for Recorder {
    type Sock = u32;
    type Buf = u16;
    fn recv(&mut self, sock: u32, token: u64) -> bool {
        self.log.push(Op::Recv(sock, token));
        true
    }
    fn recv_spare(&mut self, sock: u32, token: u64) -> bool {
        if self.no_spares {
            return false;
        }
        self.log.push(Op::RecvSpare(sock, token));
        true
    }
    fn send(
        &mut self,
        sock: u32,
        buf: u16,
        from: usize,
        to: usize,
        more: bool,
        token: u64,
    ) -> bool {
        self.log.push(if more {
            Op::SendMore(sock, buf, from, to, token)
        } else {
            Op::Send(sock, buf, from, to, token)
        });
        true
    }
    fn is_spare(&self, buf: u16) -> bool {
        buf >= 100
    }
    fn give_back(&mut self, buf: u16) {
        self.log.push(Op::GiveBack(buf));
    }
    fn shutdown_write(&mut self, sock: u32) -> io::Result<()> {
        self.log.push(Op::Shutdown(sock));
        if self.shutdown_fails {
            Err(io::ErrorKind::NotConnected.into())
        } else {
            Ok(())
        }
    }
    fn release(&mut self, sock: u32, reset: bool) {
        self.log.push(Op::Release(sock, reset));
    }
}

type Ended = oneshot::Receiver<(End, Stats)>;

struct Replay {
    e: Engine<Recorder>,
    up: Counter,
    down: Counter,
}

impl Replay {
    fn new() -> Self {
        Self {
            e: Engine::new(Recorder::default(), Metrics::default()),
            up: Counter::default(),
            down: Counter::default(),
        }
    }
    fn add(&mut self, client: u32, backend: u32) -> (PairId, Ended) {
        self.e
            .add(client, backend, [self.up.clone(), self.down.clone()])
    }
    /// Feeds one completion of direction `way` of `id`; returns the operations it asked for.
    fn event(&mut self, id: PairId, way: usize, ev: Event<u16>) -> Vec<Op> {
        self.e.handle(token(id, way), ev);
        self.take()
    }
    fn take(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.e.ops.log)
    }
}

fn ended(rx: &mut Ended) -> Option<(End, Stats)> {
    rx.try_recv().ok()
}

/// `len` bytes in `buf`, nothing more behind them yet.
fn received(buf: u16, len: usize) -> Event<u16> {
    Event::Received {
        buf,
        len,
        more: false,
    }
}

/// `len` bytes in `buf`, and the socket holds more (bytes or its EOF).
fn received_more(buf: u16, len: usize) -> Event<u16> {
    Event::Received {
        buf,
        len,
        more: true,
    }
}

const UP: usize = 0;
const DOWN: usize = 1;

#[test]
fn bytes_received_are_sent_on_resumed_after_a_short_send_and_given_back() {
    let mut r = Replay::new();
    let (id, mut rx) = r.add(1, 2);
    let (t_up, t_down) = (token(id, UP), token(id, DOWN));
    assert_eq!(r.take(), [Op::Recv(1, t_up), Op::Recv(2, t_down)]);
    // the client's bytes go to the backend; the next receive is armed at once
    assert_eq!(
        r.event(id, UP, received(7, 100)),
        [Op::Send(2, 7, 0, 100, t_up), Op::Recv(1, t_up)]
    );
    // a short send is resumed where it stopped
    assert_eq!(
        r.event(id, UP, Event::Sent(60)),
        [Op::Send(2, 7, 60, 100, t_up)]
    );
    // all sent: the buffer goes back; the receive is still armed (nothing new)
    assert_eq!(r.event(id, UP, Event::Sent(40)), [Op::GiveBack(7)]);
    assert!(ended(&mut rx).is_none());
    assert_eq!(r.e.pair(id).map(|p| p.moved()), Some(100));
}

#[test]
fn an_eof_half_closes_and_the_second_one_closes_both_without_a_shutdown() {
    let mut r = Replay::new();
    let (id, mut rx) = r.add(1, 2);
    r.take();
    r.event(id, DOWN, received(3, 10));
    // EOF while a send is in flight: passed on only once the queue is sent
    assert_eq!(r.event(id, DOWN, Event::Eof), []);
    assert_eq!(
        r.event(id, DOWN, Event::Sent(10)),
        [Op::GiveBack(3), Op::Shutdown(1)]
    );
    assert!(ended(&mut rx).is_none(), "the client may still talk");
    // the client's EOF ends the relay: both close, no shutdown, no reset
    assert_eq!(
        r.event(id, UP, Event::Eof),
        [Op::Release(1, false), Op::Release(2, false)]
    );
    let (end, stats) = ended(&mut rx).expect("ended");
    assert!(matches!(end, End::Closed), "{end:?}");
    assert_eq!(
        stats,
        Stats {
            to_backend: 0,
            to_client: 10
        }
    );
    assert_eq!(
        r.down.get(),
        10,
        "bytes reach the counters when the relay ends"
    );
}

#[test]
fn a_direction_holding_queue_max_buffers_stops_receiving_until_one_is_sent() {
    let mut r = Replay::new();
    let (id, _rx) = r.add(1, 2);
    let t = token(id, UP);
    r.take();
    for b in 0..QUEUE_MAX as u16 {
        let ops = r.event(id, UP, received(b, 16));
        let recv_again = ops.contains(&Op::Recv(1, t));
        assert_eq!(
            recv_again,
            (b as usize) + 1 < QUEUE_MAX,
            "buffer {b}: {ops:?}"
        );
    }
    // the backend drains the head: one buffer back, the next send, receiving again
    assert_eq!(
        r.event(id, UP, Event::Sent(16)),
        [Op::GiveBack(0), Op::Send(2, 1, 0, 16, t), Op::Recv(1, t)]
    );
}

#[test]
fn a_dry_pool_receives_into_one_spare_per_direction() {
    let mut r = Replay::new();
    let (id, _rx) = r.add(1, 2);
    let t = token(id, UP);
    r.take();
    assert_eq!(r.event(id, UP, Event::NoBuffers), [Op::RecvSpare(1, t)]);
    assert_eq!(r.e.metrics.buffer_waits.get(), 1);
    // while the spare waits to be sent, no other receive: one spare at most
    assert_eq!(
        r.event(id, UP, received(100, 5)),
        [Op::Send(2, 100, 0, 5, t)]
    );
    assert_eq!(
        r.event(id, UP, Event::Sent(5)),
        [Op::GiveBack(100), Op::Recv(1, t)]
    );
}

#[test]
fn without_spares_a_direction_waits_for_a_buffer_of_any_relay() {
    let mut r = Replay::new();
    r.e.ops.no_spares = true;
    let (a, _ra) = r.add(1, 2);
    let (b, _rb) = r.add(3, 4);
    r.take();
    // b's client direction holds a buffer in a send; a's finds the pool dry and waits
    r.event(b, UP, received(9, 4));
    assert_eq!(r.event(a, UP, Event::NoBuffers), []);
    // b's buffer comes back: a receives again
    assert_eq!(
        r.event(b, UP, Event::Sent(4)),
        [Op::GiveBack(9), Op::Recv(1, token(a, UP))]
    );
}

#[test]
fn a_backend_failure_resets_the_client_and_gives_every_buffer_back() {
    let mut r = Replay::new();
    let (id, mut rx) = r.add(1, 2);
    r.take();
    r.event(id, UP, received(4, 8));
    r.event(id, UP, received(5, 8));
    assert_eq!(
        r.event(
            id,
            DOWN,
            Event::RecvFailed(io::ErrorKind::ConnectionReset.into())
        ),
        [
            Op::Release(1, true),
            Op::Release(2, false),
            Op::GiveBack(4),
            Op::GiveBack(5)
        ]
    );
    let (end, _) = ended(&mut rx).expect("ended");
    assert!(matches!(end, End::Error(Side::Backend, _)), "{end:?}");
    // a send to the backend that fails is the backend's failure too
    let (id, mut rx) = r.add(1, 2);
    r.take();
    r.event(id, UP, received(6, 1));
    assert_eq!(
        r.event(id, UP, Event::SendFailed(io::ErrorKind::BrokenPipe.into())),
        [Op::Release(1, true), Op::Release(2, false), Op::GiveBack(6)]
    );
    let (end, _) = ended(&mut rx).expect("ended");
    assert!(matches!(end, End::Error(Side::Backend, _)), "{end:?}");
    // a client that fails is not reset, nor is the backend
    let (id, mut rx) = r.add(1, 2);
    r.take();
    assert_eq!(
        r.event(
            id,
            UP,
            Event::RecvFailed(io::ErrorKind::ConnectionReset.into())
        ),
        [Op::Release(1, false), Op::Release(2, false)]
    );
    let (end, _) = ended(&mut rx).expect("ended");
    assert!(matches!(end, End::Error(Side::Client, _)), "{end:?}");
}

#[test]
fn a_failed_shutdown_ends_the_relay_naming_the_side() {
    let mut r = Replay::new();
    r.e.ops.shutdown_fails = true;
    let (id, mut rx) = r.add(1, 2);
    r.take();
    assert_eq!(
        r.event(id, UP, Event::Eof),
        [Op::Shutdown(2), Op::Release(1, true), Op::Release(2, false)]
    );
    let (end, _) = ended(&mut rx).expect("ended");
    assert!(matches!(end, End::Error(Side::Backend, _)), "{end:?}");
}

#[test]
fn a_late_completion_of_an_ended_relay_only_gives_its_buffer_back() {
    let mut r = Replay::new();
    let (old, mut rx) = r.add(1, 2);
    r.take();
    r.e.finish(old, End::Idle);
    assert!(matches!(ended(&mut rx), Some((End::Idle, _))));
    assert_eq!(r.take(), [Op::Release(1, false), Op::Release(2, false)]);
    // the slot is reused by a new relay; the old relay's completions name no relay
    let (new, _rx) = r.add(5, 6);
    assert_ne!(token(old, UP), token(new, UP), "a new generation");
    r.take();
    assert_eq!(r.event(old, UP, received(11, 3)), [Op::GiveBack(11)]);
    assert_eq!(r.event(old, DOWN, Event::Eof), []);
    assert_eq!(
        r.event(new, UP, received(12, 3)),
        [
            Op::Send(6, 12, 0, 3, token(new, UP)),
            Op::Recv(5, token(new, UP))
        ]
    );
}

#[test]
fn the_last_bytes_before_an_eof_wait_for_it_and_leave_with_the_shutdown() {
    let mut r = Replay::new();
    let (id, mut rx) = r.add(1, 2);
    r.take();
    let down = token(id, DOWN);
    // bytes with nothing behind them go at once
    assert_eq!(
        r.event(id, DOWN, received(3, 10)),
        [Op::Send(1, 3, 0, 10, down), Op::Recv(2, down)]
    );
    r.event(id, DOWN, Event::Sent(10));
    // bytes the backend's FIN follows: MSG_MORE, and the EOF read at once becomes the
    // shutdown that sends them with the FIN
    assert_eq!(
        r.event(id, DOWN, received_more(4, 5)),
        [Op::SendMore(1, 4, 0, 5, down), Op::Recv(2, down)]
    );
    assert_eq!(r.event(id, DOWN, Event::Eof), []);
    assert_eq!(
        r.event(id, DOWN, Event::Sent(5)),
        [Op::GiveBack(4), Op::Shutdown(1)]
    );
    assert!(ended(&mut rx).is_none());
    // with more queued behind it, a buffer goes without MSG_MORE (the next send follows)
    let up = token(id, UP);
    r.event(id, UP, received_more(5, 4));
    assert_eq!(r.event(id, UP, received_more(6, 4)), [Op::Recv(1, up)]);
    assert_eq!(
        r.event(id, UP, Event::Sent(4)),
        [Op::GiveBack(5), Op::SendMore(2, 6, 0, 4, up)]
    );
}
