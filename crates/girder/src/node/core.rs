//! What every role of a node shares, and the call path common to clients and functions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::waiters::Waiters;
use crate::error::CallError;
use crate::function::Registry;
use crate::request::{Outcome, Request};
use crate::statekeeper::{NodeId, QueueId, Statekeeper, Submitted};

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
}

/// The parts of a node that clients, workers and functions share.
pub(crate) struct NodeCore {
    pub(crate) id: NodeId,
    pub(crate) statekeeper: Arc<dyn Statekeeper>,
    pub(crate) registry: Registry,
    pub(crate) waiters: Waiters,
    pub(crate) handle: Handle,
    pub(crate) cancel: CancellationToken,
    pub(crate) counters: CallCounters,
    /// Evaluations started per function, by name.
    pub(crate) evaluations: HashMap<&'static str, AtomicU64>,
}

/// Where a call's request goes when it must be queued.
pub(crate) struct Target<'a> {
    pub(crate) queue: &'a QueueId,
    /// Nested calls go to the front of the caller's own queue (depth first).
    pub(crate) front: bool,
}

impl NodeCore {
    /// Looks up memoized results, then registers the caller and submits the request if no
    /// other local caller did. Returns the outcome now, or a receiver for it.
    pub(crate) async fn begin_call(
        &self,
        request: &Request,
        target: Target<'_>,
    ) -> Result<Outcome, oneshot::Receiver<Outcome>> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        match self.statekeeper.result(&request.id).await {
            Ok(Some(outcome)) => {
                self.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(outcome);
            }
            Ok(None) => {}
            Err(err) => return Ok(Err(CallError::statekeeper(&request.function, &err))),
        }
        let (rx, first) = self.waiters.register(request.id);
        if !first {
            self.counters.joined.fetch_add(1, Ordering::Relaxed);
            return Err(rx);
        }
        let submitted = self.statekeeper.submit(request, target.queue, target.front, &self.id).await;
        self.after_submit(request, submitted);
        Err(rx)
    }

    fn after_submit(&self, request: &Request, submitted: Result<Submitted, crate::error::StatekeeperError>) {
        let outcome = match submitted {
            Ok(Submitted::Queued) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Submitted::Joined) => {
                self.counters.joined.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Submitted::Done(outcome)) => {
                self.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
                outcome
            }
            Ok(Submitted::UnknownFunction) => {
                Err(CallError::UnknownFunction { function: request.function.to_string() })
            }
            Err(err) => Err(CallError::statekeeper(&request.function, &err)),
        };
        self.waiters.deliver(&request.id, &outcome);
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

    /// Records `outcome` as the result of `request`: memoizes it when it is a value, wakes
    /// the waiting nodes, and hands it to the callers waiting here.
    pub(crate) async fn complete(&self, request: &Request, outcome: Outcome) {
        let memoize = match &outcome {
            Ok(_) => true,
            Err(err) => err.is_memoizable(),
        };
        match self.statekeeper.complete(&request.id, &outcome, memoize, &self.id).await {
            Ok(true) => self.waiters.deliver(&request.id, &outcome),
            Ok(false) => {}
            Err(err) => {
                // Local callers learn it now; remote ones are re-served when the request's
                // lease runs out and it is evaluated again.
                tracing::error!(request = %request.id, function = %request.function, error = %err, "could not record an outcome");
                self.waiters.deliver(&request.id, &Err(CallError::statekeeper(&request.function, &err)));
            }
        }
    }

    pub(crate) fn count_evaluation(&self, function: &str) {
        if let Some(counter) = self.evaluations.get(function) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
