//! The BGP speaker: every configured peer as one session (the pure [`crate::session`] state
//! machine under its tokio [`crate::driver`]), announcing the same routes to each, with an
//! optional BFD session per peer whose Down tears the BGP session down at once.
//!
//! The caller hands in the peers and the routes as `watch` channels (both change live) and a
//! [`Binder`] that opens the sockets: library code never binds fixed addresses by itself.
//! [`SystemBinder`] is the production one (TCP to the peer from its source address with TCP
//! MD5 and the TTL rules, the passive listener, the BFD sockets); tests inject their own
//! addresses and ports.

mod bfd;
pub mod metrics;
pub mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Prefix;
use crate::bfd::State as BfdState;
use crate::driver::{self, Connector};
use crate::session::{self, Session, State};
use metrics::{BGP_STATES, Metrics, PeerLabels};
pub use net::{Binder, SystemBinder};

/// The default hold time proposed (RFC 4271 suggests 90 s).
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
/// The default graceful-restart time advertised (RFC 4724).
pub const DEFAULT_RESTART_TIME: Duration = Duration::from_secs(120);
/// The BGP port.
pub const BGP_PORT: u16 = 179;

/// One configured BGP neighbour.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Name for logs, metrics labels and status.
    pub name: String,
    /// The neighbour's address.
    pub address: IpAddr,
    /// The neighbour's port (179).
    pub port: u16,
    /// This speaker's AS.
    pub local_asn: u32,
    /// The neighbour's AS (equal to `local_asn`: iBGP).
    pub remote_asn: u32,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Bind address of the TCP session (and of BFD); also the next hop announced.
    pub source: Option<IpAddr>,
    /// TCP MD5 signature password (RFC 2385).
    pub password: Option<String>,
    /// Hold time proposed: zero, or 3 s and more.
    pub hold_time: Duration,
    /// Only accept the neighbour's connection, never connect.
    pub passive: bool,
    /// `None`: single hop (BFD RFC 5881, TTL 255); `Some(ttl)`: multihop (BFD RFC 5883).
    pub multihop: Option<u8>,
    /// BFD timers; `None`: no BFD.
    pub bfd: Option<BfdTimers>,
    /// Graceful-restart time advertised (RFC 4724); `None`: no graceful restart.
    pub graceful_restart: Option<Duration>,
}

impl PeerConfig {
    /// A peer with the defaults: port 179, hold time 90 s, active, single hop, no BFD, no
    /// password, graceful restart 120 s.
    pub fn new(
        name: impl Into<String>,
        address: IpAddr,
        local_asn: u32,
        remote_asn: u32,
        router_id: Ipv4Addr,
    ) -> Self {
        Self {
            name: name.into(),
            address,
            port: BGP_PORT,
            local_asn,
            remote_asn,
            router_id,
            source: None,
            password: None,
            hold_time: DEFAULT_HOLD_TIME,
            passive: false,
            multihop: None,
            bfd: None,
            graceful_restart: Some(DEFAULT_RESTART_TIME),
        }
    }

    /// Whether this is an iBGP session.
    pub fn ibgp(&self) -> bool {
        self.local_asn == self.remote_asn
    }
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("local_asn", &self.local_asn)
            .field("remote_asn", &self.remote_asn)
            .field("router_id", &self.router_id)
            .field("source", &self.source)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hold_time", &self.hold_time)
            .field("passive", &self.passive)
            .field("multihop", &self.multihop)
            .field("bfd", &self.bfd)
            .field("graceful_restart", &self.graceful_restart)
            .finish()
    }
}

/// BFD timers of a peer: the transmit and receive interval, and the detect multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdTimers {
    /// Desired minimum transmit and required minimum receive interval.
    pub interval: Duration,
    /// Detect multiplier.
    pub multiplier: u8,
}

impl BfdTimers {
    /// 300 ms × 3 (FRR's and BIRD's default).
    pub const DEFAULT: BfdTimers = BfdTimers {
        interval: Duration::from_millis(300),
        multiplier: 3,
    };
    /// 10 ms × 3: the fast profile.
    pub const FAST: BfdTimers = BfdTimers {
        interval: Duration::from_millis(10),
        multiplier: 3,
    };
}

impl Default for BfdTimers {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Attributes of one announced route.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// Communities (RFC 1997).
    pub communities: Vec<u32>,
    /// Large communities (RFC 8092): global administrator, local data 1, local data 2.
    pub large_communities: Vec<[u32; 3]>,
    /// LOCAL_PREF (sent on iBGP sessions only; 100 when `None`).
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// The peers (by [`PeerConfig::name`]) the route goes to; `None`: every peer. A session
    /// whose peer is not in the set never gets the route (and withdraws it when the set
    /// changes).
    pub peers: Option<BTreeSet<String>>,
}

/// The routes announced: host routes /32 and /128 (aggregation may give shorter ones).
pub type Routes = BTreeMap<Prefix, RouteAttrs>;

/// Per session, for `/status` and `portico status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    /// The peer's name.
    pub peer: String,
    /// The peer's address.
    pub address: IpAddr,
    /// `idle`, `connect`, `openSent`, `openConfirm` or `established`.
    pub state: &'static str,
    /// When the session entered its current state.
    pub since: Option<SystemTime>,
    /// Routes the peer has from us.
    pub prefixes_sent: usize,
    /// UPDATE messages sent.
    pub updates_sent: u64,
    /// Times the session left Established.
    pub flaps: u64,
    /// The reason word (and detail) of the last time it went down.
    pub last_error: Option<String>,
    /// BFD state (`down`, `init`, `up`, `adminDown`); `None` without BFD.
    pub bfd: Option<&'static str>,
}

/// Errors of the speaker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener for passive peers could not be opened.
    #[error("BGP listener {addr}: {source} (is another BGP daemon running, or the port taken?)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A BFD socket could not be opened.
    #[error("BFD socket {addr}: {source}")]
    Bfd {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One peer as the speaker runs it.
struct Running {
    cfg: PeerConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Connections accepted for a passive peer.
    accept: Option<mpsc::Sender<TcpStream>>,
}

/// What `sessions()` reads.
struct Entry {
    cfg: PeerConfig,
    status: watch::Receiver<driver::Status>,
    bfd: Option<watch::Receiver<BfdState>>,
}

/// Shared state behind a [`Speaker`].
struct Inner {
    binder: Arc<dyn Binder>,
    metrics: Metrics,
    entries: Mutex<Vec<Entry>>,
    routes: Mutex<Option<watch::Receiver<Arc<Routes>>>>,
}

/// The speaker. Cheap to clone.
#[derive(Clone)]
pub struct Speaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Speaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Speaker")
            .field("sessions", &self.sessions())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state word of a BGP session.
pub fn state_word(s: State) -> &'static str {
    match s {
        State::Idle => "idle",
        State::Connect => "connect",
        State::OpenSent => "openSent",
        State::OpenConfirm => "openConfirm",
        State::Established => "established",
    }
}

/// The session's configuration from the peer's.
fn session_config(p: &PeerConfig) -> session::Config {
    let hold = u16::try_from(p.hold_time.as_secs()).unwrap_or(u16::MAX);
    session::Config {
        local_as: p.local_asn,
        peer_as: p.remote_asn,
        router_id: p.router_id,
        // RFC 4271 §4.2: zero, or at least three seconds.
        hold_time: if hold == 0 { 0 } else { hold.max(3) },
        next_hop_v4: match p.source {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        },
        next_hop_v6: match p.source {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        },
        communities: Vec::new(),
        local_pref: None,
        name: p.name.clone(),
        restart_time: p
            .graceful_restart
            .map(|d| u16::try_from(d.as_secs().min(4095)).unwrap_or(4095)),
    }
}

impl Speaker {
    /// Registers the `portico_bgp_*` metrics (per session: state, updates sent, flaps,
    /// prefixes sent; BFD state and transitions) and uses the system's sockets
    /// ([`SystemBinder::default`]: the listener for passive peers on port 179, BFD on 3784 and
    /// 4784).
    pub fn new(registry: &mut Registry) -> Self {
        Self::with_binder(registry, Arc::new(SystemBinder::default()))
    }

    /// As [`Speaker::new`], opening sockets through `binder`.
    pub fn with_binder(registry: &mut Registry, binder: Arc<dyn Binder>) -> Self {
        Self {
            inner: Arc::new(Inner {
                binder,
                metrics: Metrics::register(registry),
                entries: Mutex::new(Vec::new()),
                routes: Mutex::new(None),
            }),
        }
    }

    /// Runs every peer in `peers` (added, removed or changed live), announcing `routes` to
    /// each (next hop: the peer's `source`, else the session's local address), until
    /// `shutdown`; then sends a Cease to each, takes BFD AdminDown and closes. A listener is
    /// opened only while some peer is passive; when it cannot be, the passive peers wait and
    /// it is tried again every 5 s.
    pub async fn run(
        &self,
        mut peers: watch::Receiver<Arc<Vec<PeerConfig>>>,
        routes: watch::Receiver<Arc<Routes>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        *lock(&self.inner.routes) = Some(routes.clone());
        let (bfd_tx, bfd_rx) = mpsc::channel(64);
        let bfd_stop = CancellationToken::new();
        let bfd_task = tokio::spawn(bfd::run(
            self.inner.binder.clone(),
            self.inner.metrics.clone(),
            bfd_rx,
            bfd_stop.clone(),
        ));
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut listeners = Listeners::default();
        let mut peers_open = true;
        loop {
            let want = peers.borrow_and_update().clone();
            self.reconcile(&want, &mut running, &routes, &bfd_tx).await;
            listeners.ensure(&self.inner.binder, &want);
            let retry = listeners.retry;
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = peers.changed(), if peers_open => {
                    if r.is_err() {
                        peers_open = false;
                    }
                }
                a = accept(listeners.v4.as_ref()) => self.dispatch(a, &running),
                a = accept(listeners.v6.as_ref()) => self.dispatch(a, &running),
                () = async {
                    match retry {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => listeners.retry = None,
            }
        }
        for r in running.values() {
            r.stop.cancel();
        }
        for (_, r) in running {
            let _ = r.task.await;
        }
        bfd_stop.cancel();
        let _ = bfd_task.await;
        Ok(())
    }

    /// Starts, stops and restarts sessions to match `want`.
    async fn reconcile(
        &self,
        want: &[PeerConfig],
        running: &mut BTreeMap<String, Running>,
        routes: &watch::Receiver<Arc<Routes>>,
        bfd_tx: &mpsc::Sender<bfd::Cmd>,
    ) {
        let mut seen = std::collections::BTreeSet::new();
        let want: Vec<&PeerConfig> = want
            .iter()
            .filter(|p| {
                let fresh = seen.insert(p.name.clone());
                if !fresh {
                    tracing::warn!(peer = %p.name, "a second BGP peer with this name is ignored");
                }
                fresh
            })
            .collect();
        let mut changed = false;
        let gone: Vec<String> = running
            .iter()
            .filter(|(n, r)| !want.iter().any(|p| &p.name == *n && **p == r.cfg))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(r) = running.remove(&n) {
                changed = true;
                tracing::info!(peer = %n, "BGP peer removed or changed: stopping its session");
                r.stop.cancel();
                let _ = r.task.await;
                if r.cfg.bfd.is_some() {
                    let _ = bfd_tx.send(bfd::Cmd::Remove(n.clone())).await;
                }
                if !want.iter().any(|p| p.name == n) {
                    self.inner.metrics.forget(&n);
                }
            }
        }
        let mut entries_new = Vec::new();
        for p in &want {
            if !running.contains_key(&p.name) {
                changed = true;
                let (r, entry) = self.start((*p).clone(), routes.clone(), bfd_tx).await;
                running.insert(p.name.clone(), r);
                entries_new.push(entry);
            }
        }
        if changed {
            let mut entries = lock(&self.inner.entries);
            let mut old: Vec<Entry> = std::mem::take(&mut *entries);
            old.extend(entries_new);
            for p in &want {
                if let Some(i) = old.iter().position(|e| e.cfg == **p) {
                    entries.push(old.swap_remove(i));
                }
            }
        }
    }

    async fn start(
        &self,
        cfg: PeerConfig,
        routes: watch::Receiver<Arc<Routes>>,
        bfd_tx: &mpsc::Sender<bfd::Cmd>,
    ) -> (Running, Entry) {
        let (status_tx, status_rx) = watch::channel(driver::Status::default());
        let (down_tx, down_rx) = watch::channel(false);
        let mut keep_down_tx = None;
        let bfd_state = if cfg.bfd.is_some() {
            let (tx, rx) = watch::channel(BfdState::Down);
            let _ = bfd_tx
                .send(bfd::Cmd::Add {
                    cfg: cfg.clone(),
                    down: down_tx,
                    state: tx,
                })
                .await;
            Some(rx)
        } else {
            keep_down_tx = Some(down_tx);
            None
        };
        let (accept, connect): (_, Connector) = if cfg.passive {
            let (tx, rx) = mpsc::channel::<TcpStream>(1);
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            (
                Some(tx),
                Box::new(move || {
                    let rx = rx.clone();
                    Box::pin(async move {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(s) => {
                                let local = s.local_addr().ok().map(|a| a.ip());
                                Ok((Box::new(s) as Box<dyn driver::Stream>, local))
                            }
                            None => std::future::pending().await,
                        }
                    })
                }),
            )
        } else {
            let binder = self.inner.binder.clone();
            let c = cfg.clone();
            (None, Box::new(move || binder.connect(&c)))
        };
        let stop = CancellationToken::new();
        let session = Session::new(session_config(&cfg));
        let metrics = self.inner.metrics.clone();
        let name = cfg.name.clone();
        let follow = status_rx.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let drive = driver::run(session, connect, routes, down_rx, status_tx, stop);
                tokio::join!(drive, follow_status(name, follow, metrics));
                drop(keep_down_tx);
            }
        });
        tracing::info!(peer = %cfg.name, address = %cfg.address, passive = cfg.passive,
            bfd = cfg.bfd.is_some(), "BGP peer started");
        let entry = Entry {
            cfg: cfg.clone(),
            status: status_rx,
            bfd: bfd_state,
        };
        (
            Running {
                cfg,
                stop,
                task,
                accept,
            },
            entry,
        )
    }

    /// Hands an accepted connection to its passive peer, or closes it.
    fn dispatch(
        &self,
        accepted: std::io::Result<(TcpStream, SocketAddr)>,
        running: &BTreeMap<String, Running>,
    ) {
        let (stream, from) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "BGP accept failed");
                return;
            }
        };
        let ip = from.ip().to_canonical();
        let reason = match running.values().find(|r| r.cfg.address == ip) {
            None => "unknownPeer",
            Some(r) => match &r.accept {
                None => "notPassive",
                Some(tx) => match tx.try_send(stream) {
                    Ok(()) => return,
                    Err(_) => "busy",
                },
            },
        };
        tracing::info!(from = %from, reason, "incoming BGP connection closed");
        Metrics::count(&self.inner.metrics.refused, reason);
    }

    /// Per session, in the order of the peers.
    pub fn sessions(&self) -> Vec<SessionStatus> {
        lock(&self.inner.entries)
            .iter()
            .map(|e| {
                let st = e.status.borrow();
                SessionStatus {
                    peer: e.cfg.name.clone(),
                    address: e.cfg.address,
                    state: state_word(st.state),
                    since: Some(st.since),
                    prefixes_sent: st.routes,
                    updates_sent: st.updates_sent,
                    flaps: st.flaps,
                    last_error: st.last_error.clone(),
                    bfd: e.bfd.as_ref().map(|b| bfd::word(*b.borrow())),
                }
            })
            .collect()
    }

    /// True when every Established session has written everything in the current routes to its
    /// socket: a graceful stop waits for this, then a grace, before draining.
    pub fn in_sync(&self) -> bool {
        let Some(routes) = lock(&self.inner.routes)
            .as_ref()
            .map(|r| r.borrow().clone())
        else {
            return true;
        };
        lock(&self.inner.entries).iter().all(|e| {
            let st = e.status.borrow();
            st.state != State::Established
                || st.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &routes))
        })
    }
}

/// Keeps a session's metrics in step with its status until the driver ends.
async fn follow_status(name: String, mut st: watch::Receiver<driver::Status>, m: Metrics) {
    let labels = PeerLabels { peer: name.clone() };
    let (mut updates, mut flaps) = (0u64, 0u64);
    loop {
        {
            let s = st.borrow_and_update();
            Metrics::set_state(&m.state, &BGP_STATES, &name, state_word(s.state));
            m.prefixes_sent
                .get_or_create(&labels)
                .set(i64::try_from(s.routes).unwrap_or(i64::MAX));
            m.updates_sent
                .get_or_create(&labels)
                .inc_by(s.updates_sent.saturating_sub(updates));
            m.flaps
                .get_or_create(&labels)
                .inc_by(s.flaps.saturating_sub(flaps));
            (updates, flaps) = (s.updates_sent, s.flaps);
        }
        if st.changed().await.is_err() {
            return;
        }
    }
}

/// The listeners for passive peers and the MD5 keys set on them.
#[derive(Default)]
struct Listeners {
    v4: Option<TcpListener>,
    v6: Option<TcpListener>,
    /// Keys set, by peer address (to remove those of peers that left).
    keyed: BTreeMap<IpAddr, String>,
    /// When to try again after a failure.
    retry: Option<Instant>,
}

impl Listeners {
    fn ensure(&mut self, binder: &Arc<dyn Binder>, want: &[PeerConfig]) {
        let passive: Vec<&PeerConfig> = want.iter().filter(|p| p.passive).collect();
        if self.retry.is_none() {
            for v6 in [false, true] {
                let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
                if slot.is_none() && passive.iter().any(|p| p.address.is_ipv6() == v6) {
                    match binder.listen(v6) {
                        Ok(l) => {
                            tracing::info!(addr = ?l.local_addr().ok(), "BGP listener open");
                            *slot = Some(l);
                            self.keyed.clear();
                        }
                        Err(e) => {
                            tracing::warn!(v6, error = %e, reason = "listenFailed",
                                "cannot open the BGP listener for passive peers (is another BGP \
                                 daemon on the port?); trying again in 5 s");
                            self.retry = Some(Instant::now() + Duration::from_secs(5));
                        }
                    }
                }
            }
        }
        // TCP MD5 keys on the listener, per passive peer (accepted sockets inherit them).
        let mut keys: BTreeMap<IpAddr, String> = BTreeMap::new();
        for p in &passive {
            if let Some(pw) = &p.password {
                keys.insert(p.address, pw.clone());
            }
        }
        let stale: Vec<IpAddr> = self
            .keyed
            .keys()
            .filter(|a| !keys.contains_key(a))
            .copied()
            .collect();
        for a in stale {
            self.keyed.remove(&a);
            if let Some(l) = if a.is_ipv6() { &self.v6 } else { &self.v4 } {
                let _ = sys::tcp_md5::set_tcp_md5(l, a, b"");
            }
        }
        for (a, pw) in keys {
            if self.keyed.get(&a) == Some(&pw) {
                continue;
            }
            if let Some(l) = if a.is_ipv6() { &self.v6 } else { &self.v4 } {
                match sys::tcp_md5::set_tcp_md5(l, a, pw.as_bytes()) {
                    Ok(()) => {
                        self.keyed.insert(a, pw);
                    }
                    Err(e) => tracing::warn!(peer = %a, error = %e, reason = "md5Failed",
                        "cannot set the TCP MD5 password on the BGP listener"),
                }
            }
        }
    }
}

async fn accept(l: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
