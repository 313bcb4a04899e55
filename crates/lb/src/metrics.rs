//! Prometheus metrics of the data path, per service and backend.
//!
//! [`Metrics::register`] puts them under the prefix `portico_lb` in the registry it is given
//! (it calls `sub_registry_with_prefix` itself, so pass the root registry). Counter names carry
//! no `_total` suffix: prometheus-client appends it. Per-backend handles are resolved once when a
//! backend is created, never on the per-connection path.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::balance::Reason;

/// `{service, backend}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
}

/// Relay direction.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// Client → backend.
    to_backend,
    /// Backend → client.
    to_client,
}

/// `{service, backend, direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
    /// Direction.
    pub direction: Direction,
}

/// `{service, backend, state}` for the breaker state (1 on the current state, 0 on others).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
    /// `closed`, `open` or `half-open`.
    pub state: String,
}

/// `{service}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Service name.
    pub service: String,
}

/// `{service, reason}` for refused connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Service name.
    pub service: String,
    /// Reason word.
    pub reason: Reason,
}

/// An operation that can meet a local resource shortage.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    /// Accepting a client connection.
    accept,
    /// Connecting to a backend.
    connect,
    /// A health check.
    check,
    /// Opening a UDP session's socket or receiving on it.
    udp_session,
}

/// `{operation}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The operation.
    pub operation: Operation,
}

/// `{protocol}`: `tcp` or `udp`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// The protocol.
    pub protocol: String,
}

/// `{worker}`: a proxy worker thread's index (`0` also without worker threads).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker's index.
    pub worker: String,
}

fn check_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// All data-path metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Open relayed connections.
    pub active: Family<BackendLabels, Gauge>,
    /// Connections relayed (counted when the backend connect succeeds).
    pub connections: Family<BackendLabels, Counter>,
    /// Bytes relayed.
    pub bytes: Family<BytesLabels, Counter>,
    /// Failed backend connects (refused, timed out) and backend resets.
    pub connect_failures: Family<BackendLabels, Counter>,
    /// Connect attempts retried onto another backend.
    pub retries: Family<ServiceLabels, Counter>,
    /// Client connections refused without a backend, by reason.
    pub refused: Family<RefusedLabels, Counter>,
    /// Outlier ejections.
    pub ejections: Family<BackendLabels, Counter>,
    /// Active-check health: 1 serving (up or unknown), 0 down.
    pub healthy: Family<BackendLabels, Gauge>,
    /// Breaker state: 1 on the current state.
    pub breaker: Family<StateLabels, Gauge>,
    /// Active check duration in seconds.
    pub check_seconds: Family<BackendLabels, Histogram, fn() -> Histogram>,
    /// Whether the service is in panic mode.
    pub panic: Family<ServiceLabels, Gauge>,
    /// Connections waiting for a slot.
    pub pending: Family<ServiceLabels, Gauge>,
    /// Open UDP sessions.
    pub udp_sessions: Family<ServiceLabels, Gauge>,
    /// UDP sessions closed early to make room for a new client, by reason.
    pub udp_evicted: Family<RefusedLabels, Counter>,
    /// Operations that failed for lack of local resources.
    pub local_resource_errors: Family<OperationLabels, Counter>,
    /// The node's connection budget, by protocol.
    pub budget: Family<ProtocolLabels, Gauge>,
    /// The part of the budget in use, by protocol.
    pub budget_in_use: Family<ProtocolLabels, Gauge>,
    /// TCP connections each proxy worker accepted (how evenly `SO_REUSEPORT` spreads them).
    pub worker_accepted: Family<WorkerLabels, Counter>,
    /// Accepted TCP connections handed to a less busy worker to serve.
    pub worker_handoffs: Counter,
    /// The io_uring relay's counters (`proxy.io: uring`).
    pub uring: crate::uring::Metrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            active: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            connect_failures: Family::default(),
            retries: Family::default(),
            refused: Family::default(),
            ejections: Family::default(),
            healthy: Family::default(),
            breaker: Family::default(),
            check_seconds: Family::new_with_constructor(check_histogram),
            panic: Family::default(),
            pending: Family::default(),
            udp_sessions: Family::default(),
            udp_evicted: Family::default(),
            local_resource_errors: Family::default(),
            budget: Family::default(),
            budget_in_use: Family::default(),
            worker_accepted: Family::default(),
            worker_handoffs: Counter::default(),
            uring: crate::uring::Metrics::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `portico_lb` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_lb");
        r.register(
            "connections_active",
            "Open relayed connections",
            m.active.clone(),
        );
        r.register(
            "connections",
            "Connections relayed to a backend",
            m.connections.clone(),
        );
        r.register("bytes", "Bytes relayed", m.bytes.clone());
        r.register(
            "connect_failures",
            "Failed backend connects and backend resets",
            m.connect_failures.clone(),
        );
        r.register(
            "retries",
            "Connects retried on another backend",
            m.retries.clone(),
        );
        r.register(
            "refused",
            "Client connections closed without a backend, by reason",
            m.refused.clone(),
        );
        r.register("ejections", "Outlier ejections", m.ejections.clone());
        r.register(
            "backend_healthy",
            "Active check verdict: 1 serving, 0 down",
            m.healthy.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker state (1 on the current state)",
            m.breaker.clone(),
        );
        r.register(
            "check_duration_seconds",
            "Active health check latency",
            m.check_seconds.clone(),
        );
        r.register(
            "panic_mode",
            "1 when the service balances over all backends",
            m.panic.clone(),
        );
        r.register(
            "pending",
            "Connections waiting for a slot",
            m.pending.clone(),
        );
        r.register("udp_sessions", "Open UDP sessions", m.udp_sessions.clone());
        r.register(
            "udp_sessions_evicted",
            "Idle UDP sessions closed early to make room for a new client, by reason",
            m.udp_evicted.clone(),
        );
        r.register(
            "local_resource_errors",
            "Operations that failed for lack of local resources (EMFILE, ENFILE, ENOBUFS, ENOMEM); never counted against a backend",
            m.local_resource_errors.clone(),
        );
        r.register(
            "connection_budget",
            "Relayed TCP connections and UDP sessions this node holds at most, derived from its file-descriptor limit",
            m.budget.clone(),
        );
        r.register(
            "connection_budget_in_use",
            "Relayed TCP connections and UDP sessions open now",
            m.budget_in_use.clone(),
        );
        r.register(
            "worker_accepted_connections",
            "TCP connections each proxy worker thread accepted, by worker (the kernel spreads them over the workers' SO_REUSEPORT listeners by a hash of the flow)",
            m.worker_accepted.clone(),
        );
        r.register(
            "worker_handoffs",
            "Accepted TCP connections a proxy worker handed to a less busy worker to serve (the accepting one served over a quarter more connections than it, plus one)",
            m.worker_handoffs.clone(),
        );
        r.register(
            "uring_relays",
            "TCP connections relayed on a proxy worker's io_uring (proxy.io: uring)",
            m.uring.relays.clone(),
        );
        r.register(
            "uring_fallbacks",
            "TCP connections that proxy.io: uring could not put on an io_uring (not on a proxy worker, or io_uring unavailable) and tokio relayed",
            m.uring.fallbacks.clone(),
        );
        r.register(
            "uring_buffer_waits",
            "Times a relay direction found every buffer of its worker's io_uring pool in use and waited for one",
            m.uring.buffer_waits.clone(),
        );
        m
    }

    /// Removes every series of a backend that left the config.
    pub fn forget_backend(&self, service: &str, backend: &str) {
        let l = BackendLabels {
            service: service.into(),
            backend: backend.into(),
        };
        self.active.remove(&l);
        self.healthy.remove(&l);
        for state in ["closed", "open", "half-open"] {
            self.breaker.remove(&StateLabels {
                service: service.into(),
                backend: backend.into(),
                state: state.into(),
            });
        }
    }
}

/// Metric handles of one backend, resolved once.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// Open connections.
    pub active: Gauge,
    /// Connections relayed.
    pub connections: Counter,
    /// Bytes towards the backend.
    pub bytes_to_backend: Counter,
    /// Bytes towards the client.
    pub bytes_to_client: Counter,
    /// Failed connects and resets.
    pub connect_failures: Counter,
    /// Ejections.
    pub ejections: Counter,
    /// Health gauge.
    pub healthy: Gauge,
    /// Breaker gauges: closed, open, half-open.
    pub breaker: [Gauge; 3],
    /// Check latency.
    pub check_seconds: Histogram,
}

impl BackendMetrics {
    /// Resolves the handles of `service`/`backend`.
    pub fn new(m: &Metrics, service: &str, backend: &str) -> Self {
        let l = BackendLabels {
            service: service.into(),
            backend: backend.into(),
        };
        let bytes = |direction| {
            m.bytes
                .get_or_create(&BytesLabels {
                    service: service.into(),
                    backend: backend.into(),
                    direction,
                })
                .clone()
        };
        let state = |s: &str| {
            m.breaker
                .get_or_create(&StateLabels {
                    service: service.into(),
                    backend: backend.into(),
                    state: s.into(),
                })
                .clone()
        };
        let me = Self {
            active: m.active.get_or_create(&l).clone(),
            connections: m.connections.get_or_create(&l).clone(),
            bytes_to_backend: bytes(Direction::to_backend),
            bytes_to_client: bytes(Direction::to_client),
            connect_failures: m.connect_failures.get_or_create(&l).clone(),
            ejections: m.ejections.get_or_create(&l).clone(),
            healthy: m.healthy.get_or_create(&l).clone(),
            breaker: [state("closed"), state("open"), state("half-open")],
            check_seconds: m.check_seconds.get_or_create(&l).clone(),
        };
        me.healthy.set(1);
        me.breaker[0].set(1);
        me
    }

    /// Sets the breaker gauges.
    pub fn set_breaker(&self, s: model::BreakerState) {
        let i = match s {
            model::BreakerState::Closed => 0,
            model::BreakerState::Open => 1,
            model::BreakerState::HalfOpen => 2,
        };
        for (k, g) in self.breaker.iter().enumerate() {
            g.set(i64::from(k == i));
        }
    }
}
