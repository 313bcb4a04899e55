//! The L4 data path: listeners, relay, backend choice, health checks, outlier ejection, circuit
//! breaking.
//!
//! # Layout
//! Pure cores, tested without a runtime:
//! - [`maglev`]: the Maglev lookup table and the stable hash;
//! - [`balance`]: eligibility, panic mode, round-robin / least-connections / P2C / Maglev choice,
//!   and the [`balance::Reason`] words;
//! - [`health`]: rise/fall (HAProxy's meaning);
//! - [`outlier`]: consecutive-failure ejection (Envoy's meaning) and the breaker state;
//! - [`proxy_protocol`]: PROXY v1/v2 codec;
//! - [`budget`]: the node's connection budget from its file-descriptor limit; the UDP session
//!   table is `sys::conn_table`.
//!
//! Thin tokio drivers: [`listen`] (the injectable [`listen::Binder`]), `worker` (the proxy's
//! worker threads, one `SO_REUSEPORT` listener each), [`relay`] (splice),
//! [`check`] (probes and their schedule), `service` (admission, queue, connect retries) and `udp`
//! (sessions), `node` (the budget in use; local shortages such as `EMFILE`, which are never
//! counted against a backend). [`LoadBalancer`] ties them to the desired state.
//!
//! # Reload
//! Each [`Desired`] generation is applied in place: listeners whose `VIP:port/protocol` stays are
//! kept (never rebound), new ones are opened, removed ones stop accepting; established
//! connections continue. Backends that stay keep their state; removed ones drain until the
//! service's `drain_timeout`.
//!
//! # Metrics
//! [`LoadBalancer::new`] registers the metrics under the prefix `portico_lb` itself (see
//! [`metrics`]): pass the root registry.

pub mod balance;
pub mod budget;
pub mod check;
mod connect;
pub mod health;
pub mod listen;
pub mod maglev;
pub mod metrics;
mod node;
pub mod outlier;
pub mod proxy_protocol;
pub mod relay;
mod service;
mod udp;
pub mod uring;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use model::{
    BackendStatus, Desired, Health, HealthView, PortStatus, Protocol, Service, ServiceStatus,
    VipStatus,
};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Reason;
use crate::budget::Budget;
use crate::listen::{Binder, FreebindBinder};
use crate::metrics::{Metrics, Operation};
use crate::node::{NodeRt, TcpUnit};
use crate::service::{BackendRt, ServiceRt};
use crate::worker::Workers;

/// Errors of the load balancer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be opened.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Tunables that are not part of the service config.
#[derive(Clone)]
pub struct Options {
    /// Opens the VIP listeners (default: [`FreebindBinder`]).
    pub binder: Arc<dyn Binder>,
    /// Relay with `splice(2)` (default) or a buffered copy.
    pub splice: bool,
    /// How many relayed TCP connections and UDP sessions the node holds at once (default:
    /// [`Budget::from_process`], from the soft `RLIMIT_NOFILE` when the balancer is created;
    /// raise the limit first with `sys::limits::raise_nofile_limit`).
    pub budget: Budget,
    /// Whether the kernel path (the `kernel` crate's nftables table) runs on this node, and for
    /// IPv6 too: a service whose [`Service::path`] is then the kernel opens no proxy listener
    /// (its checks still run and publish health). Default: none (every service on the proxy).
    pub kernel_path: model::KernelSupport,
    /// Proxy worker threads, each with its own runtime and its own `SO_REUSEPORT` listener per
    /// TCP `VIP:port` (`proxy.workers`); 0 (the default): accept and relay on the runtime that
    /// runs the balancer.
    pub workers: usize,
    /// Relay on each proxy worker's io_uring (`proxy.io: uring`, see [`uring`]) instead of
    /// tokio's `read`/`write`/`splice` (default: off). Needs workers (a thread that is not a
    /// proxy worker relays with tokio).
    pub uring: bool,
    /// Buffers in each worker's io_uring pool (16 KiB each; a power of two, default
    /// [`uring::BUFFERS`]). Tests make it small to run the pool dry.
    pub uring_buffers: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            binder: Arc::new(FreebindBinder),
            splice: true,
            budget: Budget::from_process(),
            kernel_path: model::KernelSupport::default(),
            workers: 0,
            uring: false,
            uring_buffers: uring::BUFFERS,
        }
    }
}

type ListenerKey = (SocketAddr, Protocol);

/// First pause of an accept loop after an accept error; doubles while errors persist.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause of an accept loop between accept errors.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

struct ListenerHandle {
    service: String,
    cancel: CancellationToken,
}

/// First retry of a listener that could not be opened; doubles per failure.
const LISTEN_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause between retries of a listener that could not be opened.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// A listener that could not be opened: retried with back-off.
struct Closed {
    failures: u32,
    next: Instant,
}

struct Inner {
    metrics: Metrics,
    node: Arc<NodeRt>,
    opts: Options,
    services: ArcSwap<BTreeMap<String, Arc<ServiceRt>>>,
    listeners: Mutex<HashMap<ListenerKey, ListenerHandle>>,
    /// Listeners that could not be opened, with their next retry.
    closed: Mutex<HashMap<ListenerKey, Closed>>,
    /// The VIPs with a closed listener, for the agent (a node is not eligible for them).
    closed_tx: watch::Sender<Arc<BTreeSet<IpAddr>>>,
    health_changed: Notify,
    /// Parent of every connection's cancel token: fired when shutdown drain ends.
    conns_root: CancellationToken,
    /// Parent of listener and check tasks: fired at shutdown start.
    tasks_root: CancellationToken,
    tracker: TaskTracker,
    /// `shutdown.drain_timeout` of the last applied generation.
    shutdown_drain: Mutex<Duration>,
    /// Per VIP address: cancels its relayed TCP connections when the address left this node
    /// during the shutdown drain (they cannot be served any more).
    vip_gone: Mutex<HashMap<IpAddr, CancellationToken>>,
    /// The proxy's worker threads (none: the caller's runtime).
    workers: Workers,
    /// The generation [`LoadBalancer::apply`] last finished (0: none yet).
    applied_generation: watch::Sender<u64>,
}

/// Serves one accepted TCP connection until it ends, or until its VIP leaves this node during
/// the shutdown drain (dropping the relay closes both sockets).
async fn serve_accepted(
    rt: Arc<ServiceRt>,
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    gone: CancellationToken,
) {
    tokio::select! {
        () = rt.serve_tcp(client, peer, vip) => {}
        () = gone.cancelled() => {}
    }
}

/// Debug builds only, for the end-to-end tests of `/status` during a reload: waits
/// `PORTICO_TEST_APPLY_DELAY_MS` before applying a new generation, which widens the moment a
/// published generation is not yet applied (a few microseconds, more on a loaded machine).
async fn apply_delay() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("PORTICO_TEST_APPLY_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The balancer: follows desired state, runs health checks, relays connections.
#[derive(Clone)]
pub struct LoadBalancer {
    inner: Arc<Inner>,
}

impl LoadBalancer {
    /// Creates a balancer whose metrics live in `registry` (under `portico_lb`), listening with
    /// the freebind binder and relaying with splice.
    pub fn new(registry: &mut Registry) -> Self {
        Self::with_options(registry, Options::default())
    }

    /// Creates a balancer with explicit [`Options`] (tests inject a loopback binder).
    pub fn with_options(registry: &mut Registry, opts: Options) -> Self {
        let metrics = Metrics::register(registry);
        let node = Arc::new(NodeRt::new(opts.budget, &metrics));
        tracing::info!(
            nofile = opts.budget.nofile,
            reserved = opts.budget.reserved,
            tcp_connections = opts.budget.tcp_connections,
            udp_sessions = opts.budget.udp_sessions,
            "connection budget"
        );
        let workers = Workers::start(opts.workers, &metrics);
        Self {
            inner: Arc::new(Inner {
                metrics,
                node,
                opts,
                services: ArcSwap::from_pointee(BTreeMap::new()),
                listeners: Mutex::new(HashMap::new()),
                closed: Mutex::new(HashMap::new()),
                closed_tx: watch::channel(Arc::new(BTreeSet::new())).0,
                health_changed: Notify::new(),
                conns_root: CancellationToken::new(),
                tasks_root: CancellationToken::new(),
                tracker: TaskTracker::new(),
                shutdown_drain: Mutex::new(model::Shutdown::default().drain_timeout),
                vip_gone: Mutex::new(HashMap::new()),
                workers,
                applied_generation: watch::channel(0).0,
            }),
        }
    }

    /// The generation whose services, backends and listeners this balancer runs (0 before the
    /// first): what [`Self::service_status`] reports is of this generation. It trails the
    /// published [`Desired`] generation for the moment an apply takes.
    pub fn applied_generation(&self) -> u64 {
        *self.inner.applied_generation.borrow()
    }

    /// Follows [`Self::applied_generation`]: the metric `portico_config_generation` and
    /// readiness (the first applied generation) wait on it.
    pub fn watch_applied_generation(&self) -> watch::Receiver<u64> {
        self.inner.applied_generation.subscribe()
    }

    /// Connections each proxy worker accepted so far (one entry without workers): the kernel
    /// spreads them over the workers' `SO_REUSEPORT` listeners.
    pub fn worker_accepts(&self) -> Vec<u64> {
        self.inner.workers.accepted()
    }

    /// TCP connections each proxy worker serves now (one entry without workers).
    pub fn worker_loads(&self) -> Vec<u64> {
        self.inner.workers.loads()
    }

    /// The VIPs with a listener that could not be opened on this node (retried with back-off
    /// from 1 s to 30 s, and at once on a reload); the agent makes this node ineligible for
    /// them.
    pub fn closed_listeners(&self) -> watch::Receiver<Arc<BTreeSet<IpAddr>>> {
        self.inner.closed_tx.subscribe()
    }

    /// Runs until `shutdown`: applies each desired generation (listeners, backends), publishes
    /// backend health to `health`, and drains connections on shutdown (up to
    /// `shutdown.drain_timeout`, then closes the rest; see [`Self::shut_down`]).
    pub async fn run(
        &self,
        mut desired: watch::Receiver<Arc<Desired>>,
        health: watch::Sender<Arc<HealthView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let first = desired.borrow_and_update().clone();
        self.apply(&first);
        self.publish_health(&health);
        let mut source_open = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = desired.changed(), if source_open => match r {
                    Ok(()) => {
                        let d = desired.borrow_and_update().clone();
                        apply_delay().await;
                        self.apply(&d);
                        self.publish_health(&health);
                    }
                    Err(_) => source_open = false,
                },
                () = self.inner.health_changed.notified() => self.publish_health(&health),
                _ = tick.tick() => self.housekeeping(),
            }
        }
        self.shut_down().await;
        Ok(())
    }

    /// Stops accepting and lets the connections this node can still serve finish, up to
    /// `shutdown.drain_timeout`, then closes the rest. A connection to a VIP that is no longer
    /// an address of this host (the agent handed it over: its client's packets now reach the
    /// new owner) cannot finish here, so it is closed at once (checked every 50 ms) and never
    /// holds the exit.
    async fn shut_down(&self) {
        let inner = &self.inner;
        inner.tasks_root.cancel();
        inner.listeners.lock().expect("listeners lock").clear();
        let drain = *inner.shutdown_drain.lock().expect("shutdown_drain lock");
        inner.tracker.close();
        let deadline = Instant::now() + drain;
        let mut closed_gone = 0usize;
        loop {
            closed_gone += self.close_vips_gone();
            tokio::select! {
                () = inner.tracker.wait() => break,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::info!(
                        reason = "drainTimeout",
                        "closing connections still open at shutdown"
                    );
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        if closed_gone > 0 {
            tracing::info!(
                vips = closed_gone,
                reason = "vipHandedOver",
                "closed connections to VIPs no longer on this node"
            );
        }
        inner.conns_root.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), inner.tracker.wait()).await;
    }

    /// Cancels the connections of every VIP that is no longer an address of this host; returns
    /// how many VIPs that was.
    fn close_vips_gone(&self) -> usize {
        let gone: Vec<CancellationToken> = self
            .inner
            .vip_gone
            .lock()
            .expect("vip_gone lock")
            .iter()
            .filter(|(ip, t)| !t.is_cancelled() && !is_local_address(**ip))
            .map(|(_, t)| t.clone())
            .collect();
        for t in &gone {
            t.cancel();
        }
        gone.len()
    }

    /// The token that ends `vip`'s connections once the address left this node.
    fn vip_token(&self, vip: IpAddr) -> CancellationToken {
        self.inner
            .vip_gone
            .lock()
            .expect("vip_gone lock")
            .entry(vip)
            .or_default()
            .clone()
    }

    /// Applies one generation: services, backends, health checks, listeners.
    pub fn apply(&self, desired: &Desired) {
        let inner = &self.inner;
        let old = inner.services.load_full();
        *inner.shutdown_drain.lock().expect("shutdown_drain lock") =
            desired.config.shutdown.drain_timeout;
        // bounded by the configured VIPs (a removed VIP's connections keep their token)
        inner
            .vip_gone
            .lock()
            .expect("vip_gone lock")
            .retain(|ip, t| {
                t.is_cancelled() || desired.config.services.iter().any(|s| s.vips.contains(ip))
            });
        let mut next: BTreeMap<String, Arc<ServiceRt>> = BTreeMap::new();
        for spec in &desired.config.services {
            let (rt, first) = match old.get(&spec.name) {
                Some(rt) => (rt.clone(), false),
                None => (
                    Arc::new(ServiceRt::new(
                        spec,
                        &inner.metrics,
                        &inner.conns_root,
                        crate::service::Relaying {
                            splice: inner.opts.splice,
                            uring: inner.opts.uring.then_some(inner.opts.uring_buffers),
                        },
                        inner.node.clone(),
                    )),
                    true,
                ),
            };
            let applied = rt.apply(spec, first);
            let restart: Vec<Arc<BackendRt>> = if applied.checks_changed {
                rt.set.load().backends.to_vec()
            } else {
                applied.added
            };
            for be in restart {
                self.start_checks(&rt, &be, spec);
            }
            for be in applied.removed {
                self.drain_backend(&rt, be, spec.connection.drain_timeout);
            }
            next.insert(spec.name.clone(), rt);
        }
        for (name, rt) in old.iter() {
            if !next.contains_key(name) {
                let timeout = rt.spec.load().connection.drain_timeout;
                for be in rt.set.load().backends.iter() {
                    be.draining.store(true, Ordering::Relaxed);
                    rt.draining.lock().expect("draining lock").push(be.clone());
                    self.drain_backend(rt, be.clone(), timeout);
                }
                tracing::info!(service = %name, "service removed; draining");
            }
        }
        inner.services.store(Arc::new(next.clone()));
        self.reconcile_listeners(&next, true);
        inner.applied_generation.send_replace(desired.generation);
        tracing::info!(
            generation = desired.generation,
            services = next.len(),
            "load balancer applied"
        );
    }

    fn drain_backend(&self, rt: &Arc<ServiceRt>, be: Arc<BackendRt>, timeout: Duration) {
        be.checks.lock().expect("checks lock").cancel();
        tracing::info!(service = %rt.name, backend = %be.name, ?timeout, "backend draining");
        let rt = rt.clone();
        let stop = self.inner.tasks_root.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + timeout;
            loop {
                if be.active.load(Ordering::Acquire) == 0 || Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = stop.cancelled() => return,
                }
            }
            be.drain.cancel();
            rt.drained(&be);
        });
    }

    fn start_checks(&self, rt: &Arc<ServiceRt>, be: &Arc<BackendRt>, spec: &Service) {
        let token = self.inner.tasks_root.child_token();
        let old = std::mem::replace(&mut *be.checks.lock().expect("checks lock"), token.clone());
        old.cancel();
        let Some(hc) = spec.health_check.clone() else {
            return;
        };
        // Checks speak TCP: probe the first TCP port (a UDP-only service needs `health_check.port`).
        let Some(port) = spec
            .ports
            .iter()
            .find(|p| p.protocol == model::Protocol::Tcp)
            .or(spec.ports.first())
        else {
            return;
        };
        let target = hc
            .port
            .map_or_else(|| be.target(port), |p| SocketAddr::new(be.address, p));
        let (rt, be) = (rt.clone(), be.clone());
        let lb = self.clone();
        tokio::spawn(async move {
            let mut delay = check::first_delay(hc.interval, &mut rand::rng());
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                let started = Instant::now();
                let result = tokio::select! {
                    () = token.cancelled() => return,
                    r = check::probe(&hc.kind, target, hc.timeout) => r,
                };
                be.metrics
                    .check_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Err(check::ProbeError::Io(e)) = &result
                    && lb.inner.node.local_error(Operation::check, e)
                {
                    // Our shortage says nothing about the backend: its health stays as it is.
                    delay = check::next_delay(hc.interval, &mut rand::rng());
                    continue;
                }
                let passed = result.is_ok();
                let transition = be.rise_fall.lock().expect("rise_fall lock").observe(passed);
                if let Some(t) = transition {
                    be.set_health(t.to);
                    match &result {
                        Err(e) => {
                            tracing::warn!(service = %rt.name, backend = %be.name, from = ?t.from, to = ?t.to, reason = e.reason(), error = %e, "backend health changed")
                        }
                        Ok(()) => {
                            tracing::info!(service = %rt.name, backend = %be.name, from = ?t.from, to = ?t.to, "backend health changed")
                        }
                    }
                    lb.inner.health_changed.notify_one();
                }
                delay = check::next_delay(hc.interval, &mut rand::rng());
            }
        });
    }

    /// Opens the listeners `services` need and closes the others; `all` retries every closed
    /// listener now (a reload), else only those whose back-off ran out.
    fn reconcile_listeners(&self, services: &BTreeMap<String, Arc<ServiceRt>>, all: bool) {
        let inner = &self.inner;
        let mut want: HashMap<ListenerKey, Arc<ServiceRt>> = HashMap::new();
        for rt in services.values() {
            let spec = rt.spec.load();
            if spec.path(inner.opts.kernel_path).0 == model::Path::Kernel {
                continue; // the kernel DNATs its VIP:ports; no proxy listener
            }
            for vip in &spec.vips {
                for p in &spec.ports {
                    want.insert((SocketAddr::new(*vip, p.port), p.protocol), rt.clone());
                }
            }
        }
        let mut listeners = inner.listeners.lock().expect("listeners lock");
        listeners.retain(|key, h| {
            let keep = want.get(key).is_some_and(|rt| rt.name == h.service);
            if !keep {
                h.cancel.cancel();
            }
            keep
        });
        let mut closed = inner.closed.lock().expect("closed lock");
        closed.retain(|key, _| want.contains_key(key));
        let now = Instant::now();
        for (key, rt) in want {
            if listeners.contains_key(&key) {
                continue;
            }
            if !all && closed.get(&key).is_some_and(|c| c.next > now) {
                continue;
            }
            let cancel = inner.tasks_root.child_token();
            let (addr, proto) = key;
            let opened = match proto {
                Protocol::Tcp => inner
                    .opts
                    .binder
                    .tcp(addr, inner.workers.listeners())
                    .map(|ls| {
                        for (worker, l) in ls.into_iter().enumerate() {
                            let lb = self.clone();
                            let task = lb.accept_loop(worker, rt.clone(), l, addr, cancel.clone());
                            inner.workers.spawn(worker, task);
                        }
                    }),
                Protocol::Udp => inner.opts.binder.udp(addr).map(|s| {
                    inner
                        .tracker
                        .spawn(udp::serve(rt.clone(), s, addr, cancel.clone()));
                }),
            };
            match opened {
                Ok(()) => {
                    let failures = closed.remove(&key).map_or(0, |c| c.failures);
                    tracing::info!(service = %rt.name, %addr, protocol = %proto, failures, "listening");
                    listeners.insert(
                        key,
                        ListenerHandle {
                            service: rt.name.clone(),
                            cancel,
                        },
                    );
                }
                Err(source) => {
                    let e = Error::Listen { addr, source };
                    let c = closed.entry(key).or_insert(Closed {
                        failures: 0,
                        next: now,
                    });
                    c.failures += 1;
                    let pause = LISTEN_RETRY_MIN
                        .saturating_mul(1 << (c.failures - 1).min(16))
                        .min(LISTEN_RETRY_MAX);
                    c.next = now + pause;
                    if c.failures == 1 {
                        tracing::error!(service = %rt.name, error = %e, cause = %e.source_text(), reason = "listenerNotOpen", "listener not opened; retried with back-off, and this node is not eligible for the VIP until it opens");
                    } else {
                        tracing::debug!(service = %rt.name, error = %e, cause = %e.source_text(), failures = c.failures, ?pause, "listener still not opened");
                    }
                }
            }
        }
        let vips: BTreeSet<IpAddr> = closed.keys().map(|(a, _)| a.ip()).collect();
        inner.closed_tx.send_if_modified(|cur| {
            if **cur == vips {
                false
            } else {
                *cur = Arc::new(vips);
                true
            }
        });
    }

    /// Accepts on one worker's listener; runs on that worker, and so do its connections, unless
    /// this worker serves clearly more than another ([`worker::place`]): that one serves it.
    async fn accept_loop(
        self,
        worker: usize,
        rt: Arc<ServiceRt>,
        listener: std::net::TcpListener,
        vip: SocketAddr,
        cancel: CancellationToken,
    ) {
        let listener = match sys::accept::Acceptor::new(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = %rt.name, %vip, worker, error = %e, reason = "listenerNotOpen", "cannot register the listener with its worker");
                return;
            }
        };
        let node = self.inner.node.clone();
        // The listener is cancelled before its VIP leaves the configuration, so this token
        // stays the VIP's for the loop's life.
        let gone_vip = self.vip_token(vip.ip());
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((client, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    self.inner.workers.count_accept(worker);
                    if !node.acquire_tcp() {
                        // Over the node's budget: accept and close at once (counted first,
                        // so whoever sees the close also sees the count).
                        rt.refuse(Reason::NodeBudget, peer);
                        drop(client);
                        continue;
                    }
                    let unit = TcpUnit(node.clone());
                    let rt = rt.clone();
                    let gone = gone_vip.clone();
                    let (to, load) = self.inner.workers.place(worker);
                    let node = node.clone();
                    // registered with the poller of the worker that serves it, and only there
                    let serve = async move {
                        match tokio::net::TcpStream::from_std(client) {
                            // boxed: the task moves a few bytes, not the relay's 3.4 KiB of
                            // state, each time it is wrapped, spawned and placed on the heap
                            Ok(client) => {
                                Box::pin(serve_accepted(rt, client, peer, vip, gone)).await
                            }
                            Err(e) => {
                                node.local_error(Operation::accept, &e);
                            }
                        }
                        drop((unit, load));
                    };
                    if to == worker {
                        self.inner.tracker.spawn(serve);
                    } else {
                        // a less busy worker serves it
                        self.inner.workers.count_handoff();
                        self.inner
                            .workers
                            .spawn(to, self.inner.tracker.track_future(serve));
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off (doubling up to a second) instead of
                    // spinning, and log once per interval for the whole node.
                    if !node.local_error(Operation::accept, &e) {
                        tracing::debug!(service = %rt.name, %vip, error = %e, "accept failed");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    fn housekeeping(&self) {
        let retry = {
            let now = Instant::now();
            let closed = self.inner.closed.lock().expect("closed lock");
            closed.values().any(|c| c.next <= now)
        };
        if retry {
            self.reconcile_listeners(&self.inner.services.load(), false);
        }
        for rt in self.inner.services.load().values() {
            let spec = rt.spec.load();
            for (be, _) in rt.status_backends() {
                be.metrics
                    .set_breaker(be.breaker(spec.circuit_breaker.max_connections));
            }
            rt.panic_gauge
                .set(i64::from(rt.panic.load(Ordering::Relaxed)));
        }
    }

    fn publish_health(&self, tx: &watch::Sender<Arc<HealthView>>) {
        let mut view = HealthView::new();
        for rt in self.inner.services.load().values() {
            rt.health_view(&mut view);
        }
        let sent = tx.send_if_modified(|cur| {
            if **cur == view {
                false
            } else {
                *cur = Arc::new(view);
                true
            }
        });
        if sent {
            // its stamp splits a health change's latency (tests/kernel_path.rs)
            tracing::debug!("health view published");
        }
    }

    /// The current health of every backend (what `run` publishes).
    pub fn health(&self) -> HealthView {
        let mut view = HealthView::new();
        for rt in self.inner.services.load().values() {
            rt.health_view(&mut view);
        }
        view
    }

    /// Live status of one service's backends (health, breaker, counters), if it is running.
    /// VIP owners are left `None` with an empty reason: the caller merges ownership.
    pub fn service_status(&self, service: &str) -> Option<ServiceStatus> {
        let services = self.inner.services.load();
        let rt = services.get(service)?;
        let spec = rt.spec.load();
        let max = spec.circuit_breaker.max_connections;
        let (path, path_reason) = spec.path(self.inner.opts.kernel_path);
        let backends = rt
            .status_backends()
            .into_iter()
            .map(|(b, draining)| BackendStatus {
                name: b.name.clone(),
                address: b.address,
                weight: b.weight.load(Ordering::Relaxed),
                health: b.health(),
                breaker: b.breaker(max),
                ejected: b.is_ejected_now(),
                draining,
                active_connections: u64::from(b.active.load(Ordering::Relaxed)),
                total_connections: b.total.load(Ordering::Relaxed),
                connect_failures: b.failures.load(Ordering::Relaxed),
                bytes_to_backend: b.metrics.bytes_to_backend.get(),
                bytes_to_client: b.metrics.bytes_to_client.get(),
            })
            .collect();
        Some(ServiceStatus {
            name: rt.name.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| PortStatus {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol,
                })
                .collect(),
            vips: spec
                .vips
                .iter()
                .map(|v| VipStatus {
                    address: *v,
                    owner: None,
                    reason: String::new(),
                    conflicts: 0,
                })
                .collect(),
            backends,
            panic_mode: rt.panic.load(Ordering::Relaxed),
            path,
            path_reason: path_reason.to_string(),
        })
    }

    /// Whether a backend's health is currently `health` (test helper for polling).
    pub fn backend_health(&self, service: &str, backend: &str) -> Option<Health> {
        let services = self.inner.services.load();
        let rt = services.get(service)?;
        let set = rt.set.load();
        set.backends
            .iter()
            .find(|b| b.name == backend)
            .map(|b| b.health())
    }
}

impl Error {
    fn source_text(&self) -> String {
        match self {
            Error::Listen { source, .. } => source.to_string(),
        }
    }
}

/// Whether `ip` is an address of this host (binding to it without `IP_FREEBIND` succeeds).
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
