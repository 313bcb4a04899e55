//! The session replayed against a scripted peer in made-up time: the handshake, routes and
//! End-of-RIB, keepalives, hold expiry, a bad peer AS, a malformed message, a peer's
//! NOTIFICATION, BFD down and the connect back-off.

use super::*;

fn cfg() -> Config {
    Config {
        local_as: 65002,
        peer_as: 65001,
        router_id: Ipv4Addr::new(192, 0, 2, 2),
        hold_time: 9,
        next_hop_v4: Some(Ipv4Addr::new(192, 0, 2, 2)),
        next_hop_v6: Some("2001:db8::2".parse().unwrap()),
        communities: vec![],
        local_pref: None,
        restart_time: Some(120),
        name: "r1".into(),
    }
}

const FOUR: Context = Context {
    four_octet_as: true,
};

fn peer_open(asn: u32, hold: u16) -> Vec<u8> {
    Message::Open(Open {
        my_as: u16::try_from(asn).unwrap_or(crate::message::AS_TRANS),
        hold_time: hold,
        identifier: Ipv4Addr::new(192, 0, 2, 1),
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::FourOctetAs(asn),
        ],
    })
    .encode(Context::default())
}

/// The messages among `actions`' sends, decoded.
fn sent(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(Message::decode(b, FOUR).expect("we send what decodes").0),
            _ => None,
        })
        .collect()
}

fn vip(s: &str) -> Prefix {
    Prefix::host(s.parse().unwrap())
}

/// Routes with default attributes.
fn hosts(prefixes: impl IntoIterator<Item = Prefix>) -> Arc<Routes> {
    Arc::new(
        prefixes
            .into_iter()
            .map(|p| (p, RouteAttrs::default()))
            .collect(),
    )
}

/// A session brought to Established at `t0`, with the actions of the last step.
fn established(t0: Instant) -> (Session, Vec<Action>) {
    let mut s = Session::new(cfg());
    assert_eq!(s.start(t0), [Action::Connect]);
    let open = sent(&s.connected(t0));
    let Message::Open(o) = &open[0] else {
        panic!("{open:?}")
    };
    assert_eq!((o.asn(), o.hold_time), (65002, 9));
    let a = s.received(&peer_open(65001, 30), t0);
    assert_eq!(sent(&a), [Message::Keepalive]);
    assert_eq!(s.state(), State::OpenConfirm);
    let a = s.received(&Message::Keepalive.encode(FOUR), t0);
    assert_eq!(s.state(), State::Established);
    (s, a)
}

#[test]
fn the_handshake_announces_the_routes_then_end_of_rib_per_family() {
    let t0 = Instant::now();
    let mut s = Session::new(cfg());
    s.set_routes(hosts([vip("198.51.100.7"), vip("2001:db8:100::7")]));
    s.start(t0);
    s.connected(t0);
    s.received(&peer_open(65001, 30), t0);
    let a = s.received(&Message::Keepalive.encode(FOUR), t0);
    assert!(a.contains(&Action::Established {
        hold_time: 9,
        peer_as: 65001
    }));
    let m = sent(&a);
    let Message::Update(v4) = &m[0] else {
        panic!("{m:?}")
    };
    assert_eq!(v4.nlri, [vip("198.51.100.7")]);
    assert!(
        v4.attributes
            .contains(&Attribute::NextHop(Ipv4Addr::new(192, 0, 2, 2)))
    );
    assert!(v4.attributes.contains(&Attribute::AsPath(vec![AsSegment {
        kind: 2,
        asns: vec![65002]
    }])));
    let Message::Update(v6) = &m[1] else {
        panic!("{m:?}")
    };
    assert!(
        matches!(&v6.attributes[..], [.., Attribute::MpReach { nlri, .. }] if nlri == &[vip("2001:db8:100::7")])
    );
    // Then End-of-RIB for IPv4 and IPv6.
    assert!(matches!(&m[2], Message::Update(u) if u.is_end_of_rib()));
    assert!(matches!(&m[3], Message::Update(u) if u.is_end_of_rib()));
    assert_eq!(m.len(), 4);
}

#[test]
fn route_changes_send_only_the_difference() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    let a = s.set_routes(hosts([vip("198.51.100.7"), vip("198.51.100.8")]));
    let m = sent(&a);
    assert!(matches!(&m[..], [Message::Update(u)] if u.nlri.len() == 2));
    let a = s.set_routes(hosts([vip("198.51.100.8")]));
    let m = sent(&a);
    assert!(
        matches!(&m[..], [Message::Update(u)] if u.withdrawn == [vip("198.51.100.7")] && u.nlri.is_empty())
    );
    assert!(s.set_routes(hosts([vip("198.51.100.8")])).is_empty());
    // A route refresh from the peer sends everything again.
    let a = s.received(
        &Message::RouteRefresh {
            afi: AFI_IPV4,
            safi: SAFI_UNICAST,
        }
        .encode(FOUR),
        t0,
    );
    assert!(matches!(&sent(&a)[..], [Message::Update(u)] if u.nlri == [vip("198.51.100.8")]));
    // 1,000 routes fit in UPDATEs under 4,096 octets.
    let many: Vec<Prefix> = (0..1000u32)
        .map(|i| vip(&format!("10.{}.{}.1", i / 250, i % 250)))
        .collect();
    let a = s.set_routes(hosts(many));
    assert!(a.iter().all(|x| match x {
        Action::Send(b) => b.len() <= crate::message::MAX_LEN,
        _ => true,
    }));
    let total: usize = sent(&a)
        .iter()
        .map(|m| match m {
            Message::Update(u) => u.nlri.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(total, 1000);
}

#[test]
fn keepalives_every_third_of_the_hold_time_and_the_hold_timer_expires() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    // Hold 9 s (ours, smaller than the peer's 30): keepalives every 3 s.
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(3)));
    assert_eq!(
        sent(&s.tick(t0 + Duration::from_secs(3))),
        [Message::Keepalive]
    );
    // The peer's keepalive at 5 s moves the hold timer to 14 s.
    s.received(
        &Message::Keepalive.encode(FOUR),
        t0 + Duration::from_secs(5),
    );
    assert!(
        s.tick(t0 + Duration::from_millis(13_999))
            .iter()
            .all(|a| !matches!(a, Action::Down { .. }))
    );
    let a = s.tick(t0 + Duration::from_secs(14));
    assert!(matches!(
        &sent(&a)[..],
        [Message::Notification(Notification {
            code: 4,
            subcode: 0,
            ..
        })]
    ));
    assert!(a.contains(&Action::Close));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Down {
            reason: "holdTimerExpired",
            ..
        }
    )));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn a_bad_peer_as_a_malformed_message_and_a_peer_notification_each_end_the_session() {
    let t0 = Instant::now();
    let mut s = Session::new(cfg());
    s.start(t0);
    s.connected(t0);
    let a = s.received(&peer_open(64999, 30), t0);
    assert!(matches!(
        &sent(&a)[..],
        [Message::Notification(Notification {
            code: 2,
            subcode: 2,
            ..
        })]
    ));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Down {
            reason: "badPeerAs",
            ..
        }
    )));

    let (mut s, _) = established(t0);
    // An UPDATE with ORIGIN 5: 3/6, session closed, nothing else affected.
    let bad = [
        vec![0xff; 16],
        vec![
            0x00, 0x1b, 0x02, 0x00, 0x00, 0x00, 0x04, 0x40, 0x01, 0x01, 0x05,
        ],
    ]
    .concat();
    let a = s.received(&bad, t0);
    assert!(matches!(
        &sent(&a)[..],
        [Message::Notification(Notification {
            code: 3,
            subcode: 6,
            ..
        })]
    ));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Down {
            reason: "malformedMessage",
            ..
        }
    )));

    let (mut s, _) = established(t0);
    let cease = Message::Notification(Notification {
        code: 6,
        subcode: 4,
        data: vec![],
    })
    .encode(FOUR);
    let a = s.received(&cease, t0);
    assert!(sent(&a).is_empty(), "no NOTIFICATION in answer to one");
    assert!(a.iter().any(|x| matches!(x, Action::Down { reason: "peerNotification", notification: Some(n) } if n.subcode == 4)));
}

#[test]
fn a_message_split_across_reads_is_reassembled_and_an_update_received_is_ignored() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    let u = Message::Update(Update {
        withdrawn: vec![vip("203.0.113.1")],
        ..Update::default()
    })
    .encode(FOUR);
    assert!(s.received(&u[..7], t0).is_empty());
    assert!(s.received(&u[7..], t0).is_empty());
    assert_eq!(s.updates_received, 1);
    assert_eq!(s.state(), State::Established);
}

#[test]
fn bfd_down_ends_the_session_at_once_and_retries_back_off() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    let a = s.bfd_down(t0);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Down {
            reason: "bfdDown",
            ..
        }
    )));
    assert_eq!(s.state(), State::Idle);
    // Retry after 1 s, then 2 s, 4 s, … up to 30 s.
    let mut at = t0;
    let mut gaps = Vec::new();
    for _ in 0..7 {
        let next = s.next_deadline().expect("a retry is scheduled");
        gaps.push(next - at);
        assert_eq!(s.tick(next), [Action::Connect]);
        at = next;
        s.disconnected(at);
    }
    assert_eq!(
        gaps,
        [1, 2, 4, 8, 16, 30, 30].map(Duration::from_secs).to_vec()
    );
    // Established resets the back-off.
    let (s, _) = established(at);
    assert_eq!(s.retry, FIRST_RETRY);
}

#[test]
fn stop_sends_a_cease_and_ibgp_carries_local_pref_and_an_empty_path() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    let a = s.stop();
    assert!(matches!(
        &sent(&a)[..],
        [Message::Notification(Notification {
            code: 6,
            subcode: 2,
            ..
        })]
    ));
    assert_eq!(s.next_deadline(), None, "stopped: no retry");
    let mut c = cfg();
    c.peer_as = c.local_as;
    let mut s = Session::new(c);
    s.set_routes(hosts([vip("198.51.100.7")]));
    s.start(t0);
    s.connected(t0);
    s.received(&peer_open(65002, 30), t0);
    let m = sent(&s.received(&Message::Keepalive.encode(FOUR), t0));
    let Message::Update(u) = &m[0] else {
        panic!("{m:?}")
    };
    assert!(u.attributes.contains(&Attribute::AsPath(vec![])));
    assert!(u.attributes.contains(&Attribute::LocalPref(100)));
}

#[test]
fn routes_are_grouped_by_attributes_and_a_changed_attribute_is_announced_again() {
    let t0 = Instant::now();
    let (mut s, _) = established(t0);
    let tagged = RouteAttrs {
        communities: vec![65002 << 16 | 7],
        large_communities: vec![[65002, 1, 2]],
        local_pref: None,
        med: Some(50),
        peers: None,
    };
    let routes: Routes = [
        (vip("198.51.100.7"), RouteAttrs::default()),
        (vip("198.51.100.8"), RouteAttrs::default()),
        (vip("198.51.100.9"), tagged.clone()),
    ]
    .into();
    let m = sent(&s.set_routes(Arc::new(routes.clone())));
    assert_eq!(m.len(), 2, "one UPDATE per set of attributes: {m:?}");
    let Message::Update(plain) = &m[0] else {
        panic!("{m:?}")
    };
    assert_eq!(plain.nlri, [vip("198.51.100.7"), vip("198.51.100.8")]);
    assert!(
        !plain
            .attributes
            .iter()
            .any(|a| matches!(a, Attribute::Med(_)))
    );
    let Message::Update(u) = &m[1] else {
        panic!("{m:?}")
    };
    assert_eq!(u.nlri, [vip("198.51.100.9")]);
    assert!(u.attributes.contains(&Attribute::Med(50)));
    assert!(
        u.attributes
            .contains(&Attribute::Communities(vec![65002 << 16 | 7]))
    );
    assert!(
        u.attributes
            .contains(&Attribute::LargeCommunities(vec![LargeCommunity {
                global: 65002,
                local1: 1,
                local2: 2
            }]))
    );
    let codes: Vec<u8> = u.attributes.iter().map(Attribute::code).collect();
    assert!(codes.is_sorted(), "attributes in type order: {codes:?}");
    assert!(s.in_sync());
    assert_eq!((s.prefixes_sent(), s.updates_sent), (3, 2 + 1 + 1));
    // Only the route whose MED changed goes out again.
    let mut changed = routes;
    changed.get_mut(&vip("198.51.100.9")).unwrap().med = Some(60);
    let m = sent(&s.set_routes(Arc::new(changed)));
    assert!(
        matches!(&m[..], [Message::Update(u)] if u.nlri == [vip("198.51.100.9")] && u.attributes.contains(&Attribute::Med(60))),
        "{m:?}"
    );
}

#[test]
fn the_graceful_restart_capability_keeps_both_families_forwarding() {
    let mut s = Session::new(cfg());
    s.start(Instant::now());
    let m = sent(&s.connected(Instant::now()));
    let Message::Open(o) = &m[0] else {
        panic!("{m:?}")
    };
    assert!(o.capabilities.iter().any(|c| matches!(c,
        Capability::GracefulRestart(g) if g.restart_time == 120
            && g.families == [(AFI_IPV4, SAFI_UNICAST, true), (AFI_IPV6, SAFI_UNICAST, true)])));
}

proptest::proptest! {
    /// Whatever an Established peer sends, in whatever pieces, the session never panics: it
    /// stays up (the octets are a prefix of a message, or valid messages) or goes down with
    /// a reason word, and a NOTIFICATION for anything it refused as malformed.
    #[test]
    fn hostile_octets_never_panic_and_a_refusal_carries_a_notification(
        junk in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        header in proptest::bool::ANY,
        cut in 1usize..64,
    ) {
        let t0 = Instant::now();
        let (mut s, _) = established(t0);
        let mut octets = Vec::new();
        if header {
            // A valid marker and a length, so the body reaches the message decoders.
            octets.extend_from_slice(&[0xff; 16]);
            let len = u16::try_from(19 + junk.len().saturating_sub(1)).unwrap_or(4096);
            octets.extend_from_slice(&len.to_be_bytes());
        }
        octets.extend_from_slice(&junk);
        let mut actions = Vec::new();
        for chunk in octets.chunks(cut) {
            actions.extend(s.received(chunk, t0));
        }
        let down = actions.iter().find_map(|a| match a {
            Action::Down { reason, notification } => Some((*reason, notification.clone())),
            _ => None,
        });
        match down {
            None => proptest::prop_assert_eq!(s.state(), State::Established),
            Some(("malformedMessage", n)) => {
                proptest::prop_assert!(n.is_some());
                proptest::prop_assert!(
                    sent(&actions).iter().any(|m| matches!(m, Message::Notification(_)))
                );
            }
            Some((reason, _)) => proptest::prop_assert!(
                ["peerNotification", "fsmError"].contains(&reason),
                "{reason}"
            ),
        }
    }
}

/// A route limited to some peers by name.
fn for_peers(names: &[&str]) -> RouteAttrs {
    RouteAttrs {
        peers: Some(names.iter().map(|n| n.to_string()).collect()),
        ..RouteAttrs::default()
    }
}

#[test]
fn a_route_limited_to_other_peers_is_never_sent_and_withdrawn_when_the_limit_changes() {
    let t0 = Instant::now();
    // Routes for every peer, for this one (r1) only, and for another (r2) only.
    let routes: Routes = [
        (vip("198.51.100.7"), RouteAttrs::default()),
        (vip("198.51.100.8"), for_peers(&["r1", "r3"])),
        (vip("198.51.100.9"), for_peers(&["r2"])),
        (vip("2001:db8:100::9"), for_peers(&["r2"])),
    ]
    .into();
    let mut s = Session::new(cfg());
    s.set_routes(Arc::new(routes.clone()));
    s.start(t0);
    s.connected(t0);
    s.received(&peer_open(65001, 30), t0);
    let m = sent(&s.received(&Message::Keepalive.encode(FOUR), t0));
    let nlri: Vec<Prefix> = m
        .iter()
        .flat_map(|m| match m {
            Message::Update(u) => u.nlri.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(nlri, [vip("198.51.100.7"), vip("198.51.100.8")], "{m:?}");
    // one UPDATE for both (the peer set is not an attribute), then End-of-RIB per family
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(s.in_sync());
    assert_eq!(s.prefixes_sent(), 2);

    // The limit of .8 moves to r2 only: withdrawn from r1; .9 now for r1 as well: announced.
    // .7 limited to r1 (still sent here): nothing goes out for it.
    let mut changed = routes.clone();
    changed.insert(vip("198.51.100.7"), for_peers(&["r1"]));
    changed.insert(vip("198.51.100.8"), for_peers(&["r2"]));
    changed.insert(vip("198.51.100.9"), for_peers(&["r1", "r2"]));
    let m = sent(&s.set_routes(Arc::new(changed)));
    assert_eq!(m.len(), 2, "one withdrawal, one announcement: {m:?}");
    let Message::Update(w) = &m[0] else {
        panic!("{m:?}")
    };
    assert_eq!(
        (&w.withdrawn[..], &w.nlri[..]),
        (&[vip("198.51.100.8")][..], &[][..])
    );
    let Message::Update(a) = &m[1] else {
        panic!("{m:?}")
    };
    assert_eq!(a.nlri, [vip("198.51.100.9")]);
    assert!(s.in_sync());
    assert_eq!(s.prefixes_sent(), 2);

    // Back to every peer: .8 returns, the IPv6 route for r2 stays away.
    let mut every = changed_all(&routes);
    every.insert(vip("2001:db8:100::9"), for_peers(&["r2"]));
    let m = sent(&s.set_routes(Arc::new(every)));
    assert!(
        matches!(&m[..], [Message::Update(u)] if u.nlri == [vip("198.51.100.8")] && u.withdrawn.is_empty()),
        "{m:?}"
    );
    assert_eq!(s.prefixes_sent(), 3);
}

/// `routes` with every limit removed.
fn changed_all(routes: &Routes) -> Routes {
    routes
        .iter()
        .map(|(p, a)| {
            (
                *p,
                RouteAttrs {
                    peers: None,
                    ..a.clone()
                },
            )
        })
        .collect()
}
