//! The controller's pure core: caches, the allocator, and the writes each change calls for.
//!
//! [`State`] is fed watch events (already decoded) and returns [`Action`]s; the driver in
//! [`crate::controller`] executes them. Nothing is allocated until Services, IPPools and
//! Namespaces are all listed ([`State::is_synced`]); then every Service's recorded addresses are
//! restored first (sorted by creation time, then name) and only then are new requests served, so
//! a restart or a leader change reassigns nothing.
//!
//! Writes happen only when the object differs from what it should be, so the controller's own
//! writes coming back through the watch cause no further writes, and every Event marks a change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::allocator::{Allocator, Refusal, ServiceKey, parse_pool};
use crate::crd::{IPPool, IPPoolStatus};
use crate::intent::{self, ALLOCATED, Intent, Mode, Scope};
use crate::selector::Labels;

/// The condition type on Services.
pub const CONDITION: &str = "portico.dev/AddressAllocated";

/// `status.loadBalancer.ingress[].ipMode`: `Proxy`, because the agents terminate and balance
/// the traffic themselves (health checks, breakers); with `VIP` kube-proxy would capture packets
/// to the address on every node and bypass them.
pub const IP_MODE: &str = "Proxy";

/// The Event reason of a successful allocation.
pub const IP_ALLOCATED: &str = "IPAllocated";

/// A write the driver performs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Strategic merge patch of a Service's `status` subresource. When the patch carries
    /// `metadata.resourceVersion`, a conflict (409) means the cache was stale: re-read, re-decide.
    PatchServiceStatus {
        /// The Service.
        key: ServiceKey,
        /// The patch body.
        patch: Value,
    },
    /// Merge patch of a Service (`spec.externalIPs` and the [`ALLOCATED`] annotation), guarded
    /// by `metadata.resourceVersion`.
    PatchService {
        /// The Service.
        key: ServiceKey,
        /// The patch body.
        patch: Value,
    },
    /// An Event on a Service.
    Event {
        /// The Service.
        reference: ObjectReference,
        /// Warning or Normal.
        warning: bool,
        /// `IPAllocated`, `PoolExhausted`, `IPInUse`, `InvalidRequest`, `SharingRefused`, or a
        /// notice such as `AnnotationIgnored`; on pools `InvalidPool` and `Overlapping`.
        reason: &'static str,
        /// Human-readable detail.
        note: String,
    },
    /// Merge patch of an IPPool's `status` subresource.
    PatchPoolStatus {
        /// The pool.
        name: String,
        /// The patch body.
        patch: Value,
    },
}

/// Which caches have been listed completely at least once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Synced {
    services: bool,
    pools: bool,
    namespaces: bool,
}

/// The controller's state.
#[derive(Debug, Clone)]
pub struct State {
    scope: Scope,
    alloc: Allocator,
    services: BTreeMap<ServiceKey, Service>,
    pools: BTreeMap<String, IPPool>,
    namespaces: BTreeMap<String, Labels>,
    /// The mode each holding was granted in.
    modes: BTreeMap<ServiceKey, Mode>,
    /// Services whose last request was refused; retried when something is released.
    waiting: BTreeSet<ServiceKey>,
    /// Orphaned addresses (held, in no valid pool) and the pool that last contained them; it
    /// reports them under `Orphans`. Seeded from the pools' `status.orphans` after a restart.
    homes: BTreeMap<IpAddr, String>,
    /// The notices ([`intent::notices`]) last sent per Service, so each is sent once.
    noticed: BTreeMap<ServiceKey, Vec<(&'static str, String)>>,
    synced: Synced,
    started: bool,
}

impl State {
    /// An empty state that allocates nothing until synced.
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            alloc: Allocator::new(),
            services: BTreeMap::new(),
            pools: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            modes: BTreeMap::new(),
            waiting: BTreeSet::new(),
            noticed: BTreeMap::new(),
            homes: BTreeMap::new(),
            synced: Synced::default(),
            started: false,
        }
    }

    /// Whether every cache has been listed.
    pub fn is_synced(&self) -> bool {
        self.synced.services && self.synced.pools && self.synced.namespaces
    }

    /// The allocator (read-only, for tests and status).
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// A cached Service.
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    // === events ===

    /// A complete list of Services (initial list or re-list after 410 Gone).
    pub fn services_listed(&mut self, all: Vec<Service>, now: Timestamp) -> Vec<Action> {
        let new: BTreeMap<ServiceKey, Service> =
            all.into_iter().map(|s| (intent::key(&s), s)).collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        self.services = new;
        self.synced.services = true;
        if !self.started {
            return self.start(now);
        }
        for k in gone {
            self.forget(&k);
        }
        self.reconcile_all(now)
    }

    /// A Service was added or changed.
    pub fn service_applied(&mut self, svc: Service, now: Timestamp) -> Vec<Action> {
        let key = intent::key(&svc);
        self.services.insert(key.clone(), svc);
        if !self.started {
            return Vec::new();
        }
        let generation = self.alloc.generation();
        let mut out = self.reconcile(&key, now);
        // A change of what is held (an address, a port, a sharing key freed) may unblock a
        // waiting Service: retry the others then.
        if self.alloc.generation() != generation {
            out.extend(self.retry_waiting(Some(&key), now));
        }
        out.extend(self.pool_statuses(now));
        out
    }

    /// A Service was deleted: its addresses are free again.
    pub fn service_deleted(&mut self, svc: &Service, now: Timestamp) -> Vec<Action> {
        let key = intent::key(svc);
        self.services.remove(&key);
        if !self.started {
            return Vec::new();
        }
        self.forget(&key);
        let mut out = self.retry_waiting(None, now);
        out.extend(self.pool_statuses(now));
        out
    }

    /// A complete list of pools.
    pub fn pools_listed(&mut self, all: Vec<IPPool>, now: Timestamp) -> Vec<Action> {
        self.pools = all.into_iter().map(|p| (p.name_any(), p)).collect();
        self.synced.pools = true;
        self.pools_changed(now)
    }

    /// A pool was added or changed.
    pub fn pool_applied(&mut self, pool: IPPool, now: Timestamp) -> Vec<Action> {
        self.pools.insert(pool.name_any(), pool);
        self.pools_changed(now)
    }

    /// A pool was deleted (its addresses stay with their Services).
    pub fn pool_deleted(&mut self, pool: &IPPool, now: Timestamp) -> Vec<Action> {
        self.pools.remove(&pool.name_any());
        self.pools_changed(now)
    }

    /// A complete list of namespaces and their labels.
    pub fn namespaces_listed(
        &mut self,
        all: BTreeMap<String, Labels>,
        now: Timestamp,
    ) -> Vec<Action> {
        self.namespaces = all;
        self.synced.namespaces = true;
        if !self.started {
            return self.start(now);
        }
        self.reconcile_all(now)
    }

    /// A namespace's labels changed.
    pub fn namespace_applied(
        &mut self,
        name: String,
        labels: Labels,
        now: Timestamp,
    ) -> Vec<Action> {
        if self.namespaces.get(&name) == Some(&labels) {
            return Vec::new();
        }
        self.namespaces.insert(name.clone(), labels);
        if !self.started {
            return Vec::new();
        }
        let keys: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| k.namespace == name)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for k in keys {
            out.extend(self.reconcile(&k, now));
        }
        out.extend(self.pool_statuses(now));
        out
    }

    /// The object a write returned: refresh the cache without deciding anything (the watch
    /// delivers it again later, and then it matches).
    pub fn observe(&mut self, svc: Service) {
        self.services.insert(intent::key(&svc), svc);
    }

    /// The pool a status write returned: refresh the cache so the same report is not written again.
    pub fn observe_pool(&mut self, pool: IPPool) {
        if let Some(p) = self.pools.get_mut(&pool.name_any()) {
            p.status = pool.status;
        }
    }

    /// A pool status write was queued: the cache takes it as written, so the next decisions
    /// neither queue it again nor repeat its Events. See [`State::forget_pool_status`].
    pub fn assume_pool_status(&mut self, name: &str, patch: &Value) {
        if let (Some(p), Ok(status)) = (
            self.pools.get_mut(name),
            serde_json::from_value::<IPPoolStatus>(patch["status"].clone()),
        ) {
            p.status = Some(status);
        }
    }

    /// A pool status write failed: forget the assumed status so it is decided and written again
    /// ([`State::pool_reports`]).
    pub fn forget_pool_status(&mut self, name: &str) {
        if let Some(p) = self.pools.get_mut(name) {
            p.status = None;
        }
    }

    /// Writes for pools whose status differs from what is known to be written.
    pub fn pool_reports(&self, now: Timestamp) -> Vec<Action> {
        if !self.started {
            return Vec::new();
        }
        self.pool_statuses(now)
    }

    /// A write was refused with 409 Conflict: the driver re-read the Service; decide again.
    pub fn conflict(&mut self, fresh: Service, now: Timestamp) -> Vec<Action> {
        self.service_applied(fresh, now)
    }

    // === decisions ===

    fn pools_changed(&mut self, now: Timestamp) -> Vec<Action> {
        // Which pool holds each held address before the change, to name the pool that an
        // edit leaves them outside of.
        let before: BTreeMap<IpAddr, String> = self
            .alloc
            .holdings()
            .values()
            .flatten()
            .filter_map(|ip| Some((*ip, self.alloc.pool_of(*ip)?.to_string())))
            .collect();
        self.alloc
            .set_pools(self.pools.values().map(|p| (p.name_any(), parse_pool(p))));
        for (ip, pool) in before {
            self.homes.entry(ip).or_insert(pool);
        }
        self.prune_homes();
        if !self.started {
            return self.start(now);
        }
        self.reconcile_all(now)
    }

    fn reconcile_all(&mut self, now: Timestamp) -> Vec<Action> {
        let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        let mut out = Vec::new();
        for k in keys {
            out.extend(self.reconcile(&k, now));
        }
        out.extend(self.retry_waiting(None, now));
        out.extend(self.pool_statuses(now));
        out
    }

    /// Restores every recorded allocation, then serves requests. Runs once, when synced.
    fn start(&mut self, now: Timestamp) -> Vec<Action> {
        if !self.is_synced() || self.started {
            return Vec::new();
        }
        self.started = true;
        self.alloc
            .set_pools(self.pools.values().map(|p| (p.name_any(), parse_pool(p))));
        let mut order: Vec<&Service> = self.services.values().collect();
        order.sort_by_key(|s| (s.creation_timestamp().map(|t| t.0), intent::key(s)));
        let mut restores = Vec::new();
        for svc in order {
            let Some(mode) = intent::mode(svc, &self.scope) else {
                continue;
            };
            let recorded = intent::recorded(svc, mode);
            if recorded.is_empty() {
                continue;
            }
            let ns = self
                .namespaces
                .get(&svc.namespace().unwrap_or_default())
                .cloned()
                .unwrap_or_default();
            restores.push((mode, intent::restore_request(svc, &ns), recorded));
        }
        for (mode, req, recorded) in restores {
            self.alloc.restore(&req, &recorded);
            self.modes.insert(req.service.clone(), mode);
        }
        // What the previous leader reported as orphaned stays attributed to its pool.
        for (name, pool) in &self.pools {
            for ip in pool.status.iter().flat_map(|s| &s.orphans) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    self.homes.entry(ip).or_insert_with(|| name.clone());
                }
            }
        }
        self.prune_homes();
        self.reconcile_all(now)
    }

    /// Keeps only addresses that are still orphans of a pool that still exists.
    fn prune_homes(&mut self) {
        let orphans: BTreeSet<IpAddr> = self.alloc.orphans().into_iter().collect();
        let pools = &self.pools;
        self.homes
            .retain(|ip, pool| orphans.contains(ip) && pools.contains_key(pool));
    }

    /// Releases what a gone Service held (no write: the object is gone).
    fn forget(&mut self, key: &ServiceKey) {
        self.alloc.release(key);
        self.modes.remove(key);
        self.waiting.remove(key);
        self.noticed.remove(key);
    }

    /// Retries waiting Services (in key order) until a pass changes nothing held, so the result
    /// does not depend on the order in which things were freed (a restart reaches the same).
    fn retry_waiting(&mut self, except: Option<&ServiceKey>, now: Timestamp) -> Vec<Action> {
        let mut out = Vec::new();
        for pass in 0..=self.waiting.len() {
            let generation = self.alloc.generation();
            // The Service just decided is skipped once; after a change it is retried too.
            let skip = if pass == 0 { except } else { None };
            let keys: Vec<ServiceKey> = self
                .waiting
                .iter()
                .filter(|k| Some(*k) != skip)
                .cloned()
                .collect();
            for k in &keys {
                out.extend(self.reconcile(k, now));
            }
            if self.alloc.generation() == generation {
                break;
            }
        }
        out
    }

    /// Decides the writes for one Service.
    fn reconcile(&mut self, key: &ServiceKey, now: Timestamp) -> Vec<Action> {
        let Some(svc) = self.services.get(key).cloned() else {
            self.forget(key);
            return Vec::new();
        };
        let ns = self
            .namespaces
            .get(&key.namespace)
            .cloned()
            .unwrap_or_default();
        let mut out = self.notify(&svc);
        out.extend(self.decide(&svc, key, &ns, now));
        out
    }

    /// Events for notices the Service has not been told about yet.
    fn notify(&mut self, svc: &Service) -> Vec<Action> {
        let key = intent::key(svc);
        let now = intent::notices(svc, &self.scope);
        let before = self.noticed.get(&key).cloned().unwrap_or_default();
        if now == before {
            return Vec::new();
        }
        let out = now
            .iter()
            .filter(|n| !before.contains(n))
            .map(|(reason, note)| Action::Event {
                reference: svc.object_ref(&()),
                warning: true,
                reason,
                note: note.clone(),
            })
            .collect();
        if now.is_empty() {
            self.noticed.remove(&key);
        } else {
            self.noticed.insert(key, now);
        }
        out
    }

    /// The allocation decision for one Service and its writes.
    fn decide(
        &mut self,
        svc: &Service,
        key: &ServiceKey,
        ns: &Labels,
        now: Timestamp,
    ) -> Vec<Action> {
        let svc = svc.clone();
        match intent::intent(&svc, &self.scope, ns) {
            Intent::NotOurs => self.release(&svc),
            Intent::Invalid(_, msg) => {
                self.waiting.insert(key.clone());
                self.refused(&svc, &Refusal::InvalidRequest(msg), now)
            }
            Intent::Want(mode, req) => {
                let mut out = Vec::new();
                if self.modes.get(key).is_some_and(|m| *m != mode) {
                    out.extend(self.release(&svc));
                }
                match self.alloc.assign(&req) {
                    Ok(ips) => {
                        self.waiting.remove(key);
                        self.modes.insert(key.clone(), mode);
                        out.extend(self.granted(&svc, mode, &ips, now));
                    }
                    Err(refusal) => {
                        self.waiting.insert(key.clone());
                        out.extend(self.refused(&svc, &refusal, now));
                    }
                }
                out
            }
        }
    }

    /// Writes for a granted request.
    fn granted(&self, svc: &Service, mode: Mode, ips: &[IpAddr], now: Timestamp) -> Vec<Action> {
        let key = intent::key(svc);
        let mut out = Vec::new();
        let recorded = intent::recorded(svc, mode);
        let changed = recorded != ips;
        let orphans: Vec<IpAddr> = ips
            .iter()
            .filter(|ip| !self.alloc.in_a_pool(**ip))
            .copied()
            .collect();
        let list = join(ips);
        let (reason, message) = if orphans.is_empty() {
            (IP_ALLOCATED, list.clone())
        } else {
            (
                "AddressOutsidePools",
                format!(
                    "{list}; {} no longer in any pool, kept until released",
                    join(&orphans)
                ),
            )
        };
        let cond = condition(svc, true, reason, &message, now);
        match mode {
            Mode::LoadBalancer => {
                // Addresses claimed from an existing ingress (a migration from MetalLB or
                // Cilium) may carry `ipMode: VIP` or none: rewrite them with `Proxy`.
                let rewrite = changed || !ip_mode_is_proxy(svc);
                if rewrite || cond.is_some() {
                    let mut status = json!({});
                    if rewrite {
                        status["loadBalancer"] = json!({"ingress": ingress(ips)});
                    }
                    if let Some(c) = cond {
                        status["conditions"] = json!([c]);
                    }
                    let mut patch = json!({ "status": status });
                    if rewrite {
                        patch["metadata"] = json!({"resourceVersion": svc.resource_version()});
                    }
                    out.push(Action::PatchServiceStatus {
                        key: key.clone(),
                        patch,
                    });
                }
            }
            Mode::ExternalIp => {
                let annotated = intent::recorded_annotation(svc);
                if changed || annotated != ips {
                    out.push(Action::PatchService {
                        key: key.clone(),
                        patch: json!({
                            "metadata": {
                                "resourceVersion": svc.resource_version(),
                                "annotations": { ALLOCATED: list },
                            },
                            "spec": { "externalIPs": external_ips(svc, &annotated, ips) },
                        }),
                    });
                }
                if let Some(c) = cond {
                    out.push(Action::PatchServiceStatus {
                        key: key.clone(),
                        patch: json!({"status": {"conditions": [c]}}),
                    });
                }
            }
        }
        if changed {
            out.push(Action::Event {
                reference: svc.object_ref(&()),
                warning: false,
                reason: IP_ALLOCATED,
                note: format!("assigned {list}"),
            });
        }
        out
    }

    /// Writes for a refused request: a condition and an Event, once per distinct refusal.
    fn refused(&self, svc: &Service, refusal: &Refusal, now: Timestamp) -> Vec<Action> {
        let message = refusal.to_string();
        let Some(c) = condition(svc, false, refusal.reason(), &message, now) else {
            return Vec::new();
        };
        vec![
            Action::PatchServiceStatus {
                key: intent::key(svc),
                patch: json!({"status": {"conditions": [c]}}),
            },
            Action::Event {
                reference: svc.object_ref(&()),
                warning: true,
                reason: refusal.reason(),
                note: message,
            },
        ]
    }

    /// A Service portico no longer serves: free its addresses and take back what it wrote.
    fn release(&mut self, svc: &Service) -> Vec<Action> {
        let key = intent::key(svc);
        let held = self.alloc.held(&key).to_vec();
        let mode = self.modes.remove(&key);
        self.alloc.release(&key);
        self.waiting.remove(&key);
        let mut out = Vec::new();
        match mode {
            Some(Mode::LoadBalancer) => {
                let recorded = intent::recorded(svc, Mode::LoadBalancer);
                if !recorded.is_empty() && recorded.iter().all(|ip| held.contains(ip)) {
                    out.push(Action::PatchServiceStatus {
                        key: key.clone(),
                        patch: json!({
                            "metadata": {"resourceVersion": svc.resource_version()},
                            "status": {"loadBalancer": {"ingress": null}},
                        }),
                    });
                }
            }
            Some(Mode::ExternalIp) => {
                let annotated = intent::recorded_annotation(svc);
                out.push(Action::PatchService {
                    key: key.clone(),
                    patch: json!({
                        "metadata": {"resourceVersion": svc.resource_version(), "annotations": { ALLOCATED: null }},
                        "spec": { "externalIPs": external_ips(svc, &annotated, &[]) },
                    }),
                });
            }
            None => {}
        }
        if has_condition(svc) {
            out.push(Action::PatchServiceStatus {
                key,
                patch: json!({"status": {"conditions": [{"type": CONDITION, "$patch": "delete"}]}}),
            });
        }
        out
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn ingress(ips: &[IpAddr]) -> Value {
    ips.iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": IP_MODE}))
        .collect()
}

/// `spec.externalIPs` with the addresses portico wrote before replaced by `ips`.
fn external_ips(svc: &Service, ours_before: &[IpAddr], ips: &[IpAddr]) -> Value {
    let mut list: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| {
            !s.parse::<IpAddr>()
                .is_ok_and(|ip| ours_before.contains(&ip) || ips.contains(&ip))
        })
        .collect();
    list.extend(ips.iter().map(|ip| ip.to_string()));
    json!(list)
}

/// Whether every `status.loadBalancer.ingress` entry says `ipMode: Proxy`.
fn ip_mode_is_proxy(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .all(|i| i.ip_mode.as_deref() == Some(IP_MODE))
}

fn has_condition(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == CONDITION))
}

/// The condition to write, or `None` when the Service already says exactly this.
fn condition(
    svc: &Service,
    ok: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Option<Value> {
    let status = if ok { "True" } else { "False" };
    let old = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION));
    if old.is_some_and(|c| c.status == status && c.reason == reason && c.message == message) {
        return None;
    }
    let since = old
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Some(json!({
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": svc.metadata.generation,
    }))
}

mod pools;

#[cfg(test)]
mod tests;
