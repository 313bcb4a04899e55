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
        json!([{"ip": "192.0.2.0", "ipMode": "VIP"}])
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
        assert_eq!(events(&out), vec![reason], "{}", svc.name_any());
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
