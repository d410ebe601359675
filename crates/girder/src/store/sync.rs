//! Keeping a node's farm in step with the table: which flocks it holds and serves, copying
//! the flocks it gained from a node that holds them, dropping the ones it handed over, and
//! anti-entropy (owners compare a digest per flock and pull what they lack).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::engine::{Flock, ItemKey};
use super::proto::{Fault, MetaPage, Msg, Reply};
use super::record::RecordMeta;
use super::routing::{bitmap, View};
use super::service::{blocking, StoreNode, FETCH_BYTES_MAX, FETCH_KEYS_MAX, PAGE_ITEMS_MAX};
use crate::placement::FLOCKS;

/// How long a node that handed a flock over keeps taking its writes after it stopped
/// serving its reads, so that writers with an older view still reach it.
const HANDOVER_GRACE: Duration = Duration::from_secs(3);
/// Flocks compared per peer in one anti-entropy round.
const DIGEST_FLOCKS_MAX: usize = FLOCKS as usize;

/// One flock as a node sees it (`GET /v1/flocks`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlockState {
    /// The flock.
    pub flock: Flock,
    /// The table names this node an owner.
    pub owner: bool,
    /// It holds the flock completely and serves its reads.
    pub ready: bool,
    /// It holds data of the flock and takes its writes.
    pub held: bool,
    /// It is copying the flock now.
    pub syncing: bool,
    /// Live items.
    pub items: u64,
    /// The digest replicas compare (hex): equal digests, equal data.
    pub digest: String,
}

/// The state of every flock on this node.
pub(crate) struct Flocks {
    /// The table epoch last acted on.
    pub(crate) epoch: u64,
    ready: Vec<bool>,
    held: Vec<bool>,
    /// Flocks waiting to be copied here, or being copied, with when that began: `syncing`
    /// holds both, `queued` the ones no copier took yet.
    syncing: HashMap<Flock, Instant>,
    queued: std::collections::VecDeque<Flock>,
    /// Copier tasks running (at most `syncs_max`).
    copiers: usize,
    /// When a flock handed over may be dropped.
    drop_at: Vec<Option<Instant>>,
    /// XOR of a hash of (key, version, tombstone, value checksum) over the flock's records.
    digests: Vec<[u8; 16]>,
    items: Vec<u64>,
    /// The node's registrations when readiness was last established (see
    /// `StoreNode::serves`).
    pub(crate) registrations: u64,
    /// Local readers of each flock ([`super::LocalBucket`]): a pinned flock is not dropped.
    pins: Vec<u32>,
    /// The newest table at which this node sealed each flock on every node (`Msg::Seal`).
    sealed: Vec<u64>,
}

fn entry_hash(key: &ItemKey, meta: &RecordMeta) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.bucket.len() as u64).to_le_bytes());
    hasher.update(key.bucket.as_bytes());
    hasher.update(key.item.as_bytes());
    hasher.update(&meta.version.seq.to_le_bytes());
    hasher.update(&meta.version.epoch.to_le_bytes());
    hasher.update(&[u8::from(meta.tombstone)]);
    hasher.update(&meta.value_crc.to_le_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

fn xor(into: &mut [u8; 16], with: &[u8; 16]) {
    for (a, b) in into.iter_mut().zip(with) {
        *a ^= b;
    }
}

impl Flocks {
    pub(crate) fn new() -> Flocks {
        let n = FLOCKS as usize;
        Flocks {
            epoch: 0,
            ready: vec![false; n],
            held: vec![false; n],
            syncing: HashMap::new(),
            queued: std::collections::VecDeque::new(),
            copiers: 0,
            drop_at: vec![None; n],
            digests: vec![[0; 16]; n],
            items: vec![0; n],
            pins: vec![0; n],
            sealed: vec![0; n],
            registrations: 0,
        }
    }

    /// A record of `key` replaced `old` (if any) with `new`.
    pub(crate) fn wrote(&mut self, key: &ItemKey, old: Option<&RecordMeta>, new: &RecordMeta) {
        let f = key.flock as usize;
        let (Some(digest), Some(items)) = (self.digests.get_mut(f), self.items.get_mut(f)) else { return };
        if let Some(old) = old {
            xor(digest, &entry_hash(key, old));
            *items -= u64::from(!old.tombstone).min(*items);
        }
        xor(digest, &entry_hash(key, new));
        *items += u64::from(!new.tombstone);
    }

    fn removed(&mut self, key: &ItemKey, old: &RecordMeta) {
        let f = key.flock as usize;
        if let (Some(digest), Some(items)) = (self.digests.get_mut(f), self.items.get_mut(f)) {
            xor(digest, &entry_hash(key, old));
            *items -= u64::from(!old.tombstone).min(*items);
        }
    }

    /// Pins `flock` for a local reader if this node holds it completely.
    pub(crate) fn pin(&mut self, flock: Flock) -> bool {
        let f = flock as usize;
        if !self.is_ready(flock) {
            return false;
        }
        if let Some(pins) = self.pins.get_mut(f) {
            *pins += 1;
        }
        true
    }

    pub(crate) fn unpin(&mut self, flock: Flock) {
        if let Some(pins) = self.pins.get_mut(flock as usize) {
            *pins = pins.saturating_sub(1);
        }
    }

    pub(crate) fn is_ready(&self, flock: Flock) -> bool {
        self.ready.get(flock as usize).copied().unwrap_or(false)
    }

    /// This node takes writes for `flock` (a replica write reached it).
    pub(crate) fn hold(&mut self, flock: Flock) {
        if let Some(held) = self.held.get_mut(flock as usize) {
            *held = true;
        }
    }

    pub(crate) fn ready_count(&self) -> u32 {
        self.ready.iter().filter(|r| **r).count() as u32
    }

    pub(crate) fn syncing_count(&self) -> u32 {
        self.syncing.len() as u32
    }

    /// How long the flock waiting longest for its copy here has waited: how far this node's
    /// replicas lag behind (zero when it holds everything it owns).
    pub(crate) fn lag(&self) -> std::time::Duration {
        self.syncing.values().map(Instant::elapsed).max().unwrap_or_default()
    }

    pub(crate) fn ready_bits(&self) -> Vec<u8> {
        bitmap((0..FLOCKS).filter(|f| self.ready[*f as usize]))
    }

    pub(crate) fn held_bits(&self) -> Vec<u8> {
        bitmap((0..FLOCKS).filter(|f| self.held[*f as usize]))
    }

    pub(crate) fn digests(&self, flocks: &[Flock]) -> Vec<(Flock, [u8; 16], u64)> {
        flocks.iter().filter_map(|&f| Some((f, *self.digests.get(f as usize)?, *self.items.get(f as usize)?))).collect()
    }

    /// Replaces a flock's digest and item count with ones computed from a scan.
    fn rebuilt(&mut self, flock: Flock, digest: [u8; 16], items: u64) {
        if let (Some(d), Some(i)) = (self.digests.get_mut(flock as usize), self.items.get_mut(flock as usize)) {
            *d = digest;
            *i = items;
        }
    }

    /// Forgets every flock's readiness: this node may have missed writes (its lease ran
    /// out, or it skipped table epochs), so it catches up again before serving reads.
    /// Forgets `flock`'s readiness: its local copy may lack a write its replicas hold.
    pub(crate) fn unready(&mut self, flock: Flock) {
        if let Some(ready) = self.ready.get_mut(flock as usize) {
            *ready = false;
        }
    }

    fn unready_all(&mut self) {
        self.ready.iter_mut().for_each(|r| *r = false);
    }
}

impl StoreNode {
    /// Computes `flock`'s digest from what the engine holds, with the flock's writes held
    /// off meanwhile: after a corrupt record was replaced (its old entry in the digest is
    /// unknown), or when anti-entropy found a difference nobody could explain.
    pub(crate) async fn rebuild_digest(&self, flock: Flock) -> Result<(), super::EngineError> {
        let Some(lock) = self.flock_locks.get(flock as usize) else { return Ok(()) };
        let _alone = lock.write().await;
        let mut scratch = Flocks::new();
        let mut after: Option<ItemKey> = None;
        loop {
            let from = after.clone();
            let page =
                blocking(&self.engine, move |e| e.scan_flock(flock, from.as_ref(), PAGE_ITEMS_MAX as usize)).await?;
            for (key, meta) in &page {
                scratch.wrote(key, None, meta);
            }
            after = page.last().map(|(k, _)| k.clone());
            if page.len() < PAGE_ITEMS_MAX as usize {
                break;
            }
        }
        let (digest, items) = (scratch.digests[flock as usize], scratch.items[flock as usize]);
        self.flocks.lock().rebuilt(flock, digest, items);
        Ok(())
    }

    /// Builds the digests and the held flocks from what the engine holds (at start).
    pub(crate) async fn load(&self) -> Result<(), super::EngineError> {
        for flock in 0..FLOCKS {
            let mut after: Option<ItemKey> = None;
            loop {
                let from = after.clone();
                let page = blocking(&self.engine, move |e| e.scan_flock(flock, from.as_ref(), PAGE_ITEMS_MAX as usize))
                    .await?;
                let more = page.len() == PAGE_ITEMS_MAX as usize;
                let mut flocks = self.flocks.lock();
                for (key, meta) in &page {
                    flocks.wrote(key, None, meta);
                    flocks.hold(flock);
                }
                drop(flocks);
                after = page.last().map(|(k, _)| k.clone());
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One round of upkeep: follow the table, start copies, hand flocks over.
    pub(crate) async fn follow(self: &Arc<StoreNode>) {
        let view = self.view();
        let lapsed = !self.lease_held();
        let registrations = self.registrations();
        let mut start: Vec<Flock> = Vec::new();
        let mut drop = Vec::new();
        {
            let mut flocks = self.flocks.lock();
            let skipped = flocks.epoch != 0 && view.epoch() > flocks.epoch + 1;
            let rejoined = flocks.registrations != registrations;
            if lapsed || skipped || rejoined {
                flocks.unready_all();
                flocks.registrations = registrations;
            }
            flocks.epoch = flocks.epoch.max(view.epoch());
            for flock in 0..FLOCKS {
                let f = flock as usize;
                let owner = view.owners(flock).contains(&self.id.as_str());
                if owner {
                    flocks.held[f] = true;
                    flocks.drop_at[f] = None;
                    if !flocks.ready[f] && !flocks.syncing.contains_key(&flock) && !lapsed {
                        start.push(flock);
                    }
                } else if flocks.held[f] {
                    if flocks.ready[f] && view.owners_ready(flock, &self.id) {
                        flocks.ready[f] = false;
                    }
                    if !flocks.ready[f] && flocks.drop_at[f].is_none() && view.owners_ready(flock, &self.id) {
                        flocks.drop_at[f] = Some(Instant::now() + HANDOVER_GRACE);
                    }
                    let due = flocks.drop_at[f].is_some_and(|at| at <= Instant::now());
                    if due && !flocks.syncing.contains_key(&flock) && flocks.pins[f] == 0 {
                        drop.push(flock);
                    }
                }
            }
            for flock in start {
                flocks.syncing.insert(flock, Instant::now());
                flocks.queued.push_back(flock);
            }
            let wanted = flocks.queued.len().min(self.config.syncs_max.max(1));
            let spawn = wanted.saturating_sub(flocks.copiers);
            flocks.copiers += spawn;
            for _ in 0..spawn {
                let store = self.clone();
                tokio::spawn(async move { store.copier().await });
            }
        }
        for flock in drop {
            if let Err(err) = self.drop_flock(flock).await {
                tracing::warn!(flock, error = %err, "store: dropping a handed-over flock failed");
            }
        }
    }

    /// Takes queued flocks one after the other and copies them, until none is left.
    async fn copier(self: Arc<StoreNode>) {
        loop {
            let next = {
                let mut flocks = self.flocks.lock();
                let next = flocks.queued.pop_front();
                if next.is_none() {
                    flocks.copiers -= 1;
                }
                next
            };
            let Some(flock) = next else { return };
            self.sync_flock(flock).await;
        }
    }

    /// Seals `flocks` at `view`'s table on every node that may hold them (this one too),
    /// unless that was done already: afterwards no node acknowledges a write of them from
    /// an older table, so a copy read next holds every write ever acknowledged. Seals with
    /// them the other flocks waiting for a copy here, to spare messages during a join.
    pub(crate) async fn seal(&self, view: &View, flocks: Vec<Flock>) -> Result<(), Fault> {
        let epoch = view.epoch();
        let flocks: Vec<Flock> = {
            let state = self.flocks.lock();
            let unsealed = |f: &Flock| state.sealed.get(*f as usize).is_some_and(|s| *s < epoch);
            if !flocks.iter().any(unsealed) {
                return Ok(());
            }
            let waiting = state.syncing.keys().copied().filter(|f| !flocks.contains(f));
            flocks.iter().copied().chain(waiting).filter(unsealed).collect()
        };
        // Dead nodes are left out: a node the others count dead has lost its lease by its
        // own clock before, so it acknowledges nothing. A live one that does not answer
        // within the time after which it would count dead fails the seal; it is tried again.
        let within = Duration::from_millis(self.config.request_timeout_ms.min(self.node_ttl_ms));
        let message = Msg::Seal { epoch, flocks: flocks.clone() };
        let others = view.stores().into_iter().filter(|n| *n != self.id);
        let sends = others.map(|node| {
            let message = &message;
            async move { (self.send_within(view, &node, message, within).await, node) }
        });
        let (mine, theirs) = tokio::join!(self.serve_seal(epoch, flocks.clone()), futures::future::join_all(sends));
        for (hop, node) in std::iter::once((Ok(mine), self.id.clone())).chain(theirs) {
            match hop {
                Ok((Reply::Stored, _)) => {}
                Ok((Reply::Fault(fault), _)) | Err(fault) => {
                    tracing::debug!(%node, epoch, ?fault, "store: sealing flocks failed");
                    return Err(fault);
                }
                Ok((other, _)) => return Err(Fault::Unavailable(format!("node {node}: unexpected reply {other:?}"))),
            }
        }
        let mut state = self.flocks.lock();
        for flock in flocks {
            if let Some(sealed) = state.sealed.get_mut(flock as usize) {
                *sealed = (*sealed).max(epoch);
            }
        }
        Ok(())
    }

    /// Serves `Seal`: reads table `epoch` (or a newer one), then waits out the writes of
    /// `flocks` that checked an older table (they hold the flock's lock shared).
    pub(crate) async fn serve_seal(&self, epoch: u64, flocks: Vec<Flock>) -> super::service::Hop {
        let view = self.refresh_to(epoch).await;
        if view.epoch() < epoch {
            let why = format!("node {} cannot read table {epoch} yet", self.id);
            return (Reply::Fault(Fault::Unavailable(why)), Bytes::new());
        }
        for flock in flocks {
            if let Some(lock) = self.flock_locks.get(flock as usize) {
                drop(lock.write().await);
            }
        }
        (Reply::Stored, Bytes::new())
    }

    /// Copies `flock` from the nodes that hold it, then serves it.
    async fn sync_flock(&self, flock: Flock) {
        let view = self.view();
        let (ready, owners) = view.sources(flock, &self.id);
        let done = if let Err(fault) = self.seal(&view, vec![flock]).await {
            tracing::debug!(flock, ?fault, "store: sealing before a copy failed");
            false
        } else if let Some(source) = ready.first() {
            self.pull(&view, source, flock)
                .await
                .map_err(|e| tracing::debug!(flock, %source, ?e, "store: copy failed"))
                .is_ok()
        } else {
            // Nobody holds it completely (a whole-grid restart, or the only holder died):
            // the owners that are up merge each other's copies.
            let mut all = true;
            for source in &owners {
                if let Err(e) = self.pull(&view, source, flock).await {
                    tracing::debug!(flock, %source, ?e, "store: copy from an owner failed");
                    all = false;
                }
            }
            all
        };
        let mut flocks = self.flocks.lock();
        flocks.syncing.remove(&flock);
        let still_owner = self.view().owners(flock).contains(&self.id.as_str());
        if done && still_owner && self.lease_held() && flocks.registrations == self.registrations() {
            flocks.ready[flock as usize] = true;
            self.counters.syncs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(flock, "store: flock ready");
        }
    }

    /// Pulls from `source` every record of `flock` it has newer than this node's copy.
    pub(crate) async fn pull(&self, view: &View, source: &str, flock: Flock) -> Result<u64, Fault> {
        if self.same_digest(view, source, flock).await? {
            return Ok(0);
        }
        let mut copied = 0;
        let mut after: Option<ItemKey> = None;
        loop {
            let message = Msg::Meta { flock, after: after.clone(), limit: PAGE_ITEMS_MAX };
            let (reply, body) = self.send(view, source, &message, Bytes::new()).await?;
            let more = match reply {
                Reply::Page { more } => more,
                Reply::Fault(fault) => return Err(fault),
                other => return Err(Fault::Unavailable(format!("unexpected reply {other:?}"))),
            };
            let page: MetaPage = super::proto::decode(&body).map_err(Fault::Unavailable)?;
            after = page.0.last().map(|(k, _)| k.clone());
            let wanted = self.newer_than_mine(page.0).await?;
            copied += wanted.len() as u64;
            self.copy(view, source, wanted).await?;
            if !more || after.is_none() {
                return Ok(copied);
            }
        }
    }

    async fn same_digest(&self, view: &View, source: &str, flock: Flock) -> Result<bool, Fault> {
        let (reply, _) = self.send(view, source, &Msg::Digests { flocks: vec![flock] }, Bytes::new()).await?;
        let Reply::Digests(theirs) = reply else { return Ok(false) };
        let mine = self.flocks.lock().digests(&[flock]);
        Ok(theirs.first().map(|(_, d, _)| d) == mine.first().map(|(_, d, _)| d))
    }

    /// The keys of `page` whose record here is missing, older, or unreadable.
    async fn newer_than_mine(&self, page: Vec<(ItemKey, RecordMeta)>) -> Result<Vec<(ItemKey, u64)>, Fault> {
        let found = blocking(&self.engine, move |engine| {
            let mut wanted = Vec::new();
            for (key, theirs) in page {
                let mine = match engine.get(&key) {
                    Ok(mine) => mine.map(|r| r.version),
                    Err(_) => None,
                };
                if mine.is_none_or(|v| v < theirs.version) {
                    wanted.push((key, theirs.len));
                }
            }
            Ok(wanted)
        })
        .await;
        found.map_err(|e| Fault::Unavailable(e.to_string()))
    }

    /// Fetches `wanted` from `source` in batches bounded by keys and bytes, and stores each
    /// record that is still newer than this node's.
    async fn copy(&self, view: &View, source: &str, wanted: Vec<(ItemKey, u64)>) -> Result<(), Fault> {
        let mut batch: Vec<ItemKey> = Vec::new();
        let mut bytes = 0u64;
        let mut batches = Vec::new();
        for (key, len) in wanted {
            if !batch.is_empty() && (batch.len() >= FETCH_KEYS_MAX || bytes + len > FETCH_BYTES_MAX as u64) {
                batches.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += len;
            batch.push(key);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        for keys in batches {
            for (key, record, memos) in self.fetch(view, source, keys).await? {
                self.merge(&key, record, memos).await?;
            }
        }
        Ok(())
    }

    /// Stores `record` if it is newer than this node's copy of `key`, with the memos of the
    /// writes it holds (`memos`, from the node it came from) in place of this node's.
    pub(crate) async fn merge(
        &self,
        key: &ItemKey,
        record: super::Record,
        memos: Vec<super::ops::Memo>,
    ) -> Result<(), Fault> {
        let _local = self.local_of(key).lock().await;
        let (local, corrupt) = match self.local(key).await {
            Ok(local) => (local, false),
            Err(super::EngineError::Corrupt { .. }) => (None, true),
            Err(err) => return Err(Fault::Unavailable(err.to_string())),
        };
        if local.as_ref().is_some_and(|l| l.version >= record.version) {
            return Ok(());
        }
        let old = local.as_ref().map(super::Record::meta);
        let version = record.version;
        self.store_local(key, old, record).await.map_err(|e| Fault::Unavailable(e.to_string()))?;
        self.ops.lock().replace(key, memos.into_iter().filter(|m| m.version <= version).collect());
        let counter = if corrupt { &self.counters.repaired } else { &self.counters.copied };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Removes a handed-over flock's data, a page at a time.
    async fn drop_flock(&self, flock: Flock) -> Result<(), super::EngineError> {
        loop {
            let page = blocking(&self.engine, move |e| e.scan_flock(flock, None, PAGE_ITEMS_MAX as usize)).await?;
            if page.is_empty() {
                break;
            }
            let keys: Vec<ItemKey> = page.iter().map(|(k, _)| k.clone()).collect();
            blocking(&self.engine, move |e| e.remove(&keys)).await?;
            let mut flocks = self.flocks.lock();
            for (key, meta) in &page {
                flocks.removed(key, meta);
            }
        }
        let mut flocks = self.flocks.lock();
        let f = flock as usize;
        // Taken back in the meantime: keep holding it.
        if flocks.drop_at[f].is_some() {
            flocks.held[f] = false;
            flocks.drop_at[f] = None;
        }
        tracing::debug!(flock, "store: handed-over flock dropped");
        Ok(())
    }

    /// The state of every flock this node owns or holds, for `GET /v1/flocks`.
    pub(crate) fn flock_states(&self) -> Vec<FlockState> {
        let view = self.view();
        let serving = self.lease_held();
        let flocks = self.flocks.lock();
        (0..FLOCKS)
            .filter_map(|flock| {
                let f = flock as usize;
                let owner = view.owners(flock).contains(&self.id.as_str());
                (owner || flocks.held[f]).then(|| FlockState {
                    flock,
                    owner,
                    ready: serving && flocks.ready[f],
                    held: flocks.held[f],
                    syncing: flocks.syncing.contains_key(&flock),
                    items: flocks.items[f],
                    digest: flocks.digests[f].iter().map(|b| format!("{b:02x}")).collect(),
                })
            })
            .collect()
    }

    /// Whether every flock this node holds is owned elsewhere, by nodes that hold it
    /// completely: a draining node may then leave without losing a copy.
    pub(crate) fn handed_over(&self) -> bool {
        let view = self.view();
        let flocks = self.flocks.lock();
        (0..FLOCKS).all(|f| {
            let owners = view.owners(f);
            // Nobody else can take it (this was the last node with workers): nothing to wait for.
            let nobody = owners.is_empty() || owners == [self.id.as_str()] && view.table.nodes.len() <= 1;
            let owned = owners.contains(&self.id.as_str());
            nobody || (!owned && (!flocks.held[f as usize] || view.owners_ready(f, &self.id)))
        })
    }

    /// One anti-entropy round: compare digests with the other owners of each ready flock
    /// and pull from those that differ.
    pub(crate) async fn anti_entropy(&self) {
        let view = self.view();
        let ready: Vec<Flock> = {
            let flocks = self.flocks.lock();
            (0..FLOCKS).filter(|f| flocks.is_ready(*f) && view.owners(*f).contains(&self.id.as_str())).collect()
        };
        let mut peers: std::collections::BTreeMap<String, Vec<Flock>> = Default::default();
        for flock in ready {
            for owner in view.owners(flock) {
                if owner != self.id && view.ready(owner, flock) {
                    peers.entry(owner.to_owned()).or_default().push(flock);
                }
            }
        }
        for (peer, mut flocks) in peers {
            flocks.truncate(DIGEST_FLOCKS_MAX);
            let Ok((Reply::Digests(theirs), _)) =
                self.send(&view, &peer, &Msg::Digests { flocks: flocks.clone() }, Bytes::new()).await
            else {
                continue;
            };
            let mine: std::collections::HashMap<Flock, [u8; 16]> =
                self.flocks.lock().digests(&flocks).into_iter().map(|(f, d, _)| (f, d)).collect();
            for (flock, digest, _) in theirs {
                if mine.get(&flock).is_none_or(|ours| *ours == digest) {
                    continue;
                }
                match self.pull(&view, &peer, flock).await {
                    // Nothing newer there: either the peer is behind (its own round pulls
                    // from here) or this node's digest is off; recomputing it is cheap.
                    Ok(0) => {
                        if let Err(err) = self.rebuild_digest(flock).await {
                            tracing::warn!(flock, error = %err, "store: rebuilding a digest failed");
                        }
                    }
                    Ok(_) => {}
                    Err(fault) => tracing::debug!(flock, %peer, ?fault, "store: anti-entropy pull failed"),
                }
            }
        }
    }
}
