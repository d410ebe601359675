//! The in-memory implementation of [`Structures`], used by the embedded statekeeper.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{DsError, DsResult, Kind, ReliableBatch, Retention, Structures, Versioned};

/// Messages a slow subscriber of a topic may fall behind before it misses some.
const TOPIC_BUFFER_LEN: usize = 4_096;
/// Most keys held; creating more fails until some are deleted or expire.
pub const KEYS_MAX: usize = 10_000_000;
/// Every this many key creations, expired entries nobody read again are swept.
const SWEEP_EVERY: u64 = 4_096;

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

struct Entry {
    kind: Kind,
    expires_at: Option<Instant>,
    data: Data,
}

impl Entry {
    fn new(kind: Kind) -> Entry {
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
        Entry { kind, expires_at: None, data }
    }
}

/// Default of [`InMemoryConfig::bytes_max`]: 1 GiB.
pub const BYTES_MAX_DEFAULT: u64 = 1 << 30;

/// Limits of the in-memory store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InMemoryConfig {
    /// Most bytes every structure together may take, counted as key and value bytes plus a
    /// fixed overhead per key and per element of a collection.
    pub bytes_max: u64,
}

impl Default for InMemoryConfig {
    fn default() -> Self {
        InMemoryConfig { bytes_max: BYTES_MAX_DEFAULT }
    }
}

/// Every structure in this process's memory.
#[derive(Default)]
pub struct InMemory {
    config: InMemoryConfig,
    entries: Mutex<HashMap<String, Entry>>,
    changes: super::changes::ChangeNotices,
    topics: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
    /// Versions are unique across keys and time, so a deleted and re-created value never
    /// reuses a version a stale compare-and-set could match.
    versions: AtomicU64,
    creations: AtomicU64,
}

fn wrong(key: &str, expected: Kind, found: Kind) -> DsError {
    DsError::WrongKind { key: key.to_owned(), expected, found: found.to_string() }
}

fn unreachable_kind(key: &str, kind: Kind) -> DsError {
    DsError::Invalid(format!("key {key:?}: internal kind mismatch for {kind}"))
}

impl InMemory {
    /// An empty store.
    pub fn new() -> InMemory {
        InMemory::default()
    }

    /// An empty store with the limits of `config`.
    pub fn with_config(config: InMemoryConfig) -> InMemory {
        InMemory { config, ..InMemory::default() }
    }

    /// Runs `f` on `key`'s entry of `kind` (created when `create`), after checking the kind
    /// and dropping it if expired.
    fn with<R>(
        &self,
        kind: Kind,
        key: &str,
        create: bool,
        f: impl FnOnce(Option<&mut Entry>) -> DsResult<R>,
    ) -> DsResult<R> {
        let mut entries = self.entries.lock();
        if entries.get(key).is_some_and(|e| e.expires_at.is_some_and(|at| at <= Instant::now())) {
            entries.remove(key);
        }
        if let Some(entry) = entries.get(key) {
            let compatible = entry.kind == kind;
            if !compatible {
                return Err(wrong(key, kind, entry.kind));
            }
        }
        if create && !entries.contains_key(key) {
            if self.creations.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                let now = Instant::now();
                entries.retain(|_, e| e.expires_at.is_none_or(|at| at > now));
            }
            if entries.len() >= KEYS_MAX {
                return Err(DsError::Invalid(format!("the store holds {KEYS_MAX} keys, its limit; delete some first")));
            }
            entries.insert(key.to_owned(), Entry::new(kind));
        }
        f(entries.get_mut(key))
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

impl InMemory {
    /// Sets `key` to `value` when `matches(version, bytes)` holds for what it holds now (an
    /// absent key, created only when `create`, has version 0 and no bytes); the new version,
    /// or `None` when it did not match. One step under the store's lock.
    fn set_value_if(
        &self,
        kind: Kind,
        key: &str,
        create: bool,
        value: &[u8],
        matches: impl FnOnce(u64, &[u8]) -> bool,
    ) -> DsResult<Option<u64>> {
        let new_version = self.next_version();
        let swapped = self.with(kind, key, create, |entry| {
            // Absent while something was expected: no match.
            let Some(entry) = entry else { return Ok(None) };
            data!(entry, key, kind, Data::Value { bytes, version } => {
                if !matches(*version, &bytes[..]) {
                    return Ok(None);
                }
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
        self.with(kind, key, false, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, kind, Data::Value { bytes, version } =>
                Ok(Some(Versioned { bytes: bytes.clone(), version: *version }))),
        })
    }

    async fn value_set(&self, kind: Kind, key: &str, value: &[u8], ttl_ms: Option<u64>) -> DsResult<u64> {
        let new_version = self.next_version();
        let version = self.with(kind, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
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
        let len = self.with(Kind::Value, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Value))?;
            data!(entry, key, Kind::Value, Data::Value { bytes, version } => {
                let total = bytes.len() + chunk.len();
                if total > max_bytes {
                    return Err(DsError::TooLarge { key: key.to_owned(), bytes: total, max_bytes });
                }
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
        let existed = self.with(kind, key, false, |entry| Ok(entry.is_some()))?;
        if existed {
            self.entries.lock().remove(key);
            self.changed(key);
        }
        Ok(existed)
    }

    async fn exists(&self, kind: Kind, key: &str) -> DsResult<bool> {
        self.with(kind, key, false, |entry| Ok(entry.is_some()))
    }

    async fn counter_add(&self, key: &str, delta: i64) -> DsResult<i64> {
        self.with(Kind::Counter, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Counter))?;
            data!(entry, key, Kind::Counter, Data::Counter(value) => {
                *value = value.checked_add(delta).ok_or_else(|| DsError::Invalid(format!("counter {key:?} would overflow")))?;
                Ok(*value)
            })
        })
    }

    async fn counter_cas(&self, key: &str, expected: i64, new: i64) -> DsResult<bool> {
        self.with(Kind::Counter, key, true, |entry| {
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
        self.with(kind, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
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
        self.with(kind, key, false, |entry| match entry.map(|e| &e.data) {
            None => Ok(Vec::new()),
            Some(Data::Map(map)) => Ok(map.get(field).cloned().into_iter().collect()),
            Some(Data::MultiMap(map)) => Ok(map.get(field).map(|s| s.iter().cloned().collect()).unwrap_or_default()),
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn map_remove(&self, kind: Kind, key: &str, field: &[u8], value: Option<&[u8]>) -> DsResult<u64> {
        self.with(kind, key, false, |entry| match entry.map(|e| &mut e.data) {
            None => Ok(0),
            Some(Data::Map(map)) => Ok(u64::from(map.remove(field).is_some())),
            Some(Data::MultiMap(map)) => match value {
                None => Ok(map.remove(field).map_or(0, |s| s.len() as u64)),
                Some(value) => {
                    let removed = map.get_mut(field).is_some_and(|s| s.remove(value));
                    if map.get(field).is_some_and(HashSet::is_empty) {
                        map.remove(field);
                    }
                    Ok(u64::from(removed))
                }
            },
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn map_len(&self, kind: Kind, key: &str) -> DsResult<u64> {
        self.with(kind, key, false, |entry| match entry.map(|e| &e.data) {
            None => Ok(0),
            Some(Data::Map(map)) => Ok(map.len() as u64),
            Some(Data::MultiMap(map)) => Ok(map.values().map(|s| s.len() as u64).sum()),
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn map_entries(&self, kind: Kind, key: &str, limit: usize) -> DsResult<Vec<(Bytes, Bytes)>> {
        self.with(kind, key, false, |entry| match entry.map(|e| &e.data) {
            None => Ok(Vec::new()),
            Some(Data::Map(map)) => Ok(map.iter().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()),
            Some(Data::MultiMap(map)) => {
                Ok(map.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone()))).take(limit).collect())
            }
            Some(_) => Err(unreachable_kind(key, kind)),
        })
    }

    async fn set_add(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.with(Kind::Set, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Set))?;
            data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.insert(Bytes::copy_from_slice(member))))
        })
    }

    async fn set_remove(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.with(Kind::Set, key, false, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.remove(member))),
        })
    }

    async fn set_contains(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        self.with(Kind::Set, key, false, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.contains(member))),
        })
    }

    async fn set_len(&self, key: &str) -> DsResult<u64> {
        self.with(Kind::Set, key, false, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Set, Data::Set(set) => Ok(set.len() as u64)),
        })
    }

    async fn set_members(&self, key: &str, limit: usize) -> DsResult<Vec<Bytes>> {
        self.with(Kind::Set, key, false, |entry| match entry {
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
        let pushed = self.with(kind, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, kind))?;
            data!(entry, key, kind, Data::List(list) => {
                if capacity.is_some_and(|cap| list.len() as u64 >= cap) {
                    return Ok(None);
                }
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
        self.with(kind, key, false, |entry| match entry {
            None => Ok(None),
            Some(entry) => {
                data!(entry, key, kind, Data::List(list) => Ok(if front { list.pop_front() } else { list.pop_back() }))
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
        self.with(Kind::List, key, false, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, Kind::List, Data::List(list) =>
                Ok(resolve(index, list.len()).and_then(|i| list.get(i)).cloned())),
        })
    }

    async fn list_set(&self, key: &str, index: i64, value: &[u8]) -> DsResult<bool> {
        self.with(Kind::List, key, false, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::List, Data::List(list) => {
                match resolve(index, list.len()).and_then(|i| list.get_mut(i)) {
                    Some(slot) => {
                        *slot = Bytes::copy_from_slice(value);
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }),
        })
    }

    async fn list_range(&self, key: &str, start: i64, stop: i64, limit: usize) -> DsResult<Vec<Bytes>> {
        self.with(Kind::List, key, false, |entry| match entry {
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
        self.with(kind, key, false, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, kind, Data::List(list) => Ok(list.len() as u64)),
        })
    }

    async fn lock_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<Option<u64>> {
        self.with(Kind::Lock, key, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(key, Kind::Lock))?;
            data!(entry, key, Kind::Lock, Data::Lock { holder: current, last_token } => {
                let now = Instant::now();
                if current.as_ref().is_some_and(|(_, _, until)| *until > now) {
                    return Ok(None);
                }
                *last_token += 1;
                *current = Some((holder.to_owned(), *last_token, later(now, lease_ms)));
                Ok(Some(*last_token))
            })
        })
    }

    async fn lock_renew(&self, key: &str, holder: &str, token: u64, lease_ms: u64) -> DsResult<bool> {
        self.with(Kind::Lock, key, false, |entry| match entry {
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
        let released = self.with(Kind::Lock, key, false, |entry| match entry {
            None => Ok(false),
            Some(entry) => data!(entry, key, Kind::Lock, Data::Lock { holder: current, .. } => {
                match current {
                    Some((h, t, until)) if h == holder && *t == token && *until > Instant::now() => {
                        *current = None;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }),
        })?;
        if released {
            self.changed(key);
        }
        Ok(released)
    }

    async fn lock_holder(&self, key: &str) -> DsResult<Option<(String, u64)>> {
        self.with(Kind::Lock, key, false, |entry| match entry {
            None => Ok(None),
            Some(entry) => data!(entry, key, Kind::Lock, Data::Lock { holder: current, .. } => Ok(current
                .as_ref()
                .filter(|(_, _, until)| *until > Instant::now())
                .map(|(h, t, _)| (h.clone(), *t)))),
        })
    }

    async fn latch_try_set(&self, key: &str, count: u64) -> DsResult<bool> {
        self.with(Kind::Latch, key, true, |entry| {
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
        let left = self.with(Kind::Latch, key, false, |entry| match entry {
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
        self.with(Kind::Latch, key, false, |entry| match entry {
            None => Ok(0),
            Some(entry) => data!(entry, key, Kind::Latch, Data::Latch(current) => Ok(*current)),
        })
    }

    async fn semaphore_init(&self, key: &str, permits: u64) -> DsResult<bool> {
        let fresh = self.with(Kind::Semaphore, key, false, |entry| Ok(entry.is_none()))?;
        self.with(Kind::Semaphore, key, true, |entry| {
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
        self.with(Kind::Semaphore, key, false, |entry| {
            let entry = entry.ok_or_else(|| DsError::Invalid(format!("semaphore {key:?} is not initialized")))?;
            data!(entry, key, Kind::Semaphore, Data::Semaphore { permits, holders } => {
                let now = Instant::now();
                holders.retain(|_, until| *until > now);
                if holders.len() as u64 >= *permits && !holders.contains_key(holder) {
                    return Ok(false);
                }
                holders.insert(holder.to_owned(), later(now, lease_ms));
                Ok(true)
            })
        })
    }

    async fn semaphore_renew(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool> {
        self.with(Kind::Semaphore, key, false, |entry| match entry {
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
        let released = self.with(Kind::Semaphore, key, false, |entry| match entry {
            None => Ok(false),
            Some(entry) => {
                data!(entry, key, Kind::Semaphore, Data::Semaphore { holders, .. } => Ok(holders.remove(holder).is_some()))
            }
        })?;
        if released {
            self.changed(key);
        }
        Ok(released)
    }

    async fn semaphore_available(&self, key: &str) -> DsResult<u64> {
        self.with(Kind::Semaphore, key, false, |entry| match entry {
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
        let seq = self.with(Kind::ReliableTopic, topic, true, |entry| {
            let entry = entry.ok_or_else(|| unreachable_kind(topic, Kind::ReliableTopic))?;
            data!(entry, topic, Kind::ReliableTopic, Data::Reliable { last_seq, items } => {
                let now = Instant::now();
                *last_seq += 1;
                items.push_back((*last_seq, now, Bytes::copy_from_slice(message)));
                while items.len() as u64 > retention.count_max {
                    items.pop_front();
                }
                if let Some(age_ms) = retention.age_ms_max {
                    let oldest = now.checked_sub(Duration::from_millis(age_ms));
                    while items.front().is_some_and(|(_, at, _)| oldest.is_some_and(|o| *at < o)) {
                        items.pop_front();
                    }
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
            let batch = self.with(Kind::ReliableTopic, topic, false, |entry| match entry {
                None => Ok(ReliableBatch::default()),
                Some(entry) => data!(entry, topic, Kind::ReliableTopic, Data::Reliable { items, .. } => Ok(ReliableBatch {
                    first_retained: items.front().map_or(0, |(seq, _, _)| *seq),
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
