//! The schema: one decoder per section of the file, each reading its fields with their types,
//! ranges and defaults, and recording the positions the cross-field checks point at.

use super::*;

/// The decoded config plus the positions the cross-field checks point at.
pub(super) struct Decoded {
    pub(super) config: Config,
    /// Position of `services[i]`, `services[i].vips[j]`, `services[i].backends[j]`, … (paths
    /// as written in the file).
    pub(super) pos: BTreeMap<String, Pos>,
    /// For each list (by its path in the file), the file's indices of the items that decoded,
    /// in order: the config's item `k` is the file's item `kept[path][k]`.
    pub(super) kept: BTreeMap<String, Vec<usize>>,
}

impl Decoded {
    /// Turns a path into the config (`services[1].vips[0]`) into the path in the file, which
    /// differs when an earlier item of a list did not decode.
    pub(super) fn source_path(&self, path: &str) -> String {
        let mut out = String::with_capacity(path.len());
        let mut rest = path;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find(']').map(|c| open + c) else {
                break;
            };
            let index = &rest[open + 1..close];
            let mapped = index
                .parse::<usize>()
                .ok()
                .and_then(|i| self.kept.get(&out).and_then(|k| k.get(i)));
            match mapped {
                Some(i) => out.push_str(&format!("[{i}]")),
                None => out.push_str(&rest[open..=close]),
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }
}

pub(super) fn decode_config(cx: &mut Cx, root: &Node) -> Decoded {
    let mut pos = BTreeMap::new();
    let mut m = cx.map(root, "").unwrap_or(Map {
        path: String::new(),
        pos: root.pos,
        entries: &[],
        asked: Vec::new(),
    });
    let node = m.opt(cx, "node", |cx, n, p| decode_node(cx, n, p, &mut pos));
    let node = node.unwrap_or_else(|| Node_ {
        name: cx.env.hostname.clone(),
        interfaces: Vec::new(),
    });
    let cluster = m
        .opt(cx, "cluster", |cx, n, p| decode_cluster(cx, n, p, &mut pos))
        .unwrap_or_else(|| default_cluster(Vec::new(), Vec::new()));
    let admin = m.opt(cx, "admin", decode_admin).unwrap_or(Admin {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9440)),
    });
    let dns = m.opt(cx, "dns", |cx, n, p| decode_dns(cx, n, p, &mut pos));
    let services = m
        .opt(cx, "services", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                decode_service(cx, n, p, &mut pos)
            }))
        })
        .unwrap_or_default();
    let bgp = m.opt(cx, "bgp", |cx, n, p| {
        super::bgp::decode_bgp(cx, n, p, &mut pos, &node.interfaces)
    });
    let shutdown = m
        .opt(cx, "shutdown", |cx, n, p| {
            let mut m = cx.map(n, p)?;
            let mut s = Shutdown::default();
            if let Some(v) = m.opt(
                cx,
                "drain_timeout",
                dur(Duration::ZERO, Duration::from_secs(3600)),
            ) {
                s.drain_timeout = v;
            }
            m.finish(cx);
            Some(s)
        })
        .unwrap_or_default();
    let proxy = m.opt(cx, "proxy", decode_proxy).unwrap_or_default();
    m.finish(cx);
    Decoded {
        config: Config {
            node,
            cluster,
            admin,
            dns,
            services,
            shutdown,
            bgp,
            proxy,
        },
        pos,
        kept: std::mem::take(&mut cx.kept),
    }
}

fn decode_proxy(cx: &mut Cx, n: &Node, p: &str) -> Option<Proxy> {
    let mut m = cx.map(n, p)?;
    let workers = m.opt(cx, "workers", |cx, n, p| {
        match uint(0, u64::from(Proxy::MAX_WORKERS))(cx, n, p)? {
            0 => {
                cx.err(
                    p,
                    n.pos,
                    "0 worker threads would accept no connection: set 1 or more, or leave \
                     `proxy.workers` out for one per CPU",
                );
                None
            }
            v => u32::try_from(v).ok(),
        }
    });
    let io = m
        .opt(
            cx,
            "io",
            one_of(&[("epoll", ProxyIo::Epoll), ("uring", ProxyIo::Uring)]),
        )
        .unwrap_or_default();
    m.finish(cx);
    Some(Proxy { workers, io })
}

// `Node` the YAML tree type and `Node` the config type share a name; alias the latter here.
use crate::service::Node as Node_;

fn decode_node(cx: &mut Cx, n: &Node, p: &str, pos: &mut BTreeMap<String, Pos>) -> Option<Node_> {
    let mut m = cx.map(n, p)?;
    let name = m
        .opt(cx, "name", label)
        .unwrap_or_else(|| cx.env.hostname.clone());
    let interfaces = m
        .opt(cx, "interfaces", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                let mut m = cx.map(n, p)?;
                let name = m.req(cx, "name", string);
                let addresses = m
                    .opt(cx, "addresses", |cx, n, p| Some(cx.list(n, p, net)))
                    .unwrap_or_default();
                m.finish(cx);
                Some(Interface {
                    name: name?,
                    addresses,
                })
            }))
        })
        .unwrap_or_default();
    m.finish(cx);
    Some(Node_ { name, interfaces })
}

fn default_cluster(peers: Vec<Peer>, keys: Vec<ClusterKey>) -> Cluster {
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7946));
    Cluster {
        bind,
        advertise: bind,
        peers,
        keys,
        profile: FailureProfile::Default,
        priority: AgentPriority::Realtime,
        preemptive: true,
        hold_down: Duration::from_secs(5),
        announce: AnnounceTiming {
            count: 3,
            interval: Duration::from_millis(100),
            refresh: Duration::from_secs(10),
        },
    }
}

fn decode_cluster(
    cx: &mut Cx,
    n: &Node,
    p: &str,
    pos: &mut BTreeMap<String, Pos>,
) -> Option<Cluster> {
    let mut m = cx.map(n, p)?;
    let mut c = default_cluster(Vec::new(), Vec::new());
    if let Some(b) = m.opt(cx, "bind", socket) {
        c.bind = b;
        c.advertise = b;
    }
    if let Some(a) = m.opt(cx, "advertise", socket) {
        c.advertise = a;
    }
    c.peers = m
        .opt(cx, "peers", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                let mut m = cx.map(n, p)?;
                let name = m.req(cx, "name", label);
                let address = m.req(cx, "address", socket);
                m.finish(cx);
                Some(Peer {
                    name: name?,
                    address: address?,
                })
            }))
        })
        .unwrap_or_default();
    c.keys = m
        .opt(cx, "keys", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                decode_key(cx, n, p)
            }))
        })
        .unwrap_or_default();
    if let Some(v) = m.opt(
        cx,
        "profile",
        one_of(&[
            ("default", FailureProfile::Default),
            ("fast", FailureProfile::Fast),
        ]),
    ) {
        c.profile = v;
    }
    if let Some(v) = m.opt(
        cx,
        "priority",
        one_of(&[
            ("realtime", AgentPriority::Realtime),
            ("high", AgentPriority::High),
            ("normal", AgentPriority::Normal),
        ]),
    ) {
        c.priority = v;
    }
    if let Some(v) = m.opt(cx, "preemptive", boolean) {
        c.preemptive = v;
    }
    if let Some(v) = m.opt(
        cx,
        "hold_down",
        dur(Duration::ZERO, Duration::from_secs(3600)),
    ) {
        c.hold_down = v;
    }
    if let Some(a) = m.opt(cx, "announce", |cx, n, p| {
        let mut m = cx.map(n, p)?;
        let mut a = default_cluster(Vec::new(), Vec::new()).announce;
        if let Some(v) = m.opt(cx, "count", uint(1, 100)) {
            a.count = v as u32;
        }
        if let Some(v) = m.opt(
            cx,
            "interval",
            dur(Duration::from_millis(1), Duration::from_secs(10)),
        ) {
            a.interval = v;
        }
        if let Some(v) = m.opt(
            cx,
            "refresh",
            dur(Duration::ZERO, Duration::from_secs(3600)),
        ) {
            a.refresh = v;
        }
        m.finish(cx);
        Some(a)
    }) {
        c.announce = a;
    }
    m.finish(cx);
    Some(c)
}

fn decode_key(cx: &mut Cx, n: &Node, p: &str) -> Option<ClusterKey> {
    let mut m = cx.map(n, p)?;
    let id = m.req(cx, "id", uint(0, 255));
    let inline = m.opt(cx, "secret", |cx, n, p| {
        Some((
            scalar(cx, n, p, "a secret")?.to_string(),
            n.pos,
            p.to_string(),
        ))
    });
    let file = m.opt(cx, "secret_file", |cx, n, p| {
        Some((
            scalar(cx, n, p, "a file path")?.to_string(),
            n.pos,
            p.to_string(),
        ))
    });
    m.finish(cx);
    let (text, spos, spath) = match (inline, file) {
        (Some(s), None) => s,
        (None, Some((path, fpos, fpath))) => match (cx.env.read_file)(&path) {
            Ok(text) => (text.trim().to_string(), fpos, fpath),
            Err(e) => {
                cx.err(&fpath, fpos, format!("cannot read `{path}`: {e}"));
                return None;
            }
        },
        (Some(_), Some((_, fpos, fpath))) => {
            cx.err(&fpath, fpos, "give either secret or secret_file, not both");
            return None;
        }
        (None, None) => {
            cx.err(
                &format!("{p}.secret"),
                n.pos,
                "missing required field; give secret (32 bytes as base64 or 64 hex digits) or secret_file",
            );
            return None;
        }
    };
    match decode_secret(&text) {
        Some(secret) => Some(ClusterKey {
            id: id? as u8,
            secret,
        }),
        None => {
            cx.err(
                &spath,
                spos,
                "must be 32 bytes written as base64 (44 characters) or 64 hex digits; generate one with `head -c 32 /dev/urandom | base64`",
            );
            None
        }
    }
}

/// 32 bytes from 64 hex digits or standard base64.
pub fn decode_secret(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    let bytes: Vec<u8> = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<_>>()?
    } else {
        base64_decode(s)?
    };
    bytes.try_into().ok()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn decode_admin(cx: &mut Cx, n: &Node, p: &str) -> Option<Admin> {
    let mut m = cx.map(n, p)?;
    let listen = m
        .opt(cx, "listen", socket)
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 9440)));
    m.finish(cx);
    Some(Admin { listen })
}

fn decode_dns(cx: &mut Cx, n: &Node, p: &str, pos: &mut BTreeMap<String, Pos>) -> Option<Dns> {
    let mut m = cx.map(n, p)?;
    let listen = m
        .opt(cx, "listen", socket)
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 5353)));
    let zones = m.req(cx, "zones", |cx, n, p| {
        Some(cx.list(n, p, |cx, n, p| {
            pos.insert(p.to_string(), n.pos);
            let mut m = cx.map(n, p)?;
            let name = m.req(cx, "name", domain);
            let ttl = m.opt(cx, "ttl", dur(Duration::ZERO, Duration::from_secs(86400)));
            let ns = m.opt(cx, "ns", |cx, n, p| Some(cx.list(n, p, domain)));
            let admin_email = m.opt(cx, "admin_email", domain);
            let serial = m.opt(cx, "serial", uint(0, u64::from(u32::MAX)));
            let negative_ttl = m.opt(
                cx,
                "negative_ttl",
                dur(Duration::ZERO, Duration::from_secs(86400)),
            );
            m.finish(cx);
            let name = name?;
            Some(Zone {
                ns: ns
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| vec![format!("ns1.{name}")]),
                admin_email: admin_email.unwrap_or_else(|| format!("hostmaster.{name}")),
                ttl: ttl.unwrap_or(Duration::from_secs(5)),
                serial: serial.unwrap_or(1) as u32,
                negative_ttl: negative_ttl.unwrap_or(Duration::from_secs(5)),
                name,
            })
        }))
    });
    m.finish(cx);
    Some(Dns {
        listen,
        zones: zones.unwrap_or_default(),
    })
}

const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];

fn decode_service(
    cx: &mut Cx,
    n: &Node,
    p: &str,
    pos: &mut BTreeMap<String, Pos>,
) -> Option<Service> {
    let mut m = cx.map(n, p)?;
    let name = m.req(cx, "name", label);
    let vips = m
        .req(cx, "vips", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                ip(cx, n, p)
            }))
        })
        .unwrap_or_default();
    let ports = m
        .req(cx, "ports", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                let mut m = cx.map(n, p)?;
                let port = m.req(cx, "port", uint(1, 65535)).map(|v| v as u16);
                let protocol = m
                    .opt(cx, "protocol", one_of(PROTOCOLS))
                    .unwrap_or(Protocol::Tcp);
                let name = m.opt(cx, "name", label);
                let target_port = m.opt(cx, "target_port", uint(1, 65535)).map(|v| v as u16);
                m.finish(cx);
                let port = port?;
                Some(Port {
                    name: name.unwrap_or_else(|| format!("{protocol}-{port}")),
                    port,
                    protocol,
                    target_port: target_port.unwrap_or(port),
                })
            }))
        })
        .unwrap_or_default();
    let backends = m
        .req(cx, "backends", |cx, n, p| {
            Some(cx.list(n, p, |cx, n, p| {
                pos.insert(p.to_string(), n.pos);
                let mut m = cx.map(n, p)?;
                let address = m.req(cx, "address", ip);
                let port = m.opt(cx, "port", uint(1, 65535)).map(|v| v as u16);
                let weight = m.opt(cx, "weight", uint(0, 1000)).unwrap_or(1) as u32;
                let name = m.opt(cx, "name", string);
                let node = m.opt(cx, "node", label);
                m.finish(cx);
                let address = address?;
                Some(Backend {
                    name: name.unwrap_or_else(|| match port {
                        Some(p) => SocketAddr::new(address, p).to_string(),
                        None => address.to_string(),
                    }),
                    address,
                    port,
                    weight,
                    node,
                })
            }))
        })
        .unwrap_or_default();
    let balance = m
        .opt(
            cx,
            "balance",
            one_of(&[
                ("round-robin", Balance::RoundRobin),
                ("least-connections", Balance::LeastConnections),
                ("power-of-two", Balance::PowerOfTwo),
                ("maglev", Balance::Maglev),
            ]),
        )
        .unwrap_or_default();
    // Checks speak TCP: a service with only UDP ports gets none unless it names a port.
    let health_check = match m.node("health_check") {
        None if !ports.is_empty() && ports.iter().all(|p| p.protocol == Protocol::Udp) => None,
        None => Some(default_health_check()),
        Some(n) => decode_health_check(cx, n, &format!("{p}.health_check")).unwrap_or(None),
    };
    let circuit_breaker = m
        .opt(cx, "circuit_breaker", decode_breaker)
        .unwrap_or_else(default_breaker);
    let outlier = m
        .opt(cx, "outlier", decode_outlier)
        .unwrap_or_else(default_outlier);
    let connection = m
        .opt(cx, "connection", decode_connection)
        .unwrap_or_else(default_connection);
    let proxy_protocol = m.opt(
        cx,
        "proxy_protocol",
        one_of(&[("v1", ProxyProtocol::V1), ("v2", ProxyProtocol::V2)]),
    );
    let placement = m
        .opt(cx, "placement", |cx, n, p| {
            let mut m = cx.map(n, p)?;
            let nodes = m.opt(cx, "nodes", |cx, n, p| Some(cx.list(n, p, label)));
            let preferred = m.opt(cx, "preferred", |cx, n, p| Some(cx.list(n, p, label)));
            let local_only = m.opt(cx, "local_only", boolean);
            m.finish(cx);
            Some(Placement {
                nodes: nodes.unwrap_or_default(),
                preferred: preferred.unwrap_or_default(),
                local_only: local_only.unwrap_or(false),
                withdrawn: false,
            })
        })
        .unwrap_or_default();
    let announce = m
        .opt(cx, "announce", one_of(super::bgp::ANNOUNCE))
        .unwrap_or_default();
    let bgp = m
        .opt(cx, "bgp", super::bgp::decode_service_bgp)
        .unwrap_or_default();
    let dns = m.opt(cx, "dns", |cx, n, p| {
        let mut m = cx.map(n, p)?;
        let enabled = m.opt(cx, "enabled", boolean);
        let hostname = m.opt(cx, "hostname", label);
        let zone = m.opt(cx, "zone", domain);
        let ttl = m.opt(cx, "ttl", dur(Duration::ZERO, Duration::from_secs(86400)));
        let mode = m.opt(
            cx,
            "mode",
            one_of(&[("vips", DnsMode::Vips), ("nodes", DnsMode::Nodes)]),
        );
        let fail_closed = m.opt(cx, "fail_closed", boolean);
        m.finish(cx);
        Some((enabled, hostname, zone, ttl, mode, fail_closed))
    });
    let forwarding = m
        .opt(
            cx,
            "forwarding",
            one_of(&[
                ("auto", Forwarding::Auto),
                ("kernel", Forwarding::Kernel),
                ("proxy", Forwarding::Proxy),
            ]),
        )
        .unwrap_or_default();
    let keep_client_address = m.opt(cx, "keep_client_address", boolean).unwrap_or(false);
    m.finish(cx);
    let name = name?;
    let (enabled, hostname, zone, ttl, mode, fail_closed) = dns.unwrap_or_default();
    Some(Service {
        dns: ServiceDns {
            enabled: enabled.unwrap_or(true),
            hostname: hostname.unwrap_or_else(|| name.clone()),
            zone,
            ttl,
            mode: mode.unwrap_or_default(),
            fail_closed: fail_closed.unwrap_or(false),
        },
        name,
        vips,
        ports,
        backends,
        balance,
        health_check,
        circuit_breaker,
        outlier,
        connection,
        proxy_protocol,
        placement,
        forwarding,
        keep_client_address,
        announce,
        bgp,
    })
}

fn default_health_check() -> HealthCheck {
    HealthCheck {
        kind: CheckKind::Tcp,
        port: None,
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
    }
}

/// `Some(None)` is an explicit `type: none`.
fn decode_health_check(cx: &mut Cx, n: &Node, p: &str) -> Option<Option<HealthCheck>> {
    let mut m = cx.map(n, p)?;
    let kind = m.opt(
        cx,
        "type",
        one_of(&[
            ("tcp", "tcp"),
            ("http", "http"),
            ("mysql", "mysql"),
            ("none", "none"),
        ]),
    );
    let mut hc = default_health_check();
    let port = m.opt(cx, "port", uint(1, 65535)).map(|v| v as u16);
    let interval = m.opt(
        cx,
        "interval",
        dur(Duration::from_millis(10), Duration::from_secs(3600)),
    );
    let timeout = m.opt(
        cx,
        "timeout",
        dur(Duration::from_millis(1), Duration::from_secs(600)),
    );
    let rise = m.opt(cx, "rise", uint(1, 100));
    let fall = m.opt(cx, "fall", uint(1, 100));
    let path = m.opt(cx, "path", |cx, n, p| {
        let s = string(cx, n, p)?;
        if s.starts_with('/') && !s.contains(char::is_whitespace) {
            Some(s)
        } else {
            cx.err(
                p,
                n.pos,
                format!("`{s}` is not a request path; it must start with / and have no spaces"),
            );
            None
        }
    });
    let expect_status = m.opt(cx, "expect_status", uint(100, 599)).map(|v| v as u16);
    let host = m.opt(cx, "host", string);
    let user = m.opt(cx, "user", |cx, n, p| {
        let s = string(cx, n, p)?;
        if s.is_empty() || s.len() > 80 || s.contains('\0') {
            cx.err(p, n.pos, "a MySQL user name is 1-80 characters without NUL");
            return None;
        }
        Some(s)
    });
    let password_file = m.opt(cx, "password_file", |cx, n, p| {
        Some((
            scalar(cx, n, p, "a file path")?.to_string(),
            n.pos,
            p.to_string(),
        ))
    });
    m.finish(cx);
    let kind = kind.unwrap_or("tcp");
    if kind != "http" && (path.is_some() || expect_status.is_some() || host.is_some()) {
        cx.err(
            p,
            n.pos,
            format!("path, expect_status and host apply to type: http only, not type: {kind}"),
        );
    }
    if kind != "mysql" && (user.is_some() || password_file.is_some()) {
        cx.err(
            p,
            n.pos,
            format!("user and password_file apply to type: mysql only, not type: {kind}"),
        );
    }
    if user.is_none() && password_file.is_some() {
        cx.err(
            &format!("{p}.user"),
            n.pos,
            "password_file needs user (the login is off without it)",
        );
    }
    let password = password_file
        .as_ref()
        .and_then(|(path, fpos, fpath)| read_password(cx, path, *fpos, fpath));
    hc.kind = match kind {
        "none" => return Some(None),
        "http" => CheckKind::Http {
            path: path.unwrap_or_else(|| "/".into()),
            expect_status: expect_status.unwrap_or(200),
            host,
        },
        "mysql" => CheckKind::Mysql {
            user,
            password_file: password_file.map(|(path, _, _)| path),
            password,
        },
        _ => CheckKind::Tcp,
    };
    hc.port = port;
    hc.interval = interval.unwrap_or(hc.interval);
    hc.timeout = timeout.unwrap_or(hc.timeout.min(hc.interval));
    hc.rise = rise.map_or(hc.rise, |v| v as u32);
    hc.fall = fall.map_or(hc.fall, |v| v as u32);
    if hc.timeout > hc.interval {
        cx.err(
            &format!("{p}.timeout"),
            n.pos,
            format!(
                "{} is longer than interval {}; a check must end before the next starts",
                duration::format(hc.timeout),
                duration::format(hc.interval)
            ),
        );
    }
    Some(Some(hc))
}

/// Reads a MySQL check's password file: refused when every user may read it; the password is
/// the file's text without the final line break.
pub(super) fn read_password(cx: &mut Cx, path: &str, pos: Pos, p: &str) -> Option<Password> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            cx.err(
                p,
                pos,
                format!(
                    "`{path}` is readable by every user (mode {:o}); make it private: chmod o-rwx {path}",
                    mode & 0o777
                ),
            );
            return None;
        }
    }
    match (cx.env.read_file)(path) {
        Ok(text) => Some(Password(
            text.strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string(),
        )),
        Err(e) => {
            cx.err(p, pos, format!("cannot read `{path}`: {e}"));
            None
        }
    }
}

fn default_breaker() -> CircuitBreaker {
    CircuitBreaker {
        max_connections: 0,
        max_service_connections: 0,
        max_pending: 128,
        queue_timeout: Duration::from_secs(1),
    }
}

fn decode_breaker(cx: &mut Cx, n: &Node, p: &str) -> Option<CircuitBreaker> {
    let mut m = cx.map(n, p)?;
    let mut b = default_breaker();
    if let Some(v) = m.opt(cx, "max_connections", uint(0, 10_000_000)) {
        b.max_connections = v as u32;
    }
    if let Some(v) = m.opt(cx, "max_service_connections", uint(0, 10_000_000)) {
        b.max_service_connections = v as u32;
    }
    if let Some(v) = m.opt(cx, "max_pending", uint(0, 10_000_000)) {
        b.max_pending = v as u32;
    }
    if let Some(v) = m.opt(
        cx,
        "queue_timeout",
        dur(Duration::ZERO, Duration::from_secs(600)),
    ) {
        b.queue_timeout = v;
    }
    m.finish(cx);
    Some(b)
}

fn default_outlier() -> Outlier {
    Outlier {
        consecutive_failures: 5,
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: 50,
        panic_threshold_percent: 50,
        conntrack_events: false,
    }
}

fn decode_outlier(cx: &mut Cx, n: &Node, p: &str) -> Option<Outlier> {
    let mut m = cx.map(n, p)?;
    let mut o = default_outlier();
    if let Some(v) = m.opt(cx, "consecutive_failures", uint(0, 1000)) {
        o.consecutive_failures = v as u32;
    }
    if let Some(v) = m.opt(cx, "conntrack_events", boolean) {
        o.conntrack_events = v;
    }
    if let Some(v) = m.opt(
        cx,
        "base_ejection_time",
        dur(Duration::from_millis(1), Duration::from_secs(86400)),
    ) {
        o.base_ejection_time = v;
    }
    if let Some(v) = m.opt(
        cx,
        "max_ejection_time",
        dur(Duration::from_millis(1), Duration::from_secs(86400)),
    ) {
        o.max_ejection_time = v;
    }
    if let Some(v) = m.opt(cx, "max_ejection_percent", uint(0, 100)) {
        o.max_ejection_percent = v as u32;
    }
    if let Some(v) = m.opt(cx, "panic_threshold_percent", uint(0, 100)) {
        o.panic_threshold_percent = v as u32;
    }
    if o.max_ejection_time < o.base_ejection_time {
        cx.err(
            &format!("{p}.max_ejection_time"),
            n.pos,
            format!(
                "{} is shorter than base_ejection_time {}; the cap must be at least the base",
                duration::format(o.max_ejection_time),
                duration::format(o.base_ejection_time)
            ),
        );
    }
    m.finish(cx);
    Some(o)
}

fn default_connection() -> Connection {
    Connection {
        connect_timeout: Duration::from_secs(1),
        retries: 2,
        idle_timeout: Duration::from_secs(600),
        drain_timeout: Duration::from_secs(30),
        udp_idle_timeout: Duration::from_secs(30),
        max_udp_sessions: 4096,
        max_udp_sessions_per_client: 64,
    }
}

fn decode_connection(cx: &mut Cx, n: &Node, p: &str) -> Option<Connection> {
    let mut m = cx.map(n, p)?;
    let mut c = default_connection();
    if let Some(v) = m.opt(
        cx,
        "connect_timeout",
        dur(Duration::from_millis(1), Duration::from_secs(600)),
    ) {
        c.connect_timeout = v;
    }
    if let Some(v) = m.opt(cx, "retries", uint(0, 100)) {
        c.retries = v as u32;
    }
    if let Some(v) = m.opt(
        cx,
        "idle_timeout",
        dur(Duration::from_millis(1), Duration::from_secs(7 * 86400)),
    ) {
        c.idle_timeout = v;
    }
    if let Some(v) = m.opt(
        cx,
        "drain_timeout",
        dur(Duration::ZERO, Duration::from_secs(86400)),
    ) {
        c.drain_timeout = v;
    }
    if let Some(v) = m.opt(
        cx,
        "udp_idle_timeout",
        dur(Duration::from_millis(1), Duration::from_secs(86400)),
    ) {
        c.udp_idle_timeout = v;
    }
    if let Some(v) = m.opt(cx, "max_udp_sessions", uint(1, 1_000_000)) {
        c.max_udp_sessions = v as u32;
    }
    if let Some(v) = m.opt(cx, "max_udp_sessions_per_client", uint(1, 1_000_000)) {
        c.max_udp_sessions_per_client = v as u32;
    }
    m.finish(cx);
    Some(c)
}
