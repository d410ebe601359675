//! `girder bench store`: the bucket store beside its baselines, in one run: puts and gets
//! through a node beside the engine called directly, replicated puts beside single-node
//! puts and a loopback round trip, and the time to copy a farm to a joining node and to
//! restore R after a node's death. Nodes run in this process on one embedded statekeeper,
//! each with its own data directory and data plane on loopback.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use girder::store::engine::DiskEngine;
use girder::store::engine::{Engine, EngineConfig, ItemKey};
use girder::store::{Record, StoreConfig, Version};
use girder::{Embedded, EmbeddedConfig, Node, PoolSpec, Statekeeper, WorkerSpec};
use hdrhistogram::Histogram;

use super::measure::{histogram, record, us};

/// Operations measured per size.
const OPS: [(usize, u64); 2] = [(4 << 10, 2_000), (1 << 20, 200)];
/// Bytes of the farm copied to a joining node and re-replicated after a death.
const FARM_BYTES: usize = 100 << 20;

/// A scratch directory under the system's temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("girder-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn node(sk: &Arc<dyn Statekeeper>, id: &str, dir: &Path) -> anyhow::Result<Node> {
    let config = StoreConfig { data_dir: Some(dir.to_owned()), ..StoreConfig::default() };
    Node::builder()
        .id(id)
        .statekeeper(sk.clone())
        .heartbeat_ms(100)
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .store(config)
        .start()
        .await
        .with_context(|| format!("starting node {id}"))
}

/// Waits until the placement table has exactly `nodes` and they hold every flock
/// `replicas` times, all caught up; how long.
async fn settled(nodes: &[&Node], replicas: u32) -> anyhow::Result<Duration> {
    let begun = Instant::now();
    loop {
        let tables_agree = nodes.iter().all(|n| n.placement().table().nodes.len() == nodes.len());
        if !tables_agree {
            anyhow::ensure!(begun.elapsed() < Duration::from_secs(60), "the table never held the nodes");
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // Every node serves exactly the flocks its table gives it: a joiner copied its share.
        let stats: Vec<_> = nodes.iter().filter_map(|n| n.store().ok().map(|s| s.stats())).collect();
        let table = nodes[0].placement().table();
        let each_ready = nodes
            .iter()
            .zip(&stats)
            .all(|(n, s)| s.flocks_ready as usize == table.flocks_of(n.id()) && s.flocks_syncing == 0);
        let ready: u32 = stats.iter().map(|s| s.flocks_ready).sum();
        if each_ready && ready == replicas.min(nodes.len() as u32) * girder::placement::FLOCKS {
            return Ok(begun.elapsed());
        }
        anyhow::ensure!(begun.elapsed() < Duration::from_secs(300), "the store never settled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn line(what: &str, hist: &Histogram<u64>, base: Option<&Histogram<u64>>) {
    let ratio = base.map_or(String::new(), |b| {
        format!("  {:.2}x baseline", hist.value_at_quantile(0.5) as f64 / b.value_at_quantile(0.5).max(1) as f64)
    });
    println!(
        "  {what:<44} p50 {:>9.1} µs  p99 {:>9.1} µs{ratio}",
        us(hist.value_at_quantile(0.5)),
        us(hist.value_at_quantile(0.99))
    );
}

/// The engine called directly: puts and gets of `size` bytes.
fn engine_direct(dir: &Path, size: usize, ops: u64) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let engine = DiskEngine::open(dir, EngineConfig::default())?;
    let value = Bytes::from(vec![7u8; size]);
    let (mut put, mut get) = (histogram()?, histogram()?);
    for i in 0..ops {
        let key = ItemKey { flock: (i % 1_024) as u32, bucket: format!("b{i}"), item: "x".into() };
        let rec =
            Record { version: Version { seq: 1, epoch: 1 }, tombstone: false, written_ms: 0, value: value.clone() };
        let begun = Instant::now();
        engine.write(&[(key.clone(), rec)])?;
        record(&mut put, begun.elapsed());
        let begun = Instant::now();
        anyhow::ensure!(engine.get(&key)?.is_some(), "the engine lost a record");
        record(&mut get, begun.elapsed());
    }
    Ok((put, get))
}

/// Puts and gets of `size` bytes through `node`'s store.
async fn through(node: &Node, tag: &str, size: usize, ops: u64) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let store = node.store()?;
    let value = Bytes::from(vec![7u8; size]);
    let (mut put, mut get) = (histogram()?, histogram()?);
    for i in 0..ops {
        let bucket = format!("{tag}-{i}");
        let begun = Instant::now();
        store.put(&bucket, "x", value.clone()).await?;
        record(&mut put, begun.elapsed());
        let begun = Instant::now();
        anyhow::ensure!(store.get(&bucket, "x").await?.is_some(), "the store lost an item");
        record(&mut get, begun.elapsed());
    }
    Ok((put, get))
}

/// Round trips of a 64-byte message over a loopback TCP connection.
async fn loopback_rtt(count: u64) -> anyhow::Result<Histogram<u64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let echo = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else { return };
        let mut buf = [0u8; 64];
        while socket.read_exact(&mut buf).await.is_ok() {
            if socket.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut socket = tokio::net::TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
    let mut hist = histogram()?;
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let begun = Instant::now();
        socket.write_all(&buf).await?;
        socket.read_exact(&mut buf).await?;
        record(&mut hist, begun.elapsed());
    }
    drop(socket);
    echo.abort();
    Ok(hist)
}

/// Runs the store benchmarks.
pub(crate) async fn run() -> anyhow::Result<()> {
    let scratch = Scratch::new("store")?;
    let sk: Arc<dyn Statekeeper> = Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 2_000, ..Default::default() }));
    println!("bucket store (fsync on every write, in-process nodes, loopback data plane)");
    let rtt = loopback_rtt(2_000).await?;
    line("loopback TCP round trip (64 B)", &rtt, None);
    let one = node(&sk, "solo", &scratch.path("solo")).await?;
    settled(&[&one], 2).await?;
    let mut single_puts = Vec::new();
    for (size, ops) in OPS {
        let label = if size >= 1 << 20 { "1 MiB" } else { "4 KiB" };
        let dir = scratch.path(&format!("engine-{size}"));
        let (engine_put, engine_get) = engine_direct(&dir, size, ops)?;
        let (put, get) = through(&one, &format!("solo{size}"), size, ops).await?;
        line(&format!("engine put {label} (baseline)"), &engine_put, None);
        line(&format!("one node put {label}"), &put, Some(&engine_put));
        line(&format!("engine get {label} (baseline)"), &engine_get, None);
        line(&format!("one node get {label}"), &get, Some(&engine_get));
        single_puts.push((label, put));
    }
    one.shutdown().await;

    // Replicated: two nodes, R = 2, W = 2, written through the first.
    let sk: Arc<dyn Statekeeper> = Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 2_000, ..Default::default() }));
    let a = node(&sk, "a", &scratch.path("a")).await?;
    let b = node(&sk, "b", &scratch.path("b")).await?;
    settled(&[&a, &b], 2).await?;
    for ((size, ops), (label, single)) in OPS.into_iter().zip(&single_puts) {
        let (put, _) = through(&a, &format!("rep{size}"), size, ops).await?;
        line(&format!("replicated put {label} (R=2, W=2)"), &put, Some(single));
        let target = 2.0 * single.value_at_quantile(0.5) as f64 + rtt.value_at_quantile(0.5) as f64;
        println!("    target: p50 within 2x single-node + one round trip = {:.1} µs", target / 1_000.0);
    }
    near_staleness(&a, &b).await?;
    farm_moves(&sk, &scratch, a, b).await
}

/// How long after a write through one node another node's near cache (typed reads of
/// decoded values) serves the new value, polled every 100 µs; then a near hit.
async fn near_staleness(a: &Node, b: &Node) -> anyhow::Result<()> {
    const ROUNDS: u64 = 200;
    let (writer, reader) = (a.store()?.typed::<u64>(), b.store()?.typed::<u64>());
    let (mut stale, mut hit) = (histogram()?, histogram()?);
    for round in 0..ROUNDS {
        writer.put("near", "n", &round).await?;
        let written = Instant::now();
        loop {
            let seen = reader.get("near", "n").await?.map(|(v, _)| *v);
            if seen == Some(round) {
                break;
            }
            anyhow::ensure!(written.elapsed() < girder::store::NEAR_AGE_MAX * 2, "b never saw round {round}");
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        record(&mut stale, written.elapsed());
    }
    for _ in 0..10_000 {
        let begun = Instant::now();
        reader.get("near", "n").await?;
        record(&mut hit, begun.elapsed());
    }
    line("near cache: typed read, a hit", &hit, None);
    line("near cache: another node serves a new value", &stale, None);
    println!(
        "    bound: {} ms (a lost notice); never older than the reader's own write",
        girder::store::NEAR_AGE_MAX.as_millis()
    );
    Ok(())
}

/// Fills a two-node grid with [`FARM_BYTES`], then times a third node's join until every
/// flock is caught up, and the re-replication after a node leaves without handing over.
async fn farm_moves(sk: &Arc<dyn Statekeeper>, scratch: &Scratch, a: Node, b: Node) -> anyhow::Result<()> {
    let store = a.store()?;
    let value = Bytes::from(vec![3u8; 1 << 20]);
    for i in 0..FARM_BYTES >> 20 {
        store.put(&format!("farm-{i}"), "x", value.clone()).await?;
    }
    // The farm holds what the latency runs wrote too; what counts is what moves.
    let farm_mib = a.store()?.stats().bytes as f64 / (1 << 20) as f64;
    let c = node(sk, "c", &scratch.path("c")).await?;
    let took = settled(&[&a, &b, &c], 2).await?;
    let copied = c.store()?.stats();
    let copied_mib = copied.bytes as f64 / (1 << 20) as f64;
    println!(
        "  a third node joins ({farm_mib:.0} MiB per node, R = 2): {} flocks, {} items, {copied_mib:.0} MiB copied to it in {:.2} s ({:.0} MiB/s)",
        copied.flocks_ready,
        copied.copied,
        took.as_secs_f64(),
        copied_mib / took.as_secs_f64()
    );
    // b stops without handing over (its lease is given up at once): restore R. A node
    // that dies unannounced adds its lease (the node TTL) before the table changes.
    let held = |nodes: [&Node; 2]| -> anyhow::Result<u64> {
        Ok(nodes[0].store()?.stats().bytes + nodes[1].store()?.stats().bytes)
    };
    let before = held([&a, &c])?;
    b.shutdown().await;
    let took = settled(&[&a, &c], 2).await?;
    let copied_mib = held([&a, &c])?.saturating_sub(before) as f64 / (1 << 20) as f64;
    println!(
        "  a node leaves without handing over: R = 2 restored in {:.2} s ({copied_mib:.0} MiB copied)",
        took.as_secs_f64()
    );
    a.shutdown().await;
    c.shutdown().await;
    Ok(())
}
