//! Budgets and cancellation of call trees on one in-process node: a tree past its budget
//! or its depth fails with `BudgetExceeded` and the node serves on; a tree nobody waits for
//! stops within a second; a caller of a request shared with a cancelled tree still gets
//! its value.

mod common;

use std::time::{Duration, Instant};

use girder::examples::{chain, tree, tree_blocking};
use girder::{CallError, CallLimits, Ctx, Node, PoolSpec, Registry, WorkerSpec};

/// Counts forever, one nested request per level, a millisecond apart: only cancellation
/// (or a budget) stops it.
#[girder::function(name = "test/forever")]
async fn forever(ctx: Ctx, n: u64) -> Result<u64, String> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    forever::call(&ctx, n + 1).await.map_err(|e| e.to_string())
}

/// [`forever`] as a blocking function.
#[girder::function(name = "test/forever_blocking")]
fn forever_blocking(ctx: Ctx, n: u64) -> Result<u64, String> {
    std::thread::sleep(Duration::from_millis(1));
    forever_blocking::call_blocking(&ctx, n + 1).map_err(|e| e.to_string())
}

/// Returns `n` after `ms` milliseconds.
#[girder::function(name = "test/slow")]
async fn slow(_ctx: Ctx, n: u64, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    n
}

/// Calls [`slow`]: its caller's tree owns the nested request.
#[girder::function(name = "test/wrap")]
async fn wrap(ctx: Ctx, n: u64, ms: u64) -> Result<u64, String> {
    slow::call(&ctx, n, ms).await.map_err(|e| e.to_string())
}

/// Sleeps `ms` milliseconds, but may run at most 200.
#[girder::function(name = "test/limited", timeout_ms = 200)]
async fn limited(_ctx: Ctx, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Spins until the grid gives up on it (or 20 s pass), then says how long it spun.
#[girder::function(name = "test/spin", timeout_ms = 200)]
fn spin(ctx: Ctx, tag: u64) -> u64 {
    let begun = Instant::now();
    while ctx.check_cancelled().is_ok() && begun.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    *SPIN_SAW.lock().unwrap() = Some(ctx.check_cancelled());
    tag + begun.elapsed().as_millis() as u64
}

/// What the last [`spin`] saw from `check_cancelled` when it stopped.
static SPIN_SAW: std::sync::Mutex<Option<Result<(), CallError>>> = std::sync::Mutex::new(None);

fn registry() -> Registry {
    Registry::with_examples()
        .with::<forever>()
        .with::<forever_blocking>()
        .with::<slow>()
        .with::<wrap>()
        .with::<limited>()
        .with::<spin>()
}

async fn node(limits: CallLimits) -> Node {
    Node::builder()
        .registry(registry())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 2))
        .call_limits(limits)
        .start()
        .await
        .expect("node starts")
}

fn budget_error(outcome: Result<u64, CallError>) -> (String, u64) {
    match outcome {
        Err(CallError::BudgetExceeded { limit, max, .. }) => (limit, max),
        other => panic!("expected a budget error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_past_its_request_budget_fails_and_the_node_serves_on() {
    let node = node(CallLimits { requests_max: 2_000, depth_max: 1_000 }).await;
    let client = node.client();
    // tree(5, 14) makes 579,195 requests.
    let (limit, max) = budget_error(tree::call(&client, 5, 14, 1).await);
    assert_eq!((limit.as_str(), max), ("requests", 2_000));
    let (limit, _) = budget_error(tree_blocking::call(&client, 5, 14, 1).await);
    assert_eq!(limit, "requests");
    // Each stopped at its budget (plus what was running when it ended).
    let evaluated = node.evaluations_of("examples/tree") + node.evaluations_of("examples/tree_blocking");
    assert!(evaluated <= 2 * 2_000 + 64, "{evaluated} evaluations for two trees of 2,000");
    // The node serves the next call, and a tree within the budget is whole.
    assert_eq!(tree::call(&client, 3, 10, 7).await.unwrap(), 1_111);
    // A client may lower the node's limits, not raise them.
    let small = client.with_limits(CallLimits { requests_max: 50, depth_max: 1_000 });
    assert_eq!(budget_error(tree::call(&small, 3, 10, 8).await).1, 50);
    let big = client.with_limits(CallLimits { requests_max: 1_000_000, depth_max: 1_000 });
    assert_eq!(budget_error(tree::call(&big, 4, 14, 9).await).1, 2_000);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_past_its_depth_fails_before_submitting() {
    let node = node(CallLimits { requests_max: 1_000_000, depth_max: 100 }).await;
    let client = node.client();
    // chain(n) nests n levels below the top-level call.
    assert_eq!(chain::call(&client, 100).await.unwrap(), 100);
    // Memoized levels cost no depth: chain(150) reaches chain(100) at depth 50.
    assert_eq!(chain::call(&client, 150).await.unwrap(), 150);
    let (limit, max) = budget_error(chain::call(&client, 300).await);
    assert_eq!((limit.as_str(), max), ("depth", 100));
    let shallow = client.with_limits(CallLimits { requests_max: 1_000_000, depth_max: 10 });
    assert_eq!(budget_error(chain::call(&shallow, 400).await), ("depth".to_owned(), 10));
    // The refusals were not memoized as the function's values: with room, all is well.
    let deep = node.client();
    assert_eq!(chain::call(&deep, 240).await.unwrap(), 240);
    assert_eq!(chain::call(&deep, 300).await.unwrap(), 300, "the node serves on");
    node.shutdown().await;
}

/// Waits until `count` stops growing for `quiet`, at most `within`; returns its last value.
async fn settled(count: impl Fn() -> u64, quiet: Duration, within: Duration) -> u64 {
    let begun = Instant::now();
    let mut last = count();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return last;
        }
        assert!(begun.elapsed() < within, "still evaluating after {within:?}: {now}");
    }
}

async fn abandoned_tree_stops(function: &str) {
    let node = node(CallLimits::default()).await;
    let client = node.client().with_deadline(Duration::from_millis(300));
    let outcome = client.call_json(function, &serde_json::json!([0])).await;
    assert!(matches!(outcome, Err(CallError::DeadlineExceeded { .. })), "{outcome:?}");
    let left = Instant::now();
    let before = node.evaluations_of(function);
    assert!(before >= 10, "the tree was growing: {before}");
    // It stops within a second of the caller leaving, and stays stopped.
    let stopped = settled(|| node.evaluations_of(function), Duration::from_millis(300), Duration::from_secs(2)).await;
    assert!(left.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.evaluations_of(function), stopped, "nothing resumes it");
    // Its slots are free again: a quick call answers at once.
    let quick = node.client().with_deadline(Duration::from_secs(2));
    assert_eq!(slow::call(&quick, 5, 0).await.unwrap(), 5);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_async_tree_stops_within_a_second() {
    abandoned_tree_stops("test/forever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_blocking_tree_stops_within_a_second() {
    abandoned_tree_stops("test/forever_blocking").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_caller_cancels_its_tree() {
    let node = node(CallLimits::default()).await;
    let client = node.client();
    let running = tokio::spawn({
        let client = client.clone();
        async move { forever::call(&client, 0).await }
    });
    let begun = Instant::now();
    while node.evaluations_of("test/forever") < 20 {
        assert!(begun.elapsed() < Duration::from_secs(5), "the tree starts");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.abort();
    let _ = running.await;
    settled(|| node.evaluations_of("test/forever"), Duration::from_millis(300), Duration::from_secs(2)).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_sharing_a_cancelled_request_still_gets_its_value() {
    let node = node(CallLimits::default()).await;
    let client = node.client();
    for round in 0..5u64 {
        // A's tree owns slow(round) (nested under wrap); B calls slow(round) directly and
        // joins it. A leaves; B still gets the value.
        let a = tokio::spawn({
            let client = client.clone();
            async move { wrap::call(&client, round, 400).await }
        });
        let begun = Instant::now();
        while node.evaluations_of("test/slow") <= round {
            assert!(begun.elapsed() < Duration::from_secs(5), "A's nested call starts");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let b = tokio::spawn({
            let client = client.clone();
            async move { slow::call(&client, round, 400).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        a.abort();
        let b = tokio::time::timeout(Duration::from_secs(10), b).await.expect("B is answered").expect("B runs");
        assert_eq!(b.unwrap(), round, "round {round}: B gets the value although A's tree was cancelled");
    }
    // And the other way round: the top-level caller of a shared root leaves, the other stays.
    let first = tokio::spawn({
        let client = client.clone();
        async move { slow::call(&client, 100, 300).await }
    });
    let second = tokio::spawn({
        let client = client.clone();
        async move { slow::call(&client, 100, 300).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.abort();
    assert_eq!(second.await.unwrap().unwrap(), 100);
    node.shutdown().await;
}

fn time_limit_error(outcome: Result<u64, CallError>) -> u64 {
    match outcome {
        Err(CallError::TimeLimitExceeded { limit_ms, .. }) => limit_ms,
        other => panic!("expected a time limit error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_past_their_time_limit_are_abandoned_and_not_memoized() {
    let node = Node::builder()
        .registry(registry())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 2))
        .time_limit(Duration::from_millis(300))
        .start()
        .await
        .expect("node starts");
    let client = node.client();
    assert_eq!(limited::call(&client, 10).await.unwrap(), 10);
    let begun = Instant::now();
    assert_eq!(time_limit_error(limited::call(&client, 10_000).await), 200, "the function's own limit");
    assert!(begun.elapsed() < Duration::from_secs(2), "answered after {:?}", begun.elapsed());
    // The node's default applies to functions without a limit of their own.
    let begun = Instant::now();
    assert_eq!(time_limit_error(slow::call(&client, 1, 10_000).await), 300);
    assert!(begun.elapsed() < Duration::from_secs(2));
    // A blocking evaluation is answered at its limit and sees that it was given up.
    for round in 0..2 {
        let begun = Instant::now();
        assert_eq!(time_limit_error(spin::call(&client, 7).await), 200);
        assert!(begun.elapsed() < Duration::from_secs(2), "answered after {:?}", begun.elapsed());
        assert_eq!(node.evaluations_of("test/spin"), round + 1, "not memoized: it runs again");
        let begun = Instant::now();
        let saw = loop {
            if let Some(saw) = SPIN_SAW.lock().unwrap().take() {
                break saw;
            }
            assert!(begun.elapsed() < Duration::from_secs(5), "the spinning evaluation noticed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(saw, Err(CallError::Cancelled { function: "test/spin".to_owned() }));
    }
    // Both slots are free again soon (the spinning ones noticed and returned).
    let quick = client.with_deadline(Duration::from_secs(5));
    let (a, b) = futures::join!(slow::call(&quick, 2, 100), slow::call(&quick, 3, 100));
    assert_eq!((a.unwrap(), b.unwrap()), (2, 3));
    node.shutdown().await;
}
