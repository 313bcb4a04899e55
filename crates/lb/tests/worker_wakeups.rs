//! A proxy worker does not wake its own runtime for each new connection (tokio's timer driver
//! does, through the runtime's eventfd, when a connection's connect timeout is the earliest
//! timer; see `worker::keep_timer_armed`). Counted with the kernel's per-thread `syscw`: socket
//! sends are `sendto` and not counted, so the `write` calls a worker makes are its wake-ups. A
//! test binary of its own, so that no other test's workers start or stop while it counts.
//! Loopback only; every loop is bounded.

mod common;

use std::collections::BTreeMap;

use common::*;

/// `write` system calls made so far by each proxy worker thread of this process (by thread id:
/// `syscw` of `/proc/self/task/<tid>/io`).
fn worker_writes() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("proxy-") {
            continue;
        }
        let io = std::fs::read_to_string(t.path().join("io")).unwrap_or_default();
        let n = io
            .lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(t.file_name().to_string_lossy().into_owned(), n);
    }
    out
}

#[tokio::test]
async fn a_new_connection_does_not_make_the_worker_wake_itself() {
    const N: usize = 200;
    let backend = blocking_backend(N + 1);
    let h = Harness::start(&format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{}",
        be("b", backend)
    ))
    .await;
    let addr = h.addr("127.0.0.10:8080");
    // one connection first: the workers' runtimes and their timers are up
    let warm = std::thread::spawn(move || blocking_greeting(addr));
    assert_eq!(warm.join().unwrap().unwrap(), "b");
    let before = worker_writes();
    assert!(!before.is_empty(), "no proxy worker threads found");
    let client =
        std::thread::spawn(move || (0..N).map(|_| blocking_greeting(addr)).collect::<Vec<_>>());
    for r in client.join().expect("client thread") {
        assert_eq!(r.expect("served"), "b");
    }
    let after = worker_writes();
    let writes: u64 = before
        .iter()
        .map(|(tid, b)| after.get(tid).map_or(0, |a| a.saturating_sub(*b)))
        .sum();
    // Without the worker's standing timer every connection's connect timeout was the earliest
    // timer and woke the runtime through its eventfd: 237 writes for 200 connections.
    assert!(
        writes < (N / 10) as u64,
        "{writes} eventfd writes on the workers for {N} connections"
    );
    h.stop().await;
}
