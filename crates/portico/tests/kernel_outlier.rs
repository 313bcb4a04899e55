//! Passive outlier detection on the kernel path, end to end (root, `nft`): `portico run` in a
//! node namespace this test creates, a kernel-path service with two backends whose health check
//! targets another port. Backend b2 closes its service listener (its check still passes): the
//! client's connections through the VIP that land on b2 are refused, conntrack reports them,
//! and after `consecutive_failures` refusals b2 leaves the nft map (read back), `/status` says
//! it is ejected, and every connection succeeds; once the ejection time is over b2 is back in
//! the map, half-open, and its next flow closes the breaker. Without the conntrack event feed
//! nothing ejects b2 and the test fails. A second test black-holes b2 (its SYNs dropped): it is
//! ejected after `consecutive_failures` flows unanswered for `connection.connect_timeout`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_portico");
const VIP: &str = "10.79.100.1";
const EJECTION: Duration = Duration::from_secs(3);

fn sh(args: &[&str]) -> String {
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

/// The namespaces, deleted on drop (also when the test fails).
struct Lab {
    names: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        sys::setns_net(&path).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A listener in namespace `ns` answering its name on each connection until `stop`; closing
/// it (drop) makes the backend's kernel refuse the port with a RST.
fn serve(ns: &str, port: u16, name: &'static str) -> Arc<AtomicBool> {
    let l = in_ns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind backend")
    });
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let deadline = std::time::SystemTime::now() + Duration::from_secs(300);
        while !flag.load(Ordering::Relaxed) && std::time::SystemTime::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(format!("{name}\n").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    stop
}

/// Client 10.79.0.2 → node → backends 10.79.K.2.
fn lab(tag: &str) -> Lab {
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
    let n = lab.names[1].clone();
    for (k, peer) in [&lab.names[0], &lab.names[2], &lab.names[3]]
        .into_iter()
        .enumerate()
    {
        let dev = format!("v{k}");
        sh(&[
            "ip", "-n", &n, "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns",
            peer,
        ]);
        let node_addr = format!("10.79.{k}.1/24");
        sh(&["ip", "-n", &n, "addr", "add", &node_addr, "dev", &dev]);
        sh(&["ip", "-n", &n, "link", "set", &dev, "up"]);
        let peer_addr = format!("10.79.{k}.2/24");
        sh(&["ip", "-n", peer, "addr", "add", &peer_addr, "dev", "eth0"]);
        sh(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
        let gw = format!("10.79.{k}.1");
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

/// portico, killed on drop.
struct Portico {
    child: Child,
    logs: mpsc::Receiver<String>,
}

impl Drop for Portico {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(node: &str, path: &str) -> Option<String> {
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

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The backend addresses in the VIP's map (`nft -j`), `None` without the table.
fn map_backends(node: &str) -> Option<BTreeSet<String>> {
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

/// One connection through the VIP from the client: the backend's name, or the error.
fn via_vip(client: &str) -> Result<String, String> {
    in_ns(client, || {
        let s = TcpStream::connect_timeout(
            &SocketAddr::new(VIP.parse().unwrap(), 80),
            Duration::from_secs(2),
        )
        .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
}

/// b2's row in `/status`.
fn b2_status(node: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&get(node, "/status")?).ok()?;
    v["services"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == "b2")
        .cloned()
}

/// Seconds since midnight of a log line's RFC 3339 timestamp.
fn stamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = t.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn metric(node: &str, prefix: &str) -> f64 {
    get(node, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_refusing_backend_is_ejected_from_the_kernel_map_and_readmitted() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces, nftables, conntrack events)");
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        sys::skip_test("needs nft");
        return;
    }
    let lab = lab("ko");
    let (client, node) = (lab.names[0].clone(), lab.names[1].clone());
    let _b1 = serve(&lab.names[2], 8080, "b1");
    let _b1_check = serve(&lab.names[2], 9090, "b1");
    let b2 = serve(&lab.names[3], 8080, "b2");
    let _b2_check = serve(&lab.names[3], 9090, "b2");
    let (p, dir) = start(&lab, "ko");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        seen.insert(via_vip(&client).expect("both backends serve"));
    }
    assert_eq!(seen.len(), 2, "both backends reached: {seen:?}");

    // b2 closes its service port; its health check port stays open
    b2.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    while p.logs.try_recv().is_ok() {}
    let mut refused = 0;
    let mut attempts = 0;
    while map_backends(&node) != Some(["10.79.1.2".to_string()].into()) {
        attempts += 1;
        assert!(
            attempts <= 200,
            "b2 was not ejected after {refused} refused connections (no conntrack feed?)"
        );
        if via_vip(&client).is_err() {
            refused += 1;
        }
    }
    let ejected_at = Instant::now();
    assert!(
        refused >= 3,
        "ejected after {refused} refusals, consecutive_failures is 3"
    );
    // the decision and its batch, from portico's log stamps
    let lines: Vec<String> = p.logs.try_iter().collect();
    let decided = lines
        .iter()
        .find(|l| l.contains("backend ejected") && l.contains("outlierEjected"))
        .and_then(|l| stamp(l))
        .unwrap_or_else(|| panic!("no ejection logged: {lines:#?}"));
    let applied = lines
        .iter()
        .filter(|l| l.contains("kernel path applied") && l.contains("kind=\"elements\""))
        .filter_map(|l| stamp(l))
        .find(|&t| t >= decided)
        .unwrap_or_else(|| panic!("no batch after the ejection: {lines:#?}"));
    let took = applied - decided;
    println!(
        "b2 ejected after {refused} refused connections ({attempts} attempts); ejection decision → nft batch applied: {:.1} ms",
        took * 1e3
    );
    assert!(took < 0.150, "ejection to batch took {took} s");

    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["breaker"], "open", "{st}");
    assert_eq!(st["health"], "up", "its check still passes: {st}");
    assert!(st["connect_failures"].as_u64() >= Some(3), "{st}");
    assert!(
        metric(
            &node,
            "portico_kernel_backend_flow_outcomes_total{service=\"web\",backend=\"b2\",outcome=\"refused\"}"
        ) >= 3.0
    );
    assert_eq!(
        metric(
            &node,
            "portico_kernel_backend_ejections_total{service=\"web\",backend=\"b2\"}"
        ),
        1.0
    );
    for _ in 0..20 {
        assert_eq!(
            via_vip(&client).as_deref(),
            Ok("b1"),
            "all traffic succeeds"
        );
    }

    // b2 listens again; the ejection ends after base_ejection_time: back in the map
    let _b2_again = serve(&lab.names[3], 8080, "b2");
    wait_for("b2 back in the map", 15, || {
        (map_backends(&node)?.len() == 2).then_some(())
    });
    let back = ejected_at.elapsed();
    println!("b2 back in the map {back:?} after its ejection");
    assert!(
        back >= EJECTION - Duration::from_millis(500),
        "re-admitted after {back:?}, ejection time {EJECTION:?}"
    );
    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], false, "{st}");
    assert_eq!(st["breaker"], "half-open", "{st}");
    // its next flow connects: the breaker closes
    wait_for("a flow on b2", 10, || {
        (via_vip(&client).ok()? == "b2").then_some(())
    });
    wait_for("b2's breaker closed", 5, || {
        (b2_status(&node)?["breaker"] == "closed").then_some(())
    });

    sys::kill(p.child.id(), sys::SIGTERM).unwrap();
    let mut p = p;
    wait_for("graceful exit", 20, || p.child.try_wait().ok().flatten());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts portico in the node namespace on the test's configuration, waits until it is ready
/// with both backends in the map and its conntrack event feed running.
fn start(lab: &Lab, tag: &str) -> (Portico, std::path::PathBuf) {
    let node = lab.names[1].clone();
    let dir = std::env::temp_dir().join(format!("pk-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portico.yaml");
    std::fs::write(
        &config,
        format!(
            "node: {{name: n1}}\nservices:\n  - name: web\n    vips: [{VIP}]\n    \
             ports: [{{port: 80, target_port: 8080}}]\n    forwarding: kernel\n    \
             health_check: {{type: tcp, port: 9090, interval: 200ms, timeout: 100ms, rise: 1, fall: 1}}\n    \
             connection: {{connect_timeout: 1s}}\n    \
             outlier: {{conntrack_events: true, consecutive_failures: 3, base_ejection_time: {}s, max_ejection_percent: 50}}\n    \
             backends: [{{name: b1, address: 10.79.1.2}}, {{name: b2, address: 10.79.2.2}}]\n",
            EJECTION.as_secs()
        ),
    )
    .unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node, BIN, "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
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
    let p = Portico { child, logs };
    wait_for("/status ready", 20, || {
        let v: serde_json::Value = serde_json::from_str(&get(&node, "/status")?).ok()?;
        v["ready"].as_bool()?.then_some(())
    });
    wait_for("both backends in the map", 10, || {
        (map_backends(&node)?.len() == 2).then_some(())
    });
    assert_eq!(
        metric(&node, "portico_kernel_passive_detection "),
        1.0,
        "the conntrack event feed runs"
    );
    (p, dir)
}

#[test]
fn a_black_holed_backend_is_ejected_after_connect_timeouts() {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces, nftables, conntrack events)");
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        sys::skip_test("needs nft");
        return;
    }
    let lab = lab("kb");
    let (client, node) = (lab.names[0].clone(), lab.names[1].clone());
    let _b1 = serve(&lab.names[2], 8080, "b1");
    let _b1_check = serve(&lab.names[2], 9090, "b1");
    let _b2 = serve(&lab.names[3], 8080, "b2");
    let _b2_check = serve(&lab.names[3], 9090, "b2");
    let (p, dir) = start(&lab, "kb");
    // b2 drops every SYN to its service port (no answer at all); its check port answers
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.names[3],
        "nft",
        "add table inet pkdrop; add chain inet pkdrop in { type filter hook input priority 0; }; add rule inet pkdrop in tcp dport 8080 drop",
    ]);
    let mut timed_out = 0;
    let mut rounds = 0;
    while map_backends(&node) != Some(["10.79.1.2".to_string()].into()) {
        rounds += 1;
        assert!(
            rounds <= 10,
            "b2 was not ejected after {timed_out} unanswered connections"
        );
        // 6 clients at once: those hashed to b2 wait for their 2 s connect timeout
        let clients: Vec<_> = (0..6)
            .map(|_| {
                let c = client.clone();
                std::thread::spawn(move || via_vip(&c))
            })
            .collect();
        timed_out += clients
            .into_iter()
            .map(|c| c.join().map_or(true, |r| r.is_err()))
            .filter(|&failed| failed)
            .count();
    }
    assert!(timed_out >= 3, "ejected after {timed_out} timeouts");
    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["health"], "up", "its check still passes: {st}");
    assert!(
        metric(
            &node,
            "portico_kernel_backend_flow_outcomes_total{service=\"web\",backend=\"b2\",outcome=\"timeout\"}"
        ) >= 3.0
    );
    println!("b2 ejected after {timed_out} unanswered connections ({rounds} rounds of 6)");
    for _ in 0..10 {
        assert_eq!(
            via_vip(&client).as_deref(),
            Ok("b1"),
            "all traffic succeeds"
        );
    }
    sys::kill(p.child.id(), sys::SIGTERM).unwrap();
    let mut p = p;
    wait_for("graceful exit", 20, || p.child.try_wait().ok().flatten());
    let _ = std::fs::remove_dir_all(&dir);
}
