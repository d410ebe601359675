//! What the HTTP layer knows about the node's load: its slots (for callers' shares) and
//! since when every slot has been busy (for health).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::grid::Node;

/// How often the load is sampled in the background.
pub(super) const SAMPLE_INTERVAL: Duration = Duration::from_millis(200);

/// The node's slots and since when all of them are busy, from samples of [`Node::info`].
pub(super) struct Load {
    slots: AtomicU32,
    busy: AtomicU32,
    inner: Mutex<Sampled>,
}

struct Sampled {
    at: Option<Instant>,
    all_busy_since: Option<Instant>,
}

/// The node's load as health reports it.
pub(super) struct Reading {
    pub slots: u32,
    pub busy: u32,
    /// How long every slot has been busy (`None` when one is free, or the node has none).
    pub all_busy_for: Option<Duration>,
}

impl Load {
    pub(super) fn new(node: &Node) -> Load {
        let load = Load {
            slots: AtomicU32::new(0),
            busy: AtomicU32::new(0),
            inner: Mutex::new(Sampled { at: None, all_busy_since: None }),
        };
        load.sample(node);
        load
    }

    /// Reads the node's slots now.
    pub(super) fn sample(&self, node: &Node) {
        let info = node.info();
        let slots = info.workers.iter().map(|w| w.slots).fold(0u32, u32::saturating_add);
        let busy = info.workers.iter().map(|w| w.busy).fold(0u32, u32::saturating_add);
        self.slots.store(slots, Ordering::Relaxed);
        self.busy.store(busy, Ordering::Relaxed);
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.at = Some(now);
        if slots > 0 && busy >= slots {
            inner.all_busy_since.get_or_insert(now);
        } else {
            inner.all_busy_since = None;
        }
    }

    /// The node's slots as last sampled (0 for a gateway).
    pub(super) fn slots(&self) -> u32 {
        self.slots.load(Ordering::Relaxed)
    }

    /// The load now, sampled again when the last sample is older than the interval.
    pub(super) fn read(&self, node: &Node) -> Reading {
        let stale = self.inner.lock().at.is_none_or(|at| at.elapsed() >= SAMPLE_INTERVAL);
        if stale {
            self.sample(node);
        }
        let since = self.inner.lock().all_busy_since;
        Reading {
            slots: self.slots.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            all_busy_for: since.map(|s| s.elapsed()),
        }
    }
}

/// Samples `load` every [`SAMPLE_INTERVAL`] while `node` lives and the HTTP API holds `load`,
/// so that "busy since" is known between health probes.
pub(super) fn spawn_sampler(node: Weak<Node>, load: Weak<Load>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime: health samples when it is asked.
        return;
    };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let (Some(node), Some(load)) = (node.upgrade(), load.upgrade()) else { return };
            load.sample(&node);
            drop::<Arc<Node>>(node);
        }
    });
}
