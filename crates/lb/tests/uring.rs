//! The io_uring relay (`proxy.io: uring`, the default) beyond what the whole suite checks
//! with it: the hand-over of long-lived connections only, a pool that
//! slow readers drain, and the fall-back to tokio.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn service(backends: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{backends}"
    )
}

/// After a short conversation (which hands the connection to the ring), sends `len` bytes
/// through the echo backend and checks every byte comes back; `slow` reads the echo in small
/// sips with pauses (a client that lets the pool fill up).
async fn echo(addr: std::net::SocketAddr, len: usize, seed: u32, slow: bool) {
    let s = conversation(addr, 5).await;
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = data.clone();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    let mut sip = [0u8; 4096];
    loop {
        let n = r.read(&mut sip).await.unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&sip[..n]);
        if slow && back.len() % (64 << 10) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    writer.await.unwrap();
    assert_eq!(back.len(), want.len(), "connection {seed}");
    assert!(back == want, "connection {seed}: echo differs");
}

/// A balancer whose workers' pools hold 2 buffers, copying (a read that fills its buffer
/// would otherwise switch to splice and keep the connection on tokio: bulk transfers are not
/// handed to the ring).
async fn dry_pool_harness(backend: std::net::SocketAddr) -> Harness {
    Harness::start_tuned(&service(&be("a", backend)), |o| {
        o.uring = true;
        o.uring_buffers = 2;
        o.splice = false;
    })
    .await
}

/// `rounds` request / answer round trips on one connection through the echo backend.
async fn conversation(addr: std::net::SocketAddr, rounds: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    for i in 0..rounds {
        let msg = format!("request {i}\n");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_connections_that_prove_long_lived_move_to_the_ring() {
    let a = Backend::start("a").await;
    let h = Harness::start_tuned(&service(&be("a", a.addr)), |o| o.uring = true).await;
    let addr = h.addr("127.0.0.10:8080");
    // one request, one answer, closed: stays on tokio
    assert_eq!(roundtrip(addr, b"one request").await.unwrap(), "a");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.metric("portico_lb_uring_relays_total"), 0);
    // a keep-alive conversation: handed over after its 4th round trip (8 messages, the
    // greeting counted), every answer intact before and after
    let mut s = conversation(addr, 20).await;
    assert_eq!(h.metric("portico_lb_uring_relays_total"), 1);
    // and the ring passes the half-close on: the backend sees EOF and closes
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_slow_readers_drain_stalls_no_relay() {
    let a = Backend::start("a").await;
    // two pool buffers per worker for 8 connections that each move 1 MiB both ways
    let h = dry_pool_harness(a.addr).await;
    let addr = h.addr("127.0.0.10:8080");
    let runs: Vec<_> = (0..8u32)
        .map(|i| tokio::spawn(echo(addr, 1 << 20, i, i % 2 == 0)))
        .collect();
    for r in runs {
        tokio::time::timeout(WAIT, r)
            .await
            .expect("every relay finishes")
            .unwrap();
    }
    assert!(h.metric("portico_lb_uring_relays_total") >= 8);
    assert!(
        h.metric("portico_lb_uring_buffer_waits_total") > 0,
        "the pool never ran dry: the test proves nothing"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_hold_buffers_but_stall_no_other_relay() {
    let a = Backend::start("a").await;
    let h = dry_pool_harness(a.addr).await;
    let addr = h.addr("127.0.0.10:8080");
    // 6 clients (on the ring after a short conversation) send 4 MiB and never read the echo:
    // the backend's echo fills their sockets,
    // then the relay's sends to them wait for ever, holding the buffers they send from
    let mut stuck = Vec::new();
    for i in 0..6u8 {
        let mut s = conversation(addr, 5).await;
        stuck.push(tokio::spawn(async move {
            let _ = s.write_all(&vec![i; 4 << 20]).await;
            std::future::pending::<()>().await;
            drop(s);
        }));
    }
    wait_until("the stuck clients hold the pool", || {
        h.metric("portico_lb_uring_buffer_waits_total") > 0
    })
    .await;
    // others still get every byte through
    let runs: Vec<_> = (0..4u32)
        .map(|i| tokio::spawn(echo(addr, 256 << 10, i, false)))
        .collect();
    for r in runs {
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("a relay stalled behind the stuck ones")
            .unwrap();
    }
    for s in stuck {
        s.abort();
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_proxy_workers_the_relay_falls_back_to_tokio() {
    let a = Backend::start("a").await;
    let h = Harness::start_tuned(&service(&be("a", a.addr)), |o| {
        o.uring = true;
        o.workers = 0;
        o.splice = false;
    })
    .await;
    let s = conversation(h.addr("127.0.0.10:8080"), 20).await;
    drop(s);
    assert_eq!(h.metric("portico_lb_uring_relays_total"), 0);
    assert!(h.metric("portico_lb_uring_fallbacks_total") >= 1);
    h.stop().await;
}
