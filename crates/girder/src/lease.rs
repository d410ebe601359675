//! Leases as their holder sees them.
//!
//! A lease granted by a store (a node's membership, a lock, a semaphore permit) expires on
//! the store's clock. The holder must never believe it holds a lease the store may already
//! have given to someone else, even when it cannot reach the store to find out (a network
//! partition, a paused Redis). So every lease is also timed by the holder's own clock: it
//! counts from *before* the request that granted or renewed it was sent, minus a margin for
//! clock rate drift, so the holder's view always ends no later than the store's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Part of every lease given up to clock rate differences between holder and store.
const DRIFT_MARGIN_DIVISOR: u32 = 16;

/// A lease by the holder's clock: held until its deadline unless renewed, and lost for good
/// once the deadline passed or the store said so.
#[derive(Debug)]
pub(crate) struct LocalLease {
    base: Instant,
    lease: Duration,
    /// Nanoseconds after `base` until which the lease holds.
    deadline_ns: AtomicU64,
    lost: AtomicBool,
}

impl LocalLease {
    /// A lease of `lease` granted by a request sent at `requested_at`.
    pub(crate) fn new(lease: Duration, requested_at: Instant) -> LocalLease {
        let held =
            LocalLease { base: requested_at, lease, deadline_ns: AtomicU64::new(0), lost: AtomicBool::new(false) };
        held.renewed(requested_at);
        held
    }

    fn margin(&self) -> Duration {
        self.lease / DRIFT_MARGIN_DIVISOR
    }

    /// The store renewed the lease in answer to a request sent at `requested_at`. A lease
    /// already lost stays lost: its holder may have acted on that.
    pub(crate) fn renewed(&self, requested_at: Instant) {
        let until = requested_at.saturating_duration_since(self.base) + self.lease - self.margin();
        let until_ns = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX);
        self.deadline_ns.fetch_max(until_ns, Ordering::AcqRel);
    }

    /// The store said the lease is gone.
    pub(crate) fn lose(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Whether the lease certainly still holds: not lost, and its deadline not passed by
    /// this process's clock. Once false, it stays false.
    pub(crate) fn is_held(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        if self.remaining().is_zero() {
            self.lose();
            return false;
        }
        true
    }

    /// Time left by this process's clock (zero once passed or lost).
    pub(crate) fn remaining(&self) -> Duration {
        if self.lost.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let deadline = self.base + Duration::from_nanos(self.deadline_ns.load(Ordering::Acquire));
        deadline.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ends_before_the_stores_and_stays_lost() {
        let sent = Instant::now();
        let lease = LocalLease::new(Duration::from_millis(160), sent);
        assert!(lease.is_held());
        let left = lease.remaining();
        assert!(left <= Duration::from_millis(150), "margin taken off: {left:?}");
        lease.lose();
        assert!(!lease.is_held());
        lease.renewed(Instant::now());
        assert!(!lease.is_held(), "a lost lease is not revived by a late renewal");
    }

    #[test]
    fn a_lease_expires_by_the_local_clock() {
        let lease = LocalLease::new(Duration::from_millis(16), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!lease.is_held());
    }
}
