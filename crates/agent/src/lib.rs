//! Node agent: gossip membership, VIP ownership, L2 announcement.
//!
//! # Layout (pure cores, then the tokio driver)
//! - [`owner`]: who owns each VIP, a pure function (rendezvous homes, incumbency, hold-down).
//! - [`seal`]: the authenticated, encrypted gossip envelope with replay protection.
//! - [`wire`]: the direct heartbeat body; [`members`]: liveness from heartbeats.
//! - [`swim`]: SWIM membership through `foca` (identity, collecting runtime, timer queue).
//! - [`frames`]: ARP / NDP frames; [`announce`]: the per-interface L2 announcer;
//!   [`handover`]: forwarding of in-flight connections to the previous owner after a takeover.
//! - [`core`]: the agent's decisions as a pure state machine (events in, actions out, time
//!   passed in), with self-stall detection.
//! - [`Agent::run`]: the tokio driver (`driver.rs`) tying the core to one UDP socket, SWIM, the
//!   announcers and the spine's watch channels.
//!
//! # Why a direct heartbeat next to SWIM
//! SWIM detects a failure after a probe period, a probe timeout, indirect probes and a
//! suspicion timeout: with memberlist's LAN settings that is seconds, and even squeezed to the
//! limit it cannot reliably go below a few hundred milliseconds without making every member
//! probe every other one, which is a heartbeat anyway. The failover targets (about 100 ms by default,
//! under 50 ms in the fast profile) therefore come from a BFD-like direct heartbeat: every node sends
//! a small sealed packet to every configured peer (any of them may be the next owner of any VIP)
//! every `interval`, and declares a peer dead after a profile's dead-after time of silence. The
//! heartbeat also carries what the owner function needs from each node (its claims, address
//! families and healthy local-only services), so every node decides from the same facts. SWIM
//! (foca) still runs on the same socket for membership: joining, gossiping who exists and
//! graceful leaves, and status. Profiles: `default` every 40 ms, dead after 100 ms (one lost
//! heartbeat plus 20 ms of jitter is tolerated; 25 heartbeats/s to each peer, as when it was
//! dead after 160 ms), `fast` every 10 ms, dead after 30 ms (100/s to each peer).
//! Before acting on an expiry the driver first reads every packet already queued on the
//! socket, and a node that was stalled itself does not count the stall as its peers' silence
//! (see [`core`]), so a stall of the agent does not declare live peers dead.

pub mod announce;
pub mod core;
mod driver;
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
    AgentPriority, Config, Desired, FailureProfile, HealthView, MemberStatus, OwnershipView,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::owner::Facts;

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
    /// The agent's own thread ended without a result (it panicked).
    #[error("the agent thread ended without a result (panic)")]
    Thread,
    /// Peers are configured but no cluster key.
    #[error("cluster.peers are configured but cluster.keys is empty: gossip must be authenticated")]
    NoKey,
}

/// The nice value of [`model::AgentPriority::High`] (and the fallback of `Realtime`): the
/// highest priority short of real-time scheduling.
pub const AGENT_NICE: i32 = -20;

/// The real-time priority of [`model::AgentPriority::Realtime`] (`SCHED_RR`, 1–99): above every
/// normally scheduled thread, below the kernel's own real-time threads (50) and below the
/// real-time priorities other daemons usually pick.
pub const AGENT_RT_PRIORITY: i32 = 10;

/// Failure-detection timing of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// Heartbeat interval.
    pub interval: Duration,
    /// Silence after which a peer is dead (a whole number of intervals or not: the default
    /// profile tolerates one lost heartbeat plus 20 ms of jitter, not two).
    pub dead: Duration,
}

impl Detection {
    /// The timing of a profile.
    pub fn of(p: FailureProfile) -> Self {
        match p {
            FailureProfile::Default => Detection {
                interval: Duration::from_millis(40),
                dead: Duration::from_millis(100),
            },
            FailureProfile::Fast => Detection {
                interval: Duration::from_millis(10),
                dead: Duration::from_millis(30),
            },
        }
    }

    /// Silence after which a peer is dead.
    pub fn dead_after(&self) -> Duration {
        self.dead
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabel {
    policy: String,
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
    stalls: Counter,
    scheduling: Family<PolicyLabel, Gauge>,
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
    priority: Option<AgentPriority>,
    listeners: Option<ClosedListeners>,
}

/// The VIPs whose listener the balancer could not open on this node (it retries them), as
/// the balancer publishes them.
pub type ClosedListeners = watch::Receiver<Arc<BTreeSet<IpAddr>>>;

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
        r.register(
            "self_stalls",
            "Times this node found itself stalled (an event handled later than its timer by over a quarter heartbeat interval); the stall is not counted as the peers' silence",
            m.stalls.clone(),
        );
        r.register(
            "scheduling",
            "1 for the scheduling policy the agent's thread runs under (realtime, nice, normal; absent: the shared runtime)",
            m.scheduling.clone(),
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
        if let Some(priority) = self.priority {
            return self
                .run_on_own_thread(priority, socket, desired, health, ownership, shutdown)
                .await;
        }
        let mut d = driver::Driver::new(self.clone(), socket, desired, health, ownership)?;
        let r = d.run(shutdown).await;
        d.finish().await;
        r
    }

    /// Follows the balancer's closed listeners: a node whose listener for a VIP is not open is
    /// not eligible for that VIP (reason `listenerNotOpen`), and tells its peers so.
    pub fn with_listeners(mut self, closed: ClosedListeners) -> Self {
        self.listeners = Some(closed);
        self
    }

    /// Runs the agent (heartbeats, gossip, announcers, decisions) on a thread of its own with
    /// its own single-threaded runtime, scheduled as `priority` says (`Realtime`: `SCHED_RR`
    /// at [`AGENT_RT_PRIORITY`], keepalived's `vrrp_rt_priority`; `High`: nice
    /// [`AGENT_NICE`], keepalived's `vrrp_priority`; `Normal`: the shared runtime, as without
    /// this call). A host busy with other work then delays neither its heartbeats nor their
    /// reception, and a busy balancer or DNS server in this process does not either. Without
    /// the privilege (`CAP_SYS_NICE`) it says so once and falls back a step. The scheduling
    /// it got is the gauge `portico_agent_scheduling{policy}`.
    pub fn with_own_thread(mut self, priority: AgentPriority) -> Self {
        self.priority = (priority != AgentPriority::Normal).then_some(priority);
        self
    }

    async fn run_on_own_thread(
        &self,
        priority: AgentPriority,
        socket: Option<UdpSocket>,
        desired: watch::Receiver<Arc<Desired>>,
        health: watch::Receiver<Arc<HealthView>>,
        ownership: watch::Sender<Arc<OwnershipView>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        // the socket moves to the agent's own runtime (its reactor wakes the agent's thread)
        let socket = socket.map(UdpSocket::into_std).transpose()?;
        let agent = Agent {
            priority: None,
            ..self.clone()
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("portico-agent".into())
            .spawn(move || {
                let policy = schedule_this_thread(priority);
                agent
                    .inner
                    .metrics
                    .scheduling
                    .get_or_create(&PolicyLabel {
                        policy: policy.into(),
                    })
                    .set(1);
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Io)
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let socket = socket.map(UdpSocket::from_std).transpose()?;
                            agent
                                .run(socket, desired, health, ownership, shutdown)
                                .await
                        })
                    });
                let _ = tx.send(r);
            })?;
        rx.await.unwrap_or(Err(Error::Thread))
    }
}

/// Schedules the calling thread as `priority` asks, falling back a step at a time; returns the
/// policy it got (`realtime`, `nice`, `normal`).
fn schedule_this_thread(priority: AgentPriority) -> &'static str {
    if priority == AgentPriority::Realtime {
        match sys::set_thread_realtime(AGENT_RT_PRIORITY) {
            Ok(()) => {
                tracing::info!(
                    priority = AGENT_RT_PRIORITY,
                    "the agent runs under real-time scheduling (SCHED_RR)"
                );
                return "realtime";
            }
            Err(e) => {
                tracing::warn!(%e, "cannot schedule the agent thread in real time (needs CAP_SYS_NICE and a real-time budget); trying nice {AGENT_NICE}")
            }
        }
    }
    match sys::set_thread_nice(AGENT_NICE) {
        Ok(()) => "nice",
        Err(e) => {
            tracing::warn!(%e, "cannot raise the agent thread's priority; heartbeats run at normal priority");
            "normal"
        }
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
        closed: Default::default(),
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
