//! The standalone source: the YAML file (or the embedded default), reloaded on SIGHUP and
//! whenever its content changes.
//!
//! A valid new file is published as the next [`Desired`] generation; an invalid one is
//! rejected with every error logged and kept in `reload_error` for `/status`, and the running
//! configuration stays as it is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::config::{self, Environment, LoadError, Loaded};
use model::{Config, Desired};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigPath {
    /// A file given with `--config`.
    File(PathBuf),
    /// The embedded default (`portico run` without `--config`).
    Embedded,
}

/// The environment the config reader needs: the host name for `node.name`.
pub fn environment() -> Environment {
    Environment {
        hostname: hostname(),
        ..Environment::default()
    }
}

/// The host name as a DNS label (first label, lower case, invalid characters replaced).
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let first = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut label: String = first
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    label = label.trim_matches('-').to_string();
    if label.is_empty() {
        "localhost".into()
    } else {
        label
    }
}

/// Reads the configuration once.
pub fn load(path: &ConfigPath, env: &Environment) -> Result<Config, LoadError> {
    load_file(path, env).map(|l| l.config)
}

/// Reads the configuration once, with what the file says beyond its values.
pub fn load_file(path: &ConfigPath, env: &Environment) -> Result<Loaded, LoadError> {
    match path {
        ConfigPath::File(p) => config::load_file(&p.to_string_lossy(), env),
        ConfigPath::Embedded => {
            config::read(config::EMBEDDED_DEFAULT.as_bytes(), env).map_err(|errors| {
                LoadError::Invalid {
                    path: "<embedded default>".into(),
                    errors,
                }
            })
        }
    }
}

/// What a reload attempt leads to.
#[derive(Debug, PartialEq)]
pub enum Reload {
    /// A new valid configuration: publish it as the next generation.
    Apply(Desired),
    /// Same content as running: nothing to do (but a previous error is cleared).
    Unchanged,
    /// Invalid: keep running the current one, report this error.
    Reject(String),
    /// The file could not be read for want of a local resource (descriptors, memory): that
    /// says nothing about the file, so nothing is reported as a reload error; it is read
    /// again at the next tick.
    Retry(String),
}

/// Decides what a freshly read file means for the running state. Pure.
///
/// A valid file is still refused when it would stop every running service without saying so
/// (an empty or comments-only file, e.g. one truncated by accident): removing them all takes
/// an explicit `services: []`; and when it changes a field read only at start-up
/// ([`model::reload::needs_restart`] against `baseline`, see [`watch`]): the error starts
/// with `needs restart: ` and names every such field.
pub fn decide(current: &Desired, baseline: &Config, read: Result<Loaded, LoadError>) -> Reload {
    let loaded = match read {
        Ok(l) => l,
        Err(LoadError::Io { path, source }) if sys::limits::is_local_resource_error(&source) => {
            return Reload::Retry(format!("cannot read config file {path} now: {source}"));
        }
        Err(e) => return Reload::Reject(e.to_string()),
    };
    let cfg = loaded.config;
    if cfg == *current.config {
        return Reload::Unchanged;
    }
    if cfg.services.is_empty() && !current.config.services.is_empty() && !loaded.declares_services {
        let running: Vec<&str> = current
            .config
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return Reload::Reject(format!(
            "the file lists no services, so this reload would stop every running service ({}); \
             write `services: []` to remove them all on purpose",
            running.join(", ")
        ));
    }
    let restart = model::reload::needs_restart(baseline, &cfg);
    if !restart.is_empty() {
        return Reload::Reject(format!(
            "needs restart: {} (read only at start-up: restart portico to apply, or put the running value back); the running configuration stays",
            restart.join(", ")
        ));
    }
    Reload::Apply(Desired {
        generation: current.generation + 1,
        config: Arc::new(cfg),
    })
}

/// Reads the file and decides what it means, like [`decide`], but never unwinds: a panic
/// anywhere in reading or parsing (a bug) is caught and becomes a rejected reload, so the
/// watcher lives on and later edits still apply.
pub fn attempt(
    current: &Desired,
    baseline: &Config,
    path: &ConfigPath,
    env: &Environment,
) -> Reload {
    let read = || {
        failpoint(path);
        decide(current, baseline, load_file(path, env))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(r) => r,
        Err(panic) => Reload::Reject(format!(
            "reading the configuration failed: {} (a bug in portico: please report it with the file); the running configuration stays",
            panic_message(&*panic)
        )),
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

/// Debug builds only, for the end-to-end test of [`attempt`]: panics while reading a file that
/// contains the text given in `PORTICO_TEST_RELOAD_PANIC` (no input is known to panic the
/// reader, so the test needs one).
fn failpoint(path: &ConfigPath) {
    #[cfg(debug_assertions)]
    if let (Some(marker), ConfigPath::File(file)) =
        (std::env::var_os("PORTICO_TEST_RELOAD_PANIC"), path)
        && let (Some(marker), Ok(text)) = (marker.to_str(), std::fs::read_to_string(file))
        && !marker.is_empty()
        && text.contains(marker)
    {
        panic!("test failpoint PORTICO_TEST_RELOAD_PANIC hit");
    }
    let _ = path;
}

/// How long a changed file must stay the same before it is read as the new configuration.
const SETTLE: Duration = Duration::from_millis(100);

/// Watches the file for SIGHUP and content changes (checked every `poll`, applied once the file
/// has stopped changing for [`SETTLE`]) until `shutdown`.
///
/// Fields read only at start-up are compared with a *baseline*: the configuration the node
/// started with, or, if that had no peers, the latest applied one until one with peers is
/// applied (the gossip socket and identity are taken then; before, nothing uses them).
pub async fn watch(
    path: ConfigPath,
    env: Environment,
    desired: watch::Sender<Arc<Desired>>,
    reload_error: watch::Sender<Option<String>>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let ConfigPath::File(file) = &path else {
        shutdown.cancelled().await;
        return;
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    // bounded and never blocking: a FIFO or device put at the path is refused, not read
    let read = || config::read_file(&file.to_string_lossy()).ok();
    let mut last_seen = read();
    let mut baseline = desired.borrow().config.clone();
    let mut tick = tokio::time::interval(poll);
    let retry_log = sys::limits::LogEvery::new(Duration::from_secs(10));
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = tick.tick() => false,
        };
        let mut now = read();
        if !forced && now == last_seen {
            continue;
        }
        if !forced {
            // a file caught mid-write (truncated, half written) must not be reported as an
            // invalid configuration: wait until two reads `SETTLE` apart agree (bounded)
            for _ in 0..10 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(SETTLE) => {}
                }
                let again = read();
                if again == now {
                    break;
                }
                now = again;
            }
        }
        last_seen = now;
        let why = if forced { "SIGHUP" } else { "file changed" };
        let current = desired.borrow().clone();
        match attempt(&current, &baseline, &path, &env) {
            Reload::Apply(next) => {
                if baseline.cluster.peers.is_empty() {
                    baseline = next.config.clone();
                }
                tracing::info!(
                    generation = next.generation,
                    trigger = why,
                    "configuration applied"
                );
                // the error goes first: /status reads the generation before the error, so
                // whoever sees the new generation also sees the old error cleared
                reload_error.send_replace(None);
                desired.send_replace(Arc::new(next));
            }
            Reload::Unchanged => {
                tracing::info!(trigger = why, "configuration unchanged");
                reload_error.send_replace(None);
            }
            Reload::Retry(err) => {
                if let Some(skipped) = retry_log.check(tokio::time::Instant::now()) {
                    tracing::warn!(
                        trigger = why,
                        skipped,
                        reason = "localResources",
                        "{err}; trying again"
                    );
                }
                // read it again at the next tick, whatever it holds then
                last_seen = None;
            }
            Reload::Reject(err) => {
                tracing::error!(
                    trigger = why,
                    "configuration rejected, keeping generation {}: {err}",
                    current.generation
                );
                reload_error.send_replace(Some(err));
            }
        }
    }
}

/// Runs the task `start` makes (the file [`watch`]er) until `shutdown`, starting it again (after
/// a second) should it ever end early by panicking; the failure is reported like a rejected
/// reload, so `/status` and the `portico_config_reload_failures` metric show it.
pub async fn supervise<F>(
    start: impl Fn() -> F,
    reload_error: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(start()).await {
            Ok(()) => return,
            Err(e) => {
                let why = match e.try_into_panic() {
                    Ok(panic) => panic_message(&*panic),
                    Err(e) => e.to_string(),
                };
                let err = format!("the configuration watcher failed ({why}); restarted it");
                tracing::error!("{err}");
                reload_error.send_replace(Some(err));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(src: &str) -> Desired {
        Desired {
            generation: 3,
            config: Arc::new(config::parse(src, &Environment::default()).unwrap()),
        }
    }

    /// A file's text as the watcher reads it.
    fn read(src: &str) -> Result<Loaded, LoadError> {
        config::read(src.as_bytes(), &Environment::default()).map_err(|errors| LoadError::Invalid {
            path: "f".into(),
            errors,
        })
    }

    const WEB: &str = "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n";

    #[test]
    fn a_valid_change_becomes_the_next_generation() {
        let cur = desired("cluster: {hold_down: 1s}");
        match decide(&cur, &cur.config, read("cluster: {hold_down: 2s}")) {
            Reload::Apply(d) => assert_eq!(d.generation, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_file_is_rejected_and_the_running_config_kept() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        match decide(&cur, &cur.config, read("admin: {listen: nope}")) {
            Reload::Reject(e) => assert!(e.contains("admin.listen"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_file_without_services_does_not_remove_them_unless_it_says_so() {
        let cur = desired(WEB);
        for empty in [
            "",
            "# truncated\n",
            "services:\n",
            "cluster: {hold_down: 1s}\n",
        ] {
            match decide(&cur, &cur.config, read(empty)) {
                Reload::Reject(e) => assert!(
                    e.contains("the file lists no services, so this reload would stop every running service (web); write `services: []`"),
                    "{e}"
                ),
                other => panic!("{empty:?}: {other:?}"),
            }
        }
        match decide(&cur, &cur.config, read("services: []\n")) {
            Reload::Apply(d) => assert!(d.config.services.is_empty()),
            other => panic!("{other:?}"),
        }
        // nothing running: nothing to protect
        let none = desired("");
        assert!(matches!(
            decide(&none, &none.config, read("cluster: {hold_down: 1s}\n")),
            Reload::Apply(_)
        ));
    }

    #[test]
    fn a_change_of_a_start_up_field_is_refused_with_needs_restart() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        match decide(
            &cur,
            &cur.config,
            read("admin: {listen: 127.0.0.1:2}\ncluster: {profile: fast}\n"),
        ) {
            Reload::Reject(e) => assert!(
                e.starts_with(
                    "needs restart: cluster.profile, admin.listen (read only at start-up"
                ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        // the baseline decides, not the previous generation: a node that started without
        // peers takes its first peers with a new bind
        let alone =
            desired("node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\n");
        let joined = "node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\ncluster:\n  bind: 10.0.0.11:7946\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n  peers: [{name: b, address: 10.0.0.12:7946}]\n";
        let Reload::Apply(next) = decide(&alone, &alone.config, read(joined)) else {
            panic!("first peers refused")
        };
        let rebound = joined.replace("bind: 10.0.0.11:7946", "bind: 10.0.0.11:7000");
        match decide(&next, &next.config, read(&rebound)) {
            Reload::Reject(e) => assert!(
                e.starts_with("needs restart: cluster.bind, cluster.advertise"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panicking_reader_is_a_rejected_reload_not_a_dead_watcher() {
        let dir = std::env::temp_dir().join(format!("portico-attempt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("portico.yaml");
        let cur = desired("cluster: {hold_down: 1s}");
        let panicking = Environment {
            read_file: |_| panic!("reader bug"),
            ..Environment::default()
        };
        // a key read through `read_file` reaches the panicking reader
        std::fs::write(
            &file,
            "cluster: {keys: [{id: 1, secret_file: /nonexistent}]}\n",
        )
        .unwrap();
        match attempt(
            &cur,
            &cur.config,
            &ConfigPath::File(file.clone()),
            &panicking,
        ) {
            Reload::Reject(e) => {
                assert!(e.contains("panicked: reader bug"), "{e}");
                assert!(e.contains("the running configuration stays"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // and the next attempt, with a reader that works, applies
        std::fs::write(&file, "cluster: {hold_down: 2s}\n").unwrap();
        match attempt(
            &cur,
            &cur.config,
            &ConfigPath::File(file),
            &Environment::default(),
        ) {
            Reload::Apply(d) => assert_eq!(d.generation, 4),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_panics_is_reported_and_started_again() {
        let (err_tx, mut err_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let sup = tokio::spawn(supervise(
            {
                let (starts, shutdown) = (starts.clone(), shutdown.clone());
                move || {
                    let (starts, shutdown) = (starts.clone(), shutdown.clone());
                    async move {
                        if starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                            panic!("watcher bug");
                        }
                        shutdown.cancelled().await;
                    }
                }
            },
            err_tx,
            shutdown.clone(),
        ));
        err_rx.changed().await.unwrap();
        let err = err_rx.borrow_and_update().clone().unwrap();
        assert!(err.contains("panicked: watcher bug"), "{err}");
        while starts.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        sup.await.unwrap();
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn identical_content_is_not_a_new_generation() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        assert_eq!(
            decide(&cur, &cur.config, read("admin:\n  listen: 127.0.0.1:1\n")),
            Reload::Unchanged
        );
    }

    #[test]
    fn a_local_shortage_while_reading_is_not_a_reload_error() {
        let current = desired("services: []\n");
        let baseline = current.config.as_ref().clone();
        let emfile = LoadError::Io {
            path: "/etc/portico/portico.yaml".into(),
            source: std::io::Error::from_raw_os_error(24), // EMFILE
        };
        assert!(matches!(
            decide(&current, &baseline, Err(emfile)),
            Reload::Retry(e) if e.contains("Too many open files")
        ));
        // a missing file is the file's fault: reported
        let gone = LoadError::Io {
            path: "/etc/portico/portico.yaml".into(),
            source: std::io::Error::from_raw_os_error(2), // ENOENT
        };
        assert!(matches!(
            decide(&current, &baseline, Err(gone)),
            Reload::Reject(_)
        ));
    }
}
