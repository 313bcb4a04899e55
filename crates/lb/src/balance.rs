//! Backend choice: which backends may take a new connection, and which one does.
//!
//! Pure: the caller passes a [`Candidate`] snapshot per backend (health, ejection, breaker, active
//! connections) and a random source; no clocks, no sockets. Algorithms:
//! - smooth weighted round-robin (nginx's algorithm: every pick adds each weight to its current
//!   value, takes the largest, subtracts the total from it);
//! - weighted least connections (smallest `active / weight`, ties broken from a random start);
//! - power of two choices (two distinct random eligible backends, the less loaded wins);
//! - Maglev on the client address ([`crate::maglev`]), falling forward through the table past
//!   backends that may not take the connection, so only their keys move.
//!
//! Panic mode (Envoy's meaning): when the healthy share of the serving backends falls below
//! `panic_threshold_percent`, health and ejection are ignored and all of them are balanced over
//! rather than refusing traffic.

use model::Balance;
use rand::{Rng, RngExt};

use crate::maglev::Maglev;

/// Why a connection got no backend. The word is the log field, metric label and status text.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
pub enum Reason {
    /// The service has no backend with a non-zero weight.
    NoBackend,
    /// Every backend is down or ejected (and panic mode is off).
    NoHealthyBackend,
    /// Every eligible backend is at its `max_connections`.
    BreakerOpen,
    /// The service is at `max_service_connections`.
    ServiceLimit,
    /// `max_pending` connections are already waiting.
    QueueFull,
    /// Waited `queue_timeout` for a slot.
    QueueTimeout,
    /// Every connect attempt (first plus retries) failed.
    ConnectFailed,
    /// The node's connection budget (from its file-descriptor limit) is used up.
    NodeBudget,
    /// The `VIP:port` is at `max_udp_sessions`.
    SessionLimit,
    /// The client address is at `max_udp_sessions_per_client`.
    ClientLimit,
    /// This node is short of file descriptors or memory (`EMFILE`…): not the backend's fault.
    LocalResources,
}

impl Reason {
    /// The camel-case reason word.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoBackend => "noBackend",
            Reason::NoHealthyBackend => "noHealthyBackend",
            Reason::BreakerOpen => "breakerOpen",
            Reason::ServiceLimit => "serviceLimit",
            Reason::QueueFull => "queueFull",
            Reason::QueueTimeout => "queueTimeout",
            Reason::ConnectFailed => "connectFailed",
            Reason::NodeBudget => "nodeBudget",
            Reason::SessionLimit => "sessionLimit",
            Reason::ClientLimit => "clientLimit",
            Reason::LocalResources => "localResources",
        }
    }

    /// Whether waiting in the queue may help (a slot can free up).
    pub fn is_waitable(self) -> bool {
        matches!(self, Reason::BreakerOpen | Reason::ServiceLimit)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backend as a decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    /// Configured weight (0 = takes no new connections).
    pub weight: u32,
    /// The active check lets traffic through (up or not yet checked).
    pub healthy: bool,
    /// Outlier detection has ejected it.
    pub ejected: bool,
    /// At its per-backend `max_connections`.
    pub at_limit: bool,
    /// Open connections.
    pub active: u64,
    /// Already tried (and failed) for this connection.
    pub tried: bool,
}

impl Candidate {
    fn serving(&self) -> bool {
        self.weight > 0
    }
    fn healthy_now(&self) -> bool {
        self.serving() && self.healthy && !self.ejected
    }
}

/// Whether the service is in panic mode: fewer than `threshold_percent` of its serving backends
/// are healthy. A threshold of 0 disables panic mode.
pub fn panic_mode(candidates: &[Candidate], threshold_percent: u32) -> bool {
    let total = candidates.iter().filter(|c| c.serving()).count() as u64;
    let healthy = candidates.iter().filter(|c| c.healthy_now()).count() as u64;
    total > 0 && healthy * 100 < u64::from(threshold_percent) * total
}

/// The outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index of the chosen candidate.
    pub index: usize,
    /// Whether the choice ignored health (panic mode).
    pub panic: bool,
}

/// Per-backend-set picking state (round-robin current weights).
#[derive(Debug, Clone, Default)]
pub struct Picker {
    current: Vec<i64>,
}

impl Picker {
    /// Chooses a backend for a connection from `client_hash` (used by Maglev only).
    pub fn pick(
        &mut self,
        algo: Balance,
        candidates: &[Candidate],
        panic_threshold_percent: u32,
        maglev: Option<&Maglev>,
        client_hash: u64,
        rng: &mut impl Rng,
    ) -> Result<Choice, Reason> {
        if !candidates.iter().any(Candidate::serving) {
            return Err(Reason::NoBackend);
        }
        let panic = panic_mode(candidates, panic_threshold_percent);
        let in_pool = |c: &Candidate| {
            if panic {
                c.serving() && !c.tried
            } else {
                c.healthy_now() && !c.tried
            }
        };
        if !candidates.iter().any(in_pool) {
            return Err(Reason::NoHealthyBackend);
        }
        let ok = |c: &Candidate| in_pool(c) && !c.at_limit;
        if !candidates.iter().any(ok) {
            return Err(Reason::BreakerOpen);
        }
        let index = match algo {
            Balance::RoundRobin => self.round_robin(candidates, ok),
            Balance::LeastConnections => least_connections(candidates, ok, rng),
            Balance::PowerOfTwo => power_of_two(candidates, ok, rng),
            Balance::Maglev => match maglev
                .and_then(|m| m.lookup_where(client_hash, |i| candidates.get(i).is_some_and(ok)))
            {
                Some(i) => i,
                None => least_connections(candidates, ok, rng),
            },
        };
        Ok(Choice { index, panic })
    }

    fn round_robin(&mut self, candidates: &[Candidate], ok: impl Fn(&Candidate) -> bool) -> usize {
        if self.current.len() != candidates.len() {
            self.current = vec![0; candidates.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, c) in candidates.iter().enumerate() {
            if !ok(c) {
                continue;
            }
            let w = i64::from(c.weight);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best.expect("caller checked one candidate is ok");
        self.current[best] -= total;
        best
    }
}

/// `a.active / a.weight < b.active / b.weight`, without division.
fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    u128::from(a.active) * u128::from(b.weight) < u128::from(b.active) * u128::from(a.weight)
}

fn least_connections(
    candidates: &[Candidate],
    ok: impl Fn(&Candidate) -> bool,
    rng: &mut impl Rng,
) -> usize {
    let n = candidates.len();
    let start = rng.random_range(0..n);
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if ok(&candidates[i]) && best.is_none_or(|b| less_loaded(&candidates[i], &candidates[b])) {
            best = Some(i);
        }
    }
    best.expect("caller checked one candidate is ok")
}

fn power_of_two(
    candidates: &[Candidate],
    ok: impl Fn(&Candidate) -> bool,
    rng: &mut impl Rng,
) -> usize {
    let pool: Vec<usize> = (0..candidates.len())
        .filter(|&i| ok(&candidates[i]))
        .collect();
    if pool.len() == 1 {
        return pool[0];
    }
    let a = rng.random_range(0..pool.len());
    let mut b = rng.random_range(0..pool.len() - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (pool[a], pool[b]);
    if less_loaded(&candidates[b], &candidates[a]) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn up(weight: u32) -> Candidate {
        Candidate {
            weight,
            healthy: true,
            ..Candidate::default()
        }
    }

    fn picks(algo: Balance, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(7);
        (0..n)
            .map(|_| p.pick(algo, c, 50, None, 0, &mut rng).unwrap().index)
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        // nginx's example: weights 5,1,1 give a a b a c a a (never five a's in a row).
        let c = [up(5), up(1), up(1)];
        assert_eq!(picks(Balance::RoundRobin, &c, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_down_ejected_and_full_backends() {
        let mut c = [up(1), up(1), up(1), up(1)];
        c[1].healthy = false;
        c[2].ejected = true;
        c[3].at_limit = true;
        assert_eq!(picks(Balance::RoundRobin, &c, 3), vec![0, 0, 0]);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_per_weight() {
        let mut c = [up(1), up(2), up(1)];
        c[0].active = 3;
        c[1].active = 4; // 2 per weight
        c[2].active = 5;
        assert!(
            picks(Balance::LeastConnections, &c, 10)
                .iter()
                .all(|&i| i == 1)
        );
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_two() {
        let mut c = [up(1), up(1)];
        c[0].active = 10;
        assert!(picks(Balance::PowerOfTwo, &c, 20).iter().all(|&i| i == 1));
    }

    #[test]
    fn nothing_serving_is_no_backend() {
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        let r = p.pick(Balance::RoundRobin, &[up(0)], 50, None, 0, &mut rng);
        assert_eq!(r, Err(Reason::NoBackend));
    }

    #[test]
    fn all_down_without_panic_is_no_healthy_backend() {
        let mut c = [up(1), up(1)];
        c[0].healthy = false;
        c[1].healthy = false;
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        let r = p.pick(Balance::RoundRobin, &c, 0, None, 0, &mut rng);
        assert_eq!(r, Err(Reason::NoHealthyBackend));
    }

    #[test]
    fn panic_mode_balances_over_all_when_too_few_are_healthy() {
        let mut c = [up(1), up(1), up(1), up(1)];
        c[0].healthy = false;
        c[1].healthy = false;
        c[2].ejected = true; // 1 of 4 healthy = 25 % < 50 %
        assert!(panic_mode(&c, 50));
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        let got: std::collections::BTreeSet<usize> = (0..8)
            .map(|_| {
                let ch = p
                    .pick(Balance::RoundRobin, &c, 50, None, 0, &mut rng)
                    .unwrap();
                assert!(ch.panic);
                ch.index
            })
            .collect();
        assert_eq!(got.len(), 4);
        assert!(!panic_mode(&c, 25));
    }

    #[test]
    fn every_eligible_backend_full_is_breaker_open() {
        let mut c = [up(1), up(1)];
        c[0].at_limit = true;
        c[1].at_limit = true;
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            p.pick(Balance::PowerOfTwo, &c, 50, None, 0, &mut rng),
            Err(Reason::BreakerOpen)
        );
    }

    #[test]
    fn tried_backends_are_not_picked_again() {
        let mut c = [up(1), up(1)];
        c[0].tried = true;
        assert_eq!(picks(Balance::RoundRobin, &c, 3), vec![1, 1, 1]);
        c[1].tried = true;
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            p.pick(Balance::RoundRobin, &c, 50, None, 0, &mut rng),
            Err(Reason::NoHealthyBackend)
        );
    }

    #[test]
    fn maglev_moves_only_keys_of_a_down_backend() {
        let names = [("a", 1), ("b", 1), ("c", 1)];
        let m = Maglev::try_new(&names, 65537).unwrap();
        let mut c = [up(1), up(1), up(1)];
        let mut p = Picker::default();
        let mut rng = StdRng::seed_from_u64(1);
        let before: Vec<usize> = (0..2000u64)
            .map(|h| {
                p.pick(Balance::Maglev, &c, 0, Some(&m), h * 7919, &mut rng)
                    .unwrap()
                    .index
            })
            .collect();
        c[1].healthy = false;
        for (h, &b) in before.iter().enumerate() {
            let now = p
                .pick(Balance::Maglev, &c, 0, Some(&m), h as u64 * 7919, &mut rng)
                .unwrap()
                .index;
            if b != 1 {
                assert_eq!(now, b, "key {h} moved although its backend stayed up");
            } else {
                assert_ne!(now, 1);
            }
        }
    }
}
