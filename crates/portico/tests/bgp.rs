//! BGP announcement end to end: two nodes, each running the shipped `portico` binary with
//! `announce: bgp`, peer with a BIRD 2 router; the router installs one multipath route per VIP
//! (IPv4 and IPv6) with a next hop per serving node, clients behind the router reach both
//! nodes, a node whose backends fail is withdrawn (and says why in its `/status`), and a
//! graceful stop withdraws before it drains, so no client request fails. The nodes gossip
//! (`cluster:`), as the docs tell BGP users: a request in flight on the stopping node when the
//! router re-hashes its flow to the other node is carried by the ECMP rescue (without it, one
//! such request in a few hundred failed with a reset, seen in a full-suite run).
//!
//! Network (namespaces `pa<pid>x<n>-…`): the router `-r` holds bridge `br0` (10.78.0.1/24,
//! fd78::1/64) with the nodes `-n1`, `-n2` on it (10.78.0.11-12, fd78::11-12) and a veth to
//! the client `-c` (10.78.9.2/24, fd78:9::2/64). BIRD runs in `-r` with the kernel protocol's
//! `merge paths on`, and the router hashes flows by ports (`fib_multipath_hash_policy=1`) so
//! one client's connections spread. Each node's backend is a small HTTP server on
//! 127.0.0.1:8080 inside the node's namespace answering `node-<i>`. Every namespace and
//! process is removed by Drop guards.
//!
//! Needs root, `ip`, `bird` and `curl`: without them the test prints `skipped: …` and returns,
//! unless `PORTICO_CI` is set, when it fails.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::bgplab::{Lab, VIP4, VIP6, can_run};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecmp_across_serving_nodes_withdraw_and_graceful_stop() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::create(2);
    lab.cluster = true;
    lab.start_bird();
    for i in 1..=2 {
        lab.start_backend(i);
        lab.start_node(i);
    }
    let both4 = ["10.78.0.11", "10.78.0.12"];
    let both6 = ["fd78::11", "fd78::12"];

    // 1. one multipath route per VIP, a next hop per serving node
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &both4, Duration::from_secs(30))
        .await;
    lab.wait_next_hops(VIP6, &both6, Duration::from_secs(30))
        .await;
    println!(
        "both next hops, IPv4 and IPv6, {:?} after the start",
        t0.elapsed()
    );
    assert!(lab.route(VIP4).contains("nexthop"), "{}", lab.route(VIP4));
    for i in 1..=2 {
        lab.wait_route_reason(i, VIP4, "announced", Duration::from_secs(5))
            .await;
        let st = lab.status(i);
        let sessions = st["bgp"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(sessions.len(), 2, "{st}");
        assert!(
            sessions
                .iter()
                .all(|s| s["state"] == "established" && s["prefixes_sent"] == 1),
            "{st}"
        );
        // the service's VIP rows give the route decision (a `bgp`-only VIP has no L2 owner)
        let vips = st["services"][0]["vips"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !vips.is_empty() && vips.iter().all(|v| v["reason"] == "announced"),
            "{st}"
        );
    }

    // no predecessor left VIPs on lo, so nothing of this process's was taken off it (the
    // agent used to clear marked addresses after the BGP task had put the VIP there: a node
    // announced a route it could not deliver for up to 1 s)
    for n in &lab.nodes {
        let log = n.log();
        assert!(
            !log.contains("a previous agent left on lo"),
            "a VIP of this process was removed from lo as stale:\n{log}"
        );
    }

    // 2. client connections spread over both nodes, IPv4 and IPv6
    for vip in [VIP4, VIP6] {
        let (seen, failed) = lab.spread(vip, 40);
        assert_eq!(failed, 0, "{vip}");
        assert_eq!(seen, ["node-1", "node-2"], "{vip}");
    }

    // 3. node 2's backends fail: node 2 withdraws, with the reason in its /status
    lab.stop_backend(2);
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &["10.78.0.11"], Duration::from_secs(10))
        .await;
    lab.wait_next_hops(VIP6, &["fd78::11"], Duration::from_secs(10))
        .await;
    println!(
        "backend down -> node 2 withdrawn, IPv4 and IPv6, after {:?}",
        t0.elapsed()
    );
    lab.wait_route_reason(2, VIP4, "noHealthyBackend", Duration::from_secs(5))
        .await;
    lab.wait_route_reason(2, VIP6, "noHealthyBackend", Duration::from_secs(5))
        .await;
    for vip in [VIP4, VIP6] {
        let (seen, failed) = lab.spread(vip, 10);
        assert_eq!(
            (seen.as_slice(), failed),
            (&["node-1".to_string()][..], 0),
            "{vip}"
        );
    }

    // 4. it comes back
    lab.start_backend(2);
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &both4, Duration::from_secs(10))
        .await;
    lab.wait_next_hops(VIP6, &both6, Duration::from_secs(10))
        .await;
    println!(
        "backend up -> node 2 announced again after {:?}",
        t0.elapsed()
    );

    // 5. graceful stop of node 1 under a client loop: withdraw, wait, then drain; no request
    //    fails (without the withdrawal, requests hashed to node 1 meet a closed listener)
    let stop_loop = Arc::new(AtomicBool::new(false));
    let client = {
        let (c, stop) = (lab.ns("c"), stop_loop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            // bounded: until told, at most 60 s
            let until = std::time::SystemTime::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::SystemTime::now() < until {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &c,
                        "curl",
                        "-s",
                        "-m",
                        "2",
                        &format!("http://{VIP4}/"),
                    ])
                    .output()
                    .expect("curl runs");
                if out.status.success() {
                    ok += 1;
                } else {
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    failed.push(format!("curl exit {:?} at {at:?}", out.status.code()));
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    assert!(
        lab.nodes[0].stop(sys::SIGTERM, Duration::from_secs(20)),
        "node 1 exits on SIGTERM:\n{}",
        lab.nodes[0].log_tail()
    );
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_loop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().expect("client loop");
    assert!(ok > 10, "client requests during the stop: {ok}");
    let sigterm = std::time::SystemTime::now() - t0.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the graceful stop (SIGTERM at {:?}): {failed:#?}\n{}",
        failed.len(),
        ok + failed.len(),
        sigterm
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
        lab.nodes[0].log()
    );
    assert!(
        took >= Duration::from_secs(1),
        "the grace is kept: {took:?}"
    );
    let log = lab.nodes[0].log();
    assert!(
        log.contains("withdrawing BGP routes before draining"),
        "{}",
        lab.nodes[0].log_tail()
    );
    lab.wait_next_hops(VIP4, &["10.78.0.12"], Duration::from_secs(10))
        .await;
    println!("graceful stop: {ok} requests, 0 failed; node 1 exited after {took:?}");
}
