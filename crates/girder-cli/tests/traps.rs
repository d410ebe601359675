//! Nodes and CLI without traps: gateway nodes, default ids, and configuration that needs a
//! statekeeper to mean anything.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::testing::RedisServer;

fn redis_node(url: &str, extra: &[&str]) -> NodeProcess {
    let base = ["--statekeeper", url, "--node-ttl-ms", "1500", "--heartbeat-ms", "250"];
    NodeProcess::start(&[&base[..], extra].concat())
}

#[test]
fn a_gateway_node_forwards_calls_and_fails_fast_for_functions_nobody_serves() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let gateway = redis_node(&url, &["--id", "gateway", "--workers", "0"]);
    let _worker = redis_node(&url, &["--id", "worker", "--functions", "examples/fib,examples/whoami"]);
    let out = gateway.call(&["examples/fib", "40"]);
    assert_eq!(text(&out.stdout), "102334155", "stderr: {}", text(&out.stderr));
    let out = gateway.call(&["examples/whoami", "\"x\""]);
    assert_eq!(text(&out.stdout), "\"worker\"", "the gateway runs nothing itself; stderr: {}", text(&out.stderr));
    // The gateway registers the examples but serves none of them: a function only it has
    // fails at once instead of waiting for a worker that will never come.
    let begun = Instant::now();
    let out = gateway.call(&["examples/echo", "1", "--timeout-ms", "20000"]);
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("no live node has registered function examples/echo"), "{}", text(&out.stderr));
    assert!(begun.elapsed() < Duration::from_secs(5), "failed after {:?}", begun.elapsed());
}

#[test]
fn nodes_started_without_an_id_get_distinct_ones_and_both_join() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let a = redis_node(&url, &[]);
    let b = redis_node(&url, &[]);
    let begun = Instant::now();
    loop {
        let out = Command::new(GIRDER).args(["status", "--json", "--node", &a.url]).output().expect("status runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let ids: Vec<String> =
            nodes.as_array().into_iter().flatten().filter_map(|n| n["id"].as_str().map(str::to_owned)).collect();
        if ids.len() == 2 {
            // Host, process id and a random suffix.
            for pid in [a.pid(), b.pid()] {
                assert!(ids.iter().any(|id| id.contains(&format!("-{pid}-"))), "no id names process {pid}: {ids:?}");
            }
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "both nodes never joined: {ids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn config_without_a_statekeeper_is_an_error() {
    let out = Command::new(GIRDER)
        .args(["config", "set", "n1", "slots", "4"])
        .env_remove("GIRDER_STATEKEEPER")
        .output()
        .expect("girder config runs");
    assert!(!out.status.success(), "exit 0 would mean the setting went nowhere");
    assert!(text(&out.stderr).contains("needs the grid's statekeeper"), "{}", text(&out.stderr));
}
