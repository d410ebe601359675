//! Any depth, both kinds of function, on one slot: `chain`, `chain_blocking` and `zigzag`
//! 20,000 deep, with the process's threads bounded by the slots plus the runtime's own.
//! One test in this binary, so nothing else starts threads while it counts them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use girder::examples::{chain, chain_blocking, zigzag, zigzag_blocking};
use girder::{CallError, Ctx, Registry};

const DEPTH: u64 = 20_000;
/// Threads besides the slots and the runtime's workers that may come and go: the sampler
/// itself and a few of tokio's blocking pool (e.g. for a DNS lookup or a file).
const EXTRA_THREADS_MAX: usize = 4;

fn threads_now() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs is readable");
    let line = status.lines().find(|l| l.starts_with("Threads:")).expect("status has Threads");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a thread count")
}

/// Samples the process's thread count until dropped, keeping the peak.
struct PeakThreads {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl PeakThreads {
    fn start() -> PeakThreads {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(threads_now(), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        PeakThreads { stop, peak, sampler: Some(sampler) }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            sampler.join().expect("sampler ends");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Calls `call_blocking` from async code: must be a clear error, not tokio's panic.
#[girder::function(name = "test/blocking_from_async")]
async fn blocking_from_async(ctx: Ctx) -> Result<String, String> {
    match chain_blocking::call_blocking(&ctx, 1) {
        Err(err @ CallError::BlockingInAsync { .. }) => Ok(err.to_string()),
        other => Err(format!("expected BlockingInAsync, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_nest_to_any_depth_on_one_slot_with_bounded_threads() {
    let before = threads_now();
    let node = common::grid(Registry::with_examples().with::<blocking_from_async>(), 1, 1).await;
    let client = node.client();
    let peak = PeakThreads::start();
    assert_eq!(chain_blocking::call(&client, DEPTH).await.expect("chain_blocking completes"), DEPTH);
    assert_eq!(chain::call(&client, DEPTH).await.expect("chain completes"), DEPTH);
    assert_eq!(zigzag::call(&client, DEPTH).await.expect("zigzag completes"), DEPTH);
    // Each level is a distinct request: all of them ran, none twice.
    assert_eq!(node.evaluations_of("examples/chain_blocking"), DEPTH + 1);
    assert_eq!(node.evaluations_of("examples/chain"), DEPTH + 1);
    assert_eq!(node.evaluations_of("examples/zigzag") + node.evaluations_of("examples/zigzag_blocking"), DEPTH + 1);
    // A zigzag started on its blocking half shares nothing memoized with the one above.
    assert_eq!(zigzag_blocking::call(&client, 999).await.expect("zigzag_blocking completes"), 999);
    let peak = peak.finish();
    let stats = node.stats().await;
    let slots = stats.workers[0].slots;
    assert_eq!(stats.workers[0].peak_busy, 1, "one slot, one evaluation at a time");
    assert!(
        stats.workers[0].fiber_threads <= slots,
        "fiber threads {} > slots {slots}",
        stats.workers[0].fiber_threads
    );
    assert!(
        peak <= before + slots + EXTRA_THREADS_MAX,
        "peak threads {peak}: more than {before} before + {slots} slots + {EXTRA_THREADS_MAX}"
    );
    let message = blocking_from_async::call(&client).await.expect("a clear error, not a panic");
    assert!(message.contains("call_blocking from async code"), "{message}");
    node.shutdown().await;
}
