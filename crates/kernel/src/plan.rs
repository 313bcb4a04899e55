//! The pure core: desired state and health in, an nftables [`Ruleset`] out, and the smallest
//! [`Batch`] that turns one ruleset into another. No I/O: golden tests run without root.
//!
//! A ruleset has two parts. Its *structure* (maps declared, chains, rules, counters) depends
//! only on the configuration; its *elements* (each map's `slot → backend` entries) also depend
//! on health. A health change therefore changes elements only, and [`diff`] sends just the slots
//! that moved; a changed structure (start, reload) replaces the whole table in one transaction.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use lb::maglev::{Maglev, MaglevError};
use model::{BackendKey, Config, HealthView, Path, Protocol, Service};

/// The table portico owns (family `inet`).
pub const TABLE: &str = "portico";

/// Slots of each kernel Maglev map: a prime, small enough that half a map changes well within
/// the 50 ms health budget (see the crate docs for the measurement).
pub const DEFAULT_TABLE_SIZE: usize = 1021;

/// Seed of the flow hash (`jhash … seed`): fixed, so a flow hashes to the same slot after a
/// restart or reload.
const SEED: &str = "0x706f7274";

/// Errors of planning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The Maglev table of a service could not be built (size not prime, too many backends).
    #[error(
        "service `{service}`: {source}; use a prime kernel table size larger than its backend count"
    )]
    Maglev {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: MaglevError,
    },
}

/// One kernel flow target: what a backend serves for one VIP port (for drains and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// `VIP:port` the clients use.
    pub vip: SocketAddr,
    /// `backend:target port` the kernel DNATs to.
    pub backend: SocketAddr,
}

/// The complete desired content of table `inet portico`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// The table without map elements, in nft syntax (`table inet portico { … }`).
    pub structure: String,
    /// Each map's slots (`None`: no backend, for an empty table).
    pub maps: BTreeMap<String, Vec<Option<SocketAddr>>>,
    /// Named counters and the backend each counts.
    pub counters: BTreeMap<String, BackendKey>,
}

impl Ruleset {
    /// Whether no service is on the kernel path (then portico keeps no table at all).
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.counters.is_empty()
    }
}

/// What to send to nft to go from one ruleset to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// Replace the whole table (start, reload, crash repair): `add`, `delete`, create, fill.
    Replace(String),
    /// Only the slots that changed, as `delete element` + `add element` per map.
    Elements {
        /// The nft commands.
        text: String,
        /// How many slots changed.
        slots: usize,
        /// The same changes as data, per map (sent as one netlink batch, see [`crate::nft`]).
        changes: Vec<MapChange>,
    },
}

/// The slots of one map that an elements batch changes: deleted first, then added (a slot
/// that moves to another backend is in both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapChange {
    /// The map's name.
    pub map: String,
    /// Slots whose element goes.
    pub delete: Vec<u32>,
    /// Slots and their new backend.
    pub add: Vec<(u32, SocketAddr)>,
}

impl Batch {
    /// The nft commands.
    pub fn text(&self) -> &str {
        match self {
            Batch::Replace(t) | Batch::Elements { text: t, .. } => t,
        }
    }

    /// `replace` or `elements` (the metric label and log word).
    pub fn kind(&self) -> &'static str {
        match self {
            Batch::Replace(_) => "replace",
            Batch::Elements { .. } => "elements",
        }
    }
}

/// The commands that remove portico's table (graceful stop).
pub fn remove() -> String {
    format!("delete table inet {TABLE}\n")
}

/// Whether `service` runs on the kernel path when the node has one.
pub fn on_kernel(service: &Service) -> bool {
    service.path(true).0 == Path::Kernel
}

/// Every target of `backend` in `service`: one per VIP of the backend's family and port.
pub fn targets(service: &Service, backend: &model::Backend) -> Vec<Target> {
    let mut out = Vec::new();
    for vip in &service.vips {
        if vip.is_ipv4() != backend.address.is_ipv4() {
            continue;
        }
        for port in &service.ports {
            out.push(Target {
                protocol: port.protocol,
                vip: SocketAddr::new(*vip, port.port),
                backend: backend.target(port),
            });
        }
    }
    out
}

fn ipk(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

fn map_name(si: usize, pi: usize, v4: bool) -> String {
    format!("s{si}p{pi}v{}", if v4 { 4 } else { 6 })
}

/// `addr . port` as nft writes a concatenation (IPv6 in brackets, so `::` is not a `:`).
fn concat(a: SocketAddr) -> String {
    match a.ip() {
        IpAddr::V4(ip) => format!("{ip} . {}", a.port()),
        IpAddr::V6(ip) => format!("[{ip}] . {}", a.port()),
    }
}

fn addr(ip: IpAddr) -> String {
    ip.to_string()
}

/// Plans the table for every kernel-path service of `config` under `health`, with Maglev maps
/// of `table_size` slots (prime).
pub fn plan(config: &Config, health: &HealthView, table_size: usize) -> Result<Ruleset, PlanError> {
    let mut maps = BTreeMap::new();
    let mut decl = String::new();
    let mut dnat = String::new();
    let mut snat = String::new();
    let mut count = String::new();
    let mut counters = BTreeMap::new();
    let mut counter_decl = String::new();
    for (si, svc) in config.services.iter().enumerate() {
        if !on_kernel(svc) {
            continue;
        }
        for (bi, b) in svc.backends.iter().enumerate() {
            let name = format!("c{si}b{bi}");
            let _ = writeln!(counter_decl, "\tcounter {name} {{\n\t}}");
            counters.insert(name, BackendKey::new(&svc.name, &b.name));
        }
        for v4 in [true, false] {
            let vips: Vec<IpAddr> = svc
                .vips
                .iter()
                .copied()
                .filter(|v| v.is_ipv4() == v4)
                .collect();
            if vips.is_empty() {
                continue;
            }
            // The backends of this family that may take new flows (panic mode as in the proxy).
            let family: Vec<(usize, &model::Backend)> = svc
                .backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.address.is_ipv4() == v4 && b.weight > 0)
                .collect();
            let serving: Vec<(usize, &model::Backend)> = family
                .iter()
                .copied()
                .filter(|(_, b)| {
                    health
                        .get(&BackendKey::new(&svc.name, &b.name))
                        .copied()
                        .unwrap_or_default()
                        .is_serving()
                })
                .collect();
            let panic = !family.is_empty()
                && (serving.len() as u64) * 100
                    < u64::from(svc.outlier.panic_threshold_percent) * family.len() as u64;
            let chosen = if panic { &family } else { &serving };
            let weights: Vec<(&str, u32)> = chosen
                .iter()
                .map(|(_, b)| (b.name.as_str(), b.weight))
                .collect();
            let table =
                Maglev::try_new(&weights, table_size).map_err(|source| PlanError::Maglev {
                    service: svc.name.clone(),
                    source,
                })?;
            let k = if v4 { "ip" } else { "ip6" };
            for (pi, port) in svc.ports.iter().enumerate() {
                let name = map_name(si, pi, v4);
                let _ = writeln!(
                    decl,
                    "\tmap {name} {{\n\t\ttypeof numgen inc mod {table_size} : {k} daddr . {} dport\n\t}}",
                    port.protocol
                );
                let slots: Vec<Option<SocketAddr>> = if table.slots().is_empty() {
                    vec![None; table_size]
                } else {
                    table
                        .slots()
                        .iter()
                        .map(|&i| Some(chosen[i as usize].1.target(port)))
                        .collect()
                };
                maps.insert(name.clone(), slots);
                let p = port.protocol;
                for vip in &vips {
                    let v = addr(*vip);
                    let _ = writeln!(
                        dnat,
                        "\t\t{k} daddr {v} {p} dport {dport} dnat {k} to jhash {k} saddr . {p} sport . {k} daddr . {p} dport mod {table_size} seed {SEED} map @{name}",
                        dport = port.port
                    );
                    if !svc.keep_client_address {
                        let _ = writeln!(
                            snat,
                            "\t\tmeta l4proto {p} ct status dnat ct original {k} daddr {v} ct original proto-dst {dport} masquerade",
                            dport = port.port
                        );
                    }
                    for (bi, b) in svc.backends.iter().enumerate() {
                        if b.address.is_ipv4() != v4 {
                            continue;
                        }
                        let t = b.target(port);
                        // the backend first (a packet of another backend fails at its
                        // address), then the VIP port; `return`: a flow has one counter.
                        // Only DNATed flows get here (`ct status dnat` gates the jump).
                        let _ = writeln!(
                            count,
                            "\t\tmeta l4proto {p} ct reply {k} saddr {ba} ct reply proto-src {bp} ct original {k} daddr {v} ct original proto-dst {dport} counter name \"c{si}b{bi}\" return",
                            dport = port.port,
                            ba = addr(t.ip()),
                            bp = t.port(),
                            k = ipk(t.ip()),
                        );
                    }
                }
            }
        }
    }
    let mut structure = format!("table inet {TABLE} {{\n");
    structure.push_str(&counter_decl);
    structure.push_str(&decl);
    let _ = write!(
        structure,
        "\tchain services {{\n{dnat}\t}}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{snat}\t}}\n\
         \tchain counters {{\n{count}\t}}\n\
         \tchain count_forward {{\n\t\ttype filter hook postrouting priority filter; policy accept;\n\t\tct status dnat jump counters\n\t}}\n\
         \tchain count_local {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\tct status dnat jump counters\n\t}}\n\
         }}\n"
    );
    Ok(Ruleset {
        structure,
        maps,
        counters,
    })
}

/// `add element` for every filled slot of every map.
fn fill(rs: &Ruleset, out: &mut String) {
    for (name, slots) in &rs.maps {
        add_elements(
            name,
            slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|s| (i, s))),
            out,
        );
    }
}

fn add_elements(name: &str, els: impl Iterator<Item = (usize, SocketAddr)>, out: &mut String) {
    let items: Vec<String> = els.map(|(i, a)| format!("{i} : {}", concat(a))).collect();
    if !items.is_empty() {
        let _ = writeln!(
            out,
            "add element inet {TABLE} {name} {{ {} }}",
            items.join(", ")
        );
    }
}

/// The batch that turns `old` (what the kernel holds, `None` at start) into `new`; `None` when
/// nothing changed.
pub fn diff(old: Option<&Ruleset>, new: &Ruleset) -> Option<Batch> {
    if new.is_empty() {
        // No kernel service: no table (a stale one from a crash goes too).
        return match old {
            Some(o) if o.is_empty() => None,
            _ => Some(Batch::Replace(format!(
                "add table inet {TABLE}\ndelete table inet {TABLE}\n"
            ))),
        };
    }
    let Some(old) = old.filter(|o| o.structure == new.structure) else {
        // One transaction: create (so that delete cannot fail), delete, recreate and fill.
        let mut text = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
        text.push_str(&new.structure);
        fill(new, &mut text);
        return Some(Batch::Replace(text));
    };
    let mut text = String::new();
    let mut slots = 0;
    let mut changes = Vec::new();
    for (name, new_slots) in &new.maps {
        let old_slots = old.maps.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let changed: Vec<usize> = new_slots
            .iter()
            .enumerate()
            .filter(|(i, s)| old_slots.get(*i).copied().flatten() != **s)
            .map(|(i, _)| i)
            .collect();
        if changed.is_empty() {
            continue;
        }
        slots += changed.len();
        let deleted: Vec<String> = changed
            .iter()
            .filter(|i| old_slots.get(**i).copied().flatten().is_some())
            .map(ToString::to_string)
            .collect();
        if !deleted.is_empty() {
            let _ = writeln!(
                text,
                "delete element inet {TABLE} {name} {{ {} }}",
                deleted.join(", ")
            );
        }
        add_elements(
            name,
            changed.iter().filter_map(|&i| new_slots[i].map(|a| (i, a))),
            &mut text,
        );
        changes.push(MapChange {
            map: name.clone(),
            delete: changed
                .iter()
                .filter(|i| old_slots.get(**i).copied().flatten().is_some())
                .map(|&i| i as u32)
                .collect(),
            add: changed
                .iter()
                .filter_map(|&i| new_slots[i].map(|a| (i as u32, a)))
                .collect(),
        });
    }
    (slots > 0).then_some(Batch::Elements {
        text,
        slots,
        changes,
    })
}

#[cfg(test)]
mod tests;
