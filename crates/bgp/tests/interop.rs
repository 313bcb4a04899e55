//! The codecs against real BGP speakers from Debian (GoBGP's `gobgpd`, BIRD 2): a session is
//! opened by hand over TCP on loopback — our OPEN, their OPEN decoded, KEEPALIVEs — then an IPv4
//! and an IPv6 host route are announced and withdrawn with our UPDATEs, and the peer's own RIB
//! (its CLI) must show them come and go. Every message the peer sends is decoded with our codec.
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
use bgp::message::{
    AFI_IPV4, AFI_IPV6, AsSegment, Attribute, Capability, Context, Error, GracefulRestart, Message,
    Notification, Open, Origin, SAFI_UNICAST, Update,
};

const OURS: u32 = 65002;
const THEIRS: u32 = 65001;
const CX: Context = Context {
    four_octet_as: true,
};

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

/// A session's reading side: buffers octets and decodes whole messages with our codec.
struct Session {
    stream: TcpStream,
    buf: Vec<u8>,
    cx: Context,
    seen: Vec<Message>,
}

impl Session {
    fn send(&mut self, m: &Message) {
        self.stream.write_all(&m.encode(self.cx)).expect("send");
    }

    /// The next message within `within`; `None` on timeout.
    fn next(&mut self, within: Duration) -> Option<Message> {
        let until = Instant::now() + within;
        loop {
            match Message::decode(&self.buf, self.cx) {
                Ok((m, n)) => {
                    self.buf.drain(..n);
                    self.seen.push(m.clone());
                    return Some(m);
                }
                Err(Error::Incomplete { .. }) => {}
                Err(e) => panic!(
                    "the peer sent what our codec refuses: {e} ({:02x?})",
                    self.buf
                ),
            }
            if Instant::now() >= until {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the peer closed the session; seen: {:?}", self.seen),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Opens the session: OPEN both ways, KEEPALIVE both ways. Returns the peer's OPEN.
    fn establish(stream: TcpStream) -> (Session, Open) {
        let mut s = Session {
            stream,
            buf: Vec::new(),
            cx: Context::default(),
            seen: Vec::new(),
        };
        let ours = Open {
            my_as: u16::try_from(OURS).expect("2-octet AS"),
            hold_time: 9,
            identifier: Ipv4Addr::new(192, 0, 2, 2),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::RouteRefresh,
                Capability::GracefulRestart(GracefulRestart {
                    restarted: false,
                    restart_time: 120,
                    families: vec![(AFI_IPV4, SAFI_UNICAST, false)],
                }),
                Capability::FourOctetAs(OURS),
            ],
        };
        s.send(&Message::Open(ours));
        let theirs = match s.next(Duration::from_secs(10)) {
            Some(Message::Open(o)) => o,
            Some(other) => panic!("expected OPEN, got {other:?}"),
            None => panic!("no OPEN from the peer in 10 s"),
        };
        assert_eq!(theirs.asn(), THEIRS, "{theirs:?}");
        assert!(
            theirs
                .capabilities
                .iter()
                .any(|c| matches!(c, Capability::FourOctetAs(_))),
            "{theirs:?}"
        );
        s.cx = CX;
        s.send(&Message::Keepalive);
        match s.next(Duration::from_secs(10)) {
            Some(Message::Keepalive) => {}
            other => panic!("expected KEEPALIVE, got {other:?}"),
        }
        (s, theirs)
    }

    /// Answers KEEPALIVEs and decodes whatever else arrives for `d`.
    fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Some(Message::Keepalive) = self.next(Duration::from_millis(100)) {
                self.send(&Message::Keepalive);
            }
        }
    }
}

fn vip4() -> Prefix {
    Prefix::host("198.51.100.7".parse().expect("address"))
}

fn vip6() -> Prefix {
    Prefix::host("2001:db8:100::7".parse().expect("address"))
}

fn announce() -> Update {
    Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment {
                kind: 2,
                asns: vec![OURS],
            }]),
            // A next hop outside 127/8 (GoBGP refuses loopback next hops); no traffic goes to it.
            Attribute::NextHop(Ipv4Addr::new(192, 0, 2, 2)),
            Attribute::Communities(vec![(OURS << 16) | 100]),
        ],
        nlri: vec![vip4()],
    }
}

fn announce6() -> Update {
    Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment {
                kind: 2,
                asns: vec![OURS],
            }]),
            Attribute::MpReach {
                afi: AFI_IPV6,
                next_hops: vec!["2001:db8::2".parse().expect("address")],
                nlri: vec![vip6()],
            },
        ],
        nlri: vec![],
    }
}

fn withdraw() -> [Update; 2] {
    [
        Update {
            withdrawn: vec![vip4()],
            ..Update::default()
        },
        Update {
            attributes: vec![Attribute::MpUnreach {
                afi: AFI_IPV6,
                withdrawn: vec![vip6()],
            }],
            ..Update::default()
        },
    ]
}

/// Polls `show` until `want(output)` holds (10 s), answering KEEPALIVEs meanwhile.
fn wait_rib(s: &mut Session, what: &str, show: &dyn Fn() -> String, want: &dyn Fn(&str) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let out = show();
        if want(&out) {
            println!("{what}:\n{out}");
            return;
        }
        assert!(Instant::now() < until, "{what}; the peer shows:\n{out}");
        s.idle(Duration::from_millis(200));
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
fn exercise(s: &mut Session, show4: &dyn Fn() -> String, show6: &dyn Fn() -> String) {
    s.send(&Message::Update(announce()));
    s.send(&Message::Update(announce6()));
    wait_rib(s, "198.51.100.7/32 announced", show4, &|o| {
        o.contains("198.51.100.7/32")
    });
    wait_rib(s, "2001:db8:100::7/128 announced", show6, &|o| {
        o.contains("2001:db8:100::7/128")
    });
    for u in withdraw() {
        s.send(&Message::Update(u));
    }
    wait_rib(s, "198.51.100.7/32 withdrawn", show4, &|o| {
        !o.contains("198.51.100.7/32")
    });
    wait_rib(s, "2001:db8:100::7/128 withdrawn", show6, &|o| {
        !o.contains("2001:db8:100::7/128")
    });
    s.send(&Message::Notification(Notification {
        code: 6,
        subcode: 2,
        data: vec![],
    }));
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
    let (mut s, theirs) = Session::establish(connect(port));
    assert_eq!(theirs.identifier, Ipv4Addr::new(192, 0, 2, 1));
    let api = api.to_string();
    let show = |afi: &'static str| {
        let api = api.clone();
        move || run("gobgp", &["-p", &api, "global", "rib", "-a", afi])
    };
    let (show4, show6) = (show("ipv4"), show("ipv6"));
    exercise(&mut s, &show4, &show6);
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
    let (mut s, theirs) = Session::establish(connect(port));
    assert_eq!(theirs.identifier, Ipv4Addr::new(192, 0, 2, 1));
    let sock = sock.to_string_lossy().to_string();
    let show = || {
        run(
            "birdc",
            &["-s", &sock, "show", "route", "protocol", "portico"],
        )
    };
    exercise(&mut s, &show, &show);
}
