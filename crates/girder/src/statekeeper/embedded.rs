//! The embedded statekeeper: the whole control plane in this process, behind one mutex.
//!
//! Every operation takes the lock once, so each is atomic, as the trait requires. The
//! distributor's hand-off runs inside the operations that make it possible: work entering
//! a pool's queue goes straight to a volunteer that has credits, and a member volunteering
//! pulls the queued work of its pool and of the pool's ancestors. The distributor tasks of
//! the nodes call [`Statekeeper::distribute`] as well, which finds nothing to do here but
//! keeps the protocol the same for statekeepers that do not hand off eagerly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::{
    Event, NodeId, PoolCounters, PoolId, QueueId, ResultStore, ResultStoreConfig, SkResult, Statekeeper, Submitted,
};
use crate::error::StatekeeperError;
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
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig { results: ResultStoreConfig::default(), in_flight_max: 4_000_000 }
    }
}

struct ReqState {
    request: Request,
    running: Option<NodeId>,
    waiters: Vec<NodeId>,
    /// A helper already copied it up once; one copy is enough.
    hoisted: bool,
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

#[derive(Default)]
struct Inner {
    results: Option<ResultStore>,
    requests: IdMap<ReqState>,
    queues: HashMap<QueueId, QueueState>,
    pools: HashMap<PoolId, PoolState>,
    /// name -> (version, nodes serving it)
    functions: HashMap<String, (u32, HashSet<NodeId>)>,
    nodes: HashMap<NodeId, mpsc::UnboundedSender<Event>>,
    inboxes: HashMap<NodeId, mpsc::UnboundedReceiver<Event>>,
}

/// The in-process statekeeper: the default, one process is a whole grid.
pub struct Embedded {
    inner: Mutex<Inner>,
    config: EmbeddedConfig,
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
        Embedded { inner: Mutex::new(inner), config }
    }

    /// The number of memoized outcomes held.
    pub fn results_len(&self) -> usize {
        self.inner.lock().results().len()
    }
}

/// How deep pools may nest; guards the recursive hand-off against a cycle of parents.
const POOL_DEPTH_MAX: usize = 16;

impl Inner {
    fn results(&mut self) -> &mut ResultStore {
        self.results.get_or_insert_with(|| ResultStore::new(ResultStoreConfig::default()))
    }

    fn queue(&mut self, queue: &QueueId) -> &mut QueueState {
        self.queues.entry(queue.clone()).or_default()
    }

    fn is_pending(&self, id: &ReqId) -> bool {
        self.requests.get(id).is_some_and(|state| state.running.is_none())
    }

    /// Credits a member can take now: a worker's volunteered credits, or for a child pool
    /// with an empty queue the sum over its own members.
    fn capacity(&self, pool: &PoolId, member: &QueueId, depth: usize) -> u32 {
        match member.as_pool() {
            Some(child) if depth < POOL_DEPTH_MAX => {
                let empty = self.queues.get(member).is_none_or(|q| q.items.is_empty());
                match self.pools.get(&child) {
                    Some(state) if empty => {
                        state.members.iter().map(|m| self.capacity(&child, m, depth + 1)).fold(0, u32::saturating_add)
                    }
                    _ => 0,
                }
            }
            Some(_) => 0,
            None => self.pools.get(pool).and_then(|p| p.credits.get(member)).copied().unwrap_or(0),
        }
    }

    /// Puts `id` into `queue`; a pool queue with an idle member hands it straight down.
    fn place(&mut self, queue: &QueueId, id: ReqId, front: bool, depth: usize) {
        if let Some(pool) = queue.as_pool() {
            let empty = self.queues.get(queue).is_none_or(|q| q.items.is_empty());
            if empty && depth < POOL_DEPTH_MAX {
                if let Some(member) = self.pick_member(&pool, depth) {
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

    /// Chooses the next member of `pool` with credits, round robin, and charges it one.
    fn pick_member(&mut self, pool: &PoolId, depth: usize) -> Option<QueueId> {
        let state = self.pools.get(pool)?;
        let count = state.members.len();
        let start = state.next_member;
        let chosen =
            (0..count).map(|k| (start + k) % count).find(|&i| self.capacity(pool, &state.members[i], depth) > 0)?;
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

    /// Hands queued work of `pool` to members with credits, at most `max` requests.
    fn distribute(&mut self, pool: &PoolId, max: usize) -> usize {
        let queue = QueueId::pool(pool);
        let mut moved = 0;
        while moved < max {
            let Some(&id) = self.queues.get(&queue).and_then(|q| q.items.front()) else { break };
            if !self.is_pending(&id) {
                self.queue(&queue).items.pop_front();
                continue;
            }
            let Some(member) = self.pick_member(pool, 0) else { break };
            self.queue(&queue).items.pop_front();
            self.place(&member, id, false, 1);
            moved += 1;
        }
        moved
    }

    fn ancestors(&self, pool: &PoolId) -> Vec<PoolId> {
        let mut chain = vec![pool.clone()];
        while chain.len() < POOL_DEPTH_MAX {
            match self.pools.get(chain.last().expect("chain is never empty")).and_then(|p| p.parent.clone()) {
                Some(parent) if !chain.contains(&parent) => chain.push(parent),
                _ => break,
            }
        }
        chain
    }

    fn hoist(&mut self, pool: &PoolId, max: usize) -> usize {
        let Some(state) = self.pools.get(pool) else { return 0 };
        let members = state.members.clone();
        let idle: u32 = members.iter().map(|m| self.capacity(pool, m, 0)).fold(0, u32::saturating_add);
        let budget = max.min(idle as usize);
        let mut copied = Vec::new();
        // Busiest member first: its queue is where work waits longest.
        let mut by_len: Vec<(usize, QueueId)> =
            members.iter().map(|m| (self.queues.get(m).map_or(0, |q| q.items.len()), m.clone())).collect();
        by_len.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        for (len, member) in by_len {
            if copied.len() >= budget || len < 2 {
                break;
            }
            // Leave the front half to the member itself; take from the far end.
            let share = (len / 2).min(budget - copied.len());
            let Some(queue) = self.queues.get_mut(&member) else { continue };
            let mut taken = 0;
            let mut index = queue.items.len();
            while index > 0 && taken < share {
                index -= 1;
                let id = queue.items[index];
                match self.requests.get_mut(&id) {
                    Some(req) if req.running.is_none() && !req.hoisted => {
                        req.hoisted = true;
                        copied.push(id);
                        taken += 1;
                    }
                    Some(_) => {}
                    None => {
                        // Done: drop the stale entry while we are here.
                        queue.items.remove(index);
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
}

#[async_trait]
impl Statekeeper for Embedded {
    async fn register_node(&self, node: &NodeId, functions: &[(String, u32)]) -> SkResult<()> {
        let mut inner = self.inner.lock();
        if inner.nodes.contains_key(node) {
            return Err(StatekeeperError::DuplicateNode(node.to_string()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        inner.nodes.insert(node.clone(), tx);
        inner.inboxes.insert(node.clone(), rx);
        for (name, version) in functions {
            let entry = inner.functions.entry(name.clone()).or_insert_with(|| (*version, HashSet::new()));
            entry.0 = *version;
            entry.1.insert(node.clone());
        }
        Ok(())
    }

    async fn deregister_node(&self, node: &NodeId) -> SkResult<()> {
        let mut inner = self.inner.lock();
        inner.nodes.remove(node);
        inner.inboxes.remove(node);
        inner.functions.retain(|_, (_, nodes)| {
            nodes.remove(node);
            !nodes.is_empty()
        });
        Ok(())
    }

    async fn function_version(&self, function: &str) -> SkResult<Option<u32>> {
        Ok(self.inner.lock().functions.get(function).map(|(version, _)| *version))
    }

    async fn declare_pool(&self, pool: &PoolId, parent: Option<&PoolId>) -> SkResult<()> {
        let mut inner = self.inner.lock();
        if let Some(parent) = parent {
            if !inner.pools.contains_key(parent) {
                return Err(StatekeeperError::UnknownPool(parent.to_string()));
            }
        }
        inner.pools.entry(pool.clone()).or_default().parent = parent.cloned();
        if let Some(parent) = parent {
            let member = QueueId::pool(pool);
            let state = inner.pools.entry(parent.clone()).or_default();
            if !state.members.contains(&member) {
                state.members.push(member);
            }
        }
        Ok(())
    }

    async fn join_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()> {
        let mut inner = self.inner.lock();
        let state = inner.pools.get_mut(pool).ok_or_else(|| StatekeeperError::UnknownPool(pool.to_string()))?;
        if !state.members.contains(member) {
            state.members.push(member.clone());
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

    async fn submit(&self, request: &Request, queue: &QueueId, front: bool, waiter: &NodeId) -> SkResult<Submitted> {
        let mut inner = self.inner.lock();
        if let Some(outcome) = inner.results().get(&request.id) {
            return Ok(Submitted::Done(outcome));
        }
        if let Some(state) = inner.requests.get_mut(&request.id) {
            if !state.waiters.contains(waiter) {
                state.waiters.push(waiter.clone());
            }
            if front && state.running.is_none() {
                inner.place(queue, request.id, true, 0);
            }
            return Ok(Submitted::Joined);
        }
        if !inner.functions.contains_key(&*request.function) {
            return Ok(Submitted::UnknownFunction);
        }
        if inner.requests.len() >= self.config.in_flight_max {
            return Err(StatekeeperError::Overloaded(self.config.in_flight_max));
        }
        let state = ReqState { request: request.clone(), running: None, waiters: vec![waiter.clone()], hoisted: false };
        inner.requests.insert(request.id, state);
        inner.place(queue, request.id, front, 0);
        Ok(Submitted::Queued)
    }

    async fn claim(&self, queue: &QueueId, owner: &NodeId, max: usize) -> SkResult<Vec<Request>> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut claimed = Vec::new();
        let Some(state) = inner.queues.get_mut(queue) else { return Ok(claimed) };
        while claimed.len() < max {
            let Some(id) = state.items.pop_front() else { break };
            if let Some(req) = inner.requests.get_mut(&id) {
                if req.running.is_none() {
                    req.running = Some(owner.clone());
                    claimed.push(req.request.clone());
                }
            }
        }
        Ok(claimed)
    }

    async fn complete(&self, id: &ReqId, outcome: &Outcome, memoize: bool, local: &NodeId) -> SkResult<bool> {
        let mut inner = self.inner.lock();
        if memoize {
            inner.results().insert(*id, outcome.clone());
        }
        let Some(state) = inner.requests.remove(id) else { return Ok(false) };
        let mut local_waits = false;
        for waiter in state.waiters {
            if &waiter == local {
                local_waits = true;
            } else if let Some(inbox) = inner.nodes.get(&waiter) {
                // A closed inbox means the node is gone; nobody there waits any more.
                let _ = inbox.send(Event::Done { id: *id, outcome: outcome.clone() });
            }
        }
        Ok(local_waits)
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

    async fn open_inbox(&self, node: &NodeId) -> SkResult<BoxStream<'static, Event>> {
        let rx = self.inner.lock().inboxes.remove(node).ok_or_else(|| {
            StatekeeperError::Unavailable(format!("no inbox for node {node}: register it first, and open it once"))
        })?;
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) })))
    }
}
