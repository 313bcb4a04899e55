//! The admin server's connection bounds over real sockets: idle and trickling connections are
//! closed, connections beyond the cap are refused or make an idle one give way, and `/healthz`
//! answers while idle connections hold every place. Every address is in 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use admin::{AdminLimits, AdminMetrics, AdminState, client};
use model::StatusReport;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Duration, Instant, timeout};
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    registry: Arc<std::sync::Mutex<Registry>>,
    metrics: AdminMetrics,
    stop: CancellationToken,
    _ready: watch::Sender<bool>,
}

async fn start(limits: AdminLimits) -> Server {
    let mut registry = Registry::default();
    let metrics = AdminMetrics::register(&mut registry);
    let (tx, rx) = watch::channel(true);
    let state = AdminState {
        registry: Arc::new(Registry::default()),
        status: Arc::new(StatusReport::default),
        ready: rx,
        events: model::events::EventLog::default(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(admin::serve_with(
        listener,
        state,
        limits,
        metrics.clone(),
        stop.clone(),
    ));
    Server {
        addr,
        registry: Arc::new(std::sync::Mutex::new(registry)),
        metrics,
        stop,
        _ready: tx,
    }
}

impl Server {
    fn closed(&self, reason: &str) -> u64 {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        let series = format!("portico_admin_connections_closed_total{{reason=\"{reason}\"}} ");
        s.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::V4(src), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Reads until EOF or error; returns how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed() {
    let srv = start(AdminLimits {
        idle_timeout: Duration::from_millis(400),
        header_read_timeout: Duration::from_millis(600),
        ..AdminLimits::default()
    })
    .await;
    // Idle: never sends a byte.
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(srv.closed("idleTimeout"), 1);

    // Trickling: one byte every 100 ms keeps it from being idle, never finishes the request.
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let start = Instant::now();
    let mut cut = false;
    for b in request {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut one = [0u8; 1];
        if let Ok(r) = timeout(Duration::from_millis(100), slow.read(&mut one)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "no answer to half a request");
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickling request was read to its end");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(srv.closed("headerTimeout"), 1);

    // A normal client is unaffected.
    assert_eq!(client::get(srv.addr, "/healthz").await.unwrap().status, 200);
    srv.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_idle_connections_hold_every_place() {
    let srv = start(AdminLimits::default()).await;
    let limits = AdminLimits::default();
    // One address alone gets at most 16 of 30.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(connect_from(Ipv4Addr::new(127, 0, 4, 1), srv.addr).await);
    }
    // 10 more addresses × 10 idle connections: 48 places left for 100.
    for c in 0..10u8 {
        for _ in 0..10 {
            held.push(connect_from(Ipv4Addr::new(127, 0, 3, c + 1), srv.addr).await);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.closed("clientLimit") < 14 || srv.closed("tableFull") < 52 {
        assert!(
            Instant::now() < deadline,
            "connections beyond the bounds were not refused: clientLimit {}, tableFull {}",
            srv.closed("clientLimit"),
            srv.closed("tableFull")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.metrics.open() as usize, limits.max_connections);
    // Once they have been idle for evict_idle (1 s), a new client takes an idle one's place.
    assert_eq!(limits.evict_idle, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..3 {
        let r = client::get(srv.addr, "/healthz").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    }
    // The first took an idle place; each freed its own on closing.
    assert!(srv.closed("evicted") >= 1);
    assert!(srv.metrics.open() as usize <= limits.max_connections);
    drop(held);
    srv.stop.cancel();
}
