//! `girder bench --redis`: the grid over Redis with workers and client in different
//! processes, beside a bare Redis `PING` round trip measured in the same run as the floor.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use girder::examples::tree;
use girder::testing::RedisServer;
use girder::{Node, PoolSpec, RedisConfig, RedisStatekeeper, Registry};

use super::measure::{histogram, median, record, round_trips, throughput, us, Fresh};
use super::BenchArgs;

/// Slots of the worker process in the round-trip and throughput tests: no-ops are bound by
/// round trips, so more slots keep more of them in flight.
const WORKER_SLOTS: u64 = 8;

/// A `girder node` worker process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(url: &str, namespace: &str, id: &str, slots: u64) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("cannot find the girder binary")?;
    let mut child = Command::new(exe)
        .args(["node", "--listen", "127.0.0.1:0", "--statekeeper", url, "--namespace", namespace, "--id", id])
        .args(["--pool", "bench", "--workers", "1", "--slots", &slots.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start a worker process")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).context("worker did not start")?;
    if !line.contains("listening") {
        bail!("worker {id} did not start: {line:?}");
    }
    Ok(Worker(child))
}

async fn client_node(url: &str, namespace: &str) -> anyhow::Result<(Node, Arc<RedisStatekeeper>)> {
    let mut config = RedisConfig::new(url);
    config.namespace = namespace.to_owned();
    let statekeeper = Arc::new(RedisStatekeeper::connect(config).await?);
    let node = Node::builder()
        .id("bench-client")
        .statekeeper(statekeeper.clone())
        .registry(Registry::new())
        .pool(PoolSpec::new("bench").helper(false))
        .start()
        .await
        .context("cannot start the client node")?;
    Ok((node, statekeeper))
}

/// A node on Redis that serves the examples itself, with room for a 13-request tree.
async fn cancel_node(url: &str, namespace: &str) -> anyhow::Result<Node> {
    let mut config = RedisConfig::new(url);
    config.namespace = namespace.to_owned();
    let statekeeper = Arc::new(RedisStatekeeper::connect(config).await?);
    Node::builder()
        .id("bench-cancel")
        .statekeeper(statekeeper)
        .registry(Registry::with_examples())
        .pool(PoolSpec::new("bench"))
        .workers(girder::WorkerSpec::new("bench", 1, 16))
        .start()
        .await
        .context("cannot start the cancellation node")
}

pub(super) async fn run(redis: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let server = if redis == "auto" { Some(RedisServer::start(false)?) } else { None };
    let url = server.as_ref().map_or_else(|| redis.to_owned(), RedisServer::url);
    let run_id = std::process::id();
    let namespace = format!("bench-{run_id}");
    let shown = girder::redacted(&url);
    outln!("girder bench over Redis at {shown}: client in this process, 1 worker process x {WORKER_SLOTS} slots");

    let (node, statekeeper) = client_node(&url, &namespace).await?;
    let mut ping = histogram()?;
    for _ in 0..args.round_trips {
        let begun = Instant::now();
        statekeeper.ping().await?;
        record(&mut ping, begun.elapsed());
    }
    let floor = ping.value_at_quantile(0.5) as f64;
    outln!(
        "\n{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs",
        "floor: bare Redis PING",
        us(ping.value_at_quantile(0.5)),
        us(ping.value_at_quantile(0.99))
    );

    let _worker = spawn_worker(&url, &namespace, "bench-worker", WORKER_SLOTS)?;
    let client = node.client();
    let mut fresh = Fresh::default();
    // The warm-up loads the scripts and brings the connections up.
    let trip = round_trips(&client, &mut fresh, 500, args.round_trips).await?;
    let p50 = trip.value_at_quantile(0.5);
    outln!(
        "{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs   {:>5.1}x PING   target p50 <= 250 µs",
        "round trip, no-op, one at a time",
        us(p50),
        us(trip.value_at_quantile(0.99)),
        p50 as f64 / floor
    );

    let rates = throughput(&client, &mut fresh, args.batch, args.rounds).await?;
    let rate = median(rates.clone());
    outln!(
        "{:<40} {:>10.0} req/s (best {:.0})   {:.1} µs/req = {:.2}x PING   target >= 20,000 req/s",
        format!("throughput, {} no-ops at once", args.batch),
        rate,
        rates.iter().cloned().fold(0.0, f64::max),
        1e6 / rate,
        (1e9 / rate) / floor
    );
    super::embedded::map_line(&client, &mut fresh, args, rate, |per_req_ns| per_req_ns / floor, "PING").await?;
    node.shutdown().await;
    let cancelling = cancel_node(&url, &format!("bench-{run_id}-cancel")).await?;
    super::embedded::cancel_line(&cancelling, args.rounds.max(20), floor, "PING").await?;
    cancelling.shutdown().await;

    let mut times = Vec::new();
    for round in 0..args.rounds {
        // A namespace per round: a fresh grid, nothing memoized from the round before.
        let namespace = format!("bench-{run_id}-tree-{round}");
        let _a = spawn_worker(&url, &namespace, "tree-a", 1)?;
        let _b = spawn_worker(&url, &namespace, "tree-b", 1)?;
        let (node, _) = client_node(&url, &namespace).await?;
        let begun = Instant::now();
        let count = tree::call(&node.client(), 6, 3, 0).await?;
        times.push(begun.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(count == 1093, "tree(6,3,0) returned {count}, expected 1093");
        node.shutdown().await;
    }
    let ms = median(times.clone());
    outln!(
        "{:<40} {:>8.2} ms (best {:.2})   {:.1} µs/request = {:.1}x PING   target <= 500 ms",
        "tree(6,3,0), 2 nodes x 1 slot",
        ms,
        times.iter().cloned().fold(f64::MAX, f64::min),
        ms * 1e3 / 1093.0,
        (ms * 1e6 / 1093.0) / floor
    );
    outln!();
    structures(&url, &namespace, args.round_trips, floor).await?;
    outln!("\nfor comparison (issue figures on this machine size): Ray 2.60 1.4 ms round trip, 2,060 tasks/s, tree(6,3) 4.7 s");
    Ok(())
}

/// Cache and atom figures: girder's cache against bare Redis GET/SET, the near cache, and
/// atom swaps contended from two processes.
pub(crate) async fn structures(url: &str, namespace: &str, round_trips: u64, floor: f64) -> anyhow::Result<()> {
    use girder::structures::{Cache, CacheConfig};
    let client = redis::Client::open(url).context("bare Redis client")?;
    let mut bare = client.get_multiplexed_async_connection().await.context("bare Redis connection")?;
    let value = vec![7u8; 100];
    let (mut bare_set, mut bare_get) = (histogram()?, histogram()?);
    // Sets first, then gets: each figure on its own, with no other traffic in between.
    for i in 0..round_trips {
        let key = format!("bench:bare:{namespace}:{i}");
        let begun = Instant::now();
        let _: () = redis::cmd("SET").arg(&key).arg(&value).query_async(&mut bare).await?;
        record(&mut bare_set, begun.elapsed());
    }
    for i in 0..round_trips {
        let key = format!("bench:bare:{namespace}:{i}");
        let begun = Instant::now();
        let _: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut bare).await?;
        record(&mut bare_get, begun.elapsed());
    }
    let mut config = RedisConfig::new(url);
    config.namespace = format!("{namespace}-cache");
    let statekeeper = RedisStatekeeper::connect(config).await?;
    let cache = Cache::new(girder::Statekeeper::structures(&statekeeper), CacheConfig::default());
    let (mut set, mut get) = (histogram()?, histogram()?);
    for i in 0..round_trips {
        let begun = Instant::now();
        cache.set_bytes(&format!("k{i}"), &value, None).await?;
        record(&mut set, begun.elapsed());
    }
    for i in 0..round_trips {
        let key = format!("k{i}");
        let begun = Instant::now();
        cache.get_bytes(&key).await?;
        record(&mut get, begun.elapsed());
    }
    // Repeated reads of one key: served by the near cache once the first read filled it.
    let mut near = histogram()?;
    cache.get_bytes("k0").await?;
    for _ in 0..round_trips * 10 {
        let begun = Instant::now();
        std::hint::black_box(cache.get_bytes("k0").await?);
        record(&mut near, begun.elapsed());
    }
    for (label, ours, theirs, target) in [
        ("cache set, 100 B", &set, &bare_set, "1.3x bare"),
        ("cache get, 100 B (not near-cached)", &get, &bare_get, "1.3x bare"),
    ] {
        let (a, b) = (ours.value_at_quantile(0.5), theirs.value_at_quantile(0.5));
        outln!(
            "{label:<40} p50 {:>8.2} µs   bare Redis {:>8.2} µs   {:.2}x bare   target <= {target}",
            us(a),
            us(b),
            a as f64 / b as f64
        );
    }
    outln!(
        "{:<40} p50 {:>8.3} µs   p99 {:>8.3} µs   {:.4}x PING   target <= 1 µs",
        "near-cache hit",
        us(near.value_at_quantile(0.5)),
        us(near.value_at_quantile(0.99)),
        near.value_at_quantile(0.5) as f64 / floor
    );

    let exe = std::env::current_exe().context("cannot find the girder binary")?;
    let swaps_each = 2_000u64;
    let begun = Instant::now();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["ds", "atom-add", "bench-atom", "--times", &swaps_each.to_string(), "--concurrency", "16"])
                .args(["--statekeeper", url, "--namespace", namespace])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .context("cannot start the swapping processes")?;
    for mut child in children {
        anyhow::ensure!(child.wait()?.success(), "a swapping process failed");
    }
    let rate = (2 * swaps_each) as f64 / begun.elapsed().as_secs_f64();
    outln!(
        "{:<40} {:>10.0} swaps/s (2 processes x 16 concurrent swappers on one atom)",
        "atom swap under contention",
        rate
    );
    Ok(())
}
