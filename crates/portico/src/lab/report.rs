//! The lab's results: one [`Round`] per fault, and the summary table printed at the end.

use std::io::Write as _;

use super::LabArgs;

/// One measured round. Times are ms after the fault.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(super) struct Round {
    pub(super) system: String,
    pub(super) scenario: String,
    pub(super) round: usize,
    /// The health-check settings the round ran with (stated in the table).
    pub(super) checks: String,
    pub(super) old_owner: String,
    pub(super) new_owner: Option<String>,
    /// Failed probes from the fault until the settle point (in and after the window).
    pub(super) failed: usize,
    /// Failed probes that started in the window: from the fault to the first success on the
    /// new owner.
    pub(super) failed_in_window: usize,
    /// Failed probes that started after the first success on the new owner (scattered
    /// failures while the change settles).
    pub(super) failed_after_window: usize,
    /// Fault to the first probe answered by another node (first success on the new owner).
    pub(super) takeover_ms: Option<f64>,
    /// Fault to the client's ARP entry pointing at another MAC.
    pub(super) arp_ms: Option<f64>,
    /// Graceful stop: SIGTERM to the stopped process's exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stop_ms: Option<f64>,
    /// Graceful stop of portico: `arp_ignore`/`arp_announce` of the node's eth0 are back at
    /// their values from before portico first started there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sysctls_restored: Option<bool>,
    /// Graceful stop: `arp_ignore`/`arp_announce` of the node's eth0 after the exit.
    #[serde(skip)]
    pub(super) sysctls_after: Option<(String, String)>,
    /// MACs answering ARP for the VIP after the fault was repaired (must be exactly one).
    pub(super) arp_owners_after: usize,
    /// Owner after repair and settling.
    pub(super) owner_after: Option<String>,
    /// Failed probes while the repaired node came back (preemption should be make-before-break).
    pub(super) return_failed: usize,
    /// Start of each failed probe, ms after the fault (negative: started just before it).
    pub(super) failed_at_ms: Vec<f64>,
    /// Start of each failed probe after the repair, ms after the repair.
    pub(super) return_failed_at_ms: Vec<f64>,
    /// Conflicts the owner reports in /status (conflict scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) conflicts_counted: Option<u64>,
    /// Graceful stop: whether a connection opened before it still works once the client's
    /// ARP entry points at the new owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) inflight_survived: Option<bool>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// `median (min-max)` of the present values, `-` when none.
fn spread(v: Vec<f64>) -> String {
    let Some(m) = median(v.clone()) else {
        return "-".into();
    };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{m:.0} ({min:.0}-{max:.0})")
}

pub(super) fn print_table(rounds: &[Round], args: &LabArgs) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nVIP failover, {} nodes, {} rounds each; one probe at a time (the next starts at the next 10 ms tick after the previous ended), 50 ms connect timeout; ARP cache read every 2 ms",
        args.nodes, args.rounds
    );
    let _ = writeln!(
        out,
        "Window: from the fault to the first probe answered by the new owner. Times: median (min-max) ms after the fault."
    );
    let _ = writeln!(
        out,
        "| system | scenario | health checks | client ARP moved (ms) | first success on new owner (ms) | failed probes in window (total) | failed probes after window (total) | one ARP owner after repair |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rounds.iter().filter(|r| r.scenario != "ipv6") {
        let k = (r.system.clone(), r.scenario.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (s, sc) in keys {
        let rs: Vec<&Round> = rounds
            .iter()
            .filter(|r| r.system == s && r.scenario == sc)
            .collect();
        let _ = writeln!(
            out,
            "| {s} | {sc} | {} | {} | {} | {} | {} | {}/{} |",
            rs.first().map_or("", |r| r.checks.as_str()),
            spread(rs.iter().filter_map(|r| r.arp_ms).collect()),
            spread(rs.iter().filter_map(|r| r.takeover_ms).collect()),
            rs.iter().map(|r| r.failed_in_window).sum::<usize>(),
            rs.iter().map(|r| r.failed_after_window).sum::<usize>(),
            rs.iter().filter(|r| r.arp_owners_after == 1).count(),
            rs.len(),
        );
    }
    let graceful: Vec<&Round> = rounds.iter().filter(|r| r.scenario == "graceful").collect();
    if !graceful.is_empty() {
        let _ = writeln!(
            out,
            "\nGraceful stop (SIGTERM) with a connection open across it (used after the client's ARP entry moved):"
        );
        let mut systems: Vec<&str> = graceful.iter().map(|r| r.system.as_str()).collect();
        systems.dedup();
        for s in systems {
            let rs: Vec<&&Round> = graceful.iter().filter(|r| r.system == s).collect();
            let restored: Vec<bool> = rs.iter().filter_map(|r| r.sysctls_restored).collect();
            let _ = writeln!(
                out,
                "  {s}: connection survived {}/{}; SIGTERM to exit {} ms{}",
                rs.iter()
                    .filter(|r| r.inflight_survived == Some(true))
                    .count(),
                rs.len(),
                spread(rs.iter().filter_map(|r| r.stop_ms).collect()),
                if restored.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; arp_ignore/arp_announce restored after exit {}/{}",
                        restored.iter().filter(|r| **r).count(),
                        restored.len()
                    )
                },
            );
        }
    }
}
