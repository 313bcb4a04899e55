//! The tokio driver of one BGP session: connects through an injected connector, feeds octets,
//! routes and time to the pure [`Session`] and performs its actions. Library code never binds or
//! dials fixed addresses: the speaker passes a connector (TCP to the peer from the configured
//! source, with MD5 if set, or the next accepted connection of a passive peer); tests pass an
//! in-memory stream. A connect in progress, a read and every timer wait together, so a
//! shutdown or a route change never waits for a slow peer; a write that does not finish within
//! [`WRITE_TIMEOUT`] counts as a lost connection.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::session::{Action, Session, State};
use crate::speaker::Routes;

/// How long one write may take before the connection counts as lost.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream to the peer.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection being opened: the stream and this side's address (the next hop when none is
/// configured).
pub type Connecting =
    Pin<Box<dyn Future<Output = std::io::Result<(Box<dyn Stream>, Option<IpAddr>)>> + Send>>;

/// Opens a connection to the peer (a fresh one per attempt).
pub type Connector = Box<dyn FnMut() -> Connecting + Send>;

/// What the driver publishes about its session.
#[derive(Debug, Clone)]
pub struct Status {
    /// The state.
    pub state: State,
    /// When it entered that state.
    pub since: SystemTime,
    /// The last reason word it went down with (`None` before the first time).
    pub last_down: Option<&'static str>,
    /// The last error: the reason word and what happened (a NOTIFICATION, a connect error).
    pub last_error: Option<String>,
    /// Times it left Established.
    pub flaps: u64,
    /// Routes the peer has from us.
    pub routes: usize,
    /// UPDATE messages sent.
    pub updates_sent: u64,
    /// The routes snapshot the peer has completely (written to the socket), when it does.
    pub synced: Option<Arc<Routes>>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Idle,
            since: SystemTime::now(),
            last_down: None,
            last_error: None,
            flaps: 0,
            routes: 0,
            updates_sent: 0,
            synced: None,
        }
    }
}

/// Runs the session until `shutdown` (then sends a Cease and closes). `routes` are the routes
/// to announce; `bfd_down` turns true when BFD declares the peer down (the session drops at
/// once; it turns false again when BFD is back up). A closed `routes` or `bfd_down` channel
/// keeps its last value.
pub async fn run(
    mut session: Session,
    mut connect: Connector,
    mut routes: watch::Receiver<Arc<Routes>>,
    mut bfd_down: watch::Receiver<bool>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let mut stream: Option<Box<dyn Stream>> = None;
    let mut connecting: Option<Connecting> = None;
    let mut buf = vec![0u8; 4096];
    let mut current = routes.borrow_and_update().clone();
    session.set_routes(current.clone());
    let mut pending = session.start(Instant::now());
    let mut st = status.borrow().clone();
    let mut up = false;
    // A closed routes or BFD channel keeps the last value: the session goes on.
    let (mut routes_open, mut bfd_open) = (true, true);
    loop {
        // Perform the actions so far.
        while !pending.is_empty() {
            let actions = std::mem::take(&mut pending);
            for a in actions {
                match a {
                    Action::Connect => connecting = Some(connect()),
                    Action::Send(b) => {
                        let Some(s) = stream.as_mut() else { continue };
                        let r = tokio::time::timeout(WRITE_TIMEOUT, s.write_all(&b)).await;
                        if let Err(e) = r.unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "write timed out",
                            ))
                        }) {
                            tracing::debug!(error = %e, "BGP write failed");
                            st.last_error = Some(format!("connectionLost: write: {e}"));
                            stream = None;
                            pending.extend(session.disconnected(Instant::now()));
                        }
                    }
                    Action::Close => {
                        connecting = None;
                        if let Some(mut s) = stream.take() {
                            let _ = s.shutdown().await;
                        }
                    }
                    Action::Established { hold_time, peer_as } => {
                        up = true;
                        tracing::info!(
                            hold_time,
                            peer_as,
                            reason = "established",
                            "BGP session up"
                        );
                    }
                    Action::Down {
                        reason,
                        notification,
                    } => {
                        if std::mem::take(&mut up) {
                            st.flaps += 1;
                        }
                        st.last_down = Some(reason);
                        st.last_error = Some(match &notification {
                            Some(n) => format!(
                                "{reason}: NOTIFICATION {}/{} ({})",
                                n.code,
                                n.subcode,
                                crate::message::notification_name(n.code, n.subcode)
                            ),
                            None => match st.last_error.take() {
                                Some(e) if e.starts_with("connectionLost") => e,
                                _ => reason.to_string(),
                            },
                        });
                        tracing::warn!(reason, ?notification, "BGP session down");
                    }
                }
            }
        }
        let state = session.state();
        if state != st.state {
            st.state = state;
            st.since = SystemTime::now();
        }
        st.routes = session.prefixes_sent();
        st.updates_sent = session.updates_sent;
        st.synced = session.in_sync().then(|| current.clone());
        status.send_replace(st.clone());
        let deadline = session.next_deadline();
        tokio::select! {
            () = shutdown.cancelled() => {
                let actions = session.stop();
                for a in actions {
                    if let (Action::Send(b), Some(s)) = (&a, stream.as_mut()) {
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.write_all(b)).await;
                    }
                }
                if let Some(mut s) = stream.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
                }
                st.state = State::Idle;
                st.synced = None;
                status.send_replace(st);
                return;
            }
            r = routes.changed(), if routes_open => {
                if r.is_err() {
                    routes_open = false;
                    continue;
                }
                current = routes.borrow_and_update().clone();
                pending = session.set_routes(current.clone());
            }
            r = bfd_down.changed(), if bfd_open => {
                if r.is_err() {
                    bfd_open = false;
                    continue;
                }
                if *bfd_down.borrow_and_update() {
                    pending = session.bfd_down(Instant::now());
                }
            }
            r = async {
                match connecting.as_mut() {
                    Some(c) => c.await,
                    None => std::future::pending().await,
                }
            } => {
                connecting = None;
                pending = match r {
                    Ok((s, local)) => {
                        stream = Some(s);
                        if let Some(ip) = local {
                            session.set_local_address(ip);
                        }
                        session.connected(Instant::now())
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "BGP connect failed");
                        st.last_error = Some(format!("connectionLost: connect: {e}"));
                        session.disconnected(Instant::now())
                    }
                };
            }
            n = async {
                match stream.as_mut() {
                    Some(s) => s.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                pending = match n {
                    Ok(0) | Err(_) => {
                        stream = None;
                        st.last_error = Some(match n {
                            Err(e) => format!("connectionLost: read: {e}"),
                            _ => "connectionLost: the peer closed the connection".to_string(),
                        });
                        session.disconnected(Instant::now())
                    }
                    Ok(n) => session.received(&buf[..n], Instant::now()),
                };
            }
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                pending = session.tick(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::DuplexStream;

    use super::*;
    use crate::Prefix;
    use crate::message::{
        AFI_IPV4, Capability, Context, Message, Notification, Open, SAFI_UNICAST,
    };
    use crate::session::Config;

    const FOUR: Context = Context {
        four_octet_as: true,
    };

    /// The peer's side: reads whole messages.
    struct Peer {
        io: DuplexStream,
        buf: Vec<u8>,
    }

    impl Peer {
        async fn next(&mut self) -> Message {
            loop {
                if let Ok((m, n)) = Message::decode(&self.buf, FOUR) {
                    self.buf.drain(..n);
                    return m;
                }
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.expect("read");
                assert!(n > 0, "the driver closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn send(&mut self, m: Message) {
            self.io.write_all(&m.encode(FOUR)).await.expect("write");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_driver_establishes_announces_follows_changes_and_recovers_from_a_silent_peer() {
        let (peers_tx, mut peers) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let connect: Connector = Box::new(move || {
            let (ours, theirs) = tokio::io::duplex(64 << 10);
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = peers_tx.send(theirs);
            Box::pin(async move { Ok((Box::new(ours) as Box<dyn Stream>, None)) })
        });
        let session = Session::new(Config {
            local_as: 65002,
            peer_as: 65001,
            router_id: Ipv4Addr::new(192, 0, 2, 2),
            hold_time: 9,
            next_hop_v4: Some(Ipv4Addr::new(192, 0, 2, 2)),
            next_hop_v6: None,
            communities: vec![],
            local_pref: None,
            restart_time: None,
            name: "r1".into(),
        });
        let vip = |s: &str| Prefix::host(s.parse().unwrap());
        let routes_of = |v: &[&str]| -> Arc<Routes> {
            Arc::new(v.iter().map(|s| (vip(s), Default::default())).collect())
        };
        let (routes_tx, routes) = watch::channel(routes_of(&["198.51.100.7"]));
        let (_bfd_tx, bfd) = watch::channel(false);
        let (status_tx, mut status) = watch::channel(Status::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(session, connect, routes, bfd, status_tx, stop.clone()));

        let mut peer = Peer {
            io: peers.recv().await.expect("a connection"),
            buf: Vec::new(),
        };
        assert!(matches!(peer.next().await, Message::Open(o) if o.asn() == 65002));
        peer.send(Message::Open(Open {
            my_as: 65001,
            hold_time: 90,
            identifier: Ipv4Addr::new(192, 0, 2, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(65001),
            ],
        }))
        .await;
        assert_eq!(peer.next().await, Message::Keepalive);
        peer.send(Message::Keepalive).await;
        let Message::Update(u) = peer.next().await else {
            panic!("an UPDATE")
        };
        assert_eq!(u.nlri, [vip("198.51.100.7")]);
        assert!(matches!(peer.next().await, Message::Update(u) if u.is_end_of_rib()));
        status
            .wait_for(|s| s.state == State::Established)
            .await
            .unwrap();
        // A new address: one UPDATE with it.
        routes_tx.send_replace(routes_of(&["198.51.100.7", "198.51.100.8"]));
        assert!(matches!(peer.next().await, Message::Update(u) if u.nlri == [vip("198.51.100.8")]));
        // Keepalives every 3 s (hold 9 s, ours) while the peer keeps quiet …
        let t = Instant::now();
        assert_eq!(peer.next().await, Message::Keepalive);
        assert_eq!(Instant::now() - t, Duration::from_secs(3));
        assert_eq!(peer.next().await, Message::Keepalive);
        // … and at 9 s without a word from it, Hold Timer Expired, then a new attempt after 1 s.
        assert!(matches!(
            peer.next().await,
            Message::Notification(Notification {
                code: 4,
                subcode: 0,
                ..
            })
        ));
        assert_eq!(Instant::now() - t, Duration::from_secs(9));
        let again = peers.recv().await.expect("a second connection");
        assert_eq!(Instant::now() - t, Duration::from_secs(10));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        let st = status.borrow().clone();
        assert_eq!((st.last_down, st.flaps), (Some("holdTimerExpired"), 1));
        // Shutdown: a Cease on the open connection, and the task ends.
        let mut peer = Peer {
            io: again,
            buf: Vec::new(),
        };
        assert!(matches!(peer.next().await, Message::Open(_)));
        stop.cancel();
        task.await.unwrap();
    }
}
