//! Scale in simulation: N agent cores exchanging heartbeats through an in-process network
//! under simulated time (no sockets, no runtime), measuring per-node traffic, the time to
//! converge (every VIP claimed by exactly one live node) after a node dies and after a
//! partition heals, and the cost of one ownership decision.
//!
//! The default run is small (5 nodes × 100 VIPs) so that it runs in CI; the figures in
//! ARCHITECTURE.md come from runs such as
//! ```sh
//! PORTICO_SCALE_NODES=30 PORTICO_SCALE_VIPS=1000 \
//!   cargo test --release -p agent --test scale -- --nocapture
//! ```
//! (`one_decision_costs` alone at 100 × 5,000: the full simulation at that size takes hours,
//! which is itself the finding: see ARCHITECTURE.md, "Scale").

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use agent::core::{Action, Core, Event};
use agent::local_facts;
use agent::seal::OVERHEAD;
use model::{Config, HealthView};
use tokio::time::Instant;

const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
/// One-way network delay of the simulated LAN.
const LATENCY: Duration = Duration::from_micros(200);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8)),
        7946,
    )
}

/// The configs of `n` nodes sharing `v` VIPs (one service per VIP, so nothing but the load cap
/// constrains placement).
fn configs(n: usize, v: usize) -> Vec<Arc<Config>> {
    let services: String = (0..v)
        .map(|k| {
            format!(
                "  - name: s{k}\n    vips: [10.{}.{}.{}]\n    ports: [{{port: 80}}]\n    backends: [{{address: 192.168.0.1}}]\n",
                100 + k / 62500,
                (k / 250) % 250,
                k % 250 + 1
            )
        })
        .collect();
    let yaml = format!(
        "node:\n  name: node-0\n  interfaces: [{{name: eth0, addresses: [10.0.0.1/8]}}]\n\
         cluster:\n  bind: {}\n  peers: [{{name: node-1, address: {}}}]\n  keys: [{{id: 1, secret: \"{KEY}\"}}]\n\
         services:\n{services}",
        addr(0),
        addr(1)
    );
    let base = model::config::parse(&yaml, &Default::default()).expect("valid");
    (0..n)
        .map(|i| {
            let mut c = base.clone();
            c.node.name = name(i);
            c.cluster.bind = addr(i);
            c.cluster.advertise = addr(i);
            c.cluster.peers = (0..n)
                .filter(|j| *j != i)
                .map(|j| model::Peer {
                    name: name(j),
                    address: addr(j),
                })
                .collect();
            Arc::new(c)
        })
        .collect()
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tick(u64),
    Deliver(usize, usize),
}

struct Sim {
    now: Instant,
    nodes: Vec<Core>,
    up: Vec<bool>,
    /// Whether the node's process has started (events before are dropped).
    started: Vec<bool>,
    wake_gen: Vec<u64>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize, Kind)>>,
    inflight: BTreeMap<u64, agent::wire::Heartbeat>,
    seq: u64,
    side: Option<Vec<bool>>,
    packets: Vec<u64>,
    bytes: Vec<u64>,
    decisions: u64,
}

impl Sim {
    fn new(n: usize, v: usize) -> Self {
        let t0 = Instant::now();
        let nodes: Vec<Core> = configs(n, v)
            .into_iter()
            .map(|c| {
                let f = local_facts(&c, &HealthView::new());
                Core::new(c, f, true, t0)
            })
            .collect();
        let mut s = Sim {
            now: t0,
            up: vec![true; n],
            started: vec![false; n],
            wake_gen: vec![0; n],
            queue: BinaryHeap::new(),
            inflight: BTreeMap::new(),
            seq: 0,
            side: None,
            packets: vec![0; n],
            bytes: vec![0; n],
            decisions: 0,
            nodes,
        };
        for i in 0..n {
            // nodes start within the first 40 ms, not in lockstep
            let at = t0 + Duration::from_micros((i as u64 * 7919) % 40_000);
            s.push(at, i, Kind::Tick(u64::MAX));
        }
        s
    }

    fn push(&mut self, at: Instant, node: usize, k: Kind) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, node, k)));
    }

    fn apply(&mut self, i: usize, acts: Vec<Action>) {
        for a in acts {
            if let Action::Heartbeat(hb, to) = a {
                let size = (OVERHEAD + name(i).len() + hb.encode().len()) as u64;
                self.seq += 1;
                let id = self.seq;
                self.inflight.insert(id, hb);
                let to: Vec<usize> = to
                    .iter()
                    .filter_map(|n| n.strip_prefix("node-")?.parse().ok())
                    .collect();
                for j in to {
                    self.packets[i] += 1;
                    self.bytes[i] += size;
                    let cut = self.side.as_ref().is_some_and(|s| s[i] != s[j]);
                    if !cut {
                        self.push(self.now + LATENCY, j, Kind::Deliver(i, id as usize));
                    }
                }
            }
        }
        let wake = self.nodes[i].next_wake(self.now);
        self.wake_gen[i] += 1;
        let g = self.wake_gen[i];
        self.push(wake, i, Kind::Tick(g));
    }

    /// Runs the simulation until `until`.
    fn run(&mut self, until: Instant) {
        while let Some(Reverse((at, _, _, _))) = self.queue.peek() {
            if *at > until {
                break;
            }
            let Some(Reverse((at, _, i, k))) = self.queue.pop() else {
                break;
            };
            self.now = at;
            if matches!(k, Kind::Tick(u64::MAX)) {
                self.started[i] = true;
            }
            if !self.up[i] || !self.started[i] {
                continue;
            }
            let acts = match k {
                Kind::Tick(g) if g == u64::MAX => self.nodes[i].handle(Event::Start, at),
                Kind::Tick(g) => {
                    if g != self.wake_gen[i] {
                        continue;
                    }
                    self.decisions += 1;
                    self.nodes[i].handle(Event::Tick, at)
                }
                Kind::Deliver(from, id) => {
                    let Some(hb) = self.inflight.get(&(id as u64)).cloned() else {
                        continue;
                    };
                    self.nodes[i].handle(
                        Event::Heartbeat {
                            from: name(from),
                            epoch: 1,
                            hb,
                        },
                        at,
                    )
                }
            };
            self.apply(i, acts);
            // heartbeats older than every delivery can be forgotten
            if self.inflight.len() > 4 * self.nodes.len() {
                let keep: BTreeSet<u64> = self
                    .queue
                    .iter()
                    .filter_map(|Reverse((_, _, _, k))| match k {
                        Kind::Deliver(_, id) => Some(*id as u64),
                        _ => None,
                    })
                    .collect();
                self.inflight.retain(|id, _| keep.contains(id));
            }
        }
        self.now = until;
    }

    /// Whether every VIP is claimed by exactly one live node (within each side of a partition).
    fn converged(&self, vips: usize) -> bool {
        let groups: Vec<Vec<usize>> = match &self.side {
            None => vec![(0..self.nodes.len()).filter(|i| self.up[*i]).collect()],
            Some(s) => [true, false]
                .iter()
                .map(|x| {
                    (0..self.nodes.len())
                        .filter(|i| self.up[*i] && s[*i] == *x)
                        .collect()
                })
                .collect(),
        };
        groups.iter().filter(|g| !g.is_empty()).all(|g| {
            let mut seen = BTreeSet::new();
            let mut total = 0;
            for i in g {
                total += self.nodes[*i].owned().len();
                seen.extend(self.nodes[*i].owned().iter().copied());
            }
            total == vips && seen.len() == vips
        })
    }

    /// Runs in steps of 5 ms until converged (bounded); the time it took.
    fn until_converged(&mut self, vips: usize, limit: Duration) -> Duration {
        let start = self.now;
        while self.now < start + limit {
            let next = self.now + Duration::from_millis(5);
            self.run(next);
            if self.converged(vips) {
                return self.now - start;
            }
        }
        panic!("not converged within {limit:?}");
    }
}

#[test]
fn converges_after_a_death_and_a_healed_partition_and_reports_traffic() {
    let n = env("PORTICO_SCALE_NODES", 5);
    let v = env("PORTICO_SCALE_VIPS", 100);
    if env("PORTICO_SCALE_FULL", 1) == 0 {
        return;
    }
    let wall = std::time::SystemTime::now();
    let mut sim = Sim::new(n, v);
    let start = sim.until_converged(v, Duration::from_secs(5));
    println!("{n} nodes x {v} VIPs: converged {start:?} after start");
    // steady state: traffic per node over 1 s
    sim.run(sim.now + Duration::from_millis(500));
    let (p0, b0, d0) = (sim.packets.clone(), sim.bytes.clone(), sim.decisions);
    let decided0: u64 = sim.nodes.iter().map(Core::decisions).sum();
    let t = sim.now;
    sim.run(t + Duration::from_secs(1));
    let steady: u64 = sim.nodes.iter().map(Core::decisions).sum::<u64>() - decided0;
    println!("steady: {steady} ownership decisions in 1 s in all");
    assert!(
        steady <= n as u64,
        "with nothing changing a node decides at most once (its hold-down ending): {steady}"
    );
    let pps: Vec<u64> = sim.packets.iter().zip(&p0).map(|(a, b)| a - b).collect();
    let bps: Vec<u64> = sim.bytes.iter().zip(&b0).map(|(a, b)| a - b).collect();
    let avg = |x: &[u64]| x.iter().sum::<u64>() as f64 / x.len() as f64;
    println!(
        "steady: per node {:.0} packets/s, {:.0} bytes/s (max {} bytes/s); {} timer ticks/s in all",
        avg(&pps),
        avg(&bps),
        bps.iter().max().unwrap(),
        sim.decisions - d0
    );
    let decided: u64 = sim.nodes.iter().map(Core::decisions).sum();
    println!(
        "ownership decisions so far: {decided} ({:.1} per node)",
        decided as f64 / n as f64
    );
    // the heartbeat's size is bounded by what one node claims
    let interval = sim.nodes[0].detection().interval;
    let expected = (n - 1) as f64 * (Duration::from_secs(1).as_secs_f64() / interval.as_secs_f64());
    assert!(
        avg(&pps) <= expected * 1.5,
        "{} packets/s per node, expected about {expected}",
        avg(&pps)
    );

    // a node dies
    let victim = 1;
    sim.up[victim] = false;
    let had = sim.nodes[victim].owned().len();
    let took = sim.until_converged(v, Duration::from_secs(5));
    println!("death of a node owning {had} VIPs: converged after {took:?}");
    let dead = sim.nodes[0].detection().dead_after();
    assert!(
        took <= dead + Duration::from_millis(60),
        "{took:?} after a death (dead after {dead:?})"
    );

    // partition in halves for 2 s, then heal
    let side: Vec<bool> = (0..n).map(|i| i < n / 2).collect();
    sim.side = Some(side);
    let split = sim.until_converged(v, Duration::from_secs(5));
    println!("partition: each side owns every VIP after {split:?}");
    sim.run(sim.now + Duration::from_secs(2));
    sim.side = None;
    let healed = sim.until_converged(v, Duration::from_secs(10));
    println!("partition healed: one owner per VIP after {healed:?}");
    assert!(healed <= Duration::from_secs(1), "{healed:?}");
    let decided: u64 = sim.nodes.iter().map(Core::decisions).sum();
    println!(
        "ownership decisions in all: {decided} ({:.1} per node)",
        decided as f64 / n as f64
    );
    println!(
        "wall time {:?}",
        std::time::SystemTime::now()
            .duration_since(wall)
            .unwrap_or_default()
    );
}

/// The cost of one ownership decision at the simulated size: one node hears every peer for
/// the first time (each heartbeat changes the alive set, so each is one decision).
#[test]
fn one_decision_costs() {
    let n = env("PORTICO_SCALE_NODES", 5);
    let v = env("PORTICO_SCALE_VIPS", 100);
    let cfgs = configs(n, v);
    let t0 = Instant::now();
    let f = local_facts(&cfgs[0], &HealthView::new());
    let mut core = Core::new(cfgs[0].clone(), f.clone(), true, t0);
    core.handle(Event::Start, t0);
    let before = core.decisions();
    let wall = std::time::SystemTime::now();
    let claims_each = v / n;
    for j in 1..n {
        let hb = agent::wire::Heartbeat {
            leaving: false,
            interval: core.detection().interval,
            facts: f.clone(),
            claims: (0..claims_each)
                .map(|k| IpAddr::V4(Ipv4Addr::new(10, 200, j as u8, k as u8)))
                .collect(),
        };
        let size = OVERHEAD + name(j).len() + hb.encode().len();
        if j == 1 {
            println!(
                "{n} nodes x {v} VIPs: a heartbeat claiming {claims_each} VIPs is {size} bytes"
            );
        }
        core.handle(
            Event::Heartbeat {
                from: name(j),
                epoch: 1,
                hb,
            },
            t0 + Duration::from_millis(1),
        );
    }
    let took = std::time::SystemTime::now()
        .duration_since(wall)
        .unwrap_or_default();
    let made = core.decisions() - before;
    assert!(made >= (n - 1) as u64);
    println!(
        "{n} nodes x {v} VIPs: {made} decisions in {took:?}, {:?} each",
        took / made.max(1) as u32
    );
}
