//! Calling functions: the [`Caller`] trait shared by [`Client`] and [`crate::Ctx`], the
//! typed helpers the `#[girder::function]` attribute generates calls to, and the dynamic
//! (name plus JSON) calls used by HTTP and the CLI.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::control::QueueId;
use crate::error::CallError;
use crate::grid::core::{CallLimits, NodeCore, Target};
use crate::grid::function::{encode_args, Function};
use crate::grid::inflight::{CallId, InFlightError, Registration};
use crate::request::{Budget, Outcome, Request};

/// Something that can send a request through the grid and wait for its outcome.
pub trait Caller: Send + Sync {
    /// Sends `request` and waits for its outcome.
    fn call_request(&self, request: Request) -> BoxFuture<'_, Outcome>;

    /// Sends `request` and blocks this thread until its outcome is there. Do not call it
    /// on an async runtime's thread; inside a blocking grid function it is the right call.
    fn call_request_blocking(&self, request: Request) -> Outcome;
}

fn decode_output<F: Function>(bytes: &[u8]) -> Result<F::Output, CallError> {
    codec::decode(bytes).map_err(|message| CallError::BadResult { function: F::NAME.to_owned(), message })
}

/// Calls `F` with `args` through `caller` and decodes its result.
pub async fn call<F: Function, C: Caller + ?Sized>(caller: &C, args: F::Args) -> Result<F::Output, CallError> {
    let request = Request::new(F::NAME, F::VERSION, encode_args::<F>(&args)?);
    let bytes = caller.call_request(request).await?;
    decode_output::<F>(&bytes)
}

/// Calls `F` with `args` through `caller`, blocking this thread until the result is there.
pub fn call_blocking<F: Function, C: Caller + ?Sized>(caller: &C, args: F::Args) -> Result<F::Output, CallError> {
    let request = Request::new(F::NAME, F::VERSION, encode_args::<F>(&args)?);
    let bytes = caller.call_request_blocking(request)?;
    decode_output::<F>(&bytes)
}

/// A top-level caller: submits requests at the back of a pool's queue.
#[derive(Clone)]
pub struct Client {
    core: Arc<NodeCore>,
    /// The pool queue calls go to; `None` on a node that declared no pool.
    queue: Option<QueueId>,
    deadline: Option<Duration>,
    affinity: Option<Arc<str>>,
    /// Affinity that waits for an owner rather than run elsewhere ([`Client::run_on`]).
    strict: bool,
    limits: Option<CallLimits>,
    /// Cancelled when the call this client makes is cancelled by id.
    cancel: Option<CancellationToken>,
}

impl Client {
    pub(crate) fn new(core: Arc<NodeCore>, queue: Option<QueueId>) -> Client {
        Client { core, queue, deadline: None, affinity: None, strict: false, limits: None, cancel: None }
    }

    /// Starts a call of `F` with `args` under a new call id, in a task of its own, and
    /// returns its handle: await it for the result, or cancel it (also by id, with
    /// [`Client::cancel`], from anywhere that has this node's client). Dropping the handle
    /// cancels the call too.
    pub fn spawn<F: Function>(&self, args: F::Args) -> Result<Call<F::Output>, InFlightError> {
        self.spawn_with_id::<F>(CallId::random(), args)
    }

    /// [`Client::spawn`] under an id of the caller's choosing; fails when a call with that
    /// id is in flight on this node.
    pub fn spawn_with_id<F: Function>(&self, id: CallId, args: F::Args) -> Result<Call<F::Output>, InFlightError> {
        let registration = self.register(id.clone())?;
        let client = self.cancellable(&registration);
        let task = self.core.handle.spawn(async move {
            let _registration = registration;
            call::<F, Client>(&client, args).await
        });
        Ok(Call { id, function: F::NAME, task: Some(task), core: self.core.clone() })
    }

    /// Cancels the call `id` in flight on this node: its caller gets
    /// [`CallError::Cancelled`] at once, and its request and the nested requests nobody
    /// else waits for stop on every node. False when no call with that id is in flight here.
    pub fn cancel(&self, id: &CallId) -> bool {
        self.core.calls.in_flight.cancel(id)
    }

    /// Registers a call under `id` on this node, for [`Client::cancellable`].
    pub(crate) fn register(&self, id: CallId) -> Result<Registration, InFlightError> {
        self.core.calls.in_flight.register(id)
    }

    /// A client whose calls end with [`CallError::Cancelled`] when `registration`'s call
    /// is cancelled.
    pub(crate) fn cancellable(&self, registration: &Registration) -> Client {
        Client { cancel: Some(registration.token().clone()), ..self.clone() }
    }

    /// The node this client calls through.
    pub(crate) fn core(&self) -> &Arc<NodeCore> {
        &self.core
    }

    /// A client whose call trees have at most these limits (each capped by the node's own,
    /// see [`crate::NodeBuilder::call_limits`]). Past them a call fails with
    /// [`CallError::BudgetExceeded`].
    pub fn with_limits(&self, limits: CallLimits) -> Client {
        Client { limits: Some(limits), ..self.clone() }
    }

    /// `request` as the root of a new call tree with this client's limits.
    fn rooted(&self, request: Request) -> Request {
        let node = self.core.work.limits;
        let asked = self.limits.unwrap_or(node);
        let budget = Budget::root(asked.requests_max.min(node.requests_max), asked.depth_max.min(node.depth_max));
        request.with_budget(budget)
    }

    /// A client whose calls give up after `deadline` with [`CallError::DeadlineExceeded`].
    pub fn with_deadline(&self, deadline: Duration) -> Client {
        Client { deadline: Some(deadline), ..self.clone() }
    }

    /// A client whose calls run on a node owning `key`'s flock (or its `init` placement)
    /// when one of them has a free slot, and anywhere else when none has: the data is
    /// local where possible, and nothing waits for a busy or dead owner.
    pub fn with_affinity(&self, key: impl Into<Arc<str>>) -> Client {
        Client { affinity: Some(key.into()), strict: false, ..self.clone() }
    }

    /// A client whose calls run on a node that holds `bucket` (an owner of its flock),
    /// queueing at the least loaded one when all are busy, so that the function reads the
    /// bucket locally ([`crate::Ctx::local_bucket`]). Calls go anywhere only when no owner
    /// serves the function.
    pub fn run_on(&self, bucket: impl Into<Arc<str>>) -> Client {
        Client { affinity: Some(bucket.into()), strict: true, ..self.clone() }
    }

    /// Calls the function `name` with JSON arguments (an array, one element per parameter)
    /// and returns its result as JSON. The version comes from this node's registry, or from
    /// the statekeeper's directory when this node does not serve the function.
    pub async fn call_json(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value, CallError> {
        let version = self.version_of(name).await?;
        self.call_json_version(name, version, args).await
    }

    /// The version of `name` calls use: this node's, else the statekeeper directory's.
    pub(crate) async fn version_of(&self, name: &str) -> Result<u32, CallError> {
        if let Some(version) = self.core.registry.version_of(name) {
            return Ok(version);
        }
        match self.core.statekeeper.function_version(name).await {
            Ok(Some(version)) => Ok(version),
            Ok(None) => Err(CallError::UnknownFunction { function: name.to_owned() }),
            Err(err) => Err(CallError::statekeeper(name, &err)),
        }
    }

    /// [`Client::call_json`] of a known version.
    pub(crate) async fn call_json_version(
        &self,
        name: &str,
        version: u32,
        args: &serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let encoded = codec::json_args_to_msgpack(args)
            .map_err(|message| CallError::BadArguments { function: name.to_owned(), message })?;
        if let Some(registered) = self.core.registry.get(name) {
            // Known here: bad arguments are refused before anything is submitted or waited
            // for, so they are a bad request whatever the deadline.
            registered.function.check_args(&encoded)?;
        }
        let bytes = self.call_request(Request::new(name, version, encoded)).await?;
        codec::msgpack_to_json(&bytes).map_err(|message| CallError::BadResult { function: name.to_owned(), message })
    }

    /// Where a call of `function` goes: an owner's worker for affinity calls that have
    /// one free, the client's pool otherwise.
    fn queue_for(&self, function: &str) -> Result<QueueId, CallError> {
        let placement = &self.core.membership.placement;
        let affine = self.affinity.as_deref().and_then(|key| {
            let free = placement.affinity_worker(key, function);
            free.or_else(|| if self.strict { placement.holder_worker(key, function) } else { None })
        });
        match (affine, &self.queue) {
            (Some(worker), _) => Ok(QueueId::worker(&worker)),
            (None, Some(queue)) => Ok(queue.clone()),
            (None, None) => Err(CallError::NoPool { function: function.to_owned() }),
        }
    }
}

impl Caller for Client {
    fn call_request(&self, request: Request) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            let begun = std::time::Instant::now();
            let queue = self.queue_for(&request.function)?;
            let request = self.rooted(request);
            let target = Target { queue: &queue, front: false };
            // Each branch makes its own call future: one made before the `match` would be
            // moved (kilobytes) on every call, the common uncancellable one included.
            let outcome = match &self.cancel {
                None => self.core.call_root(request, target, self.deadline).await,
                Some(cancel) => {
                    let function = request.function.clone();
                    tokio::select! {
                        outcome = self.core.call_root(request, target, self.deadline) => outcome,
                        // Dropping the call withdraws this caller (see `NodeCore::call_root`).
                        () = cancel.cancelled() => Err(CallError::Cancelled { function: function.to_string() }),
                    }
                }
            };
            self.core.calls.latency.record(begun.elapsed());
            outcome
        })
    }

    fn call_request_blocking(&self, request: Request) -> Outcome {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(CallError::BlockingInAsync { function: request.function.to_string() });
        }
        self.core.handle.block_on(self.call_request(request))
    }
}

/// A call started with [`Client::spawn`]: a future of its result that can be cancelled.
/// Dropping it cancels the call.
#[must_use = "dropping a Call cancels it"]
pub struct Call<T> {
    id: CallId,
    function: &'static str,
    task: Option<tokio::task::JoinHandle<Result<T, CallError>>>,
    core: Arc<NodeCore>,
}

impl<T> Call<T> {
    /// The call's id, for [`Client::cancel`].
    pub fn id(&self) -> &CallId {
        &self.id
    }

    /// Cancels the call (see [`Client::cancel`]); awaiting it then gives
    /// [`CallError::Cancelled`] unless its result was already there.
    pub fn cancel(&self) {
        self.core.calls.in_flight.cancel(&self.id);
    }
}

impl<T> std::future::Future for Call<T> {
    type Output = Result<T, CallError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        // A task that is gone (polled after its result, or its runtime shut down) has no
        // result to give.
        let function = self.function;
        let shutdown = || Err(CallError::Shutdown { function: function.to_owned() });
        let Some(task) = self.task.as_mut() else {
            return std::task::Poll::Ready(shutdown());
        };
        let result = futures::ready!(std::pin::Pin::new(task).poll(cx));
        self.task = None;
        std::task::Poll::Ready(result.unwrap_or_else(|_| shutdown()))
    }
}

impl<T> Drop for Call<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the call's future withdraws it, as for any dropped call.
            task.abort();
        }
    }
}
