//! `portico lab`: a network-namespace lab that measures VIP failover, portico against keepalived.
//!
//! Topology (all names start with a per-run prefix such as `pl4711`; addresses exist only
//! inside these namespaces):
//! ```text
//!   pl4711-c (client 10.99.0.2, MAC 02:00:00:00:00:fe) ──┐
//!   pl4711-n1 (node-1 10.99.0.11, 02:00:00:00:00:01) ────┤ br0 in pl4711-br
//!   pl4711-n2 (node-2 10.99.0.12, 02:00:00:00:00:02) ────┤
//!   …                                                    ┘
//!   VIP 10.99.0.100, port 80
//! ```
//! Each node runs one backend that answers every connection with its node name, and either
//! `portico run` (VIP:80 → its local backend at 127.0.0.1:808N) or keepalived (VRRPv3, VIP on
//! eth0, the backend on 0.0.0.0:80). A thread inside the client namespace opens a connection
//! to the VIP every 10 ms (50 ms connect timeout) and watches the client's ARP cache.
//!
//! Each round waits for a stable owner, injects a fault on it, and measures: *arp* (fault to the
//! client's ARP entry pointing at another MAC), *takeover* (fault to the first probe answered by
//! the new owner: the end of the window), failed probes in the window and after it (until the
//! round settles), and for a graceful stop the time from SIGTERM to the process's exit and
//! whether it put back the interface sysctls it changed. Probes run one at a time (see
//! [`probe`]). Health checks: `backends` runs portico with the default check (2s/1s, rise 2,
//! fall 3), `backends-tuned` and every other scenario with a tuned one (100ms/50ms, rise 1,
//! fall 2); each round states its settings. Then it
//! repairs the fault and checks, with ARP requests from the client, that exactly one MAC
//! answers for the VIP. Every namespace is deleted at the end, on error and on Ctrl-C/SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

mod backend;
mod bgp;
mod bgp_rounds;
mod gobgp;
mod probe;
mod report;
mod rounds;
mod systems;

use probe::{Observed, Probe, probe, start_prober};
use report::{Round, print_table};
use rounds::{ipv6_round, round_once};
use systems::Running;

/// Arguments of `portico lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// How the VIP reaches the nodes: `l2` (ARP, the failover lab: portico against keepalived)
    /// or `bgp` (every serving node announces a host route to a router namespace: ECMP, BFD;
    /// portico against FRR as the reference speaker, see `--router`).
    #[arg(long, default_value = "l2", value_parser = ["l2", "bgp"])]
    announce: String,
    /// `--announce bgp`: the router the nodes peer with: bird (BIRD 2, `merge paths on`), frr
    /// (zebra + bgpd + bfdd, `maximum-paths 8`) or gobgp (gobgpd; it has no BFD, so only
    /// portico-nobfd runs against it, and the lab copies its RIB into the FIB because gobgpd
    /// 3.10 cannot drive FRR 8.4's zebra).
    #[arg(long, default_value = "bird", value_parser = ["bird", "frr", "gobgp"])]
    router: String,
    /// `--announce bgp`: after the rounds, measure node-1's CPU (utime + stime of its portico)
    /// and the packets/s on the router's side of its link for this many seconds, with BFD at
    /// 10 ms x 3 (0: off).
    #[arg(long, default_value_t = 0)]
    cpu_seconds: u64,
    /// Node namespaces (2-9).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Rounds per scenario.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Scenarios. `l2` (default: hard,graceful,partition,backends,backends-tuned): hard (owner
    /// link down + agent SIGKILL), graceful (SIGTERM), partition (owner link down, then
    /// healed), backends (owner's backend killed; default health checks), backends-tuned (the
    /// same with tuned checks; portico only), conflict (a forged gratuitous ARP claims the VIP
    /// for another MAC; portico only). `bgp` (default: power,graceful,backend,join): power
    /// (a node's link down + SIGKILL), graceful (SIGTERM), backend (the node's backend killed),
    /// join (a stopped node starts and joins the ECMP set).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Systems. `l2` (default: all): portico-default, portico-fast, keepalived-1s,
    /// keepalived-fastest (advert_int 0.01). `bgp` (default: all): portico-bfd (BFD 300 ms x 3),
    /// portico-bfd-fast (50 ms x 3), portico-bfd-10ms (the `fast` profile, 10 ms x 3),
    /// portico-nobfd (hold time 3 s), frr-speaker (FRR's bgpd +
    /// bfdd on each node, 300 ms x 3: the reference speaker).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// portico: non-preemptive mode (a returning node does not take its VIP back).
    #[arg(long)]
    non_preemptive: bool,
    /// portico: hold-down before a returning node takes its VIP back.
    #[arg(long, default_value = "1s")]
    hold_down: String,
    /// Write every round as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the per-node logs (printed path) instead of deleting them.
    #[arg(long)]
    keep_logs: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Helper {
    /// Answer every TCP connection on LISTEN with NAME and a newline (a lab backend).
    #[command(hide = true)]
    Backend {
        /// Node name to answer.
        #[arg(long)]
        name: String,
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// Also echo every byte back on this address (the in-flight connection check).
        #[arg(long)]
        echo: Option<SocketAddr>,
        /// On the echo address, first send NAME and a newline (tells the client its node).
        #[arg(long)]
        hello: bool,
    },
    /// Exit 0 if a TCP connection to ADDR succeeds within 500 ms (keepalived's check script).
    #[command(hide = true)]
    Check {
        /// Address to connect to.
        addr: SocketAddr,
    },
}

const SCENARIOS: [&str; 6] = [
    "hard",
    "graceful",
    "partition",
    "backends",
    "backends-tuned",
    "conflict",
];

/// The tuned health check of the lab's portico nodes.
const TUNED_CHECK: &str = "{type: tcp, interval: 100ms, timeout: 50ms, rise: 1, fall: 2}";
/// How a round's checks are stated in the results.
const TUNED_CHECKS: &str = "tuned: tcp 100ms/50ms, rise 1, fall 2";
const DEFAULT_CHECKS: &str = "default: tcp 2s/1s, rise 2, fall 3";
const KEEPALIVED_CHECKS: &str = "vrrp_script every 1s, fall 1, rise 1";

/// Whether `scenario` runs portico with the default health check.
fn default_checks(scenario: &str) -> bool {
    scenario == "backends"
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
const CLIENT_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const PROBE_EVERY: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(50);

fn node_mac(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, 0, i as u8]
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs the lab (or one of its hidden helpers).
pub async fn run(mut args: LabArgs) -> anyhow::Result<()> {
    match args.helper {
        Some(Helper::Backend {
            name,
            listen,
            echo,
            hello,
        }) => return backend::backend(name, listen, echo, hello).await,
        Some(Helper::Check { addr }) => {
            let ok = matches!(
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr)
                )
                .await,
                Ok(Ok(_))
            );
            std::process::exit(if ok { 0 } else { 1 });
        }
        None => {}
    }
    if !sys::is_root() {
        bail!(
            "portico lab needs root (network namespaces, veth pairs, raw sockets); run it with sudo"
        );
    }
    if !(2..=9).contains(&args.nodes) {
        bail!("--nodes must be 2-9");
    }
    if args.announce == "bgp" {
        return bgp::run(args).await;
    }
    if args.scenarios.is_empty() {
        args.scenarios = [
            "hard",
            "graceful",
            "partition",
            "backends",
            "backends-tuned",
        ]
        .map(String::from)
        .to_vec();
    }
    if args.systems.is_empty() {
        args.systems = [
            "portico-default",
            "portico-fast",
            "keepalived-1s",
            "keepalived-fastest",
        ]
        .map(String::from)
        .to_vec();
    }
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s}; use {}", SCENARIOS.join(", "));
        }
    }
    for s in &args.systems {
        if System::parse(s).is_none() {
            bail!(
                "unknown system {s}; use portico-default, portico-fast, keepalived-1s, keepalived-fastest"
            );
        }
    }
    let lab = Lab::create(args.nodes, args.keep_logs)?;
    println!(
        "lab {} ready: {} nodes, logs in {}",
        lab.prefix,
        args.nodes,
        lab.dir.display()
    );
    let result = tokio::select! {
        r = run_all(&lab, &args) => r,
        () = signalled() => Err(anyhow::anyhow!("interrupted; cleaning up")),
    };
    drop(lab);
    let rounds = result?;
    print_table(&rounds, &args);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rounds)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

async fn signalled() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Portico { fast: bool },
    Keepalived { fastest: bool },
}

impl System {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "portico-default" => System::Portico { fast: false },
            "portico-fast" => System::Portico { fast: true },
            "keepalived-1s" => System::Keepalived { fastest: false },
            "keepalived-fastest" => System::Keepalived { fastest: true },
            _ => return None,
        })
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sh_in(ns: &str, cmd: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "{} in {ns}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces of one run; deleting them (on drop) removes every link and address too.
struct Lab {
    prefix: String,
    nodes: usize,
    dir: PathBuf,
    keep_logs: bool,
    made: Mutex<Vec<String>>,
    procs: Mutex<Vec<tokio::process::Child>>,
}

impl Lab {
    fn ns_br(&self) -> String {
        format!("{}-br", self.prefix)
    }
    fn ns_node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }
    fn ns_client(&self) -> String {
        format!("{}-c", self.prefix)
    }

    fn add_ns(&self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// A lab with no namespaces yet: its prefix and log directory.
    fn empty(nodes: usize, keep_logs: bool) -> anyhow::Result<Self> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0);
        let prefix = format!("pl{}{}", std::process::id() % 10000, nonce % 100);
        let dir = std::env::temp_dir().join(format!("portico-lab-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Lab {
            prefix,
            nodes,
            dir,
            keep_logs,
            made: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
        })
    }

    fn create(nodes: usize, keep_logs: bool) -> anyhow::Result<Self> {
        let lab = Self::empty(nodes, keep_logs)?;
        let br = lab.ns_br();
        lab.add_ns(&br)?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let mut ends: Vec<(String, String, [u8; 6], String)> = (1..=nodes)
            .map(|i| {
                (
                    lab.ns_node(i),
                    format!("v{i}"),
                    node_mac(i),
                    format!("10.99.0.{}/24", 10 + i),
                )
            })
            .collect();
        ends.push((
            lab.ns_client(),
            "vc".into(),
            CLIENT_MAC,
            format!("{CLIENT_IP}/24"),
        ));
        for (ns, port, mac, addr) in &ends {
            lab.add_ns(ns)?;
            ip(&[
                "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "address", &mac_str(mac)])?;
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
            let host = addr
                .split('/')
                .next()
                .and_then(|a| a.rsplit('.').next())
                .unwrap_or("1");
            let v6 = format!("fd00:99::{host}/64");
            ip(&["-n", ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &br, "link", "set", port, "master", "br0", "up"])?;
        }
        Ok(lab)
    }

    /// Starts node `i`'s backend (`portico lab backend`): its name on `listen`, an echo on
    /// `echo` (after a hello line with the name when `hello`); returns its pid.
    fn spawn_backend(
        &self,
        i: usize,
        listen: &str,
        echo: &str,
        hello: bool,
    ) -> anyhow::Result<u32> {
        let name = format!("node-{i}");
        let mut args = vec![
            "lab", "backend", "--name", &name, "--listen", listen, "--echo", echo,
        ];
        if hello {
            args.push("--hello");
        }
        self.spawn(&self.ns_node(i), &format!("backend-{i}.log"), &args)
    }

    fn spawn(&self, ns: &str, log: &str, args: &[&str]) -> anyhow::Result<u32> {
        let exe = std::env::current_exe()?;
        self.spawn_exe(ns, log, exe.to_str().unwrap_or("portico"), args)
    }

    fn spawn_exe(&self, ns: &str, log: &str, exe: &str, args: &[&str]) -> anyhow::Result<u32> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))?;
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, exe])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("RUST_LOG", "info")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {exe} in {ns}"))?;
        let pid = child.id().unwrap_or(0);
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    fn stop_all(&self) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        for c in procs.iter_mut() {
            let _ = c.start_kill();
        }
        procs.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
        // keepalived forks a VRRP child that our handles do not cover
        for i in 1..=self.nodes {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(format!("vrrp-{i}.pid")))
                && let Ok(pid) = p.trim().parse::<u32>()
            {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        for ns in self
            .made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .rev()
        {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns` with its own tokio runtime.
fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = R>>> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<R>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        sys::setns_net(&path)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })
}

/// Sends ARP requests for the VIP from the client and returns every MAC that answered.
fn arp_owners(lab: &Lab) -> anyhow::Result<BTreeSet<[u8; 6]>> {
    let h = in_netns(&lab.ns_client(), || {
        Box::pin(async {
            let idx = sys::if_index("eth0")?;
            let s = sys::PacketSocket::open(idx, sys::ETH_P_ARP, None)?;
            let req = agent::frames::arp(
                agent::frames::BROADCAST,
                CLIENT_MAC,
                &agent::frames::Arp {
                    op: 1,
                    sha: CLIENT_MAC,
                    spa: CLIENT_IP,
                    tha: [0; 6],
                    tpa: VIP,
                },
            );
            let mut macs = BTreeSet::new();
            let mut buf = [0u8; 2048];
            for _ in 0..3 {
                s.send(&req).await?;
                let until = Instant::now() + Duration::from_millis(150);
                for _ in 0..1000 {
                    match tokio::time::timeout_at(until, s.recv(&mut buf)).await {
                        Ok(Ok(n)) => {
                            if let Ok(a) = agent::frames::parse_arp(&buf[..n])
                                && a.op == 2
                                && a.spa == VIP
                                && a.tha == CLIENT_MAC
                            {
                                macs.insert(a.sha);
                            }
                        }
                        _ => break,
                    }
                }
            }
            Ok::<_, anyhow::Error>(macs)
        })
    });
    h.join()
        .map_err(|_| anyhow::anyhow!("ARP check thread panicked"))??
}

/// Waits up to `max` for process `pid` to exit; returns whether it did.
async fn wait_gone(pid: u32, max: Duration) -> bool {
    let until = Instant::now() + max;
    loop {
        if !Path::new(&format!("/proc/{pid}")).exists()
            // a zombie still has /proc/PID until reaped; its state is Z
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `arp_ignore` and `arp_announce` of node `i`'s eth0.
fn iface_sysctls(lab: &Lab, i: usize) -> Option<(String, String)> {
    in_netns(&lab.ns_node(i), || {
        Box::pin(async {
            Some((
                sys::sysctl_read("net/ipv4/conf/eth0/arp_ignore").ok()?,
                sys::sysctl_read("net/ipv4/conf/eth0/arp_announce").ok()?,
            ))
        })
    })
    .join()
    .ok()?
    .ok()?
}

/// Stops every node (SIGTERM) and starts it again with the current settings of `run`.
async fn restart_nodes(lab: &Lab, run: &mut Running, args: &LabArgs) -> anyhow::Result<()> {
    for (_, pid) in std::mem::take(&mut run.pids) {
        let _ = sys::kill(pid, sys::SIGTERM);
        if !wait_gone(pid, Duration::from_secs(10)).await {
            let _ = sys::kill(pid, sys::SIGKILL);
            wait_gone(pid, Duration::from_secs(2)).await;
        }
    }
    for i in 1..=lab.nodes {
        run.start_node(lab, i, args)?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Waits until the last `window` of probes all succeeded from one node; returns it.
async fn wait_stable(
    obs: &Arc<Mutex<Observed>>,
    window: Duration,
    max: Duration,
) -> anyhow::Result<String> {
    let until = Instant::now() + max;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let recent: Vec<&Probe> = o
            .probes
            .iter()
            .filter(|p| {
                now.saturating_duration_since(p.start) <= window + CONNECT_TIMEOUT * 4
                    && now.saturating_duration_since(p.start) > CONNECT_TIMEOUT * 4
            })
            .collect();
        // probes run one at a time: on a loaded machine fewer than one per tick
        if recent.len() as u32 >= (window.as_millis() as u32 / PROBE_EVERY.as_millis() as u32) / 3 {
            let nodes: BTreeSet<Option<&String>> = recent.iter().map(|p| p.node.as_ref()).collect();
            if nodes.len() == 1
                && let Some(Some(n)) = nodes.into_iter().next()
            {
                return Ok(n.clone());
            }
        }
    }
    let o = obs.lock().unwrap_or_else(|e| e.into_inner());
    let answered = o.probes.iter().filter(|p| p.node.is_some()).count();
    let last: Vec<Option<String>> = o
        .probes
        .iter()
        .rev()
        .take(5)
        .map(|p| p.node.clone())
        .collect();
    bail!(
        "no stable owner within {max:?} ({} probes, {answered} answered, last {last:?})",
        o.probes.len()
    )
}

async fn run_all(lab: &Lab, args: &LabArgs) -> anyhow::Result<Vec<Round>> {
    let obs = Arc::new(Mutex::new(Observed::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let prober = start_prober(
        &lab.ns_client(),
        SocketAddr::from((VIP, 80)),
        obs.clone(),
        stop.clone(),
    );
    let mut all = Vec::new();
    // the interface sysctls before any node ran, to check that a stopped portico put them back
    let sysctls_before: BTreeMap<usize, (String, String)> = (1..=lab.nodes)
        .filter_map(|i| iface_sysctls(lab, i).map(|v| (i, v)))
        .collect();
    let r = async {
        for sys_name in &args.systems {
            let system = System::parse(sys_name).unwrap_or(System::Portico { fast: false });
            let mut run = Running {
                system,
                pids: BTreeMap::new(),
                backend_pids: BTreeMap::new(),
                default_checks: args.scenarios.first().is_some_and(|s| default_checks(s)),
                sysctls_before: sysctls_before.clone(),
            };
            for i in 1..=lab.nodes {
                run.start_backend(lab, i)?;
                run.start_node(lab, i, args)?;
            }
            let first = wait_stable(&obs, Duration::from_millis(1000), Duration::from_secs(30)).await.with_context(|| format!("{sys_name}: VIP never answered"))?;
            println!("{sys_name}: VIP answered by {first}");
            if let System::Portico { .. } = system {
                traffic(lab).await;
                let r = ipv6_round(lab, sys_name).await?;
                println!(
                    "  IPv6 VIP {VIP6}: {} MAC(s) answered neighbour solicitations, TCP answered by {}",
                    r.arp_owners_after,
                    r.owner_after.clone().unwrap_or("nobody".into())
                );
                all.push(r);
            }
            for scenario in &args.scenarios {
                if let System::Keepalived { .. } = system
                    && scenario == "backends-tuned"
                {
                    println!("{sys_name}: backends-tuned skipped (portico only; keepalived's check is its vrrp_script every 1 s)");
                    continue;
                }
                if let System::Portico { .. } = system
                    && default_checks(scenario) != run.default_checks
                {
                    run.default_checks = default_checks(scenario);
                    println!("{sys_name}: restarting the nodes with health checks {}", run.checks());
                    restart_nodes(lab, &mut run, args).await?;
                    wait_stable(&obs, Duration::from_millis(1000), Duration::from_secs(30))
                        .await
                        .with_context(|| format!("{sys_name}: VIP never answered after the restart"))?;
                }
                for round in 1..=args.rounds {
                    let mut r = round_once(lab, args, &mut run, &obs, sys_name, scenario, round).await?;
                    if r.scenario == "graceful"
                        && let System::Portico { .. } = system
                        && let Ok(i) = r.old_owner.trim_start_matches("node-").parse::<usize>()
                    {
                        r.sysctls_restored = r.stop_ms.map(|_| {
                            sysctls_before.contains_key(&i) && r.sysctls_after.as_ref() == sysctls_before.get(&i)
                        });
                    }
                    println!(
                        "{sys_name:>18} {scenario:>14} #{round}: arp {:>7} ms, first success on new owner {:>7} ms, failed {:>3} in window + {:>3} after, {} -> {}, ARP owners after repair {}, owner after {}, failed on return {}{}{}",
                        r.arp_ms.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                        r.takeover_ms.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                        r.failed_in_window,
                        r.failed_after_window,
                        r.old_owner,
                        r.new_owner.clone().unwrap_or("-".into()),
                        r.arp_owners_after,
                        r.owner_after.clone().unwrap_or("-".into()),
                        r.return_failed,
                        match r.inflight_survived {
                            Some(true) => ", in-flight connection survived",
                            Some(false) => ", in-flight connection lost",
                            None => "",
                        },
                        match (r.stop_ms, r.sysctls_restored) {
                            (Some(t), Some(ok)) => format!(", exit {t:.0} ms after SIGTERM, sysctls restored: {ok}"),
                            (Some(t), None) => format!(", exit {t:.0} ms after SIGTERM"),
                            _ if r.scenario == "graceful" => ", did not exit within 40 s of SIGTERM".to_string(),
                            _ => String::new(),
                        },
                    );
                    all.push(r);
                }
            }
            for (_, pid) in std::mem::take(&mut run.pids) {
                let _ = sys::kill(pid, sys::SIGTERM);
                wait_gone(pid, Duration::from_secs(5)).await;
            }
            lab.stop_all();
            for i in 1..=lab.nodes {
                if let Ok(p) = std::fs::read_to_string(lab.dir.join(format!("vrrp-{i}.pid")))
                    && let Ok(pid) = p.trim().parse::<u32>()
                {
                    let _ = sys::kill(pid, sys::SIGKILL);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || prober.join()).await;
    r.map(|()| all)
}

/// Prints the steady-state gossip traffic of node-1 (from its /metrics).
async fn traffic(lab: &Lab) {
    let fetch = |ns: String| {
        in_netns(&ns, || {
            Box::pin(async {
                let mut s = tokio::net::TcpStream::connect("127.0.0.1:9440").await?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                    .await?;
                let mut body = String::new();
                tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await??;
                let mut packets = 0.0;
                let mut bytes = 0.0;
                for l in body.lines().filter(|l| !l.starts_with('#')) {
                    let v: f64 = l
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    if l.starts_with("portico_agent_gossip_sent_packets") {
                        packets += v;
                    } else if l.starts_with("portico_agent_gossip_sent_bytes") {
                        bytes += v;
                    }
                }
                Ok::<_, anyhow::Error>((packets, bytes))
            })
        })
    };
    let ns = lab.ns_node(1);
    let a = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || fetch(ns).join()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = tokio::task::spawn_blocking(move || fetch(ns).join()).await;
    match (a, b) {
        (Ok(Ok(Ok(Ok((p0, b0))))), Ok(Ok(Ok(Ok((p1, b1)))))) => println!(
            "  gossip sent by node-1 ({} peers): {:.0} packets/s, {:.0} bytes/s (UDP payload, heartbeats + SWIM)",
            lab.nodes - 1,
            (p1 - p0) / 2.0,
            (b1 - b0) / 2.0
        ),
        _ => println!("  gossip traffic: /metrics of node-1 not readable"),
    }
}
