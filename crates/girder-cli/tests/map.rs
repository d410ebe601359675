//! `POST /v1/map` and `girder map` against a real `girder node`: results stream as NDJSON
//! lines while the map runs, every input is answered once, and a map can be cancelled by id.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use futures::StreamExt;

/// Reads NDJSON lines from `chunks` until one is complete; keeps the rest in `pending`.
async fn next_line<S>(chunks: &mut S, pending: &mut Vec<u8>) -> Option<serde_json::Value>
where
    S: futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin,
{
    loop {
        if let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            return Some(serde_json::from_slice(&line).expect("each line is JSON"));
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), chunks.next()).await.expect("a line within 30 s")?;
        pending.extend_from_slice(&chunk.expect("the stream goes on"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_results_stream_as_lines_while_the_map_runs_and_the_map_can_be_cancelled() {
    let node = NodeProcess::start(&["--workers", "1", "--slots", "4"]);
    let http = reqwest::Client::new();
    // A leaf that sleeps a minute, then two quick ones: their lines come while it sleeps.
    let response = http
        .post(format!("{}/v1/map/examples/nap_tree?concurrency=3", node.url))
        .header("girder-call-id", "map-1")
        .json(&serde_json::json!([[0, 1, 1, 60000], [0, 1, 2, 1], [0, 1, 3, 1]]))
        .send()
        .await
        .expect("the node answers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    assert_eq!(response.headers()["girder-call-id"], "map-1");
    let (mut chunks, mut pending) = (response.bytes_stream(), Vec::new());
    let mut quick = HashSet::new();
    for _ in 0..2 {
        let line = next_line(&mut chunks, &mut pending).await.expect("a line");
        assert_eq!(line["value"], 1, "{line}");
        quick.insert(line["index"].as_u64().expect("an index"));
    }
    assert_eq!(quick, HashSet::from([1, 2]));
    // The slow input still runs; cancelling the map by id answers it as cancelled.
    let cancelled = http.delete(format!("{}/v1/calls/map-1", node.url)).send().await.expect("delete answers");
    assert_eq!(cancelled.status(), 200);
    let line = next_line(&mut chunks, &mut pending).await.expect("the slow input's line");
    assert_eq!((line["index"].as_u64(), line["error"]["kind"].as_str()), (Some(0), Some("cancelled")), "{line}");
    assert!(next_line(&mut chunks, &mut pending).await.is_none(), "the map ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_of_ten_thousand_inputs_answers_each_once_and_refuses_what_is_not_a_map() {
    let node = NodeProcess::start(&["--workers", "2", "--slots", "4"]);
    let http = reqwest::Client::new();
    let inputs: Vec<serde_json::Value> = (0..10_000).map(|i| serde_json::json!([i])).collect();
    let response = http
        .post(format!("{}/v1/map/examples/echo?concurrency=64", node.url))
        .json(&inputs)
        .send()
        .await
        .expect("the node answers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["girder-call-id"].len(), 32, "a call id made by the node");
    let (mut chunks, mut pending) = (response.bytes_stream(), Vec::new());
    let mut seen = HashSet::new();
    while let Some(line) = next_line(&mut chunks, &mut pending).await {
        let index = line["index"].as_u64().expect("an index");
        assert_eq!(line["value"].as_u64(), Some(index), "{line}");
        assert!(seen.insert(index), "input {index} answered twice");
    }
    assert_eq!(seen.len(), 10_000);
    // Refused before anything runs: not an array of arrays, unknown function.
    for (path, body, status) in
        [("examples/echo", "[1, 2]", 400), ("examples/echo", "{}", 400), ("nobody/serves", "[[1]]", 404)]
    {
        let response = http
            .post(format!("{}/v1/map/{path}", node.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the node answers");
        assert_eq!(response.status(), status, "{path} {body}");
        let error: serde_json::Value = response.json().await.expect("a JSON error");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    }
    let response = http.delete(format!("{}/v1/calls/bad%20id", node.url)).send().await.expect("delete answers");
    assert_eq!(response.status(), 400);
}

#[test]
fn girder_map_reads_argument_arrays_from_stdin_and_prints_every_result() {
    let node = NodeProcess::start(&["--workers", "1", "--slots", "4"]);
    let run = |input: &str, extra: &[&str]| {
        let mut child = Command::new(GIRDER)
            .args(["map", "examples/fib", "--node", &node.url, "--concurrency", "8"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("girder map starts");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("stdin takes the inputs");
        child.wait_with_output().expect("girder map ends")
    };
    // fib(n) for n < 70 stays below 2^53, where JSON results turn into strings.
    let input: String = (0..200).map(|n| format!("[{}]\n", n % 70)).collect();
    let begun = Instant::now();
    let out = run(&input, &["--ordered"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 200);
    let (mut a, mut b) = (0u64, 1u64);
    let fibs: Vec<u64> = (0..70)
        .map(|_| {
            let value = a;
            (a, b) = (b, a + b);
            value
        })
        .collect();
    for (position, line) in lines.iter().enumerate() {
        assert_eq!(line["index"].as_u64(), Some(position as u64), "ordered");
        assert_eq!(line["value"].as_u64(), Some(fibs[position % 70]), "{line}");
    }
    assert!(begun.elapsed() < Duration::from_secs(60));
    // A bad line is refused before anything is sent; a failing input fails the command.
    let out = run("[1]\nnot json\n", &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("line 2 of stdin is not JSON"), "{}", text(&out.stderr));
    let out = run("[1]\n[\"x\"]\n", &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("1 of 2 calls failed"), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2, "both lines printed: {}", text(&out.stdout));
}
