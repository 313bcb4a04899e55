//! The server's Prometheus metrics count what it answered, per transport and RCODE, once the
//! workers flush their batches (at the latest when a socket has been idle for 100 ms).

mod common;

use common::Harness;
use dns::wire::{CLASS_IN, Message, Question, name_to_wire, rtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Duration, Instant, timeout};

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

fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_counted_by_transport_and_rcode() {
    let h = Harness::start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = [0u8; 1500];
    for (i, name) in [
        "web.lb.example.com",
        "web.lb.example.com",
        "nope.lb.example.com",
        "example.org",
    ]
    .iter()
    .enumerate()
    {
        sock.send_to(&query(i as u16, name), h.addr)
            .await
            .expect("send");
        timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .expect("reply")
            .expect("recv");
    }
    sock.send_to(&[0u8; 5], h.addr).await.expect("send");
    let mut tcp = TcpStream::connect(h.addr).await.expect("connect");
    let q = query(9, "web.lb.example.com");
    let mut frame = (q.len() as u16).to_be_bytes().to_vec();
    frame.extend(q);
    tcp.write_all(&frame).await.expect("write");
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.expect("reply");
    drop(tcp);

    let udp =
        |rcode: &str| format!("portico_dns_responses_total{{transport=\"udp\",rcode=\"{rcode}\"}}");
    let start = Instant::now();
    loop {
        let m = h.metrics();
        let done = value(&m, &udp("noerror")) == 2
            && value(&m, &udp("nxdomain")) == 1
            && value(&m, &udp("refused")) == 1
            && value(&m, "portico_dns_dropped_total{transport=\"udp\"}") == 1
            && value(
                &m,
                "portico_dns_responses_total{transport=\"tcp\",rcode=\"noerror\"}",
            ) == 1;
        if done {
            assert!(value(&m, "portico_dns_names") >= 10, "{m}");
            assert!(value(&m, "portico_dns_snapshot_rebuilds_total") >= 1);
            assert!(m.contains("portico_dns_services_fail_open 0"), "{m}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "metrics never matched:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}
