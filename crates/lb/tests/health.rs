//! Health and failure handling on loopback: a backend killed under load (retries hide it, checks
//! take it out, `rise` good checks bring it back), outlier ejection without active checks, and a
//! flapping HTTP backend that honours rise/fall.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use model::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `workers` clients doing sequential round trips until stopped (at most 60 s, 100k each).
fn load(addr: std::net::SocketAddr, workers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let tasks = (0..workers)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(60);
                for i in 0..100_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > until {
                        break;
                    }
                    let msg = format!("worker {w} request {i}");
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        roundtrip(addr, msg.as_bytes()),
                    )
                    .await
                    {
                        Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("client-visible failure: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    Load {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn three(a: &Backend, b: &Backend, c: &Backend, extra: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{}{}{}{extra}",
        be("a", a.addr),
        be("b", b.addr),
        be("c", c.addr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_causes_no_client_failures_leaves_rotation_and_returns_after_rise_checks() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let extra = "    health_check: {type: tcp, interval: 100ms, timeout: 100ms, rise: 3, fall: 2}\n    \
                 outlier: {consecutive_failures: 0}\n    connection: {retries: 2, connect_timeout: 500ms}\n";
    let h = Harness::start(&three(&a, &b, &c, extra)).await;
    let addr = h.addr("127.0.0.10:8080");
    h.wait_health("web", "b", Health::Up).await;
    let mut health_rx = h.health.clone();

    let l = load(addr, 8);
    wait_until("b takes client traffic before the kill", || b.served() > 0).await;
    b.kill();
    h.wait_health("web", "b", Health::Down).await;
    // Connections accepted just before the kill have sent their bytes by now.
    let killed_at = b.served();
    // The published view says so too.
    tokio::time::timeout(
        WAIT,
        health_rx.wait_for(|v| v.get(&model::BackendKey::new("web", "b")) == Some(&Health::Down)),
    )
    .await
    .expect("health view published")
    .unwrap();
    // While down, checks keep running (3 more, i.e. about 3 × interval) and clients keep being
    // served by a and c; b gets none of them.
    let (checks, ok) = (h.checks_run("web", "b"), l.ok.load(Ordering::Relaxed));
    wait_until("3 more checks of the down backend b", || {
        h.checks_run("web", "b") >= checks + 3
    })
    .await;
    wait_until("clients served while b is down", || {
        l.ok.load(Ordering::Relaxed) > ok + 10
    })
    .await;
    assert_eq!(b.served(), killed_at, "b took client traffic while down");

    b.revive().await;
    let revived = Instant::now();
    let served_at_revive = b.served();
    let mut last_served_while_down = served_at_revive;
    loop {
        let s = b.served();
        match h.lb.backend_health("web", "b") {
            Some(Health::Up) => break,
            _ => last_served_while_down = s,
        }
        assert!(revived.elapsed() < WAIT, "b never came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let back_after = revived.elapsed();
    assert_eq!(
        last_served_while_down, served_at_revive,
        "b took client traffic before rise checks passed"
    );
    // rise = 3 checks at 100 ms ± 10 %: at least two intervals after the first good one.
    assert!(
        back_after >= Duration::from_millis(170),
        "back after {back_after:?}, too soon for rise 3"
    );
    wait_until("b back in rotation (client traffic after rise)", || {
        b.served() > served_at_revive
    })
    .await;
    let (ok, failed) = l.finish().await;
    assert_eq!(failed, 0, "client-visible failures");
    assert!(ok > 50, "load ran ({ok} round trips)");
    let m = h.metrics_text();
    assert!(
        m.contains("portico_lb_retries_total{service=\"web\"}"),
        "{m}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_connect_failures_eject_a_backend_without_active_checks() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let extra = "    outlier: {consecutive_failures: 2, base_ejection_time: 3s, max_ejection_percent: 50}\n    \
                 connection: {retries: 2}\n";
    let h = Harness::start(&three(&a, &b, &c, extra)).await;
    let addr = h.addr("127.0.0.10:8080");
    b.kill();
    for i in 0..30 {
        roundtrip(addr, format!("r{i}").as_bytes())
            .await
            .expect("retried onto a healthy backend");
    }
    let st = h.lb.service_status("web").unwrap();
    let bs = st.backends.iter().find(|x| x.name == "b").unwrap();
    assert!(bs.ejected, "{bs:?}");
    assert_eq!(bs.breaker, model::BreakerState::Open);
    assert!(bs.connect_failures >= 2);
    assert!(
        h.metrics_text()
            .contains("portico_lb_ejections_total{service=\"web\",backend=\"b\"} 1")
    );
    // Ejection ends (half-open); the revived backend takes traffic again.
    b.revive().await;
    let deadline = Instant::now() + WAIT;
    while b.served() == 0 {
        assert!(Instant::now() < deadline, "b never returned after ejection");
        roundtrip(addr, b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

/// An HTTP backend whose answer depends on `mode`: 0 alternate 200/500, 1 always 500, 2 always 200.
async fn http_backend(mode: Arc<AtomicU8>, hits: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut flip = false;
        for _ in 0..100_000 {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            assert!(buf.starts_with(b"GET /healthz HTTP/1.1\r\nHost: db.example\r\n"));
            hits.fetch_add(1, Ordering::SeqCst);
            flip = !flip;
            let ok = match mode.load(Ordering::SeqCst) {
                0 => flip,
                1 => false,
                _ => true,
            };
            let status = if ok {
                "200 OK"
            } else {
                "500 Internal Server Error"
            };
            let _ = s
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    addr
}

/// Asserts `x` stays `want` while 8 more checks reach the backend (both verdicts among them).
async fn stays(h: &Harness, hits: &AtomicUsize, want: Health, why: &str) {
    let before = hits.load(Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while hits.load(Ordering::SeqCst) < before + 8 {
        assert_eq!(h.lb.backend_health("api", "x"), Some(want), "{why}");
        assert!(
            Instant::now() < deadline,
            "8 checks never ran within {WAIT:?} (only {})",
            hits.load(Ordering::SeqCst) - before
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The 8th check's verdict may still be in flight: let the balancer see it too.
    let seen = h.checks_run("api", "x");
    wait_until("the balancer recorded the last check", || {
        h.checks_run("api", "x") > seen
    })
    .await;
    assert_eq!(h.lb.backend_health("api", "x"), Some(want), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_http_backend_honours_rise_and_fall() {
    let mode = Arc::new(AtomicU8::new(2));
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = http_backend(mode.clone(), hits.clone()).await;
    let yaml = format!(
        "  - name: api\n    vips: [127.0.0.11]\n    ports:\n      - {{name: http, port: 80}}\n    backends:\n{}    \
         health_check: {{type: http, path: /healthz, expect_status: 200, host: db.example, interval: 50ms, timeout: 50ms, rise: 2, fall: 2}}\n",
        be("x", addr)
    );
    let h = Harness::start(&yaml).await;
    h.wait_health("api", "x", Health::Up).await;
    // Alternating pass/fail never reaches 2 in a row: stays up.
    // The window is 8 checks (8 × interval), counted at the backend, not a wall-clock guess.
    mode.store(0, Ordering::SeqCst);
    stays(&h, &hits, Health::Up, "flapping took it down").await;
    // Two failures in a row: down. Then alternating keeps it down.
    mode.store(1, Ordering::SeqCst);
    h.wait_health("api", "x", Health::Down).await;
    mode.store(0, Ordering::SeqCst);
    stays(&h, &hits, Health::Down, "flapping brought it up").await;
    mode.store(2, Ordering::SeqCst);
    h.wait_health("api", "x", Health::Up).await;
    let m = h.metrics_text();
    assert!(
        m.contains("portico_lb_check_duration_seconds_count{service=\"api\",backend=\"x\"}"),
        "{m}"
    );
    h.stop().await;
}

/// A backend that dies with connections still in its accept queue resets them. Those
/// connections have carried no byte either way yet (the backend speaks first, as MySQL does), so
/// the balancer moves the client to another backend as after a refused connect: the client sees
/// the other backend's greeting, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_with_queued_connections_costs_the_client_nothing() {
    // never accepts: the kernel completes the handshake and queues the connection
    let doomed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let daddr = doomed.local_addr().unwrap();
    let good = Backend::start("good").await;
    let yaml = format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n      \
         - {{name: doomed, address: 127.0.0.1, port: {}, weight: 1000}}\n{}    \
         health_check: {{type: none}}\n    outlier: {{consecutive_failures: 0}}\n    \
         connection: {{retries: 2}}\n",
        daddr.port(),
        be("good", good.addr)
    );
    let h = Harness::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(h.addr("127.0.0.10:8080"))
        .await
        .unwrap();
    // the balancer has connected to `doomed` (weight 1000 of 1001): the connection sits in
    // doomed's accept queue while the balancer waits for a first byte
    wait_until("the balancer's connection queued at `doomed`", || {
        accept_queue(daddr.port()) >= 1
    })
    .await;
    drop(doomed);
    assert_eq!(
        tokio::time::timeout(WAIT, read_line(&mut s))
            .await
            .expect("answered in time")
            .expect("no reset"),
        "good"
    );
    let m = h.metrics_text();
    assert!(
        m.contains("portico_lb_retries_total{service=\"web\"} 1"),
        "the client went to `doomed` first and was moved: {m}"
    );
    drop(s);
    h.stop().await;
}

/// The accept-queue length of the IPv4 TCP listener on `port` (Linux `/proc/net/tcp`: for a
/// listening socket, `rx_queue` is its accept backlog); 0 when not found.
fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue
            (f.len() > 4 && f[1].ends_with(&local) && f[3] == "0A").then(|| f[4])
        })
        .filter_map(|q| usize::from_str_radix(q.split(':').nth(1)?, 16).ok())
        .max()
        .unwrap_or(0)
}
