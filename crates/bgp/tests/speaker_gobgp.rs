//! The whole speaker against GoBGP (`gobgpd` from Debian) in network namespaces this test
//! creates: node a connects to GoBGP (IPv4 and IPv6 sessions), node b is passive (the
//! speaker's own listener on port 179 in its namespace) and GoBGP connects to it with a TCP MD5
//! password. GoBGP's RIB (`gobgp global rib`) must show the /32 from both next hops and the
//! /128 from node a's IPv6 address, with the communities and MED the routes carry; a route
//! removed is withdrawn. Also against GoBGP:
//!
//! - a wrong MD5 password never connects, and the status says what that looks like;
//! - graceful restart (GoBGP as the helper): node a's speaker dies without a NOTIFICATION, its
//!   route stays in GoBGP's RIB while it is away, and the session comes back when it restarts.
//!
//! Root only; locally it skips without root or GoBGP, in CI (`PORTICO_CI`) it fails.
//! Namespaces, links, gobgpd and the speakers' threads are removed at the end, also on failure.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bgp::speaker::{RouteAttrs, Routes};
use common::{Lab, Node, have, peer, poll, vip};

fn gobgp(lab: &Lab, args: &[&str]) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.ns("r"), "gobgp", "-u", "127.0.0.1"])
        .args(args)
        .output()
        .expect("gobgp runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn gobgp_gets_routes_from_an_active_and_a_passive_md5_speaker() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces)");
        return;
    }
    if !have("gobgpd") || !have("gobgp") {
        sys::skip_test("needs gobgpd and gobgp (Debian gobgpd)");
        return;
    }
    let mut lab = Lab::new("gobgp");
    let dir = lab.dir.clone();
    let conf = dir.join("gobgpd.toml");
    std::fs::write(
        &conf,
        r#"[global.config]
  as = 65001
  router-id = "10.98.0.1"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.98.1.2"
    peer-as = 65002
  [neighbors.transport.config]
    passive-mode = true
  [neighbors.graceful-restart.config]
    enabled = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
[[neighbors]]
  [neighbors.config]
    neighbor-address = "fd98:1::2"
    peer-as = 65002
  [neighbors.transport.config]
    passive-mode = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.98.2.2"
    peer-as = 65002
    auth-password = "s3cret"
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"#,
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("gobgpd.log")).expect("log");
    lab.children.push(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("r"), "gobgpd", "-f"])
            .arg(&conf)
            .args(["-t", "toml"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("gobgpd starts"),
    );
    let attrs = RouteAttrs {
        communities: vec![(65002 << 16) | 100],
        large_communities: vec![[65002, 1, 2]],
        local_pref: None,
        med: Some(20),
        peers: None,
    };
    let routes: Routes = [
        (vip("198.51.100.7"), attrs.clone()),
        (vip("2001:db8:100::7"), attrs),
    ]
    .into();
    // A wrong password: GoBGP's kernel drops our SYNs; the status says what that looks like.
    common::wrong_password_is_reported(&lab.ns("b"), "10.98.2.1", "10.98.2.2", routes.clone());
    assert!(!gobgp(&lab, &["global", "rib", "-a", "ipv4"]).contains("10.98.2.2"));

    let pa = peer("a", "10.98.1.1", "10.98.1.2");
    let pa6 = peer("a6", "fd98:1::1", "fd98:1::2");
    let mut pb = peer("b", "10.98.2.1", "10.98.2.2");
    pb.passive = true;
    pb.password = Some("s3cret".into());
    let node_a = Node::start(
        &lab.ns("a"),
        vec![pa.clone(), pa6.clone()],
        routes.clone(),
        Duration::from_secs(2),
    );
    let node_b = Node::start(
        &lab.ns("b"),
        vec![pb],
        routes.clone(),
        Duration::from_secs(2),
    );
    let took = poll(Duration::from_secs(60), "both next hops in GoBGP", || {
        let rib = gobgp(&lab, &["global", "rib", "-a", "ipv4"]);
        rib.contains("10.98.1.2") && rib.contains("10.98.2.2")
    });
    let rib = gobgp(&lab, &["global", "rib", "-a", "ipv4"]);
    println!("GoBGP RIB {took:?} after the speakers started:\n{rib}");
    assert!(rib.contains("198.51.100.7/32"), "{rib}");
    assert!(rib.contains("65002:100"), "community: {rib}");
    assert!(rib.contains("Med: 20"), "MED: {rib}");
    assert!(rib.contains("65002:1:2"), "large community: {rib}");
    poll(Duration::from_secs(30), "the IPv6 route", || {
        gobgp(&lab, &["global", "rib", "-a", "ipv6"]).contains("fd98:1::2")
    });
    assert_eq!(node_b.session("b").state, "established");

    // Graceful restart: A dies without a NOTIFICATION; GoBGP keeps its route (stale).
    node_a.crash();
    let crashed = tokio::time::Instant::now();
    poll(Duration::from_secs(10), "GoBGP sees A's session go", || {
        !gobgp(&lab, &["neighbor"])
            .lines()
            .any(|l| l.contains("10.98.1.2") && l.contains("Establ"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let rib = gobgp(&lab, &["global", "rib", "-a", "ipv4"]);
    assert!(
        rib.contains("10.98.1.2"),
        "A's route stays during the restart time:\n{rib}\n{}",
        gobgp(&lab, &["neighbor"])
    );
    let node_a = Node::start(
        &lab.ns("a"),
        vec![pa, pa6],
        routes.clone(),
        Duration::from_secs(2),
    );
    poll(Duration::from_secs(30), "A back", || {
        node_a.session("a").state == "established"
    });
    poll(Duration::from_secs(10), "A's route in GoBGP", || {
        gobgp(&lab, &["global", "rib", "-a", "ipv4"]).contains("10.98.1.2")
    });
    println!(
        "graceful restart: A's route kept for the {:?} A was away",
        crashed.elapsed()
    );

    // A withdrawal reaches GoBGP.
    node_a.routes.send_replace(Arc::new(
        [(vip("2001:db8:100::7"), RouteAttrs::default())].into(),
    ));
    poll(Duration::from_secs(10), "a's /32 withdrawn", || {
        !gobgp(&lab, &["global", "rib", "-a", "ipv4"]).contains("10.98.1.2")
    });
    drop(node_a);
    drop(node_b);
}
