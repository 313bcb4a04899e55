//! SWIM membership through `foca`: our identity type, a collecting runtime and a timer queue.
//!
//! foca is sans-I/O: it is fed packets ([`Swim::handle_data`]) and timer events
//! ([`Swim::fire_due`]); what it wants sent, scheduled or told comes back in an [`Output`]
//! that the tokio driver turns into sealed UDP packets. SWIM gives the cluster its membership
//! (who exists, at which address, gossiped joins and graceful leaves); the per-VIP failover
//! decision uses the faster direct heartbeat (`members`), see the crate docs for why.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use foca::{
    Foca, NoCustomBroadcast, Notification, OwnedNotification, PostcardCodec, Runtime, Timer,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Errors from foca.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// foca rejected input or could not encode.
    #[error("swim: {0}")]
    Foca(String),
}

impl From<foca::Error> for Error {
    fn from(e: foca::Error) -> Self {
        Error::Foca(e.to_string())
    }
}

/// A member's identity: its name, gossip address and a start-time bump (a restarted node
/// wins over its old identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Id {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Start time (µs), bumped on renewal.
    pub bump: u64,
}

impl foca::Identity for Id {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Id {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What foca asked for during one call.
#[derive(Debug, Default)]
pub struct Output {
    /// Packets to send.
    pub send: Vec<(Id, Vec<u8>)>,
    /// Membership changes.
    pub notes: Vec<OwnedNotification<Id>>,
}

struct Collect<'a> {
    out: &'a mut Output,
    timers: &'a mut BTreeMap<(Instant, u64), Timer<Id>>,
    seq: &'a mut u64,
    now: Instant,
}

impl Runtime<Id> for Collect<'_> {
    fn notify(&mut self, n: Notification<'_, Id>) {
        self.out.notes.push(n.to_owned());
    }
    fn send_to(&mut self, to: Id, data: &[u8]) {
        self.out.send.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<Id>, after: Duration) {
        *self.seq += 1;
        self.timers.insert((self.now + after, *self.seq), event);
    }
}

/// foca plus its pending timers.
pub struct Swim {
    foca: Foca<Id, PostcardCodec, SmallRng, NoCustomBroadcast>,
    timers: BTreeMap<(Instant, u64), Timer<Id>>,
    seq: u64,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Swim({:?}, {} timers)",
            self.foca.identity(),
            self.timers.len()
        )
    }
}

/// SWIM settings: memberlist's LAN profile with a faster probe for the fast profile.
pub fn config(cluster_size: usize, fast: bool) -> foca::Config {
    let n = NonZeroU32::new(u32::try_from(cluster_size.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(n);
    if fast {
        c.probe_period = Duration::from_millis(500);
        c.probe_rtt = Duration::from_millis(200);
    }
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(500),
        num_members: std::num::NonZeroUsize::MIN.saturating_add(1),
    });
    c
}

impl Swim {
    /// A SWIM instance for `me`.
    pub fn new(me: Id, config: foca::Config, seed: u64) -> Self {
        Self {
            foca: Foca::new(me, config, SmallRng::seed_from_u64(seed), PostcardCodec),
            timers: BTreeMap::new(),
            seq: 0,
        }
    }

    fn with<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Foca<Id, PostcardCodec, SmallRng, NoCustomBroadcast>, &mut Collect<'_>) -> R,
    ) -> (R, Output) {
        let mut out = Output::default();
        let mut rt = Collect {
            out: &mut out,
            timers: &mut self.timers,
            seq: &mut self.seq,
            now,
        };
        let r = f(&mut self.foca, &mut rt);
        (r, out)
    }

    /// Asks `peer` (by name and address; its bump is unknown) to let us in.
    pub fn announce(
        &mut self,
        name: &str,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<Output, Error> {
        let (r, out) = self.with(now, |f, rt| {
            f.announce(
                Id {
                    name: name.into(),
                    addr,
                    bump: 0,
                },
                rt,
            )
        });
        r?;
        Ok(out)
    }

    /// Feeds a received SWIM packet.
    pub fn handle_data(&mut self, data: &[u8], now: Instant) -> Result<Output, Error> {
        let (r, out) = self.with(now, |f, rt| f.handle_data(data, rt));
        r?;
        Ok(out)
    }

    /// When the next timer is due.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(t, _)| *t)
    }

    /// Fires every timer due at `now`.
    pub fn fire_due(&mut self, now: Instant) -> Result<Output, Error> {
        let mut all = Output::default();
        for _ in 0..1024 {
            let Some(entry) = self.timers.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            let (r, out) = self.with(now, |f, rt| f.handle_timer(timer, rt));
            r?;
            all.send.extend(out.send);
            all.notes.extend(out.notes);
        }
        Ok(all)
    }

    /// Declares ourselves down to a few members (graceful leave).
    pub fn leave(&mut self, now: Instant) -> Result<Output, Error> {
        let (r, out) = self.with(now, |f, rt| f.leave_cluster(rt));
        r?;
        Ok(out)
    }

    /// Members foca considers active.
    pub fn active(&self) -> Vec<Id> {
        self.foca.iter_members().map(|m| m.id().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three foca instances exchanging packets in memory converge on full membership.
    #[test]
    fn three_members_converge_in_memory() {
        let t0 = Instant::now();
        let ids: Vec<Id> = (0..3)
            .map(|i| Id {
                name: format!("n{i}"),
                addr: format!("10.0.0.{}:7946", i + 1).parse().unwrap(),
                bump: 1,
            })
            .collect();
        let mut nodes: Vec<Swim> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Swim::new(id.clone(), config(3, false), i as u64))
            .collect();
        let mut queue: Vec<(Id, Vec<u8>)> = Vec::new();
        for n in nodes.iter_mut().skip(1) {
            queue.extend(n.announce("n0", ids[0].addr, t0).unwrap().send);
        }
        let mut now = t0;
        for _ in 0..200 {
            for (to, data) in std::mem::take(&mut queue) {
                let i = ids.iter().position(|x| x.name == to.name).unwrap();
                queue.extend(nodes[i].handle_data(&data, now).unwrap().send);
            }
            now += Duration::from_millis(50);
            for n in nodes.iter_mut() {
                queue.extend(n.fire_due(now).unwrap().send);
            }
        }
        for n in &nodes {
            assert_eq!(n.active().len(), 2, "{n:?}");
        }
    }
}
