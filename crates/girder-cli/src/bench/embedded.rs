//! `girder bench` on the embedded statekeeper: the grid's speed on the embedded statekeeper, each figure beside a
//! baseline measured in the same run (a bare tokio spawn-and-join round trip) and the
//! issue's target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use girder::examples::{chain, chain_blocking, echo, tree, tree_blocking};
use girder::{Node, PoolSpec, Registry, WorkerSpec};

use super::measure::{histogram, median, record, round_trips, throughput, us, Fresh};
use super::BenchArgs;

async fn node(registry: &Registry, workers: u64, slots: u64) -> anyhow::Result<Node> {
    Node::builder()
        .registry(registry.clone())
        .pool(PoolSpec::new("bench"))
        .workers(WorkerSpec::new("bench", workers as usize, slots as usize))
        // The deep chains go past the default budget of a million requests.
        .call_limits(girder::CallLimits { requests_max: u64::MAX, depth_max: u32::MAX })
        .start()
        .await
        .context("cannot start the benchmark node")
}

/// The embedded benchmarks.
pub(super) async fn run(registry: Registry, args: BenchArgs) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    outln!(
        "girder bench: embedded statekeeper, {} worker(s) x {} slot(s), {cpus} CPUs, {} rounds",
        args.workers,
        args.slots,
        args.rounds
    );

    // Baseline: the cheapest cross-task round trip tokio offers.
    let mut base = histogram()?;
    for i in 0..args.round_trips {
        let begun = Instant::now();
        let value = tokio::spawn(async move { i }).await.context("baseline task")?;
        record(&mut base, begun.elapsed());
        std::hint::black_box(value);
    }
    let base_p50 = base.value_at_quantile(0.5) as f64;
    outln!(
        "\n{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs",
        "baseline: tokio spawn + join",
        us(base.value_at_quantile(0.5)),
        us(base.value_at_quantile(0.99))
    );

    let grid = node(&registry, args.workers, args.slots).await?;
    let client = grid.client();
    let mut fresh = Fresh::default();
    let trip = round_trips(&client, &mut fresh, 1_000, args.round_trips).await?;
    let trip_p50 = trip.value_at_quantile(0.5);
    outln!(
        "{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs   {:>6.1}x baseline   target p50 <= 20 µs",
        "round trip, no-op, one at a time",
        us(trip_p50),
        us(trip.value_at_quantile(0.99)),
        trip_p50 as f64 / base_p50
    );

    let rates = throughput(&client, &mut fresh, args.batch, args.rounds).await?;
    let rate = median(rates.clone());
    outln!(
        "{:<40} {:>10.0} req/s (best {:.0})   {:>6.2} µs/req = {:.2}x baseline   target >= 200,000 req/s",
        format!("throughput, {} no-ops at once", args.batch),
        rate,
        rates.iter().cloned().fold(0.0, f64::max),
        1e6 / rate,
        (1e9 / rate) / base_p50
    );

    map_line(&client, &mut fresh, &args, rate, |per_req_ns| per_req_ns / base_p50, "baseline").await?;

    let hit = rmpv::Value::from(u64::MAX);
    echo::call(&client, hit.clone()).await?;
    let mut memo = histogram()?;
    let hits = args.round_trips * 10;
    let begun_all = Instant::now();
    for _ in 0..hits {
        let begun = Instant::now();
        echo::call(&client, hit.clone()).await?;
        record(&mut memo, begun.elapsed());
    }
    let memo_mean = begun_all.elapsed().as_nanos() as f64 / hits as f64;
    outln!(
        "{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs   mean {:.2} µs   {:.2}x baseline   target <= 2 µs",
        "memo hit",
        us(memo.value_at_quantile(0.5)),
        us(memo.value_at_quantile(0.99)),
        memo_mean / 1e3,
        memo.value_at_quantile(0.5) as f64 / base_p50
    );
    grid.shutdown().await;
    let grid = node(&registry, 1, 16).await?;
    cancel_line(&grid, args.rounds.max(20), base_p50, "baseline").await?;
    grid.shutdown().await;

    for (label, blocking) in
        [("tree(6,3,0), 1 worker x 2 slots", false), ("tree_blocking(6,3,0), 1 worker x 2 slots", true)]
    {
        let mut times = Vec::new();
        for _ in 0..args.rounds {
            // A fresh grid each round: nothing memoized from the round before.
            let grid = node(&registry, 1, 2).await?;
            let client = grid.client();
            let begun = Instant::now();
            let count = if blocking {
                tree_blocking::call(&client, 6, 3, 0).await?
            } else {
                tree::call(&client, 6, 3, 0).await?
            };
            times.push(begun.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(count == 1093, "tree(6,3,0) returned {count}, expected 1093");
            grid.shutdown().await;
        }
        let ms = median(times.clone());
        outln!(
            "{:<40} {:>8.2} ms (best {:.2})   {:.2} µs/request = {:.1}x baseline   target <= 50 ms",
            label,
            ms,
            times.iter().cloned().fold(f64::MAX, f64::min),
            ms * 1e3 / 1093.0,
            (ms * 1e6 / 1093.0) / base_p50
        );
    }
    depth(&registry, trip_p50 as f64).await?;
    placement(&registry).await?;
    outln!("\nfor comparison (issue figures on this machine size): Ray 2.60 1.4 ms round trip, 2,060 tasks/s, tree(6,3) 4.7 s; Dask 10.6 ms, 635 tasks/s");
    Ok(())
}

/// Prints `client.map`'s throughput over `args.batch` no-ops with 64 in flight, beside the
/// "all at once" figure `at_once` (req/s) of the same run; `ratio` turns ns per request
/// into a multiple of the run's floor, called `floor`.
pub(super) async fn map_line(
    client: &girder::Client,
    fresh: &mut super::measure::Fresh,
    args: &BenchArgs,
    at_once: f64,
    ratio: impl Fn(f64) -> f64,
    floor: &str,
) -> anyhow::Result<()> {
    let rates = super::measure::map_throughput(client, fresh, args.batch, args.rounds, 64).await?;
    let rate = median(rates.clone());
    outln!(
        "{:<40} {:>10.0} req/s (best {:.0})   {:.2} µs/req = {:.2}x {floor}   {:.2}x all at once",
        format!("map, {} no-ops, 64 in flight", args.batch),
        rate,
        rates.iter().cloned().fold(0.0, f64::max),
        1e6 / rate,
        ratio(1e9 / rate),
        rate / at_once
    );
    Ok(())
}

/// Prints how long cancelling a 13-request tree takes on `grid`: until the caller is
/// answered and until every evaluation stopped, beside `floor_ns` (the run's floor, named
/// `floor`).
pub(super) async fn cancel_line(grid: &Node, rounds: u64, floor_ns: f64, floor: &str) -> anyhow::Result<()> {
    let (answered, stopped) = super::measure::cancel_latency(grid, rounds).await?;
    for (label, hist) in [("cancel: caller answered", &answered), ("cancel: 13-request tree stopped", &stopped)] {
        outln!(
            "{:<40} p50 {:>8.2} µs   p99 {:>8.2} µs   {:.1}x {floor}   ({rounds} rounds)",
            label,
            us(hist.value_at_quantile(0.5)),
            us(hist.value_at_quantile(0.99)),
            hist.value_at_quantile(0.5) as f64 / floor_ns
        );
    }
    Ok(())
}

/// The figures of `/proc/self/status` the depth section reports (KiB for memory).
#[derive(Clone, Copy, Default)]
struct ProcStatus {
    /// `Threads:`, the process's thread count.
    threads: u64,
    /// `VmRSS:`, resident memory now.
    rss_kib: u64,
    /// `VmHWM:`, the most resident memory since start (or since the last reset).
    hwm_kib: u64,
}

/// This process's thread count and resident memory now; `None` where there is no procfs.
fn proc_status() -> Option<ProcStatus> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field =
        |name: &str| text.lines().find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse().ok());
    Some(ProcStatus { threads: field("Threads:")?, rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
}

/// Samples [`proc_status`] from a thread of its own every millisecond, keeping the peaks.
struct PeakSampler {
    /// Set to end the sampling.
    stop: Arc<AtomicBool>,
    /// The sampling thread; returns the peak threads and resident memory it saw.
    thread: std::thread::JoinHandle<ProcStatus>,
}

impl PeakSampler {
    /// Starts sampling.
    fn start() -> anyhow::Result<PeakSampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let mut peak = ProcStatus::default();
                while !stopped.load(Ordering::Relaxed) {
                    if let Some(now) = proc_status() {
                        peak.threads = peak.threads.max(now.threads);
                        peak.rss_kib = peak.rss_kib.max(now.rss_kib);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                peak
            })
            .context("cannot start the sampler thread")?;
        Ok(PeakSampler { stop, thread })
    }

    /// Stops sampling; returns the peaks seen.
    fn finish(self) -> ProcStatus {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// KiB as MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Deep chains of nested requests on one slot, each on a fresh node and run once:
/// `chain_blocking(100,000)` (fibers) and `chain(1,000,000)` (parked tasks). Reports the
/// wall time, the cost per level beside the no-op round trip (`trip_p50_ns`), and the
/// process's threads and resident memory before and at their peak.
async fn depth(registry: &Registry, trip_p50_ns: f64) -> anyhow::Result<()> {
    outln!(
        "\n{:<40} per level vs. the no-op round trip p50; this process's threads and RSS: before -> peak",
        "deep chains (1 worker x 1 slot, once)"
    );
    for (blocking, n) in [(true, 100_000u64), (false, 1_000_000)] {
        let label = if blocking { format!("chain_blocking({n})") } else { format!("chain({n})") };
        let grid = node(registry, 1, 1).await?;
        let client = grid.client();
        // Resets VmHWM to the RSS now (Linux >= 4.0), so it is this run's peak; best effort.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        // The sampler's own thread is counted in both `before` and the peak.
        let sampler = PeakSampler::start()?;
        let before = proc_status().unwrap_or_default();
        let begun = Instant::now();
        let result = if blocking { chain_blocking::call(&client, n).await } else { chain::call(&client, n).await };
        let took = begun.elapsed();
        let peak = sampler.finish();
        let hwm = proc_status().unwrap_or_default().hwm_kib;
        let fiber_threads = grid.stats().await.workers.first().map_or(0, |w| w.fiber_threads);
        grid.shutdown().await;
        let value = result.with_context(|| format!("{label} failed"))?;
        anyhow::ensure!(value == n, "{label} returned {value}, expected {n}");
        let level_ns = took.as_nanos() as f64 / n as f64;
        outln!(
            concat!(
                "{:<40} {:>8.2} ms   {:.2} µs/level = {:.1}x round trip   threads {} -> {} (fiber threads {})   ",
                "RSS {:.0} -> {:.0} MiB (VmHWM {:.0}, {:.1} KiB/level)"
            ),
            label,
            took.as_secs_f64() * 1e3,
            level_ns / 1e3,
            level_ns / trip_p50_ns,
            before.threads,
            peak.threads,
            fiber_threads,
            mib(before.rss_kib),
            mib(peak.rss_kib),
            mib(hwm),
            hwm.max(peak.rss_kib).saturating_sub(before.rss_kib) as f64 / n as f64
        );
    }
    Ok(())
}

/// `node_id` from a node's cached table, against hashing the key alone; and what a table
/// change costs as the grid grows.
async fn placement(registry: &Registry) -> anyhow::Result<()> {
    use girder::placement::{flock_of, FlockTable, Placement, Strategy, FLOCKS};
    let statekeeper: Arc<dyn girder::Statekeeper> = Arc::new(girder::Embedded::default());
    let mut nodes = Vec::new();
    for i in 0..4 {
        let node = Node::builder()
            .id(format!("p{i}"))
            .statekeeper(statekeeper.clone())
            .registry(registry.clone())
            .pool(PoolSpec::new("bench"))
            .workers(WorkerSpec::new("bench", 1, 1))
            .start()
            .await
            .context("cannot start a placement node")?;
        nodes.push(node);
    }
    let placement = Placement::new(statekeeper.clone(), None);
    let begun = Instant::now();
    while placement.table().nodes.len() < 4 {
        anyhow::ensure!(begun.elapsed() < Duration::from_secs(10), "the nodes never reported");
        placement.refresh(statekeeper.node_ttl_ms()).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Vec<String> = (0..100_000).map(|i| format!("bucket-{i}")).collect();
    let begun = Instant::now();
    for key in &keys {
        std::hint::black_box(flock_of(key.as_bytes()));
    }
    let hash_ns = begun.elapsed().as_nanos() as f64 / keys.len() as f64;
    let begun = Instant::now();
    for key in &keys {
        std::hint::black_box(placement.node_id_cached(key));
    }
    let node_id_ns = begun.elapsed().as_nanos() as f64 / keys.len() as f64;
    outln!(
        "\n{:<40} {:>8.3} µs   hashing the key alone {:.3} µs ({:.1}x)   target <= 1 µs",
        "node_id from the cached table, 4 nodes",
        node_id_ns / 1e3,
        hash_ns / 1e3,
        node_id_ns / hash_ns
    );
    for node in &nodes {
        node.shutdown().await;
    }
    outln!(
        "{:<40} {:>12} {:>12} {:>16}",
        "table change (2 replicas, 1,024 flocks)",
        "compute",
        "moved on +1",
        "ideal (share)"
    );
    for n in [4usize, 8, 16, 32, 64] {
        let weights = |count: usize| (0..count).map(|i| (format!("sim-{i}"), 1.0)).collect::<Vec<_>>();
        let begun = Instant::now();
        let before = FlockTable::compute(1, 2, Strategy::UniformNodes, &weights(n));
        let compute_ms = begun.elapsed().as_secs_f64() * 1e3;
        let after = FlockTable::compute(2, 2, Strategy::UniformNodes, &weights(n + 1));
        let moved = after.moved_from(&before);
        let ideal = 2 * FLOCKS as usize / (n + 1);
        outln!(
            "{:<40} {:>9.2} ms {:>12} {:>10} ({:.2}x)",
            format!("  {n} -> {} nodes", n + 1),
            compute_ms,
            moved,
            ideal,
            moved as f64 / ideal as f64
        );
    }
    Ok(())
}
