//! The agent's pure core driven by replayed event sequences with made-up instants: failure
//! detection at exactly the profile's dead-after time, a stalled node that does not expire peers it has
//! not read yet, conflicts, hold-down and preemptive return, make-before-break leave.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::core::{Action, Core, Event};
use agent::owner::Facts;
use agent::wire::Heartbeat;
use agent::{Detection, local_facts};
use model::{Config, HealthView};
use tokio::time::Instant;

const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const VIP: &str = "10.0.0.100";

/// Node `me` of a two-node cluster {a, b} with one VIP whose home is `home`.
fn config(me: &str, profile: &str, home: &str, preemptive: bool) -> Config {
    let (ip, peer, pip) = if me == "a" { (1, "b", 2) } else { (2, "a", 1) };
    let yaml = format!(
        "node:\n  name: {me}\n  interfaces: [{{name: test0, addresses: [10.0.0.{ip}/24]}}]\n\
         cluster:\n  bind: 10.0.0.{ip}:7946\n  peers: [{{name: {peer}, address: 10.0.0.{pip}:7946}}]\n  keys: [{{id: 1, secret: \"{KEY}\"}}]\n  profile: {profile}\n  hold_down: 1s\n  preemptive: {preemptive}\n\
         services:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{port: 80}}]\n    placement: {{preferred: [{home}]}}\n    backends: [{{address: 192.168.0.1}}]\n"
    );
    model::config::parse(&yaml, &Default::default()).expect("test config is valid")
}

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

fn facts(cfg: &Config) -> Facts {
    local_facts(cfg, &HealthView::new())
}

fn core(cfg: Config, now: Instant) -> Core {
    let f = facts(&cfg);
    Core::new(Arc::new(cfg), f, true, now)
}

/// The heartbeat a peer with the test config's facts sends, claiming `claims`.
fn hb(interval: Duration, claims: &[IpAddr], leaving: bool) -> Heartbeat {
    Heartbeat {
        leaving,
        interval,
        facts: Facts {
            v4: true,
            v6: false,
            ..Default::default()
        },
        claims: claims.iter().copied().collect(),
    }
}

fn from_b(d: Detection, claims: &[IpAddr]) -> Event {
    Event::Heartbeat {
        from: "b".into(),
        epoch: 1,
        hb: hb(d.interval, claims, false),
    }
}

fn claims(actions: &[Action]) -> Vec<IpAddr> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Claim { vip, .. } => Some(*vip),
            _ => None,
        })
        .collect()
}

fn releases(actions: &[Action]) -> Vec<IpAddr> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Release { vip, .. } => Some(*vip),
            _ => None,
        })
        .collect()
}

/// Node a with peer b alive and owning the VIP, b's last heartbeat at the returned instant;
/// a handles every wake-up it asks for, exactly on time, until then.
fn a_with_b_owning(profile: &str) -> (Core, Detection, Instant) {
    let t0 = Instant::now();
    let mut a = core(config("a", profile, "b", true), t0);
    let d = a.detection();
    a.handle(Event::Start, t0);
    let mut now = t0;
    let mut last_b = t0;
    // b heartbeats every interval for a second; a wakes whenever it asked to
    let until = t0 + Duration::from_secs(1);
    while now < until {
        let next_b = last_b + d.interval;
        let wake = a.next_wake(now);
        if next_b <= wake {
            now = next_b;
            last_b = now;
            let acts = a.handle(from_b(d, &[vip()]), now);
            assert!(claims(&acts).is_empty(), "{acts:?}");
        } else {
            now = wake;
            let acts = a.handle(Event::Tick, now);
            assert!(claims(&acts).is_empty(), "{acts:?}");
        }
    }
    assert!(a.owned().is_empty());
    (a, d, last_b)
}

/// Runs `a` on time from `from` to `until`: b heartbeats every interval with `b` claims (or is
/// silent with `None`), a handles every wake-up it asks for. Every action with its instant.
fn run(
    a: &mut Core,
    from: Instant,
    until: Instant,
    b: Option<&[IpAddr]>,
) -> Vec<(Instant, Action)> {
    let d = a.detection();
    let mut out = Vec::new();
    let mut now = from;
    let mut next_b = from + d.interval;
    while now < until {
        let wake = a.next_wake(now).max(now);
        let acts = if b.is_some() && next_b <= wake {
            now = next_b;
            next_b += d.interval;
            a.handle(from_b(d, b.unwrap_or_default()), now)
        } else {
            now = wake;
            a.handle(Event::Tick, now)
        };
        out.extend(acts.into_iter().map(|x| (now, x)));
    }
    out
}

/// Ticks `a` at every wake-up it asks for until it claims the VIP (bounded); the instant.
fn run_until_claim(a: &mut Core, from: Instant, limit: Duration) -> Instant {
    let mut now = from;
    for _ in 0..10_000 {
        now = a.next_wake(now).max(now);
        assert!(now <= from + limit, "no takeover within {limit:?}");
        if claims(&a.handle(Event::Tick, now)).contains(&vip()) {
            return now;
        }
    }
    panic!("no takeover");
}

#[test]
fn detection_is_exactly_dead_after_in_both_profiles() {
    for (profile, dead) in [
        ("default", Duration::from_millis(100)),
        ("fast", Duration::from_millis(30)),
    ] {
        let (mut a, d, last_b) = a_with_b_owning(profile);
        assert_eq!(d.dead_after(), dead, "{profile}");
        let took = run_until_claim(&mut a, last_b, dead * 2);
        // the takeover comes at the first wake-up after the bound (1 ms timer slack)
        assert_eq!(took - last_b, dead + Duration::from_millis(1), "{profile}");
    }
}

#[test]
fn a_stalled_node_does_not_expire_a_peer_it_has_not_read_yet() {
    let (mut a, d, last_b) = a_with_b_owning("default");
    let wake = a.next_wake(last_b);
    assert!(wake <= last_b + d.interval + Duration::from_millis(1));
    // a stalls for 500 ms (b went on sending: its heartbeats wait in the socket). The first
    // event after the stall is a heartbeat the driver reads: from b itself, but the core sees
    // the stall before b's heartbeat; what matters is that no decision on the way expires b.
    let after = last_b + Duration::from_millis(500);
    let acts = a.handle(Event::Tick, after);
    assert!(
        claims(&acts).is_empty(),
        "a node that was not running took over from a peer it had not read: {acts:?}"
    );
    assert_eq!(a.stalls(), 1);
    let acts = a.handle(from_b(d, &[vip()]), after);
    assert!(claims(&acts).is_empty(), "{acts:?}");
    // b really is dead from now on: taken over after dead-after of running silence
    let took = run_until_claim(&mut a, after, d.dead_after() * 2);
    assert_eq!(took - after, d.dead_after() + Duration::from_millis(1));
}

#[test]
fn a_stall_still_expires_a_peer_that_was_already_silent() {
    let (mut a, d, last_b) = a_with_b_owning("default");
    // b falls silent; a runs on time for one wake-up, then stalls for 500 ms
    let now = a.next_wake(last_b);
    assert!(claims(&a.handle(Event::Tick, now)).is_empty());
    let scheduled = a.next_wake(now);
    let counted = scheduled - last_b;
    assert!(counted < d.dead_after());
    let after = now + Duration::from_millis(500);
    assert!(claims(&a.handle(Event::Tick, after)).is_empty());
    // the silence up to the wake-up a missed still counts: b expires the rest of dead-after
    // (+1 ms timer slack) after the stall
    let took = run_until_claim(&mut a, after, d.dead_after());
    assert_eq!(
        took - after,
        d.dead_after() - counted + Duration::from_millis(1)
    );
}

#[test]
fn a_peer_claiming_an_owned_vip_makes_the_owner_announce_again_rate_limited() {
    let t0 = Instant::now();
    let mut a = core(config("a", "default", "a", true), t0);
    let d = a.detection();
    a.handle(Event::Start, t0);
    a.handle(from_b(d, &[]), t0);
    let t1 = t0 + Duration::from_millis(1);
    let acts = a.handle(Event::Tick, t1);
    assert_eq!(claims(&acts), [vip()], "{acts:?} {:?}", a.next_wake(t1));
    // b stood in during a flap and keeps claiming the VIP for a second
    let acts = run(&mut a, t1, t1 + Duration::from_secs(1), Some(&[vip()]));
    assert!(
        releases(&acts.iter().map(|x| x.1.clone()).collect::<Vec<_>>()).is_empty(),
        "the home keeps it"
    );
    let bursts: Vec<Instant> = acts
        .iter()
        .filter(|(_, x)| *x == Action::Reannounce)
        .map(|(t, _)| *t)
        .collect();
    // the first at once (b's first heartbeat), then at most one per 2 × dead-after
    assert_eq!(bursts.first(), Some(&(t1 + d.interval)), "{bursts:?}");
    assert!(
        bursts.windows(2).all(|w| w[1] - w[0] >= d.dead_after() * 2),
        "{bursts:?}"
    );
    let most = (Duration::from_secs(1).as_millis() / (d.dead_after() * 2).as_millis()) as usize + 1;
    assert!((most - 1..=most).contains(&bursts.len()), "{bursts:?}");
}

#[test]
fn a_returning_home_waits_for_hold_down_then_takes_back_make_before_break() {
    let t0 = Instant::now();
    // b stood in while a was down: b owns the VIP
    let mut b = core(config("b", "default", "a", true), t0);
    let d = b.detection();
    b.handle(Event::Start, t0);
    let t1 = t0 + b.settle_time();
    assert_eq!(claims(&b.handle(Event::Tick, t1)), [vip()]);
    // a (re)starts at t1
    let mut a = core(config("a", "default", "a", true), t1);
    a.handle(Event::Start, t1);
    let mut now = t1;
    let mut a_claimed = None;
    let mut b_released = None;
    while now < t1 + Duration::from_secs(3) {
        now += d.interval;
        let from_a = Event::Heartbeat {
            from: "a".into(),
            epoch: 1,
            hb: a.heartbeat(),
        };
        let mut rel = releases(&b.handle(from_a, now));
        rel.extend(releases(&b.handle(Event::Tick, now)));
        if !rel.is_empty() {
            b_released.get_or_insert(now);
        }
        let from_b = Event::Heartbeat {
            from: "b".into(),
            epoch: 1,
            hb: b.heartbeat(),
        };
        let acts = a.handle(from_b, now);
        let acts = [acts, a.handle(Event::Tick, now)].concat();
        if !claims(&acts).is_empty() {
            a_claimed.get_or_insert(now);
            assert_eq!(
                acts.iter().find_map(|x| match x {
                    Action::Claim { from, .. } => Some(*from),
                    _ => None,
                }),
                Some(Some("10.0.0.2".parse().unwrap())),
                "in-flight connections are forwarded to b"
            );
        }
    }
    let claimed = a_claimed.expect("the home takes its VIP back");
    let released = b_released.expect("the stand-in lets go");
    assert!(
        claimed - t1 >= Duration::from_secs(1),
        "not before hold-down: {:?}",
        claimed - t1
    );
    assert!(
        claimed - t1 <= Duration::from_secs(1) + d.interval * 2,
        "{:?}",
        claimed - t1
    );
    assert!(
        released >= claimed,
        "make-before-break: b let go after a claimed"
    );
    assert!(
        released - claimed <= d.interval * 2,
        "and soon after: {:?}",
        released - claimed
    );
    assert!(a.owned().contains(&vip()) && !b.owned().contains(&vip()));
}

#[test]
fn a_leaving_owner_drains_until_a_peer_claims_then_the_peer_forwards_to_it() {
    let t0 = Instant::now();
    let mut a = core(config("a", "default", "a", true), t0);
    let d = a.detection();
    a.handle(Event::Start, t0);
    a.handle(from_b(d, &[]), t0);
    assert_eq!(
        claims(&a.handle(Event::Tick, t0 + Duration::from_millis(1))),
        [vip()]
    );
    let mut b = core(config("b", "default", "a", true), t0);
    b.handle(Event::Start, t0);
    let t1 = t0 + Duration::from_millis(10);
    b.handle(
        Event::Heartbeat {
            from: "a".into(),
            epoch: 1,
            hb: a.heartbeat(),
        },
        t1,
    );
    b.handle(Event::Tick, t1);
    assert!(b.owned().is_empty());

    let had = a.owned().clone();
    let acts = a.handle(Event::Leave, t1);
    assert!(acts.contains(&Action::Drain), "{acts:?}");
    assert!(releases(&acts).is_empty(), "keep serving while draining");
    let leaving: Vec<&Heartbeat> = acts
        .iter()
        .filter_map(|x| match x {
            Action::Heartbeat(h, _) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(leaving.len(), 3);
    assert!(leaving.iter().all(|h| h.leaving && h.claims.is_empty()));
    assert!(!a.handed_over(&had, t1), "nobody claims it yet");
    // b hears the leave and takes over at once, forwarding in-flight connections to a
    let t2 = t1 + Duration::from_millis(1);
    let acts = b.handle(
        Event::Heartbeat {
            from: "a".into(),
            epoch: 1,
            hb: leaving[0].clone(),
        },
        t2,
    );
    assert_eq!(
        acts.iter().find_map(|x| match x {
            Action::Claim { vip, from } => Some((*vip, *from)),
            _ => None,
        }),
        Some((vip(), Some("10.0.0.1".parse().unwrap()))),
        "{acts:?}"
    );
    // a keeps its VIP until it hears b's claim, then releases
    assert!(a.owned().contains(&vip()));
    a.handle(from_b(d, &[vip()]), t2);
    assert!(a.handed_over(&had, t2));
    let acts = a.handle(Event::Released, t2 + d.interval * 2);
    assert!(a.owned().is_empty(), "{acts:?}");
}

#[test]
fn a_closed_listener_makes_the_owner_release_and_the_peer_take_over() {
    let t0 = Instant::now();
    let mut a = core(config("a", "default", "a", true), t0);
    let d = a.detection();
    a.handle(Event::Start, t0);
    a.handle(from_b(d, &[]), t0);
    let t1 = t0 + Duration::from_millis(1);
    assert_eq!(claims(&a.handle(Event::Tick, t1)), [vip()]);
    // the balancer cannot open the VIP's listener here (its port is taken)
    let mut f = facts(a.config());
    f.closed.insert(vip());
    let acts = a.handle(Event::Facts(f.clone()), t1);
    assert_eq!(releases(&acts), [vip()], "{acts:?}");
    let sent = acts.iter().find_map(|x| match x {
        Action::Heartbeat(h, _) => Some(h.clone()),
        _ => None,
    });
    let sent = sent.expect("tells the peers at once");
    assert!(sent.facts.closed.contains(&vip()));
    let view = acts.iter().find_map(|x| match x {
        Action::Ownership(v) => Some(v.clone()),
        _ => None,
    });
    let view = view.expect("published");
    assert_eq!(view[&vip()].reason, "listenerNotOpen");
    assert_eq!(view[&vip()].owner.as_deref(), Some("b"));
    // b hears it and takes the VIP at once
    let mut b = core(config("b", "default", "a", true), t0);
    b.handle(Event::Start, t0);
    b.handle(
        Event::Heartbeat {
            from: "a".into(),
            epoch: 1,
            hb: a.heartbeat(),
        },
        t1,
    );
    let t2 = t0 + b.settle_time();
    let acts = b.handle(Event::Tick, t2);
    assert_eq!(claims(&acts), [vip()], "{acts:?}");
    // the listener opens again: a is eligible again and, as the home, takes it back
    f.closed.clear();
    let acts = a.handle(Event::Facts(f), t2);
    assert!(releases(&acts).is_empty());
}

#[test]
fn claim_changes_are_decided_once_per_quarter_interval() {
    let (mut a, d, last_b) = a_with_b_owning("default");
    let before = a.decisions();
    // b's claims change three times within 2 ms (as many peers' do after a death)
    for (k, claims) in [&[][..], &[vip()][..], &[][..]].iter().enumerate() {
        let at = last_b + Duration::from_millis(k as u64);
        a.handle(from_b(d, claims), at);
    }
    assert_eq!(a.decisions(), before, "not decided per heartbeat");
    let due = last_b + d.interval / 4;
    let mut now = last_b + Duration::from_millis(2);
    while now < due {
        now = a.next_wake(now);
        assert!(now <= due, "the core wakes up for the pending claims");
        a.handle(Event::Tick, now);
    }
    assert_eq!(a.decisions(), before + 1, "decided once for all three");
}

#[test]
fn a_node_whose_peers_arrive_with_its_first_services_listens_before_claiming() {
    // A Kubernetes agent: its first desired state has neither peers nor services; the next
    // brings the Nodes (peers) and the Services together, and only then is the gossip socket
    // opened. It must not claim anything before it has heard the peers' claims.
    let t0 = Instant::now();
    let empty = model::config::parse("node: {name: a}\n", &Default::default()).expect("valid");
    let mut a = Core::new(Arc::new(empty.clone()), facts(&empty), false, t0);
    a.handle(Event::Start, t0);
    let cfg = config("a", "default", "b", true);
    let f = facts(&cfg);
    let t1 = t0 + Duration::from_secs(2);
    let acts = a.handle(Event::Config(Arc::new(cfg), f), t1);
    assert!(
        claims(&acts).is_empty(),
        "claimed before hearing anyone: {acts:?}"
    );
    let acts = a.handle(Event::GossipOpen, t1);
    assert!(claims(&acts).is_empty(), "{acts:?}");
    // b (the home, owning the VIP) is heard from now on: a never claims.
    let acts = run(&mut a, t1, t1 + Duration::from_secs(2), Some(&[vip()]));
    assert!(
        acts.iter().all(|(_, x)| !matches!(x, Action::Claim { .. })),
        "{acts:?}"
    );
    assert!(a.owned().is_empty());
}
