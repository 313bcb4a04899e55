//! One service at run time: its backend set (a swapped snapshot), slots and queue, and the TCP
//! connection path (choose → admit → connect with retries → PROXY header → relay).
//!
//! The backend set is an input: [`ServiceRt::apply`] swaps in a new snapshot built from a
//! [`model::Service`] (the standalone config today, EndpointSlices later). Backends that stay keep
//! their identity (counters, health, outlier record, open connections); removed ones drain: no new
//! connections, existing ones cancelled at `drain_timeout`.
//!
//! Slots: a connection holds one service slot and one backend slot from admission until it
//! closes; both are compare-and-swap bounded, so `max_connections` and `max_service_connections`
//! hold exactly under concurrency. A connection that finds every eligible backend full waits in a
//! bounded queue (`max_pending`) for a freed slot until `queue_timeout`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use model::{Backend, Balance, BreakerState, Health, Port, Protocol, Service};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balance::{Candidate, Picker, Reason};
use crate::connect::{Early, FirstMove, connect, first_move};
use crate::health::RiseFall;
use crate::maglev::{self, Maglev};
use crate::metrics::{BackendMetrics, Metrics, Operation, RefusedLabels, ServiceLabels};
use crate::node::NodeRt;
use crate::outlier::{FailureOutcome, OutlierState, may_eject};
use crate::relay::{self, End, Side};

/// One backend at run time.
pub(crate) struct BackendRt {
    pub(crate) name: String,
    pub(crate) address: std::net::IpAddr,
    pub(crate) port: Option<u16>,
    pub(crate) weight: AtomicU32,
    health: AtomicU8,
    pub(crate) rise_fall: Mutex<RiseFall>,
    outlier: Mutex<OutlierState>,
    ejected_flag: AtomicBool,
    pub(crate) active: AtomicU32,
    pub(crate) total: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// Cancels this backend's connections (drain deadline; child of the shutdown token).
    pub(crate) drain: CancellationToken,
    /// Cancels this backend's health checks.
    pub(crate) checks: Mutex<CancellationToken>,
    pub(crate) metrics: BackendMetrics,
}

fn health_from(v: u8) -> Health {
    match v {
        1 => Health::Up,
        2 => Health::Down,
        _ => Health::Unknown,
    }
}

fn health_to(h: Health) -> u8 {
    match h {
        Health::Unknown => 0,
        Health::Up => 1,
        Health::Down => 2,
    }
}

impl BackendRt {
    fn new(
        service: &str,
        b: &Backend,
        metrics: &Metrics,
        root: &CancellationToken,
        rise: u32,
        fall: u32,
    ) -> Self {
        Self {
            name: b.name.clone(),
            address: b.address,
            port: b.port,
            weight: AtomicU32::new(b.weight),
            health: AtomicU8::new(0),
            rise_fall: Mutex::new(RiseFall::new(rise, fall)),
            outlier: Mutex::new(OutlierState::default()),
            ejected_flag: AtomicBool::new(false),
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            drain: root.child_token(),
            checks: Mutex::new(CancellationToken::new()),
            metrics: BackendMetrics::new(metrics, service, &b.name),
        }
    }

    fn same_identity(&self, b: &Backend) -> bool {
        self.name == b.name && self.address == b.address && self.port == b.port
    }

    /// The backend socket for a service port.
    pub(crate) fn target(&self, port: &Port) -> SocketAddr {
        SocketAddr::new(self.address, self.port.unwrap_or(port.target_port))
    }

    /// Active-check health.
    pub(crate) fn health(&self) -> Health {
        health_from(self.health.load(Ordering::Relaxed))
    }

    /// Stores a new active-check verdict.
    pub(crate) fn set_health(&self, h: Health) {
        self.health.store(health_to(h), Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(h.is_serving()));
    }

    /// Whether outlier detection has it ejected now (ending expired ejections).
    fn ejected(&self, now: &mut Option<Instant>) -> bool {
        if !self.ejected_flag.load(Ordering::Relaxed) {
            return false;
        }
        let now = *now.get_or_insert_with(Instant::now);
        let mut o = self.outlier.lock().expect("outlier lock");
        let e = o.is_ejected(now);
        if !e {
            self.ejected_flag.store(false, Ordering::Relaxed);
        }
        e
    }

    /// Breaker state now.
    pub(crate) fn breaker(&self, max_connections: u32) -> BreakerState {
        let at_limit =
            max_connections > 0 && self.active.load(Ordering::Relaxed) >= max_connections;
        self.outlier
            .lock()
            .expect("outlier lock")
            .breaker(Instant::now(), at_limit)
    }

    pub(crate) fn is_ejected_now(&self) -> bool {
        self.outlier
            .lock()
            .expect("outlier lock")
            .ejected_at(Instant::now())
    }
}

/// A snapshot of a service's backends.
pub(crate) struct BackendSet {
    pub(crate) backends: Vec<Arc<BackendRt>>,
    maglev: Option<Maglev>,
    picker: Mutex<Picker>,
}

/// How a service's TCP connections are relayed once their first bytes passed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relaying {
    /// `splice(2)` for bulk transfers (tokio relay).
    pub(crate) splice: bool,
    /// The worker's io_uring ([`crate::uring`]), with this many buffers in its pool.
    pub(crate) uring: Option<u16>,
}

/// One service at run time.
pub(crate) struct ServiceRt {
    pub(crate) name: String,
    pub(crate) spec: ArcSwap<Service>,
    pub(crate) set: ArcSwap<BackendSet>,
    /// Removed backends still finishing connections.
    pub(crate) draining: Mutex<Vec<Arc<BackendRt>>>,
    active: AtomicU32,
    pending: AtomicU32,
    slot_freed: Notify,
    pub(crate) panic: AtomicBool,
    metrics: Metrics,
    retries: prometheus_client::metrics::counter::Counter,
    pending_gauge: prometheus_client::metrics::gauge::Gauge,
    pub(crate) panic_gauge: prometheus_client::metrics::gauge::Gauge,
    root: CancellationToken,
    pub(crate) use_splice: bool,
    /// Relay on the worker's io_uring ([`crate::uring`]) with this many buffers.
    use_uring: Option<u16>,
    /// The node's budget and shortage accounting, shared by every service.
    pub(crate) node: Arc<NodeRt>,
    /// Open UDP sessions of this service.
    pub(crate) udp_sessions: prometheus_client::metrics::gauge::Gauge,
}

/// Holds a service slot and a backend slot; releases both on drop and wakes one waiter.
struct Slot<'a> {
    svc: &'a ServiceRt,
    be: Arc<BackendRt>,
    held: bool,
}

impl Slot<'_> {
    /// Keeps the slots taken after the guard is gone; [`ServiceRt::release_udp`] gives them back.
    fn detach(mut self) -> Arc<BackendRt> {
        self.held = false;
        self.be.clone()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        self.be.active.fetch_sub(1, Ordering::AcqRel);
        self.be.metrics.active.dec();
        self.svc.active.fetch_sub(1, Ordering::AcqRel);
        self.svc.slot_freed.notify_one();
    }
}

/// Holds a queue position.
struct Pending<'a>(&'a ServiceRt);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.pending_gauge.dec();
    }
}

/// Increments `n` unless it is at `max` (0 = unlimited). Exact under concurrency.
pub(crate) fn try_acquire(n: &AtomicU32, max: u32) -> bool {
    if max == 0 {
        n.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        (v < max).then_some(v + 1)
    })
    .is_ok()
}

fn build_set(svc: &Service, backends: Vec<Arc<BackendRt>>) -> BackendSet {
    let maglev = (svc.balance == Balance::Maglev).then(|| {
        let names: Vec<(&str, u32)> = backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight.load(Ordering::Relaxed)))
            .collect();
        Maglev::try_new(&names, maglev::DEFAULT_TABLE_SIZE).unwrap_or_else(|_| {
            Maglev::try_new(&[], maglev::DEFAULT_TABLE_SIZE).expect("empty table builds")
        })
    });
    BackendSet {
        backends,
        maglev,
        picker: Mutex::new(Picker::default()),
    }
}

/// What [`ServiceRt::apply`] changed, for the caller to act on.
pub(crate) struct Applied {
    /// Backends new in this generation (need health checks).
    pub(crate) added: Vec<Arc<BackendRt>>,
    /// Backends removed (now draining).
    pub(crate) removed: Vec<Arc<BackendRt>>,
    /// The health-check settings changed (restart every check).
    pub(crate) checks_changed: bool,
}

impl ServiceRt {
    pub(crate) fn new(
        spec: &Service,
        metrics: &Metrics,
        root: &CancellationToken,
        relaying: Relaying,
        node: Arc<NodeRt>,
    ) -> Self {
        let l = ServiceLabels {
            service: spec.name.clone(),
        };
        Self {
            name: spec.name.clone(),
            spec: ArcSwap::from_pointee(spec.clone()),
            set: ArcSwap::from_pointee(build_set(spec, Vec::new())),
            draining: Mutex::new(Vec::new()),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            slot_freed: Notify::new(),
            panic: AtomicBool::new(false),
            metrics: metrics.clone(),
            retries: metrics.retries.get_or_create(&l).clone(),
            pending_gauge: metrics.pending.get_or_create(&l).clone(),
            panic_gauge: metrics.panic.get_or_create(&l).clone(),
            root: root.clone(),
            use_splice: relaying.splice,
            use_uring: relaying.uring,
            node,
            udp_sessions: metrics.udp_sessions.get_or_create(&l).clone(),
        }
    }

    /// Swaps in a new spec and backend set. Backends that stay keep their state.
    pub(crate) fn apply(&self, spec: &Service, first: bool) -> Applied {
        let old_spec = self.spec.load_full();
        let old = self.set.load_full();
        let (rise, fall) = spec
            .health_check
            .as_ref()
            .map_or((1, 1), |h| (h.rise, h.fall));
        let checks_changed = first || old_spec.health_check != spec.health_check;
        let mut added = Vec::new();
        let backends: Vec<Arc<BackendRt>> = spec
            .backends
            .iter()
            .map(|b| match old.backends.iter().find(|o| o.same_identity(b)) {
                Some(o) => {
                    o.weight.store(b.weight, Ordering::Relaxed);
                    if checks_changed {
                        *o.rise_fall.lock().expect("rise_fall lock") = RiseFall::new(rise, fall);
                        o.set_health(Health::Unknown);
                    }
                    o.clone()
                }
                None => {
                    let n = Arc::new(BackendRt::new(
                        &spec.name,
                        b,
                        &self.metrics,
                        &self.root,
                        rise,
                        fall,
                    ));
                    added.push(n.clone());
                    n
                }
            })
            .collect();
        let removed: Vec<Arc<BackendRt>> = old
            .backends
            .iter()
            .filter(|o| !backends.iter().any(|n| Arc::ptr_eq(n, o)))
            .cloned()
            .collect();
        for r in &removed {
            r.draining.store(true, Ordering::Relaxed);
        }
        self.spec.store(Arc::new(spec.clone()));
        self.set.store(Arc::new(build_set(spec, backends)));
        self.draining
            .lock()
            .expect("draining lock")
            .extend(removed.iter().cloned());
        // Slots may have become available (new backends, raised limits).
        self.slot_freed.notify_waiters();
        Applied {
            added,
            removed,
            checks_changed,
        }
    }

    /// Forgets a drained backend.
    pub(crate) fn drained(&self, be: &Arc<BackendRt>) {
        self.draining
            .lock()
            .expect("draining lock")
            .retain(|b| !Arc::ptr_eq(b, be));
        if !self.set.load().backends.iter().any(|b| b.name == be.name) {
            self.metrics.forget_backend(&self.name, &be.name);
        }
    }

    /// Builds the candidate snapshot of `set`.
    fn candidates(
        &self,
        set: &BackendSet,
        spec: &Service,
        tried: &[Arc<BackendRt>],
    ) -> Vec<Candidate> {
        let max = spec.circuit_breaker.max_connections;
        let mut now = None;
        set.backends
            .iter()
            .map(|b| {
                let active = b.active.load(Ordering::Relaxed);
                Candidate {
                    weight: b.weight.load(Ordering::Relaxed),
                    healthy: b.health().is_serving(),
                    ejected: b.ejected(&mut now),
                    at_limit: max > 0 && active >= max,
                    active: u64::from(active),
                    tried: tried.iter().any(|t| Arc::ptr_eq(t, b)),
                }
            })
            .collect()
    }

    /// Chooses a backend and takes its slots, or says why not.
    fn admit(
        &self,
        spec: &Service,
        hash: u64,
        tried: &[Arc<BackendRt>],
    ) -> Result<Slot<'_>, Reason> {
        let cb = &spec.circuit_breaker;
        let max_service = self.max_service_connections(spec);
        if self.active.load(Ordering::Acquire) >= max_service {
            return Err(Reason::ServiceLimit);
        }
        let set = self.set.load();
        let cands = self.candidates(&set, spec, tried);
        let choice = {
            let mut picker = set.picker.lock().expect("picker lock");
            picker.pick(
                spec.balance,
                &cands,
                spec.outlier.panic_threshold_percent,
                set.maglev.as_ref(),
                hash,
                &mut rand::rng(),
            )?
        };
        self.panic.store(choice.panic, Ordering::Relaxed);
        let be = set.backends[choice.index].clone();
        if !try_acquire(&self.active, max_service) {
            return Err(Reason::ServiceLimit);
        }
        if !try_acquire(&be.active, cb.max_connections) {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Reason::BreakerOpen);
        }
        be.metrics.active.inc();
        Ok(Slot {
            svc: self,
            be,
            held: true,
        })
    }

    /// The service's connection cap: `max_service_connections`, or when that is 0 (the
    /// default) the node's TCP connection budget.
    pub(crate) fn max_service_connections(&self, spec: &Service) -> u32 {
        match spec.circuit_breaker.max_service_connections {
            0 => self.node.budget.tcp_connections.max(1),
            n => n,
        }
    }

    /// Admission with the bounded queue: waits up to `queue_timeout` for a slot.
    async fn admit_or_wait(&self, hash: u64, tried: &[Arc<BackendRt>]) -> Result<Slot<'_>, Reason> {
        let mut queued: Option<(Pending<'_>, Instant)> = None;
        loop {
            let spec = self.spec.load();
            let notified = self.slot_freed.notified();
            match self.admit(&spec, hash, tried) {
                Ok(s) => return Ok(s),
                Err(r) if r.is_waitable() => {
                    let cb = &spec.circuit_breaker;
                    if queued.is_none() {
                        if cb.max_pending == 0 {
                            return Err(r);
                        }
                        if !try_acquire(&self.pending, cb.max_pending) {
                            return Err(Reason::QueueFull);
                        }
                        self.pending_gauge.inc();
                        queued = Some((Pending(self), Instant::now() + cb.queue_timeout));
                    }
                    let deadline = queued.as_ref().expect("queued above").1;
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(deadline) => return Err(Reason::QueueTimeout),
                    }
                }
                Err(r) => return Err(r),
            }
        }
    }

    /// Records a connect failure or backend reset for outlier detection.
    pub(crate) fn record_failure(&self, be: &BackendRt) {
        be.failures.fetch_add(1, Ordering::Relaxed);
        be.metrics.connect_failures.inc();
        let spec = self.spec.load();
        let set = self.set.load();
        let now = Instant::now();
        let ejected = set.backends.iter().filter(|b| b.is_ejected_now()).count();
        let total = set.backends.len();
        let outcome = be.outlier.lock().expect("outlier lock").on_failure(
            &spec.outlier,
            now,
            may_eject(&spec.outlier, ejected, total),
        );
        if let FailureOutcome::Ejected(until) = outcome {
            be.ejected_flag.store(true, Ordering::Relaxed);
            be.metrics.ejections.inc();
            be.metrics.set_breaker(BreakerState::Open);
            tracing::warn!(service = %self.name, backend = %be.name, ejected_for = ?until - now, reason = "outlierEjected", "backend ejected");
        }
    }

    fn record_success(&self, be: &BackendRt) {
        if be.ejected_flag.load(Ordering::Relaxed)
            || self.spec.load().outlier.consecutive_failures > 0
        {
            let spec = self.spec.load();
            be.outlier
                .lock()
                .expect("outlier lock")
                .on_success(&spec.outlier, Instant::now());
        }
    }

    /// Counts and logs (debug) a client refused for `reason`.
    pub(crate) fn refuse(&self, reason: Reason, peer: SocketAddr) {
        self.count_refused(reason);
        tracing::debug!(service = %self.name, client = %peer, %reason, "connection refused");
    }

    /// Counts a client connection or UDP session refused for `reason`.
    pub(crate) fn count_refused(&self, reason: Reason) {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels {
                service: self.name.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a UDP session evicted for `reason`.
    pub(crate) fn count_evicted(&self, reason: Reason) {
        self.metrics
            .udp_evicted
            .get_or_create(&RefusedLabels {
                service: self.name.clone(),
                reason,
            })
            .inc();
    }

    /// Serves one accepted client connection to the end.
    pub(crate) async fn serve_tcp(&self, client: TcpStream, peer: SocketAddr, vip: SocketAddr) {
        let spec = self.spec.load_full();
        let Some(port) = spec
            .ports
            .iter()
            .find(|p| p.port == vip.port() && p.protocol == Protocol::Tcp)
        else {
            return;
        };
        let conn = &spec.connection;
        let hash = maglev::client_hash(peer.ip());
        let header = spec
            .proxy_protocol
            .map(|pp| crate::proxy_protocol::encode(pp, Protocol::Tcp, peer, vip));
        let mut tried: Vec<Arc<BackendRt>> = Vec::new();
        // The client's first bytes, read once and kept until a backend has taken them.
        let mut early = Early::new();
        let (slot, backend, moved) = loop {
            let slot = match self.admit_or_wait(hash, &tried).await {
                Ok(s) => s,
                Err(Reason::NoHealthyBackend) if !tried.is_empty() => {
                    return self.refuse(Reason::ConnectFailed, peer);
                }
                Err(r) => return self.refuse(r, peer),
            };
            let target = slot.be.target(port);
            let failure = match connect(target, conn.connect_timeout).await {
                Ok(backend) => {
                    match first_move(
                        &client,
                        &backend,
                        header.as_deref(),
                        &mut early,
                        conn.idle_timeout,
                        &slot.be.drain,
                    )
                    .await
                    {
                        FirstMove::Go(moved) => break (slot, backend, moved),
                        FirstMove::End => return,
                        FirstMove::BackendGone(e) => e,
                    }
                }
                Err(e) => e,
            };
            if self.node.local_error(Operation::connect, &failure) {
                // Our shortage, not the backend's: no failure recorded, no retry.
                return self.refuse(Reason::LocalResources, peer);
            }
            tracing::debug!(service = %self.name, backend = %slot.be.name, error = %failure, "connect failed");
            self.record_failure(&slot.be);
            tried.push(slot.be.clone());
            drop(slot);
            if tried.len() as u64 > u64::from(conn.retries) {
                return self.refuse(Reason::ConnectFailed, peer);
            }
            self.retries.inc();
        };
        drop(early);
        let be = slot.be.clone();
        self.record_success(&be);
        be.total.fetch_add(1, Ordering::Relaxed);
        be.metrics.connections.inc();
        if moved.to_backend > 0 {
            be.metrics.bytes_to_backend.inc_by(moved.to_backend);
        }
        if moved.to_client > 0 {
            be.metrics.bytes_to_client.inc_by(moved.to_client);
        }
        let counters = relay::Counters {
            to_backend: &be.metrics.bytes_to_backend,
            to_client: &be.metrics.bytes_to_client,
        };
        // With `proxy.io: uring` the tokio relay runs first and hands a connection that proves
        // long-lived (PROMOTE_AFTER messages) over to the worker's ring: one-request
        // connections never pay for the move, bulk ones keep splice.
        let mut promote = self.use_uring.map(|_| crate::uring::PROMOTE_AFTER);
        let (mut client, mut backend) = (client, backend);
        loop {
            let (end, _) = relay::relay(
                &client,
                &backend,
                conn.idle_timeout,
                &be.drain,
                counters,
                self.use_splice,
                promote,
            )
            .await;
            if let (End::Handover, Some(buffers)) = (&end, self.use_uring) {
                match crate::uring::relay(
                    client,
                    backend,
                    conn.idle_timeout,
                    &be.drain,
                    counters,
                    &self.metrics.uring,
                    buffers,
                )
                .await
                {
                    // the ring closed both sockets (the client with a reset after a backend
                    // error)
                    Ok((end, _)) => {
                        self.backend_ended(&be, &end);
                        return drop(slot);
                    }
                    // this thread has no ring: the tokio relay carries on, for good
                    Err((c, b)) => {
                        (client, backend) = (c, b);
                        promote = None;
                        continue;
                    }
                }
            }
            if self.backend_ended(&be, &end) {
                // Pass the reset on rather than a clean close.
                let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
            }
            return drop(slot);
        }
    }

    /// Records a backend that reset or broke the relay as a failure; `true` when the backend
    /// side failed (the client is then reset rather than closed cleanly).
    fn backend_ended(&self, be: &BackendRt, end: &End) -> bool {
        let End::Error(Side::Backend, e) = end else {
            return false;
        };
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ) {
            self.record_failure(be);
        }
        true
    }

    /// Chooses a backend for a UDP session (no queue, no retries).
    pub(crate) fn admit_udp(&self, hash: u64) -> Result<Arc<BackendRt>, Reason> {
        let spec = self.spec.load();
        // A UDP session holds its slots while it lives, released by `release_udp`.
        Ok(self.admit(&spec, hash, &[])?.detach())
    }

    /// Releases the slots a UDP session held.
    pub(crate) fn release_udp(&self, be: Arc<BackendRt>) {
        drop(Slot {
            svc: self,
            be,
            held: true,
        });
    }

    /// A snapshot for status: backends, draining ones after them.
    pub(crate) fn status_backends(&self) -> Vec<(Arc<BackendRt>, bool)> {
        let mut v: Vec<(Arc<BackendRt>, bool)> = self
            .set
            .load()
            .backends
            .iter()
            .map(|b| (b.clone(), false))
            .collect();
        v.extend(
            self.draining
                .lock()
                .expect("draining lock")
                .iter()
                .map(|b| (b.clone(), true)),
        );
        v
    }

    /// Health of the current backends.
    pub(crate) fn health_view(&self, out: &mut BTreeMap<model::BackendKey, Health>) {
        for b in self.set.load().backends.iter() {
            out.insert(model::BackendKey::new(&self.name, &b.name), b.health());
        }
    }
}
