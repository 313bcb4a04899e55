//! Who owns each VIP: a pure function of (VIPs, alive members, eligibility, preferences, claims).
//!
//! Every node runs [`decide`] on the same inputs (the shared config plus what heartbeats carry)
//! and gets the same answer without exchanging votes.
//!
//! # The rule
//! 1. **Home.** From the config alone (all configured nodes assumed alive), every VIP gets a
//!    *home*: its first preferred node if it has one, otherwise the highest-ranked node by
//!    rendezvous hash (`score(node, vip)`, as MetalLB sorts by `sha256(node#ip)`) subject to a
//!    load cap of `ceil(1.05 × VIPs / nodes)` per node (consistent hashing with bounded loads)
//!    and to anti-affinity (a service's VIPs on distinct nodes while there are nodes left).
//!    With everybody up, every VIP sits at home, so 1 000 VIPs over 5 nodes land within a few
//!    percent of the mean instead of the ±6 % standard deviation of plain hashing.
//! 2. **Candidates** of a VIP are the alive members that are selected (`placement.nodes`), have
//!    an interface of the VIP's family, and, for `local_only` services, a healthy local backend.
//! 3. **Incumbent**: the candidate that claims the VIP (heartbeats carry claims); if several do
//!    (a healed partition), the home if it claims, else the best-ranked claimant.
//! 4. If the home is a candidate it owns the VIP, unless another incumbent exists: then the
//!    incumbent keeps it, except that in preemptive mode the home, once alive for `hold_down`,
//!    takes it back by claiming it (a claiming home is everybody's incumbent, so the others
//!    follow on its next heartbeat: make-before-break). If the home is not a candidate, the
//!    incumbent keeps the VIP.
//! 5. VIPs still without owner go, in address order, to their best-ranked candidate not
//!    already holding one of the service's VIPs (else the best-ranked candidate).
//! 6. **Spread**: a VIP kept by an incumbent that also owns another VIP of its service (its
//!    home has no agent, say, and the service's other node came up later) goes to the
//!    best-ranked candidate owning none of them. Only that candidate acts, by claiming it once
//!    alive for `hold_down` (preemptive mode); among claimants, one holding no other VIP of the
//!    service is preferred, so the old holder lets go when it sees the claim.
//!
//! A withdrawn service (`placement.withdrawn`: no serving endpoint) has no candidates and every
//! node says `noHealthyEndpoints`.
//!
//! Stability follows: a member leaving moves only the VIPs it owned (everything else has a
//! live incumbent or a live home), and after a partition heals every node sees the same claims
//! and picks the same single owner.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use model::{NodeId, Service};

/// What a node tells the others about itself (carried in its heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// It has an interface with an IPv4 address.
    pub v4: bool,
    /// It has an interface with an IPv6 address.
    pub v6: bool,
    /// The `local_only` services for which it has at least one healthy local backend.
    pub serving: BTreeSet<String>,
    /// VIPs with a listener the balancer could not open on it (it is not eligible for them).
    pub closed: BTreeSet<IpAddr>,
}

/// An alive member as the deciding node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberView {
    /// How long it has been continuously alive (for hold-down).
    pub alive_for: Duration,
    /// Its facts.
    pub facts: Facts,
    /// The VIPs it currently announces.
    pub claims: BTreeSet<IpAddr>,
}

/// Why this node does or does not announce a VIP (MetalLB's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// This node announces it.
    Owner,
    /// Another node announces it.
    NotOwner,
    /// No alive node is eligible.
    NoEligibleNode,
    /// This node is not in the service's `placement.nodes`.
    NotSelected,
    /// `local_only` service and no healthy backend runs here.
    NoHealthyLocalBackend,
    /// This node has no interface of the VIP's address family.
    NoInterface,
    /// The service has no serving endpoint: its addresses are withdrawn everywhere
    /// (`placement.withdrawn`, set by the Kubernetes source).
    NoHealthyEndpoints,
    /// A listener of the VIP could not be opened on this node (the balancer retries it).
    ListenerNotOpen,
}

impl Reason {
    /// The word shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Owner => "owner",
            Reason::NotOwner => "notOwner",
            Reason::NoEligibleNode => "noEligibleNode",
            Reason::NotSelected => "notSelected",
            Reason::NoHealthyLocalBackend => "noHealthyLocalBackend",
            Reason::NoInterface => "noInterface",
            Reason::NoHealthyEndpoints => "noHealthyEndpoints",
            Reason::ListenerNotOpen => "listenerNotOpen",
        }
    }
}

/// One VIP's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The owner, if any node is eligible.
    pub owner: Option<NodeId>,
    /// Why this node does or does not announce.
    pub reason: Reason,
}

/// Everything [`decide`] needs.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The deciding node.
    pub me: &'a str,
    /// Every configured node (this one and its peers): the homes are computed over these.
    pub nodes: &'a BTreeSet<NodeId>,
    /// Services (VIPs and placement).
    pub services: &'a [Service],
    /// Alive members, including `me`.
    pub alive: &'a BTreeMap<NodeId, MemberView>,
    /// Whether a returning home takes its VIPs back (after `hold_down`).
    pub preemptive: bool,
    /// How long a home must be alive before it takes a VIP back from an incumbent.
    pub hold_down: Duration,
}

/// Rendezvous score of `node` for `vip`: FNV-1a over both, then a SplitMix64 finaliser.
/// Stable across versions and platforms (it is part of the cluster protocol).
pub fn score(node: &str, vip: IpAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    node.bytes().for_each(&mut eat);
    eat(b'#');
    match vip {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A VIP with the placement rules that apply to it (the first service listing it governs
/// anti-affinity and preferences; selection and local-only rules of every listing service apply).
#[derive(Debug, Clone)]
struct Spec {
    vip: IpAddr,
    group: String,
    selected: Option<BTreeSet<String>>,
    preferred: Vec<NodeId>,
    local_only: Vec<String>,
    /// Every service listing the VIP is withdrawn (no serving endpoint).
    withdrawn: bool,
}

fn specs(services: &[Service]) -> Vec<Spec> {
    let mut by_vip: BTreeMap<IpAddr, Spec> = BTreeMap::new();
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for s in sorted {
        let sel: Option<BTreeSet<String>> =
            (!s.placement.nodes.is_empty()).then(|| s.placement.nodes.iter().cloned().collect());
        for vip in &s.vips {
            let e = by_vip.entry(*vip).or_insert_with(|| Spec {
                vip: *vip,
                group: s.name.clone(),
                selected: None,
                preferred: s.placement.preferred.clone(),
                local_only: Vec::new(),
                withdrawn: true,
            });
            e.withdrawn &= s.placement.withdrawn;
            if let Some(sel) = &sel {
                e.selected = Some(match e.selected.take() {
                    None => sel.clone(),
                    Some(prev) => prev.intersection(sel).cloned().collect(),
                });
            }
            if s.placement.local_only {
                e.local_only.push(s.name.clone());
            }
        }
    }
    by_vip.into_values().collect()
}

impl Spec {
    fn selects(&self, node: &str) -> bool {
        self.selected.as_ref().is_none_or(|s| s.contains(node))
    }

    fn family_ok(&self, f: &Facts) -> bool {
        if self.vip.is_ipv4() { f.v4 } else { f.v6 }
    }

    fn listening(&self, f: &Facts) -> bool {
        f.closed.is_empty() || !f.closed.contains(&self.vip)
    }

    fn local_ok(&self, f: &Facts) -> bool {
        self.local_only.iter().all(|s| f.serving.contains(s))
    }

    /// Whether a member with facts `f` may own the VIP (selection is in the ranking already).
    fn eligible(&self, f: &Facts) -> bool {
        self.family_ok(f) && self.local_ok(f) && self.listening(f)
    }

    /// `nodes` ordered best first: preferred nodes in their order, then by score.
    fn rank<'n>(&self, nodes: impl Iterator<Item = &'n str>) -> Vec<&'n str> {
        let mut v: Vec<&str> = nodes.collect();
        v.sort_by_cached_key(|n| {
            let pref = self
                .preferred
                .iter()
                .position(|p| p == n)
                .unwrap_or(usize::MAX);
            (pref, std::cmp::Reverse(score(n, self.vip)), *n)
        });
        v
    }
}

/// The home of every VIP: config-only, balanced with a load cap, with anti-affinity.
fn homes<'a>(specs: &[Spec], nodes: &'a BTreeSet<NodeId>) -> BTreeMap<IpAddr, &'a str> {
    let mut out = BTreeMap::new();
    if nodes.is_empty() {
        return out;
    }
    let cap = (specs.len() * 105).div_ceil(100 * nodes.len()).max(1);
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    let mut used: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    // VIPs with preferences first (they do not move for balance), then in score order so that
    // overflow is spread evenly rather than landing on the last VIPs of the address range.
    let mut order: Vec<&Spec> = specs.iter().collect();
    order.sort_by_key(|s| (s.preferred.is_empty(), score("", s.vip), s.vip));
    for s in order {
        let ranked = s.rank(nodes.iter().map(String::as_str).filter(|n| s.selects(n)));
        let taken = used.entry(s.group.as_str()).or_default();
        let preferred = ranked
            .first()
            .copied()
            .filter(|n| s.preferred.iter().any(|p| p == n));
        let pick = preferred
            .or_else(|| {
                ranked
                    .iter()
                    .copied()
                    .find(|n| load[n] < cap && !taken.contains(n))
            })
            .or_else(|| ranked.iter().copied().find(|n| load[n] < cap))
            .or_else(|| ranked.iter().copied().min_by_key(|n| load[n]));
        if let Some(n) = pick {
            *load.get_mut(n).expect("ranked nodes are configured") += 1;
            taken.insert(n);
            out.insert(s.vip, n);
        }
    }
    out
}

/// What [`decide`] derives from the services and the node names alone: the VIPs' rules, their
/// homes, and every VIP's ranking of the nodes. Building it hashes every (node, VIP) pair and
/// sorts, which is most of a decision's cost at scale (100 nodes × 5,000 VIPs: 500,000
/// scores); it changes only with the configuration or the set of node names, so a node keeps
/// one per configuration and reuses it while it fits ([`Plan::fits`]) for every decision in between — a heartbeat, an expiry
/// or a health change then costs one pass over the rankings, with no hashing or sorting.
#[derive(Debug, Clone)]
pub struct Plan {
    specs: Vec<Spec>,
    /// Every node the plan ranks (configured nodes and any other alive member), sorted.
    names: Vec<NodeId>,
    /// The configured nodes the homes were computed over.
    configured: BTreeSet<NodeId>,
    /// Per spec: its home (index into `names`).
    homes: Vec<Option<u32>>,
    /// Per spec: the nodes that select it, best first (indices into `names`).
    ranked: Vec<Box<[u32]>>,
    /// Per service (group): its VIPs.
    group_of: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl Plan {
    /// Builds the plan for `services` over the configured `nodes` plus any `extra` names.
    pub fn new<'n>(
        services: &[Service],
        nodes: &BTreeSet<NodeId>,
        extra: impl Iterator<Item = &'n NodeId>,
    ) -> Self {
        let specs = specs(services);
        let mut all: BTreeSet<NodeId> = nodes.clone();
        all.extend(extra.cloned());
        let names: Vec<NodeId> = all.into_iter().collect();
        let index: BTreeMap<&str, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();
        let home_names = homes(&specs, nodes);
        let homes = specs
            .iter()
            .map(|s| home_names.get(&s.vip).map(|h| index[h]))
            .collect();
        let ranked = specs
            .iter()
            .map(|s| {
                s.rank(names.iter().map(String::as_str).filter(|n| s.selects(n)))
                    .into_iter()
                    .map(|n| index[n])
                    .collect()
            })
            .collect();
        let mut group_of: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for s in &specs {
            group_of.entry(s.group.clone()).or_default().insert(s.vip);
        }
        Plan {
            specs,
            names,
            configured: nodes.clone(),
            homes,
            ranked,
            group_of,
        }
    }

    /// Whether this plan, built for `inp.services`, also fits `inp`'s nodes: the same
    /// configured nodes, and every alive member ranked. (The caller knows whether the services
    /// are the same ones: comparing them here would cost as much as a plan at scale.)
    pub fn fits(&self, inp: &Inputs<'_>) -> bool {
        self.configured == *inp.nodes
            && inp
                .alive
                .keys()
                .all(|n| self.names.binary_search(n).is_ok())
    }
}

/// Decides the owner of every VIP in `services`, with this node's reason.
pub fn decide(inp: &Inputs<'_>) -> BTreeMap<IpAddr, Decision> {
    decide_with(&Plan::new(inp.services, inp.nodes, inp.alive.keys()), inp)
}

/// [`decide`] with a [`Plan`] built for `inp.services` that fits `inp` ([`Plan::fits`]).
pub fn decide_with(plan: &Plan, inp: &Inputs<'_>) -> BTreeMap<IpAddr, Decision> {
    let names = &plan.names;
    // alive members by index
    let alive: Vec<Option<&MemberView>> = names.iter().map(|n| inp.alive.get(n)).collect();
    // who claims each VIP (indices, ascending)
    let mut claimed_by: BTreeMap<IpAddr, Vec<u32>> = BTreeMap::new();
    for (i, m) in alive.iter().enumerate() {
        if let Some(m) = m {
            for v in &m.claims {
                claimed_by.entry(*v).or_default().push(i as u32);
            }
        }
    }
    let me_index = names
        .binary_search_by(|n| n.as_str().cmp(inp.me))
        .ok()
        .map(|i| i as u32);
    let name = |i: u32| names[i as usize].as_str();
    // Whether `node` claims another VIP of the same service as `s` (anti-affinity).
    let claims_another = |node: u32, s: &Spec| {
        let group = &plan.group_of[&s.group];
        alive[node as usize]
            .is_some_and(|m| m.claims.iter().any(|v| *v != s.vip && group.contains(v)))
    };
    let alive_for = |i: u32| alive[i as usize].map(|m| m.alive_for).unwrap_or_default();
    let mut owners: Vec<Option<u32>> = vec![None; plan.specs.len()];
    // Per service: how many of its VIPs each node owns.
    let mut used: BTreeMap<&str, BTreeMap<u32, usize>> = BTreeMap::new();
    let mut pending: Vec<(usize, Vec<u32>)> = Vec::new();
    // VIPs kept by an incumbent because their home is not a candidate.
    let mut kept: Vec<(usize, Vec<u32>, u32)> = Vec::new();
    for (k, s) in plan.specs.iter().enumerate() {
        let cands: Vec<u32> = if s.withdrawn {
            Vec::new()
        } else {
            plan.ranked[k]
                .iter()
                .copied()
                .filter(|i| alive[*i as usize].is_some_and(|m| s.eligible(&m.facts)))
                .collect()
        };
        let claimants: Vec<u32> = match claimed_by.get(&s.vip) {
            None => Vec::new(),
            Some(by) => cands.iter().copied().filter(|n| by.contains(n)).collect(),
        };
        let home = plan.homes[k].filter(|h| cands.contains(h));
        // A claiming home wins; then a claimant that holds no other VIP of the service (so
        // that a node taking a VIP over for anti-affinity is everybody's incumbent once it
        // claims, as a returning home is); then the best-ranked claimant.
        let incumbent = home
            .filter(|h| claimants.contains(h))
            .or_else(|| claimants.iter().copied().find(|n| !claims_another(*n, s)))
            .or_else(|| claimants.first().copied());
        let owner = match (home, incumbent) {
            (Some(h), None) => Some(h),
            (Some(h), Some(i)) if i == h => Some(h),
            (Some(h), Some(i)) => {
                // Only the home itself decides to take a VIP back (by claiming it: a claiming
                // home is the incumbent for everybody), so the incumbent never lets go before
                // the home has taken over: make-before-break, even if views of `alive_for`
                // differ between nodes.
                if inp.preemptive && Some(h) == me_index && alive_for(h) >= inp.hold_down {
                    Some(h)
                } else {
                    Some(i)
                }
            }
            (None, Some(i)) => {
                kept.push((k, cands.clone(), i));
                Some(i)
            }
            (None, None) => None,
        };
        match owner {
            Some(o) => {
                *used
                    .entry(s.group.as_str())
                    .or_default()
                    .entry(o)
                    .or_default() += 1;
                owners[k] = Some(o);
            }
            None => pending.push((k, cands)),
        }
    }
    for (k, cands) in pending {
        let taken = used.entry(plan.specs[k].group.as_str()).or_default();
        let pick = cands
            .iter()
            .copied()
            .find(|n| !taken.contains_key(n))
            .or_else(|| cands.first().copied());
        if let Some(n) = pick {
            *taken.entry(n).or_default() += 1;
        }
        owners[k] = pick;
    }
    // Anti-affinity is restored when it can be: a VIP kept by an incumbent that also owns
    // another VIP of the service goes to the best-ranked candidate owning none of them (say
    // the service's other node came up after its VIPs were placed, or its home has no agent).
    // As for a returning home, only that candidate acts, by claiming it once alive for
    // `hold_down` in preemptive mode; the incumbent lets go when it sees the claim.
    if inp.preemptive {
        for (k, cands, i) in kept {
            let taken = used.entry(plan.specs[k].group.as_str()).or_default();
            if taken.get(&i).copied().unwrap_or(0) < 2 {
                continue;
            }
            let Some(t) = cands.iter().copied().find(|n| !taken.contains_key(n)) else {
                continue;
            };
            if Some(t) == me_index && alive_for(t) >= inp.hold_down {
                *taken.get_mut(&i).expect("the incumbent owns it") -= 1;
                *taken.entry(t).or_default() += 1;
                owners[k] = Some(t);
            }
        }
    }
    let me = inp.alive.get(inp.me);
    plan.specs
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let owner = owners[k].map(name);
            let reason = if s.withdrawn {
                Reason::NoHealthyEndpoints
            } else if owner == Some(inp.me) {
                Reason::Owner
            } else if owner.is_none() {
                Reason::NoEligibleNode
            } else if !s.selects(inp.me) {
                Reason::NotSelected
            } else if me.is_some_and(|m| !s.family_ok(&m.facts)) {
                Reason::NoInterface
            } else if me.is_some_and(|m| !s.local_ok(&m.facts)) {
                Reason::NoHealthyLocalBackend
            } else if me.is_some_and(|m| !s.listening(&m.facts)) {
                Reason::ListenerNotOpen
            } else {
                Reason::NotOwner
            };
            (
                s.vip,
                Decision {
                    owner: owner.map(str::to_string),
                    reason,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
