//! [`Node`] and its builder: one process's share of the grid. It hosts workers, the
//! distributors and helpers of its pools, and the clients that submit work, all on one
//! statekeeper.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::core::{CallCounters, DeclaredPool, NodeCore};
use super::function::Registry;
use super::waiters::Waiters;
use super::worker::Worker;
use crate::control::{Embedded, NodeId, NodeInfo, PoolCounters, PoolId, QueueId, Statekeeper, WorkerInfo};
use crate::error::StatekeeperError;
use crate::lease::LocalLease;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The statekeeper refused or failed an operation.
    #[error(transparent)]
    Statekeeper(#[from] StatekeeperError),
    /// The node's configuration is inconsistent.
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// `start` was called outside a tokio runtime.
    #[error("a node must be started inside a tokio runtime")]
    NoRuntime,
}

/// A pool this node declares and serves roles for.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// The pool it volunteers at when idle.
    pub parent: Option<String>,
    /// Run this pool's distributor on this node.
    pub distributor: bool,
    /// Run a helper for this pool on this node, hoisting every `helper_interval_ms`.
    pub helper: bool,
    /// How often the helper looks for surplus work.
    pub helper_interval_ms: u64,
    /// Most requests one helper round copies up.
    pub hoist_max: usize,
}

impl PoolSpec {
    /// A top-level pool with a distributor and a helper.
    pub fn new(name: impl Into<String>) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            parent: None,
            distributor: true,
            helper: true,
            helper_interval_ms: 2,
            hoist_max: 64,
        }
    }

    /// Sets the parent pool.
    pub fn parent(mut self, parent: impl Into<String>) -> PoolSpec {
        self.parent = Some(parent.into());
        self
    }

    /// Turns the helper on or off.
    pub fn helper(mut self, on: bool) -> PoolSpec {
        self.helper = on;
        self
    }
}

/// Workers this node runs in one pool.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The pool the workers are members of.
    pub pool: String,
    /// How many workers.
    pub count: usize,
    /// Evaluation slots per worker: at most this many evaluations run at once on it.
    pub slots: usize,
    /// Requests taken ahead of free slots, to keep the worker busy between hand-offs
    /// (default: as many as it has slots).
    pub prefetch: u32,
}

impl WorkerSpec {
    /// `count` workers of `slots` slots in `pool`.
    pub fn new(pool: impl Into<String>, count: usize, slots: usize) -> WorkerSpec {
        WorkerSpec { pool: pool.into(), count, slots, prefetch: u32::try_from(slots).unwrap_or(u32::MAX) }
    }

    /// Sets the prefetch.
    pub fn prefetch(mut self, prefetch: u32) -> WorkerSpec {
        self.prefetch = prefetch;
        self
    }
}

/// Builds and starts a [`Node`].
pub struct NodeBuilder {
    id: String,
    registry: Registry,
    statekeeper: Option<Arc<dyn Statekeeper>>,
    pools: Vec<PoolSpec>,
    workers: Vec<WorkerSpec>,
    entry_pool: Option<String>,
    heartbeat_ms: u64,
    resubmit_ms: u64,
    http: Option<String>,
    settings: super::config::Settings,
}

/// Most slots a worker may have; a guard against typos, not a tuning limit.
pub const SLOTS_MAX: usize = 4_096;
/// Most workers one node may run.
pub const WORKERS_MAX: usize = 1_024;

impl NodeBuilder {
    /// Sets the node id (default: host, process id and a random suffix, so nodes started
    /// without one never collide). Ids are unique among live nodes.
    pub fn id(mut self, id: impl Into<String>) -> NodeBuilder {
        self.id = id.into();
        self
    }

    /// Sets the functions this node serves.
    pub fn registry(mut self, registry: Registry) -> NodeBuilder {
        self.registry = registry;
        self
    }

    /// Sets the statekeeper (default: a fresh [`Embedded`] one).
    pub fn statekeeper(mut self, statekeeper: Arc<dyn Statekeeper>) -> NodeBuilder {
        self.statekeeper = Some(statekeeper);
        self
    }

    /// Declares a pool; parents must be declared before their children.
    pub fn pool(mut self, pool: PoolSpec) -> NodeBuilder {
        self.pools.push(pool);
        self
    }

    /// Adds workers.
    pub fn workers(mut self, workers: WorkerSpec) -> NodeBuilder {
        self.workers.push(workers);
        self
    }

    /// Sets how often the node renews its lease, reports its state and reaps dead nodes
    /// (default 500 ms). Keep it well under the statekeeper's node TTL.
    pub fn heartbeat_ms(mut self, heartbeat_ms: u64) -> NodeBuilder {
        self.heartbeat_ms = heartbeat_ms.max(1);
        self
    }

    /// Sets how long a caller waits before its request is submitted again regardless of
    /// disruptions (default 30 s): a last resort that recovers requests a statekeeper lost
    /// without this node noticing.
    pub fn resubmit_ms(mut self, resubmit_ms: u64) -> NodeBuilder {
        self.resubmit_ms = resubmit_ms.max(1);
        self
    }

    /// Sets the CPU count this node reports and placement weighs it by (default: the
    /// machine's).
    pub fn cpus(mut self, cpus: u32) -> NodeBuilder {
        self.settings.cpus = Some(cpus.max(1));
        self
    }

    /// Sets this node's memory budget, reported and used by memory-weighted placement.
    pub fn max_memory_bytes(mut self, bytes: u64) -> NodeBuilder {
        self.settings.max_memory_bytes = Some(bytes);
        self
    }

    /// Records the address of this node's HTTP API, reported in its status.
    pub fn http_address(mut self, address: impl Into<String>) -> NodeBuilder {
        self.http = Some(address.into());
        self
    }

    /// Sets the pool whose queue [`Node::client`] submits to (default: the first pool).
    pub fn entry_pool(mut self, pool: impl Into<String>) -> NodeBuilder {
        self.entry_pool = Some(pool.into());
        self
    }

    fn validate(&self) -> Result<(), NodeError> {
        if self.id.is_empty() || self.id.contains(char::is_whitespace) {
            return Err(NodeError::Config(format!("node id {:?} must be non-empty and without spaces", self.id)));
        }
        let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
        for (i, pool) in self.pools.iter().enumerate() {
            if names[..i].contains(&pool.name.as_str()) {
                return Err(NodeError::Config(format!("pool {:?} is declared twice", pool.name)));
            }
            if let Some(parent) = &pool.parent {
                if !names[..i].contains(&parent.as_str()) {
                    return Err(NodeError::Config(format!(
                        "pool {:?} names parent {parent:?}, which must be declared before it",
                        pool.name
                    )));
                }
            }
        }
        let mut total = 0;
        for spec in &self.workers {
            if !names.contains(&spec.pool.as_str()) {
                return Err(NodeError::Config(format!("workers name pool {:?}, which is not declared", spec.pool)));
            }
            if spec.slots == 0 || spec.slots > SLOTS_MAX {
                return Err(NodeError::Config(format!("slots must be between 1 and {SLOTS_MAX}, got {}", spec.slots)));
            }
            total += spec.count;
        }
        if total > WORKERS_MAX {
            return Err(NodeError::Config(format!("at most {WORKERS_MAX} workers per node, got {total}")));
        }
        if let Some(entry) = &self.entry_pool {
            if !names.contains(&entry.as_str()) {
                return Err(NodeError::Config(format!("entry pool {entry:?} is not declared")));
            }
        }
        Ok(())
    }

    /// Registers the node, declares its pools and starts its roles.
    pub async fn start(self) -> Result<Node, NodeError> {
        self.validate()?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| NodeError::NoRuntime)?;
        let statekeeper = self.statekeeper.unwrap_or_else(|| Arc::new(Embedded::default()));
        let node_ttl = Duration::from_millis(statekeeper.node_ttl_ms());
        let id = NodeId::new(self.id);
        let evaluations = self.registry.names().into_iter().map(|(name, _)| (name, AtomicU64::new(0))).collect();
        let pools: Vec<DeclaredPool> = self
            .pools
            .iter()
            .map(|p| DeclaredPool { pool: PoolId::new(p.name.as_str()), parent: p.parent.as_deref().map(PoolId::new) })
            .collect();
        let mut workers = Vec::new();
        for spec in &self.workers {
            for _ in 0..spec.count {
                let worker_id: Arc<str> = format!("{id}/w{}", workers.len()).into();
                let pool = PoolId::new(spec.pool.as_str());
                workers.push(Arc::new(Worker::new(worker_id, pool, spec.slots, spec.prefetch)));
            }
        }
        let core = Arc::new(NodeCore {
            id: id.clone(),
            statekeeper: statekeeper.clone(),
            registry: self.registry,
            waiters: Waiters::default(),
            handle: handle.clone(),
            cancel: CancellationToken::new(),
            counters: CallCounters::default(),
            evaluations,
            pools,
            workers: workers.clone(),
            http: self.http,
            running: parking_lot::Mutex::default(),
            claims_uncertain: std::sync::atomic::AtomicBool::new(false),
            settings: parking_lot::Mutex::new(self.settings.clone()),
            base_settings: self.settings,
            heartbeat_ms: self.heartbeat_ms,
            latency: super::metrics::Latency::default(),
            placement: Arc::new(crate::placement::Placement::new(statekeeper.clone(), Some(id.to_string()))),
            draining: std::sync::atomic::AtomicBool::new(false),
            hoist_hint: tokio::sync::Notify::new(),
            lease: parking_lot::Mutex::new(Arc::new(LocalLease::new(node_ttl, Instant::now()))),
            beats: AtomicU64::new(0),
        });
        let registering = Instant::now();
        if let Err(err) = core.rejoin().await {
            // Do not leave a half-registered node behind (a duplicate id registered nothing).
            if !matches!(err, StatekeeperError::DuplicateNode(_)) {
                let _ = statekeeper.deregister_node(&id).await;
            }
            return Err(err.into());
        }
        *core.lease.lock() = Arc::new(LocalLease::new(node_ttl, registering));
        core.apply_config().await;
        let mut tasks = Vec::new();
        let events = statekeeper.open_inbox(&id).await?;
        tasks.push(handle.spawn(super::roles::inbox(core.clone(), events)));
        tasks.extend(super::upkeep::spawn(
            &core,
            super::upkeep::Timing {
                heartbeat: Duration::from_millis(self.heartbeat_ms),
                node_ttl,
                resubmit_after: Duration::from_millis(self.resubmit_ms),
            },
        ));
        for pool in &self.pools {
            let pool_id = PoolId::new(pool.name.as_str());
            if pool.distributor {
                tasks.push(handle.spawn(super::roles::distributor(core.clone(), pool_id.clone())));
            }
            if pool.helper {
                let interval = Duration::from_millis(pool.helper_interval_ms.max(1));
                tasks.push(handle.spawn(super::roles::helper(core.clone(), pool_id, interval, pool.hoist_max)));
            }
        }
        for worker in &workers {
            tasks.push(handle.spawn(super::worker::dispatch(core.clone(), worker.clone())));
        }
        let entry = self.entry_pool.or_else(|| self.pools.first().map(|p| p.name.clone()));
        let entry_queue = entry.map(|name| QueueId::pool(&PoolId::new(name)));
        tracing::info!(node = %id, workers = workers.len(), "node started");
        Ok(Node { core, tasks: parking_lot::Mutex::new(tasks), entry_queue })
    }
}

/// `HOST-PID-XXXX`: unique per process, and a restarted process gets a new one.
fn default_id() -> String {
    let host = super::system::read().host;
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').take(63).collect();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// What this node reports about itself with each heartbeat.
pub(crate) fn node_info(core: &NodeCore) -> NodeInfo {
    let counters = &core.counters;
    let machine = super::system::read();
    let settings = core.settings.lock().clone();
    let mut pools: Vec<String> = core.pools.iter().map(|p| p.pool.to_string()).collect();
    pools.dedup();
    NodeInfo {
        id: core.id.to_string(),
        http: core.http.clone(),
        data: None,
        host: machine.host,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        cpus: settings.cpus.unwrap_or(machine.cpus),
        memory_total_bytes: machine.memory_total_bytes,
        memory_free_bytes: machine.memory_free_bytes,
        memory_max_bytes: settings.max_memory_bytes,
        load_1m: machine.load_1m,
        pools,
        functions: core.served().into_iter().map(|(n, _)| n).collect(),
        heartbeat_ms: core.heartbeat_ms,
        workers: core
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
        evaluations: core.evaluations.values().map(|c| c.load(Ordering::Relaxed)).sum(),
        heartbeat_age_ms: 0,
        flocks: u32::try_from(core.placement.table().flocks_of(core.id.as_str())).unwrap_or(u32::MAX),
        health: crate::control::Health::Alive,
    }
}

/// A metric family: name, type, help, and how to read a sample's value.
type Family<F> = (&'static str, &'static str, &'static str, F);
/// Reads a worker sample from its report and its queue length.
type WorkerValue = fn(&WorkerInfo, u64) -> f64;
/// Reads a pool sample from its counters.
type PoolValue = fn(&PoolCounters) -> f64;

/// A running node. Dropping it without [`Node::shutdown`] leaves its tasks running until
/// the runtime stops.
pub struct Node {
    core: Arc<NodeCore>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    entry_queue: Option<QueueId>,
}

/// What one worker has done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// The worker's id, `NODE/wN`.
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// Its slots.
    pub slots: usize,
    /// Evaluations it started.
    pub executed: u64,
    /// Most slots in use at once so far.
    pub peak_busy: usize,
    /// Threads its blocking evaluations run on (at most its slots).
    pub fiber_threads: usize,
}

/// What a node has done so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    /// The node's id.
    pub node: String,
    /// Calls made through this node (top level and nested).
    pub calls: u64,
    /// Calls answered from memoized results.
    pub memo_hits: u64,
    /// Calls that joined a request already in flight.
    pub joined: u64,
    /// Calls that queued a new request.
    pub queued: u64,
    /// Per worker.
    pub workers: Vec<WorkerStats>,
    /// Evaluations started per function on this node, sorted by name.
    pub evaluations: Vec<(String, u64)>,
    /// Distribution counters per pool this node declared.
    pub pools: Vec<(String, PoolCounters)>,
}

impl Node {
    /// Starts building a node with the default id and an embedded statekeeper.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            id: default_id(),
            registry: Registry::new(),
            statekeeper: None,
            pools: Vec::new(),
            workers: Vec::new(),
            entry_pool: None,
            heartbeat_ms: 500,
            resubmit_ms: 30_000,
            http: None,
            settings: super::config::Settings::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        self.core.id.as_str()
    }

    /// A client that submits top-level requests to the entry pool. On a node that declared
    /// no pool its calls fail with [`crate::CallError::NoPool`]; use [`Node::client_for`].
    pub fn client(&self) -> Client {
        Client::new(self.core.clone(), self.entry_queue.clone())
    }

    /// A client that submits top-level requests to `pool`'s queue.
    pub fn client_for(&self, pool: &str) -> Client {
        Client::new(self.core.clone(), Some(QueueId::pool(&PoolId::new(pool))))
    }

    /// The functions this node serves.
    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    /// The statekeeper this node runs on.
    pub fn statekeeper(&self) -> &Arc<dyn Statekeeper> {
        &self.core.statekeeper
    }

    /// Placement of keys and ids on the grid's nodes (flocks, `init`, `node_id`, `node_ids`).
    pub fn placement(&self) -> Arc<crate::placement::Placement> {
        self.core.placement.clone()
    }

    /// The grid's data structures (caches, atoms, maps, locks, topics, ...).
    pub fn structures(&self) -> crate::structures::Store {
        self.core.statekeeper.structures()
    }

    /// Evaluations of `function` started on this node.
    pub fn evaluations_of(&self, function: &str) -> u64 {
        self.core.evaluations.get(function).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// What this node reports about itself to the statekeeper.
    pub fn info(&self) -> NodeInfo {
        node_info(&self.core)
    }

    /// The node's metrics in Prometheus's text format.
    pub async fn metrics(&self) -> String {
        let stats = self.stats().await;
        let info = self.info();
        let node = stats.node.as_str();
        let mut out = super::metrics::Exposition::new();
        for (name, help, value) in [
            ("girder_calls_total", "Calls made through the node, top level and nested.", stats.calls),
            ("girder_memo_hits_total", "Calls answered from memoized results.", stats.memo_hits),
            ("girder_joined_total", "Calls that joined a request already in flight.", stats.joined),
            ("girder_queued_total", "Calls that queued a new request.", stats.queued),
        ] {
            out.family(name, "counter", help);
            out.sample(name, &[("node", node)], value as f64);
        }
        out.family("girder_evaluations_total", "counter", "Evaluations started, per function.");
        for (function, count) in &stats.evaluations {
            out.sample("girder_evaluations_total", &[("node", node), ("function", function)], *count as f64);
        }
        let mut per_worker: Vec<(&WorkerInfo, u64)> = Vec::new();
        for (reported, worker) in info.workers.iter().zip(&self.core.workers) {
            per_worker.push((reported, self.core.statekeeper.queue_len(&worker.queue).await.unwrap_or(0) as u64));
        }
        let worker_families: [Family<WorkerValue>; 4] = [
            ("girder_worker_slots", "gauge", "Evaluation slots per worker.", |w, _| f64::from(w.slots)),
            ("girder_worker_busy_slots", "gauge", "Slots in use per worker.", |w, _| f64::from(w.busy)),
            ("girder_worker_executed_total", "counter", "Evaluations started per worker.", |w, _| w.executed as f64),
            (
                "girder_worker_queue_length",
                "gauge",
                "Requests in a worker's own queue, stale copies included.",
                |_, queued| queued as f64,
            ),
        ];
        for (name, kind, help, value) in worker_families {
            out.family(name, kind, help);
            for (w, queued) in &per_worker {
                out.sample(name, &[("node", node), ("worker", &w.id), ("pool", &w.pool)], value(w, *queued));
            }
        }
        let pool_families: [Family<PoolValue>; 3] = [
            ("girder_pool_queue_length", "gauge", "Requests in a pool's queue.", |c| c.queue_len as f64),
            ("girder_pool_handed_off_total", "counter", "Requests a pool's distributor handed to a volunteer.", |c| {
                c.handed_off as f64
            }),
            ("girder_pool_hoisted_total", "counter", "Requests a pool's helper copied up from busy members.", |c| {
                c.hoisted as f64
            }),
        ];
        for (name, kind, help, value) in pool_families {
            out.family(name, kind, help);
            for (pool, counters) in &stats.pools {
                out.sample(name, &[("pool", pool)], value(counters));
            }
        }
        out.family("girder_flocks_owned", "gauge", "Flocks this node owns in the placement table.");
        out.sample("girder_flocks_owned", &[("node", node)], f64::from(info.flocks));
        out.family("girder_placement_epoch", "gauge", "Epoch of the placement table this node last read.");
        out.sample("girder_placement_epoch", &[("node", node)], self.core.placement.table().epoch as f64);
        out.family("girder_call_duration_seconds", "histogram", "Time from a top-level call to its outcome.");
        out.histogram("girder_call_duration_seconds", node, &self.core.latency);
        out.finish()
    }

    /// A snapshot of the node's counters.
    pub async fn stats(&self) -> NodeStats {
        let counters = &self.core.counters;
        let mut evaluations: Vec<(String, u64)> =
            self.core.evaluations.iter().map(|(name, c)| ((*name).to_owned(), c.load(Ordering::Relaxed))).collect();
        evaluations.sort();
        let mut pools = Vec::new();
        for declared in &self.core.pools {
            if let Ok(counters) = self.core.statekeeper.pool_counters(&declared.pool).await {
                pools.push((declared.pool.to_string(), counters));
            }
        }
        NodeStats {
            node: self.core.id.to_string(),
            calls: counters.calls.load(Ordering::Relaxed),
            memo_hits: counters.memo_hits.load(Ordering::Relaxed),
            joined: counters.joined.load(Ordering::Relaxed),
            queued: counters.queued.load(Ordering::Relaxed),
            workers: self
                .core
                .workers
                .iter()
                .map(|w| WorkerStats {
                    id: w.id.to_string(),
                    pool: w.pool.to_string(),
                    slots: w.slots.load(Ordering::Relaxed),
                    executed: w.executed.load(Ordering::Relaxed),
                    peak_busy: w.peak_busy.load(Ordering::Relaxed),
                    fiber_threads: w.fibers.threads(),
                })
                .collect(),
            evaluations,
            pools,
        }
    }

    /// Stops taking new work (the first step of [`Node::drain`]); what the node holds goes on.
    pub async fn withdraw(&self) {
        self.core.draining.store(true, Ordering::Release);
        for worker in &self.core.workers {
            let _ = self.core.statekeeper.volunteer(&worker.pool, &worker.queue, 0).await;
        }
    }

    /// Leaves the grid gracefully: withdraws the workers' offers so no new work comes,
    /// finishes what the node holds (nested work of its own evaluations included) for up
    /// to `timeout`, then shuts down, handing back whatever is left. Returns whether
    /// everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.withdraw().await;
        let deadline = tokio::time::Instant::now() + timeout;
        let finished = loop {
            let mut queued = 0;
            for worker in &self.core.workers {
                queued += self.core.statekeeper.queue_len(&worker.queue).await.unwrap_or(0);
            }
            if self.core.running.lock().is_empty() && queued == 0 {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tracing::info!(node = %self.core.id, finished, "drained");
        self.shutdown().await;
        finished
    }

    /// Stops the node's roles, withdraws its workers and deregisters it. Callers still
    /// waiting on this node get [`crate::CallError::Shutdown`].
    pub async fn shutdown(&self) {
        self.core.cancel.cancel();
        for worker in &self.core.workers {
            worker.fibers.close();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
        // Deregistering withdraws the workers and hands what they held back to their pools.
        if let Err(err) = self.core.statekeeper.deregister_node(&self.core.id).await {
            tracing::warn!(node = %self.core.id, error = %err, "could not deregister");
        }
        let waiting = self.core.waiters.len();
        // Dropping the senders wakes every local caller with a shutdown error.
        self.core.waiters.clear();
        tracing::info!(node = %self.core.id, waiting, "node stopped");
    }
}
