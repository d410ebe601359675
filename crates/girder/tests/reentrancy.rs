//! Nested requests to any depth on a single slot: no starvation, no extra threads.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::thread::ThreadId;

use girder::examples::{fib, tree, tree_blocking};
use girder::{Ctx, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_tree_on_one_slot_completes() {
    let node = common::grid(Registry::with_examples(), 1, 1).await;
    let count = tree::call(&node.client(), 7, 3, 0).await.expect("tree completes");
    assert_eq!(count, 3280);
    let stats = node.stats().await;
    assert_eq!(node.evaluations_of("examples/tree"), 3280);
    assert_eq!(stats.workers[0].peak_busy, 1, "one slot means one evaluation at a time");
    node.shutdown().await;
}

static THREADS: Mutex<Option<HashSet<ThreadId>>> = Mutex::new(None);

/// `tree_blocking` again, recording the threads its bodies run on.
#[girder::function(name = "test/tree_threads")]
fn tree_threads(ctx: Ctx, depth: u32, fanout: u32, id: u64) -> Result<u64, String> {
    THREADS.lock().unwrap().get_or_insert_with(HashSet::new).insert(std::thread::current().id());
    let mut count = 1;
    if depth > 0 {
        for k in 1..=fanout {
            count += tree_threads::call_blocking(&ctx, depth - 1, fanout, id * u64::from(fanout) + u64::from(k))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tree_on_one_slot_runs_on_one_thread() {
    let node = common::grid(Registry::with_examples().with::<tree_threads>(), 1, 1).await;
    let count = tree_threads::call(&node.client(), 7, 3, 0).await.expect("tree completes");
    assert_eq!(count, 3280);
    assert_eq!(node.evaluations_of("test/tree_threads"), 3280);
    let threads = THREADS.lock().unwrap().take().unwrap_or_default();
    assert_eq!(threads.len(), 1, "nested blocking calls ran inline on the slot's one thread, not on {threads:?}");
    // The shipped blocking example gives the same answer.
    assert_eq!(tree_blocking::call(&node.client(), 5, 3, 0).await.unwrap(), 364);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fib_is_memoized_linear_and_cached() {
    let node = common::grid(Registry::with_examples(), 2, 2).await;
    let client = node.client();
    assert_eq!(fib::call(&client, 90).await.unwrap(), 2_880_067_194_370_816_120);
    assert_eq!(node.evaluations_of("examples/fib"), 91);
    assert_eq!(fib::call(&client, 90).await.unwrap(), 2_880_067_194_370_816_120);
    assert_eq!(node.evaluations_of("examples/fib"), 91, "the second call is served from the cache");
    assert_eq!(fib::call(&client, 93).await.unwrap(), 12_200_160_415_121_876_738);
    assert_eq!(node.evaluations_of("examples/fib"), 94);
    node.shutdown().await;
}
