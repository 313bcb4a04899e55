//! Unit and property tests of the allocator.

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;

fn pool(name: &str, addresses: &[&str]) -> (String, Result<Pool, PoolError>) {
    let p = Pool {
        name: name.into(),
        ranges: addresses
            .iter()
            .map(|a| AddrRange::parse(a).unwrap())
            .collect(),
        auto_assign: true,
        avoid_buggy_ips: false,
        priority: None,
        namespaces: vec![],
        namespace_selectors: vec![],
        service_selectors: vec![],
        created: None,
    };
    (name.into(), Ok(p))
}

fn req(name: &str) -> Request {
    Request {
        service: ServiceKey::new("default", name),
        labels: Labels::new(),
        namespace_labels: Labels::new(),
        families: vec![Family::V4],
        require_all_families: true,
        addresses: vec![],
        pool: None,
        sharing_key: None,
        ports: vec![PortSpec {
            protocol: Protocol::Tcp,
            port: 80,
        }],
        count: 1,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port,
    }
}

#[test]
fn cidrs_and_ranges_parse_and_bad_ones_say_why() {
    assert_eq!(AddrRange::parse("192.0.2.0/30").unwrap().len(), 4);
    assert_eq!(
        AddrRange::parse("192.0.2.10 - 192.0.2.20").unwrap().len(),
        11
    );
    assert_eq!(AddrRange::parse("2001:db8::/120").unwrap().len(), 256);
    assert!(matches!(
        AddrRange::parse("192.0.2.0/33"),
        Err(PoolError::Address(..))
    ));
    assert!(
        matches!(AddrRange::parse("192.0.2.1/24"), Err(PoolError::Address(_, why)) if why.contains("host bits"))
    );
    assert!(
        matches!(AddrRange::parse("192.0.2.9-192.0.2.1"), Err(PoolError::Address(_, why)) if why.contains("after"))
    );
    assert!(
        matches!(AddrRange::parse("192.0.2.1-2001:db8::1"), Err(PoolError::Address(_, why)) if why.contains("families"))
    );
}

#[test]
fn pool_validation_names_the_bad_entry_by_index_and_value() {
    let p = |addrs: &[&str]| crate::fixtures::pool("p", addrs);
    let e = parse_pool(&p(&["192.0.2.0/28", "192.0.2.300/32"])).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("spec.addresses[1] `192.0.2.300/32` is invalid"),
        "{e}"
    );
    let e = parse_pool(&p(&[
        "192.0.2.0/28",
        "198.51.100.0/30",
        "192.0.2.8-192.0.2.20",
    ]))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.addresses[0] `192.0.2.0/28` and spec.addresses[2] `192.0.2.8-192.0.2.20` overlap; remove one or split them"
    );
    let mut bad_sel = p(&["192.0.2.0/28"]);
    bad_sel.spec.service_allocation = Some(crate::crd::ServiceAllocation {
        service_selectors: vec![
            Default::default(),
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "app".into(),
                        operator: "Near".into(),
                        values: None,
                    },
                ]),
                match_labels: None,
            },
        ],
        ..Default::default()
    });
    let e = parse_pool(&bad_sel).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "spec.serviceAllocation.serviceSelectors[1]: unknown selector operator `Near`"
        ),
        "{e}"
    );
}

#[test]
fn a_service_gets_the_first_free_address_and_keeps_it() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/30"])]);
    assert_eq!(a.assign(&req("a")), Ok(vec![ip("192.0.2.0")]));
    assert_eq!(a.assign(&req("b")), Ok(vec![ip("192.0.2.1")]));
    assert_eq!(
        a.assign(&req("a")),
        Ok(vec![ip("192.0.2.0")]),
        "assign is idempotent"
    );
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut a = Allocator::new();
    let (n, p) = pool("p", &["192.0.2.255-192.0.3.1"]);
    let mut p = p.unwrap();
    p.avoid_buggy_ips = true;
    a.set_pools([(n, Ok(p))]);
    assert_eq!(a.assign(&req("a")), Ok(vec![ip("192.0.3.1")]));
    assert_eq!(a.report()[0].available_v4, 0);
    assert_eq!(a.report()[0].assigned_v4, 1);
}

#[test]
fn ipv6_pools_never_hand_out_the_subnet_router_anycast_address() {
    let mut a = Allocator::new();
    // A /120 at the start of a /64, and a range crossing a /64 boundary.
    a.set_pools([pool(
        "p",
        &[
            "2001:db8:0:1::/126",
            "2001:db8:0:1:ffff:ffff:ffff:ffff-2001:db8:0:2::1",
        ],
    )]);
    let mut r = req("a");
    r.families = vec![Family::V6];
    assert_eq!(
        a.assign(&r),
        Ok(vec![ip("2001:db8:0:1::1")]),
        "the all-zeros interface identifier is skipped"
    );
    let rep = &a.report()[0];
    // 4 + 3 addresses, of which 2001:db8:0:1:: and 2001:db8:0:2:: are anycast.
    assert_eq!((rep.assigned_v6, rep.available_v6), (1, 4));
    for (i, want) in [
        "2001:db8:0:1::2",
        "2001:db8:0:1::3",
        "2001:db8:0:1:ffff:ffff:ffff:ffff",
        "2001:db8:0:2::1",
    ]
    .iter()
    .enumerate()
    {
        r.service = ServiceKey::new("default", format!("s{i}"));
        assert_eq!(a.assign(&r), Ok(vec![ip(want)]));
    }
    r.service = ServiceKey::new("default", "full");
    assert_eq!(a.assign(&r).unwrap_err().reason(), "PoolExhausted");
    assert_eq!(a.report()[0].available_v6, 0);
    // Asked for by name, it is refused and the message says why.
    r.addresses = vec![ip("2001:db8:0:2::")];
    let e = a.assign(&r).unwrap_err();
    assert_eq!(e.reason(), "InvalidRequest");
    assert!(e.to_string().contains("anycast"), "{e}");
    // IPv4 is unaffected: 192.0.2.0 is a normal address unless avoidBuggyIPs.
    assert!(!is_subnet_router_anycast(ip("192.0.2.0")));
}

#[test]
fn a_service_refused_for_sharing_stays_refused_after_a_pool_change() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/30"])]);
    let mut x = req("x");
    x.sharing_key = Some("k".into());
    assert_eq!(a.assign(&x), Ok(vec![ip("192.0.2.0")]));
    let mut y = req("y");
    y.sharing_key = Some("k".into());
    assert_eq!(
        a.assign(&y).unwrap_err().reason(),
        "SharingRefused",
        "port 80 clashes"
    );
    // The pool is replaced: x's address is now outside every pool (kept, an orphan), and the
    // new pool has free addresses. y must not get one of its own: the key would then name two
    // addresses.
    a.set_pools([pool("q", &["198.51.100.0/30"])]);
    let e = a.assign(&y).unwrap_err();
    assert_eq!(e.reason(), "SharingRefused");
    assert!(e.to_string().contains("192.0.2.0"), "{e}");
    assert!(a.held(&y.service).is_empty());
    // Without the clash the key's address is still the one: it cannot be shared from outside
    // the pools either, so z is refused and says why.
    let mut z = req("z");
    z.sharing_key = Some("k".into());
    z.ports = vec![tcp(53)];
    let e = a.assign(&z).unwrap_err();
    assert_eq!(e.reason(), "SharingRefused");
    assert!(e.to_string().contains("outside every pool"), "{e}");
    // Once x is gone the key is free again and y gets an address.
    a.release(&x.service);
    assert_eq!(a.assign(&y), Ok(vec![ip("198.51.100.0")]));
}

#[test]
fn an_exhausted_pool_refuses_with_pool_exhausted_and_changes_nothing() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.1/32"])]);
    a.assign(&req("a")).unwrap();
    let before = a.clone();
    let e = a.assign(&req("b")).unwrap_err();
    assert_eq!(e.reason(), "PoolExhausted");
    assert_eq!(a, before);
}

#[test]
fn a_requested_address_outside_every_pool_is_an_invalid_request() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    let mut r = req("a");
    r.addresses = vec![ip("198.51.100.7")];
    assert_eq!(a.assign(&r).unwrap_err().reason(), "InvalidRequest");
    assert!(a.holdings().is_empty());
}

#[test]
fn a_requested_address_in_use_is_refused_with_ip_in_use() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    let mut r = req("a");
    r.addresses = vec![ip("192.0.2.7")];
    a.assign(&r).unwrap();
    r.service = ServiceKey::new("other", "b");
    let e = a.assign(&r).unwrap_err();
    assert_eq!(e.reason(), "IPInUse");
    assert!(e.to_string().contains("default/a"), "{e}");
}

#[test]
fn services_with_one_sharing_key_share_when_ports_differ() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    let mut x = req("dns-tcp");
    x.sharing_key = Some("dns".into());
    x.ports = vec![tcp(53)];
    let mut y = req("dns-udp");
    y.sharing_key = Some("dns".into());
    y.ports = vec![PortSpec {
        protocol: Protocol::Udp,
        port: 53,
    }];
    let got = a.assign(&x).unwrap();
    assert_eq!(a.assign(&y).unwrap(), got);
    // A third one on the same key and a clashing port is refused, with the reason.
    let mut z = req("dns-tcp-2");
    z.sharing_key = Some("dns".into());
    z.ports = vec![tcp(53)];
    let e = a.assign(&z).unwrap_err();
    assert_eq!(e.reason(), "SharingRefused");
    assert!(e.to_string().contains("53/tcp"), "{e}");
    // The same port under a requested address is refused the same way.
    z.addresses = got.clone();
    assert_eq!(a.assign(&z).unwrap_err().reason(), "SharingRefused");
}

#[test]
fn different_sharing_keys_never_share() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    let mut x = req("a");
    x.sharing_key = Some("k1".into());
    let got = a.assign(&x).unwrap();
    let mut y = req("b");
    y.sharing_key = Some("k2".into());
    y.ports = vec![tcp(443)];
    assert_ne!(a.assign(&y).unwrap(), got);
    y.addresses = got;
    assert_eq!(a.assign(&y).unwrap_err().reason(), "IPInUse");
}

#[test]
fn dual_stack_gets_one_address_per_family_and_prefer_skips_a_missing_family() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24", "2001:db8::/120"])]);
    let mut r = req("a");
    r.families = vec![Family::V6, Family::V4];
    assert_eq!(
        a.assign(&r).unwrap(),
        vec![ip("2001:db8::1"), ip("192.0.2.0")],
        "2001:db8:: is the subnet-router anycast address"
    );

    let mut b = Allocator::new();
    b.set_pools([pool("p", &["192.0.2.0/24"])]);
    r.require_all_families = false;
    assert_eq!(
        b.assign(&r).unwrap(),
        vec![ip("192.0.2.0")],
        "PreferDualStack"
    );
    r.require_all_families = true;
    r.service = ServiceKey::new("default", "b");
    assert_eq!(
        b.assign(&r).unwrap_err().reason(),
        "PoolExhausted",
        "RequireDualStack"
    );
}

#[test]
fn address_count_gives_n_distinct_addresses_per_family() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24", "2001:db8::/120"])]);
    let mut r = req("a");
    r.families = vec![Family::V4, Family::V6];
    r.count = 3;
    let got = a.assign(&r).unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), 6);
    // Lowering the count releases the surplus and keeps the first ones.
    r.count = 1;
    assert_eq!(a.assign(&r).unwrap(), vec![got[0], got[3]]);
    r.count = 0;
    assert_eq!(a.assign(&r).unwrap_err().reason(), "InvalidRequest");
}

#[test]
fn pool_edits_and_deletions_never_move_an_address() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    let got = a.assign(&req("a")).unwrap();
    a.set_pools([pool("p", &["198.51.100.0/24"])]);
    assert_eq!(a.held(&ServiceKey::new("default", "a")), got.as_slice());
    assert_eq!(a.orphans(), got);
    assert_eq!(
        a.assign(&req("a")).unwrap(),
        got,
        "a reconcile keeps the orphan"
    );
    a.set_pools([]);
    assert_eq!(a.assign(&req("a")).unwrap(), got);
    a.release(&ServiceKey::new("default", "a"));
    assert!(a.orphans().is_empty());
}

#[test]
fn an_overlapping_pool_is_reported_and_hands_out_nothing() {
    let mut a = Allocator::new();
    a.set_pools([
        pool("a", &["192.0.2.0/31"]),
        pool("b", &["192.0.2.1-192.0.2.5"]),
    ]);
    let r = a.report();
    assert_eq!(r[1].overlapping, vec!["a".to_string()]);
    assert!(r[0].overlapping.is_empty());
    a.assign(&req("x")).unwrap();
    a.assign(&req("y")).unwrap();
    assert_eq!(a.assign(&req("z")).unwrap_err().reason(), "PoolExhausted");
}

#[test]
fn pools_are_tried_by_priority_and_respect_namespaces_and_auto_assign() {
    let mut a = Allocator::new();
    let (_, low) = pool("low", &["192.0.2.0/24"]);
    let mut low = low.unwrap();
    low.priority = Some(10);
    let (_, high) = pool("high", &["198.51.100.0/24"]);
    let mut high = high.unwrap();
    high.priority = Some(1);
    high.namespaces = vec!["prod".into()];
    let (_, manual) = pool("manual", &["203.0.113.0/24"]);
    let mut manual = manual.unwrap();
    manual.auto_assign = false;
    a.set_pools([
        ("low".into(), Ok(low)),
        ("high".into(), Ok(high)),
        ("manual".into(), Ok(manual)),
    ]);
    let mut r = req("a");
    assert_eq!(
        a.assign(&r).unwrap(),
        vec![ip("192.0.2.0")],
        "default is not in prod"
    );
    r.service.namespace = "prod".into();
    assert_eq!(a.assign(&r).unwrap(), vec![ip("198.51.100.0")]);
    r.service.name = "b".into();
    r.pool = Some("manual".into());
    assert_eq!(a.assign(&r).unwrap(), vec![ip("203.0.113.0")]);
    r.pool = Some("nope".into());
    assert_eq!(a.assign(&r).unwrap_err().reason(), "InvalidRequest");
}

#[test]
fn restore_claims_recorded_addresses_even_outside_pools() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    a.restore(&req("a"), &[ip("10.9.9.9")]);
    assert_eq!(a.assign(&req("a")).unwrap(), vec![ip("10.9.9.9")]);
}

#[test]
fn a_recorded_conflict_is_reported_and_nobody_moves() {
    let mut a = Allocator::new();
    a.set_pools([pool("p", &["192.0.2.0/24"])]);
    a.restore(&req("a"), &[ip("192.0.2.9")]);
    a.restore(&req("b"), &[ip("192.0.2.9")]);
    assert_eq!(a.assign(&req("b")).unwrap_err().reason(), "IPInUse");
    assert_eq!(a.held(&ServiceKey::new("default", "b")), [ip("192.0.2.9")]);
    assert_eq!(a.held(&ServiceKey::new("default", "a")), [ip("192.0.2.9")]);
}

// === properties ===

#[derive(Debug, Clone)]
enum Op {
    Assign {
        svc: u8,
        key: Option<u8>,
        port: u16,
        want: Option<u8>,
        dual: bool,
        count: u8,
    },
    Release(u8),
    EditPools(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8, proptest::option::of(0u8..2), 1u16..4, proptest::option::of(0u8..12), any::<bool>(), 1u8..3)
            .prop_map(|(svc, key, port, want, dual, count)| Op::Assign { svc, key, port, want, dual, count }),
        2 => (0u8..8).prop_map(Op::Release),
        1 => (0u8..4).prop_map(Op::EditPools),
    ]
}

fn pools_for(variant: u8) -> Vec<(String, Result<Pool, PoolError>)> {
    match variant {
        0 => vec![pool("a", &["192.0.2.0-192.0.2.5", "2001:db8::/126"])],
        1 => vec![
            pool("a", &["192.0.2.3-192.0.2.9"]),
            pool("b", &["2001:db8::2-2001:db8::9"]),
        ],
        2 => vec![pool("a", &["192.0.2.0/29"]), pool("z", &["192.0.2.4/30"])],
        _ => vec![],
    }
}

fn request(
    svc: u8,
    key: Option<u8>,
    port: u16,
    want: Option<u8>,
    dual: bool,
    count: u8,
) -> Request {
    let mut r = req(&format!("s{svc}"));
    r.sharing_key = key.map(|k| format!("k{k}"));
    r.ports = vec![tcp(port)];
    r.addresses = want
        .map(|w| vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, w))])
        .unwrap_or_default();
    if dual {
        r.families = vec![Family::V4, Family::V6];
        r.require_all_families = false;
    }
    r.count = count as usize;
    r
}

/// Checks that holders and per-Service holdings agree.
fn assert_no_conflict(a: &Allocator) {
    for (ip, h) in &a.holders {
        assert!(!h.users.is_empty());
        for s in h.users.keys() {
            assert!(a.by_service[s].contains(ip));
        }
    }
    for (s, ips) in &a.by_service {
        for ip in ips {
            assert!(a.holders[ip].users.contains_key(s));
        }
    }
}

proptest! {
    #[test]
    fn no_address_is_ever_given_to_a_service_that_may_not_share_it(ops in proptest::collection::vec(op(), 1..60)) {
        let mut a = Allocator::new();
        a.set_pools(pools_for(0));
        for op in ops {
            match op {
                Op::Assign { svc, key, port, want, dual, count } => {
                    let r = request(svc, key, port, want, dual, count);
                    let before = a.holdings().clone();
                    match a.assign(&r) {
                        Ok(got) => {
                            prop_assert_eq!(a.held(&r.service), got.as_slice());
                            // Every address newly given is compatible with whoever else holds it.
                            let old = before.get(&r.service).cloned().unwrap_or_default();
                            for ip in got.iter().filter(|ip| !old.contains(ip)) {
                                let h = &a.holders[ip];
                                if h.users.len() > 1 {
                                    for (k, u) in &h.users {
                                        prop_assert!(r.sharing_key.is_some() && u.key == r.sharing_key, "{} shared without a common key", ip);
                                        if *k != r.service {
                                            prop_assert!(r.ports.iter().all(|p| !u.ports.contains(p)), "{}: port clash with {}", ip, k);
                                        }
                                    }
                                }
                            }
                        }
                        Err(_) => prop_assert_eq!(a.holdings(), &before, "a refusal changes no holding"),
                    }
                }
                Op::Release(svc) => a.release(&ServiceKey::new("default", format!("s{svc}"))),
                Op::EditPools(v) => {
                    let held = a.holdings().clone();
                    a.set_pools(pools_for(v));
                    prop_assert_eq!(a.holdings(), &held, "pool edits never move an address");
                }
            }
            assert_no_conflict(&a);
        }
    }

    #[test]
    fn a_restart_re_derives_exactly_the_same_allocations(ops in proptest::collection::vec(op(), 1..60)) {
        // What a Service asks for changes over time (families, count); its sharing key, ports and
        // requested address are fixed per Service so that the record in Kubernetes (addresses
        // plus the current spec) is all a restarted controller needs.
        let stable = |svc: u8, dual: bool, count: u8| {
            let key = match svc % 3 { 0 => None, k => Some(k) };
            let want = match svc { 7 => Some(3), 6 => Some(4), _ => None };
            request(svc, key, 1 + (svc / 3) as u16 % 2, want, dual, count)
        };
        // The controller retries every Service after each event, until nothing changes.
        let settle = |a: &mut Allocator, requests: &BTreeMap<ServiceKey, Request>| {
            for _ in 0..8 {
                let before = a.holdings().clone();
                for r in requests.values() {
                    let _ = a.assign(r);
                }
                if a.holdings() == &before {
                    break;
                }
            }
        };
        let mut a = Allocator::new();
        let mut pools = 0;
        a.set_pools(pools_for(pools));
        let mut requests: BTreeMap<ServiceKey, Request> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Assign { svc, dual, count, .. } => {
                    let r = stable(svc, dual, count);
                    requests.insert(r.service.clone(), r);
                }
                Op::Release(svc) => {
                    let k = ServiceKey::new("default", format!("s{svc}"));
                    requests.remove(&k);
                    a.release(&k);
                }
                Op::EditPools(v) => {
                    pools = v;
                    a.set_pools(pools_for(v));
                }
            }
            settle(&mut a, &requests);
        }
        let mut b = Allocator::new();
        b.set_pools(pools_for(pools));
        for (k, r) in &requests {
            b.restore(r, a.held(k));
        }
        settle(&mut b, &requests);
        prop_assert_eq!(b.holdings(), a.holdings());
    }
}
