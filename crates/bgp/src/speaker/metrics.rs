//! Prometheus metrics of the speaker under the prefix `portico_bgp` (counter names carry no
//! `_total`: prometheus-client appends it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `{peer}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's name.
    pub peer: String,
}

/// `{peer, state}`: 1 on the current state, 0 on the others.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The peer's name.
    pub peer: String,
    /// The state word.
    pub state: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Reason word.
    pub reason: String,
}

/// The BGP session states, as their words.
pub const BGP_STATES: [&str; 5] = ["idle", "connect", "openSent", "openConfirm", "established"];
/// The BFD session states, as their words.
pub const BFD_STATES: [&str; 4] = ["adminDown", "down", "init", "up"];

/// The speaker's metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// BGP session state per peer.
    pub state: Family<StateLabels, Gauge>,
    /// UPDATE messages sent per peer.
    pub updates_sent: Family<PeerLabels, Counter>,
    /// Times a session left Established, per peer.
    pub flaps: Family<PeerLabels, Counter>,
    /// Routes the peer has from us.
    pub prefixes_sent: Family<PeerLabels, Gauge>,
    /// BFD session state per peer.
    pub bfd_state: Family<StateLabels, Gauge>,
    /// BFD state changes per peer and new state.
    pub bfd_transitions: Family<StateLabels, Counter>,
    /// Incoming BGP connections closed unheard, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// BFD packets dropped, by reason.
    pub bfd_dropped: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under `portico_bgp` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_bgp");
        r.register(
            "session_state",
            "BGP session state per peer (1 on the current state)",
            m.state.clone(),
        );
        r.register(
            "updates_sent",
            "BGP UPDATE messages sent, End-of-RIB markers included",
            m.updates_sent.clone(),
        );
        r.register(
            "session_flaps",
            "Times a BGP session left Established",
            m.flaps.clone(),
        );
        r.register(
            "prefixes_sent",
            "Routes the peer has from this speaker",
            m.prefixes_sent.clone(),
        );
        r.register(
            "bfd_state",
            "BFD session state per peer (1 on the current state)",
            m.bfd_state.clone(),
        );
        r.register(
            "bfd_transitions",
            "BFD session state changes, by the state entered",
            m.bfd_transitions.clone(),
        );
        r.register(
            "connections_refused",
            "Incoming BGP connections closed, by reason (unknownPeer, notPassive, busy)",
            m.refused.clone(),
        );
        r.register(
            "bfd_packets_dropped",
            "BFD control packets dropped, by reason (malformed, ttl, unknownPeer)",
            m.bfd_dropped.clone(),
        );
        m
    }

    /// Sets a one-hot state family for `peer`.
    pub fn set_state(family: &Family<StateLabels, Gauge>, all: &[&str], peer: &str, state: &str) {
        for s in all {
            family
                .get_or_create(&StateLabels {
                    peer: peer.to_string(),
                    state: (*s).to_string(),
                })
                .set(i64::from(*s == state));
        }
    }

    /// Removes a peer's series (the peer left the configuration).
    pub fn forget(&self, peer: &str) {
        let p = PeerLabels {
            peer: peer.to_string(),
        };
        self.updates_sent.remove(&p);
        self.flaps.remove(&p);
        self.prefixes_sent.remove(&p);
        for s in BGP_STATES {
            self.state.remove(&StateLabels {
                peer: peer.to_string(),
                state: s.to_string(),
            });
        }
        for s in BFD_STATES {
            let l = StateLabels {
                peer: peer.to_string(),
                state: s.to_string(),
            };
            self.bfd_state.remove(&l);
            self.bfd_transitions.remove(&l);
        }
    }

    /// Counts a refusal or drop.
    pub fn count(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}
