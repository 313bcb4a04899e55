//! Layer-2 announcement of owned VIPs on one interface, and local delivery through `lo`.
//!
//! * **Local delivery.** An owned VIP is added as a host-scope /32 (/128, no DAD) on `lo`, so
//!   the kernel accepts traffic for it and listeners (bound with `IP_FREEBIND` or to the
//!   wildcard) get it; the announcing interface keeps only the node's own addresses, so
//!   node-IP detection is not confused. Only addresses the announcer added are removed again
//!   (one the host already had on `lo` stays), and they carry [`sys::ADDR_PROTO`] so that the
//!   next start removes exactly what a crashed agent left. On that interface the agent sets
//!   `arp_ignore=1` (answer ARP only for addresses configured on the interface itself: the
//!   kernel stays silent about VIPs on `lo`) and `arp_announce=2` (never use a VIP as the
//!   source of the kernel's own ARP requests), then reads them back; it fails with a clear
//!   error if it cannot. For IPv6, Linux only answers solicitations for addresses of the
//!   receiving interface, so nothing needs setting.
//! * **Answering.** Two `AF_PACKET` sockets per interface: one for ARP, one for IPv6 filtered
//!   in the kernel (BPF) to neighbour solicitations. Requests for an *announced* VIP get a
//!   reply from our MAC.
//! * **Takeover**: forwarding of the previous owner's in-flight connections when it is alive or
//!   leaving gracefully ([`crate::handover`]), local delivery, then a burst of `count`
//!   gratuitous ARPs / unsolicited NAs `interval` apart (the first at once); every `refresh` all
//!   announced VIPs are announced again for routers that ignore gratuitous ARP.
//! * **Draining** (graceful stop): stop answering and announcing but keep local delivery, so
//!   connections still arriving are served while the new owner's announcement spreads.
//! * **Release** (ownership moved): stop answering at once, remove the address from `lo` a
//!   second later, so connections sent before the new owner's announcement reached every
//!   client are still accepted (make-before-break on preemption and rebalancing).
//! * **Conflicts**: an ARP reply or gratuitous ARP (or an NA) from another MAC for a VIP we
//!   announce is noted; if we still announce it after a grace period (a legitimate new owner
//!   would have made us release by then), it is counted and we announce again, at most once
//!   per grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::frames::{self, Mac};
use crate::handover::{Forward, Handover};

/// Errors of the announcer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] sys::Error),
    /// A sysctl the agent needs has the wrong value and could not be set.
    #[error(
        "sysctl {key} must be {want} for VIPs on lo to be announced only by the agent, and it is {got}; run as root (CAP_NET_ADMIN) or set it yourself"
    )]
    Sysctl {
        /// The key.
        key: String,
        /// The value needed.
        want: String,
        /// The value read back.
        got: String,
    },
}

/// What to do with a VIP on this interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver locally, answer, announce.
    Announce,
    /// Deliver locally only (graceful stop).
    Drain,
}

/// What an interface's announcer should do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// VIPs and their mode.
    pub vips: BTreeMap<IpAddr, Mode>,
    /// Bumped when every announced VIP should be announced again (a peer came back: after a
    /// healed partition the clients may still point at the node that stood in), after
    /// `Timing::reannounce_delay` so that the stand-in has released by then.
    pub reannounce: u64,
    /// For VIPs being taken over from a node that still serves them: its address on this
    /// interface, to forward in-flight connections to (see [`crate::handover`]).
    pub from: BTreeMap<IpAddr, IpAddr>,
}

/// Announcement timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Packets on takeover.
    pub count: u32,
    /// Gap between them.
    pub interval: Duration,
    /// Periodic refresh (zero = off).
    pub refresh: Duration,
    /// Grace before a foreign answer counts as a conflict.
    pub conflict_grace: Duration,
    /// How long a released VIP stays on `lo` (connections sent before the new owner's
    /// announcement reached the clients still arrive here).
    pub release_grace: Duration,
    /// Delay of a re-announcement burst.
    pub reannounce_delay: Duration,
}

/// Sets and checks the sysctls an announcing interface needs.
pub fn prepare_sysctls(iface: &str) -> Result<(), Error> {
    for (name, want) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let key = format!("net/ipv4/conf/{iface}/{name}");
        let got = sys::sysctl_read(&key)?;
        if got != want {
            if let Err(e) = sys::sysctl_write(&key, want) {
                warn!(%e, "cannot set {key}");
            }
            let got = sys::sysctl_read(&key)?;
            if got != want {
                return Err(Error::Sysctl {
                    key,
                    want: want.into(),
                    got,
                });
            }
        }
    }
    Ok(())
}

fn prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Puts a VIP on `lo` for local delivery; returns whether this call added it (an address that
/// was there already, the host's own, is never ours to remove). Loopback VIPs (127.0.0.0/8, ::1)
/// are local already and are never touched: deleting them later would take the host's own
/// loopback away.
fn lo_add(lo: u32, vip: IpAddr) -> Result<bool, sys::Error> {
    if vip.is_loopback() {
        return Ok(false);
    }
    sys::addr_add(lo, vip, prefix(vip))
}

/// Takes a VIP off `lo`; loopback addresses are never removed (see [`lo_add`]).
fn lo_del(lo: u32, vip: IpAddr) -> Result<(), sys::Error> {
    if vip.is_loopback() {
        return Ok(());
    }
    sys::addr_del(lo, vip, prefix(vip))
}

/// Removes the VIPs a crashed predecessor left on `lo`: exactly the addresses marked with
/// [`sys::ADDR_PROTO`], never the host's own (kernels before 6.3 do not record the mark, and
/// then nothing is removed). The binary calls it once at start, before the agent or the BGP
/// task can put this process's own VIPs there with the same mark.
pub fn clear_stale() {
    let Ok(lo) = sys::if_index("lo") else { return };
    match sys::addrs_with_proto(lo, sys::ADDR_PROTO) {
        Ok(stale) => {
            for v in stale {
                info!(vip = %v, "removing a VIP a previous agent left on lo");
                if let Err(e) = lo_del(lo, v) {
                    warn!(%v, %e, "cannot remove stale VIP from lo");
                }
            }
        }
        Err(e) => warn!(%e, "cannot list the addresses on lo"),
    }
}

/// The link an announcer works on: its ARP and neighbour-discovery raw sockets and local
/// delivery through `lo`. [`RawLink`] is the real one; tests drive the announcer through a
/// recording fake under paused time.
pub trait Link: Send + Sync + 'static {
    /// Sends a frame on the ARP (`v6` false) or neighbour-discovery (`v6` true) socket.
    fn send(&self, v6: bool, frame: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Receives the next frame of the ARP or neighbour-discovery socket.
    fn recv(&self, v6: bool, buf: &mut [u8])
    -> impl Future<Output = std::io::Result<usize>> + Send;
    /// Puts a VIP on `lo`; returns whether this call added it.
    fn lo_add(&self, vip: IpAddr) -> Result<bool, sys::Error>;
    /// Takes a VIP off `lo`.
    fn lo_del(&self, vip: IpAddr) -> Result<(), sys::Error>;
}

/// The real link: two `AF_PACKET` sockets on the interface and netlink on `lo`.
pub struct RawLink {
    lo: u32,
    arp: sys::PacketSocket,
    nd: sys::PacketSocket,
}

impl Link for RawLink {
    async fn send(&self, v6: bool, frame: &[u8]) -> std::io::Result<()> {
        if v6 {
            self.nd.send(frame).await
        } else {
            self.arp.send(frame).await
        }
    }

    async fn recv(&self, v6: bool, buf: &mut [u8]) -> std::io::Result<usize> {
        if v6 {
            self.nd.recv(buf).await
        } else {
            self.arp.recv(buf).await
        }
    }

    fn lo_add(&self, vip: IpAddr) -> Result<bool, sys::Error> {
        lo_add(self.lo, vip)
    }

    fn lo_del(&self, vip: IpAddr) -> Result<(), sys::Error> {
        lo_del(self.lo, vip)
    }
}

/// The announcer of one interface. Runs until `want` is closed, then releases everything.
pub struct Announcer<L: Link = RawLink> {
    iface: String,
    mac: Mac,
    link: L,
    timing: Timing,
    conflicts: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
    handover: Handover,
}

impl<L: Link> std::fmt::Debug for Announcer<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Announcer({})", self.iface)
    }
}

struct Burst {
    left: u32,
    next: Instant,
}

impl Announcer {
    /// Opens the sockets of `iface` (sysctls must already be prepared).
    pub fn open(
        iface: &str,
        timing: Timing,
        conflicts: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
        handover: Handover,
    ) -> Result<Self, Error> {
        let index = sys::if_index(iface)?;
        let filter = sys::bpf_neighbor_solicitation();
        let link = RawLink {
            lo: sys::if_index("lo")?,
            arp: sys::PacketSocket::open(index, sys::ETH_P_ARP, None)?,
            nd: sys::PacketSocket::open(index, sys::ETH_P_IPV6, Some(&filter))?,
        };
        Ok(Announcer::with_link(
            iface,
            sys::if_mac(iface)?,
            link,
            timing,
            conflicts,
            handover,
        ))
    }
}

impl<L: Link> Announcer<L> {
    /// An announcer on `link` with hardware address `mac`.
    pub fn with_link(
        iface: &str,
        mac: Mac,
        link: L,
        timing: Timing,
        conflicts: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
        handover: Handover,
    ) -> Self {
        Self {
            iface: iface.to_string(),
            mac,
            link,
            timing,
            conflicts,
            handover,
        }
    }

    async fn announce(&self, vip: IpAddr) {
        let r = match vip {
            IpAddr::V4(v) => self.link.send(false, &frames::garp(self.mac, v)).await,
            IpAddr::V6(v) => {
                self.link
                    .send(true, &frames::unsolicited_na(self.mac, v))
                    .await
            }
        };
        if let Err(e) = r {
            debug!(%vip, iface = %self.iface, %e, "announcement not sent");
        }
    }

    /// Runs until `want` closes; returns after removing every VIP it added.
    pub async fn run(self, mut want: watch::Receiver<Want>) {
        let mut have: BTreeMap<IpAddr, Mode> = BTreeMap::new();
        let mut reannounced = 0u64;
        let mut bursts: BTreeMap<IpAddr, Burst> = BTreeMap::new();
        let mut suspects: BTreeMap<IpAddr, Instant> = BTreeMap::new();
        let mut unlink: BTreeMap<IpAddr, Instant> = BTreeMap::new();
        let mut last_conflict: BTreeMap<IpAddr, Instant> = BTreeMap::new();
        // the VIPs this announcer put on lo (only those are removed again)
        let mut added: BTreeSet<IpAddr> = BTreeSet::new();
        let refresh = (!self.timing.refresh.is_zero()).then_some(self.timing.refresh);
        let mut next_refresh = Instant::now() + refresh.unwrap_or(Duration::from_secs(3600));
        let mut abuf = vec![0u8; 2048];
        let mut nbuf = vec![0u8; 2048];
        loop {
            let next_burst = bursts.values().map(|b| b.next).min();
            let next_suspect = suspects
                .values()
                .min()
                .map(|t| *t + self.timing.conflict_grace);
            let next_unlink = unlink.values().min().copied();
            let wake = [next_burst, next_suspect, next_unlink, Some(next_refresh)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(next_refresh);
            tokio::select! {
                changed = want.changed() => {
                    let w = if changed.is_ok() { want.borrow_and_update().clone() } else { Want::default() };
                    let next = w.vips;
                    // release: stop answering now, remove local delivery after the grace
                    // period (also when closing: the new owner forwards the connections we
                    // still hold for that long, see `handover`)
                    for (vip, _) in have.iter().filter(|(v, _)| !next.contains_key(*v)) {
                        bursts.remove(vip);
                        self.handover.close(*vip).await;
                        unlink.insert(*vip, Instant::now() + self.timing.release_grace);
                        debug!(%vip, iface = %self.iface, "released");
                    }
                    // the previous owner still serves what it accepted: forward those
                    // connections' segments to it before the clients move here (one ruleset
                    // change for every VIP taken over now)
                    let forwards: Vec<Forward> = next
                        .iter()
                        .filter(|(v, m)| **m == Mode::Announce && have.get(*v) != Some(&Mode::Announce))
                        .filter_map(|(v, _)| w.from.get(v).map(|to| Forward { vip: *v, to: *to, iface: self.iface.clone() }))
                        .collect();
                    self.handover.open(forwards, self.timing.release_grace).await;
                    for (vip, mode) in &next {
                        let before = have.get(vip).copied();
                        let linked = unlink.remove(vip).is_some();
                        if before.is_none() && !linked {
                            match self.link.lo_add(*vip) {
                                Ok(true) => {
                                    added.insert(*vip);
                                }
                                Ok(false) => {}
                                Err(e) => warn!(%vip, %e, "cannot add VIP to lo"),
                            }
                        }
                        match (before, mode) {
                            (Some(Mode::Announce), Mode::Announce) => {}
                            (_, Mode::Announce) => {
                                debug!(%vip, iface = %self.iface, "taking over");
                                self.announce(*vip).await;
                                if self.timing.count > 1 {
                                    bursts.insert(*vip, Burst { left: self.timing.count - 1, next: Instant::now() + self.timing.interval });
                                }
                            }
                            (_, Mode::Drain) => {
                                bursts.remove(vip);
                            }
                        }
                    }
                    have = next;
                    if w.reannounce != reannounced {
                        reannounced = w.reannounce;
                        let at = Instant::now() + self.timing.reannounce_delay;
                        for (vip, _) in have.iter().filter(|(_, m)| **m == Mode::Announce) {
                            bursts.insert(*vip, Burst { left: self.timing.count.max(1), next: at });
                        }
                    }
                    suspects.retain(|v, _| have.get(v) == Some(&Mode::Announce));
                    if changed.is_err() {
                        // released VIPs stay on lo until their grace ends: connections the
                        // new owner forwards here (see `handover`) are still delivered
                        let last = unlink.values().max().copied();
                        if let Some(t) = last.filter(|t| *t > Instant::now()) {
                            sleep_until(t.min(Instant::now() + self.timing.release_grace)).await;
                        }
                        for (vip, _) in std::mem::take(&mut unlink) {
                            if added.remove(&vip) && let Err(e) = self.link.lo_del(vip) {
                                warn!(%vip, %e, "cannot remove VIP from lo");
                            }
                        }
                        return;
                    }
                }
                r = self.link.recv(false, &mut abuf) => {
                    let Ok(n) = r else { continue };
                    let Ok(a) = frames::parse_arp(&abuf[..n]) else { continue };
                    if a.sha == self.mac {
                        continue;
                    }
                    if a.op == 1
                        && a.spa != a.tpa
                        && have.get(&IpAddr::V4(a.tpa)) == Some(&Mode::Announce)
                        && let Err(e) = self.link.send(false, &frames::arp_reply(self.mac, &a)).await
                    {
                        debug!(%e, "ARP reply not sent");
                    }
                    let claimed = IpAddr::V4(a.spa);
                    if (a.op == 2 || a.spa == a.tpa) && have.get(&claimed) == Some(&Mode::Announce) {
                        suspects.entry(claimed).or_insert_with(Instant::now);
                    }
                }
                r = self.link.recv(true, &mut nbuf) => {
                    let Ok(n) = r else { continue };
                    let Ok(nd) = frames::parse_nd(&nbuf[..n]) else { continue };
                    if nd.src_mac == self.mac {
                        continue;
                    }
                    let target = IpAddr::V6(nd.target);
                    if have.get(&target) != Some(&Mode::Announce) {
                        continue;
                    }
                    if nd.kind == 135 {
                        if let Err(e) = self.link.send(true, &frames::na_reply(self.mac, &nd)).await {
                            debug!(%e, "NA not sent");
                        }
                    } else {
                        suspects.entry(target).or_insert_with(Instant::now);
                    }
                }
                () = sleep_until(wake) => {
                    let now = Instant::now();
                    let due: Vec<IpAddr> = bursts.iter().filter(|(_, b)| b.next <= now).map(|(v, _)| *v).collect();
                    for vip in due {
                        self.announce(vip).await;
                        if let Some(b) = bursts.get_mut(&vip) {
                            b.left -= 1;
                            b.next = now + self.timing.interval;
                            if b.left == 0 {
                                bursts.remove(&vip);
                            }
                        }
                    }
                    let gone: Vec<IpAddr> = unlink.iter().filter(|(_, t)| **t <= now).map(|(v, _)| *v).collect();
                    for vip in gone {
                        unlink.remove(&vip);
                        if added.remove(&vip) && let Err(e) = self.link.lo_del(vip) {
                            warn!(%vip, %e, "cannot remove VIP from lo");
                        }
                    }
                    let ripe: Vec<IpAddr> = suspects.iter().filter(|(_, t)| **t + self.timing.conflict_grace <= now).map(|(v, _)| *v).collect();
                    for vip in ripe {
                        suspects.remove(&vip);
                        if have.get(&vip) != Some(&Mode::Announce) {
                            continue;
                        }
                        if last_conflict.get(&vip).is_some_and(|t| now.saturating_duration_since(*t) < self.timing.conflict_grace) {
                            continue;
                        }
                        last_conflict.insert(vip, now);
                        *self.conflicts.lock().unwrap_or_else(|e| e.into_inner()).entry(vip).or_default() += 1;
                        warn!(%vip, iface = %self.iface, "another MAC answers for a VIP this node owns; announcing again");
                        self.announce(vip).await;
                    }
                    if let Some(r) = refresh && now >= next_refresh {
                        next_refresh = now + r;
                        let all: Vec<IpAddr> = have.iter().filter(|(_, m)| **m == Mode::Announce).map(|(v, _)| *v).collect();
                        for vip in all {
                            self.announce(vip).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod loopback_guard {
    use super::*;

    #[test]
    fn loopback_vips_are_never_added_to_or_removed_from_lo() {
        // An invalid ifindex would make any netlink call fail: Ok proves nothing was sent.
        for vip in ["127.0.0.1", "127.0.0.77", "::1"] {
            let vip: IpAddr = vip.parse().unwrap();
            assert!(matches!(lo_add(u32::MAX, vip), Ok(false)), "{vip}");
            assert!(lo_del(u32::MAX, vip).is_ok(), "{vip}");
        }
    }
}

#[cfg(test)]
mod tests;
