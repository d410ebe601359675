//! The one retry policy of the library: exponential backoff with jitter.

use std::time::Duration;

/// Exponential backoff with jitter for retries against something unreachable: the one
/// policy every retry loop of the library uses.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at 20 ms and doubles up to 1 s: retries against a statekeeper.
    pub(crate) fn statekeeper() -> Backoff {
        Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// Starts at 20 ms and doubles up to 2 s: reconnecting to a store that went away.
    pub(crate) fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(20), Duration::from_secs(2))
    }

    /// Starts at `min` and doubles up to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), next: min, failures: 0 }
    }

    /// Consecutive failures since the last success.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// An attempt succeeded: the next failure waits the minimum again.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.next = self.min;
    }

    /// An attempt failed: how long to wait before the next one (the current step, with up
    /// to a quarter of jitter so that many retriers do not beat in step).
    pub(crate) fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter_max = u64::try_from(step.as_micros() / 4).unwrap_or(0);
        step + Duration::from_micros(fastrand::u64(0..=jitter_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let steps: Vec<Duration> = (0..4).map(|_| backoff.failed()).collect();
        for (step, base) in steps.iter().zip([10, 20, 40, 40]) {
            let base = Duration::from_millis(base);
            assert!(*step >= base && *step <= base + base / 4, "{step:?} for {base:?}");
        }
        assert_eq!(backoff.failures(), 4);
        backoff.succeeded();
        assert!(backoff.failed() < Duration::from_millis(13));
    }
}
