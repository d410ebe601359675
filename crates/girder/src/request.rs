//! A request: a function name, its version and encoded arguments, with their identity.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::CallError;
use crate::id::ReqId;

/// A request to evaluate `function` at `version` on `args` (a MessagePack array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The identity, computed from the other three fields by [`Request::new`].
    pub id: ReqId,
    /// The namespace-qualified function name, e.g. `examples/fib`.
    pub function: Arc<str>,
    /// The function's version; part of the identity.
    pub version: u32,
    /// The MessagePack-encoded argument array.
    pub args: Bytes,
    /// The call tree the request belongs to and its limits; not part of the identity.
    #[serde(default)]
    pub budget: Budget,
    /// How many times a node holding this request's claim was lost (reaped, or removed while
    /// it held the claim) since the request was submitted: the statekeeper counts it when it
    /// puts the request back in flight and sets it here when it hands the request out. The
    /// claiming node compares it with the function's `retries` and fails the request instead
    /// of running it again once they are used up. Not part of the identity.
    #[serde(default)]
    pub lost: u32,
    /// The grid's count of forgets ([`crate::control::Statekeeper::forget`] and
    /// `forget_all`) when the statekeeper handed this request out; a completion that comes
    /// when the request is no longer in flight (a duplicate, or after the store lost its
    /// state) is memoized only if nothing was forgotten since. Not part of the identity.
    #[serde(default)]
    pub forgets: u64,
}

/// The call tree a request belongs to, how deep in it the request is, and the tree's
/// limits. A top-level call starts a tree; nested calls inherit it one level deeper.
///
/// The statekeeper counts the new requests each tree creates (single-flight joins and
/// memoized answers are free) and refuses those past `requests_max`; a nested call deeper
/// than `depth_max` is refused before it is submitted. Both fail with
/// [`CallError::BudgetExceeded`]. A tree is also the unit of cancellation: when the last
/// caller of its root leaves, every evaluation of the tree stops (see
/// [`crate::control::Statekeeper::cancel_tree`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Budget {
    /// The tree's id; 0 for a request outside any tree (no limits, never cancelled).
    pub tree: u64,
    /// Levels above this request: 0 for a top-level call.
    pub depth: u32,
    /// Deepest level a nested call of the tree may reach.
    pub depth_max: u32,
    /// Most new requests the whole tree may create, its root included.
    pub requests_max: u64,
}

impl Default for Budget {
    /// Outside any tree, without limits.
    fn default() -> Self {
        Budget { tree: 0, depth: 0, depth_max: u32::MAX, requests_max: u64::MAX }
    }
}

impl Budget {
    /// A fresh tree with these limits.
    pub fn root(requests_max: u64, depth_max: u32) -> Budget {
        // 0 means "no tree"; a random id otherwise (collisions among live trees: ~2^-64).
        let tree = fastrand::u64(1..);
        Budget { tree, depth: 0, depth_max, requests_max }
    }

    /// The budget of a call made from a request with this budget: one level deeper, or
    /// the error when that is past `depth_max`.
    pub fn nested(&self, function: &str) -> Result<Budget, CallError> {
        let depth = self.depth.saturating_add(1);
        if depth > self.depth_max {
            return Err(CallError::BudgetExceeded {
                function: function.to_owned(),
                limit: "depth".to_owned(),
                max: u64::from(self.depth_max),
            });
        }
        Ok(Budget { depth, ..*self })
    }
}

impl Request {
    /// Builds a request and computes its identity.
    pub fn new(function: impl Into<Arc<str>>, version: u32, args: Bytes) -> Request {
        let function = function.into();
        let id = ReqId::of(&function, version, &args);
        Request { id, function, version, args, budget: Budget::default(), lost: 0, forgets: 0 }
    }

    /// This request, as part of the call tree `budget`.
    pub fn with_budget(self, budget: Budget) -> Request {
        Request { budget, ..self }
    }

    /// Bytes this request occupies in memory, for bounds.
    pub fn size_bytes(&self) -> usize {
        self.function.len() + self.args.len() + 64
    }
}

/// What an evaluation produced: the MessagePack-encoded result or why there is none.
pub type Outcome = Result<Bytes, CallError>;
