//! The running source: watch events of every kind kept in a [`Snapshot`], rebuilt into a
//! [`Desired`] when everything is listed and the config changed, and the task that publishes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use model::{Config, Desired};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::gossip::{SecretSeen, secret_messages};
use super::{
    Error, Settings, Snapshot, bgp_errors, build, gossip_keys, origins, refused_gossip_keys,
    template,
};
use crate::announce::Origins;
use crate::crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPPool, L2Announcement};

/// Keeps a snapshot from watch events and publishes [`Desired`] when the config changes.
pub struct Source {
    // `pub(super)`: the source's tests read these.
    pub(super) settings: Settings,
    pub(super) template: model::Service,
    pub(super) snap: Snapshot,
    /// Per kind: listed at least once; and the buffer of an ongoing (re-)list.
    listed: BTreeSet<&'static str>,
    buffers: Buffers,
    generation: u64,
    last: Option<Arc<Config>>,
    /// What was last said about the gossip Secret, so each change is logged once.
    pub(super) secret_seen: SecretSeen,
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

/// [`apply_event`] on a cache keyed by name alone (the cluster-scoped kinds, and the Secrets of
/// portico's namespace): keyed for it as `apply_event` keys watch events, by each object's own
/// namespace (none for a cluster-scoped object).
fn apply_by_name<K: kube::Resource + Clone>(
    ev: Event<K>,
    buffer: &mut Option<Vec<K>>,
    cache: &mut BTreeMap<String, K>,
) -> bool {
    let mut m = cache
        .iter()
        .map(|(k, v)| {
            let ns = v.meta().namespace.clone().unwrap_or_default();
            ((ns, k.clone()), v.clone())
        })
        .collect();
    let done = apply_event(ev, buffer, &mut m);
    *cache = m.into_iter().map(|((_, n), v)| (n, v)).collect();
    done
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
            Input::Node(ev) => ("nodes", apply_by_name(ev, &mut b.nodes, &mut s.nodes)),
            Input::Pool(ev) => ("ippools", apply_by_name(ev, &mut b.pools, &mut s.pools)),
            Input::L2(ev) => ("l2announcements", apply_by_name(ev, &mut b.l2, &mut s.l2)),
            Input::BgpPeer(ev) => (
                "bgppeers",
                apply_by_name(ev, &mut b.bgp_peers, &mut s.bgp_peers),
            ),
            Input::BgpAdvertisement(ev) => (
                "bgpadvertisements",
                apply_by_name(ev, &mut b.bgp_ads, &mut s.bgp_ads),
            ),
            Input::BfdProfile(ev) => (
                "bfdprofiles",
                apply_by_name(ev, &mut b.bfd_profiles, &mut s.bfd_profiles),
            ),
            Input::BgpSecret(ev) => (
                "secrets",
                apply_by_name(ev, &mut b.bgp_secrets, &mut s.bgp_secrets),
            ),
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
