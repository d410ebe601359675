//! [`DiskEngine`]: the engine on local disk, one redb file (`items.redb`) in the data directory.
//!
//! Layout (redb tables):
//! - `records`: key bytes (see [`super::keys`]) -> crc32c of the key bytes, the record header,
//!   and the value itself when it is at most [`INLINE_BYTES_MAX`]. The key's checksum catches a
//!   record that damage moved under another key (the record's own checksums do not cover it).
//! - `chunks`: (key bytes, index) -> [`CHUNK_BYTES`] of a longer value. redb sizes pages in
//!   powers of two, so a value stored whole a little over a power of two would take a page twice
//!   its size; chunks fill their pages, and a 64 MiB value is written once, in place.
//! - `usage`: flock -> (live items, bytes), updated in the same transaction as the records, so
//!   opening reads 1,024 rows at most, not the data.
//! - `girder`: the format marker that tells our file from any other redb file.
//!
//! Next to it, `reserve`: [`RESERVE_BYTES`] held back so that on a full disk deletes still
//! commit, and writes can resume once they did (see [`Reserve`]).
//!
//! Writes go through one writer thread fed by a bounded queue: it takes every write waiting (up
//! to `group_bytes_max` of values), applies them in one transaction and syncs once (group
//! commit); if that transaction fails, it applies them one by one so each caller gets its own
//! outcome. Commits use redb's quick repair (the allocator state is saved with each commit, in
//! two phases), so reopening after a crash neither walks nor checks the whole file: recovery is
//! immediate, and a damaged value only fails its own item's reads.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::{adjust, keys, Durability, Engine, EngineConfig, EngineError, Flock, FlockUsage, ItemKey, UsageMap};
use crate::store::record::{Record, RecordMeta, HEADER_LEN};

/// The file in the data directory.
pub const FILE_NAME: &str = "items.redb";
/// Values up to this many bytes are stored with their record; longer ones in chunks.
pub const INLINE_BYTES_MAX: usize = 16 << 10;
/// A chunk of a long value: with a key of up to 3 KiB it fills one 256 KiB redb page.
pub const CHUNK_BYTES: usize = 252 << 10;
/// The layout this build writes (the `girder` table's `format`).
const FORMAT: u64 = 1;
/// Bytes before the header in a `records` entry: the key's crc32c.
const KEY_CRC_LEN: usize = 4;
/// The file in the data directory that holds room back for writes that free space.
pub const RESERVE_FILE: &str = "reserve";
/// The reserve's size: room for a commit's own bookkeeping (b-tree pages, the allocator state
/// quick repair saves) many times over.
const RESERVE_BYTES: usize = 4 << 20;
/// How often a missing reserve is tried again.
const RESERVE_RETRY: Duration = Duration::from_secs(10);

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const CHUNKS: TableDefinition<(&[u8], u32), &[u8]> = TableDefinition::new("chunks");
const USAGE: TableDefinition<u32, (u64, u64)> = TableDefinition::new("usage");
const META: TableDefinition<&str, u64> = TableDefinition::new("girder");

/// The engine on disk. Reads run on the caller's thread, concurrently with writes; writes are
/// applied by one writer thread (see the module documentation). Dropping it finishes the
/// queued writes, syncs, and closes the file.
pub struct DiskEngine {
    shared: Arc<Shared>,
    queue: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    /// The open file; `None` only while reopening it failed (see [`Writer::reopen`]). Readers
    /// hold the read lock for the length of their transaction, so the writer can swap it.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    usage: Mutex<UsageMap>,
}

/// One caller's write, and where its outcome goes.
struct Job {
    op: Op,
    done: SyncSender<Result<(), EngineError>>,
}

enum Op {
    Write(Vec<(ItemKey, Record)>),
    Remove(Vec<ItemKey>),
    Flush,
}

impl Op {
    fn bytes(&self) -> u64 {
        match self {
            Op::Write(batch) => batch.iter().map(|(_, r)| r.value.len() as u64).sum(),
            Op::Remove(_) | Op::Flush => 0,
        }
    }

    /// Whether it stores values; deletes (tombstones), removals and flushes do not, and may
    /// use the reserve (see [`Reserve`]).
    fn takes_room(&self) -> bool {
        match self {
            Op::Write(batch) => batch.iter().any(|(_, r)| !r.tombstone),
            Op::Remove(_) | Op::Flush => false,
        }
    }
}

impl DiskEngine {
    /// Opens the engine in `dir`, creating the directory and the file if missing. A file that
    /// is not ours, a directory that cannot be written, or a file another process has open give
    /// a clear error.
    pub fn open(dir: &Path, config: EngineConfig) -> Result<DiskEngine, EngineError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            let doing = format!("creating the data directory {}", dir.display());
            match dir.is_file() {
                true => EngineError::Io(format!("{doing}: it is a file, not a directory")),
                false => EngineError::from_io(&e, &doing),
            }
        })?;
        let path = dir.join(FILE_NAME);
        let (db, usage) = open_file(&path, &config)?;
        let shared = Arc::new(Shared { db: RwLock::new(Some(db)), path, usage: Mutex::new(usage) });
        let (queue, jobs) = mpsc::sync_channel(config.queue_writes_max.max(1));
        let writer = {
            let (shared, reserve) = (shared.clone(), Reserve::new(dir));
            std::thread::Builder::new()
                .name("girder-engine-writer".into())
                .spawn(move || Writer { shared, config, reserve }.run(jobs))
                .map_err(|e| EngineError::from_io(&e, "starting the storage writer thread"))?
        };
        tracing::debug!(path = %shared.path.display(), "storage engine open");
        Ok(DiskEngine { shared, queue: Some(queue), writer: Some(writer) })
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Hands `op` to the writer thread and waits for its outcome.
    fn submit(&self, op: Op) -> Result<(), EngineError> {
        let queue = self.queue.as_ref().ok_or(EngineError::Closed)?;
        let (done, outcome) = mpsc::sync_channel(1);
        queue.send(Job { op, done }).map_err(|_| EngineError::Closed)?;
        outcome.recv().map_err(|_| EngineError::Closed)?
    }

    fn read(&self) -> Result<Reader<'_>, EngineError> {
        let doing = format!("reading {}", self.shared.path.display());
        let db = self.shared.db.read();
        let tx = db.as_ref().ok_or_else(|| not_open(&doing))?.begin_read().ctx(&doing)?;
        let records = tx.open_table(RECORDS).ctx(&doing)?;
        let chunks = tx.open_table(CHUNKS).ctx(&doing)?;
        Ok(Reader { records, chunks, doing, _db: db })
    }
}

impl Drop for DiskEngine {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.shared.path.display(), "the storage writer thread panicked");
            }
        }
    }
}

impl Engine for DiskEngine {
    fn get(&self, key: &ItemKey) -> Result<Option<Record>, EngineError> {
        let reader = self.read()?;
        let kb = keys::encode(key);
        let Some(entry) = reader.records.get(kb.as_slice()).ctx(&reader.doing)? else {
            return Ok(None);
        };
        reader.load(key, &kb, entry.value()).map(Some)
    }

    fn write(&self, batch: &[(ItemKey, Record)]) -> Result<(), EngineError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.submit(Op::Write(batch.to_vec()))
    }

    fn remove(&self, keys: &[ItemKey]) -> Result<(), EngineError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.submit(Op::Remove(keys.to_vec()))
    }

    fn scan_bucket_bytes(
        &self,
        flock: Flock,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(String, Record)>, EngineError> {
        let prefix = keys::bucket_prefix(flock, bucket);
        let from = match after {
            Some(item) => std::ops::Bound::Excluded([prefix.as_slice(), item.as_bytes()].concat()),
            None => std::ops::Bound::Included(prefix.clone()),
        };
        let reader = self.read()?;
        let (mut page, mut bytes) = (Vec::new(), 0usize);
        let range = reader.records.range::<&[u8]>((as_slice(&from), std::ops::Bound::Unbounded));
        for entry in range.ctx(&reader.doing)? {
            if page.len() >= limit || bytes >= bytes_max {
                break;
            }
            let (kb, stored) = entry.ctx(&reader.doing)?;
            let kb = kb.value();
            if !kb.starts_with(&prefix) {
                break;
            }
            let key = keys::decode(kb).ok_or_else(|| EngineError::Corrupt {
                key: ItemKey::new(flock, bucket, String::from_utf8_lossy(&kb[prefix.len()..])),
                reason: "its key's bytes are damaged".into(),
            })?;
            let record = reader.load(&key, kb, stored.value())?;
            bytes = bytes.saturating_add(record.value.len());
            page.push((key.item, record));
        }
        Ok(page)
    }

    fn scan_flock(
        &self,
        flock: Flock,
        after: Option<&ItemKey>,
        limit: usize,
    ) -> Result<Vec<(ItemKey, RecordMeta)>, EngineError> {
        let from = match after {
            Some(key) if key.flock > flock => return Ok(Vec::new()),
            Some(key) if key.flock == flock => std::ops::Bound::Excluded(keys::encode(key)),
            _ => std::ops::Bound::Included(keys::flock_prefix(flock).to_vec()),
        };
        let reader = self.read()?;
        let mut page = Vec::new();
        let range = reader.records.range::<&[u8]>((as_slice(&from), std::ops::Bound::Unbounded));
        for entry in range.ctx(&reader.doing)? {
            if page.len() >= limit {
                break;
            }
            let (kb, stored) = entry.ctx(&reader.doing)?;
            let kb = kb.value();
            if !kb.starts_with(&keys::flock_prefix(flock)) {
                break;
            }
            let Some(key) = keys::decode(kb) else {
                tracing::warn!(path = %self.shared.path.display(), flock, "skipping a record whose key is damaged");
                continue;
            };
            page.push((key, stored_meta(kb, stored.value()).unwrap_or(RecordMeta::CORRUPT)));
        }
        Ok(page)
    }

    fn usage(&self) -> Vec<FlockUsage> {
        self.shared.usage.lock().snapshot()
    }

    fn flush(&self) -> Result<(), EngineError> {
        self.submit(Op::Flush)
    }
}

fn as_slice(bound: &std::ops::Bound<Vec<u8>>) -> std::ops::Bound<&[u8]> {
    match bound {
        std::ops::Bound::Included(b) => std::ops::Bound::Included(b.as_slice()),
        std::ops::Bound::Excluded(b) => std::ops::Bound::Excluded(b.as_slice()),
        std::ops::Bound::Unbounded => std::ops::Bound::Unbounded,
    }
}

/// The tables of one read transaction.
struct Reader<'a> {
    records: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    chunks: redb::ReadOnlyTable<(&'static [u8], u32), &'static [u8]>,
    doing: String,
    /// Keeps the file from being swapped under the transaction.
    _db: RwLockReadGuard<'a, Option<Database>>,
}

impl Reader<'_> {
    /// The record stored as `stored` under `kb`, with its chunks, all checked.
    fn load(&self, key: &ItemKey, kb: &[u8], stored: &[u8]) -> Result<Record, EngineError> {
        let corrupt = |reason: String| EngineError::Corrupt { key: key.clone(), reason };
        let meta = stored_meta(kb, stored).map_err(corrupt)?;
        let body = &stored[KEY_CRC_LEN..];
        if meta.len <= INLINE_BYTES_MAX as u64 {
            return Record::decode(body).map_err(|e| corrupt(e.0));
        }
        if body.len() != HEADER_LEN {
            return Err(corrupt(format!("a chunked record has {} bytes of header", body.len())));
        }
        let len = usize::try_from(meta.len).map_err(|_| corrupt(format!("a {}-byte value", meta.len)))?;
        let mut encoded = Vec::with_capacity(HEADER_LEN + len);
        encoded.extend_from_slice(body);
        for index in 0..len.div_ceil(CHUNK_BYTES) {
            let index = u32::try_from(index).map_err(|_| corrupt("too many chunks".into()))?;
            let chunk = self.chunks.get((kb, index)).ctx(&self.doing)?;
            let chunk = chunk.ok_or_else(|| corrupt(format!("chunk {index} of its value is missing")))?;
            encoded.extend_from_slice(chunk.value());
        }
        Record::decode_bytes(Bytes::from(encoded)).map_err(|e| corrupt(e.0))
    }
}

/// The metadata of a `records` entry, its key's checksum and its header checked.
fn stored_meta(kb: &[u8], stored: &[u8]) -> Result<RecordMeta, String> {
    let (crc, body) = stored.split_first_chunk::<KEY_CRC_LEN>().ok_or("its entry is truncated")?;
    if u32::from_le_bytes(*crc) != crc32c::crc32c(kb) {
        return Err("it is stored under a key it was not written for".into());
    }
    RecordMeta::decode_header(body).map(|(meta, _)| meta).map_err(|e| e.0)
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    config: EngineConfig,
    reserve: Reserve,
}

impl Writer {
    fn run(mut self, jobs: Receiver<Job>) {
        let flush_after = Duration::from_millis(self.config.flush_ms.max(1));
        // Since when commits have been waiting for a sync (Buffered only).
        let mut unsynced_since: Option<Instant> = None;
        loop {
            let first = match unsynced_since {
                None => match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
                Some(since) => match jobs.recv_timeout((since + flush_after).saturating_duration_since(Instant::now()))
                {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        unsynced_since = self.sync_buffered(unsynced_since);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let group = self.gather(first, &jobs);
            let durable =
                self.config.durability == Durability::Immediate || group.iter().any(|job| matches!(job.op, Op::Flush));
            let ok = self.commit_group(group, durable);
            if durable && ok {
                unsynced_since = None;
            } else if !durable {
                unsynced_since.get_or_insert_with(Instant::now);
            }
        }
        self.sync_buffered(unsynced_since);
    }

    /// `first` and the jobs waiting behind it, up to `group_bytes_max` of values.
    fn gather(&self, first: Job, jobs: &Receiver<Job>) -> Vec<Job> {
        let mut bytes = first.op.bytes();
        let mut group = vec![first];
        while bytes < self.config.group_bytes_max && group.len() < self.config.queue_writes_max.max(1) {
            let Ok(job) = jobs.try_recv() else { break };
            bytes += job.op.bytes();
            group.push(job);
        }
        group
    }

    /// Commits `group` in one transaction, or each job alone if that fails; tells every caller.
    /// Returns whether everything committed.
    fn commit_group(&mut self, group: Vec<Job>, durable: bool) -> bool {
        let ops: Vec<&Op> = group.iter().map(|job| &job.op).collect();
        match self.commit(&ops, durable) {
            Ok(()) => {
                for job in group {
                    let _ = job.done.send(Ok(()));
                }
                true
            }
            Err(err) if group.len() == 1 => {
                if let Some(job) = group.into_iter().next() {
                    let _ = job.done.send(Err(err));
                }
                false
            }
            Err(err) => {
                tracing::debug!(jobs = group.len(), error = %err, "a group commit failed, committing each write alone");
                let mut ok = true;
                for job in group {
                    let outcome = self.commit(&[&job.op], durable);
                    ok &= outcome.is_ok();
                    let _ = job.done.send(outcome);
                }
                ok
            }
        }
    }

    /// Syncs commits made without a sync; returns the new `unsynced_since`.
    fn sync_buffered(&mut self, unsynced_since: Option<Instant>) -> Option<Instant> {
        unsynced_since?;
        match self.commit(&[], true) {
            Ok(()) => None,
            Err(err) => {
                tracing::warn!(path = %self.shared.path.display(), error = %err, "syncing buffered writes failed");
                Some(Instant::now())
            }
        }
    }

    /// Applies `ops` in one transaction; usage changes only once it committed. On a full disk,
    /// ops that store no values get the reserve's room (see [`Reserve`]) when they fail for want
    /// of room, and deletes get it at once after any write failed for want of room.
    fn commit(&mut self, ops: &[&Op], durable: bool) -> Result<(), EngineError> {
        let takes_room = ops.iter().any(|op| op.takes_room());
        let deletes = !takes_room && ops.iter().any(|op| !matches!(op, Op::Flush));
        if deletes && self.reserve.needed {
            self.release_reserve();
        }
        let mut outcome = self.commit_once(ops, durable);
        if matches!(outcome, Err(EngineError::Full(_))) {
            self.reserve.needed = true;
            if !takes_room && self.release_reserve() {
                outcome = self.commit_once(ops, durable);
            }
        }
        if outcome.is_ok() {
            self.reserve.keep();
        }
        outcome
    }

    /// Gives the reserve's room to the disk, saying so; whether there was any to give.
    fn release_reserve(&mut self) -> bool {
        let released = self.reserve.release();
        if released {
            let path = self.shared.path.display();
            tracing::warn!(path = %path, "the data disk is full: its reserve is released for deletes");
        }
        released
    }

    /// [`Self::commit`] without the reserve. redb refuses every write after one failed on I/O
    /// (a full disk, say) until the file is reopened, so then this reopens it and tries once
    /// more: writes resume once there is room again.
    fn commit_once(&mut self, ops: &[&Op], durable: bool) -> Result<(), EngineError> {
        let doing = format!("writing {}", self.shared.path.display());
        let db = self.shared.db.read();
        let outcome = match db.as_ref() {
            Some(db) => self.try_commit(db, ops, durable),
            None => Err(redb::Error::PreviousIo),
        };
        drop(db);
        match outcome {
            Err(redb::Error::PreviousIo) => {
                self.reopen()?;
                let db = self.shared.db.read();
                let db = db.as_ref().ok_or_else(|| not_open(&doing))?;
                self.try_commit(db, ops, durable).ctx(&doing)
            }
            other => other.ctx(&doing),
        }
    }

    fn try_commit(&self, db: &Database, ops: &[&Op], durable: bool) -> Result<(), redb::Error> {
        let mut tx = db.begin_write()?;
        tx.set_quick_repair(true);
        let durability = if durable { redb::Durability::Immediate } else { redb::Durability::None };
        tx.set_durability(durability)?;
        let counts = self.apply(&tx, ops)?;
        tx.commit()?;
        let mut usage = self.shared.usage.lock();
        for (flock, c) in counts {
            usage.set(flock, c);
        }
        Ok(())
    }

    /// Closes and opens the file again (once readers are done with it), and reloads usage.
    /// Reads fail while it cannot be opened; the next write tries again.
    fn reopen(&mut self) -> Result<(), EngineError> {
        let mut db = self.shared.db.write();
        drop(db.take());
        let (fresh, usage) = open_file(&self.shared.path, &self.config).inspect_err(|err| {
            tracing::error!(path = %self.shared.path.display(), error = %err, "reopening the data file failed");
        })?;
        *db = Some(fresh);
        *self.shared.usage.lock() = usage;
        tracing::info!(path = %self.shared.path.display(), "reopened the data file after a failed write");
        Ok(())
    }

    /// Writes `ops` in `tx`; returns the new usage counts of the flocks they touched (written to
    /// the `usage` table too).
    fn apply(&self, tx: &WriteTransaction, ops: &[&Op]) -> Result<Counts, redb::Error> {
        let mut records = tx.open_table(RECORDS)?;
        let mut chunks = tx.open_table(CHUNKS)?;
        let mut counts = std::collections::BTreeMap::new();
        // The lock is taken per flock, not held: `usage` must not wait for a long write. Only
        // this thread changes usage, so what it reads stays true until it commits.
        let mut count = |flock: Flock, live: bool, bytes: u64, sign: bool| {
            let current = || self.shared.usage.lock().get(flock);
            adjust(counts.entry(flock).or_insert_with(current), live, bytes, sign);
        };
        for op in ops {
            match op {
                Op::Write(batch) => {
                    for (key, record) in batch {
                        let kb = keys::encode(key);
                        if let Some((live, bytes)) = erase(&mut records, &mut chunks, &kb)? {
                            count(key.flock, live, bytes, false);
                        }
                        put(&mut records, &mut chunks, &kb, record)?;
                        count(key.flock, !record.tombstone, (HEADER_LEN + record.value.len()) as u64, true);
                    }
                }
                Op::Remove(keys) => {
                    for key in keys {
                        if let Some((live, bytes)) = erase(&mut records, &mut chunks, &keys::encode(key))? {
                            count(key.flock, live, bytes, false);
                        }
                    }
                }
                Op::Flush => {}
            }
        }
        let mut table = tx.open_table(USAGE)?;
        for (&flock, &c) in &counts {
            if c == (0, 0) {
                table.remove(flock)?;
            } else {
                table.insert(flock, c)?;
            }
        }
        Ok(counts.into_iter().collect())
    }
}

/// Room held back on the data disk: a file of [`RESERVE_BYTES`] next to the data file.
///
/// redb grows its file sparsely (`set_len`) and writes the new pages when it uses them, so on a
/// full disk a commit fails as soon as it touches a page never written, and every commit touches
/// some (b-tree pages copied on write, the allocator state quick repair saves): even one that
/// only deletes. Without the reserve nothing could be deleted on a full disk, and even after
/// deletes, writes mostly kept failing: redb may hand out free pages never written rather than
/// the ones deletes freed. So once a write failed for want of room, the first delete (or
/// removal, or a flush that failed) releases the reserve: the deletes commit, and new writes get
/// room at once. The reserve is made again after a later commit, once the disk has room for it.
struct Reserve {
    path: PathBuf,
    held: bool,
    /// A write failed for want of room since the reserve was made.
    needed: bool,
    /// When to try again to make a missing reserve.
    next_try: Instant,
}

impl Reserve {
    /// The reserve in `dir`, made now if there is room.
    fn new(dir: &Path) -> Reserve {
        let mut reserve =
            Reserve { path: dir.join(RESERVE_FILE), held: false, needed: false, next_try: Instant::now() };
        reserve.keep();
        reserve
    }

    /// Makes the reserve if it is missing, trying at most every [`RESERVE_RETRY`].
    fn keep(&mut self) {
        if self.held || Instant::now() < self.next_try {
            return;
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64) {
            self.held = true;
            return;
        }
        match fill_file(&self.path, RESERVE_BYTES) {
            Ok(()) => {
                (self.held, self.needed) = (true, false);
                tracing::debug!(path = %self.path.display(), "the data disk's reserve is held");
            }
            Err(err) => {
                // Partly written, it would only take room the data file needs.
                let _ = std::fs::remove_file(&self.path);
                self.next_try = Instant::now() + RESERVE_RETRY;
                tracing::debug!(path = %self.path.display(), error = %err, "no room for the data disk's reserve yet");
            }
        }
    }

    /// Gives the reserve's room back to the disk; whether there was any to give.
    fn release(&mut self) -> bool {
        if !self.held {
            return false;
        }
        self.held = false;
        self.next_try = Instant::now() + RESERVE_RETRY;
        match std::fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(path = %self.path.display(), error = %err, "releasing the data disk's reserve failed");
                false
            }
        }
    }
}

/// Writes `len` bytes to a new file at `path`. Not zeros, which a compressing file system
/// would store in no room at all.
fn fill_file(path: &Path, len: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut block = vec![0u8; 1 << 20];
    fastrand::Rng::with_seed(0x9e37_79b9).fill(&mut block);
    let mut file = std::fs::File::create(path)?;
    for _ in 0..len.div_ceil(block.len()) {
        file.write_all(&block)?;
    }
    Ok(())
}

/// New (live items, bytes) per flock.
type Counts = Vec<(Flock, (u64, u64))>;
type Records<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;
type Chunks<'t> = redb::Table<'t, (&'static [u8], u32), &'static [u8]>;

/// Stores `record` under `kb` (nothing is stored there).
fn put(records: &mut Records, chunks: &mut Chunks, kb: &[u8], record: &Record) -> Result<(), redb::Error> {
    let mut entry = Vec::with_capacity(KEY_CRC_LEN + HEADER_LEN + record.value.len().min(INLINE_BYTES_MAX));
    entry.extend_from_slice(&crc32c::crc32c(kb).to_le_bytes());
    entry.extend_from_slice(&record.encode_header());
    if record.value.len() <= INLINE_BYTES_MAX {
        entry.extend_from_slice(&record.value);
    } else {
        for (index, chunk) in record.value.chunks(CHUNK_BYTES).enumerate() {
            let index = u32::try_from(index).map_err(|_| redb::Error::ValueTooLarge(record.value.len()))?;
            chunks.insert((kb, index), chunk)?;
        }
    }
    records.insert(kb, entry.as_slice())?;
    Ok(())
}

/// Removes what is stored under `kb`, chunks included; returns (live, encoded bytes) of the
/// record removed, if it was there and readable.
fn erase(records: &mut Records, chunks: &mut Chunks, kb: &[u8]) -> Result<Option<(bool, u64)>, redb::Error> {
    let Some(old) = records.remove(kb)? else { return Ok(None) };
    let meta = stored_meta(kb, old.value());
    drop(old);
    let chunked = meta.as_ref().map_or(true, |m| m.len > INLINE_BYTES_MAX as u64);
    if chunked {
        chunks.retain_in((kb, 0)..=(kb, u32::MAX), |_, _| false)?;
    }
    match meta {
        Ok(meta) => Ok(Some((!meta.tombstone, HEADER_LEN as u64 + meta.len))),
        Err(reason) => {
            tracing::warn!(reason, "removed a damaged record; its usage could not be counted out");
            Ok(None)
        }
    }
}

/// Opens (or creates) the file at `path`, checks it is ours, and reads its usage.
fn open_file(path: &Path, config: &EngineConfig) -> Result<(Database, UsageMap), EngineError> {
    let doing = format!("opening {}", path.display());
    let db = redb::Builder::new()
        .set_cache_size(usize::try_from(config.cache_bytes).unwrap_or(usize::MAX))
        .create(path)
        .ctx(&doing)?;
    check_format(&db, path)?;
    let usage = load_usage(&db, &doing)?;
    Ok((db, usage))
}

fn not_open(doing: &str) -> EngineError {
    EngineError::Io(format!("{doing}: the data file is closed after a failed write, and reopening it failed"))
}

/// Refuses a redb file girder did not write; marks a new one as ours.
fn check_format(db: &Database, path: &Path) -> Result<(), EngineError> {
    let doing = format!("checking {}", path.display());
    let tx = db.begin_write().ctx(&doing)?;
    let tables: Vec<String> = tx.list_tables().ctx(&doing)?.map(|t| t.name().to_owned()).collect();
    let format = if tables.iter().any(|t| t == META.name()) {
        tx.open_table(META).ctx(&doing)?.get("format").ctx(&doing)?.map(|v| v.value())
    } else {
        None
    };
    match format {
        Some(FORMAT) => return tx.abort().ctx(&doing),
        Some(other) => {
            return Err(EngineError::Io(format!(
                "{} holds girder data in format {other}, this build reads format {FORMAT}",
                path.display()
            )))
        }
        None if !tables.is_empty() => {
            return Err(EngineError::Io(format!(
                "{} is a redb database that girder did not write (tables {tables:?}); move it away",
                path.display()
            )))
        }
        None => {}
    }
    tx.open_table(META).ctx(&doing)?.insert("format", FORMAT).ctx(&doing)?;
    drop(tx.open_table(RECORDS).ctx(&doing)?);
    drop(tx.open_table(CHUNKS).ctx(&doing)?);
    drop(tx.open_table(USAGE).ctx(&doing)?);
    tx.commit().ctx(&doing)
}

fn load_usage(db: &Database, doing: &str) -> Result<UsageMap, EngineError> {
    let tx = db.begin_read().ctx(doing)?;
    let table = tx.open_table(USAGE).ctx(doing)?;
    let mut usage = UsageMap::default();
    for row in table.iter().ctx(doing)? {
        let (flock, counts) = row.ctx(doing)?;
        usage.set(flock.value(), counts.value());
    }
    Ok(usage)
}

/// Sorts a redb error like [`EngineError::from_io`]; `doing` says what failed.
fn redb_error(err: impl Into<redb::Error>, doing: &str) -> EngineError {
    match err.into() {
        redb::Error::Io(io) => EngineError::from_io(&io, doing),
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            EngineError::Io(format!("{doing}: the data file is open in another process"))
        }
        redb::Error::Corrupted(why) => EngineError::Io(format!("{doing}: the data file is damaged: {why}")),
        redb::Error::UpgradeRequired(version) => {
            EngineError::Io(format!("{doing}: the data file has redb file format {version}, not this build's"))
        }
        other => EngineError::Io(format!("{doing}: {other}")),
    }
}

/// `?` for redb results, saying what was being done.
trait Ctx<T> {
    fn ctx(self, doing: &str) -> Result<T, EngineError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, doing: &str) -> Result<T, EngineError> {
        self.map_err(|e| redb_error(e, doing))
    }
}
