//! Node agent: gossip membership, VIP ownership, L2 announcement.

pub mod owner;

use std::sync::Arc;

use model::{Desired, HealthView, MemberStatus, OwnershipView};
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Gossip socket I/O failed.
    #[error("gossip socket")]
    Io(#[from] std::io::Error),
}

/// The agent: membership, ownership decisions and announcement.
#[derive(Clone, Default)]
pub struct Agent {}

impl Agent {
    /// Creates an agent whose metrics live in `registry`.
    pub fn new(_registry: &mut Registry) -> Self {
        Self {}
    }

    /// Runs until `shutdown`: gossips on `socket`, decides owners for every VIP in `desired`
    /// (using backend `health` for local-only services), announces owned VIPs, and publishes
    /// decisions to `ownership`. On shutdown it leaves the cluster gracefully first.
    pub async fn run(
        &self,
        _socket: Option<UdpSocket>,
        _desired: watch::Receiver<Arc<Desired>>,
        _health: watch::Receiver<Arc<HealthView>>,
        _ownership: watch::Sender<Arc<OwnershipView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        shutdown.cancelled().await;
        Ok(())
    }

    /// Cluster members as this node sees them.
    pub fn members(&self) -> Vec<MemberStatus> {
        Vec::new()
    }

    /// Conflicting MAC answers seen for an owned VIP.
    pub fn conflicts(&self, _vip: std::net::IpAddr) -> u64 {
        0
    }
}
