//! One BGP session of an announce-only speaker, as a pure state machine (RFC 4271 §8): events
//! in (start, stop, TCP up/down, octets received, time), actions out (connect, send, close,
//! established, down). It keeps the routes to announce (the Adj-RIB-Out) and sends the
//! difference whenever they change; received routes are decoded, checked and ignored.
//!
//! RFC 4271 rules it follows (quoted where they are MUSTs):
//! - Hold time: the smaller of the two proposals; "If the value of the Hold Time field is
//!   zero, then the Hold Timer and KeepAlive timers are not started." KEEPALIVEs every third
//!   of the hold time.
//! - "If the Hold Timer expires, the local system sends a NOTIFICATION message with the error
//!   code Hold Timer Expired" (4/0).
//! - A peer whose AS is not the configured one: NOTIFICATION 2/2 (Bad Peer AS).
//! - Any message that fails to decode: the NOTIFICATION its error names, then close.
//! - Connect retry with back-off (1 s doubling to 30 s) while not Established; the first
//!   attempt is at once.
//! - After the initial routes, an End-of-RIB marker (RFC 4724) per family.
//!
//! Decisions carry a reason word (`established`, `holdTimerExpired`, `peerNotification`,
//! `malformedMessage`, `badPeerAs`, `connectionLost`, `stopped`, `bfdDown`) that goes to
//! logs, metrics and status alike.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::Prefix;
use crate::message::{
    AFI_IPV4, AFI_IPV6, AsSegment, Attribute, Capability, Context, Error, GracefulRestart,
    LargeCommunity, Message, Notification, Open, Origin, SAFI_UNICAST, Update,
};
use crate::speaker::{RouteAttrs, Routes};

/// The first connect retry; it doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest connect retry.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long the OpenSent state waits for the peer's OPEN (RFC 4271 suggests a large hold time,
/// 4 minutes, there).
pub const OPEN_WAIT: Duration = Duration::from_secs(240);

/// What a session is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This speaker's AS.
    pub local_as: u32,
    /// The peer's AS (equal to `local_as`: iBGP).
    pub peer_as: u32,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Proposed hold time in seconds (0, or 3 and more).
    pub hold_time: u16,
    /// Next hop of IPv4 routes (this node's address towards the peer).
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop of IPv6 routes.
    pub next_hop_v6: Option<std::net::Ipv6Addr>,
    /// Communities on every route (besides each route's own).
    pub communities: Vec<u32>,
    /// LOCAL_PREF on iBGP sessions for routes without their own (100 when `None`).
    pub local_pref: Option<u32>,
    /// Graceful restart time advertised (RFC 4724), if any.
    pub restart_time: Option<u16>,
    /// The peer's name: routes limited to other peers ([`RouteAttrs::peers`]) are not sent.
    pub name: String,
}

/// Session states (RFC 4271 §8.2.2; Connect and Active are one here: the driver connects or
/// accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not started, or waiting to retry.
    Idle,
    /// Waiting for the TCP connection.
    Connect,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for the first KEEPALIVE.
    OpenConfirm,
    /// Up: routes flow.
    Established,
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the TCP connection (or accept one, for a passive session).
    Connect,
    /// Write these octets.
    Send(Vec<u8>),
    /// Close the connection.
    Close,
    /// The session is up with these negotiated parameters.
    Established {
        /// Hold time in use (seconds).
        hold_time: u16,
        /// The peer's AS.
        peer_as: u32,
    },
    /// The session went down, with its reason word and the NOTIFICATION sent or received.
    Down {
        /// Reason word.
        reason: &'static str,
        /// The NOTIFICATION involved.
        notification: Option<Notification>,
    },
}

/// One session.
#[derive(Debug, Clone)]
pub struct Session {
    cfg: Config,
    state: State,
    cx: Context,
    buf: Vec<u8>,
    hold: u16,
    hold_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
    retry_deadline: Option<Instant>,
    retry: Duration,
    /// Routes to announce.
    routes: Arc<Routes>,
    /// Routes the peer has from us, with the attributes it has them with.
    sent: Routes,
    /// Families the peer accepts.
    v4: bool,
    v6: bool,
    /// Updates received and ignored.
    pub updates_received: u64,
    /// UPDATE messages sent (End-of-RIB markers included).
    pub updates_sent: u64,
    /// This side's address of the current connection: the next hop of its family when none
    /// is configured.
    local: Option<IpAddr>,
}

impl Session {
    /// A session in Idle.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            state: State::Idle,
            cx: Context::default(),
            buf: Vec::new(),
            hold: 0,
            hold_deadline: None,
            keepalive_deadline: None,
            retry_deadline: None,
            retry: FIRST_RETRY,
            routes: Arc::default(),
            sent: Routes::new(),
            v4: false,
            v6: false,
            updates_received: 0,
            updates_sent: 0,
            local: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When [`Session::tick`] must run next, if any timer runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.hold_deadline,
            self.keepalive_deadline,
            self.retry_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Starts the session: connect at once.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Idle {
            return Vec::new();
        }
        self.retry_deadline = None;
        self.state = State::Connect;
        self.hold_deadline = Some(now + OPEN_WAIT);
        vec![Action::Connect]
    }

    /// This side's address of the connection about to be reported [`Session::connected`]: the
    /// next hop of its family unless one is configured.
    pub fn set_local_address(&mut self, local: IpAddr) {
        self.local = Some(match local {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(local, IpAddr::V4),
            v4 => v4,
        });
    }

    fn next_hop_v4(&self) -> Option<Ipv4Addr> {
        self.cfg.next_hop_v4.or(match self.local {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        })
    }

    fn next_hop_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.cfg.next_hop_v6.or(match self.local {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        })
    }

    /// The TCP connection is up: send our OPEN.
    pub fn connected(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Connect {
            return vec![Action::Close];
        }
        self.buf.clear();
        self.state = State::OpenSent;
        self.hold_deadline = Some(now + OPEN_WAIT);
        vec![Action::Send(Message::Open(self.open()).encode(self.cx))]
    }

    /// The TCP connection failed or closed.
    pub fn disconnected(&mut self, now: Instant) -> Vec<Action> {
        if self.state == State::Idle {
            return Vec::new();
        }
        self.down("connectionLost", None, now, false)
    }

    /// Stops the session: a Cease NOTIFICATION (6/2, administrative shutdown) when up.
    pub fn stop(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        ) {
            let n = Notification {
                code: 6,
                subcode: 2,
                data: Vec::new(),
            };
            out.push(Action::Send(
                Message::Notification(n.clone()).encode(self.cx),
            ));
            out.push(Action::Close);
            out.push(Action::Down {
                reason: "stopped",
                notification: Some(n),
            });
        } else if self.state == State::Connect {
            out.push(Action::Close);
        }
        self.reset();
        self.retry_deadline = None;
        out
    }

    /// BFD says the peer is gone: down at once, without waiting for the hold timer.
    pub fn bfd_down(&mut self, now: Instant) -> Vec<Action> {
        if self.state == State::Idle {
            return Vec::new();
        }
        let n = Notification {
            code: 6,
            subcode: 10, // Cease: BFD Down (RFC 9384)
            data: Vec::new(),
        };
        self.down("bfdDown", Some(n), now, true)
    }

    /// Routes the peer has from us.
    pub fn prefixes_sent(&self) -> usize {
        self.sent.len()
    }

    /// Whether the session is Established and the peer has every route it accepts (those of
    /// a family it negotiated and has a next hop for) with its current attributes.
    pub fn in_sync(&self) -> bool {
        self.state == State::Established && self.sent == self.wanted()
    }

    /// Sets the routes to announce; when Established, sends the difference.
    pub fn set_routes(&mut self, routes: Arc<Routes>) -> Vec<Action> {
        self.routes = routes;
        if self.state == State::Established {
            self.sync()
        } else {
            Vec::new()
        }
    }

    /// Octets arrived on the connection.
    pub fn received(&mut self, octets: &[u8], now: Instant) -> Vec<Action> {
        self.buf.extend_from_slice(octets);
        let mut out = Vec::new();
        loop {
            if !matches!(
                self.state,
                State::OpenSent | State::OpenConfirm | State::Established
            ) {
                self.buf.clear();
                return out;
            }
            let (m, n) = match Message::decode(&self.buf, self.cx) {
                Ok(x) => x,
                Err(Error::Incomplete { .. }) => return out,
                Err(e) => {
                    let n = e.notification();
                    out.extend(self.down("malformedMessage", n, now, true));
                    return out;
                }
            };
            self.buf.drain(..n);
            out.extend(self.message(m, now));
        }
    }

    /// Timers: hold expiry, keepalives, connect retry.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.hold_deadline.is_some_and(|d| now >= d) {
            let n = Notification {
                code: 4,
                subcode: 0,
                data: Vec::new(),
            };
            return self.down("holdTimerExpired", Some(n), now, true);
        }
        if self.keepalive_deadline.is_some_and(|d| now >= d) {
            out.push(Action::Send(Message::Keepalive.encode(self.cx)));
            self.keepalive_deadline = Some(now + self.keepalive_interval());
        }
        if self.retry_deadline.is_some_and(|d| now >= d) {
            self.retry_deadline = None;
            out.extend(self.start(now));
        }
        out
    }

    fn keepalive_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.hold / 3).max(1))
    }

    fn open(&self) -> Open {
        let mut capabilities = vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
        ];
        if let Some(t) = self.cfg.restart_time {
            capabilities.push(Capability::GracefulRestart(GracefulRestart {
                restarted: false,
                restart_time: t.min(4095),
                // Forwarding state preserved for both families: a peer keeps our routes
                // while we restart, and keeps them when we come back (RFC 4724 §4.2).
                families: vec![
                    (AFI_IPV4, SAFI_UNICAST, true),
                    (AFI_IPV6, SAFI_UNICAST, true),
                ],
            }));
        }
        capabilities.push(Capability::FourOctetAs(self.cfg.local_as));
        Open {
            my_as: u16::try_from(self.cfg.local_as).unwrap_or(crate::message::AS_TRANS),
            hold_time: self.cfg.hold_time,
            identifier: self.cfg.router_id,
            capabilities,
        }
    }

    fn message(&mut self, m: Message, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match (self.state, m) {
            (_, Message::Notification(n)) => {
                out.extend(self.down("peerNotification", Some(n), now, false));
            }
            (State::OpenSent, Message::Open(o)) => {
                if o.asn() != self.cfg.peer_as {
                    let n = Notification {
                        code: 2,
                        subcode: 2,
                        data: Vec::new(),
                    };
                    return self.down("badPeerAs", Some(n), now, true);
                }
                self.cx = Context {
                    four_octet_as: o
                        .capabilities
                        .iter()
                        .any(|c| matches!(c, Capability::FourOctetAs(_))),
                };
                let mp: Vec<(u16, u8)> = o
                    .capabilities
                    .iter()
                    .filter_map(|c| match c {
                        Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                        _ => None,
                    })
                    .collect();
                // Without any multiprotocol capability the peer speaks IPv4 unicast only.
                self.v4 = mp.is_empty() || mp.contains(&(AFI_IPV4, SAFI_UNICAST));
                self.v6 = mp.contains(&(AFI_IPV6, SAFI_UNICAST));
                self.hold = self.cfg.hold_time.min(o.hold_time);
                self.state = State::OpenConfirm;
                out.push(Action::Send(Message::Keepalive.encode(self.cx)));
                self.arm(now);
            }
            (State::OpenConfirm, Message::Keepalive) => {
                self.state = State::Established;
                self.retry = FIRST_RETRY;
                self.arm(now);
                out.push(Action::Established {
                    hold_time: self.hold,
                    peer_as: self.cfg.peer_as,
                });
                self.sent.clear();
                out.extend(self.sync());
                // End-of-RIB per family (RFC 4724 §2).
                if self.v4 {
                    self.updates_sent += 1;
                    out.push(Action::Send(
                        Message::Update(Update::default()).encode(self.cx),
                    ));
                }
                if self.v6 {
                    self.updates_sent += 1;
                    out.push(Action::Send(
                        Message::Update(Update {
                            attributes: vec![Attribute::MpUnreach {
                                afi: AFI_IPV6,
                                withdrawn: Vec::new(),
                            }],
                            ..Update::default()
                        })
                        .encode(self.cx),
                    ));
                }
            }
            (State::Established, Message::Keepalive) => self.arm_hold(now),
            (State::Established, Message::Update(_)) => {
                // Parsed and checked by the decoder; an announce-only speaker installs nothing.
                self.updates_received += 1;
                self.arm_hold(now);
            }
            (State::Established, Message::RouteRefresh { .. }) => {
                self.arm_hold(now);
                self.sent.clear();
                out.extend(self.sync());
            }
            (_, _) => {
                // A message not allowed in this state: FSM error (5/0).
                let n = Notification {
                    code: 5,
                    subcode: 0,
                    data: Vec::new(),
                };
                out.extend(self.down("fsmError", Some(n), now, true));
            }
        }
        out
    }

    fn arm_hold(&mut self, now: Instant) {
        self.hold_deadline =
            (self.hold > 0).then(|| now + Duration::from_secs(u64::from(self.hold)));
    }

    fn arm(&mut self, now: Instant) {
        self.arm_hold(now);
        self.keepalive_deadline = (self.hold > 0).then(|| now + self.keepalive_interval());
    }

    fn reset(&mut self) {
        self.state = State::Idle;
        self.cx = Context::default();
        self.buf.clear();
        self.hold_deadline = None;
        self.keepalive_deadline = None;
        self.sent.clear();
    }

    /// Goes down: optionally sends `n`, closes, and schedules the next attempt with back-off.
    fn down(
        &mut self,
        reason: &'static str,
        n: Option<Notification>,
        now: Instant,
        send: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if send && let Some(n) = &n {
            out.push(Action::Send(
                Message::Notification(n.clone()).encode(self.cx),
            ));
        }
        out.push(Action::Close);
        out.push(Action::Down {
            reason,
            notification: n,
        });
        self.reset();
        self.retry_deadline = Some(now + self.retry);
        self.retry = (self.retry * 2).min(MAX_RETRY);
        out
    }

    /// The routes the peer gets: those for every peer or for this one by name, of a family it
    /// negotiated and has a next hop for, whose attributes fit in an UPDATE. The peer set is
    /// left out of the result, so a route that stays with this peer when its set changes is
    /// not announced again.
    fn wanted(&self) -> Routes {
        let v4 = self.v4 && self.next_hop_v4().is_some();
        let v6 = self.v6 && self.next_hop_v6().is_some();
        self.routes
            .iter()
            .filter(|(p, a)| {
                a.peers.as_ref().is_none_or(|set| set.contains(&self.cfg.name))
                    && (if p.addr().is_ipv4() { v4 } else { v6 })
                    // 4,096 octets less the header, the fixed attributes, a next hop and one
                    // prefix leave ~3,900 octets: 4 per community, 12 per large community.
                    && 4 * (a.communities.len() + self.cfg.communities.len())
                        + 12 * a.large_communities.len()
                        <= 3_800
            })
            .map(|(p, a)| {
                (
                    *p,
                    RouteAttrs {
                        peers: None,
                        ..a.clone()
                    },
                )
            })
            .collect()
    }

    /// UPDATEs that bring the peer from `sent` to `routes`: withdrawals, then announcements
    /// grouped by identical attributes (a changed attribute is announced again, which
    /// replaces the route: RFC 4271 §3.1's implicit withdrawal).
    fn sync(&mut self) -> Vec<Action> {
        let want = self.wanted();
        let del: Vec<Prefix> = self
            .sent
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        let mut groups: BTreeMap<&RouteAttrs, Vec<Prefix>> = BTreeMap::new();
        for (p, a) in &want {
            if self.sent.get(p) != Some(a) {
                groups.entry(a).or_default().push(*p);
            }
        }
        let mut out = Vec::new();
        // Small batches keep every UPDATE far below 4,096 octets (a /128 takes 17 octets).
        for chunk in del.chunks(100) {
            let (v4, v6): (Vec<Prefix>, Vec<Prefix>) =
                chunk.iter().partition(|p| p.addr().is_ipv4());
            if !v4.is_empty() {
                out.push(self.update(Update {
                    withdrawn: v4,
                    ..Update::default()
                }));
            }
            if !v6.is_empty() {
                out.push(self.update(Update {
                    attributes: vec![Attribute::MpUnreach {
                        afi: AFI_IPV6,
                        withdrawn: v6,
                    }],
                    ..Update::default()
                }));
            }
        }
        for (attrs, prefixes) in &groups {
            let (v4, v6): (Vec<Prefix>, Vec<Prefix>) =
                prefixes.iter().partition(|p| p.addr().is_ipv4());
            if let (false, Some(nh)) = (v4.is_empty(), self.next_hop_v4()) {
                let mut attributes = self.attributes(attrs);
                attributes.push(Attribute::NextHop(nh));
                attributes.sort_by_key(Attribute::code);
                for nlri in self.batches(&attributes, v4) {
                    out.push(self.update(Update {
                        withdrawn: Vec::new(),
                        attributes: attributes.clone(),
                        nlri,
                    }));
                }
            }
            if let (false, Some(nh)) = (v6.is_empty(), self.next_hop_v6()) {
                let base = self.attributes(attrs);
                for nlri in self.batches(&base, v6) {
                    let mut attributes = base.clone();
                    attributes.push(Attribute::MpReach {
                        afi: AFI_IPV6,
                        next_hops: vec![IpAddr::V6(nh)],
                        nlri,
                    });
                    attributes.sort_by_key(Attribute::code);
                    out.push(self.update(Update {
                        withdrawn: Vec::new(),
                        attributes,
                        nlri: Vec::new(),
                    }));
                }
            }
        }
        self.updates_sent += out.len() as u64;
        self.sent = want;
        out
    }

    /// Splits `prefixes` into batches that fit in one UPDATE with `attributes` (at most 100,
    /// fewer when the attributes are large).
    fn batches(&self, attributes: &[Attribute], prefixes: Vec<Prefix>) -> Vec<Vec<Prefix>> {
        let mut bytes = 0;
        for a in attributes {
            bytes += match a {
                Attribute::Communities(c) => 4 * c.len(),
                Attribute::LargeCommunities(c) => 12 * c.len(),
                _ => 16,
            } + 4;
        }
        // 4,096 less header, lengths, MP_REACH overhead and the attributes; 17 octets a route.
        let room = 4_096usize.saturating_sub(19 + 4 + 48 + bytes);
        let per = (room / 17).clamp(1, 100);
        prefixes.chunks(per).map(<[Prefix]>::to_vec).collect()
    }

    fn attributes(&self, route: &RouteAttrs) -> Vec<Attribute> {
        let ibgp = self.cfg.local_as == self.cfg.peer_as;
        let mut a = vec![
            Attribute::Origin(Origin::Igp),
            // eBGP: our AS first; iBGP: an empty path (RFC 4271 §5.1.2).
            Attribute::AsPath(if ibgp {
                Vec::new()
            } else {
                vec![AsSegment {
                    kind: 2,
                    asns: vec![self.cfg.local_as],
                }]
            }),
        ];
        if let Some(med) = route.med {
            a.push(Attribute::Med(med));
        }
        if ibgp {
            a.push(Attribute::LocalPref(
                route.local_pref.or(self.cfg.local_pref).unwrap_or(100),
            ));
        }
        let mut communities: Vec<u32> = self
            .cfg
            .communities
            .iter()
            .chain(&route.communities)
            .copied()
            .collect();
        communities.sort_unstable();
        communities.dedup();
        if !communities.is_empty() {
            a.push(Attribute::Communities(communities));
        }
        if !route.large_communities.is_empty() {
            let mut large: Vec<[u32; 3]> = route.large_communities.clone();
            large.sort_unstable();
            large.dedup();
            a.push(Attribute::LargeCommunities(
                large
                    .into_iter()
                    .map(|[global, local1, local2]| LargeCommunity {
                        global,
                        local1,
                        local2,
                    })
                    .collect(),
            ));
        }
        a
    }

    fn update(&self, u: Update) -> Action {
        Action::Send(Message::Update(u).encode(self.cx))
    }
}

#[cfg(test)]
mod tests;
