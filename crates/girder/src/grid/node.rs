//! [`Node`]: one process's share of the grid, as its owner sees it: clients, counters,
//! metrics, drain and shutdown. [`super::builder`] starts one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::client::Client;
use super::core::NodeCore;
use super::function::Registry;
use crate::control::{NodeInfo, PoolCounters, PoolId, QueueId, Statekeeper, WorkerInfo};

/// A metric family: name, type, help, and how to read a sample's value.
type Family<F> = (&'static str, &'static str, &'static str, F);
/// Reads a worker sample from its report and its queue length.
type WorkerValue = fn(&WorkerInfo, u64) -> f64;
/// Reads a pool sample from its counters.
type PoolValue = fn(&PoolCounters) -> f64;

/// A running node. Dropping it without [`Node::shutdown`] leaves its tasks running until
/// the runtime stops.
pub struct Node {
    pub(super) core: Arc<NodeCore>,
    pub(super) tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    pub(super) entry_queue: Option<QueueId>,
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
    /// Requests being evaluated on this node now.
    pub running: u64,
    /// Distribution counters per pool this node declared.
    pub pools: Vec<(String, PoolCounters)>,
}

impl Node {
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

    /// Requests being evaluated on this node now (see [`NodeStats::running`]).
    pub fn running(&self) -> u64 {
        self.core.work.running.lock().len() as u64
    }

    /// The policy this node applies to `function`: the attribute's with this node's
    /// overrides ([`crate::NodeBuilder::policy`]); `None` for a function not registered here.
    pub fn policy(&self, function: &str) -> Option<crate::Policy> {
        self.core.work.policies.get(function).copied()
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
        self.core.membership.placement.clone()
    }

    /// The bucket store, reached through this node ([`crate::store::StoreError::NoStore`]
    /// when it was started without [`crate::NodeBuilder::store`]).
    pub fn store(&self) -> Result<crate::store::ItemStore, crate::store::StoreError> {
        self.core.membership.farm.get().map(|farm| farm.store()).ok_or(crate::store::StoreError::NoStore)
    }

    /// Whether the node's lease still holds by its own clock, as a check to keep: work a
    /// node holds exclusively stops when it turns false.
    pub(crate) fn lease_check(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let weak = Arc::downgrade(&self.core);
        Arc::new(move || weak.upgrade().is_some_and(|core| !core.membership.lease.lock().remaining().is_zero()))
    }

    /// The node's farm, if it runs a store.
    pub(crate) fn farm(&self) -> Option<&crate::store::Farm> {
        self.core.membership.farm.get()
    }

    /// The grid's data structures (caches, atoms, maps, locks, topics, ...).
    pub fn structures(&self) -> crate::structures::Store {
        self.core.statekeeper.structures()
    }

    /// Evaluations of `function` started on this node.
    pub fn evaluations_of(&self, function: &str) -> u64 {
        self.core.work.evaluations.get(function).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// What this node reports about itself to the statekeeper.
    pub fn info(&self) -> NodeInfo {
        self.core.info()
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
        for (reported, worker) in info.workers.iter().zip(&self.core.work.workers) {
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
        out.sample("girder_placement_epoch", &[("node", node)], self.core.membership.placement.table().epoch as f64);
        if let Some(farm) = self.farm() {
            store_metrics(&mut out, node, farm);
        }
        out.family("girder_call_duration_seconds", "histogram", "Time from a top-level call to its outcome.");
        out.histogram("girder_call_duration_seconds", node, &self.core.calls.latency);
        self.core.calls.extra_metrics.lock().retain(|source| source(&mut out, node));
        out.finish()
    }

    /// Adds metrics of something running beside this node to [`Node::metrics`].
    pub(crate) fn add_metrics(&self, source: super::metrics::Source) {
        self.core.calls.extra_metrics.lock().push(source);
    }

    /// A snapshot of the node's counters.
    pub async fn stats(&self) -> NodeStats {
        let counters = &self.core.calls.counters;
        let mut evaluations: Vec<(String, u64)> = self
            .core
            .work
            .evaluations
            .iter()
            .map(|(name, c)| ((*name).to_owned(), c.load(Ordering::Relaxed)))
            .collect();
        evaluations.sort();
        let mut pools = Vec::new();
        for declared in &self.core.membership.pools {
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
                .work
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
            running: self.running(),
            pools,
        }
    }

    /// Stops taking new work (the first step of [`Node::drain`]); what the node holds goes on.
    pub async fn withdraw(&self) {
        self.core.work.draining.store(true, Ordering::Release);
        for worker in &self.core.work.workers {
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
        let handed_over = self.hand_over(deadline).await;
        let finished = handed_over
            && loop {
                let mut queued = 0;
                for worker in &self.core.work.workers {
                    queued += self.core.statekeeper.queue_len(&worker.queue).await.unwrap_or(0);
                }
                if self.core.work.running.lock().is_empty() && queued == 0 {
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

    /// Waits until every flock this node holds has owners elsewhere that hold it
    /// completely (a draining node weighs nothing, so the table moves its flocks away),
    /// or `deadline`. Whether it handed everything over.
    async fn hand_over(&self, deadline: tokio::time::Instant) -> bool {
        let Some(farm) = self.farm() else { return true };
        loop {
            if farm.node.handed_over() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(node = %self.core.id, "store: drained before every flock was handed over");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the node's roles, withdraws its workers and deregisters it. Callers still
    /// waiting on this node get [`crate::CallError::Shutdown`].
    pub async fn shutdown(&self) {
        self.core.cancel.cancel();
        for worker in &self.core.work.workers {
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
        if let Some(farm) = self.core.membership.farm.get() {
            farm.shutdown().await;
        }
        let waiting = self.core.calls.waiters.len();
        // Dropping the senders wakes every local caller with a shutdown error.
        self.core.calls.waiters.clear();
        tracing::info!(node = %self.core.id, waiting, "node stopped");
    }
}

/// The bucket store's metrics: what it holds (per flock too), how far its replicas lag,
/// what it did, and what crossed the data plane (sent as a client, served as a server).
fn store_metrics(out: &mut super::metrics::Exposition, node: &str, farm: &crate::store::Farm) {
    let store = farm.node.stats();
    let families: [(&str, &str, &str, u64); 10] = [
        ("girder_store_items", "gauge", "Live items stored here.", store.items),
        ("girder_store_bytes", "gauge", "Bytes stored here (encoded records).", store.bytes),
        ("girder_store_flocks_ready", "gauge", "Flocks held completely (serving reads).", store.flocks_ready.into()),
        (
            "girder_store_flocks_syncing",
            "gauge",
            "Flocks being copied here (migrations in progress).",
            store.flocks_syncing.into(),
        ),
        ("girder_store_writes_total", "counter", "Writes acknowledged as primary.", store.writes),
        ("girder_store_replicated_total", "counter", "Replica writes stored.", store.replicated),
        ("girder_store_copied_total", "counter", "Records copied here by catch-up and anti-entropy.", store.copied),
        ("girder_store_repaired_total", "counter", "Corrupt records replaced from a replica.", store.repaired),
        (
            "girder_store_fenced_total",
            "counter",
            "Replica writes refused: stale epoch or not the primary.",
            store.fenced,
        ),
        ("girder_store_syncs_total", "counter", "Flock copies completed.", store.syncs),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        out.sample(name, &[("node", node)], value as f64);
    }
    let lag = "girder_store_replication_lag_seconds";
    out.family(lag, "gauge", "How long the flock waiting longest for its copy here has waited (0: caught up).");
    out.sample(lag, &[("node", node)], store.replication_lag_ms as f64 / 1e3);
    out.family("girder_store_flock_bytes", "gauge", "Bytes stored here per flock (flocks holding data).");
    for usage in farm.node.engine.usage() {
        let flock = usage.flock.to_string();
        out.sample("girder_store_flock_bytes", &[("node", node), ("flock", &flock)], usage.bytes as f64);
    }
    data_metrics(out, node, &[("client", farm.node.data.stats()), ("server", farm.server_stats())]);
}

/// The data plane's throughput counters, by side (a node is both client and server).
fn data_metrics(out: &mut super::metrics::Exposition, node: &str, sides: &[(&str, crate::dataplane::DataStats)]) {
    type Field = fn(&crate::dataplane::DataStats) -> u64;
    let families: [(&str, &str, &str, Field); 8] = [
        ("girder_data_sent_bytes_total", "counter", "Body bytes sent, before compression.", |d| d.raw_bytes_sent),
        ("girder_data_sent_wire_bytes_total", "counter", "Bytes sent on the wire.", |d| d.wire_bytes_sent),
        ("girder_data_received_bytes_total", "counter", "Body bytes received.", |d| d.raw_bytes_received),
        ("girder_data_received_wire_bytes_total", "counter", "Bytes received on the wire.", |d| d.wire_bytes_received),
        ("girder_data_frames_sent_total", "counter", "Frames sent.", |d| d.frames_sent),
        ("girder_data_requests_total", "counter", "Requests sent (client) or served (server).", |d| d.requests),
        ("girder_data_connections", "gauge", "Data-plane connections open now.", |d| d.conns_open),
        ("girder_data_connections_total", "counter", "Connections opened or accepted.", |d| d.conns_opened),
    ];
    for (name, kind, help, field) in families {
        out.family(name, kind, help);
        for (side, stats) in sides {
            out.sample(name, &[("node", node), ("side", side)], field(stats) as f64);
        }
    }
}
