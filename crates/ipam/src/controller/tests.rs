//! The driver against a scripted fake API server.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

use super::*;
use crate::fixtures::{self, ServiceExt as _, list, mock_client, status_error, timeout_after_1s};
use crate::intent::LB_CLASS;

const STATUS: &str = "/api/v1/namespaces/default/services/web/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const POOL_STATUS: &str = "/apis/portico.dev/v1alpha1/ippools/p/status";

fn web() -> Service {
    fixtures::service("default", "web").load_balancer(LB_CLASS)
}

/// Feeds the pool and namespace lists (no API calls: nothing is synced yet).
async fn prime(d: &mut Driver) {
    for input in [
        Input::Pool(Event::Init),
        Input::Pool(Event::InitApply(fixtures::pool("p", &["192.0.2.0/30"]))),
        Input::Pool(Event::InitDone),
        Input::Namespace(Event::Init),
        Input::Namespace(Event::InitDone),
    ] {
        d.handle(input).await;
    }
}

#[tokio::test]
async fn a_synced_controller_patches_status_publishes_an_event_and_reports_the_pool() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        let patch = api
            .expect(
                "PATCH",
                STATUS,
                200,
                serde_json::to_value(web().version("2")).unwrap(),
            )
            .await;
        assert_eq!(
            patch.body["status"]["loadBalancer"]["ingress"][0]["ip"],
            "192.0.2.0"
        );
        assert_eq!(patch.body["metadata"]["resourceVersion"], "1");
        let ev = api.expect("POST", EVENTS, 201, json!({})).await;
        assert_eq!(ev.body["reason"], "IPAllocated");
        assert_eq!(ev.body["type"], "Normal");
        assert_eq!(ev.body["regarding"]["name"], "web");
        let pool = api
            .expect(
                "PATCH",
                POOL_STATUS,
                200,
                serde_json::to_value(fixtures::pool("p", &[])).unwrap(),
            )
            .await;
        assert_eq!(pool.body["status"]["assignedIPv4"], 1);
    });
    let mut d = Driver::new(client, Scope::default(), Some("pod-a".into()));
    prime(&mut d).await;
    for input in [
        Input::Service(Event::Init),
        Input::Service(Event::InitApply(web())),
        Input::Service(Event::InitDone),
    ] {
        d.handle(input).await;
    }
    d.flush_pools().await;
    timeout_after_1s(server).await;
}

#[tokio::test]
async fn a_conflict_re_reads_the_service_and_retries_with_its_version() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        api.expect("PATCH", STATUS, 409, status_error(409, "Conflict"))
            .await;
        api.expect(
            "GET",
            "/api/v1/namespaces/default/services/web",
            200,
            serde_json::to_value(web().version("5")).unwrap(),
        )
        .await;
        let retry = api
            .expect(
                "PATCH",
                STATUS,
                200,
                serde_json::to_value(web().version("6")).unwrap(),
            )
            .await;
        assert_eq!(retry.body["metadata"]["resourceVersion"], "5");
        let ev = api.expect("POST", EVENTS, 201, json!({})).await;
        assert_eq!(
            ev.body["reason"], "IPAllocated",
            "one event, not one per attempt"
        );
        api.expect(
            "PATCH",
            POOL_STATUS,
            200,
            serde_json::to_value(fixtures::pool("p", &[])).unwrap(),
        )
        .await;
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    d.handle(Input::Service(Event::Init)).await;
    d.handle(Input::Service(Event::InitApply(web()))).await;
    d.handle(Input::Service(Event::InitDone)).await;
    d.flush_pools().await;
    timeout_after_1s(server).await;
}

fn watch_body(events: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend(serde_json::to_vec(e).unwrap());
        out.push(b'\n');
    }
    out
}

#[tokio::test]
async fn the_service_watch_lists_then_watches_and_re_lists_after_410_gone() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        let l = api
            .expect(
                "GET",
                "/api/v1/services?",
                200,
                list("Service", &[web()], "10"),
            )
            .await;
        assert!(!l.uri.contains("watch=true"), "{}", l.uri);
        // The watch: one ERROR 410 (the version is too old).
        let (req, send) = api.0.next_request().await.unwrap();
        assert!(
            req.uri().to_string().contains("watch=true"),
            "{}",
            req.uri()
        );
        assert!(
            req.uri().to_string().contains("resourceVersion=10"),
            "{}",
            req.uri()
        );
        let body = watch_body(&[json!({"type": "ERROR", "object": status_error(410, "Expired")})]);
        send.send_response(
            http::Response::builder()
                .status(200)
                .body(kube::client::Body::from(body))
                .unwrap(),
        );
        // And the watcher starts over with a fresh list.
        api.expect(
            "GET",
            "/api/v1/services?",
            200,
            list("Service", &[web()], "20"),
        )
        .await;
    });
    let api: Api<Service> = Api::all(client);
    let mut w = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
    let mut seen = Vec::new();
    while seen.len() < 7 {
        match w.next().await.unwrap() {
            Ok(ev) => seen.push(match ev {
                Event::Init => "Init".to_string(),
                Event::InitApply(s) => format!("InitApply({})", s.name_any()),
                Event::InitDone => "InitDone".into(),
                Event::Apply(s) => format!("Apply({})", s.name_any()),
                Event::Delete(s) => format!("Delete({})", s.name_any()),
            }),
            Err(watcher::Error::WatchError(s)) => seen.push(format!("Error({})", s.code)),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply(web)",
            "InitDone",
            "Error(410)",
            "Init",
            "InitApply(web)",
            "InitDone"
        ]
    );
    timeout_after_1s(server).await;
}

#[tokio::test]
async fn a_re_list_that_misses_a_service_releases_its_address() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        api.expect(
            "PATCH",
            STATUS,
            200,
            serde_json::to_value(web().version("2")).unwrap(),
        )
        .await;
        api.expect("POST", EVENTS, 201, json!({})).await;
        // The pool's usage is written once, after the re-list without web (the writes of a
        // burst are merged).
        let pool = api
            .expect(
                "PATCH",
                POOL_STATUS,
                200,
                serde_json::to_value(fixtures::pool("p", &[])).unwrap(),
            )
            .await;
        assert_eq!(pool.body["status"]["assignedIPv4"], 0);
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    for input in [
        Input::Service(Event::Init),
        Input::Service(Event::InitApply(web())),
        Input::Service(Event::InitDone),
        Input::Service(Event::Init),
        Input::Service(Event::InitDone),
    ] {
        d.handle(input).await;
    }
    assert!(d.state().allocator().holdings().is_empty());
    d.flush_pools().await;
    timeout_after_1s(server).await;
}

#[tokio::test]
async fn a_replica_that_does_not_lead_makes_no_call_and_starts_watching_once_it_leads() {
    use crate::lease::ManualLeadership;

    let (client, mut api) = mock_client();
    use crate::lease::Leadership as _;
    let leadership = ManualLeadership::new(false);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        client,
        Scope::default(),
        None,
        leadership.subscribe(),
        shutdown.clone(),
    ));

    let quiet =
        tokio::time::timeout(std::time::Duration::from_millis(200), api.0.next_request()).await;
    assert!(quiet.is_err(), "a follower called the API");

    leadership.set(true);
    let mut lists = Vec::new();
    for _ in 0..3 {
        let (req, _send) =
            tokio::time::timeout(std::time::Duration::from_secs(1), api.0.next_request())
                .await
                .expect("the leader lists")
                .unwrap();
        let uri = req.uri().to_string();
        assert!(
            crate::rbac::allows(crate::rbac::CONTROLLER, req.method().as_str(), &uri),
            "{uri}"
        );
        lists.push(uri.split('?').next().unwrap().to_string());
    }
    lists.sort();
    assert_eq!(
        lists,
        [
            "/api/v1/namespaces",
            "/api/v1/services",
            "/apis/portico.dev/v1alpha1/ippools"
        ]
    );
    shutdown.cancel();
    timeout_after_1s(tokio::spawn(async move {
        task.await.unwrap();
    }))
    .await;
}

#[tokio::test]
async fn a_write_that_fails_while_the_api_is_down_is_retried_on_the_next_tick() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        api.expect(
            "PATCH",
            STATUS,
            503,
            status_error(503, "ServiceUnavailable"),
        )
        .await;
        // The event and the pool report are attempted too (and fail the same way).
        api.expect("POST", EVENTS, 503, status_error(503, "ServiceUnavailable"))
            .await;
        api.expect(
            "PATCH",
            POOL_STATUS,
            503,
            status_error(503, "ServiceUnavailable"),
        )
        .await;
        // The API is back: the tick retries the Service from the cache.
        let retry = api
            .expect(
                "PATCH",
                STATUS,
                200,
                serde_json::to_value(web().version("2")).unwrap(),
            )
            .await;
        assert_eq!(
            retry.body["status"]["loadBalancer"]["ingress"][0]["ip"],
            "192.0.2.0"
        );
        api.expect("POST", EVENTS, 201, json!({})).await;
        api.expect(
            "PATCH",
            POOL_STATUS,
            200,
            serde_json::to_value(fixtures::pool("p", &[])).unwrap(),
        )
        .await;
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    d.handle(Input::Service(Event::Init)).await;
    d.handle(Input::Service(Event::InitApply(web()))).await;
    d.handle(Input::Service(Event::InitDone)).await;
    d.flush_pools().await;
    d.handle(Input::Tick).await;
    d.flush_pools().await;
    timeout_after_1s(server).await;
}

#[tokio::test]
async fn a_404_on_the_status_of_a_deleted_pool_is_no_failure() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        api.expect(
            "PATCH",
            STATUS,
            200,
            serde_json::to_value(web().version("2")).unwrap(),
        )
        .await;
        api.expect("POST", EVENTS, 201, json!({})).await;
        api.expect("PATCH", POOL_STATUS, 404, status_error(404, "NotFound"))
            .await;
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    d.handle(Input::Service(Event::Init)).await;
    d.handle(Input::Service(Event::InitApply(web()))).await;
    d.handle(Input::Service(Event::InitDone)).await;
    d.flush_pools().await;
    timeout_after_1s(server).await;
    assert_eq!(
        d.outage.failures(),
        0,
        "not a failed write: the pool is gone"
    );
    assert!(d.failed.is_empty());
}

#[tokio::test]
async fn failed_writes_during_an_outage_count_as_one_outage_that_ends_with_a_success() {
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        for path in [STATUS, EVENTS, POOL_STATUS] {
            let method = if path == EVENTS { "POST" } else { "PATCH" };
            api.expect(method, path, 503, status_error(503, "ServiceUnavailable"))
                .await;
        }
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    d.handle(Input::Service(Event::Init)).await;
    d.handle(Input::Service(Event::InitApply(web()))).await;
    d.handle(Input::Service(Event::InitDone)).await;
    d.flush_pools().await;
    timeout_after_1s(server).await;
    // Three failures, one outage: only the first is logged as a warning.
    assert_eq!(d.outage.failures(), 3);
    let mut o = d.outage.clone();
    assert!(!o.failed(), "a further failure is not reported again");
}

#[test]
fn every_allocation_and_refusal_is_one_info_line_with_its_reason_word() {
    let ev = |warning, reason| Action::Event {
        reference: kube::Resource::object_ref(&web(), &()),
        warning,
        reason,
        note: "assigned 192.0.2.0".into(),
    };
    let (object, reason, line) = decision_line(&ev(false, "IPAllocated")).unwrap();
    assert_eq!(
        (object.as_str(), reason),
        ("Service default/web", "IPAllocated")
    );
    assert!(
        line.contains("IPAllocated") && line.contains("192.0.2.0"),
        "{line}"
    );
    let (_, reason, line) = decision_line(&ev(true, "PoolExhausted")).unwrap();
    assert_eq!(reason, "PoolExhausted");
    assert!(line.contains("refused"), "{line}");
    assert!(
        decision_line(&Action::PatchPoolStatus {
            name: "p".into(),
            patch: json!({})
        })
        .is_none()
    );
}

/// Answers every request with 200 and a plausible body, counting requests by kind.
fn counting_server(
    mut handle: crate::fixtures::ApiServerHandle,
) -> tokio::task::JoinHandle<BTreeMap<String, usize>> {
    tokio::spawn(async move {
        let mut counts = BTreeMap::new();
        while let Ok(Some((req, send))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), handle.next_request()).await
        {
            let (method, uri) = (req.method().to_string(), req.uri().path().to_string());
            assert!(
                crate::rbac::allows(crate::rbac::CONTROLLER, &method, &uri),
                "{method} {uri}"
            );
            let body = if uri.contains("/services/") {
                let name = uri.split('/').nth(6).unwrap();
                serde_json::to_value(
                    fixtures::service("default", name)
                        .load_balancer(LB_CLASS)
                        .version("2"),
                )
                .unwrap()
            } else if uri.contains("/ippools/") {
                serde_json::to_value(fixtures::pool("p", &[])).unwrap()
            } else {
                json!({})
            };
            let kind = if uri.ends_with("/status") && uri.contains("/services/") {
                "service status"
            } else if uri.contains("/events") {
                "event"
            } else if uri.contains("/ippools/") {
                "pool status"
            } else {
                "other"
            };
            *counts.entry(kind.to_string()).or_insert(0) += 1;
            send.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
        counts
    })
}

#[tokio::test]
async fn a_burst_of_creates_costs_two_requests_per_allocation_and_one_pool_status() {
    const N: usize = 200;
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let server = counting_server(handle);
    let metrics = ControllerMetrics::default();
    let mut d = Driver::with_metrics(client, Scope::default(), None, metrics.clone());
    for input in [
        Input::Pool(Event::Init),
        Input::Pool(Event::InitApply(fixtures::pool("p", &["10.0.0.0/16"]))),
        Input::Pool(Event::InitDone),
        Input::Namespace(Event::Init),
        Input::Namespace(Event::InitDone),
        Input::Service(Event::Init),
        Input::Service(Event::InitDone),
    ] {
        d.handle(input).await;
    }
    d.flush_pools().await;
    // N Services created at once: they arrive one by one through the watch.
    for i in 0..N {
        let svc = fixtures::service("default", &format!("s{i}")).load_balancer(LB_CLASS);
        d.handle(Input::Service(Event::Apply(svc))).await;
    }
    assert!(d.pools_due().is_some(), "the pool's status waits");
    d.flush_pools().await;
    assert_eq!(d.state().allocator().holdings().len(), N);
    drop(d);
    let counts = server.await.unwrap();
    assert_eq!(counts.get("service status"), Some(&N));
    assert_eq!(counts.get("event"), Some(&N));
    // One pool status for the initial sync and one for the whole burst (was one per allocation).
    assert_eq!(counts.get("pool status"), Some(&2));
    let allocated = crate::metrics::ReasonLabel {
        reason: "IPAllocated".into(),
    };
    assert_eq!(metrics.decisions.get_or_create(&allocated).get(), N as u64);
    assert_eq!(metrics.pool_status_writes.get(), 2);
    println!("{N} allocations: {counts:?}");
}

/// 1,000 Services created at once against a fake API that takes 2 ms per request (virtual time):
/// allocations are serial, one status write each; Events and the pool report do not delay them.
#[tokio::test(start_paused = true)]
async fn a_burst_of_1000_creates_with_a_2ms_api_allocates_in_about_two_seconds() {
    const N: usize = 1000;
    const RTT: std::time::Duration = std::time::Duration::from_millis(2);
    let (svc, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let server = tokio::spawn(async move {
        let mut requests = 0usize;
        while let Some((req, send)) = handle.next_request().await {
            requests += 1;
            let uri = req.uri().path().to_string();
            tokio::spawn(async move {
                tokio::time::sleep(RTT).await;
                let body = if uri.contains("/services/") {
                    let name = uri.split('/').nth(6).unwrap().to_string();
                    serde_json::to_value(
                        fixtures::service("default", &name)
                            .load_balancer(LB_CLASS)
                            .version("2"),
                    )
                    .unwrap()
                } else if uri.contains("/ippools/") {
                    serde_json::to_value(fixtures::pool("p", &[])).unwrap()
                } else {
                    json!({})
                };
                send.send_response(
                    http::Response::builder()
                        .status(200)
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            });
        }
        requests
    });
    let mut d = Driver::new(client, Scope::default(), None);
    for input in [
        Input::Pool(Event::Init),
        Input::Pool(Event::InitApply(fixtures::pool("p", &["10.0.0.0/16"]))),
        Input::Pool(Event::InitDone),
        Input::Namespace(Event::Init),
        Input::Namespace(Event::InitDone),
        Input::Service(Event::Init),
        Input::Service(Event::InitDone),
    ] {
        d.handle(input).await;
    }
    d.flush_pools().await;
    let start = tokio::time::Instant::now();
    let mut waited = Vec::with_capacity(N);
    for i in 0..N {
        let svc = fixtures::service("default", &format!("s{i}")).load_balancer(LB_CLASS);
        d.handle(Input::Service(Event::Apply(svc))).await;
        // All were created at `start`; this one holds its address (status written) now.
        waited.push(start.elapsed());
    }
    d.flush_pools().await;
    assert_eq!(d.state().allocator().holdings().len(), N);
    let last = *waited.last().unwrap();
    let p50 = waited[N / 2];
    drop(d);
    let requests = server.await.unwrap();
    println!(
        "{N} creates, {RTT:?} per API request: p50 {p50:?}, last {last:?}, {requests} requests ({:.2} per allocation)",
        requests as f64 / N as f64
    );
    // One serial request per allocation (it was three): about N × RTT in all.
    assert!(
        last <= RTT * (N as u32) + std::time::Duration::from_millis(100),
        "{last:?}"
    );
}

#[tokio::test]
async fn a_burst_is_written_in_waves_not_one_write_after_another() {
    // Two Services arrive in one batch: both status writes are in flight before either is
    // answered (serial writes would leave the second unsent until the first is answered).
    let (client, mut api) = mock_client();
    let server = tokio::spawn(async move {
        let mut pending = Vec::new();
        for _ in 0..2 {
            let (request, send) =
                tokio::time::timeout(Duration::from_secs(1), api.0.next_request())
                    .await
                    .expect("both writes are in flight at once")
                    .expect("the client sent a request");
            assert_eq!(request.method(), "PATCH");
            let path = request.uri().path().to_string();
            assert!(path.ends_with("/status"), "{path}");
            pending.push((path, send));
        }
        let mut paths: Vec<&str> = pending.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/default/services/api/status",
                "/api/v1/namespaces/default/services/web/status"
            ]
        );
        for (path, send) in pending {
            let name = if path.contains("/api/status") {
                "api"
            } else {
                "web"
            };
            let svc = fixtures::service("default", name)
                .load_balancer(LB_CLASS)
                .version("2");
            send.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(serde_json::to_vec(&svc).unwrap()))
                    .unwrap(),
            );
        }
        // Then each Service's Event, after its write.
        for _ in 0..2 {
            let ev = api.expect("POST", EVENTS, 201, json!({})).await;
            assert_eq!(ev.body["reason"], "IPAllocated");
        }
    });
    let mut d = Driver::new(client, Scope::default(), None);
    prime(&mut d).await;
    d.handle(Input::Service(Event::Init)).await;
    d.handle(Input::Service(Event::InitDone)).await;
    d.handle_batch(vec![
        Input::Service(Event::Apply(web())),
        Input::Service(Event::Apply(
            fixtures::service("default", "api").load_balancer(LB_CLASS),
        )),
    ])
    .await;
    d.settle_events().await;
    timeout_after_1s(server).await;
}
