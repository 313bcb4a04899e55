//! L2Announcements: which nodes announce a Service, on which interfaces, and the nodes
//! excluded from external load balancers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use super::{EXCLUDE_LABEL, Snapshot};
use crate::allocator::AddrRange;
use crate::selector::{Selector, any_matches};

/// Nodes that may announce this Service: those selected by the L2Announcements that select the
/// Service and its pool. Without any L2Announcement every node may (empty list = all). `None`
/// when announcements exist but none selects the Service.
pub(super) fn announcing_nodes(
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
pub(super) fn announcing_interfaces(snap: &Snapshot, node: &str) -> Option<BTreeSet<String>> {
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
pub(super) fn without_excluded(snap: &Snapshot, nodes: Vec<String>) -> Vec<String> {
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
