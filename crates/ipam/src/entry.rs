//! Entry points for the binary: build a client, then run the controller or start the agent's source.

use std::sync::Arc;

use kube::Client;
use kube::api::Api;
use model::{Config, Desired};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::intent::Scope;
use crate::lease::{Leadership, LeaseElector, Timing};
use crate::metrics::ControllerMetrics;
use crate::rbac;
use crate::source::{self, Settings};

/// Errors of the entry points.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig or in-cluster configuration, or the client could not be built.
    #[error("cannot build a Kubernetes client (in-cluster service account or kubeconfig): {0}")]
    Client(#[source] kube::Error),
    /// The agent's source could not start.
    #[error(transparent)]
    Source(#[from] source::Error),
}

/// Options of `portico controller`.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Which Services to serve.
    pub scope: Scope,
    /// Namespace of the Lease (the controller's own namespace).
    pub namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
}

/// Options of `portico agent`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Which Services to serve.
    pub scope: Scope,
    /// This node's name.
    pub node: String,
    /// The agent's namespace (where the gossip Secret lives).
    pub namespace: String,
    /// The gossip Secret's name.
    pub gossip_secret: String,
    /// Gossip UDP port.
    pub gossip_port: u16,
    /// Node-local settings (interfaces, admin, DNS, cluster timing).
    pub base: Config,
    /// The host's interfaces (see [`Settings::host_interfaces`]).
    pub host_interfaces: Vec<model::Interface>,
}

/// Runs the IPAM controller with Lease leader election until `shutdown`; then releases the
/// Lease so a standby replica takes over at once (a rolling update loses no allocation time).
/// Counts into `metrics`; `ready` turns true once the API server was reached (leading or
/// standing by).
pub async fn controller(
    opts: ControllerOptions,
    metrics: ControllerMetrics,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let elector = LeaseElector::new(
        Api::namespaced(client.clone(), &opts.namespace),
        rbac::LEASE_NAME,
        opts.identity.clone(),
        Timing::default(),
    );
    let mut reached = elector.reached();
    tokio::spawn(async move {
        if reached.wait_for(|r| *r).await.is_ok() {
            ready.send_replace(true);
        }
    });
    let leading = elector.subscribe();
    // The election stops (and releases the Lease) only after the controller has stopped
    // writing, so a standby that takes over at once never overlaps with this replica.
    let stop_election = CancellationToken::new();
    let election = tokio::spawn(elector.run(stop_election.clone()));
    crate::controller::run_with_metrics(
        client,
        opts.scope,
        Some(opts.identity),
        leading,
        metrics,
        shutdown,
    )
    .await;
    stop_election.cancel();
    let _ = election.await;
    Ok(())
}

/// Starts the agent's source; `desired` holds `base` (no services, generation 0) until
/// everything is listed, then every config built from the cluster.
pub async fn agent_source(
    opts: AgentOptions,
    shutdown: CancellationToken,
) -> Result<source::Receivers, Error> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let mut base = opts.base.clone();
    base.node.name = opts.node.clone();
    base.services.clear();
    let initial = Arc::new(Desired {
        generation: 0,
        config: Arc::new(base.clone()),
    });
    let settings = Settings {
        node: opts.node,
        scope: opts.scope,
        base,
        gossip_port: opts.gossip_port,
        host_interfaces: opts.host_interfaces,
    };
    Ok(source::spawn(
        client,
        settings,
        &opts.namespace,
        &opts.gossip_secret,
        initial,
        shutdown,
    )?)
}

/// Writes this node's per-address announcement status ([`crate::announce`]) until `shutdown`;
/// `ownership` is the agent's published [`model::OwnershipView`], `alive` the nodes its gossip
/// sees up, `bgp` this node's BGP sessions and route decisions.
pub async fn announcer(
    node: String,
    receivers: &source::Receivers,
    ownership: watch::Receiver<Arc<model::OwnershipView>>,
    alive: watch::Receiver<crate::announce::Alive>,
    bgp: watch::Receiver<crate::announce::BgpView>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    crate::announce::run(
        client,
        node,
        crate::announce::Inputs {
            desired: receivers.desired.clone(),
            origins: receivers.origins.clone(),
            ownership,
            alive,
            bgp,
        },
        shutdown,
    )
    .await;
    Ok(())
}
