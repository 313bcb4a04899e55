//! The agent's pure core: events in, actions out, time passed in explicitly.
//!
//! [`Core::handle`] takes one [`Event`] (a heartbeat received, the timer fired, new local
//! facts, a new desired state, the gossip socket opened, shutdown) and the instant it happened,
//! and returns the [`Action`]s the driver performs (send a heartbeat, claim or release a VIP
//! with the previous owner to forward in-flight connections to, announce again, drain,
//! publish). It owns no socket, task or clock, so tests replay event sequences under paused
//! time without root.
//!
//! **Self-stall detection.** The driver is told when to wake ([`Core::next_wake`]). If it
//! hands the core an event later than that by more than a quarter of the heartbeat interval,
//! this node itself was stalled (CPU starvation, a paused VM, a slow disk write on the same
//! thread): the silence of its peers during the stall says nothing about them. The core then
//! does not count the stall as silence: every peer that was alive when the stall began gets the
//! stall added to its last-heard time, so it is expired only after the profile's dead-after time of
//! silence while this node was running. The driver also reads every heartbeat already queued on
//! the socket before it hands the core a timer event.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use model::{Config, MemberStatus, NodeId, OwnershipView, VipOwnership};
use tokio::time::Instant;

use crate::owner::{self, Facts, MemberView, Reason};
use crate::wire::Heartbeat;
use crate::{Detection, interface_for, members};

/// How often a node heartbeats the peers that would not take over any of its VIPs (they
/// scale their dead-after time by it: 2.5 s by default, 3 s with `fast`). Only the peers
/// that would take over (its VIPs' successors) and those contesting a VIP hear it at the
/// profile's rate, so the packets a node sends grow with the VIPs it owns, not with the
/// cluster.
pub const SLOW_INTERVAL: Duration = Duration::from_secs(1);

/// Clusters of up to this many peers (8 nodes) heartbeat every peer at the profile's rate:
/// the packets are few, and a failure of several nodes at once (a partition, a rack) is then
/// detected by everybody at the profile's speed. Larger clusters use the watchers.
pub const FULL_MESH_PEERS: usize = 7;

/// Something that happened to the agent.
#[derive(Debug, Clone)]
pub enum Event {
    /// The driver starts: first heartbeat, first decision.
    Start,
    /// An authenticated heartbeat from peer `from`.
    Heartbeat {
        /// The sender.
        from: NodeId,
        /// The sender's epoch (start time) from the envelope.
        epoch: u64,
        /// The heartbeat body.
        hb: Heartbeat,
    },
    /// The wake-up the core asked for ([`Core::next_wake`]) came.
    Tick,
    /// This node's facts changed (health of local backends, listeners).
    Facts(Facts),
    /// A new desired state, with the facts under it.
    Config(Arc<Config>, Facts),
    /// The gossip socket was opened after start (peers appeared).
    GossipOpen,
    /// Shutdown begins: leave gracefully.
    Leave,
    /// The leave is over: forget every VIP (the announcers release them when closed).
    Released,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this heartbeat to these peers (by name; [`Core::peer_address`]). Its interval
    /// field tells each of them how soon the next one comes: the profile's interval for the
    /// peers that would take over one of this node's VIPs ([`Core::watchers`]),
    /// [`SLOW_INTERVAL`] for the others.
    Heartbeat(Heartbeat, Vec<NodeId>),
    /// Start announcing `vip`; `from` is the previous owner's address on the VIP's link when
    /// it still serves connections (install the handover forwarding to it).
    Claim {
        /// The VIP.
        vip: IpAddr,
        /// The previous owner to forward in-flight connections to.
        from: Option<IpAddr>,
    },
    /// Stop announcing `vip`.
    Release {
        /// The VIP.
        vip: IpAddr,
        /// The reason word (`notOwner`, `noEligibleNode`, …, `removed`).
        reason: &'static str,
        /// The new owner, if any.
        new_owner: Option<NodeId>,
    },
    /// Announce every owned VIP again (a peer came back, or one contests a VIP).
    Reannounce,
    /// Stop answering and announcing, keep local delivery (graceful leave).
    Drain,
    /// The ownership decisions changed.
    Ownership(OwnershipView),
    /// Members as this node sees them (after every decision).
    Members(Vec<MemberStatus>),
}

/// The agent's decision state.
#[derive(Debug)]
pub struct Core {
    cfg: Arc<Config>,
    det: Detection,
    table: members::Table,
    facts: Facts,
    start: Instant,
    settled: bool,
    settle_by: Instant,
    gossip: bool,
    leaving: bool,
    owned: BTreeSet<IpAddr>,
    from: BTreeMap<IpAddr, IpAddr>,
    last_contest: Option<Instant>,
    next_hb: Instant,
    wake: Option<Instant>,
    view: OwnershipView,
    stalls: u64,
    /// The owner function's plan for the current configuration and node names.
    plan: Option<(Arc<Config>, owner::Plan)>,
    /// Peers that get heartbeats at the profile's rate: those that would take over one of
    /// this node's VIPs if it died, and those claiming one of them.
    watchers: BTreeSet<NodeId>,
    /// Peers just moved off the fast rate: they get the slow interval at the fast ticks a
    /// few more times, so one lost packet does not make them expire this node.
    demoted: BTreeMap<NodeId, u8>,
    /// When the next heartbeat to the other peers is due.
    next_slow: Instant,
    /// The alive peers and settledness at the last decision: a timer tick decides again only
    /// when they changed (or during hold-down), not every interval.
    decided: Option<(BTreeSet<NodeId>, bool)>,
    /// This node's alive-for at the last decision (hold-down ends between two decisions).
    decided_alive_for: Duration,
    /// When to decide for claims heard since the last decision (coalesced).
    pending: Option<Instant>,
    decisions: u64,
}

impl Core {
    /// A core for `cfg`; `gossip` says whether the gossip socket is open (its peers are then
    /// tracked). Nothing happens before [`Event::Start`].
    pub fn new(cfg: Arc<Config>, facts: Facts, gossip: bool, now: Instant) -> Self {
        let det = Detection::of(cfg.cluster.profile);
        let mut c = Self {
            table: members::Table::new(Vec::new(), det.interval, det.dead),
            det,
            facts,
            start: now,
            settled: false,
            settle_by: now,
            gossip: false,
            leaving: false,
            owned: BTreeSet::new(),
            from: BTreeMap::new(),
            last_contest: None,
            next_hb: now,
            wake: None,
            view: OwnershipView::new(),
            stalls: 0,
            plan: None,
            watchers: BTreeSet::new(),
            demoted: BTreeMap::new(),
            next_slow: now,
            decided: None,
            decided_alive_for: Duration::ZERO,
            pending: None,
            decisions: 0,
            cfg,
        };
        if gossip {
            c.open_gossip();
        }
        c
    }

    fn open_gossip(&mut self) {
        self.gossip = true;
        let c = &self.cfg.cluster;
        self.table.set_peers(
            c.peers.iter().map(|p| (p.name.clone(), p.address)),
            self.det.interval,
            self.det.dead,
        );
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// The failure-detection timing in force.
    pub fn detection(&self) -> Detection {
        self.det
    }

    /// Whether this node is leaving.
    pub fn leaving(&self) -> bool {
        self.leaving
    }

    /// The VIPs this node claims.
    pub fn owned(&self) -> &BTreeSet<IpAddr> {
        &self.owned
    }

    /// The peers' gossip addresses, by name.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, SocketAddr)> {
        self.table.peers.iter().map(|(n, p)| (n, p.address))
    }

    /// The configured address of peer `name`.
    pub fn peer_address(&self, name: &str) -> Option<SocketAddr> {
        self.table.peers.get(name).map(|p| p.address)
    }

    /// How many ownership decisions this core made (each costs O(VIPs × nodes)).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// How many times this node found itself stalled.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Whether every VIP in `had` is claimed by an alive peer, or nobody is left to take them
    /// (the leaving node then stops waiting).
    pub fn handed_over(&self, had: &BTreeSet<IpAddr>, now: Instant) -> bool {
        let views = self.table.views(now);
        had.is_empty()
            || views.is_empty()
            || had
                .iter()
                .all(|v| views.values().any(|m| m.claims.contains(v)))
    }

    /// How long a starting node listens before claiming anything: long enough to hear every
    /// live peer's claims.
    pub fn settle_time(&self) -> Duration {
        (self.det.dead_after() * 3).max(Duration::from_millis(300))
    }

    /// When the core wants the next [`Event::Tick`]: the next heartbeat, the next peer expiry,
    /// the end of settling.
    pub fn next_wake(&self, now: Instant) -> Instant {
        let mut w = self.next_hb.min(self.next_slow);
        if let Some(t) = self.table.next_expiry(now) {
            w = w.min(t);
        }
        if !self.settled {
            w = w.min(self.settle_by);
        }
        if let Some(t) = self.hold_down_ends(now) {
            w = w.min(t.max(now));
        }
        if let Some(t) = self.pending {
            w = w.min(t);
        }
        w
    }

    /// When this node's hold-down ends, if it had not ended at the last decision (in
    /// preemptive mode a home takes its VIPs back then, so the core decides again at once).
    fn hold_down_ends(&self, now: Instant) -> Option<Instant> {
        let hold = self.cfg.cluster.hold_down;
        if !self.cfg.cluster.preemptive || self.decided_alive_for >= hold {
            return None;
        }
        Some(now + hold.saturating_sub(self.self_alive_for(now)))
    }

    /// How late an event may come before this node counts itself stalled.
    pub fn stall_threshold(&self) -> Duration {
        self.det.interval / 4
    }

    /// Handles one event at `now`.
    pub fn handle(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(w) = self.wake
            && now > w + self.stall_threshold()
        {
            // this node was not running: the silence of the stall is not the peers' fault
            let by = now.saturating_duration_since(w);
            self.stalls += 1;
            tracing::debug!(late = ?by, "this node was stalled; not counting the stall as silence");
            self.table.forgive(w, by, now);
        }
        let tick = matches!(ev, Event::Tick);
        let recompute = match ev {
            Event::Start => {
                self.settle_by = now + self.settle_time();
                if self.table.peers.is_empty() && self.cfg.cluster.peers.is_empty() {
                    self.settled = true;
                }
                self.send_all(&mut out);
                self.next_hb = now + self.det.interval;
                self.next_slow = now + SLOW_INTERVAL;
                true
            }
            Event::Heartbeat { from, epoch, hb } => {
                let was = self.table.alive(&from, now);
                // a newer epoch: the peer restarted (perhaps before anyone expired it)
                let restarted = self
                    .table
                    .peers
                    .get(&from)
                    .is_some_and(|p| p.epoch != 0 && epoch > p.epoch);
                let facts_before = self.table.peers.get(&from).map(|p| p.hb.facts.clone());
                match self.table.heard(&from, epoch, hb, now) {
                    Ok(changed) => {
                        let is = self.table.alive(&from, now);
                        if is && (!was || restarted) {
                            // a peer (re)appeared or restarted: answer at once, so that a
                            // starting node hears every peer's claims before it claims
                            // anything itself (it hears most only every SLOW_INTERVAL
                            // otherwise)
                            out.push(Action::Heartbeat(
                                self.heartbeat_every(self.interval_for(&from)),
                                vec![from.clone()],
                            ));
                            if !was && !self.owned.is_empty() {
                                // clients may point at a stand-in
                                out.push(Action::Reannounce);
                            }
                        }
                        let facts_after = self.table.peers.get(&from).map(|p| p.hb.facts.clone());
                        if changed && was == is && facts_before == facts_after {
                            // only its claims changed: many peers' claims change together
                            // after a death or a healed partition, so decide once for all of
                            // them a quarter interval later rather than once per heartbeat
                            self.pending.get_or_insert(now + self.det.interval / 4);
                            self.check_contested(now, &mut out);
                            false
                        } else {
                            changed
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%e, "heartbeat ignored");
                        false
                    }
                }
            }
            Event::Tick => {
                if now >= self.next_hb {
                    self.send_fast(&mut out);
                    if !self.demoted.is_empty() {
                        let to: Vec<NodeId> = self.demoted.keys().cloned().collect();
                        out.push(Action::Heartbeat(self.heartbeat_every(SLOW_INTERVAL), to));
                        self.demoted.retain(|_, n| {
                            *n -= 1;
                            *n > 0
                        });
                    }
                    self.next_hb += self.det.interval;
                    if self.next_hb < now {
                        self.next_hb = now + self.det.interval;
                    }
                }
                if now >= self.next_slow {
                    let to = self.slow_peers();
                    if !to.is_empty() {
                        out.push(Action::Heartbeat(self.heartbeat_every(SLOW_INTERVAL), to));
                    }
                    self.next_slow += SLOW_INTERVAL;
                    if self.next_slow < now {
                        self.next_slow = now + SLOW_INTERVAL;
                    }
                }
                // with peers configured but no socket (its bind keeps failing) this node hears
                // nobody, so it must not claim anything
                let hears = self.gossip || self.cfg.cluster.peers.is_empty();
                if !self.settled
                    && hears
                    && (now >= self.settle_by
                        || self.table.peers.keys().all(|p| self.table.alive(p, now)))
                {
                    self.settled = true;
                    tracing::debug!("settled");
                }
                // decide again only if an input that changes by itself did: a peer expired,
                // settling ended, or this node's hold-down may end now
                let alive: BTreeSet<NodeId> = self
                    .table
                    .peers
                    .keys()
                    .filter(|p| self.table.alive(p, now))
                    .cloned()
                    .collect();
                self.decided.as_ref() != Some(&(alive, self.settled))
                    || self.hold_down_ends(now).is_some_and(|t| t <= now)
                    || self.pending.is_some_and(|t| t <= now)
            }
            Event::Facts(f) => {
                if f == self.facts {
                    false
                } else {
                    self.facts = f;
                    // tell the others at once: they may have to take over
                    self.send_all(&mut out);
                    true
                }
            }
            Event::Config(cfg, facts) => {
                let det = Detection::of(cfg.cluster.profile);
                // Peers appear for the first time (a Kubernetes agent: its first desired state
                // has none, the next has the Nodes and the Services together): owning nothing
                // yet, listen to them before claiming, as at start. Without this the node
                // decided alone, before its gossip socket was open, and claimed every VIP.
                if !self.gossip
                    && self.cfg.cluster.peers.is_empty()
                    && !cfg.cluster.peers.is_empty()
                    && self.owned.is_empty()
                {
                    self.settled = false;
                    self.settle_by = now + self.settle_time();
                }
                if self.gossip {
                    self.table.set_peers(
                        cfg.cluster
                            .peers
                            .iter()
                            .map(|p| (p.name.clone(), p.address)),
                        det.interval,
                        det.dead,
                    );
                }
                self.det = det;
                self.facts = facts;
                self.cfg = cfg;
                true
            }
            Event::GossipOpen => {
                // Owning nothing yet (a Kubernetes agent before Nodes were listed), listen to
                // the peers' claims before claiming; a node already serving VIPs keeps them
                // (incumbency) and tells the new peers at once.
                if self.owned.is_empty() {
                    self.settled = false;
                    self.settle_by = now + self.settle_time();
                }
                self.open_gossip();
                true
            }
            Event::Leave => {
                self.leaving = true;
                for _ in 0..3 {
                    self.send_all(&mut out);
                }
                out.push(Action::Drain);
                false
            }
            Event::Released => {
                self.owned.clear();
                self.from.clear();
                self.decide(now, &mut out);
                false
            }
        };
        if recompute {
            if self.decide(now, &mut out) {
                // claims changed: tell the peers now rather than at the next tick
                self.send_all(&mut out);
            }
        } else if tick {
            out.push(Action::Members(self.members_at(now)));
        }
        if recompute || tick {
            self.check_contested(now, &mut out);
        }
        self.wake = Some(self.next_wake(now));
        out
    }

    /// The heartbeat this node sends its watchers now.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat_every(self.det.interval)
    }

    /// The peers that get heartbeats at the profile's rate: the successors of this node's
    /// VIPs (who would own each if this node died) and the peers claiming one of them.
    pub fn watchers(&self) -> &BTreeSet<NodeId> {
        &self.watchers
    }

    /// The interval this node heartbeats `peer` at.
    fn interval_for(&self, peer: &str) -> Duration {
        if self.watchers.contains(peer) {
            self.det.interval
        } else {
            SLOW_INTERVAL
        }
    }

    /// The peers heartbeaten every [`SLOW_INTERVAL`].
    fn slow_peers(&self) -> Vec<NodeId> {
        self.table
            .peers
            .keys()
            .filter(|p| !self.watchers.contains(*p))
            .cloned()
            .collect()
    }

    /// Sends the current heartbeat to the watchers (the profile's interval).
    fn send_fast(&self, out: &mut Vec<Action>) {
        if !self.watchers.is_empty() {
            out.push(Action::Heartbeat(
                self.heartbeat(),
                self.watchers.iter().cloned().collect(),
            ));
        }
    }

    /// Sends the current heartbeat to every peer now, each with the interval it gets.
    fn send_all(&self, out: &mut Vec<Action>) {
        self.send_fast(out);
        let slow = self.slow_peers();
        if !slow.is_empty() {
            out.push(Action::Heartbeat(self.heartbeat_every(SLOW_INTERVAL), slow));
        }
    }

    /// Moves the fast rate to `next`: peers leaving it hear the slow interval at once (and at
    /// the next few fast ticks), peers joining it at once.
    fn set_watchers(&mut self, next: BTreeSet<NodeId>, out: &mut Vec<Action>) {
        if next == self.watchers {
            return;
        }
        let gone: Vec<NodeId> = self.watchers.difference(&next).cloned().collect();
        let new: Vec<NodeId> = next.difference(&self.watchers).cloned().collect();
        self.watchers = next;
        for p in &new {
            self.demoted.remove(p);
        }
        if !gone.is_empty() {
            for p in &gone {
                self.demoted.insert(p.clone(), 3);
            }
            out.push(Action::Heartbeat(self.heartbeat_every(SLOW_INTERVAL), gone));
        }
        if !new.is_empty() {
            out.push(Action::Heartbeat(self.heartbeat(), new));
        }
    }

    /// The heartbeat this node sends now, announcing `interval` until the next one.
    fn heartbeat_every(&self, interval: Duration) -> Heartbeat {
        Heartbeat {
            leaving: self.leaving,
            interval,
            facts: self.facts.clone(),
            claims: if self.leaving {
                BTreeSet::new()
            } else {
                self.owned.clone()
            },
        }
    }

    /// Members as this node sees them.
    pub fn members_at(&self, now: Instant) -> Vec<MemberStatus> {
        let mut members = vec![MemberStatus {
            name: self.cfg.node.name.clone(),
            address: self.cfg.cluster.advertise,
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
        members
    }

    fn self_alive_for(&self, now: Instant) -> Duration {
        let mut d = now.saturating_duration_since(self.start);
        for (p, peer) in &self.table.peers {
            if self.table.alive(p, now)
                && let Some(since) = peer.since
            {
                d = d.min(now.saturating_duration_since(since));
            }
        }
        d
    }

    /// Recomputes ownership; returns whether our claims changed.
    fn decide(&mut self, now: Instant, out: &mut Vec<Action>) -> bool {
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
        // the plan (homes, rankings) depends only on the configuration and the node names
        let fits = self
            .plan
            .as_ref()
            .is_some_and(|(c, p)| Arc::ptr_eq(c, &cfg) && p.fits(&inputs));
        if !fits {
            let plan = owner::Plan::new(&cfg.services, &nodes, alive.keys());
            self.plan = Some((cfg.clone(), plan));
        }
        let plan = &self.plan.as_ref().expect("set above").1;
        let decisions = owner::decide_with(plan, &inputs);
        let owned: BTreeSet<IpAddr> = if self.leaving {
            // a leaving node keeps what it has (draining) until the leave is over
            self.owned.clone()
        } else if self.settled {
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
        if view != self.view {
            self.view = view.clone();
            out.push(Action::Ownership(view));
        }
        let members = self.members_at(now);
        self.decisions += 1;
        self.decided_alive_for = self.self_alive_for(now);
        self.pending = None;
        self.decided = Some((
            self.table
                .peers
                .keys()
                .filter(|p| self.table.alive(p, now))
                .cloned()
                .collect(),
            self.settled,
        ));
        out.push(Action::Members(members));
        let watchers = self.successors(&me, &alive, &owned, &inputs);
        self.set_watchers(watchers, out);
        if owned == self.owned {
            return false;
        }
        for v in owned.difference(&self.owned) {
            let from = self.handover_source(v, now);
            if let Some(to) = from {
                self.from.insert(*v, to);
            }
            out.push(Action::Claim { vip: *v, from });
        }
        for v in self.owned.difference(&owned) {
            out.push(Action::Release {
                vip: *v,
                reason: decisions.get(v).map_or("removed", |d| d.reason.as_str()),
                new_owner: decisions.get(v).and_then(|d| d.owner.clone()),
            });
        }
        self.from.retain(|v, _| owned.contains(v));
        self.owned = owned;
        true
    }

    /// The peers that must hear this node at the profile's rate: who would own each of
    /// `owned` if this node died (the owner function run without it) and the peers claiming
    /// one of them; every peer in clusters of up to [`FULL_MESH_PEERS`] peers.
    fn successors(
        &self,
        me: &str,
        alive: &BTreeMap<NodeId, MemberView>,
        owned: &BTreeSet<IpAddr>,
        inputs: &owner::Inputs<'_>,
    ) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        // small clusters: everybody (see FULL_MESH_PEERS)
        if self.table.peers.len() <= FULL_MESH_PEERS {
            return self.table.peers.keys().cloned().collect();
        }
        if owned.is_empty() || self.leaving {
            return out;
        }
        let Some((_, plan)) = &self.plan else {
            return out;
        };
        let mut without = alive.clone();
        without.remove(me);
        for (n, m) in &without {
            if m.claims.iter().any(|v| owned.contains(v)) {
                out.insert(n.clone());
            }
        }
        let after = owner::decide_with(
            plan,
            &owner::Inputs {
                alive: &without,
                ..*inputs
            },
        );
        for v in owned {
            if let Some(o) = after.get(v).and_then(|d| d.owner.as_ref()) {
                out.insert(o.clone());
            }
        }
        out.retain(|n| self.table.peers.contains_key(n));
        out
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
            tracing::debug!(%vip, %node, %to, "previous owner not reachable on the VIP's link: no forwarding");
            return None;
        }
        Some(to)
    }

    /// A peer claims a VIP we own (it stood in during a flap or a partition and has not yet
    /// seen our claim): it will release on our next heartbeat, but clients may have followed
    /// its announcement, so announce ours again once it has let go (rate-limited).
    fn check_contested(&mut self, now: Instant, out: &mut Vec<Action>) {
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
            tracing::debug!("a peer claims a VIP this node owns; announcing again");
            self.last_contest = Some(now);
            out.push(Action::Reannounce);
        }
    }
}
