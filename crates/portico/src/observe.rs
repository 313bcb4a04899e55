//! The node's observer: reads the status report every [`OBSERVE_EVERY`], turns what changed into
//! timeline events (`model::events`, served on `/events`, the console and `status --watch`) and
//! keeps the per-VIP and readiness metrics the dashboards and alerts use.
//!
//! It derives everything from the published snapshots (the report is assembled from
//! `OwnershipView`, `HealthView`, the reload status and the balancer's live state), so the
//! producers (agent, balancer, source) need no hook.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use model::StatusReport;
use model::events::{Differ, EventLog};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the observer reads the status report (changes show within this, plus the time a
/// console or `status --watch` takes to poll).
pub const OBSERVE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabel {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The observer's metrics.
#[derive(Clone, Debug)]
pub struct ObserveMetrics {
    ready: Gauge,
    announced: Family<VipLabel, Gauge>,
    conflicts: Family<VipLabel, Counter>,
    ownerless: Histogram,
    events: Family<KindLabel, Counter>,
    evicted: Counter,
}

impl Default for ObserveMetrics {
    fn default() -> Self {
        Self {
            ready: Gauge::default(),
            announced: Family::default(),
            conflicts: Family::default(),
            ownerless: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            events: Family::default(),
            evicted: Counter::default(),
        }
    }
}

impl ObserveMetrics {
    /// Registers under `portico_node_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_node");
        r.register(
            "ready",
            "1 while the node is ready (first configuration applied, no component down), as /readyz",
            m.ready.clone(),
        );
        r.register(
            "vip_announced",
            "1 for each VIP this node announces (owns), 0 for the other VIPs it knows; sum by vip across nodes for owners per VIP",
            m.announced.clone(),
        );
        r.register(
            "vip_conflicts",
            "Conflicting MAC answers seen for a VIP while owned here, by vip",
            m.conflicts.clone(),
        );
        r.register(
            "vip_ownerless_seconds",
            "How long a VIP was without owner in this node's view when an owner took it (0 for a direct move)",
            m.ownerless.clone(),
        );
        r.register(
            "events",
            "Timeline events recorded (/events), by kind",
            m.events.clone(),
        );
        r.register(
            "events_evicted",
            "Timeline events evicted from the bounded ring to make room",
            m.evicted.clone(),
        );
        m
    }
}

/// Per-VIP state the metrics need between reports.
#[derive(Default)]
struct Seen {
    conflicts: BTreeMap<IpAddr, u64>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads `status` every [`OBSERVE_EVERY`] until `shutdown`, pushing changes into `log`.
pub async fn observe(
    status: admin::StatusProvider,
    log: EventLog,
    metrics: ObserveMetrics,
    shutdown: CancellationToken,
) {
    let start = Instant::now();
    let mut differ = Differ::new();
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(OBSERVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let report = status();
        let changes = differ.diff(&report, start.elapsed());
        if !changes.is_empty() {
            let at = wall_ms();
            let evicted = log.with(|ring| {
                let before = ring.evicted();
                for c in changes {
                    metrics
                        .events
                        .get_or_create(&KindLabel {
                            kind: c.kind.to_string(),
                        })
                        .inc();
                    if c.kind == "ownerMoved"
                        && let Some(d) = c.duration
                    {
                        metrics.ownerless.observe(d.as_secs_f64());
                    }
                    tracing::info!(kind = c.kind, subject = %c.subject, "{}", c.message);
                    ring.push(at, c);
                }
                ring.evicted() - before
            });
            metrics.evicted.inc_by(evicted);
        }
        update_metrics(&report, &metrics, &mut seen);
    }
}

fn update_metrics(report: &StatusReport, m: &ObserveMetrics, seen: &mut Seen) {
    m.ready.set(i64::from(report.ready));
    let mut vips = BTreeMap::new();
    for v in report.services.iter().flat_map(|s| &s.vips) {
        let here = v.owner.as_deref() == Some(report.node.as_str());
        *vips.entry(v.address).or_insert(false) |= here;
        let before = seen.conflicts.insert(v.address, v.conflicts).unwrap_or(0);
        if v.conflicts > before {
            m.conflicts
                .get_or_create(&VipLabel {
                    vip: v.address.to_string(),
                })
                .inc_by(v.conflicts - before);
        }
    }
    for (vip, here) in &vips {
        m.announced
            .get_or_create(&VipLabel {
                vip: vip.to_string(),
            })
            .set(i64::from(*here));
    }
    // VIPs no longer configured: drop their series
    let gone: Vec<IpAddr> = seen
        .conflicts
        .keys()
        .filter(|ip| !vips.contains_key(ip))
        .copied()
        .collect();
    for ip in gone {
        seen.conflicts.remove(&ip);
        let l = VipLabel {
            vip: ip.to_string(),
        };
        m.announced.remove(&l);
        m.conflicts.remove(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{ServiceStatus, VipStatus};
    use std::sync::{Arc, Mutex};

    fn report(owner: &str, conflicts: u64) -> StatusReport {
        StatusReport {
            node: "n1".into(),
            ready: true,
            services: vec![ServiceStatus {
                name: "web".into(),
                ports: vec![],
                vips: vec![VipStatus {
                    address: "192.0.2.1".parse().unwrap(),
                    owner: Some(owner.into()),
                    reason: "owner".into(),
                    conflicts,
                }],
                backends: vec![],
                panic_mode: false,
                path: Default::default(),
                path_reason: String::new(),
            }],
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_reach_the_log_and_the_metrics() {
        let mut registry = Registry::default();
        let metrics = ObserveMetrics::register(&mut registry);
        let current = Arc::new(Mutex::new(report("n2", 0)));
        let provider: admin::StatusProvider = {
            let c = current.clone();
            Arc::new(move || c.lock().unwrap().clone())
        };
        let log = EventLog::new(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(observe(provider, log.clone(), metrics, stop.clone()));
        tokio::time::sleep(OBSERVE_EVERY * 2).await;
        *current.lock().unwrap() = report("n1", 2);
        tokio::time::sleep(OBSERVE_EVERY * 2).await;
        let kinds: Vec<String> = log.since(0).into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["ownerMoved", "conflict"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for want in [
            "portico_node_ready 1",
            "portico_node_vip_announced{vip=\"192.0.2.1\"} 1",
            "portico_node_vip_conflicts_total{vip=\"192.0.2.1\"} 2",
            "portico_node_vip_ownerless_seconds_count 1",
            "portico_node_events_total{kind=\"ownerMoved\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        stop.cancel();
        task.await.unwrap();
    }
}
