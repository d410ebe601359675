//! Forwarders: each copies one subscribed reliable topic into the mailboxes of the
//! instances its messages route to, tagged with the topic and the message's sequence id.
//!
//! A forwarder runs on the primary of its subscription's flock, from a cursor
//! (`wf/fwd/{type}/{topic}`) it moves after each batch. A forwarder that restarts, or two
//! that overlap while ownership moves, forward some messages twice; each copy carries the
//! same (source, sequence id), so the instance handles the first and skips the rest. Each
//! forwarder copies in topic order and starts at or below what the last one copied, so the
//! first copy of every message reaches its instance after the first copies of those before
//! it: order per source holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::retry::Backoff;
use crate::structures::Store;

use super::runtime::{cursor, move_cursor, READ_BATCH_MAX, READ_WAIT_MS};
use super::{check_name, post, topic_source, Envelope, Subscription, WorkflowError, STATE_BYTES_MAX};

/// The cursor of a subscription; also what places its forwarder.
pub(crate) fn cursor_key(subscription: &Subscription) -> String {
    format!("wf/fwd/{}/{}", subscription.workflow, subscription.topic)
}

/// Runs a subscription's forwarder until aborted, starting over after failures.
pub(crate) async fn run(store: Store, subscription: Subscription, forwarded: Arc<AtomicU64>, lag: Arc<AtomicU64>) {
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(2));
    loop {
        if let Err(err) = forward(&store, &subscription, &forwarded, &lag).await {
            tracing::warn!(topic = %subscription.topic, workflow = %subscription.workflow, error = %err,
                "workflow: forwarding a topic failed, retrying");
            tokio::time::sleep(backoff.failed()).await;
        }
    }
}

async fn forward(
    store: &Store,
    subscription: &Subscription,
    forwarded: &AtomicU64,
    lag: &AtomicU64,
) -> Result<(), WorkflowError> {
    let key = cursor_key(subscription);
    let source = topic_source(&subscription.topic);
    let mut after = cursor(store, &key).await?;
    let mut moved = after;
    loop {
        let batch = store.reliable_read(&subscription.topic, after, READ_BATCH_MAX, 0).await?;
        lag.store(batch.last.saturating_sub(after), Ordering::Relaxed);
        if batch.messages.is_empty() {
            store.wait_change(&subscription.topic, READ_WAIT_MS).await;
            continue;
        }
        if batch.first_retained > after + 1 {
            tracing::error!(topic = %subscription.topic, after, first = batch.first_retained,
                "workflow: topic messages were trimmed before they were forwarded");
        }
        for (seq, bytes) in batch.messages {
            after = seq;
            let id = (subscription.route)(&bytes).filter(|id| check_name("workflow id", id).is_ok());
            let Some(id) = id.filter(|_| bytes.len() <= STATE_BYTES_MAX) else {
                tracing::warn!(topic = %subscription.topic, seq, "workflow: a topic message routes to no instance, skipped");
                continue;
            };
            let origin = Some((source.clone(), seq));
            post(store, Envelope { workflow: subscription.workflow.clone(), id, message: bytes.to_vec(), origin })
                .await?;
            forwarded.fetch_add(1, Ordering::Relaxed);
        }
        move_cursor(store, &key, moved, after).await?;
        moved = after;
    }
}
