//! One Kubernetes Service into one model service: its VIPs, ports, backends (from its
//! EndpointSlices), placement and announce mode; and which Service each model service came from.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use model::bgp::{AnnounceMode, ServiceBgp};
use model::{Backend, Config, Placement, Port};

use super::l2::{announcing_nodes, without_excluded};
use super::{SERVICE_NAME_LABEL, Settings, Snapshot, bgp, model_name};
use crate::allocator::AddrRange;
use crate::announce::{Origin, Origins};
use crate::intent::{self, HOSTNAME, Mode};

/// The model service for one Kubernetes Service, if portico announces it.
pub(super) fn service(
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
            let protocol = intent::protocol(p)?;
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
