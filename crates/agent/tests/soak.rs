//! Measurement (ignored by default): clusters of agents over loopback for a while, counting
//! ownership changes that nothing caused (false takeovers) and the gossip traffic per node.
//!
//! ```sh
//! PORTICO_SOAK_SECS=600 cargo test --release -p agent --test soak -- --ignored --nocapture
//! ```
//! runs, side by side, 3-node clusters of both profiles with the agent on its own thread under
//! real-time scheduling (as the binary runs it by default), on its own thread at nice -20, and
//! at normal priority on the shared runtime. Run it with and without busy loops on the host
//! (`for i in 1 2 3 4; do timeout 600 sh -c 'while :; do :; done' & done`).
//! `PORTICO_SOAK_NODES=30` measures the traffic of a 30-node cluster instead;
//! `PORTICO_SOAK_PRIORITY=realtime` (or `high`, `normal`) runs only the clusters of that priority.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agent::Agent;
use model::AgentPriority;
use model::{Desired, HealthView, OwnershipView};
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

fn config(i: usize, ports: &[u16], profile: &str, vips: usize) -> model::Config {
    let peers: Vec<String> = (0..ports.len())
        .filter(|j| *j != i)
        .map(|j| format!("    - {{name: node-{j}, address: 127.0.0.1:{}}}", ports[j]))
        .collect();
    let vips: Vec<String> = (0..vips).map(|v| format!("10.0.1.{}", v + 1)).collect();
    let yaml = format!(
        "node:\n  name: node-{i}\n  interfaces: [{{name: test0, addresses: [10.0.0.{}/16]}}]\n\
         cluster:\n  bind: 127.0.0.1:{}\n  peers:\n{}\n  keys: [{{id: 1, secret: \"{KEY}\"}}]\n  profile: {profile}\n  hold_down: 1s\n\
         services:\n  - name: web\n    vips: [{}]\n    ports: [{{port: 80}}]\n    backends: [{{address: 192.168.0.1}}]\n",
        i + 1,
        ports[i],
        peers.join("\n"),
        vips.join(", ")
    );
    model::config::parse(&yaml, &Default::default()).expect("test config is valid")
}

struct Node {
    agent: Agent,
    own: watch::Receiver<Arc<OwnershipView>>,
    _keep: (watch::Sender<Arc<Desired>>, watch::Sender<Arc<HealthView>>),
}

fn owned(v: &OwnershipView) -> BTreeSet<IpAddr> {
    v.iter()
        .filter(|(_, o)| o.reason == "owner")
        .map(|(k, _)| *k)
        .collect()
}

async fn cluster(
    n: usize,
    profile: &str,
    priority: AgentPriority,
    stop: &CancellationToken,
) -> Vec<Node> {
    let mut socks = Vec::new();
    for _ in 0..n {
        socks.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let ports: Vec<u16> = socks
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let mut nodes = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let agent = Agent::new(&mut Registry::default())
            .dry_run()
            .with_own_thread(priority);
        let (dtx, drx) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(config(i, &ports, profile, 2)),
        }));
        let (htx, hrx) = watch::channel(Arc::new(HealthView::new()));
        let (otx, orx) = watch::channel(Arc::new(OwnershipView::new()));
        let (a, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move {
            a.run(Some(s), drx, hrx, otx, stop)
                .await
                .expect("agent runs")
        });
        nodes.push(Node {
            agent,
            own: orx,
            _keep: (dtx, htx),
        });
    }
    nodes
}

/// Waits until every VIP has exactly one node reporting `owner`.
async fn settled(nodes: &[Node]) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let views: Vec<BTreeSet<IpAddr>> = nodes.iter().map(|n| owned(&n.own.borrow())).collect();
        let all: Vec<IpAddr> = views.iter().flatten().copied().collect();
        let set: BTreeSet<IpAddr> = all.iter().copied().collect();
        if set.len() == 2 && all.len() == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no agreement");
}

/// Counts every change of a node's owned set from now on.
fn count_flips(nodes: &[Node], label: String) -> Arc<AtomicU64> {
    let flips = Arc::new(AtomicU64::new(0));
    for n in nodes {
        let mut rx = n.own.clone();
        let mut last = owned(&rx.borrow_and_update());
        let f = flips.clone();
        let label = label.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let now = owned(&rx.borrow_and_update());
                if now != last {
                    f.fetch_add(1, Ordering::Relaxed);
                    eprintln!("flip ({label}): {last:?} -> {now:?}");
                    last = now;
                }
            }
        });
    }
    flips
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by hand (see the file's doc)"]
async fn soak_counts_false_takeovers_and_traffic() {
    let secs = env("PORTICO_SOAK_SECS", 20);
    let n = env("PORTICO_SOAK_NODES", 3) as usize;
    let stop = CancellationToken::new();
    let mut runs = Vec::new();
    use AgentPriority::{High, Normal, Realtime};
    let kinds: &[(&str, AgentPriority)] = if n == 3 {
        &[
            ("default", Realtime),
            ("fast", Realtime),
            ("default", High),
            ("fast", High),
            ("default", Normal),
            ("fast", Normal),
        ]
    } else {
        &[("default", Realtime), ("fast", Realtime)]
    };
    // PORTICO_SOAK_PRIORITY=realtime|high|normal: only the clusters of that priority
    let only = std::env::var("PORTICO_SOAK_PRIORITY").ok();
    let kinds: Vec<&(&str, AgentPriority)> = kinds
        .iter()
        .filter(|(_, p)| {
            only.as_deref()
                .is_none_or(|o| format!("{p:?}").eq_ignore_ascii_case(o))
        })
        .collect();
    for (profile, own) in kinds {
        let nodes = cluster(n, profile, *own, &stop).await;
        settled(&nodes).await;
        // a home that started late takes its VIP back after hold_down (1 s): that move is by
        // design, not a false takeover, so count only after it
        tokio::time::sleep(Duration::from_secs(2)).await;
        settled(&nodes).await;
        let flips = count_flips(&nodes, format!("{profile}, {own:?}"));
        let before: Vec<agent::Stats> = nodes.iter().map(|x| x.agent.stats()).collect();
        runs.push((*profile, *own, nodes, flips, before));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let el = t.elapsed().as_secs_f64();
    for (profile, own, nodes, flips, before) in &runs {
        let (mut p, mut b) = (0u64, 0u64);
        for (x, s0) in nodes.iter().zip(before) {
            let s = x.agent.stats();
            p += s.sent_packets - s0.sent_packets;
            b += s.sent_bytes - s0.sent_bytes;
        }
        let per = nodes.len() as f64 * el;
        println!(
            "{profile} {} nodes, {}: {} ownership changes in {el:.0} s; per node {:.1} packets/s, {:.0} bytes/s",
            nodes.len(),
            match own {
                Realtime => "own thread, SCHED_RR 10",
                High => "own thread, nice -20",
                Normal => "shared runtime, nice 0",
            },
            flips.load(Ordering::Relaxed),
            p as f64 / per,
            b as f64 / per,
        );
    }
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}
