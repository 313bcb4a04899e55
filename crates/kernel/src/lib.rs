//! The kernel data path: services on `forwarding: kernel` (or `auto`, see
//! [`model::Service::path`]) are DNATed by nftables instead of relayed by the proxy.
//!
//! # Layout
//! - [`plan`] (pure, no I/O): desired state + health → [`plan::Ruleset`], rendered to nft's own
//!   syntax; [`plan::diff`] turns two rulesets into the smallest [`plan::Batch`]: only the
//!   changed map elements on a health change, the whole table on start and reload.
//! - [`nft`]: runs nft commands, one atomic transaction per batch, in-process through
//!   libnftables (`sys::nftables`, loaded with `dlopen`) or, without the library, `nft -f -`;
//!   sends a health change's map elements as one raw netlink batch (`sys::nft_set`); reads
//!   the table back as JSON.
//! - [`driver`]: the thin tokio driver: applies batches on each desired generation and health
//!   change and each outlier ejection or its end, drains removed backends (their conntrack
//!   entries are deleted after `connection.drain_timeout`), reads the per-backend counters into
//!   [`metrics`], and removes the table on a graceful stop.
//! - [`passive`] (pure): passive outlier detection from conntrack events: each new TCP flow's
//!   outcome (connected, refused, timeout) fed to the proxy's outlier state machine
//!   ([`lb::outlier`]); a feed task reads the events (`sys::conntrack::events`) into a bounded
//!   queue.
//!
//! # Why nft's own syntax through libnftables
//! `rustables` (netlink directly) is GPL-3.0, which `deny.toml` refuses. The `nftables` crate
//! builds nft's JSON and still runs the `nft` binary, so it would add a dependency without
//! removing the process. portico already renders nft syntax for the handover
//! (`agent::handover`); the kernel path does the same, and hands each batch to libnftables, the
//! library `nft` itself is a thin front end of: it parses the batch and sends it as one netlink
//! transaction (all or nothing), as `nft -f -` would. The library is loaded at run time
//! (`dlopen("libnftables.so.1")`, no link-time dependency: a host without it still runs
//! portico); without it each batch runs `nft -f -`. Read-back (tests, counters)
//! is `list … ` with JSON output parsed with `serde_json`. The conntrack deletes of a drained
//! backend speak netlink directly (`sys::conntrack`, `NETLINK_NETFILTER`); see [`driver`].
//!
//! # Latency of a health change
//! Measured from the check result to the batch applied (log stamps,
//! `crates/portico/tests/kernel_path.rs`, 20 down/up changes of one backend of two, 1021-slot
//! maps, shared 2-core VM). The "kernel path applied" log line splits each batch into
//! planning, waiting for the nft thread, the nft call and the driver's wake-up.
//! - `nft -f -` per batch (`PORTICO_NFT=command`): median 52-65 ms, max 78-113 ms at load 8 (a
//!   fork, an exec and the loading of nft and its libraries each time).
//! - libnftables in-process (`PORTICO_NFT=library`), the driver's loop and the nft thread at
//!   nice -10: median 5.5-20 ms, max 11-68 ms at load 4.6-10 (68: libnftables itself took
//!   61 ms: it parses and evaluates every element and refreshes its cache first).
//! - Now: a health change's slots go to the kernel as one raw netlink batch
//!   ([`nft::apply_elements`], `sys::nft_set`), on a socket kept open per namespace (closing
//!   one right after a batch waited 5-32 ms for nf_tables to release the transaction, an RCU
//!   grace period). 24 runs of the test at load 2.9-6.1, 12 of them beside a release build:
//!   median 2.1-5.8 ms, max 3.7-28.8 ms (libnftables interleaved with them: max 8-39 ms).
//!   Counters are read in a task of their own, so a change never waits behind that listing.
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
//! Outlier ejection: the kernel relays no connection, but conntrack sees each flow's handshake;
//! [`passive`] turns its events into outcomes and ejections, which leave the maps in one batch
//! (ejected backends are planned as down). Circuit breaking (connection limits and their queue)
//! needs the proxy: a service that sets it runs there (`connectionLimits`).

pub mod driver;
pub mod ecmp;
mod feed;
pub mod metrics;
pub mod nft;
pub mod passive;
pub mod plan;

pub use driver::{Kernel, Options};
pub use plan::{Batch, MapChange, Ruleset, diff, plan};
