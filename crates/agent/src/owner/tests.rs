//! Tests of the owner rule: replayed membership and claim sequences, checked against the rule.

use super::*;

fn svc(name: &str, vips: &[&str]) -> Service {
    let yaml = format!(
        "node: {{name: n1, interfaces: [{{name: eth0, addresses: [10.0.0.1/8, fd00::1/64]}}]}}\n\
         services:\n  - name: {name}\n    vips: [{}]\n    ports: [{{port: 80}}]\n    backends: [{{address: 192.168.1.1}}]\n",
        vips.join(", ")
    );
    let cfg = model::config::parse(&yaml, &Default::default()).expect("test config parses");
    cfg.services.into_iter().next().expect("one service")
}

fn facts() -> Facts {
    Facts {
        v4: true,
        v6: true,
        ..Default::default()
    }
}

fn names(n: usize) -> BTreeSet<NodeId> {
    (1..=n).map(|i| format!("node-{i}")).collect()
}

fn all_alive(nodes: &BTreeSet<NodeId>, long: bool) -> BTreeMap<NodeId, MemberView> {
    nodes
        .iter()
        .map(|n| {
            let alive_for = if long {
                Duration::from_secs(3600)
            } else {
                Duration::ZERO
            };
            (
                n.clone(),
                MemberView {
                    alive_for,
                    facts: facts(),
                    claims: BTreeSet::new(),
                },
            )
        })
        .collect()
}

fn owners(d: &BTreeMap<IpAddr, Decision>) -> BTreeMap<IpAddr, Option<NodeId>> {
    d.iter().map(|(k, v)| (*k, v.owner.clone())).collect()
}

/// Sets every member's claims to what it owns in `d` (the next round's heartbeats).
fn claim(alive: &mut BTreeMap<NodeId, MemberView>, d: &BTreeMap<IpAddr, Decision>) {
    for (n, m) in alive.iter_mut() {
        m.claims = d
            .iter()
            .filter(|(_, x)| x.owner.as_deref() == Some(n.as_str()))
            .map(|(v, _)| *v)
            .collect();
    }
}

fn thousand() -> Vec<Service> {
    (0..1000u32)
        .map(|i| {
            svc(
                &format!("s{i}"),
                &[&format!("10.1.{}.{}", i / 250, i % 250 + 1)],
            )
        })
        .collect()
}

fn inputs<'a>(
    me: &'a str,
    nodes: &'a BTreeSet<NodeId>,
    services: &'a [Service],
    alive: &'a BTreeMap<NodeId, MemberView>,
) -> Inputs<'a> {
    Inputs {
        me,
        nodes,
        services,
        alive,
        preemptive: true,
        hold_down: Duration::from_secs(5),
    }
}

#[test]
fn score_is_a_fixed_function() {
    // Part of the protocol: every version must compute the same ranking.
    assert_eq!(
        score("node-a", "10.0.0.100".parse().unwrap()),
        score("node-a", "10.0.0.100".parse().unwrap())
    );
    assert_ne!(
        score("node-a", "10.0.0.100".parse().unwrap()),
        score("node-b", "10.0.0.100".parse().unwrap())
    );
    assert_eq!(
        format!("{:016x}", score("node-a", "10.0.0.100".parse().unwrap())),
        "fa5a325cef98249d"
    );
}

#[test]
fn thousand_vips_spread_within_ten_percent() {
    let nodes = names(5);
    let services = thousand();
    let alive = all_alive(&nodes, true);
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for x in d.values() {
        *load.entry(x.owner.clone().expect("owned")).or_default() += 1;
    }
    assert_eq!(load.len(), 5);
    for (n, l) in &load {
        assert!(
            (180..=220).contains(l),
            "{n} has {l} VIPs, mean is 200: {load:?}"
        );
    }
}

#[test]
fn every_node_reaches_the_same_answer() {
    let nodes = names(5);
    let services = thousand();
    let alive = all_alive(&nodes, true);
    let a = owners(&decide(&inputs("node-1", &nodes, &services, &alive)));
    let b = owners(&decide(&inputs("node-4", &nodes, &services, &alive)));
    assert_eq!(a, b);
}

#[test]
fn a_member_leaving_moves_only_its_vips_and_spreads_them() {
    let nodes = names(5);
    let services = thousand();
    let mut alive = all_alive(&nodes, true);
    let before = decide(&inputs("node-1", &nodes, &services, &alive));
    claim(&mut alive, &before);
    alive.remove("node-3");
    let after = decide(&inputs("node-1", &nodes, &services, &alive));
    let mut moved_to: BTreeMap<String, usize> = BTreeMap::new();
    for (vip, b) in &before {
        let a = &after[vip];
        if b.owner.as_deref() == Some("node-3") {
            let to = a.owner.clone().expect("someone takes over");
            assert_ne!(to, "node-3");
            *moved_to.entry(to).or_default() += 1;
        } else {
            assert_eq!(a.owner, b.owner, "{vip} moved although its owner stayed");
        }
    }
    assert_eq!(
        moved_to.len(),
        4,
        "orphans spread over all survivors: {moved_to:?}"
    );
    // And with the same claims, the stability holds even before anyone re-claims.
    for m in alive.values_mut() {
        m.claims.clear();
    }
    let fresh = decide(&inputs("node-1", &nodes, &services, &alive));
    for (vip, b) in &before {
        if b.owner.as_deref() != Some("node-3") {
            assert_eq!(fresh[vip].owner, b.owner, "homes of live nodes do not move");
        }
    }
}

#[test]
fn preemptive_return_waits_for_hold_down_then_takes_back() {
    let nodes = names(3);
    let services = vec![svc("web", &["10.0.0.100"])];
    let mut alive = all_alive(&nodes, true);
    let d0 = decide(&inputs("node-1", &nodes, &services, &alive));
    let home = d0[&"10.0.0.100".parse::<IpAddr>().unwrap()]
        .owner
        .clone()
        .unwrap();
    // home dies; someone else takes over and claims
    let saved = alive.remove(&home).unwrap();
    let d1 = decide(&inputs("node-1", &nodes, &services, &alive));
    let stand_in = d1.values().next().unwrap().owner.clone().unwrap();
    assert_ne!(stand_in, home);
    claim(&mut alive, &d1);
    // home returns: not before hold-down …
    alive.insert(
        home.clone(),
        MemberView {
            alive_for: Duration::from_secs(1),
            ..saved.clone()
        },
    );
    let d2 = decide(&inputs(&home, &nodes, &services, &alive));
    assert_eq!(
        d2.values().next().unwrap().owner.as_deref(),
        Some(stand_in.as_str())
    );
    assert_eq!(d2.values().next().unwrap().reason, Reason::NotOwner);
    // … but after it
    alive.get_mut(&home).unwrap().alive_for = Duration::from_secs(5);
    let d3 = decide(&inputs(&home, &nodes, &services, &alive));
    assert_eq!(
        d3.values().next().unwrap().owner.as_deref(),
        Some(home.as_str())
    );
    assert_eq!(d3.values().next().unwrap().reason, Reason::Owner);
    // non-preemptive: never
    let mut np = inputs(&home, &nodes, &services, &alive);
    np.preemptive = false;
    assert_eq!(
        decide(&np).values().next().unwrap().owner.as_deref(),
        Some(stand_in.as_str())
    );
}

#[test]
fn a_flapping_node_does_not_pull_vips_back() {
    let nodes = names(2);
    let services = vec![svc("web", &["10.0.0.100"])];
    let mut alive = all_alive(&nodes, true);
    let home = decide(&inputs("node-1", &nodes, &services, &alive))
        .values()
        .next()
        .unwrap()
        .owner
        .clone()
        .unwrap();
    let other = nodes.iter().find(|n| **n != home).unwrap().clone();
    alive.remove(&home);
    let d = decide(&inputs(&other, &nodes, &services, &alive));
    claim(&mut alive, &d);
    for flap in 0..10u64 {
        alive.insert(
            home.clone(),
            MemberView {
                alive_for: Duration::from_millis(400 * flap),
                facts: facts(),
                claims: BTreeSet::new(),
            },
        );
        let d = decide(&inputs(&other, &nodes, &services, &alive));
        assert_eq!(
            d.values().next().unwrap().owner.as_deref(),
            Some(other.as_str()),
            "flap {flap}"
        );
        alive.remove(&home);
    }
}

#[test]
fn a_services_vips_land_on_distinct_nodes() {
    let nodes = names(4);
    let services = vec![svc(
        "web",
        &["10.0.0.101", "10.0.0.102", "10.0.0.103", "10.0.0.104"],
    )];
    let mut alive = all_alive(&nodes, true);
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    let distinct: BTreeSet<_> = d.values().map(|x| x.owner.clone().unwrap()).collect();
    assert_eq!(distinct.len(), 4);
    // with one node down, three distinct nodes hold the four VIPs
    claim(&mut alive, &d);
    alive.remove("node-2");
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    let distinct: BTreeSet<_> = d.values().map(|x| x.owner.clone().unwrap()).collect();
    assert_eq!(distinct.len(), 3);
    // two VIPs over three alive nodes: distinct
    let two = vec![svc("db", &["10.0.0.1", "10.0.0.2"])];
    let d = decide(&inputs("node-1", &nodes, &two, &alive));
    assert_ne!(
        d[&"10.0.0.1".parse::<IpAddr>().unwrap()].owner,
        d[&"10.0.0.2".parse::<IpAddr>().unwrap()].owner
    );
}

/// One round of heartbeats: every alive node decides on its own and then claims what it
/// decided to own.
fn round(nodes: &BTreeSet<NodeId>, services: &[Service], alive: &mut BTreeMap<NodeId, MemberView>) {
    let claims: Vec<(NodeId, BTreeSet<IpAddr>)> = alive
        .keys()
        .map(|me| {
            let d = decide(&inputs(me, nodes, services, alive));
            let mine = d
                .iter()
                .filter(|(_, x)| x.reason == Reason::Owner)
                .map(|(v, _)| *v)
                .collect();
            (me.clone(), mine)
        })
        .collect();
    for (n, c) in claims {
        alive.get_mut(&n).expect("alive").claims = c;
    }
}

#[test]
fn two_addresses_spread_when_the_second_node_comes_up_beside_an_agentless_home() {
    // Three Nodes, one without a running agent (node-3). A Service with two addresses whose
    // homes are node-1 and node-3: node-1 came up alone and took both; once node-2 is up
    // (and past hold-down) one address moves to it, make-before-break, and stays.
    let nodes = names(3);
    let pair = (1..60u8)
        .flat_map(|a| (a + 1..60).map(move |b| (a, b)))
        .map(|(a, b)| svc("db", &[&format!("10.0.0.{a}"), &format!("10.0.0.{b}")]))
        .find(|s| {
            let specs = specs(std::slice::from_ref(s));
            let h: BTreeSet<&str> = homes(&specs, &nodes).into_values().collect();
            h == BTreeSet::from(["node-1", "node-3"])
        })
        .expect("some pair of addresses has its homes on node-1 and node-3");
    let services = vec![pair];
    let mut alive = all_alive(&nodes, true);
    alive.remove("node-2");
    alive.remove("node-3");
    round(&nodes, &services, &mut alive);
    round(&nodes, &services, &mut alive);
    assert_eq!(alive["node-1"].claims.len(), 2, "alone, node-1 holds both");
    // node-2 joins: inside hold-down nothing moves.
    let mut n2 = MemberView {
        alive_for: Duration::from_secs(1),
        facts: facts(),
        claims: BTreeSet::new(),
    };
    alive.insert("node-2".into(), n2.clone());
    round(&nodes, &services, &mut alive);
    assert_eq!(alive["node-1"].claims.len(), 2, "hold-down");
    assert!(alive["node-2"].claims.is_empty());
    n2.alive_for = Duration::from_secs(10);
    alive.get_mut("node-2").unwrap().alive_for = n2.alive_for;
    for r in 0..6 {
        round(&nodes, &services, &mut alive);
        // Make-before-break: every address is claimed by someone in every round.
        for v in &services[0].vips {
            assert!(
                alive.values().any(|m| m.claims.contains(v)),
                "round {r}: {v} unclaimed"
            );
        }
    }
    assert_eq!(alive["node-1"].claims.len(), 1, "{alive:?}");
    assert_eq!(alive["node-2"].claims.len(), 1, "{alive:?}");
    // Every node agrees, and with preemption off nothing would have moved.
    for me in ["node-1", "node-2"] {
        let d = decide(&inputs(me, &nodes, &services, &alive));
        let distinct: BTreeSet<_> = d.values().map(|x| x.owner.clone()).collect();
        assert_eq!(distinct.len(), 2, "{me}: {d:?}");
    }
    let mut still = all_alive(&nodes, true);
    still.remove("node-3");
    still.get_mut("node-1").unwrap().claims = services[0].vips.iter().copied().collect();
    let mut inp = inputs("node-2", &nodes, &services, &still);
    inp.preemptive = false;
    assert!(decide(&inp).values().all(|x| x.reason == Reason::NotOwner));
}

#[test]
fn a_withdrawn_service_has_no_owner_and_says_no_healthy_endpoints_everywhere() {
    let nodes = names(3);
    let mut s = svc("web", &["10.0.0.100", "fd00::100"]);
    s.placement.withdrawn = true;
    let services = vec![s];
    let mut alive = all_alive(&nodes, true);
    // Even the node that announced it until now lets go.
    alive.get_mut("node-1").unwrap().claims = services[0].vips.iter().copied().collect();
    for me in &nodes {
        let d = decide(&inputs(me, &nodes, &services, &alive));
        assert!(
            d.values()
                .all(|x| x.owner.is_none() && x.reason == Reason::NoHealthyEndpoints),
            "{me}: {d:?}"
        );
    }
    // A VIP shared with a service that still has endpoints stays announced.
    let mut other = svc("web-udp", &["10.0.0.100"]);
    other.placement.withdrawn = false;
    let services = vec![services[0].clone(), other];
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    assert!(d[&"10.0.0.100".parse::<IpAddr>().unwrap()].owner.is_some());
    assert_eq!(
        d[&"fd00::100".parse::<IpAddr>().unwrap()].reason,
        Reason::NoHealthyEndpoints
    );
}

#[test]
fn preferred_node_wins_while_alive() {
    let nodes = names(3);
    let mut s = svc("db", &["10.0.0.100"]);
    s.placement.preferred = vec!["node-2".into(), "node-3".into()];
    let services = vec![s];
    let mut alive = all_alive(&nodes, true);
    let d = decide(&inputs("node-2", &nodes, &services, &alive));
    assert_eq!(d.values().next().unwrap().owner.as_deref(), Some("node-2"));
    alive.remove("node-2");
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    assert_eq!(d.values().next().unwrap().owner.as_deref(), Some("node-3"));
    assert_eq!(d.values().next().unwrap().reason, Reason::NotOwner);
}

#[test]
fn eligibility_reasons() {
    let nodes = names(3);
    let mut s = svc("db", &["10.0.0.100", "fd00::100"]);
    s.placement.nodes = vec!["node-1".into(), "node-2".into()];
    s.placement.local_only = true;
    let services = vec![s];
    let mut alive = all_alive(&nodes, true);
    // nobody serves db locally yet
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    assert!(
        d.values()
            .all(|x| x.owner.is_none() && x.reason == Reason::NoEligibleNode)
    );
    alive
        .get_mut("node-2")
        .unwrap()
        .facts
        .serving
        .insert("db".into());
    let d = decide(&inputs("node-1", &nodes, &services, &alive));
    assert!(d.values().all(|x| x.owner.as_deref() == Some("node-2")));
    assert!(
        d.values()
            .all(|x| x.reason == Reason::NoHealthyLocalBackend)
    );
    let d = decide(&inputs("node-3", &nodes, &services, &alive));
    assert!(d.values().all(|x| x.reason == Reason::NotSelected));
    // node-2 loses its IPv6 interface: the v6 VIP has no eligible node
    alive.get_mut("node-2").unwrap().facts.v6 = false;
    let d = decide(&inputs("node-2", &nodes, &services, &alive));
    assert_eq!(
        d[&"10.0.0.100".parse::<IpAddr>().unwrap()].reason,
        Reason::Owner
    );
    assert_eq!(
        d[&"fd00::100".parse::<IpAddr>().unwrap()].reason,
        Reason::NoEligibleNode
    );
    alive
        .get_mut("node-1")
        .unwrap()
        .facts
        .serving
        .insert("db".into());
    let d = decide(&inputs("node-2", &nodes, &services, &alive));
    assert_eq!(
        d[&"fd00::100".parse::<IpAddr>().unwrap()].reason,
        Reason::NoInterface
    );
    // node-2's listener for the v4 VIP is not open (its port is taken): node-1 owns it
    let v4: IpAddr = "10.0.0.100".parse().unwrap();
    alive.get_mut("node-2").unwrap().facts.closed.insert(v4);
    let d = decide(&inputs("node-2", &nodes, &services, &alive));
    assert_eq!(d[&v4].reason, Reason::ListenerNotOpen);
    assert_eq!(d[&v4].owner.as_deref(), Some("node-1"));
}

#[test]
fn healed_partition_leaves_exactly_one_owner() {
    let nodes = names(4);
    let services = thousand();
    let mut alive = all_alive(&nodes, true);
    let base = decide(&inputs("node-1", &nodes, &services, &alive));
    // side A = {1,2}, side B = {3,4}: each side decides alone and claims
    let side =
        |keep: &[&str], alive: &BTreeMap<NodeId, MemberView>| -> BTreeMap<NodeId, MemberView> {
            alive
                .iter()
                .filter(|(n, _)| keep.contains(&n.as_str()))
                .map(|(n, m)| (n.clone(), m.clone()))
                .collect()
        };
    claim(&mut alive, &base);
    let mut a = side(&["node-1", "node-2"], &alive);
    let mut b = side(&["node-3", "node-4"], &alive);
    let da = decide(&inputs("node-1", &nodes, &services, &a));
    let db = decide(&inputs("node-3", &nodes, &services, &b));
    claim(&mut a, &da);
    claim(&mut b, &db);
    // heal: everyone sees both sides' claims; the other side is freshly alive
    let mut healed: BTreeMap<NodeId, MemberView> = a.into_iter().chain(b).collect();
    for m in healed.values_mut() {
        m.alive_for = Duration::ZERO;
    }
    let views: Vec<_> = nodes
        .iter()
        .map(|n| owners(&decide(&inputs(n, &nodes, &services, &healed))))
        .collect();
    assert!(views.windows(2).all(|w| w[0] == w[1]), "every node agrees");
    assert!(views[0].values().all(Option::is_some));
    for n in &nodes {
        let d = decide(&inputs(n, &nodes, &services, &healed));
        let mine = d.values().filter(|x| x.reason == Reason::Owner).count();
        let owned = views[0]
            .values()
            .filter(|o| o.as_deref() == Some(n.as_str()))
            .count();
        assert_eq!(mine, owned);
    }
}
