//! Two sessions wired back to back, replayed in 1 ms steps of made-up time: the three-way
//! handshake, the Poll Sequence, jittered transmission, detection at exactly the detection
//! time, a neighbour signalling Down and AdminDown.

use super::*;

const FAST: Timers = Timers {
    desired_min_tx: Duration::from_millis(10),
    required_min_rx: Duration::from_millis(10),
    detect_mult: 3,
};

/// Two sessions and the link between them (packets arrive in the same millisecond).
struct Pair {
    a: Session,
    b: Session,
    t0: Instant,
    now: Instant,
    /// Whether b's packets reach a, and a's reach b.
    b_to_a: bool,
    a_to_b: bool,
    /// Every (time since t0, sender, packet) sent, and every change seen.
    sent: Vec<(Duration, char, Control)>,
    changes: Vec<(Duration, char, State, State, u8)>,
}

impl Pair {
    fn new(timers: Timers) -> Self {
        let t0 = Instant::now();
        Pair {
            a: Session::new(0x0a, timers, t0),
            b: Session::new(0x0b, timers, t0 + Duration::from_millis(3)),
            t0,
            now: t0,
            b_to_a: true,
            a_to_b: true,
            sent: Vec::new(),
            changes: Vec::new(),
        }
    }

    /// Delivers `actions` of `from` (and whatever they cause) until nothing is left.
    fn deliver(&mut self, from: char, actions: Vec<Action>) {
        let mut queue: Vec<(char, Action)> = actions.into_iter().map(|a| (from, a)).collect();
        while let Some((who, action)) = queue.pop() {
            let at = self.now - self.t0;
            match action {
                Action::Changed { from: f, to, diag } => self.changes.push((at, who, f, to, diag)),
                Action::Send(p) => {
                    self.sent.push((at, who, p));
                    let (to, up) = if who == 'a' {
                        (&mut self.b, self.a_to_b)
                    } else {
                        (&mut self.a, self.b_to_a)
                    };
                    if up {
                        let other = if who == 'a' { 'b' } else { 'a' };
                        let now = self.now;
                        queue.extend(to.receive(&p, now).into_iter().map(|a| (other, a)));
                    }
                }
            }
        }
    }

    /// Runs for `d` in 1 ms steps.
    fn run(&mut self, d: Duration) {
        let until = self.now + d;
        while self.now < until {
            self.now += Duration::from_millis(1);
            let now = self.now;
            let acts = self.a.tick(now);
            self.deliver('a', acts);
            let acts = self.b.tick(now);
            self.deliver('b', acts);
        }
    }
}

#[test]
fn three_way_handshake_then_the_poll_sequence_speeds_transmission_up() {
    let mut p = Pair::new(Timers::DEFAULT);
    p.run(Duration::from_secs(3));
    assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    // a went Down → Init → Up (it heard b's Down, then b's Init), b Down → Up.
    let a: Vec<(State, State)> = p
        .changes
        .iter()
        .filter(|c| c.1 == 'a')
        .map(|c| (c.2, c.3))
        .collect();
    assert!(
        a == [(State::Down, State::Init), (State::Init, State::Up)]
            || a == [(State::Down, State::Up)],
        "{a:?}"
    );
    // Before Up, packets were at least 750 ms apart (1 s less 25 % jitter); once the Poll
    // Sequence completed, 225–300 ms apart (300 ms less up to 25 %).
    let up_at = p.changes.iter().map(|c| c.0).max().unwrap();
    let a_sent: Vec<(Duration, Control)> = p
        .sent
        .iter()
        .filter(|s| s.1 == 'a')
        .map(|s| (s.0, s.2))
        .collect();
    let periodic: Vec<Duration> = a_sent
        .windows(2)
        .filter(|w| w[1].0 > up_at + Duration::from_secs(1))
        .map(|w| w[1].0 - w[0].0)
        .collect();
    assert!(!periodic.is_empty());
    for gap in &periodic {
        assert!(
            (Duration::from_millis(225)..=Duration::from_millis(300)).contains(gap),
            "{gap:?} in {periodic:?}"
        );
    }
    // Not all the same: the interval is jittered.
    assert!(periodic.iter().any(|g| *g != periodic[0]), "{periodic:?}");
    // The Poll after Up was answered with a Final at once.
    let poll = p.sent.iter().find(|s| s.2.poll).expect("a Poll once Up");
    assert!(
        p.sent
            .iter()
            .any(|s| s.2.fin && s.1 != poll.1 && s.0 == poll.0),
        "a Final in the same millisecond as the Poll"
    );
    assert_eq!(p.a.detection_time(), Duration::from_millis(900));
}

#[test]
fn a_silent_peer_is_down_at_exactly_the_detection_time() {
    for timers in [Timers::DEFAULT, FAST] {
        let mut p = Pair::new(timers);
        p.run(Duration::from_secs(4));
        assert_eq!(p.a.state(), State::Up);
        // b's packets stop reaching a (power loss); a's last reception is the reference.
        p.b_to_a = false;
        let last_rx = p
            .sent
            .iter()
            .filter(|s| s.1 == 'b')
            .map(|s| s.0)
            .max()
            .unwrap();
        p.run(Duration::from_secs(2));
        let (at, _, from, to, diag) = *p.changes.iter().rev().find(|c| c.1 == 'a').unwrap();
        assert_eq!((from, to, diag), (State::Up, State::Down, 1));
        let detect = timers.required_min_rx * u32::from(timers.detect_mult);
        assert_eq!(at - last_rx, detect, "{timers:?}");
        // b, still hearing a, follows: a now says Down, so b goes Down with diag 3 (and then
        // to Init, answering a's Down, where it stays: a cannot hear it).
        assert!(
            p.changes
                .iter()
                .any(|c| c.1 == 'b' && (c.2, c.3, c.4) == (State::Up, State::Down, 3)),
            "{:?}",
            p.changes
        );
        assert_eq!(p.b.state(), State::Init);
    }
}

#[test]
fn the_fast_profile_detects_in_30_ms_and_sends_every_7_5_to_10_ms() {
    let mut p = Pair::new(FAST);
    p.run(Duration::from_secs(4));
    let from = p.now - p.t0 - Duration::from_millis(500);
    let gaps: Vec<Duration> = p
        .sent
        .iter()
        .filter(|s| s.1 == 'a' && s.0 > from)
        .map(|s| s.0)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(gaps.len() >= 45, "{} packets in 500 ms", gaps.len());
    assert!(
        gaps.iter()
            .all(|g| (Duration::from_micros(7_500)..=Duration::from_millis(10)).contains(g)),
        "{gaps:?}"
    );
    assert_eq!(p.a.detection_time(), Duration::from_millis(30));
}

#[test]
fn admin_down_is_a_signalled_down_not_a_detection() {
    let mut p = Pair::new(Timers::DEFAULT);
    p.run(Duration::from_secs(3));
    let acts = p.b.set_admin_down(true, p.now);
    p.deliver('b', acts);
    assert_eq!(p.b.state(), State::AdminDown);
    assert_eq!(p.a.state(), State::Down);
    assert_eq!(p.a.diag(), 3, "neighbor signaled session down");
    // Back up: the handshake runs again.
    let acts = p.b.set_admin_down(false, p.now);
    p.deliver('b', acts);
    p.run(Duration::from_secs(4));
    assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
}

#[test]
fn nothing_is_received_in_admin_down_and_a_late_peer_still_comes_up() {
    let t0 = Instant::now();
    let mut s = Session::new(1, Timers::DEFAULT, t0);
    s.set_admin_down(true, t0);
    let down = Control {
        diag: 0,
        state: State::Down,
        poll: true,
        fin: false,
        cpi: false,
        demand: false,
        detect_mult: 3,
        my_disc: 9,
        your_disc: 0,
        desired_min_tx: 1_000_000,
        required_min_rx: 300_000,
        required_min_echo_rx: 0,
    };
    assert!(s.receive(&down, t0).is_empty(), "discarded in AdminDown");
    // Without any packet the session sends once a second and never expires anyone.
    let mut s = Session::new(1, Timers::DEFAULT, t0);
    let mut sent = 0;
    for ms in 0..5_000u64 {
        for a in s.tick(t0 + Duration::from_millis(ms)) {
            assert!(matches!(a, Action::Send(_)), "{a:?}");
            sent += 1;
        }
    }
    assert!((5..=7).contains(&sent), "{sent} packets in 5 s");
    assert_eq!(s.state(), State::Down);
}
