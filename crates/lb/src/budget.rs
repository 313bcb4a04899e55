//! The node's connection budget, derived from its file-descriptor limit. Pure arithmetic.
//!
//! Every relayed TCP connection holds two descriptors (client and backend), every UDP session
//! one (its connected socket towards the backend). Running out of descriptors is not a backend
//! failure but it looks like one (health checks fail with `EMFILE`), so the data path may only
//! use what is left after a reserve for everything else the node does:
//!
//! ```text
//! reserved = min(512 + nofile / 10, nofile / 2)
//!     512: DNS over TCP (256), admin connections (64), listeners, gossip, config reads,
//!     health checks in flight, logs; the tenth grows with large configurations.
//! pool            = nofile − reserved
//! udp_sessions    = pool / 4             (one descriptor each)
//! tcp_connections = (pool − udp_sessions) / 2   (two descriptors each)
//! ```
//!
//! At a limit of 1,024 (a common soft default; `sys::limits::raise_nofile_limit` lifts it at
//! start) that is 192 TCP connections and 128 UDP sessions; at 20,000, 6,558 and 4,372; at
//! 1,048,576, 353,703 and 235,801. UDP and TCP draw on separate parts of the pool, so a UDP
//! flood from many source addresses cannot take descriptors from TCP clients.

/// Descriptors kept for everything but relayed connections, before the proportional part.
pub const RESERVED_BASE: u64 = 512;

/// The budget: how many relayed TCP connections and UDP sessions the node holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The file-descriptor limit it was derived from.
    pub nofile: u64,
    /// Descriptors kept for everything else.
    pub reserved: u64,
    /// Relayed TCP connections, over every service together. Also the default
    /// `circuit_breaker.max_service_connections`.
    pub tcp_connections: u32,
    /// UDP sessions, over every service together.
    pub udp_sessions: u32,
}

impl Budget {
    /// The budget for a descriptor limit (`u64::MAX`: unlimited, treated as 2²⁰).
    pub fn from_nofile(nofile: u64) -> Self {
        let n = if nofile == u64::MAX { 1 << 20 } else { nofile };
        let reserved = (RESERVED_BASE + n / 10).min(n / 2);
        let pool = n - reserved;
        let udp = pool / 4;
        let tcp = (pool - udp) / 2;
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            nofile,
            reserved,
            tcp_connections: clamp(tcp),
            udp_sessions: clamp(udp),
        }
    }

    /// The budget for this process's current soft `RLIMIT_NOFILE`.
    pub fn from_process() -> Self {
        Self::from_nofile(sys::limits::nofile_limit())
    }

    /// Descriptors the data path may hold at most under this budget.
    pub fn data_path_fds(&self) -> u64 {
        2 * u64::from(self.tcp_connections) + u64::from(self.udp_sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_figures() {
        let b = Budget::from_nofile(1024);
        assert_eq!(
            (b.reserved, b.tcp_connections, b.udp_sessions),
            (512, 192, 128)
        );
        let b = Budget::from_nofile(20_000);
        assert_eq!((b.tcp_connections, b.udp_sessions), (6558, 4372));
        let b = Budget::from_nofile(1 << 20);
        assert_eq!((b.tcp_connections, b.udp_sessions), (353_703, 235_801));
    }

    #[test]
    fn the_reserve_is_never_spent_whatever_the_limit() {
        for n in (0..5000u64).chain([65_535, 1 << 20, 1 << 40, u64::MAX]) {
            let b = Budget::from_nofile(n);
            let limit = if n == u64::MAX { 1 << 20 } else { n };
            assert!(b.data_path_fds() + b.reserved <= limit, "{n}: {b:?}");
            assert!(b.reserved >= RESERVED_BASE.min(limit / 2), "{n}: {b:?}");
        }
    }
}
