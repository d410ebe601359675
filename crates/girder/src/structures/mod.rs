//! Distributed data structures on the statekeeper: a cache of values, atoms, counters,
//! maps, multimaps, sets, lists, queues, locks with fencing tokens, countdown latches,
//! semaphores, topics and reliable topics.
//!
//! [`Structures`] is the plug point: a small set of atomic operations, each one step on the
//! store (one Lua script or command on Redis). The typed handles in the submodules
//! ([`Cache`], [`Atom`], [`Map`], ...) encode values with MessagePack and add the loops
//! (compare-and-set retries, waits, lease renewals) on top. Every key holds one kind of
//! structure; using it as another kind is a [`DsError::WrongKind`] and leaves it untouched.

pub(crate) mod changes;
mod collections;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod coordination;
mod frames;
pub mod memory;
mod topics;
mod values;

pub use collections::{List, Map, MultiMap, Queue, Set};
pub use coordination::{CountDownLatch, Lock, LockGuard, Permit, Semaphore};
pub use frames::Compression;
pub use topics::{ReliableTopic, Retention, Topic};
pub use values::{Atom, Cache, CacheConfig, Counter};

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// The kind of structure a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A cache entry ([`Cache`]).
    Value,
    /// An [`Atom`].
    Atom,
    /// A [`Counter`].
    Counter,
    /// A [`Map`].
    Map,
    /// A [`MultiMap`].
    MultiMap,
    /// A [`Set`].
    Set,
    /// A [`List`].
    List,
    /// A [`Queue`].
    Queue,
    /// A [`Lock`].
    Lock,
    /// A [`CountDownLatch`].
    Latch,
    /// A [`Semaphore`].
    Semaphore,
    /// A [`ReliableTopic`].
    ReliableTopic,
}

impl Kind {
    /// The kind's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Value => "value",
            Kind::Atom => "atom",
            Kind::Counter => "counter",
            Kind::Map => "map",
            Kind::MultiMap => "multimap",
            Kind::Set => "set",
            Kind::List => "list",
            Kind::Queue => "queue",
            Kind::Lock => "lock",
            Kind::Latch => "latch",
            Kind::Semaphore => "semaphore",
            Kind::ReliableTopic => "reliable_topic",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Kind> {
        [
            Kind::Value,
            Kind::Atom,
            Kind::Counter,
            Kind::Map,
            Kind::MultiMap,
            Kind::Set,
            Kind::List,
            Kind::Queue,
            Kind::Lock,
            Kind::Latch,
            Kind::Semaphore,
            Kind::ReliableTopic,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a data-structure operation failed. The stored data is unchanged by a failed one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsError {
    /// The key holds another kind of structure.
    #[error("key {key:?} holds a {found}, not a {expected}")]
    WrongKind {
        /// The key.
        key: String,
        /// The kind the operation needs.
        expected: Kind,
        /// The kind the key holds.
        found: String,
    },
    /// A value is larger than the configured maximum.
    #[error("value for key {key:?} is {bytes} bytes; the limit is {max_bytes}")]
    TooLarge {
        /// The key.
        key: String,
        /// The value's size.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// A key name is empty or too long.
    #[error("bad key {key:?}: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored value does not decode as the type asked for.
    #[error("value for key {key:?} does not decode: {message}")]
    Decode {
        /// The key.
        key: String,
        /// What the decoder said.
        message: String,
    },
    /// A value does not encode.
    #[error("value for key {key:?} does not encode: {message}")]
    Encode {
        /// The key.
        key: String,
        /// What the encoder said.
        message: String,
    },
    /// A structure's precondition does not hold (e.g. a latch or semaphore not set up).
    #[error("{0}")]
    Invalid(String),
    /// A wait ran out of time.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// A reliable topic's subscriber asked for messages retention already dropped.
    #[error("messages {from}..{to} of topic {topic:?} were dropped by its retention before they were read")]
    Gap {
        /// The topic.
        topic: String,
        /// First missing sequence id.
        from: u64,
        /// First sequence id still retained.
        to: u64,
    },
    /// The store is unreachable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write refused because the store has no room left for it; it changed nothing.
    #[error("store full: {0}")]
    Full(String),
}

impl DsError {
    /// A write refused because the store has no room left for it (the in-memory store's
    /// [`memory::InMemoryConfig::bytes_max`]); it changed nothing.
    pub(crate) fn full(message: impl fmt::Display) -> DsError {
        DsError::Full(message.to_string())
    }

    /// Whether this is a write refused because the store is full.
    pub fn is_full(&self) -> bool {
        matches!(self, DsError::Full(_))
    }
}

/// Result of a data-structure operation.
pub type DsResult<T> = Result<T, DsError>;

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1_024;
/// Longest time-to-live or lease accepted, in milliseconds (100 years): longer ones are
/// refused before anything is written, so no clock arithmetic can overflow.
pub const TTL_MS_MAX: u64 = 100 * 365 * 24 * 3_600_000;

pub(crate) fn check_key(key: &str) -> DsResult<()> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(DsError::BadKey {
            key: key.chars().take(64).collect(),
            reason: format!("must be 1 to {KEY_BYTES_MAX} bytes"),
        });
    }
    Ok(())
}

/// A stored value with its version; every write of the key increases the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The stored bytes.
    pub bytes: Bytes,
    /// The version, 1 for the first write.
    pub version: u64,
}

/// A batch read from a reliable topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReliableBatch {
    /// The oldest sequence id still retained (0 when the topic is empty).
    pub first_retained: u64,
    /// The newest sequence id retained (0 when the topic is empty): with the position a
    /// reader is at, how far it lags.
    pub last: u64,
    /// Messages after the requested sequence id, in order.
    pub messages: Vec<(u64, Bytes)>,
}

/// The atomic operations of the data structures; see the module docs. Keys are plain names;
/// an implementation scopes them to its grid. Every operation checks the key's kind.
#[async_trait]
pub trait Structures: Send + Sync + 'static {
    /// The value of `key`, if set.
    async fn value_get(&self, kind: Kind, key: &str) -> DsResult<Option<Versioned>>;
    /// Sets `key` (expiring after `ttl_ms` if given); returns the new version.
    async fn value_set(&self, kind: Kind, key: &str, value: &[u8], ttl_ms: Option<u64>) -> DsResult<u64>;
    /// Sets `key` only if its version is `expected` (`None`: only if unset). Returns the new
    /// version, or `None` when the version did not match.
    async fn value_cas(&self, kind: Kind, key: &str, expected: Option<u64>, value: &[u8]) -> DsResult<Option<u64>>;
    /// Sets `key` only if its stored bytes equal `expected` (`None`: only if unset), in one
    /// atomic step: a concurrent rewrite of the same bytes does not make it fail. Returns
    /// the new version, or `None` when the bytes did not match.
    async fn value_compare_and_set(
        &self,
        kind: Kind,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> DsResult<Option<u64>>;
    /// Appends to `key`'s bytes (creating it) unless the result would exceed `max_bytes`;
    /// returns the new length.
    async fn value_append(&self, key: &str, chunk: &[u8], max_bytes: usize) -> DsResult<u64>;
    /// Deletes `key` if it holds `kind`; returns whether it existed.
    async fn delete(&self, kind: Kind, key: &str) -> DsResult<bool>;
    /// Whether `key` holds a `kind`.
    async fn exists(&self, kind: Kind, key: &str) -> DsResult<bool>;

    /// Adds `delta` to the counter `key` (0 when unset); returns the new value.
    async fn counter_add(&self, key: &str, delta: i64) -> DsResult<i64>;
    /// Sets the counter to `new` if it is `expected`; returns whether it did.
    async fn counter_cas(&self, key: &str, expected: i64, new: i64) -> DsResult<bool>;

    /// Puts `field` = `value` in a map or multimap (multimaps keep every distinct value);
    /// for a map returns the previous value, for a multimap whether the pair is new (as
    /// `Some(empty)`).
    async fn map_put(&self, kind: Kind, key: &str, field: &[u8], value: &[u8]) -> DsResult<Option<Bytes>>;
    /// The values of `field`: at most one for a map.
    async fn map_get(&self, kind: Kind, key: &str, field: &[u8]) -> DsResult<Vec<Bytes>>;
    /// Removes `field` (all its values, or only `value` when given); returns how many went.
    async fn map_remove(&self, kind: Kind, key: &str, field: &[u8], value: Option<&[u8]>) -> DsResult<u64>;
    /// Number of fields of a map, of pairs of a multimap.
    async fn map_len(&self, kind: Kind, key: &str) -> DsResult<u64>;
    /// Up to `limit` (field, value) pairs.
    async fn map_entries(&self, kind: Kind, key: &str, limit: usize) -> DsResult<Vec<(Bytes, Bytes)>>;

    /// Adds `member` to a set; returns whether it is new.
    async fn set_add(&self, key: &str, member: &[u8]) -> DsResult<bool>;
    /// Removes `member`; returns whether it was there.
    async fn set_remove(&self, key: &str, member: &[u8]) -> DsResult<bool>;
    /// Whether `member` is in the set.
    async fn set_contains(&self, key: &str, member: &[u8]) -> DsResult<bool>;
    /// The set's size.
    async fn set_len(&self, key: &str) -> DsResult<u64>;
    /// Up to `limit` members.
    async fn set_members(&self, key: &str, limit: usize) -> DsResult<Vec<Bytes>>;

    /// Pushes to a list or queue unless it holds `capacity` items already; returns the new
    /// length, or `None` when full.
    async fn list_push(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
        front: bool,
        capacity: Option<u64>,
    ) -> DsResult<Option<u64>>;
    /// Pops from the front or back.
    async fn list_pop(&self, kind: Kind, key: &str, front: bool) -> DsResult<Option<Bytes>>;
    /// Pops from the front of a queue, waiting up to `timeout_ms` for an item.
    async fn queue_poll(&self, key: &str, timeout_ms: u64) -> DsResult<Option<Bytes>>;
    /// The item at `index` (negative from the end).
    async fn list_get(&self, key: &str, index: i64) -> DsResult<Option<Bytes>>;
    /// Replaces the item at `index`; returns whether it existed.
    async fn list_set(&self, key: &str, index: i64, value: &[u8]) -> DsResult<bool>;
    /// Items `start..=stop` (negative from the end), at most `limit`.
    async fn list_range(&self, key: &str, start: i64, stop: i64, limit: usize) -> DsResult<Vec<Bytes>>;
    /// The length of a list or queue.
    async fn list_len(&self, kind: Kind, key: &str) -> DsResult<u64>;

    /// Takes the lock for `holder` for `lease_ms` if it is free (or its lease ran out);
    /// returns the fencing token, which is larger than every token handed out before.
    async fn lock_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<Option<u64>>;
    /// Extends the lease if `holder` still holds the lock with `token`.
    async fn lock_renew(&self, key: &str, holder: &str, token: u64, lease_ms: u64) -> DsResult<bool>;
    /// Releases the lock if `holder` still holds it with `token`.
    async fn lock_release(&self, key: &str, holder: &str, token: u64) -> DsResult<bool>;
    /// The current holder and token, if the lock is held.
    async fn lock_holder(&self, key: &str) -> DsResult<Option<(String, u64)>>;

    /// Sets a latch's count if it is not set or already at zero; returns whether it did.
    async fn latch_try_set(&self, key: &str, count: u64) -> DsResult<bool>;
    /// Counts the latch down by one (not below zero); returns the new count.
    async fn latch_count_down(&self, key: &str) -> DsResult<u64>;
    /// The latch's count (0 when unset).
    async fn latch_count(&self, key: &str) -> DsResult<u64>;

    /// Sets a semaphore's number of permits; returns whether it was unset before.
    async fn semaphore_init(&self, key: &str, permits: u64) -> DsResult<bool>;
    /// Takes a permit for `holder` (a unique id) for `lease_ms` if one is free.
    async fn semaphore_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool>;
    /// Extends `holder`'s lease; false when it no longer holds a permit.
    async fn semaphore_renew(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool>;
    /// Returns `holder`'s permit.
    async fn semaphore_release(&self, key: &str, holder: &str) -> DsResult<bool>;
    /// Permits free now (expired leases count as free).
    async fn semaphore_available(&self, key: &str) -> DsResult<u64>;

    /// Publishes to a topic's current subscribers (at most once); returns how many got it
    /// (0 when the store cannot tell).
    async fn publish(&self, topic: &str, message: &[u8]) -> DsResult<u64>;
    /// The messages published to `topic` from now on.
    async fn subscribe(&self, topic: &str) -> DsResult<BoxStream<'static, Bytes>>;
    /// Appends to a reliable topic, dropping what `retention` no longer keeps; returns the
    /// message's sequence id (1, 2, ...).
    async fn reliable_publish(&self, topic: &str, message: &[u8], retention: Retention) -> DsResult<u64>;
    /// Up to `max` messages with sequence ids above `after`, waiting up to `wait_ms` for
    /// the first one.
    async fn reliable_read(&self, topic: &str, after: u64, max: usize, wait_ms: u64) -> DsResult<ReliableBatch>;

    /// Resolves when `key` may have changed (a write, a release, a count down), or after
    /// `timeout_ms`. Wake-ups may be spurious; waiting loops re-check.
    async fn wait_change(&self, key: &str, timeout_ms: u64);
}

/// Shared handle to a [`Structures`] implementation.
pub type Store = Arc<dyn Structures>;
