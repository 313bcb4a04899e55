//! Decoder tests: hand-built messages and hex fixtures.

use super::*;

fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

fn tuple_attr(kind: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let ip = [nla(1, &src), nla(2, &dst)].concat();
    let proto = [
        nla(1, &[6]),
        nla(2, &sport.to_be_bytes()),
        nla(3, &dport.to_be_bytes()),
    ]
    .concat();
    nla(
        kind | 0x8000,
        &[nla(1 | 0x8000, &ip), nla(2 | 0x8000, &proto)].concat(),
    )
}

fn message(msg: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((20 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&((1u16 << 8) | msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[2, 0, 0, 0]);
    m.extend_from_slice(body);
    m
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
