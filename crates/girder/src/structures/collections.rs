//! Collections: [`Map`], [`MultiMap`], [`Set`], [`List`] and [`Queue`] of serde values.

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::values::{decode, encode};
use super::{check_key, DsResult, Kind, Store};

/// Most entries one `entries`/`members`/`range` call returns.
pub const READ_ITEMS_MAX: usize = 100_000;

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident<$($t:ident),+>) => {
        $(#[$doc])*
        pub struct $name<$($t),+> {
            store: Store,
            key: String,
            _types: PhantomData<fn() -> ($($t,)+)>,
        }

        impl<$($t),+> $name<$($t),+> {
            /// The structure `key` on `store`.
            pub fn new(store: Store, key: impl Into<String>) -> DsResult<Self> {
                let key = key.into();
                check_key(&key)?;
                Ok($name { store, key, _types: PhantomData })
            }
        }
    };
}

handle!(
    /// A map from keys to values.
    Map<K, V>
);
handle!(
    /// A map from keys to sets of values.
    MultiMap<K, V>
);
handle!(
    /// A set of values.
    Set<T>
);
handle!(
    /// A list of values, indexed from the front (negative indexes from the back).
    List<T>
);
handle!(
    /// A FIFO queue, optionally bounded.
    Queue<T>
);

fn decode_all<T: DeserializeOwned>(key: &str, items: Vec<bytes::Bytes>) -> DsResult<Vec<T>> {
    items.iter().map(|b| decode(key, b)).collect()
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> Map<K, V> {
    /// Puts `key` = `value`; returns the previous value.
    pub async fn put(&self, key: &K, value: &V) -> DsResult<Option<V>> {
        let (field, value) = (encode(&self.key, key)?, encode(&self.key, value)?);
        match self.store.map_put(Kind::Map, &self.key, &field, &value).await? {
            Some(old) => decode(&self.key, &old).map(Some),
            None => Ok(None),
        }
    }

    /// The value of `key`.
    pub async fn get(&self, key: &K) -> DsResult<Option<V>> {
        let field = encode(&self.key, key)?;
        match self.store.map_get(Kind::Map, &self.key, &field).await?.pop() {
            Some(value) => decode(&self.key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Removes `key`; returns whether it was there.
    pub async fn remove(&self, key: &K) -> DsResult<bool> {
        let field = encode(&self.key, key)?;
        Ok(self.store.map_remove(Kind::Map, &self.key, &field, None).await? > 0)
    }

    /// The number of keys.
    pub async fn len(&self) -> DsResult<u64> {
        self.store.map_len(Kind::Map, &self.key).await
    }

    /// Whether the map is empty.
    pub async fn is_empty(&self) -> DsResult<bool> {
        Ok(self.len().await? == 0)
    }

    /// Up to [`READ_ITEMS_MAX`] entries, in no particular order.
    pub async fn entries(&self) -> DsResult<Vec<(K, V)>> {
        let raw = self.store.map_entries(Kind::Map, &self.key, READ_ITEMS_MAX).await?;
        raw.iter().map(|(k, v)| Ok((decode(&self.key, k)?, decode(&self.key, v)?))).collect()
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> MultiMap<K, V> {
    /// Adds `value` to `key`'s values; returns whether the pair is new.
    pub async fn put(&self, key: &K, value: &V) -> DsResult<bool> {
        let (field, value) = (encode(&self.key, key)?, encode(&self.key, value)?);
        Ok(self.store.map_put(Kind::MultiMap, &self.key, &field, &value).await?.is_some())
    }

    /// `key`'s values, in no particular order.
    pub async fn get(&self, key: &K) -> DsResult<Vec<V>> {
        let field = encode(&self.key, key)?;
        decode_all(&self.key, self.store.map_get(Kind::MultiMap, &self.key, &field).await?)
    }

    /// Removes one pair; returns whether it was there.
    pub async fn remove(&self, key: &K, value: &V) -> DsResult<bool> {
        let (field, value) = (encode(&self.key, key)?, encode(&self.key, value)?);
        Ok(self.store.map_remove(Kind::MultiMap, &self.key, &field, Some(&value)).await? > 0)
    }

    /// Removes all of `key`'s values; returns how many there were.
    pub async fn remove_all(&self, key: &K) -> DsResult<u64> {
        let field = encode(&self.key, key)?;
        self.store.map_remove(Kind::MultiMap, &self.key, &field, None).await
    }

    /// The number of (key, value) pairs.
    pub async fn len(&self) -> DsResult<u64> {
        self.store.map_len(Kind::MultiMap, &self.key).await
    }

    /// Whether the multimap is empty.
    pub async fn is_empty(&self) -> DsResult<bool> {
        Ok(self.len().await? == 0)
    }
}

impl<T: Serialize + DeserializeOwned> Set<T> {
    /// Adds `value`; returns whether it is new.
    pub async fn add(&self, value: &T) -> DsResult<bool> {
        self.store.set_add(&self.key, &encode(&self.key, value)?).await
    }

    /// Removes `value`; returns whether it was there.
    pub async fn remove(&self, value: &T) -> DsResult<bool> {
        self.store.set_remove(&self.key, &encode(&self.key, value)?).await
    }

    /// Whether `value` is in the set.
    pub async fn contains(&self, value: &T) -> DsResult<bool> {
        self.store.set_contains(&self.key, &encode(&self.key, value)?).await
    }

    /// The number of values.
    pub async fn len(&self) -> DsResult<u64> {
        self.store.set_len(&self.key).await
    }

    /// Whether the set is empty.
    pub async fn is_empty(&self) -> DsResult<bool> {
        Ok(self.len().await? == 0)
    }

    /// Up to [`READ_ITEMS_MAX`] values, in no particular order.
    pub async fn members(&self) -> DsResult<Vec<T>> {
        decode_all(&self.key, self.store.set_members(&self.key, READ_ITEMS_MAX).await?)
    }
}

impl<T: Serialize + DeserializeOwned> List<T> {
    /// Appends `value`; returns the new length.
    pub async fn push_back(&self, value: &T) -> DsResult<u64> {
        Ok(self.store.list_push(Kind::List, &self.key, &encode(&self.key, value)?, false, None).await?.unwrap_or(0))
    }

    /// Prepends `value`; returns the new length.
    pub async fn push_front(&self, value: &T) -> DsResult<u64> {
        Ok(self.store.list_push(Kind::List, &self.key, &encode(&self.key, value)?, true, None).await?.unwrap_or(0))
    }

    /// Removes and returns the last value.
    pub async fn pop_back(&self) -> DsResult<Option<T>> {
        self.store.list_pop(Kind::List, &self.key, false).await?.map(|b| decode(&self.key, &b)).transpose()
    }

    /// Removes and returns the first value.
    pub async fn pop_front(&self) -> DsResult<Option<T>> {
        self.store.list_pop(Kind::List, &self.key, true).await?.map(|b| decode(&self.key, &b)).transpose()
    }

    /// The value at `index` (negative: from the back).
    pub async fn get(&self, index: i64) -> DsResult<Option<T>> {
        self.store.list_get(&self.key, index).await?.map(|b| decode(&self.key, &b)).transpose()
    }

    /// Replaces the value at `index`; returns whether there was one.
    pub async fn set(&self, index: i64, value: &T) -> DsResult<bool> {
        self.store.list_set(&self.key, index, &encode(&self.key, value)?).await
    }

    /// Values `start..=stop` (negative: from the back), at most [`READ_ITEMS_MAX`].
    pub async fn range(&self, start: i64, stop: i64) -> DsResult<Vec<T>> {
        decode_all(&self.key, self.store.list_range(&self.key, start, stop, READ_ITEMS_MAX).await?)
    }

    /// The number of values.
    pub async fn len(&self) -> DsResult<u64> {
        self.store.list_len(Kind::List, &self.key).await
    }

    /// Whether the list is empty.
    pub async fn is_empty(&self) -> DsResult<bool> {
        Ok(self.len().await? == 0)
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// Adds `value` at the back unless the queue holds `capacity` values already; returns
    /// whether it was added.
    pub async fn offer(&self, value: &T, capacity: Option<u64>) -> DsResult<bool> {
        let pushed = self.store.list_push(Kind::Queue, &self.key, &encode(&self.key, value)?, false, capacity).await?;
        Ok(pushed.is_some())
    }

    /// Takes the value at the front, if any.
    pub async fn poll(&self) -> DsResult<Option<T>> {
        self.store.list_pop(Kind::Queue, &self.key, true).await?.map(|b| decode(&self.key, &b)).transpose()
    }

    /// Takes the value at the front, waiting up to `timeout` for one.
    pub async fn poll_timeout(&self, timeout: Duration) -> DsResult<Option<T>> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.store.queue_poll(&self.key, timeout_ms).await?.map(|b| decode(&self.key, &b)).transpose()
    }

    /// The number of queued values.
    pub async fn len(&self) -> DsResult<u64> {
        self.store.list_len(Kind::Queue, &self.key).await
    }

    /// Whether the queue is empty.
    pub async fn is_empty(&self) -> DsResult<bool> {
        Ok(self.len().await? == 0)
    }
}
