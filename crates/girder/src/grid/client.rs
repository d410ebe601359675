//! Calling functions: the [`Caller`] trait shared by [`Client`] and [`crate::Ctx`], the
//! typed helpers the `#[girder::function]` attribute generates calls to, and the dynamic
//! (name plus JSON) calls used by HTTP and the CLI.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::codec;
use crate::control::QueueId;
use crate::error::CallError;
use crate::grid::core::{CallLimits, NodeCore, Target};
use crate::grid::function::{encode_args, Function};
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
    limits: Option<CallLimits>,
}

impl Client {
    pub(crate) fn new(core: Arc<NodeCore>, queue: Option<QueueId>) -> Client {
        Client { core, queue, deadline: None, affinity: None, limits: None }
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
        Client { affinity: Some(key.into()), ..self.clone() }
    }

    /// Calls the function `name` with JSON arguments (an array, one element per parameter)
    /// and returns its result as JSON. The version comes from this node's registry, or from
    /// the statekeeper's directory when this node does not serve the function.
    pub async fn call_json(&self, name: &str, args: &serde_json::Value) -> Result<serde_json::Value, CallError> {
        let version = match self.core.registry.version_of(name) {
            Some(version) => version,
            None => match self.core.statekeeper.function_version(name).await {
                Ok(Some(version)) => version,
                Ok(None) => return Err(CallError::UnknownFunction { function: name.to_owned() }),
                Err(err) => return Err(CallError::statekeeper(name, &err)),
            },
        };
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
        let affine =
            self.affinity.as_deref().and_then(|key| self.core.membership.placement.affinity_worker(key, function));
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
            let outcome = self.core.call_root(request, Target { queue: &queue, front: false }, self.deadline).await;
            self.core.calls.latency.record(begun.elapsed());
            outcome
        })
    }

    fn call_request_blocking(&self, request: Request) -> Outcome {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(CallError::BlockingInAsync { function: request.function.to_string() });
        }
        let queue = self.queue_for(&request.function)?;
        let request = self.rooted(request);
        self.core.handle.block_on(self.core.call_root(request, Target { queue: &queue, front: false }, self.deadline))
    }
}
