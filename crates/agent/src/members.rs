//! Liveness of peers from direct heartbeats: a pure table driven with explicit instants.
//!
//! A peer is *alive* while its last heartbeat is younger than the profile's dead-after time
//! (scaled up when the peer advertises a longer heartbeat interval than ours) and it has not announced that it is leaving. A leaving
//! peer stays gone until it comes back with a newer epoch (a restart).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use model::NodeId;
use tokio::time::Instant;

use crate::owner::MemberView;
use crate::wire::Heartbeat;

/// Errors of the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A heartbeat from a name that is not a configured peer.
    #[error("heartbeat from unknown node {0}")]
    Unknown(String),
}

/// What we know about one peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Configured gossip address.
    pub address: SocketAddr,
    /// Last heartbeat.
    pub last: Option<Instant>,
    /// Start of the current alive stretch.
    pub since: Option<Instant>,
    /// Its epoch (start time) as seen in the envelope.
    pub epoch: u64,
    /// The epoch in which it announced leaving.
    pub left: Option<u64>,
    /// Its last heartbeat.
    pub hb: Heartbeat,
}

/// The peer table.
#[derive(Debug, Clone)]
pub struct Table {
    /// Peers by name.
    pub peers: BTreeMap<NodeId, Peer>,
    /// The peer last heard claiming each VIP (kept after it stops claiming: a leaving peer
    /// sends empty claims, and the next owner still needs to know whom it takes over from).
    claimed: BTreeMap<IpAddr, NodeId>,
    interval: Duration,
    dead: Duration,
}

impl Table {
    /// A table of configured peers, none heard yet.
    pub fn new(
        peers: impl IntoIterator<Item = (NodeId, SocketAddr)>,
        interval: Duration,
        dead: Duration,
    ) -> Self {
        Self {
            peers: peers
                .into_iter()
                .map(|(n, address)| {
                    (
                        n,
                        Peer {
                            address,
                            last: None,
                            since: None,
                            epoch: 0,
                            left: None,
                            hb: Heartbeat::default(),
                        },
                    )
                })
                .collect(),
            claimed: BTreeMap::new(),
            interval,
            dead,
        }
    }

    /// Replaces the configured peers, keeping what is known about those that stay.
    pub fn set_peers(
        &mut self,
        peers: impl IntoIterator<Item = (NodeId, SocketAddr)>,
        interval: Duration,
        dead: Duration,
    ) {
        let mut next = Table::new(peers, interval, dead);
        next.claimed = std::mem::take(&mut self.claimed);
        next.claimed.retain(|_, n| next.peers.contains_key(n));
        for (n, p) in next.peers.iter_mut() {
            if let Some(old) = self.peers.remove(n) {
                *p = Peer {
                    address: p.address,
                    ..old
                };
            }
        }
        *self = next;
    }

    fn dead_after(&self, p: &Peer) -> Duration {
        if p.hb.interval > self.interval && !self.interval.is_zero() {
            self.dead
                .mul_f64(p.hb.interval.as_secs_f64() / self.interval.as_secs_f64())
        } else {
            self.dead
        }
    }

    fn is_alive(&self, p: &Peer, now: Instant) -> bool {
        p.left.is_none_or(|e| p.epoch > e)
            && p.last
                .is_some_and(|l| now.saturating_duration_since(l) <= self.dead_after(p))
    }

    /// Records a heartbeat; returns whether anything the owner function reads changed.
    pub fn heard(
        &mut self,
        name: &str,
        epoch: u64,
        hb: Heartbeat,
        now: Instant,
    ) -> Result<bool, Error> {
        let before = self.peers.get(name).map(|p| {
            (
                self.is_alive(p, now),
                p.hb.facts.clone(),
                p.hb.claims.clone(),
            )
        });
        let p = self
            .peers
            .get_mut(name)
            .ok_or_else(|| Error::Unknown(name.into()))?;
        if epoch < p.epoch {
            return Ok(false);
        }
        let was = before.as_ref().is_some_and(|b| b.0);
        if hb.leaving {
            p.left = Some(epoch);
        }
        if !was {
            p.since = Some(now);
        }
        p.epoch = epoch;
        p.last = Some(now);
        for v in &hb.claims {
            self.claimed.insert(*v, name.to_string());
        }
        p.hb = hb;
        let p = &self.peers[name];
        let after = (
            self.is_alive(p, now),
            p.hb.facts.clone(),
            p.hb.claims.clone(),
        );
        Ok(before.as_ref() != Some(&after))
    }

    /// The peer `vip` is being handed over from, if it can still serve connections: the last
    /// peer heard claiming it, provided it was heard within its dead-after time (alive, or
    /// leaving gracefully right now). A peer that died silently gets nothing forwarded.
    pub fn handing_over(&self, vip: &IpAddr, now: Instant) -> Option<(&NodeId, SocketAddr)> {
        let name = self.claimed.get(vip)?;
        let p = self.peers.get(name)?;
        let heard = p.last?;
        (now.saturating_duration_since(heard) <= self.dead_after(p)).then_some((name, p.address))
    }

    /// This node was stalled from `at` for `by` (until `now`): every peer alive at `at` is
    /// treated as heard `by` later (never later than `now`), so the stall does not count as
    /// its silence.
    pub fn forgive(&mut self, at: Instant, by: Duration, now: Instant) {
        let alive: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| self.is_alive(p, at))
            .map(|(n, _)| n.clone())
            .collect();
        for n in alive {
            if let Some(p) = self.peers.get_mut(&n)
                && let Some(l) = p.last
            {
                p.last = Some((l + by).min(now));
            }
        }
    }

    /// Whether `name` is alive at `now`.
    pub fn alive(&self, name: &str, now: Instant) -> bool {
        self.peers.get(name).is_some_and(|p| self.is_alive(p, now))
    }

    /// The alive peers as the owner function sees them.
    pub fn views(&self, now: Instant) -> BTreeMap<NodeId, MemberView> {
        self.peers
            .iter()
            .filter(|(_, p)| self.is_alive(p, now))
            .map(|(n, p)| {
                (
                    n.clone(),
                    MemberView {
                        alive_for: p
                            .since
                            .map(|s| now.saturating_duration_since(s))
                            .unwrap_or_default(),
                        facts: p.hb.facts.clone(),
                        claims: p.hb.claims.clone(),
                    },
                )
            })
            .collect()
    }

    /// The earliest instant at which an alive peer would expire (to wake up for it).
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| self.is_alive(p, now))
            .filter_map(|p| {
                p.last
                    .map(|l| l + self.dead_after(p) + Duration::from_millis(1))
            })
            .min()
    }

    /// `alive`, `suspect` (a heartbeat is overdue) or `down`, per peer.
    pub fn states(&self, now: Instant) -> Vec<(NodeId, SocketAddr, &'static str)> {
        self.peers
            .iter()
            .map(|(n, p)| {
                let state = if !self.is_alive(p, now) {
                    "down"
                } else if p.last.is_some_and(|l| {
                    now.saturating_duration_since(l) > self.interval.max(p.hb.interval) * 2
                }) {
                    "suspect"
                } else {
                    "alive"
                };
                (n.clone(), p.address, state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::new(
            [("b".to_string(), "10.0.0.2:7946".parse().unwrap())],
            Duration::from_millis(40),
            Duration::from_millis(160),
        )
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(40),
            ..Default::default()
        }
    }

    #[test]
    fn handover_source_is_the_last_claimer_while_it_is_heard_from() {
        let t0 = Instant::now();
        let vip: IpAddr = "10.99.0.100".parse().unwrap();
        let mut t = table();
        assert_eq!(t.handing_over(&vip, t0), None, "nobody claimed it");
        let claiming = Heartbeat {
            claims: [vip].into(),
            ..hb()
        };
        t.heard("b", 1, claiming, t0).unwrap();
        // a graceful leave: empty claims, but b is still heard from and keeps serving
        let leaving = Heartbeat {
            leaving: true,
            ..hb()
        };
        let t1 = t0 + Duration::from_millis(40);
        t.heard("b", 1, leaving, t1).unwrap();
        assert!(!t.alive("b", t1));
        let (name, addr) = t.handing_over(&vip, t1).expect("leaving peer");
        assert_eq!(
            (name.as_str(), addr),
            ("b", "10.0.0.2:7946".parse().unwrap())
        );
        // silent for longer than dead-after: it died, nothing is forwarded to it
        assert_eq!(t.handing_over(&vip, t1 + Duration::from_millis(161)), None);
    }

    #[test]
    fn alive_until_misses_then_down_and_back() {
        let t0 = Instant::now();
        let mut t = table();
        assert!(!t.alive("b", t0));
        assert!(t.heard("b", 1, hb(), t0).unwrap());
        assert!(t.alive("b", t0 + Duration::from_millis(160)));
        assert_eq!(t.states(t0 + Duration::from_millis(100))[0].2, "suspect");
        assert!(!t.alive("b", t0 + Duration::from_millis(161)));
        assert_eq!(t.next_expiry(t0), Some(t0 + Duration::from_millis(161)));
        // back: a new alive stretch starts
        let t1 = t0 + Duration::from_secs(1);
        assert!(t.heard("b", 1, hb(), t1).unwrap());
        assert_eq!(
            t.views(t1 + Duration::from_millis(30))["b"].alive_for,
            Duration::from_millis(30)
        );
        assert!(
            !t.heard("b", 1, hb(), t1 + Duration::from_millis(40))
                .unwrap(),
            "nothing changed"
        );
        assert!(t.heard("x", 1, hb(), t1).is_err());
    }

    #[test]
    fn leaving_is_immediate_until_a_restart() {
        let t0 = Instant::now();
        let mut t = table();
        t.heard("b", 5, hb(), t0).unwrap();
        assert!(
            t.heard(
                "b",
                5,
                Heartbeat {
                    leaving: true,
                    ..hb()
                },
                t0
            )
            .unwrap()
        );
        assert!(!t.alive("b", t0));
        t.heard("b", 5, hb(), t0).unwrap();
        assert!(!t.alive("b", t0), "same epoch stays gone");
        t.heard("b", 4, hb(), t0).unwrap();
        assert!(!t.alive("b", t0), "older epoch ignored");
        t.heard("b", 6, hb(), t0).unwrap();
        assert!(t.alive("b", t0), "restarted");
    }
}
