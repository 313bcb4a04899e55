//! The proxy's worker threads: every worker accepts (the kernel spreads connections over their
//! `SO_REUSEPORT` listeners), and connections are served on the workers, not on the runtime that
//! runs the balancer. Loopback only; every loop is bounded.

mod common;

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
    // … and each worker's share is exported
    let text = h.metrics_text();
    for (i, n) in per_worker.iter().enumerate() {
        let line = format!("portico_lb_worker_accepted_connections_total{{worker=\"{i}\"}} {n}");
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    h.stop().await;
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
