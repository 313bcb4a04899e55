//! The session state machine and codecs against real BGP speakers from Debian (GoBGP's
//! `gobgpd`, BIRD 2), driven by a thin blocking driver over TCP on loopback: the session comes
//! up (OPENs with capabilities, KEEPALIVEs), an IPv4 and an IPv6 host route are announced and
//! withdrawn, and the peer's own RIB (its CLI) must show them come and go; keepalives keep it
//! up; a stop sends a Cease. Every message the peer sends goes through our decoder.
//!
//! Loopback only (127.0.0.1 ↔ 127.0.0.2, free ports); the peer's process and files are removed
//! when the test ends, also when it fails. Locally the test skips without the package; in CI
//! (`PORTICO_CI`) it fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use bgp::Prefix;
use bgp::message::{Context, Message};
use bgp::session::{Action, Config, Session};

const OURS: u32 = 65002;
const THEIRS: u32 = 65001;

/// A peer process, killed and its directory removed on drop.
struct Peer {
    child: Child,
    dir: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("portico-bgp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Connects from 127.0.0.2 to the peer on 127.0.0.1:`port`, retrying while it starts.
fn connect(port: u16) -> TcpStream {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
            .expect("bind 127.0.0.2");
        match s.connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)).into(),
            Duration::from_secs(1),
        ) {
            Ok(()) => {
                let t: TcpStream = s.into();
                t.set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("timeout");
                return t;
            }
            Err(e) => {
                assert!(
                    Instant::now() < until,
                    "the peer does not listen on {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A thin blocking driver around the session state machine: the TCP stream, real time.
struct Driver {
    s: Session,
    stream: TcpStream,
    up: bool,
    down: Option<&'static str>,
}

impl Driver {
    /// Connects and runs until the session is Established, connecting again (as a speaker's
    /// ConnectRetry would) while the peer resets or closes a connection before that: a daemon
    /// just started may accept on its port before its BGP protocol takes connections (BIRD
    /// did so once in CI, with a reset and nothing in its log). 30 s in all.
    fn establish(port: u16) -> (Driver, Vec<Message>) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match Self::attempt(port) {
                Ok(done) => return done,
                Err(e) if Instant::now() < until => {
                    eprintln!("not Established, connecting again: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("not Established within 30 s: {e}"),
            }
        }
    }

    /// One connection, run until Established (10 s), or why not.
    fn attempt(port: u16) -> Result<(Driver, Vec<Message>), String> {
        let mut s = Session::new(Config {
            local_as: OURS,
            peer_as: THEIRS,
            router_id: Ipv4Addr::new(192, 0, 2, 2),
            hold_time: 9,
            // Next hops outside 127/8 (GoBGP refuses loopback next hops); no traffic goes there.
            next_hop_v4: Some(Ipv4Addr::new(192, 0, 2, 2)),
            next_hop_v6: Some("2001:db8::2".parse().expect("address")),
            communities: vec![(OURS << 16) | 100],
            local_pref: None,
            restart_time: Some(120),
            name: "peer".into(),
        });
        assert_eq!(s.start(Instant::now()), [Action::Connect]);
        let stream = connect(port);
        let mut d = Driver {
            s,
            stream,
            up: false,
            down: None,
        };
        let first = d.s.connected(Instant::now());
        let sent = d.apply(first);
        let until = Instant::now() + Duration::from_secs(10);
        let mut chunk = [0u8; 4096];
        while !d.up && Instant::now() < until {
            let acts = match d.stream.read(&mut chunk) {
                Ok(0) => return Err("the peer closed the connection".into()),
                Ok(n) => d.s.received(&chunk[..n], Instant::now()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    Vec::new()
                }
                Err(e) => return Err(format!("read: {e}")),
            };
            d.apply(acts);
            let acts = d.s.tick(Instant::now());
            d.apply(acts);
            if let Some(reason) = d.down {
                return Err(format!("the session went down: {reason}"));
            }
        }
        if !d.up {
            return Err("no Established within 10 s".into());
        }
        Ok((d, sent))
    }

    fn apply(&mut self, actions: Vec<Action>) -> Vec<Message> {
        let mut sent = Vec::new();
        for a in actions {
            match a {
                Action::Send(b) => {
                    if let Ok((m, _)) = Message::decode(
                        &b,
                        Context {
                            four_octet_as: true,
                        },
                    ) {
                        sent.push(m);
                    }
                    self.stream.write_all(&b).expect("send");
                }
                Action::Close => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                }
                Action::Established { .. } => self.up = true,
                Action::Down { reason, .. } => self.down = Some(reason),
                Action::Connect => {}
            }
        }
        sent
    }

    /// Reads, ticks and applies until `stop` or `within` passes.
    fn pump(&mut self, within: Duration, stop: &dyn Fn(&Driver) -> bool) {
        let until = Instant::now() + within;
        let mut chunk = [0u8; 4096];
        while !stop(self) && Instant::now() < until {
            let acts = match self.stream.read(&mut chunk) {
                Ok(0) => self.s.disconnected(Instant::now()),
                Ok(n) => self.s.received(&chunk[..n], Instant::now()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    Vec::new()
                }
                Err(e) => panic!("read: {e}"),
            };
            self.apply(acts);
            let acts = self.s.tick(Instant::now());
            self.apply(acts);
            assert!(
                self.down.is_none(),
                "the session went down: {:?}",
                self.down
            );
        }
    }
}

fn vip4() -> Prefix {
    Prefix::host("198.51.100.7".parse().expect("address"))
}

fn vip6() -> Prefix {
    Prefix::host("2001:db8:100::7".parse().expect("address"))
}

/// Polls `show` until `want(output)` holds (10 s), keeping the session running meanwhile.
fn wait_rib(d: &mut Driver, what: &str, show: &dyn Fn() -> String, want: &dyn Fn(&str) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let out = show();
        if want(&out) {
            println!("{what}:\n{out}");
            return;
        }
        assert!(Instant::now() < until, "{what}; the peer shows:\n{out}");
        d.pump(Duration::from_millis(200), &|_| false);
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Announce, see, withdraw, see gone, then close with a Cease.
fn exercise(d: &mut Driver, show4: &dyn Fn() -> String, show6: &dyn Fn() -> String) {
    let acts = d.s.set_routes(std::sync::Arc::new(
        [(vip4(), Default::default()), (vip6(), Default::default())].into(),
    ));
    let sent = d.apply(acts);
    assert_eq!(sent.len(), 2, "one UPDATE per family: {sent:?}");
    wait_rib(d, "198.51.100.7/32 announced", show4, &|o| {
        o.contains("198.51.100.7/32")
    });
    wait_rib(d, "2001:db8:100::7/128 announced", show6, &|o| {
        o.contains("2001:db8:100::7/128")
    });
    let acts = d.s.set_routes(Default::default());
    d.apply(acts);
    wait_rib(d, "198.51.100.7/32 withdrawn", show4, &|o| {
        !o.contains("198.51.100.7/32")
    });
    wait_rib(d, "2001:db8:100::7/128 withdrawn", show6, &|o| {
        !o.contains("2001:db8:100::7/128")
    });
    // Keepalives (every 3 s with the 9 s hold time) keep it up.
    d.pump(Duration::from_secs(4), &|_| false);
    assert!(d.down.is_none());
    let acts = d.s.stop();
    d.apply(acts);
    assert_eq!(d.down, Some("stopped"));
}

#[test]
fn gobgp_takes_our_open_and_our_routes() {
    if !have("gobgpd") || !have("gobgp") {
        sys::skip_test("needs gobgpd and gobgp (Debian gobgpd)");
        return;
    }
    let (port, api) = (free_port(), free_port());
    let d = dir("gobgp");
    let conf = d.join("gobgpd.toml");
    std::fs::write(
        &conf,
        format!(
            r#"[global.config]
  as = {THEIRS}
  router-id = "192.0.2.1"
  port = {port}
  local-address-list = ["127.0.0.1"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "127.0.0.2"
    peer-as = {OURS}
  [neighbors.transport.config]
    passive-mode = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#
        ),
    )
    .expect("config");
    let log = std::fs::File::create(d.join("gobgpd.log")).expect("log");
    let child = Command::new("gobgpd")
        .args(["-f", &conf.to_string_lossy(), "-t", "toml", "--api-hosts"])
        .arg(format!("127.0.0.1:{api}"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("gobgpd starts");
    let _peer = Peer { child, dir: d };
    let (mut d, _) = Driver::establish(port);
    let api = api.to_string();
    let show = |afi: &'static str| {
        let api = api.clone();
        move || run("gobgp", &["-p", &api, "global", "rib", "-a", afi])
    };
    let (show4, show6) = (show("ipv4"), show("ipv6"));
    exercise(&mut d, &show4, &show6);
}

#[test]
fn bird_takes_our_open_and_our_routes() {
    if !have("bird") || !have("birdc") {
        sys::skip_test("needs bird and birdc (Debian bird2)");
        return;
    }
    let port = free_port();
    let d = dir("bird");
    let conf = d.join("bird.conf");
    let sock = d.join("bird.ctl");
    // `gateway recursive` with a static default route lets BIRD resolve any next hop, so the
    // routes are accepted whatever the loopback's routing looks like.
    std::fs::write(
        &conf,
        format!(
            r#"router id 192.0.2.1;
protocol device {{ }}
protocol static s4 {{ ipv4; route 0.0.0.0/0 unreachable; }}
protocol static s6 {{ ipv6; route ::/0 unreachable; }}
protocol bgp portico {{
  local 127.0.0.1 port {port} as {THEIRS};
  neighbor 127.0.0.2 as {OURS};
  passive on;
  multihop;
  hold time 9;
  ipv4 {{ import all; export none; gateway recursive; }};
  ipv6 {{ import all; export none; gateway recursive; extended next hop off; }};
}}
"#
        ),
    )
    .expect("config");
    let log = std::fs::File::create(d.join("bird.log")).expect("log");
    let child = Command::new("bird")
        .args([
            "-f",
            "-c",
            &conf.to_string_lossy(),
            "-s",
            &sock.to_string_lossy(),
        ])
        .args(["-P", &d.join("bird.pid").to_string_lossy()])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("bird starts");
    let _peer = Peer {
        child,
        dir: d.clone(),
    };
    let (mut d, _) = Driver::establish(port);
    let sock = sock.to_string_lossy().to_string();
    let show = || {
        run(
            "birdc",
            &["-s", &sock, "show", "route", "protocol", "portico"],
        )
    };
    exercise(&mut d, &show, &show);
}
