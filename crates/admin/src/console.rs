//! The web console (`/`): one read-only page of the node's state, live over server-sent events,
//! and the event timeline as JSON lines (`/events`).
//!
//! The server renders the page itself ([`render`]): the first response carries a complete
//! snapshot, so the page works with JavaScript blocked; a few lines of embedded JavaScript then
//! open `/console/stream` and replace the snapshot with each newer one the server renders (at
//! most every [`STREAM_POLL`], and only when something changed). Assets are embedded with
//! `include_str!`: no build step, no separate process. Nothing on the page changes state.
//!
//! Streams count against the admin server's connection bounds like any connection, and at most
//! [`MAX_STREAMS`] are open at once (more are answered 503 and counted in
//! `portico_admin_connections_closed_total{reason="streamLimit"}`). A stream sends a comment
//! line every [`KEEP_ALIVE`] so that the idle timeout does not close a quiet one, and ends when
//! the server shuts down.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use model::StatusReport;
use model::events::Event;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{AdminMetrics, AdminState};

/// Console streams open at once at most.
pub const MAX_STREAMS: usize = 8;
/// How often a stream looks for a change.
pub const STREAM_POLL: Duration = Duration::from_millis(250);
/// A comment line at least this often on a quiet stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Events shown in the page's timeline (newest first).
pub const TIMELINE: usize = 100;
/// Rates are computed over windows of at least this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

const CSS: &str = include_str!("console/style.css");
const JS: &str = include_str!("console/app.js");

/// The router state of the console routes.
#[derive(Clone)]
pub(crate) struct Console {
    pub(crate) state: AdminState,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) metrics: AdminMetrics,
    pub(crate) shutdown: CancellationToken,
}

/// Per-backend rates (connections and bytes per second), from two readings of the counters.
#[derive(Debug, Default, Clone)]
pub struct Rates {
    at: Option<Instant>,
    counters: BTreeMap<(String, String), (u64, u64)>,
    rates: BTreeMap<(String, String), (f64, f64)>,
}

impl Rates {
    /// Takes a reading of `report` at `now`; rates change once a window has passed.
    pub fn update(&mut self, report: &StatusReport, now: Instant) {
        let counters: BTreeMap<(String, String), (u64, u64)> = report
            .services
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(|b| {
                    (
                        (s.name.clone(), b.name.clone()),
                        (b.total_connections, b.bytes_to_backend + b.bytes_to_client),
                    )
                })
            })
            .collect();
        match self.at {
            Some(at) if now.saturating_duration_since(at) < RATE_WINDOW => return,
            Some(at) => {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                self.rates = counters
                    .iter()
                    .map(|(k, (c, b))| {
                        let (c0, b0) = self.counters.get(k).copied().unwrap_or((*c, *b));
                        let rate = |a: u64, a0: u64| a.saturating_sub(a0) as f64 / secs;
                        (k.clone(), (rate(*c, c0), rate(*b, b0)))
                    })
                    .collect();
            }
            None => {}
        }
        self.at = Some(now);
        self.counters = counters;
    }

    fn of(&self, service: &str, backend: &str) -> Option<(f64, f64)> {
        self.rates
            .get(&(service.to_string(), backend.to_string()))
            .copied()
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn human(n: f64, unit: &str) -> String {
    let (v, p) = if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        (n, "")
    };
    format!("{v:.1} {p}{unit}")
}

fn time_of(at_ms: u64) -> String {
    let s = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        at_ms % 1000
    )
}

fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The BGP sessions and this node's route decisions.
fn bgp(h: &mut String, b: &model::BgpStatus) {
    h.push_str("<section id=\"bgp\"><h2>BGP</h2><div class=\"scroll\"><table><thead><tr><th>peer</th><th>address</th><th>state</th><th>uptime</th><th>prefixes</th><th>updates</th><th>flaps</th><th>BFD</th><th>last error</th></tr></thead><tbody>");
    for s in &b.sessions {
        let _ = write!(
            h,
            "<tr data-peer=\"{0}\"><td>{0}</td><td>{1}</td><td class=\"{2}\">{3}</td><td>{4}</td><td>{5}</td><td>{6}</td><td>{7}</td><td>{8}</td><td>{9}</td></tr>",
            esc(&s.peer),
            s.address,
            if s.state == "established" {
                "ok"
            } else {
                "bad"
            },
            esc(&s.state),
            s.uptime_seconds
                .map_or_else(|| "–".to_string(), |u| format!("{u} s")),
            s.prefixes_sent,
            s.updates_sent,
            s.flaps,
            esc(s.bfd.as_deref().unwrap_or("–")),
            esc(s.last_error.as_deref().unwrap_or("–")),
        );
    }
    h.push_str("</tbody></table></div><div class=\"scroll\"><table><thead><tr><th>VIP</th><th>service</th><th>route</th></tr></thead><tbody>");
    for r in &b.routes {
        let _ = write!(
            h,
            "<tr data-route=\"{0}\"><td>{0}</td><td>{1}</td><td class=\"reason {2}\">{3}</td></tr>",
            r.address,
            esc(&r.service),
            if r.reason == "announced" { "ok" } else { "bad" },
            esc(&r.reason),
        );
    }
    h.push_str("</tbody></table></div></section>");
}

/// Renders the live part of the page: nodes, VIPs, services with their backends, DNS answers and
/// the timeline (newest first). Every string from the report is escaped. `rates`: `None` in
/// the static snapshot (no second reading yet).
pub fn render(report: &StatusReport, events: &[Event], rates: Option<&Rates>) -> String {
    let mut h = String::new();
    let ready = if report.ready { "ready" } else { "not ready" };
    let _ = write!(
        h,
        "<section id=\"node\"><h2>Node <span class=\"name\">{}</span></h2><p>portico {} · generation {} · <span class=\"{}\">{}</span></p>",
        esc(&report.node),
        esc(&report.version),
        report.generation,
        if report.ready { "ok" } else { "bad" },
        ready
    );
    if let Some(e) = &report.last_reload_error {
        let _ = write!(
            h,
            "<p class=\"bad\" id=\"reload-error\">last reload rejected: {}</p>",
            esc(e)
        );
    }
    h.push_str("</section>");

    h.push_str("<section id=\"nodes\"><h2>Nodes</h2><div class=\"scroll\"><table><thead><tr><th>node</th><th>address</th><th>state</th></tr></thead><tbody>");
    if report.members.is_empty() {
        let _ = write!(
            h,
            "<tr data-node=\"{0}\"><td>{0}</td><td>(standalone)</td><td class=\"ok\">alive</td></tr>",
            esc(&report.node)
        );
    }
    for m in &report.members {
        let class = if m.state == "alive" { "ok" } else { "bad" };
        let _ = write!(
            h,
            "<tr data-node=\"{0}\"><td>{0}</td><td>{1}</td><td class=\"{2}\">{3}</td></tr>",
            esc(&m.name),
            m.address,
            class,
            esc(&m.state)
        );
    }
    h.push_str("</tbody></table></div></section>");

    h.push_str("<section id=\"vips\"><h2>VIPs</h2><div class=\"scroll\"><table><thead><tr><th>VIP</th><th>service</th><th>owner</th><th>reason</th><th>conflicts</th></tr></thead><tbody>");
    for s in &report.services {
        for v in &s.vips {
            let owner = v.owner.as_deref().unwrap_or("none");
            let _ = write!(
                h,
                "<tr data-vip=\"{0}\"><td>{0}</td><td>{1}</td><td class=\"owner {2}\">{3}</td><td class=\"reason\">{4}</td><td class=\"{5}\">{6}</td></tr>",
                v.address,
                esc(&s.name),
                if v.owner.is_some() { "ok" } else { "bad" },
                esc(owner),
                esc(&v.reason),
                if v.conflicts > 0 { "bad" } else { "" },
                v.conflicts
            );
        }
    }
    h.push_str("</tbody></table></div></section>");
    if let Some(b) = &report.bgp {
        bgp(&mut h, b);
    }

    h.push_str("<section id=\"services\"><h2>Services</h2>");
    for s in &report.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, word(&p.protocol)))
            .collect();
        let vips: Vec<String> = s.vips.iter().map(|v| v.address.to_string()).collect();
        let _ = write!(
            h,
            "<article class=\"service\" data-service=\"{0}\"><h3>{0}{1}</h3><p class=\"path\">{2} : {3} → {4} backend(s)</p>",
            esc(&s.name),
            if s.panic_mode {
                " <span class=\"bad\">panic mode</span>"
            } else {
                ""
            },
            esc(&vips.join(", ")),
            esc(&ports.join(", ")),
            s.backends.len()
        );
        h.push_str("<div class=\"scroll\"><table><thead><tr><th>backend</th><th>address</th><th>health</th><th>ejected</th><th>breaker</th><th>active</th><th>conn/s</th><th>bytes/s</th></tr></thead><tbody>");
        for b in &s.backends {
            let health = word(&b.health);
            let rate = rates.and_then(|r| r.of(&s.name, &b.name));
            let (cps, bps) = match rate {
                Some((c, b)) => (format!("{c:.1}"), human(b, "B")),
                None => ("–".to_string(), "–".to_string()),
            };
            let _ = write!(
                h,
                "<tr data-backend=\"{0}/{1}\"><td>{1}{2}</td><td>{3}</td><td class=\"health {4}\">{4}</td><td class=\"ejected{5}\">{6}</td><td class=\"breaker\">{7}</td><td class=\"active\">{8}</td><td>{9}</td><td>{10}</td></tr>",
                esc(&s.name),
                esc(&b.name),
                if b.draining { " (draining)" } else { "" },
                b.address,
                health,
                if b.ejected { " bad" } else { "" },
                if b.ejected { "yes" } else { "no" },
                word(&b.breaker),
                b.active_connections,
                cps,
                bps
            );
        }
        h.push_str("</tbody></table></div>");
        for d in report.dns.iter().filter(|d| d.service == s.name) {
            let addrs: Vec<String> = d.addresses.iter().map(|a| a.to_string()).collect();
            let _ = write!(
                h,
                "<p class=\"dns\" data-dns=\"{0}\">DNS {0} ({1}, TTL {2}s): {3}</p>",
                esc(&d.name),
                word(&d.state),
                d.ttl,
                if addrs.is_empty() {
                    "no address".to_string()
                } else {
                    esc(&addrs.join(", "))
                }
            );
        }
        h.push_str("</article>");
    }
    h.push_str("</section>");

    h.push_str("<section id=\"timeline\"><h2>Timeline</h2><ol>");
    for e in events.iter().rev() {
        let duration = e
            .duration_ms
            .map(|d| format!(" <span class=\"duration\">{d} ms</span>"))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<li data-kind=\"{0}\" data-seq=\"{1}\"><time>{2}</time> <b>{0}</b> {3}: {4}{5}</li>",
            esc(&e.kind),
            e.seq,
            time_of(e.at_ms),
            esc(&e.subject),
            esc(&e.message),
            duration
        );
    }
    if events.is_empty() {
        h.push_str("<li class=\"empty\">no events yet</li>");
    }
    h.push_str("</ol></section>");
    h
}

fn page(live: &str, stamp_ms: u64) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>portico</title><style>{CSS}</style></head><body>\
         <header><h1>portico</h1><span id=\"conn\" class=\"static\">snapshot {}</span></header>\
         <noscript><p class=\"note\">JavaScript is off: this is a static snapshot taken at {} UTC; reload for a newer one.</p></noscript>\
         <main id=\"live\">{live}</main><script>{JS}</script></body></html>",
        time_of(stamp_ms),
        time_of(stamp_ms)
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `GET /`: the page with a snapshot rendered in.
pub(crate) async fn index(State(c): State<Console>) -> Response {
    let report = (c.state.status)();
    let events = c.state.events.with(|r| r.last(TIMELINE));
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(page(&render(&report, &events, None), now_ms())),
    )
        .into_response()
}

/// `?since=` of `/events`.
#[derive(Debug, Deserialize)]
pub(crate) struct Since {
    #[serde(default)]
    since: u64,
}

/// `GET /events?since=N`: the kept events after sequence number N, one JSON object per line.
pub(crate) async fn events(State(c): State<Console>, Query(q): Query<Since>) -> Response {
    let mut body = String::new();
    for e in c.state.events.since(q.since) {
        if let Ok(line) = serde_json::to_string(&e) {
            body.push_str(&line);
            body.push('\n');
        }
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

struct Stream {
    console: Console,
    _permit: OwnedSemaphorePermit,
    last: String,
    rates: Rates,
}

impl Stream {
    /// Waits for the next snapshot that differs from the last one sent.
    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        loop {
            let report = (self.console.state.status)();
            self.rates.update(&report, Instant::now());
            let events = self.console.state.events.with(|r| r.last(TIMELINE));
            let html = render(&report, &events, Some(&self.rates));
            if html != self.last {
                self.last.clone_from(&html);
                return Some((Ok(SseEvent::default().event("snapshot").data(html)), self));
            }
            tokio::select! {
                () = self.console.shutdown.cancelled() => return None,
                () = tokio::time::sleep(STREAM_POLL) => {}
            }
        }
    }
}

/// `GET /console/stream`: server-sent `snapshot` events (the live part of the page, rendered).
pub(crate) async fn stream(State(c): State<Console>) -> Response {
    let Ok(permit) = c.streams.clone().try_acquire_owned() else {
        c.metrics.stream_refused();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many console streams open (at most {MAX_STREAMS}); try again later\n"),
        )
            .into_response();
    };
    let s = Stream {
        console: c,
        _permit: permit,
        last: String::new(),
        rates: Rates::default(),
    };
    let stream = futures::stream::unfold(s, Stream::next);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{BackendStatus, Health, ServiceStatus, VipStatus};

    fn report() -> StatusReport {
        StatusReport {
            node: "n1<script>".into(),
            ready: true,
            services: vec![ServiceStatus {
                name: "web".into(),
                ports: vec![],
                vips: vec![VipStatus {
                    address: "192.0.2.1".parse().unwrap(),
                    owner: None,
                    reason: "noEligibleNode".into(),
                    conflicts: 0,
                }],
                backends: vec![BackendStatus {
                    name: "b1".into(),
                    address: "127.0.0.1".parse().unwrap(),
                    weight: 1,
                    health: Health::Down,
                    breaker: Default::default(),
                    ejected: true,
                    draining: false,
                    active_connections: 3,
                    total_connections: 10,
                    connect_failures: 0,
                    bytes_to_backend: 0,
                    bytes_to_client: 1000,
                }],
                panic_mode: false,
                path: Default::default(),
                path_reason: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_snapshot_shows_state_and_escapes_every_string() {
        let html = render(&report(), &[], None);
        assert!(html.contains("n1&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("<td class=\"health down\">down</td>"),
            "{html}"
        );
        assert!(html.contains("class=\"owner bad\">none</td><td class=\"reason\">noEligibleNode"));
        assert!(
            !html.contains('\n'),
            "one line, so it fits one SSE data field"
        );
    }

    #[test]
    fn bgp_sessions_and_routes_are_shown_when_configured() {
        let mut rep = report();
        assert!(!render(&rep, &[], None).contains("id=\"bgp\""));
        rep.bgp = Some(model::BgpStatus {
            sessions: vec![model::BgpSessionStatus {
                peer: "tor<1>".into(),
                address: "192.0.2.1".parse().unwrap(),
                state: "established".into(),
                uptime_seconds: Some(7),
                prefixes_sent: 2,
                updates_sent: 3,
                flaps: 0,
                last_error: None,
                bfd: Some("up".into()),
            }],
            routes: vec![model::BgpRouteStatus {
                service: "web".into(),
                address: "198.51.100.7".parse().unwrap(),
                reason: "noHealthyBackend".into(),
            }],
            ecmp_rescue: None,
        });
        let html = render(&rep, &[], None);
        assert!(html.contains("<td>tor&lt;1&gt;</td><td>192.0.2.1</td><td class=\"ok\">established</td><td>7 s</td><td>2</td>"), "{html}");
        assert!(
            html.contains("<td class=\"reason bad\">noHealthyBackend</td>"),
            "{html}"
        );
        assert!(!html.contains('\n'));
    }

    #[tokio::test(start_paused = true)]
    async fn rates_come_from_two_readings_a_window_apart() {
        let mut r = Rates::default();
        let mut rep = report();
        let t = Instant::now();
        r.update(&rep, t);
        rep.services[0].backends[0].total_connections = 30;
        rep.services[0].backends[0].bytes_to_client = 5000;
        r.update(&rep, t + Duration::from_millis(500));
        assert_eq!(r.of("web", "b1"), None, "not before a window has passed");
        r.update(&rep, t + Duration::from_secs(2));
        assert_eq!(r.of("web", "b1"), Some((10.0, 2000.0)));
    }
}
