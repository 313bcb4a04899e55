//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI'16, §3.4), with weights by turn frequency.
//!
//! Invariants: the table size is prime (default [`DEFAULT_TABLE_SIZE`] = 65537), so every
//! backend's `(offset, skip)` permutation visits every slot; with equal weights each backend owns
//! ⌊M/N⌋ or ⌈M/N⌉ slots; removing one of N backends moves about 1/N of the slots.
//!
//! Hashing uses [`stable_hash`] (FNV-1a 64 followed by the splitmix64 finaliser), a named
//! algorithm that every replica and every version computes identically — never
//! `DefaultHasher`, whose algorithm is unspecified.

use std::net::IpAddr;

/// The paper's recommended prime table size for up to a few hundred backends.
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// Errors building a Maglev table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MaglevError {
    /// The table size is not a prime (permutations would not cover the table).
    #[error("maglev table size {0} is not prime")]
    NotPrime(usize),
    /// More backends than slots.
    #[error("{backends} backends do not fit a table of {size}")]
    TooManyBackends {
        /// Backends given.
        backends: usize,
        /// Table size.
        size: usize,
    },
}

/// FNV-1a 64 over `seed ‖ bytes`, then the splitmix64 finaliser for avalanche.
pub fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The hash key of a client: its address (not its port, so one client sticks to one backend).
pub fn client_hash(ip: IpAddr) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => stable_hash(0, &a.octets()),
        IpAddr::V6(a) => stable_hash(0, &a.octets()),
    }
}

/// A populated lookup table: slot → index into the backend list it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for `backends` as `(stable name, weight)`. Backends of weight 0 get no
    /// slots; an empty (or all-zero) list gives an empty table whose lookups return `None`.
    pub fn try_new(backends: &[(&str, u32)], size: usize) -> Result<Self, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::NotPrime(size));
        }
        if backends.len() >= size {
            return Err(MaglevError::TooManyBackends {
                backends: backends.len(),
                size,
            });
        }
        let m = size as u64;
        let max_w = backends.iter().map(|b| b.1).max().unwrap_or(0);
        if max_w == 0 {
            return Ok(Self { table: Vec::new() });
        }
        // Per backend: permutation (offset, skip), next index into it, and turn credit.
        let perm: Vec<(u64, u64)> = backends
            .iter()
            .map(|(name, _)| {
                let offset = stable_hash(0x6d61_676c_6576_3031, name.as_bytes()) % m;
                let skip = stable_hash(0x6d61_676c_6576_3032, name.as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut credit = vec![0u64; backends.len()];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0usize;
        'outer: loop {
            for (i, &(_, w)) in backends.iter().enumerate() {
                credit[i] += u64::from(w);
                while credit[i] >= u64::from(max_w) {
                    credit[i] -= u64::from(max_w);
                    let (offset, skip) = perm[i];
                    loop {
                        let slot = ((offset + next[i] * skip) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == size {
                        break 'outer;
                    }
                }
            }
        }
        Ok(Self { table })
    }

    /// The backend index owning `hash`, or `None` for an empty table.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }

    /// The first backend at or after `hash`'s slot that `accept` takes (for retries that must
    /// avoid backends already tried). Visits each slot at most once.
    pub fn lookup_where(&self, hash: u64, mut accept: impl FnMut(usize) -> bool) -> Option<usize> {
        let len = self.table.len();
        if len == 0 {
            return None;
        }
        let start = (hash % len as u64) as usize;
        (0..len)
            .map(|k| self.table[(start + k) % len] as usize)
            .find(|&b| accept(b))
    }

    /// The raw table (slot → backend index), for tests and diagnostics.
    pub fn slots(&self) -> &[u32] {
        &self.table
    }
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.1.{i}")).collect()
    }

    fn build(names: &[String], size: usize) -> Maglev {
        let b: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        Maglev::try_new(&b, size).unwrap()
    }

    #[test]
    fn stable_hash_is_pinned() {
        // A changed value here means every replica would disagree with older versions.
        assert_eq!(stable_hash(0, b""), stable_hash(0, b""));
        assert_ne!(stable_hash(0, b"a"), stable_hash(1, b"a"));
        assert_eq!(stable_hash(0, b"10.0.1.1"), 0x538a_2f00_8fa1_5475);
    }

    #[test]
    fn non_prime_size_is_rejected() {
        assert_eq!(
            Maglev::try_new(&[("a", 1)], 65536),
            Err(MaglevError::NotPrime(65536))
        );
    }

    #[test]
    fn empty_or_zero_weight_table_returns_none() {
        assert_eq!(Maglev::try_new(&[], 13).unwrap().lookup(7), None);
        assert_eq!(Maglev::try_new(&[("a", 0)], 13).unwrap().lookup(7), None);
    }

    #[test]
    fn weights_scale_shares() {
        let m = Maglev::try_new(&[("a", 1), ("b", 3)], 65537).unwrap();
        let b = m.slots().iter().filter(|&&s| s == 1).count() as f64;
        let share = b / 65537.0;
        assert!((share - 0.75).abs() < 0.01, "share {share}");
    }

    #[test]
    fn ipv4_mapped_clients_hash_like_ipv4() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_hash(v4), client_hash(mapped));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn equal_weights_get_balanced_shares(n in 1usize..40) {
            let m = build(&names(n), DEFAULT_TABLE_SIZE);
            let mut counts = vec![0usize; n];
            for &s in m.slots() { counts[s as usize] += 1; }
            let lo = DEFAULT_TABLE_SIZE / n;
            let hi = DEFAULT_TABLE_SIZE.div_ceil(n);
            for c in counts { prop_assert!(c >= lo && c <= hi, "count {} not in {}..={}", c, lo, hi); }
        }

        #[test]
        fn removing_one_of_n_remaps_about_one_nth(n in 3usize..30, removed in 0usize..30) {
            let removed = removed % n;
            let all = names(n);
            let before = build(&all, DEFAULT_TABLE_SIZE);
            let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, s)| s.clone()).collect();
            let after = build(&rest, DEFAULT_TABLE_SIZE);
            let moved = before.slots().iter().zip(after.slots()).filter(|(b, a)| {
                let b = &all[**b as usize];
                let a = &rest[**a as usize];
                a != b
            }).count();
            let frac = moved as f64 / DEFAULT_TABLE_SIZE as f64;
            let ideal = 1.0 / n as f64;
            // The paper (§5.3) reports disruption a little above the ideal 1/N.
            prop_assert!(frac >= ideal * 0.99, "moved {} < ideal {}", frac, ideal);
            prop_assert!(frac <= ideal * 1.5 + 0.02, "moved {} vs ideal {}", frac, ideal);
        }
    }
}
