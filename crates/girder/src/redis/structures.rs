//! [`Structures`] on Redis: one Lua script per operation (`structures.lua`), every key of a
//! structure under its own hash tag (`girder:ds:{NAMESPACE:NAME}`), so structures spread
//! over a cluster's slots. Blocking reads (queue polls, reliable topic reads) use
//! connections of their own. One subscription per process to the namespace's change
//! channel wakes local waiters and keeps the near cache of values coherent.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use lru::LruCache;
use parking_lot::Mutex;
use redis::{FromRedisValue, Script};

use crate::retry::Backoff;
use crate::structures::changes::ChangeNotices;
use crate::structures::{DsError, DsResult, Kind, ReliableBatch, Retention, Structures, Versioned};

const SCRIPTS: &str = include_str!("structures.lua");

/// Values kept in the near cache at most, and the largest one kept.
const NEAR_ENTRIES_MAX: usize = 10_000;
const NEAR_VALUE_BYTES_MAX: usize = 1 << 20;
/// A near-cached value is served for at most this long without a read from Redis: the bound
/// on staleness should an invalidation be lost.
pub const NEAR_STALE_MS_MAX: u64 = 2_000;

/// Slots of [`Near::stamps`]: keys are hashed onto them, so memory stays fixed however many
/// keys are written.
const STAMP_SLOTS: usize = 8_192;

/// The near cache of values (`Kind::Value` only), and what keeps it from going back in time.
///
/// A write's script bumps the value's version and publishes a change notice inside Redis,
/// but a read of this process that reached Redis *before* the write can return *after* it
/// (and after the notice), and would then put the old value back in the cache, to be served
/// for up to [`NEAR_STALE_MS_MAX`], even to the writer itself. So fills are checked:
///
/// - Every *invalidation* of a key (this process's own write of it, after the write's reply
///   arrived, whatever the outcome; and every change notice for it from the subscription)
///   takes the next number of the process-wide counter `epoch`, stamps it on the key's slot
///   (`stamps[hash(key) % STAMP_SLOTS]`) and drops the key's cached value.
/// - A read from Redis takes a *ticket*, the current `epoch`, before it sends its script.
///   On its reply it fills the cache only if its key's slot carries a stamp `<= ticket` (no
///   invalidation of the key, or of one sharing its slot, since the read was sent) and
///   `ticket >= floor` (`floor` is the epoch at the last reset of the whole cache, done when
///   the subscription comes back: notices may have been lost before it).
///
/// All of it happens under one lock, so invalidations, fills and hits are totally ordered.
/// Why a process reads its own writes: take a write W whose call returned, and a later read
/// R served value X from the cache. W's invalidation I ran before the call returned, so
/// before R, and dropped the key's entry; so X was put by a fill F after I, of a read R'
/// with ticket t. F passed its check, and the slot's stamp only grows, so
/// `t >= stamp(I)`: R' took its ticket after I, so it sent its script after W's reply came
/// back, and Redis ran it after W: X's version is W's or later. The same argument with a
/// change notice in place of I (a notice is published by the writing script itself, so a
/// read sent after the notice arrived runs after that write) bounds the staleness between
/// processes by the notice's delivery; the age limit only covers lost notices. Hash
/// collisions only drop fills that would have been safe. A fill never replaces a cached
/// value of a higher version, so reads of this process do not go back either. Hits stay a
/// lock, a lookup and a clock read.
struct Near {
    entries: LruCache<String, (Versioned, Instant)>,
    epoch: u64,
    floor: u64,
    stamps: Box<[u64]>,
    hasher: RandomState,
}

impl Near {
    fn new() -> Near {
        Near {
            entries: LruCache::new(NonZeroUsize::new(NEAR_ENTRIES_MAX).unwrap_or(NonZeroUsize::MIN)),
            epoch: 0,
            floor: 0,
            stamps: vec![0; STAMP_SLOTS].into_boxed_slice(),
            hasher: RandomState::new(),
        }
    }

    fn slot(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) % STAMP_SLOTS as u64) as usize
    }

    /// The ticket of a read about to be sent.
    fn ticket(&self) -> u64 {
        self.epoch
    }

    /// `key` was written, or may have been: drop its value and refuse fills by reads sent
    /// before now.
    fn invalidate(&mut self, key: &str) {
        self.epoch += 1;
        let slot = self.slot(key);
        self.stamps[slot] = self.epoch;
        self.entries.pop(key);
    }

    /// Anything may have been written: drop every value and refuse fills by reads sent
    /// before now.
    fn reset(&mut self) {
        self.epoch += 1;
        self.floor = self.epoch;
        self.entries.clear();
    }

    /// Caches `value`, read from Redis by a read with `ticket`, unless the key was
    /// invalidated since the read was sent or a newer version is cached.
    fn fill(&mut self, key: &str, ticket: u64, value: &Versioned) {
        if ticket < self.floor || self.stamps[self.slot(key)] > ticket {
            return;
        }
        if self.entries.peek(key).is_some_and(|(cached, _)| cached.version > value.version) {
            return;
        }
        self.entries.put(key.to_owned(), (value.clone(), Instant::now()));
    }
}

/// The data structures of one grid namespace on Redis.
pub(crate) struct RedisStructures {
    client: redis::Client,
    conn: Arc<super::conn::Conn>,
    namespace: String,
    channel: String,
    scripts: HashMap<&'static str, Script>,
    near: Arc<Mutex<Near>>,
    /// Whether the change subscription is live; the near cache is used only then.
    subscribed: Arc<AtomicBool>,
    changes: ChangeNotices,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn scripts() -> HashMap<&'static str, Script> {
    let mut sections = super::sections(SCRIPTS);
    let prelude = match sections.iter().position(|(name, _)| *name == "prelude") {
        Some(i) => sections.remove(i).1,
        None => String::new(),
    };
    sections.into_iter().map(|(name, body)| (name, Script::new(&format!("{prelude}{body}")))).collect()
}

fn failed(err: redis::RedisError) -> DsError {
    // Script errors arrive as "CODE detail script: ..., on @user_script:N."
    let detail = err.detail().unwrap_or_default();
    let first_word = detail.split_whitespace().next().unwrap_or("?").to_owned();
    let message = detail.split(" script:").next().unwrap_or(detail).trim().to_owned();
    match err.code() {
        Some("GIRDER_WRONG_KIND") => {
            return DsError::WrongKind { key: String::new(), expected: Kind::Value, found: first_word };
        }
        Some("GIRDER_TOO_LARGE") => {
            return DsError::TooLarge { key: String::new(), bytes: first_word.parse().unwrap_or(0), max_bytes: 0 };
        }
        Some("GIRDER_INVALID") => return DsError::Invalid(message),
        _ => {}
    }
    let text = err.to_string();
    if text.contains("overflow") {
        return DsError::Invalid(format!("counter would overflow: {text}"));
    }
    DsError::Unavailable(format!("redis: {text}"))
}

impl RedisStructures {
    pub(crate) fn new(client: redis::Client, conn: Arc<super::conn::Conn>, namespace: &str) -> RedisStructures {
        RedisStructures {
            client,
            conn,
            namespace: namespace.to_owned(),
            channel: format!("girder:chg:{namespace}"),
            scripts: scripts(),
            near: Arc::new(Mutex::new(Near::new())),
            subscribed: Arc::default(),
            changes: ChangeNotices::default(),
            listener: Mutex::new(None),
        }
    }

    fn base(&self, key: &str) -> String {
        format!("girder:ds:{{{}:{}}}", self.namespace, key)
    }

    /// Runs the script `op` on `key`'s structure of `kind` with extra `args`.
    async fn run<T: FromRedisValue>(&self, op: &str, kind: Kind, key: &str, args: &[&[u8]]) -> DsResult<T> {
        self.ensure_listener();
        let script = self.scripts.get(op).ok_or_else(|| DsError::Invalid(format!("no script {op}")))?;
        let mut invocation = script.prepare_invoke();
        invocation.key(self.base(key)).arg(kind.as_str()).arg(&self.channel).arg(key);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.get();
        invocation.invoke_async(&mut conn).await.map_err(|e| match self.failed(e) {
            DsError::WrongKind { found, .. } => DsError::WrongKind { key: key.to_owned(), expected: kind, found },
            other => other,
        })
    }

    /// Starts the change listener once: it wakes local waiters and evicts near-cached values.
    fn ensure_listener(&self) {
        let mut listener = self.listener.lock();
        if listener.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let (client, channel) = (self.client.clone(), self.channel.clone());
        let (near, subscribed, changes) = (self.near.clone(), self.subscribed.clone(), self.changes.clone());
        *listener = Some(handle.spawn(async move {
            let mut backoff = Backoff::reconnect();
            loop {
                let connected = match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => Some(pubsub),
                        Err(_) => None,
                    },
                    Err(_) => None,
                };
                match connected {
                    Some(mut pubsub) => {
                        backoff.succeeded();
                        // Anything written while we were not listening may be stale here.
                        near.lock().reset();
                        subscribed.store(true, Ordering::Release);
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let Ok(key) = message.get_payload::<String>() else { continue };
                            near.lock().invalidate(&key);
                            changes.notify(&key);
                        }
                        subscribed.store(false, Ordering::Release);
                        tracing::warn!(channel = %channel, "change subscription lost; reconnecting");
                    }
                    None => {
                        subscribed.store(false, Ordering::Release);
                        tokio::time::sleep(backoff.failed()).await;
                    }
                }
            }
        }));
    }

    /// Converts an error, and replaces the shared connection when it broke.
    fn failed(&self, err: redis::RedisError) -> DsError {
        self.conn.failed(&err);
        failed(err)
    }

    fn near_get(&self, key: &str) -> Option<Versioned> {
        if !self.subscribed.load(Ordering::Acquire) {
            return None;
        }
        let mut near = self.near.lock();
        match near.entries.get(key) {
            Some((value, at)) if at.elapsed() < Duration::from_millis(NEAR_STALE_MS_MAX) => Some(value.clone()),
            Some(_) => {
                near.entries.pop(key);
                None
            }
            None => None,
        }
    }

    /// After a write of `key` by this process (whether it succeeded or not).
    fn near_invalidate(&self, key: &str) {
        self.near.lock().invalidate(key);
    }

    /// A connection of its own for one blocking read.
    async fn blocking_connection(&self, block_ms: u64) -> DsResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_millis(block_ms + 5_000)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(failed)
    }
}

fn ms(value: u64) -> String {
    value.to_string()
}

#[async_trait]
impl Structures for RedisStructures {
    async fn value_get(&self, kind: Kind, key: &str) -> DsResult<Option<Versioned>> {
        let ticket = match kind {
            Kind::Value => {
                if let Some(value) = self.near_get(key) {
                    return Ok(Some(value));
                }
                Some(self.near.lock().ticket())
            }
            _ => None,
        };
        let reply: Option<(Vec<u8>, String)> = self.run("value_get", kind, key, &[]).await?;
        let value = reply
            .map(|(bytes, version)| Versioned { bytes: Bytes::from(bytes), version: version.parse().unwrap_or(0) });
        if let (Some(ticket), Some(value)) = (ticket, &value) {
            if value.bytes.len() <= NEAR_VALUE_BYTES_MAX && self.subscribed.load(Ordering::Acquire) {
                self.near.lock().fill(key, ticket, value);
            }
        }
        Ok(value)
    }

    async fn value_set(&self, kind: Kind, key: &str, value: &[u8], ttl_ms: Option<u64>) -> DsResult<u64> {
        let ttl = ms(ttl_ms.unwrap_or(0));
        let version: DsResult<String> = self.run("value_set", kind, key, &[value, ttl.as_bytes()]).await;
        self.near_invalidate(key);
        Ok(version?.parse().unwrap_or(0))
    }

    async fn value_cas(&self, kind: Kind, key: &str, expected: Option<u64>, value: &[u8]) -> DsResult<Option<u64>> {
        let expected = expected.map(ms).unwrap_or_default();
        let version: DsResult<Option<String>> = self.run("value_cas", kind, key, &[expected.as_bytes(), value]).await;
        self.near_invalidate(key);
        Ok(version?.map(|v| v.parse().unwrap_or(0)))
    }

    async fn value_compare_and_set(
        &self,
        kind: Kind,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> DsResult<Option<u64>> {
        let (mode, expected) = match expected {
            Some(expected) => (&b"1"[..], expected),
            None => (&b"0"[..], &b""[..]),
        };
        let version: DsResult<Option<String>> =
            self.run("value_compare_and_set", kind, key, &[mode, expected, value]).await;
        self.near_invalidate(key);
        Ok(version?.map(|v| v.parse().unwrap_or(0)))
    }

    async fn value_append(&self, key: &str, chunk: &[u8], max_bytes: usize) -> DsResult<u64> {
        let max = ms(max_bytes as u64);
        let result: DsResult<u64> = self.run("value_append", Kind::Value, key, &[chunk, max.as_bytes()]).await;
        self.near_invalidate(key);
        result.map_err(|err| match err {
            DsError::TooLarge { bytes, .. } => DsError::TooLarge { key: key.to_owned(), bytes, max_bytes },
            other => other,
        })
    }

    async fn delete(&self, kind: Kind, key: &str) -> DsResult<bool> {
        let deleted: DsResult<i64> = self.run("delete", kind, key, &[]).await;
        self.near_invalidate(key);
        Ok(deleted? == 1)
    }

    async fn exists(&self, kind: Kind, key: &str) -> DsResult<bool> {
        Ok(self.run::<i64>("exists", kind, key, &[]).await? == 1)
    }

    async fn counter_add(&self, key: &str, delta: i64) -> DsResult<i64> {
        let value: String = self.run("counter_add", Kind::Counter, key, &[delta.to_string().as_bytes()]).await?;
        value.parse().map_err(|_| DsError::Decode { key: key.to_owned(), message: format!("counter holds {value:?}") })
    }

    async fn counter_cas(&self, key: &str, expected: i64, new: i64) -> DsResult<bool> {
        let args = [expected.to_string(), new.to_string()];
        Ok(self.run::<i64>("counter_cas", Kind::Counter, key, &[args[0].as_bytes(), args[1].as_bytes()]).await? == 1)
    }

    async fn map_put(&self, kind: Kind, key: &str, field: &[u8], value: &[u8]) -> DsResult<Option<Bytes>> {
        let old: Option<Vec<u8>> = self.run("map_put", kind, key, &[field, value]).await?;
        Ok(old.map(Bytes::from))
    }

    async fn map_get(&self, kind: Kind, key: &str, field: &[u8]) -> DsResult<Vec<Bytes>> {
        let values: Vec<Vec<u8>> = self.run("map_get", kind, key, &[field]).await?;
        Ok(values.into_iter().map(Bytes::from).collect())
    }

    async fn map_remove(&self, kind: Kind, key: &str, field: &[u8], value: Option<&[u8]>) -> DsResult<u64> {
        let (value, one) = match value {
            Some(value) => (value, &b"1"[..]),
            None => (&b""[..], &b"0"[..]),
        };
        self.run("map_remove", kind, key, &[field, value, one]).await
    }

    async fn map_len(&self, kind: Kind, key: &str) -> DsResult<u64> {
        self.run("map_len", kind, key, &[]).await
    }

    async fn map_entries(&self, kind: Kind, key: &str, limit: usize) -> DsResult<Vec<(Bytes, Bytes)>> {
        let flat: Vec<Vec<u8>> = self.run("map_entries", kind, key, &[ms(limit as u64).as_bytes()]).await?;
        Ok(flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((Bytes::from(k.clone()), Bytes::from(v.clone()))),
                _ => None,
            })
            .collect())
    }

    async fn set_add(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        Ok(self.run::<i64>("set_op", Kind::Set, key, &[b"add", member]).await? == 1)
    }

    async fn set_remove(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        Ok(self.run::<i64>("set_op", Kind::Set, key, &[b"remove", member]).await? == 1)
    }

    async fn set_contains(&self, key: &str, member: &[u8]) -> DsResult<bool> {
        Ok(self.run::<i64>("set_op", Kind::Set, key, &[b"contains", member]).await? == 1)
    }

    async fn set_len(&self, key: &str) -> DsResult<u64> {
        self.run("set_op", Kind::Set, key, &[b"len", b""]).await
    }

    async fn set_members(&self, key: &str, limit: usize) -> DsResult<Vec<Bytes>> {
        let members: Vec<Vec<u8>> =
            self.run("set_op", Kind::Set, key, &[b"members", ms(limit as u64).as_bytes()]).await?;
        Ok(members.into_iter().map(Bytes::from).collect())
    }

    async fn list_push(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
        front: bool,
        capacity: Option<u64>,
    ) -> DsResult<Option<u64>> {
        let capacity = capacity.map(ms).unwrap_or_default();
        let front = if front { b"1" } else { b"0" };
        self.run("list_push", kind, key, &[value, front, capacity.as_bytes()]).await
    }

    async fn list_pop(&self, kind: Kind, key: &str, front: bool) -> DsResult<Option<Bytes>> {
        let popped: Option<Vec<u8>> = self.run("list_pop", kind, key, &[if front { b"1" } else { b"0" }]).await?;
        Ok(popped.map(Bytes::from))
    }

    async fn queue_poll(&self, key: &str, timeout_ms: u64) -> DsResult<Option<Bytes>> {
        if let Some(item) = self.list_pop(Kind::Queue, key, true).await? {
            return Ok(Some(item));
        }
        if timeout_ms == 0 {
            return Ok(None);
        }
        // The kind was checked above; block on the list itself on a connection of our own.
        let mut conn = self.blocking_connection(timeout_ms).await?;
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
            .arg(self.base(key))
            .arg(timeout_ms as f64 / 1_000.0)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        Ok(popped.map(|(_, item)| Bytes::from(item)))
    }

    async fn list_get(&self, key: &str, index: i64) -> DsResult<Option<Bytes>> {
        let item: Option<Vec<u8>> = self.run("list_get", Kind::List, key, &[index.to_string().as_bytes()]).await?;
        Ok(item.map(Bytes::from))
    }

    async fn list_set(&self, key: &str, index: i64, value: &[u8]) -> DsResult<bool> {
        Ok(self.run::<i64>("list_set", Kind::List, key, &[index.to_string().as_bytes(), value]).await? == 1)
    }

    async fn list_range(&self, key: &str, start: i64, stop: i64, limit: usize) -> DsResult<Vec<Bytes>> {
        let args = [start.to_string(), stop.to_string(), ms(limit as u64)];
        let items: Vec<Vec<u8>> = self
            .run("list_range", Kind::List, key, &[args[0].as_bytes(), args[1].as_bytes(), args[2].as_bytes()])
            .await?;
        Ok(items.into_iter().map(Bytes::from).collect())
    }

    async fn list_len(&self, kind: Kind, key: &str) -> DsResult<u64> {
        self.run("list_len", kind, key, &[]).await
    }

    async fn lock_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<Option<u64>> {
        self.run("lock_acquire", Kind::Lock, key, &[holder.as_bytes(), ms(lease_ms).as_bytes()]).await
    }

    async fn lock_renew(&self, key: &str, holder: &str, token: u64, lease_ms: u64) -> DsResult<bool> {
        let args = [ms(token), ms(lease_ms)];
        Ok(self
            .run::<i64>("lock_renew", Kind::Lock, key, &[holder.as_bytes(), args[0].as_bytes(), args[1].as_bytes()])
            .await?
            == 1)
    }

    async fn lock_release(&self, key: &str, holder: &str, token: u64) -> DsResult<bool> {
        Ok(self.run::<i64>("lock_release", Kind::Lock, key, &[holder.as_bytes(), ms(token).as_bytes()]).await? == 1)
    }

    async fn lock_holder(&self, key: &str) -> DsResult<Option<(String, u64)>> {
        let held: Option<String> = self.run("lock_holder", Kind::Lock, key, &[]).await?;
        Ok(held.and_then(|text| {
            let (holder, token) = text.split_once(' ')?;
            Some((holder.to_owned(), token.parse().ok()?))
        }))
    }

    async fn latch_try_set(&self, key: &str, count: u64) -> DsResult<bool> {
        Ok(self.run::<i64>("latch_try_set", Kind::Latch, key, &[ms(count).as_bytes()]).await? == 1)
    }

    async fn latch_count_down(&self, key: &str) -> DsResult<u64> {
        self.run("latch_count_down", Kind::Latch, key, &[]).await
    }

    async fn latch_count(&self, key: &str) -> DsResult<u64> {
        self.run("latch_count", Kind::Latch, key, &[]).await
    }

    async fn semaphore_init(&self, key: &str, permits: u64) -> DsResult<bool> {
        Ok(self.run::<i64>("semaphore_init", Kind::Semaphore, key, &[ms(permits).as_bytes()]).await? == 1)
    }

    async fn semaphore_acquire(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool> {
        Ok(self
            .run::<i64>("semaphore_acquire", Kind::Semaphore, key, &[holder.as_bytes(), ms(lease_ms).as_bytes()])
            .await?
            == 1)
    }

    async fn semaphore_renew(&self, key: &str, holder: &str, lease_ms: u64) -> DsResult<bool> {
        Ok(self
            .run::<i64>("semaphore_renew", Kind::Semaphore, key, &[holder.as_bytes(), ms(lease_ms).as_bytes()])
            .await?
            == 1)
    }

    async fn semaphore_release(&self, key: &str, holder: &str) -> DsResult<bool> {
        Ok(self.run::<i64>("semaphore_release", Kind::Semaphore, key, &[holder.as_bytes()]).await? == 1)
    }

    async fn semaphore_available(&self, key: &str) -> DsResult<u64> {
        self.run("semaphore_available", Kind::Semaphore, key, &[]).await
    }

    async fn publish(&self, topic: &str, message: &[u8]) -> DsResult<u64> {
        let mut conn = self.conn.get();
        redis::cmd("PUBLISH")
            .arg(format!("girder:topic:{}:{topic}", self.namespace))
            .arg(message)
            .query_async(&mut conn)
            .await
            .map_err(failed)
    }

    async fn subscribe(&self, topic: &str) -> DsResult<BoxStream<'static, Bytes>> {
        let mut pubsub = self.client.get_async_pubsub().await.map_err(failed)?;
        pubsub.subscribe(format!("girder:topic:{}:{topic}", self.namespace)).await.map_err(failed)?;
        Ok(Box::pin(pubsub.into_on_message().map(|message| Bytes::from(message.get_payload_bytes().to_vec()))))
    }

    async fn reliable_publish(&self, topic: &str, message: &[u8], retention: Retention) -> DsResult<u64> {
        let args = [ms(retention.count_max), ms(retention.age_ms_max.unwrap_or(0))];
        self.run("reliable_publish", Kind::ReliableTopic, topic, &[message, args[0].as_bytes(), args[1].as_bytes()])
            .await
    }

    async fn reliable_read(&self, topic: &str, after: u64, max: usize, wait_ms: u64) -> DsResult<ReliableBatch> {
        let batch = self.read_now(topic, after, max).await?;
        if !batch.messages.is_empty() || wait_ms == 0 {
            return Ok(batch);
        }
        // Block until a message past `after` exists, on a connection of our own.
        let mut conn = self.blocking_connection(wait_ms).await?;
        let _: redis::Value = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(wait_ms)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(self.base(topic))
            .arg(format!("{after}-0"))
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        self.read_now(topic, after, max).await
    }

    async fn wait_change(&self, key: &str, timeout_ms: u64) {
        self.ensure_listener();
        self.changes.wait(key, timeout_ms).await;
    }
}

impl Drop for RedisStructures {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.lock().take() {
            listener.abort();
        }
    }
}

impl RedisStructures {
    async fn read_now(&self, topic: &str, after: u64, max: usize) -> DsResult<ReliableBatch> {
        let reply: Vec<Vec<u8>> = self
            .run("reliable_read", Kind::ReliableTopic, topic, &[ms(after).as_bytes(), ms(max as u64).as_bytes()])
            .await?;
        let number = |bytes: &[u8]| std::str::from_utf8(bytes).ok().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        let first_retained = reply.first().map_or(0, |b| number(b));
        let last = reply.get(1).map_or(0, |b| number(b));
        let messages = reply[2.min(reply.len())..]
            .chunks(2)
            .filter_map(|pair| match pair {
                [seq, message] => Some((number(seq), Bytes::from(message.clone()))),
                _ => None,
            })
            .collect();
        Ok(ReliableBatch { first_retained, last, messages })
    }
}
