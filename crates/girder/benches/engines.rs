//! redb and fjall, called directly, on the bucket store's workload, beside girder's DiskEngine
//! (redb with values in 252 KiB chunks, checksums, quick repair and group commit).
//!
//! `cargo bench -p girder --bench engines` prints one table (about 15 s once built). Data goes
//! under cargo's target/tmp (the data disk), never /tmp, which may be a tmpfs. fjall runs with
//! key-value separation (values over 1 KiB in blob files, uncompressed: item bytes are often
//! compressed already, and the bench's are random).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use girder::store::engine::{DiskEngine, Durability, Engine, EngineConfig, ItemKey};
use girder::store::record::{Record, Version};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// One engine as the bench drives it: puts of one key at a time, gets, bucket scans.
trait Kv: Send + Sync {
    fn put(&self, key: &[u8], value: &[u8], sync: bool);
    fn get(&self, key: &[u8]) -> usize;
    /// Reads every value under `prefix`, returns how many.
    fn scan(&self, prefix: &[u8]) -> usize;
    /// Makes everything durable and written where it finally lives.
    fn settle(&self);
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("items");

struct Redb(redb::Database);

impl Redb {
    fn open(dir: &Path) -> Redb {
        std::fs::create_dir_all(dir).unwrap();
        let db = redb::Builder::new().set_cache_size(64 * MIB).create(dir.join("data.redb")).unwrap();
        Redb(db)
    }
}

impl Kv for Redb {
    fn put(&self, key: &[u8], value: &[u8], sync: bool) {
        let mut tx = self.0.begin_write().unwrap();
        let durability = if sync { redb::Durability::Immediate } else { redb::Durability::None };
        tx.set_durability(durability).unwrap();
        tx.open_table(TABLE).unwrap().insert(key, value).unwrap();
        tx.commit().unwrap();
    }

    fn get(&self, key: &[u8]) -> usize {
        use redb::ReadableDatabase;
        let tx = self.0.begin_read().unwrap();
        let table = tx.open_table(TABLE).unwrap();
        std::hint::black_box(table.get(key).unwrap().unwrap().value().to_vec()).len()
    }

    fn scan(&self, prefix: &[u8]) -> usize {
        redb_scan(&self.0, prefix)
    }

    fn settle(&self) {
        self.0.begin_write().unwrap().commit().unwrap();
    }
}

fn redb_scan(db: &redb::Database, prefix: &[u8]) -> usize {
    use redb::ReadableDatabase;
    let tx = db.begin_read().unwrap();
    let table = tx.open_table(TABLE).unwrap();
    let mut n = 0;
    for entry in table.range(prefix..).unwrap() {
        let (k, v) = entry.unwrap();
        if !k.value().starts_with(prefix) {
            break;
        }
        std::hint::black_box(v.value().to_vec());
        n += 1;
    }
    n
}

struct Fjall {
    db: fjall::Database,
    items: fjall::Keyspace,
}

impl Fjall {
    fn open(dir: &Path) -> Fjall {
        let db = fjall::Database::builder(dir).cache_size(64 * MIB as u64).open().unwrap();
        // Values over 1 KiB go to blob files (key-value separation), uncompressed: item bytes
        // are the caller's, often compressed already.
        let blobs = fjall::KvSeparationOptions::default().compression(fjall::CompressionType::None);
        let items =
            db.keyspace("items", || fjall::KeyspaceCreateOptions::default().with_kv_separation(Some(blobs))).unwrap();
        Fjall { db, items }
    }
}

impl Kv for Fjall {
    fn put(&self, key: &[u8], value: &[u8], sync: bool) {
        let mut batch = self.db.batch().durability(sync.then_some(fjall::PersistMode::SyncAll));
        batch.insert(&self.items, key, value);
        batch.commit().unwrap();
    }

    fn get(&self, key: &[u8]) -> usize {
        std::hint::black_box(self.items.get(key).unwrap().unwrap().to_vec()).len()
    }

    fn scan(&self, prefix: &[u8]) -> usize {
        let mut n = 0;
        for guard in self.items.prefix(prefix) {
            std::hint::black_box(guard.into_inner().unwrap().1.to_vec());
            n += 1;
        }
        n
    }

    fn settle(&self) {
        self.db.persist(fjall::PersistMode::SyncAll).unwrap();
        self.items.rotate_memtable_and_wait().unwrap();
    }
}

/// girder's engine: records with checksums, group commit.
struct Girder(DiskEngine);

impl Girder {
    fn open(dir: &Path, durability: Durability) -> Girder {
        Girder(DiskEngine::open(dir, EngineConfig { durability, ..EngineConfig::default() }).unwrap())
    }

    fn key(key: &[u8]) -> ItemKey {
        let (bucket, item) = key.split_at(key.len().min(8));
        ItemKey::new(7, String::from_utf8_lossy(bucket), String::from_utf8_lossy(item))
    }
}

impl Kv for Girder {
    fn put(&self, key: &[u8], value: &[u8], _sync: bool) {
        let record = Record {
            version: Version { seq: 1, epoch: 1 },
            tombstone: false,
            written_ms: 0,
            value: bytes::Bytes::copy_from_slice(value),
        };
        self.0.write(&[(Girder::key(key), record)]).unwrap();
    }

    fn get(&self, key: &[u8]) -> usize {
        std::hint::black_box(self.0.get(&Girder::key(key)).unwrap().unwrap().value).len()
    }

    fn scan(&self, prefix: &[u8]) -> usize {
        let bucket = String::from_utf8_lossy(&prefix[..8]);
        let mut after: Option<String> = None;
        let mut n = 0;
        loop {
            let page = self.0.scan_bucket(7, &bucket, after.as_deref(), 256).unwrap();
            n += page.len();
            match page.last() {
                Some((item, _)) if page.len() == 256 => after = Some(item.clone()),
                _ => return n,
            }
        }
    }

    fn settle(&self) {
        self.0.flush().unwrap();
    }
}

/// Incompressible bytes, different per call.
fn value(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn key(bucket: u32, item: usize) -> Vec<u8> {
    format!("bkt{bucket:05}/item{item:08}").into_bytes()
}

/// Bytes this process caused to be written to storage so far (Linux), for write amplification.
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

struct Sample(Vec<Duration>);

impl Sample {
    fn time(n: usize, mut f: impl FnMut(usize)) -> Sample {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let begun = Instant::now();
            f(i);
            times.push(begun.elapsed());
        }
        times.sort();
        Sample(times)
    }

    fn p50_us(&self) -> f64 {
        self.0[self.0.len() / 2].as_secs_f64() * 1e6
    }

    fn p99_us(&self) -> f64 {
        self.0[(self.0.len() * 99 / 100).min(self.0.len() - 1)].as_secs_f64() * 1e6
    }
}

fn row(engine: &str, case: &str, s: &Sample, bytes_each: usize, extra: &str) {
    let mbps = bytes_each as f64 / (s.p50_us() / 1e6) / 1e6;
    println!(
        "{engine:<7} {case:<34} p50 {:>9.1} µs  p99 {:>9.1} µs  {mbps:>8.0} MB/s  {extra}",
        s.p50_us(),
        s.p99_us()
    );
}

/// Single puts, gets and a bucket scan on one engine.
fn singles(name: &str, kv: &dyn Kv, buffered: &dyn Kv) {
    let v4k = value(4 * KIB, 1);
    let v1m = value(MIB, 2);
    let s = Sample::time(200, |i| kv.put(&key(0, i), &v4k, true));
    row(name, "put 4 KiB Immediate", &s, 4 * KIB, "");
    let s = Sample::time(2_000, |i| buffered.put(&key(1, i), &v4k, false));
    row(name, "put 4 KiB Buffered", &s, 4 * KIB, "");
    kv.settle();
    let before = written_bytes();
    let s = Sample::time(40, |i| kv.put(&key(2, i), &v1m, true));
    kv.settle();
    let amp = (written_bytes() - before) as f64 / (40 * MIB) as f64;
    row(name, "put 1 MiB Immediate", &s, MIB, &format!("{amp:.2} bytes written per byte put"));
    let s = Sample::time(40, |i| buffered.put(&key(3, i), &v1m, false));
    row(name, "put 1 MiB Buffered", &s, MIB, "");
    let s = Sample::time(5_000, |i| assert_eq!(kv.get(&key(0, i % 200)), 4 * KIB));
    row(name, "get 4 KiB (warm)", &s, 4 * KIB, "");
    let s = Sample::time(200, |i| assert_eq!(kv.get(&key(2, i % 40)), MIB));
    row(name, "get 1 MiB (warm)", &s, MIB, "");
    for i in 0..1_000 {
        buffered.put(&key(9, i), &v4k[..1_000], false);
    }
    let s = Sample::time(20, |_| assert_eq!(buffered.scan(b"bkt00009"), 1_000));
    row(name, "scan 1,000 x 1 KB items", &s, 1_000_000, "");
    let big = value(64 * MIB, 3);
    let s = Sample::time(3, |i| kv.put(&key(4, i), &big, true));
    row(name, "put 64 MiB Immediate", &s, 64 * MIB, "");
}

/// 4 threads putting 4 KiB items with Immediate durability at once.
fn concurrent(name: &str, kv: Arc<dyn Kv>) {
    let v4k = Arc::new(value(4 * KIB, 4));
    let per_thread = 150;
    let begun = Instant::now();
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let (kv, v) = (kv.clone(), v4k.clone());
            std::thread::spawn(move || Sample::time(per_thread, |i| kv.put(&key(10 + t, i), &v, true)))
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap().0);
    }
    all.sort();
    let ops = 4.0 * per_thread as f64 / begun.elapsed().as_secs_f64();
    row(name, "4 writers x 4 KiB Immediate", &Sample(all), 4 * KIB, &format!("{ops:.0} puts/s in all"));
}

/// A child process that writes 104 MiB into `dir`, syncs, and dies without closing; the parent
/// then times the reopen (the recovery after a crash).
fn crash_child(engine: &str, dir: &Path) {
    let kv = open(engine, dir, false);
    let v = value(MIB, 5);
    for i in 0..96 {
        kv.put(&key(20, i), &v, true);
    }
    for i in 0..2_000 {
        kv.put(&key(21, i), &v[..4 * KIB], false);
    }
    kv.settle();
    std::process::abort();
}

fn recovery(engine: &str, dir: &Path) {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("GIRDER_ENGINES_CRASH", format!("{engine}:{}", dir.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the crashing child exited cleanly");
    let begun = Instant::now();
    let kv = open(engine, dir, true);
    let took = begun.elapsed();
    assert_eq!(kv.get(&key(20, 95)), MIB, "{engine} lost a synced write");
    assert_eq!(kv.get(&key(21, 1_999)), 4 * KIB, "{engine} lost a synced write");
    let size = dir_bytes(dir) as f64 / MIB as f64;
    println!(
        "{engine:<7} {:<34} {:>9.1} ms  ({size:.0} MiB on disk for 104 MiB written)",
        "reopen after a crash",
        took.as_secs_f64() * 1e3
    );
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn open(engine: &str, dir: &Path, immediate: bool) -> Box<dyn Kv> {
    match engine {
        "redb" => Box::new(Redb::open(dir)),
        "fjall" => Box::new(Fjall::open(dir)),
        _ => Box::new(Girder::open(dir, if immediate { Durability::Immediate } else { Durability::Buffered })),
    }
}

fn main() {
    if let Ok(spec) = std::env::var("GIRDER_ENGINES_CRASH") {
        let (engine, dir) = spec.split_once(':').unwrap();
        crash_child(engine, Path::new(dir));
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("engines-bench-{}", std::process::id()));
    println!("data under {} (cargo bench -p girder --bench engines)", root.display());
    for engine in ["redb", "fjall"] {
        let kv = open(engine, &root.join(engine), true);
        singles(engine, kv.as_ref(), kv.as_ref());
        drop(kv);
        concurrent(engine, Arc::from(open(engine, &root.join(format!("{engine}-c")), true)));
        recovery(engine, &root.join(format!("{engine}-r")));
    }
    let immediate = Girder::open(&root.join("girder"), Durability::Immediate);
    let buffered = Girder::open(&root.join("girder-b"), Durability::Buffered);
    singles("girder", &immediate, &buffered);
    drop((immediate, buffered));
    concurrent("girder", Arc::new(Girder::open(&root.join("girder-c"), Durability::Immediate)));
    recovery("girder", &root.join("girder-r"));
    std::fs::remove_dir_all(&root).unwrap();
}
