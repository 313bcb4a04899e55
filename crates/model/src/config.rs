//! Reads the standalone YAML configuration into a validated [`Config`], reporting every error.
//!
//! Reading happens in three passes over a [`yaml`] tree that keeps positions:
//! 1. *decode*: each field is read with its type and range; unknown fields, wrong types and
//!    out-of-range values are collected, never fatal;
//! 2. *defaults*: everything optional is filled in, so the result is the effective config
//!    (`portico check` prints it);
//! 3. *cross-field checks*: duplicate VIP:port pairs, backends pointing at a VIP, VIP families
//!    no interface carries, references to unknown nodes or zones.
//!
//! Every error names its path, position and the fix:
//! `services[2].ports[0].port: 70000 is out of range 1-65535 (line 31, column 15)`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::duration;
use crate::service::*;
use crate::yaml::{self, Node, Pos, Value};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path to the field (`services[2].ports[0].port`); empty for the document.
    pub path: String,
    /// Where in the file.
    pub pos: Pos,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} ({})", self.message, self.pos)
        } else {
            write!(f, "{}: {} ({})", self.path, self.message, self.pos)
        }
    }
}

/// Every problem found in a config file, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in the configuration",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Errors from [`load`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("invalid config file {path}: {errors}")]
    Invalid {
        /// The path given.
        path: String,
        /// Every problem.
        errors: ConfigErrors,
    },
}

/// Values the environment supplies (the model stays pure: the binary looks them up).
#[derive(Debug, Clone)]
pub struct Environment {
    /// Default `node.name`: the host name.
    pub hostname: String,
    /// Reads `secret_file` references (cluster keys).
    pub read_file: fn(&str) -> std::io::Result<String>,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            read_file: |p| std::fs::read_to_string(p),
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &str, env: &Environment) -> Result<Config, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    parse(&src, env).map_err(|errors| LoadError::Invalid {
        path: path.into(),
        errors,
    })
}

/// Parses and validates config text.
pub fn parse(src: &str, env: &Environment) -> Result<Config, ConfigErrors> {
    let root = yaml::parse(src).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            pos: e.pos,
            message: format!("YAML syntax error: {}", e.message),
        }])
    })?;
    let mut cx = Cx {
        errors: Vec::new(),
        env,
    };
    let cfg = decode_config(&mut cx, &root);
    if cx.errors.is_empty() {
        validate(&mut cx, &cfg);
    }
    if cx.errors.is_empty() {
        Ok(cfg.config)
    } else {
        cx.errors.sort_by_key(|e| (e.pos.line, e.pos.column));
        cx.errors.dedup();
        Err(ConfigErrors(cx.errors))
    }
}

/// Renders a config as YAML (the effective config, defaults filled in; secrets left out).
pub fn to_yaml(cfg: &Config) -> String {
    serde_saphyr::to_string(cfg).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

// ---------------------------------------------------------------------------------------------
// Decoding machinery
// ---------------------------------------------------------------------------------------------

struct Cx<'e> {
    errors: Vec<ConfigError>,
    env: &'e Environment,
}

impl Cx<'_> {
    fn err(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            pos,
            message: message.into(),
        });
    }

    /// Opens a mapping; a null counts as an empty mapping.
    fn map<'a>(&mut self, node: &'a Node, path: &str) -> Option<Map<'a>> {
        let entries: &'a [(Node, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            _ => {
                self.err(
                    path,
                    node.pos,
                    format!("expected a mapping, found {}", node.kind()),
                );
                return None;
            }
        };
        Some(Map {
            path: path.to_string(),
            pos: node.pos,
            entries,
            asked: Vec::new(),
        })
    }

    /// Reads a list; a null counts as an empty list.
    fn list<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Vec<T> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, n)| item(self, n, &format!("{path}[{i}]")))
                .collect(),
            Value::Null => Vec::new(),
            _ => {
                self.err(
                    path,
                    node.pos,
                    format!("expected a list, found {}", node.kind()),
                );
                Vec::new()
            }
        }
    }
}

/// A mapping being read. Every key asked for is a known field; [`Map::finish`] reports the rest.
struct Map<'a> {
    path: String,
    pos: Pos,
    entries: &'a [(Node, Node)],
    asked: Vec<&'static str>,
}

impl<'a> Map<'a> {
    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Looks a field up; `None` when absent or null.
    fn node(&mut self, key: &'static str) -> Option<&'a Node> {
        self.asked.push(key);
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
            .filter(|v| v.value != Value::Null)
    }

    /// Reads an optional field with `read`.
    fn opt<T>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        read: impl FnOnce(&mut Cx, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        let path = self.child(key);
        self.node(key).and_then(|n| read(cx, n, &path))
    }

    /// Reads a required field; reports it missing at the mapping's position.
    fn req<T>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        read: impl FnOnce(&mut Cx, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        let path = self.child(key);
        match self.node(key) {
            Some(n) => read(cx, n, &path),
            None => {
                cx.err(&path, self.pos, "missing required field");
                None
            }
        }
    }

    /// Reports unknown and duplicate keys.
    fn finish(self, cx: &mut Cx) {
        let mut seen = BTreeSet::new();
        for (k, _) in self.entries {
            let Some(name) = k.as_str() else {
                cx.err(
                    &self.path,
                    k.pos,
                    format!("keys must be strings, found {}", k.kind()),
                );
                continue;
            };
            let path = self.child(name);
            if !seen.insert(name) {
                cx.err(&path, k.pos, "duplicate key; each field may appear once");
            } else if !self.asked.contains(&name) {
                let mut known: Vec<&str> = self.asked.clone();
                known.sort_unstable();
                known.dedup();
                let hint = closest(name, &known)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                cx.err(
                    &path,
                    k.pos,
                    format!(
                        "unknown field `{name}`{hint}; valid fields here: {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }
}

/// The known name closest to a typo, if any is close (edit distance ≤ 2, or a prefix).
fn closest<'k>(typo: &str, known: &[&'k str]) -> Option<&'k str> {
    fn dist(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    known
        .iter()
        .map(|k| (dist(&typo.to_lowercase(), k), *k))
        .filter(|(d, k)| *d <= 2 || k.starts_with(typo) || typo.replace('-', "_") == *k)
        .min()
        .map(|(_, k)| k)
}

fn scalar<'n>(cx: &mut Cx, node: &'n Node, path: &str, what: &str) -> Option<&'n str> {
    match node.as_str() {
        Some(s) => Some(s),
        None => {
            cx.err(
                path,
                node.pos,
                format!("expected {what}, found {}", node.kind()),
            );
            None
        }
    }
}

fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    scalar(cx, node, path, "a string").map(str::to_string)
}

fn uint(lo: u64, hi: u64) -> impl FnOnce(&mut Cx, &Node, &str) -> Option<u64> {
    move |cx, node, path| {
        let s = scalar(cx, node, path, "a whole number")?;
        match s.parse::<u64>() {
            Ok(v) if (lo..=hi).contains(&v) => Some(v),
            Ok(v) => {
                cx.err(path, node.pos, format!("{v} is out of range {lo}-{hi}"));
                None
            }
            Err(_) => {
                cx.err(
                    path,
                    node.pos,
                    format!("`{s}` is not a whole number in range {lo}-{hi}"),
                );
                None
            }
        }
    }
}

fn boolean(cx: &mut Cx, node: &Node, path: &str) -> Option<bool> {
    match scalar(cx, node, path, "true or false")? {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        s => {
            cx.err(
                path,
                node.pos,
                format!("`{s}` is not a boolean; write true or false"),
            );
            None
        }
    }
}

fn ip(cx: &mut Cx, node: &Node, path: &str) -> Option<IpAddr> {
    let s = scalar(cx, node, path, "an IP address")?;
    match IpAddr::from_str(s) {
        Ok(ip) => Some(ip),
        Err(_) => {
            cx.err(
                path,
                node.pos,
                format!("`{s}` is not an IP address; write e.g. 10.0.0.10 or fd00::10"),
            );
            None
        }
    }
}

fn socket(cx: &mut Cx, node: &Node, path: &str) -> Option<SocketAddr> {
    let s = scalar(cx, node, path, "an address:port")?;
    match SocketAddr::from_str(s) {
        Ok(a) => Some(a),
        Err(_) => {
            cx.err(
                path,
                node.pos,
                format!("`{s}` is not an address:port; write e.g. 127.0.0.1:9440 or [::1]:9440"),
            );
            None
        }
    }
}

fn net(cx: &mut Cx, node: &Node, path: &str) -> Option<ipnet::IpNet> {
    let s = scalar(cx, node, path, "an address with prefix")?;
    match ipnet::IpNet::from_str(s) {
        Ok(n) => Some(n),
        Err(_) => {
            cx.err(
                path,
                node.pos,
                format!(
                    "`{s}` is not an address with prefix; write e.g. 10.0.0.11/24 or fd00::11/64"
                ),
            );
            None
        }
    }
}

fn dur(lo: Duration, hi: Duration) -> impl FnOnce(&mut Cx, &Node, &str) -> Option<Duration> {
    move |cx, node, path| {
        let s = scalar(cx, node, path, "a duration such as 500ms or 2s")?;
        match duration::parse(s) {
            Ok(d) if d >= lo && d <= hi => Some(d),
            Ok(_) => {
                cx.err(
                    path,
                    node.pos,
                    format!(
                        "{s} is out of range {}-{}",
                        duration::format(lo),
                        duration::format(hi)
                    ),
                );
                None
            }
            Err(e) => {
                cx.err(path, node.pos, e);
                None
            }
        }
    }
}

fn one_of<T: Copy>(
    choices: &'static [(&'static str, T)],
) -> impl FnOnce(&mut Cx, &Node, &str) -> Option<T> {
    move |cx, node, path| {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let s = scalar(cx, node, path, &format!("one of {}", names.join(", ")))?;
        match choices.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => Some(*v),
            None => {
                let hint = closest(s, &names)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                cx.err(
                    path,
                    node.pos,
                    format!("`{s}` is not valid{hint}; use one of {}", names.join(", ")),
                );
                None
            }
        }
    }
}

/// A DNS label: lower-case letters, digits and `-`, 1-63 long, not starting or ending with `-`.
fn label(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let s = scalar(cx, node, path, "a name")?;
    if is_label(s) {
        Some(s.to_string())
    } else {
        cx.err(
            path,
            node.pos,
            format!("`{s}` is not a valid name; use 1-63 lower-case letters, digits and `-`, not at either end"),
        );
        None
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A domain name, returned fully qualified and lower case.
fn domain(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let s = scalar(cx, node, path, "a domain name")?;
    let fqdn = format!("{}.", s.trim_end_matches('.').to_ascii_lowercase());
    let ok = fqdn.len() <= 254
        && fqdn.trim_end_matches('.').split('.').all(|l| {
            is_label(l)
                || (l.len() <= 63
                    && !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        });
    if ok {
        Some(fqdn)
    } else {
        cx.err(
            path,
            node.pos,
            format!("`{s}` is not a valid domain name; write e.g. lb.example.com"),
        );
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// The decoded config plus the positions the cross-field checks point at.
struct Decoded {
    config: Config,
    /// Position of `services[i]`, `services[i].vips[j]`, `services[i].backends[j]`, …
    pos: BTreeMap<String, Pos>,
}

fn decode_config(cx: &mut Cx, root: &Node) -> Decoded {
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
    m.finish(cx);
    Decoded {
        config: Config {
            node,
            cluster,
            admin,
            dns,
            services,
        },
        pos,
    }
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
            })
        })
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
    m.finish(cx);
    let kind = kind.unwrap_or("tcp");
    if kind != "http" && (path.is_some() || expect_status.is_some() || host.is_some()) {
        cx.err(
            p,
            n.pos,
            format!("path, expect_status and host apply to type: http only, not type: {kind}"),
        );
    }
    hc.kind = match kind {
        "none" => return Some(None),
        "http" => CheckKind::Http {
            path: path.unwrap_or_else(|| "/".into()),
            expect_status: expect_status.unwrap_or(200),
            host,
        },
        "mysql" => CheckKind::Mysql,
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
    }
}

fn decode_outlier(cx: &mut Cx, n: &Node, p: &str) -> Option<Outlier> {
    let mut m = cx.map(n, p)?;
    let mut o = default_outlier();
    if let Some(v) = m.opt(cx, "consecutive_failures", uint(0, 1000)) {
        o.consecutive_failures = v as u32;
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

// ---------------------------------------------------------------------------------------------
// Cross-field checks
// ---------------------------------------------------------------------------------------------

fn validate(cx: &mut Cx, d: &Decoded) {
    let cfg = &d.config;
    let at = |path: &str| d.pos.get(path).copied().unwrap_or_default();

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
        if cfg.cluster.keys.is_empty() {
            cx.err(
                "cluster.keys",
                Pos { line: 1, column: 1 },
                "gossip with peers needs a shared key; add keys: [{id: 1, secret: <base64 of 32 random bytes>}]",
            );
        }
        if cfg.cluster.advertise.ip().is_unspecified() {
            cx.err(
                "cluster.advertise",
                Pos { line: 1, column: 1 },
                format!("peers need an address to reach this node; bind is {}, so set advertise to this node's address", cfg.cluster.bind),
            );
        }
        if cfg.node.interfaces.is_empty() {
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
        if dns.zones.is_empty() {
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
                    "service `{}` is already defined at services[{prev}]; names must be unique",
                    s.name
                ),
            );
        }
        if s.vips.is_empty() {
            cx.err(
                &format!("{sp}.vips"),
                at(&sp),
                "a service needs at least one VIP",
            );
        }
        if s.ports.is_empty() {
            cx.err(
                &format!("{sp}.ports"),
                at(&sp),
                "a service needs at least one port",
            );
        }
        if s.backends.is_empty() {
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
                cx.err(&vp, at(&vp), format!("{vip} is listed twice"));
            }
            if vip.is_unspecified() || vip.is_multicast() {
                cx.err(
                    &vp,
                    at(&vp),
                    format!("{vip} cannot be a VIP; use a unicast address"),
                );
            }
            if !cfg.node.interfaces.is_empty()
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
                if let Some(other) = listeners.insert(key, here.clone()) {
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
        if s.backends.iter().all(|b| b.weight == 0) && !s.backends.is_empty() {
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
                if !members.contains(n.as_str()) {
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
        if s.placement.local_only && s.backends.iter().any(|b| b.node.is_none()) {
            cx.err(
                &format!("{sp}.placement.local_only"),
                at(&sp),
                "local_only needs every backend to name its node (backends[].node)",
            );
        }
        if let Some(z) = &s.dns.zone
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
        {
            cx.err(
                &format!("{sp}.health_check.port"),
                at(&sp),
                "health checks speak TCP and this service has only UDP ports; set health_check.port to a TCP port of the backends, or type: none",
            );
        }
    }
}

/// The embedded default configuration `portico run` uses when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("embedded-default.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment {
            hostname: "testhost".into(),
            read_file: |p| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    p.to_string(),
                ))
            },
        }
    }

    #[test]
    fn the_annotated_example_parses() {
        let src = include_str!("../../../examples/portico.yaml");
        let cfg = parse(src, &env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(cfg.cluster.peers.len(), 2);
        assert_eq!(cfg.services[1].ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn the_embedded_default_parses() {
        let cfg = parse(EMBEDDED_DEFAULT, &env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.node.name, "local");
    }

    #[test]
    fn the_effective_config_reads_back_as_the_same_config() {
        // `portico check` prints the effective config; it must be valid input meaning the same.
        // Cluster keys are never printed, so they are put back before reading it again.
        let mut sources = vec![
            EMBEDDED_DEFAULT.to_string(),
            include_str!("../../../examples/portico.yaml").to_string(),
        ];
        sources.push(
            "services:\n  - name: x\n    vips: [10.0.0.1]\n    ports: [{port: 1}]\n    backends: [{address: 10.0.1.1}]\n    health_check: {type: none}\n".into(),
        );
        for src in sources {
            let cfg = parse(&src, &env()).unwrap_or_else(|e| panic!("{e}"));
            let mut printed = to_yaml(&cfg);
            if !cfg.cluster.keys.is_empty() {
                printed = printed.replace(
                    "\ncluster:\n",
                    "\ncluster:\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n",
                );
            }
            let again = parse(&printed, &env()).unwrap_or_else(|e| panic!("{e}\n{printed}"));
            assert_eq!(cfg, again, "{printed}");
        }
    }

    #[test]
    fn an_empty_file_is_a_valid_empty_config_with_defaults() {
        let cfg = parse("", &env()).unwrap();
        assert_eq!(cfg.node.name, "testhost");
        assert_eq!(cfg.admin.listen, "127.0.0.1:9440".parse().unwrap());
        assert!(cfg.services.is_empty());
    }
}

#[cfg(test)]
mod bad_input {
    //! Each class of bad input and the exact message it produces.
    use super::*;

    const SVC: &str = "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n";

    fn errors(src: &str) -> Vec<String> {
        match parse(src, &Environment::default()) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn each_class_of_bad_input_has_its_exact_message() {
        let cases: &[(&str, &str)] = &[
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports:\n      - port: 70000\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].ports[0].port: 70000 is out of range 1-65535 (line 5, column 15)",
            ),
            (
                "admin:\n  listen: 127.0.0.1:9440\n  lisen: x\n",
                "admin.lisen: unknown field `lisen` (did you mean `listen`?); valid fields here: listen (line 3, column 3)",
            ),
            (
                "services:\n  - name: Web_1\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].name: `Web_1` is not a valid name; use 1-63 lower-case letters, digits and `-`, not at either end (line 2, column 11)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.300]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].vips[0]: `10.0.0.300` is not an IP address; write e.g. 10.0.0.10 or fd00::10 (line 3, column 12)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80, protocol: sctp}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].ports[0].protocol: `sctp` is not valid (did you mean `tcp`?); use one of tcp, udp (line 4, column 34)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    health_check: {interval: 2 s}\n",
                "services[0].health_check.interval: unknown unit ` s` in `2 s`; use ns, us, ms, s, m or h (line 6, column 30)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    balance: maglevv\n",
                "services[0].balance: `maglevv` is not valid (did you mean `maglev`?); use one of round-robin, least-connections, power-of-two, maglev (line 6, column 14)",
            ),
            (
                "services:\n  - name: web\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].vips: missing required field (line 2, column 5)",
            ),
            (
                "services: {name: web}\n",
                "services: expected a list, found a mapping (line 1, column 11)",
            ),
            ("admin: [1, 2\n", "YAML syntax error"),
        ];
        for (src, want) in cases {
            let got = errors(src);
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "for input:\n{src}\nwant: {want}\ngot:  {got:#?}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let src = "admin:\n  listen: nope\nservices:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 0}, {port: 99999}]\n    backends: [{address: 10.0.1.1, weight: 5000}]\n    typo: 1\n";
        let got = errors(src);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].starts_with("admin.listen: `nope` is not an address:port"));
        assert!(got[1].starts_with("services[0].ports[0].port: 0 is out of range 1-65535"));
        assert!(got[2].starts_with("services[0].ports[1].port: 99999 is out of range 1-65535"));
        assert!(got[3].starts_with("services[0].backends[0].weight: 5000 is out of range 0-1000"));
        assert!(got[4].starts_with("services[0].typo: unknown field `typo`"));
    }

    #[test]
    fn cross_field_mistakes_are_caught() {
        let two = format!(
            "{SVC}  - name: api\n    vips: [10.0.0.1]\n    ports: [{{port: 80}}]\n    backends: [{{address: 10.0.1.2}}]\n"
        );
        let got = errors(&two);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[1].ports[0]: 10.0.0.1:80 80/tcp is already used by services[0].ports[0]"
            )),
            "{got:#?}"
        );

        let looped = SVC.replace(
            "backends: [{address: 10.0.1.1}]",
            "backends: [{address: 10.0.0.1}]",
        );
        let got = errors(&looped);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[0].backends[0].address: 10.0.0.1 is a VIP of service `web`"
            )),
            "{got:#?}"
        );

        let v6 = format!(
            "node:\n  name: a\n  interfaces: [{{name: eth0, addresses: [10.0.0.11/24]}}]\n{}",
            SVC.replace("vips: [10.0.0.1]", "vips: [10.0.0.1, fd00::1]")
        );
        let got = errors(&v6);
        assert!(got.iter().any(|e| e.starts_with("services[0].vips[1]: fd00::1 is IPv6 but no interface in node.interfaces (eth0) has an IPv6 address")), "{got:#?}");

        let dup = format!(
            "{SVC}  - name: web\n    vips: [10.0.0.2]\n    ports: [{{port: 80}}]\n    backends: [{{address: 10.0.1.2}}]\n"
        );
        let got = errors(&dup);
        assert!(
            got.iter().any(|e| e
                .starts_with("services[1].name: service `web` is already defined at services[0]")),
            "{got:#?}"
        );

        let peers = "node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\ncluster:\n  bind: 10.0.0.11:7946\n  peers: [{name: b, address: 10.0.0.12:7946}]\n";
        let got = errors(peers);
        assert!(
            got.iter()
                .any(|e| e.starts_with("cluster.keys: gossip with peers needs a shared key")),
            "{got:#?}"
        );

        let unknown_node = SVC.replace(
            "backends: [{address: 10.0.1.1}]",
            "backends: [{address: 10.0.1.1}]\n    placement: {preferred: [zzz]}",
        );
        let got = errors(&unknown_node);
        assert!(
            got.iter()
                .any(|e| e.starts_with("services[0].placement.preferred: unknown node `zzz`")),
            "{got:#?}"
        );

        let udp_check = SVC.replace(
            "ports: [{port: 80}]",
            "ports: [{port: 53, protocol: udp}]\n    health_check: {type: tcp}",
        );
        let got = errors(&udp_check);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[0].health_check.port: health checks speak TCP and this service has only UDP ports"
            )),
            "{got:#?}"
        );
        let udp_only = SVC.replace("ports: [{port: 80}]", "ports: [{port: 53, protocol: udp}]");
        let cfg = parse(&udp_only, &Environment::default()).unwrap();
        assert_eq!(
            cfg.services[0].health_check, None,
            "UDP-only services get no TCP probes"
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let got = errors("admin:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n");
        assert_eq!(
            got,
            vec!["admin.listen: duplicate key; each field may appear once (line 3, column 3)"]
        );
    }

    #[test]
    fn secrets_accept_base64_and_hex_only_of_32_bytes() {
        assert!(decode_secret("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=").is_some());
        assert!(decode_secret(&"ab".repeat(32)).is_some());
        assert!(decode_secret("c2hvcnQ=").is_none());
    }
}
