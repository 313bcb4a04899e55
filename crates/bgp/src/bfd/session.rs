//! One BFD session in asynchronous mode (RFC 5880 §6.8), as a pure state machine: received
//! packets and the clock go in, packets to send and state changes come out. The driver owns
//! the socket and sleeps until [`Session::next_deadline`].
//!
//! The rules it follows, quoted from RFC 5880:
//!
//! - §6.8.6 (reception): "If bfd.SessionState is AdminDown: Discard the packet." "If received
//!   state is AdminDown: If bfd.SessionState is not Down: Set bfd.LocalDiag to 3 (Neighbor
//!   signaled session down), Set bfd.SessionState to Down." Else "If bfd.SessionState is Down:
//!   If received State is Down: Set bfd.SessionState to Init. Else if received State is Init:
//!   Set bfd.SessionState to Up." "Else if bfd.SessionState is Init: If received State is Init
//!   or Up: Set bfd.SessionState to Up." "Else (bfd.SessionState is Up): If received State is
//!   Down: Set bfd.LocalDiag to 3 (Neighbor signaled session down), Set bfd.SessionState to
//!   Down." "If the Poll (P) bit is set, send a BFD Control packet to the remote system with
//!   the Poll (P) bit clear, and the Final (F) bit set".
//! - §6.8.4 (detection): "the Detection Time ... is equal to the value of Detect Mult received
//!   from the remote system, multiplied by the agreed transmit interval of the remote system
//!   (the greater of bfd.RequiredMinRxInterval and the last received Desired Min TX
//!   Interval)." When it passes without a packet in Init or Up: state Down, diag 1 (Control
//!   Detection Time Expired).
//! - §6.8.7 (transmission): the interval is the greater of bfd.DesiredMinTxInterval and the
//!   last received Required Min RX Interval, "reduced by a random value of 0 to 25%" ("... not
//!   more than 90%" of it when Detect Mult is 1). "When bfd.SessionState is not Up, the system
//!   MUST set bfd.DesiredMinTxInterval to a value of not less than one second".
//! - §6.8.3 (timer changes): a change of the desired intervals while Up starts a Poll Sequence;
//!   a faster transmit interval takes effect only when the Final arrives.

use std::time::Duration;

use tokio::time::Instant;

use super::{Control, State};

/// While not Up, packets go out at most once a second (§6.8.3).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// Timers of a session (the profile): what this side wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Desired minimum transmit interval once Up.
    pub desired_min_tx: Duration,
    /// Required minimum receive interval.
    pub required_min_rx: Duration,
    /// Detect multiplier sent to the peer.
    pub detect_mult: u8,
}

impl Timers {
    /// 300 ms × 3: FRR's and BIRD's default, portico's default profile.
    pub const DEFAULT: Timers = Timers {
        desired_min_tx: Duration::from_millis(300),
        required_min_rx: Duration::from_millis(300),
        detect_mult: 3,
    };
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this packet now.
    Send(Control),
    /// The session changed state (to be logged, counted, and acted on: Down tears the BGP
    /// session down at once).
    Changed {
        /// Previous state.
        from: State,
        /// New state.
        to: State,
        /// The diagnostic (1 detection time expired, 3 neighbor signaled down, 7 admin down).
        diag: u8,
    },
}

/// One session.
#[derive(Debug, Clone)]
pub struct Session {
    timers: Timers,
    state: State,
    diag: u8,
    local_disc: u32,
    remote_disc: u32,
    remote_state: State,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_detect_mult: u8,
    /// Transmit interval in use (changes to a faster one wait for the Final).
    tx_base: Duration,
    /// A Poll Sequence is in progress.
    polling: bool,
    /// A Final is owed for a received Poll.
    owe_final: bool,
    last_rx: Option<Instant>,
    next_tx: Instant,
    /// xorshift state for the transmit jitter.
    rng: u64,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Session {
    /// A session in Down with local discriminator `local_disc` (non-zero, unique per session),
    /// sending its first packet at `now`.
    pub fn new(local_disc: u32, timers: Timers, now: Instant) -> Self {
        Self {
            timers,
            state: State::Down,
            diag: 0,
            local_disc: local_disc.max(1),
            remote_disc: 0,
            remote_state: State::Down,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_detect_mult: 0,
            tx_base: SLOW_TX,
            polling: false,
            owe_final: false,
            last_rx: None,
            next_tx: now,
            rng: u64::from(local_disc.max(1)) | 0x9e37_79b9_0000_0000,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The local diagnostic.
    pub fn diag(&self) -> u8 {
        self.diag
    }

    /// The detection time: how long without a packet before the session goes Down (zero
    /// before anything was received).
    pub fn detection_time(&self) -> Duration {
        self.timers
            .required_min_rx
            .max(self.remote_desired_tx)
            .saturating_mul(u32::from(self.remote_detect_mult))
    }

    /// When the driver must call [`Session::tick`] next.
    pub fn next_deadline(&self) -> Instant {
        match (self.state, self.last_rx) {
            (State::Init | State::Up, Some(rx)) => self.next_tx.min(rx + self.detection_time()),
            _ => self.next_tx,
        }
    }

    fn desired_tx(&self) -> Duration {
        if self.state == State::Up {
            self.timers.desired_min_tx
        } else {
            self.timers.desired_min_tx.max(SLOW_TX)
        }
    }

    fn packet(&self, poll: bool, fin: bool) -> Control {
        Control {
            diag: self.diag,
            state: self.state,
            poll,
            fin,
            cpi: false,
            demand: false,
            detect_mult: self.timers.detect_mult,
            my_disc: self.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: micros(self.desired_tx()),
            required_min_rx: micros(self.timers.required_min_rx),
            required_min_echo_rx: 0,
        }
    }

    /// 75–100 % of the interval (75–90 % with a detect multiplier of 1).
    fn jittered(&mut self, base: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = if self.timers.detect_mult == 1 { 15 } else { 25 };
        let cut = (self.rng % (span + 1)) as u32;
        base * (100 - cut - if span == 15 { 10 } else { 0 }) / 100
    }

    fn schedule_tx(&mut self, now: Instant) {
        let base = self.tx_base.max(self.remote_min_rx);
        let d = self.jittered(base);
        self.next_tx = now + d;
    }

    fn set_state(&mut self, to: State, diag: u8, out: &mut Vec<Action>) {
        if to == self.state {
            return;
        }
        let from = self.state;
        self.state = to;
        self.diag = diag;
        out.push(Action::Changed { from, to, diag });
        // The advertised Desired Min TX changes with Up (1 s floor while not Up): a Poll
        // Sequence tells the peer (§6.8.3).
        if to == State::Up {
            self.polling = true;
        } else {
            self.tx_base = SLOW_TX.max(self.timers.desired_min_tx);
            self.polling = false;
        }
    }

    /// A packet arrived (already checked by [`Control::decode`]; the driver routes it here by
    /// Your Discriminator, or by address while that is zero).
    pub fn receive(&mut self, p: &Control, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::AdminDown {
            return out;
        }
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_min_rx =
            Duration::from_micros(u64::from(p.required_min_rx)).max(Duration::from_micros(1));
        self.remote_desired_tx = Duration::from_micros(u64::from(p.desired_min_tx));
        self.remote_detect_mult = p.detect_mult;
        self.last_rx = Some(now);
        // A Final ends our Poll Sequence: the faster interval applies now (§6.8.3).
        if p.fin && self.polling {
            self.polling = false;
            self.tx_base = self.desired_tx();
            // A packet scheduled on the slow interval would come later than the peer's new
            // detection time allows: send on the new interval from now.
            if self.next_tx > now + self.tx_base.max(self.remote_min_rx) {
                self.schedule_tx(now);
            }
        }
        match (p.state, self.state) {
            (State::AdminDown, s) if s != State::Down => self.set_state(State::Down, 3, &mut out),
            (State::AdminDown, _) => {}
            (State::Down, State::Down) => self.set_state(State::Init, 0, &mut out),
            (State::Init, State::Down) => self.set_state(State::Up, 0, &mut out),
            (State::Init | State::Up, State::Init) => self.set_state(State::Up, 0, &mut out),
            (State::Down, State::Up) => self.set_state(State::Down, 3, &mut out),
            _ => {}
        }
        if p.poll {
            // "send a BFD Control packet ... with the Poll (P) bit clear, and the Final (F)
            // bit set" — at once, not on the periodic schedule.
            self.owe_final = false;
            out.push(Action::Send(self.packet(false, true)));
        }
        if out.iter().any(|a| matches!(a, Action::Changed { .. })) {
            // Tell the peer of the change at once.
            out.push(Action::Send(self.packet(self.polling, false)));
            self.schedule_tx(now);
        }
        out
    }

    /// Time passed: sends the periodic packet when due and expires the peer when the detection
    /// time passed without a packet.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let (State::Init | State::Up, Some(rx)) = (self.state, self.last_rx)
            && now >= rx + self.detection_time()
        {
            self.set_state(State::Down, 1, &mut out);
            self.remote_disc = 0;
            self.last_rx = None;
        }
        if now >= self.next_tx && self.state != State::AdminDown {
            out.push(Action::Send(self.packet(self.polling, self.owe_final)));
            self.owe_final = false;
            self.schedule_tx(now);
        }
        out
    }

    /// Takes the session administratively down (a graceful stop: the peer sees AdminDown and
    /// must not count it as a failure) or back up.
    pub fn set_admin_down(&mut self, down: bool, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if down {
            self.set_state(State::AdminDown, 7, &mut out);
            out.push(Action::Send(self.packet(false, false)));
        } else if self.state == State::AdminDown {
            self.set_state(State::Down, 0, &mut out);
            self.next_tx = now;
        }
        out
    }
}

#[cfg(test)]
mod tests;
