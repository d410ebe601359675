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
//! - A request whose claiming node is lost goes back in flight with its `lost` count one
//!   higher ([`Request::lost`]); the node that claims it next decides, by the function's
//!   `retries`, whether to run it again or to fail it.
//! - Memoized outcomes are grouped by function version, so that [`Statekeeper::forget_all`]
//!   finds them in bounded steps; [`Statekeeper::forget`] drops one. An evaluation in flight
//!   when its result is forgotten is not memoized when it completes (its callers still get
//!   it), so a forgotten result never comes back through a completion that raced the forget.
//!   A claim stamps the request with the grid's count of forgets ([`Request::forgets`]), so
//!   a completion that finds its request no longer in flight knows whether it may memoize.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod embedded;
mod results;

pub use embedded::{Embedded, EmbeddedConfig};
pub use results::{ResultStore, ResultStoreConfig};

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::StatekeeperError;
use crate::id::ReqId;
use crate::request::{Outcome, Request};

/// Most requests of ended call trees one [`Statekeeper::claim`] drops.
pub const CLAIM_DROP_MAX: usize = 1_000;
/// Most requests of one call tree that callers of other trees can adopt when it ends;
/// beyond, a joining caller whose request was dropped calls again instead.
pub const ADOPTIONS_MAX: usize = 64;
/// How long a call tree's record (its request count, how it ended) outlives the last new
/// request of the tree.
pub const TREE_TTL_MS: u64 = 3_600_000;
/// Most memoized outcomes one step of [`Statekeeper::forget_all`] removes; a store takes as
/// many steps as it needs, each bounded.
pub const FORGET_BATCH_MAX: usize = 1_000;

/// Whether [`Statekeeper::complete`] memoizes an outcome, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memo {
    /// Not memoized: panics, infrastructure errors, and evaluations the grid gave up on.
    Skip,
    /// Memoized for the store's own time to live (if it has one).
    Keep,
    /// Memoized for this many milliseconds (a function's `ttl_ms`); `For(0)` memoizes nothing.
    For(u64),
}

impl Memo {
    /// Whether anything is memoized at all.
    pub fn memoizes(self) -> bool {
        !matches!(self, Memo::Skip | Memo::For(0))
    }
}

/// The group of memoized outcomes [`Statekeeper::forget_all`] forgets at once: a function at
/// one version, written `VERSION:NAME` where a store needs one string.
pub fn version_key(function: &str, version: u32) -> String {
    format!("{version}:{function}")
}

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
    /// The request's call tree has ended (cancelled, or over its budget): nothing was
    /// recorded, and nothing more of the tree will be.
    TreeEnded(TreeEnd),
}

/// Why a call tree ended before its root had an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeEnd {
    /// Nobody waits for its root any more: its callers left, or its root's caller's node died.
    Cancelled,
    /// It tried to create more new requests than its budget allows (the limit).
    OverBudget(u64),
}

impl TreeEnd {
    /// The error callers in the tree get for a call of `function`.
    pub fn error(self, function: &str) -> crate::error::CallError {
        use crate::error::CallError;
        match self {
            TreeEnd::Cancelled => CallError::Cancelled { function: function.to_owned() },
            TreeEnd::OverBudget(max) => {
                CallError::BudgetExceeded { function: function.to_owned(), limit: "requests".to_owned(), max }
            }
        }
    }
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
    /// A request this node waits for was dropped because its call tree ended; its
    /// callers get [`TreeEnd::error`] (a caller in another, live tree submits it again).
    Dropped {
        /// The request.
        id: ReqId,
        /// Why its tree ended.
        end: TreeEnd,
    },
    /// A request of a tree that is ending is waited for by a caller of another tree, which
    /// adopts it: its evaluation goes on as part of `tree` (sent to every live node, before
    /// the [`Event::TreeEnded`] of the tree it leaves).
    Adopted {
        /// The request.
        id: ReqId,
        /// The tree it leaves.
        from: u64,
        /// The tree it belongs to now.
        tree: u64,
    },
    /// A call tree ended: evaluations of it stop (sent to every live node).
    TreeEnded {
        /// The tree's id ([`crate::Budget::tree`]).
        tree: u64,
        /// Why.
        end: TreeEnd,
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

/// What a live node reports about itself with each heartbeat, for `girder status` and
/// placement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: String,
    /// Where its HTTP API listens, if it serves one.
    pub http: Option<String>,
    /// Where its data plane listens (reserved for node-to-node transfer).
    pub data: Option<String>,
    /// The machine's host name.
    pub host: String,
    /// The node's process id on its host (0 when unknown), so that a node restarted on the
    /// same host can tell that its predecessor is gone.
    #[serde(default)]
    pub pid: u32,
    /// girder's version on the node.
    pub version: String,
    /// CPUs the node counts with (the machine's, unless configured).
    pub cpus: u32,
    /// The machine's memory.
    pub memory_total_bytes: u64,
    /// Memory available on the machine.
    pub memory_free_bytes: u64,
    /// The node's configured memory budget (`max-memory`), if any.
    pub memory_max_bytes: Option<u64>,
    /// The machine's load average over one minute.
    pub load_1m: f64,
    /// The pools it declared.
    pub pools: Vec<String>,
    /// The functions it serves.
    pub functions: Vec<String>,
    /// Its workers.
    pub workers: Vec<WorkerInfo>,
    /// Calls made through it (top level and nested).
    pub calls: u64,
    /// Calls it answered from memoized results.
    pub memo_hits: u64,
    /// Evaluations it started.
    pub evaluations: u64,
    /// How often it heartbeats.
    pub heartbeat_ms: u64,
    /// Milliseconds since its last heartbeat, filled in by [`Statekeeper::live_nodes`].
    pub heartbeat_age_ms: u64,
    /// Flocks it owns (as any replica) in the placement table it last read.
    pub flocks: u32,
    /// Its health by heartbeat age, filled in by [`Statekeeper::live_nodes`].
    pub health: Health,
    /// What its bucket store holds, if it runs one.
    #[serde(default)]
    pub store: Option<StoreReport>,
    /// It is draining: it takes no new work and hands its flocks over.
    #[serde(default)]
    pub draining: bool,
    /// How many times it registered again after its lease ran out (paused, cut off): each
    /// time, the grid counted it dead and re-ran its work meanwhile.
    #[serde(default)]
    pub rejoins: u64,
}

/// What a node's bucket store reports with each heartbeat: which flocks it can serve reads
/// for and which it holds at all, so that every node can route store requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreReport {
    /// The placement epoch the node last acted on.
    pub epoch: u64,
    /// Flocks it holds completely (caught up): one bit per flock, flock `f` at byte `f / 8`,
    /// bit `f % 8`.
    pub ready: Vec<u8>,
    /// Flocks it holds any data of and still takes writes for (ready or catching up, owned
    /// or handing over), same layout.
    pub held: Vec<u8>,
    /// Live items stored.
    pub items: u64,
    /// Bytes stored (encoded records).
    pub bytes: u64,
    /// Flocks being copied to it now.
    pub syncing: u32,
}

impl StoreReport {
    /// Whether bit `flock` is set in `bits`.
    pub fn has(bits: &[u8], flock: u32) -> bool {
        bits.get((flock / 8) as usize).is_some_and(|b| b & (1 << (flock % 8)) != 0)
    }
}

/// A node's health, judged by the age of its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heartbeating on time.
    #[default]
    Alive,
    /// Missed a couple of heartbeats; its lease still holds.
    Suspect,
    /// Its lease ran out: its work is being re-run elsewhere.
    Dead,
}

impl NodeInfo {
    /// Alive while its heartbeat is at most two intervals old, dead once `node_ttl_ms`
    /// passed, suspect in between.
    pub fn health(&self, node_ttl_ms: u64) -> Health {
        if self.heartbeat_age_ms >= node_ttl_ms {
            Health::Dead
        } else if self.heartbeat_age_ms > 2 * self.heartbeat_ms.max(1) {
            Health::Suspect
        } else {
            Health::Alive
        }
    }

    /// Slots in use and in all, over its workers.
    pub fn slots(&self) -> (u32, u32) {
        self.workers.iter().fold((0, 0), |(busy, all), w| (busy + w.busy, all + w.slots))
    }
}

/// One worker in a [`NodeInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's id.
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// Its slots.
    pub slots: u32,
    /// Slots in use.
    pub busy: u32,
    /// Length of its own queue, stale entries included.
    pub queue_len: u64,
    /// Evaluations it started.
    pub executed: u64,
}

/// The control plane shared by all nodes of a grid. See the module docs for the protocol.
#[async_trait]
pub trait Statekeeper: Send + Sync + 'static {
    /// Registers a live node with the functions it serves. Fails with
    /// [`StatekeeperError::DuplicateNode`] when a live node already has this id.
    async fn register_node(&self, node: &NodeId, functions: &[(String, u32)]) -> SkResult<()>;

    /// Removes a node: its functions leave the directory, its workers leave their pools,
    /// and the requests it had queued or claimed go back to their pools' queues (first its
    /// claims in id order, to the front; then its queues' pending entries, by queue name and
    /// front to back, to the back); requests of a function no live node serves any more
    /// fail for their waiters. A store may do this in bounded steps; the call returns when
    /// all of it is done.
    async fn deregister_node(&self, node: &NodeId) -> SkResult<()>;

    /// Renews `node`'s lease and publishes `info`. Returns `false` when the statekeeper
    /// does not know the node (it was declared dead, or the store lost its state): the node
    /// must then register again and re-declare its pools and workers.
    async fn heartbeat(&self, node: &NodeId, info: &NodeInfo) -> SkResult<bool>;

    /// Declares dead every node whose lease ran out and deregisters it (see
    /// [`Statekeeper::deregister_node`]), so its work is run elsewhere. Any node may call
    /// it; returns the nodes reaped. Dead nodes are taken in id order, at most 16 at a time:
    /// each group is detached together, then what it held is given back.
    async fn reap(&self) -> SkResult<Vec<NodeId>>;

    /// The live nodes, with what they last reported.
    async fn live_nodes(&self) -> SkResult<Vec<NodeInfo>>;

    /// The version of `function` served by some live node, if any.
    async fn function_version(&self, function: &str) -> SkResult<Option<u32>>;

    /// Declares `pool`, with `parent` as the pool it volunteers at when idle; `node` runs a
    /// distributor for it and is woken when work waits in its queue. Declaring an existing
    /// pool without a parent keeps the parent it has.
    async fn declare_pool(&self, pool: &PoolId, parent: Option<&PoolId>, node: &NodeId) -> SkResult<()>;

    /// Makes the worker queue `member`, owned by `node`, a member of `pool`. Work is handed
    /// to it only for functions `node` serves.
    async fn join_pool(&self, pool: &PoolId, member: &QueueId, node: &NodeId) -> SkResult<()>;

    /// Removes `member` from `pool` and its volunteer list.
    async fn leave_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()>;

    /// The memoized outcome of `id`, if any.
    async fn result(&self, id: &ReqId) -> SkResult<Option<Outcome>>;

    /// The memoized outcome of `id` if this process already holds it (a near cache), without
    /// any network round trip. Calls look here first and otherwise go straight to
    /// [`Statekeeper::submit`], which answers memoized outcomes too.
    fn cached_result(&self, id: &ReqId) -> Option<Outcome>;

    /// Submits `request` into `queue` (at the front when `front`) on behalf of `waiter`,
    /// unless it is memoized or in flight. For a request of a call tree
    /// ([`crate::Budget::tree`] not 0): a tree that ended gets [`Submitted::TreeEnded`]
    /// (a tree whose root's caller's node was reaped ends, as by [`Statekeeper::cancel_tree`],
    /// at the latest when one of its requests is claimed); a new request past the tree's `requests_max` ends the
    /// tree as [`TreeEnd::OverBudget`]; a new request counts against the budget, a join or a
    /// memoized answer does not. A nested (`front`) submission of a request that
    /// is pending elsewhere also puts a copy at the front of `queue`, so the caller can
    /// run it itself instead of waiting (the copy that is claimed first wins). A request in
    /// flight whose owner died is queued again. When no live node serves the function, a
    /// request in flight for it is failed for all its waiters.
    async fn submit(&self, request: &Request, queue: &QueueId, front: bool, waiter: &NodeId) -> SkResult<Submitted>;

    /// Claims up to `max` pending requests from the front of `queue` for `owner`, skipping
    /// and dropping ids that are running or done. A request whose call tree ended is
    /// dropped, not claimed: its waiters get [`Event::Dropped`]; at most
    /// [`CLAIM_DROP_MAX`] are dropped per call (the queue's owner is woken to go on). The claims are held under `owner`'s lease.
    /// A node the statekeeper does not know (never registered, deregistered or reaped) holds
    /// no claims: it gets nothing and the queue is left as it is.
    async fn claim(&self, queue: &QueueId, owner: &NodeId, max: usize) -> SkResult<Vec<Request>>;

    /// Puts back in flight every request `owner` holds a claim on except those in `keep`
    /// (in id order, each to the front of its pool).
    /// A node calls it after a claim whose reply it lost (the connection dropped), with the
    /// requests it really runs; anything else it holds is re-run elsewhere. Returns how many.
    async fn release_claims(&self, owner: &NodeId, keep: &[ReqId]) -> SkResult<usize>;

    /// Records the outcome of `request` (as it was claimed) and wakes every waiting node
    /// other than `local` through its inbox. Returns whether `local` was waiting. The outcome
    /// is memoized as `memo` says, unless it was forgotten since: while the request is in
    /// flight, unless [`Statekeeper::forget`] or [`Statekeeper::forget_all`] covered it since
    /// it was submitted; when it is not in flight any more (a duplicate completion, or the
    /// store lost its state), unless anything was forgotten since it was claimed
    /// ([`Request::forgets`]).
    async fn complete(&self, request: &Request, outcome: &Outcome, memo: Memo, local: &NodeId) -> SkResult<bool>;

    /// [`Statekeeper::complete`], then [`Statekeeper::claim`] of up to `max` requests from
    /// `queue` for `local`, in one step where the store allows: a worker that finished an
    /// evaluation takes its next request without another round trip.
    async fn complete_and_claim(
        &self,
        request: &Request,
        outcome: &Outcome,
        memo: Memo,
        local: &NodeId,
        queue: &QueueId,
        max: usize,
    ) -> SkResult<(bool, Vec<Request>)> {
        let local_waits = self.complete(request, outcome, memo, local).await?;
        let next = if max > 0 { self.claim(queue, local, max).await? } else { Vec::new() };
        Ok((local_waits, next))
    }

    /// Forgets the memoized outcome of `request`, everywhere: no node serves it again (a near
    /// cache of another process drops it when told, see the store's docs), and an
    /// evaluation of it in flight now memoizes nothing when it completes. Returns whether
    /// an outcome was memoized.
    async fn forget(&self, request: &Request) -> SkResult<bool>;

    /// Forgets every memoized outcome of `function` at `version`, as [`Statekeeper::forget`]
    /// does one; evaluations of it in flight now memoize nothing. Runs in steps of at most
    /// [`FORGET_BATCH_MAX`] outcomes; returns how many were forgotten. Outcomes memoized by
    /// requests submitted after it began may be forgotten too.
    async fn forget_all(&self, function: &str, version: u32) -> SkResult<u64>;

    /// Withdraws `waiter` from the request `root`. When nobody waits for it any more and it
    /// is the root of a call tree still running, the tree ends as [`TreeEnd::Cancelled`]:
    /// every live node gets [`Event::TreeEnded`], further submissions of the tree are
    /// refused and its queued requests are dropped. Returns whether the tree was cancelled.
    /// A request of the tree that a caller of another tree joined (up to
    /// [`ADOPTIONS_MAX`] per tree) is not dropped: that tree adopts it ([`Event::Adopted`])
    /// if it still runs, so a shared child that another caller waits for keeps running.
    async fn cancel_tree(&self, root: &ReqId, waiter: &NodeId) -> SkResult<bool>;

    /// Sets `member`'s credits at `pool`: how many more requests it takes now. Zero
    /// withdraws it. Queued work of the pool and its ancestors flows to it at once.
    async fn volunteer(&self, pool: &PoolId, member: &QueueId, credits: u32) -> SkResult<()>;

    /// Hands up to `max` requests from `pool`'s queue to volunteers whose node serves the
    /// request's function; returns how many.
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

    /// How many times this process lost its connection to the store or had an operation
    /// fail for it. Nodes submit their waited-on requests again when it changes: whatever
    /// a broken connection swallowed is recovered. The embedded statekeeper never fails; it
    /// counts here the inbox events it dropped because an inbox was full.
    fn disruptions(&self) -> u64 {
        0
    }

    /// What is unsafe about the store's own settings for a grid (e.g. a Redis that may
    /// evict grid state when full), one sentence each; a node logs them when it starts.
    async fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// How long a node's lease lasts without a heartbeat.
    fn node_ttl_ms(&self) -> u64;

    /// The data structures kept on the same store (see [`crate::structures`]).
    fn structures(&self) -> crate::structures::Store;

    /// The stream of events addressed to `node`. Call once per node.
    async fn open_inbox(&self, node: &NodeId) -> SkResult<BoxStream<'static, Event>>;
}
