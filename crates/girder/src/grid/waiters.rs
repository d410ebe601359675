//! The node-local table of callers waiting for outcomes.
//!
//! The statekeeper only knows which *nodes* wait for a request; this table knows which
//! callers on this node do, so one notification reaches all of them, and so a second local
//! caller of a request already submitted from this node does not submit it again. It also
//! remembers how each request was submitted, so that requests waited on for long can be
//! submitted again: if the statekeeper lost them (a Redis restart without persistence) they
//! are queued anew, and if their function vanished their callers learn it.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::control::QueueId;
use crate::id::{IdMap, ReqId};
use crate::request::{Outcome, Request};

/// How a request was submitted, to submit it again.
#[derive(Clone)]
pub(crate) struct Submission {
    pub(crate) request: Request,
    pub(crate) queue: QueueId,
    pub(crate) front: bool,
}

/// A caller to hand an outcome to, however it waits.
enum Waiter {
    /// A task awaiting the receiver.
    Channel(oneshot::Sender<Outcome>),
    /// A suspended fiber's wake-up, called by whoever delivers the outcome: no task sits
    /// in between, so the fiber resumes one thread hop after the outcome is known.
    Callback(Callback),
}

/// What a waiting fiber does with its outcome.
pub(crate) type Callback = Box<dyn FnOnce(Outcome) + Send>;

impl Waiter {
    /// A receiver dropped means its caller stopped waiting; a callback always waits.
    fn is_waiting(&self) -> bool {
        match self {
            Waiter::Channel(sender) => !sender.is_closed(),
            Waiter::Callback(_) => true,
        }
    }
}

struct Entry {
    senders: Vec<Waiter>,
    submission: Submission,
    /// When the request was last submitted.
    submitted_at: Instant,
}

/// Callers waiting on this node, by request.
#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<IdMap<Entry>>,
}

impl Waiters {
    /// Registers a caller of `submission`. Returns its receiver and whether it must submit
    /// the request: the first local caller does (later ones only wait), and so does a caller
    /// of another call tree than the first's.
    pub(crate) fn register(&self, submission: &Submission) -> (oneshot::Receiver<Outcome>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut map = self.map.lock();
        let entry = map.entry(submission.request.id).or_insert_with(|| Entry {
            senders: Vec::new(),
            submission: submission.clone(),
            submitted_at: Instant::now(),
        });
        // Callers that gave up (deadline) left closed senders behind; they do not count.
        entry.senders.retain(Waiter::is_waiting);
        let first = entry.senders.is_empty();
        entry.senders.push(Waiter::Channel(tx));
        // A caller of another call tree joins at the statekeeper too, so that its tree adopts
        // the request should the first caller's tree end (see `Statekeeper::cancel_tree`).
        let (tree, joiner) = (entry.submission.request.budget.tree, submission.request.budget.tree);
        let submit = first || (tree != 0 && joiner != 0 && tree != joiner);
        (rx, submit)
    }

    /// Adds `callback` as a waiter of `id`, which already has one. Gives it back when `id`
    /// has none any more (its outcome was delivered meanwhile).
    pub(crate) fn add_callback(&self, id: &ReqId, callback: Callback) -> Result<(), Callback> {
        match self.map.lock().get_mut(id) {
            Some(entry) => {
                entry.senders.push(Waiter::Callback(callback));
                Ok(())
            }
            None => Err(callback),
        }
    }

    /// Hands `outcome` to every local caller of `id`.
    pub(crate) fn deliver(&self, id: &ReqId, outcome: &Outcome) {
        let entry = self.map.lock().remove(id);
        for waiter in entry.into_iter().flat_map(|e| e.senders) {
            match waiter {
                // A dropped receiver is a caller that stopped waiting; nothing to do.
                Waiter::Channel(sender) => {
                    let _ = sender.send(outcome.clone());
                }
                Waiter::Callback(callback) => callback(outcome.clone()),
            }
        }
    }

    /// Tells every local caller of `id` that it was dropped because its tree ended.
    pub(crate) fn deliver_dropped(&self, id: &ReqId, end: crate::control::TreeEnd) {
        let function = match self.map.lock().get(id) {
            Some(entry) => entry.submission.request.function.clone(),
            None => return,
        };
        self.deliver(id, &Err(end.error(&function)));
    }

    /// Forgets `id` when none of its local callers waits any more; returns whether it did
    /// (the node then withdraws from the request).
    pub(crate) fn forget_if_unwaited(&self, id: &ReqId) -> bool {
        let mut map = self.map.lock();
        let Some(entry) = map.get_mut(id) else { return false };
        entry.senders.retain(Waiter::is_waiting);
        if entry.senders.is_empty() {
            map.remove(id);
            return true;
        }
        false
    }

    /// Up to `max` submissions waited on for longer than `age`, marked as submitted now.
    /// Entries whose callers all gave up are dropped instead.
    pub(crate) fn overdue(&self, age: Duration, max: usize) -> Vec<Submission> {
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, entry| entry.senders.iter().any(Waiter::is_waiting));
        map.values_mut()
            .filter(|entry| now.duration_since(entry.submitted_at) >= age)
            .take(max)
            .map(|entry| {
                entry.submitted_at = now;
                entry.submission.clone()
            })
            .collect()
    }

    /// Number of requests with local callers.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Drops every waiting caller's sender; they see a closed channel.
    pub(crate) fn clear(&self) {
        self.map.lock().clear();
    }
}
