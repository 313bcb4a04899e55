//! The IPAM controller's kube driver: watches, executes [`reconcile::Action`]s, follows leadership.
//!
//! All decisions live in [`reconcile::State`]; this file only turns watch events into calls on
//! it and its actions into API calls. A 409 Conflict on a guarded write re-reads the Service
//! and decides again; a watch that fails (410 Gone included) re-lists with back-off, and the
//! re-list replaces the cache wholesale. A replica that stops leading drops its state; the next
//! leader re-derives everything from the Services, so nothing moves.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use futures::{FutureExt as _, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::allocator::ServiceKey;
use crate::crd::IPPool;
use crate::intent::Scope;
use crate::metrics::ControllerMetrics;
use crate::outage::{Outage, logged};

use crate::reconcile::{self, Action, State};
use crate::selector::Labels;
use tokio::sync::watch;

/// The field manager and event reporter name.
pub const MANAGER: &str = "portico-controller";

/// Events published at once, at most: Events are not on an allocation's critical path (the
/// status write is), so they go out concurrently; when this many are in flight the next waits.
pub const EVENTS_IN_FLIGHT: usize = 32;

/// Pool status writes wait this long and are merged: a burst of allocations writes each pool's
/// status once, not once per allocation (it was one of three serial writes per allocation).
pub const POOL_STATUS_DELAY: Duration = Duration::from_millis(500);

/// Service writes in flight at once (for distinct Services): a burst of creates is allocated
/// in waves instead of one write after another.
pub const WRITES_IN_FLIGHT: usize = 16;

/// Inputs read at once from the watches when they are ready (a burst), decided together.
pub const BATCH: usize = 256;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write the API server refused for a reason other than a conflict.
    #[error("{what}: {}", crate::outage::describe(.source))]
    Write {
        /// What was written.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// One decoded input of the driver.
// Short-lived values moved once through a channel or a match: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A Service watch event.
    Service(Event<Service>),
    /// An IPPool watch event.
    Pool(Event<IPPool>),
    /// A Namespace watch event.
    Namespace(Event<Namespace>),
    /// Time to retry writes that failed.
    Tick,
}

/// Buffers `Init`…`InitDone` of each watch so a (re-)list replaces the cache in one go.
#[derive(Default)]
struct Buffers {
    services: Option<Vec<Service>>,
    pools: Option<Vec<IPPool>>,
    namespaces: Option<BTreeMap<String, Labels>>,
}

/// Executes the state's decisions against the API server.
pub struct Driver {
    client: Client,
    recorder: Recorder,
    state: State,
    buffers: Buffers,
    /// Services whose write failed for another reason than a conflict; retried on [`Input::Tick`].
    failed: BTreeSet<ServiceKey>,
    /// Failed writes since the last successful one, so an outage is logged once.
    outage: Outage,
    /// Pool status patches waiting for [`Driver::flush_pools`], by pool (the newest wins).
    pending_pools: BTreeMap<String, serde_json::Value>,
    /// When the oldest pending pool status is due.
    pools_due: Option<tokio::time::Instant>,
    /// A pool status write failed: decide the reports again on the next tick.
    pools_failed: bool,
    metrics: ControllerMetrics,
    /// Events being published (at most [`EVENTS_IN_FLIGHT`]).
    events: tokio::task::JoinSet<Result<(), Box<Error>>>,
}

impl Driver {
    /// A driver with empty caches.
    pub fn new(client: Client, scope: Scope, instance: Option<String>) -> Self {
        Self::with_metrics(client, scope, instance, ControllerMetrics::default())
    }

    /// A driver with empty caches that counts into `metrics`.
    pub fn with_metrics(
        client: Client,
        scope: Scope,
        instance: Option<String>,
        metrics: ControllerMetrics,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance,
            },
        );
        Self {
            client,
            recorder,
            state: State::new(scope),
            buffers: Buffers::default(),
            failed: BTreeSet::new(),
            outage: Outage::default(),
            pending_pools: BTreeMap::new(),
            pools_due: None,
            pools_failed: false,
            metrics,
            events: tokio::task::JoinSet::new(),
        }
    }

    /// The pure state (for tests).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Feeds one input and performs the resulting writes.
    pub async fn handle(&mut self, input: Input) {
        let actions = self.decide(input);
        self.execute(actions).await;
    }

    /// Feeds several inputs (a burst read from the watches at once) and performs all their
    /// writes together, [`WRITES_IN_FLIGHT`] Services at a time.
    pub async fn handle_batch(&mut self, inputs: Vec<Input>) {
        let mut actions = Vec::new();
        for input in inputs {
            actions.extend(self.decide(input));
        }
        self.execute(actions).await;
    }

    /// Feeds one input to the state and returns the writes it decided.
    fn decide(&mut self, input: Input) -> Vec<Action> {
        let now = Timestamp::now();
        match input {
            Input::Service(ev) => match ev {
                Event::Init => {
                    self.buffers.services = Some(Vec::new());
                    Vec::new()
                }
                Event::InitApply(s) => {
                    self.buffers.services.get_or_insert_with(Vec::new).push(s);
                    Vec::new()
                }
                Event::InitDone => {
                    let all = self.buffers.services.take().unwrap_or_default();
                    self.state.services_listed(all, now)
                }
                Event::Apply(s) => self.state.service_applied(s, now),
                Event::Delete(s) => self.state.service_deleted(&s, now),
            },
            Input::Pool(ev) => match ev {
                Event::Init => {
                    self.buffers.pools = Some(Vec::new());
                    Vec::new()
                }
                Event::InitApply(p) => {
                    self.buffers.pools.get_or_insert_with(Vec::new).push(p);
                    Vec::new()
                }
                Event::InitDone => {
                    let all = self.buffers.pools.take().unwrap_or_default();
                    self.state.pools_listed(all, now)
                }
                Event::Apply(p) => self.state.pool_applied(p, now),
                Event::Delete(p) => self.state.pool_deleted(&p, now),
            },
            Input::Namespace(ev) => match ev {
                Event::Init => {
                    self.buffers.namespaces = Some(BTreeMap::new());
                    Vec::new()
                }
                Event::InitApply(n) => {
                    let labels = n.labels().clone();
                    self.buffers
                        .namespaces
                        .get_or_insert_with(BTreeMap::new)
                        .insert(n.name_any(), labels);
                    Vec::new()
                }
                Event::InitDone => {
                    let all = self.buffers.namespaces.take().unwrap_or_default();
                    self.state.namespaces_listed(all, now)
                }
                Event::Apply(n) => {
                    let labels = n.labels().clone();
                    self.state.namespace_applied(n.name_any(), labels, now)
                }
                // Services of a deleted namespace are deleted too and release their addresses.
                Event::Delete(_) => Vec::new(),
            },
            Input::Tick => {
                let keys = std::mem::take(&mut self.failed);
                let mut out = Vec::new();
                if std::mem::take(&mut self.pools_failed) {
                    out.extend(self.state.pool_reports(now));
                }
                for k in keys {
                    if let Some(s) = self.state.service(&k).cloned() {
                        out.extend(self.state.service_applied(s, now));
                    }
                }
                out
            }
        }
    }

    /// Performs writes; a conflict re-reads the Service and decides again.
    ///
    /// Writes go out in waves of up to [`WRITES_IN_FLIGHT`] distinct Services at once; the
    /// actions of one Service keep their order (one that must wait holds back the later ones of
    /// the same Service, its Events included). Results are handled in order.
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        let mut conflicts = 0;
        while !queue.is_empty() {
            let mut wave: Vec<(ServiceKey, Action)> = Vec::new();
            let mut busy: BTreeSet<ServiceKey> = BTreeSet::new();
            let mut later: VecDeque<Action> = VecDeque::new();
            while let Some(action) = queue.pop_front() {
                let key = action_key(&action);
                let blocked = key.as_ref().is_some_and(|k| busy.contains(k));
                match action {
                    Action::PatchPoolStatus { name, patch } => {
                        self.metrics.pool_reported(&name, &patch);
                        self.state.assume_pool_status(&name, &patch);
                        self.pending_pools.insert(name, patch);
                        self.pools_due
                            .get_or_insert_with(|| tokio::time::Instant::now() + POOL_STATUS_DELAY);
                    }
                    a @ Action::Event { .. } if !blocked => {
                        log_decision(&a);
                        if let Action::Event { reason, .. } = &a {
                            self.metrics.decided(reason);
                        }
                        self.publish(a).await;
                    }
                    a if !blocked && wave.len() < WRITES_IN_FLIGHT => {
                        log_decision(&a);
                        let k = key.expect("Service writes have a key");
                        busy.insert(k.clone());
                        wave.push((k, a));
                    }
                    a => {
                        busy.extend(key);
                        later.push_back(a);
                    }
                }
            }
            queue = later;
            let client = self.client.clone();
            let results =
                futures::future::join_all(wave.iter().map(|(_, a)| send(&client, a))).await;
            for ((key, action), r) in wave.into_iter().zip(results) {
                let what = match action {
                    Action::PatchService { .. } => "spec.externalIPs",
                    _ => "status",
                };
                match self.after_service_write(&key, what, r) {
                    Ok(()) => {
                        if let Some(failures) = self.outage.recovered() {
                            tracing::info!(failures, "writes succeed again");
                        }
                    }
                    Err(WriteError::Conflict(key)) if conflicts < 5 => {
                        conflicts += 1;
                        let api: Api<Service> =
                            Api::namespaced(self.client.clone(), &key.namespace);
                        match api.get_opt(&key.name).await {
                            Ok(Some(fresh)) => {
                                // Writes queued for the stale object are decided again from the fresh one.
                                queue.retain(|a| action_key(a).as_ref() != Some(&key));
                                let again = self.state.conflict(fresh, Timestamp::now());
                                // Newer pool reports replace queued ones; the retry goes first.
                                queue.retain(|a| !again.iter().any(|b| same_pool(a, b)));
                                for a in again.into_iter().rev() {
                                    queue.push_front(a);
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(service = %key, error = %crate::outage::describe(&e), "cannot re-read Service after a conflict");
                                self.failed.insert(key);
                            }
                        }
                    }
                    Err(WriteError::Conflict(key)) => {
                        self.failed.insert(key);
                    }
                    Err(WriteError::Other(key, e)) => {
                        self.metrics.write_failures.inc();
                        if self.outage.failed() {
                            tracing::warn!(error = %e, "write failed; retrying every 10 s (further failures are logged at debug until a write succeeds)");
                        } else {
                            tracing::debug!(error = %e, "write failed; retrying later");
                        }
                        if let Some(k) = key {
                            self.failed.insert(k);
                        }
                    }
                }
            }
        }
    }

    /// Publishes an Event without waiting for it (bounded by [`EVENTS_IN_FLIGHT`]).
    async fn publish(&mut self, action: Action) {
        let Action::Event {
            reference,
            warning,
            reason,
            note,
        } = action
        else {
            return;
        };
        while self.events.len() >= EVENTS_IN_FLIGHT {
            if let Some(r) = self.events.join_next().await {
                self.published(r);
            }
        }
        let recorder = self.recorder.clone();
        self.events.spawn(async move {
            let ev = KubeEvent {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: reason.into(),
                note: Some(note),
                action: "Allocate".into(),
                secondary: None,
            };
            recorder.publish(&ev, &reference).await.map_err(|source| {
                Box::new(Error::Write {
                    what: format!("event {reason}"),
                    source,
                })
            })
        });
    }

    /// Accounts for one finished Event.
    fn published(&mut self, r: Result<Result<(), Box<Error>>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(())) => {
                if let Some(failures) = self.outage.recovered() {
                    tracing::info!(failures, "writes succeed again");
                }
            }
            Ok(Err(e)) => {
                self.metrics.write_failures.inc();
                if self.outage.failed() {
                    tracing::warn!(error = %e, "write failed; retrying every 10 s (further failures are logged at debug until a write succeeds)");
                } else {
                    tracing::debug!(error = %e, "event not published");
                }
            }
            Err(e) => tracing::debug!(error = %e, "event task ended"),
        }
    }

    /// Waits for every Event in flight.
    pub async fn settle_events(&mut self) {
        while let Some(r) = self.events.join_next().await {
            self.published(r);
        }
    }

    /// When the pending pool status writes are due, if any.
    pub fn pools_due(&self) -> Option<tokio::time::Instant> {
        self.pools_due
    }

    /// Writes the pending pool statuses (one patch per pool, however many allocations changed it).
    pub async fn flush_pools(&mut self) {
        // Events of the decisions first, so a pool's report never overtakes them.
        self.settle_events().await;
        self.pools_due = None;
        for (name, patch) in std::mem::take(&mut self.pending_pools) {
            match self.write_pool_status(&name, &patch).await {
                Ok(()) => {
                    self.metrics.pool_status_writes.inc();
                    if let Some(failures) = self.outage.recovered() {
                        tracing::info!(failures, "writes succeed again");
                    }
                }
                Err(e) => {
                    self.metrics.write_failures.inc();
                    if self.outage.failed() {
                        tracing::warn!(error = %e, "write failed; retrying every 10 s (further failures are logged at debug until a write succeeds)");
                    } else {
                        tracing::debug!(error = %e, "write failed; retrying later");
                    }
                    self.state.forget_pool_status(&name);
                    self.pools_failed = true;
                }
            }
        }
    }

    /// Writes one pool's status (Service writes go out in waves through [`send`]).
    async fn write_pool_status(
        &mut self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), Box<Error>> {
        let api: Api<IPPool> = Api::all(self.client.clone());
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(fresh) => {
                self.state.observe_pool(fresh);
                Ok(())
            }
            // Deleted meanwhile: its deletion event follows, nothing to report on.
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                tracing::debug!(pool = %name, "pool deleted before its status was written");
                Ok(())
            }
            Err(e) => Err(Box::new(Error::Write {
                what: format!("IPPool {name} status"),
                source: e,
            })),
        }
    }

    fn after_service_write(
        &mut self,
        key: &ServiceKey,
        what: &str,
        r: Result<Service, kube::Error>,
    ) -> Result<(), WriteError> {
        match r {
            // Keep the cache current so the next guarded write carries the new version.
            Ok(fresh) => {
                self.state.observe(fresh);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Err(WriteError::Conflict(key.clone())),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(write_error(
                Some(key.clone()),
                format!("Service {key} {what}"),
                e,
            )),
        }
    }
}

/// One INFO line per decision that leaves an Event (allocation, refusal, notice, pool
/// problem), with its reason word: Events expire after an hour, the log stays.
fn log_decision(action: &Action) {
    if let Some((object, reason, line)) = decision_line(action) {
        tracing::info!(object = %object, reason, "{line}");
    }
}

/// The object (`Service default/web`), reason word and text of the log line for an action that
/// records a decision, `None` for plain writes.
fn decision_line(action: &Action) -> Option<(String, &'static str, String)> {
    let Action::Event {
        reference,
        warning,
        reason,
        note,
    } = action
    else {
        return None;
    };
    let name = match (&reference.namespace, &reference.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (_, n) => n.clone().unwrap_or_default(),
    };
    let object = format!("{} {name}", reference.kind.as_deref().unwrap_or("object"));
    let verdict = if *warning {
        "refused or warned"
    } else {
        "done"
    };
    Some((
        object.clone(),
        reason,
        format!("{object}: {reason} ({verdict}): {note}"),
    ))
}

/// Sends one Service write (`PatchServiceStatus` or `PatchService`); other actions are not
/// Service writes and are refused without a request.
async fn send(client: &Client, action: &Action) -> Result<Service, kube::Error> {
    let pp = PatchParams::default();
    match action {
        Action::PatchServiceStatus { key, patch } => {
            let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
            api.patch_status(&key.name, &pp, &Patch::Strategic(patch))
                .await
        }
        Action::PatchService { key, patch } => {
            let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
            api.patch(&key.name, &pp, &Patch::Merge(patch)).await
        }
        Action::Event { .. } | Action::PatchPoolStatus { .. } => {
            Err(kube::Error::Service("not a Service write".into()))
        }
    }
}

fn write_error(key: Option<ServiceKey>, what: String, source: kube::Error) -> WriteError {
    WriteError::Other(key, Box::new(Error::Write { what, source }))
}

fn same_pool(a: &Action, b: &Action) -> bool {
    matches!((a, b), (Action::PatchPoolStatus { name: x, .. }, Action::PatchPoolStatus { name: y, .. }) if x == y)
}

enum WriteError {
    Conflict(ServiceKey),
    Other(Option<ServiceKey>, Box<Error>),
}

fn action_key(a: &Action) -> Option<ServiceKey> {
    match a {
        Action::PatchServiceStatus { key, .. } | Action::PatchService { key, .. } => {
            Some(key.clone())
        }
        Action::Event { reference, .. } => Some(ServiceKey::new(
            reference.namespace.clone().unwrap_or_default(),
            reference.name.clone().unwrap_or_default(),
        )),
        Action::PatchPoolStatus { .. } => None,
    }
}

/// The merged watch streams, decoded into [`Input`]s (errors are logged; the watchers back off
/// and re-list by themselves).
pub fn inputs(client: &Client) -> impl Stream<Item = Input> + Send + use<> {
    let cfg = watcher::Config::default();
    let services = logged(
        watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone()).default_backoff(),
        "services",
    )
    .map(Input::Service);
    let pools = logged(
        watcher::watcher(Api::<IPPool>::all(client.clone()), cfg.clone()).default_backoff(),
        "ippools",
    )
    .map(Input::Pool);
    let namespaces = logged(
        watcher::watcher(Api::<Namespace>::all(client.clone()), cfg).default_backoff(),
        "namespaces",
    )
    .map(Input::Namespace);
    let ticks = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Some((Input::Tick, ()))
    });
    futures::stream::select_all([
        services.boxed(),
        pools.boxed(),
        namespaces.boxed(),
        ticks.boxed(),
    ])
}

/// Runs the controller: while `leading` (from a [`crate::lease::Leadership`]), watch and allocate; when
/// leadership is lost, stop and forget everything (the next term re-derives it).
pub async fn run(
    client: Client,
    scope: Scope,
    instance: Option<String>,
    leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    run_with_metrics(
        client,
        scope,
        instance,
        leading,
        ControllerMetrics::default(),
        shutdown,
    )
    .await;
}

/// [`run`], counting into `metrics` (`portico_controller_leading` follows `leading`).
pub async fn run_with_metrics(
    client: Client,
    scope: Scope,
    instance: Option<String>,
    mut leading: watch::Receiver<bool>,
    metrics: ControllerMetrics,
    shutdown: CancellationToken,
) {
    loop {
        let became_leader = tokio::select! {
            () = shutdown.cancelled() => false,
            r = async { leading.wait_for(|l| *l).await.is_ok() } => r,
        };
        if !became_leader {
            return;
        }
        tracing::info!("leading: starting the IPAM controller");
        metrics.leading.set(1);
        let mut driver = Driver::with_metrics(
            client.clone(),
            scope.clone(),
            instance.clone(),
            metrics.clone(),
        );
        let mut events = std::pin::pin!(inputs(&client));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                still = async { leading.wait_for(|l| !*l).await.is_ok() } => {
                    if !still { return }
                    tracing::info!("no longer leading: stopping the IPAM controller");
                    metrics.leading.set(0);
                    break;
                }
                ev = events.next() => match ev {
                    Some(input) => {
                        // Whatever else is ready already joins it: a burst is written in waves.
                        let mut batch = vec![input];
                        while batch.len() < BATCH {
                            match events.next().now_or_never() {
                                Some(Some(more)) => batch.push(more),
                                _ => break,
                            }
                        }
                        driver.handle_batch(batch).await;
                    }
                    None => break,
                },
                () = async {
                    match driver.pools_due() {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => driver.flush_pools().await,
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Re-exported for the binary's status output.
pub use reconcile::CONDITION;
