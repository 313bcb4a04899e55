//! The BGP resources, shaped like MetalLB's `BGPPeer` (v1beta2), `BGPAdvertisement` and
//! `BFDProfile` (v1beta1) so a MetalLB user recognises them: `BGPPeer` (a neighbour, for the
//! nodes its `nodeSelectors` select), `BGPAdvertisement` (which pools' addresses are announced
//! by BGP, from which nodes, with which attributes) and `BFDProfile` (BFD timers a `BGPPeer`
//! names).
//!
//! All are cluster-scoped. The agent turns them into the `bgp` section of its node
//! ([`crate::source::bgp`]) and re-validates every field there: a bad value is logged with the
//! resource and field, and the last valid version of that peer keeps running.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// A BGP neighbour of the nodes that `nodeSelectors` selects.
#[allow(clippy::duplicated_attributes)]
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    shortname = "bgpp",
    derive = "PartialEq",
    doc = "A BGP neighbour of the selected nodes.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.peerAddress"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.peerASN"),
    printcolumn(name = "My ASN", type_ = "integer", json_path = ".spec.myASN"),
    printcolumn(name = "BFD", type_ = "string", json_path = ".spec.bfdProfile")
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The local AS of the session (4-octet).
    #[serde(rename = "myASN")]
    #[schemars(range(min = 1))]
    pub my_asn: u32,
    /// The neighbour's AS (equal to `myASN`: iBGP).
    #[serde(rename = "peerASN")]
    #[schemars(range(min = 1))]
    pub peer_asn: u32,
    /// The neighbour's address (IPv4 or IPv6).
    pub peer_address: String,
    /// The neighbour's TCP port (179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer_port: Option<u16>,
    /// The local address of the session (and BFD); same family as `peerAddress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// The BGP identifier; default: the node's `InternalIP` (IPv4).
    #[serde(default, rename = "routerID", skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// Hold time offered (`90s`; 0 or at least 3 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    /// TCP MD5 password (RFC 2385), inline as MetalLB's `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// TCP MD5 password from a Secret in portico's namespace, as MetalLB's `passwordSecret`:
    /// a `kubernetes.io/basic-auth` Secret whose key `password` holds it. Not together with
    /// `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<k8s_openapi::api::core::v1::SecretReference>,
    /// BFD: `off` (the default), `default` (300 ms × 3), `fast` (10 ms × 3), timers written
    /// `<interval>x<multiplier>`, e.g. `50msx3`, or the name of a `BFDProfile` (those words
    /// and timers win over a `BFDProfile` of the same name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_profile: Option<String>,
    /// A multihop eBGP session (TTL 255 instead of a directly connected neighbour).
    #[serde(default, rename = "ebgpMultiHop")]
    pub ebgp_multi_hop: bool,
    /// Only accept the neighbour's connection, never connect.
    #[serde(default)]
    pub passive: bool,
    /// Graceful restart (RFC 4724, 120 s) so a restart of the agent keeps the routes; on by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<bool>,
    /// Nodes by label that peer with this neighbour (empty: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
}

/// Which Services' addresses are announced by BGP, from which nodes, with which attributes.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    plural = "bgpadvertisements",
    shortname = "bgpa",
    derive = "PartialEq",
    doc = "Which pools' addresses are announced by BGP, from which nodes, with which attributes."
)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    /// Pools by name (empty together with `ipAddressPoolSelectors`: every pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Pools by label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes by label that announce (empty: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Prefix length announced for IPv4 addresses (32: host routes). Shorter lengths announce
    /// the aggregate that holds the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub aggregation_length: Option<u8>,
    /// Prefix length announced for IPv6 addresses (128: host routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 128))]
    pub aggregation_length_v6: Option<u8>,
    /// Standard communities (`64512:100`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Large communities (`64512:1:2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    /// LOCAL_PREF (iBGP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// Announce from the node that owns the address only (elected as for L2), not from every
    /// node that serves it. The owner answers ARP / NDP only when an `L2Announcement` selects
    /// the pool too.
    #[serde(default)]
    pub owner_only: bool,
    /// Peers (`BGPPeer` names) to announce the selected pools' addresses to; empty: every
    /// peer. A name that is no peer of a node announces nothing to anyone from that node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

/// BFD timers a `BGPPeer` names in `bfdProfile`, shaped like MetalLB's `BFDProfile`
/// (metallb.io/v1beta1; cluster-scoped here like the other BGP resources). Portico's BFD
/// sends and requires one interval, runs in the active role and has no echo mode: the agent
/// refuses `echoMode: true`, `echoInterval`, `passiveMode: true`, `minimumTtl` and different
/// receive and transmit intervals, naming the field.
#[allow(clippy::duplicated_attributes)]
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "BFDProfile",
    plural = "bfdprofiles",
    shortname = "bfdp",
    derive = "PartialEq",
    doc = "BFD timers that BGPPeers name in bfdProfile.",
    printcolumn(name = "RX", type_ = "integer", json_path = ".spec.receiveInterval"),
    printcolumn(name = "TX", type_ = "integer", json_path = ".spec.transmitInterval"),
    printcolumn(name = "Mult", type_ = "integer", json_path = ".spec.detectMultiplier")
)]
#[serde(rename_all = "camelCase")]
pub struct BFDProfileSpec {
    /// Required minimum receive interval in milliseconds (300); equal to `transmitInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub receive_interval: Option<u32>,
    /// Desired minimum transmit interval in milliseconds (300); equal to `receiveInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub transmit_interval: Option<u32>,
    /// Detection multiplier: packets missed before the session is down (3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub detect_multiplier: Option<u32>,
    /// Echo interval (MetalLB's); refused: portico does not do echo mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_interval: Option<u32>,
    /// Echo mode (MetalLB's); only `false`: portico does not do echo mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_mode: Option<bool>,
    /// Passive mode (MetalLB's); only `false`: portico's BFD always sends first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_mode: Option<bool>,
    /// Minimum TTL of multihop packets (MetalLB's); refused: portico checks TTL 255 on single
    /// hop sessions (RFC 5881) and no minimum on multihop ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ttl: Option<u32>,
}

/// A node's BGP view of a Service in its `ServiceAnnouncement` entry (Services announced by
/// BGP only).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBgp {
    /// Per address: `announced`, or why this node does not announce it (`noHealthyBackend`,
    /// `notOwner`, `stopping`, …).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub routes: Vec<super::AddressReason>,
    /// This node's BGP sessions.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peer"]))]
    pub sessions: Vec<BgpSession>,
}

/// One BGP session of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpSession {
    /// The `BGPPeer` name.
    pub peer: String,
    /// The neighbour's address.
    pub address: String,
    /// `idle`, `connect`, `openSent`, `openConfirm` or `established`.
    pub state: String,
    /// When the session entered that state (its uptime when established).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Routes the neighbour has from this node.
    #[serde(default)]
    pub prefixes_sent: u64,
    /// Why the session last went down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// BFD state (`down`, `init`, `up`, `adminDown`); absent without BFD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<String>,
}

/// A [`k8s_openapi::apimachinery::pkg::apis::meta::v1::Time`] from a system time (`None`
/// when out of range).
pub fn time(
    t: std::time::SystemTime,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
}
