//! The thin tokio driver: sockets in, [`crate::respond::respond`] in the middle, sockets out;
//! and the loop that rebuilds the [`Snapshot`] whenever desired state, health or ownership
//! changes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use model::{Desired, DnsAnswerState, HealthView, OwnershipView};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::{LocalCounts, Metrics};
use crate::respond::{Limits, Transport, respond};
use crate::snapshot::Snapshot;

/// Errors of the tokio driver.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket failed beyond the per-packet errors that are counted and skipped.
    #[error("dns socket: {0}")]
    Io(#[from] io::Error),
}

/// Largest request read from UDP; anything longer arrives cut and is answered FORMERR.
const UDP_RECV: usize = 4096;
/// Queries a UDP worker handles before it yields to the runtime and checks for shutdown.
const UDP_BATCH: u32 = 64;
/// Idle time after which a TCP connection is closed (RFC 7766 §6.2.3: seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Concurrent TCP connections; further ones are closed at once.
const TCP_MAX: usize = 256;

/// State shared by the workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub limits: Limits,
}

/// Serves one UDP socket until `stop`.
pub(crate) async fn udp_worker(
    shared: Arc<Shared>,
    sock: UdpSocket,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut buf = vec![0u8; UDP_RECV];
    let mut out = Vec::with_capacity(usize::from(u16::MAX));
    let mut counts = LocalCounts::default();
    let mut batch = 0u32;
    loop {
        match sock.try_recv_from(&mut buf) {
            Ok((n, peer)) => {
                let outcome = respond(
                    &shared.snapshot.load(),
                    &buf[..n],
                    Transport::Udp,
                    shared.limits,
                    &mut out,
                );
                counts.record(Transport::Udp, outcome);
                if outcome.is_some() && sock.send_to(&out, peer).await.is_err() {
                    counts.io_error();
                }
                batch += 1;
                if batch >= UDP_BATCH {
                    batch = 0;
                    shared.metrics.flush(&mut counts);
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if counts.pending > 0 {
                    shared.metrics.flush(&mut counts);
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return Ok(()),
                    r = sock.readable() => r?,
                }
            }
            // ICMP errors surface here (ECONNREFUSED from an earlier reply); count and go on.
            Err(_) => counts.io_error(),
        }
    }
}

/// Accepts TCP connections until `stop`; each is served by its own task.
pub(crate) async fn tcp_acceptor(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let slots = Arc::new(Semaphore::new(TCP_MAX));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, _peer) = match accepted {
            Ok(s) => s,
            // Per-connection failures (ECONNABORTED, EMFILE…): count, pause briefly, go on.
            Err(_) => {
                let mut c = LocalCounts::default();
                c.io_error();
                shared.metrics.flush(&mut c);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.tcp_rejected.inc();
            continue;
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tracker.spawn(async move {
            shared.metrics.tcp_connections.inc();
            tcp_connection(&shared, stream, &stop).await;
            shared.metrics.tcp_connections.dec();
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves one TCP connection: length-prefixed queries answered in order (RFC 7766).
async fn tcp_connection(shared: &Shared, mut stream: TcpStream, stop: &CancellationToken) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut frame = Vec::new();
    let mut counts = LocalCounts::default();
    loop {
        let read = async {
            let n = stream.read_u16().await? as usize;
            buf.resize(n, 0);
            stream.read_exact(&mut buf).await?;
            Ok::<_, io::Error>(())
        };
        let ok = tokio::select! {
            biased;
            () = stop.cancelled() => false,
            r = tokio::time::timeout(TCP_IDLE, read) => matches!(r, Ok(Ok(()))),
        };
        if !ok {
            break;
        }
        let outcome = respond(
            &shared.snapshot.load(),
            &buf,
            Transport::Tcp,
            shared.limits,
            &mut out,
        );
        counts.record(Transport::Tcp, outcome);
        if outcome.is_none() {
            break;
        }
        frame.clear();
        frame.extend_from_slice(&(out.len() as u16).to_be_bytes());
        frame.extend_from_slice(&out);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.write_all(&frame)).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    shared.metrics.flush(&mut counts);
}

/// Rebuilds the snapshot whenever any input changes, until `stop`.
pub(crate) async fn rebuild_loop(
    shared: &Shared,
    mut desired: watch::Receiver<Arc<Desired>>,
    mut health: watch::Receiver<Arc<HealthView>>,
    mut ownership: watch::Receiver<Arc<OwnershipView>>,
    stop: &CancellationToken,
) {
    let (mut d_open, mut h_open, mut o_open) = (true, true, true);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            r = desired.changed(), if d_open => d_open = r.is_ok(),
            r = health.changed(), if h_open => h_open = r.is_ok(),
            r = ownership.changed(), if o_open => o_open = r.is_ok(),
        }
        rebuild(shared, &mut desired, &mut health, &mut ownership);
    }
}

/// Builds and publishes a snapshot from the current values.
pub(crate) fn rebuild(
    shared: &Shared,
    desired: &mut watch::Receiver<Arc<Desired>>,
    health: &mut watch::Receiver<Arc<HealthView>>,
    ownership: &mut watch::Receiver<Arc<OwnershipView>>,
) {
    let d = desired.borrow_and_update().clone();
    let h = health.borrow_and_update().clone();
    let o = ownership.borrow_and_update().clone();
    let snap = Snapshot::build(d.generation, &d.config, &h, &o);
    let prev = shared.snapshot.load();
    if prev.generation != snap.generation {
        for w in snap.warnings() {
            tracing::warn!(generation = snap.generation, "dns: {w}");
        }
    }
    for s in snap.status() {
        let before = prev
            .status()
            .iter()
            .find(|p| p.name == s.name)
            .map(|p| p.state);
        if before.is_some_and(|b| b != s.state) {
            tracing::info!(service = %s.service, name = %s.name, state = ?s.state, "dns answer state changed");
        }
    }
    let count = |st| snap.status().iter().filter(|s| s.state == st).count() as i64;
    shared
        .metrics
        .fail_open
        .set(count(DnsAnswerState::FailOpen));
    shared
        .metrics
        .fail_closed
        .set(count(DnsAnswerState::FailClosed));
    shared.metrics.names.set(snap.name_count() as i64);
    shared.metrics.rebuilds.inc();
    shared.snapshot.store(Arc::new(snap));
}

fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // A larger receive queue absorbs bursts; the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn try_bind(
    addr: SocketAddr,
    udp_sockets: usize,
) -> io::Result<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    let first = udp_socket(addr)?;
    let addr = SocketAddr::new(addr.ip(), first.local_addr()?.port());
    let mut udp = vec![first];
    for _ in 1..udp_sockets.max(1) {
        udp.push(udp_socket(addr)?);
    }
    let tcp = tcp_listener(addr)?;
    Ok((udp, tcp))
}

/// Opens `udp_sockets` UDP sockets sharing `addr` with `SO_REUSEPORT` (the kernel spreads
/// clients over them) and a TCP listener on the same address. With port 0, one ephemeral port
/// is chosen for all of them. Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr, udp_sockets: usize) -> io::Result<(Vec<UdpSocket>, TcpListener)> {
    let mut attempt = 0;
    let (udp, tcp) = loop {
        match try_bind(addr, udp_sockets) {
            Ok(s) => break s,
            // The ephemeral UDP port can be taken for TCP; pick another.
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse && attempt < 16 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    };
    let udp = udp
        .into_iter()
        .map(UdpSocket::from_std)
        .collect::<io::Result<Vec<_>>>()?;
    Ok((udp, TcpListener::from_std(tcp)?))
}
