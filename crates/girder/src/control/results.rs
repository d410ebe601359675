//! The bounded store of memoized outcomes: least recently used first out, bounded by entry
//! count and by bytes, with an optional time to live.

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
    /// Outcomes older than this are dropped; `None` keeps them until evicted.
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
}

/// An LRU map from request id to outcome, within [`ResultStoreConfig`]'s limits.
pub struct ResultStore {
    config: ResultStoreConfig,
    entries: LruCache<ReqId, Entry, IdBuild>,
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
        ResultStore { config, entries: LruCache::unbounded_with_hasher(IdBuild::default()), bytes: 0, evictions: 0 }
    }

    /// The outcome of `id`, if stored and not expired; marks it recently used.
    pub fn get(&mut self, id: &ReqId) -> Option<Outcome> {
        let expired = match self.entries.get(id) {
            None => return None,
            Some(entry) => entry.expires_at.is_some_and(|at| at <= Instant::now()),
        };
        if expired {
            self.remove(id);
            return None;
        }
        self.entries.peek(id).map(|entry| entry.outcome.clone())
    }

    /// Stores `outcome` under `id`, evicting the least recently used entries to stay within
    /// the limits. An outcome larger than the whole byte budget is not stored.
    pub fn insert(&mut self, id: ReqId, outcome: Outcome) {
        let bytes = outcome_bytes(&outcome);
        if bytes > self.config.bytes_max || self.config.entries_max == 0 {
            return;
        }
        let expires_at = self.config.ttl_ms.map(|ttl| Instant::now() + Duration::from_millis(ttl));
        if let Some(old) = self.entries.put(id, Entry { outcome, bytes, expires_at }) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        while self.entries.len() > self.config.entries_max || self.bytes > self.config.bytes_max {
            match self.entries.pop_lru() {
                Some((_, entry)) => {
                    self.bytes -= entry.bytes;
                    self.evictions += 1;
                }
                None => break,
            }
        }
    }

    /// Removes `id`'s outcome.
    pub fn remove(&mut self, id: &ReqId) {
        if let Some(entry) = self.entries.pop(id) {
            self.bytes -= entry.bytes;
        }
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
}
