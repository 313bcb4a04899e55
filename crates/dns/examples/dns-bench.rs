//! Runs the DNS server alone from a portico config file, with every backend healthy and every
//! VIP owned — what `bench/dns.sh` measures until `portico run` serves DNS itself.
//!
//! ```text
//! dns-bench --config FILE [--listen ADDR] [--udp-sockets N] [--threads N]
//! ```
//! Prints `listening on ADDR` once the sockets are bound; stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use model::{Desired, HealthView, OwnershipView};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = None;
    let mut listen: Option<SocketAddr> = None;
    let mut udp_sockets = 2usize;
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--config" => config = Some(val()?),
            "--listen" => listen = Some(val()?.parse()?),
            "--udp-sockets" => udp_sockets = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            _ => return Err(format!("unknown argument {a}; usage: dns-bench --config FILE [--listen ADDR] [--udp-sockets N] [--threads N]").into()),
        }
    }
    let path = config.ok_or("--config FILE is required")?;
    let cfg = model::config::load(&path, &model::config::Environment::default())?;
    let listen = listen
        .or(cfg.dns.as_ref().map(|d| d.listen))
        .ok_or("the config has no dns section")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (udp, tcp) = dns::bind(listen, udp_sockets)?;
        println!("listening on {}", tcp.local_addr()?);
        let mut registry = prometheus_client::registry::Registry::default();
        let server = dns::DnsServer::new(&mut registry);
        let (_d, desired) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(cfg),
        }));
        let (_h, health) = watch::channel(Arc::new(HealthView::new()));
        let (_o, ownership) = watch::channel(Arc::new(OwnershipView::new()));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let sigterm = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = sigterm => {}
            }
            stop.cancel();
        });
        server
            .run(udp, tcp, desired, health, ownership, shutdown)
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
