//! A worker: its own queue, a fixed number of evaluation slots, and the loop that claims
//! work from its queue and volunteers at its pool when it has room.
//!
//! A slot is a permit of the worker's semaphore. An async evaluation holds one while it is
//! polled and gives it back whenever it is parked on nested requests, so a worker never
//! runs more than `slots` evaluations at once and never starves on its own nesting. A
//! blocking evaluation holds one while its fiber runs (see [`super::fiber`]) and gives it
//! back while the fiber is suspended on a nested request.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

use super::core::NodeCore;
use super::ctx::{Ctx, Scope, Taint};
use super::fiber::FiberPool;
use crate::control::{PoolId, QueueId};
use crate::error::CallError;
use crate::grid::function::{FnKind, Registered};
use crate::request::{Outcome, Request};
use crate::retry::Backoff;

/// How long the dispatcher sleeps without any signal before it looks again anyway.
const IDLE_RECHECK_MS: u64 = 1_000;

/// A worker's fixed part and counters.
pub(crate) struct Worker {
    pub(crate) id: Arc<str>,
    pub(crate) queue: QueueId,
    pub(crate) pool: PoolId,
    /// Evaluation slots; changed at run time by the node's `slots` configuration.
    pub(crate) slots: AtomicUsize,
    /// The slots it started with, used again when the configuration no longer sets any.
    pub(crate) initial_slots: usize,
    pub(crate) prefetch: u32,
    pub(crate) semaphore: Arc<Semaphore>,
    /// Signalled when an evaluation gives its slot back.
    pub(crate) slot_freed: Notify,
    /// Evaluations started on this worker.
    pub(crate) executed: AtomicU64,
    /// Most slots ever in use at once.
    pub(crate) peak_busy: AtomicUsize,
    /// Parked evaluations that woke up and wait for a slot.
    pub(crate) waiting_for_slot: AtomicUsize,
    /// The threads blocking evaluations run on, as fibers.
    pub(crate) fibers: FiberPool,
    /// The length of its queue when last read, for heartbeats.
    pub(crate) queue_len_seen: AtomicU64,
}

impl Worker {
    pub(crate) fn new(id: Arc<str>, pool: PoolId, slots: usize, prefetch: u32) -> Worker {
        let fiber_name = id.clone();
        Worker {
            queue: QueueId::worker(&id),
            id,
            pool,
            slots: AtomicUsize::new(slots),
            initial_slots: slots,
            prefetch,
            semaphore: Arc::new(Semaphore::new(slots)),
            slot_freed: Notify::new(),
            executed: AtomicU64::new(0),
            peak_busy: AtomicUsize::new(0),
            waiting_for_slot: AtomicUsize::new(0),
            fibers: FiberPool::new(fiber_name),
            queue_len_seen: AtomicU64::new(0),
        }
    }

    /// A slot for an evaluation that woke up from waiting; counted in `waiting_for_slot`
    /// meanwhile, so finishing evaluations leave their slots to it rather than claim more.
    pub(crate) async fn acquire_woken(self: &Arc<Self>) -> Option<OwnedSemaphorePermit> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting_for_slot.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting_for_slot);
        let permit = self.semaphore.clone().acquire_owned().await.ok();
        self.note_busy();
        permit
    }

    fn note_busy(&self) {
        self.peak_busy.fetch_max(self.busy(), Ordering::Relaxed);
    }

    /// Slots in use now.
    pub(crate) fn busy(&self) -> usize {
        self.slots.load(Ordering::Relaxed).saturating_sub(self.semaphore.available_permits())
    }

    /// Moves towards `target` slots: adds permits at once; takes away only free ones (the
    /// rest when they free up, on a later call).
    pub(crate) fn resize(&self, target: usize) {
        let current = self.slots.load(Ordering::Acquire);
        if target > current {
            self.semaphore.add_permits(target - current);
            self.slots.store(target, Ordering::Release);
            self.slot_freed.notify_one();
        } else if target < current {
            let forgotten = self.semaphore.forget_permits(current - target);
            self.slots.store(current - forgotten, Ordering::Release);
        }
    }

    pub(crate) fn release(&self, permit: OwnedSemaphorePermit) {
        drop(permit);
        self.slot_freed.notify_one();
    }
}

/// Claims work into free slots and volunteers for more, until the node shuts down.
pub(crate) async fn dispatch(core: Arc<NodeCore>, worker: Arc<Worker>) {
    let mut backoff = Backoff::statekeeper();
    let mut wait = Duration::ZERO;
    loop {
        if !wait.is_zero() {
            // The statekeeper failed us last round: do not spin against it.
            tokio::select! {
                _ = core.cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = Duration::ZERO;
        }
        if let Err(err) = core.release_uncertain_claims().await {
            tracing::debug!(error = %err, "cannot release uncertain claims yet");
            wait = backoff.failed();
            continue;
        }
        if !core.membership.lease.lock().is_held() {
            // Our lease may have run out and our claims gone to others: claim nothing until
            // a heartbeat renews it (the lease task wakes us then).
            tokio::select! {
                _ = core.cancel.cancelled() => break,
                _ = worker.slot_freed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(IDLE_RECHECK_MS)) => {}
            }
            continue;
        }
        let mut permits = Vec::new();
        while let Ok(permit) = worker.semaphore.clone().try_acquire_owned() {
            permits.push(permit);
        }
        if !permits.is_empty() {
            let asked = permits.len();
            let claimed = match core.statekeeper.claim(&worker.queue, &core.id, asked).await {
                Ok(claimed) => {
                    backoff.succeeded();
                    claimed
                }
                Err(err) => {
                    if backoff.failures() == 0 {
                        tracing::warn!(worker = %worker.id, error = %err, "claim failed; retrying with backoff");
                    }
                    core.work.claims_uncertain.store(true, Ordering::Release);
                    wait = backoff.failed();
                    continue;
                }
            };
            let drained = claimed.len() < asked;
            for (request, permit) in claimed.into_iter().zip(permits.drain(..)) {
                start(&core, &worker, request, permit);
            }
            drop(permits);
            if drained {
                // Our queue is empty: offer the free slots, plus the prefetch, to the pool;
                // a draining node offers none, and only finishes what it holds.
                let credits = if core.work.draining.load(Ordering::Acquire) {
                    0
                } else {
                    u32::try_from(worker.semaphore.available_permits()).unwrap_or(u32::MAX) + worker.prefetch
                };
                if let Err(err) = core.statekeeper.volunteer(&worker.pool, &worker.queue, credits).await {
                    tracing::warn!(worker = %worker.id, error = %err, "volunteering failed; retrying");
                }
                if worker.semaphore.available_permits() > 0 {
                    core.work.hoist_hint.notify_waiters();
                }
            }
        }
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.statekeeper.wait_work(&worker.queue, IDLE_RECHECK_MS) => {}
            _ = worker.slot_freed.notified() => {}
        }
    }
    // Withdraw, so no more work is handed to a worker that is gone.
    let _ = core.statekeeper.volunteer(&worker.pool, &worker.queue, 0).await;
}

/// Counts the start of an evaluation of `request` on `worker`.
pub(crate) fn account(core: &NodeCore, worker: &Worker, request: &Request) {
    worker.executed.fetch_add(1, Ordering::Relaxed);
    worker.note_busy();
    core.note_running(request);
    core.count_evaluation(&request.function);
}

/// Starts evaluating a claimed request in the slot `permit`.
pub(crate) fn start(core: &Arc<NodeCore>, worker: &Arc<Worker>, request: Request, permit: OwnedSemaphorePermit) {
    if let Some(lost) = core.lost_too_often(&request) {
        // Its retries after lost nodes are used up: answered without running it.
        let (core, worker) = (core.clone(), worker.clone());
        core.handle.clone().spawn(async move {
            worker.release(permit);
            core.complete(&request, Err(lost)).await;
        });
        return;
    }
    account(core, worker, &request);
    let Some(registered) = core.registry.get(&request.function).cloned() else {
        // Claimed work this node cannot run: answer it so nobody waits on it forever.
        let core = core.clone();
        let worker = worker.clone();
        core.handle.clone().spawn(async move {
            worker.release(permit);
            let outcome = Err(CallError::UnknownFunction { function: request.function.to_string() });
            core.complete(&request, outcome).await;
        });
        return;
    };
    match registered.function.kind() {
        FnKind::Async => {
            let nested = Arc::new(AtomicUsize::new(0));
            let evaluation = evaluate_async(core.clone(), worker.clone(), registered, request, nested.clone());
            let slotted = Slotted::new(evaluation, permit, worker.clone(), nested);
            core.handle.spawn(slotted);
        }
        FnKind::Blocking => {
            let (core, running_on) = (core.clone(), worker.clone());
            let slots = worker.slots.load(Ordering::Relaxed);
            worker.fibers.start(
                slots,
                Box::new(move || {
                    let slot = Arc::new(Mutex::new(Some(permit)));
                    run_blocking(&core, &running_on, &registered, &slot, request);
                    let permit = slot.lock().take();
                    if let Some(permit) = permit {
                        running_on.release(permit);
                    }
                }),
            );
        }
    }
}

/// Starts `request` in a slot of its own once one is free.
pub(crate) fn start_when_free(core: &Arc<NodeCore>, worker: &Arc<Worker>, request: Request) {
    let permit = worker.semaphore.clone().acquire_owned();
    let (core, worker) = (core.clone(), worker.clone());
    core.handle.clone().spawn(async move {
        if let Ok(permit) = permit.await {
            start(&core, &worker, request, permit);
        }
    });
}

/// Evaluates `request`, records its outcome, and while the worker's queue has more async
/// work and no parked evaluation waits for a slot, goes on with the next request in the same
/// slot: the completion and the next claim are one statekeeper step.
async fn evaluate_async(
    core: Arc<NodeCore>,
    worker: Arc<Worker>,
    mut registered: Registered,
    mut request: Request,
    nested: Arc<AtomicUsize>,
) {
    loop {
        let outcome = evaluate_once(&core, &worker, &registered, &request, &nested).await;
        // Parked evaluations that woke up go first: they finish work already begun.
        let next_queue = (worker.waiting_for_slot.load(Ordering::Acquire) == 0).then_some(&worker.queue);
        let Some(next) = core.complete_and_claim(&request, outcome, next_queue).await else { return };
        match core.registry.get(&next.function) {
            Some(found) if found.function.kind() == FnKind::Async => {
                account(&core, &worker, &next);
                registered = found.clone();
                request = next;
            }
            _ => {
                start_when_free(&core, &worker, next);
                return;
            }
        }
    }
}

/// Shortest and longest wait before a retry of an evaluation (after a panic, or after the
/// node running it was lost).
const RETRY_DELAY_MIN: Duration = Duration::from_millis(10);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);

fn retry_backoff() -> Backoff {
    Backoff::new(RETRY_DELAY_MIN, RETRY_DELAY_MAX)
}

/// How long a request re-run after its `lost`-th lost node waits before it starts: the
/// backoff's `lost`-th step, so a request that brings nodes down does not do so in a loop.
fn rerun_delay(lost: u32) -> Duration {
    let mut backoff = retry_backoff();
    (0..lost.min(16)).map(|_| backoff.failed()).last().unwrap_or(Duration::ZERO)
}

/// One async evaluation of `request`, within its time limit, dropped at its next await
/// when its call tree ends; its outcome as the grid records it. A request whose lost nodes
/// used up its retries fails instead.
async fn evaluate_once(
    core: &Arc<NodeCore>,
    worker: &Arc<Worker>,
    registered: &Registered,
    request: &Request,
    nested: &Arc<AtomicUsize>,
) -> Outcome {
    if let Some(lost) = core.lost_too_often(request) {
        return Err(lost);
    }
    if request.lost > 0 {
        tokio::time::sleep(rerun_delay(request.lost)).await;
    }
    let bounds = Bounds::of(core, registered);
    let evaluation = attempts_async(core, worker, registered, request, nested, &bounds);
    let limited = async {
        match bounds.limit {
            Some(limit) => {
                tokio::time::timeout(limit, evaluation).await.unwrap_or_else(|_| Err(bounds.overrun(request)))
            }
            None => evaluation.await,
        }
    };
    let mut limited = std::pin::pin!(limited);
    // Most evaluations finish in their first poll; only one that waits joins its tree.
    let outcome = match limited.as_mut().now_or_never() {
        Some(outcome) => outcome,
        None => {
            let mut tree = core.work.trees.tree_of(&request.id, request.budget.tree);
            loop {
                let entered = core.work.trees.enter(tree);
                let Some(token) = entered.token.clone() else { break limited.await };
                tokio::select! {
                    biased;
                    _ = token.cancelled() => {
                        // Adopted by a caller's tree when its own ended: it goes on there.
                        let adopter = core.work.trees.tree_of(&request.id, tree);
                        if adopter == tree {
                            break Err(CallError::Cancelled { function: request.function.to_string() });
                        }
                        tree = adopter;
                    }
                    outcome = limited.as_mut() => break outcome,
                }
            }
        }
    };
    core.settle(request, outcome, &bounds.taint)
}

/// Runs `request`'s async body until it does not panic or its function's retries of panics
/// are used up, backing off between attempts. The time limit bounds all attempts together.
async fn attempts_async(
    core: &Arc<NodeCore>,
    worker: &Arc<Worker>,
    registered: &Registered,
    request: &Request,
    nested: &Arc<AtomicUsize>,
    bounds: &Bounds,
) -> Outcome {
    let retries = core.panic_retries(&request.function);
    let mut backoff = retry_backoff();
    let mut attempt = 0;
    loop {
        let ctx = Ctx::for_async(bounds.scope(core, worker, request), nested.clone());
        let running = AssertUnwindSafe(async { registered.function.invoke_async(ctx, &request.args).await });
        let error = match running.catch_unwind().await {
            Ok(outcome) => return outcome,
            Err(payload) => panic_error(request, payload),
        };
        if attempt >= retries || !bounds.may_retry(core, request) {
            return Err(error);
        }
        attempt += 1;
        tracing::debug!(function = %request.function, request = %request.id, attempt, "retrying after a panic");
        tokio::time::sleep(backoff.failed()).await;
    }
}

/// Runs a blocking function on this thread, holding the slot in `slot`, and records the
/// outcome. Also used for nested requests run inline by [`Ctx::call_blocking`].
pub(crate) fn run_blocking(
    core: &Arc<NodeCore>,
    worker: &Arc<Worker>,
    registered: &Registered,
    slot: &Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    request: Request,
) {
    let bounds = Bounds::of(core, registered);
    // Past its time limit, the grid answers for it at once and discards what it returns.
    let answered = Arc::new(AtomicBool::new(false));
    let timer = bounds.limit.map(|limit| {
        let (core, request, answered) = (core.clone(), request.clone(), answered.clone());
        let overrun = bounds.overrun(&request);
        core.handle.clone().spawn(async move {
            tokio::time::sleep(limit).await;
            if !answered.swap(true, Ordering::AcqRel) {
                tracing::warn!(function = %request.function, request = %request.id, "evaluation ran past its time limit; abandoned");
                core.complete(&request, Err(overrun)).await;
            }
        })
    });
    let outcome = match core.lost_too_often(&request) {
        Some(lost) => Err(lost),
        None => attempts_blocking(core, worker, registered, slot, &request, &bounds, &answered),
    };
    if let Some(timer) = timer {
        timer.abort();
    }
    // What it returns past its limit is discarded, whether or not the timer answered yet.
    let overran = bounds.deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline);
    let outcome = if overran { Err(bounds.overrun(&request)) } else { outcome };
    // A tree that ended while it ran: the grid discards what it made of that.
    let outcome = core.settle(&request, outcome, &bounds.taint);
    drop(bounds);
    if answered.swap(true, Ordering::AcqRel) || core.cancel.is_cancelled() {
        // Answered by the time limit already; or the node stopped under us: its runtime
        // may be gone, and deregistering handed its claims back, so it runs again elsewhere.
        return;
    }
    core.handle.block_on(core.complete(&request, outcome));
}

/// Runs `request`'s blocking body on this thread until it does not panic or its function's
/// retries of panics are used up, backing off between attempts (after a lost node, before
/// the first too). The time limit bounds all attempts together.
fn attempts_blocking(
    core: &Arc<NodeCore>,
    worker: &Arc<Worker>,
    registered: &Registered,
    slot: &Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    request: &Request,
    bounds: &Bounds,
    answered: &AtomicBool,
) -> Outcome {
    if request.lost > 0 {
        std::thread::sleep(rerun_delay(request.lost));
    }
    let retries = core.panic_retries(&request.function);
    let mut backoff = retry_backoff();
    let mut attempt = 0;
    loop {
        let ctx = Ctx::for_blocking(bounds.scope(core, worker, request), slot.clone());
        let run = {
            let _evaluating = super::panics::Evaluating::enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| registered.function.invoke_blocking(ctx, &request.args)))
        };
        let error = match run {
            Ok(outcome) => return outcome,
            Err(payload) => panic_error(request, payload),
        };
        if attempt >= retries || answered.load(Ordering::Acquire) || !bounds.may_retry(core, request) {
            return Err(error);
        }
        attempt += 1;
        tracing::debug!(function = %request.function, request = %request.id, attempt, "retrying after a panic");
        // A fiber thread of its own, holding its slot: a short, bounded wait.
        std::thread::sleep(backoff.failed());
    }
}

/// What bounds one evaluation besides its call tree: the taint its nested calls leave, and
/// its time limit.
struct Bounds {
    taint: Taint,
    limit: Option<Duration>,
    /// When the limit runs out.
    deadline: Option<std::time::Instant>,
}

impl Bounds {
    fn of(core: &Arc<NodeCore>, registered: &Registered) -> Bounds {
        // The function's own limit (its attribute's, or this node's override), else the node's.
        let limit = core.policy_of(registered.name).and_then(|p| p.timeout_ms).map(Duration::from_millis);
        let deadline = limit.map(|limit| std::time::Instant::now() + limit);
        Bounds { taint: Taint::default(), limit, deadline }
    }

    /// Whether an evaluation that panicked may run again: its tree goes on, its time limit
    /// has not run out, and the node is not stopping.
    fn may_retry(&self, core: &NodeCore, request: &Request) -> bool {
        let past_deadline = self.deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline);
        core.work.trees.ended(request.budget.tree).is_none() && !past_deadline && !core.cancel.is_cancelled()
    }

    fn scope(&self, core: &Arc<NodeCore>, worker: &Arc<Worker>, request: &Request) -> Scope {
        Scope {
            core: core.clone(),
            worker: worker.clone(),
            id: request.id,
            budget: request.budget,
            taint: self.taint.clone(),
            deadline: self.deadline,
            function: request.function.clone(),
        }
    }

    fn overrun(&self, request: &Request) -> CallError {
        let limit_ms = self.limit.map_or(0, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX));
        CallError::TimeLimitExceeded { function: request.function.to_string(), limit_ms }
    }
}

fn panic_error(request: &Request, payload: Box<dyn std::any::Any + Send>) -> CallError {
    let message = if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    };
    super::panics::report(&request.function, &request.id, &message);
    CallError::Panic { function: request.function.to_string(), message }
}

/// An async evaluation that holds a slot while it runs and gives it back while it is
/// parked on nested requests (`nested > 0`), taking one again before it is polled.
struct Slotted<F> {
    inner: Pin<Box<F>>,
    permit: Option<OwnedSemaphorePermit>,
    semaphore: PollSemaphore,
    worker: Arc<Worker>,
    nested: Arc<AtomicUsize>,
    /// Counted in the worker's `waiting_for_slot`.
    waiting: bool,
}

impl<F> Slotted<F> {
    fn new(inner: F, permit: OwnedSemaphorePermit, worker: Arc<Worker>, nested: Arc<AtomicUsize>) -> Slotted<F> {
        let semaphore = PollSemaphore::new(worker.semaphore.clone());
        Slotted { inner: Box::pin(inner), permit: Some(permit), semaphore, worker, nested, waiting: false }
    }
}

impl<F> Drop for Slotted<F> {
    fn drop(&mut self) {
        if self.waiting {
            self.worker.waiting_for_slot.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<F: Future<Output = ()>> Future for Slotted<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.permit.is_none() {
            match this.semaphore.poll_acquire(cx) {
                Poll::Ready(permit) => {
                    // `None` means the semaphore closed, which girder never does; run anyway.
                    this.permit = permit;
                    this.worker.note_busy();
                    if std::mem::take(&mut this.waiting) {
                        this.worker.waiting_for_slot.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                Poll::Pending => {
                    if !std::mem::replace(&mut this.waiting, true) {
                        this.worker.waiting_for_slot.fetch_add(1, Ordering::AcqRel);
                    }
                    return Poll::Pending;
                }
            }
        }
        let polled = {
            let _evaluating = super::panics::Evaluating::enter();
            this.inner.as_mut().poll(cx)
        };
        match polled {
            Poll::Ready(()) => {
                if let Some(permit) = this.permit.take() {
                    this.worker.release(permit);
                }
                Poll::Ready(())
            }
            Poll::Pending => {
                if this.nested.load(Ordering::Acquire) > 0 {
                    if let Some(permit) = this.permit.take() {
                        this.worker.release(permit);
                    }
                }
                Poll::Pending
            }
        }
    }
}
