//! Admin HTTP server (`/metrics`, `/healthz`, `/readyz`, `/status`, `/events` and the web
//! console on `/`) and its small client.
//!
//! The server takes an already-bound listener and a shutdown token (mini-redis style): the
//! binary binds `admin.listen`, tests bind `127.0.0.1:0`. It never reaches into a source: it
//! reads a [`StatusReport`] from a provider the binary assembles from the spine's snapshots.
//! Connections are bounded (count, per client, header-read and idle timeouts): see [`limits`].

pub mod client;
pub mod console;
pub mod limits;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use limits::GuardedListener;
pub use limits::{AdminLimits, AdminMetrics};
use model::StatusReport;
use model::events::EventLog;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Produces the current status report on demand.
pub type StatusProvider = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// What the admin server serves.
#[derive(Clone)]
pub struct AdminState {
    /// Every component's metrics.
    pub registry: Arc<Registry>,
    /// The `/status` report.
    pub status: StatusProvider,
    /// True once the first configuration is applied.
    pub ready: watch::Receiver<bool>,
    /// The event timeline (`/events`, the console).
    pub events: EventLog,
}

/// The admin routes (console streams end only when their clients leave: see [`serve_with`]).
pub fn router(state: AdminState) -> Router {
    router_with(state, AdminMetrics::default(), CancellationToken::new())
}

/// The admin routes; console streams end at `shutdown`.
fn router_with(state: AdminState, counters: AdminMetrics, shutdown: CancellationToken) -> Router {
    let console = console::Console {
        state: state.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(console::MAX_STREAMS)),
        metrics: counters,
        shutdown,
    };
    let pages = Router::new()
        .route("/", get(console::index))
        .route("/console", get(console::index))
        .route("/console/stream", get(console::stream))
        .route("/events", get(console::events))
        .with_state(console);
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(state)
        .merge(pages)
}

/// The routes for a port reachable from outside the node (a Kubernetes agent's metrics port on
/// the node address): `/metrics`, `/healthz` and `/readyz` only, no `/status`.
pub fn probe_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves `routes` ([`router`] or [`probe_router`]) on `listener` until `shutdown`, within
/// `limits`, counting in `metrics`.
pub async fn serve_routes(
    listener: TcpListener,
    routes: Router,
    limits: AdminLimits,
    metrics: AdminMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = GuardedListener::new(listener, limits, metrics);
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Serves the admin routes on `listener` until `shutdown`, within the default
/// [`AdminLimits`] (metrics unregistered: use [`serve_with`] to export them).
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        listener,
        state,
        AdminLimits::default(),
        AdminMetrics::default(),
        shutdown,
    )
    .await
}

/// Serves the admin routes on `listener` until `shutdown`, within `limits`, counting in
/// `metrics` (from [`AdminMetrics::register`]).
pub async fn serve_with(
    listener: TcpListener,
    state: AdminState,
    limits: AdminLimits,
    metrics: AdminMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let routes = router_with(state, metrics.clone(), shutdown.clone());
    serve_routes(listener, routes, limits, metrics, shutdown).await
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no configuration applied yet\n",
        )
            .into_response()
    }
}

async fn status(State(s): State<AdminState>) -> Response {
    axum::Json((s.status)()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn start(ready: bool) -> (std::net::SocketAddr, watch::Sender<bool>, CancellationToken) {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        registry.register("test_events", "events seen by the test", c);
        let (tx, rx) = watch::channel(ready);
        let state = AdminState {
            registry: Arc::new(registry),
            status: Arc::new(|| StatusReport {
                node: "n1".into(),
                generation: 7,
                ..Default::default()
            }),
            ready: rx,
            events: EventLog::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(listener, state, token.clone()));
        (addr, tx, token)
    }

    #[tokio::test]
    async fn the_probe_routes_serve_metrics_and_probes_but_not_status() {
        let (tx, rx) = watch::channel(true);
        let state = AdminState {
            registry: Arc::new(Registry::default()),
            status: Arc::new(StatusReport::default),
            ready: rx,
            events: EventLog::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve_routes(
            listener,
            probe_router(state),
            AdminLimits::default(),
            AdminMetrics::default(),
            token.clone(),
        ));
        assert_eq!(client::get(addr, "/healthz").await.unwrap().status, 200);
        assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 200);
        tx.send(false).unwrap();
        assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 503);
        assert_eq!(client::get(addr, "/metrics").await.unwrap().status, 200);
        assert_eq!(client::get(addr, "/status").await.unwrap().status, 404);
        token.cancel();
    }

    #[tokio::test]
    async fn endpoints_answer_over_a_real_socket() {
        let (addr, ready, token) = start(false).await;
        let r = client::get(addr, "/healthz").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 503);
        ready.send(true).unwrap();
        assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 200);
        let m = client::get(addr, "/metrics").await.unwrap();
        assert!(m.body.contains("test_events_total 1"), "{}", m.body);
        let s = client::status(addr).await.unwrap();
        assert_eq!((s.node.as_str(), s.generation), ("n1", 7));
        token.cancel();
    }

    #[tokio::test]
    async fn unknown_paths_are_404() {
        let (addr, _ready, token) = start(true).await;
        assert_eq!(client::get(addr, "/nope").await.unwrap().status, 404);
        token.cancel();
    }
}
