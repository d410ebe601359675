//! A grid of real `girder node` processes on one real Redis: node loss, Redis restarts,
//! duplicate ids, and functions that die with their node.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{text, NodeProcess};
use futures::StreamExt;
use girder::examples::{fib, sleep, tree};
use girder::testing::RedisServer;
use girder::{CallError, Client, Node, PoolSpec, RedisConfig, RedisStatekeeper, Registry};

const TTL_MS: u64 = 1_500;
const HEARTBEAT_MS: &str = "250";

fn node_args<'a>(url: &'a str, id: &'a str) -> Vec<&'a str> {
    vec![
        "--statekeeper",
        url,
        "--id",
        id,
        "--workers",
        "2",
        "--slots",
        "2",
        "--node-ttl-ms",
        "1500",
        "--heartbeat-ms",
        HEARTBEAT_MS,
    ]
}

/// An in-process node with no workers and no functions: it only submits and waits.
async fn client_node(url: &str) -> Node {
    let mut config = RedisConfig::new(url);
    config.node_ttl_ms = TTL_MS;
    let statekeeper = RedisStatekeeper::connect(config).await.expect("client connects to Redis");
    Node::builder()
        .id("client")
        .statekeeper(Arc::new(statekeeper))
        .registry(Registry::new())
        .pool(PoolSpec::new("main"))
        .heartbeat_ms(250)
        .start()
        .await
        .expect("client node starts")
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Fib(u64),
    Tree(u32, u64),
    Sleep(u64),
}

fn fib_local(n: u64) -> u64 {
    (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0
}

fn jobs(count: usize, seed: u64) -> Vec<Job> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| match rng.u32(0..3) {
            0 => Job::Fib(rng.u64(20..=90)),
            1 => Job::Tree(rng.u32(1..=3), rng.u64(0..400)),
            _ => Job::Sleep(rng.u64(1..=30)),
        })
        .collect()
}

async fn check(client: &Client, job: Job) -> Result<(), String> {
    let fail = |e: CallError| format!("{job:?}: {e}");
    let ok = match job {
        Job::Fib(n) => fib::call(client, n).await.map_err(fail)? == fib_local(n),
        Job::Tree(depth, id) => tree::call(client, depth, 3, id).await.map_err(fail)? == (3u64.pow(depth + 1) - 1) / 2,
        Job::Sleep(ms) => sleep::call(client, ms).await.map_err(fail)? == ms,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{job:?}: wrong answer"))
    }
}

/// Runs 2,000 requests, 64 in flight, calling `disrupt` once 600 are done. Returns the
/// longest wait of any request.
async fn run_with_disruption(client: &Client, seed: u64, disrupt: impl FnOnce()) -> Duration {
    let mut disrupt = Some(disrupt);
    let mut done = 0;
    let mut longest = Duration::ZERO;
    let mut failures = Vec::new();
    let mut running = futures::stream::iter(jobs(2_000, seed))
        .map(|job| async move {
            let begun = Instant::now();
            (check(client, job).await, begun.elapsed())
        })
        .buffer_unordered(64);
    while let Some((result, took)) = running.next().await {
        done += 1;
        longest = longest.max(took);
        if let Err(message) = result {
            failures.push(message);
        }
        if done == 600 {
            if let Some(disrupt) = disrupt.take() {
                disrupt();
            }
        }
    }
    assert_eq!(done, 2_000, "every request returned");
    assert!(failures.is_empty(), "{} requests failed, first: {}", failures.len(), failures[0]);
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_loses_no_request() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let _n1 = NodeProcess::start(&node_args(&url, "n1"));
    let mut n2 = NodeProcess::start(&node_args(&url, "n2"));
    let _n3 = NodeProcess::start(&node_args(&url, "n3"));
    let client = client_node(&url).await;
    let longest = run_with_disruption(&client.client(), 1, || n2.kill()).await;
    eprintln!("longest wait with a node killed: {longest:?}");
    // The killed node's claims wait out its lease, then run elsewhere.
    let bound = Duration::from_millis(TTL_MS + 4_000);
    assert!(longest <= bound, "a caller waited {longest:?}, beyond the lease plus the work ({bound:?})");
    let live: Vec<String> = client.statekeeper().live_nodes().await.unwrap().into_iter().map(|n| n.id).collect();
    assert!(!live.contains(&"n2".to_owned()), "the killed node is no longer live: {live:?}");
    assert!(live.contains(&"n1".to_owned()) && live.contains(&"n3".to_owned()), "{live:?}");
    client.shutdown().await;
}

/// Three nodes and a client; Redis is killed and started again once 600 requests are done.
async fn redis_restart_run(appendonly: bool, seed: u64) {
    let mut redis = RedisServer::start(appendonly).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let _n1 = NodeProcess::start(&node_args(&url, "n1"));
    let _n2 = NodeProcess::start(&node_args(&url, "n2"));
    let _n3 = NodeProcess::start(&node_args(&url, "n3"));
    let client = client_node(&url).await;
    let longest = run_with_disruption(&client.client(), seed, || redis.restart().expect("redis restarts")).await;
    eprintln!("longest wait across a Redis restart (appendonly {appendonly}): {longest:?}");
    let bound = Duration::from_millis(TTL_MS + 4_000);
    assert!(longest <= bound, "a caller waited {longest:?} across the restart (bound {bound:?})");
    // The grid is whole again: the nodes are all live on the restarted server.
    let begun = Instant::now();
    loop {
        let live = client.statekeeper().live_nodes().await.map(|n| n.len()).unwrap_or(0);
        if live == 4 {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "only {live} of 4 nodes live after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_no_request() {
    // With an append-only file Redis comes back with everything it had.
    redis_restart_run(true, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_empty_loses_no_request() {
    // Without persistence it comes back empty: nodes register again, callers resubmit.
    redis_restart_run(false, 3).await;
}

#[test]
fn a_second_node_with_the_same_id_is_refused() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let _first = NodeProcess::start(&node_args(&url, "twin"));
    let second = std::process::Command::new(common::GIRDER)
        .args(["node", "--listen", "127.0.0.1:0"])
        .args(node_args(&url, "twin"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = text(&second.stderr);
    assert!(err.contains("node id \"twin\" is already in use by a live node"), "{err}");
}

#[test]
fn a_function_only_a_dead_node_had_fails_fast() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let mut owner =
        NodeProcess::start(&[node_args(&url, "owner"), vec!["--functions", "examples/tree_blocking"]].concat());
    let other = NodeProcess::start(&[node_args(&url, "other"), vec!["--functions", "examples/echo"]].concat());
    // While its owner lives, a call through the other node is routed to it.
    let out = other.call(&["examples/tree_blocking", "2", "3", "0"]);
    assert_eq!(text(&out.stdout), "13", "stderr: {}", text(&out.stderr));
    owner.kill();
    let begun = Instant::now();
    let out = other.call(&["examples/tree_blocking", "3", "3", "0", "--timeout-ms", "30000"]);
    let took = begun.elapsed();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no live node has registered function examples/tree_blocking"), "{err}");
    assert!(took < Duration::from_secs(10), "failed after {took:?}, not within the lease plus a resubmission");
    // The node that is left still serves what it has.
    assert_eq!(text(&other.call(&["examples/echo", "5"]).stdout), "5");
}

#[test]
fn status_lists_the_live_nodes() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let a = NodeProcess::start(&node_args(&url, "alpha"));
    let _b = NodeProcess::start(&[node_args(&url, "beta"), vec!["--pool", "side", "--parent", "main"]].concat());
    assert_eq!(text(&a.call(&["examples/fib", "30"]).stdout), "832040");
    // Heartbeats carry the counters: wait for one that reports the call.
    let begun = Instant::now();
    loop {
        let out =
            std::process::Command::new(common::GIRDER).args(["status", "--json", "--node", &a.url]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
        let alpha = nodes.as_array().unwrap().iter().find(|n| n["id"] == "alpha");
        let beta = nodes.as_array().unwrap().iter().find(|n| n["id"] == "beta");
        // Both registered, and both reported with a heartbeat.
        if ids == ["alpha", "beta"]
            && alpha.is_some_and(|n| n["calls"].as_u64() >= Some(1))
            && beta.is_some_and(|n| n["workers"].as_array().is_some_and(|w| !w.is_empty()))
        {
            let beta = beta.unwrap();
            assert_eq!(beta["workers"][0]["pool"], "side");
            assert_eq!(beta["workers"][0]["slots"], 2);
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "status never showed both nodes: {nodes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = std::process::Command::new(common::GIRDER).args(["status", "--statekeeper", &url]).output().unwrap();
    let table = text(&table.stdout);
    assert!(table.starts_with("2 live node(s)") && table.contains("beta") && table.contains("side"), "{table}");
}
