//! Reading a bucket on the node that holds it: no network, and the flock stays here
//! (pinned) while the reader holds it, even if the table moves it away meanwhile.

use std::sync::Arc;

use futures::{Stream, StreamExt};

use super::client::Item;
use super::engine::Flock;
use super::service::{blocking, page_full, StoreNode, PAGE_BYTES_MAX, PAGE_ITEMS_MAX};
use super::StoreError;

/// A bucket this node holds completely, read from its own engine. While it lives, the
/// bucket's flock is pinned here: a hand-over waits for it before dropping the data.
pub struct LocalBucket {
    node: Arc<StoreNode>,
    flock: Flock,
    bucket: String,
}

impl std::fmt::Debug for LocalBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBucket").field("bucket", &self.bucket).field("flock", &self.flock).finish()
    }
}

impl LocalBucket {
    /// Pins `bucket` on `node` if the node holds its flock completely.
    pub(crate) fn open(node: Arc<StoreNode>, bucket: &str) -> Result<LocalBucket, StoreError> {
        super::check_key("bucket", bucket)?;
        let flock = crate::placement::flock_of(bucket.as_bytes());
        if !node.serves(flock) || !node.flocks.lock().pin(flock) {
            return Err(StoreError::Unavailable(format!(
                "node {} does not hold bucket {bucket:?} completely",
                node.id
            )));
        }
        Ok(LocalBucket { node, flock, bucket: bucket.to_owned() })
    }

    /// The bucket's key.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// One item, from this node's engine.
    pub async fn get(&self, item: &str) -> Result<Option<Item>, StoreError> {
        let key = super::item_key(&self.bucket, item)?;
        let record = self.node.local(&key).await?;
        Ok(record.filter(|r| !r.tombstone).map(|r| Item { value: r.value, version: r.version.seq }))
    }

    /// Every live item, in item order, a page at a time from this node's engine.
    pub fn items(&self) -> impl Stream<Item = Result<(String, Item), StoreError>> + Send + 'static {
        let (node, flock, bucket) = (self.node.clone(), self.flock, self.bucket.clone());
        let state = (node, bucket, None::<String>, false);
        futures::stream::unfold(state, move |(node, bucket, after, done)| async move {
            if done {
                return None;
            }
            let (name, from) = (bucket.clone(), after.clone());
            let limit = PAGE_ITEMS_MAX as usize;
            let page = blocking(&node.engine, move |e| {
                e.scan_bucket_bytes(flock, &name, from.as_deref(), limit, PAGE_BYTES_MAX)
            })
            .await;
            match page {
                Ok(page) => {
                    let done = !page_full(&page, limit);
                    let next = page.last().map(|(item, _)| item.clone()).or(after);
                    let items: Vec<_> = page
                        .into_iter()
                        .filter(|(_, r)| !r.tombstone)
                        .map(|(item, r)| Ok((item, Item { value: r.value, version: r.version.seq })))
                        .collect();
                    Some((items, (node, bucket, next, done)))
                }
                Err(err) => Some((vec![Err(err.into())], (node, bucket, after, true))),
            }
        })
        .flat_map(futures::stream::iter)
    }
}

impl Drop for LocalBucket {
    fn drop(&mut self) {
        self.node.flocks.lock().unpin(self.flock);
    }
}
