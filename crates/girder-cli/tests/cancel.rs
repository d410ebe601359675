//! Budgets and abandoned call trees against real `girder node` processes: a huge tree
//! fails with the budget error and the node serves on; a tree whose caller leaves (Ctrl-C
//! on `girder call`, a deadline) stops within a second on every node; and after every node
//! running a tree is SIGKILLed, fresh nodes never resume it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::testing::RedisServer;

/// Evaluations of `function` the node at `url` started so far.
async fn evaluations(http: &reqwest::Client, url: &str, function: &str) -> u64 {
    let stats: serde_json::Value =
        http.get(format!("{url}/v1/stats")).send().await.expect("stats answer").json().await.expect("stats are JSON");
    let list = stats["evaluations"].as_array().cloned().unwrap_or_default();
    list.iter().find(|e| e["function"] == function).and_then(|e| e["count"].as_u64()).unwrap_or(0)
}

async fn total(http: &reqwest::Client, nodes: &[&NodeProcess], function: &str) -> u64 {
    let mut sum = 0;
    for node in nodes {
        sum += evaluations(http, &node.url, function).await;
    }
    sum
}

/// Waits until the evaluations of `function` on `nodes` reach `at_least`.
async fn until_evaluating(http: &reqwest::Client, nodes: &[&NodeProcess], function: &str, at_least: u64) {
    let begun = Instant::now();
    while total(http, nodes, function).await < at_least {
        assert!(begun.elapsed() < Duration::from_secs(30), "{function} never reached {at_least} evaluations");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the evaluations of `function` on `nodes` stop growing for `quiet`; fails
/// when that takes longer than `within`. Returns when they stopped growing (the last
/// change) and their count.
async fn settled(http: &reqwest::Client, nodes: &[&NodeProcess], function: &str, within: Duration) -> (Instant, u64) {
    let quiet = Duration::from_millis(400);
    let begun = Instant::now();
    let mut last = total(http, nodes, function).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = total(http, nodes, function).await;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return (since, last);
        }
        assert!(begun.elapsed() < within, "{function} still evaluated after {within:?} ({now})");
    }
}

fn girder_call(node: &NodeProcess, args: &[&str]) -> Child {
    Command::new(GIRDER)
        .arg("call")
        .args(args)
        .args(["--node", &node.url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("girder call starts")
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").args([name, &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill {name} {pid}");
}

#[test]
fn a_huge_tree_fails_with_the_budget_error_and_the_node_serves_on() {
    let node = NodeProcess::start(&["--workers", "1", "--slots", "2", "--call-requests-max", "20000"]);
    let begun = Instant::now();
    let out = node.call(&["examples/tree", "5", "14", "1"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("exceeded its requests limit of 20000"), "{}", text(&out.stderr));
    assert!(begun.elapsed() < Duration::from_secs(20), "refused after {:?}", begun.elapsed());
    let out = node.call(&["examples/tree_blocking", "5", "14", "2"]);
    assert!(text(&out.stderr).contains("exceeded its requests limit"), "{}", text(&out.stderr));
    let out = node.call(&["examples/tree_blocking", "3000", "1", "0"]);
    assert_eq!(text(&out.stdout), "3001", "deep but within the budget; {}", text(&out.stderr));
    let out = node.call(&["examples/fib", "60"]);
    assert_eq!(text(&out.stdout), "1548008755920", "the node serves the next call; {}", text(&out.stderr));
    // Per call, lower limits (never higher ones).
    let out = node.call(&["examples/tree", "4", "14", "3", "--requests-max", "100"]);
    assert!(text(&out.stderr).contains("exceeded its requests limit of 100"), "{}", text(&out.stderr));
    let out = node.call(&["examples/tree", "4", "14", "4", "--requests-max", "99999999"]);
    assert!(text(&out.stderr).contains("exceeded its requests limit of 20000"), "{}", text(&out.stderr));
    let out = node.call(&["examples/chain", "50", "--depth-max", "10"]);
    assert!(text(&out.stderr).contains("exceeded its depth limit of 10"), "{}", text(&out.stderr));
    let node = NodeProcess::start(&["--workers", "1", "--slots", "2", "--call-depth-max", "100"]);
    let out = node.call(&["examples/chain_blocking", "1000"]);
    assert!(text(&out.stderr).contains("exceeded its depth limit of 100"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_girder_call_stops_its_tree_within_a_second() {
    let http = reqwest::Client::new();
    let node = NodeProcess::start(&["--workers", "1", "--slots", "2"]);
    for function in ["examples/chain_blocking", "examples/chain"] {
        let mut call = girder_call(&node, &[function, "10000000"]);
        until_evaluating(&http, &[&node], function, 2_000).await;
        signal(call.id(), "-INT");
        let left = Instant::now();
        let _ = call.wait();
        let (stopped, count) = settled(&http, &[&node], function, Duration::from_secs(3)).await;
        assert!(stopped.saturating_duration_since(left) < Duration::from_secs(1), "{function} ran on after Ctrl-C");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(evaluations(&http, &node.url, function).await, count, "nothing resumes {function}");
    }
    let out = node.call(&["examples/fib", "30", "--timeout-ms", "2000"]);
    assert_eq!(text(&out.stdout), "832040", "slots are free again; {}", text(&out.stderr));
}

fn redis_node(url: &str, id: &str) -> NodeProcess {
    NodeProcess::on_redis(url, id, &["--workers", "1", "--slots", "2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_an_abandoned_tree_stops_everywhere_and_no_node_resumes_it() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let http = reqwest::Client::new();
    let (a, b) = (redis_node(&url, "a"), redis_node(&url, "b"));
    // A tree over both nodes whose caller's deadline passes: it stops on both.
    let out = tokio::task::spawn_blocking({
        let url = a.url.clone();
        move || {
            Command::new(GIRDER)
                .args(["call", "examples/tree", "12", "3", "1", "--timeout-ms", "1500", "--node", &url])
                .output()
                .expect("girder call runs")
        }
    })
    .await
    .expect("call joins");
    assert!(text(&out.stderr).contains("deadline"), "{}", text(&out.stderr));
    let left = Instant::now();
    assert!(evaluations(&http, &b.url, "examples/tree").await > 0, "the tree spread to b");
    let (stopped, _) = settled(&http, &[&a, &b], "examples/tree", Duration::from_secs(4)).await;
    assert!(stopped.saturating_duration_since(left) < Duration::from_secs(1), "the tree ran on after its deadline");

    // A deep chain whose caller and nodes all die by SIGKILL: fresh nodes never resume it.
    let mut call = girder_call(&a, &["examples/chain_blocking", "10000000"]);
    until_evaluating(&http, &[&a, &b], "examples/chain_blocking", 1_000).await;
    let (mut a, mut b) = (a, b);
    a.kill();
    b.kill();
    let _ = call.kill();
    let _ = call.wait();
    let (c, d) = (redis_node(&url, "c"), redis_node(&url, "d"));
    // Wait until a and b are reaped (their work given back to the pool), then watch.
    let begun = Instant::now();
    loop {
        let out = Command::new(GIRDER).args(["status", "--statekeeper", &url]).output().expect("status runs");
        let status = text(&out.stdout);
        if !status.contains("\"a\"") && !status.lines().any(|l| l.split_whitespace().next() == Some("a")) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(15), "a is reaped; status: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(total(&http, &[&c, &d], "examples/chain_blocking").await, 0, "no fresh node resumed the dead tree");
    let out = c.call(&["examples/fib", "50", "--timeout-ms", "5000"]);
    assert_eq!(text(&out.stdout), "12586269025", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_budgets_hold_across_nodes_for_concurrent_trees() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let http = reqwest::Client::new();
    let (a, b) = (redis_node(&url, "a"), redis_node(&url, "b"));
    // Two huge trees at once, one from each node, each capped at 1,000 new requests; the
    // grid counts each tree's requests wherever they are created.
    let calls: Vec<_> = [(&a, "1"), (&b, "2")]
        .into_iter()
        .map(|(node, id)| {
            let url = node.url.clone();
            let id = id.to_owned();
            tokio::task::spawn_blocking(move || {
                Command::new(GIRDER)
                    .args(["call", "examples/tree", "5", "14", &id, "--requests-max", "1000", "--node", &url])
                    .output()
                    .expect("girder call runs")
            })
        })
        .collect();
    for call in calls {
        let out = call.await.expect("call joins");
        assert!(text(&out.stderr).contains("exceeded its requests limit of 1000"), "{}", text(&out.stderr));
    }
    let (_, evaluated) = settled(&http, &[&a, &b], "examples/tree", Duration::from_secs(5)).await;
    assert!(evaluated <= 2 * 1_000, "{evaluated} evaluations for two trees of at most 1,000 requests");
    assert!(evaluations(&http, &b.url, "examples/tree").await > 0, "the trees spread over both nodes");
    let out = b.call(&["examples/tree", "3", "5", "9", "--timeout-ms", "10000"]);
    assert_eq!(text(&out.stdout), "156", "a tree within its budget is whole; {}", text(&out.stderr));
}

/// Requests being evaluated now on `nodes`.
async fn running(http: &reqwest::Client, nodes: &[&NodeProcess]) -> u64 {
    let mut sum = 0;
    for node in nodes {
        let stats: serde_json::Value =
            http.get(format!("{}/v1/stats", node.url)).send().await.expect("stats").json().await.expect("JSON");
        sum += stats["running"].as_u64().expect("stats say what runs");
    }
    sum
}

fn post_call(
    http: &reqwest::Client,
    node: &NodeProcess,
    body: &str,
    id: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let request = http
        .post(format!("{}/v1/call/examples/nap_tree", node.url))
        .header("girder-call-id", id)
        .header("content-type", "application/json")
        .body(body.to_owned());
    tokio::spawn(async move { request.send().await.expect("the node answers") })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cancelling_a_call_by_id_stops_its_tree_on_both_nodes_but_not_a_shared_child() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let http = reqwest::Client::new();
    // Sleeping leaves hold a slot each: 9 leaves and 4 parents need room on two nodes.
    let node = |id: &str| NodeProcess::on_redis(&url, id, &["--workers", "1", "--slots", "12"]);
    let (a, b) = (node("a"), node("b"));
    // A 3-level tree (1 + 3 + 9 requests) whose leaves sleep 4 s, and another caller of one
    // of its leaves (tree 1's children are 4..6, theirs 13..21).
    let tree = post_call(&http, &a, "[2, 3, 1, 4000]", "tree-1");
    let begun = Instant::now();
    while running(&http, &[&a, &b]).await < 13 {
        assert!(begun.elapsed() < Duration::from_secs(10), "the tree never ran whole");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shared = post_call(&http, &b, "[0, 3, 13, 4000]", "leaf-13");
    until_evaluating(&http, &[&a, &b], "examples/nap_tree", 13).await;
    // The second caller waits on the running leaf (the node counts it as joined).
    let joined = Instant::now();
    loop {
        let stats: serde_json::Value =
            http.get(format!("{}/v1/stats", b.url)).send().await.unwrap().json().await.unwrap();
        if stats["joined"].as_u64() >= Some(1) || stats["queued"].as_u64() >= Some(1) {
            break;
        }
        assert!(joined.elapsed() < Duration::from_secs(5), "the shared caller never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled = http.delete(format!("{}/v1/calls/tree-1", a.url)).send().await.expect("delete answers");
    let sent = Instant::now();
    assert_eq!(cancelled.status(), 200);
    // Every evaluation nobody else waits for stops: only the shared leaf runs on.
    while running(&http, &[&a, &b]).await > 1 {
        assert!(sent.elapsed() < Duration::from_secs(5), "the tree ran on after its cancellation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = sent.elapsed();
    eprintln!("cancelled tree stopped on both nodes {stopped:?} after DELETE answered");
    assert!(stopped < Duration::from_millis(100 + 250), "stopped after {stopped:?}: over 100 ms plus one heartbeat");
    let response = tree.await.expect("tree call joins");
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["girder-call-id"], "tree-1");
    let body: serde_json::Value = response.json().await.expect("JSON error");
    assert_eq!(body["kind"], "cancelled");
    assert_eq!(running(&http, &[&a, &b]).await, 1, "the shared leaf still runs");
    let response = shared.await.expect("shared call joins");
    assert_eq!(response.status(), 200, "the other caller gets its result");
    assert_eq!(response.json::<serde_json::Value>().await.expect("JSON"), serde_json::json!(1));
    assert_eq!(total(&http, &[&a, &b], "examples/nap_tree").await, 13, "the shared leaf ran on, not again");
    let again = http.delete(format!("{}/v1/calls/tree-1", a.url)).send().await.expect("delete answers");
    assert_eq!(again.status(), 404, "nothing left to cancel");
}
