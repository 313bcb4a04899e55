//! BGP announcement end to end: two nodes, each running the shipped `portico` binary with
//! `announce: bgp`, peer with a BIRD 2 router; the router installs one multipath route per VIP
//! (IPv4 and IPv6) with a next hop per serving node, clients behind the router reach both
//! nodes, a node whose backends fail is withdrawn (and says why in its `/status`), and a
//! graceful stop withdraws before it drains, so no client request fails.
//!
//! Network (namespaces `pa<pid>x<n>-…`): the router `-r` holds bridge `br0` (10.78.0.1/24,
//! fd78::1/64) with the nodes `-n1`, `-n2` on it (10.78.0.11-12, fd78::11-12) and a veth to
//! the client `-c` (10.78.9.2/24, fd78:9::2/64). BIRD runs in `-r` with the kernel protocol's
//! `merge paths on`, and the router hashes flows by ports (`fib_multipath_hash_policy=1`) so
//! one client's connections spread. Each node's backend is a small HTTP server on
//! 127.0.0.1:8080 inside the node's namespace answering `node-<i>`. Every namespace and
//! process is removed by Drop guards.
//!
//! Needs root, `ip`, `bird` and `curl`: without them the test prints `skipped: …` and returns,
//! unless `PORTICO_CI` is set, when it fails.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const VIP4: &str = "10.78.100.1";
const VIP6: &str = "fd78:100::1";

fn can_run() -> bool {
    let missing = if !sys::is_root() {
        Some("needs root (network namespaces, veth pairs)".to_string())
    } else {
        ["ip", "bird", "curl"]
            .iter()
            .find(|t| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .stdout(Stdio::null())
                    .status()
                    .map_or(true, |s| !s.success())
            })
            .map(|t| format!("needs `{t}` (scripts/test-all installs it)"))
    };
    match missing {
        None => true,
        Some(why) => {
            sys::skip_test(&why);
            false
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a command run inside namespace `ns` (bounded by the command's own timeout flags).
fn in_ns(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A child process killed (and reaped) on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(ns: &str, argv: &[&str], log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("process starts");
        Proc {
            child: Some(child),
            log,
        }
    }

    /// Sends `sig` and waits (at most `within`) for the process to exit; true when it did.
    fn stop(&mut self, sig: i32, within: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let _ = sys::kill(c.id(), sig);
        let steps = (within.as_millis() / 20).max(1);
        for _ in 0..steps {
            if c.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The namespaces, processes and backends of one test.
struct Lab {
    prefix: String,
    made: Vec<String>,
    dir: PathBuf,
    /// Per node: the flag that stops its backend.
    backends: Vec<Arc<AtomicBool>>,
    // dropped before the namespaces (fields drop in order): processes first
    nodes: Vec<Proc>,
    bird: Option<Proc>,
}

impl Lab {
    fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
    fn node(&self, i: usize) -> String {
        self.ns(&format!("n{i}"))
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn create() -> Lab {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pa{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("portico-bgp-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut lab = Lab {
            prefix,
            made: Vec::new(),
            dir,
            backends: Vec::new(),
            nodes: Vec::new(),
            bird: None,
        };
        let r = lab.ns("r");
        lab.add_ns(&r);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
        ] {
            ip(&["netns", "exec", &r, "sysctl", "-qw", &format!("{k}={v}")]);
        }
        ip(&["-n", &r, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &r, "addr", "add", "10.78.0.1/24", "dev", "br0"]);
        ip(&["-n", &r, "addr", "add", "fd78::1/64", "dev", "br0", "nodad"]);
        ip(&["-n", &r, "link", "set", "br0", "up"]);
        for i in 1..=2 {
            let node = lab.node(i);
            lab.add_ns(&node);
            let port = format!("n{i}");
            ip(&[
                "-n", &r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &node,
            ]);
            ip(&["-n", &r, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.78.0.1{i}/24"),
                "dev",
                "eth0",
            ]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("fd78::1{i}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&["-n", &node, "link", "set", "eth0", "up"]);
            ip(&["-n", &node, "route", "add", "default", "via", "10.78.0.1"]);
            ip(&[
                "-n", &node, "-6", "route", "add", "default", "via", "fd78::1",
            ]);
            lab.backends.push(Arc::new(AtomicBool::new(true)));
        }
        let c = lab.ns("c");
        lab.add_ns(&c);
        ip(&[
            "-n", &r, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", &c,
        ]);
        ip(&["-n", &r, "addr", "add", "10.78.9.1/24", "dev", "cl"]);
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            "fd78:9::1/64",
            "dev",
            "cl",
            "nodad",
        ]);
        ip(&["-n", &r, "link", "set", "cl", "up"]);
        ip(&["-n", &c, "addr", "add", "10.78.9.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            "fd78:9::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &c, "link", "set", "eth0", "up"]);
        ip(&["-n", &c, "route", "add", "default", "via", "10.78.9.1"]);
        ip(&[
            "-n",
            &c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd78:9::1",
        ]);
        lab
    }

    fn start_bird(&mut self) {
        let mut conf = String::from(
            "log stderr all;\nrouter id 10.78.0.1;\nprotocol device { scan time 1; }\n\
             protocol kernel k4 { ipv4 { import none; export all; }; merge paths on; }\n\
             protocol kernel k6 { ipv6 { import none; export all; }; merge paths on; }\n\
             template bgp node { local as 64500; hold time 9; connect retry time 1; error wait time 1, 5; }\n",
        );
        for i in 1..=2 {
            conf.push_str(&format!(
                "protocol bgp n{i}v4 from node {{ neighbor 10.78.0.1{i} as 64512; ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp n{i}v6 from node {{ neighbor fd78::1{i} as 64512; ipv6 {{ import all; export none; }}; }}\n"
            ));
        }
        let path = self.dir.join("bird.conf");
        std::fs::write(&path, conf).expect("bird.conf");
        let (sock, pid) = (self.dir.join("bird.ctl"), self.dir.join("bird.pid"));
        let r = self.ns("r");
        self.bird = Some(Proc::spawn(
            &r,
            &[
                "bird",
                "-f",
                "-c",
                path.to_str().unwrap(),
                "-s",
                sock.to_str().unwrap(),
                "-P",
                pid.to_str().unwrap(),
            ],
            self.dir.join("bird.log"),
        ));
    }

    /// Node `i`'s shipped binary, standalone, with one `announce: bgp` service.
    fn start_node(&mut self, i: usize) {
        let yaml = format!(
            "node: {{name: n{i}}}\n\
             bgp:\n  asn: 64512\n  router_id: 10.78.0.1{i}\n  graceful_stop_grace: 1s\n  peers:\n\
             \x20   - {{name: tor4, address: 10.78.0.1, asn: 64500, hold_time: 9s}}\n\
             \x20   - {{name: tor6, address: \"fd78::1\", asn: 64500, hold_time: 9s}}\n\
             shutdown: {{drain_timeout: 5s}}\n\
             services:\n  - name: web\n    vips: [{VIP4}, \"{VIP6}\"]\n    ports: [{{port: 80, target_port: 8080}}]\n\
             \x20   backends: [{{name: local, address: 127.0.0.1}}]\n    announce: bgp\n\
             \x20   health_check: {{type: tcp, interval: 200ms, timeout: 100ms, rise: 1, fall: 1}}\n"
        );
        let path = self.dir.join(format!("n{i}.yaml"));
        std::fs::write(&path, yaml).expect("node config");
        let node = self.node(i);
        let exe = env!("CARGO_BIN_EXE_portico");
        let p = Proc::spawn(
            &node,
            &[exe, "run", "--config", path.to_str().unwrap()],
            self.dir.join(format!("n{i}.log")),
        );
        if self.nodes.len() >= i {
            self.nodes[i - 1] = p;
        } else {
            self.nodes.push(p);
        }
    }

    /// Starts node `i`'s HTTP backend (127.0.0.1:8080 in its namespace, answering `node-<i>`);
    /// it stops when [`Lab::stop_backend`] clears its flag.
    fn start_backend(&self, i: usize) {
        let path = format!("/run/netns/{}", self.node(i));
        // a previous server sees the flag cleared and ends, freeing the port
        self.backends[i - 1].store(false, Ordering::Relaxed);
        let slot = self.backends[i - 1].clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            sys::setns_net(&path).expect("setns into the node");
            // the previous server may still hold the port for a moment
            let l = (0..100)
                .find_map(|_| {
                    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 8080)))
                        .map_err(|_| std::thread::sleep(Duration::from_millis(20)))
                        .ok()
                })
                .expect("backend listens");
            l.set_nonblocking(true).expect("nonblocking");
            slot.store(true, Ordering::Relaxed);
            let _ = ready_tx.send(());
            let body = format!("node-{i}\n");
            // bounded: until its flag is cleared, at most 10 minutes
            for _ in 0..(600 * 50) {
                if !slot.load(Ordering::Relaxed) {
                    return;
                }
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("backend started");
    }

    fn stop_backend(&self, i: usize) {
        self.backends[i - 1].store(false, Ordering::Relaxed);
    }

    /// The router's route to `vip`, as `ip route` prints it.
    fn route(&self, vip: &str) -> String {
        let fam = if vip.contains(':') { "-6" } else { "-4" };
        in_ns(&self.ns("r"), &["ip", fam, "route", "show", vip]).1
    }

    /// The next hops of the router's route to `vip` (sorted).
    fn next_hops(&self, vip: &str) -> Vec<String> {
        let route = self.route(vip);
        let words: Vec<&str> = route.split_whitespace().collect();
        let mut hops: Vec<String> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    async fn wait_next_hops(&self, vip: &str, want: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.next_hops(vip);
            if got == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "router route to {vip}: want next hops {want:?}, got {got:?}\n`ip route`: {}\nbird:\n{}\nn1:\n{}\nn2:\n{}",
                    self.route(vip),
                    self.bird.as_ref().map(Proc::log_tail).unwrap_or_default(),
                    self.nodes.first().map(Proc::log_tail).unwrap_or_default(),
                    self.nodes.get(1).map(Proc::log_tail).unwrap_or_default(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One HTTP request from the client to `vip`: the answering node's body, or `None`.
    fn get(&self, vip: &str) -> Option<String> {
        let url = if vip.contains(':') {
            format!("http://[{vip}]/")
        } else {
            format!("http://{vip}/")
        };
        let (ok, out) = in_ns(&self.ns("c"), &["curl", "-sg", "-m", "2", &url]);
        ok.then(|| out.trim().to_string())
    }

    /// Which nodes answered `n` requests (sorted, deduplicated), and how many failed.
    fn spread(&self, vip: &str, n: usize) -> (Vec<String>, usize) {
        let mut seen = Vec::new();
        let mut failed = 0;
        for _ in 0..n {
            match self.get(vip) {
                Some(body) => seen.push(body),
                None => failed += 1,
            }
        }
        seen.sort();
        seen.dedup();
        (seen, failed)
    }

    /// Node `i`'s `/status` as JSON (from inside its namespace).
    fn status(&self, i: usize) -> serde_json::Value {
        let (_, out) = in_ns(
            &self.node(i),
            &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/status"],
        );
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    async fn wait_route_reason(&self, i: usize, vip: &str, reason: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let st = self.status(i);
            let got = st["bgp"]["routes"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["address"] == vip))
                .and_then(|r| r["reason"].as_str().map(String::from));
            if got.as_deref() == Some(reason) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}: want bgp reason {reason} for {vip}, got {got:?}: {st}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for b in &self.backends {
            b.store(false, Ordering::Relaxed);
        }
        self.nodes.clear();
        self.bird = None;
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecmp_across_serving_nodes_withdraw_and_graceful_stop() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::create();
    lab.start_bird();
    for i in 1..=2 {
        lab.start_backend(i);
        lab.start_node(i);
    }
    let both4 = ["10.78.0.11", "10.78.0.12"];
    let both6 = ["fd78::11", "fd78::12"];

    // 1. one multipath route per VIP, a next hop per serving node
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &both4, Duration::from_secs(30))
        .await;
    lab.wait_next_hops(VIP6, &both6, Duration::from_secs(30))
        .await;
    println!(
        "both next hops, IPv4 and IPv6, {:?} after the start",
        t0.elapsed()
    );
    assert!(lab.route(VIP4).contains("nexthop"), "{}", lab.route(VIP4));
    for i in 1..=2 {
        lab.wait_route_reason(i, VIP4, "announced", Duration::from_secs(5))
            .await;
        let st = lab.status(i);
        let sessions = st["bgp"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(sessions.len(), 2, "{st}");
        assert!(
            sessions
                .iter()
                .all(|s| s["state"] == "established" && s["prefixes_sent"] == 1),
            "{st}"
        );
    }

    // 2. client connections spread over both nodes, IPv4 and IPv6
    for vip in [VIP4, VIP6] {
        let (seen, failed) = lab.spread(vip, 40);
        assert_eq!(failed, 0, "{vip}");
        assert_eq!(seen, ["node-1", "node-2"], "{vip}");
    }

    // 3. node 2's backends fail: node 2 withdraws, with the reason in its /status
    lab.stop_backend(2);
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &["10.78.0.11"], Duration::from_secs(10))
        .await;
    lab.wait_next_hops(VIP6, &["fd78::11"], Duration::from_secs(10))
        .await;
    println!(
        "backend down -> node 2 withdrawn, IPv4 and IPv6, after {:?}",
        t0.elapsed()
    );
    lab.wait_route_reason(2, VIP4, "noHealthyBackend", Duration::from_secs(5))
        .await;
    lab.wait_route_reason(2, VIP6, "noHealthyBackend", Duration::from_secs(5))
        .await;
    for vip in [VIP4, VIP6] {
        let (seen, failed) = lab.spread(vip, 10);
        assert_eq!(
            (seen.as_slice(), failed),
            (&["node-1".to_string()][..], 0),
            "{vip}"
        );
    }

    // 4. it comes back
    lab.start_backend(2);
    let t0 = Instant::now();
    lab.wait_next_hops(VIP4, &both4, Duration::from_secs(10))
        .await;
    lab.wait_next_hops(VIP6, &both6, Duration::from_secs(10))
        .await;
    println!(
        "backend up -> node 2 announced again after {:?}",
        t0.elapsed()
    );

    // 5. graceful stop of node 1 under a client loop: withdraw, wait, then drain; no request
    //    fails (without the withdrawal, requests hashed to node 1 meet a closed listener)
    let stop_loop = Arc::new(AtomicBool::new(false));
    let client = {
        let (c, stop) = (lab.ns("c"), stop_loop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            // bounded: until told, at most 60 s
            let until = std::time::SystemTime::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::SystemTime::now() < until {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &c,
                        "curl",
                        "-s",
                        "-m",
                        "2",
                        &format!("http://{VIP4}/"),
                    ])
                    .output()
                    .expect("curl runs");
                if out.status.success() {
                    ok += 1;
                } else {
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    failed.push(format!("curl exit {:?} at {at:?}", out.status.code()));
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    assert!(
        lab.nodes[0].stop(sys::SIGTERM, Duration::from_secs(20)),
        "node 1 exits on SIGTERM:\n{}",
        lab.nodes[0].log_tail()
    );
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_loop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().expect("client loop");
    assert!(ok > 10, "client requests during the stop: {ok}");
    let sigterm = std::time::SystemTime::now() - t0.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the graceful stop (SIGTERM at {:?}): {failed:#?}\n{}",
        failed.len(),
        ok + failed.len(),
        sigterm
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
        lab.nodes[0].log()
    );
    assert!(
        took >= Duration::from_secs(1),
        "the grace is kept: {took:?}"
    );
    let log = lab.nodes[0].log();
    assert!(
        log.contains("withdrawing BGP routes before draining"),
        "{}",
        lab.nodes[0].log_tail()
    );
    lab.wait_next_hops(VIP4, &["10.78.0.12"], Duration::from_secs(10))
        .await;
    println!("graceful stop: {ok} requests, 0 failed; node 1 exited after {took:?}");
}
