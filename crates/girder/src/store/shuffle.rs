//! Shuffles (the seed's "shoveling"): cache ids created empty and spread over the nodes,
//! then written by many writers at once (`set`, `append`) and read where they are.
//!
//! An id is a bucket holding one item, [`SHUFFLE_ITEM`]: it lives on its flock's owners,
//! so `node_ids` says where its bytes are and `node_id` which of those should process it,
//! and it moves, is re-replicated and caught up like any bucket when nodes join or die.
//! Spreading follows the placement table's strategy (uniform per node, by CPU, by
//! memory: see [`crate::placement::Placement::configure`]).

use std::collections::HashMap;

use bytes::Bytes;
use futures::StreamExt;

use super::{Expect, ItemStore, StoreError};

/// The item an id's bytes are stored as.
pub const SHUFFLE_ITEM: &str = "data";
/// Ids one `init` creates.
pub const INIT_IDS_MAX: usize = 100_000;
/// Ids `init` creates at once.
const INIT_CONCURRENCY: usize = 64;

/// The shuffle cache, reached through a node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shuffle {
    store: ItemStore,
}

impl Shuffle {
    pub(crate) fn new(store: ItemStore) -> Shuffle {
        Shuffle { store }
    }

    /// Creates every id of `ids` empty (an id that exists keeps its bytes); each id's
    /// holders, best first.
    pub async fn init(&self, ids: &[String]) -> Result<HashMap<String, Vec<String>>, StoreError> {
        if ids.len() > INIT_IDS_MAX {
            return Err(StoreError::InvalidKey(format!(
                "init creates at most {INIT_IDS_MAX} ids at once, got {}",
                ids.len()
            )));
        }
        let creates = ids.iter().map(|id| async move {
            match self.store.put_if(id, SHUFFLE_ITEM, Bytes::new(), Expect::Absent).await {
                Ok(_) | Err(StoreError::Conflict { .. }) => Ok(id.clone()),
                Err(err) => Err(err),
            }
        });
        let mut created = futures::stream::iter(creates).buffer_unordered(INIT_CONCURRENCY);
        let mut placed = HashMap::with_capacity(ids.len());
        while let Some(id) = created.next().await {
            let id = id?;
            let holders = self.node_ids(&id);
            placed.insert(id, holders);
        }
        Ok(placed)
    }

    /// Replaces the id's bytes; its new version.
    pub async fn set(&self, id: &str, data: impl Into<Bytes>) -> Result<u64, StoreError> {
        self.store.put(id, SHUFFLE_ITEM, data).await
    }

    /// Adds `data` to the end of the id's bytes; appends from many writers each land
    /// whole, in some order.
    pub async fn append(&self, id: &str, data: impl Into<Bytes>) -> Result<u64, StoreError> {
        self.store.append(id, SHUFFLE_ITEM, data).await
    }

    /// The id's bytes (`None` when it was never created).
    pub async fn get(&self, id: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.store.get(id, SHUFFLE_ITEM).await?.map(|item| item.value))
    }

    /// The nodes holding the id's bytes completely, best first.
    pub fn node_ids(&self, id: &str) -> Vec<String> {
        self.store.holders(id)
    }

    /// The best node to process the id: a holder, this node if it is one, else the
    /// least loaded, then the closest.
    pub fn node_id(&self, id: &str) -> Option<String> {
        self.store.best_holder(id)
    }
}
