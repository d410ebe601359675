//! The workflow runtime of one node: it runs the instances of the flocks this node is the
//! primary of, one task per flock reading that flock's mailbox in order.
//!
//! A flock's task reads from the flock's cursor (`wf/cursor/{flock}`: every message at or
//! below it was handled, or waits in a parked instance that is at or below it too), hands
//! each message to its instance, and moves the cursor on now and then. Instances of one
//! flock run one after the other; flocks run in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::record::{self, Instance, Status};
use super::{inbox_of, Envelope, Handler, Step, WorkflowError, Workflows, STEP_ATTEMPTS_MAX};
use crate::placement::{Placement, FLOCKS};
use crate::retry::Backoff;
use crate::structures::Store;

/// The source name of messages sent to an instance.
pub const MAILBOX: &str = "mailbox";
/// Messages read from a mailbox at once.
const READ_BATCH_MAX: usize = 256;
/// How long an idle flock waits for its mailbox's change notice before it reads again
/// (a notice that raced the read is caught no later than this).
const READ_WAIT_MS: u64 = 1_000;
/// How often the runtime looks at the placement table.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// Messages handled between two cursor moves.
const CURSOR_EVERY: u64 = 64;
/// Instance records a flock's task keeps decoded.
const CACHED_MAX: usize = 4_096;

/// What the runtime did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkflowStats {
    /// Flocks whose instances run here now.
    pub flocks_owned: u64,
    /// Steps committed.
    pub steps: u64,
    /// Handler attempts that failed (errors and panics).
    pub handler_errors: u64,
    /// Instances parked here.
    pub parked: u64,
    /// Commits refused because a newer owner had written the record.
    pub fenced: u64,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    handler_errors: AtomicU64,
    parked: AtomicU64,
    fenced: AtomicU64,
}

struct Inner {
    node: String,
    store: Store,
    placement: Arc<Placement>,
    workflows: Workflows,
    client: crate::Client,
    /// Whether the node's lease holds by its own clock.
    lease_ok: Arc<dyn Fn() -> bool + Send + Sync>,
    counters: Counters,
    /// The running flock tasks, with the epoch each may claim under (moved on by the
    /// supervisor when this node stays the primary through a new table).
    flocks: Mutex<HashMap<u32, FlockTask>>,
}

/// A running flock task and the epoch it claims under.
type FlockTask = (Arc<AtomicU64>, JoinHandle<()>);

/// A node's workflow runtime; stops when shut down or dropped.
pub struct WorkflowRuntime {
    inner: Arc<Inner>,
    supervisor: JoinHandle<()>,
}

/// Why a flock's task stopped handling a message.
enum Stop {
    /// A newer owner wrote an instance, or this node's lease lapsed: leave the flock.
    Fenced,
    /// The statekeeper failed: try again later.
    Failed(WorkflowError),
}

impl From<WorkflowError> for Stop {
    fn from(err: WorkflowError) -> Stop {
        Stop::Failed(err)
    }
}

impl WorkflowRuntime {
    /// Starts running `workflows` on `node`.
    pub fn start(node: &crate::Node, workflows: Workflows) -> WorkflowRuntime {
        let lease_ok = node.lease_check();
        let inner = Arc::new(Inner {
            node: node.id().to_owned(),
            store: node.structures(),
            placement: node.placement(),
            workflows,
            client: node.client(),
            lease_ok,
            counters: Counters::default(),
            flocks: Mutex::new(HashMap::new()),
        });
        let supervisor = tokio::spawn(supervise(inner.clone()));
        WorkflowRuntime { inner, supervisor }
    }

    /// Stops every flock's task (what they committed stands; the rest is handled by the
    /// next owner).
    pub fn shutdown(&self) {
        self.supervisor.abort();
        for (_, (_, task)) in self.inner.flocks.lock().drain() {
            task.abort();
        }
    }

    /// What the runtime did.
    pub fn stats(&self) -> WorkflowStats {
        let c = &self.inner.counters;
        WorkflowStats {
            flocks_owned: self.inner.flocks.lock().len() as u64,
            steps: c.steps.load(Ordering::Relaxed),
            handler_errors: c.handler_errors.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
        }
    }
}

impl Drop for WorkflowRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a task for each flock this node became the primary of, stops the others.
async fn supervise(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    loop {
        tick.tick().await;
        let table = inner.placement.table();
        let lease_ok = (inner.lease_ok)();
        let mut flocks = inner.flocks.lock();
        flocks.retain(|_, (_, task)| !task.is_finished());
        for flock in 0..FLOCKS {
            let mine = lease_ok && table.owners_of(flock).next() == Some(inner.node.as_str());
            match (mine, flocks.get(&flock)) {
                (true, Some((epoch, _))) => {
                    epoch.fetch_max(table.epoch, Ordering::AcqRel);
                }
                (true, None) => {
                    let epoch = Arc::new(AtomicU64::new(table.epoch));
                    let task = tokio::spawn(run_flock(inner.clone(), flock, epoch.clone()));
                    flocks.insert(flock, (epoch, task));
                }
                (false, Some(_)) => {
                    if let Some((_, task)) = flocks.remove(&flock) {
                        task.abort();
                    }
                }
                (false, None) => {}
            }
        }
    }
}

/// One flock's task: reads its mailbox from the cursor and hands each message on.
async fn run_flock(inner: Arc<Inner>, flock: u32, epoch: Arc<AtomicU64>) {
    let mut flock_run = FlockRun { inner: inner.clone(), flock, epoch, cached: lru_cache(), parked_min: None };
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(2));
    loop {
        match flock_run.run().await {
            Stop::Fenced => {
                inner.counters.fenced.fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %inner.node, flock, "workflow: a newer owner took the flock");
                return;
            }
            Stop::Failed(err) => {
                tracing::warn!(node = %inner.node, flock, error = %err, "workflow: flock stopped, retrying");
                tokio::time::sleep(backoff.failed()).await;
            }
        }
    }
}

fn lru_cache() -> lru::LruCache<(String, String), (Instance, u64)> {
    lru::LruCache::new(std::num::NonZeroUsize::new(CACHED_MAX).unwrap_or(std::num::NonZeroUsize::MIN))
}

struct FlockRun {
    inner: Arc<Inner>,
    flock: u32,
    epoch: Arc<AtomicU64>,
    /// Decoded records with their versions, as this task last wrote or read them.
    cached: lru::LruCache<(String, String), (Instance, u64)>,
    /// The lowest mailbox sequence id waiting in a parked instance: the cursor stays below.
    parked_min: Option<u64>,
}

impl FlockRun {
    async fn run(&mut self) -> Stop {
        let topic = inbox_of(self.flock);
        let cursor_key = format!("wf/cursor/{}", self.flock);
        let mut after = match cursor(&self.inner.store, &cursor_key).await {
            Ok(at) => at,
            Err(err) => return err.into(),
        };
        let mut moved_at = after;
        loop {
            // A read that does not block, then a wait for the topic's change notice: no
            // connection of its own per flock (a blocking read would take one on Redis).
            let batch = match self.inner.store.reliable_read(&topic, after, READ_BATCH_MAX, 0).await {
                Ok(batch) => batch,
                Err(err) => return Stop::Failed(err.into()),
            };
            if batch.messages.is_empty() {
                self.inner.store.wait_change(&topic, READ_WAIT_MS).await;
                continue;
            }
            if batch.first_retained > after + 1 && after > 0 {
                tracing::error!(
                    flock = self.flock,
                    after,
                    first = batch.first_retained,
                    "workflow: mailbox messages were trimmed before they were handled"
                );
            }
            for (seq, bytes) in batch.messages {
                if let Err(stop) = self.deliver(seq, &bytes).await {
                    return stop;
                }
                after = seq;
            }
            let safe = self.parked_min.map_or(after, |p| after.min(p.saturating_sub(1)));
            if safe >= moved_at + CURSOR_EVERY || (safe > moved_at && after == safe) {
                if let Err(err) = move_cursor(&self.inner.store, &cursor_key, safe).await {
                    return err.into();
                }
                moved_at = safe;
            }
        }
    }

    /// Hands the message `seq` to its instance.
    async fn deliver(&mut self, seq: u64, bytes: &[u8]) -> Result<(), Stop> {
        let Ok(envelope) = rmp_serde::from_slice::<Envelope>(bytes) else {
            tracing::warn!(flock = self.flock, seq, "workflow: a mailbox message that is not an envelope, skipped");
            return Ok(());
        };
        let key = (envelope.workflow.clone(), envelope.id.clone());
        loop {
            let (instance, version) = self.owned(&key).await?;
            match self.step(&key, instance, version, seq, &envelope.message).await? {
                Some(()) => return Ok(()),
                None => {
                    // Someone wrote the record meanwhile: read it again, and claim it again
                    // if this node still may.
                    self.cached.pop(&key);
                }
            }
        }
    }

    /// The instance's record, claimed by this node under its epoch.
    async fn owned(&mut self, key: &(String, String)) -> Result<(Instance, u64), Stop> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some((instance, version)) = self.cached.get(key) {
            if instance.owner == self.inner.node && instance.epoch == epoch {
                return Ok((instance.clone(), *version));
            }
        }
        loop {
            let loaded = record::load(&self.inner.store, &key.0, &key.1).await?;
            let mut instance = loaded.instance.unwrap_or_else(|| Instance {
                state: None,
                positions: Default::default(),
                owner: String::new(),
                epoch: 0,
                handled: 0,
                status: Status::Running,
            });
            if instance.epoch > epoch
                || (instance.epoch == epoch && instance.owner != self.inner.node && !instance.owner.is_empty())
            {
                return Err(Stop::Fenced);
            }
            if instance.owner == self.inner.node && instance.epoch == epoch {
                self.cached.put(key.clone(), (instance.clone(), loaded.version));
                return Ok((instance, loaded.version));
            }
            instance.owner = self.inner.node.clone();
            instance.epoch = epoch;
            if !(self.inner.lease_ok)() {
                return Err(Stop::Fenced);
            }
            if let Some(version) = record::commit(&self.inner.store, &key.0, &key.1, loaded.version, &instance).await? {
                self.cached.put(key.clone(), (instance.clone(), version));
                return Ok((instance, version));
            }
        }
    }

    /// Runs one message through the instance and commits; `None` when the commit was
    /// refused (the record changed).
    async fn step(
        &mut self,
        key: &(String, String),
        mut instance: Instance,
        version: u64,
        seq: u64,
        message: &[u8],
    ) -> Result<Option<()>, Stop> {
        let done = instance.positions.get(MAILBOX).copied().unwrap_or(0);
        match &instance.status {
            Status::Finished => return Ok(Some(())),
            Status::Parked { seq: at, .. } => {
                self.parked_min = Some(self.parked_min.map_or(*at, |p| p.min(*at)));
                return Ok(Some(()));
            }
            Status::Running if seq <= done => return Ok(Some(())),
            Status::Running => {}
        }
        let Some(handler) = self.inner.workflows.get(&key.0).cloned() else {
            instance.status = parked(format!("no workflow type {:?} runs on node {}", key.0, self.inner.node), seq);
            return self.commit(key, instance, version, seq, true).await;
        };
        match self.attempts(handler, key, &instance, seq, message).await {
            Ok((state, finished)) => {
                instance.state = Some(Bytes::from(state));
                instance.positions.insert(MAILBOX.to_owned(), seq);
                instance.handled += 1;
                if finished {
                    instance.status = Status::Finished;
                }
                self.commit(key, instance, version, seq, false).await
            }
            Err(error) => {
                instance.status = parked(error, seq);
                self.commit(key, instance, version, seq, true).await
            }
        }
    }

    /// Tries the handler up to [`STEP_ATTEMPTS_MAX`] times with backoff; its output, or the
    /// last error.
    async fn attempts(
        &self,
        handler: Arc<dyn Handler>,
        key: &(String, String),
        instance: &Instance,
        seq: u64,
        message: &[u8],
    ) -> Result<(Vec<u8>, bool), String> {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut last = String::new();
        for attempt in 0..STEP_ATTEMPTS_MAX {
            let step = Step {
                workflow: key.0.clone(),
                id: key.1.clone(),
                source: MAILBOX.to_owned(),
                seq,
                attempt,
                client: Some(self.inner.client.clone()),
            };
            let (handler, state, message) = (handler.clone(), instance.state.clone(), message.to_vec());
            // Its own task, so a panic is caught and reported, and the node lives.
            let ran = tokio::spawn(async move { handler.step(state.as_deref(), &message, &step).await }).await;
            last = match ran {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(error)) => error,
                Err(join) if join.is_panic() => format!("the handler panicked: {}", panic_text(join)),
                Err(join) => format!("the handler task failed: {join}"),
            };
            self.inner.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(workflow = %key.0, id = %key.1, seq, attempt, error = %last, "workflow: a step failed");
            if attempt + 1 < STEP_ATTEMPTS_MAX {
                tokio::time::sleep(backoff.failed()).await;
            }
        }
        Err(last)
    }

    async fn commit(
        &mut self,
        key: &(String, String),
        instance: Instance,
        version: u64,
        seq: u64,
        parking: bool,
    ) -> Result<Option<()>, Stop> {
        // Commit only while the lease holds by this node's own clock: past it, another node
        // may own the flock.
        if !(self.inner.lease_ok)() {
            return Err(Stop::Fenced);
        }
        match record::commit(&self.inner.store, &key.0, &key.1, version, &instance).await? {
            Some(version) => {
                let counter = if parking { &self.inner.counters.parked } else { &self.inner.counters.steps };
                counter.fetch_add(1, Ordering::Relaxed);
                if parking {
                    self.parked_min = Some(self.parked_min.map_or(seq, |p| p.min(seq)));
                }
                self.cached.put(key.clone(), (instance, version));
                Ok(Some(()))
            }
            None => Ok(None),
        }
    }
}

fn parked(error: String, seq: u64) -> Status {
    Status::Parked { error, source: MAILBOX.to_owned(), seq }
}

fn panic_text(join: tokio::task::JoinError) -> String {
    let panic = join.into_panic();
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

/// The flock's cursor (0 when never moved).
async fn cursor(store: &Store, key: &str) -> Result<u64, WorkflowError> {
    Ok(u64::try_from(store.counter_add(key, 0).await?).unwrap_or(0))
}

/// Moves the flock's cursor up to `to`, never down (a slower former owner may write late).
async fn move_cursor(store: &Store, key: &str, to: u64) -> Result<(), WorkflowError> {
    let to = i64::try_from(to).unwrap_or(i64::MAX);
    loop {
        let now = store.counter_add(key, 0).await?;
        if now >= to || store.counter_cas(key, now, to).await? {
            return Ok(());
        }
    }
}
