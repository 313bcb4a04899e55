//! BGP announcement in the binary: the neighbours and routes handed to the speaker
//! ([`bgp::Speaker`]), the announced VIPs put on `lo` for local delivery, and the `/status`
//! rows.
//!
//! ```text
//!  Desired ─┬──> peers_of ───────────────────────────> Speaker (sessions, BFD)
//!  Health ──┤                                            ^
//!  Owners ──┼──> model::bgp::decide ──> routes_of ───────┘
//!  stopping ┘          │
//!                      └──> decisions ──> lo addresses, /status
//! ```
//! The agent is given the configuration without `bgp`-only services ([`model::bgp::l2_view`]),
//! so no node answers ARP / NDP for them; their VIPs go on `lo` here while announced.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bgp::{PeerConfig, Prefix, RouteAttrs, Routes};
use model::bgp::{RouteDecisions, RouteReason};
use model::{
    BgpRouteStatus, BgpSessionStatus, BgpStatus, Config, Desired, HealthView, OwnershipView,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The speaker's neighbours for a configuration (none without a `bgp` section).
pub fn peers_of(cfg: &Config) -> Vec<PeerConfig> {
    let Some(b) = &cfg.bgp else {
        return Vec::new();
    };
    // validation guarantees a router id (configured or the node's first IPv4 address)
    let Some(router_id) = b.router_id else {
        return Vec::new();
    };
    b.peers
        .iter()
        .map(|p| {
            let local_asn = p.local_asn.unwrap_or(b.asn);
            let mut c = PeerConfig::new(&p.name, p.address, local_asn, p.asn, router_id);
            c.port = p.port;
            c.source = p.source;
            c.password = p.password.as_ref().map(|pw| pw.0.clone());
            c.hold_time = p.hold_time;
            c.passive = p.passive;
            c.multihop = p.multihop;
            c.bfd = p.bfd.map(|t| bgp::BfdTimers {
                interval: t.interval,
                multiplier: t.multiplier,
            });
            c.graceful_restart = p.graceful_restart;
            c
        })
        .collect()
}

/// The routes to announce: per announced VIP its prefix (a host route, or the VIP masked to
/// the service's aggregation length: VIPs of one aggregate make one route), with its
/// service's attributes and the peers it goes to (`bgp.peers` of the service; none named:
/// every peer). An aggregate of several services goes to the peers of each of them.
pub fn routes_of(d: &RouteDecisions) -> Routes {
    let mut out = Routes::new();
    for (vip, r) in d.iter().filter(|(_, r)| r.announced()) {
        let (addr, len) = model::bgp::announced_prefix(*vip, &r.attrs);
        let prefix = Prefix::new(addr, len).unwrap_or_else(|| Prefix::host(*vip));
        let peers: Option<BTreeSet<String>> =
            (!r.attrs.peers.is_empty()).then(|| r.attrs.peers.iter().cloned().collect());
        let attrs = RouteAttrs {
            communities: r.attrs.communities.iter().map(|c| c.0).collect(),
            large_communities: r.attrs.large_communities.iter().map(|c| c.0).collect(),
            local_pref: r.attrs.local_pref,
            med: r.attrs.med,
            peers,
        };
        match out.get_mut(&prefix) {
            None => {
                out.insert(prefix, attrs);
            }
            Some(have) => {
                // the last VIP's attributes (as before), the union of the peers
                let peers = match (have.peers.take(), attrs.peers.clone()) {
                    (Some(mut a), Some(b)) => {
                        a.extend(b);
                        Some(a)
                    }
                    _ => None,
                };
                *have = RouteAttrs { peers, ..attrs };
            }
        }
    }
    out
}

/// The channels the decision task writes.
pub struct Outputs {
    /// Neighbours, for the speaker.
    pub peers: watch::Sender<Arc<Vec<PeerConfig>>>,
    /// Routes, for the speaker.
    pub routes: watch::Sender<Arc<Routes>>,
    /// Every BGP VIP's decision, for `lo` and `/status`.
    pub decisions: watch::Sender<Arc<RouteDecisions>>,
}

/// Follows desired state, health, ownership and `stopping` (the graceful stop) and publishes
/// the neighbours, routes and decisions whenever they change, logging each VIP whose reason
/// changed, until `stop`.
pub async fn decide(
    mut desired: watch::Receiver<Arc<Desired>>,
    mut health: watch::Receiver<Arc<HealthView>>,
    mut own: watch::Receiver<Arc<OwnershipView>>,
    mut stopping: watch::Receiver<bool>,
    out: Outputs,
    stop: CancellationToken,
) {
    let mut open = [true; 4];
    loop {
        let cfg = desired.borrow_and_update().config.clone();
        let h = health.borrow_and_update().clone();
        let o = own.borrow_and_update().clone();
        let s = *stopping.borrow_and_update();
        let d = model::bgp::decide(&cfg, &cfg.node.name, &h, &o, s);
        let peers = peers_of(&cfg);
        out.peers.send_if_modified(|cur| {
            let changed = **cur != peers;
            if changed {
                *cur = Arc::new(peers);
            }
            changed
        });
        out.decisions.send_if_modified(|cur| {
            if **cur == d {
                return false;
            }
            for (vip, r) in &d {
                if cur.get(vip).map(|c| c.reason) != Some(r.reason) {
                    info!(%vip, service = %r.service, reason = r.reason.as_str(), "bgp route");
                }
            }
            *cur = Arc::new(d.clone());
            true
        });
        let routes = routes_of(&d);
        out.routes.send_if_modified(|cur| {
            let changed = **cur != routes;
            if changed {
                *cur = Arc::new(routes);
            }
            changed
        });
        // a closed input keeps its last value: the source ends at shutdown, before the
        // graceful stop's withdrawal has been decided here
        tokio::select! {
            () = stop.cancelled() => return,
            r = desired.changed(), if open[0] => open[0] = r.is_ok(),
            r = health.changed(), if open[1] => open[1] = r.is_ok(),
            r = own.changed(), if open[2] => open[2] = r.is_ok(),
            r = stopping.changed(), if open[3] => open[3] = r.is_ok(),
        }
    }
}

/// The configuration the agent works from: the same generation without `bgp`-only services.
pub fn l2_desired(d: &Desired) -> Arc<Desired> {
    Arc::new(Desired {
        generation: d.generation,
        config: Arc::new(model::bgp::l2_view(&d.config)),
    })
}

/// Forwards [`l2_desired`] of every snapshot after `first` (which `tx` holds already) to `tx`
/// until `stop`.
pub async fn follow_l2(
    mut desired: watch::Receiver<Arc<Desired>>,
    tx: watch::Sender<Arc<Desired>>,
    first: Arc<Desired>,
    stop: CancellationToken,
) {
    let mut last = first;
    loop {
        let d = desired.borrow_and_update().clone();
        if !Arc::ptr_eq(&d, &last) {
            tx.send_replace(l2_desired(&d));
            last = d;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
        }
    }
}

/// Keeps every announced VIP on `lo` (so the routed packets are delivered locally) until
/// `stop` (the end of the drain: a graceful stop's `stopping` VIPs stay), then takes off what
/// it added. Addresses are added with the agent's `IFA_PROTO` mark;
/// one that was there already (the host's, or the agent's for an `announce: both` VIP it owns)
/// is not ours and is left alone; an address this task added stays while the agent owns the
/// VIP. Checked on every change and every second (the binary clears marked addresses once at
/// start, before this task runs). Loopback VIPs are never touched.
pub async fn local_delivery(
    mut decisions: watch::Receiver<Arc<RouteDecisions>>,
    mut own: watch::Receiver<Arc<OwnershipView>>,
    stop: CancellationToken,
) {
    let lo = match sys::if_index("lo") {
        Ok(i) => i,
        Err(e) => {
            warn!(%e, "no lo interface: BGP VIPs are not put on lo");
            return;
        }
    };
    let prefix = |ip: IpAddr| if ip.is_ipv4() { 32 } else { 128 };
    let mut added: BTreeSet<IpAddr> = BTreeSet::new();
    let mut warned: BTreeSet<IpAddr> = BTreeSet::new();
    let mut open = [true; 2];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let want: BTreeSet<IpAddr> = decisions
            .borrow_and_update()
            .iter()
            // withdrawn for a graceful stop: still delivered here until the drain ends
            .filter(|(ip, r)| {
                (r.announced() || r.reason == RouteReason::Stopping) && !ip.is_loopback()
            })
            .map(|(ip, _)| *ip)
            .collect();
        let owned_here: BTreeSet<IpAddr> = own
            .borrow_and_update()
            .iter()
            .filter(|(_, o)| o.reason == "owner")
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &want {
            match sys::addr_add(lo, *ip, prefix(*ip)) {
                Ok(true) => {
                    info!(vip = %ip, "bgp VIP on lo");
                    added.insert(*ip);
                    warned.remove(ip);
                }
                Ok(false) => {}
                Err(e) => {
                    if warned.insert(*ip) {
                        warn!(vip = %ip, %e, "cannot put the BGP VIP on lo; routed packets to it are not delivered here");
                    }
                }
            }
        }
        let gone: Vec<IpAddr> = added
            .iter()
            .filter(|ip| !want.contains(ip) && !owned_here.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            remove(lo, ip, prefix(ip));
            added.remove(&ip);
        }
        // closed inputs keep their last value: only `stop` (after the drain) ends this
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            r = decisions.changed(), if open[0] => open[0] = r.is_ok(),
            r = own.changed(), if open[1] => open[1] = r.is_ok(),
        }
    }
    for ip in added {
        remove(lo, ip, prefix(ip));
    }
}

fn remove(lo: u32, ip: IpAddr, prefix: u8) {
    match sys::addr_del(lo, ip, prefix) {
        Ok(()) => info!(vip = %ip, "bgp VIP off lo"),
        Err(e) => warn!(vip = %ip, %e, "cannot take the BGP VIP off lo"),
    }
}

/// The graceful stop's first step: with `stopping` set the routes are empty; wait until every
/// established session has sent the withdrawals (at most `max_wait`), then `grace` so the
/// peers move the traffic away, before the caller drains. Returns at once when nothing was
/// announced.
pub async fn withdraw(
    speaker: &bgp::Speaker,
    stopping: &watch::Sender<bool>,
    routes: &watch::Receiver<Arc<Routes>>,
    grace: Duration,
    max_wait: Duration,
) {
    let announced = !routes.borrow().is_empty();
    stopping.send_replace(true);
    if !announced {
        return;
    }
    info!("withdrawing BGP routes before draining");
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut routes = routes.clone();
    // the decision task publishes the empty routes; then the sessions write them
    while !routes.borrow_and_update().is_empty() || !speaker.in_sync() {
        if tokio::time::Instant::now() >= deadline {
            warn!(
                "BGP withdrawals not all sent after {}; going on",
                model::duration::format(max_wait)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(
        grace = %model::duration::format(grace),
        "BGP routes withdrawn; waiting for the peers"
    );
    tokio::time::sleep(grace).await;
}

/// The `/status` rows: sessions and route decisions, when `bgp` is configured.
pub fn status(
    cfg: &Config,
    speaker: &bgp::Speaker,
    decisions: &RouteDecisions,
) -> Option<BgpStatus> {
    cfg.bgp.as_ref()?;
    let now = SystemTime::now();
    Some(BgpStatus {
        sessions: speaker
            .sessions()
            .into_iter()
            .map(|s| BgpSessionStatus {
                peer: s.peer,
                address: s.address,
                state: s.state.to_string(),
                uptime_seconds: s
                    .since
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| d.as_secs()),
                prefixes_sent: s.prefixes_sent,
                updates_sent: s.updates_sent,
                flaps: s.flaps,
                last_error: s.last_error,
                bfd: s.bfd.map(str::to_string),
            })
            .collect(),
        routes: decisions
            .iter()
            .map(|(vip, r)| BgpRouteStatus {
                service: r.service.clone(),
                address: *vip,
                reason: r.reason.as_str().to_string(),
            })
            .collect(),
        ecmp_rescue: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::config::{Environment, parse};

    const SRC: &str = "node: {name: n1, interfaces: [{name: eth0, addresses: [192.0.2.10/24]}]}\nbgp:\n  asn: 64512\n  peers:\n    - {name: tor1, address: 192.0.2.1, asn: 64512, port: 1179, hold_time: 9s, bfd: fast, multihop: 3, graceful_restart: off, passive: true, source: 192.0.2.10}\nservices:\n  - name: web\n    vips: [198.51.100.7, 2001:db8::7]\n    ports: [{port: 80}]\n    backends: [{name: a, address: 10.0.0.1}]\n    announce: bgp\n    bgp: {communities: [\"64512:100\"], large_communities: [\"64512:1:2\"], local_pref: 200, med: 10}\n  - {name: l2, vips: [192.0.2.50], ports: [{port: 80}], backends: [{address: 10.0.0.1}]}\n";

    #[test]
    fn peers_and_routes_carry_the_configuration() {
        let cfg = parse(SRC, &Environment::default()).unwrap();
        let peers = peers_of(&cfg);
        let p = &peers[0];
        assert_eq!((p.local_asn, p.remote_asn, p.port), (64512, 64512, 1179));
        assert_eq!(
            p.router_id,
            "192.0.2.10".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(p.hold_time, Duration::from_secs(9));
        assert_eq!(p.bfd, Some(bgp::BfdTimers::FAST));
        assert_eq!(
            (p.multihop, p.passive, p.graceful_restart),
            (Some(3), true, None)
        );
        assert_eq!(p.source, Some("192.0.2.10".parse().unwrap()));
        let d = model::bgp::decide(
            &cfg,
            &cfg.node.name,
            &HealthView::new(),
            &OwnershipView::new(),
            false,
        );
        assert!(d.values().all(|r| r.reason == RouteReason::Announced));
        let routes = routes_of(&d);
        let keys: Vec<String> = routes.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["198.51.100.7/32", "2001:db8::7/128"]);
        let a = routes.values().next().unwrap();
        assert_eq!(a.communities, vec![64512 << 16 | 100]);
        assert_eq!(a.large_communities, vec![[64512, 1, 2]]);
        assert_eq!((a.local_pref, a.med), (Some(200), Some(10)));
        assert_eq!(a.peers, None, "no peers named: every peer");
        // stopping withdraws every route
        let d = model::bgp::decide(
            &cfg,
            &cfg.node.name,
            &HealthView::new(),
            &OwnershipView::new(),
            true,
        );
        assert!(routes_of(&d).is_empty());
        // the agent does not see the bgp-only service
        let l2 = l2_desired(&Desired {
            generation: 7,
            config: Arc::new(cfg),
        });
        assert_eq!(l2.generation, 7);
        let names: Vec<&str> = l2.config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["l2"]);
        let none = parse("services: []\n", &Environment::default()).unwrap();
        assert!(peers_of(&none).is_empty());
    }

    #[test]
    fn routes_go_to_the_named_peers_and_an_aggregate_to_the_union() {
        let src = "node: {name: n1, interfaces: [{name: eth0, addresses: [192.0.2.10/24]}]}\nbgp:\n  asn: 64512\n  peers:\n    - {name: tor1, address: 192.0.2.1, asn: 64512}\n    - {name: tor2, address: 192.0.2.2, asn: 64512}\n    - {name: tor3, address: 192.0.2.3, asn: 64512}\nservices:\n  - {name: one, vips: [198.51.100.7], ports: [{port: 80}], backends: [{address: 10.0.0.1}], announce: bgp, bgp: {peers: [tor1]}}\n  - {name: agg1, vips: [203.0.113.1], ports: [{port: 80}], backends: [{address: 10.0.0.1}], announce: bgp, bgp: {peers: [tor2], aggregation_length: 24}}\n  - {name: agg2, vips: [203.0.113.2], ports: [{port: 80}], backends: [{address: 10.0.0.1}], announce: bgp, bgp: {peers: [tor3], aggregation_length: 24}}\n  - {name: all, vips: [192.0.2.99], ports: [{port: 80}], backends: [{address: 10.0.0.1}], announce: bgp}\n";
        let cfg = parse(src, &Environment::default()).unwrap();
        let d = model::bgp::decide(
            &cfg,
            &cfg.node.name,
            &HealthView::new(),
            &OwnershipView::new(),
            false,
        );
        let routes = routes_of(&d);
        let got: Vec<(String, Option<Vec<String>>)> = routes
            .iter()
            .map(|(p, a)| {
                (
                    p.to_string(),
                    a.peers.as_ref().map(|s| s.iter().cloned().collect()),
                )
            })
            .collect();
        let set = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            got,
            [
                ("192.0.2.99/32".to_string(), None),
                ("198.51.100.7/32".to_string(), set(&["tor1"])),
                ("203.0.113.0/24".to_string(), set(&["tor2", "tor3"])),
            ]
        );
    }

    #[tokio::test]
    async fn the_withdrawal_is_decided_after_the_source_has_ended() {
        let cfg = parse(SRC, &Environment::default()).unwrap();
        let (dtx, drx) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(cfg),
        }));
        let (htx, hrx) = watch::channel(Arc::new(HealthView::new()));
        let (otx, orx) = watch::channel(Arc::new(OwnershipView::new()));
        let (stx, srx) = watch::channel(false);
        let (peers, _p) = watch::channel(Arc::new(Vec::new()));
        let (routes, mut rrx) = watch::channel(Arc::new(Routes::new()));
        let (decisions, _d) = watch::channel(Arc::new(RouteDecisions::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(decide(
            drx,
            hrx,
            orx,
            srx,
            Outputs {
                peers,
                routes,
                decisions,
            },
            stop.clone(),
        ));
        let within = Duration::from_secs(5);
        let r = tokio::time::timeout(within, rrx.wait_for(|r| r.len() == 2))
            .await
            .map(|r| r.is_ok());
        assert_eq!(r, Ok(true), "announced");
        // at shutdown the source (and later the agent) end first
        drop((dtx, htx, otx));
        tokio::task::yield_now().await;
        stx.send_replace(true);
        let r = tokio::time::timeout(within, rrx.wait_for(|r| r.is_empty()))
            .await
            .map(|r| r.is_ok());
        assert_eq!(r, Ok(true), "withdrawn after the source ended");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_agent_follows_every_generation_without_bgp_only_services() {
        let cfg = Arc::new(parse(SRC, &Environment::default()).unwrap());
        let first = Arc::new(Desired {
            generation: 1,
            config: cfg.clone(),
        });
        let (dtx, drx) = watch::channel(first.clone());
        let (tx, mut rx) = watch::channel(l2_desired(&first));
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow_l2(drx, tx, first, stop.clone()));
        let mut next = (*cfg).clone();
        next.services.retain(|s| s.name == "web");
        next.services[0].announce = model::bgp::AnnounceMode::Both;
        dtx.send_replace(Arc::new(Desired {
            generation: 2,
            config: Arc::new(next),
        }));
        let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|d| d.generation == 2))
            .await
            .map(|r| {
                r.map(|d| {
                    d.config
                        .services
                        .iter()
                        .map(|s| s.name.clone())
                        .collect::<Vec<_>>()
                })
            });
        assert_eq!(got.ok().and_then(Result::ok), Some(vec!["web".to_string()]));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_graceful_stop_waits_for_the_withdrawal_then_the_grace() {
        let mut reg = prometheus_client::registry::Registry::default();
        let speaker = bgp::Speaker::new(&mut reg);
        let (stopping, _keep) = watch::channel(false);
        // nothing announced: no wait at all
        let (_routes_tx, routes) = watch::channel(Arc::new(Routes::new()));
        let t0 = tokio::time::Instant::now();
        withdraw(
            &speaker,
            &stopping,
            &routes,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(*stopping.borrow());
        // announced: waits until the routes are empty (the decision task), then the grace
        let (stopping, _keep) = watch::channel(false);
        let mut one = Routes::new();
        one.insert(
            Prefix::host("198.51.100.7".parse().unwrap()),
            RouteAttrs::default(),
        );
        let (routes_tx, routes) = watch::channel(Arc::new(one));
        let t0 = tokio::time::Instant::now();
        let mut stop_rx = stopping.subscribe();
        let decider = tokio::spawn(async move {
            stop_rx.wait_for(|s| *s).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            routes_tx.send_replace(Arc::new(Routes::new()));
            routes_tx
        });
        withdraw(
            &speaker,
            &stopping,
            &routes,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(2300) && took < Duration::from_millis(2400),
            "{took:?}"
        );
        drop(decider.await);
    }
}
