//! Demo backends for the embedded default: two tiny HTTP servers on 127.0.0.1:8081 and :8082,
//! so `portico run` with no config balances real traffic at once.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The demo backends' addresses (they match the embedded default config).
pub const ADDRS: [&str; 2] = ["127.0.0.1:8081", "127.0.0.1:8082"];

/// Starts both demo backends; a port already taken is logged and skipped.
pub async fn start(shutdown: CancellationToken) {
    for (i, addr) in ADDRS.iter().enumerate() {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!("demo backend {} listening on {addr}", i + 1);
                tokio::spawn(serve(l, i + 1, shutdown.clone()));
            }
            Err(e) => tracing::warn!("demo backend {} cannot listen on {addr}: {e}", i + 1),
        }
    }
}

async fn serve(listener: TcpListener, n: usize, shutdown: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            // Answer each request on the connection (keep-alive), bounded by 64 KiB of headers.
            loop {
                let Ok(k) = s.read(&mut buf).await else {
                    return;
                };
                if k == 0 || seen.len() > 65536 {
                    return;
                }
                seen.extend_from_slice(&buf[..k]);
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    seen.drain(..end + 4);
                    let body = format!("hello from portico demo backend {n}\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}
