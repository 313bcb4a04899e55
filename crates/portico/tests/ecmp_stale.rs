//! A node that comes back must not reset connections the others hold because of conntrack
//! entries its previous process left behind. Two nodes announce one VIP by BGP to BIRD (ECMP,
//! hash-threshold: a flow maps to the same next hop whenever the set is the same). A client
//! connection from a fixed source port lands on node 1 and is closed by the client (node 1's
//! netns keeps the 4-tuple's conntrack entry, `CLOSE`, for 10 s); node 1's portico stops; the
//! client opens a new connection from the same
//! port, which the router now sends to node 2; node 1 starts again and rejoins, so the router
//! sends that 4-tuple back to node 1. Its conntrack still knows the 4-tuple, so without the
//! start-up clean-up the moved segments are not copied to node 2 by the ECMP rescue (they are
//! not `new`) and node 1's stack resets the connection ("Connection reset by peer" at the first
//! request). The lab runs saw this as 2 held connections of 1,280 reset in 64 joins (FRR router,
//! client ports reused after a node's drain).
//!
//! The same steps also prove the second half: while node 1 is away node 2 has no other member.
//! If it dropped its rescue table then, the kernel would stop tracking connections in its
//! namespace, the connection it accepts meanwhile would have no entry, and once node 1 is back
//! node 2 would copy its own connection's segments away (the request hangs).
//!
//! The lab is `common::bgplab`. Needs root, `ip`, `bird`, `curl`, `conntrack` and `nft`.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::bgplab::{Lab, VIP4, can_run, in_ns};

/// Connects from `port` in the client namespace and returns the answering node's name.
fn open_from(ns: &str, port: u16) -> Option<(TcpStream, String)> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        sys::setns_net(&format!("/run/netns/{ns}")).expect("setns into the client");
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        sock.set_reuse_address(true).ok()?;
        sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
            .ok()?;
        let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
        sock.connect_timeout(&vip.into(), Duration::from_secs(2))
            .ok()?;
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let node = ping(&s).ok()?;
        Some((s, node))
    })
    .join()
    .expect("client thread")
}

/// One request on `s`: the answering node's name.
fn ping(s: &TcpStream) -> std::io::Result<String> {
    let mut w = s.try_clone()?;
    w.write_all(b"ping\n")?;
    let mut line = String::new();
    if BufReader::new(s).read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_string())
}

/// Closes `s` at once (a reset, no TIME_WAIT), so its port can be bound again.
fn abort(s: TcpStream) {
    let s = socket2::Socket::from(s);
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// Conntrack entries in node `i`'s namespace whose original destination is the VIP's port 80.
fn entries(lab: &Lab, i: usize) -> Vec<String> {
    let (_, out) = in_ns(
        &lab.node(i),
        &[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--dst",
            VIP4,
            "--dport",
            "80",
        ],
    );
    out.lines()
        .filter(|l| l.starts_with("tcp"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_forgets_its_predecessors_flows_and_resets_no_moved_connection() {
    if !can_run() || !common::require("network namespaces, conntrack", &["conntrack", "nft"]) {
        return;
    }
    let mut lab = Lab::create(2);
    lab.cluster = true;
    lab.health = "{type: tcp, interval: 1s, timeout: 1s, rise: 1, fall: 5}".into();
    lab.drain = "1s".into();
    lab.start_bird();
    for i in 1..=2 {
        lab.start_backend(i);
        lab.start_node(i);
    }
    let both = ["10.78.0.11", "10.78.0.12"];
    lab.wait_next_hops(VIP4, &both, Duration::from_secs(30))
        .await;

    // a source port whose flow the router sends to node 1
    let client = lab.ns("c");
    let mut found = None;
    for port in 41000..41200 {
        match open_from(&client, port) {
            Some((s, node)) if node == "node-1" => {
                found = Some((s, port));
                break;
            }
            Some((s, _)) => abort(s),
            None => {}
        }
    }
    let (first, port) = found.expect("some source port of 200 is hashed to node 1");
    assert!(
        !entries(&lab, 1).is_empty(),
        "node 1 tracks the connection from port {port}"
    );

    // the client ends that connection with a reset (node 1's conntrack keeps its 4-tuple as
    // `CLOSE` for 10 s), then node 1 stops (withdraw, grace, nothing left to drain)
    abort(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        lab.nodes[0].stop(sys::SIGTERM, Duration::from_secs(30)),
        "node 1 exits on SIGTERM"
    );
    lab.wait_next_hops(VIP4, &both[1..], Duration::from_secs(30))
        .await;
    let stale = entries(&lab, 1);
    assert!(
        stale.iter().any(|l| l.contains(&format!("sport={port} "))),
        "node 1 keeps the ended connection's entry: {stale:?}"
    );

    // the same 4-tuple again: now held by node 2
    let (held, node) = open_from(&client, port).expect("reconnect from the same port");
    assert_eq!(node, "node-2", "only node 2 is a next hop now");

    // node 1 starts again and rejoins: the router sends the 4-tuple back to it
    lab.start_node(1);
    lab.wait_next_hops(VIP4, &both, Duration::from_secs(30))
        .await;
    let log = lab.nodes[0].log();
    assert!(
        log.contains("conntrack entries of connections a previous process held deleted"),
        "node 1 deletes its predecessor's entries before announcing:\n{}",
        lab.nodes[0].log_tail()
    );
    // 30 requests on the moved connection, each answered by node 2 (a slow answer is printed:
    // the connection must not break)
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let held = std::sync::Arc::new(held);
    for n in 0..30 {
        let s = held.clone();
        let started = tokio::time::Instant::now();
        let got = tokio::task::spawn_blocking(move || ping(&s))
            .await
            .expect("ping");
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            println!("request {n} on the moved connection took {took:?}");
        }
        match got {
            Ok(node) => assert_eq!(node, "node-2", "request {n}: the holder answers"),
            Err(e) => panic!(
                "request {n} on the connection node 2 holds failed after node 1 rejoined: {e}\n\
                 node 1's conntrack: {:?}\nnode 2's: {:?}\nnode 1's rescue: {}\nnode 2's: {}\n\
                 node 1:\n{}\nnode 2:\n{}",
                entries(&lab, 1),
                entries(&lab, 2),
                in_ns(
                    &lab.node(1),
                    &["nft", "list", "table", "ip", "portico_ecmp"]
                )
                .1,
                in_ns(
                    &lab.node(2),
                    &["nft", "list", "table", "ip", "portico_ecmp"]
                )
                .1,
                lab.nodes[0].log_tail(),
                lab.nodes[1].log_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
