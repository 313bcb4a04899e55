//! Replayed conntrack events under made-up instants: outcomes, ejection, its end, the
//! percentage limit and the flow bound.

use super::*;
use model::config::{Environment, parse};

fn config(outlier: &str) -> Config {
    parse(
        &format!(
            "services:\n  - name: web\n    vips: [10.9.0.1]\n    ports: [{{port: 80, target_port: 8080}}]\n    \
             connection: {{connect_timeout: 1s}}\n    outlier: {{{outlier}}}\n    backends:\n      \
             - {{name: a, address: 10.0.1.1}}\n      - {{name: b, address: 10.0.1.2}}\n      \
             - {{name: c, address: 10.0.1.3}}\n      - {{name: d, address: 10.0.1.4}}\n"
        ),
        &Environment::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn default_config() -> Config {
    config(
        "conntrack_events: true, consecutive_failures: 3, base_ejection_time: 30s, max_ejection_time: 300s, max_ejection_percent: 50",
    )
}

fn ev(kind: EventKind, client_port: u16, backend: u8, state: Option<TcpState>) -> Event {
    Event {
        kind,
        proto: TCP,
        orig_src: SocketAddr::from(([10, 0, 0, 2], client_port)),
        orig_dst: "10.9.0.1:80".parse().unwrap(),
        reply_src: SocketAddr::from(([10, 0, 1, backend], 8080)),
        status: None,
        tcp_state: state,
        id: None,
    }
}

/// A flow to `backend` that the backend refuses (new, then destroyed unanswered).
fn refused(p: &mut Passive, now: Instant, port: u16, backend: u8) -> Report {
    let mut r = p.on_event(
        now,
        &ev(EventKind::New, port, backend, Some(TcpState::SynSent)),
    );
    r.merge(p.on_event(
        now,
        &ev(EventKind::Destroy, port, backend, Some(TcpState::Close)),
    ));
    r
}

/// A flow to `backend` that connects (new, then SYN_RECV, then ESTABLISHED).
fn connected(p: &mut Passive, now: Instant, port: u16, backend: u8) -> Report {
    let mut r = p.on_event(
        now,
        &ev(EventKind::New, port, backend, Some(TcpState::SynSent)),
    );
    r.merge(p.on_event(
        now,
        &ev(EventKind::Update, port, backend, Some(TcpState::SynRecv)),
    ));
    r.merge(p.on_event(
        now,
        &ev(
            EventKind::Update,
            port,
            backend,
            Some(TcpState::Established),
        ),
    ));
    r
}

fn key(b: &str) -> BackendKey {
    BackendKey::new("web", b)
}

#[test]
fn consecutive_refusals_eject_and_a_connect_resets_the_run() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    assert!(p.watched().contains(&(
        TCP,
        "10.9.0.1:80".parse().unwrap(),
        "10.0.1.2:8080".parse().unwrap()
    )));
    let r = refused(&mut p, t0, 1000, 2);
    assert_eq!(r.outcomes, [(key("b"), Outcome::Refused)]);
    refused(&mut p, t0, 1001, 2);
    let r = connected(&mut p, t0, 1002, 2);
    assert_eq!(r.outcomes, [(key("b"), Outcome::Connected)], "counted once");
    refused(&mut p, t0, 1003, 2);
    refused(&mut p, t0, 1004, 2);
    assert!(p.ejected().is_empty(), "the connect reset the run");
    let r = refused(&mut p, t0, 1005, 2);
    assert_eq!(
        r.changes,
        [Change::Ejected(key("b"), t0 + Duration::from_secs(30))]
    );
    assert!(r.ejections_changed());
    assert_eq!(p.ejected(), [key("b")].into());
    let st = p.status(t0)[&key("b")];
    assert_eq!(
        (st.ejected, st.breaker, st.failures),
        (true, BreakerState::Open, 5)
    );
    assert_eq!(p.pending(), 0);
}

#[test]
fn the_ejection_ends_half_open_and_one_more_failure_ejects_again_for_longer() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    for port in 0..3 {
        refused(&mut p, t0, port, 1);
    }
    assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(30)));
    assert!(p.on_tick(t0 + Duration::from_secs(29)).changes.is_empty());
    let t1 = t0 + Duration::from_secs(30);
    let r = p.on_tick(t1);
    assert_eq!(r.changes, [Change::Readmitted(key("a"))]);
    assert!(p.ejected().is_empty());
    assert_eq!(p.status(t1)[&key("a")].breaker, BreakerState::HalfOpen);
    let r = refused(&mut p, t1, 10, 1);
    assert_eq!(
        r.changes,
        [Change::Ejected(key("a"), t1 + Duration::from_secs(60))],
        "a half-open failure ejects at once, for base × 2"
    );
    // this time a connect after the ejection closes the breaker
    let t2 = t1 + Duration::from_secs(60);
    p.on_tick(t2);
    connected(&mut p, t2, 11, 1);
    assert_eq!(p.status(t2)[&key("a")].breaker, BreakerState::Closed);
}

#[test]
fn an_unanswered_flow_fails_at_the_connect_timeout_and_its_later_destroy_is_ignored() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    p.on_event(t0, &ev(EventKind::New, 7, 3, Some(TcpState::SynSent)));
    assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(1)));
    assert!(
        p.on_tick(t0 + Duration::from_millis(999))
            .outcomes
            .is_empty()
    );
    let r = p.on_tick(t0 + Duration::from_secs(1));
    assert_eq!(r.outcomes, [(key("c"), Outcome::Timeout)]);
    // conntrack's own 120 s SYN_SENT timeout destroys it later: not counted twice
    let r = p.on_event(
        t0 + Duration::from_secs(120),
        &ev(EventKind::Destroy, 7, 3, Some(TcpState::SynSent)),
    );
    assert!(r.outcomes.is_empty());
    assert_eq!(p.next_deadline(), None);
}

#[test]
fn max_ejection_percent_keeps_half_of_the_backends() {
    let t0 = Instant::now();
    let mut p = Passive::new(64);
    p.configure(&default_config());
    let mut port = 0;
    let mut last = Report::default();
    for b in 1..=3 {
        for _ in 0..3 {
            port += 1;
            last = refused(&mut p, t0, port, b);
        }
    }
    assert_eq!(p.ejected(), [key("a"), key("b")].into());
    assert_eq!(last.changes, [Change::Limited(key("c"))]);
    assert!(!last.ejections_changed());
}

#[test]
fn flows_of_other_targets_udp_and_unknown_flows_are_ignored() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    let mut other = ev(EventKind::New, 1, 1, Some(TcpState::SynSent));
    other.orig_dst = "10.9.0.9:80".parse().unwrap();
    p.on_event(t0, &other);
    let mut udp = ev(EventKind::New, 2, 1, None);
    udp.proto = 17;
    p.on_event(t0, &udp);
    assert_eq!(p.pending(), 0);
    // an update or destroy of a flow whose new event was not seen has no outcome
    let r = p.on_event(t0, &ev(EventKind::Destroy, 3, 1, Some(TcpState::Close)));
    assert!(r.outcomes.is_empty());
}

#[test]
fn the_flow_table_is_bounded_and_counts_what_it_refused() {
    let t0 = Instant::now();
    let mut p = Passive::new(2);
    p.configure(&default_config());
    let mut untracked = 0;
    for port in 0..5 {
        untracked += p
            .on_event(t0, &ev(EventKind::New, port, 1, Some(TcpState::SynSent)))
            .untracked;
    }
    assert_eq!((p.pending(), untracked), (2, 3));
}

#[test]
fn a_reload_keeps_the_record_of_a_backend_that_stays_and_detection_can_be_off() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    for port in 0..3 {
        refused(&mut p, t0, port, 1);
    }
    p.on_event(t0, &ev(EventKind::New, 50, 2, Some(TcpState::SynSent)));
    p.configure(&default_config());
    assert_eq!(p.ejected(), [key("a")].into(), "kept across the reload");
    assert_eq!(p.pending(), 1);
    p.configure(&config("consecutive_failures: 0"));
    assert!(p.watched().is_empty());
    // detection on the kernel path is opt-in: without conntrack_events nothing is watched
    p.configure(&config("consecutive_failures: 3"));
    assert!(p.watched().is_empty());
    assert!(p.ejected().is_empty());
    assert_eq!((p.pending(), p.next_deadline()), (0, None));
}

/// The driver's use under tokio's paused clock: events replayed as they arrive, `on_tick` at
/// `next_deadline`, the ejection ending after `base_ejection_time`.
#[tokio::test(start_paused = true)]
async fn replayed_events_under_paused_time_eject_then_readmit() {
    let mut p = Passive::new(16);
    p.configure(&default_config());
    let start = Instant::now();
    // a black-holed flow, then two refused ones, 100 ms apart
    p.on_event(
        Instant::now(),
        &ev(EventKind::New, 1, 4, Some(TcpState::SynSent)),
    );
    for port in 2..4 {
        tokio::time::advance(Duration::from_millis(100)).await;
        refused(&mut p, Instant::now(), port, 4);
    }
    assert!(p.ejected().is_empty());
    let due = p.next_deadline().expect("the connect timeout");
    tokio::time::sleep_until(due).await;
    let r = p.on_tick(Instant::now());
    assert_eq!(r.outcomes, [(key("d"), Outcome::Timeout)]);
    assert!(r.ejections_changed(), "the third failure ejects");
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    let due = p.next_deadline().expect("the ejection's end");
    tokio::time::sleep_until(due).await;
    assert_eq!(
        p.on_tick(Instant::now()).changes,
        [Change::Readmitted(key("d"))]
    );
    assert_eq!(Instant::now() - start, Duration::from_secs(31));
    assert_eq!(p.next_deadline(), None);
}

#[test]
fn flows_forgotten_after_lost_events_never_time_out() {
    let t0 = Instant::now();
    let mut p = Passive::new(16);
    p.configure(&default_config());
    for port in 0..3 {
        p.on_event(t0, &ev(EventKind::New, port, 1, Some(TcpState::SynSent)));
    }
    assert_eq!(p.forget_pending(), 3);
    assert_eq!(p.next_deadline(), None);
    assert!(p.on_tick(t0 + Duration::from_secs(5)).outcomes.is_empty());
    assert!(p.ejected().is_empty());
}
