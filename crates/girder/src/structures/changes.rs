//! Change notices: how waiters on a key (a lock, a latch, an atom's watch) learn that it
//! may have changed. Shared by both [`super::Structures`] implementations; waiters re-check
//! after every wake-up, since a notice may be spurious or come late.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Waiters per key. Entries exist only while someone waits.
#[derive(Default, Clone)]
pub(crate) struct ChangeNotices(Arc<Mutex<HashMap<String, Arc<Notify>>>>);

impl ChangeNotices {
    /// Wakes everyone waiting on `key`.
    pub(crate) fn notify(&self, key: &str) {
        if let Some(notify) = self.0.lock().get(key) {
            notify.notify_waiters();
        }
    }

    /// Waits for a notice on `key`, or `timeout_ms`.
    pub(crate) async fn wait(&self, key: &str, timeout_ms: u64) {
        let notify = self.0.lock().entry(key.to_owned()).or_default().clone();
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), notify.notified()).await;
        let mut waiting = self.0.lock();
        // Ours and the map's: nobody else waits, so the entry can go.
        if Arc::strong_count(&notify) <= 2 {
            waiting.remove(key);
        }
    }
}
