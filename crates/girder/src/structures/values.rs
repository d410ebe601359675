//! Values: the [`Cache`] of raw or typed values (TTL, append, compression), the [`Atom`]
//! (compare-and-set swaps, watches) and the [`Counter`].

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frames::{self, Compression};
use super::{check_key, DsError, DsResult, Kind, Store};
use crate::codec;

pub(crate) fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> DsResult<Bytes> {
    codec::encode(value).map_err(|message| DsError::Encode { key: key.to_owned(), message })
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> DsResult<T> {
    codec::decode(bytes).map_err(|message| DsError::Decode { key: key.to_owned(), message })
}

/// A TTL in milliseconds (at least 1), refused over [`super::TTL_MS_MAX`].
fn ttl_ms(ttl: Option<Duration>) -> DsResult<Option<u64>> {
    let Some(ttl) = ttl else { return Ok(None) };
    match u64::try_from(ttl.as_millis()) {
        Ok(ms) if ms <= super::TTL_MS_MAX => Ok(Some(ms.max(1))),
        _ => Err(DsError::Invalid(format!(
            "a time-to-live must be at most {} ms, got {} ms",
            super::TTL_MS_MAX,
            ttl.as_millis()
        ))),
    }
}

/// Settings of a [`Cache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// How values are compressed.
    pub compression: Compression,
    /// Values shorter than this are stored as they are.
    pub compress_min_bytes: usize,
    /// Largest value (after all appends) accepted, in bytes as stored.
    pub value_bytes_max: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { compression: Compression::Lz4, compress_min_bytes: 1_024, value_bytes_max: 64 << 20 }
    }
}

/// A cache of values by id: `set`, `get`, `append`, `delete`, `exists`, with a TTL per entry
/// and transparent compression. Raw bytes or any serde type.
#[derive(Clone)]
pub struct Cache {
    store: Store,
    config: CacheConfig,
}

impl Cache {
    /// A cache on `store`.
    pub fn new(store: Store, config: CacheConfig) -> Cache {
        Cache { store, config }
    }

    fn frame(&self, key: &str, value: &[u8]) -> DsResult<Bytes> {
        check_key(key)?;
        let frame = frames::encode(value, self.config.compression, self.config.compress_min_bytes);
        if frame.len() > self.config.value_bytes_max {
            return Err(DsError::TooLarge {
                key: key.to_owned(),
                bytes: frame.len(),
                max_bytes: self.config.value_bytes_max,
            });
        }
        Ok(frame)
    }

    /// Sets `key` to `value`, expiring after `ttl` if given.
    pub async fn set_bytes(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DsResult<()> {
        let frame = self.frame(key, value)?;
        let ttl_ms = ttl_ms(ttl)?;
        self.store.value_set(Kind::Value, key, &frame, ttl_ms).await.map(|_| ())
    }

    /// The value of `key`.
    pub async fn get_bytes(&self, key: &str) -> DsResult<Option<Bytes>> {
        check_key(key)?;
        match self.store.value_get(Kind::Value, key).await? {
            Some(stored) => frames::decode(key, &stored.bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Appends `chunk` to `key`'s value (an empty value if unset); returns the stored size.
    pub async fn append(&self, key: &str, chunk: &[u8]) -> DsResult<u64> {
        let frame = self.frame(key, chunk)?;
        self.store.value_append(key, &frame, self.config.value_bytes_max).await
    }

    /// Deletes `key`; returns whether it was set.
    pub async fn delete(&self, key: &str) -> DsResult<bool> {
        check_key(key)?;
        self.store.delete(Kind::Value, key).await
    }

    /// Whether `key` is set.
    pub async fn exists(&self, key: &str) -> DsResult<bool> {
        check_key(key)?;
        self.store.exists(Kind::Value, key).await
    }

    /// The size of `key`'s value as stored (compressed), if set.
    pub async fn stored_bytes(&self, key: &str) -> DsResult<Option<usize>> {
        check_key(key)?;
        Ok(self.store.value_get(Kind::Value, key).await?.map(|v| v.bytes.len()))
    }

    /// Sets `key` to `value` encoded with MessagePack.
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T, ttl: Option<Duration>) -> DsResult<()> {
        self.set_bytes(key, &encode(key, value)?, ttl).await
    }

    /// The value of `key` decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> DsResult<Option<T>> {
        match self.get_bytes(key).await? {
            Some(bytes) => decode(key, &bytes).map(Some),
            None => Ok(None),
        }
    }
}

/// Most compare-and-set attempts one `swap` makes before giving up.
const SWAP_ATTEMPTS_MAX: u32 = 100_000;

/// A value changed only by atomic replacement: `get`, `reset`, `compare_and_set`, `swap`
/// and `watch`.
pub struct Atom<T> {
    store: Store,
    key: String,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Atom<T> {
    /// The atom `key` on `store`.
    pub fn new(store: Store, key: impl Into<String>) -> DsResult<Atom<T>> {
        let key = key.into();
        check_key(&key)?;
        Ok(Atom { store, key, _type: PhantomData })
    }

    /// The current value.
    pub async fn get(&self) -> DsResult<Option<T>> {
        match self.store.value_get(Kind::Atom, &self.key).await? {
            Some(stored) => decode(&self.key, &stored.bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces the value.
    pub async fn reset(&self, value: &T) -> DsResult<()> {
        self.store.value_set(Kind::Atom, &self.key, &encode(&self.key, value)?, None).await.map(|_| ())
    }

    /// Sets `new` if the current value is `expected` (`None`: unset); returns whether it did.
    /// Values are compared as encoded (MessagePack gives equal values equal bytes), by the
    /// store in one atomic step: a concurrent rewrite of the same value does not make it fail.
    pub async fn compare_and_set(&self, expected: Option<&T>, new: &T) -> DsResult<bool> {
        let expected = expected.map(|e| encode(&self.key, e)).transpose()?;
        let new = encode(&self.key, new)?;
        Ok(self.store.value_compare_and_set(Kind::Atom, &self.key, expected.as_deref(), &new).await?.is_some())
    }

    /// Replaces the value with `f(current)`, retrying when another writer got there first;
    /// returns the value set. `f` may run several times.
    pub async fn swap(&self, f: impl Fn(Option<T>) -> T) -> DsResult<T> {
        for _ in 0..SWAP_ATTEMPTS_MAX {
            let current = self.store.value_get(Kind::Atom, &self.key).await?;
            let (version, value) = match current {
                Some(stored) => (Some(stored.version), Some(decode(&self.key, &stored.bytes)?)),
                None => (None, None),
            };
            let next = f(value);
            let encoded = encode(&self.key, &next)?;
            if self.store.value_cas(Kind::Atom, &self.key, version, &encoded).await?.is_some() {
                return Ok(next);
            }
        }
        Err(DsError::Invalid(format!("atom {:?}: swap lost {SWAP_ATTEMPTS_MAX} races in a row", self.key)))
    }

    /// The values the atom takes from now on: each change is seen, though fast successive
    /// writes may be seen only as the last of them.
    pub async fn watch(&self) -> DsResult<BoxStream<'static, DsResult<T>>> {
        let start = self.store.value_get(Kind::Atom, &self.key).await?.map_or(0, |v| v.version);
        let (store, key) = (self.store.clone(), self.key.clone());
        Ok(Box::pin(futures::stream::unfold((store, key, start), |(store, key, seen)| async move {
            loop {
                match store.value_get(Kind::Atom, &key).await {
                    Err(err) => return Some((Err(err), (store, key, seen))),
                    Ok(Some(stored)) if stored.version > seen => {
                        let value = decode(&key, &stored.bytes);
                        return Some((value, (store, key, stored.version)));
                    }
                    Ok(_) => store.wait_change(&key, WATCH_RECHECK_MS).await,
                }
            }
        })))
    }
}

/// Longest a watch waits for a change notice before it reads the atom again anyway.
const WATCH_RECHECK_MS: u64 = 1_000;

/// An atomic 64-bit counter.
pub struct Counter {
    store: Store,
    key: String,
}

impl Counter {
    /// The counter `key` on `store`.
    pub fn new(store: Store, key: impl Into<String>) -> DsResult<Counter> {
        let key = key.into();
        check_key(&key)?;
        Ok(Counter { store, key })
    }

    /// Adds `delta`; returns the new value.
    pub async fn add(&self, delta: i64) -> DsResult<i64> {
        self.store.counter_add(&self.key, delta).await
    }

    /// The value (0 when never set).
    pub async fn get(&self) -> DsResult<i64> {
        self.store.counter_add(&self.key, 0).await
    }

    /// Sets `new` if the value is `expected`; returns whether it did.
    pub async fn compare_and_set(&self, expected: i64, new: i64) -> DsResult<bool> {
        self.store.counter_cas(&self.key, expected, new).await
    }
}
