//! What the balancer's services share on this node: the connection [`Budget`] and its use, and
//! the once-per-interval logs of local resource shortages.
//!
//! A local shortage (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, see
//! [`sys::limits::is_local_resource_error`]) is never a backend failure: a health check or
//! connect that fails with one leaves the backend's health and outlier record alone, is counted
//! in `portico_lb_local_resource_errors_total{operation}` and logged at most once per
//! [`LOCAL_ERROR_LOG_INTERVAL`] for the whole node.

use std::sync::atomic::{AtomicU32, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sys::limits::LogEvery;
use tokio::time::{Duration, Instant};

use crate::budget::Budget;
use crate::metrics::{Metrics, Operation, OperationLabels, ProtocolLabels};

/// A local shortage is logged at most once per this interval (with the count suppressed).
pub const LOCAL_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The node-wide state of the balancer.
#[derive(Debug)]
pub(crate) struct NodeRt {
    pub(crate) budget: Budget,
    /// Relayed TCP connections now (each took one unit of `budget.tcp_connections`).
    pub(crate) tcp: AtomicU32,
    /// UDP sessions now, over every listener.
    pub(crate) udp: AtomicU32,
    tcp_gauge: Gauge,
    udp_gauge: Gauge,
    errors: [Counter; 4],
    log: LogEvery,
}

impl NodeRt {
    pub(crate) fn new(budget: Budget, m: &Metrics) -> Self {
        let proto = |p: &str| {
            m.budget_in_use
                .get_or_create(&ProtocolLabels { protocol: p.into() })
                .clone()
        };
        for (p, v) in [
            ("tcp", budget.tcp_connections),
            ("udp", budget.udp_sessions),
        ] {
            m.budget
                .get_or_create(&ProtocolLabels { protocol: p.into() })
                .set(i64::from(v));
        }
        let err = |operation| {
            m.local_resource_errors
                .get_or_create(&OperationLabels { operation })
                .clone()
        };
        Self {
            budget,
            tcp: AtomicU32::new(0),
            udp: AtomicU32::new(0),
            tcp_gauge: proto("tcp"),
            udp_gauge: proto("udp"),
            errors: [
                err(Operation::accept),
                err(Operation::connect),
                err(Operation::check),
                err(Operation::udp_session),
            ],
            log: LogEvery::new(LOCAL_ERROR_LOG_INTERVAL),
        }
    }

    /// Takes one TCP connection of the budget, or says no.
    pub(crate) fn acquire_tcp(&self) -> bool {
        let ok = crate::service::try_acquire(&self.tcp, self.budget.tcp_connections.max(1));
        if ok {
            self.tcp_gauge.inc();
        }
        ok
    }

    /// Gives a TCP connection back.
    pub(crate) fn release_tcp(&self) {
        self.tcp.fetch_sub(1, Ordering::AcqRel);
        self.tcp_gauge.dec();
    }

    /// Takes one UDP session of the budget, or says no.
    pub(crate) fn acquire_udp(&self) -> bool {
        let ok = crate::service::try_acquire(&self.udp, self.budget.udp_sessions.max(1));
        if ok {
            self.udp_gauge.inc();
        }
        ok
    }

    /// Gives a UDP session back.
    pub(crate) fn release_udp(&self) {
        self.udp.fetch_sub(1, Ordering::AcqRel);
        self.udp_gauge.dec();
    }

    /// Counts a local shortage met by `operation` and logs it if none was logged within the
    /// interval. Returns whether `e` was one (the caller then leaves the backend alone).
    pub(crate) fn local_error(&self, operation: Operation, e: &std::io::Error) -> bool {
        if !sys::limits::is_local_resource_error(e) {
            return false;
        }
        let i = match operation {
            Operation::accept => 0,
            Operation::connect => 1,
            Operation::check => 2,
            Operation::udp_session => 3,
        };
        self.errors[i].inc();
        if let Some(suppressed) = self.log.check(Instant::now()) {
            tracing::warn!(
                reason = "localResources",
                ?operation,
                error = %e,
                suppressed,
                nofile = self.budget.nofile,
                "this node is short of file descriptors or memory; not counted against any backend"
            );
        }
        true
    }
}

/// Holds one TCP connection of the node budget; gives it back on drop.
pub(crate) struct TcpUnit(pub(crate) std::sync::Arc<NodeRt>);

impl Drop for TcpUnit {
    fn drop(&mut self) {
        self.0.release_tcp();
    }
}
