//! kube-rs's client and runtime against the test API server: they must not tell it from a real one.

use std::time::Duration;

use apiserver::{ApiServer, Options};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Config};
use serde_json::{Value, json};

const CRDS: &str = include_str!("../../../deploy/crds.yaml");
const RBAC: &str = include_str!("../../../deploy/rbac.yaml");
const NAMESPACE: &str = include_str!("../../../deploy/namespace.yaml");

async fn client(kubeconfig: &str) -> Client {
    let kc = Kubeconfig::from_yaml(kubeconfig).expect("kubeconfig parses");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(cfg).expect("client")
}

async fn start() -> (ApiServer, Client) {
    let server = ApiServer::start(Options {
        bookmark_interval: Duration::from_millis(300),
        ..Options::default()
    })
    .await
    .expect("server starts");
    let c = client(&server.admin_kubeconfig()).await;
    (server, c)
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other}"),
    }
}

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": {"a": "1"},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_conflicts_and_selectors() {
    let (_server, c) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let a = api
        .create(&PostParams::default(), &cm("a", json!({"app": "x"})))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("b", json!({"app": "y"})))
        .await
        .unwrap();
    assert_eq!(
        code(
            api.create(&PostParams::default(), &cm("a", json!({})))
                .await
                .unwrap_err()
        ),
        409
    );
    let listed = api
        .list(&ListParams::default().labels("app=x"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(listed.metadata.resource_version.is_some());
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("b"));
    let paged = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(paged.items.len(), 1);
    assert!(paged.metadata.continue_.is_some());

    // Replace with the current version works once; the stale one is refused.
    let mut changed = a.clone();
    changed.data = Some([("a".to_string(), "2".to_string())].into());
    let fresh = api
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(fresh.metadata.resource_version, a.metadata.resource_version);
    assert_eq!(
        code(
            api.replace("a", &PostParams::default(), &changed)
                .await
                .unwrap_err()
        ),
        409
    );
    // A merge patch carrying a stale resourceVersion is refused too.
    let stale =
        json!({"metadata": {"resourceVersion": a.metadata.resource_version}, "data": {"a": "3"}});
    assert_eq!(
        code(
            api.patch("a", &PatchParams::default(), &Patch::Merge(&stale))
                .await
                .unwrap_err()
        ),
        409
    );
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"b": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
    // A write that changes nothing keeps the resourceVersion.
    let same = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"b": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        patched.metadata.resource_version
    );

    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(api.get("a").await.unwrap_err()), 404);
    let err = api.get("a").await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!() };
    assert_eq!(s.reason, "NotFound");
    // Namespaced objects need their namespace.
    let nowhere: Api<ConfigMap> = Api::namespaced(c, "nowhere");
    assert_eq!(
        code(
            nowhere
                .create(&PostParams::default(), &cm("x", json!({})))
                .await
                .unwrap_err()
        ),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_subresource_and_strategic_merge() {
    let (_server, c) = start().await;
    let api: Api<Service> = Api::namespaced(c, "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &svc).await.unwrap();
    // Create ignores status; defaults are set.
    assert!(
        created
            .status
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap()
            .ingress
            .is_none()
    );
    let spec = created.spec.as_ref().unwrap();
    assert!(spec.cluster_ip.is_some());
    assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_string()][..]));
    let pp = PatchParams::default();
    let st = api
        .patch_status(
            "web",
            &pp,
            &Patch::Strategic(json!({
                "spec": {"type": "ClusterIP"},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7", "ipMode": "Proxy"}]},
                           "conditions": [{"type": "A", "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            })),
        )
        .await
        .unwrap();
    // The status write ignored spec.
    assert_eq!(
        st.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    let ip = |s: &Service| {
        s.status
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap()
            .ingress
            .as_ref()
            .unwrap()[0]
            .ip
            .clone()
    };
    assert_eq!(ip(&st).as_deref(), Some("192.0.2.7"));
    // Conditions merge by type; `$patch: delete` removes one.
    let two = api
        .patch_status(
            "web",
            &pp,
            &Patch::Strategic(json!({"status": {"conditions": [{"type": "B", "status": "False", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        two.status
            .as_ref()
            .unwrap()
            .conditions
            .as_ref()
            .unwrap()
            .len(),
        2
    );
    let one = api
        .patch_status(
            "web",
            &pp,
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "A", "$patch": "delete"}]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        one.status
            .as_ref()
            .unwrap()
            .conditions
            .as_ref()
            .unwrap()
            .len(),
        1
    );
    // A main write ignores status.
    let main = api
        .patch(
            "web",
            &pp,
            &Patch::Merge(
                json!({"status": {"loadBalancer": {}}, "metadata": {"labels": {"x": "y"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(ip(&main).as_deref(), Some("192.0.2.7"));
}

fn gvk(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("portico.dev", "v1alpha1", kind))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_and_server_side_apply() {
    let (server, c) = start().await;
    server.apply_yaml(CRDS).unwrap();
    // Discovery knows the new group.
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "portico.dev"));
    let pools: Api<DynamicObject> = Api::all_with(c.clone(), &gvk("IPPool"));
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "IPPool", "metadata": {"name": "p"},
        "spec": {"addresses": ["10.0.0.0/24"]},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let ps = pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"assignedIPv4": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(ps.data["status"]["assignedIPv4"], 1);
    // Strategic merge is for built-in types only.
    assert_eq!(
        code(
            pools
                .patch("p", &PatchParams::default(), &Patch::Strategic(json!({})))
                .await
                .unwrap_err()
        ),
        415
    );

    let sva: Api<DynamicObject> =
        Api::namespaced_with(c.clone(), "default", &gvk("ServiceAnnouncement"));
    // Each agent applies only its own entry of `status.nodes` (a list-map keyed by node, its
    // `addresses` a list-map keyed by address), as crates/ipam/src/announce.rs does.
    let entry = |node: &str, reason: &str| {
        let mut e = json!({"node": node, "addresses": [{"address": "10.0.0.1", "reason": reason}]});
        if reason == "owner" {
            e["owns"] = json!(["10.0.0.1"]);
        }
        e
    };
    let body = |entries: Vec<Value>| {
        json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
               "metadata": {"name": "web", "namespace": "default"},
               "status": {"nodes": entries}})
    };
    let main = json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
                      "metadata": {"name": "web", "namespace": "default"}, "spec": {"service": "web"}});
    let a = PatchParams::apply("agent/a");
    let b = PatchParams::apply("agent/b");
    sva.patch("web", &a, &Patch::Apply(&main)).await.unwrap();
    // Applying the status of a missing object is 404; of an existing one it merges the views.
    sva.patch_status("web", &a, &Patch::Apply(body(vec![entry("a", "owner")])))
        .await
        .unwrap();
    // b wants a field of a's entry with another value: a conflict without force.
    let e = sva
        .patch_status("web", &b, &Patch::Apply(body(vec![entry("a", "notOwner")])))
        .await
        .unwrap_err();
    assert_eq!(code(e), 409);
    let merged = sva
        .patch_status(
            "web",
            &b,
            &Patch::Apply(body(vec![entry("b", "noEligibleNode")])),
        )
        .await
        .unwrap();
    let nodes = merged.data["status"]["nodes"].as_array().unwrap().clone();
    assert_eq!(
        nodes,
        vec![entry("a", "owner"), entry("b", "noEligibleNode")]
    );
    let managers: Vec<String> = merged
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"agent/a".to_string()) && managers.contains(&"agent/b".to_string()));
    // a applies without its entry: the whole entry goes (keys too), b's stays.
    let after = sva
        .patch_status("web", &a, &Patch::Apply(body(Vec::new())))
        .await
        .unwrap();
    assert_eq!(
        after.data["status"]["nodes"],
        json!([entry("b", "noEligibleNode")]),
        "{after:?}"
    );
    // The spec survived the status writes.
    assert_eq!(after.data["spec"]["service"], "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_bookmarks_and_gone() {
    let (server, c) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let first = api
        .create(&PostParams::default(), &cm("w1", json!({})))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    let mut stream = api
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            }
            .timeout(10),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &cm("w2", json!({})))
        .await
        .unwrap();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    while !(saw_added && saw_bookmark) {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(o)))) => {
                assert_eq!(o.metadata.name.as_deref(), Some("w2"));
                saw_added = true;
            }
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => saw_bookmark = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    // After a compaction, resuming from the old version is 410 Gone.
    server.compact();
    let mut gone = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match gone.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    // timeoutSeconds ends the stream.
    let now = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut short = api
        .watch(&WatchParams::default().timeout(1), &now)
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while short.try_next().await.unwrap().is_some() {}
    })
    .await;
    assert!(end.is_ok(), "the watch did not end after timeoutSeconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_from_restart_and_410() {
    let (mut server, c) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    api.create(&PostParams::default(), &cm("r1", json!({})))
        .await
        .unwrap();
    let mut events = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut inits = 0;
    async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
        tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("watcher event in time")
            .expect("stream open")
    }
    loop {
        if let Ok(watcher::Event::InitDone) = next(&mut events).await {
            inits += 1;
            break;
        }
    }
    // The server goes away; objects change meanwhile and the history is compacted.
    server.stop().await;
    server.with_store(|_| ());
    server
        .inject(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "r2", "namespace": "default"}}))
        .unwrap();
    server.compact();
    server.restart().await.unwrap();
    // The watcher resumes, gets 410, re-lists and sees r2.
    let mut seen_r2 = false;
    while !(seen_r2 && inits >= 2) {
        match next(&mut events).await {
            Ok(watcher::Event::InitDone) => inits += 1,
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o))
                if o.metadata.name.as_deref() == Some("r2") =>
            {
                seen_r2 = true;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_from_deploy() {
    let (server, admin) = start().await;
    server.apply_yaml(NAMESPACE).unwrap();
    server.apply_yaml(CRDS).unwrap();
    server.apply_yaml(RBAC).unwrap();
    let agent = client(&server.service_account_kubeconfig("portico-system", "portico-agent")).await;
    let ctl =
        client(&server.service_account_kubeconfig("portico-system", "portico-controller")).await;
    let svcs: Api<Service> = Api::all(agent.clone());
    svcs.list(&ListParams::default()).await.unwrap();
    let one: Api<Service> = Api::namespaced(agent.clone(), "default");
    let e = one
        .patch("x", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    let kube::Error::Api(s) = e else { panic!() };
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert!(
        s.message
            .contains("system:serviceaccount:portico-system:portico-agent"),
        "{}",
        s.message
    );
    // Secrets only in portico-system, and only list/watch.
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "portico-system");
    secrets
        .list(&ListParams::default().fields("metadata.name=portico-gossip"))
        .await
        .unwrap();
    assert_eq!(code(secrets.get("portico-gossip").await.unwrap_err()), 403);
    let elsewhere: Api<Secret> = Api::namespaced(agent, "default");
    assert_eq!(
        code(elsewhere.list(&ListParams::default()).await.unwrap_err()),
        403
    );
    // The controller holds its Lease in portico-system only.
    let leases: Api<Lease> = Api::namespaced(ctl.clone(), "portico-system");
    let lease: Lease = serde_json::from_value(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "portico-controller"}, "spec": {"holderIdentity": "me"}})).unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let other: Api<Lease> = Api::namespaced(ctl.clone(), "default");
    assert_eq!(
        code(
            other
                .create(&PostParams::default(), &lease)
                .await
                .unwrap_err()
        ),
        403
    );
    let ns: Api<Namespace> = Api::all(ctl);
    ns.list(&ListParams::default()).await.unwrap();
    // A token whose ServiceAccount does not exist is not authenticated.
    let ghost = client(&server.service_account_kubeconfig("portico-system", "ghost")).await;
    let g: Api<Service> = Api::all(ghost);
    assert_eq!(code(g.list(&ListParams::default()).await.unwrap_err()), 401);
    // The admin can do anything.
    let all: Api<Secret> = Api::all(admin);
    all.list(&ListParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watches_see_objects_enter_and_leave() {
    let (_server, c) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    let o = api
        .create(&PostParams::default(), &cm("s", json!({"app": "x"})))
        .await
        .unwrap();
    let rv = o.metadata.resource_version.unwrap();
    let mut w = api
        .watch(&WatchParams::default().labels("app=x").timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    let pp = PatchParams::default();
    api.patch(
        "s",
        &pp,
        &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "s",
        &pp,
        &Patch::Merge(json!({"metadata": {"labels": {"app": "x"}}})),
    )
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), w.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(WatchEvent::Deleted(_)) => kinds.push("DELETED"),
            Some(WatchEvent::Added(_)) => kinds.push("ADDED"),
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["DELETED", "ADDED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_take_their_dependents_and_secrets_encode_string_data() {
    let (server, c) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let owner = api
        .create(&PostParams::default(), &cm("owner", json!({})))
        .await
        .unwrap();
    let mut dep = cm("dep", json!({}));
    dep.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap(),
    })).unwrap()]);
    api.create(&PostParams::default(), &dep).await.unwrap();
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(api.get("dep").await.unwrap_err()), 404);

    server.apply_yaml(NAMESPACE).unwrap();
    server
        .apply_yaml(include_str!("../../../deploy/gossip-secret.yaml"))
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(c, "portico-system");
    let s = secrets.get("portico-gossip").await.unwrap();
    assert!(s.string_data.is_none());
    assert_eq!(
        s.data.unwrap()["key"].0.len(),
        44,
        "the base64 text of a 32-byte key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_subresources() {
    let (server, admin) = start().await;
    server.apply_yaml(NAMESPACE).unwrap();
    server.apply_yaml(CRDS).unwrap();
    server.apply_yaml(RBAC).unwrap();
    let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})).unwrap();
    Api::<Service>::namespaced(admin, "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let agent = client(&server.service_account_kubeconfig("portico-system", "portico-agent")).await;
    let ctl =
        client(&server.service_account_kubeconfig("portico-system", "portico-controller")).await;
    let st = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}});
    let pp = PatchParams::default();
    let by_agent: Api<Service> = Api::namespaced(agent.clone(), "default");
    assert_eq!(
        code(
            by_agent
                .patch_status("web", &pp, &Patch::Merge(&st))
                .await
                .unwrap_err()
        ),
        403
    );
    let by_ctl: Api<Service> = Api::namespaced(ctl, "default");
    by_ctl
        .patch_status("web", &pp, &Patch::Merge(&st))
        .await
        .unwrap();
    // The agent writes its ServiceAnnouncement (object and status), nothing else of it.
    let sva: Api<DynamicObject> =
        Api::namespaced_with(agent, "default", &gvk("ServiceAnnouncement"));
    let body = json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement", "metadata": {"name": "web"}, "spec": {"service": "web"}});
    let ap = PatchParams::apply("portico-agent/n1").force();
    sva.patch("web", &ap, &Patch::Apply(&body)).await.unwrap();
    sva.patch_status("web", &ap, &Patch::Apply(json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement", "metadata": {"name": "web"}, "status": {"addresses": []}}))).await.unwrap();
    assert_eq!(
        code(
            sva.delete("web", &DeleteParams::default())
                .await
                .unwrap_err()
        ),
        403
    );
}
