//! `ItemStore`: the store as a caller sees it. Any node answers any request: writes go to
//! the flock's primary, reads to the best node that holds the flock completely, and every
//! refusal (a changed table, a node catching up, one that died) is retried elsewhere until
//! the request's deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::proto::{Expect, Fault, Msg, RecordPage, Reply, WriteOp};
use super::record::{Record, Version};
use super::routing::View;
use super::service::{Hop, StoreNode, PAGE_ITEMS_MAX};
use super::{item_key, StoreError};
use crate::retry::Backoff;

/// An item as read: its value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The value's bytes.
    pub value: Bytes,
    /// The item's version: 1 for its first write, one more with every write since.
    pub version: u64,
}

/// The bucket store, reached through a node. Cheap to clone.
#[derive(Clone)]
pub struct ItemStore {
    node: Arc<StoreNode>,
}

impl std::fmt::Debug for ItemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStore").field("node", &self.node.id).finish()
    }
}

/// Where a request goes next.
enum Route {
    /// This node.
    Local,
    /// Another node.
    Remote(String),
}

impl ItemStore {
    pub(crate) fn new(node: Arc<StoreNode>) -> ItemStore {
        ItemStore { node }
    }

    /// Stores `value` as `item` of `bucket`; its new version.
    pub async fn put(&self, bucket: &str, item: &str, value: impl Into<Bytes>) -> Result<u64, StoreError> {
        self.put_if(bucket, item, value, Expect::Any).await
    }

    /// Stores `value` only if the item's version is what `expect` says; else
    /// [`StoreError::Conflict`] with the version found.
    pub async fn put_if(
        &self,
        bucket: &str,
        item: &str,
        value: impl Into<Bytes>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let (version, _) = self.write(bucket, item, WriteOp::Put(expect), value.into()).await?;
        Ok(version.seq)
    }

    /// Adds `data` to the end of the item (creating it); its new version. Appends from
    /// many writers at once each land whole, in some order.
    pub async fn append(&self, bucket: &str, item: &str, data: impl Into<Bytes>) -> Result<u64, StoreError> {
        let (version, _) = self.write(bucket, item, WriteOp::Append, data.into()).await?;
        Ok(version.seq)
    }

    /// Deletes the item; whether it existed.
    pub async fn delete(&self, bucket: &str, item: &str) -> Result<bool, StoreError> {
        let (_, existed) = self.write(bucket, item, WriteOp::Delete, Bytes::new()).await?;
        Ok(existed)
    }

    /// Stores a Rust value (MessagePack with field names).
    pub async fn put_value<T: Serialize>(&self, bucket: &str, item: &str, value: &T) -> Result<u64, StoreError> {
        let bytes =
            rmp_serde::to_vec_named(value).map_err(|e| StoreError::InvalidKey(format!("cannot encode: {e}")))?;
        self.put(bucket, item, bytes).await
    }

    /// Reads a Rust value stored by [`ItemStore::put_value`].
    pub async fn get_value<T: DeserializeOwned>(
        &self,
        bucket: &str,
        item: &str,
    ) -> Result<Option<(T, u64)>, StoreError> {
        let Some(found) = self.get(bucket, item).await? else { return Ok(None) };
        let value = rmp_serde::from_slice(&found.value)
            .map_err(|e| StoreError::Corrupt(format!("{bucket}/{item} is not the type asked for: {e}")))?;
        Ok(Some((value, found.version)))
    }

    /// Reads the item from the best node that holds its flock completely.
    pub async fn get(&self, bucket: &str, item: &str) -> Result<Option<Item>, StoreError> {
        let key = item_key(bucket, item)?;
        let hop = self.read(key.flock, |store| {
            let key = key.clone();
            async move { store.hop(Msg::Get { key }, Bytes::new()).await }
        });
        match hop.await? {
            (Reply::Item(Some(version)), value) => Ok(Some(Item { value, version: version.seq })),
            _ => Ok(None),
        }
    }

    /// Every live item of `bucket`, in item order, a page at a time (a page is read again
    /// from another holder if one fails).
    pub fn get_bucket(&self, bucket: &str) -> impl Stream<Item = Result<(String, Item), StoreError>> + Send + 'static {
        let store = self.clone();
        let bucket = bucket.to_owned();
        let first: Result<(), StoreError> = super::check_key("bucket", &bucket);
        let state = (store, bucket, None::<String>, first.err(), false);
        futures::stream::unfold(state, |(store, bucket, after, error, done)| async move {
            if let Some(error) = error {
                return Some((vec![Err(error)], (store, bucket, after, None, true)));
            }
            if done {
                return None;
            }
            match store.page(&bucket, after.clone()).await {
                Ok((items, more)) => {
                    let next = items.last().map(|(item, _)| item.clone()).or(after);
                    let done = !more || items.is_empty();
                    Some((items.into_iter().map(Ok).collect(), (store, bucket, next, None, done)))
                }
                Err(error) => Some((vec![Err(error)], (store, bucket, after, None, true))),
            }
        })
        .flat_map(futures::stream::iter)
    }

    /// Deletes every item of `bucket`; how many there were.
    pub async fn delete_bucket(&self, bucket: &str) -> Result<u64, StoreError> {
        super::check_key("bucket", bucket)?;
        let flock = crate::placement::flock_of(bucket.as_bytes());
        let (mut deleted, mut after) = (0, None);
        loop {
            let hop = self.to_primary(flock, |store, epoch| {
                let (bucket, after) = (bucket.to_owned(), after.clone());
                let message = Msg::DeleteBucket { flock, bucket, after, epoch, limit: PAGE_ITEMS_MAX };
                async move { store.hop(message, Bytes::new()).await }
            });
            match hop.await? {
                (Reply::Deleted { items, next }, _) => {
                    deleted += items;
                    if next.is_none() {
                        return Ok(deleted);
                    }
                    after = next;
                }
                (other, _) => return Err(StoreError::Unavailable(format!("unexpected reply {other:?}"))),
            }
        }
    }

    /// Typed items of `T` whose decoded values this process keeps until they change (see
    /// [`super::Typed`]).
    pub fn typed<T: Serialize + DeserializeOwned + Send + Sync + 'static>(&self) -> super::Typed<T> {
        super::Typed::new(self.clone())
    }

    pub(crate) fn near(&self) -> &super::near::NearCache {
        &self.node.near
    }

    /// `bucket` read from this node's own engine, pinned here while the handle lives;
    /// [`StoreError::Unavailable`] when this node does not hold it completely (see
    /// [`crate::Client::run_on`] to run a function where it is).
    pub fn local_bucket(&self, bucket: &str) -> Result<super::LocalBucket, StoreError> {
        super::LocalBucket::open(self.node.clone(), bucket)
    }

    /// The nodes holding `bucket` completely, best first (the seed's `node_ids`).
    pub fn holders(&self, bucket: &str) -> Vec<String> {
        self.node.view().readers(crate::placement::flock_of(bucket.as_bytes()))
    }

    /// The best node to process `bucket`'s data: a holder, this node if it is one, else
    /// the least loaded, then the closest (the seed's `node_id`).
    pub fn best_holder(&self, bucket: &str) -> Option<String> {
        self.node.placement.best_of(&self.holders(bucket))
    }

    /// The shuffle cache (ids spread over nodes, set/get/append) on this store.
    pub fn shuffle(&self) -> super::Shuffle {
        super::Shuffle::new(self.clone())
    }

    /// The state of every flock this node owns or holds.
    pub fn flocks(&self) -> Vec<super::FlockState> {
        self.node.flock_states()
    }

    /// This node's store figures.
    pub fn stats(&self) -> super::StoreStats {
        self.node.stats()
    }

    async fn page(&self, bucket: &str, after: Option<String>) -> Result<(Vec<(String, Item)>, bool), StoreError> {
        let flock = crate::placement::flock_of(bucket.as_bytes());
        let hop = self.read(flock, |store| {
            let message = Msg::Scan { flock, bucket: bucket.to_owned(), after: after.clone(), limit: PAGE_ITEMS_MAX };
            async move { store.hop(message, Bytes::new()).await }
        });
        let (reply, body) = hop.await?;
        let Reply::Page { more } = reply else {
            return Err(StoreError::Unavailable(format!("unexpected reply {reply:?}")));
        };
        let page: RecordPage = super::proto::decode(&body).map_err(StoreError::Unavailable)?;
        let mut items = Vec::with_capacity(page.0.len());
        for (key, bytes, _) in page.0 {
            let record =
                Record::decode(&bytes).map_err(|e| StoreError::Corrupt(format!("{bucket}/{}: {e}", key.item)))?;
            items.push((key.item, Item { value: record.value, version: record.version.seq }));
        }
        Ok((items, more))
    }

    async fn write(&self, bucket: &str, item: &str, op: WriteOp, body: Bytes) -> Result<(Version, bool), StoreError> {
        let key = item_key(bucket, item)?;
        let max = self.node.config.item_bytes_max;
        if body.len() as u64 > max {
            return Err(StoreError::TooLarge { bytes: body.len() as u64, max });
        }
        let op_id = fastrand::u128(..);
        let flock = key.flock;
        let hop = self.to_primary(flock, |store, epoch| {
            let (key, body) = (key.clone(), body.clone());
            async move { store.hop(Msg::Write { key, op, op_id, epoch }, body).await }
        });
        match hop.await? {
            (Reply::Written { version, existed }, _) => {
                self.node.near.wrote(bucket, item);
                Ok((version, existed))
            }
            (other, _) => Err(StoreError::Unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends to the flock's primary until it answers or the deadline passes.
    async fn to_primary<F, Fut>(&self, flock: u32, send: F) -> Result<Hop, StoreError>
    where
        F: Fn(Target, u64) -> Fut,
        Fut: std::future::Future<Output = Result<Hop, Fault>>,
    {
        let mut attempt = Attempt::new(&self.node);
        loop {
            let view = attempt.view(&self.node).await;
            let result = match view.primary(flock) {
                None => Err(Fault::Unavailable("no node holds data (no live node with workers)".into())),
                Some(primary) => send(self.target(&view, primary), view.epoch()).await,
            };
            match attempt.judge(result) {
                Ok(hop) => return Ok(hop),
                Err(None) => {}
                Err(Some(error)) => return Err(error),
            }
            attempt.wait().await?;
        }
    }

    /// Sends to nodes that hold the flock completely, the best first, until one answers.
    async fn read<F, Fut>(&self, flock: u32, send: F) -> Result<Hop, StoreError>
    where
        F: Fn(Target) -> Fut,
        Fut: std::future::Future<Output = Result<Hop, Fault>>,
    {
        let mut attempt = Attempt::new(&self.node);
        loop {
            let view = attempt.view(&self.node).await;
            let mut readers = view.readers(flock);
            if let Some(best) = self.node.placement.best_of(&readers) {
                readers.retain(|r| *r != best);
                readers.insert(0, best);
            }
            // This node first when it serves the flock, even before its own heartbeat says so.
            if self.node.serves(flock) {
                readers.retain(|r| *r != self.node.id);
                readers.insert(0, self.node.id.clone());
            }
            if readers.is_empty() {
                attempt.last = "no node holds the bucket's flock completely yet".into();
            }
            for reader in readers {
                match attempt.judge(send(self.target(&view, &reader)).await) {
                    Ok(hop) => return Ok(hop),
                    Err(None) => {}
                    Err(Some(error)) => return Err(error),
                }
            }
            attempt.wait().await?;
        }
    }

    fn target(&self, view: &View, node: &str) -> Target {
        let route = if node == self.node.id { Route::Local } else { Route::Remote(node.to_owned()) };
        let address = view.address(node).map(str::to_owned);
        Target { store: self.node.clone(), route, node: node.to_owned(), address }
    }
}

/// One node to send a request to.
struct Target {
    store: Arc<StoreNode>,
    route: Route,
    node: String,
    address: Option<String>,
}

impl Target {
    /// Sends `message` with `body`: to this node's store directly, or over the data plane.
    async fn hop(self, message: Msg, body: Bytes) -> Result<Hop, Fault> {
        match self.route {
            Route::Local => Ok(match message {
                Msg::Write { key, op, op_id, epoch } => self.store.write(key, op, op_id, epoch, body).await,
                Msg::Get { key } => self.store.get(&key).await,
                other => self.store.send_to(&self.node, self.address.as_deref(), &other, body).await?,
            }),
            Route::Remote(node) => self.store.send_to(&node, self.address.as_deref(), &message, body).await,
        }
    }
}

/// The retry loop's state: the deadline, the backoff, and why the last attempt failed.
struct Attempt {
    deadline: Instant,
    backoff: Backoff,
    last: String,
    refresh: bool,
}

impl Attempt {
    fn new(node: &StoreNode) -> Attempt {
        Attempt {
            deadline: Instant::now() + Duration::from_millis(node.config.request_timeout_ms),
            backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(500)),
            last: String::new(),
            refresh: false,
        }
    }

    async fn view(&mut self, node: &StoreNode) -> View {
        if std::mem::take(&mut self.refresh) {
            node.refresh().await
        } else {
            node.view()
        }
    }

    /// `Ok` when the hop succeeded; `Err(Some)` when it failed for good; `Err(None)` to
    /// try again (after a refresh of placement when the node said the table moved on).
    fn judge(&mut self, result: Result<Hop, Fault>) -> Result<Hop, Option<StoreError>> {
        let fault = match result {
            Ok((Reply::Fault(fault), _)) => fault,
            Ok(hop) => return Ok(hop),
            Err(fault) => fault,
        };
        match fault {
            Fault::Final(fault) => return Err(Some(fault.into())),
            Fault::NotPrimary { .. } | Fault::StaleEpoch { .. } => self.refresh = true,
            Fault::NotReady | Fault::NeedWhole | Fault::LeaseLapsed => {}
            Fault::Unavailable(_) => self.refresh = true,
        }
        self.last = format!("{fault:?}");
        Err(None)
    }

    async fn wait(&mut self) -> Result<(), StoreError> {
        let pause = self.backoff.failed();
        if Instant::now() + pause >= self.deadline {
            return Err(StoreError::Unavailable(format!("gave up at the request's deadline; last: {}", self.last)));
        }
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

impl StoreNode {
    /// Sends to `node` at `address` (when known).
    pub(crate) async fn send_to(
        &self,
        node: &str,
        address: Option<&str>,
        message: &Msg,
        body: Bytes,
    ) -> Result<Hop, Fault> {
        let Some(address) = address else {
            return Err(Fault::Unavailable(format!("node {node} has no data address")));
        };
        self.send_address(node, address, message, body).await
    }
}
