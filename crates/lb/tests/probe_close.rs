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

/// `TIME_WAIT` sockets (state 06) in this namespace with `port` at either end.
fn time_wait_with(port: u16) -> usize {
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "06" {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port) {
                n += 1;
            }
        }
    }
    n
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

/// Waits until the kernel has settled the last probes' closes (bounded), then counts.
async fn settled_time_wait(port: u16) -> usize {
    let mut n = time_wait_with(port);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        n = time_wait_with(port);
    }
    n
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
