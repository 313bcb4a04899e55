//! Bounds on the admin server's connections, so idle or trickling clients cannot hold its
//! descriptors (they are shared with the data path) or starve `/healthz`.
//!
//! - At most [`AdminLimits::max_connections`] connections (64) and
//!   [`AdminLimits::max_per_client`] (16) per client address, kept in a
//!   [`sys::conn_table::ConnTable`]: at a bound, the connection idle longest (at least
//!   [`AdminLimits::evict_idle`], 1 s) is closed to make room, else the newcomer is closed at
//!   once. Either way it is counted in `portico_admin_connections_closed_total{reason}`.
//! - A request must arrive whole within [`AdminLimits::header_read_timeout`] (5 s) of its first
//!   byte (admin requests are bodiless GETs), and a connection with nothing to say for
//!   [`AdminLimits::idle_timeout`] (30 s) is closed.
//!
//! The timeouts live in [`GuardedIo`], a wrapper around the accepted stream; the table in
//! [`GuardedListener`], the listener `axum::serve` accepts from.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sys::conn_table::{Admission, ConnTable, Pressure, TOUCH_GRANULARITY, TableLimits};
use sys::limits::LogEvery;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Duration, Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The admin server's connection bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections per client address at most.
    pub max_per_client: usize,
    /// A connection idle at least this long may be closed for a newcomer.
    pub evict_idle: Duration,
    /// From a request's first byte to its end.
    pub header_read_timeout: Duration,
    /// Without a byte either way.
    pub idle_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_per_client: 16,
            evict_idle: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a connection was closed by the server's bounds.
#[derive(Debug, Clone, Copy)]
enum Closed {
    TableFull,
    ClientLimit,
    Evicted,
    HeaderTimeout,
    IdleTimeout,
    StreamLimit,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Closed::TableFull => "tableFull",
            Closed::ClientLimit => "clientLimit",
            Closed::Evicted => "evicted",
            Closed::HeaderTimeout => "headerTimeout",
            Closed::IdleTimeout => "idleTimeout",
            Closed::StreamLimit => "streamLimit",
        }
    }
}

/// The admin server's connection metrics.
#[derive(Debug, Clone, Default)]
pub struct AdminMetrics {
    connections: Gauge,
    closed: Family<[(&'static str, &'static str); 1], Counter>,
}

impl AdminMetrics {
    /// Registers the metrics under `portico_admin` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_admin");
        r.register(
            "connections",
            "Open admin API connections",
            m.connections.clone(),
        );
        r.register(
            "connections_closed",
            "Admin API connections closed by the server's bounds, by reason (tableFull, clientLimit: refused at accept; evicted: idle, closed for a newcomer; headerTimeout, idleTimeout; streamLimit: a console stream refused with 503)",
            m.closed.clone(),
        );
        m
    }

    fn closed(&self, why: Closed) {
        self.closed.get_or_create(&[("reason", why.as_str())]).inc();
    }

    /// Counts a console stream refused at its bound.
    pub(crate) fn stream_refused(&self) {
        self.closed(Closed::StreamLimit);
    }

    /// Open connections now.
    pub fn open(&self) -> i64 {
        self.connections.get()
    }
}

type Table = Arc<Mutex<ConnTable<u64, CancellationToken>>>;

fn lock(t: &Table) -> std::sync::MutexGuard<'_, ConnTable<u64, CancellationToken>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listener that admits connections within [`AdminLimits`].
pub struct GuardedListener {
    inner: TcpListener,
    limits: AdminLimits,
    metrics: AdminMetrics,
    table: Table,
    next_id: u64,
    log: LogEvery,
}

impl GuardedListener {
    /// Wraps `inner`.
    pub fn new(inner: TcpListener, limits: AdminLimits, metrics: AdminMetrics) -> Self {
        Self {
            inner,
            limits,
            metrics,
            table: Arc::new(Mutex::new(ConnTable::new(TableLimits {
                max_total: limits.max_connections,
                max_per_client: limits.max_per_client,
                evict_idle: limits.evict_idle,
            }))),
            next_id: 0,
            log: LogEvery::new(Duration::from_secs(10)),
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off, log once per interval.
                    if self.log.check(Instant::now()).is_some() {
                        tracing::warn!(error = %e, local = sys::limits::is_local_resource_error(&e), "admin accept failed");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            self.next_id += 1;
            let id = self.next_id;
            let cancel = CancellationToken::new();
            let now = Instant::now();
            let admitted = lock(&self.table).admit(id, peer.ip(), now, cancel.clone(), false);
            match admitted {
                Admission::Admitted => {}
                Admission::Evicted(_, old, _) => {
                    old.cancel();
                    self.metrics.closed(Closed::Evicted);
                }
                Admission::Refused(why) => {
                    self.metrics.closed(match why {
                        Pressure::ClientLimit => Closed::ClientLimit,
                        _ => Closed::TableFull,
                    });
                    tracing::debug!(client = %peer, reason = why.as_str(), "admin connection refused");
                    drop(stream);
                    continue;
                }
            }
            self.metrics.connections.inc();
            let io = GuardedIo {
                io: stream,
                id,
                cancelled: Box::pin(cancel.cancelled_owned()),
                deadline: Box::pin(tokio::time::sleep_until(now + self.limits.idle_timeout)),
                request_since: None,
                touched: now,
                limits: self.limits,
                table: self.table.clone(),
                metrics: self.metrics.clone(),
            };
            return (io, peer);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted admin connection with a header-read and an idle deadline; closing it (drop)
/// frees its place in the table.
pub struct GuardedIo {
    io: TcpStream,
    id: u64,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    deadline: Pin<Box<Sleep>>,
    /// When the first byte of the request being read arrived (`None` between requests).
    request_since: Option<Instant>,
    touched: Instant,
    limits: AdminLimits,
    table: Table,
    metrics: AdminMetrics,
}

impl GuardedIo {
    fn activity(&mut self, now: Instant, reading: bool) {
        let until = if reading {
            let since = *self.request_since.get_or_insert(now);
            (now + self.limits.idle_timeout).min(since + self.limits.header_read_timeout)
        } else {
            self.request_since = None;
            now + self.limits.idle_timeout
        };
        self.deadline.as_mut().reset(until);
        if now.saturating_duration_since(self.touched) >= TOUCH_GRANULARITY {
            self.touched = now;
            lock(&self.table).touch(&self.id, now);
        }
    }

    fn check_ended(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection",
            ));
        }
        None
    }
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        lock(&self.table).remove(&self.id);
        self.metrics.connections.dec();
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check_ended(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity(Instant::now(), true);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    let why = if this.request_since.is_some() {
                        Closed::HeaderTimeout
                    } else {
                        Closed::IdleTimeout
                    };
                    this.metrics.closed(why);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why.as_str())));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check_ended(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => this.activity(Instant::now(), false),
            // A client that does not read its answer is idle too.
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                this.metrics.closed(Closed::IdleTimeout);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    Closed::IdleTimeout.as_str(),
                )));
            }
            _ => {}
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
