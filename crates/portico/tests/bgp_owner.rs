//! `bgp.owner_only` with `announce: bgp`: two nodes running the shipped binary elect one owner
//! per VIP by gossip, only the owner announces it to the BIRD router (one next hop, IPv4 and
//! IPv6), no node answers ARP for it on the shared segment (it is not an `l2` VIP), the other
//! node says `notOwner` in its `/status`, and when the owner stops the other node takes the
//! route. Same lab as `tests/bgp.rs` (`tests/common/bgplab.rs`); needs root, `ip`, `bird`,
//! `curl` and `arping`: without them it prints `skipped: …`, or fails under `PORTICO_CI`.

mod common;

use std::time::Duration;

use common::bgplab::{Lab, VIP4, VIP6, can_run, in_ns};
use tokio::time::Instant;

/// Node `i`'s route decision for `vip` in its `/status`.
fn reason(lab: &Lab, i: usize, vip: &str) -> Option<String> {
    lab.status(i)["bgp"]["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == vip))
        .and_then(|r| r["reason"].as_str().map(String::from))
}

/// Waits until one node says `announced` for `vip` and the other `notOwner`, and the router's
/// route has that node's next hop only; returns the owner.
async fn settled_owner(lab: &Lab, vip: &str, within: Duration) -> usize {
    let until = Instant::now() + within;
    loop {
        let r = [reason(lab, 1, vip), reason(lab, 2, vip)];
        let owner = match (r[0].as_deref(), r[1].as_deref()) {
            (Some("announced"), Some("notOwner")) => Some(1),
            (Some("notOwner"), Some("announced")) => Some(2),
            _ => None,
        };
        if let Some(o) = owner {
            let hop = if vip.contains(':') {
                format!("fd78::1{o}")
            } else {
                format!("10.78.0.1{o}")
            };
            if lab.next_hops(vip) == [hop] {
                return o;
            }
        }
        assert!(
            Instant::now() < until,
            "{vip}: reasons {r:?}, next hops {:?}\nn1:\n{}\nn2:\n{}",
            lab.next_hops(vip),
            lab.nodes[0].log_tail(),
            lab.nodes[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_only_announces_from_the_elected_owner_without_arp() {
    if !can_run() {
        return;
    }
    if !common::require("network namespaces", &["arping"]) {
        return;
    }
    let mut lab = Lab::create(2);
    lab.cluster = true;
    lab.service_bgp = "{owner_only: true}".into();
    lab.start_bird();
    for i in 1..=2 {
        lab.start_backend(i);
        lab.start_node(i);
    }
    // one owner per VIP (each VIP is elected on its own), and only its next hop
    let owner = settled_owner(&lab, VIP4, Duration::from_secs(30)).await;
    let other = 3 - owner;
    settled_owner(&lab, VIP6, Duration::from_secs(30)).await;
    // and it stays so (not a start-up moment)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lab.next_hops(VIP4),
        [format!("10.78.0.1{owner}")],
        "{}",
        lab.route(VIP4)
    );

    // every client request lands on the owner
    let (seen, failed) = lab.spread(VIP4, 20);
    assert_eq!((seen, failed), (vec![format!("node-{owner}")], 0));

    // nobody answers ARP for the VIP on the nodes' segment: it is routed, not an l2 VIP
    let (answered, out) = in_ns(
        &lab.ns("r"),
        &["arping", "-c", "3", "-w", "2", "-I", "br0", VIP4],
    );
    assert!(!answered, "a node answered ARP for {VIP4}: {out}");

    // the owner stops: the other node is elected and takes the route
    let t0 = Instant::now();
    assert!(
        lab.nodes[owner - 1].stop(sys::SIGTERM, Duration::from_secs(20)),
        "node {owner} did not stop"
    );
    lab.wait_next_hops(
        VIP4,
        &[format!("10.78.0.1{other}").as_str()],
        Duration::from_secs(20),
    )
    .await;
    println!(
        "owner n{owner} stopped: route on n{other} after {:?}",
        t0.elapsed()
    );
    let (seen, failed) = lab.spread(VIP4, 10);
    assert_eq!((seen, failed), (vec![format!("node-{other}")], 0));
}
