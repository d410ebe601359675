//! A node's local persistence, the store's plug point: the [`Engine`] trait (an ordered map of
//! [`ItemKey`] to [`Record`]), an in-memory implementation ([`MemoryEngine`]) and one on disk
//! ([`DiskEngine`], on redb), both held to one conformance suite (`conformance.rs`, feature
//! `testing`).
//!
//! Corrupt records: every stored record carries checksums (see [`super::record`]), and a record
//! that fails them is never returned as data:
//! - `get` returns [`EngineError::Corrupt`] with the key;
//! - `scan_bucket` returns [`EngineError::Corrupt`] for the first corrupt record the page would
//!   hold (the records before it are not returned); the caller repairs that item, or skips it by
//!   scanning again with `after` set to its item key;
//! - `scan_flock` checks record headers only (it reads no values) and reports a record whose
//!   header is damaged as [`RecordMeta::CORRUPT`]: version 0, older than any real write, and a
//!   length no value has, so anti-entropy takes any replica's copy over it;
//! - `usage` is kept incrementally and reads no records.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::record::{Record, RecordMeta};

#[cfg(feature = "testing")]
pub mod conformance;
mod disk;
mod memory;

pub use disk::DiskEngine;
pub use memory::MemoryEngine;

/// A flock number (0..1024), see `crate::placement::FLOCKS`.
pub type Flock = u32;

/// Where an item lives. Keys order by (flock, bucket, item) so a bucket and a flock are ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemKey {
    /// The bucket's flock.
    pub flock: Flock,
    /// The bucket key.
    pub bucket: String,
    /// The item key within the bucket.
    pub item: String,
}

impl ItemKey {
    /// The key of `item` in `bucket` of `flock`.
    pub fn new(flock: Flock, bucket: impl Into<String>, item: impl Into<String>) -> ItemKey {
        ItemKey { flock, bucket: bucket.into(), item: item.into() }
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item {:?} of bucket {:?} (flock {})", self.item, self.bucket, self.flock)
    }
}

/// When a write is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Synced to disk (fsync) before a write returns; concurrent writers share one sync (group
    /// commit). A machine's crash loses nothing acknowledged.
    #[default]
    Immediate,
    /// Left to the OS's buffers and synced at least every `flush_ms`: a process crash loses
    /// nothing, a machine's crash (power, kernel) loses up to `flush_ms` of writes.
    Buffered,
}

/// How an engine persists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// When writes are durable.
    pub durability: Durability,
    /// For [`Durability::Buffered`], how often buffered writes are synced, in milliseconds.
    pub flush_ms: u64,
    /// The disk engine's page cache, in bytes.
    pub cache_bytes: u64,
    /// Writes waiting for the disk engine's writer thread at most; more callers wait to queue.
    pub queue_writes_max: usize,
    /// Value bytes one group commit takes at most (a larger single write still goes alone).
    pub group_bytes_max: u64,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            durability: Durability::Immediate,
            flush_ms: 200,
            cache_bytes: 64 << 20,
            queue_writes_max: 256,
            group_bytes_max: 16 << 20,
        }
    }
}

/// What went wrong in an engine. Messages say what was being done, and where.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A stored record failed its checksum: its bytes are never returned.
    #[error("{key} is corrupt: {reason}")]
    Corrupt {
        /// The damaged record's key.
        key: ItemKey,
        /// What is wrong with it.
        reason: String,
    },
    /// The disk (or a quota) is full; nothing of the refused write was stored.
    #[error("the data directory is full: {0}")]
    Full(String),
    /// The data directory cannot be written.
    #[error("the data directory is read-only: {0}")]
    ReadOnly(String),
    /// Any other I/O failure.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The engine was shut down.
    #[error("the storage engine is closed")]
    Closed,
}

impl EngineError {
    /// Sorts an I/O error by what the caller can do about it; `doing` says what failed.
    pub fn from_io(err: &std::io::Error, doing: &str) -> EngineError {
        use std::io::ErrorKind;
        let msg = format!("{doing}: {err}");
        match err.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => EngineError::Full(msg),
            ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => EngineError::ReadOnly(msg),
            _ => EngineError::Io(msg),
        }
    }
}

/// Items and bytes one flock holds on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockUsage {
    /// The flock.
    pub flock: Flock,
    /// Live items (tombstones not counted).
    pub items: u64,
    /// Encoded bytes of every stored record, tombstones included (header plus value).
    pub bytes: u64,
}

/// A node's local persistence: an ordered map of [`ItemKey`] -> [`Record`]. Synchronous (the
/// store calls it from `spawn_blocking`). Every method is atomic on its own; the store
/// serializes writers of one key itself. See the module documentation for corrupt records.
pub trait Engine: Send + Sync + 'static {
    /// The record stored under `key`, tombstone or not.
    fn get(&self, key: &ItemKey) -> Result<Option<Record>, EngineError>;
    /// Writes all records atomically (a key given twice keeps its last record); durable per the
    /// config when it returns.
    fn write(&self, batch: &[(ItemKey, Record)]) -> Result<(), EngineError>;
    /// Removes keys outright (no tombstone): for dropping data this node no longer owns, and
    /// for purging old tombstones. Absent keys are ignored.
    fn remove(&self, keys: &[ItemKey]) -> Result<(), EngineError>;
    /// Records of one bucket (tombstones included) with item key > `after`, in item order, at
    /// most `limit`.
    fn scan_bucket(
        &self,
        flock: Flock,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, EngineError> {
        self.scan_bucket_bytes(flock, bucket, after, limit, usize::MAX)
    }
    /// As [`Engine::scan_bucket`], but the page also ends with the record that brings its
    /// values' bytes to `bytes_max` or past it (a page holds at least one record), so a page
    /// of large items stays bounded in memory.
    fn scan_bucket_bytes(
        &self,
        flock: Flock,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(String, Record)>, EngineError>;
    /// Keys and metadata of one flock (tombstones included) with key > `after`, in key order, at
    /// most `limit`. Reads no values.
    fn scan_flock(
        &self,
        flock: Flock,
        after: Option<&ItemKey>,
        limit: usize,
    ) -> Result<Vec<(ItemKey, RecordMeta)>, EngineError>;
    /// Items and bytes stored per flock, only flocks holding records, in flock order. Kept
    /// incrementally (rebuilt when opened), so cheap.
    fn usage(&self) -> Vec<FlockUsage>;
    /// Makes everything written so far durable (for [`Durability::Buffered`]).
    fn flush(&self) -> Result<(), EngineError>;
}

/// Per-flock usage, updated on every write and removal.
#[derive(Debug, Default)]
pub(crate) struct UsageMap(BTreeMap<Flock, (u64, u64)>);

impl UsageMap {
    /// Counts a stored record in (`sign` true) or out.
    pub(crate) fn count(&mut self, flock: Flock, live: bool, bytes: u64, sign: bool) {
        let mut entry = self.get(flock);
        adjust(&mut entry, live, bytes, sign);
        self.set(flock, entry);
    }

    /// (live items, bytes) of `flock`.
    pub(crate) fn get(&self, flock: Flock) -> (u64, u64) {
        self.0.get(&flock).copied().unwrap_or_default()
    }

    /// Replaces the counts of `flock`.
    pub(crate) fn set(&mut self, flock: Flock, counts: (u64, u64)) {
        if counts == (0, 0) {
            self.0.remove(&flock);
        } else {
            self.0.insert(flock, counts);
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<FlockUsage> {
        self.0.iter().map(|(&flock, &(items, bytes))| FlockUsage { flock, items, bytes }).collect()
    }
}

/// Counts a record with `bytes` encoded bytes into (live items, bytes), or out of them.
pub(crate) fn adjust(counts: &mut (u64, u64), live: bool, bytes: u64, sign: bool) {
    let items = u64::from(live);
    if sign {
        counts.0 += items;
        counts.1 += bytes;
    } else {
        counts.0 = counts.0.saturating_sub(items);
        counts.1 = counts.1.saturating_sub(bytes);
    }
}

/// The order-preserving byte form of keys, for engines that store byte strings.
///
/// `flock` (4 bytes, big-endian), the bucket with each 0x00 written as 0x00 0xFF, the terminator
/// 0x00 0x00, then the item's bytes. The escaped bucket plus terminator is prefix-free and
/// compares like the bucket, so byte order is (flock, bucket, item) order, and bucket "a" with
/// item "bc" cannot meet bucket "ab" with item "c".
pub(crate) mod keys {
    use super::{Flock, ItemKey};

    /// The bytes of `key`.
    pub(crate) fn encode(key: &ItemKey) -> Vec<u8> {
        let mut out = bucket_prefix(key.flock, &key.bucket);
        out.extend_from_slice(key.item.as_bytes());
        out
    }

    /// Every key of a bucket starts with these bytes.
    pub(crate) fn bucket_prefix(flock: Flock, bucket: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + bucket.len() + 2);
        out.extend_from_slice(&flock.to_be_bytes());
        for &b in bucket.as_bytes() {
            out.push(b);
            if b == 0 {
                out.push(0xFF);
            }
        }
        out.extend_from_slice(&[0, 0]);
        out
    }

    /// Every key of a flock starts with these bytes.
    pub(crate) fn flock_prefix(flock: Flock) -> [u8; 4] {
        flock.to_be_bytes()
    }

    /// The key `bytes` encode, or `None` for bytes `encode` did not produce.
    pub(crate) fn decode(bytes: &[u8]) -> Option<ItemKey> {
        let flock = Flock::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        let mut bucket = Vec::new();
        let mut at = 4;
        loop {
            match (bytes.get(at)?, bytes.get(at + 1)) {
                (0, Some(0)) => break,
                (0, Some(0xFF)) => {
                    bucket.push(0);
                    at += 2;
                }
                (0, _) => return None,
                (&b, _) => {
                    bucket.push(b);
                    at += 1;
                }
            }
        }
        let item = std::str::from_utf8(&bytes[at + 2..]).ok()?;
        Some(ItemKey { flock, bucket: String::from_utf8(bucket).ok()?, item: item.to_owned() })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = ItemKey> {
            (0u32..4, "[ab\\x00\\xff\u{e9}]{0,4}", "[ab\\x00\u{e9}]{0,4}").prop_map(|(flock, bucket, item)| ItemKey {
                flock,
                bucket,
                item,
            })
        }

        proptest! {
            #[test]
            fn byte_order_is_key_order(a in key(), b in key()) {
                let (ea, eb) = (encode(&a), encode(&b));
                prop_assert_eq!(ea.cmp(&eb), a.cmp(&b), "{:?} vs {:?}", a, b);
                prop_assert_eq!(decode(&ea), Some(a.clone()));
                prop_assert!(ea.starts_with(&bucket_prefix(a.flock, &a.bucket)));
                prop_assert_eq!(eb.starts_with(&bucket_prefix(a.flock, &a.bucket)), a.flock == b.flock && a.bucket == b.bucket);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
                if let Some(k) = decode(&bytes) {
                    prop_assert_eq!(encode(&k), bytes);
                }
            }
        }

        #[test]
        fn buckets_that_prefix_others_do_not_mix() {
            assert_ne!(encode(&ItemKey::new(0, "a", "bc")), encode(&ItemKey::new(0, "ab", "c")));
            assert!(encode(&ItemKey::new(0, "a", "zz")) < encode(&ItemKey::new(0, "ab", "")));
            assert!(!encode(&ItemKey::new(0, "ab", "")).starts_with(&bucket_prefix(0, "a")));
        }
    }
}
