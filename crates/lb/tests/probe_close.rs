//! Health probes end with a reset: after many TCP and HTTP probes against real loopback servers
//! no `TIME_WAIT` socket is left on either side of the probes' connections (read from
//! `/proc/net/tcp` of this network namespace; only sockets new since the probes began count).
//! Fails without the reset: one `TIME_WAIT` per probe (the probe's side for TCP, the server's
//! for HTTP, which closes first like nginx).

use std::net::SocketAddr;
use std::time::Duration;

use lb::check::probe;
use model::CheckKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PROBES: usize = 20;

/// The sockets of this namespace with `127.0.0.1:port` at either end, as `(state, local,
/// remote)` in `/proc/net/tcp`'s hex notation.
fn sockets_with(port: u16) -> Vec<(String, String, String)> {
    let end = format!("0100007F:{port:04X}");
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 4 && (f[1] == end || f[2] == end))
                .then(|| (f[3].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// The `TIME_WAIT` sockets (state `06`) among `sockets`.
fn time_wait(sockets: &[(String, String, String)]) -> Vec<(String, String, String)> {
    sockets.iter().filter(|s| s.0 == "06").cloned().collect()
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

/// The `TIME_WAIT` sockets with `port` that `before` did not hold, once no connection with it
/// is still closing (waits for that state, at most 5 s: the server's side of the last probes
/// may still be shutting down). Only new ones count: a `TIME_WAIT` that another test's
/// connection left on the same port number (the listener binds with `SO_REUSEADDR`) was there
/// before the probes and lasts 60 s.
async fn new_time_wait(port: u16, before: &[(String, String, String)]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = sockets_with(port);
        // any state but `TIME_WAIT` (06), `CLOSE` (07) and `LISTEN` (0A)
        let closing = now
            .iter()
            .filter(|s| !["06", "07", "0A"].contains(&s.0.as_str()))
            .count();
        if closing == 0 || tokio::time::Instant::now() >= deadline {
            return time_wait(&now)
                .iter()
                .filter(|s| !before.contains(s))
                .count();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tcp_probes_leave_no_time_wait() {
    let addr = http_server().await;
    let before = time_wait(&sockets_with(addr.port()));
    for _ in 0..PROBES {
        probe(&CheckKind::Tcp, addr, Duration::from_secs(2))
            .await
            .unwrap();
    }
    let tw = new_time_wait(addr.port(), &before).await;
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
    let before = time_wait(&sockets_with(addr.port()));
    for _ in 0..PROBES {
        probe(&kind, addr, Duration::from_secs(2)).await.unwrap();
    }
    let tw = new_time_wait(addr.port(), &before).await;
    assert_eq!(
        tw, 0,
        "{tw} TIME_WAIT sockets after {PROBES} HTTP probes: probes must close with a reset"
    );
}
