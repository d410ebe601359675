//! Which writes an item's record already holds, by the op id its writer gave each write, so
//! a write retried after a failure is not applied twice.
//!
//! A writer retries a write under the same op id until it is acknowledged, maybe on
//! another primary (the table changed meanwhile). Each node remembers, per item, the op ids
//! of the last writes its record holds. The invariant that makes that safe: **an op id is
//! remembered for an item only while that node's record of the item holds the write.**
//! So memos travel with records: a record copied from another node (catch-up, anti-entropy,
//! repair) brings that node's memos and replaces this node's, because the copy need not
//! descend from what was here; a replica write that extends the record adds its op; one
//! that replaces the record whole starts the memos over. Remembering an op the record does
//! not hold would acknowledge a lost write; forgetting one only risks a repeat, and only
//! after [`MEMOS_PER_ITEM_MAX`] later writes to the same item or [`ITEMS_MAX`] other items.
//! Memos live in memory: a node restarted forgets them (its records stay correct).

use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use super::engine::ItemKey;
use super::record::Version;

/// Items whose memos a node keeps (least recently written forgotten first).
pub(crate) const ITEMS_MAX: usize = 65_536;
/// Memos kept per item: the newest ones.
pub(crate) const MEMOS_PER_ITEM_MAX: usize = 32;

/// One write a record holds: its op id, the version it made, and whether the item existed
/// before it (what the writer's acknowledgement says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Memo {
    pub(crate) op_id: u128,
    pub(crate) version: Version,
    pub(crate) existed: bool,
}

/// The memos of recently written items.
pub(crate) struct OpMemory {
    items: lru::LruCache<ItemKey, Vec<Memo>>,
}

impl OpMemory {
    pub(crate) fn new() -> OpMemory {
        OpMemory { items: lru::LruCache::new(NonZeroUsize::new(ITEMS_MAX).unwrap_or(NonZeroUsize::MIN)) }
    }

    /// The memo of `op_id` if `key`'s record holds that write.
    pub(crate) fn recall(&mut self, key: &ItemKey, op_id: u128) -> Option<Memo> {
        self.items.get(key)?.iter().find(|m| m.op_id == op_id).copied()
    }

    /// `key`'s record now holds `memo`'s write on top of the ones remembered.
    pub(crate) fn extend(&mut self, key: &ItemKey, memo: Memo) {
        let memos = self.items.get_or_insert_mut(key.clone(), Vec::new);
        if memos.len() >= MEMOS_PER_ITEM_MAX {
            memos.remove(0);
        }
        memos.push(memo);
    }

    /// `key`'s record was replaced by one holding the writes of `memos` (and maybe older
    /// ones nobody remembers).
    pub(crate) fn replace(&mut self, key: &ItemKey, memos: Vec<Memo>) {
        if memos.is_empty() {
            self.items.pop(key);
        } else {
            let skip = memos.len().saturating_sub(MEMOS_PER_ITEM_MAX);
            self.items.put(key.clone(), memos.into_iter().skip(skip).collect());
        }
    }

    /// The memos of `key`'s record, to send along with a copy of it.
    pub(crate) fn of(&self, key: &ItemKey) -> Vec<Memo> {
        self.items.peek(key).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo(op_id: u128, seq: u64) -> Memo {
        Memo { op_id, version: Version { seq, epoch: 1 }, existed: seq > 1 }
    }

    #[test]
    fn a_record_replaced_forgets_the_writes_it_no_longer_holds() {
        let mut ops = OpMemory::new();
        let key = ItemKey::new(1, "b", "i");
        ops.extend(&key, memo(7, 1));
        ops.extend(&key, memo(8, 2));
        assert_eq!(ops.recall(&key, 7), Some(memo(7, 1)));
        ops.replace(&key, vec![memo(9, 2)]);
        assert_eq!(ops.recall(&key, 7), None, "the copy need not hold op 7");
        assert_eq!(ops.recall(&key, 9), Some(memo(9, 2)));
        ops.replace(&key, Vec::new());
        assert_eq!(ops.of(&key), Vec::new());
    }

    #[test]
    fn only_the_newest_memos_of_an_item_are_kept() {
        let mut ops = OpMemory::new();
        let key = ItemKey::new(1, "b", "i");
        for op in 0..(MEMOS_PER_ITEM_MAX as u128 + 5) {
            ops.extend(&key, memo(op, op as u64 + 1));
        }
        assert_eq!(ops.of(&key).len(), MEMOS_PER_ITEM_MAX);
        assert_eq!(ops.recall(&key, 4), None);
        assert!(ops.recall(&key, 5).is_some());
        ops.replace(&key, (0..100).map(|op| memo(op, 1)).collect());
        assert_eq!(ops.of(&key).len(), MEMOS_PER_ITEM_MAX);
        assert!(ops.recall(&key, 99).is_some(), "a long list keeps its newest");
    }
}
