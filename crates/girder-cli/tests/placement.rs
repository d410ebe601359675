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
    let nodes = until(&node, "a first heartbeat", |n| n.as_array().is_some_and(|a| a.len() == 1));
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
