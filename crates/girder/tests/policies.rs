//! Per-function policies on both statekeepers: retries of panics and of evaluations lost
//! with their node, node overrides over the attribute, memo TTLs (near caches included),
//! forgetting results, and time limits that cancel the evaluation and memoize nothing.
//!
//! Every case runs on an embedded grid and on a Redis one, each with two nodes that serve
//! the functions, so a result reaches a node's near cache from another node's evaluation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use girder::testing::RedisServer;
use girder::{
    CallError, Client, Ctx, Embedded, EmbeddedConfig, Node, Policy, PoolSpec, RedisConfig, RedisStatekeeper, Registry,
    Statekeeper, WorkerSpec,
};

/// Per key, how often something happened to it (keys are unique per case and backend).
#[derive(Default)]
struct Counts(Mutex<HashMap<String, u64>>);

impl Counts {
    fn bump(&self, key: &str) -> u64 {
        let mut map = self.0.lock().unwrap();
        let count = map.entry(key.to_owned()).or_insert(0);
        *count += 1;
        *count
    }

    fn get(&self, key: &str) -> u64 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

static ATTEMPTS: std::sync::LazyLock<Counts> = std::sync::LazyLock::new(Counts::default);
static EVALUATIONS: std::sync::LazyLock<Counts> = std::sync::LazyLock::new(Counts::default);
static FINISHED: std::sync::LazyLock<Counts> = std::sync::LazyLock::new(Counts::default);
static DROPPED: std::sync::LazyLock<Counts> = std::sync::LazyLock::new(Counts::default);

/// Panics on its first `failures` attempts for `key`, then returns the attempt it is.
#[girder::function(name = "test/flaky", retries = 3)]
async fn flaky(_ctx: Ctx, key: String, failures: u64) -> u64 {
    let attempt = ATTEMPTS.bump(&key);
    if attempt <= failures {
        std::panic::panic_any(format!("flaky {key}: attempt {attempt}"));
    }
    attempt
}

/// [`flaky`] as a blocking function.
#[girder::function(name = "test/flaky_blocking", retries = 3)]
fn flaky_blocking(_ctx: Ctx, key: String, failures: u64) -> u64 {
    let attempt = ATTEMPTS.bump(&key);
    if attempt <= failures {
        std::panic::panic_any(format!("flaky {key}: attempt {attempt}"));
    }
    attempt
}

/// [`flaky`] without a policy: the node's default, no retry of panics.
#[girder::function(name = "test/fragile")]
async fn fragile(_ctx: Ctx, key: String, failures: u64) -> u64 {
    let attempt = ATTEMPTS.bump(&key);
    if attempt <= failures {
        std::panic::panic_any(format!("fragile {key}: attempt {attempt}"));
    }
    attempt
}

const SHORT_TTL_MS: u64 = 1_000;

/// Returns how many times it was evaluated for `key`; its results live a second.
#[girder::function(name = "test/fleeting", ttl_ms = 1_000)]
async fn fleeting(_ctx: Ctx, key: String) -> u64 {
    EVALUATIONS.bump(&key)
}

/// Returns how many times it was evaluated for `key`; its results live as long as the store keeps them.
#[girder::function(name = "test/kept")]
async fn kept(_ctx: Ctx, key: String) -> u64 {
    EVALUATIONS.bump(&key)
}

/// Counts its evaluation's drop (an evaluation cancelled mid-way is dropped unfinished).
struct CountDrop(String);

impl Drop for CountDrop {
    fn drop(&mut self) {
        DROPPED.bump(&self.0);
    }
}

/// Sleeps `ms` within a time limit of 300 ms; counts its starts, ends and drops.
#[girder::function(name = "test/overrun", timeout_ms = 300)]
async fn overrun(_ctx: Ctx, key: String, ms: u64) -> u64 {
    EVALUATIONS.bump(&key);
    let _dropped = CountDrop(key.clone());
    tokio::time::sleep(Duration::from_millis(ms)).await;
    FINISHED.bump(&key);
    ms
}

/// Its first evaluation for `key` hangs (an evaluation to lose with its node); later ones
/// return at once how many there were.
#[girder::function(name = "test/stuck")]
async fn stuck(_ctx: Ctx, key: String) -> u64 {
    let evaluation = EVALUATIONS.bump(&key);
    if evaluation == 1 {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    evaluation
}

fn registry() -> Registry {
    Registry::new()
        .with::<flaky>()
        .with::<flaky_blocking>()
        .with::<fragile>()
        .with::<fleeting>()
        .with::<kept>()
        .with::<overrun>()
        .with::<stuck>()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Redis,
}

const NODE_TTL_MS: u64 = 1_500;
const HEARTBEAT_MS: u64 = 250;

/// Where the grid's state lives; a Redis server lives as long as this.
struct Store {
    backend: Backend,
    embedded: Option<Arc<dyn Statekeeper>>,
    redis: Option<RedisServer>,
}

impl Store {
    fn new(backend: Backend) -> Store {
        match backend {
            Backend::Embedded => {
                let config = EmbeddedConfig { node_ttl_ms: NODE_TTL_MS, ..Default::default() };
                let embedded: Arc<dyn Statekeeper> = Arc::new(Embedded::new(config));
                Store { backend, embedded: Some(embedded), redis: None }
            }
            Backend::Redis => {
                let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
                Store { backend, embedded: None, redis: Some(server) }
            }
        }
    }

    /// A statekeeper of this store: the shared embedded one, or a connection of its own.
    async fn statekeeper(&self) -> Arc<dyn Statekeeper> {
        match (&self.embedded, &self.redis) {
            (Some(embedded), _) => embedded.clone(),
            (None, Some(server)) => {
                let mut config = RedisConfig::new(server.url());
                config.node_ttl_ms = NODE_TTL_MS;
                Arc::new(RedisStatekeeper::connect(config).await.expect("connects to Redis"))
            }
            (None, None) => unreachable!("a store is embedded or on Redis"),
        }
    }

    /// A node `id` with `workers` workers (none: it only calls) and these policy overrides.
    async fn node(&self, id: &str, workers: usize, overrides: &[(&str, Policy)]) -> Node {
        let mut builder = Node::builder()
            .id(id)
            .registry(registry())
            .statekeeper(self.statekeeper().await)
            .heartbeat_ms(HEARTBEAT_MS)
            .pool(PoolSpec::new("main"))
            .workers(WorkerSpec::new("main", workers, 4));
        for (name, policy) in overrides {
            builder = builder.policy(*name, *policy);
        }
        builder.start().await.expect("node starts")
    }

    /// Two nodes serving every function with these overrides.
    async fn pair(&self, overrides: &[(&str, Policy)]) -> (Node, Node) {
        (self.node("a", 1, overrides).await, self.node("b", 1, overrides).await)
    }

    /// A node that evaluates (`a`) and one that only calls (`b`): what `b` knows of a result
    /// it read, it keeps in its near cache (on Redis), never refreshed by its own evaluation.
    async fn worker_and_reader(&self) -> (Node, Node) {
        (self.node("a", 1, &[]).await, self.node("b", 0, &[]).await)
    }

    fn key(&self, name: &str) -> String {
        format!("{:?}/{name}", self.backend)
    }
}

/// Runs `case` on an embedded grid, then on a Redis one.
async fn on_both<F, Fut>(case: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in [Backend::Embedded, Backend::Redis] {
        case(Store::new(backend)).await;
    }
}

async fn shutdown(nodes: &[&Node]) {
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_are_retried_up_to_the_functions_retries() {
    on_both(|store| async move {
        let (a, b) = store.pair(&[]).await;
        let client = a.client();
        let key = store.key("twice");
        assert_eq!(
            flaky::call(&client, key.clone(), 2).await,
            Ok(3),
            "{:?}: panicked twice, then a value",
            store.backend
        );
        assert_eq!(ATTEMPTS.get(&key), 3);
        assert_eq!(flaky::call(&b.client(), key.clone(), 2).await, Ok(3), "the value is memoized");
        assert_eq!(ATTEMPTS.get(&key), 3);
        let key = store.key("blocking twice");
        assert_eq!(flaky_blocking::call(&client, key.clone(), 2).await, Ok(3), "{:?}: blocking too", store.backend);
        let key = store.key("four times");
        let err = flaky::call(&client, key.clone(), 4).await.expect_err("4 panics are over 3 retries");
        assert!(matches!(&err, CallError::Panic { message, .. } if message.contains("attempt 4")), "{err}");
        assert_eq!(ATTEMPTS.get(&key), 4, "run once and retried 3 times");
        // Not memoized: a later call runs it again (and its 5th attempt succeeds).
        assert_eq!(flaky::call(&client, key.clone(), 4).await, Ok(5));
        // Without a policy, a panic is not retried.
        let key = store.key("fragile");
        assert!(matches!(fragile::call(&client, key.clone(), 1).await, Err(CallError::Panic { .. })));
        assert_eq!(ATTEMPTS.get(&key), 1);
        shutdown(&[&a, &b]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_overrides_beat_the_attribute() {
    on_both(|store| async move {
        let one_retry = Policy { retries: Some(1), ..Policy::NODE };
        let longer = Policy { timeout_ms: Some(5_000), ..Policy::NODE };
        let (a, b) = store.pair(&[("test/flaky", one_retry), ("test/overrun", longer)]).await;
        let client = a.client();
        let key = store.key("override");
        let err = flaky::call(&client, key.clone(), 2).await.expect_err("retries = 1 on the nodes");
        assert!(matches!(&err, CallError::Panic { message, .. } if message.contains("attempt 2")), "{err}");
        assert_eq!(ATTEMPTS.get(&key), 2, "{:?}: run once and retried once", store.backend);
        // The attribute's 300 ms limit would abandon a 600 ms sleep; the nodes allow 5 s.
        assert_eq!(overrun::call(&client, store.key("longer"), 600).await, Ok(600));
        shutdown(&[&a, &b]).await;
    })
    .await;
}

/// Calls `fleeting` through `client` until it was evaluated again (`want`), within `within`.
async fn until_evaluated(client: &Client, key: &str, want: u64, within: Duration) -> u64 {
    let begun = Instant::now();
    loop {
        let got = fleeting::call(client, key.to_owned()).await.expect("fleeting answers");
        if got >= want {
            return got;
        }
        assert!(begun.elapsed() < within, "{key}: still the memoized result after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_after_their_ttl_near_caches_included() {
    on_both(|store| async move {
        let (a, b) = store.worker_and_reader().await;
        let key = store.key("ttl");
        let begun = Instant::now();
        assert_eq!(fleeting::call(&a.client(), key.clone()).await, Ok(1));
        // b reads it twice: the second read is served by its near cache (on Redis).
        for _ in 0..2 {
            let got = fleeting::call(&b.client(), key.clone()).await;
            if begun.elapsed() < Duration::from_millis(SHORT_TTL_MS / 2) {
                assert_eq!(got, Ok(1), "{:?}: memoized within its ttl", store.backend);
            }
        }
        let again = until_evaluated(&b.client(), &key, 2, Duration::from_millis(SHORT_TTL_MS + 2_000)).await;
        assert_eq!(again, 2);
        assert!(begun.elapsed() >= Duration::from_millis(SHORT_TTL_MS), "expired early: {:?}", begun.elapsed());
        // And the new result is memoized for a ttl of its own.
        assert_eq!(fleeting::call(&a.client(), key.clone()).await, Ok(2));
        shutdown(&[&a, &b]).await;
    })
    .await;
}

/// Calls `kept` through `client` until it returns `want`, within one heartbeat and a margin
/// (the notice of a forget reaches other nodes' near caches at once, or with a heartbeat).
async fn until_kept(client: &Client, key: &str, want: u64) {
    let within = Duration::from_millis(HEARTBEAT_MS + 1_000);
    let begun = Instant::now();
    loop {
        let got = kept::call(client, key.to_owned()).await.expect("kept answers");
        if got == want {
            return;
        }
        assert!(begun.elapsed() < within, "{key}: {got}, not {want}, after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_results_are_computed_again_and_the_others_stay() {
    on_both(|store| async move {
        let (a, b) = store.worker_and_reader().await;
        let keys: Vec<String> = (0..3).map(|n| store.key(&format!("forget {n}"))).collect();
        for key in &keys {
            assert_eq!(kept::call(&a.client(), key.clone()).await, Ok(1));
            // Twice through b: its near cache holds them now (on Redis).
            for _ in 0..2 {
                assert_eq!(kept::call(&b.client(), key.clone()).await, Ok(1));
            }
        }
        assert_eq!(a.client().forget::<kept>((keys[0].clone(),)).await, Ok(true));
        assert_eq!(a.client().forget::<kept>((keys[0].clone(),)).await, Ok(false), "forgotten already");
        // The forgetting node computes it again at once; the other one, whose near cache held
        // it, once told.
        assert_eq!(kept::call(&a.client(), keys[0].clone()).await, Ok(2), "{:?}", store.backend);
        until_kept(&b.client(), &keys[0], 2).await;
        // By name with JSON arguments, from the node that only calls: the same identity.
        assert_eq!(b.client().forget_json("test/kept", &serde_json::json!([keys[1]])).await, Ok(true));
        assert_eq!(kept::call(&b.client(), keys[1].clone()).await, Ok(2));
        until_kept(&a.client(), &keys[1], 2).await;
        assert_eq!(kept::call(&a.client(), keys[2].clone()).await, Ok(1), "the others stay");
        assert_eq!(kept::call(&b.client(), keys[2].clone()).await, Ok(1));
        // Every result of the version: three are memoized.
        assert_eq!(b.client().forget_all("test/kept").await, Ok(3));
        for (key, want) in keys.iter().zip([3, 3, 2]) {
            assert_eq!(kept::call(&b.client(), key.clone()).await, Ok(want), "{key}");
            until_kept(&a.client(), key, want).await;
        }
        let unknown = a.client().forget_all("test/nobody").await;
        assert!(matches!(unknown, Err(CallError::UnknownFunction { .. })), "{unknown:?}");
        shutdown(&[&a, &b]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_limit_cancels_the_evaluation_and_memoizes_nothing() {
    on_both(|store| async move {
        let (a, b) = store.pair(&[]).await;
        let key = store.key("overrun");
        for attempt in 1..=2 {
            let begun = Instant::now();
            let err = overrun::call(&a.client(), key.clone(), 10_000).await.expect_err("over its 300 ms limit");
            assert!(matches!(err, CallError::TimeLimitExceeded { limit_ms: 300, .. }), "{err}");
            assert!(begun.elapsed() < Duration::from_secs(5), "answered by the limit, not the sleep");
            assert_eq!(EVALUATIONS.get(&key), attempt, "{:?}: not memoized, so it runs again", store.backend);
        }
        // Each evaluation was dropped unfinished, at once.
        let begun = Instant::now();
        while DROPPED.get(&key) < 2 {
            assert!(begun.elapsed() < Duration::from_secs(2), "the evaluations were not cancelled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(FINISHED.get(&key), 0);
        // Within its limit, it is memoized as usual.
        let quick = store.key("quick");
        assert_eq!(overrun::call(&a.client(), quick.clone(), 10).await, Ok(10));
        assert_eq!(overrun::call(&b.client(), quick.clone(), 10).await, Ok(10));
        assert_eq!(EVALUATIONS.get(&quick), 1);
        shutdown(&[&a, &b]).await;
    })
    .await;
}

/// Polls until `node` has started evaluating `function`.
async fn until_running(node: &Node, function: &str) {
    let begun = Instant::now();
    while node.evaluations_of(function) == 0 {
        assert!(begun.elapsed() < Duration::from_secs(5), "{function} never started on {}", node.id());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request whose node leaves while evaluating it runs again on another node; with its
/// retries used up it fails with a clear error instead. (SIGKILLed nodes, reaped after their
/// lease, are in `girder-cli/tests/retries.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_evaluation_runs_again_until_its_retries_are_used_up() {
    on_both(|store| async move {
        let no_retry = Policy { retries: Some(0), ..Policy::NODE };
        for (overrides, key) in [(vec![], store.key("lost")), (vec![("test/stuck", no_retry)], store.key("lost once"))]
        {
            let caller = store.node("caller", 0, &overrides).await;
            let first = store.node("first", 1, &overrides).await;
            let call = tokio::spawn({
                let (client, key) = (caller.client(), key.clone());
                async move { stuck::call(&client, key).await }
            });
            until_running(&first, "test/stuck").await;
            let second = store.node("second", 1, &overrides).await;
            // Leaving gives its claim back to the pool: the evaluation was lost with it.
            first.shutdown().await;
            let outcome = tokio::time::timeout(Duration::from_secs(10), call).await.expect("answered").expect("joins");
            if overrides.is_empty() {
                assert_eq!(outcome, Ok(2), "{:?}: run again on the second node", store.backend);
                assert_eq!(second.evaluations_of("test/stuck"), 1);
            } else {
                let err = outcome.expect_err("retries = 0: not run again");
                assert!(matches!(err, girder::CallError::NodeLost { lost: 1, retries: 0, .. }), "{err}");
                assert_eq!(second.evaluations_of("test/stuck"), 0, "{:?}", store.backend);
                assert_eq!(EVALUATIONS.get(&key), 1, "only the lost evaluation ran");
            }
            shutdown(&[&caller, &second]).await;
        }
    })
    .await;
}

/// `POST /v1/forget/{function}` against the router: one result by its JSON arguments, or
/// every result of the version with `?all=true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_forgets_one_result_or_all_of_them() {
    use tower::ServiceExt;
    let store = Store::new(Backend::Embedded);
    let node = Arc::new(store.node("http", 1, &[]).await);
    let keys = [store.key("http 0"), store.key("http 1")];
    for key in &keys {
        assert_eq!(kept::call(&node.client(), key.clone()).await, Ok(1));
    }
    let router = girder::http::router(node.clone(), girder::http::HttpConfig::default());
    let post = |uri: String, body: String| {
        let request = axum::http::Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .expect("a request");
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await.expect("the router answers");
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("a body");
            (status, serde_json::from_slice::<serde_json::Value>(&body).expect("a JSON body"))
        }
    };
    let one = serde_json::json!([keys[0]]).to_string();
    assert_eq!(post("/v1/forget/test/kept".into(), one.clone()).await, (200, serde_json::json!({"forgotten": 1})));
    assert_eq!(post("/v1/forget/test/kept".into(), one).await, (200, serde_json::json!({"forgotten": 0})));
    assert_eq!(kept::call(&node.client(), keys[0].clone()).await, Ok(2), "computed again");
    assert_eq!(kept::call(&node.client(), keys[1].clone()).await, Ok(1), "the other stays");
    let (status, body) = post("/v1/forget/test/kept?all=true".into(), "[1]".into()).await;
    assert_eq!((status, &body["kind"]), (400, &serde_json::json!("bad_request")), "?all=true takes no body");
    let (status, body) = post("/v1/forget/test/kept".into(), "{\"key\": 1}".into()).await;
    assert_eq!((status, &body["kind"]), (400, &serde_json::json!("bad_request")), "{body}");
    let (status, body) = post("/v1/forget/test/kept".into(), "[1]".into()).await;
    assert_eq!((status, &body["kind"]), (400, &serde_json::json!("bad_arguments")), "{body}");
    let (status, body) = post("/v1/forget/test/nobody?all=true".into(), String::new()).await;
    assert_eq!((status, &body["kind"]), (404, &serde_json::json!("unknown_function")), "{body}");
    let all = post("/v1/forget/test/kept?all=true".into(), String::new()).await;
    assert_eq!(all, (200, serde_json::json!({"forgotten": 2})));
    assert_eq!(kept::call(&node.client(), keys[1].clone()).await, Ok(2));
    node.shutdown().await;
}
