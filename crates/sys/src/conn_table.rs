//! A bounded table of connections or sessions: at most `max_total` entries and at most
//! `max_per_client` per client address; under pressure the oldest idle entry (of that client,
//! or of the whole table) is evicted to make room, but only one idle for at least `evict_idle`,
//! so an active entry is never pushed out by a flood of new ones: the newcomer is refused
//! instead. Pure (no I/O, no clock: the caller passes `now`); the drivers of the UDP sessions,
//! the DNS TCP connections and the admin connections keep their sockets in it.
//!
//! Idle order is kept in ordered sets, so admission, [`ConnTable::touch`] and eviction are
//! O(log n); `touch` reindexes at most once per [`TOUCH_GRANULARITY`].

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

use tokio::time::{Duration, Instant};

/// A touch closer than this to the previous one is not reindexed (idle order is coarse).
pub const TOUCH_GRANULARITY: Duration = Duration::from_millis(50);

/// The bounds of a table. Zero means unlimited for `max_total` and `max_per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLimits {
    /// Entries in the whole table.
    pub max_total: usize,
    /// Entries per client address.
    pub max_per_client: usize,
    /// An entry idle at least this long may be evicted for a newcomer.
    pub evict_idle: Duration,
}

/// Why an entry was refused or evicted. The word goes to logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pressure {
    /// The table is at `max_total`.
    TableFull,
    /// The client is at `max_per_client`.
    ClientLimit,
    /// The caller said so (a budget shared with other tables is used up).
    Budget,
}

impl Pressure {
    /// The camel-case reason word.
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::TableFull => "tableFull",
            Pressure::ClientLimit => "clientLimit",
            Pressure::Budget => "budget",
        }
    }
}

/// The outcome of [`ConnTable::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<K> {
    /// Room for one more.
    Admit,
    /// Room once this entry is evicted.
    Evict(K, Pressure),
    /// No room: nothing is idle long enough.
    Refuse(Pressure),
}

/// The outcome of [`ConnTable::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<K, V> {
    /// Inserted.
    Admitted,
    /// Inserted after evicting this entry (close it) for this reason.
    Evicted(K, V, Pressure),
    /// Not inserted: no entry was idle long enough to make room.
    Refused(Pressure),
}

#[derive(Debug)]
struct Entry<V> {
    client: IpAddr,
    last: Instant,
    value: V,
}

/// The table. `K` identifies an entry (a client socket address, a connection number).
#[derive(Debug)]
pub struct ConnTable<K, V> {
    limits: TableLimits,
    entries: HashMap<K, Entry<V>>,
    idle: BTreeSet<(Instant, K)>,
    per_client: HashMap<IpAddr, BTreeSet<(Instant, K)>>,
}

impl<K: Copy + Ord + Hash, V> ConnTable<K, V> {
    /// An empty table.
    pub fn new(limits: TableLimits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            idle: BTreeSet::new(),
            per_client: HashMap::new(),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> TableLimits {
        self.limits
    }

    /// Changes the bounds (a reload); entries beyond new bounds stay until they end or are
    /// evicted.
    pub fn set_limits(&mut self, limits: TableLimits) {
        self.limits = limits;
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries of one client.
    pub fn client_len(&self, client: IpAddr) -> usize {
        self.per_client.get(&client).map_or(0, BTreeSet::len)
    }

    /// The entry of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Decides whether a new entry of `client` may enter, without changing the table: a driver
    /// that must build the entry first (open a socket) asks before and calls
    /// [`ConnTable::insert`] after, removing the entry to evict itself. `pressure` asks to make
    /// room even below the bounds (a budget shared with other tables is used up).
    pub fn check(&self, client: IpAddr, now: Instant, pressure: bool) -> Decision<K> {
        let l = self.limits;
        if l.max_per_client > 0 && self.client_len(client) >= l.max_per_client {
            let oldest = self
                .per_client
                .get(&client)
                .and_then(|s| s.first().copied());
            return match self.evictable(oldest, now) {
                Some(k) => Decision::Evict(k, Pressure::ClientLimit),
                None => Decision::Refuse(Pressure::ClientLimit),
            };
        }
        if (l.max_total > 0 && self.entries.len() >= l.max_total) || pressure {
            let why = if pressure {
                Pressure::Budget
            } else {
                Pressure::TableFull
            };
            return match self.evictable(self.idle.first().copied(), now) {
                Some(k) => Decision::Evict(k, why),
                None => Decision::Refuse(why),
            };
        }
        Decision::Admit
    }

    /// [`ConnTable::check`], then the eviction and the insert in one step. A key already present
    /// is replaced (its old value is returned as evicted, reason `TableFull`).
    pub fn admit(
        &mut self,
        key: K,
        client: IpAddr,
        now: Instant,
        value: V,
        pressure: bool,
    ) -> Admission<K, V> {
        if let Some(old) = self.remove(&key) {
            self.insert(key, client, now, value);
            return Admission::Evicted(key, old, Pressure::TableFull);
        }
        let out = match self.check(client, now, pressure) {
            Decision::Refuse(why) => return Admission::Refused(why),
            Decision::Evict(k, why) => match self.remove(&k) {
                Some(v) => Admission::Evicted(k, v, why),
                None => Admission::Admitted,
            },
            Decision::Admit => Admission::Admitted,
        };
        self.insert(key, client, now, value);
        out
    }

    fn evictable(&self, oldest: Option<(Instant, K)>, now: Instant) -> Option<K> {
        let (last, k) = oldest?;
        (now.saturating_duration_since(last) >= self.limits.evict_idle).then_some(k)
    }

    /// Inserts (or replaces) `key` without checking the bounds: call [`ConnTable::check`]
    /// first.
    pub fn insert(&mut self, key: K, client: IpAddr, now: Instant, value: V) {
        self.remove(&key);
        self.idle.insert((now, key));
        self.per_client
            .entry(client)
            .or_default()
            .insert((now, key));
        self.entries.insert(
            key,
            Entry {
                client,
                last: now,
                value,
            },
        );
    }

    /// Records activity on `key` (at most one reindex per [`TOUCH_GRANULARITY`]).
    pub fn touch(&mut self, key: &K, now: Instant) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        if now.saturating_duration_since(e.last) < TOUCH_GRANULARITY {
            return;
        }
        let old = (e.last, *key);
        e.last = now;
        self.idle.remove(&old);
        self.idle.insert((now, *key));
        if let Some(s) = self.per_client.get_mut(&e.client) {
            s.remove(&old);
            s.insert((now, *key));
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.idle.remove(&(e.last, *key));
        if let Some(s) = self.per_client.get_mut(&e.client) {
            s.remove(&(e.last, *key));
            if s.is_empty() {
                self.per_client.remove(&e.client);
            }
        }
        Some(e.value)
    }

    /// Removes `key` only if `pred` holds for its value (a task ending removes its own entry,
    /// never a newer one under the same key).
    pub fn remove_if(&mut self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        if self.get(key).is_some_and(pred) {
            self.remove(key)
        } else {
            None
        }
    }

    /// Removes and returns every entry idle for at least `idle`, oldest first.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while let Some(&(last, k)) = self.idle.first() {
            if now.saturating_duration_since(last) < idle {
                break;
            }
            if let Some(v) = self.remove(&k) {
                out.push((k, v));
            } else {
                self.idle.remove(&(last, k));
            }
        }
        out
    }

    /// Removes and returns every entry.
    pub fn drain(&mut self) -> Vec<(K, V)> {
        self.idle.clear();
        self.per_client.clear();
        self.entries.drain().map(|(k, e)| (k, e.value)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn table(total: usize, per_client: usize) -> ConnTable<u32, &'static str> {
        ConnTable::new(TableLimits {
            max_total: total,
            max_per_client: per_client,
            evict_idle: Duration::from_secs(1),
        })
    }

    #[test]
    fn bounds_hold_and_active_entries_are_never_evicted() {
        let t0 = Instant::now();
        let mut t = table(3, 0);
        for k in 0..3 {
            assert_eq!(t.admit(k, ip(k as u8), t0, "x", false), Admission::Admitted);
        }
        // All three active: a newcomer is refused, nothing evicted.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            t.admit(9, ip(9), later, "new", false),
            Admission::Refused(Pressure::TableFull)
        );
        assert_eq!(t.len(), 3);
        // Key 0 stays active; 1 and 2 go idle: the oldest idle one (1) makes room.
        let t1 = t0 + Duration::from_millis(1500);
        t.touch(&0, t1);
        t.touch(&2, t0 + Duration::from_millis(200));
        assert_eq!(
            t.admit(9, ip(9), t1 + Duration::from_millis(100), "new", false),
            Admission::Evicted(1, "x", Pressure::TableFull)
        );
        assert_eq!(t.len(), 3);
        assert!(t.get(&0).is_some() && t.get(&9).is_some());
    }

    #[test]
    fn a_client_at_its_limit_loses_its_own_oldest_idle_entry_or_is_refused() {
        let t0 = Instant::now();
        let mut t = table(100, 2);
        assert_eq!(t.admit(1, ip(1), t0, "a", false), Admission::Admitted);
        assert_eq!(t.admit(2, ip(1), t0, "b", false), Admission::Admitted);
        assert_eq!(t.admit(3, ip(2), t0, "c", false), Admission::Admitted);
        assert_eq!(
            t.admit(4, ip(1), t0, "d", false),
            Admission::Refused(Pressure::ClientLimit)
        );
        let t1 = t0 + Duration::from_secs(2);
        t.touch(&1, t1);
        // Entry 3 (another client) is older, but only client 1's own entries are candidates.
        assert_eq!(
            t.admit(4, ip(1), t1, "d", false),
            Admission::Evicted(2, "b", Pressure::ClientLimit)
        );
        assert_eq!((t.client_len(ip(1)), t.client_len(ip(2))), (2, 1));
    }

    #[test]
    fn budget_pressure_evicts_below_the_bounds() {
        let t0 = Instant::now();
        let mut t = table(0, 0);
        assert_eq!(t.admit(1, ip(1), t0, "a", false), Admission::Admitted);
        assert_eq!(
            t.admit(2, ip(2), t0, "b", true),
            Admission::Refused(Pressure::Budget)
        );
        assert_eq!(
            t.admit(2, ip(2), t0 + Duration::from_secs(1), "b", true),
            Admission::Evicted(1, "a", Pressure::Budget)
        );
    }

    #[test]
    fn expire_removes_idle_entries_oldest_first_and_remove_if_guards_identity() {
        let t0 = Instant::now();
        let mut t = table(0, 0);
        for k in 0..5u32 {
            t.admit(k, ip(1), t0 + Duration::from_secs(u64::from(k)), "v", false);
        }
        let gone = t.expire(t0 + Duration::from_secs(12), Duration::from_secs(10));
        assert_eq!(gone.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove_if(&3, |v| *v == "other"), None);
        assert_eq!(t.remove_if(&3, |v| *v == "v"), Some("v"));
        assert_eq!(t.client_len(ip(1)), 1);
        assert_eq!(t.drain().len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn bounds_hold_under_any_sequence() {
        // A small deterministic generator (xorshift) is enough to drive the sequence.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut t = ConnTable::new(TableLimits {
            max_total: 50,
            max_per_client: 5,
            evict_idle: Duration::from_millis(300),
        });
        let mut now = Instant::now();
        for _ in 0..20_000 {
            now += Duration::from_millis(next(20));
            let key = next(400) as u32;
            let client = ip(next(30) as u8);
            let pressure = next(20) == 0;
            match next(4) {
                0 => {
                    t.remove(&key);
                }
                1 => t.touch(&key, now),
                _ => {
                    if t.get(&key).is_none() {
                        let _ = t.admit(key, client, now, (), pressure);
                    }
                }
            }
            assert!(t.len() <= 50);
            assert!(t.per_client.values().all(|s| s.len() <= 5 && !s.is_empty()));
            assert_eq!(t.idle.len(), t.len());
            assert_eq!(
                t.per_client.values().map(BTreeSet::len).sum::<usize>(),
                t.len()
            );
        }
    }
}
