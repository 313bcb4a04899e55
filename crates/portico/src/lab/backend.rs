//! The lab's backend (`portico lab backend`, hidden): answers every connection with its node's
//! name, and optionally echoes on a second address (after a hello line with the name).

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::AsyncWriteExt;

/// Serves `listen` (the name, then close) and `echo` until killed.
pub(super) async fn backend(
    name: String,
    listen: SocketAddr,
    echo: Option<SocketAddr>,
    hello: bool,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("backend cannot listen on {listen}"))?;
    if let Some(addr) = echo {
        let e = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("echo backend cannot listen on {addr}"))?;
        let greeting = format!("{name}\n");
        tokio::spawn(async move {
            while let Ok((s, _)) = e.accept().await {
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    if hello && w.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }
    loop {
        let (mut s, _) = l.accept().await?;
        let msg = format!("{name}\n");
        tokio::spawn(async move {
            let _ = s.write_all(msg.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
