//! Tests of the request path, without a runtime: byte fixtures, every answer kind, and a
//! cross-check of every response against hickory-proto's independent decoder.

use std::net::{Ipv4Addr, Ipv6Addr};

use model::{HealthView, OwnershipView};
use proptest::prelude::*;

use super::*;
use crate::testutil::{config, health_down, name_to_wire_case, query};
use crate::wire::{Message, Record, wire_to_name};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn snap() -> Snapshot {
    Snapshot::build(1, &config(), &HealthView::new(), &OwnershipView::new())
}

fn ask_raw(s: &Snapshot, q: &[u8], t: Transport) -> Option<(Vec<u8>, Outcome)> {
    let mut out = Vec::new();
    let o = respond(s, q, t, Limits::default(), &mut out)?;
    // Every response must be valid DNS for an independent decoder.
    let h = hickory_proto::op::Message::from_vec(&out)
        .unwrap_or_else(|e| panic!("hickory rejects {out:02x?}: {e}"));
    assert_eq!(h.metadata.id, u16::from_be_bytes([q[0], q[1]]));
    assert_eq!(h.metadata.truncation, o.truncated);
    Some((out, o))
}

fn ask(
    s: &Snapshot,
    name: &str,
    qtype: u16,
    edns: Option<u16>,
    t: Transport,
) -> (Message, Outcome) {
    let q = query(0x4242, name, qtype, edns);
    let (out, o) = ask_raw(s, &q, t).expect("a reply");
    (Message::decode(&out).expect("own decoder"), o)
}

fn udp(s: &Snapshot, name: &str, qtype: u16) -> (Message, Outcome) {
    ask(s, name, qtype, None, Transport::Udp)
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter(|r| r.rtype == rtype::A)
        .map(|r| Ipv4Addr::from(<[u8; 4]>::try_from(&r.rdata[..]).expect("A")))
        .collect()
}

#[test]
fn a_answer_fixture() {
    let s = snap();
    let (out, o) = ask_raw(
        &s,
        &query(0x1234, "web.lb.example.com", rtype::A, None),
        Transport::Udp,
    )
    .expect("reply");
    assert_eq!(
        o,
        Outcome {
            rcode: 0,
            truncated: false
        }
    );
    assert_eq!(
        out,
        hex("1234 8500 0001 0002 0000 0000
             03 776562 02 6c62 07 6578616d706c65 03 636f6d 00 0001 0001
             c00c 0001 0001 00000005 0004 c0000201
             c00c 0001 0001 00000005 0004 c0000202")
    );
}

#[test]
fn nxdomain_fixture() {
    let s = snap();
    let (out, o) = ask_raw(
        &s,
        &query(0x1234, "x.lb.example.com", rtype::A, None),
        Transport::Udp,
    )
    .expect("reply");
    assert_eq!(o.rcode, u16::from(rcode::NXDOMAIN));
    assert_eq!(
        out,
        hex("1234 8503 0001 0000 0001 0000
             01 78 02 6c62 07 6578616d706c65 03 636f6d 00 0001 0001
             c00e 0006 0001 00000005 0043
               03 6e7331 02 6c62 07 6578616d706c65 03 636f6d 00
               0a 686f73746d6173746572 02 6c62 07 6578616d706c65 03 636f6d 00
               00000007 00000e10 00000258 00093a80 0000001e")
    );
}

#[test]
fn address_answers_and_rotation() {
    let s = snap();
    let (m, _) = udp(&s, "web.lb.example.com", rtype::A);
    assert!(m.header.flags.aa && m.header.flags.rd && !m.header.flags.ra);
    assert_eq!(
        a_records(&m),
        [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
    );
    let (m, _) = udp(&s, "web.lb.example.com", rtype::A);
    assert_eq!(
        a_records(&m),
        [Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1)]
    );
    let (m, _) = udp(&s, "web.lb.example.com", rtype::AAAA);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        m.answers[0].rdata,
        "2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets()
    );
    assert_eq!(m.answers[0].ttl, 5);
    let (m, _) = udp(&s, "db.lb.example.com", rtype::A);
    assert_eq!(m.answers.len(), 2);
    assert!(m.answers.iter().all(|r| r.ttl == 30));
}

#[test]
fn health_changes_the_answer() {
    let c = config();
    let s = Snapshot::build(2, &c, &health_down(&[("db", "n1")]), &OwnershipView::new());
    let (m, _) = udp(&s, "db.lb.example.com", rtype::A);
    assert_eq!(a_records(&m), [Ipv4Addr::new(10, 0, 2, 2)]);
    let s = Snapshot::build(
        2,
        &c,
        &health_down(&[("db", "n1"), ("db", "n2"), ("db", "n3")]),
        &OwnershipView::new(),
    );
    let (m, o) = udp(&s, "db.lb.example.com", rtype::A);
    assert_eq!((o.rcode, m.answers.len(), m.authority.len()), (0, 0, 1));
}

#[test]
fn question_is_echoed_as_sent() {
    let s = snap();
    let (m, o) = udp(&s, "WeB.Lb.ExAmPlE.CoM", rtype::A);
    assert_eq!(o.rcode, 0);
    assert_eq!(m.questions[0].name, name_to_wire_case("WeB.Lb.ExAmPlE.CoM"));
    // Owner names point at the question, so they carry its case too.
    assert_eq!(m.answers[0].name, name_to_wire_case("WeB.Lb.ExAmPlE.CoM"));
    let (m, o) = udp(&s, "NoPe.LB.example.com", rtype::A);
    assert_eq!(o.rcode, u16::from(rcode::NXDOMAIN));
    assert_eq!(wire_to_name(&m.authority[0].name), "LB.example.com.");
}

#[test]
fn apex_soa_ns_and_srv() {
    let s = snap();
    let (m, _) = udp(&s, "lb.example.com", rtype::SOA);
    assert_eq!((m.answers.len(), m.answers[0].rtype), (1, rtype::SOA));
    let (m, _) = udp(&s, "other.test", rtype::NS);
    let ns: Vec<String> = m.answers.iter().map(|r| wire_to_name(&r.rdata)).collect();
    assert_eq!(ns, ["ns1.other.test.", "ns2.example.net."]);
    assert!(m.answers.iter().all(|r| r.ttl == 60));
    let (m, _) = udp(&s, "_http._tcp.web.lb.example.com", rtype::SRV);
    assert_eq!(m.answers.len(), 1);
    let rd = &m.answers[0].rdata;
    assert_eq!(&rd[..6], &[0, 0, 0, 0, 0, 80]);
    assert_eq!(wire_to_name(&rd[6..]), "web.lb.example.com.");
    // Node mode: the SRV port is the backends' target port.
    let (m, _) = udp(&s, "_mysql._tcp.db.lb.example.com", rtype::SRV);
    assert_eq!(&m.answers[0].rdata[4..6], &3307u16.to_be_bytes());
}

#[test]
fn negative_answers() {
    let s = snap();
    // NODATA: existing name, other type; empty non-terminal; SRV name asked for A.
    for (name, qtype) in [
        ("web.lb.example.com", rtype::TXT),
        ("web.lb.example.com", rtype::SRV),
        ("_tcp.web.lb.example.com", rtype::A),
        ("_http._tcp.web.lb.example.com", rtype::A),
        ("lb.example.com", rtype::A),
    ] {
        let (m, o) = udp(&s, name, qtype);
        assert_eq!(o.rcode, 0, "{name}");
        assert!(m.header.flags.aa);
        assert!(m.answers.is_empty(), "{name}");
        assert_eq!(m.authority.len(), 1);
        assert_eq!(m.authority[0].rtype, rtype::SOA);
        assert_eq!(wire_to_name(&m.authority[0].name), "lb.example.com.");
        assert_eq!(m.authority[0].ttl, 5);
    }
    // NXDOMAIN below an existing name, and in the second zone (SOA TTL min(60, 5)).
    let (m, o) = udp(&s, "a.b.web.lb.example.com", rtype::A);
    assert_eq!(o.rcode, u16::from(rcode::NXDOMAIN));
    assert_eq!(m.header.flags.rcode, rcode::NXDOMAIN);
    let (m, _) = udp(&s, "nope.other.test", rtype::AAAA);
    assert_eq!(wire_to_name(&m.authority[0].name), "other.test.");
    assert_eq!(m.authority[0].ttl, 5);
    // Outside every zone: REFUSED, not authoritative, no records.
    let (m, o) = udp(&s, "example.org", rtype::A);
    assert_eq!(o.rcode, u16::from(rcode::REFUSED));
    assert!(!m.header.flags.aa && m.answers.is_empty() && m.authority.is_empty());
}

#[test]
fn any_is_answered_minimally() {
    let s = snap();
    let (m, _) = udp(&s, "web.lb.example.com", rtype::ANY);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].rtype, rtype::HINFO);
    assert_eq!(m.answers[0].rdata, b"\x07RFC8482\x00");
}

#[test]
fn class_transfers_and_opt_qtype() {
    let s = snap();
    let mut q = query(7, "web.lb.example.com", rtype::A, None);
    let n = q.len();
    q[n - 1] = 3; // CHAOS
    let (out, o) = ask_raw(&s, &q, Transport::Udp).expect("reply");
    assert_eq!(o.rcode, u16::from(rcode::REFUSED));
    assert_eq!(
        Message::decode(&out).expect("decode").questions[0].qclass,
        3
    );
    for t in [rtype::AXFR, rtype::IXFR] {
        assert_eq!(
            udp(&s, "lb.example.com", t).1.rcode,
            u16::from(rcode::REFUSED)
        );
    }
    assert_eq!(
        udp(&s, "lb.example.com", rtype::OPT).1.rcode,
        u16::from(rcode::FORMERR)
    );
}

#[test]
fn edns_is_echoed_and_sizes_are_honoured() {
    let s = snap();
    let (m, _) = ask(
        &s,
        "web.lb.example.com",
        rtype::A,
        Some(4096),
        Transport::Udp,
    );
    let (edns, ext) = m.edns().expect("OPT echoed");
    assert_eq!((edns.udp_size, edns.version, ext), (1232, 0, 0));
    let (m, _) = udp(&s, "web.lb.example.com", rtype::A);
    assert!(m.edns().is_none());
    // 40 A records: 12 + 24 + 40 * 16 = 676 bytes, 687 with the OPT record.
    let big = "big.lb.example.com";
    let (m, o) = udp(&s, big, rtype::A);
    assert!(o.truncated && m.header.flags.tc && m.answers.is_empty());
    assert_eq!(m.questions.len(), 1);
    for (size, fits) in [
        (0u16, false),
        (512, false),
        (686, false),
        (687, true),
        (1232, true),
        (65535, true),
    ] {
        let (m, o) = ask(&s, big, rtype::A, Some(size), Transport::Udp);
        assert_eq!(!o.truncated, fits, "bufsize {size}");
        assert_eq!(m.answers.len(), if fits { 40 } else { 0 });
        assert!(m.edns().is_some());
    }
    // 40 AAAA: 12 + 24 + 40 * 28 + 11 = 1167 bytes, fits in 1232 but not 1024.
    assert!(
        ask(&s, big, rtype::AAAA, Some(1024), Transport::Udp)
            .1
            .truncated
    );
    assert_eq!(
        ask(&s, big, rtype::AAAA, Some(1232), Transport::Udp)
            .0
            .answers
            .len(),
        40
    );
    // TCP carries it regardless.
    let (m, o) = ask(&s, big, rtype::A, None, Transport::Tcp);
    assert!(!o.truncated);
    assert_eq!(m.answers.len(), 40);
}

#[test]
fn badvers_for_edns1() {
    let s = snap();
    let mut q = query(9, "web.lb.example.com", rtype::A, Some(1232));
    let n = q.len();
    q[n - 5] = 1; // OPT TTL's version byte
    let (out, o) = ask_raw(&s, &q, Transport::Udp).expect("reply");
    assert_eq!(o.rcode, rcode::BADVERS);
    let m = Message::decode(&out).expect("decode");
    assert_eq!(m.header.flags.rcode, 0);
    assert_eq!(m.edns().expect("OPT").1, 1);
}

#[test]
fn malformed_and_other_opcodes() {
    let s = snap();
    let mut out = vec![1, 2, 3];
    assert!(respond(&s, &[0; 11], Transport::Udp, Limits::default(), &mut out).is_none());
    assert!(out.is_empty());
    let mut q = query(5, "web.lb.example.com", rtype::A, None);
    q[2] |= 0x80;
    assert!(ask_raw(&s, &q, Transport::Udp).is_none());
    let mut q = query(5, "web.lb.example.com", rtype::A, None);
    q[5] = 0;
    let (out, o) = ask_raw(&s, &q, Transport::Udp).expect("reply");
    assert_eq!(o.rcode, u16::from(rcode::FORMERR));
    assert_eq!(out, hex("0005 8101 0000 0000 0000 0000"));
    let mut q = query(5, "web.lb.example.com", rtype::A, None);
    q[2] = (5 << 3) | 1; // UPDATE, RD
    let (out, o) = ask_raw(&s, &q, Transport::Udp).expect("reply");
    assert_eq!(o.rcode, u16::from(rcode::NOTIMP));
    assert_eq!(out, hex("0005 a904 0000 0000 0000 0000"));
}

proptest! {
    #[test]
    fn any_bytes_get_a_valid_reply_or_none(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let s = snap();
        let mut out = Vec::new();
        if let Some(o) = respond(&s, &bytes, Transport::Udp, Limits::default(), &mut out) {
            let m = Message::decode(&out).expect("own decoder");
            prop_assert!(m.header.flags.qr);
            prop_assert!(out.len() <= 512 || o.rcode != 0);
            prop_assert!(hickory_proto::op::Message::from_vec(&out).is_ok());
        }
    }

    #[test]
    fn mutated_queries_never_panic(name_idx in 0usize..6, qtype: u16, edns: Option<u16>, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
        let names = ["web.lb.example.com", "big.lb.example.com", "x.other.test", "example.org", "_tcp.web.lb.example.com", "lb.example.com"];
        let mut q = query(1, names[name_idx], qtype, edns);
        for (at, v) in flips {
            let n = q.len();
            q[at % n] = v;
        }
        let s = snap();
        let mut out = Vec::new();
        for t in [Transport::Udp, Transport::Tcp] {
            if respond(&s, &q, t, Limits::default(), &mut out).is_some() {
                prop_assert!(Message::decode(&out).is_ok());
                if t == Transport::Udp {
                    prop_assert!(out.len() <= 1232);
                }
            }
        }
    }
}

#[test]
fn records_have_expected_shape() {
    // A sanity check that the prepared A record matches an independently built one.
    let s = snap();
    let (m, _) = udp(&s, "api.lb.example.com", rtype::A);
    assert!(m.answers.is_empty());
    let (m, _) = udp(&s, "www.other.test", rtype::A);
    assert_eq!(
        m.answers,
        vec![Record {
            name: crate::wire::name_to_wire("www.other.test").expect("name"),
            rtype: rtype::A,
            class: CLASS_IN,
            ttl: 60,
            rdata: vec![192, 0, 2, 20],
        }]
    );
}

#[test]
fn oversized_requests_are_formerr_from_the_header_alone() {
    let mut out = Vec::new();
    let mut q = query(7, "web.lb.example.com", rtype::A, None);
    q.resize(4096, 0);
    let o = respond_oversized(&q, &mut out).expect("answered");
    assert_eq!(o.rcode, u16::from(rcode::FORMERR));
    assert_eq!(out.len(), HEADER_LEN);
    assert_eq!(&out[..2], &q[..2]);
    // Too short for a header, or a response: dropped.
    assert!(respond_oversized(&q[..5], &mut out).is_none());
    q[2] |= 0x80;
    assert!(respond_oversized(&q, &mut out).is_none());
}
