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
