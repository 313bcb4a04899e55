//! The L4 data path: listeners, relay, backend choice, health checks, outlier ejection, circuit breaking.

use std::sync::Arc;

use model::{Desired, HealthView, ServiceStatus};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Errors of the load balancer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be opened.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The balancer: follows desired state, runs health checks, relays connections.
#[derive(Clone, Default)]
pub struct LoadBalancer {}

impl LoadBalancer {
    /// Creates a balancer whose metrics live in `registry`.
    pub fn new(_registry: &mut Registry) -> Self {
        Self {}
    }

    /// Runs until `shutdown`: applies each desired generation (listeners, backends), publishes
    /// backend health to `health`, and drains connections on shutdown.
    pub async fn run(
        &self,
        _desired: watch::Receiver<Arc<Desired>>,
        _health: watch::Sender<Arc<HealthView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        shutdown.cancelled().await;
        Ok(())
    }

    /// Live status of one service's backends (health, breaker, counters), if it is running.
    pub fn service_status(&self, _service: &str) -> Option<ServiceStatus> {
        None
    }
}
