//! End to end: a real `girder node` process, its HTTP API, and `girder call` against it.

mod common;

use std::process::Command;

use common::{text, NodeProcess, GIRDER};

const NODE_ARGS: &[&str] = &["--id", "node", "--workers", "2", "--slots", "2"];

#[test]
fn girder_call_against_a_running_node() {
    let node = NodeProcess::start(NODE_ARGS);
    let out = node.call(&["examples/fib", "90"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // Beyond 2^53, JSON integers are decimal strings.
    assert_eq!(text(&out.stdout), "\"2880067194370816120\"");

    let out = node.call(&["examples/tree", "4", "3", "0"]);
    assert_eq!(text(&out.stdout), "121");

    let out = node.call(&["examples/echo", r#"{"a":[1,"x",null]}"#]);
    assert_eq!(text(&out.stdout), r#"{"a":[1,"x",null]}"#);

    let out = node.call(&["nobody/nothing"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no live node has registered function nobody/nothing"), "{}", text(&out.stderr));

    let out = node.call(&["examples/fail", r#""out of paper""#]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("examples/fail returned an error: out of paper"), "{}", text(&out.stderr));

    let out = node.call(&["examples/fib", "ninety"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is not JSON"), "{}", text(&out.stderr));

    let out = node.call(&["examples/sleep", "3000", "--timeout-ms", "50"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("deadline of 50 ms"), "{}", text(&out.stderr));

    // The node served everything above and still answers.
    let out = node.call(&["examples/fib", "10"]);
    assert_eq!(text(&out.stdout), "55");
}

#[tokio::test]
async fn http_api_statuses_and_error_bodies() {
    let node = NodeProcess::start(NODE_ARGS);
    let http = reqwest::Client::new();
    let post = |function: &str, body: &'static str| {
        http.post(format!("{}/v1/call/{function}", node.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let check = |response: reqwest::Response, status: u16, kind: &'static str| async move {
        assert_eq!(response.status().as_u16(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["kind"], kind, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        body
    };

    let ok = post("examples/fib", "[20]").await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.json::<serde_json::Value>().await.unwrap(), serde_json::json!(6765));

    check(post("examples/fib", "[20").await.unwrap(), 400, "bad_request").await;
    check(post("examples/fib", r#"{"n": 20}"#).await.unwrap(), 400, "bad_request").await;
    check(post("examples/fib", r#"["x"]"#).await.unwrap(), 400, "bad_arguments").await;
    // Bad arguments stay a 400 whatever the deadline: they are refused before any wait.
    let zero = http.post(format!("{}/v1/call/examples/fib?timeout_ms=0", node.url)).body(r#"["x"]"#).send();
    check(zero.await.unwrap(), 400, "bad_arguments").await;
    check(post("no/such", "[]").await.unwrap(), 404, "unknown_function").await;
    let body = check(post("examples/fail", r#"["boom"]"#).await.unwrap(), 422, "function_error").await;
    assert!(body["message"].as_str().unwrap().contains("boom"));
    check(post("examples/panic", "[]").await.unwrap(), 500, "panic").await;
    let slow =
        http.post(format!("{}/v1/call/examples/sleep?timeout_ms=20", node.url)).body("[5000]").send().await.unwrap();
    check(slow, 504, "deadline_exceeded").await;
    let bad_query =
        http.post(format!("{}/v1/call/examples/sleep?timeout_ms=soon", node.url)).body("[1]").send().await.unwrap();
    check(bad_query, 400, "bad_request").await;

    let health: serde_json::Value =
        http.get(format!("{}/v1/health", node.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let stats: serde_json::Value =
        http.get(format!("{}/v1/stats", node.url)).send().await.unwrap().json().await.unwrap();
    // fib(20) evaluates 21 distinct requests; the ["x"] calls were refused before anything
    // was submitted, so no worker saw them.
    assert!(
        stats["evaluations"].as_array().unwrap().iter().any(|e| e["function"] == "examples/fib" && e["count"] == 21),
        "{stats}"
    );

    // After all of that the node still computes.
    let ok = post("examples/fib", "[30]").await.unwrap();
    assert_eq!(ok.json::<serde_json::Value>().await.unwrap(), serde_json::json!(832040));
}

#[test]
fn bad_flags_get_one_clear_line() {
    let out = Command::new(GIRDER).args(["node", "--slots", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--slots"), "{err}");

    let out = Command::new(GIRDER).args(["call"]).output().unwrap();
    assert!(!out.status.success());

    let out =
        Command::new(GIRDER).args(["call", "examples/fib", "1", "--node", "http://127.0.0.1:1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot reach the girder node"), "{}", text(&out.stderr));

    for verb in ["demo", "node", "call", "bench"] {
        let out = Command::new(GIRDER).args([verb, "--help"]).output().unwrap();
        assert!(out.status.success(), "{verb} --help");
        assert!(text(&out.stdout).contains("Usage"), "{verb} --help");
    }
}

#[test]
fn demo_runs_and_verifies_its_answers() {
    let out = Command::new(GIRDER).args(["demo", "--quiet", "--requests", "300"]).output().unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("all 300 answers verified"), "{stdout}");
    assert!(stdout.contains("served from cache"), "{stdout}");
}

/// Checks every sample line is `name{labels} value` with a metric name and a number.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        samples.push((series.to_owned(), value));
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_count_the_calls_just_made() {
    let node = NodeProcess::start(NODE_ARGS);
    let http = reqwest::Client::new();
    let metrics = || async { http.get(format!("{}/metrics", node.url)).send().await.unwrap().text().await.unwrap() };
    let value = |samples: &[(String, f64)], series: &str| samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    let before = parse_prometheus(&metrics().await);
    assert_eq!(value(&before, "girder_call_duration_seconds_count{node=\"node\"}"), Some(0.0));
    for n in 0..5 {
        let out = node.call(&["examples/echo", &n.to_string()]);
        assert!(out.status.success());
    }
    let after = parse_prometheus(&metrics().await);
    assert_eq!(value(&after, "girder_call_duration_seconds_count{node=\"node\"}"), Some(5.0));
    assert_eq!(value(&after, "girder_evaluations_total{node=\"node\",function=\"examples/echo\"}"), Some(5.0));
    assert!(value(&after, "girder_calls_total{node=\"node\"}").unwrap() >= 5.0);
    assert!(after.iter().any(|(s, _)| s.starts_with("girder_worker_slots{")));
}

#[tokio::test]
async fn every_http_error_has_a_json_body_and_a_fitting_status() {
    let node = NodeProcess::start(NODE_ARGS);
    let http = reqwest::Client::new();
    let cases = [
        (reqwest::Method::GET, "/nope", 404, "not_found"),
        (reqwest::Method::GET, "/v1/call/examples/echo", 405, "bad_request"),
        (reqwest::Method::DELETE, "/v1/health", 405, "bad_request"),
        (reqwest::Method::GET, "/v1/cache/%FF%FE", 400, "bad_request"),
        (reqwest::Method::GET, "/v1/placement/%C3%28", 400, "bad_request"),
    ];
    for (method, path, status, kind) in cases {
        let response = http.request(method.clone(), format!("{}{path}", node.url)).send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = response.json().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(body["kind"], kind, "{method} {path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {body}");
    }
}
