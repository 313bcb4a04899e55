//! The BFD driver of the speaker: one pure [`crate::bfd::session::Session`] per peer that has
//! BFD, over UDP (RFC 5881 single hop: to port 3784 from a port in 49152–65535 with TTL 255, and
//! only packets that arrive with TTL 255 count; RFC 5883 multihop: port 4784, any TTL).
//! Received packets are demultiplexed by Your Discriminator, or by source address while that
//! is zero (RFC 5880 §6.8.6). A session going from Up to Down turns the peer's `down` flag on,
//! which drops its BGP session at once; Up turns it off. On stop every session is taken
//! AdminDown first, so the peers do not count it as a failure.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::{BFD_STATES, Metrics, StateLabels};
use super::{Binder, PeerConfig};
use crate::bfd::session::{Action, Session, Timers};
use crate::bfd::{Control, State};

/// Received datagrams waiting for the driver; more are dropped (`queueFull`).
const RX_QUEUE: usize = 1024;

/// The word of a BFD state.
pub fn word(s: State) -> &'static str {
    match s {
        State::AdminDown => "adminDown",
        State::Down => "down",
        State::Init => "init",
        State::Up => "up",
    }
}

/// What the speaker tells the driver.
pub(super) enum Cmd {
    /// Run BFD to this peer.
    Add {
        /// The peer.
        cfg: PeerConfig,
        /// Turned on when the session goes from Up to Down, off when Up.
        down: watch::Sender<bool>,
        /// The session state.
        state: watch::Sender<State>,
    },
    /// Stop BFD to this peer (AdminDown first).
    Remove(String),
}

struct Peer {
    session: Session,
    socket: UdpSocket,
    dst: SocketAddr,
    multihop: bool,
    down: watch::Sender<bool>,
    state: watch::Sender<State>,
    disc: u32,
}

struct Received {
    octets: Vec<u8>,
    from: SocketAddr,
    ttl: Option<u8>,
    multihop: bool,
}

/// The driver's state.
struct Hub {
    binder: Arc<dyn Binder>,
    metrics: Metrics,
    peers: BTreeMap<String, Peer>,
    by_disc: HashMap<u32, String>,
    /// Receive sockets opened, by (IPv6, multihop).
    listening: BTreeMap<(bool, bool), CancellationToken>,
    rx_tx: mpsc::Sender<Received>,
    next_disc: u32,
}

/// Runs BFD for the peers the speaker adds until `shutdown`.
pub(super) async fn run(
    binder: Arc<dyn Binder>,
    metrics: Metrics,
    mut cmds: mpsc::Receiver<Cmd>,
    shutdown: CancellationToken,
) {
    let (rx_tx, mut rx) = mpsc::channel(RX_QUEUE);
    let mut hub = Hub {
        binder,
        metrics,
        peers: BTreeMap::new(),
        by_disc: HashMap::new(),
        listening: BTreeMap::new(),
        rx_tx,
        next_disc: (std::process::id() << 12) ^ 0x5a5a_0000 | 1,
    };
    loop {
        let deadline = hub.peers.values().map(|p| p.session.next_deadline()).min();
        tokio::select! {
            () = shutdown.cancelled() => break,
            c = cmds.recv() => match c {
                Some(Cmd::Add { cfg, down, state }) => hub.add(cfg, down, state),
                Some(Cmd::Remove(name)) => hub.remove(&name),
                None => break,
            },
            Some(r) = rx.recv() => hub.received(r),
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => hub.tick(),
        }
    }
    let names: Vec<String> = hub.peers.keys().cloned().collect();
    for n in names {
        hub.remove(&n);
    }
    for t in hub.listening.values() {
        t.cancel();
    }
}

impl Hub {
    fn add(&mut self, cfg: PeerConfig, down: watch::Sender<bool>, state: watch::Sender<State>) {
        let Some(timers) = cfg.bfd else { return };
        self.remove(&cfg.name);
        let multihop = cfg.multihop.is_some();
        let v6 = cfg.address.is_ipv6();
        self.listen(v6, multihop);
        let socket = match self.binder.bfd_source(&cfg) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %cfg.name, error = %e, reason = "bfdSocket",
                    "BFD cannot open its source socket; the BGP session runs without BFD");
                return;
            }
        };
        let mut disc = self.next_disc;
        while disc == 0 || self.by_disc.contains_key(&disc) {
            disc = disc.wrapping_add(1);
        }
        self.next_disc = disc.wrapping_add(1);
        let session = Session::new(
            disc,
            Timers {
                desired_min_tx: timers.interval,
                required_min_rx: timers.interval,
                detect_mult: timers.multiplier.max(1),
            },
            Instant::now(),
        );
        Metrics::set_state(
            &self.metrics.bfd_state,
            &BFD_STATES,
            &cfg.name,
            word(State::Down),
        );
        state.send_replace(State::Down);
        let dst = SocketAddr::new(cfg.address, self.binder.bfd_port(multihop));
        self.by_disc.insert(disc, cfg.name.clone());
        self.peers.insert(
            cfg.name,
            Peer {
                session,
                socket,
                dst,
                multihop,
                down,
                state,
                disc,
            },
        );
    }

    fn remove(&mut self, name: &str) {
        if let Some(mut p) = self.peers.remove(name) {
            self.by_disc.remove(&p.disc);
            let actions = p.session.set_admin_down(true, Instant::now());
            for a in actions {
                if let Action::Send(c) = a {
                    let _ = p.socket.try_send_to(&c.encode(), p.dst);
                }
            }
        }
    }

    /// Opens the receive socket of a family and mode once, and a task that reads it.
    fn listen(&mut self, v6: bool, multihop: bool) {
        if self.listening.contains_key(&(v6, multihop)) {
            return;
        }
        let socket = match self.binder.bfd_listen(v6, multihop) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(v6, multihop, error = %e, reason = "bfdSocket",
                    "BFD cannot open its receive socket (is another BFD daemon running?); \
                     BFD sessions of this kind stay down and do not affect BGP");
                return;
            }
        };
        let stop = CancellationToken::new();
        self.listening.insert((v6, multihop), stop.clone());
        let tx = self.rx_tx.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let r = tokio::select! {
                    () = stop.cancelled() => return,
                    r = socket.readable() => r,
                };
                if r.is_err() {
                    return;
                }
                let got = socket.try_io(tokio::io::Interest::READABLE, || {
                    sys::ttl::recv_from_ttl(&socket, &mut buf)
                });
                let Ok((n, from, ttl)) = got else { continue };
                let r = Received {
                    octets: buf[..n].to_vec(),
                    from,
                    ttl,
                    multihop,
                };
                if tx.try_send(r).is_err() {
                    Metrics::count(&metrics.bfd_dropped, "queueFull");
                }
            }
        });
    }

    fn received(&mut self, r: Received) {
        let c = match Control::decode(&r.octets) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(from = %r.from, error = %e, "BFD packet dropped");
                Metrics::count(&self.metrics.bfd_dropped, "malformed");
                return;
            }
        };
        // RFC 5881 §5: single hop "MUST ... discard" a packet whose TTL is not 255.
        if !r.multihop && r.ttl != Some(255) {
            Metrics::count(&self.metrics.bfd_dropped, "ttl");
            return;
        }
        let from = r.from.ip().to_canonical();
        let name = if c.your_disc != 0 {
            self.by_disc.get(&c.your_disc).cloned()
        } else {
            self.peers
                .iter()
                .find(|(_, p)| p.dst.ip() == from && p.multihop == r.multihop)
                .map(|(n, _)| n.clone())
        };
        let Some(name) = name else {
            Metrics::count(&self.metrics.bfd_dropped, "unknownPeer");
            return;
        };
        let Some(p) = self.peers.get_mut(&name) else {
            return;
        };
        if p.dst.ip() != from {
            Metrics::count(&self.metrics.bfd_dropped, "unknownPeer");
            return;
        }
        let actions = p.session.receive(&c, Instant::now());
        self.perform(&name, actions);
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.next_deadline() <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(p) = self.peers.get_mut(&name) {
                let actions = p.session.tick(now);
                self.perform(&name, actions);
            }
        }
    }

    fn perform(&mut self, name: &str, actions: Vec<Action>) {
        let Some(p) = self.peers.get_mut(name) else {
            return;
        };
        for a in actions {
            match a {
                Action::Send(c) => {
                    if let Err(e) = p.socket.try_send_to(&c.encode(), p.dst) {
                        tracing::debug!(peer = name, error = %e, "BFD send failed");
                    }
                }
                Action::Changed { from, to, diag } => {
                    if to == State::Up || from == State::Up {
                        tracing::info!(
                            peer = name,
                            from = word(from),
                            to = word(to),
                            diag,
                            reason = if to == State::Up { "bfdUp" } else { "bfdDown" },
                            "BFD session changed"
                        );
                    }
                    p.state.send_replace(to);
                    Metrics::set_state(&self.metrics.bfd_state, &BFD_STATES, name, word(to));
                    self.metrics
                        .bfd_transitions
                        .get_or_create(&StateLabels {
                            peer: name.to_string(),
                            state: word(to).to_string(),
                        })
                        .inc();
                    if to == State::Up {
                        p.down.send_replace(false);
                    } else if from == State::Up {
                        p.down.send_replace(true);
                    }
                }
            }
        }
    }
}
