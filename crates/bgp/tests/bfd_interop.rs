//! The BFD session machine against BIRD 2's BFD (RFC 5881 single hop) over a veth pair between
//! two network namespaces this test creates: the session comes Up on both sides, BIRD sees it
//! Down when we fall silent, and we see BIRD's death at the detection time.
//!
//! Root only (namespaces); locally it skips without root or BIRD, in CI (`PORTICO_CI`) it
//! fails. Namespaces, links and the BIRD process are removed at the end, also on failure.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bgp::bfd::session::{Action, Session, Timers};
use bgp::bfd::{Control, State};
use tokio::time::Instant;

const TIMERS: Timers = Timers {
    desired_min_tx: Duration::from_millis(100),
    required_min_rx: Duration::from_millis(100),
    detect_mult: 3,
};

struct Lab {
    router: String,
    node: String,
    bird: Option<Child>,
    dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut b) = self.bird.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default();
            eprintln!("--- bird.log ---\n{log}");
        }
        for ns in [&self.router, &self.node] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {args:?} failed");
}

fn birdc(lab: &Lab, args: &[&str]) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.router, "birdc", "-s"])
        .arg(lab.dir.join("bird.ctl"))
        .args(args)
        .output()
        .expect("birdc runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// BIRD's view of the session with 10.99.0.2: its state word.
fn bird_state(lab: &Lab) -> String {
    birdc(lab, &["show", "bfd", "sessions"])
        .lines()
        .find(|l| l.starts_with("10.99.0.2"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("none")
        .to_string()
}

/// Drives `s` with real sockets and real time until `stop(s)` or `within` passes; `silent`
/// suppresses sending. Returns when it stopped.
fn drive(
    s: &mut Session,
    rx: &UdpSocket,
    tx: &UdpSocket,
    within: Duration,
    silent: bool,
    stop: &mut dyn FnMut(&Session) -> bool,
) -> Option<Instant> {
    let until = Instant::now() + within;
    let to: SocketAddr = "10.99.0.1:3784".parse().expect("address");
    let mut buf = [0u8; 128];
    loop {
        let now = Instant::now();
        if stop(s) {
            return Some(now);
        }
        if now >= until {
            return None;
        }
        let mut actions = s.tick(now);
        let wait = s
            .next_deadline()
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        rx.set_read_timeout(Some(wait)).expect("timeout");
        if let Ok((n, _)) = rx.recv_from(&mut buf)
            && let Ok(p) = Control::decode(&buf[..n])
        {
            actions.extend(s.receive(&p, Instant::now()));
        }
        for a in actions {
            if let Action::Send(p) = a
                && !silent
            {
                let _ = tx.send_to(&p.encode(), to);
            }
        }
    }
}

#[test]
fn bird_and_our_session_come_up_and_each_sees_the_others_silence() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces)");
        return;
    }
    if Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .stdout(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        sys::skip_test("needs bird and birdc (Debian bird2)");
        return;
    }
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("portico-bfd-{id}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut lab = Lab {
        router: format!("pbfd{id}r"),
        node: format!("pbfd{id}n"),
        bird: None,
        dir: dir.clone(),
    };
    ip(&["netns", "add", &lab.router]);
    ip(&["netns", "add", &lab.node]);
    ip(&[
        "-n",
        &lab.router,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &lab.node,
    ]);
    for (ns, addr) in [(&lab.router, "10.99.0.1/24"), (&lab.node, "10.99.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    std::fs::write(
        dir.join("bird.conf"),
        "router id 10.99.0.1;\n\
         protocol device { }\n\
         protocol bfd {\n\
           interface \"eth0\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };\n\
           neighbor 10.99.0.2 dev \"eth0\";\n\
         }\n",
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("bird.log")).expect("log");
    lab.bird = Some(
        Command::new("ip")
            .args(["netns", "exec", &lab.router, "bird", "-f", "-c"])
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("bird starts"),
    );

    // Our side runs in the node namespace, on a thread of its own each time.
    let node = format!("/run/netns/{}", lab.node);
    let on_node = |f: Box<dyn FnOnce() -> Box<dyn std::any::Any + Send> + Send>| {
        let node = node.clone();
        std::thread::spawn(move || {
            sys::setns_net(&node).expect("enter the node namespace");
            f()
        })
        .join()
        .expect("our side ran")
    };
    type Side = (Session, UdpSocket, UdpSocket);
    let side: Side = *on_node(Box::new(|| {
        // RFC 5881: received on 3784, sent from 49152–65535 with TTL 255 (GTSM).
        let rx = UdpSocket::bind("10.99.0.2:3784").expect("bind 3784");
        let tx = UdpSocket::bind("10.99.0.2:49152").expect("bind 49152");
        tx.set_ttl(255).expect("TTL 255");
        let mut s = Session::new(0x5eed, TIMERS, Instant::now());
        let up = drive(&mut s, &rx, &tx, Duration::from_secs(10), false, &mut |s| {
            s.state() == State::Up
        });
        assert!(up.is_some(), "our session did not come Up in 10 s");
        drive(&mut s, &rx, &tx, Duration::from_secs(1), false, &mut |_| {
            false
        });
        assert_eq!(s.state(), State::Up);
        Box::new((s, rx, tx)) as Box<dyn std::any::Any + Send>
    }))
    .downcast::<Side>()
    .expect("the side");
    assert_eq!(
        bird_state(&lab),
        "Up",
        "{}",
        birdc(&lab, &["show", "bfd", "sessions"])
    );
    // We fall silent (this process stops sending): BIRD must see us Down after its detection
    // time (3 x 100 ms; birdc is polled every 20 ms).
    let silent = Instant::now();
    while bird_state(&lab) == "Up" {
        assert!(
            silent.elapsed() < Duration::from_secs(2),
            "BIRD still has the session Up 2 s after we fell silent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let bird_saw = silent.elapsed();
    println!("we fell silent -> BIRD's session left Up after {bird_saw:?}");
    // Talk again: Up again on both sides, then BIRD dies and we see it at our detection time.
    let bird = lab.bird.take();
    let took: Duration = *on_node(Box::new(move || {
        let (mut s, rx, tx) = side;
        let again = drive(&mut s, &rx, &tx, Duration::from_secs(10), false, &mut |s| {
            s.state() == State::Up
        });
        assert!(again.is_some(), "no Up again after the silence");
        drive(&mut s, &rx, &tx, Duration::from_secs(1), false, &mut |_| {
            false
        });
        let mut bird = bird.expect("bird runs");
        let _ = bird.kill();
        let _ = bird.wait();
        let killed = Instant::now();
        let down = drive(&mut s, &rx, &tx, Duration::from_secs(3), false, &mut |s| {
            s.state() == State::Down
        })
        .expect("our session went Down");
        assert_eq!(s.diag(), 1, "control detection time expired");
        Box::new(down - killed) as Box<dyn std::any::Any + Send>
    }))
    .downcast::<Duration>()
    .expect("a duration");
    println!("BIRD killed -> our session Down after {took:?} (detection time 300 ms)");
    assert!(
        bird_saw <= Duration::from_millis(600),
        "BIRD took {bird_saw:?} to see our silence (its detection time is 300 ms; bound 600 ms with the birdc polling)"
    );
    assert!(
        took <= Duration::from_millis(400),
        "{took:?}: the detection time is 300 ms (bound 400 ms)"
    );
}
