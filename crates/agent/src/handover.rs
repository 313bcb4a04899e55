//! Connection-preserving handover: after taking a VIP over from a live node, forward the TCP
//! segments of connections this node does not know to the previous owner for a short window.
//!
//! # Why
//! An L2 move is instantaneous for the client: the gratuitous ARP (unsolicited NA) rewrites its
//! neighbour entry, and from then on *every* segment to the VIP reaches the new owner, also
//! those of connections the previous owner accepted a moment earlier. The new owner's kernel
//! knows nothing about them and answers with a reset, so a connection in flight during a
//! graceful stop, a preemptive return or a rebalance fails although both nodes are up and the
//! previous owner still delivers the VIP locally (it keeps it on `lo` for the release grace).
//! keepalived loses these connections (measured in `portico lab`); kube-vip's and MetalLB's L2
//! modes move the address the same way, without forwarding.
//!
//! # How
//! For `window` after the takeover (the previous owner's release grace), a netfilter rule on the
//! new owner sends a copy of every TCP segment for the VIP that arrives on the announcing
//! interface, carries no SYN, and belongs to no connection this node tracks (`ct state new`
//! for a bare ACK or data, which conntrack picks up; `invalid` for a FIN or RST, which it does
//! not), to the previous owner's address on that interface (`dup to`, which resolves
//! its MAC like a gateway) and drops the original. New connections (SYN) stay here; segments of
//! connections accepted here are tracked from their SYN and stay here too. The rule exists only
//! during the window, so connection tracking runs in the node's namespace only then.
//!
//! ```text
//! table ip portico_handover {
//!   chain prerouting {
//!     type filter hook prerouting priority -150; policy accept;   # after conntrack (-200)
//!     iifname "eth0" ip daddr 10.99.0.100 tcp flags & syn == 0 ct state new
//!         dup to 10.99.0.11 device "eth0" drop
//!     iifname "eth0" ip daddr 10.99.0.100 tcp flags & (fin | rst) != 0 ct state invalid
//!         dup to 10.99.0.11 device "eth0" drop
//!   }
//! }
//! ```
//!
//! The ruleset is replaced atomically (`nft -f -` is one transaction) on every change and
//! removed when no window is open. Without a usable `nft` (not installed, no CAP_NET_ADMIN) the
//! agent logs once why forwarding is off and hands over as before.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Errors applying the forwarding rules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nft` could not be started (not installed?).
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` rejected the ruleset.
    #[error("nft refused the handover rules (needs CAP_NET_ADMIN and nf_tables with dup): {0}")]
    Refused(String),
}

/// One open window: segments for `vip` arriving on `iface` go to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The VIP taken over.
    pub vip: IpAddr,
    /// The previous owner's address on `iface` (same family as `vip`).
    pub to: IpAddr,
    /// The announcing interface.
    pub iface: String,
}

/// The nftables script that makes the kernel's state exactly `forwards`: both tables are
/// created (so that deleting them cannot fail), deleted, and re-created only with rules.
pub fn render(forwards: &[Forward]) -> String {
    let mut s = String::new();
    for (family, daddr) in [("ip", "ip"), ("ip6", "ip6")] {
        s.push_str(&format!(
            "table {family} portico_handover\ndelete table {family} portico_handover\n"
        ));
        let rules: Vec<&Forward> = forwards
            .iter()
            .filter(|f| f.vip.is_ipv4() == (family == "ip") && f.to.is_ipv4() == f.vip.is_ipv4())
            .collect();
        if rules.is_empty() {
            continue;
        }
        s.push_str(&format!(
            "table {family} portico_handover {{\n  chain prerouting {{\n    \
             type filter hook prerouting priority -150; policy accept;\n"
        ));
        for f in rules {
            let head = format!("    iifname \"{}\" {daddr} daddr {}", f.iface, f.vip);
            let tail = format!("counter dup to {} device \"{}\" drop\n", f.to, f.iface);
            // segments without a connection here: conntrack picks a bare ACK or data segment up
            // as `new`, and calls a FIN or RST without one `invalid`
            s.push_str(&format!("{head} tcp flags & syn == 0 ct state new {tail}"));
            s.push_str(&format!(
                "{head} tcp flags & (fin | rst) != 0 ct state invalid {tail}"
            ));
        }
        s.push_str("  }\n}\n");
    }
    s
}

/// Whether `name` is safe to quote in a ruleset (interface names: no quotes, no spaces).
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b))
}

struct State {
    open: BTreeMap<IpAddr, (Forward, Instant)>,
    disabled: Option<String>,
}

/// The node's handover windows (one per agent, shared by its announcers).
#[derive(Clone)]
pub struct Handover {
    state: Arc<Mutex<State>>,
    nft: Arc<str>,
    opened: Counter,
    off: Gauge,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handover")
    }
}

impl Handover {
    /// Handover through the `nft` binary on `PATH`.
    pub fn new() -> Self {
        Self::with_binary("nft")
    }

    /// Handover through the given `nft` binary.
    pub fn with_binary(nft: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                open: BTreeMap::new(),
                disabled: None,
            })),
            nft: nft.into(),
            opened: Counter::default(),
            off: Gauge::default(),
        }
    }

    /// Counts forwarding windows in `opened` and sets `off` to 1 when forwarding is off.
    pub fn with_metrics(mut self, opened: Counter, off: Gauge) -> Self {
        self.opened = opened;
        self.off = off;
        self
    }

    /// Why forwarding is off, if it is.
    pub async fn disabled(&self) -> Option<String> {
        self.state.lock().await.disabled.clone()
    }

    /// Makes the kernel match the open windows, removing rules a crashed predecessor may have
    /// left (at start, when none are open yet).
    pub async fn sync(&self) {
        let mut st = self.state.lock().await;
        self.apply(&mut st).await;
    }

    /// Closes every window and removes the rules (the agent stops).
    pub async fn clear(&self) {
        let mut st = self.state.lock().await;
        if !st.open.is_empty() {
            st.open.clear();
            self.apply(&mut st).await;
        }
    }

    /// Opens a window of `window` for each of `forwards`; returns once the rules are in place
    /// (or forwarding is off). The rules go away by themselves when the window ends.
    pub async fn open(&self, forwards: Vec<Forward>, window: Duration) {
        let forwards: Vec<Forward> = forwards
            .into_iter()
            .filter(|f| {
                let ok = plain(&f.iface) && f.vip.is_ipv4() == f.to.is_ipv4();
                if !ok {
                    debug!(
                        ?f,
                        "handover forwarding skipped: interface name or address family"
                    );
                }
                ok
            })
            .collect();
        if forwards.is_empty() {
            return;
        }
        let until = Instant::now() + window;
        {
            let mut st = self.state.lock().await;
            if st.disabled.is_some() {
                return;
            }
            for f in &forwards {
                self.opened.inc();
                debug!(vip = %f.vip, to = %f.to, iface = %f.iface, ?window, "forwarding in-flight connections to the previous owner");
                st.open.insert(f.vip, (f.clone(), until));
            }
            self.apply(&mut st).await;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let mut st = me.state.lock().await;
            let now = Instant::now();
            let before = st.open.len();
            st.open.retain(|_, (_, u)| *u > now);
            if st.open.len() != before {
                me.apply(&mut st).await;
            }
        });
    }

    /// Closes the window of `vip` at once (the VIP was released again).
    pub async fn close(&self, vip: IpAddr) {
        let mut st = self.state.lock().await;
        if st.open.remove(&vip).is_some() {
            self.apply(&mut st).await;
        }
    }

    async fn apply(&self, st: &mut State) {
        if st.disabled.is_some() {
            return;
        }
        let forwards: Vec<Forward> = st.open.values().map(|(f, _)| f.clone()).collect();
        if let Err(e) = run_nft(&self.nft, &render(&forwards)).await {
            warn!(%e, "connection-preserving handover is off: connections in flight during a graceful handover may be reset");
            st.disabled = Some(e.to_string());
            self.off.set(1);
        }
    }
}

impl Default for Handover {
    fn default() -> Self {
        Self::new()
    }
}

async fn run_nft(nft: &str, script: &str) -> Result<(), Error> {
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(Error::Spawn)?;
    }
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .map_err(|_| Error::Refused("nft did not finish within 5 s".into()))?
        .map_err(Error::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(vip: &str, to: &str) -> Forward {
        Forward {
            vip: vip.parse().unwrap(),
            to: to.parse().unwrap(),
            iface: "eth0".into(),
        }
    }

    #[test]
    fn empty_state_deletes_both_tables() {
        assert_eq!(
            render(&[]),
            "table ip portico_handover\ndelete table ip portico_handover\n\
             table ip6 portico_handover\ndelete table ip6 portico_handover\n"
        );
    }

    #[test]
    fn each_family_gets_its_rules() {
        let s = render(&[
            fwd("10.99.0.100", "10.99.0.11"),
            fwd("fd00:99::100", "fd00:99::11"),
        ]);
        assert_eq!(
            s,
            "table ip portico_handover\ndelete table ip portico_handover\n\
             table ip portico_handover {\n  chain prerouting {\n    \
             type filter hook prerouting priority -150; policy accept;\n    \
             iifname \"eth0\" ip daddr 10.99.0.100 tcp flags & syn == 0 ct state new counter dup to 10.99.0.11 device \"eth0\" drop\n    \
             iifname \"eth0\" ip daddr 10.99.0.100 tcp flags & (fin | rst) != 0 ct state invalid counter dup to 10.99.0.11 device \"eth0\" drop\n  }\n}\n\
             table ip6 portico_handover\ndelete table ip6 portico_handover\n\
             table ip6 portico_handover {\n  chain prerouting {\n    \
             type filter hook prerouting priority -150; policy accept;\n    \
             iifname \"eth0\" ip6 daddr fd00:99::100 tcp flags & syn == 0 ct state new counter dup to fd00:99::11 device \"eth0\" drop\n    \
             iifname \"eth0\" ip6 daddr fd00:99::100 tcp flags & (fin | rst) != 0 ct state invalid counter dup to fd00:99::11 device \"eth0\" drop\n  }\n}\n"
        );
    }

    #[test]
    fn mixed_families_are_never_rendered() {
        assert!(!render(&[fwd("10.99.0.100", "fd00:99::11")]).contains("dup"));
    }

    #[test]
    fn only_plain_interface_names_are_quoted_into_rules() {
        assert!(plain("eth0") && plain("enp3s0f1") && plain("br-lan.10"));
        assert!(!plain("eth0\" drop") && !plain("") && !plain("a b"));
    }

    #[tokio::test]
    async fn a_missing_nft_turns_forwarding_off_with_the_reason() {
        let h = Handover::with_binary("/nonexistent/nft");
        h.open(
            vec![fwd("10.99.0.100", "10.99.0.11")],
            Duration::from_secs(1),
        )
        .await;
        let why = h.disabled().await.expect("disabled");
        assert!(why.contains("install the nftables package"), "{why}");
    }
}
