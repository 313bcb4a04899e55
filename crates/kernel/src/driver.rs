//! The thin tokio driver: applies [`plan`](crate::plan) batches through nft on each desired
//! generation and health change, drains removed backends, reads counters, removes the table on
//! a graceful stop.
//!
//! Drains: a backend that leaves the kernel path (removed, weight 0, its service gone or moved
//! to the proxy) loses its map slots at once, so it gets no new flows; conntrack keeps its
//! established flows on it. When the service's `connection.drain_timeout` ends, its conntrack
//! entries (original destination = the VIP port, reply source = the backend) are deleted, which
//! cuts them: `sys::conntrack` dumps the conntrack table over `NETLINK_NETFILTER` and sends an
//! `IPCTNL_MSG_CT_DELETE` with the original tuple of each matching entry. The drain list is
//! bounded ([`MAX_DRAINS`]); beyond it a drain is cut at once and counted.
//!
//! Passive outlier detection: at start the driver subscribes to conntrack's events in its
//! network namespace (`sys::conntrack::events`); a feed task keeps those of portico's flows and
//! queues them (bounded, 4096 events); the driver hands them to the pure
//! [`Passive`] detector, plans ejected backends as down, and applies the changed slots in one
//! batch at once (an ejection or its end is one batch, like a health change). Without the
//! subscription (no `CAP_NET_ADMIN`, no `nf_conntrack_netlink`) the path runs without passive
//! detection and says so (`conntrackEventsUnavailable`, `portico_kernel_passive_detection 0`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use model::{BackendKey, Config, Desired, HealthView, Path};
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, watch};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::metrics::{BackendLabels, EngineLabels, KindLabels, Metrics, OutcomeLabels};
use crate::nft::{self, NftError};
use crate::passive::{BackendOutlier, Change, Passive, Report, Watched};
use crate::plan::{self, Batch, PlanError, Ruleset, Target};

/// Most backends draining at once.
pub const MAX_DRAINS: usize = 4096;

/// Errors of the kernel driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// nft failed or is missing.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The plan could not be built.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The kernel path's own thread or its runtime could not start, or ended without an answer.
    #[error("kernel path thread: {0}")]
    Thread(String),
    /// IPv4 forwarding is off: DNAT to a backend on another host would be dropped.
    #[error(
        "net.ipv4.ip_forward is {0} here (the kernel path forwards to backends on other hosts; \
         enable it with `sysctl -w net.ipv4.ip_forward=1`, and net.ipv6.conf.all.forwarding for IPv6)"
    )]
    Forwarding(String),
}

/// Tunables of the kernel path.
#[derive(Debug, Clone)]
pub struct Options {
    /// Slots of each Maglev map (prime); default [`plan::DEFAULT_TABLE_SIZE`].
    pub table_size: usize,
    /// How often the nft counters are read into the metrics.
    pub counter_interval: Duration,
    /// Most TCP flows awaiting an outcome in passive outlier detection.
    pub max_flows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            table_size: plan::DEFAULT_TABLE_SIZE,
            counter_interval: Duration::from_secs(5),
            max_flows: crate::passive::DEFAULT_MAX_FLOWS,
        }
    }
}

/// A backend whose established flows may finish until `deadline`.
#[derive(Debug, Clone)]
struct Drain {
    key: BackendKey,
    targets: Vec<Target>,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// What the kernel holds (`None`: unknown, the next apply replaces the table).
    applied: Option<Ruleset>,
    config: Option<Arc<Config>>,
    health: Arc<HealthView>,
    drains: Vec<Drain>,
    /// Last counter readings per backend, for deltas (a reload resets nft counters).
    counts: BTreeMap<BackendKey, (u64, u64)>,
    /// Without IPv6 forwarding: the last desired configuration and the same with its services
    /// that have IPv6 VIPs moved to the proxy (see [`for_node`]).
    v4_only: Option<(Arc<Config>, Arc<Config>)>,
    /// Backends passive outlier detection has ejected (planned as down).
    ejected: BTreeSet<BackendKey>,
}

/// Passive outlier state of each watched kernel-path backend, for `/status`.
pub type Outliers = BTreeMap<BackendKey, BackendOutlier>;

/// The kernel path: one owner of table `inet portico`.
#[derive(Clone)]
pub struct Kernel {
    opts: Options,
    metrics: Metrics,
    state: Arc<Mutex<State>>,
    /// True while the kernel holds what the last desired state and health ask for.
    synced: Arc<tokio::sync::watch::Sender<bool>>,
    /// Set by [`Self::probe`] when the node does not forward IPv6.
    ipv6_off: Arc<AtomicBool>,
    /// Passive outlier state per watched backend.
    outliers: Arc<watch::Sender<Arc<Outliers>>>,
}

/// What [`Kernel::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `replace`, `elements`, or `none` (nothing changed).
    pub kind: &'static str,
    /// How the batch went: `netlink` (elements straight to the kernel), `library`
    /// (libnftables), `command` (`nft -f -`), or `none`.
    pub engine: &'static str,
    /// Slots changed (elements batches).
    pub slots: usize,
    /// Time nft took (from the call to its answer received).
    pub took: Duration,
    /// Time from the change received to nft called (planning and diffing).
    pub planned: Duration,
    /// Where nft's time went (queued for the nft thread, libnftables, the answer's wake-up).
    pub timing: nft::Timing,
    /// Time from the change received to the batch applied.
    pub total: Duration,
}

/// `config` as this node runs it: without IPv6 forwarding, a service that
/// [`model::Service::path`] moves to the proxy (reason `ipv6ForwardingOff`) gets
/// `forwarding: proxy`, so that it gets no map and no drains here.
fn for_node(config: &Arc<Config>, ipv6_off: bool) -> Option<Arc<Config>> {
    let support = model::KernelSupport {
        available: true,
        ipv6: !ipv6_off,
    };
    let moved = |s: &model::Service| plan::on_kernel(s) && s.path(support).0 != Path::Kernel;
    if !config.services.iter().any(moved) {
        return None;
    }
    let mut c = Config::clone(config);
    for s in c.services.iter_mut().filter(|s| moved(s)) {
        s.forwarding = model::Forwarding::Proxy;
    }
    Some(Arc::new(c))
}

fn empty_config() -> Config {
    model::config::parse("", &model::config::Environment::default())
        .expect("the empty configuration is valid")
}

/// The kernel targets each backend serves in `config` (weight > 0, service on the kernel path).
fn served(config: &Config) -> BTreeMap<BackendKey, (Vec<Target>, Duration)> {
    let mut out = BTreeMap::new();
    for s in config.services.iter().filter(|s| plan::on_kernel(s)) {
        for b in s.backends.iter().filter(|b| b.weight > 0) {
            out.insert(
                BackendKey::new(&s.name, &b.name),
                (plan::targets(s, b), s.connection.drain_timeout),
            );
        }
    }
    out
}

impl Kernel {
    /// A kernel path registering its metrics under `portico_kernel` in the root `registry`.
    pub fn new(registry: &mut Registry, opts: Options) -> Self {
        let metrics = Metrics::register(registry);
        metrics
            .engine
            .get_or_create(&EngineLabels {
                engine: nft::engine().0.as_str().to_string(),
            })
            .set(1);
        Self {
            opts,
            metrics,
            state: Arc::new(Mutex::new(State::default())),
            synced: Arc::new(tokio::sync::watch::Sender::new(false)),
            ipv6_off: Arc::new(AtomicBool::new(false)),
            outliers: Arc::new(watch::Sender::new(Arc::default())),
        }
    }

    /// The passive outlier state of each kernel-path backend with outlier detection on
    /// (ejected, breaker, failed flows), updated with every outcome: `/status` shows it with
    /// the same fields as the proxy's ejections.
    pub fn outliers(&self) -> watch::Receiver<Arc<Outliers>> {
        self.outliers.subscribe()
    }

    /// True once [`Self::run`] applied the current desired state and health, false while a
    /// batch is refused (it retries): the binary's `/readyz` waits for it, so a node does not
    /// say it is ready before its kernel path forwards.
    pub fn synced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Whether this node can run the kernel path: it can program nftables (root, libnftables
    /// or `nft`, nf_tables: the kernel checks a table replacement without applying it, so
    /// nothing changes) and forwards IPv4 (`net.ipv4.ip_forward`; DNAT to a backend on another
    /// host is forwarding, and with it off the kernel drops every such packet). The binary
    /// logs a refusal with the reason `kernelUnavailable` and proxies every service. IPv6
    /// forwarding off (`net.ipv6.conf.all.forwarding` 0) does not fail the probe: the answer
    /// says so, services with IPv6 VIPs then run on the proxy (reason `ipv6ForwardingOff`,
    /// [`model::Service::path`]) and this kernel path leaves them out of its table.
    pub async fn probe(&self) -> Result<model::KernelSupport, Error> {
        let (engine, why) = nft::engine();
        tracing::info!(
            engine = engine.as_str(),
            "kernel path: nft commands run through the {}: {why}",
            match engine {
                nft::Engine::Library => "library",
                nft::Engine::Command => "nft binary (nft -f - per batch)",
            }
        );
        let rs = plan::plan(&empty_config(), &HealthView::new(), self.opts.table_size)?;
        let mut text = format!(
            "add table inet {t}\ndelete table inet {t}\n",
            t = plan::TABLE
        );
        text.push_str(&rs.structure);
        nft::check(&text).await?;
        let v4 = sys::sysctl_read("net/ipv4/ip_forward").unwrap_or_else(|e| e.to_string());
        if v4 != "1" {
            return Err(Error::Forwarding(v4));
        }
        // without IPv6 at all (no such sysctl) no service has an IPv6 VIP that works
        let ipv6 = sys::sysctl_read("net/ipv6/conf/all/forwarding").is_ok_and(|v| v == "1");
        if !ipv6 {
            tracing::warn!(
                reason = "ipv6ForwardingOff",
                "kernel path: net.ipv6.conf.all.forwarding is not 1 here: services with IPv6 \
                 VIPs use the proxy; for the kernel path enable it with \
                 `sysctl -w net.ipv6.conf.all.forwarding=1` and restart"
            );
        }
        self.ipv6_off.store(!ipv6, Ordering::Relaxed);
        Ok(model::KernelSupport {
            available: true,
            ipv6,
        })
    }

    /// Creates the table without services, replacing whatever a crashed run left (the first
    /// [`Self::apply`] does the same; a config without kernel services removes it).
    pub async fn start(&self) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        st.applied = None;
        let rs = plan::plan(&empty_config(), &HealthView::new(), self.opts.table_size)?;
        let text = plan::diff(None, &plan::Ruleset::default()).map(|b| b.text().to_string());
        let mut text = text.unwrap_or_default();
        text.push_str(&rs.structure);
        nft::apply(&text).await?;
        Ok(())
    }

    /// Plans `config` under `health` and applies the difference to what the kernel holds; also
    /// starts drains for backends that left the kernel path and ends drains of those back.
    pub async fn apply(
        &self,
        config: Arc<Config>,
        health: Arc<HealthView>,
    ) -> Result<Applied, Error> {
        let received = Instant::now();
        let mut st = self.state.lock().await;
        let config = if self.ipv6_off.load(Ordering::Relaxed) {
            match &st.v4_only {
                Some((orig, c)) if Arc::ptr_eq(orig, &config) => c.clone(),
                _ => {
                    let c = for_node(&config, true).unwrap_or_else(|| config.clone());
                    st.v4_only = Some((config, c.clone()));
                    c
                }
            }
        } else {
            config
        };
        let now = Instant::now();
        let new_served = served(&config);
        if let Some(old) = st.config.as_ref().filter(|o| !Arc::ptr_eq(o, &config)) {
            for (key, (targets, timeout)) in served(old) {
                let still = new_served.get(&key).is_some_and(|(t, _)| *t == targets);
                if !still && !st.drains.iter().any(|d| d.key == key) {
                    tracing::info!(service = %key.service, backend = %key.backend, ?timeout, reason = "backendRemoved", "kernel path: backend draining");
                    st.drains.push(Drain {
                        key,
                        targets,
                        deadline: now + timeout,
                    });
                }
            }
        }
        // a backend serving again is no longer draining
        st.drains
            .retain(|d| new_served.get(&d.key).is_none_or(|(t, _)| *t != d.targets));
        while st.drains.len() > MAX_DRAINS {
            let d = st.drains.remove(0);
            self.metrics.drains_refused.inc();
            self.cut(&d).await;
        }
        self.metrics.draining.set(st.drains.len() as i64);
        st.config = Some(config.clone());
        st.health = health.clone();
        // an ejected backend is planned as down (panic mode counts it out, as the proxy does)
        let planned = if st.ejected.is_empty() {
            health
        } else {
            let mut h = (*health).clone();
            for k in &st.ejected {
                h.insert(k.clone(), model::Health::Down);
            }
            Arc::new(h)
        };
        let rs = plan::plan(&config, &planned, self.opts.table_size)?;
        self.send(&mut st, rs, received).await
    }

    async fn send(&self, st: &mut State, rs: Ruleset, received: Instant) -> Result<Applied, Error> {
        let Some(batch) = plan::diff(st.applied.as_ref(), &rs) else {
            return Ok(Applied {
                kind: "none",
                engine: "none",
                slots: 0,
                took: Duration::ZERO,
                planned: received.elapsed(),
                timing: nft::Timing::default(),
                total: received.elapsed(),
            });
        };
        let started = Instant::now();
        let planned = started - received;
        let (engine, result) = match &batch {
            Batch::Elements { changes, .. } if nft::elements_by_netlink() => {
                ("netlink", nft::apply_elements(changes))
            }
            _ => (
                nft::engine().0.as_str(),
                nft::apply_timed(batch.text()).await,
            ),
        };
        let took = started.elapsed();
        let total = received.elapsed();
        self.metrics.batch_seconds.observe(took.as_secs_f64());
        self.metrics
            .update_seconds
            .observe(received.elapsed().as_secs_f64());
        let timing = match result {
            Ok(t) => t,
            Err(e) => {
                self.metrics.batch_errors.inc();
                st.applied = None;
                return Err(e.into());
            }
        };
        self.metrics
            .batches
            .get_or_create(&KindLabels {
                kind: batch.kind().to_string(),
            })
            .inc();
        let slots = match &batch {
            Batch::Elements { slots, .. } => *slots,
            Batch::Replace(_) => rs.maps.values().map(Vec::len).sum(),
        };
        st.applied = Some(rs);
        Ok(Applied {
            kind: batch.kind(),
            engine,
            slots,
            took,
            planned,
            timing,
            total,
        })
    }

    /// Deletes the conntrack entries of a drain whose time ran out.
    async fn cut(&self, d: &Drain) {
        for t in &d.targets {
            match conntrack_delete(t).await {
                Ok(n) => {
                    self.metrics.conntrack_deleted.inc_by(n);
                }
                Err(e) => {
                    tracing::warn!(service = %d.key.service, backend = %d.key.backend, error = %e, reason = "conntrackFailed", "kernel path: cannot cut drained flows")
                }
            }
        }
        tracing::info!(service = %d.key.service, backend = %d.key.backend, reason = "drainTimeout", "kernel path: drain ended, flows cut");
    }

    /// Ends the drains whose deadline passed; returns the next deadline.
    pub async fn expire_drains(&self) -> Option<Instant> {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let (due, keep): (Vec<Drain>, Vec<Drain>) =
            st.drains.drain(..).partition(|d| d.deadline <= now);
        st.drains = keep;
        self.metrics.draining.set(st.drains.len() as i64);
        let next = st.drains.iter().map(|d| d.deadline).min();
        drop(st);
        for d in &due {
            self.cut(d).await;
        }
        next
    }

    /// Backends draining now.
    pub async fn draining(&self) -> BTreeSet<BackendKey> {
        self.state
            .lock()
            .await
            .drains
            .iter()
            .map(|d| d.key.clone())
            .collect()
    }

    /// Reads the nft counters into the per-backend metrics. The state is not locked while nft
    /// lists them (a libnftables call that takes milliseconds, more on a busy node), so a
    /// health change is not held behind it.
    pub async fn read_counters(&self) -> Result<(), Error> {
        let names = {
            let st = self.state.lock().await;
            match st.applied.as_ref().filter(|a| !a.counters.is_empty()) {
                Some(applied) => applied.counters.clone(),
                None => return Ok(()),
            }
        };
        let values = nft::counters().await?;
        let mut st = self.state.lock().await;
        for (name, key) in names {
            let Some(&(p, b)) = values.get(&name) else {
                continue;
            };
            let (lp, lb) = st.counts.get(&key).copied().unwrap_or((0, 0));
            // a replaced table starts its counters at zero again
            let (dp, db) = if p < lp || b < lb {
                (p, b)
            } else {
                (p - lp, b - lb)
            };
            let labels = BackendLabels {
                service: key.service.clone(),
                backend: key.backend.clone(),
            };
            self.metrics.packets.get_or_create(&labels).inc_by(dp);
            self.metrics.bytes.get_or_create(&labels).inc_by(db);
            st.counts.insert(key, (p, b));
        }
        Ok(())
    }

    /// Removes the table (graceful stop).
    pub async fn stop(&self) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        st.applied = None;
        match nft::apply(&plan::remove()).await {
            Err(NftError::Failed(e)) if e.contains("No such file or directory") => Ok(()),
            r => Ok(r?),
        }
    }

    /// Runs until `shutdown`: applies each desired generation and health change, ends drains,
    /// reads counters; on shutdown removes the table. The table must have been created with
    /// [`Self::start`].
    ///
    /// The loop runs on a thread of its own (a single-threaded runtime, in the caller's
    /// network namespace) at the nft thread's raised priority (nice -10 when allowed): on a
    /// busy node a health change otherwise waited for the CPU behind other work at every step
    /// on the shared runtime, before the batch (planning) and after it (the answer's wake-up).
    /// Measured in `crates/portico/tests/kernel_path.rs` at load 6-8 on 2 cores: the wake-up
    /// after libnftables answered alone took up to 72 ms on the shared runtime.
    pub async fn run(
        &self,
        desired: watch::Receiver<Arc<Desired>>,
        health: watch::Receiver<Arc<HealthView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        std::thread::Builder::new()
            .name("portico-kernel".to_string())
            .spawn(move || {
                if let Err(e) = sys::set_thread_nice(nft::NICE) {
                    tracing::info!(error = %e, "kernel path: its thread keeps the default priority");
                }
                let r = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(me.run_here(desired, health, shutdown)),
                    Err(e) => Err(Error::Thread(format!("cannot build its runtime: {e}"))),
                };
                let _ = tx.send(r);
            })
            .map_err(|e| Error::Thread(format!("cannot start it: {e}")))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Thread("it ended without an answer".to_string())))
    }

    /// [`Self::run`]'s loop, on the calling thread.
    async fn run_here(
        &self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut health: watch::Receiver<Arc<HealthView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let mut config = desired.borrow_and_update().config.clone();
        let mut view = health.borrow_and_update().clone();
        let mut passive = Passive::new(self.opts.max_flows);
        passive.configure(&config);
        let (watched_tx, _) = watch::channel(Arc::new(passive.watched()));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // the event socket is open only while a service asks for it (`outlier.conntrack_events`):
        // reading every tracked flow's events costs CPU on every connection of the node
        let (mut events, mut feed) = (tokio::sync::mpsc::channel(1).1, None);
        self.metrics.passive.set(0);
        if !passive.watched().is_empty() {
            (events, feed) = self.start_feed(watched_tx.subscribe(), lost.clone(), &shutdown);
        }
        let mut events_open = feed.is_some();
        let mut failed = self.report(self.apply(config.clone(), view.clone()).await);
        let mut counters = tokio::time::interval(self.opts.counter_interval);
        counters.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let mut next_drain: Option<Instant> = None;
        let (mut desired_open, mut health_open) = (true, true);
        let mut reading: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let drain_at = next_drain.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let passive_at = passive.next_deadline();
            tokio::select! {
                () = shutdown.cancelled() => break,
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => {
                        forget_if_lost(&lost, &mut passive);
                        let now = Instant::now();
                        let mut report = passive.on_event(now, &ev);
                        // take what is queued too: one batch for all of it
                        while let Ok(ev) = events.try_recv() {
                            report.merge(passive.on_event(now, &ev));
                        }
                        if self.passive_report(&passive, report).await {
                            failed = self.report(self.apply(config.clone(), view.clone()).await);
                        }
                    }
                    None => events_open = false,
                },
                () = tokio::time::sleep_until(passive_at.unwrap_or(drain_at)), if passive_at.is_some() => {
                    forget_if_lost(&lost, &mut passive);
                    let report = passive.on_tick(Instant::now());
                    if self.passive_report(&passive, report).await {
                        failed = self.report(self.apply(config.clone(), view.clone()).await);
                    }
                }
                r = desired.changed(), if desired_open => match r {
                    Ok(()) => {
                        config = desired.borrow_and_update().config.clone();
                        passive.configure(&config);
                        let watched = passive.watched();
                        let want = !watched.is_empty();
                        watched_tx.send_replace(Arc::new(watched));
                        if want && feed.is_none() {
                            (events, feed) =
                                self.start_feed(watched_tx.subscribe(), lost.clone(), &shutdown);
                            events_open = feed.is_some();
                        } else if !want && let Some(f) = feed.take() {
                            f.abort();
                            events_open = false;
                            self.metrics.passive.set(0);
                        }
                        self.state.lock().await.ejected = passive.ejected();
                        self.publish_outliers(&passive);
                        failed = self.report(self.apply(config.clone(), view.clone()).await);
                        next_drain = self.state.lock().await.drains.iter().map(|d| d.deadline).min();
                    }
                    Err(_) => desired_open = false,
                },
                r = health.changed(), if health_open => match r {
                    Ok(()) => {
                        view = health.borrow_and_update().clone();
                        failed = self.report(self.apply(config.clone(), view.clone()).await);
                    }
                    Err(_) => health_open = false,
                },
                () = tokio::time::sleep_until(drain_at), if next_drain.is_some() => {
                    next_drain = self.expire_drains().await;
                }
                _ = retry.tick(), if failed => {
                    failed = self.report(self.apply(config.clone(), view.clone()).await);
                }
                _ = counters.tick() => {
                    // a task of its own on this thread: the loop takes health changes meanwhile
                    // (a change waited behind the listing before)
                    if reading.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                        let me = self.clone();
                        reading = Some(tokio::spawn(async move {
                            let started = Instant::now();
                            if let Err(e) = me.read_counters().await {
                                tracing::warn!(error = %e, reason = "countersFailed", "kernel path: cannot read counters");
                            }
                            tracing::debug!(took_us = started.elapsed().as_micros() as u64, "kernel path counters read");
                        }));
                    }
                }
            }
        }
        if let Some(f) = feed {
            f.abort();
        }
        if let Some(r) = reading {
            r.abort();
        }
        self.stop().await
    }

    /// Subscribes to conntrack events in the calling thread's network namespace and starts the
    /// feed task; without the subscription passive detection is off (logged, metric 0).
    fn start_feed(
        &self,
        watched: watch::Receiver<Arc<Watched>>,
        lost: Arc<std::sync::atomic::AtomicBool>,
        shutdown: &CancellationToken,
    ) -> (
        tokio::sync::mpsc::Receiver<sys::conntrack::events::Event>,
        Option<tokio::task::JoinHandle<()>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::feed::QUEUE);
        match sys::conntrack::events::EventSocket::subscribe(crate::feed::RCVBUF) {
            Ok(sock) => {
                self.metrics.passive.set(1);
                let task = tokio::spawn(crate::feed::run(
                    sock,
                    watched,
                    tx,
                    lost,
                    self.metrics.clone(),
                    shutdown.child_token(),
                ));
                (rx, Some(task))
            }
            Err(e) => {
                self.metrics.passive.set(0);
                tracing::warn!(error = %e, reason = "conntrackEventsUnavailable", "kernel path: no conntrack events; outlier ejection is off on the kernel path");
                (rx, None)
            }
        }
    }

    /// Counts and logs what passive detection saw and decided, publishes the outlier state;
    /// true when the ejected set changed (the maps must be replanned).
    async fn passive_report(&self, passive: &Passive, report: Report) -> bool {
        if report.untracked > 0 {
            self.metrics.dropped("flowTableFull", report.untracked);
        }
        for (key, outcome) in &report.outcomes {
            self.metrics
                .flow_outcomes
                .get_or_create(&OutcomeLabels {
                    service: key.service.clone(),
                    backend: key.backend.clone(),
                    outcome: outcome.as_str().to_string(),
                })
                .inc();
        }
        let now = Instant::now();
        for c in &report.changes {
            match c {
                Change::Ejected(key, until) => {
                    self.metrics
                        .ejections
                        .get_or_create(&BackendLabels {
                            service: key.service.clone(),
                            backend: key.backend.clone(),
                        })
                        .inc();
                    tracing::warn!(service = %key.service, backend = %key.backend, ejected_for = ?until.saturating_duration_since(now), reason = "outlierEjected", "backend ejected");
                }
                Change::Limited(key) => {
                    tracing::debug!(service = %key.service, backend = %key.backend, reason = "ejectionLimited", "backend not ejected: max_ejection_percent reached");
                }
                Change::Readmitted(key) => {
                    tracing::info!(service = %key.service, backend = %key.backend, reason = "ejectionEnded", "backend re-admitted (half-open)");
                }
            }
        }
        // /status changes with a failure, an ejection change, or a breaker closing
        let published = self.outliers.borrow().clone();
        if !report.changes.is_empty()
            || report.outcomes.iter().any(|(k, o)| {
                *o != crate::passive::Outcome::Connected
                    || published
                        .get(k)
                        .is_none_or(|b| b.breaker != model::BreakerState::Closed)
            })
        {
            self.publish_outliers(passive);
        }
        if !report.ejections_changed() {
            return false;
        }
        self.state.lock().await.ejected = passive.ejected();
        true
    }

    fn publish_outliers(&self, passive: &Passive) {
        self.outliers
            .send_replace(Arc::new(passive.status(Instant::now())));
    }

    /// Logs a failed apply and publishes [`Self::synced`]; true when it failed.
    fn report(&self, r: Result<Applied, Error>) -> bool {
        self.synced.send_replace(r.is_ok());
        match r {
            Ok(a) => {
                if a.kind != "none" {
                    tracing::info!(
                        kind = a.kind,
                        slots = a.slots,
                        engine = a.engine,
                        plan_us = a.planned.as_micros() as u64,
                        queue_us = a.timing.queued.as_micros() as u64,
                        nft_us = a.timing.ran.as_micros() as u64,
                        resume_us = a.timing.resumed.as_micros() as u64,
                        total_us = a.total.as_micros() as u64,
                        "kernel path applied"
                    );
                }
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = "nftFailed", "kernel path: batch refused; retrying with a full replace");
                true
            }
        }
    }
}

/// After lost events, forgets the flows awaiting an outcome (their answer may have been lost).
fn forget_if_lost(lost: &std::sync::atomic::AtomicBool, passive: &mut Passive) {
    if lost.swap(false, std::sync::atomic::Ordering::AcqRel) {
        let n = passive.forget_pending();
        tracing::debug!(
            flows = n,
            reason = "eventsLost",
            "kernel path: conntrack events lost; flows awaiting an outcome forgotten"
        );
    }
}

/// Deletes the conntrack entries of flows DNATed from `t.vip` to `t.backend`; returns how many.
/// Runs on the calling thread (its network namespace is the node's; a blocking-pool thread
/// might not be in it): a dump and one request per entry, each read bounded by 2 s, and only
/// when a drain ends.
async fn conntrack_delete(t: &Target) -> Result<u64, sys::conntrack::ConntrackError> {
    let proto = match t.protocol {
        model::Protocol::Tcp => 6,
        model::Protocol::Udp => 17,
    };
    sys::conntrack::delete_flows(proto, t.vip, t.backend)
}
