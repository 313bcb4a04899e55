//! Tests of the BGP resources in the agent's source.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::runtime::watcher::Event;
use model::bgp::AnnounceMode;

use super::*;
use crate::crd::{BFDProfile, BGPAdvertisement, BGPPeer, L2Announcement, L2AnnouncementSpec};
use crate::fixtures::{self, labels};
use crate::intent::Scope;
use crate::source::tests::{node, snapshot};
use crate::source::{Input, Settings, Source, build, template};

fn settings() -> Settings {
    Settings {
        node: "n1".into(),
        scope: Scope::default(),
        base: model::config::parse("", &model::config::Environment::default()).unwrap(),
        gossip_port: 7946,
        host_interfaces: Vec::new(),
    }
}

fn zone(z: &str) -> Vec<LabelSelector> {
    vec![LabelSelector {
        match_labels: Some(labels(&[("zone", z)])),
        match_expressions: None,
    }]
}

fn tor(name: &str, address: &str, nodes: Vec<LabelSelector>) -> BGPPeer {
    BGPPeer::new(
        name,
        BGPPeerSpec {
            my_asn: 64512,
            peer_asn: 64500,
            peer_address: address.into(),
            hold_time: Some("9s".into()),
            bfd_profile: Some("fast".into()),
            node_selectors: nodes,
            ..BGPPeerSpec::default()
        },
    )
}

fn with_pools(mut snap: Snapshot) -> Snapshot {
    let mut p = fixtures::pool("lb", &["192.0.2.0/24"]);
    p.metadata.labels = Some(labels(&[("tier", "bgp")]));
    snap.pools.insert("lb".into(), p);
    snap.pools
        .insert("other".into(), fixtures::pool("other", &["203.0.113.0/24"]));
    snap
}

fn ad(spec: BGPAdvertisementSpec) -> BGPAdvertisement {
    BGPAdvertisement::new("ad", spec)
}

#[test]
fn peers_that_select_this_node_make_its_bgp_section() {
    let mut snap = snapshot();
    snap.bgp_peers
        .insert("tor-a".into(), tor("tor-a", "10.0.0.254", zone("a")));
    snap.bgp_peers
        .insert("tor-b".into(), tor("tor-b", "10.0.1.254", zone("b")));
    let cfg = build(&snap, &settings(), &template().unwrap());
    let b = cfg.bgp.expect("n1 is in zone a");
    assert_eq!(b.asn, 64512);
    assert_eq!(b.router_id, Some("10.0.0.1".parse().unwrap()), "InternalIP");
    let names: Vec<&str> = b.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["tor-a"], "tor-b selects zone b only");
    let p = &b.peers[0];
    assert_eq!((p.asn, p.local_asn, p.port), (64500, Some(64512), 179));
    assert_eq!(p.hold_time, Duration::from_secs(9));
    assert_eq!(p.bfd, Some(BfdProfile::FAST));
    assert_eq!(p.graceful_restart, Some(GRACEFUL_RESTART));
    // no peer for this node: no section
    snap.bgp_peers.remove("tor-a");
    assert!(
        build(&snap, &settings(), &template().unwrap())
            .bgp
            .is_none()
    );
    // an IPv6-only node needs routerID
    snap.nodes
        .insert("n1".into(), node("n1", "2001:db8::1", &[("zone", "b")]));
    let (errors, _) = crate::source::bgp_errors(&snap, &settings());
    assert!(errors[0].contains("set spec.routerID"), "{errors:?}");
}

#[test]
fn a_pool_selected_by_an_advertisement_is_announced_by_bgp_and_by_both_with_l2() {
    let mut snap = with_pools(snapshot());
    snap.bgp_peers
        .insert("tor".into(), tor("tor", "10.0.0.254", Vec::new()));
    let cfg = build(&snap, &settings(), &template().unwrap());
    assert_eq!(
        cfg.services[0].announce,
        AnnounceMode::L2,
        "no advertisement"
    );
    snap.bgp_ads.insert(
        "ad".into(),
        ad(BGPAdvertisementSpec {
            ip_address_pool_selectors: vec![LabelSelector {
                match_labels: Some(labels(&[("tier", "bgp")])),
                match_expressions: None,
            }],
            node_selectors: zone("b"),
            aggregation_length: Some(24),
            communities: vec!["64512:100".into()],
            local_pref: Some(200),
            ..BGPAdvertisementSpec::default()
        }),
    );
    let cfg = build(&snap, &settings(), &template().unwrap());
    let s = &cfg.services[0];
    assert_eq!(s.announce, AnnounceMode::Bgp);
    assert_eq!(s.placement.nodes, ["n2"]);
    assert_eq!(s.bgp.aggregation_length, Some(24));
    assert_eq!(s.bgp.local_pref, Some(200));
    assert_eq!(s.bgp.communities, vec![Community(64512 << 16 | 100)]);
    // an L2Announcement that selects it too: both, from the nodes of either
    snap.l2.insert(
        "l2".into(),
        L2Announcement::new(
            "l2",
            L2AnnouncementSpec {
                node_selectors: zone("a"),
                ..L2AnnouncementSpec::default()
            },
        ),
    );
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(s.announce, AnnounceMode::Both);
    assert_eq!(s.placement.nodes, ["n1", "n2"]);
    // an advertisement of another pool: L2 only
    snap.bgp_ads.get_mut("ad").unwrap().spec = BGPAdvertisementSpec {
        ip_address_pools: vec!["other".into()],
        ..BGPAdvertisementSpec::default()
    };
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(s.announce, AnnounceMode::L2);
    assert!(s.bgp.is_default());
    // ownerOnly without an L2Announcement: BGP from the owner only, no ARP / NDP
    snap.l2.clear();
    snap.bgp_ads.get_mut("ad").unwrap().spec = BGPAdvertisementSpec {
        ip_address_pools: vec!["lb".into()],
        owner_only: true,
        ..BGPAdvertisementSpec::default()
    };
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(
        s.announce,
        AnnounceMode::Bgp,
        "ownerOnly alone answers no ARP"
    );
    assert!(s.bgp.owner_only);
    // with an L2Announcement that selects the pool too: both (the owner answers ARP as well)
    snap.l2.insert(
        "l2".into(),
        L2Announcement::new("l2", L2AnnouncementSpec::default()),
    );
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(s.announce, AnnounceMode::Both);
    assert!(s.bgp.owner_only);
}

#[test]
fn advertisement_peers_limit_the_routes_to_those_bgp_peers_and_unite() {
    let mut snap = with_pools(snapshot());
    snap.bgp_peers
        .insert("tor-a".into(), tor("tor-a", "10.0.0.254", Vec::new()));
    snap.bgp_peers
        .insert("tor-b".into(), tor("tor-b", "10.0.1.254", Vec::new()));
    let limited = |name: &str, peers: &[&str]| {
        BGPAdvertisement::new(
            name,
            BGPAdvertisementSpec {
                ip_address_pools: vec!["lb".into()],
                peers: peers.iter().map(|p| p.to_string()).collect(),
                ..BGPAdvertisementSpec::default()
            },
        )
    };
    snap.bgp_ads
        .insert("ad1".into(), limited("ad1", &["tor-b"]));
    let (errors, _) = crate::source::bgp_errors(&snap, &settings());
    assert!(errors.is_empty(), "{errors:?}");
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(s.announce, AnnounceMode::Bgp);
    assert_eq!(s.bgp.peers, ["tor-b"]);
    // a second advertisement for another peer: the union
    snap.bgp_ads
        .insert("ad2".into(), limited("ad2", &["tor-a", "tor-b"]));
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert_eq!(s.bgp.peers, ["tor-a", "tor-b"]);
    // one without peers: every peer
    snap.bgp_ads.insert("ad3".into(), limited("ad3", &[]));
    let s = build(&snap, &settings(), &template().unwrap()).services[0].clone();
    assert!(s.bgp.peers.is_empty(), "{:?}", s.bgp.peers);
}

#[test]
fn bad_values_name_the_resource_and_field() {
    let bad = BGPPeerSpec {
        my_asn: 0,
        peer_asn: 64500,
        peer_address: "10.0.0.300".into(),
        source_address: Some("2001:db8::1".into()),
        hold_time: Some("1s".into()),
        bfd_profile: Some("slow".into()),
        router_id: Some("2001:db8::1".into()),
        ..BGPPeerSpec::default()
    };
    let errs = peer("tor", &bad).unwrap_err();
    for want in [
        "spec.myASN: 0 is not an AS number",
        "spec.peerAddress: `10.0.0.300` is not an IP address",
        "spec.routerID: `2001:db8::1` is not an IPv4 address",
        "spec.holdTime: 1s is too short",
        "spec.bfdProfile: `slow` is no BFDProfile and no built-in profile; create a BFDProfile named `slow`",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{want}: {errs:#?}"
        );
    }
    assert_eq!(
        bfd(Some("50msx4")),
        Ok(Some(BfdProfile {
            interval: Duration::from_millis(50),
            multiplier: 4
        }))
    );
    assert!(bfd(Some("1msx3")).is_err());
    assert_eq!(bfd(None), Ok(None));
    let errs = match advertisement(&BGPAdvertisementSpec {
        aggregation_length: Some(33),
        aggregation_length_v6: Some(129),
        communities: vec!["70000:1".into()],
        large_communities: vec!["1:2".into()],
        peers: vec!["tor".into(), " ".into()],
        ..BGPAdvertisementSpec::default()
    }) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    for want in [
        "spec.aggregationLength: 33 is out of range",
        "spec.aggregationLengthV6: 129 is out of range",
        "spec.communities[0]: `70000:1` is not a community",
        "spec.largeCommunities[0]: `1:2` is not a large community",
        "spec.peers[1]: empty; name a BGPPeer",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{want}: {errs:#?}"
        );
    }
}

/// Feeds a listing of everything in `snap` (nodes, pools, BGP resources; no Services).
fn list(src: &mut Source, snap: &Snapshot) -> Option<model::Desired> {
    let mut last = None;
    let mut feed = |i: Input| {
        if let Some(d) = src.handle(i) {
            last = Some(d);
        }
    };
    for i in [
        Input::Service(Event::InitDone),
        Input::Slice(Event::InitDone),
        Input::L2(Event::InitDone),
        Input::Secret(Event::InitDone),
        Input::BgpSecret(Event::InitDone),
        Input::Pool(Event::InitDone),
        Input::BgpAdvertisement(Event::InitDone),
        Input::BfdProfile(Event::InitDone),
    ] {
        feed(i);
    }
    feed(Input::Node(Event::Init));
    for n in snap.nodes.values() {
        feed(Input::Node(Event::InitApply(n.clone())));
    }
    feed(Input::Node(Event::InitDone));
    feed(Input::BgpPeer(Event::Init));
    for p in snap.bgp_peers.values() {
        feed(Input::BgpPeer(Event::InitApply(p.clone())));
    }
    feed(Input::BgpPeer(Event::InitDone));
    last
}

#[test]
fn a_bad_edit_keeps_the_last_valid_peer_running_and_is_reported_once() {
    let mut snap = snapshot();
    snap.bgp_peers
        .insert("tor".into(), tor("tor", "10.0.0.254", Vec::new()));
    let mut src = Source::new(settings()).unwrap();
    let d = list(&mut src, &snap).expect("published");
    let running = d.config.bgp.clone().expect("a peer");
    assert!(src.bgp_problems().is_empty());
    // a typo in the address: reported, and the session keeps its last valid settings
    let mut typo = tor("tor", "10.0.0.2544", Vec::new());
    typo.spec.hold_time = Some("30s".into());
    assert!(src.handle(Input::BgpPeer(Event::Apply(typo))).is_none());
    assert_eq!(src.bgp_problems().len(), 1, "{:?}", src.bgp_problems());
    assert!(
        src.bgp_problems()[0].starts_with("BGPPeer/tor: spec.peerAddress: `10.0.0.2544`"),
        "{:?}",
        src.bgp_problems()
    );
    assert!(src.bgp_problems()[0].ends_with("(the last valid version stays in force)"));
    // fixed: the new settings apply
    let mut fixed = tor("tor", "10.0.0.253", Vec::new());
    fixed.spec.hold_time = Some("30s".into());
    let d = src
        .handle(Input::BgpPeer(Event::Apply(fixed)))
        .expect("changed");
    let now = d.config.bgp.clone().unwrap();
    assert_ne!(now, running);
    assert_eq!(now.peers[0].hold_time, Duration::from_secs(30));
    assert!(src.bgp_problems().is_empty());
    // a new peer that is bad from the start is left out
    let d = src.handle(Input::BgpPeer(Event::Apply(tor("bad", "nope", Vec::new()))));
    assert!(d.is_none(), "nothing changes");
    assert!(src.bgp_problems()[0].starts_with("BGPPeer/bad: spec.peerAddress"));
}

fn password_secret(name: &str, kind: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("portico-system".into()),
            ..Default::default()
        },
        type_: Some(kind.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        k8s_openapi::ByteString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn a_password_secret_is_read_and_its_problems_name_the_field_and_the_fix() {
    let mut snap = snapshot();
    let mut p = tor("tor", "10.0.0.254", Vec::new());
    p.spec.password_secret = Some(k8s_openapi::api::core::v1::SecretReference {
        name: Some("tor-md5".into()),
        namespace: Some("portico-system".into()),
    });
    snap.bgp_peers.insert("tor".into(), p.clone());
    let mut src = Source::new(settings()).unwrap();
    // no such Secret: the peer is not configured, and the error says what to create
    assert!(list(&mut src, &snap).is_some_and(|d| d.config.bgp.is_none()));
    let e = &src.bgp_problems()[0];
    assert!(
        e.starts_with("BGPPeer/tor: spec.passwordSecret: no Secret `tor-md5` in portico's namespace; create it in portico's namespace with type kubernetes.io/basic-auth and key password"),
        "{e}"
    );
    // the Secret appears: the session gets the password
    let d = src
        .handle(Input::BgpSecret(Event::Apply(password_secret(
            "tor-md5",
            "kubernetes.io/basic-auth",
            &[("username", "x"), ("password", "s3cret")],
        ))))
        .expect("changed");
    let b = d.config.bgp.clone().expect("configured");
    assert_eq!(
        b.peers[0].password.as_ref().map(|p| p.0.as_str()),
        Some("s3cret")
    );
    assert!(src.bgp_problems().is_empty(), "{:?}", src.bgp_problems());
    // the key goes away: reported, and the running session keeps its password
    let d = src.handle(Input::BgpSecret(Event::Apply(password_secret(
        "tor-md5",
        "kubernetes.io/basic-auth",
        &[("username", "x")],
    ))));
    assert!(d.is_none(), "nothing changes: {d:?}");
    assert_eq!(
        src.bgp_problems(),
        [
            "BGPPeer/tor: spec.passwordSecret: Secret `tor-md5` has no key `password`; create it in portico's namespace with type kubernetes.io/basic-auth and key password, e.g. kubectl -n <portico's namespace> create secret generic <name> --type=kubernetes.io/basic-auth --from-literal=password=<password> (the last valid version stays in force)"
        ]
    );
    // deleted: the same
    let d = src.handle(Input::BgpSecret(Event::Delete(password_secret(
        "tor-md5",
        "kubernetes.io/basic-auth",
        &[],
    ))));
    assert!(d.is_none());
    assert!(src.bgp_problems()[0].contains("no Secret `tor-md5`"));
    // the other mistakes, one by one
    let secrets: BTreeMap<String, Secret> = [
        (
            "opaque".to_string(),
            password_secret("opaque", "Opaque", &[("password", "x")]),
        ),
        (
            "ok".to_string(),
            password_secret("ok", "kubernetes.io/basic-auth", &[("password", "x")]),
        ),
    ]
    .into();
    let with = |name: Option<&str>, ns: Option<&str>, inline: Option<&str>| {
        let mut spec = p.spec.clone();
        spec.password = inline.map(String::from);
        spec.password_secret = Some(k8s_openapi::api::core::v1::SecretReference {
            name: name.map(String::from),
            namespace: ns.map(String::from),
        });
        inline_password(&spec, &secrets)
    };
    for (got, want) in [
        (
            with(Some("ok"), None, Some("pw")),
            "spec.passwordSecret: set together with spec.password; keep one of them",
        ),
        (with(None, None, None), "spec.passwordSecret.name: missing"),
        (
            with(Some("opaque"), None, None),
            "spec.passwordSecret: Secret `opaque` has type Opaque, not kubernetes.io/basic-auth",
        ),
        (
            with(Some("ok"), Some("metallb-system"), None),
            "spec.passwordSecret.namespace: `metallb-system` is not portico's namespace `portico-system`",
        ),
    ] {
        let e = got.expect_err(want);
        assert!(e.starts_with(want), "{e}");
    }
    let ok = with(Some("ok"), Some("portico-system"), None).expect("valid");
    assert_eq!(
        (ok.password.as_deref(), ok.password_secret),
        (Some("x"), None)
    );
}

fn profile(name: &str, spec: BFDProfileSpec) -> BFDProfile {
    BFDProfile::new(name, spec)
}

#[test]
fn a_bfd_profile_checks_each_field_and_refuses_what_portico_does_not_do() {
    // MetalLB's defaults: 300 ms x 3
    assert_eq!(
        bfd_profile(&BFDProfileSpec::default()),
        Ok(BfdProfile::DEFAULT)
    );
    let ok = BFDProfileSpec {
        receive_interval: Some(50),
        transmit_interval: Some(50),
        detect_multiplier: Some(4),
        echo_mode: Some(false),
        passive_mode: Some(false),
        ..BFDProfileSpec::default()
    };
    assert_eq!(
        bfd_profile(&ok),
        Ok(BfdProfile {
            interval: Duration::from_millis(50),
            multiplier: 4
        })
    );
    let errs = bfd_profile(&BFDProfileSpec {
        receive_interval: Some(5),
        transmit_interval: Some(70000),
        detect_multiplier: Some(256),
        echo_interval: Some(50),
        echo_mode: Some(true),
        passive_mode: Some(true),
        minimum_ttl: Some(254),
    })
    .unwrap_err();
    for want in [
        "spec.receiveInterval: 5 is out of range 10-60000",
        "spec.transmitInterval: 70000 is out of range 10-60000",
        "spec.transmitInterval: 70000 differs from spec.receiveInterval 5; portico's BFD sends and requires one interval",
        "spec.detectMultiplier: 256 is out of range 1-255",
        "spec.echoInterval: 50: portico does not do BFD echo mode",
        "spec.echoMode: portico does not do BFD echo mode",
        "spec.passiveMode: portico's BFD always sends",
        "spec.minimumTtl: 254: portico requires TTL 255 on single hop BFD",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{want}: {errs:#?}"
        );
    }
    // one interval given: the other is MetalLB's default, and they differ
    let errs = bfd_profile(&BFDProfileSpec {
        receive_interval: Some(100),
        ..BFDProfileSpec::default()
    })
    .unwrap_err();
    assert_eq!(
        errs,
        [
            "spec.transmitInterval: 300 (the default) differs from spec.receiveInterval 100; portico's BFD sends and requires one interval: set both to the same value"
        ]
    );
}

#[test]
fn a_bgp_peer_names_a_bfd_profile_and_the_built_in_words_win() {
    let mut snap = snapshot();
    let mut p = tor("tor", "10.0.0.254", Vec::new());
    p.spec.bfd_profile = Some("tor-bfd".into());
    snap.bgp_peers.insert("tor".into(), p.clone());
    // missing: the peer is not configured, and the error says what to create
    let (errors, good) = crate::source::bgp_errors(&snap, &settings());
    assert_eq!(
        errors,
        [
            "BGPPeer/tor: spec.bfdProfile: `tor-bfd` is no BFDProfile and no built-in profile; create a BFDProfile named `tor-bfd`, or use off, default (300ms x 3), fast (10ms x 3) or timers such as 50msx3"
        ]
    );
    assert!(good.peers.is_empty());
    assert!(
        build(&snap, &settings(), &template().unwrap())
            .bgp
            .is_none()
    );
    // the profile: the session gets its timers
    snap.bfd_profiles.insert(
        "tor-bfd".into(),
        profile(
            "tor-bfd",
            BFDProfileSpec {
                receive_interval: Some(200),
                transmit_interval: Some(200),
                detect_multiplier: Some(5),
                ..BFDProfileSpec::default()
            },
        ),
    );
    let b = build(&snap, &settings(), &template().unwrap())
        .bgp
        .expect("configured");
    let want = BfdProfile {
        interval: Duration::from_millis(200),
        multiplier: 5,
    };
    assert_eq!(b.peers[0].bfd, Some(want));
    let (errors, good) = crate::source::bgp_errors(&snap, &settings());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        good.peers["tor"].bfd_profile.as_deref(),
        Some("200msx5"),
        "the last valid peer carries the timers"
    );
    // a BFDProfile named like a built-in word is reported; the peer naming it gets the word
    snap.bfd_profiles
        .insert("fast".into(), profile("fast", BFDProfileSpec::default()));
    snap.bgp_peers.get_mut("tor").unwrap().spec.bfd_profile = Some("fast".into());
    let b = build(&snap, &settings(), &template().unwrap()).bgp.unwrap();
    assert_eq!(b.peers[0].bfd, Some(BfdProfile::FAST));
    let (errors, _) = crate::source::bgp_errors(&snap, &settings());
    assert_eq!(
        errors,
        [
            "BFDProfile/fast: metadata.name: `fast` is a built-in profile (10ms x 3), which BGPPeers naming it get; give this BFDProfile another name to use it"
        ]
    );
    // a profile that was never valid: the peer says so
    snap.bfd_profiles.remove("fast");
    snap.bgp_peers.get_mut("tor").unwrap().spec.bfd_profile = Some("tor-bfd".into());
    snap.bfd_profiles.get_mut("tor-bfd").unwrap().spec.echo_mode = Some(true);
    let (errors, _) = crate::source::bgp_errors(&snap, &settings());
    assert_eq!(
        errors,
        [
            "BFDProfile/tor-bfd: spec.echoMode: portico does not do BFD echo mode; remove it or set it to false",
            "BGPPeer/tor: spec.bfdProfile: BFDProfile `tor-bfd` has no valid version (its errors are logged as BFDProfile/tor-bfd); fix it",
        ]
    );
}

#[test]
fn a_bad_bfd_profile_edit_or_its_deletion_keeps_the_running_timers() {
    let mut snap = snapshot();
    let mut p = tor("tor", "10.0.0.254", Vec::new());
    p.spec.bfd_profile = Some("tor-bfd".into());
    snap.bgp_peers.insert("tor".into(), p);
    let mut src = Source::new(settings()).unwrap();
    // listed without the profile: nothing configured yet
    assert!(list(&mut src, &snap).is_some_and(|d| d.config.bgp.is_none()));
    assert!(
        src.bgp_problems()[0]
            .starts_with("BGPPeer/tor: spec.bfdProfile: `tor-bfd` is no BFDProfile")
    );
    let good = BFDProfileSpec {
        receive_interval: Some(100),
        transmit_interval: Some(100),
        ..BFDProfileSpec::default()
    };
    let d = src
        .handle(Input::BfdProfile(Event::Apply(profile(
            "tor-bfd",
            good.clone(),
        ))))
        .expect("configured");
    let want = Some(BfdProfile {
        interval: Duration::from_millis(100),
        multiplier: 3,
    });
    assert_eq!(d.config.bgp.as_ref().unwrap().peers[0].bfd, want);
    assert!(src.bgp_problems().is_empty(), "{:?}", src.bgp_problems());
    // a bad edit: reported by resource and field, the timers stay
    let bad = BFDProfileSpec {
        transmit_interval: Some(50),
        ..good.clone()
    };
    assert!(
        src.handle(Input::BfdProfile(Event::Apply(profile(
            "tor-bfd",
            bad.clone()
        ))))
        .is_none(),
        "nothing changes"
    );
    assert_eq!(
        src.bgp_problems(),
        [
            "BFDProfile/tor-bfd: spec.transmitInterval: 50 differs from spec.receiveInterval 100; portico's BFD sends and requires one interval: set both to the same value (the last valid version stays in force)"
        ]
    );
    // deleted: the peer reports it, and the running session keeps its timers
    assert!(
        src.handle(Input::BfdProfile(Event::Delete(profile("tor-bfd", bad))))
            .is_none(),
        "nothing changes"
    );
    assert_eq!(src.bgp_problems().len(), 1, "{:?}", src.bgp_problems());
    assert!(
        src.bgp_problems()[0]
            .starts_with("BGPPeer/tor: spec.bfdProfile: `tor-bfd` is no BFDProfile")
            && src.bgp_problems()[0].ends_with("(the last valid version stays in force)"),
        "{:?}",
        src.bgp_problems()
    );
    // a faster valid profile: the new timers apply
    let fast = BFDProfileSpec {
        receive_interval: Some(20),
        transmit_interval: Some(20),
        ..BFDProfileSpec::default()
    };
    let d = src
        .handle(Input::BfdProfile(Event::Apply(profile("tor-bfd", fast))))
        .expect("changed");
    assert_eq!(
        d.config.bgp.as_ref().unwrap().peers[0]
            .bfd
            .map(|b| b.interval),
        Some(Duration::from_millis(20))
    );
    assert!(src.bgp_problems().is_empty(), "{:?}", src.bgp_problems());
}
