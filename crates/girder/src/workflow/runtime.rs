//! The workflow runtime of one node: it runs the instances of the flocks this node is the
//! primary of, one task per flock reading that flock's mailbox in order and firing its
//! timers, and the forwarders of the subscriptions whose flock it is the primary of.
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

use super::record::{self, Instance, Outgoing, Status, Timer};
use super::timers::{self, Due};
use super::{
    inbox_of, instance_source, post, Effect, Envelope, Handler, Step, WorkflowError, Workflows, PUBLISH_RETENTION,
    STEP_ATTEMPTS_MAX, TIMERS_MAX,
};
use crate::placement::{Placement, FLOCKS};
use crate::retry::Backoff;
use crate::structures::Store;

/// The source name of messages sent to an instance.
pub const MAILBOX: &str = "mailbox";
/// The source name of timers firing.
pub const TIMER: &str = "timer";
/// Messages read from a mailbox or topic at once.
pub(crate) const READ_BATCH_MAX: usize = 256;
/// How long an idle flock waits for its mailbox's change notice before it reads again
/// (a notice that raced the read is caught no later than this).
pub(crate) const READ_WAIT_MS: u64 = 1_000;
/// How often the runtime looks at the placement table.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// Messages handled between two cursor moves.
const CURSOR_EVERY: u64 = 64;
/// Characters of a handler's error kept in a parked instance's record.
const ERROR_CHARS_MAX: usize = 4_096;
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
    /// Timers fired.
    pub timers_fired: u64,
    /// Sends and publishes of committed steps carried out.
    pub effects: u64,
    /// Topic messages forwarded into mailboxes by this node.
    pub forwarded: u64,
    /// Subscriptions whose forwarder runs here now.
    pub forwarders: u64,
    /// Instances claimed here since this node took their flocks.
    pub instances_owned: u64,
    /// Messages waiting, by source: `mailbox` (the mailboxes of the flocks run here, past
    /// what their tasks read) and `topic:{name}` (past what this node's forwarders copied).
    pub lag: std::collections::BTreeMap<String, u64>,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    handler_errors: AtomicU64,
    parked: AtomicU64,
    fenced: AtomicU64,
    timers_fired: AtomicU64,
    effects: AtomicU64,
    forwarded: Arc<AtomicU64>,
    /// From taking an input up to its commit.
    step_latency: crate::grid::metrics::Latency,
}

/// What a flock's task reports while it runs.
#[derive(Default)]
struct FlockGauges {
    /// Messages in the mailbox past what the task read.
    lag: AtomicU64,
    /// Instances the task claimed.
    claimed: AtomicU64,
}

/// A running flock task: the epoch it claims under (moved on by the supervisor when this
/// node stays the primary through a new table) and what it reports.
struct FlockTask {
    epoch: Arc<AtomicU64>,
    gauges: Arc<FlockGauges>,
    task: JoinHandle<()>,
}

/// A running forwarder and how far it lags.
struct ForwarderTask {
    lag: Arc<AtomicU64>,
    task: JoinHandle<()>,
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
    /// The running flock tasks.
    flocks: Mutex<HashMap<u32, FlockTask>>,
    /// The running forwarders, by subscription index.
    forwarders: Mutex<HashMap<usize, ForwarderTask>>,
}

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
            forwarders: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        node.add_metrics(Box::new(move |out, node| {
            let Some(inner) = weak.upgrade() else { return false };
            render(&inner, &stats_of(&inner), out, node);
            true
        }));
        let supervisor = tokio::spawn(supervise(inner.clone()));
        WorkflowRuntime { inner, supervisor }
    }

    /// Stops every flock's task (what they committed stands; the rest is handled by the
    /// next owner).
    pub fn shutdown(&self) {
        self.supervisor.abort();
        for (_, flock) in self.inner.flocks.lock().drain() {
            flock.task.abort();
        }
        for (_, forwarder) in self.inner.forwarders.lock().drain() {
            forwarder.task.abort();
        }
    }

    /// What the runtime did.
    pub fn stats(&self) -> WorkflowStats {
        stats_of(&self.inner)
    }
}

fn stats_of(inner: &Inner) -> WorkflowStats {
    let c = &inner.counters;
    let flocks = inner.flocks.lock();
    let mut lag = std::collections::BTreeMap::new();
    lag.insert(MAILBOX.to_owned(), flocks.values().map(|f| f.gauges.lag.load(Ordering::Relaxed)).sum());
    let subscriptions = inner.workflows.subscriptions();
    for (at, forwarder) in inner.forwarders.lock().iter() {
        if let Some(subscription) = subscriptions.get(*at) {
            let source = super::topic_source(&subscription.topic);
            *lag.entry(source).or_default() += forwarder.lag.load(Ordering::Relaxed);
        }
    }
    WorkflowStats {
        flocks_owned: flocks.len() as u64,
        steps: c.steps.load(Ordering::Relaxed),
        handler_errors: c.handler_errors.load(Ordering::Relaxed),
        parked: c.parked.load(Ordering::Relaxed),
        fenced: c.fenced.load(Ordering::Relaxed),
        timers_fired: c.timers_fired.load(Ordering::Relaxed),
        effects: c.effects.load(Ordering::Relaxed),
        forwarded: c.forwarded.load(Ordering::Relaxed),
        forwarders: inner.forwarders.lock().len() as u64,
        instances_owned: flocks.values().map(|f| f.gauges.claimed.load(Ordering::Relaxed)).sum(),
        lag,
    }
}

/// The runtime's metrics, beside its node's.
fn render(inner: &Inner, stats: &WorkflowStats, out: &mut crate::grid::metrics::Exposition, node: &str) {
    let families: [(&str, &str, &str, u64); 9] = [
        ("girder_workflow_flocks_owned", "gauge", "Flocks whose workflow instances run here.", stats.flocks_owned),
        (
            "girder_workflow_instances_owned",
            "gauge",
            "Instances claimed here since their flock came.",
            stats.instances_owned,
        ),
        ("girder_workflow_steps_total", "counter", "Steps committed.", stats.steps),
        (
            "girder_workflow_handler_errors_total",
            "counter",
            "Handler attempts that failed or panicked.",
            stats.handler_errors,
        ),
        ("girder_workflow_parked_total", "counter", "Instances parked after their last attempt.", stats.parked),
        ("girder_workflow_fenced_total", "counter", "Flocks left because a newer owner wrote.", stats.fenced),
        ("girder_workflow_timers_fired_total", "counter", "Timers fired.", stats.timers_fired),
        (
            "girder_workflow_effects_total",
            "counter",
            "Sends and publishes of committed steps carried out.",
            stats.effects,
        ),
        ("girder_workflow_forwarded_total", "counter", "Topic messages forwarded into mailboxes.", stats.forwarded),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        out.sample(name, &[("node", node)], value as f64);
    }
    let lag = "girder_workflow_lag_messages";
    out.family(lag, "gauge", "Messages waiting, by source (mailboxes of flocks run here; topics forwarded here).");
    for (source, waiting) in &stats.lag {
        out.sample(lag, &[("node", node), ("source", source)], *waiting as f64);
    }
    let latency = "girder_workflow_step_duration_seconds";
    out.family(latency, "histogram", "Time from taking an input to committing its step.");
    out.histogram(latency, node, &inner.counters.step_latency);
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
        flocks.retain(|_, running| !running.task.is_finished());
        for flock in 0..FLOCKS {
            let mine = lease_ok && table.owners_of(flock).next() == Some(inner.node.as_str());
            match (mine, flocks.get(&flock)) {
                (true, Some(running)) => {
                    running.epoch.fetch_max(table.epoch, Ordering::AcqRel);
                }
                (true, None) => {
                    let (epoch, gauges) = (Arc::new(AtomicU64::new(table.epoch)), Arc::new(FlockGauges::default()));
                    let task = tokio::spawn(run_flock(inner.clone(), flock, epoch.clone(), gauges.clone()));
                    flocks.insert(flock, FlockTask { epoch, gauges, task });
                }
                (false, Some(_)) => {
                    if let Some(running) = flocks.remove(&flock) {
                        running.task.abort();
                    }
                }
                (false, None) => {}
            }
        }
        drop(flocks);
        supervise_forwarders(&inner, &table, lease_ok);
    }
}

/// Starts the forwarder of each subscription whose flock this node is the primary of,
/// stops the others.
fn supervise_forwarders(inner: &Arc<Inner>, table: &crate::placement::FlockTable, lease_ok: bool) {
    let mut forwarders = inner.forwarders.lock();
    forwarders.retain(|_, running| !running.task.is_finished());
    for (at, subscription) in inner.workflows.subscriptions().iter().enumerate() {
        let flock = crate::placement::flock_of(super::forward::cursor_key(subscription).as_bytes());
        let mine = lease_ok && table.owners_of(flock).next() == Some(inner.node.as_str());
        match (mine, forwarders.contains_key(&at)) {
            (true, false) => {
                let (store, forwarded) = (inner.store.clone(), inner.counters.forwarded.clone());
                let lag = Arc::new(AtomicU64::new(0));
                let task = tokio::spawn(super::forward::run(store, subscription.clone(), forwarded, lag.clone()));
                forwarders.insert(at, ForwarderTask { lag, task });
            }
            (false, true) => {
                if let Some(running) = forwarders.remove(&at) {
                    running.task.abort();
                }
            }
            _ => {}
        }
    }
}

/// One flock's task: reads its mailbox from the cursor and hands each message on.
async fn run_flock(inner: Arc<Inner>, flock: u32, epoch: Arc<AtomicU64>, gauges: Arc<FlockGauges>) {
    let mut flock_run = FlockRun {
        inner: inner.clone(),
        flock,
        epoch,
        gauges,
        cached: lru_cache(),
        dirty: HashMap::new(),
        parked_min: None,
        due: Due::default(),
    };
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
    gauges: Arc<FlockGauges>,
    /// Decoded records with their versions, as this task last wrote or read them.
    cached: lru::LruCache<(String, String), (Instance, u64)>,
    /// Instances with steps handled but not committed yet, with the version their commit
    /// expects and how many steps it holds: committed together at the end of a batch (one
    /// round trip for them all), never evicted before.
    dirty: HashMap<(String, String), (Instance, u64, u64)>,
    /// The lowest mailbox sequence id waiting in a parked instance: the cursor stays below.
    parked_min: Option<u64>,
    /// The flock's timers by due time.
    due: Due,
}

/// One input to an instance: where it came from and its bytes.
struct Input<'a> {
    source: &'a str,
    seq: u64,
    /// Its place in the mailbox (0 for a timer).
    at: u64,
    message: &'a [u8],
}

impl FlockRun {
    async fn run(&mut self) -> Stop {
        let topic = inbox_of(self.flock);
        let cursor_key = format!("wf/cursor/{}", self.flock);
        let mut after = match cursor(&self.inner.store, &cursor_key).await {
            Ok(at) => at,
            Err(err) => return err.into(),
        };
        self.due = match Due::load(&self.inner.store, self.flock).await {
            Ok(due) => due,
            Err(err) => return err.into(),
        };
        let mut moved_at = after;
        loop {
            if let Err(stop) = self.flush().await {
                return stop;
            }
            if let Err(stop) = self.fire_due().await {
                return stop;
            }
            // A read that does not block, then a wait for the topic's change notice: no
            // connection of its own per flock (a blocking read would take one on Redis).
            let batch = match self.inner.store.reliable_read(&topic, after, READ_BATCH_MAX, 0).await {
                Ok(batch) => batch,
                Err(err) => return Stop::Failed(err.into()),
            };
            self.gauges.lag.store(batch.last.saturating_sub(after), Ordering::Relaxed);
            if batch.messages.is_empty() {
                let wait_ms =
                    self.due.wait_ms(crate::store::now_ms()).map_or(READ_WAIT_MS, |w| w.clamp(1, READ_WAIT_MS));
                self.inner.store.wait_change(&topic, wait_ms).await;
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
            // The cursor moves only past committed steps.
            if let Err(stop) = self.flush().await {
                return stop;
            }
            // Under load the cursor moves every CURSOR_EVERY messages; once the mailbox is
            // read to its end, at once (a new owner then starts where this one stopped).
            let safe = self.parked_min.map_or(after, |p| after.min(p.saturating_sub(1)));
            let caught_up = batch.last <= after;
            if safe >= moved_at + CURSOR_EVERY || (safe > moved_at && caught_up) {
                if let Err(err) = move_cursor(&self.inner.store, &cursor_key, moved_at, safe).await {
                    return err.into();
                }
                moved_at = safe;
            }
        }
    }

    /// Hands the mailbox message `seq` to its instance.
    async fn deliver(&mut self, seq: u64, bytes: &[u8]) -> Result<(), Stop> {
        let Ok(envelope) = rmp_serde::from_slice::<Envelope>(bytes) else {
            tracing::warn!(flock = self.flock, seq, "workflow: a mailbox message that is not an envelope, skipped");
            return Ok(());
        };
        let key = (envelope.workflow.clone(), envelope.id.clone());
        let (source, source_seq) = envelope.origin.clone().unwrap_or_else(|| (MAILBOX.to_owned(), seq));
        let input = Input { source: &source, seq: source_seq, at: seq, message: &envelope.message };
        self.handle(&key, &input).await
    }

    /// Fires every timer of the flock that is due.
    async fn fire_due(&mut self) -> Result<(), Stop> {
        while let Some((due_ms, (key, name))) = self.due.pop_due(crate::store::now_ms()) {
            let (instance, _) = self.owned(&key).await?;
            // The record is the truth: a timer moved, cancelled or fired since is not due.
            let Some(timer) = instance.timers.get(&name).filter(|t| t.due_ms == due_ms).cloned() else {
                if !instance.timers.contains_key(&name) {
                    timers::unindex(&self.inner.store, self.flock, &(key, name)).await?;
                }
                continue;
            };
            let source = format!("{TIMER}:{name}");
            self.handle(&key, &Input { source: &source, seq: timer.seq, at: 0, message: &timer.message }).await?;
            let (instance, _) = self.owned(&key).await?;
            if !instance.timers.contains_key(&name) {
                timers::unindex(&self.inner.store, self.flock, &(key, name)).await?;
                self.inner.counters.timers_fired.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Runs one input through its instance until a commit goes through.
    async fn handle(&mut self, key: &(String, String), input: &Input<'_>) -> Result<(), Stop> {
        let begun = std::time::Instant::now();
        loop {
            let (instance, version) = self.owned(key).await?;
            match self.step(key, instance, version, input).await? {
                Some(()) => {
                    self.inner.counters.step_latency.record(begun.elapsed());
                    return Ok(());
                }
                None => {
                    // Someone wrote the record meanwhile: read it again, and claim it again
                    // if this node still may. Steps held for it are gone with the commit: only
                    // a newer owner writes, and it handles them again.
                    self.cached.pop(key);
                    if self.dirty.remove(key).is_some() {
                        return Err(Stop::Fenced);
                    }
                }
            }
        }
    }

    /// The instance's record, claimed by this node under its epoch, its outbox carried out.
    async fn owned(&mut self, key: &(String, String)) -> Result<(Instance, u64), Stop> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some((instance, version, _)) = self.dirty.get(key) {
            if instance.epoch == epoch {
                return Ok((instance.clone(), *version));
            }
            // Claimed again under a newer epoch: commit what it holds first.
            self.flush().await?;
        }
        if let Some((instance, version)) = self.cached.get(key) {
            if instance.owner == self.inner.node && instance.epoch == epoch {
                return Ok((instance.clone(), *version));
            }
        }
        loop {
            let loaded = record::load(&self.inner.store, &key.0, &key.1).await?;
            let mut instance = loaded.instance.unwrap_or_else(Instance::new);
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
            instance.claims += 1;
            if !(self.inner.lease_ok)() {
                return Err(Stop::Fenced);
            }
            if loaded.version == 0 {
                // Listed before it exists: a listed id whose claim then fails is harmless.
                record::list_add(&self.inner.store, &key.0, &key.1).await?;
            }
            if let Some(version) = record::commit(&self.inner.store, &key.0, &key.1, loaded.version, &instance).await? {
                self.gauges.claimed.fetch_add(1, Ordering::Relaxed);
                // What the last owner committed but may not have carried out.
                let Some(version) = self.carry_out(key, &mut instance, version).await? else { continue };
                self.cached.put(key.clone(), (instance.clone(), version));
                return Ok((instance, version));
            }
        }
    }

    /// Runs one input through the instance and commits; `None` when the commit was
    /// refused (the record changed).
    async fn step(
        &mut self,
        key: &(String, String),
        mut instance: Instance,
        version: u64,
        input: &Input<'_>,
    ) -> Result<Option<()>, Stop> {
        let done = instance.positions.get(input.source).copied().unwrap_or(0);
        match &instance.status {
            Status::Finished => return Ok(Some(())),
            Status::Parked { at, seq, source, .. } => {
                let at = if *at == 0 && source == MAILBOX { *seq } else { *at };
                if at > 0 {
                    self.parked_min = Some(self.parked_min.map_or(at, |p| p.min(at)));
                }
                return Ok(Some(()));
            }
            // Timers are deduplicated by their removal from the record, not by position.
            Status::Running if input.at > 0 && input.seq <= done => return Ok(Some(())),
            Status::Running => {}
        }
        let Some(handler) = self.inner.workflows.get(&key.0).cloned() else {
            let why = format!("no workflow type {:?} runs on node {}", key.0, self.inner.node);
            instance.status = parked(why, input);
            return self.commit(key, instance, version, input.at, true).await;
        };
        let applied = match self.attempts(handler, key, &instance, input).await {
            Ok((state, finished, effects)) => apply(&mut instance, input, state, finished, effects),
            Err(error) => Err(error),
        };
        let new_timers = match applied {
            Ok(new_timers) => new_timers,
            Err(error) => {
                instance.status = parked(error, input);
                return self.commit(key, instance, version, input.at, true).await;
            }
        };
        for (name, due_ms) in &new_timers {
            if let Err(err) = timers::index(&self.inner.store, self.flock, &(key.clone(), name.clone()), *due_ms).await
            {
                return self.refuse(key, version, input, err).await;
            }
        }
        let Some(()) = self.commit(key, instance, version, input.at, false).await? else { return Ok(None) };
        for (name, due_ms) in new_timers {
            self.due.push(due_ms, (key.clone(), name));
        }
        Ok(Some(()))
    }

    /// Parks the instance of `key` on `input` because `err` keeps its step from committing.
    async fn refuse(
        &mut self,
        key: &(String, String),
        version: u64,
        input: &Input<'_>,
        err: WorkflowError,
    ) -> Result<Option<()>, Stop> {
        let WorkflowError::Invalid(why) = err else { return Err(Stop::Failed(err)) };
        let Some((mut instance, _)) = self.current(key) else { return Ok(None) };
        instance.status = parked(why, input);
        self.commit(key, instance, version, input.at, true).await
    }

    /// Tries the handler up to [`STEP_ATTEMPTS_MAX`] times with backoff; its output and
    /// effects, or the last error.
    async fn attempts(
        &self,
        handler: Arc<dyn Handler>,
        key: &(String, String),
        instance: &Instance,
        input: &Input<'_>,
    ) -> Result<(Vec<u8>, bool, Vec<Effect>), String> {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut last = String::new();
        for attempt in 0..STEP_ATTEMPTS_MAX {
            let step = Step::new(&key.0, &key.1, input.source, input.seq, attempt, self.inner.client.clone());
            let effects = step.clone();
            let (handler, state, message) = (handler.clone(), instance.state.clone(), input.message.to_vec());
            // Its own task, so a panic is caught and reported, and the node lives.
            let ran = tokio::spawn(async move { handler.step(state.as_deref(), &message, &step).await }).await;
            last = match ran {
                Ok(Ok((state, finished))) => return Ok((state, finished, effects.take_effects())),
                Ok(Err(error)) => error,
                Err(join) if join.is_panic() => format!("the handler panicked: {}", panic_text(join)),
                Err(join) => format!("the handler task failed: {join}"),
            };
            self.inner.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(workflow = %key.0, id = %key.1, source = input.source, seq = input.seq, attempt,
                error = %last, "workflow: a step failed");
            if attempt + 1 < STEP_ATTEMPTS_MAX {
                tokio::time::sleep(backoff.failed()).await;
            }
        }
        Err(last)
    }

    async fn commit(
        &mut self,
        key: &(String, String),
        mut instance: Instance,
        version: u64,
        at: u64,
        parking: bool,
    ) -> Result<Option<()>, Stop> {
        // A plain step (no effects to carry out, no timer to set, a state that fits) waits
        // for the end of the batch, to be committed with the others in one round trip.
        // A timer's firing commits at once: its index entry goes right after.
        let plain = !parking
            && at > 0
            && instance.outbox.is_empty()
            && instance.state.as_ref().is_none_or(|s| s.len() <= super::STATE_BYTES_MAX)
            && self.current(key).is_some_and(|(before, _)| {
                // No timer set or moved (its index entry is written already, so the record
                // must hold it before a failover): cancelling or firing may wait.
                instance.timers.iter().all(|(name, timer)| before.timers.get(name) == Some(timer))
            });
        if plain {
            let steps = self.dirty.get(key).map_or(0, |(_, _, steps)| *steps) + 1;
            self.dirty.insert(key.clone(), (instance, version, steps));
            return Ok(Some(()));
        }
        // Commit only while the lease holds by this node's own clock: past it, another node
        // may own the flock.
        if !(self.inner.lease_ok)() {
            return Err(Stop::Fenced);
        }
        let held = self.dirty.remove(key).map_or(0, |(_, _, steps)| steps);
        let committed = match record::commit(&self.inner.store, &key.0, &key.1, version, &instance).await {
            Err(WorkflowError::Invalid(why)) if !parking => {
                // Too large to store: park on it rather than retry forever (with the steps
                // held before it).
                let Some((mut parked_instance, _)) = self.current(key) else { return Ok(None) };
                parked_instance.status = Status::Parked { error: why, source: String::new(), seq: 0, at };
                return Box::pin(self.commit(key, parked_instance, version, at, true)).await;
            }
            other => other?,
        };
        let Some(version) = committed else { return Ok(None) };
        self.inner.counters.steps.fetch_add(held, Ordering::Relaxed);
        let counter = if parking { &self.inner.counters.parked } else { &self.inner.counters.steps };
        counter.fetch_add(1, Ordering::Relaxed);
        if parking && at > 0 {
            self.parked_min = Some(self.parked_min.map_or(at, |p| p.min(at)));
        }
        let Some(version) = self.carry_out(key, &mut instance, version).await? else { return Ok(None) };
        self.cached.put(key.clone(), (instance, version));
        Ok(Some(()))
    }

    /// The instance as this task last wrote or read it, held steps included.
    fn current(&mut self, key: &(String, String)) -> Option<(Instance, u64)> {
        if let Some((instance, version, _)) = self.dirty.get(key) {
            return Some((instance.clone(), *version));
        }
        self.cached.get(key).cloned()
    }

    /// Commits the held steps of every instance at once (pipelined on Redis); a refused
    /// commit means a newer owner wrote: the task stops, and that owner handles them again.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        if !(self.inner.lease_ok)() {
            self.dirty.clear();
            return Err(Stop::Fenced);
        }
        let dirty: Vec<_> = self.dirty.drain().collect();
        let store = &self.inner.store;
        let commits =
            dirty.iter().map(|(key, (instance, version, _))| record::commit(store, &key.0, &key.1, *version, instance));
        let results = futures::future::join_all(commits).await;
        let mut fenced = false;
        for ((key, (instance, _, steps)), result) in dirty.into_iter().zip(results) {
            match result {
                Ok(Some(version)) => {
                    self.inner.counters.steps.fetch_add(steps, Ordering::Relaxed);
                    self.cached.put(key, (instance, version));
                }
                Ok(None) => {
                    self.cached.pop(&key);
                    fenced = true;
                }
                Err(err) => return Err(Stop::Failed(err)),
            }
        }
        if fenced {
            return Err(Stop::Fenced);
        }
        Ok(())
    }

    /// Carries out the committed outbox of `instance` (at `version`), then commits it
    /// empty; the new version, or `None` when a newer owner wrote the record meanwhile
    /// (it carries the outbox out again; receivers skip what they had).
    async fn carry_out(
        &self,
        key: &(String, String),
        instance: &mut Instance,
        version: u64,
    ) -> Result<Option<u64>, Stop> {
        if instance.outbox.is_empty() {
            return Ok(Some(version));
        }
        let store = &self.inner.store;
        for outgoing in &instance.outbox {
            match outgoing {
                Outgoing::Send { workflow, id, message, seq } => {
                    let origin = Some((instance_source(&key.0, &key.1), *seq));
                    let envelope =
                        Envelope { workflow: workflow.clone(), id: id.clone(), message: message.to_vec(), origin };
                    post(store, envelope).await?;
                }
                Outgoing::Publish { topic, message } => {
                    store.reliable_publish(topic, message, PUBLISH_RETENTION).await.map_err(WorkflowError::from)?;
                }
            }
            self.inner.counters.effects.fetch_add(1, Ordering::Relaxed);
        }
        instance.outbox.clear();
        if !(self.inner.lease_ok)() {
            return Err(Stop::Fenced);
        }
        Ok(record::commit(store, &key.0, &key.1, version, instance).await?)
    }
}

/// Puts a step's output into the instance: its state, its position, its effects. The
/// timers it set, with when they fall due; an error when it sets too many.
fn apply(
    instance: &mut Instance,
    input: &Input<'_>,
    state: Vec<u8>,
    finished: bool,
    effects: Vec<Effect>,
) -> Result<Vec<(String, u64)>, String> {
    instance.state = Some(Bytes::from(state));
    if input.at > 0 {
        instance.positions.insert(input.source.to_owned(), input.seq);
    } else if let Some(name) = input.source.strip_prefix(TIMER).and_then(|s| s.strip_prefix(':')) {
        // A timer fires by the commit that removes it.
        instance.timers.remove(name);
    }
    instance.handled += 1;
    if finished {
        instance.status = Status::Finished;
    }
    let mut new_timers = Vec::new();
    for effect in effects {
        match effect {
            Effect::Send { workflow, id, message } => {
                instance.sent += 1;
                instance.outbox.push(Outgoing::Send { workflow, id, message: message.into(), seq: instance.sent });
            }
            Effect::Publish { topic, message } => {
                instance.outbox.push(Outgoing::Publish { topic, message: message.into() })
            }
            Effect::SetTimer { name, due_ms, message } => {
                instance.timers_set += 1;
                let timer = Timer { due_ms, message: message.into(), seq: instance.timers_set };
                instance.timers.insert(name.clone(), timer);
                new_timers.retain(|(n, _)| *n != name);
                new_timers.push((name, due_ms));
            }
            Effect::CancelTimer { name } => {
                instance.timers.remove(&name);
                new_timers.retain(|(n, _)| *n != name);
            }
        }
    }
    if instance.timers.len() > TIMERS_MAX {
        return Err(format!("an instance has at most {TIMERS_MAX} timers set"));
    }
    Ok(new_timers)
}

fn parked(mut error: String, input: &Input<'_>) -> Status {
    if let Some((cut, _)) = error.char_indices().nth(ERROR_CHARS_MAX) {
        error.truncate(cut);
    }
    Status::Parked { error, source: input.source.to_owned(), seq: input.seq, at: input.at }
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
pub(crate) async fn cursor(store: &Store, key: &str) -> Result<u64, WorkflowError> {
    Ok(u64::try_from(store.counter_add(key, 0).await?).unwrap_or(0))
}

/// Moves the flock's cursor up to `to`, never down (a slower former owner may write late).
/// `from` is where this task last left the cursor: usually still there, so one round trip.
pub(crate) async fn move_cursor(store: &Store, key: &str, from: u64, to: u64) -> Result<(), WorkflowError> {
    let to = i64::try_from(to).unwrap_or(i64::MAX);
    let mut now = i64::try_from(from).unwrap_or(i64::MAX);
    loop {
        if now >= to || store.counter_cas(key, now, to).await? {
            return Ok(());
        }
        now = store.counter_add(key, 0).await?;
    }
}
