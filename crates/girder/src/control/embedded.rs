//! The embedded statekeeper: the whole control plane in this process, behind one mutex.
//!
//! Every operation takes the lock once, so each is atomic, as the trait requires. The
//! distributor's hand-off runs inside the operations that make it possible: work entering
//! a pool's queue goes straight to a volunteer that has credits, and a member volunteering
//! pulls the queued work of its pool and of the pool's ancestors. The distributor tasks of
//! the nodes call [`Statekeeper::distribute`] as well, which finds little to do here but
//! keeps the protocol the same for every statekeeper.
//!
//! The protocol is written twice, here and in the Redis scripts (`redis/prelude.lua`,
//! `redis/ops.lua`); `tests/differential.rs` drives both with the same random sequences and
//! requires the same answers, so every order below that an answer can depend on (which
//! dead node is removed first, in which order a removed node's work goes back) is spelled
//! out and matched by the scripts.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::{
    version_key, Event, Memo, NodeId, NodeInfo, PoolCounters, PoolId, QueueId, ResultStore, ResultStoreConfig,
    SkResult, Statekeeper, Submitted, TreeEnd, CLAIM_DROP_MAX, FORGET_BATCH_MAX,
};
use crate::error::{CallError, StatekeeperError};
use crate::id::{IdMap, ReqId};
use crate::request::{Outcome, Request};

/// Limits of the embedded statekeeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// Limits of the memoized results.
    pub results: ResultStoreConfig,
    /// At most this many requests may be in flight (queued or running); submissions
    /// beyond fail with [`StatekeeperError::Overloaded`] instead of growing without bound.
    pub in_flight_max: usize,
    /// A node whose last heartbeat is older than this is dead.
    pub node_ttl_ms: u64,
    /// Most events waiting in one node's inbox. An event is only a notification: when the
    /// inbox is full the event is dropped and counted as a disruption
    /// ([`Statekeeper::disruptions`]), so every node submits again what its callers wait
    /// for and gets the outcome from the memo (or runs the request again if its outcome
    /// was not memoized). No caller loses its outcome; the statekeeper, which cannot wait
    /// under its lock, never blocks on a slow reader.
    pub inbox_len_max: usize,
    /// Limits of the data structures (the cache, atoms, maps, ...) kept in this process.
    pub structures: crate::structures::memory::InMemoryConfig,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            results: ResultStoreConfig::default(),
            in_flight_max: 4_000_000,
            node_ttl_ms: 3_000,
            inbox_len_max: 1_000_000,
            structures: crate::structures::memory::InMemoryConfig::default(),
        }
    }
}

/// How deep pools may nest; guards the recursive hand-off against a cycle of parents.
pub(crate) const POOL_DEPTH_MAX: usize = 16;
/// Most queued requests one distribution round looks at, so a queue whose head no member
/// can take (wrong functions) does not block the work behind it, nor make a round long.
/// A round looks at most at `4 * budget + 16` of them (the Redis script's `SCAN_MAX`).
pub(crate) const DISTRIBUTE_SCAN_MAX: usize = 1_000;
/// Most entries at the far end of a member's queue one hoist looks at (the same bound).
pub(crate) const HOIST_SCAN_MAX: usize = 1_000;
/// Most dead nodes one reaping step detaches before it gives their work back (the Redis
/// script's `REAP_NODES_MAX`); the embedded `reap` loops over steps until none is left.
pub(crate) const REAP_NODES_MAX: usize = 16;
/// Most call trees whose records are kept; the least recently used is forgotten first (as
/// the Redis scripts forget a tree [`super::TREE_TTL_MS`] after its last new request).
const TREES_MAX: usize = 1_000_000;

/// A call tree: how many requests it created, who called its root, how it ended.
struct TreeRecord {
    count: u64,
    /// The node whose caller submitted the root, and the root.
    root: Option<(NodeId, ReqId)>,
    end: Option<TreeEnd>,
    /// Requests of this tree that callers of other trees joined, with the joining tree (at
    /// most [`super::ADOPTIONS_MAX`]): they are adopted when this tree ends.
    joined: Vec<(ReqId, u64)>,
}

/// The call trees' records, bounded by count. A record goes when its root finishes or is
/// dropped, else when it is the least recently used of [`TREES_MAX`].
struct Trees(lru::LruCache<u64, TreeRecord>);

impl Default for Trees {
    fn default() -> Self {
        // Unbounded to the crate, bounded here: a bounded one allocates its whole capacity.
        Trees(lru::LruCache::unbounded())
    }
}

impl Trees {
    fn get(&mut self, tree: u64) -> Option<&mut TreeRecord> {
        self.0.get_mut(&tree)
    }

    /// The record of `tree`, a fresh one if it has none.
    fn get_or_new(&mut self, tree: u64) -> &mut TreeRecord {
        if !self.0.contains(&tree) && self.0.len() >= TREES_MAX {
            self.0.pop_lru();
        }
        self.0.get_or_insert_mut(tree, || TreeRecord { count: 0, root: None, end: None, joined: Vec::new() })
    }
}

struct ReqState {
    /// The request; its `lost` counts the nodes lost while they held its claim.
    request: Request,
    /// The forget epoch of its function version when it was submitted, `None` once it was
    /// forgotten: its outcome is memoized only while this is its version's current epoch.
    epoch: Option<u64>,
    /// The node that claimed it, while running.
    running: Option<NodeId>,
    waiters: Vec<NodeId>,
    /// A helper already copied it up once; one copy is enough.
    hoisted: bool,
    /// The pool queue it goes back to when its owner dies.
    home: QueueId,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<ReqId>,
    signal: Arc<Notify>,
}

#[derive(Default)]
struct PoolState {
    parent: Option<PoolId>,
    /// Members in join order; hand-offs rotate through them.
    members: Vec<QueueId>,
    /// Credits of worker members that volunteered. Child pools are never listed: their
    /// credits are those of their own idle members, computed when needed.
    credits: HashMap<QueueId, u32>,
    /// Where the next hand-off starts looking, so work spreads over members.
    next_member: usize,
    counters: PoolCounters,
}

struct NodeState {
    expires_at: Instant,
    info: NodeInfo,
    inbox: mpsc::Sender<Event>,
    functions: Vec<String>,
    /// Worker queues it owns.
    queues: HashSet<QueueId>,
    /// Requests it has claimed and not completed, in id order (the order they go back in).
    running: BTreeSet<ReqId>,
}

/// What a removed node left behind, given back to the grid by [`Inner::reclaim`] in this
/// order (the Redis scripts keep the same one, in batches): requests of the functions
/// nobody serves any more fail; then its claims, in id order, go back to the front of their
/// pools; then the pending entries of its queues, queue by queue in name order, front to
/// back, go to the back of their pools.
struct Reclaim {
    node: NodeId,
    fails: Vec<(String, Vec<ReqId>)>,
    running: Vec<ReqId>,
    queues: Vec<VecDeque<ReqId>>,
}

#[derive(Default)]
struct Inner {
    results: Option<ResultStore>,
    requests: IdMap<ReqState>,
    queues: HashMap<QueueId, QueueState>,
    pools: HashMap<PoolId, PoolState>,
    /// Worker queue -> (owning node, pool).
    queue_owner: HashMap<QueueId, (NodeId, PoolId)>,
    /// Worker queue -> its pool, kept after its node is gone (one entry per worker ever).
    queue_pool: HashMap<QueueId, PoolId>,
    /// name -> (version, nodes serving it)
    functions: HashMap<String, (u32, HashSet<NodeId>)>,
    nodes: HashMap<NodeId, NodeState>,
    inboxes: HashMap<NodeId, mpsc::Receiver<Event>>,
    /// name -> requests in flight for it, failed at once when its last node goes.
    fn_requests: HashMap<String, HashSet<ReqId>>,
    /// Inbox events dropped because the inbox was full (see `inbox_len_max`).
    dropped_events: u64,
    trees: Trees,
    /// `VERSION:NAME` -> how many times all its outcomes were forgotten (absent: 0).
    epochs: HashMap<String, u64>,
    /// Forgets so far, of one outcome or of all of a version (see [`Request::forgets`]).
    forgets: u64,
}

/// The in-process statekeeper: the default, one process is a whole grid.
pub struct Embedded {
    inner: Mutex<Inner>,
    config: EmbeddedConfig,
    structures: Arc<crate::structures::memory::InMemory>,
}

impl Default for Embedded {
    fn default() -> Self {
        Embedded::new(EmbeddedConfig::default())
    }
}

impl Embedded {
    /// A fresh, empty statekeeper.
    pub fn new(config: EmbeddedConfig) -> Embedded {
        let inner = Inner { results: Some(ResultStore::new(config.results)), ..Default::default() };
        let structures = Arc::new(crate::structures::memory::InMemory::with_config(config.structures));
        Embedded { inner: Mutex::new(inner), config, structures }
    }

    /// The number of memoized outcomes held.
    pub fn results_len(&self) -> usize {
        self.inner.lock().results().len()
    }
}

impl Inner {
    fn results(&mut self) -> &mut ResultStore {
        self.results.get_or_insert_with(|| ResultStore::new(ResultStoreConfig::default()))
    }

    fn queue(&mut self, queue: &QueueId) -> &mut QueueState {
        self.queues.entry(queue.clone()).or_default()
    }

    fn queue_is_empty(&self, queue: &QueueId) -> bool {
        self.queues.get(queue).is_none_or(|q| q.items.is_empty())
    }

    fn is_pending(&self, id: &ReqId) -> bool {
        self.requests.get(id).is_some_and(|state| state.running.is_none())
    }

    fn serves(&self, node: &NodeId, function: &str) -> bool {
        self.functions.get(function).is_some_and(|(_, nodes)| nodes.contains(node))
    }

    /// Credits `member` of `pool` can take now for `function`: a worker's volunteered
    /// credits if its node serves the function, or for a child pool with an empty queue
    /// the sum over its own members.
    fn capacity(&self, pool: &PoolId, member: &QueueId, function: &str, depth: usize) -> u32 {
        match member.as_pool() {
            Some(child) if depth < POOL_DEPTH_MAX && self.queue_is_empty(member) => match self.pools.get(&child) {
                Some(state) => state
                    .members
                    .iter()
                    .map(|m| self.capacity(&child, m, function, depth + 1))
                    .fold(0, u32::saturating_add),
                None => 0,
            },
            Some(_) => 0,
            None => {
                let credits = self.pools.get(pool).and_then(|p| p.credits.get(member)).copied().unwrap_or(0);
                match self.queue_owner.get(member) {
                    Some((node, _)) if credits > 0 && self.serves(node, function) => credits,
                    _ => 0,
                }
            }
        }
    }

    /// Puts `id` into `queue`; a pool queue with an idle member hands it straight down.
    fn place(&mut self, queue: &QueueId, id: ReqId, front: bool, depth: usize) {
        if let Some(pool) = queue.as_pool() {
            if depth < POOL_DEPTH_MAX && self.queue_is_empty(queue) {
                if let Some(member) = self.pick_member(&pool, id, depth) {
                    self.place(&member, id, false, depth + 1);
                    return;
                }
            }
        }
        let state = self.queue(queue);
        if front {
            state.items.push_front(id);
        } else {
            state.items.push_back(id);
        }
        state.signal.notify_one();
    }

    /// Chooses the next member of `pool` that can take `id`, round robin, and charges it
    /// one credit.
    fn pick_member(&mut self, pool: &PoolId, id: ReqId, depth: usize) -> Option<QueueId> {
        let function = self.requests.get(&id)?.request.function.clone();
        let state = self.pools.get(pool)?;
        let count = state.members.len();
        let start = state.next_member;
        let chosen = (0..count)
            .map(|k| (start + k) % count)
            .find(|&i| self.capacity(pool, &state.members[i], &function, depth) > 0)?;
        let state = self.pools.get_mut(pool)?;
        let member = state.members[chosen].clone();
        state.next_member = (chosen + 1) % count;
        state.counters.handed_off += 1;
        if let Some(credits) = state.credits.get_mut(&member) {
            *credits -= 1;
            if *credits == 0 {
                state.credits.remove(&member);
            }
        }
        Some(member)
    }

    /// Hands queued work of `pool` to members that can take it, at most `max` requests.
    /// Stops as soon as no credit is left and tries each function once per round, so a
    /// long queue costs only what moves.
    fn distribute(&mut self, pool: &PoolId, max: usize) -> usize {
        let budget = max.min(self.idle_credits(pool, 0) as usize);
        let queue = QueueId::pool(pool);
        if budget == 0 || self.queue_is_empty(&queue) {
            return 0;
        }
        let mut kept = Vec::new();
        let mut blocked: HashSet<Arc<str>> = HashSet::new();
        let mut moved = 0;
        let mut scanned = 0;
        // Look a little past the budget, for requests no member can take (other functions).
        let scan_max = DISTRIBUTE_SCAN_MAX.min(budget.saturating_mul(4).saturating_add(16));
        while moved < budget && scanned < scan_max {
            let Some(id) = self.queues.get_mut(&queue).and_then(|q| q.items.pop_front()) else { break };
            scanned += 1;
            let Some(function) =
                self.requests.get(&id).filter(|r| r.running.is_none()).map(|r| r.request.function.clone())
            else {
                continue; // stale copy: drop it
            };
            let member = if blocked.contains(&function) { None } else { self.pick_member(pool, id, 0) };
            match member {
                Some(member) => {
                    self.place(&member, id, false, 1);
                    moved += 1;
                }
                None => {
                    blocked.insert(function);
                    kept.push(id);
                }
            }
        }
        let state = self.queue(&queue);
        for id in kept.into_iter().rev() {
            state.items.push_front(id);
        }
        moved
    }

    fn ancestors(&self, pool: &PoolId) -> Vec<PoolId> {
        let mut chain = vec![pool.clone()];
        while chain.len() < POOL_DEPTH_MAX {
            match chain.last().and_then(|last| self.pools.get(last)).and_then(|p| p.parent.clone()) {
                Some(parent) if !chain.contains(&parent) => chain.push(parent),
                _ => break,
            }
        }
        chain
    }

    /// Credits of `pool`'s members whatever the function: an upper bound of what it can
    /// take now. Child pools count with an empty queue, down to [`POOL_DEPTH_MAX`] levels.
    fn idle_credits(&self, pool: &PoolId, depth: usize) -> u32 {
        let Some(state) = self.pools.get(pool) else { return 0 };
        let mut total = state.credits.values().fold(0u32, |a, b| a.saturating_add(*b));
        if depth < POOL_DEPTH_MAX {
            for member in &state.members {
                if let Some(child) = member.as_pool() {
                    if self.queue_is_empty(member) {
                        total = total.saturating_add(self.idle_credits(&child, depth + 1));
                    }
                }
            }
        }
        total
    }

    fn hoist(&mut self, pool: &PoolId, max: usize) -> usize {
        let Some(state) = self.pools.get(pool) else { return 0 };
        let members = state.members.clone();
        let budget = max.min(self.idle_credits(pool, 0) as usize);
        if budget == 0 {
            return 0;
        }
        let mut copied = Vec::new();
        // Busiest member first: its queue is where work waits longest.
        let mut by_len: Vec<(usize, QueueId)> =
            members.iter().map(|m| (self.queues.get(m).map_or(0, |q| q.items.len()), m.clone())).collect();
        by_len.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        for (len, member) in by_len {
            if copied.len() >= budget || len < 2 {
                break;
            }
            // Leave the front half to the member itself; take from the far end, looking at
            // no more than HOIST_SCAN_MAX entries there. Stale entries stay: claims drop them.
            let share = (len / 2).min(budget - copied.len());
            let Some(queue) = self.queues.get(&member) else { continue };
            let mut taken = 0;
            for &id in queue.items.iter().rev().take(HOIST_SCAN_MAX) {
                if taken >= share {
                    break;
                }
                if let Some(req) = self.requests.get_mut(&id) {
                    if req.running.is_none() && !req.hoisted {
                        req.hoisted = true;
                        copied.push(id);
                        taken += 1;
                    }
                }
            }
        }
        let pool_queue = QueueId::pool(pool);
        for &id in &copied {
            self.place(&pool_queue, id, false, 0);
        }
        if let Some(state) = self.pools.get_mut(pool) {
            state.counters.hoisted += copied.len() as u64;
        }
        copied.len()
    }

    /// The pool queue a request submitted into `queue` returns to if its owner dies.
    fn home_of(&self, queue: &QueueId) -> QueueId {
        match self.queue_owner.get(queue) {
            Some((_, pool)) => QueueId::pool(pool),
            None => queue.clone(),
        }
    }

    /// Puts a request whose claiming node was lost back in flight, counting the loss.
    fn requeue_lost(&mut self, id: ReqId) {
        if let Some(state) = self.requests.get_mut(&id) {
            state.request.lost = state.request.lost.saturating_add(1);
        }
        self.requeue(id, true);
    }

    /// Puts a request whose owner is gone back in flight.
    fn requeue(&mut self, id: ReqId, front: bool) {
        let Some(state) = self.requests.get_mut(&id) else { return };
        state.running = None;
        let home = state.home.clone();
        self.place(&home, id, front, 0);
    }

    /// Removes `node` and gives everything it held back to the grid.
    fn remove_node(&mut self, node: &NodeId) {
        if let Some(job) = self.detach(node) {
            self.reclaim(job);
        }
    }

    /// The first step of removing `node`: it leaves the membership, the directory and its
    /// pools; what it held is returned, to be given back by [`Inner::reclaim`].
    fn detach(&mut self, node: &NodeId) -> Option<Reclaim> {
        self.inboxes.remove(node);
        let state = self.nodes.remove(node)?;
        let mut names = state.functions.clone();
        names.sort();
        names.dedup();
        let mut fails = Vec::new();
        for name in names {
            let Some((_, nodes)) = self.functions.get_mut(&name) else { continue };
            nodes.remove(node);
            if nodes.is_empty() {
                // The last node serving it is gone: whoever waits for it learns so now.
                self.functions.remove(&name);
                if let Some(ids) = self.fn_requests.remove(&name) {
                    fails.push((name, ids.into_iter().collect()));
                }
            }
        }
        // Detach its queues first, so nothing given back is handed to them.
        let mut owned: Vec<QueueId> = state.queues.into_iter().collect();
        owned.sort();
        let mut queues = Vec::new();
        for queue in owned {
            if let Some(pool) = self.queue_pool.get(&queue).cloned() {
                if let Some(pool_state) = self.pools.get_mut(&pool) {
                    pool_state.members.retain(|m| m != &queue);
                    pool_state.credits.remove(&queue);
                    pool_state.next_member = 0;
                }
            }
            self.queue_owner.remove(&queue);
            if let Some(items) = self.queues.remove(&queue).map(|q| q.items) {
                queues.push(items);
            }
        }
        Some(Reclaim { node: node.clone(), fails, running: state.running.into_iter().collect(), queues })
    }

    /// Gives back what a removed node held (see [`Reclaim`] for the order).
    fn reclaim(&mut self, job: Reclaim) {
        for (name, ids) in job.fails {
            let unknown = Err(CallError::UnknownFunction { function: name });
            for id in ids {
                self.fail_waiters(&id, &unknown);
            }
        }
        for id in job.running {
            if self.requests.get(&id).is_some_and(|r| r.running.as_ref() == Some(&job.node)) {
                self.requeue_lost(id);
            }
        }
        for items in job.queues {
            for id in items {
                if self.is_pending(&id) {
                    self.requeue(id, false);
                }
            }
        }
    }

    /// Declares dead every node whose lease ran out, in steps of at most
    /// [`REAP_NODES_MAX`] nodes taken in id order: a step detaches its nodes, then gives
    /// back what they held. Returns the nodes reaped.
    fn reap(&mut self) -> Vec<NodeId> {
        let mut reaped = Vec::new();
        loop {
            let now = Instant::now();
            let mut dead: Vec<NodeId> =
                self.nodes.iter().filter(|(_, s)| s.expires_at <= now).map(|(n, _)| n.clone()).collect();
            if dead.is_empty() {
                return reaped;
            }
            dead.sort();
            dead.truncate(REAP_NODES_MAX);
            let jobs: Vec<Reclaim> = dead.iter().filter_map(|node| self.detach(node)).collect();
            for job in jobs {
                self.reclaim(job);
            }
            reaped.extend(dead);
        }
    }

    /// Forgets `id` as a request in flight for `function`.
    fn untrack(&mut self, function: &str, id: &ReqId) {
        if let Some(ids) = self.fn_requests.get_mut(function) {
            ids.remove(id);
            if ids.is_empty() {
                self.fn_requests.remove(function);
            }
        }
    }

    /// Sends `event` to `node`'s inbox, if it is registered. A closed inbox means the node
    /// is stopping (nobody there waits any more); a full one drops the event and counts a
    /// disruption, after which nodes resubmit what they wait for (see `inbox_len_max`).
    fn send_event(&mut self, node: &NodeId, event: Event) {
        let Some(state) = self.nodes.get(node) else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = state.inbox.try_send(event) {
            self.dropped_events += 1;
            tracing::warn!(node = %node, "inbox full; dropped a notification (the node resubmits to recover it)");
        }
    }

    /// How `tree` ended, if it did. A tree whose root's caller's node is gone (reaped or
    /// deregistered; nodes reap each other every heartbeat) ends now.
    fn tree_end(&mut self, tree: u64) -> Option<TreeEnd> {
        if tree == 0 {
            return None;
        }
        // A peek: reading does not make a tree recently used, only a new request does.
        let record = self.trees.0.peek(&tree)?;
        if let Some(end) = record.end {
            return Some(end);
        }
        if record.root.as_ref().is_none_or(|(node, _)| self.nodes.contains_key(node)) {
            return None;
        }
        self.end_tree(tree, TreeEnd::Cancelled);
        Some(TreeEnd::Cancelled)
    }

    /// Ends `tree` and tells every live node; first, the trees that joined its requests
    /// adopt those that are still in flight.
    fn end_tree(&mut self, tree: u64, end: TreeEnd) {
        let joined = match self.trees.get(tree) {
            Some(record) => {
                record.end = Some(end);
                std::mem::take(&mut record.joined)
            }
            None => Vec::new(),
        };
        let nodes: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for (id, adopter) in joined {
            // A tree without a record made no request yet: it runs.
            if self.trees.0.peek(&adopter).is_some_and(|record| record.end.is_some()) {
                continue;
            }
            let Some(state) = self.requests.get_mut(&id).filter(|s| s.request.budget.tree == tree) else { continue };
            state.request.budget.tree = adopter;
            for node in &nodes {
                self.send_event(node, Event::Adopted { id, from: tree, tree: adopter });
            }
        }
        for node in nodes {
            self.send_event(&node, Event::TreeEnded { tree, end });
        }
    }

    /// Notes that a caller of `joiner`'s tree joined the request `id` of another tree, so
    /// that tree's end leaves it to `joiner`'s.
    fn note_join(&mut self, id: &ReqId, joiner: u64) {
        let Some(tree) = self.requests.get(id).map(|s| s.request.budget.tree) else { return };
        if tree == 0 || joiner == 0 || tree == joiner {
            return;
        }
        let Some(record) = self.trees.0.peek_mut(&tree).filter(|r| r.end.is_none()) else { return };
        if record.joined.len() < super::ADOPTIONS_MAX && !record.joined.iter().any(|(j, _)| j == id) {
            record.joined.push((*id, joiner));
        }
    }

    /// Counts a new request of `request`'s tree; ends the tree when that is past its budget.
    fn count_in_tree(&mut self, request: &Request, waiter: &NodeId) -> Result<(), TreeEnd> {
        let budget = request.budget;
        if budget.tree == 0 {
            return Ok(());
        }
        let record = self.trees.get_or_new(budget.tree);
        if record.count >= budget.requests_max {
            let end = TreeEnd::OverBudget(budget.requests_max);
            self.end_tree(budget.tree, end);
            return Err(end);
        }
        record.count += 1;
        if budget.depth == 0 && record.root.is_none() {
            record.root = Some((waiter.clone(), request.id));
        }
        Ok(())
    }

    /// When `id` is the root of `tree`, nothing of the tree is needed any more: a tree of one
    /// request is forgotten at once; a bigger one ends (told to nobody: its stragglers are
    /// dropped when claimed or refused when they submit) and is forgotten when it ages out.
    fn root_done(&mut self, tree: u64, id: &ReqId) {
        if tree == 0 {
            return;
        }
        let Some(record) = self.trees.get(tree) else { return };
        if record.root.as_ref().is_none_or(|(_, root)| root != id) {
            return;
        }
        if record.count <= 1 {
            self.trees.0.pop(&tree);
        } else {
            record.end.get_or_insert(TreeEnd::Cancelled);
        }
    }

    /// Drops the pending request `id` of an ended tree; its waiters are told why.
    fn drop_request(&mut self, id: &ReqId, end: TreeEnd) {
        if let Some(state) = self.requests.remove(id) {
            self.untrack(&state.request.function, id);
            self.root_done(state.request.budget.tree, id);
            for waiter in state.waiters {
                self.send_event(&waiter, Event::Dropped { id: *id, end });
            }
        }
    }

    /// Whether the request in flight `state` was forgotten since it was submitted (by itself,
    /// or with all of its function version).
    fn is_current(&self, state: &ReqState) -> bool {
        let group = version_key(&state.request.function, state.request.version);
        state.epoch == Some(self.epochs.get(&group).copied().unwrap_or(0))
    }

    /// Memoizes `outcome` of `request` as `memo` says, in its function version's group.
    fn memoize(&mut self, request: &Request, outcome: &Outcome, memo: Memo) {
        if !memo.memoizes() {
            return;
        }
        let group = version_key(&request.function, request.version);
        let results = self.results();
        let expires_at = match memo {
            Memo::For(ttl_ms) => Some(Instant::now() + Duration::from_millis(ttl_ms)),
            _ => results.default_expiry(),
        };
        results.insert_with(request.id, outcome.clone(), Some(group.into()), expires_at);
    }

    fn fail_waiters(&mut self, id: &ReqId, outcome: &Outcome) {
        if let Some(state) = self.requests.remove(id) {
            self.untrack(&state.request.function, id);
            for waiter in state.waiters {
                self.send_event(&waiter, Event::Done { id: *id, outcome: outcome.clone() });
            }
        }
    }
}

#[async_trait]
impl Statekeeper for Embedded {
    async fn register_node(&self, node: &NodeId, functions: &[(String, u32)]) -> SkResult<()> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        match inner.nodes.get(node) {
            Some(state) if state.expires_at > now => return Err(StatekeeperError::DuplicateNode(node.to_string())),
            Some(_) => inner.remove_node(node),
            None => {}
        }
        let (tx, rx) = mpsc::channel(self.config.inbox_len_max.max(1));
        let state = NodeState {
            expires_at: now + Duration::from_millis(self.config.node_ttl_ms),
            info: NodeInfo { id: node.to_string(), ..Default::default() },
            inbox: tx,
            functions: functions.iter().map(|(name, _)| name.clone()).collect(),
            queues: HashSet::new(),
            running: BTreeSet::new(),
        };
        inner.nodes.insert(node.clone(), state);
        inner.inboxes.insert(node.clone(), rx);
        for (name, version) in functions {
            let entry = inner.functions.entry(name.clone()).or_insert_with(|| (*version, HashSet::new()));
            entry.0 = *version;
            entry.1.insert(node.clone());
        }
        Ok(())
    }

    async fn deregister_node(&self, node: &NodeId) -> SkResult<()> {
        self.inner.lock().remove_node(node);
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId, info: &NodeInfo) -> SkResult<bool> {
        let mut inner = self.inner.lock();
        match inner.nodes.get_mut(node) {
            Some(state) => {
                state.expires_at = Instant::now() + Duration::from_millis(self.config.node_ttl_ms);
                // The id is the node's, whatever the report says (as on Redis).
                state.info = NodeInfo { id: node.to_string(), ..info.clone() };
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn reap(&self) -> SkResult<Vec<NodeId>> {
        let dead = self.inner.lock().reap();
        for node in &dead {
            tracing::warn!(node = %node, "node missed its heartbeats; re-running its work elsewhere");
        }
        Ok(dead)
    }

    async fn live_nodes(&self) -> SkResult<Vec<NodeInfo>> {
        let inner = self.inner.lock();
        let now = Instant::now();
        let ttl = Duration::from_millis(self.config.node_ttl_ms);
        let mut nodes: Vec<NodeInfo> = inner
            .nodes
            .values()
            .filter(|s| s.expires_at > now)
            .map(|s| {
                let beat = s.expires_at.checked_sub(ttl).unwrap_or(now);
                let age = now.saturating_duration_since(beat);
                let mut info =
                    NodeInfo { heartbeat_age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX), ..s.info.clone() };
                info.health = info.health(self.config.node_ttl_ms);
                info
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn function_version(&self, function: &str) -> SkResult<Option<u32>> {
        Ok(self.inner.lock().functions.get(function).map(|(version, _)| *version))
    }

    async fn declare_pool(&self, pool: &PoolId, parent: Option<&PoolId>, _node: &NodeId) -> SkResult<()> {
        let mut inner = self.inner.lock();
        if let Some(parent) = parent {
            if !inner.pools.contains_key(parent) {
                return Err(StatekeeperError::UnknownPool(parent.to_string()));
            }
        }
        let state = inner.pools.entry(pool.clone()).or_default();
        if parent.is_some() {
            state.parent = parent.cloned();
        }
        if let Some(parent) = parent {
            let member = QueueId::pool(pool);
            let state = inner.pools.entry(parent.clone()).or_default();
            if !state.members.contains(&member) {
                state.members.push(member);
            }
        }
        Ok(())
    }

    async fn join_pool(&self, pool: &PoolId, member: &QueueId, node: &NodeId) -> SkResult<()> {
        let mut inner = self.inner.lock();
        let state = inner.pools.get_mut(pool).ok_or_else(|| StatekeeperError::UnknownPool(pool.to_string()))?;
        if !state.members.contains(member) {
            state.members.push(member.clone());
        }
        inner.queue_owner.insert(member.clone(), (node.clone(), pool.clone()));
        inner.queue_pool.insert(member.clone(), pool.clone());
        if let Some(state) = inner.nodes.get_mut(node) {
            state.queues.insert(member.clone());
        }
        Ok(())
    }

    async fn leave_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()> {
        let mut inner = self.inner.lock();
        if let Some(state) = inner.pools.get_mut(pool) {
            state.members.retain(|m| m != member);
            state.credits.remove(member);
            state.next_member = 0;
        }
        Ok(())
    }

    async fn result(&self, id: &ReqId) -> SkResult<Option<Outcome>> {
        Ok(self.inner.lock().results().get(id))
    }

    fn cached_result(&self, id: &ReqId) -> Option<Outcome> {
        self.inner.lock().results().get(id)
    }

    async fn submit(&self, request: &Request, queue: &QueueId, front: bool, waiter: &NodeId) -> SkResult<Submitted> {
        let mut inner = self.inner.lock();
        // A worker queue whose node is gone takes no more work: its pool does instead.
        let redirected;
        let (queue, front) = match inner.queue_pool.get(queue) {
            Some(pool) if !inner.queue_owner.contains_key(queue) => {
                redirected = QueueId::pool(pool);
                (&redirected, false)
            }
            _ => (queue, front),
        };
        if let Some(outcome) = inner.results().get(&request.id) {
            return Ok(Submitted::Done(outcome));
        }
        if !inner.functions.contains_key(&*request.function) {
            let unknown = Err(CallError::UnknownFunction { function: request.function.to_string() });
            inner.fail_waiters(&request.id, &unknown);
            return Ok(Submitted::UnknownFunction);
        }
        if let Some(end) = inner.tree_end(request.budget.tree) {
            return Ok(Submitted::TreeEnded(end));
        }
        let inner = &mut *inner;
        if let Some(state) = inner.requests.get_mut(&request.id) {
            if !state.waiters.contains(waiter) {
                state.waiters.push(waiter.clone());
            }
            let now = Instant::now();
            let nodes = &inner.nodes;
            let owner_dead =
                state.running.as_ref().is_some_and(|owner| nodes.get(owner).is_none_or(|n| n.expires_at <= now));
            let pending = state.running.is_none();
            if owner_dead {
                if let Some(owner) = state.running.clone().and_then(|owner| inner.nodes.get_mut(&owner)) {
                    owner.running.remove(&request.id);
                }
                inner.requeue_lost(request.id);
            } else if front && pending {
                inner.place(queue, request.id, true, 0);
            }
            inner.note_join(&request.id, request.budget.tree);
            return Ok(Submitted::Joined);
        }
        if inner.requests.len() >= self.config.in_flight_max {
            return Err(StatekeeperError::Overloaded(self.config.in_flight_max));
        }
        if let Err(end) = inner.count_in_tree(request, waiter) {
            return Ok(Submitted::TreeEnded(end));
        }
        let home = inner.home_of(queue);
        let epoch = inner.epochs.get(&version_key(&request.function, request.version)).copied().unwrap_or(0);
        let state = ReqState {
            request: Request { lost: 0, ..request.clone() },
            epoch: Some(epoch),
            running: None,
            waiters: vec![waiter.clone()],
            hoisted: false,
            home,
        };
        inner.requests.insert(request.id, state);
        inner.fn_requests.entry(request.function.to_string()).or_default().insert(request.id);
        inner.place(queue, request.id, front, 0);
        Ok(Submitted::Queued)
    }

    async fn claim(&self, queue: &QueueId, owner: &NodeId, max: usize) -> SkResult<Vec<Request>> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut claimed = Vec::new();
        // A node the statekeeper does not know (never registered, removed, or reaped) holds
        // no claims: it must register again first. Nothing is taken from the queue.
        if !inner.nodes.contains_key(owner) {
            return Ok(claimed);
        }
        let forgets = inner.forgets;
        let mut dropped = 0;
        while claimed.len() < max {
            let Some(id) = inner.queues.get_mut(queue).and_then(|q| q.items.pop_front()) else { break };
            let Some(tree) = inner.requests.get(&id).filter(|r| r.running.is_none()).map(|r| r.request.budget.tree)
            else {
                continue;
            };
            if let Some(end) = inner.tree_end(tree) {
                inner.drop_request(&id, end);
                dropped += 1;
                if dropped >= CLAIM_DROP_MAX {
                    // Bounded work per call: the owner comes back for the rest.
                    inner.queue(queue).signal.notify_one();
                    break;
                }
                continue;
            }
            if let (Some(req), Some(node)) = (inner.requests.get_mut(&id), inner.nodes.get_mut(owner)) {
                req.running = Some(owner.clone());
                claimed.push(Request { forgets, ..req.request.clone() });
                node.running.insert(id);
            }
        }
        Ok(claimed)
    }

    async fn release_claims(&self, owner: &NodeId, keep: &[ReqId]) -> SkResult<usize> {
        let mut inner = self.inner.lock();
        let Some(node) = inner.nodes.get_mut(owner) else { return Ok(0) };
        let released: Vec<ReqId> = node.running.iter().filter(|id| !keep.contains(id)).copied().collect();
        for id in &released {
            node.running.remove(id);
        }
        let mut count = 0;
        for id in released {
            if inner.requests.get(&id).is_some_and(|r| r.running.as_ref() == Some(owner)) {
                inner.requeue(id, true);
                count += 1;
            }
        }
        Ok(count)
    }

    async fn complete(&self, request: &Request, outcome: &Outcome, memo: Memo, local: &NodeId) -> SkResult<bool> {
        let mut inner = self.inner.lock();
        let id = &request.id;
        let Some(state) = inner.requests.remove(id) else {
            // Not in flight any more: memoized unless anything was forgotten since its claim.
            if request.forgets == inner.forgets {
                inner.memoize(request, outcome, memo);
            }
            return Ok(false);
        };
        if inner.is_current(&state) {
            inner.memoize(&state.request, outcome, memo);
        }
        inner.untrack(&state.request.function, id);
        inner.root_done(state.request.budget.tree, id);
        if let Some(owner) = state.running.as_ref().and_then(|owner| inner.nodes.get_mut(owner)) {
            owner.running.remove(id);
        }
        let mut local_waits = false;
        for waiter in state.waiters {
            if &waiter == local {
                local_waits = true;
            } else {
                inner.send_event(&waiter, Event::Done { id: *id, outcome: outcome.clone() });
            }
        }
        Ok(local_waits)
    }

    async fn forget(&self, request: &Request) -> SkResult<bool> {
        let mut inner = self.inner.lock();
        if let Some(state) = inner.requests.get_mut(&request.id) {
            state.epoch = None;
        }
        inner.forgets += 1;
        Ok(inner.results().remove(&request.id))
    }

    async fn forget_all(&self, function: &str, version: u32) -> SkResult<u64> {
        let group = version_key(function, version);
        {
            let mut inner = self.inner.lock();
            let epoch = inner.epochs.entry(group.clone()).or_insert(0);
            *epoch = epoch.saturating_add(1);
            inner.forgets += 1;
        }
        let mut forgotten = 0;
        loop {
            // A batch per lock hold: a huge group does not stall every other operation.
            let (removed, more) = self.inner.lock().results().remove_group(&group, FORGET_BATCH_MAX);
            forgotten += removed as u64;
            if !more {
                return Ok(forgotten);
            }
        }
    }

    async fn cancel_tree(&self, root: &ReqId, waiter: &NodeId) -> SkResult<bool> {
        let mut inner = self.inner.lock();
        let Some(state) = inner.requests.get_mut(root) else { return Ok(false) };
        state.waiters.retain(|w| w != waiter);
        if !state.waiters.is_empty() {
            return Ok(false);
        }
        let tree = state.request.budget.tree;
        let is_root =
            inner.trees.get(tree).is_some_and(|r| r.end.is_none() && r.root.as_ref().is_some_and(|(_, id)| id == root));
        if tree == 0 || !is_root {
            return Ok(false);
        }
        inner.end_tree(tree, TreeEnd::Cancelled);
        Ok(true)
    }

    async fn volunteer(&self, pool: &PoolId, member: &QueueId, credits: u32) -> SkResult<()> {
        let mut inner = self.inner.lock();
        let state = inner.pools.get_mut(pool).ok_or_else(|| StatekeeperError::UnknownPool(pool.to_string()))?;
        if credits == 0 {
            state.credits.remove(member);
        } else {
            state.credits.insert(member.clone(), credits);
        }
        // New credits pull queued work: first from this pool, then from its ancestors,
        // whose hand-off passes through this pool to the member.
        for ancestor in inner.ancestors(pool) {
            inner.distribute(&ancestor, usize::MAX);
        }
        Ok(())
    }

    async fn distribute(&self, pool: &PoolId, max: usize) -> SkResult<usize> {
        Ok(self.inner.lock().distribute(pool, max))
    }

    async fn hoist(&self, pool: &PoolId, max: usize) -> SkResult<usize> {
        Ok(self.inner.lock().hoist(pool, max))
    }

    async fn queue_len(&self, queue: &QueueId) -> SkResult<usize> {
        Ok(self.inner.lock().queues.get(queue).map_or(0, |q| q.items.len()))
    }

    async fn pool_counters(&self, pool: &PoolId) -> SkResult<PoolCounters> {
        let inner = self.inner.lock();
        let state = inner.pools.get(pool).ok_or_else(|| StatekeeperError::UnknownPool(pool.to_string()))?;
        let queue_len = inner.queues.get(&QueueId::pool(pool)).map_or(0, |q| q.items.len());
        Ok(PoolCounters { queue_len, ..state.counters.clone() })
    }

    async fn wait_work(&self, queue: &QueueId, timeout_ms: u64) -> SkResult<()> {
        let signal = self.inner.lock().queue(queue).signal.clone();
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), signal.notified()).await;
        Ok(())
    }

    fn disruptions(&self) -> u64 {
        self.inner.lock().dropped_events
    }

    fn node_ttl_ms(&self) -> u64 {
        self.config.node_ttl_ms
    }

    fn structures(&self) -> crate::structures::Store {
        self.structures.clone()
    }

    async fn open_inbox(&self, node: &NodeId) -> SkResult<BoxStream<'static, Event>> {
        let rx = self.inner.lock().inboxes.remove(node).ok_or_else(|| {
            StatekeeperError::Unavailable(format!("no inbox for node {node}: register it first, and open it once"))
        })?;
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) })))
    }
}
