//! The event timeline: a bounded ring of what changed (ownership moves, health transitions,
//! ejections, breakers, reloads, conflicts, members), derived by diffing status reports.
//!
//! Pure: [`Differ::diff`] takes two [`StatusReport`]s and the instants the caller read them at,
//! and returns [`Change`]s; [`EventRing`] keeps the last [`EventRing::capacity`] of them with a
//! sequence number, evicting the oldest (and counting what it evicted). [`EventLog`] is the
//! shared handle the binary pushes into and the admin server (`/events`, the console) reads.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::{BackendStatus, BreakerState, Health, StatusReport};

/// How many events a node keeps by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One event of the timeline, as `/events` serves it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, 1 for the first event of this process; gaps mean evicted events.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What changed: `ownerMoved`, `ownerLost`, `health`, `ejected`, `readmitted`, `breaker`,
    /// `reload`, `reloadError`, `conflict`, `member`.
    pub kind: String,
    /// What it is about: a VIP, `service/backend`, a node name, or the configuration.
    pub subject: String,
    /// Human-readable detail (`n1 → n2 (owner)`, `up → down`, …).
    pub message: String,
    /// For an ownership move: how long the VIP was without owner in this node's view, in
    /// milliseconds (0 for a direct move from one owner to the next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A change found by [`Differ::diff`], before it gets a sequence number and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// See [`Event::kind`].
    pub kind: &'static str,
    /// See [`Event::subject`].
    pub subject: String,
    /// See [`Event::message`].
    pub message: String,
    /// See [`Event::duration_ms`].
    pub duration: Option<Duration>,
}

impl Change {
    fn new(kind: &'static str, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            subject: subject.into(),
            message: message.into(),
            duration: None,
        }
    }
}

/// A bounded ring of events: at capacity, the oldest is evicted.
#[derive(Debug, Clone)]
pub struct EventRing {
    capacity: usize,
    events: VecDeque<Event>,
    next_seq: u64,
    evicted: u64,
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventRing {
    /// A ring keeping at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            events: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
            next_seq: 1,
            evicted: 0,
        }
    }

    /// How many events it keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `change` stamped `at_ms`; returns its sequence number.
    pub fn push(&mut self, at_ms: u64, change: Change) -> u64 {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.evicted += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.events.push_back(Event {
            seq,
            at_ms,
            kind: change.kind.to_string(),
            subject: change.subject,
            message: change.message,
            duration_ms: change
                .duration
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        seq
    }

    /// The kept events with a sequence number above `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        let start = self.events.partition_point(|e| e.seq <= seq);
        self.events.iter().skip(start).cloned().collect()
    }

    /// The last `n` kept events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        let skip = self.events.len().saturating_sub(n);
        self.events.iter().skip(skip).cloned().collect()
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn latest(&self) -> u64 {
        self.next_seq - 1
    }

    /// Events evicted to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// A shared [`EventRing`]: clones push into and read the same ring.
#[derive(Debug, Clone, Default)]
pub struct EventLog(Arc<Mutex<EventRing>>);

impl EventLog {
    /// A log keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Mutex::new(EventRing::new(capacity))))
    }

    /// Runs `f` on the ring (a poisoned lock is taken over: the ring stays consistent).
    pub fn with<T>(&self, f: impl FnOnce(&mut EventRing) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// See [`EventRing::since`].
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.with(|r| r.since(seq))
    }

    /// See [`EventRing::latest`].
    pub fn latest(&self) -> u64 {
        self.with(|r| r.latest())
    }
}

/// Finds what changed between consecutive status reports, and remembers since when each VIP
/// has been without owner so that a move reports its duration.
#[derive(Debug, Clone, Default)]
pub struct Differ {
    prev: Option<StatusReport>,
    ownerless_since: BTreeMap<IpAddr, Duration>,
}

impl Differ {
    /// A differ that has seen nothing yet (the first report yields no changes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes from the previous report to `next`, read at `now` (any monotonic clock: only
    /// differences are used).
    pub fn diff(&mut self, next: &StatusReport, now: Duration) -> Vec<Change> {
        let mut out = Vec::new();
        let Some(prev) = self.prev.replace(next.clone()) else {
            for v in next.services.iter().flat_map(|s| &s.vips) {
                if v.owner.is_none() {
                    self.ownerless_since.insert(v.address, now);
                }
            }
            return out;
        };
        if next.generation > prev.generation {
            out.push(Change::new(
                "reload",
                "config",
                format!("generation {} applied", next.generation),
            ));
        }
        if next.last_reload_error != prev.last_reload_error
            && let Some(e) = &next.last_reload_error
        {
            out.push(Change::new("reloadError", "config", e.clone()));
        }
        for m in &next.members {
            let before = prev.members.iter().find(|p| p.name == m.name);
            match before {
                Some(b) if b.state == m.state => {}
                Some(b) => out.push(Change::new(
                    "member",
                    m.name.as_str(),
                    format!("{} → {}", b.state, m.state),
                )),
                None => out.push(Change::new(
                    "member",
                    m.name.as_str(),
                    format!("joined ({})", m.state),
                )),
            }
        }
        for p in &prev.members {
            if !next.members.iter().any(|m| m.name == p.name) {
                out.push(Change::new("member", p.name.as_str(), "left"));
            }
        }
        let prev_vips: BTreeMap<IpAddr, _> = prev
            .services
            .iter()
            .flat_map(|s| &s.vips)
            .map(|v| (v.address, v))
            .collect();
        let mut seen = BTreeMap::new();
        for v in next.services.iter().flat_map(|s| &s.vips) {
            if seen.insert(v.address, ()).is_some() {
                continue;
            }
            let subject = v.address.to_string();
            let old = prev_vips.get(&v.address);
            let old_owner = old.and_then(|o| o.owner.as_deref());
            if old.is_none() || old_owner != v.owner.as_deref() {
                match &v.owner {
                    Some(owner) => {
                        let since = self.ownerless_since.remove(&v.address);
                        let mut c = Change::new(
                            "ownerMoved",
                            subject.clone(),
                            format!("{} → {owner} ({})", old_owner.unwrap_or("none"), v.reason),
                        );
                        c.duration = Some(since.map_or(Duration::ZERO, |s| now.saturating_sub(s)));
                        out.push(c);
                    }
                    None => {
                        self.ownerless_since.entry(v.address).or_insert(now);
                        out.push(Change::new(
                            "ownerLost",
                            subject.clone(),
                            format!("{} → none ({})", old_owner.unwrap_or("none"), v.reason),
                        ));
                    }
                }
            }
            if let Some(o) = old
                && v.conflicts > o.conflicts
            {
                out.push(Change::new(
                    "conflict",
                    subject,
                    format!(
                        "{} conflicting MAC answer(s) for an address owned here",
                        v.conflicts - o.conflicts
                    ),
                ));
            }
        }
        self.ownerless_since.retain(|ip, _| seen.contains_key(ip));
        for s in &next.services {
            let Some(ps) = prev.services.iter().find(|p| p.name == s.name) else {
                continue;
            };
            for b in &s.backends {
                let Some(pb) = ps.backends.iter().find(|p| p.name == b.name) else {
                    continue;
                };
                backend_changes(&s.name, pb, b, &mut out);
            }
        }
        out
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Unknown => "unknown",
        Health::Up => "up",
        Health::Down => "down",
    }
}

fn breaker_word(b: BreakerState) -> &'static str {
    match b {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
    }
}

fn backend_changes(service: &str, old: &BackendStatus, new: &BackendStatus, out: &mut Vec<Change>) {
    let subject = format!("{service}/{}", new.name);
    if old.health != new.health {
        out.push(Change::new(
            "health",
            subject.clone(),
            format!("{} → {}", health_word(old.health), health_word(new.health)),
        ));
    }
    if old.ejected != new.ejected {
        let (kind, msg) = if new.ejected {
            ("ejected", "ejected by outlier detection")
        } else {
            ("readmitted", "ejection ended")
        };
        out.push(Change::new(kind, subject.clone(), msg));
    }
    if old.breaker != new.breaker {
        out.push(Change::new(
            "breaker",
            subject,
            format!(
                "{} → {}",
                breaker_word(old.breaker),
                breaker_word(new.breaker)
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemberStatus, ServiceStatus, VipStatus};

    fn change(kind: &'static str) -> Change {
        Change::new(kind, "s", "m")
    }

    #[test]
    fn the_ring_is_bounded_and_counts_what_it_evicts() {
        let mut r = EventRing::new(3);
        for i in 0..5 {
            r.push(i, change("reload"));
        }
        let seqs: Vec<u64> = r.since(0).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!((r.evicted(), r.latest()), (2, 5));
        assert_eq!(r.since(4).len(), 1);
        assert_eq!(r.since(5).len(), 0);
        assert_eq!(r.last(2).first().map(|e| e.seq), Some(4));
    }

    fn report(owner: Option<&str>, health: Health, ejected: bool, generation: u64) -> StatusReport {
        StatusReport {
            node: "n1".into(),
            generation,
            members: vec![MemberStatus {
                name: "n2".into(),
                address: "127.0.0.1:7946".parse().unwrap(),
                state: if owner == Some("n2") { "alive" } else { "down" }.into(),
            }],
            services: vec![ServiceStatus {
                name: "web".into(),
                ports: vec![],
                vips: vec![VipStatus {
                    address: "192.0.2.1".parse().unwrap(),
                    owner: owner.map(Into::into),
                    reason: if owner == Some("n1") {
                        "owner"
                    } else {
                        "notOwner"
                    }
                    .into(),
                    conflicts: 0,
                }],
                backends: vec![BackendStatus {
                    name: "b1".into(),
                    address: "127.0.0.1".parse().unwrap(),
                    weight: 1,
                    health,
                    breaker: Default::default(),
                    ejected,
                    draining: false,
                    active_connections: 0,
                    total_connections: 0,
                    connect_failures: 0,
                    bytes_to_backend: 0,
                    bytes_to_client: 0,
                }],
                panic_mode: false,
                path: Default::default(),
                path_reason: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn changes_between_reports_become_events_with_move_durations() {
        let mut d = Differ::new();
        let s = Duration::from_secs;
        assert!(
            d.diff(&report(Some("n2"), Health::Up, false, 1), s(0))
                .is_empty()
        );
        // nothing changed: nothing to say
        assert!(
            d.diff(&report(Some("n2"), Health::Up, false, 1), s(1))
                .is_empty()
        );
        let c = d.diff(&report(None, Health::Down, true, 1), s(2));
        let kinds: Vec<&str> = c.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, ["member", "ownerLost", "health", "ejected"], "{c:?}");
        assert_eq!(c[2].message, "up → down");
        let c = d.diff(&report(Some("n1"), Health::Up, false, 2), s(5));
        let moved = c.iter().find(|c| c.kind == "ownerMoved").expect("a move");
        assert_eq!(moved.message, "none → n1 (owner)");
        assert_eq!(moved.duration, Some(s(3)));
        assert!(c.iter().any(|c| c.kind == "reload"));
        assert!(c.iter().any(|c| c.kind == "readmitted"));
        // a direct move has a zero duration
        let c = d.diff(&report(Some("n2"), Health::Up, false, 2), s(6));
        let moved = c.iter().find(|c| c.kind == "ownerMoved").expect("a move");
        assert_eq!(moved.duration, Some(Duration::ZERO));
    }

    #[test]
    fn a_reload_error_and_a_conflict_are_events() {
        let mut d = Differ::new();
        let a = report(Some("n1"), Health::Up, false, 1);
        d.diff(&a, Duration::ZERO);
        let mut b = a.clone();
        b.last_reload_error = Some("services[0].port: 0 is not a port".into());
        b.services[0].vips[0].conflicts = 2;
        let c = d.diff(&b, Duration::from_millis(100));
        let kinds: Vec<&str> = c.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, ["reloadError", "conflict"], "{c:?}");
    }
}
