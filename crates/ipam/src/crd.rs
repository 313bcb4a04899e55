//! The custom resources of group `portico.dev/v1alpha1`: `IPPool`, `L2Announcement`,
//! `ServiceAnnouncement`, and the BGP ones (`BGPPeer`, `BGPAdvertisement`, `BFDProfile`, in
//! [`bgp`]).
//!
//! Field names follow MetalLB's `IPAddressPool` and `L2Advertisement` on purpose, so a MetalLB
//! user recognises them. The API server checks the shape and the CEL rules below when a
//! resource is applied; the controller re-validates every pool anyway ([`crate::allocator::parse_pool`]),
//! because a rule can be skipped (older API server, `--validate=false`, a CRD applied late).
//!
//! `IPPool` and `L2Announcement` are cluster-scoped (a pool serves every namespace it selects).
//! `ServiceAnnouncement` is namespaced and carries the Service's name: its status says which
//! node announces each address of the Service and why the other nodes do not.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub mod bgp;
pub use bgp::{
    BFDProfile, BFDProfileSpec, BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec,
    BgpSession, NodeBgp,
};

/// The API group of every portico resource.
pub const GROUP: &str = "portico.dev";

/// A pool of external addresses that Services get their addresses from.
// Each `printcolumn(...)` repeats `type_`; clippy reads them as one duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ipp",
    status = "IPPoolStatus",
    derive = "PartialEq",
    doc = "A pool of external addresses that Services get their addresses from.",
    printcolumn(name = "Addresses", type_ = "string", json_path = ".spec.addresses"),
    printcolumn(name = "Auto", type_ = "boolean", json_path = ".spec.autoAssign"),
    printcolumn(
        name = "IPv4 used",
        type_ = "integer",
        json_path = ".status.assignedIPv4"
    ),
    printcolumn(
        name = "IPv4 free",
        type_ = "integer",
        json_path = ".status.availableIPv4"
    ),
    printcolumn(
        name = "IPv6 used",
        type_ = "integer",
        json_path = ".status.assignedIPv6"
    ),
    printcolumn(
        name = "IPv6 free",
        type_ = "integer",
        json_path = ".status.availableIPv6"
    ),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    ),
    printcolumn(
        name = "Overlapping",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Overlapping\")].status"
    ),
    printcolumn(
        name = "Orphans",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Orphans\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// Addresses as CIDRs (`192.0.2.0/28`, `2001:db8::/120`) or inclusive ranges
    /// (`192.0.2.10-192.0.2.20`), IPv4 and IPv6 in one pool if wanted.
    #[x_kube(validation = kube::core::Rule::new("self.size() > 0").message("addresses must name at least one CIDR or range"))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(a, isCIDR(a) || (a.split('-').size() == 2 && isIP(a.split('-')[0].trim()) && isIP(a.split('-')[1].trim())))"
    ).message("every address must be a CIDR (192.0.2.0/24) or a range of two addresses (192.0.2.10-192.0.2.20)"))]
    // Bounds keep the CEL rule's estimated cost within the API server's budget.
    #[schemars(length(max = 128), inner(length(max = 100)))]
    pub addresses: Vec<String>,
    /// Whether Services that do not name this pool or an address may get addresses from it.
    #[serde(default = "yes")]
    pub auto_assign: bool,
    /// Skip addresses ending in `.0` and `.255`, which some old clients treat as broadcast.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Which Services may use this pool, and its priority among pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

fn yes() -> bool {
    true
}

/// Which Services a pool serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower numbers are tried first; pools without a priority come last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Namespaces whose Services may use the pool (empty: no restriction by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces selected by labels (any selector matching is enough).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Services selected by labels (any selector matching is enough).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

/// What the controller reports about a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// IPv4 addresses of the pool held by Services.
    #[serde(rename = "assignedIPv4")]
    pub assigned_ipv4: i64,
    /// IPv4 addresses still free (saturates at the largest 64-bit integer).
    #[serde(rename = "availableIPv4")]
    pub available_ipv4: i64,
    /// IPv6 addresses of the pool held by Services.
    #[serde(rename = "assignedIPv6")]
    pub assigned_ipv6: i64,
    /// IPv6 addresses still free (saturates at the largest 64-bit integer).
    #[serde(rename = "availableIPv6")]
    pub available_ipv6: i64,
    /// `Valid` (false with the reason when the spec is rejected), `Overlapping` (shares addresses
    /// with an older pool, so this one is refused), `Orphans` (Services hold addresses the pool
    /// no longer contains).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Addresses this pool contained, no longer contains, and Services still hold (kept until
    /// they are released; never given to anyone else).
    #[serde(default)]
    pub orphans: Vec<String>,
}

/// Which nodes announce which Services' addresses on the local network (ARP / NDP).
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "L2Announcement",
    plural = "l2announcements",
    shortname = "l2a",
    derive = "PartialEq",
    doc = "Which nodes announce which Services' addresses on the local network."
)]
#[serde(rename_all = "camelCase")]
pub struct L2AnnouncementSpec {
    /// Pools by name (empty together with `ipPoolSelectors`: every pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_pools: Vec<String>,
    /// Pools by label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_pool_selectors: Vec<LabelSelector>,
    /// Services by label (empty: every Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
    /// Nodes by label that may announce (empty: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to announce on (empty: the interface whose subnet holds the address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// Per-node announcement status of one Service, named and namespaced like the Service.
#[allow(clippy::duplicated_attributes)]
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "ServiceAnnouncement",
    plural = "serviceannouncements",
    shortname = "sva",
    namespaced,
    status = "ServiceAnnouncementStatus",
    derive = "PartialEq",
    doc = "Which node announces each address of a Service, or why none does.",
    printcolumn(
        name = "Announced",
        type_ = "string",
        json_path = ".status.nodes[?(@.owns)].owns[*]"
    ),
    printcolumn(
        name = "By",
        type_ = "string",
        json_path = ".status.nodes[?(@.owns)].node"
    ),
    printcolumn(
        name = "Reasons",
        type_ = "string",
        json_path = ".status.nodes[*].addresses[*].reason"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAnnouncementSpec {
    /// The Service this reports on (same namespace).
    pub service: String,
}

/// The announcement of a Service's addresses: one entry per node that has something to say.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAnnouncementStatus {
    /// Keyed by node; each agent applies only its own entry (server-side apply, field manager
    /// `portico-agent/<node>`): the owner of an address lists it, and when no node can own an
    /// address one agent (the first by name) says why. Entries of deleted Nodes are removed.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeAnnouncement>,
}

/// One node's view of a Service's addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAnnouncement {
    /// The node.
    pub node: String,
    /// The addresses this node announces (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owns: Vec<String>,
    /// This node's reason word per address (`owner`, `noEligibleNode`, `noHealthyEndpoints`, …).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub addresses: Vec<AddressReason>,
    /// For Services announced by BGP: this node's routes and sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgp>,
}

/// A reason word for one address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressReason {
    /// The address.
    pub address: String,
    /// The reason word.
    pub reason: String,
}

/// Every CRD, in the order `portico crds` prints them.
pub fn all()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        IPPool::crd(),
        L2Announcement::crd(),
        ServiceAnnouncement::crd(),
        BGPPeer::crd(),
        BGPAdvertisement::crd(),
        BFDProfile::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream (what `portico crds` prints and
/// `deploy/crds.yaml` holds).
pub fn yaml() -> String {
    let mut out = String::from(
        "# Generated by `portico crds`; do not edit. `cargo test -p ipam` fails when stale.\n",
    );
    for crd in all() {
        out.push_str("---\n");
        // A CRD always serialises: it is plain data with string keys.
        out.push_str(&serde_saphyr::to_string(&crd).expect("a CRD serialises to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crds_match_the_rust_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        if committed != yaml() {
            if std::env::var_os("PORTICO_BLESS").is_some() {
                std::fs::write(path, yaml()).expect("write deploy/crds.yaml");
            } else {
                panic!(
                    "deploy/crds.yaml is stale: run `PORTICO_BLESS=1 cargo test -p ipam crd` or `portico crds > deploy/crds.yaml`"
                );
            }
        }
    }

    #[test]
    fn a_pool_defaults_to_auto_assign() {
        let spec: IPPoolSpec =
            serde_json::from_value(serde_json::json!({"addresses": ["192.0.2.0/24"]})).unwrap();
        assert!(spec.auto_assign);
        assert!(!spec.avoid_buggy_ips);
    }

    #[test]
    fn the_pool_schema_carries_its_cel_rules() {
        let s = serde_json::to_string(&IPPool::crd()).unwrap();
        assert!(s.contains("x-kubernetes-validations"), "{s}");
        assert!(s.contains("isCIDR(a)"));
        assert!(s.contains("avoidBuggyIPs"), "MetalLB's field name: {s}");
    }

    #[test]
    fn kubectl_get_ippools_shows_validity_overlap_orphans_and_ipv6_free() {
        let crd = IPPool::crd();
        let cols: Vec<(String, String)> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.json_path.clone()))
            .collect();
        for (name, path) in [
            ("IPv6 free", ".status.availableIPv6"),
            ("Valid", ".status.conditions[?(@.type==\"Valid\")].status"),
            (
                "Overlapping",
                ".status.conditions[?(@.type==\"Overlapping\")].status",
            ),
            (
                "Orphans",
                ".status.conditions[?(@.type==\"Orphans\")].status",
            ),
        ] {
            assert!(
                cols.contains(&(name.into(), path.into())),
                "{name}: {cols:?}"
            );
        }
    }

    #[test]
    fn the_crds_yaml_parses_back() {
        let y = yaml();
        let docs: Vec<&str> = y.split("---\n").skip(1).collect();
        assert_eq!(docs.len(), 6);
        for doc in docs {
            let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
                serde_saphyr::from_str(doc).unwrap();
            assert_eq!(crd.spec.group, GROUP);
        }
    }
}
