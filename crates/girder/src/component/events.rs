//! Cluster lifecycle events: nodes joining, leaving and dying, components starting,
//! stopping and moving, on the reliable topic [`EVENTS_TOPIC`] (read it from any position;
//! it keeps the last [`EVENTS_KEPT`]).
//!
//! Component events come from the node they happen on. Node events come from the
//! cluster watch, a singleton every [`super::ComponentSystem`] runs: it compares the live
//! nodes with the last membership it recorded (the atom `girder/members`, so the next
//! holder goes on from there) and reports the difference. A node gone is said to have
//! left when it was seen draining or said so when its system shut down, and to have died
//! otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Component, Context, Placement};
use crate::control::Health;
use crate::structures::{DsError, Kind, Retention, Store};

/// The topic lifecycle events go to.
pub const EVENTS_TOPIC: &str = "girder/events";
/// Events the topic keeps.
pub const EVENTS_KEPT: u64 = 10_000;
/// Events one read returns at most.
pub const EVENTS_READ_MAX: usize = 1_000;
/// The cluster watch's name (a singleton of every system).
pub const WATCH: &str = "girder/cluster-watch";
/// How often the cluster watch looks at the membership.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Where the cluster watch records the membership it last reported.
const MEMBERS_KEY: &str = "girder/members";

/// Something that happened to a node or a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Lifecycle {
    /// A node joined the grid.
    NodeJoined {
        /// The node.
        node: String,
    },
    /// A node left after draining.
    NodeLeft {
        /// The node.
        node: String,
    },
    /// A node's lease ran out (killed, paused or cut off).
    NodeDied {
        /// The node.
        node: String,
    },
    /// A component started on a node.
    ComponentStarted {
        /// The component.
        component: String,
        /// The node.
        node: String,
    },
    /// A component stopped on a node.
    ComponentStopped {
        /// The component.
        component: String,
        /// The node.
        node: String,
        /// Why: `shutdown`, `lease lost`, or the stop's error.
        reason: String,
    },
    /// A singleton started on a node other than the one it last ran on.
    ComponentMoved {
        /// The component.
        component: String,
        /// Where it ran before.
        from: String,
        /// Where it runs now.
        to: String,
    },
}

/// Publishes `event` (best effort: a failure is logged, the event lost).
pub(crate) async fn publish(store: &Store, event: &Lifecycle) {
    let retention = Retention { count_max: EVENTS_KEPT, age_ms_max: None };
    let bytes = match serde_json::to_vec(event) {
        Ok(bytes) => bytes,
        Err(err) => return tracing::warn!(error = %err, "components: an event did not encode"),
    };
    if let Err(err) = store.reliable_publish(EVENTS_TOPIC, &bytes, retention).await {
        tracing::warn!(error = %err, ?event, "components: publishing an event failed");
    }
}

/// The events after sequence id `after` (at most `max`, capped at [`EVENTS_READ_MAX`]),
/// waiting up to `wait_ms` for one when there is none yet.
pub async fn read(store: &Store, after: u64, max: usize, wait_ms: u64) -> Result<Vec<(u64, Lifecycle)>, DsError> {
    let batch = store.reliable_read(EVENTS_TOPIC, after, max.clamp(1, EVENTS_READ_MAX), wait_ms).await?;
    Ok(batch
        .messages
        .into_iter()
        .filter_map(|(seq, bytes)| Some((seq, serde_json::from_slice(&bytes).ok()?)))
        .collect())
}

/// The cluster watch: reports nodes joining, leaving and dying.
pub(crate) struct Watch {
    pub(crate) placement: Arc<crate::placement::Placement>,
    pub(crate) task: super::TaskSlot,
}

/// Where a node says it leaves (for a minute), so the watch tells its going from a death.
pub(crate) fn leaving_key(node: &str) -> String {
    format!("girder/leaving/{node}")
}

/// How long a node's word that it leaves is kept.
pub(crate) const LEAVING_TTL_MS: u64 = 60_000;

/// Membership as recorded: node id, whether it was draining when last seen, and how many
/// times it had registered again.
type Members = BTreeMap<String, (bool, u64)>;

impl Watch {
    async fn look(&self, ctx: &Context) -> Result<(), DsError> {
        let (_, nodes, ttl_ms) = self.placement.view();
        let live: Members = nodes
            .values()
            .filter(|n| n.health(ttl_ms) != Health::Dead)
            .map(|n| (n.id.clone(), (n.draining, n.rejoins)))
            .collect();
        let found = ctx.structures.value_get(Kind::Atom, MEMBERS_KEY).await?;
        let (before, version) = match &found {
            Some(v) => (rmp_serde::from_slice::<(u64, Members)>(&v.bytes).unwrap_or_default(), Some(v.version)),
            None => ((0, Members::new()), None),
        };
        let (token, before) = before;
        if live == before || token > ctx.token() || !ctx.is_held() {
            return Ok(());
        }
        let bytes = rmp_serde::to_vec(&(ctx.token(), &live)).unwrap_or_default();
        // Recorded first: should this holder be replaced meanwhile, the next one does not
        // report the same change again.
        if ctx.structures.value_cas(Kind::Atom, MEMBERS_KEY, version, &bytes).await?.is_none() {
            return Ok(());
        }
        for (node, (draining, rejoins)) in &before {
            // Back after its lease ran out: it died meanwhile, and joined again.
            let back = live.get(node).is_some_and(|(_, now)| now > rejoins);
            if back {
                publish(&ctx.structures, &Lifecycle::NodeDied { node: node.clone() }).await;
                publish(&ctx.structures, &Lifecycle::NodeJoined { node: node.clone() }).await;
            } else if !live.contains_key(node) {
                // A node seen draining, or that said it leaves, left; any other died.
                let left = *draining || ctx.structures.exists(Kind::Value, &leaving_key(node)).await?;
                let node = node.clone();
                let event = if left { Lifecycle::NodeLeft { node } } else { Lifecycle::NodeDied { node } };
                publish(&ctx.structures, &event).await;
            }
        }
        for node in live.keys().filter(|n| !before.contains_key(*n)) {
            publish(&ctx.structures, &Lifecycle::NodeJoined { node: node.clone() }).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Component for Arc<Watch> {
    fn name(&self) -> &str {
        WATCH
    }

    fn placement(&self) -> Placement {
        Placement::Singleton
    }

    async fn start(&self, ctx: Context) -> Result<(), String> {
        let watch = self.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(WATCH_EVERY);
            while ctx.is_held() {
                every.tick().await;
                if let Err(err) = watch.look(&ctx).await {
                    tracing::debug!(error = %err, "components: the cluster watch could not look");
                }
            }
        });
        self.task.keep(task);
        Ok(())
    }

    async fn stop(&self) -> Result<(), String> {
        self.task.end();
        Ok(())
    }
}
