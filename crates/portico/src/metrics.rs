//! The binary's own metrics: configuration generation and reloads, derived from the spine.

use std::sync::Arc;

use model::Desired;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Configuration metrics.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    generation: Gauge,
    reloads: Counter,
    rejected: Counter,
}

impl ConfigMetrics {
    /// Registers under `portico_config_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_config");
        r.register(
            "generation",
            "Generation of the applied configuration",
            m.generation.clone(),
        );
        r.register(
            "reloads",
            "Configurations applied after the first",
            m.reloads.clone(),
        );
        r.register(
            "reload_failures",
            "Reloads rejected as invalid (the running config was kept)",
            m.rejected.clone(),
        );
        m
    }

    /// Follows the spine: generation from `desired`, failures from `reload_error`.
    pub async fn follow(
        self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut reload_error: watch::Receiver<Option<String>>,
        shutdown: CancellationToken,
    ) {
        self.generation
            .set(desired.borrow_and_update().generation as i64);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = desired.changed() => {
                    if r.is_err() { return; }
                    self.generation.set(desired.borrow_and_update().generation as i64);
                    self.reloads.inc();
                }
                r = reload_error.changed() => {
                    if r.is_err() { return; }
                    if reload_error.borrow_and_update().is_some() {
                        self.rejected.inc();
                    }
                }
            }
        }
    }
}
