//! The whole speaker against FRR (`zebra`, `bgpd`, `bfdd` from Debian's frr) in network
//! namespaces this test creates: the router namespace runs the three daemons (`maximum-paths
//! 8`), two node namespaces each run a `Speaker`. Checked in FRR's RIB (`vtysh -c 'show ip bgp'`)
//! and in the router's kernel FIB as zebra installed it:
//!
//! - both nodes announce the same /32: one route with two `nexthop via` (ECMP through zebra);
//! - an IPv6 session announces a /128 with the node's IPv6 next hop;
//! - node b's session uses a TCP MD5 password (a wrong one never connects, and the status says
//!   what that looks like); graceful restart keeps its next hop while its speaker is dead (FRR
//!   as the helper);
//! - BFD with FRR's bfdd (100 ms × 3): a node that falls silent (its packets dropped, the link
//!   up) leaves the FIB within the detection time (measured and printed).
//!
//! Root only; locally it skips without root, FRR or nft, in CI (`PORTICO_CI`) it fails.
//! Namespaces, links, the daemons and the speakers' threads are removed at the end, also on
//! failure.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use bgp::speaker::{BfdTimers, RouteAttrs, Routes};
use common::{Lab, Node, have, peer, poll, run, silence, vip};

const FRR: &str = "/usr/lib/frr";

fn vtysh(lab: &Lab, cmd: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.ns("r"), "vtysh", "--vty_socket"])
        .arg(&lab.dir)
        .args(["-c", cmd])
        .output()
        .expect("vtysh runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn frr_gets_ecmp_ipv6_md5_and_bfd_from_the_speaker() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces)");
        return;
    }
    if !std::path::Path::new(&format!("{FRR}/bgpd")).exists() || !have("vtysh") || !have("nft") {
        sys::skip_test("needs frr (zebra, bgpd, bfdd, vtysh) and nft");
        return;
    }
    let mut lab = Lab::new("frr");
    let dir = lab.dir.clone();
    let (r, a, b) = (lab.ns("r"), lab.ns("a"), lab.ns("b"));
    // The daemons drop to user frr: the directory must be theirs to write in.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let confs = [
        ("zebra", "hostname r\n".to_string()),
        (
            "bfdd",
            "bfd\n profile fast\n  transmit-interval 100\n  receive-interval 100\n  detect-multiplier 3\n !\n!\n"
                .to_string(),
        ),
        (
            "bgpd",
            "router bgp 65001
 bgp router-id 10.98.0.1
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor 10.98.1.2 remote-as 65002
 neighbor 10.98.1.2 bfd profile fast
 neighbor 10.98.2.2 remote-as 65002
 neighbor 10.98.2.2 password s3cret
 neighbor fd98:1::2 remote-as 65002
 address-family ipv4 unicast
  maximum-paths 8
 exit-address-family
 address-family ipv6 unicast
  neighbor fd98:1::2 activate
  maximum-paths 8
 exit-address-family
!
"
            .to_string(),
        ),
    ];
    for (d, conf) in &confs {
        let path = dir.join(format!("{d}.conf"));
        std::fs::write(&path, conf).expect("config");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    for (d, _) in &confs {
        let pid = dir.join(format!("{d}.pid"));
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            r.clone(),
            format!("{FRR}/{d}"),
            "-d".into(),
            "-i".into(),
            pid.display().to_string(),
            "-z".into(),
            dir.join("zserv.api").display().to_string(),
            "--vty_socket".into(),
            dir.display().to_string(),
            "-u".into(),
            "frr".into(),
            "-g".into(),
            "frr".into(),
            "-f".into(),
            dir.join(format!("{d}.conf")).display().to_string(),
            "--log".into(),
            format!("file:{}", dir.join(format!("{d}.log")).display()),
        ];
        if *d == "bfdd" {
            args.push("--bfdctl".into());
            args.push(dir.join("bfdd.sock").display().to_string());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run("ip", &argv);
        lab.pid_files.push(pid.clone());
        poll(Duration::from_secs(10), &format!("{d} started"), || {
            pid.exists()
        });
    }

    let routes: Routes = [
        (vip("198.51.100.7"), RouteAttrs::default()),
        (vip("2001:db8:100::7"), RouteAttrs::default()),
    ]
    .into();
    let mut pa = peer("a", "10.98.1.1", "10.98.1.2");
    pa.bfd = Some(BfdTimers {
        interval: Duration::from_millis(100),
        multiplier: 3,
    });
    let pa6 = peer("a6", "fd98:1::1", "fd98:1::2");
    // A wrong password: the router's kernel drops our SYNs; the status says what that looks
    // like.
    common::wrong_password_is_reported(&b, "10.98.2.1", "10.98.2.2", routes.clone());

    let mut pb = peer("b", "10.98.2.1", "10.98.2.2");
    pb.password = Some("s3cret".into());
    let node_a = Node::start(&a, vec![pa, pa6], routes.clone(), Duration::from_secs(2));
    let node_b = Node::start(&b, vec![pb.clone()], routes.clone(), Duration::from_secs(2));

    let took = poll(Duration::from_secs(60), "two next hops in the FIB", || {
        let s = lab.route(false, "198.51.100.7");
        s.contains("nexthop via 10.98.1.2") && s.contains("nexthop via 10.98.2.2")
    });
    println!(
        "FRR: ECMP route in the FIB {took:?} after the speakers started:\n{}",
        lab.route(false, "198.51.100.7")
    );
    let rib = vtysh(&lab, "show ip bgp 198.51.100.7/32");
    assert!(rib.contains("multipath"), "{rib}");
    poll(Duration::from_secs(30), "the IPv6 route", || {
        lab.route(true, "2001:db8:100::7").contains("fd98:1::2")
    });
    poll(Duration::from_secs(10), "BFD up with bfdd", || {
        node_a.session("a").bfd == Some("up")
    });
    println!("{}", vtysh(&lab, "show bfd peers brief"));
    assert!(node_b.session("b").state == "established");

    // Graceful restart (FRR is a helper by default): B dies without a NOTIFICATION, its next
    // hop stays in the FIB, and the session comes back.
    node_b.crash();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.route(false, "198.51.100.7").contains("10.98.2.2"),
        "B's next hop stays during the restart time:\n{}",
        lab.route(false, "198.51.100.7")
    );
    let node_b = Node::start(&b, vec![pb], routes, Duration::from_secs(2));
    poll(Duration::from_secs(30), "B back", || {
        node_b.session("b").state == "established"
    });

    silence(&a);
    let gone = poll(
        Duration::from_secs(5),
        "A's next hop out of the FIB",
        || !lab.route(false, "198.51.100.7").contains("10.98.1.2"),
    );
    println!(
        "FRR bfdd 100 ms x 3: A's next hop left the router's FIB {gone:?} after A fell silent:\n{}",
        lab.route(false, "198.51.100.7")
    );
    assert!(
        gone < Duration::from_millis(1000),
        "{gone:?} (detection time 300 ms)"
    );
    assert!(lab.route(false, "198.51.100.7").contains("10.98.2.2"));
    drop(node_a);
    drop(node_b);
}
