//! Runs only the load balancer from a standalone config file, for `bench/lb.sh`:
//! `lb-bench CONFIG [--copy]`; the proxy runs `proxy.workers` worker threads from the config
//! (default: one per CPU) beside a current-thread runtime for checks and reloads. Listens with the freebind binder, relays with splice unless
//! `--copy`, and stops on Ctrl-C / SIGTERM.

use std::sync::Arc;

use lb::{LoadBalancer, Options};
use model::{Desired, HealthView};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: lb-bench CONFIG [--copy]")?;
    let splice = !args.iter().any(|a| a == "--copy");
    let config = model::config::load(path, &model::config::Environment::default())?;
    let workers = config.proxy.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        |n| n as usize,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut registry = Registry::default();
        let lb = LoadBalancer::with_options(
            &mut registry,
            Options {
                splice,
                workers,
                ..Options::default()
            },
        );
        let (_dtx, drx) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(config),
        }));
        let (htx, _hrx) = watch::channel(Arc::new(HealthView::new()));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
        });
        eprintln!("lb-bench: running (splice: {splice})");
        lb.run(drx, htx, shutdown).await
    })?;
    Ok(())
}
