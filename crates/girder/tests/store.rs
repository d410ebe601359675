//! The bucket store with several nodes in one process on one embedded statekeeper, each
//! with its own engine and its own data plane on loopback: replication, routing, joins
//! and hand-over, without process management (the multi-process tests are in girder-cli).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use girder::store::{Expect, ItemStore, StoreConfig, StoreError};
use girder::{Embedded, EmbeddedConfig, Node, PoolSpec, Statekeeper, WorkerSpec};

async fn node(sk: &Arc<dyn Statekeeper>, id: &str) -> Node {
    Node::builder()
        .id(id)
        .statekeeper(sk.clone())
        .heartbeat_ms(50)
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .store(StoreConfig { request_timeout_ms: 10_000, anti_entropy_ms: 200, ..StoreConfig::default() })
        .start()
        .await
        .unwrap_or_else(|e| panic!("node {id} starts: {e}"))
}

fn grid() -> Arc<dyn Statekeeper> {
    Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 1_000, ..EmbeddedConfig::default() }))
}

/// Waits until every node of `nodes` sees `flocks_ready` ready flocks in all and nothing
/// syncing (at most 20 s).
async fn settled(nodes: &[&Node], replicas: u32) {
    let begun = Instant::now();
    loop {
        let stats: Vec<_> = nodes.iter().map(|n| n.store().map(|s| s.stats())).collect();
        let ready: u32 = stats.iter().flatten().map(|s| s.flocks_ready).sum();
        let syncing: u32 = stats.iter().flatten().map(|s| s.flocks_syncing).sum();
        if ready == replicas.min(nodes.len() as u32) * girder::placement::FLOCKS && syncing == 0 {
            return;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "never settled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_puts_gets_appends_deletes_and_lists() {
    let sk = grid();
    let a = node(&sk, "a").await;
    settled(&[&a], 2).await;
    let store = a.store().unwrap();
    assert_eq!(store.put("user1", "contacts", &b"alice"[..]).await.unwrap(), 1);
    assert_eq!(store.append("user1", "contacts", &b",bob"[..]).await.unwrap(), 2);
    let item = store.get("user1", "contacts").await.unwrap().unwrap();
    assert_eq!((&item.value[..], item.version), (&b"alice,bob"[..], 2));
    // Conditional writes.
    let conflict = store.put_if("user1", "contacts", &b"x"[..], Expect::Version(1)).await.unwrap_err();
    assert!(matches!(conflict, StoreError::Conflict { actual: Some(2), .. }), "{conflict:?}");
    assert!(matches!(
        store.put_if("user1", "contacts", &b"x"[..], Expect::Absent).await.unwrap_err(),
        StoreError::Conflict { .. }
    ));
    assert_eq!(store.put_if("user1", "contacts", &b"carol"[..], Expect::Version(2)).await.unwrap(), 3);
    assert_eq!(store.put_if("user1", "orders", &b"[]"[..], Expect::Absent).await.unwrap(), 1);
    // Deletes, then a version that keeps growing.
    assert!(store.delete("user1", "orders").await.unwrap());
    assert!(!store.delete("user1", "orders").await.unwrap());
    assert_eq!(store.get("user1", "orders").await.unwrap(), None);
    assert_eq!(store.put_if("user1", "orders", &b"[1]"[..], Expect::Absent).await.unwrap(), 3);
    // Typed values.
    store.put_value("user1", "favourites", &vec!["rust".to_owned(), "go".to_owned()]).await.unwrap();
    let (favourites, _): (Vec<String>, u64) = store.get_value("user1", "favourites").await.unwrap().unwrap();
    assert_eq!(favourites, ["rust", "go"]);
    // Bad input.
    assert!(matches!(store.put("", "x", &b""[..]).await.unwrap_err(), StoreError::InvalidKey(_)));
    assert!(matches!(store.get("b", &"k".repeat(2_000)).await.unwrap_err(), StoreError::InvalidKey(_)));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_lists_in_item_order_across_pages_and_deletes_whole() {
    let sk = grid();
    let a = node(&sk, "a").await;
    settled(&[&a], 2).await;
    let store = a.store().unwrap();
    let items = 2_500;
    let writes = (0..items).map(|i| {
        let store = store.clone();
        async move { store.put("big", &format!("item-{i:05}"), format!("value {i}")).await }
    });
    for result in futures::stream::iter(writes).buffer_unordered(32).collect::<Vec<_>>().await {
        result.unwrap();
    }
    let listed: Vec<_> = store.get_bucket("big").collect().await;
    assert_eq!(listed.len(), items);
    for (i, entry) in listed.into_iter().enumerate() {
        let (item, value) = entry.unwrap();
        assert_eq!(item, format!("item-{i:05}"));
        assert_eq!(value.value, format!("value {i}").into_bytes());
    }
    // A bucket whose name is a prefix of another's does not mix with it.
    store.put("bi", "g", &b"other"[..]).await.unwrap();
    assert_eq!(store.get_bucket("bi").collect::<Vec<_>>().await.len(), 1);
    assert_eq!(store.delete_bucket("big").await.unwrap(), items as u64);
    assert_eq!(store.get_bucket("big").collect::<Vec<_>>().await.len(), 0);
    a.shutdown().await;
}

async fn check_all(stores: &[ItemStore], written: &[(String, String, u64)]) {
    for store in stores {
        for (bucket, value, version) in written {
            let item = store.get(bucket, "v").await.unwrap_or_else(|e| panic!("{bucket}: {e}"));
            let item = item.unwrap_or_else(|| panic!("{bucket} is missing"));
            assert_eq!((item.value.as_ref(), item.version), (value.as_bytes(), *version), "{bucket}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_owner_and_a_joining_node_copies_its_flocks() {
    let sk = grid();
    let (a, b) = (node(&sk, "a").await, node(&sk, "b").await);
    settled(&[&a, &b], 2).await;
    let (sa, sb) = (a.store().unwrap(), b.store().unwrap());
    let mut written = Vec::new();
    for i in 0..300 {
        let writer = if i % 2 == 0 { &sa } else { &sb };
        let bucket = format!("bucket-{i}");
        let version = writer.put(&bucket, "v", format!("value {i}")).await.unwrap();
        written.push((bucket, format!("value {i}"), version));
    }
    // Both nodes own every flock with R = 2: each holds every item.
    assert_eq!(sa.stats().items, 300);
    assert_eq!(sb.stats().items, 300);
    check_all(&[sa.clone(), sb.clone()], &written).await;

    // A third node joins while writes go on: it copies the flocks it gains, the others
    // hand theirs over, and no write or read fails on the way.
    let writes = {
        let sa = sa.clone();
        tokio::spawn(async move {
            let mut more = Vec::new();
            for i in 300..600 {
                let bucket = format!("bucket-{i}");
                let version = sa.put(&bucket, "v", format!("value {i}")).await.unwrap();
                more.push((bucket, format!("value {i}"), version));
            }
            more
        })
    };
    let c = node(&sk, "c").await;
    written.extend(writes.await.unwrap());
    settled(&[&a, &b, &c], 2).await;
    let sc = c.store().unwrap();
    check_all(&[sa.clone(), sb.clone(), sc.clone()], &written).await;
    // Once handed over, every item is on exactly two nodes.
    let begun = Instant::now();
    loop {
        let total: u64 = [&sa, &sb, &sc].iter().map(|s| s.stats().items).sum();
        if total == 2 * 600 {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "items held in all: {total}, want 1200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sc.stats().copied > 0, "the new node copied nothing: {:?}", sc.stats());
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_many_writers_all_land_once() {
    let sk = grid();
    let (a, b) = (node(&sk, "a").await, node(&sk, "b").await);
    settled(&[&a, &b], 2).await;
    let stores = [a.store().unwrap(), b.store().unwrap()];
    let appends = (0..400u32).map(|i| {
        let store = stores[i as usize % 2].clone();
        async move { store.append("shuffle", "part-0", i.to_le_bytes().to_vec()).await }
    });
    for result in futures::stream::iter(appends).buffer_unordered(16).collect::<Vec<_>>().await {
        result.unwrap();
    }
    for store in &stores {
        let item = store.get("shuffle", "part-0").await.unwrap().unwrap();
        assert_eq!(item.version, 400);
        let mut seen: Vec<u32> = item.value.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_reads_are_near_cached_and_see_other_nodes_writes_within_the_bound() {
    let sk = grid();
    let (a, b) = (node(&sk, "a").await, node(&sk, "b").await);
    settled(&[&a, &b], 2).await;
    let (ta, tb) = (a.store().unwrap().typed::<Vec<u32>>(), b.store().unwrap().typed::<Vec<u32>>());
    ta.put("profile", "scores", &vec![1, 2, 3]).await.unwrap();
    let (first, v1) = tb.get("profile", "scores").await.unwrap().unwrap();
    assert_eq!(*first, vec![1, 2, 3]);
    // The same decoded value again: no read, no decode. (A fill is refused while the
    // notice of a's write may still be on its way, so the first reads may miss.)
    let begun = Instant::now();
    let mut last = first;
    loop {
        let (again, _) = tb.get("profile", "scores").await.unwrap().unwrap();
        if Arc::ptr_eq(&last, &again) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(3), "reads are never served from the near cache");
        last = again;
    }
    // Another node writes: b sees it once the change notice arrives, within the bound.
    let written = Instant::now();
    ta.put("profile", "scores", &vec![4]).await.unwrap();
    loop {
        let (seen, version) = tb.get("profile", "scores").await.unwrap().unwrap();
        if *seen == vec![4] {
            assert!(version > v1);
            break;
        }
        assert!(written.elapsed() < girder::store::NEAR_AGE_MAX + Duration::from_millis(500), "still stale");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Never older than this process's own write.
    for i in 0..50u32 {
        tb.put("profile", "scores", &vec![i]).await.unwrap();
        assert_eq!(*tb.get("profile", "scores").await.unwrap().unwrap().0, vec![i]);
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[girder::function(name = "test/bucket_size")]
async fn bucket_size(ctx: girder::Ctx, bucket: String) -> (String, u64) {
    let local = ctx.local_bucket(&bucket).expect("the bucket is held here");
    let items: Vec<_> = local.items().collect().await;
    (ctx.node_id().to_owned(), items.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_runs_where_the_bucket_is_and_reads_it_locally() {
    let sk = grid();
    let start = |id: &'static str| {
        let sk = sk.clone();
        async move {
            Node::builder()
                .id(id)
                .statekeeper(sk)
                .heartbeat_ms(50)
                .registry(girder::Registry::new().with::<bucket_size>())
                .pool(PoolSpec::new("main"))
                .workers(WorkerSpec::new("main", 1, 2))
                .store(StoreConfig::default())
                .start()
                .await
                .unwrap()
        }
    };
    let (a, b, c) = (start("a").await, start("b").await, start("c").await);
    settled(&[&a, &b, &c], 2).await;
    let store = a.store().unwrap();
    for bucket in ["alpha", "beta", "gamma", "delta"] {
        for i in 0..20 {
            store.put(bucket, &format!("i{i}"), &b"x"[..]).await.unwrap();
        }
        let holders = store.holders(bucket);
        assert_eq!(holders.len(), 2);
        for _ in 0..3 {
            let (ran_on, size) = bucket_size::call(&a.client().run_on(bucket), bucket.to_owned()).await.unwrap();
            assert!(holders.contains(&ran_on), "{bucket} ran on {ran_on}, held by {holders:?}");
            assert_eq!(size, 20);
            a.client().forget::<bucket_size>((bucket.to_owned(),)).await.unwrap();
        }
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_data_dir_serves_what_it_stored() {
    let dir = std::env::temp_dir().join(format!("girder-store-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = StoreConfig { data_dir: Some(dir.clone()), ..StoreConfig::default() };
    let start = |sk: Arc<dyn Statekeeper>, config: StoreConfig| async move {
        let builder = Node::builder().id("disk").statekeeper(sk).heartbeat_ms(50);
        let builder = builder.pool(PoolSpec::new("main")).workers(WorkerSpec::new("main", 1, 1));
        builder.store(config).start().await.unwrap()
    };
    let sk = grid();
    let a = start(sk.clone(), config.clone()).await;
    settled(&[&a], 2).await;
    let store = a.store().unwrap();
    for i in 0..200 {
        store.put(&format!("b{}", i % 13), &format!("i{i}"), format!("v{i}")).await.unwrap();
    }
    store.delete("b0", "i0").await.unwrap();
    a.shutdown().await;
    drop((a, store));
    // A new grid (the statekeeper forgot everything): the farm is on disk.
    let sk = grid();
    let a = start(sk, config).await;
    settled(&[&a], 2).await;
    let store = a.store().unwrap();
    assert_eq!(store.get("b0", "i0").await.unwrap(), None);
    for i in 1..200 {
        let item = store.get(&format!("b{}", i % 13), &format!("i{i}")).await.unwrap().expect("kept");
        assert_eq!(item.value, format!("v{i}").into_bytes());
    }
    assert_eq!(store.stats().items, 199);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
