//! Relay correctness through the balancer on loopback: byte-exact large transfers (splice and
//! copy), half-close in both directions, idle timeout, PROXY protocol headers, the first bytes of
//! either side (client first, backend first) and what they cost.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn checksum(data: &[u8]) -> u64 {
    lb::maglev::stable_hash(0, data)
}

fn service(backends: &str, extra: &str) -> String {
    format!(
        "  - name: web\n    vips: [127.0.0.10]\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{backends}{extra}"
    )
}

async fn large_transfer(splice: bool) {
    let a = Backend::start("a").await;
    let h = Harness::start_with(&service(&be("a", a.addr), ""), splice).await;
    let mut s = TcpStream::connect(h.addr("127.0.0.10:8080")).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sent = checksum(&data);
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        // Half-close: the backend sees EOF, finishes echoing, and closes.
        w.shutdown().await.unwrap();
        data.len()
    });
    let mut back = Vec::with_capacity(16 << 20);
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo completes")
        .unwrap();
    assert_eq!(writer.await.unwrap(), back.len());
    assert_eq!(checksum(&back), sent, "echo differs");
    if uring() && !splice {
        // copying, the echo passes 8 messages within its first 128 KiB: handed to the ring
        assert!(
            h.metric("portico_lb_uring_relays_total") >= 1,
            "the ring relayed nothing"
        );
    }
    if splice {
        // a bulk transfer keeps splice, also with proxy.io: uring
        assert!(
            lb::relay::spliced_bytes() >= 16 << 20,
            "splice path did not run: {} bytes spliced",
            lb::relay::spliced_bytes()
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_with_client_half_close_is_byte_exact_through_splice() {
    large_transfer(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_is_byte_exact_in_copy_mode() {
    large_transfer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_the_client_direction_open() {
    // The backend says hello and shuts its write side at once, then reads the client to EOF.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    // Health-check connections close at once and send nothing: keep serving until one carries
    // the client's bytes.
    let got = tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"hello").await;
            let _ = s.shutdown().await;
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all).await;
            if !all.is_empty() {
                return all;
            }
        }
    });
    let h = Harness::start(&service(&be("a", baddr), "")).await;
    let mut s = TcpStream::connect(h.addr("127.0.0.10:8080")).await.unwrap();
    let mut first = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, b"hello");
    // Our read side is at EOF; writing still reaches the backend.
    s.write_all(b"late data after EOF").await.unwrap();
    s.shutdown().await.unwrap();
    let all = tokio::time::timeout(WAIT, got).await.unwrap().unwrap();
    assert_eq!(all, b"late data after EOF");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let a = Backend::start("a").await;
    let h = Harness::start(&service(
        &be("a", a.addr),
        "    connection: {idle_timeout: 300ms}\n",
    ))
    .await;
    let mut s = TcpStream::connect(h.addr("127.0.0.10:8080")).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed by idle timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    h.stop().await;
}

async fn proxy_header(version: &str) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    // The default TCP health check also connects here and closes without a byte, with a reset
    // (which a read may report): skip those connections and keep the first one that carried
    // data.
    let got = tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            if s.read_to_end(&mut buf).await.is_ok() && !buf.is_empty() {
                return buf;
            }
        }
    });
    let h = Harness::start(&service(
        &be("a", baddr),
        &format!("    proxy_protocol: {version}\n"),
    ))
    .await;
    let mut s = TcpStream::connect(h.addr("127.0.0.10:8080")).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"payload").await.unwrap();
    s.shutdown().await.unwrap();
    let buf = tokio::time::timeout(WAIT, got).await.unwrap().unwrap();
    let (header, n) = lb::proxy_protocol::decode(&buf).unwrap();
    assert_eq!(header.addrs, Some((me, "127.0.0.10:8080".parse().unwrap())));
    assert_eq!(&buf[n..], b"payload");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_tells_the_backend_the_client_address() {
    proxy_header("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_tells_the_backend_the_client_address() {
    proxy_header("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_vip_relays_to_ipv6_backend() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        sys::skip_test("::1 is not configured on this host");
        return;
    }
    let a = Backend::start_at("a6", "[::1]:0".parse().unwrap(), false).await;
    let yaml = format!(
        "  - name: web6\n    vips: ['fd00::10']\n    ports:\n      - {{name: http, port: 8080}}\n    backends:\n{}",
        be("a6", a.addr)
    );
    let h = Harness::start(&yaml).await;
    let addr = h.addr("[fd00::10]:8080");
    assert!(addr.is_ipv6());
    assert_eq!(roundtrip(addr, b"ping6").await.unwrap(), "a6");
    h.stop().await;
}

/// An echo backend that waits for the client to speak first (HTTP-like): echoes what it reads
/// until EOF, then closes. Serves every connection; stops with the test's runtime.
async fn echo_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A client that speaks first: its first bytes are read once (no `MSG_PEEK`), handed to the
/// backend, counted, and the rest is relayed; a refused backend before it costs the client
/// nothing (it is moved to the next one with its bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_speaks_first_is_relayed_and_counted_also_after_a_refused_backend() {
    // a port nothing listens on: the connect is refused
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let raddr = refused.local_addr().unwrap();
    drop(refused);
    let echo = echo_backend().await;
    let h = Harness::start(&service(
        &format!(
            "      - {{name: dead, address: 127.0.0.1, port: {}, weight: 1000}}\n{}",
            raddr.port(),
            be("e", echo)
        ),
        "    health_check: {type: none}\n    outlier: {consecutive_failures: 0}\n    connection: {retries: 2}\n",
    ))
    .await;
    let mut total = 0u64;
    for i in 0..10u32 {
        let mut s = TcpStream::connect(h.addr("127.0.0.10:8080")).await.unwrap();
        let first = format!("request {i}\r\n");
        s.write_all(first.as_bytes()).await.unwrap();
        let mut back = vec![0u8; first.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .expect("first echo in time")
            .unwrap();
        assert_eq!(back, first.as_bytes());
        let second = b"and more\r\n";
        s.write_all(second).await.unwrap();
        let mut back = vec![0u8; second.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .expect("second echo in time")
            .unwrap();
        assert_eq!(&back, second);
        total += (first.len() + second.len()) as u64;
    }
    let series = |d: &str| {
        format!("portico_lb_bytes_total{{service=\"web\",backend=\"e\",direction=\"{d}\"}}")
    };
    wait_until("every byte counted both ways", || {
        h.metric(&series("to_backend")) == total && h.metric(&series("to_client")) == total
    })
    .await;
    assert!(
        h.metric("portico_lb_retries_total{service=\"web\"}") >= 1,
        "the refused backend was tried first at least once"
    );
    h.stop().await;
}

/// The backend connection is opened with `TCP_QUICKACK` off (the ACK of its SYN-ACK rides on
/// the client's first bytes). A backend that speaks first (MySQL, SMTP; the test backends greet)
/// must not wait for that ACK: the balancer sends it at once when the client has said nothing.
/// Without that, every greeting waits for the kernel's delayed-ACK timer (200 ms after a
/// SYN-ACK): 20 connections would take at least 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_speaks_first_greets_without_waiting_for_a_delayed_ack() {
    let a = Backend::start("a").await;
    let h = Harness::start(&service(&be("a", a.addr), "")).await;
    let addr = h.addr("127.0.0.10:8080");
    // one connection first: workers and timers are up
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "a");
    drop(s);
    let started = tokio::time::Instant::now();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let line = tokio::time::timeout(WAIT, read_line(&mut s))
            .await
            .expect("greeted in time")
            .unwrap();
        assert_eq!(line, "a");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "20 greetings took {took:?}: the ACK of the backend's SYN-ACK waited for the delayed-ACK timer"
    );
    h.stop().await;
}

/// A request/response backend: reads until `\r\n\r\n`, answers with `parts` (one send each;
/// with `together` the last part and the FIN leave in one segment: `MSG_MORE` then shutdown),
/// then reads to EOF and closes. Counts the connections it accepted (no health checks here).
async fn http_backend(
    parts: &'static [&'static [u8]],
    together: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n @ 1..) => req.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                for (i, part) in parts.iter().enumerate() {
                    if together && i + 1 == parts.len() {
                        s.writable().await.unwrap();
                        let sent = s.try_io(tokio::io::Interest::WRITABLE, || {
                            Ok(rustix::net::send(&s, part, rustix::net::SendFlags::MORE)?)
                        });
                        assert_eq!(sent.unwrap(), part.len());
                    } else {
                        s.write_all(part).await.unwrap();
                    }
                }
                let _ = s.shutdown().await;
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    (addr, accepted)
}

/// A client connected through the balancer once the backend has taken its connection (the
/// balancer has accepted it and set it up by then).
async fn connected(
    addr: std::net::SocketAddr,
    accepted: &std::sync::atomic::AtomicUsize,
) -> TcpStream {
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    let s = TcpStream::connect(addr).await.unwrap();
    wait_until("the backend took the connection", || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) > before
    })
    .await;
    s
}

/// Sends a request in `writes` (one write each) and reads the answer to EOF: [`http_backend`]'s.
async fn ask(s: &mut TcpStream, writes: &[&[u8]]) {
    for w in writes {
        s.write_all(w).await.unwrap();
    }
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"HTTP/1.0 200 OK\r\n\r\nhello\n");
}

/// When the backend's last bytes and its FIN arrive together, the balancer passes them on in
/// one segment (the bytes wait with `MSG_MORE` for the FIN sent right after), without a read
/// to learn of the EOF. The client then receives three segments: the SYN-ACK, the ACK of its
/// request, the answer with the FIN (read from `TCP_INFO`). Passed on apart, they are four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_last_bytes_and_its_fin_reach_the_client_in_one_segment() {
    let (baddr, accepted) = http_backend(&[b"HTTP/1.0 200 OK\r\n\r\nhello\n"], true).await;
    let h = Harness::start(&service(
        &be("a", baddr),
        "    health_check: {type: none}\n",
    ))
    .await;
    let addr = h.addr("127.0.0.10:8080");
    for _ in 0..5 {
        let mut s = connected(addr, &accepted).await;
        ask(&mut s, &[b"GET / HTTP/1.0\r\n\r\n"]).await;
        let seg = sys::tcp_info::segments(&s).unwrap();
        assert!(
            seg.received <= 3,
            "the client received {} segments (SYN-ACK, ACK, answer + FIN expected): the answer and the FIN came apart",
            seg.received
        );
    }
    h.stop().await;
}

/// Clients and backends that leave Nagle on and send a message in two writes (write, write,
/// read) wait for the ACK of the first before the second leaves. The balancer must not delay
/// that ACK: a client socket taken out of the kernel's quick-ACK start (`TCP_QUICKACK` off, one
/// segment saved per connection) made every such request wait for the 40 ms delayed-ACK timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nagle_peers_that_write_twice_do_not_wait_for_a_delayed_ack() {
    let (baddr, accepted) = http_backend(&[b"HTTP/1.0 200 OK\r\n", b"\r\nhello\n"], false).await;
    let h = Harness::start(&service(
        &be("a", baddr),
        "    health_check: {type: none}\n",
    ))
    .await;
    let addr = h.addr("127.0.0.10:8080");
    let mut took = Vec::new();
    for _ in 0..10 {
        let mut s = connected(addr, &accepted).await;
        assert!(!s.nodelay().unwrap(), "Nagle is on");
        let started = tokio::time::Instant::now();
        ask(&mut s, &[b"GET / HTTP/1.0", b"\r\n\r\n"]).await;
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "median request took {median:?} (all: {took:?}): a delayed ACK held a Nagle write back"
    );
    h.stop().await;
}
