//! `BGPPeer` and `BGPAdvertisement` into the model's `bgp` section for this node and each
//! Service's `announce` mode and `bgp` attributes (pure).
//!
//! - Peers: every `BGPPeer` whose `nodeSelectors` select this Node becomes a neighbour with
//!   `local_asn = myASN`; the section's AS is the first such peer's `myASN` and the router id
//!   the first peer's `routerID`, else the Node's IPv4 `InternalIP`.
//! - A Service whose pool a `BGPAdvertisement` selects is announced by BGP from the nodes its
//!   `nodeSelectors` select; by L2 as well (`both`) when an `L2Announcement` selects it too.
//!   Several advertisements: communities are merged, nodes united, peers united (`peers`:
//!   `BGPPeer` names the routes go to; any advertisement without `peers` sends them to every
//!   peer), and the first by name gives the aggregation lengths and LOCAL_PREF.
//! - Every field is validated here; a resource with a bad value is reported (resource, field,
//!   fix) and its last valid version, if any, stays in force ([`LastGood`]): a typo never
//!   tears down a session that runs.
//! - `bfdProfile` names a built-in profile (`off`, `default`, `fast`, timers such as
//!   `50msx3`), which wins, or a `BFDProfile` ([`bfd_profile`] checks it; a bad edit keeps its
//!   last valid version). The timers are written into the peer's valid spec
//!   ([`inline_bfd`]), so a running session keeps them when the profile later goes or breaks.
//! - A `passwordSecret` is read from the Secrets of portico's namespace (type
//!   `kubernetes.io/basic-auth`, key `password`, as MetalLB has it); a missing Secret or key
//!   is a bad value like any other: a new peer is not configured, a running one keeps its last
//!   valid password.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use model::bgp::{BfdProfile, Bgp, BgpPeer, Community, LargeCommunity, ServiceBgp};

use super::{Snapshot, internal_ip};
use crate::allocator::AddrRange;
use crate::crd::{BFDProfileSpec, BGPAdvertisementSpec, BGPPeerSpec};
use crate::selector::{Selector, any_matches};

/// The last valid spec of each resource by name, so a bad edit keeps the previous one running.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastGood {
    /// `BGPPeer` specs by name.
    pub peers: BTreeMap<String, BGPPeerSpec>,
    /// `BGPAdvertisement` specs by name.
    pub advertisements: BTreeMap<String, BGPAdvertisementSpec>,
    /// `BFDProfile` specs by name.
    pub bfd_profiles: BTreeMap<String, BFDProfileSpec>,
}

/// Graceful restart time advertised when `gracefulRestart` is on (the standalone default).
const GRACEFUL_RESTART: Duration = Duration::from_secs(120);

fn selectors(v: &[LabelSelector], field: &str) -> Result<Vec<Selector>, String> {
    v.iter()
        .enumerate()
        .map(|(i, s)| Selector::parse(s).map_err(|e| format!("{field}[{i}]: {e}")))
        .collect()
}

/// A `BGPPeer` checked field by field: the neighbour and its node selectors, or every error.
pub fn peer(name: &str, spec: &BGPPeerSpec) -> Result<(BgpPeer, Vec<Selector>), Vec<String>> {
    let mut errs = Vec::new();
    let mut err = |field: &str, msg: String| errs.push(format!("spec.{field}: {msg}"));
    if spec.my_asn == 0 {
        err("myASN", "0 is not an AS number; use 1-4294967295".into());
    }
    if spec.peer_asn == 0 {
        err("peerASN", "0 is not an AS number; use 1-4294967295".into());
    }
    let address = spec.peer_address.trim().parse::<IpAddr>().map_err(|_| {
        format!(
            "`{}` is not an IP address; write e.g. 192.0.2.1 or 2001:db8::1",
            spec.peer_address
        )
    });
    let address = match address {
        Ok(a) => Some(a),
        Err(e) => {
            err("peerAddress", e);
            None
        }
    };
    let source = match spec.source_address.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => match s.parse::<IpAddr>() {
            Ok(src) if address.is_some_and(|a| a.is_ipv4() != src.is_ipv4()) => {
                err(
                    "sourceAddress",
                    format!(
                        "{src} and peerAddress {} are of different families; use a source of the peer's family",
                        spec.peer_address
                    ),
                );
                None
            }
            Ok(src) => Some(src),
            Err(_) => {
                err(
                    "sourceAddress",
                    format!("`{s}` is not an IP address; write e.g. 192.0.2.10"),
                );
                None
            }
        },
    };
    if let Some(r) = &spec.router_id
        && r.trim().parse::<Ipv4Addr>().is_err()
    {
        err(
            "routerID",
            format!("`{r}` is not an IPv4 address; a router id is written e.g. 192.0.2.10"),
        );
    }
    let port = match spec.peer_port {
        Some(0) => {
            err("peerPort", "0 is not a port; use 1-65535 (179)".into());
            179
        }
        Some(p) => p,
        None => 179,
    };
    let hold_time = match spec.hold_time.as_deref() {
        None => Duration::from_secs(90),
        Some(s) => match model::duration::parse(s) {
            Ok(d) if d != Duration::ZERO && d < Duration::from_secs(3) => {
                err(
                    "holdTime",
                    format!(
                        "{s} is too short; a hold time is 0 (no keepalives) or at least 3s (RFC 4271)"
                    ),
                );
                Duration::from_secs(90)
            }
            Ok(d) if d > Duration::from_secs(65535) => {
                err("holdTime", format!("{s} is too long; at most 65535s"));
                Duration::from_secs(90)
            }
            Ok(d) => d,
            Err(e) => {
                err("holdTime", e);
                Duration::from_secs(90)
            }
        },
    };
    let bfd = match bfd(spec.bfd_profile.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            err("bfdProfile", e);
            None
        }
    };
    if spec.password.as_deref().is_some_and(|p| p.len() > 80) {
        err(
            "password",
            "longer than 80 bytes, the TCP MD5 key limit; use a shorter one".into(),
        );
    }
    let sel = match selectors(&spec.node_selectors, "spec.nodeSelectors") {
        Ok(s) => s,
        Err(e) => {
            errs.push(e);
            Vec::new()
        }
    };
    let Some(address) = address else {
        return Err(errs);
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok((
        BgpPeer {
            name: name.to_string(),
            address,
            asn: spec.peer_asn,
            local_asn: Some(spec.my_asn),
            port,
            source,
            password_file: None,
            password: spec
                .password
                .clone()
                .filter(|p| !p.is_empty())
                .map(model::Password),
            hold_time,
            passive: spec.passive,
            multihop: spec.ebgp_multi_hop.then_some(255),
            bfd,
            graceful_restart: spec
                .graceful_restart
                .unwrap_or(true)
                .then_some(GRACEFUL_RESTART),
        },
        sel,
    ))
}

/// The Secret type `passwordSecret` must have (MetalLB's rule).
pub const PASSWORD_SECRET_TYPE: &str = "kubernetes.io/basic-auth";
/// The key of that Secret holding the password.
pub const PASSWORD_SECRET_KEY: &str = "password";

/// `spec` with its `passwordSecret` read from `secrets` (portico's namespace, by name) into
/// `password`, so the result stands on its own (and stays in force as the last valid version
/// when the Secret later goes). A spec without `passwordSecret` comes back as it is.
pub fn inline_password(
    spec: &BGPPeerSpec,
    secrets: &BTreeMap<String, Secret>,
) -> Result<BGPPeerSpec, String> {
    let Some(r) = &spec.password_secret else {
        return Ok(spec.clone());
    };
    let fix = format!(
        "create it in portico's namespace with type {PASSWORD_SECRET_TYPE} and key {PASSWORD_SECRET_KEY}, e.g. kubectl -n <portico's namespace> create secret generic <name> --type={PASSWORD_SECRET_TYPE} --from-literal={PASSWORD_SECRET_KEY}=<password>"
    );
    if spec.password.is_some() {
        return Err(
            "spec.passwordSecret: set together with spec.password; keep one of them".to_string(),
        );
    }
    let name = r.name.as_deref().map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Err(format!(
            "spec.passwordSecret.name: missing; name the Secret holding the password ({fix})"
        ));
    }
    let Some(secret) = secrets.get(name) else {
        return Err(format!(
            "spec.passwordSecret: no Secret `{name}` in portico's namespace; {fix}"
        ));
    };
    let ns = secret.metadata.namespace.as_deref().unwrap_or_default();
    if let Some(want) = r.namespace.as_deref().filter(|n| !n.is_empty())
        && want != ns
    {
        return Err(format!(
            "spec.passwordSecret.namespace: `{want}` is not portico's namespace `{ns}`; the agent reads Secrets of its own namespace only: move the Secret to `{ns}`"
        ));
    }
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != PASSWORD_SECRET_TYPE {
        return Err(format!(
            "spec.passwordSecret: Secret `{name}` has type {kind}, not {PASSWORD_SECRET_TYPE}; {fix}"
        ));
    }
    let Some(value) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PASSWORD_SECRET_KEY))
    else {
        return Err(format!(
            "spec.passwordSecret: Secret `{name}` has no key `{PASSWORD_SECRET_KEY}`; {fix}"
        ));
    };
    let Ok(password) = String::from_utf8(value.0.clone()) else {
        return Err(format!(
            "spec.passwordSecret: key `{PASSWORD_SECRET_KEY}` of Secret `{name}` is not UTF-8 text; store the password as text"
        ));
    };
    if password.is_empty() || password.len() > 80 {
        return Err(format!(
            "spec.passwordSecret: key `{PASSWORD_SECRET_KEY}` of Secret `{name}` holds {} bytes; a TCP MD5 key is 1-80 bytes",
            password.len()
        ));
    }
    Ok(BGPPeerSpec {
        password: Some(password),
        password_secret: None,
        ..spec.clone()
    })
}

/// `bfdProfile`: absent or `off`, `default`, `fast`, or `<interval>x<multiplier>` (the
/// built-in profiles; a `BFDProfile` name was replaced by its timers in [`inline_bfd`]).
fn bfd(s: Option<&str>) -> Result<Option<BfdProfile>, String> {
    let bad = |s: &str| {
        format!(
            "`{s}` is no BFDProfile and no built-in profile; create a BFDProfile named `{s}`, or use off, default (300ms x 3), fast (10ms x 3) or timers such as 50msx3"
        )
    };
    match s.map(str::trim) {
        None | Some("") | Some("off") => Ok(None),
        Some("default") => Ok(Some(BfdProfile::DEFAULT)),
        Some("fast") => Ok(Some(BfdProfile::FAST)),
        Some(t) => {
            let (i, m) = t.rsplit_once('x').ok_or_else(|| bad(t))?;
            let interval = model::duration::parse(i).map_err(|_| bad(t))?;
            let multiplier: u8 = m.parse().map_err(|_| bad(t))?;
            if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&interval)
                || multiplier == 0
            {
                return Err(format!(
                    "`{t}`: the interval must be 10ms-60s and the multiplier 1-255"
                ));
            }
            Ok(Some(BfdProfile {
                interval,
                multiplier,
            }))
        }
    }
}

/// MetalLB's default BFD interval (ms) when `receiveInterval` / `transmitInterval` is absent.
const BFD_INTERVAL_MS: u32 = 300;
/// MetalLB's default detection multiplier.
const BFD_MULTIPLIER: u32 = 3;

/// A `BFDProfile` checked field by field: its timers, or every error (`spec.<field>: problem;
/// fix`). Portico's BFD has one interval for sending and receiving, always sends (active
/// role), has no echo mode and checks no minimum TTL on multihop sessions: those fields are
/// refused rather than ignored.
pub fn bfd_profile(spec: &BFDProfileSpec) -> Result<BfdProfile, Vec<String>> {
    let mut errs = Vec::new();
    let interval = |field: &str, v: Option<u32>, errs: &mut Vec<String>| {
        let ms = v.unwrap_or(BFD_INTERVAL_MS);
        if !(10..=60_000).contains(&ms) {
            errs.push(format!(
                "spec.{field}: {ms} is out of range 10-60000 (milliseconds); use e.g. 300"
            ));
        }
        ms
    };
    let rx = interval("receiveInterval", spec.receive_interval, &mut errs);
    let tx = interval("transmitInterval", spec.transmit_interval, &mut errs);
    if rx != tx {
        let said = |v: Option<u32>| if v.is_some() { "" } else { " (the default)" };
        errs.push(format!(
            "spec.transmitInterval: {tx}{} differs from spec.receiveInterval {rx}{}; portico's BFD sends and requires one interval: set both to the same value",
            said(spec.transmit_interval),
            said(spec.receive_interval),
        ));
    }
    let multiplier = spec.detect_multiplier.unwrap_or(BFD_MULTIPLIER);
    let multiplier = match u8::try_from(multiplier) {
        Ok(m) if m > 0 => m,
        _ => {
            errs.push(format!(
                "spec.detectMultiplier: {multiplier} is out of range 1-255; use e.g. 3"
            ));
            3
        }
    };
    if spec.echo_mode == Some(true) {
        errs.push(
            "spec.echoMode: portico does not do BFD echo mode; remove it or set it to false".into(),
        );
    }
    if let Some(e) = spec.echo_interval {
        errs.push(format!(
            "spec.echoInterval: {e}: portico does not do BFD echo mode, so there is no echo interval; remove it"
        ));
    }
    if spec.passive_mode == Some(true) {
        errs.push(
            "spec.passiveMode: portico's BFD always sends (active role); remove it or set it to false"
                .into(),
        );
    }
    if let Some(t) = spec.minimum_ttl {
        errs.push(format!(
            "spec.minimumTtl: {t}: portico requires TTL 255 on single hop BFD (RFC 5881) and checks no minimum on multihop; remove it"
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(BfdProfile {
        interval: Duration::from_millis(u64::from(rx)),
        multiplier,
    })
}

/// `spec` with a `bfdProfile` that names a `BFDProfile` replaced by its timers
/// (`<ms>msx<multiplier>`), so the result stands on its own (and stays in force as the last
/// valid version when the profile later goes or breaks). The built-in words and timers win
/// over a `BFDProfile` of the same name; those come back as they are. `profiles`: the valid
/// `BFDProfile`s; `exist`: the names of all of them, valid or not (for the message).
pub fn inline_bfd(
    spec: &BGPPeerSpec,
    profiles: &BTreeMap<String, BFDProfileSpec>,
    exist: &BTreeSet<String>,
) -> Result<BGPPeerSpec, String> {
    let Some(name) = spec.bfd_profile.as_deref().map(str::trim) else {
        return Ok(spec.clone());
    };
    let builtin = bfd(Some(name));
    if builtin.is_ok() {
        return Ok(spec.clone());
    }
    let Some(p) = profiles.get(name) else {
        if exist.contains(name) {
            return Err(format!(
                "spec.bfdProfile: BFDProfile `{name}` has no valid version (its errors are logged as BFDProfile/{name}); fix it"
            ));
        }
        return Err(format!(
            "spec.bfdProfile: {}",
            builtin.err().unwrap_or_default()
        ));
    };
    let t = bfd_profile(p).map_err(|e| {
        format!(
            "spec.bfdProfile: BFDProfile `{name}` is not valid: {}",
            e.join("; ")
        )
    })?;
    Ok(BGPPeerSpec {
        bfd_profile: Some(format!("{}msx{}", t.interval.as_millis(), t.multiplier)),
        ..spec.clone()
    })
}

/// A `BGPAdvertisement` checked: the attributes, the pool and node selectors.
pub struct Advertisement {
    /// Route attributes for the Services it selects.
    pub attrs: ServiceBgp,
    /// Pools by name.
    pub pools: Vec<String>,
    /// Pools by label.
    pub pool_selectors: Vec<Selector>,
    /// Nodes that announce.
    pub node_selectors: Vec<Selector>,
}

/// A `BGPAdvertisement` checked field by field.
pub fn advertisement(spec: &BGPAdvertisementSpec) -> Result<Advertisement, Vec<String>> {
    let mut errs = Vec::new();
    if let Some(l) = spec.aggregation_length
        && l > 32
    {
        errs.push(format!(
            "spec.aggregationLength: {l} is out of range 0-32 (32: host routes)"
        ));
    }
    if let Some(l) = spec.aggregation_length_v6
        && l > 128
    {
        errs.push(format!(
            "spec.aggregationLengthV6: {l} is out of range 0-128 (128: host routes)"
        ));
    }
    let mut communities = Vec::new();
    for (i, c) in spec.communities.iter().enumerate() {
        match c.parse::<Community>() {
            Ok(c) => communities.push(c),
            Err(e) => errs.push(format!("spec.communities[{i}]: {e}")),
        }
    }
    let mut large = Vec::new();
    for (i, c) in spec.large_communities.iter().enumerate() {
        match c.parse::<LargeCommunity>() {
            Ok(c) => large.push(c),
            Err(e) => errs.push(format!("spec.largeCommunities[{i}]: {e}")),
        }
    }
    let mut peers: Vec<String> = Vec::new();
    for (i, p) in spec.peers.iter().enumerate() {
        let p = p.trim();
        if p.is_empty() {
            errs.push(format!(
                "spec.peers[{i}]: empty; name a BGPPeer, or leave peers empty to announce to every peer"
            ));
        } else if !peers.iter().any(|have| have == p) {
            peers.push(p.to_string());
        }
    }
    let pool_selectors = selectors(
        &spec.ip_address_pool_selectors,
        "spec.ipAddressPoolSelectors",
    )
    .map_err(|e| errs.push(e))
    .unwrap_or_default();
    let node_selectors = selectors(&spec.node_selectors, "spec.nodeSelectors")
        .map_err(|e| errs.push(e))
        .unwrap_or_default();
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Advertisement {
        attrs: ServiceBgp {
            owner_only: spec.owner_only,
            communities,
            large_communities: large,
            local_pref: spec.local_pref,
            med: None,
            aggregation_length: spec.aggregation_length,
            aggregation_length_v6: spec.aggregation_length_v6,
            peers,
        },
        pools: spec.ip_address_pools.clone(),
        pool_selectors,
        node_selectors,
    })
}

/// What the BGP resources say, with the errors found and the specs that are valid now (a
/// `passwordSecret` read into `password`, see [`inline_password`]).
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// `BGPPeer` specs valid now (the next [`LastGood`] peers).
    pub good_peers: BTreeMap<String, BGPPeerSpec>,
    /// `BGPAdvertisement` specs valid now.
    pub good_advertisements: BTreeMap<String, BGPAdvertisementSpec>,
    /// `BFDProfile` specs valid now.
    pub good_bfd_profiles: BTreeMap<String, BFDProfileSpec>,
    /// `Kind/name: field: problem; fix` for every bad resource, sorted.
    pub errors: Vec<String>,
}

/// Validates every BGP resource; a bad one falls back to its last valid spec.
pub fn resolve(snap: &Snapshot) -> Resolved {
    let mut out = Resolved::default();
    for (name, p) in &snap.bfd_profiles {
        if let Ok(b) = bfd(Some(name)) {
            let what = b.map_or("off".to_string(), |b| {
                format!("{}ms x {}", b.interval.as_millis(), b.multiplier)
            });
            out.errors.push(format!(
                "BFDProfile/{name}: metadata.name: `{name}` is a built-in profile ({what}), which BGPPeers naming it get; give this BFDProfile another name to use it"
            ));
            continue;
        }
        match bfd_profile(&p.spec) {
            Ok(_) => {
                out.good_bfd_profiles.insert(name.clone(), p.spec.clone());
            }
            Err(e) => {
                let kept = snap.bgp_last_good.bfd_profiles.get(name);
                for e in e {
                    out.errors.push(format!(
                        "BFDProfile/{name}: {e}{}",
                        if kept.is_some() {
                            " (the last valid version stays in force)"
                        } else {
                            ""
                        }
                    ));
                }
                if let Some(k) = kept {
                    out.good_bfd_profiles.insert(name.clone(), k.clone());
                }
            }
        }
    }
    let exist: BTreeSet<String> = snap.bfd_profiles.keys().cloned().collect();
    for (name, p) in &snap.bgp_peers {
        let checked = inline_password(&p.spec, &snap.bgp_secrets)
            .and_then(|spec| inline_bfd(&spec, &out.good_bfd_profiles, &exist))
            .map_err(|e| vec![e])
            .and_then(|spec| peer(name, &spec).map(|_| spec));
        match checked {
            Ok(spec) => {
                out.good_peers.insert(name.clone(), spec);
            }
            Err(e) => {
                let kept = snap.bgp_last_good.peers.get(name);
                for e in e {
                    out.errors.push(format!(
                        "BGPPeer/{name}: {e}{}",
                        if kept.is_some() {
                            " (the last valid version stays in force)"
                        } else {
                            ""
                        }
                    ));
                }
                if let Some(k) = kept {
                    out.good_peers.insert(name.clone(), k.clone());
                }
            }
        }
    }
    for (name, a) in &snap.bgp_ads {
        match advertisement(&a.spec) {
            Ok(_) => {
                out.good_advertisements.insert(name.clone(), a.spec.clone());
            }
            Err(e) => {
                let kept = snap.bgp_last_good.advertisements.get(name);
                for e in e {
                    out.errors.push(format!(
                        "BGPAdvertisement/{name}: {e}{}",
                        if kept.is_some() {
                            " (the last valid version stays in force)"
                        } else {
                            ""
                        }
                    ));
                }
                if let Some(k) = kept {
                    out.good_advertisements.insert(name.clone(), k.clone());
                }
            }
        }
    }
    out
}

/// The `bgp` section for `node`: the valid peers that select it. `None` when none does (the
/// base config's section, if any, stays). Peers on an address already taken are refused
/// (reported in `errors`), as is a node without a router id.
pub fn section(
    snap: &Snapshot,
    resolved: &Resolved,
    node: &str,
    base: Option<&Bgp>,
    errors: &mut Vec<String>,
) -> Option<Bgp> {
    let n = snap.nodes.get(node);
    let labels = n.map(|n| n.labels().clone()).unwrap_or_default();
    let mut peers: Vec<BgpPeer> = Vec::new();
    let mut router_id = None;
    let mut seen = BTreeSet::new();
    for (name, spec) in &resolved.good_peers {
        let Ok((p, sel)) = peer(name, spec) else {
            continue;
        };
        if !any_matches(&sel, &labels) {
            continue;
        }
        if !seen.insert((p.address, p.port)) {
            errors.push(format!(
                "BGPPeer/{name}: spec.peerAddress: {} is already a peer of node {node}; one session per neighbour",
                p.address
            ));
            continue;
        }
        if router_id.is_none() {
            router_id = spec
                .router_id
                .as_deref()
                .and_then(|r| r.trim().parse().ok());
        }
        peers.push(p);
    }
    let first = peers.first()?;
    let router_id = router_id.or(match internal_ip(n) {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    });
    if router_id.is_none() {
        errors.push(format!(
            "node {node} has no IPv4 InternalIP to take the BGP router id from; set spec.routerID on its BGPPeers"
        ));
        return None;
    }
    Some(Bgp {
        asn: first.local_asn.unwrap_or(first.asn),
        router_id,
        graceful_stop_grace: base
            .map(|b| b.graceful_stop_grace)
            .unwrap_or(Duration::from_secs(2)),
        // the node-local file's switch (`bgp.ecmp_rescue` in --config), on without one
        ecmp_rescue: base.is_none_or(|b| b.ecmp_rescue),
        peers,
    })
}

/// How a Service is announced by BGP: the attributes and the nodes that announce (empty:
/// every node), or `None` when no advertisement selects its pool.
pub fn selection(
    snap: &Snapshot,
    resolved: &Resolved,
    my_pools: &[&(String, Vec<AddrRange>, BTreeMap<String, String>)],
) -> Option<(ServiceBgp, Vec<String>)> {
    let mut attrs: Option<ServiceBgp> = None;
    let mut nodes = BTreeSet::new();
    let mut every_node = false;
    for spec in resolved.good_advertisements.values() {
        let Ok(a) = advertisement(spec) else {
            continue;
        };
        let pool_ok = (a.pools.is_empty() && a.pool_selectors.is_empty())
            || my_pools.iter().any(|(n, _, labels)| {
                a.pools.contains(n)
                    || (!a.pool_selectors.is_empty() && any_matches(&a.pool_selectors, labels))
            });
        if !pool_ok {
            continue;
        }
        if a.node_selectors.is_empty() {
            every_node = true;
        }
        for n in snap.nodes.values() {
            if any_matches(&a.node_selectors, n.labels()) {
                nodes.insert(n.name_any());
            }
        }
        match &mut attrs {
            None => attrs = Some(a.attrs),
            Some(have) => {
                have.owner_only |= a.attrs.owner_only;
                // every peer (empty) when either says so, else the union
                if a.attrs.peers.is_empty() {
                    have.peers.clear();
                } else if !have.peers.is_empty() {
                    for p in a.attrs.peers {
                        if !have.peers.contains(&p) {
                            have.peers.push(p);
                        }
                    }
                    have.peers.sort();
                }
                for c in a.attrs.communities {
                    if !have.communities.contains(&c) {
                        have.communities.push(c);
                    }
                }
                for c in a.attrs.large_communities {
                    if !have.large_communities.contains(&c) {
                        have.large_communities.push(c);
                    }
                }
            }
        }
    }
    let attrs = attrs?;
    Some((
        attrs,
        if every_node {
            Vec::new()
        } else {
            nodes.into_iter().collect()
        },
    ))
}

#[cfg(test)]
mod tests;
