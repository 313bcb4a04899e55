//! Active health state: HAProxy's `rise`/`fall` meaning, as a pure state machine.
//!
//! A backend starts [`Health::Unknown`] and is served (HAProxy starts servers up). Its first
//! passing check makes it [`Health::Up`]; `fall` consecutive failed checks make an up (or unknown)
//! backend [`Health::Down`]; `rise` consecutive passing checks bring a down backend back up. A
//! result in the current direction resets the opposite run. No clocks: the driver in
//! [`crate::check`] schedules checks and feeds results.

use model::Health;

/// The rise/fall counter of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    health: Health,
    /// Consecutive results pointing away from `health`.
    run: u32,
    rise: u32,
    fall: u32,
}

/// A change of health, returned by [`RiseFall::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: Health,
    /// After.
    pub to: Health,
}

impl RiseFall {
    /// A new, unchecked backend. `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            health: Health::Unknown,
            run: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one check result; returns the transition if health changed.
    pub fn observe(&mut self, passed: bool) -> Option<Transition> {
        let from = self.health;
        let to = match (from, passed) {
            (Health::Unknown, true) => Health::Up,
            (Health::Up, true) | (Health::Down, false) => {
                self.run = 0;
                return None;
            }
            (Health::Unknown | Health::Up, false) => {
                self.run += 1;
                if self.run < self.fall {
                    return None;
                }
                Health::Down
            }
            (Health::Down, true) => {
                self.run += 1;
                if self.run < self.rise {
                    return None;
                }
                Health::Up
            }
        };
        self.run = 0;
        self.health = to;
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(rf: &mut RiseFall, results: &[bool]) -> Vec<Health> {
        results
            .iter()
            .map(|&r| {
                rf.observe(r);
                rf.health()
            })
            .collect()
    }

    #[test]
    fn first_passing_check_makes_an_unknown_backend_up() {
        let mut rf = RiseFall::new(2, 3);
        assert_eq!(
            rf.observe(true),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Up
            })
        );
    }

    #[test]
    fn up_backend_goes_down_after_fall_consecutive_failures() {
        use Health::*;
        let mut rf = RiseFall::new(2, 3);
        assert_eq!(
            feed(&mut rf, &[true, false, false, true, false, false, false]),
            vec![Up, Up, Up, Up, Up, Up, Down]
        );
    }

    #[test]
    fn down_backend_needs_rise_consecutive_passes() {
        use Health::*;
        let mut rf = RiseFall::new(3, 1);
        assert_eq!(
            feed(&mut rf, &[false, true, true, false, true, true, true]),
            vec![Down, Down, Down, Down, Down, Down, Up]
        );
    }

    #[test]
    fn flapping_backend_never_changes_state() {
        let mut rf = RiseFall::new(2, 2);
        rf.observe(true);
        for i in 0..20 {
            assert_eq!(rf.observe(i % 2 == 0), None);
        }
        assert_eq!(rf.health(), Health::Up);
    }
}
