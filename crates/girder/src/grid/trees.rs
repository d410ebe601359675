//! The call trees this node evaluates requests of, and how trees ended.
//!
//! Every evaluation enters its request's tree for as long as it runs and gets the tree's
//! cancellation token. When the statekeeper reports that a tree ended (its last root
//! caller left, its root caller's node died, or it went over its budget), the token is
//! cancelled: async evaluations are dropped at their next await, blocking ones see
//! [`crate::Ctx::is_cancelled`] and their nested calls fail at once, so the tree stops
//! consuming slots. Ended trees are remembered (bounded) so that an evaluation starting
//! just after the news still sees it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::control::TreeEnd;
use crate::id::ReqId;

/// Ended trees remembered; older ones are forgotten (their requests are dropped by the
/// statekeeper anyway, this only spares a round trip).
const ENDED_MAX: usize = 65_536;
/// Adoptions remembered (requests that moved to another tree when theirs ended).
const ADOPTED_MAX: usize = 65_536;

/// The trees of the evaluations running here, and the trees that ended.
pub(crate) struct Trees {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Tree -> its token and how many evaluations of it run here.
    live: HashMap<u64, (CancellationToken, usize)>,
    ended: lru::LruCache<u64, TreeEnd>,
    /// (Request, the tree it left) -> the tree that adopted it when that one ended.
    adopted: lru::LruCache<(ReqId, u64), u64>,
}

impl Default for Trees {
    fn default() -> Self {
        // Bounded by `end`; a bounded LruCache would allocate its whole capacity up front.
        let (ended, adopted) = (lru::LruCache::unbounded(), lru::LruCache::unbounded());
        Trees { inner: Mutex::new(Inner { live: HashMap::new(), ended, adopted }) }
    }
}

/// An evaluation's membership in its tree; leaves the tree when dropped.
pub(crate) struct Entered {
    trees: Arc<Trees>,
    tree: u64,
    /// Cancelled when the tree ends; `None` outside any tree.
    pub(crate) token: Option<CancellationToken>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if self.token.is_none() {
            return;
        }
        let mut inner = self.trees.inner.lock();
        if let Some((_, running)) = inner.live.get_mut(&self.tree) {
            *running -= 1;
            if *running == 0 {
                inner.live.remove(&self.tree);
            }
        }
    }
}

impl Trees {
    /// Enters `tree` for one evaluation. Tree 0 (no tree) is never cancelled.
    pub(crate) fn enter(self: &Arc<Self>, tree: u64) -> Entered {
        if tree == 0 {
            return Entered { trees: self.clone(), tree, token: None };
        }
        let mut inner = self.inner.lock();
        let ended = inner.ended.peek(&tree).is_some();
        let (token, running) = inner.live.entry(tree).or_insert_with(|| (CancellationToken::new(), 0));
        *running += 1;
        if ended {
            token.cancel();
        }
        Entered { trees: self.clone(), tree, token: Some(token.clone()) }
    }

    /// Records that `tree` ended and cancels its evaluations here.
    pub(crate) fn end(&self, tree: u64, end: TreeEnd) {
        if tree == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        if !inner.ended.contains(&tree) && inner.ended.len() >= ENDED_MAX {
            inner.ended.pop_lru();
        }
        inner.ended.put(tree, end);
        if let Some((token, _)) = inner.live.get(&tree) {
            token.cancel();
        }
    }

    /// Records that the tree `to` adopted the request `id` from the tree `from` (which is
    /// ending: the statekeeper says so first, so its evaluation here goes on in `to`).
    pub(crate) fn adopt(&self, id: ReqId, from: u64, to: u64) {
        let mut inner = self.inner.lock();
        if !inner.adopted.contains(&(id, from)) && inner.adopted.len() >= ADOPTED_MAX {
            inner.adopted.pop_lru();
        }
        inner.adopted.put((id, from), to);
    }

    /// The tree an evaluation of the request `id` of `tree` belongs to: `tree`, or the one
    /// that adopted it when that ended (and so on, a few times at most).
    pub(crate) fn tree_of(&self, id: &ReqId, tree: u64) -> u64 {
        const HOPS_MAX: usize = 8;
        if tree == 0 {
            return 0;
        }
        let inner = self.inner.lock();
        let mut now = tree;
        for _ in 0..HOPS_MAX {
            match inner.adopted.peek(&(*id, now)) {
                Some(next) => now = *next,
                None => break,
            }
        }
        now
    }

    /// How `tree` ended, if this node heard.
    pub(crate) fn ended(&self, tree: u64) -> Option<TreeEnd> {
        if tree == 0 {
            return None;
        }
        self.inner.lock().ended.peek(&tree).copied()
    }
}
