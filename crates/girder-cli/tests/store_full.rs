//! A data disk that fills under a running cluster: two `girder node`s on a real Redis, every
//! flock on both (R = 2), and n2's data directory on a small disk. Writes that do not fit are
//! refused with `507 full` (never acknowledged; items spread over 23 buckets, so n2 refuses some
//! as their primary and some as a replica); the node stays up and every acknowledged write
//! reads back byte for byte. Deletes still go through on the full disk and make room for new
//! writes; once the disk has room again, writes succeed without a restart; n2's data file, read
//! on its own and after a restart, holds everything acknowledged.
//!
//! The small disk is a 24 MiB tmpfs (the test mounts it, which needs root, as in CI). Where
//! mounting is not allowed it says so and caps n2's file sizes with RLIMIT_FSIZE instead
//! (writes past it fail with EFBIG, which the engine also reports as full): a data directory
//! made read-only would not do, since permissions bind only opening a file, and the node
//! holds its data file open. `GIRDER_TEST_FULL_NO_MOUNT=1` forces that fallback.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{text, ScratchDir, GIRDER};
use girder::store::engine::{DiskEngine, Engine, EngineConfig, ItemKey};
use girder::testing::RedisServer;

/// Set to use the RLIMIT_FSIZE fallback even where mounting works.
const NO_MOUNT: &str = "GIRDER_TEST_FULL_NO_MOUNT";
/// The small disk's size, and its size once room is given back.
const SMALL: &str = "size=24m";
const LARGER: &str = "size=64m";
/// In the fallback, how far n2's data file may grow past its size when the cap is set.
const FSIZE_ROOM: u64 = 24 << 20;
/// Writes in flight at once, so group commits meet the full disk too.
const CONCURRENCY: usize = 4;
/// Refusals to see before the disk counts as full for good.
const REFUSALS: usize = 8;
/// How long any one wait of the test may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// n2's data directory on a small disk: a tmpfs, or (fallback) a cap on the node's file sizes.
/// A mounted tmpfs is unmounted when dropped, on panic too; nodes on it must be gone by then
/// (declare it before them).
struct SmallDisk {
    dir: ScratchDir,
    tmpfs: bool,
}

impl SmallDisk {
    fn new() -> SmallDisk {
        let dir = ScratchDir::new("small");
        if std::env::var_os(NO_MOUNT).is_none() && mount(dir.dir()) {
            return SmallDisk { dir, tmpfs: true };
        }
        eprintln!(
            "store_full: could not mount a tmpfs (not root, or {NO_MOUNT} set): n2's disk fills by an \
             RLIMIT_FSIZE cap on its files instead"
        );
        SmallDisk { dir, tmpfs: false }
    }

    fn path(&self) -> &str {
        self.dir.path()
    }

    /// Makes the disk small for `node` (the fallback's cap is per process, so set once it runs).
    fn cap(&self, node: &Node) {
        if self.tmpfs {
            return;
        }
        let file = std::fs::metadata(self.dir.dir().join("items.redb")).map_or(0, |m| m.len());
        set_fsize(node.pid(), Some(file + FSIZE_ROOM));
    }

    /// Gives the disk room again, under the running node.
    fn grow(&self, node: &Node) {
        if self.tmpfs {
            let remount = format!("remount,{LARGER}");
            let status = Command::new("mount").args(["-o", &remount]).arg(self.dir.dir()).status().unwrap();
            assert!(status.success(), "mount -o {remount} failed");
        } else {
            set_fsize(node.pid(), None);
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if !self.tmpfs {
            return;
        }
        let quiet = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(self.dir.dir())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // Lazily when busy (a process still holds a file there): never leave a mount behind.
        if !quiet(&[]) && !quiet(&["-l"]) {
            eprintln!("store_full: could not unmount {}", self.dir.dir().display());
        }
    }
}

/// Mounts a small tmpfs on `dir`; whether it worked.
fn mount(dir: &Path) -> bool {
    let status =
        Command::new("mount").args(["-t", "tmpfs", "-o", SMALL, "tmpfs"]).arg(dir).stderr(Stdio::null()).status();
    matches!(status, Ok(s) if s.success())
}

/// Sets the soft RLIMIT_FSIZE of process `pid` (`None`: back to its hard limit). Only the
/// soft limit moves, so no privilege is needed to raise it again.
fn set_fsize(pid: u32, soft: Option<u64>) {
    use rlimit::{prlimit, Resource};
    let (mut old_soft, mut hard) = (0, 0);
    let pid = i32::try_from(pid).unwrap();
    prlimit(pid, Resource::FSIZE, None, Some((&mut old_soft, &mut hard))).unwrap();
    prlimit(pid, Resource::FSIZE, Some((soft.unwrap_or(hard).min(hard), hard)), None).unwrap();
}

/// A `girder node` started with SIGXFSZ ignored (a file size cap then fails its writes with
/// EFBIG instead of killing it), stderr kept in a file and shown if the test fails; killed
/// when dropped.
struct Node {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Node {
    fn start(redis: &str, id: &str, data_dir: &str, logs: &ScratchDir) -> Node {
        let log = logs.dir().join(format!("{id}-{}.log", fastrand::u32(..)));
        let mut child = Command::new("sh")
            .args(["-c", r#"trap "" XFSZ; exec "$0" "$@""#, GIRDER, "node", "--listen", "127.0.0.1:0"])
            .args(["--statekeeper", redis, "--id", id, "--node-ttl-ms", "1500", "--heartbeat-ms", "250"])
            .args(["--workers", "1", "--slots", "2", "--data-dir", data_dir])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The node prints its address once it listens: that line is the ready signal.
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let url = line.split_whitespace().last().unwrap_or_default().to_owned();
        let node = Node { child, url, log };
        assert!(node.url.starts_with("http://127.0.0.1:"), "{id} did not start; first line {line:?}");
        node
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            tail.iter().rev().for_each(|line| eprintln!("{line}"));
        }
    }
}

/// One item the test writes: distinct bytes per index, sizes stored inline and in chunks.
#[derive(Clone)]
struct Item {
    bucket: String,
    item: String,
    value: Vec<u8>,
}

impl Item {
    fn new(i: u64) -> Item {
        let sizes = [400 << 10, 3 << 10, 200 << 10, 40 << 10];
        let mut value = vec![0u8; sizes[i as usize % sizes.len()]];
        fastrand::Rng::with_seed(i).fill(&mut value);
        // Spread over buckets, so over flocks whose primary is n1 (n2 fails as a replica)
        // and flocks whose primary is n2 (it fails its own write).
        Item { bucket: format!("full-{}", i % 23), item: format!("i{i:05}"), value }
    }

    fn path(&self) -> String {
        format!("/v1/store/{}/{}", self.bucket, self.item)
    }
}

/// What became of a write.
enum Outcome {
    Acknowledged,
    /// Refused with this message.
    Full(String),
}

/// PUTs `item` through `url`; anything but an acknowledgement or a clear `507 full` fails
/// the test.
fn put(client: &reqwest::blocking::Client, url: &str, item: &Item) -> Outcome {
    let response = client.put(format!("{url}{}", item.path())).body(item.value.clone()).send().unwrap();
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Outcome::Acknowledged;
    }
    let body = response.text().unwrap_or_default();
    let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        status == 507 && error["kind"] == "full" && message.contains("full") && message.contains("items.redb"),
        "PUT {}: not a clear disk-full error: {status} {body}",
        item.path()
    );
    Outcome::Full(message.to_owned())
}

/// PUTs `items` through `url`, all at once; the acknowledged ones and the refusals.
fn put_all(client: &reqwest::blocking::Client, url: &str, items: Vec<Item>) -> (Vec<Item>, Vec<(Item, String)>) {
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let puts: Vec<_> = items.iter().map(|item| s.spawn(|| put(client, url, item))).collect();
        puts.into_iter().map(|put| put.join().unwrap()).collect()
    });
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    for (item, outcome) in items.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Acknowledged => acknowledged.push(item),
            Outcome::Full(message) => refused.push((item, message)),
        }
    }
    (acknowledged, refused)
}

/// The value of `item` read through `url`; `None` when absent. Any other answer fails.
fn get(client: &reqwest::blocking::Client, url: &str, item: &Item) -> Option<Vec<u8>> {
    let response = client.get(format!("{url}{}", item.path())).send().unwrap();
    match response.status().as_u16() {
        200 => Some(response.bytes().unwrap().to_vec()),
        404 => None,
        other => panic!("GET {} through {url}: {other} {}", item.path(), response.text().unwrap_or_default()),
    }
}

/// Every item of `items` reads back through `url` byte for byte.
fn all_read_back(client: &reqwest::blocking::Client, url: &str, items: &[Item]) {
    for item in items {
        let got = get(client, url, item);
        assert!(got.as_ref() == Some(&item.value), "{} through {url}: {:?} bytes", item.path(), got.map(|v| v.len()));
    }
}

/// Every item of `items` reads as absent through `url`.
fn all_gone(client: &reqwest::blocking::Client, url: &str, items: &[Item]) {
    for item in items {
        assert!(get(client, url, item).is_none(), "deleted {} reads back through {url}", item.path());
    }
}

/// DELETEs `items` through `url`, one after the other: each must be acknowledged.
fn delete_all(client: &reqwest::blocking::Client, url: &str, items: &[Item]) {
    for item in items {
        let response = client.delete(format!("{url}{}", item.path())).send().unwrap();
        let status = response.status();
        let body = response.text().unwrap_or_default();
        assert!(status.is_success(), "DELETE {} on a full disk: {status} {body}", item.path());
    }
}

/// `node` answers its health check.
fn healthy(client: &reqwest::blocking::Client, node: &mut Node, id: &str) {
    assert!(node.alive(), "{id} exited");
    let response = client.get(format!("{}/v1/health", node.url)).send().unwrap();
    assert_eq!(response.status().as_u16(), 200, "{id}'s health check");
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(body["node"], id, "{body}");
}

fn status(url: &str) -> serde_json::Value {
    let out = Command::new(GIRDER).args(["status", "--json", "--node", url]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until two live nodes both hold every flock, caught up.
fn settled(url: &str) {
    let bits = |report: &serde_json::Value| -> u32 {
        let words = report["store"]["ready"].as_array().cloned().unwrap_or_default();
        words.iter().map(|w| w.as_u64().unwrap_or(0).count_ones()).sum()
    };
    let begun = Instant::now();
    loop {
        let nodes = status(url).as_array().cloned().unwrap_or_default();
        let ready: u32 = nodes.iter().map(bits).sum();
        let syncing: u64 = nodes.iter().map(|n| n["store"]["syncing"].as_u64().unwrap_or(1)).sum();
        if nodes.len() == 2 && ready == 2 * 1_024 && syncing == 0 {
            return;
        }
        assert!(begun.elapsed() < PATIENCE, "never settled: {} nodes, ready {ready}, syncing {syncing}", nodes.len());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per flock, its digest on the node at `url` (flocks it holds ready).
fn digests(client: &reqwest::blocking::Client, url: &str) -> std::collections::BTreeMap<u64, String> {
    let flocks: serde_json::Value = client.get(format!("{url}/v1/flocks")).send().unwrap().json().unwrap();
    let ready = flocks["flocks"].as_array().unwrap().iter().filter(|f| f["ready"] == true);
    ready.map(|f| (f["flock"].as_u64().unwrap(), f["digest"].as_str().unwrap().to_owned())).collect()
}

/// Waits until both nodes hold every flock with equal digests, so equal data.
fn converged(client: &reqwest::blocking::Client, a: &str, b: &str) {
    let begun = Instant::now();
    loop {
        let (da, db) = (digests(client, a), digests(client, b));
        if da.len() == 1_024 && da == db {
            return;
        }
        let differing = da.iter().filter(|(flock, d)| db.get(flock) != Some(d)).count();
        assert!(
            begun.elapsed() < PATIENCE,
            "replicas differ in {differing} flocks ({} vs {} held)",
            da.len(),
            db.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the test wrote: the writes and deletes acknowledged, and the next item's index.
#[derive(Default)]
struct Ledger {
    acknowledged: Vec<Item>,
    deleted: Vec<Item>,
    next: u64,
}

impl Ledger {
    /// `count` items never written before.
    fn fresh(&mut self, count: u64) -> Vec<Item> {
        let items = (self.next..self.next + count).map(Item::new).collect();
        self.next += count;
        items
    }
}

/// The cluster under test: n1 on an ordinary directory, n2 on the small disk. Fields drop in
/// order, so the nodes are gone before the disk is unmounted.
struct Cluster {
    n1: Node,
    n2: Node,
    disk: SmallDisk,
    _n1_dir: ScratchDir,
    logs: ScratchDir,
    redis: String,
    _redis: RedisServer,
    client: reqwest::blocking::Client,
}

impl Cluster {
    fn start() -> Cluster {
        let redis_server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
        let redis = redis_server.url();
        let (logs, n1_dir, disk) = (ScratchDir::new("logs"), ScratchDir::new("n1"), SmallDisk::new());
        let n1 = Node::start(&redis, "n1", n1_dir.path(), &logs);
        let n2 = Node::start(&redis, "n2", disk.path(), &logs);
        disk.cap(&n2);
        settled(&n1.url);
        let client = reqwest::blocking::Client::builder().timeout(PATIENCE).build().unwrap();
        Cluster { n1, n2, disk, _n1_dir: n1_dir, logs, redis, _redis: redis_server, client }
    }

    /// Writes new items through n1, [`CONCURRENCY`] at once, until n2's disk has refused
    /// [`REFUSALS`] of them (and two rounds ran after the first refusal); returns the refused.
    fn fill(&self, ledger: &mut Ledger) -> Vec<(Item, String)> {
        let mut refused = Vec::new();
        let mut rounds_full = 0;
        while refused.len() < REFUSALS || rounds_full < 2 {
            assert!(ledger.next < 1_000, "the disk never filled: {} writes acknowledged", ledger.acknowledged.len());
            let (acked, full) = put_all(&self.client, &self.n1.url, ledger.fresh(CONCURRENCY as u64));
            ledger.acknowledged.extend(acked);
            refused.extend(full);
            rounds_full += usize::from(!refused.is_empty());
        }
        refused
    }

    /// Both nodes are up and serve every acknowledged write; a refused write reads back whole
    /// or not at all (it may have reached its primary before a replica refused it).
    fn check_while_full(&mut self, ledger: &Ledger, refused: &[(Item, String)]) {
        healthy(&self.client, &mut self.n2, "n2");
        healthy(&self.client, &mut self.n1, "n1");
        for url in [&self.n1.url, &self.n2.url] {
            all_read_back(&self.client, url, &ledger.acknowledged);
            for (item, _) in refused {
                let got = get(&self.client, url, item);
                let whole = got.is_none() || got.as_ref() == Some(&item.value);
                assert!(whole, "refused {} reads back damaged", item.path());
            }
        }
    }

    /// Still full: up to 8 of the largest items are deleted, which frees room for new writes.
    fn delete_while_full(&self, ledger: &mut Ledger) {
        let large: Vec<Item> =
            ledger.acknowledged.iter().filter(|i| i.value.len() >= 400 << 10).take(8).cloned().collect();
        ledger.acknowledged.retain(|item| large.iter().all(|d| d.item != item.item));
        delete_all(&self.client, &self.n1.url, &large);
        all_gone(&self.client, &self.n1.url, &large);
        all_gone(&self.client, &self.n2.url, &large);
        ledger.deleted.extend(large);
        let (acked, still) = put_all(&self.client, &self.n1.url, ledger.fresh(4));
        assert!(still.is_empty(), "{} writes refused after deleting, first: {}", still.len(), still[0].1);
        ledger.acknowledged.extend(acked);
    }

    /// More room, without restarting anything: new writes and the refused ones go through.
    fn with_room_again(&mut self, ledger: &mut Ledger, refused: Vec<(Item, String)>) {
        self.disk.grow(&self.n2);
        let mut again = ledger.fresh(8);
        again.extend(refused.into_iter().map(|(item, _)| item));
        let (acked, still) = put_all(&self.client, &self.n1.url, again);
        assert!(still.is_empty(), "{} writes refused with room again, first: {}", still.len(), still[0].1);
        ledger.acknowledged.extend(acked);
        healthy(&self.client, &mut self.n2, "n2");
        all_read_back(&self.client, &self.n2.url, &ledger.acknowledged);
    }

    /// n2's data file, read on its own, holds every acknowledged write and delete; n2
    /// restarted on it serves them all, its flocks equal to n1's.
    fn restart_n2(&mut self, ledger: &Ledger) {
        self.n2.kill();
        on_disk(self.disk.path(), &ledger.acknowledged, &ledger.deleted);
        self.n2 = Node::start(&self.redis, "n2", self.disk.path(), &self.logs);
        settled(&self.n1.url);
        all_read_back(&self.client, &self.n2.url, &ledger.acknowledged);
        all_gone(&self.client, &self.n2.url, &ledger.deleted);
        converged(&self.client, &self.n1.url, &self.n2.url);
    }
}

/// Opens n2's data file itself (n2 stopped): every acknowledged write is there, intact, and
/// every acknowledged delete too.
fn on_disk(dir: &str, items: &[Item], deleted: &[Item]) {
    let engine = DiskEngine::open(Path::new(dir), EngineConfig::default()).unwrap();
    let record = |item: &Item| {
        let flock = girder::placement::flock_of(item.bucket.as_bytes());
        engine.get(&ItemKey::new(flock, item.bucket.as_str(), item.item.as_str())).unwrap()
    };
    for item in items {
        let stored = record(item).unwrap_or_else(|| panic!("{} is not in n2's data file", item.path()));
        assert!(!stored.tombstone && stored.value == item.value, "{} differs in n2's data file", item.path());
    }
    for item in deleted {
        assert!(record(item).is_none_or(|r| r.tombstone), "deleted {} is live in n2's data file", item.path());
    }
}

#[test]
fn a_full_data_disk_refuses_writes_clearly_and_loses_nothing() {
    let begun = Instant::now();
    let mut cluster = Cluster::start();
    let mut ledger = Ledger::default();
    let refused = cluster.fill(&mut ledger);
    let written = ledger.acknowledged.len();
    eprintln!("store_full: {written} writes acknowledged, {} refused: {}", refused.len(), refused[0].1);
    assert!(written >= 20, "only {written} writes fit");
    cluster.check_while_full(&ledger, &refused);
    cluster.delete_while_full(&mut ledger);
    cluster.with_room_again(&mut ledger, refused);
    cluster.restart_n2(&ledger);
    eprintln!("store_full: {} acknowledged writes checked in {:?}", ledger.acknowledged.len(), begun.elapsed());
}
