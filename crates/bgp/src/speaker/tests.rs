//! The speaker over real TCP and UDP on loopback against a scripted router (our own codecs on
//! the other side): active and passive sessions, per-route attributes and the next hop, TCP
//! MD5 on the passive listener, a hostile peer that does not disturb the other, BFD taking the
//! BGP session down, metrics and status; and 100 flaps in paused time over in-memory streams
//! without a task more.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::*;
use crate::bfd::Control;
use crate::bfd::session::{Action as BfdAction, Session as BfdSession, Timers};
use crate::message::{
    AFI_IPV4, AFI_IPV6, Attribute, Capability, Context, Message, Open, SAFI_UNICAST, Update,
};

const FOUR: Context = Context {
    four_octet_as: true,
};
const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The router's side of a session: whole messages in and out.
struct Router<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Router<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Ok((m, n)) = Message::decode(&self.buf, FOUR) {
                self.buf.drain(..n);
                return Some(m);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut chunk))
                .await
                .expect("a message within 20 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send_raw(&mut self, b: &[u8]) {
        let _ = self.io.write_all(b).await;
    }

    /// OPEN in, OPEN and KEEPALIVE out, KEEPALIVE in: Established.
    async fn handshake(&mut self, asn: u32) -> Open {
        let Some(Message::Open(o)) = self.next().await else {
            panic!("an OPEN first")
        };
        let open = Message::Open(Open {
            my_as: u16::try_from(asn).unwrap_or(crate::message::AS_TRANS),
            hold_time: 90,
            identifier: Ipv4Addr::new(192, 0, 2, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(asn),
            ],
        });
        self.send_raw(&open.encode(FOUR)).await;
        self.send_raw(&Message::Keepalive.encode(FOUR)).await;
        assert_eq!(self.next().await, Some(Message::Keepalive));
        o
    }

    /// The next UPDATE that is not an End-of-RIB marker.
    async fn update(&mut self) -> Update {
        loop {
            match self.next().await {
                Some(Message::Update(u)) if !u.is_end_of_rib() => return u,
                Some(Message::Update(_) | Message::Keepalive) => {}
                m => panic!("an UPDATE, not {m:?}"),
            }
        }
    }
}

/// Loopback sockets: connects as the system does; the passive listener and BFD's receive
/// socket are bound beforehand on free ports.
struct TestBinder {
    sys: SystemBinder,
    listener: Mutex<Option<std::net::TcpListener>>,
    bfd_rx: Mutex<Option<std::net::UdpSocket>>,
    /// Where BFD packets go (the test's BFD socket).
    bfd_dst_port: u16,
}

impl TestBinder {
    fn new(bfd_dst_port: u16) -> Self {
        let l = std::net::TcpListener::bind((LO, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let u = std::net::UdpSocket::bind((LO, 0)).unwrap();
        u.set_nonblocking(true).unwrap();
        Self {
            sys: SystemBinder {
                connect_timeout: Duration::from_millis(500),
                ..SystemBinder::default()
            },
            listener: Mutex::new(Some(l)),
            bfd_rx: Mutex::new(Some(u)),
            bfd_dst_port,
        }
    }

    fn listen_addr(&self) -> SocketAddr {
        lock(&self.listener).as_ref().unwrap().local_addr().unwrap()
    }

    fn bfd_addr(&self) -> SocketAddr {
        lock(&self.bfd_rx).as_ref().unwrap().local_addr().unwrap()
    }
}

impl Binder for TestBinder {
    fn connect(&self, peer: &PeerConfig) -> net::Connecting {
        self.sys.connect(peer)
    }

    fn listen(&self, _v6: bool) -> std::io::Result<TcpListener> {
        let l = lock(&self.listener)
            .take()
            .ok_or(std::io::ErrorKind::AddrInUse)?;
        TcpListener::from_std(l)
    }

    fn bfd_listen(&self, v6: bool, _multihop: bool) -> std::io::Result<tokio::net::UdpSocket> {
        let u = lock(&self.bfd_rx)
            .take()
            .ok_or(std::io::ErrorKind::AddrInUse)?;
        sys::ttl::set_recv_ttl(&u, v6)?;
        tokio::net::UdpSocket::from_std(u)
    }

    fn bfd_source(&self, _peer: &PeerConfig) -> std::io::Result<tokio::net::UdpSocket> {
        let u = std::net::UdpSocket::bind((LO, 0))?;
        u.set_nonblocking(true)?;
        sys::ttl::set_ttl(&u, false, 255)?;
        tokio::net::UdpSocket::from_std(u)
    }

    fn bfd_port(&self, _multihop: bool) -> u16 {
        self.bfd_dst_port
    }
}

fn peer(name: &str, port: u16) -> PeerConfig {
    PeerConfig {
        port,
        source: Some(LO),
        hold_time: Duration::from_secs(9),
        ..PeerConfig::new(name, LO, 65002, 65001, Ipv4Addr::new(192, 0, 2, 2))
    }
}

fn vip(s: &str) -> Prefix {
    Prefix::host(s.parse().unwrap())
}

/// Polls `f` every 10 ms for up to `within`.
async fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Running {
    speaker: Speaker,
    registry: Registry,
    peers: watch::Sender<Arc<Vec<PeerConfig>>>,
    routes: watch::Sender<Arc<Routes>>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

fn spawn(binder: Arc<dyn Binder>, peers: Vec<PeerConfig>, routes: Routes) -> Running {
    let mut registry = Registry::default();
    let speaker = Speaker::with_binder(&mut registry, binder);
    let (peers_tx, peers_rx) = watch::channel(Arc::new(peers));
    let (routes_tx, routes_rx) = watch::channel(Arc::new(routes));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let speaker = speaker.clone();
        let stop = stop.clone();
        async move { speaker.run(peers_rx, routes_rx, stop).await }
    });
    Running {
        speaker,
        registry,
        peers: peers_tx,
        routes: routes_tx,
        stop,
        task,
    }
}

fn metrics_text(r: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, r).unwrap();
    s
}

fn state_of(s: &Speaker, peer: &str) -> &'static str {
    s.sessions()
        .iter()
        .find(|x| x.peer == peer)
        .map_or("absent", |x| x.state)
}

#[tokio::test]
async fn an_active_session_announces_routes_with_their_attributes_and_the_local_next_hop() {
    let router = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let port = router.local_addr().unwrap().port();
    let tagged = RouteAttrs {
        communities: vec![(65002 << 16) | 100],
        large_communities: vec![[65002, 7, 8]],
        local_pref: None,
        med: Some(10),
        peers: None,
    };
    let r = spawn(
        Arc::new(TestBinder::new(9)),
        vec![peer("r1", port)],
        [(vip("198.51.100.7"), tagged)].into(),
    );
    let (conn, _) = router.accept().await.unwrap();
    let mut rt = Router::new(conn);
    let open = rt.handshake(65001).await;
    assert_eq!(open.asn(), 65002);
    let u = rt.update().await;
    assert_eq!(u.nlri, [vip("198.51.100.7")]);
    assert!(
        u.attributes
            .contains(&Attribute::NextHop(Ipv4Addr::LOCALHOST))
    );
    assert!(u.attributes.contains(&Attribute::Med(10)));
    assert!(
        u.attributes
            .contains(&Attribute::Communities(vec![(65002 << 16) | 100]))
    );
    wait_for(Duration::from_secs(5), "established and in sync", || {
        state_of(&r.speaker, "r1") == "established" && r.speaker.in_sync()
    })
    .await;
    // A new route: in sync again once the peer has it.
    r.routes.send_replace(Arc::new(
        [
            (vip("198.51.100.7"), RouteAttrs::default()),
            (vip("198.51.100.8"), RouteAttrs::default()),
        ]
        .into(),
    ));
    let u = rt.update().await;
    assert_eq!(u.nlri, [vip("198.51.100.7"), vip("198.51.100.8")]);
    wait_for(
        Duration::from_secs(5),
        "in sync with the new routes",
        || r.speaker.in_sync(),
    )
    .await;
    let st = &r.speaker.sessions()[0];
    assert_eq!((st.prefixes_sent, st.flaps, st.bfd), (2, 0, None));
    assert!(st.updates_sent >= 3, "{st:?}");
    let text = metrics_text(&r.registry);
    for line in [
        "portico_bgp_session_state{peer=\"r1\",state=\"established\"} 1",
        "portico_bgp_session_state{peer=\"r1\",state=\"idle\"} 0",
        "portico_bgp_prefixes_sent{peer=\"r1\"} 2",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // Shutdown: a Cease (6/2), and run returns.
    r.stop.cancel();
    let n = loop {
        match rt.next().await {
            Some(Message::Notification(n)) => break n,
            Some(_) => {}
            None => panic!("closed without a NOTIFICATION"),
        }
    };
    assert_eq!((n.code, n.subcode), (6, 2));
    r.task.await.unwrap().unwrap();
}

/// Connects to `to` from `from` with an optional MD5 key; `None` when no connection is made
/// within 500 ms.
async fn md5_connect(from: IpAddr, to: SocketAddr, key: Option<&[u8]>) -> Option<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    if let Some(k) = key {
        sys::tcp_md5::set_tcp_md5(&s, to.ip(), k).unwrap();
    }
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    tokio::time::timeout(Duration::from_millis(500), s.connect(to))
        .await
        .ok()
        .and_then(Result::ok)
}

#[tokio::test]
async fn a_passive_peer_is_accepted_only_with_its_md5_password_and_strangers_are_refused() {
    let binder = Arc::new(TestBinder::new(9));
    let listen = binder.listen_addr();
    let mut p = peer("passive", 179);
    p.passive = true;
    p.password = Some("s3cret".into());
    let r = spawn(
        binder,
        vec![p],
        [(vip("198.51.100.9"), RouteAttrs::default())].into(),
    );
    // The listener opens once the speaker runs; a wrong password never gets a connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        md5_connect(LO, listen, Some(b"wrong")).await.is_none(),
        "an MD5 mismatch is refused"
    );
    assert!(
        md5_connect(LO, listen, None).await.is_none(),
        "no password is refused"
    );
    // A stranger (no key is set for 127.0.0.2) is accepted by the kernel and closed by us.
    let stranger = md5_connect("127.0.0.2".parse().unwrap(), listen, None)
        .await
        .expect("the kernel accepts an unkeyed stranger");
    let mut stranger = Router::new(stranger);
    assert_eq!(stranger.next().await, None, "closed without a word");
    let conn = md5_connect(LO, listen, Some(b"s3cret"))
        .await
        .expect("the right password connects");
    let mut rt = Router::new(conn);
    rt.handshake(65001).await;
    assert_eq!(rt.update().await.nlri, [vip("198.51.100.9")]);
    wait_for(Duration::from_secs(5), "established", || {
        state_of(&r.speaker, "passive") == "established"
    })
    .await;
    let text = metrics_text(&r.registry);
    assert!(
        text.contains("portico_bgp_connections_refused_total{reason=\"unknownPeer\"} 1"),
        "{text}"
    );
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_hostile_update_closes_that_session_with_its_notification_and_not_the_other() {
    let good = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let bad = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let r = spawn(
        Arc::new(TestBinder::new(9)),
        vec![
            peer("good", good.local_addr().unwrap().port()),
            peer("bad", bad.local_addr().unwrap().port()),
        ],
        Routes::new(),
    );
    let mut g = Router::new(good.accept().await.unwrap().0);
    let mut b = Router::new(bad.accept().await.unwrap().0);
    g.handshake(65001).await;
    b.handshake(65001).await;
    // An UPDATE with ORIGIN 5 (RFC 4271 §6.3: 3/6 Invalid ORIGIN Attribute).
    let body = [0u8, 0, 0, 4, 0x40, 1, 1, 5];
    let mut msg = vec![0xff; 16];
    msg.extend_from_slice(&(19 + body.len() as u16).to_be_bytes());
    msg.push(2);
    msg.extend_from_slice(&body);
    b.send_raw(&msg).await;
    let n = loop {
        match b.next().await {
            Some(Message::Notification(n)) => break n,
            Some(_) => {}
            None => panic!("closed without a NOTIFICATION"),
        }
    };
    assert_eq!((n.code, n.subcode), (3, 6));
    wait_for(Duration::from_secs(5), "the bad session down", || {
        state_of(&r.speaker, "bad") != "established"
    })
    .await;
    let st = r.speaker.sessions();
    let bad_st = st.iter().find(|s| s.peer == "bad").unwrap();
    assert!(
        bad_st
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("malformedMessage: NOTIFICATION 3/6")),
        "{bad_st:?}"
    );
    assert_eq!(state_of(&r.speaker, "good"), "established");
    // The good session still answers: a route reaches it.
    r.routes.send_replace(Arc::new(
        [(vip("198.51.100.1"), RouteAttrs::default())].into(),
    ));
    assert_eq!(g.update().await.nlri, [vip("198.51.100.1")]);
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

/// In-memory connections: each connect hands the router's end to the test.
struct MemBinder {
    tx: mpsc::UnboundedSender<tokio::io::DuplexStream>,
    connects: AtomicUsize,
}

impl Binder for MemBinder {
    fn connect(&self, _peer: &PeerConfig) -> net::Connecting {
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        self.connects.fetch_add(1, Ordering::SeqCst);
        let _ = self.tx.send(theirs);
        Box::pin(async move { Ok((Box::new(ours) as Box<dyn driver::Stream>, Some(LO))) })
    }
    fn listen(&self, _v6: bool) -> std::io::Result<TcpListener> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn bfd_listen(&self, _: bool, _: bool) -> std::io::Result<tokio::net::UdpSocket> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn bfd_source(&self, _: &PeerConfig) -> std::io::Result<tokio::net::UdpSocket> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn bfd_port(&self, _: bool) -> u16 {
        0
    }
}

#[tokio::test(start_paused = true)]
async fn a_hundred_flaps_leave_no_task_and_no_session_behind() {
    let (tx, mut conns) = mpsc::unbounded_channel();
    let binder = Arc::new(MemBinder {
        tx,
        connects: AtomicUsize::new(0),
    });
    let r = spawn(
        binder.clone(),
        vec![peer("flappy", 179)],
        [(vip("198.51.100.7"), RouteAttrs::default())].into(),
    );
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let mut baseline = 0;
    for i in 0..100 {
        let mut rt = Router::new(conns.recv().await.expect("a connection"));
        rt.handshake(65001).await;
        assert_eq!(rt.update().await.nlri, [vip("198.51.100.7")]);
        wait_for(Duration::from_secs(5), "established", || {
            state_of(&r.speaker, "flappy") == "established"
        })
        .await;
        if i == 0 {
            baseline = alive();
        } else {
            assert_eq!(alive(), baseline, "tasks after flap {i}");
        }
        drop(rt);
        wait_for(Duration::from_secs(5), "down", || {
            state_of(&r.speaker, "flappy") != "established"
        })
        .await;
    }
    let st = &r.speaker.sessions()[0];
    assert_eq!(st.flaps, 100);
    assert_eq!(r.speaker.sessions().len(), 1);
    assert_eq!(binder.connects.load(Ordering::SeqCst), 100);
    // Removing the peer stops its task and forgets its series.
    let before = alive();
    r.peers.send_replace(Arc::new(Vec::new()));
    wait_for(Duration::from_secs(5), "the task gone", || alive() < before).await;
    assert!(r.speaker.sessions().is_empty());
    assert!(!metrics_text(&r.registry).contains("flappy"));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

/// The test's side of BFD over UDP: answers the speaker until `mute` turns true.
async fn bfd_router(
    sock: tokio::net::UdpSocket,
    dst: SocketAddr,
    mut mute: watch::Receiver<bool>,
    state: watch::Sender<crate::bfd::State>,
) {
    let timers = Timers {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
    };
    let mut s = BfdSession::new(0x1234, timers, Instant::now());
    let mut buf = [0u8; 64];
    loop {
        let actions = tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { return };
                match Control::decode(&buf[..n]) {
                    Ok(c) => s.receive(&c, Instant::now()),
                    Err(_) => continue,
                }
            }
            () = tokio::time::sleep_until(s.next_deadline()) => s.tick(Instant::now()),
            r = mute.changed() => {
                if r.is_err() { return; }
                continue;
            }
        };
        for a in actions {
            match a {
                BfdAction::Send(c) if !*mute.borrow() => {
                    let _ = sock.send_to(&c.encode(), dst).await;
                }
                BfdAction::Changed { to, .. } => {
                    state.send_replace(to);
                }
                BfdAction::Send(_) => {}
            }
        }
    }
}

#[tokio::test]
async fn bfd_down_takes_the_bgp_session_down_within_the_detection_time() {
    let router_bfd = tokio::net::UdpSocket::bind((LO, 0)).await.unwrap();
    // RFC 5881 §5: sent with TTL 255 (the speaker drops anything else, see below).
    sys::ttl::set_ttl(&router_bfd, false, 255).unwrap();
    let binder = Arc::new(TestBinder::new(router_bfd.local_addr().unwrap().port()));
    let speaker_bfd = binder.bfd_addr();
    let router = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let mut p = peer("bfd", router.local_addr().unwrap().port());
    p.bfd = Some(BfdTimers {
        interval: Duration::from_millis(100),
        multiplier: 3,
    });
    let r = spawn(
        binder,
        vec![p],
        [(vip("198.51.100.7"), RouteAttrs::default())].into(),
    );
    let (mute_tx, mute) = watch::channel(false);
    let (state_tx, mut router_state) = watch::channel(crate::bfd::State::Down);
    tokio::spawn(bfd_router(router_bfd, speaker_bfd, mute, state_tx));
    let mut rt = Router::new(router.accept().await.unwrap().0);
    rt.handshake(65001).await;
    rt.update().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        router_state.wait_for(|s| *s == crate::bfd::State::Up),
    )
    .await
    .expect("BFD up at the router within 10 s")
    .unwrap();
    wait_for(Duration::from_secs(5), "BFD up at the speaker", || {
        r.speaker.sessions().first().and_then(|s| s.bfd) == Some("up")
    })
    .await;
    // The router's BFD falls silent: the speaker's BFD goes down after 3 × 100 ms and the BGP
    // session with it (Cease, BFD down), long before the 9 s hold time.
    let t = Instant::now();
    mute_tx.send_replace(true);
    let n = loop {
        match rt.next().await {
            Some(Message::Notification(n)) => break n,
            Some(_) => {}
            None => panic!("closed without a NOTIFICATION"),
        }
    };
    let took = t.elapsed();
    assert_eq!((n.code, n.subcode), (6, 10), "Cease: BFD down");
    assert!(
        took < Duration::from_millis(1000),
        "BGP dropped {took:?} after BFD fell silent"
    );
    println!("BGP session dropped {took:?} after the peer's BFD fell silent (100 ms x 3)");
    let st = &r.speaker.sessions()[0];
    assert_eq!(st.bfd, Some("down"));
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("bfdDown")),
        "{st:?}"
    );
    let text = metrics_text(&r.registry);
    assert!(
        text.contains("portico_bgp_bfd_transitions_total{peer=\"bfd\",state=\"up\"} 1"),
        "{text}"
    );
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn single_hop_bfd_packets_without_ttl_255_are_dropped() {
    let router_bfd = tokio::net::UdpSocket::bind((LO, 0)).await.unwrap();
    sys::ttl::set_ttl(&router_bfd, false, 64).unwrap();
    let binder = Arc::new(TestBinder::new(router_bfd.local_addr().unwrap().port()));
    let speaker_bfd = binder.bfd_addr();
    let mut p = peer("ttl", 9);
    p.bfd = Some(BfdTimers::DEFAULT);
    let r = spawn(binder, vec![p], Routes::new());
    let (_mute_tx, mute) = watch::channel(false);
    let (state_tx, _state) = watch::channel(crate::bfd::State::Down);
    tokio::spawn(bfd_router(router_bfd, speaker_bfd, mute, state_tx));
    wait_for(Duration::from_secs(5), "a TTL drop counted", || {
        metrics_text(&r.registry).contains("portico_bgp_bfd_packets_dropped_total{reason=\"ttl\"}")
    })
    .await;
    wait_for(Duration::from_secs(5), "the session listed", || {
        !r.speaker.sessions().is_empty()
    })
    .await;
    assert_eq!(r.speaker.sessions()[0].bfd, Some("down"));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn multihop_bfd_comes_up_with_any_ttl() {
    let router_bfd = tokio::net::UdpSocket::bind((LO, 0)).await.unwrap();
    sys::ttl::set_ttl(&router_bfd, false, 62).unwrap();
    let binder = Arc::new(TestBinder::new(router_bfd.local_addr().unwrap().port()));
    let speaker_bfd = binder.bfd_addr();
    let mut p = peer("multihop", 9);
    p.multihop = Some(3);
    p.bfd = Some(BfdTimers {
        interval: Duration::from_millis(50),
        multiplier: 3,
    });
    let r = spawn(binder, vec![p], Routes::new());
    let (_mute_tx, mute) = watch::channel(false);
    let (state_tx, _state) = watch::channel(crate::bfd::State::Down);
    tokio::spawn(bfd_router(router_bfd, speaker_bfd, mute, state_tx));
    wait_for(Duration::from_secs(5), "multihop BFD up", || {
        r.speaker.sessions().first().and_then(|s| s.bfd) == Some("up")
    })
    .await;
    assert!(!metrics_text(&r.registry).contains("reason=\"ttl\""));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}
