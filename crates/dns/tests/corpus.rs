//! Replays the hostile-packet corpus (`tests/corpus/*.hex`: truncated headers, compression
//! loops, huge counts, bad OPT records, …) through the pure request path and over real UDP and
//! TCP sockets: each gets its expected RCODE or is dropped, nothing panics, and the server
//! keeps answering. Then a few thousand generated mutations of valid queries do the same.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::Harness;
use dns::wire::{Header, Message, rcode};
use dns::{Limits, Snapshot, Transport, respond};
use model::{HealthView, OwnershipView};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Duration, timeout};

struct Case {
    name: String,
    bytes: Vec<u8>,
    /// Expected RCODE, or `None` for "dropped".
    expect: Option<u16>,
}

fn corpus() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "hex") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let mut expect = None;
        let mut hex = String::new();
        for line in text.lines() {
            if let Some(e) = line.strip_prefix("# expect: ") {
                expect = Some(match e.trim() {
                    "drop" => None,
                    "noerror" => Some(0),
                    "formerr" => Some(u16::from(rcode::FORMERR)),
                    "notimp" => Some(u16::from(rcode::NOTIMP)),
                    "refused" => Some(u16::from(rcode::REFUSED)),
                    "badvers" => Some(rcode::BADVERS),
                    other => panic!("{}: unknown expectation {other}", path.display()),
                });
            } else if !line.starts_with('#') {
                hex.extend(line.chars().filter(|c| !c.is_whitespace()));
            }
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        cases.push(Case {
            name: path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned(),
            bytes,
            expect: expect.unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display())),
        });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 30, "corpus has {} cases", cases.len());
    cases
}

fn snapshot() -> Snapshot {
    let cfg = model::config::parse(&common::yaml(), &model::config::Environment::default())
        .expect("config");
    Snapshot::build(1, &cfg, &HealthView::new(), &OwnershipView::new())
}

/// The full RCODE of a response (header bits plus the OPT's extended bits).
fn full_rcode(resp: &[u8]) -> u16 {
    let m = Message::decode(resp)
        .unwrap_or_else(|e| panic!("response does not decode: {e}: {resp:02x?}"));
    let ext = m.edns().map_or(0, |(_, ext)| u16::from(ext));
    (ext << 4) | u16::from(m.header.flags.rcode)
}

#[test]
fn corpus_through_the_request_path() {
    let snap = snapshot();
    let mut out = Vec::new();
    for c in corpus() {
        // The general decoder must not panic either (it may refuse).
        let _ = Message::decode(&c.bytes);
        for t in [Transport::Udp, Transport::Tcp] {
            let got = respond(&snap, &c.bytes, t, Limits::default(), &mut out);
            assert_eq!(got.map(|o| o.rcode), c.expect, "{} over {t:?}", c.name);
            if got.is_some() {
                assert_eq!(full_rcode(&out), c.expect.expect("some"), "{}", c.name);
                let h = Header::decode(&out).expect("header");
                assert!(h.flags.qr && !h.flags.ra, "{}", c.name);
                assert_eq!(&out[..2], &c.bytes[..2], "{}: id", c.name);
            }
        }
    }
}

/// Deterministic xorshift, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Valid queries mutated: byte flips, cuts, inserted pointers and count bumps.
fn mutations(n: usize) -> Vec<Vec<u8>> {
    let seeds: Vec<Vec<u8>> = corpus()
        .into_iter()
        .map(|c| c.bytes)
        .filter(|b| b.len() >= 12)
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            let mut b = seeds[rng.next() as usize % seeds.len()].clone();
            for _ in 0..1 + rng.next() % 4 {
                let len = b.len().max(1);
                match rng.next() % 5 {
                    0 => {
                        let i = rng.next() as usize % len;
                        if let Some(x) = b.get_mut(i) {
                            *x = rng.next() as u8;
                        }
                    }
                    1 => b.truncate(rng.next() as usize % len),
                    2 => {
                        let i = rng.next() as usize % len;
                        let p = 0xc000u16 | (rng.next() % 64) as u16;
                        for (k, v) in p.to_be_bytes().into_iter().enumerate() {
                            if let Some(x) = b.get_mut(i + k) {
                                *x = v;
                            }
                        }
                    }
                    3 => {
                        let i = 4 + 2 * (rng.next() as usize % 4);
                        if b.len() > i + 1 {
                            b[i + 1] = b[i + 1].wrapping_add(1);
                        }
                    }
                    _ => b.extend((0..rng.next() % 8).map(|_| rng.next() as u8)),
                }
            }
            // Keep them queries, so most reach the parser rather than the QR drop.
            if b.len() > 2 {
                b[2] &= 0x7f;
            }
            b
        })
        .collect()
}

#[test]
fn generated_mutations_never_panic() {
    let snap = snapshot();
    let mut out = Vec::new();
    let mut answered = 0;
    for m in mutations(20_000) {
        for t in [Transport::Udp, Transport::Tcp] {
            if respond(&snap, &m, t, Limits::default(), &mut out).is_some() {
                answered += 1;
                let _ = full_rcode(&out);
                if t == Transport::Udp {
                    assert!(out.len() <= 1232);
                }
            }
        }
    }
    assert!(answered > 20_000, "only {answered} answered");
}

/// Sends a probe query and reads replies until the probe's own answer (same id and question),
/// which must be NOERROR. The server handles one client's datagrams in order (one socket per
/// 4-tuple), so every reply to what was sent before the probe is read and discarded on the way:
/// the server has caught up. Returns how many earlier replies were discarded.
async fn still_answers(h: &Harness, sock: &UdpSocket, id: u16) -> usize {
    let q = hex_query(id);
    sock.send_to(&q, h.addr).await.expect("send");
    let mut buf = [0u8; 2048];
    let mut discarded = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("server never answered probe {id:#06x} ({discarded} other replies)")
            })
            .expect("recv");
        let r = &buf[..n];
        if n >= q.len() && r[..2] == q[..2] && r[12..q.len()] == q[12..] {
            assert_eq!(full_rcode(r), 0, "probe {id:#06x}");
            return discarded;
        }
        discarded += 1;
    }
}

fn hex_query(id: u16) -> Vec<u8> {
    let mut m = Message::default();
    m.header.id = id;
    m.questions.push(dns::wire::Question {
        name: dns::wire::name_to_wire("web.lb.example.com").expect("name"),
        qtype: dns::wire::rtype::A,
        qclass: dns::wire::CLASS_IN,
    });
    m.encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_over_udp_and_tcp() {
    let h = Harness::start().await;
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let mut buf = [0u8; 2048];
    for c in corpus() {
        // Drain anything late from an earlier case.
        while sock.try_recv(&mut buf).is_ok() {}
        sock.send_to(&c.bytes, h.addr).await.expect("send");
        let wait = if c.expect.is_some() { 2000 } else { 150 };
        let got = timeout(Duration::from_millis(wait), sock.recv(&mut buf)).await;
        match (c.expect, got) {
            (None, Err(_)) => {}
            (Some(rc), Ok(Ok(n))) => assert_eq!(full_rcode(&buf[..n]), rc, "{} over UDP", c.name),
            (want, got) => panic!("{} over UDP: want {want:?}, got {got:?}", c.name),
        }
        // Over TCP, framed; a dropped query closes the connection.
        let mut tcp = TcpStream::connect(h.addr).await.expect("connect");
        let mut frame = (c.bytes.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&c.bytes);
        tcp.write_all(&frame).await.expect("write");
        let mut len = [0u8; 2];
        let read = timeout(Duration::from_secs(2), tcp.read_exact(&mut len))
            .await
            .expect("TCP reply or close");
        match (c.expect, read) {
            (None, Err(_)) => {}
            (Some(rc), Ok(_)) => {
                let mut resp = vec![0u8; usize::from(u16::from_be_bytes(len))];
                tcp.read_exact(&mut resp).await.expect("body");
                assert_eq!(full_rcode(&resp), rc, "{} over TCP", c.name);
            }
            (want, got) => panic!("{} over TCP: want {want:?}, got {got:?}", c.name),
        }
    }
    still_answers(&h, &sock, 0x7700).await;

    // Generated mutations over UDP (bounded: 2000 packets, in bursts of 100). After each burst
    // a probe is answered once the server has handled the burst: it paces the next one.
    let mut replies = 0;
    for (i, chunk) in mutations(2000).chunks(100).enumerate() {
        for m in chunk {
            sock.send_to(m, h.addr).await.expect("send");
        }
        replies += still_answers(&h, &sock, 0x7701 + i as u16).await;
    }
    assert!(replies > 0, "some mutations were answered");

    // Hostile TCP framing: a zero-length frame, a frame longer than what follows, then EOF.
    let mut tcp = TcpStream::connect(h.addr).await.expect("connect");
    tcp.write_all(&[0, 0]).await.expect("write");
    let mut len = [0u8; 2];
    // Zero bytes is shorter than a header: dropped, and the connection closes.
    assert!(
        timeout(Duration::from_secs(2), tcp.read_exact(&mut len))
            .await
            .expect("closed")
            .is_err()
    );
    let mut tcp = TcpStream::connect(h.addr).await.expect("connect");
    tcp.write_all(&[0x10, 0x00, 1, 2, 3]).await.expect("write");
    tcp.shutdown().await.expect("shutdown");
    assert!(
        timeout(Duration::from_secs(2), tcp.read_exact(&mut len))
            .await
            .expect("closed")
            .is_err()
    );
    still_answers(&h, &sock, 0x7800).await;
    h.stop().await;
}
