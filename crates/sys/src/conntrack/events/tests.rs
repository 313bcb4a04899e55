//! Decoder tests: hand-built messages and hex fixtures.

use super::*;
use crate::conntrack::ct_message;
use crate::conntrack::test_util::{nla, tuple_attr};

/// A ctnetlink message (seq 0, family `AF_INET`) of type `msg` carrying `body`.
fn message(msg: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    ct_message(msg, flags, 0, 2, body)
}

/// client 10.0.0.2:40000 → VIP 10.9.0.1:80, DNATed to 10.0.1.1:8080, in `state`.
fn event(msg: u16, flags: u16, state: u8, status: u32) -> Vec<u8> {
    let body = [
        tuple_attr(1, [10, 0, 0, 2], [10, 9, 0, 1], 40000, 80),
        tuple_attr(2, [10, 0, 1, 1], [10, 0, 1, 254], 8080, 40000),
        nla(3, &status.to_be_bytes()),
        nla(4 | 0x8000, &nla(1 | 0x8000, &nla(1, &[state]))),
        nla(12, &7u32.to_be_bytes()),
    ]
    .concat();
    message(msg, flags, &body)
}

#[test]
fn new_update_and_destroy_events_are_decoded() {
    let buf = [
        event(0, 0x400 | 0x200, 1, 0x8),
        event(0, 0, 2, 0xa),
        event(2, 0, 8, 0x8),
    ]
    .concat();
    let mut out = Vec::new();
    assert_eq!(parse_events(&buf, &mut out), 0);
    let kinds: Vec<_> = out.iter().map(|e| (e.kind, e.tcp_state)).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::New, Some(TcpState::SynSent)),
            (EventKind::Update, Some(TcpState::SynRecv)),
            (EventKind::Destroy, Some(TcpState::Close)),
        ]
    );
    let e = &out[1];
    assert_eq!(e.proto, 6);
    assert_eq!(e.orig_src, "10.0.0.2:40000".parse().unwrap());
    assert_eq!(e.orig_dst, "10.9.0.1:80".parse().unwrap());
    assert_eq!(e.reply_src, "10.0.1.1:8080".parse().unwrap());
    assert_eq!(e.status, Some(0xa));
    assert_eq!(e.status.map(|s| s & STATUS_SEEN_REPLY != 0), Some(true));
    assert_eq!(e.id, Some(7));
    assert!(TcpState::SynRecv.answered() && !TcpState::Close.answered());
}

#[test]
fn other_messages_are_skipped_and_broken_ones_counted() {
    let mut out = Vec::new();
    // an expectation event (subsystem 2) is not ours
    let mut other = event(0, 0, 1, 0);
    other[5] = 2;
    assert_eq!(parse_events(&other, &mut out), 0);
    assert!(out.is_empty());
    // a message without the reply tuple is malformed
    let body = tuple_attr(1, [10, 0, 0, 2], [10, 9, 0, 1], 40000, 80);
    assert_eq!(parse_events(&message(0, 0, &body), &mut out), 1);
    // a length past the end ends the read
    let mut long = event(0, 0, 1, 0);
    long[0] = 0xff;
    assert_eq!(parse_events(&long, &mut out), 1);
    assert!(out.is_empty());
}

#[test]
fn arbitrary_bytes_never_panic() {
    let good = event(0, 0x600, 1, 0x8);
    let mut out = Vec::new();
    for cut in 0..good.len() {
        let _ = parse_events(&good[..cut], &mut out);
    }
    for seed in 0..2000u32 {
        let junk: Vec<u8> = (0..(seed % 97))
            .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503) >> 13) as u8)
            .collect();
        let _ = parse_events(&junk, &mut out);
        let mut mutated = good.clone();
        let at = seed as usize % mutated.len();
        mutated[at] ^= (seed >> 3) as u8 | 1;
        let _ = parse_events(&mutated, &mut out);
    }
}

/// Real events captured in a network namespace (Linux 6.18, `127.0.0.1:<port> → 127.0.0.1:8081`
/// refused, then `→ 127.0.0.1:8080` connected), one read each, as hex.
mod captured {
    pub const REFUSED_NEW: &str = concat!(
        "c4000000000100060000000000000000020000003400018014000180080001007f000001080002007f000001",
        "1c000280050001000600000006000200e0000000060003001f9100003400028014000180080001007f000001",
        "080002007f0000011c0002800500010006000000060002001f91000006000300e000000008000c00d7948a56",
        "08000300000000080800070000000078300004802c0001800500010001000000050002000a00000005000300",
        "0000000006000400030000000600050000000000",
    );
    pub const REFUSED_DESTROY: &str = concat!(
        "a4000000020100000000000000000000020000003400018014000180080001007f000001080002007f000001",
        "1c000280050001000600000006000200e0000000060003001f9100003400028014000180080001007f000001",
        "080002007f0000011c0002800500010006000000060002001f91000006000300e000000008000c00d7948a56",
        "08000300000002080800070000000078100004800c0001800500010008000000",
    );
    pub const CONNECT_NEW: &str = concat!(
        "c4000000000100060000000000000000020000003400018014000180080001007f000001080002007f000001",
        "1c000280050001000600000006000200de920000060003001f9000003400028014000180080001007f000001",
        "080002007f0000011c0002800500010006000000060002001f90000006000300de92000008000c00d7436876",
        "08000300000000080800070000000078300004802c0001800500010001000000050002000a00000005000300",
        "0000000006000400030000000600050000000000",
    );
    pub const CONNECT_SYN_RECV: &str = concat!(
        "c4000000000100000000000000000000020000003400018014000180080001007f000001080002007f000001",
        "1c000280050001000600000006000200de920000060003001f9000003400028014000180080001007f000001",
        "080002007f0000011c0002800500010006000000060002001f90000006000300de92000008000c00d7436876",
        "080003000000000a080007000000003c300004802c0001800500010002000000050002000a00000005000300",
        "0a00000006000400030000000600050023000000",
    );
    pub const CONNECT_ESTABLISHED: &str = concat!(
        "c4000000000100000000000000000000020000003400018014000180080001007f000001080002007f000001",
        "1c000280050001000600000006000200de920000060003001f9000003400028014000180080001007f000001",
        "080002007f0000011c0002800500010006000000060002001f90000006000300de92000008000c00d7436876",
        "080003000000000e0800070000069780300004802c0001800500010003000000050002000a00000005000300",
        "0a00000006000400230000000600050023000000",
    );
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn captured_kernel_events_decode() {
    let mut out = Vec::new();
    for hex in [
        captured::REFUSED_NEW,
        captured::REFUSED_DESTROY,
        captured::CONNECT_NEW,
        captured::CONNECT_SYN_RECV,
        captured::CONNECT_ESTABLISHED,
    ] {
        assert_eq!(parse_events(&unhex(hex), &mut out), 0, "{hex}");
    }
    let got: Vec<_> = out
        .iter()
        .map(|e| (e.kind, e.tcp_state, e.orig_dst.port(), e.reply_src.port()))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::New, Some(TcpState::SynSent), 8081, 8081),
            (EventKind::Destroy, Some(TcpState::Close), 8081, 8081),
            (EventKind::New, Some(TcpState::SynSent), 8080, 8080),
            (EventKind::Update, Some(TcpState::SynRecv), 8080, 8080),
            (EventKind::Update, Some(TcpState::Established), 8080, 8080),
        ]
    );
    assert!(out.iter().all(|e| e.proto == 6
        && e.orig_dst.ip() == std::net::Ipv4Addr::LOCALHOST
        && e.id.is_some()
        && e.status.is_some()));
    // the refused flow's RST destroyed it before conntrack marked a reply seen
    assert_eq!(out[1].status.map(|s| s & STATUS_SEEN_REPLY), Some(0));
    assert_ne!(out[3].status.map(|s| s & STATUS_SEEN_REPLY), Some(0));
}
