//! Durable timers. An instance's timers live in its record, which is the truth: a timer
//! fires by the commit that removes it from the record, so it fires once, whichever owner
//! fires it. An index per flock (`wf/timers/{flock}`: a map from (type, id, name) to the
//! due time) lets a new owner find the flock's timers without reading every record. The
//! index is written before the commit that sets a timer and cleaned after the one that
//! fires or cancels it, so it may name a timer that no longer exists (skipped when due),
//! never miss one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::structures::{Kind, Store};

use super::WorkflowError;

/// Timers one flock's index may hold; a step that would set more fails.
pub const FLOCK_TIMERS_MAX: u64 = 65_536;

/// A timer as the index names it: (type, id), name.
pub(crate) type TimerKey = ((String, String), String);

fn index_of(flock: u32) -> String {
    format!("wf/timers/{flock}")
}

fn field_of(key: &TimerKey) -> Vec<u8> {
    let ((workflow, id), name) = key;
    rmp_serde::to_vec(&(workflow, id, name)).unwrap_or_default()
}

/// Adds (or moves) a timer in its flock's index; refuses past [`FLOCK_TIMERS_MAX`].
pub(crate) async fn index(store: &Store, flock: u32, key: &TimerKey, due_ms: u64) -> Result<(), WorkflowError> {
    let index = index_of(flock);
    if store.map_len(Kind::Map, &index).await? >= FLOCK_TIMERS_MAX {
        return Err(WorkflowError::Invalid(format!("flock {flock} has {FLOCK_TIMERS_MAX} timers set already")));
    }
    store.map_put(Kind::Map, &index, &field_of(key), &due_ms.to_le_bytes()).await?;
    Ok(())
}

/// Removes a timer from its flock's index.
pub(crate) async fn unindex(store: &Store, flock: u32, key: &TimerKey) -> Result<(), WorkflowError> {
    store.map_remove(Kind::Map, &index_of(flock), &field_of(key), None).await?;
    Ok(())
}

/// A flock's timers in the order they fall due, as its owner knows them.
#[derive(Default)]
pub(crate) struct Due {
    heap: BinaryHeap<Reverse<(u64, TimerKey)>>,
}

impl Due {
    /// The flock's index, read whole (it holds at most [`FLOCK_TIMERS_MAX`]).
    pub(crate) async fn load(store: &Store, flock: u32) -> Result<Due, WorkflowError> {
        let entries = store.map_entries(Kind::Map, &index_of(flock), FLOCK_TIMERS_MAX as usize).await?;
        let mut due = Due::default();
        for (field, value) in entries {
            let Ok((workflow, id, name)) = rmp_serde::from_slice::<(String, String, String)>(&field) else { continue };
            let Ok(bytes) = <[u8; 8]>::try_from(&value[..]) else { continue };
            due.push(u64::from_le_bytes(bytes), ((workflow, id), name));
        }
        Ok(due)
    }

    /// Adds a timer falling due at `due_ms`.
    pub(crate) fn push(&mut self, due_ms: u64, key: TimerKey) {
        if self.heap.len() < FLOCK_TIMERS_MAX as usize {
            self.heap.push(Reverse((due_ms, key)));
        }
    }

    /// The next timer due at or before `now_ms`, taken.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<(u64, TimerKey)> {
        if self.heap.peek().is_some_and(|Reverse((due, _))| *due <= now_ms) {
            return self.heap.pop().map(|Reverse(entry)| entry);
        }
        None
    }

    /// Milliseconds until the next timer falls due (`None`: no timer).
    pub(crate) fn wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.heap.peek().map(|Reverse((due, _))| due.saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Statekeeper;

    #[tokio::test]
    async fn the_index_gives_back_every_timer_in_due_order() {
        let store = crate::Embedded::new(crate::EmbeddedConfig::default()).structures();
        let key = |id: &str, name: &str| (("t".to_owned(), id.to_owned()), name.to_owned());
        index(&store, 3, &key("a", "x"), 300).await.unwrap();
        index(&store, 3, &key("b", "x"), 100).await.unwrap();
        index(&store, 3, &key("a", "y"), 200).await.unwrap();
        index(&store, 3, &key("a", "x"), 50).await.unwrap(); // moved earlier
        unindex(&store, 3, &key("a", "y")).await.unwrap();
        let mut due = Due::load(&store, 3).await.unwrap();
        assert_eq!(due.wait_ms(0), Some(50));
        assert_eq!(due.pop_due(49), None);
        assert_eq!(due.pop_due(1_000), Some((50, key("a", "x"))));
        assert_eq!(due.pop_due(1_000), Some((100, key("b", "x"))));
        assert_eq!(due.pop_due(1_000), None);
        assert!(Due::load(&store, 4).await.unwrap().wait_ms(0).is_none(), "another flock's index is apart");
    }
}
