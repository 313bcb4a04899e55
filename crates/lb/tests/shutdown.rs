//! The shutdown drain on loopback: it ends as soon as the open connections are done, and at
//! `shutdown.drain_timeout` (not `connection.drain_timeout`) for those still open.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

fn service(backend: &Backend, drain: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.18]\n    ports:\n      - {{name: http, port: 80}}\n    backends:\n{}    \
         health_check: {{type: none}}\n    connection: {{drain_timeout: 30s}}\nshutdown:\n  drain_timeout: {drain}\n",
        be("a", backend.addr)
    )
}

async fn open(h: &Harness) -> TcpStream {
    let mut c = TcpStream::connect(h.addr("127.0.0.18:80")).await.unwrap();
    let mut line = [0u8; 2];
    c.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"a\n");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_when_the_last_connection_does() {
    let backend = Backend::start_holding("a").await;
    let h = Harness::start(&service(&backend, "20s")).await;
    let c = open(&h).await;
    let started = Instant::now();
    let stop = tokio::spawn(h.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("the drain ended")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the drain waited {took:?} after its last connection ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_open_is_closed_at_shutdown_drain_timeout() {
    let backend = Backend::start_holding("a").await;
    let h = Harness::start(&service(&backend, "1s")).await;
    let mut c = open(&h).await;
    let started = Instant::now();
    let stop = tokio::spawn(h.stop());
    // the client sees the close after shutdown.drain_timeout (1 s), not connection.drain_timeout
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}, want ~1 s"
    );
    stop.await.unwrap();
}
