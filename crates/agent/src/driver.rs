//! The agent's tokio driver: the gossip socket, SWIM, the announcers and the spine's watch
//! channels around the pure [`Core`].
//!
//! It turns I/O into [`Event`]s (a heartbeat opened from the socket, the core's wake-up, a new
//! health view or desired state, shutdown) and performs the core's [`Action`]s (seal and send
//! heartbeats, tell the announcers what to announce, publish ownership). The clock is
//! `tokio::time`, so tests run it under paused time; the gossip socket comes from the caller or
//! an injected [`GossipBinder`](crate::GossipBinder).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use model::{Config, Desired, FailureProfile, HealthView, NodeId, OwnershipView};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::announce::{self, Mode};
use crate::core::{Action, Core, Event};
use crate::seal::{self, Kind};
use crate::wire::Heartbeat;
use crate::{Agent, Error, KindLabel, ReasonLabel, interface_for, local_facts, swim};

/// One interface's announcer: what it should announce, and its task.
type L2Task = (watch::Sender<announce::Want>, tokio::task::JoinHandle<()>);

pub(crate) struct Driver {
    agent: Agent,
    socket: Option<UdpSocket>,
    desired: watch::Receiver<Arc<Desired>>,
    health: watch::Receiver<Arc<HealthView>>,
    ownership: watch::Sender<Arc<OwnershipView>>,
    core: Core,
    sealer: seal::Sealer,
    opener: seal::Opener,
    swim: Option<swim::Swim>,
    epoch: u64,
    bind_failed_logged: Option<Instant>,
    handover_synced: bool,
    l2_timing_running: Option<announce::Timing>,
    l2: BTreeMap<String, L2Task>,
    handover: crate::handover::Handover,
    /// What the announcers announce: owned VIPs, with the previous owner to forward to.
    l2_vips: BTreeMap<IpAddr, Option<IpAddr>>,
    l2_mode: Mode,
    reannounce: u64,
    stalls_seen: u64,
    listeners: Option<crate::ClosedListeners>,
}

impl Driver {
    pub(crate) fn new(
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
        let epoch = crate::epoch_now();
        let me = cfg.node.name.clone();
        let facts = local_facts(&cfg, &health.borrow());
        let m = &agent.inner.metrics;
        let handover = crate::handover::Handover::new()
            .with_metrics(m.handover_windows.clone(), m.handover_off.clone());
        let mut d = Self {
            sealer: seal::Sealer::new(&c.keys, &me, epoch),
            opener: seal::Opener::new(&c.keys),
            core: Core::new(cfg.clone(), facts, false, Instant::now()),
            swim: None,
            agent,
            socket: None,
            epoch,
            desired,
            health,
            ownership,
            bind_failed_logged: None,
            handover_synced: false,
            l2_timing_running: None,
            l2: BTreeMap::new(),
            handover,
            l2_vips: BTreeMap::new(),
            l2_mode: Mode::Announce,
            reannounce: 0,
            stalls_seen: 0,
            listeners: None,
        };
        d.listeners = d.agent.listeners.clone();
        d.core = Core::new(cfg.clone(), d.core_facts(), false, Instant::now());
        let gossip = match socket {
            Some(s) => {
                d.attach(s);
                true
            }
            // a restarted agent opens its socket itself
            None => d.bind_if_needed(),
        };
        if gossip {
            d.core = Core::new(cfg, d.core_facts(), true, Instant::now());
        }
        Ok(d)
    }

    fn cfg(&self) -> Arc<Config> {
        self.core.config().clone()
    }

    fn core_facts(&self) -> crate::owner::Facts {
        self.facts_of(&self.cfg())
    }

    /// This node's facts under `cfg`: address families, healthy local-only services, and the
    /// VIPs of `cfg` whose listener is not open.
    fn facts_of(&self, cfg: &Config) -> crate::owner::Facts {
        let mut f = local_facts(cfg, &self.health.borrow());
        if let Some(l) = &self.listeners {
            let closed = l.borrow();
            f.closed = cfg
                .services
                .iter()
                .flat_map(|s| s.vips.iter())
                .filter(|v| closed.contains(v))
                .copied()
                .collect();
        }
        f
    }

    /// Starts gossiping on `socket` (SWIM; the core tracks the peers).
    fn attach(&mut self, socket: UdpSocket) {
        let cfg = self.cfg();
        let c = &cfg.cluster;
        let id = swim::Id {
            name: cfg.node.name.clone(),
            addr: c.advertise,
            bump: self.epoch,
        };
        self.swim = Some(swim::Swim::new(
            id,
            swim::config(c.peers.len() + 1, c.profile == FailureProfile::Fast),
            self.epoch,
        ));
        self.socket = Some(socket);
    }

    /// Opens the gossip socket once the configuration has peers (they may come after start:
    /// a reload, or Node objects listed later). Until it is open, peers are unknown and this
    /// node must not claim what they may own, so it stays unsettled (`settling`). Returns
    /// whether it opened now.
    fn bind_if_needed(&mut self) -> bool {
        let cfg = self.cfg();
        if self.socket.is_some() || cfg.cluster.peers.is_empty() {
            return false;
        }
        let Some(bind) = self.agent.binder.clone() else {
            return false;
        };
        match bind(cfg.cluster.bind) {
            Ok(s) => {
                info!(bind = %cfg.cluster.bind, peers = cfg.cluster.peers.len(), "gossip socket open");
                self.attach(s);
                true
            }
            Err(e) => {
                if self
                    .bind_failed_logged
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    warn!(bind = %cfg.cluster.bind, %e, reason = "gossipUnbound", "cannot open the gossip socket; retrying");
                    self.bind_failed_logged = Some(Instant::now());
                }
                false
            }
        }
    }

    /// Opens the socket if needed and tells the core.
    async fn bind_and_tell(&mut self) {
        if self.bind_if_needed() {
            self.handle(Event::GossipOpen).await;
        }
    }

    /// The announcers' timing from the configuration and the failure profile.
    fn l2_timing(&self) -> announce::Timing {
        let cfg = self.cfg();
        let a = &cfg.cluster.announce;
        let det = self.core.detection();
        announce::Timing {
            count: a.count,
            interval: a.interval,
            refresh: a.refresh,
            conflict_grace: (det.dead_after() + det.interval * 2).max(Duration::from_millis(100)),
            release_grace: Duration::from_secs(1),
            reannounce_delay: det.dead_after() + det.interval,
        }
    }

    /// Opens an announcer on each of `names` (and, the first time any is opened, brings the
    /// handover rules in line: the binary removed a crashed predecessor's VIPs from `lo` with
    /// [`announce::clear_stale`] before anything put new ones there).
    fn open_announcers(&mut self, names: &[String]) -> Result<(), Error> {
        if names.is_empty() {
            return Ok(());
        }
        // Not `announce::clear_stale` here: by now the BGP task may have put this process's
        // own VIPs on lo with the same mark, and taking them off left a joining node
        // announcing a route it could not deliver for up to a second.
        if !self.handover_synced {
            self.handover_synced = true;
            let h = self.handover.clone();
            tokio::spawn(async move { h.sync().await });
        }
        let timing = self.l2_timing();
        let cfg = self.cfg();
        for name in names {
            let Some(i) = cfg.node.interfaces.iter().find(|i| &i.name == name) else {
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
            .cfg()
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
        self.push_l2();
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
            let addr = self.core.peer_address(&to.name).unwrap_or(to.addr);
            self.send(Kind::Swim, &data, addr).await;
        }
        for n in out.notes {
            debug!(?n, "swim");
        }
    }

    async fn send_heartbeat(&mut self, hb: &Heartbeat, to: &[NodeId]) {
        let body = hb.encode();
        for name in to {
            if let Some(p) = self.core.peer_address(name) {
                self.send(Kind::Heartbeat, &body, p).await;
            }
        }
    }

    /// Hands the core one event now and performs what it asks.
    async fn handle(&mut self, ev: Event) {
        let actions = self.core.handle(ev, Instant::now());
        self.apply(actions).await;
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        let mut l2 = false;
        let cfg = self.cfg();
        let agent = self.agent.clone();
        let m = &agent.inner.metrics;
        for a in actions {
            match a {
                Action::Heartbeat(hb, to) => self.send_heartbeat(&hb, &to).await,
                Action::Claim { vip, from } => {
                    m.takeovers.inc();
                    let iface = interface_for(&cfg, vip).unwrap_or("-");
                    // One INFO line per VIP per move on each side (the announcer and the
                    // handover log their details at debug level).
                    match from {
                        Some(to) => {
                            info!(%vip, %iface, reason = "owner", previous = %to, "took over (in-flight connections forwarded to the previous owner)")
                        }
                        None => info!(%vip, %iface, reason = "owner", "took over"),
                    }
                    self.l2_vips.insert(vip, from);
                    l2 = true;
                }
                Action::Release {
                    vip,
                    reason,
                    new_owner,
                } => {
                    info!(%vip, reason, new_owner = %new_owner.unwrap_or_default(), "released");
                    m.releases.inc();
                    self.l2_vips.remove(&vip);
                    l2 = true;
                }
                Action::Reannounce => {
                    self.reannounce += 1;
                    l2 = true;
                }
                Action::Drain => {
                    self.l2_mode = Mode::Drain;
                    l2 = true;
                }
                Action::Ownership(view) => {
                    self.ownership.send_if_modified(|cur| {
                        if **cur == view {
                            false
                        } else {
                            *cur = Arc::new(view);
                            true
                        }
                    });
                }
                Action::Members(members) => {
                    m.alive
                        .set(members.iter().filter(|m| m.state != "down").count() as i64);
                    *agent
                        .inner
                        .members
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = members;
                }
            }
        }
        m.owned.set(self.l2_vips.len() as i64);
        let stalls = self.core.stalls();
        m.stalls.inc_by(stalls.saturating_sub(self.stalls_seen));
        self.stalls_seen = stalls;
        if l2 {
            self.push_l2();
        }
    }

    fn push_l2(&self) {
        let cfg = self.cfg();
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
        // a `bgp`-only VIP (`owner_only`) has an owner but is never announced on a link
        let l2: BTreeSet<IpAddr> = cfg
            .services
            .iter()
            .filter(|s| s.announce.l2())
            .flat_map(|s| s.vips.iter().copied())
            .collect();
        for (v, from) in self.l2_vips.iter().filter(|(v, _)| l2.contains(v)) {
            if let Some(i) = interface_for(&cfg, *v)
                && let Some(m) = per_if.get_mut(i)
            {
                m.vips.insert(*v, self.l2_mode);
                if let Some(to) = from {
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
    async fn drain_socket(&mut self, buf: &mut [u8]) {
        for _ in 0..1024 {
            let Some(sock) = &self.socket else { break };
            match sock.try_recv_from(buf) {
                Ok((n, from)) => {
                    let data = buf[..n].to_vec();
                    self.on_packet(&data, from).await;
                }
                Err(_) => break,
            }
        }
    }

    async fn on_packet(&mut self, data: &[u8], from: SocketAddr) {
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
                return;
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
                    match s.handle_data(&opened.body, Instant::now()) {
                        Ok(out) => self.flush_swim(out).await,
                        Err(e) => debug!(%e, "swim packet rejected"),
                    }
                }
            }
            Kind::Heartbeat => match Heartbeat::decode(&opened.body) {
                Ok(hb) => {
                    self.handle(Event::Heartbeat {
                        from: opened.sender,
                        epoch: opened.epoch,
                        hb,
                    })
                    .await
                }
                Err(e) => debug!(%e, "heartbeat malformed"),
            },
        }
    }

    async fn reload(&mut self) -> Result<(), Error> {
        let cfg = self.desired.borrow_and_update().config.clone();
        // new keys, same counters and replay windows (a rebuilt opener would accept one
        // captured packet per sender again; a rebuilt sealer's packets would be replays)
        self.sealer.set_keys(&cfg.cluster.keys);
        self.opener.set_keys(&cfg.cluster.keys);
        let facts = self.facts_of(&cfg);
        self.handle(Event::Config(cfg, facts)).await;
        self.bind_and_tell().await;
        self.sync_l2().await
    }

    async fn swim_join_missing(&mut self, now: Instant) {
        let active: BTreeSet<String> = self
            .swim
            .as_ref()
            .map(|s| s.active().into_iter().map(|i| i.name).collect())
            .unwrap_or_default();
        let missing: Vec<(String, SocketAddr)> = self
            .core
            .peers()
            .filter(|(n, _)| !active.contains(*n))
            .map(|(n, a)| (n.clone(), a))
            .collect();
        for (n, a) in missing {
            if let Some(s) = self.swim.as_mut()
                && let Ok(o) = s.announce(&n, a, now)
            {
                self.flush_swim(o).await;
            }
        }
    }

    pub(crate) async fn run(&mut self, shutdown: CancellationToken) -> Result<(), Error> {
        self.sync_l2().await?;
        let now = Instant::now();
        self.swim_join_missing(now).await;
        self.handle(Event::Start).await;
        let mut next_join = now + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        loop {
            let now = Instant::now();
            let mut wake = self.core.next_wake(now).min(next_join);
            if let Some(t) = self.swim.as_ref().and_then(|s| s.next_timer()) {
                wake = wake.min(t);
            }
            let sock = &self.socket;
            let bufr = &mut buf;
            let recv = async move {
                match sock {
                    Some(s) => s.recv_from(bufr).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = recv => match r {
                    Ok((n, from)) => {
                        let data = buf[..n].to_vec();
                        self.on_packet(&data, from).await;
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
                }
                r = self.health.changed() => {
                    if r.is_ok() {
                        self.health.borrow_and_update();
                        let f = self.core_facts();
                        self.handle(Event::Facts(f)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                }
                r = async {
                    match self.listeners.as_mut() {
                        Some(l) => l.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_ok() {
                        let f = self.core_facts();
                        self.handle(Event::Facts(f)).await;
                    } else {
                        self.listeners = None;
                    }
                }
                () = sleep_until(wake) => {
                    // Heartbeats the kernel already holds count before any expiry: a stall of
                    // this task must not make it declare a live peer dead.
                    self.drain_socket(&mut buf).await;
                    let now = Instant::now();
                    if let Some(s) = self.swim.as_mut() {
                        match s.fire_due(now) {
                            Ok(out) => self.flush_swim(out).await,
                            Err(e) => debug!(%e, "swim timer"),
                        }
                    }
                    if now >= next_join {
                        next_join = now + Duration::from_secs(2);
                        self.swim_join_missing(now).await;
                    }
                    if self.socket.is_none() {
                        self.bind_and_tell().await;
                    }
                    self.handle(Event::Tick).await;
                }
            }
        }
        self.leave().await
    }

    /// Graceful leave: tell everyone, stop answering, wait until the VIPs we owned are claimed
    /// elsewhere (bounded), then release.
    async fn leave(&mut self) -> Result<(), Error> {
        let had = self.core.owned().clone();
        info!(vips = had.len(), "leaving the cluster");
        self.handle(Event::Leave).await;
        if let Some(s) = self.swim.as_mut() {
            match s.leave(Instant::now()) {
                Ok(out) => self.flush_swim(out).await,
                Err(e) => debug!(%e, "swim leave"),
            }
        }
        let det = self.core.detection();
        let deadline = Instant::now() + Duration::from_secs(2).max(det.dead_after() * 10);
        let mut buf = vec![0u8; 65536];
        for _ in 0..100_000 {
            let now = Instant::now();
            let taken = self.core.handed_over(&had, now);
            if taken || now >= deadline {
                if !taken {
                    warn!("leaving before every VIP was taken over");
                }
                break;
            }
            let Some(sock) = &self.socket else { break };
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { break };
                    let data = buf[..n].to_vec();
                    self.on_packet(&data, from).await;
                }
                () = sleep_until((now + det.interval).min(deadline)) => {
                    // leaving: every peer hears it at the fast rate (it is gone for them anyway)
                    let hb = self.core.heartbeat();
                    let all: Vec<NodeId> = self.core.peers().map(|(n, _)| n.clone()).collect();
                    self.send_heartbeat(&hb, &all).await;
                }
            }
        }
        // packets already on their way to us are still delivered locally
        tokio::time::sleep(det.interval * 2 + Duration::from_millis(50)).await;
        self.handle(Event::Released).await;
        Ok(())
    }

    /// Closes the announcers and waits until they have removed their addresses.
    pub(crate) async fn finish(&mut self) {
        for (_, (tx, task)) in std::mem::take(&mut self.l2) {
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.handover.clear().await;
    }
}
