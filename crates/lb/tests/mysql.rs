//! The MySQL health check against a real MariaDB server that this test starts itself (Debian
//! `mariadb-server`): the default check (greeting only) leaves no "Access denied" in the server's
//! error log; a login with a password file succeeds, a wrong password is down with the server's
//! reason; up but refusing (`max_connections` reached → error 1040); stopped.
//! Prints `skipped: <reason>` and returns when the binaries are missing (fails in CI: `PORTICO_CI`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use lb::check::{ProbeError, probe};
use model::{CheckKind, Health};
use tokio::process::{Child, Command};
use tokio::time::Instant;

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Kills the server and removes its data directory on drop.
struct MariaDb {
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
    mariadbd: PathBuf,
}

impl MariaDb {
    async fn start(max_connections: u32) -> Result<Self, String> {
        let mariadbd =
            which("mariadbd").ok_or("mariadbd not installed (apt-get install mariadb-server)")?;
        let install = which("mariadb-install-db").ok_or("mariadb-install-db not installed")?;
        let dir = std::env::temp_dir().join(format!("portico-lb-mysql-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut me = Self {
            child: None,
            dir: dir.clone(),
            addr: free_port(),
            mariadbd,
        };
        let out = Command::new(install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| format!("mariadb-install-db: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        me.launch(max_connections)?;
        Ok(me)
    }

    fn launch(&mut self, max_connections: u32) -> Result<(), String> {
        let d = &self.dir;
        let child = Command::new(&self.mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--log-error={}", d.join("err.log").display()))
            .arg(format!("--port={}", self.addr.port()))
            .arg(format!("--max-connections={max_connections}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=8M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("mariadbd: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Runs SQL as root over the unix socket.
    async fn sql(&self, q: &str) -> bool {
        let Some(client) = which("mariadb") else {
            return false;
        };
        Command::new(client)
            .args(["--no-defaults", "-uroot", "-e", q])
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// The server's error log.
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    /// The last 20 lines of the error log (for a failure's message).
    fn log_tail(&self) -> String {
        let log = self.error_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A client holding one connection (user portico over TCP) for a minute.
    fn hold_connection(&self) -> Option<Child> {
        let client = which("mariadb")?;
        Command::new(client)
            .args([
                "--no-defaults",
                "-h127.0.0.1",
                "-uportico",
                &format!("-p{PASSWORD}"),
                "-e",
                "SELECT SLEEP(60)",
            ])
            .arg(format!("-P{}", self.addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            // Reap synchronously so the data directory can go.
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Polls `f` until it holds; on a timeout the panic carries the end of MariaDB's error log.
async fn until<F: std::future::Future<Output = bool>>(
    db: &MariaDb,
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; mariadbd's log ends:\n{}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`Harness::wait_health`] whose panic carries the end of MariaDB's error log.
async fn health(h: &Harness, db: &MariaDb, service: &str, want: Health) {
    let deadline = Instant::now() + WAIT;
    while h.lb.backend_health(service, "m") != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{service}/m never became {want:?} (it is {:?}); mariadbd's log ends:\n{}",
            h.lb.backend_health(service, "m"),
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const PASSWORD: &str = "check-pw-1";

fn mysql_login(user: &str, password: &str) -> CheckKind {
    CheckKind::Mysql {
        user: Some(user.into()),
        password_file: None,
        password: Some(model::Password(password.into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_check_sees_serving_refusing_and_stopped_mariadb() {
    let mut db = match MariaDb::start(10).await {
        Ok(db) => db,
        Err(reason) => {
            sys::skip_test(&reason);
            return;
        }
    };
    let addr = db.addr;
    let t = Duration::from_secs(2);
    until(&db, "mariadbd to serve", || async {
        probe(&CheckKind::MYSQL, addr, t).await.is_ok()
    })
    .await;

    // The default check (greeting and version, no login) over many checks: the server logs no
    // "Access denied" (the check used to log in as `portico` without a password, which MariaDB
    // logged at every check).
    for _ in 0..30 {
        probe(&CheckKind::MYSQL, addr, t).await.unwrap();
    }
    let log = db.error_log();
    assert!(
        !log.contains("Access denied"),
        "default check caused Access denied:\n{log}"
    );
    // The log does show a failed login (so the assertion above can fail): a wrong login.
    assert!(probe(&mysql_login("nobody", "x"), addr, t).await.is_err());
    until(&db, "Access denied in the error log", || async {
        db.error_log().contains("Access denied")
    })
    .await;

    if !db
        .sql(&format!(
            "CREATE USER portico@'%' IDENTIFIED BY '{PASSWORD}'"
        ))
        .await
    {
        if std::env::var_os("PORTICO_CI").is_some() {
            panic!("the login cases need the mariadb client");
        }
        sys::skip_test("login cases need the mariadb client");
        return;
    }
    // A wrong password: down, with the server's code and message.
    match probe(&mysql_login("portico", "wrong"), addr, t).await {
        Err(e @ ProbeError::MysqlLogin { code: 1045, .. }) => {
            assert_eq!(e.reason(), "mysqlLoginRefused");
            assert!(e.to_string().contains("Access denied"), "{e}");
        }
        other => panic!("wrong password: {other:?}"),
    }
    // A successful login logs nothing (the greeting-only check leaves a Warning "Aborted
    // connection … closed normally without authentication" per check at MariaDB's default
    // log_warnings=2; docs/config.md says so).
    let before = db.error_log().len();
    for _ in 0..5 {
        probe(&mysql_login("portico", PASSWORD), addr, t)
            .await
            .expect("login with the right password");
    }
    let after = db.error_log();
    assert_eq!(
        &after[before..],
        "",
        "successful logins left lines in the error log"
    );

    // Through the balancer, with user and password_file in the config (mode 0600): `ok` logs in,
    // `bad` has a wrong password and goes down.
    let dir = std::env::temp_dir().join(format!("portico-lb-mysql-pw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let write = |name: &str, text: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let good = write("good", &format!("{PASSWORD}\n"));
    let bad = write("bad", "wrong\n");
    let svc = |name: &str, vip: &str, file: &std::path::Path| {
        format!(
            "  - name: {name}\n    vips: [{vip}]\n    ports:\n      - {{name: sql, port: 3306}}\n    backends:\n{}    \
             health_check: {{type: mysql, user: portico, password_file: {}, interval: 500ms, timeout: 500ms, rise: 1, fall: 1}}\n",
            be("m", addr),
            file.display()
        )
    };
    let yaml = format!(
        "{}{}",
        svc("db", "127.0.0.16", &good),
        svc("wrong", "127.0.0.17", &bad)
    );
    let h = Harness::start(&yaml).await;
    health(&h, &db, "db", Health::Up).await;
    health(&h, &db, "wrong", Health::Down).await;

    // Up but refusing: MariaDB answers the login with 1040 once max_connections (10, MariaDB's
    // minimum) is held by other clients. The balancer's own checks take slots for a moment
    // too, so a holder that came in while they did was refused and exited: it is replaced
    // until the check itself is refused.
    let mut holders: Vec<Child> = (0..10).filter_map(|_| db.hold_connection()).collect();
    assert_eq!(holders.len(), 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = probe(&mysql_login("portico", PASSWORD), addr, t).await;
        if matches!(got, Err(ProbeError::MysqlError { code: 1040, .. })) {
            break;
        }
        let mut replaced = 0;
        for holder in &mut holders {
            if holder.try_wait().is_ok_and(|status| status.is_some()) {
                *holder = db.hold_connection().expect("mariadb client");
                replaced += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for error 1040 too many connections (last probe: {got:?}, \
             holders just replaced: {replaced}); mariadbd's log ends:\n{}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    health(&h, &db, "db", Health::Down).await;
    drop(holders);
    until(&db, "connections released", || async {
        probe(&mysql_login("portico", PASSWORD), addr, t)
            .await
            .is_ok()
    })
    .await;
    health(&h, &db, "db", Health::Up).await;

    // Stopped: connect refused.
    db.stop().await;
    until(&db, "mariadbd to stop", || async {
        matches!(
            probe(&CheckKind::MYSQL, addr, t).await,
            Err(ProbeError::Io(_))
        )
    })
    .await;
    health(&h, &db, "db", Health::Down).await;
    h.stop().await;
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
