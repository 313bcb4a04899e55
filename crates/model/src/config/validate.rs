//! Cross-field checks: duplicate names and VIP:port pairs, backends pointing at a VIP, VIP
//! families no interface carries, references to unknown nodes or zones.

use super::schema::Decoded;
use super::*;

/// Cross-field checks. They run also when fields had errors (every error is reported at
/// once), so they read list indices through [`Decoded::source_path`] (a list item that did not
/// decode is missing from the config) and skip a check whose inputs had an error of their own
/// (`tainted`), so that one mistake is not reported twice.
pub(super) fn validate(cx: &mut Cx, d: &Decoded, decode_errors: &[String]) {
    let cfg = &d.config;
    let at = |path: &str| {
        d.pos
            .get(&d.source_path(path))
            .copied()
            .unwrap_or(Pos { line: 1, column: 1 })
    };
    let related = |a: &str, b: &str| {
        b.strip_prefix(a)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    let tainted = |path: &str| {
        let p = d.source_path(path);
        decode_errors
            .iter()
            .any(|e| e.is_empty() || related(e, &p) || related(&p, e))
    };

    // Cluster membership.
    let mut members: BTreeSet<&str> = BTreeSet::from([cfg.node.name.as_str()]);
    for (i, peer) in cfg.cluster.peers.iter().enumerate() {
        let p = format!("cluster.peers[{i}]");
        if !members.insert(&peer.name) {
            cx.err(
                &format!("{p}.name"),
                at(&p),
                format!(
                    "node `{}` appears twice (node.name and peers must all differ)",
                    peer.name
                ),
            );
        }
    }
    if !cfg.cluster.peers.is_empty() {
        if cfg.cluster.keys.is_empty() && !tainted("cluster.keys") {
            cx.err(
                "cluster.keys",
                Pos { line: 1, column: 1 },
                "gossip with peers needs a shared key; add keys: [{id: 1, secret: <base64 of 32 random bytes>}]",
            );
        }
        if cfg.cluster.advertise.ip().is_unspecified()
            && !tainted("cluster.advertise")
            && !tainted("cluster.bind")
        {
            cx.err(
                "cluster.advertise",
                Pos { line: 1, column: 1 },
                format!("peers need an address to reach this node; bind is {}, so set advertise to this node's address", cfg.cluster.bind),
            );
        }
        if cfg.node.interfaces.is_empty() && !tainted("node.interfaces") {
            cx.err(
                "node.interfaces",
                Pos { line: 1, column: 1 },
                "failover between peers announces VIPs on an interface; list at least one under node.interfaces",
            );
        }
    }
    let mut key_ids = BTreeSet::new();
    for (i, k) in cfg.cluster.keys.iter().enumerate() {
        let p = format!("cluster.keys[{i}]");
        if !key_ids.insert(k.id) {
            cx.err(
                &format!("{p}.id"),
                at(&p),
                format!("key id {} is used twice; each key needs its own id", k.id),
            );
        }
    }

    // Zones.
    let zones: Vec<&str> = cfg
        .dns
        .iter()
        .flat_map(|d| d.zones.iter().map(|z| z.name.as_str()))
        .collect();
    if let Some(dns) = &cfg.dns {
        if dns.zones.is_empty() && !tainted("dns.zones") {
            cx.err(
                "dns.zones",
                Pos { line: 1, column: 1 },
                "the DNS server needs at least one zone",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, z) in dns.zones.iter().enumerate() {
            if !seen.insert(&z.name) {
                let p = format!("dns.zones[{i}]");
                cx.err(
                    &format!("{p}.name"),
                    at(&p),
                    format!("zone `{}` is listed twice", z.name),
                );
            }
        }
    }

    // Services.
    let members_known = !tainted("cluster.peers") && !tainted("node.name");
    let mut names = BTreeMap::new();
    let mut listeners: BTreeMap<(IpAddr, u16, Protocol), String> = BTreeMap::new();
    let all_vips: BTreeMap<IpAddr, &str> = cfg
        .services
        .iter()
        .flat_map(|s| s.vips.iter().map(move |v| (*v, s.name.as_str())))
        .collect();
    for (si, s) in cfg.services.iter().enumerate() {
        let sp = format!("services[{si}]");
        if let Some(prev) = names.insert(s.name.as_str(), si) {
            cx.err(
                &format!("{sp}.name"),
                at(&sp),
                format!(
                    "service `{}` is already defined at {}; names must be unique",
                    s.name,
                    d.source_path(&format!("services[{prev}]"))
                ),
            );
        }
        if s.vips.is_empty() && !tainted(&format!("{sp}.vips")) {
            cx.err(
                &format!("{sp}.vips"),
                at(&sp),
                "a service needs at least one VIP",
            );
        }
        if s.ports.is_empty() && !tainted(&format!("{sp}.ports")) {
            cx.err(
                &format!("{sp}.ports"),
                at(&sp),
                "a service needs at least one port",
            );
        }
        if s.forwarding == Forwarding::Kernel
            && !tainted(&format!("{sp}.forwarding"))
            && let Some(why) = s.needs_proxy()
        {
            let what = match why {
                "proxyProtocol" => "sends PROXY protocol (proxy_protocol)",
                "mysqlRetry" => {
                    "retries MySQL connects before the client sees a byte (health_check type mysql with connection.retries > 0)"
                }
                "connectionLimits" => {
                    "limits and queues connections (circuit_breaker.max_connections / max_service_connections)"
                }
                "connectionAware" => {
                    "balances by open connections (balance least-connections / power-of-two)"
                }
                _ => "has a loopback VIP or backend, which the kernel does not route",
            };
            cx.err(
                &format!("{sp}.forwarding"),
                at(&sp),
                format!("forwarding: kernel cannot serve this service: it {what}; use forwarding: proxy or auto, or remove that setting"),
            );
        }
        if s.keep_client_address && s.forwarding == Forwarding::Proxy {
            cx.err(
                &format!("{sp}.keep_client_address"),
                at(&sp),
                "keep_client_address applies to the kernel path only; remove it or set forwarding: kernel or auto",
            );
        }
        if s.backends.is_empty() && !tainted(&format!("{sp}.backends")) {
            cx.err(
                &format!("{sp}.backends"),
                at(&sp),
                "a service needs at least one backend",
            );
        }
        let mut seen_vips = BTreeSet::new();
        for (vi, vip) in s.vips.iter().enumerate() {
            let vp = format!("{sp}.vips[{vi}]");
            if !seen_vips.insert(vip) {
                // its other checks were made at its first mention
                cx.err(&vp, at(&vp), format!("{vip} is listed twice"));
                continue;
            }
            if vip.is_unspecified() || vip.is_multicast() {
                cx.err(
                    &vp,
                    at(&vp),
                    format!("{vip} cannot be a VIP; use a unicast address"),
                );
            }
            if s.announce.l2()
                && !cfg.node.interfaces.is_empty()
                && !tainted("node.interfaces")
                && !cfg.node.interfaces.iter().any(|i| i.serves_family(*vip))
            {
                let fam = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
                let names: Vec<&str> = cfg
                    .node
                    .interfaces
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect();
                cx.err(
                    &vp,
                    at(&vp),
                    format!("{vip} is {fam} but no interface in node.interfaces ({}) has an {fam} address; add one or remove this VIP", names.join(", ")),
                );
            }
            for (pi, port) in s.ports.iter().enumerate() {
                let key = (*vip, port.port, port.protocol);
                let here = format!("{sp}.ports[{pi}]");
                if let Some(other) = listeners.insert(key, d.source_path(&here)) {
                    cx.err(
                        &here,
                        at(&here),
                        format!("{} {}/{} is already used by {other}; each VIP:port/protocol may belong to one service port", SocketAddr::new(*vip, port.port), port.port, port.protocol),
                    );
                }
            }
        }
        let mut port_names = BTreeSet::new();
        for (pi, port) in s.ports.iter().enumerate() {
            let pp = format!("{sp}.ports[{pi}]");
            if !port_names.insert(&port.name) {
                cx.err(
                    &format!("{pp}.name"),
                    at(&pp),
                    format!("port name `{}` is used twice in this service", port.name),
                );
            }
        }
        let mut backend_names = BTreeSet::new();
        for (bi, b) in s.backends.iter().enumerate() {
            let bp = format!("{sp}.backends[{bi}]");
            if !backend_names.insert(&b.name) {
                cx.err(&format!("{bp}.name"), at(&bp), format!("backend name `{}` is used twice in this service; give each a distinct name", b.name));
            }
            if b.port.is_some() && s.ports.len() > 1 {
                cx.err(
                    &format!("{bp}.port"),
                    at(&bp),
                    "a backend port is ambiguous when the service has several ports; set target_port on each port instead",
                );
            }
            if let Some(owner) = all_vips.get(&b.address) {
                cx.err(
                    &format!("{bp}.address"),
                    at(&bp),
                    format!("{} is a VIP of service `{owner}`; a backend must be a real server, not a VIP (traffic would loop)", b.address),
                );
            }
            if b.address.is_unspecified() || b.address.is_multicast() {
                cx.err(
                    &format!("{bp}.address"),
                    at(&bp),
                    format!("{} cannot be a backend address", b.address),
                );
            }
            if let Some(node) = &b.node
                && members_known
                && !members.contains(node.as_str())
            {
                cx.err(
                    &format!("{bp}.node"),
                    at(&bp),
                    format!(
                        "unknown node `{node}`; known nodes: {}",
                        members.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
        if s.backends.iter().all(|b| b.weight == 0)
            && !s.backends.is_empty()
            && !tainted(&format!("{sp}.backends"))
        {
            cx.err(
                &format!("{sp}.backends"),
                at(&sp),
                "every backend has weight 0, so nothing can be served; give at least one a weight",
            );
        }
        for (what, list) in [
            ("nodes", &s.placement.nodes),
            ("preferred", &s.placement.preferred),
        ] {
            for n in list {
                if members_known && !members.contains(n.as_str()) {
                    cx.err(
                        &format!("{sp}.placement.{what}"),
                        at(&sp),
                        format!(
                            "unknown node `{n}`; known nodes: {}",
                            members.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
        }
        if s.placement.local_only
            && s.backends.iter().any(|b| b.node.is_none())
            && !tainted(&format!("{sp}.backends"))
        {
            cx.err(
                &format!("{sp}.placement.local_only"),
                at(&sp),
                "local_only needs every backend to name its node (backends[].node)",
            );
        }
        if let Some(z) = &s.dns.zone
            && !tainted("dns")
            && !zones.contains(&z.as_str())
        {
            let known = if zones.is_empty() {
                "none; add a dns section".to_string()
            } else {
                zones.join(", ")
            };
            cx.err(
                &format!("{sp}.dns.zone"),
                at(&sp),
                format!("unknown zone `{z}`; zones: {known}"),
            );
        }
        if let Some(hc) = &s.health_check
            && hc.port.is_none()
            && !s.ports.is_empty()
            && s.ports.iter().all(|p| p.protocol == Protocol::Udp)
            && !tainted(&format!("{sp}.ports"))
        {
            cx.err(
                &format!("{sp}.health_check.port"),
                at(&sp),
                "health checks speak TCP and this service has only UDP ports; set health_check.port to a TCP port of the backends, or type: none",
            );
        }
    }
    super::bgp::validate(cx, cfg, &at, &tainted);
}
