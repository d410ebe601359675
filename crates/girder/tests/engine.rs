//! The storage engines: the conformance suite on both, and the disk engine's faults (reopen,
//! bytes flipped on disk, read-only and full data directories, files that are not ours).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use girder::store::engine::conformance::{self, distinctive, record, tombstone, Subject};
use girder::store::engine::{DiskEngine, Durability, Engine, EngineConfig, EngineError, ItemKey, MemoryEngine};

/// A fresh directory under cargo's target/tmp (the data disk), removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("engine-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tmpfs mounted on a directory (as root), unmounted when dropped.
struct Tmpfs(TempDir);

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(name: &str, options: &str) -> Option<Tmpfs> {
        let dir = TempDir::new(name);
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir.0)
            .stderr(std::process::Stdio::null())
            .status();
        matches!(status, Ok(s) if s.success()).then_some(Tmpfs(dir))
    }

    fn remount(&self, options: &str) {
        let status =
            Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0 .0).status().unwrap();
        assert!(status.success(), "remount {options} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0 .0).status();
    }
}

struct Memory(MemoryEngine);

impl Subject for Memory {
    fn engine(&self) -> &dyn Engine {
        &self.0
    }

    fn corrupt(&mut self, key: &ItemKey, _value: &[u8]) {
        assert!(self.0.corrupt(key));
    }
}

struct Disk {
    engine: Option<DiskEngine>,
    config: EngineConfig,
    dir: TempDir,
}

impl Disk {
    fn new(config: EngineConfig) -> Disk {
        let dir = TempDir::new("conformance");
        Disk { engine: Some(DiskEngine::open(&dir.0, config.clone()).unwrap()), config, dir }
    }
}

impl Subject for Disk {
    fn engine(&self) -> &dyn Engine {
        self.engine.as_ref().unwrap()
    }

    /// Closes the engine (its cache would hide the damage), flips a byte of the value in the
    /// file, and opens it again.
    fn corrupt(&mut self, _key: &ItemKey, value: &[u8]) {
        drop(self.engine.take());
        assert!(flip(&self.dir.0.join("items.redb"), &value[..64]) > 0, "the value is not in the file");
        self.engine = Some(DiskEngine::open(&self.dir.0, self.config.clone()).unwrap());
    }
}

/// Flips one byte in every copy of `pattern` in `file` (redb's copy-on-write pages may leave
/// stale copies); returns how many it flipped.
fn flip(file: &Path, pattern: &[u8]) -> usize {
    let mut bytes = std::fs::read(file).unwrap();
    let found: Vec<usize> =
        bytes.windows(pattern.len()).enumerate().filter(|(_, w)| *w == pattern).map(|(at, _)| at).collect();
    for &at in &found {
        bytes[at + 10] ^= 0x04;
    }
    std::fs::write(file, &bytes).unwrap();
    found.len()
}

#[test]
fn memory_engine_conforms() {
    conformance::run_all(&|| Box::new(Memory(MemoryEngine::new())));
}

#[test]
fn disk_engine_conforms() {
    conformance::run_all(&|| Box::new(Disk::new(EngineConfig::default())));
}

#[test]
fn disk_engine_conforms_buffered() {
    let config = EngineConfig { durability: Durability::Buffered, flush_ms: 20, ..EngineConfig::default() };
    conformance::run_all(&|| Box::new(Disk::new(config.clone())));
}

fn key(bucket: &str, item: &str) -> ItemKey {
    ItemKey::new(17, bucket, item)
}

#[test]
fn a_missing_data_directory_is_created_and_reopening_keeps_every_record_and_usage() {
    for durability in [Durability::Immediate, Durability::Buffered] {
        let root = TempDir::new("reopen");
        let dir = root.0.join("missing").join("data");
        let config = EngineConfig { durability, ..EngineConfig::default() };
        let big = distinctive(5, 1 << 20);
        let engine = DiskEngine::open(&dir, config.clone()).unwrap();
        engine.write(&[(key("b", "small"), record(1, "small")), (key("b", "big"), record(2, big.clone()))]).unwrap();
        engine.write(&[(key("b", "dead"), tombstone(3)), (ItemKey::new(900, "c", "gone"), record(1, "x"))]).unwrap();
        engine.remove(&[ItemKey::new(900, "c", "gone")]).unwrap();
        let usage = engine.usage();
        let metas = engine.scan_flock(17, None, 100).unwrap();
        drop(engine);

        let engine = DiskEngine::open(&dir, config).unwrap();
        assert_eq!(engine.get(&key("b", "small")).unwrap(), Some(record(1, "small")), "{durability:?}");
        assert_eq!(engine.get(&key("b", "big")).unwrap().map(|r| r.value), Some(Bytes::from(big)));
        assert_eq!(engine.get(&key("b", "dead")).unwrap(), Some(tombstone(3)));
        assert_eq!(engine.get(&ItemKey::new(900, "c", "gone")).unwrap(), None);
        assert_eq!(engine.scan_flock(17, None, 100).unwrap(), metas);
        assert_eq!(engine.usage(), usage, "usage is kept across a restart");
        assert_eq!((usage[0].flock, usage[0].items), (17, 2));
    }
}

#[test]
fn a_flipped_byte_in_a_long_value_is_reported_not_served() {
    let dir = TempDir::new("flip");
    let big = distinctive(6, 700 << 10);
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    engine.write(&[(key("b", "big"), record(1, big.clone())), (key("b", "next"), record(1, "next"))]).unwrap();
    drop(engine);
    // Somewhere in the third chunk.
    assert!(flip(&dir.0.join("items.redb"), &big[600 << 10..(600 << 10) + 64]) > 0);
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    match engine.get(&key("b", "big")) {
        Err(EngineError::Corrupt { key: k, reason }) => {
            assert_eq!(k, key("b", "big"));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("damaged bytes were served: {:?}", other.map(|r| r.map(|r| r.value.len()))),
    }
    assert_eq!(engine.get(&key("b", "next")).unwrap(), Some(record(1, "next")));
    engine.write(&[(key("b", "big"), record(2, big.clone()))]).unwrap();
    assert_eq!(engine.get(&key("b", "big")).unwrap().map(|r| r.value), Some(Bytes::from(big)), "rewritten whole");
}

/// A long value's chunks go with it when it is overwritten by a short one or removed (looked
/// at in the file with redb itself).
#[test]
fn long_values_leave_no_chunks_behind() {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let dir = TempDir::new("chunks");
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    engine.write(&[(key("b", "shrinks"), record(1, distinctive(1, 1 << 20)))]).unwrap();
    engine.write(&[(key("b", "shrinks"), record(2, "short"))]).unwrap();
    engine.write(&[(key("b", "removed"), record(1, distinctive(2, 600 << 10)))]).unwrap();
    engine.remove(&[key("b", "removed")]).unwrap();
    engine.write(&[(key("b", "dies"), record(1, distinctive(3, 600 << 10)))]).unwrap();
    engine.write(&[(key("b", "dies"), tombstone(2))]).unwrap();
    drop(engine);
    let db = redb::Database::open(dir.0.join("items.redb")).unwrap();
    let tx = db.begin_read().unwrap();
    let chunks = tx.open_table(redb::TableDefinition::<(&[u8], u32), &[u8]>::new("chunks")).unwrap();
    assert_eq!(chunks.len().unwrap(), 0);
}

/// Damage to a key moves its record under another key: the key's checksum catches it.
#[test]
fn a_record_under_a_damaged_key_is_reported_not_served() {
    let dir = TempDir::new("key-flip");
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    let item = "zz-a-distinctive-item-key-of-some-length-qqqqqqqqqqqqqqqq";
    engine.write(&[(key("b", "a"), record(1, "a")), (key("b", item), record(1, "moved"))]).unwrap();
    drop(engine);
    // The last byte of the item, 'q' -> 's': still the last key of the bucket, so redb's order holds.
    let path = dir.0.join("items.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let found: Vec<usize> =
        bytes.windows(item.len()).enumerate().filter(|(_, w)| *w == item.as_bytes()).map(|(at, _)| at).collect();
    assert!(!found.is_empty());
    for at in found {
        bytes[at + item.len() - 1] ^= 0x02;
    }
    std::fs::write(&path, &bytes).unwrap();
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    let moved = key("b", &format!("{}s", &item[..item.len() - 1]));
    assert_eq!(engine.get(&key("b", item)).unwrap(), None);
    match engine.get(&moved) {
        Err(EngineError::Corrupt { key: k, reason }) => assert!(k == moved && reason.contains("key"), "{reason}"),
        other => panic!("a record was served under a key it was not written for: {other:?}"),
    }
    assert!(matches!(engine.scan_bucket(17, "b", None, 10), Err(EngineError::Corrupt { .. })));
    let metas = engine.scan_flock(17, None, 10).unwrap();
    assert_eq!(metas[1], (moved, girder::store::record::RecordMeta::CORRUPT));
}

/// A copy of the file taken while the engine is open is what a crash leaves; with a byte of
/// one value damaged too, it still opens at once and only that item fails.
#[test]
fn a_crashed_and_damaged_file_opens_and_fails_only_the_damaged_item() {
    let dir = TempDir::new("crash");
    let crashed = TempDir::new("crashed");
    let value = distinctive(7, 4 << 10);
    let engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    for i in 0..50 {
        engine.write(&[(key("b", &format!("i{i:02}")), record(1, distinctive(100 + i, 300)))]).unwrap();
    }
    engine.write(&[(key("b", "damaged"), record(1, value.clone()))]).unwrap();
    std::fs::copy(dir.0.join("items.redb"), crashed.0.join("items.redb")).unwrap();
    drop(engine);
    assert!(flip(&crashed.0.join("items.redb"), &value[..64]) > 0);
    let engine = DiskEngine::open(&crashed.0, EngineConfig::default()).unwrap();
    assert!(matches!(engine.get(&key("b", "damaged")), Err(EngineError::Corrupt { .. })));
    for i in 0..50 {
        let got = engine.get(&key("b", &format!("i{i:02}"))).unwrap();
        assert_eq!(got, Some(record(1, distinctive(100 + i, 300))), "item {i} after the crash");
    }
    assert_eq!(engine.usage()[0].items, 51);
}

#[test]
fn a_file_that_is_not_ours_is_refused_clearly() {
    let dir = TempDir::new("garbage");
    std::fs::write(dir.0.join("items.redb"), distinctive(8, 20_000)).unwrap();
    let err = DiskEngine::open(&dir.0, EngineConfig::default()).err().expect("garbage opened");
    assert!(matches!(err, EngineError::Io(_)), "{err:?}");
    assert!(err.to_string().contains("items.redb"), "{err}");

    let other = TempDir::new("other-redb");
    {
        let db = redb::Database::create(other.0.join("items.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(redb::TableDefinition::<u64, u64>::new("theirs")).unwrap().insert(1, 2).unwrap();
        tx.commit().unwrap();
    }
    let err = DiskEngine::open(&other.0, EngineConfig::default()).err().expect("another program's redb opened");
    assert!(err.to_string().contains("girder did not write"), "{err}");

    let file = TempDir::new("file");
    let not_a_dir = file.0.join("data");
    std::fs::write(&not_a_dir, b"a file").unwrap();
    let err = DiskEngine::open(&not_a_dir, EngineConfig::default()).err().expect("a file opened as a directory");
    assert!(err.to_string().contains("creating the data directory"), "{err}");
}

#[test]
fn a_file_open_elsewhere_is_refused_clearly() {
    let dir = TempDir::new("twice");
    let _engine = DiskEngine::open(&dir.0, EngineConfig::default()).unwrap();
    let err = DiskEngine::open(&dir.0, EngineConfig::default()).err().expect("opened twice");
    assert!(err.to_string().contains("open in another process"), "{err}");
}

/// Whether this process can write into a directory with mode 0555 (root can).
fn permissions_bind_us(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    let bound = std::fs::write(&probe, b"x").is_err();
    let _ = std::fs::remove_file(&probe);
    bound
}

#[test]
fn a_read_only_data_directory_gives_read_only() {
    let dir = TempDir::new("readonly");
    if permissions_bind_us(&dir.0) {
        let err = DiskEngine::open(&dir.0, EngineConfig::default()).err().expect("opened in a read-only directory");
        assert!(matches!(err, EngineError::ReadOnly(_)), "{err:?}");
        assert!(err.to_string().contains("read-only"), "{err}");
        return;
    }
    // Root ignores modes: make the file system read-only instead, after data was written.
    let Some(fs) = Tmpfs::mount("readonly-fs", "size=8m") else {
        // Neither works here: still assert a clear error, on a path that cannot be a directory.
        let err = DiskEngine::open(Path::new("/proc/version/data"), EngineConfig::default()).err().unwrap();
        assert!(err.to_string().contains("creating the data directory /proc/version/data"), "{err}");
        return;
    };
    let engine = DiskEngine::open(&fs.0 .0, EngineConfig::default()).unwrap();
    engine.write(&[(key("b", "kept"), record(1, "kept"))]).unwrap();
    drop(engine);
    fs.remount("ro");
    let err = DiskEngine::open(&fs.0 .0, EngineConfig::default()).err().expect("opened on a read-only fs");
    assert!(matches!(err, EngineError::ReadOnly(_)), "{err:?}");
    assert!(err.to_string().contains("read-only") && err.to_string().contains("items.redb"), "{err}");
    let fresh = fs.0 .0.join("fresh");
    let err = DiskEngine::open(&fresh, EngineConfig::default()).err().expect("created on a read-only fs");
    assert!(matches!(err, EngineError::ReadOnly(_)), "{err:?}");
    fs.remount("rw");
    let engine = DiskEngine::open(&fs.0 .0, EngineConfig::default()).unwrap();
    assert_eq!(engine.get(&key("b", "kept")).unwrap(), Some(record(1, "kept")));
}

/// Set in the child process of the full-disk test's fallback.
const FSIZE_CHILD: &str = "GIRDER_ENGINE_TEST_FSIZE_CHILD";

/// Fills a 4 MiB tmpfs: the write that does not fit gets Full, every write acknowledged
/// before it reads back, now, once there is room again, and after reopening. Where this
/// process may not mount, the same runs in a child process whose files may not grow past
/// 4 MiB (RLIMIT_FSIZE, with SIGXFSZ ignored, so writes fail with EFBIG).
#[test]
fn a_full_disk_gives_full_and_loses_nothing() {
    if std::env::var_os(FSIZE_CHILD).is_some() {
        let dir = TempDir::new("fsize");
        fill_until_full(&dir.0, None);
    } else if let Some(fs) = Tmpfs::mount("full", "size=4m") {
        fill_until_full(&fs.0 .0, Some(&fs));
    } else {
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"trap "" XFSZ; exec prlimit --fsize=4194304 "$0" --exact a_full_disk_gives_full_and_loses_nothing"#)
            .arg(std::env::current_exe().unwrap())
            .env(FSIZE_CHILD, "1")
            .status()
            .unwrap();
        assert!(status.success(), "the size-limited child failed: {status}");
    }
}

/// Writes 100 KiB items into `dir` until the disk refuses one, then checks what was
/// acknowledged; with `fs`, gives the disk more room and checks that writes resume.
fn fill_until_full(dir: &Path, fs: Option<&Tmpfs>) {
    let engine = DiskEngine::open(dir, EngineConfig::default()).unwrap();
    let mut acknowledged = Vec::new();
    let err = loop {
        let i = acknowledged.len() as u64;
        assert!(i < 1_000, "4 MiB never filled");
        let k = key("fill", &format!("i{i:04}"));
        match engine.write(&[(k.clone(), record(1, distinctive(i, 100 << 10)))]) {
            Ok(()) => acknowledged.push(k),
            Err(err) => break err,
        }
    };
    assert!(matches!(err, EngineError::Full(_)), "{err:?}");
    assert!(err.to_string().contains("the data directory is full"), "{err}");
    assert!(acknowledged.len() >= 10, "only {} writes fit", acknowledged.len());
    let check = |engine: &DiskEngine| {
        for (i, k) in acknowledged.iter().enumerate() {
            let got = engine.get(k).unwrap().map(|r| r.value);
            assert_eq!(got, Some(Bytes::from(distinctive(i as u64, 100 << 10))), "{k}");
        }
    };
    check(&engine);
    let mut items = acknowledged.len() as u64;
    if let Some(fs) = fs {
        // More room (an operator freed some): writes resume without restarting anything.
        fs.remount("size=8m");
        let more = key("fill", "more");
        engine.write(&[(more.clone(), record(1, "room again"))]).unwrap();
        assert_eq!(engine.get(&more).unwrap(), Some(record(1, "room again")));
        check(&engine);
        items += 1;
    }
    drop(engine);
    let engine = DiskEngine::open(dir, EngineConfig::default()).unwrap();
    check(&engine);
    assert_eq!(engine.usage()[0].items, items);
}
