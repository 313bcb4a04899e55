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
//! A second test peers one node with two routers (BIRD in each of two router namespaces) and
//! limits one service to one of them (`services[].bgp.peers`): the VIP reaches only that
//! router's RIB and FIB, and a live reload that moves the limit withdraws it there and
//! announces it to the other, while an unlimited service stays with both.
//!
//! Needs root, `ip`, `bird` and `curl`: without them the test prints `skipped: …` and returns,
//! unless `PORTICO_CI` is set, when it fails.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::bgplab::{Lab, Proc, VIP4, VIP6, can_run, in_ns, ip};
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

/// Namespaces and a directory removed on drop (after the processes, declared later so
/// dropped first).
struct Namespaces(Vec<String>, std::path::PathBuf);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The node's config: peers `tor-a` and `tor-b`, service `limited` (VIP 10.79.100.1) sent to
/// `limit` only, service `every` (10.79.100.2) to every peer.
fn two_router_config(limit: &str) -> String {
    format!(
        "node: {{name: n1}}\n\
         bgp:\n  asn: 64512\n  router_id: 10.79.1.2\n  graceful_stop_grace: 0s\n  peers:\n\
         \x20   - {{name: tor-a, address: 10.79.1.1, asn: 64500, source: 10.79.1.2, hold_time: 9s}}\n\
         \x20   - {{name: tor-b, address: 10.79.2.1, asn: 64501, source: 10.79.2.2, hold_time: 9s}}\n\
         services:\n\
         \x20 - {{name: limited, vips: [10.79.100.1], ports: [{{port: 80}}], backends: [{{address: 127.0.0.1}}], health_check: {{type: none}}, announce: bgp, bgp: {{peers: [{limit}]}}}}\n\
         \x20 - {{name: every, vips: [10.79.100.2], ports: [{{port: 80}}], backends: [{{address: 127.0.0.1}}], health_check: {{type: none}}, announce: bgp}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_limited_to_one_peer_reaches_only_that_router_and_moves_on_reload() {
    if !can_run() {
        return;
    }
    let prefix = format!("pp{}", std::process::id() % 100_000);
    let (node, ra, rb) = (
        format!("{prefix}-n"),
        format!("{prefix}-ra"),
        format!("{prefix}-rb"),
    );
    let dir = std::env::temp_dir().join(format!("portico-bgp-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut made = Namespaces(Vec::new(), dir.clone());
    for ns in [&node, &ra, &rb] {
        ip(&["netns", "add", ns]);
        made.0.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    // router X (a: 10.79.1.0/24, b: 10.79.2.0/24) <-> the node's eth-X
    let mut procs: Vec<Proc> = Vec::new();
    for (x, r, net, asn) in [("a", &ra, 1, 64500), ("b", &rb, 2, 64501)] {
        let dev = format!("eth-{x}");
        ip(&[
            "-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", &dev, "netns", &node,
        ]);
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("10.79.{net}.1/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", r, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("10.79.{net}.2/24"),
            "dev",
            &dev,
        ]);
        ip(&["-n", &node, "link", "set", &dev, "up"]);
        let conf = format!(
            "log stderr all;\nrouter id 10.79.{net}.1;\nprotocol device {{ scan time 1; }}\n\
             protocol kernel k4 {{ ipv4 {{ import none; export all; }}; }}\n\
             protocol bgp n1 {{ local as {asn}; neighbor 10.79.{net}.2 as 64512; hold time 9; connect retry time 1; error wait time 1, 5; ipv4 {{ import all; export none; }}; }}\n"
        );
        let path = dir.join(format!("bird-{x}.conf"));
        std::fs::write(&path, conf).expect("bird.conf");
        let sock = dir.join(format!("bird-{x}.ctl"));
        procs.push(Proc::spawn(
            r,
            &[
                "bird",
                "-f",
                "-c",
                path.to_str().unwrap(),
                "-s",
                sock.to_str().unwrap(),
                "-P",
                dir.join(format!("bird-{x}.pid")).to_str().unwrap(),
            ],
            dir.join(format!("bird-{x}.log")),
        ));
    }
    let cfg = dir.join("n1.yaml");
    std::fs::write(&cfg, two_router_config("tor-a")).expect("node config");
    let exe = env!("CARGO_BIN_EXE_portico");
    procs.push(Proc::spawn(
        &node,
        &[exe, "run", "--config", cfg.to_str().unwrap()],
        dir.join("n1.log"),
    ));
    let fib = |r: &str, vip: &str| in_ns(r, &["ip", "-4", "route", "show", vip]).1;
    let rib = |x: &str| {
        let sock = dir.join(format!("bird-{x}.ctl"));
        let r = if x == "a" { &ra } else { &rb };
        in_ns(
            r,
            &[
                "birdc",
                "-s",
                sock.to_str().unwrap(),
                "show",
                "route",
                "all",
            ],
        )
        .1
    };
    let logs = |procs: &[Proc]| {
        procs
            .iter()
            .map(Proc::log_tail)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let (limited, every) = ("10.79.100.1", "10.79.100.2");

    // 1. limited to tor-a: a has both VIPs; b has `every` (its session is up and in sync) and,
    //    checked at every poll and once more after a further second, never `limited`
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (a1, a2, b1, b2) = (
            fib(&ra, limited),
            fib(&ra, every),
            fib(&rb, limited),
            fib(&rb, every),
        );
        assert!(
            b1.is_empty(),
            "router b got the limited VIP: {b1}\n{}",
            rib("b")
        );
        if a1.contains("via 10.79.1.2")
            && a2.contains("via 10.79.1.2")
            && b2.contains("via 10.79.2.2")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a: {a1:?} {a2:?}, b: {b1:?} {b2:?}\n{}",
            logs(&procs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(fib(&rb, limited).is_empty());
    let (rib_a, rib_b) = (rib("a"), rib("b"));
    assert!(rib_a.contains("10.79.100.1/32"), "{rib_a}");
    assert!(!rib_b.contains("10.79.100.1/32"), "{rib_b}");
    assert!(rib_b.contains("10.79.100.2/32"), "{rib_b}");

    // 2. a live reload moves the limit to tor-b: withdrawn from a, announced to b; `every`
    //    stays on both
    let tmp = dir.join("n1.yaml.new");
    std::fs::write(&tmp, two_router_config("tor-b")).expect("node config");
    std::fs::rename(&tmp, &cfg).expect("replace config");
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(20);
    loop {
        let (a1, b1) = (fib(&ra, limited), fib(&rb, limited));
        if a1.is_empty() && b1.contains("via 10.79.2.2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the reload: a {a1:?}, b {b1:?}\n{}",
            logs(&procs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "limit moved from tor-a to tor-b {:?} after the reload",
        t0.elapsed()
    );
    assert!(fib(&ra, every).contains("via 10.79.1.2"));
    assert!(fib(&rb, every).contains("via 10.79.2.2"));
    assert!(
        procs[2].log().contains("generation=2"),
        "{}",
        procs[2].log_tail()
    );
    drop(procs);
    drop(made);
}
