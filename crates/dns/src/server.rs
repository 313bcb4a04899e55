//! The thin driver: sockets in, [`crate::respond::respond`] in the middle, sockets out; and the
//! loop that rebuilds the [`Snapshot`] whenever desired state, health or ownership changes.
//!
//! UDP is served by one dedicated OS thread per socket doing blocking receives and batched
//! `sendmmsg` sends: measured against tokio tasks on the same sockets it costs about half the
//! CPU per query, because an idle socket parks the thread in `recvfrom` instead of going
//! through epoll, and a burst of answers leaves in one system call. TCP (rare, and with
//! per-connection timeouts) runs on tokio.
//!
//! TCP connections are bounded by a [`sys::conn_table::ConnTable`]: [`TCP_MAX`] in all and
//! [`TCP_MAX_PER_CLIENT`] per client address. At a bound the connection idle longest (at least
//! [`TCP_EVICT_IDLE`] since its last query) is closed to make room; if none is, the newcomer is
//! closed at once. So idle connections cannot starve queries, whoever holds them
//! (`portico_dns_tcp_rejected_total{reason}` counts both).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use model::{Desired, DnsAnswerState, HealthView, OwnershipView};
use socket2::{Domain, Protocol, Socket, Type};
use sys::conn_table::{Admission, ConnTable, Pressure, TableLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{LocalCounts, Metrics};
use crate::respond::{Limits, Transport, respond, respond_oversized};
use crate::snapshot::Snapshot;

/// Errors of the tokio driver.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket failed beyond the per-packet errors that are counted and skipped.
    #[error("dns socket: {0}")]
    Io(#[from] io::Error),
}

/// Largest request read from UDP; anything longer arrives cut (`MSG_TRUNC` tells) and is
/// answered FORMERR.
const UDP_RECV: usize = 4096;
/// Queries a UDP thread takes off its socket per wake-up and answers with one `sendmmsg`.
pub(crate) const UDP_BATCH: usize = 32;
/// How often an idle UDP thread wakes to notice shutdown and flush metrics.
const UDP_IDLE_WAKE: Duration = Duration::from_millis(100);
/// Idle time after which a TCP connection is closed (RFC 7766 §6.2.3: seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Concurrent TCP connections.
pub const TCP_MAX: usize = 256;
/// Concurrent TCP connections per client address.
pub const TCP_MAX_PER_CLIENT: usize = 16;
/// A TCP connection without a query for this long may be closed for a newcomer.
pub const TCP_EVICT_IDLE: Duration = Duration::from_secs(1);

/// State shared by the workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub limits: Limits,
}

/// Serves one UDP socket on a dedicated thread with blocking receives until `stop`: after each
/// blocking receive it drains up to `batch - 1` more queued queries without waiting, answers
/// them all, and sends the answers with one `sendmmsg` call.
pub(crate) fn udp_thread(
    shared: &Shared,
    sock: std::net::UdpSocket,
    stop: &CancellationToken,
    batch: usize,
) -> Result<(), ServerError> {
    use rustix::io::Errno;
    use rustix::net::{MMsgHdr, RecvFlags, SendAncillaryBuffer, SendFlags, SocketAddrAny};
    use std::io::IoSlice;

    let batch = batch.clamp(1, 64);
    sock.set_nonblocking(false)?;
    // Wake up now and then to notice shutdown and flush metrics.
    sock.set_read_timeout(Some(UDP_IDLE_WAKE))?;
    let mut bufs = vec![[0u8; UDP_RECV]; batch];
    let mut outs: Vec<Vec<u8>> = (0..batch).map(|_| Vec::with_capacity(1500)).collect();
    let mut peers: Vec<Option<SocketAddrAny>> = vec![None; batch];
    let mut lens = vec![0usize; batch];
    // Whether a datagram was longer than `UDP_RECV` (cut by the kernel): answered FORMERR.
    let mut cut = vec![false; batch];
    let mut counts = LocalCounts::default();
    loop {
        if counts.pending >= 1024 {
            shared.metrics.flush(&mut counts);
            if stop.is_cancelled() {
                return Ok(());
            }
        }
        let mut n = 0;
        // TRUNC: the kernel reports a datagram's real length even when it was cut.
        let mut flags = RecvFlags::TRUNC;
        while n < batch {
            match rustix::net::recvfrom(&sock, &mut bufs[n][..], flags) {
                Ok((len, real, Some(peer))) => {
                    lens[n] = len;
                    cut[n] = real > len;
                    peers[n] = Some(peer);
                    n += 1;
                    flags = RecvFlags::DONTWAIT | RecvFlags::TRUNC;
                }
                Ok((_, _, None)) => {}
                Err(Errno::AGAIN | Errno::INTR) => break,
                Err(_) => {
                    counts.io_error();
                    break;
                }
            }
        }
        if n == 0 {
            shared.metrics.flush(&mut counts);
            if stop.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        {
            let snap = shared.snapshot.load();
            for i in 0..n {
                let o = if cut[i] {
                    respond_oversized(&bufs[i][..lens[i]], &mut outs[i])
                } else {
                    respond(
                        &snap,
                        &bufs[i][..lens[i]],
                        Transport::Udp,
                        shared.limits,
                        &mut outs[i],
                    )
                };
                counts.record(Transport::Udp, o);
                if o.is_none() {
                    peers[i] = None;
                }
            }
        }
        if batch == 1 {
            if let Some(peer) = &peers[0]
                && rustix::net::sendto(&sock, &outs[0], SendFlags::empty(), peer).is_err()
            {
                counts.io_error();
            }
            continue;
        }
        let iovs: Vec<[IoSlice<'_>; 1]> = outs[..n].iter().map(|o| [IoSlice::new(o)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..n).map(|_| SendAncillaryBuffer::default()).collect();
        let mut msgs: Vec<MMsgHdr<'_>> = Vec::with_capacity(n);
        for ((peer, iov), control) in peers[..n].iter().zip(&iovs).zip(controls.iter_mut()) {
            if let Some(peer) = peer {
                msgs.push(MMsgHdr::new_with_addr(peer, iov, control));
            }
        }
        let mut sent = 0;
        while sent < msgs.len() {
            match rustix::net::sendmmsg(&sock, &mut msgs[sent..], SendFlags::empty()) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(Errno::INTR) => {}
                // One bad destination fails the call: skip that message and go on.
                Err(_) => {
                    counts.io_error();
                    sent += 1;
                }
            }
        }
    }
}

type TcpTable = Arc<std::sync::Mutex<ConnTable<u64, CancellationToken>>>;

fn lock(t: &TcpTable) -> std::sync::MutexGuard<'_, ConnTable<u64, CancellationToken>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts TCP connections until `stop`; each is served by its own task.
pub(crate) async fn tcp_acceptor(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let table: TcpTable = Arc::new(std::sync::Mutex::new(ConnTable::new(TableLimits {
        max_total: TCP_MAX,
        max_per_client: TCP_MAX_PER_CLIENT,
        evict_idle: TCP_EVICT_IDLE,
    })));
    let tracker = tokio_util::task::TaskTracker::new();
    let log = sys::limits::LogEvery::new(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(10);
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            // Per-connection failures (ECONNABORTED, EMFILE…): count, back off, go on.
            Err(e) => {
                let mut c = LocalCounts::default();
                c.io_error();
                shared.metrics.flush(&mut c);
                if log.check(tokio::time::Instant::now()).is_some() {
                    tracing::warn!(error = %e, "dns: TCP accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        next_id += 1;
        let id = next_id;
        let conn_stop = stop.child_token();
        let admitted = lock(&table).admit(
            id,
            peer.ip(),
            tokio::time::Instant::now(),
            conn_stop.clone(),
            false,
        );
        match admitted {
            Admission::Admitted => {}
            Admission::Evicted(_, old, _) => {
                old.cancel();
                shared
                    .metrics
                    .tcp_rejected
                    .get_or_create(&[("reason", "evicted")])
                    .inc();
            }
            Admission::Refused(why) => {
                let reason = match why {
                    Pressure::ClientLimit => "clientLimit",
                    _ => "tableFull",
                };
                shared
                    .metrics
                    .tcp_rejected
                    .get_or_create(&[("reason", reason)])
                    .inc();
                continue;
            }
        }
        let (shared, table) = (shared.clone(), table.clone());
        tracker.spawn(async move {
            shared.metrics.tcp_connections.inc();
            tcp_connection(&shared, stream, &conn_stop, |now| {
                lock(&table).touch(&id, now)
            })
            .await;
            lock(&table).remove(&id);
            shared.metrics.tcp_connections.dec();
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves one TCP connection: length-prefixed queries answered in order (RFC 7766). `active`
/// is told after each answered query.
async fn tcp_connection(
    shared: &Shared,
    mut stream: TcpStream,
    stop: &CancellationToken,
    mut active: impl FnMut(tokio::time::Instant),
) {
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
        let written = tokio::select! {
            biased;
            () = stop.cancelled() => false,
            r = tokio::time::timeout(TCP_IDLE, stream.write_all(&frame)) => matches!(r, Ok(Ok(()))),
        };
        if !written {
            break;
        }
        active(tokio::time::Instant::now());
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
