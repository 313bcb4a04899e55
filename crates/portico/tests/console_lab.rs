//! A VIP move in a two-node network-namespace lab appears in the web console's timeline: the
//! owner is killed, the survivor takes the VIP, and headless Chromium, run inside the
//! survivor's namespace, finds the `ownerMoved` event in the page's DOM.
//!
//! Needs root (namespaces, veth, raw sockets) and Debian's `chromium`: without them it prints
//! `skipped: …`; with `PORTICO_CI` it fails. Addresses live only inside the namespaces it makes
//! (10.98.0.0/24), and a guard removes them and the processes also on failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_portico");
const VIP: &str = "10.98.0.100";

/// Prints `skipped: needs …` (in CI: fails); always false.
fn needs(what: &str) -> bool {
    sys::skip_test(&format!("needs {what}"));
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, the nodes' processes, a temp dir: all removed on drop.
struct Lab {
    ns: [String; 2],
    procs: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(i: usize) -> String {
    let j = 3 - i;
    format!(
        "node:\n  name: n{i}\n  interfaces: [{{name: eth0, addresses: [10.98.0.1{i}/24]}}]\n\
         cluster:\n  bind: 10.98.0.1{i}:7946\n  peers:\n    - {{name: n{j}, address: 10.98.0.1{j}:7946}}\n  \
         keys: [{{id: 1, secret: \"{key}\"}}]\n\
         admin:\n  listen: 127.0.0.1:9440\n\
         services:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{name: http, port: 80, target_port: 8080}}]\n    \
         backends:\n      - {{name: local, address: 127.0.0.1}}\n    \
         health_check: {{type: tcp, interval: 100ms, timeout: 50ms}}\n",
        key = "5f".repeat(32),
    )
}

fn status(ns: &str) -> Option<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, BIN, "status", "--json"])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn owner(ns: &str) -> Option<String> {
    let s = status(ns)?;
    s["services"][0]["vips"][0]["owner"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_vip_move_in_a_netns_lab_appears_in_the_console_timeline() {
    if !sys::is_root() && !needs("root (network namespaces, veth pairs, raw sockets)") {
        return;
    }
    let chromium_here = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !chromium_here && !needs("chromium (Debian package chromium)") {
        return;
    }
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("portico-console-lab-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lab = Lab {
        ns: [format!("pcl{id}a"), format!("pcl{id}b")],
        procs: Vec::new(),
        dir: dir.clone(),
    };
    let [a, b] = lab.ns.clone();
    ip(&["netns", "add", &a]);
    ip(&["netns", "add", &b]);
    ip(&[
        "link", "add", "pclveth0", "netns", &a, "type", "veth", "peer", "name", "pclveth1",
        "netns", &b,
    ]);
    for (ns, link, addr) in [
        (&a, "pclveth0", "10.98.0.11/24"),
        (&b, "pclveth1", "10.98.0.12/24"),
    ] {
        ip(&["-n", ns, "link", "set", link, "name", "eth0"]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    for (i, ns) in [(1, &a), (2, &b)] {
        let path = dir.join(format!("n{i}.yaml"));
        std::fs::write(&path, config(i)).unwrap();
        let log = std::fs::File::create(dir.join(format!("n{i}.log"))).unwrap();
        lab.procs.push(
            Command::new("ip")
                .args(["netns", "exec", ns, BIN, "run", "--config"])
                .arg(&path)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start a node"),
        );
    }
    // both nodes agree on one owner
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let (oa, ob) = (owner(&a), owner(&b));
        if let Some(o) = oa.as_ref().filter(|_| oa == ob) {
            break o.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no agreed owner within 30 s: {oa:?} {ob:?}; logs in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // kill the owner hard; the other node takes the VIP
    let (dead, survivor) = if first == "n1" { (0, &b) } else { (1, &a) };
    let _ = lab.procs[dead].kill();
    let _ = lab.procs[dead].wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    let next = loop {
        if let Some(o) = owner(survivor).filter(|o| *o != first) {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "the VIP did not move within 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // the page, loaded by chromium in the survivor's namespace, shows the move in its timeline
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let chromium = |extra: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", survivor, "chromium"])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(extra)
            .arg("http://127.0.0.1:9440/")
            .output()
            .expect("run chromium");
        assert!(out.status.success(), "chromium failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium("--dump-dom");
    let moved = dom
        .split("<li ")
        .find(|li| li.starts_with("data-kind=\"ownerMoved\"") && li.contains(VIP))
        .unwrap_or_else(|| panic!("no ownerMoved event for {VIP} in the timeline: {dom}"));
    assert!(
        moved.contains(&format!("{first} → {next}")),
        "the move names both owners: {moved}"
    );
    assert!(
        dom.contains(&format!("class=\"owner ok\">{next}</td>")),
        "{dom}"
    );
    chromium(&format!(
        "--screenshot={}",
        shots.join("console-lab-vip-moved.png").display()
    ));
    eprintln!(
        "timeline entry: <li {}",
        moved.split("</li>").next().unwrap_or_default()
    );
}
