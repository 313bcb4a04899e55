//! Connections survive ECMP changes: three nodes (gossiping with each other) announce one VIP
//! by BGP to BIRD, which spreads it over them by hash-threshold multipath. Long-lived client
//! connections (each sends a line every 100 ms and reads the answering node's name) run while
//! node 3 joins the ECMP set and then node 1 leaves it gracefully; both changes make the
//! router re-hash flows, so segments of established connections reach nodes that did not
//! accept them. With the ECMP rescue (`bgp.ecmp_rescue`, the default) such a node copies them
//! to the others and the holder continues: no connection to a surviving node breaks. With
//! `ecmp_rescue: false` the same steps reset some, so the test proves the rescue. A third run
//! does it over IPv6 (VIP, clients and gossip), with the rescue.
//!
//! The lab is `common::bgplab` (see there). Needs root, `ip`, `bird`, `curl` and `nft`:
//! without them the test prints `skipped: …` and returns, unless `PORTICO_CI` is set.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::bgplab::{Lab, VIP4, VIP6, can_run, in_ns};
use tokio::time::Instant;

/// Long-lived client connections.
const CONNS: usize = 40;
const STEPS: [&str; 3] = ["steady", "node 3 joins", "node 1 leaves"];

/// One connection that broke: the step, the node it was on (its last answer), what happened.
#[derive(Clone)]
struct Break {
    step: usize,
    node: Option<String>,
    what: String,
}

impl std::fmt::Debug for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {}: {}",
            STEPS[self.step],
            self.node.as_deref().unwrap_or("(no answer yet)"),
            self.what
        )
    }
}

/// What the clients share with the test.
#[derive(Default)]
struct Clients {
    step: AtomicUsize,
    stop: AtomicBool,
    /// Connections that have had an answer since they were (re)opened.
    answered: AtomicUsize,
    requests: AtomicUsize,
    breaks: Mutex<Vec<Break>>,
    /// Per node: connections it answered first (the spread before any change).
    first: Mutex<std::collections::BTreeMap<String, usize>>,
}

/// One client connection (in the client namespace): reopened when it breaks; bounded by the
/// stop flag and 150 s.
fn client(ns: String, vip: SocketAddr, c: Arc<Clients>) {
    sys::setns_net(&format!("/run/netns/{ns}")).expect("setns into the client");
    let until = SystemTime::now() + Duration::from_secs(150);
    let live = || !c.stop.load(Ordering::Relaxed) && SystemTime::now() < until;
    let broke = |node: &Option<String>, what: String| {
        c.breaks.lock().unwrap().push(Break {
            step: c.step.load(Ordering::Relaxed),
            node: node.clone(),
            what,
        });
    };
    while live() {
        let s = match TcpStream::connect_timeout(&vip, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) => {
                broke(&None, format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let (mut w, mut r) = (s.try_clone().expect("clone"), BufReader::new(s));
        let mut node: Option<String> = None;
        let mut line = String::new();
        while live() {
            line.clear();
            let got = w.write_all(b"ping\n").and_then(|()| r.read_line(&mut line));
            match got {
                Ok(n) if n > 0 => {
                    if node.is_none() && c.answered.fetch_add(1, Ordering::Relaxed) < CONNS {
                        *c.first
                            .lock()
                            .unwrap()
                            .entry(line.trim().to_string())
                            .or_default() += 1;
                    }
                    node = Some(line.trim().to_string());
                    c.requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {
                    broke(&node, "closed by the server".into());
                    break;
                }
                Err(e) => {
                    broke(&node, e.to_string());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A counter's value in node `i`'s `/metrics` (0 when absent or unreachable).
fn metric(lab: &Lab, i: usize, name: &str) -> u64 {
    let (_, out) = in_ns(
        &lab.node(i),
        &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/metrics"],
    );
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn has_table(lab: &Lab, i: usize, family: &str) -> bool {
    in_ns(
        &lab.node(i),
        &["nft", "list", "table", family, "portico_ecmp"],
    )
    .0
}

async fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn strs(h: &[String]) -> Vec<&str> {
    h.iter().map(String::as_str).collect()
}

/// What one run saw.
struct Run {
    /// Per step: connections to surviving nodes that broke.
    broken: [usize; 3],
    /// Connections of the leaving node cut at the end of its drain (expected).
    leaving: usize,
    breaks: Vec<Break>,
    requests: usize,
    /// Segments copied by all nodes, and over how long.
    copied: u64,
    took: Duration,
}

/// One run over IPv4 (or IPv6: the VIP, the client and the gossip, so the members' addresses
/// the copies go to are IPv6).
async fn run(rescue: bool, v6: bool, kernel: bool) -> Run {
    let (vip, family) = if v6 { (VIP6, "ip6") } else { (VIP4, "ip") };
    let hops = |nodes: &[usize]| -> Vec<String> {
        nodes
            .iter()
            .map(|i| {
                if v6 {
                    format!("fd78::1{i}")
                } else {
                    format!("10.78.0.1{i}")
                }
            })
            .collect()
    };
    let (h12, h123, h23) = (hops(&[1, 2]), hops(&[1, 2, 3]), hops(&[2, 3]));
    let target: SocketAddr = if v6 {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    }
    .parse()
    .unwrap();
    let mut lab = Lab::create(3);
    lab.cluster = true;
    lab.cluster_v6 = v6;
    lab.kernel = kernel;
    // a loaded build machine must not fail a check (a withdrawal re-hashes too)
    lab.health = "{type: tcp, interval: 1s, timeout: 1s, rise: 1, fall: 5}".into();
    lab.drain = "2s".into();
    if !rescue {
        lab.bgp_extra = "  ecmp_rescue: false\n".into();
    }
    lab.start_bird();
    for i in 1..=2 {
        lab.start_backend(i);
        lab.start_node(i);
    }
    lab.wait_next_hops(vip, &strs(&h12), Duration::from_secs(30))
        .await;
    if kernel {
        let st = lab.status(1);
        assert_eq!(
            st["services"][0]["path"], "kernel",
            "the service runs on the kernel path: {st}"
        );
    }
    for i in 1..=2 {
        if rescue {
            wait_for(
                &format!("node {i}'s rescue table"),
                Duration::from_secs(10),
                || has_table(&lab, i, family),
            )
            .await;
        } else {
            assert!(
                !has_table(&lab, i, family),
                "ecmp_rescue: false makes no table"
            );
        }
    }

    let clients = Arc::new(Clients::default());
    let threads: Vec<_> = (0..CONNS)
        .map(|_| {
            let (ns, c) = (lab.ns("c"), clients.clone());
            std::thread::spawn(move || client(ns, target, c))
        })
        .collect();
    wait_for("every connection answered", Duration::from_secs(20), || {
        clients.answered.load(Ordering::Relaxed) >= CONNS
    })
    .await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // node 3 joins: the router re-hashes over three next hops
    clients.step.store(1, Ordering::Relaxed);
    lab.start_backend(3);
    lab.start_node(3);
    lab.wait_next_hops(vip, &strs(&h123), Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 1..=3 {
        let want = if rescue { 2 } else { 0 };
        assert_eq!(
            metric(&lab, i, "portico_ecmp_members"),
            want,
            "node {i} copies to the two others"
        );
        // the same state, with its reason word, in /status
        let st = lab.status(i);
        let e = &st["bgp"]["ecmp_rescue"];
        assert_eq!(
            (
                e["reason"].as_str(),
                e["members"].as_array().map_or(0, |m| m.len() as u64)
            ),
            (Some(if rescue { "on" } else { "disabled" }), want),
            "node {i}: {st}"
        );
    }
    let copied_before_leave: u64 = (1..=3)
        .map(|i| metric(&lab, i, "portico_ecmp_segments_copied_total"))
        .sum();

    // node 1 leaves gracefully: withdraw, grace, drain (its own connections end with the
    // drain); the router re-hashes over the two others
    clients.step.store(2, Ordering::Relaxed);
    let copied_n1 = metric(&lab, 1, "portico_ecmp_segments_copied_total");
    assert!(
        lab.nodes[0].stop(sys::SIGTERM, Duration::from_secs(60)),
        "node 1 exits on SIGTERM:\n{}",
        lab.nodes[0].log_tail()
    );
    lab.wait_next_hops(vip, &strs(&h23), Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let copied = copied_n1
        + (2..=3)
            .map(|i| metric(&lab, i, "portico_ecmp_segments_copied_total"))
            .sum::<u64>();
    let took = t0.elapsed();
    clients.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    let breaks = clients.breaks.lock().unwrap().clone();
    let leaving = breaks
        .iter()
        .filter(|b| b.step == 2 && b.node.as_deref() == Some("node-1"))
        .count();
    let mut broken = [0; 3];
    for b in &breaks {
        if !(b.step == 2 && b.node.as_deref() == Some("node-1")) {
            broken[b.step] += 1;
        }
    }
    let requests = clients.requests.load(Ordering::Relaxed);
    let first = clients.first.lock().unwrap().clone();
    println!(
        "ecmp_rescue {rescue}, {family}{}: {CONNS} connections (first answered by {first:?}), {requests} requests over {took:?}; broken to surviving nodes per step {:?}: {broken:?}; node 1's own cut by its drain: {leaving}; segments copied: {copied} ({copied_before_leave} by the end of the join), {:.1}/s",
        if kernel { ", kernel path" } else { "" },
        STEPS,
        copied as f64 / took.as_secs_f64()
    );
    if rescue && broken.iter().sum::<usize>() > 0 {
        println!(
            "breaks: {breaks:#?}\nn2:\n{}\nn3:\n{}",
            lab.nodes[1].log_tail(),
            lab.nodes[2].log_tail()
        );
    }
    Run {
        broken,
        leaving,
        breaks,
        requests,
        copied,
        took,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_survive_a_node_joining_and_leaving_the_ecmp_set() {
    if !can_run() {
        return;
    }
    if !succeeds(&["nft", "--version"]) {
        sys::skip_test("needs `nft` (the nftables package)");
        return;
    }
    let with = run(true, false, false).await;
    rescued(&with);
    let without = run(false, false, false).await;
    assert!(
        without.broken[1] + without.broken[2] > 0,
        "without the rescue the re-hash resets connections to surviving nodes (else the test proves nothing): {:#?}",
        without.breaks
    );
    assert_eq!(without.copied, 0);
    // IPv6: the VIP, the clients and the gossip (the members' addresses copies go to)
    let v6 = run(true, true, false).await;
    rescued(&v6);
    // the kernel path: the holder's conntrack DNATs the copy to its backend
    let kernel = run(true, false, true).await;
    rescued(&kernel);
    println!(
        "summary: with the rescue {:?} broken (+{} of the leaving node), {} segments copied in {:?}; without {:?} broken (+{} of the leaving node); IPv6 with the rescue {:?} broken, {} segments copied; kernel path with the rescue {:?} broken, {} segments copied",
        with.broken,
        with.leaving,
        with.copied,
        with.took,
        without.broken,
        without.leaving,
        v6.broken,
        v6.copied,
        kernel.broken,
        kernel.copied
    );
}

/// The rescue's promises for one run.
fn rescued(r: &Run) {
    assert!(r.requests > CONNS * 20, "requests: {}", r.requests);
    assert_eq!(
        r.broken,
        [0, 0, 0],
        "with the rescue no connection to a surviving node breaks: {:#?}",
        r.breaks
    );
    assert!(
        r.copied > 0,
        "the rescue copied segments (the router did re-hash)"
    );
    // a copy that is copied again would loop between members: far more copies than segments
    assert!(
        r.copied < 5 * r.requests as u64,
        "copies loop: {} segments copied for {} requests",
        r.copied,
        r.requests
    );
}

fn succeeds(cmd: &[&str]) -> bool {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
