//! `girder demo`: the main job. Starts an in-process grid (a top pool with a distributor and
//! a helper over two worker pools), runs a mixed workload that exercises memoization,
//! nested requests and work spreading, checks every answer, and prints a summary.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use girder::examples::{echo, fib, sleep, tree};
use girder::{CallError, Client, Node, PoolSpec, Registry, WorkerSpec};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `girder demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Top-level requests to make.
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    requests: u64,
    /// Workers, split over two pools.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=256))]
    workers: u64,
    /// Evaluation slots per worker.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    slots: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress bar (for logs and scripts).
    #[arg(long)]
    quiet: bool,
}

/// One top-level request of the workload, with the answer it must produce.
#[derive(Debug, Clone, Copy)]
enum Job {
    Fib(u64),
    Tree { depth: u32, id: u64 },
    Sleep(u64),
    Echo(u64),
}

fn fib_local(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a.wrapping_add(b));
    }
    a
}

fn tree_size(depth: u32, fanout: u64) -> u64 {
    (0..=depth).map(|d| fanout.pow(d)).sum()
}

fn workload(requests: u64, seed: u64) -> Vec<Job> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..requests)
        .map(|_| match rng.u32(0..10) {
            // Fibonacci numbers overlap heavily: most of their sub-requests are cache hits.
            0..=2 => Job::Fib(rng.u64(20..=90)),
            // Fan-outs over a shared id space: siblings are distinct, repeats are memoized.
            3..=5 => Job::Tree { depth: rng.u32(2..=5), id: rng.u64(0..3_000) },
            // Short sleeps hold slots, so the work visibly spreads over the workers.
            6..=7 => Job::Sleep(rng.u64(1..=150)),
            _ => Job::Echo(rng.u64(0..500)),
        })
        .collect()
}

async fn run_job(client: &Client, job: Job) -> Result<(), String> {
    let wrong = |what: String| Err(format!("{job:?}: {what}"));
    let show = |err: CallError| format!("{job:?} failed: {err}");
    match job {
        Job::Fib(n) => match fib::call(client, n).await.map_err(show)? {
            got if got == fib_local(n) => Ok(()),
            got => wrong(format!("got {got}")),
        },
        Job::Tree { depth, id } => match tree::call(client, depth, 3, id).await.map_err(show)? {
            got if got == tree_size(depth, 3) => Ok(()),
            got => wrong(format!("got {got}")),
        },
        Job::Sleep(ms) => match sleep::call(client, ms).await.map_err(show)? {
            got if got == ms => Ok(()),
            got => wrong(format!("got {got}")),
        },
        Job::Echo(x) => match echo::call(client, rmpv::Value::from(x)).await.map_err(show)? {
            got if got == rmpv::Value::from(x) => Ok(()),
            got => wrong(format!("got {got}")),
        },
    }
}

pub async fn run(registry: Registry, args: DemoArgs) -> anyhow::Result<()> {
    let half = (args.workers / 2) as usize;
    let slots = args.slots as usize;
    let node = Node::builder()
        .id("demo")
        .registry(registry)
        .pool(PoolSpec::new("grid"))
        .pool(PoolSpec::new("east").parent("grid"))
        .pool(PoolSpec::new("west").parent("grid"))
        .workers(WorkerSpec::new("east", half, slots))
        .workers(WorkerSpec::new("west", args.workers as usize - half, slots))
        .entry_pool("grid")
        .start()
        .await
        .context("cannot start the demo grid")?;
    let jobs = workload(args.requests, args.seed);
    outln!(
        "girder demo: {} requests (fib, tree fan-outs, sleeps, echoes) on {} workers x {} slots, {} in flight",
        args.requests,
        args.workers,
        args.slots,
        args.concurrency
    );
    let progress = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(args.requests) };
    progress.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} requests  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let client = node.client();
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?;
    let mut failures = Vec::new();
    let started = Instant::now();
    let mut running = futures::stream::iter(jobs)
        .map(|job| {
            let client = &client;
            async move {
                let begun = Instant::now();
                let result = run_job(client, job).await;
                (result, begun.elapsed())
            }
        })
        .buffer_unordered(args.concurrency as usize);
    while let Some((result, took)) = running.next().await {
        latencies.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
        if let Err(message) = result {
            failures.push(message);
        }
        progress.inc(1);
    }
    drop(running);
    let wall = started.elapsed();
    progress.finish_and_clear();
    let stats = node.stats().await;
    node.shutdown().await;
    print_summary(&args, wall, &latencies, &stats);
    if !failures.is_empty() {
        bail!("{} of {} requests gave a wrong answer or failed; first: {}", failures.len(), args.requests, failures[0]);
    }
    outln!("\nall {} answers verified against local computation", args.requests);
    Ok(())
}

fn ms(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros} µs")
    } else {
        format!("{:.2} ms", micros as f64 / 1000.0)
    }
}

fn print_summary(args: &DemoArgs, wall: Duration, latencies: &Histogram<u64>, stats: &girder::NodeStats) {
    let secs = wall.as_secs_f64().max(1e-9);
    let evaluations: u64 = stats.evaluations.iter().map(|(_, n)| n).sum();
    outln!("\n== summary ==");
    outln!(
        "top-level requests   {:>10}   in {:.3} s   ({:.0} requests/s)",
        args.requests,
        secs,
        args.requests as f64 / secs
    );
    outln!("calls incl. nested   {:>10}", stats.calls);
    outln!("  computed           {:>10}   (evaluations run)", evaluations);
    outln!("  served from cache  {:>10}   (memoized results)", stats.memo_hits);
    outln!("  joined in flight   {:>10}   (identical requests computed once)", stats.joined);
    outln!(
        "latency              p50 {}   p90 {}   p99 {}   max {}",
        ms(latencies.value_at_quantile(0.50)),
        ms(latencies.value_at_quantile(0.90)),
        ms(latencies.value_at_quantile(0.99)),
        ms(latencies.max())
    );
    outln!("\nper function:");
    for (name, count) in &stats.evaluations {
        if *count > 0 {
            outln!("  {name:<24} {count:>8} evaluations");
        }
    }
    outln!("\nper worker:");
    for worker in &stats.workers {
        let share = 100.0 * worker.executed as f64 / evaluations.max(1) as f64;
        outln!("  {:<10} pool {:<5} {:>8} evaluations ({share:>4.1}%)", worker.id, worker.pool, worker.executed);
    }
    outln!("\npools:");
    for (pool, counters) in &stats.pools {
        outln!(
            "  {pool:<5} distributor handed off {:>7}   helper hoisted {:>6}",
            counters.handed_off,
            counters.hoisted
        );
    }
}
