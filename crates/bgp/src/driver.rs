//! The tokio driver of one BGP session: connects through an injected connector, feeds octets,
//! routes and time to the pure [`Session`] and performs its actions. Library code never binds or
//! dials fixed addresses: the binary passes a connector (TCP to the peer from the configured
//! source, with MD5 if set); tests pass an in-memory stream.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Prefix;
use crate::session::{Action, Session, State};

/// A byte stream to the peer.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Opens a connection to the peer (a fresh one per attempt).
pub type Connector = Box<
    dyn FnMut() -> Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Stream>>> + Send>> + Send,
>;

/// What the driver publishes about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The last reason word it went down with (`None` before the first time).
    pub last_down: Option<&'static str>,
    /// Times it left Established.
    pub flaps: u64,
    /// Routes the peer has from us.
    pub routes: usize,
}

/// Runs the session until `shutdown` (then sends a Cease and closes). `routes` are the host
/// routes to announce; `bfd` turns true when BFD declares the peer down (the session drops at
/// once and the driver resets the flag's meaning on the next change).
pub async fn run(
    mut session: Session,
    mut connect: Connector,
    mut routes: watch::Receiver<BTreeSet<Prefix>>,
    mut bfd_down: watch::Receiver<bool>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let mut stream: Option<Box<dyn Stream>> = None;
    let mut buf = vec![0u8; 4096];
    let mut pending = session.start(Instant::now());
    session.set_routes(routes.borrow_and_update().clone());
    let mut last_down = None;
    let mut flaps = 0;
    let mut up = false;
    loop {
        // Perform the actions so far.
        while !pending.is_empty() {
            let actions = std::mem::take(&mut pending);
            for a in actions {
                match a {
                    Action::Connect => match connect().await {
                        Ok(s) => {
                            stream = Some(s);
                            pending.extend(session.connected(Instant::now()));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "BGP connect failed");
                            pending.extend(session.disconnected(Instant::now()));
                        }
                    },
                    Action::Send(b) => {
                        if let Some(s) = stream.as_mut()
                            && let Err(e) = s.write_all(&b).await
                        {
                            tracing::debug!(error = %e, "BGP write failed");
                            stream = None;
                            pending.extend(session.disconnected(Instant::now()));
                        }
                    }
                    Action::Close => {
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
                            flaps += 1;
                        }
                        last_down = Some(reason);
                        tracing::warn!(reason, ?notification, "BGP session down");
                    }
                }
            }
        }
        status.send_if_modified(|st| {
            let new = Status {
                state: session.state(),
                last_down,
                flaps,
                routes: routes.borrow().len(),
            };
            if *st == new {
                false
            } else {
                *st = new;
                true
            }
        });
        let deadline = session.next_deadline();
        tokio::select! {
            () = shutdown.cancelled() => {
                let actions = session.stop();
                for a in actions {
                    if let (Action::Send(b), Some(s)) = (&a, stream.as_mut()) {
                        let _ = s.write_all(b).await;
                    }
                }
                if let Some(mut s) = stream.take() {
                    let _ = s.shutdown().await;
                }
                return;
            }
            r = routes.changed() => {
                if r.is_err() {
                    return;
                }
                let want = routes.borrow_and_update().clone();
                pending = session.set_routes(want);
            }
            r = bfd_down.changed() => {
                if r.is_err() {
                    return;
                }
                if *bfd_down.borrow_and_update() {
                    pending = session.bfd_down(Instant::now());
                }
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::DuplexStream;

    use super::*;
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
            Box::pin(async move { Ok(Box::new(ours) as Box<dyn Stream>) })
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
        });
        let vip = |s: &str| Prefix::host(s.parse().unwrap());
        let (routes_tx, routes) = watch::channel(BTreeSet::from([vip("198.51.100.7")]));
        let (_bfd_tx, bfd) = watch::channel(false);
        let (status_tx, mut status) = watch::channel(Status {
            state: State::Idle,
            last_down: None,
            flaps: 0,
            routes: 0,
        });
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
        routes_tx.send_replace(BTreeSet::from([vip("198.51.100.7"), vip("198.51.100.8")]));
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
