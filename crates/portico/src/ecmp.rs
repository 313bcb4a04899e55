//! The ECMP rescue in the binary: keeps the `portico_ecmp` tables ([`kernel::ecmp`]) in step
//! with the BGP VIPs and the other live cluster members, and exports the tables' counters as
//! `portico_ecmp_*`.
//!
//! Who gets copies: every configured gossip peer (`cluster.peers`) and every other member the
//! agent has heard of, while the agent does not count it `down`; never this node. Configured
//! peers count before they are first heard, so a starting node copies from its first
//! announced route on (its table is in place before its BGP session can carry the route).
//! A member counted down gets no copies: a node whose portico stopped but which forwards IP
//! (the kernel path needs that) would send them back through the router to the others, which
//! would copy them again; the lab measured 99,000 copies/s when stopped nodes kept getting
//! copies. A node with no other live member keeps a table that copies nothing (see
//! [`kernel::ecmp::Rescue::active`]: its `ct` rules keep conntrack tracking the node's
//! connections). The table stays until the drain of a graceful stop has ended, then it is
//! removed.
//!
//! Stale conntrack entries: a node's conntrack entries outlive its process. After a restart
//! the node's netns still holds, for a few seconds (`CLOSE`, 10 s, after the drain's resets) to
//! days (`ESTABLISHED`, after a crash), entries for connections its proxy held before. When the
//! client reuses such a source port for a new connection that the router sends to another
//! node, and the restarted node joins the ECMP set so the flow moves back to it, conntrack
//! calls the moved segment `established` (measured: a data segment of a foreign connection on
//! a `CLOSE` entry's 4-tuple counts as established, and the stack answers with a reset), so
//! the rescue does not copy it and the connection on the other node is reset. The lab saw it
//! as 2 held connections of 1,280 reset in 64 joins with FRR as the router (both on a node that
//! stayed, 132 and 178 ms after the joining node started; `tests/ecmp_stale.rs` reproduces it
//! deterministically with a reused source port). So before the first
//! route is announced, the driver deletes this node's conntrack entries of proxy-terminated
//! flows (original destination and reply source both a BGP VIP's TCP `VIP:port`): a starting
//! process holds no such socket. Flows of the kernel path (reply source: a backend) are left.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kernel::ecmp::Rescue;
use model::{Config, Desired, EcmpRescueStatus, MemberStatus, Protocol};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the member list is read.
const POLL: Duration = Duration::from_millis(250);
/// How often the kernel's counters are read into the metrics. Each read is two nft listings
/// (two processes each time without libnftables), so not at [`POLL`]'s pace; a scrape every
/// 15 s or more sees no difference.
const COUNTERS: Duration = Duration::from_secs(2);
/// How soon a refused script is tried again (unless what is wanted changes).
const RETRY: Duration = Duration::from_secs(30);

/// What the driver publishes besides its metrics.
pub struct Outputs {
    /// Set once the first tables were applied (or there was nothing to apply).
    pub ready: watch::Sender<bool>,
    /// The state `/status` shows: the reason word and the members copies go to.
    pub status: watch::Sender<Option<EcmpRescueStatus>>,
}

/// The ECMP rescue's metrics.
#[derive(Clone, Default)]
pub struct EcmpMetrics {
    copied: Counter,
    dropped: Counter,
    members: Gauge,
    off: Gauge,
}

impl EcmpMetrics {
    /// Registers under `portico_ecmp_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_ecmp");
        r.register(
            "segments_copied",
            "Segments of connections this node does not hold, copied to every other member (each is sent members times)",
            m.copied.clone(),
        );
        r.register(
            "copies_dropped",
            "Copies from other members dropped here because this node does not hold their connection either",
            m.dropped.clone(),
        );
        r.register(
            "members",
            "Members the rescue copies segments to (0: no rescue table on this node)",
            m.members.clone(),
        );
        r.register(
            "off",
            "1 while nft refuses the rescue tables (connections may be reset when the router re-hashes)",
            m.off.clone(),
        );
        m
    }
}

/// Why the rescue is on or off on this node (the reason word of logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Tables in place.
    On,
    /// No `bgp` section, or no `bgp` / `both` service.
    NoBgpVip,
    /// `bgp.ecmp_rescue: false`.
    Disabled,
    /// No other live member (or none of a VIP's family).
    NoOtherMember,
}

impl Reason {
    /// The word logs carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::On => "on",
            Reason::NoBgpVip => "noBgpVip",
            Reason::Disabled => "disabled",
            Reason::NoOtherMember => "noOtherMember",
        }
    }
}

/// What the tables must carry for `cfg` and the agent's `members` (pure).
pub fn rescue_of(cfg: &Config, members: &[MemberStatus]) -> (Rescue, Reason) {
    let Some(b) = &cfg.bgp else {
        return (Rescue::default(), Reason::NoBgpVip);
    };
    let vips: BTreeSet<IpAddr> = cfg
        .services
        .iter()
        .filter(|s| s.announce.bgp())
        .flat_map(|s| s.vips.iter().copied())
        .collect();
    if vips.is_empty() {
        return (Rescue::default(), Reason::NoBgpVip);
    }
    if !b.ecmp_rescue {
        return (Rescue::default(), Reason::Disabled);
    }
    let me = &cfg.node.name;
    let own = cfg.cluster.advertise.ip();
    let down: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.state == "down")
        .map(|m| m.name.as_str())
        .collect();
    // configured peers until the agent counts them down (a node that stopped and forwards
    // what reaches it would send the copies back through the router: a loop), and learnt
    // members while not down
    let peers: BTreeSet<IpAddr> = cfg
        .cluster
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.address.ip()))
        .chain(members.iter().map(|m| (m.name.as_str(), m.address.ip())))
        .filter(|(name, ip)| {
            name != me && !down.contains(name) && *ip != own && !ip.is_unspecified()
        })
        .map(|(_, ip)| ip)
        .collect();
    let r = Rescue { vips, peers };
    let reason = if r.copying() {
        Reason::On
    } else {
        Reason::NoOtherMember
    };
    (r, reason)
}

/// Keeps the tables equal to [`rescue_of`] the current configuration and `members()` until
/// `stop` (after the drain), reading the counters into `metrics`; then removes the tables.
/// Does nothing (never runs `nft`) while no `bgp` section is configured. Sets `ready` once the
/// first tables are in place (or refused): the speaker announces nothing before, so a joining
/// node never receives re-hashed flows it cannot copy (seen in the lab: a 12 ms window reset a
/// connection).
pub async fn run(
    mut desired: watch::Receiver<Arc<Desired>>,
    members: impl Fn() -> Vec<MemberStatus>,
    metrics: EcmpMetrics,
    Outputs { ready, status }: Outputs,
    stop: CancellationToken,
) {
    // None: nothing applied yet (a crashed predecessor's tables are replaced on first apply)
    let mut applied: Option<Rescue> = None;
    let mut reason: Option<Reason> = None;
    let mut refused: Option<String> = None;
    let mut last = (0u64, 0u64);
    let mut counted = Instant::now();
    let mut failed: Option<(Rescue, Instant)> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        let cfg = desired.borrow_and_update().config.clone();
        if cfg.bgp.is_some() || applied.as_ref().is_some_and(Rescue::any) {
            let (want, why) = rescue_of(&cfg, &members());
            if applied.as_ref().is_some_and(Rescue::any) && counted.elapsed() >= COUNTERS {
                read_counters(&metrics, &mut last).await;
                counted = Instant::now();
            }
            // a refused script is tried again when what is wanted changes, or after RETRY
            let retry = failed
                .as_ref()
                .is_none_or(|(f, at)| *f != want || at.elapsed() >= RETRY);
            if applied.as_ref() != Some(&want) && retry {
                match kernel::ecmp::apply(&kernel::ecmp::render(&want)).await {
                    Ok(()) => {
                        // a replaced table counts from zero
                        last = (0, 0);
                        metrics.off.set(0);
                        refused = None;
                        metrics.members.set(if want.copying() {
                            want.peers.len() as i64
                        } else {
                            0
                        });
                        if reason != Some(why) || want.copying() {
                            let peers: Vec<String> =
                                want.peers.iter().map(ToString::to_string).collect();
                            info!(
                                reason = why.as_str(),
                                vips = want.vips.len(),
                                members = ?peers,
                                "ecmp rescue"
                            );
                        }
                        reason = Some(why);
                        status.send_replace(Some(EcmpRescueStatus {
                            reason: why.as_str().to_string(),
                            members: if want.copying() {
                                want.peers.iter().copied().collect()
                            } else {
                                Vec::new()
                            },
                        }));
                        applied = Some(want);
                        failed = None;
                    }
                    // removing tables that are not there cannot matter (no nft, no root)
                    Err(e) if !want.any() => {
                        debug!(%e, "cannot remove the ecmp rescue tables");
                        failed = Some((want, Instant::now()));
                    }
                    Err(e) => {
                        metrics.off.set(1);
                        status.send_replace(Some(EcmpRescueStatus {
                            reason: "refused".to_string(),
                            members: Vec::new(),
                        }));
                        let e = e.to_string();
                        if refused.as_deref() != Some(e.as_str()) {
                            warn!(%e, "ecmp rescue is off: connections may be reset when the router re-hashes flows");
                            refused = Some(e);
                        }
                        failed = Some((want, Instant::now()));
                    }
                }
            }
        }
        if !*ready.borrow() {
            forget_stale_flows(&cfg).await;
        }
        ready.send_if_modified(|r| !std::mem::replace(r, true));
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            r = desired.changed(), if open => open = r.is_ok(),
        }
    }
    if applied.as_ref().is_some_and(Rescue::any) {
        read_counters(&metrics, &mut last).await;
        match kernel::ecmp::apply(&kernel::ecmp::render(&Rescue::default())).await {
            Ok(()) => info!("ecmp rescue tables removed"),
            Err(e) => warn!(%e, "cannot remove the ecmp rescue tables"),
        }
        metrics.members.set(0);
    }
}

/// The `VIP:port`s whose conntrack entries with reply source = original destination are
/// connections this node's proxy terminated: every TCP port of every BGP VIP (pure).
pub fn proxied_flows(cfg: &Config) -> BTreeSet<SocketAddr> {
    if cfg.bgp.is_none() {
        return BTreeSet::new();
    }
    cfg.services
        .iter()
        .filter(|s| s.announce.bgp())
        .flat_map(|s| {
            s.vips.iter().flat_map(|vip| {
                s.ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .map(|p| SocketAddr::new(*vip, p.port))
            })
        })
        .collect()
}

/// Deletes a predecessor's conntrack entries of [`proxied_flows`] (see the module docs).
async fn forget_stale_flows(cfg: &Config) {
    let flows = proxied_flows(cfg);
    if flows.is_empty() {
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        let mut deleted = 0u64;
        // one read of the table per family, not one per `VIP:port`
        for v4 in [true, false] {
            if !flows.iter().any(|f| f.is_ipv4() == v4) {
                continue;
            }
            let stale = |e: &sys::conntrack::Entry| {
                e.proto == 6 && e.orig_dst == e.reply_src && flows.contains(&e.orig_dst)
            };
            match sys::conntrack::delete_where(v4, stale) {
                Ok(n) => deleted += n,
                // each family on its own: a failed IPv4 read does not skip the IPv6 one
                Err(e) => debug!(%e, ipv4 = v4, "cannot read conntrack: stale entries stay"),
            }
        }
        deleted
    })
    .await;
    if let Ok(n) = done
        && n > 0
    {
        info!(
            entries = n,
            "conntrack entries of connections a previous process held deleted"
        );
    }
}

/// Adds what the kernel counted since `last` (a replaced table restarts at zero).
async fn read_counters(metrics: &EcmpMetrics, last: &mut (u64, u64)) {
    let Ok(now) = kernel::ecmp::counters().await else {
        return;
    };
    metrics.copied.inc_by(delta(last.0, now.0));
    metrics.dropped.inc_by(delta(last.1, now.1));
    *last = now;
}

/// What a monotonic kernel counter added since `last` (all of `now` if it restarted).
fn delta(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::config::{Environment, parse};

    fn cfg(bgp_extra: &str, announce: &str) -> Config {
        let src = format!(
            "node: {{name: n1, interfaces: [{{name: eth0, addresses: [10.78.0.11/24, \"fd78::11/64\"]}}]}}\n\
             cluster:\n  bind: 10.78.0.11:7946\n  peers: [{{name: n2, address: 10.78.0.12:7946}}, {{name: n3, address: 10.78.0.13:7946}}]\n  \
             keys: [{{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}}]\n\
             bgp:\n  asn: 64512\n{bgp_extra}  peers: [{{name: tor, address: 10.78.0.1, asn: 64500}}]\n\
             services:\n  - {{name: web, vips: [10.78.100.1, \"fd78:100::1\"], ports: [{{port: 80}}], backends: [{{address: 127.0.0.1}}], announce: {announce}}}\n  \
             - {{name: l2, vips: [10.78.0.50], ports: [{{port: 80}}], backends: [{{address: 127.0.0.1}}]}}\n"
        );
        parse(&src, &Environment::default()).unwrap()
    }

    fn member(name: &str, addr: &str, state: &str) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            address: addr.parse().unwrap(),
            state: state.into(),
        }
    }

    fn ips(r: &Rescue) -> (Vec<String>, Vec<String>) {
        (
            r.vips.iter().map(ToString::to_string).collect(),
            r.peers.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn configured_peers_count_until_the_agent_says_down() {
        let c = cfg("", "bgp");
        let (r, why) = rescue_of(&c, &[]);
        assert_eq!(why, Reason::On);
        assert_eq!(
            ips(&r),
            (
                vec!["10.78.100.1".to_string(), "fd78:100::1".into()],
                vec!["10.78.0.12".to_string(), "10.78.0.13".into()]
            ),
            "the bgp service's VIPs only; both configured peers before any is heard"
        );
        let (r, _) = rescue_of(
            &c,
            &[
                member("n1", "10.78.0.11:7946", "alive"),
                member("n2", "10.78.0.12:7946", "leaving"),
                member("n3", "10.78.0.13:7946", "down"),
                member("n4", "10.78.0.14:7946", "suspect"),
            ],
        );
        assert_eq!(
            ips(&r).1,
            ["10.78.0.12", "10.78.0.14"],
            "self and the dead left out; a leaving (draining) member and a learnt one kept"
        );
        let (r, why) = rescue_of(
            &c,
            &[
                member("n2", "10.78.0.12:7946", "down"),
                member("n3", "10.78.0.13:7946", "down"),
            ],
        );
        assert_eq!(
            (r.any(), r.copying(), why),
            (true, false, Reason::NoOtherMember),
            "alone: a table that copies nothing, so conntrack keeps tracking"
        );
    }

    #[test]
    fn off_without_bgp_vips_or_when_disabled() {
        assert_eq!(rescue_of(&cfg("", "l2"), &[]).1, Reason::NoBgpVip);
        assert_eq!(rescue_of(&cfg("", "both"), &[]).1, Reason::On);
        let (r, why) = rescue_of(&cfg("  ecmp_rescue: false\n", "bgp"), &[]);
        assert_eq!((r, why), (Rescue::default(), Reason::Disabled));
        let none = parse("services: []\n", &Environment::default()).unwrap();
        assert_eq!(rescue_of(&none, &[]).1, Reason::NoBgpVip);
    }

    #[test]
    fn a_restarted_counter_adds_what_it_counted_since() {
        assert_eq!(delta(10, 15), 5);
        assert_eq!(delta(10, 3), 3);
    }
}
