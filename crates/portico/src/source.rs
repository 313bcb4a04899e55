//! The standalone source: the YAML file (or the embedded default), reloaded on SIGHUP and
//! whenever its content changes.
//!
//! A valid new file is published as the next [`Desired`] generation; an invalid one is
//! rejected with every error logged and kept in `reload_error` for `/status`, and the running
//! configuration stays as it is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::config::{self, Environment, LoadError};
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
    match path {
        ConfigPath::File(p) => config::load(&p.to_string_lossy(), env),
        ConfigPath::Embedded => {
            config::parse(config::EMBEDDED_DEFAULT, env).map_err(|errors| LoadError::Invalid {
                path: "<embedded default>".into(),
                errors,
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
}

/// Decides what a freshly read file means for the running state. Pure.
pub fn decide(current: &Desired, read: Result<Config, LoadError>) -> Reload {
    match read {
        Ok(cfg) if cfg == *current.config => Reload::Unchanged,
        Ok(cfg) => Reload::Apply(Desired {
            generation: current.generation + 1,
            config: Arc::new(cfg),
        }),
        Err(e) => Reload::Reject(e.to_string()),
    }
}

/// How long a changed file must stay the same before it is read as the new configuration.
const SETTLE: Duration = Duration::from_millis(100);

/// Watches the file for SIGHUP and content changes (checked every `poll`, applied once the file
/// has stopped changing for [`SETTLE`]) until `shutdown`.
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
    let mut last_seen = std::fs::read(file).ok();
    let mut tick = tokio::time::interval(poll);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = tick.tick() => false,
        };
        let mut now = std::fs::read(file).ok();
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
                let again = std::fs::read(file).ok();
                if again == now {
                    break;
                }
                now = again;
            }
        }
        last_seen = now;
        let why = if forced { "SIGHUP" } else { "file changed" };
        let current = desired.borrow().clone();
        match decide(&current, load(&path, &env)) {
            Reload::Apply(next) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(src: &str) -> Desired {
        Desired {
            generation: 3,
            config: Arc::new(config::parse(src, &Environment::default()).unwrap()),
        }
    }

    #[test]
    fn a_valid_change_becomes_the_next_generation() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        let next = config::parse("admin: {listen: 127.0.0.1:2}", &Environment::default());
        match decide(
            &cur,
            next.map_err(|errors| LoadError::Invalid {
                path: "f".into(),
                errors,
            }),
        ) {
            Reload::Apply(d) => assert_eq!(d.generation, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_file_is_rejected_and_the_running_config_kept() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        let bad = config::parse("admin: {listen: nope}", &Environment::default());
        match decide(
            &cur,
            bad.map_err(|errors| LoadError::Invalid {
                path: "f".into(),
                errors,
            }),
        ) {
            Reload::Reject(e) => assert!(e.contains("admin.listen"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn identical_content_is_not_a_new_generation() {
        let cur = desired("admin: {listen: 127.0.0.1:1}");
        let same =
            config::parse("admin:\n  listen: 127.0.0.1:1\n", &Environment::default()).unwrap();
        assert_eq!(decide(&cur, Ok(same)), Reload::Unchanged);
    }
}
