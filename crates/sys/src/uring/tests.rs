//! The ring against real loopback TCP sockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;

use super::{BufId, Completion, Done, Ring};

/// A connected pair: (the end the ring adopts, the end the test drives).
fn pair() -> (OwnedFd, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let outer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (inner, _) = l.accept().unwrap();
    outer
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    (inner.into(), outer)
}

fn ring(count: u16) -> Option<Ring> {
    match Ring::new(count, 4096) {
        Ok(r) => Some(r),
        Err(e) if std::env::var_os("PORTICO_CI").is_none() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Waits for the next completion.
fn next(r: &mut Ring) -> Completion {
    let mut out = Vec::new();
    for _ in 0..1000 {
        r.submit_and_wait().unwrap();
        r.complete(&mut out);
        if !out.is_empty() {
            assert_eq!(out.len(), 1, "one at a time here: {out:?}");
            return out.pop().unwrap();
        }
    }
    panic!("no completion");
}

#[test]
fn bytes_received_in_a_provided_buffer_are_sent_from_it() {
    let Some(mut r) = ring(8) else { return };
    let (a, mut a_peer) = pair();
    let (b, mut b_peer) = pair();
    let (a, b) = (r.adopt(a), r.adopt(b));
    assert!(r.recv(a, 1));
    a_peer.write_all(b"hello").unwrap();
    let c = next(&mut r);
    assert_eq!(c.token, 1);
    let Done::Received { buf, len, .. } = c.done else {
        panic!("{c:?}")
    };
    assert_eq!(len, 5);
    assert!(r.send(b, buf, 0, len, false, 2));
    // a give-back while the send reads the buffer waits for the send
    r.give_back(buf);
    let c = next(&mut r);
    assert!(matches!(c.done, Done::Sent(5)), "{c:?}");
    let mut got = [0u8; 5];
    b_peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // and the buffer is the kernel's again: sending from it is refused
    assert!(!r.send(b, buf, 0, 1, false, 3));
}

#[test]
fn eof_and_release_close_the_socket() {
    let Some(mut r) = ring(8) else { return };
    let (a, mut a_peer) = pair();
    let a = r.adopt(a);
    assert!(r.recv(a, 7));
    a_peer.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(next(&mut r).done, Done::Eof));
    r.release(a, false);
    let mut rest = Vec::new();
    a_peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // a released socket takes no operation
    assert!(!r.recv(a, 8));
}

#[test]
fn a_release_with_a_receive_in_flight_ends_it_before_closing() {
    let Some(mut r) = ring(8) else { return };
    let (a, mut a_peer) = pair();
    let a = r.adopt(a);
    assert!(r.recv(a, 1));
    r.submit().unwrap();
    r.release(a, true);
    // the receive completes (the shutdown ended it), then the fd is closed with a reset
    let c = next(&mut r);
    assert_eq!(c.token, 1);
    let mut buf = [0u8; 1];
    let e = a_peer.read(&mut buf);
    assert!(
        matches!(&e, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(e, Ok(0)),
        "{e:?}"
    );
    assert_eq!(r.busy(), 0);
}

#[test]
fn no_free_buffer_is_reported_and_a_given_back_one_is_used_again() {
    let Some(mut r) = ring(1) else { return };
    let (a, mut a_peer) = pair();
    let a = r.adopt(a);
    a_peer.write_all(b"one").unwrap();
    assert!(r.recv(a, 1));
    let Done::Received { buf, .. } = next(&mut r).done else {
        panic!()
    };
    a_peer.write_all(b"two").unwrap();
    assert!(r.recv(a, 2));
    assert!(matches!(next(&mut r).done, Done::NoBuffers));
    r.give_back(buf);
    assert!(r.recv(a, 3));
    let c = next(&mut r);
    assert!(
        matches!(
            c.done,
            Done::Received {
                buf: BufId(0),
                len: 3,
                ..
            }
        ),
        "{c:?}"
    );
}

#[test]
fn a_bad_shape_is_refused_with_the_rule() {
    let e = Ring::new(3, 4096).err().unwrap().to_string();
    assert!(e.contains("power of two"), "{e}");
}

#[test]
fn a_dry_pool_hands_out_spares_that_come_back_for_reuse() {
    let Some(mut r) = ring(1) else { return };
    let (a, mut a_peer) = pair();
    let a = r.adopt(a);
    a_peer.write_all(b"pool").unwrap();
    assert!(r.recv(a, 1));
    let Done::Received { buf: pooled, .. } = next(&mut r).done else {
        panic!()
    };
    a_peer.write_all(b"spare").unwrap();
    assert!(r.recv_spare(a, 2));
    let c = next(&mut r);
    let Done::Received {
        buf: spare, len: 5, ..
    } = c.done
    else {
        panic!("{c:?}")
    };
    assert_ne!(spare, pooled);
    assert!(r.is_spare(spare) && !r.is_spare(pooled));
    // a spare given back is handed out again, and sends work from spares
    let (b, mut b_peer) = pair();
    let b = r.adopt(b);
    assert!(r.send(b, spare, 0, 5, false, 4));
    assert!(matches!(next(&mut r).done, Done::Sent(5)));
    let mut got = [0u8; 5];
    b_peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"spare");
    r.give_back(spare);
    assert!(r.recv_spare(a, 5));
    a_peer.write_all(b"again").unwrap();
    let c = next(&mut r);
    assert!(
        matches!(c.done, Done::Received { buf, len: 5, .. } if buf == spare),
        "{c:?}"
    );
}

#[test]
fn a_receive_says_when_the_socket_holds_more_or_its_eof() {
    let Some(mut r) = ring(8) else { return };
    let (a, mut a_peer) = pair();
    let a = r.adopt(a);
    // bytes alone: nothing more
    a_peer.write_all(b"one").unwrap();
    assert!(r.recv(a, 1));
    match next(&mut r).done {
        Done::Received { buf, len: 3, more } => {
            assert!(!more, "nothing follows the bytes yet");
            r.give_back(buf);
        }
        other => panic!("{other:?}"),
    }
    // bytes and the FIN: the receive of the bytes says more follows
    a_peer.write_all(b"two").unwrap();
    a_peer.shutdown(std::net::Shutdown::Write).unwrap();
    r.with_fd(a, wait_for_fin).expect("a live socket");
    assert!(r.recv(a, 2));
    match next(&mut r).done {
        Done::Received { buf, len: 3, more } => {
            assert!(more, "the EOF follows the bytes");
            r.give_back(buf);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.recv(a, 3));
    assert!(matches!(next(&mut r).done, Done::Eof));
    r.release(a, false);
}

/// Waits (bounded) until the peer's FIN has reached `fd` (`POLLRDHUP`).
fn wait_for_fin(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one live `pollfd` for a descriptor the ring keeps open during the call.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut p, 1, 5_000) };
    assert_eq!(n, 1, "the FIN did not arrive within 5 s");
    assert!(p.revents & libc::POLLRDHUP != 0, "{:#x}", p.revents);
}
