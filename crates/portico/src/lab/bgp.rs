//! `portico lab --announce bgp`: the routed lab. Nodes announce the VIP by BGP to a router
//! namespace that spreads the client's flows over them (ECMP); faults are timed in the router's
//! FIB and at the client.
//!
//! Topology (namespaces `<prefix>-br` the router, `-n1`…`-nN` the nodes, `-c` the client;
//! addresses exist only inside them):
//! ```text
//!   client 10.77.9.2 ── cl 10.77.9.1 [router: br0 10.77.0.1] ── node-i eth0 10.77.0.(10+i)
//!   VIP 10.77.100.1 (port 80: the node's name; port 81: echo, after a hello with the name)
//! ```
//! The router forwards, hashes multipath flows by ports (`fib_multipath_hash_policy=1`) and
//! runs BIRD 2 (`merge paths on`), FRR (zebra + bgpd + bfdd, `maximum-paths 8`) or GoBGP
//! (gobgpd, no BFD, its RIB copied into the FIB by the lab: see `gobgp.rs`). Each node runs a backend
//! (`lab backend`) and either the shipped binary with `announce: bgp` (`portico-*` systems;
//! the nodes gossip with each other, so the ECMP rescue knows where to copy re-hashed segments)
//! or FRR's bgpd + bfdd announcing the VIP from `lo` (`frr-speaker`, the reference). Graceful
//! restart is off on both speakers, so a session that drops takes its routes with it (see
//! bench/bgp-results.md).

use super::bgp_rounds::{BgpRound, Held, RouteWatch, print_bgp_table, round_bgp};
use super::*;

/// The VIP the nodes announce.
pub(super) const BGP_VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
/// The router's address on the nodes' bridge.
pub(super) const ROUTER_IP: &str = "10.77.0.1";
pub(super) const ROUTER_ASN: u32 = 64500;
pub(super) const NODE_ASN: u32 = 64512;

/// Node `i`'s address on the bridge.
pub(super) fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

const BGP_SCENARIOS: [&str; 4] = ["power", "graceful", "backend", "join"];
const BGP_SYSTEMS: [&str; 5] = [
    "portico-bfd",
    "portico-bfd-fast",
    "portico-bfd-10ms",
    "portico-nobfd",
    "frr-speaker",
];
const FRR: &str = "/usr/lib/frr";

/// Who announces the VIP on the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Speaker {
    /// The shipped binary, `announce: bgp`.
    Portico,
    /// FRR's zebra + bgpd + bfdd, the VIP on `lo`.
    Frr,
}

/// One system under test: its speaker and timers.
#[derive(Debug, Clone, Copy)]
pub(super) struct BgpSystem {
    pub(super) speaker: Speaker,
    /// BFD interval (ms, × 3) on both sides, `None`: no BFD.
    pub(super) bfd_ms: Option<u64>,
    /// Hold time (s) offered by both sides.
    pub(super) hold_s: u64,
}

impl BgpSystem {
    pub(super) fn parse(s: &str) -> Option<Self> {
        let (speaker, bfd_ms, hold_s) = match s {
            "portico-bfd" => (Speaker::Portico, Some(300), 9),
            "portico-bfd-fast" => (Speaker::Portico, Some(50), 9),
            "portico-nobfd" => (Speaker::Portico, None, 3),
            "frr-speaker" => (Speaker::Frr, Some(300), 9),
            // the `fast` profile (also --cpu-seconds)
            "portico-bfd-10ms" => (Speaker::Portico, Some(10), 9),
            _ => return None,
        };
        Some(BgpSystem {
            speaker,
            bfd_ms,
            hold_s,
        })
    }

    /// The timers as the results state them.
    pub(super) fn timers(&self) -> String {
        match self.bfd_ms {
            Some(ms) => format!("BFD {ms} ms x 3, hold {} s", self.hold_s),
            None => format!("no BFD, hold {} s", self.hold_s),
        }
    }
}

/// Runs `portico lab --announce bgp`.
pub(super) async fn run(mut args: LabArgs) -> anyhow::Result<()> {
    if args.scenarios.is_empty() {
        args.scenarios = BGP_SCENARIOS.map(String::from).to_vec();
    }
    if args.systems.is_empty() {
        args.systems = if args.router == "gobgp" {
            vec!["portico-nobfd".to_string()]
        } else {
            BGP_SYSTEMS.map(String::from).to_vec()
        };
    }
    for s in &args.scenarios {
        if !BGP_SCENARIOS.contains(&s.as_str()) {
            bail!(
                "unknown scenario {s} for --announce bgp; use {}",
                BGP_SCENARIOS.join(", ")
            );
        }
    }
    for s in &args.systems {
        if !BGP_SYSTEMS.contains(&s.as_str()) {
            bail!(
                "unknown system {s} for --announce bgp; use {}",
                BGP_SYSTEMS.join(", ")
            );
        }
    }
    let needs: Vec<&str> = match args.router.as_str() {
        "bird" => vec!["bird"],
        "gobgp" => vec!["gobgpd", "gobgp"],
        _ => vec![
            "/usr/lib/frr/zebra",
            "/usr/lib/frr/bgpd",
            "/usr/lib/frr/bfdd",
        ],
    };
    for n in needs {
        if !have(n) {
            bail!(
                "--router {} needs {n} (Debian bird2, frr, gobgpd)",
                args.router
            );
        }
    }
    if args.router == "gobgp" {
        if let Some(s) = args
            .systems
            .iter()
            .find(|s| BgpSystem::parse(s).is_some_and(|s| s.bfd_ms.is_some()))
        {
            bail!(
                "GoBGP has no BFD: system {s} cannot run against --router gobgp; use portico-nobfd"
            );
        }
        if args.cpu_seconds > 0 {
            bail!(
                "--cpu-seconds measures BFD at 10 ms x 3, which GoBGP does not speak; pass --cpu-seconds 0 with --router gobgp"
            );
        }
    }
    if args.systems.iter().any(|s| s == "frr-speaker") && !have("/usr/lib/frr/bgpd") {
        bail!("system frr-speaker needs FRR (/usr/lib/frr/bgpd, bfdd, zebra)");
    }
    let lab = Lab::create_bgp(args.nodes, args.keep_logs)?;
    println!(
        "BGP lab {} ready: {} nodes, router {}, logs in {}",
        lab.prefix,
        args.nodes,
        args.router,
        lab.dir.display()
    );
    let result = tokio::select! {
        r = run_all_bgp(&lab, &args) => r,
        () = signalled() => Err(anyhow::anyhow!("interrupted; cleaning up")),
    };
    drop(lab);
    let (rounds, cpu) = result?;
    print_bgp_table(&rounds, &args);
    if let Some(c) = &cpu {
        println!("\n{c}");
    }
    if let Some(p) = &args.json {
        let json = serde_json::json!({"rounds": rounds, "cpu": cpu});
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Whether `cmd` is an executable path or on `PATH`.
fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).exists();
    }
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Lab {
    /// The router namespace.
    pub(super) fn ns_router(&self) -> String {
        self.ns_br()
    }

    /// Creates the routed topology (see the module docs).
    fn create_bgp(nodes: usize, keep_logs: bool) -> anyhow::Result<Self> {
        let lab = Self::empty(nodes, keep_logs)?;
        // FRR's daemons drop to user frr: the directory must be theirs to write in
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&lab.dir, std::fs::Permissions::from_mode(0o777))?;
        }
        let r = lab.ns_router();
        lab.add_ns(&r)?;
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
        ] {
            sh_in(&r, &["sysctl", "-qw", kv])?;
        }
        ip(&["-n", &r, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{ROUTER_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &r, "link", "set", "br0", "up"])?;
        for i in 1..=nodes {
            let node = lab.ns_node(i);
            lab.add_ns(&node)?;
            let port = format!("n{i}");
            ip(&[
                "-n", &r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &node,
            ])?;
            ip(&["-n", &r, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{}/24", node_ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &node, "link", "set", "eth0", "up"])?;
            ip(&["-n", &node, "route", "add", "default", "via", ROUTER_IP])?;
        }
        let c = lab.ns_client();
        lab.add_ns(&c)?;
        ip(&[
            "-n", &r, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", &c,
        ])?;
        ip(&["-n", &r, "addr", "add", "10.77.9.1/24", "dev", "cl"])?;
        ip(&["-n", &r, "link", "set", "cl", "up"])?;
        ip(&["-n", &c, "addr", "add", "10.77.9.2/24", "dev", "eth0"])?;
        ip(&["-n", &c, "link", "set", "eth0", "up"])?;
        ip(&["-n", &c, "route", "add", "default", "via", "10.77.9.1"])?;
        Ok(lab)
    }
}

/// The processes of one system: per node the speaker's pids and the backend's pid.
pub(super) struct BgpRunning {
    pub(super) name: String,
    pub(super) system: BgpSystem,
    pub(super) router: String,
    pub(super) speakers: BTreeMap<usize, Vec<u32>>,
    pub(super) backends: BTreeMap<usize, u32>,
}

impl BgpRunning {
    /// Starts node `i`'s speaker (portico or FRR).
    pub(super) fn start_node(&mut self, lab: &Lab, i: usize) -> anyhow::Result<()> {
        let ns = lab.ns_node(i);
        let pids = match self.system.speaker {
            Speaker::Portico => {
                let path = lab.dir.join(format!("node-{i}.yaml"));
                std::fs::write(&path, portico_config(i, lab.nodes, &self.system))?;
                vec![lab.spawn(
                    &ns,
                    &format!("node-{i}.log"),
                    &["run", "--config", path.to_str().unwrap_or_default()],
                )?]
            }
            Speaker::Frr => {
                // the VIP on lo: the routed packets are delivered locally
                let _ = sh_in(
                    &ns,
                    &["ip", "addr", "add", &format!("{BGP_VIP}/32"), "dev", "lo"],
                );
                let bgpd = frr_speaker_bgpd(i, &self.system);
                let bfdd = frr_bfdd(&self.system);
                start_frr(lab, &ns, &format!("frr-{i}"), &bgpd, &bfdd)?
            }
        };
        self.speakers.insert(i, pids);
        Ok(())
    }

    /// Starts node `i`'s backend: the name on port 80's target, an echo (with a hello) on 81's.
    pub(super) fn start_backend(&mut self, lab: &Lab, i: usize) -> anyhow::Result<()> {
        let (listen, echo) = match self.system.speaker {
            Speaker::Portico => ("127.0.0.1:8080", "127.0.0.1:9090"),
            Speaker::Frr => ("0.0.0.0:80", "0.0.0.0:81"),
        };
        let pid = lab.spawn_backend(i, listen, echo, true)?;
        self.backends.insert(i, pid);
        Ok(())
    }

    /// Sends `sig` to node `i`'s speaker processes; returns them.
    pub(super) fn signal_node(&mut self, i: usize, sig: i32) -> Vec<u32> {
        let pids = self.speakers.remove(&i).unwrap_or_default();
        for p in &pids {
            let _ = sys::kill(*p, sig);
        }
        pids
    }

    /// Stops node `i` gracefully and waits (bounded) until every process exited.
    pub(super) async fn stop_node(&mut self, i: usize) {
        for pid in self.signal_node(i, sys::SIGTERM) {
            if !wait_gone(pid, Duration::from_secs(15)).await {
                let _ = sys::kill(pid, sys::SIGKILL);
                wait_gone(pid, Duration::from_secs(2)).await;
            }
        }
    }
}

impl BgpRunning {
    /// Starts system `name`: the router with its timers, then every node's backend and
    /// speaker; returns once the router has a next hop per node.
    pub(super) async fn start(
        lab: &Lab,
        args: &LabArgs,
        name: &str,
        watch: &RouteWatch,
    ) -> anyhow::Result<Self> {
        let system = BgpSystem::parse(name).context("system")?;
        let mut run = BgpRunning {
            name: name.to_string(),
            system,
            router: args.router.clone(),
            speakers: BTreeMap::new(),
            backends: BTreeMap::new(),
        };
        start_router(lab, &args.router, &system).await?;
        for i in 1..=lab.nodes {
            run.start_backend(lab, i)?;
            run.start_node(lab, i)?;
        }
        watch
            .wait_hops(lab.nodes, Duration::from_secs(60))
            .await
            .with_context(|| format!("{name}: the router never had a next hop per node"))?;
        Ok(run)
    }

    /// Stops every node's speaker (FRR's VIP comes off `lo`), then everything the lab runs.
    pub(super) async fn stop(mut self, lab: &Lab) {
        for i in 1..=lab.nodes {
            self.stop_node(i).await;
            if self.system.speaker == Speaker::Frr {
                let _ = sh_in(
                    &lab.ns_node(i),
                    &["ip", "addr", "del", &format!("{BGP_VIP}/32"), "dev", "lo"],
                );
            }
        }
        lab.stop_all();
    }

    /// Waits until the router has a BFD session up with every node (no-op without BFD): a
    /// fault before that would be timed by the hold timer.
    pub(super) async fn wait_bfd_up(&self, lab: &Lab, within: Duration) -> anyhow::Result<()> {
        if self.system.bfd_ms.is_none() {
            return Ok(());
        }
        let until = Instant::now() + within;
        loop {
            let up = router_bfd_up(lab, &self.router).await;
            if up >= lab.nodes {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!(
                    "{}: the router has {up} BFD sessions up, not {}, after {within:?}",
                    self.name,
                    lab.nodes
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// BFD sessions up in the router (BIRD: `show bfd sessions`; FRR: `show bfd peers brief`).
async fn router_bfd_up(lab: &Lab, router: &str) -> usize {
    let r = lab.ns_router();
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &r]);
    let col = if router == "bird" {
        cmd.arg("birdc")
            .arg("-s")
            .arg(lab.dir.join("bird.ctl"))
            .args(["show", "bfd", "sessions"]);
        2
    } else {
        cmd.arg("vtysh")
            .arg("--vty_socket")
            .arg(lab.dir.join("router"))
            .args(["-c", "show bfd peers brief"]);
        3
    };
    let Ok(out) = cmd.stdin(Stdio::null()).output().await else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("10.77.0.")
                || l.split_whitespace()
                    .nth(2)
                    .is_some_and(|a| a.starts_with("10.77.0.1"))
        })
        .filter(|l| {
            l.split_whitespace()
                .nth(col)
                .is_some_and(|w| w.eq_ignore_ascii_case("up"))
        })
        .count()
}

/// The shipped binary's configuration on node `i` of `n`: the nodes gossip with each other
/// (`cluster:`), as a BGP deployment should, so that the ECMP rescue (`bgp.ecmp_rescue`, on by
/// default) knows the members to copy re-hashed segments to.
fn portico_config(i: usize, n: usize, s: &BgpSystem) -> String {
    let bfd = match s.bfd_ms {
        None => "off".to_string(),
        Some(300) => "default".to_string(),
        Some(10) => "fast".to_string(),
        Some(ms) => format!("{{interval: {ms}ms, multiplier: 3}}"),
    };
    let peers: Vec<String> = (1..=n)
        .filter(|j| *j != i)
        .map(|j| format!("{{name: node-{j}, address: \"{}:7946\"}}", node_ip(j)))
        .collect();
    format!(
        "node: {{name: node-{i}, interfaces: [{{name: eth0, addresses: [{ip}/24]}}]}}\n\
         admin: {{listen: \"127.0.0.1:9440\"}}\n\
         cluster:\n  bind: \"{ip}:7946\"\n  peers: [{peers}]\n  \
         keys: [{{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}}]\n\
         bgp:\n  asn: {NODE_ASN}\n  router_id: {ip}\n  peers:\n\
         \x20   - {{name: router, address: {ROUTER_IP}, asn: {ROUTER_ASN}, source: {ip}, hold_time: {hold}s, bfd: {bfd}, graceful_restart: off}}\n\
         shutdown: {{drain_timeout: 5s}}\n\
         services:\n  - name: web\n    vips: [{BGP_VIP}]\n    \
         ports: [{{name: http, port: 80, target_port: 8080}}, {{name: echo, port: 81, target_port: 9090}}]\n    \
         backends: [{{name: local, address: 127.0.0.1}}]\n    announce: bgp\n    \
         health_check: {TUNED_CHECK}\n    \
         connection: {{connect_timeout: 50ms, retries: 0}}\n    outlier: {{consecutive_failures: 0}}\n",
        ip = node_ip(i),
        hold = s.hold_s,
        peers = peers.join(", "),
    )
}

/// bfdd's configuration: one profile `lab` with the system's timers.
fn frr_bfdd(s: &BgpSystem) -> String {
    let ms = s.bfd_ms.unwrap_or(300);
    format!(
        "bfd\n profile lab\n  transmit-interval {ms}\n  receive-interval {ms}\n  detect-multiplier 3\n !\n!\n"
    )
}

/// bgpd on node `i` as the reference speaker: the VIP as a network, the same timers.
fn frr_speaker_bgpd(i: usize, s: &BgpSystem) -> String {
    let bfd = if s.bfd_ms.is_some() {
        format!(" neighbor {ROUTER_IP} bfd profile lab\n")
    } else {
        String::new()
    };
    format!(
        "router bgp {NODE_ASN}\n bgp router-id {ip}\n no bgp ebgp-requires-policy\n no bgp network import-check\n\
         \x20timers bgp {ka} {hold}\n neighbor {ROUTER_IP} remote-as {ROUTER_ASN}\n neighbor {ROUTER_IP} timers connect 1\n\
         \x20neighbor {ROUTER_IP} advertisement-interval 0\n{bfd} address-family ipv4 unicast\n  network {BGP_VIP}/32\n exit-address-family\n!\n",
        ip = node_ip(i),
        ka = (s.hold_s / 3).max(1),
        hold = s.hold_s,
    )
}

/// Starts zebra, bgpd and bfdd in `ns` in the foreground with their state under `tag`; returns
/// their pids once each answers (its vty socket exists).
fn start_frr(lab: &Lab, ns: &str, tag: &str, bgpd: &str, bfdd: &str) -> anyhow::Result<Vec<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let dir = lab.dir.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let mut pids = Vec::new();
    for (d, conf) in [
        ("zebra", "hostname r\n".to_string()),
        ("bfdd", bfdd.to_string()),
        ("bgpd", bgpd.to_string()),
    ] {
        let path = dir.join(format!("{d}.conf"));
        std::fs::write(&path, conf)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let s = |p: PathBuf| p.display().to_string();
        let mut argv: Vec<String> = vec![
            "-i".into(),
            s(dir.join(format!("{d}.pid"))),
            "-z".into(),
            s(dir.join("zserv.api")),
            "--vty_socket".into(),
            s(dir.clone()),
            "-u".into(),
            "frr".into(),
            "-g".into(),
            "frr".into(),
            "-f".into(),
            s(path),
            "--log".into(),
            format!("file:{}", dir.join(format!("{d}.log")).display()),
        ];
        if d == "bfdd" {
            argv.push("--bfdctl".into());
            argv.push(s(dir.join("bfdd.sock")));
        }
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let pid = lab.spawn_exe(ns, &format!("{tag}-{d}.out"), &format!("{FRR}/{d}"), &args)?;
        pids.push(pid);
        // zebra must listen before bgpd and bfdd connect (they retry, but slowly)
        let vty = dir.join(format!("{d}.vty"));
        for _ in 0..500 {
            if vty.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(pids)
}

/// Starts the router for `system`; its timers follow the system's.
async fn start_router(lab: &Lab, router: &str, s: &BgpSystem) -> anyhow::Result<()> {
    let r = lab.ns_router();
    match router {
        "bird" => {
            let mut conf = format!(
                "log stderr all;\nrouter id {ROUTER_IP};\nprotocol device {{ scan time 1; }}\n\
                 protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n"
            );
            if let Some(ms) = s.bfd_ms {
                conf.push_str(&format!(
                    "protocol bfd {{ interface \"*\" {{ min rx interval {ms} ms; min tx interval {ms} ms; multiplier 3; }}; }}\n"
                ));
            }
            conf.push_str(&format!(
                "template bgp node {{ local {ROUTER_IP} as {ROUTER_ASN}; hold time {hold}; connect retry time 1; error wait time 1, 1; \
                 ipv4 {{ import all; export none; }}; {bfd} }}\n",
                hold = s.hold_s,
                bfd = if s.bfd_ms.is_some() { "bfd on;" } else { "" },
            ));
            for i in 1..=lab.nodes {
                conf.push_str(&format!(
                    "protocol bgp n{i} from node {{ neighbor {} as {NODE_ASN}; }}\n",
                    node_ip(i)
                ));
            }
            let path = lab.dir.join("bird.conf");
            std::fs::write(&path, conf)?;
            let p = |n: &str| lab.dir.join(n).display().to_string();
            lab.spawn_exe(
                &r,
                "bird.log",
                "bird",
                &[
                    "-f",
                    "-c",
                    &p("bird.conf"),
                    "-s",
                    &p("bird.ctl"),
                    "-P",
                    &p("bird.pid"),
                ],
            )?;
        }
        "frr" => {
            let bfd = if s.bfd_ms.is_some() {
                " neighbor nodes bfd profile lab\n"
            } else {
                ""
            };
            let mut bgpd = format!(
                "route-map NONE deny 10\n!\nrouter bgp {ROUTER_ASN}\n bgp router-id {ROUTER_IP}\n no bgp ebgp-requires-policy\n\
                 \x20timers bgp {ka} {hold}\n neighbor nodes peer-group\n neighbor nodes remote-as {NODE_ASN}\n\
                 \x20neighbor nodes timers connect 1\n{bfd}",
                ka = (s.hold_s / 3).max(1),
                hold = s.hold_s,
            );
            for i in 1..=lab.nodes {
                bgpd.push_str(&format!(" neighbor {} peer-group nodes\n", node_ip(i)));
            }
            bgpd.push_str(
                " address-family ipv4 unicast\n  maximum-paths 8\n  neighbor nodes route-map NONE out\n exit-address-family\n!\n",
            );
            start_frr(lab, &r, "router", &bgpd, &frr_bfdd(s))?;
        }
        "gobgp" => super::gobgp::start(lab, s).await?,
        _ => bail!("unknown router {router}; use bird, frr or gobgp"),
    }
    Ok(())
}

/// Everything: per system, the router and the nodes, then the rounds of each scenario.
async fn run_all_bgp(lab: &Lab, args: &LabArgs) -> anyhow::Result<(Vec<BgpRound>, Option<String>)> {
    let obs = Arc::new(Mutex::new(Observed::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let prober = start_prober(
        &lab.ns_client(),
        SocketAddr::from((BGP_VIP, 80)),
        obs.clone(),
        stop.clone(),
    );
    let held = Held::start(lab, HELD_CONNECTIONS, stop.clone());
    let watch = RouteWatch::start(lab).await?;
    let mut all = Vec::new();
    let r = async {
        // rounds interleave the systems: round 1 of every system, then round 2, …
        for round in 1..=args.rounds {
            for name in &args.systems {
                let t = Instant::now();
                let mut run = BgpRunning::start(lab, args, name, &watch).await?;
                let system = run.system;
                println!(
                    "{name} ({}): {} next hops in the router's FIB {:.1} s after the start",
                    system.timers(),
                    lab.nodes,
                    t.elapsed().as_secs_f64()
                );
                for scenario in &args.scenarios {
                    if system.speaker == Speaker::Frr && scenario == "backend" {
                        if round == 1 {
                            println!(
                                "{name}: backend skipped (FRR announces its network statement whatever the backend does)"
                            );
                        }
                        continue;
                    }
                    let r = round_bgp(lab, &mut run, &obs, &held, &watch, scenario, round).await?;
                    println!("{}", r.line());
                    all.push(r);
                }
                run.stop(lab).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    // the client stops before the CPU measurement: node-1 then only speaks BGP and BFD
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = prober.join();
        held.join();
    })
    .await;
    r?;
    let cpu = if args.cpu_seconds > 0 {
        Some(cpu_measure(lab, args, &watch).await?)
    } else {
        None
    };
    Ok((all, cpu))
}

/// The held connections: each does a request every 100 ms.
const HELD_CONNECTIONS: usize = 20;

/// CPU and packets of node-1 with BFD at 10 ms × 3 over `args.cpu_seconds`, with no client
/// traffic (the probes and held connections have stopped); packets are counted for BFD and
/// BGP only.
async fn cpu_measure(lab: &Lab, args: &LabArgs, watch: &RouteWatch) -> anyhow::Result<String> {
    let run = BgpRunning::start(lab, args, "portico-bfd-10ms", watch).await?;
    // settle: sessions and BFD up
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = run
        .speakers
        .get(&1)
        .and_then(|p| p.first().copied())
        .context("node-1's pid")?;
    let secs = args.cpu_seconds;
    count_bfd_bgp(lab)?;
    let (c0, p0) = (cpu_ticks(pid)?, bfd_bgp_packets(lab)?);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (c1, p1) = (cpu_ticks(pid)?, bfd_bgp_packets(lab)?);
    let took = t0.elapsed().as_secs_f64();
    let hz = 100.0; // USER_HZ on Linux
    let cpu_s = (c1 - c0) as f64 / hz;
    let out = format!(
        "CPU and packets of node-1 with BFD 10 ms x 3 ({} nodes, router {}), over {took:.1} s: portico utime+stime {cpu_s:.2} s = {:.1}% of one core; \
         BFD+BGP packets on the router's side of its link: {:.0} received/s, {:.0} sent/s",
        lab.nodes,
        args.router,
        100.0 * cpu_s / took,
        (p1.0 - p0.0) as f64 / took,
        (p1.1 - p0.1) as f64 / took,
    );
    run.stop(lab).await;
    Ok(out)
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // the fields after the command name (which may hold spaces) start after the last ')'
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the state
    Ok(get(11) + get(12))
}

/// Counts the BFD and BGP packets between the router and node-1 (nftables counters in the
/// router namespace, table `inet lab`; gone with the namespace).
fn count_bfd_bgp(lab: &Lab) -> anyhow::Result<()> {
    let r = lab.ns_router();
    {
        let rules = format!(
            "table inet lab {{\n\
             chain in {{\n type filter hook input priority 0;\n ip saddr {n} udp dport {{ 3784, 4784 }} counter\n ip saddr {n} tcp dport 179 counter\n ip saddr {n} tcp sport 179 counter\n }}\n\
             chain out {{\n type filter hook output priority 0;\n ip daddr {n} udp dport {{ 3784, 4784 }} counter\n ip daddr {n} tcp dport 179 counter\n ip daddr {n} tcp sport 179 counter\n }}\n\
             }}\n",
            n = node_ip(1)
        );
        let mut c = std::process::Command::new("ip")
            .args(["netns", "exec", &r, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        if let Some(mut i) = c.stdin.take() {
            use std::io::Write as _;
            i.write_all(rules.as_bytes())?;
        }
        anyhow::ensure!(c.wait()?.success(), "nft in the router namespace failed");
    }
    Ok(())
}

/// BFD and BGP packets (received, sent) by the router from/to node-1 so far (the probes' and
/// held connections' packets are left out).
fn bfd_bgp_packets(lab: &Lab) -> anyhow::Result<(u64, u64)> {
    let r = lab.ns_router();
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &r, "nft", "-j", "list", "table", "inet", "lab",
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "nft list table inet lab failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (mut rx, mut tx) = (0, 0);
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if rule.is_null() {
            continue;
        }
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .unwrap_or(0);
        if rule["chain"] == "in" {
            rx += packets;
        } else {
            tx += packets;
        }
    }
    Ok((rx, tx))
}
