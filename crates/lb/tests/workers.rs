//! The proxy's worker threads: every worker accepts (the kernel spreads connections over their
//! `SO_REUSEPORT` listeners), and connections are served on the workers, not on the runtime that
//! runs the balancer. Loopback only; every loop is bounded.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// A connection from `127.0.0.1:port` that closes with a reset (no `TIME_WAIT`, so the same
/// port connects again at once).
async fn connect_from(port: u16, addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(([127, 0, 0, 1], port).into())?;
    let c = s.connect(addr).await?;
    c.set_zero_linger()?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_spread_even_when_the_kernel_gives_them_all_to_one_worker() {
    let a = Backend::start("a").await;
    let h = Harness::start(&service(&be("a", a.addr))).await; // two workers
    let addr = h.addr("127.0.0.10:8080");
    const N: usize = 16;
    // client ports whose connections the kernel hands to worker 0's listener (its choice
    // hashes the addresses and ports, so the same port lands on the same listener again);
    // below the ephemeral range, so nothing else picks them meanwhile
    let mut ports = Vec::new();
    for port in 21000u16..23000 {
        if ports.len() == N {
            break;
        }
        let before = h.lb.worker_accepts();
        let Ok(mut c) = connect_from(port, addr).await else {
            continue;
        };
        assert_eq!(read_line(&mut c).await.unwrap(), "a");
        if h.lb.worker_accepts()[0] > before[0] {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), N, "ports landing on worker 0: {ports:?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.lb.worker_loads().iter().sum::<u64>() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            h.lb.worker_loads()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let handoffs_before = h.metrics_text();
    // now hold a connection from each: all are accepted by worker 0, half served by worker 1
    let mut held = Vec::new();
    for &port in &ports {
        let mut c = connect_from(port, addr).await.unwrap();
        assert_eq!(read_line(&mut c).await.unwrap(), "a");
        held.push(c);
    }
    let loads = h.lb.worker_loads();
    assert_eq!(loads.iter().sum::<u64>(), N as u64, "{loads:?}");
    // even is 8 / 8; the slack allows 7 / 9 (without hand-overs: 16 / 0)
    assert!(loads.iter().all(|&l| l >= 7), "{loads:?}");
    // the hand-overs are counted, and the handed connections relay like any other
    let handed = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("portico_lb_worker_handoffs_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let text = h.metrics_text();
    assert!(
        handed(&text) >= handed(&handoffs_before) + 7,
        "{}",
        text.lines()
            .filter(|l| l.contains("worker"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (i, c) in held.iter_mut().enumerate() {
        let msg = format!("held {i}");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    drop(held);
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
