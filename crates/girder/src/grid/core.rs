//! What every role of a node shares, and the call path common to clients and functions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::waiters::{Submission, Waiters};
use super::worker::Worker;
use crate::control::{Memo, NodeId, NodeInfo, PoolId, QueueId, Statekeeper, Submitted, WorkerInfo};
use crate::error::{CallError, StatekeeperError};
use crate::grid::function::{Policy, Registry};
use crate::id::ReqId;
use crate::request::{Budget, Outcome, Request};
use crate::retry::Backoff;

/// Counters of the call path, shared by all callers on a node.
#[derive(Default)]
pub(crate) struct CallCounters {
    /// Calls made (top level and nested).
    pub(crate) calls: AtomicU64,
    /// Calls answered from the memoized results without waiting.
    pub(crate) memo_hits: AtomicU64,
    /// Calls that joined a request already in flight (single flight).
    pub(crate) joined: AtomicU64,
    /// Calls that queued a new request.
    pub(crate) queued: AtomicU64,
    /// Requests submitted again because they were waited on for long.
    pub(crate) resubmitted: AtomicU64,
}

/// A pool this node declared, as it must be declared again after the statekeeper forgot it.
#[derive(Debug, Clone)]
pub(crate) struct DeclaredPool {
    pub(crate) pool: PoolId,
    pub(crate) parent: Option<PoolId>,
}

/// How often a caller still waiting calls again after its request was dropped with a
/// cancelled tree (another caller's tree, or its own taken for dead).
pub(crate) const CANCELLED_RETRIES_MAX: u32 = 3;

/// Withdraws from a top-level call whose caller left without its outcome.
struct Leaving {
    core: Arc<NodeCore>,
    id: crate::id::ReqId,
    armed: bool,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        if self.armed {
            // In a task of its own: the caller's receiver is dropped by then.
            let (core, id) = (self.core.clone(), self.id);
            self.core.handle.spawn(async move { core.abandon(&id).await });
        }
    }
}

/// Longest a completion is retried while the statekeeper is unreachable; after that the
/// request's lease runs out and another node evaluates it again.
const COMPLETE_RETRY_MAX: Duration = Duration::from_secs(120);

/// The parts of a node that clients, workers and functions share, grouped by concern:
/// the call path ([`Calls`]), evaluation ([`Work`]) and the node's place in the grid
/// ([`Membership`]).
pub(crate) struct NodeCore {
    pub(crate) id: NodeId,
    pub(crate) statekeeper: Arc<dyn Statekeeper>,
    /// The functions this node can run.
    pub(crate) registry: Registry,
    pub(crate) handle: Handle,
    /// Cancelled when the node stops: every task of the node ends.
    pub(crate) cancel: CancellationToken,
    pub(crate) calls: Calls,
    pub(crate) work: Work,
    pub(crate) membership: Membership,
}

/// The call path: who waits for what here, and what calls did.
#[derive(Default)]
pub(crate) struct Calls {
    pub(crate) waiters: Waiters,
    pub(crate) counters: CallCounters,
    /// Latency of top-level calls.
    pub(crate) latency: super::metrics::Latency,
    /// Calls with an id in flight here, which callers may cancel by id.
    pub(crate) in_flight: Arc<super::inflight::InFlight>,
    /// Metrics of what runs beside the node (a workflow runtime), added to its own.
    pub(crate) extra_metrics: parking_lot::Mutex<Vec<super::metrics::Source>>,
}

/// Evaluation: the workers and what runs on them.
pub(crate) struct Work {
    pub(crate) workers: Vec<Arc<Worker>>,
    /// Evaluations started per function, by name.
    pub(crate) evaluations: HashMap<&'static str, AtomicU64>,
    /// Requests being evaluated on this node, with how many evaluations each.
    pub(crate) running: parking_lot::Mutex<crate::id::IdMap<u32>>,
    /// A claim's reply was lost: the statekeeper may hold claims of ours we never saw.
    pub(crate) claims_uncertain: std::sync::atomic::AtomicBool,
    /// Signalled when a worker of this node goes idle, or queues nested work while all its
    /// slots are busy: the helpers look for work to hoist soon.
    pub(crate) hoist_hint: tokio::sync::Notify,
    /// Set while the node drains: it takes no new work and finishes what it holds.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// The call trees of the evaluations running here, and those that ended.
    pub(crate) trees: Arc<super::trees::Trees>,
    /// The limits of the call trees this node's clients start.
    pub(crate) limits: CallLimits,
    /// How long an evaluation of a function without a time limit of its own may run.
    pub(crate) time_limit: Option<Duration>,
    /// The policy of each function served here: its attribute's, with the fields the node
    /// overrides ([`crate::NodeBuilder::policy`]) replaced.
    pub(crate) policies: HashMap<&'static str, Policy>,
}

/// How many times a request is run again after nodes evaluating it were lost, for a function
/// whose policy sets no `retries` (Ray's default for tasks too). A panic is retried only when
/// `retries` is set.
pub const LOST_RETRIES_DEFAULT: u32 = 3;

/// Limits of a call tree: the most new requests it may create and how deep it may nest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Most new requests one call tree may create, its root included.
    pub requests_max: u64,
    /// Deepest nesting of a call tree (a top-level call is depth 0).
    pub depth_max: u32,
}

impl Default for CallLimits {
    /// Generous: a million requests and a million levels per tree.
    fn default() -> Self {
        CallLimits { requests_max: 1_000_000, depth_max: 1_000_000 }
    }
}

/// The node's place in the grid: what it declared, its lease, its settings, placement.
pub(crate) struct Membership {
    pub(crate) pools: Vec<DeclaredPool>,
    pub(crate) http: Option<String>,
    /// What the node runs with now: the builder's settings with its configuration applied.
    pub(crate) settings: parking_lot::Mutex<super::config::Settings>,
    /// The builder's settings, before configuration.
    pub(crate) base_settings: super::config::Settings,
    pub(crate) heartbeat_ms: u64,
    /// The node's lease by its own clock; workers claim nothing while it may have run out.
    pub(crate) lease: parking_lot::Mutex<Arc<crate::lease::LocalLease>>,
    /// Heartbeats that renewed the lease so far.
    pub(crate) beats: AtomicU64,
    /// Times the node registered again after the statekeeper forgot it (it was frozen past
    /// its lease, or the store lost its state): its claims were given away, so what its
    /// callers wait for is submitted again at once.
    pub(crate) rejoins: AtomicU64,
    pub(crate) placement: Arc<crate::placement::Placement>,
    /// The node's bucket store, when it runs one.
    pub(crate) farm: std::sync::OnceLock<crate::store::Farm>,
}

/// Where a call's request goes when it must be queued.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) queue: &'a QueueId,
    /// Nested calls go to the front of the caller's own queue (depth first).
    pub(crate) front: bool,
}

impl NodeCore {
    /// The policy this node applies to `function`, if it serves it: the attribute's fields,
    /// those set on the node ([`crate::NodeBuilder::policy`]) replacing them, and the node's
    /// time limit for a function without `timeout_ms`. `retries` left `None` means 0 for
    /// panics and [`LOST_RETRIES_DEFAULT`] for lost nodes; `ttl_ms` left `None` means the
    /// store's own time to live.
    pub(crate) fn policy_of(&self, function: &str) -> Option<Policy> {
        let policy = *self.work.policies.get(function)?;
        let node_limit = self.work.time_limit.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX));
        Some(Policy { timeout_ms: policy.timeout_ms.or(node_limit), ..policy })
    }

    /// How many times an evaluation of `function` that panicked is run again here.
    pub(crate) fn panic_retries(&self, function: &str) -> u32 {
        self.work.policies.get(function).and_then(|p| p.retries).unwrap_or(0)
    }

    /// The error `request` fails with instead of running again, when the nodes lost while
    /// evaluating it used up its function's retries. Not memoized: a later call runs it.
    pub(crate) fn lost_too_often(&self, request: &Request) -> Option<CallError> {
        let retries =
            self.work.policies.get(&*request.function).and_then(|p| p.retries).unwrap_or(LOST_RETRIES_DEFAULT);
        (request.lost > retries).then(|| lost_error(request, retries))
    }

    /// How the outcome of an evaluation of `request` is memoized: values and returned errors
    /// for the function's `ttl_ms` (the store's own when it has none); nothing else.
    fn memo_for(&self, request: &Request, outcome: &Outcome) -> Memo {
        let memoizable = match outcome {
            Ok(_) => true,
            Err(err) => err.is_memoizable(),
        };
        if !memoizable {
            return Memo::Skip;
        }
        match self.work.policies.get(&*request.function).and_then(|p| p.ttl_ms) {
            Some(ttl_ms) => Memo::For(ttl_ms),
            None => Memo::Keep,
        }
    }

    /// The version of `function` this node serves, else the one the grid's directory knows.
    pub(crate) async fn version_of(&self, function: &str) -> Result<u32, CallError> {
        if let Some(version) = self.registry.version_of(function) {
            return Ok(version);
        }
        match self.statekeeper.function_version(function).await {
            Ok(Some(version)) => Ok(version),
            Ok(None) => Err(CallError::UnknownFunction { function: function.to_owned() }),
            Err(err) => Err(CallError::statekeeper(function, &err)),
        }
    }

    /// Forgets the memoized outcome of `request` on every node (see [`Statekeeper::forget`]).
    /// Returns whether one was memoized.
    pub(crate) async fn forget(&self, request: &Request) -> Result<bool, CallError> {
        self.statekeeper.forget(request).await.map_err(|err| CallError::statekeeper(&request.function, &err))
    }

    /// Forgets every memoized outcome of `function` at the version this node serves (else the
    /// one the directory knows). Returns how many.
    pub(crate) async fn forget_all(&self, function: &str) -> Result<u64, CallError> {
        let version = self.version_of(function).await?;
        let forgotten = self.statekeeper.forget_all(function, version).await;
        let forgotten = forgotten.map_err(|err| CallError::statekeeper(function, &err))?;
        tracing::info!(function, version, forgotten, "forgot every memoized result of a function version");
        Ok(forgotten)
    }

    /// Looks up memoized results, then registers the caller and submits the request if no
    /// other local caller did. Returns the outcome now, or a receiver for it.
    pub(crate) async fn begin_call(
        &self,
        request: &Request,
        target: Target<'_>,
    ) -> Result<Outcome, oneshot::Receiver<Outcome>> {
        self.calls.counters.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(outcome) = self.statekeeper.cached_result(&request.id) {
            self.calls.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(outcome);
        }
        let submission = Submission { request: request.clone(), queue: target.queue.clone(), front: target.front };
        let (rx, submit) = self.calls.waiters.register(&submission);
        if !submit {
            self.calls.counters.joined.fetch_add(1, Ordering::Relaxed);
            return Err(rx);
        }
        self.submit(&submission).await;
        Err(rx)
    }

    /// Submits and handles the answer: an outcome known now goes to the local callers.
    pub(crate) async fn submit(&self, submission: &Submission) {
        let request = &submission.request;
        let submitted = self.statekeeper.submit(request, &submission.queue, submission.front, &self.id).await;
        let outcome = match submitted {
            Ok(Submitted::Queued) => {
                self.calls.counters.queued.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Submitted::Joined) => {
                self.calls.counters.joined.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Submitted::Done(outcome)) => {
                self.calls.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
                outcome
            }
            Ok(Submitted::UnknownFunction) => {
                Err(CallError::UnknownFunction { function: request.function.to_string() })
            }
            Ok(Submitted::TreeEnded(end)) => {
                self.work.trees.end(request.budget.tree, end);
                Err(end.error(&request.function))
            }
            Err(StatekeeperError::Unavailable(message)) => {
                // The callers keep waiting; the resubmission sweep tries again.
                tracing::warn!(function = %request.function, %message, "submission failed; will retry");
                return;
            }
            Err(err) => Err(CallError::statekeeper(&request.function, &err)),
        };
        self.calls.waiters.deliver(&request.id, &outcome);
    }

    /// Waits for an outcome, up to `deadline` when one is set.
    pub(crate) async fn finish_call(
        &self,
        function: &str,
        rx: oneshot::Receiver<Outcome>,
        deadline: Option<Duration>,
    ) -> Outcome {
        let received = match deadline {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(received) => received,
                Err(_) => {
                    return Err(CallError::DeadlineExceeded {
                        function: function.to_owned(),
                        deadline_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                    })
                }
            },
        };
        // The sender is only dropped without a value when the node shuts down.
        received.unwrap_or_else(|_| Err(CallError::Shutdown { function: function.to_owned() }))
    }

    /// A whole call: memo lookup, submission, wait.
    pub(crate) async fn call(&self, request: &Request, target: Target<'_>, deadline: Option<Duration>) -> Outcome {
        match self.begin_call(request, target).await {
            Ok(outcome) => outcome,
            Err(rx) => self.finish_call(&request.function, rx, deadline).await,
        }
    }

    /// A top-level call: [`NodeCore::call`] in a call tree of its own. When the caller leaves
    /// without the outcome (its future dropped, or its deadline passed) and no other caller
    /// here waits for it, the node withdraws from the request, which ends the tree when
    /// nobody else waits for its root. A caller still waiting whose tree was cancelled under
    /// it (its node was taken for dead) tries again in a fresh tree, a few times.
    pub(crate) async fn call_root(
        self: &Arc<Self>,
        request: Request,
        target: Target<'_>,
        deadline: Option<Duration>,
    ) -> Outcome {
        let mut leaving = Leaving { core: self.clone(), id: request.id, armed: true };
        let mut request = request;
        let mut attempts = 0;
        loop {
            let outcome = self.call(&request, target, deadline).await;
            match &outcome {
                Err(CallError::DeadlineExceeded { .. }) => return outcome,
                Err(CallError::Cancelled { .. }) if attempts < CANCELLED_RETRIES_MAX => {
                    attempts += 1;
                    let fresh = Budget::root(request.budget.requests_max, request.budget.depth_max);
                    request = request.with_budget(fresh);
                }
                _ => {
                    leaving.armed = false;
                    return outcome;
                }
            }
        }
    }

    /// The caller of `id` here left: when no other caller here waits for it, withdraws
    /// this node from it (see [`Statekeeper::cancel_tree`]).
    async fn abandon(&self, id: &ReqId) {
        if !self.calls.waiters.forget_if_unwaited(id) {
            return;
        }
        match self.statekeeper.cancel_tree(id, &self.id).await {
            Ok(true) => tracing::debug!(request = %id, "caller left; its call tree was cancelled"),
            Ok(false) => {}
            Err(err) => tracing::warn!(request = %id, error = %err, "cannot withdraw from an abandoned call"),
        }
    }

    /// The outcome to record for an evaluation of `request`: an error of a tree that ended
    /// says so, and an error after a nested call failed for a reason of the tree (`taint`)
    /// is that reason; neither is memoized, whatever the function made of them.
    pub(crate) fn settle(&self, request: &Request, outcome: Outcome, taint: &super::ctx::Taint) -> Outcome {
        if outcome.is_ok() {
            return outcome;
        }
        if let Some(end) = self.work.trees.ended(self.work.trees.tree_of(&request.id, request.budget.tree)) {
            return Err(end.error(&request.function));
        }
        match taint.lock().take() {
            Some(reason) => Err(reason),
            None => outcome,
        }
    }

    /// Records `outcome` as the result of `request`: memoizes it when it is a value, wakes
    /// the waiting nodes, and hands it to the callers waiting here. Retries while the
    /// statekeeper is unreachable.
    pub(crate) async fn complete(&self, request: &Request, outcome: Outcome) {
        self.complete_and_claim(request, outcome, None).await;
    }

    /// [`NodeCore::complete`], and when `next` names a queue, claims one more request from
    /// it in the same step: the slot that just freed up goes straight to the next request.
    pub(crate) async fn complete_and_claim(
        &self,
        request: &Request,
        outcome: Outcome,
        next: Option<&QueueId>,
    ) -> Option<Request> {
        self.note_finished(request);
        let memo = self.memo_for(request, &outcome);
        let mut backoff = Backoff::statekeeper();
        let mut waited = Duration::ZERO;
        loop {
            let result = match next {
                Some(queue) => self.statekeeper.complete_and_claim(request, &outcome, memo, &self.id, queue, 1).await,
                None => self.statekeeper.complete(request, &outcome, memo, &self.id).await.map(|w| (w, Vec::new())),
            };
            match result {
                Ok((local_waits, mut claimed)) => {
                    if local_waits {
                        self.calls.waiters.deliver(&request.id, &outcome);
                    }
                    return claimed.pop();
                }
                Err(StatekeeperError::Unavailable(message)) if waited < COMPLETE_RETRY_MAX => {
                    if next.is_some() {
                        // The lost reply may have carried a claim.
                        self.work.claims_uncertain.store(true, Ordering::Release);
                    }
                    if backoff.failures() == 0 {
                        tracing::warn!(request = %request.id, function = %request.function, %message,
                            "statekeeper unreachable; retrying the completion with backoff");
                    }
                    let delay = backoff.failed();
                    tokio::time::sleep(delay).await;
                    waited += delay;
                }
                Err(err) => {
                    // Local callers learn it now; remote ones are served when the request is
                    // re-run after this node's claims expire, or by their resubmission.
                    tracing::error!(request = %request.id, function = %request.function, error = %err,
                        "could not record an outcome");
                    self.calls.waiters.deliver(&request.id, &Err(CallError::statekeeper(&request.function, &err)));
                    return None;
                }
            }
        }
    }

    pub(crate) fn note_running(&self, request: &Request) {
        *self.work.running.lock().entry(request.id).or_insert(0) += 1;
    }

    fn note_finished(&self, request: &Request) {
        let mut running = self.work.running.lock();
        if let Some(count) = running.get_mut(&request.id) {
            *count -= 1;
            if *count == 0 {
                running.remove(&request.id);
            }
        }
    }

    /// After a lost claim reply: gives back every claim the statekeeper holds for this node
    /// that is not really running here, so it runs elsewhere instead of never.
    pub(crate) async fn release_uncertain_claims(&self) -> Result<(), StatekeeperError> {
        if !self.work.claims_uncertain.load(Ordering::Acquire) {
            return Ok(());
        }
        let keep: Vec<_> = self.work.running.lock().keys().copied().collect();
        let released = self.statekeeper.release_claims(&self.id, &keep).await?;
        self.work.claims_uncertain.store(false, Ordering::Release);
        if released > 0 {
            tracing::warn!(node = %self.id, released, "gave back claims whose replies were lost");
        }
        Ok(())
    }

    /// Reads this node's configuration and applies what changed (slots take effect at once).
    pub(crate) async fn apply_config(&self) {
        let store = self.statekeeper.structures();
        let config = match super::config::get(&store, self.id.as_str()).await {
            Ok(config) => config,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the node's configuration");
                return;
            }
        };
        let settings = super::config::apply(&self.membership.base_settings, &config);
        let changed = {
            let mut current = self.membership.settings.lock();
            let changed = *current != settings;
            *current = settings.clone();
            changed
        };
        if changed {
            tracing::info!(node = %self.id, ?settings, "configuration applied");
        }
        for worker in &self.work.workers {
            let target = settings.slots.unwrap_or(worker.initial_slots);
            worker.resize(target);
        }
    }

    pub(crate) fn count_evaluation(&self, function: &str) {
        if let Some(counter) = self.work.evaluations.get(function) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The functions this node serves: those of its registry, or none when it runs no
    /// workers (a gateway takes calls and runs nothing, so no work may wait for it).
    pub(crate) fn served(&self) -> Vec<(String, u32)> {
        if self.work.workers.is_empty() {
            return Vec::new();
        }
        self.registry.names().into_iter().map(|(n, v)| (n.to_owned(), v)).collect()
    }

    /// Registers this node again with everything it declared, after the statekeeper forgot
    /// it (it was declared dead, or the store lost its state).
    pub(crate) async fn rejoin(&self) -> Result<(), StatekeeperError> {
        self.statekeeper.register_node(&self.id, &self.served()).await?;
        for declared in &self.membership.pools {
            self.statekeeper.declare_pool(&declared.pool, declared.parent.as_ref(), &self.id).await?;
        }
        for worker in &self.work.workers {
            self.statekeeper.join_pool(&worker.pool, &worker.queue, &self.id).await?;
            // Its dispatcher volunteers again on its next round.
            worker.slot_freed.notify_one();
        }
        Ok(())
    }

    /// What this node reports about itself with each heartbeat.
    pub(crate) fn info(&self) -> NodeInfo {
        let counters = &self.calls.counters;
        let machine = super::system::read();
        let settings = self.membership.settings.lock().clone();
        let mut pools: Vec<String> = self.membership.pools.iter().map(|p| p.pool.to_string()).collect();
        pools.dedup();
        NodeInfo {
            id: self.id.to_string(),
            http: self.membership.http.clone(),
            data: self.membership.farm.get().map(|farm| farm.address().to_owned()),
            host: machine.host,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cpus: settings.cpus.unwrap_or(machine.cpus),
            memory_total_bytes: machine.memory_total_bytes,
            memory_free_bytes: machine.memory_free_bytes,
            memory_max_bytes: settings.max_memory_bytes,
            load_1m: machine.load_1m,
            pools,
            functions: self.served().into_iter().map(|(n, _)| n).collect(),
            heartbeat_ms: self.membership.heartbeat_ms,
            workers: self
                .work
                .workers
                .iter()
                .map(|w| WorkerInfo {
                    id: w.id.to_string(),
                    pool: w.pool.to_string(),
                    slots: u32::try_from(w.slots.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
                    busy: u32::try_from(w.busy()).unwrap_or(u32::MAX),
                    executed: w.executed.load(Ordering::Relaxed),
                    queue_len: w.queue_len_seen.load(Ordering::Relaxed),
                })
                .collect(),
            calls: counters.calls.load(Ordering::Relaxed),
            memo_hits: counters.memo_hits.load(Ordering::Relaxed),
            evaluations: self.work.evaluations.values().map(|c| c.load(Ordering::Relaxed)).sum(),
            heartbeat_age_ms: 0,
            flocks: u32::try_from(self.membership.placement.table().flocks_of(self.id.as_str())).unwrap_or(u32::MAX),
            health: crate::control::Health::Alive,
            store: self.membership.farm.get().map(|farm| farm.node.report()),
            draining: self.work.draining.load(Ordering::Acquire),
            rejoins: self.membership.rejoins.load(Ordering::Acquire),
        }
    }
}

/// Why `request` fails after its evaluations were lost with their nodes more often than its
/// function's `retries` allow.
fn lost_error(request: &Request, retries: u32) -> CallError {
    CallError::NodeLost { function: request.function.to_string(), lost: request.lost, retries }
}
