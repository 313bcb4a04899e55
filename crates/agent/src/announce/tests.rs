//! The announcer on a recording fake link under paused time: the takeover burst (count and
//! interval), the periodic refresh, conflicts (one more announcement after the grace, counted,
//! rate-limited) and release (silence at once, off `lo` after the release grace).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::*;

const MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const OTHER: Mac = [0x02, 0, 0, 0, 0, 0x02];

/// A frame sent, and when.
type Sent = (Instant, Vec<u8>);
/// An `lo` change (`add` or `del`), and when.
type LoOp = (Instant, &'static str, IpAddr);

#[derive(Clone, Default)]
struct Log {
    sent: Arc<Mutex<Vec<Sent>>>,
    lo: Arc<Mutex<Vec<LoOp>>>,
}

struct Fake {
    log: Log,
    arp_in: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl Link for Fake {
    async fn send(&self, _v6: bool, frame: &[u8]) -> std::io::Result<()> {
        self.log
            .sent
            .lock()
            .unwrap()
            .push((Instant::now(), frame.to_vec()));
        Ok(())
    }

    async fn recv(&self, v6: bool, buf: &mut [u8]) -> std::io::Result<usize> {
        if !v6 && let Some(f) = self.arp_in.lock().await.recv().await {
            buf[..f.len()].copy_from_slice(&f);
            return Ok(f.len());
        }
        std::future::pending().await
    }

    fn lo_add(&self, vip: IpAddr) -> Result<bool, sys::Error> {
        self.log
            .lo
            .lock()
            .unwrap()
            .push((Instant::now(), "add", vip));
        Ok(true)
    }

    fn lo_del(&self, vip: IpAddr) -> Result<(), sys::Error> {
        self.log
            .lo
            .lock()
            .unwrap()
            .push((Instant::now(), "del", vip));
        Ok(())
    }
}

fn timing() -> Timing {
    Timing {
        count: 3,
        interval: Duration::from_millis(100),
        refresh: Duration::from_secs(10),
        conflict_grace: Duration::from_millis(300),
        release_grace: Duration::from_secs(1),
        reannounce_delay: Duration::from_millis(200),
    }
}

struct Running {
    log: Log,
    want: watch::Sender<Want>,
    arp_in: mpsc::Sender<Vec<u8>>,
    conflicts: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

fn start() -> Running {
    let log = Log::default();
    let (tx, rx) = mpsc::channel(16);
    let conflicts = Arc::new(Mutex::new(BTreeMap::new()));
    let ann = Announcer::with_link(
        "test0",
        MAC,
        Fake {
            log: log.clone(),
            arp_in: tokio::sync::Mutex::new(rx),
        },
        timing(),
        conflicts.clone(),
        Handover::with_binary("/nonexistent/nft"),
    );
    let (want, wrx) = watch::channel(Want::default());
    Running {
        log,
        want,
        arp_in: tx,
        conflicts,
        task: tokio::spawn(ann.run(wrx)),
    }
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

fn announce(vip: Ipv4Addr) -> Want {
    Want {
        vips: [(IpAddr::V4(vip), Mode::Announce)].into(),
        ..Default::default()
    }
}

/// Offsets from `t0` of the gratuitous ARPs for `vip` sent so far.
fn garps(log: &Log, vip: Ipv4Addr, t0: Instant) -> Vec<Duration> {
    log.sent
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, f)| {
            frames::parse_arp(f).is_ok_and(|a| a.op == 1 && a.spa == vip && a.tpa == vip)
        })
        .map(|(t, _)| t.duration_since(t0))
        .collect()
}

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|m| Duration::from_millis(*m)).collect()
}

#[tokio::test(start_paused = true)]
async fn takeover_sends_count_garps_interval_apart_then_refreshes() {
    let r = start();
    let t0 = Instant::now();
    r.want.send(announce(VIP)).unwrap();
    tokio::time::sleep(Duration::from_millis(35_000)).await;
    assert_eq!(
        garps(&r.log, VIP, t0),
        ms(&[0, 100, 200, 10_000, 20_000, 30_000]),
        "burst of count=3 every 100 ms, then the 10 s refresh"
    );
    assert_eq!(r.log.lo.lock().unwrap().len(), 1, "on lo once");
    drop(r.want);
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_foreign_answer_is_a_conflict_after_the_grace_and_is_answered_once_per_grace() {
    let r = start();
    let t0 = Instant::now();
    r.want.send(announce(VIP)).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // another MAC announces our VIP at 1 s, and again 100 ms later
    let foreign = frames::garp(OTHER, VIP).to_vec();
    r.arp_in.send(foreign.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.arp_in.send(foreign).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        garps(&r.log, VIP, t0),
        ms(&[0, 100, 200, 1300]),
        "one more announcement once the grace (300 ms) ran out"
    );
    assert_eq!(r.conflicts.lock().unwrap()[&IpAddr::V4(VIP)], 1);
    drop(r.want);
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn release_is_silent_at_once_and_leaves_lo_after_the_grace() {
    let r = start();
    let t0 = Instant::now();
    r.want.send(announce(VIP)).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    r.want.send(Want::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        garps(&r.log, VIP, t0),
        ms(&[0, 100]),
        "the burst stops at release"
    );
    let lo: Vec<(Duration, &str)> = r
        .log
        .lo
        .lock()
        .unwrap()
        .iter()
        .map(|(t, op, _)| (t.duration_since(t0), *op))
        .collect();
    assert_eq!(
        lo,
        [
            (Duration::ZERO, "add"),
            (Duration::from_millis(1150), "del")
        ]
    );
    // a request for the released VIP is not answered
    let ask = frames::arp(
        frames::BROADCAST,
        OTHER,
        &frames::Arp {
            op: 1,
            sha: OTHER,
            spa: Ipv4Addr::new(10, 0, 0, 254),
            tha: [0; 6],
            tpa: VIP,
        },
    );
    let before = r.log.sent.lock().unwrap().len();
    r.arp_in.send(ask.to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(r.log.sent.lock().unwrap().len(), before);
    drop(r.want);
    r.task.await.unwrap();
}
