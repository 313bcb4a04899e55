//! Tests of the wire codec: hex fixtures both ways, hostile names, property round-trips.

use proptest::prelude::*;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// `dig @server mysql.lb.example.com A +noedns` with id 0x1234 (RD set).
const QUERY_HEX: &str = "1234 0100 0001 0000 0000 0000
    05 6d7973716c 02 6c62 07 6578616d706c65 03 636f6d 00  0001 0001";

#[test]
fn header_fixture_decodes() {
    let h = Header::decode(&hex("1234 8583 0001 0002 0003 0004")).expect("header");
    assert_eq!(h.id, 0x1234);
    let f = h.flags;
    assert!(f.qr && f.aa && f.rd && f.ra && !f.tc && !f.z && !f.ad && !f.cd);
    assert_eq!((f.opcode, f.rcode), (0, rcode::NXDOMAIN));
    assert_eq!((h.qdcount, h.ancount, h.nscount, h.arcount), (1, 2, 3, 4));
}

#[test]
fn header_fixture_encodes() {
    let h = Header {
        id: 0xbeef,
        flags: Flags {
            qr: true,
            opcode: 2,
            tc: true,
            cd: true,
            rcode: rcode::REFUSED,
            ..Default::default()
        },
        qdcount: 1,
        ancount: 0,
        nscount: 0,
        arcount: 1,
    };
    // 1 0010 0 1 0 0 0 0 1 0101 = 0x9215
    assert_eq!(h.encode().to_vec(), hex("beef 9215 0001 0000 0000 0001"));
}

#[test]
fn every_flag_bit_round_trips() {
    for bit in 0..16 {
        let w = 1u16 << bit;
        assert_eq!(Flags::from_u16(w).to_u16(), w, "bit {bit}");
    }
}

#[test]
fn query_fixture_parses_on_the_hot_path() {
    let msg = hex(QUERY_HEX);
    let mut q = [0u8; MAX_NAME_LEN];
    let r = parse_request(&msg, &mut q).expect("request");
    assert_eq!(r.header.id, 0x1234);
    assert!(r.header.flags.rd);
    assert_eq!((r.qtype, r.qclass), (rtype::A, CLASS_IN));
    assert_eq!(wire_to_name(&q[..r.qname_len]), "mysql.lb.example.com.");
    assert_eq!(r.question_end(), msg.len());
    assert!(r.edns.is_none());
}

#[test]
fn query_fixture_encodes() {
    let m = Message {
        header: Header {
            id: 0x1234,
            flags: Flags {
                rd: true,
                ..Default::default()
            },
            ..Default::default()
        },
        questions: vec![Question {
            name: name_to_wire("mysql.lb.example.com.").expect("name"),
            qtype: rtype::A,
            qclass: CLASS_IN,
        }],
        ..Default::default()
    };
    assert_eq!(m.encode(), hex(QUERY_HEX));
    assert_eq!(Message::decode(&hex(QUERY_HEX)).expect("decode"), {
        let mut m = m;
        m.header.qdcount = 1;
        m
    });
}

#[test]
fn qname_is_lower_cased_for_lookup() {
    let mut msg = hex(QUERY_HEX);
    msg[13] = b'M';
    msg[19] = b'L';
    let mut q = [0u8; MAX_NAME_LEN];
    let r = parse_request(&msg, &mut q).expect("request");
    assert_eq!(wire_to_name(&q[..r.qname_len]), "mysql.lb.example.com.");
}

#[test]
fn edns_opt_is_decoded() {
    // The query plus OPT: root, type 41, payload 1232, ext-rcode 0, version 0, DO set.
    let mut msg = hex(QUERY_HEX);
    msg[11] = 1;
    msg.extend(hex("00 0029 04d0 00 00 8000 0000"));
    let mut q = [0u8; MAX_NAME_LEN];
    let r = parse_request(&msg, &mut q).expect("request");
    assert_eq!(
        r.edns,
        Some(Edns {
            udp_size: 1232,
            version: 0,
            dnssec_ok: true
        })
    );
    let mut out = Vec::new();
    put_opt(&mut out, 1232, 1, true);
    assert_eq!(out, hex("00 0029 04d0 01 00 8000 0000"));
}

#[test]
fn malformed_requests_are_rejected() {
    let good = hex(QUERY_HEX);
    let mut q = [0u8; MAX_NAME_LEN];
    let formerr = |m: &[u8], q: &mut [u8; MAX_NAME_LEN]| {
        matches!(parse_request(m, q), Err(Reject::Header(_, rcode::FORMERR)))
    };
    // Shorter than a header, or a response: dropped.
    assert_eq!(
        parse_request(&good[..11], &mut q).unwrap_err(),
        Reject::Drop
    );
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(parse_request(&resp, &mut q).unwrap_err(), Reject::Drop);
    // Every cut inside the question.
    for cut in 12..good.len() {
        assert!(formerr(&good[..cut], &mut q), "cut at {cut}");
    }
    // QDCOUNT 0 and 2.
    for qd in [0u8, 2] {
        let mut m = good.clone();
        m[5] = qd;
        assert!(formerr(&m, &mut q), "qdcount {qd}");
    }
    // A pointer in the question name (to itself: a loop).
    let mut m = good[..12].to_vec();
    m.extend(hex("c00c 0001 0001"));
    assert!(formerr(&m, &mut q));
    // Reserved label types.
    let mut m = good.clone();
    m[12] = 0x45;
    assert!(formerr(&m, &mut q));
    // Huge counts.
    let mut m = good.clone();
    m[6..12].copy_from_slice(&[0xff; 6]);
    assert!(formerr(&m, &mut q));
    // Two OPT records, and OPT in the answer section.
    let mut m = good.clone();
    m[11] = 2;
    m.extend(hex("00 0029 0200 00000000 0000 00 0029 0200 00000000 0000"));
    assert!(formerr(&m, &mut q));
    let mut m = good.clone();
    m[7] = 1;
    m.extend(hex("00 0029 0200 00000000 0000"));
    assert!(formerr(&m, &mut q));
    // Opcode NOTIFY: not implemented.
    let mut m = good.clone();
    m[2] = 4 << 3;
    assert!(matches!(
        parse_request(&m, &mut q),
        Err(Reject::Header(_, rcode::NOTIMP))
    ));
}

#[test]
fn long_names_are_refused() {
    // 5 labels of 63 bytes: 320 bytes, over the 255 limit.
    let mut m = hex("0001 0000 0001 0000 0000 0000");
    for _ in 0..5 {
        m.push(63);
        m.extend([b'a'; 63]);
    }
    m.extend(hex("00 0001 0001"));
    let mut q = [0u8; MAX_NAME_LEN];
    assert!(matches!(
        parse_request(&m, &mut q),
        Err(Reject::Header(_, rcode::FORMERR))
    ));
    assert_eq!(read_name(&m, 12).unwrap_err(), WireError::NameTooLong);
    // Exactly 255: four labels 63+63+63+61 plus lengths and root.
    let mut m = hex("0001 0000 0001 0000 0000 0000");
    for l in [63u8, 63, 63, 61] {
        m.push(l);
        m.extend(std::iter::repeat_n(b'b', l as usize));
    }
    m.extend(hex("00 0001 0001"));
    let r = parse_request(&m, &mut q).expect("255-byte name");
    assert_eq!(r.qname_len, 255);
}

#[test]
fn compression_loops_and_forward_pointers_fail() {
    // A name at 12 pointing to itself, and two pointers pointing at each other.
    let mut m = hex("0001 0000 0000 0001 0000 0000");
    m.extend(hex("c00c"));
    assert_eq!(read_name(&m, 12).unwrap_err(), WireError::BadPointer(12));
    let m = hex("0001 0000 0000 0000 0000 0000 c00e c00c");
    assert!(read_name(&m, 12).is_err());
    assert!(read_name(&m, 14).is_err());
    // A valid backwards pointer.
    let mut m = hex("0001 0000 0000 0000 0000 0000");
    m.extend(name_to_wire("example.com").expect("name"));
    m.extend(hex("03 777777 c00c"));
    let (n, end) = read_name(&m, 25).expect("compressed");
    assert_eq!(wire_to_name(&n), "www.example.com.");
    assert_eq!(end, m.len());
}

#[test]
fn names_convert_both_ways() {
    assert_eq!(name_to_wire(".").expect("root"), vec![0]);
    assert_eq!(name_to_wire("A.b").expect("a.b"), hex("01 61 01 62 00"));
    assert_eq!(wire_to_name(&hex("01 61 01 62 00")), "a.b.");
    assert_eq!(wire_to_name(&[0]), ".");
    assert!(name_to_wire("a..b").is_err());
    assert!(name_to_wire(&"x".repeat(64)).is_err());
    assert_eq!(wire_to_name(&hex("03 612e62 00")), "a\\046b.");
}

#[test]
fn rdata_fixtures() {
    let ns = name_to_wire("ns1.lb").expect("name");
    let rn = name_to_wire("h.lb").expect("name");
    assert_eq!(
        soa_rdata(&ns, &rn, 7, 3600, 600, 604800, 30),
        hex("03 6e7331 02 6c62 00 01 68 02 6c62 00 00000007 00000e10 00000258 00093a80 0000001e")
    );
    assert_eq!(
        srv_rdata(0, 0, 80, &rn),
        hex("0000 0000 0050 01 68 02 6c62 00")
    );
    assert_eq!(hinfo_rdata("RFC8482", ""), hex("07 52464338343832 00"));
}

fn arb_label() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..=20)
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(arb_label(), 0..5).prop_map(|labels| {
        let mut w = Vec::new();
        for l in labels {
            w.push(l.len() as u8);
            w.extend(l);
        }
        w.push(0);
        w
    })
}

fn arb_record() -> impl Strategy<Value = Record> {
    let rdata = prop_oneof![
        proptest::collection::vec(any::<u8>(), 4).prop_map(|d| (rtype::A, d)),
        proptest::collection::vec(any::<u8>(), 16).prop_map(|d| (rtype::AAAA, d)),
        arb_name().prop_map(|n| (rtype::NS, n)),
        (arb_name(), arb_name(), any::<[u32; 5]>())
            .prop_map(|(m, r, t)| (rtype::SOA, soa_rdata(&m, &r, t[0], t[1], t[2], t[3], t[4]))),
        (any::<(u16, u16, u16)>(), arb_name())
            .prop_map(|((p, w, port), n)| (rtype::SRV, srv_rdata(p, w, port, &n))),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|d| (rtype::TXT, d)),
    ];
    (arb_name(), rdata, any::<u16>(), any::<u32>()).prop_map(
        |(name, (rtype, rdata), class, ttl)| Record {
            name,
            rtype,
            class,
            ttl,
            rdata,
        },
    )
}

fn arb_message() -> impl Strategy<Value = Message> {
    let question =
        (arb_name(), any::<u16>(), any::<u16>()).prop_map(|(name, qtype, qclass)| Question {
            name,
            qtype,
            qclass,
        });
    let records = || proptest::collection::vec(arb_record(), 0..4);
    (
        any::<(u16, u16)>(),
        proptest::collection::vec(question, 0..3),
        records(),
        records(),
        records(),
    )
        .prop_map(|((id, flags), questions, answers, authority, additional)| {
            let mut m = Message {
                header: Header {
                    id,
                    flags: Flags::from_u16(flags),
                    ..Default::default()
                },
                questions,
                answers,
                authority,
                additional,
            };
            m.header.qdcount = m.questions.len() as u16;
            m.header.ancount = m.answers.len() as u16;
            m.header.nscount = m.authority.len() as u16;
            m.header.arcount = m.additional.len() as u16;
            m
        })
}

proptest! {
    #[test]
    fn message_round_trips(m in arb_message()) {
        let bytes = m.encode();
        prop_assert_eq!(Message::decode(&bytes).expect("decode"), m);
    }

    #[test]
    fn header_round_trips(id: u16, flags: u16, c: [u16; 4]) {
        let h = Header { id, flags: Flags::from_u16(flags), qdcount: c[0], ancount: c[1], nscount: c[2], arcount: c[3] };
        prop_assert_eq!(Header::decode(&h.encode()).expect("decode"), h);
    }

    #[test]
    fn hot_path_agrees_with_the_general_decoder(m in arb_message()) {
        let bytes = m.encode();
        let mut q = [0u8; MAX_NAME_LEN];
        if let Ok(r) = parse_request(&bytes, &mut q) {
            let full = Message::decode(&bytes).expect("decode");
            prop_assert_eq!(full.questions.len(), 1);
            let want = full.questions[0].name.to_ascii_lowercase();
            prop_assert_eq!(&q[..r.qname_len], &want[..]);
            prop_assert_eq!(r.qtype, full.questions[0].qtype);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut q = [0u8; MAX_NAME_LEN];
        let _ = parse_request(&bytes, &mut q);
        let _ = Message::decode(&bytes);
        for pos in 0..bytes.len().min(40) {
            let _ = read_name(&bytes, pos);
            let _ = skip_name(&bytes, pos);
        }
    }
}
