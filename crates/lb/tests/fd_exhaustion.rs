//! Running out of file descriptors is this node's shortage, not the backends': with every
//! descriptor of the process taken, health checks fail with `EMFILE` and leave the backend up,
//! accept loops back off, a backend connect that fails with `EMFILE` refuses the client without
//! a failure against the backend, all are counted; once descriptors are free again, clients are
//! served. The only test in its binary: it exhausts the descriptors of the whole process
//! (bounded: the soft limit is lowered to 64 above what is open, and restored by a guard).

mod common;

use std::time::Duration;

use common::*;
use model::Health;

/// Holds the descriptors that exhaust the process; gives them and the soft limit back on drop.
struct Exhaust {
    files: Vec<std::fs::File>,
    soft: u64,
}

impl Exhaust {
    fn now() -> Self {
        let soft = sys::limits::nofile_limit();
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as u64;
        sys::limits::set_nofile_soft_limit(open + 64).expect("lower RLIMIT_NOFILE");
        let mut files = Vec::new();
        for _ in 0..10_000 {
            match std::fs::File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) => {
                    assert!(sys::limits::is_local_resource_error(&e), "{e}");
                    break;
                }
            }
        }
        Self { files, soft }
    }
}

impl Drop for Exhaust {
    fn drop(&mut self) {
        self.files.clear();
        let _ = sys::limits::set_nofile_soft_limit(self.soft);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_is_a_local_shortage_not_a_backend_failure() {
    let backend = Backend::start("a").await;
    let yaml = format!(
        "  - name: web\n    vips: [127.0.0.19]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{}    \
         health_check: {{type: tcp, interval: 100ms, timeout: 50ms, rise: 1, fall: 1}}\n",
        be("a", backend.addr)
    );
    let h = Harness::start(&yaml).await;
    h.wait_health("web", "a", Health::Up).await;
    let addr = h.addr("127.0.0.19:8080");
    // Client sockets made before the descriptors run out; they connect while they are out.
    let clients: Vec<socket2::Socket> = (0..3)
        .map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap())
        .collect();
    let checks = "portico_lb_local_resource_errors_total{operation=\"check\"}";
    let accepts = "portico_lb_local_resource_errors_total{operation=\"accept\"}";

    let exhausted = Exhaust::now();
    assert!(!exhausted.files.is_empty());
    for c in &clients {
        c.connect(&addr.into())
            .expect("the kernel completes the handshake");
    }
    // Five checks in a row fail with EMFILE (fall is 1): the backend stays up.
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.metric(checks) < 5 || h.metric(accepts) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "EMFILE never counted as local:\n{}",
            h.metrics_text()
        );
        assert_eq!(h.lb.backend_health("web", "a"), Some(Health::Up));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.lb.backend_health("web", "a"), Some(Health::Up));
    drop(exhausted);

    // Descriptors free again: the waiting clients are accepted and relayed.
    for c in clients {
        c.set_nonblocking(true).unwrap();
        let mut s = tokio::net::TcpStream::from_std(c.into()).unwrap();
        let name = tokio::time::timeout(WAIT, read_line(&mut s))
            .await
            .expect("served once descriptors are free")
            .unwrap();
        assert_eq!(name, "a");
    }
    let m = h.metrics_text();
    assert!(
        m.contains("portico_lb_backend_healthy{service=\"web\",backend=\"a\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("portico_lb_connect_failures_total{service=\"web\",backend=\"a\"} 0"),
        "{m}"
    );

    // A backend connect that fails with EMFILE: one descriptor left, which the accept takes.
    // With outlier detection ejecting at the first failure, a counted failure would eject.
    let mut h = h;
    h.reload(&yaml.replace(
        "health_check: {type: tcp, interval: 100ms, timeout: 50ms, rise: 1, fall: 1}",
        "health_check: {type: none}\n    outlier: {consecutive_failures: 1}",
    ));
    // The reload cancels the checks; give their last probe time to end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let mut exhausted = Exhaust::now();
    exhausted.files.pop();
    client.connect(&addr.into()).unwrap();
    let refused = "portico_lb_refused_total{service=\"web\",reason=\"LocalResources\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.metric(refused) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an EMFILE connect was not a local refusal:\n{}",
            h.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(exhausted);
    assert!(h.metric("portico_lb_local_resource_errors_total{operation=\"connect\"}") >= 1);
    assert_eq!(
        h.metric("portico_lb_connect_failures_total{service=\"web\",backend=\"a\"}"),
        0
    );
    assert_eq!(
        h.metric("portico_lb_ejections_total{service=\"web\",backend=\"a\"}"),
        0
    );
    drop(client);
    // And the next client is served.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    drop(s);
    h.stop().await;
}
