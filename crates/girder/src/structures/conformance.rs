//! The data-structure conformance suite: every [`super::Structures`] implementation passes
//! it (the in-memory one and Redis's, in the integration tests). Each case gets a fresh store.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;

use super::{
    Atom, Cache, CacheConfig, Compression, CountDownLatch, Counter, DsError, Kind, List, Lock, Map, MultiMap, Queue,
    ReliableTopic, Retention, Semaphore, Set, Store, Topic,
};

/// Makes a fresh, empty store.
pub type Factory = Arc<dyn Fn() -> BoxFuture<'static, Store> + Send + Sync>;

type Case = fn(Store) -> BoxFuture<'static, ()>;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("cache_set_get_append_delete_and_ttl", |s| Box::pin(cache_set_get_append_delete_and_ttl(s))),
    ("cache_compresses_and_bounds_sizes", |s| Box::pin(cache_compresses_and_bounds_sizes(s))),
    ("wrong_kinds_are_refused_and_data_kept", |s| Box::pin(wrong_kinds_are_refused_and_data_kept(s))),
    ("atom_compare_and_set_swap_and_watch", |s| Box::pin(atom_compare_and_set_swap_and_watch(s))),
    ("counter_adds_and_compares", |s| Box::pin(counter_adds_and_compares(s))),
    ("maps_and_multimaps", |s| Box::pin(maps_and_multimaps(s))),
    ("sets_and_lists", |s| Box::pin(sets_and_lists(s))),
    ("queues_bound_and_block", |s| Box::pin(queues_bound_and_block(s))),
    ("locks_exclude_fence_and_expire", |s| Box::pin(locks_exclude_fence_and_expire(s))),
    ("latches_and_semaphores", |s| Box::pin(latches_and_semaphores(s))),
    ("topics_deliver_to_subscribers", |s| Box::pin(topics_deliver_to_subscribers(s))),
    ("reliable_topics_replay_and_retain", |s| Box::pin(reliable_topics_replay_and_retain(s))),
    ("cache_writers_read_their_own_writes", |s| Box::pin(read_your_writes(vec![s], 4_000))),
    ("atom_compare_and_set_compares_values", |s| Box::pin(compare_and_set_history(vec![s], 2_000))),
    ("cache_ttls_kept_by_compare_and_set_cleared_by_set", |s| {
        Box::pin(cache_ttls_kept_by_compare_and_set_cleared_by_set(s))
    }),
    ("expired_keys_are_free_for_any_kind", |s| Box::pin(expired_keys_are_free_for_any_kind(s))),
    ("refused_writes_change_nothing", |s| Box::pin(refused_writes_change_nothing(s))),
];

/// Runs every case against stores from `factory`, naming the case that fails.
pub async fn run_all(factory: Factory) {
    for (name, case) in CASES {
        let store = factory().await;
        if let Err(err) = tokio::spawn(case(store)).await {
            panic!("structures conformance case {name} failed: {err}");
        }
    }
}

async fn cache_set_get_append_delete_and_ttl(store: Store) {
    let cache = Cache::new(store.clone(), CacheConfig::default());
    assert_eq!(cache.get_bytes("k").await.unwrap(), None);
    assert!(!cache.exists("k").await.unwrap());
    cache.set_bytes("k", b"hello", None).await.unwrap();
    assert_eq!(cache.get_bytes("k").await.unwrap().as_deref(), Some(&b"hello"[..]));
    cache.append("k", b", world").await.unwrap();
    assert_eq!(
        cache.get_bytes("k").await.unwrap().as_deref(),
        Some(&b"hello, world"[..]),
        "a writer reads its own write"
    );
    cache.append("fresh", b"abc").await.unwrap();
    assert_eq!(cache.get_bytes("fresh").await.unwrap().as_deref(), Some(&b"abc"[..]));
    cache.set("typed", &vec![1u32, 2, 3], None).await.unwrap();
    assert_eq!(cache.get::<Vec<u32>>("typed").await.unwrap(), Some(vec![1, 2, 3]));
    assert!(matches!(cache.get::<String>("typed").await, Err(DsError::Decode { .. })));
    assert!(cache.delete("k").await.unwrap());
    assert!(!cache.delete("k").await.unwrap());
    assert_eq!(cache.get_bytes("k").await.unwrap(), None);
    cache.set_bytes("brief", b"x", Some(Duration::from_millis(50))).await.unwrap();
    assert!(cache.exists("brief").await.unwrap());
    let begun = Instant::now();
    while cache.exists("brief").await.unwrap() {
        assert!(begun.elapsed() < Duration::from_secs(5), "the entry outlived its TTL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(cache.get_bytes("").await, Err(DsError::BadKey { .. })));
}

async fn cache_compresses_and_bounds_sizes(store: Store) {
    let text = "the quick brown fox jumps over the lazy dog ".repeat(500).into_bytes();
    for (key, compression) in [("lz4", Compression::Lz4), ("zstd", Compression::Zstd(3))] {
        let cache = Cache::new(store.clone(), CacheConfig { compression, ..Default::default() });
        cache.set_bytes(key, &text, None).await.unwrap();
        assert_eq!(cache.get_bytes(key).await.unwrap().as_deref(), Some(&text[..]));
        let stored = cache.stored_bytes(key).await.unwrap().unwrap();
        assert!(stored * 5 < text.len(), "{key}: {stored} bytes stored for {}", text.len());
    }
    let small = Cache::new(
        store.clone(),
        CacheConfig { value_bytes_max: 100, compression: Compression::None, ..Default::default() },
    );
    small.set_bytes("s", b"keep me", None).await.unwrap();
    let too_big = small.set_bytes("s", &[7u8; 200], None).await.unwrap_err();
    assert!(matches!(too_big, DsError::TooLarge { .. }), "{too_big:?}");
    let too_long = small.append("s", &[7u8; 95]).await.unwrap_err();
    assert!(matches!(too_long, DsError::TooLarge { .. }), "{too_long:?}");
    assert_eq!(small.get_bytes("s").await.unwrap().as_deref(), Some(&b"keep me"[..]), "refused writes change nothing");
}

/// Waits until `key` no longer holds a `kind` (its TTL ran out), failing after 5 s.
async fn until_gone(store: &Store, kind: Kind, key: &str) {
    let begun = Instant::now();
    while store.exists(kind, key).await.unwrap() {
        assert!(begun.elapsed() < Duration::from_secs(5), "{key} outlived its TTL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn cache_ttls_kept_by_compare_and_set_cleared_by_set(store: Store) {
    // A compare-and-set keeps the TTL: the entry still goes when it was due.
    let v1 = store.value_set(Kind::Value, "kept", b"a", Some(100)).await.unwrap();
    assert_eq!(
        store.value_get(Kind::Value, "kept").await.unwrap().expect("set").version,
        v1,
        "set returns the version"
    );
    let v2 = store.value_cas(Kind::Value, "kept", Some(v1), b"bb").await.unwrap().expect("the version matches");
    assert_eq!(store.value_get(Kind::Value, "kept").await.unwrap().expect("set").version, v2, "so does a CAS");
    let swapped = store.value_compare_and_set(Kind::Value, "kept", Some(b"bb"), b"ccc").await.unwrap();
    let v3 = store.value_get(Kind::Value, "kept").await.unwrap().expect("set").version;
    assert_eq!(swapped, Some(v3), "the bytes match, and the new version is returned");
    assert!(v3 > v2 && v2 > v1, "every write increases the version");
    until_gone(&store, Kind::Value, "kept").await;
    // A plain set clears it; a set with a TTL gives one back.
    store.value_set(Kind::Value, "cleared", b"a", Some(100)).await.unwrap();
    store.value_set(Kind::Value, "cleared", b"b", None).await.unwrap();
    store.value_set(Kind::Value, "marker", b"m", Some(100)).await.unwrap();
    until_gone(&store, Kind::Value, "marker").await;
    let kept = store.value_get(Kind::Value, "cleared").await.unwrap().expect("no TTL any more");
    assert_eq!(&kept.bytes[..], b"b");
    store.value_set(Kind::Value, "cleared", b"c", Some(50)).await.unwrap();
    until_gone(&store, Kind::Value, "cleared").await;
}

async fn expired_keys_are_free_for_any_kind(store: Store) {
    store.value_set(Kind::Value, "reused", b"old bytes", Some(50)).await.unwrap();
    let map: Map<String, u32> = Map::new(store.clone(), "reused").unwrap();
    assert!(matches!(map.put(&"a".into(), &1).await, Err(DsError::WrongKind { .. })), "a live value");
    until_gone(&store, Kind::Value, "reused").await;
    map.put(&"a".into(), &1).await.expect("an expired value holds the key no more");
    assert_eq!(map.len().await.unwrap(), 1);
    // An append after expiry starts from nothing, with no TTL.
    store.value_set(Kind::Value, "appended", b"old", Some(50)).await.unwrap();
    until_gone(&store, Kind::Value, "appended").await;
    assert_eq!(store.value_append("appended", b"new", 1 << 20).await.unwrap(), 3);
    store.value_set(Kind::Value, "marker", b"m", Some(100)).await.unwrap();
    until_gone(&store, Kind::Value, "marker").await;
    let appended = store.value_get(Kind::Value, "appended").await.unwrap().expect("appended");
    assert_eq!(&appended.bytes[..], b"new");
}

async fn refused_writes_change_nothing(store: Store) {
    // An append over the size limit leaves the value and its version as they were.
    store.value_set(Kind::Value, "v", b"abc", None).await.unwrap();
    let version = store.value_get(Kind::Value, "v").await.unwrap().expect("set").version;
    let err = store.value_append("v", b"defg", 5).await.unwrap_err();
    assert!(matches!(err, DsError::TooLarge { .. }), "{err:?}");
    let kept = store.value_get(Kind::Value, "v").await.unwrap().expect("kept");
    assert_eq!((&kept.bytes[..], kept.version), (&b"abc"[..], version));
    // A write of the wrong kind leaves the key's structure as it was.
    store.list_push(Kind::List, "l", b"x", false, None).await.unwrap();
    assert!(store.map_put(Kind::Map, "l", b"f", b"v").await.is_err());
    assert!(store.set_add("l", b"m").await.is_err());
    assert!(store.value_append("l", b"m", 1 << 20).await.is_err());
    assert_eq!(store.list_range("l", 0, -1, 10).await.unwrap(), vec![bytes::Bytes::from_static(b"x")]);
    // Removing what is not there changes nothing either.
    assert_eq!(store.map_remove(Kind::Map, "absent", b"f", None).await.unwrap(), 0);
    assert!(!store.set_remove("absent", b"m").await.unwrap());
    assert_eq!(store.list_pop(Kind::List, "absent", true).await.unwrap(), None);
    assert!(!store.exists(Kind::Map, "absent").await.unwrap());
}

async fn wrong_kinds_are_refused_and_data_kept(store: Store) {
    let map: Map<String, u32> = Map::new(store.clone(), "shared").unwrap();
    map.put(&"a".into(), &1).await.unwrap();
    let cache = Cache::new(store.clone(), CacheConfig::default());
    let err = cache.set_bytes("shared", b"x", None).await.unwrap_err();
    assert!(
        matches!(&err, DsError::WrongKind { key, expected: Kind::Value, found } if key == "shared" && found == "map"),
        "{err:?}"
    );
    assert!(matches!(cache.get_bytes("shared").await, Err(DsError::WrongKind { .. })));
    let queue: Queue<u32> = Queue::new(store.clone(), "shared").unwrap();
    assert!(matches!(queue.offer(&1, None).await, Err(DsError::WrongKind { .. })));
    let counter = Counter::new(store.clone(), "shared").unwrap();
    assert!(matches!(counter.add(1).await, Err(DsError::WrongKind { .. })));
    let lock = Lock::new(store.clone(), "shared", Duration::from_secs(1)).unwrap();
    assert!(matches!(lock.try_lock_now().await, Err(DsError::WrongKind { .. })));
    assert_eq!(map.get(&"a".into()).await.unwrap(), Some(1), "the map is untouched");
    assert_eq!(map.len().await.unwrap(), 1);
}

async fn atom_compare_and_set_swap_and_watch(store: Store) {
    let atom: Atom<u64> = Atom::new(store.clone(), "atom").unwrap();
    assert_eq!(atom.get().await.unwrap(), None);
    assert!(atom.compare_and_set(None, &1).await.unwrap());
    assert!(!atom.compare_and_set(None, &2).await.unwrap(), "already set");
    assert!(!atom.compare_and_set(Some(&7), &2).await.unwrap());
    assert!(atom.compare_and_set(Some(&1), &2).await.unwrap());
    let mut watch = atom.watch().await.unwrap();
    let swaps = (0..50).map(|_| atom.swap(|v| v.unwrap_or(0) + 1));
    let results = futures::future::join_all(swaps).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(atom.get().await.unwrap(), Some(52), "every swap counted once");
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("the watch sees a change");
    assert!(matches!(seen, Some(Ok(v)) if v > 2), "{seen:?}");
    atom.reset(&100).await.unwrap();
    assert_eq!(atom.get().await.unwrap(), Some(100));
}

async fn counter_adds_and_compares(store: Store) {
    let counter = Counter::new(store, "n").unwrap();
    assert_eq!(counter.get().await.unwrap(), 0);
    assert_eq!(counter.add(5).await.unwrap(), 5);
    assert_eq!(counter.add(-7).await.unwrap(), -2);
    assert!(counter.compare_and_set(-2, 10).await.unwrap());
    assert!(!counter.compare_and_set(-2, 11).await.unwrap());
    assert_eq!(counter.get().await.unwrap(), 10);
    counter.compare_and_set(10, i64::MAX).await.unwrap();
    assert!(counter.add(1).await.is_err(), "overflow is an error");
    assert_eq!(counter.get().await.unwrap(), i64::MAX);
}

async fn maps_and_multimaps(store: Store) {
    let map: Map<String, Vec<u8>> = Map::new(store.clone(), "m").unwrap();
    assert_eq!(map.put(&"a".into(), &vec![1]).await.unwrap(), None);
    assert_eq!(map.put(&"a".into(), &vec![2]).await.unwrap(), Some(vec![1]));
    map.put(&"b".into(), &vec![3]).await.unwrap();
    assert_eq!(map.len().await.unwrap(), 2);
    let mut entries = map.entries().await.unwrap();
    entries.sort();
    assert_eq!(entries, vec![("a".into(), vec![2]), ("b".into(), vec![3])]);
    assert!(map.remove(&"a".into()).await.unwrap());
    assert_eq!(map.get(&"a".into()).await.unwrap(), None);
    let multi: MultiMap<String, u32> = MultiMap::new(store, "mm").unwrap();
    assert!(multi.put(&"x".into(), &1).await.unwrap());
    assert!(multi.put(&"x".into(), &2).await.unwrap());
    assert!(!multi.put(&"x".into(), &2).await.unwrap(), "a pair is kept once");
    multi.put(&"y".into(), &3).await.unwrap();
    let mut xs = multi.get(&"x".into()).await.unwrap();
    xs.sort();
    assert_eq!(xs, vec![1, 2]);
    assert_eq!(multi.len().await.unwrap(), 3);
    assert!(multi.remove(&"x".into(), &1).await.unwrap());
    assert_eq!(multi.remove_all(&"x".into()).await.unwrap(), 1);
    assert_eq!(multi.len().await.unwrap(), 1);
}

async fn sets_and_lists(store: Store) {
    let set: Set<String> = Set::new(store.clone(), "s").unwrap();
    assert!(set.add(&"a".into()).await.unwrap());
    assert!(!set.add(&"a".into()).await.unwrap());
    set.add(&"b".into()).await.unwrap();
    assert!(set.contains(&"b".into()).await.unwrap());
    assert_eq!(set.len().await.unwrap(), 2);
    assert!(set.remove(&"a".into()).await.unwrap());
    assert_eq!(set.members().await.unwrap(), vec!["b".to_owned()]);
    let list: List<u32> = List::new(store, "l").unwrap();
    for n in 1..=3 {
        list.push_back(&n).await.unwrap();
    }
    list.push_front(&0).await.unwrap();
    assert_eq!(list.range(0, -1).await.unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(list.get(-1).await.unwrap(), Some(3));
    assert!(list.set(1, &10).await.unwrap());
    assert!(!list.set(9, &10).await.unwrap());
    assert_eq!(list.pop_front().await.unwrap(), Some(0));
    assert_eq!(list.pop_back().await.unwrap(), Some(3));
    assert_eq!(list.range(0, -1).await.unwrap(), vec![10, 2]);
    assert_eq!(list.len().await.unwrap(), 2);
}

async fn queues_bound_and_block(store: Store) {
    let queue: Queue<u32> = Queue::new(store.clone(), "q").unwrap();
    assert!(queue.offer(&1, Some(2)).await.unwrap());
    assert!(queue.offer(&2, Some(2)).await.unwrap());
    assert!(!queue.offer(&3, Some(2)).await.unwrap(), "full at its capacity");
    assert_eq!(queue.poll().await.unwrap(), Some(1));
    assert_eq!(queue.poll().await.unwrap(), Some(2));
    let begun = Instant::now();
    assert_eq!(queue.poll_timeout(Duration::from_millis(100)).await.unwrap(), None);
    assert!(begun.elapsed() >= Duration::from_millis(90), "an empty poll waits its timeout");
    let producer = {
        let queue: Queue<u32> = Queue::new(store.clone(), "q").unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            queue.offer(&42, None).await.unwrap();
        })
    };
    let got = queue.poll_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(got, Some(42), "a blocked poll takes what arrives");
    producer.await.unwrap();
}

async fn locks_exclude_fence_and_expire(store: Store) {
    let lease = Duration::from_millis(300);
    let lock = Lock::new(store.clone(), "lock", lease).unwrap();
    let first = lock.try_lock_now().await.unwrap().expect("free at first");
    assert!(lock.try_lock_now().await.unwrap().is_none(), "held");
    // The holder's lease is renewed while it holds the lock: it outlives several leases.
    tokio::time::sleep(lease * 3).await;
    assert!(lock.try_lock_now().await.unwrap().is_none(), "renewed");
    assert_eq!(lock.token().await.unwrap(), Some(first.token()));
    let waiter = {
        let lock = Lock::new(store.clone(), "lock", lease).unwrap();
        tokio::spawn(async move { lock.try_lock(Duration::from_secs(10)).await })
    };
    let first_token = first.token();
    assert!(first.release().await.unwrap());
    let second = waiter.await.unwrap().unwrap().expect("the waiter gets the released lock");
    assert!(second.token() > first_token, "fencing tokens strictly increase");
    // A holder that stops renewing (it died) loses the lock when its lease runs out.
    let holder = "dead-holder";
    drop(second);
    let begun = Instant::now();
    let token = loop {
        if let Some(token) = store.lock_acquire("lock2", holder, 100).await.unwrap() {
            break token;
        }
        assert!(begun.elapsed() < Duration::from_secs(5));
    };
    let lock2 = Lock::new(store.clone(), "lock2", lease).unwrap();
    let taken = lock2.try_lock(Duration::from_secs(5)).await.unwrap().expect("free once the lease runs out");
    assert!(taken.token() > token);
    assert!(!store.lock_release("lock2", holder, token).await.unwrap(), "the dead holder releases nothing");
}

async fn latches_and_semaphores(store: Store) {
    let latch = CountDownLatch::new(store.clone(), "latch").unwrap();
    assert!(latch.try_set_count(2).await.unwrap());
    assert!(!latch.try_set_count(5).await.unwrap(), "set while counting");
    assert!(!latch.wait(Duration::from_millis(50)).await.unwrap());
    let waiting = {
        let latch = CountDownLatch::new(store.clone(), "latch").unwrap();
        tokio::spawn(async move { latch.wait(Duration::from_secs(10)).await })
    };
    assert_eq!(latch.count_down().await.unwrap(), 1);
    assert_eq!(latch.count_down().await.unwrap(), 0);
    assert_eq!(latch.count_down().await.unwrap(), 0, "never below zero");
    assert!(waiting.await.unwrap().unwrap(), "the waiter sees it open");

    let semaphore = Semaphore::new(store.clone(), "sem", Duration::from_millis(300)).unwrap();
    assert!(semaphore.try_acquire(Duration::from_millis(10)).await.is_err(), "not initialized");
    assert!(semaphore.init(2).await.unwrap());
    let a = semaphore.try_acquire(Duration::from_secs(1)).await.unwrap().expect("first permit");
    let _b = semaphore.try_acquire(Duration::from_secs(1)).await.unwrap().expect("second permit");
    assert_eq!(semaphore.available().await.unwrap(), 0);
    assert!(semaphore.try_acquire(Duration::from_millis(50)).await.unwrap().is_none());
    assert!(a.release().await.unwrap());
    assert!(semaphore.try_acquire(Duration::from_secs(5)).await.unwrap().is_some());
    // A permit whose holder stopped renewing frees itself.
    assert!(store.semaphore_init("sem2", 1).await.unwrap());
    assert!(store.semaphore_acquire("sem2", "dead", 100).await.unwrap());
    let sem2 = Semaphore::new(store, "sem2", Duration::from_millis(300)).unwrap();
    assert!(sem2.try_acquire(Duration::from_secs(5)).await.unwrap().is_some(), "freed by lease expiry");
}

async fn topics_deliver_to_subscribers(store: Store) {
    let topic: Topic<String> = Topic::new(store, "news").unwrap();
    let mut first = topic.subscribe().await.unwrap();
    let mut second = topic.subscribe().await.unwrap();
    // Subscriptions may take a moment to be live: publish until both have heard.
    let begun = Instant::now();
    loop {
        topic.publish(&"hello".to_owned()).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(100), first.next()).await;
        if let Ok(message) = heard {
            assert_eq!(message.unwrap().unwrap(), "hello");
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "no subscriber heard the topic");
    }
    let heard = tokio::time::timeout(Duration::from_secs(5), second.next()).await.unwrap();
    assert_eq!(heard.unwrap().unwrap(), "hello");
}

async fn reliable_topics_replay_and_retain(store: Store) {
    let topic: ReliableTopic<u32> =
        ReliableTopic::new(store.clone(), "log", Retention { count_max: 5, age_ms_max: None }).unwrap();
    for n in 1..=3 {
        assert_eq!(topic.publish(&(n * 10)).await.unwrap(), u64::from(n));
    }
    let mut from_start = topic.subscribe_after(0);
    for n in 1..=3u64 {
        let (seq, value) = from_start.next().await.unwrap().unwrap();
        assert_eq!((seq, value), (n, n as u32 * 10));
    }
    let mut resumed = topic.subscribe_after(2);
    assert_eq!(resumed.next().await.unwrap().unwrap(), (3, 30));
    // A live subscriber gets what is published after it caught up.
    topic.publish(&40).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), resumed.next()).await.unwrap();
    assert_eq!(next.unwrap().unwrap(), (4, 40));
    // Retention keeps 5: a subscriber resuming from 1 after 10 messages learns of the gap.
    for n in 5..=10 {
        topic.publish(&(n * 10)).await.unwrap();
    }
    let mut late = topic.subscribe_after(1);
    let gap = late.next().await.unwrap().unwrap_err();
    assert!(matches!(gap, DsError::Gap { from: 2, to: 6, .. }), "{gap:?}");
    assert_eq!(late.next().await.unwrap().unwrap(), (6, 60));
    // A read says what is retained, first to last, even when it returns nothing.
    let batch = store.reliable_read("log", 8, 1, 0).await.unwrap();
    assert_eq!((batch.first_retained, batch.last, batch.messages.len()), (6, 10, 1));
    let batch = store.reliable_read("log", 10, 1, 0).await.unwrap();
    assert_eq!((batch.first_retained, batch.last, batch.messages.len()), (6, 10, 0));
    let empty = store.reliable_read("nothing-here", 0, 1, 0).await.unwrap();
    assert_eq!((empty.first_retained, empty.last), (0, 0));
}

/// Waits until `store` delivers change notices (on Redis: its change subscription is live,
/// so its near cache is in use), at most 10 s.
async fn until_changes_are_heard(store: &Store, key: &str) {
    let begun = Instant::now();
    loop {
        let waiter = {
            let (store, key) = (store.clone(), key.to_owned());
            tokio::spawn(async move { store.wait_change(&key, 500).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let written = Instant::now();
        store.value_set(Kind::Value, key, b"warm", None).await.unwrap();
        waiter.await.unwrap();
        if written.elapsed() < Duration::from_millis(400) {
            return;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "no change notice within 10 s");
    }
}

/// Read-your-writes under racing near-cache fills. Writers (on `stores[0]`, the process
/// under test) set their own key to an increasing counter and read it straight back: the
/// read must return exactly the last completed write. Two more writers set a shared key and
/// read it back: the version read must be at least the version their set returned. Readers
/// on every store read all those keys all along, so near-cache fills race with the writes,
/// and the shared key is also written through the other stores (other processes), so
/// invalidations arrive over the change channel. `sets_per_writer` sets per writer; six
/// writers.
pub async fn read_your_writes(stores: Vec<Store>, sets_per_writer: u64) {
    const OWN_WRITERS: usize = 4;
    const SHARED_WRITERS: usize = 2;
    let local = stores[0].clone();
    until_changes_are_heard(&local, "ryw-warm").await;
    let done = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..OWN_WRITERS).map(|i| format!("ryw-{i}")).chain(["ryw-shared".to_owned()]).collect();
    let mut readers = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        for _ in 0..if i == 0 { 2 } else { 1 } {
            let (store, done, keys) = (store.clone(), done.clone(), keys.clone());
            readers.push(tokio::spawn(async move {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    for key in &keys {
                        store.value_get(Kind::Value, key).await.unwrap();
                        reads += 1;
                    }
                    tokio::task::yield_now().await;
                }
                reads
            }));
        }
    }
    // Other processes write the shared key too.
    let mut others = Vec::new();
    for store in stores.iter().skip(1) {
        let (store, done) = (store.clone(), done.clone());
        others.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                store.value_set(Kind::Value, "ryw-shared", &n.to_be_bytes(), None).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let stale = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..OWN_WRITERS {
        let (cache, stale) = (Cache::new(local.clone(), CacheConfig::default()), stale.clone());
        writers.push(tokio::spawn(async move {
            let key = format!("ryw-{w}");
            for n in 1..=sets_per_writer {
                cache.set(&key, &n, None).await.unwrap();
                let read: Option<u64> = cache.get(&key).await.unwrap();
                if read != Some(n) {
                    stale.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{key}: set {n}, then read {read:?}");
                }
            }
        }));
    }
    for _ in 0..SHARED_WRITERS {
        let (store, stale) = (local.clone(), stale.clone());
        writers.push(tokio::spawn(async move {
            for n in 1..=sets_per_writer {
                let written = store.value_set(Kind::Value, "ryw-shared", &n.to_be_bytes(), None).await.unwrap();
                let read = store.value_get(Kind::Value, "ryw-shared").await.unwrap().map_or(0, |v| v.version);
                if read < written {
                    stale.fetch_add(1, Ordering::Relaxed);
                    eprintln!("ryw-shared: set version {written}, then read version {read}");
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    for other in others {
        other.await.unwrap();
    }
    let sets = sets_per_writer * (OWN_WRITERS + SHARED_WRITERS) as u64;
    let stale = stale.load(Ordering::Relaxed);
    assert_eq!(stale, 0, "{stale} of {sets} sets were followed by an older read ({reads} racing reads)");
}

/// Compare-and-set compares values. On one atom, resetters rewrite the same value while
/// other tasks compare-and-set it to itself: every one of those must succeed. On a counter
/// atom, tasks (spread over `stores`) increment by compare-and-set and rewrite the current
/// value by compare-and-set to itself; the counter's value only grows, so a failed
/// compare-and-set of `v` followed by a read of `v` again means the value was `v`
/// throughout: that failure is a bug. The final value is the number of successful
/// increments. `rounds` operations per task.
pub async fn compare_and_set_history(stores: Vec<Store>, rounds: u64) {
    const TASKS_PER_STORE: usize = 4;
    // A pinned value, rewritten all along.
    let pinned = "the same value".to_owned();
    let atom: Atom<String> = Atom::new(stores[0].clone(), "cas-pinned").unwrap();
    assert!(atom.compare_and_set(None, &pinned).await.unwrap());
    assert!(!atom.compare_and_set(None, &pinned).await.unwrap(), "set already");
    let mut tasks = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        for t in 0..TASKS_PER_STORE {
            let (atom, pinned) = (Atom::<String>::new(store.clone(), "cas-pinned").unwrap(), pinned.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..rounds / 4 {
                    if t % 2 == 0 {
                        atom.reset(&pinned).await.unwrap();
                    } else {
                        assert!(
                            atom.compare_and_set(Some(&pinned), &pinned).await.unwrap(),
                            "store {i} task {t} round {round}: compare-and-set of the current value failed"
                        );
                        assert!(!atom.compare_and_set(Some(&"other".to_owned()), &pinned).await.unwrap());
                        assert!(!atom.compare_and_set(None, &pinned).await.unwrap());
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(atom.get().await.unwrap(), Some(pinned));

    let counter: Atom<u64> = Atom::new(stores[0].clone(), "cas-counter").unwrap();
    assert!(counter.compare_and_set(None, &0).await.unwrap());
    let increments = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        for t in 0..TASKS_PER_STORE {
            let (atom, increments) = (Atom::<u64>::new(store.clone(), "cas-counter").unwrap(), increments.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = 0u64;
                for round in 0..rounds {
                    let current = atom.get().await.unwrap().expect("set");
                    let new = if (round + t as u64).is_multiple_of(3) { current } else { current + 1 };
                    if atom.compare_and_set(Some(&current), &new).await.unwrap() {
                        if new > current {
                            increments.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    failures += 1;
                    let after = atom.get().await.unwrap().expect("set");
                    assert!(
                        after > current,
                        "store {i} task {t} round {round}: compare-and-set of {current} failed while the value \
                         stayed {current}"
                    );
                }
                failures
            }));
        }
    }
    let mut failures = 0;
    for task in tasks {
        failures += task.await.unwrap();
    }
    let increments = increments.load(Ordering::Relaxed);
    assert_eq!(counter.get().await.unwrap(), Some(increments), "one increment per successful compare-and-set");
    assert!(increments > 0 && failures < rounds * (stores.len() * TASKS_PER_STORE) as u64);
}
