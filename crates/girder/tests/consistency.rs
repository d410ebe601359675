//! Consistency histories of the data structures on both stores: read-your-writes of cache
//! values under racing near-cache fills, compare-and-set by value, and the near cache's
//! staleness across processes (two store handles on one Redis namespace stand for two
//! processes: each has its own near cache and change subscription).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use girder::structures::conformance::{compare_and_set_history, read_your_writes};
use girder::structures::{Cache, CacheConfig, Store};
use girder::testing::RedisServer;
use girder::{Embedded, EmbeddedConfig, RedisConfig, RedisStatekeeper, Statekeeper};

static NAMESPACE: AtomicU64 = AtomicU64::new(0);

/// `count` handles on one fresh namespace of `server`, as separate processes would have.
async fn redis_stores(server: &RedisServer, count: usize) -> (Vec<Arc<RedisStatekeeper>>, Vec<Store>) {
    let namespace = format!("consistency-{}", NAMESPACE.fetch_add(1, Ordering::Relaxed));
    let mut keepers = Vec::new();
    for _ in 0..count {
        let mut config = RedisConfig::new(server.url());
        config.namespace = namespace.clone();
        keepers.push(Arc::new(RedisStatekeeper::connect(config).await.expect("connects")));
    }
    let stores = keepers.iter().map(|k| k.structures()).collect();
    (keepers, stores)
}

fn embedded_store() -> (Embedded, Store) {
    let embedded = Embedded::new(EmbeddedConfig::default());
    let store = embedded.structures();
    (embedded, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_cache_writers_read_their_own_writes() {
    let (_embedded, store) = embedded_store();
    read_your_writes(vec![store], 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_writers_read_their_own_writes_with_other_processes_writing() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let (_keepers, stores) = redis_stores(&server, 2).await;
    // 6 writers x 5,000 = 30,000 sets in the process under test.
    read_your_writes(stores, 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_compare_and_set_compares_values() {
    let (_embedded, store) = embedded_store();
    compare_and_set_history(vec![store], 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_compare_and_set_compares_values_across_processes() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let (_keepers, stores) = redis_stores(&server, 2).await;
    compare_and_set_history(stores, 1_500).await;
}

/// One process writes a new value; another, which near-caches the old one and reads it all
/// along (so reads are in flight when the write lands), reads until it sees the new value.
/// Prints the delays' median and maximum; each must be within the near cache's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_staleness_across_processes_is_bounded() {
    const ROUNDS: u64 = 300;
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let (_keepers, stores) = redis_stores(&server, 2).await;
    let writer = Cache::new(stores[0].clone(), CacheConfig::default());
    let reader = Cache::new(stores[1].clone(), CacheConfig::default());
    writer.set("greeting", &0u64, None).await.unwrap();
    // Let the reader's change subscription come up (its first operation starts it).
    assert_eq!(reader.get::<u64>("greeting").await.unwrap(), Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = Arc::new(AtomicBool::new(false));
    let background = {
        let (reader, done) = (reader.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                reader.get::<u64>("greeting").await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut delays = Vec::new();
    for n in 1..=ROUNDS {
        // Near-cache the current value on the reader first.
        while reader.get::<u64>("greeting").await.unwrap() != Some(n - 1) {
            tokio::task::yield_now().await;
        }
        writer.set("greeting", &n, None).await.unwrap();
        let written = Instant::now();
        loop {
            if reader.get::<u64>("greeting").await.unwrap() == Some(n) {
                break;
            }
            assert!(written.elapsed() < Duration::from_secs(5), "round {n}: the reader still serves the old value");
            tokio::task::yield_now().await;
        }
        delays.push(written.elapsed());
        assert_eq!(writer.get::<u64>("greeting").await.unwrap(), Some(n), "the writer reads its own write");
    }
    done.store(true, Ordering::Relaxed);
    background.await.unwrap();
    delays.sort();
    let (p50, p99, max) = (delays[delays.len() / 2], delays[delays.len() * 99 / 100], delays[delays.len() - 1]);
    eprintln!("near cache staleness across processes over {ROUNDS} writes: p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert!(max < Duration::from_millis(2_000), "beyond the near cache's bound: {max:?}");
}

/// A value read once is served from the near cache: far faster than a round trip to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_hits_stay_fast() {
    const READS: u32 = 100_000;
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let (_keepers, stores) = redis_stores(&server, 1).await;
    let cache = Cache::new(stores[0].clone(), CacheConfig::default());
    cache.set_bytes("hot", b"value", None).await.unwrap();
    let begun = Instant::now();
    loop {
        // Until the change subscription is up, nothing is near-cached.
        cache.get_bytes("hot").await.unwrap();
        let timed = Instant::now();
        cache.get_bytes("hot").await.unwrap();
        if timed.elapsed() < Duration::from_micros(20) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "never served from the near cache");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = &stores[0];
    let timed = Instant::now();
    for _ in 0..READS {
        store.value_get(girder::structures::Kind::Value, "hot").await.unwrap().expect("set");
    }
    let per_read = timed.elapsed() / READS;
    eprintln!("near cache hit: {per_read:?} per read through the store (this build's profile)");
    assert!(per_read < Duration::from_micros(20), "{per_read:?} per read: not served from the near cache");
}
