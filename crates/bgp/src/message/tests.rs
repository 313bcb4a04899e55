//! Fixtures both ways, round-trips and the NOTIFICATION each malformed message calls for.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;
use crate::Prefix;

const FOUR: Context = Context {
    four_octet_as: true,
};

fn both_ways(m: &Message, hex: &str, cx: Context) {
    let wire = unhex(hex);
    assert_eq!(m.encode(cx), wire, "encode {m:?}");
    assert_eq!(
        Message::decode(&wire, cx),
        Ok((m.clone(), wire.len())),
        "decode {hex}"
    );
}

const MARKER: &str = "ffffffffffffffffffffffffffffffff";

#[test]
fn keepalive_notification_route_refresh() {
    both_ways(&Message::Keepalive, &format!("{MARKER} 0013 04"), FOUR);
    both_ways(
        &Message::Notification(Notification {
            code: 6,
            subcode: 2,
            data: vec![],
        }),
        &format!("{MARKER} 0015 03 0602"),
        FOUR,
    );
    both_ways(
        &Message::RouteRefresh {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
        },
        &format!("{MARKER} 0017 05 0002 00 01"),
        FOUR,
    );
}

#[test]
fn open_with_the_capabilities_portico_sends() {
    // AS 4200000001 (so My AS is AS_TRANS 23456 = 0x5ba0), hold 90 s, id 192.0.2.1; IPv4 and
    // IPv6 unicast, route refresh, graceful restart (120 s, IPv4 forwarding kept), 4-octet AS.
    let open = Open {
        my_as: open::AS_TRANS,
        hold_time: 90,
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
            Capability::RouteRefresh,
            Capability::GracefulRestart(GracefulRestart {
                restarted: false,
                restart_time: 120,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            }),
            Capability::FourOctetAs(4_200_000_001),
        ],
    };
    assert_eq!(open.asn(), 4_200_000_001);
    both_ways(
        &Message::Open(open),
        &format!(
            "{MARKER} 003b 01 04 5ba0 005a c0000201 1e 021c \
             0104 0001 00 01 \
             0104 0002 00 01 \
             0200 \
             4006 0078 0001 01 80 \
             4104 fa56ea01"
        ),
        FOUR,
    );
}

#[test]
fn update_announcing_an_ipv4_vip_and_withdrawing_another() {
    let u = Update {
        withdrawn: vec![Prefix::host("198.51.100.9".parse().unwrap())],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment {
                kind: 2,
                asns: vec![64512],
            }]),
            Attribute::NextHop(Ipv4Addr::new(10, 0, 0, 11)),
            Attribute::Communities(vec![0xfde8_0064]),
            Attribute::LargeCommunities(vec![LargeCommunity {
                global: 64512,
                local1: 1,
                local2: 2,
            }]),
        ],
        nlri: vec![Prefix::host("198.51.100.7".parse().unwrap())],
    };
    both_ways(
        &Message::Update(u),
        &format!(
            "{MARKER} 004b 02 \
             0005 20c6336409 \
             002a \
             40 01 01 00 \
             40 02 06 02 01 0000fc00 \
             40 03 04 0a00000b \
             c0 08 04 fde80064 \
             c0 20 0c 0000fc00 00000001 00000002 \
             20c6336407"
        ),
        FOUR,
    );
}

#[test]
fn update_announcing_an_ipv6_vip_over_mp_reach_with_local_pref_and_med() {
    let u = Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![]),
            Attribute::Med(10),
            Attribute::LocalPref(100),
            Attribute::MpReach {
                afi: AFI_IPV6,
                next_hops: vec!["2001:db8::11".parse().unwrap()],
                nlri: vec![Prefix::host("2001:db8:100::7".parse().unwrap())],
            },
        ],
        nlri: vec![],
    };
    both_ways(
        &Message::Update(u),
        &format!(
            "{MARKER} 0055 02 0000 003e \
             40 01 01 00 \
             40 02 00 \
             80 04 04 0000000a \
             40 05 04 00000064 \
             80 0e 26 0002 01 10 20010db8000000000000000000000011 00 \
             80 20010db8010000000000000000000007"
        ),
        FOUR,
    );
}

#[test]
fn end_of_rib_and_two_octet_as_paths() {
    let eor = Update::default();
    assert!(eor.is_end_of_rib());
    both_ways(
        &Message::Update(eor),
        &format!("{MARKER} 0017 02 0000 0000"),
        FOUR,
    );
    let v6_eor = Update {
        attributes: vec![Attribute::MpUnreach {
            afi: AFI_IPV6,
            withdrawn: vec![],
        }],
        ..Update::default()
    };
    assert!(v6_eor.is_end_of_rib());
    // Without 4-octet AS, AS_PATH numbers take 2 octets.
    let u = Update {
        attributes: vec![
            Attribute::Origin(Origin::Incomplete),
            Attribute::AsPath(vec![AsSegment {
                kind: 2,
                asns: vec![65001, 65002],
            }]),
            Attribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
        ],
        nlri: vec![Prefix::new("10.1.0.0".parse().unwrap(), 16).unwrap()],
        ..Update::default()
    };
    both_ways(
        &Message::Update(u),
        &format!(
            "{MARKER} 002e 02 0000 0014 40 01 01 02 40 02 06 02 02 fde9 fdea 40 03 04 0a000001 10 0a01"
        ),
        Context::default(),
    );
}

/// The NOTIFICATION (code, subcode) a message calls for.
fn refused(hex: &str) -> (u8, u8) {
    let e = Message::decode(&unhex(hex), FOUR).expect_err(hex);
    let n = e.notification().expect("an error with a NOTIFICATION");
    (n.code, n.subcode)
}

#[test]
fn malformed_messages_get_the_notification_rfc_4271_prescribes() {
    // Header.
    assert_eq!(refused(&format!("{}fe 0013 04", &MARKER[..30])), (1, 1));
    assert_eq!(refused(&format!("{MARKER} 0012 04")), (1, 2));
    assert_eq!(refused(&format!("{MARKER} 1001 04")), (1, 2));
    assert_eq!(
        refused(&format!("{MARKER} 0014 04 00")),
        (1, 2),
        "KEEPALIVE of 20"
    );
    assert_eq!(refused(&format!("{MARKER} 0013 07")), (1, 3));
    // OPEN.
    let open = |body: &str| {
        let b = unhex(body);
        refused(&format!("{MARKER} {:04x} 01 {body}", 19 + b.len()))
    };
    assert_eq!(open("03 fde9 005a c0000201 00"), (2, 1), "version 3");
    assert_eq!(open("04 fde9 0002 c0000201 00"), (2, 6), "hold time 2");
    assert_eq!(open("04 fde9 005a 00000000 00"), (2, 3), "identifier 0");
    assert_eq!(
        open("04 fde9 005a c0000201 03 010100"),
        (2, 4),
        "parameter type 1"
    );
    assert_eq!(
        open("04 fde9 005a c0000201 05 0203 4104 00"),
        (2, 0),
        "short capability"
    );
    assert_eq!(
        open("04 fde9 005a c0000201 04 0202 4104"),
        (2, 0),
        "capability past its parameter"
    );
    // UPDATE.
    let update = |body: &str| {
        let b = unhex(body);
        refused(&format!("{MARKER} {:04x} 02 {body}", 19 + b.len()))
    };
    assert_eq!(update("0009 0000"), (3, 1), "withdrawn past the end");
    assert_eq!(
        update("0000 0009 400101 00"),
        (3, 1),
        "attributes past the end"
    );
    assert_eq!(
        update("0000 0008 400101 00 400101 00"),
        (3, 1),
        "ORIGIN twice"
    );
    assert_eq!(
        update("0000 0003 400905"),
        (3, 5),
        "attribute past the list"
    );
    assert_eq!(
        update("0000 0004 40 7f 01 00"),
        (3, 2),
        "unknown well-known"
    );
    assert_eq!(
        update("0000 0004 400101 00 080a"),
        (3, 3),
        "NLRI without AS_PATH"
    );
    assert_eq!(
        update("0000 0004 c00101 00"),
        (3, 4),
        "ORIGIN marked optional"
    );
    assert_eq!(
        update("0000 0005 400102 0000"),
        (3, 5),
        "ORIGIN of 2 octets"
    );
    assert_eq!(update("0000 0004 400101 05"), (3, 6), "ORIGIN 5");
    assert_eq!(
        update("0000 0006 400203 02 05 00"),
        (3, 11),
        "AS_PATH short"
    );
    assert_eq!(update("0000 0000 21 0a000000 00"), (3, 10), "prefix /33");
    assert_eq!(
        update("0000 0007 800e 04 0002 01 10"),
        (3, 9),
        "MP_REACH without next hop"
    );
    // Incomplete input is not an error on the wire.
    assert_eq!(
        Message::decode(&unhex(&format!("{MARKER} 0020 02 0000")), FOUR),
        Err(Error::Incomplete { needed: 0x20 })
    );
    assert_eq!(
        Message::decode(&unhex("ffff"), FOUR),
        Err(Error::Incomplete { needed: HEADER_LEN })
    );
}

#[test]
fn unknown_optional_attributes_and_families_are_kept() {
    let u = Update {
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![]),
            Attribute::Other {
                flags: 0xc0,
                code: 99,
                value: vec![1, 2, 3],
            },
            // MP_REACH for a family portico does not use (L2VPN EVPN): opaque.
            Attribute::Other {
                flags: 0x80,
                code: 14,
                value: unhex("0019 46 04 0a000001 00"),
            },
        ],
        ..Update::default()
    };
    let wire = Message::Update(u.clone()).encode(FOUR);
    assert_eq!(Message::decode(&wire, FOUR).unwrap().0, Message::Update(u));
    // An attribute of 300 octets takes the extended length.
    let long = Update {
        attributes: vec![Attribute::Communities(vec![7; 75])],
        ..Update::default()
    };
    let wire = Message::Update(long.clone()).encode(FOUR);
    assert_eq!(
        wire[HEADER_LEN + 4],
        0xc0 | 0x10,
        "flags of the first attribute"
    );
    assert_eq!(
        Message::decode(&wire, FOUR).unwrap().0,
        Message::Update(long)
    );
}

fn prefix_v4() -> impl Strategy<Value = Prefix> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
        let m = u32::MAX.checked_shl(32 - u32::from(l)).unwrap_or(0);
        Prefix::new(IpAddr::V4(Ipv4Addr::from(a & m)), l).expect("masked")
    })
}

fn prefix_v6() -> impl Strategy<Value = Prefix> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
        let m = u128::MAX.checked_shl(128 - u32::from(l)).unwrap_or(0);
        Prefix::new(IpAddr::V6((a & m).into()), l).expect("masked")
    })
}

fn update() -> impl Strategy<Value = Update> {
    (
        proptest::collection::vec(prefix_v4(), 0..20),
        proptest::collection::vec(prefix_v4(), 0..20),
        proptest::collection::vec(prefix_v6(), 0..20),
        proptest::collection::vec(any::<u32>(), 1..5),
        proptest::collection::vec(any::<u32>(), 0..10),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(withdrawn, nlri, v6, path, communities, med, unreach)| {
            let mut attributes = vec![
                Attribute::Origin(Origin::Igp),
                Attribute::AsPath(vec![AsSegment {
                    kind: 2,
                    asns: path,
                }]),
                Attribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
                Attribute::Med(med),
            ];
            if !communities.is_empty() {
                attributes.push(Attribute::Communities(communities));
            }
            attributes.push(if unreach {
                Attribute::MpUnreach {
                    afi: AFI_IPV6,
                    withdrawn: v6,
                }
            } else {
                Attribute::MpReach {
                    afi: AFI_IPV6,
                    next_hops: vec!["2001:db8::1".parse().unwrap(), "fe80::1".parse().unwrap()],
                    nlri: v6,
                }
            });
            Update {
                withdrawn,
                attributes,
                nlri,
            }
        })
}

proptest! {
    #[test]
    fn updates_round_trip(u in update()) {
        let m = Message::Update(u);
        let wire = m.encode(FOUR);
        prop_assert_eq!(Message::decode(&wire, FOUR), Ok((m, wire.len())));
    }

    #[test]
    fn opens_round_trip(my_as: u16, hold in prop_oneof![Just(0u16), 3u16..], id in 1u32..,
                        asn: u32, rt in 0u16..4096, restarted: bool) {
        let m = Message::Open(Open {
            my_as,
            hold_time: hold,
            identifier: Ipv4Addr::from(id),
            capabilities: vec![
                Capability::FourOctetAs(asn),
                Capability::GracefulRestart(GracefulRestart { restarted, restart_time: rt, families: vec![(AFI_IPV6, SAFI_UNICAST, false)] }),
                Capability::Unknown { code: 73, value: b"host".to_vec() },
            ],
        });
        let wire = m.encode(FOUR);
        prop_assert_eq!(Message::decode(&wire, FOUR), Ok((m, wire.len())));
    }

    #[test]
    fn several_capability_parameters_read_as_one_list(asn: u32) {
        // FRR and GoBGP send one optional parameter per capability; the list is the same.
        let wire = unhex(&format!("{MARKER} 002d 01 04 5ba0 005a c0000201 10 0206 0104 0001 0001 0206 4104 {asn:08x}"));
        let (m, _) = Message::decode(&wire, FOUR).unwrap();
        let Message::Open(o) = &m else { panic!("an OPEN") };
        prop_assert_eq!(o.asn(), asn);
        prop_assert_eq!(o.capabilities.len(), 2);
        prop_assert_eq!(Message::decode(&m.encode(FOUR), FOUR).map(|x| x.0), Ok(m));
    }

    #[test]
    fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), four: bool) {
        let mut b = vec![0xff; 16];
        b.extend_from_slice(&bytes);
        let _ = Message::decode(&b, Context { four_octet_as: four });
        let _ = Message::decode(&bytes, Context { four_octet_as: four });
    }
}
