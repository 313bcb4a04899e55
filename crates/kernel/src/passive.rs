//! Passive outlier detection on the kernel path (pure: conntrack events and instants in,
//! outcomes and ejection changes out).
//!
//! The kernel path sees no connection itself, but conntrack does: every flow DNATed to a
//! backend is an entry whose original destination is the `VIP:port` and whose reply source is
//! the backend. From its events ([`sys::conntrack::events`]) each new TCP flow gets one
//! outcome:
//! - **connected**: the backend answered the SYN (conntrack state `SYN_RECV` or later);
//! - **refused**: the entry closed (`CLOSE`) or was destroyed before the backend answered and
//!   before `connection.connect_timeout` (the backend sent a RST: its port is closed);
//! - **timeout**: no answer within `connection.connect_timeout` of the first SYN (a
//!   black-holed backend: conntrack itself would wait `nf_conntrack_tcp_timeout_syn_sent`,
//!   120 s, and SYN retransmits change no state, so they bring no event).
//!
//! Outcomes feed the proxy's state machine ([`lb::outlier::OutlierState`]) per backend, so
//! `consecutive_failures`, ejection time, `max_ejection_percent` and half-open re-admission
//! behave as on the proxy: an ejected backend leaves the kernel maps (the driver plans it as
//! down), comes back half-open when the ejection ends, and its next flow's outcome closes the
//! breaker or ejects it again. Unlike the proxy, a half-open backend gets its whole share of
//! new flows at once (a map slot cannot hold "one probe").
//!
//! Not detected: UDP flows (no handshake), failures after the handshake (a backend that
//! accepts and then resets or stalls), and a client that resets its own unanswered SYN (counted
//! as refused: conntrack does not say which side sent a RST that destroys an unanswered
//! entry). Flows whose new event was lost (an overrun) are not counted, and when events are lost
//! the flows awaiting an outcome are forgotten ([`Passive::forget_pending`]) rather than timed
//! out: their answer may have been among the lost events.
//!
//! Bounded: at most `max_flows` flows awaiting an outcome; beyond it a new flow is not tracked
//! and [`Report::untracked`] counts it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use lb::outlier::{FailureOutcome, OutlierState, may_eject};
use model::{BackendKey, BreakerState, Config, Outlier, Protocol};
use sys::conntrack::events::{Event, EventKind, TcpState};
use tokio::time::{Duration, Instant};

use crate::plan::{self, Target};

/// IP protocol number of TCP.
const TCP: u8 = 6;

/// Flows awaiting an outcome, by default.
pub const DEFAULT_MAX_FLOWS: usize = 65536;

/// What the feed watches: `(protocol, VIP:port, backend:port)` of every TCP kernel target of a
/// service with outlier detection on.
pub type Watched = HashSet<(u8, SocketAddr, SocketAddr)>;

/// One flow: protocol, client, `VIP:port`.
type Flow = (u8, SocketAddr, SocketAddr);

/// A flow's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The backend answered the SYN.
    Connected,
    /// Closed or destroyed unanswered before the connect timeout (a RST).
    Refused,
    /// Unanswered for `connection.connect_timeout`.
    Timeout,
}

impl Outcome {
    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
        }
    }
}

/// A change of a backend's ejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Ejected until the instant (reason `outlierEjected`).
    Ejected(BackendKey, Instant),
    /// Would be ejected, but `max_ejection_percent` is reached (reason `ejectionLimited`).
    Limited(BackendKey),
    /// The ejection ended: back in the maps, half-open (reason `ejectionEnded`).
    Readmitted(BackendKey),
}

/// What one call observed and decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Flow outcomes, in order.
    pub outcomes: Vec<(BackendKey, Outcome)>,
    /// Ejection changes, in order.
    pub changes: Vec<Change>,
    /// New flows not tracked because `max_flows` flows were awaiting an outcome.
    pub untracked: u64,
}

impl Report {
    /// Whether the set of ejected backends changed (the maps must be replanned).
    pub fn ejections_changed(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::Ejected(..) | Change::Readmitted(_)))
    }

    /// Appends `other`.
    pub fn merge(&mut self, other: Report) {
        self.outcomes.extend(other.outcomes);
        self.changes.extend(other.changes);
        self.untracked += other.untracked;
    }
}

/// A backend's passive state as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendOutlier {
    /// Ejected now (out of the maps).
    pub ejected: bool,
    /// Breaker state (open while ejected, half-open until a flow after the ejection connects).
    pub breaker: BreakerState,
    /// Failed flows seen (refused and timed out).
    pub failures: u64,
}

struct Svc {
    outlier: Outlier,
    connect_timeout: Duration,
    backends: Vec<BackendKey>,
}

struct Record {
    state: OutlierState,
    until: Option<Instant>,
    failures: u64,
    targets: Vec<Target>,
}

struct Pending {
    key: BackendKey,
    deadline: Instant,
}

/// The passive detector of every kernel-path service.
pub struct Passive {
    max_flows: usize,
    targets: HashMap<(u8, SocketAddr, SocketAddr), BackendKey>,
    services: BTreeMap<String, Svc>,
    records: BTreeMap<BackendKey, Record>,
    pending: HashMap<Flow, Pending>,
    deadlines: BTreeSet<(Instant, Flow)>,
}

impl Passive {
    /// A detector tracking at most `max_flows` flows awaiting an outcome.
    pub fn new(max_flows: usize) -> Self {
        Self {
            max_flows,
            targets: HashMap::new(),
            services: BTreeMap::new(),
            records: BTreeMap::new(),
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// Follows a new configuration: watches the TCP targets of each kernel-path service with
    /// `outlier.consecutive_failures` > 0 and `outlier.conntrack_events`. A backend that stays with the same targets keeps its
    /// record (ejection included); others start afresh; flows of backends gone are forgotten.
    pub fn configure(&mut self, config: &Config) {
        let mut targets = HashMap::new();
        let mut services = BTreeMap::new();
        let mut records = BTreeMap::new();
        for s in config.services.iter().filter(|s| plan::on_kernel(s)) {
            if s.outlier.consecutive_failures == 0 || !s.outlier.conntrack_events {
                continue;
            }
            let mut keys = Vec::new();
            for b in s.backends.iter().filter(|b| b.weight > 0) {
                let key = BackendKey::new(&s.name, &b.name);
                let ts: Vec<Target> = plan::targets(s, b)
                    .into_iter()
                    .filter(|t| t.protocol == Protocol::Tcp)
                    .collect();
                for t in &ts {
                    targets.insert((TCP, t.vip, t.backend), key.clone());
                }
                let rec = match self.records.remove(&key) {
                    Some(r) if r.targets == ts => r,
                    _ => Record {
                        state: OutlierState::default(),
                        until: None,
                        failures: 0,
                        targets: ts,
                    },
                };
                records.insert(key.clone(), rec);
                keys.push(key);
            }
            services.insert(
                s.name.clone(),
                Svc {
                    outlier: s.outlier.clone(),
                    connect_timeout: s.connection.connect_timeout,
                    backends: keys,
                },
            );
        }
        self.targets = targets;
        self.services = services;
        self.records = records;
        let records = &self.records;
        self.pending.retain(|_, p| records.contains_key(&p.key));
        let pending = &self.pending;
        self.deadlines.retain(|(_, f)| pending.contains_key(f));
    }

    /// The targets the feed should pass on (others are not portico's flows).
    pub fn watched(&self) -> Watched {
        self.targets.keys().copied().collect()
    }

    /// One conntrack event at `now`.
    pub fn on_event(&mut self, now: Instant, ev: &Event) -> Report {
        let mut report = Report::default();
        if ev.proto != TCP {
            return report;
        }
        let Some(key) = self.targets.get(&(TCP, ev.orig_dst, ev.reply_src)).cloned() else {
            return report;
        };
        let flow = (TCP, ev.orig_src, ev.orig_dst);
        let state = ev.tcp_state;
        if ev.kind == EventKind::New
            && state.is_none_or(|s| s == TcpState::SynSent)
            && !self.pending.contains_key(&flow)
        {
            if self.pending.len() >= self.max_flows {
                report.untracked += 1;
                return report;
            }
            let timeout = self
                .services
                .get(&key.service)
                .map_or(Duration::from_secs(1), |s| s.connect_timeout);
            let deadline = now + timeout;
            self.deadlines.insert((deadline, flow));
            self.pending.insert(flow, Pending { key, deadline });
            return report;
        }
        let Some(p) = self.pending.get(&flow) else {
            return report;
        };
        let outcome = if state.is_some_and(TcpState::answered) {
            Outcome::Connected
        } else if ev.kind == EventKind::Destroy || state == Some(TcpState::Close) {
            if now >= p.deadline {
                Outcome::Timeout
            } else {
                Outcome::Refused
            }
        } else {
            return report;
        };
        let p = self.forget(&flow).expect("pending above");
        self.record(now, p.key, outcome, &mut report);
        report
    }

    fn forget(&mut self, flow: &Flow) -> Option<Pending> {
        let p = self.pending.remove(flow)?;
        self.deadlines.remove(&(p.deadline, *flow));
        Some(p)
    }

    /// Ends connect timeouts and ejections due at `now`.
    pub fn on_tick(&mut self, now: Instant) -> Report {
        let mut report = Report::default();
        while let Some(&(deadline, flow)) = self.deadlines.first()
            && deadline <= now
        {
            if let Some(p) = self.forget(&flow) {
                self.record(now, p.key, Outcome::Timeout, &mut report);
            } else {
                self.deadlines.pop_first();
            }
        }
        for (key, rec) in &mut self.records {
            if rec.until.is_some_and(|u| u <= now) {
                rec.until = None;
                // ends the ejection inside the state machine: half-open
                let _ = rec.state.is_ejected(now);
                report.changes.push(Change::Readmitted(key.clone()));
            }
        }
        report
    }

    fn record(&mut self, now: Instant, key: BackendKey, outcome: Outcome, report: &mut Report) {
        let Some(svc) = self.services.get(&key.service) else {
            return;
        };
        let ejected = svc
            .backends
            .iter()
            .filter(|k| self.records.get(*k).is_some_and(|r| r.until.is_some()))
            .count();
        let allowed = may_eject(&svc.outlier, ejected, svc.backends.len());
        let Some(rec) = self.records.get_mut(&key) else {
            return;
        };
        report.outcomes.push((key.clone(), outcome));
        if outcome == Outcome::Connected {
            rec.state.on_success(&svc.outlier, now);
            return;
        }
        rec.failures += 1;
        match rec.state.on_failure(&svc.outlier, now, allowed) {
            FailureOutcome::Ejected(until) => {
                rec.until = Some(until);
                report.changes.push(Change::Ejected(key, until));
            }
            FailureOutcome::EjectionLimited => report.changes.push(Change::Limited(key)),
            FailureOutcome::Counted => {}
        }
    }

    /// The next instant [`Self::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let flows = self.deadlines.first().map(|(d, _)| *d);
        let ejections = self.records.values().filter_map(|r| r.until).min();
        match (flows, ejections) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Backends ejected now (the driver plans them as down).
    pub fn ejected(&self) -> BTreeSet<BackendKey> {
        self.records
            .iter()
            .filter(|(_, r)| r.until.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Forgets every flow awaiting an outcome (events were lost: a connected flow whose answer
    /// was among them would otherwise count as a timeout); returns how many.
    pub fn forget_pending(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        self.deadlines.clear();
        n
    }

    /// Flows awaiting an outcome.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Every watched backend's state at `now`, for `/status`.
    pub fn status(&self, now: Instant) -> BTreeMap<BackendKey, BackendOutlier> {
        self.records
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    BackendOutlier {
                        ejected: r.until.is_some(),
                        breaker: r.state.breaker(now, false),
                        failures: r.failures,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
