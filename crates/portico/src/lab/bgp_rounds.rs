//! The routed lab's measurements: the router's FIB watched through `ip monitor route`, the
//! held connections, one round of each scenario, and the summary table.
//!
//! The FIB is watched, not polled: `ip monitor route` in the router namespace prints each
//! change of a route as the kernel makes it; each printed change triggers an `ip route show
//! VIP` and a change of the next-hop set is stamped with the time the monitor's line was read
//! (a 250 ms refresh catches anything missed). A poll every 5 ms would cost a process start
//! per poll on this 2-core machine and measure 5 ms worse.

use tokio::io::AsyncBufReadExt;

use super::bgp::{BGP_VIP, BgpRunning, ROUTER_IP, node_ip};
use super::*;

/// Each change of the next hops: when, and the next hops after it (sorted).
type Changes = Arc<Mutex<Vec<(Instant, Vec<String>)>>>;

/// The router's next hops for the VIP over time.
pub(super) struct RouteWatch {
    changes: Changes,
    _monitor: tokio::process::Child,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next hops of `ip route show` output (sorted).
fn hops_of(route: &str) -> Vec<String> {
    let words: Vec<&str> = route.split_whitespace().collect();
    let mut hops: Vec<String> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    hops
}

async fn show_route(ns: &str) -> Vec<String> {
    let out = tokio::process::Command::new("ip")
        .args(["-n", ns, "-4", "route", "show", &BGP_VIP.to_string()])
        .output()
        .await;
    out.map(|o| hops_of(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

impl RouteWatch {
    pub(super) async fn start(lab: &Lab) -> anyhow::Result<Self> {
        let ns = lab.ns_router();
        let mut monitor = tokio::process::Command::new("ip")
            .args(["-n", &ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting ip monitor route")?;
        let stdout = monitor.stdout.take().context("ip monitor's output")?;
        let changes = Arc::new(Mutex::new(vec![(Instant::now(), show_route(&ns).await)]));
        let task = tokio::spawn({
            let changes = changes.clone();
            async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                let mut refresh = tokio::time::interval(Duration::from_millis(250));
                // bounded: the lab ends (and aborts this task) long before
                for _ in 0..10_000_000u64 {
                    let at = tokio::select! {
                        l = lines.next_line() => match l {
                            Ok(Some(_)) => Instant::now(),
                            _ => return,
                        },
                        _ = refresh.tick() => Instant::now(),
                    };
                    let hops = show_route(&ns).await;
                    let mut c = changes.lock().unwrap_or_else(|e| e.into_inner());
                    if c.last().is_none_or(|(_, h)| *h != hops) {
                        c.push((at, hops));
                    }
                }
            }
        });
        Ok(RouteWatch {
            changes,
            _monitor: monitor,
            task,
        })
    }

    /// The next hops now.
    pub(super) fn hops(&self) -> Vec<String> {
        let c = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        c.last().map(|(_, h)| h.clone()).unwrap_or_default()
    }

    /// Waits until the VIP has `n` next hops.
    pub(super) async fn wait_hops(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        while self.hops().len() != n {
            if Instant::now() >= until {
                bail!(
                    "the router's route to {BGP_VIP} has next hops {:?}, not {n}, after {within:?}",
                    self.hops()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits (at most `within` after `t0`) for the first change after `t0` to a next-hop set
    /// for which `want` holds; returns its time.
    async fn wait_change(
        &self,
        t0: Instant,
        within: Duration,
        want: impl Fn(&[String]) -> bool,
    ) -> Option<Instant> {
        loop {
            {
                let c = self.changes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((t, _)) = c.iter().find(|(t, h)| *t >= t0 && want(h)) {
                    return Some(*t);
                }
            }
            if Instant::now() >= t0 + within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What the held connections saw.
#[derive(Default)]
struct HeldState {
    /// Bumped by [`Held::reopen`]: connections of an older generation close quietly.
    generation: u64,
    /// Per connection: the node it is open to and its generation (`None`: reconnecting).
    conns: Vec<Option<(String, u64)>>,
    /// Each break: when the failed request started, the connection's node, and how it broke.
    breaks: Vec<(Instant, String, Break)>,
}

/// How a held connection broke: the word tells a reset (the node or one in between answered
/// with RST, or closed) from a stall (no answer within [`HELD_ANSWER`]: segments lost or held
/// up while the router's next hops changed), which need different fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Break {
    /// The write failed, or the read ended in an error or EOF.
    Reset,
    /// No answer within [`HELD_ANSWER`].
    Stalled,
    /// An answer that was not the echo.
    Garbled,
}

/// Long-lived connections from the client to the VIP's echo port, each sending a request every
/// 100 ms; one that fails (reset, closed, or no answer within 1 s) counts as broken and is
/// opened again.
pub(super) struct Held {
    state: Arc<Mutex<HeldState>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

const HELD_EVERY: Duration = Duration::from_millis(100);
const HELD_ANSWER: Duration = Duration::from_secs(1);

impl Held {
    pub(super) fn start(lab: &Lab, n: usize, stop: Arc<AtomicBool>) -> Held {
        let state = Arc::new(Mutex::new(HeldState {
            generation: 0,
            conns: vec![None; n],
            breaks: Vec::new(),
        }));
        let thread = in_netns(&lab.ns_client(), {
            let state = state.clone();
            move || {
                Box::pin(async move {
                    let tasks: Vec<_> = (0..n)
                        .map(|slot| tokio::spawn(held_one(slot, state.clone(), stop.clone())))
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                })
            }
        });
        Held { state, thread }
    }

    /// (connections open now, of them to `node`).
    fn open(&self, node: &str) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (
            s.conns.iter().filter(|c| c.is_some()).count(),
            s.conns
                .iter()
                .filter(|c| c.as_ref().is_some_and(|(n, _)| n == node))
                .count(),
        )
    }

    /// Closes every connection (not counted as broken) and waits until all are open again,
    /// spread by the router over the next hops it has now.
    async fn reopen(&self, within: Duration) -> anyhow::Result<()> {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.generation += 1;
            s.conns.iter_mut().for_each(|c| *c = None);
        }
        self.wait_all(within).await
    }

    /// Waits until every connection is open.
    async fn wait_all(&self, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        loop {
            let (open, total) = {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let g = s.generation;
                (
                    s.conns
                        .iter()
                        .filter(|c| c.as_ref().is_some_and(|(_, cg)| *cg == g))
                        .count(),
                    s.conns.len(),
                )
            };
            if open == total {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("only {open} of {total} held connections open after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Breaks in `[from, to]`: (to `node`, to other nodes, each break on other nodes as
    /// `(node, how, ms after `t0`)`).
    fn broken(
        &self,
        from: Instant,
        to: Instant,
        t0: Instant,
        node: &str,
    ) -> (usize, Vec<OtherBreak>) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let w: Vec<&(Instant, String, Break)> = s
            .breaks
            .iter()
            .filter(|(t, _, _)| *t >= from && *t <= to)
            .collect();
        let on = w.iter().filter(|(_, n, _)| n == node).count();
        // wall-clock time of each break, to find it in the nodes' logs and packet captures
        let (wall, now) = (std::time::SystemTime::now(), Instant::now());
        let others = w
            .iter()
            .filter(|(_, n, _)| n != node)
            .map(|(t, n, how)| OtherBreak {
                node: n.clone(),
                how: *how,
                unix_s: wall
                    .checked_sub(now.saturating_duration_since(*t))
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64()),
                at_ms: if *t >= t0 {
                    ms(t.saturating_duration_since(t0))
                } else {
                    -ms(t0.saturating_duration_since(*t))
                },
            })
            .collect();
        (on, others)
    }

    pub(super) fn join(self) {
        let _ = self.thread.join();
    }
}

/// One held connection, reopened after each break, until `stop` (at most two hours).
async fn held_one(slot: usize, state: Arc<Mutex<HeldState>>, stop: Arc<AtomicBool>) {
    let target = SocketAddr::from((BGP_VIP, 81));
    let until = Instant::now() + Duration::from_secs(2 * 3600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let generation = state.lock().unwrap_or_else(|e| e.into_inner()).generation;
        let Some((mut s, node)) = held_connect(target).await else {
            tokio::time::sleep(HELD_EVERY).await;
            continue;
        };
        {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if st.generation != generation {
                continue;
            }
            st.conns[slot] = Some((node.clone(), generation));
        }
        let mut tick = tokio::time::interval(HELD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if state.lock().unwrap_or_else(|e| e.into_inner()).generation != generation {
                // reopened: close quietly
                break;
            }
            let at = Instant::now();
            let mut buf = [0u8; 5];
            let broke = if s.write_all(b"ping\n").await.is_err() {
                Some(Break::Reset)
            } else {
                match tokio::time::timeout(HELD_ANSWER, s.read_exact(&mut buf)).await {
                    Ok(Ok(_)) if &buf == b"ping\n" => None,
                    Ok(Ok(_)) => Some(Break::Garbled),
                    Ok(Err(_)) => Some(Break::Reset),
                    Err(_) => Some(Break::Stalled),
                }
            };
            if let Some(how) = broke {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                if st.generation == generation {
                    st.conns[slot] = None;
                    st.breaks.push((at, node, how));
                }
                break;
            }
        }
    }
}

/// Connects and reads the hello line (the node's name).
async fn held_connect(target: SocketAddr) -> Option<(tokio::net::TcpStream, String)> {
    let mut s = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .ok()?
    .ok()?;
    let mut name = Vec::new();
    let read = async {
        let mut b = [0u8; 1];
        // bounded: a name is short
        for _ in 0..64 {
            s.read_exact(&mut b).await.ok()?;
            if b[0] == b'\n' {
                return Some(());
            }
            name.push(b[0]);
        }
        None
    };
    tokio::time::timeout(Duration::from_millis(500), read)
        .await
        .ok()??;
    let name = String::from_utf8_lossy(&name).to_string();
    (!name.is_empty()).then_some((s, name))
}

/// One measured round. Times are ms after the fault.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(super) struct BgpRound {
    pub(super) router: String,
    pub(super) system: String,
    /// BFD and hold timers of both sides.
    pub(super) timers: String,
    pub(super) scenario: String,
    pub(super) round: usize,
    /// The node the fault hit (or that joined).
    pub(super) node: String,
    /// Fault to the first successful probe after the last failed one (0: none failed).
    pub(super) outage_ms: f64,
    /// Probes that failed from the fault until the round settled.
    pub(super) failed_probes: usize,
    /// Probes in that time.
    pub(super) probes: usize,
    /// Start of each failed probe, ms after the fault.
    pub(super) failed_at_ms: Vec<f64>,
    /// Fault to the router's FIB dropping the node's next hop (join: adding it).
    pub(super) fib_ms: Option<f64>,
    /// Held connections open at the fault, and of them to the node.
    pub(super) held: usize,
    pub(super) held_on_node: usize,
    /// Held connections broken in the round: to the node, to the other nodes.
    pub(super) broken_on_node: usize,
    pub(super) broken_on_others: usize,
    /// How and when each connection to another node broke.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) others_broken: Vec<OtherBreak>,
    /// Graceful stop: SIGTERM to the speaker's exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) exit_ms: Option<f64>,
}

/// A held connection to a node other than the round's that broke.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct OtherBreak {
    pub(super) node: String,
    pub(super) how: Break,
    /// When its failed request started, ms after the fault (negative: before).
    pub(super) at_ms: f64,
    /// The same instant as seconds since the Unix epoch (`date -d @<s>`).
    pub(super) unix_s: f64,
}

impl BgpRound {
    /// The round as one log line.
    pub(super) fn line(&self) -> String {
        format!(
            "{:>16} {:>9} #{} {}: outage {:>7.1} ms, FIB {} ms, failed probes {}/{}, held connections broken {} on {} ({} held there) + {} on others (of {}){}{}",
            self.system,
            self.scenario,
            self.round,
            self.node,
            self.outage_ms,
            self.fib_ms.map_or("-".into(), |v| format!("{v:.1}")),
            self.failed_probes,
            self.probes,
            self.broken_on_node,
            self.node,
            self.held_on_node,
            self.broken_on_others,
            self.held,
            self.others_broken
                .iter()
                .map(|b| {
                    format!(
                        " [{} {:?} at {:.0} ms, @{:.3}]",
                        b.node, b.how, b.at_ms, b.unix_s
                    )
                })
                .collect::<String>(),
            self.exit_ms
                .map_or(String::new(), |t| format!(", exit {t:.0} ms after SIGTERM")),
        )
    }
}

/// Waits until the last 500 ms of probes all succeeded.
async fn wait_probes_ok(obs: &Arc<Mutex<Observed>>, max: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + max;
    let window = Duration::from_millis(500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let recent: Vec<&Probe> = o
            .probes
            .iter()
            .filter(|p| {
                let age = now.saturating_duration_since(p.start);
                age <= window + CONNECT_TIMEOUT * 4 && age > CONNECT_TIMEOUT * 4
            })
            .collect();
        if recent.len() >= 10 && recent.iter().all(|p| p.node.is_some()) {
            return Ok(());
        }
    }
    bail!("probes of the VIP did not all succeed for 500 ms within {max:?}")
}

/// One round of `scenario` on node `((round - 1) mod N) + 1`.
pub(super) async fn round_bgp(
    lab: &Lab,
    run: &mut BgpRunning,
    obs: &Arc<Mutex<Observed>>,
    held: &Held,
    watch: &RouteWatch,
    scenario: &str,
    round: usize,
) -> anyhow::Result<BgpRound> {
    let n = lab.nodes;
    let i = (round - 1) % n + 1;
    let node = format!("node-{i}");
    let hop = node_ip(i);
    watch.wait_hops(n, Duration::from_secs(60)).await?;
    run.wait_bfd_up(lab, Duration::from_secs(30)).await?;
    if scenario == "join" {
        run.stop_node(i).await;
        watch.wait_hops(n - 1, Duration::from_secs(30)).await?;
    }
    held.reopen(Duration::from_secs(20)).await?;
    wait_probes_ok(obs, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (open, open_on_node) = held.open(&node);
    let ns = lab.ns_node(i);
    let mut t0 = Instant::now();
    let fault_started = t0;
    let mut exited = None;
    match scenario {
        "power" => {
            sh_in(&ns, &["ip", "link", "set", "eth0", "down"])?;
            // the fault happens inside that command, just before it exits: time from its exit
            t0 = Instant::now();
            run.signal_node(i, sys::SIGKILL);
            if let Some(pid) = run.backends.remove(&i) {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        "graceful" => {
            let pids = run.signal_node(i, sys::SIGTERM);
            exited = Some(tokio::spawn(async move {
                for pid in pids {
                    if !wait_gone(pid, Duration::from_secs(40)).await {
                        return None;
                    }
                }
                Some(t0.elapsed())
            }));
        }
        "backend" => {
            if let Some(pid) = run.backends.remove(&i) {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        "join" => run.start_node(lab, i)?,
        _ => bail!("unknown scenario {scenario}"),
    }
    // the router's FIB: the node's next hop leaves (joins) the multipath route
    let joins = scenario == "join";
    let fib_at = watch
        .wait_change(t0, Duration::from_secs(30), |h| {
            h.contains(&hop) == joins && h.len() == if joins { n } else { n - 1 }
        })
        .await;
    // settle: 1.5 s after the change (bounded when it never came)
    let settle_from = fib_at.unwrap_or(t0);
    tokio::time::sleep_until(settle_from + Duration::from_millis(1500)).await;
    let settle = Instant::now();
    let end = settle - CONNECT_TIMEOUT * 4;
    let (probes, failed_at) = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let w: Vec<&Probe> = o
            .probes
            .iter()
            .filter(|p| p.start + PROBE_EVERY >= t0 && p.start <= end)
            .collect();
        let failed: Vec<Instant> = w
            .iter()
            .filter(|p| p.node.is_none())
            .map(|p| p.start)
            .collect();
        let outage = failed.last().map(|last| {
            w.iter()
                .filter(|p| p.start > *last && p.node.is_some())
                .map(|p| p.start)
                .next()
                .unwrap_or(settle)
                .saturating_duration_since(t0)
        });
        (w.len(), (failed, outage))
    };
    let (failed, outage) = failed_at;
    // the fault happened between `fault_started` and `t0` (a power loss: inside `ip link set
    // down`, which can take 100 ms to exit under load); a request sent up to one interval
    // before it may be the one the fault breaks
    let from = fault_started
        .checked_sub(HELD_EVERY)
        .unwrap_or(fault_started);
    let (broken_on_node, others_broken) = held.broken(from, settle, t0, &node);
    // repair
    let mut exit_ms = None;
    match scenario {
        "power" => {
            sh_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
            // the link going down took the default route with it
            sh_in(
                &ns,
                &["ip", "route", "replace", "default", "via", ROUTER_IP],
            )?;
            run.start_backend(lab, i)?;
            run.start_node(lab, i)?;
        }
        "graceful" => {
            if let Some(w) = exited
                && let Ok(Some(took)) = w.await
            {
                exit_ms = Some(ms(took));
            }
            run.start_node(lab, i)?;
        }
        "backend" => run.start_backend(lab, i)?,
        _ => {}
    }
    watch
        .wait_hops(n, Duration::from_secs(60))
        .await
        .with_context(|| format!("{}: {node} never came back after {scenario}", run.name))?;
    Ok(BgpRound {
        router: run.router.clone(),
        system: run.name.clone(),
        timers: run.system.timers(),
        scenario: scenario.to_string(),
        round,
        node,
        outage_ms: outage.map_or(0.0, ms),
        failed_probes: failed.len(),
        probes,
        failed_at_ms: failed
            .iter()
            .map(|f| {
                if *f >= t0 {
                    ms(f.saturating_duration_since(t0))
                } else {
                    -ms(t0.saturating_duration_since(*f))
                }
            })
            .collect(),
        fib_ms: fib_at.map(|t| ms(t.saturating_duration_since(t0))),
        held: open,
        held_on_node: open_on_node,
        broken_on_node,
        broken_on_others: others_broken.len(),
        others_broken,
        exit_ms,
    })
}

/// `median (min-max)` of `v`, `-` when empty.
fn spread(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:.0} ({:.0}-{:.0})", v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Prints the summary table of every round.
pub(super) fn print_bgp_table(rounds: &[BgpRound], args: &LabArgs) {
    println!(
        "\nBGP lab, router {}, {} nodes, {} rounds per scenario; probes: one connection at a time every 10 ms (50 ms connect timeout), \
         spread over the nodes by the router's port hash; {} held connections, a request every 100 ms each. \
         Outage: fault to the first successful probe after the last failed one. Times: median (min-max) ms.",
        args.router, args.nodes, args.rounds, 20
    );
    println!(
        "| router | system | timers | scenario | outage (ms) | FIB changed (ms) | failed probes (total) | held connections broken on the node / open there | broken on other nodes / open there |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rounds {
        let k = (r.system.clone(), r.scenario.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (s, sc) in keys {
        let rs: Vec<&BgpRound> = rounds
            .iter()
            .filter(|r| r.system == s && r.scenario == sc)
            .collect();
        let sum = |f: fn(&BgpRound) -> usize| rs.iter().map(|r| f(r)).sum::<usize>();
        println!(
            "| {} | {s} | {} | {sc} | {} | {} | {} / {} | {} / {} | {} / {} |",
            rs.first().map_or("", |r| r.router.as_str()),
            rs.first().map_or("", |r| r.timers.as_str()),
            spread(rs.iter().map(|r| r.outage_ms).collect()),
            spread(rs.iter().filter_map(|r| r.fib_ms).collect()),
            sum(|r| r.failed_probes),
            sum(|r| r.probes),
            sum(|r| r.broken_on_node),
            sum(|r| r.held_on_node),
            sum(|r| r.broken_on_others),
            sum(|r| r.held - r.held_on_node),
        );
    }
}
