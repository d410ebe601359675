//! Coordination: the [`Lock`] (leased, with fencing tokens), the [`CountDownLatch`] and the
//! [`Semaphore`] (leased permits). A lease is renewed by a task while its guard lives; when
//! the holder dies the renewals stop and the lease runs out, freeing the lock or permit.
//! Guards also time their lease by this process's clock ([`LocalLease`]), so a holder cut
//! off from the store stops believing it holds the lease before anyone else can take it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{check_key, DsError, DsResult, Store};
use crate::lease::LocalLease;

/// A holder id unique across processes and time: pid, a counter and the clock, hashed.
fn holder_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.update(&nanos.to_le_bytes());
    hasher.finalize().to_hex()[..24].to_owned()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Shortest lease accepted: renewals run every third of it.
pub const LEASE_MS_MIN: u64 = 30;

/// Renews `lease` every third of `lease_ms` with `renew` until the store reports it gone
/// or it runs out by this process's clock; an unreachable store is retried meanwhile.
fn keep_renewed<F, Fut>(what: String, lease_ms: u64, lease: Arc<LocalLease>, renew: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = DsResult<bool>> + Send,
{
    let every = Duration::from_millis(lease_ms / 3);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if !lease.is_held() {
                tracing::warn!(lease = %what, "lease ran out by the local clock; renewals stop");
                return;
            }
            let sent = Instant::now();
            // A renewal that hangs past the lease is as good as failed.
            match tokio::time::timeout(lease.remaining(), renew()).await {
                Ok(Ok(true)) => lease.renewed(sent),
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %what, "lease lost");
                    lease.lose();
                    return;
                }
                Ok(Err(err)) => tracing::warn!(lease = %what, error = %err, "lease renewal failed"),
                Err(_) => tracing::warn!(lease = %what, "lease renewal timed out"),
            }
        }
    })
}

/// Stops `renewal` and, on a best-effort basis, runs `release`: dropped guards free what
/// they hold at once instead of when the lease runs out.
fn release_on_drop<Fut>(renewal: &JoinHandle<()>, release: Fut)
where
    Fut: std::future::Future<Output = DsResult<bool>> + Send + 'static,
{
    renewal.abort();
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = release.await;
        });
    }
}

/// How often waiters re-check something held under a `lease_ms` lease.
fn lease_poll_ms(lease_ms: u64) -> u64 {
    (lease_ms / 8).clamp(10, 1_000)
}

fn check_lease(lease: Duration) -> DsResult<u64> {
    let ms = millis(lease);
    if !(LEASE_MS_MIN..=super::TTL_MS_MAX).contains(&ms) {
        return Err(DsError::Invalid(format!(
            "a lease must be between {LEASE_MS_MIN} and {} ms, got {ms}",
            super::TTL_MS_MAX
        )));
    }
    Ok(ms)
}

/// Waits for a change of `key`, for at most `poll_ms` and the time left until
/// `deadline`; false when none is left. A lease that runs out sends no change notice, so
/// waiters on leased things poll at a fraction of the lease.
async fn wait_until(store: &Store, key: &str, deadline: Option<Instant>, poll_ms: u64) -> bool {
    let wait_ms = match deadline {
        None => poll_ms,
        Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => millis(left).min(poll_ms),
            _ => return false,
        },
    };
    store.wait_change(key, wait_ms).await;
    true
}

/// A distributed lock held under a lease, with a fencing token that strictly increases with
/// each acquisition (pass it to whatever the lock protects, so a holder whose lease ran
/// out cannot overwrite a newer holder's work).
pub struct Lock {
    store: Store,
    key: String,
    lease_ms: u64,
}

/// A held lock. Its lease is renewed until it is released or dropped.
pub struct LockGuard {
    store: Store,
    key: String,
    holder: String,
    token: u64,
    lease: Arc<LocalLease>,
    renewal: JoinHandle<()>,
}

impl Lock {
    /// The lock `key` on `store`, taken for `lease` at a time.
    pub fn new(store: Store, key: impl Into<String>, lease: Duration) -> DsResult<Lock> {
        let key = key.into();
        check_key(&key)?;
        Ok(Lock { store, key, lease_ms: check_lease(lease)? })
    }

    /// Takes the lock if it is free now.
    pub async fn try_lock_now(&self) -> DsResult<Option<LockGuard>> {
        let holder = holder_id();
        let sent = Instant::now();
        match self.store.lock_acquire(&self.key, &holder, self.lease_ms).await? {
            Some(token) => Ok(Some(self.guard(holder, token, sent))),
            None => Ok(None),
        }
    }

    /// Takes the lock, waiting up to `timeout` for it to be free.
    pub async fn try_lock(&self, timeout: Duration) -> DsResult<Option<LockGuard>> {
        self.acquire(Some(Instant::now() + timeout)).await
    }

    /// Takes the lock, waiting as long as it takes.
    pub async fn lock(&self) -> DsResult<LockGuard> {
        match self.acquire(None).await? {
            Some(guard) => Ok(guard),
            None => Err(DsError::Invalid(format!("lock {:?} could not be taken", self.key))),
        }
    }

    async fn acquire(&self, deadline: Option<Instant>) -> DsResult<Option<LockGuard>> {
        let holder = holder_id();
        loop {
            let sent = Instant::now();
            if let Some(token) = self.store.lock_acquire(&self.key, &holder, self.lease_ms).await? {
                return Ok(Some(self.guard(holder, token, sent)));
            }
            if !wait_until(&self.store, &self.key, deadline, lease_poll_ms(self.lease_ms)).await {
                return Ok(None);
            }
        }
    }

    /// The current holder's fencing token, if the lock is held.
    pub async fn token(&self) -> DsResult<Option<u64>> {
        Ok(self.store.lock_holder(&self.key).await?.map(|(_, token)| token))
    }

    fn guard(&self, holder: String, token: u64, sent: Instant) -> LockGuard {
        let lease = Arc::new(LocalLease::new(Duration::from_millis(self.lease_ms), sent));
        let renewal = {
            let (store, key, holder, lease_ms) = (self.store.clone(), self.key.clone(), holder.clone(), self.lease_ms);
            keep_renewed(format!("lock {} token {token}", self.key), lease_ms, lease.clone(), move || {
                let (store, key, holder) = (store.clone(), key.clone(), holder.clone());
                async move { store.lock_renew(&key, &holder, token, lease_ms).await }
            })
        };
        LockGuard { store: self.store.clone(), key: self.key.clone(), holder, token, lease, renewal }
    }
}

impl LockGuard {
    /// The fencing token of this acquisition.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether the lease certainly still holds: false once a renewal found it lost or it ran
    /// out by this process's clock (which ends it before the store's: see the module docs),
    /// and false from then on. Check it before each write the lock protects, and pass the
    /// [`LockGuard::token`] with the write so the other side can refuse a stale holder.
    pub fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    /// A check of [`LockGuard::is_held`] that outlives the guard's borrow (it says false
    /// once the guard is released or dropped, since renewal stops).
    pub fn held_check(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let lease = self.lease.clone();
        Arc::new(move || lease.is_held())
    }

    /// Releases the lock; returns whether it was still held.
    pub async fn release(self) -> DsResult<bool> {
        self.renewal.abort();
        self.lease.lose();
        self.store.lock_release(&self.key, &self.holder, self.token).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.lease.lose();
        let (store, key, holder, token) = (self.store.clone(), self.key.clone(), self.holder.clone(), self.token);
        release_on_drop(&self.renewal, async move { store.lock_release(&key, &holder, token).await });
    }
}

/// A latch that opens when counted down to zero.
pub struct CountDownLatch {
    store: Store,
    key: String,
}

impl CountDownLatch {
    /// The latch `key` on `store`.
    pub fn new(store: Store, key: impl Into<String>) -> DsResult<CountDownLatch> {
        let key = key.into();
        check_key(&key)?;
        Ok(CountDownLatch { store, key })
    }

    /// Sets the count if the latch is unset or open; returns whether it did.
    pub async fn try_set_count(&self, count: u64) -> DsResult<bool> {
        self.store.latch_try_set(&self.key, count).await
    }

    /// Counts down by one; returns the count left.
    pub async fn count_down(&self) -> DsResult<u64> {
        self.store.latch_count_down(&self.key).await
    }

    /// The count left.
    pub async fn count(&self) -> DsResult<u64> {
        self.store.latch_count(&self.key).await
    }

    /// Waits until the count is zero, up to `timeout`; returns whether it is.
    pub async fn wait(&self, timeout: Duration) -> DsResult<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count().await? == 0 {
                return Ok(true);
            }
            if !wait_until(&self.store, &self.key, Some(deadline), 1_000).await {
                return Ok(false);
            }
        }
    }
}

/// A counting semaphore whose permits are held under leases.
pub struct Semaphore {
    store: Store,
    key: String,
    lease_ms: u64,
}

/// A held permit, renewed until released or dropped.
pub struct Permit {
    store: Store,
    key: String,
    holder: String,
    lease: Arc<LocalLease>,
    renewal: JoinHandle<()>,
}

impl Semaphore {
    /// The semaphore `key` on `store`; permits are held for `lease` at a time.
    pub fn new(store: Store, key: impl Into<String>, lease: Duration) -> DsResult<Semaphore> {
        let key = key.into();
        check_key(&key)?;
        Ok(Semaphore { store, key, lease_ms: check_lease(lease)? })
    }

    /// Sets the number of permits; returns whether the semaphore was unset before.
    pub async fn init(&self, permits: u64) -> DsResult<bool> {
        self.store.semaphore_init(&self.key, permits).await
    }

    /// Permits free now.
    pub async fn available(&self) -> DsResult<u64> {
        self.store.semaphore_available(&self.key).await
    }

    /// Takes a permit, waiting up to `timeout` for one.
    pub async fn try_acquire(&self, timeout: Duration) -> DsResult<Option<Permit>> {
        let deadline = Instant::now() + timeout;
        let holder = holder_id();
        loop {
            let sent = Instant::now();
            if self.store.semaphore_acquire(&self.key, &holder, self.lease_ms).await? {
                return Ok(Some(self.permit(holder, sent)));
            }
            if !wait_until(&self.store, &self.key, Some(deadline), lease_poll_ms(self.lease_ms)).await {
                return Ok(None);
            }
        }
    }

    fn permit(&self, holder: String, sent: Instant) -> Permit {
        let lease = Arc::new(LocalLease::new(Duration::from_millis(self.lease_ms), sent));
        let renewal = {
            let (store, key, holder, lease_ms) = (self.store.clone(), self.key.clone(), holder.clone(), self.lease_ms);
            keep_renewed(format!("semaphore {} permit", self.key), lease_ms, lease.clone(), move || {
                let (store, key, holder) = (store.clone(), key.clone(), holder.clone());
                async move { store.semaphore_renew(&key, &holder, lease_ms).await }
            })
        };
        Permit { store: self.store.clone(), key: self.key.clone(), holder, lease, renewal }
    }
}

impl Permit {
    /// Whether the permit's lease certainly still holds (see [`LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    /// Returns the permit; returns whether it was still held.
    pub async fn release(self) -> DsResult<bool> {
        self.renewal.abort();
        self.store.semaphore_release(&self.key, &self.holder).await
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (store, key, holder) = (self.store.clone(), self.key.clone(), self.holder.clone());
        release_on_drop(&self.renewal, async move { store.semaphore_release(&key, &holder).await });
    }
}
