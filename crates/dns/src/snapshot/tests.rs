//! Tests of the snapshot builder: which addresses each service publishes, and where names fall.

use std::net::IpAddr;

use super::*;
use crate::testutil::{config, health_down, unowned};

fn status_of<'a>(s: &'a Snapshot, service: &str) -> &'a DnsNameStatus {
    s.status()
        .iter()
        .find(|x| x.service == service)
        .expect("service status")
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().expect("ip")).collect()
}

#[test]
fn all_healthy() {
    let c = config();
    let s = Snapshot::build(1, &c, &HealthView::new(), &OwnershipView::new());
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    let web = status_of(&s, "web");
    assert_eq!(web.name, "web.lb.example.com.");
    assert_eq!(web.state, DnsAnswerState::Healthy);
    assert_eq!(
        web.addresses,
        ips(&["192.0.2.1", "192.0.2.2", "2001:db8::1"])
    );
    assert_eq!(web.ttl, 5);
    let db = status_of(&s, "db");
    assert_eq!(db.mode, DnsMode::Nodes);
    assert_eq!(
        db.addresses,
        ips(&["10.0.2.1", "10.0.2.2", "2001:db8::2:3"])
    );
    assert_eq!(db.ttl, 30);
    assert_eq!(status_of(&s, "api").name, "www.other.test.");
    assert!(s.status().iter().all(|x| x.service != "hidden"));
}

#[test]
fn vips_need_an_owner_and_a_serving_backend() {
    let c = config();
    let s = Snapshot::build(1, &c, &HealthView::new(), &unowned(&["192.0.2.2"]));
    assert_eq!(
        status_of(&s, "web").addresses,
        ips(&["192.0.2.1", "2001:db8::1"])
    );
    // One backend down: still serving.
    let s = Snapshot::build(1, &c, &health_down(&[("web", "b1")]), &OwnershipView::new());
    assert_eq!(status_of(&s, "web").addresses.len(), 3);
    // Both down: nothing healthy, fail open answers every VIP.
    let s = Snapshot::build(
        1,
        &c,
        &health_down(&[("web", "b1"), ("web", "b2")]),
        &OwnershipView::new(),
    );
    let web = status_of(&s, "web");
    assert_eq!(web.state, DnsAnswerState::FailOpen);
    assert_eq!(web.addresses.len(), 3);
    // No VIP owned: fail open as well.
    let s = Snapshot::build(
        1,
        &c,
        &HealthView::new(),
        &unowned(&["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
    );
    assert_eq!(status_of(&s, "web").state, DnsAnswerState::FailOpen);
}

#[test]
fn node_mode_follows_backend_health_and_fails_closed() {
    let c = config();
    let s = Snapshot::build(1, &c, &health_down(&[("db", "n2")]), &OwnershipView::new());
    assert_eq!(
        status_of(&s, "db").addresses,
        ips(&["10.0.2.1", "2001:db8::2:3"])
    );
    let s = Snapshot::build(
        1,
        &c,
        &health_down(&[("db", "n1"), ("db", "n2"), ("db", "n3")]),
        &OwnershipView::new(),
    );
    let db = status_of(&s, "db");
    assert_eq!(db.state, DnsAnswerState::FailClosed);
    assert!(db.addresses.is_empty());
    // The name still exists: A gets NODATA, not NXDOMAIN.
    let Lookup::Name(e) = s.lookup(&name_to_wire("db.lb.example.com").expect("name")) else {
        panic!("db must exist")
    };
    assert_eq!(e.answer(rtype::A).ancount, 0);
    assert_eq!(e.answer(rtype::A).nscount, 1);
}

#[test]
fn drained_backends_do_not_count() {
    let mut c = (*config()).clone();
    let db = c.services.iter_mut().find(|s| s.name == "db").expect("db");
    db.backends[0].weight = 0;
    let s = Snapshot::build(1, &c, &HealthView::new(), &OwnershipView::new());
    assert_eq!(
        status_of(&s, "db").addresses,
        ips(&["10.0.2.2", "2001:db8::2:3"])
    );
}

#[test]
fn lookup_classifies_names() {
    let c = config();
    let s = Snapshot::build(1, &c, &HealthView::new(), &OwnershipView::new());
    let look = |n: &str| s.lookup(&name_to_wire(n).expect("name"));
    for existing in [
        "lb.example.com",
        "web.lb.example.com",
        "_http._tcp.web.lb.example.com",
        "_dns._udp.web.lb.example.com",
        "_tcp.web.lb.example.com",
        "_udp.web.lb.example.com",
        "other.test",
        "www.other.test",
        "_https._tcp.www.other.test",
    ] {
        assert!(matches!(look(existing), Lookup::Name(_)), "{existing}");
    }
    match look("nope.web.lb.example.com") {
        Lookup::NxDomain(z, at) => {
            assert_eq!(&*z.apex, &name_to_wire("lb.example.com").expect("name")[..]);
            assert_eq!(at, 9);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        look("hidden.lb.example.com"),
        Lookup::NxDomain(..)
    ));
    assert!(matches!(look("example.com"), Lookup::Refused));
    assert!(matches!(look("."), Lookup::Refused));
    assert!(matches!(look("lb.example.com.evil"), Lookup::Refused));
}

#[test]
fn colliding_hostnames_merge() {
    let mut c = (*config()).clone();
    let mut twin = c
        .services
        .iter()
        .find(|s| s.name == "api")
        .expect("api")
        .clone();
    twin.name = "api2".into();
    twin.vips = vec!["192.0.2.21".parse().expect("ip")];
    twin.dns.ttl = Some(std::time::Duration::from_secs(1));
    c.services.push(twin);
    let s = Snapshot::build(1, &c, &HealthView::new(), &OwnershipView::new());
    let Lookup::Name(e) = s.lookup(&name_to_wire("www.other.test").expect("name")) else {
        panic!("www exists")
    };
    let a = e.answer(rtype::A);
    assert_eq!(a.ancount, 2);
    // The lower TTL wins (bytes 6..10 of the first record).
    assert_eq!(&a.body[6..10], &1u32.to_be_bytes());
}

#[test]
fn no_dns_section_serves_nothing() {
    let mut c = (*config()).clone();
    c.dns = None;
    let s = Snapshot::build(3, &c, &HealthView::new(), &OwnershipView::new());
    assert_eq!(s.generation, 3);
    assert_eq!(s.name_count(), 0);
    assert!(matches!(
        s.lookup(&name_to_wire("web.lb.example.com").expect("name")),
        Lookup::Refused
    ));
}

#[test]
fn rotation_cycles_through_every_record() {
    let c = config();
    let s = Snapshot::build(1, &c, &HealthView::new(), &OwnershipView::new());
    let Lookup::Name(e) = s.lookup(&name_to_wire("big.lb.example.com").expect("name")) else {
        panic!("big exists")
    };
    let a = e.answer(rtype::A);
    assert_eq!(a.rotation, Some((16, 40)));
    let mut firsts = Vec::new();
    for _ in 0..40 {
        let mut out = Vec::new();
        a.write_body(&mut out);
        assert_eq!(out.len(), a.body.len());
        firsts.push(out[15]);
    }
    let want: Vec<u8> = (1..=40).collect();
    assert_eq!(firsts, want);
}

#[test]
fn fx_hasher_spreads_keys() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let b = BuildHasherDefault::<FxHasher>::default();
    let h1 = b.hash_one(&b"\x03web\x02lb\x00"[..]);
    let h2 = b.hash_one(&b"\x03wec\x02lb\x00"[..]);
    assert_ne!(h1, h2);
}
