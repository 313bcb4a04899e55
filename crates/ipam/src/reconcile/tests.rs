//! Tests of the controller's decisions, without any API server.

use super::*;
use crate::fixtures::{self, ServiceExt as _};
use crate::intent::{ADDRESS_COUNT, EXTERNAL_IP, IPS, LB_CLASS, SHARING_KEY};

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn lb(name: &str) -> Service {
    fixtures::service("default", name).load_balancer(LB_CLASS)
}

/// A synced state with one pool.
fn synced(pools: Vec<IPPool>, services: Vec<Service>) -> (State, Vec<Action>) {
    let mut s = State::new(Scope::default());
    let mut out = s.pools_listed(pools, now());
    out.extend(s.namespaces_listed(BTreeMap::new(), now()));
    out.extend(s.services_listed(services, now()));
    (s, out)
}

fn events(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn status_patches(actions: &[Action]) -> Vec<&Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PatchServiceStatus { patch, .. } => Some(patch),
            _ => None,
        })
        .collect()
}

/// Applies the status patches the way the API server would (enough for these tests).
fn apply(mut svc: Service, actions: &[Action]) -> Service {
    for p in status_patches(actions) {
        if let Some(ing) = p["status"]["loadBalancer"]["ingress"].as_array() {
            let ips: Vec<&str> = ing.iter().map(|i| i["ip"].as_str().unwrap()).collect();
            svc = svc.ingress(&ips);
        }
        if let Some(cs) = p["status"]["conditions"].as_array() {
            let status = svc.status.get_or_insert_with(Default::default);
            let list = status.conditions.get_or_insert_with(Vec::new);
            for c in cs {
                list.retain(|o| o.type_ != c["type"].as_str().unwrap());
                if c.get("$patch").is_none() {
                    list.push(serde_json::from_value(c.clone()).unwrap());
                }
            }
        }
    }
    svc
}

#[test]
fn nothing_is_allocated_before_every_cache_is_synced() {
    let mut s = State::new(Scope::default());
    assert!(
        s.pools_listed(vec![fixtures::pool("p", &["192.0.2.0/30"])], now())
            .is_empty()
    );
    assert!(s.service_applied(lb("web"), now()).is_empty());
    // Services listed, but not namespaces yet: still nothing.
    assert!(s.services_listed(vec![lb("web")], now()).is_empty());
    assert!(s.allocator().holdings().is_empty());
    let out = s.namespaces_listed(BTreeMap::new(), now());
    assert_eq!(events(&out), vec![IP_ALLOCATED]);
}

#[test]
fn a_load_balancer_service_gets_an_address_in_its_status_with_an_event() {
    let (_, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![lb("web")],
    );
    let p = status_patches(&out)[0];
    assert_eq!(
        p["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "192.0.2.0", "ipMode": "Proxy"}])
    );
    assert_eq!(
        p["metadata"]["resourceVersion"], "1",
        "guarded against stale caches"
    );
    assert_eq!(p["status"]["conditions"][0]["reason"], IP_ALLOCATED);
    assert_eq!(events(&out), vec![IP_ALLOCATED]);
}

#[test]
fn the_controllers_own_write_coming_back_causes_nothing() {
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![lb("web")],
    );
    let written = apply(lb("web"), &out).version("2");
    let again = s.service_applied(written, now());
    assert!(
        again
            .iter()
            .all(|a| matches!(a, Action::PatchPoolStatus { .. })),
        "{again:?}"
    );
}

#[test]
fn a_restart_restores_recorded_addresses_before_serving_new_requests() {
    // web holds .1 (not the first free one); new arrives earlier in the list but must not take .1.
    let pools = vec![fixtures::pool("p", &["192.0.2.1-192.0.2.2"])];
    let web = lb("web").ingress(&["192.0.2.1"]);
    let (s, out) = synced(pools, vec![lb("aaa-new"), web]);
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "web")),
        ["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "aaa-new")),
        ["192.0.2.2".parse::<IpAddr>().unwrap()]
    );
    let touched: Vec<&ServiceKey> = out
        .iter()
        .filter_map(|a| match a {
            Action::PatchServiceStatus { key, patch }
                if !patch["status"]["loadBalancer"].is_null() =>
            {
                Some(key)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        touched,
        vec![&ServiceKey::new("default", "aaa-new")],
        "web's address is not rewritten"
    );
}

#[test]
fn an_address_claimed_from_an_existing_ingress_is_rewritten_with_ip_mode_proxy() {
    // Left by MetalLB: `ipMode: VIP` (or no ipMode at all, which means VIP).
    let mut web = lb("web").ingress(&["192.0.2.1"]);
    let mut other = lb("other").ingress(&["192.0.2.2"]);
    for (svc, mode) in [(&mut web, Some("VIP")), (&mut other, None)] {
        let ing = svc.status.as_mut().unwrap().load_balancer.as_mut().unwrap();
        ing.ingress.as_mut().unwrap()[0].ip_mode = mode.map(String::from);
    }
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![web.clone(), other],
    );
    let rewritten: BTreeMap<String, Value> = out
        .iter()
        .filter_map(|a| match a {
            Action::PatchServiceStatus { key, patch }
                if !patch["status"]["loadBalancer"].is_null() =>
            {
                Some((
                    key.name.clone(),
                    patch["status"]["loadBalancer"]["ingress"].clone(),
                ))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rewritten["web"],
        json!([{"ip": "192.0.2.1", "ipMode": "Proxy"}])
    );
    assert_eq!(
        rewritten["other"],
        json!([{"ip": "192.0.2.2", "ipMode": "Proxy"}])
    );
    assert!(
        !events(&out).contains(&IP_ALLOCATED),
        "the address did not change: no IPAllocated event: {out:?}"
    );
    // Once written, nothing more.
    let written = apply(web, &out).version("2");
    let again = s.service_applied(written, now());
    assert!(status_patches(&again).is_empty(), "{again:?}");
}

#[test]
fn an_ignored_metallb_annotation_gets_one_event_per_change() {
    let svc = lb("web").annotate("metallb.universe.tf/some-knob", "x");
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![svc.clone()],
    );
    assert_eq!(
        events(&out),
        vec![crate::intent::ANNOTATION_IGNORED, IP_ALLOCATED]
    );
    // Resyncs and the controller's own writes coming back say nothing again.
    let written = apply(svc.clone(), &out).version("2");
    assert!(events(&s.service_applied(written.clone(), now())).is_empty());
    assert!(events(&s.services_listed(vec![written.clone()], now())).is_empty());
    // Another ignored annotation is a change: one more Event.
    let more = written.annotate("metallb.io/other-knob", "y").version("3");
    assert_eq!(
        events(&s.service_applied(more, now())),
        vec![crate::intent::ANNOTATION_IGNORED]
    );
}

#[test]
fn every_bad_input_produces_its_event_and_condition_and_nothing_else() {
    let pools = vec![fixtures::pool("p", &["192.0.2.0/31"])];
    let taken = lb("taken").annotate(IPS, "192.0.2.0");
    let cases: Vec<(Service, &str)> = vec![
        (
            lb("outside").annotate(IPS, "198.51.100.1"),
            "InvalidRequest",
        ),
        (lb("in-use").annotate(IPS, "192.0.2.0"), "IPInUse"),
        (
            lb("bad-count").annotate(ADDRESS_COUNT, "lots"),
            "InvalidRequest",
        ),
        (lb("bad-ip").annotate(IPS, "192.0.2.300"), "InvalidRequest"),
        (
            fixtures::service("default", "bad-ext").annotate(EXTERNAL_IP, "maybe"),
            "InvalidRequest",
        ),
    ];
    for (svc, reason) in cases {
        let (mut s, _) = synced(pools.clone(), vec![taken.clone()]);
        let before = s.allocator().clone();
        let out = s.service_applied(svc.clone(), now());
        let refusals: Vec<&str> = events(&out)
            .into_iter()
            .filter(|r| *r != crate::intent::EXTERNAL_IPS_DEPRECATED)
            .collect();
        assert_eq!(refusals, vec![reason], "{}", svc.name_any());
        let patches = status_patches(&out);
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0]["status"]["conditions"][0]["status"], "False");
        assert_eq!(patches[0]["status"]["conditions"][0]["reason"], reason);
        assert!(patches[0]["status"]["loadBalancer"].is_null());
        assert_eq!(s.allocator(), &before, "{}", svc.name_any());
        // The same refusal again is not repeated.
        let again = s.service_applied(apply(svc, &out), now());
        assert!(events(&again).is_empty());
    }
}

#[test]
fn an_exhausted_pool_says_so_and_the_waiting_service_gets_the_address_once_freed() {
    let (mut s, _) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/32"])],
        vec![lb("first")],
    );
    let out = s.service_applied(lb("second"), now());
    assert_eq!(events(&out), vec!["PoolExhausted"]);
    let out = s.service_deleted(&lb("first"), now());
    assert_eq!(events(&out), vec![IP_ALLOCATED]);
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "second")),
        ["192.0.2.0".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn a_port_clash_on_a_sharing_key_is_refused_with_sharing_refused() {
    let a = lb("a").annotate(SHARING_KEY, "k");
    let (mut s, _) = synced(vec![fixtures::pool("p", &["192.0.2.0/30"])], vec![a]);
    let out = s.service_applied(lb("b").annotate(SHARING_KEY, "k").tcp_ports(&[443]), now());
    assert_eq!(events(&out), vec![IP_ALLOCATED]);
    let out = s.service_applied(lb("c").annotate(SHARING_KEY, "k"), now());
    assert_eq!(events(&out), vec!["SharingRefused"]);
}

#[test]
fn an_overlapping_pool_gets_a_condition_and_its_usage_is_reported() {
    let (_, out) = synced(
        vec![
            fixtures::pool("a", &["192.0.2.0/30"]),
            fixtures::pool("b", &["192.0.2.2/31"]),
        ],
        vec![lb("web")],
    );
    let pool_patches: BTreeMap<&str, &Value> = out
        .iter()
        .filter_map(|a| match a {
            Action::PatchPoolStatus { name, patch } => Some((name.as_str(), patch)),
            _ => None,
        })
        .collect();
    assert_eq!(pool_patches["a"]["status"]["assignedIPv4"], 1);
    assert_eq!(pool_patches["a"]["status"]["availableIPv4"], 3);
    let cond = &pool_patches["b"]["status"]["conditions"][1];
    assert_eq!(cond["type"], "Overlapping");
    assert_eq!(cond["status"], "True");
}

fn created(mut p: IPPool, second: i64) -> IPPool {
    p.metadata.creation_timestamp = Some(Time(
        Timestamp::from_second(1_700_000_000 + second).unwrap(),
    ));
    p
}

#[test]
fn a_newly_created_overlapping_pool_is_refused_and_the_older_one_stays_in_service() {
    // `old` is established, with a low priority (tried last) but older; `aaa-new` comes later,
    // sorts first by name and has a better priority: it must not take the older pool's place.
    let mut old = fixtures::pool("old", &["192.0.2.0/30"]);
    old.spec.service_allocation = Some(crate::crd::ServiceAllocation {
        priority: Some(1),
        ..Default::default()
    });
    let old = created(old, 0);
    let (mut s, _) = synced(vec![old.clone()], vec![lb("web")]);
    let mut newer = created(fixtures::pool("aaa-new", &["192.0.2.2-192.0.2.9"]), 60);
    newer.spec.service_allocation = Some(crate::crd::ServiceAllocation {
        priority: Some(0),
        ..Default::default()
    });
    let out = s.pool_applied(newer, now());
    let patch = |name: &str| {
        out.iter()
            .find_map(|a| match a {
                Action::PatchPoolStatus { name: n, patch } if n == name => Some(patch.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no status for {name}: {out:?}"))
    };
    let new_status = patch("aaa-new");
    let cond = &new_status["status"]["conditions"][1];
    assert_eq!(
        (cond["type"].as_str(), cond["status"].as_str()),
        (Some("Overlapping"), Some("True"))
    );
    assert!(cond["message"].as_str().unwrap().contains("old"), "{cond}");
    assert_eq!(new_status["status"]["availableIPv4"], 0);
    // The Event is on the newcomer and names the older pool.
    let ev = out
        .iter()
        .find_map(|a| match a {
            Action::Event {
                reference,
                reason: "Overlapping",
                note,
                ..
            } => Some((reference.name.clone(), note.clone())),
            _ => None,
        })
        .expect("an Overlapping event");
    assert_eq!(ev.0.as_deref(), Some("aaa-new"));
    assert!(ev.1.contains("older pool old"), "{}", ev.1);
    // The older pool is untouched: still valid, not overlapping, its free count intact.
    let old_status = patch("old");
    let conds = &old_status["status"]["conditions"];
    assert_eq!(
        (conds[0]["type"].as_str(), conds[0]["status"].as_str()),
        (Some("Valid"), Some("True"))
    );
    assert_eq!(
        (conds[1]["type"].as_str(), conds[1]["status"].as_str()),
        (Some("Overlapping"), Some("False"))
    );
    assert_eq!(old_status["status"]["availableIPv4"], 3);
    let report = s.allocator().report();
    let old_report = report.iter().find(|r| r.name == "old").unwrap();
    assert!(old_report.overlapping.is_empty());
    assert_eq!(old_report.available_v4, 3);
    // The status writes come back (as the driver's `observe_pool` sees them).
    for a in &out {
        if let Action::PatchPoolStatus { name, patch } = a {
            let mut p = fixtures::pool(name, &[]);
            p.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
            s.observe_pool(p);
        }
    }
    // The next Service is served from the older pool, although the newcomer has the better
    // priority: a refused pool hands out nothing.
    let out = s.service_applied(lb("next"), now());
    assert_eq!(events(&out), vec![IP_ALLOCATED]);
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "next")),
        ["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn allocation_honours_pool_priority() {
    let mut first = fixtures::pool("z-first", &["198.51.100.0/30"]);
    first.spec.service_allocation = Some(crate::crd::ServiceAllocation {
        priority: Some(1),
        ..Default::default()
    });
    let mut second = fixtures::pool("a-second", &["192.0.2.0/30"]);
    second.spec.service_allocation = Some(crate::crd::ServiceAllocation {
        priority: Some(5),
        ..Default::default()
    });
    let (s, _) = synced(vec![second, first], vec![lb("web")]);
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "web")),
        ["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn a_malformed_pool_is_reported_invalid_with_an_event_and_serves_nothing() {
    let (s, out) = synced(
        vec![
            fixtures::pool("bad", &["192.0.2.0/33"]),
            fixtures::pool("good", &["198.51.100.0/30"]),
        ],
        vec![lb("web")],
    );
    let bad = out
        .iter()
        .find_map(|a| match a {
            Action::PatchPoolStatus { name, patch } if name == "bad" => Some(patch),
            _ => None,
        })
        .unwrap();
    assert_eq!(bad["status"]["conditions"][0]["status"], "False");
    assert_eq!(bad["status"]["conditions"][0]["reason"], "InvalidSpec");
    assert!(
        bad["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("192.0.2.0/33")
    );
    assert_eq!(events(&out), vec![IP_ALLOCATED, "InvalidPool"]);
    assert_eq!(
        s.allocator().held(&ServiceKey::new("default", "web")),
        ["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn deleting_a_pool_keeps_the_address_and_says_why() {
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![lb("web")],
    );
    let web = apply(lb("web"), &out);
    s.service_applied(web, now());
    let out = s.pool_deleted(&fixtures::pool("p", &["192.0.2.0/30"]), now());
    let p = status_patches(&out)[0];
    assert!(p["status"]["loadBalancer"].is_null(), "the address stays");
    assert_eq!(
        p["status"]["conditions"][0]["reason"],
        "AddressOutsidePools"
    );
    assert!(events(&out).is_empty());
}

fn pool_status(out: &[Action], name: &str) -> Option<IPPoolStatus> {
    out.iter().rev().find_map(|a| match a {
        Action::PatchPoolStatus { name: n, patch } if n == name => {
            Some(serde_json::from_value(patch["status"].clone()).unwrap())
        }
        _ => None,
    })
}

#[test]
fn a_pool_edit_that_leaves_held_addresses_outside_sets_orphans_until_they_are_released() {
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![lb("web")],
    );
    let web = apply(lb("web"), &out).version("2");
    s.service_applied(web.clone(), now());
    let first = pool_status(&out, "p").unwrap();
    let cond = |st: &IPPoolStatus| {
        st.conditions
            .iter()
            .find(|c| c.type_ == "Orphans")
            .map(|c| (c.status.clone(), c.message.clone()))
            .unwrap()
    };
    assert_eq!(cond(&first).0, "False");
    // The pool is edited: web's 192.0.2.0 is no longer in it.
    let edited = fixtures::pool("p", &["192.0.2.4/30"]);
    let out = s.pool_applied(edited.clone(), now());
    let st = pool_status(&out, "p").expect("the pool reports its orphan");
    let (status, message) = cond(&st);
    assert_eq!(status, "True");
    assert!(message.contains("192.0.2.0 (default/web)"), "{message}");
    assert_eq!(st.orphans, ["192.0.2.0"]);
    // A new leader (restart) knows only what the status says: the orphan stays reported.
    let mut reported = edited.clone();
    reported.status = Some(st.clone());
    let (mut again, out) = synced(vec![reported.clone()], vec![web.clone()]);
    assert!(
        pool_status(&out, "p").is_none(),
        "the same report: nothing to write: {out:?}"
    );
    // Released: the condition clears, and the list with it.
    let out = again.service_deleted(&web, now());
    let st = pool_status(&out, "p").unwrap();
    assert_eq!(cond(&st).0, "False");
    assert!(st.orphans.is_empty());
}

#[test]
fn a_type_change_releases_the_address_and_clears_the_status() {
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![lb("web")],
    );
    let mut web = apply(lb("web"), &out);
    web.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let out = s.service_applied(web, now());
    assert!(s.allocator().holdings().is_empty());
    assert_eq!(
        status_patches(&out)[0]["status"]["loadBalancer"]["ingress"],
        Value::Null
    );
}

#[test]
fn external_ip_auto_writes_spec_external_ips_and_removing_it_takes_them_back() {
    let svc = fixtures::service("default", "db").annotate(EXTERNAL_IP, "auto");
    let (mut s, out) = synced(
        vec![fixtures::pool("p", &["192.0.2.0/30"])],
        vec![svc.clone()],
    );
    let spec_patch = out
        .iter()
        .find_map(|a| match a {
            Action::PatchService { patch, .. } => Some(patch.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(spec_patch["spec"]["externalIPs"], json!(["192.0.2.0"]));
    assert_eq!(
        spec_patch["metadata"]["annotations"][ALLOCATED],
        "192.0.2.0"
    );
    assert_eq!(
        events(&out),
        vec![crate::intent::EXTERNAL_IPS_DEPRECATED, IP_ALLOCATED],
        "spec.externalIPs is deprecated (KEP-5707): said once, with the allocation"
    );
    // The API server applied it; later the annotation is removed.
    let mut db = svc.annotate(ALLOCATED, "192.0.2.0");
    db.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.0".into(), "203.0.113.9".into()]);
    db.annotations_mut().remove(EXTERNAL_IP);
    let out = s.service_applied(db, now());
    let spec_patch = out
        .iter()
        .find_map(|a| match a {
            Action::PatchService { patch, .. } => Some(patch.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        spec_patch["spec"]["externalIPs"],
        json!(["203.0.113.9"]),
        "someone else's address stays"
    );
    assert!(s.allocator().holdings().is_empty());
}

// === the controller over a simulated API server, under any order of events ===

mod simulated {
    use proptest::prelude::*;

    use super::*;

    /// Applies the writes to the objects as the API server would, and echoes them back through
    /// the watch, until nothing more is written.
    fn settle(
        state: &mut State,
        objects: &mut BTreeMap<ServiceKey, Service>,
        mut actions: Vec<Action>,
    ) {
        for _ in 0..4 {
            let mut touched = BTreeSet::new();
            for a in &actions {
                let (key, patch) = match a {
                    Action::PatchServiceStatus { key, patch }
                    | Action::PatchService { key, patch } => (key, patch),
                    _ => continue,
                };
                let Some(mut svc) = objects.get(key).cloned() else {
                    continue;
                };
                if matches!(a, Action::PatchServiceStatus { .. }) {
                    svc = apply(svc, std::slice::from_ref(a));
                    if patch["status"]["loadBalancer"]["ingress"].is_null()
                        && patch["status"]["loadBalancer"].is_object()
                    {
                        svc.status.as_mut().unwrap().load_balancer = None;
                    }
                } else {
                    match patch["metadata"]["annotations"][ALLOCATED].as_str() {
                        Some(v) => svc = svc.annotate(ALLOCATED, v),
                        None => {
                            svc.annotations_mut().remove(ALLOCATED);
                        }
                    }
                    let ext: Vec<String> =
                        serde_json::from_value(patch["spec"]["externalIPs"].clone()).unwrap();
                    svc.spec.as_mut().unwrap().external_ips = Some(ext);
                }
                let rv: u64 = svc.resource_version().unwrap().parse().unwrap();
                objects.insert(key.clone(), svc.version(&(rv + 1).to_string()));
                touched.insert(key.clone());
            }
            actions = touched
                .iter()
                .flat_map(|k| state.service_applied(objects[k].clone(), now()))
                .collect();
            if actions
                .iter()
                .all(|a| matches!(a, Action::PatchPoolStatus { .. } | Action::Event { .. }))
            {
                return;
            }
        }
        panic!("the controller keeps writing: {actions:?}");
    }

    /// Even-numbered Services are LoadBalancers, odd ones ClusterIP with `external-ip`.
    fn service(i: u8, want: Option<u8>, key: bool, port: i32) -> Service {
        let base = fixtures::service("default", &format!("s{i}")).tcp_ports(&[port]);
        let mut s = if i.is_multiple_of(2) {
            let s = base.load_balancer(LB_CLASS);
            match want {
                Some(w) => s.annotate(IPS, &format!("192.0.2.{w}")),
                None => s,
            }
        } else {
            base.annotate(
                EXTERNAL_IP,
                &want.map_or("auto".to_string(), |w| format!("192.0.2.{w}")),
            )
        };
        if key {
            s = s.annotate(SHARING_KEY, "k");
        }
        s
    }

    fn pools(v: u8) -> Vec<IPPool> {
        match v {
            0 => vec![fixtures::pool("p", &["192.0.2.0/30"])],
            1 => vec![fixtures::pool("p", &["192.0.2.0/31"])],
            2 => vec![
                fixtures::pool("p", &["192.0.2.2/31"]),
                fixtures::pool("q", &["192.0.2.0/30"]),
            ],
            _ => vec![],
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Apply {
            i: u8,
            want: Option<u8>,
            key: bool,
            port: i32,
        },
        Delete(u8),
        Pools(u8),
        /// The watch re-lists (after 410 Gone): the whole list at once.
        Relist,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..6, proptest::option::of(0u8..4), any::<bool>(), prop_oneof![Just(80), Just(443)])
                .prop_map(|(i, want, key, port)| Op::Apply { i, want, key, port }),
            2 => (0u8..6).prop_map(Op::Delete),
            1 => (0u8..4).prop_map(Op::Pools),
            1 => Just(Op::Relist),
        ]
    }

    fn ingress(s: &Service) -> Vec<String> {
        let mode = intent::mode(s, &Scope::default()).unwrap_or(Mode::LoadBalancer);
        intent::recorded(s, mode)
            .iter()
            .map(|ip| ip.to_string())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn no_two_services_that_may_not_share_ever_show_one_address_and_a_restart_changes_nothing(ops in proptest::collection::vec(op(), 1..40)) {
            let mut state = State::new(Scope::default());
            let mut objects: BTreeMap<ServiceKey, Service> = BTreeMap::new();
            let mut pool_version = 0;
            let out = state.pools_listed(pools(0), now());
            settle(&mut state, &mut objects, out);
            let out = state.namespaces_listed(BTreeMap::new(), now());
            settle(&mut state, &mut objects, out);
            let out = state.services_listed(vec![], now());
            settle(&mut state, &mut objects, out);
            for op in ops {
                let out = match op {
                    Op::Apply { i, want, key, port } => {
                        let k = ServiceKey::new("default", format!("s{i}"));
                        let mut svc = service(i, want, key, port);
                        // Keep what the API server holds (status, version): this is an edit.
                        if let Some(old) = objects.get(&k) {
                            svc.status = old.status.clone();
                            svc.metadata.resource_version = old.metadata.resource_version.clone();
                            // Fields the controller manages survive the user's edit.
                            svc.spec.as_mut().unwrap().external_ips = old.spec.as_ref().unwrap().external_ips.clone();
                            if let Some(a) = old.annotations().get(ALLOCATED) {
                                svc = svc.annotate(ALLOCATED, a);
                            }
                        }
                        objects.insert(k, svc.clone());
                        state.service_applied(svc, now())
                    }
                    Op::Delete(i) => {
                        let k = ServiceKey::new("default", format!("s{i}"));
                        match objects.remove(&k) {
                            Some(svc) => state.service_deleted(&svc, now()),
                            None => vec![],
                        }
                    }
                    Op::Pools(v) => {
                        pool_version = v;
                        state.pools_listed(pools(v), now())
                    }
                    Op::Relist => state.services_listed(objects.values().cloned().collect(), now()),
                };
                let before: BTreeMap<ServiceKey, Vec<String>> = objects.iter().map(|(k, s)| (k.clone(), ingress(s))).collect();
                settle(&mut state, &mut objects, out);
                // The controller never hands out an address that is in use by a Service that may not
                // share it (users can still break sharing later by editing keys or ports; then
                // nobody is moved and the conflict is reported).
                for (k, s) in &objects {
                    let old = before.get(k).cloned().unwrap_or_default();
                    for ip in ingress(s).into_iter().filter(|ip| !old.contains(ip)) {
                        for (k2, o) in objects.iter().filter(|(k2, _)| *k2 != k) {
                            if ingress(o).contains(&ip) {
                                let key = |s: &Service| s.annotations().get(SHARING_KEY).cloned();
                                let port = |s: &Service| s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
                                prop_assert!(key(s).is_some() && key(s) == key(o), "{ip} given to {k} while {k2} holds it");
                                prop_assert!(port(s) != port(o), "{ip}: port clash between {k} and {k2}");
                            }
                        }
                    }
                }
            }
            // A restart (or a new leader) re-derives the same allocations from the objects alone.
            let mut fresh = State::new(Scope::default());
            fresh.pools_listed(pools(pool_version), now());
            fresh.namespaces_listed(BTreeMap::new(), now());
            let out = fresh.services_listed(objects.values().cloned().collect(), now());
            prop_assert_eq!(fresh.allocator().holdings(), state.allocator().holdings());
            let moved: Vec<&Action> = out
                .iter()
                .filter(|a| matches!(a, Action::PatchServiceStatus { patch, .. } if !patch["status"]["loadBalancer"].is_null()))
                .collect();
            prop_assert!(moved.is_empty(), "a restart rewrote addresses: {:?}", moved);
        }
    }
}
