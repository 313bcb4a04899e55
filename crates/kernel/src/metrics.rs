//! Prometheus metrics of the kernel path, under the prefix `portico_kernel` (labelled like the
//! proxy's backend metrics: `{service, backend}`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use lb::metrics::BackendLabels;

/// `{kind}`: `replace` or `elements`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Batch kind.
    pub kind: String,
}

/// `{engine}`: `library` (libnftables in-process) or `command` (`nft -f -`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    /// How nft commands run.
    pub engine: String,
}

/// `{service, backend, outcome}`: a flow's outcome (`connected`, `refused`, `timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
    /// The outcome.
    pub outcome: String,
}

/// `{reason}`: why conntrack events were lost (`overrun`, `queueFull`, `malformed`,
/// `flowTableFull`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason word.
    pub reason: String,
}

/// The kernel path's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Packets through the kernel path per backend (nft counters, both directions).
    pub packets: Family<BackendLabels, Counter>,
    /// Bytes through the kernel path per backend (nft counters, both directions).
    pub bytes: Family<BackendLabels, Counter>,
    /// Batches applied, by kind.
    pub batches: Family<KindLabels, Counter>,
    /// Batches nft refused (the table is then replaced whole at the next try).
    pub batch_errors: Counter,
    /// Time to apply one batch (the nft call: library or `nft -f -` start to exit).
    pub batch_seconds: Histogram,
    /// Time from a desired, health or ejection change received to its batch applied.
    pub update_seconds: Histogram,
    /// 1 for the engine that runs nft commands in this process.
    pub engine: Family<EngineLabels, Gauge>,
    /// Backends draining (no new flows; established ones until `drain_timeout`).
    pub draining: Gauge,
    /// Drains refused because the bounded drain list was full: their flows were cut at once.
    pub drains_refused: Counter,
    /// Conntrack entries deleted when a drain ended.
    pub conntrack_deleted: Counter,
    /// Outcomes of new TCP flows seen in conntrack events (passive outlier detection).
    pub flow_outcomes: Family<OutcomeLabels, Counter>,
    /// Outlier ejections on the kernel path.
    pub ejections: Family<BackendLabels, Counter>,
    /// Conntrack events of portico's flows passed to the detector.
    pub conntrack_events: Counter,
    /// Conntrack events lost or not used, by reason.
    pub events_dropped: Family<ReasonLabels, Counter>,
    /// 1 while the conntrack event feed runs (passive outlier detection on the kernel path).
    pub passive: Gauge,
}

impl Metrics {
    /// Counts `n` events lost for `reason`.
    pub fn dropped(&self, reason: &str, n: u64) {
        self.events_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }
}

impl Metrics {
    /// Registers under `portico_kernel` in the root `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            packets: Family::default(),
            bytes: Family::default(),
            batches: Family::default(),
            batch_errors: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            update_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            engine: Family::default(),
            draining: Gauge::default(),
            drains_refused: Counter::default(),
            conntrack_deleted: Counter::default(),
            flow_outcomes: Family::default(),
            ejections: Family::default(),
            conntrack_events: Counter::default(),
            events_dropped: Family::default(),
            passive: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("portico_kernel");
        r.register(
            "backend_packets",
            "Packets the kernel path forwarded per backend, both directions (nft counters)",
            m.packets.clone(),
        );
        r.register(
            "backend_bytes",
            "Bytes the kernel path forwarded per backend, both directions (nft counters)",
            m.bytes.clone(),
        );
        r.register(
            "batches",
            "nftables batches applied to table inet portico, by kind (replace, elements)",
            m.batches.clone(),
        );
        r.register(
            "batch_errors",
            "nftables batches nft refused (the next try replaces the whole table)",
            m.batch_errors.clone(),
        );
        r.register(
            "batch_seconds",
            "Time to apply one nftables batch",
            m.batch_seconds.clone(),
        );
        r.register(
            "update_seconds",
            "Time from a desired-state, health or outlier-ejection change received to its nftables batch applied (plan, diff and the nft call)",
            m.update_seconds.clone(),
        );
        r.register(
            "nft_engine",
            "1 for how this process runs nft commands: library (libnftables in-process) or command (nft -f -, when the library is absent)",
            m.engine.clone(),
        );
        r.register(
            "draining_backends",
            "Backends removed from the kernel path whose established flows may still finish",
            m.draining.clone(),
        );
        r.register(
            "drains_refused",
            "Backend drains refused because the bounded drain list was full (their flows were cut at once)",
            m.drains_refused.clone(),
        );
        r.register(
            "conntrack_deleted",
            "Conntrack entries deleted when a drained backend's drain_timeout ended",
            m.conntrack_deleted.clone(),
        );
        r.register(
            "backend_flow_outcomes",
            "Outcomes of new TCP flows through the kernel path seen in conntrack events: connected, refused (reset before an answer), timeout (no answer within connect_timeout)",
            m.flow_outcomes.clone(),
        );
        r.register(
            "backend_ejections",
            "Outlier ejections of kernel-path backends (from conntrack flow outcomes)",
            m.ejections.clone(),
        );
        r.register(
            "conntrack_events",
            "Conntrack events of kernel-path flows passed to passive outlier detection",
            m.conntrack_events.clone(),
        );
        r.register(
            "conntrack_events_dropped",
            "Conntrack events lost, by reason: overrun (the socket buffer overflowed, ENOBUFS: one or more events each), queueFull (the bounded queue to the driver), malformed, flowTableFull (a new flow not tracked: the bounded table of flows awaiting an outcome was full)",
            m.events_dropped.clone(),
        );
        r.register(
            "passive_detection",
            "1 while the conntrack event feed of passive outlier detection runs on the kernel path",
            m.passive.clone(),
        );
        m
    }
}
