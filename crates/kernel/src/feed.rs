//! The conntrack event feed: reads the event socket, keeps the events of portico's flows and
//! hands them to the driver through a bounded queue; counts what it loses (overruns of the
//! socket buffer, a full queue, malformed messages) and never stops for them.

use std::sync::Arc;

use sys::conntrack::events::{self, Event, EventSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::passive::Watched;

/// Events queued between the feed and the driver.
pub const QUEUE: usize = 4096;

/// Receive buffer asked for the event socket (bytes).
pub const RCVBUF: usize = 4 << 20;

/// Reads events until `stop` or the driver goes away.
pub(crate) async fn run(
    sock: EventSocket,
    watched: watch::Receiver<Arc<Watched>>,
    tx: mpsc::Sender<Event>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 1 << 16];
    let mut batch = Vec::new();
    loop {
        let r = tokio::select! {
            () = stop.cancelled() => break,
            r = sock.recv(&mut buf) => r,
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if events::is_overrun(&e) => {
                metrics.dropped("overrun", 1);
                tracing::debug!(reason = "overrun", "kernel path: conntrack events lost");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = "conntrackEventsFailed", "kernel path: conntrack event feed stopped; passive outlier detection is off");
                break;
            }
        };
        batch.clear();
        let bad = events::parse_events(&buf[..n], &mut batch);
        if bad > 0 {
            metrics.dropped("malformed", bad as u64);
        }
        let w = watched.borrow().clone();
        for e in batch.drain(..) {
            if !w.contains(&(e.proto, e.orig_dst, e.reply_src)) {
                continue;
            }
            metrics.conntrack_events.inc();
            match tx.try_send(e) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => metrics.dropped("queueFull", 1),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    metrics.passive.set(0);
                    return;
                }
            }
        }
    }
    metrics.passive.set(0);
}
