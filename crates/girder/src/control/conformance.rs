//! The statekeeper conformance suite: one set of checks every [`Statekeeper`]
//! implementation must pass (like openraft's shared store suite). The embedded and the
//! Redis statekeepers both run it in the integration tests.
//!
//! Each case gets a fresh, empty statekeeper from a factory, which is told the node lease
//! (TTL) to use, so lease cases stay short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;

use super::{
    Event, Memo, NodeId, NodeInfo, PoolId, QueueId, Statekeeper, Submitted, TreeEnd, CLAIM_DROP_MAX, FORGET_BATCH_MAX,
};
use crate::error::{CallError, StatekeeperError};
use crate::request::{Budget, Request};

/// Makes a fresh, empty statekeeper whose nodes die `node_ttl_ms` after their last heartbeat.
pub type Factory = Arc<dyn Fn(u64) -> BoxFuture<'static, Arc<dyn Statekeeper>> + Send + Sync>;

type Case = fn(Factory) -> BoxFuture<'static, ()>;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("submit_queues_joins_and_memoizes", |f| Box::pin(submit_queues_joins_and_memoizes(f))),
    ("unknown_functions_are_refused", |f| Box::pin(unknown_functions_are_refused(f))),
    ("unmemoized_outcomes_are_not_kept", |f| Box::pin(unmemoized_outcomes_are_not_kept(f))),
    ("each_request_is_claimed_once_across_copies", |f| Box::pin(each_request_is_claimed_once_across_copies(f))),
    ("volunteers_get_work_until_their_credits_run_out", |f| Box::pin(volunteers_get_work_until_credits_run_out(f))),
    ("work_goes_only_to_nodes_serving_its_function", |f| Box::pin(work_goes_only_to_nodes_serving_its_function(f))),
    ("nested_pools_hand_work_down", |f| Box::pin(nested_pools_hand_work_down(f))),
    ("helpers_copy_surplus_work_to_idle_members", |f| Box::pin(helpers_copy_surplus_work_to_idle_members(f))),
    ("duplicate_node_ids_are_refused", |f| Box::pin(duplicate_node_ids_are_refused(f))),
    ("the_directory_follows_registration", |f| Box::pin(the_directory_follows_registration(f))),
    ("dead_nodes_are_reaped_and_their_work_requeued", |f| Box::pin(dead_nodes_are_reaped_and_their_work_requeued(f))),
    ("a_request_whose_owner_died_is_requeued_on_submit", |f| Box::pin(a_request_whose_owner_died_is_requeued(f))),
    ("waiters_fail_when_the_function_vanishes", |f| Box::pin(waiters_fail_when_the_function_vanishes(f))),
    ("wait_work_wakes_on_new_work", |f| Box::pin(wait_work_wakes_on_new_work(f))),
    ("released_claims_run_again", |f| Box::pin(released_claims_run_again(f))),
    ("unknown_nodes_hold_no_claims", |f| Box::pin(unknown_nodes_hold_no_claims(f))),
    ("memoized_submissions_record_nothing", |f| Box::pin(memoized_submissions_record_nothing(f))),
    ("each_waiter_gets_exactly_one_outcome", |f| Box::pin(each_waiter_gets_exactly_one_outcome(f))),
    ("copies_of_done_requests_are_dropped", |f| Box::pin(copies_of_done_requests_are_dropped(f))),
    ("rounds_look_at_a_bounded_number_of_entries", |f| Box::pin(rounds_look_at_a_bounded_number_of_entries(f))),
    ("a_removed_node_gives_work_back_in_order", |f| Box::pin(a_removed_node_gives_work_back_in_order(f))),
    ("reaping_many_nodes_and_long_queues_completes", |f| Box::pin(reaping_many_nodes_and_long_queues_completes(f))),
    ("an_expired_node_registering_again_gives_back_its_work", |f| Box::pin(expired_node_registering_again(f))),
    ("a_tree_past_its_budget_ends", |f| Box::pin(a_tree_past_its_budget_ends(f))),
    ("a_tree_is_cancelled_when_its_root_has_no_waiter", |f| Box::pin(a_tree_is_cancelled_when_unwaited(f))),
    ("another_tree_adopts_what_its_caller_joined", |f| Box::pin(another_tree_adopts_what_it_joined(f))),
    ("a_tree_whose_root_caller_died_ends", |f| Box::pin(a_tree_whose_root_caller_died_ends(f))),
    ("claims_drop_a_bounded_number_of_ended_requests", |f| Box::pin(claims_drop_a_bounded_number(f))),
    ("a_finished_root_ends_its_tree", |f| Box::pin(a_finished_root_ends_its_tree(f))),
    ("lost_claims_are_counted_each_time", |f| Box::pin(lost_claims_are_counted_each_time(f))),
    ("memoized_outcomes_expire_after_their_ttl", |f| Box::pin(memoized_outcomes_expire_after_their_ttl(f))),
    ("forget_drops_one_outcome_and_its_racing_completion", |f| Box::pin(forget_drops_one_outcome(f))),
    ("forget_all_drops_a_function_version_in_batches", |f| Box::pin(forget_all_drops_a_function_version(f))),
];

/// Runs every case against statekeepers from `factory`, naming the case that fails.
pub async fn run_all(factory: Factory) {
    for (name, case) in CASES {
        tracing::info!(case = name, "conformance case");
        let result = tokio::spawn(case(factory.clone())).await;
        if let Err(err) = result {
            panic!("conformance case {name} failed: {err}");
        }
    }
}

const LONG_TTL_MS: u64 = 60_000;

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

fn worker(name: &str) -> QueueId {
    QueueId::worker(name)
}

fn request(function: &str, n: u32) -> Request {
    Request::new(function, 1, Bytes::from(n.to_le_bytes().to_vec()))
}

/// `request` as a claim hands it out after `lost` nodes holding its claim were lost.
fn after_lost(request: Request, lost: u32) -> Request {
    Request { lost, ..request }
}

fn functions(names: &[&str]) -> Vec<(String, u32)> {
    names.iter().map(|n| ((*n).to_owned(), 1)).collect()
}

/// Node `n1` serving `f`, pool `p` with worker queue `n1/w0`.
async fn one_node(factory: &Factory, ttl_ms: u64) -> Arc<dyn Statekeeper> {
    let sk = factory(ttl_ms).await;
    sk.register_node(&node("n1"), &functions(&["f"])).await.expect("register n1");
    sk.declare_pool(&PoolId::new("p"), None, &node("n1")).await.expect("declare p");
    sk.join_pool(&PoolId::new("p"), &worker("n1/w0"), &node("n1")).await.expect("join");
    sk
}

async fn next_event(events: &mut futures::stream::BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event arrives within 10 s")
        .expect("the inbox stays open")
}

async fn submit_queues_joins_and_memoizes(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &[]).await.unwrap();
    let mut n2_events = sk.open_inbox(&node("n2")).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap(), Submitted::Joined);
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 1, "single flight: queued once");
    let claimed = sk.claim(&pool_queue, &node("n1"), 10).await.unwrap();
    assert_eq!(claimed, vec![req.clone()]);
    assert!(sk.claim(&pool_queue, &node("n1"), 10).await.unwrap().is_empty());
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap(), Submitted::Joined);
    let outcome = Ok(Bytes::from_static(b"value"));
    assert!(sk.complete(&req, &outcome, Memo::Keep, &node("n1")).await.unwrap(), "n1 waits for it");
    assert_eq!(next_event(&mut n2_events).await, Event::Done { id: req.id, outcome: outcome.clone() });
    assert_eq!(sk.result(&req.id).await.unwrap(), Some(outcome.clone()));
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Done(outcome));
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 0);
    // A function error is a value: memoized too.
    let failing = request("f", 2);
    sk.submit(&failing, &pool_queue, false, &node("n1")).await.unwrap();
    let error = Err(CallError::Function { function: "f".into(), message: "no".into() });
    sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    sk.complete(&failing, &error, Memo::Keep, &node("n1")).await.unwrap();
    assert_eq!(sk.result(&failing.id).await.unwrap(), Some(error));
}

/// Submits until the answer is final: a statekeeper may hold back "nobody serves this" while
/// its grid state is younger than one node lease (not every node may have registered yet),
/// answering `Unavailable` meanwhile. Keeps `alive` heartbeating while it waits.
async fn settled_submit(sk: &Arc<dyn Statekeeper>, req: &Request, queue: &QueueId, alive: &[NodeId]) -> Submitted {
    let begun = Instant::now();
    loop {
        match sk.submit(req, queue, false, &alive[0]).await {
            Ok(submitted) => return submitted,
            Err(StatekeeperError::Unavailable(message)) => {
                assert!(begun.elapsed() < Duration::from_secs(10), "still unavailable after 10 s: {message}");
            }
            Err(other) => panic!("submit failed: {other}"),
        }
        for node in alive {
            sk.heartbeat(node, &NodeInfo::default()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SHORT_TTL_MS: u64 = 300;

async fn unknown_functions_are_refused(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("nobody/serves", 1);
    assert_eq!(settled_submit(&sk, &req, &pool_queue, &[node("n1")]).await, Submitted::UnknownFunction);
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 0);
    assert_eq!(sk.result(&req.id).await.unwrap(), None);
    assert_eq!(sk.function_version("nobody/serves").await.unwrap(), None);
}

async fn unmemoized_outcomes_are_not_kept(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 3);
    sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap();
    sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    let panic = Err(CallError::Panic { function: "f".into(), message: "boom".into() });
    assert!(sk.complete(&req, &panic, Memo::Skip, &node("n1")).await.unwrap());
    assert_eq!(sk.result(&req.id).await.unwrap(), None);
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued, "runs again");
}

async fn each_request_is_claimed_once_across_copies(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let own = worker("n1/w0");
    let req = request("f", 4);
    assert_eq!(sk.submit(&req, &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    // A nested re-submission of a pending request puts a copy at the front.
    assert_eq!(sk.submit(&req, &own, true, &node("n1")).await.unwrap(), Submitted::Joined);
    assert_eq!(sk.queue_len(&own).await.unwrap(), 2);
    assert_eq!(sk.claim(&own, &node("n1"), 10).await.unwrap(), vec![req]);
    assert_eq!(sk.queue_len(&own).await.unwrap(), 0, "the stale copy is dropped");
}

async fn volunteers_get_work_until_credits_run_out(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool = PoolId::new("p");
    let pool_queue = QueueId::pool(&pool);
    let own = worker("n1/w0");
    sk.volunteer(&pool, &own, 2).await.unwrap();
    for n in 10..13 {
        sk.submit(&request("f", n), &pool_queue, false, &node("n1")).await.unwrap();
    }
    assert_eq!(sk.queue_len(&own).await.unwrap(), 2, "two credits, two hand-offs");
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 1);
    assert_eq!(sk.pool_counters(&pool).await.unwrap().handed_off, 2);
    sk.volunteer(&pool, &own, 1).await.unwrap();
    assert_eq!(sk.queue_len(&own).await.unwrap(), 3, "a new volunteer pulls queued work");
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 0);
    assert_eq!(sk.distribute(&pool, 100).await.unwrap(), 0);
    let claimed = sk.claim(&own, &node("n1"), 10).await.unwrap();
    let order: Vec<Request> = (10..13).map(|n| request("f", n)).collect();
    assert_eq!(claimed, order, "hand-offs keep submission order");
    assert!(matches!(sk.volunteer(&PoolId::new("nope"), &own, 1).await, Err(StatekeeperError::UnknownPool(_))));
}

async fn work_goes_only_to_nodes_serving_its_function(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool = PoolId::new("p");
    sk.register_node(&node("n2"), &functions(&["g"])).await.unwrap();
    sk.join_pool(&pool, &worker("n2/w0"), &node("n2")).await.unwrap();
    sk.volunteer(&pool, &worker("n1/w0"), 5).await.unwrap();
    sk.volunteer(&pool, &worker("n2/w0"), 5).await.unwrap();
    let pool_queue = QueueId::pool(&pool);
    for n in 0..3 {
        sk.submit(&request("g", n), &pool_queue, false, &node("n1")).await.unwrap();
        sk.submit(&request("f", n), &pool_queue, false, &node("n1")).await.unwrap();
    }
    let on_n1 = sk.claim(&worker("n1/w0"), &node("n1"), 10).await.unwrap();
    let on_n2 = sk.claim(&worker("n2/w0"), &node("n2"), 10).await.unwrap();
    assert!(on_n1.iter().all(|r| &*r.function == "f") && on_n1.len() == 3, "{on_n1:?}");
    assert!(on_n2.iter().all(|r| &*r.function == "g") && on_n2.len() == 3, "{on_n2:?}");
}

async fn nested_pools_hand_work_down(factory: Factory) {
    let sk = factory(LONG_TTL_MS).await;
    sk.register_node(&node("n1"), &functions(&["f"])).await.unwrap();
    let (top, child) = (PoolId::new("top"), PoolId::new("child"));
    sk.declare_pool(&top, None, &node("n1")).await.unwrap();
    sk.declare_pool(&child, Some(&top), &node("n1")).await.unwrap();
    assert!(matches!(
        sk.declare_pool(&PoolId::new("orphan"), Some(&PoolId::new("missing")), &node("n1")).await,
        Err(StatekeeperError::UnknownPool(_))
    ));
    let own = worker("n1/w0");
    sk.join_pool(&child, &own, &node("n1")).await.unwrap();
    let top_queue = QueueId::pool(&top);
    // No volunteer yet: the work waits at the top.
    sk.submit(&request("f", 1), &top_queue, false, &node("n1")).await.unwrap();
    assert_eq!(sk.queue_len(&top_queue).await.unwrap(), 1);
    // The child's member volunteers: the child counts as a volunteer at the top.
    sk.volunteer(&child, &own, 2).await.unwrap();
    assert_eq!(sk.queue_len(&top_queue).await.unwrap(), 0);
    assert_eq!(sk.queue_len(&own).await.unwrap(), 1);
    sk.submit(&request("f", 2), &top_queue, false, &node("n1")).await.unwrap();
    assert_eq!(sk.queue_len(&own).await.unwrap(), 2, "straight down to the idle member");
    assert_eq!(sk.pool_counters(&top).await.unwrap().handed_off, 2);
}

async fn helpers_copy_surplus_work_to_idle_members(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool = PoolId::new("p");
    sk.join_pool(&pool, &worker("n1/w1"), &node("n1")).await.unwrap();
    let busy = worker("n1/w0");
    for n in 0..6 {
        sk.submit(&request("f", n), &busy, true, &node("n1")).await.unwrap();
    }
    assert_eq!(sk.hoist(&pool, 10).await.unwrap(), 0, "nobody idle: nothing to hoist");
    sk.volunteer(&pool, &worker("n1/w1"), 2).await.unwrap();
    let hoisted = sk.hoist(&pool, 10).await.unwrap();
    assert_eq!(hoisted, 2, "limited by the idle member's credits");
    assert_eq!(sk.pool_counters(&pool).await.unwrap().hoisted, 2);
    let idle = sk.claim(&worker("n1/w1"), &node("n1"), 10).await.unwrap();
    assert_eq!(idle.len(), 2);
    // Copies come from the far end of the busy queue: the oldest nested requests.
    assert!(idle.contains(&request("f", 0)) && idle.contains(&request("f", 1)), "{idle:?}");
    let rest = sk.claim(&busy, &node("n1"), 10).await.unwrap();
    assert_eq!(rest.len(), 4, "each request is claimed once: {rest:?}");
}

async fn duplicate_node_ids_are_refused(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let err = sk.register_node(&node("n1"), &[]).await.unwrap_err();
    assert!(matches!(err, StatekeeperError::DuplicateNode(ref id) if id == "n1"), "{err:?}");
    sk.deregister_node(&node("n1")).await.unwrap();
    sk.register_node(&node("n1"), &[]).await.expect("a deregistered id is free again");
}

async fn the_directory_follows_registration(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    assert_eq!(sk.function_version("f").await.unwrap(), Some(1));
    let info = NodeInfo { id: "n1".into(), calls: 7, ..Default::default() };
    assert!(sk.heartbeat(&node("n1"), &info).await.unwrap());
    let live = sk.live_nodes().await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].calls, 7);
    sk.deregister_node(&node("n1")).await.unwrap();
    assert_eq!(sk.function_version("f").await.unwrap(), None);
    assert!(!sk.heartbeat(&node("n1"), &info).await.unwrap(), "a removed node must register again");
    assert!(sk.live_nodes().await.unwrap().is_empty());
}

/// Polls `reap` until it declares `dead` dead; lease expiry is the event awaited.
async fn reap_until(sk: &Arc<dyn Statekeeper>, dead: &NodeId, keep_alive: &[NodeId]) {
    let begun = Instant::now();
    loop {
        for alive in keep_alive {
            sk.heartbeat(alive, &NodeInfo::default()).await.unwrap();
        }
        if sk.reap().await.unwrap().contains(dead) {
            return;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "{dead} was never reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dead_nodes_are_reaped_and_their_work_requeued(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    let pool = PoolId::new("p");
    sk.register_node(&node("n2"), &functions(&["f"])).await.unwrap();
    sk.join_pool(&pool, &worker("n2/w0"), &node("n2")).await.unwrap();
    let pool_queue = QueueId::pool(&pool);
    let (running, queued) = (request("f", 1), request("f", 2));
    sk.submit(&running, &pool_queue, false, &node("n2")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![running.clone()]);
    sk.submit(&queued, &worker("n1/w0"), true, &node("n2")).await.unwrap();
    reap_until(&sk, &node("n1"), &[node("n2")]).await;
    assert!(sk.live_nodes().await.unwrap().iter().all(|n| n.id != "n1"));
    // Both are back in the pool's queue, for n2 to take.
    let mut taken = sk.claim(&pool_queue, &node("n2"), 10).await.unwrap();
    taken.sort_by_key(|r| r.args.clone());
    assert_eq!(taken, vec![after_lost(running, 1), queued], "a lost claim counts; a queued entry does not");
    // The dead node's worker is no longer a member: it gets no more work.
    sk.volunteer(&pool, &worker("n1/w0"), 5).await.unwrap();
    sk.submit(&request("f", 3), &pool_queue, false, &node("n2")).await.unwrap();
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0);
    // Work sent straight to its queue (say, by a stale affinity choice) goes to its pool.
    sk.submit(&request("f", 4), &worker("n1/w0"), false, &node("n2")).await.unwrap();
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0);
    assert!(sk.claim(&pool_queue, &node("n2"), 10).await.unwrap().contains(&request("f", 4)));
}

async fn a_request_whose_owner_died_is_requeued(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    sk.register_node(&node("n2"), &functions(&["f"])).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap();
    sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap(), Submitted::Joined);
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 0, "its owner is alive: not requeued");
    // n1 stops heartbeating; n2 keeps asking for the request until it is queued again.
    let begun = Instant::now();
    loop {
        sk.heartbeat(&node("n2"), &NodeInfo::default()).await.unwrap();
        sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap();
        if sk.queue_len(&pool_queue).await.unwrap() > 0 {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "never requeued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sk.claim(&pool_queue, &node("n2"), 1).await.unwrap(), vec![after_lost(req, 1)]);
}

async fn waiters_fail_when_the_function_vanishes(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    sk.register_node(&node("n2"), &[]).await.unwrap();
    let mut n2_events = sk.open_inbox(&node("n2")).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    assert_eq!(sk.submit(&req, &pool_queue, false, &node("n2")).await.unwrap(), Submitted::Queued);
    // The last node serving `f` leaves: its waiters are told at once.
    sk.deregister_node(&node("n1")).await.unwrap();
    let unknown = Err(CallError::UnknownFunction { function: "f".into() });
    assert_eq!(next_event(&mut n2_events).await, Event::Done { id: req.id, outcome: unknown });
    assert_eq!(settled_submit(&sk, &req, &pool_queue, &[node("n2")]).await, Submitted::UnknownFunction);
}

async fn wait_work_wakes_on_new_work(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let _events = sk.open_inbox(&node("n1")).await.unwrap();
    let own = worker("n1/w0");
    let waiter = {
        let sk = sk.clone();
        let own = own.clone();
        tokio::spawn(async move {
            let begun = Instant::now();
            sk.wait_work(&own, 20_000).await.unwrap();
            begun.elapsed()
        })
    };
    sk.submit(&request("f", 1), &own, true, &node("n1")).await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(10), "woken by the new work, not the timeout ({waited:?})");
}

async fn released_claims_run_again(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let (kept, lost) = (request("f", 1), request("f", 2));
    sk.submit(&kept, &pool_queue, false, &node("n1")).await.unwrap();
    sk.submit(&lost, &pool_queue, false, &node("n1")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 2).await.unwrap().len(), 2);
    assert_eq!(sk.release_claims(&node("n1"), &[kept.id]).await.unwrap(), 1);
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 2).await.unwrap(), vec![lost]);
}

/// Invariant: a node the statekeeper does not know holds no claims until it registers again.
async fn unknown_nodes_hold_no_claims(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap();
    assert!(sk.claim(&pool_queue, &node("stranger"), 10).await.unwrap().is_empty(), "never registered");
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 1, "a refused claim takes nothing from the queue");
    sk.register_node(&node("n2"), &functions(&["f"])).await.unwrap();
    sk.deregister_node(&node("n2")).await.unwrap();
    assert!(sk.claim(&pool_queue, &node("n2"), 10).await.unwrap().is_empty(), "deregistered");
    let other = request("f", 2);
    sk.submit(&other, &pool_queue, false, &node("n1")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![req.clone()]);
    let (_, next) = sk
        .complete_and_claim(&req, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node("n2"), &pool_queue, 5)
        .await
        .unwrap();
    assert!(next.is_empty(), "complete_and_claim claims nothing for an unknown node");
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 1);
    sk.register_node(&node("n2"), &functions(&["f"])).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n2"), 10).await.unwrap(), vec![other], "registered again: claims");
}

/// Invariant: `submit` of a memoized id returns it and records nothing.
async fn memoized_submissions_record_nothing(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &[]).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    let value = Ok(Bytes::from_static(b"v"));
    sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap();
    sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    sk.complete(&req, &value, Memo::Keep, &node("n1")).await.unwrap();
    for front in [false, true] {
        assert_eq!(sk.submit(&req, &pool_queue, front, &node("n2")).await.unwrap(), Submitted::Done(value.clone()));
        assert_eq!(
            sk.submit(&req, &worker("n1/w0"), front, &node("n2")).await.unwrap(),
            Submitted::Done(value.clone())
        );
    }
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 0);
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0);
    // No waiter was recorded: a second completion wakes nobody, locally or elsewhere.
    assert!(!sk.complete(&req, &value, Memo::Keep, &node("n2")).await.unwrap());
}

/// Invariant: every waiting caller gets exactly one outcome (the completing node directly,
/// the others through their inboxes, once each however often they joined).
async fn each_waiter_gets_exactly_one_outcome(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &[]).await.unwrap();
    sk.register_node(&node("n3"), &[]).await.unwrap();
    let mut n2_events = sk.open_inbox(&node("n2")).await.unwrap();
    let mut n3_events = sk.open_inbox(&node("n3")).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let (req, other) = (request("f", 1), request("f", 2));
    for waiter in ["n1", "n2", "n2", "n3"] {
        sk.submit(&req, &pool_queue, false, &node(waiter)).await.unwrap();
    }
    sk.submit(&other, &pool_queue, false, &node("n3")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![req.clone()]);
    let value = Ok(Bytes::from_static(b"v"));
    assert!(sk.complete(&req, &value, Memo::Keep, &node("n1")).await.unwrap(), "n1 learns it from the reply");
    assert_eq!(next_event(&mut n2_events).await, Event::Done { id: req.id, outcome: value.clone() });
    assert_eq!(next_event(&mut n3_events).await, Event::Done { id: req.id, outcome: value.clone() });
    assert!(!sk.complete(&req, &value, Memo::Keep, &node("n1")).await.unwrap(), "nobody waits any more");
    // The next event each inbox sees is about `other`: nothing was sent twice.
    sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    let panic = Err(CallError::Panic { function: "f".into(), message: "boom".into() });
    assert!(!sk.complete(&other, &panic, Memo::Skip, &node("n2")).await.unwrap());
    assert_eq!(next_event(&mut n3_events).await, Event::Done { id: other.id, outcome: panic });
    let more = tokio::time::timeout(Duration::from_millis(100), n2_events.next()).await;
    assert!(more.is_err(), "n2 got a second event: {more:?}");
}

/// Invariant: `claim` takes an id only while pending; copies of a done request are dropped.
async fn copies_of_done_requests_are_dropped(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool = PoolId::new("p");
    sk.join_pool(&pool, &worker("n1/w1"), &node("n1")).await.unwrap();
    let req = request("f", 1);
    sk.submit(&req, &worker("n1/w0"), true, &node("n1")).await.unwrap();
    sk.submit(&req, &worker("n1/w1"), true, &node("n1")).await.unwrap();
    assert_eq!(sk.queue_len(&worker("n1/w1")).await.unwrap(), 1, "a nested submission copies a pending id");
    assert_eq!(sk.claim(&worker("n1/w1"), &node("n1"), 5).await.unwrap(), vec![req.clone()]);
    sk.complete(&req, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node("n1")).await.unwrap();
    assert!(sk.claim(&worker("n1/w0"), &node("n1"), 5).await.unwrap().is_empty());
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0, "the stale copy is dropped");
}

/// Invariant (bounds): one distribution round looks at no more than `4 * budget + 16`
/// entries (and never more than 1,000), one hoist at no more than 1,000 per member queue.
async fn rounds_look_at_a_bounded_number_of_entries(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &functions(&["g"])).await.unwrap();
    let pool = PoolId::new("p");
    let pool_queue = QueueId::pool(&pool);
    // 20 requests nobody in the pool can take, then one it can.
    for n in 0..20 {
        sk.submit(&request("g", n), &pool_queue, false, &node("n1")).await.unwrap();
    }
    sk.submit(&request("f", 0), &pool_queue, false, &node("n1")).await.unwrap();
    sk.volunteer(&pool, &worker("n1/w0"), 1).await.unwrap();
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0, "budget 1: 20 entries looked at, not 21");
    assert_eq!(sk.distribute(&pool, 1).await.unwrap(), 0);
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 21, "what no member can take stays, in order");
    sk.volunteer(&pool, &worker("n1/w0"), 2).await.unwrap();
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 1, "budget 2: 24 entries looked at");
    // A member queue whose far end holds 1,000 stale entries: hoisting finds nothing.
    let busy = worker("n1/w1");
    sk.join_pool(&pool, &busy, &node("n1")).await.unwrap();
    let stale = request("f", 1_000);
    for _ in 0..1_001 {
        sk.submit(&stale, &busy, true, &node("n1")).await.unwrap();
    }
    assert_eq!(sk.claim(&busy, &node("n1"), 1).await.unwrap(), vec![stale.clone()]);
    sk.complete(&stale, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node("n1")).await.unwrap();
    sk.submit(&request("f", 1_001), &busy, true, &node("n1")).await.unwrap();
    sk.submit(&request("f", 1_002), &busy, true, &node("n1")).await.unwrap();
    assert_eq!(sk.queue_len(&busy).await.unwrap(), 1_002);
    assert_eq!(sk.hoist(&pool, 10).await.unwrap(), 0, "only the far 1,000 entries are looked at");
    assert_eq!(sk.claim(&busy, &node("n1"), 5).await.unwrap(), vec![request("f", 1_002), request("f", 1_001)]);
}

/// The order in which a removed node's work goes back (the trait's `deregister_node`): its
/// claims in id order to the front of their pool, then its queues by name, front to back,
/// to the back; requests of functions nobody serves any more fail instead.
async fn a_removed_node_gives_work_back_in_order(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool = PoolId::new("p");
    let pool_queue = QueueId::pool(&pool);
    sk.register_node(&node("n2"), &functions(&["f", "g"])).await.unwrap();
    let mut n1_events = sk.open_inbox(&node("n1")).await.unwrap();
    sk.join_pool(&pool, &worker("n2/w1"), &node("n2")).await.unwrap();
    sk.join_pool(&pool, &worker("n2/w0"), &node("n2")).await.unwrap();
    let mut claimed: Vec<Request> = (0..4).map(|n| request("f", n)).collect();
    for req in &claimed {
        sk.submit(req, &pool_queue, false, &node("n1")).await.unwrap();
    }
    assert_eq!(sk.claim(&pool_queue, &node("n2"), 4).await.unwrap(), claimed);
    let only_g = request("g", 0);
    sk.submit(&only_g, &worker("n2/w0"), true, &node("n1")).await.unwrap();
    for (queue, n) in [("n2/w1", 10), ("n2/w1", 11), ("n2/w0", 12), ("n2/w0", 13)] {
        sk.submit(&request("f", n), &worker(queue), false, &node("n1")).await.unwrap();
    }
    sk.submit(&request("f", 1), &pool_queue, false, &node("n1")).await.unwrap(); // joined
    sk.submit(&request("f", 99), &pool_queue, false, &node("n1")).await.unwrap();
    sk.deregister_node(&node("n2")).await.unwrap();
    let unknown = Err(CallError::UnknownFunction { function: "g".into() });
    assert_eq!(next_event(&mut n1_events).await, Event::Done { id: only_g.id, outcome: unknown });
    claimed.sort_by_key(|r| r.id);
    let mut expected: Vec<Request> = claimed.into_iter().rev().map(|r| after_lost(r, 1)).collect();
    expected.push(request("f", 99));
    expected.extend([12, 13, 10, 11].map(|n| request("f", n)));
    let back = sk.claim(&pool_queue, &node("n1"), 100).await.unwrap();
    assert_eq!(back, expected);
}

/// Removal is done in bounded steps and still completes within one call: more dead nodes
/// than one step takes, and a queue longer than one batch.
async fn reaping_many_nodes_and_long_queues_completes(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS * 3).await;
    let pool = PoolId::new("p");
    let pool_queue = QueueId::pool(&pool);
    let dead: Vec<NodeId> = (0..20).map(|i| node(&format!("d{i:02}"))).collect();
    for (i, d) in dead.iter().enumerate() {
        sk.register_node(d, &functions(&["f"])).await.unwrap();
        sk.join_pool(&pool, &worker(&format!("{d}/w0")), d).await.unwrap();
        sk.submit(&request("f", i as u32), &worker(&format!("{d}/w0")), false, &node("n1")).await.unwrap();
    }
    for n in 100..1_600 {
        sk.submit(&request("f", n), &worker("d00/w0"), false, &node("n1")).await.unwrap();
    }
    sk.heartbeat(&node("n1"), &NodeInfo::default()).await.unwrap();
    let begun = Instant::now();
    let mut reaped = Vec::new();
    while reaped.len() < dead.len() {
        assert!(begun.elapsed() < Duration::from_secs(10), "reaped only {reaped:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        sk.heartbeat(&node("n1"), &NodeInfo::default()).await.unwrap();
        reaped.extend(sk.reap().await.unwrap());
    }
    reaped.sort();
    assert_eq!(reaped, dead);
    assert_eq!(sk.queue_len(&pool_queue).await.unwrap(), 1_520, "every entry went back");
    assert_eq!(sk.live_nodes().await.unwrap().len(), 1);
}

/// A node whose lease ran out and that registers again before anyone reaped it starts
/// afresh: what its old self held goes back first.
async fn expired_node_registering_again(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    // n2 serves `f` too and stays alive, so `f`'s requests outlive n1's old self.
    sk.register_node(&node("n2"), &functions(&["f"])).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    sk.submit(&req, &pool_queue, false, &node("n1")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![req.clone()]);
    sk.submit(&request("f", 2), &worker("n1/w0"), false, &node("n1")).await.unwrap();
    let begun = Instant::now();
    loop {
        sk.heartbeat(&node("n2"), &NodeInfo::default()).await.unwrap();
        match sk.register_node(&node("n1"), &functions(&["f"])).await {
            Ok(()) => break,
            Err(StatekeeperError::DuplicateNode(_)) => {
                assert!(begun.elapsed() < Duration::from_secs(10), "the lease never ran out");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("register failed: {other}"),
        }
    }
    assert_eq!(sk.function_version("f").await.unwrap(), Some(1));
    assert_eq!(sk.queue_len(&worker("n1/w0")).await.unwrap(), 0, "its old queue was given back");
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 5).await.unwrap(), vec![after_lost(req, 1), request("f", 2)]);
    assert_eq!(sk.release_claims(&node("n1"), &[]).await.unwrap(), 2);
}

fn in_tree(function: &str, n: u32, tree: u64, depth: u32, requests_max: u64) -> Request {
    request(function, n).with_budget(Budget { tree, depth, depth_max: u32::MAX, requests_max })
}

/// Drains `events` until `want` matches one, within 10 s.
async fn event_matching(events: &mut futures::stream::BoxStream<'static, Event>, want: impl Fn(&Event) -> bool) {
    loop {
        if want(&next_event(events).await) {
            return;
        }
    }
}

async fn a_tree_past_its_budget_ends(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let mut events = sk.open_inbox(&node("n1")).await.unwrap();
    let own = worker("n1/w0");
    let tree = 0x5eed;
    assert_eq!(sk.submit(&in_tree("f", 0, tree, 0, 3), &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    for n in 1..3 {
        assert_eq!(sk.submit(&in_tree("f", n, tree, 1, 3), &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    }
    // Joins and memoized answers are free.
    assert_eq!(sk.submit(&in_tree("f", 1, tree, 1, 3), &own, true, &node("n1")).await.unwrap(), Submitted::Joined);
    let over = sk.submit(&in_tree("f", 3, tree, 1, 3), &own, true, &node("n1")).await.unwrap();
    assert_eq!(over, Submitted::TreeEnded(TreeEnd::OverBudget(3)));
    event_matching(
        &mut events,
        |e| matches!(e, Event::TreeEnded { tree: t, end: TreeEnd::OverBudget(3) } if *t == tree),
    )
    .await;
    // Nothing more of the tree is recorded, and what it queued is dropped, not claimed.
    let after = sk.submit(&in_tree("f", 9, tree, 1, 3), &own, true, &node("n1")).await.unwrap();
    assert_eq!(after, Submitted::TreeEnded(TreeEnd::OverBudget(3)));
    assert!(sk.claim(&own, &node("n1"), 10).await.unwrap().is_empty(), "requests of an ended tree are not claimed");
    event_matching(&mut events, |e| matches!(e, Event::Dropped { end: TreeEnd::OverBudget(3), .. })).await;
    // Another tree, and requests outside any tree, are not affected.
    assert_eq!(sk.submit(&in_tree("f", 0, 77, 0, 3), &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.submit(&request("f", 50), &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&own, &node("n1"), 10).await.unwrap().len(), 2);
}

async fn a_tree_is_cancelled_when_unwaited(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &[]).await.unwrap();
    let mut events = sk.open_inbox(&node("n1")).await.unwrap();
    let mut n2_events = sk.open_inbox(&node("n2")).await.unwrap();
    let own = worker("n1/w0");
    let tree = 0xca11;
    let root = in_tree("f", 0, tree, 0, 100);
    let child = in_tree("f", 1, tree, 1, 100);
    assert_eq!(sk.submit(&root, &own, false, &node("n2")).await.unwrap(), Submitted::Queued);
    let claimed = sk.claim(&own, &node("n1"), 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].budget, root.budget, "a claimed request keeps its tree");
    assert_eq!(sk.submit(&child, &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    // A second caller of the root, on n1: the first one leaving cancels nothing.
    assert_eq!(sk.submit(&root, &own, false, &node("n1")).await.unwrap(), Submitted::Joined);
    assert!(!sk.cancel_tree(&root.id, &node("n2")).await.unwrap());
    assert_eq!(sk.submit(&in_tree("f", 2, tree, 1, 100), &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    // Withdrawing from a request that is not a root cancels nothing either.
    assert!(!sk.cancel_tree(&child.id, &node("n1")).await.unwrap());
    assert_eq!(sk.submit(&in_tree("f", 3, tree, 1, 100), &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    // The last caller of the root leaves: the tree ends, every live node hears it.
    assert!(sk.cancel_tree(&root.id, &node("n1")).await.unwrap());
    for inbox in [&mut events, &mut n2_events] {
        event_matching(inbox, |e| matches!(e, Event::TreeEnded { tree: t, end: TreeEnd::Cancelled } if *t == tree))
            .await;
    }
    let refused = sk.submit(&in_tree("f", 4, tree, 1, 100), &own, true, &node("n1")).await.unwrap();
    assert_eq!(refused, Submitted::TreeEnded(TreeEnd::Cancelled));
    assert!(sk.claim(&own, &node("n1"), 10).await.unwrap().is_empty(), "its queued requests are dropped");
    // A cancelled request is not memoized: submitted again in a live tree, it is new.
    let again = in_tree("f", 2, 0xfeed, 0, 100);
    assert_eq!(sk.submit(&again, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
}

async fn another_tree_adopts_what_it_joined(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let mut events = sk.open_inbox(&node("n1")).await.unwrap();
    let own = worker("n1/w0");
    let (tree, other) = (0xab1, 0xab2);
    let root = in_tree("f", 0, tree, 0, 100);
    let (running, queued, alone) =
        (in_tree("f", 1, tree, 1, 100), in_tree("f", 2, tree, 1, 100), in_tree("f", 3, tree, 1, 100));
    assert_eq!(sk.submit(&root, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&own, &node("n1"), 1).await.unwrap().len(), 1);
    for child in [&running, &queued, &alone] {
        assert_eq!(sk.submit(child, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    }
    let claimed_running = sk.claim(&own, &node("n1"), 1).await.unwrap().remove(0);
    assert_eq!(claimed_running.id, running.id);
    // A caller of another tree joins two of the tree's requests: one running, one queued.
    for child in [&running, &queued] {
        let joining = child.clone().with_budget(Budget { tree: other, ..child.budget });
        assert_eq!(sk.submit(&joining, &own, false, &node("n2")).await.unwrap(), Submitted::Joined);
    }
    assert!(sk.cancel_tree(&root.id, &node("n1")).await.unwrap());
    // Both are adopted (every node hears it before the tree's end); the third is not.
    let mut adopted = Vec::new();
    loop {
        match next_event(&mut events).await {
            Event::Adopted { id, from, tree: to } => {
                assert_eq!((from, to), (tree, other));
                adopted.push(id);
            }
            Event::TreeEnded { tree: t, .. } if t == tree => break,
            _ => {}
        }
    }
    assert!(adopted.len() == 2 && adopted.contains(&running.id) && adopted.contains(&queued.id), "{adopted:?}");
    // The queued one is claimed in its new tree; the one nobody else joined is dropped.
    let claimed = sk.claim(&own, &node("n1"), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![queued.id]);
    // The running one completes for its adopter as usual.
    sk.complete(&claimed_running, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node("n1")).await.unwrap();
    let done = sk.submit(&running, &own, false, &node("n1")).await.unwrap();
    assert_eq!(done, Submitted::Done(Ok(Bytes::from_static(b"v"))), "its value is memoized");
}

async fn a_tree_whose_root_caller_died_ends(factory: Factory) {
    let sk = one_node(&factory, 1_000).await;
    sk.register_node(&node("caller"), &[]).await.unwrap();
    let own = worker("n1/w0");
    let tree = 0xdead;
    let root = in_tree("f", 0, tree, 0, 100);
    assert_eq!(sk.submit(&root, &own, false, &node("caller")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&own, &node("n1"), 1).await.unwrap().len(), 1);
    // The caller's node stops heartbeating; n1 keeps its lease and reaps (as nodes do).
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 1.. {
        assert!(sk.heartbeat(&node("n1"), &NodeInfo::default()).await.unwrap());
        assert_eq!(
            sk.submit(&in_tree("f", n, tree, 1, 100), &own, true, &node("n1")).await.unwrap(),
            Submitted::Queued
        );
        let reaped = sk.reap().await.unwrap();
        if reaped.contains(&node("caller")) {
            break;
        }
        assert!(Instant::now() < deadline, "the caller is reaped within its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once it is gone, its tree's queued requests are dropped, not claimed, and the tree
    // takes nothing more.
    assert!(sk.claim(&own, &node("n1"), 100).await.unwrap().is_empty(), "nothing of it runs any more");
    let late = sk.submit(&in_tree("f", 0, tree, 1, 100), &own, true, &node("n1")).await.unwrap();
    assert_eq!(late, Submitted::TreeEnded(TreeEnd::Cancelled));
}

async fn claims_drop_a_bounded_number(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let own = worker("n1/w0");
    let tree = 0xb0b;
    let count = CLAIM_DROP_MAX as u32 + 10;
    assert_eq!(
        sk.submit(&in_tree("f", 0, tree, 0, u64::MAX), &own, false, &node("n1")).await.unwrap(),
        Submitted::Queued
    );
    for n in 1..count {
        let submitted = sk.submit(&in_tree("f", n, tree, 1, u64::MAX), &own, false, &node("n1")).await.unwrap();
        assert_eq!(submitted, Submitted::Queued);
    }
    let live = request("f", 999_999);
    assert_eq!(sk.submit(&live, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert!(sk.cancel_tree(&in_tree("f", 0, tree, 0, 0).id, &node("n1")).await.unwrap());
    // The first claim drops at most CLAIM_DROP_MAX; the next ones reach the live request.
    let first = sk.claim(&own, &node("n1"), 1).await.unwrap();
    assert!(first.is_empty(), "one claim drops a bounded number of ended requests");
    assert_eq!(sk.queue_len(&own).await.unwrap(), 11);
    let second = sk.claim(&own, &node("n1"), 1).await.unwrap();
    assert_eq!(second.iter().map(|r| r.id).collect::<Vec<_>>(), vec![live.id]);
}

async fn a_finished_root_ends_its_tree(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let own = worker("n1/w0");
    let tree = 0xd0e;
    let root = in_tree("f", 0, tree, 0, 100);
    assert_eq!(sk.submit(&root, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&own, &node("n1"), 1).await.unwrap().len(), 1);
    let straggler = in_tree("f", 1, tree, 1, 100);
    assert_eq!(sk.submit(&straggler, &own, true, &node("n1")).await.unwrap(), Submitted::Queued);
    sk.complete(&root, &Ok(Bytes::from_static(b"done")), Memo::Keep, &node("n1")).await.unwrap();
    // Nothing of the tree is needed any more: its stragglers are dropped, it takes no more.
    assert!(sk.claim(&own, &node("n1"), 10).await.unwrap().is_empty());
    let late = sk.submit(&in_tree("f", 2, tree, 1, 100), &own, true, &node("n1")).await.unwrap();
    assert_eq!(late, Submitted::TreeEnded(TreeEnd::Cancelled));
    // A tree of one request leaves nothing behind: the same tree id starts afresh.
    let single = in_tree("f", 3, 0x51, 0, 1);
    assert_eq!(sk.submit(&single, &own, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&own, &node("n1"), 1).await.unwrap().len(), 1);
    sk.complete(&single, &Ok(Bytes::from_static(b"1")), Memo::Keep, &node("n1")).await.unwrap();
    let again = in_tree("f", 4, 0x51, 0, 1);
    assert_eq!(
        sk.submit(&again, &own, false, &node("n1")).await.unwrap(),
        Submitted::Queued,
        "its count was forgotten"
    );
}

/// A request's `lost` count grows each time a node holding its claim is lost (removed or
/// reaped), not when a node gives a claim back, and starts from zero for a new submission.
async fn lost_claims_are_counted_each_time(factory: Factory) {
    let sk = one_node(&factory, SHORT_TTL_MS).await;
    for name in ["n2", "n3"] {
        sk.register_node(&node(name), &functions(&["f"])).await.unwrap();
    }
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let req = request("f", 1);
    let beat = |names: &'static [&'static str]| {
        let sk = sk.clone();
        async move {
            for name in names {
                sk.heartbeat(&node(name), &NodeInfo::default()).await.unwrap();
            }
        }
    };
    sk.submit(&req, &pool_queue, false, &node("n3")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![req.clone()]);
    assert_eq!(sk.release_claims(&node("n1"), &[]).await.unwrap(), 1);
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![req.clone()], "a release is no loss");
    sk.deregister_node(&node("n1")).await.unwrap();
    beat(&["n2", "n3"]).await;
    assert_eq!(sk.claim(&pool_queue, &node("n2"), 1).await.unwrap(), vec![after_lost(req.clone(), 1)]);
    // n2 stops heartbeating while it holds the claim: reaped, a second loss.
    reap_until(&sk, &node("n2"), &[node("n3")]).await;
    assert_eq!(sk.claim(&pool_queue, &node("n3"), 1).await.unwrap(), vec![after_lost(req.clone(), 2)]);
    let failed = Err(CallError::Panic { function: "f".into(), message: "gave up".into() });
    sk.complete(&req, &failed, Memo::Skip, &node("n3")).await.unwrap();
    beat(&["n3"]).await;
    sk.submit(&req, &pool_queue, false, &node("n3")).await.unwrap();
    assert_eq!(sk.claim(&pool_queue, &node("n3"), 1).await.unwrap(), vec![req], "a new submission starts afresh");
}

fn ids(requests: &[Request]) -> Vec<crate::id::ReqId> {
    requests.iter().map(|r| r.id).collect()
}

/// Submits, claims and completes `req` on `n1` with `memo`.
async fn evaluated(sk: &Arc<dyn Statekeeper>, req: &Request, memo: Memo) {
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    assert_eq!(sk.submit(req, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued);
    let claimed = sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    assert_eq!(ids(&claimed), vec![req.id]);
    let value = Ok(Bytes::from(format!("{:?}", req.args)));
    assert!(sk.complete(&claimed[0], &value, memo, &node("n1")).await.unwrap());
}

async fn memoized_outcomes_expire_after_their_ttl(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let (short, kept, never) = (request("f", 1), request("f", 2), request("f", 3));
    let begun = Instant::now();
    evaluated(&sk, &short, Memo::For(200)).await;
    evaluated(&sk, &kept, Memo::Keep).await;
    evaluated(&sk, &never, Memo::For(0)).await;
    assert!(sk.result(&short.id).await.unwrap().is_some());
    assert_eq!(sk.result(&never.id).await.unwrap(), None, "a ttl of 0 memoizes nothing");
    while sk.result(&short.id).await.unwrap().is_some() {
        assert!(begun.elapsed() < Duration::from_secs(5), "a 200 ms ttl never ran out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(begun.elapsed() >= Duration::from_millis(190), "gone after {:?}, before its ttl", begun.elapsed());
    assert!(sk.result(&kept.id).await.unwrap().is_some(), "the store's own ttl is longer");
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    assert_eq!(sk.submit(&short, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued, "runs again");
}

async fn forget_drops_one_outcome(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let (a, b) = (request("f", 1), request("f", 2));
    evaluated(&sk, &a, Memo::Keep).await;
    evaluated(&sk, &b, Memo::Keep).await;
    assert!(sk.forget(&a).await.unwrap(), "a was memoized");
    assert_eq!(sk.result(&a.id).await.unwrap(), None);
    assert!(sk.result(&b.id).await.unwrap().is_some(), "b stays");
    assert!(!sk.forget(&a).await.unwrap(), "nothing left to forget");
    // An evaluation in flight when its result is forgotten: its callers get the value, the
    // memo does not.
    assert_eq!(sk.submit(&a, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(ids(&sk.claim(&pool_queue, &node("n1"), 1).await.unwrap()), vec![a.id]);
    assert!(!sk.forget(&a).await.unwrap());
    assert!(sk.complete(&a, &Ok(Bytes::from_static(b"late")), Memo::Keep, &node("n1")).await.unwrap());
    assert_eq!(sk.result(&a.id).await.unwrap(), None, "a completion that raced the forget memoizes nothing");
    // A completion of a request no longer in flight (a duplicate: it was claimed again
    // elsewhere and completed there) memoizes only if nothing was forgotten since its claim.
    let c = request("f", 3);
    sk.submit(&c, &pool_queue, false, &node("n1")).await.unwrap();
    let claimed = sk.claim(&pool_queue, &node("n1"), 1).await.unwrap();
    let panic = Err(CallError::Panic { function: "f".into(), message: "boom".into() });
    sk.complete(&claimed[0], &panic, Memo::Skip, &node("n1")).await.unwrap();
    let late = Ok(Bytes::from_static(b"late"));
    assert!(!sk.complete(&claimed[0], &late, Memo::Keep, &node("n1")).await.unwrap());
    assert_eq!(sk.result(&c.id).await.unwrap(), Some(late.clone()), "nothing was forgotten since its claim");
    assert!(sk.forget(&c).await.unwrap());
    sk.complete(&claimed[0], &late, Memo::Keep, &node("n1")).await.unwrap();
    assert_eq!(sk.result(&c.id).await.unwrap(), None, "a forget since its claim: not memoized");
    // The next evaluation is memoized as usual.
    evaluated(&sk, &a, Memo::Keep).await;
    assert!(sk.result(&a.id).await.unwrap().is_some());
}

async fn forget_all_drops_a_function_version(factory: Factory) {
    let sk = one_node(&factory, LONG_TTL_MS).await;
    sk.register_node(&node("n2"), &functions(&["g"])).await.unwrap();
    let pool_queue = QueueId::pool(&PoolId::new("p"));
    let count = FORGET_BATCH_MAX as u32 + 200;
    let many: Vec<Request> = (0..count).map(|n| request("f", n)).collect();
    for req in &many {
        sk.submit(req, &pool_queue, false, &node("n1")).await.unwrap();
    }
    assert_eq!(sk.claim(&pool_queue, &node("n1"), many.len()).await.unwrap().len(), many.len());
    for req in &many {
        sk.complete(req, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node("n1")).await.unwrap();
    }
    let other_version = Request::new("f", 2, Bytes::from_static(b"x"));
    let other_function = request("g", 0);
    evaluated(&sk, &other_version, Memo::Keep).await;
    evaluated(&sk, &other_function, Memo::Keep).await;
    let in_flight = request("f", count);
    assert_eq!(sk.submit(&in_flight, &pool_queue, false, &node("n1")).await.unwrap(), Submitted::Queued);
    assert_eq!(sk.claim(&pool_queue, &node("n1"), 1).await.unwrap(), vec![in_flight.clone()]);
    assert_eq!(sk.forget_all("f", 1).await.unwrap(), u64::from(count), "in more than one batch");
    for req in [&many[0], &many[many.len() / 2], &many[many.len() - 1]] {
        assert_eq!(sk.result(&req.id).await.unwrap(), None);
    }
    assert!(sk.result(&other_version.id).await.unwrap().is_some(), "another version stays");
    assert!(sk.result(&other_function.id).await.unwrap().is_some(), "another function stays");
    assert!(sk.complete(&in_flight, &Ok(Bytes::from_static(b"late")), Memo::Keep, &node("n1")).await.unwrap());
    assert_eq!(sk.result(&in_flight.id).await.unwrap(), None, "an evaluation in flight memoizes nothing");
    evaluated(&sk, &many[0], Memo::Keep).await;
    assert!(sk.result(&many[0].id).await.unwrap().is_some(), "later evaluations are memoized again");
    assert_eq!(sk.forget_all("f", 1).await.unwrap(), 1);
    assert_eq!(sk.forget_all("f", 1).await.unwrap(), 0);
}
