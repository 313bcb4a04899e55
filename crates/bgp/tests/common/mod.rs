//! Shared by the speaker's interop tests: the network namespaces (a router and two nodes joined
//! by veth pairs, 10.98.N.0/24 and fd98:N::/64), a `Speaker` running inside a node namespace on
//! its own thread, and polling. Everything made is removed on drop, also on failure.

#![allow(dead_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bgp::speaker::{PeerConfig, Routes, Speaker, SystemBinder};
use bgp::{Prefix, SessionStatus};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The namespaces `pb-{r,a,b}<pid><tag>`, the router's daemons and a state directory.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    /// Daemons started in the foreground (killed on drop).
    pub children: Vec<Child>,
    /// Pid files of daemons that forked (killed on drop).
    pub pid_files: Vec<PathBuf>,
}

impl Lab {
    /// Creates the namespaces and links: router `a0` 10.98.1.1 ↔ node a `eth0` 10.98.1.2, router
    /// `b0` 10.98.2.1 ↔ node b `eth0` 10.98.2.2 (and fd98:1::/64, fd98:2::/64).
    pub fn new(tag: &str) -> Lab {
        let id = format!("{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("portico-speaker-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let lab = Lab {
            id,
            dir,
            children: Vec::new(),
            pid_files: Vec::new(),
        };
        let (r, a, b) = (lab.ns("r"), lab.ns("a"), lab.ns("b"));
        for ns in [&r, &a, &b] {
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        for (node, link, net) in [(&a, "a0", 1), (&b, "b0", 2)] {
            run(
                "ip",
                &[
                    "-n", &r, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
                    node,
                ],
            );
            for (ns, dev, host) in [(&r, link, 1), (node, "eth0", 2)] {
                let v4 = format!("10.98.{net}.{host}/24");
                let v6 = format!("fd98:{net}::{host}/64");
                run("ip", &["-n", ns, "addr", "add", &v4, "dev", dev]);
                run("ip", &["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
                run("ip", &["-n", ns, "link", "set", dev, "up"]);
            }
        }
        lab
    }

    /// The namespace of `role` (`r`, `a` or `b`).
    pub fn ns(&self, role: &str) -> String {
        format!("pb-{role}{}", self.id)
    }

    /// `ip route show` of `p` in the router.
    pub fn route(&self, v6: bool, p: &str) -> String {
        run(
            "ip",
            &[
                "-n",
                &self.ns("r"),
                if v6 { "-6" } else { "-4" },
                "route",
                "show",
                p,
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pid_files {
            if let Some(pid) = std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        if std::thread::panicking() {
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("--- {} (last lines) ---", p.display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for role in ["r", "a", "b"] {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.ns(role)])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().expect("runs");
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes node namespace `ns` silent: everything it sends is dropped; the link stays up.
pub fn silence(ns: &str) {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "nft",
            "add table inet pbsilent; add chain inet pbsilent out { type filter hook output priority 0; policy drop; }",
        ],
    );
}

/// A speaker running in a node namespace on its own thread and runtime.
pub struct Node {
    pub speaker: Speaker,
    /// The routes it announces.
    pub routes: watch::Sender<Arc<Routes>>,
    stop: CancellationToken,
    crash: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    pub fn start(
        ns: &str,
        peers: Vec<PeerConfig>,
        routes: Routes,
        connect_timeout: Duration,
    ) -> Node {
        let mut registry = Registry::default();
        let binder = SystemBinder {
            connect_timeout,
            ..SystemBinder::default()
        };
        let speaker = Speaker::with_binder(&mut registry, Arc::new(binder));
        let (routes_tx, routes_rx) = watch::channel(Arc::new(routes));
        let (_peers_tx, peers_rx) = watch::channel(Arc::new(peers));
        let stop = CancellationToken::new();
        let crash = CancellationToken::new();
        let path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn({
            let speaker = speaker.clone();
            let (stop, crash) = (stop.clone(), crash.clone());
            move || {
                sys::setns_net(&path).expect("setns");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let _keep = _peers_tx;
                rt.block_on(async {
                    tokio::select! {
                        r = speaker.run(peers_rx, routes_rx, stop) => r.expect("speaker"),
                        // A crash: the runtime goes away with its tasks; the sockets close
                        // without a NOTIFICATION.
                        () = crash.cancelled() => {}
                    }
                });
                rt.shutdown_background();
            }
        });
        Node {
            speaker,
            routes: routes_tx,
            stop,
            crash,
            thread: Some(thread),
        }
    }

    /// The peer's session (a default one until the speaker has started it).
    pub fn session(&self, peer: &str) -> SessionStatus {
        self.speaker
            .sessions()
            .into_iter()
            .find(|s| s.peer == peer)
            .unwrap_or(SessionStatus {
                peer: peer.to_string(),
                address: IpAddr::from([0, 0, 0, 0]),
                state: "absent",
                since: None,
                prefixes_sent: 0,
                updates_sent: 0,
                flaps: 0,
                last_error: None,
                bfd: None,
            })
    }

    pub fn crash(mut self) {
        self.crash.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn poll(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

pub fn vip(s: &str) -> Prefix {
    Prefix::host(s.parse().expect("address"))
}

pub fn peer(name: &str, address: &str, source: &str) -> PeerConfig {
    PeerConfig {
        source: Some(source.parse::<IpAddr>().expect("address")),
        hold_time: Duration::from_secs(9),
        ..PeerConfig::new(
            name,
            address.parse().expect("address"),
            65002,
            65001,
            "10.98.0.2".parse().expect("id"),
        )
    }
}

/// Starts a speaker in `ns` whose session `peer` (source `source`) has a wrong TCP MD5 password,
/// waits until the session's status says that a password mismatch looks like this, checks that
/// it never came up, and stops it.
pub fn wrong_password_is_reported(ns: &str, peer_addr: &str, source: &str, routes: Routes) {
    let mut wrong = peer("b", peer_addr, source);
    wrong.password = Some("not-it".into());
    let node = Node::start(ns, vec![wrong], routes, Duration::from_secs(2));
    poll(Duration::from_secs(15), "the MD5 mismatch reported", || {
        node.session("b")
            .last_error
            .is_some_and(|e| e.contains("TCP MD5"))
    });
    println!("MD5 mismatch: {:?}", node.session("b").last_error);
    assert_ne!(node.session("b").state, "established");
}
