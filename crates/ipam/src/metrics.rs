//! The controller's metrics: leadership, decisions by reason word, failed writes.
//!
//! Registered under `portico_controller_*` into the registry the binary serves on the
//! controller's metrics port (`/metrics`, next to `/healthz` and `/readyz`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The label of a decision: its reason word (`IPAllocated`, `PoolExhausted`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason word.
    pub reason: String,
}

/// `{pool, family, state}` of a pool's address count: family `ipv4`/`ipv6`, state
/// `assigned`/`available`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// `assigned` or `available`.
    pub state: &'static str,
}

/// The controller's metrics; clones share the series.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    /// 1 while this replica holds the Lease.
    pub leading: Gauge,
    /// Decisions that left an Event, by reason word.
    pub decisions: Family<ReasonLabel, Counter>,
    /// API writes that failed (other than conflicts, which are re-decided).
    pub write_failures: Counter,
    /// Pool status writes (merged per pool over a short delay).
    pub pool_status_writes: Counter,
    /// Addresses of each pool, assigned and available, as last reported in its status.
    pub pool_addresses: Family<PoolLabels, Gauge>,
}

impl ControllerMetrics {
    /// Registers under `portico_controller_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_controller");
        r.register(
            "leading",
            "1 while this replica holds the Lease and allocates, 0 while it stands by",
            m.leading.clone(),
        );
        r.register(
            "decisions",
            "Allocations, refusals and notices that left an Event, by reason word",
            m.decisions.clone(),
        );
        r.register(
            "write_failures",
            "API writes that failed other than by a conflict (retried every 10 s)",
            m.write_failures.clone(),
        );
        r.register(
            "pool_status_writes",
            "IPPool status writes (merged per pool over 0.5 s)",
            m.pool_status_writes.clone(),
        );
        r.register(
            "pool_addresses",
            "Addresses of each IPPool by family (ipv4, ipv6) and state (assigned, available), as in its status",
            m.pool_addresses.clone(),
        );
        m
    }

    /// Sets the pool gauges from a pool status patch (`{"status": {"assignedIPv4": …}}`).
    pub fn pool_reported(&self, pool: &str, patch: &serde_json::Value) {
        let status = &patch["status"];
        for (family, state, field) in [
            ("ipv4", "assigned", "assignedIPv4"),
            ("ipv4", "available", "availableIPv4"),
            ("ipv6", "assigned", "assignedIPv6"),
            ("ipv6", "available", "availableIPv6"),
        ] {
            if let Some(n) = status[field].as_i64() {
                self.pool_addresses
                    .get_or_create(&PoolLabels {
                        pool: pool.to_string(),
                        family,
                        state,
                    })
                    .set(n);
            }
        }
    }

    /// Counts one decision.
    pub fn decided(&self, reason: &str) {
        self.decisions
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_are_exported_under_the_controller_prefix() {
        let mut registry = Registry::default();
        let m = ControllerMetrics::register(&mut registry);
        m.leading.set(1);
        m.decided("IPAllocated");
        m.decided("IPAllocated");
        m.decided("PoolExhausted");
        m.write_failures.inc();
        m.pool_reported(
            "default",
            &serde_json::json!({"status": {"assignedIPv4": 3, "availableIPv4": 7}}),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("portico_controller_leading 1"), "{text}");
        assert!(
            text.contains("portico_controller_decisions_total{reason=\"IPAllocated\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("portico_controller_write_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "portico_controller_pool_addresses{pool=\"default\",family=\"ipv4\",state=\"available\"} 7"
            ),
            "{text}"
        );
    }
}
