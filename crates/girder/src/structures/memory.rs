//! The in-memory implementation of [`Structures`], used by the embedded statekeeper.
//!
//! The store is bounded in bytes ([`InMemoryConfig::bytes_max`]): every key counts its
//! name, its contents and fixed overheads ([`ENTRY_OVERHEAD_BYTES`] per key,
//! [`ITEM_OVERHEAD_BYTES`] per element of a collection), and the count is kept exact on
//! every write, delete, pop, expiry and eviction. A write that would go over the budget
//! first evicts cache values that have a time-to-live, those closest to expiry first (they
//! are the ones the writer agreed to lose soonest); if that cannot make room it fails with
//! [`DsError::is_full`] and changes nothing (nothing is evicted for a write that is refused
//! anyway). Keys under [`RESERVED_PREFIX`] (girder's own state: placement, configuration)
//! may use the whole budget, every other key only all but a sixteenth of it, so users
//! filling the cache cannot lock girder out of its own state. Plain topics are not counted:
//! their messages live only until every subscriber got them, at most [`TOPIC_BUFFER_LEN`]
//! per topic.
//!
//! Expired entries are purged a few per write and in bounded batches by a periodic sweep
//! (when the store is made inside a tokio runtime), so they stop counting without any
//! operation scanning the whole store.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{DsError, DsResult, Kind, ReliableBatch, Retention, Structures, Versioned};

/// Messages a slow subscriber of a topic may fall behind before it misses some.
pub const TOPIC_BUFFER_LEN: usize = 4_096;
/// Most keys held; creating more fails until some are deleted or expire.
pub const KEYS_MAX: usize = 10_000_000;
/// Default of [`InMemoryConfig::bytes_max`]: 1 GiB.
pub const BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Bytes counted for every key besides its name and contents: its slot in the table, the
/// entry itself and its place in the expiry index.
pub const ENTRY_OVERHEAD_BYTES: u64 = 128;
/// Bytes counted for every element of a collection besides its own bytes (a map field, a
/// multimap value, a set member, a list item, a semaphore holder, a reliable topic message).
pub const ITEM_OVERHEAD_BYTES: u64 = 48;
/// Keys under this prefix hold girder's own state and may use the whole budget.
pub const RESERVED_PREFIX: &str = "girder/";
/// Other keys may use all of the budget but `bytes_max / RESERVED_SHARE_DIVISOR`.
const RESERVED_SHARE_DIVISOR: u64 = 16;
/// Expired entries every write purges, soonest expired first: cheap (the index is ordered)
/// and enough that writes alone keep expired entries from piling up.
const PURGE_PER_WRITE: usize = 8;
/// Expired entries a write that finds no room purges before it looks at what to evict.
const PURGE_WHEN_FULL: usize = 4_096;
/// Expired entries one round of the sweep purges, so the lock is never held for long.
const SWEEP_BATCH: usize = 1_024;
/// How often the sweep runs; again at once while it finds full batches.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Limits of the in-memory store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InMemoryConfig {
    /// Most bytes every structure together may take, counted as key and value bytes plus
    /// [`ENTRY_OVERHEAD_BYTES`] per key and [`ITEM_OVERHEAD_BYTES`] per element of a
    /// collection. Keys outside [`RESERVED_PREFIX`] get all of it but a sixteenth.
    pub bytes_max: u64,
}

impl Default for InMemoryConfig {
    fn default() -> Self {
        InMemoryConfig { bytes_max: BYTES_MAX_DEFAULT }
    }
}

enum Data {
    Value { bytes: Bytes, version: u64 },
    Counter(i64),
    Map(HashMap<Bytes, Bytes>),
    MultiMap(HashMap<Bytes, HashSet<Bytes>>),
    Set(HashSet<Bytes>),
    List(VecDeque<Bytes>),
    Lock { holder: Option<(String, u64, Instant)>, last_token: u64 },
    Latch(u64),
    Semaphore { permits: u64, holders: HashMap<String, Instant> },
    Reliable { last_seq: u64, items: VecDeque<(u64, Instant, Bytes)> },
}

impl Data {
    /// The bytes counted for the contents, from scratch (the store keeps the count as it
    /// goes; this checks it).
    fn bytes(&self) -> u64 {
        let item = |len: usize| len as u64 + ITEM_OVERHEAD_BYTES;
        match self {
            Data::Value { bytes, .. } => bytes.len() as u64,
            Data::Counter(_) | Data::Latch(_) => 0,
            Data::Map(map) => map.iter().map(|(f, v)| item(f.len()) + v.len() as u64).sum(),
            Data::MultiMap(map) => {
                map.iter().map(|(f, vs)| item(f.len()) + vs.iter().map(|v| item(v.len())).sum::<u64>()).sum()
            }
            Data::Set(set) => set.iter().map(|m| item(m.len())).sum(),
            Data::List(list) => list.iter().map(|v| item(v.len())).sum(),
            Data::Lock { holder, .. } => holder.as_ref().map_or(0, |(h, _, _)| h.len() as u64),
            Data::Semaphore { holders, .. } => holders.keys().map(|h| item(h.len())).sum(),
            Data::Reliable { items, .. } => items.iter().map(|(_, _, m)| item(m.len())).sum(),
        }
    }
}

struct Entry {
    kind: Kind,
    expires_at: Option<Instant>,
    data: Data,
    /// Bytes counted for this entry: key, overhead and contents.
    bytes: u64,
}

impl Entry {
    fn new(kind: Kind, key: &str) -> Entry {
        let data = match kind {
            Kind::Value | Kind::Atom => Data::Value { bytes: Bytes::new(), version: 0 },
            Kind::Counter => Data::Counter(0),
            Kind::Map => Data::Map(HashMap::new()),
            Kind::MultiMap => Data::MultiMap(HashMap::new()),
            Kind::Set => Data::Set(HashSet::new()),
            Kind::List | Kind::Queue => Data::List(VecDeque::new()),
            Kind::Lock => Data::Lock { holder: None, last_token: 0 },
            Kind::Latch => Data::Latch(0),
            Kind::Semaphore => Data::Semaphore { permits: 0, holders: HashMap::new() },
            Kind::ReliableTopic => Data::Reliable { last_seq: 0, items: VecDeque::new() },
        };
        Entry { kind, expires_at: None, data, bytes: key.len() as u64 + ENTRY_OVERHEAD_BYTES }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Cache values with a TTL may be evicted to make room.
    fn evictable(&self) -> bool {
        self.kind == Kind::Value && self.expires_at.is_some()
    }
}

/// The entries and their byte count, under one lock so that the count and the budget check
/// are atomic with every write.
#[derive(Default)]
struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Sum of the entries' `bytes`.
    used_bytes: u64,
    /// Every entry with a TTL, soonest expiry first.
    expiring: BTreeSet<(Instant, Arc<str>)>,
    /// The cache values with a TTL (what a write may evict), soonest expiry first.
    evictable: BTreeSet<(Instant, Arc<str>)>,
    /// Sum of the `bytes` of the entries in `evictable`.
    evictable_bytes: u64,
}

impl State {
    /// Removes `key` with its index entries and its bytes.
    fn take(&mut self, key: &str) -> Option<(Arc<str>, Entry)> {
        let (name, entry) = self.entries.remove_entry(key)?;
        if let Some(at) = entry.expires_at {
            let slot = (at, name.clone());
            self.expiring.remove(&slot);
            if entry.evictable() {
                self.evictable.remove(&slot);
                self.evictable_bytes -= entry.bytes;
            }
        }
        self.used_bytes -= entry.bytes;
        Some((name, entry))
    }

    /// Puts an entry (back) in, indexed and counted.
    fn put(&mut self, name: Arc<str>, entry: Entry) {
        if let Some(at) = entry.expires_at {
            self.expiring.insert((at, name.clone()));
            if entry.evictable() {
                self.evictable.insert((at, name.clone()));
                self.evictable_bytes += entry.bytes;
            }
        }
        self.used_bytes += entry.bytes;
        self.entries.insert(name, entry);
    }

    /// Drops up to `max` entries expired at `now`, soonest expired first; returns how many.
    fn purge_expired(&mut self, now: Instant, max: usize) -> usize {
        let mut purged = 0;
        while purged < max {
            let Some((at, name)) = self.expiring.first().cloned() else { break };
            if at > now {
                break;
            }
            self.take(&name);
            purged += 1;
        }
        purged
    }
}

/// What a write may do to make room for itself: see [`Room::resize`].
struct Room<'a> {
    state: &'a mut State,
    key: &'a str,
    /// Most bytes the store may hold after a write of this key.
    limit: u64,
    bytes_max: u64,
    /// What the entry counted before this write (0 for a new one).
    before: u64,
    /// Keys evicted to make room, to notify once the lock is released.
    evicted: Vec<Arc<str>>,
}

impl Room<'_> {
    /// Counts `added` more and `removed` fewer bytes for `entry`, first making room for them
    /// when it grows: expired entries go, then cache values with a TTL, soonest expiry
    /// first. When even that cannot make room, nothing is evicted and the write is refused;
    /// call this before changing anything.
    fn resize(&mut self, entry: &mut Entry, added: u64, removed: u64) -> DsResult<()> {
        let bytes = (entry.bytes + added).saturating_sub(removed);
        if bytes > self.before {
            self.make_room(bytes)?;
        }
        entry.bytes = bytes;
        Ok(())
    }

    /// Makes the store hold at most `limit` bytes with this entry at `bytes`.
    fn make_room(&mut self, bytes: u64) -> DsResult<()> {
        let limit = self.limit;
        let over = |state: &State| (state.used_bytes + bytes).saturating_sub(limit);
        if over(self.state) == 0 {
            return Ok(());
        }
        self.state.purge_expired(Instant::now(), PURGE_WHEN_FULL);
        let over_by = over(self.state);
        if over_by > self.state.evictable_bytes {
            return Err(DsError::full(format_args!(
                "writing key {:?} ({bytes} bytes counted) would take the in-memory store over its limit of {} \
                 bytes ({} in use, bytes_max {}), and evicting every cache value with a TTL would not make room; \
                 delete some keys, give values a TTL, or raise bytes_max",
                self.key, self.limit, self.state.used_bytes, self.bytes_max,
            )));
        }
        while over(self.state) > 0 {
            let Some((_, name)) = self.state.evictable.first().cloned() else { break };
            self.state.take(&name);
            self.evicted.push(name);
        }
        Ok(())
    }
}

/// Every structure in this process's memory.
pub struct InMemory {
    config: InMemoryConfig,
    state: Arc<Mutex<State>>,
    changes: super::changes::ChangeNotices,
    topics: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
    /// Versions are unique across keys and time, so a deleted and re-created value never
    /// reuses a version a stale compare-and-set could match.
    versions: AtomicU64,
}

impl Default for InMemory {
    fn default() -> Self {
        InMemory::with_config(InMemoryConfig::default())
    }
}

fn wrong(key: &str, expected: Kind, found: Kind) -> DsError {
    DsError::WrongKind { key: key.to_owned(), expected, found: found.to_string() }
}

fn unreachable_kind(key: &str, kind: Kind) -> DsError {
    DsError::Invalid(format!("key {key:?}: internal kind mismatch for {kind}"))
}

/// Purges expired entries in bounded batches until the store is dropped.
async fn sweep(state: Weak<Mutex<State>>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        loop {
            let Some(state) = state.upgrade() else { return };
            let purged = state.lock().purge_expired(Instant::now(), SWEEP_BATCH);
            if purged < SWEEP_BATCH {
                break;
            }
            drop(state);
            // More are due: go on after letting others have the lock.
            tokio::task::yield_now().await;
        }
    }
}

impl InMemory {
    /// An empty store with the default limits.
    pub fn new() -> InMemory {
        InMemory::default()
    }

    /// An empty store with the limits of `config`. Made inside a tokio runtime, it sweeps
    /// expired entries periodically on that runtime.
    pub fn with_config(config: InMemoryConfig) -> InMemory {
        let state = Arc::new(Mutex::new(State::default()));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&state)));
        }
        InMemory {
            config,
            state,
            changes: super::changes::ChangeNotices::default(),
            topics: Mutex::new(HashMap::new()),
            versions: AtomicU64::new(0),
        }
    }

    /// The limits this store was made with.
    pub fn config(&self) -> InMemoryConfig {
        self.config
    }

    /// Bytes counted now, expired entries not yet purged included (for metrics and tests).
    pub fn bytes_used(&self) -> u64 {
        self.state.lock().used_bytes
    }

    /// Keys held now, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes counted for every entry recomputed from scratch, and the running count,
    /// which must be equal: for tests.
    #[doc(hidden)]
    pub fn bytes_recounted(&self) -> (u64, u64) {
        let state = self.state.lock();
        let recounted = state.entries.iter().map(|(k, e)| k.len() as u64 + ENTRY_OVERHEAD_BYTES + e.data.bytes()).sum();
        let listed: u64 = state.entries.values().map(|e| e.bytes).sum();
        assert_eq!(listed, state.used_bytes, "the running count is the sum of the entries'");
        (recounted, state.used_bytes)
    }

    /// Most bytes the store may hold after a write of `key`.
    fn limit(&self, key: &str) -> u64 {
        let bytes_max = self.config.bytes_max;
        if key.starts_with(RESERVED_PREFIX) {
            bytes_max
        } else {
            bytes_max - bytes_max / RESERVED_SHARE_DIVISOR
        }
    }

    /// Runs `f` on `key`'s entry of `kind`, after checking the kind and dropping it if
    /// expired. For reads and for writes that do not change the entry's size.
    fn with<R>(&self, kind: Kind, key: &str, f: impl FnOnce(Option<&mut Entry>) -> DsResult<R>) -> DsResult<R> {
        let mut state = self.state.lock();
        if state.entries.get(key).is_some_and(|e| e.expired(Instant::now())) {
            state.take(key);
        }
        match state.entries.get_mut(key) {
            Some(entry) if entry.kind != kind => Err(wrong(key, kind, entry.kind)),
            entry => f(entry),
        }
    }

    /// Runs `f` on `key`'s entry of `kind` (created when `create`), after checking the kind
    /// and dropping it if expired, for writes that may change its size: `f` counts every
    /// change with [`Room::resize`] before making it, and changes nothing when it fails.
    fn write<R>(
        &self,
        kind: Kind,
        key: &str,
        create: bool,
        f: impl FnOnce(Option<&mut Entry>, &mut Room<'_>) -> DsResult<R>,
    ) -> DsResult<R> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let now = Instant::now();
        state.purge_expired(now, PURGE_PER_WRITE);
        if state.entries.get(key).is_some_and(|e| e.expired(now)) {
            state.take(key);
        }
        if let Some(entry) = state.entries.get(key) {
            if entry.kind != kind {
                return Err(wrong(key, kind, entry.kind));
            }
        }
        // The entry is out of the store while `f` runs, so making room never evicts it and
        // the running count is that of every other entry.
        let taken = state.take(key);
        let existed = taken.is_some();
        let (name, mut entry) = match taken {
            Some(taken) => taken,
            None if create => {
                if state.entries.len() >= KEYS_MAX {
                    return Err(DsError::Invalid(format!(
                        "the store holds {KEYS_MAX} keys, its limit; delete some first"
                    )));
                }
                (Arc::from(key), Entry::new(kind, key))
            }
            None => {
                let mut room = self.room(state, key, 0);
                return f(None, &mut room);
            }
        };
        let before = if existed { entry.bytes } else { 0 };
        let mut room = self.room(state, key, before);
        let result = f(Some(&mut entry), &mut room).and_then(|r| {
            // A new entry counts its key and overhead even when `f` did not resize it; it
            // is not in the store yet, so refusing it here still changes nothing.
            if existed {
                Ok(r)
            } else {
                room.make_room(entry.bytes).map(|()| r)
            }
        });
        let evicted = std::mem::take(&mut room.evicted);
        match &result {
            Ok(_) => state.put(name, entry),
            Err(_) if existed => {
                // Refused: the entry is as it was.
                entry.bytes = before;
                state.put(name, entry);
            }
            Err(_) => {}
        }
        drop(guard);
        for name in evicted {
            self.changed(&name);
        }
        result
    }

    fn room<'a>(&self, state: &'a mut State, key: &'a str, before: u64) -> Room<'a> {
        Room { state, key, limit: self.limit(key), bytes_max: self.config.bytes_max, before, evicted: Vec::new() }
    }

    fn changed(&self, key: &str) {
        self.changes.notify(key);
    }

    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed) + 1
    }
}

macro_rules! data {
    ($entry:expr, $key:expr, $kind:expr, $pattern:pat => $body:expr) => {
        match &mut $entry.data {
            $pattern => $body,
            _ => Err(unreachable_kind($key, $kind)),
        }
    };
}

/// Bytes counted for an element of `len` bytes.
fn item(len: usize) -> u64 {
    len as u64 + ITEM_OVERHEAD_BYTES
}

impl InMemory {
    /// Sets `key` to `value` when `matches(version, bytes)` holds for what it holds now (an
    /// absent key, created only when `create`, has version 0 and no bytes); the new version,
    /// or `None` when it did not match. One step under the store's lock; keeps the TTL.
    fn set_value_if(
        &self,
        kind: Kind,
        key: &str,
        create: bool,
        value: &[u8],
        matches: impl FnOnce(u64, &[u8]) -> bool,
    ) -> DsResult<Option<u64>> {
        let new_version = self.next_version();
        let swapped = self.write(kind, key, create, |entry, room| {
            // Absent while something was expected: no match.
            let Some(entry) = entry else { return Ok(None) };
            let old_len = match &entry.data {
                Data::Value { bytes, version } if matches(*version, &bytes[..]) => bytes.len(),
                Data::Value { .. } => return Ok(None),
                _ => return Err(unreachable_kind(key, kind)),
            };
            room.resize(entry, value.len() as u64, old_len as u64)?;
            data!(entry, key, kind, Data::Value { bytes, version } => {
                *bytes = Bytes::copy_from_slice(value);
                *version = new_version;
                Ok(Some(new_version))
            })
        })?;
        if swapped.is_some() {
            self.changed(key);
        }
        Ok(swapped)
    }
}

#[async_trait]
impl Structures for InMemory {
    async fn value_get(&self, kind: Kind, key: &str) -> DsResult<Option<Versioned>> {
        self.with(kind, key, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, kind, Data::Value { bytes, version } =>
                Ok(Some(Versioned { bytes: bytes.clone(), version: *version }))),
        })
    }

    async fn value_set(&self, kind: Kind, key: &str, value: &[u8], ttl_ms: Option<u64>) -> DsResult<u64> {
        let new_version = self.next_version();
        let version = self.write(kind, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
            let old_len = match &entry.data {
                Data::Value { bytes, .. } => bytes.len() as u64,
                _ => return Err(unreachable_kind(key, kind)),
            };
            room.resize(entry, value.len() as u64, old_len)?;
            entry.expires_at = ttl_ms.map(|ms| later(Instant::now(), ms));
            data!(entry, key, kind, Data::Value { bytes, version } => {
                *bytes = Bytes::copy_from_slice(value);
                *version = new_version;
                Ok(new_version)
            })
        })?;
        self.changed(key);
        Ok(version)
    }

    async fn value_cas(&self, kind: Kind, key: &str, expected: Option<u64>, value: &[u8]) -> DsResult<Option<u64>> {
        // A fresh entry has version 0: "expected unset" matches only that.
        self.set_value_if(kind, key, expected.is_none(), value, |version, _| version == expected.unwrap_or(0))
    }

    async fn value_compare_and_set(
        &self,
        kind: Kind,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> DsResult<Option<u64>> {
        self.set_value_if(kind, key, expected.is_none(), value, |version, bytes| match expected {
            None => version == 0,
            Some(expected) => version != 0 && bytes == expected,
        })
    }

    async fn value_append(&self, key: &str, chunk: &[u8], max_bytes: usize) -> DsResult<u64> {
        let new_version = self.next_version();
        let len = self.write(Kind::Value, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Value))?;
            let total = match &entry.data {
                Data::Value { bytes, .. } => bytes.len() + chunk.len(),
                _ => return Err(unreachable_kind(key, Kind::Value)),
            };
            if total > max_bytes {
                return Err(DsError::TooLarge { key: key.to_owned(), bytes: total, max_bytes });
            }
            room.resize(entry, chunk.len() as u64, 0)?;
            data!(entry, key, Kind::Value, Data::Value { bytes, version } => {
                let mut joined = Vec::with_capacity(total);
                joined.extend_from_slice(bytes);
                joined.extend_from_slice(chunk);
                *bytes = Bytes::from(joined);
                *version = new_version;
                Ok(total as u64)
            })
        })?;
        self.changed(key);
        Ok(len)
    }

    async fn delete(&self, kind: Kind, key: &str) -> DsResult<bool> {
        let existed = {
            let mut state = self.state.lock();
            match state.entries.get(key) {
                None => false,
                Some(entry) if entry.kind != kind => return Err(wrong(key, kind, entry.kind)),
                Some(entry) => {
                    let live = !entry.expired(Instant::now());
                    state.take(key);
                    live
                }
            }
        };
        if existed {
            self.changed(key);
        }
        Ok(existed)
    }

    async fn exists(&self, kind: Kind, key: &str) -> DsResult<bool> {
        self.with(kind, key, |entry| Ok(entry.is_some()))
    }

    async fn counter_add(&self, key: &str, delta: i64) -> DsResult<i64> {
        self.write(Kind::Counter, key, true, |entry, _| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Counter))?;
            data!(entry, key, Kind::Counter, Data::Counter(value) => {
                *value = value.checked_add(delta).ok_or_else(|| DsError::Invalid(format!("counter {key:?} would overflow")))?;
                Ok(*value)
            })
        })
    }

    async fn counter_cas(&self, key: &str, expected: i64, new: i64) -> DsResult<bool> {
        self.write(Kind::Counter, key, true, |entry, _| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Counter))?;
            data!(entry, key, Kind::Counter, Data::Counter(value) => {
                if *value != expected {
                    return Ok(false);
                }
                *value = new;
                Ok(true)
            })
        })
    }

    async fn map_put(&self, kind: Kind, key: &str, field: &[u8], value: &[u8]) -> DsResult<Option<Bytes>> {
        self.write(kind, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
            let (added, removed) = match &entry.data {
                Data::Map(map) => match map.get(field) {
                    Some(old) => (value.len() as u64, old.len() as u64),
                    None => (item(field.len()) + value.len() as u64, 0),
                },
                Data::MultiMap(map) => match map.get(field) {
                    Some(values) if values.contains(value) => (0, 0),
                    Some(_) => (item(value.len()), 0),
                    None => (item(field.len()) + item(value.len()), 0),
                },
                _ => return Err(unreachable_kind(key, kind)),
            };
            room.resize(entry, added, removed)?;
            match &mut entry.data {
                Data::Map(map) => Ok(map.insert(Bytes::copy_from_slice(field), Bytes::copy_from_slice(value))),
                Data::MultiMap(map) => {
                    let added =
                        map.entry(Bytes::copy_from_slice(field)).or_default().insert(Bytes::copy_from_slice(value));
                    Ok(added.then(Bytes::new))
                }
                _ => Err(unreachable_kind(key, kind)),
            }
        })
    }

    async fn map_get(&self, kind: Kind, key: &str, field: &[u8]) -> DsResult<Vec<Bytes>> {
        self.with(kind, key, |entry| match entry.map(|e| &e.data) {
            None => Ok(Vec::new()),
            Some(Data::Map(map)) => Ok(map.get(field).cloned().into_iter().collect()),
            Some(Data::MultiMap(map)) => Ok(map.get(field).map(|s| s.iter().cloned().collect()).unwrap_or_default()),
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn map_remove(&self, kind: Kind, key: &str, field: &[u8], value: Option<&[u8]>) -> DsResult<u64> {
        self.write(kind, key, false, |entry, room| {
            let Some(entry) = entry else { return Ok(0) };
            // What goes, counted before anything changes.
            let removed = match (&entry.data, value) {
                (Data::Map(map), _) => map.get(field).map_or(0, |v| item(field.len()) + v.len() as u64),
                (Data::MultiMap(map), None) => {
                    map.get(field).map_or(0, |vs| item(field.len()) + vs.iter().map(|v| item(v.len())).sum::<u64>())
                }
                (Data::MultiMap(map), Some(value)) => match map.get(field) {
                    Some(vs) if vs.len() == 1 && vs.contains(value) => item(field.len()) + item(value.len()),
                    Some(vs) if vs.contains(value) => item(value.len()),
                    _ => 0,
                },
                _ => return Err(unreachable_kind(key, kind)),
            };
            room.resize(entry, 0, removed)?;
            match &mut entry.data {
                Data::Map(map) => Ok(u64::from(map.remove(field).is_some())),
                Data::MultiMap(map) => match value {
                    None => Ok(map.remove(field).map_or(0, |s| s.len() as u64)),
                    Some(value) => {
                        let removed = map.get_mut(field).is_some_and(|s| s.remove(value));
                        if map.get(field).is_some_and(HashSet::is_empty) {
                            map.remove(field);
                        }
                        Ok(u64::from(removed))
                    }
                },
                _ => Err(unreachable_kind(key, kind)),
            }
        })
    }

    async fn map_len(&self, kind: Kind, key: &str) -> DsResult<u64> {
        self.with(kind, key, |entry| match entry.map(|e| &e.data) {
            None => Ok(0),
            Some(Data::Map(map)) => Ok(map.len() as u64),
            Some(Data::MultiMap(map)) => Ok(map.values().map(|s| s.len() as u64).sum()),
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn map_entries(&self, kind: Kind, key: &str, limit: usize) -> DsResult<Vec<(Bytes, Bytes)>> {
        self.with(kind, key, |entry| match entry.map(|e| &e.data) {
            None => Ok(Vec::new()),
            Some(Data::Map(map)) => Ok(map.iter().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()),
            Some(Data::MultiMap(map)) => {
                Ok(map.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone()))).take(limit).collect())
            }
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn set_add(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.write(Kind::Set, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Set))?;
            let new = match &entry.data {
                Data::Set(set) => !set.contains(member),
                _ => return Err(unreachable_kind(key, Kind::Set)),
            };
            if new {
                room.resize(entry, item(member.len()), 0)?;
            }
            data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.insert(Bytes::copy_from_slice(member))))
        })
    }

    async fn set_remove(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.write(Kind::Set, key, false, |entry, room| match entry {
            None => Ok(false),
            Some(entry) => {
                let present = match &entry.data {
                    Data::Set(set) => set.contains(member),
                    _ => return Err(unreachable_kind(key, Kind::Set)),
                };
                if present {
                    room.resize(entry, 0, item(member.len()))?;
                }
                data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.remove(member)))
            }
        })
    }

    async fn set_contains(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.with(Kind::Set, key, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.contains(member))),
        })
    }

    async fn set_len(&self, key: &str) -> DsResult<u64> {
        self.with(Kind::Set, key, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.len() as u64)),
        })
    }

    async fn set_members(&self, key: &str, limit: usize) -> DsResult<Vec<Bytes>> {
        self.with(Kind::Set, key, |entry| match entry {
            None => Ok(Vec::new()),
            Some(entry) => {
                data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.iter().take(limit).cloned().collect()))
            }
        })
    }

    async fn list_push(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
        front: bool,
        capacity: Option<u64>,
    ) -> DsResult<Option<u64>> {
        let pushed = self.write(kind, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
            let len = match &entry.data {
                Data::List(list) => list.len() as u64,
                _ => return Err(unreachable_kind(key, kind)),
            };
            if capacity.is_some_and(|cap| len >= cap) {
                return Ok(None);
            }
            room.resize(entry, item(value.len()), 0)?;
            data!(entry, key, kind, Data::List(list) => {
                let value = Bytes::copy_from_slice(value);
                if front { list.push_front(value) } else { list.push_back(value) }
                Ok(Some(list.len() as u64))
            })
        })?;
        if pushed.is_some() {
            self.changed(key);
        }
        Ok(pushed)
    }

    async fn list_pop(&self, kind: Kind, key: &str, front: bool) -> DsResult<Option<Bytes>> {
        self.write(kind, key, false, |entry, room| match entry {
            None => Ok(None),
            Some(entry) => {
                let popped = data!(entry, key, kind, Data::List(list) => Ok(if front { list.pop_front() } else { list.pop_back() }))?;
                if let Some(value) = &popped {
                    // Shrinking never fails.
                    room.resize(entry, 0, item(value.len()))?;
                }
                Ok(popped)
            }
        })
    }

    async fn queue_poll(&self, key: &str, timeout_ms: u64) -> DsResult<Option<Bytes>> {
        let deadline = later(Instant::now(), timeout_ms);
        loop {
            if let Some(item) = self.list_pop(Kind::Queue, key, true).await? {
                return Ok(Some(item));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.wait_change(key, u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)).await;
        }
    }

    async fn list_get(&self, key: &str, index: i64) -> DsResult<Option<Bytes>> {
        self.with(Kind::List, key, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, Kind::List, Data::List(list) =>
                Ok(resolve(index, list.len()).and_then(|i| list.get(i)).cloned())),
        })
    }

    async fn list_set(&self, key: &str, index: i64, value: &[u8]) -> DsResult<bool> {
        self.write(Kind::List, key, false, |entry, room| match entry {
            None => Ok(false),
            Some(entry) => {
                let old_len = match &entry.data {
                    Data::List(list) => resolve(index, list.len()).and_then(|i| list.get(i)).map(Bytes::len),
                    _ => return Err(unreachable_kind(key, Kind::List)),
                };
                let Some(old_len) = old_len else { return Ok(false) };
                room.resize(entry, value.len() as u64, old_len as u64)?;
                data!(entry, key, Kind::List, Data::List(list) => {
                    match resolve(index, list.len()).and_then(|i| list.get_mut(i)) {
                        Some(slot) => {
                            *slot = Bytes::copy_from_slice(value);
                            Ok(true)
                        }
                        None => Err(unreachable_kind(key, Kind::List)),
                    }
                })
            }
        })
    }

    async fn list_range(&self, key: &str, start: i64, stop: i64, limit: usize) -> DsResult<Vec<Bytes>> {
        self.with(Kind::List, key, |entry| match entry {
            None => Ok(Vec::new()),
            Some(entry) => data!(entry, key, Kind::List, Data::List(list) => {
                let len = list.len() as i64;
                let from = if start < 0 { (len + start).max(0) } else { start.min(len) };
                let to = if stop < 0 { len + stop } else { stop.min(len - 1) };
                if from > to {
                    return Ok(Vec::new());
                }
                Ok(list.iter().skip(from as usize).take(((to - from + 1) as usize).min(limit)).cloned().collect())
            }),
        })
    }

    async fn list_len(&self, kind: Kind, key: &str) -> DsResult<u64> {
        self.with(kind, key, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, kind, Data::List(list) => Ok(list.len() as u64)),
        })
    }

    async fn lock_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<Option<u64>> {
        self.write(Kind::Lock, key, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Lock))?;
            let now = Instant::now();
            let previous = match &entry.data {
                Data::Lock { holder: Some((_, _, until)), .. } if *until > now => return Ok(None),
                Data::Lock { holder: current, .. } => current.as_ref().map_or(0, |(h, _, _)| h.len() as u64),
                _ => return Err(unreachable_kind(key, Kind::Lock)),
            };
            room.resize(entry, holder.len() as u64, previous)?;
            data!(entry, key, Kind::Lock, Data::Lock { holder: current, last_token } => {
                *last_token += 1;
                *current = Some((holder.to_owned(), *last_token, later(now, lease_ms)));
                Ok(Some(*last_token))
            })
        })
    }

    async fn lock_renew(&self, key: &str, holder: &str, token: u64, lease_ms: u64) -> DsResult<bool> {
        self.with(Kind::Lock, key, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Lock, Data::Lock { holder: current, .. } => {
                let now = Instant::now();
                match current {
                    Some((h, t, until)) if h == holder && *t == token && *until > now => {
                        *until = later(now, lease_ms);
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }),
        })
    }

    async fn lock_release(&self, key: &str, holder: &str, token: u64) -> DsResult<bool> {
        let released = self.write(Kind::Lock, key, false, |entry, room| match entry {
            None => Ok(false),
            Some(entry) => {
                let releases = match &entry.data {
                    Data::Lock { holder: current, .. } => matches!(current,
                        Some((h, t, until)) if h == holder && *t == token && *until > Instant::now()),
                    _ => return Err(unreachable_kind(key, Kind::Lock)),
                };
                if !releases {
                    return Ok(false);
                }
                room.resize(entry, 0, holder.len() as u64)?;
                data!(entry, key, Kind::Lock, Data::Lock { holder: current, .. } => {
                    *current = None;
                    Ok(true)
                })
            }
        })?;
        if released {
            self.changed(key);
        }
        Ok(released)
    }

    async fn lock_holder(&self, key: &str) -> DsResult<Option<(String, u64)>> {
        self.with(Kind::Lock, key, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, Kind::Lock, Data::Lock { holder: current, .. } => Ok(current
                .as_ref()
                .filter(|(_, _, until)| *until > Instant::now())
                .map(|(h, t, _)| (h.clone(), *t)))),
        })
    }

    async fn latch_try_set(&self, key: &str, count: u64) -> DsResult<bool> {
        self.write(Kind::Latch, key, true, |entry, _| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Latch))?;
            data!(entry, key, Kind::Latch, Data::Latch(current) => {
                if *current > 0 {
                    return Ok(false);
                }
                *current = count;
                Ok(true)
            })
        })
    }

    async fn latch_count_down(&self, key: &str) -> DsResult<u64> {
        let left = self.with(Kind::Latch, key, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Latch, Data::Latch(current) => {
                *current = current.saturating_sub(1);
                Ok(*current)
            }),
        })?;
        self.changed(key);
        Ok(left)
    }

    async fn latch_count(&self, key: &str) -> DsResult<u64> {
        self.with(Kind::Latch, key, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Latch, Data::Latch(current) => Ok(*current)),
        })
    }

    async fn semaphore_init(&self, key: &str, permits: u64) -> DsResult<bool> {
        let fresh = self.with(Kind::Semaphore, key, |entry| Ok(entry.is_none()))?;
        self.write(Kind::Semaphore, key, true, |entry, _| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Semaphore))?;
            data!(entry, key, Kind::Semaphore, Data::Semaphore { permits: current, .. } => {
                *current = permits;
                Ok(())
            })
        })?;
        self.changed(key);
        Ok(fresh)
    }

    async fn semaphore_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool> {
        self.write(Kind::Semaphore, key, false, |entry, room| {
            let entry = entry.ok_or_else(|| DsError::Invalid(format!("semaphore {key:?} is not initialized")))?;
            let now = Instant::now();
            let (expired, granted, new) = match &entry.data {
                Data::Semaphore { permits, holders } => {
                    let expired: u64 =
                        holders.iter().filter(|(_, until)| **until <= now).map(|(h, _)| item(h.len())).sum();
                    let live = holders.values().filter(|until| **until > now).count() as u64;
                    let mine = holders.get(holder).is_some_and(|until| *until > now);
                    let granted = live < *permits || mine;
                    (expired, granted, !mine)
                }
                _ => return Err(unreachable_kind(key, Kind::Semaphore)),
            };
            let added = if granted && new { item(holder.len()) } else { 0 };
            room.resize(entry, added, expired)?;
            data!(entry, key, Kind::Semaphore, Data::Semaphore { holders, .. } => {
                holders.retain(|_, until| *until > now);
                if granted {
                    holders.insert(holder.to_owned(), later(now, lease_ms));
                }
                Ok(granted)
            })
        })
    }

    async fn semaphore_renew(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool> {
        self.with(Kind::Semaphore, key, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Semaphore, Data::Semaphore { holders, .. } => {
                let now = Instant::now();
                match holders.get_mut(holder) {
                    Some(until) if *until > now => {
                        *until = later(now, lease_ms);
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }),
        })
    }

    async fn semaphore_release(&self, key: &str, holder: &str) -> DsResult<bool> {
        let released = self.write(Kind::Semaphore, key, false, |entry, room| match entry {
            None => Ok(false),
            Some(entry) => {
                let held = match &entry.data {
                    Data::Semaphore { holders, .. } => holders.contains_key(holder),
                    _ => return Err(unreachable_kind(key, Kind::Semaphore)),
                };
                if held {
                    room.resize(entry, 0, item(holder.len()))?;
                }
                data!(entry, key, Kind::Semaphore, Data::Semaphore { holders, .. } => Ok(holders.remove(holder).is_some()))
            }
        })?;
        if released {
            self.changed(key);
        }
        Ok(released)
    }

    async fn semaphore_available(&self, key: &str) -> DsResult<u64> {
        self.with(Kind::Semaphore, key, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Semaphore, Data::Semaphore { permits, holders } => {
                let now = Instant::now();
                let held = holders.values().filter(|until| **until > now).count() as u64;
                Ok(permits.saturating_sub(held))
            }),
        })
    }

    async fn publish(&self, topic: &str, message: &[u8]) -> DsResult<u64> {
        let sender = self.topics.lock().get(topic).cloned();
        Ok(sender.map_or(0, |s| s.send(Bytes::copy_from_slice(message)).unwrap_or(0) as u64))
    }

    async fn subscribe(&self, topic: &str) -> DsResult<BoxStream<'static, Bytes>> {
        let rx = self
            .topics
            .lock()
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(TOPIC_BUFFER_LEN).0)
            .subscribe();
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(message) => return Some((message, rx)),
                    // At most once: a subscriber that fell behind skips what it missed.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })))
    }

    async fn reliable_publish(&self, topic: &str, message: &[u8], retention: Retention) -> DsResult<u64> {
        let seq = self.write(Kind::ReliableTopic, topic, true, |entry, room| {
            let entry = entry.ok_or_else(|| unreachable_kind(topic, Kind::ReliableTopic))?;
            let now = Instant::now();
            let oldest = retention.age_ms_max.and_then(|age_ms| now.checked_sub(Duration::from_millis(age_ms)));
            let too_old = |at: &Instant| oldest.is_some_and(|o| *at < o);
            // What retention drops once the message is in, counted before anything changes:
            // a prefix of the existing messages (by count, then by age), and the new one
            // itself only when the count allows none.
            let (added, removed) = match &entry.data {
                Data::Reliable { items, .. } => {
                    let count_drop = (items.len() as u64 + 1).saturating_sub(retention.count_max);
                    let removed: u64 = items
                        .iter()
                        .enumerate()
                        .take_while(|(i, (_, at, _))| (*i as u64) < count_drop || too_old(at))
                        .map(|(_, (_, _, m))| item(m.len()))
                        .sum();
                    let added = if count_drop > items.len() as u64 { 0 } else { item(message.len()) };
                    (added, removed)
                }
                _ => return Err(unreachable_kind(topic, Kind::ReliableTopic)),
            };
            room.resize(entry, added, removed)?;
            data!(entry, topic, Kind::ReliableTopic, Data::Reliable { last_seq, items } => {
                *last_seq += 1;
                items.push_back((*last_seq, now, Bytes::copy_from_slice(message)));
                while items.len() as u64 > retention.count_max {
                    items.pop_front();
                }
                while items.front().is_some_and(|(_, at, _)| too_old(at)) {
                    items.pop_front();
                }
                Ok(*last_seq)
            })
        })?;
        self.changed(topic);
        Ok(seq)
    }

    async fn reliable_read(&self, topic: &str, after: u64, max: usize, wait_ms: u64) -> DsResult<ReliableBatch> {
        let deadline = later(Instant::now(), wait_ms);
        loop {
            let batch = self.with(Kind::ReliableTopic, topic, |entry| match entry {
                None => Ok(ReliableBatch::default()),
                Some(entry) => data!(entry, topic, Kind::ReliableTopic, Data::Reliable { items, .. } => Ok(ReliableBatch {
                    first_retained: items.front().map_or(0, |(seq, _, _)| *seq),
                    last: items.back().map_or(0, |(seq, _, _)| *seq),
                    messages: items.iter().filter(|(seq, _, _)| *seq > after).take(max).map(|(s, _, m)| (*s, m.clone())).collect(),
                })),
            })?;
            let left = deadline.saturating_duration_since(Instant::now());
            if !batch.messages.is_empty() || left.is_zero() {
                return Ok(batch);
            }
            self.wait_change(topic, u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)).await;
        }
    }

    async fn wait_change(&self, key: &str, timeout_ms: u64) {
        self.changes.wait(key, timeout_ms).await;
    }
}

/// A list index from `index` (negative: from the back) for a list of `len`.
fn resolve(index: i64, len: usize) -> Option<usize> {
    let len = len as i64;
    let i = if index < 0 { len + index } else { index };
    (0..len).contains(&i).then_some(i as usize)
}

/// `ms` after `from`; far in the future when that overflows the clock (callers bound their
/// durations, so this only guards against a panic).
fn later(from: Instant, ms: u64) -> Instant {
    const FAR_MS: u64 = super::TTL_MS_MAX;
    from.checked_add(Duration::from_millis(ms))
        .or_else(|| from.checked_add(Duration::from_millis(FAR_MS)))
        .unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;

    fn store(bytes_max: u64) -> InMemory {
        InMemory::with_config(InMemoryConfig { bytes_max })
    }

    fn assert_exact(store: &InMemory) -> u64 {
        let (recounted, used) = store.bytes_recounted();
        assert_eq!(recounted, used, "the running count matches a recount");
        used
    }

    /// Bytes a cache value of `len` bytes under `key` counts.
    fn value_bytes(key: &str, len: usize) -> u64 {
        key.len() as u64 + ENTRY_OVERHEAD_BYTES + len as u64
    }

    #[tokio::test]
    async fn accounting_stays_exact_through_every_kind_and_operation() {
        let bytes_max = 64 * KIB;
        let store = store(bytes_max);
        let mut rng = fastrand::Rng::with_seed(9);
        let kinds = [Kind::Value, Kind::Map, Kind::MultiMap, Kind::Set, Kind::List, Kind::Queue];
        let (mut refused, mut evicting) = (0, 0);
        for step in 0..20_000 {
            let key = format!("k{}", rng.usize(..24));
            let kind = kinds[rng.usize(..kinds.len())];
            let bytes = vec![rng.u8(..4); rng.usize(..2_000)];
            let small = [rng.u8(..8)];
            let before = store.len();
            let result = match (kind, rng.u8(..4)) {
                (Kind::Value, 0) => store.value_set(kind, &key, &bytes, Some(rng.u64(1..50))).await.map(drop),
                (Kind::Value, 1) => store.value_set(kind, &key, &bytes, None).await.map(drop),
                (Kind::Value, 2) => store.value_append(&key, &bytes, 8_000).await.map(drop),
                (Kind::Value, _) => store.value_cas(kind, &key, None, &bytes).await.map(drop),
                (Kind::Map | Kind::MultiMap, 0 | 1) => store.map_put(kind, &key, &small, &bytes).await.map(drop),
                (Kind::Map | Kind::MultiMap, 2) => store.map_remove(kind, &key, &small, None).await.map(drop),
                (Kind::Map | Kind::MultiMap, _) => store.map_remove(kind, &key, &small, Some(&bytes)).await.map(drop),
                (Kind::Set, 0 | 1) => store.set_add(&key, &bytes).await.map(drop),
                (Kind::Set, _) => store.set_remove(&key, &bytes).await.map(drop),
                (_, 0 | 1) => store.list_push(kind, &key, &bytes, rng.bool(), Some(8)).await.map(drop),
                (Kind::List, 2) => store.list_set(&key, rng.i64(-3..3), &bytes).await.map(drop),
                (_, _) => store.list_pop(kind, &key, rng.bool()).await.map(drop),
            };
            match result {
                Err(err) if err.is_full() => refused += 1,
                // Keys reused across kinds.
                Err(DsError::WrongKind { .. } | DsError::TooLarge { .. }) => {}
                Err(err) => panic!("step {step}: {err}"),
                Ok(()) => {}
            }
            if store.len() < before {
                evicting += 1;
            }
            if rng.u8(..50) == 0 {
                let _ = store.delete(kind, &key).await;
            }
            let used = assert_exact(&store);
            assert!(used <= bytes_max, "step {step}: {used} bytes held, over {bytes_max}");
        }
        assert!(refused > 0 && evicting > 0, "the budget was reached: {refused} refused, {evicting} evicting");
    }

    #[tokio::test]
    async fn coordination_structures_count_too() {
        let store = store(64 * KIB);
        assert!(store.lock_acquire("lock", &"h".repeat(300), 60_000).await.unwrap().is_some());
        assert_eq!(assert_exact(&store), value_bytes("lock", 300));
        store.semaphore_init("sem", 2).await.unwrap();
        assert!(store.semaphore_acquire("sem", "a", 1).await.unwrap());
        assert!(store.semaphore_acquire("sem", "b", 60_000).await.unwrap());
        assert_exact(&store);
        tokio::time::sleep(Duration::from_millis(5)).await;
        // a's lease ran out: acquiring drops it from the count.
        assert!(store.semaphore_acquire("sem", "c", 60_000).await.unwrap());
        assert!(store.semaphore_release("sem", "b").await.unwrap());
        assert_exact(&store);
        let retention = Retention { count_max: 3, age_ms_max: None };
        for _ in 0..10 {
            store.reliable_publish("topic", &[7; 500], retention).await.unwrap();
            assert_exact(&store);
        }
        let none = Retention { count_max: 0, age_ms_max: None };
        store.reliable_publish("topic", &[7; 500], none).await.unwrap();
        assert_eq!(store.reliable_read("topic", 0, 10, 0).await.unwrap().messages.len(), 0);
        assert_exact(&store);
        store.counter_add("counter", 5).await.unwrap();
        store.latch_try_set("latch", 2).await.unwrap();
        assert_exact(&store);
        for (kind, key) in [(Kind::Lock, "lock"), (Kind::Semaphore, "sem"), (Kind::ReliableTopic, "topic")] {
            assert!(store.delete(kind, key).await.unwrap());
        }
        assert!(store.delete(Kind::Counter, "counter").await.unwrap());
        assert!(store.delete(Kind::Latch, "latch").await.unwrap());
        assert_eq!(assert_exact(&store), 0, "nothing is counted once everything is deleted");
    }

    #[tokio::test]
    async fn a_full_store_evicts_values_with_a_ttl_soonest_expiry_first() {
        // Room for about four 1 KiB values besides the reserve.
        let bytes_max = 4 * value_bytes("v0", 1_024) * 16 / 15 + 8;
        let store = store(bytes_max);
        store.value_set(Kind::Value, "v0", &[0; 1_024], Some(60_000)).await.unwrap();
        store.value_set(Kind::Value, "v1", &[1; 1_024], Some(10_000)).await.unwrap();
        store.value_set(Kind::Value, "v2", &[2; 1_024], None).await.unwrap();
        store.value_set(Kind::Value, "v3", &[3; 1_024], Some(30_000)).await.unwrap();
        let used = assert_exact(&store);
        assert_eq!(used, 4 * value_bytes("v0", 1_024));
        // A fifth value evicts v1, the one closest to expiry; a sixth, v3.
        store.value_set(Kind::Value, "v4", &[4; 1_024], None).await.unwrap();
        assert!(!store.exists(Kind::Value, "v1").await.unwrap(), "v1 expires first: evicted");
        assert!(store.exists(Kind::Value, "v3").await.unwrap());
        store.value_set(Kind::Value, "v5", &[5; 1_024], Some(1_000)).await.unwrap();
        assert!(!store.exists(Kind::Value, "v3").await.unwrap(), "then v3");
        for kept in ["v0", "v2", "v4", "v5"] {
            assert!(store.exists(Kind::Value, kept).await.unwrap(), "{kept} is kept");
        }
        assert!(assert_exact(&store) <= bytes_max);
        // Overwriting a value never evicts it to make room for itself.
        store.value_set(Kind::Value, "v5", &[6; 1_100], Some(1_000)).await.unwrap();
        assert_eq!(store.value_get(Kind::Value, "v5").await.unwrap().unwrap().bytes.len(), 1_100);
        assert!(!store.exists(Kind::Value, "v0").await.unwrap(), "v0 was the only other one with a TTL");
    }

    #[tokio::test]
    async fn a_write_that_cannot_fit_is_refused_and_changes_nothing() {
        let bytes_max = 16 * KIB;
        let store = store(bytes_max);
        store.value_set(Kind::Value, "plain", &[1; 8_000], None).await.unwrap();
        store.value_set(Kind::Value, "brief", &[2; 2_000], Some(60_000)).await.unwrap();
        store.list_push(Kind::List, "list", b"item", false, None).await.unwrap();
        let used = assert_exact(&store);
        let version = store.value_get(Kind::Value, "plain").await.unwrap().unwrap().version;
        // Even with "brief" evicted there is no room: nothing is evicted, nothing written.
        let refusals = [
            store.value_set(Kind::Value, "plain", &[3; 16_000], None).await.map(drop),
            store.value_set(Kind::Value, "new", &[3; 8_000], Some(10)).await.map(drop),
            store.value_append("plain", &[3; 8_000], 1 << 20).await.map(drop),
            store.value_cas(Kind::Value, "plain", Some(version), &[3; 16_000]).await.map(drop),
            store.map_put(Kind::Map, "map", b"f", &[3; 16_000]).await.map(drop),
            store.set_add("set", &[3; 16_000]).await.map(drop),
            store.list_push(Kind::List, "list", &[3; 16_000], true, None).await.map(drop),
            store.list_set("list", 0, &[3; 16_000]).await.map(drop),
            store.reliable_publish("topic", &[3; 16_000], Retention::default()).await.map(drop),
            store.lock_acquire("lock", &"h".repeat(16_000), 1_000).await.map(drop),
        ];
        for (i, refused) in refusals.into_iter().enumerate() {
            let err = refused.err().unwrap_or_else(|| panic!("write {i} found no room"));
            assert!(err.is_full(), "write {i}: {err}");
            assert!(err.to_string().contains("bytes_max"), "a message that says what to do: {err}");
        }
        assert_eq!(assert_exact(&store), used, "the count did not move");
        let plain = store.value_get(Kind::Value, "plain").await.unwrap().unwrap();
        assert_eq!((plain.bytes.len(), plain.version), (8_000, version));
        assert!(store.exists(Kind::Value, "brief").await.unwrap(), "nothing was evicted for a refused write");
        for (kind, key) in [(Kind::Value, "new"), (Kind::Map, "map"), (Kind::Set, "set"), (Kind::Lock, "lock")] {
            assert!(!store.exists(kind, key).await.unwrap(), "{key} was not created");
        }
        assert_eq!(store.list_range("list", 0, -1, 10).await.unwrap(), vec![Bytes::from_static(b"item")]);
        // Shrinking writes and deletes always work; then there is room again.
        store.value_set(Kind::Value, "plain", b"small", None).await.unwrap();
        store.value_set(Kind::Value, "new", &[3; 8_000], None).await.unwrap();
        assert!(assert_exact(&store) <= bytes_max);
    }

    #[tokio::test]
    async fn reserved_keys_may_use_the_last_sixteenth() {
        let bytes_max = 16 * KIB;
        let store = store(bytes_max);
        let user_max = bytes_max - bytes_max / 16;
        let fill = (user_max - value_bytes("user/a", 0)) as usize;
        store.value_set(Kind::Value, "user/a", &vec![0; fill], None).await.unwrap();
        assert_eq!(assert_exact(&store), user_max);
        assert!(store.set_add("user/b", b"x").await.unwrap_err().is_full(), "users are at their limit");
        store.value_set(Kind::Value, "girder/config/n1", &[0; 512], None).await.expect("girder's own state fits");
        let err = store.value_set(Kind::Value, "girder/big", &[0; 1_024], None).await.unwrap_err();
        assert!(err.is_full(), "the whole budget is a hard limit: {err}");
    }

    #[test]
    fn writes_purge_expired_entries_without_a_sweep() {
        // Made outside a runtime: no sweep task, only the writes purge.
        let store = store(1 << 20);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            for i in 0..1_000 {
                store.value_set(Kind::Value, &format!("brief{i}"), &[0; 100], Some(300)).await.unwrap();
            }
            assert!(assert_exact(&store) >= 1_000 * 100);
            assert_eq!(store.len(), 1_000, "nothing expired yet");
            std::thread::sleep(Duration::from_millis(300));
            for i in 0..1_000 / PURGE_PER_WRITE {
                store.counter_add(&format!("n{i}"), 1).await.unwrap();
            }
            let counters: u64 = (0..1_000 / PURGE_PER_WRITE).map(|i| value_bytes(&format!("n{i}"), 0)).sum();
            assert_eq!(assert_exact(&store), counters, "every expired value was purged by the writes");
            assert_eq!(store.len(), 1_000 / PURGE_PER_WRITE);
        });
    }

    #[tokio::test]
    async fn the_sweep_purges_expired_entries_of_an_idle_store() {
        let store = store(1 << 20);
        for i in 0..3_000 {
            // Atoms are never evicted, only purged once expired.
            store.value_set(Kind::Atom, &format!("a{i}"), &[0; 10], Some(300)).await.unwrap();
        }
        assert_eq!(store.len(), 3_000, "nothing expired yet");
        let begun = Instant::now();
        while !store.is_empty() {
            assert!(begun.elapsed() < Duration::from_secs(5), "{} entries left after 5 s", store.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(assert_exact(&store), 0);
    }
}
