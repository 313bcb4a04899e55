//! Circuit breaking on loopback: per-backend and per-service limits hold exactly under
//! concurrent connects, the bounded queue refuses at once when full, and queued connections
//! time out after `queue_timeout` or get the next freed slot.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug)]
enum Outcome {
    Served(String, TcpStream),
    Closed(Duration),
}

async fn attempt(addr: std::net::SocketAddr) -> Outcome {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    match tokio::time::timeout(WAIT, read_line(&mut s))
        .await
        .expect("decided in time")
    {
        Ok(name) => Outcome::Served(name, s),
        Err(_) => Outcome::Closed(started.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_exactly_and_the_queue_times_out_then_refuses_when_full() {
    let a = Backend::start_holding("a").await;
    let b = Backend::start_holding("b").await;
    let yaml = format!(
        "  - name: db\n    vips: [127.0.0.12]\n    ports:\n      - {{name: sql, port: 3306}}\n    backends:\n{}{}    \
         balance: least-connections\n    health_check: {{type: none}}\n    \
         circuit_breaker: {{max_connections: 2, max_service_connections: 3, max_pending: 2, queue_timeout: 1s}}\n",
        be("a", a.addr),
        be("b", b.addr)
    );
    let h = Harness::start(&yaml).await;
    let addr = h.addr("127.0.0.12:3306");

    let pending = || h.metric("portico_lb_pending{service=\"db\"}");
    let tasks: Vec<_> = (0..10).map(|_| tokio::spawn(attempt(addr))).collect();
    // Two of them really wait in the queue (for queue_timeout, 1 s).
    wait_until("two connections queued (pending = max_pending)", || {
        pending() == 2
    })
    .await;
    let mut served = Vec::new();
    let mut queued_out = 0;
    let mut refused_fast = 0;
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Served(name, s) => served.push((name, s)),
            Outcome::Closed(d) if d >= Duration::from_millis(950) => queued_out += 1,
            Outcome::Closed(_) => refused_fast += 1,
        }
    }
    assert_eq!(served.len(), 3, "max_service_connections");
    assert_eq!(queued_out, 2, "max_pending waited queue_timeout");
    assert_eq!(refused_fast, 5, "beyond max_pending refused at once");
    assert!(a.max_open.load(Ordering::SeqCst) <= 2 && b.max_open.load(Ordering::SeqCst) <= 2);
    assert_eq!(
        a.open.load(Ordering::SeqCst) + b.open.load(Ordering::SeqCst),
        3
    );
    let m = h.metrics_text();
    assert!(
        m.contains("portico_lb_refused_total{service=\"db\",reason=\"QueueTimeout\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("portico_lb_refused_total{service=\"db\",reason=\"QueueFull\"} 5"),
        "{m}"
    );
    let st = h.lb.service_status("db").unwrap();
    assert_eq!(
        st.backends
            .iter()
            .map(|b| b.active_connections)
            .sum::<u64>(),
        3
    );
    assert!(
        st.backends
            .iter()
            .any(|b| b.breaker == model::BreakerState::Open),
        "{st:?}"
    );

    assert_eq!(pending(), 0, "the timed-out connections left the queue");

    // A queued connection gets the next freed slot.
    let waiting = tokio::spawn(attempt(addr));
    wait_until("the new connection queued for a slot", || pending() == 1).await;
    assert!(!waiting.is_finished(), "served without a free slot");
    let (_, first) = served.remove(0);
    drop(first);
    match waiting.await.unwrap() {
        Outcome::Served(..) => {}
        Outcome::Closed(d) => panic!("queued connection was closed after {d:?}"),
    }
    assert_eq!(pending(), 0, "released from the queue");
    assert_eq!(
        h.metric("portico_lb_refused_total{service=\"db\",reason=\"QueueTimeout\"}"),
        2,
        "the released connection did not time out"
    );
    drop(served);
    a.release_all();
    b.release_all();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_backend_limit_holds_under_a_burst() {
    let a = Backend::start_holding("a").await;
    let b = Backend::start_holding("b").await;
    let yaml = format!(
        "  - name: db\n    vips: [127.0.0.13]\n    ports:\n      - {{name: sql, port: 3306}}\n    backends:\n{}{}    \
         balance: power-of-two\n    health_check: {{type: none}}\n    \
         circuit_breaker: {{max_connections: 5, max_pending: 0}}\n",
        be("a", a.addr),
        be("b", b.addr)
    );
    let h = Harness::start(&yaml).await;
    let addr = h.addr("127.0.0.13:3306");
    let tasks: Vec<_> = (0..40).map(|_| tokio::spawn(attempt(addr))).collect();
    let mut held = Vec::new();
    for t in tasks {
        if let Outcome::Served(_, s) = t.await.unwrap() {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 10);
    assert_eq!(a.max_open.load(Ordering::SeqCst), 5);
    assert_eq!(b.max_open.load(Ordering::SeqCst), 5);
    assert!(
        h.metrics_text()
            .contains("portico_lb_refused_total{service=\"db\",reason=\"BreakerOpen\"} 30")
    );
    drop(held);
    a.release_all();
    b.release_all();
    h.stop().await;
}
