//! The agent's source: Services, EndpointSlices, Nodes, IPPools, L2Announcements, BGPPeers,
//! BGPAdvertisements, BFDProfiles (see [`bgp`]), the gossip Secret and the Secrets `BGPPeer`s name, turned into the same [`model::Desired`] the standalone config produces.
//!
//! [`build`] is pure: a [`Snapshot`] of the caches in, a [`model::Config`] out. [`spawn`] keeps the
//! caches from watches and publishes a new [`Desired`] whenever the config changes. When the API
//! server is unreachable the caches, and so the published state, stay as they were: nothing is
//! withdrawn because the API is gone. Watches resume with back-off and re-list.
//!
//! Naming: a Service `web` in namespace `shop` becomes the model service `shop/web` (see
//! [`model_name`]; `/` appears in neither a namespace nor a name, so two Services never share a
//! model name), published in DNS as `web.shop` (inside the zone) unless `portico.dev/hostname`
//! says otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use model::bgp::{AnnounceMode, ServiceBgp};
use model::{Backend, Config, Desired, Peer, Placement, Port, Protocol};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::allocator::{AddrRange, parse_pool};
use crate::announce::{Origin, Origins};
use crate::crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPPool, L2Announcement};
use crate::intent::{self, HOSTNAME, Mode, Scope};
use crate::selector::{Selector, any_matches};

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
mod gossip;
use gossip::{SecretSeen, secret_messages};
pub use gossip::{gossip_keys, refused_gossip_keys};

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
        .filter_map(|svc| service(snap, settings, template, &pools, &resolved, svc))
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

/// The model service for one Kubernetes Service, if portico announces it.
fn service(
    snap: &Snapshot,
    settings: &Settings,
    template: &model::Service,
    pools: &[(String, Vec<AddrRange>, BTreeMap<String, String>)],
    resolved: &bgp::Resolved,
    svc: &Service,
) -> Option<model::Service> {
    let mode = intent::mode(svc, &settings.scope)?;
    let vips: Vec<IpAddr> = match mode {
        Mode::LoadBalancer => intent::recorded(svc, mode),
        Mode::ExternalIp => intent::recorded(svc, mode),
    };
    if vips.is_empty() {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    let my_pools: Vec<&(String, Vec<AddrRange>, BTreeMap<String, String>)> = pools
        .iter()
        .filter(|(_, ranges, _)| vips.iter().any(|ip| ranges.iter().any(|r| r.contains(*ip))))
        .collect();
    let by_bgp = bgp::selection(snap, resolved, &my_pools);
    // Without any L2Announcement every Service is announced by L2, unless BGP announces it.
    let by_l2 = if snap.l2.is_empty() && by_bgp.is_some() {
        None
    } else {
        announcing_nodes(snap, pools, svc, &vips)
    };
    let (announce, nodes, attrs) = match (by_l2, by_bgp) {
        (None, None) => return None,
        (Some(n), None) => (AnnounceMode::L2, n, ServiceBgp::default()),
        // `ownerOnly` without an L2Announcement: BGP from the elected owner only, and nobody
        // answers ARP / NDP (the agents elect the owner of `owner_only` services anyway).
        (None, Some((a, n))) => (AnnounceMode::Bgp, n, a),
        // either list empty means every node
        (Some(l), Some((a, b))) if l.is_empty() || b.is_empty() => {
            (AnnounceMode::Both, Vec::new(), a)
        }
        (Some(mut l), Some((a, b))) => {
            l.extend(b);
            l.sort();
            l.dedup();
            (AnnounceMode::Both, l, a)
        }
    };
    let placement_nodes = without_excluded(snap, nodes);
    let endpoints = endpoints(snap, &ns, &name);
    let ports: Vec<Port> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            let port = u16::try_from(p.port).ok()?;
            let target = endpoints
                .ports
                .get(&p.name.clone().unwrap_or_default())
                .copied()
                .or_else(|| match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        u16::try_from(*n).ok()
                    }
                    None => Some(port),
                    _ => None,
                })?;
            Some(Port {
                name: p
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("{protocol}-{port}")),
                port,
                protocol,
                target_port: target,
            })
        })
        .collect();
    let hostname = svc
        .annotations()
        .get(HOSTNAME)
        .cloned()
        .unwrap_or_else(|| format!("{name}.{ns}"));
    let mut out = template.clone();
    out.name = model_name(&ns, &name);
    out.vips = vips;
    out.ports = ports;
    // No endpoint serves: withdraw the addresses (MetalLB does too) unless told otherwise; the
    // agents' reason word and `ServiceAnnouncement` say `noHealthyEndpoints` (see [`withdrawn`]).
    let withdraw = withdrawn(svc, &endpoints);
    out.backends = endpoints.backends;
    out.placement = Placement {
        nodes: placement_nodes,
        preferred: Vec::new(),
        local_only: spec.external_traffic_policy.as_deref() == Some("Local"),
        withdrawn: withdraw,
    };
    out.dns.hostname = hostname;
    // a bad value makes the controller refuse the Service (`InvalidRequest` names the
    // annotation); a Service that still holds addresses keeps the default here
    out.forwarding = intent::forwarding(svc).unwrap_or_default();
    out.announce = announce;
    out.bgp = attrs;
    Some(out)
}

/// Whether a Service's addresses are withdrawn for want of endpoints (reason
/// `noHealthyEndpoints`): no endpoint is ready, none is serving while terminating, and the
/// Service does not say `portico.dev/announce-without-endpoints: "true"`.
fn withdrawn(svc: &Service, endpoints: &Endpoints) -> bool {
    endpoints.backends.is_empty()
        && svc
            .annotations()
            .get(intent::ANNOUNCE_WITHOUT_ENDPOINTS)
            .is_none_or(|v| v.trim() != "true")
}

/// Nodes that may announce this Service: those selected by the L2Announcements that select the
/// Service and its pool. Without any L2Announcement every node may (empty list = all). `None`
/// when announcements exist but none selects the Service.
fn announcing_nodes(
    snap: &Snapshot,
    pools: &[(String, Vec<AddrRange>, BTreeMap<String, String>)],
    svc: &Service,
    vips: &[IpAddr],
) -> Option<Vec<String>> {
    if snap.l2.is_empty() {
        return Some(Vec::new());
    }
    let my_pools: Vec<&(String, Vec<AddrRange>, BTreeMap<String, String>)> = pools
        .iter()
        .filter(|(_, ranges, _)| vips.iter().any(|ip| ranges.iter().any(|r| r.contains(*ip))))
        .collect();
    let parse = |v: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector]| -> Option<Vec<Selector>> {
        v.iter().map(|s| Selector::parse(s).ok()).collect()
    };
    let mut nodes = BTreeSet::new();
    let mut selected = false;
    for a in snap.l2.values() {
        let spec = &a.spec;
        let (Some(pool_sel), Some(svc_sel), Some(node_sel)) = (
            parse(&spec.ip_pool_selectors),
            parse(&spec.service_selectors),
            parse(&spec.node_selectors),
        ) else {
            continue;
        };
        let pool_ok = (spec.ip_pools.is_empty() && pool_sel.is_empty())
            || my_pools.iter().any(|(n, _, labels)| {
                spec.ip_pools.contains(n)
                    || (!pool_sel.is_empty() && any_matches(&pool_sel, labels))
            });
        if !pool_ok || !any_matches(&svc_sel, svc.labels()) {
            continue;
        }
        selected = true;
        for n in snap.nodes.values() {
            if any_matches(&node_sel, n.labels()) {
                nodes.insert(n.name_any());
            }
        }
    }
    selected.then(|| nodes.into_iter().collect())
}

/// The interfaces this node may announce on: the union of `interfaces` of the
/// L2Announcements that select it. `None` (every configured interface) when none of them
/// names interfaces. The model has no per-Service interface, so an announcement's interfaces
/// apply to every VIP this node announces.
fn announcing_interfaces(snap: &Snapshot, node: &str) -> Option<BTreeSet<String>> {
    let labels = snap
        .nodes
        .get(node)
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    let mut names = BTreeSet::new();
    for a in snap.l2.values() {
        let Ok(sel) = a
            .spec
            .node_selectors
            .iter()
            .map(Selector::parse)
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        if any_matches(&sel, &labels) {
            names.extend(a.spec.interfaces.iter().cloned());
        }
    }
    (!names.is_empty()).then_some(names)
}

/// Nodes labelled `node.kubernetes.io/exclude-from-external-load-balancers` never announce.
/// An empty list means every node, so exclusions turn it into the list of the others.
fn without_excluded(snap: &Snapshot, nodes: Vec<String>) -> Vec<String> {
    let excluded = |n: &str| {
        snap.nodes
            .get(n)
            .is_some_and(|n| n.labels().contains_key(EXCLUDE_LABEL))
    };
    if !snap.nodes.keys().any(|n| excluded(n)) {
        return nodes;
    }
    let all: Vec<String> = if nodes.is_empty() {
        snap.nodes.keys().cloned().collect()
    } else {
        nodes
    };
    all.into_iter().filter(|n| !excluded(n)).collect()
}

/// Backends and the resolved target ports (by port name) of a Service.
struct Endpoints {
    backends: Vec<Backend>,
    ports: BTreeMap<String, u16>,
}

/// Reads a Service's EndpointSlices the way kube-proxy does: ready endpoints serve; when none is
/// ready, serving-and-terminating ones do (so connections drain instead of failing).
fn endpoints(snap: &Snapshot, ns: &str, name: &str) -> Endpoints {
    let slices: Vec<&EndpointSlice> = snap
        .slices
        .iter()
        .filter(|((sns, _), s)| {
            sns == ns && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .map(|(_, s)| s)
        .collect();
    let mut ports = BTreeMap::new();
    let mut ready = BTreeMap::new();
    let mut terminating = BTreeMap::new();
    for s in &slices {
        if s.address_type == "FQDN" {
            continue;
        }
        for p in s.ports.iter().flatten() {
            if let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) {
                ports
                    .entry(p.name.clone().unwrap_or_default())
                    .or_insert(port);
            }
        }
        for e in &s.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            // As kube-proxy: a nil `ready` means ready; `serving` defaults to `ready`.
            let is_ready = c.ready.unwrap_or(true);
            let is_serving = c.serving.unwrap_or(is_ready);
            let is_terminating = c.terminating.unwrap_or(false);
            for a in &e.addresses {
                let Ok(address) = a.parse::<IpAddr>() else {
                    continue;
                };
                let b = Backend {
                    name: e
                        .target_ref
                        .as_ref()
                        .and_then(|r| r.name.clone())
                        .unwrap_or_else(|| address.to_string()),
                    address,
                    port: None,
                    weight: 1,
                    node: e.node_name.clone(),
                };
                if is_ready && !is_terminating {
                    ready.entry(address).or_insert(b);
                } else if is_serving && is_terminating {
                    terminating.entry(address).or_insert(b);
                }
            }
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    let mut backends: Vec<Backend> = chosen.into_values().collect();
    // Names must be unique within a service; pods with several addresses get the address appended.
    let mut seen = BTreeSet::new();
    for b in &mut backends {
        if !seen.insert(b.name.clone()) {
            b.name = format!("{}-{}", b.name, b.address);
        }
    }
    Endpoints { backends, ports }
}

/// Keeps a snapshot from watch events and publishes [`Desired`] when the config changes.
pub struct Source {
    settings: Settings,
    template: model::Service,
    snap: Snapshot,
    /// Per kind: listed at least once; and the buffer of an ongoing (re-)list.
    listed: BTreeSet<&'static str>,
    buffers: Buffers,
    generation: u64,
    last: Option<Arc<Config>>,
    /// What was last said about the gossip Secret, so each change is logged once.
    secret_seen: SecretSeen,
    /// The BGP resources' problems last logged, so each is logged once.
    bgp_seen: Vec<String>,
}

#[derive(Default)]
struct Buffers {
    services: Option<Vec<Service>>,
    slices: Option<Vec<EndpointSlice>>,
    nodes: Option<Vec<Node>>,
    pools: Option<Vec<IPPool>>,
    l2: Option<Vec<L2Announcement>>,
    secret: Option<Vec<Secret>>,
    bgp_peers: Option<Vec<BGPPeer>>,
    bgp_ads: Option<Vec<BGPAdvertisement>>,
    bfd_profiles: Option<Vec<BFDProfile>>,
    bgp_secrets: Option<Vec<Secret>>,
}

/// One decoded watch event of any kind the agent watches.
// Short-lived values moved once through a channel or a match: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// Services.
    Service(Event<Service>),
    /// EndpointSlices.
    Slice(Event<EndpointSlice>),
    /// Nodes.
    Node(Event<Node>),
    /// IPPools.
    Pool(Event<IPPool>),
    /// L2Announcements.
    L2(Event<L2Announcement>),
    /// The gossip Secret.
    Secret(Event<Secret>),
    /// BGPPeers.
    BgpPeer(Event<BGPPeer>),
    /// BGPAdvertisements.
    BgpAdvertisement(Event<BGPAdvertisement>),
    /// BFDProfiles.
    BfdProfile(Event<BFDProfile>),
    /// Secrets in portico's namespace (`BGPPeer.passwordSecret`).
    BgpSecret(Event<Secret>),
}

/// The kinds that must be listed before the first config is published.
const KINDS: [&str; 10] = [
    "services",
    "endpointslices",
    "nodes",
    "ippools",
    "l2announcements",
    "secret",
    "bgppeers",
    "bgpadvertisements",
    "bfdprofiles",
    "secrets",
];

fn apply_event<K: kube::Resource + Clone>(
    ev: Event<K>,
    buffer: &mut Option<Vec<K>>,
    cache: &mut BTreeMap<(String, String), K>,
) -> bool {
    let key = |o: &K| {
        (
            o.meta().namespace.clone().unwrap_or_default(),
            o.meta().name.clone().unwrap_or_default(),
        )
    };
    match ev {
        Event::Init => {
            *buffer = Some(Vec::new());
            false
        }
        Event::InitApply(o) => {
            buffer.get_or_insert_with(Vec::new).push(o);
            false
        }
        Event::InitDone => {
            *cache = buffer
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|o| (key(&o), o))
                .collect();
            true
        }
        Event::Apply(o) => {
            cache.insert(key(&o), o);
            true
        }
        Event::Delete(o) => {
            cache.remove(&key(&o));
            true
        }
    }
}

fn by_name<K: Clone>(m: &BTreeMap<(String, String), K>) -> BTreeMap<String, K> {
    m.iter().map(|((_, n), v)| (n.clone(), v.clone())).collect()
}

impl Source {
    /// A source with empty caches.
    pub fn new(settings: Settings) -> Result<Self, Error> {
        Ok(Self {
            settings,
            template: template()?,
            snap: Snapshot::default(),
            listed: BTreeSet::new(),
            buffers: Buffers::default(),
            generation: 0,
            last: None,
            secret_seen: SecretSeen::default(),
            bgp_seen: Vec::new(),
        })
    }

    /// Logs what changed about the gossip Secret, once per change (not on every rebuild).
    fn log_secret(&mut self) {
        let secret = self.snap.secret.as_ref();
        let now = SecretSeen {
            present: secret.is_some(),
            ids: gossip_keys(secret).iter().map(|k| k.id).collect(),
            refused: refused_gossip_keys(secret),
        };
        for (warn, msg) in secret_messages(&self.secret_seen, &now) {
            if warn {
                tracing::warn!("{msg}");
            } else {
                tracing::info!("{msg}");
            }
        }
        self.secret_seen = now;
    }

    /// Logs each new problem of the BGP resources once (and when they are all fixed), and
    /// remembers the valid specs, which stay in force when a later edit is bad.
    fn log_bgp(&mut self) {
        let (errors, good) = bgp_errors(&self.snap, &self.settings);
        for e in errors.iter().filter(|e| !self.bgp_seen.contains(e)) {
            tracing::error!("{e}");
        }
        if errors.is_empty() && !self.bgp_seen.is_empty() {
            tracing::info!("the BGP resources are valid again");
        }
        self.bgp_seen = errors;
        self.snap.bgp_last_good = good;
    }

    /// The problems of the BGP resources last found (each names the resource and the field).
    pub fn bgp_problems(&self) -> &[String] {
        &self.bgp_seen
    }

    /// Which Kubernetes Service each service of the last published config came from.
    pub fn origins(&self) -> Origins {
        self.last
            .as_deref()
            .map(|c| origins(&self.snap, c))
            .unwrap_or_default()
    }

    /// Feeds one event; returns a new desired state when the config changed.
    pub fn handle(&mut self, input: Input) -> Option<Desired> {
        let s = &mut self.snap;
        let b = &mut self.buffers;
        let (kind, done) = match input {
            Input::Service(ev) => (
                "services",
                apply_event(ev, &mut b.services, &mut s.services),
            ),
            Input::Slice(ev) => (
                "endpointslices",
                apply_event(ev, &mut b.slices, &mut s.slices),
            ),
            Input::Node(ev) => {
                let mut m = s
                    .nodes
                    .iter()
                    .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.nodes, &mut m);
                s.nodes = by_name(&m);
                ("nodes", d)
            }
            Input::Pool(ev) => {
                let mut m = s
                    .pools
                    .iter()
                    .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.pools, &mut m);
                s.pools = by_name(&m);
                ("ippools", d)
            }
            Input::L2(ev) => {
                let mut m =
                    s.l2.iter()
                        .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                        .collect();
                let d = apply_event(ev, &mut b.l2, &mut m);
                s.l2 = by_name(&m);
                ("l2announcements", d)
            }
            Input::BgpPeer(ev) => {
                let mut m = s
                    .bgp_peers
                    .iter()
                    .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.bgp_peers, &mut m);
                s.bgp_peers = by_name(&m);
                ("bgppeers", d)
            }
            Input::BgpAdvertisement(ev) => {
                let mut m = s
                    .bgp_ads
                    .iter()
                    .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.bgp_ads, &mut m);
                s.bgp_ads = by_name(&m);
                ("bgpadvertisements", d)
            }
            Input::BfdProfile(ev) => {
                let mut m = s
                    .bfd_profiles
                    .iter()
                    .map(|(k, v)| ((String::new(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.bfd_profiles, &mut m);
                s.bfd_profiles = by_name(&m);
                ("bfdprofiles", d)
            }
            Input::BgpSecret(ev) => {
                // namespaced: keyed as `apply_event` keys watch events
                let mut m = s
                    .bgp_secrets
                    .iter()
                    .map(|(k, v)| ((v.namespace().unwrap_or_default(), k.clone()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.bgp_secrets, &mut m);
                s.bgp_secrets = by_name(&m);
                ("secrets", d)
            }
            Input::Secret(ev) => {
                // Keyed as `apply_event` keys watch events: by the object's own namespace.
                let mut m: BTreeMap<(String, String), Secret> = s
                    .secret
                    .iter()
                    .map(|v| ((v.namespace().unwrap_or_default(), v.name_any()), v.clone()))
                    .collect();
                let d = apply_event(ev, &mut b.secret, &mut m);
                s.secret = m.into_values().next();
                ("secret", d)
            }
        };
        if done {
            self.listed.insert(kind);
            if kind == "secret" {
                self.log_secret();
            }
        }
        if !done || KINDS.iter().any(|k| !self.listed.contains(k)) {
            return None;
        }
        let cfg = build(&self.snap, &self.settings, &self.template);
        self.log_bgp();
        if self.last.as_deref() == Some(&cfg) {
            return None;
        }
        let cfg = Arc::new(cfg);
        self.last = Some(cfg.clone());
        self.generation += 1;
        Some(Desired {
            generation: self.generation,
            config: cfg,
        })
    }
}

/// The merged watches of the agent.
pub fn inputs(
    client: &Client,
    namespace: &str,
    secret: &str,
) -> impl Stream<Item = Input> + Send + use<> {
    fn w<K>(
        api: Api<K>,
        cfg: watcher::Config,
        what: &'static str,
    ) -> impl Stream<Item = Event<K>> + Send
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        crate::outage::logged(watcher::watcher(api, cfg).default_backoff(), what)
    }
    let cfg = watcher::Config::default();
    let c = client.clone();
    futures::stream::select_all([
        w(Api::<Service>::all(c.clone()), cfg.clone(), "services")
            .map(Input::Service)
            .boxed(),
        w(
            Api::<EndpointSlice>::all(c.clone()),
            cfg.clone(),
            "endpointslices",
        )
        .map(Input::Slice)
        .boxed(),
        w(Api::<Node>::all(c.clone()), cfg.clone(), "nodes")
            .map(Input::Node)
            .boxed(),
        w(Api::<IPPool>::all(c.clone()), cfg.clone(), "ippools")
            .map(Input::Pool)
            .boxed(),
        w(
            Api::<L2Announcement>::all(c.clone()),
            cfg.clone(),
            "l2announcements",
        )
        .map(Input::L2)
        .boxed(),
        w(Api::<BGPPeer>::all(c.clone()), cfg.clone(), "bgppeers")
            .map(Input::BgpPeer)
            .boxed(),
        w(
            Api::<BGPAdvertisement>::all(c.clone()),
            cfg.clone(),
            "bgpadvertisements",
        )
        .map(Input::BgpAdvertisement)
        .boxed(),
        w(
            Api::<BFDProfile>::all(c.clone()),
            cfg.clone(),
            "bfdprofiles",
        )
        .map(Input::BfdProfile)
        .boxed(),
        // every Secret of the namespace: a BGPPeer's passwordSecret may name any of them
        w(
            Api::<Secret>::namespaced(c.clone(), namespace),
            cfg.clone(),
            "secrets",
        )
        .map(Input::BgpSecret)
        .boxed(),
        w(
            Api::<Secret>::namespaced(c, namespace),
            cfg.fields(&format!("metadata.name={secret}")),
            "secret",
        )
        .map(Input::Secret)
        .boxed(),
    ])
}

/// Runs the source until `shutdown`, publishing into the returned receiver. The first value is
/// published once everything is listed; until then the receiver holds `initial`.
pub fn spawn(
    client: Client,
    settings: Settings,
    namespace: &str,
    secret: &str,
    initial: Arc<Desired>,
    shutdown: CancellationToken,
) -> Result<Receivers, Error> {
    let mut source = Source::new(settings)?;
    let (tx, desired) = watch::channel(initial);
    let (origins_tx, origins) = watch::channel(Arc::new(Origins::new()));
    let mut events = inputs(&client, namespace, secret);
    let mut served = 0usize;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ev = events.next() => match ev {
                    Some(ev) => {
                        if let Some(d) = source.handle(ev) {
                            // INFO when the set of served Services changes; endpoint churn is
                            // routine and goes to debug.
                            let services = d.config.services.len();
                            if std::mem::replace(&mut served, services) != services || d.generation == 1 {
                                tracing::info!(generation = d.generation, services, "desired state from Kubernetes");
                            } else {
                                tracing::debug!(generation = d.generation, services, "desired state from Kubernetes");
                            }
                            origins_tx.send_replace(Arc::new(source.origins()));
                            tx.send_replace(Arc::new(d));
                        }
                    }
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                },
            }
        }
    });
    Ok(Receivers { desired, origins })
}

/// What [`spawn`] publishes.
#[derive(Debug, Clone)]
pub struct Receivers {
    /// The desired state, for `run::serve`.
    pub desired: watch::Receiver<Arc<Desired>>,
    /// Which Kubernetes Service each model service came from, for [`crate::announce`].
    pub origins: watch::Receiver<Arc<Origins>>,
}

/// Which Kubernetes Service each model service of `config` came from (pure).
pub fn origins(snap: &Snapshot, config: &Config) -> Origins {
    let names: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    snap.services
        .values()
        .filter_map(|svc| {
            let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
            let model = model_name(&ns, &name);
            names.contains(model.as_str()).then(|| {
                (
                    model,
                    Origin {
                        no_endpoints: withdrawn(svc, &endpoints(snap, &ns, &name)),
                        namespace: ns,
                        name,
                        uid: svc.uid().unwrap_or_default(),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
