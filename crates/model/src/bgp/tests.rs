//! The `bgp:` section's decoding and errors, and the route decision as replayed sequences.

use super::*;
use crate::config::{Environment, parse};
use crate::state::{BackendKey, Health, VipOwnership};

/// A two-node cluster (n1 is this node, n2 its peer).
macro_rules! cluster { () => { "cluster:\n  bind: 192.0.2.10:7946\n  peers: [{name: n2, address: \"192.0.2.11:7946\"}]\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n" } }

const NODE: &str = concat!(
    "node:\n  name: n1\n  interfaces:\n    - name: eth0\n      addresses: [192.0.2.10/24, 2001:db8::10/64]\n",
    cluster!()
);

const CLUSTER: &str = cluster!();

const BGP: &str =
    "bgp:\n  asn: 64512\n  peers:\n    - {name: tor1, address: 192.0.2.1, asn: 64500}\n";

fn cfg(src: &str) -> Config {
    parse(src, &Environment::default()).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn errors(src: &str) -> Vec<String> {
    match parse(src, &Environment::default()) {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn service(extra: &str) -> String {
    format!(
        "services:\n  - name: web\n    vips: [198.51.100.7, 2001:db8:1::7]\n    ports: [{{port: 80}}]\n    backends:\n      - {{name: a, address: 10.0.0.1, node: n1}}\n      - {{name: b, address: 10.0.0.2, node: n2}}\n{extra}"
    )
}

#[test]
fn defaults_fill_in_and_the_effective_config_reads_back() {
    let c = cfg(&format!("{NODE}{BGP}{}", service("    announce: bgp\n")));
    let b = c.bgp.as_ref().unwrap();
    assert_eq!(b.asn, 64512);
    assert_eq!(
        b.router_id,
        Some(Ipv4Addr::new(192, 0, 2, 10)),
        "first IPv4 of node"
    );
    assert_eq!(b.graceful_stop_grace, Duration::from_secs(2));
    assert!(b.ecmp_rescue, "the ECMP rescue is on by default");
    let p = &b.peers[0];
    assert_eq!((p.port, p.asn, p.passive), (179, 64500, false));
    assert_eq!(p.hold_time, Duration::from_secs(90));
    assert_eq!(p.graceful_restart, Some(Duration::from_secs(120)));
    assert_eq!((p.bfd, p.multihop, p.source), (None, None, None));
    assert_eq!(c.services[0].announce, AnnounceMode::Bgp);
    let printed = crate::config::to_yaml(&c);
    // the keys are secret: never printed
    let back = printed.replace(
        "cluster:\n",
        "cluster:\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n",
    );
    assert_eq!(cfg(&back), c, "{printed}");
}

#[test]
fn every_field_is_read() {
    let dir = std::env::temp_dir().join(format!("portico-bgp-pw-{}", std::process::id()));
    std::fs::write(&dir, "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).unwrap();
    let src = format!(
        "{NODE}bgp:\n  asn: 4200000000\n  router_id: 10.9.9.9\n  graceful_stop_grace: 500ms\n  ecmp_rescue: false\n  peers:\n    - name: tor1\n      address: 192.0.2.1\n      asn: 64500\n      local_asn: 65001\n      port: 1179\n      source: 192.0.2.10\n      password_file: {}\n      hold_time: 9s\n      passive: true\n      multihop: 2\n      bfd: {{interval: 50ms, multiplier: 4}}\n      graceful_restart: off\n    - {{name: tor2, address: 2001:db8::1, asn: 64500, bfd: fast}}\n{}",
        dir.display(),
        service(
            "    announce: both\n    bgp: {owner_only: true, communities: [\"64512:100\"], large_communities: [\"64512:1:2\"], local_pref: 200, med: 10, aggregation_length: 24, aggregation_length_v6: 64, peers: [tor2]}\n"
        )
    );
    let c = cfg(&src);
    let _ = std::fs::remove_file(&dir);
    let b = c.bgp.as_ref().unwrap();
    assert_eq!(b.asn, 4_200_000_000);
    assert_eq!(b.router_id, Some(Ipv4Addr::new(10, 9, 9, 9)));
    assert_eq!(b.graceful_stop_grace, Duration::from_millis(500));
    assert!(!b.ecmp_rescue);
    let p = &b.peers[0];
    assert_eq!(p.port, 1179);
    assert_eq!(p.source, Some("192.0.2.10".parse().unwrap()));
    assert_eq!(p.password.as_ref().unwrap().0, "s3cret");
    assert_eq!(p.hold_time, Duration::from_secs(9));
    assert!(p.passive);
    assert_eq!(p.multihop, Some(2));
    assert_eq!(
        p.bfd,
        Some(BfdProfile {
            interval: Duration::from_millis(50),
            multiplier: 4
        })
    );
    assert_eq!(p.graceful_restart, None);
    assert_eq!(b.peers[1].bfd, Some(BfdProfile::FAST));
    let s = &c.services[0];
    assert_eq!(s.announce, AnnounceMode::Both);
    assert_eq!(
        s.bgp,
        ServiceBgp {
            owner_only: true,
            communities: vec![Community(64512 << 16 | 100)],
            large_communities: vec![LargeCommunity([64512, 1, 2])],
            local_pref: Some(200),
            med: Some(10),
            aggregation_length: Some(24),
            aggregation_length_v6: Some(64),
            peers: vec!["tor2".into()],
        }
    );
    assert_eq!(b.peers[0].local_asn, Some(65001));
    assert_eq!(b.peers[1].local_asn, None, "bgp.asn");
    let printed = crate::config::to_yaml(&c);
    assert!(
        printed.contains("64512:100") && printed.contains("64512:1:2"),
        "{printed}"
    );
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn mistakes_are_reported_at_their_field() {
    let got = errors(&format!("{NODE}{}", service("    announce: bgp\n")));
    assert_eq!(
        got,
        vec![
            "services[0].announce: announce: bgp needs a top-level bgp: section (asn and peers) (line 11, column 5)"
        ]
    );
    let got = errors(&format!(
        "{NODE}bgp:\n  asn: 0\n  peers:\n    - {{name: tor1, address: 192.0.2.1, asn: 64500, local_asn: 0, hold_time: 1s, bfd: slow, multihop: 0, source: 2001:db8::10}}\n    - {{name: tor1, address: 192.0.2.1}}\n{}",
        service(
            "    announce: bgpp\n    bgp: {communities: [\"70000:1\"], large_communities: [\"1:2\"], aggregation_length: 33, aggregation_length_v6: 129}\n"
        )
    ));
    let want = [
        "bgp.asn: 0 is out of range 1-4294967295",
        "bgp.peers[0].local_asn: 0 is out of range 1-4294967295",
        "bgp.peers[0].hold_time: 1s is too short",
        "bgp.peers[0].bfd: `slow` is not valid",
        "bgp.peers[0].multihop: 0 is out of range 1-255",
        "bgp.peers[0].source: source 2001:db8::10 and address 192.0.2.1 are of different families",
        "bgp.peers[1].asn: missing required field",
        "services[0].announce: `bgpp` is not valid (did you mean `bgp`?)",
        "services[0].bgp.communities[0]: `70000:1` is not a community",
        "services[0].bgp.large_communities[0]: `1:2` is not a large community",
        "services[0].bgp.aggregation_length: 33 is out of range 0-32",
        "services[0].bgp.aggregation_length_v6: 129 is out of range 0-128",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "missing {w:?} in {got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[test]
fn a_service_names_only_configured_peers() {
    let got = errors(&format!(
        "{NODE}{BGP}{}",
        service("    announce: bgp\n    bgp: {peers: [tor1, tor9]}\n")
    ));
    assert_eq!(
        got,
        vec![
            "services[0].bgp.peers[1]: no peer `tor9` in bgp.peers; name one of: tor1 (line 15, column 5)"
        ]
    );
    let c = cfg(&format!(
        "{NODE}{BGP}{}",
        service("    announce: bgp\n    bgp: {peers: [tor1]}\n")
    ));
    assert_eq!(c.services[0].bgp.peers, vec!["tor1".to_string()]);
    let printed = crate::config::to_yaml(&c);
    assert!(printed.contains("    peers:\n    - tor1\n"), "{printed}");
}

#[test]
fn cross_field_rules() {
    let got = errors(&format!(
        "node: {{name: n1}}\n{BGP}{}",
        service("    announce: bgp\n    bgp: {owner_only: true}\n")
    ));
    assert!(
        got.iter()
            .any(|g| g.starts_with("bgp.router_id: no IPv4 address")),
        "{got:#?}"
    );
    // owner_only without L2: the agent elects the owner, nobody answers ARP
    assert!(
        !got.iter()
            .any(|g| g.starts_with("services[0].bgp.owner_only")),
        "{got:#?}"
    );
    let got = errors(&format!(
        "node: {{name: n1}}\nbgp:\n  asn: 1\n  router_id: 10.0.0.1\n  peers:\n    - {{name: a, address: 192.0.2.1, asn: 2}}\n    - {{name: a, address: 192.0.2.1, asn: 2}}\n{}",
        service("    bgp: {med: 1}\n")
    ));
    assert!(
        got.iter()
            .any(|g| g.starts_with("bgp.peers[1].name: peer `a` appears twice")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|g| g.starts_with("bgp.peers[1].address: 192.0.2.1 is configured twice")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|g| g.starts_with("services[0].bgp: bgp settings apply to announce: bgp or both")),
        "{got:#?}"
    );
}

#[test]
fn a_bgp_only_vip_needs_no_interface_of_its_family() {
    let src = format!(
        "node:\n  name: n1\n  interfaces:\n    - name: eth0\n      addresses: [192.0.2.10/24]\n{CLUSTER}{BGP}{}",
        service("    announce: bgp\n")
    );
    cfg(&src);
    let l2 = src.replace("announce: bgp", "announce: both");
    assert!(errors(&l2)[0].contains("no interface in node.interfaces"));
}

#[test]
fn a_world_readable_password_file_is_refused() {
    let path = std::env::temp_dir().join(format!("portico-bgp-pw-open-{}", std::process::id()));
    std::fs::write(&path, "pw").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let got = errors(&format!(
        "{NODE}bgp:\n  asn: 1\n  peers:\n    - {{name: a, address: 192.0.2.1, asn: 2, password_file: {}}}\n",
        path.display()
    ));
    let _ = std::fs::remove_file(&path);
    assert!(
        got[0].starts_with("bgp.peers[0].password_file:")
            && got[0].contains("readable by every user"),
        "{got:?}"
    );
}

#[test]
fn bgp_settings_reload_live() {
    let a = cfg(&format!("{NODE}{BGP}{}", service("    announce: bgp\n")));
    let b = cfg(&format!(
        "{NODE}bgp:\n  asn: 64513\n  router_id: 10.1.1.1\n  peers:\n    - {{name: tor9, address: 192.0.2.9, asn: 64500}}\n{}",
        service("    announce: both\n")
    ));
    assert!(crate::reload::needs_restart(&a, &b).is_empty());
    let c = cfg(&format!("{NODE}{}", service("")));
    assert!(crate::reload::needs_restart(&a, &c).is_empty());
    assert!(crate::reload::needs_restart(&c, &a).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The route decision
// ---------------------------------------------------------------------------------------------

fn me() -> NodeId {
    "n1".into()
}

fn health(a: Health, b: Health) -> HealthView {
    HealthView::from([
        (BackendKey::new("web", "a"), a),
        (BackendKey::new("web", "b"), b),
    ])
}

fn words(d: &RouteDecisions) -> Vec<(String, &'static str)> {
    d.iter()
        .map(|(v, d)| (v.to_string(), d.reason.as_str()))
        .collect()
}

fn all(d: &RouteDecisions, word: &str) -> bool {
    !d.is_empty() && d.values().all(|r| r.reason.as_str() == word)
}

#[test]
fn every_serving_node_announces_and_withdraws_when_its_backends_fail() {
    let c = cfg(&format!("{NODE}{BGP}{}", service("    announce: bgp\n")));
    let own = OwnershipView::new();
    // a sequence as the health checker publishes it
    let steps = [
        (health(Health::Unknown, Health::Unknown), "announced"),
        (health(Health::Up, Health::Down), "announced"),
        (health(Health::Down, Health::Up), "announced"),
        (health(Health::Down, Health::Down), "noHealthyBackend"),
        (health(Health::Up, Health::Down), "announced"),
    ];
    for (i, (h, want)) in steps.iter().enumerate() {
        let d = decide(&c, &me(), h, &own, false);
        assert!(all(&d, want), "step {i}: {:?}", words(&d));
        assert_eq!(d.len(), 2, "both VIPs (v4 and v6)");
    }
    // the graceful stop withdraws everything whatever the health
    let d = decide(&c, &me(), &health(Health::Up, Health::Up), &own, true);
    assert!(all(&d, "stopping"), "{:?}", words(&d));
    assert!(d.values().all(|r| !r.announced()));
}

#[test]
fn a_drained_backend_does_not_count() {
    let c = cfg(&format!(
        "{NODE}{BGP}services:\n  - name: web\n    vips: [198.51.100.7]\n    ports: [{{port: 80}}]\n    announce: bgp\n    backends:\n      - {{name: a, address: 10.0.0.1, weight: 0}}\n      - {{name: b, address: 10.0.0.2}}\n"
    ));
    let h = HealthView::from([(BackendKey::new("web", "b"), Health::Down)]);
    let d = decide(&c, &me(), &h, &OwnershipView::new(), false);
    assert!(all(&d, "noHealthyBackend"), "{:?}", words(&d));
}

#[test]
fn placement_local_only_and_withdrawn() {
    let base = format!("{NODE}{BGP}");
    let c = cfg(&format!(
        "{base}{}",
        service("    announce: bgp\n    placement: {nodes: [n2]}\n")
    ));
    let own = OwnershipView::new();
    let up = health(Health::Up, Health::Up);
    assert!(all(&decide(&c, &me(), &up, &own, false), "notSelected"));
    let c = cfg(&format!(
        "{base}{}",
        service("    announce: bgp\n    placement: {local_only: true}\n")
    ));
    // a: n1's backend; unknown is not enough for local-only (as for L2 eligibility)
    for (h, want) in [
        (health(Health::Unknown, Health::Up), "noHealthyLocalBackend"),
        (health(Health::Up, Health::Down), "announced"),
        (health(Health::Down, Health::Up), "noHealthyLocalBackend"),
    ] {
        let d = decide(&c, &me(), &h, &own, false);
        assert!(all(&d, want), "{want}: {:?}", words(&d));
    }
    let mut c = cfg(&format!("{base}{}", service("    announce: bgp\n")));
    c.services[0].placement.withdrawn = true;
    assert!(all(
        &decide(&c, &me(), &up, &own, false),
        "noHealthyEndpoints"
    ));
}

#[test]
fn owner_only_follows_the_l2_owner() {
    let c = cfg(&format!(
        "{NODE}{BGP}{}",
        service("    announce: both\n    bgp: {owner_only: true, local_pref: 50}\n")
    ));
    let up = health(Health::Up, Health::Up);
    let v4: IpAddr = "198.51.100.7".parse().unwrap();
    let v6: IpAddr = "2001:db8:1::7".parse().unwrap();
    let owned = |by: Option<&str>| VipOwnership {
        owner: by.map(str::to_string),
        reason: if by == Some("n1") {
            "owner"
        } else {
            "notOwner"
        }
        .into(),
    };
    let own = OwnershipView::from([(v4, owned(Some("n1"))), (v6, owned(Some("n2")))]);
    let d = decide(&c, &me(), &up, &own, false);
    assert_eq!(
        words(&d),
        vec![
            ("198.51.100.7".to_string(), "announced"),
            ("2001:db8:1::7".to_string(), "notOwner")
        ]
    );
    assert_eq!(d[&v4].attrs.local_pref, Some(50));
    // the owner moves: the route follows
    let own = OwnershipView::from([(v4, owned(Some("n2"))), (v6, owned(Some("n1")))]);
    let d = decide(&c, &me(), &up, &own, false);
    assert!(!d[&v4].announced() && d[&v6].announced());
    // no decision yet: not announced
    let d = decide(&c, &me(), &up, &OwnershipView::new(), false);
    assert!(all(&d, "notOwner"));
}

#[test]
fn l2_services_are_neither_routed_nor_hidden_from_the_agent() {
    let c = cfg(&format!(
        "{NODE}{BGP}services:\n  - {{name: l2, vips: [192.0.2.50], ports: [{{port: 80}}], backends: [{{address: 10.0.0.1}}]}}\n  - {{name: r, vips: [198.51.100.8], ports: [{{port: 80}}], backends: [{{address: 10.0.0.1}}], announce: bgp}}\n  - {{name: both, vips: [192.0.2.51], ports: [{{port: 80}}], backends: [{{address: 10.0.0.1}}], announce: both}}\n  - {{name: one, vips: [198.51.100.9], ports: [{{port: 80}}], backends: [{{address: 10.0.0.1}}], announce: bgp, bgp: {{owner_only: true}}}}\n"
    ));
    let d = decide(&c, &me(), &HealthView::new(), &OwnershipView::new(), false);
    let vips: Vec<String> = d.keys().map(ToString::to_string).collect();
    assert_eq!(vips, ["192.0.2.51", "198.51.100.8", "198.51.100.9"]);
    // the agent sees `one` too: it elects its owner (and its announcers skip it)
    let names: Vec<String> = l2_view(&c).services.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["l2", "both", "one"]);
}

#[test]
fn the_announced_prefix_is_the_vip_masked_to_the_aggregation_length() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let host = ServiceBgp::default();
    assert_eq!(
        announced_prefix(ip("198.51.100.7"), &host),
        (ip("198.51.100.7"), 32)
    );
    assert_eq!(
        announced_prefix(ip("2001:db8:1::7"), &host),
        (ip("2001:db8:1::7"), 128)
    );
    let agg = ServiceBgp {
        aggregation_length: Some(24),
        aggregation_length_v6: Some(64),
        ..ServiceBgp::default()
    };
    // two VIPs of one /24 make one route; the v6 length applies to v6 only
    assert_eq!(
        announced_prefix(ip("198.51.100.7"), &agg),
        (ip("198.51.100.0"), 24)
    );
    assert_eq!(
        announced_prefix(ip("198.51.100.200"), &agg),
        (ip("198.51.100.0"), 24)
    );
    assert_eq!(
        announced_prefix(ip("2001:db8:1::7"), &agg),
        (ip("2001:db8:1::"), 64)
    );
    let zero = ServiceBgp {
        aggregation_length: Some(0),
        aggregation_length_v6: Some(0),
        ..ServiceBgp::default()
    };
    assert_eq!(
        announced_prefix(ip("198.51.100.7"), &zero),
        (ip("0.0.0.0"), 0)
    );
    assert_eq!(announced_prefix(ip("2001:db8::1"), &zero), (ip("::"), 0));
    // out-of-range lengths (refused by validation) clamp instead of panicking
    let big = ServiceBgp {
        aggregation_length: Some(200),
        aggregation_length_v6: Some(200),
        ..ServiceBgp::default()
    };
    assert_eq!(
        announced_prefix(ip("198.51.100.7"), &big),
        (ip("198.51.100.7"), 32)
    );
}
