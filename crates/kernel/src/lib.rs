//! The kernel data path: services on `forwarding: kernel` (or `auto`, see
//! [`model::Service::path`]) are DNATed by nftables instead of relayed by the proxy.
//!
//! # Layout
//! - [`plan`] (pure, no I/O): desired state + health → [`plan::Ruleset`], rendered to nft's own
//!   syntax; [`plan::diff`] turns two rulesets into the smallest [`plan::Batch`]: only the
//!   changed map elements on a health change, the whole table on start and reload.
//! - [`nft`]: runs `nft -f -` (one atomic transaction per batch) and reads the table back
//!   with `nft -j`.
//! - [`driver`]: the thin tokio driver: applies batches on each desired generation and health
//!   change, drains removed backends (their conntrack entries are deleted after
//!   `connection.drain_timeout`), reads the per-backend counters into [`metrics`], and removes
//!   the table on a graceful stop.
//!
//! # Why nft's own syntax through `nft -f -`
//! `rustables` (netlink directly) is GPL-3.0, which `deny.toml` refuses. The `nftables` crate
//! builds nft's JSON and still runs the `nft` binary, so it would add a dependency without
//! removing the process. portico already renders nft syntax for the handover
//! (`agent::handover`); the kernel path does the same: a batch is one `nft -f -` run, which nft
//! applies as one netlink transaction (all or nothing). So "via netlink" is honest only in that
//! sense: nft talks netlink to the kernel, portico talks to nft. Read-back (tests, counters) is
//! `nft -j list …` parsed with `serde_json`. The conntrack deletes of a drained backend do speak
//! netlink directly (`sys::conntrack`, `NETLINK_NETFILTER`); see [`driver`].
//!
//! # The table
//! One table, `inet portico`, owned by portico. Start replaces it in one transaction
//! (`add table` + `delete table` + the new table), so stale state left by a crash is repaired
//! and no other table is ever listed or touched. A graceful stop deletes it.
//!
//! Per service port and VIP family, a map `slot → backend address . port` holds the Maglev
//! table ([`lb::maglev`], the proxy's algorithm and weights) of the serving backends of that
//! family; a rule in chain `services` (jumped to from the `prerouting` and `output` nat hooks,
//! so clients on the node are balanced too) DNATs `VIP:port` to the entry at
//! `jhash(saddr . sport . daddr . dport) mod size`. Conntrack keeps established flows where
//! they are. The default size is [`plan::DEFAULT_TABLE_SIZE`] (1021 slots, prime): measured
//! here, replacing half of a 4093-slot map took 90-120 ms under load and a 1021-slot one
//! 30 ms, and the health budget is 50 ms; the cost is granularity (a backend's share is exact
//! to 1/1021 rather than the proxy's 1/65537).
//!
//! Return path: `masquerade` in `postrouting` for flows DNATed to a service VIP (SNAT to the
//! node's address on the way to the backend), unless the service sets
//! `keep_client_address`, whose backends must route replies through the node.
//!
//! Outlier ejection and circuit breaking need the proxy's view of each connection; the kernel
//! sees none, so they do not apply on this path (active health checks do).

pub mod driver;
pub mod ecmp;
pub mod metrics;
pub mod nft;
pub mod plan;

pub use driver::{Kernel, Options};
pub use plan::{Batch, Ruleset, diff, plan};
