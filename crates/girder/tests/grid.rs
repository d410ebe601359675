//! Single flight, pools, hoisting and errors on the embedded statekeeper.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use girder::examples::{echo, fail, panic, sleep};
use girder::{CallError, Ctx, Node, PoolSpec, Registry, WorkerSpec};

static SLOW_RUNS: AtomicU64 = AtomicU64::new(0);

#[girder::function(name = "test/slow")]
async fn slow(_ctx: Ctx, x: u64) -> u64 {
    SLOW_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    x * 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_requests_run_once() {
    let node = common::grid(Registry::new().with::<slow>(), 4, 2).await;
    let client = node.client();
    let calls = (0..100).map(|_| slow::call(&client, 21));
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| r == &Ok(42)), "{results:?}");
    assert_eq!(SLOW_RUNS.load(Ordering::SeqCst), 1, "100 identical calls ran the body once");
    assert_eq!(node.evaluations_of("test/slow"), 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_at_the_top_pool_reaches_every_worker_of_both_lower_pools() {
    let node = Node::builder()
        .registry(Registry::with_examples())
        .pool(PoolSpec::new("top").helper(false))
        .pool(PoolSpec::new("left").parent("top"))
        .pool(PoolSpec::new("right").parent("top"))
        .workers(WorkerSpec::new("left", 2, 1))
        .workers(WorkerSpec::new("right", 2, 1))
        .entry_pool("top")
        .start()
        .await
        .unwrap();
    let client = node.client();
    let calls = (0..40u64).map(|i| sleep::call(&client, 10 + i % 7 + 7 * (i / 7)));
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stats = node.stats().await;
    for worker in &stats.workers {
        assert!(worker.executed >= 1, "worker {} in pool {} got no work: {stats:?}", worker.id, worker.pool);
    }
    let pools: Vec<&str> = stats.workers.iter().map(|w| w.pool.as_str()).collect();
    assert_eq!(pools, ["left", "left", "right", "right"]);
    let top = stats.pools.iter().find(|(name, _)| name == "top").unwrap();
    assert!(top.1.handed_off >= 2, "the top distributor handed work to both lower pools: {stats:?}");
    node.shutdown().await;
}

/// Calls `n` distinct 20 ms sleeps at once: they all land in this worker's own queue.
#[girder::function(name = "test/fanout")]
async fn fanout(ctx: Ctx, n: u64) -> Result<String, String> {
    let children = (0..n).map(|k| sleep::call(&ctx, 20 + k));
    futures::future::try_join_all(children).await.map_err(|e| e.to_string())?;
    Ok(ctx.worker_id().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_hoists_queued_work_to_an_idle_worker() {
    let node = common::grid(Registry::with_examples().with::<fanout>(), 2, 1).await;
    let parent_worker = fanout::call(&node.client(), 12).await.unwrap();
    let stats = node.stats().await;
    let other = stats.workers.iter().find(|w| w.id != parent_worker).unwrap();
    // The idle worker ran some of the 12 children; it never saw the parent.
    assert!(other.executed >= 1, "the idle worker executed none of the queued children: {stats:?}");
    assert!(stats.pools[0].1.hoisted >= 1, "{stats:?}");
    assert_eq!(node.evaluations_of("examples/sleep"), 12, "hoisted copies still ran each request once");
    node.shutdown().await;
}

/// A function that exists in the code but is registered on no node.
#[girder::function(name = "test/unregistered")]
async fn unregistered(_ctx: Ctx) -> u64 {
    7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_reaches_the_caller_as_its_own_kind_and_the_node_keeps_serving() {
    let node = common::grid(Registry::with_examples(), 2, 2).await;
    let client = node.client();
    let serves = || async { echo::call(&client, rmpv::Value::from("still here")).await };

    let err = fail::call(&client, "disk full".to_owned()).await.unwrap_err();
    assert_eq!(err, CallError::Function { function: "examples/fail".into(), message: "disk full".into() });
    assert_eq!(serves().await.unwrap(), rmpv::Value::from("still here"));

    let err = panic::call(&client).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Panic { function, message } if function == "examples/panic" && message.contains("was called")),
        "{err:?}"
    );
    // Panics are not memoized: a second call runs the body again.
    let _ = panic::call(&client).await.unwrap_err();
    assert_eq!(node.evaluations_of("examples/panic"), 2);
    assert!(serves().await.is_ok());

    let err = unregistered::call(&client).await.unwrap_err();
    assert_eq!(err, CallError::UnknownFunction { function: "test/unregistered".into() });
    let err = client.call_json("nobody/has-this", &serde_json::json!([])).await.unwrap_err();
    assert_eq!(err, CallError::UnknownFunction { function: "nobody/has-this".into() });
    assert!(serves().await.is_ok());

    for bad in [serde_json::json!(["ninety"]), serde_json::json!([1, 2]), serde_json::json!([])] {
        let err = client.call_json("examples/fib", &bad).await.unwrap_err();
        assert!(
            matches!(&err, CallError::BadArguments { function, .. } if function == "examples/fib"),
            "{bad}: {err:?}"
        );
    }
    let err = client.call_json("examples/fib", &serde_json::json!({"n": 3})).await.unwrap_err();
    assert!(matches!(err, CallError::BadArguments { .. }), "{err:?}");
    assert!(serves().await.is_ok());

    let hurried = client.with_deadline(Duration::from_millis(30));
    let err = sleep::call(&hurried, 5_000).await.unwrap_err();
    assert_eq!(err, CallError::DeadlineExceeded { function: "examples/sleep".into(), deadline_ms: 30 });
    assert!(serves().await.is_ok());
    assert_eq!(client.call_json("examples/fib", &serde_json::json!([10])).await.unwrap(), serde_json::json!(55));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_errors_are_memoized_values() {
    let node = common::grid(Registry::with_examples(), 1, 1).await;
    let client = node.client();
    for _ in 0..3 {
        assert!(fail::call(&client, "same".to_owned()).await.is_err());
    }
    assert_eq!(node.evaluations_of("examples/fail"), 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bumping_a_version_invalidates_cached_results() {
    #[girder::function(name = "test/versioned", version = 1)]
    async fn v1(_ctx: Ctx, x: u64) -> u64 {
        x + 1
    }
    #[girder::function(name = "test/versioned", version = 2)]
    async fn v2(_ctx: Ctx, x: u64) -> u64 {
        x + 2
    }
    let statekeeper = common::embedded();
    let old = Node::builder()
        .id("old")
        .statekeeper(statekeeper.clone())
        .registry(Registry::new().with::<v1>())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .start()
        .await
        .unwrap();
    assert_eq!(v1::call(&old.client(), 1).await.unwrap(), 2);
    old.shutdown().await;
    let new = Node::builder()
        .id("new")
        .statekeeper(statekeeper)
        .registry(Registry::new().with::<v2>())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .start()
        .await
        .unwrap();
    assert_eq!(v2::call(&new.client(), 1).await.unwrap(), 3, "version 2 does not reuse version 1's result");
    new.shutdown().await;
}

/// Two parameters of different types, for the bad-argument messages.
#[girder::function(name = "test/pair")]
async fn pair(_ctx: Ctx, count: u32, label: String) -> String {
    format!("{label}{count}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_name_the_parameter_the_type_and_the_value() {
    let node = common::grid(Registry::new().with::<pair>(), 1, 1).await;
    let client = node.client();
    let message = |outcome: Result<serde_json::Value, CallError>| match outcome {
        Err(CallError::BadArguments { message, .. }) => message,
        other => panic!("expected bad arguments, got {other:?}"),
    };
    let wrong = message(client.call_json("test/pair", &serde_json::json!([3, 4])).await);
    assert!(wrong.starts_with("parameter 2 `label`: expected alloc::string::String"), "{wrong}");
    assert!(wrong.ends_with("got 4"), "{wrong}");
    let wrong = message(client.call_json("test/pair", &serde_json::json!([-1, "x"])).await);
    assert!(wrong.starts_with("parameter 1 `count`: expected u32") && wrong.ends_with("got -1"), "{wrong}");
    let wrong = message(client.call_json("test/pair", &serde_json::json!(["x"])).await);
    assert_eq!(wrong, "expected 2 arguments (count, label), got 1");
    assert_eq!(client.call_json("test/pair", &serde_json::json!([3, "x"])).await.unwrap(), "x3");
    assert_eq!(node.evaluations_of("test/pair"), 1, "refused arguments run nothing");
    node.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Reading {
    label: String,
    celsius: f64,
    count: u32,
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Summary {
    label: String,
    total: f64,
}

/// A struct in, a struct out.
#[girder::function(name = "test/summarize")]
async fn summarize(_ctx: Ctx, reading: Reading) -> Summary {
    Summary { label: reading.label, total: reading.celsius * f64::from(reading.count) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_struct_and_the_same_json_object_are_one_request() {
    let node = common::grid(Registry::new().with::<summarize>(), 1, 1).await;
    let client = node.client();
    let reading = Reading { label: "oven".into(), celsius: 200.0, count: 3 };
    let typed = summarize::call(&client, reading.clone()).await.unwrap();
    assert_eq!(typed, Summary { label: "oven".into(), total: 600.0 });
    // The same data as JSON, keys in another order and 200 for 200.0: memoized already.
    let json = serde_json::json!([{"count": 3, "celsius": 200, "label": "oven"}]);
    let answer = client.call_json("test/summarize", &json).await.unwrap();
    // Results keep field names and their own number types (a float stays a float).
    assert_eq!(answer, serde_json::json!({"label": "oven", "total": 600.0}), "results keep field names");
    assert_eq!(node.evaluations_of("test/summarize"), 1, "one evaluation for both callers");
    node.shutdown().await;
}

/// Fails through an error type of its own behind a one-argument `Result` alias.
#[girder::function(name = "test/parse")]
async fn parse(_ctx: Ctx, text: String) -> std::io::Result<u64> {
    text.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_aliases_report_their_errors_as_function_errors() {
    let node = common::grid(Registry::new().with::<parse>(), 1, 1).await;
    let client = node.client();
    assert_eq!(parse::call(&client, "42".into()).await.unwrap(), 42);
    match parse::call(&client, "x".into()).await {
        Err(CallError::Function { message, .. }) => assert!(message.contains("invalid digit"), "{message}"),
        other => panic!("expected a function error, got {other:?}"),
    }
    node.shutdown().await;
}
