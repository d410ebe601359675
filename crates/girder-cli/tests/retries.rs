//! Retries after a lost node, with real `girder node` processes on one real Redis: a node
//! SIGKILLed mid-evaluation has its request run again on another node within its lease (plus
//! a margin), and with the function's retries used up (`--policy NAME:retries=0`) the call
//! fails with a clear error instead.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::testing::RedisServer;

const NODE_TTL_MS: u64 = 1_500;
/// How long after a node's death its work may take to start elsewhere beyond its lease: the
/// reaping round (a heartbeat), the hand-off and the first retry's backoff, on a busy machine.
const MARGIN: Duration = Duration::from_millis(1_500);
const SLEEP_MS: &str = "2000";

fn node(url: &str, id: &str, workers: &str, policy: Option<&str>) -> NodeProcess {
    let mut args = vec!["--workers", workers, "--slots", "2"];
    if let Some(policy) = policy {
        args.extend(["--policy", policy]);
    }
    NodeProcess::on_redis(url, id, &args)
}

/// Evaluations of `function` the node at `url` started so far.
async fn evaluations(http: &reqwest::Client, url: &str, function: &str) -> u64 {
    let stats: serde_json::Value =
        http.get(format!("{url}/v1/stats")).send().await.expect("stats answer").json().await.expect("stats are JSON");
    let list = stats["evaluations"].as_array().cloned().unwrap_or_default();
    list.iter().find(|e| e["function"] == function).and_then(|e| e["count"].as_u64()).unwrap_or(0)
}

/// Waits until one of `nodes` evaluates `examples/sleep`; returns its index.
async fn evaluator(http: &reqwest::Client, nodes: &[&NodeProcess]) -> usize {
    let begun = Instant::now();
    loop {
        for (index, node) in nodes.iter().enumerate() {
            if evaluations(http, &node.url, "examples/sleep").await > 0 {
                return index;
            }
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "no node started the evaluation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `girder call examples/sleep SLEEP_MS` through `gateway`, in the background.
fn call_sleep(gateway: &NodeProcess) -> tokio::task::JoinHandle<Output> {
    let url = gateway.url.clone();
    tokio::task::spawn_blocking(move || {
        Command::new(GIRDER)
            .args(["call", "examples/sleep", SLEEP_MS, "--timeout-ms", "30000", "--node", &url])
            .output()
            .expect("girder call runs")
    })
}

/// Starts a gateway and two workers, calls a sleep through the gateway and SIGKILLs the
/// worker evaluating it. Returns the gateway, the survivor, when the kill happened, and the
/// call.
async fn kill_the_evaluator(
    url: &str,
    policy: Option<&str>,
    http: &reqwest::Client,
) -> (NodeProcess, NodeProcess, Instant, tokio::task::JoinHandle<Output>) {
    let gateway = node(url, "gateway", "0", policy);
    let mut workers = vec![node(url, "w1", "1", policy), node(url, "w2", "1", policy)];
    let call = call_sleep(&gateway);
    let running = evaluator(http, &workers.iter().collect::<Vec<_>>()).await;
    let mut dead = workers.remove(running);
    dead.kill();
    let killed = Instant::now();
    (gateway, workers.remove(0), killed, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_evaluation_has_it_run_again_within_its_lease() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let http = reqwest::Client::new();
    let (_gateway, survivor, killed, call) = kill_the_evaluator(&redis.url(), None, &http).await;
    let within = Duration::from_millis(NODE_TTL_MS) + MARGIN;
    while evaluations(&http, &survivor.url, "examples/sleep").await == 0 {
        assert!(killed.elapsed() < within, "not run again within {within:?} of the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rerun_after = killed.elapsed();
    let out = call.await.expect("call joins");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), SLEEP_MS, "the caller gets the value of the re-run");
    assert!(rerun_after >= Duration::from_millis(NODE_TTL_MS / 2), "re-run {rerun_after:?} after the kill: too early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_retries_used_up_the_call_fails_with_a_clear_error() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let http = reqwest::Client::new();
    let policy = Some("examples/sleep:retries=0");
    let (_gateway, survivor, killed, call) = kill_the_evaluator(&redis.url(), policy, &http).await;
    let out = call.await.expect("call joins");
    let answered = killed.elapsed();
    assert!(!out.status.success(), "the call failed; stdout {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("examples/sleep") && stderr.contains("lost with its node 1 time(s)"), "{stderr}");
    assert!(stderr.contains("allows 0 re-run(s)"), "{stderr}");
    let within = Duration::from_millis(NODE_TTL_MS) + MARGIN;
    assert!(answered < within, "failed {answered:?} after the kill, not within {within:?}");
    assert_eq!(evaluations(&http, &survivor.url, "examples/sleep").await, 0, "not run again");
}
