//! Node agent: gossip membership, VIP ownership, L2 announcement.
//!
//! # Layout (pure cores, then the tokio driver)
//! - [`owner`]: who owns each VIP, a pure function (rendezvous homes, incumbency, hold-down).
//! - [`seal`]: the authenticated, encrypted gossip envelope with replay protection.
//! - [`wire`]: the direct heartbeat body; [`members`]: liveness from heartbeats.
//! - [`swim`]: SWIM membership through `foca` (identity, collecting runtime, timer queue).
//! - [`frames`]: ARP / NDP frames; [`announce`]: the per-interface L2 announcer;
//!   [`handover`]: forwarding of in-flight connections to the previous owner after a takeover.
//! - [`Agent::run`]: the driver tying them to one UDP socket and the spine's watch channels.
//!
//! # Why a direct heartbeat next to SWIM
//! SWIM detects a failure after a probe period, a probe timeout, indirect probes and a
//! suspicion timeout: with memberlist's LAN settings that is seconds, and even squeezed to the
//! limit it cannot reliably go below a few hundred milliseconds without making every member
//! probe every other one, which is a heartbeat anyway. The failover targets (300 ms by default,
//! 50 ms in the fast profile) therefore come from a BFD-like direct heartbeat: every node sends
//! a small sealed packet to every configured peer (any of them may be the next owner of any VIP)
//! every `interval`, and declares a peer dead after `misses` intervals of silence. The
//! heartbeat also carries what the owner function needs from each node (its claims, address
//! families and healthy local-only services), so every node decides from the same facts. SWIM
//! (foca) still runs on the same socket for membership: joining, gossiping who exists and
//! graceful leaves, and status. Profiles: `default` 40 ms × 4 misses (dead after 160 ms,
//! 25 heartbeats/s to each peer), `fast` 10 ms × 3 (dead after 30 ms, 100/s to each peer).
//! Before acting on an expiry the driver first reads every packet already queued on the
//! socket, so a stall of the agent itself does not declare live peers dead.

pub mod announce;
pub mod frames;
pub mod handover;
pub mod members;
pub mod owner;
pub mod seal;
pub mod swim;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::{
    Config, Desired, FailureProfile, HealthView, MemberStatus, OwnershipView, VipOwnership,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::announce::Mode;
use crate::owner::{Facts, MemberView, Reason};
use crate::seal::Kind;
use crate::wire::Heartbeat;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Gossip socket I/O failed.
    #[error("gossip socket")]
    Io(#[from] std::io::Error),
    /// Announcing on an interface cannot be set up (raw sockets, sysctls).
    #[error("cannot announce VIPs on {iface}")]
    Announce {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: announce::Error,
    },
    /// Peers are configured but no cluster key.
    #[error("cluster.peers are configured but cluster.keys is empty: gossip must be authenticated")]
    NoKey,
}

/// Failure-detection timing of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// Heartbeat interval.
    pub interval: Duration,
    /// Missed heartbeats before a peer is dead.
    pub misses: u32,
}

impl Detection {
    /// The timing of a profile.
    pub fn of(p: FailureProfile) -> Self {
        match p {
            FailureProfile::Default => Detection {
                interval: Duration::from_millis(40),
                misses: 4,
            },
            FailureProfile::Fast => Detection {
                interval: Duration::from_millis(10),
                misses: 3,
            },
        }
    }

    /// Silence after which a peer is dead.
    pub fn dead_after(&self) -> Duration {
        self.interval * self.misses
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Default)]
struct Metrics {
    sent_packets: Family<KindLabel, Counter>,
    sent_bytes: Family<KindLabel, Counter>,
    received_packets: Family<KindLabel, Counter>,
    dropped: Family<ReasonLabel, Counter>,
    takeovers: Counter,
    releases: Counter,
    owned: Gauge,
    alive: Gauge,
    handover_windows: Counter,
    handover_off: Gauge,
}

#[derive(Default)]
struct Inner {
    metrics: Metrics,
    members: Mutex<Vec<MemberStatus>>,
    conflicts: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
    stats: Mutex<Stats>,
}

/// Opens the gossip socket on `cluster.bind` when peers appear after start (a reload that adds
/// the first peers; in Kubernetes the peers come from Node objects listed after the first
/// desired state). Injected by the binary, so that library code never binds by itself.
pub type GossipBinder = Arc<dyn Fn(SocketAddr) -> std::io::Result<UdpSocket> + Send + Sync>;

/// The binder the binary uses: a plain non-blocking UDP socket on `addr`.
pub fn udp_binder() -> GossipBinder {
    Arc::new(|addr| {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    })
}

/// Gossip counters for reports (the lab prints them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets sent.
    pub sent_packets: u64,
    /// Bytes sent (UDP payload).
    pub sent_bytes: u64,
    /// Packets dropped (authentication, replay, malformed).
    pub dropped: u64,
}

/// The agent: membership, ownership decisions and announcement.
#[derive(Clone, Default)]
pub struct Agent {
    inner: Arc<Inner>,
    dry_run: bool,
    binder: Option<GossipBinder>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent(dry_run: {})", self.dry_run)
    }
}

impl Agent {
    /// Creates an agent whose metrics live in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let a = Self::default();
        let m = &a.inner.metrics;
        let r = registry.sub_registry_with_prefix("portico_agent");
        r.register(
            "gossip_sent_packets",
            "Gossip packets sent, by kind",
            m.sent_packets.clone(),
        );
        r.register(
            "gossip_sent_bytes",
            "Gossip bytes sent (UDP payload), by kind",
            m.sent_bytes.clone(),
        );
        r.register(
            "gossip_received_packets",
            "Gossip packets accepted, by kind",
            m.received_packets.clone(),
        );
        r.register(
            "gossip_dropped_packets",
            "Gossip packets dropped, by reason (auth, replay, ...)",
            m.dropped.clone(),
        );
        r.register(
            "vip_takeovers",
            "VIPs this node started announcing",
            m.takeovers.clone(),
        );
        r.register(
            "vip_releases",
            "VIPs this node stopped announcing",
            m.releases.clone(),
        );
        r.register(
            "handover_windows",
            "Takeovers from a live node whose in-flight connections were forwarded to it",
            m.handover_windows.clone(),
        );
        r.register(
            "handover_forwarding_off",
            "1 when in-flight connections cannot be forwarded on handover (no usable nft)",
            m.handover_off.clone(),
        );
        r.register("vips_owned", "VIPs this node announces", m.owned.clone());
        r.register(
            "members_alive",
            "Alive members, this node included",
            m.alive.clone(),
        );
        a
    }

    /// Decides and publishes ownership but never touches the network stack (no raw sockets,
    /// no addresses on `lo`): for tests and `portico check`-like dry runs.
    pub fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }

    /// Lets the agent open its gossip socket itself when peers appear later than start.
    pub fn with_binder(mut self, binder: GossipBinder) -> Self {
        self.binder = Some(binder);
        self
    }

    /// Cluster members as this node sees them.
    pub fn members(&self) -> Vec<MemberStatus> {
        self.inner
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Conflicting MAC answers seen for an owned VIP.
    pub fn conflicts(&self, vip: IpAddr) -> u64 {
        self.inner
            .conflicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vip)
            .copied()
            .unwrap_or(0)
    }

    /// Gossip counters so far.
    pub fn stats(&self) -> Stats {
        *self.inner.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `shutdown`: gossips on `socket`, decides owners for every VIP in `desired`
    /// (using backend `health` for local-only services), announces owned VIPs, and publishes
    /// decisions to `ownership`. On shutdown it leaves the cluster gracefully first.
    pub async fn run(
        &self,
        socket: Option<UdpSocket>,
        desired: watch::Receiver<Arc<Desired>>,
        health: watch::Receiver<Arc<HealthView>>,
        ownership: watch::Sender<Arc<OwnershipView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let mut d = Driver::new(self.clone(), socket, desired, health, ownership)?;
        let r = d.run(shutdown).await;
        d.finish().await;
        r
    }
}

fn epoch_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// Facts about this node: address families of its interfaces and healthy local-only services.
pub fn local_facts(cfg: &Config, health: &HealthView) -> Facts {
    let me = &cfg.node.name;
    let serving = cfg
        .services
        .iter()
        .filter(|s| s.placement.local_only)
        .filter(|s| {
            s.backends.iter().any(|b| {
                let h = health
                    .get(&model::BackendKey::new(&s.name, &b.name))
                    .copied()
                    .unwrap_or_default();
                // A local backend must have passed a check: one never checked yet (or one that
                // does not exist) must not win the VIP from a node whose backend is up. Without
                // an active check, health is never known and not-down is all there is.
                let serving = match s.health_check {
                    Some(_) => h == model::Health::Up,
                    None => h.is_serving(),
                };
                b.node.as_ref() == Some(me) && serving
            })
        })
        .map(|s| s.name.clone())
        .collect();
    // A node with no announcing interface is a standalone single node (peers require an
    // interface): it serves every VIP it is given locally, announcing nothing.
    // With peers but no interface (a Kubernetes node whose InternalIP is on no interface here)
    // it could not announce what it owns: it is eligible for nothing.
    let standalone = cfg.node.interfaces.is_empty() && cfg.cluster.peers.is_empty();
    let has = |v4: bool| {
        standalone
            || cfg
                .node
                .interfaces
                .iter()
                .any(|i| i.addresses.iter().any(|a| a.addr().is_ipv4() == v4))
    };
    Facts {
        v4: has(true),
        v6: has(false),
        serving,
    }
}

/// The interface a VIP is announced on: the one whose subnet contains it, else the first with
/// an address of its family.
pub fn interface_for(cfg: &Config, vip: IpAddr) -> Option<&str> {
    let ifs = &cfg.node.interfaces;
    ifs.iter()
        .find(|i| i.addresses.iter().any(|n| n.contains(&vip)))
        .or_else(|| ifs.iter().find(|i| i.serves_family(vip)))
        .map(|i| i.name.as_str())
}

/// One interface's announcer: what it should announce, and its task.
type L2Task = (watch::Sender<announce::Want>, tokio::task::JoinHandle<()>);

struct Driver {
    agent: Agent,
    socket: Option<UdpSocket>,
    desired: watch::Receiver<Arc<Desired>>,
    health: watch::Receiver<Arc<HealthView>>,
    ownership: watch::Sender<Arc<OwnershipView>>,
    cfg: Arc<Config>,
    det: Detection,
    sealer: seal::Sealer,
    opener: seal::Opener,
    table: members::Table,
    swim: Option<swim::Swim>,
    start: Instant,
    epoch: u64,
    settled: bool,
    settle_by: Instant,
    bind_failed_logged: Option<Instant>,
    cleared_stale: bool,
    l2_timing_running: Option<announce::Timing>,
    leaving: bool,
    reannounce: u64,
    last_contest: Option<Instant>,
    owned: BTreeSet<IpAddr>,
    facts: Facts,
    l2: BTreeMap<String, L2Task>,
    handover: handover::Handover,
    /// VIPs taken over from a node that still serves them, and its address there.
    from: BTreeMap<IpAddr, IpAddr>,
}

impl Driver {
    fn new(
        agent: Agent,
        socket: Option<UdpSocket>,
        desired: watch::Receiver<Arc<Desired>>,
        health: watch::Receiver<Arc<HealthView>>,
        ownership: watch::Sender<Arc<OwnershipView>>,
    ) -> Result<Self, Error> {
        let cfg = desired.borrow().config.clone();
        let c = &cfg.cluster;
        if (socket.is_some() || agent.binder.is_some()) && !c.peers.is_empty() && c.keys.is_empty()
        {
            return Err(Error::NoKey);
        }
        let det = Detection::of(c.profile);
        let epoch = epoch_now();
        let me = cfg.node.name.clone();
        let facts = local_facts(&cfg, &health.borrow());
        let m = &agent.inner.metrics;
        let handover = handover::Handover::new()
            .with_metrics(m.handover_windows.clone(), m.handover_off.clone());
        let mut d = Self {
            sealer: seal::Sealer::new(&c.keys, &me, epoch),
            opener: seal::Opener::new(&c.keys),
            table: members::Table::new(Vec::new(), det.interval, det.misses),
            swim: None,
            agent,
            socket: None,
            epoch,
            desired,
            health,
            ownership,
            det,
            start: Instant::now(),
            settled: false,
            settle_by: Instant::now(),
            bind_failed_logged: None,
            cleared_stale: false,
            l2_timing_running: None,
            leaving: false,
            reannounce: 0,
            last_contest: None,
            owned: BTreeSet::new(),
            facts,
            l2: BTreeMap::new(),
            handover,
            from: BTreeMap::new(),
            cfg,
        };
        match socket {
            Some(s) => d.attach(s),
            None => d.bind_if_needed(),
        }
        Ok(d)
    }

    /// Starts gossiping on `socket`: SWIM and the heartbeat table for the configured peers.
    fn attach(&mut self, socket: UdpSocket) {
        let c = &self.cfg.cluster;
        let id = swim::Id {
            name: self.cfg.node.name.clone(),
            addr: c.advertise,
            bump: self.epoch,
        };
        self.swim = Some(swim::Swim::new(
            id,
            swim::config(c.peers.len() + 1, c.profile == FailureProfile::Fast),
            self.epoch,
        ));
        self.socket = Some(socket);
        self.table.set_peers(
            c.peers.iter().map(|p| (p.name.clone(), p.address)),
            self.det.interval,
            self.det.misses,
        );
    }

    /// Opens the gossip socket once the configuration has peers (they may come after start:
    /// a reload, or Node objects listed later). Until it is open, peers are unknown and this
    /// node must not claim what they may own, so it stays unsettled (`settling`).
    fn bind_if_needed(&mut self) {
        if self.socket.is_some() || self.cfg.cluster.peers.is_empty() {
            return;
        }
        let Some(bind) = self.agent.binder.clone() else {
            return;
        };
        match bind(self.cfg.cluster.bind) {
            Ok(s) => {
                info!(bind = %self.cfg.cluster.bind, peers = self.cfg.cluster.peers.len(), "gossip socket open");
                // Owning nothing yet (a Kubernetes agent before Nodes were listed), listen to
                // the peers' claims before claiming; a node already serving VIPs keeps them
                // (incumbency) and tells the new peers at once.
                if self.owned.is_empty() {
                    self.settled = false;
                    self.settle_by = Instant::now() + self.settle_time();
                }
                self.attach(s);
            }
            Err(e) => {
                if self
                    .bind_failed_logged
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    warn!(bind = %self.cfg.cluster.bind, %e, reason = "gossipUnbound", "cannot open the gossip socket; retrying");
                    self.bind_failed_logged = Some(Instant::now());
                }
            }
        }
    }

    /// How long a starting node listens before claiming anything: long enough to hear every
    /// live peer's claims.
    fn settle_time(&self) -> Duration {
        (self.det.dead_after() * 3).max(Duration::from_millis(300))
    }

    /// The announcers' timing from the configuration and the failure profile.
    fn l2_timing(&self) -> announce::Timing {
        let a = &self.cfg.cluster.announce;
        announce::Timing {
            count: a.count,
            interval: a.interval,
            refresh: a.refresh,
            conflict_grace: (self.det.dead_after() + self.det.interval * 2)
                .max(Duration::from_millis(100)),
            release_grace: Duration::from_secs(1),
            reannounce_delay: self.det.dead_after() + self.det.interval,
        }
    }

    /// Opens an announcer on each of `names` (and, the first time any is opened, removes the
    /// VIPs a crashed predecessor left on `lo`).
    fn open_announcers(&mut self, names: &[String]) -> Result<(), Error> {
        if names.is_empty() {
            return Ok(());
        }
        // Only an agent that announces puts VIPs on lo, so only then can a crashed
        // predecessor have left some there.
        if !self.cleared_stale {
            self.cleared_stale = true;
            announce::clear_stale();
            let h = self.handover.clone();
            tokio::spawn(async move { h.sync().await });
        }
        let timing = self.l2_timing();
        for name in names {
            let Some(i) = self.cfg.node.interfaces.iter().find(|i| &i.name == name) else {
                continue;
            };
            let err = |source| Error::Announce {
                iface: i.name.clone(),
                source,
            };
            if i.addresses.iter().any(|a| a.addr().is_ipv4()) {
                announce::prepare_sysctls(&i.name).map_err(err)?;
            }
            let ann = announce::Announcer::open(
                &i.name,
                timing,
                self.agent.inner.conflicts.clone(),
                self.handover.clone(),
            )
            .map_err(err)?;
            let (tx, rx) = watch::channel(announce::Want::default());
            let task = tokio::spawn(ann.run(rx));
            self.l2.insert(i.name.clone(), (tx, task));
        }
        Ok(())
    }

    /// Applies changed interfaces and announcement timing live: announcers of interfaces that
    /// went away are closed, new interfaces get one, and all are reopened when the timing
    /// changed. At start it opens the first ones; in Kubernetes the interfaces arrive with the
    /// Node object, after start.
    async fn sync_l2(&mut self) -> Result<(), Error> {
        if self.agent.dry_run {
            return Ok(());
        }
        let timing = self.l2_timing();
        let want: BTreeSet<String> = self
            .cfg
            .node
            .interfaces
            .iter()
            .map(|i| i.name.clone())
            .collect();
        let retimed = self.l2_timing_running != Some(timing);
        let close: Vec<String> = self
            .l2
            .keys()
            .filter(|n| retimed || !want.contains(*n))
            .cloned()
            .collect();
        for n in &close {
            if let Some((tx, task)) = self.l2.remove(n) {
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        }
        let open: Vec<String> = want
            .into_iter()
            .filter(|n| !self.l2.contains_key(n))
            .collect();
        if !close.is_empty() || !open.is_empty() {
            info!(closed = ?close, opened = ?open, "announcing interfaces changed");
        }
        self.l2_timing_running = Some(timing);
        self.open_announcers(&open)?;
        self.push_l2(Mode::Announce);
        Ok(())
    }

    fn count_sent(&self, kind: &str, bytes: usize) {
        let m = &self.agent.inner.metrics;
        let l = KindLabel { kind: kind.into() };
        m.sent_packets.get_or_create(&l).inc();
        m.sent_bytes.get_or_create(&l).inc_by(bytes as u64);
        let mut s = self
            .agent
            .inner
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.sent_packets += 1;
        s.sent_bytes += bytes as u64;
    }

    async fn send(&mut self, kind: Kind, body: &[u8], to: SocketAddr) {
        let Some(sock) = &self.socket else { return };
        let packet = match self.sealer.seal(kind, body) {
            Ok(p) => p,
            Err(e) => {
                debug!(%e, "not sealed");
                return;
            }
        };
        match sock.send_to(&packet, to).await {
            Ok(_) => self.count_sent(
                if kind == Kind::Swim {
                    "swim"
                } else {
                    "heartbeat"
                },
                packet.len(),
            ),
            Err(e) => debug!(%to, %e, "gossip send failed"),
        }
    }

    async fn flush_swim(&mut self, out: swim::Output) {
        for (to, data) in out.send {
            let addr = self
                .table
                .peers
                .get(&to.name)
                .map(|p| p.address)
                .unwrap_or(to.addr);
            self.send(Kind::Swim, &data, addr).await;
        }
        for n in out.notes {
            debug!(?n, "swim");
        }
    }

    async fn heartbeat_all(&mut self) {
        let hb = Heartbeat {
            leaving: self.leaving,
            interval: self.det.interval,
            facts: self.facts.clone(),
            claims: if self.leaving {
                BTreeSet::new()
            } else {
                self.owned.clone()
            },
        };
        let body = hb.encode();
        let peers: Vec<SocketAddr> = self.table.peers.values().map(|p| p.address).collect();
        for p in peers {
            self.send(Kind::Heartbeat, &body, p).await;
        }
    }

    fn self_alive_for(&self, now: Instant) -> Duration {
        let mut d = now.saturating_duration_since(self.start);
        for p in self.table.peers.keys() {
            if self.table.alive(p, now)
                && let Some(since) = self.table.peers[p].since
            {
                d = d.min(now.saturating_duration_since(since));
            }
        }
        d
    }

    /// Recomputes ownership; returns whether our claims changed.
    fn decide(&mut self, now: Instant) -> bool {
        let cfg = self.cfg.clone();
        let me = cfg.node.name.clone();
        let mut alive = self.table.views(now);
        if !self.leaving {
            alive.insert(
                me.clone(),
                MemberView {
                    alive_for: self.self_alive_for(now),
                    facts: self.facts.clone(),
                    claims: self.owned.clone(),
                },
            );
        }
        let nodes: BTreeSet<String> = std::iter::once(me.clone())
            .chain(self.table.peers.keys().cloned())
            .collect();
        let inputs = owner::Inputs {
            me: &me,
            nodes: &nodes,
            services: &cfg.services,
            alive: &alive,
            preemptive: cfg.cluster.preemptive,
            hold_down: cfg.cluster.hold_down,
        };
        let decisions = owner::decide(&inputs);
        let owned: BTreeSet<IpAddr> = if self.settled && !self.leaving {
            decisions
                .iter()
                .filter(|(_, d)| d.reason == Reason::Owner)
                .map(|(v, _)| *v)
                .collect()
        } else {
            BTreeSet::new()
        };
        let view: OwnershipView = decisions
            .iter()
            .map(|(v, d)| {
                let reason = if d.reason == Reason::Owner && !owned.contains(v) {
                    "settling"
                } else {
                    d.reason.as_str()
                };
                (
                    *v,
                    VipOwnership {
                        owner: d.owner.clone(),
                        reason: reason.to_string(),
                    },
                )
            })
            .collect();
        self.ownership.send_if_modified(|cur| {
            if **cur == view {
                false
            } else {
                *cur = Arc::new(view);
                true
            }
        });
        let mut members = vec![MemberStatus {
            name: me.clone(),
            address: cfg.cluster.advertise,
            state: if self.leaving { "leaving" } else { "alive" }.into(),
        }];
        members.extend(
            self.table
                .states(now)
                .into_iter()
                .map(|(name, address, state)| MemberStatus {
                    name,
                    address,
                    state: state.into(),
                }),
        );
        self.agent
            .inner
            .metrics
            .alive
            .set(members.iter().filter(|m| m.state != "down").count() as i64);
        *self
            .agent
            .inner
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = members;
        if owned == self.owned {
            return false;
        }
        // One INFO line per VIP per move on each side (the announcer and the handover log
        // their details at debug level).
        for v in owned.difference(&self.owned) {
            self.agent.inner.metrics.takeovers.inc();
            let forward_to = self.handover_source(v, now);
            if let Some(to) = forward_to {
                self.from.insert(*v, to);
            }
            let iface = interface_for(&cfg, *v).unwrap_or("-");
            match forward_to {
                Some(to) => {
                    info!(vip = %v, %iface, reason = "owner", previous = %to, "took over (in-flight connections forwarded to the previous owner)")
                }
                None => info!(vip = %v, %iface, reason = "owner", "took over"),
            }
        }
        for v in self.owned.difference(&owned) {
            let reason = decisions.get(v).map_or("removed", |d| d.reason.as_str());
            let to = decisions
                .get(v)
                .and_then(|d| d.owner.clone())
                .unwrap_or_default();
            info!(vip = %v, reason, new_owner = %to, "released");
            self.agent.inner.metrics.releases.inc();
        }
        self.from.retain(|v, _| owned.contains(v));
        self.owned = owned;
        self.agent.inner.metrics.owned.set(self.owned.len() as i64);
        self.push_l2(Mode::Announce);
        true
    }

    /// Where in-flight connections of `vip` go while we take it over: the previous owner's
    /// address, when it is still heard from and that address is on the VIP's interface.
    fn handover_source(&self, vip: &IpAddr, now: Instant) -> Option<IpAddr> {
        let (node, addr) = self.table.handing_over(vip, now)?;
        let to = addr.ip();
        let iface = interface_for(&self.cfg, *vip)?;
        let on_link = self
            .cfg
            .node
            .interfaces
            .iter()
            .any(|i| i.name == iface && i.addresses.iter().any(|n| n.contains(&to)));
        if to.is_ipv4() != vip.is_ipv4() || !on_link {
            debug!(%vip, %node, %to, "previous owner not reachable on the VIP's link: no forwarding");
            return None;
        }
        Some(to)
    }

    fn push_l2(&self, mode: Mode) {
        let mut per_if: BTreeMap<&str, announce::Want> = self
            .l2
            .keys()
            .map(|k| {
                (
                    k.as_str(),
                    announce::Want {
                        vips: BTreeMap::new(),
                        reannounce: self.reannounce,
                        from: BTreeMap::new(),
                    },
                )
            })
            .collect();
        for v in &self.owned {
            if let Some(i) = interface_for(&self.cfg, *v)
                && let Some(m) = per_if.get_mut(i)
            {
                m.vips.insert(*v, mode);
                if let Some(to) = self.from.get(v) {
                    m.from.insert(*v, *to);
                }
            }
        }
        for (i, m) in per_if {
            if let Some((tx, _)) = self.l2.get(i) {
                tx.send_if_modified(|cur| {
                    if *cur == m {
                        false
                    } else {
                        *cur = m;
                        true
                    }
                });
            }
        }
    }

    /// A peer claims a VIP we own (it stood in during a flap or a partition and has not yet
    /// seen our claim): it will release on our next heartbeat, but clients may have followed
    /// its announcement, so announce ours again once it has let go (rate-limited).
    fn check_contested(&mut self, now: Instant) {
        if self.owned.is_empty()
            || self
                .last_contest
                .is_some_and(|t| now.saturating_duration_since(t) < self.det.dead_after() * 2)
        {
            return;
        }
        let contested = self
            .table
            .views(now)
            .values()
            .any(|m| m.claims.iter().any(|v| self.owned.contains(v)));
        if contested {
            debug!("a peer claims a VIP this node owns; announcing again");
            self.last_contest = Some(now);
            self.reannounce += 1;
            self.push_l2(Mode::Announce);
        }
    }

    /// A failed receive (ICMP errors reported on the socket, a short memory shortage) is
    /// counted and skipped; it never ends the agent. A pause keeps a persistent error from
    /// spinning.
    async fn receive_error(&self, e: &std::io::Error) {
        self.agent
            .inner
            .metrics
            .dropped
            .get_or_create(&ReasonLabel {
                reason: "receiveError".into(),
            })
            .inc();
        debug!(%e, "gossip receive failed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// Handles every packet already queued on the socket (bounded), without waiting.
    async fn drain_socket(&mut self, buf: &mut [u8]) -> bool {
        let mut changed = false;
        for _ in 0..1024 {
            let Some(sock) = &self.socket else { break };
            match sock.try_recv_from(buf) {
                Ok((n, from)) => {
                    let data = buf[..n].to_vec();
                    changed |= self.on_packet(&data, from, Instant::now()).await;
                }
                Err(_) => break,
            }
        }
        changed
    }

    async fn on_packet(&mut self, data: &[u8], from: SocketAddr, now: Instant) -> bool {
        let opened = match self.opener.open(data) {
            Ok(o) => o,
            Err(e) => {
                let reason = match e {
                    seal::Error::Auth | seal::Error::UnknownKey(_) => "auth",
                    seal::Error::Replay => "replay",
                    _ => "malformed",
                };
                self.agent
                    .inner
                    .metrics
                    .dropped
                    .get_or_create(&ReasonLabel {
                        reason: reason.into(),
                    })
                    .inc();
                self.agent
                    .inner
                    .stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .dropped += 1;
                debug!(%from, %e, "gossip packet dropped");
                return false;
            }
        };
        let kind = if opened.kind == Kind::Swim {
            "swim"
        } else {
            "heartbeat"
        };
        self.agent
            .inner
            .metrics
            .received_packets
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
        match opened.kind {
            Kind::Swim => {
                if let Some(s) = self.swim.as_mut() {
                    match s.handle_data(&opened.body, now) {
                        Ok(out) => self.flush_swim(out).await,
                        Err(e) => debug!(%e, "swim packet rejected"),
                    }
                }
                false
            }
            Kind::Heartbeat => match Heartbeat::decode(&opened.body) {
                Ok(hb) => {
                    let was = self.table.alive(&opened.sender, now);
                    match self.table.heard(&opened.sender, opened.epoch, hb, now) {
                        Ok(changed) => {
                            if !was
                                && self.table.alive(&opened.sender, now)
                                && !self.owned.is_empty()
                            {
                                // a peer (re)appeared: clients may point at a stand-in
                                self.reannounce += 1;
                                self.push_l2(Mode::Announce);
                            }
                            changed
                        }
                        Err(e) => {
                            debug!(%e, "heartbeat ignored");
                            false
                        }
                    }
                }
                Err(e) => {
                    debug!(%e, "heartbeat malformed");
                    false
                }
            },
        }
    }

    async fn reload(&mut self) -> Result<(), Error> {
        let cfg = self.desired.borrow_and_update().config.clone();
        let det = Detection::of(cfg.cluster.profile);
        if self.socket.is_some() {
            self.table.set_peers(
                cfg.cluster
                    .peers
                    .iter()
                    .map(|p| (p.name.clone(), p.address)),
                det.interval,
                det.misses,
            );
        }
        // new keys, same counters and replay windows (a rebuilt opener would accept one
        // captured packet per sender again; a rebuilt sealer's packets would be replays)
        self.sealer.set_keys(&cfg.cluster.keys);
        self.opener.set_keys(&cfg.cluster.keys);
        self.det = det;
        self.facts = local_facts(&cfg, &self.health.borrow());
        self.cfg = cfg;
        self.bind_if_needed();
        self.sync_l2().await
    }

    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), Error> {
        self.sync_l2().await?;
        let now = Instant::now();
        let peers: Vec<(String, SocketAddr)> = self
            .table
            .peers
            .iter()
            .map(|(n, p)| (n.clone(), p.address))
            .collect();
        if let Some(s) = self.swim.as_mut() {
            let mut outs = Vec::new();
            for (n, a) in &peers {
                match s.announce(n, *a, now) {
                    Ok(o) => outs.push(o),
                    Err(e) => debug!(%e, "swim announce"),
                }
            }
            for o in outs {
                self.flush_swim(o).await;
            }
        }
        self.settle_by = now + self.settle_time();
        if self.table.peers.is_empty() && self.cfg.cluster.peers.is_empty() {
            self.settled = true;
        }
        self.heartbeat_all().await;
        self.decide(now);
        let mut next_hb = now + self.det.interval;
        let mut next_join = now + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        loop {
            let now = Instant::now();
            let mut wake = next_hb.min(next_join);
            if let Some(t) = self.swim.as_ref().and_then(|s| s.next_timer()) {
                wake = wake.min(t);
            }
            if let Some(t) = self.table.next_expiry(now) {
                wake = wake.min(t);
            }
            if !self.settled {
                wake = wake.min(self.settle_by);
            }
            let sock = &self.socket;
            let bufr = &mut buf;
            let recv = async move {
                match sock {
                    Some(s) => s.recv_from(bufr).await,
                    None => std::future::pending().await,
                }
            };
            let mut recompute = false;
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = recv => match r {
                    Ok((n, from)) => {
                        let data = buf[..n].to_vec();
                        recompute = self.on_packet(&data, from, Instant::now()).await;
                    }
                    Err(e) => self.receive_error(&e).await,
                },
                r = self.desired.changed() => {
                    if r.is_err() {
                        // the source is gone: keep the last config until shutdown
                        shutdown.cancelled().await;
                        break;
                    }
                    self.reload().await?;
                    recompute = true;
                }
                r = self.health.changed() => {
                    if r.is_ok() {
                        let f = local_facts(&self.cfg, &self.health.borrow_and_update());
                        if f != self.facts {
                            self.facts = f;
                            recompute = true;
                            // tell the others at once: they may have to take over
                            self.heartbeat_all().await;
                        }
                    } else {
                        std::future::pending::<()>().await;
                    }
                }
                () = sleep_until(wake) => {
                    // Heartbeats the kernel already holds count before any expiry: a stall of
                    // this task must not make it declare a live peer dead.
                    self.drain_socket(&mut buf).await;
                    let now = Instant::now();
                    if now >= next_hb {
                        self.heartbeat_all().await;
                        next_hb += self.det.interval;
                        if next_hb < now {
                            next_hb = now + self.det.interval;
                        }
                    }
                    if let Some(s) = self.swim.as_mut() {
                        match s.fire_due(now) {
                            Ok(out) => self.flush_swim(out).await,
                            Err(e) => debug!(%e, "swim timer"),
                        }
                    }
                    if now >= next_join {
                        next_join = now + Duration::from_secs(2);
                        let active: BTreeSet<String> = self.swim.as_ref().map(|s| s.active().into_iter().map(|i| i.name).collect()).unwrap_or_default();
                        let missing: Vec<(String, SocketAddr)> = self.table.peers.iter().filter(|(n, _)| !active.contains(*n)).map(|(n, p)| (n.clone(), p.address)).collect();
                        for (n, a) in missing {
                            if let Some(s) = self.swim.as_mut() && let Ok(o) = s.announce(&n, a, now) {
                                self.flush_swim(o).await;
                            }
                        }
                    }
                    if self.socket.is_none() {
                        self.bind_if_needed();
                    }
                    // with peers configured but no socket (its bind keeps failing) this node
                    // hears nobody, so it must not claim anything
                    let hears_peers = self.socket.is_some() || self.cfg.cluster.peers.is_empty();
                    if !self.settled && hears_peers && (now >= self.settle_by || self.table.peers.keys().all(|p| self.table.alive(p, now))) {
                        self.settled = true;
                        debug!("settled");
                    }
                    recompute = true;
                }
            }
            if recompute && self.decide(Instant::now()) {
                // claims changed: tell the peers now rather than at the next tick
                self.heartbeat_all().await;
            }
            if recompute {
                self.check_contested(Instant::now());
            }
        }
        self.leave().await
    }

    /// Graceful leave: tell everyone, stop answering, wait until the VIPs we owned are claimed
    /// elsewhere (bounded), then release.
    async fn leave(&mut self) -> Result<(), Error> {
        let had = self.owned.clone();
        self.leaving = true;
        info!(vips = had.len(), "leaving the cluster");
        for _ in 0..3 {
            self.heartbeat_all().await;
        }
        if let Some(s) = self.swim.as_mut() {
            match s.leave(Instant::now()) {
                Ok(out) => self.flush_swim(out).await,
                Err(e) => debug!(%e, "swim leave"),
            }
        }
        self.push_l2(Mode::Drain);
        let deadline = Instant::now() + Duration::from_secs(2).max(self.det.dead_after() * 10);
        let mut buf = vec![0u8; 65536];
        for _ in 0..100_000 {
            let now = Instant::now();
            let views = self.table.views(now);
            let taken = had
                .iter()
                .all(|v| views.values().any(|m| m.claims.contains(v)));
            if had.is_empty() || views.is_empty() || taken || now >= deadline {
                if !taken && !had.is_empty() && !views.is_empty() {
                    warn!("leaving before every VIP was taken over");
                }
                break;
            }
            let Some(sock) = &self.socket else { break };
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { break };
                    let data = buf[..n].to_vec();
                    self.on_packet(&data, from, Instant::now()).await;
                }
                () = sleep_until((now + self.det.interval).min(deadline)) => {
                    self.heartbeat_all().await;
                }
            }
        }
        // packets already on their way to us are still delivered locally
        tokio::time::sleep(self.det.interval * 2 + Duration::from_millis(50)).await;
        self.owned.clear();
        self.decide(Instant::now());
        Ok(())
    }

    /// Closes the announcers and waits until they have removed their addresses.
    async fn finish(&mut self) {
        for (_, (tx, task)) in std::mem::take(&mut self.l2) {
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.handover.clear().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{BackendKey, Health};

    fn config(check: &str) -> Config {
        let yaml = format!(
            "node: {{name: n1}}\nservices:\n  - name: db\n    vips: [10.0.0.100]\n    ports: [{{port: 3306}}]\n    placement: {{local_only: true}}\n    backends: [{{name: local, address: 10.0.1.1, node: n1}}]\n{check}"
        );
        model::config::parse(&yaml, &Default::default()).expect("valid")
    }

    fn serving(cfg: &Config, h: Option<Health>) -> bool {
        let mut view = HealthView::new();
        if let Some(h) = h {
            view.insert(BackendKey::new("db", "local"), h);
        }
        local_facts(cfg, &view).serving.contains("db")
    }

    #[test]
    fn a_local_backend_that_never_passed_a_check_does_not_make_the_node_eligible() {
        let checked = config("    health_check: {type: tcp}\n");
        assert!(!serving(&checked, None), "no verdict yet");
        assert!(!serving(&checked, Some(Health::Unknown)), "not checked yet");
        assert!(!serving(&checked, Some(Health::Down)));
        assert!(serving(&checked, Some(Health::Up)));
        // without an active check, health is never known: not down is all there is
        let unchecked = config("    health_check: {type: none}\n");
        assert!(serving(&unchecked, Some(Health::Unknown)));
        assert!(!serving(&unchecked, Some(Health::Down)));
    }
}
