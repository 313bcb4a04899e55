//! Domain types of the desired state: services, VIPs, ports, backends and their policies.
//!
//! These are the validated, defaults-filled shapes that every consumer reads. A source (the
//! standalone YAML file today, Kubernetes later) produces them; nothing else constructs them
//! outside tests. Durations serialise as human strings (`"1s"`, `"250ms"`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::human;

/// The name of a node in the cluster (Kubernetes Node name or the standalone `node.name`).
pub type NodeId = String;

/// The whole desired state of one portico instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This node's identity and interfaces.
    pub node: Node,
    /// Gossip membership and VIP failover settings.
    pub cluster: Cluster,
    /// The admin HTTP server.
    pub admin: Admin,
    /// The authoritative DNS server, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Services to balance.
    pub services: Vec<Service>,
    /// What a graceful stop (SIGTERM) does after the VIPs are handed over.
    pub shutdown: Shutdown,
    /// The BGP speaker, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::Bgp>,
    /// The user-space proxy's threads.
    #[serde(default)]
    pub proxy: Proxy,
}

/// The user-space proxy (TCP accept and relay) settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    /// Worker threads, each with its own runtime and its own `SO_REUSEPORT` listener per TCP
    /// `VIP:port` (the kernel spreads new connections over them); `None`: one per CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// How the workers move a connection's bytes once its first bytes passed.
    #[serde(default)]
    pub io: ProxyIo,
}

/// The proxy workers' relay (`proxy.io`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyIo {
    /// tokio's `read` / `write`, `splice(2)` for bulk transfers.
    Epoll,
    /// As `Epoll` until a connection proves long-lived; then each worker's io_uring: receives
    /// and sends batched into one system call per turn of the worker's loop. A worker that
    /// cannot make a ring relays as `Epoll`.
    #[default]
    Uring,
}

impl Proxy {
    /// Most worker threads the config accepts.
    pub const MAX_WORKERS: u32 = 256;
}

/// Graceful stop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shutdown {
    /// How long connections this node can still serve may finish after the VIPs are handed
    /// over; connections to a VIP that left the node end at once.
    #[serde(with = "human")]
    pub drain_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// This node's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node name (defaults to the host name).
    pub name: NodeId,
    /// Interfaces on which VIPs may be announced.
    pub interfaces: Vec<Interface>,
}

/// A network interface that can carry VIPs, with the node's own subnets on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// Kernel interface name, e.g. `eth0`.
    pub name: String,
    /// The node's addresses with prefix on this interface (`10.0.0.11/24`). A VIP is
    /// announced on the interface whose subnet contains it.
    pub addresses: Vec<ipnet::IpNet>,
}

impl Interface {
    /// Whether this interface has an address of the same family as `ip`.
    pub fn serves_family(&self, ip: IpAddr) -> bool {
        self.addresses
            .iter()
            .any(|n| n.addr().is_ipv4() == ip.is_ipv4())
    }
}

/// How quickly failures are detected; trades gossip traffic for failover time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailureProfile {
    /// Failover in about 100 ms: a heartbeat (~80 bytes) every 40 ms to each peer, dead after 100 ms.
    #[default]
    Default,
    /// Failover under 50 ms: a heartbeat every 10 ms to each peer (100/s), dead after 30 ms.
    Fast,
}

/// How the agent (heartbeats, their reception, the owner decisions and ARP/NDP answers) is
/// scheduled: a node that misses its own timer under load looks dead to its peers, and its
/// peers' heartbeats look late to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AgentPriority {
    /// A thread of its own under real-time round-robin scheduling (keepalived's
    /// `vrrp_rt_priority`), falling back to `high` without `CAP_SYS_NICE`.
    #[default]
    Realtime,
    /// A thread of its own at nice -20 (keepalived's `vrrp_priority`), falling back to normal.
    High,
    /// On the process's shared runtime at the process's priority.
    Normal,
}

/// Gossip membership and VIP failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// UDP address the gossip socket binds.
    pub bind: SocketAddr,
    /// Address peers use to reach this node (defaults to `bind`).
    pub advertise: SocketAddr,
    /// The other members.
    pub peers: Vec<Peer>,
    /// Keys that authenticate and encrypt gossip. The first one sends; all are accepted.
    #[serde(skip_serializing)]
    pub keys: Vec<ClusterKey>,
    /// Failure-detection profile.
    pub profile: FailureProfile,
    /// How the agent's heartbeat thread is scheduled.
    pub priority: AgentPriority,
    /// Whether a returning preferred node takes its VIPs back.
    pub preemptive: bool,
    /// How long a node must be stably alive before it may take a VIP back.
    #[serde(with = "human")]
    pub hold_down: Duration,
    /// Gratuitous ARP / unsolicited NA burst on takeover.
    pub announce: AnnounceTiming,
}

/// One gossip peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's node name.
    pub name: NodeId,
    /// Its gossip address.
    pub address: SocketAddr,
}

/// A shared cluster key with its id byte (rotation: accept old and new, send new).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKey {
    /// Key id carried in every packet.
    pub id: u8,
    /// 32 secret bytes.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey {{ id: {}, secret: <redacted> }}", self.id)
    }
}

/// Gratuitous ARP / NA timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnounceTiming {
    /// Packets sent on takeover (the first immediately).
    pub count: u32,
    /// Gap between them.
    #[serde(with = "human")]
    pub interval: Duration,
    /// Periodic refresh for routers that ignore gratuitous ARP (0 = off).
    #[serde(with = "human")]
    pub refresh: Duration,
}

/// The admin HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Admin {
    /// Listen address (`127.0.0.1:9440`).
    pub listen: SocketAddr,
}

/// Authoritative DNS settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// Zones served; services are published in the first unless they name one.
    pub zones: Vec<Zone>,
}

/// One authoritative zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Zone {
    /// Apex, fully qualified, lower case, with trailing dot (`lb.example.`).
    pub name: String,
    /// Default TTL of service records.
    #[serde(with = "human")]
    pub ttl: Duration,
    /// Name servers (NS records at the apex).
    pub ns: Vec<String>,
    /// SOA RNAME (mailbox as a domain name).
    pub admin_email: String,
    /// SOA serial.
    pub serial: u32,
    /// Negative-caching TTL (SOA minimum).
    #[serde(with = "human")]
    pub negative_ttl: Duration,
}

/// A load-balanced service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Unique name (a DNS label).
    pub name: String,
    /// External addresses (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    /// Listening ports.
    pub ports: Vec<Port>,
    /// Backends.
    pub backends: Vec<Backend>,
    /// Backend choice.
    pub balance: Balance,
    /// Active health check; none (`type: none`) means backends are always considered up.
    #[serde(with = "check_or_none")]
    pub health_check: Option<HealthCheck>,
    /// Connection limits.
    pub circuit_breaker: CircuitBreaker,
    /// Passive outlier detection.
    pub outlier: Outlier,
    /// Connection timeouts and retries.
    pub connection: Connection,
    /// PROXY protocol towards backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Which nodes may announce the VIPs.
    pub placement: Placement,
    /// DNS publication.
    pub dns: ServiceDns,
    /// Kernel (nftables DNAT) or user-space proxy; `auto` picks the kernel unless the service
    /// needs the proxy (see [`Service::path`]).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Kernel path only: keep the client's address (no SNAT to the node). Backends must then
    /// route their replies through this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_client_address: bool,
    /// How the VIPs reach this node: ARP / NDP (`l2`), BGP routes (`bgp`) or both.
    #[serde(default)]
    pub announce: crate::bgp::AnnounceMode,
    /// BGP route settings (with `announce: bgp` or `both`).
    #[serde(default, skip_serializing_if = "crate::bgp::ServiceBgp::is_default")]
    pub bgp: crate::bgp::ServiceBgp,
}

/// Which data path a service asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// The kernel unless the service uses something only the proxy does.
    #[default]
    Auto,
    /// nftables DNAT in the kernel (portico's `inet portico` table).
    Kernel,
    /// The user-space proxy (`lb`).
    Proxy,
}

/// The data path a service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// The user-space proxy.
    #[default]
    Proxy,
    /// nftables DNAT.
    Kernel,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Proxy => "proxy",
            Path::Kernel => "kernel",
        })
    }
}

/// What this node's kernel path can do (`kernel::Kernel::probe` finds out at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelSupport {
    /// The node programs nftables and forwards IPv4: the kernel path runs.
    pub available: bool,
    /// The node forwards IPv6 (`net.ipv6.conf.all.forwarding` 1): services with IPv6 VIPs may
    /// run on the kernel path.
    pub ipv6: bool,
}

impl From<bool> for KernelSupport {
    /// The kernel path with both families (`true`) or none (`false`).
    fn from(available: bool) -> Self {
        Self {
            available,
            ipv6: available,
        }
    }
}

impl Service {
    /// What only the proxy can do for this service, as a reason word, if anything: PROXY
    /// protocol (`proxyProtocol`), the connect retry of a MySQL service before the client saw
    /// a byte (`mysqlRetry`), connection limits with their queue (`connectionLimits`),
    /// connection-aware balancing (`connectionAware`: least-connections, power-of-two), or a
    /// loopback VIP or backend (`loopback`: the kernel does not route 127/8 or ::1 from the
    /// prerouting hook).
    pub fn needs_proxy(&self) -> Option<&'static str> {
        if self.proxy_protocol.is_some() {
            return Some("proxyProtocol");
        }
        if self.connection.retries > 0
            && matches!(
                self.health_check.as_ref().map(|h| &h.kind),
                Some(CheckKind::Mysql { .. })
            )
        {
            return Some("mysqlRetry");
        }
        if self.circuit_breaker.max_connections > 0
            || self.circuit_breaker.max_service_connections > 0
        {
            return Some("connectionLimits");
        }
        if matches!(
            self.balance,
            Balance::LeastConnections | Balance::PowerOfTwo
        ) {
            return Some("connectionAware");
        }
        if self.vips.iter().any(IpAddr::is_loopback)
            || self.backends.iter().any(|b| b.address.is_loopback())
        {
            return Some("loopback");
        }
        None
    }

    /// The path this service runs on and the reason word (`/status`, logs and metrics use the
    /// same): `configured` (as `forwarding` says), `auto` (nothing needs the proxy), one of
    /// [`Self::needs_proxy`]'s words, `kernelUnavailable` (this node cannot program
    /// nftables; the proxy serves instead), or `ipv6ForwardingOff` (the service has an IPv6
    /// VIP and this node does not forward IPv6: DNAT to a backend on another host would be
    /// dropped, so the proxy serves, also with `forwarding: kernel`, as without a kernel path).
    pub fn path(&self, kernel: impl Into<KernelSupport>) -> (Path, &'static str) {
        let kernel: KernelSupport = kernel.into();
        let v6_off = kernel.available && !kernel.ipv6 && self.vips.iter().any(IpAddr::is_ipv6);
        match self.forwarding {
            Forwarding::Proxy => (Path::Proxy, "configured"),
            Forwarding::Kernel if v6_off => (Path::Proxy, "ipv6ForwardingOff"),
            Forwarding::Kernel if kernel.available => (Path::Kernel, "configured"),
            Forwarding::Kernel => (Path::Proxy, "kernelUnavailable"),
            Forwarding::Auto => match self.needs_proxy() {
                Some(why) => (Path::Proxy, why),
                None if v6_off => (Path::Proxy, "ipv6ForwardingOff"),
                None if kernel.available => (Path::Kernel, "auto"),
                None => (Path::Proxy, "kernelUnavailable"),
            },
        }
    }
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    /// Port name (for SRV records and metrics).
    pub name: String,
    /// Port on the VIPs.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Port on the backends (defaults to `port`).
    pub target_port: u16,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    /// Name shown in status and metrics (defaults to `address`).
    pub name: String,
    /// Backend address.
    pub address: IpAddr,
    /// Port override for single-port services; otherwise each port's `target_port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative weight (1-1000); 0 drains the backend.
    pub weight: u32,
    /// The node this backend runs on (for local-only placement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
}

impl Backend {
    /// The backend socket for a service port.
    pub fn target(&self, port: &Port) -> SocketAddr {
        SocketAddr::new(self.address, self.port.unwrap_or(port.target_port))
    }
}

/// Backend selection algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Smooth weighted round-robin.
    #[default]
    RoundRobin,
    /// Fewest active connections (weighted).
    LeastConnections,
    /// Two random choices, fewer connections wins.
    PowerOfTwo,
    /// Maglev consistent hashing on the client address.
    Maglev,
}

/// Active health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What to check (serialised flat, as the config file writes it: `type: http, path: /`).
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Port to check (defaults to the backend's first target port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Time between checks.
    #[serde(with = "human")]
    pub interval: Duration,
    /// Per-check timeout.
    #[serde(with = "human")]
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that bring an up backend down.
    pub fall: u32,
}

/// Kind of active check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    /// TCP connect succeeds.
    Tcp,
    /// HTTP GET returns the expected status.
    Http {
        /// Request path.
        path: String,
        /// Expected status code.
        expect_status: u16,
        /// Host header (defaults to the backend address).
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// MySQL/MariaDB: a server greeting with protocol version 10 and a server version; with
    /// `user`, also a login (`mysql_native_password`).
    Mysql {
        /// Log in as this user after the greeting (off by default: the greeting is the check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// File holding the user's password, read at every load and reload.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_file: Option<String>,
        /// The password read from `password_file` (never serialised or logged).
        #[serde(skip)]
        password: Option<Password>,
    },
}

impl CheckKind {
    /// A MySQL check without login (greeting and version only).
    pub const MYSQL: CheckKind = CheckKind::Mysql {
        user: None,
        password_file: None,
        password: None,
    };
}

/// A password read from a file: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Connection limits (circuit breaking).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    /// Concurrent connections per backend (0 = unlimited).
    pub max_connections: u32,
    /// Concurrent connections for the whole service (0 = unlimited).
    pub max_service_connections: u32,
    /// Connections waiting for a slot; beyond this they are refused at once.
    pub max_pending: u32,
    /// How long a connection may wait for a slot.
    #[serde(with = "human")]
    pub queue_timeout: Duration,
}

/// Passive outlier detection (Envoy's meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    /// Consecutive connect failures or resets that eject a backend (0 = off).
    pub consecutive_failures: u32,
    /// Ejection time is `base_ejection_time × ejection count`…
    #[serde(with = "human")]
    pub base_ejection_time: Duration,
    /// …capped at this.
    #[serde(with = "human")]
    pub max_ejection_time: Duration,
    /// At most this share of backends is ejected at once.
    pub max_ejection_percent: u32,
    /// Below this share of healthy backends, balance over all (panic mode).
    pub panic_threshold_percent: u32,
    /// Kernel path: follow conntrack events to see refused and unanswered connections (off by
    /// default: the node then reads an event per state change of every flow it tracks).
    #[serde(default)]
    pub conntrack_events: bool,
}

/// Connection handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    /// Backend connect timeout.
    #[serde(with = "human")]
    pub connect_timeout: Duration,
    /// Other backends tried when a connect fails.
    pub retries: u32,
    /// Idle timeout of a relayed TCP connection.
    #[serde(with = "human")]
    pub idle_timeout: Duration,
    /// How long a removed backend keeps its connections.
    #[serde(with = "human")]
    pub drain_timeout: Duration,
    /// Idle timeout of a UDP session (seconds, not minutes: each holds a socket).
    #[serde(with = "human")]
    pub udp_idle_timeout: Duration,
    /// UDP sessions per `VIP:port`; beyond it the oldest idle one is evicted or the new client
    /// refused.
    pub max_udp_sessions: u32,
    /// UDP sessions per client address and `VIP:port`.
    pub max_udp_sessions_per_client: u32,
}

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Text header.
    V1,
    /// Binary header.
    V2,
}

/// Which nodes may announce a service's VIPs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Placement {
    /// Nodes allowed to announce (empty = all).
    pub nodes: Vec<NodeId>,
    /// Nodes preferred as owners, in order.
    pub preferred: Vec<NodeId>,
    /// Only nodes with a healthy local backend are eligible.
    pub local_only: bool,
    /// The addresses are withdrawn because the service has no serving endpoint (Kubernetes:
    /// no ready or serving endpoint); no node announces them and every node says
    /// `noHealthyEndpoints`. Not read from the standalone file (a file service with no
    /// backends keeps its VIPs and says so in its health instead).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
}

/// What DNS answers for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// The VIPs that have an owner and a healthy backend.
    #[default]
    Vips,
    /// The addresses of the healthy nodes (backends) that serve it.
    Nodes,
}

/// DNS publication of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDns {
    /// Publish at all.
    pub enabled: bool,
    /// Host name inside the zone (defaults to the service name).
    pub hostname: String,
    /// Zone (defaults to the first zone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// TTL (defaults to the zone's).
    #[serde(skip_serializing_if = "Option::is_none", with = "human::option")]
    #[serde(default)]
    pub ttl: Option<Duration>,
    /// VIPs or nodes.
    pub mode: DnsMode,
    /// When nothing is healthy: answer nothing (true) or every address (false).
    pub fail_closed: bool,
}

/// Serialises `None` as `{type: none}`, so the effective config reads back the same.
mod check_or_none {
    use super::HealthCheck;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum NoneTag {
        None,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        None(NoneTag),
        Some(HealthCheck),
    }

    pub fn serialize<S: Serializer>(v: &Option<HealthCheck>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(hc) => hc.serialize(s),
            None => NoneTag::None.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HealthCheck>, D::Error> {
        Ok(match Either::deserialize(d)? {
            Either::None(_) => None,
            Either::Some(hc) => Some(hc),
        })
    }
}
