//! Passive outlier detection (Envoy's meaning) and the per-backend breaker state.
//!
//! `consecutive_failures` connect failures or resets in a row eject a backend for
//! `base_ejection_time × ejections` (capped at `max_ejection_time`); the service allows at most
//! `max_ejection_percent` of its backends ejected at once (but always at least one when the
//! percentage is non-zero, as Envoy does). When the ejection ends the backend is *half-open*: the
//! next connection probes it; a success closes the breaker, a failure ejects it again at once. The
//! ejection count decays to zero after the backend has stayed closed for `max_ejection_time`.
//!
//! Vocabulary (Envoy/Hystrix): *open* = traffic refused, *closed* = traffic flows. Pure: callers
//! pass `now`.

use model::{BreakerState, Outlier};
use tokio::time::{Duration, Instant};

/// One backend's outlier record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierState {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    half_open: bool,
    closed_since: Option<Instant>,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Counted, no ejection.
    Counted,
    /// Ejected until the instant.
    Ejected(Instant),
    /// Would eject but `max_ejection_percent` is reached.
    EjectionLimited,
}

/// Whether one more backend may be ejected when `ejected` of `total` already are.
pub fn may_eject(cfg: &Outlier, ejected: usize, total: usize) -> bool {
    if cfg.max_ejection_percent == 0 || total == 0 {
        return false;
    }
    ejected == 0 || (ejected as u64 + 1) * 100 <= u64::from(cfg.max_ejection_percent) * total as u64
}

impl OutlierState {
    /// Whether the backend is ejected at `now` (ending an expired ejection: half-open).
    pub fn is_ejected(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.ejected_until = None;
                self.half_open = true;
                false
            }
            None => false,
        }
    }

    /// Read-only view of [`Self::is_ejected`].
    pub fn ejected_at(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }

    /// Ejections so far (the multiplier of the next ejection time).
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// The breaker state at `now`, given whether the backend is at its connection limit.
    pub fn breaker(&self, now: Instant, at_limit: bool) -> BreakerState {
        if self.ejected_at(now) || at_limit {
            BreakerState::Open
        } else if self.half_open || self.ejected_until.is_some() {
            BreakerState::HalfOpen
        } else {
            BreakerState::Closed
        }
    }

    /// A connection succeeded.
    pub fn on_success(&mut self, cfg: &Outlier, now: Instant) {
        self.consecutive = 0;
        if self.half_open {
            self.half_open = false;
            self.closed_since = Some(now);
        }
        if let Some(since) = self.closed_since
            && now.saturating_duration_since(since) >= cfg.max_ejection_time
        {
            self.ejections = 0;
            self.closed_since = None;
        }
    }

    /// A connect failed or the backend reset a connection. `may_eject` comes from
    /// [`may_eject`] over the service's backends.
    pub fn on_failure(&mut self, cfg: &Outlier, now: Instant, may_eject: bool) -> FailureOutcome {
        if cfg.consecutive_failures == 0 {
            return FailureOutcome::Counted;
        }
        if self.ejected_at(now) {
            return FailureOutcome::Counted;
        }
        self.consecutive += 1;
        let probe_failed = self.half_open || self.ejected_until.is_some();
        if !probe_failed && self.consecutive < cfg.consecutive_failures {
            return FailureOutcome::Counted;
        }
        if !may_eject {
            return FailureOutcome::EjectionLimited;
        }
        self.ejections += 1;
        let time = ejection_time(cfg, self.ejections);
        let until = now + time;
        self.ejected_until = Some(until);
        self.half_open = false;
        self.consecutive = 0;
        self.closed_since = None;
        FailureOutcome::Ejected(until)
    }
}

/// `base_ejection_time × ejections`, capped at `max_ejection_time`.
pub fn ejection_time(cfg: &Outlier, ejections: u32) -> Duration {
    cfg.base_ejection_time
        .saturating_mul(ejections.max(1))
        .min(cfg.max_ejection_time.max(cfg.base_ejection_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(75),
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
            conntrack_events: false,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_run() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        assert_eq!(s.on_failure(&cfg(), t0, true), FailureOutcome::Counted);
        assert_eq!(s.on_failure(&cfg(), t0, true), FailureOutcome::Counted);
        s.on_success(&cfg(), t0);
        assert_eq!(s.on_failure(&cfg(), t0, true), FailureOutcome::Counted);
        assert_eq!(s.on_failure(&cfg(), t0, true), FailureOutcome::Counted);
        assert_eq!(
            s.on_failure(&cfg(), t0, true),
            FailureOutcome::Ejected(t0 + Duration::from_secs(30))
        );
        assert!(s.is_ejected(t0 + Duration::from_secs(29)));
        assert_eq!(s.breaker(t0, false), BreakerState::Open);
    }

    #[test]
    fn ejection_time_grows_with_count_and_is_capped() {
        assert_eq!(ejection_time(&cfg(), 1), Duration::from_secs(30));
        assert_eq!(ejection_time(&cfg(), 2), Duration::from_secs(60));
        assert_eq!(ejection_time(&cfg(), 3), Duration::from_secs(75));
    }

    #[test]
    fn expired_ejection_is_half_open_and_one_failure_ejects_again() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..3 {
            s.on_failure(&cfg(), t0, true);
        }
        let t1 = t0 + Duration::from_secs(31);
        assert!(!s.is_ejected(t1));
        assert_eq!(s.breaker(t1, false), BreakerState::HalfOpen);
        assert_eq!(
            s.on_failure(&cfg(), t1, true),
            FailureOutcome::Ejected(t1 + Duration::from_secs(60))
        );
    }

    #[test]
    fn half_open_success_closes_the_breaker() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..3 {
            s.on_failure(&cfg(), t0, true);
        }
        let t1 = t0 + Duration::from_secs(31);
        s.is_ejected(t1);
        s.on_success(&cfg(), t1);
        assert_eq!(s.breaker(t1, false), BreakerState::Closed);
        assert_eq!(s.breaker(t1, true), BreakerState::Open);
        // Closed for max_ejection_time: the multiplier decays.
        s.on_success(&cfg(), t1 + Duration::from_secs(80));
        assert_eq!(s.ejections(), 0);
    }

    #[test]
    fn max_ejection_percent_limits_ejections() {
        let c = cfg();
        assert!(may_eject(&c, 0, 1), "always at least one");
        assert!(may_eject(&c, 1, 4));
        assert!(!may_eject(&c, 2, 4));
        let mut s = OutlierState::default();
        let t0 = Instant::now();
        for _ in 0..2 {
            s.on_failure(&c, t0, false);
        }
        assert_eq!(s.on_failure(&c, t0, false), FailureOutcome::EjectionLimited);
        assert!(!s.is_ejected(t0));
    }

    #[test]
    fn zero_consecutive_failures_disables_detection() {
        let mut c = cfg();
        c.consecutive_failures = 0;
        let mut s = OutlierState::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(s.on_failure(&c, t0, true), FailureOutcome::Counted);
        }
    }
}
