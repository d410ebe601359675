//! The Redis statekeeper: one grid across processes and machines (Redis 7+, Valkey).
//!
//! Every operation of the trait is one Lua script, run atomically on the server in one
//! round trip; the scripts live in `prelude.lua` (shared helpers and the key layout) and
//! `ops.lua` (one section per operation). All keys of a grid start with
//! `girder:{NAMESPACE}:`, so each script touches keys of one cluster slot.
//!
//! Besides the scripts, each node has:
//! - an inbox reader on a connection of its own, blocking on the node's inbox list; it
//!   turns `W` events into wake-ups of the local queue waiters and `D` events into
//!   outcomes for the local callers;
//! - a bounded near cache of memoized outcomes: outcomes never change for an identity, so
//!   repeated hits are served locally without crossing the network. An entry expires when
//!   its Redis key does (timed from before the read that brought it, so never later); a
//!   forgotten outcome is dropped when the forget's notice reaches the inbox reader (`F` and
//!   `A` events), and should a notice be lost, at the next heartbeat, which returns the
//!   grid's count of forgets: when it changed, the whole near cache is dropped. A fill from
//!   a read that began before a drop is refused, so a read racing a forget cannot bring the
//!   forgotten outcome back.
//!
//! Every script does bounded work per call. Removing a node (deregistration, reaping, a
//! re-registration over an expired node) detaches it in one step and gives back what it
//! held in batches of at most 1,000 entries; the methods here call the scripts again until
//! nothing is left, so each trait call still completes the whole removal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use redis::{FromRedisValue, IntoConnectionInfo, Script};
use tokio::sync::{mpsc, Notify};

use crate::codec;
use crate::control::{
    version_key, Event, Memo, NodeId, NodeInfo, PoolCounters, PoolId, QueueId, ResultStore, ResultStoreConfig,
    SkResult, Statekeeper, Submitted, TreeEnd,
};
use crate::error::{CallError, StatekeeperError};
use crate::id::ReqId;
use crate::request::{Outcome, Request};
use crate::retry::Backoff;

mod conn;
mod policy;
mod structures;

const PRELUDE: &str = include_str!("prelude.lua");
const OPS: &str = include_str!("ops.lua");

/// Settings of a [`RedisStatekeeper`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port/db`, or `rediss://...` for TLS (certificates are
    /// checked against the system's roots; `rediss://...#insecure` skips the check).
    pub url: String,
    /// Grids with different namespaces share a Redis without seeing each other.
    pub namespace: String,
    /// A node whose lease is older than this is dead and its work is run elsewhere.
    pub node_ttl_ms: u64,
    /// Memoized outcomes expire after this long in Redis (`None`: only Redis's
    /// `maxmemory-policy` bounds them; use `volatile-*` policies so only results are evicted).
    pub results_ttl_ms: Option<u64>,
    /// Most memoized outcomes kept in Redis; past it the oldest are forgotten. (Their bytes
    /// are bounded by Redis's `maxmemory` with a `volatile-*` policy.)
    pub results_entries_max: u64,
    /// Limits of the node-local near cache of outcomes.
    pub near_cache: ResultStoreConfig,
    /// Longest an inbox may grow; older events are dropped (their callers re-sync by
    /// resubmitting).
    pub inbox_len_max: u64,
    /// At most this many requests in flight grid-wide.
    pub in_flight_max: u64,
    /// Longest one Redis command may take before it counts as failed.
    pub response_timeout_ms: u64,
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            namespace: "girder".to_owned(),
            node_ttl_ms: 3_000,
            results_ttl_ms: Some(24 * 3_600_000),
            results_entries_max: 1_000_000,
            near_cache: ResultStoreConfig { entries_max: 100_000, bytes_max: 64 << 20, ttl_ms: None },
            inbox_len_max: 1_000_000,
            in_flight_max: 4_000_000,
            response_timeout_ms: 5_000,
        }
    }
}

/// Blocking reads wait at most this long, so a reader notices when it should stop.
const INBOX_BLOCK_S: f64 = 1.0;
/// Events taken from an inbox per round trip once one has arrived.
const INBOX_BATCH_MAX: usize = 256;
/// Events decoded from an inbox and not yet taken by the node. When the node is slow the
/// reader waits for room (the sender awaits) and leaves further events in the Redis list,
/// itself bounded by `inbox_len_max`: no outcome is lost in between.
const INBOX_CHANNEL_MAX: usize = 1_024;
/// Most queues this process keeps a wake-up signal for. Signals are kept for the queues of
/// the pools declared and the workers joined here and for queues being waited on; a `W`
/// event for any other queue is ignored (nobody here waits on it). Past this many, signals
/// nobody waits on are dropped; a wait on a queue beyond it falls back to its timeout.
const SIGNALS_MAX: usize = 4_096;
/// Most times `register_node` removes an expired node of the same id in its way.
const REGISTER_TRIES_MAX: usize = 8;

struct Scripts {
    register: Script,
    deregister: Script,
    reclaim: Script,
    heartbeat: Script,
    reap: Script,
    live_nodes: Script,
    declare_pool: Script,
    join_pool: Script,
    leave_pool: Script,
    submit: Script,
    claim: Script,
    release_claims: Script,
    complete: Script,
    complete_and_claim: Script,
    forget: Script,
    forget_all: Script,
    cancel_tree: Script,
    volunteer: Script,
    distribute: Script,
    hoist: Script,
    pool_counters: Script,
}

impl Scripts {
    fn load(config: &RedisConfig) -> Scripts {
        let mut sections: HashMap<&str, String> = sections(OPS).into_iter().collect();
        let head = format!("local INBOX_LEN_MAX = {}\n{PRELUDE}\n", config.inbox_len_max.max(1));
        let mut script = |name: &str| {
            // The sections are compiled into the binary; a missing one is a bug caught by
            // every test that touches Redis.
            let body = sections.remove(name).unwrap_or_else(|| panic!("ops.lua has no section {name}"));
            Script::new(&format!("{head}{body}"))
        };
        Scripts {
            register: script("register"),
            deregister: script("deregister"),
            reclaim: script("reclaim"),
            heartbeat: script("heartbeat"),
            reap: script("reap"),
            live_nodes: script("live_nodes"),
            declare_pool: script("declare_pool"),
            join_pool: script("join_pool"),
            leave_pool: script("leave_pool"),
            submit: script("submit"),
            claim: script("claim"),
            release_claims: script("release_claims"),
            complete: script("complete"),
            complete_and_claim: script("complete_and_claim"),
            forget: script("forget"),
            forget_all: script("forget_all"),
            cancel_tree: script("cancel_tree"),
            volunteer: script("volunteer"),
            distribute: script("distribute"),
            hoist: script("hoist"),
            pool_counters: script("pool_counters"),
        }
    }
}

/// Splits a script file into its sections: a line `--@@ NAME: ...` starts section NAME.
pub(crate) fn sections(text: &'static str) -> Vec<(&'static str, String)> {
    let mut sections: Vec<(&'static str, String)> = Vec::new();
    for line in text.lines() {
        if let Some(header) = line.strip_prefix("--@@ ") {
            sections.push((header.split(':').next().unwrap_or(header).trim(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    sections
}

type Signals = Arc<Mutex<HashMap<QueueId, Arc<Notify>>>>;

/// The near cache of outcomes, and what keeps it from serving one that was forgotten.
struct Near {
    store: ResultStore,
    /// Drops so far: a fill from a read that began before the latest drop is refused.
    epoch: u64,
    /// The grid's count of forgets at the last heartbeat (`None` before the first).
    forgets: Option<u64>,
}

impl Near {
    /// Taken before a read whose answer may fill the cache.
    fn ticket(&self) -> u64 {
        self.epoch
    }

    /// Keeps `outcome` until `expires_at` (and no longer than the near cache's own limit),
    /// unless something was dropped since `ticket` was taken.
    fn fill(&mut self, ticket: u64, id: ReqId, outcome: &Outcome, expires_at: Option<Instant>) {
        if ticket != self.epoch {
            return;
        }
        let expires_at = match (expires_at, self.store.default_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.store.insert_with(id, outcome.clone(), None, expires_at);
    }

    fn forget(&mut self, id: &ReqId) {
        self.store.remove(id);
        self.epoch += 1;
    }

    fn clear(&mut self) {
        self.store.clear();
        self.epoch += 1;
    }

    /// The grid's count of forgets, read by a heartbeat: when it moved, a notice may have
    /// been missed, so everything goes.
    fn saw_forgets(&mut self, forgets: u64) {
        if self.forgets != Some(forgets) {
            self.clear();
            self.forgets = Some(forgets);
        }
    }
}

/// The statekeeper on Redis. Cheap to share behind an `Arc`; one per process is enough.
pub struct RedisStatekeeper {
    client: redis::Client,
    conn: Arc<conn::Conn>,
    prefix: String,
    scripts: Scripts,
    config: RedisConfig,
    near: Arc<Mutex<Near>>,
    signals: Signals,
    disruptions: Arc<AtomicU64>,
    structures: Arc<structures::RedisStructures>,
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redacted(url: &str) -> String {
    // Everything up to the last `@` may be credentials, whatever the URL's shape: a `/` in
    // the password, or a mistyped scheme, must not make it show.
    let Some(at) = url.rfind('@') else { return url.to_owned() };
    let start = url.find("://").map_or(0, |i| i + 3).min(at);
    format!("{}***@{}", &url[..start], &url[at + 1..])
}

fn unavailable(err: redis::RedisError) -> StatekeeperError {
    StatekeeperError::Unavailable(format!("redis: {err}"))
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StatekeeperError {
    StatekeeperError::Corrupt(format!("{what}: {err}"))
}

/// What the completion scripts take besides the node and the claim.
struct Completion {
    hex: String,
    group: String,
    forgets: String,
    outcome: Vec<u8>,
    memoize: &'static [u8],
    ttl_ms: u64,
    ttl: String,
    count_max: String,
    /// Taken before the script runs: a near-cache entry expires no later than Redis's key.
    sent: Instant,
    ticket: u64,
}

impl RedisStatekeeper {
    fn completion(&self, request: &Request, outcome: &Outcome, memo: Memo) -> SkResult<Completion> {
        let ttl_ms = match memo {
            Memo::For(ttl_ms) => ttl_ms,
            _ => self.config.results_ttl_ms.unwrap_or(0),
        };
        Ok(Completion {
            hex: request.id.to_hex(),
            group: version_key(&request.function, request.version),
            forgets: request.forgets.to_string(),
            outcome: encode_outcome(outcome)?,
            memoize: if memo.memoizes() { b"1" } else { b"0" },
            ttl_ms,
            ttl: ttl_ms.to_string(),
            count_max: self.config.results_entries_max.to_string(),
            sent: Instant::now(),
            ticket: self.near.lock().ticket(),
        })
    }

    /// Keeps a completion's outcome near once the script memoized it.
    fn remember_completed(&self, id: &ReqId, outcome: &Outcome, completion: &Completion) {
        let ttl = (completion.ttl_ms > 0).then(|| completion.sent + Duration::from_millis(completion.ttl_ms));
        self.near.lock().fill(completion.ticket, *id, outcome, ttl);
    }
}

/// A claim script's reply: the grid's count of forgets (every request's stamp), then each
/// request followed by its lost count.
fn parse_claimed(reply: &[Vec<u8>]) -> SkResult<Vec<Request>> {
    let number = |bytes: &[u8]| std::str::from_utf8(bytes).ok().and_then(|n| n.parse().ok());
    let Some((forgets, claimed)) = reply.split_first() else { return Err(corrupt("a claim reply", "empty")) };
    let forgets = number(forgets).ok_or_else(|| corrupt("a claim reply", "no count of forgets"))?;
    claimed
        .chunks(2)
        .map(|pair| {
            let [request, lost] = pair else {
                return Err(corrupt("a claim reply", "a request without its lost count"));
            };
            let mut request: Request = codec::decode(request).map_err(|e| corrupt("a queued request", e))?;
            request.lost = u32::try_from(number(lost).unwrap_or(0)).unwrap_or(u32::MAX);
            request.forgets = forgets;
            Ok(request)
        })
        .collect()
}

/// When an outcome read at `sent` with `pttl` ms left expires (`pttl` < 0: it has no ttl).
fn expiry_of(sent: Instant, pttl: i64) -> Option<Instant> {
    u64::try_from(pttl).ok().map(|ms| sent + Duration::from_millis(ms))
}

/// A call tree's id as the scripts key it: 16 hex digits, or empty for "no tree".
fn tree_hex(tree: u64) -> String {
    if tree == 0 {
        String::new()
    } else {
        format!("{tree:016x}")
    }
}

/// How a tree ended, as the scripts write it: `C`, or `B` and the budget.
fn parse_tree_end(code: &[u8]) -> Option<TreeEnd> {
    match code.split_first()? {
        (b'C', []) => Some(TreeEnd::Cancelled),
        (b'B', max) => std::str::from_utf8(max).ok()?.parse().ok().map(TreeEnd::OverBudget),
        _ => None,
    }
}

fn encode_outcome(outcome: &Outcome) -> SkResult<Vec<u8>> {
    codec::encode(outcome).map(|b| b.to_vec()).map_err(|e| corrupt("cannot encode an outcome", e))
}

fn decode_outcome(bytes: &[u8]) -> SkResult<Outcome> {
    codec::decode(bytes).map_err(|e| corrupt("an outcome in Redis does not decode", e))
}

impl RedisStatekeeper {
    /// Connects to the Redis at `config.url` and checks that it answers.
    pub async fn connect(config: RedisConfig) -> SkResult<RedisStatekeeper> {
        // TLS (`rediss://`) needs a process-wide crypto provider; another one already
        // installed by the application is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let info =
            config.url.as_str().into_connection_info().map_err(|e| {
                StatekeeperError::Unavailable(format!("bad Redis URL {:?}: {e}", redacted(&config.url)))
            })?;
        let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(unavailable)?;
        let timeout = Duration::from_millis(config.response_timeout_ms);
        let connection_config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        let conn = conn::Conn::connect(client.clone(), connection_config).await.map_err(|e| {
            StatekeeperError::Unavailable(format!("cannot connect to Redis at {}: {e}", redacted(&config.url)))
        })?;
        // A connection is not yet an answer: a wrong password only shows on the first command.
        redis::cmd("PING").query_async::<String>(&mut conn.get()).await.map_err(|e| {
            StatekeeperError::Unavailable(format!("Redis at {} refused us: {e}", redacted(&config.url)))
        })?;
        let prefix = format!("girder:{{{}}}:", config.namespace);
        let structures = Arc::new(structures::RedisStructures::new(client.clone(), conn.clone(), &config.namespace));
        Ok(RedisStatekeeper {
            structures,
            client,
            conn,
            prefix,
            scripts: Scripts::load(&config),
            near: Arc::new(Mutex::new(Near { store: ResultStore::new(config.near_cache), epoch: 0, forgets: None })),
            signals: Signals::default(),
            disruptions: Arc::default(),
            config,
        })
    }

    /// The key prefix of this grid, `girder:{NAMESPACE}:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A bare `PING` round trip: the floor under every statekeeper operation.
    pub async fn ping(&self) -> SkResult<()> {
        let mut conn = self.conn.get();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(|e| self.failed(e))
    }

    async fn run<T: FromRedisValue>(&self, script: &Script, args: &[&[u8]]) -> SkResult<T> {
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.prefix);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.get();
        invocation.invoke_async(&mut conn).await.map_err(|e| self.failed(e))
    }

    /// Counts a failed operation (see [`Statekeeper::disruptions`]) and converts its error.
    fn failed(&self, err: redis::RedisError) -> StatekeeperError {
        self.disruptions.fetch_add(1, Ordering::Relaxed);
        self.conn.failed(&err);
        unavailable(err)
    }

    /// The wake-up signal of `queue`, kept until the map is full (see [`SIGNALS_MAX`]).
    fn signal(&self, queue: &QueueId) -> Arc<Notify> {
        let mut signals = self.signals.lock();
        if let Some(signal) = signals.get(queue) {
            return signal.clone();
        }
        if signals.len() >= SIGNALS_MAX {
            // Only the map holds these: nobody waits on them now.
            signals.retain(|_, signal| Arc::strong_count(signal) > 1);
        }
        let signal = Arc::new(Notify::new());
        if signals.len() < SIGNALS_MAX {
            signals.insert(queue.clone(), signal.clone());
        }
        signal
    }

    /// Runs the `reclaim` script until removed nodes' work is all given back.
    async fn reclaim_all(&self, mut more: i64) -> SkResult<()> {
        while more == 1 {
            more = self.run(&self.scripts.reclaim, &[]).await?;
        }
        Ok(())
    }

    /// Removes `node` (only if its lease ran out, when `only_expired`) and gives back all it
    /// held.
    async fn remove_node(&self, node: &NodeId, only_expired: bool) -> SkResult<()> {
        let flag: &[u8] = if only_expired { b"1" } else { b"0" };
        let more: i64 = self.run(&self.scripts.deregister, &[node.as_str().as_bytes(), flag]).await?;
        self.reclaim_all(more).await
    }
}

fn expect_ok(reply: String, pool: &PoolId) -> SkResult<()> {
    match reply.as_str() {
        "OK" => Ok(()),
        "UNKNOWN_POOL" => Err(StatekeeperError::UnknownPool(pool.to_string())),
        other => Err(corrupt("unexpected reply", other)),
    }
}

#[async_trait]
impl Statekeeper for RedisStatekeeper {
    async fn register_node(&self, node: &NodeId, functions: &[(String, u32)]) -> SkResult<()> {
        let ttl = self.config.node_ttl_ms.to_string();
        let versions: Vec<String> = functions.iter().map(|(_, v)| v.to_string()).collect();
        let unknown: Vec<Vec<u8>> = functions
            .iter()
            .map(|(name, _)| encode_outcome(&Err(CallError::UnknownFunction { function: name.clone() })))
            .collect::<SkResult<_>>()?;
        let mut args: Vec<&[u8]> = vec![node.as_str().as_bytes(), ttl.as_bytes()];
        for (((name, _), version), unknown) in functions.iter().zip(&versions).zip(&unknown) {
            args.push(name.as_bytes());
            args.push(version.as_bytes());
            args.push(unknown);
        }
        for _ in 0..REGISTER_TRIES_MAX {
            match self.run::<String>(&self.scripts.register, &args).await?.as_str() {
                "OK" => return Ok(()),
                "DUPLICATE" => return Err(StatekeeperError::DuplicateNode(node.to_string())),
                // An expired node of this id, or its unfinished removal, is in the way.
                "REMOVE" => self.remove_node(node, true).await?,
                other => return Err(corrupt("unexpected reply to register", other)),
            }
        }
        Err(StatekeeperError::Unavailable(format!("node {node} could not register: its old self keeps coming back")))
    }

    async fn deregister_node(&self, node: &NodeId) -> SkResult<()> {
        self.remove_node(node, false).await
    }

    async fn heartbeat(&self, node: &NodeId, info: &NodeInfo) -> SkResult<bool> {
        let ttl = self.config.node_ttl_ms.to_string();
        let info = codec::encode(info).map_err(|e| corrupt("cannot encode node info", e))?;
        let (known, forgets): (i64, u64) =
            self.run(&self.scripts.heartbeat, &[node.as_str().as_bytes(), ttl.as_bytes(), &info]).await?;
        self.near.lock().saw_forgets(forgets);
        Ok(known == 1)
    }

    async fn reap(&self) -> SkResult<Vec<NodeId>> {
        let mut reaped = Vec::new();
        loop {
            let reply: Vec<String> = self.run(&self.scripts.reap, &[]).await?;
            let Some((more, dead)) = reply.split_first() else { return Err(corrupt("reap", "empty reply")) };
            for node in dead {
                tracing::warn!(node = %node, "node missed its heartbeats; re-running its work elsewhere");
                reaped.push(NodeId::new(node.as_str()));
            }
            if more != "1" {
                return Ok(reaped);
            }
        }
    }

    async fn live_nodes(&self) -> SkResult<Vec<NodeInfo>> {
        let reply: Vec<Vec<u8>> = self.run(&self.scripts.live_nodes, &[]).await?;
        let parse = |bytes: &[u8]| std::str::from_utf8(bytes).ok().and_then(|t| t.parse::<u64>().ok());
        let now = reply.first().and_then(|b| parse(b)).ok_or_else(|| corrupt("live_nodes", "no clock"))?;
        let mut nodes = Vec::new();
        for triple in reply[1..].chunks(3) {
            let [id, expiry, info] = triple else { break };
            let mut parsed: NodeInfo = if info.is_empty() {
                NodeInfo::default()
            } else {
                codec::decode(info).map_err(|e| corrupt("node info", e))?
            };
            parsed.id = String::from_utf8_lossy(id).into_owned();
            let beat = parse(expiry).unwrap_or(now).saturating_sub(self.config.node_ttl_ms);
            parsed.heartbeat_age_ms = now.saturating_sub(beat);
            parsed.health = parsed.health(self.config.node_ttl_ms);
            nodes.push(parsed);
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn function_version(&self, function: &str) -> SkResult<Option<u32>> {
        let mut conn = self.conn.get();
        let version: Option<u32> = redis::cmd("HGET")
            .arg(format!("{}fver", self.prefix))
            .arg(function)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(version)
    }

    async fn declare_pool(&self, pool: &PoolId, parent: Option<&PoolId>, node: &NodeId) -> SkResult<()> {
        // The distributor of `pool` runs here: keep its signal (see `join_pool`).
        self.signal(&QueueId::pool(pool));
        let parent_name = parent.map_or("", |p| p.as_str());
        let args = [pool.as_str().as_bytes(), parent_name.as_bytes(), node.as_str().as_bytes()];
        let reply: String = self.run(&self.scripts.declare_pool, &args).await?;
        expect_ok(reply, parent.unwrap_or(pool))
    }

    async fn join_pool(&self, pool: &PoolId, member: &QueueId, node: &NodeId) -> SkResult<()> {
        // Kept from now on, so a wake-up that arrives before the first wait is not lost.
        self.signal(member);
        let args = [pool.as_str().as_bytes(), member.as_str().as_bytes(), node.as_str().as_bytes()];
        expect_ok(self.run(&self.scripts.join_pool, &args).await?, pool)
    }

    async fn leave_pool(&self, pool: &PoolId, member: &QueueId) -> SkResult<()> {
        self.signals.lock().remove(member);
        let args = [pool.as_str().as_bytes(), member.as_str().as_bytes()];
        expect_ok(self.run(&self.scripts.leave_pool, &args).await?, pool)
    }

    async fn result(&self, id: &ReqId) -> SkResult<Option<Outcome>> {
        if let Some(outcome) = self.near.lock().store.get(id) {
            return Ok(Some(outcome));
        }
        let (sent, ticket) = (Instant::now(), self.near.lock().ticket());
        let key = format!("{}res:{}", self.prefix, id.to_hex());
        let mut conn = self.conn.get();
        let (bytes, pttl): (Option<Vec<u8>>, i64) =
            redis::pipe().atomic().get(&key).pttl(&key).query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => {
                let outcome = decode_outcome(&bytes)?;
                self.near.lock().fill(ticket, *id, &outcome, expiry_of(sent, pttl));
                Ok(Some(outcome))
            }
        }
    }

    fn cached_result(&self, id: &ReqId) -> Option<Outcome> {
        self.near.lock().store.get(id)
    }

    async fn submit(&self, request: &Request, queue: &QueueId, front: bool, waiter: &NodeId) -> SkResult<Submitted> {
        let id = request.id.to_hex();
        let encoded = codec::encode(request).map_err(|e| corrupt("cannot encode a request", e))?;
        let unknown = encode_outcome(&Err(CallError::UnknownFunction { function: request.function.to_string() }))?;
        let in_flight_max = self.config.in_flight_max.to_string();
        let ttl = self.config.node_ttl_ms.to_string();
        let budget = request.budget;
        let tree = tree_hex(budget.tree);
        let (depth, requests_max) = (budget.depth.to_string(), budget.requests_max.to_string());
        let tree_ttl = crate::control::TREE_TTL_MS.to_string();
        let group = version_key(&request.function, request.version);
        let (sent, ticket) = (Instant::now(), self.near.lock().ticket());
        let args = [
            id.as_bytes(),
            &encoded,
            request.function.as_bytes(),
            queue.as_str().as_bytes(),
            if front { b"1" } else { b"0" },
            waiter.as_str().as_bytes(),
            &unknown,
            in_flight_max.as_bytes(),
            ttl.as_bytes(),
            tree.as_bytes(),
            depth.as_bytes(),
            requests_max.as_bytes(),
            tree_ttl.as_bytes(),
            group.as_bytes(),
        ];
        let reply: Vec<Vec<u8>> = self.run(&self.scripts.submit, &args).await?;
        match reply.first().map(Vec::as_slice) {
            Some(b"DONE") => {
                let outcome = decode_outcome(reply.get(1).map_or(&[][..], Vec::as_slice))?;
                let pttl = reply.get(2).and_then(|p| std::str::from_utf8(p).ok()).and_then(|p| p.parse().ok());
                // Without its ttl (an older script), keep it no longer than the near cache would.
                let expires_at = pttl.map_or_else(|| self.near.lock().store.default_expiry(), |p| expiry_of(sent, p));
                self.near.lock().fill(ticket, request.id, &outcome, expires_at);
                Ok(Submitted::Done(outcome))
            }
            Some(b"QUEUED") => Ok(Submitted::Queued),
            Some(b"JOINED") => Ok(Submitted::Joined),
            Some(b"UNKNOWN") => Ok(Submitted::UnknownFunction),
            Some(b"ENDED") => match reply.get(1).and_then(|code| parse_tree_end(code)) {
                Some(end) => Ok(Submitted::TreeEnded(end)),
                None => Err(corrupt("unexpected tree end in reply to submit", format!("{reply:?}"))),
            },
            Some(b"OVERLOADED") => Err(StatekeeperError::Overloaded(self.config.in_flight_max as usize)),
            Some(b"NOT_YET") => {
                // Counts as a disruption: the node submits again on its next heartbeat.
                self.disruptions.fetch_add(1, Ordering::Relaxed);
                Err(StatekeeperError::Unavailable(format!(
                    "no node serves {} yet, and the grid's state is younger than a node lease; retrying",
                    request.function
                )))
            }
            _ => Err(corrupt("unexpected reply to submit", format!("{reply:?}"))),
        }
    }

    async fn claim(&self, queue: &QueueId, owner: &NodeId, max: usize) -> SkResult<Vec<Request>> {
        let max = max.to_string();
        let args = [queue.as_str().as_bytes(), owner.as_str().as_bytes(), max.as_bytes()];
        let reply: Vec<Vec<u8>> = self.run(&self.scripts.claim, &args).await?;
        parse_claimed(&reply)
    }

    async fn release_claims(&self, owner: &NodeId, keep: &[ReqId]) -> SkResult<usize> {
        let hex: Vec<String> = keep.iter().map(ReqId::to_hex).collect();
        let mut released = 0;
        let mut cursor = String::new();
        loop {
            let mut args: Vec<&[u8]> = vec![owner.as_str().as_bytes(), cursor.as_bytes()];
            args.extend(hex.iter().map(|h| h.as_bytes()));
            let (count, next): (usize, String) = self.run(&self.scripts.release_claims, &args).await?;
            released += count;
            if next.is_empty() {
                return Ok(released);
            }
            cursor = next;
        }
    }

    async fn complete(&self, request: &Request, outcome: &Outcome, memo: Memo, local: &NodeId) -> SkResult<bool> {
        let completion = self.completion(request, outcome, memo)?;
        let args = [
            completion.hex.as_bytes(),
            &completion.outcome,
            completion.memoize,
            local.as_str().as_bytes(),
            completion.ttl.as_bytes(),
            completion.count_max.as_bytes(),
            completion.group.as_bytes(),
            completion.forgets.as_bytes(),
        ];
        let (local_waits, memoized): (i64, i64) = self.run(&self.scripts.complete, &args).await?;
        if memoized == 1 {
            self.remember_completed(&request.id, outcome, &completion);
        }
        Ok(local_waits == 1)
    }

    async fn complete_and_claim(
        &self,
        request: &Request,
        outcome: &Outcome,
        memo: Memo,
        local: &NodeId,
        queue: &QueueId,
        max: usize,
    ) -> SkResult<(bool, Vec<Request>)> {
        let completion = self.completion(request, outcome, memo)?;
        let max = max.to_string();
        let args = [
            completion.hex.as_bytes(),
            &completion.outcome,
            completion.memoize,
            local.as_str().as_bytes(),
            completion.ttl.as_bytes(),
            queue.as_str().as_bytes(),
            max.as_bytes(),
            completion.count_max.as_bytes(),
            completion.group.as_bytes(),
            completion.forgets.as_bytes(),
        ];
        let (local_waits, memoized, claimed): (i64, i64, Vec<Vec<u8>>) =
            self.run(&self.scripts.complete_and_claim, &args).await?;
        if memoized == 1 {
            self.remember_completed(&request.id, outcome, &completion);
        }
        Ok((local_waits == 1, parse_claimed(&claimed)?))
    }

    async fn forget(&self, request: &Request) -> SkResult<bool> {
        let (hex, group) = (request.id.to_hex(), version_key(&request.function, request.version));
        let forgotten: i64 = self.run(&self.scripts.forget, &[hex.as_bytes(), group.as_bytes()]).await?;
        // Ours goes at once; the other nodes' go when the notice reaches them.
        self.near.lock().forget(&request.id);
        Ok(forgotten == 1)
    }

    async fn forget_all(&self, function: &str, version: u32) -> SkResult<u64> {
        let group = version_key(function, version);
        let mut first: &[u8] = b"1";
        let mut forgotten = 0;
        loop {
            let (removed, more): (u64, i64) = self.run(&self.scripts.forget_all, &[group.as_bytes(), first]).await?;
            if first == b"1" {
                self.near.lock().clear();
                first = b"0";
            }
            forgotten += removed;
            if more == 0 {
                return Ok(forgotten);
            }
        }
    }

    async fn cancel_tree(&self, root: &ReqId, waiter: &NodeId) -> SkResult<bool> {
        let hex = root.to_hex();
        let cancelled: i64 = self.run(&self.scripts.cancel_tree, &[hex.as_bytes(), waiter.as_str().as_bytes()]).await?;
        Ok(cancelled == 1)
    }

    async fn volunteer(&self, pool: &PoolId, member: &QueueId, credits: u32) -> SkResult<()> {
        let credits = credits.to_string();
        let args = [pool.as_str().as_bytes(), member.as_str().as_bytes(), credits.as_bytes()];
        expect_ok(self.run(&self.scripts.volunteer, &args).await?, pool)
    }

    async fn distribute(&self, pool: &PoolId, max: usize) -> SkResult<usize> {
        let max = max.to_string();
        self.run(&self.scripts.distribute, &[pool.as_str().as_bytes(), max.as_bytes()]).await
    }

    async fn hoist(&self, pool: &PoolId, max: usize) -> SkResult<usize> {
        let max = max.to_string();
        self.run(&self.scripts.hoist, &[pool.as_str().as_bytes(), max.as_bytes()]).await
    }

    async fn queue_len(&self, queue: &QueueId) -> SkResult<usize> {
        let mut conn = self.conn.get();
        redis::cmd("LLEN").arg(format!("{}q:{}", self.prefix, queue)).query_async(&mut conn).await.map_err(unavailable)
    }

    async fn pool_counters(&self, pool: &PoolId) -> SkResult<PoolCounters> {
        let reply: redis::Value = self.run(&self.scripts.pool_counters, &[pool.as_str().as_bytes()]).await?;
        let (handed_off, hoisted, queue_len) = <(u64, u64, usize)>::from_redis_value(reply)
            .map_err(|_| StatekeeperError::UnknownPool(pool.to_string()))?;
        Ok(PoolCounters { handed_off, hoisted, queue_len })
    }

    async fn wait_work(&self, queue: &QueueId, timeout_ms: u64) -> SkResult<()> {
        let signal = self.signal(queue);
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), signal.notified()).await;
        Ok(())
    }

    fn disruptions(&self) -> u64 {
        self.disruptions.load(Ordering::Relaxed)
    }

    async fn warnings(&self) -> Vec<String> {
        policy::memory_warnings(&mut self.conn.get()).await
    }

    fn node_ttl_ms(&self) -> u64 {
        self.config.node_ttl_ms
    }

    fn structures(&self) -> crate::structures::Store {
        self.structures.clone()
    }

    async fn open_inbox(&self, node: &NodeId) -> SkResult<BoxStream<'static, Event>> {
        let (tx, rx) = mpsc::channel(INBOX_CHANNEL_MAX);
        let reader = InboxReader {
            client: self.client.clone(),
            key: format!("{}inbox:{}", self.prefix, node),
            signals: self.signals.clone(),
            near: self.near.clone(),
            disruptions: self.disruptions.clone(),
            tx,
        };
        tokio::spawn(reader.run());
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) })))
    }
}

/// Reads one node's inbox on a connection of its own (blocking reads must not hold up the
/// shared connection), until the node drops its event stream.
struct InboxReader {
    client: redis::Client,
    key: String,
    signals: Signals,
    near: Arc<Mutex<Near>>,
    disruptions: Arc<AtomicU64>,
    tx: mpsc::Sender<Event>,
}

impl InboxReader {
    async fn run(self) {
        let mut backoff = Backoff::reconnect();
        let mut failing = false;
        while !self.tx.is_closed() {
            let config = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs_f64(INBOX_BLOCK_S + 5.0)))
                .set_connection_timeout(Some(Duration::from_secs(5)));
            let mut conn = match self.client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(conn) => conn,
                Err(err) => {
                    self.disruptions.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::error!(inbox = %self.key, error = %err, "Redis unreachable; retrying with backoff");
                        failing = true;
                    }
                    tokio::time::sleep(backoff.failed()).await;
                    continue;
                }
            };
            if failing {
                tracing::info!(inbox = %self.key, "Redis reachable again");
                failing = false;
            }
            backoff.succeeded();
            if let Err(err) = self.read(&mut conn).await {
                // Events popped in flight may be lost with the connection; the count tells
                // the node to recover them by resubmitting.
                self.disruptions.fetch_add(1, Ordering::Relaxed);
                if !self.tx.is_closed() {
                    tracing::warn!(inbox = %self.key, error = %err, "inbox connection lost; reconnecting");
                }
            }
        }
    }

    async fn read(&self, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
        while !self.tx.is_closed() {
            let popped: Option<(String, Vec<u8>)> =
                redis::cmd("BLPOP").arg(&self.key).arg(INBOX_BLOCK_S).query_async(conn).await?;
            let Some((_, first)) = popped else { continue };
            self.handle(&first).await;
            let more: Option<Vec<Vec<u8>>> =
                redis::cmd("LPOP").arg(&self.key).arg(INBOX_BATCH_MAX).query_async(conn).await?;
            for event in more.unwrap_or_default() {
                self.handle(&event).await;
            }
        }
        Ok(())
    }

    /// Wakes a local waiter, or hands an event to the node: waiting for room when the
    /// node is behind (the events not popped yet stay in Redis meanwhile).
    async fn handle(&self, event: &[u8]) {
        match parse_inbox_event(event) {
            Some(Inbox::Wake(queue)) => {
                // Only queues somebody here declared, joined or waits on have a signal.
                if let Some(signal) = self.signals.lock().get(&queue) {
                    signal.notify_one();
                }
            }
            Some(Inbox::Forget(id)) => self.near.lock().forget(&id),
            Some(Inbox::ForgetAll) => self.near.lock().clear(),
            Some(Inbox::Event(event)) => {
                // Fails only when the node dropped its stream: nobody waits any more.
                let _ = self.tx.send(event).await;
            }
            None => tracing::warn!(inbox = %self.key, "dropped an undecodable event"),
        }
    }
}

/// An inbox entry: `W` + queue, `D` + request id + outcome, `K` + request id + tree end,
/// `R` + request id + old tree + new tree (an adoption; trees as 16 hex digits),
/// `T` + tree id (16 hex digits) + tree end, `F` + request id (its outcome was forgotten),
/// `A` + function version (all its outcomes were forgotten; the near cache keeps no versions,
/// so all of it goes).
enum Inbox {
    Wake(QueueId),
    Forget(ReqId),
    ForgetAll,
    Event(Event),
}

fn parse_inbox_event(event: &[u8]) -> Option<Inbox> {
    let (tag, rest) = event.split_first()?;
    let id = |len: usize| rest.get(..len).and_then(|hex| std::str::from_utf8(hex).ok());
    let after = |len: usize| rest.get(len..).unwrap_or_default();
    let event = match tag {
        b'W' => return Some(Inbox::Wake(QueueId::new(String::from_utf8_lossy(rest).into_owned()))),
        b'F' => return ReqId::from_hex(id(64)?).map(Inbox::Forget),
        b'A' => return Some(Inbox::ForgetAll),
        b'D' => Event::Done { id: ReqId::from_hex(id(64)?)?, outcome: decode_outcome(after(64)).ok()? },
        b'K' => Event::Dropped { id: ReqId::from_hex(id(64)?)?, end: parse_tree_end(after(64))? },
        b'R' => Event::Adopted {
            id: ReqId::from_hex(id(64)?)?,
            from: u64::from_str_radix(std::str::from_utf8(rest.get(64..80)?).ok()?, 16).ok()?,
            tree: u64::from_str_radix(std::str::from_utf8(rest.get(80..96)?).ok()?, 16).ok()?,
        },
        b'T' => Event::TreeEnded { tree: u64::from_str_radix(id(16)?, 16).ok()?, end: parse_tree_end(after(16))? },
        _ => return None,
    };
    Some(Inbox::Event(event))
}

#[cfg(test)]
mod tests {
    use super::{encode_outcome, parse_inbox_event, redacted, Inbox};
    use crate::control::{Event, TreeEnd};
    use crate::id::ReqId;

    #[test]
    fn inbox_entries_parse_or_are_refused() {
        let id = ReqId::of("f", 1, b"x");
        let hex = id.to_hex();
        let done =
            [b"D".as_slice(), hex.as_bytes(), &encode_outcome(&Ok(bytes::Bytes::from_static(b"v"))).unwrap()].concat();
        assert!(matches!(parse_inbox_event(&done), Some(Inbox::Event(Event::Done { id: got, .. })) if got == id));
        let dropped = format!("K{hex}B500");
        assert!(matches!(
            parse_inbox_event(dropped.as_bytes()),
            Some(Inbox::Event(Event::Dropped { end: TreeEnd::OverBudget(500), .. }))
        ));
        let ended = parse_inbox_event(b"T00000000000000ffC");
        assert!(matches!(ended, Some(Inbox::Event(Event::TreeEnded { tree: 255, end: TreeEnd::Cancelled }))));
        assert!(matches!(parse_inbox_event(b"Wpool:main"), Some(Inbox::Wake(q)) if q.as_str() == "pool:main"));
        for bad in [&b""[..], b"X", b"D", b"Kshort", b"T00000000000000ffZ", b"Tnothexxxxxxxxxx C", b"K\xff"] {
            assert!(parse_inbox_event(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redacted("redis://:s3cret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redacted("rediss://user:pw@host/1"), "rediss://***@host/1");
        assert_eq!(redacted("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(redacted("not a url"), "not a url");
        assert_eq!(redacted("redis://:pa/ss@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redacted("redis:/:s3cret@host/0"), "***@host/0");
        assert_eq!(redacted("rediss//user:pw@host"), "***@host");
    }
}
