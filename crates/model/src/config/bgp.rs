//! The `bgp:` section and each service's `announce` / `bgp` fields: decoding with positioned
//! errors, and the cross-field checks between them.

use super::*;
use crate::bgp::{AnnounceMode, BfdProfile, Bgp, BgpPeer, Community, LargeCommunity, ServiceBgp};

/// `announce: l2 | bgp | both`.
pub(super) const ANNOUNCE: &[(&str, AnnounceMode)] = &[
    ("l2", AnnounceMode::L2),
    ("bgp", AnnounceMode::Bgp),
    ("both", AnnounceMode::Both),
];

fn asn(cx: &mut Cx, node: &Node, path: &str) -> Option<u32> {
    uint(1, u64::from(u32::MAX))(cx, node, path).map(|v| v as u32)
}

fn ipv4(cx: &mut Cx, node: &Node, path: &str) -> Option<Ipv4Addr> {
    match ip(cx, node, path)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => {
            cx.err(
                path,
                node.pos,
                format!("`{a}` is IPv6; a router id is an IPv4 address, e.g. 192.0.2.10"),
            );
            None
        }
    }
}

/// `bgp:` at the top level. `interfaces` gives the default router id (the first IPv4 address).
pub(super) fn decode_bgp(
    cx: &mut Cx,
    n: &Node,
    p: &str,
    pos: &mut BTreeMap<String, Pos>,
    interfaces: &[Interface],
) -> Option<Bgp> {
    pos.insert(p.to_string(), n.pos);
    let mut m = cx.map(n, p)?;
    let local_asn = m.req(cx, "asn", asn);
    let router_id = m.opt(cx, "router_id", ipv4).or_else(|| {
        interfaces
            .iter()
            .flat_map(|i| &i.addresses)
            .find_map(|a| match a.addr() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
    });
    let grace = m
        .opt(
            cx,
            "graceful_stop_grace",
            dur(Duration::ZERO, Duration::from_secs(300)),
        )
        .unwrap_or(Duration::from_secs(2));
    let ecmp_rescue = m.opt(cx, "ecmp_rescue", boolean).unwrap_or(true);
    let peers = m
        .opt(cx, "peers", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                decode_peer(cx, n, p)
            }))
        })
        .unwrap_or_default();
    m.finish(cx);
    Some(Bgp {
        asn: local_asn?,
        router_id,
        graceful_stop_grace: grace,
        peers,
        ecmp_rescue,
    })
}

fn decode_peer(cx: &mut Cx, n: &Node, p: &str) -> Option<BgpPeer> {
    let mut m = cx.map(n, p)?;
    let name = m.req(cx, "name", label);
    let address = m.req(cx, "address", ip);
    let remote_asn = m.req(cx, "asn", asn);
    let local_asn = m.opt(cx, "local_asn", asn);
    let port = m.opt(cx, "port", uint(1, 65535)).map_or(179, |v| v as u16);
    let source = m.opt(cx, "source", ip);
    let password_file = m.opt(cx, "password_file", |cx, n, p| {
        Some((
            scalar(cx, n, p, "a file path")?.to_string(),
            n.pos,
            p.to_string(),
        ))
    });
    let hold_time = m.opt(cx, "hold_time", |cx, n, p| {
        let d = dur(Duration::ZERO, Duration::from_secs(65535))(cx, n, p)?;
        if d != Duration::ZERO && d < Duration::from_secs(3) {
            cx.err(
                p,
                n.pos,
                format!(
                    "{} is too short; a hold time is 0 (no keepalives) or at least 3s (RFC 4271)",
                    duration::format(d)
                ),
            );
            return None;
        }
        Some(d)
    });
    let passive = m.opt(cx, "passive", boolean).unwrap_or(false);
    let multihop = m.opt(cx, "multihop", uint(1, 255)).map(|v| v as u8);
    let bfd = m.opt(cx, "bfd", decode_bfd).unwrap_or(None);
    let graceful_restart = match m.node("graceful_restart") {
        None => Some(Some(Duration::from_secs(120))),
        Some(n) if n.as_str() == Some("off") => Some(None),
        Some(n) => dur(Duration::from_secs(1), Duration::from_secs(4095))(
            cx,
            n,
            &format!("{p}.graceful_restart"),
        )
        .map(Some),
    };
    m.finish(cx);
    let password = password_file
        .as_ref()
        .and_then(|(path, fpos, fpath)| schema::read_password(cx, path, *fpos, fpath));
    let address = address?;
    if let Some(src) = source
        && src.is_ipv4() != address.is_ipv4()
    {
        cx.err(
            &format!("{p}.source"),
            n.pos,
            format!("source {src} and address {address} are of different families; use a source of the peer's family"),
        );
    }
    Some(BgpPeer {
        name: name?,
        address,
        asn: remote_asn?,
        local_asn,
        port,
        source,
        password_file: password_file.map(|(path, _, _)| path),
        password,
        hold_time: hold_time.unwrap_or(Duration::from_secs(90)),
        passive,
        multihop,
        bfd,
        graceful_restart: graceful_restart?,
    })
}

/// `bfd: off | default | fast | {interval, multiplier}`; `Some(None)` is off.
fn decode_bfd(cx: &mut Cx, n: &Node, p: &str) -> Option<Option<BfdProfile>> {
    if let Some(s) = n.as_str() {
        return match s {
            "off" => Some(None),
            "default" => Some(Some(BfdProfile::DEFAULT)),
            "fast" => Some(Some(BfdProfile::FAST)),
            _ => {
                cx.err(
                    p,
                    n.pos,
                    format!("`{s}` is not valid; use off, default (300ms x 3), fast (10ms x 3) or {{interval: 50ms, multiplier: 3}}"),
                );
                None
            }
        };
    }
    let mut m = cx.map(n, p)?;
    let interval = m.opt(
        cx,
        "interval",
        dur(Duration::from_millis(10), Duration::from_secs(60)),
    );
    let multiplier = m.opt(cx, "multiplier", uint(1, 255)).map(|v| v as u8);
    m.finish(cx);
    Some(Some(BfdProfile {
        interval: interval.unwrap_or(BfdProfile::DEFAULT.interval),
        multiplier: multiplier.unwrap_or(BfdProfile::DEFAULT.multiplier),
    }))
}

/// A service's `bgp:` mapping.
pub(super) fn decode_service_bgp(cx: &mut Cx, n: &Node, p: &str) -> Option<ServiceBgp> {
    let mut m = cx.map(n, p)?;
    let owner_only = m.opt(cx, "owner_only", boolean).unwrap_or(false);
    let communities = m
        .opt(cx, "communities", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                let s = scalar(cx, n, p, "a community such as 64512:100")?;
                s.parse::<Community>().map_err(|e| cx.err(p, n.pos, e)).ok()
            }))
        })
        .unwrap_or_default();
    let large_communities = m
        .opt(cx, "large_communities", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                let s = scalar(cx, n, p, "a large community such as 64512:1:2")?;
                s.parse::<LargeCommunity>()
                    .map_err(|e| cx.err(p, n.pos, e))
                    .ok()
            }))
        })
        .unwrap_or_default();
    let local_pref = m
        .opt(cx, "local_pref", uint(0, u64::from(u32::MAX)))
        .map(|v| v as u32);
    let med = m
        .opt(cx, "med", uint(0, u64::from(u32::MAX)))
        .map(|v| v as u32);
    let aggregation_length = m
        .opt(cx, "aggregation_length", uint(0, 32))
        .map(|v| v as u8);
    let aggregation_length_v6 = m
        .opt(cx, "aggregation_length_v6", uint(0, 128))
        .map(|v| v as u8);
    let peers = m
        .opt(cx, "peers", |cx, n, p| Some(cx.list(n, p, label)))
        .unwrap_or_default();
    m.finish(cx);
    Some(ServiceBgp {
        owner_only,
        communities,
        large_communities,
        local_pref,
        med,
        aggregation_length,
        aggregation_length_v6,
        peers,
    })
}

/// Cross-field checks of the BGP settings: a `bgp`/`both` service needs the `bgp:` section,
/// service `bgp:` settings need a BGP mode, peer
/// names and addresses are unique, and a router id exists.
pub(super) fn validate(
    cx: &mut Cx,
    cfg: &Config,
    at: &dyn Fn(&str) -> Pos,
    tainted: &dyn Fn(&str) -> bool,
) {
    for (i, s) in cfg.services.iter().enumerate() {
        let p = format!("services[{i}]");
        if s.announce.bgp() && cfg.bgp.is_none() && !tainted("bgp") {
            cx.err(
                &format!("{p}.announce"),
                at(&p),
                format!(
                    "announce: {} needs a top-level bgp: section (asn and peers)",
                    if s.announce == AnnounceMode::Both {
                        "both"
                    } else {
                        "bgp"
                    }
                ),
            );
        }
        if !s.announce.bgp() && !s.bgp.is_default() {
            cx.err(
                &format!("{p}.bgp"),
                at(&p),
                "bgp settings apply to announce: bgp or both; add announce: bgp",
            );
        }
    }
    let Some(bgp) = &cfg.bgp else { return };
    if bgp.router_id.is_none() && !tainted("bgp.router_id") {
        cx.err(
            "bgp.router_id",
            at("bgp"),
            "no IPv4 address under node.interfaces to take the router id from; set router_id, e.g. 192.0.2.10",
        );
    }
    let known: BTreeSet<&str> = bgp.peers.iter().map(|p| p.name.as_str()).collect();
    for (i, s) in cfg.services.iter().enumerate() {
        for (j, name) in s.bgp.peers.iter().enumerate() {
            if !known.contains(name.as_str()) && !tainted("bgp.peers") {
                let p = format!("services[{i}].bgp.peers[{j}]");
                cx.err(
                    &p,
                    at(&format!("services[{i}]")),
                    format!(
                        "no peer `{name}` in bgp.peers; name one of: {}",
                        known.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }
    let mut names = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for (i, peer) in bgp.peers.iter().enumerate() {
        let p = format!("bgp.peers[{i}]");
        if !names.insert(peer.name.as_str()) {
            cx.err(
                &format!("{p}.name"),
                at(&p),
                format!("peer `{}` appears twice; peer names must differ", peer.name),
            );
        }
        if !addrs.insert((peer.address, peer.port)) {
            cx.err(
                &format!("{p}.address"),
                at(&p),
                format!(
                    "{} is configured twice; one session per neighbour",
                    peer.address
                ),
            );
        }
    }
}
