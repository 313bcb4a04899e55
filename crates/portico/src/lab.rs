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

mod probe;
mod report;

use probe::{Observed, Probe, probe, start_prober};
use report::{Round, print_table};

/// Arguments of `portico lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// Node namespaces (2-9).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Rounds per scenario.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Scenarios: hard (owner link down + agent SIGKILL), graceful (SIGTERM), partition
    /// (owner link down, then healed), backends (owner's backend killed; default health
    /// checks), backends-tuned (the same with tuned checks; portico only), conflict (a forged
    /// gratuitous ARP claims the VIP for another MAC; portico only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hard,graceful,partition,backends,backends-tuned"
    )]
    scenarios: Vec<String>,
    /// Systems: portico-default, portico-fast, keepalived-1s, keepalived-fastest (advert_int 0.01).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "portico-default,portico-fast,keepalived-1s,keepalived-fastest"
    )]
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
pub async fn run(args: LabArgs) -> anyhow::Result<()> {
    match args.helper {
        Some(Helper::Backend { name, listen, echo }) => return backend(name, listen, echo).await,
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

async fn backend(name: String, listen: SocketAddr, echo: Option<SocketAddr>) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("backend cannot listen on {listen}"))?;
    if let Some(addr) = echo {
        let e = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("echo backend cannot listen on {addr}"))?;
        tokio::spawn(async move {
            while let Ok((s, _)) = e.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }
    loop {
        let (mut s, _) = l.accept().await?;
        let msg = format!("{name}\n");
        tokio::spawn(async move {
            let _ = s.write_all(msg.as_bytes()).await;
            let _ = s.shutdown().await;
        });
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

    fn create(nodes: usize, keep_logs: bool) -> anyhow::Result<Self> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0);
        let prefix = format!("pl{}{}", std::process::id() % 10000, nonce % 100);
        let dir = std::env::temp_dir().join(format!("portico-lab-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        let lab = Lab {
            prefix,
            nodes,
            dir,
            keep_logs,
            made: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
        };
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

struct Running {
    system: System,
    pids: BTreeMap<usize, u32>,
    backend_pids: BTreeMap<usize, u32>,
    /// portico: the nodes run with the default health check (else the tuned one).
    default_checks: bool,
}

impl Running {
    /// The health-check settings, as the results state them.
    fn checks(&self) -> &'static str {
        match self.system {
            System::Keepalived { .. } => KEEPALIVED_CHECKS,
            System::Portico { .. } if self.default_checks => DEFAULT_CHECKS,
            System::Portico { .. } => TUNED_CHECKS,
        }
    }
}

fn portico_config(lab: &Lab, i: usize, fast: bool, default_checks: bool, args: &LabArgs) -> String {
    // the default check: no settings but the type
    let check = if default_checks {
        "{type: tcp}"
    } else {
        TUNED_CHECK
    };
    let peers: Vec<String> = (1..=lab.nodes)
        .filter(|j| *j != i)
        .map(|j| format!("    - {{name: node-{j}, address: 10.99.0.{}:7946}}", 10 + j))
        .collect();
    // Each node lists only its own backend: the owner function reads placement from the
    // shared part of the config, and other nodes' local health from their heartbeats.
    let backends: Vec<String> = (i..=i)
        .map(|j| format!("      - {{name: node-{j}, address: 127.0.0.1, node: node-{j}}}"))
        .collect();
    format!(
        "node:\n  name: node-{i}\n  interfaces: [{{name: eth0, addresses: [10.99.0.{ip}/24, \"fd00:99::{ip}/64\"]}}]\n\
         cluster:\n  bind: 10.99.0.{ip}:7946\n  peers:\n{peers}\n  keys: [{{id: 1, secret: \"{key}\"}}]\n  \
         profile: {profile}\n  preemptive: {pre}\n  hold_down: {hold}\n  announce: {{count: 3, interval: 50ms, refresh: 10s}}\n\
         admin:\n  listen: 127.0.0.1:9440\n\
         services:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{name: http, port: 80, target_port: 8080}}, {{name: echo, port: 81, target_port: 9090}}]\n    backends:\n{backends}\n    \
         health_check: {check}\n    \
         connection: {{connect_timeout: 50ms, retries: 0}}\n    outlier: {{consecutive_failures: 0}}\n    \
         placement: {{local_only: true, preferred: [node-1]}}\n  \
         - name: web6\n    vips: [\"{VIP6}\"]\n    ports: [{{name: http, port: 80, target_port: 8080}}]\n    backends:\n{backends}\n    \
         health_check: {check}\n    \
         connection: {{connect_timeout: 50ms, retries: 0}}\n    outlier: {{consecutive_failures: 0}}\n    \
         placement: {{local_only: true, preferred: [node-1]}}\n",
        ip = 10 + i,
        peers = peers.join("\n"),
        backends = backends.join("\n"),
        key = "5f".repeat(32),
        profile = if fast { "fast" } else { "default" },
        pre = !args.non_preemptive,
        hold = args.hold_down,
    )
}

fn keepalived_config(i: usize, fastest: bool) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    Ok(format!(
        "global_defs {{\n  router_id node-{i}\n  vrrp_version 3\n  script_user root\n  enable_script_security\n}}\n\
         vrrp_script chk {{\n  script \"{exe} lab check 127.0.0.1:80\"\n  interval 1\n  fall 1\n  rise 1\n}}\n\
         vrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int {adv}\n  \
         virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n  track_script {{\n    chk\n  }}\n}}\n",
        exe = exe.display(),
        prio = 200 - i,
        adv = if fastest { "0.01" } else { "1" },
    ))
}

impl Running {
    fn start_node(&mut self, lab: &Lab, i: usize, args: &LabArgs) -> anyhow::Result<()> {
        let ns = lab.ns_node(i);
        match self.system {
            System::Portico { fast } => {
                let path = lab.dir.join(format!("node-{i}.yaml"));
                std::fs::write(
                    &path,
                    portico_config(lab, i, fast, self.default_checks, args),
                )?;
                let pid = lab.spawn(
                    &ns,
                    &format!("node-{i}.log"),
                    &["run", "--config", path.to_str().unwrap_or_default()],
                )?;
                self.pids.insert(i, pid);
            }
            System::Keepalived { fastest } => {
                let path = lab.dir.join(format!("keepalived-{i}.conf"));
                std::fs::write(&path, keepalived_config(i, fastest)?)?;
                // a killed keepalived stays a zombie until reaped: its pid files would make
                // the new one refuse to start ("daemon is already running")
                let _ = std::fs::remove_file(lab.dir.join(format!("vrrp-{i}.pid")));
                let _ = std::fs::remove_file(lab.dir.join(format!("keepalived-{i}.pid")));
                let pid = lab.spawn_exe(
                    &ns,
                    &format!("keepalived-{i}.log"),
                    "keepalived",
                    &[
                        "-n",
                        "-l",
                        "-D",
                        "-P",
                        "-f",
                        path.to_str().unwrap_or_default(),
                        "-p",
                        lab.dir
                            .join(format!("keepalived-{i}.pid"))
                            .to_str()
                            .unwrap_or_default(),
                        "-r",
                        lab.dir
                            .join(format!("vrrp-{i}.pid"))
                            .to_str()
                            .unwrap_or_default(),
                    ],
                )?;
                self.pids.insert(i, pid);
            }
        }
        Ok(())
    }

    fn start_backend(&mut self, lab: &Lab, i: usize) -> anyhow::Result<()> {
        let (listen, echo) = match self.system {
            System::Portico { .. } => ("127.0.0.1:8080", "127.0.0.1:9090"),
            System::Keepalived { .. } => ("0.0.0.0:80", "0.0.0.0:81"),
        };
        let pid = lab.spawn(
            &lab.ns_node(i),
            &format!("backend-{i}.log"),
            &[
                "lab",
                "backend",
                "--name",
                &format!("node-{i}"),
                "--listen",
                listen,
                "--echo",
                echo,
            ],
        )?;
        self.backend_pids.insert(i, pid);
        Ok(())
    }

    fn kill_node(&mut self, lab: &Lab, i: usize, sig: i32) -> Option<u32> {
        let pid = self.pids.remove(&i);
        if let Some(pid) = pid {
            let _ = sys::kill(pid, sig);
        }
        if let System::Keepalived { .. } = self.system
            && sig == sys::SIGKILL
            && let Ok(p) = std::fs::read_to_string(lab.dir.join(format!("vrrp-{i}.pid")))
            && let Ok(pid) = p.trim().parse::<u32>()
        {
            let _ = sys::kill(pid, sys::SIGKILL);
        }
        pid
    }
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
        if recent.len() as u32
            >= (window.as_millis() as u32 / PROBE_EVERY.as_millis() as u32) * 2 / 3
        {
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
    let prober = start_prober(&lab.ns_client(), obs.clone(), stop.clone());
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

#[allow(clippy::too_many_arguments)]
async fn round_once(
    lab: &Lab,
    args: &LabArgs,
    run: &mut Running,
    obs: &Arc<Mutex<Observed>>,
    sys_name: &str,
    scenario: &str,
    round: usize,
) -> anyhow::Result<Round> {
    if scenario == "conflict" {
        return conflict_round(lab, obs, sys_name, round).await;
    }
    let old = wait_stable(obs, Duration::from_millis(1500), Duration::from_secs(30)).await?;
    let i: usize = old
        .trim_start_matches("node-")
        .parse()
        .context("owner name")?;
    let old_mac = node_mac(i);
    let ns = lab.ns_node(i);
    let inflight = if scenario == "graceful" {
        Some(Inflight::open(lab).await)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut stopped = None;
    match scenario {
        "hard" => {
            sh_in(&ns, &["ip", "link", "set", "eth0", "down"])?;
            stopped = run.kill_node(lab, i, sys::SIGKILL);
        }
        "graceful" => stopped = run.kill_node(lab, i, sys::SIGTERM),
        "partition" => sh_in(&ns, &["ip", "link", "set", "eth0", "down"])?,
        "backends" | "backends-tuned" => {
            if let Some(pid) = run.backend_pids.remove(&i) {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        _ => bail!("unknown scenario"),
    }
    // the connection opened before the stop, used once the client has moved to the new owner
    let inflight_survived = match inflight {
        Some(Ok(c)) => {
            let until = t0 + Duration::from_secs(2);
            while Instant::now() < until {
                let moved = obs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .arp
                    .iter()
                    .any(|(t, m)| *t >= t0 && m.is_some_and(|m| m != old_mac));
                if moved {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some(c.use_now().await)
        }
        Some(Err(e)) => {
            println!("  in-flight check not set up: {e:#}");
            None
        }
        None => None,
    };
    // recovered: probes answered by another node for 500 ms (bounded by 15 s)
    let mut recovered_at = None;
    let until = t0 + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let first_new = o
            .probes
            .iter()
            .filter(|p| p.start >= t0 && p.node.as_ref().is_some_and(|n| *n != old))
            .map(|p| p.start)
            .min();
        if let Some(t) = first_new
            && Instant::now().saturating_duration_since(t)
                > Duration::from_millis(500) + CONNECT_TIMEOUT * 4
        {
            recovered_at = Some(t);
            break;
        }
    }
    let settle = Instant::now();
    let (failed, failed_in_window, takeover, arp, new_owner, failed_at) = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let mut window: Vec<&Probe> = o
            .probes
            .iter()
            .filter(|p| p.start + PROBE_EVERY >= t0 && p.start <= settle - CONNECT_TIMEOUT * 4)
            .collect();
        window.sort_by_key(|p| p.start);
        let fails: Vec<Instant> = window
            .iter()
            .filter(|p| p.node.is_none())
            .map(|p| p.start)
            .collect();
        // the window ends at the first success on the new owner (or, without one, at settle)
        let end = recovered_at.unwrap_or(settle);
        let in_window = fails.iter().filter(|f| **f < end).count();
        let new_owner = window.iter().rev().find_map(|p| p.node.clone());
        let arp = o
            .arp
            .iter()
            .find(|(t, m)| *t >= t0 && m.is_some_and(|m| m != old_mac))
            .map(|(t, _)| t.saturating_duration_since(t0));
        (
            fails.len(),
            in_window,
            recovered_at.map(|t| t.saturating_duration_since(t0)),
            arp,
            new_owner,
            fails
                .iter()
                .map(|f| {
                    if *f >= t0 {
                        ms(f.saturating_duration_since(t0))
                    } else {
                        -ms(t0.saturating_duration_since(*f))
                    }
                })
                .collect::<Vec<f64>>(),
        )
    };
    // repair
    let before_repair = Instant::now();
    let (mut stop_ms, mut sysctls_after) = (None, None);
    match scenario {
        "hard" => {
            if let Some(pid) = stopped {
                wait_gone(pid, Duration::from_secs(5)).await;
            }
            // a power loss ends in a reboot: addresses a crashed keepalived left on eth0 are
            // gone (portico's agent clears stale VIPs from lo itself when it starts)
            let _ = sh_in(
                &ns,
                &["ip", "addr", "del", &format!("{VIP}/32"), "dev", "eth0"],
            );
            sh_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
            run.start_node(lab, i, args)?;
        }
        "graceful" => {
            if let Some(pid) = stopped
                && wait_gone(pid, Duration::from_secs(40)).await
            {
                stop_ms = Some(ms(t0.elapsed()));
                sysctls_after = iface_sysctls(lab, i);
            }
            run.start_node(lab, i, args)?;
        }
        "partition" => sh_in(&ns, &["ip", "link", "set", "eth0", "up"])?,
        "backends" | "backends-tuned" => run.start_backend(lab, i)?,
        _ => {}
    }
    // let the cluster settle (hold-down, keepalived preemption), then check the rules
    let hold = model::duration::parse(&args.hold_down).unwrap_or(Duration::from_secs(1));
    tokio::time::sleep(hold + Duration::from_secs(2)).await;
    let owner_after = wait_stable(obs, Duration::from_millis(1000), Duration::from_secs(20))
        .await
        .ok();
    let return_failed_at_ms: Vec<f64> = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        o.probes
            .iter()
            .filter(|p| p.start >= before_repair && p.node.is_none())
            .map(|p| ms(p.start.saturating_duration_since(before_repair)))
            .collect()
    };
    let return_failed = return_failed_at_ms.len();
    let owners = arp_owners(lab)?;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: scenario.to_string(),
        round,
        checks: run.checks().to_string(),
        old_owner: old,
        new_owner,
        failed,
        failed_in_window,
        failed_after_window: failed - failed_in_window,
        takeover_ms: takeover.map(ms),
        arp_ms: arp.map(ms),
        stop_ms,
        sysctls_restored: None,
        sysctls_after,
        arp_owners_after: owners.len(),
        owner_after,
        return_failed,
        failed_at_ms: failed_at,
        return_failed_at_ms,
        conflicts_counted: None,
        inflight_survived,
    })
}

/// A connection to the VIP's echo port (81), opened from the client before a graceful stop and
/// held by a thread in the client namespace until [`Inflight::use_now`].
struct Inflight {
    go: tokio::sync::oneshot::Sender<()>,
    done: std::thread::JoinHandle<anyhow::Result<anyhow::Result<bool>>>,
}

impl Inflight {
    /// Connects and checks one echo round trip; returns once the connection is established.
    async fn open(lab: &Lab) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let done = in_netns(&lab.ns_client(), move || {
            Box::pin(async move {
                let setup = async {
                    let mut s = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::net::TcpStream::connect((VIP, 81)),
                    )
                    .await
                    .context("connect to the echo port timed out")??;
                    s.write_all(b"before\n").await?;
                    let mut buf = [0u8; 7];
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                        .await
                        .context("no echo before the stop")??;
                    anyhow::ensure!(&buf == b"before\n", "wrong echo before the stop");
                    Ok(s)
                };
                let mut s = match setup.await {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        anyhow::bail!(msg);
                    }
                };
                // bounded: the round goes on after at most a few seconds
                let _ = tokio::time::timeout(Duration::from_secs(10), go_rx).await;
                if s.write_all(b"after!\n").await.is_err() {
                    return Ok(false);
                }
                let mut buf = [0u8; 7];
                Ok(matches!(
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
                    Ok(Ok(_)) if &buf == b"after!\n"
                ))
            })
        });
        match tokio::time::timeout(Duration::from_secs(3), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self { go, done }),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(anyhow::anyhow!(
                "the in-flight connection thread did not report"
            )),
        }
    }

    /// Sends one more round trip on the held connection: did it survive?
    async fn use_now(self) -> bool {
        let _ = self.go.send(());
        matches!(
            tokio::task::spawn_blocking(move || self.done.join()).await,
            Ok(Ok(Ok(Ok(true))))
        )
    }
}

const FAKE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xee];

/// A forged gratuitous ARP from the bridge claims the VIP for a MAC nobody has: the owner must
/// count the conflict and announce again, and the client must end up at the owner.
async fn conflict_round(
    lab: &Lab,
    obs: &Arc<Mutex<Observed>>,
    sys_name: &str,
    round: usize,
) -> anyhow::Result<Round> {
    let old = wait_stable(obs, Duration::from_millis(1500), Duration::from_secs(30)).await?;
    let i: usize = old
        .trim_start_matches("node-")
        .parse()
        .context("owner name")?;
    let t0 = Instant::now();
    let h = in_netns(&lab.ns_br(), || {
        Box::pin(async {
            let s = sys::PacketSocket::open(sys::if_index("br0")?, sys::ETH_P_ARP, None)?;
            s.send(&agent::frames::garp(FAKE_MAC, VIP)).await?;
            Ok::<_, anyhow::Error>(())
        })
    });
    tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("forging thread panicked"))???;
    // bounded wait for the client's ARP to be back at the owner (or never to have moved)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (failed, arp_back) = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let fails: Vec<Instant> = o
            .probes
            .iter()
            .filter(|p| p.start >= t0 && p.node.is_none())
            .map(|p| p.start)
            .collect();
        let poisoned = o
            .arp
            .iter()
            .find(|(t, m)| *t >= t0 && *m == Some(FAKE_MAC))
            .map(|(t, _)| *t);
        let back = poisoned.and_then(|p| {
            o.arp
                .iter()
                .find(|(t, m)| *t > p && *m == Some(node_mac(i)))
                .map(|(t, _)| t.saturating_duration_since(t0))
        });
        (fails.len(), back)
    };
    let conflicts = status_conflicts(lab, i).await;
    let owner_after = wait_stable(obs, Duration::from_millis(500), Duration::from_secs(10))
        .await
        .ok();
    let owners = arp_owners(lab)?;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: "conflict".into(),
        round,
        old_owner: old.clone(),
        new_owner: Some(old),
        failed,
        failed_in_window: failed,
        arp_ms: arp_back.map(ms),
        arp_owners_after: owners.len(),
        owner_after,
        conflicts_counted: conflicts,
        ..Round::default()
    })
}

/// Sum of the `conflicts` fields in node `i`'s /status.
async fn status_conflicts(lab: &Lab, i: usize) -> Option<u64> {
    let h = in_netns(&lab.ns_node(i), || {
        Box::pin(async {
            let mut s = tokio::net::TcpStream::connect("127.0.0.1:9440").await?;
            s.write_all(b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n")
                .await?;
            let mut body = String::new();
            tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await??;
            Ok::<_, anyhow::Error>(body)
        })
    });
    let body = tokio::task::spawn_blocking(move || h.join())
        .await
        .ok()?
        .ok()?
        .ok()?
        .ok()?;
    let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
    fn sum(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| {
                    if k == "conflicts" {
                        v.as_u64().unwrap_or(0)
                    } else {
                        sum(v)
                    }
                })
                .sum(),
            serde_json::Value::Array(a) => a.iter().map(sum).sum(),
            _ => 0,
        }
    }
    Some(sum(&json))
}

/// Checks the IPv6 VIP: every MAC answering a neighbour solicitation from the client, and which
/// node answers TCP on it.
async fn ipv6_round(lab: &Lab, sys_name: &str) -> anyhow::Result<Round> {
    let h = in_netns(&lab.ns_client(), || {
        Box::pin(async {
            let s = sys::PacketSocket::open(sys::if_index("eth0")?, sys::ETH_P_IPV6, None)?;
            let mut macs = BTreeSet::new();
            let mut buf = [0u8; 2048];
            for _ in 0..3 {
                s.send(&agent::frames::ns(CLIENT_MAC, CLIENT_IP6, VIP6))
                    .await?;
                let until = Instant::now() + Duration::from_millis(150);
                for _ in 0..1000 {
                    match tokio::time::timeout_at(until, s.recv(&mut buf)).await {
                        Ok(Ok(n)) => {
                            if let Ok(nd) = agent::frames::parse_nd(&buf[..n])
                                && nd.kind == 136
                                && nd.target == VIP6
                                && let Some(m) = nd.lla
                            {
                                macs.insert(m);
                            }
                        }
                        _ => break,
                    }
                }
            }
            let tcp = probe(SocketAddr::from((VIP6, 80))).await;
            Ok::<_, anyhow::Error>((macs, tcp))
        })
    });
    let (macs, tcp) = tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("IPv6 check thread panicked"))???;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: "ipv6".into(),
        round: 1,
        arp_owners_after: macs.len(),
        owner_after: tcp,
        ..Round::default()
    })
}
