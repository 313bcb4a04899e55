//! Opening a backend connection and passing on its first bytes, before the relay takes over:
//! the non-blocking connect (with `TCP_QUICKACK` off, so the ACK of the backend's SYN-ACK rides
//! on the first bytes), then the first move of either side, read for real (no `MSG_PEEK`) into
//! a buffer that a refused or dead backend hands on to the next one.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::relay;

/// How a fresh backend connection starts.
pub(crate) enum FirstMove {
    /// One side has spoken and its first bytes were passed on: relay the rest.
    Go(Moved),
    /// The backend refused, closed or reset before taking a byte or sending one: it has seen
    /// nothing of this client (a refused connect, or it died with the connection still in its
    /// accept queue), so another backend can take the client exactly as after a refused
    /// connect, with the client bytes read so far.
    BackendGone(std::io::Error),
    /// Neither side spoke within the idle timeout, the backend is being drained away, or a
    /// socket failed after the backend had taken part of the client's bytes.
    End,
}

/// Bytes [`first_move`] passed on.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Moved {
    pub(crate) to_backend: u64,
    pub(crate) to_client: u64,
}

/// The client's first bytes, read into a pooled copy buffer and kept across connect retries
/// until a backend takes them.
pub(crate) struct Early {
    buf: relay::Buf,
    len: usize,
    /// The client closed its side before sending a byte.
    eof: bool,
}

impl Early {
    pub(crate) fn new() -> Self {
        Self {
            buf: relay::Buf::get(),
            len: 0,
            eof: false,
        }
    }
}

/// Sends the PROXY header (if any), then waits for the first byte in either direction and
/// passes it on with real reads (no `MSG_PEEK`: the client's bytes are read once, into a buffer
/// that outlives a failed backend). Adds no wait: it returns as soon as either side has spoken.
///
/// The backend is looked at first, through its readiness (no system call unless the connect
/// wait saw something to read): a refused connect, a reset or an EOF there means the backend
/// has seen nothing of this client. The client's bytes go to the backend in one write, which
/// also carries the ACK of the backend's SYN-ACK that [`connect`] held back. When the client
/// has nothing yet, that ACK is sent at once (`TCP_QUICKACK`), so a backend that speaks first
/// (MySQL, SMTP) accepts and greets without waiting for the delayed-ACK timer.
pub(crate) async fn first_move(
    client: &TcpStream,
    backend: &TcpStream,
    header: Option<&[u8]>,
    early: &mut Early,
    idle: std::time::Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> FirstMove {
    use std::io::ErrorKind;
    if let Some(h) = header
        && let (_, Err(e)) = write_all(backend, h).await
    {
        return FirstMove::BackendGone(e);
    }
    let idle = async {
        if idle.is_zero() {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(idle).await
        }
    };
    tokio::pin!(idle);
    // a PROXY header carried the ACK already
    let mut acked = header.is_some();
    loop {
        if early.len == 0 && !early.eof {
            // The backend first: it answered, refused, reset or closed?
            let buf = early.buf.bytes();
            match relay::read_draining(backend, buf) {
                Ok(0) => {
                    return FirstMove::BackendGone(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "backend closed before its first byte",
                    ));
                }
                Ok(n) => {
                    return match write_all(client, &buf[..n]).await {
                        (_, Ok(())) => FirstMove::Go(Moved {
                            to_backend: 0,
                            to_client: n as u64,
                        }),
                        (_, Err(_)) => FirstMove::End,
                    };
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return FirstMove::BackendGone(e),
            }
            // Then the client.
            match relay::read_draining(client, buf) {
                Ok(0) => early.eof = true,
                Ok(n) => early.len = n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return FirstMove::End,
            }
        }
        if early.len > 0 {
            let len = early.len;
            return match write_all(backend, &early.buf.bytes()[..len]).await {
                (_, Ok(())) => FirstMove::Go(Moved {
                    to_backend: len as u64,
                    to_client: 0,
                }),
                // nothing taken: the next backend gets the same bytes
                (0, Err(e)) => FirstMove::BackendGone(e),
                (_, Err(_)) => FirstMove::End,
            };
        }
        if early.eof {
            // the relay reads the EOF again and passes it on
            return FirstMove::Go(Moved::default());
        }
        if !acked {
            acked = true;
            let _ = rustix::net::sockopt::set_tcp_quickack(backend, true);
        }
        tokio::select! {
            biased;
            r = backend.readable() => {
                if let Err(e) = r {
                    return FirstMove::BackendGone(e);
                }
            }
            r = client.readable() => {
                if r.is_err() {
                    return FirstMove::End;
                }
            }
            () = &mut idle => return FirstMove::End,
            () = cancel.cancelled() => return FirstMove::End,
        }
    }
}

/// Opens the backend connection: a non-blocking `connect` and a wait for writability. The
/// outcome is not read with `getsockopt(SO_ERROR)` (one syscall per connection saved): a refused
/// or reset connect shows as readiness too, and [`first_move`]'s read or write returns its
/// error, which is then handled as a failed connect.
///
/// `TCP_QUICKACK` is off before the connect (HAProxy's `tcp-smart-connect`): the ACK of the
/// backend's SYN-ACK is not sent on its own but rides on the first bytes [`first_move`] writes,
/// one packet less per connection; [`first_move`] sends it at once when the client has nothing
/// to say yet. No keepalive here: the relay turns it on for connections that live long enough
/// to need it ([`relay::KEEPALIVE_AFTER`]).
pub(crate) async fn connect(
    target: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_quickack(false)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(r) => r.map(|()| stream),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Writes all of `buf`; also says how many bytes were written before an error.
async fn write_all(s: &TcpStream, buf: &[u8]) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < buf.len() {
        if let Err(e) = s.writable().await {
            return (done, Err(e));
        }
        match s.try_write(&buf[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}
