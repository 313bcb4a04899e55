//! Authoritative, health-aware round-robin DNS.
//!
//! portico answers for its zones with the addresses of services that are healthy *now*: a VIP
//! is published while it has an owner and its service has a serving backend (or, in node mode,
//! the serving backends' own addresses), rotated per query. When nothing is healthy a service
//! answers every address (fail open) or none (`fail_closed`).
//!
//! # Layout
//! - [`wire`]: the DNS wire format (RFC 1035 header diagram, names, records, EDNS0).
//! - [`snapshot`]: every answer rendered to bytes ahead of time from desired state, health and
//!   ownership; rebuilt whenever one of them changes.
//! - [`respond`]: the pure request path — query bytes and a snapshot in, response bytes out.
//! - `server`: the thin tokio driver (UDP workers, TCP connections, the rebuild loop) and
//!   [`bind`].
//! - `metrics`: Prometheus counters, batched per worker.
//!
//! # Wiring
//! ```no_run
//! # async fn wire(mut registry: prometheus_client::registry::Registry,
//! #   desired: tokio::sync::watch::Receiver<std::sync::Arc<model::Desired>>,
//! #   health: tokio::sync::watch::Receiver<std::sync::Arc<model::HealthView>>,
//! #   ownership: tokio::sync::watch::Receiver<std::sync::Arc<model::OwnershipView>>,
//! #   shutdown: tokio_util::sync::CancellationToken) -> Result<(), Box<dyn std::error::Error>> {
//! let (udp, tcp) = dns::bind("127.0.0.1:5353".parse()?, 2)?;
//! let server = dns::DnsServer::new(&mut registry);
//! server.run(udp, tcp, desired, health, ownership, shutdown).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use arc_swap::ArcSwap;
use model::{Desired, DnsNameStatus, HealthView, OwnershipView};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod metrics;
pub mod respond;
mod server;
pub mod snapshot;
pub mod wire;

#[cfg(test)]
mod testutil;

pub use respond::{Limits, Outcome, Transport, respond};
pub use server::bind;
pub use snapshot::{Snapshot, service_fqdn};

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket I/O failed.
    #[error("dns socket: {0}")]
    Io(#[from] std::io::Error),
    /// A worker failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// The DNS server. Cheap to clone; clones share the snapshot and metrics.
#[derive(Clone, Debug)]
pub struct DnsServer {
    shared: Arc<server::Shared>,
}

impl DnsServer {
    /// Creates a server whose metrics live in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        Self::with_limits(registry, Limits::default())
    }

    /// Creates a server with explicit response limits.
    pub fn with_limits(registry: &mut Registry, limits: Limits) -> Self {
        Self {
            shared: Arc::new(server::Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                metrics: metrics::Metrics::new(registry),
                limits,
            }),
        }
    }

    /// What each published service name answers right now (for `/status`).
    pub fn status(&self) -> Vec<DnsNameStatus> {
        self.shared.snapshot.load().status().to_vec()
    }

    /// The snapshot currently answered from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Serves on the given sockets until `shutdown`, answering from desired state, health and
    /// ownership (answers are rebuilt whenever any of them changes).
    pub async fn run(
        &self,
        udp: Vec<UdpSocket>,
        tcp: TcpListener,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut health: watch::Receiver<Arc<HealthView>>,
        mut ownership: watch::Receiver<Arc<OwnershipView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let stop = shutdown.child_token();
        server::rebuild(&self.shared, &mut desired, &mut health, &mut ownership);
        let mut workers = tokio::task::JoinSet::new();
        // Dropping this future (instead of cancelling `shutdown`) stops the workers too.
        let _guard = stop.clone().drop_guard();
        for (i, sock) in udp.into_iter().enumerate() {
            let sock = sock.into_std()?;
            let (shared, stop) = (self.shared.clone(), stop.clone());
            let (done, finished) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    let _ = done.send(server::udp_thread(&shared, sock, &stop, server::UDP_BATCH));
                })?;
            workers.spawn(async move { finished.await.unwrap_or(Ok(())) });
        }
        workers.spawn(server::tcp_acceptor(self.shared.clone(), tcp, stop.clone()));
        let rebuild = server::rebuild_loop(&self.shared, desired, health, ownership, &stop);
        let mut result = Ok(());
        tokio::select! {
            () = rebuild => {}
            Some(r) = workers.join_next() => {
                if let Ok(Err(e)) = r {
                    result = Err(Error::from(e));
                }
            }
        }
        stop.cancel();
        while let Some(r) = workers.join_next().await {
            if let (Ok(Err(e)), Ok(())) = (r, &result) {
                result = Err(Error::from(e));
            }
        }
        result
    }
}
