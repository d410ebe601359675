//! The node's upkeep: the tasks that keep its lease, its view of the grid and its callers'
//! requests alive.
//!
//! Each runs on its own, so none can delay another, and above all none can delay the
//! lease: the lease task awaits nothing but the heartbeat (bounded by a timeout shorter
//! than the lease) and, when the statekeeper forgot the node, registering again. Every
//! other task runs in rounds with a budget; a round over its budget is abandoned and a
//! round that panics is logged, and the task goes on with its next round.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;

use super::core::NodeCore;
use crate::lease::LocalLease;

/// Round trips to the other nodes are measured every this many heartbeats.
const RTT_EVERY_BEATS: u32 = 20;
/// Most requests one resubmission round submits again.
const RESUBMIT_BATCH_MAX: usize = 10_000;
/// Resubmissions in flight at once.
const RESUBMIT_CONCURRENCY: usize = 32;

/// How often each task runs and how long its heartbeat and its rounds may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) heartbeat: Duration,
    pub(crate) node_ttl: Duration,
    pub(crate) resubmit_after: Duration,
    /// How often the store's owners compare digests, when the node runs a store.
    pub(crate) anti_entropy: Option<Duration>,
}

impl Timing {
    /// A heartbeat that has not answered in half the lease is given up, so the next one
    /// still has time to renew it.
    fn heartbeat_timeout(&self) -> Duration {
        (self.node_ttl / 2).max(Duration::from_millis(10))
    }
}

/// Starts every upkeep task of `core`.
pub(crate) fn spawn(core: &Arc<NodeCore>, timing: Timing) -> Vec<JoinHandle<()>> {
    let handle = &core.handle;
    let beat = timing.heartbeat;
    let mut tasks = vec![handle.spawn(lease(core.clone(), timing))];
    let rounds: [(&'static str, Duration, Duration, Round); 5] = [
        ("report", beat, beat, |core| Box::pin(report(core))),
        ("reap", beat, timing.node_ttl, |core| Box::pin(reap(core))),
        ("config", beat, beat * 2, |core| Box::pin(async move { core.apply_config().await })),
        ("placement", beat, timing.node_ttl, |core| Box::pin(refresh_placement(core))),
        ("probes", beat * RTT_EVERY_BEATS, beat * RTT_EVERY_BEATS, |core| {
            Box::pin(async move { core.membership.placement.measure_rtts().await })
        }),
    ];
    for (name, every, budget, round) in rounds {
        tasks.push(handle.spawn(in_rounds(core.clone(), name, every, budget, round)));
    }
    tasks.push(handle.spawn(resubmit(core.clone(), timing)));
    if let Some(every) = timing.anti_entropy {
        let follow: Round = |core| {
            Box::pin(async move {
                if let Some(farm) = core.membership.farm.get() {
                    farm.node.follow().await;
                }
            })
        };
        let compare: Round = |core| {
            Box::pin(async move {
                if let Some(farm) = core.membership.farm.get() {
                    farm.node.anti_entropy().await;
                }
            })
        };
        tasks.push(handle.spawn(in_rounds(core.clone(), "store", beat / 2, timing.node_ttl, follow)));
        tasks.push(handle.spawn(in_rounds(core.clone(), "anti-entropy", every, every * 4, compare)));
    }
    tasks
}

/// One round of an upkeep task.
type Round = fn(Arc<NodeCore>) -> BoxFuture<'static, ()>;

/// Runs `round` every `every`, each within `budget`, until the node stops.
async fn in_rounds(core: Arc<NodeCore>, name: &'static str, every: Duration, budget: Duration, round: Round) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let running = AssertUnwindSafe(round(core.clone())).catch_unwind();
        match tokio::time::timeout(budget, running).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!(node = %core.id, task = name, "an upkeep round panicked; next round goes on"),
            Err(_) => tracing::warn!(node = %core.id, task = name, budget_ms = budget.as_millis() as u64,
                "an upkeep round ran over its budget and was abandoned"),
        }
    }
}

/// Renews the node's lease every heartbeat with what it reports about itself, and
/// registers it again when the statekeeper forgot it.
async fn lease(core: Arc<NodeCore>, timing: Timing) {
    let mut ticker = tokio::time::interval(timing.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let info = core.info();
        let sent = Instant::now();
        let renewed = match tokio::time::timeout(
            timing.heartbeat_timeout(),
            core.statekeeper.heartbeat(&core.id, &info),
        )
        .await
        {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                tracing::warn!(node = %core.id, "the statekeeper does not know this node any more; registering again");
                match tokio::time::timeout(timing.heartbeat_timeout(), core.rejoin()).await {
                    Ok(Ok(())) => {
                        *core.membership.lease.lock() = Arc::new(LocalLease::new(timing.node_ttl, sent));
                        core.membership.rejoins.fetch_add(1, Ordering::AcqRel);
                        Ok(())
                    }
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("registering again timed out".to_owned()),
                }
            }
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {} ms", timing.heartbeat_timeout().as_millis())),
        };
        match renewed {
            Ok(()) => {
                let lapsed = !core.membership.lease.lock().is_held();
                core.membership.lease.lock().renewed(sent);
                core.membership.beats.fetch_add(1, Ordering::AcqRel);
                if failing || lapsed {
                    tracing::info!(node = %core.id, "heartbeat renewed again");
                    failing = false;
                }
                if lapsed {
                    // A lapsed lease stays lost: hold a fresh one, and let the workers,
                    // which stopped claiming meanwhile, claim again.
                    *core.membership.lease.lock() = Arc::new(LocalLease::new(timing.node_ttl, sent));
                    core.work.workers.iter().for_each(|w| w.slot_freed.notify_one());
                }
            }
            Err(message) => {
                if !failing {
                    tracing::error!(node = %core.id, error = %message, "heartbeat failed; the node keeps running and retries");
                }
                failing = true;
            }
        }
    }
}

/// Reads the lengths of the workers' queues, which heartbeats report.
async fn report(core: Arc<NodeCore>) {
    for worker in &core.work.workers {
        if let Ok(len) = core.statekeeper.queue_len(&worker.queue).await {
            worker.queue_len_seen.store(len as u64, Ordering::Relaxed);
        }
    }
}

/// Declares dead the nodes whose lease ran out, so their work runs elsewhere.
async fn reap(core: Arc<NodeCore>) {
    if let Err(err) = core.statekeeper.reap().await {
        tracing::debug!(error = %err, "reaping failed");
    }
}

/// Keeps the placement table in step with the live nodes.
async fn refresh_placement(core: Arc<NodeCore>) {
    if let Err(err) = core.membership.placement.refresh(core.statekeeper.node_ttl_ms()).await {
        tracing::debug!(error = %err, "placement refresh failed");
    }
}

/// Submits again the requests the node's callers wait on: all of them once the node
/// heartbeats again after a disruption of the statekeeper connection (a broken connection
/// may have swallowed a claim, a submission or a notification) or after it had to register
/// again (it was frozen past its lease: what it claimed went elsewhere, and notifications
/// to it may be gone), and those waited on for longer than `resubmit_after` regardless.
async fn resubmit(core: Arc<NodeCore>, timing: Timing) {
    let mut ticker = tokio::time::interval(timing.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept_disruptions = core.statekeeper.disruptions();
    let mut swept_rejoins = core.membership.rejoins.load(Ordering::Acquire);
    // Set while a disruption waits for a heartbeat after it: sweeping before the node is
    // registered again would submit into pools the statekeeper may not know yet.
    let mut pending_since_beat: Option<u64> = None;
    let mut swept_at = Instant::now();
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let disruptions = core.statekeeper.disruptions();
        let rejoins = core.membership.rejoins.load(Ordering::Acquire);
        if disruptions != swept_disruptions || rejoins != swept_rejoins {
            swept_disruptions = disruptions;
            swept_rejoins = rejoins;
            // What the statekeeper holds for us that we do not run goes back (see
            // `release_claims`).
            core.work.claims_uncertain.store(true, Ordering::Release);
            pending_since_beat = Some(core.membership.beats.load(Ordering::Acquire));
        }
        let age = match pending_since_beat {
            Some(beat) if core.membership.beats.load(Ordering::Acquire) > beat => {
                pending_since_beat = None;
                Duration::ZERO
            }
            Some(_) => continue,
            None if swept_at.elapsed() >= timing.resubmit_after => timing.resubmit_after,
            None => continue,
        };
        swept_at = Instant::now();
        let overdue = core.calls.waiters.overdue(age, RESUBMIT_BATCH_MAX);
        core.calls.counters.resubmitted.fetch_add(overdue.len() as u64, Ordering::Relaxed);
        futures::stream::iter(overdue)
            .for_each_concurrent(RESUBMIT_CONCURRENCY, |submission| {
                let core = core.clone();
                async move { core.submit(&submission).await }
            })
            .await;
    }
}
