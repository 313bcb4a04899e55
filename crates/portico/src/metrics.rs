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
        m
    }

    /// Follows the spine: generation from `desired`, failures from `reload_error`.
    pub async fn follow(
        self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut reload_error: watch::Receiver<Option<String>>,
        shutdown: CancellationToken,
    ) {
        self.generation
            .set(desired.borrow_and_update().generation as i64);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = desired.changed() => {
                    if r.is_err() { return; }
                    self.generation.set(desired.borrow_and_update().generation as i64);
                    self.reloads.inc();
                }
                r = reload_error.changed() => {
                    if r.is_err() { return; }
                    if reload_error.borrow_and_update().is_some() {
                        self.rejected.inc();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
/// The reference of every metric the binary exports, as Markdown (kept in `docs/metrics.md`;
/// a test fails when that file is stale).
pub fn reference_markdown() -> String {
    let mut registry = Registry::default();
    ConfigMetrics::register(&mut registry);
    let _lb = lb::LoadBalancer::new(&mut registry);
    let _agent = agent::Agent::new(&mut registry);
    let _dns = dns::DnsServer::new(&mut registry);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return String::new();
    }
    let mut help = std::collections::BTreeMap::new();
    let mut kind = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("#"), Some("HELP"), Some(name), rest) => {
                help.insert(name.to_string(), rest.unwrap_or_default().to_string());
            }
            (Some("#"), Some("TYPE"), Some(name), Some(t)) => {
                kind.insert(name.to_string(), t.to_string());
            }
            _ => {}
        }
    }
    let mut out = String::from(
        "# Metrics\n\n\
         Everything `portico run` and `portico agent` export on the admin server's `/metrics`\n\
         (OpenMetrics text). Counters carry the `_total` suffix on the wire. Generated from the\n\
         code: `PORTICO_BLESS=1 cargo test -p portico metrics` rewrites this file, and the test\n\
         fails when it is stale.\n\n\
         | metric | type | meaning |\n|---|---|---|\n",
    );
    for (name, h) in &help {
        let t = kind.get(name).map(String::as_str).unwrap_or("");
        out.push_str(&format!("| `{name}` | {t} | {} |\n", h.replace('|', "\\|")));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_reference_is_current() {
        let want = super::reference_markdown();
        assert!(want.contains("portico_lb_"), "{want}");
        assert!(want.contains("portico_dns_"), "{want}");
        assert!(
            want.contains("portico_agent_handover_forwarding_off"),
            "{want}"
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md");
        if std::env::var_os("PORTICO_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write docs/metrics.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/metrics.md is stale: run `PORTICO_BLESS=1 cargo test -p portico metrics`"
        );
    }
}
