//! [`MemoryEngine`]: the engine in memory, for tests and for nodes without a data directory.
//! Records are kept encoded, checksums and all, so it fails like the disk engine does.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use parking_lot::RwLock;

use super::{Engine, EngineError, Flock, FlockUsage, ItemKey, UsageMap};
use crate::store::record::{Record, RecordMeta};

/// An ordered map in memory behind one lock. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryEngine {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Encoded records, and whether each is a live item (counted when stored, so damage done
    /// later cannot skew usage).
    records: BTreeMap<ItemKey, (Bytes, bool)>,
    usage: UsageMap,
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    /// Test hook: damages the stored record of `key` (flips a bit of its last byte), as a bad
    /// disk would. Returns whether the key was there.
    #[cfg(any(test, feature = "testing"))]
    pub fn corrupt(&self, key: &ItemKey) -> bool {
        let mut inner = self.inner.write();
        let Some((stored, _)) = inner.records.get_mut(key) else { return false };
        let mut bytes = stored.to_vec();
        if let Some(last) = bytes.last_mut() {
            *last ^= 0x20;
        }
        *stored = bytes.into();
        true
    }
}

impl Inner {
    /// Stores `encoded` (with whether it is live) under `key`, or removes it for `None`,
    /// keeping usage in step.
    fn replace(&mut self, key: &ItemKey, encoded: Option<(Bytes, bool)>) {
        if let Some((bytes, live)) = &encoded {
            self.usage.count(key.flock, *live, bytes.len() as u64, true);
        }
        let old = match encoded {
            Some(stored) => self.records.insert(key.clone(), stored),
            None => self.records.remove(key),
        };
        if let Some((bytes, live)) = old {
            self.usage.count(key.flock, live, bytes.len() as u64, false);
        }
    }
}

fn decode(key: &ItemKey, encoded: &Bytes) -> Result<Record, EngineError> {
    Record::decode_bytes(encoded.clone()).map_err(|err| EngineError::Corrupt { key: key.clone(), reason: err.0 })
}

impl Engine for MemoryEngine {
    fn get(&self, key: &ItemKey) -> Result<Option<Record>, EngineError> {
        self.inner.read().records.get(key).map(|(encoded, _)| decode(key, encoded)).transpose()
    }

    fn write(&self, batch: &[(ItemKey, Record)]) -> Result<(), EngineError> {
        // Encode before taking the lock: the write then cannot fail half-way.
        let encoded: Vec<(Bytes, bool)> =
            batch.iter().map(|(_, record)| (record.encode().into(), !record.tombstone)).collect();
        let mut inner = self.inner.write();
        for ((key, _), stored) in batch.iter().zip(encoded) {
            inner.replace(key, Some(stored));
        }
        Ok(())
    }

    fn remove(&self, keys: &[ItemKey]) -> Result<(), EngineError> {
        let mut inner = self.inner.write();
        for key in keys {
            inner.replace(key, None);
        }
        Ok(())
    }

    fn scan_bucket_bytes(
        &self,
        flock: Flock,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(String, Record)>, EngineError> {
        let from = match after {
            Some(item) => Bound::Excluded(ItemKey::new(flock, bucket, item)),
            None => Bound::Included(ItemKey::new(flock, bucket, "")),
        };
        let inner = self.inner.read();
        let (mut page, mut bytes) = (Vec::new(), 0usize);
        let range = inner.records.range((from, Bound::Unbounded));
        for (key, (encoded, _)) in range.take_while(|(key, _)| key.flock == flock && key.bucket == bucket) {
            if page.len() >= limit || bytes >= bytes_max {
                break;
            }
            let record = decode(key, encoded)?;
            bytes = bytes.saturating_add(record.value.len());
            page.push((key.item.clone(), record));
        }
        Ok(page)
    }

    fn scan_flock(
        &self,
        flock: Flock,
        after: Option<&ItemKey>,
        limit: usize,
    ) -> Result<Vec<(ItemKey, RecordMeta)>, EngineError> {
        let from = match after {
            Some(key) if key.flock > flock => return Ok(Vec::new()),
            Some(key) if key.flock == flock => Bound::Excluded(key.clone()),
            _ => Bound::Included(ItemKey::new(flock, "", "")),
        };
        let inner = self.inner.read();
        let page = inner
            .records
            .range((from, Bound::Unbounded))
            .take_while(|(key, _)| key.flock == flock)
            .take(limit)
            .map(|(key, (encoded, _))| {
                let meta = RecordMeta::decode_header(encoded).map_or(RecordMeta::CORRUPT, |(meta, _)| meta);
                (key.clone(), meta)
            })
            .collect();
        Ok(page)
    }

    fn usage(&self) -> Vec<FlockUsage> {
        self.inner.read().usage.snapshot()
    }

    fn flush(&self) -> Result<(), EngineError> {
        Ok(())
    }
}
