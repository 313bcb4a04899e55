//! portico's BGP speaker with BFD (issue 12): wire formats, session state machines, drivers.
//!
//! - [`message`]: BGP-4 messages (RFC 4271) with the capabilities and attributes an
//!   announce-only speaker needs — 4-octet AS numbers (RFC 6793), multiprotocol IPv4/IPv6
//!   unicast (RFC 4760), route refresh (RFC 2918), graceful restart (RFC 4724), communities
//!   (RFC 1997) and large communities (RFC 8092). Decoding errors carry the NOTIFICATION code
//!   and subcode the session must send (RFC 4271 §6), so a hostile peer gets the right answer
//!   and never a panic.
//! - [`bfd`]: the BFD control packet (RFC 5880 §4.1) with the reception checks of §6.8.6, and
//!   the pure BFD session ([`bfd::session`]).
//! - [`session`]: the pure BGP session of an announce-only speaker; [`driver`]: its tokio
//!   driver for one peer.
//! - [`speaker`]: the [`Speaker`]: every configured peer (active or passive, TCP MD5, TTL
//!   rules, BFD per peer) announcing the same [`Routes`], with status and metrics.
//!
//! The codecs and session machines are pure (bytes and time in, values and actions out); only
//! the drivers do I/O, and only through what the caller injects.

pub mod bfd;
pub mod driver;
pub mod message;
mod prefix;
pub mod session;
pub mod speaker;

pub use prefix::Prefix;
pub use speaker::{BfdTimers, PeerConfig, RouteAttrs, Routes, SessionStatus, Speaker};
