//! BGP-4 and BFD wire formats: the codecs under portico's BGP speaker (issue 12).
//!
//! - [`message`]: BGP-4 messages (RFC 4271) with the capabilities and attributes an
//!   announce-only speaker needs — 4-octet AS numbers (RFC 6793), multiprotocol IPv4/IPv6
//!   unicast (RFC 4760), route refresh (RFC 2918), graceful restart (RFC 4724), communities
//!   (RFC 1997) and large communities (RFC 8092). Decoding errors carry the NOTIFICATION code
//!   and subcode the session must send (RFC 4271 §6), so a hostile peer gets the right answer
//!   and never a panic.
//! - [`bfd`]: the BFD control packet (RFC 5880 §4.1) with the reception checks of §6.8.6.
//!
//! Pure: bytes in, values out, and back. No I/O, no clock; the session state machines and their
//! tokio drivers build on these.

pub mod bfd;
pub mod driver;
pub mod message;
mod prefix;
pub mod session;
pub mod speaker;

pub use prefix::Prefix;
pub use speaker::{BfdTimers, PeerConfig, RouteAttrs, Routes, SessionStatus, Speaker};
