//! Blocking evaluations on stacks of their own (stackful coroutines, "fibers").
//!
//! A blocking function is plain synchronous code, so while it waits for a nested request
//! something must keep its stack. A thread per waiting evaluation is what broke before: a
//! chain of blocking calls 1,500 deep pinned 1,500 OS threads, or overflowed one thread's
//! stack when the children ran inline. Here each blocking evaluation runs as a coroutine
//! (`corosensei`) with its own stack, driven by a small set of *fiber threads* per worker,
//! at most one per slot. A fiber that must wait *suspends*: its thread is free at once to
//! start or resume other fibers, and a task of the runtime resumes the fiber once its
//! outcome is there and a slot is free. So any number of waiting blocking evaluations cost
//! their stacks' touched pages, never a thread.
//!
//! A fiber is always resumed on the thread that started it. Rust code may cache the address
//! of a thread-local across a call, so moving a suspended stack to another thread could
//! make it read another thread's thread-locals; pinning rules that out. The price is that a
//! woken fiber waits for its own thread when that thread is busy with another fiber, which
//! only delays it until that fiber finishes or suspends.
//!
//! This module knows nothing of the grid: it runs closures on fibers and lets code running
//! in one suspend with a closure that arranges its [`Wake`].

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use corosensei::stack::{DefaultStack, Stack};
use corosensei::{Coroutine, CoroutineResult, Yielder};
use parking_lot::{Condvar, Mutex};
use tokio::sync::OwnedSemaphorePermit;

use crate::request::Outcome;

/// Bytes of address space reserved for each fiber's stack; only touched pages use memory.
/// As much as a Rust thread gets by default, so user code needs no more care than on one.
pub(crate) const STACK_BYTES: usize = 2 * 1024 * 1024;
/// Nested blocking requests run inline on the caller's fiber only while at least this much
/// of its stack is left; below it they start on a fiber of their own, so no depth of
/// nesting overflows a stack.
pub(crate) const STACK_RED_ZONE_BYTES: usize = 512 * 1024;
/// Finished fibers' stacks kept per thread for reuse (saves an mmap and munmap per
/// evaluation); more are unmapped.
const STACKS_CACHED_MAX: usize = 16;

/// What a fiber gets when it is resumed: the outcome it waited for (`None` when whatever
/// was to wake it went away: the node is shutting down), and the slot it runs in (`None`
/// only when shutting down).
pub(crate) struct Resumed {
    pub(crate) outcome: Option<Outcome>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// Arranges for a suspended fiber to be resumed: called on the fiber's thread right after
/// the fiber suspended, with the [`Wake`] that resumes it.
pub(crate) type Arrange = Box<dyn FnOnce(Wake) + Send>;

type Fiber = Coroutine<Resumed, Arrange, (), DefaultStack>;
type FiberYielder = Yielder<Resumed, Arrange>;

/// Resumes one suspended fiber, once. Dropped unsent (its runtime went away, its task was
/// cancelled) it resumes the fiber with no outcome, so no fiber stays suspended for ever
/// and fiber threads can always finish.
pub(crate) struct Wake {
    shared: Arc<Shared>,
    thread: usize,
    fiber: u64,
    sent: bool,
}

impl Wake {
    /// Resumes the fiber with `outcome` in the slot `permit`.
    pub(crate) fn send(mut self, outcome: Outcome, permit: Option<OwnedSemaphorePermit>) {
        self.sent = true;
        self.shared.push_resume(self.thread, self.fiber, Resumed { outcome: Some(outcome), permit });
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.push_resume(self.thread, self.fiber, Resumed { outcome: None, permit: None });
        }
    }
}

/// A job: the body of a new fiber.
type Job = Box<dyn FnOnce() + Send>;

struct State {
    jobs: VecDeque<Job>,
    /// Fibers to resume, per thread (a fiber resumes on its own thread).
    resumes: Vec<VecDeque<(u64, Resumed)>>,
    /// Threads waiting for something to do.
    idle: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    name: Arc<str>,
}

impl Shared {
    fn push_resume(&self, thread: usize, fiber: u64, resumed: Resumed) {
        let mut state = self.state.lock();
        if let Some(queue) = state.resumes.get_mut(thread) {
            queue.push_back((fiber, resumed));
        }
        drop(state);
        // Only that thread can take it; wake them all (a handful) rather than track which.
        self.ready.notify_all();
    }
}

/// The fiber threads of one worker.
pub(crate) struct FiberPool {
    shared: Arc<Shared>,
}

impl FiberPool {
    /// A pool whose threads are named after `name` (the worker's id).
    pub(crate) fn new(name: Arc<str>) -> FiberPool {
        let state = State { jobs: VecDeque::new(), resumes: Vec::new(), idle: 0, closed: false };
        FiberPool { shared: Arc::new(Shared { state: Mutex::new(state), ready: Condvar::new(), name }) }
    }

    /// Runs `job` on a new fiber. The caller holds a slot for it, so at most `slots` jobs
    /// run at once and at most `slots` threads are ever started.
    pub(crate) fn start(&self, slots: usize, job: Job) {
        let mut state = self.shared.state.lock();
        state.jobs.push_back(job);
        let threads = state.resumes.len();
        if state.jobs.len() > state.idle && threads < slots.max(1) {
            state.resumes.push(VecDeque::new());
            drop(state);
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("girder-fiber-{}-{threads}", self.shared.name))
                .spawn(move || run_thread(&shared, threads));
            if let Err(err) = spawned {
                // Jobs still run on the threads there are; one more comes with the next job.
                tracing::error!(worker = %self.shared.name, error = %err, "cannot start a fiber thread");
                self.shared.state.lock().resumes.pop();
            }
        } else {
            drop(state);
            self.shared.ready.notify_all();
        }
    }

    /// Threads started so far.
    pub(crate) fn threads(&self) -> usize {
        self.shared.state.lock().resumes.len()
    }

    /// Lets the threads exit once they have no suspended fibers left.
    pub(crate) fn close(&self) {
        self.shared.state.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

impl Drop for FiberPool {
    fn drop(&mut self) {
        self.close();
    }
}

/// The fiber running on this thread now: its id, its yielder, and the lowest address its
/// stack may grow to.
#[derive(Clone, Copy)]
struct Current {
    fiber: u64,
    yielder: *const FiberYielder,
    limit: usize,
}

thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
}

/// The id of the fiber this code runs on, if it runs on one.
pub(crate) fn current() -> Option<u64> {
    CURRENT.with(|c| c.get()).map(|c| c.fiber)
}

/// Whether the current fiber has room to run more nested work inline on its stack.
pub(crate) fn has_stack_room() -> bool {
    let Some(current) = CURRENT.with(|c| c.get()) else { return false };
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as usize;
    sp.saturating_sub(current.limit) > STACK_RED_ZONE_BYTES
}

/// Suspends the fiber `fiber` (which must be the one running this code) until the
/// [`Wake`] handed to `arrange` is sent or dropped. Returns `None`, without calling
/// `arrange`, when this code does not run on that fiber.
pub(crate) fn suspend(fiber: u64, arrange: Arrange) -> Option<Resumed> {
    let current = CURRENT.with(|c| c.get()).filter(|c| c.fiber == fiber)?;
    CURRENT.with(|c| c.set(None));
    // SAFETY: `current.yielder` was set by this fiber's own body from the yielder it was
    // given, which lives as long as the fiber; we run on that fiber (the id matched, and
    // CURRENT is cleared whenever the fiber is not running on this thread).
    let resumed = unsafe { &*current.yielder }.suspend(arrange);
    CURRENT.with(|c| c.set(Some(current)));
    Some(resumed)
}

fn run_thread(shared: &Arc<Shared>, index: usize) {
    let mut parked: HashMap<u64, Fiber> = HashMap::new();
    let mut stacks: Vec<DefaultStack> = Vec::new();
    let mut next_id: u64 = 0;
    loop {
        let work = {
            let mut state = shared.state.lock();
            loop {
                if let Some(resume) = state.resumes[index].pop_front() {
                    break Some(Err(resume));
                }
                if let Some(job) = state.jobs.pop_front() {
                    break Some(Ok(job));
                }
                if state.closed && parked.is_empty() {
                    break None;
                }
                state.idle += 1;
                shared.ready.wait(&mut state);
                state.idle -= 1;
            }
        };
        let (fiber, mut co, input) = match work {
            None => return,
            Some(Ok(job)) => {
                let stack = match stacks.pop().map(Ok).unwrap_or_else(|| DefaultStack::new(STACK_BYTES)) {
                    Ok(stack) => stack,
                    Err(err) => {
                        // Out of address space or mappings: run the job on this thread's
                        // own stack instead; it cannot suspend, so it blocks if it waits.
                        tracing::error!(worker = %shared.name, error = %err, "cannot map a fiber stack");
                        job();
                        continue;
                    }
                };
                next_id += 1;
                let id = next_id;
                let limit = stack.limit().get();
                let co = Fiber::with_stack(stack, move |yielder: &FiberYielder, _first: Resumed| {
                    CURRENT.with(|c| c.set(Some(Current { fiber: id, yielder, limit })));
                    job();
                    CURRENT.with(|c| c.set(None));
                });
                (id, co, Resumed { outcome: None, permit: None })
            }
            Some(Err((id, resumed))) => match parked.remove(&id) {
                Some(co) => (id, co, resumed),
                None => continue,
            },
        };
        // Jobs catch their own panics; this only guards the thread against a bug in girder.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| co.resume(input)));
        CURRENT.with(|c| c.set(None));
        match result {
            Ok(CoroutineResult::Yield(arrange)) => {
                parked.insert(fiber, co);
                arrange(Wake { shared: shared.clone(), thread: index, fiber, sent: false });
            }
            Ok(CoroutineResult::Return(())) => {
                if stacks.len() < STACKS_CACHED_MAX {
                    stacks.push(co.into_stack());
                }
            }
            Err(_) => tracing::error!(worker = %shared.name, "a fiber panicked outside its evaluation"),
        }
    }
}
