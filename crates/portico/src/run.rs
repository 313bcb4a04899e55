//! The spine: wires a source of desired state to the balancer, agent, DNS and admin server.

use std::sync::Arc;

use model::Desired;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Serves everything from `desired` until `shutdown`. Listen addresses come from the first
/// desired config; `reload_error` carries the last rejected reload for `/status`.
pub async fn serve(
    desired: watch::Receiver<Arc<Desired>>,
    reload_error: watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _ = (desired, reload_error);
    shutdown.cancelled().await;
    Ok(())
}
