//! UDP: per-client sessions from a `VIP:port` socket to a backend.
//!
//! The first datagram from a client address opens a session: a backend is chosen (health,
//! ejection and breaker slots as for TCP; no queue and no retries), and a connected socket to it
//! is opened from an ephemeral port. Datagrams from the client go out on that socket; replies
//! arriving on it are sent to the client *from the VIP socket*, so the client sees the address it
//! talked to. A session ends after `udp_idle_timeout` (30 s by default) without a datagram either
//! way, when its backend refuses (ICMP port unreachable, counted as a failure), or when its
//! backend drains. With PROXY protocol v2 every datagram towards the backend carries the header
//! (the spec's DGRAM form).
//!
//! # Bounds
//! Sessions live in a [`ConnTable`] per `VIP:port`: at most `max_udp_sessions` (4,096) per port
//! and `max_udp_sessions_per_client` (64) per client address, and over every listener at most the
//! node budget's `udp_sessions`. At a bound the oldest session idle for at least
//! [`EVICT_IDLE`] (of that client, of the port, or of the port when the node budget is spent)
//! is closed to make room (`portico_lb_udp_sessions_evicted_total{reason}`); when none is idle
//! that long the new client is refused (`portico_lb_refused_total{reason}`: `SessionLimit`,
//! `ClientLimit`, `NodeBudget`), so a flood of new source addresses never pushes out a session
//! that is in use. Expiry is one sweep per listener, not a timer per session.
//!
//! Buffers are shared: the listener has one 64 KiB receive buffer, and replies are read on
//! readiness into one buffer per worker thread, so a session costs a socket and a small task,
//! never a buffer of its own.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use model::{Protocol, ProxyProtocol, Service};
use sys::conn_table::{ConnTable, Decision, Pressure, TOUCH_GRANULARITY, TableLimits};
use tokio::net::UdpSocket;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::balance::Reason;
use crate::maglev;
use crate::metrics::Operation;
use crate::service::{BackendRt, ServiceRt};

/// A session idle at least this long may be closed to make room for a new one (or half the
/// idle timeout, when that is shorter).
pub const EVICT_IDLE: Duration = Duration::from_secs(1);
/// Replies read per readiness event before the task yields.
const REPLY_BURST: usize = 64;

thread_local! {
    /// The reply buffer of this worker thread, shared by every session it runs.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65536]);
}

struct Session {
    backend: UdpSocket,
    be: Arc<BackendRt>,
    header: Option<Vec<u8>>,
    /// Ends the session's reply task.
    cancel: CancellationToken,
}

/// The sessions of one listener, with the node budget and gauges kept in step: every entry
/// holds one unit of the node's UDP budget from insert to removal.
struct Sessions {
    svc: Arc<ServiceRt>,
    table: Mutex<ConnTable<SocketAddr, Arc<Session>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable<SocketAddr, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounting for an entry that left the table; ends its task.
    fn gone(&self, s: &Session) {
        s.cancel.cancel();
        self.svc.node.release_udp();
        self.svc.udp_sessions.dec();
    }
}

fn limits(spec: &Service) -> TableLimits {
    let c = &spec.connection;
    TableLimits {
        max_total: c.max_udp_sessions as usize,
        max_per_client: c.max_udp_sessions_per_client as usize,
        evict_idle: EVICT_IDLE.min(c.udp_idle_timeout / 2),
    }
}

fn reason(p: Pressure) -> Reason {
    match p {
        Pressure::TableFull => Reason::SessionLimit,
        Pressure::ClientLimit => Reason::ClientLimit,
        Pressure::Budget => Reason::NodeBudget,
    }
}

/// Serves one UDP `VIP:port` until `cancel`.
pub(crate) async fn serve(
    svc: Arc<ServiceRt>,
    sock: UdpSocket,
    vip: SocketAddr,
    cancel: CancellationToken,
) {
    let sock = Arc::new(sock);
    let sessions = Arc::new(Sessions {
        svc: svc.clone(),
        table: Mutex::new(ConnTable::new(limits(&svc.spec.load()))),
    });
    let mut buf = vec![0u8; 65536];
    let mut idle = svc.spec.load().connection.udp_idle_timeout;
    let mut sweep = tokio::time::interval(sweep_period(idle));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (n, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            _ = sweep.tick() => {
                let spec = svc.spec.load();
                let now_idle = spec.connection.udp_idle_timeout;
                let expired = {
                    let mut t = sessions.lock();
                    t.set_limits(limits(&spec));
                    t.expire(Instant::now(), now_idle)
                };
                for (_, s) in expired {
                    sessions.gone(&s);
                }
                if now_idle != idle {
                    idle = now_idle;
                    sweep = tokio::time::interval(sweep_period(idle));
                    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(service = %svc.name, error = %e, "udp receive failed");
                    continue;
                }
            },
        };
        let existing = {
            let mut t = sessions.lock();
            let s = t.get(&peer).cloned();
            if s.is_some() {
                t.touch(&peer, Instant::now());
            }
            s
        };
        let session = match existing {
            Some(s) => s,
            None => match open(&svc, &sock, &sessions, peer, vip, &cancel).await {
                Some(s) => s,
                None => continue,
            },
        };
        let sent = match &session.header {
            Some(h) => {
                let mut d = Vec::with_capacity(h.len() + n);
                d.extend_from_slice(h);
                d.extend_from_slice(&buf[..n]);
                session.backend.send(&d).await
            }
            None => session.backend.send(&buf[..n]).await,
        };
        match sent {
            Ok(m) => {
                session.be.metrics.bytes_to_backend.inc_by(m as u64);
            }
            Err(e) => {
                tracing::debug!(service = %svc.name, error = %e, "udp send to backend failed")
            }
        }
    }
    let all = sessions.lock().drain();
    for (_, s) in all {
        sessions.gone(&s);
    }
}

fn sweep_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Opens a session for `peer` if the bounds allow, evicting an idle one if they require.
async fn open(
    svc: &Arc<ServiceRt>,
    sock: &Arc<UdpSocket>,
    sessions: &Arc<Sessions>,
    peer: SocketAddr,
    vip: SocketAddr,
    cancel: &CancellationToken,
) -> Option<Arc<Session>> {
    let spec = svc.spec.load_full();
    let port = spec
        .ports
        .iter()
        .find(|p| p.port == vip.port() && p.protocol == Protocol::Udp)?
        .clone();
    // The bounds first: a refused client costs no socket.
    let budget_spent = !svc.node.acquire_udp();
    let decision = sessions
        .lock()
        .check(peer.ip(), Instant::now(), budget_spent);
    let evict = match decision {
        Decision::Admit => None,
        Decision::Evict(k, p) => Some((k, p)),
        Decision::Refuse(p) => {
            if !budget_spent {
                svc.node.release_udp();
            }
            svc.count_refused(reason(p));
            tracing::debug!(service = %svc.name, client = %peer, reason = %reason(p), "udp session refused");
            return None;
        }
    };
    if let Some((k, p)) = evict {
        let old = sessions.lock().remove(&k);
        if let Some(old) = old {
            sessions.gone(&old);
            svc.count_evicted(reason(p));
            tracing::debug!(service = %svc.name, client = %k, reason = %reason(p), "idle udp session evicted");
        }
        if budget_spent && !svc.node.acquire_udp() {
            // Another listener took the unit just freed.
            svc.count_refused(Reason::NodeBudget);
            return None;
        }
    }
    // From here this session holds one unit of the node budget.
    let be = match svc.admit_udp(maglev::client_hash(peer.ip())) {
        Ok(be) => be,
        Err(reason) => {
            svc.node.release_udp();
            svc.count_refused(reason);
            tracing::debug!(service = %svc.name, client = %peer, %reason, "udp session refused");
            return None;
        }
    };
    let target = be.target(&port);
    let backend = match connected(target).await {
        Ok(b) => b,
        Err(e) => {
            if !svc.node.local_error(Operation::udp_session, &e) {
                tracing::debug!(service = %svc.name, error = %e, "udp session socket");
            }
            svc.release_udp(be);
            svc.node.release_udp();
            svc.count_refused(Reason::LocalResources);
            return None;
        }
    };
    be.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    be.metrics.connections.inc();
    let header = match spec.proxy_protocol {
        Some(ProxyProtocol::V2) => Some(crate::proxy_protocol::encode_v2(Protocol::Udp, peer, vip)),
        _ => None,
    };
    let session = Arc::new(Session {
        backend,
        be,
        header,
        cancel: cancel.child_token(),
    });
    sessions
        .lock()
        .insert(peer, peer.ip(), Instant::now(), session.clone());
    svc.udp_sessions.inc();
    tokio::spawn(replies(
        svc.clone(),
        sock.clone(),
        sessions.clone(),
        session.clone(),
        peer,
    ));
    Some(session)
}

/// A UDP socket connected to `target` from an ephemeral port.
async fn connected(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(target).await?;
    Ok(s)
}

/// Relays a session's replies until it ends; then gives its entry and slots back.
async fn replies(
    svc: Arc<ServiceRt>,
    sock: Arc<UdpSocket>,
    sessions: Arc<Sessions>,
    session: Arc<Session>,
    peer: SocketAddr,
) {
    let drain = session.be.drain.clone();
    let mut touched = Instant::now();
    loop {
        tokio::select! {
            () = session.cancel.cancelled() => break,
            () = drain.cancelled() => break,
            r = session.backend.readable() => {
                let r = r.and_then(|()| relay_ready(&session, &sock, peer));
                match r {
                    Ok(0) => {}
                    Ok(bytes) => {
                        session.be.metrics.bytes_to_client.inc_by(bytes);
                        let now = Instant::now();
                        if now.saturating_duration_since(touched) >= TOUCH_GRANULARITY {
                            touched = now;
                            sessions.lock().touch(&peer, now);
                        }
                    }
                    Err(e) => {
                        if !svc.node.local_error(Operation::udp_session, &e) {
                            // ICMP port unreachable surfaces as ECONNREFUSED on a connected socket.
                            tracing::debug!(service = %svc.name, backend = %session.be.name, error = %e, "udp backend error");
                            svc.record_failure(&session.be);
                        }
                        break;
                    }
                }
            }
        }
    }
    let mine = sessions
        .lock()
        .remove_if(&peer, |s| Arc::ptr_eq(s, &session));
    if let Some(s) = mine {
        sessions.gone(&s);
    }
    svc.release_udp(session.be.clone());
}

/// Reads what the backend sent (up to [`REPLY_BURST`] datagrams) into this thread's buffer and
/// sends each to the client from the VIP socket. Returns the bytes relayed.
fn relay_ready(session: &Session, sock: &UdpSocket, peer: SocketAddr) -> std::io::Result<u64> {
    REPLY_BUF.with_borrow_mut(|buf| {
        let mut bytes = 0u64;
        for _ in 0..REPLY_BURST {
            match session.backend.try_recv(buf) {
                Ok(n) => {
                    // A full client-side queue drops the datagram, as the network would.
                    if sock.try_send_to(&buf[..n], peer).is_ok() {
                        bytes += n as u64;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(bytes)
    })
}
