//! The memory cap of an embedded node's structures store, against a real `girder node`:
//! 200 PUTs of 4 MB keep its resident memory under the cap plus a margin; values with a TTL
//! are evicted for new ones, and once only values without one are left, PUTs are refused
//! with a clear error that changes nothing.

mod common;

use common::NodeProcess;

/// The node's resident memory, from `/proc/PID/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a VmRSS line");
    kib << 10
}

const MIB: u64 = 1 << 20;
const VALUE_BYTES: usize = 4_000_000;
const CAP_BYTES: u64 = 64 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_of_4_mb_stay_under_the_structures_cap() {
    // Uncompressible values: the cap counts what is stored, so LZ4 must not shrink them.
    let node = NodeProcess::start(&["--structures-bytes-max", "64M", "--workers", "1"]);
    let http = reqwest::Client::new();
    let mut rng = fastrand::Rng::with_seed(4);
    let value: Vec<u8> = (0..VALUE_BYTES).map(|_| rng.u8(..)).collect();
    let baseline = rss_bytes(node.pid());
    // Room for the transient copies of a body (read, framed, stored: about 20 MB each) on
    // each runtime thread and what the allocator keeps of them; measured peaks here were
    // 135-146 MiB over the baseline. Without the cap the 200 PUTs take 800 MB.
    let margin = 128 * MIB;
    let mut peak = baseline;
    let put = |key: String, ttl: bool| {
        let http = http.clone();
        let url = format!("{}/v1/cache/{key}{}", node.url, if ttl { "?ttl_ms=600000" } else { "" });
        let body = value.clone();
        async move { http.put(url).body(body).send().await.expect("the node answers") }
    };

    // 100 values with a TTL: each evicts the ones closest to expiry, so every PUT succeeds.
    for i in 0..100 {
        let response = put(format!("ttl{i}"), true).await;
        assert!(response.status().is_success(), "ttl{i}: {}", response.status());
        peak = peak.max(rss_bytes(node.pid()));
    }
    let first = http.get(format!("{}/v1/cache/ttl0", node.url)).send().await.expect("answers");
    assert_eq!(first.status(), 404, "the oldest value with a TTL was evicted");
    let last = http.get(format!("{}/v1/cache/ttl99", node.url)).send().await.expect("answers");
    assert_eq!(last.status(), 200, "the newest is kept");

    // 100 values without one: they evict the rest of the TTL'd values, then are refused.
    let (mut stored, mut refused) = (0, 0);
    for i in 0..100 {
        let response = put(format!("plain{i}"), false).await;
        peak = peak.max(rss_bytes(node.pid()));
        if response.status().is_success() {
            assert_eq!(refused, 0, "plain{i} stored after a refusal: nothing was freed");
            stored += 1;
            continue;
        }
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("a JSON error body");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(status == 507 && body["kind"] == "full", "plain{i}: {status} {body}");
        assert!(message.contains("bytes_max"), "the message says what to raise: {message}");
        refused += 1;
        let absent = http.get(format!("{}/v1/cache/plain{i}", node.url)).send().await.expect("answers");
        assert_eq!(absent.status(), 404, "a refused PUT stores nothing");
    }
    assert!((10..=16).contains(&stored), "about 60 MiB of 4 MB values fit: {stored} stored, {refused} refused");
    assert!(
        peak <= baseline + CAP_BYTES + margin,
        "RSS went from {} MiB to {} MiB, over the cap of {} MiB + {} MiB",
        baseline / MIB,
        peak / MIB,
        CAP_BYTES / MIB,
        margin / MIB
    );
    // Deleting makes room again.
    let deleted = http.delete(format!("{}/v1/cache/plain0", node.url)).send().await.expect("answers");
    assert!(deleted.status().is_success());
    assert!(put("again".into(), false).await.status().is_success(), "room after a delete");
}
