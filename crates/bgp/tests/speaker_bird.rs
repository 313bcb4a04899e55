//! The whole speaker (real TCP, TCP MD5, BFD over UDP) against BIRD 2 in network namespaces
//! this test creates: a router namespace running BIRD with its kernel protocol (`merge paths`)
//! and two node namespaces, each running a `Speaker` on its own thread. Checked in the router's
//! kernel FIB (`ip route`), not only in BIRD's RIB:
//!
//! - both nodes announce the same /32: one route with two `nexthop via` (ECMP);
//! - an IPv6 session announces a /128 with the node's IPv6 next hop;
//! - a wrong MD5 password never connects, and the status says what it looks like;
//! - graceful restart: a node's speaker dies without a NOTIFICATION, its next hop stays in the
//!   FIB, and the session comes back when it restarts;
//! - BFD (100 ms × 3): a node that falls silent (its packets dropped by nftables, the link stays
//!   up so the kernel does not remove the route by itself) leaves the FIB within the detection
//!   time (measured and printed).
//!
//! Root only; locally it skips without root, BIRD or nft, in CI (`PORTICO_CI`) it fails.
//! Namespaces, links, BIRD and the speakers' threads are removed at the end, also on failure.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bgp::speaker::{BfdTimers, RouteAttrs, Routes};
use common::{Lab, Node, have, peer, poll, silence, vip};
use tokio::time::Instant;

#[test]
fn bird_gets_ecmp_ipv6_md5_graceful_restart_and_bfd_from_the_speaker() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces)");
        return;
    }
    if !have("bird") || !have("birdc") || !have("nft") {
        sys::skip_test("needs bird, birdc (Debian bird2) and nft");
        return;
    }
    let mut lab = Lab::new("bird");
    let dir = lab.dir.clone();
    let (r, a, b) = (lab.ns("r"), lab.ns("a"), lab.ns("b"));
    std::fs::write(
        dir.join("bird.conf"),
        format!(
            r#"router id 10.98.0.1;
log "{log}" all;
protocol device {{ }}
protocol direct {{ ipv4; ipv6; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ export where source = RTS_BGP; }}; merge paths on; }}
protocol bfd {{ interface "*" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}
template bgp node {{ local as 65001; hold time 9; graceful restart on; ipv4 {{ import all; export none; }}; ipv6 {{ import all; export none; }}; }}
protocol bgp a from node {{ local 10.98.1.1; neighbor 10.98.1.2 as 65002; bfd on; }}
protocol bgp a6 from node {{ local fd98:1::1; neighbor fd98:1::2 as 65002; }}
protocol bgp b from node {{ local 10.98.2.1; neighbor 10.98.2.2 as 65002; password "s3cret"; }}
"#,
            log = dir.join("bird.log").display()
        ),
    )
    .expect("config");
    lab.children.push(
        Command::new("ip")
            .args(["netns", "exec", &r, "bird", "-f", "-c"])
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird starts"),
    );
    let route = |_: &str, v6: bool, p: &str| lab.route(v6, p);
    let routes: Routes = [
        (vip("198.51.100.7"), RouteAttrs::default()),
        (vip("2001:db8:100::7"), RouteAttrs::default()),
    ]
    .into();

    // A wrong password: the router's kernel drops our SYNs; the status says what that looks
    // like.
    common::wrong_password_is_reported(&b, "10.98.2.1", "10.98.2.2", routes.clone());
    assert!(!route(&r, false, "198.51.100.7").contains("10.98.2.2"));

    let mut pa = peer("a", "10.98.1.1", "10.98.1.2");
    pa.bfd = Some(BfdTimers {
        interval: Duration::from_millis(100),
        multiplier: 3,
    });
    let pa6 = peer("a6", "fd98:1::1", "fd98:1::2");
    let mut pb = peer("b", "10.98.2.1", "10.98.2.2");
    pb.password = Some("s3cret".into());
    let node_a = Node::start(&a, vec![pa, pa6], routes.clone(), Duration::from_secs(2));
    let node_b = Node::start(&b, vec![pb.clone()], routes.clone(), Duration::from_secs(2));

    // ECMP in the router's FIB: one /32, two next hops.
    let took = poll(Duration::from_secs(30), "two next hops in the FIB", || {
        let s = route(&r, false, "198.51.100.7");
        s.contains("nexthop via 10.98.1.2") && s.contains("nexthop via 10.98.2.2")
    });
    println!(
        "ECMP route after {took:?}:\n{}",
        route(&r, false, "198.51.100.7")
    );
    poll(Duration::from_secs(10), "the IPv6 route", || {
        route(&r, true, "2001:db8:100::7").contains("via fd98:1::2")
    });
    poll(Duration::from_secs(5), "in sync", || {
        node_a.speaker.in_sync() && node_b.speaker.in_sync()
    });
    poll(Duration::from_secs(10), "BFD up with BIRD", || {
        node_a.session("a").bfd == Some("up")
    });
    assert_eq!(node_b.session("b").prefixes_sent, 1, "IPv4 only over IPv4");

    // Graceful restart: B dies without a NOTIFICATION; BIRD keeps its next hop (stale).
    node_b.crash();
    let crashed = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        route(&r, false, "198.51.100.7").contains("10.98.2.2"),
        "the next hop stays during the restart time:\n{}",
        route(&r, false, "198.51.100.7")
    );
    let node_b = Node::start(&b, vec![pb], routes.clone(), Duration::from_secs(2));
    poll(Duration::from_secs(30), "B back", || {
        node_b.session("b").state == "established"
    });
    assert!(route(&r, false, "198.51.100.7").contains("nexthop via 10.98.2.2"));
    println!(
        "graceful restart: next hop kept for the {:?} B was away",
        crashed.elapsed()
    );

    // BFD: A falls silent (everything it sends dropped, the link stays up).
    silence(&a);
    let gone = poll(
        Duration::from_secs(5),
        "A's next hop out of the FIB",
        || !route(&r, false, "198.51.100.7").contains("10.98.1.2"),
    );
    println!(
        "BFD 100 ms x 3: A's next hop left the router's FIB {gone:?} after A fell silent:\n{}",
        route(&r, false, "198.51.100.7")
    );
    assert!(
        gone < Duration::from_millis(1000),
        "{gone:?} (detection time 300 ms)"
    );
    assert!(route(&r, false, "198.51.100.7").contains("10.98.2.2"));
    drop(node_a);
    drop(node_b);
}
