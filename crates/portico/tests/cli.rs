//! End-to-end tests of the `portico` binary: `check` on examples and bad configs, and a running
//! instance answering its admin API, `portico status`, reloads and SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_portico");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn portico(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run portico")
}

#[test]
fn check_accepts_every_example() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = portico(&["check", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let effective = String::from_utf8_lossy(&out.stdout);
            assert!(
                effective.contains("services:"),
                "effective config printed: {effective}"
            );
            n += 1;
        }
    }
    assert!(n > 0, "no examples found");
}

#[test]
fn check_rejects_every_bad_config_with_its_message() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("tests/bad-configs")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with `# expect: <message>`", path.display()));
        let out = portico(&["check", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(
            stderr.starts_with("error: invalid config file"),
            "{}: {stderr}",
            path.display()
        );
        assert!(
            stderr.contains(want),
            "{}:\nwant: {want}\ngot:  {stderr}",
            path.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        n += 1;
    }
    assert!(n >= 10, "only {n} bad configs");
}

#[test]
fn a_missing_file_and_a_bad_flag_are_clear_errors() {
    let out = portico(&["check", "--config", "/nonexistent/portico.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("error: cannot read config file /nonexistent/portico.yaml"),
        "{stderr}"
    );
    assert!(stderr.contains("caused by: No such file"), "{stderr}");
    let out = portico(&["status", "--admin", "not-an-address"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an admin address"));
    let out = portico(&["run", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `portico check` on `path`, killing it if it has not finished within 10 s.
fn check_within_deadline(path: &str) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["check", "--config", path])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run portico check");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portico check --config {path} did not finish within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_devices_fifos_huge_and_non_utf8_files_at_once() {
    let dir = TempDir::new("check-files");
    let (code, err) = check_within_deadline("/dev/zero");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("config file /dev/zero is not a regular file (it is a character device)"),
        "{err}"
    );

    let fifo = dir.0.join("fifo.yaml");
    let fifo = fifo.to_str().unwrap();
    if Command::new("mkfifo")
        .arg(fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        let (code, err) = check_within_deadline(fifo);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("is not a regular file (it is a FIFO)"),
            "{err}"
        );
    } else if std::env::var_os("PORTICO_CI").is_some() {
        panic!("needs mkfifo (coreutils)");
    } else {
        eprintln!("skipped the FIFO case: needs mkfifo");
    }

    let big = dir.0.join("big.yaml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 * 1024 * 1024)
        .unwrap();
    let (code, err) = check_within_deadline(big.to_str().unwrap());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is larger than 16 MiB"), "{err}");

    let latin1 = dir.0.join("latin1.yaml");
    std::fs::write(&latin1, b"# caf\xe9\nservices: []\n").unwrap();
    let (code, err) = check_within_deadline(latin1.to_str().unwrap());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the file is not UTF-8 text (byte 0xe9); save it as UTF-8 (line 1, column 6)"),
        "{err}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let out = portico(&["version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("portico {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A running `portico run`, killed on drop.
struct Running {
    child: Child,
    admin: String,
    logs: mpsc::Receiver<String>,
}

impl Running {
    // The child is waited for in `Drop` (or right before the panic below).
    #[allow(clippy::zombie_processes)]
    fn start(config: &Path) -> Running {
        Running::start_with(config, &[])
    }

    // The child is waited for in `Drop` (or right before the panic below).
    #[allow(clippy::zombie_processes)]
    fn start_with(config: &Path, env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn portico run");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while tokio::time::Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Some(rest) = line.split("admin listening on ").nth(1) {
                    let admin = rest.split_whitespace().next().unwrap().to_string();
                    return Running {
                        child,
                        admin,
                        logs: rx,
                    };
                }
                seen.push(line);
            }
        }
        let _ = child.kill();
        panic!(
            "portico did not start its admin server; logs:\n{}",
            seen.join("\n")
        );
    }

    fn status(&self) -> serde_json::Value {
        let out = portico(&["status", "--admin", &self.admin, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_for(
        &self,
        what: &str,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        for _ in 0..100 {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last status {}",
            self.status()
        );
    }

    /// `GET /metrics` over a plain socket (no curl needed).
    fn metrics(&self) -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// The value of one metric sample line (`name value`), if exported.
    fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
    }

    /// Waits until a metric has `want` (the metrics task follows the spine asynchronously).
    fn wait_metric(&self, name: &str, want: f64) {
        for _ in 0..100 {
            if self.metric(name) == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} is {:?}, want {want}", self.metric(name));
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(admin_port: &str, vip_port: u32, backend_port: u16, backend_weight: u32) -> String {
    format!(
        "node: {{name: test-node}}\nadmin: {{listen: 127.0.0.1:{admin_port}}}\nservices:\n  - name: web\n    vips: [127.0.0.77]\n    ports: [{{name: echo, port: {vip_port}}}]\n    backends:\n      - {{name: b1, address: 127.0.0.1, port: {backend_port}, weight: {backend_weight}}}\n    health_check: {{type: tcp, interval: 100ms, timeout: 50ms}}\n"
    )
}

/// A line echo server on 127.0.0.1 (the backend), answering until the test ends.
fn echo_backend() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if writeln!(w, "echo {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends a line on `conn` and reads the echo.
fn ask(conn: &mut BufReader<std::net::TcpStream>, line: &str) -> String {
    writeln!(conn.get_mut(), "{line}").unwrap();
    let mut answer = String::new();
    conn.read_line(&mut answer).unwrap();
    answer.trim_end().to_string()
}

fn connect(port: u16) -> BufReader<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(("127.0.0.77", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    BufReader::new(s)
}

#[test]
fn a_running_instance_serves_admin_status_reloads_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("portico-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("portico.yaml");
    let (vip_port, backend) = (free_port("127.0.0.77"), echo_backend());
    std::fs::write(&cfg, config("0", vip_port.into(), backend, 1)).unwrap();
    let running = Running::start(&cfg);

    // Admin endpoints over the real socket.
    let s = running.wait_for("ready", |s| s["ready"] == true);
    assert_eq!(s["node"], "test-node");
    assert_eq!(s["generation"], 1);
    assert_eq!(s["services"][0]["name"], "web");
    assert_eq!(s["services"][0]["vips"][0]["address"], "127.0.0.77");
    // A single node without announcing interfaces owns its VIPs itself.
    let s = running.wait_for("the VIP owned", |s| {
        s["services"][0]["vips"][0]["owner"] == "test-node"
    });
    assert_eq!(s["services"][0]["vips"][0]["reason"], "owner");
    assert_eq!(s["services"][0]["backends"][0]["name"], "b1");

    // The human table.
    let out = portico(&["status", "--admin", &running.admin]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("node test-node"), "{table}");
    assert!(
        table.contains(&format!("SERVICE web  ports {vip_port}/tcp")),
        "{table}"
    );
    assert!(table.contains("127.0.0.77"), "{table}");
    assert!(table.contains("b1"), "{table}");

    // Traffic flows through the VIP, and an established connection survives every reload.
    let mut conn = connect(vip_port);
    assert_eq!(ask(&mut conn, "hello"), "echo hello");

    // A valid change is applied (file change detection) …
    // (admin.listen stays as written, port 0: changing it needs a restart, tested below)
    std::fs::write(&cfg, config("0", vip_port.into(), backend, 7)).unwrap();
    let s = running.wait_for("generation 2", |s| s["generation"] == 2);
    assert_eq!(s["services"][0]["backends"][0]["weight"], 7);
    assert!(s["last_reload_error"].is_null());

    // … an invalid one is rejected, the running config kept and the error shown …
    std::fs::write(&cfg, config("0", 99999, backend, 7)).unwrap();
    let s = running.wait_for("the reload error", |s| !s["last_reload_error"].is_null());
    assert_eq!(s["generation"], 2);
    let err = s["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains("services[0].ports[0].port: 99999 is out of range 1-65535"),
        "{err}"
    );
    assert_eq!(s["services"][0]["backends"][0]["weight"], 7);

    // … and SIGHUP re-reads a fixed file.
    std::fs::write(&cfg, config("0", vip_port.into(), backend, 3)).unwrap();
    running.signal(rustix::process::Signal::HUP);
    let s = running.wait_for("generation 3", |s| s["generation"] == 3);
    assert!(s["last_reload_error"].is_null());
    assert_eq!(ask(&mut conn, "still there"), "echo still there");
    assert_eq!(ask(&mut connect(vip_port), "new"), "echo new");
    drop(conn);

    // Metrics carry the applied generation (set by a task that follows the balancer, so it
    // may trail `/status` by a wake-up).
    running.wait_metric("portico_config_generation", 3.0);

    // SIGTERM: graceful, exit 0.
    let mut running = running;
    running.signal(rustix::process::Signal::TERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = running.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "portico did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let logs: Vec<String> = running.logs.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("SIGTERM received")),
        "{logs:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A temporary directory for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("portico-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn proxy_io_uring_relays_on_the_workers_io_uring() {
    let dir = TempDir::new("uring");
    let cfg = dir.0.join("portico.yaml");
    let (vip_port, backend) = (free_port("127.0.0.77"), echo_backend());
    let yaml = format!(
        "{}proxy: {{workers: 1, io: uring}}\n",
        config("0", vip_port.into(), backend, 1)
    );
    std::fs::write(&cfg, yaml).unwrap();
    let running = Running::start(&cfg);
    running.wait_for("ready", |s| s["ready"] == true);
    let mut conn = connect(vip_port);
    // the first line passes before the relay starts; after 8 messages (4 round trips) the
    // connection has proved long-lived and moves to the ring, which carries the rest
    for i in 0..12 {
        let line = format!("line {i}");
        assert_eq!(ask(&mut conn, &line), format!("echo {line}"));
    }
    running.wait_metric("portico_lb_uring_relays_total", 1.0);
    assert_eq!(
        running.metric("portico_lb_uring_fallbacks_total"),
        Some(0.0)
    );
}

#[test]
fn a_panic_while_reading_a_reload_is_reported_and_later_reloads_still_apply() {
    if !cfg!(debug_assertions) {
        // the failpoint that makes the reader panic exists in debug builds only
        eprintln!("skipped: needs a debug build (the reload failpoint)");
        return;
    }
    let dir = TempDir::new("reload-panic");
    let cfg = dir.0.join("portico.yaml");
    let (vip_port, backend) = (free_port("127.0.0.77"), echo_backend());
    let good = |weight| config("0", vip_port.into(), backend, weight);
    std::fs::write(&cfg, good(1)).unwrap();
    // the balancer applies each new generation 300 ms after it is published: /status must
    // not report a generation whose rows it does not show yet (it did, rarely, under load)
    let running = Running::start_with(
        &cfg,
        &[
            ("PORTICO_TEST_RELOAD_PANIC", "# panic here"),
            ("PORTICO_TEST_APPLY_DELAY_MS", "300"),
        ],
    );
    running.wait_for("ready", |s| s["ready"] == true);
    let failures = "portico_config_reload_failures_total";
    running.wait_metric(failures, 0.0);

    // the reader panics on a changed file: the reload is rejected, not the watcher killed
    std::fs::write(&cfg, format!("{}# panic here\n", good(1))).unwrap();
    let s = running.wait_for("the reload error", |s| !s["last_reload_error"].is_null());
    let err = s["last_reload_error"].as_str().unwrap();
    assert!(err.contains("panicked"), "{err}");
    assert_eq!(s["generation"], 1);
    running.wait_metric(failures, 1.0);

    // a later valid edit applies (file change) …
    std::fs::write(&cfg, good(5)).unwrap();
    let s = running.wait_for("generation 2", |s| s["generation"] == 2);
    assert!(s["last_reload_error"].is_null(), "{s}");
    assert_eq!(s["services"][0]["backends"][0]["weight"], 5);

    // … and so does SIGHUP, after another panic
    std::fs::write(&cfg, format!("{}# panic here\n", good(6))).unwrap();
    running.wait_for("the second reload error", |s| {
        s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("panicked"))
    });
    running.wait_metric(failures, 2.0);
    std::fs::write(&cfg, good(7)).unwrap();
    running.signal(rustix::process::Signal::HUP);
    let s = running.wait_for("generation 3", |s| s["generation"] == 3);
    assert_eq!(s["services"][0]["backends"][0]["weight"], 7);
    assert!(s["last_reload_error"].is_null(), "{s}");
    assert_eq!(
        ask(&mut connect(vip_port), "after the panics"),
        "echo after the panics"
    );
}

#[test]
fn check_warns_about_a_config_without_services() {
    let dir = TempDir::new("check-empty");
    for (name, text) in [("empty.yaml", ""), ("explicit.yaml", "services: []\n")] {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        let out = portico(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains("warning: ")
                && err.contains("no services, so portico would balance nothing"),
            "{err}"
        );
    }
}

#[test]
fn a_truncated_file_does_not_remove_every_service_but_an_explicit_empty_list_does() {
    let dir = TempDir::new("reload-empty");
    let cfg = dir.0.join("portico.yaml");
    let (vip_port, backend) = (free_port("127.0.0.77"), echo_backend());
    let good = config("0", vip_port.into(), backend, 1);
    std::fs::write(&cfg, &good).unwrap();
    let running = Running::start(&cfg);
    running.wait_for("ready", |s| s["ready"] == true);

    // truncated: refused, the service keeps serving
    std::fs::write(&cfg, "").unwrap();
    let s = running.wait_for("the reload error", |s| !s["last_reload_error"].is_null());
    let err = s["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains(
            "the file lists no services, so this reload would stop every running service (web)"
        ),
        "{err}"
    );
    assert_eq!(s["generation"], 1);
    assert_eq!(s["services"][0]["name"], "web");
    assert_eq!(ask(&mut connect(vip_port), "still"), "echo still");

    // comments only, with the other settings kept: refused too
    let header: String = good.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, format!("{header}# services moved elsewhere\n")).unwrap();
    running.wait_for("the second reload error", |s| {
        s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("lists no services"))
            && s["generation"] == 1
    });

    // written explicitly: applied
    std::fs::write(&cfg, format!("{header}services: []\n")).unwrap();
    let s = running.wait_for("generation 2", |s| s["generation"] == 2);
    assert!(s["last_reload_error"].is_null(), "{s}");
    assert_eq!(s["services"].as_array().map(Vec::len), Some(0), "{s}");
}

#[test]
fn a_reload_that_changes_a_start_up_field_is_refused_with_needs_restart() {
    let dir = TempDir::new("reload-restart");
    let cfg = dir.0.join("portico.yaml");
    let (vip_port, backend) = (free_port("127.0.0.77"), echo_backend());
    std::fs::write(&cfg, config("0", vip_port.into(), backend, 1)).unwrap();
    let running = Running::start(&cfg);
    running.wait_for("ready", |s| s["ready"] == true);
    let failures = "portico_config_reload_failures_total";

    // a new admin address (and a new profile) with a new weight: all of it refused
    let other_admin = free_port("127.0.0.1").to_string();
    let changed = config(&other_admin, vip_port.into(), backend, 9).replace(
        "node: {name: test-node}\n",
        "node: {name: test-node}\ncluster: {profile: fast}\n",
    );
    std::fs::write(&cfg, changed).unwrap();
    let s = running.wait_for("the reload error", |s| !s["last_reload_error"].is_null());
    let err = s["last_reload_error"].as_str().unwrap();
    assert!(
        err.starts_with("needs restart: cluster.profile, admin.listen"),
        "{err}"
    );
    assert_eq!(s["generation"], 1);
    assert_eq!(s["services"][0]["backends"][0]["weight"], 1);
    running.wait_metric(failures, 1.0);
    // still served on the address it started with
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other_admin.parse::<u16>().unwrap())).is_err()
    );

    // the same change without the start-up fields applies
    std::fs::write(&cfg, config("0", vip_port.into(), backend, 9)).unwrap();
    let s = running.wait_for("generation 2", |s| s["generation"] == 2);
    assert!(s["last_reload_error"].is_null(), "{s}");
    assert_eq!(s["services"][0]["backends"][0]["weight"], 9);
}
