//! The spine's snapshot types: desired state, observations and the status report.
//!
//! A *source* publishes [`Desired`]; *observers* publish [`HealthView`] and [`OwnershipView`];
//! *consumers* read immutable snapshots of all three and never reach back into a source.
//! [`StatusReport`] is the one shape `/status` serves and `portico status` prints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::service::{Config, NodeId, Protocol};

/// One generation of desired state, as a source published it.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Monotonic generation, 1 for the first applied config.
    pub generation: u64,
    /// The validated configuration.
    pub config: Arc<Config>,
}

/// Identifies one backend of one service: `(service, backend name)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendKey {
    /// Service name.
    pub service: String,
    /// Backend name (unique within the service).
    pub backend: String,
}

impl BackendKey {
    /// Builds a key.
    pub fn new(service: impl Into<String>, backend: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            backend: backend.into(),
        }
    }
}

/// Health of a backend as the active checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not yet checked (counted as up until the first verdict, as HAProxy does).
    #[default]
    Unknown,
    /// Passing.
    Up,
    /// Failing.
    Down,
}

impl Health {
    /// Whether traffic may go there.
    pub fn is_serving(self) -> bool {
        !matches!(self, Health::Down)
    }
}

/// Circuit-breaker state (Envoy/Hystrix vocabulary: *open* means traffic is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Traffic flows.
    #[default]
    Closed,
    /// Ejected or at its limit: no new traffic.
    Open,
    /// Probing with limited traffic after an ejection ended.
    HalfOpen,
}

/// Health observations for every backend, published by the health checker.
pub type HealthView = BTreeMap<BackendKey, Health>;

/// One VIP's ownership decision, as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipOwnership {
    /// The owner, if any node is eligible.
    pub owner: Option<NodeId>,
    /// Why this node does or does not announce (`owner`, `notOwner`, `noEligibleNode`, …).
    pub reason: String,
}

/// Ownership of every VIP, published by the agent.
pub type OwnershipView = BTreeMap<IpAddr, VipOwnership>;

/// Everything `/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StatusReport {
    /// This node.
    pub node: NodeId,
    /// portico version.
    pub version: String,
    /// Generation of the config the balancer has applied (0 = none yet); the service rows are
    /// of this generation (a reload is published first, then applied).
    pub generation: u64,
    /// Error of the last rejected reload, if the last reload failed.
    pub last_reload_error: Option<String>,
    /// Whether the first config is applied.
    pub ready: bool,
    /// Cluster members and their state.
    pub members: Vec<MemberStatus>,
    /// Services.
    pub services: Vec<ServiceStatus>,
    /// DNS names published now, with their state (healthy, fail-open, fail-closed).
    #[serde(default)]
    pub dns: Vec<DnsNameStatus>,
    /// BGP sessions and this node's route decisions, when a `bgp` section is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpStatus>,
}

/// The BGP side of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BgpStatus {
    /// One row per configured neighbour.
    pub sessions: Vec<BgpSessionStatus>,
    /// Per VIP of a `bgp`/`both` service: announced by this node or why not.
    pub routes: Vec<BgpRouteStatus>,
    /// The ECMP rescue on this node (none until its first tables were applied or refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecmp_rescue: Option<EcmpRescueStatus>,
}

/// The ECMP rescue's state on this node (`bgp.ecmp_rescue`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EcmpRescueStatus {
    /// `on`, `noBgpVip`, `disabled`, `noOtherMember`, or `refused` while nft refuses the tables.
    pub reason: String,
    /// The members' addresses that segments of connections held elsewhere are copied to.
    pub members: Vec<std::net::IpAddr>,
}

/// One BGP session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSessionStatus {
    /// The neighbour's name.
    pub peer: String,
    /// Its address.
    pub address: IpAddr,
    /// `idle`, `connect`, `openSent`, `openConfirm` or `established`.
    pub state: String,
    /// Seconds in the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// Routes the neighbour has from this node.
    pub prefixes_sent: usize,
    /// UPDATE messages sent.
    pub updates_sent: u64,
    /// Times the session left `established`.
    pub flaps: u64,
    /// Why it last went down (reason word first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// BFD state (`down`, `init`, `up`, `adminDown`), when BFD is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<String>,
}

/// One VIP's BGP decision on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpRouteStatus {
    /// Service name.
    pub service: String,
    /// The VIP.
    pub address: IpAddr,
    /// `announced`, or why not (`noHealthyBackend`, `notOwner`, `stopping`, …).
    pub reason: String,
}

/// One cluster member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node name.
    pub name: NodeId,
    /// Gossip address.
    pub address: SocketAddr,
    /// `alive`, `suspect` or `down`.
    pub state: String,
}

/// One service in the status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// Ports as `3306/tcp`.
    pub ports: Vec<PortStatus>,
    /// VIPs and who owns them.
    pub vips: Vec<VipStatus>,
    /// Backends.
    pub backends: Vec<BackendStatus>,
    /// Whether the service balances over all backends because too few are healthy.
    pub panic_mode: bool,
    /// The data path it runs on (kernel nftables DNAT or the user-space proxy).
    #[serde(default)]
    pub path: crate::service::Path,
    /// Why that path ([`crate::Service::path`]'s reason word).
    #[serde(default)]
    pub path_reason: String,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortStatus {
    /// Port name.
    pub name: String,
    /// VIP port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// One VIP of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    /// Address.
    pub address: IpAddr,
    /// Owning node.
    pub owner: Option<NodeId>,
    /// The decision's reason word.
    pub reason: String,
    /// Conflicting MAC answers seen for this VIP while owned here.
    pub conflicts: u64,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Backend name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Weight.
    pub weight: u32,
    /// Active-check health.
    pub health: Health,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Whether outlier detection has ejected it.
    pub ejected: bool,
    /// Whether it is draining (removed, finishing connections).
    pub draining: bool,
    /// Open connections.
    pub active_connections: u64,
    /// Connections ever relayed.
    pub total_connections: u64,
    /// Failed connects.
    pub connect_failures: u64,
    /// Bytes relayed towards the backend.
    #[serde(default)]
    pub bytes_to_backend: u64,
    /// Bytes relayed towards the clients.
    #[serde(default)]
    pub bytes_to_client: u64,
}

/// Which addresses the DNS server publishes for a service right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DnsAnswerState {
    /// Only the healthy addresses (at least one is healthy).
    #[default]
    Healthy,
    /// Nothing is healthy: every address is answered (the default).
    FailOpen,
    /// Nothing is healthy: no address is answered (`fail_closed: true`).
    FailClosed,
}

/// One published DNS name of a service, as the DNS server answers it right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsNameStatus {
    /// Service name.
    pub service: String,
    /// Fully qualified name (`mysql.lb.example.com.`).
    pub name: String,
    /// VIPs or nodes.
    pub mode: crate::service::DnsMode,
    /// Healthy, fail-open or fail-closed.
    pub state: DnsAnswerState,
    /// The addresses in A/AAAA answers now (before rotation).
    pub addresses: Vec<IpAddr>,
    /// TTL of those answers, in seconds.
    pub ttl: u32,
}
