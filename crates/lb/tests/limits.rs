//! Resource bounds of the data path on loopback: a flood of UDP source addresses stays within
//! the session bounds (sessions, descriptors) while an active session keeps working; the node's
//! TCP connection budget refuses clients beyond it cleanly. Every source is in 127.0.0.0/8 and
//! every loop is bounded.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use lb::budget::Budget;
use model::Protocol;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

/// A UDP backend echoing every datagram.
async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        for _ in 0..1_000_000 {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn udp_service(backend: SocketAddr, connection: &str) -> String {
    format!(
        "  - name: dns\n    vips: [127.0.0.16]\n    ports:\n      - {{name: dns, port: 53, protocol: udp}}\n    backends:\n{}    \
         health_check: {{type: none}}\n    connection: {{{connection}}}\n",
        be("a", backend)
    )
}

/// Sends one datagram from each of `count` source addresses 127.1.x.y (distinct per `wave`).
async fn flood(lb: SocketAddr, wave: u8, count: u16) {
    for i in 0..count {
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            1 + wave,
            (i / 250) as u8,
            (i % 250) as u8 + 1,
        ));
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).await.unwrap();
        s.send_to(b"flood", lb).await.unwrap();
        // The socket closes here: the test holds no descriptor per source.
    }
}

/// A client that sends every 100 ms and counts the replies it gets back, until `stop`.
fn active_client(
    lb: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let (sent, got) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s2, g2) = (sent.clone(), got.clone());
    let task = tokio::spawn(async move {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        for i in 0..600u32 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let msg = format!("active-{i}");
            c.send_to(msg.as_bytes(), lb).await.unwrap();
            s2.fetch_add(1, Ordering::SeqCst);
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), c.recv(&mut buf)).await
                && &buf[..n] == msg.as_bytes()
            {
                g2.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (sent, got, task)
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_from_many_sources_stays_within_the_session_bounds() {
    let backend = udp_echo().await;
    let h = Harness::start(&udp_service(
        backend,
        "max_udp_sessions: 50, max_udp_sessions_per_client: 8",
    ))
    .await;
    let lb = h.addr_proto("127.0.0.16:53", Protocol::Udp);
    let sessions = "portico_lb_udp_sessions{service=\"dns\"}";
    let refused = |r: &str| format!("portico_lb_refused_total{{service=\"dns\",reason=\"{r}\"}}");
    let evicted = |r: &str| {
        format!("portico_lb_udp_sessions_evicted_total{{service=\"dns\",reason=\"{r}\"}}")
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, got, active) = active_client(lb, stop.clone());
    wait_for("the active session answers", || {
        got.load(Ordering::SeqCst) >= 2
    })
    .await;
    let fds_before = open_fds();

    // Wave 1: 1,000 new sources within well under a second: the port bound holds, and since no
    // session is idle for a second yet, the newcomers beyond it are refused.
    flood(lb, 0, 1000).await;
    wait_for("newcomers beyond the bound are refused", || {
        h.metric(&refused("SessionLimit")) >= 900
    })
    .await;
    assert_eq!(h.metric(sessions), 50, "{}", h.metrics_text());
    let fds = open_fds();
    assert!(
        fds <= fds_before + 50 + 5,
        "descriptors grew from {fds_before} to {fds} for a bound of 50 sessions"
    );

    // Wave 2, after the first wave went idle: idle sessions are evicted for newcomers, the
    // active session is not.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    flood(lb, 1, 1000).await;
    wait_for("idle sessions were evicted", || {
        h.metric(&evicted("SessionLimit")) >= 40
    })
    .await;
    assert_eq!(h.metric(sessions), 50, "{}", h.metrics_text());
    assert!(open_fds() <= fds_before + 50 + 5);

    // One client address with many ports (once the second wave is idle enough to make room):
    // at most 8 sessions.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..20 {
        let s = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        s.send_to(b"same client", lb).await.unwrap();
    }
    wait_for("the per-client bound refuses", || {
        h.metric(&refused("ClientLimit")) >= 12
    })
    .await;

    // The active session kept answering throughout (it is never idle for a second).
    let before = got.load(Ordering::SeqCst);
    wait_for("the active session still answers", || {
        got.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    active.await.unwrap();
    let (s, g) = (sent.load(Ordering::SeqCst), got.load(Ordering::SeqCst));
    assert!(
        g + 3 >= s,
        "the active session lost replies under the flood: {g}/{s}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_budget_bounds_udp_sessions_over_every_port() {
    let backend = udp_echo().await;
    let budget = Budget {
        nofile: 0,
        reserved: 0,
        tcp_connections: 100,
        udp_sessions: 20,
    };
    let h = Harness::start_budget(&udp_service(backend, "max_udp_sessions: 1000"), budget).await;
    let lb = h.addr_proto("127.0.0.16:53", Protocol::Udp);
    flood(lb, 2, 300).await;
    wait_for("the budget refuses", || {
        h.metric("portico_lb_refused_total{service=\"dns\",reason=\"NodeBudget\"}") >= 250
    })
    .await;
    assert_eq!(h.metric("portico_lb_udp_sessions{service=\"dns\"}"), 20);
    assert_eq!(
        h.metric("portico_lb_connection_budget_in_use{protocol=\"udp\"}"),
        20
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_udp_sessions_expire_after_the_udp_idle_timeout() {
    let backend = udp_echo().await;
    let h = Harness::start(&udp_service(backend, "udp_idle_timeout: 300ms")).await;
    let lb = h.addr_proto("127.0.0.16:53", Protocol::Udp);
    flood(lb, 3, 30).await;
    wait_for("sessions open", || {
        h.metric("portico_lb_udp_sessions{service=\"dns\"}") == 30
    })
    .await;
    wait_for("sessions expire", || {
        h.metric("portico_lb_udp_sessions{service=\"dns\"}") == 0
            && h.metric("portico_lb_connection_budget_in_use{protocol=\"udp\"}") == 0
    })
    .await;
    h.stop().await;
}

#[test]
fn the_default_udp_idle_timeout_is_seconds() {
    let c = config(
        "  - name: u\n    vips: [127.0.0.17]\n    ports: [{name: u, port: 53, protocol: udp}]\n    backends: [{address: 127.0.0.1}]\n",
    );
    let conn = &c.services[0].connection;
    assert_eq!(conn.udp_idle_timeout, Duration::from_secs(30));
    assert_eq!(
        (conn.max_udp_sessions, conn.max_udp_sessions_per_client),
        (4096, 64)
    );
}

/// A TCP service in front of a backend that holds every connection open.
fn tcp_service(backend: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.18]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{}    \
         health_check: {{type: none}}\n{extra}",
        be("a", backend)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_beyond_the_node_budget_are_accepted_and_closed() {
    let backend = Backend::start_holding("a").await;
    let budget = Budget {
        nofile: 0,
        reserved: 0,
        tcp_connections: 5,
        udp_sessions: 5,
    };
    // No max_service_connections: the default cap is the node budget.
    let h = Harness::start_budget(&tcp_service(backend.addr, ""), budget).await;
    let addr = h.addr("127.0.0.18:8080");
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await.unwrap(), "a");
        held.push(s);
    }
    // Beyond the budget: accepted, then closed at once (no wait in a queue), and counted.
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_millis(500), s.read(&mut b))
            .await
            .expect("closed at once, not queued");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    assert_eq!(
        h.metric("portico_lb_refused_total{service=\"web\",reason=\"NodeBudget\"}"),
        3
    );
    assert_eq!(
        h.metric("portico_lb_connection_budget_in_use{protocol=\"tcp\"}"),
        5
    );
    assert_eq!(backend.max_open.load(Ordering::SeqCst), 5);
    // A freed unit is usable again.
    drop(held.pop());
    wait_for("a unit is freed", || {
        h.metric("portico_lb_connection_budget_in_use{protocol=\"tcp\"}") == 4
    })
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    drop((s, held));
    backend.release_all();
    h.stop().await;
}
