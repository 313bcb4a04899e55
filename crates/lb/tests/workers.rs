//! The proxy's worker threads: every worker accepts (the kernel spreads connections over their
//! `SO_REUSEPORT` listeners), and connections are served on the workers, not on the runtime that
//! runs the balancer. Loopback only; every loop is bounded.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn service(backends: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{backends}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_land_on_every_worker() {
    let a = Backend::start("a").await;
    let h = Harness::start(&service(&be("a", a.addr))).await; // two workers
    let addr = h.addr("127.0.0.10:8080");
    const N: u64 = 64;
    for i in 0..N {
        let got = roundtrip(addr, format!("req {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(got, "a");
    }
    let per_worker = h.lb.worker_accepts();
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert_eq!(per_worker.iter().sum::<u64>(), N, "{per_worker:?}");
    // The kernel hashes each connection's addresses and ports onto one listener: with 64
    // connections both get some (all on one would happen with probability 2^-63).
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    h.stop().await;
}

/// A blocking backend on its own thread: greets each of `n` connections with `b\n` and closes.
fn blocking_backend(n: usize) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(n).flatten() {
            let _ = s.write_all(b"b\n");
        }
    });
    addr
}

/// Connects with blocking sockets and reads the greeting, bounded by timeouts.
fn blocking_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[tokio::test]
async fn connections_are_served_while_the_balancers_runtime_is_blocked() {
    let backend = blocking_backend(16);
    let h = Harness::start(&service(&be("b", backend))).await;
    let addr = h.addr("127.0.0.10:8080");
    // Block this (current-thread) runtime, which runs the balancer's control loop, while a
    // client on another thread goes through the proxy: only the workers can serve it.
    let client =
        std::thread::spawn(move || (0..8).map(|_| blocking_greeting(addr)).collect::<Vec<_>>());
    let got = client.join().expect("client thread");
    for r in got {
        assert_eq!(r.expect("served by a worker"), "b");
    }
    h.stop().await;
}

/// `write` system calls the proxy worker threads have made so far (`syscw` of
/// `/proc/self/task/<tid>/io`; socket sends are `sendto` and not counted, so what it counts
/// here is the runtime waking itself through its eventfd).
fn worker_writes() -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("proxy-") {
            continue;
        }
        let io = std::fs::read_to_string(t.path().join("io")).unwrap_or_default();
        total += io
            .lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn a_new_connection_does_not_make_the_worker_wake_itself() {
    const N: usize = 200;
    let backend = blocking_backend(N + 1);
    let h = Harness::start(&service(&be("b", backend))).await;
    let addr = h.addr("127.0.0.10:8080");
    // one connection first: the workers' runtimes and their timers are up
    let warm = std::thread::spawn(move || blocking_greeting(addr));
    assert_eq!(warm.join().unwrap().unwrap(), "b");
    let before = worker_writes();
    let client =
        std::thread::spawn(move || (0..N).map(|_| blocking_greeting(addr)).collect::<Vec<_>>());
    for r in client.join().expect("client thread") {
        assert_eq!(r.expect("served"), "b");
    }
    let writes = worker_writes() - before;
    // Without the worker's standing timer every connection's connect timeout was the earliest
    // timer and woke the runtime through its eventfd: about one write per connection.
    assert!(
        writes < (N / 10) as u64,
        "{writes} eventfd writes on the workers for {N} connections"
    );
    h.stop().await;
}
