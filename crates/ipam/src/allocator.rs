//! The pure allocator: pools, requests, sharing keys, and re-derivation after a restart.
//!
//! Nothing here talks to Kubernetes. The controller feeds the allocator the pools
//! ([`Allocator::set_pools`]), then, once its caches are synced, every Service's recorded
//! addresses ([`Allocator::restore`]) and only then requests ([`Allocator::assign`]). The
//! rules that keep addresses stable:
//!
//! - an address held by a Service is never moved implicitly: pool edits and deletions leave
//!   holdings alone (they become *orphans*, reported, never reassigned), and `assign` keeps what
//!   a Service holds as long as the request still allows it;
//! - an address is held by one Service, or by several that carry the same sharing key and whose
//!   ports and protocols do not clash;
//! - a refused request changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use model::Protocol;

use crate::crd::IPPool;
use crate::selector::{self, Labels, Selector};

/// Most addresses one Service may ask for per family (`portico.dev/address-count`).
pub const MAX_ADDRESS_COUNT: usize = 16;

/// Identifies a Service: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One port of a Service, as far as sharing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    /// TCP or UDP (SCTP is not balanced by portico).
    pub protocol: Protocol,
    /// The port on the address.
    pub port: u16,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

mod range;
pub use range::{AddrRange, is_subnet_router_anycast};
use range::{from_u128, is_buggy, multiples_in, to_u128};

/// A validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// The `IPPool` name.
    pub name: String,
    /// Its addresses.
    pub ranges: Vec<AddrRange>,
    /// Whether Services that do not ask for it may use it.
    pub auto_assign: bool,
    /// Skip `.0` and `.255`.
    pub avoid_buggy_ips: bool,
    /// Lower first; `None` last.
    pub priority: Option<i32>,
    /// Namespaces by name (empty: any).
    pub namespaces: Vec<String>,
    /// Namespaces by label (empty: any).
    pub namespace_selectors: Vec<Selector>,
    /// Services by label (empty: any).
    pub service_selectors: Vec<Selector>,
    /// `metadata.creationTimestamp`: of two overlapping pools the older one stays in service.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

/// Why a pool spec is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The pool lists no address.
    #[error("the pool lists no addresses")]
    NoAddresses,
    /// An address or range is malformed.
    #[error("address `{0}` is invalid: {1}")]
    Address(String, String),
    /// One entry of `spec.addresses` is malformed: its index, its value, why.
    #[error("spec.addresses[{0}] `{1}` is invalid: {2}")]
    Entry(usize, String, String),
    /// Two entries of the same pool overlap (indices and values).
    #[error(
        "spec.addresses[{0}] `{1}` and spec.addresses[{2}] `{3}` overlap; remove one or split them"
    )]
    SelfOverlap(usize, String, usize, String),
    /// A selector is malformed: where (`spec.serviceAllocation.namespaceSelectors[0]`) and why.
    #[error("{0}: {1}")]
    Selector(String, selector::Error),
}

/// Validates an `IPPool` (the controller re-checks what the CRD's CEL rules should have caught).
pub fn parse_pool(p: &IPPool) -> Result<Pool, PoolError> {
    use kube::ResourceExt;
    let spec = &p.spec;
    if spec.addresses.is_empty() {
        return Err(PoolError::NoAddresses);
    }
    let mut ranges = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let r = AddrRange::parse(a).map_err(|e| match e {
            PoolError::Address(v, why) => PoolError::Entry(i, v, why),
            other => other,
        })?;
        if let Some(j) = ranges.iter().position(|o: &AddrRange| o.overlaps(&r)) {
            return Err(PoolError::SelfOverlap(
                j,
                spec.addresses[j].clone(),
                i,
                spec.addresses[i].clone(),
            ));
        }
        ranges.push(r);
    }
    let alloc = spec.service_allocation.clone().unwrap_or_default();
    let selectors =
        |field: &str, v: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector]| {
            v.iter()
                .enumerate()
                .map(|(i, s)| {
                    Selector::parse(s).map_err(|e| {
                        PoolError::Selector(format!("spec.serviceAllocation.{field}[{i}]"), e)
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
    Ok(Pool {
        name: p.name_any(),
        ranges,
        auto_assign: spec.auto_assign,
        avoid_buggy_ips: spec.avoid_buggy_ips,
        priority: alloc.priority,
        namespaces: alloc.namespaces,
        namespace_selectors: selectors("namespaceSelectors", &alloc.namespace_selectors)?,
        service_selectors: selectors("serviceSelectors", &alloc.service_selectors)?,
        created: p.creation_timestamp().map(|t| t.0),
    })
}

impl Pool {
    fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    fn serves(&self, r: &Request) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&r.service.namespace))
            && selector::any_matches(&self.namespace_selectors, &r.namespace_labels)
            && selector::any_matches(&self.service_selectors, &r.labels)
    }

    fn usable(&self, ip: IpAddr) -> bool {
        !(is_subnet_router_anycast(ip) || self.avoid_buggy_ips && is_buggy(ip))
    }

    fn size(&self, family: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|r| r.family() == family)
            .map(|r| {
                let buggy = if self.avoid_buggy_ips && family == Family::V4 {
                    let (a, b) = (to_u128(r.start), to_u128(r.end));
                    // How many v in 0..=n end in the octet `o`.
                    let upto = |n: u128, o: u128| if n < o { 0 } else { (n - o) / 256 + 1 };
                    let below = |o| if a == 0 { 0 } else { upto(a - 1, o) };
                    (upto(b, 0) - below(0)) + (upto(b, 255) - below(255))
                } else if family == Family::V6 {
                    multiples_in(to_u128(r.start), to_u128(r.end), 1 << 64)
                } else {
                    0
                };
                r.len().saturating_sub(buggy)
            })
            .sum()
    }
}

/// What a Service asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The Service.
    pub service: ServiceKey,
    /// The Service's labels (for `serviceSelectors`).
    pub labels: Labels,
    /// Its namespace's labels (for `namespaceSelectors`).
    pub namespace_labels: Labels,
    /// Wanted families in order (`spec.ipFamilies`).
    pub families: Vec<Family>,
    /// Every family is required (`SingleStack`, `RequireDualStack`); otherwise
    /// (`PreferDualStack`) families without room are skipped as long as one succeeds.
    pub require_all_families: bool,
    /// Explicitly requested addresses (when not empty, exactly these).
    pub addresses: Vec<IpAddr>,
    /// The pool named by annotation.
    pub pool: Option<String>,
    /// The sharing key, if the Service agrees to share.
    pub sharing_key: Option<String>,
    /// Its ports.
    pub ports: Vec<PortSpec>,
    /// Addresses per family (at least 1).
    pub count: usize,
}

/// Why a request is refused. [`Refusal::reason`] is the Event reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No eligible pool has a free address.
    #[error("{0}")]
    PoolExhausted(String),
    /// A requested address is held by a Service that does not share it.
    #[error("{0}")]
    IpInUse(String),
    /// The request itself is wrong (address outside every pool, unknown pool, bad count).
    #[error("{0}")]
    InvalidRequest(String),
    /// Sharing was asked for but the ports clash.
    #[error("{0}")]
    SharingRefused(String),
}

impl Refusal {
    /// The Event and condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::PoolExhausted(_) => "PoolExhausted",
            Refusal::IpInUse(_) => "IPInUse",
            Refusal::InvalidRequest(_) => "InvalidRequest",
            Refusal::SharingRefused(_) => "SharingRefused",
        }
    }
}

/// The Services holding one address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    users: BTreeMap<ServiceKey, User>,
}

/// One Service's use of an address, as its spec says now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    key: Option<String>,
    ports: Vec<PortSpec>,
}

impl User {
    fn of(req: &Request) -> Self {
        Self {
            key: req.sharing_key.clone(),
            ports: req.ports.clone(),
        }
    }
}

impl Holder {
    /// The first other user that does not agree to share with `req` (a sharing key that
    /// every user carries is the agreement).
    fn disagrees<'a>(&'a self, req: &Request) -> Option<(&'a ServiceKey, &'a User)> {
        self.users
            .iter()
            .filter(|(k, _)| **k != req.service)
            .find(|(_, u)| req.sharing_key.is_none() || u.key != req.sharing_key)
    }
}

/// One pool's state, as reported in its status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolReport {
    /// Pool name.
    pub name: String,
    /// Held IPv4 addresses inside the pool.
    pub assigned_v4: u128,
    /// Free IPv4 addresses.
    pub available_v4: u128,
    /// Held IPv6 addresses inside the pool.
    pub assigned_v6: u128,
    /// Free IPv6 addresses.
    pub available_v6: u128,
    /// Why the pool spec is rejected.
    pub invalid: Option<String>,
    /// Older pools it shares addresses with (creation time, then name); such a pool is refused
    /// and hands out nothing new, while the older ones stay in service.
    pub overlapping: Vec<String>,
}

/// The allocator's whole state. Cheap to clone; every `assign` works on a copy and commits
/// only on success, so a refusal changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocator {
    /// Pools by name, valid or not.
    pools: BTreeMap<String, Result<Pool, PoolError>>,
    /// Pools that overlap an older one: name → the older ones.
    overlapping: BTreeMap<String, Vec<String>>,
    holders: BTreeMap<IpAddr, Holder>,
    by_service: BTreeMap<ServiceKey, Vec<IpAddr>>,
    /// Bumped whenever a holding or a holder's record changes (see [`Allocator::generation`]).
    generation: u64,
}

impl Allocator {
    /// Changes whenever what is held, or what a holder says about ports and sharing, changes:
    /// only then can a refused request have become possible.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether some valid pool contains `ip`.
    pub fn in_a_pool(&self, ip: IpAddr) -> bool {
        self.valid_pools().any(|p| p.contains(ip))
    }

    /// Records `req`'s user entry on `ip`'s holder, bumping the generation when it changes.
    fn record(&mut self, ip: IpAddr, req: &Request) {
        let user = User::of(req);
        let h = self.holders.entry(ip).or_insert_with(|| Holder {
            users: BTreeMap::new(),
        });
        if h.users.get(&req.service) != Some(&user) {
            h.users.insert(req.service.clone(), user);
            self.generation += 1;
        }
    }

    /// An allocator without pools or holdings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the pools. Holdings are never touched: an address no pool contains any more
    /// stays with its Service (see [`Allocator::orphans`]).
    ///
    /// Of two valid pools that share addresses the older one (by creation time, then name) stays
    /// in service and the newcomer is refused, as MetalLB's admission refuses it: creating a pool
    /// never takes addresses away from an established one.
    pub fn set_pools(
        &mut self,
        pools: impl IntoIterator<Item = (String, Result<Pool, PoolError>)>,
    ) {
        self.pools = pools.into_iter().collect();
        self.overlapping.clear();
        let mut valid: Vec<&Pool> = self
            .pools
            .values()
            .filter_map(|p| p.as_ref().ok())
            .collect();
        // Pools without a creation time (never from an API server) count as newest.
        valid.sort_by_key(|p| (p.created.is_none(), p.created, p.name.clone()));
        for (i, p) in valid.iter().enumerate() {
            let older: Vec<String> = valid[..i]
                .iter()
                .filter(|o| {
                    p.ranges
                        .iter()
                        .any(|r| o.ranges.iter().any(|q| r.overlaps(q)))
                })
                .map(|o| o.name.clone())
                .collect();
            if !older.is_empty() {
                self.overlapping.insert(p.name.clone(), older);
            }
        }
    }

    /// The addresses a Service holds, in the order it got them.
    pub fn held(&self, service: &ServiceKey) -> &[IpAddr] {
        self.by_service.get(service).map_or(&[], |v| v.as_slice())
    }

    /// Every Service's holdings.
    pub fn holdings(&self) -> &BTreeMap<ServiceKey, Vec<IpAddr>> {
        &self.by_service
    }

    /// The valid pool that contains `ip` (the older one when pools overlap).
    pub fn pool_of(&self, ip: IpAddr) -> Option<&str> {
        self.valid_pools()
            .filter(|p| p.contains(ip))
            .min_by_key(|p| (self.overlapping.contains_key(&p.name), p.name.clone()))
            .map(|p| p.name.as_str())
    }

    /// Held addresses that no valid pool contains (a pool was edited or deleted).
    pub fn orphans(&self) -> Vec<IpAddr> {
        self.holders
            .keys()
            .filter(|ip| !self.valid_pools().any(|p| p.contains(**ip)))
            .copied()
            .collect()
    }

    /// Releases everything a Service holds.
    pub fn release(&mut self, service: &ServiceKey) {
        if self.by_service.contains_key(service) {
            self.generation += 1;
        }
        for ip in self.by_service.remove(service).unwrap_or_default() {
            if let Some(h) = self.holders.get_mut(&ip) {
                h.users.remove(service);
                if h.users.is_empty() {
                    self.holders.remove(&ip);
                }
            }
        }
    }

    /// Claims addresses a Service already had before a restart, exactly as recorded: regardless
    /// of pools (they are never moved), ports and sharing keys (what was granted stays granted).
    /// A recorded conflict is not resolved here by moving anyone: the next [`Allocator::assign`]
    /// of the Service reports it (`IPInUse`, `SharingRefused`) and keeps the address.
    pub fn restore(&mut self, req: &Request, current: &[IpAddr]) {
        self.release(&req.service);
        for ip in current {
            self.record(*ip, req);
            let mine = self.by_service.entry(req.service.clone()).or_default();
            if !mine.contains(ip) {
                mine.push(*ip);
            }
        }
    }

    /// Gives a Service what it asks for, keeping whatever it holds that still fits. On a refusal
    /// no holding changes (the Service keeps its previous addresses); only the record of its
    /// ports, and of its sharing key where it holds an address alone, follows its current spec,
    /// as a restart would record it.
    pub fn assign(&mut self, req: &Request) -> Result<Vec<IpAddr>, Refusal> {
        let r = self.try_assign(req);
        if r.is_err() {
            for ip in self
                .by_service
                .get(&req.service)
                .cloned()
                .unwrap_or_default()
            {
                self.record(ip, req);
            }
        }
        r
    }

    fn try_assign(&mut self, req: &Request) -> Result<Vec<IpAddr>, Refusal> {
        if req.count == 0 || req.count > MAX_ADDRESS_COUNT {
            return Err(Refusal::InvalidRequest(format!(
                "address count {} is out of range 1-{MAX_ADDRESS_COUNT}",
                req.count
            )));
        }
        if req.families.is_empty() {
            return Err(Refusal::InvalidRequest(
                "the Service lists no IP family".into(),
            ));
        }
        if let Some(pool) = &req.pool {
            match self.pools.get(pool) {
                None => {
                    return Err(Refusal::InvalidRequest(format!(
                        "pool {pool} does not exist"
                    )));
                }
                Some(Err(e)) => {
                    return Err(Refusal::InvalidRequest(format!(
                        "pool {pool} is invalid: {e}"
                    )));
                }
                Some(Ok(p)) if !p.serves(req) => {
                    return Err(Refusal::InvalidRequest(format!(
                        "pool {pool} does not serve Service {}",
                        req.service
                    )));
                }
                Some(Ok(_)) => {}
            }
        }
        if let Some(ips) = self.keep(req) {
            return Ok(ips);
        }
        let held: Vec<IpAddr> = self.held(&req.service).to_vec();
        let mut next = self.clone();
        next.release(&req.service);
        let mut plan = Vec::new();
        if !req.addresses.is_empty() {
            let mut seen = BTreeSet::new();
            for ip in &req.addresses {
                if !seen.insert(*ip) {
                    return Err(Refusal::InvalidRequest(format!(
                        "address {ip} is requested twice"
                    )));
                }
                if !req.families.contains(&Family::of(*ip)) {
                    return Err(Refusal::InvalidRequest(format!(
                        "address {ip} is {} but the Service's families are {}",
                        Family::of(*ip),
                        families(&req.families)
                    )));
                }
                if !held.contains(ip) && is_subnet_router_anycast(*ip) {
                    return Err(Refusal::InvalidRequest(format!(
                        "address {ip} is the subnet-router anycast address of its /64 (all-zeros interface identifier); routers answer it, so it is never handed out"
                    )));
                }
                // An address the Service already holds stays, even if its pool went away.
                if !held.contains(ip) && !next.eligible(req).any(|p| p.contains(*ip)) {
                    return Err(Refusal::InvalidRequest(match &req.pool {
                        Some(pool) => format!("address {ip} is not in pool {pool}"),
                        None => {
                            format!("address {ip} is outside every pool that serves this Service")
                        }
                    }));
                }
                next.claim(*ip, req)?;
                plan.push(*ip);
            }
        } else {
            let mut got_any = false;
            let mut first_miss = None;
            for family in &req.families {
                let mut n = 0;
                for ip in held.iter().filter(|ip| Family::of(**ip) == *family) {
                    if n == req.count {
                        break;
                    }
                    next.claim(*ip, req)?;
                    plan.push(*ip);
                    n += 1;
                }
                while n < req.count {
                    match next.pick(req, *family, &plan) {
                        Ok(ip) => {
                            next.claim(ip, req)?;
                            plan.push(ip);
                            n += 1;
                        }
                        Err(e) => {
                            // With PreferDualStack a family is optional only when nothing of it is held.
                            if req.require_all_families || n > 0 {
                                return Err(e);
                            }
                            first_miss.get_or_insert(e);
                            break;
                        }
                    }
                }
                got_any |= n > 0;
            }
            if !got_any {
                return Err(
                    first_miss.unwrap_or_else(|| Refusal::PoolExhausted("no address".into()))
                );
            }
        }
        *self = next;
        Ok(plan)
    }

    /// The fast path of [`Allocator::assign`]: when what a Service holds already answers its
    /// request and stays compatible with its co-holders, refresh its record in place (no copy).
    fn keep(&mut self, req: &Request) -> Option<Vec<IpAddr>> {
        let held = self.by_service.get(&req.service)?;
        let plan: Vec<IpAddr> = if req.addresses.is_empty() {
            if held
                .iter()
                .any(|ip| !req.families.contains(&Family::of(*ip)))
            {
                return None;
            }
            let mut plan = Vec::new();
            for f in &req.families {
                let of_f: Vec<IpAddr> = held
                    .iter()
                    .filter(|ip| Family::of(**ip) == *f)
                    .copied()
                    .collect();
                if of_f.len() != req.count {
                    return None;
                }
                plan.extend(of_f);
            }
            plan
        } else {
            let mut a = held.clone();
            let mut b = req.addresses.clone();
            a.sort();
            b.sort();
            if a != b {
                return None;
            }
            req.addresses.clone()
        };
        for ip in &plan {
            let h = self.holders.get(ip)?;
            if h.disagrees(req).is_some() || clash(h, req).is_some() {
                return None;
            }
        }
        for ip in &plan {
            self.record(*ip, req);
        }
        if self
            .by_service
            .insert(req.service.clone(), plan.clone())
            .as_ref()
            != Some(&plan)
        {
            self.generation += 1;
        }
        Some(plan)
    }

    fn valid_pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().filter_map(|p| p.as_ref().ok())
    }

    /// Pools a request may take new addresses from, best first.
    fn eligible<'a>(&'a self, req: &'a Request) -> impl Iterator<Item = &'a Pool> + 'a {
        let mut v: Vec<&Pool> = self
            .valid_pools()
            .filter(|p| !self.overlapping.contains_key(&p.name))
            .filter(|p| match &req.pool {
                Some(name) => &p.name == name,
                None => p.auto_assign || !req.addresses.is_empty(),
            })
            .filter(|p| p.serves(req))
            .collect();
        v.sort_by_key(|p| (p.priority.is_none(), p.priority, p.name.clone()));
        v.into_iter()
    }

    /// Adds `req.service` as a user of `ip`, if compatible.
    fn claim(&mut self, ip: IpAddr, req: &Request) -> Result<(), Refusal> {
        if let Some(h) = self.holders.get(&ip) {
            if let Some((other, user)) = h.disagrees(req) {
                return Err(Refusal::IpInUse(format!(
                    "address {ip} is held by Service {other}{}",
                    match (&user.key, &req.sharing_key) {
                        (Some(a), Some(b)) => format!(" with sharing key {a}, not {b}"),
                        (Some(a), None) => format!(" with sharing key {a}; this Service has none"),
                        _ => " without a sharing key".to_string(),
                    }
                )));
            }
            if let Some(msg) = clash(h, req) {
                return Err(Refusal::SharingRefused(format!("address {ip}: {msg}")));
            }
        }
        self.record(ip, req);
        let mine = self.by_service.entry(req.service.clone()).or_default();
        if !mine.contains(&ip) {
            mine.push(ip);
        }
        Ok(())
    }

    /// Chooses a new address of `family`: first one already shared under the request's key,
    /// then the first free one of the best pool.
    fn pick(&self, req: &Request, family: Family, plan: &[IpAddr]) -> Result<IpAddr, Refusal> {
        let pools: Vec<&Pool> = self.eligible(req).collect();
        if pools.is_empty() {
            return Err(Refusal::PoolExhausted(format!(
                "no pool serves Service {}{}",
                req.service,
                req.pool
                    .as_ref()
                    .map(|p| format!(" from pool {p}"))
                    .unwrap_or_default()
            )));
        }
        // A sharing key is bound to the addresses its Services hold: while one of them cannot
        // be shared (ports clash, or it lies outside the pools that serve this request, say after
        // a pool edit), the request is refused rather than given an address of its own, which
        // would split the key over two addresses.
        if let Some(key) = &req.sharing_key {
            let mut clashes = Vec::new();
            for (ip, h) in &self.holders {
                if h.users.values().all(|u| u.key.as_ref() == Some(key))
                    && h.disagrees(req).is_none()
                    && Family::of(*ip) == family
                    && !plan.contains(ip)
                {
                    match clash(h, req) {
                        None if pools.iter().any(|p| p.contains(*ip)) => return Ok(*ip),
                        None => clashes.push(format!(
                            "{ip} is outside every pool that serves Service {}",
                            req.service
                        )),
                        Some(msg) => clashes.push(format!("{ip}: {msg}")),
                    }
                }
            }
            if !clashes.is_empty() {
                return Err(Refusal::SharingRefused(format!(
                    "sharing key {key}: {}",
                    clashes.join("; ")
                )));
            }
        }
        for p in &pools {
            for r in p.ranges.iter().filter(|r| r.family() == family) {
                let (mut v, end) = (to_u128(r.start), to_u128(r.end));
                loop {
                    let ip = from_u128(family, v);
                    if p.usable(ip) && !self.holders.contains_key(&ip) && !plan.contains(&ip) {
                        return Ok(ip);
                    }
                    if v == end {
                        break;
                    }
                    v += 1;
                }
            }
        }
        Err(Refusal::PoolExhausted(format!(
            "no free {family} address in pool{} {}",
            if pools.len() == 1 { "" } else { "s" },
            pools
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Usage of every pool, for its status.
    pub fn report(&self) -> Vec<PoolReport> {
        self.pools
            .iter()
            .map(|(name, p)| match p {
                Err(e) => PoolReport {
                    name: name.clone(),
                    invalid: Some(e.to_string()),
                    ..PoolReport::default()
                },
                Ok(p) => {
                    let count = |f: Family| {
                        self.holders
                            .keys()
                            .filter(|ip| {
                                Family::of(**ip) == f && p.contains(**ip) && p.usable(**ip)
                            })
                            .count() as u128
                    };
                    let (a4, a6) = (count(Family::V4), count(Family::V6));
                    let overlapping = self.overlapping.get(name).cloned().unwrap_or_default();
                    let (s4, s6) = if overlapping.is_empty() {
                        (p.size(Family::V4), p.size(Family::V6))
                    } else {
                        (a4, a6)
                    };
                    PoolReport {
                        name: name.clone(),
                        assigned_v4: a4,
                        available_v4: s4.saturating_sub(a4),
                        assigned_v6: a6,
                        available_v6: s6.saturating_sub(a6),
                        invalid: None,
                        overlapping,
                    }
                }
            })
            .collect()
    }
}

fn clash(h: &Holder, req: &Request) -> Option<String> {
    for (other, user) in h.users.iter().filter(|(k, _)| **k != req.service) {
        if let Some(p) = req.ports.iter().find(|p| user.ports.contains(p)) {
            return Some(format!("port {p} is already used by Service {other}"));
        }
    }
    None
}

fn families(f: &[Family]) -> String {
    f.iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
