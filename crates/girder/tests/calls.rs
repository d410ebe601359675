//! Many calls at once (`map`, `map_ordered`, `gather`) and cancelling calls by id, on the
//! embedded statekeeper.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use girder::examples::nap_tree;
use girder::{CallError, CallId, Ctx, Registry};

static SQUARES: AtomicU64 = AtomicU64::new(0);

#[girder::function(name = "test/square")]
async fn square(_ctx: Ctx, x: u64) -> u64 {
    SQUARES.fetch_add(1, Ordering::SeqCst);
    x * x
}

#[girder::function(name = "test/odd_only")]
async fn odd_only(_ctx: Ctx, x: u64) -> Result<u64, String> {
    if x.is_multiple_of(2) {
        return Err(format!("{x} is even"));
    }
    Ok(x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_over_ten_thousand_inputs_yields_every_result_once() {
    let node = common::grid(Registry::new().with::<square>(), 2, 4).await;
    let client = node.client();
    // 10,000 inputs of which 5,000 are distinct: each distinct one is computed once.
    let inputs: Vec<(u64,)> = (0..10_000u64).map(|i| (i % 5_000,)).collect();
    let mut seen = HashSet::new();
    let mut results = client.map::<square, _>(inputs, 64);
    while let Some((index, result)) = results.next().await {
        assert!(seen.insert(index), "input {index} answered twice");
        let x = index as u64 % 5_000;
        assert_eq!(result, Ok(x * x), "input {index}");
    }
    assert_eq!(seen.len(), 10_000, "every input answered");
    assert_eq!(SQUARES.load(Ordering::SeqCst), 5_000, "each distinct input computed once");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_ordered_and_gather_keep_input_order_with_errors_in_place() {
    let node = common::grid(Registry::new().with::<odd_only>(), 1, 4).await;
    let client = node.client();
    let gathered = client.gather::<odd_only, _>((0..50u64).rev().map(|x| (x,)), 8).await;
    for (position, result) in gathered.iter().enumerate() {
        let x = 49 - position as u64;
        match result {
            Ok(value) => assert_eq!((x % 2, *value), (1, x)),
            Err(CallError::Function { message, .. }) => assert_eq!(message, &format!("{x} is even")),
            Err(other) => panic!("{other}"),
        }
    }
    let ordered: Vec<_> = client.map_ordered::<odd_only, _>([(3,), (1,), (2,)], 3).collect().await;
    assert_eq!(ordered[..2], [Ok(3), Ok(1)]);
    assert!(ordered[2].is_err());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_completes_in_completion_order() {
    let node = common::grid(Registry::with_examples(), 1, 4).await;
    let client = node.client();
    // Leaves of nap_tree sleep: the 400 ms one comes last although it is the first input.
    let inputs = [(0, 1, 1, 400), (0, 1, 2, 10), (0, 1, 3, 10)];
    let order: Vec<usize> = client.map::<nap_tree, _>(inputs, 3).map(|(index, _)| index).collect().await;
    assert_eq!(order.last(), Some(&0), "{order:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_call_stops_its_tree_and_frees_its_id() {
    // Sleeping leaves hold their slots: one each.
    let node = common::grid(Registry::with_examples(), 1, 16).await;
    let client = node.client();
    // A 3-level tree (1 + 3 + 9 requests) whose leaves sleep a minute.
    let call = client.spawn::<nap_tree>((2, 3, 1, 60_000)).expect("spawned");
    let begun = std::time::Instant::now();
    while node.stats().await.running < 13 {
        assert!(begun.elapsed() < Duration::from_secs(10), "the tree never ran: {:?}", node.stats().await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let id = call.id().clone();
    assert!(client.cancel(&id));
    let outcome = tokio::time::timeout(Duration::from_secs(5), call).await.expect("a cancelled call answers");
    assert!(matches!(outcome, Err(CallError::Cancelled { .. })), "{outcome:?}");
    let begun = std::time::Instant::now();
    while node.stats().await.running > 0 {
        assert!(begun.elapsed() < Duration::from_secs(5), "the tree ran on: {:?}", node.stats().await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!client.cancel(&id), "the call is no longer in flight");
    // The id is free again, and nothing of the cancelled tree was memoized.
    let again = client.spawn_with_id::<nap_tree>(id, (0, 1, 7, 1)).expect("the id is free");
    assert_eq!(again.await, Ok(1));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_caller_leaves_another_waiting_for_the_same_request() {
    let node = common::grid(Registry::with_examples(), 1, 4).await;
    let client = node.client();
    let first = client.spawn::<nap_tree>((1, 2, 5, 300)).expect("spawned");
    let second = client.spawn::<nap_tree>((1, 2, 5, 300)).expect("spawned");
    assert_ne!(first.id(), second.id());
    let duplicate = client.spawn_with_id::<nap_tree>(first.id().clone(), (0, 1, 1, 1));
    assert!(duplicate.is_err(), "an id in flight is not taken twice");
    first.cancel();
    assert!(matches!(first.await, Err(CallError::Cancelled { .. })));
    assert_eq!(second.await, Ok(3), "the other caller still gets the result");
    // Dropping a spawned call cancels it too.
    let dropped = client.spawn::<nap_tree>((0, 1, 9, 60_000)).expect("spawned");
    let id = dropped.id().clone();
    let begun = std::time::Instant::now();
    while node.stats().await.running == 0 {
        assert!(begun.elapsed() < Duration::from_secs(5), "the call never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(dropped);
    while node.stats().await.running > 0 {
        assert!(begun.elapsed() < Duration::from_secs(10), "a dropped call ran on");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!client.cancel(&id), "a dropped call leaves no id behind");
    assert!(CallId::parse("no spaces").is_err());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_tree_leaves_a_child_another_caller_waits_for_running() {
    let node = common::grid(Registry::with_examples(), 1, 16).await;
    let client = node.client();
    let tree = client.spawn::<nap_tree>((2, 3, 1, 400)).expect("spawned");
    let begun = std::time::Instant::now();
    while node.stats().await.running < 13 {
        assert!(begun.elapsed() < Duration::from_secs(10), "the tree never ran whole");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Tree 1's children are 4..6, theirs 13..21: another caller waits for leaf 13.
    let shared = client.spawn::<nap_tree>((0, 3, 13, 400)).expect("spawned");
    while node.stats().await.joined < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tree.cancel();
    assert!(matches!(tree.await, Err(CallError::Cancelled { .. })));
    while node.stats().await.running > 1 {
        assert!(begun.elapsed() < Duration::from_secs(10), "the tree ran on");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(shared.await, Ok(1));
    assert_eq!(node.evaluations_of("examples/nap_tree"), 13, "the shared leaf ran on, not again");
    node.shutdown().await;
}
