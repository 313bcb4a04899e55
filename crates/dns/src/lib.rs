//! Authoritative, health-aware round-robin DNS.

use std::sync::Arc;

use model::{Desired, HealthView, OwnershipView};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket I/O failed.
    #[error("dns socket")]
    Io(#[from] std::io::Error),
}

/// The DNS server.
#[derive(Clone, Default)]
pub struct DnsServer {}

impl DnsServer {
    /// Creates a server whose metrics live in `registry`.
    pub fn new(_registry: &mut Registry) -> Self {
        Self {}
    }

    /// Serves on the given sockets until `shutdown`, answering from desired state, health and
    /// ownership (answers are rebuilt whenever any of them changes).
    pub async fn run(
        &self,
        _udp: Vec<UdpSocket>,
        _tcp: TcpListener,
        _desired: watch::Receiver<Arc<Desired>>,
        _health: watch::Receiver<Arc<HealthView>>,
        _ownership: watch::Receiver<Arc<OwnershipView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        shutdown.cancelled().await;
        Ok(())
    }
}
