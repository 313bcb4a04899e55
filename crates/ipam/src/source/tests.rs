//! Tests of the agent's source.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus, ObjectReference};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::runtime::watcher::Event;
use model::Desired;
use tokio_util::sync::CancellationToken;

use super::gossip::{SecretSeen, secret_messages};
use super::*;
use crate::crd::L2AnnouncementSpec;
use crate::fixtures::{self, ServiceExt as _, labels};
use crate::intent::{self, LB_CLASS};

fn settings() -> Settings {
    Settings {
        node: "n1".into(),
        scope: Scope::default(),
        base: model::config::parse("", &model::config::Environment::default()).unwrap(),
        gossip_port: 7946,
        host_interfaces: Vec::new(),
    }
}

pub(super) fn node(name: &str, ip: &str, l: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(l)),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                address: ip.into(),
                type_: "InternalIP".into(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn ep(
    ip: &str,
    node: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        node_name: Some(node.into()),
        target_ref: Some(ObjectReference {
            name: Some(format!("pod-{ip}")),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

fn slice(name: &str, svc: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints,
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            labels: Some(labels(&[(SERVICE_NAME_LABEL, svc)])),
            ..ObjectMeta::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some(String::new()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

fn web() -> Service {
    fixtures::service("shop", "web")
        .load_balancer(LB_CLASS)
        .ingress(&["192.0.2.10"])
}

pub(super) fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    s.services.insert(("shop".into(), "web".into()), web());
    s.slices.insert(
        ("shop".into(), "web-abc".into()),
        slice(
            "web-abc",
            "web",
            vec![
                ep("10.1.0.1", "n1", Some(true), Some(true), Some(false)),
                ep("10.1.0.2", "n2", Some(false), Some(false), Some(false)),
                ep("10.1.0.3", "n2", Some(false), Some(true), Some(true)),
            ],
        ),
    );
    s.nodes
        .insert("n1".into(), node("n1", "10.0.0.1", &[("zone", "a")]));
    s.nodes
        .insert("n2".into(), node("n2", "10.0.0.2", &[("zone", "b")]));
    s
}

#[test]
fn a_load_balancer_service_becomes_a_model_service_with_ready_backends() {
    let cfg = build(&snapshot(), &settings(), &template().unwrap());
    assert_eq!(cfg.services.len(), 1);
    let s = &cfg.services[0];
    assert_eq!(s.name, "shop/web");
    assert_eq!(s.dns.hostname, "web.shop");
    assert_eq!(s.vips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports[0].port, 80);
    assert_eq!(
        s.ports[0].target_port, 8080,
        "resolved from the EndpointSlice"
    );
    let names: Vec<&str> = s.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        ["pod-10.1.0.1"],
        "not-ready and terminating endpoints are left out"
    );
    assert_eq!(s.backends[0].node.as_deref(), Some("n1"));
    assert!(!s.placement.local_only);
}

#[test]
fn when_nothing_is_ready_serving_terminating_endpoints_still_serve() {
    let mut snap = snapshot();
    snap.slices.insert(
        ("shop".into(), "web-abc".into()),
        slice(
            "web-abc",
            "web",
            vec![
                ep("10.1.0.2", "n2", Some(false), Some(false), Some(false)),
                ep("10.1.0.3", "n2", Some(false), Some(true), Some(true)),
            ],
        ),
    );
    let cfg = build(&snap, &settings(), &template().unwrap());
    let names: Vec<&str> = cfg.services[0]
        .backends
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(names, ["pod-10.1.0.3"]);
}

#[test]
fn external_traffic_policy_local_makes_placement_local_only() {
    let mut snap = snapshot();
    let mut svc = web();
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    snap.services.insert(("shop".into(), "web".into()), svc);
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert!(cfg.services[0].placement.local_only);
}

#[test]
fn the_forwarding_annotation_sets_the_model_services_forwarding() {
    let cfg = build(&snapshot(), &settings(), &template().unwrap());
    assert_eq!(cfg.services[0].forwarding, model::Forwarding::Auto);
    for (v, f) in [
        ("kernel", model::Forwarding::Kernel),
        ("proxy", model::Forwarding::Proxy),
        // refused by the controller (InvalidRequest); the agent keeps the default
        ("fast", model::Forwarding::Auto),
    ] {
        let mut snap = snapshot();
        let svc = web().annotate(intent::FORWARDING, v);
        snap.services.insert(("shop".into(), "web".into()), svc);
        let cfg = build(&snap, &settings(), &template().unwrap());
        assert_eq!(cfg.services[0].forwarding, f, "{v}");
    }
}

#[test]
fn nodes_excluded_from_external_load_balancers_never_announce() {
    let mut snap = snapshot();
    snap.nodes
        .insert("n2".into(), node("n2", "10.0.0.2", &[(EXCLUDE_LABEL, "")]));
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert_eq!(cfg.services[0].placement.nodes, vec!["n1".to_string()]);
}

#[test]
fn gossip_members_are_the_other_nodes_and_keys_come_from_the_secret() {
    let mut snap = snapshot();
    let k = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="; // base64 of 32 ASCII digits
    snap.secret = Some(Secret {
        metadata: ObjectMeta {
            name: Some("portico-gossip".into()),
            ..ObjectMeta::default()
        },
        data: Some([("key".to_string(), ByteString(k.as_bytes().to_vec()))].into()),
        ..Secret::default()
    });
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert_eq!(cfg.cluster.peers.len(), 1);
    assert_eq!(cfg.cluster.peers[0].name, "n2");
    assert_eq!(
        cfg.cluster.peers[0].address,
        "10.0.0.2:7946".parse().unwrap()
    );
    assert_eq!(cfg.cluster.advertise, "10.0.0.1:7946".parse().unwrap());
    assert_eq!(cfg.cluster.keys.len(), 1);
    assert_eq!(cfg.cluster.keys[0].id, 1);
    // The example key shipped in deploy/ is refused.
    let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    snap.secret.as_mut().unwrap().data =
        Some([("key".to_string(), ByteString(zero.as_bytes().to_vec()))].into());
    assert!(gossip_keys(snap.secret.as_ref()).is_empty());
}

#[test]
fn l2_announcements_limit_the_announcing_nodes_and_unselected_services_are_left_out() {
    let mut snap = snapshot();
    snap.l2.insert(
        "zone-a".into(),
        L2Announcement::new(
            "zone-a",
            L2AnnouncementSpec {
                node_selectors: vec![LabelSelector {
                    match_labels: Some(labels(&[("zone", "a")])),
                    match_expressions: None,
                }],
                ..L2AnnouncementSpec::default()
            },
        ),
    );
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert_eq!(cfg.services[0].placement.nodes, vec!["n1".to_string()]);
    snap.l2.get_mut("zone-a").unwrap().spec.service_selectors = vec![LabelSelector {
        match_labels: Some(labels(&[("app", "other")])),
        match_expressions: None,
    }];
    assert!(
        build(&snap, &settings(), &template().unwrap())
            .services
            .is_empty()
    );
}

fn list_all(src: &mut Source, snap: &Snapshot) -> Option<Desired> {
    let mut last = None;
    let mut feed = |i: Input| {
        if let Some(d) = src.handle(i) {
            last = Some(d);
        }
    };
    feed(Input::Service(Event::Init));
    for s in snap.services.values() {
        feed(Input::Service(Event::InitApply(s.clone())));
    }
    feed(Input::Service(Event::InitDone));
    feed(Input::Slice(Event::Init));
    for s in snap.slices.values() {
        feed(Input::Slice(Event::InitApply(s.clone())));
    }
    feed(Input::Slice(Event::InitDone));
    feed(Input::Node(Event::Init));
    for n in snap.nodes.values() {
        feed(Input::Node(Event::InitApply(n.clone())));
    }
    feed(Input::Node(Event::InitDone));
    feed(Input::Pool(Event::InitDone));
    feed(Input::L2(Event::InitDone));
    feed(Input::BgpPeer(Event::InitDone));
    feed(Input::BgpAdvertisement(Event::InitDone));
    feed(Input::BfdProfile(Event::InitDone));
    feed(Input::BgpSecret(Event::InitDone));
    feed(Input::Secret(Event::InitDone));
    last
}

#[test]
fn nothing_is_published_until_every_kind_is_listed_and_then_only_on_change() {
    let mut src = Source::new(settings()).unwrap();
    assert!(src.handle(Input::Service(Event::InitDone)).is_none());
    let d = list_all(&mut src, &snapshot()).expect("published once everything is listed");
    assert_eq!(d.generation, 1);
    assert_eq!(d.config.services.len(), 1);
    // The same object again changes nothing.
    assert!(src.handle(Input::Service(Event::Apply(web()))).is_none());
    // A new ready endpoint changes the backends.
    let mut s = snapshot().slices.into_values().next().unwrap();
    s.endpoints.push(ep("10.1.0.9", "n2", None, None, None));
    let d = src.handle(Input::Slice(Event::Apply(s))).unwrap();
    assert_eq!(d.generation, 2);
    assert_eq!(d.config.services[0].backends.len(), 2);
}

#[tokio::test]
async fn when_the_api_is_unreachable_the_last_known_state_stays_and_a_re_list_resumes() {
    let mut src = Source::new(settings()).unwrap();
    let first = list_all(&mut src, &snapshot()).unwrap();
    // Watch errors are dropped by `inputs` (logged, backed off); the source sees nothing and
    // its state stays. A re-list after the outage with the same objects publishes nothing new…
    assert!(list_all(&mut src, &snapshot()).is_none());
    // …and a half-done re-list (Init without InitDone) keeps everything.
    assert!(src.handle(Input::Service(Event::Init)).is_none());
    assert_eq!(
        build(&src.snap, &src.settings, &src.template),
        *first.config
    );
    // The re-list completes with a change.
    let mut snap = snapshot();
    snap.services.clear();
    let d = list_all(&mut src, &snap).unwrap();
    assert!(d.config.services.is_empty());
}

// === against a fake API server ===

mod fake_api {
    use std::sync::{Arc, Mutex};

    use http::Response;
    use kube::client::Body;
    use serde_json::{Value, json};

    use crate::fixtures::{ApiServerHandle, list, status_error};

    /// A routing fake: lists from a table, watches held open, an outage switch.
    #[derive(Default)]
    pub struct World {
        pub down: bool,
        pub version: u64,
        pub services: Vec<Value>,
        pub requests: Vec<String>,
    }

    type Held = tower_test::mock::SendResponse<Response<Body>>;

    pub fn reply(status: u16, body: &Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// Serves requests until the client goes away. `outage` fails every held watch.
    pub fn serve(
        mut handle: ApiServerHandle,
        world: Arc<Mutex<World>>,
        outage: Arc<tokio::sync::Notify>,
    ) {
        tokio::spawn(async move {
            let mut held: Vec<Held> = Vec::new();
            loop {
                let next = tokio::select! {
                    r = handle.next_request() => r,
                    () = outage.notified() => {
                        for h in held.drain(..) {
                            h.send_error("connection reset (fake outage)");
                        }
                        continue;
                    }
                };
                let Some((req, send)) = next else { break };
                let (method, uri) = (req.method().to_string(), req.uri().to_string());
                assert!(
                    crate::rbac::allows(crate::rbac::AGENT, &method, &uri),
                    "RBAC does not allow {method} {uri}"
                );
                let mut w = world.lock().unwrap();
                w.requests.push(format!("{method} {uri}"));
                if w.down {
                    send.send_response(reply(503, &status_error(503, "ServiceUnavailable")));
                    continue;
                }
                let version = w.version.to_string();
                if uri.contains("watch=true") {
                    if uri.contains(&format!("resourceVersion={version}&"))
                        || uri.ends_with(&format!("resourceVersion={version}"))
                    {
                        held.push(send);
                    } else {
                        let mut body = serde_json::to_vec(
                            &json!({"type": "ERROR", "object": status_error(410, "Expired")}),
                        )
                        .unwrap();
                        body.push(b'\n');
                        send.send_response(
                            Response::builder()
                                .status(200)
                                .body(Body::from(body))
                                .unwrap(),
                        );
                    }
                    continue;
                }
                let empty: Vec<Value> = Vec::new();
                let items = if uri.starts_with("/api/v1/services") {
                    &w.services
                } else {
                    &empty
                };
                send.send_response(reply(200, &list("Any", items, &version)));
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn the_agent_keeps_its_state_through_an_api_outage_and_resumes_after_it() {
    use std::sync::{Arc, Mutex};

    let (client, handle) = {
        let (svc, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        (kube::Client::new(svc, "default"), handle)
    };
    // No EndpointSlices in this fake: keep announcing without endpoints, so that the only
    // change of placement is the one made after the outage.
    let web = || web().annotate(crate::intent::ANNOUNCE_WITHOUT_ENDPOINTS, "true");
    let world = Arc::new(Mutex::new(fake_api::World {
        version: 1,
        services: vec![serde_json::to_value(web()).unwrap()],
        ..fake_api::World::default()
    }));
    let outage = Arc::new(tokio::sync::Notify::new());
    fake_api::serve(handle, world.clone(), outage.clone());

    let initial = Arc::new(Desired {
        generation: 0,
        config: Arc::new(settings().base),
    });
    let shutdown = CancellationToken::new();
    let receivers = spawn(
        client,
        settings(),
        "portico-system",
        "portico-gossip",
        initial,
        shutdown.clone(),
    )
    .unwrap();
    let mut rx = receivers.desired.clone();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|d| d.generation == 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.borrow().config.services[0].name, "shop/web");
    assert_eq!(receivers.origins.borrow()["shop/web"].uid, "uid-shop-web");

    // The API goes away: watches break, re-lists fail with 503 for a whole minute.
    world.lock().unwrap().down = true;
    outage.notify_one();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        rx.borrow().generation,
        1,
        "nothing is withdrawn while the API is gone"
    );
    assert_eq!(rx.borrow().config.services.len(), 1);
    let failed = world.lock().unwrap().requests.len();

    // It comes back with a change: the watchers resume (with back-off) and re-list.
    {
        let mut w = world.lock().unwrap();
        w.down = false;
        w.version = 2;
        let mut svc = web();
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
        w.services = vec![serde_json::to_value(svc).unwrap()];
    }
    tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|d| {
            d.config
                .services
                .first()
                .is_some_and(|s| s.placement.local_only)
        }),
    )
    .await
    .expect("resumed after the outage")
    .unwrap();
    let w = world.lock().unwrap();
    assert!(w.requests.len() > failed);
    assert!(
        w.requests
            .iter()
            .filter(|r| r.contains("/api/v1/services?") && !r.contains("watch=true"))
            .count()
            >= 2,
        "re-listed"
    );
    shutdown.cancel();
}

#[test]
fn l2_announcement_interfaces_limit_where_this_node_announces() {
    let mut s = settings();
    s.base = model::config::parse(
        "node:\n  interfaces:\n    - {name: eth0, addresses: [192.0.2.1/24]}\n    - {name: eth1, addresses: [198.51.100.1/24]}\n",
        &model::config::Environment::default(),
    )
    .unwrap();
    let mut snap = snapshot();
    let names = |c: &model::Config| -> Vec<String> {
        c.node.interfaces.iter().map(|i| i.name.clone()).collect()
    };
    assert_eq!(
        names(&build(&snap, &s, &template().unwrap())),
        ["eth0", "eth1"]
    );
    snap.l2.insert(
        "lan".into(),
        L2Announcement::new(
            "lan",
            L2AnnouncementSpec {
                node_selectors: vec![LabelSelector {
                    match_labels: Some(labels(&[("zone", "a")])),
                    match_expressions: None,
                }],
                interfaces: vec!["eth1".into()],
                ..L2AnnouncementSpec::default()
            },
        ),
    );
    assert_eq!(names(&build(&snap, &s, &template().unwrap())), ["eth1"]);
    // An announcement that does not select this node does not narrow its interfaces.
    snap.l2.get_mut("lan").unwrap().spec.node_selectors = vec![LabelSelector {
        match_labels: Some(labels(&[("zone", "elsewhere")])),
        match_expressions: None,
    }];
    assert_eq!(
        names(&build(&snap, &s, &template().unwrap())),
        ["eth0", "eth1"]
    );
}

#[test]
fn without_configured_interfaces_the_node_announces_where_its_internal_ip_is() {
    let host = |name: &str, addrs: &[&str]| model::Interface {
        name: name.into(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    };
    let mut st = settings();
    st.host_interfaces = vec![
        host("cni0", &["10.244.0.1/24"]),
        host("eth0", &["192.0.2.11/24", "fe80::1/64"]),
        host("docker0", &["172.17.0.1/16"]),
    ];
    let mut snap = Snapshot::default();
    snap.nodes
        .insert("n1".into(), node("n1", "192.0.2.11", &[]));
    let cfg = build(&snap, &st, &template().unwrap());
    assert_eq!(
        cfg.node.interfaces,
        vec![host("eth0", &["192.0.2.11/24", "fe80::1/64"])]
    );
    // a base config that names interfaces wins
    st.base.node.interfaces = vec![host("bond0", &["198.51.100.2/24"])];
    let cfg = build(&snap, &st, &template().unwrap());
    assert_eq!(cfg.node.interfaces[0].name, "bond0");
}

fn gossip_secret(data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("portico-gossip".into()),
            namespace: Some("portico-system".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Lists everything but the Secret, then lists the Secret with `first`.
fn list_with_secret(src: &mut Source, first: Secret) -> Desired {
    let mut snap = snapshot();
    snap.secret = None;
    assert!(list_all_but_secret(src, &snap).is_none());
    src.handle(Input::Secret(Event::Init));
    src.handle(Input::Secret(Event::InitApply(first)));
    src.handle(Input::Secret(Event::InitDone))
        .expect("published once the Secret is listed")
}

fn list_all_but_secret(src: &mut Source, snap: &Snapshot) -> Option<Desired> {
    let mut last = None;
    for i in [
        Input::Service(Event::InitDone),
        Input::Slice(Event::InitDone),
        Input::Pool(Event::InitDone),
        Input::L2(Event::InitDone),
        Input::BgpPeer(Event::InitDone),
        Input::BgpAdvertisement(Event::InitDone),
        Input::BfdProfile(Event::InitDone),
        Input::BgpSecret(Event::InitDone),
    ] {
        last = src.handle(i).or(last);
    }
    src.handle(Input::Node(Event::Init));
    for n in snap.nodes.values() {
        src.handle(Input::Node(Event::InitApply(n.clone())));
    }
    src.handle(Input::Node(Event::InitDone)).or(last)
}

#[test]
fn gossip_secret_rotation_and_deletion_are_seen_after_the_first_read() {
    let k1 = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let k2 = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXphYmNkZWY=";
    let ids = |d: &Desired| -> Vec<u8> { d.config.cluster.keys.iter().map(|k| k.id).collect() };
    let mut src = Source::new(settings()).unwrap();
    let d = list_with_secret(&mut src, gossip_secret(&[("key", k1)]));
    assert_eq!(ids(&d), [1]);
    // Rotation step 1: add key-2 (it sends from now on, key 1 is still accepted).
    let d = src
        .handle(Input::Secret(Event::Apply(gossip_secret(&[
            ("key", k1),
            ("key-2", k2),
        ]))))
        .expect("a changed Secret (namespaced, as watch events are) is seen");
    assert_eq!(ids(&d), [2, 1]);
    // Rotation step 2: remove key 1.
    let d = src
        .handle(Input::Secret(Event::Apply(gossip_secret(&[("key-2", k2)]))))
        .expect("the second change is seen too");
    assert_eq!(ids(&d), [2]);
    // Deleted: the keys of the base config (none here) apply again.
    let d = src
        .handle(Input::Secret(Event::Delete(gossip_secret(&[(
            "key-2", k2,
        )]))))
        .expect("a deleted Secret is noticed");
    assert!(d.config.cluster.keys.is_empty());
    assert!(src.snap.secret.is_none());
    // Created again.
    let d = src
        .handle(Input::Secret(Event::Apply(gossip_secret(&[("key", k1)]))))
        .unwrap();
    assert_eq!(ids(&d), [1]);
}

#[test]
fn refused_gossip_keys_say_why_and_a_duplicate_id_counts_once() {
    let k1 = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let s = gossip_secret(&[
        ("key", k1),
        ("key-1", k1),
        ("key-3", zero),
        ("key-x", k1),
        ("key-4", "short"),
        ("unrelated", "x"),
    ]);
    assert_eq!(
        gossip_keys(Some(&s))
            .iter()
            .map(|k| k.id)
            .collect::<Vec<_>>(),
        [1]
    );
    let refused = refused_gossip_keys(Some(&s));
    assert_eq!(
        refused.keys().map(String::as_str).collect::<Vec<_>>(),
        ["key-1", "key-3", "key-4", "key-x"]
    );
    assert!(refused["key-3"].contains("all-zero"));
    assert!(refused["key-1"].contains("already"));
}

#[test]
fn a_refused_gossip_key_is_reported_once_not_on_every_rebuild() {
    let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let mut src = Source::new(settings()).unwrap();
    list_with_secret(&mut src, gossip_secret(&[("key", zero)]));
    let seen = src.secret_seen.clone();
    assert_eq!(seen.refused.len(), 1);
    // Nothing new to say for the same Secret, however often the config is rebuilt.
    assert!(secret_messages(&seen, &seen).is_empty());
    src.handle(Input::Service(Event::Apply(web())));
    src.handle(Input::Secret(Event::Apply(gossip_secret(&[("key", zero)]))));
    assert_eq!(src.secret_seen, seen);
    let msgs = secret_messages(&SecretSeen::default(), &seen);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].0 && msgs[0].1.contains("all-zero"), "{msgs:?}");
    // A deletion is said once.
    let gone = SecretSeen::default();
    let msgs = secret_messages(&seen, &gone);
    assert!(
        msgs.iter().any(|(w, m)| *w && m.contains("deleted")),
        "{msgs:?}"
    );
}

#[test]
fn services_whose_dashed_names_collide_are_both_served() {
    // `team-a/web` and `team/a-web` would both be `team-a-web`.
    let mut snap = snapshot();
    let a = fixtures::service("team-a", "web")
        .load_balancer(LB_CLASS)
        .ingress(&["192.0.2.21"]);
    let b = fixtures::service("team", "a-web")
        .load_balancer(LB_CLASS)
        .ingress(&["192.0.2.22"]);
    snap.services.insert(("team-a".into(), "web".into()), a);
    snap.services.insert(("team".into(), "a-web".into()), b);
    let cfg = build(&snap, &settings(), &template().unwrap());
    let mut names: Vec<(&str, String)> = cfg
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.vips[0].to_string()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("shop/web", "192.0.2.10".to_string()),
            ("team-a/web", "192.0.2.21".to_string()),
            ("team/a-web", "192.0.2.22".to_string()),
        ]
    );
    let o = origins(&snap, &cfg);
    assert_eq!(
        (
            o["team-a/web"].namespace.as_str(),
            o["team-a/web"].name.as_str()
        ),
        ("team-a", "web")
    );
    assert_eq!(
        (
            o["team/a-web"].namespace.as_str(),
            o["team/a-web"].name.as_str()
        ),
        ("team", "a-web")
    );
}

#[test]
fn a_service_without_serving_endpoints_is_withdrawn_unless_told_otherwise() {
    let mut snap = snapshot();
    snap.slices.clear();
    let cfg = build(&snap, &settings(), &template().unwrap());
    let s = &cfg.services[0];
    assert!(s.backends.is_empty());
    assert!(
        s.placement.withdrawn,
        "no endpoint serves: the agents withdraw and say noHealthyEndpoints"
    );
    assert!(!s.placement.local_only, "withdrawal is not ETP Local");
    assert!(origins(&snap, &cfg)["shop/web"].no_endpoints);
    // Endpoints that are serving while terminating still count (connections drain).
    snap.slices.insert(
        ("shop".into(), "web-abc".into()),
        slice(
            "web-abc",
            "web",
            vec![ep("10.1.0.3", "n2", Some(false), Some(true), Some(true))],
        ),
    );
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert!(!cfg.services[0].placement.withdrawn);
    assert!(!origins(&snap, &cfg)["shop/web"].no_endpoints);
    // Opted out: announced without endpoints.
    snap.slices.clear();
    let svc = web().annotate(crate::intent::ANNOUNCE_WITHOUT_ENDPOINTS, "true");
    snap.services.insert(("shop".into(), "web".into()), svc);
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert!(!cfg.services[0].placement.withdrawn);
    assert!(!origins(&snap, &cfg)["shop/web"].no_endpoints);
}
