//! The statekeeper: the control plane every node shares.
//!
//! Queues, request states, volunteers, the function directory, node membership and the
//! memoized results live behind the [`Statekeeper`] trait. Each method is one atomic step
//! of the protocol, shaped so that a networked implementation can run it as one server-side
//! script in one round trip; nothing above this trait sees the backing store's types.
//!
//! The protocol in brief:
//! - A request enters a queue with [`Statekeeper::submit`]: at the back of a pool's queue for
//!   a top-level call, at the front of the caller's own worker queue for a nested one. A
//!   request already memoized or already in flight is never queued twice (single flight).
//! - Queues hold request ids; the request's state says whether it is still pending. A
//!   helper may copy an id into a second queue, so [`Statekeeper::claim`] skips ids that are
//!   running or done: the first claimer wins, the copies are dropped when reached.
//! - Members (workers, and child pools) volunteer at their pool with a number of credits;
//!   work entering a pool's queue goes to a volunteer while one has credits, and a child
//!   pool counts as a volunteer with the credits of its own idle members.
//! - [`Statekeeper::complete`] memoizes the outcome and wakes exactly the nodes that wait
//!   for it, each through its own inbox.

mod embedded;
mod results;

pub use embedded::{Embedded, EmbeddedConfig};
pub use results::{ResultStore, ResultStoreConfig};

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::StatekeeperError;
use crate::id::ReqId;
use crate::request::{Outcome, Request};

/// Result of a statekeeper operation.
pub type SkResult<T> = Result<T, StatekeeperError>;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name.
            pub fn new(name: impl Into<Arc<str>>) -> $name {
                $name(name.into())
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A node's id, unique among live nodes.
    NodeId
);
name_type!(
    /// A pool's name.
    PoolId
);
name_type!(
    /// A queue: a pool's queue (`pool:NAME`) or a worker's own queue (`worker:ID`).
    QueueId
);

impl QueueId {
    /// The queue of pool `pool`.
    pub fn pool(pool: &PoolId) -> QueueId {
        QueueId(format!("pool:{pool}").into())
    }

    /// The own queue of worker `worker` (a worker id is unique cluster-wide).
    pub fn worker(worker: &str) -> QueueId {
        QueueId(format!("worker:{worker}").into())
    }

    /// The pool whose queue this is, if it is a pool queue.
    pub fn as_pool(&self) -> Option<PoolId> {
        self.0.strip_prefix("pool:").map(PoolId::new)
    }
}

/// What [`Statekeeper::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The outcome was memoized; nothing was queued and no waiter was recorded.
    Done(Outcome),
    /// The request was new and is now queued; the waiter is recorded.
    Queued,
    /// The request was already in flight; the waiter is added to it.
    Joined,
    /// No live node has the function registered; nothing was recorded.
    UnknownFunction,
}

/// A message to a node's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request this node waits for has an outcome.
    Done {
        /// The request.
        id: ReqId,
        /// Its outcome.
        outcome: Outcome,
    },
}

/// Counters of what the statekeeper's distribution did, for status and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCounters {
    /// Requests a pool's distributor handed to a volunteer.
    pub handed_off: u64,
    /// Requests a pool's helper copied up from a member's queue.
    pub hoisted: u64,
    /// Length of the pool's own queue, stale entries included.
    pub queue_len: usize,
}

/// The control plane shared by all nodes of a grid. See the module docs for the protocol.
#[async_trait]
pub trait Statekeeper: Send + Sync + 'static {
    /// Registers a live node with the functions it serves. Fails with
    /// [`StatekeeperError::DuplicateNode`] when a live node already has this id.
    async fn register_node(&self, node: &NodeId, functions: &[(String, u32)]) -> SkResult<()>;

    /// Removes a node and its functions from the directory.
    async fn deregister_node(&self, node: &NodeId) -> SkResult<()>;

    /// The version of `function` served by some live node, if any.
    async fn function_version(&self, function: &str) -> SkResult<Option<u32>>;

    /// Declares `pool`, with `parent` as the pool it volunteers at when idle.
    async fn declare_pool(&self, pool: &PoolId, parent: Option<&PoolId>) -> SkResult<()>;

    /// Makes `member` (a worker queue or a child pool's queue) a member of `pool`.
    async fn join_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()>;

    /// Removes `member` from `pool` and its volunteer list.
    async fn leave_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()>;

    /// The memoized outcome of `id`, if any.
    async fn result(&self, id: &ReqId) -> SkResult<Option<Outcome>>;

    /// Submits `request` into `queue` (at the front when `front`) on behalf of `waiter`,
    /// unless it is memoized or in flight. A nested (`front`) submission of a request that
    /// is pending elsewhere also puts a copy at the front of `queue`, so the caller can
    /// run it itself instead of waiting (the copy that is claimed first wins).
    async fn submit(&self, request: &Request, queue: &QueueId, front: bool, waiter: &NodeId) -> SkResult<Submitted>;

    /// Claims up to `max` pending requests from the front of `queue` for `owner`, skipping
    /// and dropping ids that are running or done.
    async fn claim(&self, queue: &QueueId, owner: &NodeId, max: usize) -> SkResult<Vec<Request>>;

    /// Records the outcome of `id`, memoizing it when `memoize`, and wakes every waiting
    /// node other than `local` through its inbox. Returns whether `local` was waiting.
    async fn complete(&self, id: &ReqId, outcome: &Outcome, memoize: bool, local: &NodeId) -> SkResult<bool>;

    /// Sets `member`'s credits at `pool`: how many more requests it takes now. Zero
    /// withdraws it. Queued work of the pool and its ancestors flows to it at once.
    async fn volunteer(&self, pool: &PoolId, member: &QueueId, credits: u32) -> SkResult<()>;

    /// Hands up to `max` requests from `pool`'s queue to volunteers; returns how many.
    async fn distribute(&self, pool: &PoolId, max: usize) -> SkResult<usize>;

    /// When `pool` has idle volunteers, copies up to `max` pending requests from the far end
    /// of its busiest members' queues to the end of the pool's queue, where the distributor
    /// hands them to the volunteers. Returns how many were copied.
    async fn hoist(&self, pool: &PoolId, max: usize) -> SkResult<usize>;

    /// The length of `queue`, stale entries included.
    async fn queue_len(&self, queue: &QueueId) -> SkResult<usize>;

    /// What the distribution of `pool` has done so far.
    async fn pool_counters(&self, pool: &PoolId) -> SkResult<PoolCounters>;

    /// Resolves when work may have arrived in `queue` (or, for a pool queue, its volunteers
    /// changed), or after `timeout_ms`. Wake-ups may be spurious; none is lost.
    async fn wait_work(&self, queue: &QueueId, timeout_ms: u64) -> SkResult<()>;

    /// The stream of events addressed to `node`. Call once per node.
    async fn open_inbox(&self, node: &NodeId) -> SkResult<BoxStream<'static, Event>>;
}
