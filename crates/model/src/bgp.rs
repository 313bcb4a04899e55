//! BGP announcement: the `bgp:` section (local AS, router id, peers) and each service's
//! announce mode, plus the pure route decision (which VIPs this node announces and why).
//!
//! The decision is a function of the desired state, this node's health view and the agent's
//! ownership view: every node whose balancer has a healthy backend for a `bgp` (or `both`)
//! service announces its VIPs as host routes, so the router spreads traffic over them (ECMP);
//! a node without one withdraws, with the reason word that `/status` shows.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::human;
use crate::service::{Config, NodeId, Password, Service};
use crate::state::{HealthView, OwnershipView};

/// The node's BGP speaker: its AS, router id and neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bgp {
    /// Local AS number (4-octet).
    pub asn: u32,
    /// BGP identifier; `None`: the node's first IPv4 address (the binary resolves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
    /// On a graceful stop, how long to wait after the withdrawals were sent before draining,
    /// so the peers have moved the traffic away.
    #[serde(with = "human")]
    pub graceful_stop_grace: Duration,
    /// Neighbours.
    pub peers: Vec<BgpPeer>,
    /// Whether segments of connections this node does not hold are copied to the other
    /// cluster members (the ECMP rescue, `portico::ecmp`); default on.
    #[serde(default = "yes")]
    pub ecmp_rescue: bool,
}

fn yes() -> bool {
    true
}

/// One BGP neighbour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BgpPeer {
    /// Name for logs, metrics and status.
    pub name: String,
    /// The neighbour's address.
    pub address: IpAddr,
    /// The neighbour's AS (equal to the local AS: iBGP).
    pub asn: u32,
    /// The local AS of this session; `None`: `bgp.asn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_asn: Option<u32>,
    /// TCP port (179).
    pub port: u16,
    /// Local address of the session (and BFD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    /// File holding the TCP MD5 password (RFC 2385).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// The password read from `password_file` (never serialised or logged).
    #[serde(skip)]
    pub password: Option<Password>,
    /// Hold time offered (0 or at least 3 s).
    #[serde(with = "human")]
    pub hold_time: Duration,
    /// Only accept the neighbour's connection, never connect.
    pub passive: bool,
    /// Multihop session with this TTL; `None`: single hop (TTL 255).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multihop: Option<u8>,
    /// BFD timers; `None`: no BFD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdProfile>,
    /// Graceful restart time advertised (RFC 4724); `None`: off.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "human::option"
    )]
    pub graceful_restart: Option<Duration>,
}

/// BFD timers of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdProfile {
    /// Desired transmit and required receive interval.
    #[serde(with = "human")]
    pub interval: Duration,
    /// Detection multiplier.
    pub multiplier: u8,
}

impl BfdProfile {
    /// `bfd: default`: 300 ms × 3.
    pub const DEFAULT: BfdProfile = BfdProfile {
        interval: Duration::from_millis(300),
        multiplier: 3,
    };
    /// `bfd: fast`: 10 ms × 3.
    pub const FAST: BfdProfile = BfdProfile {
        interval: Duration::from_millis(10),
        multiplier: 3,
    };
}

/// How a service's VIPs reach this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnnounceMode {
    /// One owner answers ARP / NDP (the default).
    #[default]
    L2,
    /// Every serving node announces a host route by BGP (ECMP at the router); no ARP.
    Bgp,
    /// Both: the L2 owner as with `l2`, and BGP routes as with `bgp`.
    Both,
}

impl AnnounceMode {
    /// Whether the VIPs are announced by BGP.
    pub fn bgp(self) -> bool {
        matches!(self, AnnounceMode::Bgp | AnnounceMode::Both)
    }

    /// Whether the VIPs are announced by ARP / NDP.
    pub fn l2(self) -> bool {
        matches!(self, AnnounceMode::L2 | AnnounceMode::Both)
    }
}

/// A standard community (RFC 1997), written `asn:value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Community(pub u32);

impl std::fmt::Display for Community {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

impl std::str::FromStr for Community {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a community; write asn:value, each 0-65535, e.g. 64512:100");
        let (a, b) = s.split_once(':').ok_or_else(bad)?;
        let a: u16 = a.parse().map_err(|_| bad())?;
        let b: u16 = b.parse().map_err(|_| bad())?;
        Ok(Community(u32::from(a) << 16 | u32::from(b)))
    }
}

/// A large community (RFC 8092), written `global:local1:local2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LargeCommunity(pub [u32; 3]);

impl std::fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.0[0], self.0[1], self.0[2])
    }
}

impl std::str::FromStr for LargeCommunity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a large community; write global:local1:local2, each 0-4294967295, e.g. 64512:1:2"
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let [a, b, c] = parts.as_slice() else {
            return Err(bad());
        };
        let n = |x: &str| x.parse::<u32>().map_err(|_| bad());
        Ok(LargeCommunity([n(a)?, n(b)?, n(c)?]))
    }
}

macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(Community);
serde_as_string!(LargeCommunity);

/// A service's BGP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceBgp {
    /// Announce from the L2 owner only (needs `announce: both`), not from every serving node.
    pub owner_only: bool,
    /// Communities attached to the routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
    /// Large communities attached to the routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<LargeCommunity>,
    /// LOCAL_PREF (iBGP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub med: Option<u32>,
    /// Prefix length of the route announced for an IPv4 VIP; `None`: 32 (a host route).
    /// Shorter: the VIP masked to it, so several VIPs in one aggregate make one route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_length: Option<u8>,
    /// The same for IPv6 VIPs; `None`: 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_length_v6: Option<u8>,
    /// The peers (`bgp.peers[].name`) the routes go to; empty: every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

impl ServiceBgp {
    /// Whether nothing is set (the effective config leaves it out).
    pub fn is_default(&self) -> bool {
        *self == ServiceBgp::default()
    }
}

/// The prefix announced for `vip`: the VIP masked to the service's aggregation length for its
/// family (a host route by default). Lengths beyond the family's are clamped (validation
/// refuses them). Pure.
pub fn announced_prefix(vip: IpAddr, attrs: &ServiceBgp) -> (IpAddr, u8) {
    match vip {
        IpAddr::V4(a) => {
            let len = attrs.aggregation_length.unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            (IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), len)
        }
        IpAddr::V6(a) => {
            let len = attrs.aggregation_length_v6.unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            (
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & mask)),
                len,
            )
        }
    }
}

/// Why this node announces a VIP by BGP or not (the word `/status` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteReason {
    /// Announced: this node serves the service.
    Announced,
    /// Placement does not select this node.
    NotSelected,
    /// A local-only service without a healthy backend on this node.
    NoHealthyLocalBackend,
    /// No backend of the service is healthy from this node.
    NoHealthyBackend,
    /// The service has no serving endpoint anywhere (`placement.withdrawn`).
    NoHealthyEndpoints,
    /// `owner_only` and another node (or none) owns the VIP.
    NotOwner,
    /// Graceful stop: everything is withdrawn before draining.
    Stopping,
}

impl RouteReason {
    /// The word shown in `/status`, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Announced => "announced",
            RouteReason::NotSelected => "notSelected",
            RouteReason::NoHealthyLocalBackend => "noHealthyLocalBackend",
            RouteReason::NoHealthyBackend => "noHealthyBackend",
            RouteReason::NoHealthyEndpoints => "noHealthyEndpoints",
            RouteReason::NotOwner => "notOwner",
            RouteReason::Stopping => "stopping",
        }
    }
}

/// One VIP's BGP decision on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecision {
    /// The service the VIP belongs to.
    pub service: String,
    /// Announced or why not.
    pub reason: RouteReason,
    /// The attributes to announce it with.
    pub attrs: ServiceBgp,
}

impl RouteDecision {
    /// Whether the VIP is announced.
    pub fn announced(&self) -> bool {
        self.reason == RouteReason::Announced
    }
}

/// Every BGP VIP's decision on this node, by VIP.
pub type RouteDecisions = BTreeMap<IpAddr, RouteDecision>;

/// Decides, for every VIP of every `bgp`/`both` service, whether this node (`me`) announces
/// it: the service must select this node, have a serving backend here (a passed check on this
/// node for `local_only`), not be withdrawn, and with `owner_only` be owned here. `stopping`
/// withdraws everything (graceful stop). Pure.
pub fn decide(
    cfg: &Config,
    me: &NodeId,
    health: &HealthView,
    own: &OwnershipView,
    stopping: bool,
) -> RouteDecisions {
    let mut out = RouteDecisions::new();
    for s in cfg.services.iter().filter(|s| s.announce.bgp()) {
        for vip in &s.vips {
            let reason = if stopping {
                RouteReason::Stopping
            } else {
                reason(s, *vip, me, health, own)
            };
            out.insert(
                *vip,
                RouteDecision {
                    service: s.name.clone(),
                    reason,
                    attrs: s.bgp.clone(),
                },
            );
        }
    }
    out
}

fn reason(
    s: &Service,
    vip: IpAddr,
    me: &NodeId,
    health: &HealthView,
    own: &OwnershipView,
) -> RouteReason {
    if s.placement.withdrawn {
        return RouteReason::NoHealthyEndpoints;
    }
    if !s.placement.nodes.is_empty() && !s.placement.nodes.contains(me) {
        return RouteReason::NotSelected;
    }
    let state = |b: &crate::service::Backend| {
        health
            .get(&crate::state::BackendKey::new(&s.name, &b.name))
            .copied()
            .unwrap_or_default()
    };
    let live = s.backends.iter().filter(|b| b.weight > 0);
    if s.placement.local_only {
        // as for L2 eligibility: a local backend must have passed a check
        if !live
            .clone()
            .any(|b| b.node.as_ref() == Some(me) && state(b) == crate::state::Health::Up)
        {
            return RouteReason::NoHealthyLocalBackend;
        }
    } else if !live.clone().any(|b| state(b).is_serving()) {
        return RouteReason::NoHealthyBackend;
    }
    if s.bgp.owner_only && own.get(&vip).and_then(|o| o.owner.as_ref()) != Some(me) {
        return RouteReason::NotOwner;
    }
    RouteReason::Announced
}

/// The configuration the agent works from: `bgp`-only services left out, except those with
/// `owner_only`, whose owner the agent elects (their VIPs are never announced by ARP / NDP:
/// the agent's announcers take only `l2`/`both` VIPs, and the BGP side puts them on `lo`).
pub fn l2_view(cfg: &Config) -> Config {
    let mut c = cfg.clone();
    c.services.retain(|s| s.announce.l2() || s.bgp.owner_only);
    c
}

#[cfg(test)]
mod tests;
