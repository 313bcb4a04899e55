//! The conntrack event feed: reads the event socket, keeps the events of portico's flows and
//! hands them to the driver through a bounded queue; counts what it loses (overruns of the
//! socket buffer, a full queue, malformed messages) and never stops for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sys::conntrack::events::{self, Event, EventKind, EventSocket, TcpState};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::passive::Watched;

/// Events queued between the feed and the driver.
pub const QUEUE: usize = 4096;

/// How long the feed sleeps after each batch of reads (detection latency it adds, at most).
pub const COALESCE: tokio::time::Duration = tokio::time::Duration::from_millis(5);

/// Receive buffer asked for the event socket (bytes).
pub const RCVBUF: usize = 4 << 20;

/// Whether an event can decide a flow's outcome: not the updates after the handshake (the flow
/// was decided at `SYN_RECV` or `ESTABLISHED`), which are most of a connection's events.
fn decisive(e: &Event) -> bool {
    e.kind != EventKind::Update
        || !matches!(
            e.tcp_state,
            Some(TcpState::FinWait | TcpState::CloseWait | TcpState::LastAck | TcpState::TimeWait)
        )
}

/// Reads events until `stop` or the driver goes away; sets `lost` whenever events were lost
/// (the driver then forgets the flows awaiting an outcome). Wakes at most once per
/// [`COALESCE`]: it reads everything ready, then sleeps, so a busy node costs a wake-up per
/// batch rather than per event (the socket buffer holds what arrives meanwhile).
pub(crate) async fn run(
    sock: EventSocket,
    watched: watch::Receiver<Arc<Watched>>,
    tx: mpsc::Sender<Event>,
    lost: Arc<AtomicBool>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 1 << 16];
    let mut batch = Vec::new();
    let mut closed = false;
    loop {
        let w = watched.borrow().clone();
        let r = tokio::select! {
            () = stop.cancelled() => break,
            r = sock.recv_batch(&mut buf, 256, |read| match read {
                Ok(bytes) => {
                    batch.clear();
                    let bad = events::parse_events(bytes, &mut batch);
                    if bad > 0 {
                        metrics.dropped("malformed", bad as u64);
                    }
                    for e in batch.drain(..) {
                        if !w.contains(&(e.proto, e.orig_dst, e.reply_src)) || !decisive(&e) {
                            continue;
                        }
                        metrics.conntrack_events.inc();
                        match tx.try_send(e) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                metrics.dropped("queueFull", 1);
                                lost.store(true, Ordering::Release);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                        }
                    }
                }
                Err(_overrun) => {
                    metrics.dropped("overrun", 1);
                    lost.store(true, Ordering::Release);
                    tracing::debug!(reason = "overrun", "kernel path: conntrack events lost");
                }
            }) => r,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, reason = "conntrackEventsFailed", "kernel path: conntrack event feed stopped; passive outlier detection is off");
            break;
        }
        if closed {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(COALESCE) => {}
        }
    }
    metrics.passive.set(0);
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};
    use std::process::Command;

    use prometheus_client::registry::Registry;
    use tokio::time::{Duration, Instant};

    use super::*;
    use crate::metrics::ReasonLabels;

    /// A network namespace, deleted on drop (also when the test fails).
    struct Ns(String);

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }

    fn sh(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// `n` new UDP flows to 127.0.0.1:9, each a new conntrack entry.
    fn burst(n: usize) {
        for _ in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = s.send_to(b"x", "127.0.0.1:9");
        }
    }

    async fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn an_overrun_is_counted_and_the_feed_goes_on() {
        if !sys::is_root() {
            sys::skip_test("needs root (a network namespace, conntrack events)");
            return;
        }
        let ns = Ns(format!("pk-{}-feed", std::process::id()));
        sh(&["ip", "netns", "add", &ns.0]);
        sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        // a rule that needs conntrack, so the namespace tracks flows
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.0,
            "nft",
            "add table inet t; add chain inet t c { type filter hook output priority 0; }; add rule inet t c ct state new counter",
        ]);
        let path = format!("/run/netns/{}", ns.0);
        std::thread::spawn(move || {
            sys::setns_net(&path).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let metrics = Metrics::register(&mut Registry::default());
                let overruns = metrics.events_dropped.get_or_create(&ReasonLabels {
                    reason: "overrun".into(),
                });
                // the smallest receive buffer: a burst read late overruns it
                let sock = EventSocket::subscribe(0).expect("subscribe");
                let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
                let (_watched_tx, watched) =
                    watch::channel(Arc::new(Watched::from([(17, dst, dst)])));
                let (tx, mut rx) = mpsc::channel(QUEUE);
                let stop = CancellationToken::new();
                burst(500);
                let lost = Arc::new(AtomicBool::new(false));
                let task = tokio::spawn(run(
                    sock,
                    watched,
                    tx,
                    lost.clone(),
                    metrics.clone(),
                    stop.clone(),
                ));
                wait("an overrun counted", || overruns.get() >= 1).await;
                assert!(lost.load(Ordering::Acquire), "the driver is told");
                // the feed goes on: later flows still arrive (one at a time, so the small
                // buffer holds each; the rest of the burst is read first)
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                let before = metrics.conntrack_events.get();
                let deadline = Instant::now() + Duration::from_secs(10);
                while metrics.conntrack_events.get() < before + 3 {
                    assert!(Instant::now() < deadline, "no events after the overrun");
                    burst(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(rx.recv().await.is_some());
                stop.cancel();
                task.await.unwrap();
            });
        })
        .join()
        .expect("the test thread");
    }
}
