//! Logging a retried operation's outage once: when it starts and when it ends, not per attempt.
//!
//! During an API server outage every watch, the leader election and every failed write retry on
//! their own schedules; logging each attempt buried the log (an ERROR and a WARN every 2 s per
//! replica). An [`Outage`] says when a line is due: at the first failure and at the recovery.

/// Counts the failed attempts of one retried operation since its last success.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outage {
    failures: u64,
}

impl Outage {
    /// Records a failure; `true` for the first of an outage (log it), `false` for the others.
    pub fn failed(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// Records a success; the number of failed attempts of the outage that just ended, if one
    /// did (log it).
    pub fn recovered(&mut self) -> Option<u64> {
        let n = std::mem::take(&mut self.failures);
        (n > 0).then_some(n)
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let mut o = Outage::default();
        assert_eq!(o.recovered(), None, "no outage, nothing to say");
        assert!(o.failed());
        for _ in 0..29 {
            assert!(!o.failed(), "the same outage is not reported again");
        }
        assert_eq!(o.failures(), 30);
        assert_eq!(o.recovered(), Some(30));
        assert_eq!(o.recovered(), None);
        assert!(o.failed(), "a new outage is reported");
    }
}
