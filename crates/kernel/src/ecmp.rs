//! The ECMP rescue's tables (`ip portico_ecmp`, `ip6 portico_ecmp`): segments of TCP
//! connections this node does not hold are copied to every other cluster member, so the one
//! that holds the connection continues it when the router re-hashed the flow.
//!
//! # Why
//! A router spreading a BGP VIP over several next hops (ECMP, Linux hash-threshold) re-hashes
//! flows whenever a next hop is added or removed: segments of established connections then
//! arrive at a node that did not accept them, and its kernel answers with a reset. That kills
//! connections to the nodes that stayed, too.
//!
//! # How
//! In `prerouting` at priority -150 (after conntrack, before the kernel path's DNAT), per
//! VIP family:
//! 1. a copy from another node carries TTL / hop limit 255 (a packet that crossed a router has
//!    at most 254): if this node does not hold its connection either (a non-SYN segment that
//!    conntrack calls `new`, or a FIN / RST it calls `invalid`) it is dropped silently, never
//!    copied again (no loops) and never answered with a reset;
//! 2. any other segment of a connection this node does not hold is copied (`dup to`) to every
//!    other member with TTL 255, and the original is dropped. The kernel decrements the TTL of
//!    a copy made in prerouting, as if forwarded (`nf_dup_ipv4`/`nf_dup_ipv6`: `--ttl` on the
//!    8-bit field), so a TTL *set to 255* leaves as 254 and the copies would bounce between
//!    members for ever (seen: 142,000 copies/s in the lab). The rule sets TTL 0 instead: the
//!    copy leaves with 255 (the field wraps), the marker no routed packet carries;
//! 3. SYNs and segments of tracked connections are untouched: the holder's conntrack calls
//!    the copy `established`, so it reaches the proxy's socket or the kernel path's DNAT.
//!
//! ```text
//! table ip portico_ecmp {
//!   counter copied {}
//!   counter dropped {}
//!   chain prerouting {
//!     type filter hook prerouting priority -150; policy accept;
//!     ip daddr { 10.78.100.1 } ip ttl 255 tcp flags & syn == 0 ct state new counter name "dropped" drop
//!     ip daddr { 10.78.100.1 } ip ttl 255 tcp flags & (fin | rst) != 0 ct state invalid counter name "dropped" drop
//!     ip daddr { 10.78.100.1 } tcp flags & syn == 0 ct state new counter name "copied" ip ttl set 0 dup to 10.78.0.12 dup to 10.78.0.13 drop
//!     ip daddr { 10.78.100.1 } tcp flags & (fin | rst) != 0 ct state invalid counter name "copied" ip ttl set 0 dup to 10.78.0.12 dup to 10.78.0.13 drop
//!   }
//! }
//! ```
//!
//! Two tables rather than one `inet` table: nft 1.0.6 refuses `dup to` in the `inet` family
//! ("unsupported family"). `dup to <addr>` needs no `device`: the kernel routes the copy to
//! the member's address as its next hop, so members must be on-link (one segment); a member
//! reached through a router gets a copy the router forwards by its own hash (TTL 254 then:
//! treated as a normal segment, bounded by the TTL).
//!
//! Each render creates, deletes and re-creates the tables in one nft transaction (the kernel
//! path's engine: libnftables in-process, or `nft -f -`), so other tables are never touched and
//! stale state is repaired; counters restart at zero then (the driver accounts for that).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::nft::NftError;

/// The tables' name (one per family, `ip` and `ip6`).
pub const TABLE: &str = "portico_ecmp";
/// The counter of segments this node copied to the other members (each copied N−1 times).
pub const COPIED: &str = "copied";
/// The counter of copies from other members this node dropped (it does not hold them).
pub const DROPPED: &str = "dropped";

/// Errors running `nft` for the ECMP rescue.
#[derive(Debug, thiserror::Error)]
pub enum EcmpError {
    /// `nft` could not be started (not installed?).
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the script or the listing.
    #[error("nft refused the ECMP rescue tables (needs CAP_NET_ADMIN and nf_tables with dup): {0}")]
    Refused(String),
}

/// What the tables carry: the VIPs rescued here and the members' addresses copies go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rescue {
    /// VIPs of `bgp` / `both` services.
    pub vips: BTreeSet<IpAddr>,
    /// The other live members' addresses (never this node's own).
    pub peers: BTreeSet<IpAddr>,
}

impl Rescue {
    /// Whether a family has a VIP: it gets a table, with or without members. The table's `ct`
    /// rules are what keeps conntrack tracking in this network namespace: the kernel registers
    /// conntrack's hooks in a namespace only while some rule uses them, so a node left without
    /// any table stops tracking, the connections it accepts meanwhile have no entry, and once a
    /// member comes back its own segments look `new` and would be copied away (seen in
    /// `tests/ecmp_stale.rs`: a two-node cluster black-holed the surviving node's connection).
    pub fn active(&self, v4: bool) -> bool {
        self.vips.iter().any(|v| v.is_ipv4() == v4)
    }

    /// Whether a family has both a VIP and a member to copy to (else its table only drops
    /// copies it does not hold).
    pub fn copies(&self, v4: bool) -> bool {
        self.active(v4) && self.peers.iter().any(|p| p.is_ipv4() == v4)
    }

    /// Whether any family gets a table.
    pub fn any(&self) -> bool {
        self.active(true) || self.active(false)
    }

    /// Whether any family copies segments to a member.
    pub fn copying(&self) -> bool {
        self.copies(true) || self.copies(false)
    }
}

/// The nft script that makes the kernel's state exactly `r`: both tables are created (so
/// deleting them cannot fail), deleted, and re-created for a family with VIPs (the copy rules
/// only when it has members too). `Rescue::default()` renders the removal.
pub fn render(r: &Rescue) -> String {
    let mut s = String::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        s.push_str(&format!(
            "table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        ));
        if !r.active(v4) {
            continue;
        }
        let (ttl, vips) = (
            if v4 { "ip ttl" } else { "ip6 hoplimit" },
            join(r.vips.iter().filter(|v| v.is_ipv4() == v4)),
        );
        let dups: String = r
            .peers
            .iter()
            .filter(|p| p.is_ipv4() == v4)
            .map(|p| format!(" dup to {p}"))
            .collect();
        let head = format!("    {family} daddr {{ {vips} }}");
        let new = "tcp flags & syn == 0 ct state new";
        let invalid = "tcp flags & (fin | rst) != 0 ct state invalid";
        s.push_str(&format!(
            "table {family} {TABLE} {{\n  counter {COPIED} {{}}\n  counter {DROPPED} {{}}\n  \
             chain prerouting {{\n    type filter hook prerouting priority -150; policy accept;\n"
        ));
        // a copy from another member: this node does not hold it either
        for m in [new, invalid] {
            s.push_str(&format!(
                "{head} {ttl} 255 {m} counter name \"{DROPPED}\" drop\n"
            ));
        }
        // a segment of a connection not held here: to every other member, marked
        if r.copies(v4) {
            for m in [new, invalid] {
                s.push_str(&format!(
                    "{head} {m} counter name \"{COPIED}\" {ttl} set 0{dups} drop\n"
                ));
            }
        }
        s.push_str("  }\n}\n");
    }
    s
}

fn join<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> String {
    ips.map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Packets counted by the named counters of `nft -j list counters table <family> portico_ecmp`
/// output: `(copied, dropped)`; a counter not listed counts 0.
pub fn parse_counters(json: &serde_json::Value) -> (u64, u64) {
    let (mut copied, mut dropped) = (0, 0);
    let items = json["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for c in items.iter().filter_map(|i| i.get("counter")) {
        let packets = c["packets"].as_u64().unwrap_or(0);
        match c["name"].as_str() {
            Some(COPIED) => copied += packets,
            Some(DROPPED) => dropped += packets,
            _ => {}
        }
    }
    (copied, dropped)
}

/// Applies `script` as one transaction, through the same engine as the kernel path's batches
/// (libnftables in-process, or `nft -f -` without the library: [`crate::nft::engine`]).
pub async fn apply(script: &str) -> Result<(), EcmpError> {
    crate::nft::apply(script).await.map_err(EcmpError::from)
}

/// The `(copied, dropped)` packet counters of both families' tables (0 for a missing table).
pub async fn counters() -> Result<(u64, u64), EcmpError> {
    let (mut copied, mut dropped) = (0, 0);
    for family in ["ip", "ip6"] {
        match crate::nft::list_json(&format!("list counters table {family} {TABLE}")).await {
            Ok(v) => {
                let (c, d) = parse_counters(&v);
                copied += c;
                dropped += d;
            }
            // no table of this family: nothing counted
            Err(NftError::Failed(e)) if e.contains("No such file") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((copied, dropped))
}

impl From<NftError> for EcmpError {
    fn from(e: NftError) -> Self {
        match e {
            NftError::Spawn(io) => EcmpError::Spawn(io),
            NftError::Failed(why) => EcmpError::Refused(why),
            other => EcmpError::Refused(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rescue(vips: &[&str], peers: &[&str]) -> Rescue {
        Rescue {
            vips: vips.iter().map(|v| v.parse().unwrap()).collect(),
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    const REMOVE: &str = "table ip portico_ecmp\ndelete table ip portico_ecmp\n\
                          table ip6 portico_ecmp\ndelete table ip6 portico_ecmp\n";

    #[test]
    fn nothing_to_rescue_removes_both_tables() {
        assert_eq!(render(&Rescue::default()), REMOVE);
        // members without VIPs: no table
        assert_eq!(render(&rescue(&[], &["10.78.0.12"])), REMOVE);
        assert!(!rescue(&[], &["10.78.0.12"]).any());
    }

    #[test]
    fn vips_without_members_keep_a_table_that_only_drops_copies() {
        // the table's ct rules keep conntrack tracking the node's connections meanwhile
        let only_drops = "table ip portico_ecmp\ndelete table ip portico_ecmp\n\
             table ip portico_ecmp {\n  counter copied {}\n  counter dropped {}\n  chain prerouting {\n    \
             type filter hook prerouting priority -150; policy accept;\n    \
             ip daddr { 10.78.100.1 } ip ttl 255 tcp flags & syn == 0 ct state new counter name \"dropped\" drop\n    \
             ip daddr { 10.78.100.1 } ip ttl 255 tcp flags & (fin | rst) != 0 ct state invalid counter name \"dropped\" drop\n  }\n}\n\
             table ip6 portico_ecmp\ndelete table ip6 portico_ecmp\n";
        assert_eq!(render(&rescue(&["10.78.100.1"], &[])), only_drops);
        // a member of the other family copies nothing of this one
        assert_eq!(render(&rescue(&["10.78.100.1"], &["fd78::12"])), only_drops);
        let r = rescue(&["10.78.100.1"], &["fd78::12"]);
        assert!(r.any() && !r.copying());
    }

    #[test]
    fn copies_go_to_every_member_of_the_family_marked_and_copies_are_never_copied() {
        let s = render(&rescue(
            &["10.78.100.1", "10.78.100.2", "fd78:100::1"],
            &["10.78.0.12", "10.78.0.13", "fd78::12"],
        ));
        assert_eq!(
            s,
            "table ip portico_ecmp\ndelete table ip portico_ecmp\n\
             table ip portico_ecmp {\n  counter copied {}\n  counter dropped {}\n  chain prerouting {\n    \
             type filter hook prerouting priority -150; policy accept;\n    \
             ip daddr { 10.78.100.1, 10.78.100.2 } ip ttl 255 tcp flags & syn == 0 ct state new counter name \"dropped\" drop\n    \
             ip daddr { 10.78.100.1, 10.78.100.2 } ip ttl 255 tcp flags & (fin | rst) != 0 ct state invalid counter name \"dropped\" drop\n    \
             ip daddr { 10.78.100.1, 10.78.100.2 } tcp flags & syn == 0 ct state new counter name \"copied\" ip ttl set 0 dup to 10.78.0.12 dup to 10.78.0.13 drop\n    \
             ip daddr { 10.78.100.1, 10.78.100.2 } tcp flags & (fin | rst) != 0 ct state invalid counter name \"copied\" ip ttl set 0 dup to 10.78.0.12 dup to 10.78.0.13 drop\n  }\n}\n\
             table ip6 portico_ecmp\ndelete table ip6 portico_ecmp\n\
             table ip6 portico_ecmp {\n  counter copied {}\n  counter dropped {}\n  chain prerouting {\n    \
             type filter hook prerouting priority -150; policy accept;\n    \
             ip6 daddr { fd78:100::1 } ip6 hoplimit 255 tcp flags & syn == 0 ct state new counter name \"dropped\" drop\n    \
             ip6 daddr { fd78:100::1 } ip6 hoplimit 255 tcp flags & (fin | rst) != 0 ct state invalid counter name \"dropped\" drop\n    \
             ip6 daddr { fd78:100::1 } tcp flags & syn == 0 ct state new counter name \"copied\" ip6 hoplimit set 0 dup to fd78::12 drop\n    \
             ip6 daddr { fd78:100::1 } tcp flags & (fin | rst) != 0 ct state invalid counter name \"copied\" ip6 hoplimit set 0 dup to fd78::12 drop\n  }\n}\n"
        );
        // the drop of marked copies comes before the copying rules: no copy loops
        let drop_at = s.find("ip ttl 255").unwrap();
        let copy_at = s.find("ip ttl set 0").unwrap();
        assert!(drop_at < copy_at);
    }

    #[test]
    fn counters_are_read_by_name() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"counter":{"family":"ip","name":"copied","table":"portico_ecmp","handle":1,"packets":12,"bytes":900}},
            {"counter":{"family":"ip","name":"dropped","table":"portico_ecmp","handle":2,"packets":3,"bytes":120}}]}"#,
        )
        .unwrap();
        assert_eq!(parse_counters(&v), (12, 3));
        assert_eq!(parse_counters(&serde_json::Value::Null), (0, 0));
    }
}
