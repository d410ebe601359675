//! A node's store: its engine, its flocks' states, and what it does for other nodes: the
//! primary's write path, replica writes, reads, pages and copies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::engine::{Engine, Flock, ItemKey};
use super::ops::{Memo, OpMemory};
use super::proto::{self, Expect, Fault, FinalFault, Msg, Reply, WriteOp};
use super::record::{Record, RecordMeta, Version};
use super::routing::View;
use super::sync::Flocks;
use super::StoreConfig;
use crate::dataplane::{Body, DataClient, Handler, Request, Response};
use crate::placement::{Placement, FLOCKS};

/// Lock stripes per key hash, in two sets: `order` serializes a primary's writes of a key
/// across their replication; `local` guards one read-modify-write of the engine and is
/// never held across the network (a primary holding `order` on one node and waiting for a
/// replica's `local` on another cannot deadlock with the reverse).
const STRIPES: usize = 1_024;
/// Keys one `Fetch` asks for.
pub(crate) const FETCH_KEYS_MAX: usize = 256;
/// Record bytes after which a `Fetch` reply ends (it holds at least one record); the asker
/// then asks for the rest.
pub(crate) const FETCH_BYTES_MAX: usize = 32 << 20;
/// Items one page of a bucket or a flock carries.
pub(crate) const PAGE_ITEMS_MAX: u32 = 1_000;
/// Value bytes after which a page of a bucket ends (it holds at least one item), so a page
/// of large items stays bounded in memory on both sides.
pub(crate) const PAGE_BYTES_MAX: usize = 16 << 20;
/// Least time between two placement refreshes forced by refusals.
const REFRESH_GAP: Duration = Duration::from_millis(50);

/// The node's lease as its own clock sees it: time left, and how many times the node
/// registered (a node registered again was forgotten meanwhile, and may have missed writes).
pub(crate) type LeaseLeft = Arc<dyn Fn() -> (Duration, u64) + Send + Sync>;

/// What a node's store did, for metrics and status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Live items stored here.
    pub items: u64,
    /// Bytes stored here (encoded records).
    pub bytes: u64,
    /// Flocks held completely.
    pub flocks_ready: u32,
    /// Flocks being copied here now.
    pub flocks_syncing: u32,
    /// Writes acknowledged as primary.
    pub writes: u64,
    /// Replica writes stored.
    pub replicated: u64,
    /// Records copied here by catch-up and anti-entropy.
    pub copied: u64,
    /// Corrupt records found and rewritten from a replica.
    pub repaired: u64,
    /// Replica writes refused for a stale epoch or a sender that is not the primary.
    pub fenced: u64,
    /// Flock copies completed.
    pub syncs: u64,
    /// How long the flock waiting longest for its copy here has waited, in milliseconds:
    /// how far this node's replicas lag (0 when it holds all it owns).
    pub replication_lag_ms: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) writes: AtomicU64,
    pub(crate) replicated: AtomicU64,
    pub(crate) copied: AtomicU64,
    pub(crate) repaired: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) syncs: AtomicU64,
}

/// A node's store.
pub(crate) struct StoreNode {
    pub(crate) id: String,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) config: StoreConfig,
    pub(crate) placement: Arc<Placement>,
    lease_left: LeaseLeft,
    pub(crate) data: DataClient,
    /// Where this node's data plane is reached.
    pub(crate) address: Mutex<Option<String>>,
    order_stripes: Box<[tokio::sync::Mutex<()>]>,
    local_stripes: Box<[tokio::sync::Mutex<()>]>,
    /// Per flock: writes share it, a digest rebuild takes it alone.
    pub(crate) flock_locks: Box<[tokio::sync::RwLock<()>]>,
    pub(crate) flocks: Mutex<Flocks>,
    /// Which writes each recently written item's record holds, by op id.
    pub(crate) ops: Mutex<OpMemory>,
    pub(crate) counters: Counters,
    /// Decoded values of typed reads in this process.
    pub(crate) near: Arc<super::near::NearCache>,
    pub(crate) node_ttl_ms: u64,
    refreshed: tokio::sync::Mutex<Instant>,
}

/// What a replica write says besides the record.
#[derive(Debug, Clone, Copy)]
struct Replicated {
    /// The writer's op id, remembered by replicas too.
    op_id: u128,
    /// Whether the item existed before the write.
    existed: bool,
    /// The version an append extends (replicas then get only the appended bytes).
    append_to: Option<Version>,
}

/// The outcome of one hop: a reply and its body.
pub(crate) type Hop = (Reply, Bytes);

fn fault(fault: Fault) -> Hop {
    (Reply::Fault(fault), Bytes::new())
}

fn engine_fault(error: super::EngineError) -> Fault {
    use super::EngineError as E;
    match error {
        E::Full(why) => Fault::Final(FinalFault::Full(why)),
        E::ReadOnly(why) => Fault::Final(FinalFault::ReadOnly(why)),
        E::Corrupt { key, reason } => {
            Fault::Final(FinalFault::Corrupt(format!("{}/{}: {reason}", key.bucket, key.item)))
        }
        other => Fault::Unavailable(other.to_string()),
    }
}

/// Whether a bucket page ended at a limit (items or bytes), so more may follow it.
pub(crate) fn page_full(page: &[(String, Record)], limit: usize) -> bool {
    page.len() >= limit || page.iter().map(|(_, r)| r.value.len()).sum::<usize>() >= PAGE_BYTES_MAX
}

/// Runs `f` on the engine off the async threads.
pub(crate) async fn blocking<T, F>(engine: &Arc<dyn Engine>, f: F) -> Result<T, super::EngineError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Engine) -> Result<T, super::EngineError> + Send + 'static,
{
    let engine = engine.clone();
    match tokio::task::spawn_blocking(move || f(engine.as_ref())).await {
        Ok(result) => result,
        Err(join) => Err(super::EngineError::Io(format!("the engine task failed: {join}"))),
    }
}

impl StoreNode {
    /// A store for node `id` on `engine`.
    pub(crate) fn new(
        id: String,
        engine: Arc<dyn Engine>,
        config: StoreConfig,
        placement: Arc<Placement>,
        lease_left: LeaseLeft,
        node_ttl_ms: u64,
    ) -> StoreNode {
        StoreNode {
            id,
            engine,
            data: DataClient::new(crate::dataplane::DataConfig::default()),
            config,
            placement,
            lease_left,
            address: Mutex::new(None),
            order_stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            local_stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            flock_locks: (0..FLOCKS).map(|_| tokio::sync::RwLock::new(())).collect(),
            flocks: Mutex::new(Flocks::new()),
            ops: Mutex::new(OpMemory::new()),
            counters: Counters::default(),
            near: Arc::new(super::near::NearCache::new()),
            node_ttl_ms,
            refreshed: tokio::sync::Mutex::new(Instant::now() - REFRESH_GAP),
        }
    }

    /// Placement as last read.
    pub(crate) fn view(&self) -> View {
        let (table, nodes, node_ttl_ms) = self.placement.view();
        View::new(table, nodes, node_ttl_ms)
    }

    /// Reads placement again (at most every 50 ms however many ask), then the view.
    pub(crate) async fn refresh(&self) -> View {
        self.refresh_to(u64::MAX).await
    }

    /// Reads placement again unless the view already has table `epoch` or a newer one
    /// (then at once, since a peer showed that it exists); else at most every 50 ms.
    pub(crate) async fn refresh_to(&self, epoch: u64) -> View {
        let mut last = self.refreshed.lock().await;
        let behind = epoch != u64::MAX && self.view().epoch() < epoch;
        if behind || (epoch == u64::MAX && last.elapsed() >= REFRESH_GAP) {
            if let Err(err) = self.placement.refresh(self.node_ttl_ms).await {
                tracing::debug!(error = %err, "store: placement refresh failed");
            }
            *last = Instant::now();
        }
        drop(last);
        self.view()
    }

    /// Whether this node's lease certainly holds.
    pub(crate) fn lease_held(&self) -> bool {
        !(self.lease_left)().0.is_zero()
    }

    /// The node's registrations so far (see [`LeaseLeft`]).
    pub(crate) fn registrations(&self) -> u64 {
        (self.lease_left)().1
    }

    /// Whether this node may serve reads of `flock` now: it holds it completely, its lease
    /// holds, and it was not forgotten since it caught up (it may have missed writes then).
    pub(crate) fn serves(&self, flock: Flock) -> bool {
        let (left, registrations) = (self.lease_left)();
        let flocks = self.flocks.lock();
        !left.is_zero() && flocks.registrations == registrations && flocks.is_ready(flock)
    }

    fn stripe(key: &ItemKey) -> usize {
        let mut hasher = blake3::Hasher::new();
        hasher.update(key.bucket.as_bytes());
        hasher.update(&[0]);
        hasher.update(key.item.as_bytes());
        let hash = hasher.finalize();
        let b = hash.as_bytes();
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize % STRIPES
    }

    /// The lock a primary holds while it writes `key` and replicates the write.
    fn order_of(&self, key: &ItemKey) -> &tokio::sync::Mutex<()> {
        &self.order_stripes[Self::stripe(key)]
    }

    /// The lock of one local read-modify-write of `key` (never held across the network).
    pub(crate) fn local_of(&self, key: &ItemKey) -> &tokio::sync::Mutex<()> {
        &self.local_stripes[Self::stripe(key)]
    }

    /// Writes `record` here, keeping the flock's digest in step; the caller holds the
    /// key's stripe and read `old` under it.
    pub(crate) async fn store_local(
        &self,
        key: &ItemKey,
        old: Option<RecordMeta>,
        record: Record,
    ) -> Result<(), super::EngineError> {
        let Some(lock) = self.flock_locks.get(key.flock as usize) else {
            return Err(super::EngineError::Io(format!("flock {} out of range", key.flock)));
        };
        let _shared = lock.read().await;
        self.store_shared(key, old, record).await
    }

    /// [`Self::store_local`] for a caller that holds the flock's lock shared already.
    async fn store_shared(
        &self,
        key: &ItemKey,
        old: Option<RecordMeta>,
        record: Record,
    ) -> Result<(), super::EngineError> {
        if self.config.data_dir.is_none() {
            let stored: u64 = self.engine.usage().iter().map(|u| u.bytes).sum();
            if stored.saturating_add(record.value.len() as u64) > self.config.memory_bytes_max {
                return Err(super::EngineError::Full(format!(
                    "the in-memory store holds {stored} bytes of at most {}",
                    self.config.memory_bytes_max
                )));
            }
        }
        let meta = record.meta();
        let batch = vec![(key.clone(), record)];
        blocking(&self.engine, move |engine| engine.write(&batch)).await?;
        self.flocks.lock().wrote(key, old.as_ref(), &meta);
        Ok(())
    }

    /// The record of `key` here; `Ok(None)` when absent. A corrupt copy counts as absent
    /// for replication (`repair` decides) and is reported by reads.
    pub(crate) async fn local(&self, key: &ItemKey) -> Result<Option<Record>, super::EngineError> {
        let key = key.clone();
        blocking(&self.engine, move |engine| engine.get(&key)).await
    }

    /// The primary's write path.
    pub(crate) async fn write(&self, key: ItemKey, op: WriteOp, op_id: u128, epoch: u64, body: Bytes) -> Hop {
        if !self.lease_held() {
            return fault(Fault::LeaseLapsed);
        }
        let mut view = self.view();
        if epoch > view.epoch() {
            view = self.refresh_to(epoch).await;
        }
        if view.primary(key.flock) != Some(self.id.as_str()) {
            return fault(Fault::NotPrimary { epoch: view.epoch() });
        }
        if body.len() as u64 > self.config.item_bytes_max {
            let max = self.config.item_bytes_max;
            return fault(Fault::Final(FinalFault::TooLarge { bytes: body.len() as u64, max }));
        }
        let _order = self.order_of(&key).lock().await;
        let current = match self.current(&view, &key).await {
            Ok(current) => current,
            Err(fault) => return (Reply::Fault(fault), Bytes::new()),
        };
        let remembered = self.ops.lock().recall(&key, op_id);
        let done = match remembered {
            Some(memo) => self.resend(&view, &key, current, memo).await,
            None => self.apply(&view, &key, op, op_id, body).await,
        };
        let (version, existed) = match done {
            Ok(done) => done,
            Err(fault) => return (Reply::Fault(fault), Bytes::new()),
        };
        // Acknowledge only while the lease holds: a primary frozen past it may have been
        // replaced, and a write it could not fence must not be reported as done.
        if !self.lease_held() {
            return fault(Fault::LeaseLapsed);
        }
        // Nor once this node has seen a newer table: a new owner may have sealed the flock
        // here and copied it before this write landed (see `Msg::Seal`). The writer retries
        // under the new table, where the op id keeps it from being applied twice.
        let now = self.view().epoch();
        if now != view.epoch() {
            return fault(Fault::StaleEpoch { epoch: now });
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        (Reply::Written { version, existed }, Bytes::new())
    }

    /// A retry of a write the record here holds (applied here as primary or as a replica,
    /// or copied here with its memo): sends the record whole to the replicas, so they hold
    /// it too, and answers as the first time.
    async fn resend(
        &self,
        view: &View,
        key: &ItemKey,
        current: Option<Record>,
        memo: Memo,
    ) -> Result<(Version, bool), Fault> {
        let Some(record) = current else { return Ok((Version::default(), memo.existed)) };
        let value = record.value.clone();
        let op = Replicated { op_id: memo.op_id, existed: memo.existed, append_to: None };
        self.replicate_all(view, key, &record, op, value).await?;
        Ok((memo.version, memo.existed))
    }

    /// Applies a new write here and on the replicas at once: the version it made and
    /// whether the item existed (`Version::default()`: nothing to write, as when deleting
    /// an absent item). Remembers `op_id` once stored here, so a retry is not applied twice.
    async fn apply(
        &self,
        view: &View,
        key: &ItemKey,
        op: WriteOp,
        op_id: u128,
        body: Bytes,
    ) -> Result<(Version, bool), Fault> {
        let local = self.local_of(key).lock().await;
        let current = match self.local(key).await {
            Ok(current) => current,
            Err(super::EngineError::Corrupt { .. }) => None,
            Err(err) => return Err(engine_fault(err)),
        };
        let Some((record, append_to, existed)) = self.next_record(view, current.as_ref(), op, body)? else {
            return Ok((Version::default(), false));
        };
        let appended = match (append_to, current.as_ref()) {
            (Some(_), Some(old)) => record.value.slice(old.value.len()..),
            _ => record.value.clone(),
        };
        // The local write and the replica writes overlap; the local lock goes with the local
        // write alone, so it is never held while waiting on the network.
        let (old, mine) = (current.as_ref().map(Record::meta), record.clone());
        let store = async move {
            let stored = self.store_local(key, old, mine).await;
            drop(local);
            stored
        };
        let op = Replicated { op_id, existed, append_to };
        let (stored, sent) = tokio::join!(store, self.replicate_all(view, key, &record, op, appended));
        if let Err(err) = stored {
            // Replicas may now hold a version this node lacks: it catches up on the flock
            // (from them) before it serves or writes from its own copy again.
            self.flocks.lock().unready(key.flock);
            return Err(engine_fault(err));
        }
        self.ops.lock().extend(key, Memo { op_id, version: record.version, existed });
        sent?;
        Ok((record.version, existed))
    }

    /// The item's current record, fetched from a holder first while this node still
    /// catches up on its flock, and rewritten from a replica if the local copy is corrupt.
    async fn current(&self, view: &View, key: &ItemKey) -> Result<Option<Record>, Fault> {
        let ready = self.serves(key.flock);
        let (local, corrupt) = match self.local(key).await {
            Ok(local) => (local, false),
            Err(super::EngineError::Corrupt { .. }) => (None, true),
            Err(err) => return Err(engine_fault(err)),
        };
        // Holding the flock completely, this node's copy is the item (absent: no item).
        if ready && !corrupt {
            return Ok(local);
        }
        // What a holder has of the item may still change under an older table until the
        // flock is sealed at this one.
        self.seal(view, vec![key.flock]).await?;
        // Every holder that may serve it is asked, and the newest copy wins: one holder's
        // report of readiness may be stale. A write on this node's partial copy alone could
        // make an older version than the one acknowledged, so with no answer it waits (with no
        // holder to ask, this node's copy is all there is).
        let mut best = local;
        let readers: Vec<String> = view.readers(key.flock).into_iter().filter(|n| *n != self.id).collect();
        let mut answered = readers.is_empty();
        for reader in readers {
            match self.fetch_one(view, &reader, key).await {
                Ok(Some((remote, memos))) => {
                    answered = true;
                    if best.as_ref().is_none_or(|b| b.version < remote.version) {
                        self.merge(key, remote.clone(), memos).await?;
                        best = Some(remote);
                    }
                }
                Ok(None) => answered = true,
                Err(fault) => tracing::debug!(node = %reader, ?fault, "store: fetch from a holder failed"),
            }
        }
        if !answered {
            return Err(Fault::Unavailable(format!("no holder of flock {} answered for its item", key.flock)));
        }
        Ok(best)
    }

    /// What a write makes of the current record: the new record, the version an append
    /// extends (replicas then receive only the appended bytes), and whether the item
    /// existed. `None`: nothing to write (deleting an absent item).
    fn next_record(
        &self,
        view: &View,
        current: Option<&Record>,
        op: WriteOp,
        body: Bytes,
    ) -> Result<Option<(Record, Option<Version>, bool)>, Fault> {
        let live = current.filter(|r| !r.tombstone);
        let seq = current.map_or(0, |r| r.version.seq) + 1;
        let version = Version { seq, epoch: view.epoch() };
        let written_ms = now_ms();
        let existed = live.is_some();
        let record = |value: Bytes, tombstone: bool| Record { version, tombstone, written_ms, value };
        match op {
            WriteOp::Put(expect) => {
                let actual = live.map(|r| r.version.seq);
                let matches = match expect {
                    Expect::Any => true,
                    Expect::Absent => actual.is_none(),
                    Expect::Version(v) => actual == Some(v),
                };
                if !matches {
                    return Err(Fault::Final(FinalFault::Conflict { expected: expect, actual }));
                }
                Ok(Some((record(body, false), None, existed)))
            }
            WriteOp::Append => {
                let Some(old) = live else { return Ok(Some((record(body, false), None, false))) };
                let total = old.value.len() as u64 + body.len() as u64;
                if total > self.config.item_bytes_max {
                    let max = self.config.item_bytes_max;
                    return Err(Fault::Final(FinalFault::TooLarge { bytes: total, max }));
                }
                let mut value = BytesMut::with_capacity(total as usize);
                value.extend_from_slice(&old.value);
                value.extend_from_slice(&body);
                Ok(Some((record(value.freeze(), false), Some(old.version), true)))
            }
            WriteOp::Delete if live.is_none() => Ok(None),
            WriteOp::Delete => Ok(Some((record(Bytes::new(), true), None, true))),
        }
    }

    /// Sends the write to every other node that must hold it, all at once, and waits for
    /// as many as the quorum asks (all, by default).
    async fn replicate_all(
        &self,
        view: &View,
        key: &ItemKey,
        record: &Record,
        op: Replicated,
        appended: Bytes,
    ) -> Result<(), Fault> {
        let targets = view.replicas(key.flock, &self.id);
        if targets.is_empty() {
            return Ok(());
        }
        let owners = view.owners(key.flock);
        let sends = targets.iter().map(|target| {
            let appended = appended.clone();
            async move { (target, self.replicate_to(view, target, key, record, op, appended).await) }
        });
        let results = futures::future::join_all(sends).await;
        // Acknowledgements needed from owners other than the primary; holders handing the
        // flock over are always needed, since they may still serve reads.
        let others = owners.len().saturating_sub(1);
        let needed = self.config.write_quorum.map_or(others, |w| (w as usize).saturating_sub(1).min(others));
        let mut acked = 0;
        for (target, result) in results {
            let owner = owners.contains(&target.as_str());
            match result {
                Ok(()) => acked += usize::from(owner),
                Err(fault) if owner && self.config.write_quorum.is_some() => {
                    tracing::debug!(node = %target, ?fault, "store: replica write failed (quorum may still hold)");
                }
                Err(fault) => return Err(fault),
            }
        }
        if acked < needed {
            return Err(Fault::Unavailable(format!("{acked} of {needed} replicas acknowledged")));
        }
        Ok(())
    }

    async fn replicate_to(
        &self,
        view: &View,
        target: &str,
        key: &ItemKey,
        record: &Record,
        op: Replicated,
        appended: Bytes,
    ) -> Result<(), Fault> {
        let lease_ms = u64::try_from((self.lease_left)().0.as_millis()).unwrap_or(u64::MAX);
        let message = |append_to: Option<Version>| Msg::Replicate {
            key: key.clone(),
            version: record.version,
            tombstone: record.tombstone,
            written_ms: record.written_ms,
            append_to,
            epoch: view.epoch(),
            primary: self.id.clone(),
            lease_ms,
            op_id: op.op_id,
            existed: op.existed,
        };
        let first = if op.append_to.is_some() { appended } else { record.value.clone() };
        let (reply, _) = self.send(view, target, &message(op.append_to), first).await?;
        match reply {
            Reply::Stored => Ok(()),
            Reply::Fault(Fault::NeedWhole) => {
                match self.send(view, target, &message(None), record.value.clone()).await? {
                    (Reply::Stored, _) => Ok(()),
                    (Reply::Fault(fault), _) => Err(fault),
                    (other, _) => Err(Fault::Unavailable(format!("unexpected reply {other:?}"))),
                }
            }
            Reply::Fault(fault) => Err(fault),
            other => Err(Fault::Unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends `message` with `body` to `target`'s data plane; the reply and its body (up to
    /// the item limit plus room for a page's framing).
    pub(crate) async fn send(&self, view: &View, target: &str, message: &Msg, body: Bytes) -> Result<Hop, Fault> {
        let Some(address) = view.address(target) else {
            return Err(Fault::Unavailable(format!("node {target} has no data address")));
        };
        self.send_address(target, address, message, body).await
    }

    /// [`Self::send`] of a message without a body, answered within `timeout`.
    pub(crate) async fn send_within(
        &self,
        view: &View,
        target: &str,
        message: &Msg,
        timeout: Duration,
    ) -> Result<Hop, Fault> {
        match tokio::time::timeout(timeout, self.send(view, target, message, Bytes::new())).await {
            Ok(hop) => hop,
            Err(_) => Err(Fault::Unavailable(format!("node {target} did not answer in {timeout:?}"))),
        }
    }

    /// Sends `message` with `body` to the data plane at `address` (node `target`'s).
    pub(crate) async fn send_address(
        &self,
        target: &str,
        address: &str,
        message: &Msg,
        body: Bytes,
    ) -> Result<Hop, Fault> {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let request =
            self.data.request(address, proto::encode(message), Body::from_bytes(body), self.config.compression);
        let response = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Err(Fault::Unavailable(format!("node {target}: {err}"))),
            Err(_) => return Err(Fault::Unavailable(format!("node {target} did not answer in {timeout:?}"))),
        };
        let reply: Reply = proto::decode(&response.header).map_err(Fault::Unavailable)?;
        let limit = usize::try_from(self.config.item_bytes_max).unwrap_or(usize::MAX).saturating_add(1 << 20);
        let body = response.body.collect(limit).await.map_err(|e| Fault::Unavailable(format!("node {target}: {e}")))?;
        Ok((reply, body))
    }

    /// A replica write from the flock's primary.
    async fn replicate(&self, message: Msg, body: Bytes) -> Hop {
        let Msg::Replicate { key, version, tombstone, written_ms, append_to, epoch, primary, lease_ms, op_id, existed } =
            message
        else {
            return fault(Fault::Unavailable("not a replica write".into()));
        };
        if epoch > self.view().epoch() {
            self.refresh_to(epoch).await;
        }
        // A replica whose own lease ran out may have been replaced: it stores nothing.
        if !self.lease_held() {
            return fault(Fault::LeaseLapsed);
        }
        let _local = self.local_of(&key).lock().await;
        let Some(gate) = self.flock_locks.get(key.flock as usize) else {
            return fault(Fault::Final(FinalFault::Invalid(format!("flock {} out of range", key.flock))));
        };
        // The table is checked and the record stored under the flock's lock, shared: a seal
        // (`Msg::Seal`) reads the newer table, then takes the lock alone, so either it waits
        // for this write or this write sees the newer table and is refused.
        let _shared = gate.read().await;
        let view = self.view();
        if epoch > view.epoch() {
            return fault(Fault::Unavailable(format!("replica {} has not seen table {epoch} yet", self.id)));
        }
        if epoch != view.epoch() || view.primary(key.flock) != Some(primary.as_str()) || lease_ms == 0 {
            self.counters.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%primary, epoch, mine = view.epoch(), flock = key.flock, "store: replica write fenced");
            return fault(Fault::StaleEpoch { epoch: view.epoch() });
        }
        let local = match self.local(&key).await {
            Ok(local) => local,
            Err(super::EngineError::Corrupt { .. }) => None,
            Err(err) => return fault(engine_fault(err)),
        };
        // Remembered once the record here holds it: should this node become the primary
        // and the writer retry, the write is not applied twice. A newer record here may
        // not hold it (another primary's), so only the very same version counts.
        let memo = Memo { op_id, version, existed };
        if local.as_ref().is_some_and(|l| l.version >= version) {
            if local.as_ref().is_some_and(|l| l.version == version) {
                self.ops.lock().extend(&key, memo);
            }
            return (Reply::Stored, Bytes::new());
        }
        let value = match (append_to, local.as_ref()) {
            (None, _) => body,
            (Some(base), Some(old)) if old.version == base && !old.tombstone => {
                let mut value = BytesMut::with_capacity(old.value.len() + body.len());
                value.extend_from_slice(&old.value);
                value.extend_from_slice(&body);
                value.freeze()
            }
            (Some(_), _) => return fault(Fault::NeedWhole),
        };
        let record = Record { version, tombstone, written_ms, value };
        if let Err(err) = self.store_shared(&key, local.as_ref().map(Record::meta), record).await {
            return fault(engine_fault(err));
        }
        // Extending the record keeps its memos; a whole value need not descend from it.
        match append_to {
            Some(_) => self.ops.lock().extend(&key, memo),
            None => self.ops.lock().replace(&key, vec![memo]),
        }
        self.flocks.lock().hold(key.flock);
        self.counters.replicated.fetch_add(1, Ordering::Relaxed);
        (Reply::Stored, Bytes::new())
    }

    /// A read of an item this node holds completely; a corrupt copy is rewritten from a
    /// replica and never served.
    pub(crate) async fn get(&self, key: &ItemKey) -> Hop {
        if !self.serves(key.flock) {
            return fault(Fault::NotReady);
        }
        let record = match self.local(key).await {
            Ok(record) => record,
            Err(super::EngineError::Corrupt { reason, .. }) => match self.repair(key, &reason).await {
                Ok(record) => record,
                Err(fault) => return (Reply::Fault(fault), Bytes::new()),
            },
            Err(err) => return fault(engine_fault(err)),
        };
        match record {
            Some(r) if !r.tombstone => (Reply::Item(Some(r.version)), r.value),
            _ => (Reply::Item(None), Bytes::new()),
        }
    }

    /// Replaces a corrupt local copy of `key` with a good one from another holder.
    async fn repair(&self, key: &ItemKey, reason: &str) -> Result<Option<Record>, Fault> {
        tracing::warn!(bucket = %key.bucket, item = %key.item, reason, "store: corrupt record, repairing from a replica");
        let view = self.view();
        for holder in view.readers(key.flock).into_iter().filter(|n| *n != self.id) {
            let Ok(found) = self.fetch_one(&view, &holder, key).await else { continue };
            let Some((record, memos)) = found else { continue };
            // Stored unless a newer write came meanwhile; counted as a repair there.
            self.merge(key, record.clone(), memos).await?;
            return Ok(Some(record));
        }
        Err(Fault::Final(FinalFault::Corrupt(format!(
            "{}/{}: {reason}; no replica could replace it",
            key.bucket, key.item
        ))))
    }

    /// One record from `node` with its memos (`None`: it has none).
    pub(crate) async fn fetch_one(
        &self,
        view: &View,
        node: &str,
        key: &ItemKey,
    ) -> Result<Option<(Record, Vec<Memo>)>, Fault> {
        let mut records = self.fetch(view, node, vec![key.clone()]).await?;
        Ok(records.pop().map(|(_, r, memos)| (r, memos)))
    }

    /// Records from `node` with their memos, each checked against its checksum; asks again
    /// for the keys after a reply that ended at the sender's byte limit.
    pub(crate) async fn fetch(
        &self,
        view: &View,
        node: &str,
        mut keys: Vec<ItemKey>,
    ) -> Result<Vec<(ItemKey, Record, Vec<Memo>)>, Fault> {
        let mut records = Vec::with_capacity(keys.len());
        while !keys.is_empty() {
            let (reply, body) = self.send(view, node, &Msg::Fetch { keys: keys.clone() }, Bytes::new()).await?;
            let more = match reply {
                Reply::Page { more } => more,
                Reply::Fault(fault) => return Err(fault),
                other => return Err(Fault::Unavailable(format!("unexpected reply {other:?}"))),
            };
            let page: proto::RecordPage = proto::decode(&body).map_err(Fault::Unavailable)?;
            // Cut short, the page ends with the last key the sender looked at.
            let rest = match page.0.last().map(|(last, _, _)| keys.iter().position(|k| k == last)) {
                Some(Some(at)) if more => keys.split_off(at + 1),
                _ if more => return Err(Fault::Unavailable(format!("node {node} cut a fetch short wrongly"))),
                _ => Vec::new(),
            };
            for (key, bytes, memos) in page.0 {
                let record = Record::decode(&bytes)
                    .map_err(|e| Fault::Unavailable(format!("node {node} sent a bad record: {e}")))?;
                records.push((key, record, memos));
            }
            keys = rest;
        }
        Ok(records)
    }

    /// Serves `Fetch`: the records this node has of `keys` (corrupt ones left out), in their
    /// order, ending (`more`) once they pass [`FETCH_BYTES_MAX`] bytes.
    async fn serve_fetch(&self, keys: Vec<ItemKey>) -> Hop {
        if keys.len() > FETCH_KEYS_MAX {
            return fault(Fault::Final(FinalFault::Invalid(format!("at most {FETCH_KEYS_MAX} keys per fetch"))));
        }
        let found = blocking(&self.engine, move |engine| {
            let (mut found, mut bytes, mut more) = (Vec::with_capacity(keys.len()), 0usize, false);
            let last = keys.len().saturating_sub(1);
            for (at, key) in keys.into_iter().enumerate() {
                if let Ok(Some(record)) = engine.get(&key) {
                    let encoded = Bytes::from(record.encode());
                    bytes += encoded.len();
                    found.push((key, encoded, Vec::new()));
                    if bytes >= FETCH_BYTES_MAX && at < last {
                        more = true;
                        break;
                    }
                }
            }
            Ok((found, more))
        })
        .await;
        match found {
            Ok((mut found, more)) => {
                // Memos read after the records: one that arrived meanwhile is left out,
                // which only risks a repeat, never a memo of a write the copy lacks.
                let ops = self.ops.lock();
                found.iter_mut().for_each(|(key, _, memos)| *memos = ops.of(key));
                drop(ops);
                (Reply::Page { more }, proto::encode(&proto::RecordPage(found)))
            }
            Err(err) => fault(engine_fault(err)),
        }
    }

    /// Serves `Scan`: a page of a bucket's live items.
    async fn serve_scan(&self, flock: Flock, bucket: String, after: Option<String>, limit: u32) -> Hop {
        if !self.serves(flock) {
            return fault(Fault::NotReady);
        }
        let limit = limit.clamp(1, PAGE_ITEMS_MAX) as usize;
        let scanned = blocking(&self.engine, move |engine| {
            engine.scan_bucket_bytes(flock, &bucket, after.as_deref(), limit, PAGE_BYTES_MAX).map(|r| (bucket, r))
        })
        .await;
        match scanned {
            Ok((bucket, records)) => {
                let more = page_full(&records, limit);
                let page = records
                    .into_iter()
                    .filter(|(_, r)| !r.tombstone)
                    .map(|(item, r)| {
                        (ItemKey { flock, bucket: bucket.clone(), item }, Bytes::from(r.encode()), Vec::new())
                    })
                    .collect();
                (Reply::Page { more }, proto::encode(&proto::RecordPage(page)))
            }
            Err(err) => fault(engine_fault(err)),
        }
    }

    /// Serves `Meta`: a page of a flock's keys with their record metadata.
    async fn serve_meta(&self, flock: Flock, after: Option<ItemKey>, limit: u32) -> Hop {
        let limit = limit.clamp(1, PAGE_ITEMS_MAX) as usize;
        match blocking(&self.engine, move |engine| engine.scan_flock(flock, after.as_ref(), limit)).await {
            Ok(page) => (Reply::Page { more: page.len() == limit }, proto::encode(&proto::MetaPage(page))),
            Err(err) => fault(engine_fault(err)),
        }
    }

    /// Serves `DeleteBucket` as the primary: deletes a page of the bucket's items, each
    /// through the write path (replicated like any delete).
    async fn serve_delete_bucket(&self, page: (Flock, String, Option<String>), epoch: u64, limit: u32) -> Hop {
        let (flock, bucket, after) = page;
        let limit = limit.clamp(1, PAGE_ITEMS_MAX) as usize;
        let name = bucket.clone();
        let scanned =
            blocking(&self.engine, move |e| e.scan_bucket_bytes(flock, &name, after.as_deref(), limit, PAGE_BYTES_MAX))
                .await;
        let page = match scanned {
            Ok(page) => page,
            Err(err) => return fault(engine_fault(err)),
        };
        let next = if page_full(&page, limit) { page.last().map(|(item, _)| item.clone()) } else { None };
        let live = page.into_iter().filter(|(_, r)| !r.tombstone).map(|(item, _)| item);
        let mut deleted = 0;
        for item in live {
            let key = ItemKey { flock, bucket: bucket.clone(), item };
            match self.write(key, WriteOp::Delete, fastrand::u128(..), epoch, Bytes::new()).await {
                (Reply::Written { existed, .. }, _) => deleted += u64::from(existed),
                other => return other,
            }
        }
        (Reply::Deleted { items: deleted, next }, Bytes::new())
    }

    /// The store's figures now.
    pub(crate) fn stats(&self) -> StoreStats {
        let usage = self.engine.usage();
        let flocks = self.flocks.lock();
        let c = &self.counters;
        StoreStats {
            items: usage.iter().map(|u| u.items).sum(),
            bytes: usage.iter().map(|u| u.bytes).sum(),
            flocks_ready: flocks.ready_count(),
            flocks_syncing: flocks.syncing_count(),
            writes: c.writes.load(Ordering::Relaxed),
            replicated: c.replicated.load(Ordering::Relaxed),
            copied: c.copied.load(Ordering::Relaxed),
            repaired: c.repaired.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            replication_lag_ms: u64::try_from(flocks.lag().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// What this node reports with its heartbeat.
    pub(crate) fn report(&self) -> crate::control::StoreReport {
        let stats = self.stats();
        let flocks = self.flocks.lock();
        crate::control::StoreReport {
            epoch: flocks.epoch,
            ready: flocks.ready_bits(),
            held: flocks.held_bits(),
            items: stats.items,
            bytes: stats.bytes,
            syncing: stats.flocks_syncing,
        }
    }

    async fn dispatch(&self, message: Msg, body: Body) -> Hop {
        let limit = usize::try_from(self.config.item_bytes_max).unwrap_or(usize::MAX);
        let body = match body.collect(limit).await {
            Ok(body) => body,
            Err(err) => return fault(Fault::Unavailable(format!("reading the request body: {err}"))),
        };
        match message {
            Msg::Write { key, op, op_id, epoch } => self.write(key, op, op_id, epoch, body).await,
            message @ Msg::Replicate { .. } => self.replicate(message, body).await,
            Msg::Get { key } => self.get(&key).await,
            Msg::Scan { flock, bucket, after, limit } => self.serve_scan(flock, bucket, after, limit).await,
            Msg::DeleteBucket { flock, bucket, after, epoch, limit } => {
                self.serve_delete_bucket((flock, bucket, after), epoch, limit).await
            }
            Msg::Digests { flocks } => {
                let digests = self.flocks.lock().digests(&flocks);
                (Reply::Digests(digests), Bytes::new())
            }
            Msg::Meta { flock, after, limit } => self.serve_meta(flock, after, limit).await,
            Msg::Fetch { keys } => self.serve_fetch(keys).await,
            Msg::Seal { epoch, flocks } => self.serve_seal(epoch, flocks).await,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The data plane's handler for a node's store.
pub(crate) struct StoreHandler(pub(crate) Arc<StoreNode>);

#[async_trait::async_trait]
impl Handler for StoreHandler {
    async fn handle(&self, request: Request) -> Response {
        let (reply, body) = match proto::decode::<Msg>(&request.header) {
            Ok(message) if valid(&message) => self.0.dispatch(message, request.body).await,
            Ok(_) => fault(Fault::Final(FinalFault::Invalid("a key or flock out of range".into()))),
            Err(why) => fault(Fault::Final(FinalFault::Invalid(why))),
        };
        Response { header: proto::encode(&reply), body: Body::from_bytes(body) }
    }
}

/// Whether a peer's message names keys this store could hold.
fn valid(message: &Msg) -> bool {
    let key_ok = |k: &ItemKey| {
        k.flock < FLOCKS && super::item_key(&k.bucket, &k.item).is_ok_and(|checked| checked.flock == k.flock)
    };
    match message {
        Msg::Write { key, .. } | Msg::Replicate { key, .. } | Msg::Get { key } => key_ok(key),
        Msg::Scan { flock, bucket, .. } | Msg::DeleteBucket { flock, bucket, .. } => {
            super::check_key("bucket", bucket).is_ok() && crate::placement::flock_of(bucket.as_bytes()) == *flock
        }
        Msg::Digests { flocks } | Msg::Seal { flocks, .. } => {
            flocks.len() <= FLOCKS as usize && flocks.iter().all(|f| *f < FLOCKS)
        }
        Msg::Meta { flock, after, .. } => *flock < FLOCKS && after.as_ref().is_none_or(key_ok),
        Msg::Fetch { keys } => keys.iter().all(key_ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Embedded, EmbeddedConfig, Node, PoolSpec, Statekeeper, WorkerSpec};

    async fn node(sk: &Arc<dyn Statekeeper>, id: &str) -> Node {
        let config = StoreConfig { request_timeout_ms: 2_000, ..StoreConfig::default() };
        let builder = Node::builder().id(id).statekeeper(sk.clone()).heartbeat_ms(50);
        let builder = builder.pool(PoolSpec::new("main")).workers(WorkerSpec::new("main", 1, 1));
        builder.store(config).start().await.expect("node starts")
    }

    fn replicate(key: &ItemKey, epoch: u64, primary: &str, seq: u64) -> Msg {
        Msg::Replicate {
            key: key.clone(),
            version: Version { seq, epoch },
            tombstone: false,
            written_ms: 0,
            append_to: None,
            epoch,
            primary: primary.to_owned(),
            lease_ms: 1_000,
            op_id: 0,
            existed: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replica_writes_with_a_stale_epoch_or_from_a_non_primary_are_refused() {
        let sk: Arc<dyn Statekeeper> =
            Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 1_000, ..Default::default() }));
        let (a, b) = (node(&sk, "a").await, node(&sk, "b").await);
        let store = a.store().expect("a store");
        // Wait until both nodes are in the table (every flock owned by both).
        let begun = Instant::now();
        while a.placement().table().nodes.len() < 2 || b.placement().table().nodes.len() < 2 {
            assert!(begun.elapsed() < Duration::from_secs(10), "the table never held both nodes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.put("fenced", "item", &b"good"[..]).await.expect("a write");
        let key = super::super::item_key("fenced", "item").expect("a key");
        let view = a.farm().expect("a farm").node.view();
        let primary = view.primary(key.flock).expect("a primary").to_owned();
        let replica = if primary == "a" { &b } else { &a };
        let target = replica.farm().expect("a farm").node.clone();
        let epoch = view.epoch();
        // An older epoch: refused, counted, nothing stored.
        let (reply, _) = target.replicate(replicate(&key, epoch - 1, &primary, 99), Bytes::from_static(b"stale")).await;
        assert!(matches!(reply, Reply::Fault(Fault::StaleEpoch { .. })), "{reply:?}");
        // The right epoch from a node that is not the primary: refused too.
        let other = if primary == "a" { "b" } else { "a" };
        let (reply, _) = target.replicate(replicate(&key, epoch, other, 99), Bytes::from_static(b"usurper")).await;
        assert!(matches!(reply, Reply::Fault(Fault::StaleEpoch { .. })), "{reply:?}");
        assert_eq!(target.counters.fenced.load(Ordering::Relaxed), 2);
        let stored = target.local(&key).await.expect("a read").expect("the replica holds it");
        assert_eq!(&stored.value[..], b"good");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_past_the_byte_limit_is_answered_in_parts_and_the_asker_gets_every_record() {
        let sk: Arc<dyn Statekeeper> =
            Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 1_000, ..Default::default() }));
        let (a, b) = (node(&sk, "a").await, node(&sk, "b").await);
        let begun = Instant::now();
        while a.placement().table().nodes.len() < 2 || b.placement().table().nodes.len() < 2 {
            assert!(begun.elapsed() < Duration::from_secs(10), "the table never held both nodes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store = a.store().expect("a store");
        let item_bytes = 12 << 20;
        let mut keys = Vec::new();
        for i in 0..4u8 {
            let value = Bytes::from(vec![i; item_bytes]);
            store.put("big", &format!("item-{i}"), value).await.expect("a write");
            keys.push(super::super::item_key("big", &format!("item-{i}")).expect("a key"));
        }
        // Both nodes own every flock, so both hold every record.
        let (a_node, b_node) = (a.farm().expect("a farm").node.clone(), b.farm().expect("a farm").node.clone());
        let (reply, body) = b_node.serve_fetch(keys.clone()).await;
        let page: proto::RecordPage = proto::decode(&body).expect("a page");
        assert!(matches!(reply, Reply::Page { more: true }), "{reply:?}");
        assert_eq!(page.0.len(), FETCH_BYTES_MAX.div_ceil(item_bytes), "the reply ends past the limit");
        let view = a_node.view();
        let records = a_node.fetch(&view, "b", keys.clone()).await.expect("a fetch");
        let got: Vec<_> = records.iter().map(|(k, r, _)| (k.clone(), r.value[0], r.value.len())).collect();
        let want: Vec<_> = keys.iter().enumerate().map(|(i, k)| (k.clone(), i as u8, item_bytes)).collect();
        assert_eq!(got, want);
        a.shutdown().await;
        b.shutdown().await;
    }
}
