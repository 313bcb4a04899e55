//! UDP: per-client sessions from a `VIP:port` socket to a backend.
//!
//! The first datagram from a client address opens a session: a backend is chosen (health,
//! ejection and breaker slots as for TCP; no queue and no retries), and a connected socket to it
//! is opened from an ephemeral port. Datagrams from the client go out on that socket; replies
//! arriving on it are sent to the client *from the VIP socket*, so the client sees the address it
//! talked to. A session ends after `idle_timeout` without a datagram either way, when its backend
//! refuses (ICMP port unreachable, counted as a failure), or when its backend drains. With PROXY
//! protocol v2 every datagram towards the backend carries the header (the spec's DGRAM form).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use model::{Protocol, ProxyProtocol};
use tokio::net::UdpSocket;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::maglev;
use crate::service::{BackendRt, ServiceRt};

struct Session {
    backend: Arc<UdpSocket>,
    be: Arc<BackendRt>,
    /// Milliseconds since `born` of the last datagram.
    last: AtomicU64,
    born: Instant,
    header: Option<Vec<u8>>,
}

impl Session {
    fn touch(&self) {
        self.last
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

/// Serves one UDP `VIP:port` until `cancel`.
pub(crate) async fn serve(
    svc: Arc<ServiceRt>,
    sock: UdpSocket,
    vip: SocketAddr,
    cancel: CancellationToken,
) {
    let sock = Arc::new(sock);
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(service = %svc.name, error = %e, "udp receive failed");
                    continue;
                }
            },
        };
        let existing = sessions.lock().expect("sessions lock").get(&peer).cloned();
        let session = match existing {
            Some(s) => s,
            None => match open(&svc, &sock, &sessions, peer, vip, &cancel).await {
                Some(s) => s,
                None => continue,
            },
        };
        session.touch();
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
    // Sessions end with their tasks (they watch `cancel`).
}

async fn open(
    svc: &Arc<ServiceRt>,
    sock: &Arc<UdpSocket>,
    sessions: &Sessions,
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
    let be = match svc.admit_udp(maglev::client_hash(peer.ip())) {
        Ok(be) => be,
        Err(reason) => {
            tracing::debug!(service = %svc.name, client = %peer, %reason, "udp session refused");
            return None;
        }
    };
    let target = be.target(&port);
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let backend = match UdpSocket::bind(bind).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(service = %svc.name, error = %e, "udp session socket");
            svc.release_udp(be);
            return None;
        }
    };
    if let Err(e) = backend.connect(target).await {
        tracing::debug!(service = %svc.name, error = %e, "udp connect");
        svc.release_udp(be);
        return None;
    }
    be.total.fetch_add(1, Ordering::Relaxed);
    be.metrics.connections.inc();
    let header = match spec.proxy_protocol {
        Some(ProxyProtocol::V2) => Some(crate::proxy_protocol::encode_v2(Protocol::Udp, peer, vip)),
        _ => None,
    };
    let session = Arc::new(Session {
        backend: Arc::new(backend),
        be,
        last: AtomicU64::new(0),
        born: Instant::now(),
        header,
    });
    sessions
        .lock()
        .expect("sessions lock")
        .insert(peer, session.clone());
    let idle = spec.connection.idle_timeout;
    tokio::spawn(replies(
        svc.clone(),
        sock.clone(),
        sessions.clone(),
        session.clone(),
        peer,
        idle,
        cancel.clone(),
    ));
    Some(session)
}

async fn replies(
    svc: Arc<ServiceRt>,
    sock: Arc<UdpSocket>,
    sessions: Sessions,
    session: Arc<Session>,
    peer: SocketAddr,
    idle: Duration,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65536];
    let tick = (idle / 4).max(Duration::from_millis(10));
    let drain = session.be.drain.clone();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = drain.cancelled() => break,
            r = session.backend.recv(&mut buf) => match r {
                Ok(n) => {
                    session.touch();
                    if sock.send_to(&buf[..n], peer).await.is_ok() {
                        session.be.metrics.bytes_to_client.inc_by(n as u64);
                    }
                }
                Err(e) => {
                    // ICMP port unreachable surfaces as ECONNREFUSED on a connected socket.
                    tracing::debug!(service = %svc.name, backend = %session.be.name, error = %e, "udp backend error");
                    svc.record_failure(&session.be);
                    break;
                }
            },
            () = tokio::time::sleep(tick) => {
                let last = Duration::from_millis(session.last.load(Ordering::Relaxed));
                if session.born.elapsed().saturating_sub(last) >= idle {
                    break;
                }
            }
        }
    }
    sessions.lock().expect("sessions lock").remove(&peer);
    svc.release_udp(session.be.clone());
}
