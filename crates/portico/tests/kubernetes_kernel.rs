//! Kubernetes mode on the kernel path, end to end: the shipped `portico controller` and
//! `portico agent` binaries against the test API server (`crates/apiserver`), installed the
//! way `deploy/` says, each agent in its own network namespace with IPv4 forwarding on (as on
//! a Kubernetes node). A Service annotated `portico.dev/forwarding: kernel` is served by
//! nftables DNAT: the client reaches its address, the owning agent's `/status` says `kernel`,
//! its node's table `inet portico` maps the address to the EndpointSlice's endpoints, and an
//! endpoint removed from the slice leaves the map; a value that names no data path is refused
//! (`InvalidRequest`, naming the annotation).
//!
//! The cluster, network and endpoints are `tests/kubernetes.rs`'s (`common::k8s`). Needs root,
//! `ip`, `arping`, `curl` and `nft`: without them the test prints `skipped: …` and returns,
//! unless `PORTICO_CI` is set, when it fails.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::k8s::*;
use serde_json::{Value, json};
use tokio::time::Instant;

const NODES: usize = 2;

/// Node `i`'s address (its endpoint's too: the endpoints are hostNetwork pods).
fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

/// Node `i`'s agent `/status`, parsed.
fn agent_status(c: &Cluster, i: usize) -> Value {
    let (_, out) = in_ns(
        &c.net.node(i),
        &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/status"],
    );
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

/// The backends (`addr:port`) in the maps of node `i`'s table `inet portico`, read back with
/// `nft -j list table inet portico` in its namespace (`None` without the table).
fn map_backends(c: &Cluster, i: usize) -> Option<BTreeSet<String>> {
    let (ok, out) = in_ns(
        &c.net.node(i),
        &["nft", "-j", "list", "table", "inet", "portico"],
    );
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    let mut set = BTreeSet::new();
    for item in v["nftables"].as_array()? {
        for el in item["map"]["elem"].as_array().into_iter().flatten() {
            let parts = &el[1]["concat"];
            if let (Some(ip), Some(port)) = (parts[0].as_str(), parts[1].as_u64()) {
                set.insert(format!("{ip}:{port}"));
            }
        }
    }
    Some(set)
}

/// `shop/<name>` with `forwarding` as its annotation and ready endpoints on `nodes`.
fn service(c: &Cluster, name: &str, forwarding: &str, nodes: &[usize]) {
    let on: Vec<(usize, bool)> = nodes.iter().map(|&i| (i, true)).collect();
    c.service_annotated(
        "shop",
        name,
        "Cluster",
        &on,
        false,
        json!({"portico.dev/forwarding": forwarding}),
    );
}

/// Polls `f` every 100 ms until it gives a value, for at most `secs`.
async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_service_runs_on_the_kernel_path_and_follows_its_endpoint_slice() {
    if !can_run() {
        return;
    }
    if !common::require("network namespaces", &["nft"]) {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start_with(NODES, true).await;
    service(&c, "web", "kernel", &[1, 2]);
    // a value that names no data path is refused, and the refusal names the annotation
    service(&c, "bad", "fast", &[1]);
    let vip = c.wait_address("shop", "web", Duration::from_secs(30)).await;
    let owner = c
        .wait_owner("shop", "web", &vip, Duration::from_secs(30))
        .await;
    let owner: usize = owner
        .strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("owner {owner} is no node-<i>"));
    let refusal = wait_for("shop/bad refused", 20, || {
        let svc = c.server.get("v1", "Service", Some("shop"), "bad")?;
        svc["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|k| k["type"] == "portico.dev/AddressAllocated" && k["status"] == "False")
            .cloned()
    })
    .await;
    assert_eq!(refusal["reason"], "InvalidRequest", "{refusal}");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("portico.dev/forwarding") && message.contains("`fast`"),
        "{refusal}"
    );

    // the owning agent runs it on the kernel path, as the annotation asked
    let status = wait_for("the owner's /status naming shop/web", 20, || {
        let st = agent_status(&c, owner);
        let svc = st["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "shop/web")?
            .clone();
        Some(svc)
    })
    .await;
    assert_eq!(
        (status["path"].as_str(), status["path_reason"].as_str()),
        (Some("kernel"), Some("configured")),
        "{status:#}"
    );

    // its table maps the address to both endpoints
    let both: BTreeSet<String> = (1..=NODES)
        .map(|i| format!("{}:{BACKEND_PORT}", node_ip(i)))
        .collect();
    wait_for("both endpoints in the owner's map", 20, || {
        (map_backends(&c, owner)? == both).then_some(())
    })
    .await;

    // the client reaches the address, and both endpoints answer through the kernel's DNAT
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        if let Some(b) = c.curl(&vip).filter(|b| !b.is_empty()) {
            seen.insert(b);
        }
        if seen.len() == NODES {
            break;
        }
    }
    assert_eq!(
        seen,
        (1..=NODES).map(|i| format!("node-{i}")).collect(),
        "both endpoints answer through {vip}"
    );

    // an endpoint removed from the EndpointSlice leaves the map; the other still answers
    service(&c, "web", "kernel", &[1]);
    let one: BTreeSet<String> = [format!("{}:{BACKEND_PORT}", node_ip(1))].into();
    wait_for("node-2's endpoint out of the owner's map", 20, || {
        (map_backends(&c, owner)? == one).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(c.curl(&vip).as_deref(), Some("node-1"));
    }

    // `proxy` moves it off the kernel path: the proxy serves, the table has no map for it
    service(&c, "web", "proxy", &[1]);
    wait_for("shop/web on the proxy", 20, || {
        let st = agent_status(&c, owner);
        st["services"]
            .as_array()?
            .iter()
            .any(|s| {
                s["name"] == "shop/web" && s["path"] == "proxy" && s["path_reason"] == "configured"
            })
            .then_some(())
    })
    .await;
    wait_for("no map left on the owner", 20, || {
        map_backends(&c, owner)
            .is_none_or(|m| m.is_empty())
            .then_some(())
    })
    .await;
    let answered = wait_for("the proxy answering", 10, || {
        c.curl(&vip).filter(|b| !b.is_empty())
    })
    .await;
    assert_eq!(answered, "node-1");
    println!(
        "{vip} owned by node-{owner}: kernel path with both endpoints answering ({seen:?}), \
         one after the slice lost node-2, then the proxy"
    );
}
