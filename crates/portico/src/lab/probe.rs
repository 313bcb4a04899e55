//! The lab's client: TCP probes of the VIP, one at a time, and a watch on the client's ARP
//! cache, both from a thread inside the client namespace.
//!
//! A probe starts only after the previous one ended (at the next 10 ms tick; a tick missed
//! while a probe ran is skipped, not made up), so probes never overlap and each result belongs
//! to its start time. A failed probe takes up to its 50 ms connect timeout, so during an outage
//! the client probes about every 50-60 ms. The ARP cache is read every 2 ms by a separate task,
//! so the ARP-move time does not wait for a probe.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::{CONNECT_TIMEOUT, PROBE_EVERY, VIP, in_netns};

/// How often the client's ARP entry for the VIP is read.
const ARP_EVERY: Duration = Duration::from_millis(2);

/// One probe: when it started and which node answered (`None`: failed).
#[derive(Debug, Clone)]
pub(super) struct Probe {
    pub(super) start: Instant,
    pub(super) node: Option<String>,
}

/// What the client saw.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) probes: Vec<Probe>,
    /// Each change of the client's ARP entry for the VIP (`None`: no complete entry).
    pub(super) arp: Vec<(Instant, Option<[u8; 6]>)>,
}

/// The client's view: sequential probes and ARP-cache changes, until `stop`.
pub(super) fn start_prober(
    ns: &str,
    target: SocketAddr,
    obs: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    in_netns(ns, move || {
        Box::pin(async move {
            let watched = match target.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(_) => VIP,
            };
            let arp = {
                let (obs, stop) = (obs.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(ARP_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    let mut last_mac: Option<[u8; 6]> = None;
                    // bounded: at most two hours
                    for _ in 0..(2 * 3600 * 500) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        tick.tick().await;
                        let at = Instant::now();
                        let mac = read_arp(watched);
                        if mac != last_mac {
                            last_mac = mac;
                            obs.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .arp
                                .push((at, mac));
                        }
                    }
                })
            };
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // bounded: at most two hours of probing
            for _ in 0..(2 * 3600 * 100) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let start = Instant::now();
                let node = probe(target).await;
                obs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .probes
                    .push(Probe { start, node });
            }
            let _ = arp.await;
        })
    })
}

/// Connects to `target` (50 ms timeout) and reads the answering node's name.
pub(super) async fn probe(target: SocketAddr) -> Option<String> {
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .ok()?
        .ok()?;
    let mut buf = Vec::with_capacity(32);
    tokio::time::timeout(Duration::from_millis(200), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let name = String::from_utf8_lossy(&buf).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// The client's ARP entry for `ip` (complete entries only), from this thread's namespace.
fn read_arp(ip: Ipv4Addr) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    let want = ip.to_string();
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 4 && f[0] == want && f[2] == "0x2" {
            let b: Vec<u8> = f[3]
                .split(':')
                .filter_map(|h| u8::from_str_radix(h, 16).ok())
                .collect();
            b.try_into().ok()
        } else {
            None
        }
    })
}
