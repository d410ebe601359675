//! The store's messages on the data plane: a request header and a reply header, each
//! MessagePack; item bytes and pages travel in the body.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::engine::{Flock, ItemKey};
use super::record::{RecordMeta, Version};
use super::StoreError;

/// What a write expects of the item's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Write only if the item does not exist (or was deleted).
    Absent,
    /// Write only if the item's version is this.
    Version(u64),
}

/// A write as a caller asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Replace the value (the body).
    Put(Expect),
    /// Add the body to the end of the value.
    Append,
    /// Remove the item (a tombstone).
    Delete,
}

/// A request from one node to another's store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// To the flock's primary: apply and replicate. `op_id` makes retries idempotent.
    Write { key: ItemKey, op: WriteOp, op_id: u128, epoch: u64 },
    /// From the primary to another holder: store this record (the body is its whole value)
    /// or, when `append_to` is set, add the body to the version named there.
    Replicate {
        key: ItemKey,
        version: Version,
        tombstone: bool,
        written_ms: u64,
        append_to: Option<Version>,
        epoch: u64,
        primary: String,
        /// The primary's lease left by its own clock when it sent this.
        lease_ms: u64,
        /// The writer's op id: a replica remembers it, in case it becomes the primary
        /// and the writer retries.
        op_id: u128,
        /// Whether the item existed before the write (the writer's answer on a retry).
        existed: bool,
    },
    /// Read an item from a node that holds its flock completely.
    Get { key: ItemKey },
    /// A page of a bucket's live items (the body holds the records).
    Scan { flock: Flock, bucket: String, after: Option<String>, limit: u32 },
    /// To the primary: delete a page of a bucket's items after `after`.
    DeleteBucket { flock: Flock, bucket: String, after: Option<String>, epoch: u64, limit: u32 },
    /// The digests of these flocks as this node holds them.
    Digests { flocks: Vec<Flock> },
    /// A page of a flock's keys and record metadata (the body holds them).
    Meta { flock: Flock, after: Option<ItemKey>, limit: u32 },
    /// These records, whole (the body holds them).
    Fetch { keys: Vec<ItemKey> },
    /// From a node about to copy `flocks` as an owner in table `epoch`: read that table (or
    /// a newer one), and finish the writes of these flocks already begun under an older
    /// one. Afterwards this node acknowledges no write of them from an older table, so
    /// what the copier reads next holds every write acknowledged before.
    Seal { epoch: u64, flocks: Vec<Flock> },
}

/// Why a node refused or failed a request: what the caller does next depends on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Fault {
    /// This node is not the flock's primary in its table of `epoch`: refresh and retry.
    NotPrimary { epoch: u64 },
    /// The request's epoch is older than this node's `epoch`: refresh and retry.
    StaleEpoch { epoch: u64 },
    /// This node does not hold the flock completely (yet): ask another.
    NotReady,
    /// This node's lease may have run out: it acknowledges nothing until renewed.
    LeaseLapsed,
    /// A replica needs the whole value (its copy is not the version appended to).
    NeedWhole,
    /// The user's error, final.
    Final(FinalFault),
    /// Anything else (I/O, an unreachable replica): retry elsewhere or later.
    Unavailable(String),
}

/// Faults that retrying cannot fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FinalFault {
    Conflict { expected: Expect, actual: Option<u64> },
    TooLarge { bytes: u64, max: u64 },
    Full(String),
    ReadOnly(String),
    Invalid(String),
    Corrupt(String),
}

/// A reply header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// A write is acknowledged at this version (deletes of a missing item: `existed` false).
    Written { version: Version, existed: bool },
    /// A replica stored it.
    Stored,
    /// An item read: `None` when absent or deleted; the body holds the value.
    Item(Option<Version>),
    /// A page is in the body; `more` when there may be more after it.
    Page { more: bool },
    /// Items deleted by one `DeleteBucket` page; where the next page starts, if any.
    Deleted { items: u64, next: Option<String> },
    /// Digests per flock: (flock, digest, live items).
    Digests(Vec<(Flock, [u8; 16], u64)>),
    /// The request failed.
    Fault(Fault),
}

impl From<FinalFault> for StoreError {
    fn from(fault: FinalFault) -> StoreError {
        match fault {
            FinalFault::Conflict { expected, actual } => StoreError::Conflict { expected, actual },
            FinalFault::TooLarge { bytes, max } => StoreError::TooLarge { bytes, max },
            FinalFault::Full(why) => StoreError::Full(why),
            FinalFault::ReadOnly(why) => StoreError::ReadOnly(why),
            FinalFault::Invalid(why) => StoreError::InvalidKey(why),
            FinalFault::Corrupt(why) => StoreError::Corrupt(why),
        }
    }
}

/// Encodes a header (infallible for these types; an error becomes an empty header the
/// peer refuses as malformed).
pub(crate) fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(rmp_serde::to_vec(value).unwrap_or_default())
}

/// Decodes a header from a peer.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("malformed store message: {e}"))
}

/// A page of (key, meta) pairs or of records travels as MessagePack in a body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MetaPage(pub Vec<(ItemKey, RecordMeta)>);

/// Records in a body: each as its item key, its encoded record (checksummed, so a receiver
/// verifies every one before storing or serving it; `Bytes` is MessagePack `bin`) and the
/// memos of the writes it holds (for copies; empty in bucket pages).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RecordPage(pub Vec<(ItemKey, Bytes, Vec<super::ops::Memo>)>);
