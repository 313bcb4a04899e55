//! A TCP listener on tokio's poller whose accepted sockets are not registered with it: the
//! caller registers each one where it is served (`tokio::net::TcpStream::from_std` on that
//! worker's runtime), so a socket handed to another thread or closed at once never costs an
//! `epoll_ctl` pair on the accepting one. `tokio::net::TcpListener::accept` registers every
//! socket it returns.

use std::io;
use std::net::SocketAddr;

use rustix::net::SocketFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A non-blocking listener registered with the current tokio runtime (read interest only).
pub struct Acceptor(AsyncFd<std::net::TcpListener>);

impl Acceptor {
    /// Makes `listener` non-blocking and registers it with the current runtime's poller.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        // SAFETY: the listener owns its descriptor, and `as_raw_fd` returns that same one
        // until the `AsyncFd`, which owns the listener from here on, drops it.
        #[allow(unsafe_code)]
        let afd = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
        Ok(Self(afd))
    }

    /// The listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// The next connection (one `accept4`: non-blocking and close-on-exec from the start) and
    /// its peer. The socket is registered with no poller yet.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            let Ok(accepted) = ready.try_io(|l| {
                rustix::net::acceptfrom_with(
                    l.get_ref(),
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                )
                .map_err(io::Error::from)
            }) else {
                continue; // would block: readiness cleared, wait again
            };
            let (fd, peer) = accepted?;
            let stream = std::net::TcpStream::from(fd);
            let peer = match peer.and_then(|p| SocketAddr::try_from(p).ok()) {
                Some(p) => p,
                None => stream.peer_addr()?,
            };
            return Ok((stream, peer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn accepted_sockets_are_non_blocking_with_their_peer_and_carry_bytes() {
        let acceptor =
            Acceptor::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).expect("new");
        let addr = acceptor.local_addr().expect("addr");
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.write_all(b"ping").expect("write");
            let mut back = [0u8; 4];
            c.read_exact(&mut back).expect("read");
            (c.local_addr().expect("local"), back)
        });
        let (stream, peer) = acceptor.accept().await.expect("accept");
        // non-blocking from accept4 itself: tokio can take it over as it is
        let stream = tokio::net::TcpStream::from_std(stream).expect("register");
        let mut buf = [0u8; 4];
        stream.readable().await.expect("readable");
        let mut got = 0;
        while got < 4 {
            match stream.try_read(&mut buf[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stream.readable().await.expect("readable");
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(&buf, b"ping");
        stream.writable().await.expect("writable");
        assert_eq!(stream.try_write(b"pong").expect("write"), 4);
        let (client_addr, back) = client.await.expect("client");
        assert_eq!(peer, client_addr);
        assert_eq!(&back, b"pong");
    }

    #[tokio::test]
    async fn a_listener_with_nothing_pending_waits_instead_of_failing() {
        let acceptor =
            Acceptor::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).expect("new");
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), acceptor.accept()).await;
        assert!(
            waited.is_err(),
            "accept returned with no connection: {waited:?}"
        );
    }
}
