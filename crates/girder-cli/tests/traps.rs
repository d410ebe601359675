//! Nodes and CLI without traps: gateway nodes, default ids, and configuration that needs a
//! statekeeper to mean anything.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::testing::RedisServer;

/// Starts `girder node ARGS` with its stderr kept for the test to read; returns the child
/// and the URL it printed.
fn node_with_stderr(args: &[&str], envs: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut node = Command::new(GIRDER)
        .args(["node", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("girder node starts");
    let mut line = String::new();
    BufReader::new(node.stdout.take().expect("stdout")).read_line(&mut line).expect("address line");
    let url = line.split_whitespace().last().unwrap_or_default().to_owned();
    (node, url)
}

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

#[test]
fn sigterm_with_blocking_and_async_work_in_flight_exits_cleanly() {
    use std::io::Read;
    use std::process::Stdio;
    let (mut node, url) = node_with_stderr(&["--workers", "1", "--slots", "1", "--drain-timeout-ms", "300"], &[]);
    // Deep chains of both kinds in flight: suspended fibers and parked tasks when it stops.
    let callers: Vec<_> = ["examples/zigzag", "examples/chain_blocking"]
        .into_iter()
        .map(|function| {
            Command::new(GIRDER)
                .args(["call", function, "200000", "--node", &url])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("girder call starts")
        })
        .collect();
    // Wait until evaluations run, then stop it.
    let begun = Instant::now();
    loop {
        let stats = Command::new(GIRDER).args(["status", "--json", "--node", &url]).output().expect("status");
        let nodes: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
        if nodes[0]["evaluations"].as_u64().unwrap_or(0) > 100 {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "no evaluations started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let sent = Command::new("kill").args(["-TERM", &node.id().to_string()]).status().expect("kill runs");
    assert!(sent.success());
    let status = node.wait().expect("node exits");
    let took = stopping.elapsed();
    let mut stderr = String::new();
    node.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr reads");
    assert!(!stderr.contains("panicked"), "the node panicked while stopping:\n{stderr}");
    assert!(status.success(), "exit {status:?}:\n{stderr}");
    assert!(took < Duration::from_millis(300) + Duration::from_secs(5), "stopping took {took:?}");
    for mut caller in callers {
        let _ = caller.kill();
        let _ = caller.wait();
    }
}

#[test]
fn a_closed_stdout_ends_a_verb_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    // The demo prints many lines; nobody reads them.
    let mut demo = Command::new(GIRDER)
        .args(["demo", "--requests", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("girder demo starts");
    drop(demo.stdout.take());
    let status = demo.wait().expect("demo exits");
    let mut stderr = String::new();
    demo.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr reads");
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_never_shows_secrets_from_the_environment() {
    for verb in ["node", "config", "ds", "status"] {
        let out = Command::new(GIRDER)
            .args([verb, "--help"])
            .env("GIRDER_STATEKEEPER", "redis://:hunter2@127.0.0.1:1/0")
            .env("GIRDER_NODE", "http://user:hunter2@127.0.0.1:1")
            .output()
            .expect("girder runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{verb} --help: {text}");
        assert!(!text.contains("hunter2"), "girder {verb} --help shows a secret:\n{text}");
    }
}

#[tokio::test]
async fn a_refused_ttl_changes_nothing_on_either_store() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let embedded = NodeProcess::start(&["--workers", "1"]);
    let on_redis = redis_node(&url, &["--workers", "1"]);
    let http = reqwest::Client::new();
    for node in [&embedded, &on_redis] {
        let key = format!("{}/v1/cache/ttl-key", node.url);
        let put = http.put(&key).body("first").send().await.expect("PUT");
        assert!(put.status().is_success(), "{}", put.status());
        for ttl in ["18446744073709551615", "999999999999999999"] {
            let refused = http.put(format!("{key}?ttl_ms={ttl}")).body("second").send().await.expect("PUT");
            assert_eq!(refused.status(), 400, "ttl {ttl} on {}", node.url);
            let body: serde_json::Value = refused.json().await.expect("a JSON error body");
            assert!(body["message"].as_str().is_some_and(|m| m.contains("time-to-live")), "{body}");
        }
        let value = http.get(&key).send().await.expect("GET").text().await.expect("body");
        assert_eq!(value, "first", "a refused write changed the value on {}", node.url);
    }
}

#[test]
fn statekeeper_urls_never_show_their_password_in_errors() {
    for url in ["redis://:pa/hunter2@127.0.0.1:1/0", "redis:/:hunter2@127.0.0.1:1/0", "rediss//u:hunter2@127.0.0.1:1"] {
        for verb in [&["node", "--listen", "127.0.0.1:0"][..], &["status"], &["config", "get", "n1"]] {
            let out = Command::new(GIRDER).args(verb).args(["--statekeeper", url]).output().expect("girder runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb:?} with {url} succeeded");
            assert!(!stderr.contains("hunter2"), "{verb:?} with {url} shows the password: {stderr}");
        }
    }
}

#[tokio::test]
async fn a_node_with_a_token_refuses_requests_without_it() {
    let dir = std::env::temp_dir().join(format!("girder-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cr3t-token\n").expect("token file");
    let file = token_file.to_string_lossy().into_owned();
    let node = NodeProcess::start(&["--workers", "1", "--token-file", &file]);
    let http = reqwest::Client::new();
    // Health answers anyone (probes); everything else needs the token.
    assert_eq!(http.get(format!("{}/v1/health", node.url)).send().await.expect("health").status(), 200);
    for (method, path) in [
        (reqwest::Method::POST, "/v1/call/examples/echo"),
        (reqwest::Method::GET, "/v1/cache/k"),
        (reqwest::Method::GET, "/v1/status"),
        (reqwest::Method::GET, "/metrics"),
    ] {
        for token in [None, Some("wrong"), Some("s3cr3t-token-but-longer")] {
            let mut request = http.request(method.clone(), format!("{}{path}", node.url)).body("[1]");
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            let body: serde_json::Value = response.json().await.expect("JSON body");
            assert_eq!(body["kind"], "unauthorized", "{body}");
        }
    }
    let ok = http.post(format!("{}/v1/call/examples/echo", node.url)).bearer_auth("s3cr3t-token").body("[7]");
    assert_eq!(ok.send().await.expect("call").text().await.expect("body"), "7");
    // The CLI verbs send it from the file or the environment.
    let out = node.call(&["examples/echo", "8", "--token-file", &file]);
    assert_eq!(text(&out.stdout), "8", "{}", text(&out.stderr));
    let out = Command::new(GIRDER)
        .args(["call", "examples/echo", "9", "--node", &node.url])
        .env("GIRDER_TOKEN", "s3cr3t-token")
        .output()
        .expect("girder call");
    assert_eq!(text(&out.stdout), "9", "{}", text(&out.stderr));
    let out = node.call(&["examples/echo", "10"]);
    assert!(!out.status.success() && text(&out.stderr).contains("bearer token"), "{}", text(&out.stderr));
    let status = Command::new(GIRDER)
        .args(["status", "--node", &node.url, "--token-file", &file])
        .output()
        .expect("girder status");
    assert!(status.status.success(), "{}", text(&status.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cache_keys_from_http_cannot_touch_internal_state() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let node = redis_node(&url, &["--id", "n1", "--workers", "1"]);
    let http = reqwest::Client::new();
    for internal in ["girder%2Fplacement%2Fids", "girder%2Fplacement%2Ftable", "girder%2Fconfig%2Fn1"] {
        let put = http.put(format!("{}/v1/cache/{internal}", node.url)).body("junk").send().await.expect("PUT");
        assert!(put.status().is_success(), "{internal}: {}", put.status());
    }
    // Placement and configuration still read their own state.
    let placed = http.get(format!("{}/v1/placement/some-id", node.url)).send().await.expect("placement");
    assert_eq!(placed.status(), 200, "{}", placed.text().await.unwrap_or_default());
    let set = Command::new(GIRDER)
        .args(["config", "set", "n1", "slots", "3", "--statekeeper", &url])
        .output()
        .expect("config");
    assert!(set.status.success(), "{}", text(&set.stderr));
    let got = Command::new(GIRDER).args(["config", "get", "n1", "--statekeeper", &url]).output().expect("config");
    assert_eq!(text(&got.stdout), "slots = 3", "{}", text(&got.stderr));
    // And the user's values are theirs.
    let value = http.get(format!("{}/v1/cache/girder%2Fconfig%2Fn1", node.url)).send().await.expect("GET");
    assert_eq!(value.text().await.expect("body"), "junk");
}

#[tokio::test]
async fn panicking_calls_are_logged_once_per_interval_not_each() {
    use std::io::Read;
    let (mut node, url) = node_with_stderr(&["--workers", "1", "--slots", "2"], &[("RUST_BACKTRACE", "1")]);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let response = http.post(format!("{url}/v1/call/examples/panic")).body("[]").send().await.expect("call");
        assert_eq!(response.status(), 500);
    }
    // The node still serves.
    let echo = http.post(format!("{url}/v1/call/examples/echo")).body("[1]").send().await.expect("call");
    assert_eq!(echo.text().await.expect("body"), "1");
    let sent = Command::new("kill").args(["-TERM", &node.id().to_string()]).status().expect("kill");
    assert!(sent.success());
    node.wait().expect("node exits");
    let mut stderr = String::new();
    node.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr reads");
    let logged = stderr.lines().filter(|l| l.contains("function panicked")).count();
    assert!((1..=2).contains(&logged), "{logged} panic lines for 200 panics:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "backtraces were printed:\n{stderr}");
    assert!(stderr.len() < 16 * 1024, "{} bytes of stderr for 200 panics", stderr.len());
}

/// Live node ids as `node` sees them.
fn live_ids(node: &NodeProcess) -> Vec<String> {
    let out = Command::new(GIRDER).args(["status", "--json", "--node", &node.url]).output().expect("status");
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    nodes.as_array().into_iter().flatten().filter_map(|n| n["id"].as_str().map(str::to_owned)).collect()
}

#[test]
fn a_node_frozen_past_its_lease_serves_its_callers_at_once_when_it_resumes() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let frozen = redis_node(&url, &["--id", "frozen", "--workers", "0"]);
    let worker = redis_node(&url, &["--id", "worker", "--workers", "1"]);
    let caller = Command::new(GIRDER)
        .args(["call", "examples/sleep", "1000", "--node", &frozen.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("girder call starts");
    // Freeze the caller's node once the worker runs the call.
    let begun = Instant::now();
    loop {
        let out = Command::new(GIRDER).args(["status", "--json", "--node", &worker.url]).output().expect("status");
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let running =
            nodes.as_array().into_iter().flatten().any(|n| n["id"] == "worker" && n["evaluations"].as_u64() >= Some(1));
        if running {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "the call never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-STOP", &frozen.pid().to_string()]).status().expect("kill").success());
    // Past its lease: the worker's view drops it.
    let begun = Instant::now();
    while live_ids(&worker).contains(&"frozen".to_owned()) {
        assert!(begun.elapsed() < Duration::from_secs(20), "the frozen node was never reaped");
        std::thread::sleep(Duration::from_millis(50));
    }
    // By now the call has finished on the worker; its outcome is memoized.
    std::thread::sleep(Duration::from_millis(1_200));
    let resumed = Instant::now();
    assert!(Command::new("kill").args(["-CONT", &frozen.pid().to_string()]).status().expect("kill").success());
    let out = caller.wait_with_output().expect("girder call ends");
    let waited = resumed.elapsed();
    assert_eq!(text(&out.stdout), "1000", "{}", text(&out.stderr));
    assert!(waited < Duration::from_secs(6), "the caller waited {waited:?} after its node resumed");
}

#[test]
fn a_node_restarted_after_a_crash_takes_over_its_id_at_once() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    // A long lease, so that waiting it out would show.
    let args = ["--statekeeper", url.as_str(), "--id", "phoenix", "--node-ttl-ms", "30000", "--heartbeat-ms", "100"];
    let mut first = NodeProcess::start(&args);
    // Its first heartbeat records its process id.
    let begun = Instant::now();
    loop {
        let out = Command::new(GIRDER).args(["status", "--json", "--node", &first.url]).output().expect("status");
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if nodes.as_array().into_iter().flatten().any(|n| n["id"] == "phoenix" && n["pid"] == first.pid()) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "no heartbeat with the process id");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill();
    let restarted = Instant::now();
    let second = NodeProcess::start(&args);
    assert!(restarted.elapsed() < Duration::from_secs(5), "took {:?} to take over", restarted.elapsed());
    assert_eq!(text(&second.call(&["examples/echo", "3"]).stdout), "3");
    // A live node with the same id is still refused.
    let third = Command::new(GIRDER).args(["node", "--listen", "127.0.0.1:0"]).args(args).output().expect("runs");
    assert!(!third.status.success());
    assert!(text(&third.stderr).contains("already in use"), "{}", text(&third.stderr));
}
