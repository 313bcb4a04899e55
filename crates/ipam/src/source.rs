//! The agent's source: Services, EndpointSlices, Nodes, IPPools, L2Announcements, BGPPeers,
//! BGPAdvertisements, BFDProfiles (see [`bgp`]), the gossip Secret and the Secrets `BGPPeer`s name, turned into the same [`model::Desired`] the standalone config produces.
//!
//! [`build`] is pure: a [`Snapshot`] of the caches in, a [`model::Config`] out. [`spawn`] keeps the
//! caches from watches and publishes a new [`Desired`](model::Desired) whenever the config changes. When the API
//! server is unreachable the caches, and so the published state, stay as they were: nothing is
//! withdrawn because the API is gone. Watches resume with back-off and re-list.
//!
//! Naming: a Service `web` in namespace `shop` becomes the model service `shop/web` (see
//! [`model_name`]; `/` appears in neither a namespace nor a name, so two Services never share a
//! model name), published in DNS as `web.shop` (inside the zone) unless `portico.dev/hostname`
//! says otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use model::{Config, Peer};

use crate::allocator::{AddrRange, parse_pool};
use crate::crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPPool, L2Announcement};
use crate::intent::Scope;

/// Nodes with this label take no external load-balancer traffic (the Kubernetes convention).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The label EndpointSlices carry with their Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Secret data keys holding gossip keys: `key` (id 1) or `key-<id>`; the highest id sends.
pub const GOSSIP_SECRET_KEY: &str = "key";

/// The model service name of the Service `name` in `namespace`: `namespace/name`. Neither part
/// can contain `/`, so the name is unambiguous (`team-a/web` and `team/a-web` stay apart, where
/// `<namespace>-<name>` would make both `team-a-web`).
pub fn model_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

pub mod bgp;
mod events;
mod gossip;
mod l2;
mod service;
pub use events::{Input, Receivers, Source, inputs, spawn};
pub use gossip::{gossip_keys, refused_gossip_keys};
use l2::announcing_interfaces;
pub use service::origins;

/// Errors of the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service template could not be built from the model's defaults (a bug).
    #[error("cannot build the service template from the model defaults: {0}")]
    Template(String),
}

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (downward API `spec.nodeName`).
    pub node: String,
    /// Which Services portico serves.
    pub scope: Scope,
    /// The node-local base config: interfaces, admin, DNS, cluster timing. Its services are ignored.
    pub base: Config,
    /// Gossip UDP port on every node.
    pub gossip_port: u16,
    /// The host's interfaces and their addresses, read at start. When the base config names no
    /// interfaces (the shipped DaemonSet runs without `--config`), the node announces on the
    /// ones that hold its Node object's `InternalIP`.
    pub host_interfaces: Vec<model::Interface>,
}

/// Everything the agent watches.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// EndpointSlices by (namespace, name).
    pub slices: BTreeMap<(String, String), EndpointSlice>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Pools by name.
    pub pools: BTreeMap<String, IPPool>,
    /// L2 announcements by name.
    pub l2: BTreeMap<String, L2Announcement>,
    /// The gossip Secret.
    pub secret: Option<Secret>,
    /// BGP peers by name.
    pub bgp_peers: BTreeMap<String, BGPPeer>,
    /// BGP advertisements by name.
    pub bgp_ads: BTreeMap<String, BGPAdvertisement>,
    /// BFD profiles by name.
    pub bfd_profiles: BTreeMap<String, BFDProfile>,
    /// The Secrets in portico's namespace by name (a `BGPPeer`'s `passwordSecret`).
    pub bgp_secrets: BTreeMap<String, Secret>,
    /// The last valid spec of each BGP resource (kept by [`Source`]).
    pub bgp_last_good: bgp::LastGood,
}

/// The model service every Kubernetes Service starts from: the standalone defaults.
pub fn template() -> Result<model::Service, Error> {
    let src = "node:\n  interfaces:\n    - name: t\n      addresses: [192.0.2.1/24]\n\
               services:\n  - name: t\n    vips: [192.0.2.10]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.0.1}]\n";
    let cfg = model::config::parse(src, &model::config::Environment::default())
        .map_err(|e| Error::Template(e.to_string()))?;
    cfg.services
        .into_iter()
        .next()
        .ok_or_else(|| Error::Template("no service".into()))
}

/// Builds the desired config from a snapshot (pure).
pub fn build(snap: &Snapshot, settings: &Settings, template: &model::Service) -> Config {
    let mut cfg = settings.base.clone();
    cfg.node.name = settings.node.clone();
    cfg.cluster.peers = peers(snap, settings);
    if let Some(me) = internal_ip(snap.nodes.get(&settings.node)) {
        cfg.cluster.advertise = SocketAddr::new(me, settings.gossip_port);
        if settings.base.node.interfaces.is_empty() {
            cfg.node.interfaces = interfaces_holding(&settings.host_interfaces, me);
        }
    }
    cfg.cluster.bind.set_port(settings.gossip_port);
    let keys = gossip_keys(snap.secret.as_ref());
    if !keys.is_empty() {
        cfg.cluster.keys = keys;
    }
    if let Some(names) = announcing_interfaces(snap, &settings.node) {
        cfg.node.interfaces.retain(|i| names.contains(&i.name));
    }
    let pools: Vec<(String, Vec<AddrRange>, BTreeMap<String, String>)> = snap
        .pools
        .values()
        .filter_map(|p| {
            parse_pool(p)
                .ok()
                .map(|pool| (p.name_any(), pool.ranges, p.labels().clone()))
        })
        .collect();
    let resolved = bgp::resolve(snap);
    let mut errors = Vec::new();
    if let Some(b) = bgp::section(
        snap,
        &resolved,
        &settings.node,
        settings.base.bgp.as_ref(),
        &mut errors,
    ) {
        cfg.bgp = Some(b);
    }
    cfg.services = snap
        .services
        .values()
        .filter_map(|svc| service::service(snap, settings, template, &pools, &resolved, svc))
        .collect();
    cfg
}

/// The problems found in the BGP resources for this node (what [`Source`] logs): each names
/// the resource and the field.
pub fn bgp_errors(snap: &Snapshot, settings: &Settings) -> (Vec<String>, bgp::LastGood) {
    let resolved = bgp::resolve(snap);
    let mut errors = resolved.errors.clone();
    bgp::section(
        snap,
        &resolved,
        &settings.node,
        settings.base.bgp.as_ref(),
        &mut errors,
    );
    (
        errors,
        bgp::LastGood {
            peers: resolved.good_peers,
            advertisements: resolved.good_advertisements,
            bfd_profiles: resolved.good_bfd_profiles,
        },
    )
}

/// The host interfaces that carry `ip` (the Node's `InternalIP`): where the node's neighbours,
/// and so the clients of its VIPs, reach it.
pub fn interfaces_holding(host: &[model::Interface], ip: IpAddr) -> Vec<model::Interface> {
    host.iter()
        .filter(|i| i.addresses.iter().any(|n| n.addr() == ip))
        .cloned()
        .collect()
}

fn internal_ip(node: Option<&Node>) -> Option<IpAddr> {
    node?
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

fn peers(snap: &Snapshot, settings: &Settings) -> Vec<Peer> {
    snap.nodes
        .values()
        .filter(|n| n.name_any() != settings.node)
        .filter_map(|n| {
            Some(Peer {
                name: n.name_any(),
                address: SocketAddr::new(internal_ip(Some(n))?, settings.gossip_port),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
