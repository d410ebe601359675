//! The bounded store of memoized outcomes: least recently used first out, bounded by entry
//! count and by bytes, with a time to live per entry (the store's default or the one given
//! with it), and groups (a function at one version) whose outcomes can be forgotten at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::id::{IdBuild, ReqId};
use crate::request::Outcome;

/// Limits of a [`ResultStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultStoreConfig {
    /// At most this many outcomes are kept.
    pub entries_max: usize,
    /// At most this many bytes of outcomes (payload plus a fixed per-entry overhead).
    pub bytes_max: usize,
    /// Outcomes older than this are dropped; `None` keeps them until evicted. An outcome
    /// stored with a time to live of its own ([`ResultStore::insert_with`]) keeps that one.
    pub ttl_ms: Option<u64>,
}

impl Default for ResultStoreConfig {
    fn default() -> Self {
        ResultStoreConfig { entries_max: 1_000_000, bytes_max: 256 << 20, ttl_ms: None }
    }
}

/// Overhead charged per entry: the key, the LRU links and the bookkeeping.
const ENTRY_OVERHEAD_BYTES: usize = 128;

struct Entry {
    outcome: Outcome,
    bytes: usize,
    expires_at: Option<Instant>,
    group: Option<Arc<str>>,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// An LRU map from request id to outcome, within [`ResultStoreConfig`]'s limits.
pub struct ResultStore {
    config: ResultStoreConfig,
    entries: LruCache<ReqId, Entry, IdBuild>,
    /// The ids of each group's entries, so a group is forgotten without a scan.
    groups: HashMap<Arc<str>, HashSet<ReqId, IdBuild>>,
    bytes: usize,
    evictions: u64,
}

fn outcome_bytes(outcome: &Outcome) -> usize {
    ENTRY_OVERHEAD_BYTES
        + match outcome {
            Ok(bytes) => bytes.len(),
            Err(err) => err.to_string().len(),
        }
}

impl ResultStore {
    /// An empty store with the given limits.
    pub fn new(config: ResultStoreConfig) -> ResultStore {
        ResultStore {
            config,
            entries: LruCache::unbounded_with_hasher(IdBuild::default()),
            groups: HashMap::new(),
            bytes: 0,
            evictions: 0,
        }
    }

    /// The outcome of `id`, if stored and not expired; marks it recently used.
    pub fn get(&mut self, id: &ReqId) -> Option<Outcome> {
        let live = self.entries.get(id)?.is_live(Instant::now());
        if !live {
            self.remove(id);
            return None;
        }
        self.entries.peek(id).map(|entry| entry.outcome.clone())
    }

    /// Stores `outcome` under `id` for the store's time to live (see [`ResultStore::insert_with`]).
    pub fn insert(&mut self, id: ReqId, outcome: Outcome) {
        let expires_at = self.default_expiry();
        self.insert_with(id, outcome, None, expires_at);
    }

    /// When an outcome stored now expires by the store's own time to live.
    pub fn default_expiry(&self) -> Option<Instant> {
        self.config.ttl_ms.map(|ttl| Instant::now() + Duration::from_millis(ttl))
    }

    /// Stores `outcome` under `id` in `group` until `expires_at` (`None`: until evicted),
    /// evicting the least recently used entries to stay within the limits. An outcome larger
    /// than the whole byte budget is not stored.
    pub fn insert_with(&mut self, id: ReqId, outcome: Outcome, group: Option<Arc<str>>, expires_at: Option<Instant>) {
        let bytes = outcome_bytes(&outcome);
        if bytes > self.config.bytes_max || self.config.entries_max == 0 {
            return;
        }
        // Replacing an entry: it leaves its old group first.
        self.remove(&id);
        // Entries of a group share the group's one name.
        let group = group.map(|g| self.groups.get_key_value(&g).map_or(g, |(name, _)| name.clone()));
        if let Some(group) = &group {
            self.groups.entry(group.clone()).or_default().insert(id);
        }
        self.entries.put(id, Entry { outcome, bytes, expires_at, group });
        self.bytes += bytes;
        while self.entries.len() > self.config.entries_max || self.bytes > self.config.bytes_max {
            match self.entries.pop_lru() {
                Some((evicted, entry)) => {
                    self.forgot(&evicted, &entry);
                    self.evictions += 1;
                }
                None => break,
            }
        }
    }

    /// Accounts for `entry` of `id` having left the map.
    fn forgot(&mut self, id: &ReqId, entry: &Entry) {
        self.bytes -= entry.bytes;
        let Some(group) = &entry.group else { return };
        if let Some(ids) = self.groups.get_mut(group) {
            ids.remove(id);
            if ids.is_empty() {
                self.groups.remove(group);
            }
        }
    }

    /// Removes `id`'s outcome; returns whether one was stored and not expired.
    pub fn remove(&mut self, id: &ReqId) -> bool {
        match self.entries.pop(id) {
            Some(entry) => {
                self.forgot(id, &entry);
                entry.is_live(Instant::now())
            }
            None => false,
        }
    }

    /// Removes up to `max` outcomes of `group`. Returns how many of them had not expired,
    /// and whether the group has more.
    pub fn remove_group(&mut self, group: &str, max: usize) -> (usize, bool) {
        let Some(ids) = self.groups.get(group) else { return (0, false) };
        let batch: Vec<ReqId> = ids.iter().take(max).copied().collect();
        let removed = batch.iter().filter(|id| self.remove(id)).count();
        (removed, self.groups.contains_key(group))
    }

    /// Removes every outcome.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.groups.clear();
        self.bytes = 0;
    }

    /// The number of stored outcomes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes charged to the stored outcomes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many outcomes were evicted to stay within the limits.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn id(n: u32) -> ReqId {
        ReqId::of("t", 0, &n.to_le_bytes())
    }

    #[test]
    fn evicts_least_recently_used_by_count() {
        let mut store = ResultStore::new(ResultStoreConfig { entries_max: 2, ..Default::default() });
        store.insert(id(1), Ok(Bytes::from_static(b"a")));
        store.insert(id(2), Ok(Bytes::from_static(b"b")));
        assert!(store.get(&id(1)).is_some()); // 1 is now the most recent
        store.insert(id(3), Ok(Bytes::from_static(b"c")));
        assert!(store.get(&id(2)).is_none());
        assert!(store.get(&id(1)).is_some());
        assert_eq!(store.len(), 2);
        assert_eq!(store.evictions(), 1);
    }

    #[test]
    fn bounded_by_bytes() {
        let budget = 3 * (ENTRY_OVERHEAD_BYTES + 100);
        let mut store = ResultStore::new(ResultStoreConfig { bytes_max: budget, ..Default::default() });
        for n in 0..10 {
            store.insert(id(n), Ok(Bytes::from(vec![0u8; 100])));
        }
        assert_eq!(store.len(), 3);
        assert!(store.bytes() <= budget);
        // Too large for the whole budget: not stored, nothing evicted for it.
        store.insert(id(99), Ok(Bytes::from(vec![0u8; budget])));
        assert!(store.get(&id(99)).is_none());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn expired_entries_are_gone() {
        let mut store = ResultStore::new(ResultStoreConfig { ttl_ms: Some(0), ..Default::default() });
        store.insert(id(1), Ok(Bytes::from_static(b"a")));
        assert!(store.get(&id(1)).is_none());
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn entries_keep_their_own_expiry() {
        let mut store = ResultStore::new(ResultStoreConfig { ttl_ms: Some(60_000), ..Default::default() });
        store.insert_with(id(1), Ok(Bytes::from_static(b"a")), None, Some(Instant::now()));
        store.insert_with(id(2), Ok(Bytes::from_static(b"b")), None, None);
        assert!(store.get(&id(1)).is_none(), "expired at once");
        assert!(store.get(&id(2)).is_some(), "no expiry of its own: kept");
    }

    #[test]
    fn groups_are_removed_in_bounded_steps_and_follow_evictions() {
        let mut store = ResultStore::new(ResultStoreConfig { entries_max: 10, ..Default::default() });
        let group: Arc<str> = "1:f".into();
        for n in 0..12 {
            store.insert_with(id(n), Ok(Bytes::from_static(b"v")), Some(group.clone()), None);
        }
        store.insert_with(id(100), Ok(Bytes::from_static(b"w")), Some("1:g".into()), None);
        // 13 inserted, 10 kept: the group lost its 3 oldest to eviction.
        assert_eq!(store.remove_group(&group, 4), (4, true));
        assert_eq!(store.remove_group(&group, 100), (5, false));
        assert_eq!(store.remove_group(&group, 100), (0, false));
        assert!(store.get(&id(100)).is_some(), "another group is untouched");
        assert!(store.remove(&id(100)));
        assert!(!store.remove(&id(100)));
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}
