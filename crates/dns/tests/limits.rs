//! Hostile sizes and hostile connection counts: a UDP query longer than the server reads is
//! answered FORMERR (never from its first bytes), and TCP stays answerable while idle
//! connections hold every slot.

mod common;

use common::Harness;
use dns::wire::{CLASS_IN, Message, Question, name_to_wire, rcode, rtype};
use tokio::net::UdpSocket;
use tokio::time::{Duration, timeout};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::default();
    m.header.id = id;
    m.questions.push(Question {
        name: name_to_wire(name).expect("name"),
        qtype: rtype::A,
        qclass: CLASS_IN,
    });
    m.encode()
}

async fn ask_udp(h: &Harness, datagram: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(datagram, h.addr).await.expect("send");
    let mut buf = vec![0u8; 65536];
    let n = timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .expect("a reply within 2 s")
        .expect("recv");
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9000_byte_udp_query_is_formerr() {
    let h = Harness::start().await;
    // Control: the query itself is answered.
    let q = query(0x1234, "web.lb.example.com");
    let r = ask_udp(&h, &q).await;
    assert_eq!(r[3] & 0x0f, 0, "the plain query answers NOERROR: {r:02x?}");
    // The same query followed by padding to 9,000 bytes: cut at the receive buffer.
    let mut big = query(0x4321, "web.lb.example.com");
    big.resize(9000, 0);
    let r = ask_udp(&h, &big).await;
    assert_eq!(&r[..2], &[0x43, 0x21], "the id is echoed");
    assert_eq!(r[2] & 0x80, 0x80, "QR set");
    assert_eq!(r[3] & 0x0f, rcode::FORMERR, "FORMERR: {r:02x?}");
    assert_eq!(r.len(), 12, "header only");
    h.stop().await;
}

fn metric(h: &Harness, series: &str) -> u64 {
    h.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `dns::server::TCP_EVICT_IDLE` (the module is private): how long a TCP connection must have
/// been idle before a newcomer may take its slot.
const TCP_EVICT_IDLE: Duration = Duration::from_secs(1);
/// How long any state this file waits for may take.
const WAIT: Duration = Duration::from_secs(20);

async fn tcp_query(h: &Harness, id: u16) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.addr).await?;
    let q = query(id, "web.lb.example.com");
    let mut frame = (q.len() as u16).to_be_bytes().to_vec();
    frame.extend(q);
    s.write_all(&frame).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut r).await?;
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_are_answered_while_idle_connections_hold_every_slot() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let h = Harness::start().await;
    let mut held = Vec::new();
    // Before the first held connection: every one of them is accepted after this.
    let first_held = tokio::time::Instant::now();
    // One address holding 40 idle connections gets 16.
    for _ in 0..40 {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 5, 1)), 0))
            .expect("bind");
        held.push(s.connect(h.addr).await.expect("connect"));
    }
    // 300 more idle connections from 30 addresses: more than the 256 slots.
    for c in 0..30u8 {
        for _ in 0..10 {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 6, c + 1)),
                0,
            ))
            .expect("bind");
            held.push(s.connect(h.addr).await.expect("connect"));
        }
    }
    let rejected = |r: &str| format!("portico_dns_tcp_rejected_total{{reason=\"{r}\"}}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&h, &rejected("clientLimit")) < 24 || metric(&h, &rejected("tableFull")) < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bounds never refused:\n{}",
            h.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&h, "portico_dns_tcp_connections"), 256);
    // Every slot is held. Until one holder has been idle for TCP_EVICT_IDLE, a newcomer is
    // closed at once; then it takes the slot of the one idle longest. Poll until a query is
    // answered, and check that was not before the eviction threshold.
    let deadline = first_held + TCP_EVICT_IDLE + WAIT;
    let mut refused = 0;
    let answered_at = loop {
        match timeout(Duration::from_secs(2), tcp_query(&h, 0xff00)).await {
            Ok(Ok(r)) => {
                assert_eq!(&r[..2], &0xff00u16.to_be_bytes());
                break tokio::time::Instant::now();
            }
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("a newcomer was neither answered nor closed within 2 s"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no query answered while idle connections hold every slot ({refused} closed)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        answered_at - first_held >= TCP_EVICT_IDLE,
        "an idle connection was evicted after {:?}, before TCP_EVICT_IDLE",
        answered_at - first_held
    );
    println!(
        "first answer {:?} after the first held connection; {refused} newcomers closed before",
        answered_at - first_held
    );
    for id in 0..10 {
        let r = timeout(Duration::from_secs(2), tcp_query(&h, id))
            .await
            .expect("answered within 2 s")
            .expect("answered");
        assert_eq!(&r[..2], &id.to_be_bytes());
        assert_eq!(r[3] & 0x0f, 0);
    }
    // The first query took an idle connection's slot; each freed its own on closing.
    assert!(metric(&h, &rejected("evicted")) >= 1);
    drop(held);
    h.stop().await;
}
