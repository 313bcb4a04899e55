//! The web console, `/events` and `portico status --watch` against a running `portico run`:
//! a backend killed shows as down without a reload — in headless Chromium (Debian `chromium`,
//! driven over the DevTools protocol) within 2 s, on `/events` and in `status --watch` — and
//! the page works at phone width and with JavaScript blocked (a static snapshot).
//! Screenshots go to `target/console-screenshots/` (CI keeps them as artifacts).
//!
//! Without chromium the browser test prints `skipped: …`; with `PORTICO_CI` it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_portico");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// A TCP backend on 127.0.0.1 that accepts (and closes) connections until killed; killing it
/// closes its listener, so connects are refused.
struct Backend {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start() -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `portico run` on loopback with one service, backends `b1` and `b2`; returns the process and
/// its admin address.
fn start_portico(name: &str, b1: u16, b2: u16) -> (Proc, SocketAddr, Dir) {
    let dir = std::env::temp_dir().join(format!("portico-console-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dir = Dir(dir);
    let vip_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = format!(
        "node: {{name: console-node}}\nadmin: {{listen: 127.0.0.1:0}}\nservices:\n  - name: web\n    vips: [127.0.0.78]\n    ports: [{{name: http, port: {vip_port}}}]\n    backends:\n      - {{name: b1, address: 127.0.0.1, port: {b1}}}\n      - {{name: b2, address: 127.0.0.1, port: {b2}}}\n    health_check: {{type: tcp, interval: 100ms, timeout: 50ms}}\n"
    );
    let path = dir.0.join("portico.yaml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn portico run");
    let stderr = child.stderr.take().unwrap();
    let child = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && let Some(rest) = line.split("admin listening on ").nth(1)
        {
            let admin = rest.split_whitespace().next().unwrap().parse().unwrap();
            // keep draining the log so the child never blocks on a full pipe
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return (child, admin, dir);
        }
    }
    panic!("portico did not start its admin server");
}

/// `GET path` over a plain socket: status and body (by content-length when the server keeps
/// the connection open, as the DevTools server does).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    let mut len = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse::<usize>().ok();
        }
        head.push_str(&line);
    }
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body).unwrap();
        }
        None => {
            let _ = r.read_to_end(&mut body);
        }
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn health_of(addr: SocketAddr, backend: &str) -> String {
    let (_, body) = get(addr, "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["services"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == backend)
        .map(|b| b["health"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

#[test]
fn events_and_status_watch_follow_a_backend_going_down() {
    let (mut b1, b2) = (Backend::start(), Backend::start());
    let (_portico, admin, _dir) = start_portico("watch", b1.port, b2.port);
    wait_until("both backends up", Duration::from_secs(10), || {
        health_of(admin, "b1") == "up" && health_of(admin, "b2") == "up"
    });
    // the page without JavaScript: a complete snapshot, rendered by the server
    let (status, page) = get(admin, "/");
    assert_eq!(status, 200);
    assert!(page.contains("<td class=\"health up\">up</td>"), "{page}");
    assert!(page.contains("data-backend=\"web/b1\"") && page.contains("<noscript>"));
    let (_, events) = get(admin, "/events");
    let since = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);

    let mut watch = Command::new(BIN)
        .args(["status", "--watch", "--admin", &admin.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn portico status --watch");
    let out = watch.stdout.take().unwrap();
    let _watch = Proc(watch);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // the table first, then the timeline header
    wait_until("the watch header", Duration::from_secs(10), || {
        rx.try_iter().any(|l| l.starts_with("EVENTS"))
    });
    b1.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "status --watch printed no health event for web/b1 within 5 s: {seen:?}"
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
            if line.contains("health web/b1: up → down") {
                break;
            }
            seen.push(line);
        }
    }
    let printed = killed.elapsed();
    eprintln!("status --watch printed the health event {printed:?} after the kill");
    // and /events serves it as a JSON line
    let (status, events) = get(admin, &format!("/events?since={since}"));
    assert_eq!(status, 200);
    let down: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .filter(|e: &serde_json::Value| {
            e["kind"] == "health" && e["subject"] == "web/b1" && e["message"] == "up → down"
        })
        .collect();
    assert_eq!(down.len(), 1, "{events}");
    assert!(down[0]["seq"].as_u64().unwrap() > since);
}

/// Whether Debian's `chromium` is here; in CI its absence fails the test.
fn chromium() -> Option<&'static str> {
    let ok = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some("chromium");
    }
    if std::env::var_os("PORTICO_CI").is_some() {
        panic!("needs chromium (Debian package chromium)");
    }
    eprintln!("skipped: needs chromium (apt-get install chromium)");
    None
}

const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-extensions",
    "--disable-dev-shm-usage",
];

/// A minimal DevTools-protocol client: one page's WebSocket, text frames, blocking.
struct Cdp {
    s: TcpStream,
    id: u64,
}

impl Cdp {
    fn connect(ws_url: &str) -> Cdp {
        let rest = ws_url.strip_prefix("ws://").expect("a ws:// URL");
        let (host, path) = rest.split_once('/').expect("a path");
        let mut s = TcpStream::connect(host).expect("connect to DevTools");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: cG9ydGljby1jb25zb2xlLQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("handshake");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "handshake: {head}");
        Cdp { s, id: 0 }
    }

    fn send_frame(&mut self, text: &str) {
        let data = text.as_bytes();
        let mut f = vec![0x81u8];
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        match data.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    fn read_message(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).expect("a frame");
            let fin = h[0] & 0x80 != 0;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b).unwrap();
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b).unwrap();
                len = u64::from_be_bytes(b);
            }
            assert!(len < 64 << 20, "a frame of {len} bytes");
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).unwrap();
            msg.extend_from_slice(&data);
            if fin {
                return String::from_utf8_lossy(&msg).into_owned();
            }
        }
    }

    /// Calls `method` and returns its `result`.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// Calls `method`: its `result`, or the error the browser answered.
    fn try_call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        self.id += 1;
        let id = self.id;
        let req = serde_json::json!({"id": id, "method": method, "params": params});
        self.send_frame(&req.to_string());
        loop {
            let m: serde_json::Value = serde_json::from_str(&self.read_message()).unwrap();
            if m["id"].as_u64() == Some(id) {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    /// Evaluates `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, name: &str) {
        let r = self.call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png"}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = screenshots().join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

/// Starts headless chromium on `url` with DevTools on a free port; the page's WebSocket URL.
fn open_page(url: &str, profile: &Path) -> (Proc, String) {
    let mut child = Command::new("chromium")
        .args(CHROMIUM_FLAGS)
        .args(["--remote-debugging-port=0", "--window-size=1280,1000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    let stderr = child.stderr.take().unwrap();
    let child = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut devtools = None;
    let mut seen = Vec::new();
    while devtools.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                devtools = rest.split('/').next().map(str::to_string);
            }
            seen.push(line);
        }
    }
    let devtools = devtools.unwrap_or_else(|| panic!("chromium did not start: {seen:?}"));
    std::thread::spawn(move || while rx.recv().is_ok() {});
    let addr: SocketAddr = devtools.parse().unwrap();
    let mut ws = None;
    wait_until("the page target", Duration::from_secs(10), || {
        let (_, body) = get(addr, "/json/list");
        let list: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        ws = list.as_array().into_iter().flatten().find_map(|t| {
            (t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)))
                .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                .flatten()
        });
        ws.is_some()
    });
    (child, ws.unwrap())
}

#[test]
fn the_console_shows_a_killed_backend_down_within_2s_without_a_reload() {
    let Some(_) = chromium() else { return };
    let (mut b1, b2) = (Backend::start(), Backend::start());
    let (_portico, admin, dir) = start_portico("chromium", b1.port, b2.port);
    wait_until("both backends up", Duration::from_secs(10), || {
        health_of(admin, "b1") == "up" && health_of(admin, "b2") == "up"
    });
    let url = format!("http://{admin}/");
    let (_chromium, ws) = open_page(&url, &dir.0.join("profile"));
    let mut page = Cdp::connect(&ws);
    let b1_health =
        "(document.querySelector('[data-backend=\"web/b1\"] .health') || {}).textContent";
    // live: the stream has delivered a snapshot
    let live = Instant::now() + Duration::from_secs(10);
    while page
        .eval("document.body ? (document.body.dataset.updated || '') : ''")
        .as_str()
        .is_none_or(str::is_empty)
    {
        assert!(Instant::now() < live, "the page never went live");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(page.eval(b1_health), "up");
    assert_eq!(
        page.eval("document.getElementById('conn').className"),
        "live"
    );
    // a marker a reload would wipe
    page.eval("window.porticoMarker = 42");
    page.screenshot("console-desktop-up.png");

    b1.kill();
    let killed = Instant::now();
    loop {
        if page.eval(b1_health) == "down" {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "web/b1 not shown down within 2 s of the kill; the page shows {}",
            page.eval(b1_health)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let shown = killed.elapsed();
    eprintln!("the console showed web/b1 down {shown:?} after the kill");
    assert_eq!(
        page.eval("window.porticoMarker"),
        42,
        "the page was reloaded"
    );
    // and the timeline has the transition (the observer reads the state every 100 ms)
    let timeline_js = "[...document.querySelectorAll('#timeline li[data-kind=\"health\"]')].map(l => l.textContent).join('\\n')";
    let mut timeline = serde_json::Value::Null;
    wait_until(
        "the health event in the timeline",
        Duration::from_secs(2),
        || {
            timeline = page.eval(timeline_js);
            timeline
                .as_str()
                .unwrap_or_default()
                .contains("web/b1: up → down")
        },
    );
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "timeline after {:?}: {timeline}",
        killed.elapsed()
    );
    assert_eq!(
        page.eval("window.porticoMarker"),
        42,
        "the page was reloaded"
    );
    page.screenshot("console-desktop-down.png");

    // phone width: nothing wider than the screen (tables scroll inside their boxes)
    page.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let width = page.eval("document.documentElement.scrollWidth");
    assert!(
        width.as_u64().is_some_and(|w| w <= 390),
        "the page is {width} px wide at a 390 px screen"
    );
    page.screenshot("console-phone.png");
}

#[test]
fn with_javascript_blocked_the_console_is_a_static_snapshot() {
    let Some(_) = chromium() else { return };
    let (b1, b2) = (Backend::start(), Backend::start());
    let (_portico, admin, dir) = start_portico("noscript", b1.port, b2.port);
    wait_until("both backends up", Duration::from_secs(10), || {
        health_of(admin, "b1") == "up" && health_of(admin, "b2") == "up"
    });
    let (_chromium, ws) = open_page("about:blank", &dir.0.join("profile"));
    let mut page = Cdp::connect(&ws);
    page.call(
        "Emulation.setScriptExecutionDisabled",
        serde_json::json!({"value": true}),
    );
    page.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    page.call("Page.enable", serde_json::json!({}));
    page.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://{admin}/")}),
    );
    // the DOM through the protocol (page scripts are off, so not through Runtime.evaluate)
    let mut dom = String::new();
    wait_until("the snapshot page", Duration::from_secs(10), || {
        // node ids go stale while the page loads: ask again
        let html = page
            .try_call("DOM.getDocument", serde_json::json!({"depth": 0}))
            .and_then(|doc| {
                page.try_call(
                    "DOM.getOuterHTML",
                    serde_json::json!({"nodeId": doc["root"]["nodeId"]}),
                )
            })
            .unwrap_or_default();
        dom = html["outerHTML"].as_str().unwrap_or_default().to_string();
        dom.contains("id=\"timeline\"")
    });
    assert!(dom.contains("<td class=\"health up\">up</td>"), "{dom}");
    assert!(dom.contains("data-backend=\"web/b2\""), "{dom}");
    assert!(dom.contains("static snapshot"), "the noscript note: {dom}");
    // the script did not run: the badge still says "snapshot", not "live"
    std::thread::sleep(Duration::from_millis(500));
    let doc = page.call("DOM.getDocument", serde_json::json!({"depth": 0}));
    let html = page.call(
        "DOM.getOuterHTML",
        serde_json::json!({"nodeId": doc["root"]["nodeId"]}),
    );
    let dom = html["outerHTML"].as_str().unwrap_or_default();
    assert!(dom.contains("class=\"static\">snapshot"), "{dom}");
    page.screenshot("console-noscript-phone.png");
}
