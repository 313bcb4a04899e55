//! Health probes end with a reset: after many TCP and HTTP probes against real loopback servers
//! no `TIME_WAIT` socket is left on either side of the probes' connections (read from
//! `/proc/net/tcp` of this network namespace). Fails without the reset: one `TIME_WAIT` per probe
//! (the probe's side for TCP, the server's for HTTP, which closes first like nginx).

use std::net::SocketAddr;
use std::time::Duration;

use lb::check::probe;
use model::CheckKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PROBES: usize = 20;

/// Sockets in this namespace with `port` at either end, by state: `(TIME_WAIT, still closing)`
/// — "still closing" being any state but `LISTEN` (0A), `TIME_WAIT` (06) and `CLOSE` (07).
fn sockets_with(port: u16) -> (usize, usize) {
    let (mut time_wait, mut closing) = (0, 0);
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port_of(f[1]) != Some(port) && port_of(f[2]) != Some(port) {
                continue;
            }
            match f[3] {
                "06" => time_wait += 1,
                "0A" | "07" => {}
                _ => closing += 1,
            }
        }
    }
    (time_wait, closing)
}

/// A server like nginx: reads a request (if any), answers `200` and closes first.
async fn http_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                // the server closes first: without the probe's reset this is a server TIME_WAIT
            });
        }
    });
    addr
}

/// `TIME_WAIT` sockets with `port` once no connection with it is still closing (waits for that
/// state, at most 5 s: the server's side of the last probes may still be shutting down).
async fn settled_time_wait(port: u16) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (time_wait, closing) = sockets_with(port);
        if closing == 0 || tokio::time::Instant::now() >= deadline {
            return time_wait;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tcp_probes_leave_no_time_wait() {
    let addr = http_server().await;
    for _ in 0..PROBES {
        probe(&CheckKind::Tcp, addr, Duration::from_secs(2))
            .await
            .unwrap();
    }
    let tw = settled_time_wait(addr.port()).await;
    assert_eq!(
        tw, 0,
        "{tw} TIME_WAIT sockets after {PROBES} TCP probes: probes must close with a reset"
    );
}

#[tokio::test]
async fn http_probes_leave_no_time_wait_on_the_backend() {
    let addr = http_server().await;
    let kind = CheckKind::Http {
        path: "/".into(),
        expect_status: 200,
        host: None,
    };
    for _ in 0..PROBES {
        probe(&kind, addr, Duration::from_secs(2)).await.unwrap();
    }
    let tw = settled_time_wait(addr.port()).await;
    assert_eq!(
        tw, 0,
        "{tw} TIME_WAIT sockets after {PROBES} HTTP probes: probes must close with a reset"
    );
}
