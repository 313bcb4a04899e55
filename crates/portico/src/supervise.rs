//! Supervision of the node's components: a component that fails or panics is restarted with
//! back-off and makes `/readyz` fail while it is down; one that keeps failing stops the process
//! with a non-zero exit, so a service manager (systemd, the kubelet) restarts it whole. A
//! half-dead node that says it is ready is the one outcome this rules out.
//!
//! The decision (restart now, after how long, or give up) is the pure [`Backoff`]; [`supervise`]
//! is the thin driver that runs a component, waits for it and applies the decision.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Restarts in a row (each run shorter than [`Backoff::STABLE`]) before the process gives up.
pub const MAX_RESTARTS: u32 = 5;

/// What to do after a component ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this pause.
    Restart(Duration),
    /// It keeps failing: stop the process with a non-zero exit.
    GiveUp,
}

/// Exponential back-off that forgets failures once a run lasted long enough.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A run at least this long counts as healthy: the next failure starts the count again.
    pub const STABLE: Duration = Duration::from_secs(30);
    /// The first pause.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(10);

    /// Decides after a run of `ran` ended with a failure.
    pub fn failed(&mut self, ran: Duration) -> Decision {
        if ran >= Self::STABLE {
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures > MAX_RESTARTS {
            return Decision::GiveUp;
        }
        let pause = Self::FIRST.saturating_mul(1 << (self.failures - 1).min(16));
        Decision::Restart(pause.min(Self::MAX))
    }
}

/// The state of every supervised component, and readiness derived from it.
#[derive(Clone)]
pub struct Components {
    failed: Arc<Mutex<BTreeMap<&'static str, String>>>,
    healthy: watch::Sender<bool>,
}

impl Components {
    /// All components up.
    pub fn new() -> Self {
        Self {
            failed: Arc::default(),
            healthy: watch::Sender::new(true),
        }
    }

    /// True while no component is down; `/readyz` requires it.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    /// The components that are down, with why (for `/status` and logs).
    pub fn down(&self) -> BTreeMap<&'static str, String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, name: &'static str, failure: Option<String>) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(why) => f.insert(name, why),
            None => f.remove(name),
        };
        self.healthy.send_replace(f.is_empty());
    }
}

impl Default for Components {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a component ended without being asked to.
fn ended<E: std::fmt::Display>(r: Result<Result<(), E>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "stopped on its own".to_string(),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            format!("panicked: {msg}")
        }
        Err(_) => "cancelled".to_string(),
    }
}

/// Runs `start(attempt)` until `stop`, restarting it with back-off whenever it ends on its own
/// (an error, a panic, or a plain return). While it is down, `components` marks it failed, so
/// `/readyz` fails. After [`MAX_RESTARTS`] quick failures in a row it cancels `fatal` (the
/// process then exits non-zero) and returns.
pub async fn supervise<F, Fut, E>(
    name: &'static str,
    components: Components,
    stop: CancellationToken,
    fatal: CancellationToken,
    mut start: F,
) where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut backoff = Backoff::default();
    let mut attempt = 0;
    loop {
        let began = Instant::now();
        let mut task = tokio::spawn(start(attempt));
        let r = tokio::select! {
            r = &mut task => r,
            () = stop.cancelled() => {
                // asked to stop: the component sees the same token and finishes by itself
                let _ = task.await;
                return;
            }
        };
        if stop.is_cancelled() {
            return;
        }
        let why = ended(r);
        components.set(name, Some(why.clone()));
        match backoff.failed(began.elapsed()) {
            Decision::GiveUp => {
                error!(
                    component = name,
                    reason = "componentFailed",
                    "{name} {why}; it failed {MAX_RESTARTS} times in a row: stopping the process"
                );
                fatal.cancel();
                return;
            }
            Decision::Restart(pause) => {
                error!(
                    component = name,
                    reason = "componentFailed",
                    "{name} {why}; restarting in {pause:?}"
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
        attempt += 1;
        components.set(name, None);
        info!(component = name, attempt, "{name} restarted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_caps_and_gives_up_after_quick_failures() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let pauses: Vec<_> = (0..MAX_RESTARTS).map(|_| b.failed(quick)).collect();
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1600]
                .map(|ms| Decision::Restart(Duration::from_millis(ms)))
                .to_vec()
        );
        assert_eq!(b.failed(quick), Decision::GiveUp);
    }

    #[test]
    fn a_long_healthy_run_forgets_earlier_failures() {
        let mut b = Backoff::default();
        for _ in 0..MAX_RESTARTS {
            b.failed(Duration::ZERO);
        }
        assert_eq!(b.failed(Backoff::STABLE), Decision::Restart(Backoff::FIRST));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_component_is_restarted_and_not_ready_while_down() {
        let components = Components::new();
        let mut healthy = components.healthy();
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let runs = Arc::new(AtomicU32::new(0));
        let task = {
            let (c, s, f, runs) = (
                components.clone(),
                stop.clone(),
                fatal.clone(),
                runs.clone(),
            );
            tokio::spawn(supervise("balancer", c, s.clone(), f, move |attempt| {
                let (runs, s) = (runs.clone(), s.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if attempt == 0 {
                        panic!("boom");
                    }
                    s.cancelled().await;
                    Ok::<(), String>(())
                }
            }))
        };
        // down after the panic, with the panic's message
        healthy.wait_for(|h| !*h).await.unwrap();
        assert_eq!(
            components.down().get("balancer").map(String::as_str),
            Some("panicked: boom")
        );
        // up again once restarted
        healthy.wait_for(|h| *h).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        stop.cancel();
        task.await.unwrap();
        assert!(!fatal.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_component_that_keeps_failing_stops_the_process() {
        let components = Components::new();
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        supervise("dns", components.clone(), stop, fatal.clone(), |_| async {
            Err::<(), _>("socket gone")
        })
        .await;
        assert!(fatal.is_cancelled());
        assert!(!*components.healthy().borrow());
        assert_eq!(
            components.down().get("dns").map(String::as_str),
            Some("failed: socket gone")
        );
    }
}
