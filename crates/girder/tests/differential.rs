//! Differential test of the two statekeepers: the embedded one (`statekeeper/embedded.rs`)
//! and the Redis one (the Lua scripts in `statekeeper/redis/`) are driven with the same
//! seeded random sequence of operations and must give the same observable results.
//!
//! - `GIRDER_DIFF_SEEDS=N` runs seeds 0..N (default 200); `GIRDER_DIFF_SEED=S` runs seed S
//!   alone, with the operations printed as they run. A failing seed is printed with its
//!   operations and reproduces with `GIRDER_DIFF_SEED`.
//! - The universe is small so that requests collide: three nodes, two pools (`sub` inside
//!   `top`), four worker queues, functions `f`, `g`, `h` served by some nodes and `x` by
//!   none, three arguments each, at most 8 requests in flight.
//! - Time: nodes hold a 300 ms lease and every node the sequence considers alive
//!   heartbeats after a step once a sixth of a lease passed since the last time, so leases run out only at an `Expire` step, which stops
//!   one node's heartbeats and waits until its lease has run out on both. A run in which
//!   this process stalled for half a lease (a busy machine) proves nothing, so the seed is
//!   run again (at most three times).
//! - Normalization of results (everything else is compared as it is): errors compare by
//!   kind (their messages differ); the nodes `reap` returns and the live nodes compare as
//!   sorted lists of ids (their order is not part of the contract); the events of each
//!   node's inbox compare as a sorted list per step (the order in which the waiters of
//!   different requests are told is not part of the contract). Claims compare in order:
//!   which requests are handed out in which order is the contract.
//! - Redis-only pre-conditions: each seed runs in a namespace of its own on one shared
//!   `redis-server`, whose grid is marked as older than a lease (the key `born`), so that
//!   "no node serves this function" is final at once as it is in the embedded one. Inbox
//!   events are read straight from the node's inbox list instead of through a reader.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use girder::control::{Event, Memo, NodeId, NodeInfo, PoolId, QueueId, Statekeeper, Submitted};
use girder::testing::RedisServer;
use girder::{CallError, Embedded, EmbeddedConfig, Outcome, RedisConfig, RedisStatekeeper, Request, StatekeeperError};

const TTL_MS: u64 = 300;
const IN_FLIGHT_MAX: usize = 8;
const STEPS: usize = 60;
const DEFAULT_SEEDS: u64 = 200;
const TRIES_MAX: usize = 3;

const NODES: [&str; 3] = ["a", "b", "c"];
const FUNCTIONS: [&str; 4] = ["f", "g", "h", "x"];
const ARGS: u32 = 3;

fn served_by(node: &str) -> Vec<(String, u32)> {
    let names: &[&str] = match node {
        "a" => &["f", "g"],
        "b" => &["f", "h"],
        _ => &["g"],
    };
    names.iter().map(|n| ((*n).to_owned(), 1)).collect()
}

/// (worker queue, its pool, its node)
const WORKERS: [(&str, &str, &str); 4] =
    [("a/w0", "top", "a"), ("b/w0", "sub", "b"), ("c/w0", "sub", "c"), ("a/w1", "sub", "a")];

fn queues() -> Vec<QueueId> {
    let mut all = vec![QueueId::pool(&PoolId::new("top")), QueueId::pool(&PoolId::new("sub"))];
    all.extend(WORKERS.iter().map(|(w, _, _)| QueueId::worker(w)));
    all
}

fn request(function: &str, arg: u32) -> Request {
    Request::new(function, 1, Bytes::from(vec![arg as u8]))
}

fn all_requests() -> Vec<Request> {
    FUNCTIONS.iter().flat_map(|f| (0..ARGS).map(move |a| request(f, a))).collect()
}

fn label(req: &Request) -> String {
    let lost = if req.lost > 0 { format!("~lost{}", req.lost) } else { String::new() };
    let forgets = if req.forgets > 0 { format!("~forgets{}", req.forgets) } else { String::new() };
    format!("{}{}{lost}{forgets}", req.function, req.args.first().copied().unwrap_or(0))
}

fn label_of(id: &girder::ReqId) -> String {
    all_requests().iter().find(|r| r.id == *id).map_or_else(|| id.to_hex(), label)
}

#[derive(Debug, Clone)]
enum Op {
    Submit { req: Request, queue: QueueId, front: bool, waiter: NodeId },
    Claim { queue: QueueId, owner: NodeId, max: usize },
    Complete { req: Request, outcome: Outcome, memoize: Memo, local: NodeId },
    CompleteAndClaim { req: Request, outcome: Outcome, memoize: Memo, local: NodeId, queue: QueueId, max: usize },
    Forget { req: Request },
    ForgetAll { function: String, version: u32 },
    Volunteer { pool: PoolId, member: QueueId, credits: u32 },
    Distribute { pool: PoolId, max: usize },
    Hoist { pool: PoolId, max: usize },
    Release { owner: NodeId, keep: Vec<Request> },
    Heartbeat { node: NodeId },
    Reap,
    Deregister { node: NodeId },
    Register { node: NodeId },
    LeavePool { pool: PoolId, member: QueueId },
    Expire { node: NodeId },
    LiveNodes,
    QueueLen { queue: QueueId },
    PoolCounters { pool: PoolId },
    Result { req: Request },
    FunctionVersion { function: String },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = |o: &Outcome| match o {
            Ok(b) => format!("Ok({b:?})"),
            Err(e) => format!("Err({e})"),
        };
        match self {
            Op::Submit { req, queue, front, waiter } => {
                write!(f, "submit {} -> {queue} front={front} waiter={waiter}", label(req))
            }
            Op::Claim { queue, owner, max } => write!(f, "claim {queue} owner={owner} max={max}"),
            Op::Complete { req, outcome, memoize, local } => {
                write!(f, "complete {} {} memoize={memoize:?} local={local}", label(req), o(outcome))
            }
            Op::Forget { req } => write!(f, "forget {}", label(req)),
            Op::CompleteAndClaim { req, outcome, memoize, local, queue, max } => write!(
                f,
                "complete_and_claim {} {} memoize={memoize:?} local={local} then {queue} max={max}",
                label(req),
                o(outcome)
            ),
            Op::Release { owner, keep } => {
                write!(f, "release_claims {owner} keep={:?}", keep.iter().map(label).collect::<Vec<_>>())
            }
            other => write!(f, "{other:?}"),
        }
    }
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn random_request(rng: &mut fastrand::Rng) -> Request {
    let function = if rng.u8(..10) == 0 { "x" } else { *pick(rng, &FUNCTIONS[..3]) };
    request(function, rng.u32(..ARGS))
}

fn random_node(rng: &mut fastrand::Rng) -> NodeId {
    NodeId::new(*pick(rng, &NODES))
}

/// A memo as completions ask for it: the store's ttl, a function's long one (no sequence
/// lasts long enough for it to run out), or none.
fn random_memo(rng: &mut fastrand::Rng) -> Memo {
    match rng.u8(..10) {
        0 => Memo::Skip,
        1 => Memo::For(0),
        2 | 3 => Memo::For(60_000),
        _ => Memo::Keep,
    }
}

fn random_outcome(rng: &mut fastrand::Rng, step: usize) -> (Outcome, Memo) {
    match rng.u8(..6) {
        0 => (Err(CallError::Function { function: "f".into(), message: format!("no {step}") }), random_memo(rng)),
        1 => (Err(CallError::Panic { function: "f".into(), message: "boom".into() }), Memo::Skip),
        _ => (Ok(Bytes::from(format!("v{step}"))), random_memo(rng)),
    }
}

fn random_op(rng: &mut fastrand::Rng, step: usize) -> Op {
    let queues = queues();
    let pools = [PoolId::new("top"), PoolId::new("sub")];
    match rng.u32(..1000) {
        0..=249 => Op::Submit {
            req: random_request(rng),
            queue: pick(rng, &queues).clone(),
            front: rng.bool(),
            waiter: random_node(rng),
        },
        250..=399 => Op::Claim { queue: pick(rng, &queues).clone(), owner: random_node(rng), max: rng.usize(1..4) },
        400..=509 => {
            let (outcome, memoize) = random_outcome(rng, step);
            Op::Complete { req: random_request(rng), outcome, memoize, local: random_node(rng) }
        }
        510..=559 => {
            let (outcome, memoize) = random_outcome(rng, step);
            Op::CompleteAndClaim {
                req: random_request(rng),
                outcome,
                memoize,
                local: random_node(rng),
                queue: pick(rng, &queues).clone(),
                max: rng.usize(0..3),
            }
        }
        560..=669 => {
            let (member, pool, _) = *pick(rng, &WORKERS);
            // Now and then a member at the wrong pool, or a pool nobody declared.
            let pool = match rng.u8(..12) {
                0 => "nope",
                1 => "top",
                _ => pool,
            };
            Op::Volunteer { pool: PoolId::new(pool), member: QueueId::worker(member), credits: rng.u32(0..4) }
        }
        670..=719 => Op::Distribute { pool: pick(rng, &pools).clone(), max: rng.usize(1..5) },
        720..=789 => Op::Hoist { pool: pick(rng, &pools).clone(), max: rng.usize(1..5) },
        790..=829 => {
            let keep = (0..rng.usize(0..3)).map(|_| random_request(rng)).collect();
            Op::Release { owner: random_node(rng), keep }
        }
        830..=849 => Op::Heartbeat { node: random_node(rng) },
        850..=874 => Op::Reap,
        875..=899 => Op::Deregister { node: random_node(rng) },
        900..=934 => Op::Register { node: random_node(rng) },
        935..=944 => {
            let (member, pool, _) = *pick(rng, &WORKERS);
            Op::LeavePool { pool: PoolId::new(pool), member: QueueId::worker(member) }
        }
        945..=947 => Op::Expire { node: random_node(rng) },
        948..=959 => Op::LiveNodes,
        960..=974 => Op::QueueLen { queue: pick(rng, &queues).clone() },
        975..=984 => Op::PoolCounters { pool: pick(rng, &pools).clone() },
        985..=989 => Op::Result { req: random_request(rng) },
        990..=994 => Op::Forget { req: random_request(rng) },
        995..=996 => Op::ForgetAll { function: (*pick(rng, &FUNCTIONS)).to_owned(), version: rng.u32(1..3) },
        _ => Op::FunctionVersion { function: (*pick(rng, &FUNCTIONS)).to_owned() },
    }
}

fn err_kind(err: &StatekeeperError) -> &'static str {
    match err {
        StatekeeperError::Unavailable(_) => "Unavailable",
        StatekeeperError::UnknownPool(_) => "UnknownPool",
        StatekeeperError::Corrupt(_) => "Corrupt",
        StatekeeperError::Overloaded(_) => "Overloaded",
        StatekeeperError::DuplicateNode(_) => "DuplicateNode",
    }
}

fn show<T>(result: Result<T, StatekeeperError>, ok: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => ok(value),
        Err(err) => format!("Err({})", err_kind(&err)),
    }
}

fn show_claimed(claimed: Vec<Request>) -> String {
    format!("{:?}", claimed.iter().map(label).collect::<Vec<_>>())
}

fn show_outcome(outcome: &Outcome) -> String {
    match outcome {
        Ok(bytes) => format!("Ok({})", String::from_utf8_lossy(bytes)),
        Err(err) => format!("Err({err})"),
    }
}

/// One statekeeper under test, with what the test keeps beside it.
struct Side {
    sk: Arc<dyn Statekeeper>,
    /// Embedded: the inbox streams, one per registered node.
    inboxes: Vec<(NodeId, BoxStream<'static, Event>)>,
    /// Redis: a connection and the key prefix, to read inboxes directly.
    redis: Option<(redis::aio::MultiplexedConnection, String)>,
}

impl Side {
    async fn apply(&mut self, op: &Op) -> String {
        let sk = self.sk.clone();
        match op {
            Op::Submit { req, queue, front, waiter } => {
                show(sk.submit(req, queue, *front, waiter).await, |s| match s {
                    Submitted::Done(outcome) => format!("Done({})", show_outcome(&outcome)),
                    other => format!("{other:?}"),
                })
            }
            Op::Claim { queue, owner, max } => show(sk.claim(queue, owner, *max).await, show_claimed),
            Op::Complete { req, outcome, memoize, local } => {
                show(sk.complete(req, outcome, *memoize, local).await, |w| format!("{w}"))
            }
            Op::CompleteAndClaim { req, outcome, memoize, local, queue, max } => {
                show(sk.complete_and_claim(req, outcome, *memoize, local, queue, *max).await, |(w, c)| {
                    format!("{w} {}", show_claimed(c))
                })
            }
            Op::Forget { req } => show(sk.forget(req).await, |f| f.to_string()),
            Op::ForgetAll { function, version } => show(sk.forget_all(function, *version).await, |n| n.to_string()),
            Op::Volunteer { pool, member, credits } => {
                show(sk.volunteer(pool, member, *credits).await, |()| "ok".into())
            }
            Op::Distribute { pool, max } => show(sk.distribute(pool, *max).await, |n| n.to_string()),
            Op::Hoist { pool, max } => show(sk.hoist(pool, *max).await, |n| n.to_string()),
            Op::Release { owner, keep } => {
                let keep: Vec<_> = keep.iter().map(|r| r.id).collect();
                show(sk.release_claims(owner, &keep).await, |n| n.to_string())
            }
            Op::Heartbeat { node } => show(sk.heartbeat(node, &NodeInfo::default()).await, |k| k.to_string()),
            Op::Reap => show(sk.reap().await, |mut dead| {
                dead.sort();
                format!("{dead:?}")
            }),
            Op::Deregister { node } => show(sk.deregister_node(node).await, |()| "ok".into()),
            Op::Register { node } => {
                let result = sk.register_node(node, &served_by(node.as_str())).await;
                if result.is_ok() {
                    self.opened(node).await;
                    for (worker, pool, owner) in WORKERS {
                        if owner == node.as_str() {
                            let joined = sk.join_pool(&PoolId::new(pool), &QueueId::worker(worker), node).await;
                            joined.expect("join_pool of a declared pool");
                        }
                    }
                }
                show(result, |()| "ok".into())
            }
            Op::LeavePool { pool, member } => show(sk.leave_pool(pool, member).await, |()| "ok".into()),
            Op::Expire { .. } => "expired".into(),
            Op::LiveNodes => show(sk.live_nodes().await, |nodes| {
                let mut ids: Vec<String> = nodes.into_iter().map(|n| n.id).collect();
                ids.sort();
                format!("{ids:?}")
            }),
            Op::QueueLen { queue } => show(sk.queue_len(queue).await, |n| n.to_string()),
            Op::PoolCounters { pool } => show(sk.pool_counters(pool).await, |c| format!("{c:?}")),
            Op::Result { req } => show(sk.result(&req.id).await, |o| format!("{:?}", o.as_ref().map(show_outcome))),
            Op::FunctionVersion { function } => show(sk.function_version(function).await, |v| format!("{v:?}")),
        }
    }

    /// Embedded: a node registered (again) gets a new inbox.
    async fn opened(&mut self, node: &NodeId) {
        if self.redis.is_some() {
            return;
        }
        // Fused: the stream ends when the node is removed, and is polled again after.
        let stream = self.sk.open_inbox(node).await.expect("open_inbox after register").fuse().boxed();
        self.inboxes.retain(|(n, _)| n != node);
        self.inboxes.push((node.clone(), stream));
    }

    /// The `Done` events delivered since the last call, as sorted `node id outcome` lines.
    async fn drain_events(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if let Some((conn, prefix)) = &mut self.redis {
            for node in NODES {
                let key = format!("{prefix}inbox:{node}");
                let (items, ()): (Vec<Vec<u8>>, ()) =
                    redis::pipe().atomic().lrange(&key, 0, -1).del(&key).query_async(conn).await.expect("inbox");
                for item in items {
                    if let Some((b'D', rest)) = item.split_first() {
                        let id = std::str::from_utf8(&rest[..64]).ok().and_then(girder::ReqId::from_hex).expect("id");
                        let outcome: Outcome = girder::codec::decode(&rest[64..]).expect("outcome");
                        events.push(format!("{node} {} {}", label_of(&id), show_outcome(&outcome)));
                    }
                }
            }
        } else {
            for (node, stream) in &mut self.inboxes {
                while let Some(Some(Event::Done { id, outcome })) = stream.next().now_or_never() {
                    events.push(format!("{node} {} {}", label_of(&id), show_outcome(&outcome)));
                }
            }
        }
        events.sort();
        events
    }

    /// Everything comparable at the end of a sequence.
    async fn snapshot(&mut self) -> Vec<String> {
        let sk = self.sk.clone();
        let mut lines = Vec::new();
        for queue in queues() {
            lines.push(format!("queue_len {queue} = {}", show(sk.queue_len(&queue).await, |n| n.to_string())));
        }
        for pool in ["top", "sub"] {
            let counters = show(sk.pool_counters(&PoolId::new(pool)).await, |c| format!("{c:?}"));
            lines.push(format!("pool_counters {pool} = {counters}"));
        }
        let live = show(sk.live_nodes().await, |nodes| {
            let mut ids: Vec<String> = nodes.into_iter().map(|n| n.id).collect();
            ids.sort();
            format!("{ids:?}")
        });
        lines.push(format!("live_nodes = {live}"));
        for function in FUNCTIONS {
            lines.push(format!(
                "function_version {function} = {}",
                show(sk.function_version(function).await, |v| format!("{v:?}"))
            ));
        }
        for req in all_requests() {
            let result = show(sk.result(&req.id).await, |o| format!("{:?}", o.as_ref().map(show_outcome)));
            lines.push(format!("result {} = {result}", label(&req)));
        }
        lines
    }
}

async fn setup(side: &mut Side) {
    let sk = side.sk.clone();
    for node in NODES {
        sk.register_node(&NodeId::new(node), &served_by(node)).await.expect("register");
        side.opened(&NodeId::new(node)).await;
    }
    let (top, sub) = (PoolId::new("top"), PoolId::new("sub"));
    sk.declare_pool(&top, None, &NodeId::new("a")).await.expect("declare top");
    sk.declare_pool(&sub, Some(&top), &NodeId::new("b")).await.expect("declare sub");
    for (worker, pool, node) in WORKERS {
        sk.join_pool(&PoolId::new(pool), &QueueId::worker(worker), &NodeId::new(node)).await.expect("join");
    }
}

enum Verdict {
    Same,
    /// This process stalled for half a lease: leases may have run out by accident.
    Inconclusive,
    Differs(String),
}

async fn run_seed(url: &str, seed: u64, attempt: usize, verbose: bool) -> Verdict {
    let embedded = EmbeddedConfig { node_ttl_ms: TTL_MS, in_flight_max: IN_FLIGHT_MAX, ..Default::default() };
    let mut config = RedisConfig::new(url);
    config.namespace = format!("diff-{seed}-{attempt}");
    config.node_ttl_ms = TTL_MS;
    config.in_flight_max = IN_FLIGHT_MAX as u64;
    let redis_sk = RedisStatekeeper::connect(config).await.expect("connects");
    let prefix = redis_sk.prefix().to_owned();
    let conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.expect("admin connection");
    let mut sides = [
        Side { sk: Arc::new(Embedded::new(embedded)), inboxes: Vec::new(), redis: None },
        Side { sk: Arc::new(redis_sk), inboxes: Vec::new(), redis: Some((conn.clone(), prefix.clone())) },
    ];
    for side in &mut sides {
        setup(side).await;
    }
    // The grid is older than a lease: "nobody serves this function" is final at once.
    let _: () = redis::cmd("SET").arg(format!("{prefix}born")).arg(1).query_async(&mut conn.clone()).await.unwrap();

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut log = String::new();
    let mut silent: HashSet<NodeId> = HashSet::new();
    let mut beat_at = Instant::now();
    let half_lease = Duration::from_millis(TTL_MS / 2);
    for step in 0..STEPS {
        let op = random_op(&mut rng, step);
        if verbose {
            println!("step {step}: {op}");
        }
        if let Op::Expire { node } = &op {
            // Stop its heartbeats and wait until its lease ran out on both, keeping the
            // others alive meanwhile.
            silent.insert(node.clone());
            let stopped = Instant::now();
            while stopped.elapsed() < Duration::from_millis(TTL_MS + 60) {
                tokio::time::sleep(Duration::from_millis(40)).await;
                if beat_at.elapsed() > half_lease {
                    return Verdict::Inconclusive;
                }
                for side in &mut sides {
                    for other in NODES.map(NodeId::new).iter().filter(|n| !silent.contains(n)) {
                        side.sk.heartbeat(other, &NodeInfo::default()).await.expect("heartbeat");
                    }
                }
                beat_at = Instant::now();
            }
        }
        if let Op::Heartbeat { node } | Op::Register { node } = &op {
            silent.remove(node);
        }
        // Keep alive every node the sequence has not silenced, every sixth of a lease (on
        // both sides alike; heartbeats change nothing else that is compared).
        let beat_now = beat_at.elapsed() > Duration::from_millis(TTL_MS / 6);
        let mut results = Vec::new();
        for side in &mut sides {
            let result = side.apply(&op).await;
            let events = side.drain_events().await;
            let mut beats = String::new();
            for node in NODES.map(NodeId::new).iter().filter(|n| beat_now && !silent.contains(n)) {
                let known = show(side.sk.heartbeat(node, &NodeInfo::default()).await, |k| k.to_string());
                let _ = write!(beats, "{node}:{known} ");
            }
            results.push((result, events, beats));
        }
        if beat_at.elapsed() > half_lease {
            return Verdict::Inconclusive;
        }
        if beat_now {
            beat_at = Instant::now();
        }
        let _ = writeln!(log, "  step {step}: {op}  =>  {}  events {:?}", results[0].0, results[0].1);
        if results[0] != results[1] {
            return Verdict::Differs(format!(
                "seed {seed} differs at step {step} ({op})\n  embedded: {:?}\n  redis:    {:?}\n\
                 operations so far:\n{log}\nrerun with GIRDER_DIFF_SEED={seed}",
                results[0], results[1]
            ));
        }
    }
    let embedded_state = sides[0].snapshot().await;
    let redis_state = sides[1].snapshot().await;
    if beat_at.elapsed() > half_lease {
        return Verdict::Inconclusive;
    }
    for (e, r) in embedded_state.iter().zip(&redis_state) {
        if e != r {
            return Verdict::Differs(format!(
                "seed {seed} ends in different states: embedded {e} / redis {r}\noperations:\n{log}\n\
                 rerun with GIRDER_DIFF_SEED={seed}"
            ));
        }
    }
    // Leave the shared server as we found it.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("girder:{{diff-{seed}-{attempt}}}:*"))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn.clone()).await.unwrap();
    }
    Verdict::Same
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_redis_statekeepers_agree() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    let (seeds, verbose): (Vec<u64>, bool) = match env("GIRDER_DIFF_SEED") {
        Some(seed) => (vec![seed], true),
        None => ((0..env("GIRDER_DIFF_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(), false),
    };
    let begun = Instant::now();
    let mut retried = 0;
    for &seed in &seeds {
        let mut attempt = 0;
        loop {
            match run_seed(&url, seed, attempt, verbose).await {
                Verdict::Same => break,
                Verdict::Differs(report) => panic!("{report}"),
                Verdict::Inconclusive => {
                    attempt += 1;
                    retried += 1;
                    assert!(
                        attempt < TRIES_MAX,
                        "seed {seed}: this process stalled for half a lease {TRIES_MAX} times"
                    );
                }
            }
        }
    }
    println!("{} seeds agree in {:.1?} ({retried} runs repeated after a stall)", seeds.len(), begun.elapsed());
}
