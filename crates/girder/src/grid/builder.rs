//! [`NodeBuilder`] and the specs of what a node runs: it registers the node, declares its
//! pools, and starts its workers, roles and upkeep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::core::{Calls, DeclaredPool, Membership, NodeCore, Work};
use super::function::{Policy, Registry};
use super::node::Node;
use super::worker::Worker;
use crate::control::{Embedded, NodeId, PoolId, QueueId, Statekeeper};
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
    /// The bucket store could not start (its data directory, its data-plane address).
    #[error("the bucket store cannot start: {0}")]
    Store(#[from] crate::store::StoreError),
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
    limits: super::core::CallLimits,
    time_limit: Option<Duration>,
    /// Per function, the policy fields this node sets over the attribute's.
    policies: HashMap<String, Policy>,
    store: Option<crate::store::StoreConfig>,
}

/// Most slots a worker may have; a guard against typos, not a tuning limit.
pub const SLOTS_MAX: usize = 4_096;
/// Most workers one node may run.
pub const WORKERS_MAX: usize = 1_024;

impl Node {
    /// Starts building a node with the default id and an embedded statekeeper.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::new()
    }
}

impl NodeBuilder {
    /// The defaults: a unique id, no functions, an embedded statekeeper, no pools.
    pub(super) fn new() -> NodeBuilder {
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
            limits: super::core::CallLimits::default(),
            time_limit: None,
            policies: HashMap::new(),
            store: None,
        }
    }

    /// Runs a bucket store on this node (its farm on `config.data_dir`, or in memory), with
    /// a data plane other nodes reach it on. A node without workers holds no flocks, but
    /// still routes store requests.
    pub fn store(mut self, config: crate::store::StoreConfig) -> NodeBuilder {
        self.store = Some(config);
        self
    }

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

    /// Sets the limits of every call tree this node's clients start (default: a million
    /// requests, a million levels). A client may ask for lower ones
    /// ([`crate::Client::with_limits`]), never for higher ones.
    pub fn call_limits(mut self, limits: super::core::CallLimits) -> NodeBuilder {
        self.limits = limits;
        self
    }

    /// Sets how long an evaluation may run here before the grid abandons it with
    /// [`crate::CallError::TimeLimitExceeded`] (default: no limit), for functions without
    /// a limit of their own (`#[girder::function(timeout_ms = N)]`). An async evaluation
    /// is dropped; a blocking one is answered at once and its result discarded when it
    /// returns ([`crate::Ctx::is_cancelled`] turns true for it).
    pub fn time_limit(mut self, limit: Duration) -> NodeBuilder {
        self.time_limit = Some(limit);
        self
    }

    /// Sets policy fields of the function `name` on this node: each field set in `policy`
    /// replaces the attribute's (`#[girder::function(retries = .., timeout_ms = .., ttl_ms =
    /// ..)]`); fields left `None` keep it. Called again for the same function, the fields
    /// set last win. Give every node serving a function the same overrides: the node that
    /// evaluates a request applies its own (retries of panics and lost nodes, the time limit,
    /// how long its result is memoized).
    pub fn policy(mut self, name: impl Into<String>, policy: Policy) -> NodeBuilder {
        let merged = self.policies.entry(name.into()).or_default();
        *merged = overlay(*merged, policy);
        self
    }

    /// Parses `NAME:retries=3,timeout_ms=500,ttl_ms=60000` (any of the fields, at least one)
    /// into the function's name and the policy fields it sets, for [`NodeBuilder::policy`].
    pub fn parse_policy(spec: &str) -> Result<(String, Policy), String> {
        let (name, fields) = spec.rsplit_once(':').filter(|(name, _)| !name.is_empty()).ok_or_else(|| {
            format!("{spec:?} is not NAME:FIELD=VALUE,... (e.g. examples/fib:retries=3,ttl_ms=60000)")
        })?;
        let mut policy = Policy::NODE;
        for field in fields.split(',') {
            let (key, value) =
                field.split_once('=').ok_or_else(|| format!("{field:?} in {spec:?} is not FIELD=VALUE"))?;
            let value = value.trim();
            let number =
                |what: &str| value.parse::<u64>().map_err(|_| format!("{what} must be a whole number, got {value:?}"));
            match key.trim() {
                "retries" => {
                    policy.retries =
                        Some(u32::try_from(number("retries")?).map_err(|_| "retries is too large".to_owned())?)
                }
                "timeout_ms" => match number("timeout_ms")? {
                    0 => return Err("timeout_ms must be at least 1".to_owned()),
                    ms => policy.timeout_ms = Some(ms),
                },
                "ttl_ms" => policy.ttl_ms = Some(number("ttl_ms")?),
                other => return Err(format!("unknown policy field {other:?}; known: retries, timeout_ms, ttl_ms")),
            }
        }
        Ok((name.to_owned(), policy))
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
        let policies = resolve_policies(&self.registry, &self.policies);
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
            handle: handle.clone(),
            cancel: CancellationToken::new(),
            calls: Calls::default(),
            work: Work {
                workers: workers.clone(),
                evaluations,
                running: parking_lot::Mutex::default(),
                claims_uncertain: std::sync::atomic::AtomicBool::new(false),
                hoist_hint: tokio::sync::Notify::new(),
                draining: std::sync::atomic::AtomicBool::new(false),
                trees: Arc::default(),
                limits: self.limits,
                time_limit: self.time_limit,
                policies,
            },
            membership: Membership {
                pools,
                http: self.http,
                settings: parking_lot::Mutex::new(self.settings.clone()),
                base_settings: self.settings,
                heartbeat_ms: self.heartbeat_ms,
                lease: parking_lot::Mutex::new(Arc::new(LocalLease::new(node_ttl, Instant::now()))),
                beats: AtomicU64::new(0),
                rejoins: AtomicU64::new(0),
                placement: Arc::new(crate::placement::Placement::new(statekeeper.clone(), Some(id.to_string()))),
                farm: std::sync::OnceLock::new(),
            },
        });
        let anti_entropy = self.store.as_ref().map(|c| Duration::from_millis(c.anti_entropy_ms.max(100)));
        if let Some(config) = self.store {
            open_farm(&core, config).await?;
        }
        let registering = Instant::now();
        let mut joined = core.rejoin().await;
        if let Err(StatekeeperError::DuplicateNode(_)) = &joined {
            if predecessor_is_gone(statekeeper.as_ref(), &id).await {
                // This node's crashed predecessor on this host: take over at once, rather
                // than wait for its lease to run out. Its work goes back to its pools.
                tracing::warn!(node = %id, "taking over from this node's crashed predecessor");
                statekeeper.deregister_node(&id).await?;
                joined = core.rejoin().await;
            }
        }
        if let Err(err) = joined {
            // Do not leave a half-registered node behind (a duplicate id registered nothing).
            if !matches!(err, StatekeeperError::DuplicateNode(_)) {
                let _ = statekeeper.deregister_node(&id).await;
            }
            return Err(err.into());
        }
        *core.membership.lease.lock() = Arc::new(LocalLease::new(node_ttl, registering));
        core.apply_config().await;
        let mut tasks = Vec::new();
        for warning in statekeeper.warnings().await {
            tracing::warn!(node = %id, "{warning}");
        }
        let events = statekeeper.open_inbox(&id).await?;
        tasks.push(handle.spawn(super::roles::inbox(core.clone(), events)));
        tasks.extend(super::upkeep::spawn(
            &core,
            super::upkeep::Timing {
                heartbeat: Duration::from_millis(self.heartbeat_ms),
                node_ttl,
                resubmit_after: Duration::from_millis(self.resubmit_ms),
                anti_entropy,
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

/// Opens the node's store; its lease is the node's, as the node's own clock sees it.
async fn open_farm(core: &Arc<NodeCore>, config: crate::store::StoreConfig) -> Result<(), NodeError> {
    let weak = Arc::downgrade(core);
    let lease_left: Arc<dyn Fn() -> (Duration, u64) + Send + Sync> = Arc::new(move || {
        weak.upgrade().map_or((Duration::ZERO, 0), |core| {
            (core.membership.lease.lock().remaining(), core.membership.rejoins.load(Ordering::Acquire))
        })
    });
    let placement = core.membership.placement.clone();
    let ttl_ms = core.statekeeper.node_ttl_ms();
    let structures = core.statekeeper.structures();
    let farm = crate::store::Farm::open(core.id.as_str(), config, placement, structures, lease_left, ttl_ms).await?;
    // Set once, right after the core was made: nothing else sets it.
    let _ = core.membership.farm.set(farm);
    Ok(())
}

/// `base` with the fields `over` sets replaced.
fn overlay(base: Policy, over: Policy) -> Policy {
    Policy {
        retries: over.retries.or(base.retries),
        timeout_ms: over.timeout_ms.or(base.timeout_ms),
        ttl_ms: over.ttl_ms.or(base.ttl_ms),
    }
}

/// The policy of every function of `registry`: its attribute's, overlaid with `overrides`.
/// An override of a function not served here is ignored, with a warning (a typo, or a node
/// serving only some functions started with the grid's common flags).
fn resolve_policies(registry: &Registry, overrides: &HashMap<String, Policy>) -> HashMap<&'static str, Policy> {
    for name in overrides.keys().filter(|name| registry.version_of(name).is_none()) {
        tracing::warn!(function = %name, "a policy was set for a function this node does not serve; ignored");
    }
    let policies = registry.names().into_iter().filter_map(|(name, _)| {
        let own = registry.get(name)?.function.policy();
        Some((name, overrides.get(name).map_or(own, |over| overlay(own, *over))))
    });
    policies.collect()
}

/// `HOST-PID-XXXX`: unique per process, and a restarted process gets a new one.
fn default_id() -> String {
    let host = super::system::read().host;
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').take(63).collect();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Whether the live node registered as `id` is a process of this host that no longer runs:
/// the predecessor of a node restarted with the same id after a crash.
async fn predecessor_is_gone(statekeeper: &dyn Statekeeper, id: &NodeId) -> bool {
    let Ok(nodes) = statekeeper.live_nodes().await else { return false };
    let Some(old) = nodes.into_iter().find(|n| n.id == id.as_str()) else { return false };
    let here = super::system::read().host;
    // Only where /proc tells which processes run; elsewhere wait for the lease.
    cfg!(target_os = "linux")
        && old.pid != 0
        && old.pid != std::process::id()
        && old.host == here
        && !std::path::Path::new(&format!("/proc/{}", old.pid)).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_specs_parse_or_say_why_not() {
        let (name, policy) = NodeBuilder::parse_policy("examples/fib:retries=3,timeout_ms=500,ttl_ms=60000").unwrap();
        assert_eq!(name, "examples/fib");
        assert_eq!(policy, Policy { retries: Some(3), timeout_ms: Some(500), ttl_ms: Some(60_000) });
        let (_, ttl_only) = NodeBuilder::parse_policy("ns/f: ttl_ms = 0").unwrap();
        assert_eq!(ttl_only, Policy { ttl_ms: Some(0), ..Policy::NODE });
        for bad in
            ["f", ":retries=1", "f:", "f:retries", "f:retries=-1", "f:timeout_ms=0", "f:nope=1", "f:retries=5000000000"]
        {
            assert!(NodeBuilder::parse_policy(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn overrides_replace_only_the_fields_they_set() {
        let attribute = Policy { retries: Some(3), timeout_ms: Some(500), ttl_ms: None };
        let builder = Node::builder()
            .policy("f", Policy { retries: Some(1), ..Policy::NODE })
            .policy("f", Policy { ttl_ms: Some(10), ..Policy::NODE });
        let over = builder.policies["f"];
        assert_eq!(overlay(attribute, over), Policy { retries: Some(1), timeout_ms: Some(500), ttl_ms: Some(10) });
    }
}
