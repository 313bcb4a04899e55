//! Kubernetes mode end to end: the shipped `portico controller` and `portico agent` binaries
//! against the test API server (`crates/apiserver`), installed and configured the way
//! `deploy/` and docs/kubernetes.md tell users, with each agent in its own network namespace
//! on a bridge and a client namespace that checks the wire (arping, curl).
//!
//! Network: namespace `<p>-br` holds bridge `br0`; nodes `<p>-n1..3` (eth0 10.77.0.11-13/24),
//! controller replicas' pod networks `<p>-k0..` (10.77.0.50+/24), client `<p>-c`
//! (10.77.0.100/24) and a veth into the root namespace (10.77.0.1/24, where the API server
//! listens) are its ports. The BGP test adds a router `<p>-r` on the bridge (10.77.0.2/24,
//! fd77::2/64; the nodes get fd77::1<i>/64) with a client `<p>-rc` behind it (10.79.0.2/24,
//! fd79::2/64). Every namespace, link and process is removed by Drop guards.
//!
//! Needs root, `ip`, `arping` and `curl`: without them the tests print `skipped: …` and return,
//! unless `PORTICO_CI` is set, when they fail.

mod common;

use common::k8s::*;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadbalancer_service_gets_an_address_from_the_pool() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(2).await;
    c.service("shop", "web", true);
    let vip = c.wait_address("shop", "web", Duration::from_secs(30)).await;
    assert!(ip_in_pool(&vip), "{vip} is outside {POOL}");
    let svc = c.server.get("v1", "Service", Some("shop"), "web").unwrap();
    assert_eq!(
        svc["status"]["loadBalancer"]["ingress"][0]["ipMode"], "Proxy",
        "{svc}"
    );
    let cond = svc["status"]["conditions"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["type"] == "portico.dev/AddressAllocated")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(cond["status"], "True", "{svc}");
    // The controller explained it with an Event (events.k8s.io/v1), and its pool counts it.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let events = c.server.list("events.k8s.io/v1", "Event");
        if events
            .iter()
            .any(|e| e["reason"] == "IPAllocated" && e["regarding"]["name"] == "web")
        {
            break;
        }
        assert!(Instant::now() < until, "no IPAllocated Event: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pool = c
            .server
            .get("portico.dev/v1alpha1", "IPPool", None, "default")
            .unwrap();
        if pool["status"]["assignedIPv4"] == 1 {
            break;
        }
        assert!(Instant::now() < until, "pool status not updated: {pool}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second Service gets a different address.
    c.service("shop", "api", true);
    let other = c.wait_address("shop", "api", Duration::from_secs(30)).await;
    assert_ne!(vip, other);
    // The agents saw the Services; each address's owner says so in the ServiceAnnouncement.
    for (name, ip) in [("web", &vip), ("api", &other)] {
        let owner = c
            .wait_owner("shop", name, ip, Duration::from_secs(15))
            .await;
        let mac = c.wait_one_arp_owner(ip, Duration::from_secs(15)).await;
        assert_eq!(owner, format!("node-{}", c.node_of_mac(&mac)), "{ip}");
    }
    c.assert_rbac_was_enough();
    // What it cost: the binaries' requests for two allocations (shown with --nocapture).
    for (k, n) in c.server.requests() {
        if k.starts_with("system:serviceaccount:")
            && !k.contains(" watch ")
            && !k.contains(" list ")
        {
            println!(
                "{n:>4}  {}",
                k.trim_start_matches("system:serviceaccount:portico-system:")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_with_expired_watches() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    c.service("shop", "a", true);
    let a = c.wait_address("shop", "a", Duration::from_secs(30)).await;
    c.wait_owner("shop", "a", &a, Duration::from_secs(15)).await;
    // The API server goes away for a while; its watch history is gone when it is back, so
    // every watch resuming from its last resourceVersion gets 410 Gone and must re-list.
    c.server.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.server.compact();
    c.server.restart().await.expect("API server restarts");
    let t0 = Instant::now();
    c.service("shop", "b", true);
    let b = c.wait_address("shop", "b", Duration::from_secs(45)).await;
    assert_ne!(a, b);
    c.wait_owner("shop", "b", &b, Duration::from_secs(45)).await;
    println!(
        "after the API server's restart, a new Service was allocated and reported by its owner in {:?}; {} watches got 410",
        t0.elapsed(),
        c.server.expired_watches()
    );
    assert_eq!(
        c.wait_address("shop", "a", Duration::from_secs(1)).await,
        a,
        "a moved"
    );
    c.assert_rbac_was_enough();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn exactly_one_node_answers_arp_for_each_vip() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(3).await;
    c.service("shop", "web", true);
    c.service("shop", "api", true);
    // Kubelet's probes and Prometheus reach every agent on its node address (deploy/agent.yaml:
    // PORTICO_METRICS_HOST from status.hostIP, port 7473); /status stays node-local.
    for i in 1..=3 {
        let base = format!("http://10.77.0.{}:7473", 10 + i);
        let get = |path: &str| {
            in_ns(
                &c.net.client(),
                &[
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-w",
                    "\n%{http_code}",
                    &format!("{base}{path}"),
                ],
            )
            .1
        };
        let until = Instant::now() + Duration::from_secs(20);
        while !get("/readyz").ends_with("200") {
            assert!(
                Instant::now() < until,
                "node-{i}: /readyz not 200: {}",
                get("/readyz")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(get("/healthz").ends_with("200"));
        let metrics = get("/metrics");
        assert!(
            metrics.ends_with("200") && metrics.contains("portico_agent_"),
            "node-{i}: {metrics}"
        );
        assert!(
            get("/status").ends_with("404"),
            "node-{i}: /status is node-local"
        );
    }
    for name in ["web", "api"] {
        let vip = c.wait_address("shop", name, Duration::from_secs(30)).await;
        let mac = c.wait_one_arp_owner(&vip, Duration::from_secs(30)).await;
        let owner = c.node_of_mac(&mac);
        // It stays one (no flapping, no second answer) over a few more rounds.
        for _ in 0..3 {
            assert_eq!(c.arp_answers(&vip), vec![mac.clone()], "{vip}");
        }
        let body = c
            .curl(&vip)
            .unwrap_or_else(|| panic!("curl http://{vip}/ failed"));
        assert!(body.starts_with("node-"), "{body}");
        // The API says the same node announces it, and nobody else claims it.
        let said = c
            .wait_owner("shop", name, &vip, Duration::from_secs(15))
            .await;
        assert_eq!(said, format!("node-{owner}"), "{vip}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn owner_killed_another_node_serves() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(3).await;
    c.service("shop", "web", true);
    let vip = c.wait_address("shop", "web", Duration::from_secs(30)).await;
    let mac = c.wait_one_arp_owner(&vip, Duration::from_secs(30)).await;
    let owner = c.node_of_mac(&mac);
    let said = c
        .wait_owner("shop", "web", &vip, Duration::from_secs(15))
        .await;
    assert_eq!(said, format!("node-{owner}"));
    // The client talks to the VIP, so its ARP cache holds the owner's MAC; a watcher in the
    // client's namespace sees when a gratuitous ARP moves it.
    assert!(
        c.curl(&vip).is_some(),
        "{vip} not served before the failure"
    );
    let moved = c.net.watch_client_arp(&vip, &mac);
    // The node dies: its agent is killed and its link goes down.
    let t0 = Instant::now();
    c.agents[owner - 1].kill(sys::SIGKILL);
    ip(&["-n", &c.net.node(owner), "link", "set", "eth0", "down"]);
    let (at, new_mac) = tokio::task::spawn_blocking(move || moved.recv())
        .await
        .expect("watcher joins")
        .expect("watcher reports")
        .unwrap_or_else(|| panic!("the client's ARP entry for {vip} still names {mac} after 20 s"));
    let took = at.saturating_duration_since(t0);
    let new_owner = c.node_of_mac(&new_mac);
    assert_ne!(new_owner, owner);
    println!(
        "failover of {vip}: node-{owner} killed -> client's ARP entry names node-{new_owner} after {took:?}"
    );
    // Exactly one node answers for it now, the one the client moved to, and it serves.
    assert_eq!(
        c.wait_one_arp_owner(&vip, Duration::from_secs(10)).await,
        new_mac
    );
    let until = Instant::now() + Duration::from_secs(10);
    while c.curl(&vip).is_none() {
        assert!(Instant::now() < until, "{vip} not served after failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new owner says so, and the dead node's entry is gone although its Node stays: the
    // reporter (the first node whose agent is up) removes it with the dead node's manager.
    let dead = format!("node-{owner}");
    let r = c
        .wait_report(
            "shop",
            "web",
            &vip,
            Duration::from_secs(15),
            "the new owner alone",
            |r| {
                r.owners == [format!("node-{new_owner}")]
                    && r.reasons
                        .contains(&(format!("node-{new_owner}"), "owner".to_string()))
                    && r.reasons.iter().all(|(n, _)| *n != dead)
            },
        )
        .await;
    println!("after the failover, status: {}", r.raw);
    // The documented target: hard-failure failover well under 300 ms with the default profile
    // (160 ms to declare a peer dead). Margin here: the kill itself (up to 50 ms to reap), two
    // shared CPUs and the 2 ms watcher poll; the bound is 300 ms + 200 ms.
    assert!(
        took < Duration::from_millis(500),
        "failover took {took:?} (target under 300 ms, bound 500 ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn service_without_ready_endpoints_is_not_announced() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(2).await;
    c.service("shop", "idle", false);
    // The address is allocated all the same (allocation does not depend on endpoints)…
    let vip = c
        .wait_address("shop", "idle", Duration::from_secs(30))
        .await;
    // …but nobody announces it: the reporter (the first node by name) says why, nobody else
    // writes about it, and nobody answers ARP.
    let r = c
        .wait_report(
            "shop",
            "idle",
            &vip,
            Duration::from_secs(15),
            "noHealthyEndpoints from node-1 only",
            |r| r.reasons == [("node-1".to_string(), "noHealthyEndpoints".to_string())],
        )
        .await;
    assert!(r.owners.is_empty(), "{}", r.raw);
    assert_eq!(c.arp_answers(&vip), Vec::<String>::new());
    assert!(c.curl(&vip).is_none());
    // Every agent's own /status gives the same reason word (not `noEligibleNode`).
    for i in 1..=2 {
        let (_, out) = in_ns(
            &c.net.node(i),
            &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/status"],
        );
        let status: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let reasons: Vec<&str> = status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["vips"].as_array().into_iter().flatten())
            .filter(|v| v["address"] == vip.as_str())
            .filter_map(|v| v["reason"].as_str())
            .collect();
        assert_eq!(reasons, ["noHealthyEndpoints"], "node-{i}: {out}");
    }
    // Once an endpoint is ready, exactly one node announces it and says so (the reporter's
    // reason goes, unless it is the owner itself).
    c.service("shop", "idle", true);
    let mac = c.wait_one_arp_owner(&vip, Duration::from_secs(20)).await;
    let owner = c
        .wait_owner("shop", "idle", &vip, Duration::from_secs(15))
        .await;
    assert_eq!(owner, format!("node-{}", c.node_of_mac(&mac)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_keeps_every_address_without_writes() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    let names = ["a", "b", "c"];
    let mut before = Vec::new();
    for n in names {
        c.service("shop", n, true);
    }
    for n in names {
        before.push(c.wait_address("shop", n, Duration::from_secs(30)).await);
    }
    // Rolling update: the old replica stops, a new one (another pod name) takes the Lease.
    c.controllers[0].kill(sys::SIGTERM);
    let writes = |c: &Cluster| -> u64 {
        c.server
            .requests()
            .iter()
            .filter(|(k, _)| {
                k.starts_with(
                    "system:serviceaccount:portico-system:portico-controller patch services",
                )
            })
            .map(|(_, v)| *v)
            .sum()
    };
    let writes_before = writes(&c);
    c.start_controller();
    // A new Service is served once the new replica leads (it had to wait for the Lease).
    c.service("shop", "d", true);
    let d = c.wait_address("shop", "d", Duration::from_secs(45)).await;
    assert!(!before.contains(&d), "{d} was already taken: {before:?}");
    let lease = c
        .server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(SYSTEM_NS),
            "portico-controller",
        )
        .expect("the Lease exists");
    assert_eq!(
        lease["spec"]["holderIdentity"], "portico-controller-1",
        "{lease}"
    );
    // Nothing moved, and the only Service writes of the new term were for the new Service.
    for (n, ip) in names.iter().zip(&before) {
        assert_eq!(
            &c.wait_address("shop", n, Duration::from_secs(1)).await,
            ip,
            "{n} moved"
        );
    }
    let svc_writes = writes(&c) - writes_before;
    assert!(
        svc_writes <= 1,
        "the new replica wrote {svc_writes} times to Services (want only the new one's status)"
    );
}

/// The Lease holder, once there is one (bounded wait).
async fn lease_holder(c: &Cluster, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let holder = c
            .server
            .get(
                "coordination.k8s.io/v1",
                "Lease",
                Some(SYSTEM_NS),
                "portico-controller",
            )
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string));
        if let Some(h) = holder {
            return h;
        }
        assert!(
            Instant::now() < until,
            "nobody took the Lease within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_change_between_two_replicas() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    // deploy/controller.yaml runs two replicas; one leads through the Lease.
    c.start_controller();
    c.service("shop", "a", true);
    let a = c.wait_address("shop", "a", Duration::from_secs(30)).await;
    let leader = lease_holder(&c, Duration::from_secs(10)).await;
    let i: usize = leader
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("pod name ends in its number");
    // The leader's node dies without a word; the standby takes over once the Lease expires.
    c.controllers[i].kill(sys::SIGKILL);
    let t0 = Instant::now();
    c.service("shop", "b", true);
    let b = c.wait_address("shop", "b", Duration::from_secs(45)).await;
    println!(
        "standby allocated after the leader died in {:?}",
        t0.elapsed()
    );
    assert_ne!(a, b);
    let now = lease_holder(&c, Duration::from_secs(1)).await;
    assert_ne!(now, leader, "the Lease still names the dead leader");
    assert_eq!(
        c.wait_address("shop", "a", Duration::from_secs(1)).await,
        a,
        "a moved"
    );
    c.assert_rbac_was_enough();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn colliding_namespace_name_forms_are_both_served() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(2).await;
    c.service("team-a", "web", true);
    c.service("team", "a-web", true);
    let one = c
        .wait_address("team-a", "web", Duration::from_secs(30))
        .await;
    let two = c
        .wait_address("team", "a-web", Duration::from_secs(30))
        .await;
    assert_ne!(one, two);
    // Each is announced, and its own ServiceAnnouncement (not the other's) says by whom.
    for (ns, name, vip) in [("team-a", "web", &one), ("team", "a-web", &two)] {
        let mac = c.wait_one_arp_owner(vip, Duration::from_secs(20)).await;
        assert!(c.curl(vip).is_some(), "{vip} not served");
        let owner = c.wait_owner(ns, name, vip, Duration::from_secs(15)).await;
        assert_eq!(
            owner,
            format!("node-{}", c.node_of_mac(&mac)),
            "{ns}/{name}"
        );
    }
    for (ns, name, other) in [("team-a", "web", &two), ("team", "a-web", &one)] {
        let r = c.vip_report(ns, name, other);
        assert!(
            r.reasons.is_empty(),
            "{ns}/{name} speaks of {other}: {}",
            r.raw
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn agent_killed_and_node_deleted_leaves_no_trace() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    c.service("shop", "web", true);
    let vip = c.wait_address("shop", "web", Duration::from_secs(30)).await;
    // The owner's agent is killed and its Node deleted: whichever node it is, the other one
    // (then the first by name, the reporter) takes the address and removes the dead node's entry.
    let owner = c
        .wait_owner("shop", "web", &vip, Duration::from_secs(15))
        .await;
    let i: usize = owner
        .strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .expect("node-<i>");
    let other = format!("node-{}", 3 - i);
    c.agents[i - 1].kill(sys::SIGKILL);
    c.server
        .delete("v1", "Node", None, &owner)
        .expect("Node deleted");
    let r = c
        .wait_report(
            "shop",
            "web",
            &vip,
            Duration::from_secs(30),
            &format!("{other} owning it and no entry of {owner}"),
            |r| r.owners == [other.clone()] && r.reasons == [(other.clone(), "owner".to_string())],
        )
        .await;
    println!("{owner} killed and deleted; {other} owns it: {}", r.raw);
    let left = r.raw["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["node"] == owner.as_str());
    assert!(!left, "{owner} is still in the announcement: {}", r.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn gossip_key_rotation_without_split_or_restart() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(2).await;
    c.service("shop", "web", true);
    let vip = c.wait_address("shop", "web", Duration::from_secs(30)).await;
    c.wait_one_arp_owner(&vip, Duration::from_secs(30)).await;
    let secret = c
        .server
        .get("v1", "Secret", Some(SYSTEM_NS), "portico-gossip")
        .expect("Secret");
    let key1 = secret["data"]["key"].as_str().expect("key").to_string();
    let key2 = b64("AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=");
    let set = |data: Value| {
        c.server
            .inject(json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "portico-gossip", "namespace": SYSTEM_NS}, "type": "Opaque", "data": data}))
            .expect("Secret updated");
    };
    // Step 1: add key-2 (it sends; both are accepted). Step 2: remove key-1.
    for data in [json!({"key": key1, "key-2": key2}), json!({"key-2": key2})] {
        set(data);
        // bounded: 10 s of checks, one owner all along
        for _ in 0..10 {
            let macs = c.arp_answers(&vip);
            assert_eq!(macs.len(), 1, "split during rotation: {macs:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for a in &c.agents {
        assert!(a.child.is_some(), "{} was restarted", a.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn external_traffic_policy_local_announces_from_a_node_with_an_endpoint() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let c = Cluster::start(3).await;
    c.service_with("shop", "local", "Local", &[(2, true)]);
    let vip = c
        .wait_address("shop", "local", Duration::from_secs(30))
        .await;
    let mac = c.wait_one_arp_owner(&vip, Duration::from_secs(30)).await;
    assert_eq!(c.node_of_mac(&mac), 2, "only node-2 has a local endpoint");
    assert_eq!(c.curl(&vip).as_deref(), Some("node-2"));
    // node-2 says it owns it; the others could not take it and write nothing about it.
    let owner = c
        .wait_owner("shop", "local", &vip, Duration::from_secs(15))
        .await;
    assert_eq!(owner, "node-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn rolling_update_hands_the_lease_over_at_once() {
    if !can_run() {
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    c.start_controller();
    c.service("shop", "a", true);
    c.wait_address("shop", "a", Duration::from_secs(30)).await;
    let leader = lease_holder(&c, Duration::from_secs(10)).await;
    let i: usize = leader
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("pod name ends in its number");
    // The kubelet stops the leader's pod (SIGTERM); the standby should lead within a retry period.
    c.controllers[i].kill(sys::SIGTERM);
    let t0 = Instant::now();
    c.service("shop", "b", true);
    c.wait_address("shop", "b", Duration::from_secs(5)).await;
    println!("allocated {:?} after the leader's SIGTERM", t0.elapsed());
}

/// BGP as a user sets it up: a top-of-rack router peering with every node over IPv4 and
/// IPv6 (TCP MD5, the password in a Secret as MetalLB has it; BFD on IPv4 with the timers of
/// a `BFDProfile`), and an advertisement of the default pool.
const BGP_YAML: &str = "\
apiVersion: portico.dev/v1alpha1
kind: BFDProfile
metadata: {name: tor-bfd}
spec:
  receiveInterval: 200
  transmitInterval: 200
  detectMultiplier: 4
  echoMode: false
---
apiVersion: portico.dev/v1alpha1
kind: BGPPeer
metadata: {name: tor}
spec:
  myASN: 64512
  peerASN: 64500
  peerAddress: 10.77.0.2
  holdTime: 9s
  bfdProfile: tor-bfd
  passwordSecret: {name: tor-md5, namespace: portico-system}
---
apiVersion: portico.dev/v1alpha1
kind: BGPPeer
metadata: {name: tor6}
spec:
  myASN: 64512
  peerASN: 64500
  peerAddress: fd77::2
  holdTime: 9s
  passwordSecret: {name: tor-md5, namespace: portico-system}
---
apiVersion: portico.dev/v1alpha1
kind: BGPAdvertisement
metadata: {name: default}
spec:
  ipAddressPools: [default]
";

/// The TCP MD5 password of both sessions, as `kubectl create secret generic tor-md5
/// --type=kubernetes.io/basic-auth --from-literal=password=…` makes it.
const BGP_SECRET_YAML: &str = "\
apiVersion: v1
kind: Secret
metadata: {name: tor-md5, namespace: portico-system}
type: kubernetes.io/basic-auth
stringData: {password: t0r-md5-Secret}
";

/// The default pool with an IPv6 range as well, for the dual-stack Service of the BGP test.
const DUAL_POOL_YAML: &str = "\
apiVersion: portico.dev/v1alpha1
kind: IPPool
metadata: {name: default}
spec:
  addresses: [10.77.0.200-10.77.0.220, fd77:100::10-fd77:100::20]
";

/// The router's address on the cluster bridge, and the client network behind it.
const ROUTER_IP: &str = "10.77.0.2";
const ROUTED_CLIENT: &str = "10.79.0.2";
/// The same over IPv6 (the nodes get fd77::1<i>/64 next to their IPv4 address).
const ROUTER_IP6: &str = "fd77::2";
const ROUTED_CLIENT6: &str = "fd79::2";

impl Cluster {
    /// A router namespace on the bridge (eth0 10.77.0.2/24 and fd77::2/64, forwarding) with a
    /// client namespace behind it (10.79.0.2/24 and fd79::2/64, default routes through the
    /// router); the nodes get fd77::1<i>/64 and route the client networks through it. Returns
    /// (router, client) namespaces.
    fn routed_client(&mut self) -> (String, String) {
        let (r, c) = (
            format!("{}-r", self.net.prefix),
            format!("{}-rc", self.net.prefix),
        );
        self.net.attach(&r, "rt", &format!("{ROUTER_IP}/24"));
        ip(&[
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        ip(&[
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.fib_multipath_hash_policy=1",
        ]);
        for k in [
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            ip(&["netns", "exec", &r, "sysctl", "-qw", k]);
        }
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{ROUTER_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        self.net.add_ns(&c);
        ip(&[
            "-n", &r, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", &c,
        ]);
        ip(&["-n", &r, "addr", "add", "10.79.0.1/24", "dev", "cl"]);
        ip(&["-n", &r, "addr", "add", "fd79::1/64", "dev", "cl", "nodad"]);
        ip(&["-n", &r, "link", "set", "cl", "up"]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{ROUTED_CLIENT}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{ROUTED_CLIENT6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &c, "link", "set", "eth0", "up"]);
        ip(&["-n", &c, "route", "add", "default", "via", "10.79.0.1"]);
        ip(&["-n", &c, "-6", "route", "add", "default", "via", "fd79::1"]);
        for i in 1..=self.agents.len() {
            let node = self.net.node(i);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("fd77::{}/64", 10 + i),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&[
                "-n",
                &node,
                "-6",
                "route",
                "add",
                "fd79::/64",
                "via",
                ROUTER_IP6,
            ]);
            ip(&[
                "-n",
                &self.net.node(i),
                "route",
                "add",
                "10.79.0.0/24",
                "via",
                ROUTER_IP,
            ]);
        }
        (r, c)
    }

    /// BIRD 2 in the router namespace, peering with every node over IPv4 and IPv6 (AS 64500
    /// to 64512, TCP MD5 with `password`) and installing what it learns into the kernel with
    /// ECMP (`merge paths`).
    fn start_bird(&self, router: &str, password: &str) -> Proc {
        let mut conf = format!(
            "log stderr all;\nrouter id {ROUTER_IP};\nprotocol device {{ scan time 1; }}\nprotocol bfd {{ }}\n\
             protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol kernel k6 {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
             template bgp node {{ local as 64500; hold time 9; connect retry time 1; error wait time 1, 5; password \"{password}\"; }}\n"
        );
        for i in 1..=self.agents.len() {
            conf.push_str(&format!(
                "protocol bgp n{i} from node {{ neighbor 10.77.0.{n} as 64512; bfd on; ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp n{i}v6 from node {{ neighbor fd77::{n} as 64512; ipv6 {{ import all; export none; }}; }}\n",
                n = 10 + i
            ));
        }
        let path = self.dir.join("bird.conf");
        std::fs::write(&path, conf).expect("bird.conf");
        let log = self.dir.join("bird.log");
        let file = std::fs::File::create(&log).expect("log file");
        let (sock, pid) = (self.dir.join("bird.ctl"), self.dir.join("bird.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", router, "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(&sock)
            .arg("-P")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("bird starts");
        Proc {
            name: "bird".into(),
            child: Some(child),
            log,
        }
    }
}

/// The next hops of `router`'s route to `vip` (sorted; IPv4 or IPv6 by the address).
fn next_hops(router: &str, vip: &str) -> (Vec<String>, String) {
    let fam = if vip.contains(':') { "-6" } else { "-4" };
    let route = in_ns(router, &["ip", fam, "route", "show", vip]).1;
    let words: Vec<&str> = route.split_whitespace().collect();
    let mut hops: Vec<String> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    (hops, route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// BGPPeers (IPv4 and IPv6, the TCP MD5 password in a Secret) and a BGPAdvertisement of a
/// dual-stack pool: a peer whose Secret is missing is not configured and the error says so;
/// with the Secret the sessions establish (BIRD requires the password), the router has a
/// next hop per node for both addresses, and clients behind it reach both; an advertisement
/// limited to the IPv4 `BGPPeer` (`peers`) takes the IPv6 route out of the router's FIB.
async fn bgp_peer_and_advertisement_give_the_router_one_next_hop_per_node() {
    if !can_run() {
        return;
    }
    let has_bird = Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_bird {
        if std::env::var_os("PORTICO_CI").is_some() {
            panic!("needs `bird` and `birdc` (bird2; scripts/test-all installs it)");
        }
        println!("skipped: needs `bird` and `birdc` (bird2)");
        return;
    }
    let _one = SERIAL.lock().await;
    let mut c = Cluster::start(2).await;
    let (router, client) = c.routed_client();
    let password = "t0r-md5-Secret";
    let mut bird = c.start_bird(&router, password);
    // BIRD's BFD sessions to the nodes that are Up with the BFDProfile's timers: BIRD sends
    // every 0.200 s (our receive interval) and times out after 0.800 s (our multiplier 4 x our
    // transmit interval); its defaults are 0.100 s and multiplier 5
    let bird_ctl = c.dir.join("bird.ctl");
    let bird_bfd = || {
        let out = in_ns(
            &router,
            &[
                "birdc",
                "-s",
                bird_ctl.to_str().unwrap_or_default(),
                "show",
                "bfd",
                "sessions",
            ],
        )
        .1;
        let up = out
            .lines()
            .filter(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first().is_some_and(|a| a.starts_with("10.77.0.1"))
                    && w.get(2) == Some(&"Up")
                    && w.ends_with(&["0.200", "0.800"])
            })
            .count();
        (up, out)
    };
    // a dual-stack pool; as a user would: kubectl apply -f bgp.yaml, forgetting the Secret
    c.server
        .apply_yaml(DUAL_POOL_YAML)
        .expect("dual-stack pool");
    c.server
        .apply_yaml(BGP_YAML)
        .expect("BGPPeers and BGPAdvertisement");
    // no peer is configured without its password, and every agent says what to create
    let said =
        "BGPPeer/tor: spec.passwordSecret: no Secret `tor-md5` in portico's namespace; create it";
    let until = Instant::now() + Duration::from_secs(20);
    while !c
        .agents
        .iter()
        .all(|a| std::fs::read_to_string(&a.log).is_ok_and(|l| l.contains(said)))
    {
        assert!(Instant::now() < until, "agents did not log `{said}`");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // the Secret (kubernetes.io/basic-auth, key password), then a dual-stack Service
    c.server
        .apply_yaml(BGP_SECRET_YAML)
        .expect("password Secret");
    let created = Instant::now();
    c.service_families("shop", "web", "Cluster", &[(1, true), (2, true)], true);
    let until = Instant::now() + Duration::from_secs(30);
    let (vip, vip6) = loop {
        let svc = c
            .server
            .get("v1", "Service", Some("shop"), "web")
            .expect("Service exists");
        let ips: Vec<String> = svc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str().map(String::from))
            .collect();
        if let (Some(v4), Some(v6)) = (
            ips.iter().find(|a| !a.contains(':')),
            ips.iter().find(|a| a.contains(':')),
        ) {
            break (v4.clone(), v6.clone());
        }
        assert!(
            Instant::now() < until,
            "shop/web got no IPv4 and IPv6 address: {svc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // the router's FIBs (IPv4 and IPv6): one route each, a next hop per node; the sessions
    // are up, so both took the password from the Secret (BIRD requires TCP MD5)
    let until = Instant::now() + Duration::from_secs(60);
    for (addr, want) in [
        (&vip, ["10.77.0.11", "10.77.0.12"]),
        (&vip6, ["fd77::11", "fd77::12"]),
    ] {
        loop {
            let (hops, route) = next_hops(&router, addr);
            if hops == want {
                println!(
                    "router after {:?} from the Service's creation: {}",
                    created.elapsed(),
                    route.split_whitespace().collect::<Vec<_>>().join(" ")
                );
                break;
            }
            assert!(
                Instant::now() < until,
                "router route to {addr}: want a next hop per node, got {hops:?} ({route})\nbird:\n{}",
                bird.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // nobody answers ARP for a BGP-only address
    assert!(c.arp_answers(&vip).is_empty(), "ARP answered for {vip}");

    // BFD runs with the BFDProfile's timers (`bfdProfile: tor-bfd` on the IPv4 peer)
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (up, out) = bird_bfd();
        if up == 2 {
            println!("BIRD's BFD sessions:\n{out}");
            break;
        }
        assert!(
            Instant::now() < until,
            "want BIRD's BFD sessions to both nodes Up at 0.200 s / 0.800 s (BFDProfile tor-bfd: 200 ms x 4):\n{out}\nbird:\n{}",
            bird.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // a client behind the router reaches the Service, over IPv4 and IPv6
    let until = Instant::now() + Duration::from_secs(20);
    let mut answers = Vec::new();
    for (url, flag) in [
        (format!("http://{vip}/"), "-4"),
        (format!("http://[{vip6}]/"), "-6"),
    ] {
        let mut got = 0;
        while got < 10 {
            let (ok, out) = in_ns(&client, &["curl", flag, "-sg", "-m", "2", &url]);
            if ok && out.starts_with("node-") {
                answers.push(format!("{flag} {}", out.trim()));
                got += 1;
            }
            assert!(
                Instant::now() < until,
                "curl {flag} from behind the router to {url}: {answers:?}"
            );
        }
    }

    // every node's entry: the route announced and its session established
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let sva = c.announcement("shop", "web").unwrap_or_default();
        let nodes = sva["status"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let good = |node: &str| {
            nodes.iter().any(|e| {
                let routes = e["bgp"]["routes"].as_array().cloned().unwrap_or_default();
                let sessions = e["bgp"]["sessions"].as_array().cloned().unwrap_or_default();
                e["node"] == node
                    && [&vip, &vip6].iter().all(|a| {
                        routes
                            .iter()
                            .any(|r| r["address"] == a.as_str() && r["reason"] == "announced")
                    })
                    && ["tor", "tor6"].iter().all(|p| {
                        sessions.iter().any(|s| {
                            s["peer"] == *p
                                && s["state"] == "established"
                                && s["prefixesSent"] == 1
                                && s["since"].is_string()
                                // BFD on the peer with a BFDProfile only
                                && s["bfd"] == if *p == "tor" { "up".into() } else { Value::Null }
                        })
                    })
            })
        };
        if good("node-1") && good("node-2") {
            println!("answers: {answers:?}\nstatus: {}", sva["status"]);
            break;
        }
        assert!(
            Instant::now() < until,
            "want both nodes' sessions established in the ServiceAnnouncement: {}",
            sva["status"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `portico status` on a node shows the session and the route
    let (ok, table) = in_ns(
        &c.net.node(1),
        &[
            env!("CARGO_BIN_EXE_portico"),
            "status",
            "--admin",
            "127.0.0.1:9440",
        ],
    );
    let session = table
        .lines()
        .find(|l| l.trim_start().starts_with("tor "))
        .unwrap_or_default();
    assert!(
        ok && session.contains("10.77.0.2") && session.contains("established"),
        "portico status on node-1:\n{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with(vip.as_str()) && l.contains("announced")),
        "portico status on node-1:\n{table}"
    );

    // bad edits (hold time too short; echo mode in the BFDProfile) are reported by resource
    // and field, and the session keeps running with the last valid settings: the route stays,
    // with both next hops, and BFD keeps its timers
    c.server
        .apply_yaml(
            &BGP_YAML
                .replace("holdTime: 9s", "holdTime: 1s")
                .replace("echoMode: false", "echoMode: true"),
        )
        .expect("edited BGPPeer and BFDProfile");
    let until = Instant::now() + Duration::from_secs(20);
    for said in [
        "BGPPeer/tor: spec.holdTime: 1s is too short",
        "BFDProfile/tor-bfd: spec.echoMode: portico does not do BFD echo mode; remove it or set it to false (the last valid version stays in force)",
    ] {
        while !c
            .agents
            .iter()
            .all(|a| std::fs::read_to_string(&a.log).is_ok_and(|l| l.contains(said)))
        {
            assert!(Instant::now() < until, "agents did not log `{said}`");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (up, out) = bird_bfd();
    assert_eq!(up, 2, "after the bad edits, BIRD's BFD sessions:\n{out}");
    let (hops, route) = next_hops(&router, &vip);
    assert_eq!(
        hops,
        ["10.77.0.11", "10.77.0.12"],
        "after the bad edit: {route}"
    );
    let (hops, route) = next_hops(&router, &vip6);
    assert_eq!(
        hops,
        ["fd77::11", "fd77::12"],
        "after the bad edit: {route}"
    );
    let sva = c.announcement("shop", "web").unwrap_or_default();
    for e in sva["status"]["nodes"].as_array().into_iter().flatten() {
        for s in e["bgp"]["sessions"].as_array().into_iter().flatten() {
            assert_eq!(
                s["state"], "established",
                "after the bad edit: {}",
                sva["status"]
            );
        }
    }

    // the advertisement limited to the BGPPeer `tor` (`peers`, the IPv4 session): the IPv6
    // route, which only `tor6` carries, leaves the router's FIB; the IPv4 one keeps both next
    // hops and every session stays up
    c.server
        .apply_yaml(&BGP_YAML.replace(
            "ipAddressPools: [default]\n",
            "ipAddressPools: [default]\n  peers: [tor]\n",
        ))
        .expect("BGPAdvertisement with peers");
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(20);
    loop {
        let (_, route6) = next_hops(&router, &vip6);
        if route6.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "peers: [tor]: the IPv6 route stays: {route6}\nbird:\n{}",
            bird.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "peers: [tor]: IPv6 route withdrawn after {:?}",
        t0.elapsed()
    );
    let (hops, route) = next_hops(&router, &vip);
    assert_eq!(hops, ["10.77.0.11", "10.77.0.12"], "peers: [tor]: {route}");
    let sva = c.announcement("shop", "web").unwrap_or_default();
    for e in sva["status"]["nodes"].as_array().into_iter().flatten() {
        for s in e["bgp"]["sessions"].as_array().into_iter().flatten() {
            assert_eq!(s["state"], "established", "peers: [tor]: {}", sva["status"]);
        }
    }

    // `ownerOnly` without an L2Announcement: only the address's owner announces it (one next
    // hop at the router), and nobody answers ARP for it (was: the owner did, as `both`)
    c.server
        .apply_yaml(&BGP_YAML.replace(
            "ipAddressPools: [default]\n",
            "ipAddressPools: [default]\n  ownerOnly: true\n",
        ))
        .expect("BGPAdvertisement with ownerOnly");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (hops, route) = next_hops(&router, &vip);
        if hops.len() == 1 {
            println!("ownerOnly: {route}");
            break;
        }
        assert!(
            Instant::now() < until,
            "ownerOnly: want one next hop, got {hops:?} ({route})\nbird:\n{}",
            bird.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.arp_answers(&vip).is_empty(),
        "ownerOnly without an L2Announcement: ARP answered for {vip}"
    );
    let (hops, route) = next_hops(&router, &vip);
    assert_eq!(hops.len(), 1, "ownerOnly, 2 s later: {route}");
    c.assert_rbac_was_enough();
    bird.kill(sys::SIGKILL);
}
