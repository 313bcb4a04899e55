//! The proxy's worker threads: each runs its own single-threaded tokio runtime, and every TCP
//! `VIP:port` gets one `SO_REUSEPORT` listener per worker, so the kernel spreads new connections
//! over the workers and a connection is accepted, connected to its backend and relayed on one
//! thread (no work stealing, no wake-ups across threads). HAProxy's `nbthread` and nginx's
//! `reuseport` work the same way.
//!
//! With no workers ([`crate::Options::workers`] = 0) the accept loops and connections run on the
//! runtime that created the balancer, as before.
//!
//! The kernel picks a worker's listener by a hash of the connection's addresses and ports: even
//! on average, uneven for few connections (a pool of 8 long-lived database connections split 1 /
//! 7 puts nearly all the work on one thread; a 50-connection keep-alive run here split 19 / 32).
//! So a worker that accepts a connection while it serves clearly more than the least busy
//! worker hands it over to that one ([`place`]; HAProxy's threads balance their accepts by load
//! the same way): one wake-up of the other thread, only when the loads are uneven. Accepted
//! sockets reach no poller until the worker that serves them registers them
//! ([`sys::accept::Acceptor`]), so a hand-over costs no `epoll_ctl` on the accepting worker.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Errors of the worker threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A worker thread or its runtime could not be started.
    #[error("cannot start proxy worker {index}: {source}")]
    Start {
        /// The worker's index.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The running worker threads; they stop when this is dropped.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// Connections each worker accepted (`portico_lb_worker_accepted_connections`).
    accepted: Vec<Counter>,
    /// TCP connections each worker serves now.
    active: Vec<Arc<AtomicU64>>,
    /// Connections handed to a less busy worker (`portico_lb_worker_handoffs`).
    handoffs: Counter,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` workers. A worker that cannot start is logged and left out (the others, or
    /// with none the caller's runtime, carry the load): a balancer is never refused for it.
    /// Each worker's accepts are counted in `metrics.worker_accepted`.
    pub(crate) fn start(n: usize, metrics: &crate::metrics::Metrics) -> Self {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for index in 0..n {
            match start_one(index, stop.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tracing::error!(error = %e, reason = "workerNotStarted", "proxy worker not started; the others carry its share");
                }
            }
        }
        let accepted = (0..handles.len().max(1))
            .map(|i| {
                metrics
                    .worker_accepted
                    .get_or_create(&crate::metrics::WorkerLabels {
                        worker: i.to_string(),
                    })
                    .clone()
            })
            .collect();
        let active = (0..handles.len().max(1))
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        Self {
            handles,
            accepted,
            active,
            handoffs: metrics.worker_handoffs.clone(),
            stop,
        }
    }

    /// The worker that serves a connection worker `own` accepted ([`place`] over the workers'
    /// loads now), and the load unit that counts it there until dropped.
    pub(crate) fn place(&self, own: usize) -> (usize, Load) {
        let to = place(own, self.active.iter().map(|a| a.load(Ordering::Relaxed)));
        let unit = self.active.get(to).or(self.active.first()).map(|a| {
            a.fetch_add(1, Ordering::Relaxed);
            a.clone()
        });
        (to, Load(unit))
    }

    /// Counts a connection the accepting worker handed to another worker to serve.
    pub(crate) fn count_handoff(&self) {
        self.handoffs.inc();
    }

    /// How many listeners each TCP `VIP:port` needs: one per worker (at least one).
    pub(crate) fn listeners(&self) -> usize {
        self.handles.len().max(1)
    }

    /// Runs `fut` on worker `index` (on the current runtime without workers).
    pub(crate) fn spawn<F>(&self, index: usize, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.handles.get(index) {
            Some(h) => {
                h.spawn(fut);
            }
            None => {
                tokio::spawn(fut);
            }
        }
    }

    /// Counts a connection worker `index` accepted.
    pub(crate) fn count_accept(&self, index: usize) {
        if let Some(c) = self.accepted.get(index) {
            c.inc();
        }
    }

    /// TCP connections each worker serves now.
    pub(crate) fn loads(&self) -> Vec<u64> {
        self.active
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Connections each worker accepted so far.
    pub(crate) fn accepted(&self) -> Vec<u64> {
        self.accepted.iter().map(Counter::get).collect()
    }
}

/// One connection in a worker's load; taken off when dropped.
pub(crate) struct Load(Option<Arc<AtomicU64>>);

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Which worker serves a connection that worker `own` accepted, given each worker's open
/// connections: `own`, unless it serves more than a quarter more than the least busy worker
/// plus one connection — then that worker (the lowest index among equals). The slack keeps
/// hand-overs rare when many short connections make the loads flicker around an even split;
/// few long ones still end up within one or two of even. Pure.
pub fn place(own: usize, loads: impl IntoIterator<Item = u64>) -> usize {
    let mut mine = None;
    let mut least: Option<(usize, u64)> = None;
    for (i, load) in loads.into_iter().enumerate() {
        if i == own {
            mine = Some(load);
        }
        if least.is_none_or(|(_, min)| load < min) {
            least = Some((i, load));
        }
    }
    match (mine, least) {
        (Some(mine), Some((least, min))) if mine > min + 1 + min / 4 => least,
        _ => own,
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined: the last reference may be dropped on a worker itself.
        self.stop.cancel();
    }
}

fn start_one(index: usize, stop: CancellationToken) -> Result<Handle, Error> {
    let err = |source| Error::Start { index, source };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(err)?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("proxy-{index}"))
        .spawn(move || {
            crate::uring::mark_worker_thread();
            rt.block_on(async {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = keep_timer_armed() => {}
                }
            })
        })
        .map_err(err)?;
    Ok(handle)
}

/// How often [`keep_timer_armed`] wakes (a quarter of the default 1 s connect timeout).
const TIMER_KEEPER_PERIOD: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`TIMER_KEEPER_PERIOD`] on the worker's runtime, so that the
/// per-connection timers (the connect timeout, the first byte's idle timeout) are never the
/// earliest one.
///
/// tokio's time driver wakes its own thread — an eventfd `write` and one more `epoll_wait` —
/// whenever a timer is registered earlier than the instant the driver last planned to wake at.
/// With no other timer pending, every new connection's connect timeout was such a timer: one
/// `write(eventfd)` per connection on the proxy thread (`strace -f -e trace=write` under `wrk -H
/// 'Connection: close'` showed 726 for 728 requests, from `Sleep::poll` → `reregister` →
/// `Waker::wake`). With this timer pending, a connect timeout longer than the period is later
/// than the planned wake-up and costs no system call; the price is four wake-ups a second on an
/// idle worker. A connect timeout shorter than the period is still correct, just not cheaper.
async fn keep_timer_armed() {
    loop {
        tokio::time::sleep(TIMER_KEEPER_PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn a_busier_worker_hands_over_to_the_least_busy_one() {
        assert_eq!(place(0, [0, 0]), 0);
        assert_eq!(place(0, [1, 0]), 0, "one more is within the slack");
        assert_eq!(place(0, [2, 0]), 1);
        assert_eq!(place(1, [3, 7, 5]), 0);
        assert_eq!(place(1, [40, 51]), 1, "within a quarter more, plus one");
        assert_eq!(place(1, [40, 52]), 0);
    }

    #[test]
    fn few_long_connections_end_up_nearly_even_whatever_the_kernel_picks() {
        // every connection lands on worker 0 (the worst hash) and stays open
        for n in 1..=64u64 {
            let mut loads = [0u64; 2];
            for _ in 0..n {
                let to = place(0, loads.iter().copied());
                loads[to] += 1;
            }
            let (hi, lo) = (loads[0].max(loads[1]), loads[0].min(loads[1]));
            assert!(hi <= lo + 1 + lo / 4 + 1, "{n}: {loads:?}");
        }
        // 8 pooled connections: 4 / 4 or 5 / 3, never 1 / 7
        let mut loads = [0u64; 2];
        for _ in 0..8 {
            let to = place(0, loads.iter().copied());
            loads[to] += 1;
        }
        assert!(loads[1] >= 3, "{loads:?}");
    }

    #[test]
    fn out_of_range_and_empty_inputs_keep_the_accepting_worker() {
        assert_eq!(place(3, [0, 9]), 3);
        assert_eq!(place(0, []), 0);
    }
}
