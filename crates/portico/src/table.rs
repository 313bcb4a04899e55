//! Renders a status report as readable tables for `portico status`.

use std::fmt::Write;

use model::{Health, StatusReport};

/// Formats rows as columns separated by two spaces, padded to the widest cell.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// The whole report.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}  portico {}  config generation {}  {}",
        r.node,
        r.version,
        r.generation,
        if r.ready { "ready" } else { "NOT READY" }
    );
    if let Some(e) = &r.last_reload_error {
        let _ = writeln!(
            out,
            "last reload REJECTED (running config kept):\n  {}",
            e.replace('\n', "\n  ")
        );
    }
    if !r.members.is_empty() {
        let _ = writeln!(out, "\nMEMBERS");
        let mut rows = vec![vec!["NAME".into(), "ADDRESS".into(), "STATE".into()]];
        rows.extend(
            r.members
                .iter()
                .map(|m| vec![m.name.clone(), m.address.to_string(), m.state.clone()]),
        );
        out.push_str(&columns(&rows));
    }
    if r.services.is_empty() {
        let _ = writeln!(out, "\nno services configured");
    }
    for s in &r.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        let _ = writeln!(
            out,
            "\nSERVICE {}  ports {}{}{}",
            s.name,
            ports.join(","),
            if s.path_reason.is_empty() {
                String::new()
            } else {
                format!("  path {} ({})", s.path, s.path_reason)
            },
            if s.panic_mode {
                "  PANIC MODE (too few healthy: balancing over all)"
            } else {
                ""
            }
        );
        let mut rows = vec![vec![
            "VIP".into(),
            "OWNER".into(),
            "REASON".into(),
            "CONFLICTS".into(),
        ]];
        rows.extend(s.vips.iter().map(|v| {
            vec![
                v.address.to_string(),
                v.owner.clone().unwrap_or_else(|| "-".into()),
                v.reason.clone(),
                v.conflicts.to_string(),
            ]
        }));
        out.push_str(&columns(&rows));
        let mut rows = vec![
            [
                "BACKEND", "ADDRESS", "WEIGHT", "HEALTH", "BREAKER", "ACTIVE", "TOTAL", "FAILED",
            ]
            .map(String::from)
            .to_vec(),
        ];
        rows.extend(s.backends.iter().map(|b| {
            let mut health = match b.health {
                Health::Up => "up",
                Health::Down => "DOWN",
                Health::Unknown => "unknown",
            }
            .to_string();
            if b.ejected {
                health.push_str(",ejected");
            }
            if b.draining {
                health.push_str(",draining");
            }
            vec![
                b.name.clone(),
                b.address.to_string(),
                b.weight.to_string(),
                health,
                word(&b.breaker),
                b.active_connections.to_string(),
                b.total_connections.to_string(),
                b.connect_failures.to_string(),
            ]
        }));
        out.push_str(&columns(&rows));
    }
    if !r.dns.is_empty() {
        let _ = writeln!(out, "\nDNS");
        let mut rows = vec![
            ["NAME", "MODE", "STATE", "TTL", "ADDRESSES"]
                .map(String::from)
                .to_vec(),
        ];
        rows.extend(r.dns.iter().map(|d| {
            let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
            vec![
                d.name.clone(),
                word(&d.mode),
                word(&d.state),
                format!("{}s", d.ttl),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
            ]
        }));
        out.push_str(&columns(&rows));
    }
    if let Some(b) = &r.bgp {
        bgp(&mut out, b);
    }
    out
}

/// The BGP sessions and this node's route decisions.
fn bgp(out: &mut String, b: &model::BgpStatus) {
    let _ = writeln!(out, "\nBGP SESSIONS");
    let mut rows = vec![
        [
            "PEER",
            "ADDRESS",
            "STATE",
            "UPTIME",
            "PREFIXES",
            "UPDATES",
            "FLAPS",
            "BFD",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    rows.extend(b.sessions.iter().map(|s| {
        vec![
            s.peer.clone(),
            s.address.to_string(),
            s.state.clone(),
            s.uptime_seconds.map_or_else(
                || "-".into(),
                |u| model::duration::format(std::time::Duration::from_secs(u)),
            ),
            s.prefixes_sent.to_string(),
            s.updates_sent.to_string(),
            s.flaps.to_string(),
            s.bfd.clone().unwrap_or_else(|| "-".into()),
            s.last_error.clone().unwrap_or_else(|| "-".into()),
        ]
    }));
    out.push_str(&columns(&rows));
    if !b.routes.is_empty() {
        let _ = writeln!(out, "\nBGP ROUTES (this node)");
        let mut rows = vec![["VIP", "SERVICE", "REASON"].map(String::from).to_vec()];
        rows.extend(
            b.routes
                .iter()
                .map(|r| vec![r.address.to_string(), r.service.clone(), r.reason.clone()]),
        );
        out.push_str(&columns(&rows));
    }
    if let Some(e) = &b.ecmp_rescue {
        let members: Vec<String> = e.members.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\nECMP RESCUE  {}  members {}",
            e.reason,
            if members.is_empty() {
                "-".to_string()
            } else {
                members.join(", ")
            }
        );
    }
}

/// The serde word of an enum value (`fail-open`, `half-open`), as JSON shows it.
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::*;

    #[test]
    fn renders_services_vips_and_backends() {
        let r = StatusReport {
            node: "n1".into(),
            version: "0.1.0".into(),
            generation: 2,
            ready: true,
            last_reload_error: Some("1 error in the configuration\n  x: bad".into()),
            members: vec![],
            dns: vec![DnsNameStatus {
                service: "web".into(),
                name: "web.lb.example.".into(),
                mode: DnsMode::Vips,
                state: DnsAnswerState::FailOpen,
                addresses: vec!["10.0.0.1".parse().unwrap()],
                ttl: 5,
            }],
            services: vec![ServiceStatus {
                name: "web".into(),
                ports: vec![PortStatus {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
                vips: vec![VipStatus {
                    address: "10.0.0.1".parse().unwrap(),
                    owner: Some("n2".into()),
                    reason: "notOwner".into(),
                    conflicts: 0,
                }],
                backends: vec![BackendStatus {
                    name: "b1".into(),
                    address: "10.0.1.1".parse().unwrap(),
                    weight: 1,
                    health: Health::Down,
                    breaker: BreakerState::HalfOpen,
                    ejected: true,
                    draining: false,
                    active_connections: 3,
                    total_connections: 9,
                    connect_failures: 1,
                    bytes_to_backend: 0,
                    bytes_to_client: 0,
                }],
                panic_mode: false,
                path: model::Path::Kernel,
                path_reason: "auto".into(),
            }],
            bgp: Some(BgpStatus {
                sessions: vec![BgpSessionStatus {
                    peer: "tor1".into(),
                    address: "192.0.2.1".parse().unwrap(),
                    state: "established".into(),
                    uptime_seconds: Some(90),
                    prefixes_sent: 2,
                    updates_sent: 3,
                    flaps: 1,
                    last_error: Some("holdTimerExpired".into()),
                    bfd: Some("up".into()),
                }],
                routes: vec![BgpRouteStatus {
                    service: "web".into(),
                    address: "198.51.100.7".parse().unwrap(),
                    reason: "noHealthyBackend".into(),
                }],
                ecmp_rescue: Some(model::EcmpRescueStatus {
                    reason: "on".into(),
                    members: vec!["192.0.2.12".parse().unwrap(), "192.0.2.13".parse().unwrap()],
                }),
            }),
        };
        let t = render(&r);
        assert!(
            t.contains("SERVICE web  ports 80/tcp  path kernel (auto)"),
            "{t}"
        );
        assert!(
            t.contains("tor1  192.0.2.1  established  90s     2         3        1      up   holdTimerExpired"),
            "{t}"
        );
        assert!(t.contains("198.51.100.7  web      noHealthyBackend"), "{t}");
        assert!(
            t.contains("ECMP RESCUE  on  members 192.0.2.12, 192.0.2.13"),
            "{t}"
        );
        assert!(t.contains("10.0.0.1  n2"), "{t}");
        assert!(t.contains("DOWN,ejected  half-open"), "{t}");
        assert!(t.contains("REJECTED"), "{t}");
        assert!(
            t.contains("web.lb.example.  vips  fail-open  5s   10.0.0.1"),
            "{t}"
        );
    }
}
