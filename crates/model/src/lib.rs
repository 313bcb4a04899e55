//! Pure domain types of portico and its standalone configuration: no tokio, no sockets, no kube.
//!
//! # Layout
//! - [`service`]: the desired state every consumer reads (services, VIPs, ports, backends,
//!   policies), validated and with defaults filled in.
//! - [`config`]: reads the standalone YAML file into a [`service::Config`], reporting *every*
//!   error with its path, line and column, and what would be valid.
//! - [`state`]: the spine's snapshots (desired state, health and ownership observations) and the
//!   status report served on `/status`.
//! - [`events`]: the bounded event timeline (`/events`, the console), derived by diffing
//!   status reports.
//! - [`bgp`]: the `bgp:` section, each service's announce mode, and the pure decision of which
//!   VIPs this node announces by BGP.
//! - [`reload`]: which changed fields a running node can only take on a restart.
//! - [`yaml`]: a YAML tree that keeps each node's line and column, read with `saphyr-parser`.
//! - [`duration`]: human durations (`"250ms"`, `"2s"`).

pub mod bgp;
pub mod config;
pub mod duration;
pub mod events;
pub mod reload;
pub mod service;
pub mod state;
pub mod yaml;

pub use service::*;
pub use state::*;
