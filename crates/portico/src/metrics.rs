//! The binary's own metrics: configuration generation and reloads, derived from the spine.

use std::sync::Arc;

use model::Desired;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Configuration metrics.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    generation: Gauge,
    reloads: Counter,
    rejected: Counter,
    failing: Gauge,
}

impl ConfigMetrics {
    /// Registers under `portico_config_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("portico_config");
        r.register(
            "generation",
            "Generation of the applied configuration",
            m.generation.clone(),
        );
        r.register(
            "reloads",
            "Configurations applied after the first",
            m.reloads.clone(),
        );
        r.register(
            "reload_failures",
            "Reloads rejected as invalid (the running config was kept)",
            m.rejected.clone(),
        );
        r.register(
            "reload_failing",
            "1 while the last reload was rejected (the running config is kept), 0 once one applies",
            m.failing.clone(),
        );
        m
    }

    /// Follows the spine: reloads from `desired` (published generations), the generation from
    /// `applied` (the one the balancer runs, which `/status` reports too), failures from
    /// `reload_error`.
    pub async fn follow(
        self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut applied: watch::Receiver<u64>,
        mut reload_error: watch::Receiver<Option<String>>,
        shutdown: CancellationToken,
    ) {
        desired.borrow_and_update();
        self.generation.set(gauge(*applied.borrow_and_update()));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = desired.changed() => {
                    if r.is_err() { return; }
                    desired.borrow_and_update();
                    self.reloads.inc();
                }
                r = applied.changed() => {
                    if r.is_err() { return; }
                    self.generation.set(gauge(*applied.borrow_and_update()));
                }
                r = reload_error.changed() => {
                    if r.is_err() { return; }
                    let failing = reload_error.borrow_and_update().is_some();
                    if failing {
                        self.rejected.inc();
                    }
                    self.failing.set(i64::from(failing));
                }
            }
        }
    }
}

/// A generation as a gauge value (saturating; generations count reloads from 1).
fn gauge(generation: u64) -> i64 {
    i64::try_from(generation).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    /// The files that register metrics, and the prefix each registers under.
    const SOURCES: &[&str] = &[
        "crates/portico/src/metrics.rs",
        "crates/lb/src/metrics.rs",
        "crates/agent/src/lib.rs",
        "crates/dns/src/metrics.rs",
        "crates/admin/src/limits.rs",
        "crates/ipam/src/metrics.rs",
        "crates/portico/src/observe.rs",
        "crates/kernel/src/metrics.rs",
        "crates/bgp/src/speaker/metrics.rs",
        "crates/portico/src/ecmp.rs",
    ];

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// `(name, help)` of every `register("name", "help", …)` call, with its file's prefix.
    fn registered() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for f in SOURCES {
            let text = std::fs::read_to_string(root().join(f)).expect("source readable");
            // the code only, not its tests (this very parser mentions `.register(`)
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let prefix = text
                .split("sub_registry_with_prefix(\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("a prefix per file");
            for call in text.split(".register(").skip(1) {
                let mut quoted = call.split('"');
                let (Some(before), Some(name), Some(_), Some(help)) =
                    (quoted.next(), quoted.next(), quoted.next(), quoted.next())
                else {
                    continue;
                };
                if !before.trim().is_empty() {
                    continue;
                }
                out.push((format!("{prefix}_{name}"), help.to_string()));
            }
        }
        out.sort();
        out
    }

    fn reference() -> String {
        let mut out = String::from(
            "# Metrics\n\n\
             Everything `portico run` and `portico agent` export on the admin server's `/metrics`\n\
             (`portico controller`: the `portico_controller_*` series, on `--metrics-listen`)\n\
             (OpenMetrics text; counters carry the `_total` suffix on the wire, labels are listed\n\
             with each series). Generated from the registration calls in the code:\n\
             `PORTICO_BLESS=1 cargo test -p portico --bin portico metrics` rewrites this file, and\n\
             the test fails when it is stale.\n\n\
             | metric | meaning |\n|---|---|\n",
        );
        for (name, help) in registered() {
            out.push_str(&format!("| `{name}` | {} |\n", help.replace('|', "\\|")));
        }
        out
    }

    #[test]
    fn metrics_reference_is_current() {
        let names: Vec<String> = registered().into_iter().map(|(n, _)| n).collect();
        for want in [
            "portico_config_generation",
            "portico_lb_connect_failures",
            "portico_agent_handover_forwarding_off",
            "portico_dns_responses",
            "portico_bgp_updates_sent",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} not found in {names:?}"
            );
        }
        let want = reference();
        let path = root().join("docs/metrics.md");
        if std::env::var_os("PORTICO_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write docs/metrics.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/metrics.md is stale: run `PORTICO_BLESS=1 cargo test -p portico --bin portico metrics`"
        );
    }
}
