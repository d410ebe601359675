//! The pool roles a node runs besides its workers: distributors, helpers, and the inbox.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::core::NodeCore;
use crate::control::{Event, PoolId, QueueId};

/// Longest a distributor waits without a signal before it looks at its queue again.
const DISTRIBUTOR_RECHECK_MS: u64 = 1_000;
/// Most requests one distributor round hands off, so one round stays short.
const DISTRIBUTE_BATCH_MAX: usize = 1_024;

/// Hands the queued work of `pool` to its volunteers whenever work or volunteers arrive.
pub(crate) async fn distributor(core: Arc<NodeCore>, pool: PoolId) {
    let queue = QueueId::pool(&pool);
    loop {
        match core.statekeeper.distribute(&pool, DISTRIBUTE_BATCH_MAX).await {
            Ok(moved) if moved == DISTRIBUTE_BATCH_MAX => continue,
            Ok(_) => {}
            Err(err) => tracing::warn!(pool = %pool, error = %err, "distribution failed; retrying"),
        }
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.statekeeper.wait_work(&queue, DISTRIBUTOR_RECHECK_MS) => {}
        }
    }
}

/// Longest a helper waits between rounds while rounds find nothing to hoist.
const HELPER_IDLE_MS_MAX: u64 = 200;
/// Shortest time between two helper rounds started by idle workers.
const HELPER_WAKE_GAP_MS: u64 = 20;

/// Copies surplus queued work of busy members of `pool` up to the pool's queue, where idle
/// members can take it before the busy member reaches it. Rounds run every `interval`
/// while they find work to hoist, back off to [`HELPER_IDLE_MS_MAX`] while they find none,
/// and run soon when a worker of this node goes idle or backs up.
pub(crate) async fn helper(core: Arc<NodeCore>, pool: PoolId, interval: Duration, hoist_max: usize) {
    let idle_max = Duration::from_millis(HELPER_IDLE_MS_MAX).max(interval);
    let wake_gap = Duration::from_millis(HELPER_WAKE_GAP_MS);
    let mut wait = interval;
    let mut last_round = tokio::time::Instant::now();
    loop {
        let woken = tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => false,
            _ = core.work.hoist_hint.notified() => true,
        };
        // Idle workers come and go with every request under load: answer them at most
        // once per gap, so hoisting does not cost a statekeeper step per request.
        if woken && last_round.elapsed() < wake_gap {
            tokio::select! {
                _ = core.cancel.cancelled() => break,
                _ = tokio::time::sleep_until(last_round + wake_gap) => {}
            }
        }
        last_round = tokio::time::Instant::now();
        match core.statekeeper.hoist(&pool, hoist_max).await {
            Ok(0) => wait = (wait * 2).min(idle_max),
            Ok(hoisted) => {
                tracing::trace!(pool = %pool, hoisted, "helper hoisted work");
                wait = interval;
            }
            Err(err) => {
                tracing::warn!(pool = %pool, error = %err, "hoisting failed; retrying");
                wait = idle_max;
            }
        }
    }
}

/// Delivers the events addressed to this node to the callers waiting here.
pub(crate) async fn inbox(core: Arc<NodeCore>, mut events: futures::stream::BoxStream<'static, Event>) {
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            event = events.next() => match event {
                Some(Event::Done { id, outcome }) => core.calls.waiters.deliver(&id, &outcome),
                Some(Event::Dropped { id, end }) => core.calls.waiters.deliver_dropped(&id, end),
                Some(Event::Adopted { id, from, tree }) => core.work.trees.adopt(id, from, tree),
                Some(Event::TreeEnded { tree, end }) => core.work.trees.end(tree, end),
                None => break,
            },
        }
    }
}
