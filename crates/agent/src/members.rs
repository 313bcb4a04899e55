//! Liveness of peers from direct heartbeats: a pure table driven with explicit instants.
//!
//! A peer is *alive* while its last heartbeat is younger than `misses × interval` (the larger
//! of ours and the one it advertises) and it has not announced that it is leaving. A leaving
//! peer stays gone until it comes back with a newer epoch (a restart).

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    interval: Duration,
    misses: u32,
}

impl Table {
    /// A table of configured peers, none heard yet.
    pub fn new(
        peers: impl IntoIterator<Item = (NodeId, SocketAddr)>,
        interval: Duration,
        misses: u32,
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
            interval,
            misses,
        }
    }

    /// Replaces the configured peers, keeping what is known about those that stay.
    pub fn set_peers(
        &mut self,
        peers: impl IntoIterator<Item = (NodeId, SocketAddr)>,
        interval: Duration,
        misses: u32,
    ) {
        let mut next = Table::new(peers, interval, misses);
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
        self.interval.max(p.hb.interval) * self.misses
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
        p.hb = hb;
        let p = &self.peers[name];
        let after = (
            self.is_alive(p, now),
            p.hb.facts.clone(),
            p.hb.claims.clone(),
        );
        Ok(before.as_ref() != Some(&after))
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
            4,
        )
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(40),
            ..Default::default()
        }
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
