//! Panics in user code: caught and reported to the caller by the evaluation, and logged
//! here once per function per interval with a count, not one message and backtrace each
//! (200 panicking calls once wrote 1.3 MB of backtraces in under two seconds).
//!
//! The process's panic hook stays in charge of every panic outside an evaluation; inside
//! one (a thread-local flag set while an evaluation runs), girder's hook only remembers
//! where it happened.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Once;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A function's panics are logged at most once per this interval; the next log line
/// counts the ones in between.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

thread_local! {
    static IN_EVALUATION: Cell<bool> = const { Cell::new(false) };
    static LAST_LOCATION: Cell<Option<String>> = const { Cell::new(None) };
}

/// Marks this thread as running user code until dropped (nests).
pub(crate) struct Evaluating {
    was: bool,
}

impl Evaluating {
    /// Enters an evaluation; installs girder's panic hook the first time.
    pub(crate) fn enter() -> Evaluating {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if IN_EVALUATION.with(Cell::get) {
                    let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                    LAST_LOCATION.with(|c| c.set(location));
                } else {
                    previous(info);
                }
            }));
        });
        Evaluating { was: IN_EVALUATION.with(|c| c.replace(true)) }
    }
}

impl Drop for Evaluating {
    fn drop(&mut self) {
        IN_EVALUATION.with(|c| c.set(self.was));
    }
}

/// Per function: when it was last logged, and panics since that were not.
static SEEN: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);
/// Functions tracked at once; names come from the registry, so this only guards misuse.
const FUNCTIONS_TRACKED_MAX: usize = 4_096;

/// Logs a panic of `function` with `message`, rate-limited per function.
pub(crate) fn report(function: &str, request: &dyn std::fmt::Display, message: &str) {
    let location = LAST_LOCATION.with(Cell::take);
    let now = Instant::now();
    let mut seen = SEEN.lock();
    let seen = seen.get_or_insert_with(HashMap::new);
    if seen.len() >= FUNCTIONS_TRACKED_MAX && !seen.contains_key(function) {
        seen.retain(|_, (at, _)| now.duration_since(*at) < LOG_INTERVAL);
    }
    match seen.get_mut(function) {
        Some((at, suppressed)) if now.duration_since(*at) < LOG_INTERVAL => *suppressed += 1,
        entry => {
            let suppressed = entry.map_or(0, |(_, n)| *n);
            seen.insert(function.to_owned(), (now, 0));
            tracing::warn!(%function, %request, %message, location, more_since_last_log = suppressed,
                "function panicked (logged at most once per {} s per function)", LOG_INTERVAL.as_secs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_in_evaluations_are_caught_quietly_and_outside_ones_are_not_touched() {
        let caught = std::panic::catch_unwind(|| {
            let _evaluating = Evaluating::enter();
            panic!("inside");
        });
        assert!(caught.is_err());
        assert!(!IN_EVALUATION.with(Cell::get), "the flag is restored after an unwind");
        assert!(LAST_LOCATION.with(Cell::take).is_some(), "the hook saw the panic inside");
        let outside = std::panic::catch_unwind(|| panic!("outside"));
        assert!(outside.is_err());
        assert!(LAST_LOCATION.with(Cell::take).is_none(), "a panic outside is left to the previous hook");
    }

    #[test]
    fn a_function_is_logged_once_per_interval() {
        for _ in 0..100 {
            report("test/flood", &"r", "boom");
        }
        let seen = SEEN.lock();
        let (_, suppressed) = seen.as_ref().and_then(|m| m.get("test/flood")).copied().expect("tracked");
        assert_eq!(suppressed, 99);
    }
}
