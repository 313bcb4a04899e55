//! Pool status reports: usage, `Valid`, `Overlapping` and `Orphans`, written only on change.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde_json::json;

use super::{Action, State};
use crate::crd::IPPoolStatus;

impl State {
    /// Patches for pools whose status differs from the allocator's report.
    pub(super) fn pool_statuses(&self, now: Timestamp) -> Vec<Action> {
        let mut out = Vec::new();
        for r in self.alloc.report() {
            let Some(pool) = self.pools.get(&r.name) else {
                continue;
            };
            let old = pool.status.clone().unwrap_or_default();
            let sat = |v: u128| i64::try_from(v).unwrap_or(i64::MAX);
            let keep = |t: &str, status: &str| {
                old.conditions
                    .iter()
                    .find(|c| c.type_ == t && c.status == status)
                    .map(|c| c.last_transition_time.clone())
                    .unwrap_or(Time(now))
            };
            let mk = |t: &str, ok: bool, reason: &str, message: String| {
                let status = if ok { "True" } else { "False" };
                Condition {
                    type_: t.into(),
                    status: status.into(),
                    reason: reason.into(),
                    message,
                    observed_generation: pool.metadata.generation,
                    last_transition_time: keep(t, status),
                }
            };
            let valid = match &r.invalid {
                None => mk("Valid", true, "Valid", String::new()),
                Some(e) => mk("Valid", false, "InvalidSpec", e.clone()),
            };
            let overlapping = if r.overlapping.is_empty() {
                mk("Overlapping", false, "NoOverlap", String::new())
            } else {
                mk(
                    "Overlapping",
                    true,
                    "Overlapping",
                    format!(
                        "shares addresses with the older pool {}; this pool is refused and hands out no new address until the overlap is removed (the older pool stays in service)",
                        r.overlapping.join(", ")
                    ),
                )
            };
            let orphans: Vec<IpAddr> = self
                .homes
                .iter()
                .filter(|(ip, pool)| **pool == r.name && !self.alloc.in_a_pool(**ip))
                .map(|(ip, _)| *ip)
                .filter(|ip| self.alloc.holdings().values().any(|v| v.contains(ip)))
                .collect();
            let orphaned = if orphans.is_empty() {
                mk("Orphans", false, "NoOrphans", String::new())
            } else {
                let held: Vec<String> = orphans
                    .iter()
                    .map(|ip| {
                        let by: Vec<String> = self
                            .alloc
                            .holdings()
                            .iter()
                            .filter(|(_, v)| v.contains(ip))
                            .map(|(k, _)| k.to_string())
                            .collect();
                        format!("{ip} ({})", by.join(", "))
                    })
                    .collect();
                mk(
                    "Orphans",
                    true,
                    "AddressesOutsidePool",
                    format!(
                        "Services hold addresses this pool no longer contains: {}; they stay until released and are never given to anyone else",
                        held.join("; ")
                    ),
                )
            };
            let new = IPPoolStatus {
                assigned_ipv4: sat(r.assigned_v4),
                available_ipv4: sat(r.available_v4),
                assigned_ipv6: sat(r.assigned_v6),
                available_ipv6: sat(r.available_v6),
                conditions: vec![valid, overlapping, orphaned],
                orphans: orphans.iter().map(|ip| ip.to_string()).collect(),
            };
            if new != old {
                // A pool that turned invalid or overlapping also gets an Event, once.
                for c in new.conditions.iter().filter(|c| {
                    (c.type_ == "Valid" && c.status == "False")
                        || (c.type_ == "Overlapping" && c.status == "True")
                }) {
                    let same = old.conditions.iter().any(|o| {
                        o.type_ == c.type_ && o.status == c.status && o.message == c.message
                    });
                    if !same {
                        out.push(Action::Event {
                            reference: pool.object_ref(&()),
                            warning: true,
                            reason: if c.type_ == "Valid" {
                                "InvalidPool"
                            } else {
                                "Overlapping"
                            },
                            note: c.message.clone(),
                        });
                    }
                }
                out.push(Action::PatchPoolStatus {
                    name: r.name.clone(),
                    patch: json!({ "status": new }),
                });
            }
        }
        out
    }
}
