//! The near cache of decoded objects (Grex's "cache at the decoded object level"): typed
//! reads keep the decoded value in the application process, so a hot item costs neither a
//! network hop nor a decode.
//!
//! Every acknowledged write publishes a small change notice (bucket, item, version) on the
//! grid's pub/sub; every process drops the cached entry when its notice arrives. A process
//! never reads a value older than its own acknowledged write: the write invalidates the
//! entry and stamps its slot, and a fill from a read that began before a newer stamp is
//! refused. Should a notice be lost, an entry is used for at most [`NEAR_AGE_MAX`].

use std::any::Any;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ItemStore, StoreError};
use crate::retry::Backoff;
use crate::structures::{Store, Topic};

/// The topic change notices travel on.
pub const NEAR_TOPIC: &str = "girder/store/changes";
/// Decoded values one process keeps.
pub const NEAR_ENTRIES_MAX: usize = 10_000;
/// The longest a cached value is used without a fresh read, should its notice be lost.
pub const NEAR_AGE_MAX: Duration = Duration::from_secs(2);
/// Invalidation stamp slots (keys hash into them; a collision only refuses a fill).
const STAMP_SLOTS: usize = 8_192;
/// Notices waiting to be published; beyond it they are dropped (the age bound still holds).
const NOTICES_QUEUED_MAX: usize = 4_096;

/// A change notice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Changed {
    bucket: String,
    item: String,
}

struct Entry {
    value: Arc<dyn Any + Send + Sync>,
    version: u64,
    filled: Instant,
}

/// A process's cache of decoded values.
pub(crate) struct NearCache {
    entries: Mutex<lru::LruCache<(String, String), Entry>>,
    stamps: Box<[AtomicU64]>,
    clock: AtomicU64,
    notices: tokio::sync::mpsc::Sender<Changed>,
    receiver: Mutex<Option<tokio::sync::mpsc::Receiver<Changed>>>,
}

fn slot(bucket: &str, item: &str) -> usize {
    let mut hasher = blake3::Hasher::new();
    hasher.update(bucket.as_bytes());
    hasher.update(&[0]);
    hasher.update(item.as_bytes());
    let b = *hasher.finalize().as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize % STAMP_SLOTS
}

impl NearCache {
    pub(crate) fn new() -> NearCache {
        let cap = std::num::NonZeroUsize::new(NEAR_ENTRIES_MAX).unwrap_or(std::num::NonZeroUsize::MIN);
        let (notices, receiver) = tokio::sync::mpsc::channel(NOTICES_QUEUED_MAX);
        NearCache {
            entries: Mutex::new(lru::LruCache::new(cap)),
            stamps: (0..STAMP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            clock: AtomicU64::new(0),
            notices,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// The stamp a read takes before it starts.
    pub(crate) fn stamp(&self, bucket: &str, item: &str) -> u64 {
        self.stamps[slot(bucket, item)].load(Ordering::Acquire)
    }

    /// The item changed: drop its entry and refuse fills from reads that began before.
    pub(crate) fn invalidate(&self, bucket: &str, item: &str) {
        let now = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.stamps[slot(bucket, item)].fetch_max(now, Ordering::AcqRel);
        self.entries.lock().pop(&(bucket.to_owned(), item.to_owned()));
    }

    /// A write of this process was acknowledged: invalidate here, tell the others.
    pub(crate) fn wrote(&self, bucket: &str, item: &str) {
        self.invalidate(bucket, item);
        let notice = Changed { bucket: bucket.to_owned(), item: item.to_owned() };
        if self.notices.try_send(notice).is_err() {
            tracing::debug!(bucket, item, "store: change notice dropped (queue full); peers expire it by age");
        }
    }

    fn lookup<T: Send + Sync + 'static>(&self, bucket: &str, item: &str) -> Option<(Arc<T>, u64)> {
        let mut entries = self.entries.lock();
        let key = (bucket.to_owned(), item.to_owned());
        let entry = entries.get(&key)?;
        if entry.filled.elapsed() >= NEAR_AGE_MAX {
            entries.pop(&key);
            return None;
        }
        let value = entry.value.clone().downcast::<T>().ok()?;
        Some((value, entry.version))
    }

    fn fill<T: Send + Sync + 'static>(&self, bucket: &str, item: &str, value: Arc<T>, version: u64, stamp: u64) {
        let mut entries = self.entries.lock();
        // Checked under the entries' lock, which `invalidate` takes after stamping: a
        // newer invalidation either shows here or removes this fill after it.
        if self.stamp(bucket, item) != stamp {
            return;
        }
        entries.put((bucket.to_owned(), item.to_owned()), Entry { value, version, filled: Instant::now() });
    }

    /// Publishes this process's notices and applies everyone's, until the process ends.
    pub(crate) async fn run(self: Arc<NearCache>, store: Store, origin: String) {
        let Some(mut outgoing) = self.receiver.lock().take() else { return };
        let topics = (
            Topic::<(String, Changed)>::new(store.clone(), NEAR_TOPIC),
            Topic::<(String, Changed)>::new(store, NEAR_TOPIC),
        );
        let (outbound, topic) = match topics {
            (Ok(outbound), Ok(inbound)) => (outbound, inbound),
            (Err(err), _) | (_, Err(err)) => return tracing::warn!(error = %err, "store: no change notices"),
        };
        let publisher = {
            let origin = origin.clone();
            async move {
                while let Some(notice) = outgoing.recv().await {
                    if let Err(err) = outbound.publish(&(origin.clone(), notice)).await {
                        tracing::debug!(error = %err, "store: publishing a change notice failed");
                    }
                }
            }
        };
        let listener = async move {
            let mut backoff = Backoff::reconnect();
            loop {
                match topic.subscribe().await {
                    Ok(mut notices) => {
                        backoff.succeeded();
                        while let Some(notice) = notices.next().await {
                            match notice {
                                Ok((from, changed)) if from != origin => {
                                    self.invalidate(&changed.bucket, &changed.item)
                                }
                                Ok(_) => {}
                                Err(err) => tracing::debug!(error = %err, "store: a bad change notice"),
                            }
                        }
                    }
                    Err(err) => tracing::debug!(error = %err, "store: subscribing to change notices failed"),
                }
                tokio::time::sleep(backoff.failed()).await;
            }
        };
        tokio::join!(publisher, listener);
    }
}

/// Typed items with the near cache: values are MessagePack (field names) in the store and
/// decoded once per process until they change.
pub struct Typed<T> {
    store: ItemStore,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Typed<T> {
        Typed { store: self.store.clone(), _type: PhantomData }
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Typed<T> {
    pub(crate) fn new(store: ItemStore) -> Typed<T> {
        Typed { store, _type: PhantomData }
    }

    /// The decoded value and its version: from this process's near cache when it holds
    /// the item, else read, decoded and kept.
    pub async fn get(&self, bucket: &str, item: &str) -> Result<Option<(Arc<T>, u64)>, StoreError> {
        let near = self.store.near();
        if let Some(hit) = near.lookup::<T>(bucket, item) {
            return Ok(Some(hit));
        }
        let stamp = near.stamp(bucket, item);
        let Some(found) = self.store.get(bucket, item).await? else { return Ok(None) };
        let value: T = rmp_serde::from_slice(&found.value)
            .map_err(|e| StoreError::Corrupt(format!("{bucket}/{item} is not the type asked for: {e}")))?;
        let value = Arc::new(value);
        near.fill(bucket, item, value.clone(), found.version, stamp);
        Ok(Some((value, found.version)))
    }

    /// Stores `value`; its new version.
    pub async fn put(&self, bucket: &str, item: &str, value: &T) -> Result<u64, StoreError> {
        self.store.put_value(bucket, item, value).await
    }

    /// Deletes the item; whether it existed.
    pub async fn delete(&self, bucket: &str, item: &str) -> Result<bool, StoreError> {
        self.store.delete(bucket, item).await
    }
}
