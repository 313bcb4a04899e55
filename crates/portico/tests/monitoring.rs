//! `deploy/monitoring/`: the alert rules pass `promtool check rules` (Debian `prometheus`), and
//! the dashboard and the rules name only metrics that `docs/metrics.md` lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The metric names `docs/metrics.md` lists (first column of its table).
fn documented() -> BTreeSet<String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// Every `portico_…` identifier in `text`, with the suffixes the exposition adds (`_total`,
/// `_bucket`, `_sum`, `_count`, `_created`) taken off.
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("portico_") {
        // an identifier starts here only if the previous character is not part of one
        let before = text.len() - rest.len() + i;
        let prev = text[..before].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            let mut name = &tail[..end];
            for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
                if let Some(n) = name.strip_suffix(suffix) {
                    name = n;
                    break;
                }
            }
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn undocumented(text: &str, docs: &BTreeSet<String>) -> Vec<String> {
    named(text)
        .into_iter()
        .filter(|n| !docs.contains(n))
        .collect()
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/monitoring/dashboard.json")).expect("dashboard JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard with its panels");
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_and_the_rules_name_only_documented_metrics() {
    let docs = documented();
    assert!(docs.len() > 30, "docs/metrics.md read: {docs:?}");
    let exprs = dashboard_exprs();
    for e in &exprs {
        assert!(
            !named(e).is_empty(),
            "a panel without a portico metric: {e}"
        );
        let bad = undocumented(e, &docs);
        assert!(
            bad.is_empty(),
            "dashboard names {bad:?}, not in docs/metrics.md: {e}"
        );
    }
    let rules = read("deploy/monitoring/alerts.yaml");
    let bad = undocumented(&rules, &docs);
    assert!(
        bad.is_empty(),
        "alerts.yaml names {bad:?}, not in docs/metrics.md"
    );
    // every alert the issue asks for is there
    for alert in [
        "PorticoPoolNearlyExhausted",
        "PorticoVipWithoutOwner",
        "PorticoVipTwoOwners",
        "PorticoBackendsAllDown",
        "PorticoReloadFailing",
        "PorticoGossipAuthDrops",
        "PorticoAgentNotReady",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}

#[test]
fn the_name_check_catches_a_metric_the_docs_do_not_list() {
    let docs = documented();
    let expr = "sum(rate(portico_lb_bytes_total[1m])) / sum(portico_lb_no_such_thing_total)";
    assert_eq!(undocumented(expr, &docs), ["portico_lb_no_such_thing"]);
    assert_eq!(
        named("histogram_quantile(0.9, rate(portico_node_vip_ownerless_seconds_bucket[5m]))"),
        BTreeSet::from(["portico_node_vip_ownerless_seconds".to_string()])
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = match Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join("deploy/monitoring/alerts.yaml"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            if std::env::var_os("PORTICO_CI").is_some() {
                panic!("needs promtool (Debian package prometheus): {e}");
            }
            eprintln!("skipped: needs promtool (apt-get install prometheus): {e}");
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let out = match Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo().join("deploy/monitoring/alerts.test.yaml"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            if std::env::var_os("PORTICO_CI").is_some() {
                panic!("needs promtool (Debian package prometheus): {e}");
            }
            eprintln!("skipped: needs promtool (apt-get install prometheus): {e}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
