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

/// The largest config file read (a configuration is a few kilobytes; this keeps
/// `--config /dev/zero`-like mistakes from exhausting memory).
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

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
    /// The path is a FIFO, device, directory or socket: reading it could block or never end.
    #[error(
        "config file {path} is not a regular file (it is {kind}); give the path of a YAML file"
    )]
    NotAFile {
        /// The path given.
        path: String,
        /// What it is instead (`a directory`, `a FIFO`, …).
        kind: &'static str,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error(
        "config file {path} is larger than 16 MiB ({size} bytes); a configuration is a few kilobytes"
    )]
    TooLarge {
        /// The path given.
        path: String,
        /// Its size (or the bytes read before giving up).
        size: u64,
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
            read_file: read_secret_file,
        }
    }
}

/// Reads a `secret_file` as [`read_file`] reads a config file: bounded, regular files only.
fn read_secret_file(path: &str) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    match read_file(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| Error::new(ErrorKind::InvalidData, "the file is not UTF-8 text")),
        Err(LoadError::Io { source, .. }) => Err(source),
        Err(LoadError::NotAFile { kind, .. }) => {
            Err(Error::other(format!("not a regular file (it is {kind})")))
        }
        Err(LoadError::TooLarge { size, .. }) => {
            Err(Error::other(format!("larger than 16 MiB ({size} bytes)")))
        }
        Err(e @ LoadError::Invalid { .. }) => Err(Error::other(e.to_string())),
    }
}

/// A valid configuration and what the file said about it beyond its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// The file writes a `services` list (`services: []` included); an empty or comments-only
    /// file, or `services:` with no value, does not. A reload may remove every service only
    /// when this is true.
    pub declares_services: bool,
}

/// Reads a config file's bytes: a regular file of at most [`MAX_FILE_SIZE`] bytes. FIFOs,
/// devices, directories and sockets are refused before they are opened for reading (a FIFO
/// would block, `/dev/zero` would never end).
pub fn read_file(path: &str) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let io = |source| LoadError::Io {
        path: path.into(),
        source,
    };
    let check = |meta: &std::fs::Metadata| {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_file() {
            return if meta.len() > MAX_FILE_SIZE {
                Err(LoadError::TooLarge {
                    path: path.into(),
                    size: meta.len(),
                })
            } else {
                Ok(())
            };
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        Err(LoadError::NotAFile {
            path: path.into(),
            kind,
        })
    };
    check(&std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    // the path may have been replaced between the two looks: check what was opened
    check(&file.metadata().map_err(io)?)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(LoadError::TooLarge {
            path: path.into(),
            size: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Reads and validates a config file (see [`read_file`] for what is refused before parsing).
pub fn load(path: &str, env: &Environment) -> Result<Config, LoadError> {
    load_file(path, env).map(|l| l.config)
}

/// Like [`load`], also telling whether the file declares its services ([`Loaded`]).
pub fn load_file(path: &str, env: &Environment) -> Result<Loaded, LoadError> {
    let bytes = read_file(path)?;
    read(&bytes, env).map_err(|errors| LoadError::Invalid {
        path: path.into(),
        errors,
    })
}

/// Parses and validates config text.
pub fn parse(src: &str, env: &Environment) -> Result<Config, ConfigErrors> {
    read(src.as_bytes(), env).map(|l| l.config)
}

/// Parses and validates config bytes: text that is not UTF-8 is an error at the line and
/// column of its first invalid byte.
pub fn read(src: &[u8], env: &Environment) -> Result<Loaded, ConfigErrors> {
    let src = std::str::from_utf8(src).map_err(|e| {
        let good = &src[..e.valid_up_to()];
        // the prefix is valid UTF-8 by definition
        let good = std::str::from_utf8(good).unwrap_or_default();
        let line_start = good.rfind('\n').map_or(0, |i| i + 1);
        let byte = src[e.valid_up_to()];
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            pos: Pos {
                line: good.matches('\n').count() + 1,
                column: good[line_start..].chars().count() + 1,
            },
            message: format!("the file is not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8"),
        }])
    })?;
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
        kept: BTreeMap::new(),
    };
    let cfg = decode_config(&mut cx, &root);
    let decode_errors: Vec<String> = cx.errors.iter().map(|e| e.path.clone()).collect();
    let before = cx.errors.len();
    validate(&mut cx, &cfg, &decode_errors);
    for e in &mut cx.errors[before..] {
        e.path = cfg.source_path(&e.path);
    }
    if cx.errors.is_empty() {
        let declares_services = matches!(
            &root.value,
            Value::Map(entries)
                if entries.iter().any(|(k, v)| k.as_str() == Some("services") && matches!(v.value, Value::Seq(_)))
        );
        Ok(Loaded {
            config: cfg.config,
            declares_services,
        })
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
    /// See [`Decoded::kept`].
    kept: BTreeMap<String, Vec<usize>>,
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
            Value::Seq(items) => {
                let mut kept = Vec::new();
                let mut out = Vec::new();
                for (i, n) in items.iter().enumerate() {
                    if let Some(v) = item(self, n, &format!("{path}[{i}]")) {
                        kept.push(i);
                        out.push(v);
                    }
                }
                self.kept.insert(path.to_string(), kept);
                out
            }
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

mod bgp;
mod schema;
mod validate;

use schema::decode_config;
pub use schema::decode_secret;
use validate::validate;

/// The embedded default configuration `portico run` uses when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("embedded-default.yaml");

#[cfg(test)]
mod tests;
