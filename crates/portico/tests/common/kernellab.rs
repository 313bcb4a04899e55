//! The kernel-path netns lab shared by `tests/kernel_path.rs` and `tests/kernel_outlier.rs`:
//! client namespace `-c` (`<net>.0.2`) → node `-n` (forwards IPv4; `<net>.K.1` on veth `vK`)
//! → backends `-b1`, `-b2` (`<net>.K.2` on `eth0`, default route through the node), where
//! `<net>` is each test file's own `10.x`. The namespaces are deleted by [`Lab`]'s drop guard
//! and portico is killed by [`Portico`]'s, also when a test fails. The helpers read the node:
//! its admin API, the VIP's nft map, portico's log.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::time::Instant;

/// The shipped binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// `true` when the test can run: root (for `why_root`), `ip` and `nft`; otherwise prints
/// `skipped: …` and returns `false`, or panics under `PORTICO_CI`.
pub fn can_run(why_root: &str) -> bool {
    super::require(why_root, &["ip", "nft"])
}

/// Runs `args[0]` with the rest; panics with its stderr when it fails; its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces (client, node, b1, b2), deleted on drop (also when the test fails).
pub struct Lab {
    /// `pk-<pid>-<tag>-c`, `-n`, `-b1`, `-b2`.
    pub names: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

impl Lab {
    /// Client `<net>.0.2` → node → backends `<net>.K.2` (`net` such as `"10.78"`); `tag` tells
    /// the namespaces of tests running at once apart.
    pub fn new(tag: &str, net: &str) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            names: ["c", "n", "b1", "b2"]
                .iter()
                .map(|r| format!("pk-{pid}-{tag}-{r}"))
                .collect(),
        };
        for ns in &lab.names {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let n = lab.node().to_string();
        for (k, peer) in [lab.client(), &lab.names[2], &lab.names[3]]
            .into_iter()
            .enumerate()
        {
            let dev = format!("v{k}");
            sh(&[
                "ip", "-n", &n, "link", "add", &dev, "type", "veth", "peer", "name", "eth0",
                "netns", peer,
            ]);
            let node_addr = format!("{net}.{k}.1/24");
            sh(&["ip", "-n", &n, "addr", "add", &node_addr, "dev", &dev]);
            sh(&["ip", "-n", &n, "link", "set", &dev, "up"]);
            let peer_addr = format!("{net}.{k}.2/24");
            sh(&["ip", "-n", peer, "addr", "add", &peer_addr, "dev", "eth0"]);
            sh(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
            let gw = format!("{net}.{k}.1");
            sh(&["ip", "-n", peer, "route", "add", "default", "via", &gw]);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        lab
    }

    /// The client namespace.
    pub fn client(&self) -> &str {
        &self.names[0]
    }

    /// The node namespace (where portico runs).
    pub fn node(&self) -> &str {
        &self.names[1]
    }
}

/// Runs `f` on a thread in namespace `ns` (sockets it opens stay in `ns`); its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        sys::setns_net(&path).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// `portico run` in the node namespace, killed on drop; its stderr lines arrive on `logs`.
pub struct Portico {
    /// `ip netns exec … portico run`.
    pub child: Child,
    /// Its stderr, a line at a time.
    pub logs: mpsc::Receiver<String>,
}

impl Drop for Portico {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Portico {
    /// Starts `portico run --config config` in namespace `node` with `RUST_LOG=rust_log`.
    pub fn spawn(node: &str, config: &Path, rust_log: &str) -> Portico {
        let mut child = Command::new("ip")
            .args(["netns", "exec", node, BIN, "run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn portico");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Portico { child, logs }
    }
}

/// `GET path` on the admin address (127.0.0.1:9440) inside namespace `node`: the body.
pub fn get(node: &str, path: &str) -> Option<String> {
    let path = path.to_string();
    in_ns(node, move || {
        let mut s = TcpStream::connect_timeout(
            &"127.0.0.1:9440".parse().unwrap(),
            Duration::from_millis(500),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.split_once("\r\n\r\n")?.1.to_string())
    })
}

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after `secs` seconds.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The backend addresses in the VIP's map (`nft -j`) in namespace `node`, `None` without the
/// table.
pub fn map_backends(node: &str) -> Option<BTreeSet<String>> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", node, "nft", "-j", "list", "map", "inet", "portico", "s0p0v4",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut set = BTreeSet::new();
    for item in v["nftables"].as_array()? {
        for el in item["map"]["elem"].as_array().into_iter().flatten() {
            if let Some(ip) = el[1]["concat"][0].as_str() {
                set.insert(ip.to_string());
            }
        }
    }
    Some(set)
}

/// One connection to `to` from namespace `ns` (`timeout` to connect and to read): the first
/// line it answers, trimmed, or the error.
pub fn first_line(ns: &str, to: SocketAddr, timeout: Duration) -> Result<String, String> {
    in_ns(ns, move || {
        let s = TcpStream::connect_timeout(&to, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-…T16:09:43.123456Z`).
pub fn stamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = t.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}
