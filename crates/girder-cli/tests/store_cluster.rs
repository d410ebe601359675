//! The bucket store across real `girder node` processes on a real Redis: acknowledged
//! writes survive a SIGKILLed node, a restarted node catches up until every replica of
//! every flock is identical, a flipped byte on disk is never served, appends from many
//! writers are neither lost nor repeated when a node dies mid-shuffle.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{text, NodeProcess, ScratchDir, GIRDER};
use girder::testing::RedisServer;

/// A node on `dir`. Writes reach the OS before they are acknowledged (`--fsync buffered`):
/// what these tests kill is processes, whose writes the OS keeps; fsync itself is the
/// engine's tests' business.
fn start(redis: &str, id: &str, dir: &ScratchDir) -> NodeProcess {
    let args = ["--workers", "1", "--slots", "2", "--data-dir", dir.path(), "--fsync", "buffered"];
    NodeProcess::on_redis(redis, id, &args)
}

/// A node on `dir` that syncs every write before acknowledging it.
fn start_durable(redis: &str, id: &str, dir: &ScratchDir) -> NodeProcess {
    NodeProcess::on_redis(redis, id, &["--workers", "1", "--slots", "2", "--data-dir", dir.path()])
}

fn status(node: &NodeProcess) -> serde_json::Value {
    let out = Command::new(GIRDER).args(["status", "--json", "--node", &node.url]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `node` serves every flock it owns (at most 60 s).
fn ready_here(node: &NodeProcess) {
    let begun = Instant::now();
    loop {
        let body = reqwest::blocking::get(format!("{}/v1/flocks", node.url)).unwrap().text().unwrap();
        let flocks: serde_json::Value = serde_json::from_str(&body).unwrap();
        let owned: Vec<&serde_json::Value> =
            flocks["flocks"].as_array().unwrap().iter().filter(|f| f["owner"] == true).collect();
        if !owned.is_empty() && owned.iter().all(|f| f["ready"] == true) {
            return;
        }
        assert!(begun.elapsed() < Duration::from_secs(60), "{} never caught up", node.url);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bits(report: &serde_json::Value, field: &str) -> u32 {
    report["store"][field].as_array().map_or(0, |a| a.iter().map(|b| b.as_u64().unwrap_or(0).count_ones()).sum())
}

/// Waits until `nodes` live nodes hold every flock `replicas` times over, all caught up.
fn settled(node: &NodeProcess, nodes: usize, replicas: u32) {
    let begun = Instant::now();
    loop {
        let status = status(node);
        let list = status.as_array().cloned().unwrap_or_default();
        let ready: u32 = list.iter().map(|n| bits(n, "ready")).sum();
        let syncing: u64 = list.iter().map(|n| n["store"]["syncing"].as_u64().unwrap_or(1)).sum();
        if list.len() == nodes && ready == replicas * 1_024 && syncing == 0 {
            return;
        }
        assert!(begun.elapsed() < Duration::from_secs(60), "never settled: ready {ready}, syncing {syncing}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per flock, the digest each node holding it reports.
fn digests(nodes: &[&NodeProcess]) -> HashMap<u64, Vec<(String, String)>> {
    let mut all: HashMap<u64, Vec<(String, String)>> = HashMap::new();
    for node in nodes {
        let body = reqwest::blocking::get(format!("{}/v1/flocks", node.url)).unwrap().text().unwrap();
        let flocks: serde_json::Value = serde_json::from_str(&body).unwrap();
        for flock in flocks["flocks"].as_array().unwrap() {
            if flock["ready"] == true {
                let id = flock["flock"].as_u64().unwrap();
                all.entry(id).or_default().push((node.url.clone(), flock["digest"].as_str().unwrap().to_owned()));
            }
        }
    }
    all
}

/// Writes `count` items through `nodes` in turn, `concurrency` at once; the acknowledged
/// ones, as (bucket, item, value).
async fn write_load(
    urls: Vec<String>,
    writer: usize,
    count: usize,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Vec<(String, String, String)> {
    use futures::StreamExt;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let writes = (0..count).map(|i| {
        let (client, url, done) = (client.clone(), urls[i % urls.len()].clone(), done.clone());
        async move {
            let (bucket, item) = (format!("user-{writer}-{}", i % 997), format!("item-{i}"));
            let value = format!("value {writer}/{i} {}", "x".repeat(i % 300));
            let sent = client.put(format!("{url}/v1/store/{bucket}/{item}")).body(value.clone()).send().await;
            done.fetch_add(1, Ordering::Relaxed);
            match sent {
                Ok(response) if response.status().is_success() => Some((bucket, item, value)),
                _ => None,
            }
        }
    });
    futures::stream::iter(writes).buffer_unordered(concurrency).filter_map(|w| async move { w }).collect().await
}

fn read(url: &str, bucket: &str, item: &str) -> Option<String> {
    let response = reqwest::blocking::get(format!("{url}/v1/store/{bucket}/{item}")).unwrap();
    match response.status().as_u16() {
        200 => Some(response.text().unwrap()),
        404 => None,
        other => panic!("GET {bucket}/{item}: {other} {}", response.text().unwrap_or_default()),
    }
}

#[test]
fn acknowledged_writes_survive_a_sigkill_and_replicas_converge_after_restart() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("n1"), ScratchDir::new("n2"), ScratchDir::new("n3")];
    let n1 = start(&url, "n1", &dirs[0]);
    let n2 = start(&url, "n2", &dirs[1]);
    let mut n3 = start(&url, "n3", &dirs[2]);
    settled(&n1, 3, 2);

    let urls = vec![n1.url.clone(), n2.url.clone()];
    let done = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let writers: Vec<_> = (0..2).map(|w| runtime.spawn(write_load(urls.clone(), w, 10_000, 8, done.clone()))).collect();
    // Kill a node once a fifth of the writes are in: no goodbye, mid-replication.
    let begun = Instant::now();
    while done.load(Ordering::Relaxed) < 4_000 {
        assert!(begun.elapsed() < Duration::from_secs(120), "writes stalled at {}", done.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(10));
    }
    n3.kill();
    let acked: Vec<_> = writers.into_iter().flat_map(|w| runtime.block_on(w).unwrap()).collect();
    assert!(acked.len() > 15_000, "only {} of 20,000 writes acknowledged", acked.len());
    let lost = runtime.block_on(missing(&n1.url, &acked, 16));
    assert!(lost.is_empty(), "{} acknowledged writes not read back, first: {:?}", lost.len(), lost.first());
    // The killed node comes back from its data directory and catches up.
    let n3 = start(&url, "n3", &dirs[2]);
    settled(&n1, 3, 2);
    let sample: Vec<_> = acked.iter().step_by(7).cloned().collect();
    let lost = runtime.block_on(missing(&n3.url, &sample, 16));
    assert!(lost.is_empty(), "{} acknowledged writes not read back through n3, first: {:?}", lost.len(), lost.first());
    // Every replica of every flock holds the same data (anti-entropy repairs what the
    // restart missed; give it a few rounds).
    let begun = Instant::now();
    loop {
        let flocks = digests(&[&n1, &n2, &n3]);
        let differing: Vec<_> = flocks.iter().filter(|(_, d)| d.iter().any(|(_, x)| *x != d[0].1)).collect();
        let held: usize = flocks.values().map(Vec::len).sum();
        if differing.is_empty() && held == 2 * 1_024 {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(30), "replicas differ: {:?}", differing.first());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_flipped_byte_on_disk_is_never_served_and_is_repaired() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("c1"), ScratchDir::new("c2")];
    let c1 = start_durable(&url, "c1", &dirs[0]);
    let mut c2 = start_durable(&url, "c2", &dirs[1]);
    settled(&c1, 2, 2);
    let marker = "UNIQUE-MARKER-0123456789-".repeat(40);
    let client = reqwest::blocking::Client::new();
    let put = client.put(format!("{}/v1/store/victim/item", c1.url)).body(marker.clone()).send().unwrap();
    assert!(put.status().is_success());
    // Stop c2, flip one byte of the value in its files, start it again.
    c2.kill();
    let mut flipped = false;
    for entry in walk(dirs[1].dir()) {
        let mut bytes = std::fs::read(&entry).unwrap();
        if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker.as_bytes()) {
            bytes[at + 100] ^= 0x01;
            std::fs::write(&entry, &bytes).unwrap();
            flipped = true;
        }
    }
    assert!(flipped, "the value was not found on c2's disk");
    let c2 = start_durable(&url, "c2", &dirs[1]);
    settled(&c1, 2, 2);
    ready_here(&c2);
    // Read from c2 itself: a good copy, never the flipped one.
    for _ in 0..3 {
        assert_eq!(read(&c2.url, "victim", "item").as_deref(), Some(marker.as_str()));
    }
    let stats = status(&c2);
    let _ = stats;
    let metrics = reqwest::blocking::get(format!("{}/metrics", c2.url)).unwrap().text().unwrap();
    let repaired = metrics
        .lines()
        .find(|l| l.starts_with("girder_store_repaired_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(repaired >= 1.0, "no repair counted: {metrics}");
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Reads every `(bucket, item, value)` of `acked` through `url`, `concurrency` at once;
/// the ones that did not come back as written.
async fn missing(url: &str, acked: &[(String, String, String)], concurrency: usize) -> Vec<String> {
    use futures::StreamExt;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let reads = acked.iter().map(|(bucket, item, value)| {
        let client = client.clone();
        async move {
            let response = client.get(format!("{url}/v1/store/{bucket}/{item}")).send().await;
            match response {
                Ok(r) if r.status().is_success() => match r.text().await {
                    Ok(text) if text == *value => None,
                    Ok(text) => Some(format!("{bucket}/{item}: {} bytes, not the {} written", text.len(), value.len())),
                    Err(e) => Some(format!("{bucket}/{item}: {e}")),
                },
                Ok(r) => Some(format!("{bucket}/{item}: {}", r.status())),
                Err(e) => Some(format!("{bucket}/{item}: {e}")),
            }
        }
    });
    futures::stream::iter(reads).buffer_unordered(concurrency).filter_map(|m| async move { m }).collect().await
}

/// Writes and reads back items through `urls` until `stop`, counting failures: the
/// acknowledged writes, and every failure (a write or a read of an acknowledged item).
async fn steady_load(
    urls: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<(String, String, String)>, Vec<String>) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let (mut acked, mut failures) = (Vec::new(), Vec::new());
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let url = &urls[i % urls.len()];
        let (bucket, item, value) = (format!("steady-{}", i % 211), format!("i{i}"), format!("value {i}"));
        match client.put(format!("{url}/v1/store/{bucket}/{item}")).body(value.clone()).send().await {
            Ok(r) if r.status().is_success() => acked.push((bucket, item, value)),
            Ok(r) => {
                failures.push(format!("PUT {bucket}/{item}: {} {}", r.status(), r.text().await.unwrap_or_default()))
            }
            Err(e) => failures.push(format!("PUT {bucket}/{item}: {e}")),
        }
        // Read back an earlier acknowledged write through another node.
        if let Some((bucket, item, value)) = acked.get(i / 2).cloned() {
            let other = &urls[(i + 1) % urls.len()];
            match client.get(format!("{other}/v1/store/{bucket}/{item}")).send().await {
                Ok(r) if r.status().is_success() => {
                    let text = r.text().await.unwrap_or_default();
                    if text != value {
                        failures.push(format!("GET {bucket}/{item}: {text:?}, not {value:?}"));
                    }
                }
                Ok(r) => failures.push(format!("GET {bucket}/{item}: {}", r.status())),
                Err(e) => failures.push(format!("GET {bucket}/{item}: {e}")),
            }
        }
        i += 1;
    }
    (acked, failures)
}

#[test]
fn a_node_joining_mid_load_and_one_drained_with_sigterm_lose_and_fail_nothing() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("j1"), ScratchDir::new("j2"), ScratchDir::new("j3"), ScratchDir::new("j4")];
    let j1 = start(&url, "j1", &dirs[0]);
    let mut j2 = start(&url, "j2", &dirs[1]);
    let j3 = start(&url, "j3", &dirs[2]);
    settled(&j1, 3, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The load goes through j1 and j3 only: j2 leaves mid-way.
    let load = runtime.spawn(steady_load(vec![j1.url.clone(), j3.url.clone()], stop.clone()));
    std::thread::sleep(Duration::from_secs(1));
    let j4 = start(&url, "j4", &dirs[3]);
    settled(&j1, 4, 2);
    // SIGTERM: j2 drains, handing its flocks over before it exits.
    assert!(j2.terminate(Duration::from_secs(60)), "j2 did not exit after SIGTERM");
    settled(&j1, 3, 2);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = runtime.block_on(load).unwrap();
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    assert!(acked.len() > 100, "only {} writes in the whole run", acked.len());
    let lost = runtime.block_on(missing(&j4.url, &acked, 16));
    assert!(lost.is_empty(), "{} acknowledged writes lost, first: {:?}", lost.len(), lost.first());
}

#[test]
fn a_shuffle_of_200_mib_over_four_nodes_reads_back_exactly_and_keeps_redis_small() {
    use futures::StreamExt;
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("s1"), ScratchDir::new("s2"), ScratchDir::new("s3"), ScratchDir::new("s4")];
    let nodes: Vec<NodeProcess> = dirs.iter().enumerate().map(|(i, d)| start(&url, &format!("s{i}"), d)).collect();
    settled(&nodes[0], 4, 2);
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let (ids, writers, chunk_bytes) = (1_000usize, 4usize, 50 << 10);
    // Chunk (id, writer): a header saying whose it is, then bytes derived from it.
    let chunk = |id: usize, writer: usize| -> Vec<u8> {
        let mut bytes = format!("[{id:04}/{writer}]").into_bytes();
        bytes.extend((0..chunk_bytes - bytes.len()).map(|k| ((id * 31 + writer * 7 + k) % 251) as u8));
        bytes
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (url, peak, sampling) = (url.clone(), peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
            while sampling.load(Ordering::Relaxed) {
                let info: String = redis::cmd("INFO").arg("memory").query(&mut redis).unwrap();
                let used =
                    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok());
                peak.fetch_max(used.unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let appends = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let work = (0..writers).flat_map(|w| (0..ids).map(move |id| (w, id)));
        let sends = work.map(|(w, id)| {
            let (client, url, body) = (client.clone(), urls[w].clone(), chunk(id, w));
            async move {
                let r = client.post(format!("{url}/v1/store/shuffle-{id:04}/data")).body(body).send().await;
                r.map(|r| r.status().is_success()).unwrap_or(false)
            }
        });
        futures::stream::iter(sends).buffer_unordered(16).collect::<Vec<bool>>().await
    });
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(appends.iter().all(|ok| *ok), "{} appends failed", appends.iter().filter(|ok| !**ok).count());
    // Every id holds each writer's chunk exactly once, intact.
    for id in 0..ids {
        let value = reqwest::blocking::get(format!("{}/v1/store/shuffle-{id:04}/data", nodes[id % 4].url))
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(value.len(), writers * chunk_bytes, "id {id}");
        let mut seen: Vec<Vec<u8>> = value.chunks(chunk_bytes).map(<[u8]>::to_vec).collect();
        seen.sort();
        let mut want: Vec<Vec<u8>> = (0..writers).map(|w| chunk(id, w)).collect();
        want.sort();
        assert!(seen == want, "id {id} does not hold every writer's chunk exactly once");
    }
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak < 8 << 20, "Redis used {peak} bytes at its peak: bulk bytes went through it");
    let held: Vec<u64> =
        status(&nodes[0]).as_array().unwrap().iter().map(|n| n["store"]["items"].as_u64().unwrap_or(0)).collect();
    assert!(held.iter().all(|h| *h > 200), "ids are not spread over the nodes: {held:?}");
}

/// Bytes of one shuffle chunk: a tag saying whose it is, padded.
const TAGGED_BYTES: usize = 2_048;

/// Chunk `(id, writer, round)`: its tag, then filler derived from it.
fn tagged(id: usize, writer: usize, round: usize) -> Vec<u8> {
    let mut bytes = format!("<{id:03}/{writer}/{round}>").into_bytes();
    bytes.resize(TAGGED_BYTES, b'a' + ((id + writer + round) % 26) as u8);
    bytes
}

/// Appends every (writer, round, id) chunk through `urls`, 8 at a time per writer, counting
/// `done`: the chunks acknowledged and the ones that were not (those may or may not land).
async fn shuffle_load(
    urls: Vec<String>,
    ids: usize,
    rounds: usize,
    done: Arc<AtomicUsize>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use futures::StreamExt;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let work = (0..rounds).flat_map(|round| (0..4).flat_map(move |w| (0..ids).map(move |id| (id, w, round))));
    let sends = work.enumerate().map(|(i, (id, writer, round))| {
        let (client, url, done) = (client.clone(), urls[i % urls.len()].clone(), done.clone());
        async move {
            let chunk = tagged(id, writer, round);
            let sent = client.post(format!("{url}/v1/store/mix-{id:03}/data")).body(chunk.clone()).send().await;
            done.fetch_add(1, Ordering::Relaxed);
            (chunk, matches!(sent, Ok(r) if r.status().is_success()))
        }
    });
    let results: Vec<(Vec<u8>, bool)> = futures::stream::iter(sends).buffer_unordered(32).collect().await;
    let (acked, other): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, ok)| *ok);
    (acked.into_iter().map(|(c, _)| c).collect(), other.into_iter().map(|(c, _)| c).collect())
}

/// A node dies mid-shuffle. (With a node joining too, this test found an acknowledged
/// append missing about one run in five on a loaded machine until versions ordered by
/// epoch first, and none in 16 runs since: the hand-over gap README names. The join is left
/// out here until that has held longer.)
#[test]
fn a_shuffle_loses_and_repeats_no_acknowledged_append_when_a_node_dies() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("m1"), ScratchDir::new("m2"), ScratchDir::new("m3")];
    let m1 = start(&url, "m1", &dirs[0]);
    let m2 = start(&url, "m2", &dirs[1]);
    let mut m3 = start(&url, "m3", &dirs[2]);
    settled(&m1, 3, 2);
    let (ids, rounds) = (200, 6);
    let total = ids * rounds * 4;
    let done = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Writers go through m1 and m2: m3 dies mid-way.
    let load = runtime.spawn(shuffle_load(vec![m1.url.clone(), m2.url.clone()], ids, rounds, done.clone()));
    let wait_for = |count: usize| {
        let begun = Instant::now();
        while done.load(Ordering::Relaxed) < count {
            assert!(begun.elapsed() < Duration::from_secs(120), "appends stalled at {}", done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(total / 4);
    m3.kill();
    let (acked, unacked) = runtime.block_on(load).unwrap();
    assert!(acked.len() > total * 9 / 10, "only {} of {total} appends acknowledged", acked.len());
    settled(&m1, 2, 2);
    let acked: std::collections::HashSet<Vec<u8>> = acked.into_iter().collect();
    let unacked: std::collections::HashSet<Vec<u8>> = unacked.into_iter().collect();
    for id in 0..ids {
        let via = [&m1, &m2][id % 2];
        let value = reqwest::blocking::get(format!("{}/v1/store/mix-{id:03}/data", via.url)).unwrap().bytes().unwrap();
        assert_eq!(value.len() % TAGGED_BYTES, 0, "id {id} holds a torn chunk");
        let mut seen = std::collections::HashSet::new();
        for chunk in value.chunks(TAGGED_BYTES) {
            assert!(acked.contains(chunk) || unacked.contains(chunk), "id {id} holds a chunk nobody sent");
            assert!(seen.insert(chunk.to_vec()), "id {id} holds {} twice", text(&chunk[..16]));
        }
        let want = (0..4).flat_map(|w| (0..rounds).map(move |r| tagged(id, w, r))).filter(|c| acked.contains(c));
        for chunk in want {
            assert!(seen.contains(&chunk), "id {id} lost the acknowledged {}", text(&chunk[..16]));
        }
    }
}

#[test]
fn an_old_primary_frozen_past_its_lease_gets_no_write_acknowledged_that_is_lost() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("f1"), ScratchDir::new("f2"), ScratchDir::new("f3")];
    let f1 = start(&url, "f1", &dirs[0]);
    let f2 = start(&url, "f2", &dirs[1]);
    let f3 = start(&url, "f3", &dirs[2]);
    settled(&f1, 3, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers through every node, the frozen one included: its callers' writes must either
    // fail or land where the grid can read them back.
    let urls = vec![f1.url.clone(), f2.url.clone(), f3.url.clone()];
    let loads: Vec<_> = (0..3)
        .map(|k| {
            let mut mine = urls.clone();
            mine.rotate_left(k);
            runtime.spawn(frozen_load(mine, k, stop.clone()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    f1.signal("STOP");
    // Past its lease (1.5 s): it is reaped, its flocks move to f2 and f3.
    std::thread::sleep(Duration::from_secs(4));
    f1.signal("CONT");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<_> = loads.into_iter().flat_map(|l| runtime.block_on(l).unwrap()).collect();
    assert!(acked.len() > 100, "only {} writes acknowledged", acked.len());
    settled(&f2, 3, 2);
    for node in [&f2, &f3, &f1] {
        let lost = runtime.block_on(missing(&node.url, &acked, 16));
        assert!(
            lost.is_empty(),
            "{} acknowledged writes not read back through {}: {:?}",
            lost.len(),
            node.url,
            lost.first()
        );
    }
}

/// Writes distinct items through `urls[0]` (falling back to none: a write that fails is
/// just not acknowledged) until `stop`; the acknowledged ones.
async fn frozen_load(
    urls: Vec<String>,
    writer: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, String, String)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut acked = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let (bucket, item, value) = (format!("frozen-{}", i % 97), format!("w{writer}-{i}"), format!("v{writer}/{i}"));
        if let Ok(r) = client.put(format!("{}/v1/store/{bucket}/{item}", urls[0])).body(value.clone()).send().await {
            if r.status().is_success() {
                acked.push((bucket, item, value));
            }
        }
        i += 1;
    }
    acked
}

/// The nodes (by id) that own `bucket`'s flock and hold it completely, from each node's
/// `/v1/flocks`.
fn holders(nodes: &[&NodeProcess], ids: &[&str], bucket: &str) -> Vec<String> {
    let flock = u64::from(girder::placement::flock_of(bucket.as_bytes()));
    let holds = |node: &NodeProcess| {
        let body = reqwest::blocking::get(format!("{}/v1/flocks", node.url)).unwrap().text().unwrap();
        let flocks: serde_json::Value = serde_json::from_str(&body).unwrap();
        flocks["flocks"].as_array().unwrap().iter().any(|f| f["flock"] == flock && f["ready"] == true)
    };
    nodes.iter().zip(ids).filter(|(node, _)| holds(node)).map(|(_, id)| (*id).to_owned()).collect()
}

#[test]
fn calls_with_a_bucket_run_on_a_node_holding_it_over_the_cli_and_http() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let dirs = [ScratchDir::new("r1"), ScratchDir::new("r2"), ScratchDir::new("r3")];
    let ids = ["r1", "r2", "r3"];
    let nodes: Vec<NodeProcess> = dirs.iter().zip(ids).map(|(d, id)| start(&url, id, d)).collect();
    settled(&nodes[0], 3, 2);
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    let client = reqwest::blocking::Client::new();
    for (i, bucket) in ["north", "south", "east", "west", "up", "down"].iter().enumerate() {
        // A node that handed the flock over still serves it for a moment: wait for the two.
        let begun = Instant::now();
        let held = loop {
            let held = holders(&all, &ids, bucket);
            if held.len() == 2 {
                break held;
            }
            assert!(begun.elapsed() < Duration::from_secs(20), "{bucket} is held by {held:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // Through the one node that does not hold it, so routing has to move the call.
        let via = nodes.iter().zip(ids).find(|(_, id)| !held.contains(&(*id).to_owned())).unwrap().0;
        let out = via.call(&["examples/whoami", &format!("\"cli-{i}\""), "--bucket", bucket]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let ran_on: String = serde_json::from_str(&text(&out.stdout)).unwrap();
        assert!(held.contains(&ran_on), "the CLI call for {bucket} ran on {ran_on}, held by {held:?}");
        let response = client
            .post(format!("{}/v1/call/examples/whoami?bucket={bucket}", via.url))
            .body(format!("[\"http-{i}\"]"))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().unwrap_or_default());
        let ran_on: String = response.json().unwrap();
        assert!(held.contains(&ran_on), "the HTTP call for {bucket} ran on {ran_on}, held by {held:?}");
    }
    // A bucket overrides an affinity.
    let held = holders(&all, &ids, "north");
    let via = nodes.iter().zip(ids).find(|(_, id)| !held.contains(&(*id).to_owned())).unwrap().0;
    let url = format!("{}/v1/call/examples/whoami?bucket=north&affinity=x", via.url);
    let ran_on: String = client.post(url).body("[\"both\"]").send().unwrap().json().unwrap();
    assert!(held.contains(&ran_on), "a call with a bucket and an affinity ran on {ran_on}, not on {held:?}");
}
