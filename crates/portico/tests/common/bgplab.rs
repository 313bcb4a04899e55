//! The BGP netns lab shared by `tests/bgp.rs` and `tests/ecmp.rs`: a router namespace `-r`
//! running BIRD 2 (`merge paths on`, `fib_multipath_hash_policy=1`) with bridge `br0`
//! (10.78.0.1/24, fd78::1/64), `n` node namespaces `-n<i>` on it (10.78.0.1<i>, fd78::1<i>)
//! each running the shipped binary with one `announce: bgp` service, and a client namespace
//! `-c` (10.78.9.2/24, fd78:9::2/64) behind the router. Each node's backend (port 8080 in its
//! namespace; the service reaches it on 127.0.0.1, or on 10.78.0.1<i> on the kernel path) answers an HTTP request with `node-<i>` and closes, or answers every line of
//! anything else with `node-<i>` on the same connection (long-lived clients). Every namespace
//! and process is removed by Drop guards, also on failure.

pub use super::{in_ns, ip};

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The IPv4 VIP of the lab's service.
pub const VIP4: &str = "10.78.100.1";
/// Its IPv6 VIP.
pub const VIP6: &str = "fd78:100::1";

/// Whether the lab can run here (root, `ip`, `bird`, `curl`); prints `skipped: …` (or fails
/// under `PORTICO_CI`) when not.
pub fn can_run() -> bool {
    super::require("network namespaces, veth pairs", &["ip", "bird", "curl"])
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `argv` in namespace `ns`, stdout and stderr to `log`.
    pub fn spawn(ns: &str, argv: &[&str], log: PathBuf) -> Proc {
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
    pub fn stop(&mut self, sig: i32, within: Duration) -> bool {
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

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last 25 lines.
    pub fn log_tail(&self) -> String {
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

/// One backend connection: an HTTP request is answered with `body` and closed; anything else
/// gets `body` for every line until the client closes, the flag clears or 10 minutes passed.
fn serve(mut s: TcpStream, body: &str, run: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 1024];
    let Ok(n) = s.read(&mut buf) else { return };
    if buf[..n].starts_with(b"GET ") {
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let mut lines = buf[..n].iter().filter(|b| **b == b'\n').count();
    let Ok(read) = s.try_clone() else { return };
    let mut read = BufReader::new(read);
    let deadline = std::time::SystemTime::now() + Duration::from_secs(600);
    let mut line = String::new();
    while run.load(Ordering::Relaxed) && std::time::SystemTime::now() < deadline {
        for _ in 0..lines {
            if s.write_all(body.as_bytes()).is_err() {
                return;
            }
        }
        line.clear();
        lines = match read.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => 1,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                0
            }
            Err(_) => return,
        };
    }
}

/// The namespaces, processes and backends of one test.
pub struct Lab {
    prefix: String,
    made: Vec<String>,
    dir: PathBuf,
    /// Per node: the flag that stops its backend.
    backends: Vec<Arc<AtomicBool>>,
    /// Nodes in the lab (started or not).
    pub size: usize,
    /// Extra lines of each node's `bgp:` section (two-space indented), e.g. `  ecmp_rescue: false\n`.
    pub bgp_extra: String,
    /// Whether the nodes gossip with each other (`cluster:` with every other node as a peer).
    pub cluster: bool,
    /// Whether they gossip over IPv6 (their fd78::1<i> addresses) rather than IPv4.
    pub cluster_v6: bool,
    /// Whether the service runs on the kernel path (`forwarding: kernel`, DNAT to the node's
    /// own address 10.78.0.1<i>:8080, IP forwarding on) rather than the proxy to 127.0.0.1.
    pub kernel: bool,
    /// Each node's `health_check` (flow YAML).
    pub health: String,
    /// Each node's `shutdown.drain_timeout`.
    pub drain: String,
    /// The service's `bgp:` settings (flow YAML, empty: none), e.g. `{owner_only: true}`.
    pub service_bgp: String,
    // dropped before the namespaces (fields drop in order): processes first
    /// Per node: its `portico` process.
    pub nodes: Vec<Proc>,
    bird: Option<Proc>,
}

impl Lab {
    /// Namespace `<prefix>-<what>`.
    pub fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
    /// Node `i`'s namespace.
    pub fn node(&self, i: usize) -> String {
        self.ns(&format!("n{i}"))
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// The namespaces of a lab of `size` nodes (nothing started).
    pub fn create(size: usize) -> Lab {
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
            size,
            bgp_extra: String::new(),
            cluster: false,
            cluster_v6: false,
            kernel: false,
            health: "{type: tcp, interval: 200ms, timeout: 100ms, rise: 1, fall: 1}".into(),
            drain: "5s".into(),
            service_bgp: String::new(),
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
        for i in 1..=size {
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

    /// Starts BIRD in the router namespace, with a session per node and family.
    pub fn start_bird(&mut self) {
        let mut conf = String::from(
            "log stderr all;\nrouter id 10.78.0.1;\nprotocol device { scan time 1; }\n\
             protocol kernel k4 { ipv4 { import none; export all; }; merge paths on; }\n\
             protocol kernel k6 { ipv6 { import none; export all; }; merge paths on; }\n\
             template bgp node { local as 64500; hold time 9; connect retry time 1; error wait time 1, 5; }\n",
        );
        for i in 1..=self.size {
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

    /// Node `i`'s shipped binary, standalone, with one `announce: bgp` service (and `cluster:`
    /// and `bgp_extra` as set).
    pub fn start_node(&mut self, i: usize) {
        let extra = &self.bgp_extra;
        let addr = |j: usize| {
            if self.cluster_v6 {
                format!("[fd78::1{j}]:7946")
            } else {
                format!("10.78.0.1{j}:7946")
            }
        };
        let cluster = if self.cluster {
            let peers: Vec<String> = (1..=self.size)
                .filter(|j| *j != i)
                .map(|j| format!("{{name: n{j}, address: \"{}\"}}", addr(j)))
                .collect();
            format!(
                "cluster:\n  bind: \"{}\"\n  peers: [{}]\n  \
                 keys: [{{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}}]\n",
                addr(i),
                peers.join(", ")
            )
        } else {
            String::new()
        };
        // gossip needs an interface (the agent's, for `l2` VIPs: none here)
        let interfaces = if self.cluster {
            format!(
                ", interfaces: [{{name: eth0, addresses: [10.78.0.1{i}/24, \"fd78::1{i}/64\"]}}]"
            )
        } else {
            String::new()
        };
        let yaml = format!(
            "node: {{name: n{i}{interfaces}}}\n{cluster}\
             bgp:\n  asn: 64512\n  router_id: 10.78.0.1{i}\n  graceful_stop_grace: 1s\n{extra}  peers:\n\
             \x20   - {{name: tor4, address: 10.78.0.1, asn: 64500, hold_time: 9s}}\n\
             \x20   - {{name: tor6, address: \"fd78::1\", asn: 64500, hold_time: 9s}}\n\
             shutdown: {{drain_timeout: {drain}}}\n\
             services:\n  - name: web\n    vips: [{VIP4}, \"{VIP6}\"]\n    ports: [{{port: 80, target_port: 8080}}]\n\
             \x20   backends: [{{name: local, address: {backend}}}]\n    announce: bgp\n{forwarding}{service_bgp}\
             \x20   health_check: {health}\n",
            drain = self.drain,
            backend = if self.kernel {
                format!("10.78.0.1{i}")
            } else {
                "127.0.0.1".into()
            },
            forwarding = if self.kernel {
                "\x20   forwarding: kernel\n"
            } else {
                ""
            },
            health = self.health,
            service_bgp = if self.service_bgp.is_empty() {
                String::new()
            } else {
                format!("    bgp: {}\n", self.service_bgp)
            },
        );
        let path = self.dir.join(format!("n{i}.yaml"));
        std::fs::write(&path, yaml).expect("node config");
        let node = self.node(i);
        if self.kernel {
            // both families: a service with an IPv6 VIP on a node that does not forward IPv6
            // runs on the proxy (`ipv6ForwardingOff`)
            ip(&[
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]);
        }
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

    /// Starts node `i`'s backend (0.0.0.0:8080 in its namespace, answering `node-<i>`: once
    /// to an HTTP request, to every line otherwise); it stops when [`Lab::stop_backend`] clears
    /// its flag.
    pub fn start_backend(&self, i: usize) {
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
                    TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], 8080)))
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
                    Ok((s, _)) => {
                        let (body, slot) = (body.clone(), slot.clone());
                        std::thread::spawn(move || serve(s, &body, &slot));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("backend started");
    }

    /// Stops node `i`'s backend.
    pub fn stop_backend(&self, i: usize) {
        self.backends[i - 1].store(false, Ordering::Relaxed);
    }

    /// The router's route to `vip`, as `ip route` prints it.
    pub fn route(&self, vip: &str) -> String {
        let fam = if vip.contains(':') { "-6" } else { "-4" };
        in_ns(&self.ns("r"), &["ip", fam, "route", "show", vip]).1
    }

    /// The next hops of the router's route to `vip` (sorted).
    pub fn next_hops(&self, vip: &str) -> Vec<String> {
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

    /// Waits (at most `within`) until the router's next hops to `vip` are `want`; panics with
    /// the route and the logs when they are not.
    pub async fn wait_next_hops(&self, vip: &str, want: &[&str], within: Duration) {
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
    pub fn get(&self, vip: &str) -> Option<String> {
        let url = if vip.contains(':') {
            format!("http://[{vip}]/")
        } else {
            format!("http://{vip}/")
        };
        let (ok, out) = in_ns(&self.ns("c"), &["curl", "-sg", "-m", "2", &url]);
        ok.then(|| out.trim().to_string())
    }

    /// Which nodes answered `n` requests (sorted, deduplicated), and how many failed.
    pub fn spread(&self, vip: &str, n: usize) -> (Vec<String>, usize) {
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
    pub fn status(&self, i: usize) -> serde_json::Value {
        let (_, out) = in_ns(
            &self.node(i),
            &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/status"],
        );
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    /// Waits (at most `within`) until node `i`'s `/status` gives `reason` for `vip`.
    pub async fn wait_route_reason(&self, i: usize, vip: &str, reason: &str, within: Duration) {
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
