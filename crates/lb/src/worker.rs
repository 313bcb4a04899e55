//! The proxy's worker threads: each runs its own single-threaded tokio runtime, and every TCP
//! `VIP:port` gets one `SO_REUSEPORT` listener per worker, so the kernel spreads new connections
//! over the workers and a connection is accepted, connected to its backend and relayed on one
//! thread (no work stealing, no wake-ups across threads). HAProxy's `nbthread` and nginx's
//! `reuseport` work the same way.
//!
//! With no workers ([`crate::Options::workers`] = 0) the accept loops and connections run on the
//! runtime that created the balancer, as before.

use std::future::Future;
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
        Self {
            handles,
            accepted,
            stop,
        }
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

    /// Connections each worker accepted so far.
    pub(crate) fn accepted(&self) -> Vec<u64> {
        self.accepted.iter().map(Counter::get).collect()
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
