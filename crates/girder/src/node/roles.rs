//! The pool roles a node runs besides its workers: distributors, helpers, and the inbox.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::core::NodeCore;
use crate::statekeeper::{Event, PoolId, QueueId};

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
            _ = core.hoist_hint.notified() => true,
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
                Some(Event::Done { id, outcome }) => core.waiters.deliver(&id, &outcome),
                None => break,
            },
        }
    }
}

/// Round trips to the other nodes are measured every this many heartbeats.
const RTT_EVERY_BEATS: u64 = 20;

/// Most requests one resubmission round submits again.
const RESUBMIT_BATCH_MAX: usize = 10_000;

/// Keeps this node's lease alive, reports its state, declares dead nodes dead, and submits
/// again the requests its callers wait on: all of them once the statekeeper is reachable
/// after a disruption (a broken connection may have swallowed a claim or a notification),
/// and those waited on for longer than `resubmit_after` from time to time regardless.
pub(crate) async fn membership(core: Arc<NodeCore>, heartbeat: Duration, resubmit_after: Duration) {
    // A disruption seen while a submission was on its way is caught by the next sweep: the
    // failed operation counts as a disruption too.
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut swept_disruptions = core.statekeeper.disruptions();
    let mut beats: u64 = 0;
    let mut swept_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let mut info = super::node_info(&core);
        for (worker, reported) in core.workers.iter().zip(info.workers.iter_mut()) {
            reported.queue_len = core.statekeeper.queue_len(&worker.queue).await.unwrap_or(0) as u64;
        }
        let result = match core.statekeeper.heartbeat(&core.id, &info).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(node = %core.id, "the statekeeper does not know this node any more; registering again");
                core.rejoin().await
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(()) if failing => {
                tracing::info!(node = %core.id, "statekeeper reachable again");
                failing = false;
            }
            Ok(()) => {}
            Err(err) => {
                if !failing {
                    tracing::error!(node = %core.id, error = %err, "heartbeat failed; the node keeps running and retries");
                }
                failing = true;
                continue;
            }
        }
        core.apply_config().await;
        if let Err(err) = core.statekeeper.reap().await {
            tracing::debug!(error = %err, "reaping failed");
        }
        if let Err(err) = core.placement.refresh(core.statekeeper.node_ttl_ms()).await {
            tracing::debug!(error = %err, "placement refresh failed");
        }
        beats += 1;
        if beats % RTT_EVERY_BEATS == 1 {
            core.placement.measure_rtts().await;
        }
        let disruptions = core.statekeeper.disruptions();
        if disruptions != swept_disruptions {
            swept_disruptions = disruptions;
            // A broken connection may have swallowed a claim or a pushed hand-off: what the
            // statekeeper holds for us that we do not run goes back (see `release_claims`).
            core.claims_uncertain.store(true, std::sync::atomic::Ordering::Release);
            swept_at = std::time::Instant::now();
            core.resubmit_overdue(Duration::ZERO, RESUBMIT_BATCH_MAX).await;
        } else if swept_at.elapsed() >= resubmit_after {
            swept_at = std::time::Instant::now();
            core.resubmit_overdue(resubmit_after, RESUBMIT_BATCH_MAX).await;
        }
    }
}
