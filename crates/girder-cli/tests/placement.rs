//! Membership metadata, per-node configuration and placement across real processes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::testing::RedisServer;

fn status(node: &NodeProcess) -> serde_json::Value {
    let out = Command::new(GIRDER).args(["status", "--json", "--node", &node.url]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `check` on the node's status until it holds, for at most 10 s.
fn until(node: &NodeProcess, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let begun = Instant::now();
    loop {
        let nodes = status(node);
        if check(&nodes) {
            return nodes;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "{what} never happened: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_report_metadata_and_pick_up_configuration() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let node =
        NodeProcess::start(&["--statekeeper", &url, "--id", "n1", "--workers", "2", "--slots", "2", "--cpus", "6"]);
    // Registered first, reported with its first heartbeat: wait for the report.
    let nodes =
        until(&node, "a first heartbeat", |n| n.as_array().is_some_and(|a| a.len() == 1 && a[0]["version"] != ""));
    let me = &nodes[0];
    assert_eq!(me["cpus"], 6);
    assert!(me["memory_total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert!(me["functions"].as_array().unwrap().iter().any(|f| f == "examples/fib"));
    assert_eq!(me["pools"][0], "main");
    assert!(me["http"].as_str().unwrap().starts_with("http://127.0.0.1:"));

    let config =
        |args: &[&str]| Command::new(GIRDER).arg("config").args(args).args(["--statekeeper", &url]).output().unwrap();
    let out = config(&["set", "n1", "slots", "0"]);
    assert!(!out.status.success() && text(&out.stderr).contains("bad value"), "{}", text(&out.stderr));
    let out = config(&["set", "n1", "colour", "blue"]);
    assert!(!out.status.success() && text(&out.stderr).contains("unknown configuration key"));
    assert!(config(&["set", "n1", "slots", "5"]).status.success());
    assert!(config(&["set", "n1", "max-memory", "512M"]).status.success());
    assert_eq!(text(&config(&["get", "n1"]).stdout), "max-memory = 512M\nslots = 5");
    until(&node, "the new slots and memory budget", |n| {
        n[0]["workers"].as_array().is_some_and(|w| w.iter().all(|w| w["slots"] == 5))
            && n[0]["memory_max_bytes"] == 512u64 << 20
    });
    assert!(config(&["unset", "n1", "slots"]).status.success());
    until(&node, "the slots it started with", |n| {
        n[0]["workers"].as_array().is_some_and(|w| w.iter().all(|w| w["slots"] == 2))
    });
    // It still computes after the changes.
    assert_eq!(text(&node.call(&["examples/fib", "20"]).stdout), "6765");
}

use std::sync::Arc;

use girder::placement::{Placement, Strategy, FLOCKS};
use girder::{RedisConfig, RedisStatekeeper, Statekeeper};

const TTL_MS: u64 = 1_500;

fn grid_node(url: &str, id: &str, cpus: &str) -> NodeProcess {
    NodeProcess::start(&[
        "--statekeeper",
        url,
        "--id",
        id,
        "--workers",
        "1",
        "--slots",
        "1",
        "--cpus",
        cpus,
        "--node-ttl-ms",
        "1500",
        "--heartbeat-ms",
        "250",
    ])
}

async fn placement(url: &str) -> (Arc<dyn Statekeeper>, Placement) {
    let mut config = RedisConfig::new(url);
    config.node_ttl_ms = TTL_MS;
    let statekeeper: Arc<dyn Statekeeper> = Arc::new(RedisStatekeeper::connect(config).await.unwrap());
    let placement = Placement::new(statekeeper.clone(), None);
    (statekeeper, placement)
}

/// Refreshes until `count` nodes are live and the table covers exactly them.
async fn settle(placement: &Placement, count: usize) -> Arc<girder::placement::FlockTable> {
    let begun = Instant::now();
    loop {
        let table = placement.refresh(TTL_MS).await.unwrap();
        if table.nodes.len() == count {
            return table;
        }
        assert!(begun.elapsed() < Duration::from_secs(15), "never settled on {count} nodes: {:?}", table.nodes);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_spreads_ids_by_strategy_and_tables_move_little() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let nodes: Vec<NodeProcess> =
        [("a", "1"), ("b", "1"), ("c", "2"), ("d", "4")].iter().map(|(id, cpus)| grid_node(&url, id, cpus)).collect();
    let (_statekeeper, placement) = placement(&url).await;
    let before = settle(&placement, 4).await;

    let ids: Vec<String> = (0..10_000).map(|i| format!("partition-{i}")).collect();
    let count = |placed: &std::collections::HashMap<String, Vec<String>>, node: &str| {
        placed.values().filter(|owners| owners[0] == node).count() as f64
    };
    let uniform = placement.init(&ids, Strategy::UniformNodes, 2).await.unwrap();
    for node in ["a", "b", "c", "d"] {
        let share = count(&uniform, node);
        assert!((share - 2_500.0).abs() <= 250.0, "{node}: {share} of 10,000 ids");
    }
    let by_cpu = placement.init(&ids, Strategy::Cpu, 1).await.unwrap();
    for (node, cpus) in [("a", 1.0), ("b", 1.0), ("c", 2.0), ("d", 4.0)] {
        let share = count(&by_cpu, node);
        let expected = 10_000.0 * cpus / 8.0;
        assert!((share - expected).abs() <= expected * 0.1, "{node} ({cpus} cpus): {share}, expected {expected}");
    }
    assert_eq!(placement.node_ids("partition-7").await.unwrap(), by_cpu["partition-7"]);
    // Any node answers the same over HTTP.
    let answer: serde_json::Value =
        reqwest::get(format!("{}/v1/placement/partition-7", nodes[0].url)).await.unwrap().json().await.unwrap();
    assert_eq!(answer["node_ids"], serde_json::json!(by_cpu["partition-7"]));
    assert_eq!(answer["node_id"], by_cpu["partition-7"][0]);

    // A fifth node takes about its share of flocks and nothing else moves.
    let _e = grid_node(&url, "e", "1");
    let after = settle(&placement, 5).await;
    assert!(after.epoch > before.epoch, "the epoch grows: {} -> {}", before.epoch, after.epoch);
    let moved = after.moved_from(&before);
    let share = (FLOCKS as usize * 2) / 5;
    assert!(moved <= share + share / 10, "moved {moved} owner slots; a fifth is {share}");
    assert_eq!(after.flocks_of("e"), moved, "only the new node gained flocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_turns_suspect_then_dead_and_loses_its_flocks() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let _a = grid_node(&url, "a", "1");
    let mut b = grid_node(&url, "b", "1");
    let _c = grid_node(&url, "c", "1");
    let (statekeeper, placement) = placement(&url).await;
    settle(&placement, 3).await;
    let held: Vec<String> = (0..2_000)
        .map(|i| format!("key-{i}"))
        .filter(|k| placement.node_ids_cached(k).contains(&"b".to_owned()))
        .collect();
    assert!(!held.is_empty());
    b.kill();
    let killed = Instant::now();
    let mut saw_suspect = false;
    loop {
        let nodes = statekeeper.live_nodes().await.unwrap();
        match nodes.iter().find(|n| n.id == "b").map(|n| n.health) {
            Some(girder::control::Health::Suspect) => saw_suspect = true,
            None => break, // dead and reaped
            _ => {}
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "b never died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_suspect, "b was suspect before it was dead");
    let table = settle(&placement, 2).await;
    assert_eq!(table.flocks_of("b"), 0);
    for key in &held {
        let owners = placement.node_ids(key).await.unwrap();
        assert!(!owners.contains(&"b".to_owned()) && owners.len() == 2, "{key}: {owners:?}");
        assert!(placement.node_id(key).await.unwrap().is_some_and(|n| n != "b"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_runs_on_the_owner_and_survives_its_death() {
    use girder::examples::whoami;
    use girder::{Node, PoolSpec, Registry};
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let grid_node4 = |id: &str| {
        NodeProcess::start(&[
            "--statekeeper",
            &url,
            "--id",
            id,
            "--workers",
            "1",
            "--slots",
            "4",
            "--node-ttl-ms",
            "1500",
            "--heartbeat-ms",
            "250",
        ])
    };
    let _a = grid_node4("a");
    let mut b = grid_node4("b");
    let _c = grid_node4("c");
    let (statekeeper, placement) = placement(&url).await;
    placement.configure(Strategy::UniformNodes, 1).await.unwrap();
    let table = settle(&placement, 3).await;
    assert_eq!(table.replicas, 1);
    let client = Node::builder()
        .id("client")
        .statekeeper(statekeeper)
        .registry(Registry::new())
        .pool(PoolSpec::new("main"))
        .heartbeat_ms(250)
        .start()
        .await
        .unwrap();
    // The client's own snapshot must know the table and the nodes' free slots.
    let keys: Vec<String> =
        (0..500).map(|i| format!("bucket-{i}")).filter(|k| placement.node_ids_cached(k) == ["b"]).take(20).collect();
    assert_eq!(keys.len(), 20);
    let begun = Instant::now();
    while client.placement().table().epoch < table.epoch
        || client.placement().affinity_worker(&keys[0], "examples/whoami").is_none()
    {
        assert!(begun.elapsed() < Duration::from_secs(10), "the client never learned the placement");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, key) in keys.iter().enumerate() {
        let ran_on = whoami::call(&client.client().with_affinity(key.as_str()), format!("t{i}")).await.unwrap();
        assert_eq!(ran_on, "b", "{key} is owned by b, which had a free slot");
    }
    // Without affinity the same work spreads.
    let plain = client.client();
    let calls = (0..60).map(|i| whoami::call(&plain, format!("s{i}")));
    let spread: std::collections::HashSet<String> =
        futures::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
    assert!(spread.len() >= 2, "{spread:?}");
    b.kill();
    let killed = Instant::now();
    for (i, key) in keys.iter().enumerate() {
        let ran_on = whoami::call(&client.client().with_affinity(key.as_str()), format!("after-{i}")).await.unwrap();
        assert_ne!(ran_on, "b");
    }
    assert!(killed.elapsed() < Duration::from_millis(TTL_MS + 5_000), "keyed work waited {:?}", killed.elapsed());
    client.shutdown().await;
}

#[test]
fn a_node_told_to_stop_finishes_its_work_and_leaves() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let args = |id: &'static str| -> Vec<String> {
        ["--statekeeper", &url, "--id", id, "--workers", "1", "--slots", "2"].iter().map(|s| s.to_string()).collect()
    };
    let leaving = NodeProcess::start(&args("leaving").iter().map(String::as_str).collect::<Vec<_>>());
    // A long call through the leaving node, which is alone so it runs there.
    let url_of_leaving = leaving.url.clone();
    let call = std::thread::spawn(move || {
        Command::new(GIRDER).args(["call", "examples/whoami", "\"long\"", "--node", &url_of_leaving]).output().unwrap()
    });
    let slow = {
        let url_of_leaving = leaving.url.clone();
        std::thread::spawn(move || {
            Command::new(GIRDER).args(["call", "examples/sleep", "1500", "--node", &url_of_leaving]).output().unwrap()
        })
    };
    assert_eq!(text(&call.join().unwrap().stdout), "\"leaving\"");
    let staying = NodeProcess::start(&args("staying").iter().map(String::as_str).collect::<Vec<_>>());
    until(&staying, "both nodes live", |n| n.as_array().is_some_and(|a| a.len() == 2));
    // SIGTERM: the node drains. The sleep it runs finishes; then it is gone.
    let status = Command::new("kill").args(["-TERM", &leaving.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let slept = slow.join().unwrap();
    assert!(slept.status.success(), "the call in flight finished: {}", text(&slept.stderr));
    assert_eq!(text(&slept.stdout), "1500");
    until(&staying, "the leaving node gone", |n| n.as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] == "staying"));
    assert_eq!(text(&staying.call(&["examples/whoami", "\"after\""]).stdout), "\"staying\"");
}
