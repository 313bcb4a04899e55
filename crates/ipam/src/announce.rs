//! Per-node announcement status: each agent writes its own entry into `ServiceAnnouncement`s.
//!
//! `status.nodes` is a list-map keyed by node; every agent server-side-applies only its own entry
//! with its own field manager (`portico-agent/<node>`), so the API server merges the views and no
//! agent can overwrite another's. Writes are proportional to changes:
//!
//! - a node writes an entry only when it has something to say: the addresses it announces
//!   (`owns`, reason `owner`), and, on the *reporter* (the first node by name), why an address
//!   has no owner at all (`noEligibleNode`, or `noHealthyEndpoints` when the Service has no
//!   serving endpoint). A node that could take an address over (`notOwner`) writes nothing;
//! - a node writes only when its own entry for that Service changed, after changes settled for
//!   [`SETTLE`] (a failover moves many addresses in one burst: one write per Service, not per
//!   step); the object itself (spec and owner reference) is applied once per node and Service;
//! - entries of Nodes that no longer exist, and of nodes whose agent the gossip says is down
//!   (seen alive and then down, or never heard from for [`DOWN_GRACE`]), are removed by the
//!   reporter, applying an empty status with that node's field manager (which removes exactly
//!   what that node had written). The reporter is the first node by name that is not down, so
//!   a dead first node does not silence the reports. A node seen down that comes back (a healed
//!   partition) makes every node write its own entries again, in case they were removed.
//!
//! Services announced by BGP add a `bgp` part to the entry of every node that has a decision
//! about their addresses other than `notSelected`: per address `announced` or why not, and the
//! node's sessions (state, since, prefixes sent, last error) from [`BgpView`].
//!
//! The object is owned by its Service, so it is deleted with it. [`Planner`] is pure; [`run`]
//! performs its writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use model::{Config, OwnershipView};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::crd::{AddressReason, BgpSession, NodeAnnouncement, NodeBgp, ServiceAnnouncement};

/// How long the ownership view must stay unchanged before the changes are written.
pub const SETTLE: Duration = Duration::from_millis(500);

/// How long a node never heard from must stay down (in the gossip) before the reporter removes
/// its entries: at start every peer not yet heard from reads as down.
pub const DOWN_GRACE: Duration = Duration::from_secs(30);

/// The reason word for addresses withdrawn because their Service has no serving endpoint.
pub const NO_HEALTHY_ENDPOINTS: &str = "noHealthyEndpoints";

/// Where a model service came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Its uid (for the owner reference).
    pub uid: String,
    /// No endpoint is ready or serving: its addresses are withdrawn (`noHealthyEndpoints`).
    pub no_endpoints: bool,
}

/// This node's BGP sessions and route decisions (published by the binary's speaker).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BgpView {
    /// The sessions, as the entries show them.
    pub sessions: Vec<BgpSession>,
    /// Every BGP VIP's decision on this node.
    pub routes: Arc<model::bgp::RouteDecisions>,
}

/// Whether an entry says nothing (so it is not written, or it is removed).
fn silent(e: &NodeAnnouncement) -> bool {
    e.addresses.is_empty() && e.bgp.is_none()
}

/// Model service name → its Kubernetes Service.
pub type Origins = BTreeMap<String, Origin>;

/// A Service by namespace and name.
type Key = (String, String);

/// One write of the announcer.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Server-side apply of the object (spec and owner reference), before this node's first
    /// status write for it.
    Object {
        /// The Service.
        origin: Origin,
        /// The apply body.
        body: Value,
    },
    /// Server-side apply of one node's entry on the status subresource. An empty `nodes` list
    /// removes whatever that field manager wrote before.
    Status {
        /// The Service.
        origin: Origin,
        /// The node whose entry this is (its field manager is used).
        node: String,
        /// The apply body.
        body: Value,
    },
}

/// The field manager of one node's agent.
pub fn manager(node: &str) -> String {
    format!("portico-agent/{node}")
}

/// Decides the writes of one node (pure).
#[derive(Debug, Clone, Default)]
pub struct Planner {
    me: String,
    /// This node's entry as last written, per Service (with its uid).
    applied: BTreeMap<Key, (String, NodeAnnouncement)>,
    /// Objects this node has applied (namespace, name, uid).
    objects: BTreeSet<(String, String, String)>,
    /// Services whose last status write failed: written again whatever the cache says.
    dirty: BTreeSet<Key>,
    /// Per other node: Services in which it may have an entry (it owned one of their addresses,
    /// or was the reporter while one had no owner, or a listing showed one).
    may_have: BTreeMap<String, BTreeMap<Key, Origin>>,
    /// Liveness from the gossip, once the agent has published it.
    liveness: Option<Liveness>,
}

/// The agent's view of which nodes are up (see [`Planner::set_alive`]).
#[derive(Debug, Clone)]
struct Liveness {
    /// When the first view arrived.
    since: tokio::time::Instant,
    /// The latest view's instant.
    now: tokio::time::Instant,
    /// Nodes up in the latest view.
    alive: BTreeSet<String>,
    /// Nodes seen up at some point.
    seen: BTreeSet<String>,
}

impl Liveness {
    /// Whether `node` counts as down: not up now, and either seen up before or not heard from
    /// since the first view for [`DOWN_GRACE`].
    fn down(&self, node: &str) -> bool {
        !self.alive.contains(node)
            && (self.seen.contains(node)
                || self.now.saturating_duration_since(self.since) >= DOWN_GRACE)
    }
}

impl Planner {
    /// A planner for node `me` that has written nothing yet.
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            ..Self::default()
        }
    }

    /// Learns what exists already (a listing at start): this node's own entries, to be updated
    /// or removed, and other nodes' entries, to be removed once their Node is gone.
    pub fn prime(&mut self, existing: &[ServiceAnnouncement]) {
        for sa in existing {
            let (Some(ns), Some(name)) = (&sa.metadata.namespace, &sa.metadata.name) else {
                continue;
            };
            let uid = sa
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Service")
                .map(|o| o.uid.clone())
                .unwrap_or_default();
            let key = (ns.clone(), name.clone());
            for entry in sa.status.iter().flat_map(|s| &s.nodes) {
                if entry.node == self.me {
                    self.applied
                        .insert(key.clone(), (uid.clone(), entry.clone()));
                    self.objects.insert((ns.clone(), name.clone(), uid.clone()));
                } else {
                    self.may_have.entry(entry.node.clone()).or_default().insert(
                        key.clone(),
                        Origin {
                            namespace: ns.clone(),
                            name: name.clone(),
                            uid: uid.clone(),
                            no_endpoints: false,
                        },
                    );
                }
            }
        }
    }

    /// Takes the agent's view of the nodes that are up (gossip states other than `down`, this
    /// node included) at `now`. A node that was down and is up again may have had its entries
    /// removed by a reporter that could not hear it: every entry of this node is written again.
    pub fn set_alive(&mut self, alive: BTreeSet<String>, now: tokio::time::Instant) {
        let l = self.liveness.get_or_insert_with(|| Liveness {
            since: now,
            now,
            alive: BTreeSet::new(),
            seen: BTreeSet::new(),
        });
        let revived = alive
            .iter()
            .any(|n| *n != self.me && l.seen.contains(n) && !l.alive.contains(n));
        l.now = now;
        l.seen.extend(alive.iter().cloned());
        l.alive = alive;
        if revived {
            self.dirty.extend(self.applied.keys().cloned());
        }
    }

    /// Forgets a write that failed, so the next plan makes it again.
    pub fn failed(&mut self, write: &Write) {
        match write {
            Write::Object { origin, .. } => {
                self.objects.remove(&(
                    origin.namespace.clone(),
                    origin.name.clone(),
                    origin.uid.clone(),
                ));
            }
            Write::Status { origin, node, .. } if *node == self.me => {
                let key = (origin.namespace.clone(), origin.name.clone());
                self.applied.remove(&key);
                self.dirty.insert(key);
                // The object may be what is missing (deleted by hand): apply it again too.
                self.objects.remove(&(
                    origin.namespace.clone(),
                    origin.name.clone(),
                    origin.uid.clone(),
                ));
            }
            Write::Status { origin, node, .. } => {
                self.may_have.entry(node.clone()).or_default().insert(
                    (origin.namespace.clone(), origin.name.clone()),
                    origin.clone(),
                );
            }
        }
    }

    /// The writes that bring the API in line with this node's view (without BGP).
    pub fn plan(
        &mut self,
        config: &Config,
        ownership: &OwnershipView,
        origins: &Origins,
    ) -> Vec<Write> {
        self.plan_with(config, ownership, origins, &BgpView::default())
    }

    /// The writes that bring the API in line with this node's view, BGP included.
    pub fn plan_with(
        &mut self,
        config: &Config,
        ownership: &OwnershipView,
        origins: &Origins,
        bgp: &BgpView,
    ) -> Vec<Write> {
        let mut nodes: BTreeSet<&str> = config
            .cluster
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        nodes.insert(self.me.as_str());
        let down = |n: &str| n != self.me && self.liveness.as_ref().is_some_and(|l| l.down(n));
        let reporter = nodes
            .iter()
            .copied()
            .find(|n| !down(n))
            .unwrap_or(self.me.as_str())
            .to_string();
        let me_reporting = reporter == self.me;
        let mut out = Vec::new();
        let mut present = BTreeSet::new();
        for svc in &config.services {
            let Some(origin) = origins.get(&svc.name) else {
                continue;
            };
            let key = (origin.namespace.clone(), origin.name.clone());
            present.insert(key.clone());
            // Until the agent has decided about every address of the Service (at start), what
            // was written stays as it is.
            let l2 = svc.announce.l2();
            if l2 && svc.vips.iter().any(|ip| !ownership.contains_key(ip)) {
                continue;
            }
            if svc.announce.bgp() && svc.vips.iter().any(|ip| !bgp.routes.contains_key(ip)) {
                continue;
            }
            let mut entry = NodeAnnouncement {
                node: self.me.clone(),
                ..NodeAnnouncement::default()
            };
            for ip in svc.vips.iter().filter(|_| l2) {
                let Some(view) = ownership.get(ip) else {
                    continue; // not reached: checked above
                };
                match view.owner.as_deref() {
                    Some(owner) if owner == self.me => {
                        entry.owns.push(ip.to_string());
                        entry.addresses.push(AddressReason {
                            address: ip.to_string(),
                            reason: view.reason.clone(),
                        });
                    }
                    Some(owner) => {
                        remember(&mut self.may_have, owner, &key, origin);
                    }
                    None if me_reporting => {
                        let reason = if origin.no_endpoints {
                            NO_HEALTHY_ENDPOINTS.to_string()
                        } else {
                            view.reason.clone()
                        };
                        entry.addresses.push(AddressReason {
                            address: ip.to_string(),
                            reason,
                        });
                    }
                    None => remember(&mut self.may_have, &reporter, &key, origin),
                }
            }
            if svc.announce.bgp() {
                let routes: Vec<AddressReason> = svc
                    .vips
                    .iter()
                    .filter_map(|ip| {
                        let r = bgp.routes.get(ip)?;
                        (r.reason != model::bgp::RouteReason::NotSelected).then(|| AddressReason {
                            address: ip.to_string(),
                            reason: r.reason.as_str().to_string(),
                        })
                    })
                    .collect();
                if !routes.is_empty() {
                    entry.bgp = Some(NodeBgp {
                        routes,
                        sessions: bgp.sessions.clone(),
                    });
                }
            }
            let before = self.applied.get(&key);
            let unchanged = match before {
                Some((uid, e)) => *uid == origin.uid && *e == entry,
                // Nothing written, nothing to say: no write.
                None => silent(&entry),
            };
            let dirty = self.dirty.remove(&key);
            if unchanged && !dirty {
                continue;
            }
            if silent(&entry) {
                self.applied.remove(&key);
            } else {
                let object = (key.0.clone(), key.1.clone(), origin.uid.clone());
                if !self.objects.contains(&object) {
                    out.push(Write::Object {
                        origin: origin.clone(),
                        body: object_body(origin),
                    });
                    self.objects.insert(object);
                }
                self.applied
                    .insert(key.clone(), (origin.uid.clone(), entry.clone()));
            }
            out.push(Write::Status {
                origin: origin.clone(),
                node: self.me.clone(),
                body: status_body(origin, &entry),
            });
        }
        // Services that are gone (or no longer served) take their objects with them.
        self.applied.retain(|k, _| present.contains(k));
        self.dirty.retain(|k| present.contains(k));
        self.objects
            .retain(|(ns, n, _)| present.contains(&(ns.clone(), n.clone())));
        for m in self.may_have.values_mut() {
            m.retain(|k, _| present.contains(k));
        }
        // Entries of deleted Nodes and of nodes whose agent is down, removed by the reporter
        // (the others forget deleted Nodes and keep down ones in mind, in case they report next).
        let gone: Vec<String> = self
            .may_have
            .keys()
            .filter(|n| !nodes.contains(n.as_str()) || down(n))
            .cloned()
            .collect();
        for node in gone {
            if !me_reporting {
                if !nodes.contains(node.as_str()) {
                    self.may_have.remove(&node);
                }
                continue;
            }
            let services = self.may_have.remove(&node).unwrap_or_default();
            for origin in services.into_values() {
                let empty = NodeAnnouncement {
                    node: node.clone(),
                    ..NodeAnnouncement::default()
                };
                out.push(Write::Status {
                    body: status_body(&origin, &empty),
                    origin,
                    node: node.clone(),
                });
            }
        }
        self.may_have.retain(|_, m| !m.is_empty());
        out
    }
}

fn remember(
    may_have: &mut BTreeMap<String, BTreeMap<Key, Origin>>,
    node: &str,
    key: &Key,
    origin: &Origin,
) {
    may_have
        .entry(node.to_string())
        .or_default()
        .entry(key.clone())
        .or_insert_with(|| origin.clone());
}

fn object_body(origin: &Origin) -> Value {
    json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
        "metadata": {
            "name": origin.name,
            "namespace": origin.namespace,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": origin.name, "uid": origin.uid,
            }],
        },
        "spec": { "service": origin.name },
    })
}

/// The status apply body of one node: its entry, or an empty list to remove it.
fn status_body(origin: &Origin, entry: &NodeAnnouncement) -> Value {
    let nodes = if silent(entry) {
        json!([])
    } else {
        json!([entry])
    };
    json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
        "metadata": { "name": origin.name, "namespace": origin.namespace },
        "status": { "nodes": nodes },
    })
}

/// The nodes whose agent is up as this node's gossip sees them (`None` until the agent has
/// published a view).
pub type Alive = Option<Arc<BTreeSet<String>>>;

/// What [`run`] follows.
pub struct Inputs {
    /// The desired state from the source.
    pub desired: watch::Receiver<Arc<model::Desired>>,
    /// Which Kubernetes Service each model service came from.
    pub origins: watch::Receiver<Arc<Origins>>,
    /// The agent's ownership view.
    pub ownership: watch::Receiver<Arc<OwnershipView>>,
    /// The nodes the gossip sees up.
    pub alive: watch::Receiver<Alive>,
    /// This node's BGP sessions and route decisions.
    pub bgp: watch::Receiver<BgpView>,
}

/// Writes this node's view whenever the config, the ownership, the BGP view or the liveness
/// of the nodes changed and then stayed put for [`SETTLE`]; failed writes are retried 10 s
/// later.
pub async fn run(client: Client, me: String, inputs: Inputs, shutdown: CancellationToken) {
    let Inputs {
        mut desired,
        mut origins,
        mut ownership,
        mut alive,
        mut bgp,
    } = inputs;
    let mut planner = Planner::new(me.clone());
    // Nothing is decided before the source has published the cluster's state (generation 0 is
    // the placeholder): an empty config would read as "every Service is gone".
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = desired.wait_for(|d| d.generation > 0) => if r.is_err() { return },
    }
    // What exists already: our own entries from before a restart, and those of other nodes.
    let all: Api<ServiceAnnouncement> = Api::all(client.clone());
    match all.list(&ListParams::default()).await {
        Ok(list) => planner.prime(&list.items),
        Err(e) => {
            tracing::debug!(error = %crate::outage::describe(&e), "cannot list ServiceAnnouncements; entries left by an earlier run are not cleaned")
        }
    }
    let mut outage = crate::outage::Outage::default();
    loop {
        if let Some(a) = alive.borrow_and_update().clone() {
            planner.set_alive((*a).clone(), tokio::time::Instant::now());
        }
        let view = bgp.borrow_and_update().clone();
        let writes = planner.plan_with(
            &desired.borrow().config,
            &ownership.borrow(),
            &origins.borrow(),
            &view,
        );
        let mut retry = false;
        for w in writes {
            match write(&client, &me, &w).await {
                Ok(()) => {
                    if let Some(failures) = outage.recovered() {
                        tracing::info!(failures, "ServiceAnnouncement writes succeed again");
                    }
                }
                Err(e) => {
                    if outage.failed() {
                        tracing::warn!(error = %crate::outage::describe(&e), "cannot write ServiceAnnouncement; retrying every 10 s (logged once per outage)");
                    }
                    planner.failed(&w);
                    retry = true;
                }
            }
        }
        // Wait for a change, then for the changes to settle.
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
            r = origins.changed() => if r.is_err() { return },
            r = ownership.changed() => if r.is_err() { return },
            r = alive.changed() => if r.is_err() { return },
            r = bgp.changed() => if r.is_err() { return },
            // A node never heard from counts as down once the grace has passed.
            () = tokio::time::sleep(DOWN_GRACE) => {}
            () = tokio::time::sleep(Duration::from_secs(10)), if retry => {}
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = desired.changed() => if r.is_err() { return },
                r = origins.changed() => if r.is_err() { return },
                r = ownership.changed() => if r.is_err() { return },
                r = alive.changed() => if r.is_err() { return },
                r = bgp.changed() => if r.is_err() { return },
                () = tokio::time::sleep(SETTLE) => break,
            }
        }
    }
}

async fn write(client: &Client, me: &str, w: &Write) -> Result<(), kube::Error> {
    match w {
        Write::Object { origin, body } => {
            let api: Api<ServiceAnnouncement> = Api::namespaced(client.clone(), &origin.namespace);
            let pp = PatchParams::apply(&manager(me)).force();
            api.patch(&origin.name, &pp, &Patch::Apply(body))
                .await
                .map(drop)
        }
        Write::Status { origin, node, body } => {
            let api: Api<ServiceAnnouncement> = Api::namespaced(client.clone(), &origin.namespace);
            let pp = PatchParams::apply(&manager(node)).force();
            match api
                .patch_status(&origin.name, &pp, &Patch::Apply(body))
                .await
            {
                Ok(_) => Ok(()),
                // A removal from an object that is gone (with its Service, or by hand): done.
                Err(kube::Error::Api(s))
                    if s.is_not_found() && (*node != me || is_removal(body)) =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Whether a status body removes the entry (an empty `nodes` list).
fn is_removal(body: &Value) -> bool {
    body["status"]["nodes"]
        .as_array()
        .is_some_and(|a| a.is_empty())
}

#[cfg(test)]
mod tests;
