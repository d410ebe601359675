//! `girder bench --workflows [--redis URL|auto]`: workflow step latency (a message sent
//! until its step is committed) and throughput over 1,000 instances, on the embedded
//! statekeeper or on Redis, beside a bare reliable-topic publish and read of the same grid
//! in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use girder::structures::Retention;
use girder::testing::RedisServer;
use girder::workflow::{self, WorkflowRuntime, Workflows};
use girder::{Embedded, EmbeddedConfig, Node, PoolSpec, RedisConfig, RedisStatekeeper, Statekeeper, WorkerSpec};

use super::measure::{histogram, record, us};

/// Instances the messages are spread over.
const INSTANCES: u64 = 1_000;
/// Messages timed one at a time.
const TIMED: u64 = 2_000;
/// Sends in flight at once for throughput.
const SENDERS: usize = 64;
/// Messages sent at once for throughput.
const BATCH: u64 = 20_000;

/// Runs the workflow benchmarks, on Redis at `redis` (`auto`: a server of its own) or
/// embedded.
pub(crate) async fn run(redis: Option<&str>) -> anyhow::Result<()> {
    let server = if redis == Some("auto") { Some(RedisServer::start(false)?) } else { None };
    let sk: Arc<dyn Statekeeper> = match redis {
        None => Arc::new(Embedded::new(EmbeddedConfig::default())),
        Some(url) => {
            let url = server.as_ref().map_or_else(|| url.to_owned(), RedisServer::url);
            let mut config = RedisConfig::new(&url);
            config.namespace = format!("bench-wf-{}", std::process::id());
            Arc::new(RedisStatekeeper::connect(config).await?)
        }
    };
    let grid = if redis.is_some() { "Redis" } else { "the embedded statekeeper" };
    let node = Node::builder()
        .id("bench")
        .statekeeper(sk.clone())
        .heartbeat_ms(100)
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 2))
        .start()
        .await?;
    let runtime = WorkflowRuntime::start(&node, Workflows::new().with_examples());
    let store = sk.structures();
    println!("workflows on {grid} ({INSTANCES} examples/counter instances, one node)");
    let mut bare = histogram()?;
    for i in 0..TIMED {
        let begun = Instant::now();
        let seq = store.reliable_publish("bench/topic", &i.to_le_bytes(), Retention::default()).await?;
        let read = store.reliable_read("bench/topic", seq - 1, 1, 1_000).await?;
        anyhow::ensure!(read.messages.len() == 1, "the bare topic lost a message");
        record(&mut bare, begun.elapsed());
    }
    // Every instance takes its first message (its claim) before the timed ones.
    for i in 0..INSTANCES {
        workflow::send(&store, "examples/counter", &format!("b{i}"), &i).await?;
    }
    settle(&store, INSTANCES, 1).await?;
    let mut step = histogram()?;
    for i in 0..TIMED {
        let id = format!("b{}", i % INSTANCES);
        let before = handled(&store, &id).await?;
        let begun = Instant::now();
        workflow::send(&store, "examples/counter", &id, &i).await?;
        while handled(&store, &id).await? == before {
            anyhow::ensure!(begun.elapsed() < Duration::from_secs(10), "{id} never took its message");
            tokio::task::yield_now().await;
        }
        record(&mut step, begun.elapsed());
    }
    let line = |what: &str, h: &hdrhistogram::Histogram<u64>, base: Option<f64>| {
        let ratio = base.map_or(String::new(), |b| format!("  {:.1}x baseline", us(h.value_at_quantile(0.5)) / b));
        println!(
            "  {what:<46} p50 {:>8.1} µs  p99 {:>8.1} µs{ratio}",
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99))
        );
    };
    line("reliable topic publish + read (baseline)", &bare, None);
    line("step: send until committed", &step, Some(us(bare.value_at_quantile(0.5))));
    println!("    target: p50 <= 50 µs embedded, <= 2 ms on Redis");
    // Producers send with up to SENDERS messages in flight, as many clients would.
    let begun = Instant::now();
    let sends = futures::stream::iter(0..BATCH).map(|i| {
        let store = store.clone();
        async move { workflow::send(&store, "examples/counter", &format!("b{}", i % INSTANCES), &i).await }
    });
    let sent: Vec<_> = sends.buffer_unordered(SENDERS).collect().await;
    sent.into_iter().collect::<Result<Vec<_>, _>>()?;
    let sending = begun.elapsed();
    settle(&store, INSTANCES, 1 + (TIMED + BATCH) / INSTANCES).await?;
    let rate = BATCH as f64 / begun.elapsed().as_secs_f64();
    println!(
        "  {:<46} {rate:>10.0} messages/s over {INSTANCES} instances (sending took {} ms, {SENDERS} in flight)",
        "throughput: 20,000 sent at once until committed",
        sending.as_millis()
    );
    println!("    target: >= 10,000 messages/s on Redis");
    runtime.shutdown();
    node.shutdown().await;
    drop(server);
    Ok(())
}

async fn handled(store: &girder::structures::Store, id: &str) -> anyhow::Result<u64> {
    Ok(workflow::instance(store, "examples/counter", id).await?.map_or(0, |i| i.handled))
}

/// Waits until every instance handled `each` messages (at most 120 s).
async fn settle(store: &girder::structures::Store, instances: u64, each: u64) -> anyhow::Result<()> {
    let begun = Instant::now();
    for i in 0..instances {
        let id = format!("b{i}");
        while handled(store, &id).await? < each {
            anyhow::ensure!(begun.elapsed() < Duration::from_secs(120), "{id} is behind");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(())
}
