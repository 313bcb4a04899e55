//! UDP sessions (replies from the VIP, sticky per client) and reloads (listeners kept, removed
//! backends drain, established connections survive) on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use model::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A UDP backend answering `<name>:<payload>`.
async fn udp_backend(name: &'static str) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        for _ in 0..10_000 {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let mut out = format!("{name}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    addr
}

async fn ask(c: &UdpSocket, lb: SocketAddr, msg: &str) -> String {
    c.send_to(msg.as_bytes(), lb).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, c.recv_from(&mut buf))
        .await
        .expect("reply")
        .unwrap();
    assert_eq!(from, lb, "reply must come from the VIP socket");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_map_replies_to_their_clients_from_the_vip() {
    let a = udp_backend("a").await;
    let b = udp_backend("b").await;
    let yaml = format!(
        "  - name: dns\n    vips: [127.0.0.14]\n    ports:\n      - {{name: dns, port: 53, protocol: udp}}\n    backends:\n{}{}    \
         health_check: {{type: none}}\n    connection: {{udp_idle_timeout: 500ms}}\n",
        be("a", a),
        be("b", b)
    );
    let h = Harness::start(&yaml).await;
    let lb = h.addr_proto("127.0.0.14:53", Protocol::Udp);
    let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r1 = ask(&c1, lb, "one-1").await;
    let r2 = ask(&c2, lb, "two-1").await;
    let (n1, n2) = (&r1[..1], &r2[..1]);
    assert_ne!(n1, n2, "round-robin spreads two sessions");
    assert_eq!(&r1[2..], "one-1");
    assert_eq!(&r2[2..], "two-1");
    for i in 2..6 {
        let r = ask(&c1, lb, &format!("one-{i}")).await;
        assert_eq!(r, format!("{n1}:one-{i}"), "session sticks to its backend");
        let r = ask(&c2, lb, &format!("two-{i}")).await;
        assert_eq!(r, format!("{n2}:two-{i}"));
    }
    let st = h.lb.service_status("dns").unwrap();
    assert_eq!(
        st.backends
            .iter()
            .map(|b| b.active_connections)
            .sum::<u64>(),
        2
    );
    // Idle sessions end and give their slots back.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = h.lb.service_status("dns").unwrap();
        if st.backends.iter().all(|b| b.active_connections == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

fn web(backends: &str, extra: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.15]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{backends}    \
         health_check: {{type: none}}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_listeners_and_connections_and_drains_removed_backends() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut h = Harness::start(&web(&format!("{}{}", be("a", a.addr), be("b", b.addr)), "")).await;
    let addr = h.addr("127.0.0.15:8080");
    let binds = h.binder.binds();
    // Smooth round-robin with equal weights starts at the first backend.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");

    let mut view = h.health.clone();
    h.reload(&web(
        &be("b", b.addr),
        "    connection: {drain_timeout: 1s}\n",
    ));
    // `run` publishes the health view after applying a generation (listeners included): the
    // view without `a` is the reload applied.
    tokio::time::timeout(
        WAIT,
        view.wait_for(|v| {
            v.get(&model::BackendKey::new("web", "a")).is_none()
                && v.get(&model::BackendKey::new("web", "b")).is_some()
        }),
    )
    .await
    .expect("reload never applied: the published health view still lists backend a")
    .unwrap();
    assert_eq!(
        h.binder.binds(),
        binds,
        "reload must not rebind a kept listener"
    );
    assert_eq!(h.addr("127.0.0.15:8080"), addr);
    // The established connection to the removed backend still works…
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    let st = h.lb.service_status("web").unwrap();
    assert!(
        st.backends.iter().any(|x| x.name == "a" && x.draining),
        "{st:?}"
    );
    // …new ones go to the remaining backend…
    for i in 0..5 {
        assert_eq!(
            roundtrip(addr, format!("n{i}").as_bytes()).await.unwrap(),
            "b"
        );
    }
    // …and the draining connection is closed at drain_timeout.
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed at drain deadline");
    assert!(matches!(n, Ok(0) | Err(_)));
    let deadline = tokio::time::Instant::now() + WAIT;
    while h
        .lb
        .service_status("web")
        .unwrap()
        .backends
        .iter()
        .any(|x| x.name == "a")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drained backend never left status"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new port opens a listener; removing it closes it.
    let p = b.addr.port();
    let two_ports = format!(
        "  - name: web\n    vips: [127.0.0.15]\n    ports:\n      - {{name: http, port: 8080, target_port: {p}}}\n      \
         - {{name: alt, port: 8081, target_port: {p}}}\n    backends:\n      - {{name: b, address: 127.0.0.1}}\n    \
         health_check: {{type: none}}\n"
    );
    h.reload(&two_ports);
    let deadline = tokio::time::Instant::now() + WAIT;
    while h
        .binder
        .local("127.0.0.15:8081".parse().unwrap(), Protocol::Tcp)
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new port never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alt = h.addr("127.0.0.15:8081");
    assert_eq!(roundtrip(alt, b"alt").await.unwrap(), "b");
    assert_eq!(h.binder.binds(), binds + 1);
    h.reload(&web(&be("b", b.addr), ""));
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(alt).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "removed port still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_report_connections_and_bytes() {
    let a = Backend::start("a").await;
    let h = Harness::start(&web(&be("a", a.addr), "")).await;
    let addr = h.addr("127.0.0.15:8080");
    for i in 0..3 {
        roundtrip(addr, format!("hello {i}").as_bytes())
            .await
            .unwrap();
    }
    // The relay counts when it finishes; wait for the last connection to close.
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.lb.service_status("web").unwrap().backends[0].active_connections != 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = h.lb.service_status("web").unwrap();
    assert_eq!(st.backends[0].total_connections, 3);
    assert_eq!(st.ports[0].port, 8080);
    assert_eq!(st.vips[0].owner, None);
    let m = h.metrics_text();
    for line in [
        "portico_lb_connections_total{service=\"web\",backend=\"a\"} 3",
        "portico_lb_connections_active{service=\"web\",backend=\"a\"} 0",
        "portico_lb_bytes_total{service=\"web\",backend=\"a\",direction=\"to_backend\"} 21",
        "portico_lb_backend_healthy{service=\"web\",backend=\"a\"} 1",
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
    h.stop().await;
}
