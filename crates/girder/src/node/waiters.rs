//! The node-local table of callers waiting for outcomes.
//!
//! The statekeeper only knows which *nodes* wait for a request; this table knows which
//! callers on this node do, so one notification reaches all of them, and so a second local
//! caller of a request already submitted from this node does not submit it again.

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::id::{IdMap, ReqId};
use crate::request::Outcome;

/// Callers waiting on this node, by request.
#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<IdMap<Vec<oneshot::Sender<Outcome>>>>,
}

impl Waiters {
    /// Registers a caller. Returns its receiver and whether it is the first local caller of
    /// `id` (which must then submit the request; later ones only wait).
    pub(crate) fn register(&self, id: ReqId) -> (oneshot::Receiver<Outcome>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut map = self.map.lock();
        let entry = map.entry(id).or_default();
        // Callers that gave up (deadline) left closed senders behind; they do not count.
        entry.retain(|sender| !sender.is_closed());
        let first = entry.is_empty();
        entry.push(tx);
        (rx, first)
    }

    /// Hands `outcome` to every local caller of `id`.
    pub(crate) fn deliver(&self, id: &ReqId, outcome: &Outcome) {
        let senders = self.map.lock().remove(id);
        for sender in senders.into_iter().flatten() {
            // A dropped receiver is a caller that stopped waiting; nothing to do.
            let _ = sender.send(outcome.clone());
        }
    }

    /// Number of requests with local callers.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Drops every waiting caller's sender; they see a closed channel.
    pub(crate) fn clear(&self) {
        self.map.lock().clear();
    }
}
