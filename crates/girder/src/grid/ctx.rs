//! [`Ctx`]: what a running function gets, to make nested requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::OwnedSemaphorePermit;

use super::core::{NodeCore, Target, CANCELLED_RETRIES_MAX};
use super::fiber;
use super::waiters::Callback;
use super::worker::{self, Worker};
use crate::control::QueueId;
use crate::error::CallError;
use crate::grid::client::{Caller, Client};
use crate::grid::function::FnKind;
use crate::id::ReqId;
use crate::request::{Budget, Outcome, Request};

enum Mode {
    /// Counts the nested requests the evaluation is parked on; the slot is given back
    /// while the count is above zero.
    Async(Arc<AtomicUsize>),
    /// The slot held by the evaluation, given back while it waits, and the fiber it runs on
    /// (see [`super::fiber`]), which suspends while it waits.
    Blocking { slot: Arc<Mutex<Option<OwnedSemaphorePermit>>>, fiber: Option<u64> },
}

/// The context of one evaluation: the handle a function uses to call other functions.
///
/// Nested requests go to the front of this worker's own queue, so the deepest work runs
/// first and idle workers can take the oldest from the far end (through the pool's helper).
/// In an `async` function use [`Caller`]'s async calls (e.g. `fib::call(&ctx, n).await`);
/// in a blocking function use the blocking ones (`fib::call_blocking(&ctx, n)`), which work
/// through this worker's queue on the function's own thread while they wait.
///
/// To run a function's body directly in a test (`fib::run(ctx, 10)`), make a context with
/// [`Ctx::for_tests`]: its nested calls are top-level calls through the node.
pub struct Ctx {
    core: Arc<NodeCore>,
    runs: Runs,
    /// The request being evaluated.
    id: ReqId,
    /// The budget of the request being evaluated; nested calls go one level deeper.
    budget: Budget,
    /// The first nested call that failed for a reason of the tree, not of its arguments.
    taint: Taint,
    /// When the evaluation's time limit runs out, if it has one.
    deadline: Option<std::time::Instant>,
    /// The function being evaluated.
    function: Arc<str>,
}

/// Where the evaluation runs.
enum Runs {
    /// On `worker`: nested calls go through its queue, and `mode` says what waiting gives back.
    Worker { worker: Arc<Worker>, mode: Mode },
    /// Outside any worker ([`Ctx::for_tests`]): nested calls are this client's top-level calls.
    Test(Client),
}

/// What [`Ctx::worker_id`] and the function name say for a context made for a test.
const TEST_WORKER: &str = "test";
const TEST_FUNCTION: &str = "test";

/// The first error of a nested call that says nothing about the function's arguments
/// (a budget, a cancellation): an error the evaluation returns after it is not its value
/// for these arguments, so it is replaced by this one and not memoized.
pub(crate) type Taint = Arc<Mutex<Option<CallError>>>;

/// What an evaluation's context is made of besides its mode.
pub(crate) struct Scope {
    pub(crate) core: Arc<NodeCore>,
    pub(crate) worker: Arc<Worker>,
    pub(crate) id: ReqId,
    pub(crate) budget: Budget,
    pub(crate) taint: Taint,
    pub(crate) deadline: Option<std::time::Instant>,
    pub(crate) function: Arc<str>,
}

impl Ctx {
    pub(crate) fn for_async(scope: Scope, nested: Arc<AtomicUsize>) -> Ctx {
        let Scope { core, worker, id, budget, taint, deadline, function } = scope;
        let runs = Runs::Worker { worker, mode: Mode::Async(nested) };
        Ctx { core, runs, id, budget, taint, deadline, function }
    }

    pub(crate) fn for_blocking(scope: Scope, slot: Arc<Mutex<Option<OwnedSemaphorePermit>>>) -> Ctx {
        let Scope { core, worker, id, budget, taint, deadline, function } = scope;
        let mode = Mode::Blocking { slot, fiber: fiber::current() };
        Ctx { core, runs: Runs::Worker { worker, mode }, id, budget, taint, deadline, function }
    }

    /// A context for calling a function's body directly, e.g. in a unit test:
    /// `fib::run(Ctx::for_tests(&node), 10).await`. It belongs to no call tree and is never
    /// cancelled; each nested call it makes is a top-level call through `node`'s
    /// [`crate::Node::client`], as if the test had called it itself (so it needs a node
    /// that declared a pool; see [`Ctx::for_client`] for another client).
    pub fn for_tests(node: &super::node::Node) -> Ctx {
        Ctx::for_client(node.client())
    }

    /// [`Ctx::for_tests`] with the nested calls made through `client`, e.g. one with a
    /// deadline, limits or another pool.
    pub fn for_client(client: Client) -> Ctx {
        Ctx {
            core: client.core().clone(),
            runs: Runs::Test(client),
            id: ReqId::of(TEST_FUNCTION, 0, &[]),
            budget: Budget::default(),
            taint: Taint::default(),
            deadline: None,
            function: Arc::from(TEST_FUNCTION),
        }
    }

    /// The bucket store, through the node this evaluation runs on.
    pub fn store(&self) -> Result<crate::store::ItemStore, crate::store::StoreError> {
        self.core.membership.farm.get().map(|farm| farm.store()).ok_or(crate::store::StoreError::NoStore)
    }

    /// `bucket` read from this node's own engine, without the network, pinned here while
    /// the handle lives: for functions called with [`crate::Client::run_on`]. Fails when
    /// this node does not hold the bucket completely.
    pub fn local_bucket(&self, bucket: &str) -> Result<crate::store::LocalBucket, crate::store::StoreError> {
        self.store()?.local_bucket(bucket)
    }

    /// Whether the grid gave up on this evaluation: nobody waits for its call tree any more
    /// (its callers left, or it went over its budget), or it ran past its time limit. A long
    /// blocking function should check it now and then and return early: its result is
    /// discarded anyway, and its nested calls fail at once. (An async function is simply
    /// dropped at its next await.)
    pub fn is_cancelled(&self) -> bool {
        self.core.work.trees.ended(self.tree()).is_some() || self.past_deadline()
    }

    /// The evaluation's call tree: its request's, or the one that adopted it when that
    /// ended while another caller waited for it.
    fn tree(&self) -> u64 {
        self.core.work.trees.tree_of(&self.id, self.budget.tree)
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline)
    }

    /// `Err(CallError::Cancelled)` once [`Ctx::is_cancelled`]: `ctx.check_cancelled()?` in a
    /// long blocking function returns early (whatever it returns then is discarded anyway).
    pub fn check_cancelled(&self) -> Result<(), CallError> {
        if self.is_cancelled() {
            return Err(CallError::Cancelled { function: self.function.to_string() });
        }
        Ok(())
    }

    /// The call tree this evaluation belongs to and its limits.
    pub fn budget(&self) -> Budget {
        Budget { tree: self.tree(), ..self.budget }
    }

    /// `request` as a nested call of this evaluation, or why it may not be made: the tree
    /// ended, or the call would be deeper than the tree may go.
    fn nest(&self, request: Request) -> Result<Request, CallError> {
        let budget = self.budget();
        if let Some(end) = self.core.work.trees.ended(budget.tree) {
            return Err(end.error(&request.function));
        }
        if self.past_deadline() {
            return Err(CallError::Cancelled { function: request.function.to_string() });
        }
        let budget = budget.nested(&request.function)?;
        Ok(request.with_budget(budget))
    }

    /// Whether a nested call that came back `outcome` is worth making again: it was
    /// dropped with another tree while ours still runs.
    fn retry(&self, outcome: &Outcome, attempts: &mut u32) -> bool {
        let dropped = matches!(outcome, Err(CallError::Cancelled { .. }));
        if dropped && *attempts < CANCELLED_RETRIES_MAX && !self.is_cancelled() {
            *attempts += 1;
            return true;
        }
        false
    }

    async fn call_async(&self, worker: &Arc<Worker>, mode: &Mode, request: Request) -> Outcome {
        let request = self.nest(request).inspect_err(|e| self.note(e))?;
        let mut attempts = 0;
        loop {
            let outcome = self.call_async_once(worker, mode, &request).await;
            if !self.retry(&outcome, &mut attempts) {
                return outcome.inspect_err(|e| self.note(e));
            }
        }
    }

    /// Remembers the first error of a nested call that is the tree's, not the function's.
    fn note(&self, error: &CallError) {
        if matches!(
            error,
            CallError::BudgetExceeded { .. } | CallError::Cancelled { .. } | CallError::TimeLimitExceeded { .. }
        ) {
            self.taint.lock().get_or_insert_with(|| error.clone());
        }
    }

    fn call_on_thread(&self, worker: &Arc<Worker>, mode: &Mode, request: Request) -> Outcome {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(CallError::BlockingInAsync { function: request.function.to_string() });
        }
        let request = self.nest(request).inspect_err(|e| self.note(e))?;
        let mut attempts = 0;
        loop {
            let outcome = self.call_on_thread_once(worker, mode, &request);
            if !self.retry(&outcome, &mut attempts) {
                return outcome.inspect_err(|e| self.note(e));
            }
        }
    }

    /// The id of the node running this evaluation.
    pub fn node_id(&self) -> &str {
        self.core.id.as_str()
    }

    /// The id of the worker running this evaluation (`test` for a [`Ctx::for_tests`]).
    pub fn worker_id(&self) -> &str {
        match &self.runs {
            Runs::Worker { worker, .. } => &worker.id,
            Runs::Test(_) => TEST_WORKER,
        }
    }

    /// Nested requests this node serves go to the front of our own queue; others to the
    /// back of our pool's queue, whose distributor hands them to a node that serves them.
    fn target<'a>(&self, worker: &'a Worker, request: &Request, pool_queue: &'a QueueId) -> Target<'a> {
        if self.core.registry.get(&request.function).is_some() {
            Target { queue: &worker.queue, front: true }
        } else {
            Target { queue: pool_queue, front: false }
        }
    }

    async fn call_async_once(&self, worker: &Worker, mode: &Mode, request: &Request) -> Outcome {
        let pool_queue = QueueId::pool(&worker.pool);
        let rx = match self.core.begin_call(request, self.target(worker, request, &pool_queue)).await {
            Ok(outcome) => return outcome,
            Err(rx) => rx,
        };
        if worker.semaphore.available_permits() == 0 {
            // Our queue grows while every slot is busy: an idle member may take some.
            self.core.work.hoist_hint.notify_waiters();
        }
        let nested = match mode {
            Mode::Async(nested) => Some(nested),
            // An async call from a blocking function's thread (through `block_on`) keeps its slot.
            Mode::Blocking { .. } => None,
        };
        if let Some(nested) = nested {
            nested.fetch_add(1, Ordering::AcqRel);
        }
        let outcome = self.core.finish_call(&request.function, rx, None).await;
        if let Some(nested) = nested {
            nested.fetch_sub(1, Ordering::AcqRel);
        }
        outcome
    }

    /// A nested call from a blocking function: submit to our own queue, run what is in it
    /// inline while the fiber's stack has room and the outcome is not there, then give the
    /// slot back and suspend the fiber until the outcome is there and a slot is free again.
    fn call_on_thread_once(&self, worker: &Arc<Worker>, mode: &Mode, request: &Request) -> Outcome {
        let core = &self.core;
        if core.cancel.is_cancelled() {
            return Err(CallError::Shutdown { function: request.function.to_string() });
        }
        let pool_queue = QueueId::pool(&worker.pool);
        let mut rx = match core.handle.block_on(core.begin_call(request, self.target(worker, request, &pool_queue))) {
            Ok(outcome) => return outcome,
            Err(rx) => rx,
        };
        let Mode::Blocking { slot, fiber } = mode else {
            // An async function's context used from a thread of the user's own.
            return core.handle.block_on(core.finish_call(&request.function, rx, None));
        };
        loop {
            match rx.try_recv() {
                Ok(outcome) => return outcome,
                Err(TryRecvError::Closed) => {
                    return Err(CallError::Shutdown { function: request.function.to_string() })
                }
                Err(TryRecvError::Empty) => {}
            }
            if !fiber::has_stack_room() || core.cancel.is_cancelled() {
                break;
            }
            let claimed = match core.handle.block_on(core.statekeeper.claim(&worker.queue, &core.id, 1)) {
                Ok(mut claimed) => claimed.pop(),
                Err(err) => {
                    tracing::warn!(worker = %worker.id, error = %err, "claim failed while waiting; suspending instead");
                    core.work.claims_uncertain.store(true, Ordering::Release);
                    None
                }
            };
            let Some(next) = claimed else { break };
            match core.registry.get(&next.function).cloned() {
                Some(registered) if registered.function.kind() == FnKind::Blocking => {
                    worker::account(core, worker, &next);
                    worker::run_blocking(core, worker, &registered, slot, next);
                }
                // Async work (or work we cannot run) goes to a task of its own, which takes a
                // slot when one is free.
                _ => worker::start_when_free(core, worker, next),
            }
        }
        // Nothing left to do here: give the slot back while waiting, take one again after.
        if let Some(permit) = slot.lock().take() {
            worker.release(permit);
        }
        let (outcome, permit) = match fiber.filter(|id| fiber::current() == Some(*id)) {
            Some(id) => self.suspend_for(worker, id, request, rx),
            None => {
                // Not on our fiber (the context was handed to a thread of the user's own):
                // that thread blocks.
                let outcome = core.handle.block_on(core.finish_call(&request.function, rx, None));
                (Some(outcome), core.handle.block_on(worker.acquire_woken()))
            }
        };
        *slot.lock() = permit;
        outcome.unwrap_or_else(|| Err(CallError::Shutdown { function: request.function.to_string() }))
    }

    /// Suspends fiber `id` until its outcome is there and a slot is free. Whoever delivers
    /// the outcome resumes the fiber at once when a slot is free; otherwise a task waits
    /// for one.
    fn suspend_for(
        &self,
        worker: &Arc<Worker>,
        id: u64,
        request: &Request,
        rx: tokio::sync::oneshot::Receiver<Outcome>,
    ) -> (Option<Outcome>, Option<OwnedSemaphorePermit>) {
        let (core, worker, function, req_id) =
            (self.core.clone(), worker.clone(), request.function.clone(), request.id);
        let arrange: fiber::Arrange = Box::new(move |wake: fiber::Wake| {
            let handle = core.handle.clone();
            let resume: Callback =
                Box::new(move |outcome: Outcome| match worker.semaphore.clone().try_acquire_owned() {
                    Ok(permit) => wake.send(outcome, Some(permit)),
                    Err(_) => {
                        handle.spawn(async move {
                            let permit = worker.acquire_woken().await;
                            wake.send(outcome, permit);
                        });
                    }
                });
            if let Err(resume) = core.calls.waiters.add_callback(&req_id, resume) {
                // Delivered meanwhile: the receiver has it, or is about to.
                core.handle.clone().spawn(async move {
                    let outcome = core.finish_call(&function, rx, None).await;
                    resume(outcome);
                });
            }
        });
        match fiber::suspend(id, arrange) {
            Some(resumed) => (resumed.outcome, resumed.permit),
            // Checked just before; unreachable, but no reason to panic over it.
            None => (None, None),
        }
    }
}

impl Caller for Ctx {
    fn call_request(&self, request: Request) -> BoxFuture<'_, Outcome> {
        match &self.runs {
            Runs::Worker { worker, mode } => Box::pin(self.call_async(worker, mode, request)),
            Runs::Test(client) => client.call_request(request),
        }
    }

    fn call_request_blocking(&self, request: Request) -> Outcome {
        match &self.runs {
            Runs::Worker { worker, mode } => self.call_on_thread(worker, mode, request),
            Runs::Test(client) => client.call_request_blocking(request),
        }
    }
}
