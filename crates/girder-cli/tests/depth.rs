//! Deep chains across real `girder node` processes on one real Redis: `chain_blocking`,
//! `chain` and `zigzag` 5,000 deep on two nodes of 1 worker x 1 slot each, with every
//! node's thread count bounded by what it had after startup plus its slot and a few more.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::NodeProcess;
use girder::testing::RedisServer;

/// How deep each chain goes.
const DEPTH: u64 = 5_000;
/// Slots of each node (1 worker x 1 slot).
const SLOTS: usize = 1;
/// Threads besides the slot's fiber thread that may come and go in a node: a few of
/// tokio's blocking pool (a DNS lookup, a file read) and the like.
const EXTRA_THREADS_MAX: usize = 4;
/// The longest any one call may take before the test fails instead of hanging.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `girder node` arguments for a node `id` of 1 worker x 1 slot on the Redis at `url`.
fn node_args<'a>(url: &'a str, id: &'a str) -> Vec<&'a str> {
    vec!["--statekeeper", url, "--id", id, "--workers", "1", "--slots", "1", "--heartbeat-ms", "250"]
}

/// The `Threads:` count of process `pid`, or `None` once it is gone.
fn threads_of(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("Threads:")?.trim().parse().ok())
}

/// Samples the thread counts of some processes every millisecond, keeping each one's peak.
struct PeakThreads {
    /// Set to end the sampling.
    stop: Arc<AtomicBool>,
    /// The sampling thread; returns the peak per process id.
    sampler: std::thread::JoinHandle<HashMap<u32, usize>>,
}

impl PeakThreads {
    /// Starts sampling `pids`.
    fn start(pids: Vec<u32>) -> PeakThreads {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peaks = HashMap::new();
            while !stopped.load(Ordering::Relaxed) {
                for &pid in &pids {
                    let now = threads_of(pid).unwrap_or(0);
                    let peak = peaks.entry(pid).or_insert(0);
                    *peak = now.max(*peak);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            peaks
        });
        PeakThreads { stop, sampler }
    }

    /// Stops sampling; returns the peak thread count of each process.
    fn finish(self) -> HashMap<u32, usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().expect("the sampler ends")
    }
}

/// Calls `function` with `[n]` through the HTTP API of the node at `url`, bounded in time.
async fn call(http: &reqwest::Client, url: &str, function: &str, n: u64) -> serde_json::Value {
    let timeout_ms = CALL_TIMEOUT.as_millis();
    let response = http
        .post(format!("{url}/v1/call/{function}?timeout_ms={timeout_ms}"))
        .header("content-type", "application/json")
        .body(format!("[{n}]"))
        .timeout(CALL_TIMEOUT + Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{function}({n}) on {url}: {e}"));
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_else(|e| panic!("{function}({n}): {e}"));
    assert!(status.is_success(), "{function}({n}) on {url}: {status} {body}");
    body
}

/// Evaluations per function and per worker of the node at `url`, for the log.
async fn evaluations(http: &reqwest::Client, url: &str) -> String {
    let stats: serde_json::Value = match http.get(format!("{url}/v1/stats")).send().await {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(e) => return format!("no stats: {e}"),
    };
    let counts: Vec<String> = stats["evaluations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["count"].as_u64().unwrap_or(0) > 0)
        .map(|e| format!("{} {}", e["function"], e["count"]))
        .collect();
    format!("evaluations {}; workers {}", counts.join(", "), stats["workers"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_chains_across_two_nodes_keep_threads_bounded() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let nodes = [NodeProcess::start(&node_args(&url, "a")), NodeProcess::start(&node_args(&url, "b"))];
    let http = reqwest::Client::new();
    // Both nodes serve and have settled: a call on each, then their threads after startup.
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(call(&http, &node.url, "examples/echo", i as u64).await, serde_json::json!(i));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started: Vec<usize> = nodes.iter().map(|n| threads_of(n.pid()).expect("the node runs")).collect();

    let peaks = PeakThreads::start(nodes.iter().map(NodeProcess::pid).collect());
    let calls = [("examples/chain_blocking", &nodes[0]), ("examples/chain", &nodes[1]), ("examples/zigzag", &nodes[0])];
    for (function, node) in calls {
        let begun = std::time::Instant::now();
        let value = call(&http, &node.url, function, DEPTH).await;
        eprintln!("{function}({DEPTH}) on {}: {value} in {:?}", node.url, begun.elapsed());
        assert_eq!(value, serde_json::json!(DEPTH), "{function}({DEPTH})");
    }
    let peaks = peaks.finish();

    for (node, started) in nodes.iter().zip(started) {
        let peak = peaks.get(&node.pid()).copied().unwrap_or(0);
        eprintln!(
            "node {}: threads {started} after startup, peak {peak}; {}",
            node.url,
            evaluations(&http, &node.url).await
        );
        assert!(
            peak <= started + SLOTS + EXTRA_THREADS_MAX,
            "node {}: peak threads {peak}, more than {started} after startup + {SLOTS} slot + {EXTRA_THREADS_MAX}",
            node.url
        );
    }
}
