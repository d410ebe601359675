//! The bucket store: items grouped in buckets, buckets in flocks, each flock herded by the
//! R nodes the placement table names, on each node's local disk.
//!
//! Writes go to the flock's primary (its first owner in the table), which applies them,
//! replicates them to every other node that holds the flock, and acknowledges once they
//! all hold it durably; every replica write carries the table's epoch and the primary's
//! id, and a replica refuses an epoch older than its own or a sender that is not the
//! primary of that epoch. A node serves reads of a flock only once it holds it completely
//! (it publishes that in its heartbeat); new owners copy a flock from a node that does,
//! over the data plane, while writes already reach them. See ARCHITECTURE.md.

mod client;
pub mod engine;
mod farm;
mod local;
mod near;
mod ops;
mod proto;
pub mod record;
mod routing;
mod service;
mod shuffle;
mod sync;

use std::path::PathBuf;

pub use client::{Item, ItemStore};
pub use engine::{Durability, EngineConfig, EngineError, Flock, ItemKey};
pub(crate) use farm::Farm;
pub use local::LocalBucket;
pub use near::{Typed, NEAR_AGE_MAX, NEAR_ENTRIES_MAX};
pub use proto::Expect;
pub use record::{Record, RecordMeta, Version};
pub(crate) use service::now_ms;
pub use service::StoreStats;
pub use shuffle::{Shuffle, SHUFFLE_ITEM};
pub use sync::FlockState;

use crate::dataplane::Compression;

/// Longest bucket or item key, in bytes.
pub const KEY_BYTES_MAX: usize = 1_024;
/// Largest item unless configured.
pub const ITEM_BYTES_MAX_DEFAULT: u64 = 64 << 20;

/// How a node's store runs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where the node keeps its farm; `None` keeps it in memory (lost with the process).
    pub data_dir: Option<PathBuf>,
    /// The local engine's durability.
    pub engine: EngineConfig,
    /// Where the data plane listens (`host:port`; port 0 picks a free one).
    pub data_listen: String,
    /// The address other nodes reach the data plane at, when it differs from the listen
    /// address (e.g. listening on 0.0.0.0).
    pub data_advertise: Option<String>,
    /// Largest item value.
    pub item_bytes_max: u64,
    /// How many owners must hold a write before it is acknowledged; `None` means all of
    /// them (no single death can lose an acknowledged write). `Some(1)` is lossy.
    pub write_quorum: Option<u32>,
    /// How replicas and copies are compressed on the wire.
    pub compression: Compression,
    /// How long a caller's store request may take, retries included.
    pub request_timeout_ms: u64,
    /// Flocks copied to this node at once.
    pub syncs_max: usize,
    /// How often owners compare digests to repair what they missed.
    pub anti_entropy_ms: u64,
    /// Bytes the in-memory engine may hold (ignored on disk).
    pub memory_bytes_max: u64,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            data_dir: None,
            engine: EngineConfig::default(),
            data_listen: "127.0.0.1:0".to_owned(),
            data_advertise: None,
            item_bytes_max: ITEM_BYTES_MAX_DEFAULT,
            write_quorum: None,
            compression: Compression::None,
            request_timeout_ms: 30_000,
            syncs_max: 4,
            anti_entropy_ms: 5_000,
            memory_bytes_max: 1 << 30,
        }
    }
}

/// Why a store request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A bucket or item key is empty, too long or otherwise unusable.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The value is larger than the store takes.
    #[error("the item is {bytes} bytes; this store takes at most {max}")]
    TooLarge {
        /// The value's size.
        bytes: u64,
        /// The store's limit.
        max: u64,
    },
    /// A conditional write found another version.
    #[error("version conflict: expected {expected:?}, the item is at {actual:?}")]
    Conflict {
        /// What the write expected.
        expected: Expect,
        /// The item's version (`None`: it does not exist).
        actual: Option<u64>,
    },
    /// A node's data directory is full.
    #[error("disk full: {0}")]
    Full(String),
    /// A node's data directory cannot be written.
    #[error("read-only data directory: {0}")]
    ReadOnly(String),
    /// Every copy the store could reach failed its checksum.
    #[error("corrupt item: {0}")]
    Corrupt(String),
    /// No node could serve the request in time (owners unreachable, not caught up, or
    /// the grid changing under it); retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This node runs no store.
    #[error("this node runs no bucket store")]
    NoStore,
}

impl StoreError {
    /// A short machine-readable name, for HTTP error bodies and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::InvalidKey(_) => "invalid_key",
            StoreError::TooLarge { .. } => "too_large",
            StoreError::Conflict { .. } => "conflict",
            StoreError::Full(_) => "full",
            StoreError::ReadOnly(_) => "read_only",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::NoStore => "no_store",
        }
    }
}

impl From<EngineError> for StoreError {
    fn from(error: EngineError) -> StoreError {
        match error {
            EngineError::Full(why) => StoreError::Full(why),
            EngineError::ReadOnly(why) => StoreError::ReadOnly(why),
            EngineError::Corrupt { key, reason } => {
                StoreError::Corrupt(format!("{}/{}: {reason}", key.bucket, key.item))
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// Checks a bucket or item key.
pub(crate) fn check_key(what: &str, key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey(format!("the {what} key is empty")));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(StoreError::InvalidKey(format!("the {what} key is {} bytes; at most {KEY_BYTES_MAX}", key.len())));
    }
    Ok(())
}

/// The key of `item` in `bucket`.
pub(crate) fn item_key(bucket: &str, item: &str) -> Result<ItemKey, StoreError> {
    check_key("bucket", bucket)?;
    check_key("item", item)?;
    Ok(ItemKey {
        flock: crate::placement::flock_of(bucket.as_bytes()),
        bucket: bucket.to_owned(),
        item: item.to_owned(),
    })
}
