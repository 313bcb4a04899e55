//! Who hears a node at the profile's rate: in clusters over [`FULL_MESH_PEERS`] peers only
//! its *watchers* — the peers that would own one of its VIPs if it died, and peers claiming
//! one — while every other peer hears it every [`SLOW_INTERVAL`] and expires it only after
//! its dead-after time scaled to that interval. Replayed on the pure core with made-up
//! instants.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::core::{Action, Core, Event, FULL_MESH_PEERS, SLOW_INTERVAL};
use agent::local_facts;
use agent::owner::{self, Facts, MemberView};
use agent::wire::Heartbeat;
use model::{Config, HealthView};
use tokio::time::Instant;

const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const VIP: &str = "10.0.9.100";

fn name(i: usize) -> String {
    format!("node-{i}")
}

/// Node `me` of an `n`-node cluster with one VIP whose home is node-0.
fn config(me: usize, n: usize) -> Config {
    let peers: Vec<String> = (0..n)
        .filter(|j| *j != me)
        .map(|j| {
            format!(
                "    - {{name: {}, address: 10.0.0.{}:7946}}",
                name(j),
                j + 1
            )
        })
        .collect();
    let yaml = format!(
        "node:\n  name: {}\n  interfaces: [{{name: test0, addresses: [10.0.0.{}/16]}}]\n\
         cluster:\n  bind: 10.0.0.{}:7946\n  peers:\n{}\n  keys: [{{id: 1, secret: \"{KEY}\"}}]\n  hold_down: 1s\n\
         services:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{port: 80}}]\n    placement: {{preferred: [node-0]}}\n    backends: [{{address: 192.168.0.1}}]\n",
        name(me),
        me + 1,
        me + 1,
        peers.join("\n")
    );
    model::config::parse(&yaml, &Default::default()).expect("test config is valid")
}

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

fn peer_hb(interval: Duration, claims: &[IpAddr]) -> Heartbeat {
    Heartbeat {
        leaving: false,
        interval,
        facts: Facts {
            v4: true,
            ..Default::default()
        },
        claims: claims.iter().copied().collect(),
    }
}

/// Heartbeats sent in `acts`: (recipient, announced interval).
fn sent(acts: &[Action]) -> Vec<(String, Duration)> {
    acts.iter()
        .flat_map(|a| match a {
            Action::Heartbeat(hb, to) => to.iter().map(|n| (n.clone(), hb.interval)).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// Node 0 hears every peer of an `n`-node cluster at `now` (claiming nothing).
fn hear_all(c: &mut Core, n: usize, now: Instant) {
    let d = c.detection();
    for j in 1..n {
        c.handle(
            Event::Heartbeat {
                from: name(j),
                epoch: 1,
                hb: peer_hb(d.interval, &[]),
            },
            now,
        );
    }
}

/// Node 0 of an `n`-node cluster, every peer heard once (claiming nothing), settled and owning
/// the VIP, at the returned instant.
fn owner_of(n: usize) -> (Core, Instant) {
    let t0 = Instant::now();
    let cfg = config(0, n);
    let f = local_facts(&cfg, &HealthView::new());
    let mut c = Core::new(Arc::new(cfg), f, true, t0);
    c.handle(Event::Start, t0);
    let d = c.detection();
    let mut now = t0;
    hear_all(&mut c, n, now);
    // the peers keep heartbeating until node 0 has settled and claimed
    while !c.owned().contains(&vip()) {
        now += d.interval;
        assert!(now < t0 + Duration::from_secs(2), "node 0 never claimed");
        hear_all(&mut c, n, now);
        c.handle(Event::Tick, now);
    }
    (c, now)
}

/// Who the owner function gives the VIP to when node 0 is gone (all others alive).
fn successor(n: usize) -> String {
    let cfg = config(1, n);
    let nodes: BTreeSet<String> = (0..n).map(name).collect();
    let alive: BTreeMap<String, MemberView> = (1..n)
        .map(|j| {
            (
                name(j),
                MemberView {
                    alive_for: Duration::from_secs(10),
                    facts: Facts {
                        v4: true,
                        ..Default::default()
                    },
                    claims: BTreeSet::new(),
                },
            )
        })
        .collect();
    let d = owner::decide(&owner::Inputs {
        me: "node-1",
        nodes: &nodes,
        services: &cfg.services,
        alive: &alive,
        preemptive: true,
        hold_down: Duration::from_secs(1),
    });
    d[&vip()].owner.clone().expect("someone takes it")
}

#[test]
fn a_large_cluster_hears_an_owner_fast_only_at_its_vips_successor() {
    let n = FULL_MESH_PEERS + 5;
    let (mut c, mut now) = owner_of(n);
    let succ = successor(n);
    assert_eq!(c.watchers(), &BTreeSet::from([succ.clone()]));
    let d = c.detection();
    // two seconds of ticks (peers silent but their dead-after is not reached for the slow ones:
    // keep them alive by heartbeating every interval)
    let mut fast: BTreeMap<String, usize> = BTreeMap::new();
    let mut slow: BTreeMap<String, usize> = BTreeMap::new();
    let until = now + Duration::from_secs(2);
    while now < until {
        let next = c.next_wake(now).min(now + d.interval);
        now = next;
        hear_all(&mut c, n, now);
        for (to, every) in sent(&c.handle(Event::Tick, now)) {
            if every == d.interval {
                *fast.entry(to).or_default() += 1;
            } else {
                assert_eq!(every, SLOW_INTERVAL);
                *slow.entry(to).or_default() += 1;
            }
        }
    }
    // the successor: one heartbeat per interval (2 s / 40 ms = 50), nobody else at that rate
    assert_eq!(fast.keys().collect::<Vec<_>>(), [&succ], "{fast:?}");
    assert!(fast[&succ] >= 49, "{fast:?}");
    // every other peer: one per SLOW_INTERVAL
    assert_eq!(slow.len(), n - 2, "{slow:?}");
    assert!(slow.values().all(|k| (2..=3).contains(k)), "{slow:?}");
    assert!(!slow.contains_key(&succ));
}

#[test]
fn a_small_cluster_is_a_full_mesh() {
    let (c, _) = owner_of(3);
    assert_eq!(
        c.watchers(),
        &BTreeSet::from([name(1), name(2)]),
        "with up to {FULL_MESH_PEERS} peers every peer hears every heartbeat"
    );
}

#[test]
fn a_peer_leaving_the_fast_rate_hears_the_slow_interval_at_once_and_again() {
    let n = FULL_MESH_PEERS + 5;
    let (mut c, now) = owner_of(n);
    let succ = successor(n);
    // the balancer cannot open the VIP's listener here: node 0 releases it and has no
    // watchers left; the former one hears the slow interval at once…
    let mut f = local_facts(c.config(), &HealthView::new());
    f.closed.insert(vip());
    let acts = c.handle(Event::Facts(f), now);
    assert!(c.owned().is_empty(), "{acts:?}");
    assert!(c.watchers().is_empty());
    let told = sent(&acts);
    assert!(
        told.contains(&(succ.clone(), SLOW_INTERVAL)),
        "the demoted watcher is told: {told:?}"
    );
    // …and at the next three fast ticks, in case a packet is lost
    let d = c.detection();
    let mut again = 0;
    let mut t = now;
    for _ in 0..6 {
        t += d.interval;
        again += sent(&c.handle(Event::Tick, t))
            .iter()
            .filter(|(to, every)| *to == succ && *every == SLOW_INTERVAL)
            .count();
    }
    assert_eq!(again, 3);
}

#[test]
fn a_peer_heard_at_the_slow_interval_expires_only_after_the_scaled_dead_after() {
    // node 1 (not node 0's successor) hears node 0 every SLOW_INTERVAL
    let n = FULL_MESH_PEERS + 5;
    let t0 = Instant::now();
    let cfg = config(1, n);
    let f = local_facts(&cfg, &HealthView::new());
    let mut c = Core::new(Arc::new(cfg), f, true, t0);
    c.handle(Event::Start, t0);
    let d = c.detection();
    let scaled = d
        .dead_after()
        .mul_f64(SLOW_INTERVAL.as_secs_f64() / d.interval.as_secs_f64());
    c.handle(
        Event::Heartbeat {
            from: name(0),
            epoch: 1,
            hb: peer_hb(SLOW_INTERVAL, &[vip()]),
        },
        t0,
    );
    let alive = |c: &Core, now| {
        c.members_at(now)
            .iter()
            .any(|m| m.name == name(0) && m.state != "down")
    };
    assert!(alive(&c, t0 + scaled - Duration::from_millis(1)));
    assert!(!alive(&c, t0 + scaled + Duration::from_millis(1)));
}

#[test]
fn a_peer_heard_for_the_first_time_or_restarted_is_answered_at_once() {
    let n = FULL_MESH_PEERS + 5;
    let (mut c, now) = owner_of(n);
    let succ = successor(n);
    let other = (1..n)
        .map(name)
        .find(|p| *p != succ)
        .expect("a non-watcher");
    let d = c.detection();
    // an ordinary heartbeat of a peer already alive: no answer out of turn
    let acts = c.handle(
        Event::Heartbeat {
            from: other.clone(),
            epoch: 1,
            hb: peer_hb(d.interval, &[]),
        },
        now,
    );
    assert!(sent(&acts).iter().all(|(to, _)| *to != other), "{acts:?}");
    // the same peer restarted (a newer epoch) before anybody expired it: answered at once,
    // so that it hears this node's claims before its settling ends
    let acts = c.handle(
        Event::Heartbeat {
            from: other.clone(),
            epoch: 2,
            hb: peer_hb(d.interval, &[]),
        },
        now,
    );
    assert_eq!(
        sent(&acts),
        [(other.clone(), SLOW_INTERVAL)],
        "answered with the interval it gets"
    );
    let hb = acts.iter().find_map(|a| match a {
        Action::Heartbeat(hb, _) => Some(hb.clone()),
        _ => None,
    });
    assert!(hb.expect("sent").claims.contains(&vip()));
}
