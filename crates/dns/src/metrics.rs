//! Prometheus metrics of the DNS server. Hot-path counts are kept per worker in a plain
//! [`LocalCounts`] and added to the shared counters in batches, so a query costs no shared
//! atomic increment.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::respond::{Outcome, Transport};
use crate::wire::rcode;

/// RCODE label values, indexed by [`rcode_index`].
const RCODES: [&str; 8] = [
    "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused", "badvers", "other",
];
const TRANSPORTS: [&str; 2] = ["udp", "tcp"];

fn rcode_index(rc: u16) -> usize {
    match rc {
        0..=5 => rc as usize,
        rcode::BADVERS => 6,
        _ => 7,
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
    }
}

/// The server's metric handles.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    responses: Family<[(&'static str, &'static str); 2], Counter>,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
    truncated: Counter,
    io_errors: Counter,
    /// Snapshot rebuilds.
    pub rebuilds: Counter,
    /// Services answering every address because nothing is healthy.
    pub fail_open: Gauge,
    /// Services answering no address because nothing is healthy.
    pub fail_closed: Gauge,
    /// Open TCP connections.
    pub tcp_connections: Gauge,
    /// TCP connections refused or closed by the connection bounds, by reason.
    pub tcp_rejected: Family<[(&'static str, &'static str); 1], Counter>,
    /// Names in the current snapshot.
    pub names: Gauge,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let registry = registry.sub_registry_with_prefix("portico");
        registry.register(
            "dns_responses",
            "DNS responses sent, by transport and rcode",
            m.responses.clone(),
        );
        registry.register(
            "dns_dropped",
            "DNS queries dropped without a reply",
            m.dropped.clone(),
        );
        registry.register(
            "dns_truncated",
            "UDP responses sent with TC set",
            m.truncated.clone(),
        );
        registry.register("dns_io_errors", "DNS socket errors", m.io_errors.clone());
        registry.register(
            "dns_snapshot_rebuilds",
            "Answer snapshots built",
            m.rebuilds.clone(),
        );
        registry.register(
            "dns_services_fail_open",
            "Services answering all addresses because none is healthy",
            m.fail_open.clone(),
        );
        registry.register(
            "dns_services_fail_closed",
            "Services answering no address because none is healthy",
            m.fail_closed.clone(),
        );
        registry.register(
            "dns_tcp_connections",
            "Open DNS TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register(
            "dns_tcp_rejected",
            "DNS TCP connections closed by the connection bounds, by reason (tableFull, clientLimit: refused at accept; evicted: idle, closed for a newcomer)",
            m.tcp_rejected.clone(),
        );
        registry.register("dns_names", "Names in the answer snapshot", m.names.clone());
        for r in ["tableFull", "clientLimit", "evicted"] {
            let _ = m.tcp_rejected.get_or_create(&[("reason", r)]);
        }
        for t in TRANSPORTS {
            for r in RCODES {
                let _ = m.responses.get_or_create(&[("transport", t), ("rcode", r)]);
            }
            let _ = m.dropped.get_or_create(&[("transport", t)]);
        }
        m
    }

    /// Adds a worker's batch.
    pub fn flush(&self, c: &mut LocalCounts) {
        for (t, row) in c.responses.iter_mut().enumerate() {
            for (r, n) in row.iter_mut().enumerate() {
                if *n > 0 {
                    self.responses
                        .get_or_create(&[("transport", TRANSPORTS[t]), ("rcode", RCODES[r])])
                        .inc_by(*n);
                    *n = 0;
                }
            }
        }
        for (t, n) in c.dropped.iter_mut().enumerate() {
            if *n > 0 {
                self.dropped
                    .get_or_create(&[("transport", TRANSPORTS[t])])
                    .inc_by(*n);
                *n = 0;
            }
        }
        if c.truncated > 0 {
            self.truncated.inc_by(c.truncated);
        }
        if c.io_errors > 0 {
            self.io_errors.inc_by(c.io_errors);
        }
        c.truncated = 0;
        c.io_errors = 0;
        c.pending = 0;
    }
}

/// One worker's counts since its last flush.
#[derive(Debug, Default)]
pub struct LocalCounts {
    responses: [[u64; RCODES.len()]; 2],
    dropped: [u64; 2],
    truncated: u64,
    io_errors: u64,
    /// Events since the last flush.
    pub pending: u32,
}

impl LocalCounts {
    /// Counts one query's outcome (`None`: dropped).
    #[inline]
    pub fn record(&mut self, t: Transport, o: Option<Outcome>) {
        let ti = transport_index(t);
        match o {
            Some(o) => {
                self.responses[ti][rcode_index(o.rcode)] += 1;
                self.truncated += u64::from(o.truncated);
            }
            None => self.dropped[ti] += 1,
        }
        self.pending += 1;
    }

    /// Counts a socket error.
    pub fn io_error(&mut self) {
        self.io_errors += 1;
        self.pending += 1;
    }
}
