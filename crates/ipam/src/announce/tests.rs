//! Tests of the per-node announcement writes: what each node writes, and how many writes a
//! cluster makes.

use std::net::{IpAddr, SocketAddr};

use model::{Desired, Peer, VipOwnership};

use super::*;
use crate::fixtures::{mock_client_for, status_error, timeout_after_1s};

fn config(nodes: &[&str], services: usize) -> Config {
    let mut c = model::config::parse("", &model::config::Environment::default()).unwrap();
    c.cluster.peers = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Peer {
            name: n.to_string(),
            address: SocketAddr::new([10, 0, (i / 250) as u8, (i % 250) as u8].into(), 7946),
        })
        .collect();
    let template = crate::source::template().unwrap();
    c.services = (0..services)
        .map(|i| {
            let mut s = template.clone();
            s.name = format!("shop/s{i}");
            s.vips = vec![vip(i)];
            s
        })
        .collect();
    c
}

fn vip(i: usize) -> IpAddr {
    IpAddr::from([198, 18, (i / 256) as u8, (i % 256) as u8])
}

fn origins(services: usize) -> Origins {
    (0..services)
        .map(|i| {
            (
                format!("shop/s{i}"),
                Origin {
                    namespace: "shop".into(),
                    name: format!("s{i}"),
                    uid: format!("u{i}"),
                    no_endpoints: false,
                },
            )
        })
        .collect()
}

fn owned(owner: Option<&str>, reason: &str) -> VipOwnership {
    VipOwnership {
        owner: owner.map(String::from),
        reason: reason.into(),
    }
}

/// Each node's view: `owner(i)` owns VIP i; every other node says `notOwner`.
fn view(services: usize, owner: impl Fn(usize) -> Option<String>) -> OwnershipView {
    (0..services)
        .map(|i| {
            let o = owner(i);
            let reason = if o.is_some() {
                "owner"
            } else {
                "noEligibleNode"
            };
            (vip(i), owned(o.as_deref(), reason))
        })
        .collect()
}

fn statuses(writes: &[Write]) -> Vec<(&str, &Value)> {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Status { node, body, .. } => Some((node.as_str(), &body["status"]["nodes"])),
            _ => None,
        })
        .collect()
}

#[test]
fn the_owner_writes_its_entry_and_a_node_that_could_take_over_writes_nothing() {
    let cfg = config(&["n1", "n2"], 2);
    let mut ownership = view(2, |i| Some(format!("n{}", i + 1)));
    ownership.get_mut(&vip(1)).unwrap().reason = "owner".into();
    let mut n1 = Planner::new("n1");
    let w = n1.plan(&cfg, &ownership, &origins(2));
    assert!(
        matches!(&w[0], Write::Object { origin, body } if origin.name == "s0" && body["metadata"]["ownerReferences"][0]["uid"] == "u0")
    );
    assert_eq!(
        statuses(&w),
        [(
            "n1",
            &json!([{"node": "n1", "owns": ["198.18.0.0"], "addresses": [{"address": "198.18.0.0", "reason": "owner"}]}])
        )],
        "nothing for s1, which n2 owns"
    );
    assert!(
        n1.plan(&cfg, &ownership, &origins(2)).is_empty(),
        "unchanged: no write"
    );
}

#[test]
fn when_an_address_moves_the_old_owner_removes_its_entry_and_the_new_one_adds_its_own() {
    let cfg = config(&["n1", "n2"], 1);
    let (mut n1, mut n2) = (Planner::new("n1"), Planner::new("n2"));
    let before = view(1, |_| Some("n1".into()));
    assert_eq!(n1.plan(&cfg, &before, &origins(1)).len(), 2);
    assert!(n2.plan(&cfg, &before, &origins(1)).is_empty());
    let after = view(1, |_| Some("n2".into()));
    let w1 = n1.plan(&cfg, &after, &origins(1));
    assert_eq!(
        statuses(&w1),
        [("n1", &json!([]))],
        "its own entry only, removed"
    );
    let w2 = n2.plan(&cfg, &after, &origins(1));
    assert_eq!(w2.len(), 2, "object once, then its entry: {w2:?}");
    assert_eq!(statuses(&w2)[0].1[0]["node"], "n2");
}

#[test]
fn a_service_without_endpoints_is_reported_once_as_no_healthy_endpoints_by_the_reporter() {
    let cfg = config(&["n1", "n2", "n3"], 1);
    let mut o = origins(1);
    o.get_mut("shop/s0").unwrap().no_endpoints = true;
    let nobody = view(1, |_| None);
    let (mut n1, mut n2) = (Planner::new("n1"), Planner::new("n2"));
    let w = n1.plan(&cfg, &nobody, &o);
    assert_eq!(
        statuses(&w),
        [(
            "n1",
            &json!([{"node": "n1", "addresses": [{"address": "198.18.0.0", "reason": "noHealthyEndpoints"}]}])
        )]
    );
    assert!(
        n2.plan(&cfg, &nobody, &o).is_empty(),
        "only the reporter says it"
    );
    // Without the endpoint flag the agent's own word is used.
    let mut n1 = Planner::new("n1");
    let w = n1.plan(&cfg, &nobody, &origins(1));
    assert_eq!(
        statuses(&w)[0].1[0]["addresses"][0]["reason"],
        "noEligibleNode"
    );
}

#[test]
fn the_entries_of_a_deleted_node_are_removed_by_the_reporter_with_that_nodes_manager() {
    let o = origins(2);
    let owner = view(2, |i| Some(["n3", "n2"][i].to_string()));
    let mut n1 = Planner::new("n1");
    assert!(n1.plan(&config(&["n2", "n3"], 2), &owner, &o).is_empty());
    // n3 died: s0 moved to n2, and the Node n3 was deleted.
    let moved = view(2, |_| Some("n2".into()));
    let w = n1.plan(&config(&["n2"], 2), &moved, &o);
    assert_eq!(
        w,
        [Write::Status {
            origin: o["shop/s0"].clone(),
            node: "n3".into(),
            body: status_body(
                &o["shop/s0"],
                &NodeAnnouncement {
                    node: "n3".into(),
                    ..NodeAnnouncement::default()
                }
            ),
        }]
    );
    assert!(n1.plan(&config(&["n2"], 2), &moved, &o).is_empty(), "once");
    // A node that is not the reporter leaves it to the reporter.
    let mut n2 = Planner::new("n2");
    n2.plan(&config(&["n1", "n3"], 2), &owner, &o);
    assert!(
        statuses(&n2.plan(&config(&["n1"], 2), &moved, &o))
            .iter()
            .all(|(n, _)| *n == "n2")
    );
}

fn up(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn the_entries_of_a_node_whose_agent_died_are_removed_and_a_dead_first_node_does_not_silence_reports()
 {
    // Three nodes; n1 (the first by name, the reporter while alive) owns s0, n3 owns s1.
    let cfg = config(&["n1", "n2", "n3"], 3);
    let o = origins(3);
    let t0 = tokio::time::Instant::now();
    let before = view(3, |i| {
        [Some("n1".to_string()), Some("n3".into()), None][i].clone()
    });
    let mut n2 = Planner::new("n2");
    n2.set_alive(up(&["n1", "n2", "n3"]), t0);
    assert!(
        n2.plan(&cfg, &before, &o).is_empty(),
        "n2 owns nothing and is not the reporter"
    );
    // n1's agent dies (its Node stays): s0 moves to n2. n2 is now the first node that is up,
    // so it reports s2's missing owner and removes n1's entries, with n1's field manager.
    n2.set_alive(up(&["n2", "n3"]), t0 + Duration::from_secs(1));
    let after = view(3, |i| {
        [Some("n2".to_string()), Some("n3".into()), None][i].clone()
    });
    let w = n2.plan(&cfg, &after, &o);
    let mut s = statuses(&w);
    s.sort_by_key(|(n, _)| *n);
    // n1's entries go from s0 (it owned it) and s2 (it reported it); n2 writes s0 and s2.
    assert_eq!(s.len(), 4, "{s:?}");
    assert_eq!(s[0], ("n1", &json!([])));
    assert_eq!(s[1], ("n1", &json!([])));
    assert_eq!((s[2].0, s[3].0), ("n2", "n2"));
    assert!(
        w.iter().any(|x| matches!(x, Write::Status { node, body, .. } if node == "n2" && body["status"]["nodes"][0]["addresses"][0]["reason"] == "noEligibleNode")),
        "{w:?}"
    );
    assert!(n2.plan(&cfg, &after, &o).is_empty(), "once");
    // n1 comes back (or the partition heals): every node writes its own entries again, in case
    // a reporter that could not hear it removed them.
    n2.set_alive(up(&["n1", "n2", "n3"]), t0 + Duration::from_secs(5));
    let w = n2.plan(&cfg, &after, &o);
    assert!(
        statuses(&w)
            .iter()
            .any(|(n, b)| *n == "n2" && b[0]["owns"][0] == "198.18.0.0"),
        "{w:?}"
    );
}

#[test]
fn a_node_never_heard_from_is_cleaned_only_after_the_grace() {
    // At start every peer not yet heard from reads as down: n1 is still the reporter and its
    // entries stay until it has been silent for DOWN_GRACE.
    let cfg = config(&["n1", "n2"], 1);
    let o = origins(1);
    let t0 = tokio::time::Instant::now();
    let existing: ServiceAnnouncement = serde_json::from_value(json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
        "metadata": {"name": "s0", "namespace": "shop",
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "s0", "uid": "u0"}]},
        "spec": {"service": "s0"},
        "status": {"nodes": [
            {"node": "n1", "owns": ["198.18.0.0"], "addresses": [{"address": "198.18.0.0", "reason": "owner"}]},
        ]},
    }))
    .unwrap();
    let mut n2 = Planner::new("n2");
    n2.prime(&[existing]);
    n2.set_alive(up(&["n2"]), t0);
    let ownership = view(1, |_| Some("n1".into()));
    assert!(n2.plan(&cfg, &ownership, &o).is_empty());
    n2.set_alive(up(&["n2"]), t0 + DOWN_GRACE - Duration::from_millis(1));
    assert!(n2.plan(&cfg, &ownership, &o).is_empty(), "within the grace");
    n2.set_alive(up(&["n2"]), t0 + DOWN_GRACE);
    assert_eq!(
        statuses(&n2.plan(&cfg, &ownership, &o)),
        [("n1", &json!([]))]
    );
}

#[test]
fn after_a_restart_a_stale_entry_of_this_node_is_removed_and_so_are_those_of_deleted_nodes() {
    let existing: ServiceAnnouncement = serde_json::from_value(json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
        "metadata": {"name": "s0", "namespace": "shop",
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "s0", "uid": "u0"}]},
        "spec": {"service": "s0"},
        "status": {"nodes": [
            {"node": "n1", "owns": ["198.18.0.0"], "addresses": [{"address": "198.18.0.0", "reason": "owner"}]},
            {"node": "gone", "owns": ["198.18.0.0"], "addresses": [{"address": "198.18.0.0", "reason": "owner"}]},
        ]},
    }))
    .unwrap();
    let mut n1 = Planner::new("n1");
    n1.prime(&[existing]);
    let w = n1.plan(
        &config(&["n2"], 1),
        &view(1, |_| Some("n2".into())),
        &origins(1),
    );
    let mut s = statuses(&w);
    s.sort_by_key(|(n, _)| *n);
    assert_eq!(s, [("gone", &json!([])), ("n1", &json!([]))]);
}

#[test]
fn until_the_agent_has_decided_about_an_address_nothing_is_written_for_its_service() {
    let existing: ServiceAnnouncement = serde_json::from_value(json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
        "metadata": {"name": "s0", "namespace": "shop",
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "s0", "uid": "u0"}]},
        "spec": {"service": "s0"},
        "status": {"nodes": [
            {"node": "n1", "owns": ["198.18.0.0"], "addresses": [{"address": "198.18.0.0", "reason": "owner"}]},
        ]},
    }))
    .unwrap();
    let mut n1 = Planner::new("n1");
    n1.prime(&[existing]);
    let cfg = config(&["n2"], 1);
    // Restarted, no ownership view yet: the entry from before stays untouched…
    assert!(n1.plan(&cfg, &OwnershipView::new(), &origins(1)).is_empty());
    // …and when the view says n1 still owns it, there is nothing to write either.
    assert!(
        n1.plan(&cfg, &view(1, |_| Some("n1".into())), &origins(1))
            .is_empty()
    );
}

#[test]
fn a_removal_body_is_recognised() {
    let o = &origins(1)["shop/s0"];
    let empty = NodeAnnouncement {
        node: "n1".into(),
        ..NodeAnnouncement::default()
    };
    assert!(is_removal(&status_body(o, &empty)));
    let mut full = empty.clone();
    full.addresses.push(AddressReason {
        address: "198.18.0.0".into(),
        reason: "owner".into(),
    });
    assert!(!is_removal(&status_body(o, &full)));
}

#[test]
fn a_failed_write_is_made_again_on_the_next_plan() {
    let cfg = config(&["n2"], 1);
    let mut n1 = Planner::new("n1");
    let own = view(1, |_| Some("n1".into()));
    let w = n1.plan(&cfg, &own, &origins(1));
    for x in &w {
        n1.failed(x);
    }
    assert_eq!(n1.plan(&cfg, &own, &origins(1)), w);
    // A failed removal too.
    let moved = view(1, |_| Some("n2".into()));
    let removal = n1.plan(&cfg, &moved, &origins(1));
    assert_eq!(removal.len(), 1);
    n1.failed(&removal[0]);
    assert_eq!(n1.plan(&cfg, &moved, &origins(1)), removal);
}

/// 100 nodes × 1,000 Services (one address each), every node planning from the same view.
#[test]
fn writes_stay_proportional_to_changes_for_100_nodes_and_1000_services() {
    const NODES: usize = 100;
    const SERVICES: usize = 1000;
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i:03}")).collect();
    let cfg_without = |skip: Option<&str>| -> Vec<Config> {
        names
            .iter()
            .map(|me| {
                let peers: Vec<&str> = names
                    .iter()
                    .map(String::as_str)
                    .filter(|n| n != me && Some(*n) != skip)
                    .collect();
                config(&peers, SERVICES)
            })
            .collect()
    };
    let mut planners: Vec<Planner> = names.iter().map(Planner::new).collect();
    let mut o = origins(SERVICES);
    let round = |planners: &mut Vec<Planner>,
                 cfgs: &[Config],
                 view: &OwnershipView,
                 o: &Origins,
                 skip: Option<&str>|
     -> usize {
        planners
            .iter_mut()
            .zip(cfgs)
            .filter(|(p, _)| Some(p.me.as_str()) != skip)
            .map(|(p, c)| p.plan(c, view, o).len())
            .sum()
    };
    let cfgs = cfg_without(None);
    let t0 = tokio::time::Instant::now();
    let everybody: BTreeSet<String> = names.iter().cloned().collect();
    for p in planners.iter_mut() {
        p.set_alive(everybody.clone(), t0);
    }
    let spread = view(SERVICES, |i| Some(names[i % NODES].clone()));
    let start = round(&mut planners, &cfgs, &spread, &o, None);
    // Every Service: its object and its owner's entry, once.
    assert_eq!(start, 2 * SERVICES, "start");
    assert_eq!(
        round(&mut planners, &cfgs, &spread, &o, None),
        0,
        "steady state"
    );
    // n007's agent dies: its 10 addresses move to n008, and the reporter removes n007's 10
    // entries; deleting its Node later writes nothing more.
    let mut survivors = everybody.clone();
    survivors.remove("n007");
    for p in planners.iter_mut() {
        p.set_alive(survivors.clone(), t0 + Duration::from_secs(1));
    }
    let moved = view(SERVICES, |i| {
        Some(names[if i % NODES == 7 { 8 } else { i % NODES }].clone())
    });
    let failover = round(&mut planners, &cfgs, &moved, &o, Some("n007"));
    assert_eq!(
        failover,
        2 * 10 + 10,
        "n008's 10 objects and entries, n007's 10 entries removed"
    );
    let cfgs = cfg_without(Some("n007"));
    let deleted = round(&mut planners, &cfgs, &moved, &o, Some("n007"));
    assert_eq!(deleted, 0, "already clean when the Node is deleted");
    // One Service loses its endpoints: its owner removes its entry, the reporter says why.
    let mut gone = moved.clone();
    gone.insert(vip(5), owned(None, "noEligibleNode"));
    o.get_mut("shop/s5").unwrap().no_endpoints = true;
    let withdrawn = round(&mut planners, &cfgs, &gone, &o, Some("n007"));
    assert_eq!(
        withdrawn, 3,
        "n005 removes its entry; n000 writes the object and the reason"
    );
    println!(
        "100 nodes x 1000 services: start {start} writes, steady 0, failover of a node owning 10: {failover} (then {deleted} when its Node is deleted), a Service losing its endpoints: {withdrawn}"
    );
}

#[tokio::test]
async fn each_agent_applies_its_entry_with_its_own_field_manager() {
    let (client, mut api) = mock_client_for(crate::rbac::AGENT);
    let path = "/apis/portico.dev/v1alpha1/namespaces/shop/serviceannouncements/s0";
    let reply = json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement", "metadata": {"name": "s0", "namespace": "shop"}, "spec": {"service": "s0"}});
    let server = tokio::spawn(async move {
        api.expect(
            "GET",
            "/apis/portico.dev/v1alpha1/serviceannouncements",
            403,
            status_error(403, "Forbidden"),
        )
        .await;
        let obj = api.expect("PATCH", path, 200, reply.clone()).await;
        assert!(
            obj.uri.contains("fieldManager=portico-agent%2Fn1"),
            "{}",
            obj.uri
        );
        assert!(obj.uri.contains("force=true"), "{}", obj.uri);
        assert_eq!(
            obj.body["metadata"]["ownerReferences"][0]["kind"],
            "Service"
        );
        let status = api
            .expect("PATCH", &format!("{path}/status"), 200, reply)
            .await;
        assert!(
            status.uri.contains("fieldManager=portico-agent%2Fn1"),
            "{}",
            status.uri
        );
        assert_eq!(status.body["status"]["nodes"][0]["node"], "n1");
        assert_eq!(status.body["status"]["nodes"][0]["owns"][0], "198.18.0.0");
    });
    let (_d, desired) = watch::channel(Arc::new(Desired {
        generation: 1,
        config: Arc::new(config(&["n2"], 1)),
    }));
    let (_o, origins) = watch::channel(Arc::new(origins(1)));
    let (_w, ownership) = watch::channel(Arc::new(view(1, |_| Some("n1".into()))));
    let shutdown = CancellationToken::new();
    let (_a, alive) = watch::channel(None);
    let (_b, bgp) = watch::channel(BgpView::default());
    let task = tokio::spawn(run(
        client,
        "n1".into(),
        Inputs {
            desired,
            origins,
            ownership,
            alive,
            bgp,
        },
        shutdown.clone(),
    ));
    timeout_after_1s(server).await;
    shutdown.cancel();
    task.await.unwrap();
}

fn decision(reason: model::bgp::RouteReason) -> model::bgp::RouteDecision {
    model::bgp::RouteDecision {
        service: "shop/s0".into(),
        reason,
        attrs: model::bgp::ServiceBgp::default(),
    }
}

fn session(state: &str, prefixes: u64) -> BgpSession {
    BgpSession {
        peer: "tor".into(),
        address: "192.0.2.1".into(),
        state: state.into(),
        since: None,
        prefixes_sent: prefixes,
        last_error: None,
        bfd: Some("up".into()),
    }
}

#[test]
fn a_bgp_service_is_reported_by_every_announcing_node_with_its_sessions() {
    use model::bgp::{AnnounceMode, RouteReason};
    let mut cfg = config(&["n1", "n2"], 1);
    cfg.services[0].announce = AnnounceMode::Bgp;
    // no ownership for a bgp-only VIP (the agent never sees it)
    let ownership = OwnershipView::new();
    let mut n1 = Planner::new("n1");
    // nothing decided yet: nothing written
    let empty = BgpView::default();
    assert!(
        n1.plan_with(&cfg, &ownership, &origins(1), &empty)
            .is_empty()
    );
    let mut routes = model::bgp::RouteDecisions::new();
    routes.insert(vip(0), decision(RouteReason::Announced));
    let bgp = BgpView {
        sessions: vec![session("established", 1)],
        routes: Arc::new(routes.clone()),
    };
    let w = n1.plan_with(&cfg, &ownership, &origins(1), &bgp);
    let st = statuses(&w);
    assert_eq!(st.len(), 1, "{w:?}");
    let e = &st[0].1[0];
    assert_eq!(e["node"], "n1");
    assert_eq!(e["bgp"]["routes"][0]["address"], "198.18.0.0");
    assert_eq!(e["bgp"]["routes"][0]["reason"], "announced");
    assert_eq!(e["bgp"]["sessions"][0]["state"], "established");
    assert_eq!(e["bgp"]["sessions"][0]["prefixesSent"], 1);
    // unchanged: no write; a session change: one write
    assert!(n1.plan_with(&cfg, &ownership, &origins(1), &bgp).is_empty());
    let down = BgpView {
        sessions: vec![session("idle", 0)],
        routes: Arc::new(routes.clone()),
    };
    let w = n1.plan_with(&cfg, &ownership, &origins(1), &down);
    assert_eq!(statuses(&w)[0].1[0]["bgp"]["sessions"][0]["state"], "idle");
    // not selected on this node: the entry is removed
    routes.insert(vip(0), decision(RouteReason::NotSelected));
    let gone = BgpView {
        sessions: vec![session("idle", 0)],
        routes: Arc::new(routes),
    };
    let w = n1.plan_with(&cfg, &ownership, &origins(1), &gone);
    assert_eq!(statuses(&w), vec![("n1", &serde_json::json!([]))]);
}
