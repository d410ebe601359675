//! Topics: [`Topic`], publish/subscribe at most once, and [`ReliableTopic`], where every
//! message gets a sequence id and a subscriber starting from any id replays what it missed
//! (within the retention).

use std::marker::PhantomData;

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::values::{decode, encode};
use super::{check_key, DsError, DsResult, Store};

/// What a reliable topic keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// At most this many messages.
    pub count_max: u64,
    /// Messages older than this are dropped (`None`: no age limit).
    pub age_ms_max: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { count_max: 100_000, age_ms_max: None }
    }
}

/// A publish/subscribe topic: subscribers get the messages published while they listen,
/// at most once.
pub struct Topic<T> {
    store: Store,
    name: String,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Topic<T> {
    /// The topic `name` on `store`.
    pub fn new(store: Store, name: impl Into<String>) -> DsResult<Topic<T>> {
        let name = name.into();
        check_key(&name)?;
        Ok(Topic { store, name, _type: PhantomData })
    }

    /// Publishes `message`; returns how many subscribers got it (0 if unknown).
    pub async fn publish(&self, message: &T) -> DsResult<u64> {
        self.store.publish(&self.name, &encode(&self.name, message)?).await
    }

    /// The messages published from now on.
    pub async fn subscribe(&self) -> DsResult<BoxStream<'static, DsResult<T>>> {
        let name = self.name.clone();
        let raw = self.store.subscribe(&self.name).await?;
        Ok(Box::pin(raw.map(move |bytes| decode(&name, &bytes))))
    }
}

/// Messages one read of a reliable topic takes at most.
const READ_BATCH_MAX: usize = 1_000;
/// Longest one read waits for new messages before it asks again.
const READ_WAIT_MS: u64 = 1_000;

/// A topic that keeps its messages, numbered 1, 2, ..., within its [`Retention`].
pub struct ReliableTopic<T> {
    store: Store,
    name: String,
    retention: Retention,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> ReliableTopic<T> {
    /// The reliable topic `name` on `store`.
    pub fn new(store: Store, name: impl Into<String>, retention: Retention) -> DsResult<ReliableTopic<T>> {
        let name = name.into();
        check_key(&name)?;
        if retention.count_max == 0 {
            return Err(DsError::Invalid("a reliable topic must retain at least one message".into()));
        }
        Ok(ReliableTopic { store, name, retention, _type: PhantomData })
    }

    /// Publishes `message`; returns its sequence id.
    pub async fn publish(&self, message: &T) -> DsResult<u64> {
        self.store.reliable_publish(&self.name, &encode(&self.name, message)?, self.retention).await
    }

    /// Every message with a sequence id above `after` (0: from the oldest retained), in
    /// order, then new ones as they come. Messages retention dropped before they were read
    /// show up once as a [`DsError::Gap`]; the stream goes on after them.
    pub fn subscribe_after(&self, after: u64) -> BoxStream<'static, DsResult<(u64, T)>> {
        let (store, name) = (self.store.clone(), self.name.clone());
        let state = (store, name, after, std::collections::VecDeque::<(u64, bytes::Bytes)>::new());
        Box::pin(futures::stream::unfold(state, |(store, name, mut after, mut buffered)| async move {
            loop {
                if let Some((seq, bytes)) = buffered.pop_front() {
                    after = seq;
                    let item = decode(&name, &bytes).map(|value| (seq, value));
                    return Some((item, (store, name, after, buffered)));
                }
                match store.reliable_read(&name, after, READ_BATCH_MAX, READ_WAIT_MS).await {
                    Err(err) => return Some((Err(err), (store, name, after, buffered))),
                    Ok(batch) => {
                        let first = batch.messages.first().map(|(seq, _)| *seq);
                        buffered.extend(batch.messages);
                        // Nothing between `after` and the first retained message survives.
                        if let Some(first) = first {
                            if after > 0 && first > after + 1 {
                                let gap = DsError::Gap { topic: name.clone(), from: after + 1, to: first };
                                return Some((Err(gap), (store, name, first - 1, buffered)));
                            }
                        }
                    }
                }
            }
        }))
    }
}
